//! The shell script the nested host runs: the caller's environment, its
//! directory, then the command with stdout and stderr on their own ports.

use std::ffi::OsString;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

/// Variables that name this machine's runtime state (sockets, job-server
/// pipes, a temporary directory on what is 9p inside) and would mislead
/// programs in the nested host.
const NOT_PASSED: &[&str] = &[
    "TMPDIR",
    "XDG_RUNTIME_DIR",
    "DBUS_SESSION_BUS_ADDRESS",
    "SSH_AUTH_SOCK",
    "MAKEFLAGS",
    "MFLAGS",
    "CARGO_MAKEFLAGS",
    "PWD",
    "OLDPWD",
    "SHLVL",
    "_",
];

/// The temporary directory inside: a tmpfs of the nested host's own.
const NESTED_TMPDIR: &str = "/dev/shm";

/// Set inside, so that a program can tell it runs in the nested host.
const MARKER: &str = "AIRLOCK_NESTED";

pub fn render(cwd: &Path, env: &[(OsString, OsString)], argv: &[OsString]) -> String {
    let mut script = String::from(
        "#!/bin/sh\n# Written by `cargo xtask nested`; runs inside the nested test host.\n",
    );
    for (name, value) in env {
        let Some(name) = name.to_str() else { continue };
        if !is_identifier(name) || NOT_PASSED.contains(&name) || name == MARKER {
            continue;
        }
        script.push_str(&format!("export {name}={}\n", quote(value.as_bytes())));
    }
    script.push_str(&format!("export {MARKER}=1\n"));
    // The nested host's own tmpfs: Unix sockets do not work on 9p.
    script.push_str(&format!("export TMPDIR={NESTED_TMPDIR}\n"));
    let dir = quote(cwd.as_os_str().as_bytes());
    script.push_str(&format!(
        "cd {dir} 2>/dev/null || {{ echo \"nested host: cannot enter {dir} (/dev/shm is the nested host's own)\" >/dev/airlock-stderr; exit 126; }}\n"
    ));
    let words: Vec<String> = argv.iter().map(|a| quote(a.as_bytes())).collect();
    script.push_str(&format!(
        "exec {} >/dev/airlock-stdout 2>/dev/airlock-stderr\n",
        words.join(" ")
    ));
    script
}

fn is_identifier(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c == '_' || c.is_ascii_alphabetic())
        && chars.all(|c| c == '_' || c.is_ascii_alphanumeric())
}

/// Single-quotes bytes for sh; a quote inside becomes `'\''`.
fn quote(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    format!("'{}'", text.replace('\'', r"'\''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quotes_everything_and_drops_host_runtime_state() {
        let env = vec![
            ("PATH".into(), "/usr/bin:/bin".into()),
            ("AIRLOCK_TOKENS".into(), "a'b c".into()),
            ("TMPDIR".into(), "/host/tmp".into()),
            ("BAD-NAME".into(), "x".into()),
        ];
        let argv = vec!["cargo".into(), "it's".into(), "$HOME".into()];
        let script = render(Path::new("/work/my dir"), &env, &argv);
        assert!(script.contains("export PATH='/usr/bin:/bin'\n"));
        assert!(script.contains(r"export AIRLOCK_TOKENS='a'\''b c'"));
        assert!(!script.contains("/host/tmp") && !script.contains("BAD-NAME"));
        assert!(script.contains("export AIRLOCK_NESTED=1\nexport TMPDIR=/dev/shm\n"));
        assert!(script.contains("cd '/work/my dir' 2>/dev/null || {"));
        assert!(script.ends_with(
            "exec 'cargo' 'it'\\''s' '$HOME' >/dev/airlock-stdout 2>/dev/airlock-stderr\n"
        ));
    }
}

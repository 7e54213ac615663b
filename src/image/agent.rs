//! Finds (or builds) the statically linked guest agent that goes into the image.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

use super::command::run_logged;

/// The target triple the agent is built for; built with crt-static so that it
/// needs no dynamic loader and can run as PID 1 before anything is mounted.
const AGENT_TARGET: &str = "x86_64-unknown-linux-gnu";
const AGENT_BIN: &str = "airlock-agent";

/// Returns the agent binary: `$AIRLOCK_AGENT` if set; else, when this binary
/// was built from an airlock checkout that still exists, a fresh static build
/// from it; else `airlock-agent` beside this executable.
pub fn locate(log_dir: &Path) -> Result<PathBuf> {
    if let Some(path) = std::env::var_os("AIRLOCK_AGENT").filter(|p| !p.is_empty()) {
        let path = PathBuf::from(path);
        check_static(&path)?;
        return Ok(path);
    }
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"));
    if workspace.join("guest-agent/Cargo.toml").is_file() {
        let path = build_from_workspace(workspace, log_dir)?;
        check_static(&path)?;
        return Ok(path);
    }
    let beside = std::env::current_exe()
        .context("cannot find the airlock executable")?
        .with_file_name(AGENT_BIN);
    if !beside.is_file() {
        bail!(
            "cannot find the guest agent: put the static {AGENT_BIN} binary beside airlock, or set \
             AIRLOCK_AGENT to its path"
        );
    }
    check_static(&beside)?;
    Ok(beside)
}

/// Flags for a static agent whose bytes do not depend on where the
/// workspace is (CARGO_ENCODED_RUSTFLAGS: one flag per 0x1f-separated
/// field, so a path with spaces stays one flag).
fn reproducible_rustflags(workspace: &Path) -> std::ffi::OsString {
    let mut flags =
        std::ffi::OsString::from("-Ctarget-feature=+crt-static\x1f--remap-path-prefix=");
    flags.push(workspace.as_os_str());
    flags.push("=/airlock");
    flags
}

fn build_from_workspace(workspace: &Path, log_dir: &Path) -> Result<PathBuf> {
    // Its own target directory: no lock contention with the cargo that is
    // running us, and the host build's flags stay untouched.
    let target_dir = workspace.join("target").join("agent");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(workspace)
        .args([
            "build",
            "--release",
            "--locked",
            "-p",
            AGENT_BIN,
            "--target",
            AGENT_TARGET,
        ])
        .arg("--target-dir")
        .arg(&target_dir)
        // The checkout's path would land in the binary (debug info, build
        // scripts' output paths) and so in the image key: two clones would
        // build two images and two templates of the same code.
        .env("CARGO_ENCODED_RUSTFLAGS", reproducible_rustflags(workspace))
        .env_remove("RUSTFLAGS");
    std::fs::create_dir_all(log_dir).context("cannot create the log directory")?;
    run_logged(
        cmd,
        "building the guest agent",
        &log_dir.join("agent-build.log"),
        |line| {
            if line.trim_start().starts_with("Compiling") {
                eprintln!("[agent] {}", line.trim());
            }
        },
    )?;
    Ok(target_dir
        .join(AGENT_TARGET)
        .join("release")
        .join(AGENT_BIN))
}

/// An agent with a dynamic loader would not start as PID 1 in the guest.
pub fn check_static(path: &Path) -> Result<()> {
    let bytes =
        std::fs::read(path).with_context(|| format!("cannot read the agent {}", path.display()))?;
    match elf_has_interpreter(&bytes) {
        Some(false) => Ok(()),
        Some(true) => bail!(
            "{} is dynamically linked; the guest agent must be static (build it with \
             RUSTFLAGS='-C target-feature=+crt-static' --target {AGENT_TARGET})",
            path.display()
        ),
        None => bail!("{} is not an x86-64 ELF executable", path.display()),
    }
}

/// Whether a 64-bit little-endian x86-64 ELF has a PT_INTERP segment; `None`
/// if the bytes are not such an ELF (or are truncated).
pub fn elf_has_interpreter(bytes: &[u8]) -> Option<bool> {
    const PT_INTERP: u32 = 3;
    const EM_X86_64: u16 = 62;
    if bytes.get(..4)? != b"\x7fELF" || *bytes.get(4)? != 2 || *bytes.get(5)? != 1 {
        return None;
    }
    let u16_at = |off: usize| {
        Some(u16::from_le_bytes(
            bytes.get(off..off + 2)?.try_into().ok()?,
        ))
    };
    let u32_at = |off: usize| {
        Some(u32::from_le_bytes(
            bytes.get(off..off + 4)?.try_into().ok()?,
        ))
    };
    let u64_at = |off: usize| {
        Some(u64::from_le_bytes(
            bytes.get(off..off + 8)?.try_into().ok()?,
        ))
    };
    if u16_at(18)? != EM_X86_64 {
        return None;
    }
    let phoff = usize::try_from(u64_at(32)?).ok()?;
    let phentsize = usize::from(u16_at(54)?);
    let phnum = usize::from(u16_at(56)?);
    for i in 0..phnum {
        let entry = phoff.checked_add(i.checked_mul(phentsize)?)?;
        if u32_at(entry)? == PT_INTERP {
            return Some(true);
        }
    }
    Some(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dynamic_host_binary_has_an_interpreter() {
        let sh = std::fs::read("/bin/sh").unwrap();
        assert_eq!(elf_has_interpreter(&sh), Some(true));
    }

    #[test]
    fn the_checkout_path_is_remapped_as_one_flag_even_with_spaces() {
        let flags = reproducible_rustflags(Path::new("/home/a b/airlock"));
        let flags = flags.to_str().unwrap();
        let fields: Vec<&str> = flags.split('\x1f').collect();
        assert_eq!(
            fields,
            [
                "-Ctarget-feature=+crt-static",
                "--remap-path-prefix=/home/a b/airlock=/airlock"
            ]
        );
    }

    #[test]
    fn garbage_and_truncation_are_not_elf() {
        assert_eq!(elf_has_interpreter(b"hello"), None);
        let sh = std::fs::read("/bin/sh").unwrap();
        assert_eq!(elf_has_interpreter(&sh[..40]), None);
        let mut lying = sh[..64].to_vec();
        lying[56] = 0xff; // many program headers beyond the end
        assert_eq!(elf_has_interpreter(&lying), None);
    }
}

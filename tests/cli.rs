//! The CLI's answers about this host: doctor's verdict, and the one-line
//! errors when KVM is missing or out of reach.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use common::{airlock, run};

#[test]
fn doctor_reports_this_hosts_kvm() {
    let out = run({
        let mut cmd = airlock();
        cmd.args(["doctor", "--no-boot"]);
        cmd
    });
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "doctor says not ready:\n{stdout}");
    assert!(
        stdout.contains("[ok  ] kvm: /dev/kvm opens, API version 12"),
        "{stdout}"
    );
    // Independent of airlock's own detection: the module list in sysfs.
    let expected = if Path::new("/sys/module/kvm_pvm").exists() {
        "kvm_pvm"
    } else {
        "hardware"
    };
    let flavor = stdout
        .lines()
        .find(|l| l.contains("kvm flavor:"))
        .expect("a flavor line");
    assert!(flavor.contains(expected), "expected {expected}: {flavor}");
    // On kvm_pvm, doctor says plainly that results there cannot be trusted,
    // and where the tests run instead.
    let trust = stdout.lines().find(|l| l.contains("kvm trust:"));
    if expected == "kvm_pvm" {
        let trust = trust.expect("a kvm trust line on kvm_pvm");
        assert!(trust.contains("not for trusting"), "{trust}");
        assert!(trust.contains("cargo xtask test"), "{trust}");
    } else {
        assert!(trust.is_none(), "{stdout}");
    }
    assert!(stdout.contains("verdict: ready"), "{stdout}");
}

fn assert_one_line_error(stderr: &str, needle: &str) {
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "expected one line, got:\n{stderr}");
    assert!(lines[0].starts_with("error: "), "{stderr}");
    assert!(lines[0].contains(needle), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn missing_kvm_is_a_one_line_error() {
    let mut cmd = airlock();
    cmd.arg("serve")
        .env("AIRLOCK_KVM_DEVICE", "/nonexistent/kvm");
    let out = run(cmd);
    assert!(!out.status.success());
    assert_one_line_error(&String::from_utf8_lossy(&out.stderr), "does not exist");

    let mut cmd = airlock();
    cmd.arg("doctor")
        .env("AIRLOCK_KVM_DEVICE", "/nonexistent/kvm");
    let out = run(cmd);
    assert!(!out.status.success());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("[FAIL] kvm: /nonexistent/kvm does not exist"),
        "{stdout}"
    );
    assert!(stdout.contains("verdict: not ready"), "{stdout}");
}

#[test]
fn unreadable_kvm_is_a_one_line_error() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let device = dir.path().join("kvm");
    std::fs::write(&device, b"").unwrap();
    std::fs::set_permissions(&device, std::fs::Permissions::from_mode(0o000)).unwrap();
    // Root opens anything, so as root the check runs as nobody.
    // SAFETY: geteuid has no preconditions.
    let mut cmd = if unsafe { libc::geteuid() } == 0 {
        let mut cmd = std::process::Command::new("setpriv");
        cmd.args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            env!("CARGO_BIN_EXE_airlock"),
        ]);
        cmd
    } else {
        airlock()
    };
    cmd.arg("serve").env("AIRLOCK_KVM_DEVICE", &device);
    let out = run(cmd);
    assert!(!out.status.success());
    assert_one_line_error(&String::from_utf8_lossy(&out.stderr), "permission denied");
}

#[test]
fn serving_beyond_loopback_without_tokens_is_refused() {
    let mut cmd = airlock();
    cmd.args(["serve", "--http", "0.0.0.0:0"])
        .env_remove("AIRLOCK_TOKENS")
        .stdin(std::process::Stdio::null());
    let out = run(cmd);
    assert!(!out.status.success());
    assert_one_line_error(
        &String::from_utf8_lossy(&out.stderr),
        "without authentication",
    );
}

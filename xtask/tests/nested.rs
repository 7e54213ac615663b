//! `cargo xtask nested` end to end: a real nested host (QEMU TCG) boots and
//! runs one command with this machine's files, directory and environment.

use std::process::Command;

fn xtask() -> Command {
    Command::new(env!("CARGO_BIN_EXE_xtask"))
}

#[test]
fn a_command_runs_inside_with_its_directory_environment_output_and_status() {
    // Any directory of this machine's, /tmp included (a CI checkout may live
    // there), is seen inside.
    let dir = std::env::temp_dir().join(format!("xtask nested it's here {}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("marker"), "from the host").unwrap();
    let out = xtask()
        .args(["nested", "--timeout", "5m", "--", "sh", "-c"])
        .arg(
            "cat marker; echo; echo \"var=$XTASK_TEST_VAR nested=$AIRLOCK_NESTED\"; \
             echo to-stderr >&2; test -c /dev/kvm && echo kvm; \
             test -e /sys/module/kvm_amd && echo kvm_amd; \
             python3 -c 'import os, socket, tempfile; \
             socket.socket(socket.AF_UNIX).bind(os.path.join(tempfile.gettempdir(), \"s\")); \
             print(\"unix socket in\", tempfile.gettempdir())'; exit 7",
        )
        .current_dir(&dir)
        .env("XTASK_TEST_VAR", "a b'c $HOME")
        .output()
        .expect("xtask runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(7),
        "stdout:\n{stdout}\nstderr:\n{stderr}"
    );
    assert_eq!(
        stdout, "from the host\nvar=a b'c $HOME nested=1\nkvm\nkvm_amd\nunix socket in /dev/shm\n",
        "stderr:\n{stderr}"
    );
    assert!(stderr.contains("to-stderr\n"), "{stderr}");
    assert!(!stdout.contains("to-stderr"));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn past_its_timeout_the_host_is_killed_with_status_124() {
    let out = xtask()
        .args(["nested", "--timeout", "1s", "--", "sleep", "600"])
        .output()
        .expect("xtask runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(124), "{stderr}");
    assert!(
        stderr.contains("did not finish within its time limit"),
        "{stderr}"
    );
}

#[test]
fn missing_qemu_is_a_one_line_error_naming_the_package() {
    let out = xtask()
        .args(["nested", "--", "true"])
        .env("PATH", "/nonexistent")
        .output()
        .expect("xtask runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("apt-get install qemu-system-x86"),
        "{stderr}"
    );
}

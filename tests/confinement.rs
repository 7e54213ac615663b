//! The confinement of each VMM, seen from outside on real microVMs: its
//! seccomp filters, jail, identity, cgroup and environment; a forbidden
//! syscall ending it with a report; the console cap; sealed templates.

mod common;

use std::collections::BTreeSet;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Once;
use std::time::{Duration, Instant};

use airlock::sandbox::Sandbox;
use airlock::vm::{Vm, VmSpec};
use airlock::vmm::control::ExitReason;

/// A secret the gateway holds that no VMM may see.
const CANARY: &str = "AIRLOCK_TOKENS";

fn set_canary() {
    static ONCE: Once = Once::new();
    // SAFETY: set once, before this binary's tests read the environment
    // through anything but std (whose own reads take its lock).
    ONCE.call_once(|| unsafe { std::env::set_var(CANARY, "canary-secret-token") });
}

fn exe() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_airlock"))
}

async fn sandbox() -> Sandbox {
    set_canary();
    let template = common::template().await;
    Sandbox::restore(&template, exe()).await.expect("restore")
}

fn status_field(status: &str, name: &str) -> String {
    status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{name}:")))
        .unwrap_or_else(|| panic!("no {name} in status"))
        .trim()
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_vmm_is_confined() {
    let sandbox = sandbox().await;
    let pid = sandbox.pid();
    let proc_dir = PathBuf::from(format!("/proc/{pid}"));

    let threads: Vec<PathBuf> = std::fs::read_dir(proc_dir.join("task"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert!(
        threads.len() >= 4,
        "main, vCPU, vsock, control, signals: {threads:?}"
    );
    for thread in &threads {
        let status = std::fs::read_to_string(thread.join("status")).unwrap();
        let comm = std::fs::read_to_string(thread.join("comm")).unwrap();
        assert_eq!(status_field(&status, "Seccomp"), "2", "thread {comm}");
        assert_eq!(status_field(&status, "NoNewPrivs"), "1", "thread {comm}");
        assert_eq!(
            status_field(&status, "CapEff"),
            "0000000000000000",
            "thread {comm}"
        );
        for id in status_field(&status, "Uid").split_whitespace() {
            assert_ne!(id, "0", "thread {comm} runs as root");
        }
    }

    // Its root is the jail's, which holds only what the VM needs.
    let root = std::fs::metadata(proc_dir.join("root")).unwrap();
    let host_root = std::fs::metadata("/").unwrap();
    assert!(
        (root.dev(), root.ino()) != (host_root.dev(), host_root.ino()),
        "the VMM sees the host's root"
    );
    let entries: BTreeSet<String> = std::fs::read_dir(proc_dir.join("root"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    let expected: BTreeSet<String> = ["kernel", "rootfs", "template", "run"]
        .map(String::from)
        .into();
    assert_eq!(entries, expected);

    // Its own namespaces.
    for ns in ["mnt", "pid", "net", "ipc", "uts"] {
        let theirs = std::fs::read_link(proc_dir.join("ns").join(ns)).unwrap();
        let ours = std::fs::read_link(Path::new("/proc/self/ns").join(ns)).unwrap();
        assert_ne!(theirs, ours, "the VMM shares the {ns} namespace");
    }

    // No secret of the gateway's in its environment.
    assert!(std::env::var(CANARY).is_ok(), "the canary is set here");
    let environ = std::fs::read(proc_dir.join("environ")).unwrap();
    let environ = String::from_utf8_lossy(&environ);
    assert!(
        !environ.contains(CANARY),
        "the VMM sees {CANARY}: {environ}"
    );

    let limits = std::fs::read_to_string(proc_dir.join("limits")).unwrap();
    let limit = |name: &str| {
        limits
            .lines()
            .find(|l| l.starts_with(name))
            .unwrap_or_else(|| panic!("no {name}"))
            .split_whitespace()
            .rev()
            .nth(1)
            .unwrap()
            .to_string()
    };
    assert_eq!(limit("Max core file size"), "0");
    assert_eq!(limit("Max processes"), "0");
    assert_eq!(limit("Max open files"), "512");

    // Its cgroup, where the host has cgroup v2 (the nested test host does).
    if Path::new("/sys/fs/cgroup/cgroup.controllers").is_file() {
        let cgroup = std::fs::read_to_string(proc_dir.join("cgroup")).unwrap();
        let path = cgroup.trim().strip_prefix("0::").expect("a v2 cgroup");
        assert!(path.starts_with("/airlock/vmm-"), "{path}");
        let dir = Path::new("/sys/fs/cgroup").join(&path[1..]);
        let memory_max: u64 = std::fs::read_to_string(dir.join("memory.max"))
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        let guest = u64::from(common::template().await.info.shape.memory_mib) << 20;
        assert!(
            memory_max > guest && memory_max <= guest + (128 << 20),
            "{memory_max}"
        );
        let pids: u32 = std::fs::read_to_string(dir.join("pids.max"))
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        assert!(pids <= 16, "{pids}");
    }

    // Confined, it still works.
    let out = airlock::bench::run_python(sandbox.client(), "print(6 * 7)")
        .await
        .expect("run_code");
    assert_eq!(out.trim(), "42");
    sandbox.destroy().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forbidden_syscall_ends_the_vmm_with_a_report_and_spares_the_others() {
    let mut control = sandbox().await;
    let mut main = sandbox().await;
    let bystander = sandbox().await;
    for (sandbox, thread) in [(&mut control, "control"), (&mut main, "main")] {
        let vm = sandbox.vm_mut();
        vm.debug_forbidden_syscall(thread)
            .await
            .expect("command sent");
        let report = tokio::time::timeout(Duration::from_secs(60), vm.wait())
            .await
            .expect("the VMM ends at once")
            .expect("a report");
        assert_eq!(report.reason, ExitReason::SeccompViolation, "{report:?}");
        let expected = format!(
            "VMM killed by seccomp: syscall {} on its {thread} thread",
            libc::SYS_socket
        );
        assert_eq!(report.detail, expected);
        assert_eq!(vm.exit_code(), Some(128 + libc::SIGSYS));
    }
    let out = airlock::bench::run_python(bystander.client(), "print('still here')")
        .await
        .expect("the other sandbox serves on");
    assert_eq!(out.trim(), "still here");
    bystander.destroy().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endless_console_stays_under_its_cap() {
    const CAP: u64 = 4096;
    let run_dir = tempfile::tempdir().unwrap();
    // A guest that only makes console exits takes all of a host CPU; on a
    // one-CPU test host that would starve this test. cpu.max bounds it
    // where the host has cgroup v2 (it is also what an operator would do).
    let mut confinement = airlock::confinement::Confinement::current();
    if let Some(jail) = &mut confinement.jail {
        jail.cpu_max = Some("30000 100000".into());
    }
    let cgrouped = confinement
        .jail
        .as_ref()
        .is_some_and(|jail| jail.cgroup_parent.is_some());
    // PID 1 writes "y" lines to the console for ever. Unpaced, that is an
    // exit storm which freezes the emulated nested test host whichever VMM
    // runs the guest (QEMU too: xtask/experiments/console-flood.sh), so
    // there it writes a 60-byte line every 10 ms instead, still without end.
    let (init, extra_cmdline) = if std::env::var_os("AIRLOCK_NESTED").is_some() {
        (
            "/bin/sh",
            format!(
                "-- -c \"while :; do echo {}; sleep 0.01; done\"",
                "y".repeat(60)
            ),
        )
    } else {
        ("/usr/bin/yes", String::new())
    };
    let spec = VmSpec {
        console_max_bytes: CAP,
        confinement,
        ..common::boot_spec(run_dir.path(), init, extra_cmdline, "console-flood")
    };
    let mut vm = Vm::spawn(&spec).await.expect("VMM starts");
    if cgrouped {
        let cgroup = std::fs::read_to_string(format!("/proc/{}/cgroup", vm.pid())).unwrap();
        let dir = Path::new("/sys/fs/cgroup").join(cgroup.trim().trim_start_matches("0::/"));
        let cpu_max = std::fs::read_to_string(dir.join("cpu.max")).unwrap();
        assert_eq!(cpu_max.trim(), "30000 100000");
    }
    let log = vm.console_log().to_path_buf();
    let deadline = Instant::now() + Duration::from_secs(240);
    let mut restarted = false;
    while Instant::now() < deadline {
        let size = std::fs::metadata(&log).map(|m| m.len()).unwrap_or(0);
        assert!(
            size <= CAP,
            "the console log holds {size} bytes, past its cap {CAP}"
        );
        let head = std::fs::read(&log).unwrap_or_default();
        if head.starts_with(b"[airlock: the console log reached its cap") {
            restarted = true;
            // Keep watching a while after the first restart.
            if head.iter().filter(|b| **b == b'y').count() > 100 {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(restarted, "the guest's output never reached the cap");
    let report = vm.stop(Duration::from_secs(10)).await.expect("stops");
    assert_eq!(report.reason, ExitReason::Stopped);
}

/// Copies a template directory (a copy is accepted: same content).
fn copy_template(from: &Path, to: &Path) {
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
    }
}

fn tamper(path: &Path, offset: u64) {
    use std::os::unix::fs::{FileExt, PermissionsExt};
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o644)).unwrap();
    let file = std::fs::File::options().write(true).open(path).unwrap();
    file.write_all_at(b"\x90\x90\x90\x90", offset).unwrap();
    drop(file);
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o444)).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tampered_template_is_refused() {
    let template = common::template().await;
    let cache = template
        .dir
        .parent()
        .and_then(Path::parent)
        .expect("the cache")
        .to_path_buf();
    let copy = tempfile::tempdir().unwrap();
    copy_template(&template.dir, copy.path());
    let loaded = airlock::template::open(&cache, copy.path(), &template.image)
        .expect("an intact copy verifies")
        .expect("a sealed template");

    // Rewritten after it was checked: a restore refuses it.
    tamper(&copy.path().join("memory"), 1 << 20);
    let err = Sandbox::restore(&loaded, exe())
        .await
        .err()
        .expect("refused");
    let text = format!("{err:#}");
    assert!(
        text.contains("memory changed after it was sealed"),
        "{text}"
    );

    // Rewritten before: loading refuses it, by content, for memory and state.
    let err = airlock::template::open(&cache, copy.path(), &template.image).expect_err("refused");
    assert!(
        format!("{err:#}").contains("memory changed after it was sealed"),
        "{err:#}"
    );

    let copy = tempfile::tempdir().unwrap();
    copy_template(&template.dir, copy.path());
    tamper(&copy.path().join("state.json"), 100);
    let err = airlock::template::open(&cache, copy.path(), &template.image).expect_err("refused");
    assert!(
        format!("{err:#}").contains("state.json changed after it was sealed"),
        "{err:#}"
    );
}

//! Snapshots of real microVMs: save a booted guest, restore it in a new VMM
//! process, and check the restored guest works and is tied to its image.

mod common;

use std::time::{Duration, Instant};

use airlock::agent_client::AgentClient;
use airlock::vm::{Vm, VmError, VmSpec};
use airlock::vmm::control::ExitReason;

const BOOT_TIMEOUT: Duration = Duration::from_secs(300);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(60);

fn spec(run_dir: &std::path::Path) -> VmSpec {
    let image_dir = common::image_dir();
    VmSpec {
        airlock_exe: env!("CARGO_BIN_EXE_airlock").into(),
        kernel: image_dir.join("vmlinux"),
        rootfs: image_dir.join("rootfs.ext4"),
        vcpus: 1,
        memory_mib: 256,
        extra_cmdline: String::new(),
        init: None,
        run_dir: run_dir.to_path_buf(),
        restore: None,
        resume: None,
        snapshot_dir: None,
        console_max_bytes: airlock::vmm::config::DEFAULT_CONSOLE_MAX_BYTES,
        label: "test".into(),
        confinement: airlock::confinement::Confinement::current(),
        vsock_forward: Vec::new(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_saved_guest_restores_and_answers() {
    let boot_dir = tempfile::tempdir().unwrap();
    let snap_dir = tempfile::tempdir().unwrap();
    let mut boot = spec(boot_dir.path());
    boot.snapshot_dir = Some(snap_dir.path().to_path_buf());
    let mut vm = Vm::spawn(&boot).await.expect("VMM starts");
    vm.wait_agent_ready(BOOT_TIMEOUT).await.expect("agent up");
    {
        let client = AgentClient::connect(
            vm.vsock_socket(),
            airlock_protocol::AGENT_VSOCK_PORT,
            CONNECT_TIMEOUT,
        )
        .await
        .expect("connect");
        client.ping().await.expect("ping before snapshot");
    }
    let info = vm.snapshot(snap_dir.path()).await.expect("snapshot");
    eprintln!("snapshot: {info:?}");

    let run_dir = tempfile::tempdir().unwrap();
    let mut restore = spec(run_dir.path());
    restore.restore = Some(snap_dir.path().to_path_buf());
    let started = Instant::now();
    let mut restored = Vm::spawn(&restore).await.expect("restore starts");
    let client = AgentClient::connect(
        restored.vsock_socket(),
        airlock_protocol::AGENT_VSOCK_PORT,
        CONNECT_TIMEOUT,
    )
    .await
    .expect("connect to the restored agent");
    let pong = client.ping().await.expect("ping after restore");
    eprintln!(
        "restore timing {:?}, first ping after {:?}",
        restored.timing(),
        started.elapsed()
    );
    assert!(pong.uptime_ms > 0);
    let report = restored.stop(Duration::from_secs(10)).await.expect("stops");
    assert_eq!(report.reason, ExitReason::Stopped);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restored_sandboxes_are_warm_isolated_fresh_and_on_time() {
    use airlock::bench::run_python;
    let template = common::template().await;
    let exe = std::path::Path::new(env!("CARGO_BIN_EXE_airlock"));
    let mut sandboxes = Vec::new();
    for _ in 0..10 {
        sandboxes.push(
            airlock::sandbox::Sandbox::restore(&template, exe)
                .await
                .expect("restore"),
        );
    }
    let first = &sandboxes[0];
    // The template's warm imports are there without importing again.
    let warm = run_python(
        first.client(),
        "import sys\nprint(all(m in sys.modules for m in ('numpy', 'pandas', 'matplotlib')))",
    )
    .await
    .expect("run_code");
    assert_eq!(warm.trim(), "True");

    // State made in one sandbox is absent in the others.
    run_python(
        first.client(),
        "secret = 42\nopen('/tmp/secret.txt', 'w').write('x')",
    )
    .await
    .unwrap();
    for other in &sandboxes[1..] {
        let out = run_python(
            other.client(),
            "import os\nprint('secret' in globals(), os.path.exists('/tmp/secret.txt'))",
        )
        .await
        .unwrap();
        assert_eq!(out.trim(), "False False", "state leaked between sandboxes");
    }

    // Randomness differs everywhere; the clock is the host's.
    let mut seen = std::collections::HashSet::new();
    for sandbox in &sandboxes {
        let host_before = std::time::SystemTime::now();
        let out = run_python(
            sandbox.client(),
            "import os, random, uuid, time\nprint(os.urandom(16).hex(), random.random(), uuid.uuid4(), time.time())",
        )
        .await
        .unwrap();
        let host_after = std::time::SystemTime::now();
        let fields: Vec<&str> = out.split_whitespace().collect();
        assert_eq!(fields.len(), 4, "{out}");
        for value in &fields[..3] {
            assert!(
                seen.insert(value.to_string()),
                "{value} repeated across sandboxes"
            );
        }
        let guest: f64 = fields[3].parse().unwrap();
        let unix = |t: std::time::SystemTime| {
            t.duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_secs_f64()
        };
        assert!(
            guest > unix(host_before) - 2.0 && guest < unix(host_after) + 2.0,
            "guest clock {guest} vs host {}..{}",
            unix(host_before),
            unix(host_after)
        );
    }
    for sandbox in sandboxes {
        sandbox.destroy().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_refuses_another_image() {
    let template = common::template().await;
    let dir = tempfile::tempdir().unwrap();
    let other_rootfs = dir.path().join("rootfs.ext4");
    std::fs::write(&other_rootfs, vec![0x5a; 4 << 20]).unwrap();
    let mut restore = spec(dir.path());
    restore.rootfs = other_rootfs;
    restore.restore = Some(template.dir.clone());
    match Vm::spawn(&restore).await {
        Err(VmError::Ended { reason, detail, .. }) => {
            assert_eq!(reason, ExitReason::Fatal);
            assert!(
                detail.contains("the snapshot was made from image"),
                "{detail}"
            );
            assert!(detail.contains("recreate the template"), "{detail}");
        }
        Err(other) => panic!("unexpected error: {other}"),
        Ok(_) => panic!("a restore onto another image must be refused"),
    }
}

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
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_saved_guest_restores_and_answers() {
    let boot_dir = tempfile::tempdir().unwrap();
    let snap_dir = tempfile::tempdir().unwrap();
    let mut vm = Vm::spawn(&spec(boot_dir.path())).await.expect("VMM starts");
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

//! Real microVMs under /dev/kvm: boot the image, reach the agent over vsock,
//! and check how VMs end. Slow on a software-nested host (a boot takes tens
//! of seconds), so each test boots as few guests as it can.

mod common;

use std::time::{Duration, Instant};

use airlock::agent_client::AgentClient;
use airlock::vm::{Vm, VmError, VmSpec};
use airlock::vmm::control::ExitReason;

/// Boots on kvm_pvm take ~40 s; leave room for a loaded CI machine.
const BOOT_TIMEOUT: Duration = Duration::from_secs(300);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

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

async fn boot(run_dir: &std::path::Path, vcpus: u8) -> (Vm, AgentClient) {
    let mut spec = spec(run_dir);
    spec.vcpus = vcpus;
    let mut vm = Vm::spawn(&spec).await.expect("VMM starts");
    vm.wait_agent_ready(BOOT_TIMEOUT)
        .await
        .expect("agent comes up");
    let client = AgentClient::connect(
        vm.vsock_socket(),
        airlock_protocol::AGENT_VSOCK_PORT,
        CONNECT_TIMEOUT,
    )
    .await
    .expect("agent accepts a connection");
    (vm, client)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_vms_answer_ping_on_their_own_sockets_and_power_off_cleanly() {
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let started = Instant::now();
    let ((mut vm_a, client_a), (mut vm_b, client_b)) =
        tokio::join!(boot(dir_a.path(), 1), boot(dir_b.path(), 2));
    eprintln!("two VMs booted to agent-ready in {:?}", started.elapsed());
    assert_ne!(vm_a.vsock_socket(), vm_b.vsock_socket());

    let pong_a = client_a.ping().await.expect("ping A");
    let pong_b = client_b.ping().await.expect("ping B");
    assert_eq!(pong_a.agent_version, env!("CARGO_PKG_VERSION"));
    assert_eq!(pong_b.agent_version, env!("CARGO_PKG_VERSION"));
    assert!(pong_a.uptime_ms > 0 && pong_b.uptime_ms > 0);

    // The VMM counts what the guest made it do.
    let stats = vm_a.stats().await.expect("stats");
    assert!(stats.exits_total > 0, "{stats:?}");
    assert!(stats.interrupts_injected > 0, "{stats:?}");
    assert!(stats.exits.contains_key("mmio_write"), "{stats:?}");

    // A guest that powers off ends its VMM cleanly; the other one is untouched.
    client_a.shutdown().await.expect("shutdown request");
    let report = vm_a.wait().await.expect("exit report");
    assert_eq!(report.reason, ExitReason::GuestShutdown, "{report:?}");
    assert_eq!(vm_a.exit_code(), Some(0));
    let pong_b = client_b
        .ping()
        .await
        .expect("B still answers after A is gone");
    assert!(pong_b.uptime_ms >= 1);
    let report = vm_b.stop(Duration::from_secs(10)).await.expect("B stops");
    assert_eq!(report.reason, ExitReason::Stopped);
    assert_eq!(vm_b.exit_code(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kernel_panic_ends_the_vm_with_the_console_tail() {
    let dir = tempfile::tempdir().unwrap();
    let mut spec = spec(dir.path());
    spec.init = Some("/no/such/init".into());
    let mut vm = Vm::spawn(&spec).await.expect("VMM starts");
    let err = vm
        .wait_agent_ready(BOOT_TIMEOUT)
        .await
        .expect_err("no agent with a bad init");
    match err {
        VmError::Ended {
            reason,
            console_tail,
            ..
        } => {
            assert_eq!(reason, ExitReason::GuestPanic);
            assert!(
                console_tail.iter().any(|l| l.contains("Kernel panic")),
                "{console_tail:?}"
            );
        }
        other => panic!("expected a panic report, got {other}"),
    }
    let _ = vm.wait().await;
    assert_eq!(vm.exit_code(), Some(1), "a panic is a failure exit");
}

/// A minimal ELF "kernel" whose entry point is `code`, loaded at 1 MiB.
fn tiny_kernel(code: &[u8]) -> tempfile::NamedTempFile {
    let entry: u64 = 0x10_0000;
    let mut elf = Vec::new();
    elf.extend_from_slice(&[0x7f, b'E', b'L', b'F', 2, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
    elf.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    elf.extend_from_slice(&62u16.to_le_bytes()); // EM_X86_64
    elf.extend_from_slice(&1u32.to_le_bytes());
    elf.extend_from_slice(&entry.to_le_bytes());
    elf.extend_from_slice(&64u64.to_le_bytes()); // program headers follow the header
    elf.extend_from_slice(&0u64.to_le_bytes());
    elf.extend_from_slice(&0u32.to_le_bytes());
    for half in [64u16, 56, 1, 64, 0, 0] {
        elf.extend_from_slice(&half.to_le_bytes());
    }
    let offset = 64 + 56;
    elf.extend_from_slice(&1u32.to_le_bytes()); // PT_LOAD
    elf.extend_from_slice(&5u32.to_le_bytes()); // r-x
    elf.extend_from_slice(&(offset as u64).to_le_bytes());
    elf.extend_from_slice(&entry.to_le_bytes());
    elf.extend_from_slice(&entry.to_le_bytes());
    elf.extend_from_slice(&(code.len() as u64).to_le_bytes());
    elf.extend_from_slice(&(code.len() as u64).to_le_bytes());
    elf.extend_from_slice(&0x1000u64.to_le_bytes());
    elf.extend_from_slice(code);
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), elf).unwrap();
    readable_by_all(file.path());
    file
}

/// The jailed VMM runs as an unprivileged user: it reads only what all may.
fn readable_by_all(path: &std::path::Path) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o644)).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guest_that_faults_fatally_ends_with_a_clear_error() {
    // ud2 with an empty IDT: #UD cannot be delivered, so the CPU triple-faults
    // (on kvm_pvm the emulator may stop it first with an internal error).
    let kernel = tiny_kernel(&[0x0f, 0x0b]);
    let dir = tempfile::tempdir().unwrap();
    let mut spec = spec(dir.path());
    spec.kernel = kernel.path().to_path_buf();
    let mut vm = Vm::spawn(&spec).await.expect("VMM starts");
    let report = vm.wait().await.expect("exit report");
    assert_eq!(report.reason, ExitReason::Fatal, "{report:?}");
    assert!(
        report.detail.contains("triple-faulted") || report.detail.contains("KVM internal error"),
        "{}",
        report.detail
    );
    // AMD SVM resets the vCPU on a shutdown: the report must say so rather
    // than give the reset vector as the faulting rip. VMX and kvm_pvm keep it.
    let svm = std::path::Path::new("/sys/module/kvm_amd").exists()
        && !std::path::Path::new("/sys/module/kvm_pvm").exists();
    if svm {
        assert!(
            report.detail.contains("reset the vCPU"),
            "{}",
            report.detail
        );
        assert!(!report.detail.contains("rip=0xfff0"), "{}", report.detail);
    } else {
        assert!(report.detail.contains("rip=0x10000"), "{}", report.detail);
    }
    assert_eq!(vm.exit_code(), Some(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kernel_that_is_not_elf_is_refused_before_boot() {
    let dir = tempfile::tempdir().unwrap();
    let bogus = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(bogus.path(), b"not a kernel").unwrap();
    readable_by_all(bogus.path());
    let mut spec = spec(dir.path());
    spec.kernel = bogus.path().to_path_buf();
    match Vm::spawn(&spec).await {
        Err(VmError::Ended { reason, detail, .. }) => {
            assert_eq!(reason, ExitReason::Fatal);
            assert!(detail.contains("cannot load the kernel"), "{detail}");
        }
        Err(other) => panic!("unexpected error {other}"),
        Ok(_) => panic!("a bogus kernel must not start"),
    }
}

#[test]
fn vmm_dies_with_its_parent_even_on_sigkill() {
    let dir = tempfile::tempdir().unwrap();
    let image_dir = common::image_dir();
    // A parent that starts the VMM, holds its control pipe, prints its pid, and sleeps.
    let script = r#"
import subprocess, sys, time
vmm = subprocess.Popen(sys.argv[1:], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
print(vmm.pid, flush=True)
vmm.stdout.readline()  # the "started" event
print("started", flush=True)
time.sleep(600)
"#;
    let mut parent = std::process::Command::new("python3")
        .arg("-c")
        .arg(script)
        .arg(env!("CARGO_BIN_EXE_airlock"))
        .args(["vmm", "--memory-mib", "128", "--kernel"])
        .arg(image_dir.join("vmlinux"))
        .arg("--rootfs")
        .arg(image_dir.join("rootfs.ext4"))
        .arg("--vsock-socket")
        .arg(dir.path().join("v.sock"))
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("python3 runs");
    let mut out = std::io::BufReader::new(parent.stdout.take().unwrap());
    let mut line = String::new();
    std::io::BufRead::read_line(&mut out, &mut line).unwrap();
    let vmm_pid: i32 = line.trim().parse().expect("a pid");
    line.clear();
    std::io::BufRead::read_line(&mut out, &mut line).unwrap();
    assert_eq!(line.trim(), "started");
    assert!(alive(vmm_pid), "VMM should run while its parent lives");

    parent.kill().expect("SIGKILL the parent");
    parent.wait().unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while alive(vmm_pid) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        !alive(vmm_pid),
        "VMM {vmm_pid} outlived its SIGKILLed parent"
    );
}

/// Alive and not a zombie (a zombie's parent, the test, has not reaped it).
fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat
            .rsplit(')')
            .next()
            .is_some_and(|rest| rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

#[test]
fn doctor_boots_the_image_and_times_agent_ready() {
    common::image_dir();
    let out = common::airlock()
        .arg("doctor")
        .output()
        .expect("doctor runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let boot = stdout
        .lines()
        .find(|l| l.contains("boot:"))
        .expect("a boot line");
    assert!(
        boot.starts_with("[ok  ] boot: booted to agent-ready in "),
        "{boot}"
    );
}

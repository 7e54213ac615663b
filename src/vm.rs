//! The host's handle on one microVM: a supervised `airlock vmm` child
//! process. Spawn it, wait until it runs, read its events, stop it with a
//! deadline; dropping the handle kills the process.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin, Command};
use tokio::sync::mpsc;

use crate::confinement::Confinement;
use crate::vmm::control::{
    CMD_SNAPSHOT, CMD_STATS, CMD_STOP, CMD_WORKING_SET, ExitReason, ExitReport, VmmMessage,
};
use crate::vmm::snapshot::working_set::WorkingSet;
use crate::vmm::stats::Stats;

/// What to boot.
#[derive(Debug, Clone)]
pub struct VmSpec {
    /// The `airlock` executable that runs `airlock vmm`.
    pub airlock_exe: PathBuf,
    pub kernel: PathBuf,
    pub rootfs: PathBuf,
    pub vcpus: u8,
    pub memory_mib: u32,
    pub extra_cmdline: String,
    pub init: Option<String>,
    /// Directory for the VM's sockets and console log; must exist.
    pub run_dir: PathBuf,
    /// Restore from this snapshot directory instead of booting.
    pub restore: Option<PathBuf>,
    /// With `restore`: resume the paused VM saved here (a diff snapshot
    /// over `restore`).
    pub resume: Option<PathBuf>,
    /// The most bytes its console log holds.
    pub console_max_bytes: u64,
    /// Where a snapshot of this VM will be saved, if one will (it must
    /// exist; the jail binds it).
    pub snapshot_dir: Option<PathBuf>,
    /// Names the VM in logs: its sandbox id, or what it is for.
    pub label: String,
    pub confinement: Confinement,
    /// Host vsock ports the guest may connect to; each connection arrives
    /// on the Unix socket `<run_dir>/vsock.sock_<port>`, which the caller
    /// listens on.
    pub vsock_forward: Vec<u32>,
}

impl VmSpec {
    /// A spec for `image` with defaults, run by the current executable.
    pub fn for_image(image: &crate::image::Image, run_dir: &Path) -> std::io::Result<VmSpec> {
        Ok(VmSpec {
            airlock_exe: std::env::current_exe()?,
            kernel: image.vmlinux(),
            rootfs: image.rootfs(),
            vcpus: 1,
            memory_mib: crate::vmm::config::DEFAULT_MEMORY_MIB,
            extra_cmdline: String::new(),
            init: None,
            run_dir: run_dir.to_path_buf(),
            restore: None,
            resume: None,
            snapshot_dir: None,
            console_max_bytes: crate::vmm::config::DEFAULT_CONSOLE_MAX_BYTES,
            label: "vm".into(),
            confinement: Confinement::current(),
            vsock_forward: Vec::new(),
        })
    }
}

/// Variables a VMM may see; everything else (AIRLOCK_TOKENS above all) is
/// cleared from its environment.
const VMM_ENVIRONMENT: [&str; 5] = [
    "RUST_LOG",
    "AIRLOCK_LOG",
    "RUST_BACKTRACE",
    "AIRLOCK_KVM_DEVICE",
    crate::vmm::snapshot::working_set::ENV,
];

/// The longest a snapshot may take: a paused 512 MiB guest is written in
/// seconds even in a nested test host.
const SNAPSHOT_DEADLINE: Duration = Duration::from_secs(300);
/// The longest the VMM may take to answer a question about itself.
const CONTROL_REPLY_DEADLINE: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("cannot start the VMM process {exe}: {source}")]
    Spawn {
        exe: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the VM ended ({reason:?}): {detail}{}", tail_text(console_tail))]
    Ended {
        reason: ExitReason,
        detail: String,
        console_tail: Vec<String>,
    },
    #[error("the VMM process exited without a report ({0})")]
    NoReport(String),
    #[error("timed out after {0:?} waiting for {1}")]
    Timeout(Duration, &'static str),
    #[error("cannot talk to the VMM process: {0}")]
    Control(std::io::Error),
    /// The snapshot was not written; the VM runs on.
    #[error("the snapshot could not be written: {0}")]
    SnapshotFailed(String),
}

fn tail_text(tail: &[String]) -> String {
    if tail.is_empty() {
        String::new()
    } else {
        format!("\nlast console lines:\n  {}", tail.join("\n  "))
    }
}

impl From<ExitReport> for VmError {
    fn from(report: ExitReport) -> Self {
        VmError::Ended {
            reason: report.reason,
            detail: report.detail,
            console_tail: report.console_tail,
        }
    }
}

/// VMM messages not yet taken by the Vm's owner. The VMM sends few (one
/// per command, and hints), so a full queue means nobody is listening: the
/// reader then waits, and the VMM's own writes block, which only stops a VMM
/// that nobody controls.
const MESSAGE_QUEUE: usize = 64;
/// A control-channel line longer than this is not from a healthy VMM.
const MAX_MESSAGE_BYTES: usize = 256 * 1024;

/// Reads the VMM's JSON lines into `tx`. A seccomp violation becomes the
/// VM's exit report, and is logged with the VM's label.
async fn read_messages(
    stdout: tokio::process::ChildStdout,
    tx: mpsc::Sender<VmmMessage>,
    label: String,
) {
    let mut reader = BufReader::new(stdout);
    let mut line = Vec::new();
    loop {
        line.clear();
        match (&mut reader)
            .take(MAX_MESSAGE_BYTES as u64 + 1)
            .read_until(b'\n', &mut line)
            .await
        {
            Ok(0) | Err(_) => return,
            Ok(_) if line.len() > MAX_MESSAGE_BYTES => {
                tracing::warn!(vm = %label, "a control line from the VMM is too long; ignoring the VMM's output");
                return;
            }
            Ok(_) => {}
        }
        let message = match serde_json::from_slice::<VmmMessage>(&line) {
            Ok(VmmMessage::SeccompViolation { syscall, thread }) => {
                let detail = seccomp_detail(syscall, &thread);
                tracing::error!(vm = %label, syscall, thread, "{detail}");
                VmmMessage::Exit(ExitReport {
                    reason: ExitReason::SeccompViolation,
                    detail,
                    stats: Default::default(),
                    console_tail: Vec::new(),
                })
            }
            Ok(message) => message,
            Err(err) => {
                tracing::warn!(vm = %label, %err, line = %String::from_utf8_lossy(&line), "unreadable line from the VMM");
                continue;
            }
        };
        if tx.send(message).await.is_err() {
            return;
        }
    }
}

fn seccomp_detail(syscall: i64, thread: &str) -> String {
    if syscall < 0 {
        "VMM killed by seccomp (the kernel ended it for a forbidden syscall)".to_string()
    } else {
        format!("VMM killed by seccomp: syscall {syscall} on its {thread} thread")
    }
}

/// How long the VMM may take to report its vCPUs running.
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// Kills a VM's VMM process from anywhere, without the [`Vm`] (a task
/// stalled on its guest may hold that). It holds a pidfd, so it can never
/// signal another process that reused the pid.
#[derive(Clone)]
pub struct VmKiller {
    pidfd: Option<Arc<OwnedFd>>,
    fired: Arc<std::sync::atomic::AtomicBool>,
}

impl VmKiller {
    fn open(pid: u32) -> VmKiller {
        // SAFETY: pidfd_open takes a pid and flags and returns a new fd.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
        match i32::try_from(fd) {
            // SAFETY: a fresh fd that nothing else owns.
            Ok(fd) if fd >= 0 => VmKiller {
                pidfd: Some(Arc::new(unsafe { OwnedFd::from_raw_fd(fd) })),
                fired: Arc::default(),
            },
            _ => {
                tracing::warn!(pid, err = %std::io::Error::last_os_error(), "no pidfd for the VMM; it is killed only when stopped");
                VmKiller::none()
            }
        }
    }

    fn none() -> VmKiller {
        VmKiller {
            pidfd: None,
            fired: Arc::default(),
        }
    }

    /// Whether `kill` was called (the VMM's end is then no surprise).
    pub fn fired(&self) -> bool {
        self.fired.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// SIGKILLs the VMM; harmless once it has ended.
    pub fn kill(&self) {
        self.fired.store(true, std::sync::atomic::Ordering::SeqCst);
        if let Some(fd) = &self.pidfd {
            // SAFETY: signals the process the pidfd refers to; no pointers passed.
            unsafe {
                libc::syscall(
                    libc::SYS_pidfd_send_signal,
                    fd.as_raw_fd(),
                    libc::SIGKILL,
                    std::ptr::null::<libc::siginfo_t>(),
                    0,
                )
            };
        }
    }
}

pub struct Vm {
    child: Child,
    killer: VmKiller,
    control: Option<ChildStdin>,
    messages: mpsc::Receiver<VmmMessage>,
    exit: Option<ExitReport>,
    vsock_socket: PathBuf,
    console_log: PathBuf,
    pid: u32,
    exit_code: Option<i32>,
    timing: StartTiming,
}

/// How long a VM took to start, as the host and the VMM saw it.
#[derive(Debug, Clone, Copy, Default)]
pub struct StartTiming {
    /// From spawning the process to its vCPUs running.
    pub spawn_to_running: Duration,
    /// The VMM's own part: from its `main` to vCPUs running.
    pub vmm_setup: Duration,
    pub restored: bool,
}

/// What a snapshot wrote.
#[derive(Debug, Clone)]
pub struct SnapshotInfo {
    pub memory_bytes_written: u64,
    pub pause: Duration,
    pub save: Duration,
}

impl Vm {
    /// Starts the VMM and waits until its vCPUs run (or it fails to build the VM).
    pub async fn spawn(spec: &VmSpec) -> Result<Vm, VmError> {
        let vsock_socket = spec.run_dir.join("vsock.sock");
        let console_log = spec.run_dir.join("console.log");
        let spawned_at = std::time::Instant::now();
        let mut cmd = Command::new(&spec.airlock_exe);
        cmd.arg("vmm")
            .arg("--kernel")
            .arg(&spec.kernel)
            .arg("--rootfs")
            .arg(&spec.rootfs)
            .arg("--vsock-socket")
            .arg(&vsock_socket)
            .arg("--console-log")
            .arg(&console_log)
            .arg("--vcpus")
            .arg(spec.vcpus.to_string())
            .arg("--memory-mib")
            .arg(spec.memory_mib.to_string())
            // One argument, so a value that starts with '-' is not a flag.
            .arg(format!("--extra-cmdline={}", spec.extra_cmdline));
        if let Some(init) = &spec.init {
            cmd.arg("--init").arg(init);
        }
        for port in &spec.vsock_forward {
            cmd.arg("--vsock-forward").arg(port.to_string());
        }
        if let Some(dir) = &spec.restore {
            cmd.arg("--restore").arg(dir);
        }
        if let Some(dir) = &spec.resume {
            cmd.arg("--resume").arg(dir);
        }
        if let Some(dir) = &spec.snapshot_dir {
            cmd.arg("--snapshot-dir").arg(dir);
        }
        cmd.arg(format!("--console-max-bytes={}", spec.console_max_bytes));
        cmd.args(spec.confinement.vmm_args(spec.vcpus, spec.memory_mib));
        cmd.env_clear();
        for name in VMM_ENVIRONMENT {
            if let Some(value) = std::env::var_os(name) {
                cmd.env(name, value);
            }
        }
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true);
        let mut child = cmd.spawn().map_err(|source| VmError::Spawn {
            exe: spec.airlock_exe.display().to_string(),
            source,
        })?;
        let pid = child.id().unwrap_or(0);
        let control = child.stdin.take();
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| VmError::NoReport("no stdout pipe".into()))?;
        let (tx, messages) = mpsc::channel(MESSAGE_QUEUE);
        let label = spec.label.clone();
        tokio::spawn(read_messages(stdout, tx, label));
        let mut vm = Vm {
            child,
            control,
            messages,
            exit: None,
            vsock_socket,
            console_log,
            pid,
            exit_code: None,
            timing: StartTiming::default(),
            killer: VmKiller::none(),
        };
        let first = tokio::time::timeout(START_TIMEOUT, vm.next_message())
            .await
            .map_err(|_| VmError::Timeout(START_TIMEOUT, "the VMM to start the VM"))?;
        match first {
            Some(VmmMessage::Started {
                pid,
                vmm_setup_micros,
                restored,
            }) => {
                // Jailed, the VM runs in a child of the process we spawned;
                // killing that child makes the supervisor clean up and exit.
                vm.pid = pid;
                vm.killer = VmKiller::open(pid);
                vm.timing = StartTiming {
                    spawn_to_running: spawned_at.elapsed(),
                    vmm_setup: Duration::from_micros(vmm_setup_micros),
                    restored,
                };
                Ok(vm)
            }
            Some(VmmMessage::Exit(report)) => Err(report.into()),
            Some(other) => Err(VmError::NoReport(format!(
                "unexpected first message {other:?}"
            ))),
            None => Err(VmError::NoReport(vm.wait_status().await)),
        }
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    pub fn killer(&self) -> VmKiller {
        self.killer.clone()
    }

    pub fn timing(&self) -> StartTiming {
        self.timing
    }

    /// Pauses the VM and saves it into `dir` (created if missing); the VM
    /// ends afterwards. The host must have closed its vsock connections.
    /// If the save cannot be written ([`VmError::SnapshotFailed`]) the VM
    /// runs on and `dir` holds nothing of it.
    pub async fn snapshot(&mut self, dir: &Path) -> Result<SnapshotInfo, VmError> {
        std::fs::create_dir_all(dir).map_err(VmError::Control)?;
        let dir = dir.canonicalize().map_err(VmError::Control)?;
        self.send(&format!("{CMD_SNAPSHOT} {}", dir.display()))
            .await?;
        // A VMM that never finishes would hold the sandbox (and every call
        // waiting on it) forever: past the deadline it is killed, and the
        // pause or checkpoint fails like one whose VM died.
        match tokio::time::timeout(SNAPSHOT_DEADLINE, self.snapshot_reply()).await {
            Ok(result) => result,
            Err(_) => {
                let _ = self.child.kill().await;
                Err(VmError::Timeout(
                    SNAPSHOT_DEADLINE,
                    "the VMM to save the snapshot",
                ))
            }
        }
    }

    async fn snapshot_reply(&mut self) -> Result<SnapshotInfo, VmError> {
        loop {
            match self.next_message().await {
                Some(VmmMessage::SnapshotSaved {
                    memory_bytes_written,
                    pause_micros,
                    save_micros,
                    ..
                }) => {
                    let info = SnapshotInfo {
                        memory_bytes_written,
                        pause: Duration::from_micros(pause_micros),
                        save: Duration::from_micros(save_micros),
                    };
                    let report = self.wait().await?;
                    if report.reason != ExitReason::Snapshotted {
                        return Err(report.into());
                    }
                    return Ok(info);
                }
                Some(VmmMessage::SnapshotFailed { detail }) => {
                    return Err(VmError::SnapshotFailed(detail));
                }
                Some(VmmMessage::Exit(report)) => return Err(report.into()),
                Some(_) => {}
                None => return Err(VmError::NoReport(self.wait_status().await)),
            }
        }
    }

    pub fn vsock_socket(&self) -> &Path {
        &self.vsock_socket
    }

    pub fn console_log(&self) -> &Path {
        &self.console_log
    }

    async fn next_message(&mut self) -> Option<VmmMessage> {
        let message = self.messages.recv().await;
        if let Some(VmmMessage::Exit(report)) = &message {
            self.exit = Some(report.clone());
        }
        message
    }

    async fn wait_status(&mut self) -> String {
        match self.child.wait().await {
            Ok(status) => {
                self.exit_code = status.code();
                status.to_string()
            }
            Err(err) => err.to_string(),
        }
    }

    /// The VMM process's exit code, once `wait` or `stop` has seen it exit.
    pub fn exit_code(&self) -> Option<i32> {
        self.exit_code
    }

    /// Waits until the guest agent says it listens; fails if the VM ends first.
    pub async fn wait_agent_ready(&mut self, timeout: Duration) -> Result<(), VmError> {
        let waiting = async {
            loop {
                match self.next_message().await {
                    Some(VmmMessage::AgentReadyHint) => return Ok(()),
                    Some(VmmMessage::Exit(report)) => return Err(report.into()),
                    Some(_) => {}
                    None => return Err(VmError::NoReport(self.wait_status().await)),
                }
            }
        };
        tokio::time::timeout(timeout, waiting)
            .await
            .map_err(|_| VmError::Timeout(timeout, "the guest agent"))?
    }

    /// Debug builds: makes the VMM's `thread` ("main" or "control") call a
    /// syscall outside its filter, to show that the filter holds.
    #[cfg(debug_assertions)]
    pub async fn debug_forbidden_syscall(&mut self, thread: &str) -> Result<(), VmError> {
        self.send(&format!(
            "{} {thread}",
            crate::vmm::control::CMD_DEBUG_FORBIDDEN_SYSCALL
        ))
        .await
    }

    /// Asks the VMM for its exit and interrupt counters.
    pub async fn stats(&mut self) -> Result<Stats, VmError> {
        self.send(CMD_STATS).await?;
        loop {
            match self.next_message().await {
                Some(VmmMessage::Stats { stats }) => return Ok(stats),
                Some(VmmMessage::Exit(report)) => return Err(report.into()),
                Some(_) => {}
                None => return Err(VmError::NoReport(self.wait_status().await)),
            }
        }
    }

    /// Asks a restored VM's VMM which guest pages it has touched so far.
    /// The VMM is confined, not trusted: check the set against the guest's
    /// memory size before using it (`WorkingSet::check`).
    pub async fn working_set(&mut self) -> Result<WorkingSet, VmError> {
        self.send(CMD_WORKING_SET).await?;
        tokio::time::timeout(CONTROL_REPLY_DEADLINE, self.working_set_reply())
            .await
            .map_err(|_| VmError::Timeout(CONTROL_REPLY_DEADLINE, "the VMM's working set"))?
    }

    async fn working_set_reply(&mut self) -> Result<WorkingSet, VmError> {
        loop {
            match self.next_message().await {
                Some(VmmMessage::WorkingSet { set: Some(set), .. }) => return Ok(set),
                Some(VmmMessage::WorkingSet { error, .. }) => {
                    return Err(VmError::NoReport(
                        error.unwrap_or_else(|| "no working set".into()),
                    ));
                }
                Some(VmmMessage::Exit(report)) => return Err(report.into()),
                Some(_) => {}
                None => return Err(VmError::NoReport(self.wait_status().await)),
            }
        }
    }

    async fn send(&mut self, command: &str) -> Result<(), VmError> {
        let control = self
            .control
            .as_mut()
            .ok_or_else(|| VmError::NoReport("control channel closed".into()))?;
        control
            .write_all(format!("{command}\n").as_bytes())
            .await
            .map_err(VmError::Control)?;
        control.flush().await.map_err(VmError::Control)
    }

    /// Waits for the VM to end by itself and returns its report.
    pub async fn wait(&mut self) -> Result<ExitReport, VmError> {
        while self.exit.is_none() {
            if self.next_message().await.is_none() {
                break;
            }
        }
        let status = self.wait_status().await;
        self.exit.clone().ok_or(VmError::NoReport(status))
    }

    /// Stops the VM: asks the VMM, then kills it if it has not exited by `deadline`.
    pub async fn stop(&mut self, deadline: Duration) -> Result<ExitReport, VmError> {
        if self.exit.is_none() {
            // An error here means the VMM already exited; wait() tells how.
            let _ = self.send(CMD_STOP).await;
        }
        match tokio::time::timeout(deadline, self.wait()).await {
            Ok(result) => result,
            Err(_) => {
                let _ = self.child.kill().await;
                Err(VmError::Timeout(deadline, "the VMM to stop"))
            }
        }
    }
}

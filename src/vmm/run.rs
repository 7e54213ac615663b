//! The `airlock vmm` process: builds (or restores) the VM, runs its vCPUs,
//! serves the control channel, saves snapshots, and reports how the VM ended.

use std::io::{BufRead, Write};
use std::os::unix::thread::JoinHandleExt;
use std::path::Path;
use std::sync::Arc;
use std::sync::mpsc::Receiver;
use std::time::Instant;

use crate::host_kvm::KvmFlavor;
use crate::vmm::config::VmmConfig;
use crate::vmm::control::{
    CMD_SNAPSHOT, CMD_STATS, CMD_STOP, CMD_WORKING_SET, ExitReason, ExitReport, VmmMessage,
};
use crate::vmm::event::{self, VmEvent, VmEventSender};
use crate::vmm::jail;
use crate::vmm::machine::{self, Machine};
use crate::vmm::seccomp;
use crate::vmm::seccomp_filters::Role;
use crate::vmm::snapshot::vm_state::VmState;
use crate::vmm::snapshot::{self, MachineState};
use crate::vmm::stats;
use crate::vmm::vcpu::{self, PauseRequest, VcpuContext};

/// Runs the VM to its end and returns the process exit code.
pub fn run(config: &VmmConfig) -> i32 {
    let started = Instant::now();
    block_stop_signals();
    if config.seccomp
        && let Err(err) = seccomp::prepare(config.seccomp_audit_only)
    {
        return finish(ExitReason::Fatal, err.to_string(), Vec::new());
    }
    // Read before the jail hides /sys.
    let flavor = KvmFlavor::detect();
    let host_config = config;
    let (config, kvm, pagemap, pid) = if config.jail.jail {
        match jail::enter(config) {
            Ok(jailed) => (
                jailed.config,
                Some(jailed.kvm),
                jailed.pagemap,
                jailed.host_pid,
            ),
            Err(err) => return finish(ExitReason::Fatal, err.to_string(), Vec::new()),
        }
    } else {
        (config.clone(), None, None, std::process::id())
    };
    let config = &config;
    let (events, receiver) = event::channel();
    let built = match &config.restore {
        Some(dir) => machine::restore(config, dir, kvm, pagemap, events.clone()),
        None => machine::build(config, flavor, kvm, events.clone()),
    };
    let mut machine = match built {
        Ok(machine) => machine,
        Err(err) => {
            let verb = if config.restore.is_some() {
                "restore"
            } else {
                "build"
            };
            let mut detail = format!("cannot {verb} the VM: {err}");
            if config.jail.jail {
                detail.push_str(&jail::host_paths_note(host_config, &detail));
            }
            return finish(ExitReason::Fatal, detail, Vec::new());
        }
    };
    if let Err(err) = vcpu::install_kick_handler() {
        return finish(
            ExitReason::Fatal,
            format!("cannot install the vCPU kick handler: {err}"),
            Vec::new(),
        );
    }
    tracing::debug!(cmdline = %machine.cmdline, restored = config.restore.is_some(), "starting guest");
    let console_tail = machine.console_tail.clone();
    let pause = Arc::new(PauseRequest::default());
    let mut vcpu_threads = Vec::new();
    let vcpu_count = machine.vcpus.len();
    for (index, fd) in std::mem::take(&mut machine.vcpus).into_iter().enumerate() {
        let ctx = VcpuContext {
            index: index as u8,
            pio: machine.pio.clone(),
            mmio: machine.mmio.clone(),
            events: events.clone(),
            pause: pause.clone(),
            msr_indices: machine.msr_indices.clone(),
        };
        match std::thread::Builder::new()
            .name(format!("vcpu{index}"))
            .spawn(move || {
                seccomp::confine_this_thread(Role::Vcpu);
                vcpu::run(fd, ctx)
            }) {
            Ok(handle) => vcpu_threads.push(handle),
            Err(err) => events.send(VmEvent::Fatal(format!("cannot start a vCPU thread: {err}"))),
        }
    }
    spawn_control_reader(events.clone(), config.snapshot_dir.clone());
    spawn_signal_waiter(events);
    if config.jail.jail
        && let Err(err) = jail::forbid_new_processes()
    {
        return finish(ExitReason::Fatal, err.to_string(), Vec::new());
    }
    seccomp::confine_this_thread(Role::Main);
    emit(&VmmMessage::Started {
        pid,
        vmm_setup_micros: started.elapsed().as_micros() as u64,
        restored: config.restore.is_some(),
    });

    let mut panicked = false;
    let (reason, detail) = loop {
        let Ok(event) = receiver.recv() else {
            break (
                ExitReason::Fatal,
                "every event source went away".to_string(),
            );
        };
        match event {
            VmEvent::AgentReadyHint => emit(&VmmMessage::AgentReadyHint),
            VmEvent::StatsRequested => emit(&VmmMessage::Stats {
                stats: stats::snapshot(),
            }),
            VmEvent::WorkingSetRequested => emit(&working_set_message(&machine)),
            VmEvent::GuestPanic => panicked = true,
            VmEvent::GuestReset if panicked => {
                break (ExitReason::GuestPanic, "the guest kernel panicked".into());
            }
            VmEvent::GuestReset => break (ExitReason::GuestShutdown, "the guest shut down".into()),
            VmEvent::StopRequested => break (ExitReason::Stopped, "stopped by the host".into()),
            VmEvent::Fatal(detail) => break (ExitReason::Fatal, detail),
            VmEvent::VcpuPaused { .. } => {}
            #[cfg(debug_assertions)]
            VmEvent::DebugForbiddenSyscall => seccomp::make_forbidden_syscall(),
            VmEvent::SnapshotRequested(dir) => {
                pause.request();
                for handle in &vcpu_threads {
                    // SAFETY: the thread is alive (it parks, never exits, once paused).
                    unsafe { libc::pthread_kill(handle.as_pthread_t(), vcpu::kick_signal()) };
                }
                match save_snapshot(&machine, &receiver, vcpu_count, &dir) {
                    Ok(()) => {
                        break (
                            ExitReason::Snapshotted,
                            format!("saved to {}", dir.display()),
                        );
                    }
                    Err(SaveError::Vm(detail)) => {
                        break (ExitReason::Fatal, format!("snapshot failed: {detail}"));
                    }
                    Err(SaveError::Write(detail)) => {
                        // The disk said no (full, say): nothing half-written
                        // stays, and the guest goes on as if never paused.
                        remove_partial_snapshot(&dir);
                        tracing::error!(%detail, "snapshot not saved; the VM runs on");
                        emit(&VmmMessage::SnapshotFailed { detail });
                        pause.clear();
                        for handle in &vcpu_threads {
                            handle.thread().unpark();
                        }
                    }
                }
            }
        }
    };
    finish(reason, detail, console_tail.lines())
}

fn finish(reason: ExitReason, detail: String, console_tail: Vec<String>) -> i32 {
    let report = ExitReport {
        reason,
        detail,
        stats: stats::snapshot(),
        console_tail,
    };
    tracing::info!(
        reason = ?report.reason,
        exits = report.stats.exits_total,
        interrupts = report.stats.interrupts_injected,
        "VM ended: {}",
        report.detail
    );
    let code = i32::from(report.reason.is_error());
    emit(&VmmMessage::Exit(report));
    code
}

/// Why a snapshot was not saved.
enum SaveError {
    /// The VM's state could not be had: it cannot go on either.
    Vm(String),
    /// Writing it failed; the VM is intact and can run on.
    Write(String),
}

impl From<String> for SaveError {
    fn from(detail: String) -> Self {
        SaveError::Vm(detail)
    }
}

impl From<&str> for SaveError {
    fn from(detail: &str) -> Self {
        SaveError::Vm(detail.to_string())
    }
}

/// Removes what a failed save may have left in `dir`.
fn remove_partial_snapshot(dir: &Path) {
    let files = [
        snapshot::MEMORY_FILE.to_string(),
        snapshot::overlay::OVERLAY_FILE.to_string(),
        snapshot::STATE_FILE.to_string(),
        format!("{}.tmp", snapshot::STATE_FILE),
    ];
    for name in files {
        let _ = std::fs::remove_file(dir.join(name));
    }
}

/// Waits for every vCPU to save itself, then saves the rest of the VM.
fn save_snapshot(
    machine: &Machine,
    receiver: &Receiver<VmEvent>,
    vcpu_count: usize,
    dir: &Path,
) -> Result<(), SaveError> {
    let pause_started = Instant::now();
    let mut vcpus: Vec<Option<snapshot::vcpu_state::VcpuState>> =
        (0..vcpu_count).map(|_| None).collect();
    while vcpus.iter().any(Option::is_none) {
        match receiver.recv() {
            Ok(VmEvent::VcpuPaused { index, state }) => {
                let state = (*state).map_err(|e| format!("vCPU {index}: {e}"))?;
                let slot = vcpus
                    .get_mut(usize::from(index))
                    .ok_or("a vCPU index out of range")?;
                *slot = Some(state);
            }
            Ok(VmEvent::Fatal(detail)) => return Err(SaveError::Vm(detail)),
            Ok(VmEvent::GuestReset) => return Err("the guest reset while pausing".into()),
            Ok(_) => {}
            Err(_) => return Err("the vCPUs went away while pausing".into()),
        }
    }
    let pause_micros = pause_started.elapsed().as_micros() as u64;
    let save_started = Instant::now();
    let transports = machine
        .transports
        .iter()
        .map(|t| {
            t.lock()
                .map(|mut t| {
                    t.quiesce();
                    t.save_state()
                })
                .map_err(|_| "a device lock is poisoned".to_string())
        })
        .collect::<Result<Vec<_>, _>>()?;
    let serial = machine
        .serial
        .lock()
        .map_err(|_| "the serial lock is poisoned")?
        .snapshot();
    let (written, overlay) = save_memory(machine, dir).map_err(SaveError::Write)?;
    let state = MachineState {
        image: machine.identity.clone(),
        memory_bytes: machine.memory_bytes(),
        vcpus: vcpus.into_iter().flatten().collect(),
        vm: VmState::save(&machine.vm).map_err(|e| e.to_string())?,
        serial,
        transports,
        cmdline: machine.cmdline.clone(),
        overlay,
    };
    snapshot::write_state(dir, &state).map_err(|e| SaveError::Write(e.to_string()))?;
    emit(&VmmMessage::SnapshotSaved {
        dir: dir.display().to_string(),
        memory_bytes_written: written,
        pause_micros,
        save_micros: save_started.elapsed().as_micros() as u64,
    });
    Ok(())
}

/// Saves guest memory into `dir`: a restored VM's as a diff over its base
/// (the pages it wrote), a booted VM's whole. Returns the bytes saved (of
/// written pages for a diff, of non-zero pages otherwise).
fn save_memory(
    machine: &Machine,
    dir: &Path,
) -> Result<(u64, Option<snapshot::overlay::Overlay>), String> {
    let Some(base) = &machine.diff_base else {
        let written = snapshot::memory::save(&machine.mem, &snapshot::memory_path(dir))
            .map_err(|e| e.to_string())?;
        return Ok((written, None));
    };
    let pagemap = base
        .pagemap
        .as_ref()
        .ok_or("a diff snapshot needs /proc/self/pagemap, which could not be opened")?;
    let path = dir.join(snapshot::overlay::OVERLAY_FILE);
    let ranges = snapshot::overlay::save(&machine.mem, pagemap, &base.inherited, &path)
        .map_err(|e| e.to_string())?;
    let overlay = snapshot::overlay::Overlay {
        base_state_checksum: base.state_checksum.clone(),
        ranges,
    };
    Ok((overlay.bytes(), Some(overlay)))
}

fn working_set_message(machine: &Machine) -> VmmMessage {
    let pagemap = machine.diff_base.as_ref().and_then(|b| b.pagemap.as_ref());
    let recorded = match pagemap {
        Some(pagemap) => {
            snapshot::working_set::record(&machine.mem, pagemap).map_err(|e| e.to_string())
        }
        None => Err("only a restored VM with a page map has a working set".to_string()),
    };
    match recorded {
        Ok(set) => VmmMessage::WorkingSet {
            set: Some(set),
            error: None,
        },
        Err(error) => VmmMessage::WorkingSet {
            set: None,
            error: Some(error),
        },
    }
}

/// Ends the process from any thread with a fatal report (for what must not
/// go on, such as a thread that could not be confined).
pub fn exit_fatal(detail: &str) -> ! {
    let code = finish(ExitReason::Fatal, detail.to_string(), Vec::new());
    // SAFETY: _exit ends the process without running other threads' code.
    unsafe { libc::_exit(code) }
}

fn emit(message: &VmmMessage) {
    let mut out = std::io::stdout().lock();
    if let Ok(line) = serde_json::to_string(message) {
        // The parent may be gone; nothing useful to do about it here.
        let _ = writeln!(out, "{line}");
        let _ = out.flush();
    }
}

/// stdin carries commands; its EOF means the parent is gone. A snapshot
/// goes into `snapshot_dir` when one was given at start (the host names the
/// directory as it sees it; inside a jail it is elsewhere).
fn spawn_control_reader(events: VmEventSender, snapshot_dir: Option<std::path::PathBuf>) {
    let _ = std::thread::Builder::new()
        .name("control".into())
        .spawn(move || {
            seccomp::confine_this_thread(Role::Control);
            let stdin = std::io::stdin();
            let mut line = String::new();
            loop {
                line.clear();
                match stdin.lock().read_line(&mut line) {
                    Ok(0) | Err(_) => {
                        events.send(VmEvent::StopRequested);
                        return;
                    }
                    Ok(_) => {
                        let line = line.trim_end_matches(['\n', '\r']);
                        let (command, argument) = line.split_once(' ').unwrap_or((line, ""));
                        match command {
                            CMD_STOP => events.send(VmEvent::StopRequested),
                            CMD_STATS => events.send(VmEvent::StatsRequested),
                            CMD_WORKING_SET => events.send(VmEvent::WorkingSetRequested),
                            CMD_SNAPSHOT if !argument.is_empty() => {
                                let dir = snapshot_dir.clone().unwrap_or_else(|| argument.into());
                                events.send(VmEvent::SnapshotRequested(dir))
                            }
                            #[cfg(debug_assertions)]
                            crate::vmm::control::CMD_DEBUG_FORBIDDEN_SYSCALL => match argument {
                                "main" => events.send(VmEvent::DebugForbiddenSyscall),
                                _ => seccomp::make_forbidden_syscall(),
                            },
                            other => tracing::warn!(command = other, "unknown control command"),
                        }
                    }
                }
            }
        });
}

/// SIGTERM/SIGINT/SIGHUP are blocked in every thread and taken here, so a
/// stop by signal still ends with a report.
fn block_stop_signals() {
    let set = stop_signals();
    // SAFETY: changes this thread's mask; threads spawned later inherit it.
    unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
}

fn stop_signals() -> libc::sigset_t {
    // SAFETY: sigemptyset/sigaddset initialise and fill the set we own.
    unsafe {
        let mut set = std::mem::zeroed::<libc::sigset_t>();
        libc::sigemptyset(&mut set);
        for sig in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
            libc::sigaddset(&mut set, sig);
        }
        set
    }
}

fn spawn_signal_waiter(events: VmEventSender) {
    let _ = std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            seccomp::confine_this_thread(Role::Signals);
            let set = stop_signals();
            let mut sig = 0;
            // SAFETY: sigwait reads the set and writes the signal number.
            if unsafe { libc::sigwait(&set, &mut sig) } == 0 {
                events.send(VmEvent::StopRequested);
            }
        });
}

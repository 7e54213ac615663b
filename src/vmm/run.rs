//! The `airlock vmm` process: builds the VM, runs its vCPUs, serves the
//! control channel, and reports how the VM ended.

use std::io::{BufRead, Write};
use std::time::Instant;

use crate::host_kvm::KvmFlavor;
use crate::vmm::config::VmmConfig;
use crate::vmm::control::{CMD_STATS, CMD_STOP, ExitReason, ExitReport, VmmMessage};
use crate::vmm::event::{self, VmEvent, VmEventSender};
use crate::vmm::{machine, stats, vcpu};

/// Runs the VM to its end and returns the process exit code.
pub fn run(config: &VmmConfig) -> i32 {
    let started = Instant::now();
    block_stop_signals();
    let (events, receiver) = event::channel();
    let machine = match machine::build(config, KvmFlavor::detect(), events.clone()) {
        Ok(machine) => machine,
        Err(err) => {
            let report = ExitReport {
                reason: ExitReason::Fatal,
                detail: format!("cannot build the VM: {err}"),
                stats: stats::snapshot(),
                console_tail: Vec::new(),
            };
            emit(&VmmMessage::Exit(report));
            return 1;
        }
    };
    tracing::debug!(cmdline = %machine.cmdline, "starting guest");
    let console_tail = machine.console_tail.clone();
    for (index, fd) in machine.vcpus.into_iter().enumerate() {
        let (pio, mmio, vcpu_events) = (machine.pio.clone(), machine.mmio.clone(), events.clone());
        let spawned = std::thread::Builder::new()
            .name(format!("vcpu{index}"))
            .spawn(move || vcpu::run(index as u8, fd, pio, mmio, vcpu_events));
        if let Err(err) = spawned {
            events.send(VmEvent::Fatal(format!("cannot start a vCPU thread: {err}")));
        }
    }
    spawn_control_reader(events.clone());
    spawn_signal_waiter(events);
    emit(&VmmMessage::Started {
        pid: std::process::id(),
        vmm_setup_micros: started.elapsed().as_micros() as u64,
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
            VmEvent::GuestPanic => panicked = true,
            VmEvent::GuestReset if panicked => {
                break (ExitReason::GuestPanic, "the guest kernel panicked".into());
            }
            VmEvent::GuestReset => break (ExitReason::GuestShutdown, "the guest shut down".into()),
            VmEvent::StopRequested => break (ExitReason::Stopped, "stopped by the host".into()),
            VmEvent::Fatal(detail) => break (ExitReason::Fatal, detail),
        }
    };
    // Let a panic message that is still arriving reach the tail.
    let report = ExitReport {
        reason,
        detail,
        stats: stats::snapshot(),
        console_tail: console_tail.lines(),
    };
    tracing::info!(reason = ?report.reason, exits = report.stats.exits_total,
        interrupts = report.stats.interrupts_injected, "VM ended: {}", report.detail);
    let code = i32::from(report.reason.is_error());
    emit(&VmmMessage::Exit(report));
    code
}

fn emit(message: &VmmMessage) {
    let mut out = std::io::stdout().lock();
    if let Ok(line) = serde_json::to_string(message) {
        // The parent may be gone; nothing useful to do about it here.
        let _ = writeln!(out, "{line}");
        let _ = out.flush();
    }
}

/// stdin carries commands; its EOF means the parent is gone.
fn spawn_control_reader(events: VmEventSender) {
    let _ = std::thread::Builder::new()
        .name("control".into())
        .spawn(move || {
            let stdin = std::io::stdin();
            let mut line = String::new();
            loop {
                line.clear();
                match stdin.lock().read_line(&mut line) {
                    Ok(0) | Err(_) => {
                        events.send(VmEvent::StopRequested);
                        return;
                    }
                    Ok(_) => match line.trim() {
                        CMD_STOP => events.send(VmEvent::StopRequested),
                        CMD_STATS => events.send(VmEvent::StatsRequested),
                        other => tracing::warn!(command = other, "unknown control command"),
                    },
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
            let set = stop_signals();
            let mut sig = 0;
            // SAFETY: sigwait reads the set and writes the signal number.
            if unsafe { libc::sigwait(&set, &mut sig) } == 0 {
                events.send(VmEvent::StopRequested);
            }
        });
}

//! The vCPU run loop: KVM_RUN, then dispatch of each exit to the buses.

use std::cell::Cell;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use kvm_ioctls::{VcpuExit, VcpuFd};

use crate::vmm::bus::{Bus, BusAction};
use crate::vmm::event::{VmEvent, VmEventSender};
use crate::vmm::snapshot::vcpu_state::VcpuState;
use crate::vmm::stats::{ExitKind, count_exit};

/// Shared by the main thread and the vCPU threads: a request to stop in a
/// state that can be saved.
#[derive(Default)]
pub struct PauseRequest(AtomicBool);

impl PauseRequest {
    pub fn request(&self) {
        self.0.store(true, Ordering::SeqCst);
    }

    /// The save failed: the vCPUs run on (once unparked).
    pub fn clear(&self) {
        self.0.store(false, Ordering::SeqCst);
    }

    fn requested(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

thread_local! {
    /// This thread's `kvm_run.immediate_exit`, for the kick signal handler.
    static IMMEDIATE_EXIT: Cell<*mut u8> = const { Cell::new(std::ptr::null_mut()) };
}

/// The signal that kicks a vCPU thread out of KVM_RUN.
pub fn kick_signal() -> libc::c_int {
    vmm_sys_util::signal::SIGRTMIN()
}

/// Installs the kick handler. Setting immediate_exit (rather than relying on
/// EINTR alone) closes the race with a thread about to enter KVM_RUN: KVM
/// then finishes any pending I/O and returns at once.
pub fn install_kick_handler() -> Result<(), vmm_sys_util::errno::Error> {
    extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
        IMMEDIATE_EXIT.with(|p| {
            let p = p.get();
            if !p.is_null() {
                // SAFETY: points into this thread's kvm_run mapping, which
                // lives as long as the thread's VcpuFd.
                unsafe { p.write_volatile(1) };
            }
        });
    }
    vmm_sys_util::signal::register_signal_handler(kick_signal(), on_kick)
}

const KVM_SYSTEM_EVENT_SHUTDOWN: u32 = 1;
const KVM_SYSTEM_EVENT_RESET: u32 = 2;

/// What a vCPU thread needs besides its fd.
pub struct VcpuContext {
    pub index: u8,
    pub pio: Bus,
    pub mmio: Bus,
    pub events: VmEventSender,
    pub pause: Arc<PauseRequest>,
    pub msr_indices: Arc<Vec<u32>>,
}

/// Runs one vCPU until the guest or an error ends it, or a pause saves it.
pub fn run(mut vcpu: VcpuFd, ctx: VcpuContext) {
    let VcpuContext {
        index,
        pio,
        mmio,
        events,
        pause,
        msr_indices,
    } = ctx;
    IMMEDIATE_EXIT.with(|p| p.set(&mut vcpu.get_kvm_run().immediate_exit));
    let end = loop {
        match vcpu.run() {
            Ok(VcpuExit::IoIn(port, data)) => {
                count_exit(ExitKind::IoIn);
                pio.read(u64::from(port), data);
            }
            Ok(VcpuExit::IoOut(port, data)) => {
                count_exit(ExitKind::IoOut);
                if pio.write(u64::from(port), data) == BusAction::Reset {
                    break VmEvent::GuestReset;
                }
            }
            Ok(VcpuExit::MmioRead(addr, data)) => {
                count_exit(ExitKind::MmioRead);
                mmio.read(addr, data);
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                count_exit(ExitKind::MmioWrite);
                if mmio.write(addr, data) == BusAction::Reset {
                    break VmEvent::GuestReset;
                }
            }
            Ok(VcpuExit::Hlt) => {
                count_exit(ExitKind::Hlt);
                break VmEvent::Fatal(format!("vCPU {index} halted outside the in-kernel irqchip"));
            }
            Ok(VcpuExit::Shutdown) => {
                count_exit(ExitKind::Shutdown);
                break VmEvent::Fatal(format!(
                    "vCPU {index} triple-faulted (KVM_EXIT_SHUTDOWN){}",
                    where_shutdown(&vcpu)
                ));
            }
            Ok(VcpuExit::InternalError) => {
                count_exit(ExitKind::InternalError);
                let suberror = internal_suberror(&mut vcpu);
                let hint = if suberror == 1 {
                    " (emulation failure: the host's KVM could not emulate a guest instruction; \
                     resolve the rip with `nm vmlinux`)"
                } else {
                    ""
                };
                break VmEvent::Fatal(format!(
                    "KVM internal error on vCPU {index}, suberror {suberror}{hint}{}",
                    where_(&vcpu)
                ));
            }
            Ok(VcpuExit::FailEntry(reason, cpu)) => {
                count_exit(ExitKind::FailEntry);
                break VmEvent::Fatal(format!(
                    "KVM could not enter vCPU {index} (reason {reason:#x}, cpu {cpu})"
                ));
            }
            Ok(VcpuExit::SystemEvent(kind, _)) => {
                count_exit(ExitKind::SystemEvent);
                match kind {
                    KVM_SYSTEM_EVENT_SHUTDOWN | KVM_SYSTEM_EVENT_RESET => {
                        break VmEvent::GuestReset;
                    }
                    other => break VmEvent::Fatal(format!("unexpected KVM system event {other}")),
                }
            }
            Ok(other) => {
                count_exit(ExitKind::Other);
                break VmEvent::Fatal(format!("unexpected KVM exit on vCPU {index}: {other:?}"));
            }
            Err(err) if err.errno() == libc::EINTR || err.errno() == libc::EAGAIN => {
                count_exit(ExitKind::Interrupted);
                vcpu.set_kvm_immediate_exit(0);
                if pause.requested() {
                    let saved = VcpuState::save(&vcpu, &msr_indices).map_err(|e| e.to_string());
                    IMMEDIATE_EXIT.with(|p| p.set(std::ptr::null_mut()));
                    events.send(VmEvent::VcpuPaused {
                        index,
                        state: Box::new(saved),
                    });
                    // The VMM exits after the snapshot; if the save fails, it
                    // clears the request and unparks us, and the guest goes on.
                    while pause.requested() {
                        std::thread::park();
                    }
                    IMMEDIATE_EXIT.with(|p| p.set(&mut vcpu.get_kvm_run().immediate_exit));
                }
            }
            Err(err) => break VmEvent::Fatal(format!("KVM_RUN failed on vCPU {index}: {err}")),
        }
    };
    IMMEDIATE_EXIT.with(|p| p.set(std::ptr::null_mut()));
    events.send(end);
}

fn where_(vcpu: &VcpuFd) -> String {
    match vcpu.get_regs() {
        Ok(regs) => format!(" at rip={:#x}", regs.rip),
        Err(_) => String::new(),
    }
}

/// On SVM, KVM resets a vCPU after a shutdown (the VMCB is undefined then),
/// so its registers show the reset vector rather than where it faulted; on
/// VMX and kvm_pvm they still hold the faulting state.
fn where_shutdown(vcpu: &VcpuFd) -> String {
    let at_reset_vector = match (vcpu.get_regs(), vcpu.get_sregs()) {
        (Ok(regs), Ok(sregs)) => regs.rip == 0xfff0 && sregs.cs.base == 0xffff_0000,
        _ => false,
    };
    if at_reset_vector {
        " (this KVM reset the vCPU on the shutdown, as AMD SVM does, so where it faulted is not known)"
            .to_string()
    } else {
        where_(vcpu)
    }
}

fn internal_suberror(vcpu: &mut VcpuFd) -> u32 {
    let run = vcpu.get_kvm_run();
    // SAFETY: after KVM_EXIT_INTERNAL_ERROR the `internal` member of the
    // exit union is the one KVM filled in.
    unsafe { run.__bindgen_anon_1.internal.suberror }
}

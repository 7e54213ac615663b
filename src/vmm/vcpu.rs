//! The vCPU run loop: KVM_RUN, then dispatch of each exit to the buses.

use kvm_ioctls::{VcpuExit, VcpuFd};

use crate::vmm::bus::{Bus, BusAction};
use crate::vmm::event::{VmEvent, VmEventSender};
use crate::vmm::stats::{ExitKind, count_exit};

const KVM_SYSTEM_EVENT_SHUTDOWN: u32 = 1;
const KVM_SYSTEM_EVENT_RESET: u32 = 2;

/// Runs one vCPU until the guest or an error ends it; reports how it ended.
pub fn run(index: u8, mut vcpu: VcpuFd, pio: Bus, mmio: Bus, events: VmEventSender) {
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
                    where_(&vcpu)
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
            }
            Err(err) => break VmEvent::Fatal(format!("KVM_RUN failed on vCPU {index}: {err}")),
        }
    };
    events.send(end);
}

fn where_(vcpu: &VcpuFd) -> String {
    match vcpu.get_regs() {
        Ok(regs) => format!(" at rip={:#x}", regs.rip),
        Err(_) => String::new(),
    }
}

fn internal_suberror(vcpu: &mut VcpuFd) -> u32 {
    let run = vcpu.get_kvm_run();
    // SAFETY: after KVM_EXIT_INTERNAL_ERROR the `internal` member of the
    // exit union is the one KVM filled in.
    unsafe { run.__bindgen_anon_1.internal.suberror }
}

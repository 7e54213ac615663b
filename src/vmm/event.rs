//! Events that end or inform the VMM's main loop, sent from vCPU threads,
//! devices and the control channel.

use std::sync::mpsc;

#[derive(Debug)]
pub enum VmEvent {
    /// The guest reset itself (i8042 0xFE): its orderly way to end.
    GuestReset,
    /// "Kernel panic" appeared on the console; a reset will follow.
    GuestPanic,
    /// The guest agent announced on the console that it listens.
    AgentReadyHint,
    /// A vCPU stopped with an error the guest cannot recover from.
    Fatal(String),
    /// The host asked the VMM to stop (control channel closed or SIGTERM).
    StopRequested,
    /// The host asked for the counters.
    StatsRequested,
    /// The host asked which guest pages have been touched.
    WorkingSetRequested,
    /// The host asked for a snapshot into this directory (the VM ends after it).
    SnapshotRequested(std::path::PathBuf),
    /// Debug builds: make a syscall no filter allows, on the main thread.
    #[cfg(debug_assertions)]
    DebugForbiddenSyscall,
    /// A vCPU stopped for a snapshot and saved its state.
    VcpuPaused {
        index: u8,
        state: Box<Result<crate::vmm::snapshot::vcpu_state::VcpuState, String>>,
    },
}

#[derive(Clone)]
pub struct VmEventSender(mpsc::Sender<VmEvent>);

impl VmEventSender {
    pub fn send(&self, event: VmEvent) {
        // The receiver only goes away when the VMM is exiting anyway.
        let _ = self.0.send(event);
    }
}

pub fn channel() -> (VmEventSender, mpsc::Receiver<VmEvent>) {
    let (tx, rx) = mpsc::channel();
    (VmEventSender(tx), rx)
}

//! The contract between the virtio-mmio transport and a virtio device model.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

/// Guest memory as every device sees it.
pub type GuestMemory = GuestMemoryMmap<()>;

/// virtio device IDs (virtio 1.2, section 5).
pub const TYPE_BLOCK: u32 = 2;
pub const TYPE_RNG: u32 = 4;
pub const TYPE_VSOCK: u32 = 19;

/// Feature bit every modern (non-legacy) device offers.
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;
/// The rings carry `used_event`/`avail_event`: each side says how far the
/// other may go before it wants a notification (virtio 1.2, 2.7.10).
pub const VIRTIO_RING_F_EVENT_IDX: u64 = 1 << 29;

/// InterruptStatus bits of virtio-mmio.
pub const INT_USED_RING: u32 = 1;
pub const INT_CONFIG_CHANGE: u32 = 2;

/// The interrupt line of one virtio-mmio device: a status word the driver
/// reads and acknowledges, and an irqfd that raises the GSI in KVM.
#[derive(Debug)]
pub struct Interrupt {
    status: AtomicU32,
    irqfd: EventFd,
}

impl Interrupt {
    pub fn new(irqfd: EventFd) -> Arc<Interrupt> {
        Arc::new(Interrupt {
            status: AtomicU32::new(0),
            irqfd,
        })
    }

    /// Tells the driver that used buffers are ready.
    pub fn signal_used_queue(&self) {
        self.signal(INT_USED_RING);
    }

    pub fn signal_config_change(&self) {
        self.signal(INT_CONFIG_CHANGE);
    }

    fn signal(&self, bit: u32) {
        self.status.fetch_or(bit, Ordering::SeqCst);
        if let Err(err) = self.irqfd.write(1) {
            crate::guest_warn!(%err, "cannot raise a virtio interrupt");
        }
        crate::vmm::stats::count_interrupt();
    }

    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    /// Restores the status word from a snapshot (the irqchip state carries
    /// whether the line is raised).
    pub fn set_status(&self, bits: u32) {
        self.status.store(bits, Ordering::SeqCst);
    }

    pub fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }

    pub fn irqfd(&self) -> &EventFd {
        &self.irqfd
    }
}

/// A virtio device behind the MMIO transport. The transport validates the
/// driver's register writes; the device validates every descriptor.
pub trait VirtioDevice: Send {
    fn device_type(&self) -> u32;

    /// Maximum size of each queue; the number of queues is its length.
    fn queue_max_sizes(&self) -> &[u16];

    /// Features the device offers (must include VIRTIO_F_VERSION_1).
    fn features(&self) -> u64;

    /// The driver accepted these features (already masked to `features()`).
    fn ack_features(&mut self, features: u64);

    /// Reads device config space; bytes outside it read as zero.
    fn read_config(&self, offset: u64, data: &mut [u8]);

    /// Writes device config space; writes outside it are ignored.
    fn write_config(&mut self, offset: u64, data: &[u8]);

    /// The driver set DRIVER_OK: the device takes its queues and may start.
    fn activate(
        &mut self,
        mem: GuestMemory,
        queues: Vec<Queue>,
        interrupt: Arc<Interrupt>,
    ) -> Result<(), ActivateError>;

    /// The driver wrote QueueNotify for `queue`. Called on a vCPU thread:
    /// either do the (bounded) work here or wake the device's own thread.
    fn queue_notify(&mut self, queue: u16);

    /// The driver reset the device: drop the queues and any state.
    fn reset(&mut self);

    /// The vCPUs are paused for a snapshot: give back every buffer the
    /// device holds, so the saved rings account for all of them.
    fn quiesce(&mut self) {}
}

/// With EVENT_IDX, asks the driver to notify when it next makes a buffer
/// available (`avail_event` = where the device is); true if one already
/// came in meanwhile, so the caller must look again rather than wait.
/// Without EVENT_IDX the driver notifies every time and this does nothing.
pub fn rearm_notification(queue: &mut Queue, mem: &GuestMemory) -> bool {
    use virtio_queue::QueueT;
    if !queue.event_idx_enabled() {
        return false;
    }
    // Queues are checked against guest memory when they start, so this
    // fails only on a broken ring; spinning on it would not mend it.
    queue.enable_notification(mem).unwrap_or_else(|err| {
        crate::guest_warn!(?err, "cannot write avail_event");
        false
    })
}

/// With EVENT_IDX, asks for a notification when the driver next posts a
/// buffer, however many it keeps posted ahead of the device (the vsock
/// event queue keeps spares): `avail_event` = the driver's own avail index.
/// True if one was posted meanwhile.
pub fn notify_on_next_post(queue: &Queue, mem: &GuestMemory) -> bool {
    use std::sync::atomic::fence;
    use virtio_queue::QueueT;
    use vm_memory::{Bytes, GuestAddress};
    if !queue.event_idx_enabled() {
        return false;
    }
    let Ok(avail) = queue.avail_idx(mem, Ordering::Acquire) else {
        return false;
    };
    // avail_event follows the used ring's header and elements (2.7.8).
    let offset = 4 + 8 * u64::from(queue.size());
    let stored = GuestAddress(queue.used_ring())
        .0
        .checked_add(offset)
        .map(GuestAddress)
        .is_some_and(|at| mem.store(avail.0.to_le(), at, Ordering::Relaxed).is_ok());
    if !stored {
        crate::guest_warn!("cannot write avail_event");
        return false;
    }
    fence(Ordering::SeqCst);
    queue
        .avail_idx(mem, Ordering::Relaxed)
        .is_ok_and(|now| now != avail)
}

#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    #[error("queue {0} is not valid for guest memory")]
    BadQueue(usize),
    #[error("device cannot start: {0}")]
    Device(String),
}

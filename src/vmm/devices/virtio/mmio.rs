//! The virtio-mmio transport (virtio 1.2, section 4.2.2, version 2 only).
//! It owns the queues until the driver sets DRIVER_OK, checks every register
//! write against the device status state machine, and then hands validated
//! queues to the device.

use std::sync::Arc;

use virtio_queue::{Queue, QueueT};

use super::device::{
    GuestMemory, Interrupt, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX, VirtioDevice,
};
use crate::vmm::bus::{BusAction, BusDevice};

const MAGIC_VALUE: u32 = 0x7472_6976; // "virt"
const MMIO_VERSION: u32 = 2;
const VENDOR_ID: u32 = 0x4b4c_5241; // "ARLK"

const REG_MAGIC: u64 = 0x000;
const REG_VERSION: u64 = 0x004;
const REG_DEVICE_ID: u64 = 0x008;
const REG_VENDOR_ID: u64 = 0x00c;
const REG_DEVICE_FEATURES: u64 = 0x010;
const REG_DEVICE_FEATURES_SEL: u64 = 0x014;
const REG_DRIVER_FEATURES: u64 = 0x020;
const REG_DRIVER_FEATURES_SEL: u64 = 0x024;
const REG_QUEUE_SEL: u64 = 0x030;
const REG_QUEUE_NUM_MAX: u64 = 0x034;
const REG_QUEUE_NUM: u64 = 0x038;
const REG_QUEUE_READY: u64 = 0x044;
pub const REG_QUEUE_NOTIFY: u64 = 0x050;
const REG_INTERRUPT_STATUS: u64 = 0x060;
const REG_INTERRUPT_ACK: u64 = 0x064;
const REG_STATUS: u64 = 0x070;
const REG_QUEUE_DESC_LOW: u64 = 0x080;
const REG_QUEUE_DESC_HIGH: u64 = 0x084;
const REG_QUEUE_AVAIL_LOW: u64 = 0x090;
const REG_QUEUE_AVAIL_HIGH: u64 = 0x094;
const REG_QUEUE_USED_LOW: u64 = 0x0a0;
const REG_QUEUE_USED_HIGH: u64 = 0x0a4;
const REG_CONFIG_GENERATION: u64 = 0x0fc;
const CONFIG_SPACE: u64 = 0x100;

const STATUS_ACKNOWLEDGE: u32 = 1;
const STATUS_DRIVER: u32 = 2;
const STATUS_DRIVER_OK: u32 = 4;
const STATUS_FEATURES_OK: u32 = 8;
const STATUS_NEEDS_RESET: u32 = 0x40;
const STATUS_FAILED: u32 = 0x80;

/// The transport's registers and queue set-up, as saved in a snapshot.
/// Queue positions are not saved: at a snapshot every chain the device took
/// has been returned, so both positions equal the used ring's index, which
/// is read back from guest memory on restore.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct TransportState {
    pub device_type: u32,
    pub status: u32,
    pub device_features_sel: u32,
    pub driver_features_sel: u32,
    pub driver_features: u64,
    pub queue_sel: u32,
    pub activated: bool,
    pub interrupt_status: u32,
    pub queues: Vec<QueueConfig>,
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct QueueConfig {
    pub size: u16,
    pub ready: bool,
    pub desc_table: u64,
    pub avail_ring: u64,
    pub used_ring: u64,
}

pub struct MmioTransport {
    device: Box<dyn VirtioDevice>,
    mem: GuestMemory,
    interrupt: Arc<Interrupt>,
    queues: Vec<Queue>,
    status: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    queue_sel: u32,
    activated: bool,
}

impl MmioTransport {
    pub fn new(
        device: Box<dyn VirtioDevice>,
        mem: GuestMemory,
        interrupt: Arc<Interrupt>,
    ) -> Result<Self, virtio_queue::Error> {
        let queues = device
            .queue_max_sizes()
            .iter()
            .map(|&max| Queue::new(max))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(MmioTransport {
            device,
            mem,
            interrupt,
            queues,
            status: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            queue_sel: 0,
            activated: false,
        })
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.queue_sel as usize)
    }

    /// Queue registers may change only while the driver sets the device up.
    fn queue_config_allowed(&self) -> bool {
        self.status & (STATUS_FEATURES_OK | STATUS_DRIVER_OK | STATUS_FAILED) == STATUS_FEATURES_OK
            && self
                .queues
                .get(self.queue_sel as usize)
                .is_some_and(|q| !q.ready())
    }

    fn update_queue(&mut self, f: impl FnOnce(&mut Queue)) {
        if self.queue_config_allowed() {
            if let Some(queue) = self.selected_queue() {
                f(queue);
            }
        } else {
            crate::guest_warn!("guest wrote a queue register outside queue set-up; ignored");
        }
    }

    /// QueueReady may also be cleared during set-up, to redo a queue.
    fn set_queue_ready(&mut self, ready: bool) {
        let in_setup = self.status & (STATUS_FEATURES_OK | STATUS_DRIVER_OK | STATUS_FAILED)
            == STATUS_FEATURES_OK;
        if in_setup {
            if let Some(queue) = self.selected_queue() {
                queue.set_ready(ready);
            }
        } else {
            crate::guest_warn!("guest wrote QueueReady outside queue set-up; ignored");
        }
    }

    fn reset(&mut self) {
        if self.activated {
            self.device.reset();
        }
        self.activated = false;
        self.status = 0;
        self.driver_features = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.queue_sel = 0;
        self.interrupt.ack(!0);
        for queue in &mut self.queues {
            queue.reset();
        }
    }

    fn set_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        // The driver only ever adds bits (virtio 1.2, 3.1.1); anything else is a bug or an attack.
        if value & self.status != self.status {
            crate::guest_warn!(
                old = self.status,
                new = value,
                "guest cleared device status bits; marking failed"
            );
            self.status |= STATUS_FAILED;
            return;
        }
        let added = value & !self.status;
        if added & STATUS_FEATURES_OK != 0 && self.driver_features & VIRTIO_F_VERSION_1 == 0 {
            // A legacy driver: refuse FEATURES_OK so it gives up cleanly.
            self.status = value & !STATUS_FEATURES_OK;
            return;
        }
        if added & STATUS_DRIVER_OK != 0 && !self.activated {
            let ordered = STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK;
            if value & ordered != ordered {
                self.status = value | STATUS_FAILED;
                return;
            }
            self.status = value;
            self.activate();
            return;
        }
        self.status = value;
    }

    fn activate(&mut self) {
        for (i, queue) in self.queues.iter().enumerate() {
            if queue.ready() && !queue.is_valid(&self.mem) {
                crate::guest_warn!(queue = i, "guest set up an invalid queue");
                self.status |= STATUS_NEEDS_RESET;
                return;
            }
        }
        // The device gets its own copies; ours keep answering register reads.
        let event_idx = self.driver_features & VIRTIO_RING_F_EVENT_IDX != 0;
        let queues = match self
            .queues
            .iter()
            .map(|q| {
                Queue::try_from(virtio_queue::QueueState {
                    event_idx_enabled: event_idx,
                    ..q.state()
                })
            })
            .collect()
        {
            Ok(queues) => queues,
            Err(err) => {
                crate::guest_warn!(%err, "guest queue state is not valid");
                self.status |= STATUS_NEEDS_RESET;
                return;
            }
        };
        match self
            .device
            .activate(self.mem.clone(), queues, self.interrupt.clone())
        {
            Ok(()) => self.activated = true,
            Err(err) => {
                crate::guest_warn!(%err, "virtio device failed to activate");
                self.status |= STATUS_NEEDS_RESET;
            }
        }
    }

    /// Before a snapshot: the device gives back the buffers it holds.
    pub fn quiesce(&mut self) {
        if self.activated {
            self.device.quiesce();
        }
    }

    pub fn save_state(&self) -> TransportState {
        TransportState {
            device_type: self.device.device_type(),
            status: self.status,
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            driver_features: self.driver_features,
            queue_sel: self.queue_sel,
            activated: self.activated,
            interrupt_status: self.interrupt.status(),
            queues: self
                .queues
                .iter()
                .map(|q| QueueConfig {
                    size: q.size(),
                    ready: q.ready(),
                    desc_table: q.desc_table(),
                    avail_ring: q.avail_ring(),
                    used_ring: q.used_ring(),
                })
                .collect(),
        }
    }

    /// Puts a freshly made transport (same device type) into a saved state,
    /// activating the device with its queues where the driver had.
    pub fn restore_state(&mut self, saved: &TransportState) -> Result<(), String> {
        if saved.device_type != self.device.device_type() || saved.queues.len() != self.queues.len()
        {
            return Err(format!(
                "saved device type {} with {} queues does not match device type {} with {}",
                saved.device_type,
                saved.queues.len(),
                self.device.device_type(),
                self.queues.len()
            ));
        }
        self.status = saved.status;
        self.device_features_sel = saved.device_features_sel;
        self.driver_features_sel = saved.driver_features_sel;
        self.driver_features = saved.driver_features & self.device.features();
        self.queue_sel = saved.queue_sel;
        self.interrupt.set_status(saved.interrupt_status);
        self.device.ack_features(self.driver_features);
        let mut device_queues = Vec::with_capacity(saved.queues.len());
        for (i, (queue, config)) in self.queues.iter_mut().zip(&saved.queues).enumerate() {
            let position = if config.ready && saved.activated {
                used_index(&self.mem, config.used_ring)
                    .ok_or_else(|| format!("queue {i}: used ring outside memory"))?
            } else {
                0
            };
            let state = virtio_queue::QueueState {
                max_size: queue.max_size(),
                next_avail: position,
                next_used: position,
                event_idx_enabled: self.driver_features & VIRTIO_RING_F_EVENT_IDX != 0,
                size: config.size,
                ready: config.ready,
                desc_table: config.desc_table,
                avail_ring: config.avail_ring,
                used_ring: config.used_ring,
            };
            let restored = Queue::try_from(state).map_err(|e| format!("queue {i}: {e}"))?;
            if restored.ready() && !restored.is_valid(&self.mem) {
                return Err(format!("queue {i} is not valid in the restored memory"));
            }
            *queue = restored;
            device_queues.push(Queue::try_from(state).map_err(|e| format!("queue {i}: {e}"))?);
        }
        if saved.activated {
            self.device
                .activate(self.mem.clone(), device_queues, self.interrupt.clone())
                .map_err(|e| e.to_string())?;
            self.activated = true;
        }
        Ok(())
    }

    fn read_register(&mut self, offset: u64) -> u32 {
        match offset {
            REG_MAGIC => MAGIC_VALUE,
            REG_VERSION => MMIO_VERSION,
            REG_DEVICE_ID => self.device.device_type(),
            REG_VENDOR_ID => VENDOR_ID,
            REG_DEVICE_FEATURES => match self.device_features_sel {
                0 => self.device.features() as u32,
                1 => (self.device.features() >> 32) as u32,
                _ => 0,
            },
            REG_QUEUE_NUM_MAX => self
                .queues
                .get(self.queue_sel as usize)
                .map_or(0, |q| u32::from(q.max_size())),
            REG_QUEUE_READY => self
                .queues
                .get(self.queue_sel as usize)
                .map_or(0, |q| u32::from(q.ready())),
            REG_INTERRUPT_STATUS => self.interrupt.status(),
            REG_STATUS => self.status,
            REG_CONFIG_GENERATION => 0,
            _ => {
                tracing::debug!(offset, "guest read an unknown virtio-mmio register");
                0
            }
        }
    }

    fn write_register(&mut self, offset: u64, value: u32) {
        match offset {
            REG_DEVICE_FEATURES_SEL => self.device_features_sel = value,
            REG_DRIVER_FEATURES_SEL => self.driver_features_sel = value,
            REG_DRIVER_FEATURES => {
                if self.status & (STATUS_FEATURES_OK | STATUS_DRIVER_OK) != 0
                    || self.status & STATUS_DRIVER == 0
                {
                    crate::guest_warn!("guest wrote driver features at the wrong time; ignored");
                    return;
                }
                let shift = match self.driver_features_sel {
                    0 => 0,
                    1 => 32,
                    _ => return,
                };
                let mask = 0xffff_ffffu64 << shift;
                let offered = self.device.features();
                self.driver_features =
                    (self.driver_features & !mask) | ((u64::from(value) << shift) & offered);
                self.device.ack_features(self.driver_features);
            }
            REG_QUEUE_SEL => self.queue_sel = value,
            REG_QUEUE_NUM => self.update_queue(|q| q.set_size(value as u16)),
            REG_QUEUE_READY => self.set_queue_ready(value == 1),
            REG_QUEUE_DESC_LOW => {
                self.update_queue(|q| q.set_desc_table_address(Some(value), None))
            }
            REG_QUEUE_DESC_HIGH => {
                self.update_queue(|q| q.set_desc_table_address(None, Some(value)))
            }
            REG_QUEUE_AVAIL_LOW => {
                self.update_queue(|q| q.set_avail_ring_address(Some(value), None))
            }
            REG_QUEUE_AVAIL_HIGH => {
                self.update_queue(|q| q.set_avail_ring_address(None, Some(value)))
            }
            REG_QUEUE_USED_LOW => self.update_queue(|q| q.set_used_ring_address(Some(value), None)),
            REG_QUEUE_USED_HIGH => {
                self.update_queue(|q| q.set_used_ring_address(None, Some(value)))
            }
            REG_QUEUE_NOTIFY => {
                if self.activated && (value as usize) < self.queues.len() {
                    self.device.queue_notify(value as u16);
                }
            }
            REG_INTERRUPT_ACK => self.interrupt.ack(value),
            REG_STATUS => self.set_status(value),
            _ => tracing::debug!(offset, "guest wrote an unknown virtio-mmio register"),
        }
    }
}

/// The used ring's `idx` field: flags (u16) then idx (u16).
fn used_index(mem: &GuestMemory, used_ring: u64) -> Option<u16> {
    use vm_memory::{Bytes, GuestAddress};
    let addr = used_ring.checked_add(2)?;
    mem.read_obj::<u16>(GuestAddress(addr))
        .ok()
        .map(u16::from_le)
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG_SPACE {
            self.device.read_config(offset - CONFIG_SPACE, data);
            return;
        }
        if data.len() != 4 || !offset.is_multiple_of(4) {
            data.fill(0);
            return;
        }
        data.copy_from_slice(&self.read_register(offset).to_le_bytes());
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> BusAction {
        if offset >= CONFIG_SPACE {
            if self.status & STATUS_DRIVER != 0 {
                self.device.write_config(offset - CONFIG_SPACE, data);
            }
            return BusAction::None;
        }
        if let Ok(bytes) = <[u8; 4]>::try_from(data)
            && offset.is_multiple_of(4)
        {
            self.write_register(offset, u32::from_le_bytes(bytes));
        }
        BusAction::None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vmm::devices::virtio::device::ActivateError;
    use std::sync::Mutex;
    use vm_memory::GuestAddress;
    use vmm_sys_util::eventfd::EventFd;

    #[derive(Default)]
    struct Recorder {
        activations: usize,
        notifies: Vec<u16>,
        resets: usize,
    }

    struct Dummy(Arc<Mutex<Recorder>>);

    impl VirtioDevice for Dummy {
        fn device_type(&self) -> u32 {
            4
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &[16]
        }
        fn features(&self) -> u64 {
            VIRTIO_F_VERSION_1
        }
        fn ack_features(&mut self, _: u64) {}
        fn read_config(&self, _: u64, data: &mut [u8]) {
            data.fill(0xab);
        }
        fn write_config(&mut self, _: u64, _: &[u8]) {}
        fn activate(
            &mut self,
            _: GuestMemory,
            _: Vec<Queue>,
            _: Arc<Interrupt>,
        ) -> Result<(), ActivateError> {
            self.0.lock().unwrap().activations += 1;
            Ok(())
        }
        fn queue_notify(&mut self, queue: u16) {
            self.0.lock().unwrap().notifies.push(queue);
        }
        fn reset(&mut self) {
            self.0.lock().unwrap().resets += 1;
        }
    }

    fn transport() -> (MmioTransport, Arc<Mutex<Recorder>>) {
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        let rec = Arc::new(Mutex::new(Recorder::default()));
        let irq = Interrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap());
        (
            MmioTransport::new(Box::new(Dummy(rec.clone())), mem, irq).unwrap(),
            rec,
        )
    }

    fn w(t: &mut MmioTransport, reg: u64, v: u32) {
        t.write(reg, &v.to_le_bytes());
    }

    fn r(t: &mut MmioTransport, reg: u64) -> u32 {
        let mut b = [0u8; 4];
        t.read(reg, &mut b);
        u32::from_le_bytes(b)
    }

    fn negotiate(t: &mut MmioTransport) {
        w(t, REG_STATUS, STATUS_ACKNOWLEDGE);
        w(t, REG_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        w(t, REG_DRIVER_FEATURES_SEL, 1);
        w(t, REG_DRIVER_FEATURES, 1);
        w(
            t,
            REG_STATUS,
            STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK,
        );
    }

    fn setup_queue(t: &mut MmioTransport) {
        w(t, REG_QUEUE_SEL, 0);
        w(t, REG_QUEUE_NUM, 16);
        w(t, REG_QUEUE_DESC_LOW, 0x1000);
        w(t, REG_QUEUE_AVAIL_LOW, 0x2000);
        w(t, REG_QUEUE_USED_LOW, 0x3000);
        w(t, REG_QUEUE_READY, 1);
    }

    const ALL_OK: u32 = STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK;

    #[test]
    fn identifies_as_modern_virtio_mmio() {
        let (mut t, _) = transport();
        assert_eq!(r(&mut t, REG_MAGIC), MAGIC_VALUE);
        assert_eq!(r(&mut t, REG_VERSION), 2);
        assert_eq!(r(&mut t, REG_DEVICE_ID), 4);
        w(&mut t, REG_DEVICE_FEATURES_SEL, 1);
        assert_eq!(r(&mut t, REG_DEVICE_FEATURES), 1);
        assert_eq!(r(&mut t, REG_QUEUE_NUM_MAX), 16);
        w(&mut t, REG_QUEUE_SEL, 7);
        assert_eq!(r(&mut t, REG_QUEUE_NUM_MAX), 0, "nonexistent queue");
    }

    #[test]
    fn normal_setup_activates_and_notifies() {
        let (mut t, rec) = transport();
        negotiate(&mut t);
        setup_queue(&mut t);
        w(&mut t, REG_STATUS, ALL_OK);
        assert_eq!(rec.lock().unwrap().activations, 1);
        w(&mut t, REG_QUEUE_NOTIFY, 0);
        w(&mut t, REG_QUEUE_NOTIFY, 5); // out of range: ignored
        assert_eq!(rec.lock().unwrap().notifies, vec![0]);
        w(&mut t, REG_STATUS, 0);
        assert_eq!(rec.lock().unwrap().resets, 1);
        assert_eq!(r(&mut t, REG_STATUS), 0);
    }

    #[test]
    fn queue_outside_memory_is_not_activated() {
        let (mut t, rec) = transport();
        negotiate(&mut t);
        setup_queue(&mut t);
        w(&mut t, REG_QUEUE_READY, 0); // redo the queue during set-up
        w(&mut t, REG_QUEUE_DESC_HIGH, 0xffff_ffff);
        w(&mut t, REG_QUEUE_READY, 1);
        w(&mut t, REG_STATUS, ALL_OK);
        assert_eq!(rec.lock().unwrap().activations, 0);
        assert_ne!(r(&mut t, REG_STATUS) & STATUS_NEEDS_RESET, 0);
    }

    #[test]
    fn hostile_register_sequences_are_refused() {
        let (mut t, rec) = transport();
        // DRIVER_OK without negotiation.
        w(&mut t, REG_STATUS, STATUS_DRIVER_OK);
        assert_eq!(rec.lock().unwrap().activations, 0);
        assert_ne!(r(&mut t, REG_STATUS) & STATUS_FAILED, 0);
        w(&mut t, REG_STATUS, 0);
        // A legacy driver (no VERSION_1) never gets FEATURES_OK.
        w(&mut t, REG_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        w(
            &mut t,
            REG_STATUS,
            STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK,
        );
        assert_eq!(r(&mut t, REG_STATUS) & STATUS_FEATURES_OK, 0);
        w(&mut t, REG_STATUS, 0);
        // Queue registers after DRIVER_OK do not move a live queue.
        negotiate(&mut t);
        setup_queue(&mut t);
        w(&mut t, REG_STATUS, ALL_OK);
        w(&mut t, REG_QUEUE_DESC_LOW, 0xdead_0000);
        assert_eq!(t.queues[0].desc_table(), 0x1000);
        // Odd sizes and offsets are ignored, not mis-decoded.
        t.write(REG_QUEUE_NOTIFY, &[0]);
        t.write(REG_QUEUE_NOTIFY + 1, &0u32.to_le_bytes());
        assert!(rec.lock().unwrap().notifies.is_empty());
        let mut b = [0u8; 2];
        t.read(REG_MAGIC, &mut b);
        assert_eq!(b, [0, 0]);
        // Far out-of-range config reads are the device's to bound.
        let mut c = [0u8; 8];
        t.read(CONFIG_SPACE + 0x10_0000, &mut c);
        assert_eq!(c, [0xab; 8]);
    }
}

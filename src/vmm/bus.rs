//! Dispatch of the guest's port I/O and MMIO accesses to device models.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// A device on a bus. `offset` is relative to the device's base address.
pub trait BusDevice: Send {
    fn read(&mut self, offset: u64, data: &mut [u8]);
    fn write(&mut self, offset: u64, data: &[u8]) -> BusAction;
}

/// What the VMM must do after an access.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BusAction {
    None,
    /// The guest asked for a reset (its way of shutting down).
    Reset,
}

#[derive(Debug, thiserror::Error)]
#[error("bus range {base:#x}+{len:#x} overlaps an existing device")]
pub struct OverlapError {
    base: u64,
    len: u64,
}

type SharedDevice = Arc<Mutex<dyn BusDevice>>;

/// Non-overlapping address ranges, each owned by one device.
#[derive(Default, Clone)]
pub struct Bus {
    ranges: BTreeMap<u64, (u64, SharedDevice)>,
}

impl Bus {
    pub fn insert(
        &mut self,
        base: u64,
        len: u64,
        device: SharedDevice,
    ) -> Result<(), OverlapError> {
        let end = base.checked_add(len).ok_or(OverlapError { base, len })?;
        let overlaps_prev = self
            .ranges
            .range(..end)
            .next_back()
            .is_some_and(|(b, (l, _))| b + l > base);
        if len == 0 || overlaps_prev {
            return Err(OverlapError { base, len });
        }
        self.ranges.insert(base, (len, device));
        Ok(())
    }

    fn find(&self, addr: u64, access_len: usize) -> Option<(u64, &SharedDevice)> {
        let (base, (len, device)) = self.ranges.range(..=addr).next_back()?;
        let offset = addr - base;
        (offset.checked_add(access_len as u64)? <= *len).then_some((offset, device))
    }

    /// Reads; an access no device claims reads as all ones, like an empty bus.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr, data.len()) {
            Some((offset, device)) => {
                lock(device).read(offset, data);
                true
            }
            None => {
                data.fill(0xff);
                false
            }
        }
    }

    pub fn write(&self, addr: u64, data: &[u8]) -> BusAction {
        match self.find(addr, data.len()) {
            Some((offset, device)) => lock(device).write(offset, data),
            None => BusAction::None,
        }
    }
}

/// A device panicking while locked must not wedge the VM's other vCPUs.
fn lock(device: &SharedDevice) -> std::sync::MutexGuard<'_, dyn BusDevice + 'static> {
    device
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Echo(u8);
    impl BusDevice for Echo {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(self.0 + offset as u8);
        }
        fn write(&mut self, _: u64, data: &[u8]) -> BusAction {
            self.0 = data[0];
            BusAction::None
        }
    }

    #[test]
    fn dispatches_by_range_and_rejects_overlap() {
        let mut bus = Bus::default();
        bus.insert(0x100, 0x10, Arc::new(Mutex::new(Echo(1))))
            .unwrap();
        assert!(
            bus.insert(0x108, 0x10, Arc::new(Mutex::new(Echo(2))))
                .is_err()
        );
        assert!(
            bus.insert(0xf8, 0x10, Arc::new(Mutex::new(Echo(2))))
                .is_err()
        );
        assert!(
            bus.insert(u64::MAX, 2, Arc::new(Mutex::new(Echo(2))))
                .is_err()
        );
        bus.insert(0x110, 0x10, Arc::new(Mutex::new(Echo(7))))
            .unwrap();
        let mut data = [0u8; 1];
        assert!(bus.read(0x102, &mut data));
        assert_eq!(data, [3]);
        assert!(bus.read(0x110, &mut data));
        assert_eq!(data, [7]);
        // Straddling the end of a device, or no device at all: empty bus.
        let mut wide = [0u8; 4];
        assert!(!bus.read(0x10e, &mut wide));
        assert_eq!(wide, [0xff; 4]);
        assert!(!bus.read(0x50, &mut data));
    }
}

//! The 8250 UART at COM1 (vm-superio), wired to the console sink and IRQ 4.

use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use crate::vmm::bus::{BusAction, BusDevice};
use crate::vmm::devices::console::ConsoleSink;

pub const COM1_PORT: u64 = 0x3f8;
pub const PORT_COUNT: u64 = 8;

/// Raises the serial interrupt through an irqfd.
pub struct IrqTrigger(pub EventFd);

impl Trigger for IrqTrigger {
    type E = std::io::Error;

    fn trigger(&self) -> std::io::Result<()> {
        crate::vmm::stats::count_interrupt();
        self.0.write(1)
    }
}

pub struct SerialDevice(Serial<IrqTrigger, vm_superio::serial::NoEvents, ConsoleSink>);

impl SerialDevice {
    pub fn new(irq: EventFd, sink: ConsoleSink) -> Self {
        SerialDevice(Serial::new(IrqTrigger(irq), sink))
    }
}

impl BusDevice for SerialDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match (u8::try_from(offset), data.len()) {
            (Ok(offset), 1) => data[0] = self.0.read(offset),
            _ => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> BusAction {
        if let (Ok(offset), [value]) = (u8::try_from(offset), data)
            && let Err(err) = self.0.write(offset, *value)
        {
            tracing::debug!(?err, "serial write failed");
        }
        BusAction::None
    }
}

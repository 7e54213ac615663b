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

/// The UART registers, saved in snapshots (vm-superio's own state type has
/// no serde support).
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct SerialSnapshot {
    pub baud_divisor_low: u8,
    pub baud_divisor_high: u8,
    pub interrupt_enable: u8,
    pub interrupt_identification: u8,
    pub line_control: u8,
    pub line_status: u8,
    pub modem_control: u8,
    pub modem_status: u8,
    pub scratch: u8,
    pub in_buffer: Vec<u8>,
}

impl SerialDevice {
    pub fn new(irq: EventFd, sink: ConsoleSink) -> Self {
        SerialDevice(Serial::new(IrqTrigger(irq), sink))
    }

    pub fn restore(
        irq: EventFd,
        sink: ConsoleSink,
        saved: &SerialSnapshot,
    ) -> Result<Self, String> {
        let state = vm_superio::serial::SerialState {
            baud_divisor_low: saved.baud_divisor_low,
            baud_divisor_high: saved.baud_divisor_high,
            interrupt_enable: saved.interrupt_enable,
            interrupt_identification: saved.interrupt_identification,
            line_control: saved.line_control,
            line_status: saved.line_status,
            modem_control: saved.modem_control,
            modem_status: saved.modem_status,
            scratch: saved.scratch,
            in_buffer: saved.in_buffer.clone(),
        };
        Serial::from_state(&state, IrqTrigger(irq), vm_superio::serial::NoEvents, sink)
            .map(SerialDevice)
            .map_err(|e| format!("cannot restore the serial port: {e:?}"))
    }

    pub fn snapshot(&self) -> SerialSnapshot {
        let s = self.0.state();
        SerialSnapshot {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        }
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

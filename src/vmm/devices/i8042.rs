//! Just enough of the i8042 keyboard controller for the guest kernel's
//! `reboot=k`: a status port that is never busy, and the 0xFE reset command,
//! which is how an airlock guest ends itself.

use crate::vmm::bus::{BusAction, BusDevice};

pub const DATA_PORT: u64 = 0x60;
/// The command/status port, at offset 4 from DATA_PORT.
pub const PORT_SPAN: u64 = 5;
const COMMAND_OFFSET: u64 = 4;
const CMD_RESET_CPU: u8 = 0xfe;

#[derive(Default)]
pub struct I8042;

impl BusDevice for I8042 {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        // Status 0: output empty, input empty, so the kernel's kb_wait() ends at once.
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> BusAction {
        if offset == COMMAND_OFFSET && data.first() == Some(&CMD_RESET_CPU) {
            BusAction::Reset
        } else {
            BusAction::None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reset_command_and_idle_status() {
        let mut dev = I8042;
        let mut status = [0xffu8];
        dev.read(COMMAND_OFFSET, &mut status);
        assert_eq!(status, [0]);
        assert_eq!(
            dev.write(COMMAND_OFFSET, &[CMD_RESET_CPU]),
            BusAction::Reset
        );
        assert_eq!(dev.write(0, &[CMD_RESET_CPU]), BusAction::None);
        assert_eq!(dev.write(COMMAND_OFFSET, &[0xad]), BusAction::None);
    }
}

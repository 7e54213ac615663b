//! VM-wide state: the in-kernel interrupt controllers, the PIT and the KVM clock.

use kvm_bindings::{
    KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, kvm_clock_data, kvm_irqchip,
    kvm_pit_state2,
};
use kvm_ioctls::VmFd;
use serde::{Deserialize, Serialize};

use super::{SnapshotError, kvm_error};

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct VmState {
    pub irqchips: Vec<kvm_irqchip>,
    pub pit: kvm_pit_state2,
    pub clock: kvm_clock_data,
}

const CHIPS: [u32; 3] = [
    KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE,
    KVM_IRQCHIP_IOAPIC,
];

impl VmState {
    pub fn save(vm: &VmFd) -> Result<VmState, SnapshotError> {
        let mut irqchips = Vec::with_capacity(CHIPS.len());
        for chip_id in CHIPS {
            let mut chip = kvm_irqchip {
                chip_id,
                ..Default::default()
            };
            vm.get_irqchip(&mut chip)
                .map_err(kvm_error("KVM_GET_IRQCHIP"))?;
            irqchips.push(chip);
        }
        Ok(VmState {
            irqchips,
            pit: vm.get_pit2().map_err(kvm_error("KVM_GET_PIT2"))?,
            clock: vm.get_clock().map_err(kvm_error("KVM_GET_CLOCK"))?,
        })
    }

    pub fn restore(&self, vm: &VmFd) -> Result<(), SnapshotError> {
        vm.set_pit2(&self.pit).map_err(kvm_error("KVM_SET_PIT2"))?;
        // Only the clock value is settable; flags such as TSC_STABLE are KVM's to report.
        let clock = kvm_clock_data {
            clock: self.clock.clock,
            ..Default::default()
        };
        vm.set_clock(&clock).map_err(kvm_error("KVM_SET_CLOCK"))?;
        for chip in &self.irqchips {
            if !CHIPS.contains(&chip.chip_id) {
                return Err(SnapshotError::Invalid(format!(
                    "unknown irqchip id {}",
                    chip.chip_id
                )));
            }
            vm.set_irqchip(chip).map_err(kvm_error("KVM_SET_IRQCHIP"))?;
        }
        Ok(())
    }
}

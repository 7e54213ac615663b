//! The Intel MultiProcessor table: without ACPI it is how the guest kernel
//! finds its vCPUs, the IOAPIC and the ISA interrupt routing.

use vm_memory::{Bytes, GuestAddress};

use crate::vmm::devices::virtio::device::GuestMemory;
use crate::vmm::layout::EBDA_START;

pub const IOAPIC_ADDR: u32 = 0xfec0_0000;
pub const LAPIC_ADDR: u32 = 0xfee0_0000;
/// Pins of KVM's in-kernel IOAPIC.
pub const IOAPIC_PINS: u8 = 24;
const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
const MP_SPEC_REV: u8 = 4;

#[derive(Debug, thiserror::Error)]
pub enum MptableError {
    #[error("{0} vCPUs do not fit an MP table (at most 254)")]
    TooManyCpus(u8),
    #[error("cannot write the MP table into guest memory: {0}")]
    GuestMemory(#[from] vm_memory::GuestMemoryError),
}

/// Builds the floating pointer and the configuration table as bytes.
pub fn build(cpu_count: u8) -> Result<Vec<u8>, MptableError> {
    if cpu_count == 0 || cpu_count > 254 {
        return Err(MptableError::TooManyCpus(cpu_count));
    }
    let ioapic_id = cpu_count + 1;
    let table_addr = EBDA_START as u32 + 16;

    let mut entries = Vec::new();
    for cpu in 0..cpu_count {
        let flags = 1 | if cpu == 0 { 2 } else { 0 }; // enabled, boot processor
        entries.extend_from_slice(&[0, cpu, APIC_VERSION, flags]);
        entries.extend_from_slice(&0x600u32.to_le_bytes()); // signature: family 6
        entries.extend_from_slice(&0x201u32.to_le_bytes()); // features: fpu, apic
        entries.extend_from_slice(&[0; 8]);
    }
    entries.extend_from_slice(&[1, 0]);
    entries.extend_from_slice(b"ISA   ");
    entries.extend_from_slice(&[2, ioapic_id, IOAPIC_VERSION, 1]);
    entries.extend_from_slice(&IOAPIC_ADDR.to_le_bytes());
    for pin in 0..IOAPIC_PINS {
        // I/O interrupt: INT, conforming polarity/trigger, bus 0 irq -> ioapic pin.
        entries.extend_from_slice(&[3, 0, 0, 0, 0, pin, ioapic_id, pin]);
    }
    // Local interrupts: ExtINT on LINT0 of every CPU, NMI on LINT1.
    entries.extend_from_slice(&[4, 3, 0, 0, 0, 0, 0xff, 0]);
    entries.extend_from_slice(&[4, 1, 0, 0, 0, 0, 0xff, 1]);
    let entry_count = (u16::from(cpu_count)) + 1 + 1 + u16::from(IOAPIC_PINS) + 2;

    let mut table = Vec::new();
    table.extend_from_slice(b"PCMP");
    let length = (44 + entries.len()) as u16;
    table.extend_from_slice(&length.to_le_bytes());
    table.push(MP_SPEC_REV);
    table.push(0); // checksum, below
    table.extend_from_slice(b"AIRLOCK ");
    table.extend_from_slice(b"MICROVM     ");
    table.extend_from_slice(&0u32.to_le_bytes()); // oem table pointer
    table.extend_from_slice(&0u16.to_le_bytes()); // oem table size
    table.extend_from_slice(&entry_count.to_le_bytes());
    table.extend_from_slice(&LAPIC_ADDR.to_le_bytes());
    table.extend_from_slice(&0u32.to_le_bytes()); // extended table length, checksum, reserved
    table.extend_from_slice(&entries);
    table[7] = checksum(&table);

    let mut floating = Vec::with_capacity(16);
    floating.extend_from_slice(b"_MP_");
    floating.extend_from_slice(&table_addr.to_le_bytes());
    floating.extend_from_slice(&[1, MP_SPEC_REV, 0, 0, 0, 0, 0, 0]);
    floating[10] = checksum(&floating);

    floating.extend_from_slice(&table);
    Ok(floating)
}

/// Writes the MP table at the start of the EBDA, where the kernel looks.
pub fn write(mem: &GuestMemory, cpu_count: u8) -> Result<(), MptableError> {
    let bytes = build(cpu_count)?;
    mem.write_slice(&bytes, GuestAddress(EBDA_START))?;
    Ok(())
}

fn checksum(bytes: &[u8]) -> u8 {
    0u8.wrapping_sub(bytes.iter().fold(0u8, |sum, b| sum.wrapping_add(*b)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(bytes: &[u8]) -> u8 {
        bytes.iter().fold(0u8, |s, b| s.wrapping_add(*b))
    }

    #[test]
    fn checksums_and_lengths_are_consistent() {
        for cpus in [1, 2, 4] {
            let bytes = build(cpus).unwrap();
            assert_eq!(&bytes[..4], b"_MP_");
            assert_eq!(sum(&bytes[..16]), 0);
            let table = &bytes[16..];
            assert_eq!(&table[..4], b"PCMP");
            let len = u16::from_le_bytes([table[4], table[5]]) as usize;
            assert_eq!(len, table.len());
            assert_eq!(sum(table), 0);
            let pointer = u32::from_le_bytes(bytes[4..8].try_into().unwrap());
            assert_eq!(u64::from(pointer), EBDA_START + 16);
            // Entries: 20 bytes per CPU, 8 per other entry.
            let count = u16::from_le_bytes([table[34], table[35]]) as usize;
            assert_eq!(len - 44, 20 * cpus as usize + 8 * (count - cpus as usize));
        }
    }

    #[test]
    fn zero_or_too_many_cpus_are_refused() {
        assert!(build(0).is_err());
        assert!(build(255).is_err());
    }
}

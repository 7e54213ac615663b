//! Guest physical memory layout of an airlock microVM (x86-64).
//!
//! ```text
//! 0x0000_0500  GDT                     0x0000_7000  boot_params (zero page)
//! 0x0000_0520  IDT                     0x0000_8ff0  boot stack top
//! 0x0000_9000  PML4   0x0000_a000 PDPT 0x0000_b000  PD (1 GiB identity map)
//! 0x0002_0000  kernel command line     0x0009_fc00  MP table (top of base RAM)
//! 0x0010_0000  kernel (ELF segments) … end of RAM
//! 0xd000_0000  virtio-mmio devices, 4 KiB apart
//! ```

pub const GDT_ADDR: u64 = 0x500;
pub const IDT_ADDR: u64 = 0x520;
pub const ZERO_PAGE_ADDR: u64 = 0x7000;
pub const BOOT_STACK_TOP: u64 = 0x8ff0;
pub const PML4_ADDR: u64 = 0x9000;
pub const PDPT_ADDR: u64 = 0xa000;
pub const PD_ADDR: u64 = 0xb000;
pub const CMDLINE_ADDR: u64 = 0x20000;
pub const CMDLINE_MAX: usize = 4096;
/// End of conventional memory below 1 MiB; the MP table sits just below it.
pub const EBDA_START: u64 = 0x9fc00;
pub const HIGH_MEMORY_START: u64 = 0x100000;

/// MMIO window for virtio devices: below 4 GiB and above any RAM we allow.
pub const MMIO_START: u64 = 0xd000_0000;
pub const MMIO_DEVICE_SIZE: u64 = 0x1000;
/// RAM must end below the MMIO window (we do not split RAM around it).
pub const MAX_MEMORY_BYTES: u64 = MMIO_START;

/// First GSI for virtio devices (0-4 are legacy, 4 is the serial port).
pub const VIRTIO_FIRST_IRQ: u32 = 5;
pub const SERIAL_IRQ: u32 = 4;

/// KVM needs three pages for its TSS and one for the identity map, in a
/// hole below 4 GiB that the guest does not use.
pub const KVM_TSS_ADDR: usize = 0xfffb_d000;
pub const KVM_IDENTITY_MAP_ADDR: u64 = 0xfffb_c000;

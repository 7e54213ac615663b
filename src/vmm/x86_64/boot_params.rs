//! The Linux 64-bit boot protocol: the zero page with its e820 map, and the
//! command line.

use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};
use vm_memory::{Bytes, GuestAddress};

use crate::vmm::devices::virtio::device::GuestMemory;
use crate::vmm::layout::{
    CMDLINE_ADDR, CMDLINE_MAX, EBDA_START, HIGH_MEMORY_START, ZERO_PAGE_ADDR,
};

const E820_RAM: u32 = 1;
const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448; // "HdrS"
const KERNEL_LOADER_OTHER: u8 = 0xff;
/// Lowest boot protocol version with the fields we fill.
const BOOT_PROTOCOL_VERSION: u16 = 0x0206;

#[derive(Debug, thiserror::Error)]
pub enum BootParamsError {
    #[error("the kernel command line is {0} bytes; at most {CMDLINE_MAX} fit")]
    CmdlineTooLong(usize),
    #[error("the kernel command line contains a NUL byte")]
    CmdlineNul,
    #[error("cannot write boot data into guest memory: {0}")]
    GuestMemory(#[from] vm_memory::GuestMemoryError),
}

/// Writes the command line and the zero page for a guest with `mem_bytes` of RAM.
pub fn write(mem: &GuestMemory, cmdline: &str, mem_bytes: u64) -> Result<(), BootParamsError> {
    let bytes = cmdline.as_bytes();
    if bytes.len() + 1 > CMDLINE_MAX {
        return Err(BootParamsError::CmdlineTooLong(bytes.len()));
    }
    if bytes.contains(&0) {
        return Err(BootParamsError::CmdlineNul);
    }
    mem.write_slice(bytes, GuestAddress(CMDLINE_ADDR))?;
    mem.write_obj(0u8, GuestAddress(CMDLINE_ADDR + bytes.len() as u64))?;

    let mut params = boot_params::default();
    params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
    params.hdr.header = KERNEL_HDR_MAGIC;
    params.hdr.version = BOOT_PROTOCOL_VERSION;
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.cmd_line_ptr = CMDLINE_ADDR as u32;
    params.hdr.cmdline_size = bytes.len() as u32;
    params.hdr.kernel_alignment = 0x0100_0000;

    let ram = [
        (0, EBDA_START),
        (HIGH_MEMORY_START, mem_bytes - HIGH_MEMORY_START),
    ];
    for (i, (addr, size)) in ram.into_iter().enumerate() {
        params.e820_table[i] = boot_e820_entry {
            addr,
            size,
            r#type: E820_RAM,
        };
    }
    params.e820_entries = ram.len() as u8;
    mem.write_obj(params, GuestAddress(ZERO_PAGE_ADDR))?;
    Ok(())
}

//! Guest memory in a snapshot: written sparsely (zero pages become holes),
//! and mapped MAP_PRIVATE on restore, so every sandbox restored from one
//! template shares its pages through the page cache until it writes them.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryRegion, GuestRegionMmap};

use super::{SnapshotError, io_error};
use crate::vmm::devices::virtio::device::GuestMemory;

const PAGE: usize = 4096;

/// Writes all guest memory to `path`; returns the bytes of non-zero pages.
/// The vCPUs and devices must be stopped.
pub fn save(mem: &GuestMemory, path: &Path) -> Result<u64, SnapshotError> {
    let file = File::create(path).map_err(io_error("create", path))?;
    let mut written = 0u64;
    let mut total = 0u64;
    for region in mem.iter() {
        let start = region.start_addr().0;
        let len =
            usize::try_from(region.len()).map_err(|e| SnapshotError::Invalid(e.to_string()))?;
        let host = mem
            .get_host_address(region.start_addr())
            .map_err(|e| SnapshotError::Invalid(format!("guest memory: {e}")))?;
        // SAFETY: the region is mapped for `len` bytes at `host` for the life of
        // `mem`, and nothing writes it while the VM is stopped.
        let bytes = unsafe { std::slice::from_raw_parts(host.cast_const(), len) };
        let mut offset = 0;
        while offset < len {
            let end = (offset + PAGE).min(len);
            let page = &bytes[offset..end];
            if page.iter().any(|b| *b != 0) {
                // Extend the run of non-zero pages, then write it at once.
                let mut run_end = end;
                while run_end < len {
                    let next = &bytes[run_end..(run_end + PAGE).min(len)];
                    if next.iter().all(|b| *b == 0) {
                        break;
                    }
                    run_end = (run_end + PAGE).min(len);
                }
                file.write_all_at(&bytes[offset..run_end], start + offset as u64)
                    .map_err(io_error("write", path))?;
                written += (run_end - offset) as u64;
                offset = run_end;
            } else {
                offset = end;
            }
        }
        total = total.max(start + len as u64);
    }
    file.set_len(total).map_err(io_error("size", path))?;
    file.sync_all().map_err(io_error("sync", path))?;
    Ok(written)
}

/// Maps a memory file copy-on-write as guest memory of `bytes` bytes at 0.
pub fn map_private(path: &Path, bytes: u64) -> Result<GuestMemory, SnapshotError> {
    let file = File::open(path).map_err(io_error("open", path))?;
    let file_len = file.metadata().map_err(io_error("stat", path))?.len();
    if file_len != bytes {
        return Err(SnapshotError::Invalid(format!(
            "{} holds {file_len} bytes of memory, the state says {bytes}",
            path.display()
        )));
    }
    let len = usize::try_from(bytes).map_err(|e| SnapshotError::Invalid(e.to_string()))?;
    let region = MmapRegionBuilder::new_with_bitmap(len, ())
        .with_file_offset(FileOffset::new(file, 0))
        .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
        .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_NORESERVE)
        .build()
        .map_err(|e| SnapshotError::Invalid(format!("cannot map {}: {e}", path.display())))?;
    let region = GuestRegionMmap::new(region, GuestAddress(0))
        .ok_or_else(|| SnapshotError::Invalid("guest memory region does not fit".into()))?;
    GuestMemory::from_regions(vec![region])
        .map_err(|e| SnapshotError::Invalid(format!("guest memory: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

    #[test]
    fn memory_round_trips_sparsely_and_copy_on_write() {
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        mem.write_slice(b"hello", GuestAddress(0x3000)).unwrap();
        mem.write_slice(b"world", GuestAddress(0xf_fff0)).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("memory");
        let written = save(&mem, &path).unwrap();
        assert_eq!(written, 2 * PAGE as u64, "only non-zero pages are written");
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 1 << 20);

        let restored = map_private(&path, 1 << 20).unwrap();
        let mut buf = [0u8; 5];
        restored.read_slice(&mut buf, GuestAddress(0x3000)).unwrap();
        assert_eq!(&buf, b"hello");
        // Writes stay private to this mapping.
        restored
            .write_slice(b"HELLO", GuestAddress(0x3000))
            .unwrap();
        let again = map_private(&path, 1 << 20).unwrap();
        again.read_slice(&mut buf, GuestAddress(0x3000)).unwrap();
        assert_eq!(&buf, b"hello");
        assert!(
            map_private(&path, 2 << 20).is_err(),
            "size mismatch is refused"
        );
    }
}

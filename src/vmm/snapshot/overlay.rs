//! A diff snapshot's memory: only the pages a restored VM wrote since its
//! base snapshot (the template). The overlay file is as long as guest memory
//! and holds each written page at its own offset; pages that are zero stay
//! holes, so the file takes the disk its non-zero written pages take. The
//! page list lives in the (checksummed) state file.
//!
//! A resume maps the base MAP_PRIVATE, as any restore does, and maps the
//! overlay's ranges MAP_PRIVATE over it: until the guest writes one, an
//! overlay page is the file's page in the page cache, shared by every VM
//! resumed from the same saved state (the forks of a checkpoint). The next
//! pause saves those ranges again with the pages written since, so each
//! saved state stands on the base alone.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::Path;

use serde::{Deserialize, Serialize};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use super::dirty::{PAGE, PageMap, PageRange};
use super::{SnapshotError, io_error};
use crate::vmm::devices::virtio::device::GuestMemory;

pub const OVERLAY_FILE: &str = "memory.overlay";

/// Overlay ranges mapped from the file at most: each is a mapping of its
/// own, and a process has a bounded number (vm.max_map_count). Ranges past
/// this are copied in.
const MAX_MAPPED_RANGES: usize = 8192;

/// What a diff snapshot's state records about its memory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Overlay {
    /// The checksum in the base's state file: an overlay applies to the one
    /// snapshot it was taken over.
    pub base_state_checksum: String,
    /// Written pages, in order, not overlapping.
    pub ranges: Vec<PageRange>,
}

impl Overlay {
    pub fn bytes(&self) -> u64 {
        self.ranges.iter().map(|r| r.len).sum()
    }

    /// Refuses ranges that are unaligned, out of order, overlapping or
    /// outside `memory_bytes` (the state file may come from a hostile VMM).
    pub fn check(&self, memory_bytes: u64) -> Result<(), SnapshotError> {
        let bad = |why: String| SnapshotError::Invalid(format!("memory overlay: {why}"));
        let mut next_free = 0u64;
        for range in &self.ranges {
            if !range.start.is_multiple_of(PAGE)
                || !range.len.is_multiple_of(PAGE)
                || range.len == 0
            {
                return Err(bad(format!("range {range:?} is not whole pages")));
            }
            if range.start < next_free {
                return Err(bad(format!("range {range:?} is out of order or overlaps")));
            }
            match range.start.checked_add(range.len) {
                Some(end) if end <= memory_bytes => next_free = end,
                _ => return Err(bad(format!("range {range:?} is outside guest memory"))),
            }
        }
        Ok(())
    }
}

/// The one region of guest memory: its host address and length.
/// Guest memory as one host mapping: (host address, length).
pub(super) fn region(mem: &GuestMemory) -> Result<(usize, usize), SnapshotError> {
    let mut regions = mem.iter();
    let (Some(region), None) = (regions.next(), regions.next()) else {
        return Err(SnapshotError::Invalid(
            "guest memory must be one region".into(),
        ));
    };
    let len = usize::try_from(region.len()).map_err(|e| SnapshotError::Invalid(e.to_string()))?;
    let host = mem
        .get_host_address(GuestAddress(0))
        .map_err(|e| SnapshotError::Invalid(format!("guest memory: {e}")))?;
    if region.start_addr() != GuestAddress(0) {
        return Err(SnapshotError::Invalid(
            "guest memory does not start at 0".into(),
        ));
    }
    Ok((host as usize, len))
}

/// `a` and `b` (each in order, not overlapping) as one list in order,
/// overlapping and touching ranges joined.
fn union(a: &[PageRange], b: &[PageRange]) -> Vec<PageRange> {
    let mut all: Vec<PageRange> = a.iter().chain(b).copied().collect();
    all.sort_by_key(|r| r.start);
    let mut joined: Vec<PageRange> = Vec::with_capacity(all.len());
    for range in all {
        match joined.last_mut() {
            Some(last) if range.start <= last.end() => {
                last.len = last.end().max(range.end()) - last.start;
            }
            _ => joined.push(range),
        }
    }
    joined
}

/// Writes the pages this VM wrote, and the `inherited` ranges it was
/// resumed with, into `path`; returns their ranges. The vCPUs and devices
/// must be stopped.
pub fn save(
    mem: &GuestMemory,
    pagemap: &PageMap,
    inherited: &[PageRange],
    path: &Path,
) -> Result<Vec<PageRange>, SnapshotError> {
    let (host, len) = region(mem)?;
    let written = pagemap
        .private_ranges(host, len)
        .map_err(|e| SnapshotError::Invalid(format!("cannot read the page map: {e}")))?;
    let ranges = union(&written, inherited);
    if ranges.last().is_some_and(|r| r.end() > len as u64) {
        return Err(SnapshotError::Invalid(
            "an inherited overlay range is outside guest memory".into(),
        ));
    }
    let file = File::create(path).map_err(io_error("create", path))?;
    // SAFETY: the region is mapped for `len` bytes at `host` for the life of
    // `mem`, and nothing writes it while the VM is stopped.
    let bytes = unsafe { std::slice::from_raw_parts(host as *const u8, len) };
    for range in &ranges {
        // Ranges come from the page map of this very mapping: in bounds.
        let (start, end) = (range.start as usize, range.end() as usize);
        for (i, page) in bytes[start..end].chunks(PAGE as usize).enumerate() {
            if page.iter().any(|b| *b != 0) {
                let at = range.start + i as u64 * PAGE;
                file.write_all_at(page, at)
                    .map_err(io_error("write", path))?;
            }
        }
    }
    file.set_len(len as u64).map_err(io_error("size", path))?;
    file.sync_all().map_err(io_error("sync", path))?;
    Ok(ranges)
}

/// Maps the overlay's pages from `path` over guest memory (mapped from the
/// base), copy-on-write. Before any vCPU runs.
pub fn apply(mem: &GuestMemory, overlay: &Overlay, path: &Path) -> Result<(), SnapshotError> {
    let (host, len) = region(mem)?;
    overlay.check(len as u64)?;
    let file = File::open(path).map_err(io_error("open", path))?;
    let file_len = file.metadata().map_err(io_error("stat", path))?.len();
    if file_len != len as u64 {
        return Err(SnapshotError::Invalid(format!(
            "{} holds {file_len} bytes, guest memory is {len}",
            path.display()
        )));
    }
    for (index, range) in overlay.ranges.iter().enumerate() {
        let at = host + range.start as usize;
        if index < MAX_MAPPED_RANGES {
            let offset = libc::off_t::try_from(range.start)
                .map_err(|_| SnapshotError::Invalid(format!("range {range:?} is too far")))?;
            // SAFETY: `check` put the range, whole pages, inside the region
            // mapped at `host`, which `mem` owns (and unmaps whole); MAP_FIXED
            // replaces only those pages, before any vCPU or device runs.
            let mapped = unsafe {
                libc::mmap(
                    at as *mut libc::c_void,
                    range.len as usize,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_FIXED | libc::MAP_NORESERVE,
                    file.as_raw_fd(),
                    offset,
                )
            };
            if mapped == libc::MAP_FAILED || mapped as usize != at {
                return Err(io_error("map", path)(std::io::Error::last_os_error()));
            }
            continue;
        }
        // SAFETY: as above; the pages are copied instead of mapped.
        let target = unsafe { std::slice::from_raw_parts_mut(at as *mut u8, range.len as usize) };
        file.read_exact_at(target, range.start)
            .map_err(io_error("read", path))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

    fn range(start: u64, pages: u64) -> PageRange {
        PageRange {
            start: start * PAGE,
            len: pages * PAGE,
        }
    }

    #[test]
    fn ranges_are_checked() {
        let overlay = |ranges| Overlay {
            base_state_checksum: String::new(),
            ranges,
        };
        let mem = 16 * PAGE;
        assert!(
            overlay(vec![range(0, 2), range(2, 1), range(15, 1)])
                .check(mem)
                .is_ok()
        );
        assert!(overlay(vec![range(1, 2), range(2, 1)]).check(mem).is_err());
        assert!(overlay(vec![range(3, 1), range(1, 1)]).check(mem).is_err());
        assert!(overlay(vec![range(15, 2)]).check(mem).is_err());
        assert!(overlay(vec![range(0, 0)]).check(mem).is_err());
        let unaligned = PageRange {
            start: 1,
            len: PAGE,
        };
        assert!(overlay(vec![unaligned]).check(mem).is_err());
        let huge = PageRange {
            start: PAGE,
            len: u64::MAX - PAGE + 1,
        };
        assert!(overlay(vec![huge]).check(mem).is_err());
    }

    #[test]
    fn a_resumed_mapping_holds_base_plus_overlay_and_finds_it_written() {
        let len = 32 * PAGE;
        let dir = tempfile::tempdir().unwrap();
        let base_path = dir.path().join("memory");
        let base = GuestMemory::from_ranges(&[(GuestAddress(0), len as usize)]).unwrap();
        base.write_slice(&[1u8; 4096], GuestAddress(2 * PAGE))
            .unwrap();
        base.write_slice(&[1u8; 4096], GuestAddress(9 * PAGE))
            .unwrap();
        super::super::memory::save(&base, &base_path).unwrap();

        // A VM restored from the base writes two pages, zeroes a third.
        let vm = super::super::memory::map_private(&base_path, len).unwrap();
        vm.write_slice(b"hello", GuestAddress(5 * PAGE + 3))
            .unwrap();
        vm.write_slice(b"world", GuestAddress(31 * PAGE)).unwrap();
        vm.write_slice(&[0u8; 4096], GuestAddress(9 * PAGE))
            .unwrap();
        let pagemap = PageMap::open().unwrap();
        let overlay_path = dir.path().join(OVERLAY_FILE);
        let ranges = save(&vm, &pagemap, &[], &overlay_path).unwrap();
        assert_eq!(ranges, vec![range(5, 1), range(9, 1), range(31, 1)]);
        let overlay = Overlay {
            base_state_checksum: String::new(),
            ranges,
        };

        let resumed = super::super::memory::map_private(&base_path, len).unwrap();
        apply(&resumed, &overlay, &overlay_path).unwrap();
        let (host, _) = region(&resumed).unwrap();
        assert!(
            pagemap
                .private_ranges(host, len as usize)
                .unwrap()
                .is_empty(),
            "the overlay's pages are the file's, shared, until written"
        );
        let mut word = [0u8; 5];
        resumed
            .read_slice(&mut word, GuestAddress(5 * PAGE + 3))
            .unwrap();
        assert_eq!(&word, b"hello");
        resumed
            .read_slice(&mut word, GuestAddress(31 * PAGE))
            .unwrap();
        assert_eq!(&word, b"world");
        let mut page = [9u8; 4096];
        resumed
            .read_slice(&mut page, GuestAddress(9 * PAGE))
            .unwrap();
        assert!(
            page.iter().all(|b| *b == 0),
            "a zeroed page overrides the base"
        );
        resumed
            .read_slice(&mut page, GuestAddress(2 * PAGE))
            .unwrap();
        assert!(
            page.iter().all(|b| *b == 1),
            "untouched pages come from the base"
        );
        // The resumed VM's next pause saves the overlay's pages again, with
        // the ones it wrote since.
        resumed
            .write_slice(b"again", GuestAddress(6 * PAGE))
            .unwrap();
        let again = save(
            &resumed,
            &pagemap,
            &overlay.ranges,
            &dir.path().join("again"),
        )
        .unwrap();
        assert_eq!(again, vec![range(5, 2), range(9, 1), range(31, 1)]);

        let wrong_size = Overlay {
            base_state_checksum: String::new(),
            ranges: vec![range(40, 1)],
        };
        assert!(apply(&resumed, &wrong_size, &overlay_path).is_err());
    }
}

//! Which guest pages a restored VM has written. Its memory maps a snapshot
//! file MAP_PRIVATE, so a page written since (by the guest through KVM, or by
//! a device) is a private anonymous copy, and /proc/self/pagemap says so.
//! That covers device writes too, which KVM's dirty log would miss.

use std::fs::File;
use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::fs::FileExt;

use serde::{Deserialize, Serialize};

pub const PAGE: u64 = 4096;
const ENTRY_BYTES: usize = 8;
/// Entries read per pread (32 KiB of pagemap).
const CHUNK_ENTRIES: usize = 4096;

const PM_PRESENT: u64 = 1 << 63;
const PM_SWAPPED: u64 = 1 << 62;
const PM_FILE_OR_SHARED: u64 = 1 << 61;

/// Bytes `[start, start + len)` of guest memory, page-aligned.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PageRange {
    pub start: u64,
    pub len: u64,
}

impl PageRange {
    pub fn end(&self) -> u64 {
        self.start.saturating_add(self.len)
    }
}

/// This process's page map. Opened before a jail hides /proc (the fd keeps
/// the memory it was opened for, so it must be opened by the VMM process
/// itself, not a parent).
pub struct PageMap(File);

impl PageMap {
    pub fn open() -> io::Result<PageMap> {
        File::open("/proc/self/pagemap").map(PageMap)
    }

    pub fn from_fd(fd: OwnedFd) -> PageMap {
        PageMap(File::from(fd))
    }

    /// The page ranges of the mapping `[host, host + len)` that hold private
    /// copies (present or swapped out, not file-backed), as offsets from
    /// `host`, merged and in order.
    pub fn private_ranges(&self, host: usize, len: usize) -> io::Result<Vec<PageRange>> {
        let (_, private) = self.scan(host, len, false)?;
        Ok(private)
    }

    /// The pages of `[host, host + len)` the guest (or a device) touched
    /// since the mapping was made: (still the file's page, private copy).
    pub fn touched_ranges(
        &self,
        host: usize,
        len: usize,
    ) -> io::Result<(Vec<PageRange>, Vec<PageRange>)> {
        self.scan(host, len, true)
    }

    /// One pass over the page map: file-backed present pages (if asked
    /// for) and private copies, as merged ranges of offsets from `host`.
    fn scan(
        &self,
        host: usize,
        len: usize,
        with_file: bool,
    ) -> io::Result<(Vec<PageRange>, Vec<PageRange>)> {
        let page = PAGE as usize;
        if !host.is_multiple_of(page) || !len.is_multiple_of(page) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "the mapping is not page-aligned",
            ));
        }
        let pages = len / page;
        let mut ranges: Vec<PageRange> = Vec::new();
        let mut file_ranges: Vec<PageRange> = Vec::new();
        let mut buf = vec![0u8; CHUNK_ENTRIES * ENTRY_BYTES];
        let mut index = 0usize;
        while index < pages {
            let count = CHUNK_ENTRIES.min(pages - index);
            let bytes = &mut buf[..count * ENTRY_BYTES];
            let offset = ((host / page + index) * ENTRY_BYTES) as u64;
            self.0.read_exact_at(bytes, offset)?;
            for (i, entry) in bytes.chunks_exact(ENTRY_BYTES).enumerate() {
                let mut raw = [0u8; ENTRY_BYTES];
                raw.copy_from_slice(entry);
                let entry = u64::from_le_bytes(raw);
                let at = ((index + i) * page) as u64;
                if is_private_copy(entry) {
                    push_page(&mut ranges, at);
                } else if with_file && entry & PM_PRESENT != 0 {
                    push_page(&mut file_ranges, at);
                }
            }
            index += count;
        }
        Ok((file_ranges, ranges))
    }
}

fn is_private_copy(entry: u64) -> bool {
    entry & (PM_PRESENT | PM_SWAPPED) != 0 && entry & PM_FILE_OR_SHARED == 0
}

/// Adds the page at `start`, extending the last range if it touches it.
fn push_page(ranges: &mut Vec<PageRange>, start: u64) {
    match ranges.last_mut() {
        Some(last) if last.end() == start => last.len += PAGE,
        _ => ranges.push(PageRange { start, len: PAGE }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn written_pages_of_a_private_file_mapping_are_found() {
        let pages = 64usize;
        let len = pages * PAGE as usize;
        let mut file = tempfile::tempfile().unwrap();
        std::io::Write::write_all(&mut file, &vec![7u8; len]).unwrap();
        // SAFETY: a fresh private mapping of a file we own, unmapped below.
        let host = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE,
                std::os::fd::AsRawFd::as_raw_fd(&file),
                0,
            )
        };
        assert_ne!(host, libc::MAP_FAILED);
        let bytes = host.cast::<u8>();
        // SAFETY: every offset is inside the mapping.
        unsafe {
            // Read some pages (stay file-backed), write others.
            let _ = std::ptr::read_volatile(bytes.add(PAGE as usize));
            for page in [3usize, 4, 5, 10, 63] {
                std::ptr::write_volatile(bytes.add(page * PAGE as usize + 17), 1);
            }
        }
        let map = PageMap::open().unwrap();
        let ranges = map.private_ranges(host as usize, len).unwrap();
        assert_eq!(
            ranges,
            vec![
                PageRange {
                    start: 3 * PAGE,
                    len: 3 * PAGE
                },
                PageRange {
                    start: 10 * PAGE,
                    len: PAGE
                },
                PageRange {
                    start: 63 * PAGE,
                    len: PAGE
                },
            ]
        );
        let (read, written) = map.touched_ranges(host as usize, len).unwrap();
        assert_eq!(written, ranges);
        // The kernel may map a read page's cached neighbours too (fault-
        // around), so they can show as well.
        let covers = |page: u64| {
            read.iter()
                .any(|r| r.start <= page * PAGE && r.end() > page * PAGE)
        };
        assert!(covers(1), "a page only read is touched: {read:?}");
        // How far around a read the kernel maps is its choice (with large
        // folios, a whole folio), so no page is asserted untouched.
        assert!(
            written
                .iter()
                .all(|w| !read.iter().any(|r| r.start < w.end() && w.start < r.end())),
            "a written page is never counted as only read"
        );
        assert!(map.private_ranges(host as usize + 1, len).is_err());
        // SAFETY: unmaps what was mapped above.
        unsafe { libc::munmap(host, len) };
    }
}

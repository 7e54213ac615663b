//! The guest pages a restored template touches on its way to a first
//! result. Recorded once, when the template is made, from a trial restore;
//! a later restore maps them before its vCPUs run. Otherwise each first
//! touch is a nested page fault: a VM exit and a trip through KVM's fault
//! path, about 1 µs on hardware and tens of µs on a software-nested host,
//! thousands of times per restore.
//!
//! Pages the guest wrote are copied up front (MADV_POPULATE_WRITE), so its
//! writes find them private and writable. Where KVM offers
//! KVM_PRE_FAULT_MEMORY (Linux 6.10+), every page of the set is also entered
//! in the second-level page tables, and the guest takes no fault on them at
//! all. A set is only a hint: a wrong one costs time, never correctness.

use std::io;
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::SnapshotError;
use super::dirty::{PAGE, PageMap, PageRange};
use crate::vmm::devices::virtio::device::GuestMemory;

pub const FILE: &str = "working-set.json";
/// `AIRLOCK_WORKING_SET=off` restores without mapping the set (to measure
/// what it saves, or to rule it out).
pub const ENV: &str = "AIRLOCK_WORKING_SET";
/// Most ranges a set holds per kind; past it, nearby ranges are merged.
pub const MAX_RANGES: usize = 4096;

/// Page ranges as `(first page, pages)`: compact, as the set travels as
/// one line on the VMM's stdout.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkingSet {
    /// Touched, never written: still the template's page.
    pub read: Vec<(u64, u64)>,
    /// Written: a private copy.
    pub written: Vec<(u64, u64)>,
}

#[derive(Debug, thiserror::Error)]
pub enum WorkingSetError {
    #[error("cannot read {path}: {source}")]
    Read { path: String, source: io::Error },
    #[error("{path} is not a working set: {detail}")]
    Invalid { path: String, detail: String },
}

impl WorkingSet {
    /// From byte ranges, merged down to at most [`MAX_RANGES`] per kind.
    pub fn from_ranges(read: &[PageRange], written: &[PageRange]) -> WorkingSet {
        WorkingSet {
            read: to_pages(read),
            written: to_pages(written),
        }
    }

    pub fn pages(&self) -> u64 {
        self.read.iter().chain(&self.written).map(|r| r.1).sum()
    }

    /// Reads a set from a template directory, checked against its memory
    /// size. `None` if the template has none (an older airlock made it).
    pub fn load(dir: &Path, memory_bytes: u64) -> Result<Option<WorkingSet>, WorkingSetError> {
        let path = dir.join(FILE);
        let shown = path.display().to_string();
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                return Err(WorkingSetError::Read {
                    path: shown,
                    source,
                });
            }
        };
        let set: WorkingSet =
            serde_json::from_str(&text).map_err(|e| WorkingSetError::Invalid {
                path: shown.clone(),
                detail: e.to_string(),
            })?;
        set.check(memory_bytes / PAGE)
            .map_err(|detail| WorkingSetError::Invalid {
                path: shown,
                detail,
            })?;
        Ok(Some(set))
    }

    /// Every range is non-empty and inside guest memory, and the set is
    /// bounded as its maker bounds it.
    pub fn check(&self, memory_pages: u64) -> Result<(), String> {
        for (kind, ranges) in [("read", &self.read), ("written", &self.written)] {
            if ranges.len() > MAX_RANGES {
                return Err(format!(
                    "{} {kind} ranges, at most {MAX_RANGES}",
                    ranges.len()
                ));
            }
            for &(first, pages) in ranges {
                let end = first.checked_add(pages);
                if pages == 0 || end.is_none_or(|end| end > memory_pages) {
                    return Err(format!(
                        "{kind} range of {pages} pages at page {first} is outside {memory_pages} pages of memory"
                    ));
                }
            }
        }
        Ok(())
    }

    /// Byte ranges of each kind, for the VMM to act on.
    pub fn written_bytes(&self) -> impl Iterator<Item = PageRange> + '_ {
        self.written.iter().map(|&r| bytes(r))
    }

    /// Every range, read and written, in guest-physical order.
    pub fn all_bytes(&self) -> Vec<PageRange> {
        let mut all: Vec<PageRange> = self
            .read
            .iter()
            .chain(&self.written)
            .map(|&r| bytes(r))
            .collect();
        all.sort_by_key(|r| r.start);
        all
    }
}

/// What the VMM's restored guest touched so far, from its page map.
pub fn record(mem: &GuestMemory, pagemap: &PageMap) -> Result<WorkingSet, SnapshotError> {
    let (host, len) = super::overlay::region(mem)?;
    let (read, written) = pagemap
        .touched_ranges(host, len)
        .map_err(|e| SnapshotError::Invalid(format!("cannot read the page map: {e}")))?;
    Ok(WorkingSet::from_ranges(&read, &written))
}

/// Tells the kernel guest memory is read at random: no readahead on a
/// fault, so while a set is recorded (with the memory file out of the page
/// cache) a page is present only if it was touched.
pub fn advise_random(mem: &GuestMemory) {
    if let Ok((host, len)) = super::overlay::region(mem) {
        // SAFETY: advice on our own mapping; it changes no contents.
        let rc = unsafe { libc::madvise(host as *mut libc::c_void, len, libc::MADV_RANDOM) };
        if rc != 0 {
            tracing::debug!(err = %io::Error::last_os_error(), "MADV_RANDOM on guest memory");
        }
    }
}

/// KVM_PRE_FAULT_MEMORY (Linux 6.10+): maps guest-physical memory in the
/// vCPU's second-level page tables as if the guest had touched it.
const KVM_CAP_PRE_FAULT_MEMORY: libc::c_ulong = 236;
vmm_sys_util::ioctl_iowr_nr!(
    KVM_PRE_FAULT_MEMORY,
    kvm_bindings::KVMIO,
    0xd5,
    kvm_bindings::kvm_pre_fault_memory
);

/// Whether this KVM can pre-fault guest memory.
pub fn kvm_can_prefault(vm: &kvm_ioctls::VmFd) -> bool {
    vm.check_extension_raw(KVM_CAP_PRE_FAULT_MEMORY) > 0
}

/// Maps `set` before the vCPUs run: written pages are copied now, and with
/// `vcpu` (a KVM that can pre-fault) every page goes into KVM's page
/// tables. Failures only cost the faults they would have saved.
pub fn apply(set: &WorkingSet, mem: &GuestMemory, vcpu: Option<&kvm_ioctls::VcpuFd>) {
    if std::env::var(ENV).is_ok_and(|v| v == "off") {
        return;
    }
    let started = std::time::Instant::now();
    let Ok((host, len)) = super::overlay::region(mem) else {
        return;
    };
    let mut populated = 0;
    for range in set.written_bytes() {
        if range.end() > len as u64 {
            break;
        }
        // SAFETY: the range is inside our guest memory mapping (checked
        // above); populating it changes no contents.
        let rc = unsafe {
            libc::madvise(
                (host + range.start as usize) as *mut libc::c_void,
                range.len as usize,
                libc::MADV_POPULATE_WRITE,
            )
        };
        if rc != 0 {
            tracing::debug!(err = %io::Error::last_os_error(), "MADV_POPULATE_WRITE");
            break;
        }
        populated += range.len / PAGE;
    }
    let mut prefaulted = 0;
    if let Some(vcpu) = vcpu {
        'ranges: for range in set.all_bytes() {
            let mut arg = kvm_bindings::kvm_pre_fault_memory {
                gpa: range.start,
                size: range.len,
                ..Default::default()
            };
            // KVM does part of a range per call and says how much is left.
            while arg.size > 0 {
                // SAFETY: the ioctl reads and updates `arg`, which lives
                // across the call.
                let rc = unsafe {
                    vmm_sys_util::ioctl::ioctl_with_mut_ref(vcpu, KVM_PRE_FAULT_MEMORY(), &mut arg)
                };
                if rc < 0 {
                    let err = io::Error::last_os_error();
                    if matches!(err.raw_os_error(), Some(libc::EINTR | libc::EAGAIN)) {
                        continue;
                    }
                    tracing::warn!(%err, gpa = arg.gpa, "KVM_PRE_FAULT_MEMORY");
                    break 'ranges;
                }
            }
            prefaulted += range.len / PAGE;
        }
    }
    crate::vmm::stats::record_working_set(
        populated,
        prefaulted,
        started.elapsed().as_micros() as u64,
    );
}

fn bytes((first, pages): (u64, u64)) -> PageRange {
    PageRange {
        start: first * PAGE,
        len: pages * PAGE,
    }
}

/// Byte ranges to page ranges; if there are too many, the smallest gaps
/// are closed first (pages in a gap get mapped too: cheap, and harmless).
fn to_pages(ranges: &[PageRange]) -> Vec<(u64, u64)> {
    let mut pages: Vec<(u64, u64)> = ranges
        .iter()
        .filter(|r| r.len > 0)
        .map(|r| (r.start / PAGE, r.len.div_ceil(PAGE)))
        .collect();
    pages.sort_unstable();
    let mut gap = 1u64;
    while pages.len() > MAX_RANGES {
        pages = merge_within(&pages, gap);
        gap *= 2;
    }
    pages
}

/// Merges ranges whose gap is under `gap` pages.
fn merge_within(ranges: &[(u64, u64)], gap: u64) -> Vec<(u64, u64)> {
    let mut merged: Vec<(u64, u64)> = Vec::with_capacity(ranges.len());
    for &(first, pages) in ranges {
        match merged.last_mut() {
            Some(last) if first <= last.0 + last.1 + gap => {
                last.1 = (first + pages).max(last.0 + last.1) - last.0;
            }
            _ => merged.push((first, pages)),
        }
    }
    merged
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(start_page: u64, pages: u64) -> PageRange {
        PageRange {
            start: start_page * PAGE,
            len: pages * PAGE,
        }
    }

    #[test]
    fn ranges_round_trip_and_are_bounded() {
        let set = WorkingSet::from_ranges(&[r(1, 2), r(10, 1)], &[r(4, 1)]);
        assert_eq!(set.read, vec![(1, 2), (10, 1)]);
        assert_eq!(set.written, vec![(4, 1)]);
        assert_eq!(set.pages(), 4);
        assert_eq!(set.all_bytes(), vec![r(1, 2), r(4, 1), r(10, 1)]);
        // Every other page of 20 000: merged down to the bound, covering all.
        let many: Vec<PageRange> = (0..20_000).map(|i| r(i * 2, 1)).collect();
        let set = WorkingSet::from_ranges(&many, &[]);
        assert!(set.read.len() <= MAX_RANGES);
        let covered = |p: u64| set.read.iter().any(|&(f, n)| p >= f && p < f + n);
        assert!((0..20_000).all(|i| covered(i * 2)));
        assert!(set.check(40_000).is_ok());
    }

    #[test]
    fn sets_outside_memory_or_too_large_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        assert!(WorkingSet::load(dir.path(), 1 << 20).unwrap().is_none());
        for bad in [
            r#"{"read":[[250,10]],"written":[]}"#,
            r#"{"read":[],"written":[[3,0]]}"#,
            r#"{"read":[[18446744073709551615,2]],"written":[]}"#,
            r#"{"read":"x"}"#,
        ] {
            std::fs::write(dir.path().join(FILE), bad).unwrap();
            assert!(
                WorkingSet::load(dir.path(), 1 << 20).is_err(),
                "{bad} must be refused"
            );
        }
        let too_many: Vec<(u64, u64)> = (0..=MAX_RANGES as u64).map(|i| (i * 2, 1)).collect();
        let set = WorkingSet {
            read: too_many,
            written: Vec::new(),
        };
        assert!(set.check(1 << 20).is_err());
        std::fs::write(
            dir.path().join(FILE),
            r#"{"read":[[0,256]],"written":[[5,1]]}"#,
        )
        .unwrap();
        let set = WorkingSet::load(dir.path(), 1 << 20).unwrap().unwrap();
        assert_eq!(set.pages(), 257);
    }
}

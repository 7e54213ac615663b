//! KVM's own counters, read through its binary statistics interface
//! (`KVM_GET_STATS_FD`, Linux 5.14+): what the VMM's exit counters cannot
//! see, because KVM handles it without leaving the kernel. The ones kept:
//! guest page faults KVM took and fixed (a restored guest's first touch of
//! each page costs one), and the pages its second-level page tables map.
//!
//! The descriptors are parsed once, when the VM is built; reading later is
//! one `pread` per fd, which the main thread's filter allows.

use std::fs::File;
use std::io;
use std::os::fd::FromRawFd;
use std::os::unix::fs::FileExt;
use std::sync::OnceLock;

/// `_IO(KVMIO, 0xce)`.
const KVM_GET_STATS_FD: libc::c_ulong = 0xaece;
/// Names KVM uses are short; a descriptor claiming more is not believed.
const MAX_NAME_SIZE: u32 = 256;
const MAX_DESCRIPTORS: u32 = 4096;
/// The counters kept, from the VM's fd and each vCPU's.
const VM_FIELDS: [&str; 3] = ["pages_4k", "pages_2m", "pages_1g"];
const VCPU_FIELDS: [&str; 3] = ["pf_taken", "pf_fixed", "exits"];

/// One stats fd and where the kept counters sit in its data block.
struct StatsFd {
    file: File,
    /// (name, byte offset in the file).
    fields: Vec<(&'static str, u64)>,
}

static FDS: OnceLock<Vec<StatsFd>> = OnceLock::new();

/// Opens the stats of the VM and its vCPUs (fds of KVM objects). Missing
/// support leaves the counters empty; it never fails the VM.
pub fn register(vm_fd: i32, vcpu_fds: &[i32]) {
    let mut fds = Vec::new();
    for (fd, names) in std::iter::once((vm_fd, &VM_FIELDS[..]))
        .chain(vcpu_fds.iter().map(|&fd| (fd, &VCPU_FIELDS[..])))
    {
        match open(fd, names) {
            Ok(stats) => fds.push(stats),
            Err(err) => {
                tracing::debug!(%err, "KVM statistics unavailable");
                return;
            }
        }
    }
    let _ = FDS.set(fds);
}

/// The kept counters, summed over the vCPUs; empty without support.
pub fn snapshot() -> std::collections::BTreeMap<String, u64> {
    let mut out = std::collections::BTreeMap::new();
    for stats in FDS.get().map(Vec::as_slice).unwrap_or_default() {
        for (name, offset) in &stats.fields {
            let mut value = [0u8; 8];
            if stats.file.read_exact_at(&mut value, *offset).is_ok() {
                *out.entry(format!("kvm_{name}")).or_insert(0) += u64::from_ne_bytes(value);
            }
        }
    }
    out
}

fn open(object_fd: i32, names: &[&'static str]) -> io::Result<StatsFd> {
    // SAFETY: an ioctl without argument on a KVM object fd; it returns a new fd.
    let fd = unsafe { libc::ioctl(object_fd, KVM_GET_STATS_FD as _, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the fd is fresh and ours.
    let file = unsafe { File::from_raw_fd(fd) };
    let fields = parse(&file, names)?;
    Ok(StatsFd { file, fields })
}

fn u32_at(bytes: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(bytes.get(at..at + 4)?.try_into().ok()?))
}

/// Finds `names` among the descriptors: `struct kvm_stats_header` (six
/// u32s: flags, name_size, num_desc, id_offset, desc_offset, data_offset),
/// then `num_desc` times `struct kvm_stats_desc` (flags u32, exponent i16,
/// size u16, offset u32, bucket_size u32, then name_size bytes of name).
fn parse(file: &File, names: &[&'static str]) -> io::Result<Vec<(&'static str, u64)>> {
    let bad = |what: &str| io::Error::new(io::ErrorKind::InvalidData, what.to_string());
    let mut header = [0u8; 24];
    file.read_exact_at(&mut header, 0)?;
    let field = |i: usize| u32_at(&header, i * 4).ok_or_else(|| bad("short header"));
    let (name_size, count) = (field(1)?, field(2)?);
    let (desc_offset, data_offset) = (u64::from(field(4)?), u64::from(field(5)?));
    if name_size == 0 || name_size > MAX_NAME_SIZE || count > MAX_DESCRIPTORS {
        return Err(bad("implausible stats header"));
    }
    let desc_len = 16 + name_size as usize;
    let mut descs = vec![0u8; desc_len * count as usize];
    file.read_exact_at(&mut descs, desc_offset)?;
    let mut found = Vec::new();
    for desc in descs.chunks_exact(desc_len) {
        let name_bytes = &desc[16..];
        let end = name_bytes
            .iter()
            .position(|&b| b == 0)
            .unwrap_or(name_bytes.len());
        let Ok(name) = std::str::from_utf8(&name_bytes[..end]) else {
            continue;
        };
        let Some(&wanted) = names.iter().find(|&&n| n == name) else {
            continue;
        };
        let offset = u32_at(desc, 8).ok_or_else(|| bad("short descriptor"))?;
        found.push((wanted, data_offset + u64::from(offset)));
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// A stats file laid out as KVM's: header, descriptors, data.
    fn stats_file(names: &[&str], values: &[u64], name_size: u32) -> File {
        let desc_offset = 24u32;
        let desc_len = 16 + name_size;
        let data_offset = desc_offset + desc_len * names.len() as u32;
        let mut bytes = Vec::new();
        for v in [
            0,
            name_size,
            names.len() as u32,
            0,
            desc_offset,
            data_offset,
        ] {
            bytes.extend_from_slice(&v.to_ne_bytes());
        }
        for (i, name) in names.iter().enumerate() {
            bytes.extend_from_slice(&0u32.to_ne_bytes());
            bytes.extend_from_slice(&0i16.to_ne_bytes());
            bytes.extend_from_slice(&1u16.to_ne_bytes());
            bytes.extend_from_slice(&(i as u32 * 8).to_ne_bytes());
            bytes.extend_from_slice(&0u32.to_ne_bytes());
            let mut field = name.as_bytes().to_vec();
            field.resize(name_size as usize, 0);
            bytes.extend_from_slice(&field);
        }
        for v in values {
            bytes.extend_from_slice(&v.to_ne_bytes());
        }
        let mut file = tempfile::tempfile().unwrap();
        file.write_all(&bytes).unwrap();
        file
    }

    #[test]
    fn the_kept_counters_are_found_and_read() {
        let file = stats_file(&["exits", "halt_exits", "pf_taken"], &[7, 9, 42], 48);
        let fields = parse(&file, &VCPU_FIELDS).unwrap();
        let read = |name: &str| {
            let (_, offset) = fields.iter().find(|(n, _)| *n == name).unwrap();
            let mut v = [0u8; 8];
            file.read_exact_at(&mut v, *offset).unwrap();
            u64::from_ne_bytes(v)
        };
        assert_eq!(read("exits"), 7);
        assert_eq!(read("pf_taken"), 42);
        assert_eq!(fields.len(), 2, "pf_fixed is absent, halt_exits not kept");
    }

    #[test]
    fn implausible_headers_are_refused() {
        let file = stats_file(&["exits"], &[1], 0);
        assert!(parse(&file, &VCPU_FIELDS).is_err());
        let file = stats_file(&["exits"], &[1], MAX_NAME_SIZE + 1);
        assert!(parse(&file, &VCPU_FIELDS).is_err());
        // Descriptors past the end of the file.
        let mut short = tempfile::tempfile().unwrap();
        for v in [0u32, 48, 100, 0, 24, 9999] {
            short.write_all(&v.to_ne_bytes()).unwrap();
        }
        assert!(parse(&short, &VCPU_FIELDS).is_err());
    }
}

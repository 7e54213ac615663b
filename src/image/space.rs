//! Refusing a build early, with the numbers, when the cache's filesystem
//! cannot hold it: a build that runs out of space half-way fails on some
//! unrelated write after minutes of work.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use anyhow::{Context, Result, bail};

/// The most an image build writes at once: the base tree, the packed ext4
/// and the copy being published, with slack for packages.
pub const IMAGE_BUILD_BYTES: u64 = 4 << 30;

/// Bytes an unprivileged user may still write on `path`'s filesystem.
pub fn free_bytes(path: &Path) -> Result<u64> {
    let c_path = CString::new(path.as_os_str().as_bytes())
        .with_context(|| format!("{} has a NUL byte", path.display()))?;
    // SAFETY: statvfs fills a struct we own from a NUL-terminated path.
    let mut stat: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(c_path.as_ptr(), &mut stat) } != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("cannot read the free space of {}", path.display()));
    }
    Ok(stat.f_bavail.saturating_mul(stat.f_frsize))
}

/// Fails with what is needed, what is free and what to do, if `cache`'s
/// filesystem has less than `needed` bytes free.
pub fn ensure_free(cache: &Path, needed: u64, what: &str) -> Result<()> {
    let free = free_bytes(cache)?;
    if free < needed {
        bail!(
            "{what} needs about {} free in {}, and its filesystem has {} free: free some space \
             (`airlock image list` shows the cache's images; `airlock image prune` removes older \
             builds, `airlock image remove NAME` an image)",
            gib(needed),
            cache.display(),
            gib(free)
        );
    }
    Ok(())
}

fn gib(bytes: u64) -> String {
    format!("{:.1} GiB", bytes as f64 / f64::from(1u32 << 30))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_need_beyond_the_free_space_is_refused_with_both_numbers() {
        let dir = tempfile::tempdir().unwrap();
        let free = free_bytes(dir.path()).unwrap();
        assert!(free > 0);
        ensure_free(dir.path(), 1, "a tiny build").unwrap();
        let err = format!(
            "{:#}",
            ensure_free(dir.path(), u64::MAX, "this build").unwrap_err()
        );
        assert!(err.contains("this build needs about"), "{err}");
        assert!(err.contains("airlock image prune"), "{err}");
    }
}

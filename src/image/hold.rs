//! A running user's claim on an image. Whoever restores sandboxes from an
//! image (a server's pool, a template being made, a benchmark) holds a
//! shared lock on its manifest; a prune removes only images whose manifest
//! it can lock exclusively, so it never takes files from under a VM.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use anyhow::{Context, Result, bail};

use super::Image;

const MANIFEST: &str = "manifest.json";

/// Held while the image is in use; the kernel drops the lock when the
/// process ends, however it ends.
#[derive(Debug)]
pub struct ImageHold {
    _manifest: File,
}

impl ImageHold {
    pub fn acquire(image: &Image) -> Result<ImageHold> {
        let path = image.dir.join(MANIFEST);
        let gone = || {
            format!(
                "the image {} ({}) is no longer in the cache (removed by `airlock image prune` or `image remove`); start again to build it",
                image.name(),
                image.manifest.recipe_hash
            )
        };
        let file = File::open(&path).with_context(gone)?;
        // Waits only while a prune is deciding about this image.
        // SAFETY: flock on a file descriptor we own.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_SH) } != 0 {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("cannot lock {}", path.display()));
        }
        // A prune that won the race unlinked the file we now hold.
        let held = file
            .metadata()
            .with_context(|| format!("cannot stat {}", path.display()))?;
        let linked = std::fs::metadata(&path)
            .is_ok_and(|now| now.dev() == held.dev() && now.ino() == held.ino());
        if !linked {
            bail!(gone());
        }
        Ok(ImageHold { _manifest: file })
    }
}

/// An exclusive claim a prune holds while it removes an image: None if some
/// process holds the image (or the manifest is unreadable: then the image
/// directory is not one this airlock made, and the caller decides).
pub(super) fn claim_unused(dir: &Path) -> Option<File> {
    let file = File::open(dir.join(MANIFEST)).ok()?;
    // SAFETY: flock on a file descriptor we own.
    let locked = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0;
    locked.then_some(file)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_held_image_cannot_be_claimed_and_a_released_one_can() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(MANIFEST), "{}").unwrap();
        let image = crate::image::tests::fake_image(dir.path());
        let hold = ImageHold::acquire(&image).unwrap();
        assert!(claim_unused(dir.path()).is_none());
        drop(hold);
        let claim = claim_unused(dir.path()).expect("free once released");
        // A second claim fails while the first is held.
        assert!(claim_unused(dir.path()).is_none());
        drop(claim);
    }

    #[test]
    fn a_hold_on_a_removed_image_is_refused_with_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let image_dir = dir.path().join("img");
        std::fs::create_dir(&image_dir).unwrap();
        std::fs::write(image_dir.join(MANIFEST), "{}").unwrap();
        let image = crate::image::tests::fake_image(&image_dir);
        std::fs::remove_dir_all(&image_dir).unwrap();
        let err = format!("{:#}", ImageHold::acquire(&image).unwrap_err());
        assert!(err.contains("no longer in the cache"), "{err}");
    }
}

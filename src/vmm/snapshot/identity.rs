//! Which image a snapshot belongs to. A restore against another kernel or
//! root filesystem would run the saved kernel on a disk it does not know, so
//! it is refused.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::{SnapshotError, io_error};

/// Blocks sampled from each file. A rootfs's first block holds the ext4
/// superblock with a UUID that mkfs makes random, so two builds never match;
/// a kernel differs in its first blocks (headers, build banner) too.
const SAMPLES: u64 = 64;
const SAMPLE_BYTES: usize = 4096;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ImageIdentity {
    /// The image's recipe hash (its directory name), when known.
    pub recipe_hash: String,
    /// SHA-256 over the size and sampled blocks of each file: cheap enough
    /// for every restore, unlike hashing a GiB.
    pub kernel_fingerprint: String,
    pub rootfs_fingerprint: String,
}

impl ImageIdentity {
    pub fn of(kernel: &Path, rootfs: &Path) -> Result<ImageIdentity, SnapshotError> {
        Ok(ImageIdentity {
            recipe_hash: recipe_hash_of(rootfs),
            kernel_fingerprint: fingerprint(kernel)?,
            rootfs_fingerprint: fingerprint(rootfs)?,
        })
    }

    /// Refuses a restore onto a different image.
    pub fn check_matches(&self, actual: &ImageIdentity) -> Result<(), SnapshotError> {
        if self.kernel_fingerprint != actual.kernel_fingerprint
            || self.rootfs_fingerprint != actual.rootfs_fingerprint
        {
            return Err(SnapshotError::WrongImage {
                expected: self.describe(),
                found: actual.describe(),
            });
        }
        Ok(())
    }

    fn describe(&self) -> String {
        let short = |s: &str| s.chars().take(12).collect::<String>();
        if self.recipe_hash.is_empty() {
            format!(
                "kernel {} rootfs {}",
                short(&self.kernel_fingerprint),
                short(&self.rootfs_fingerprint)
            )
        } else {
            format!(
                "{} (kernel {}, rootfs {})",
                self.recipe_hash,
                short(&self.kernel_fingerprint),
                short(&self.rootfs_fingerprint)
            )
        }
    }
}

/// An image directory is named by its recipe hash and has a manifest.
fn recipe_hash_of(rootfs: &Path) -> String {
    rootfs
        .parent()
        .filter(|dir| dir.join("manifest.json").is_file())
        .and_then(|dir| dir.file_name())
        .map(|name| name.to_string_lossy().into_owned())
        .unwrap_or_default()
}

pub fn fingerprint(path: &Path) -> Result<String, SnapshotError> {
    let file = File::open(path).map_err(io_error("open", path))?;
    let len = file.metadata().map_err(io_error("stat", path))?.len();
    let mut hasher = Sha256::new();
    hasher.update(len.to_le_bytes());
    let mut block = vec![0u8; SAMPLE_BYTES];
    for i in 0..SAMPLES {
        let offset = (len / SAMPLES) * i;
        let n = file
            .read_at(&mut block, offset)
            .map_err(io_error("read", path))?;
        hasher.update(&block[..n]);
    }
    Ok(hex(&hasher.finalize()))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_changed_rootfs_or_kernel_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (kernel, rootfs) = (dir.path().join("vmlinux"), dir.path().join("rootfs.ext4"));
        std::fs::write(&kernel, b"kernel").unwrap();
        std::fs::write(&rootfs, vec![7u8; 1 << 20]).unwrap();
        let saved = ImageIdentity::of(&kernel, &rootfs).unwrap();
        saved
            .check_matches(&ImageIdentity::of(&kernel, &rootfs).unwrap())
            .unwrap();

        let mut other = vec![7u8; 1 << 20];
        other[1024] = 1; // a different superblock
        std::fs::write(&rootfs, other).unwrap();
        let err = saved
            .check_matches(&ImageIdentity::of(&kernel, &rootfs).unwrap())
            .unwrap_err();
        assert!(err.to_string().contains("recreate the template"), "{err}");

        std::fs::write(&rootfs, vec![7u8; 1 << 20]).unwrap();
        std::fs::write(&kernel, b"kernel2").unwrap();
        assert!(
            saved
                .check_matches(&ImageIdentity::of(&kernel, &rootfs).unwrap())
                .is_err()
        );
    }
}

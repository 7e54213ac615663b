//! Sealing what airlock made, so that a changed file is refused before a VM
//! maps it.
//!
//! A seal (`seal.json` beside the files) lists each file with its size, a
//! SHA-256 of its content (for the template's own files) and its stamp
//! (inode, size, mtime, ctime), under an HMAC keyed by a secret only the
//! gateway's user can read (`seal.key` in the cache). Sealed files are made
//! read-only and owned by the gateway's user.
//!
//! Checking is cheap where it runs often: a load compares each stamp with
//! the file (any write changes ctime, which no one but the clock sets), and
//! reads the content again only when a stamp differs (a backup restored,
//! say), and then writes the seal again with the new stamps; a restore
//! compares the stamps only.
//!
//! Files outside the directory (the image's) carry a digest too when they
//! are small (the kernel): an older airlock hard-linked one kernel into
//! every image, and each new link moved the shared inode's ctime.

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

pub const SEAL_FILE: &str = "seal.json";
const KEY_FILE: &str = "seal.key";
const KEY_BYTES: usize = 32;
/// Version 2 digests the small files outside the directory; a seal of an
/// older version is reported as [`SealError::Outdated`].
const VERSION: u32 = 2;
/// Outside files up to this size are digested (the kernel, not the rootfs:
/// reading that again at each load would take seconds).
const OUTSIDE_DIGEST_LIMIT: u64 = 64 << 20;

#[derive(Debug, thiserror::Error)]
pub enum SealError {
    #[error("cannot {what} {path}: {source}")]
    Io {
        what: &'static str,
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0} has no valid seal: {1}")]
    Unsealed(String, String),
    #[error("{0} was sealed by an older airlock (seal version {1})")]
    Outdated(String, u32),
    #[error(
        "{path} changed after it was sealed ({why}); it was damaged or tampered with, so it is \
         refused. Remove {dir} and recreate it (airlock snapshot create)"
    )]
    Changed {
        path: String,
        dir: String,
        why: String,
    },
    #[error("{path} is writable by others (mode {mode:o}); a sealed file must not be")]
    Writable { path: String, mode: u32 },
}

fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> SealError {
    let path = path.display().to_string();
    move |source| SealError::Io { what, path, source }
}

/// What a change to a file shows in its metadata.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stamp {
    pub ino: u64,
    pub size: u64,
    pub mtime_ns: i128,
    pub ctime_ns: i128,
}

impl Stamp {
    fn of(meta: &std::fs::Metadata) -> Stamp {
        let ns = |s: i64, n: i64| i128::from(s) * 1_000_000_000 + i128::from(n);
        Stamp {
            ino: meta.ino(),
            size: meta.size(),
            mtime_ns: ns(meta.mtime(), meta.mtime_nsec()),
            ctime_ns: ns(meta.ctime(), meta.ctime_nsec()),
        }
    }

    fn read(path: &Path) -> Result<Stamp, SealError> {
        Ok(Stamp::of(
            &std::fs::metadata(path).map_err(io("stat", path))?,
        ))
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Entry {
    /// A name in the sealed directory, or an absolute path outside it.
    path: PathBuf,
    stamp: Stamp,
    /// Hex SHA-256 of the content; none for files too big to read at each
    /// load (the image's rootfs), which are checked by their stamp alone.
    sha256: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct SealFile {
    version: u32,
    entries: Vec<Entry>,
    /// Hex HMAC-SHA256 of `entries` as serialized here.
    mac: String,
}

/// A verified seal: what each file looked like when it was checked.
#[derive(Debug, Clone)]
pub struct Sealed {
    dir: PathBuf,
    stamps: Vec<(PathBuf, Stamp)>,
}

impl Sealed {
    /// Refuses a file that changed since the seal was verified.
    pub fn check_unchanged(&self) -> Result<(), SealError> {
        for (path, stamp) in &self.stamps {
            let now = Stamp::read(path)?;
            if now != *stamp {
                return Err(self.changed(path, describe_change(stamp, &now)));
            }
        }
        Ok(())
    }

    fn changed(&self, path: &Path, why: String) -> SealError {
        SealError::Changed {
            path: path.display().to_string(),
            dir: self.dir.display().to_string(),
            why,
        }
    }
}

fn describe_change(before: &Stamp, now: &Stamp) -> String {
    if before.size != now.size {
        format!("its size went from {} to {} bytes", before.size, now.size)
    } else if before.ino != now.ino {
        "it was replaced by another file".into()
    } else {
        "it was written to or its metadata changed".into()
    }
}

/// The gateway's sealing key, made on first use (readable by its user only).
pub fn key(cache: &Path) -> Result<[u8; KEY_BYTES], SealError> {
    let path = cache.join(KEY_FILE);
    match std::fs::read(&path) {
        Ok(bytes) if bytes.len() == KEY_BYTES => {
            let mut key = [0; KEY_BYTES];
            key.copy_from_slice(&bytes);
            return Ok(key);
        }
        Ok(_) => {
            return Err(SealError::Unsealed(
                path.display().to_string(),
                "the key file has the wrong size".into(),
            ));
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io("read", &path)(e)),
    }
    let mut key = [0u8; KEY_BYTES];
    if !crate::vmm::devices::virtio::rng::fill_random(&mut key) {
        return Err(SealError::Unsealed(
            path.display().to_string(),
            "the host has no entropy for a key".into(),
        ));
    }
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = cache.join(format!("{KEY_FILE}.{}", std::process::id()));
    let mut file = File::options()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io("create", &tmp))?;
    file.write_all(&key).map_err(io("write", &tmp))?;
    file.sync_all().map_err(io("sync", &tmp))?;
    // Two processes racing here: the first key to land wins, and both use it.
    let linked = std::fs::hard_link(&tmp, &path);
    let _ = std::fs::remove_file(&tmp);
    match linked {
        Ok(()) => Ok(key),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => self::key(cache),
        Err(e) => Err(io("create", &path)(e)),
    }
}

/// Seals `names` in `dir` (their content is digested) and `outside` (stamps
/// only): makes them read-only and the gateway user's, then writes the seal.
pub fn seal(
    dir: &Path,
    names: &[&str],
    outside: &[&Path],
    key: &[u8; KEY_BYTES],
) -> Result<(), SealError> {
    let mut entries = Vec::new();
    for name in names {
        let path = dir.join(name);
        make_read_only(&path)?;
        entries.push(Entry {
            path: PathBuf::from(name),
            stamp: Stamp::read(&path)?,
            sha256: Some(digest(&path)?),
        });
    }
    for path in outside {
        make_read_only(path)?;
        let stamp = Stamp::read(path)?;
        let sha256 = if stamp.size <= OUTSIDE_DIGEST_LIMIT {
            Some(digest(path)?)
        } else {
            None
        };
        entries.push(Entry {
            path: path.to_path_buf(),
            stamp,
            sha256,
        });
    }
    write_seal(dir, entries, key)
}

/// Writes the seal beside the files: to a temporary name first, so that a
/// reader sees the old seal or the new one, never half of one.
fn write_seal(dir: &Path, entries: Vec<Entry>, key: &[u8; KEY_BYTES]) -> Result<(), SealError> {
    let body = serde_json::to_string(&entries)
        .map_err(|e| SealError::Unsealed(dir.display().to_string(), e.to_string()))?;
    let seal = SealFile {
        version: VERSION,
        entries,
        mac: hex(&hmac(key, body.as_bytes())),
    };
    let text = serde_json::to_string_pretty(&seal)
        .map_err(|e| SealError::Unsealed(dir.display().to_string(), e.to_string()))?;
    let path = dir.join(SEAL_FILE);
    let tmp = dir.join(format!("{SEAL_FILE}.{}", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    std::fs::write(&tmp, text + "\n").map_err(io("write", &tmp))?;
    make_read_only(&tmp)?;
    std::fs::rename(&tmp, &path).map_err(io("rename", &path))
}

/// Checks the seal of `dir`: its MAC, then each file's stamp, reading a
/// file's content again only when its stamp moved.
pub fn verify(dir: &Path, key: &[u8; KEY_BYTES]) -> Result<Sealed, SealError> {
    let unsealed = |why: String| SealError::Unsealed(dir.display().to_string(), why);
    let path = dir.join(SEAL_FILE);
    let text = std::fs::read_to_string(&path).map_err(|e| unsealed(format!("{SEAL_FILE}: {e}")))?;
    let seal: SealFile = serde_json::from_str(&text).map_err(|e| unsealed(e.to_string()))?;
    if seal.version < VERSION {
        return Err(SealError::Outdated(dir.display().to_string(), seal.version));
    }
    if seal.version != VERSION {
        return Err(unsealed(format!("seal version {}", seal.version)));
    }
    let body = serde_json::to_string(&seal.entries).map_err(|e| unsealed(e.to_string()))?;
    if !equal_in_constant_time(&hex(&hmac(key, body.as_bytes())), &seal.mac) {
        return Err(unsealed(
            "the seal's MAC does not match (edited, or sealed with another key)".into(),
        ));
    }
    let mut sealed = Sealed {
        dir: dir.to_path_buf(),
        stamps: Vec::new(),
    };
    let mut moved = false;
    let mut entries = seal.entries;
    for entry in &mut entries {
        let path = if entry.path.is_absolute() {
            entry.path.clone()
        } else {
            dir.join(&entry.path)
        };
        check_not_writable(&path)?;
        let now = Stamp::read(&path)?;
        if now != entry.stamp {
            let same_content = match &entry.sha256 {
                Some(sum) => now.size == entry.stamp.size && digest(&path)? == *sum,
                None => false,
            };
            if !same_content {
                return Err(sealed.changed(&path, describe_change(&entry.stamp, &now)));
            }
            tracing::info!(path = %path.display(), "sealed file moved or was copied; its content still matches");
            entry.stamp = now;
            moved = true;
        }
        sealed.stamps.push((path, now));
    }
    if moved {
        // The next load need not read the content again. A seal that cannot
        // be written (a read-only cache) still verified.
        if let Err(e) = write_seal(dir, entries, key) {
            tracing::warn!(dir = %dir.display(), error = %e, "cannot record the moved stamps in the seal");
        }
    }
    Ok(sealed)
}

fn make_read_only(path: &Path) -> Result<(), SealError> {
    // Files a jailed VMM wrote are its uid's: give them to the gateway's user.
    // SAFETY: geteuid/getegid cannot fail.
    let (uid, gid) = unsafe { (libc::geteuid(), libc::getegid()) };
    let meta = std::fs::metadata(path).map_err(io("stat", path))?;
    if trusted_root_file(&meta, uid) {
        // An image built by root (`sudo airlock image build`) for a gateway
        // that runs as a user: that user can neither chown nor chmod it,
        // and needs not, as only root can write it.
        return check_not_writable(path);
    }
    if meta.uid() != uid {
        std::os::unix::fs::chown(path, Some(uid), Some(gid)).map_err(io("chown", path))?;
    }
    let mode = meta.mode() & 0o555 | 0o444;
    // A chmod changes the inode's ctime even when the mode stays. The image's
    // kernel and rootfs are sealed by every template made from them (and the
    // kernel is one inode shared by the images that use it), so touching them
    // again would break the seals of the templates made before.
    if meta.mode() & 0o7777 == mode {
        return Ok(());
    }
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(io("make read-only", path))
}

/// A file of root's, seen by a gateway that is not root.
fn trusted_root_file(meta: &std::fs::Metadata, uid: u32) -> bool {
    meta.uid() == 0 && uid != 0
}

/// Refuses a file that someone other than its trusted owner could write:
/// the gateway's own sealed files carry no write bit at all; root's may
/// carry root's own.
fn check_not_writable(path: &Path) -> Result<(), SealError> {
    let meta = std::fs::metadata(path).map_err(io("stat", path))?;
    // SAFETY: geteuid cannot fail.
    let uid = unsafe { libc::geteuid() };
    let forbidden = if trusted_root_file(&meta, uid) {
        0o022
    } else {
        0o222
    };
    let mode = meta.mode();
    if mode & forbidden != 0 {
        return Err(SealError::Writable {
            path: path.display().to_string(),
            mode: mode & 0o7777,
        });
    }
    Ok(())
}

/// SHA-256 of the file's non-zero pages with their offsets, and its size:
/// the same for a sparse file and a full copy of it, and quick on a memory
/// file that is mostly holes (SEEK_DATA skips them).
fn digest(path: &Path) -> Result<String, SealError> {
    const PAGE: usize = 4096;
    let mut file = File::open(path).map_err(io("open", path))?;
    let len = file.metadata().map_err(io("stat", path))?.len();
    let mut hasher = Sha256::new();
    hasher.update(len.to_le_bytes());
    let mut buf = vec![0u8; 1 << 20];
    let mut offset = 0u64;
    while offset < len {
        let Some((start, end)) = next_data(&file, offset, len) else {
            break;
        };
        // Whole pages, so that page offsets line up however extents fall.
        let start = start - start % PAGE as u64;
        use std::io::Seek;
        file.seek(std::io::SeekFrom::Start(start))
            .map_err(io("seek", path))?;
        let mut at = start;
        while at < end {
            let want = usize::try_from((end - at).min(buf.len() as u64)).unwrap_or(buf.len());
            let want = want.div_ceil(PAGE) * PAGE;
            let n = read_full(&mut file, &mut buf[..want]).map_err(io("read", path))?;
            if n == 0 {
                break;
            }
            for (i, page) in buf[..n].chunks(PAGE).enumerate() {
                if page.iter().any(|b| *b != 0) {
                    hasher.update((at + (i * PAGE) as u64).to_le_bytes());
                    hasher.update(page);
                }
            }
            at += n as u64;
        }
        offset = at.max(end);
    }
    Ok(hex(&hasher.finalize()))
}

fn read_full(file: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match file.read(&mut buf[filled..])? {
            0 => break,
            n => filled += n,
        }
    }
    Ok(filled)
}

/// The next data extent at or after `offset`, by SEEK_DATA/SEEK_HOLE (a
/// filesystem without them reports the whole file as data).
fn next_data(file: &File, offset: u64, len: u64) -> Option<(u64, u64)> {
    use std::os::fd::AsRawFd;
    let fd = file.as_raw_fd();
    let at = i64::try_from(offset).ok()?;
    // SAFETY: lseek on our own fd.
    let start = unsafe { libc::lseek(fd, at, libc::SEEK_DATA) };
    if start < 0 {
        // ENXIO: no data past offset.
        return None;
    }
    // SAFETY: as above.
    let end = unsafe { libc::lseek(fd, start, libc::SEEK_HOLE) };
    let end = if end < 0 { len } else { (end as u64).min(len) };
    Some((start as u64, end))
}

/// HMAC-SHA256 (RFC 2104) with a key shorter than the block.
fn hmac(key: &[u8; KEY_BYTES], message: &[u8]) -> [u8; 32] {
    let mut block = [0u8; 64];
    block[..KEY_BYTES].copy_from_slice(key);
    let pad = |byte: u8| block.map(|k| k ^ byte);
    let inner = Sha256::new()
        .chain_update(pad(0x36))
        .chain_update(message)
        .finalize();
    Sha256::new()
        .chain_update(pad(0x5c))
        .chain_update(inner)
        .finalize()
        .into()
}

fn equal_in_constant_time(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hmac_matches_pythons() {
        // python3 -c "import hmac,hashlib; print(hmac.new(b'\x0b'*32, b'Hi There', hashlib.sha256).hexdigest())"
        let key = [0x0bu8; 32];
        let mac = hex(&hmac(&key, b"Hi There"));
        assert_eq!(
            mac,
            "198a607eb44bfbc69903a0f1cf2bbdc5ba0aa3f3d9ae3c1c7a3b1696a0b68cf7"
        );
    }

    #[test]
    fn sealing_a_second_template_of_one_image_keeps_the_first_sealed() {
        let cache = tempfile::tempdir().unwrap();
        let key = key(cache.path()).unwrap();
        let image = tempfile::tempdir().unwrap();
        let kernel = image.path().join("vmlinux");
        std::fs::write(&kernel, b"kernel").unwrap();
        let [first, second] = [(); 2].map(|()| tempfile::tempdir().unwrap());
        for dir in [&first, &second] {
            std::fs::write(dir.path().join("state.json"), b"{}").unwrap();
            seal(dir.path(), &["state.json"], &[&kernel], &key).unwrap();
        }
        verify(first.path(), &key).expect("the second seal left the shared kernel untouched");
    }

    #[test]
    fn a_new_link_to_the_kernel_keeps_the_seal_and_is_restamped() {
        let cache = tempfile::tempdir().unwrap();
        let key = key(cache.path()).unwrap();
        let image = tempfile::tempdir().unwrap();
        let kernel = image.path().join("vmlinux");
        std::fs::write(&kernel, b"kernel").unwrap();
        // A rootfs too big to digest at each load: sparse, so cheap here.
        let rootfs = image.path().join("rootfs.ext4");
        File::create(&rootfs)
            .unwrap()
            .set_len(OUTSIDE_DIGEST_LIMIT + 4096)
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("state.json"), b"{}").unwrap();
        seal(dir.path(), &["state.json"], &[&kernel, &rootfs], &key).unwrap();

        // An older airlock's image build linked the kernel: its ctime moves.
        std::thread::sleep(std::time::Duration::from_millis(20));
        std::fs::hard_link(&kernel, image.path().join("another-image-vmlinux")).unwrap();
        let before = std::fs::read_to_string(dir.path().join(SEAL_FILE)).unwrap();
        let sealed = verify(dir.path(), &key).expect("same content, so still sealed");
        sealed.check_unchanged().unwrap();
        let after = std::fs::read_to_string(dir.path().join(SEAL_FILE)).unwrap();
        assert_ne!(before, after, "the moved stamp is recorded");
        verify(dir.path(), &key).unwrap();

        // The rootfs carries no digest: a moved stamp is refused.
        std::thread::sleep(std::time::Duration::from_millis(20));
        std::fs::hard_link(&rootfs, image.path().join("another-rootfs")).unwrap();
        let err = verify(dir.path(), &key).unwrap_err().to_string();
        assert!(
            err.contains("rootfs.ext4 changed after it was sealed"),
            "{err}"
        );
    }

    #[test]
    fn a_seal_of_an_older_version_is_outdated_not_tampered() {
        let cache = tempfile::tempdir().unwrap();
        let key = key(cache.path()).unwrap();
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("state.json"), b"{}").unwrap();
        seal(dir.path(), &["state.json"], &[], &key).unwrap();
        let path = dir.path().join(SEAL_FILE);
        let mut old: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        old["version"] = 1.into();
        std::fs::remove_file(&path).unwrap();
        std::fs::write(&path, old.to_string()).unwrap();
        assert!(matches!(
            verify(dir.path(), &key),
            Err(SealError::Outdated(_, 1))
        ));
        old["version"] = (VERSION + 1).into();
        std::fs::write(&path, old.to_string()).unwrap();
        assert!(matches!(
            verify(dir.path(), &key),
            Err(SealError::Unsealed(..))
        ));
    }

    #[test]
    fn a_sealed_directory_refuses_changes_and_accepts_copies() {
        let cache = tempfile::tempdir().unwrap();
        let key = key(cache.path()).unwrap();
        assert_eq!(self::key(cache.path()).unwrap(), key, "the key is kept");
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("state.json"), b"{\"a\":1}").unwrap();
        let memory = dir.path().join("memory");
        let file = File::create(&memory).unwrap();
        file.set_len(1 << 20).unwrap();
        use std::os::unix::fs::FileExt;
        file.write_all_at(b"guest", 4096).unwrap();
        drop(file);
        let image = dir.path().join("outside.img");
        std::fs::write(&image, b"rootfs").unwrap();

        seal(dir.path(), &["state.json", "memory"], &[&image], &key).unwrap();
        let sealed = verify(dir.path(), &key).unwrap();
        sealed.check_unchanged().unwrap();
        assert!(std::fs::metadata(&memory).unwrap().permissions().readonly());

        // Another key does not verify.
        assert!(matches!(
            verify(dir.path(), &[1; 32]),
            Err(SealError::Unsealed(..))
        ));

        // A copy (new inode, same content) is accepted on load.
        let copy = dir.path().join("copy");
        std::fs::copy(&memory, &copy).unwrap();
        std::fs::remove_file(&memory).unwrap();
        std::fs::rename(&copy, &memory).unwrap();
        std::fs::set_permissions(&memory, std::fs::Permissions::from_mode(0o444)).unwrap();
        assert!(sealed.check_unchanged().is_err(), "a restore sees the swap");
        verify(dir.path(), &key).unwrap();

        // A rewrite of the same size is refused, with the reason.
        std::fs::set_permissions(&memory, std::fs::Permissions::from_mode(0o644)).unwrap();
        let file = File::options().write(true).open(&memory).unwrap();
        file.write_all_at(b"BACKD", 4096).unwrap();
        drop(file);
        let err = verify(dir.path(), &key).unwrap_err();
        assert!(matches!(err, SealError::Writable { .. }), "{err}");
        std::fs::set_permissions(&memory, std::fs::Permissions::from_mode(0o444)).unwrap();
        let err = verify(dir.path(), &key).unwrap_err().to_string();
        assert!(err.contains("changed after it was sealed"), "{err}");
        assert!(err.contains("recreate"), "{err}");
    }
}

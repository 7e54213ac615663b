//! Applying a layer's tar to the tree, with whiteouts, as overlayfs would
//! show the stacked layers.
//!
//! The tar is untrusted. Entry paths with `..` or a leading `/` are refused.
//! Directories on the way to an entry are resolved component by component
//! inside the tree, as a chroot at its root would (a symlink's `..` stops at
//! the root, an absolute target restarts from it), so a symlink that an
//! earlier entry planted never leads a write outside. The entry's own name
//! is never followed: what is there is removed first, then created anew with
//! `O_EXCL`/`O_NOFOLLOW`.

use std::collections::{HashSet, VecDeque};
use std::ffi::{CString, OsStr};
use std::fs::{self, DirBuilder, File, OpenOptions, Permissions};
use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use super::blob::{Capped, stream_cap};
use super::tarwalk::{Meta, Walker};
use super::{Limits, OciError};

/// As Linux's limit on symlinks followed in one lookup.
const MAX_HOPS: u32 = 40;
const WHITEOUT: &[u8] = b".wh.";
/// `.wh..wh..opq` less the `.wh.` prefix.
const OPAQUE: &[u8] = b".wh..opq";

/// Applies layers in order, keeping the counts that Limits bound.
pub(super) struct Applier<'a> {
    root: &'a Path,
    limits: &'a Limits,
    pub files: u64,
    pub bytes: u64,
    entries: u64,
    /// Ownership and file capabilities need root; without it (tests run by
    /// a user) the files are the caller's.
    as_root: bool,
    buf: Vec<u8>,
}

/// What one layer has done so far.
#[derive(Default)]
struct LayerState {
    /// Paths (relative to the root) this layer wrote or went through: an
    /// opaque directory keeps these and drops what lower layers left, and a
    /// whiteout spares them, whichever comes first in the tar.
    touched: HashSet<PathBuf>,
    /// Directory modes and mtimes, set when the layer is done: writing into
    /// a directory changes its mtime, and a read-only mode would stop a
    /// non-root writer.
    dirs: Vec<(PathBuf, u32, i64)>,
    skipped_devices: u64,
}

impl<'a> Applier<'a> {
    pub(super) fn new(root: &'a Path, limits: &'a Limits) -> Self {
        Applier {
            root,
            limits,
            files: 0,
            bytes: 0,
            entries: 0,
            // SAFETY: geteuid has no preconditions.
            as_root: unsafe { libc::geteuid() } == 0,
            buf: vec![0; 1 << 18],
        }
    }

    /// Applies one layer's (decompressed) tar; returns how many device
    /// nodes were skipped.
    pub(super) fn apply(
        &mut self,
        index: usize,
        digest: &str,
        reader: impl Read,
    ) -> Result<u64, OciError> {
        let layer_err = |reason: String| OciError::Layer {
            index,
            digest: digest.to_owned(),
            reason,
        };
        let capped = Capped::new(reader, stream_cap(self.limits), "the layer's tar stream");
        let mut archive = tar::Archive::new(capped);
        let entries = archive
            .entries()
            .map_err(|e| layer_err(format!("not a valid tar: {e}")))?;
        let mut walker = Walker::new(entries);
        let mut state = LayerState::default();
        while let Some((mut entry, meta)) = walker.next_entry().map_err(layer_err)? {
            self.entries += 1;
            if self.entries > self.limits.max_entries {
                return Err(layer_err(format!(
                    "the layers hold more than {} entries, the limit",
                    self.limits.max_entries
                )));
            }
            self.apply_entry(&mut entry, &meta, &mut state)
                .map_err(|reason| OciError::Entry {
                    index,
                    digest: digest.to_owned(),
                    entry: String::from_utf8_lossy(&meta.path).into_owned(),
                    reason,
                })?;
        }
        for (rel, mode, mtime) in &state.dirs {
            self.finish_dir(rel, *mode, *mtime)
                .map_err(|e| layer_err(format!("cannot set the mode of {}: {e}", rel.display())))?;
        }
        Ok(state.skipped_devices)
    }

    fn apply_entry<R: Read>(
        &mut self,
        entry: &mut tar::Entry<'_, R>,
        meta: &Meta,
        st: &mut LayerState,
    ) -> Result<(), String> {
        let comps = split_path(&meta.path)?;
        let ty = entry.header().entry_type();
        let mode = entry
            .header()
            .mode()
            .map_err(|e| format!("bad mode in its header: {e}"))?
            & 0o7777;
        let uid = u32::try_from(meta.uid).map_err(|_| format!("uid {} is too large", meta.uid))?;
        let gid = u32::try_from(meta.gid).map_err(|_| format!("gid {} is too large", meta.gid))?;
        let Some((name, parents)) = comps.split_last() else {
            // "./": the root's own metadata.
            if ty != tar::EntryType::Directory {
                return Err("the root can only be a directory".into());
            }
            self.chown(self.root, uid, gid)?;
            st.dirs.push((PathBuf::new(), mode, meta.mtime));
            return Ok(());
        };
        if let Some(hidden) = name.as_bytes().strip_prefix(WHITEOUT) {
            return self.whiteout(parents, hidden, st);
        }
        if matches!(ty, tar::EntryType::Char | tar::EntryType::Block) {
            st.skipped_devices += 1;
            return Ok(());
        }
        let dir = self
            .resolve_dir(parents, true, Some(&mut st.touched))?
            .ok_or("its directory cannot be made")?;
        let rel = dir.join(name);
        let path = self.root.join(&rel);
        let io = |what: &str| {
            let what = what.to_owned();
            move |e: io::Error| format!("{what}: {e}")
        };
        match ty {
            tar::EntryType::Directory => {
                match fs::symlink_metadata(&path) {
                    // Directories of layers merge.
                    Ok(m) if m.is_dir() => {}
                    Ok(_) => {
                        clear(&path)?;
                        mkdir(&path).map_err(io("cannot make the directory"))?;
                    }
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {
                        mkdir(&path).map_err(io("cannot make the directory"))?;
                    }
                    Err(e) => return Err(format!("cannot inspect what is there: {e}")),
                }
                self.chown(&path, uid, gid)?;
                st.dirs.push((rel.clone(), mode, meta.mtime));
            }
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                let budget = self.limits.max_total_bytes.saturating_sub(self.bytes);
                if entry.size() > budget {
                    return Err(self.too_many_bytes());
                }
                clear(&path)?;
                let mut file = OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .custom_flags(libc::O_NOFOLLOW)
                    .open(&path)
                    .map_err(io("cannot create the file"))?;
                self.bytes += self.copy(entry, &mut file, budget)?;
                if self.as_root {
                    std::os::unix::fs::fchown(&file, Some(uid), Some(gid))
                        .map_err(io("cannot set the owner"))?;
                }
                // After chown, which clears setuid/setgid.
                file.set_permissions(Permissions::from_mode(mode))
                    .map_err(io("cannot set the mode"))?;
                if let Some(cap) = &meta.capability
                    && self.as_root
                {
                    set_capability(&file, cap).map_err(io("cannot set its file capabilities"))?;
                }
                set_mtime(&path, meta.mtime).map_err(io("cannot set the mtime"))?;
            }
            tar::EntryType::Symlink => {
                let target = meta.link.as_deref().unwrap_or_default();
                if target.is_empty() || target.contains(&0) {
                    return Err("a symlink without a valid target".into());
                }
                clear(&path)?;
                std::os::unix::fs::symlink(OsStr::from_bytes(target), &path)
                    .map_err(io("cannot make the symlink"))?;
                self.chown(&path, uid, gid)?;
                set_mtime(&path, meta.mtime).map_err(io("cannot set the mtime"))?;
            }
            tar::EntryType::Link => self.hard_link(meta, &rel, &path)?,
            tar::EntryType::Fifo => {
                clear(&path)?;
                mkfifo(&path).map_err(io("cannot make the fifo"))?;
                self.chown(&path, uid, gid)?;
                fs::set_permissions(&path, Permissions::from_mode(mode))
                    .map_err(io("cannot set the mode"))?;
                set_mtime(&path, meta.mtime).map_err(io("cannot set the mtime"))?;
            }
            other => return Err(format!("entry type {other:?} is not supported")),
        }
        st.touched.insert(rel);
        self.files += 1;
        Ok(())
    }

    /// `.wh.NAME` deletes NAME of lower layers; `.wh..wh..opq` makes its
    /// directory opaque.
    fn whiteout(
        &self,
        parents: &[&OsStr],
        hidden: &[u8],
        st: &mut LayerState,
    ) -> Result<(), String> {
        if hidden == OPAQUE {
            let dir = self
                .resolve_dir(parents, true, Some(&mut st.touched))?
                .ok_or("its directory cannot be made")?;
            return self.drop_lower(&dir, &st.touched);
        }
        // Other `.wh..wh.` names are aufs bookkeeping, not whiteouts.
        if hidden.starts_with(WHITEOUT) {
            return Ok(());
        }
        if hidden.is_empty() || hidden == b"." || hidden == b".." {
            return Err("a whiteout that names nothing is refused".into());
        }
        let Some(dir) = self.resolve_dir(parents, false, None)? else {
            return Ok(());
        };
        let rel = dir.join(OsStr::from_bytes(hidden));
        if st.touched.contains(&rel) {
            return Ok(());
        }
        clear(&self.root.join(rel))
    }

    /// Removes, under `dir`, everything this layer has not touched.
    fn drop_lower(&self, dir: &Path, touched: &HashSet<PathBuf>) -> Result<(), String> {
        let mut todo = vec![dir.to_path_buf()];
        while let Some(d) = todo.pop() {
            let listing = fs::read_dir(self.root.join(&d))
                .map_err(|e| format!("cannot list {}: {e}", d.display()))?;
            for child in listing {
                let child = child.map_err(|e| format!("cannot list {}: {e}", d.display()))?;
                let rel = d.join(child.file_name());
                if !touched.contains(&rel) {
                    clear(&self.root.join(&rel))?;
                } else if child.file_type().is_ok_and(|t| t.is_dir()) {
                    todo.push(rel);
                }
            }
        }
        Ok(())
    }

    fn hard_link(&self, meta: &Meta, rel: &Path, path: &Path) -> Result<(), String> {
        let raw = meta.link.as_deref().unwrap_or_default();
        let shown = String::from_utf8_lossy(raw);
        let comps = split_path(raw).map_err(|e| format!("hard link to {shown}: {e}"))?;
        let missing = || format!("its hard-link target {shown} does not exist in the tree");
        let Some((name, parents)) = comps.split_last() else {
            return Err("a hard link to the root is refused".into());
        };
        let dir = self
            .resolve_dir(parents, false, None)?
            .ok_or_else(missing)?;
        let target_rel = dir.join(name);
        let target = self.root.join(&target_rel);
        match fs::symlink_metadata(&target) {
            Ok(m) if m.is_dir() => {
                return Err(format!("a hard link to the directory {shown} is refused"));
            }
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(missing()),
            Err(e) => return Err(format!("cannot inspect its hard-link target {shown}: {e}")),
        }
        if target_rel == rel {
            return Ok(());
        }
        clear(path)?;
        // linkat without AT_SYMLINK_FOLLOW: a symlink target is linked itself.
        fs::hard_link(&target, path).map_err(|e| format!("cannot link to {shown}: {e}"))
    }

    /// Resolves directory names from an entry path to a real directory inside
    /// the tree, as a chroot at the root would, and returns its path relative
    /// to the root (no symlinks in it). With `create`, missing directories are
    /// made (0755, as Docker does) and anything else in the way is an error;
    /// without, either gives None.
    fn resolve_dir(
        &self,
        comps: &[&OsStr],
        create: bool,
        mut touched: Option<&mut HashSet<PathBuf>>,
    ) -> Result<Option<PathBuf>, String> {
        let mut done = PathBuf::new();
        let mut todo: VecDeque<Vec<u8>> = comps.iter().map(|c| c.as_bytes().to_vec()).collect();
        let mut hops = 0;
        while let Some(c) = todo.pop_front() {
            match &c[..] {
                b"" | b"." => continue,
                // Only from symlink targets; at the root it stays there.
                b".." => {
                    done.pop();
                    continue;
                }
                _ => {}
            }
            let next = done.join(OsStr::from_bytes(&c));
            let abs = self.root.join(&next);
            match fs::symlink_metadata(&abs) {
                Ok(m) if m.is_dir() => {}
                Ok(m) if m.file_type().is_symlink() => {
                    hops += 1;
                    if hops > MAX_HOPS {
                        return Err(format!("{}: too many levels of symlinks", next.display()));
                    }
                    let target = fs::read_link(&abs)
                        .map_err(|e| format!("cannot read the symlink {}: {e}", next.display()))?;
                    let target = target.as_os_str().as_bytes();
                    if target.starts_with(b"/") {
                        done = PathBuf::new();
                    }
                    for part in target.split(|b| *b == b'/').rev() {
                        todo.push_front(part.to_vec());
                    }
                    continue;
                }
                Ok(_) if create => return Err(format!("{} is not a directory", next.display())),
                Err(e) if e.kind() == io::ErrorKind::NotFound && create => {
                    mkdir(&abs).map_err(|e| format!("cannot make {}: {e}", next.display()))?;
                    fs::set_permissions(&abs, Permissions::from_mode(0o755))
                        .map_err(|e| format!("cannot set the mode of {}: {e}", next.display()))?;
                }
                Ok(_) => return Ok(None),
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
                Err(e) => return Err(format!("cannot inspect {}: {e}", next.display())),
            }
            done = next;
            if let Some(t) = touched.as_deref_mut() {
                t.insert(done.clone());
            }
        }
        Ok(Some(done))
    }

    /// Sets a directory's mode and mtime at the end of its layer, if it is
    /// still a directory reached through directories only (a later entry
    /// may have replaced it or a parent by a symlink).
    fn finish_dir(&self, rel: &Path, mode: u32, mtime: i64) -> io::Result<()> {
        let mut path = self.root.to_path_buf();
        for c in rel.components() {
            path.push(c);
            match fs::symlink_metadata(&path) {
                Ok(m) if m.is_dir() => {}
                _ => return Ok(()),
            }
        }
        fs::set_permissions(&path, Permissions::from_mode(mode))?;
        set_mtime(&path, mtime)
    }

    fn chown(&self, path: &Path, uid: u32, gid: u32) -> Result<(), String> {
        if !self.as_root {
            return Ok(());
        }
        std::os::unix::fs::lchown(path, Some(uid), Some(gid))
            .map_err(|e| format!("cannot set the owner: {e}"))
    }

    fn copy(&mut self, src: &mut impl Read, dst: &mut File, budget: u64) -> Result<u64, String> {
        let mut total = 0u64;
        loop {
            let n = match src.read(&mut self.buf) {
                Ok(0) => return Ok(total),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(format!("cannot read its data: {e}")),
            };
            total += n as u64;
            if total > budget {
                return Err(self.too_many_bytes());
            }
            dst.write_all(&self.buf[..n])
                .map_err(|e| format!("cannot write the file: {e}"))?;
        }
    }

    fn too_many_bytes(&self) -> String {
        format!(
            "the layers hold more than {} bytes of files, the limit",
            self.limits.max_total_bytes
        )
    }
}

/// An entry path's components; `.` and empty ones dropped.
fn split_path(raw: &[u8]) -> Result<Vec<&OsStr>, String> {
    if raw.is_empty() {
        return Err("an empty path is refused".into());
    }
    if raw.starts_with(b"/") {
        return Err("an absolute path is refused".into());
    }
    if raw.contains(&0) {
        return Err("a path with a NUL byte is refused".into());
    }
    let mut out = Vec::new();
    for c in raw.split(|b| *b == b'/') {
        match c {
            b"" | b"." => {}
            b".." => return Err("a path that leaves the root is refused".into()),
            _ => out.push(OsStr::from_bytes(c)),
        }
    }
    Ok(out)
}

/// Removes whatever is at `path` (not following a symlink there).
fn clear(path: &Path) -> Result<(), String> {
    let result = match fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => fs::remove_dir_all(path),
        Ok(_) => fs::remove_file(path),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    };
    result.map_err(|e| format!("cannot remove what was at {}: {e}", path.display()))
}

fn mkdir(path: &Path) -> io::Result<()> {
    DirBuilder::new().mode(0o700).create(path)
}

fn c_path(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_bytes()).map_err(io::Error::other)
}

fn mkfifo(path: &Path) -> io::Result<()> {
    let c = c_path(path)?;
    // SAFETY: c is a valid NUL-terminated string.
    if unsafe { libc::mkfifo(c.as_ptr(), 0o600) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Sets atime and mtime without following a symlink at `path`.
fn set_mtime(path: &Path, secs: i64) -> io::Result<()> {
    let c = c_path(path)?;
    let ts = libc::timespec {
        tv_sec: secs as libc::time_t,
        tv_nsec: 0,
    };
    let times = [ts, ts];
    // SAFETY: c is NUL-terminated and times holds the two entries utimensat reads.
    let rc = unsafe {
        libc::utimensat(
            libc::AT_FDCWD,
            c.as_ptr(),
            times.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn set_capability(file: &File, value: &[u8]) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: the name is NUL-terminated and value is valid for its length.
    let rc = unsafe {
        libc::fsetxattr(
            file.as_raw_fd(),
            c"security.capability".as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

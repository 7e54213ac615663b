//! One image build at a time per cache: an exclusive lock file, and the
//! scratch space of builds that died is cleared by the next one.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

/// Holds the cache's build lock until dropped (the kernel releases it when
/// the process dies, however it dies).
pub struct BuildLock {
    _file: File,
}

impl BuildLock {
    pub fn acquire(cache: &Path) -> Result<BuildLock> {
        let path = cache.join(".build.lock");
        let file = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .with_context(|| format!("cannot open the build lock {}", path.display()))?;
        // SAFETY: flock on a file descriptor we own.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            eprintln!(
                "waiting for another airlock image build to finish ({})",
                path.display()
            );
            // SAFETY: as above.
            if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } != 0 {
                return Err(std::io::Error::last_os_error())
                    .with_context(|| format!("cannot lock {}", path.display()));
            }
        }
        Ok(BuildLock { _file: file })
    }
}

/// A scratch directory for one build product, removed on drop unless kept.
/// Only created under the build lock, so a leftover one belongs to a dead build.
pub struct Scratch {
    path: PathBuf,
}

impl Scratch {
    pub fn create(cache: &Path, name: &str) -> Result<Scratch> {
        let path = cache.join("tmp").join(name);
        remove_tree(&path)?;
        std::fs::create_dir_all(&path)
            .with_context(|| format!("cannot create build directory {}", path.display()))?;
        Ok(Scratch { path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if let Err(err) = remove_tree(&self.path) {
            eprintln!("warning: could not remove build directory: {err:#}");
        }
    }
}

/// Removes a directory tree, first unmounting anything a killed debootstrap
/// left mounted inside it (so that removal never reaches into /proc or /sys).
pub fn remove_tree(path: &Path) -> Result<()> {
    if !path.exists() {
        return Ok(());
    }
    for mount in mounts_under(path) {
        let status = std::process::Command::new("umount")
            .arg("-l")
            .arg(&mount)
            .status();
        if !status.is_ok_and(|s| s.success()) {
            anyhow::bail!(
                "{} is still mounted; unmount it (umount -l) and run the build again",
                mount.display()
            );
        }
    }
    std::fs::remove_dir_all(path).with_context(|| format!("cannot remove {}", path.display()))
}

fn mounts_under(path: &Path) -> Vec<PathBuf> {
    let Ok(canonical) = path.canonicalize() else {
        return Vec::new();
    };
    let Ok(table) = std::fs::read_to_string("/proc/self/mounts") else {
        return Vec::new();
    };
    let mut found: Vec<PathBuf> = table
        .lines()
        .filter_map(|line| line.split_whitespace().nth(1))
        .map(|p| PathBuf::from(p.replace("\\040", " ")))
        .filter(|p| p.starts_with(&canonical))
        .collect();
    // Deepest first.
    found.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    found
}

//! Keeping the cache to what can still be used. Every build leaves the
//! previous build of its name behind (a new airlock makes a new `default`,
//! an edited recipe a new image of its name), and each is a GiB or more with
//! its templates, so every finished build prunes, and so does
//! `airlock image prune`. What goes:
//! - images no name points at any more, unless a process holds one
//!   ([`super::hold`]) or a paused sandbox or checkpoint on disk was saved
//!   from it (resuming needs its image and template);
//! - image directories this airlock cannot read (an older airlock's);
//! - templates whose image is gone, or of an older snapshot format;
//! - kernels and base root filesystems that no kept image was made from,
//!   but for the current recipe's base.

use std::collections::HashSet;
use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use super::read_image;

/// Where servers with their own `--state-dir` register it, so that a prune
/// finds their paused sandboxes.
const STATE_ROOTS: &str = "state-roots";
/// Paused sandboxes and checkpoints sit this deep at most under a root.
const STATE_SCAN_DEPTH: usize = 4;
/// A saved state's description is small; a bigger file is not one.
const STATE_FILE_MAX_BYTES: u64 = 64 << 20;

/// What a prune did.
#[derive(Debug, Default)]
pub struct Report {
    pub removed: Vec<Removed>,
    pub kept: Vec<Kept>,
}

#[derive(Debug)]
pub struct Removed {
    pub path: PathBuf,
    pub bytes: u64,
}

/// An older build that stays, and why.
#[derive(Debug)]
pub struct Kept {
    pub path: PathBuf,
    pub reason: &'static str,
}

impl Report {
    pub fn freed_bytes(&self) -> u64 {
        self.removed.iter().map(|r| r.bytes).sum()
    }

    /// One line per removal and per older build kept.
    pub fn describe(&self) -> String {
        let mut out = String::new();
        for removed in &self.removed {
            out.push_str(&format!(
                "removed {} ({} MiB)\n",
                removed.path.display(),
                removed.bytes >> 20
            ));
        }
        for kept in &self.kept {
            out.push_str(&format!("kept {}: {}\n", kept.path.display(), kept.reason));
        }
        out.push_str(&format!(
            "freed {} MiB\n",
            self.freed_bytes().div_ceil(1 << 20)
        ));
        out
    }
}

/// Registers a state directory outside the cache so that prunes look for
/// paused sandboxes in it.
pub fn register_state_root(cache: &Path, root: &Path) -> Result<()> {
    use sha2::{Digest, Sha256};
    let root = root
        .canonicalize()
        .with_context(|| format!("cannot resolve {}", root.display()))?;
    if root.starts_with(cache.join("sessions")) {
        return Ok(());
    }
    let dir = cache.join(STATE_ROOTS);
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let text = root.to_string_lossy().into_owned();
    let digest = Sha256::digest(text.as_bytes());
    let name: String = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
    std::fs::write(dir.join(name), text + "\n")
        .with_context(|| format!("cannot register {} in {}", root.display(), dir.display()))
}

/// Removes what no one can use any more. The caller holds the build lock,
/// so no build is under way.
pub fn prune(cache: &Path) -> Result<Report> {
    let mut report = Report::default();
    let current = current_keys(cache)?;
    remove_abandoned_runs(cache, &mut report)?;
    let saved_from = saved_rootfs_fingerprints(cache);
    let images_dir = cache.join("images");
    let mut kept_images = Vec::new();
    for dir in subdirs(&images_dir)? {
        let key = file_name(&dir);
        let image = read_image(&dir);
        if image.is_some() && current.contains(&key) {
            kept_images.push(image);
            continue;
        }
        // Held until the directory is gone, so no user starts on it.
        let claim = super::hold::claim_unused(&dir);
        let has_manifest = dir.join("manifest.json").exists();
        if claim.is_none() && has_manifest {
            report.kept.push(Kept {
                path: dir,
                reason: "a running airlock is using it",
            });
            kept_images.push(image);
            continue;
        }
        let saved = crate::vmm::snapshot::identity::fingerprint(&dir.join("rootfs.ext4"))
            .is_ok_and(|f| saved_from.contains(&f));
        if saved {
            report.kept.push(Kept {
                path: dir,
                reason: "a paused sandbox or checkpoint on disk was saved from it",
            });
            kept_images.push(image);
            continue;
        }
        remove(&dir, &mut report)?;
        drop(claim);
    }
    let kept_keys: HashSet<String> = kept_images
        .iter()
        .flatten()
        .map(|image| image.manifest.recipe_hash.clone())
        .collect();
    for dir in subdirs(&cache.join("templates"))? {
        let name = file_name(&dir);
        let image_key = name.split('-').next().unwrap_or_default();
        // A name without a format is older than formats in names.
        let outdated = template_format(&name)
            .is_none_or(|format| format < crate::vmm::snapshot::FORMAT_VERSION);
        if !kept_keys.contains(image_key) || outdated {
            remove(&dir, &mut report)?;
        }
    }
    let mut kept_parts: HashSet<String> = kept_images
        .iter()
        .flatten()
        .flat_map(|image| {
            [
                image.manifest.kernel.recipe_hash.clone(),
                image.manifest.rootfs.recipe_hash.clone(),
            ]
        })
        .collect();
    kept_parts.insert(super::recipe::rootfs_key());
    for part in ["kernels", "rootfs"] {
        for dir in subdirs(&cache.join(part))? {
            if !kept_parts.contains(&file_name(&dir)) {
                remove(&dir, &mut report)?;
            }
        }
    }
    Ok(report)
}

/// A server without `--persist` or a fixed port keeps its sandboxes in
/// `sessions/run-<random>`, which no later run can name; one whose server
/// died without removing it (its lock free) is garbage.
fn remove_abandoned_runs(cache: &Path, report: &mut Report) -> Result<()> {
    use std::os::fd::AsRawFd;
    for dir in subdirs(&cache.join("sessions"))? {
        if !file_name(&dir).starts_with("run-") {
            continue;
        }
        let Ok(lock) = std::fs::File::open(dir.join(crate::sandbox::registry::STATE_LOCK_FILE))
        else {
            continue;
        };
        // SAFETY: flock on a file descriptor we own.
        if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
            remove(&dir, report)?;
        }
    }
    Ok(())
}

/// The key each name points at, as written (an unreadable name keeps
/// nothing from going, but a malformed one is no reason to remove more).
fn current_keys(cache: &Path) -> Result<HashSet<String>> {
    let dir = cache.join("names");
    let entries = match std::fs::read_dir(&dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(HashSet::new()),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", dir.display())),
    };
    let mut keys = HashSet::new();
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') {
            continue;
        }
        let path = entry.path();
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        keys.insert(text.trim().to_string());
    }
    Ok(keys)
}

/// The rootfs fingerprint of every paused sandbox and checkpoint kept in
/// the default state directory and in every registered one.
fn saved_rootfs_fingerprints(cache: &Path) -> HashSet<String> {
    let mut roots = vec![cache.join("sessions")];
    let registered = cache.join(STATE_ROOTS);
    for entry in std::fs::read_dir(&registered)
        .into_iter()
        .flatten()
        .flatten()
    {
        match std::fs::read_to_string(entry.path()) {
            Ok(text) if Path::new(text.trim()).is_dir() => roots.push(PathBuf::from(text.trim())),
            // A state directory removed since: forget it.
            _ => {
                let _ = std::fs::remove_file(entry.path());
            }
        }
    }
    let mut found = HashSet::new();
    for root in roots {
        collect_saved(&root, STATE_SCAN_DEPTH, &mut found);
    }
    found
}

fn collect_saved(dir: &Path, depth: usize, found: &mut HashSet<String>) {
    #[derive(serde::Deserialize)]
    struct Saved {
        state: SavedState,
    }
    #[derive(serde::Deserialize)]
    struct SavedState {
        image: crate::vmm::snapshot::identity::ImageIdentity,
    }
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let Ok(kind) = entry.file_type() else {
            continue;
        };
        let path = entry.path();
        if kind.is_dir() && depth > 0 {
            collect_saved(&path, depth - 1, found);
        } else if kind.is_file() && entry.file_name() == crate::vmm::snapshot::STATE_FILE {
            let mut text = String::new();
            let read = std::fs::File::open(&path)
                .and_then(|f| f.take(STATE_FILE_MAX_BYTES).read_to_string(&mut text));
            if read.is_ok()
                && let Ok(saved) = serde_json::from_str::<Saved>(&text)
            {
                found.insert(saved.state.image.rootfs_fingerprint);
            }
        }
    }
}

/// `…-f<format>-…` in a template's directory name.
fn template_format(name: &str) -> Option<u32> {
    name.split('-')
        .find_map(|part| part.strip_prefix('f')?.parse().ok())
}

fn subdirs(dir: &Path) -> Result<Vec<PathBuf>> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", dir.display())),
    };
    let mut dirs = Vec::new();
    for entry in entries {
        let entry = entry.with_context(|| format!("cannot read {}", dir.display()))?;
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            dirs.push(entry.path());
        }
    }
    dirs.sort();
    Ok(dirs)
}

fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Removes a cache directory, sealed (read-only) ones included.
fn remove(dir: &Path, report: &mut Report) -> Result<()> {
    let bytes = disk_bytes(dir);
    make_writable(dir);
    super::lock::remove_tree(dir)?;
    report.removed.push(Removed {
        path: dir.to_path_buf(),
        bytes,
    });
    Ok(())
}

/// Sealed templates are read-only directories (owned by the unprivileged
/// VMM user); their owner may not be us, but root may chmod.
pub(super) fn make_writable(dir: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755));
}

/// Blocks in use under `dir` (sparse memory files count what they hold).
pub(super) fn disk_bytes(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let Ok(meta) = std::fs::symlink_metadata(dir) else {
        return 0;
    };
    let own = meta.blocks() * 512;
    if !meta.is_dir() {
        return own;
    }
    own + std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|entry| disk_bytes(&entry.path()))
        .sum::<u64>()
}

#[cfg(test)]
mod tests {
    use super::super::names;
    use super::*;

    struct Cache(tempfile::TempDir);

    impl Cache {
        fn new() -> Cache {
            let cache = Cache(tempfile::tempdir().unwrap());
            cache.image("0ld", "kold", "rold", 1);
            cache.image("2ew", "knew", "rnew", 2);
            names::record(cache.path(), names::DEFAULT_IMAGE, "2ew").unwrap();
            for dir in [
                "images/junk",
                "templates/0ld-f1-hw-kx-my-1c-512m",
                "templates/2ew-f1-hw-kx-my-1c-512m",
                "templates/2ew-f0-hw-kx-my-1c-512m",
                "kernels/kold",
                "kernels/knew",
                "rootfs/rold",
            ] {
                std::fs::create_dir_all(cache.path().join(dir)).unwrap();
            }
            std::fs::create_dir_all(
                cache
                    .path()
                    .join("rootfs")
                    .join(super::super::recipe::rootfs_key()),
            )
            .unwrap();
            // Sealed templates are read-only.
            use std::os::unix::fs::PermissionsExt;
            let sealed = cache.path().join("templates/0ld-f1-hw-kx-my-1c-512m");
            std::fs::write(sealed.join("memory"), b"m").unwrap();
            std::fs::set_permissions(&sealed, std::fs::Permissions::from_mode(0o555)).unwrap();
            cache
        }

        fn path(&self) -> &Path {
            self.0.path()
        }

        fn image(&self, key: &str, kernel: &str, rootfs: &str, fill: u8) {
            let dir = self.path().join("images").join(key);
            std::fs::create_dir_all(&dir).unwrap();
            let manifest = super::super::tests::manifest(key, kernel, rootfs);
            std::fs::write(
                dir.join("manifest.json"),
                serde_json::to_string(&manifest).unwrap(),
            )
            .unwrap();
            std::fs::write(dir.join("vmlinux"), b"kernel").unwrap();
            std::fs::write(dir.join("rootfs.ext4"), vec![fill; 64 << 10]).unwrap();
        }

        fn exists(&self, path: &str) -> bool {
            self.path().join(path).exists()
        }

        fn save_paused_from(&self, state_root: &Path, key: &str) {
            let rootfs = self.path().join("images").join(key).join("rootfs.ext4");
            let fingerprint = crate::vmm::snapshot::identity::fingerprint(&rootfs).unwrap();
            let paused = state_root.join("paused-1");
            std::fs::create_dir_all(&paused).unwrap();
            let state = serde_json::json!({"format_version": 1, "state": {"image": {
                "recipe_hash": "", "kernel_fingerprint": "k", "rootfs_fingerprint": fingerprint}}});
            std::fs::write(paused.join("state.json"), state.to_string()).unwrap();
        }
    }

    #[test]
    fn older_builds_their_templates_and_parts_go_and_the_current_ones_stay() {
        let cache = Cache::new();
        let report = prune(cache.path()).unwrap();
        for gone in [
            "images/0ld",
            "images/junk",
            "templates/0ld-f1-hw-kx-my-1c-512m",
            "templates/2ew-f0-hw-kx-my-1c-512m",
            "kernels/kold",
            "rootfs/rold",
        ] {
            assert!(!cache.exists(gone), "{gone} should be gone");
        }
        for kept in [
            "images/2ew",
            "templates/2ew-f1-hw-kx-my-1c-512m",
            "kernels/knew",
        ] {
            assert!(cache.exists(kept), "{kept} should stay");
        }
        assert!(cache.exists(&format!("rootfs/{}", super::super::recipe::rootfs_key())));
        assert_eq!(report.removed.len(), 6, "{report:?}");
        assert!(report.freed_bytes() >= 64 << 10);
        assert!(report.describe().contains("removed "));
        // Nothing more to do the second time.
        assert!(prune(cache.path()).unwrap().removed.is_empty());
    }

    #[test]
    fn an_older_build_a_running_airlock_holds_stays_with_its_templates() {
        let cache = Cache::new();
        let old = read_image(&cache.path().join("images/0ld")).unwrap();
        let hold = super::super::ImageHold::acquire(&old).unwrap();
        let report = prune(cache.path()).unwrap();
        assert!(cache.exists("images/0ld"));
        assert!(cache.exists("templates/0ld-f1-hw-kx-my-1c-512m"));
        assert!(cache.exists("kernels/kold"));
        assert!(
            report.describe().contains("a running airlock is using it"),
            "{}",
            report.describe()
        );
        drop(hold);
        prune(cache.path()).unwrap();
        assert!(!cache.exists("images/0ld"));
    }

    #[test]
    fn an_older_build_a_paused_sandbox_was_saved_from_stays() {
        let cache = Cache::new();
        cache.save_paused_from(&cache.path().join("sessions/persist-a"), "0ld");
        let report = prune(cache.path()).unwrap();
        assert!(cache.exists("images/0ld"), "{report:?}");
        assert!(cache.exists("templates/0ld-f1-hw-kx-my-1c-512m"));
        assert!(report.describe().contains("paused sandbox"));
    }

    #[test]
    fn a_dead_servers_own_run_directory_goes_and_pins_nothing() {
        use std::os::fd::AsRawFd;
        let cache = Cache::new();
        let dead = cache.path().join("sessions/run-dead");
        let live = cache.path().join("sessions/run-live");
        cache.save_paused_from(&dead, "0ld");
        cache.save_paused_from(&live, "2ew");
        std::fs::write(dead.join("lock"), b"").unwrap();
        std::fs::write(live.join("lock"), b"").unwrap();
        let held = std::fs::File::open(live.join("lock")).unwrap();
        assert_eq!(unsafe { libc::flock(held.as_raw_fd(), libc::LOCK_EX) }, 0);
        prune(cache.path()).unwrap();
        assert!(!dead.exists(), "a dead server's run directory is garbage");
        assert!(!cache.exists("images/0ld"), "and pins nothing");
        assert!(live.exists(), "a live server's stays");
        drop(held);
    }

    #[test]
    fn a_registered_state_directory_outside_the_cache_pins_too_until_it_is_gone() {
        let cache = Cache::new();
        let elsewhere = tempfile::tempdir().unwrap();
        let root = elsewhere.path().join("persist-b");
        cache.save_paused_from(&root, "0ld");
        register_state_root(cache.path(), &root).unwrap();
        prune(cache.path()).unwrap();
        assert!(cache.exists("images/0ld"));
        std::fs::remove_dir_all(&root).unwrap();
        prune(cache.path()).unwrap();
        assert!(!cache.exists("images/0ld"));
        assert!(
            std::fs::read_dir(cache.path().join(STATE_ROOTS))
                .unwrap()
                .next()
                .is_none()
        );
    }

    #[test]
    fn template_formats_are_read_from_their_names() {
        assert_eq!(template_format("abc-f1-hw-k0-m0-1c-512m"), Some(1));
        assert_eq!(template_format("abc-f12-pvm-k0-1c-512m"), Some(12));
        assert_eq!(template_format("abc"), None);
    }
}

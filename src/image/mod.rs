//! The guest image: a kernel and a read-only root filesystem with the agent,
//! built from Debian packages and cached under a key derived from the recipe.
//!
//! Layout of the cache:
//! - `kernels/<key>/`: vmlinux, config, kernel.json
//! - `rootfs/<key>/`: rootfs.ext4 (no agent), rootfs.json
//! - `images/<key>/`: vmlinux, rootfs.ext4 (with agent), manifest.json
//!
//! Each product is built in `tmp/` and renamed into place when whole, so an
//! interrupted build leaves nothing that looks finished.

mod agent;
mod command;
pub mod commands;
pub mod custom;
mod hold;
mod host_tools;
pub mod kernel;
pub(crate) mod lock;
mod mirror;
pub mod names;
pub mod oci;
mod progress;
pub mod prune;
pub mod recipe;
pub mod rootfs;
pub mod space;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::SystemTime;

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

use command::{run_captured, run_logged};
use lock::{BuildLock, Scratch};
use progress::Progress;

pub use agent::elf_has_interpreter;
pub use hold::ImageHold;

/// A finished guest image.
#[derive(Debug, Clone)]
pub struct Image {
    pub dir: PathBuf,
    pub manifest: Manifest,
}

impl Image {
    /// The name sandboxes and clients know it by.
    pub fn name(&self) -> &str {
        self.manifest
            .custom
            .as_ref()
            .map_or(names::DEFAULT_IMAGE, |c| c.name.as_str())
    }

    pub fn vmlinux(&self) -> PathBuf {
        self.dir.join("vmlinux")
    }

    pub fn rootfs(&self) -> PathBuf {
        self.dir.join("rootfs.ext4")
    }
}

/// manifest.json: what an image is made of.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Manifest {
    pub recipe_hash: String,
    pub airlock_version: String,
    pub build_date: String,
    pub kernel: ManifestKernel,
    pub rootfs: ManifestRootfs,
    pub agent: ManifestAgent,
    /// What a recipe added; none for the built-in image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub custom: Option<custom::CustomManifest>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ManifestKernel {
    pub recipe_hash: String,
    pub version: String,
    pub source_package_version: String,
    pub patches: Vec<String>,
    pub vmlinux_bytes: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ManifestRootfs {
    pub recipe_hash: String,
    pub suite: String,
    pub ext4_bytes: u64,
    pub packages: Vec<rootfs::Package>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ManifestAgent {
    pub path_in_guest: String,
    pub sha256: String,
    pub bytes: u64,
}

/// What `ensure` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    AlreadyBuilt,
    Built,
}

/// What every image is made of besides its root filesystem: the kernel
/// (by its source version and key) and the agent.
struct BuildInputs {
    source_version: String,
    kernel_key: String,
    agent_bytes: Vec<u8>,
    agent_sha256: String,
}

impl BuildInputs {
    fn gather(cache: &Path) -> Result<BuildInputs> {
        std::fs::create_dir_all(cache)
            .with_context(|| format!("cannot create {}", cache.display()))?;
        let source_version = kernel::source_package_version()?;
        let agent_path = agent::locate(&cache.join("logs"))?;
        let agent_bytes = std::fs::read(&agent_path)
            .with_context(|| format!("cannot read the guest agent {}", agent_path.display()))?;
        Ok(BuildInputs {
            kernel_key: recipe::kernel_key(&source_version),
            agent_sha256: recipe::sha256_hex(&agent_bytes),
            source_version,
            agent_bytes,
        })
    }

    /// The manifest of an image `key` made of these, `kernel` and `rootfs`.
    fn manifest(
        &self,
        key: &str,
        kernel: &kernel::Kernel,
        rootfs: ManifestRootfs,
        custom: Option<custom::CustomManifest>,
    ) -> Manifest {
        Manifest {
            recipe_hash: key.to_string(),
            airlock_version: env!("CARGO_PKG_VERSION").to_string(),
            build_date: humantime::format_rfc3339_seconds(SystemTime::now()).to_string(),
            kernel: ManifestKernel {
                recipe_hash: kernel.key.clone(),
                version: kernel.info.version.clone(),
                source_package_version: kernel.info.source_package_version.clone(),
                patches: kernel.info.patches.clone(),
                vmlinux_bytes: kernel.info.vmlinux_bytes,
            },
            rootfs,
            agent: ManifestAgent {
                path_in_guest: airlock_protocol::AGENT_GUEST_PATH.to_string(),
                sha256: self.agent_sha256.clone(),
                bytes: self.agent_bytes.len() as u64,
            },
            custom,
        }
    }
}

/// The image `key` if it is built, now the one `name` means.
fn built(cache: &Path, name: &str, key: &str) -> Result<Option<Image>> {
    let Some(image) = read_image(&cache.join("images").join(key)) else {
        return Ok(None);
    };
    names::record(cache, name, key)?;
    Ok(Some(image))
}

/// Returns the image for the current recipe, building whatever part of it is
/// missing. Progress goes to stderr.
pub fn ensure(cache: &Path) -> Result<(Image, Outcome)> {
    let inputs = BuildInputs::gather(cache)?;
    let rootfs_key = recipe::rootfs_key();
    let key = recipe::image_key(&inputs.kernel_key, &rootfs_key, &inputs.agent_sha256);
    let name = names::DEFAULT_IMAGE;
    if let Some(image) = built(cache, name, &key)? {
        return Ok((image, Outcome::AlreadyBuilt));
    }

    host_tools::check_all()?;
    let _lock = BuildLock::acquire(cache)?;
    // Another process may have finished it while we waited for the lock.
    if let Some(image) = built(cache, name, &key)? {
        return Ok((image, Outcome::AlreadyBuilt));
    }
    let dir = cache.join("images").join(&key);
    make_room(cache, space::IMAGE_BUILD_BYTES, "building the guest image")?;
    eprintln!(
        "airlock: preparing the guest image {key} in {} (first run only)",
        cache.display()
    );
    let kernel = kernel::ensure(cache, &inputs.source_version)?;
    let rootfs = rootfs::ensure(cache)?;

    let progress = Progress::new("image");
    progress.step("adding the guest agent to the root filesystem");
    let scratch = Scratch::create(cache, &format!("image-{key}"))?;
    let out = scratch.path().join("out");
    std::fs::create_dir(&out).context("cannot create the image output directory")?;
    // A copy, not a hard link: each link changes the shared inode's ctime,
    // which the seals of every template made from an earlier image check.
    std::fs::copy(kernel.vmlinux(), out.join("vmlinux")).context("cannot copy the kernel")?;
    let ext4 = out.join("rootfs.ext4");
    std::fs::copy(rootfs.ext4(), &ext4).context("cannot copy the base root filesystem")?;
    std::fs::write(scratch.path().join("airlock-agent"), &inputs.agent_bytes)
        .context("cannot stage the agent")?;
    install_agent(scratch.path(), &ext4, inputs.agent_bytes.len() as u64)?;

    let rootfs = ManifestRootfs {
        recipe_hash: rootfs.key.clone(),
        suite: rootfs.info.suite.clone(),
        ext4_bytes: rootfs.info.ext4_bytes,
        packages: rootfs.info.packages.clone(),
    };
    let manifest = inputs.manifest(&key, &kernel, rootfs, None);
    write_json(&out.join("manifest.json"), &manifest)?;
    publish(&out, &dir)?;
    names::record(cache, name, &key)?;
    progress.step(&format!("done: {}", dir.display()));
    prune_and_say(cache, &progress);
    Ok((Image { dir, manifest }, Outcome::Built))
}

/// Prunes the cache and says what that freed: after a build (which makes
/// the one it replaces unused) or to make room for one. The caller holds
/// the build lock. A failure here costs only disk space.
fn prune_and_say(cache: &Path, progress: &Progress) {
    match prune::prune(cache) {
        Ok(report) if report.removed.is_empty() => {}
        Ok(report) => progress.step(&format!(
            "removed {} older build(s) from the cache, freeing {} MiB (`airlock image prune` tells what)",
            report.removed.len(),
            report.freed_bytes() >> 20
        )),
        Err(err) => progress.step(&format!("warning: cannot prune the cache: {err:#}")),
    }
}

/// Before writing `needed` bytes into the cache: prunes if the filesystem
/// has less free, then fails with the numbers if it still has. The caller
/// holds the build lock.
pub(crate) fn make_room(cache: &Path, needed: u64, what: &str) -> Result<()> {
    if space::free_bytes(cache)? < needed {
        prune_and_say(cache, &Progress::new("cache"));
    }
    space::ensure_free(cache, needed, what)
}

fn read_image(dir: &Path) -> Option<Image> {
    let text = std::fs::read_to_string(dir.join("manifest.json")).ok()?;
    let manifest: Manifest = serde_json::from_str(&text).ok()?;
    (dir.join("vmlinux").is_file() && dir.join("rootfs.ext4").is_file()).then(|| Image {
        dir: dir.to_path_buf(),
        manifest,
    })
}

/// Writes the agent into the ext4 image as root-owned 0755, then reads it back:
/// debugfs reports errors on stderr but exits 0, so only a check is reliable.
fn install_agent(workdir: &Path, ext4: &Path, agent_len: u64) -> Result<()> {
    let guest = airlock_protocol::AGENT_GUEST_PATH;
    let script = workdir.join("debugfs.cmds");
    std::fs::write(
        &script,
        format!(
            "write airlock-agent {guest}\nsif {guest} mode 0100755\nsif {guest} uid 0\nsif {guest} gid 0\n"
        ),
    )
    .context("cannot write the debugfs script")?;
    let mut debugfs = Command::new("debugfs");
    debugfs
        .current_dir(workdir)
        .arg("-w")
        .arg("-f")
        .arg(&script)
        .arg(ext4);
    run_logged(
        debugfs,
        "debugfs (installing the agent)",
        &workdir.join("debugfs.log"),
        |_| {},
    )?;
    let mut stat = Command::new("debugfs");
    stat.env("PAGER", "__none__")
        .arg("-R")
        .arg(format!("stat {guest}"))
        .arg(ext4);
    let text = run_captured(stat, "debugfs stat")?;
    let size_ok = text.contains(&format!("Size: {agent_len}"));
    let mode_ok = text.contains("Mode:  0755") || text.contains("Mode: 0755");
    if !size_ok || !mode_ok {
        bail!("the agent did not land in the root filesystem as expected; debugfs says:\n{text}");
    }
    Ok(())
}

/// Moves a finished build into its final place in one rename.
fn publish(built: &Path, dest: &Path) -> Result<()> {
    let parent = dest.parent().context("a cache path has no parent")?;
    std::fs::create_dir_all(parent)
        .with_context(|| format!("cannot create {}", parent.display()))?;
    if dest.exists() {
        // Left by a build that crashed between rename and marker; rebuilt now.
        lock::remove_tree(dest)?;
    }
    std::fs::rename(built, dest)
        .with_context(|| format!("cannot move the build into {}", dest.display()))
}

fn write_json(path: &Path, value: &impl Serialize) -> Result<()> {
    let text = serde_json::to_string_pretty(value).context("cannot serialize build metadata")?;
    std::fs::write(path, text + "\n").with_context(|| format!("cannot write {}", path.display()))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A built-in image's manifest with these keys and nothing else.
    pub fn manifest(key: &str, kernel_key: &str, rootfs_key: &str) -> Manifest {
        let manifest = serde_json::json!({
            "recipe_hash": key, "airlock_version": "0", "build_date": "",
            "kernel": {"recipe_hash": kernel_key, "version": "", "source_package_version": "", "patches": [], "vmlinux_bytes": 0},
            "rootfs": {"recipe_hash": rootfs_key, "suite": "", "ext4_bytes": 0, "packages": []},
            "agent": {"path_in_guest": "", "sha256": "", "bytes": 0}
        });
        serde_json::from_value(manifest).unwrap()
    }

    /// An image at `dir` named by its directory; its files may not exist.
    pub fn fake_image(dir: &Path) -> Image {
        let key = dir.file_name().unwrap().to_string_lossy().into_owned();
        Image {
            dir: dir.to_path_buf(),
            manifest: manifest(&key, "k", "r"),
        }
    }
}

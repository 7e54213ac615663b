//! Builds the guest root filesystem: Debian minbase by debootstrap, the
//! runtime packages, the `sandbox` user, packed read-only into ext4. The agent
//! is added later (see assemble.rs), so that changing it is cheap.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

use super::command::{run_captured, run_logged};
use super::lock::Scratch;
use super::progress::{Progress, Throttle};
use super::{mirror, publish, recipe};

/// The unprivileged user that runs sandboxed code.
pub const SANDBOX_USER: &str = "sandbox";
pub const SANDBOX_UID: u32 = 1000;

/// A cached root filesystem build, without the agent.
#[derive(Debug, Clone)]
pub struct Rootfs {
    pub key: String,
    pub dir: PathBuf,
    pub info: RootfsInfo,
}

/// Written beside the image as rootfs.json.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RootfsInfo {
    pub suite: String,
    pub mirror: String,
    pub packages: Vec<Package>,
    pub ext4_bytes: u64,
    pub content_bytes: u64,
    pub build_seconds: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Package {
    pub name: String,
    pub version: String,
}

impl Rootfs {
    pub fn ext4(&self) -> PathBuf {
        self.dir.join("rootfs.ext4")
    }
}

/// Returns the cached root filesystem for this recipe, building it if needed.
pub fn ensure(cache: &Path) -> Result<Rootfs> {
    let key = recipe::rootfs_key();
    let dir = cache.join("rootfs").join(&key);
    if let Some(info) = read_info(&dir) {
        return Ok(Rootfs { key, dir, info });
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!(
            "building the guest root filesystem runs debootstrap, which needs root. Run the build \
             once as root (sudo -E airlock image build, or sudo -E cargo run --release -- image build); \
             later runs reuse the cached image"
        );
    }
    let progress = Progress::new("rootfs");
    let mirror = mirror::find_mirror(recipe::SUITE)?;
    let scratch = Scratch::create(cache, &format!("rootfs-{key}"))?;
    let log = scratch.path().join("build.log");
    let tree = scratch.path().join("tree");

    progress.step(&format!(
        "debootstrap {} minbase from {mirror}",
        recipe::SUITE
    ));
    let mut debootstrap = Command::new("debootstrap");
    debootstrap
        .args(["--variant=minbase", "--merged-usr"])
        .arg(recipe::SUITE)
        .arg(&tree)
        .arg(&mirror);
    let mut throttle = Throttle::new(Duration::from_secs(10));
    run_logged(debootstrap, "debootstrap", &log, |line| {
        // "I: Retrieving <pkg>" and the like come once per package: show a
        // sample of those, and every stage line.
        let Some(info) = line.strip_prefix("I: ") else {
            return;
        };
        let per_package = [
            "Retrieving",
            "Validating",
            "Extracting",
            "Unpacking",
            "Configuring",
        ]
        .iter()
        .any(|verb| info.starts_with(verb) && !info.contains("packages"));
        if !per_package || throttle.ready() {
            eprintln!("[rootfs] {info}");
        }
    })?;

    let packages = recipe::rootfs_packages();
    progress.step(&format!(
        "installing {} and their dependencies (no recommends; ~150 MiB download)",
        packages.join(", ")
    ));
    install_packages(&tree, &packages, &log)?;

    progress.step(&format!("adding the unprivileged user '{SANDBOX_USER}'"));
    let mut useradd = Command::new("chroot");
    useradd.arg(&tree).args([
        "/usr/sbin/useradd",
        "--create-home",
        "--home-dir",
        "/home/sandbox",
        "--uid",
        &SANDBOX_UID.to_string(),
        "--user-group",
        "--shell",
        "/bin/bash",
        SANDBOX_USER,
    ]);
    run_logged(useradd, "useradd", &log, |_| {})?;

    let mut query = Command::new("chroot");
    query
        .arg(&tree)
        .args(["dpkg-query", "-W", "-f=${Package}\t${Version}\n"]);
    let installed = parse_package_list(&run_captured(query, "dpkg-query in the new root")?);

    progress.step("trimming documentation, caches and apt lists");
    trim(&tree)?;
    prepare_guest_files(&tree)?;

    let out = scratch.path().join("out");
    std::fs::create_dir(&out).context("cannot create the rootfs output directory")?;
    let packed = pack_ext4(&tree, &out.join("rootfs.ext4"), &log, &progress)?;

    let info = RootfsInfo {
        suite: recipe::SUITE.to_string(),
        mirror,
        packages: installed,
        ext4_bytes: packed.image_bytes,
        content_bytes: packed.content_bytes,
        build_seconds: progress.elapsed().as_secs_f64(),
    };
    super::write_json(&out.join("rootfs.json"), &info)?;
    publish(&out, &dir)?;
    progress.step(&format!(
        "done: {} packages in {}",
        info.packages.len(),
        dir.display()
    ));
    Ok(Rootfs { key, dir, info })
}

/// What packing a tree gave.
pub(super) struct Packed {
    pub image_bytes: u64,
    pub content_bytes: u64,
}

/// Packs `tree` into a new read-only ext4 file at `ext4`, sized to fit.
pub(super) fn pack_ext4(
    tree: &Path,
    ext4: &Path,
    log: &Path,
    progress: &Progress,
) -> Result<Packed> {
    let content_bytes = tree_bytes(tree)?;
    let files = tree_files(tree)?;
    // Room for ext4 metadata plus a little slack; the image is read-only.
    let image_bytes = round_up(content_bytes + content_bytes / 6 + (64 << 20), 1 << 20);
    progress.step(&format!(
        "packing {} files ({} MiB) into ext4",
        files,
        content_bytes >> 20
    ));
    std::fs::File::create(ext4)
        .and_then(|f| f.set_len(image_bytes))
        .context("cannot create the ext4 image file")?;
    let mut mkfs = Command::new("mkfs.ext4");
    mkfs.args([
        "-q",
        "-F",
        "-L",
        "airlock-root",
        "-m",
        "0",
        "-b",
        "4096",
        "-O",
        "^has_journal",
    ])
    .arg("-N")
    .arg((files + files / 5 + 4096).to_string())
    .arg("-d")
    .arg(tree)
    .arg(ext4);
    run_logged(mkfs, "mkfs.ext4", log, |_| {})?;
    Ok(Packed {
        image_bytes,
        content_bytes,
    })
}

fn read_info(dir: &Path) -> Option<RootfsInfo> {
    if !dir.join("rootfs.ext4").is_file() {
        return None;
    }
    let text = std::fs::read_to_string(dir.join("rootfs.json")).ok()?;
    serde_json::from_str(&text).ok()
}

pub fn parse_package_list(text: &str) -> Vec<Package> {
    let mut packages: Vec<Package> = text
        .lines()
        .filter_map(|line| {
            let (name, version) = line.split_once('\t')?;
            Some(Package {
                name: name.trim().to_string(),
                version: version.trim().to_string(),
            })
        })
        .filter(|p| !p.name.is_empty())
        .collect();
    packages.sort_by(|a, b| a.name.cmp(&b.name));
    packages
}

/// apt-get inside the new root, with the host's DNS, /proc mounted, and no
/// service started by a package's scripts.
pub(super) fn install_packages(tree: &Path, packages: &[&str], log: &Path) -> Result<()> {
    std::fs::copy("/etc/resolv.conf", tree.join("etc/resolv.conf"))
        .context("cannot copy /etc/resolv.conf into the new root")?;
    let policy = tree.join("usr/sbin/policy-rc.d");
    std::fs::write(&policy, "#!/bin/sh\nexit 101\n").context("cannot write policy-rc.d")?;
    std::fs::set_permissions(&policy, std::os::unix::fs::PermissionsExt::from_mode(0o755))
        .context("cannot make policy-rc.d executable")?;
    let proc_mount = Mount::new("proc", &tree.join("proc"))?;

    let apt = |args: &[&str]| {
        let mut cmd = Command::new("chroot");
        cmd.arg(tree)
            .arg("apt-get")
            .args(["-q", "-y", "-o", "Dpkg::Use-Pty=0"])
            .args(args);
        cmd.env("DEBIAN_FRONTEND", "noninteractive")
            .env("LC_ALL", "C");
        cmd
    };
    run_logged(
        apt(&["update"]),
        "apt-get update in the new root",
        log,
        |_| {},
    )?;
    let mut install = apt(&["install", "--no-install-recommends"]);
    install.args(packages);
    let mut throttle = Throttle::new(Duration::from_secs(10));
    let (mut fetched, mut set_up) = (0usize, 0usize);
    run_logged(install, "apt-get install in the new root", log, |line| {
        if line.starts_with("Get:") {
            fetched += 1;
        } else if line.starts_with("Setting up ") {
            set_up += 1;
        }
        if throttle.ready() && fetched > 0 {
            eprintln!("[rootfs] {fetched} packages fetched, {set_up} set up");
        }
    })?;
    run_logged(apt(&["clean"]), "apt-get clean", log, |_| {})?;
    drop(proc_mount);
    std::fs::remove_file(&policy).context("cannot remove policy-rc.d")?;
    std::fs::write(tree.join("etc/resolv.conf"), "").context("cannot reset resolv.conf")?;
    Ok(())
}

/// A mount that is undone when dropped, so an error path leaves none behind.
pub(super) struct Mount {
    target: PathBuf,
}

impl Mount {
    pub(super) fn new(fstype: &str, target: &Path) -> Result<Mount> {
        std::fs::create_dir_all(target)
            .with_context(|| format!("cannot create {}", target.display()))?;
        let mut cmd = Command::new("mount");
        cmd.args(["-t", fstype, fstype]).arg(target);
        run_captured(cmd, &format!("mounting {fstype}"))?;
        Ok(Mount {
            target: target.to_path_buf(),
        })
    }

    /// An ext4 image mounted read-only through a loop device.
    pub(super) fn loop_read_only(image: &Path, target: &Path) -> Result<Mount> {
        std::fs::create_dir_all(target)
            .with_context(|| format!("cannot create {}", target.display()))?;
        let mut cmd = Command::new("mount");
        cmd.args(["-t", "ext4", "-o", "loop,ro"])
            .arg(image)
            .arg(target);
        run_captured(cmd, &format!("mounting {} read-only", image.display()))?;
        Ok(Mount {
            target: target.to_path_buf(),
        })
    }

    /// `source` bound onto `target` (which exists).
    pub(super) fn bind(source: &Path, target: &Path) -> Result<Mount> {
        let mut cmd = Command::new("mount");
        cmd.arg("--bind").arg(source).arg(target);
        run_captured(cmd, &format!("binding {}", source.display()))?;
        Ok(Mount {
            target: target.to_path_buf(),
        })
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let status = Command::new("umount").arg("-l").arg(&self.target).status();
        if !status.is_ok_and(|s| s.success()) {
            eprintln!("warning: could not unmount {}", self.target.display());
        }
    }
}

/// Drops what a sandbox never reads; the image is smaller and faster to copy.
pub(super) fn trim(tree: &Path) -> Result<()> {
    for sub in [
        "usr/share/doc",
        "usr/share/man",
        "usr/share/info",
        "usr/share/locale",
        "var/cache/apt",
        "var/lib/apt/lists",
        "var/cache/debconf/templates.dat-old",
        "var/log",
    ] {
        // Resolved inside the tree: a base's link never leads this onto
        // the host's own files.
        let path = super::custom::tree::resolve(tree, &Path::new("/").join(sub), false)?;
        match std::fs::symlink_metadata(&path) {
            Ok(meta) if meta.is_dir() => {
                std::fs::remove_dir_all(&path)
                    .with_context(|| format!("cannot remove {}", path.display()))?;
                std::fs::create_dir(&path)
                    .with_context(|| format!("cannot recreate {}", path.display()))?;
            }
            Ok(_) => std::fs::remove_file(&path)
                .with_context(|| format!("cannot remove {}", path.display()))?,
            Err(_) => {}
        }
    }
    Ok(())
}

/// Files the guest expects: mount points the agent uses, and a hostname.
pub(super) fn prepare_guest_files(tree: &Path) -> Result<()> {
    use super::custom::tree::{make_dirs, write_file};
    for dir in ["/proc", "/sys", "/dev", "/tmp", "/run"] {
        make_dirs(tree, Path::new(dir))
            .with_context(|| format!("cannot create {dir} in the rootfs"))?;
    }
    write_file(tree, Path::new("/etc/hostname"), b"airlock\n", 0o644)
}

fn tree_bytes(root: &Path) -> Result<u64> {
    walk(root, &mut |meta| round_up(meta.len(), 4096))
}

fn tree_files(root: &Path) -> Result<u64> {
    walk(root, &mut |_| 1)
}

fn walk(root: &Path, f: &mut impl FnMut(&std::fs::Metadata) -> u64) -> Result<u64> {
    let mut total = 0;
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in
            std::fs::read_dir(&dir).with_context(|| format!("cannot read {}", dir.display()))?
        {
            let entry = entry.with_context(|| format!("cannot read {}", dir.display()))?;
            let meta = entry
                .path()
                .symlink_metadata()
                .with_context(|| format!("cannot stat {}", entry.path().display()))?;
            total += f(&meta);
            if meta.is_dir() {
                stack.push(entry.path());
            }
        }
    }
    Ok(total)
}

fn round_up(value: u64, to: u64) -> u64 {
    value.div_ceil(to) * to
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn package_list_is_parsed_and_sorted() {
        let list = parse_package_list("python3\t3.11.2-1+b1\nbash\t5.2.15-2+b2\n\nbroken-line\n");
        assert_eq!(list.len(), 2);
        assert_eq!(
            list[0],
            Package {
                name: "bash".into(),
                version: "5.2.15-2+b2".into()
            }
        );
    }

    #[test]
    fn sizes_round_up() {
        assert_eq!(round_up(1, 4096), 4096);
        assert_eq!(round_up(4096, 4096), 4096);
        assert_eq!(round_up(0, 4096), 0);
    }
}

//! Builds the guest kernel from Debian's linux-source package, the config
//! fragment and the patch series under images/kernel.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

use super::command::{run_captured, run_logged};
use super::lock::Scratch;
use super::progress::{Progress, Throttle, format_elapsed};
use super::{publish, recipe};

/// A cached kernel build.
#[derive(Debug, Clone)]
pub struct Kernel {
    pub key: String,
    pub dir: PathBuf,
    pub info: KernelInfo,
}

/// Written beside the kernel as kernel.json.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct KernelInfo {
    /// Kernel release, e.g. "6.1.192".
    pub version: String,
    /// Version of Debian's source package.
    pub source_package_version: String,
    pub patches: Vec<String>,
    pub vmlinux_bytes: u64,
    pub build_seconds: f64,
}

impl Kernel {
    pub fn vmlinux(&self) -> PathBuf {
        self.dir.join("vmlinux")
    }
}

/// The version of the installed kernel source package.
pub fn source_package_version() -> Result<String> {
    let mut cmd = Command::new("dpkg-query");
    cmd.args(["-W", "-f=${Version}", recipe::KERNEL_SOURCE_PACKAGE]);
    let version = run_captured(cmd, "dpkg-query").with_context(|| {
        format!(
            "the kernel source is not installed: sudo apt-get install -y {}",
            recipe::KERNEL_SOURCE_PACKAGE
        )
    })?;
    Ok(version.trim().to_string())
}

/// Returns the cached kernel for this recipe, building it first if needed.
pub fn ensure(cache: &Path, source_version: &str) -> Result<Kernel> {
    let key = recipe::kernel_key(source_version);
    let dir = cache.join("kernels").join(&key);
    if let Some(info) = read_info(&dir) {
        return Ok(Kernel { key, dir, info });
    }
    let progress = Progress::new("kernel");
    let scratch = Scratch::create(cache, &format!("kernel-{key}"))?;
    let log = scratch.path().join("build.log");
    let src = scratch.path().join(recipe::KERNEL_SOURCE_DIR);

    progress.step(&format!(
        "unpacking {} {source_version}",
        recipe::KERNEL_SOURCE_PACKAGE
    ));
    let mut tar = Command::new("tar");
    tar.arg("-xf")
        .arg(recipe::KERNEL_SOURCE_TARBALL)
        .arg("-C")
        .arg(scratch.path());
    run_logged(tar, "unpacking the kernel source", &log, |_| {})?;
    if !src.is_dir() {
        bail!(
            "{} did not unpack to {}",
            recipe::KERNEL_SOURCE_TARBALL,
            src.display()
        );
    }

    progress.step(&format!(
        "applying {} patches",
        recipe::KERNEL_PATCHES.len()
    ));
    for (name, body) in recipe::KERNEL_PATCHES {
        let patch_file = scratch.path().join(name);
        std::fs::write(&patch_file, body).context("cannot write a patch file")?;
        let mut patch = Command::new("patch");
        patch
            .current_dir(&src)
            .args(["-p1", "--forward", "--batch", "-i"])
            .arg(&patch_file);
        run_logged(patch, &format!("applying {name}"), &log, |_| {})?;
    }

    progress.step("configuring (tinyconfig + images/kernel/config.fragment)");
    let fragment = scratch.path().join("config.fragment");
    std::fs::write(&fragment, recipe::KERNEL_CONFIG_FRAGMENT)
        .context("cannot write the config fragment")?;
    run_logged(make(&src, &["tinyconfig"]), "make tinyconfig", &log, |_| {})?;
    let mut merge = Command::new("scripts/kconfig/merge_config.sh");
    merge
        .current_dir(&src)
        .args(["-m", ".config"])
        .arg(&fragment);
    run_logged(merge, "merging the config fragment", &log, |_| {})?;
    run_logged(
        make(&src, &["olddefconfig"]),
        "make olddefconfig",
        &log,
        |_| {},
    )?;
    let dot_config =
        std::fs::read_to_string(src.join(".config")).context("cannot read the kernel .config")?;
    let unmet = recipe::unmet_requirements(&dot_config);
    if !unmet.is_empty() {
        let names: Vec<String> = unmet
            .iter()
            .map(|r| format!("{}={}", r.option, r.value.as_deref().unwrap_or("n")))
            .collect();
        bail!(
            "Kconfig did not accept these options of images/kernel/config.fragment (a dependency is \
             missing): {}",
            names.join(", ")
        );
    }

    let jobs = std::thread::available_parallelism().map_or(1, |n| n.get());
    progress.step(&format!(
        "compiling vmlinux with {jobs} jobs (a few minutes)"
    ));
    let mut compiled = 0usize;
    let mut throttle = Throttle::new(Duration::from_secs(15));
    let started = progress.elapsed();
    let jobs_arg = format!("-j{jobs}");
    run_logged(
        make(&src, &[&jobs_arg, "vmlinux"]),
        "compiling the kernel",
        &log,
        |line| {
            if line.trim_start().starts_with("CC ") {
                compiled += 1;
            }
            if throttle.ready() && compiled > 0 {
                eprintln!(
                    "[kernel] compiling: {compiled} files so far ({})",
                    format_elapsed(progress.elapsed() - started)
                );
            }
        },
    )?;
    let version = run_captured(make(&src, &["-s", "kernelrelease"]), "make kernelrelease")?
        .trim()
        .to_string();

    let out = scratch.path().join("out");
    std::fs::create_dir(&out).context("cannot create the kernel output directory")?;
    std::fs::copy(src.join("vmlinux"), out.join("vmlinux")).context("cannot copy vmlinux")?;
    std::fs::copy(src.join(".config"), out.join("config"))
        .context("cannot copy the kernel config")?;
    let info = KernelInfo {
        version,
        source_package_version: source_version.to_string(),
        patches: recipe::KERNEL_PATCHES
            .iter()
            .map(|(n, _)| n.to_string())
            .collect(),
        vmlinux_bytes: std::fs::metadata(out.join("vmlinux"))
            .map(|m| m.len())
            .unwrap_or(0),
        build_seconds: progress.elapsed().as_secs_f64(),
    };
    super::write_json(&out.join("kernel.json"), &info)?;
    publish(&out, &dir)?;
    progress.step(&format!(
        "done: Linux {} in {}",
        info.version,
        dir.display()
    ));
    Ok(Kernel { key, dir, info })
}

fn read_info(dir: &Path) -> Option<KernelInfo> {
    if !dir.join("vmlinux").is_file() {
        return None;
    }
    let text = std::fs::read_to_string(dir.join("kernel.json")).ok()?;
    serde_json::from_str(&text).ok()
}

fn make(src: &Path, args: &[&str]) -> Command {
    let mut cmd = Command::new("make");
    cmd.current_dir(src).args(args);
    // Reproducible-ish output: no host name or user baked into the banner.
    cmd.env("KBUILD_BUILD_USER", "airlock")
        .env("KBUILD_BUILD_HOST", "airlock");
    cmd
}

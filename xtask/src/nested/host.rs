//! What the nested host needs from this machine: QEMU, a Debian kernel with
//! its modules, busybox and cpio. Each missing piece is one line naming the
//! apt package.

use std::path::{Path, PathBuf};

use anyhow::{Result, bail};

pub const QEMU: &str = "qemu-system-x86_64";

/// A Debian kernel image with its module tree.
#[derive(Debug, Clone)]
pub struct HostKernel {
    pub release: String,
    pub vmlinuz: PathBuf,
    pub modules_dir: PathBuf,
}

/// Checks every tool and returns the kernel to boot.
pub fn check() -> Result<HostKernel> {
    if find_in_path(QEMU).is_none() {
        bail!(
            "{QEMU} not found: the nested test host needs QEMU (apt-get install qemu-system-x86)"
        );
    }
    if !Path::new("/bin/busybox").is_file() {
        bail!(
            "/bin/busybox not found: the nested test host needs it (apt-get install busybox-static)"
        );
    }
    if find_in_path("cpio").is_none() {
        bail!(
            "cpio not found: the nested test host packs its initramfs with it (apt-get install cpio)"
        );
    }
    let kernel = newest_kernel(Path::new("/boot"), Path::new("/lib/modules"))?;
    match std::env::var(KERNEL_ENV) {
        Ok(release) if !release.is_empty() => {
            chosen_kernel(Path::new("/boot"), Path::new("/lib/modules"), &release)
        }
        _ => Ok(kernel),
    }
}

/// Names the kernel release to boot instead of the newest one (for
/// measuring on both of two installed kernels).
pub const KERNEL_ENV: &str = "AIRLOCK_NESTED_KERNEL";

fn chosen_kernel(boot: &Path, modules: &Path, release: &str) -> Result<HostKernel> {
    let kernel = HostKernel {
        release: release.to_string(),
        vmlinuz: boot.join(format!("vmlinuz-{release}")),
        modules_dir: modules.join(release),
    };
    if !kernel.vmlinuz.is_file() || !kernel.modules_dir.join("modules.dep").is_file() {
        bail!(
            "{KERNEL_ENV}={release}: no {} with its modules in {}",
            kernel.vmlinuz.display(),
            kernel.modules_dir.display()
        );
    }
    Ok(kernel)
}

/// The newest `/boot/vmlinuz-*` that has a module tree with modules.dep.
fn newest_kernel(boot: &Path, modules: &Path) -> Result<HostKernel> {
    let mut found: Vec<HostKernel> = std::fs::read_dir(boot)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let name = entry.file_name().to_string_lossy().into_owned();
            let release = name.strip_prefix("vmlinuz-")?.to_string();
            let modules_dir = modules.join(&release);
            modules_dir
                .join("modules.dep")
                .is_file()
                .then(|| HostKernel {
                    release,
                    vmlinuz: entry.path(),
                    modules_dir,
                })
        })
        .collect();
    found.sort_by_key(|kernel| version_key(&kernel.release));
    match found.pop() {
        Some(kernel) => Ok(kernel),
        None => bail!(
            "no kernel for the nested test host in {} (a vmlinuz-* with its modules in {}): \
             apt-get install linux-image-amd64",
            boot.display(),
            modules.display()
        ),
    }
}

/// Orders `6.1.0-57-amd64` after `6.1.0-9-amd64`.
fn version_key(release: &str) -> Vec<u64> {
    release
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|part| part.parse().ok())
        .collect()
}

pub fn find_in_path(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|candidate| candidate.is_file())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn picks_the_newest_kernel_that_has_modules() {
        let dir = tempfile_dir();
        let boot = dir.join("boot");
        let modules = dir.join("modules");
        for release in ["6.1.0-9-amd64", "6.1.0-57-amd64", "6.1.0-60-amd64"] {
            std::fs::create_dir_all(&boot).unwrap();
            std::fs::write(boot.join(format!("vmlinuz-{release}")), b"").unwrap();
        }
        for release in ["6.1.0-9-amd64", "6.1.0-57-amd64"] {
            std::fs::create_dir_all(modules.join(release)).unwrap();
            std::fs::write(modules.join(release).join("modules.dep"), b"").unwrap();
        }
        let kernel = newest_kernel(&boot, &modules).unwrap();
        assert_eq!(kernel.release, "6.1.0-57-amd64");
        let err = newest_kernel(&dir.join("none"), &modules).unwrap_err();
        assert!(
            err.to_string()
                .contains("apt-get install linux-image-amd64"),
            "{err}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    fn tempfile_dir() -> PathBuf {
        let dir = std::env::temp_dir().join(format!("xtask-host-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }
}

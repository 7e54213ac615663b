//! `airlock doctor`: is this machine ready to run sandboxes, and if not, what
//! to do about it.

use std::fmt::Write as _;
use std::path::Path;

use crate::host_kvm::{self, KvmFlavor};
use crate::image;

/// Disk a first image build needs: kernel source and objects, the debootstrap
/// tree and the ext4 images.
const BUILD_DISK_BYTES: u64 = 6 << 30;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Ok,
    Warn,
    Fail,
}

#[derive(Debug, Clone)]
pub struct Check {
    pub name: &'static str,
    pub status: Status,
    pub detail: String,
}

#[derive(Debug, Clone)]
pub struct Report {
    pub checks: Vec<Check>,
    pub flavor: Option<KvmFlavor>,
}

impl Report {
    pub fn ready(&self) -> bool {
        self.checks.iter().all(|c| c.status != Status::Fail)
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        for check in &self.checks {
            let tag = match check.status {
                Status::Ok => "ok  ",
                Status::Warn => "warn",
                Status::Fail => "FAIL",
            };
            let _ = writeln!(out, "[{tag}] {}: {}", check.name, check.detail);
        }
        let verdict = if self.ready() {
            "ready: airlock can run sandboxes on this machine"
        } else {
            "not ready: fix the FAIL lines above"
        };
        let _ = writeln!(out, "verdict: {verdict}");
        out
    }
}

/// Runs every check; never fails itself, it reports.
pub fn run(cache: &Path) -> Report {
    let mut checks = Vec::new();
    let device = host_kvm::kvm_device_path();
    let kvm_ok = match host_kvm::check_kvm_access(&device) {
        Ok(version) => {
            checks.push(Check {
                name: "kvm",
                status: Status::Ok,
                detail: format!("{} opens, API version {version}", device.display()),
            });
            true
        }
        Err(err) => {
            checks.push(Check {
                name: "kvm",
                status: Status::Fail,
                detail: err.to_string(),
            });
            false
        }
    };
    let flavor = kvm_ok.then(KvmFlavor::detect);
    if let Some(flavor) = flavor {
        checks.push(Check {
            name: "kvm flavor",
            status: Status::Ok,
            detail: format!("{}: {}", flavor_tag(flavor), flavor.describe()),
        });
    }
    checks.push(image_check(cache));
    checks.push(disk_check(cache));
    Report { checks, flavor }
}

pub fn flavor_tag(flavor: KvmFlavor) -> &'static str {
    match flavor {
        KvmFlavor::Hardware => "hardware",
        KvmFlavor::SoftwareNestedPvm => "kvm_pvm",
    }
}

fn image_check(cache: &Path) -> Check {
    let images = cache.join("images");
    let mut newest: Option<(std::time::SystemTime, image::Manifest)> = None;
    if let Ok(entries) = std::fs::read_dir(&images) {
        for entry in entries.flatten() {
            let path = entry.path().join("manifest.json");
            let Ok(text) = std::fs::read_to_string(&path) else {
                continue;
            };
            let Ok(manifest) = serde_json::from_str::<image::Manifest>(&text) else {
                continue;
            };
            let modified = entry
                .metadata()
                .and_then(|m| m.modified())
                .unwrap_or(std::time::UNIX_EPOCH);
            if newest.as_ref().is_none_or(|(t, _)| modified > *t) {
                newest = Some((modified, manifest));
            }
        }
    }
    match newest {
        Some((_, m)) => Check {
            name: "image",
            status: Status::Ok,
            detail: format!(
                "{} (Linux {}, {} packages, built {}) in {}",
                m.recipe_hash,
                m.kernel.version,
                m.rootfs.packages.len(),
                m.build_date,
                images.display()
            ),
        },
        None => Check {
            name: "image",
            status: Status::Warn,
            detail: format!(
                "no guest image in {} yet: `airlock image build` makes one (as root, ~10 min), \
                 and `airlock serve` does so on first use",
                images.display()
            ),
        },
    }
}

fn disk_check(cache: &Path) -> Check {
    let probe = cache
        .ancestors()
        .find(|p| p.exists())
        .unwrap_or(Path::new("/"));
    match free_bytes(probe) {
        Some(free) => Check {
            name: "disk",
            status: if free >= BUILD_DISK_BYTES {
                Status::Ok
            } else {
                Status::Warn
            },
            detail: format!(
                "{:.1} GiB free at {}{}",
                free as f64 / (1u64 << 30) as f64,
                probe.display(),
                if free >= BUILD_DISK_BYTES {
                    ""
                } else {
                    " (an image build needs ~6 GiB)"
                }
            ),
        },
        None => Check {
            name: "disk",
            status: Status::Warn,
            detail: format!("cannot stat {}", probe.display()),
        },
    }
}

fn free_bytes(path: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c_path = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
    let mut stat = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: statvfs writes into the buffer we pass and nothing else.
    if unsafe { libc::statvfs(c_path.as_ptr(), stat.as_mut_ptr()) } != 0 {
        return None;
    }
    // SAFETY: statvfs succeeded, so the struct is initialised.
    let stat = unsafe { stat.assume_init() };
    Some(stat.f_bavail.saturating_mul(stat.f_frsize))
}

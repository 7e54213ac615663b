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

/// How long the boot check waits for the agent (a kvm_pvm boot takes ~40 s).
const BOOT_CHECK_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(300);

/// Runs every check; never fails itself, it reports. With `boot`, also
/// boots the newest image and times it to agent-ready.
pub fn run(cache: &Path, boot: bool) -> Report {
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
        if flavor == KvmFlavor::SoftwareNestedPvm {
            checks.push(Check {
                name: "kvm trust",
                status: Status::Warn,
                detail: PVM_TRUST.into(),
            });
        }
    }
    checks.extend(confinement_checks(&crate::confinement::Support::probe()));
    let (image_check, newest) = image_check(cache);
    checks.push(image_check);
    checks.push(disk_check(cache));
    if boot {
        match (&newest, kvm_ok) {
            (Some(image), true) => checks.push(boot_check(image, flavor)),
            _ => checks.push(Check {
                name: "boot",
                status: Status::Warn,
                detail: "skipped: needs a working /dev/kvm and a built image".into(),
            }),
        }
    }
    Report { checks, flavor }
}

/// What kvm_pvm means for a user, in plain words.
const PVM_TRUST: &str = "kvm_pvm does not reliably preserve guest user-space register state \
    (FPU/SSE state has been measured lost at random: corrupted copies, crashing interpreters), \
    so use this host for trying airlock, not for trusting its results. airlock's own tests run \
    on a correct KVM here through the nested test host: `cargo xtask test` (see README, Testing)";

fn boot_check(image: &image::Image, flavor: Option<KvmFlavor>) -> Check {
    eprintln!(
        "doctor: booting {} to check it (about 40 s on kvm_pvm, well under a second on hardware KVM)",
        image.manifest.recipe_hash
    );
    match boot_to_agent(image) {
        Ok((elapsed, version)) => Check {
            name: "boot",
            status: Status::Ok,
            detail: format!(
                "booted to agent-ready in {:.1} s (agent {version}){}",
                elapsed.as_secs_f64(),
                if flavor == Some(KvmFlavor::SoftwareNestedPvm) {
                    "; cold boots are slow on kvm_pvm, sandboxes start from snapshots instead"
                } else {
                    ""
                }
            ),
        },
        Err(err) => Check {
            name: "boot",
            status: Status::Fail,
            detail: format!("{err:#}"),
        },
    }
}

fn boot_to_agent(image: &image::Image) -> anyhow::Result<(std::time::Duration, String)> {
    use anyhow::Context;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let run_dir = tempfile::tempdir().context("cannot create a run directory")?;
        let spec = crate::vm::VmSpec::for_image(image, run_dir.path())
            .context("cannot find the airlock executable")?;
        let started = std::time::Instant::now();
        let mut vm = crate::vm::Vm::spawn(&spec).await?;
        vm.wait_agent_ready(BOOT_CHECK_TIMEOUT).await?;
        let client = crate::agent_client::AgentClient::connect(
            vm.vsock_socket(),
            airlock_protocol::AGENT_VSOCK_PORT,
            std::time::Duration::from_secs(30),
        )
        .await?;
        let pong = client.ping().await?;
        let elapsed = started.elapsed();
        let _ = vm.stop(std::time::Duration::from_secs(10)).await;
        Ok((elapsed, pong.agent_version))
    })
}

/// What confinement this host allows each VMM.
fn confinement_checks(support: &crate::confinement::Support) -> Vec<Check> {
    let mut checks = vec![Check {
        name: "seccomp",
        status: if support.seccomp {
            Status::Ok
        } else {
            Status::Fail
        },
        detail: if support.seccomp {
            "available: each VMM thread runs under its own syscall allow-list".into()
        } else {
            "this kernel has no seccomp filters (CONFIG_SECCOMP_FILTER); airlock will not run \
             VMMs without them unless AIRLOCK_CONFINEMENT=off"
                .into()
        },
    }];
    checks.push(if support.root {
        Check {
            name: "jail",
            status: Status::Ok,
            detail: format!(
                "running as root: each VMM gets its own mount, PID, IPC, UTS and network \
                 namespaces and root, as uid/gid {}",
                crate::vmm::jail::DEFAULT_ID
            ),
        }
    } else if support.user_namespaces {
        Check {
            name: "jail",
            status: Status::Ok,
            detail: "unprivileged user namespaces are allowed: each VMM gets its own \
                     namespaces and root, as this user with no capabilities"
                .into(),
        }
    } else {
        Check {
            name: "jail",
            status: Status::Fail,
            detail: "not root and unprivileged user namespaces are off, so VMMs cannot be \
                     jailed: run as root, or enable them (sysctl user.max_user_namespaces=10000, \
                     and kernel.unprivileged_userns_clone=1 on Debian), or accept seccomp alone \
                     with AIRLOCK_CONFINEMENT=no-jail"
                .into(),
        }
    });
    checks.push(match &support.cgroup {
        Ok(dir) => Check {
            name: "cgroup",
            status: Status::Ok,
            detail: format!(
                "each VMM gets a cgroup under {} with memory.max and pids.max",
                dir.display()
            ),
        },
        Err(why) => Check {
            name: "cgroup",
            status: Status::Warn,
            detail: why.clone(),
        },
    });
    checks
}

pub fn flavor_tag(flavor: KvmFlavor) -> &'static str {
    match flavor {
        KvmFlavor::Hardware => "hardware",
        KvmFlavor::SoftwareNestedPvm => "kvm_pvm",
    }
}

fn image_check(cache: &Path) -> (Check, Option<image::Image>) {
    let images = cache.join("images");
    let mut newest: Option<(std::time::SystemTime, image::Manifest, std::path::PathBuf)> = None;
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
            if newest.as_ref().is_none_or(|(t, _, _)| modified > *t) {
                newest = Some((modified, manifest, entry.path()));
            }
        }
    }
    match newest {
        Some((_, m, dir)) => (
            Check {
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
            Some(image::Image {
                dir,
                manifest: m.clone(),
            }),
        ),
        None => (
            Check {
                name: "image",
                status: Status::Warn,
                detail: format!(
                    "no guest image in {} yet: `airlock image build` makes one (as root, ~10 min), \
                 and `airlock serve` does so on first use",
                    images.display()
                ),
            },
            None,
        ),
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

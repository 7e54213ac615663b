//! What the gateway asks of every VMM it starts: seccomp filters, the jail
//! (namespaces, pivot_root, an unprivileged uid), and a cgroup where the
//! host delegates one; and what this host allows of it, for `airlock doctor`.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use crate::vmm::jail::DEFAULT_ID;

/// Where airlock makes VMM cgroups when it is root and the host has cgroup v2.
const CGROUP_ROOT: &str = "/sys/fs/cgroup";
const CGROUP_NAME: &str = "airlock";
const CONTROLLERS: [&str; 3] = ["memory", "pids", "cpu"];
/// The VMM's own memory beyond the guest's: its heap, page tables, the
/// device buffers the host bounds (64 MiB covers them with room).
const VMM_OVERHEAD_BYTES: u64 = 64 << 20;
/// Threads beyond the vCPUs: main, control, signals, vsock, and slack.
const VMM_EXTRA_PIDS: u32 = 8;

/// `AIRLOCK_CONFINEMENT`: `full` (the default), `no-jail` (seccomp only),
/// `off`, or `audit` (full, but syscalls outside the filters are logged by
/// the kernel instead of ending the VMM: for developers).
pub const ENV: &str = "AIRLOCK_CONFINEMENT";

#[derive(Debug, Clone)]
pub struct Confinement {
    pub seccomp: bool,
    pub seccomp_audit_only: bool,
    /// None: the VMM runs unjailed (for debugging, and to measure the jail).
    pub jail: Option<JailPolicy>,
}

#[derive(Debug, Clone)]
pub struct JailPolicy {
    pub uid: u32,
    pub gid: u32,
    /// The cgroup v2 directory VMM cgroups go under, if the host has one.
    pub cgroup_parent: Option<PathBuf>,
    /// cpu.max for each VMM ("QUOTA PERIOD"), if set.
    pub cpu_max: Option<String>,
}

static CURRENT: OnceLock<Confinement> = OnceLock::new();

impl Confinement {
    /// Everything on: seccomp, the jail, and the host's cgroup if there is one.
    pub fn full() -> Confinement {
        Confinement {
            seccomp: true,
            seccomp_audit_only: false,
            jail: Some(JailPolicy {
                uid: DEFAULT_ID,
                gid: DEFAULT_ID,
                cgroup_parent: prepare_cgroup_parent().ok(),
                cpu_max: None,
            }),
        }
    }

    /// Sets the process-wide policy (once, at start; later calls are ignored).
    pub fn set_current(confinement: Confinement) {
        let _ = CURRENT.set(confinement);
    }

    /// The policy `AIRLOCK_CONFINEMENT` names (see [`ENV`]).
    pub fn from_env() -> Result<Confinement, String> {
        let value = std::env::var(ENV).unwrap_or_default();
        let mut confinement = Confinement::full();
        match value.as_str() {
            "" | "full" => {}
            "no-jail" => confinement.jail = None,
            "off" => {
                confinement.jail = None;
                confinement.seccomp = false;
            }
            "audit" => confinement.seccomp_audit_only = true,
            other => {
                return Err(format!(
                    "{ENV}={other:?} is not one of full, no-jail, off, audit"
                ));
            }
        }
        Ok(confinement)
    }

    /// The process-wide policy: what `set_current` set, else the one
    /// `AIRLOCK_CONFINEMENT` names (full confinement if it names none).
    pub fn current() -> Confinement {
        CURRENT
            .get_or_init(|| {
                Confinement::from_env().unwrap_or_else(|err| {
                    tracing::error!("{err}; confining fully");
                    Confinement::full()
                })
            })
            .clone()
    }

    /// The `airlock vmm` arguments for a VM of this size.
    pub fn vmm_args(&self, vcpus: u8, memory_mib: u32) -> Vec<OsString> {
        let mut args: Vec<OsString> = vec![format!("--seccomp={}", self.seccomp).into()];
        if self.seccomp_audit_only {
            args.push("--seccomp-audit-only".into());
        }
        let Some(jail) = &self.jail else {
            return args;
        };
        args.push("--jail".into());
        args.push(format!("--jail-uid={}", jail.uid).into());
        args.push(format!("--jail-gid={}", jail.gid).into());
        if let Some(parent) = &jail.cgroup_parent {
            let memory = (u64::from(memory_mib) << 20) + VMM_OVERHEAD_BYTES;
            let mut parent_arg = OsString::from("--cgroup-parent=");
            parent_arg.push(parent);
            args.push(parent_arg);
            args.push(format!("--cgroup-memory-max={memory}").into());
            args.push(format!("--cgroup-pids-max={}", u32::from(vcpus) + VMM_EXTRA_PIDS).into());
            if let Some(cpu) = &jail.cpu_max {
                args.push(format!("--cgroup-cpu-max={cpu}").into());
            }
        }
        args
    }
}

/// Makes (or finds) the cgroup v2 directory for VMM cgroups, with the
/// memory, pids and cpu controllers enabled for its children.
pub fn prepare_cgroup_parent() -> Result<PathBuf, String> {
    let root = Path::new(CGROUP_ROOT);
    if !root.join("cgroup.controllers").is_file() {
        return Err(format!(
            "{CGROUP_ROOT} is not a cgroup v2 hierarchy (this host uses cgroup v1 or none); \
             VMMs run without memory and pids limits of their own. Boot with \
             systemd.unified_cgroup_hierarchy=1 to have them"
        ));
    }
    let parent = root.join(CGROUP_NAME);
    let not_delegated = |why: String| {
        format!(
            "{why}: run airlock as root, or delegate a cgroup to it \
             (sudo mkdir {0} && sudo chown $USER {0} {0}/cgroup.procs {0}/cgroup.subtree_control, \
             with +memory +pids +cpu in {CGROUP_ROOT}/cgroup.subtree_control)",
            parent.display()
        )
    };
    if !parent.is_dir() {
        std::fs::create_dir(&parent)
            .map_err(|e| not_delegated(format!("cannot create {} ({e})", parent.display())))?;
    }
    // One made by root for a root gateway is no use to another user's: the
    // VMMs' cgroups could not be made in it.
    for path in [parent.clone(), parent.join("cgroup.procs")] {
        if !writable(&path) {
            return Err(not_delegated(format!(
                "{} is not writable by this user",
                path.display()
            )));
        }
    }
    enable_controllers(root)?;
    enable_controllers(&parent)?;
    remove_stale_cgroups(&parent);
    Ok(parent)
}

fn writable(path: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let Ok(path) = std::ffi::CString::new(path.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: access reads a NUL-terminated path we own.
    unsafe { libc::access(path.as_ptr(), libc::W_OK) == 0 }
}

/// Removes VMM cgroups whose supervisor is gone: one that was killed
/// (SIGKILL) could not remove its own. A cgroup is named by its
/// supervisor's pid, so one of a live supervisor is never touched.
fn remove_stale_cgroups(parent: &Path) {
    let Ok(entries) = std::fs::read_dir(parent) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix("vmm-"))
            .and_then(|p| p.parse::<libc::pid_t>().ok())
        else {
            continue;
        };
        // SAFETY: signal 0 only asks whether the process exists.
        let gone = unsafe { libc::kill(pid, 0) } != 0
            && std::io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH);
        if gone {
            // Fails (harmlessly) if something still runs in it.
            let _ = std::fs::remove_dir(entry.path());
        }
    }
}

fn enable_controllers(dir: &Path) -> Result<(), String> {
    let control = dir.join("cgroup.subtree_control");
    let enabled = std::fs::read_to_string(&control).unwrap_or_default();
    let missing: Vec<String> = CONTROLLERS
        .iter()
        .filter(|c| !enabled.split_whitespace().any(|e| e == **c))
        .map(|c| format!("+{c}"))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    std::fs::write(&control, missing.join(" ")).map_err(|e| {
        format!(
            "cannot enable {} in {} ({e}); without them VMMs have no cgroup limits",
            missing.join(" "),
            control.display()
        )
    })
}

/// What this host allows, for `airlock doctor`.
#[derive(Debug, Clone)]
pub struct Support {
    pub seccomp: bool,
    /// Unprivileged user namespaces (needed for the jail when not root).
    pub user_namespaces: bool,
    pub root: bool,
    /// The cgroup parent, or why there is none.
    pub cgroup: Result<PathBuf, String>,
}

impl Support {
    pub fn probe() -> Support {
        Support {
            seccomp: seccomp_available(),
            user_namespaces: user_namespaces_available(),
            // SAFETY: geteuid cannot fail.
            root: unsafe { libc::geteuid() } == 0,
            cgroup: prepare_cgroup_parent(),
        }
    }

    /// Whether a jail can be made here.
    pub fn can_jail(&self) -> bool {
        self.root || self.user_namespaces
    }
}

fn seccomp_available() -> bool {
    // SAFETY: PR_GET_SECCOMP only reads this thread's mode.
    unsafe { libc::prctl(libc::PR_GET_SECCOMP, 0, 0, 0, 0) >= 0 }
}

fn user_namespaces_available() -> bool {
    let max = std::fs::read_to_string("/proc/sys/user/max_user_namespaces")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .unwrap_or(0);
    let debian_switch = std::fs::read_to_string("/proc/sys/kernel/unprivileged_userns_clone")
        .map(|s| s.trim() != "0")
        .unwrap_or(true);
    max > 0 && debian_switch
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_cgroups_of_dead_supervisors_are_removed() {
        let parent = tempfile::tempdir().unwrap();
        let live = parent.path().join(format!("vmm-{}", std::process::id()));
        // Past the largest pid Linux hands out (2^22).
        let dead = parent.path().join("vmm-4194305");
        let other = parent.path().join("not-a-vmm");
        for dir in [&live, &dead, &other] {
            std::fs::create_dir(dir).unwrap();
        }
        remove_stale_cgroups(parent.path());
        assert!(live.is_dir() && other.is_dir());
        assert!(!dead.exists());
    }

    #[test]
    fn vmm_args_carry_the_policy() {
        let policy = Confinement {
            seccomp: true,
            seccomp_audit_only: false,
            jail: Some(JailPolicy {
                uid: 1234,
                gid: 99,
                cgroup_parent: Some("/sys/fs/cgroup/airlock".into()),
                cpu_max: Some("100000 100000".into()),
            }),
        };
        let args: Vec<String> = policy
            .vmm_args(2, 512)
            .into_iter()
            .map(|a| a.into_string().unwrap())
            .collect();
        assert_eq!(
            args,
            [
                "--seccomp=true",
                "--jail",
                "--jail-uid=1234",
                "--jail-gid=99",
                "--cgroup-parent=/sys/fs/cgroup/airlock",
                "--cgroup-memory-max=603979776",
                "--cgroup-pids-max=10",
                "--cgroup-cpu-max=100000 100000",
            ]
        );
        let off = Confinement {
            seccomp: false,
            seccomp_audit_only: false,
            jail: None,
        };
        assert_eq!(
            off.vmm_args(1, 512),
            vec![OsString::from("--seccomp=false")]
        );
    }
}

//! The jail an `airlock vmm` process puts itself in before it builds the VM
//! (the job of Firecracker's jailer, done in-process):
//!
//! 1. as the caller: open /dev/kvm, make the VMM's cgroup;
//! 2. unshare mount, PID, IPC, UTS and network namespaces (and a user
//!    namespace when not root), then fork: the child is PID 1 of the new
//!    PID namespace and becomes the VMM; the parent stays outside as a small
//!    supervisor that forwards stop signals and reports the child's end;
//! 3. in the child: join the cgroup, open its own page map (diff
//!    snapshots read it), pivot_root into a fresh tmpfs that holds only the
//!    kernel, rootfs, template and a paused state to resume (read-only
//!    binds), the run directory (its sockets and console log) and a
//!    snapshot directory, with no /proc;
//! 4. drop to the unprivileged uid/gid, no capabilities, no_new_privs, not
//!    dumpable, rlimits set.
//!
//! The VMM then opens everything by its path inside the jail.

mod cgroup;
mod mounts;
mod privileges;
mod supervisor;

use std::fs::File;
use std::os::fd::{FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};

pub use cgroup::CgroupLimits;
pub use privileges::forbid_new_processes;

use crate::vmm::config::VmmConfig;

/// Inside the jail, where each thing is.
pub const KERNEL: &str = "/kernel";
pub const ROOTFS: &str = "/rootfs";
pub const TEMPLATE: &str = "/template";
pub const RUN: &str = "/run";
pub const SNAPSHOT: &str = "/snapshot";
pub const RESUME: &str = "/resume";

/// The uid and gid a VMM runs as when airlock is root: `nobody`. Each VMM is
/// alone in its namespaces, so sharing the id does not let one reach another.
pub const DEFAULT_ID: u32 = 65534;

#[derive(Debug, Clone, clap::Args)]
pub struct JailArgs {
    /// Confine the VMM in its own namespaces and root, as an unprivileged
    /// user (see src/vmm/jail).
    #[arg(long)]
    pub jail: bool,
    /// The uid the jailed VMM runs as, when airlock is root.
    #[arg(long, default_value_t = DEFAULT_ID)]
    pub jail_uid: u32,
    /// The gid the jailed VMM runs as, when airlock is root.
    #[arg(long, default_value_t = DEFAULT_ID)]
    pub jail_gid: u32,
    /// Make the VMM's cgroup under this cgroup v2 directory.
    #[arg(long)]
    pub cgroup_parent: Option<PathBuf>,
    #[command(flatten)]
    pub cgroup: CgroupLimits,
}

#[derive(Debug, thiserror::Error)]
pub enum JailError {
    #[error("jail: {what}: {source}")]
    Os {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("jail: {0}")]
    Setup(String),
}

pub(crate) fn os_error(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> JailError {
    let what = what.into();
    move |source| JailError::Os { what, source }
}

/// Returns -1 as the last OS error, for libc calls.
pub(crate) fn check(ret: libc::c_int, what: &str) -> Result<(), JailError> {
    if ret < 0 {
        return Err(JailError::Os {
            what: what.to_string(),
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(())
}

/// What the VMM inside the jail is given.
pub struct Jailed {
    /// The config with every path rewritten to its place inside the jail.
    pub config: VmmConfig,
    /// /dev/kvm, opened before the jail hides it.
    pub kvm: OwnedFd,
    /// The VMM's own /proc/self/pagemap (a restored VM's diff snapshots
    /// read it), opened before the jail hides /proc.
    pub pagemap: Option<OwnedFd>,
    /// This process's pid as the host sees it (it is 1 inside).
    pub host_pid: u32,
}

/// Host paths the jail binds into its root.
struct Binds {
    kernel: PathBuf,
    rootfs: PathBuf,
    template: Option<PathBuf>,
    resume: Option<PathBuf>,
    run_dir: PathBuf,
    snapshot: Option<PathBuf>,
}

/// Enters the jail. Returns in the jailed child only; the supervisor
/// process outside never returns from here (it exits with the child's code).
/// Must be called while the process has one thread.
pub fn enter(config: &VmmConfig) -> Result<Jailed, JailError> {
    let binds = binds_of(config)?;
    let kvm = open_kvm()?;
    let cgroup = match &config.jail.cgroup_parent {
        Some(parent) => Some(cgroup::Cgroup::create(parent, &config.jail.cgroup)?),
        None => None,
    };
    let as_root = privileges::is_root();
    privileges::unshare_namespaces(!as_root)?;
    let (child, parent_end) = supervisor::fork()?;
    let Some(handshake) = child else {
        // The supervisor: never returns.
        drop(kvm);
        supervisor::run(parent_end, cgroup)
    };
    let host_pid = handshake.host_pid()?;
    if let Some(cgroup) = &cgroup {
        cgroup.join()?;
    }
    // This process's own page map: the fd is bound to the memory of the
    // process that opens it.
    let pagemap = match &binds.template {
        Some(_) => Some(OwnedFd::from(
            File::open("/proc/self/pagemap").map_err(os_error("cannot open /proc/self/pagemap"))?,
        )),
        None => None,
    };
    mounts::pivot_into_new_root(&binds)?;
    privileges::set_hostname("airlock-vmm")?;
    let console_bytes = config.console_max_bytes;
    let snapshot_bytes = config
        .snapshot_dir
        .as_ref()
        .map(|_| config.memory_mib_bytes());
    privileges::set_rlimits(console_bytes, snapshot_bytes)?;
    let (uid, gid) = (config.jail.jail_uid, config.jail.jail_gid);
    if as_root {
        privileges::give_to(Path::new(RUN), uid, gid)?;
        if binds.snapshot.is_some() {
            privileges::give_to(Path::new(SNAPSHOT), uid, gid)?;
        }
    }
    privileges::drop_privileges(as_root, uid, gid)?;
    let mut inside = config.clone();
    inside.kernel = KERNEL.into();
    inside.rootfs = ROOTFS.into();
    inside.restore = binds.template.as_ref().map(|_| TEMPLATE.into());
    inside.resume = binds.resume.as_ref().map(|_| RESUME.into());
    inside.snapshot_dir = binds.snapshot.as_ref().map(|_| SNAPSHOT.into());
    inside.vsock_socket = in_run_dir(&config.vsock_socket)?;
    inside.console_log = match &config.console_log {
        Some(path) => Some(in_run_dir(path)?),
        None => None,
    };
    Ok(Jailed {
        config: inside,
        kvm,
        pagemap,
        host_pid,
    })
}

fn binds_of(config: &VmmConfig) -> Result<Binds, JailError> {
    let canonical = |path: &Path| {
        path.canonicalize()
            .map_err(os_error(format!("cannot find {}", path.display())))
    };
    let run_dir = config
        .vsock_socket
        .parent()
        .ok_or_else(|| JailError::Setup("the vsock socket has no directory".into()))?;
    if let Some(log) = &config.console_log
        && log.parent() != Some(run_dir)
    {
        return Err(JailError::Setup(format!(
            "the console log {} must be in the run directory {}",
            log.display(),
            run_dir.display()
        )));
    }
    let binds = Binds {
        kernel: canonical(&config.kernel)?,
        rootfs: canonical(&config.rootfs)?,
        template: config.restore.as_deref().map(canonical).transpose()?,
        resume: config.resume.as_deref().map(canonical).transpose()?,
        run_dir: canonical(run_dir)?,
        snapshot: config.snapshot_dir.as_deref().map(canonical).transpose()?,
    };
    if privileges::is_root() {
        let (uid, gid) = (config.jail.jail_uid, config.jail.jail_gid);
        let mut files = vec![binds.kernel.clone(), binds.rootfs.clone()];
        if let Some(template) = &binds.template {
            files.push(template.join(crate::vmm::snapshot::STATE_FILE));
            files.push(template.join(crate::vmm::snapshot::MEMORY_FILE));
        }
        if let Some(resume) = &binds.resume {
            files.push(resume.join(crate::vmm::snapshot::STATE_FILE));
            files.push(resume.join(crate::vmm::snapshot::overlay::OVERLAY_FILE));
        }
        for file in files {
            check_readable_by(&file, uid, gid)?;
        }
    }
    Ok(binds)
}

/// A file the jailed VMM opens must be readable by its uid; say which is
/// not, here, rather than let the VMM fail on a jail path.
fn check_readable_by(path: &Path, uid: u32, gid: u32) -> Result<(), JailError> {
    use std::os::unix::fs::MetadataExt;
    let meta =
        std::fs::metadata(path).map_err(os_error(format!("cannot stat {}", path.display())))?;
    let mode = meta.mode();
    let readable = mode & 0o004 != 0
        || (meta.uid() == uid && mode & 0o400 != 0)
        || (meta.gid() == gid && mode & 0o040 != 0);
    if readable {
        Ok(())
    } else {
        Err(JailError::Setup(format!(
            "{} is not readable by the jailed VMM's uid {uid}: make it readable by all \
             (chmod a+r), as airlock's own images and templates are",
            path.display()
        )))
    }
}

/// For an error that names paths inside the jail: which host files they are.
pub fn host_paths_note(host: &VmmConfig, detail: &str) -> String {
    let mut notes = Vec::new();
    let mut note = |inside: &str, outside: Option<&Path>| {
        if let Some(outside) = outside
            && detail.contains(inside)
        {
            notes.push(format!("{inside} is {}", outside.display()));
        }
    };
    note(KERNEL, Some(&host.kernel));
    note(ROOTFS, Some(&host.rootfs));
    note(TEMPLATE, host.restore.as_deref());
    note(RESUME, host.resume.as_deref());
    note(RUN, host.vsock_socket.parent());
    if notes.is_empty() {
        String::new()
    } else {
        format!(" (in the jail {})", notes.join(", "))
    }
}

fn in_run_dir(path: &Path) -> Result<PathBuf, JailError> {
    let name = path
        .file_name()
        .ok_or_else(|| JailError::Setup(format!("{} has no file name", path.display())))?;
    Ok(Path::new(RUN).join(name))
}

fn open_kvm() -> Result<OwnedFd, JailError> {
    let path = crate::host_kvm::kvm_device_path();
    crate::host_kvm::check_kvm_access(&path).map_err(|e| JailError::Setup(e.to_string()))?;
    let file = File::options()
        .read(true)
        .write(true)
        .open(&path)
        .map_err(os_error(format!("cannot open {}", path.display())))?;
    Ok(OwnedFd::from(file))
}

/// An fd number received from elsewhere (a pipe end), owned from here on.
pub(crate) fn owned(raw: libc::c_int) -> OwnedFd {
    // SAFETY: callers pass a fresh fd from pipe2 that nothing else owns.
    unsafe { OwnedFd::from_raw_fd(raw) }
}

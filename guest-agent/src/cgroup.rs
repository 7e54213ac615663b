//! cgroup v2 confinement of user code.
//!
//! ```text
//! /sys/fs/cgroup            the agent (unlimited; oom_score_adj -1000)
//! └─ sandbox/               every user process: memory.max, pids.max
//!    ├─ python/ javascript/ bash/   one per warm interpreter
//!    └─ exec-N/             one per exec call
//! ```
//!
//! Controllers are enabled at the root only, so the leaves are plain
//! groups: cheap to create, and each has `cgroup.kill`, which kills its whole
//! tree (including processes that forked away from their process group).
//! The memory limit sits on `sandbox/`, below guest RAM, so running out of
//! memory makes the kernel kill user code inside it, never the agent.

use std::io;
use std::os::fd::{FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use crate::log::log;
use crate::sys;

pub const CGROUP_ROOT: &str = "/sys/fs/cgroup";
const SANDBOX: &str = "sandbox";
/// cpu.weight of all user code (the default, 100, is what the agent's own
/// threads weigh each, as tasks of the root group).
const SANDBOX_CPU_WEIGHT: &[u8] = b"1";

/// The sandbox cgroup, parent of all user processes.
pub struct Sandbox {
    dir: PathBuf,
    has_kill: bool,
}

/// A leaf group under the sandbox.
pub struct Cgroup {
    dir: PathBuf,
    has_kill: bool,
}

impl Sandbox {
    /// Enables the memory, pids and cpu controllers and creates `sandbox/` with
    /// the given limits. Fails if cgroup2 is not mounted.
    pub fn setup(memory_max: Option<u64>, pids_max: Option<u64>) -> io::Result<Sandbox> {
        let root = Path::new(CGROUP_ROOT);
        if !root.join("cgroup.subtree_control").exists() {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                "cgroup2 is not mounted",
            ));
        }
        for controller in ["+memory", "+pids", "+cpu"] {
            if let Err(e) =
                sys::write_small(&root.join("cgroup.subtree_control"), controller.as_bytes())
            {
                log!("enabling the {controller} controller: {e}");
            }
        }
        let dir = root.join(SANDBOX);
        mkdir(&dir)?;
        let sandbox = Sandbox {
            has_kill: dir.join("cgroup.kill").exists(),
            dir,
        };
        if let Some(bytes) = memory_max {
            sandbox.set_memory_max(bytes)?;
        }
        if let Some(n) = pids_max {
            sandbox.set_pids_max(n)?;
        }
        // The agent (in the root group) weighs a hundred times more than all
        // user code together: a CPU hog cannot starve it of its replies.
        if let Err(e) = sys::write_small(&sandbox.dir.join("cpu.weight"), SANDBOX_CPU_WEIGHT) {
            log!("no cpu weight for user code: {e}");
        }
        Ok(sandbox)
    }

    pub fn set_memory_max(&self, bytes: u64) -> io::Result<()> {
        sys::write_small(&self.dir.join("memory.max"), bytes.to_string().as_bytes())?;
        // No swap in the guest, but be explicit: the limit is on RAM.
        let _ = sys::write_small(&self.dir.join("memory.swap.max"), b"0");
        Ok(())
    }

    pub fn set_pids_max(&self, n: u64) -> io::Result<()> {
        sys::write_small(&self.dir.join("pids.max"), n.to_string().as_bytes())
    }

    fn read_u64(&self, file: &str) -> Option<u64> {
        sys::read_small(&self.dir.join(file))
            .ok()
            .and_then(|s| s.trim().parse().ok())
    }

    pub fn memory_max(&self) -> Option<u64> {
        self.read_u64("memory.max")
    }

    pub fn memory_current(&self) -> Option<u64> {
        self.read_u64("memory.current")
    }

    pub fn pids_max(&self) -> Option<u64> {
        self.read_u64("pids.max")
    }

    pub fn pids_current(&self) -> Option<u64> {
        self.read_u64("pids.current")
    }

    /// How many processes the OOM killer has killed in the sandbox so far.
    pub fn oom_kills(&self) -> u64 {
        sys::read_small(&self.dir.join("memory.events"))
            .ok()
            .and_then(|text| {
                text.lines()
                    .find_map(|l| l.strip_prefix("oom_kill ")?.trim().parse().ok())
            })
            .unwrap_or(0)
    }

    /// A leaf group `name`, created if needed; processes left in it from
    /// before (an earlier agent run) are killed.
    pub fn group(&self, name: &str) -> io::Result<Cgroup> {
        let dir = self.dir.join(name);
        let existed = dir.exists();
        mkdir(&dir)?;
        let group = Cgroup {
            dir,
            has_kill: self.has_kill,
        };
        if existed {
            group.kill();
        }
        Ok(group)
    }
}

impl Cgroup {
    /// `cgroup.procs`, opened for writing: a child writes "0" to it to move
    /// itself in before it execs, so nothing it starts escapes.
    pub fn procs_file(&self) -> io::Result<OwnedFd> {
        let path = sys::cstring(&self.dir.join("cgroup.procs"))?;
        // SAFETY: valid NUL-terminated path.
        let fd = sys::cvt(unsafe { libc::open(path.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC) })?;
        // SAFETY: we own the fresh fd.
        Ok(unsafe { OwnedFd::from_raw_fd(fd) })
    }

    /// SIGKILLs every process in the group: one write to `cgroup.kill`
    /// (Linux >= 5.14), else each pid listed in `cgroup.procs`, repeated
    /// while processes keep appearing (a fork bomb).
    pub fn kill(&self) {
        if self.has_kill && sys::write_small(&self.dir.join("cgroup.kill"), b"1").is_ok() {
            return;
        }
        for _ in 0..100 {
            let Ok(procs) = sys::read_small(&self.dir.join("cgroup.procs")) else {
                return;
            };
            let pids: Vec<i32> = procs
                .lines()
                .filter_map(|l| l.trim().parse().ok())
                .collect();
            if pids.is_empty() {
                return;
            }
            for pid in pids {
                sys::kill_pid(pid, libc::SIGKILL);
            }
        }
    }

    /// Removes the (empty) group; false if processes are still in it.
    pub fn remove(&self) -> bool {
        match sys::cstring(&self.dir) {
            // SAFETY: valid NUL-terminated path.
            Ok(c) => unsafe { libc::rmdir(c.as_ptr()) == 0 },
            Err(_) => false,
        }
    }
}

fn mkdir(dir: &Path) -> io::Result<()> {
    let c = sys::cstring(dir)?;
    // SAFETY: valid NUL-terminated path.
    if unsafe { libc::mkdir(c.as_ptr(), 0o755) } == 0 {
        return Ok(());
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EEXIST) {
        Ok(())
    } else {
        Err(e)
    }
}

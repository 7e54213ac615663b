//! The VMM's own cgroup v2, under a parent the host delegates to airlock:
//! memory.max (guest memory plus a bounded overhead), pids.max, and an
//! optional cpu.max. The supervisor makes it before the fork, the jailed
//! child joins it, and the supervisor removes it once the child is gone.

use std::path::{Path, PathBuf};

use super::{JailError, os_error};

#[derive(Debug, Clone, Default, clap::Args)]
pub struct CgroupLimits {
    /// memory.max of the VMM's cgroup, in bytes.
    #[arg(long)]
    pub cgroup_memory_max: Option<u64>,
    /// pids.max of the VMM's cgroup.
    #[arg(long)]
    pub cgroup_pids_max: Option<u32>,
    /// cpu.max of the VMM's cgroup: "QUOTA PERIOD" in microseconds.
    #[arg(long)]
    pub cgroup_cpu_max: Option<String>,
}

pub struct Cgroup {
    dir: PathBuf,
}

impl Cgroup {
    pub fn create(parent: &Path, limits: &CgroupLimits) -> Result<Cgroup, JailError> {
        // SAFETY: getpid cannot fail.
        let dir = parent.join(format!("vmm-{}", unsafe { libc::getpid() }));
        std::fs::create_dir(&dir).map_err(os_error(format!(
            "cannot create the cgroup {} (is {} a cgroup v2 directory delegated to this user? \
             `airlock doctor` says what to run)",
            dir.display(),
            parent.display()
        )))?;
        let cgroup = Cgroup { dir };
        let set = |file: &str, value: String| cgroup.write(file, &value);
        let result = (|| {
            if let Some(bytes) = limits.cgroup_memory_max {
                set("memory.max", bytes.to_string())?;
                // Swap would only hide the limit; not every host has the file.
                if cgroup.dir.join("memory.swap.max").exists() {
                    set("memory.swap.max", "0".into())?;
                }
            }
            if let Some(pids) = limits.cgroup_pids_max {
                set("pids.max", pids.to_string())?;
            }
            if let Some(cpu) = &limits.cgroup_cpu_max {
                set("cpu.max", cpu.clone())?;
            }
            Ok(())
        })();
        if let Err(err) = result {
            cgroup.remove();
            return Err(err);
        }
        Ok(cgroup)
    }

    fn write(&self, file: &str, value: &str) -> Result<(), JailError> {
        let path = self.dir.join(file);
        std::fs::write(&path, value).map_err(os_error(format!(
            "cannot write {value:?} to {} (is the controller enabled in the parent's cgroup.subtree_control?)",
            path.display()
        )))
    }

    /// Moves the calling process into the cgroup.
    pub fn join(&self) -> Result<(), JailError> {
        self.write("cgroup.procs", "0")
    }

    /// Removes the cgroup; its last process has exited.
    pub fn remove(self) {
        for _ in 0..50 {
            match std::fs::remove_dir(&self.dir) {
                Ok(()) => return,
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
                Err(_) => return,
            }
        }
    }
}

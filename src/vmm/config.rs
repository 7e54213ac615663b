//! What one `airlock vmm` process runs: set by the parent on its command line.

use std::path::PathBuf;

use crate::vmm::layout::MAX_MEMORY_BYTES;

pub const DEFAULT_MEMORY_MIB: u32 = 512;
pub const MIN_MEMORY_MIB: u32 = 64;
pub const MAX_VCPUS: u8 = 4;
/// The console log's cap: past it the log starts over (the last lines are
/// also kept in memory for error reports).
pub const DEFAULT_CONSOLE_MAX_BYTES: u64 = 8 << 20;

#[derive(Debug, Clone, clap::Args)]
pub struct VmmConfig {
    /// Guest kernel (an uncompressed ELF vmlinux).
    #[arg(long)]
    pub kernel: PathBuf,
    /// Root filesystem image, served read-only as /dev/vda.
    #[arg(long)]
    pub rootfs: PathBuf,
    /// Unix socket where the host reaches the guest's vsock ports.
    #[arg(long)]
    pub vsock_socket: PathBuf,
    /// A host vsock port the guest may connect to (repeatable): each
    /// connection goes to the Unix socket `<vsock-socket>_<port>`. Guest
    /// connections to any other port are refused.
    #[arg(long)]
    pub vsock_forward: Vec<u32>,
    /// File that receives the guest's serial console.
    #[arg(long)]
    pub console_log: Option<PathBuf>,
    /// Number of vCPUs (1-4).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=MAX_VCPUS as i64))]
    pub vcpus: u8,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = DEFAULT_MEMORY_MIB)]
    pub memory_mib: u32,
    /// Extra kernel command-line arguments, appended last (they win).
    #[arg(long, default_value = "")]
    pub extra_cmdline: String,
    /// Replace the init program (tests use this to make a guest fail).
    #[arg(long)]
    pub init: Option<String>,
    /// Restore the VM from this snapshot directory instead of booting
    /// (vCPUs and memory come from the snapshot; --kernel and --rootfs must
    /// be the image it was made from).
    #[arg(long)]
    pub restore: Option<PathBuf>,
    /// With --restore: resume the VM saved in this diff snapshot, taken
    /// over the --restore snapshot (its state, and the pages it wrote).
    #[arg(long, requires = "restore")]
    pub resume: Option<PathBuf>,
    /// Confine each thread with its seccomp allow-list (on unless debugging
    /// the VMM itself).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub seccomp: bool,
    /// Let syscalls outside the filters through, logged by the kernel's
    /// audit (developers: finding out what a changed VMM needs).
    #[arg(long, hide = true)]
    pub seccomp_audit_only: bool,
    /// The directory `snapshot` commands save into (bound into the jail).
    #[arg(long)]
    pub snapshot_dir: Option<PathBuf>,
    /// The most bytes the console log holds.
    #[arg(long, default_value_t = DEFAULT_CONSOLE_MAX_BYTES)]
    pub console_max_bytes: u64,
    #[command(flatten)]
    pub jail: crate::vmm::jail::JailArgs,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("memory must be between {MIN_MEMORY_MIB} MiB and {max} MiB, not {0} MiB", max = MAX_MEMORY_BYTES >> 20)]
    Memory(u32),
}

impl VmmConfig {
    /// Guest memory in bytes, unchecked (for limits sized by it).
    pub fn memory_mib_bytes(&self) -> u64 {
        u64::from(self.memory_mib) << 20
    }

    pub fn memory_bytes(&self) -> Result<u64, ConfigError> {
        let bytes = u64::from(self.memory_mib) << 20;
        if self.memory_mib < MIN_MEMORY_MIB || bytes > MAX_MEMORY_BYTES {
            return Err(ConfigError::Memory(self.memory_mib));
        }
        Ok(bytes)
    }
}

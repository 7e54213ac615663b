//! The VMM process's control channel: commands arrive as lines on its stdin,
//! and events leave as JSON lines on its stdout. The parent holding stdin
//! open is also the VMM's lifeline: EOF (the parent died, even by SIGKILL)
//! stops the VM. That works for any parent, where PR_SET_PDEATHSIG would fire
//! when the spawning *thread* exits, which in a thread pool is arbitrary.

use serde::{Deserialize, Serialize};

use crate::vmm::stats::Stats;

/// Commands, one per line on stdin.
pub const CMD_STOP: &str = "stop";
pub const CMD_STATS: &str = "stats";
/// `working-set`: which guest pages a restored VM has touched so far.
pub const CMD_WORKING_SET: &str = "working-set";
/// `snapshot <dir>`: pause, save the VM into <dir> (which must exist), exit.
pub const CMD_SNAPSHOT: &str = "snapshot";
/// Debug builds only: `debug-forbidden-syscall [main|control]` makes that
/// thread call a syscall outside its filter, for the seccomp tests.
#[cfg(debug_assertions)]
pub const CMD_DEBUG_FORBIDDEN_SYSCALL: &str = "debug-forbidden-syscall";

/// Events, one JSON object per line on stdout.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum VmmMessage {
    /// vCPUs are running. `vmm_setup_micros` is from the VMM's start to
    /// vCPU start (for a restore: the VMM's whole part of it).
    Started {
        pid: u32,
        vmm_setup_micros: u64,
        restored: bool,
    },
    /// A snapshot was written; `memory_bytes_written` counts non-zero pages.
    SnapshotSaved {
        dir: String,
        memory_bytes_written: u64,
        pause_micros: u64,
        save_micros: u64,
    },
    /// A snapshot could not be saved (what it wrote is removed); the VM
    /// runs on.
    SnapshotFailed {
        detail: String,
    },
    /// The agent announced it listens; connecting now will succeed.
    AgentReadyHint,
    Stats {
        stats: Stats,
    },
    /// The pages a restored VM touched so far, or why they are not known.
    WorkingSet {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        set: Option<crate::vmm::snapshot::working_set::WorkingSet>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        error: Option<String>,
    },
    /// The VM ended; the process exits right after this line.
    Exit(ExitReport),
    /// A thread made a syscall outside its seccomp filter; the process has
    /// ended (written by the SIGSYS handler, so there is no Exit line).
    SeccompViolation {
        syscall: i64,
        thread: String,
    },
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ExitReport {
    pub reason: ExitReason,
    /// Human-readable detail (for errors: what went wrong, and where).
    pub detail: String,
    pub stats: Stats,
    pub console_tail: Vec<String>,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ExitReason {
    /// The guest shut itself down (reset through the i8042).
    GuestShutdown,
    /// The host asked the VMM to stop.
    Stopped,
    /// The VM was saved to a snapshot and ended.
    Snapshotted,
    /// The guest kernel panicked.
    GuestPanic,
    /// KVM or the VMM could not go on (emulation failure, triple fault, ...).
    Fatal,
    /// A VMM thread made a syscall outside its seccomp filter.
    SeccompViolation,
}

impl ExitReason {
    pub fn is_error(self) -> bool {
        matches!(
            self,
            ExitReason::GuestPanic | ExitReason::Fatal | ExitReason::SeccompViolation
        )
    }
}

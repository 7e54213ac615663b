//! What the registry enforces and how it says no: limits, conversations,
//! and the errors a model reads.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(3600);
/// Idle this long, a sandbox is paused to disk (its VM ends, its state stays).
pub const DEFAULT_PAUSE_AFTER: Duration = Duration::from_secs(5 * 60);
pub const DEFAULT_MAX_LIFETIME: Duration = Duration::from_secs(8 * 3600);
pub const DEFAULT_MAX_SANDBOXES: usize = 32;
pub const DEFAULT_MAX_PER_PRINCIPAL: usize = 8;
pub const DEFAULT_STALL_GRACE: Duration = Duration::from_secs(10);
/// Disk a principal's checkpoints may take, over all its sandboxes.
pub const DEFAULT_MAX_SNAPSHOT_BYTES_PER_PRINCIPAL: u64 = 4 << 30;
/// Ended sandboxes remembered for "expired" errors.
pub(super) const REMEMBER_ENDED: usize = 10_000;

/// Lifetimes and limits.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Idle this long (counted from the last call, paused or not), a
    /// sandbox is destroyed.
    pub idle_timeout: Duration,
    /// Idle this long, a sandbox is paused to disk; zero: never.
    pub pause_after: Duration,
    pub max_lifetime: Duration,
    /// Live sandboxes in all.
    pub max_sandboxes: usize,
    /// Live sandboxes per principal (token).
    pub max_per_principal: usize,
    /// How long ending or resetting a sandbox waits, after killing its VM,
    /// for the calls holding it to let go. They are cancelled and their VM
    /// is gone, so they end at once unless something is badly wrong; past
    /// this an ended sandbox is dropped by its last call.
    pub stall_grace: Duration,
    /// Disk the checkpoints of one principal's sandboxes may take.
    pub max_snapshot_bytes_per_principal: u64,
    /// Principals whose limits differ from the two above (the config file).
    pub principals: Arc<BTreeMap<String, PrincipalLimits>>,
}

/// One principal's own limits; `None` keeps the server's.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PrincipalLimits {
    pub max_sandboxes: Option<usize>,
    pub max_snapshot_bytes: Option<u64>,
    /// The images this principal may create sandboxes of, the first being
    /// its default; none: every image served.
    pub images: Option<Vec<String>>,
}

impl Limits {
    /// The image a new sandbox of `principal` gets when it asks for
    /// `wanted`: refused if its allowlist leaves it out; its first allowed
    /// image when it asks for none.
    pub fn image_for(
        &self,
        principal: &str,
        wanted: Option<&str>,
    ) -> Result<Option<String>, String> {
        let Some(allowed) = self
            .principals
            .get(principal)
            .and_then(|p| p.images.as_ref())
        else {
            return Ok(wanted.map(str::to_string));
        };
        match wanted {
            None => Ok(allowed.first().cloned()),
            Some(image) if allowed.iter().any(|a| a == image) => Ok(Some(image.to_string())),
            Some(image) => Err(format!(
                "the image {image:?} is not allowed for principal {principal}; it may use {}",
                allowed.join(", ")
            )),
        }
    }

    /// Live sandboxes `principal` may have.
    pub fn max_sandboxes_of(&self, principal: &str) -> usize {
        self.principals
            .get(principal)
            .and_then(|p| p.max_sandboxes)
            .unwrap_or(self.max_per_principal)
    }

    /// Disk `principal`'s checkpoints may take.
    pub fn snapshot_quota_of(&self, principal: &str) -> u64 {
        self.principals
            .get(principal)
            .and_then(|p| p.max_snapshot_bytes)
            .unwrap_or(self.max_snapshot_bytes_per_principal)
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            pause_after: Duration::ZERO,
            max_lifetime: DEFAULT_MAX_LIFETIME,
            max_sandboxes: DEFAULT_MAX_SANDBOXES,
            max_per_principal: DEFAULT_MAX_PER_PRINCIPAL,
            stall_grace: DEFAULT_STALL_GRACE,
            max_snapshot_bytes_per_principal: DEFAULT_MAX_SNAPSHOT_BYTES_PER_PRINCIPAL,
            principals: Arc::default(),
        }
    }
}

/// A conversation with an implicit sandbox.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Conversation {
    /// The one conversation of a stdio server.
    Stdio,
    /// An HTTP session, by its Mcp-Session-Id.
    Session(String),
}

/// Why a sandbox cannot be had; the messages are meant for the model.
#[derive(Debug, Clone, thiserror::Error)]
pub enum RegistryError {
    #[error("{0}")]
    Expired(String),
    #[error("{0}")]
    Limit(String),
    #[error(
        "no sandbox has id {0:?}; call the tool without sandbox_id to create a new sandbox (its id comes back in the result)"
    )]
    Unknown(String),
    #[error(
        "sandbox {0:?} belongs to another client and cannot be used with this token; call the tool without sandbox_id to create your own"
    )]
    Forbidden(String),
    #[error("checkpoint {0:?} belongs to another client and cannot be used with this token")]
    ForbiddenCheckpoint(String),
    #[error("the sandbox could not be started: {0}; try again in a moment")]
    Start(String),
    /// An argument the model can correct.
    #[error("{0}")]
    Invalid(String),
    /// The sandbox is in use by a call that has not finished.
    #[error("{0}")]
    Busy(String),
    #[error("the server is shutting down; no new sandbox can be started")]
    ShuttingDown,
}

impl RegistryError {
    /// A short label for metrics.
    pub fn label(&self) -> &'static str {
        match self {
            RegistryError::Expired(_) => "expired",
            RegistryError::Limit(_) => "limit",
            RegistryError::Unknown(_) => "unknown",
            RegistryError::Forbidden(_) => "forbidden",
            RegistryError::ForbiddenCheckpoint(_) => "forbidden",
            RegistryError::Start(_) => "start_failed",
            RegistryError::Invalid(_) => "invalid",
            RegistryError::Busy(_) => "busy",
            RegistryError::ShuttingDown => "shutting_down",
        }
    }
}

/// `15m`, `8h`, `5s`, `1h 30m`.
pub fn fmt_duration(d: Duration) -> String {
    let secs = d.as_secs();
    if secs == 0 {
        return format!("{}ms", d.as_millis());
    }
    humantime::format_duration(Duration::from_secs(secs)).to_string()
}

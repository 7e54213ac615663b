//! The wire protocol between the airlock host and the guest agent.
//!
//! Both sides link this crate, so a version bump here is seen by both at
//! build time; the version is also exchanged at connect time so that a host
//! never talks to an agent baked into an older image without noticing.

/// Protocol version. Bump on any incompatible change to the framing or messages.
pub const PROTOCOL_VERSION: u32 = 1;

/// The vsock port the guest agent listens on.
pub const AGENT_VSOCK_PORT: u32 = 1024;

/// The path of the agent inside the guest image; the kernel runs it as PID 1.
pub const AGENT_GUEST_PATH: &str = "/usr/sbin/airlock-agent";

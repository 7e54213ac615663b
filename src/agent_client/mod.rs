//! Host side of the agent protocol: one connection to the guest agent of one
//! VM, over the VMM's vsock Unix socket.
//!
//! The VMM follows Firecracker's convention: connect to its Unix socket,
//! write `CONNECT <port>\n`, read `OK <host_port>\n`; from then on the socket
//! is a byte stream to the guest's vsock listener, on which we speak the
//! framed protocol of `airlock_protocol`, starting with a Hello handshake.
//!
//! Several requests can be in flight on one connection. A reader task routes
//! each incoming frame by request id to that request's channel (streamed
//! events, then one final frame); a writer task sends whole frames from a
//! queue, so a caller that gives up mid-request (timeout, dropped future)
//! never leaves half a frame on the wire. Giving up on a request (dropping
//! its [`Response`] or [`Call`] before the end) sends a Cancel for it, which
//! makes the agent kill its process tree or interrupt its interpreter.
//!
//! On top of the raw requests sit typed operations: [`AgentClient::exec`],
//! [`AgentClient::run_code`] (with streamed [`Event`]s), interpreter reset
//! and warm status, files, limits and [`AgentClient::refresh`]. Their results
//! keep output as bytes; [`OutputText`] decodes it for display, lossily, and
//! says when it was cut or not UTF-8.

use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use airlock_protocol::{
    Command, DEFAULT_OUTPUT_LIMIT, ErrorCode, Exec, ExecResult, FileData, FileList, FileStat,
    Frame, FrameError, FrameReader, Hello, Image, Kind, Language, Limits, ListFiles, MAX_FILE_LEN,
    MAX_FRAME_LEN, MAX_IMAGE_LEN, MAX_IMAGES_PER_RUN, MAX_OUTPUT_LIMIT, Message, OutputLimits,
    PROTOCOL_VERSION, Pong, ReadFile, Refresh, RefreshReply, RemoveFile, ResetInterpreter, RunCode,
    RunCodeResult, SetLimits, StatFile, Stream, StreamStats, WarmStatus, WarmStatusReply,
    WriteFile, write_frame,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio::task::JoinHandle;

/// Longest `OK <port>` line accepted from the VMM.
const MAX_CONNECT_LINE: usize = 64;
/// Frames buffered per request before the reader waits for its consumer.
const RESPONSE_QUEUE: usize = 64;
/// Encoded frames queued for the writer task.
const OUTBOX_FRAMES: usize = 64;
/// Stop adding queued frames to one write beyond this many bytes.
const MAX_BATCH: usize = 1 << 20;
/// A write to the VM that makes no progress for this long means the guest
/// has stopped taking bytes (it grants no vsock credit): the connection is
/// closed, and requests waiting to be queued give up.
const WRITE_STALL: Duration = Duration::from_secs(60);
/// Request id of the handshake; requests count up from 1.
const HELLO_ID: u64 = 0;
/// Default bound on file, limit, reset and refresh requests: a big file on a
/// software-nested guest takes a while.
const LONG_REQUEST_TIMEOUT: Duration = Duration::from_secs(600);
/// Extra time given to exec and run_code past their own timeout, for the
/// agent to kill, reap and report.
const RESULT_SLACK: Duration = Duration::from_secs(120);

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("cannot connect to the VM's vsock socket {}: {source}", path.display())]
    Connect { path: PathBuf, source: io::Error },
    #[error("handshake with the guest agent failed: {0}")]
    Handshake(String),
    #[error("{what} timed out after {after:?}")]
    Timeout { what: &'static str, after: Duration },
    #[error("protocol error from the guest agent: {0}")]
    Protocol(#[from] FrameError),
    #[error("unexpected reply {got:?} to {request:?}")]
    UnexpectedReply { request: Kind, got: Kind },
    #[error("the guest agent failed the request ({code:?}): {message}")]
    Remote { code: ErrorCode, message: String },
    #[error("connection to the guest agent closed: {0}")]
    Closed(String),
    #[error("i/o error talking to the guest agent: {0}")]
    Io(#[from] io::Error),
    /// The guest sent past the bounds of a call (see [`Budget`]).
    #[error("{0}")]
    Flood(String),
    /// A well-formed reply whose values contradict the request.
    #[error("the guest agent's reply makes no sense: {0}")]
    BadReply(String),
}

pub type Result<T, E = AgentError> = std::result::Result<T, E>;

/// A connection to one guest agent. Dropping it closes the connection once
/// already queued frames are written.
pub struct AgentClient {
    shared: Arc<Shared>,
    outbox: mpsc::Sender<Vec<u8>>,
    next_id: AtomicU64,
    agent_version: String,
    request_timeout: Duration,
    long_request_timeout: Duration,
    reader: JoinHandle<()>,
}

impl Drop for AgentClient {
    fn drop(&mut self) {
        self.reader.abort();
        // Wake responses still being awaited: their reader is gone.
        self.shared.close("the client was dropped".into());
    }
}

mod call;
mod connection;
mod ops;
#[cfg(test)]
mod tests;

pub use call::{Budget, Call, Event, ExecOutput, MAX_IMAGE_BYTES_PER_CALL, OutputText, RunOutput};
use connection::Shared;
pub use connection::{Response, into_result};

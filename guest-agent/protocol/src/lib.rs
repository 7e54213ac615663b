//! The wire protocol between the airlock host and the guest agent.
//!
//! Both sides link this crate, so a version bump here is seen by both at
//! build time; the version is also exchanged at connect time so that a host
//! never talks to an agent baked into an older image without noticing.
//!
//! # Wire format
//!
//! A connection is a sequence of frames, in both directions:
//!
//! ```text
//! u32 LE len | u8 kind | u64 LE request_id | u32 LE header_len | header (JSON) | payload
//!            `------------------------- len bytes -------------------------------------'
//! ```
//!
//! - `kind` names the message ([`Kind`]); the JSON header holds its fields
//!   (empty for messages without fields). Unknown JSON fields are ignored, so
//!   fields can be added without a version bump.
//! - `payload` is raw bytes (file contents, output chunks): no JSON escaping.
//! - `len` is checked against [`MAX_FRAME_LEN`] before anything is buffered
//!   for the frame, so a hostile peer cannot make the other side allocate.
//! - Every frame carries the request id it belongs to. The client picks ids
//!   (unique per connection, 0 is the handshake); every frame the agent sends
//!   for a request carries that id: zero or more non-final events (e.g.
//!   [`Message::Output`]) then exactly one final frame ([`Message::is_final`]).
//!   Several requests may be in flight on one connection.
//! - [`Message::Cancel`] is sent with the id of the request to cancel; it has
//!   no reply of its own: the cancelled request still ends with its final
//!   frame. For [`Message::Exec`] and [`Message::RunCode`] that is their
//!   result with `cancelled` set (the process tree is killed, the interpreter
//!   interrupted); a request still queued, or any other request, ends with an
//!   [`ErrorCode::Cancelled`] error if it was cut short. Closing the
//!   connection cancels every request still running on it.
//! - The operations themselves (exec, run_code, files, limits, freshness) are
//!   described with their messages in [`ops`].
//! - The client opens with [`Message::Hello`]; the agent answers
//!   [`Message::HelloOk`], or an [`ErrorCode::VersionMismatch`] error and closes.

use std::fmt;

use serde::{Deserialize, Serialize};

#[cfg(feature = "tokio")]
mod io;
pub mod ops;
#[cfg(feature = "tokio")]
pub use io::{FrameReader, read_frame, write_frame};
pub use ops::*;

/// Protocol version. Bump on any incompatible change to the framing or messages.
pub const PROTOCOL_VERSION: u32 = 1;

/// The vsock port the guest agent listens on. Below 1024, so binding it
/// takes CAP_NET_BIND_SERVICE: user code cannot take it over, even while
/// the agent re-creates its listener.
pub const AGENT_VSOCK_PORT: u32 = 1023;

/// The host vsock port the guest's egress relay connects to, once per
/// proxied connection (the VMM forwards it to the gateway's egress service).
pub const EGRESS_VSOCK_PORT: u32 = 1080;

/// Where the agent's egress relay listens inside the guest, while egress is
/// on; user code's proxy variables point here. Below 1024, so user code
/// cannot take the port over.
pub const EGRESS_PROXY_PORT: u16 = 800;

/// The path of the agent inside the guest image; the kernel runs it as PID 1.
pub const AGENT_GUEST_PATH: &str = "/usr/sbin/airlock-agent";

/// The agent writes `airlock-agent <version> ready on vsock port <port>` to
/// the guest console once it listens; host tools may look for this marker.
pub const READY_MARKER: &str = "ready on vsock port";

/// Bytes of a frame after the length prefix and before the JSON header:
/// kind (1) + request id (8) + header length (4).
pub const FIXED_HEADER_LEN: usize = 1 + 8 + 4;
/// Largest JSON header (argv, env and the like; bulk data goes in the payload).
pub const MAX_HEADER_LEN: usize = 1 << 20;
/// Largest payload of one frame; bigger transfers are split across frames.
pub const MAX_PAYLOAD_LEN: usize = 16 << 20;
/// Largest value of the length prefix.
pub const MAX_FRAME_LEN: usize = FIXED_HEADER_LEN + MAX_HEADER_LEN + MAX_PAYLOAD_LEN;

/// The message kinds, as sent in the kind byte. Values are part of the
/// protocol: never reuse one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Kind {
    Hello = 0x01,
    HelloOk = 0x02,
    Error = 0x03,
    Cancel = 0x04,
    Done = 0x05,
    Ping = 0x10,
    Pong = 0x11,
    Shutdown = 0x12,
    ShutdownOk = 0x13,
    // 0x20..: process execution (exec, run_code), its events and the sandbox.
    Exec = 0x20,
    Output = 0x21,
    Image = 0x22,
    ExecResult = 0x23,
    RunCode = 0x24,
    RunCodeResult = 0x25,
    ResetInterpreter = 0x26,
    WarmStatus = 0x27,
    WarmStatusReply = 0x28,
    Refresh = 0x29,
    RefreshReply = 0x2A,
    SetLimits = 0x2B,
    Limits = 0x2C,
    // 0x40..: file operations.
    WriteFile = 0x40,
    ReadFile = 0x41,
    FileData = 0x42,
    ListFiles = 0x43,
    FileList = 0x44,
    RemoveFile = 0x45,
    StatFile = 0x46,
    FileStat = 0x47,
}

impl Kind {
    const ALL: [Kind; 30] = [
        Kind::Hello,
        Kind::HelloOk,
        Kind::Error,
        Kind::Cancel,
        Kind::Done,
        Kind::Ping,
        Kind::Pong,
        Kind::Shutdown,
        Kind::ShutdownOk,
        Kind::Exec,
        Kind::Output,
        Kind::Image,
        Kind::ExecResult,
        Kind::RunCode,
        Kind::RunCodeResult,
        Kind::ResetInterpreter,
        Kind::WarmStatus,
        Kind::WarmStatusReply,
        Kind::Refresh,
        Kind::RefreshReply,
        Kind::SetLimits,
        Kind::Limits,
        Kind::WriteFile,
        Kind::ReadFile,
        Kind::FileData,
        Kind::ListFiles,
        Kind::FileList,
        Kind::RemoveFile,
        Kind::StatFile,
        Kind::FileStat,
    ];

    pub fn from_u8(byte: u8) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| *k as u8 == byte)
    }
}

/// Client → agent, first frame on a connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    pub protocol_version: u32,
    /// Free text naming the client, for the agent's log.
    #[serde(default)]
    pub client: String,
}

/// Agent → client: the handshake succeeded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HelloOk {
    pub agent_version: String,
    pub protocol_version: u32,
}

/// Agent → client: answer to [`Message::Ping`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pong {
    pub agent_version: String,
    /// Milliseconds since the agent started.
    pub uptime_ms: u64,
}

/// Either side: a request failed, or the connection is about to be closed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub code: ErrorCode,
    pub message: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The Hello named a protocol version the agent does not speak.
    VersionMismatch,
    /// The peer broke the framing or sent a message out of place.
    Protocol,
    /// A well-formed request the receiver does not implement.
    Unsupported,
    /// A request with invalid arguments.
    BadRequest,
    /// The request was cancelled.
    Cancelled,
    /// The receiver failed for reasons of its own.
    Internal,
    /// No such file or directory (or command).
    NotFound,
    /// The sandbox user may not do that.
    PermissionDenied,
    /// The path exists already (e.g. a directory where a file should go).
    AlreadyExists,
    /// Bigger than a limit (file, code, stdin, output limit).
    TooLarge,
    /// The file system is full.
    NoSpace,
    /// The interpreter is not warm yet, or could not start.
    NotReady,
    /// Another I/O error; the message says which.
    Io,
    /// A code from a newer peer.
    #[serde(other)]
    Unknown,
}

/// Which output stream an [`Message::Output`] chunk belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Stream {
    Stdout,
    Stderr,
}

/// A streamed chunk of a request's output; the bytes are the frame payload.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Output {
    pub stream: Stream,
}

/// Every message of the protocol. Its fields travel as the JSON header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    Hello(Hello),
    HelloOk(HelloOk),
    Error(ErrorBody),
    /// Cancel the request whose id the frame carries.
    Cancel,
    /// Agent → client: the request succeeded and has nothing to return.
    Done,
    Ping,
    Pong(Pong),
    /// Sync and reboot the guest; the VMM treats a guest reboot as a clean exit.
    Shutdown,
    /// Sent before the agent reboots; the connection may also just close.
    ShutdownOk,
    Exec(Exec),
    Output(Output),
    Image(Image),
    ExecResult(ExecResult),
    RunCode(RunCode),
    RunCodeResult(RunCodeResult),
    ResetInterpreter(ResetInterpreter),
    WarmStatus(WarmStatus),
    WarmStatusReply(WarmStatusReply),
    Refresh(Refresh),
    RefreshReply(RefreshReply),
    SetLimits(SetLimits),
    Limits(Limits),
    WriteFile(WriteFile),
    ReadFile(ReadFile),
    FileData(FileData),
    ListFiles(ListFiles),
    FileList(FileList),
    RemoveFile(RemoveFile),
    StatFile(StatFile),
    FileStat(FileStat),
}

/// Calls `$body` with the header struct of every message that has one, and
/// `$unit` for the field-less ones.
macro_rules! with_header {
    ($msg:expr, $h:ident => $body:expr, $unit:expr) => {
        match $msg {
            Message::Hello($h) => $body,
            Message::HelloOk($h) => $body,
            Message::Error($h) => $body,
            Message::Pong($h) => $body,
            Message::Exec($h) => $body,
            Message::Output($h) => $body,
            Message::Image($h) => $body,
            Message::ExecResult($h) => $body,
            Message::RunCode($h) => $body,
            Message::RunCodeResult($h) => $body,
            Message::ResetInterpreter($h) => $body,
            Message::WarmStatus($h) => $body,
            Message::WarmStatusReply($h) => $body,
            Message::Refresh($h) => $body,
            Message::RefreshReply($h) => $body,
            Message::SetLimits($h) => $body,
            Message::Limits($h) => $body,
            Message::WriteFile($h) => $body,
            Message::ReadFile($h) => $body,
            Message::FileData($h) => $body,
            Message::ListFiles($h) => $body,
            Message::FileList($h) => $body,
            Message::RemoveFile($h) => $body,
            Message::StatFile($h) => $body,
            Message::FileStat($h) => $body,
            Message::Cancel
            | Message::Done
            | Message::Ping
            | Message::Shutdown
            | Message::ShutdownOk => $unit,
        }
    };
}

impl Message {
    pub fn kind(&self) -> Kind {
        match self {
            Message::Hello(_) => Kind::Hello,
            Message::HelloOk(_) => Kind::HelloOk,
            Message::Error(_) => Kind::Error,
            Message::Cancel => Kind::Cancel,
            Message::Done => Kind::Done,
            Message::Ping => Kind::Ping,
            Message::Pong(_) => Kind::Pong,
            Message::Shutdown => Kind::Shutdown,
            Message::ShutdownOk => Kind::ShutdownOk,
            Message::Exec(_) => Kind::Exec,
            Message::Output(_) => Kind::Output,
            Message::Image(_) => Kind::Image,
            Message::ExecResult(_) => Kind::ExecResult,
            Message::RunCode(_) => Kind::RunCode,
            Message::RunCodeResult(_) => Kind::RunCodeResult,
            Message::ResetInterpreter(_) => Kind::ResetInterpreter,
            Message::WarmStatus(_) => Kind::WarmStatus,
            Message::WarmStatusReply(_) => Kind::WarmStatusReply,
            Message::Refresh(_) => Kind::Refresh,
            Message::RefreshReply(_) => Kind::RefreshReply,
            Message::SetLimits(_) => Kind::SetLimits,
            Message::Limits(_) => Kind::Limits,
            Message::WriteFile(_) => Kind::WriteFile,
            Message::ReadFile(_) => Kind::ReadFile,
            Message::FileData(_) => Kind::FileData,
            Message::ListFiles(_) => Kind::ListFiles,
            Message::FileList(_) => Kind::FileList,
            Message::RemoveFile(_) => Kind::RemoveFile,
            Message::StatFile(_) => Kind::StatFile,
            Message::FileStat(_) => Kind::FileStat,
        }
    }

    /// Whether this agent → client message ends its request. Streamed events
    /// return false; the request stays open until a final frame arrives.
    pub fn is_final(&self) -> bool {
        !matches!(self, Message::Output(_) | Message::Image(_))
    }

    /// A convenience for building [`Message::Error`].
    pub fn error(code: ErrorCode, message: impl Into<String>) -> Message {
        Message::Error(ErrorBody {
            code,
            message: message.into(),
        })
    }

    fn write_header(&self, out: &mut Vec<u8>) -> serde_json::Result<()> {
        // Messages without fields: an empty header.
        with_header!(self, h => serde_json::to_writer(out, h), Ok(()))
    }

    fn parse(kind: Kind, header: &[u8]) -> serde_json::Result<Message> {
        fn json<'a, T: Deserialize<'a>>(header: &'a [u8]) -> serde_json::Result<T> {
            serde_json::from_slice(header)
        }
        // Messages without fields accept an empty header or any JSON value,
        // so that a later version may add optional fields to them.
        fn unit(header: &[u8], message: Message) -> serde_json::Result<Message> {
            if !header.is_empty() {
                json::<serde::de::IgnoredAny>(header)?;
            }
            Ok(message)
        }
        Ok(match kind {
            Kind::Hello => Message::Hello(json(header)?),
            Kind::HelloOk => Message::HelloOk(json(header)?),
            Kind::Error => Message::Error(json(header)?),
            Kind::Pong => Message::Pong(json(header)?),
            Kind::Exec => Message::Exec(json(header)?),
            Kind::Output => Message::Output(json(header)?),
            Kind::Image => Message::Image(json(header)?),
            Kind::ExecResult => Message::ExecResult(json(header)?),
            Kind::RunCode => Message::RunCode(json(header)?),
            Kind::RunCodeResult => Message::RunCodeResult(json(header)?),
            Kind::ResetInterpreter => Message::ResetInterpreter(json(header)?),
            Kind::WarmStatus => Message::WarmStatus(json(header)?),
            Kind::WarmStatusReply => Message::WarmStatusReply(json(header)?),
            Kind::Refresh => Message::Refresh(json(header)?),
            Kind::RefreshReply => Message::RefreshReply(json(header)?),
            Kind::SetLimits => Message::SetLimits(json(header)?),
            Kind::Limits => Message::Limits(json(header)?),
            Kind::WriteFile => Message::WriteFile(json(header)?),
            Kind::ReadFile => Message::ReadFile(json(header)?),
            Kind::FileData => Message::FileData(json(header)?),
            Kind::ListFiles => Message::ListFiles(json(header)?),
            Kind::FileList => Message::FileList(json(header)?),
            Kind::RemoveFile => Message::RemoveFile(json(header)?),
            Kind::StatFile => Message::StatFile(json(header)?),
            Kind::FileStat => Message::FileStat(json(header)?),
            Kind::Cancel => unit(header, Message::Cancel)?,
            Kind::Done => unit(header, Message::Done)?,
            Kind::Ping => unit(header, Message::Ping)?,
            Kind::Shutdown => unit(header, Message::Shutdown)?,
            Kind::ShutdownOk => unit(header, Message::ShutdownOk)?,
        })
    }
}

/// One frame: a message, the request it belongs to, and raw payload bytes.
#[derive(Clone, PartialEq, Eq)]
pub struct Frame {
    pub request_id: u64,
    pub message: Message,
    pub payload: Vec<u8>,
}

impl fmt::Debug for Frame {
    // Payloads may be megabytes: show their size, not their bytes.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Frame")
            .field("request_id", &self.request_id)
            .field("message", &self.message)
            .field("payload_len", &self.payload.len())
            .finish()
    }
}

impl Frame {
    pub fn new(request_id: u64, message: Message) -> Frame {
        Frame {
            request_id,
            message,
            payload: Vec::new(),
        }
    }

    pub fn with_payload(mut self, payload: Vec<u8>) -> Frame {
        self.payload = payload;
        self
    }

    /// Encodes the frame into a new buffer.
    pub fn encode(&self) -> Result<Vec<u8>, FrameError> {
        let mut out = Vec::new();
        self.encode_into(&mut out)?;
        Ok(out)
    }

    /// Appends the encoded frame to `out`, so that several frames can go out
    /// in one write. On error `out` is left as it was.
    pub fn encode_into(&self, out: &mut Vec<u8>) -> Result<(), FrameError> {
        if self.payload.len() > MAX_PAYLOAD_LEN {
            return Err(FrameError::PayloadTooLarge {
                len: self.payload.len(),
                max: MAX_PAYLOAD_LEN,
            });
        }
        let start = out.len();
        out.reserve(4 + FIXED_HEADER_LEN + self.payload.len() + 64);
        out.extend_from_slice(&[0; 4]); // length, patched below
        out.push(self.message.kind() as u8);
        out.extend_from_slice(&self.request_id.to_le_bytes());
        out.extend_from_slice(&[0; 4]); // header length, patched below
        let header_start = out.len();
        if let Err(e) = self.message.write_header(out) {
            out.truncate(start);
            return Err(FrameError::Encode(e));
        }
        let header_len = out.len() - header_start;
        if header_len > MAX_HEADER_LEN {
            out.truncate(start);
            return Err(FrameError::HeaderTooLarge {
                len: header_len,
                max: MAX_HEADER_LEN,
            });
        }
        out.extend_from_slice(&self.payload);
        let frame_len = out.len() - start - 4;
        // Both fit in u32: bounded by the checks above.
        out[start..start + 4].copy_from_slice(&(frame_len as u32).to_le_bytes());
        out[header_start - 4..header_start].copy_from_slice(&(header_len as u32).to_le_bytes());
        Ok(())
    }

    /// Decodes the bytes after the length prefix (exactly `len` of them).
    fn decode_body(body: &[u8]) -> Result<Frame, FrameError> {
        let len = body.len();
        let (fixed, rest) = body
            .split_at_checked(FIXED_HEADER_LEN)
            .ok_or(FrameError::TooShort { len })?;
        let kind_byte = fixed[0];
        let request_id = u64::from_le_bytes(fixed[1..9].try_into().unwrap_or_default());
        let header_len = u32::from_le_bytes(fixed[9..13].try_into().unwrap_or_default()) as usize;
        if header_len > MAX_HEADER_LEN || header_len > rest.len() {
            return Err(FrameError::BadHeaderLen { header_len, len });
        }
        let kind = Kind::from_u8(kind_byte).ok_or(FrameError::UnknownKind {
            kind: kind_byte,
            request_id,
        })?;
        let (header, payload) = rest.split_at(header_len);
        let message = Message::parse(kind, header).map_err(|source| FrameError::BadHeader {
            kind,
            request_id,
            source,
        })?;
        Ok(Frame {
            request_id,
            message,
            payload: payload.to_vec(),
        })
    }
}

/// Why a frame could not be encoded, decoded or read.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("frame length {len} exceeds the limit of {max} bytes")]
    TooLarge { len: u64, max: usize },
    #[error("frame length {len} is shorter than the fixed {FIXED_HEADER_LEN}-byte header")]
    TooShort { len: usize },
    #[error("header length {header_len} does not fit a frame of {len} bytes")]
    BadHeaderLen { header_len: usize, len: usize },
    #[error("unknown frame kind {kind:#04x} (request {request_id})")]
    UnknownKind { kind: u8, request_id: u64 },
    #[error("malformed {kind:?} header (request {request_id}): {source}")]
    BadHeader {
        kind: Kind,
        request_id: u64,
        source: serde_json::Error,
    },
    #[error("payload of {len} bytes exceeds the limit of {max} bytes")]
    PayloadTooLarge { len: usize, max: usize },
    #[error("header of {len} bytes exceeds the limit of {max} bytes")]
    HeaderTooLarge { len: usize, max: usize },
    #[error("cannot encode header: {0}")]
    Encode(serde_json::Error),
    #[error("connection closed in the middle of a frame ({buffered} bytes buffered)")]
    Truncated { buffered: usize },
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
}

impl FrameError {
    /// Whether the byte stream is still in sync after this error. Only an
    /// unknown kind is: the frame was well delimited and has been skipped, so
    /// the receiver can answer [`ErrorCode::Unsupported`] and carry on. After
    /// any other error the connection must be closed.
    pub fn is_recoverable(&self) -> bool {
        matches!(self, FrameError::UnknownKind { .. })
    }
}

/// Incremental decoder: feed it bytes as they arrive, take frames out.
/// It buffers at most one partial frame plus whatever was fed past it.
#[derive(Debug, Default)]
pub struct Decoder {
    buf: Vec<u8>,
    /// Start of the undecoded bytes in `buf`.
    pos: usize,
}

impl Decoder {
    pub fn new() -> Decoder {
        Decoder::default()
    }

    pub fn feed(&mut self, bytes: &[u8]) {
        self.compact();
        self.buf.extend_from_slice(bytes);
    }

    /// Bytes received but not yet decoded (a partial frame, if non-zero once
    /// [`Decoder::decode`] returned `Ok(None)`).
    pub fn buffered(&self) -> usize {
        self.buf.len() - self.pos
    }

    /// Returns the next complete frame, `Ok(None)` if more bytes are needed.
    ///
    /// A recoverable error ([`FrameError::is_recoverable`]) consumed its
    /// frame; after any other error the decoder stays stuck on the bad bytes.
    pub fn decode(&mut self) -> Result<Option<Frame>, FrameError> {
        let avail = &self.buf[self.pos..];
        let Some(prefix) = avail.first_chunk::<4>() else {
            return Ok(None);
        };
        let len = u32::from_le_bytes(*prefix) as usize;
        check_len(len)?;
        let Some(body) = avail.get(4..4 + len) else {
            return Ok(None);
        };
        let result = Frame::decode_body(body);
        if result.as_ref().is_ok() || result.as_ref().is_err_and(FrameError::is_recoverable) {
            self.pos += 4 + len;
            if self.pos == self.buf.len() {
                self.buf.clear();
                self.pos = 0;
            }
        }
        result.map(Some)
    }

    /// How many more bytes the frame being received needs, if its length
    /// prefix has arrived (lets a reader size its next read).
    pub fn missing(&self) -> Option<usize> {
        let avail = &self.buf[self.pos..];
        let len = u32::from_le_bytes(*avail.first_chunk::<4>()?) as usize;
        Some((4 + len.min(MAX_FRAME_LEN)).saturating_sub(avail.len()))
    }

    fn compact(&mut self) {
        if self.pos > 0 {
            self.buf.drain(..self.pos);
            self.pos = 0;
        }
    }

    /// The buffer to read into, for readers that fill it in place.
    #[cfg(feature = "tokio")]
    fn read_buffer(&mut self, want: usize) -> &mut Vec<u8> {
        self.compact();
        // Give back memory after a big frame instead of keeping it per connection.
        if self.buf.is_empty() && self.buf.capacity() > 4 * want.max(1 << 16) {
            self.buf = Vec::new();
        }
        self.buf.reserve(want);
        &mut self.buf
    }
}

fn check_len(len: usize) -> Result<(), FrameError> {
    if len > MAX_FRAME_LEN {
        return Err(FrameError::TooLarge {
            len: len as u64,
            max: MAX_FRAME_LEN,
        });
    }
    if len < FIXED_HEADER_LEN {
        return Err(FrameError::TooShort { len });
    }
    Ok(())
}

#[cfg(test)]
mod tests;

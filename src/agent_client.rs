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
    Command, ErrorCode, Exec, ExecResult, FileData, FileList, FileStat, Frame, FrameError,
    FrameReader, Hello, Image, Kind, Language, Limits, ListFiles, MAX_FILE_LEN, Message,
    OutputLimits, PROTOCOL_VERSION, Pong, ReadFile, Refresh, RefreshReply, RemoveFile,
    ResetInterpreter, RunCode, RunCodeResult, SetLimits, StatFile, Stream, StreamStats, WarmStatus,
    WarmStatusReply, WriteFile, write_frame,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

/// Longest `OK <port>` line accepted from the VMM.
const MAX_CONNECT_LINE: usize = 64;
/// Frames buffered per request before the reader waits for its consumer.
const RESPONSE_QUEUE: usize = 64;
/// Encoded frames queued for the writer task.
const OUTBOX_FRAMES: usize = 64;
/// Stop adding queued frames to one write beyond this many bytes.
const MAX_BATCH: usize = 1 << 20;
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

/// State shared by the client, its reader and writer tasks, and responses.
struct Shared {
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    pending: HashMap<u64, mpsc::Sender<Frame>>,
    /// Why the connection ended, once it has.
    closed: Option<String>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Ends the connection: every pending request sees `Closed(reason)`.
    fn close(&self, reason: String) {
        let mut state = self.lock();
        state.closed.get_or_insert(reason);
        // Dropping the senders wakes every waiting response.
        state.pending.clear();
    }

    fn closed_error(&self) -> AgentError {
        let reason = self.lock().closed.clone();
        AgentError::Closed(reason.unwrap_or_else(|| "connection dropped".into()))
    }
}

/// The frames of one request: zero or more events, then one final frame.
/// Dropping it before the end forgets the request; later frames for it are
/// discarded.
pub struct Response {
    request_id: u64,
    rx: mpsc::Receiver<Frame>,
    shared: Arc<Shared>,
    outbox: mpsc::Sender<Vec<u8>>,
    done: bool,
}

impl Response {
    pub fn request_id(&self) -> u64 {
        self.request_id
    }

    /// Asks the agent to cancel this request; its final frame still comes
    /// (for exec and run_code, a result with `cancelled` set).
    pub async fn cancel(&self) -> Result<()> {
        let bytes = Frame::new(self.request_id, Message::Cancel).encode()?;
        self.outbox
            .send(bytes)
            .await
            .map_err(|_| self.shared.closed_error())
    }

    /// The next frame of this request, `Ok(None)` after its final frame.
    /// Error frames are returned as frames; see [`into_result`].
    pub async fn next(&mut self) -> Result<Option<Frame>> {
        if self.done {
            return Ok(None);
        }
        match self.rx.recv().await {
            Some(frame) => {
                self.done = frame.message.is_final();
                Ok(Some(frame))
            }
            None => {
                self.done = true;
                Err(self.shared.closed_error())
            }
        }
    }

    /// Skips events and returns the final frame, with agent errors as `Err`.
    pub async fn finish(mut self) -> Result<Frame> {
        while let Some(frame) = self.next().await? {
            if frame.message.is_final() {
                return into_result(frame);
            }
        }
        Err(self.shared.closed_error())
    }
}

impl Drop for Response {
    fn drop(&mut self) {
        if !self.done {
            self.shared.lock().pending.remove(&self.request_id);
            // Nobody waits for the answer: stop the work too. Drop cannot
            // wait for room in the queue, so a full queue hands the frame
            // to a task.
            if let Ok(bytes) = Frame::new(self.request_id, Message::Cancel).encode() {
                match self.outbox.try_send(bytes) {
                    Ok(()) | Err(mpsc::error::TrySendError::Closed(_)) => {}
                    Err(mpsc::error::TrySendError::Full(bytes)) => {
                        if let Ok(handle) = tokio::runtime::Handle::try_current() {
                            let outbox = self.outbox.clone();
                            handle.spawn(async move {
                                let _ = outbox.send(bytes).await;
                            });
                        }
                    }
                }
            }
        }
    }
}

/// Turns an agent error frame into [`AgentError::Remote`].
pub fn into_result(frame: Frame) -> Result<Frame> {
    match frame.message {
        Message::Error(e) => Err(AgentError::Remote {
            code: e.code,
            message: e.message,
        }),
        _ => Ok(frame),
    }
}

impl AgentClient {
    /// Connects through the VMM's vsock Unix socket at `uds_path` to the
    /// guest's vsock `port` and does the protocol handshake, all within
    /// `timeout`. The same timeout then bounds each [`AgentClient::ping`]
    /// and [`AgentClient::shutdown`] (see [`AgentClient::set_request_timeout`]).
    pub async fn connect(uds_path: &Path, port: u32, timeout: Duration) -> Result<AgentClient> {
        let connecting = Self::connect_inner(uds_path, port, timeout);
        tokio::time::timeout(timeout, connecting)
            .await
            .map_err(|_| AgentError::Timeout {
                what: "connecting to the guest agent",
                after: timeout,
            })?
    }

    /// Connects to an agent serving the protocol directly on a Unix socket
    /// (`airlock-agent --serve-unix PATH`, the debug mode), without the
    /// VMM's CONNECT preamble.
    pub async fn connect_unix(path: &Path, timeout: Duration) -> Result<AgentClient> {
        let connecting = async {
            let stream = UnixStream::connect(path)
                .await
                .map_err(|source| AgentError::Connect {
                    path: path.to_path_buf(),
                    source,
                })?;
            let (read, write) = stream.into_split();
            Self::handshake(read, write, Vec::new(), timeout).await
        };
        tokio::time::timeout(timeout, connecting)
            .await
            .map_err(|_| AgentError::Timeout {
                what: "connecting to the guest agent",
                after: timeout,
            })?
    }

    async fn connect_inner(uds_path: &Path, port: u32, timeout: Duration) -> Result<AgentClient> {
        let stream = UnixStream::connect(uds_path)
            .await
            .map_err(|source| AgentError::Connect {
                path: uds_path.to_path_buf(),
                source,
            })?;
        let (mut read, mut write) = stream.into_split();
        write
            .write_all(format!("CONNECT {port}\n").as_bytes())
            .await?;
        let leftover = read_connect_reply(&mut read, port).await?;
        Self::handshake(read, write, leftover, timeout).await
    }

    async fn handshake(
        read: OwnedReadHalf,
        mut write: OwnedWriteHalf,
        leftover: Vec<u8>,
        timeout: Duration,
    ) -> Result<AgentClient> {
        let mut frames = FrameReader::with_buffered(read, &leftover);
        let hello = Hello {
            protocol_version: PROTOCOL_VERSION,
            client: format!("airlock {}", env!("CARGO_PKG_VERSION")),
        };
        write_frame(&mut write, &Frame::new(HELLO_ID, Message::Hello(hello))).await?;
        let reply = frames
            .read_frame()
            .await?
            .ok_or_else(|| AgentError::Handshake("the agent closed the connection".into()))?;
        let agent_version = match reply.message {
            Message::HelloOk(ok) if ok.protocol_version == PROTOCOL_VERSION => ok.agent_version,
            Message::HelloOk(ok) => {
                return Err(AgentError::Handshake(format!(
                    "agent {} speaks protocol {}, this host speaks {PROTOCOL_VERSION}",
                    ok.agent_version, ok.protocol_version
                )));
            }
            Message::Error(e) => {
                return Err(AgentError::Handshake(format!(
                    "the agent refused ({:?}): {}",
                    e.code, e.message
                )));
            }
            other => {
                return Err(AgentError::Handshake(format!(
                    "expected HelloOk, got {:?}",
                    other.kind()
                )));
            }
        };

        let shared = Arc::new(Shared {
            state: Mutex::default(),
        });
        let (outbox, queue) = mpsc::channel(OUTBOX_FRAMES);
        tokio::spawn(write_loop(write, queue, shared.clone()));
        let reader = tokio::spawn(read_loop(frames, shared.clone()));
        Ok(AgentClient {
            shared,
            outbox,
            next_id: AtomicU64::new(HELLO_ID + 1),
            agent_version,
            request_timeout: timeout,
            long_request_timeout: LONG_REQUEST_TIMEOUT.max(timeout),
            reader,
        })
    }

    /// The version the agent reported in the handshake.
    pub fn agent_version(&self) -> &str {
        &self.agent_version
    }

    pub fn set_request_timeout(&mut self, timeout: Duration) {
        self.request_timeout = timeout;
    }

    /// Bounds file, limit, reset and refresh requests (default 10 minutes).
    pub fn set_long_request_timeout(&mut self, timeout: Duration) {
        self.long_request_timeout = timeout;
    }

    /// Whether the connection has ended (requests would fail with `Closed`).
    pub fn is_closed(&self) -> bool {
        self.shared.lock().closed.is_some()
    }

    /// Sends a request and returns its response stream. Not bounded by the
    /// request timeout: long-running requests bound themselves.
    pub async fn request(&self, message: Message, payload: Vec<u8>) -> Result<Response> {
        let request_id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let bytes = Frame::new(request_id, message)
            .with_payload(payload)
            .encode()?;
        let (tx, rx) = mpsc::channel(RESPONSE_QUEUE);
        {
            let mut state = self.shared.lock();
            if let Some(reason) = &state.closed {
                return Err(AgentError::Closed(reason.clone()));
            }
            // Registered before sending, so that no reply can beat it.
            state.pending.insert(request_id, tx);
        }
        // Built now so that its Drop unregisters the id if we fail or are
        // cancelled from here on.
        let response = Response {
            request_id,
            rx,
            shared: self.shared.clone(),
            outbox: self.outbox.clone(),
            done: false,
        };
        if self.outbox.send(bytes).await.is_err() {
            return Err(self.shared.closed_error());
        }
        Ok(response)
    }

    /// Checks that the agent answers; returns its version and uptime.
    pub async fn ping(&self) -> Result<Pong> {
        let frame = self.call(Message::Ping, "ping").await?;
        match frame.message {
            Message::Pong(pong) => Ok(pong),
            other => Err(AgentError::UnexpectedReply {
                request: Kind::Ping,
                got: other.kind(),
            }),
        }
    }

    /// Asks the agent to sync and reboot the guest, which ends the VM. The
    /// connection may close before the acknowledgement arrives; that counts
    /// as success too.
    pub async fn shutdown(&self) -> Result<()> {
        match self.call(Message::Shutdown, "shutdown").await {
            Ok(frame) if frame.message == Message::ShutdownOk => Ok(()),
            Ok(frame) => Err(AgentError::UnexpectedReply {
                request: Kind::Shutdown,
                got: frame.message.kind(),
            }),
            Err(AgentError::Closed(_)) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// One request, its final frame, within the request timeout.
    async fn call(&self, message: Message, what: &'static str) -> Result<Frame> {
        let exchange = async { self.request(message, Vec::new()).await?.finish().await };
        tokio::time::timeout(self.request_timeout, exchange)
            .await
            .map_err(|_| AgentError::Timeout {
                what,
                after: self.request_timeout,
            })?
    }
    /// Asks the agent to cancel request `request_id` (see [`Response::cancel`]).
    pub async fn cancel(&self, request_id: u64) -> Result<()> {
        let bytes = Frame::new(request_id, Message::Cancel).encode()?;
        self.outbox
            .send(bytes)
            .await
            .map_err(|_| self.shared.closed_error())
    }

    /// One request, its final frame and payload, within `bound`.
    async fn call_with(
        &self,
        message: Message,
        payload: Vec<u8>,
        what: &'static str,
        bound: Duration,
    ) -> Result<Frame> {
        let exchange = async { self.request(message, payload).await?.finish().await };
        tokio::time::timeout(bound, exchange)
            .await
            .map_err(|_| AgentError::Timeout { what, after: bound })?
    }

    /// Starts a command; stream its events with [`Call::next_event`], or
    /// wait for it with [`Call::finish_exec`]. Dropping the call cancels it.
    pub async fn start_exec(&self, exec: Exec, stdin: Vec<u8>) -> Result<Call> {
        let bound = op_bound(exec.timeout_ms);
        let response = self.request(Message::Exec(exec), stdin).await?;
        Ok(Call { response, bound })
    }

    /// Runs a command as the sandbox user and collects its output.
    pub async fn exec(&self, exec: Exec, stdin: Vec<u8>) -> Result<ExecOutput> {
        self.start_exec(exec, stdin)
            .await?
            .finish_exec(|_| {})
            .await
    }

    /// Runs `script` with `bash -c`, with a timeout and default limits.
    pub async fn sh(&self, script: &str, timeout: Duration) -> Result<ExecOutput> {
        self.exec(
            Exec {
                command: Command::Shell(script.to_string()),
                cwd: None,
                env: Vec::new(),
                timeout_ms: Some(timeout.as_millis() as u64),
                output: OutputLimits::default(),
            },
            Vec::new(),
        )
        .await
    }

    /// Starts code in the warm interpreter of its language.
    pub async fn start_run_code(&self, run: RunCode, code: impl Into<Vec<u8>>) -> Result<Call> {
        let bound = op_bound(run.timeout_ms);
        let response = self.request(Message::RunCode(run), code.into()).await?;
        Ok(Call { response, bound })
    }

    /// Runs code in the warm interpreter of `language` with a timeout and
    /// default output limits, and collects its output and images.
    pub async fn run_code(
        &self,
        language: Language,
        code: &str,
        timeout: Duration,
    ) -> Result<RunOutput> {
        let run = RunCode {
            language,
            timeout_ms: Some(timeout.as_millis() as u64),
            output: OutputLimits::default(),
        };
        self.start_run_code(run, code)
            .await?
            .finish_run(|_| {})
            .await
    }

    /// Drops the state of one interpreter (or of all); they stay warm (bash
    /// restarts its shell).
    pub async fn reset(&self, language: Option<Language>) -> Result<()> {
        let message = Message::ResetInterpreter(ResetInterpreter { language });
        let frame = self
            .call_with(message, Vec::new(), "reset", self.long_request_timeout)
            .await?;
        expect(frame, Kind::ResetInterpreter, |m| match m {
            Message::Done => Some(()),
            _ => None,
        })
        .map(|(v, _)| v)
    }

    /// Which interpreters are warm; with `wait`, first waits up to that long
    /// for all of them to finish starting.
    pub async fn warm_status(&self, wait: Option<Duration>) -> Result<WarmStatusReply> {
        let wait_ms = wait.map(|w| w.as_millis() as u64);
        let bound = self.request_timeout + wait.unwrap_or_default();
        let frame = self
            .call_with(
                Message::WarmStatus(WarmStatus { wait_ms }),
                Vec::new(),
                "warm status",
                bound,
            )
            .await?;
        expect(frame, Kind::WarmStatus, |m| match m {
            Message::WarmStatusReply(r) => Some(r),
            _ => None,
        })
        .map(|(v, _)| v)
    }

    /// Makes a restored guest fresh: mixes `entropy` into its kernel RNG,
    /// sets its clock, reseeds the interpreters' generators.
    pub async fn refresh(
        &self,
        wall_clock_unix_ns: Option<u64>,
        entropy: Vec<u8>,
    ) -> Result<RefreshReply> {
        let message = Message::Refresh(Refresh { wall_clock_unix_ns });
        let frame = self
            .call_with(message, entropy, "refresh", self.long_request_timeout)
            .await?;
        expect(frame, Kind::Refresh, |m| match m {
            Message::RefreshReply(r) => Some(r),
            _ => None,
        })
        .map(|(v, _)| v)
    }

    /// Changes limits on user code (absent fields stay); returns those in force.
    pub async fn set_limits(&self, limits: SetLimits) -> Result<Limits> {
        let frame = self
            .call_with(
                Message::SetLimits(limits),
                Vec::new(),
                "set limits",
                self.long_request_timeout,
            )
            .await?;
        expect(frame, Kind::SetLimits, |m| match m {
            Message::Limits(l) => Some(l),
            _ => None,
        })
        .map(|(v, _)| v)
    }

    /// The limits in force and current use.
    pub async fn limits(&self) -> Result<Limits> {
        self.set_limits(SetLimits::default()).await
    }

    /// Writes a file as the sandbox user (at most [`MAX_FILE_LEN`] bytes).
    pub async fn write_file(&self, write: WriteFile, content: Vec<u8>) -> Result<FileStat> {
        let frame = self
            .call_with(
                Message::WriteFile(write),
                content,
                "write file",
                self.long_request_timeout,
            )
            .await?;
        expect(frame, Kind::WriteFile, |m| match m {
            Message::FileStat(s) => Some(s),
            _ => None,
        })
        .map(|(v, _)| v)
    }

    /// Reads a byte range of a file (`length: None` reads to the end, up to
    /// [`MAX_FILE_LEN`]).
    pub async fn read_file_range(
        &self,
        path: &str,
        offset: u64,
        length: Option<u64>,
    ) -> Result<(FileData, Vec<u8>)> {
        let message = Message::ReadFile(ReadFile {
            path: path.to_string(),
            offset,
            length,
        });
        let frame = self
            .call_with(message, Vec::new(), "read file", self.long_request_timeout)
            .await?;
        expect(frame, Kind::ReadFile, |m| match m {
            Message::FileData(d) => Some(d),
            _ => None,
        })
    }

    /// Reads a whole file, in ranges if it is bigger than one frame, up to
    /// `max_bytes`.
    pub async fn read_file(&self, path: &str, max_bytes: u64) -> Result<Vec<u8>> {
        let mut out = Vec::new();
        loop {
            let want = (max_bytes - out.len() as u64).min(MAX_FILE_LEN);
            let (data, bytes) = self
                .read_file_range(path, out.len() as u64, Some(want))
                .await?;
            out.extend_from_slice(&bytes);
            if data.eof {
                return Ok(out);
            }
            if out.len() as u64 >= max_bytes || bytes.is_empty() {
                return Err(AgentError::Remote {
                    code: ErrorCode::TooLarge,
                    message: format!("{path} is {} bytes, more than {max_bytes}", data.size),
                });
            }
        }
    }

    pub async fn list_files(&self, list: ListFiles) -> Result<FileList> {
        let frame = self
            .call_with(
                Message::ListFiles(list),
                Vec::new(),
                "list files",
                self.long_request_timeout,
            )
            .await?;
        expect(frame, Kind::ListFiles, |m| match m {
            Message::FileList(l) => Some(l),
            _ => None,
        })
        .map(|(v, _)| v)
    }

    pub async fn remove_file(&self, path: &str, recursive: bool) -> Result<()> {
        let message = Message::RemoveFile(RemoveFile {
            path: path.to_string(),
            recursive,
        });
        let frame = self
            .call_with(
                message,
                Vec::new(),
                "remove file",
                self.long_request_timeout,
            )
            .await?;
        expect(frame, Kind::RemoveFile, |m| match m {
            Message::Done => Some(()),
            _ => None,
        })
        .map(|(v, _)| v)
    }

    pub async fn stat_file(&self, path: &str) -> Result<FileStat> {
        let message = Message::StatFile(StatFile {
            path: path.to_string(),
        });
        let frame = self
            .call_with(message, Vec::new(), "stat file", self.long_request_timeout)
            .await?;
        expect(frame, Kind::StatFile, |m| match m {
            Message::FileStat(s) => Some(s),
            _ => None,
        })
        .map(|(v, _)| v)
    }
}

/// How long to wait for the result of an exec or run_code whose own timeout
/// is `timeout_ms`.
fn op_bound(timeout_ms: Option<u64>) -> Duration {
    let own = Duration::from_millis(timeout_ms.unwrap_or(airlock_protocol::DEFAULT_TIMEOUT_MS));
    own + RESULT_SLACK
}

/// The typed body of a final frame, or an error naming what came instead.
fn expect<T>(
    frame: Frame,
    request: Kind,
    pick: impl FnOnce(Message) -> Option<T>,
) -> Result<(T, Vec<u8>)> {
    let got = frame.message.kind();
    match pick(frame.message) {
        Some(v) => Ok((v, frame.payload)),
        None => Err(AgentError::UnexpectedReply { request, got }),
    }
}

/// A streamed event of an exec or run_code.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    Output { stream: Stream, bytes: Vec<u8> },
    Image { image: Image, bytes: Vec<u8> },
}

/// An exec or run_code in flight. Dropping it before the end cancels it.
pub struct Call {
    response: Response,
    bound: Duration,
}

/// What a finished call returned: its final message and collected events.
struct Collected {
    message: Message,
    stdout: Vec<u8>,
    stderr: Vec<u8>,
    images: Vec<(Image, Vec<u8>)>,
}

impl Call {
    pub fn request_id(&self) -> u64 {
        self.response.request_id()
    }

    /// Asks the agent to stop it (kill the command, interrupt the code); the
    /// result still comes, with `cancelled` set.
    pub async fn cancel(&self) -> Result<()> {
        self.response.cancel().await
    }

    /// The next event, or `Ok(None)` once the final frame has arrived (it
    /// is then returned by the `finish_*` methods).
    async fn next_frame(&mut self) -> Result<Frame> {
        match self.response.next().await? {
            Some(frame) => Ok(frame),
            None => Err(self.response.shared.closed_error()),
        }
    }

    async fn collect(&mut self, mut on_event: impl FnMut(&Event)) -> Result<Collected> {
        let bound = self.bound;
        let collecting = async {
            let mut out = Collected {
                message: Message::Done,
                stdout: Vec::new(),
                stderr: Vec::new(),
                images: Vec::new(),
            };
            loop {
                let frame = self.next_frame().await?;
                match frame.message {
                    Message::Output(o) => {
                        let event = Event::Output {
                            stream: o.stream,
                            bytes: frame.payload,
                        };
                        on_event(&event);
                        if let Event::Output { stream, bytes } = event {
                            match stream {
                                Stream::Stdout => out.stdout.extend_from_slice(&bytes),
                                Stream::Stderr => out.stderr.extend_from_slice(&bytes),
                            }
                        }
                    }
                    Message::Image(image) => {
                        let event = Event::Image {
                            image,
                            bytes: frame.payload,
                        };
                        on_event(&event);
                        if let Event::Image { image, bytes } = event {
                            out.images.push((image, bytes));
                        }
                    }
                    message => {
                        into_result(Frame::new(frame.request_id, message.clone()))?;
                        out.message = message;
                        return Ok(out);
                    }
                }
            }
        };
        tokio::time::timeout(bound, collecting)
            .await
            .map_err(|_| AgentError::Timeout {
                what: "the result of a call",
                after: bound,
            })?
    }

    /// Waits for the result of an exec, passing each event to `on_event`.
    pub async fn finish_exec(mut self, on_event: impl FnMut(&Event)) -> Result<ExecOutput> {
        let c = self.collect(on_event).await?;
        match c.message {
            Message::ExecResult(result) => Ok(ExecOutput {
                result,
                stdout: c.stdout,
                stderr: c.stderr,
            }),
            other => Err(AgentError::UnexpectedReply {
                request: Kind::Exec,
                got: other.kind(),
            }),
        }
    }

    /// Waits for the result of a run_code, passing each event to `on_event`.
    pub async fn finish_run(mut self, on_event: impl FnMut(&Event)) -> Result<RunOutput> {
        let c = self.collect(on_event).await?;
        match c.message {
            Message::RunCodeResult(result) => Ok(RunOutput {
                result,
                stdout: c.stdout,
                stderr: c.stderr,
                images: c.images,
            }),
            other => Err(AgentError::UnexpectedReply {
                request: Kind::RunCode,
                got: other.kind(),
            }),
        }
    }
}

/// The outcome of an exec: its result and the output kept (see the
/// result's stream stats for what was cut).
#[derive(Debug, Clone)]
pub struct ExecOutput {
    pub result: ExecResult,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

impl ExecOutput {
    /// Exited with status 0 (not killed, not timed out).
    pub fn success(&self) -> bool {
        self.result.exit_code == Some(0) && !self.result.timed_out && !self.result.cancelled
    }

    pub fn stdout_text(&self) -> OutputText {
        OutputText::decode(&self.stdout, &self.result.stdout)
    }

    pub fn stderr_text(&self) -> OutputText {
        OutputText::decode(&self.stderr, &self.result.stderr)
    }
}

/// The outcome of a run_code: its result, output kept and images.
#[derive(Debug, Clone)]
pub struct RunOutput {
    pub result: RunCodeResult,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    pub images: Vec<(Image, Vec<u8>)>,
}

impl RunOutput {
    /// Ran to the end without an exception, timeout or lost state.
    pub fn success(&self) -> bool {
        let p = &self.result.process;
        p.exit_code == Some(0)
            && self.result.error.is_none()
            && !p.timed_out
            && !p.cancelled
            && !self.result.state_lost
    }

    pub fn stdout_text(&self) -> OutputText {
        OutputText::decode(&self.stdout, &self.result.process.stdout)
    }

    pub fn stderr_text(&self) -> OutputText {
        OutputText::decode(&self.stderr, &self.result.process.stderr)
    }
}

/// Output decoded for display: invalid UTF-8 replaced (and said so), and a
/// marker where the agent cut it, with the total size.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutputText {
    pub text: String,
    /// Some bytes were not UTF-8 and show as U+FFFD.
    pub lossy: bool,
    pub truncated: bool,
    pub total_bytes: u64,
}

impl OutputText {
    pub fn decode(bytes: &[u8], stats: &StreamStats) -> OutputText {
        let truncated = stats.truncated();
        // A cut can split a character: do not report that as invalid.
        let bytes = if truncated {
            trim_partial_char(bytes)
        } else {
            bytes
        };
        let decoded = String::from_utf8_lossy(bytes);
        let lossy = matches!(decoded, std::borrow::Cow::Owned(_));
        let mut text = decoded.into_owned();
        if truncated {
            if !text.is_empty() && !text.ends_with('\n') {
                text.push('\n');
            }
            text.push_str(&format!(
                "[output truncated: showing the first {} of {} bytes]\n",
                stats.kept_bytes, stats.total_bytes
            ));
        }
        if lossy {
            if !text.is_empty() && !text.ends_with('\n') {
                text.push('\n');
            }
            text.push_str(
                "[the output was not valid UTF-8; invalid bytes are shown as \u{FFFD}]\n",
            );
        }
        OutputText {
            text,
            lossy,
            truncated,
            total_bytes: stats.total_bytes.max(bytes.len() as u64),
        }
    }
}

/// Drops an incomplete UTF-8 sequence at the end of `bytes`.
fn trim_partial_char(bytes: &[u8]) -> &[u8] {
    // A character is at most 4 bytes: look at the last 3 for a lead byte
    // whose sequence does not fit.
    for back in 1..=3.min(bytes.len()) {
        let b = bytes[bytes.len() - back];
        if b & 0xC0 == 0x80 {
            continue; // continuation byte
        }
        let need = match b {
            0xC0..=0xDF => 2,
            0xE0..=0xEF => 3,
            0xF0..=0xF7 => 4,
            _ => 1,
        };
        if need > back {
            return &bytes[..bytes.len() - back];
        }
        break;
    }
    bytes
}

/// Reads the VMM's answer to `CONNECT`, at most [`MAX_CONNECT_LINE`] bytes,
/// and returns whatever came after the line (the start of the byte stream).
async fn read_connect_reply(read: &mut OwnedReadHalf, port: u32) -> Result<Vec<u8>> {
    let mut buf = [0u8; MAX_CONNECT_LINE];
    let mut len = 0;
    let newline = loop {
        if let Some(i) = buf[..len].iter().position(|&b| b == b'\n') {
            break i;
        }
        if len == buf.len() {
            return Err(AgentError::Handshake(format!(
                "vsock CONNECT {port}: reply line longer than {MAX_CONNECT_LINE} bytes"
            )));
        }
        let n = read.read(&mut buf[len..]).await?;
        if n == 0 {
            return Err(AgentError::Handshake(format!(
                "vsock CONNECT {port}: the VMM closed the connection (is the agent listening?)"
            )));
        }
        len += n;
    };
    let line = &buf[..newline];
    let host_port = std::str::from_utf8(line)
        .ok()
        .and_then(|l| l.strip_prefix("OK "))
        .and_then(|p| p.trim_end_matches('\r').parse::<u32>().ok());
    if host_port.is_none() {
        return Err(AgentError::Handshake(format!(
            "vsock CONNECT {port}: unexpected reply {:?}",
            String::from_utf8_lossy(line)
        )));
    }
    Ok(buf[newline + 1..len].to_vec())
}

async fn read_loop(mut frames: FrameReader<OwnedReadHalf>, shared: Arc<Shared>) {
    // An error frame for no request explains why the agent is closing.
    let mut last_error = None;
    let reason = loop {
        let frame = match frames.read_frame().await {
            Ok(Some(frame)) => frame,
            Ok(None) => break "the agent closed the connection".to_string(),
            Err(e) if e.is_recoverable() => {
                tracing::warn!("ignoring a frame from the guest agent: {e}");
                continue;
            }
            Err(e) => break e.to_string(),
        };
        let id = frame.request_id;
        let tx = {
            let mut state = shared.lock();
            if frame.message.is_final() {
                state.pending.remove(&id)
            } else {
                state.pending.get(&id).cloned()
            }
        };
        match tx {
            // Waits if the consumer lags (backpressure to the guest); a
            // dropped consumer just discards the frame.
            Some(tx) => {
                let _ = tx.send(frame).await;
            }
            None => match frame.message {
                Message::Error(e) => {
                    tracing::debug!("guest agent error for request {id}: {e:?}");
                    last_error = Some(format!("{:?}: {}", e.code, e.message));
                }
                other => tracing::debug!("discarding {:?} for finished request {id}", other.kind()),
            },
        }
    };
    let reason = match last_error {
        Some(error) => format!("{reason} (agent said {error})"),
        None => reason,
    };
    shared.close(reason);
}

async fn write_loop(
    mut write: OwnedWriteHalf,
    mut queue: mpsc::Receiver<Vec<u8>>,
    shared: Arc<Shared>,
) {
    while let Some(mut batch) = queue.recv().await {
        // Frames queued meanwhile go out in the same write.
        while batch.len() < MAX_BATCH {
            match queue.try_recv() {
                Ok(more) => batch.extend_from_slice(&more),
                Err(_) => break,
            }
        }
        if let Err(e) = write.write_all(&batch).await {
            shared.close(format!("write error: {e}"));
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    //! Against an in-process fake of the VMM's vsock socket plus the agent.

    use std::future::Future;

    use airlock_protocol::{ErrorBody, HelloOk, Output, Stream};
    use tokio::net::UnixListener;

    use super::*;

    const LIMIT: Duration = Duration::from_secs(5);

    struct Peer {
        frames: FrameReader<OwnedReadHalf>,
        write: OwnedWriteHalf,
    }

    impl Peer {
        async fn recv(&mut self) -> Option<Frame> {
            self.frames.read_frame().await.unwrap()
        }

        async fn send(&mut self, frame: Frame) {
            write_frame(&mut self.write, &frame).await.unwrap();
        }

        /// Answers the Hello like a current agent.
        async fn accept_hello(&mut self) {
            let hello = self.recv().await.unwrap();
            assert!(
                matches!(hello.message, Message::Hello(ref h) if h.protocol_version == PROTOCOL_VERSION)
            );
            self.send(Frame::new(hello.request_id, hello_ok(PROTOCOL_VERSION)))
                .await;
        }
    }

    fn hello_ok(protocol_version: u32) -> Message {
        Message::HelloOk(HelloOk {
            agent_version: "9.9.9".into(),
            protocol_version,
        })
    }

    /// Serves one connection on a fresh socket: reads the CONNECT line,
    /// writes `reply`, then hands the stream to `script`.
    fn fake_vmm<F, Fut>(
        reply: &'static [u8],
        script: F,
    ) -> (tempfile::TempDir, PathBuf, JoinHandle<()>)
    where
        F: FnOnce(Peer) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send,
    {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vsock.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let task = tokio::spawn(async move {
            let (stream, _) = listener.accept().await.unwrap();
            let (mut read, mut write) = stream.into_split();
            let mut line = Vec::new();
            let mut byte = [0u8; 1];
            while read.read_exact(&mut byte).await.is_ok() && byte[0] != b'\n' {
                line.push(byte[0]);
            }
            assert_eq!(line, b"CONNECT 1024");
            write.write_all(reply).await.unwrap();
            script(Peer {
                frames: FrameReader::new(read),
                write,
            })
            .await;
        });
        (dir, path, task)
    }

    /// A well-behaved agent: Pong's uptime_ms echoes the request id.
    async fn agent(mut peer: Peer) {
        peer.accept_hello().await;
        while let Some(frame) = peer.recv().await {
            let id = frame.request_id;
            let reply = match frame.message {
                Message::Ping => Message::Pong(Pong {
                    agent_version: "9.9.9".into(),
                    uptime_ms: id,
                }),
                Message::Shutdown => {
                    peer.send(Frame::new(id, Message::ShutdownOk)).await;
                    return;
                }
                _ => Message::error(ErrorCode::Unsupported, "no"),
            };
            peer.send(Frame::new(id, reply)).await;
        }
    }

    async fn connect(path: &Path) -> Result<AgentClient> {
        AgentClient::connect(path, 1024, LIMIT).await
    }

    #[tokio::test]
    async fn connect_ping_shutdown() {
        let (_dir, path, peer) = fake_vmm(b"OK 1073741824\n", agent);
        let client = connect(&path).await.unwrap();
        assert_eq!(client.agent_version(), "9.9.9");
        let pong = client.ping().await.unwrap();
        assert_eq!((pong.agent_version.as_str(), pong.uptime_ms), ("9.9.9", 1));
        client.shutdown().await.unwrap();
        peer.await.unwrap();
        // The agent is gone: requests now fail as Closed.
        let err = client.ping().await.unwrap_err();
        assert!(matches!(err, AgentError::Closed(_)), "{err}");
        assert!(client.is_closed());
    }

    #[tokio::test]
    async fn shutdown_counts_a_close_without_ack_as_done() {
        let (_dir, path, _peer) = fake_vmm(b"OK 5\n", |mut peer: Peer| async move {
            peer.accept_hello().await;
            let frame = peer.recv().await.unwrap();
            assert_eq!(frame.message, Message::Shutdown);
            // The guest rebooted before the ack left: just close.
        });
        connect(&path).await.unwrap().shutdown().await.unwrap();
    }

    #[tokio::test]
    async fn stream_bytes_after_ok_line_are_kept() {
        // The HelloOk arrives in the same read as the OK line.
        let mut reply = b"OK 5\n".to_vec();
        Frame::new(HELLO_ID, hello_ok(PROTOCOL_VERSION))
            .encode_into(&mut reply)
            .unwrap();
        let reply: &'static [u8] = reply.leak();
        let (_dir, path, _peer) = fake_vmm(reply, |mut peer: Peer| async move {
            assert!(matches!(
                peer.recv().await.unwrap().message,
                Message::Hello(_)
            ));
            let ping = peer.recv().await.unwrap();
            let pong = Pong {
                agent_version: "x".into(),
                uptime_ms: 0,
            };
            peer.send(Frame::new(ping.request_id, Message::Pong(pong)))
                .await;
        });
        let client = connect(&path).await.unwrap();
        assert_eq!(client.ping().await.unwrap().agent_version, "x");
    }

    #[tokio::test]
    async fn vmm_refusals_are_handshake_errors() {
        for reply in [
            &b"FAIL no listener\n"[..],
            b"OK\n",
            b"OK 12x\n",
            b"ok 5\n",
            b"",
        ] {
            let (_dir, path, _peer) = fake_vmm(reply, |_peer: Peer| async {});
            let err = connect(&path).await.err().unwrap();
            assert!(matches!(err, AgentError::Handshake(_)), "{reply:?}: {err}");
        }
    }

    #[tokio::test]
    async fn overlong_reply_line_is_rejected() {
        let (_dir, path, _peer) = fake_vmm(&[b'O'; 4096], |peer: Peer| async move {
            // Hold the connection open: the client must give up by itself.
            let _ = peer.frames.into_inner().readable().await;
        });
        let err = connect(&path).await.err().unwrap();
        assert!(
            matches!(&err, AgentError::Handshake(m) if m.contains("longer")),
            "{err}"
        );
    }

    #[tokio::test]
    async fn missing_socket_is_a_connect_error() {
        let dir = tempfile::tempdir().unwrap();
        let err = connect(&dir.path().join("nope")).await.err().unwrap();
        assert!(matches!(err, AgentError::Connect { .. }), "{err}");
    }

    #[tokio::test]
    async fn silent_peer_times_out() {
        let (_dir, path, _peer) = fake_vmm(b"OK 5\n", |mut peer: Peer| async move {
            // Reads the Hello, never answers.
            let _ = peer.recv().await;
            std::future::pending::<()>().await;
        });
        let started = std::time::Instant::now();
        let err = AgentClient::connect(&path, 1024, Duration::from_millis(200))
            .await
            .err()
            .unwrap();
        assert!(matches!(err, AgentError::Timeout { .. }), "{err}");
        assert!(started.elapsed() < LIMIT);
    }

    #[tokio::test]
    async fn version_mismatch_is_a_handshake_error() {
        let (_dir, path, _peer) = fake_vmm(b"OK 5\n", |mut peer: Peer| async move {
            let hello = peer.recv().await.unwrap();
            let refusal = Message::error(ErrorCode::VersionMismatch, "agent speaks 0");
            peer.send(Frame::new(hello.request_id, refusal)).await;
        });
        let err = connect(&path).await.err().unwrap();
        assert!(
            matches!(&err, AgentError::Handshake(m) if m.contains("agent speaks 0")),
            "{err}"
        );

        let (_dir, path, _peer) = fake_vmm(b"OK 5\n", |mut peer: Peer| async move {
            let hello = peer.recv().await.unwrap();
            peer.send(Frame::new(hello.request_id, hello_ok(PROTOCOL_VERSION + 1)))
                .await;
        });
        let err = connect(&path).await.err().unwrap();
        assert!(
            matches!(&err, AgentError::Handshake(m) if m.contains("speaks protocol")),
            "{err}"
        );
    }

    #[tokio::test]
    async fn concurrent_requests_are_routed_by_id() {
        let (_dir, path, _peer) = fake_vmm(b"OK 5\n", |mut peer: Peer| async move {
            peer.accept_hello().await;
            // Collect all ten, answer in reverse order.
            let mut ids = Vec::new();
            for _ in 0..10 {
                ids.push(peer.recv().await.unwrap().request_id);
            }
            for id in ids.into_iter().rev() {
                let pong = Pong {
                    agent_version: String::new(),
                    uptime_ms: id,
                };
                peer.send(Frame::new(id, Message::Pong(pong))).await;
            }
            let _ = peer.recv().await;
        });
        let client = connect(&path).await.unwrap();
        let mut requests = Vec::new();
        for _ in 0..10 {
            requests.push(client.request(Message::Ping, Vec::new()).await.unwrap());
        }
        let results = futures_join(requests).await;
        for (id, frame) in results {
            let Message::Pong(pong) = frame.message else {
                panic!()
            };
            assert_eq!(pong.uptime_ms, id);
        }
    }

    /// Finishes all responses concurrently (no extra crates needed).
    async fn futures_join(responses: Vec<Response>) -> Vec<(u64, Frame)> {
        let tasks: Vec<_> = responses
            .into_iter()
            .map(|r| tokio::spawn(async move { (r.request_id(), r.finish().await.unwrap()) }))
            .collect();
        let mut out = Vec::new();
        for t in tasks {
            out.push(tokio::time::timeout(LIMIT, t).await.unwrap().unwrap());
        }
        out
    }

    #[tokio::test]
    async fn streamed_events_then_final_frame() {
        let (_dir, path, _peer) = fake_vmm(b"OK 5\n", |mut peer: Peer| async move {
            peer.accept_hello().await;
            let id = peer.recv().await.unwrap().request_id;
            let all_bytes: Vec<u8> = (0..=255).collect();
            for (stream, payload) in [
                (Stream::Stdout, b"out".to_vec()),
                (Stream::Stderr, all_bytes),
            ] {
                let event = Message::Output(Output { stream });
                peer.send(Frame::new(id, event).with_payload(payload)).await;
            }
            // A frame for an unknown request must not disturb anything.
            peer.send(Frame::new(999, Message::ShutdownOk)).await;
            let pong = Pong {
                agent_version: String::new(),
                uptime_ms: 0,
            };
            peer.send(Frame::new(id, Message::Pong(pong))).await;
            let _ = peer.recv().await;
        });
        let client = connect(&path).await.unwrap();
        let mut response = client.request(Message::Ping, Vec::new()).await.unwrap();
        let first = response.next().await.unwrap().unwrap();
        assert_eq!(
            (first.message.kind(), first.payload.as_slice()),
            (Kind::Output, &b"out"[..])
        );
        let second = response.next().await.unwrap().unwrap();
        assert_eq!(second.payload.len(), 256);
        assert_eq!(
            response.next().await.unwrap().unwrap().message.kind(),
            Kind::Pong
        );
        assert!(response.next().await.unwrap().is_none());
        assert!(!client.is_closed());
    }

    #[tokio::test]
    async fn agent_error_reply_is_remote_error() {
        let (_dir, path, _peer) = fake_vmm(b"OK 5\n", |mut peer: Peer| async move {
            peer.accept_hello().await;
            let id = peer.recv().await.unwrap().request_id;
            let error = Message::Error(ErrorBody {
                code: ErrorCode::Internal,
                message: "boom".into(),
            });
            peer.send(Frame::new(id, error)).await;
            let _ = peer.recv().await;
        });
        let client = connect(&path).await.unwrap();
        let err = client.ping().await.unwrap_err();
        assert!(
            matches!(&err, AgentError::Remote { code: ErrorCode::Internal, message } if message == "boom"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn garbage_from_agent_fails_pending_requests() {
        let (_dir, path, _peer) = fake_vmm(b"OK 5\n", |mut peer: Peer| async move {
            peer.accept_hello().await;
            let _ = peer.recv().await;
            peer.write.write_all(&[0xFF; 64]).await.unwrap();
            let _ = peer.recv().await;
        });
        let client = connect(&path).await.unwrap();
        let err = client.ping().await.unwrap_err();
        assert!(
            matches!(&err, AgentError::Closed(m) if m.contains("exceeds")),
            "{err}"
        );
        assert!(matches!(client.ping().await, Err(AgentError::Closed(_))));
    }

    #[tokio::test]
    async fn agent_close_reason_is_reported() {
        let (_dir, path, _peer) = fake_vmm(b"OK 5\n", |mut peer: Peer| async move {
            peer.accept_hello().await;
            let _ = peer.recv().await;
            peer.send(Frame::new(
                0,
                Message::error(ErrorCode::Protocol, "bad frame"),
            ))
            .await;
        });
        let client = connect(&path).await.unwrap();
        let err = client.ping().await.unwrap_err();
        assert!(
            matches!(&err, AgentError::Closed(m) if m.contains("bad frame")),
            "{err}"
        );
    }

    #[tokio::test]
    async fn slow_request_times_out_and_connection_stays_usable() {
        let (_dir, path, _peer) = fake_vmm(b"OK 5\n", |mut peer: Peer| async move {
            peer.accept_hello().await;
            let first = peer.recv().await.unwrap().request_id;
            // The client gave up on the first: it says so with a Cancel.
            let cancel = peer.recv().await.unwrap();
            assert_eq!(
                (cancel.request_id, cancel.message),
                (first, Message::Cancel)
            );
            let second = peer.recv().await.unwrap().request_id;
            // Answer both, late: the first one's answer finds nobody waiting.
            for id in [first, second] {
                let pong = Pong {
                    agent_version: String::new(),
                    uptime_ms: id,
                };
                peer.send(Frame::new(id, Message::Pong(pong))).await;
            }
            let _ = peer.recv().await;
        });
        let mut client = connect(&path).await.unwrap();
        client.set_request_timeout(Duration::from_millis(100));
        assert!(matches!(
            client.ping().await,
            Err(AgentError::Timeout { .. })
        ));
        client.set_request_timeout(LIMIT);
        assert_eq!(client.ping().await.unwrap().uptime_ms, 2);
        assert!(client.shared.lock().pending.is_empty());
    }

    #[tokio::test]
    async fn dropping_the_client_wakes_waiting_responses() {
        let (_dir, path, _peer) = fake_vmm(b"OK 5\n", |mut peer: Peer| async move {
            peer.accept_hello().await;
            std::future::pending::<()>().await;
        });
        let client = connect(&path).await.unwrap();
        let response = client.request(Message::Ping, Vec::new()).await.unwrap();
        drop(client);
        let result = tokio::time::timeout(LIMIT, response.finish())
            .await
            .unwrap();
        assert!(matches!(result, Err(AgentError::Closed(_))));
    }
}

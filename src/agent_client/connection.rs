//! The connection: CONNECT through the VMM, the handshake, and the reader
//! and writer tasks that route frames by request id.

use super::*;

/// State shared by the client, its reader and writer tasks, and responses.
pub(super) struct Shared {
    pub(super) state: Mutex<State>,
    /// Bytes of frames read but not yet taken by their consumers, over all
    /// of this connection's requests: the reader waits past it, so a guest
    /// cannot grow the host's queues beyond it.
    pub(super) queued: Arc<Semaphore>,
}

/// A frame in a request's queue, holding its share of the byte budget.
pub(super) type Queued = (Frame, OwnedSemaphorePermit);

/// The queued-bytes budget of one connection: room for one frame of the
/// largest size (a 16 MiB file read) and then some.
pub(super) const QUEUED_BYTES: usize = MAX_FRAME_LEN + (8 << 20);

impl Shared {
    pub(super) fn new() -> Shared {
        Shared {
            state: Mutex::default(),
            queued: Arc::new(Semaphore::new(QUEUED_BYTES)),
        }
    }
}

/// What a frame costs of the budget: its payload and a header's worth.
fn queued_cost(frame: &Frame) -> u32 {
    let cost = frame.payload.len().saturating_add(4096).min(QUEUED_BYTES);
    u32::try_from(cost).unwrap_or(u32::MAX)
}

#[derive(Default)]
pub(super) struct State {
    pub(super) pending: HashMap<u64, mpsc::Sender<Queued>>,
    /// Why the connection ended, once it has.
    closed: Option<String>,
}

impl Shared {
    pub(super) fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Ends the connection: every pending request sees `Closed(reason)`.
    pub(super) fn close(&self, reason: String) {
        let mut state = self.lock();
        state.closed.get_or_insert(reason);
        // Dropping the senders wakes every waiting response.
        state.pending.clear();
    }

    pub(super) fn closed_error(&self) -> AgentError {
        let reason = self.lock().closed.clone();
        AgentError::Closed(reason.unwrap_or_else(|| "connection dropped".into()))
    }
}

/// The frames of one request: zero or more events, then one final frame.
/// Dropping it before the end forgets the request; later frames for it are
/// discarded.
pub struct Response {
    request_id: u64,
    rx: mpsc::Receiver<Queued>,
    pub(super) shared: Arc<Shared>,
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
            // The permit goes here: the frame is the consumer's now.
            Some((frame, _permit)) => {
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

        let shared = Arc::new(Shared::new());
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
        match tokio::time::timeout(WRITE_STALL, self.outbox.send(bytes)).await {
            Ok(Ok(())) => Ok(response),
            Ok(Err(_)) => Err(self.shared.closed_error()),
            Err(_) => Err(AgentError::Timeout {
                what: "queueing a request for the guest agent",
                after: WRITE_STALL,
            }),
        }
    }
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
    let mut ignored = 0u64;
    let reason = loop {
        let frame = match frames.read_frame().await {
            Ok(Some(frame)) => frame,
            Ok(None) => break "the agent closed the connection".to_string(),
            Err(e) if e.is_recoverable() => {
                // A guest can send these as fast as it likes: log the first
                // few, then at powers of two, with the count.
                ignored += 1;
                if ignored <= 5 || ignored.is_power_of_two() {
                    tracing::warn!(ignored, "ignoring a frame from the guest agent: {e}");
                }
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
                let Ok(permit) = shared
                    .queued
                    .clone()
                    .acquire_many_owned(queued_cost(&frame))
                    .await
                else {
                    break "the connection's queue was closed".to_string();
                };
                let _ = tx.send((frame, permit)).await;
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
        if let Err(reason) = write_with_progress(&mut write, &batch).await {
            shared.close(reason);
            return;
        }
    }
}

/// Writes all of `bytes`, failing if the peer takes nothing for
/// [`WRITE_STALL`] (a guest that stopped granting credit).
async fn write_with_progress(
    write: &mut OwnedWriteHalf,
    mut bytes: &[u8],
) -> std::result::Result<(), String> {
    while !bytes.is_empty() {
        match tokio::time::timeout(WRITE_STALL, write.write(bytes)).await {
            Ok(Ok(0)) => return Err("write error: the VM's socket is closed".into()),
            Ok(Ok(n)) => bytes = &bytes[n..],
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Ok(Err(e)) => return Err(format!("write error: {e}")),
            Err(_) => {
                return Err(format!(
                    "the guest took no bytes for {WRITE_STALL:?} (it stopped granting vsock credit)"
                ));
            }
        }
    }
    Ok(())
}

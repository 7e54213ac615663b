//! The vsock listener and the per-connection protocol loop.
//!
//! Each connection gets a reader loop (this task) and a writer task fed by a
//! bounded queue of encoded frames; the writer sends everything queued in one
//! write. Operations (exec, run_code, files, ...) run as tasks of their own
//! that push their events and final frame into the same queue, so requests
//! run concurrently on one connection. A Cancel frame, or the connection
//! closing, signals a running request to stop.

use std::collections::HashMap;
use std::io;
use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use airlock_protocol::{
    ErrorCode, FrameError, FrameReader, HelloOk, Message, PROTOCOL_VERSION, Pong, READY_MARKER,
};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot};
use tokio_vsock::{VMADDR_CID_ANY, VMADDR_CID_HOST, VsockAddr, VsockListener};

use crate::VERSION;
use crate::conn::Conn;
use crate::log::{self, log};
use crate::ops::Ops;
use crate::request::{Cancel, Outbox, Reply};

/// Encoded frames queued per connection before producers wait for the writer.
const OUTBOX_FRAMES: usize = 64;
/// Stop adding queued frames to one write beyond this many bytes.
const MAX_BATCH: usize = 256 << 10;
/// Consecutive accept failures after which the listener is re-created.
const REBIND_AFTER: u32 = 5;

/// State shared by all connections.
pub struct Agent {
    started: Instant,
    /// Called after ShutdownOk went out; in the guest it reboots the VM.
    on_shutdown: Box<dyn Fn() + Send + Sync>,
    /// The operations; `None` answers them Unsupported (protocol tests).
    ops: Option<Arc<Ops>>,
}

impl Agent {
    pub fn new(on_shutdown: Box<dyn Fn() + Send + Sync>) -> Agent {
        Agent {
            started: Instant::now(),
            on_shutdown,
            ops: None,
        }
    }

    pub fn with_ops(mut self, ops: Arc<Ops>) -> Agent {
        self.ops = Some(ops);
        self
    }

    fn pong(&self) -> Pong {
        Pong {
            agent_version: VERSION.to_string(),
            uptime_ms: self.started.elapsed().as_millis() as u64,
        }
    }
}

/// Listens on the vsock port; never returns. Only failures involve timers (a
/// backoff); an idle listener sleeps in epoll with no timeout.
pub async fn listen(agent: Arc<Agent>, port: u32) {
    let mut backoff = Backoff::default();
    loop {
        let listener = match VsockListener::bind(VsockAddr::new(VMADDR_CID_ANY, port)) {
            Ok(listener) => listener,
            Err(e) => {
                log!("cannot listen on vsock port {port}: {e}");
                backoff.sleep().await;
                continue;
            }
        };
        log::line(format_args!(
            "airlock-agent {VERSION} {READY_MARKER} {port}"
        ));
        let mut failures = 0;
        while failures < REBIND_AFTER {
            match std::future::poll_fn(|cx| listener.poll_accept_std(cx)).await {
                Ok((stream, addr)) => {
                    failures = 0;
                    backoff.reset();
                    tokio::spawn(serve_vsock(agent.clone(), OwnedFd::from(stream), addr));
                }
                // The peer gave up before we accepted: nothing wrong with us.
                Err(e) if matches!(e.raw_os_error(), Some(libc::ECONNABORTED | libc::EPROTO)) => {}
                Err(e) => {
                    failures += 1;
                    log!("accept on vsock port {port}: {e}");
                    backoff.sleep().await;
                }
            }
        }
        log!("re-creating the vsock listener");
    }
}

async fn serve_vsock(agent: Arc<Agent>, fd: OwnedFd, addr: VsockAddr) {
    let peer = format!("cid {} port {}", addr.cid(), addr.port());
    // Only the host speaks for the host: a loopback connection from inside
    // the guest (user code) is dropped unheard.
    if addr.cid() != VMADDR_CID_HOST {
        log!("refused a connection from {peer}: not the host");
        return;
    }
    match Conn::new(fd) {
        Ok(conn) => serve_connection(agent, conn.clone(), conn, &peer).await,
        Err(e) => log!("connection from {peer}: {e}"),
    }
}

/// Speaks the protocol on one connection until it closes. Never panics on
/// peer input: bad frames end this connection (with an error frame and a
/// console line), nothing else.
pub async fn serve_connection<R, W>(agent: Arc<Agent>, reader: R, writer: W, peer: &str)
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let (tx, rx) = mpsc::channel(OUTBOX_FRAMES);
    let writer = tokio::spawn(write_loop(writer, rx));
    let outbox = Outbox(tx);
    let running = Running::default();
    let end = read_loop(&agent, FrameReader::new(reader), &outbox, &running).await;
    // Requests still running are cancelled (their senders drop); they
    // finish on their own and their last frames go nowhere.
    running.cancel_all();
    // Let the last frames (an error, ShutdownOk) go out before acting on it.
    drop(outbox);
    let _ = writer.await;
    match end {
        End::Closed => {}
        End::Failed(reason) => log!("connection from {peer} closed: {reason}"),
        End::Shutdown => (agent.on_shutdown)(),
    }
}

#[derive(Debug)]
enum End {
    Closed,
    Failed(String),
    Shutdown,
}

/// The requests running on one connection, by id, with their cancel signal.
#[derive(Clone, Default)]
struct Running(Arc<Mutex<HashMap<u64, oneshot::Sender<()>>>>);

impl Running {
    /// Registers `id`; false if a request with that id is still running.
    fn insert(&self, id: u64) -> Option<oneshot::Receiver<()>> {
        let mut map = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        if map.contains_key(&id) {
            return None;
        }
        let (tx, rx) = oneshot::channel();
        map.insert(id, tx);
        Some(rx)
    }

    fn finish(&self, id: u64) {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&id);
    }

    fn cancel(&self, id: u64) {
        let tx = self
            .0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&id);
        if let Some(tx) = tx {
            let _ = tx.send(());
        }
    }

    fn cancel_all(&self) {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clear();
    }
}

async fn read_loop<R: AsyncRead + Unpin>(
    agent: &Arc<Agent>,
    mut frames: FrameReader<R>,
    out: &Outbox,
    running: &Running,
) -> End {
    let mut greeted = false;
    loop {
        let frame = match frames.read_frame().await {
            Ok(Some(frame)) => frame,
            Ok(None) => return End::Closed,
            Err(FrameError::UnknownKind { kind, request_id }) => {
                // Well delimited, so the stream is still in sync.
                let msg = format!("unsupported message kind {kind:#04x}");
                if !out
                    .send(request_id, Message::error(ErrorCode::Unsupported, msg))
                    .await
                {
                    return End::Closed;
                }
                continue;
            }
            Err(FrameError::Io(e)) => return End::Failed(format!("read error: {e}")),
            Err(e) => {
                out.send(0, Message::error(ErrorCode::Protocol, e.to_string()))
                    .await;
                return End::Failed(e.to_string());
            }
        };
        let id = frame.request_id;
        if !greeted {
            let (reply, failure) = match frame.message {
                Message::Hello(h) if h.protocol_version == PROTOCOL_VERSION => (
                    Message::HelloOk(HelloOk {
                        agent_version: VERSION.to_string(),
                        protocol_version: PROTOCOL_VERSION,
                    }),
                    None,
                ),
                Message::Hello(h) => {
                    let msg = format!(
                        "host speaks protocol {}, agent {VERSION} speaks {PROTOCOL_VERSION}",
                        h.protocol_version
                    );
                    (Message::error(ErrorCode::VersionMismatch, &msg), Some(msg))
                }
                other => {
                    let msg = format!("expected Hello, got {:?}", other.kind());
                    (Message::error(ErrorCode::Protocol, &msg), Some(msg))
                }
            };
            let sent = out.send(id, reply).await;
            if let Some(msg) = failure {
                return End::Failed(msg);
            }
            if !sent {
                return End::Closed;
            }
            greeted = true;
            continue;
        }
        let reply = match frame.message {
            Message::Ping => Message::Pong(agent.pong()),
            Message::Shutdown => {
                out.send(id, Message::ShutdownOk).await;
                return End::Shutdown;
            }
            // Cancelling a finished or unknown request is a no-op by design
            // (it races with completion).
            Message::Cancel => {
                running.cancel(id);
                continue;
            }
            // Never answer an error with an error.
            Message::Error(_) => continue,
            Message::Hello(_) => Message::error(ErrorCode::Protocol, "duplicate Hello"),
            message @ (Message::Exec(_)
            | Message::RunCode(_)
            | Message::ResetInterpreter(_)
            | Message::WarmStatus(_)
            | Message::Refresh(_)
            | Message::SetLimits(_)
            | Message::WriteFile(_)
            | Message::ReadFile(_)
            | Message::ListFiles(_)
            | Message::RemoveFile(_)
            | Message::StatFile(_)) => {
                let Some(ops) = agent.ops.clone() else {
                    let msg = format!("{:?} is not available here", message.kind());
                    if !out
                        .send(id, Message::error(ErrorCode::Unsupported, msg))
                        .await
                    {
                        return End::Closed;
                    }
                    continue;
                };
                let Some(cancel) = running.insert(id) else {
                    let msg = format!("request id {id} is already in use by a running request");
                    if !out
                        .send(id, Message::error(ErrorCode::BadRequest, msg))
                        .await
                    {
                        return End::Closed;
                    }
                    continue;
                };
                let reply = Reply {
                    id,
                    out: out.clone(),
                };
                let running = running.clone();
                let payload = frame.payload;
                tokio::spawn(async move {
                    // A panic still gets an answer. In this same task (not a
                    // task of its own), so that the final frame is usually
                    // queued before the writer runs: one write for the last
                    // output and the result.
                    let work = ops.handle(message, payload, &reply, Cancel::new(cancel));
                    let (message, payload) =
                        CatchUnwind(Box::pin(work)).await.unwrap_or_else(|()| {
                            log!("request {id} panicked");
                            let msg = "the agent failed while handling this request";
                            (Message::error(ErrorCode::Internal, msg), Vec::new())
                        });
                    running.finish(id);
                    reply.event(message, payload).await;
                });
                continue;
            }
            other @ (Message::HelloOk(_)
            | Message::Pong(_)
            | Message::ShutdownOk
            | Message::Done
            | Message::Output(_)
            | Message::Image(_)
            | Message::ExecResult(_)
            | Message::RunCodeResult(_)
            | Message::WarmStatusReply(_)
            | Message::RefreshReply(_)
            | Message::Limits(_)
            | Message::FileData(_)
            | Message::FileList(_)
            | Message::FileStat(_)) => {
                let msg = format!("{:?} is not a request", other.kind());
                Message::error(ErrorCode::Protocol, msg)
            }
        };
        if !out.send(id, reply).await {
            return End::Closed;
        }
    }
}

async fn write_loop<W: AsyncWrite + Unpin>(mut writer: W, mut rx: mpsc::Receiver<Vec<u8>>) {
    while let Some(mut batch) = rx.recv().await {
        // Whatever else is queued already goes out in the same write call.
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(more) => batch.extend_from_slice(&more),
                Err(_) => break,
            }
        }
        if writer.write_all(&batch).await.is_err() {
            // The peer went away; the reader sees it too.
            return;
        }
    }
}

/// A future that turns a panic while polling into `Err`.
struct CatchUnwind<F>(std::pin::Pin<Box<F>>);

impl<F: std::future::Future> std::future::Future for CatchUnwind<F> {
    type Output = Result<F::Output, ()>;

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        let inner = self.0.as_mut();
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| inner.poll(cx))) {
            Ok(std::task::Poll::Ready(v)) => std::task::Poll::Ready(Ok(v)),
            Ok(std::task::Poll::Pending) => std::task::Poll::Pending,
            Err(_) => std::task::Poll::Ready(Err(())),
        }
    }
}

/// Exponential backoff for the listener's failure paths only.
#[derive(Default)]
struct Backoff {
    next: Option<Duration>,
}

impl Backoff {
    const FIRST: Duration = Duration::from_millis(50);
    const MAX: Duration = Duration::from_secs(5);

    async fn sleep(&mut self) {
        let delay = self.next.unwrap_or(Self::FIRST);
        self.next = Some((delay * 2).min(Self::MAX));
        tokio::time::sleep(delay).await;
    }

    fn reset(&mut self) {
        self.next = None;
    }
}

/// Reboots the guest (PID 1 only): the VMM treats a guest reboot as a clean exit.
pub fn reboot_guest() {
    if std::process::id() != 1 {
        log!("shutdown requested, but not PID 1: not rebooting");
        return;
    }
    log!("shutdown requested: syncing and rebooting");
    // SAFETY: plain system calls; reboot does not return on success.
    unsafe {
        libc::sync();
        libc::reboot(libc::RB_AUTOBOOT);
    }
    log!("reboot: {}", io::Error::last_os_error());
}

#[cfg(test)]
mod tests;

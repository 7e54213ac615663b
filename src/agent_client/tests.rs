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
fn fake_vmm<F, Fut>(reply: &'static [u8], script: F) -> (tempfile::TempDir, PathBuf, JoinHandle<()>)
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

/// Answers the first RunCode with `output` bytes of stdout in chunks of
/// `chunk`, then (if it gets that far) a result that claims little output.
fn flooding_agent(
    output: usize,
    chunk: usize,
) -> impl FnOnce(Peer) -> std::pin::Pin<Box<dyn Future<Output = ()> + Send>> {
    move |mut peer: Peer| {
        Box::pin(async move {
            peer.accept_hello().await;
            let frame = peer.recv().await.unwrap();
            let id = frame.request_id;
            let mut sent = 0;
            while sent < output {
                let out = Frame::new(
                    id,
                    Message::Output(Output {
                        stream: Stream::Stdout,
                    }),
                )
                .with_payload(vec![b'x'; chunk]);
                if write_frame(&mut peer.write, &out).await.is_err() {
                    return; // the host cut us off
                }
                sent += chunk;
            }
            let mut result = RunCodeResult::default();
            result.process.exit_code = Some(0);
            result.process.stdout = StreamStats {
                total_bytes: 10,
                kept_bytes: 10,
            };
            peer.send(Frame::new(id, Message::RunCodeResult(result)))
                .await;
            let _ = peer.recv().await;
        })
    }
}

fn small_run() -> RunCode {
    RunCode {
        language: Language::Python,
        timeout_ms: Some(5_000),
        output: OutputLimits {
            stdout_max: Some(64 << 10),
            stderr_max: None,
        },
    }
}

#[tokio::test]
async fn output_past_the_cap_is_cut_and_marked_truncated() {
    let (_dir, path, _peer) = fake_vmm(b"OK 5\n", flooding_agent(200 << 10, 10 << 10));
    let client = connect(&path).await.unwrap();
    let out = client
        .start_run_code(small_run(), "flood")
        .await
        .unwrap()
        .finish_run(|_| {})
        .await
        .unwrap();
    assert_eq!(out.stdout.len(), 64 << 10, "the host keeps only the cap");
    let stats = out.result.process.stdout;
    assert_eq!(stats.kept_bytes, 64 << 10);
    assert_eq!(
        stats.total_bytes,
        200 << 10,
        "the agent's claim is corrected"
    );
    assert!(out.stdout_text().truncated);
    assert!(!client.is_closed(), "a small overrun is tolerated");
}

#[tokio::test]
async fn a_guest_that_keeps_sending_is_cut_off() {
    let (_dir, path, peer) = fake_vmm(b"OK 5\n", flooding_agent(usize::MAX, 1 << 20));
    let client = connect(&path).await.unwrap();
    let err = client
        .start_run_code(small_run(), "flood")
        .await
        .unwrap()
        .finish_run(|_| {})
        .await
        .unwrap_err();
    assert!(matches!(err, AgentError::Flood(_)), "{err}");
    assert!(
        err.to_string().contains("where 65536 were allowed"),
        "{err}"
    );
    assert!(client.is_closed());
    drop(client);
    tokio::time::timeout(LIMIT, peer)
        .await
        .expect("the flooder sees the close")
        .unwrap();
}

#[tokio::test]
async fn tiny_frames_past_the_frame_budget_are_cut_off() {
    let (_dir, path, _peer) = fake_vmm(b"OK 5\n", |mut peer: Peer| async move {
        peer.accept_hello().await;
        let frame = peer.recv().await.unwrap();
        loop {
            // Empty output frames carry no bytes but still cost the host.
            let out = Frame::new(
                frame.request_id,
                Message::Output(Output {
                    stream: Stream::Stderr,
                }),
            );
            if write_frame(&mut peer.write, &out).await.is_err() {
                return;
            }
        }
    });
    let client = connect(&path).await.unwrap();
    let err = client
        .start_run_code(small_run(), "flood")
        .await
        .unwrap()
        .finish_run(|_| {})
        .await
        .unwrap_err();
    assert!(err.to_string().contains("frames for one call"), "{err}");
}

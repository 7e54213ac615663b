//! The protocol loop against an in-process client over a duplex pipe.

use std::sync::atomic::{AtomicUsize, Ordering};

use airlock_protocol::{Frame, Hello, Kind, StatFile, write_frame};
use tokio::io::{DuplexStream, ReadHalf, WriteHalf};
use tokio::task::JoinHandle;
use tokio::time::timeout;

use super::*;

const LIMIT: Duration = Duration::from_secs(10);

struct Client {
    frames: FrameReader<ReadHalf<DuplexStream>>,
    writer: WriteHalf<DuplexStream>,
    server: JoinHandle<()>,
}

fn agent() -> (Arc<Agent>, Arc<AtomicUsize>) {
    let shutdowns = Arc::new(AtomicUsize::new(0));
    let counter = shutdowns.clone();
    let agent = Agent::new(Box::new(move || {
        counter.fetch_add(1, Ordering::SeqCst);
    }));
    (Arc::new(agent), shutdowns)
}

fn connect(agent: &Arc<Agent>) -> Client {
    let (ours, theirs) = tokio::io::duplex(1 << 16);
    let (server_read, server_write) = tokio::io::split(theirs);
    let server = tokio::spawn(serve_connection(
        agent.clone(),
        server_read,
        server_write,
        "test",
    ));
    let (read, writer) = tokio::io::split(ours);
    Client {
        frames: FrameReader::new(read),
        writer,
        server,
    }
}

impl Client {
    async fn send(&mut self, id: u64, message: Message) {
        write_frame(&mut self.writer, &Frame::new(id, message))
            .await
            .unwrap();
    }

    async fn recv(&mut self) -> Option<Frame> {
        timeout(LIMIT, self.frames.read_frame())
            .await
            .unwrap()
            .unwrap()
    }

    async fn hello(&mut self) {
        self.send(
            0,
            Message::Hello(Hello {
                protocol_version: PROTOCOL_VERSION,
                client: "test".into(),
            }),
        )
        .await;
        let frame = self.recv().await.unwrap();
        assert_eq!(frame.request_id, 0);
        assert_eq!(
            frame.message,
            Message::HelloOk(HelloOk {
                agent_version: VERSION.into(),
                protocol_version: PROTOCOL_VERSION
            })
        );
    }

    /// Expects an error frame, then the connection to close.
    async fn expect_error_and_close(mut self, code: ErrorCode) {
        let frame = self.recv().await.unwrap();
        assert!(
            matches!(&frame.message, Message::Error(e) if e.code == code),
            "{frame:?}"
        );
        assert!(self.recv().await.is_none());
        timeout(LIMIT, self.server).await.unwrap().unwrap();
    }
}

fn error_code(frame: &Frame) -> Option<ErrorCode> {
    match &frame.message {
        Message::Error(e) => Some(e.code),
        _ => None,
    }
}

#[tokio::test]
async fn handshake_then_ping() {
    let (agent, _) = agent();
    let mut c = connect(&agent);
    c.hello().await;
    c.send(5, Message::Ping).await;
    let frame = c.recv().await.unwrap();
    assert_eq!(frame.request_id, 5);
    let Message::Pong(pong) = frame.message else {
        panic!("{frame:?}")
    };
    assert_eq!(pong.agent_version, VERSION);
    assert!(pong.uptime_ms < 60_000);
    c.writer.shutdown().await.unwrap();
    assert!(c.recv().await.is_none());
    timeout(LIMIT, c.server).await.unwrap().unwrap();
}

#[tokio::test]
async fn pipelined_requests_answered_in_order() {
    let (agent, _) = agent();
    let mut c = connect(&agent);
    c.hello().await;
    let mut batch = Vec::new();
    for id in 1..=20 {
        Frame::new(id, Message::Ping)
            .encode_into(&mut batch)
            .unwrap();
    }
    c.writer.write_all(&batch).await.unwrap();
    for id in 1..=20 {
        let frame = c.recv().await.unwrap();
        assert_eq!(frame.request_id, id);
        assert_eq!(frame.message.kind(), Kind::Pong);
    }
}

#[tokio::test]
async fn version_mismatch_is_refused() {
    let (agent, _) = agent();
    let mut c = connect(&agent);
    c.send(
        0,
        Message::Hello(Hello {
            protocol_version: PROTOCOL_VERSION + 1,
            client: String::new(),
        }),
    )
    .await;
    c.expect_error_and_close(ErrorCode::VersionMismatch).await;
}

#[tokio::test]
async fn request_before_hello_is_refused() {
    let (agent, _) = agent();
    let mut c = connect(&agent);
    c.send(1, Message::Ping).await;
    c.expect_error_and_close(ErrorCode::Protocol).await;
}

#[tokio::test]
async fn garbage_closes_only_that_connection() {
    let (agent, _) = agent();
    let mut bad = connect(&agent);
    let mut good = connect(&agent);
    bad.hello().await;
    good.hello().await;
    bad.writer
        .write_all(b"GET / HTTP/1.1\r\n\r\n")
        .await
        .unwrap();
    bad.expect_error_and_close(ErrorCode::Protocol).await;
    // The other connection, and new ones, are unaffected.
    good.send(1, Message::Ping).await;
    assert_eq!(good.recv().await.unwrap().message.kind(), Kind::Pong);
    let mut again = connect(&agent);
    again.hello().await;
}

#[tokio::test]
async fn malformed_header_closes_connection() {
    let (agent, _) = agent();
    let mut c = connect(&agent);
    c.hello().await;
    let mut bytes = Frame::new(3, Message::Ping).encode().unwrap();
    // Declare a 2-byte header that is not JSON.
    bytes[13..17].copy_from_slice(&2u32.to_le_bytes());
    bytes.extend_from_slice(b"}{");
    let len = (bytes.len() - 4) as u32;
    bytes[..4].copy_from_slice(&len.to_le_bytes());
    c.writer.write_all(&bytes).await.unwrap();
    c.expect_error_and_close(ErrorCode::Protocol).await;
}

#[tokio::test]
async fn unknown_kind_is_answered_and_connection_survives() {
    let (agent, _) = agent();
    let mut c = connect(&agent);
    c.hello().await;
    let mut bytes = Frame::new(9, Message::Ping).encode().unwrap();
    bytes[4] = 0xEE;
    c.writer.write_all(&bytes).await.unwrap();
    let frame = c.recv().await.unwrap();
    assert_eq!(
        (frame.request_id, error_code(&frame)),
        (9, Some(ErrorCode::Unsupported))
    );
    c.send(10, Message::Ping).await;
    assert_eq!(c.recv().await.unwrap().message.kind(), Kind::Pong);
}

#[tokio::test]
async fn agent_to_host_messages_are_rejected_but_tolerated() {
    let (agent, _) = agent();
    let mut c = connect(&agent);
    c.hello().await;
    c.send(2, Message::ShutdownOk).await;
    let frame = c.recv().await.unwrap();
    assert_eq!(
        (frame.request_id, error_code(&frame)),
        (2, Some(ErrorCode::Protocol))
    );
    // Errors and cancels get no reply; the next answer is the Pong.
    c.send(3, Message::error(ErrorCode::Internal, "x")).await;
    c.send(4, Message::Cancel).await;
    c.send(5, Message::Ping).await;
    let frame = c.recv().await.unwrap();
    assert_eq!((frame.request_id, frame.message.kind()), (5, Kind::Pong));
}

#[tokio::test]
async fn shutdown_acks_then_calls_the_hook() {
    let (agent, shutdowns) = agent();
    let mut c = connect(&agent);
    c.hello().await;
    c.send(7, Message::Shutdown).await;
    let frame = c.recv().await.unwrap();
    assert_eq!((frame.request_id, frame.message), (7, Message::ShutdownOk));
    timeout(LIMIT, c.server).await.unwrap().unwrap();
    assert_eq!(shutdowns.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn eof_mid_frame_ends_the_connection() {
    let (agent, _) = agent();
    let mut c = connect(&agent);
    c.hello().await;
    let bytes = Frame::new(1, Message::Ping).encode().unwrap();
    c.writer.write_all(&bytes[..6]).await.unwrap();
    c.writer.shutdown().await.unwrap();
    timeout(LIMIT, c.server).await.unwrap().unwrap();
}

#[tokio::test]
async fn random_input_never_panics_the_server() {
    let (agent, shutdowns) = agent();
    let mut state = 0x1234_5678_9ABC_DEF1u64;
    let mut rand = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    for round in 0..300 {
        let (ours, theirs) = tokio::io::duplex(1 << 16);
        let (sr, sw) = tokio::io::split(theirs);
        let server = tokio::spawn(serve_connection(agent.clone(), sr, sw, "fuzz"));
        let (mut read, mut write) = tokio::io::split(ours);
        // Half the rounds get past the handshake first.
        let mut bytes = Vec::new();
        if round % 2 == 0 {
            let hello = Hello {
                protocol_version: PROTOCOL_VERSION,
                client: String::new(),
            };
            Frame::new(0, Message::Hello(hello))
                .encode_into(&mut bytes)
                .unwrap();
        }
        let n = (rand() % 300) as usize;
        bytes.extend((0..n).map(|_| rand() as u8));
        // Keep reading so the server never blocks on a full pipe.
        let drain = tokio::spawn(async move {
            let mut sink = Vec::new();
            let _ = tokio::io::AsyncReadExt::read_to_end(&mut read, &mut sink).await;
        });
        let _ = write.write_all(&bytes).await;
        // (Dropping a split half would not close the pipe.)
        let _ = write.shutdown().await;
        timeout(LIMIT, server).await.unwrap().unwrap();
        drain.await.unwrap();
    }
    // Random bytes never spelled a whole valid Shutdown frame.
    assert_eq!(shutdowns.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn operations_without_ops_are_unsupported_and_the_connection_lives() {
    let (agent, _) = agent();
    let mut c = connect(&agent);
    c.hello().await;
    c.send(3, Message::StatFile(StatFile { path: "/".into() }))
        .await;
    let frame = c.recv().await.unwrap();
    assert_eq!(
        (frame.request_id, error_code(&frame)),
        (3, Some(ErrorCode::Unsupported))
    );
    // Results sent to the agent are refused like other agent messages.
    c.send(4, Message::Done).await;
    let frame = c.recv().await.unwrap();
    assert_eq!(
        (frame.request_id, error_code(&frame)),
        (4, Some(ErrorCode::Protocol))
    );
    c.send(5, Message::Ping).await;
    assert_eq!(c.recv().await.unwrap().message.kind(), Kind::Pong);
}

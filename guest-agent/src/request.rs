//! What a running request holds: a way to send its frames, a cancel signal,
//! and the output limits of its streams.

use airlock_protocol::{
    DEFAULT_OUTPUT_LIMIT, ErrorCode, Frame, MAX_OUTPUT_LIMIT, Message, Output, OutputLimits,
    Stream, StreamStats,
};
use tokio::sync::{mpsc, oneshot};

use crate::log::log;

/// The queue to a connection's writer task.
#[derive(Clone)]
pub struct Outbox(pub mpsc::Sender<Vec<u8>>);

impl Outbox {
    /// Queues a frame; false once the writer has gone (connection broken).
    pub async fn send_frame(&self, frame: Frame) -> bool {
        let bytes = match frame.encode() {
            Ok(bytes) => bytes,
            Err(e) => {
                log!("cannot encode {:?}: {e}", frame.message.kind());
                let fallback = Message::error(ErrorCode::Internal, "reply too large to encode");
                match Frame::new(frame.request_id, fallback).encode() {
                    Ok(bytes) => bytes,
                    Err(_) => return false,
                }
            }
        };
        self.0.send(bytes).await.is_ok()
    }

    pub async fn send(&self, request_id: u64, message: Message) -> bool {
        self.send_frame(Frame::new(request_id, message)).await
    }
}

/// The frames of one request.
#[derive(Clone)]
pub struct Reply {
    pub id: u64,
    pub out: Outbox,
}

impl Reply {
    pub async fn event(&self, message: Message, payload: Vec<u8>) -> bool {
        self.out
            .send_frame(Frame::new(self.id, message).with_payload(payload))
            .await
    }

    pub async fn output(&self, stream: Stream, bytes: &[u8]) -> bool {
        self.event(Message::Output(Output { stream }), bytes.to_vec())
            .await
    }
}

/// Fires when the client cancels the request or its connection closes.
pub struct Cancel {
    rx: Option<oneshot::Receiver<()>>,
}

impl Cancel {
    pub fn new(rx: oneshot::Receiver<()>) -> Cancel {
        Cancel { rx: Some(rx) }
    }

    /// Completes once, when cancelled; pending forever after that.
    pub async fn wait(&mut self) {
        match self.rx.as_mut() {
            // A dropped sender (connection closed) cancels too.
            Some(rx) => {
                let _ = rx.await;
                self.rx = None;
            }
            None => std::future::pending().await,
        }
    }
}

/// Output accounting for one stream of one call: bytes beyond the limit are
/// counted and dropped.
pub struct Capture {
    limit: u64,
    pub stats: StreamStats,
}

impl Capture {
    pub fn new(limit: u64) -> Capture {
        Capture {
            limit,
            stats: StreamStats::default(),
        }
    }

    /// The part of `chunk` to forward.
    pub fn take<'a>(&mut self, chunk: &'a [u8]) -> &'a [u8] {
        let room = self.limit.saturating_sub(self.stats.kept_bytes);
        let keep = (chunk.len() as u64).min(room) as usize;
        self.stats.total_bytes += chunk.len() as u64;
        self.stats.kept_bytes += keep as u64;
        &chunk[..keep]
    }
}

/// The per-stream limits of a request, checked against the hard maximum.
pub fn output_limits(limits: &OutputLimits) -> Result<(u64, u64), String> {
    let check = |name: &str, v: Option<u64>| match v {
        None => Ok(DEFAULT_OUTPUT_LIMIT),
        Some(v) if v <= MAX_OUTPUT_LIMIT => Ok(v),
        Some(v) => Err(format!(
            "{name} limit {v} exceeds the maximum of {MAX_OUTPUT_LIMIT} bytes"
        )),
    };
    Ok((
        check("stdout", limits.stdout_max)?,
        check("stderr", limits.stderr_max)?,
    ))
}

/// A request's timeout, checked against the hard maximum.
pub fn timeout(ms: Option<u64>) -> Result<std::time::Duration, String> {
    use airlock_protocol::{DEFAULT_TIMEOUT_MS, MAX_TIMEOUT_MS};
    match ms {
        None => Ok(std::time::Duration::from_millis(DEFAULT_TIMEOUT_MS)),
        Some(0) => Err("timeout must be positive".into()),
        Some(ms) if ms <= MAX_TIMEOUT_MS => Ok(std::time::Duration::from_millis(ms)),
        Some(ms) => Err(format!(
            "timeout {ms} ms exceeds the maximum of {MAX_TIMEOUT_MS} ms"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capture_keeps_up_to_the_limit_and_counts_the_rest() {
        let mut c = Capture::new(5);
        assert_eq!(c.take(b"abc"), b"abc");
        assert_eq!(c.take(b"defg"), b"de");
        assert_eq!(c.take(b"hij"), b"");
        assert_eq!(c.stats.total_bytes, 10);
        assert_eq!(c.stats.kept_bytes, 5);
        assert!(c.stats.truncated());
        let mut zero = Capture::new(0);
        assert_eq!(zero.take(b"x"), b"");
        assert!(zero.stats.truncated());
    }

    #[test]
    fn limits_and_timeouts_are_bounded() {
        assert_eq!(
            output_limits(&OutputLimits::default()).unwrap(),
            (DEFAULT_OUTPUT_LIMIT, DEFAULT_OUTPUT_LIMIT)
        );
        let big = OutputLimits {
            stdout_max: Some(MAX_OUTPUT_LIMIT + 1),
            stderr_max: None,
        };
        assert!(output_limits(&big).unwrap_err().contains("stdout"));
        assert!(timeout(Some(0)).is_err());
        assert!(timeout(Some(u64::MAX)).is_err());
        assert_eq!(timeout(Some(1500)).unwrap().as_millis(), 1500);
    }
}

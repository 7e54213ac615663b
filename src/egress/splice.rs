//! Splices bytes both ways between a guest proxy connection and its upstream
//! once the request head is handled, with the bounds a hostile guest needs:
//! a fixed buffer per direction, an idle timeout, byte metering as bytes move,
//! and an optional per-sandbox [`RateLimiter`] shared by all its connections.
//!
//! Half-close is preserved (an EOF one way shuts down the write half the
//! other way, and the other direction keeps going), so a client that shuts its
//! write side after a request still receives the whole response.

use std::io;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;

/// Byte counters a caller shares with its metering (e.g. one per sandbox
/// behind an `Arc`); updated as bytes are written, so a long download shows
/// progress.
#[derive(Debug, Default)]
pub struct Counters {
    /// Bytes written to upstreams (client to upstream).
    pub to_upstream: AtomicU64,
    /// Bytes written to clients (upstream to client).
    pub from_upstream: AtomicU64,
}

/// Per-connection bounds for [`splice`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpliceLimits {
    /// A connection with no bytes moving in either direction for this long is
    /// closed (zero: at once). Time spent waiting on the rate limiter is not
    /// idle.
    pub idle_timeout: Duration,
    /// Buffer per direction (host memory per connection is ~2x this). Zero is
    /// treated as one byte.
    pub buffer_bytes: usize,
}

/// Which side of the splice an I/O error came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Peer {
    /// The guest's proxy connection.
    Client,
    /// The connection to the origin server.
    Upstream,
}

/// Why a splice ended.
#[derive(Debug)]
pub enum SpliceEnd {
    /// Both directions reached EOF and were passed on.
    Finished,
    /// No byte moved for [`SpliceLimits::idle_timeout`].
    IdleTimeout,
    /// Reading from or writing to `peer` failed; both directions were ended.
    Error { peer: Peer, error: io::Error },
}

/// What one splice moved, and how it ended.
#[derive(Debug)]
pub struct SpliceReport {
    pub to_upstream: u64,
    pub from_upstream: u64,
    pub end: SpliceEnd,
}

/// The smallest burst a [`RateLimiter`] allows, so that one full socket read
/// at a low rate does not stall far longer than its share.
pub const MIN_BURST_BYTES: u64 = 64 * 1024;

const NANOS_PER_SEC: i128 = 1_000_000_000;

/// A token bucket shared by all connections of one sandbox:
/// `bytes_per_second` with a burst of one second's worth (at least
/// [`MIN_BURST_BYTES`]).
///
/// Callers reserve before they wait: the bucket goes into debt and each caller
/// sleeps until its own debt is paid, so waiters are served in arrival order,
/// a request larger than the burst simply waits proportionally, and nothing
/// can deadlock. A caller cancelled while waiting keeps its reservation (the
/// bucket stays conservative). For "unlimited", pass no limiter at all.
#[derive(Debug)]
pub struct RateLimiter {
    /// Bytes per second, at least 1.
    rate: u64,
    /// The burst, in byte-nanoseconds (bytes x 1e9) so refills need no
    /// rounding.
    capacity: i128,
    bucket: Mutex<Bucket>,
}

#[derive(Debug)]
struct Bucket {
    /// Byte-nanoseconds available; negative while callers are waiting.
    tokens: i128,
    last_refill: Instant,
}

impl RateLimiter {
    /// A full bucket. A rate of 0 is treated as 1 byte per second.
    pub fn new(bytes_per_second: u64) -> RateLimiter {
        let rate = bytes_per_second.max(1);
        let capacity = i128::from(rate.max(MIN_BURST_BYTES)) * NANOS_PER_SEC;
        RateLimiter {
            rate,
            capacity,
            bucket: Mutex::new(Bucket {
                tokens: capacity,
                last_refill: Instant::now(),
            }),
        }
    }

    pub fn bytes_per_second(&self) -> u64 {
        self.rate
    }

    /// Waits until `bytes` may pass.
    pub async fn acquire(&self, bytes: usize) {
        if bytes == 0 {
            return;
        }
        let wait = self.reserve(bytes, Instant::now());
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
    }

    /// Takes `bytes` from the bucket and returns how long the caller must wait
    /// for the bucket to be out of debt again.
    fn reserve(&self, bytes: usize, now: Instant) -> Duration {
        // No invariant spans the lock, so a poisoned one is still usable.
        let mut bucket = self.bucket.lock().unwrap_or_else(PoisonError::into_inner);
        let elapsed = now.saturating_duration_since(bucket.last_refill);
        bucket.last_refill = bucket.last_refill.max(now);
        let refill = elapsed.as_nanos().saturating_mul(u128::from(self.rate));
        let refill = i128::try_from(refill).unwrap_or(i128::MAX);
        bucket.tokens = bucket.tokens.saturating_add(refill).min(self.capacity);

        let cost = i128::try_from(bytes)
            .unwrap_or(i128::MAX)
            .saturating_mul(NANOS_PER_SEC);
        bucket.tokens = bucket.tokens.saturating_sub(cost);
        if bucket.tokens >= 0 {
            return Duration::ZERO;
        }
        let nanos = bucket.tokens.unsigned_abs().div_ceil(u128::from(self.rate));
        Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX))
    }
}

/// Copies both ways until both directions are done (EOF each way, each passed
/// on by shutting down the other side's write half), or either side errors
/// (then both directions end), or nothing moves for `limits.idle_timeout`.
///
/// `first_to_upstream` (the leftover from `read_request`) is written upstream
/// first and counted. Both directions are metered by `counters` and throttled
/// by `rate`, one limiter for both, when given. Both streams are dropped (so
/// closed) on return.
pub async fn splice<C, U>(
    client: C,
    upstream: U,
    first_to_upstream: &[u8],
    limits: &SpliceLimits,
    counters: &Counters,
    rate: Option<&RateLimiter>,
) -> SpliceReport
where
    C: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    let (mut client_read, mut client_write) = tokio::io::split(client);
    let (mut upstream_read, mut upstream_write) = tokio::io::split(upstream);
    let activity = Activity::new();
    let to_upstream = AtomicU64::new(0);
    let from_upstream = AtomicU64::new(0);
    let buffer_bytes = limits.buffer_bytes.max(1);

    let end = {
        let up = pump(
            &mut client_read,
            &mut upstream_write,
            first_to_upstream,
            Direction {
                from: Peer::Client,
                to: Peer::Upstream,
                buffer_bytes,
                moved: &to_upstream,
                metered: &counters.to_upstream,
                rate,
                activity: &activity,
            },
        );
        let down = pump(
            &mut upstream_read,
            &mut client_write,
            &[],
            Direction {
                from: Peer::Upstream,
                to: Peer::Client,
                buffer_bytes,
                moved: &from_upstream,
                metered: &counters.from_upstream,
                rate,
                activity: &activity,
            },
        );
        let idle = watchdog(&activity, limits.idle_timeout);
        tokio::pin!(up, down, idle);
        let (mut up_done, mut down_done) = (false, false);
        loop {
            tokio::select! {
                result = &mut up, if !up_done => match result {
                    Ok(()) if down_done => break SpliceEnd::Finished,
                    Ok(()) => up_done = true,
                    Err((peer, error)) => break SpliceEnd::Error { peer, error },
                },
                result = &mut down, if !down_done => match result {
                    Ok(()) if up_done => break SpliceEnd::Finished,
                    Ok(()) => down_done = true,
                    Err((peer, error)) => break SpliceEnd::Error { peer, error },
                },
                () = &mut idle => break SpliceEnd::IdleTimeout,
            }
        }
    };
    let report = SpliceReport {
        to_upstream: to_upstream.load(Ordering::Relaxed),
        from_upstream: from_upstream.load(Ordering::Relaxed),
        end,
    };
    tracing::trace!(
        to_upstream = report.to_upstream,
        from_upstream = report.from_upstream,
        end = ?report.end,
        "splice ended"
    );
    report
}

/// When bytes last moved, shared by both directions so that a silent
/// direction is not idle while the other is busy.
struct Activity {
    start: Instant,
    last_nanos: AtomicU64,
    /// Directions currently waiting on the rate limiter: bytes are queued, so
    /// the connection is not idle.
    throttled: AtomicUsize,
}

impl Activity {
    fn new() -> Activity {
        Activity {
            start: Instant::now(),
            last_nanos: AtomicU64::new(0),
            throttled: AtomicUsize::new(0),
        }
    }

    fn touch(&self) {
        let nanos = u64::try_from(self.start.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.last_nanos.fetch_max(nanos, Ordering::Relaxed);
    }

    fn last(&self) -> Instant {
        self.start + Duration::from_nanos(self.last_nanos.load(Ordering::Relaxed))
    }
}

/// Marks a direction as throttled for its lifetime, cancellation included.
struct Throttled<'a>(&'a Activity);

impl<'a> Throttled<'a> {
    fn new(activity: &'a Activity) -> Self {
        activity.throttled.fetch_add(1, Ordering::Relaxed);
        Throttled(activity)
    }
}

impl Drop for Throttled<'_> {
    fn drop(&mut self) {
        self.0.touch();
        self.0.throttled.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Completes once nothing has moved for `timeout`. Sleeps until the
/// current deadline and re-checks, so it never spins.
async fn watchdog(activity: &Activity, timeout: Duration) {
    loop {
        let Some(deadline) = activity.last().checked_add(timeout) else {
            // A timeout too large to represent never fires.
            return std::future::pending().await;
        };
        tokio::time::sleep_until(deadline).await;
        if activity.throttled.load(Ordering::Relaxed) > 0 {
            activity.touch();
            continue;
        }
        let quiet_until = activity.last().checked_add(timeout);
        if quiet_until.is_some_and(|until| until <= Instant::now()) {
            return;
        }
    }
}

/// Everything one copy direction needs besides its two stream halves.
struct Direction<'a> {
    from: Peer,
    to: Peer,
    buffer_bytes: usize,
    /// This splice's count.
    moved: &'a AtomicU64,
    /// The caller's shared meter.
    metered: &'a AtomicU64,
    rate: Option<&'a RateLimiter>,
    activity: &'a Activity,
}

type PeerError = (Peer, io::Error);

/// Copies `reader` to `writer` until EOF, then shuts down `writer`.
async fn pump<R, W>(
    reader: &mut R,
    writer: &mut W,
    first: &[u8],
    dir: Direction<'_>,
) -> Result<(), PeerError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    if !first.is_empty() {
        forward(writer, first, &dir).await?;
    }
    let mut buf = vec![0u8; dir.buffer_bytes];
    loop {
        let n = reader.read(&mut buf).await.map_err(|e| (dir.from, e))?;
        if n == 0 {
            return match writer.shutdown().await {
                // The peer already closed that way: the EOF is delivered.
                Err(e) if e.kind() != io::ErrorKind::NotConnected => Err((dir.to, e)),
                _ => Ok(()),
            };
        }
        dir.activity.touch();
        forward(writer, &buf[..n], &dir).await?;
    }
}

/// Throttles, then writes `data` in full, metering each partial write so a
/// slow but moving reader is neither idle nor invisible to the counters.
async fn forward<W>(writer: &mut W, data: &[u8], dir: &Direction<'_>) -> Result<(), PeerError>
where
    W: AsyncWrite + Unpin,
{
    if let Some(rate) = dir.rate {
        let _throttled = Throttled::new(dir.activity);
        rate.acquire(data.len()).await;
    }
    let mut written = 0;
    while written < data.len() {
        let n = writer
            .write(&data[written..])
            .await
            .map_err(|e| (dir.to, e))?;
        if n == 0 {
            return Err((dir.to, io::ErrorKind::WriteZero.into()));
        }
        written += n;
        dir.moved.fetch_add(n as u64, Ordering::Relaxed);
        dir.metered.fetch_add(n as u64, Ordering::Relaxed);
        dir.activity.touch();
    }
    // A no-op for sockets; matters for buffered writers.
    writer.flush().await.map_err(|e| (dir.to, e))
}

#[cfg(test)]
mod tests;

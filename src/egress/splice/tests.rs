use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream, duplex};

use super::*;

const KIB: usize = 1024;
const MIB: usize = 1024 * KIB;

const LIMITS: SpliceLimits = SpliceLimits {
    idle_timeout: Duration::from_secs(30),
    buffer_bytes: 16 * KIB,
};

/// Deterministic, non-repeating-looking bytes (xorshift64).
fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed | 1;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 24) as u8
        })
        .collect()
}

/// (test's client end, splice's client end, splice's upstream end, test's
/// upstream end)
fn streams(buffer: usize) -> (DuplexStream, DuplexStream, DuplexStream, DuplexStream) {
    let (client, client_proxy) = duplex(buffer);
    let (upstream_proxy, upstream) = duplex(buffer);
    (client, client_proxy, upstream_proxy, upstream)
}

/// Writes `data`, shuts down the write side, and reads until EOF.
async fn exchange(mut stream: DuplexStream, data: &[u8]) -> Vec<u8> {
    let (mut read, mut write) = tokio::io::split(&mut stream);
    let writing = async {
        write.write_all(data).await.unwrap();
        write.shutdown().await.unwrap();
    };
    let mut received = Vec::new();
    let reading = read.read_to_end(&mut received);
    let ((), read) = tokio::join!(writing, reading);
    read.unwrap();
    received
}

#[test]
fn splice_future_is_send() {
    fn assert_send<T: Send>(_: &T) {}
    let (_client, client_proxy, upstream_proxy, _upstream) = streams(KIB);
    let counters = Counters::default();
    let rate = RateLimiter::new(1);
    let future = splice(
        client_proxy,
        upstream_proxy,
        b"",
        &LIMITS,
        &counters,
        Some(&rate),
    );
    assert_send(&future);
}

#[tokio::test]
async fn both_ways_byte_exact_with_counters() {
    let (client, client_proxy, upstream_proxy, upstream) = streams(8 * KIB);
    let request = pattern(MIB, 1);
    let response = pattern(5 * MIB, 2);
    let counters = Counters::default();
    let (report, at_client, at_upstream) = tokio::join!(
        splice(client_proxy, upstream_proxy, b"", &LIMITS, &counters, None),
        exchange(client, &request),
        exchange(upstream, &response),
    );
    assert!(
        matches!(report.end, SpliceEnd::Finished),
        "{:?}",
        report.end
    );
    assert!(at_upstream == request, "request corrupted");
    assert!(at_client == response, "response corrupted");
    assert_eq!(report.to_upstream, MIB as u64);
    assert_eq!(report.from_upstream, 5 * MIB as u64);
    assert_eq!(counters.to_upstream.load(Ordering::Relaxed), MIB as u64);
    assert_eq!(
        counters.from_upstream.load(Ordering::Relaxed),
        5 * MIB as u64
    );
}

#[tokio::test]
async fn leftover_goes_first_and_is_counted() {
    let (client, client_proxy, upstream_proxy, upstream) = streams(KIB);
    let counters = Counters::default();
    counters.to_upstream.store(100, Ordering::Relaxed);
    let (report, _, at_upstream) = tokio::join!(
        splice(
            client_proxy,
            upstream_proxy,
            b"early ",
            &LIMITS,
            &counters,
            None
        ),
        exchange(client, b"later"),
        exchange(upstream, b""),
    );
    assert!(
        matches!(report.end, SpliceEnd::Finished),
        "{:?}",
        report.end
    );
    assert_eq!(at_upstream, b"early later");
    assert_eq!(report.to_upstream, 11);
    // Shared counters accumulate across connections.
    assert_eq!(counters.to_upstream.load(Ordering::Relaxed), 111);
}

#[tokio::test]
async fn half_close_still_delivers_the_response() {
    let (mut client, client_proxy, upstream_proxy, mut upstream) = streams(4 * KIB);
    let response = pattern(256 * KIB, 3);
    let client_side = async {
        client.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
        client.shutdown().await.unwrap();
        let mut received = Vec::new();
        client.read_to_end(&mut received).await.unwrap();
        received
    };
    let upstream_side = async {
        // Only a forwarded EOF ends this read: the response comes after it.
        let mut request = Vec::new();
        upstream.read_to_end(&mut request).await.unwrap();
        assert_eq!(request, b"GET / HTTP/1.1\r\n\r\n");
        upstream.write_all(&response).await.unwrap();
        upstream.shutdown().await.unwrap();
    };
    let counters = Counters::default();
    let (report, received, ()) = tokio::join!(
        splice(client_proxy, upstream_proxy, b"", &LIMITS, &counters, None),
        client_side,
        upstream_side,
    );
    assert!(
        matches!(report.end, SpliceEnd::Finished),
        "{:?}",
        report.end
    );
    assert!(received == response, "response corrupted");
}

#[tokio::test(start_paused = true)]
async fn idle_timeout_fires_when_nothing_moves() {
    // The test ends stay open and silent.
    let (_client, client_proxy, upstream_proxy, _upstream) = streams(KIB);
    let counters = Counters::default();
    let start = Instant::now();
    let report = splice(client_proxy, upstream_proxy, b"", &LIMITS, &counters, None).await;
    assert!(
        matches!(report.end, SpliceEnd::IdleTimeout),
        "{:?}",
        report.end
    );
    let elapsed = start.elapsed();
    assert!(elapsed >= Duration::from_secs(30), "{elapsed:?}");
    assert!(elapsed < Duration::from_secs(31), "{elapsed:?}");
}

#[tokio::test(start_paused = true)]
async fn idle_counts_from_the_last_byte() {
    let (mut client, client_proxy, upstream_proxy, _upstream) = streams(KIB);
    let counters = Counters::default();
    let start = Instant::now();
    let client_side = async {
        tokio::time::sleep(Duration::from_secs(20)).await;
        client.write_all(b"x").await.unwrap();
        client
    };
    let (report, _client) = tokio::join!(
        splice(client_proxy, upstream_proxy, b"", &LIMITS, &counters, None),
        client_side,
    );
    assert!(
        matches!(report.end, SpliceEnd::IdleTimeout),
        "{:?}",
        report.end
    );
    assert_eq!(report.to_upstream, 1);
    let elapsed = start.elapsed();
    assert!(elapsed >= Duration::from_secs(50), "{elapsed:?}");
    assert!(elapsed < Duration::from_secs(51), "{elapsed:?}");
}

#[tokio::test(start_paused = true)]
async fn slow_direction_keeps_a_silent_one_alive() {
    let (mut client, client_proxy, upstream_proxy, mut upstream) = streams(KIB);
    let counters = Counters::default();
    let start = Instant::now();
    let upstream_side = async {
        // 10 steps of 20 s: each under the 30 s timeout, 200 s in all.
        for _ in 0..10 {
            tokio::time::sleep(Duration::from_secs(20)).await;
            upstream.write_all(b"x").await.unwrap();
        }
        upstream.shutdown().await.unwrap();
        let mut rest = Vec::new();
        upstream.read_to_end(&mut rest).await.unwrap();
        rest
    };
    let client_side = async {
        let mut received = Vec::new();
        client.read_to_end(&mut received).await.unwrap();
        // Silent until the response is complete.
        client.shutdown().await.unwrap();
        received
    };
    let (report, rest, received) = tokio::join!(
        splice(client_proxy, upstream_proxy, b"", &LIMITS, &counters, None),
        upstream_side,
        client_side,
    );
    assert!(
        matches!(report.end, SpliceEnd::Finished),
        "{:?}",
        report.end
    );
    assert_eq!(received, b"xxxxxxxxxx");
    assert!(rest.is_empty());
    assert!(start.elapsed() >= Duration::from_secs(200));
}

#[tokio::test(start_paused = true)]
async fn waiting_on_the_rate_limiter_is_not_idle() {
    let (client, client_proxy, upstream_proxy, upstream) = streams(128 * KIB);
    let response = pattern(80 * KIB, 4);
    // The 64 KiB burst passes at once; the remaining 16 KiB at 256 B/s takes
    // 64 s, over twice the idle timeout.
    let rate = RateLimiter::new(256);
    let counters = Counters::default();
    let limits = SpliceLimits {
        idle_timeout: Duration::from_secs(30),
        buffer_bytes: 64 * KIB,
    };
    let start = Instant::now();
    let (report, received, _) = tokio::join!(
        splice(
            client_proxy,
            upstream_proxy,
            b"",
            &limits,
            &counters,
            Some(&rate)
        ),
        exchange(client, b""),
        exchange(upstream, &response),
    );
    assert!(
        matches!(report.end, SpliceEnd::Finished),
        "{:?}",
        report.end
    );
    assert!(received == response, "response corrupted");
    let elapsed = start.elapsed();
    assert!(elapsed >= Duration::from_secs(64), "{elapsed:?}");
}

#[tokio::test(start_paused = true)]
async fn rate_limits_a_splice() {
    let (client, client_proxy, upstream_proxy, upstream) = streams(64 * KIB);
    let response = pattern(MIB, 5);
    let rate = RateLimiter::new(256 * KIB as u64);
    let counters = Counters::default();
    let start = Instant::now();
    let (report, received, _) = tokio::join!(
        splice(
            client_proxy,
            upstream_proxy,
            b"",
            &LIMITS,
            &counters,
            Some(&rate)
        ),
        exchange(client, b""),
        exchange(upstream, &response),
    );
    assert!(
        matches!(report.end, SpliceEnd::Finished),
        "{:?}",
        report.end
    );
    assert!(received == response, "response corrupted");
    // 256 KiB of burst, then 768 KiB at 256 KiB/s.
    let elapsed = start.elapsed();
    assert!(elapsed >= Duration::from_secs(3), "{elapsed:?}");
    assert!(elapsed < Duration::from_millis(3100), "{elapsed:?}");
}

#[tokio::test(start_paused = true)]
async fn one_limiter_throttles_both_directions() {
    let (client, client_proxy, upstream_proxy, upstream) = streams(64 * KIB);
    let request = pattern(512 * KIB, 6);
    let response = pattern(512 * KIB, 7);
    let rate = RateLimiter::new(256 * KIB as u64);
    let counters = Counters::default();
    let start = Instant::now();
    let (report, at_client, at_upstream) = tokio::join!(
        splice(
            client_proxy,
            upstream_proxy,
            b"",
            &LIMITS,
            &counters,
            Some(&rate)
        ),
        exchange(client, &request),
        exchange(upstream, &response),
    );
    assert!(
        matches!(report.end, SpliceEnd::Finished),
        "{:?}",
        report.end
    );
    assert!(at_client == response && at_upstream == request, "corrupted");
    let elapsed = start.elapsed();
    assert!(elapsed >= Duration::from_secs(3), "{elapsed:?}");
    assert!(elapsed < Duration::from_millis(3100), "{elapsed:?}");
}

#[tokio::test]
async fn write_error_is_attributed_to_its_peer() {
    let (client, client_proxy, upstream_proxy, mut upstream) = streams(KIB);
    drop(client);
    let counters = Counters::default();
    let upstream_side = async {
        upstream.write_all(b"response").await.unwrap();
        upstream
    };
    let (report, _upstream) = tokio::join!(
        splice(client_proxy, upstream_proxy, b"", &LIMITS, &counters, None),
        upstream_side,
    );
    match report.end {
        SpliceEnd::Error { peer, error } => {
            assert_eq!(peer, Peer::Client);
            assert_eq!(error.kind(), io::ErrorKind::BrokenPipe);
        }
        end => panic!("expected an error, got {end:?}"),
    }
    assert_eq!(report.from_upstream, 0);
}

#[tokio::test(start_paused = true)]
async fn limiter_waits_proportionally_beyond_the_burst() {
    let rate = RateLimiter::new(1000);
    let start = Instant::now();
    // The burst is the 64 KiB minimum, not one second's 1000 bytes.
    rate.acquire(MIN_BURST_BYTES as usize).await;
    assert_eq!(start.elapsed(), Duration::ZERO);
    rate.acquire(200_000).await;
    assert_eq!(start.elapsed(), Duration::from_secs(200));
    rate.acquire(0).await;
    assert_eq!(start.elapsed(), Duration::from_secs(200));
}

#[tokio::test(start_paused = true)]
async fn limiter_refills_up_to_the_burst_only() {
    let rate = RateLimiter::new(MIB as u64);
    tokio::time::sleep(Duration::from_secs(3600)).await;
    let start = Instant::now();
    rate.acquire(MIB).await;
    assert_eq!(start.elapsed(), Duration::ZERO);
    rate.acquire(MIB / 2).await;
    assert_eq!(start.elapsed(), Duration::from_millis(500));
}

#[tokio::test(start_paused = true)]
async fn limiter_is_shared_between_callers() {
    let rate = RateLimiter::new(100 * KIB as u64);
    let start = Instant::now();
    let one = async {
        for _ in 0..10 {
            rate.acquire(16 * KIB).await;
        }
    };
    let two = async {
        for _ in 0..10 {
            rate.acquire(16 * KIB).await;
        }
    };
    tokio::join!(one, two);
    // 320 KiB: 100 KiB of burst, 220 KiB at 100 KiB/s.
    let elapsed = start.elapsed();
    assert!(elapsed >= Duration::from_millis(2200), "{elapsed:?}");
    assert!(elapsed < Duration::from_millis(2300), "{elapsed:?}");
}

#[test]
fn limiter_survives_extremes() {
    let rate = RateLimiter::new(0);
    assert_eq!(rate.bytes_per_second(), 1);
    let now = Instant::now();
    let wait = rate.reserve(usize::MAX, now);
    // Saturates at ~584 years rather than overflowing.
    assert_eq!(wait, Duration::from_nanos(u64::MAX));
    // A burst of u64::MAX bytes is exactly used up, then 1 byte costs 1 ns.
    let rate = RateLimiter::new(u64::MAX);
    let later = now + Duration::from_secs(1 << 40);
    assert_eq!(rate.reserve(usize::MAX, later), Duration::ZERO);
    assert_eq!(rate.reserve(1, later), Duration::from_nanos(1));
}

//! New conversations as a server sees them: a sandbox taken from the warm
//! pool, then its first call. (o) one conversation at a time from a ready
//! pool; (p) many beginning at once, with the pool growing with demand.
//! Both against the warm round trip of the same run.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use super::run_python;
use super::stats::{Summary, ms, percentile, summarize};
use crate::sandbox::StartOptions;
use crate::sandbox::pool::WarmPool;
use crate::template::Template;

/// The longest the bench waits for the pool to fill.
const FILL_TIMEOUT: Duration = Duration::from_secs(300);

/// Waits until `pool` has `n` sandboxes ready.
async fn filled(pool: &WarmPool, n: usize) -> Result<()> {
    let deadline = Instant::now() + FILL_TIMEOUT;
    while pool.ready_count().await < n {
        if Instant::now() > deadline {
            bail!("the warm pool did not fill to {n} in {FILL_TIMEOUT:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

/// One conversation: take a sandbox, run its first cell; the time both took.
async fn first_call(pool: &WarmPool) -> Result<Duration> {
    let started = Instant::now();
    let sandbox = pool.take().await?;
    let out = run_python(sandbox.client(), "print(1)").await;
    let took = started.elapsed();
    sandbox.destroy().await;
    if out?.trim() != "1" {
        bail!("a first print(1) printed something else");
    }
    Ok(took)
}

/// (o): `n` conversations one after another, each from a full pool of
/// `size` (the HTTP default: with one still ready, the refill waits a
/// moment rather than restore beside the first call).
pub async fn from_the_pool(
    template: &Template,
    exe: &Path,
    n: usize,
    size: usize,
    warm: &Summary,
) -> Result<()> {
    let pool = WarmPool::start(
        template.clone(),
        exe.to_path_buf(),
        StartOptions::default(),
        size,
        size,
    );
    let mut samples = Vec::new();
    for _ in 0..n.max(1) {
        filled(&pool, size).await?;
        samples.push(first_call(&pool).await?);
    }
    pool.close().await;
    let summary = summarize(&samples).context("no samples")?;
    println!(
        "\n(o) a new conversation's first print(1), its sandbox taken from a warm pool of {size}: {summary}"
    );
    println!(
        "    ratio first call / warm round trip: {:.2}x (goal: at most 1.5x)",
        summary.median.as_secs_f64() / warm.median.as_secs_f64()
    );
    Ok(())
}

/// (p): `n` conversations begin at once; the pool starts at `floor` ready
/// and grows with demand to `ceiling`.
pub async fn at_once(
    template: &Template,
    exe: &Path,
    n: usize,
    floor: usize,
    ceiling: usize,
    warm: &Summary,
) -> Result<()> {
    let pool = WarmPool::start(
        template.clone(),
        exe.to_path_buf(),
        StartOptions::default(),
        floor,
        ceiling,
    );
    filled(&pool, floor).await?;
    let started = Instant::now();
    let tasks: Vec<_> = (0..n.max(1))
        .map(|_| {
            let pool = pool.clone();
            tokio::spawn(async move { first_call(&pool).await })
        })
        .collect();
    let mut samples = Vec::new();
    for task in tasks {
        samples.push(task.await.context("a conversation task panicked")??);
    }
    let wall = started.elapsed();
    let grown_to = pool.target();
    pool.close().await;
    let (p50, p95, p99) = (
        percentile(&samples, 0.5),
        percentile(&samples, 0.95),
        percentile(&samples, 0.99),
    );
    let ratio = |d: Duration| d.as_secs_f64() / warm.median.as_secs_f64();
    println!(
        "\n(p) {n} conversations beginning at once (pool of {floor} ready, growing to {ceiling}), each until its first print(1), in {:.1} s",
        wall.as_secs_f64()
    );
    println!(
        "    first call p50 {} ({:.1}x warm), p95 {} ({:.1}x), p99 {} ({:.1}x); the pool now aims at {grown_to} ready",
        ms(p50),
        ratio(p50),
        ms(p95),
        ratio(p95),
        ms(p99),
        ratio(p99)
    );
    Ok(())
}

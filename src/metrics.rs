//! Prometheus metrics of the gateway, in the text exposition format (no
//! extra crate: a few counters, gauges and one histogram family).
//!
//! The registry and the tool layer record into one [`Metrics`]; the HTTP
//! server renders it at `/metrics`, adding the gauges that are read live
//! (active sandboxes, pool size, usage of the sandboxes still alive).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Upper bounds of the tool latency histogram, in seconds.
const LATENCY_BUCKETS: [f64; 14] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
];

/// How a tool call ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Outcome {
    /// The tool did its work (code that raised an exception is still `Ok`).
    Ok,
    /// A tool error (isError): a bad argument, an expired sandbox, a limit.
    ToolError,
}

impl Outcome {
    fn label(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::ToolError => "error",
        }
    }
}

#[derive(Default)]
struct Histogram {
    buckets: [u64; LATENCY_BUCKETS.len()],
    count: u64,
    sum: f64,
}

impl Histogram {
    fn observe(&mut self, seconds: f64) {
        for (bound, bucket) in LATENCY_BUCKETS.iter().zip(self.buckets.iter_mut()) {
            if seconds <= *bound {
                *bucket += 1;
            }
        }
        self.count += 1;
        self.sum += seconds;
    }
}

/// Why a sandbox ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum EndReason {
    /// Idle longer than the idle timeout.
    Idle,
    /// Older than the maximum lifetime.
    Lifetime,
    /// Its conversation ended (session closed, reset, shutdown).
    Closed,
    /// Running when the server stopped without saving it, and never saved.
    Lost,
}

impl EndReason {
    pub fn label(self) -> &'static str {
        match self {
            EndReason::Idle => "idle_timeout",
            EndReason::Lifetime => "max_lifetime",
            EndReason::Closed => "closed",
            EndReason::Lost => "lost",
        }
    }
}

/// Counters of usage, in micro-units so they fit atomics.
#[derive(Default)]
struct Usage {
    vcpu_micros: AtomicU64,
    memory_mib_micros: AtomicU64,
    runs: AtomicU64,
}

/// Everything `/metrics` shows that is not read live.
#[derive(Default)]
pub struct Metrics {
    tools: Mutex<BTreeMap<(&'static str, Outcome), u64>>,
    latency: Mutex<BTreeMap<&'static str, Histogram>>,
    restores: AtomicU64,
    restore_failures: AtomicU64,
    refused: Mutex<BTreeMap<&'static str, u64>>,
    http_refused: Mutex<BTreeMap<&'static str, u64>>,
    ended: Mutex<BTreeMap<EndReason, u64>>,
    /// Usage of sandboxes that have ended; live ones are added at render time.
    finished: Usage,
    pausing: Pausing,
}

/// Pauses to disk and resumes.
#[derive(Default)]
struct Pausing {
    pauses: AtomicU64,
    pause_micros: AtomicU64,
    pause_failures: AtomicU64,
    resumes: AtomicU64,
    resume_micros: AtomicU64,
    resume_failures: AtomicU64,
    /// Bytes written to disk by pauses.
    bytes_written: AtomicU64,
    checkpoints: AtomicU64,
    checkpoint_micros: AtomicU64,
    checkpoint_bytes: AtomicU64,
    rollbacks: AtomicU64,
    rollback_micros: AtomicU64,
    forks: AtomicU64,
    fork_micros: AtomicU64,
}

/// Values read at render time.
#[derive(Debug, Clone, Default)]
pub struct Live {
    pub active_sandboxes: u64,
    pub pool_ready: u64,
    pub vcpu_seconds: f64,
    pub memory_gb_seconds: f64,
    pub runs: u64,
    /// Snapshot metering by principal.
    pub snapshots: Vec<(String, crate::sandbox::registry::SnapshotUsage)>,
}

/// A principal's name as a Prometheus label value.
pub fn label_value(text: &str) -> String {
    text.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Metrics {
    pub fn new() -> Metrics {
        Metrics::default()
    }

    /// One tool call, its outcome and how long it took.
    pub fn tool_call(&self, tool: &'static str, outcome: Outcome, elapsed: Duration) {
        *lock(&self.tools).entry((tool, outcome)).or_default() += 1;
        lock(&self.latency)
            .entry(tool)
            .or_default()
            .observe(elapsed.as_secs_f64());
    }

    /// A sandbox was handed to a conversation (from the warm pool or restored on demand).
    pub fn restore(&self) {
        self.restores.fetch_add(1, Ordering::Relaxed);
    }

    pub fn restore_failed(&self) {
        self.restore_failures.fetch_add(1, Ordering::Relaxed);
    }

    /// A sandbox was paused to disk, its state taking `bytes`.
    pub fn paused(&self, took: Duration, bytes: u64) {
        let p = &self.pausing;
        p.pauses.fetch_add(1, Ordering::Relaxed);
        p.pause_micros
            .fetch_add(took.as_micros() as u64, Ordering::Relaxed);
        p.bytes_written.fetch_add(bytes, Ordering::Relaxed);
    }

    pub fn pause_failed(&self) {
        self.pausing.pause_failures.fetch_add(1, Ordering::Relaxed);
    }

    pub fn resumed(&self, took: Duration) {
        let p = &self.pausing;
        p.resumes.fetch_add(1, Ordering::Relaxed);
        p.resume_micros
            .fetch_add(took.as_micros() as u64, Ordering::Relaxed);
    }

    pub fn resume_failed(&self) {
        self.pausing.resume_failures.fetch_add(1, Ordering::Relaxed);
    }

    /// A checkpoint was taken (saved, and the sandbox resumed from it).
    pub fn checkpointed(&self, took: Duration, bytes: u64) {
        let p = &self.pausing;
        p.checkpoints.fetch_add(1, Ordering::Relaxed);
        p.checkpoint_micros
            .fetch_add(took.as_micros() as u64, Ordering::Relaxed);
        p.checkpoint_bytes.fetch_add(bytes, Ordering::Relaxed);
    }

    pub fn rolled_back(&self, took: Duration) {
        let p = &self.pausing;
        p.rollbacks.fetch_add(1, Ordering::Relaxed);
        p.rollback_micros
            .fetch_add(took.as_micros() as u64, Ordering::Relaxed);
    }

    pub fn forked(&self, took: Duration) {
        let p = &self.pausing;
        p.forks.fetch_add(1, Ordering::Relaxed);
        p.fork_micros
            .fetch_add(took.as_micros() as u64, Ordering::Relaxed);
    }

    /// A request for a sandbox was refused (`reason`: a short label such as `global_limit`).
    pub fn refused(&self, reason: &'static str) {
        *lock(&self.refused).entry(reason).or_default() += 1;
    }

    /// An HTTP request was refused or cut short (`reason`: `http_requests`,
    /// `http_principal_requests`, `http_body_bytes`, `http_sessions`, `http_timeout`).
    pub fn http_refused(&self, reason: &'static str) {
        *lock(&self.http_refused).entry(reason).or_default() += 1;
    }

    /// A sandbox ended, with the usage it had accumulated.
    pub fn ended(&self, reason: EndReason, vcpu_seconds: f64, memory_gb_seconds: f64, runs: u64) {
        *lock(&self.ended).entry(reason).or_default() += 1;
        self.finished
            .vcpu_micros
            .fetch_add((vcpu_seconds * 1e6) as u64, Ordering::Relaxed);
        self.finished
            .memory_mib_micros
            .fetch_add((memory_gb_seconds * 1024.0 * 1e6) as u64, Ordering::Relaxed);
        self.finished.runs.fetch_add(runs, Ordering::Relaxed);
    }

    pub fn restores(&self) -> u64 {
        self.restores.load(Ordering::Relaxed)
    }

    /// The text exposition format, version 0.0.4.
    pub fn render(&self, live: Live) -> String {
        let mut out = String::new();
        let o = &mut out;
        let n = header(
            o,
            "airlock_active_sandboxes",
            "gauge",
            "Sandboxes bound to a conversation right now.",
        );
        let _ = writeln!(o, "{n} {}", live.active_sandboxes);
        let n = header(
            o,
            "airlock_pool_ready_sandboxes",
            "gauge",
            "Restored, idle sandboxes waiting in the warm pool.",
        );
        let _ = writeln!(o, "{n} {}", live.pool_ready);
        let n = header(
            o,
            "airlock_sandbox_restores_total",
            "counter",
            "Sandboxes handed to a conversation.",
        );
        let _ = writeln!(o, "{n} {}", self.restores.load(Ordering::Relaxed));
        let n = header(
            o,
            "airlock_sandbox_restore_failures_total",
            "counter",
            "Sandboxes that could not be restored for a conversation.",
        );
        let _ = writeln!(o, "{n} {}", self.restore_failures.load(Ordering::Relaxed));
        let p = &self.pausing;
        let seconds = |micros: &AtomicU64| micros.load(Ordering::Relaxed) as f64 / 1e6;
        for (name, help, value) in [
            (
                "airlock_sandbox_pauses_total",
                "Sandboxes paused to disk.",
                p.pauses.load(Ordering::Relaxed) as f64,
            ),
            (
                "airlock_sandbox_pause_seconds_total",
                "Time spent pausing sandboxes.",
                seconds(&p.pause_micros),
            ),
            (
                "airlock_sandbox_pause_failures_total",
                "Pauses that failed (the error is logged).",
                p.pause_failures.load(Ordering::Relaxed) as f64,
            ),
            (
                "airlock_sandbox_pause_bytes_total",
                "Bytes of saved state written by pauses.",
                p.bytes_written.load(Ordering::Relaxed) as f64,
            ),
            (
                "airlock_sandbox_resumes_total",
                "Paused sandboxes resumed.",
                p.resumes.load(Ordering::Relaxed) as f64,
            ),
            (
                "airlock_sandbox_resume_seconds_total",
                "Time spent resuming sandboxes.",
                seconds(&p.resume_micros),
            ),
            (
                "airlock_sandbox_resume_failures_total",
                "Resumes that failed.",
                p.resume_failures.load(Ordering::Relaxed) as f64,
            ),
            (
                "airlock_checkpoints_total",
                "Checkpoints taken.",
                p.checkpoints.load(Ordering::Relaxed) as f64,
            ),
            (
                "airlock_checkpoint_seconds_total",
                "Time spent taking checkpoints (save and resume).",
                seconds(&p.checkpoint_micros),
            ),
            (
                "airlock_checkpoint_bytes_total",
                "Bytes of saved state written by checkpoints.",
                p.checkpoint_bytes.load(Ordering::Relaxed) as f64,
            ),
            (
                "airlock_rollbacks_total",
                "Sandboxes rolled back to a checkpoint.",
                p.rollbacks.load(Ordering::Relaxed) as f64,
            ),
            (
                "airlock_rollback_seconds_total",
                "Time spent resuming rolled-back sandboxes.",
                seconds(&p.rollback_micros),
            ),
            (
                "airlock_forks_total",
                "Sandboxes forked from a checkpoint.",
                p.forks.load(Ordering::Relaxed) as f64,
            ),
            (
                "airlock_fork_seconds_total",
                "Time spent starting forks.",
                seconds(&p.fork_micros),
            ),
        ] {
            let n = header(o, name, "counter", help);
            let _ = writeln!(o, "{n} {value}");
        }
        for (name, help, value) in [
            (
                "airlock_snapshot_gb_hours_total",
                "Snapshot storage (paused states and checkpoints) in GB-hours, by principal.",
                (|u: &crate::sandbox::registry::SnapshotUsage| u.gb_hours())
                    as fn(&crate::sandbox::registry::SnapshotUsage) -> f64,
            ),
            (
                "airlock_snapshot_writes_total",
                "Snapshots written (pauses and checkpoints), by principal.",
                |u| u.writes as f64,
            ),
            (
                "airlock_snapshot_restores_total",
                "Snapshots read back (resumes, rollbacks, forks), by principal.",
                |u| u.restores as f64,
            ),
        ] {
            let n = header(o, name, "counter", help);
            for (principal, usage) in &live.snapshots {
                let _ = writeln!(
                    o,
                    "{n}{{principal=\"{}\"}} {}",
                    label_value(principal),
                    value(usage)
                );
            }
        }
        let n = header(
            o,
            "airlock_snapshot_stored_bytes",
            "gauge",
            "Bytes of paused states and checkpoints on disk now, by principal.",
        );
        for (principal, usage) in &live.snapshots {
            let _ = writeln!(
                o,
                "{n}{{principal=\"{}\"}} {}",
                label_value(principal),
                usage.stored_bytes
            );
        }
        let n = header(
            o,
            "airlock_sandboxes_ended_total",
            "counter",
            "Sandboxes destroyed, by reason.",
        );
        for (reason, count) in lock(&self.ended).iter() {
            let _ = writeln!(o, "{n}{{reason=\"{}\"}} {count}", reason.label());
        }
        let n = header(
            o,
            "airlock_sandbox_requests_refused_total",
            "counter",
            "Requests for a sandbox refused, by reason.",
        );
        for (reason, count) in lock(&self.refused).iter() {
            let _ = writeln!(o, "{n}{{reason=\"{reason}\"}} {count}");
        }
        let n = header(
            o,
            "airlock_http_requests_refused_total",
            "counter",
            "HTTP requests refused (429, past a limit) or cut at the request timeout, by reason.",
        );
        for (reason, count) in lock(&self.http_refused).iter() {
            let _ = writeln!(o, "{n}{{reason=\"{reason}\"}} {count}");
        }
        let n = header(
            o,
            "airlock_tool_calls_total",
            "counter",
            "Tool calls, by tool and outcome (error: the result had isError set).",
        );
        for ((tool, outcome), count) in lock(&self.tools).iter() {
            let _ = writeln!(
                o,
                "{n}{{tool=\"{tool}\",outcome=\"{}\"}} {count}",
                outcome.label()
            );
        }
        let n = header(
            o,
            "airlock_tool_call_duration_seconds",
            "histogram",
            "Tool call latency, by tool.",
        );
        for (tool, h) in lock(&self.latency).iter() {
            for (bound, count) in LATENCY_BUCKETS.iter().zip(h.buckets.iter()) {
                let _ = writeln!(o, "{n}_bucket{{tool=\"{tool}\",le=\"{bound}\"}} {count}");
            }
            let _ = writeln!(o, "{n}_bucket{{tool=\"{tool}\",le=\"+Inf\"}} {}", h.count);
            let _ = writeln!(o, "{n}_sum{{tool=\"{tool}\"}} {}", h.sum);
            let _ = writeln!(o, "{n}_count{{tool=\"{tool}\"}} {}", h.count);
        }
        let vcpu =
            self.finished.vcpu_micros.load(Ordering::Relaxed) as f64 / 1e6 + live.vcpu_seconds;
        let mem = self.finished.memory_mib_micros.load(Ordering::Relaxed) as f64 / 1e6 / 1024.0
            + live.memory_gb_seconds;
        let runs = self.finished.runs.load(Ordering::Relaxed) + live.runs;
        let n = header(
            o,
            "airlock_vcpu_seconds_total",
            "counter",
            "CPU time used by sandbox VMM processes while bound to a conversation.",
        );
        let _ = writeln!(o, "{n} {vcpu:.6}");
        let n = header(
            o,
            "airlock_memory_gb_seconds_total",
            "counter",
            "Configured guest memory (GB) times the wall time sandboxes were bound to a conversation.",
        );
        let _ = writeln!(o, "{n} {mem:.6}");
        let n = header(
            o,
            "airlock_sandbox_runs_total",
            "counter",
            "run_code and run_command calls executed in sandboxes.",
        );
        let _ = writeln!(o, "{n} {runs}");
        out
    }
}

fn header<'a>(out: &mut String, name: &'a str, kind: &str, help: &str) -> &'a str {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
    name
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_valid_exposition() {
        let m = Metrics::new();
        m.tool_call("run_code", Outcome::Ok, Duration::from_millis(30));
        m.tool_call("run_code", Outcome::ToolError, Duration::from_secs(2));
        m.restore();
        m.refused("global_limit");
        m.ended(EndReason::Idle, 1.5, 0.25, 3);
        let text = m.render(Live {
            active_sandboxes: 2,
            pool_ready: 1,
            vcpu_seconds: 0.5,
            memory_gb_seconds: 0.75,
            runs: 1,
            snapshots: vec![(
                "al\"ice".into(),
                crate::sandbox::registry::SnapshotUsage {
                    writes: 2,
                    restores: 3,
                    byte_seconds: f64::from(1u32 << 30) * 3600.0,
                    stored_bytes: 4096,
                },
            )],
        });
        assert!(text.contains("airlock_active_sandboxes 2\n"), "{text}");
        assert!(
            text.contains("airlock_snapshot_gb_hours_total{principal=\"al\\\"ice\"} 1\n"),
            "{text}"
        );
        assert!(text.contains("airlock_snapshot_restores_total{principal=\"al\\\"ice\"} 3\n"));
        assert!(text.contains("airlock_snapshot_stored_bytes{principal=\"al\\\"ice\"} 4096\n"));
        assert!(text.contains("airlock_sandbox_restores_total 1\n"));
        assert!(text.contains("airlock_tool_calls_total{tool=\"run_code\",outcome=\"ok\"} 1\n"));
        assert!(text.contains(
            "airlock_tool_call_duration_seconds_bucket{tool=\"run_code\",le=\"0.05\"} 1\n"
        ));
        assert!(text.contains(
            "airlock_tool_call_duration_seconds_bucket{tool=\"run_code\",le=\"+Inf\"} 2\n"
        ));
        assert!(text.contains("airlock_tool_call_duration_seconds_count{tool=\"run_code\"} 2\n"));
        assert!(
            text.contains("airlock_vcpu_seconds_total 2.000000\n"),
            "{text}"
        );
        assert!(
            text.contains("airlock_memory_gb_seconds_total 1.000000\n"),
            "{text}"
        );
        assert!(text.contains("airlock_sandbox_runs_total 4\n"));
        assert!(text.contains("airlock_sandboxes_ended_total{reason=\"idle_timeout\"} 1\n"));
        // Every sample line belongs to a family declared before it.
        let mut declared = Vec::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                declared.push(rest.split(' ').next().unwrap().to_string());
            } else if !line.starts_with('#') {
                let name = line.split(['{', ' ']).next().unwrap();
                assert!(
                    declared.iter().any(|d| name.starts_with(d.as_str())),
                    "undeclared sample {line}"
                );
            }
        }
    }
}

//! Metering of egress: per sandbox (across its VMs: pauses, rollbacks and
//! restarts of the VM do not reset it) and per principal, plus the
//! per-sandbox bounds that need shared state (open connections, the rate).

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use schemars::JsonSchema;
use serde::Serialize;

use super::splice::{Counters, RateLimiter};

/// One sandbox's egress.
#[derive(Default)]
pub struct Traffic {
    /// Bytes moved, updated as they move (a long download shows progress).
    pub(super) bytes: Counters,
    allowed: AtomicU64,
    denied: AtomicU64,
    open: AtomicUsize,
    rate: OnceLock<RateLimiter>,
    /// When a denial was last told to the sandbox's owner (ms after
    /// [`epoch`], plus one; 0: never).
    denial_told_ms: AtomicU64,
}

/// Denials told to a sandbox's owner, at most one per this: a guest that
/// opens connections in a loop must not flood its owner's session, nor the
/// registry's event feed that every session reads.
const DENIAL_TOLD_EVERY_MS: u64 = 1000;

fn epoch() -> std::time::Instant {
    static EPOCH: OnceLock<std::time::Instant> = OnceLock::new();
    *EPOCH.get_or_init(std::time::Instant::now)
}

/// What [`Traffic`] shows in `sandbox_info`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, JsonSchema)]
pub struct TrafficReport {
    /// Bytes sent out of the sandbox, through the egress proxy.
    pub bytes_out: u64,
    /// Bytes received from outside.
    pub bytes_in: u64,
    /// Connections the policy allowed.
    pub connections_allowed: u64,
    /// Connections refused: by the policy, by the connection limit, or
    /// malformed requests.
    pub connections_denied: u64,
    /// Connections open now.
    pub connections_open: u64,
}

impl Traffic {
    pub fn report(&self) -> TrafficReport {
        TrafficReport {
            bytes_out: self.bytes.to_upstream.load(Ordering::Relaxed),
            bytes_in: self.bytes.from_upstream.load(Ordering::Relaxed),
            connections_allowed: self.allowed.load(Ordering::Relaxed),
            connections_denied: self.denied.load(Ordering::Relaxed),
            connections_open: self.open.load(Ordering::Relaxed) as u64,
        }
    }

    /// Takes one of `limit` connection slots, or `None` if all are taken.
    pub(super) fn try_open(&self, limit: usize) -> Option<OpenSlot<'_>> {
        let taken = self.open.fetch_add(1, Ordering::AcqRel);
        if taken >= limit {
            self.open.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        Some(OpenSlot(self))
    }

    pub(super) fn allowed(&self) {
        self.allowed.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a denial; true if it is to be told to the sandbox's owner.
    pub(super) fn denied(&self) -> bool {
        self.denied.fetch_add(1, Ordering::Relaxed);
        let now = epoch().elapsed().as_millis() as u64 + 1;
        let last = self.denial_told_ms.load(Ordering::Relaxed);
        (last == 0 || now.saturating_sub(last) >= DENIAL_TOLD_EVERY_MS)
            && self
                .denial_told_ms
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
    }

    /// The sandbox's rate limiter, made on first use.
    pub(super) fn rate(&self, bytes_per_second: Option<u64>) -> Option<&RateLimiter> {
        let rate = bytes_per_second?;
        Some(self.rate.get_or_init(|| RateLimiter::new(rate)))
    }
}

/// An open connection's slot; given back when dropped.
pub(super) struct OpenSlot<'a>(&'a Traffic);

impl Drop for OpenSlot<'_> {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::AcqRel);
    }
}

/// One principal's egress, for `/metrics`: the sum over its sandboxes of
/// connections that ended (bytes) or were decided (counts).
#[derive(Debug, Default)]
pub struct PrincipalTotals {
    pub bytes_out: AtomicU64,
    pub bytes_in: AtomicU64,
    pub allowed: AtomicU64,
    pub denied: AtomicU64,
}

/// A snapshot of [`PrincipalTotals`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PrincipalReport {
    pub bytes_out: u64,
    pub bytes_in: u64,
    pub allowed: u64,
    pub denied: u64,
}

impl PrincipalTotals {
    pub fn report(&self) -> PrincipalReport {
        PrincipalReport {
            bytes_out: self.bytes_out.load(Ordering::Relaxed),
            bytes_in: self.bytes_in.load(Ordering::Relaxed),
            allowed: self.allowed.load(Ordering::Relaxed),
            denied: self.denied.load(Ordering::Relaxed),
        }
    }
}

/// The `/metrics` lines for egress, by principal.
pub fn render_metrics(out: &mut String, principals: &[(String, PrincipalReport)]) {
    use std::fmt::Write as _;
    type Family = (&'static str, &'static str, fn(&PrincipalReport) -> u64);
    let families: [Family; 4] = [
        (
            "airlock_egress_bytes_out_total",
            "Bytes sandboxes sent out through the egress proxy.",
            |r| r.bytes_out,
        ),
        (
            "airlock_egress_bytes_in_total",
            "Bytes sandboxes received through the egress proxy.",
            |r| r.bytes_in,
        ),
        (
            "airlock_egress_connections_allowed_total",
            "Egress connections the policy allowed.",
            |r| r.allowed,
        ),
        (
            "airlock_egress_connections_denied_total",
            "Egress connections refused (policy, connection limit, malformed request).",
            |r| r.denied,
        ),
    ];
    for (name, help, value) in families {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
        for (principal, report) in principals {
            let principal = crate::metrics::label_value(principal);
            let _ = writeln!(out, "{name}{{principal=\"{principal}\"}} {}", value(report));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flood_of_denials_is_told_once_a_second_and_all_counted() {
        let traffic = Traffic::default();
        let told = (0..1000).filter(|_| traffic.denied()).count();
        assert_eq!(told, 1);
        assert_eq!(traffic.report().connections_denied, 1000);
        std::thread::sleep(std::time::Duration::from_millis(DENIAL_TOLD_EVERY_MS + 50));
        assert!(traffic.denied(), "a second later the next one is told");
    }

    #[test]
    fn open_slots_are_bounded_and_given_back() {
        let traffic = Traffic::default();
        let a = traffic.try_open(2).unwrap();
        let _b = traffic.try_open(2).unwrap();
        assert!(traffic.try_open(2).is_none());
        assert_eq!(traffic.report().connections_open, 2);
        drop(a);
        assert!(traffic.try_open(2).is_some());
    }

    #[test]
    fn metrics_lines_name_each_principal() {
        let mut out = String::new();
        let report = PrincipalReport {
            bytes_out: 10,
            bytes_in: 20,
            allowed: 1,
            denied: 2,
        };
        render_metrics(&mut out, &[("a\"b".into(), report)]);
        assert!(out.contains("airlock_egress_bytes_in_total{principal=\"a\\\"b\"} 20"));
        assert!(out.contains("airlock_egress_connections_denied_total{principal=\"a\\\"b\"} 2"));
    }
}

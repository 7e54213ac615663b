//! MCP logging: each session's level (`logging/setLevel`) and the
//! `notifications/message` it gets about its own sandboxes: starting (and
//! preparation on first use), restore, pause and resume, expiry warnings,
//! egress denials, and their end.
//!
//! A session hears only of the sandboxes its own calls used, which the
//! registry checked against its principal, and only what the event says
//! about that sandbox: nothing of other tenants or of the host's internals.

// Logging is deprecated by the 2026-07-28 revision (SEP-2577), and still
// part of 2025-06-18 and 2025-11-25, which the clients in use speak.
#![allow(deprecated)]

use std::collections::{BTreeSet, VecDeque};
use std::sync::{Arc, Mutex, OnceLock, PoisonError, Weak};
use std::time::{Duration, Instant};

use rmcp::model::{LoggingLevel, LoggingMessageNotificationParam};
use rmcp::{Peer, RoleServer};
use tokio::sync::broadcast::error::RecvError;
use tokio_util::sync::CancellationToken;

use crate::metrics::EndReason;
use crate::sandbox::registry::{EventFeed, Notice, SandboxEvent, fmt_duration};

/// The logger name on every message.
const LOGGER: &str = "airlock";
/// Sandboxes one session follows (a session uses one, or a few by id).
const MAX_WATCHED: usize = 64;
/// Events of sandboxes the session has not claimed yet, kept for a moment:
/// a sandbox's first events happen while the call that makes it waits.
const UNCLAIMED_KEPT: usize = 16;
/// Messages one session gets per minute at most; the rest are counted and
/// the count told with the next one let through.
const MESSAGES_PER_MINUTE: u32 = 60;
/// Messages waiting for the session's transport; more are dropped, so a
/// client that stops reading never holds a call or the registry.
const OUTBOX: usize = 64;

type Message = (LoggingLevel, String);

/// One session's logging: its level, what it follows, its outbox.
pub struct SessionLog {
    level: Mutex<LoggingLevel>,
    watched: Mutex<BTreeSet<String>>,
    /// Recent events of sandboxes not (yet) watched; sent only once a call
    /// of this session is given the sandbox, which proves it is its own.
    unclaimed: Mutex<VecDeque<Notice>>,
    budget: Mutex<Budget>,
    /// To the forwarding task, which alone talks to the peer.
    outbox: OnceLock<tokio::sync::mpsc::Sender<Message>>,
    /// Ends the forwarding task with the session.
    stop: CancellationToken,
}

impl Default for SessionLog {
    fn default() -> Self {
        SessionLog {
            level: Mutex::new(LoggingLevel::Info),
            watched: Mutex::new(BTreeSet::new()),
            unclaimed: Mutex::new(VecDeque::new()),
            budget: Mutex::new(Budget::default()),
            outbox: OnceLock::new(),
            stop: CancellationToken::new(),
        }
    }
}

impl Drop for SessionLog {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Severity order (the spec's, RFC 5424's): debug is the least severe.
fn rank(level: LoggingLevel) -> u8 {
    match level {
        LoggingLevel::Debug => 0,
        LoggingLevel::Info => 1,
        LoggingLevel::Notice => 2,
        LoggingLevel::Warning => 3,
        LoggingLevel::Error => 4,
        LoggingLevel::Critical => 5,
        LoggingLevel::Alert => 6,
        LoggingLevel::Emergency => 7,
    }
}

#[derive(Default)]
struct Budget {
    window_start: Option<Instant>,
    sent: u32,
    suppressed: u64,
}

impl Budget {
    /// Whether one more message may go now, and how many were held back
    /// before it.
    fn take(&mut self, now: Instant) -> Option<u64> {
        let start = *self.window_start.get_or_insert(now);
        if now.duration_since(start) >= Duration::from_secs(60) {
            self.window_start = Some(now);
            self.sent = 0;
        }
        if self.sent >= MESSAGES_PER_MINUTE {
            self.suppressed += 1;
            return None;
        }
        self.sent += 1;
        Some(std::mem::take(&mut self.suppressed))
    }
}

impl SessionLog {
    pub fn set_level(&self, level: LoggingLevel) {
        *lock(&self.level) = level;
    }

    fn wants(&self, level: LoggingLevel) -> bool {
        rank(level) >= rank(*lock(&self.level))
    }

    /// Starts forwarding this session's sandbox events to `peer` (once).
    pub fn attach(self: &Arc<Self>, peer: &Peer<RoleServer>, feed: &EventFeed) {
        let (tx, rx) = tokio::sync::mpsc::channel(OUTBOX);
        if self.outbox.set(tx).is_ok() {
            tokio::spawn(forward(
                Arc::downgrade(self),
                peer.clone(),
                feed.subscribe(),
                rx,
                self.stop.clone(),
            ));
        }
    }

    /// Follows `sandbox_id` from now on (the registry gave it to a call of
    /// this session), telling what happened to it since the call began.
    pub fn watch(&self, sandbox_id: &str) {
        {
            let mut watched = lock(&self.watched);
            if watched.contains(sandbox_id) {
                return;
            }
            if watched.len() >= MAX_WATCHED {
                watched.pop_first();
            }
            watched.insert(sandbox_id.to_string());
        }
        let claimed: Vec<Notice> = {
            let mut unclaimed = lock(&self.unclaimed);
            let (mine, others): (Vec<Notice>, Vec<Notice>) = unclaimed
                .drain(..)
                .partition(|n| n.sandbox_id == sandbox_id);
            *unclaimed = others.into();
            mine
        };
        for notice in claimed {
            let (level, text) = describe(&notice.sandbox_id, &notice.event);
            self.queue(level, text);
        }
    }

    /// Takes an event in: told if its sandbox is followed, else kept a
    /// moment in case a call of this session is being given it.
    fn take_in(&self, notice: Notice) {
        if !lock(&self.watched).contains(&notice.sandbox_id) {
            let mut unclaimed = lock(&self.unclaimed);
            if unclaimed.len() >= UNCLAIMED_KEPT {
                unclaimed.pop_front();
            }
            unclaimed.push_back(notice);
            return;
        }
        let (level, text) = describe(&notice.sandbox_id, &notice.event);
        self.queue(level, text);
    }

    /// Tells the session something it should know about its own call.
    pub fn notice(&self, text: String) {
        self.queue(LoggingLevel::Notice, text);
    }

    /// Queues one message for the session, if the level and the budget let
    /// it through; never waits.
    fn queue(&self, level: LoggingLevel, text: String) {
        if !self.wants(level) {
            return;
        }
        let Some(outbox) = self.outbox.get() else {
            return;
        };
        let Some(held_back) = lock(&self.budget).take(Instant::now()) else {
            return;
        };
        let text = if held_back > 0 {
            format!(
                "{text} ({held_back} earlier messages were not sent: at most {MESSAGES_PER_MINUTE} a minute)"
            )
        } else {
            text
        };
        if outbox.try_send((level, text)).is_err() {
            lock(&self.budget).suppressed += 1;
        }
    }
}

async fn forward(
    log: Weak<SessionLog>,
    peer: Peer<RoleServer>,
    mut events: tokio::sync::broadcast::Receiver<Notice>,
    mut outbox: tokio::sync::mpsc::Receiver<Message>,
    stop: CancellationToken,
) {
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            message = outbox.recv() => {
                let Some((level, text)) = message else { return };
                let param = LoggingMessageNotificationParam::new(level, serde_json::Value::String(text))
                    .with_logger(LOGGER);
                if peer.notify_logging_message(param).await.is_err() && peer.is_transport_closed() {
                    return;
                }
            }
            notice = events.recv() => {
                let Some(log) = log.upgrade() else { return };
                match notice {
                    Ok(notice) => log.take_in(notice),
                    Err(RecvError::Lagged(missed)) => log.queue(
                        LoggingLevel::Warning,
                        format!("{missed} sandbox events were missed (the server was busy)"),
                    ),
                    Err(RecvError::Closed) => return,
                }
            }
        }
    }
}

/// The level and words of an event, for the sandbox's owner.
pub fn describe(sandbox_id: &str, event: &SandboxEvent) -> (LoggingLevel, String) {
    let secs = |d: &Duration| format!("{:.2} s", d.as_secs_f64());
    match event {
        SandboxEvent::Started { took } => (
            LoggingLevel::Info,
            format!(
                "sandbox {sandbox_id} started from the warm template in {}",
                secs(took)
            ),
        ),
        SandboxEvent::Resumed { took } => (
            LoggingLevel::Info,
            format!(
                "sandbox {sandbox_id} resumed from disk in {}, with its files, variables and processes",
                secs(took)
            ),
        ),
        SandboxEvent::Paused { idle } => (
            LoggingLevel::Info,
            format!(
                "sandbox {sandbox_id} was paused to disk after {} idle; the next call resumes it intact",
                fmt_duration(*idle)
            ),
        ),
        SandboxEvent::Reset => (
            LoggingLevel::Notice,
            format!("sandbox {sandbox_id} was reset: it starts again from the clean template"),
        ),
        SandboxEvent::ExpiresSoon { within, reason } => {
            let why = match reason {
                EndReason::Lifetime => "it reaches its maximum lifetime".to_string(),
                _ => "it has been idle; any tool call keeps it".to_string(),
            };
            (
                LoggingLevel::Warning,
                format!(
                    "sandbox {sandbox_id} will be destroyed in {} ({why}); its files and variables go with it",
                    fmt_duration(*within)
                ),
            )
        }
        SandboxEvent::Ended { reason } => (
            LoggingLevel::Notice,
            format!(
                "sandbox {sandbox_id} was destroyed ({})",
                match reason {
                    EndReason::Idle => "idle timeout",
                    EndReason::Lifetime => "maximum lifetime",
                    _ => reason.label(),
                }
            ),
        ),
        SandboxEvent::EgressDenied { why } => (
            LoggingLevel::Warning,
            format!(
                "sandbox {sandbox_id}: a network connection was refused by the egress policy: {why} \
                 (told at most once a second; sandbox_info counts every denial)"
            ),
        ),
    }
}

/// Parses a level name as `logging/setLevel` spells it.
#[cfg(test)]
fn level_named(name: &str) -> Option<LoggingLevel> {
    serde_json::from_value(serde_json::Value::String(name.into())).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_filter_by_severity() {
        let log = SessionLog::default();
        assert!(log.wants(LoggingLevel::Info) && !log.wants(LoggingLevel::Debug));
        log.set_level(level_named("warning").unwrap());
        assert!(!log.wants(LoggingLevel::Info) && !log.wants(LoggingLevel::Notice));
        assert!(log.wants(LoggingLevel::Warning) && log.wants(LoggingLevel::Emergency));
        log.set_level(LoggingLevel::Debug);
        assert!(log.wants(LoggingLevel::Debug));
    }

    #[test]
    fn the_budget_holds_back_a_flood_and_tells_how_much() {
        let mut budget = Budget::default();
        let t0 = Instant::now();
        for _ in 0..MESSAGES_PER_MINUTE {
            assert_eq!(budget.take(t0), Some(0));
        }
        assert_eq!(budget.take(t0), None);
        assert_eq!(budget.take(t0 + Duration::from_secs(30)), None);
        assert_eq!(budget.take(t0 + Duration::from_secs(61)), Some(2));
    }

    #[test]
    fn events_read_as_the_owner_needs_them() {
        let (level, text) = describe(
            "abc",
            &SandboxEvent::ExpiresSoon {
                within: Duration::from_secs(60),
                reason: EndReason::Idle,
            },
        );
        assert_eq!(level, LoggingLevel::Warning);
        assert!(text.contains("abc") && text.contains("1m"), "{text}");
        let (level, text) = describe(
            "abc",
            &SandboxEvent::EgressDenied {
                why: "evil.test is not allowed".into(),
            },
        );
        assert_eq!(level, LoggingLevel::Warning);
        assert!(text.contains("evil.test"), "{text}");
    }

    #[test]
    fn a_session_hears_of_a_sandbox_only_once_a_call_of_its_own_is_given_it() {
        let log = SessionLog::default();
        let (tx, mut rx) = tokio::sync::mpsc::channel(OUTBOX);
        log.outbox.set(tx).unwrap();
        let notice = |id: &str| Notice {
            sandbox_id: id.into(),
            event: SandboxEvent::Reset,
        };
        // Events before the call that makes the sandbox returns wait.
        log.take_in(notice("mine"));
        log.take_in(notice("theirs"));
        assert!(rx.try_recv().is_err(), "nothing is told before a claim");
        log.watch("mine");
        let (_, text) = rx.try_recv().expect("the claimed event is told");
        assert!(text.contains("mine"), "{text}");
        assert!(rx.try_recv().is_err(), "and only it");
        let waiting: Vec<_> = lock(&log.unclaimed)
            .iter()
            .map(|n| n.sandbox_id.clone())
            .collect();
        assert_eq!(waiting, ["theirs"]);
        // Once followed, its events go straight out; the waiting list is bounded.
        log.take_in(notice("mine"));
        assert!(rx.try_recv().is_ok());
        for _ in 0..UNCLAIMED_KEPT * 2 {
            log.take_in(notice("theirs"));
        }
        assert_eq!(lock(&log.unclaimed).len(), UNCLAIMED_KEPT);
        assert!(rx.try_recv().is_err());
        // Below the session's level nothing is queued.
        log.set_level(LoggingLevel::Warning);
        log.take_in(notice("mine"));
        assert!(rx.try_recv().is_err());
    }
}

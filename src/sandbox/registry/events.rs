//! What happens to each sandbox, told to whoever listens: the MCP server
//! forwards a conversation's own sandbox events to its client as log
//! messages. Sending never blocks; a listener that falls behind loses the
//! oldest events, not the registry's time.

use std::time::Duration;

use tokio::sync::broadcast;

use crate::metrics::EndReason;

/// Events kept for a listener that has not caught up.
const BACKLOG: usize = 256;

#[derive(Debug, Clone, PartialEq)]
pub enum SandboxEvent {
    /// Made from the warm template for its first call.
    Started {
        took: Duration,
    },
    /// Resumed from disk after a pause.
    Resumed {
        took: Duration,
    },
    /// Paused to disk after being idle this long.
    Paused {
        idle: Duration,
    },
    /// Replaced by a fresh sandbox (reset_sandbox).
    Reset,
    /// Ends in `within` unless a call comes first (idle), or whatever
    /// happens (lifetime).
    ExpiresSoon {
        within: Duration,
        reason: EndReason,
    },
    Ended {
        reason: EndReason,
    },
    /// The egress gateway refused one of its connections.
    EgressDenied {
        why: String,
    },
}

/// An event and the sandbox it happened to.
#[derive(Debug, Clone)]
pub struct Notice {
    pub sandbox_id: String,
    pub event: SandboxEvent,
}

#[derive(Clone)]
pub struct EventFeed(broadcast::Sender<Notice>);

impl Default for EventFeed {
    fn default() -> Self {
        EventFeed(broadcast::channel(BACKLOG).0)
    }
}

impl std::fmt::Debug for EventFeed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventFeed")
            .field("listeners", &self.0.receiver_count())
            .finish()
    }
}

impl EventFeed {
    pub fn emit(&self, sandbox_id: &str, event: SandboxEvent) {
        if self.0.receiver_count() > 0 {
            let _ = self.0.send(Notice {
                sandbox_id: sandbox_id.to_string(),
                event,
            });
        }
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Notice> {
        self.0.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn listeners_get_events_and_a_slow_one_loses_the_oldest() {
        let feed = EventFeed::default();
        feed.emit("nobody-listens", SandboxEvent::Reset);
        let mut rx = feed.subscribe();
        for _ in 0..BACKLOG + 10 {
            feed.emit("a", SandboxEvent::Reset);
        }
        assert!(matches!(
            rx.recv().await,
            Err(broadcast::error::RecvError::Lagged(10))
        ));
        let next = rx.recv().await.unwrap();
        assert_eq!(next.sandbox_id, "a");
        assert_eq!(next.event, SandboxEvent::Reset);
    }
}

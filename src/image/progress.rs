//! Progress lines for a build that takes minutes: to stderr, so that stdout
//! stays clean for MCP in stdio mode.

use std::time::{Duration, Instant};

/// Reports the steps of one build product.
pub struct Progress {
    product: &'static str,
    started: Instant,
}

impl Progress {
    pub fn new(product: &'static str) -> Self {
        Progress {
            product,
            started: Instant::now(),
        }
    }

    /// A new step has begun.
    pub fn step(&self, what: &str) {
        eprintln!(
            "[{} {}] {what}",
            self.product,
            format_elapsed(self.started.elapsed())
        );
    }

    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }
}

/// A throttle for chatty commands: lets a line through at most every `every`.
pub struct Throttle {
    every: Duration,
    last: Option<Instant>,
}

impl Throttle {
    pub fn new(every: Duration) -> Self {
        Throttle { every, last: None }
    }

    pub fn ready(&mut self) -> bool {
        let now = Instant::now();
        match self.last {
            Some(last) if now.duration_since(last) < self.every => false,
            _ => {
                self.last = Some(now);
                true
            }
        }
    }
}

pub fn format_elapsed(elapsed: Duration) -> String {
    let secs = elapsed.as_secs();
    format!("{}:{:02}", secs / 60, secs % 60)
}

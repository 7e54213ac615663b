//! Rate-limited warnings for what a guest makes happen. A guest can hit a
//! warning path as fast as it can exit, so the VMM (one per sandbox) logs at
//! most a few per second, then how many it left out.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Warnings logged per window; the rest are counted.
pub const PER_WINDOW: u32 = 5;
const WINDOW: Duration = Duration::from_secs(1);

struct Window {
    started: Option<Instant>,
    logged: u32,
    suppressed: u64,
}

static WINDOW_STATE: Mutex<Window> = Mutex::new(Window {
    started: None,
    logged: 0,
    suppressed: 0,
});

/// Whether a guest-triggered warning may be logged now. A new window first
/// reports how many the last one left out.
pub fn allow() -> bool {
    allow_at(&WINDOW_STATE, Instant::now())
}

fn allow_at(state: &Mutex<Window>, now: Instant) -> bool {
    let Ok(mut w) = state.lock() else {
        return false;
    };
    if w.started.is_none_or(|s| now.duration_since(s) >= WINDOW) {
        if w.suppressed > 0 {
            tracing::warn!(
                suppressed = w.suppressed,
                "{} more guest-triggered warnings were not logged",
                w.suppressed
            );
        }
        *w = Window {
            started: Some(now),
            logged: 0,
            suppressed: 0,
        };
    }
    if w.logged < PER_WINDOW {
        w.logged += 1;
        true
    } else {
        w.suppressed += 1;
        false
    }
}

/// `tracing::warn!` for guest-triggered events, through the rate limit.
#[macro_export]
macro_rules! guest_warn {
    ($($arg:tt)*) => {
        if $crate::vmm::guest_warn::allow() {
            tracing::warn!($($arg)*);
        }
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_few_per_window_then_a_count() {
        let state = Mutex::new(Window {
            started: None,
            logged: 0,
            suppressed: 0,
        });
        let t0 = Instant::now();
        let allowed = (0..1000).filter(|_| allow_at(&state, t0)).count();
        assert_eq!(allowed, PER_WINDOW as usize);
        assert_eq!(
            state.lock().unwrap().suppressed,
            1000 - u64::from(PER_WINDOW)
        );
        assert!(allow_at(&state, t0 + WINDOW), "a new window logs again");
        assert_eq!(state.lock().unwrap().suppressed, 0);
    }
}

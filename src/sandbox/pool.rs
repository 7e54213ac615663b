//! A pool of restored, idle sandboxes: `take` hands one out at once, and a
//! background task restores the next. A sandbox leaves the pool exactly once,
//! so no two callers ever share one.
//!
//! The pool follows demand: it keeps as many ready as conversations began in
//! the last minute, at least its floor and at most its ceiling, and destroys
//! what it no longer needs once demand falls.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use tokio::sync::{Mutex, Notify};

use super::{Sandbox, SavedSandbox, StartOptions};
use crate::template::Template;

pub const DEFAULT_POOL_SIZE: usize = 2;
/// The most sandboxes a pool keeps ready by default, however busy.
pub const DEFAULT_POOL_MAX: usize = 8;
/// How long a pooled sandbox's warm-up cell may take.
const PREWARM_TIMEOUT: Duration = Duration::from_secs(30);
/// While sandboxes are still ready, a refill starts no sooner than this
/// after the last take, so the conversation's first call does not share the
/// CPU with a restore.
const REFILL_DELAY: Duration = Duration::from_millis(300);
/// How far back `take`s count as demand.
pub const DEMAND_WINDOW: Duration = Duration::from_secs(60);

/// Conversations begun recently: when each took a sandbox.
#[derive(Debug, Default)]
pub struct Demand {
    takes: VecDeque<Instant>,
}

impl Demand {
    /// Most takes remembered (more would not raise the target further).
    const MAX_REMEMBERED: usize = 1024;

    pub fn record(&mut self, now: Instant) {
        self.forget_before(now);
        if self.takes.len() >= Self::MAX_REMEMBERED {
            self.takes.pop_front();
        }
        self.takes.push_back(now);
    }

    /// When the last take was.
    pub fn last(&self) -> Option<Instant> {
        self.takes.back().copied()
    }

    /// Takes in the window ending `now`.
    pub fn recent(&mut self, now: Instant) -> usize {
        self.forget_before(now);
        self.takes.len()
    }

    fn forget_before(&mut self, now: Instant) {
        while self
            .takes
            .front()
            .is_some_and(|&t| now.saturating_duration_since(t) > DEMAND_WINDOW)
        {
            self.takes.pop_front();
        }
    }
}

/// How many sandboxes to keep ready: recent demand, at least `floor` and at
/// most `ceiling`. A floor of 0 turns the pool off.
pub fn target_for(recent: usize, floor: usize, ceiling: usize) -> usize {
    if floor == 0 {
        return 0;
    }
    recent.clamp(floor, ceiling.max(floor))
}

pub struct WarmPool {
    template: Template,
    airlock_exe: PathBuf,
    options: StartOptions,
    floor: usize,
    ceiling: usize,
    demand: std::sync::Mutex<Demand>,
    ready: Mutex<VecDeque<Sandbox>>,
    wake: Notify,
    closed: std::sync::atomic::AtomicBool,
}

impl WarmPool {
    /// Starts a pool that keeps between `floor` and `ceiling` sandboxes
    /// ready, as demand asks (a floor of 0 disables it), started with
    /// `options`.
    pub fn start(
        template: Template,
        airlock_exe: PathBuf,
        options: StartOptions,
        floor: usize,
        ceiling: usize,
    ) -> Arc<WarmPool> {
        let pool = Arc::new(WarmPool {
            template,
            airlock_exe,
            options,
            floor,
            ceiling: ceiling.max(floor),
            demand: std::sync::Mutex::new(Demand::default()),
            ready: Mutex::new(VecDeque::new()),
            wake: Notify::new(),
            closed: std::sync::atomic::AtomicBool::new(false),
        });
        if floor > 0 {
            tokio::spawn(refill(pool.clone()));
        }
        pool
    }

    /// How many sandboxes the pool means to keep ready now.
    pub fn target(&self) -> usize {
        let recent = self
            .demand
            .lock()
            .map_or(0, |mut demand| demand.recent(Instant::now()));
        target_for(recent, self.floor, self.ceiling)
    }

    /// A sandbox for one caller: from the pool if one is ready, else restored now.
    pub async fn take(&self) -> Result<Sandbox> {
        if let Ok(mut demand) = self.demand.lock() {
            demand.record(Instant::now());
        }
        let ready = self.ready.lock().await.pop_front();
        self.wake.notify_one();
        match ready {
            Some(sandbox) => Ok(sandbox),
            None => self.restore().await,
        }
    }

    async fn restore(&self) -> Result<Sandbox> {
        Sandbox::start(&self.template, &self.airlock_exe, &self.options, None).await
    }

    /// A sandbox for the pool: restored, then its warm Python runs an empty
    /// cell, so the pages a first cell touches are mapped before a
    /// conversation's first call needs them (a nested page fault each
    /// otherwise). The cell leaves no state; only the cell count moves.
    async fn restore_for_pool(&self) -> Result<Sandbox> {
        let sandbox = self.restore().await?;
        let warmed = sandbox
            .client()
            .run_code(airlock_protocol::Language::Python, "pass", PREWARM_TIMEOUT)
            .await;
        if let Err(err) = warmed {
            tracing::debug!(%err, "a pooled sandbox's warm-up cell failed; it is served anyway");
        }
        Ok(sandbox)
    }

    /// The name of the image its sandboxes run.
    pub fn image_name(&self) -> &str {
        self.template.image.name()
    }

    /// A paused sandbox, resumed over this pool's template.
    pub async fn resume(&self, saved: &SavedSandbox) -> Result<Sandbox> {
        Sandbox::start(
            &self.template,
            &self.airlock_exe,
            &self.options,
            Some(&saved.dir),
        )
        .await
    }

    /// A paused sandbox kept by an earlier run, found by its name.
    pub fn load_saved(&self, name: &str) -> Result<SavedSandbox> {
        let root = self
            .options
            .staging_root
            .as_deref()
            .context("this server keeps no paused sandboxes")?;
        SavedSandbox::load(root, name)
    }

    pub async fn ready_count(&self) -> usize {
        self.ready.lock().await.len()
    }

    pub fn template(&self) -> &Template {
        &self.template
    }

    /// Stops refilling and destroys the idle sandboxes.
    pub async fn close(&self) {
        self.closed.store(true, std::sync::atomic::Ordering::SeqCst);
        self.wake.notify_one();
        let idle: Vec<Sandbox> = self.ready.lock().await.drain(..).collect();
        for sandbox in idle {
            sandbox.destroy().await;
        }
    }
}

/// Runs until `close`; `notify_one` keeps a permit, so no wake-up is lost.
/// Demand is looked at again at least every quarter window, so a pool grown
/// for a burst shrinks back.
async fn refill(p: Arc<WarmPool>) {
    loop {
        if p.closed.load(std::sync::atomic::Ordering::SeqCst) {
            return;
        }
        let target = p.target();
        let ready = p.ready.lock().await.len();
        if ready > target {
            let surplus = p.ready.lock().await.pop_back();
            if let Some(sandbox) = surplus {
                sandbox.destroy().await;
            }
            continue;
        }
        if ready == target {
            let _ = tokio::time::timeout(DEMAND_WINDOW / 4, p.wake.notified()).await;
            continue;
        }
        // Right after a take, not between refills: a burst still refills
        // at full speed.
        let last_take = p.demand.lock().ok().and_then(|demand| demand.last());
        if ready > 0
            && let Some(last) = last_take
        {
            tokio::time::sleep_until((last + REFILL_DELAY).into()).await;
        }
        match p.restore_for_pool().await {
            Ok(sandbox) if !p.closed.load(std::sync::atomic::Ordering::SeqCst) => {
                p.ready.lock().await.push_back(sandbox);
            }
            Ok(sandbox) => sandbox.destroy().await,
            Err(err) => {
                tracing::warn!(err = %format!("{err:#}"), "warm pool could not restore a sandbox; retrying soon");
                tokio::time::sleep(std::time::Duration::from_secs(2)).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_target_follows_recent_demand_within_floor_and_ceiling() {
        assert_eq!(target_for(0, 2, 8), 2, "the floor when idle");
        assert_eq!(target_for(5, 2, 8), 5);
        assert_eq!(target_for(50, 2, 8), 8, "capped");
        assert_eq!(target_for(50, 0, 8), 0, "a floor of 0 is off");
        assert_eq!(
            target_for(3, 4, 1),
            4,
            "a ceiling below the floor is the floor"
        );
    }

    #[test]
    fn demand_counts_takes_in_the_window_and_forgets_older_ones() {
        let mut demand = Demand::default();
        let start = Instant::now();
        for i in 0..5 {
            demand.record(start + Duration::from_secs(i));
        }
        assert_eq!(demand.recent(start + Duration::from_secs(10)), 5);
        assert_eq!(demand.last(), Some(start + Duration::from_secs(4)));
        let later = start + DEMAND_WINDOW + Duration::from_millis(2500);
        assert_eq!(demand.recent(later), 2, "takes at 0..2 s are forgotten");
        assert_eq!(demand.recent(later + DEMAND_WINDOW * 2), 0);
        for _ in 0..Demand::MAX_REMEMBERED + 10 {
            demand.record(later);
        }
        assert_eq!(demand.recent(later), Demand::MAX_REMEMBERED, "bounded");
    }
}

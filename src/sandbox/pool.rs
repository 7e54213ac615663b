//! A pool of restored, idle sandboxes: `take` hands one out at once, and a
//! background task restores the next. A sandbox leaves the pool exactly once,
//! so no two callers ever share one.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result};
use tokio::sync::{Mutex, Notify};

use super::{Sandbox, SavedSandbox, StartOptions};
use crate::template::Template;

pub const DEFAULT_POOL_SIZE: usize = 2;

pub struct WarmPool {
    template: Template,
    airlock_exe: PathBuf,
    options: StartOptions,
    target: usize,
    ready: Mutex<VecDeque<Sandbox>>,
    wake: Notify,
    closed: std::sync::atomic::AtomicBool,
}

impl WarmPool {
    /// Starts a pool that keeps `target` sandboxes ready (0 disables it),
    /// started with `options`.
    pub fn start(
        template: Template,
        airlock_exe: PathBuf,
        options: StartOptions,
        target: usize,
    ) -> Arc<WarmPool> {
        let pool = Arc::new(WarmPool {
            template,
            airlock_exe,
            options,
            target,
            ready: Mutex::new(VecDeque::new()),
            wake: Notify::new(),
            closed: std::sync::atomic::AtomicBool::new(false),
        });
        if target > 0 {
            tokio::spawn(refill(pool.clone()));
        }
        pool
    }

    /// A sandbox for one caller: from the pool if one is ready, else restored now.
    pub async fn take(&self) -> Result<Sandbox> {
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
async fn refill(p: Arc<WarmPool>) {
    loop {
        if p.closed.load(std::sync::atomic::Ordering::SeqCst) {
            return;
        }
        if p.ready.lock().await.len() >= p.target {
            p.wake.notified().await;
            continue;
        }
        match p.restore().await {
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

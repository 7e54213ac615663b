//! Where the gateway's sandboxes come from: the warm pool, made ready in the
//! background so the MCP server answers `initialize` at once even when the
//! guest image or the template still has to be built (minutes, once). A tool
//! call that arrives before then waits for it.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Context, Result};
use tokio::sync::watch;

use crate::sandbox::Sandbox;
use crate::sandbox::pool::WarmPool;
use crate::sandbox::registry::Provider;
use crate::template::TemplateShape;

#[derive(Clone)]
enum Readiness {
    Preparing,
    Ready(Arc<WarmPool>),
    Failed(String),
}

/// The warm pool, once the image and the template exist.
pub struct LazyPool {
    state: watch::Receiver<Readiness>,
    closed: Arc<AtomicBool>,
}

impl LazyPool {
    /// Starts preparing the image, the template and a pool of `pool_size`
    /// sandboxes of `shape` in the background.
    pub fn start(
        cache: PathBuf,
        airlock_exe: PathBuf,
        shape: TemplateShape,
        pool_size: usize,
    ) -> LazyPool {
        let (tx, rx) = watch::channel(Readiness::Preparing);
        let closed = Arc::new(AtomicBool::new(false));
        let closed_in_task = closed.clone();
        tokio::spawn(async move {
            let state = match prepare(cache, airlock_exe, shape, pool_size).await {
                Ok(pool) => {
                    if closed_in_task.load(Ordering::SeqCst) {
                        pool.close().await;
                        Readiness::Failed("the server is shutting down".into())
                    } else {
                        tracing::info!(pool_size, "sandboxes ready");
                        let _ = tx.send(Readiness::Ready(pool.clone()));
                        // A close that came while we sent saw no pool.
                        if closed_in_task.load(Ordering::SeqCst) {
                            pool.close().await;
                        }
                        return;
                    }
                }
                Err(err) => {
                    let message = format!("{err:#}");
                    tracing::error!(err = %message, "cannot prepare sandboxes");
                    Readiness::Failed(message)
                }
            };
            let _ = tx.send(state);
        });
        LazyPool { state: rx, closed }
    }

    /// The pool, waiting for it if it is still being prepared.
    async fn pool(&self) -> Result<Arc<WarmPool>> {
        let mut rx = self.state.clone();
        let state = rx
            .wait_for(|s| !matches!(s, Readiness::Preparing))
            .await
            .map_err(|_| anyhow::anyhow!("the sandbox preparation task ended"))?
            .clone();
        match state {
            Readiness::Ready(pool) => Ok(pool),
            Readiness::Failed(message) => Err(anyhow::anyhow!("{message}")),
            Readiness::Preparing => unreachable!("waited for another state"),
        }
    }

    /// Whether sandboxes can be made now (for /healthz).
    pub fn status(&self) -> (&'static str, Option<String>) {
        match &*self.state.borrow() {
            Readiness::Preparing => ("preparing", None),
            Readiness::Ready(_) => ("ready", None),
            Readiness::Failed(message) => ("failed", Some(message.clone())),
        }
    }
}

async fn prepare(
    cache: PathBuf,
    airlock_exe: PathBuf,
    shape: TemplateShape,
    pool_size: usize,
) -> Result<Arc<WarmPool>> {
    let image_cache = cache.clone();
    // Builds the image if missing (minutes, once), with progress on stderr.
    let (image, _) = tokio::task::spawn_blocking(move || crate::image::ensure(&image_cache))
        .await
        .context("the image task failed")?
        .context("cannot prepare the guest image")?;
    let template = crate::template::ensure(&cache, &image, shape, &airlock_exe)
        .await
        .context("cannot prepare the warm template")?;
    tracing::info!(template = %template.dir.display(), "warm template ready");
    Ok(WarmPool::start(template, airlock_exe, pool_size))
}

impl Provider for LazyPool {
    type Sandbox = Sandbox;

    async fn take(&self) -> Result<Sandbox> {
        self.pool().await?.take().await
    }

    async fn ready(&self) -> usize {
        let pool = match &*self.state.borrow() {
            Readiness::Ready(pool) => pool.clone(),
            _ => return 0,
        };
        pool.ready_count().await
    }

    async fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
        let pool = match &*self.state.borrow() {
            Readiness::Ready(pool) => Some(pool.clone()),
            _ => None,
        };
        if let Some(pool) = pool {
            pool.close().await;
        }
    }
}

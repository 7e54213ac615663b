//! Where the gateway's sandboxes come from: the warm pool, made ready in the
//! background so the MCP server answers `initialize` at once even when the
//! guest image or the template still has to be built (minutes, once). A tool
//! call that arrives before then waits for it.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use tokio::sync::watch;

use crate::sandbox::pool::WarmPool;
use crate::sandbox::registry::Provider;
use crate::sandbox::{Sandbox, SavedSandbox, StartOptions};
use crate::template::TemplateShape;

/// After a failed preparation, the next call that needs a sandbox tries
/// again once this long has passed.
const RETRY_AFTER: Duration = Duration::from_secs(60);

#[derive(Clone)]
enum Readiness {
    Preparing,
    Ready(Arc<WarmPool>),
    Failed(String, Instant),
}

struct Recipe {
    cache: PathBuf,
    airlock_exe: PathBuf,
    shape: TemplateShape,
    pool_size: usize,
    pool_max: usize,
    options: StartOptions,
}

/// The warm pool, once the image and the template exist.
pub struct LazyPool {
    state: watch::Sender<Readiness>,
    recipe: Arc<Recipe>,
    closed: Arc<AtomicBool>,
}

impl LazyPool {
    /// Starts preparing the image, the template and a pool of `pool_size`
    /// sandboxes of `shape` (growing with demand to `pool_max`) in the
    /// background.
    pub fn start(
        cache: PathBuf,
        airlock_exe: PathBuf,
        shape: TemplateShape,
        pool_size: usize,
        pool_max: usize,
        options: StartOptions,
    ) -> LazyPool {
        let (state, _) = watch::channel(Readiness::Preparing);
        let lazy = LazyPool {
            state,
            recipe: Arc::new(Recipe {
                cache,
                airlock_exe,
                shape,
                pool_size,
                pool_max,
                options,
            }),
            closed: Arc::new(AtomicBool::new(false)),
        };
        lazy.spawn_preparation();
        lazy
    }

    fn spawn_preparation(&self) {
        let tx = self.state.clone();
        let recipe = self.recipe.clone();
        let closed = self.closed.clone();
        tokio::spawn(async move {
            let prepared = prepare(&recipe).await;
            let pool = match prepared {
                Ok(pool) => pool,
                Err(err) => {
                    let message = format!("{err:#}");
                    tracing::error!(err = %message, "cannot prepare sandboxes");
                    tx.send_replace(Readiness::Failed(message, Instant::now()));
                    return;
                }
            };
            if !closed.load(Ordering::SeqCst) {
                tracing::info!(
                    pool_size = recipe.pool_size,
                    pool_max = recipe.pool_max,
                    "sandboxes ready"
                );
                tx.send_replace(Readiness::Ready(pool.clone()));
            }
            // A close that came before or while we sent saw no pool.
            if closed.load(Ordering::SeqCst) {
                pool.close().await;
            }
        });
    }

    /// The pool, waiting for it if it is still being prepared, and
    /// preparing it again if the last attempt failed a while ago.
    async fn pool(&self) -> Result<Arc<WarmPool>> {
        let retry = self.state.send_if_modified(|state| match state {
            Readiness::Failed(_, at)
                if at.elapsed() >= RETRY_AFTER && !self.closed.load(Ordering::SeqCst) =>
            {
                *state = Readiness::Preparing;
                true
            }
            _ => false,
        });
        if retry {
            tracing::info!("preparing sandboxes again after the last attempt failed");
            self.spawn_preparation();
        }
        let mut rx = self.state.subscribe();
        let state = rx
            .wait_for(|s| !matches!(s, Readiness::Preparing))
            .await
            .map_err(|_| anyhow::anyhow!("the sandbox preparation task ended"))?
            .clone();
        match state {
            Readiness::Ready(pool) => Ok(pool),
            Readiness::Failed(message, at) => Err(anyhow::anyhow!(
                "{message} (the server tries again {} after a failure)",
                if at.elapsed() >= RETRY_AFTER {
                    "now".to_string()
                } else {
                    format!("{} s", (RETRY_AFTER - at.elapsed()).as_secs())
                }
            )),
            Readiness::Preparing => unreachable!("waited for another state"),
        }
    }

    /// Whether the image and the template are still being made.
    pub fn is_preparing(&self) -> bool {
        matches!(*self.state.borrow(), Readiness::Preparing)
    }

    /// Whether sandboxes can be made now (for /healthz).
    pub fn status(&self) -> (&'static str, Option<String>) {
        match &*self.state.borrow() {
            Readiness::Preparing => ("preparing", None),
            Readiness::Ready(_) => ("ready", None),
            Readiness::Failed(message, _) => ("failed", Some(message.clone())),
        }
    }
}

async fn prepare(recipe: &Recipe) -> Result<Arc<WarmPool>> {
    let image_cache = recipe.cache.clone();
    // Builds the image if missing (minutes, once), with progress on stderr.
    let (image, _) = tokio::task::spawn_blocking(move || crate::image::ensure(&image_cache))
        .await
        .context("the image task failed")?
        .context("cannot prepare the guest image")?;
    let template =
        crate::template::ensure(&recipe.cache, &image, recipe.shape, &recipe.airlock_exe)
            .await
            .context("cannot prepare the warm template")?;
    tracing::info!(template = %template.dir.display(), "warm template ready");
    Ok(WarmPool::start(
        template,
        recipe.airlock_exe.clone(),
        recipe.options.clone(),
        recipe.pool_size,
        recipe.pool_max,
    ))
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

    async fn resume(&self, saved: &SavedSandbox) -> Result<Sandbox> {
        self.pool().await?.resume(saved).await
    }

    fn load_saved(&self, name: &str) -> Result<SavedSandbox> {
        let root = self
            .recipe
            .options
            .staging_root
            .as_deref()
            .context("this server keeps no paused sandboxes")?;
        SavedSandbox::load(root, name)
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

//! Where the gateway's sandboxes come from: one warm pool per image served,
//! each made ready in the background so the MCP server answers `initialize`
//! at once even when a guest image or its template still has to be built
//! (minutes, once). A tool call that arrives before then waits for it.

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

/// Where an image served comes from.
#[derive(Debug, Clone)]
pub enum ImageSource {
    /// airlock's own image, built on first use.
    Builtin,
    /// An image built before by `airlock image build --recipe`.
    Named(String),
    /// A recipe file, built on first use.
    Recipe(Box<crate::image::custom::RecipeFile>),
}

impl ImageSource {
    /// `default`, an image name, or a recipe file's path (`*.toml`, or
    /// anything with a `/`).
    pub fn parse(arg: &str) -> Result<ImageSource> {
        if arg == crate::image::names::DEFAULT_IMAGE {
            return Ok(ImageSource::Builtin);
        }
        if arg.ends_with(".toml") || arg.contains('/') {
            let recipe = crate::image::custom::RecipeFile::load(std::path::Path::new(arg))?;
            return Ok(ImageSource::Recipe(Box::new(recipe)));
        }
        if !crate::image::custom::recipe::is_image_name(arg) {
            anyhow::bail!(
                "--image {arg:?}: name an image (`airlock image list`), `default`, or a recipe file (*.toml)"
            );
        }
        Ok(ImageSource::Named(arg.to_string()))
    }

    /// The name clients choose it by.
    pub fn name(&self) -> &str {
        match self {
            ImageSource::Builtin => crate::image::names::DEFAULT_IMAGE,
            ImageSource::Named(name) => name,
            ImageSource::Recipe(recipe) => &recipe.recipe.name,
        }
    }

    /// The image, built first if its source says so.
    pub fn prepare(&self, cache: &std::path::Path) -> Result<crate::image::Image> {
        match self {
            ImageSource::Builtin => Ok(crate::image::ensure(cache)?.0),
            ImageSource::Recipe(recipe) => Ok(crate::image::custom::ensure(cache, recipe)?.0),
            ImageSource::Named(name) => crate::image::names::lookup(cache, name)?.with_context(|| {
                format!(
                    "no image named {name:?} in {}: build it with `airlock image build --recipe FILE`",
                    cache.display()
                )
            }),
        }
    }
}

struct Recipe {
    source: ImageSource,
    cache: PathBuf,
    airlock_exe: PathBuf,
    shape: TemplateShape,
    pool_size: usize,
    pool_max: usize,
    options: StartOptions,
}

/// Every image served, the first being the default.
pub struct LazyPool {
    images: Vec<ImagePool>,
}

impl LazyPool {
    /// Starts preparing each image, its template and its pool of
    /// `pool_size` sandboxes of `shape` (growing with demand to `pool_max`)
    /// in the background. No image means the built-in one.
    pub fn start(
        images: Vec<ImageSource>,
        cache: PathBuf,
        airlock_exe: PathBuf,
        shape: TemplateShape,
        pool_size: usize,
        pool_max: usize,
        options: StartOptions,
    ) -> Result<LazyPool> {
        let mut sources = images;
        if sources.is_empty() {
            sources.push(ImageSource::Builtin);
        }
        let mut seen = std::collections::BTreeSet::new();
        for source in &sources {
            if !seen.insert(source.name().to_string()) {
                anyhow::bail!("the image {:?} is served twice", source.name());
            }
        }
        let images = sources
            .into_iter()
            .map(|source| {
                ImagePool::start(
                    source,
                    cache.clone(),
                    airlock_exe.clone(),
                    shape,
                    pool_size,
                    pool_max,
                    options.clone(),
                )
            })
            .collect();
        Ok(LazyPool { images })
    }

    /// The names of the images served, the default first.
    pub fn image_names(&self) -> Vec<String> {
        self.images
            .iter()
            .map(|i| i.recipe.source.name().to_string())
            .collect()
    }

    fn find(&self, image: Option<&str>) -> Result<&ImagePool> {
        let Some(name) = image else {
            return self.images.first().context("this server serves no image");
        };
        self.images
            .iter()
            .find(|i| i.recipe.source.name() == name)
            .with_context(|| {
                format!(
                    "this server does not serve the image {name:?}; it serves {}",
                    self.image_names().join(", ")
                )
            })
    }

    /// Whether the default image or its template is still being made.
    pub fn is_preparing(&self) -> bool {
        self.images.first().is_some_and(ImagePool::is_preparing)
    }

    /// Whether sandboxes can be made now (for /healthz): failed if any
    /// image failed, preparing if any is, else ready.
    pub fn status(&self) -> (&'static str, Option<String>) {
        let mut preparing = false;
        for image in &self.images {
            match image.status() {
                ("failed", message) => {
                    let name = image.recipe.source.name();
                    return (
                        "failed",
                        Some(format!("image {name}: {}", message.unwrap_or_default())),
                    );
                }
                ("preparing", _) => preparing = true,
                _ => {}
            }
        }
        if preparing {
            ("preparing", None)
        } else {
            ("ready", None)
        }
    }
}

/// One image's warm pool, once the image and the template exist.
struct ImagePool {
    state: watch::Sender<Readiness>,
    recipe: Arc<Recipe>,
    closed: Arc<AtomicBool>,
}

impl ImagePool {
    fn start(
        source: ImageSource,
        cache: PathBuf,
        airlock_exe: PathBuf,
        shape: TemplateShape,
        pool_size: usize,
        pool_max: usize,
        options: StartOptions,
    ) -> ImagePool {
        let (state, _) = watch::channel(Readiness::Preparing);
        let lazy = ImagePool {
            state,
            recipe: Arc::new(Recipe {
                source,
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
                    tracing::error!(image = recipe.source.name(), err = %message, "cannot prepare sandboxes");
                    tx.send_replace(Readiness::Failed(message, Instant::now()));
                    return;
                }
            };
            if !closed.load(Ordering::SeqCst) {
                tracing::info!(
                    image = recipe.source.name(),
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
    fn is_preparing(&self) -> bool {
        matches!(*self.state.borrow(), Readiness::Preparing)
    }

    /// Whether sandboxes can be made now.
    fn status(&self) -> (&'static str, Option<String>) {
        match &*self.state.borrow() {
            Readiness::Preparing => ("preparing", None),
            Readiness::Ready(_) => ("ready", None),
            Readiness::Failed(message, _) => ("failed", Some(message.clone())),
        }
    }
}

async fn prepare(recipe: &Recipe) -> Result<Arc<WarmPool>> {
    let image_cache = recipe.cache.clone();
    let source = recipe.source.clone();
    // Builds the image if missing (minutes, once), with progress on stderr.
    let image = tokio::task::spawn_blocking(move || source.prepare(&image_cache))
        .await
        .context("the image task failed")?
        .with_context(|| format!("cannot prepare the guest image {}", recipe.source.name()))?;
    let shape = TemplateShape::of(&image, recipe.shape);
    let template = crate::template::ensure(&recipe.cache, &image, shape, &recipe.airlock_exe)
        .await
        .context("cannot prepare the warm template")?;
    tracing::info!(image = image.name(), template = %template.dir.display(), "warm template ready");
    Ok(WarmPool::start(
        template,
        recipe.airlock_exe.clone(),
        recipe.options.clone(),
        recipe.pool_size,
        recipe.pool_max,
    ))
}

impl ImagePool {
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

impl Provider for LazyPool {
    type Sandbox = Sandbox;

    async fn take(&self, image: Option<&str>) -> Result<Sandbox> {
        self.find(image)?.pool().await?.take().await
    }

    async fn ready(&self) -> usize {
        let mut ready = 0;
        for image in &self.images {
            ready += image.ready().await;
        }
        ready
    }

    async fn resume(&self, saved: &SavedSandbox) -> Result<Sandbox> {
        let image = self.find(Some(&saved.image)).with_context(|| {
            format!(
                "the sandbox runs the image {:?}: serve it too (--image {}) to resume it",
                saved.image, saved.image
            )
        })?;
        image.pool().await?.resume(saved).await
    }

    fn load_saved(&self, name: &str) -> Result<SavedSandbox> {
        let image = self.images.first().context("this server serves no image")?;
        let root = image
            .recipe
            .options
            .staging_root
            .as_deref()
            .context("this server keeps no paused sandboxes")?;
        SavedSandbox::load(root, name)
    }

    async fn close(&self) {
        for image in &self.images {
            image.close().await;
        }
    }
}

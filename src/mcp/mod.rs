//! The MCP gateway: airlock's tools served over stdio (one conversation, one
//! sandbox) or Streamable HTTP (one sandbox per session, or per explicit
//! sandbox id for sessionless clients), on rmcp.
//!
//! - [`tools`]: the tool server (argument checks, result shaping).
//! - [`backend`]: the warm pool, prepared in the background.
//! - [`session`]: HTTP sessions whose close destroys their sandbox.
//! - [`auth`]: bearer tokens and principals.
//! - [`http`]: the HTTP app (`/mcp`, `/healthz`, `/metrics`).
//! - [`resources`]: sandbox files as MCP resources.
//! - [`logging`]: each session's log level and the messages about its sandboxes.

pub mod admission;
pub mod auth;
pub mod backend;
pub mod http;
pub mod logging;
pub mod resources;
pub mod session;
pub mod tools;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use rmcp::ServiceExt;

use crate::metrics::Metrics;
use crate::sandbox::registry::Limits;
use crate::template::TemplateShape;

/// The registry of the gateway's sandboxes.
pub type Registry = crate::sandbox::registry::Registry<backend::LazyPool>;

/// Warm sandboxes kept ready, by mode.
pub const DEFAULT_POOL_SIZE_STDIO: usize = 1;
pub const DEFAULT_POOL_SIZE_HTTP: usize = 2;

/// Everything `airlock serve` was asked for.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// The images served (`--image`: names or recipe files), the first
    /// being the default; none: the built-in image.
    pub images: Vec<String>,
    /// Streamable HTTP on this address; stdio when `None`.
    pub http: Option<SocketAddr>,
    pub tokens_file: Option<PathBuf>,
    /// The value of `AIRLOCK_TOKENS`.
    pub tokens_env: Option<String>,
    /// Serve a non-loopback address without tokens.
    pub insecure_no_auth: bool,
    /// Extra Host values accepted (loopback names are always accepted).
    pub allowed_hosts: Vec<String>,
    /// Browser origins accepted beyond loopback ones (requests with any other Origin are refused).
    pub allowed_origins: Vec<String>,
    /// Warm sandboxes kept ready; `None` for the mode's default.
    pub pool_size: Option<usize>,
    /// The most the pool grows to with demand; `None` for the mode's default.
    pub pool_max: Option<usize>,
    pub limits: Limits,
    /// The longest timeout a call may ask for.
    pub max_timeout: Duration,
    /// HTTP mode's bounds on requests and sessions.
    pub http_limits: admission::HttpLimits,
    /// Where paused sandboxes are kept; `None`: `<cache>/sessions`.
    pub state_dir: Option<PathBuf>,
    /// stdio: the name the conversation's sandbox is kept under across runs.
    pub persist: Option<String>,
    /// Pause every sandbox into the store at shutdown (Some(true)), or end
    /// them (Some(false)); `None`: pause over HTTP and with `persist`.
    pub keep_on_shutdown: Option<bool>,
    /// The `--config` file (principals, egress defaults).
    pub config: crate::config::ConfigFile,
    pub egress: crate::egress::EgressArgs,
}

/// Serves until stdin closes (stdio), or SIGINT/SIGTERM; then destroys every
/// sandbox.
pub async fn serve(options: ServeOptions) -> Result<()> {
    let tokens = auth::Tokens::load(
        options.tokens_file.as_deref(),
        options.tokens_env.as_deref(),
    )?
    .merged(
        auth::Tokens::parse(&options.config.token_lines(), "the config file")?,
        "the config file",
    )?;
    let egress = crate::egress::build(&options.egress, &options.config)?;
    if let Some(egress) = &egress {
        tracing::info!(limits = ?egress.limits(), "egress is on: sandboxes reach what the policy allows");
    }
    if let Some(addr) = options.http {
        http::check_bind(addr, &tokens, options.insecure_no_auth)?;
        options.http_limits.validate()?;
    } else if !tokens.is_empty() && options.tokens_file.is_some() {
        tracing::warn!("--tokens-file has no effect in stdio mode");
    }
    if options.limits.idle_timeout.is_zero() || options.limits.max_lifetime.is_zero() {
        bail!("--idle-timeout and --max-lifetime must be more than zero");
    }
    if options.limits.max_sandboxes == 0 || options.limits.max_per_principal == 0 {
        bail!("--max-sandboxes and --max-sandboxes-per-principal must be at least 1");
    }
    raise_open_file_limit();
    let cache = crate::paths::ensure_cache_root()?;
    let exe = std::env::current_exe().context("cannot find the airlock executable")?;
    let shape = TemplateShape::default();
    let pool_size = options.pool_size.unwrap_or(match options.http {
        Some(_) => DEFAULT_POOL_SIZE_HTTP,
        None => DEFAULT_POOL_SIZE_STDIO,
    });
    // One conversation over stdio: nothing to grow for.
    let pool_max = options
        .pool_max
        .unwrap_or(match options.http {
            Some(_) => crate::sandbox::pool::DEFAULT_POOL_MAX,
            None => pool_size,
        })
        .min(options.limits.max_sandboxes)
        .max(pool_size);
    let keep = options
        .keep_on_shutdown
        .unwrap_or(options.http.is_some() || options.persist.is_some());
    if keep && options.http.is_none() && options.persist.is_none() {
        bail!(
            "--on-shutdown pause over stdio needs --persist NAME: it names the sandbox the next run takes up"
        );
    }
    let store = open_store(&options, &cache)?;
    let start = crate::sandbox::StartOptions {
        staging_root: Some(store.root().to_path_buf()),
        egress: egress.clone(),
        ..Default::default()
    };
    let sources = options
        .images
        .iter()
        .map(|arg| backend::ImageSource::parse(arg))
        .collect::<Result<Vec<_>>>()?;
    let backend = Arc::new(backend::LazyPool::start(
        sources, cache, exe, shape, pool_size, pool_max, start,
    )?);
    let served_images = backend.image_names();
    for (principal, section) in &options.config.principals {
        for image in section.images.iter().flatten() {
            if !served_images.contains(image) {
                bail!(
                    "principal {principal} may use the image {image:?}, which this server does not serve (--image); it serves {}",
                    served_images.join(", ")
                );
            }
        }
    }
    let metrics = Arc::new(Metrics::new());
    let mut limits = options.limits.clone();
    limits.principals = Arc::new(options.config.principal_limits()?);
    let registry = Registry::start_durable(
        backend.clone(),
        limits,
        shape.memory_mib,
        metrics,
        store.store.clone(),
        keep,
    )?;
    let call_limits = tools::CallLimits {
        max_timeout: options.max_timeout,
        vcpus: shape.vcpus,
        memory_mib: shape.memory_mib,
        egress: egress.clone(),
    };
    let served = match options.http {
        Some(addr) => {
            let app = http::App {
                registry: registry.clone(),
                backend,
                tokens,
                call_limits,
                egress,
            };
            http::serve(addr, app, &options).await
        }
        None => serve_stdio(registry.clone(), call_limits).await,
    };
    tracing::info!("shutting down: destroying every sandbox");
    registry.shutdown().await;
    drop(registry);
    drop(store);
    served
}

/// The registry's store: where sandboxes are paused to and checkpoints
/// kept, with the database that names them.
///
/// - `--persist NAME` (stdio): `persist-NAME` under the state directory,
///   taken up by the next run with the same name.
/// - HTTP: `http-<address>-<port>`, taken up by the next server on the
///   same address, so sandbox ids outlive a restart.
/// - Otherwise (stdio, or HTTP on port 0): `run-<random>`, this run's
///   alone, removed at exit.
///
/// A store is held by one server at a time.
struct ServerStore {
    store: Arc<crate::sandbox::registry::Store>,
    /// Removed when the server exits.
    ephemeral: bool,
}

impl ServerStore {
    fn root(&self) -> &std::path::Path {
        self.store.root()
    }
}

impl Drop for ServerStore {
    fn drop(&mut self) {
        if self.ephemeral
            && let Err(err) = std::fs::remove_dir_all(self.store.root())
        {
            tracing::warn!(dir = %self.store.root().display(), %err, "cannot remove the state directory");
        }
    }
}

fn open_store(options: &ServeOptions, cache: &std::path::Path) -> Result<ServerStore> {
    let state_dir = options
        .state_dir
        .clone()
        .unwrap_or_else(|| cache.join("sessions"));
    let (name, ephemeral) = match (&options.persist, options.http) {
        (Some(_), Some(_)) => bail!(
            "--persist is for stdio mode; over HTTP, sandboxes are kept per listening address and found again by their sandbox ids"
        ),
        (Some(name), None) => {
            let valid = !name.is_empty()
                && name.len() <= 64
                && name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
            if !valid {
                bail!("--persist {name:?}: use 1 to 64 letters, digits, '-' or '_'");
            }
            (format!("persist-{name}"), false)
        }
        (None, Some(addr)) if addr.port() != 0 => {
            let host: String = addr
                .ip()
                .to_string()
                .chars()
                .map(|c| {
                    if c.is_ascii_alphanumeric() || c == '.' {
                        c
                    } else {
                        '_'
                    }
                })
                .collect();
            (format!("http-{host}-{}", addr.port()), false)
        }
        (None, _) => {
            // stdio, or HTTP on a port the system picks: no later run can
            // name the same address, so the state is this run's alone.
            let mut id = [0u8; 8];
            if !crate::vmm::devices::virtio::rng::fill_random(&mut id) {
                bail!("the host has no entropy for a state directory name");
            }
            let name: String = id.iter().map(|b| format!("{b:02x}")).collect();
            (format!("run-{name}"), true)
        }
    };
    let root = state_dir.join(name);
    let store = crate::sandbox::registry::Store::open(&root)?;
    if !ephemeral {
        // Its paused sandboxes pin their images against `image prune`.
        crate::image::prune::register_state_root(cache, &root)?;
    }
    tracing::info!(dir = %root.display(), pause_after = ?options.limits.pause_after, kept_across_runs = !ephemeral, "sandbox state directory");
    Ok(ServerStore {
        store: Arc::new(store),
        ephemeral,
    })
}

async fn serve_stdio(registry: Arc<Registry>, call_limits: tools::CallLimits) -> Result<()> {
    let server = tools::AirlockServer::new(registry, tools::Mode::Stdio, call_limits);
    let serving = async {
        let running = server
            .serve(rmcp::transport::stdio())
            .await
            .context("the MCP client did not complete the handshake")?;
        running.waiting().await.context("the MCP session failed")?;
        anyhow::Ok(())
    };
    tokio::select! {
        result = serving => {
            tracing::info!("stdin closed");
            result
        }
        signal = shutdown_signal() => {
            tracing::info!("{signal}");
            Ok(())
        }
    }
}

/// Resolves on SIGINT or SIGTERM, naming it.
pub async fn shutdown_signal() -> &'static str {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(err) => {
            tracing::warn!(%err, "cannot watch SIGTERM");
            let _ = tokio::signal::ctrl_c().await;
            return "SIGINT";
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => "SIGINT",
        _ = term.recv() => "SIGTERM",
    }
}

/// Each HTTP connection and each sandbox holds descriptors; the soft limit
/// (often 1024) would turn a burst of connections into accept errors before
/// admission could answer them with 429. The hard limit is the operator's.
fn raise_open_file_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit read and write the struct we pass.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && limit.rlim_cur < limit.rlim_max
        {
            limit.rlim_cur = limit.rlim_max.min(1 << 20);
            if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                tracing::debug!(err = %std::io::Error::last_os_error(), "cannot raise the open-file limit");
            }
        }
    }
}

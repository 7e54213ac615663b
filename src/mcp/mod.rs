//! The MCP gateway: airlock's tools served over stdio (one conversation, one
//! sandbox) or Streamable HTTP (one sandbox per session, or per explicit
//! sandbox id for sessionless clients), on rmcp.
//!
//! - [`tools`]: the tool server (argument checks, result shaping).
//! - [`backend`]: the warm pool, prepared in the background.
//! - [`session`]: HTTP sessions whose close destroys their sandbox.
//! - [`auth`]: bearer tokens and principals.
//! - [`http`]: the HTTP app (`/mcp`, `/healthz`, `/metrics`).

pub mod admission;
pub mod auth;
pub mod backend;
pub mod http;
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
    /// Streamable HTTP on this address; stdio when `None`.
    pub http: Option<SocketAddr>,
    pub tokens_file: Option<PathBuf>,
    /// The value of `AIRLOCK_TOKENS`.
    pub tokens_env: Option<String>,
    /// Serve a non-loopback address without tokens.
    pub insecure_no_auth: bool,
    /// Extra Host values accepted (loopback names are always accepted).
    pub allowed_hosts: Vec<String>,
    /// Browser origins accepted (none by default: requests with an Origin are refused).
    pub allowed_origins: Vec<String>,
    /// Warm sandboxes kept ready; `None` for the mode's default.
    pub pool_size: Option<usize>,
    pub limits: Limits,
    /// The longest timeout a call may ask for.
    pub max_timeout: Duration,
    /// HTTP mode's bounds on requests and sessions.
    pub http_limits: admission::HttpLimits,
    /// Where paused sandboxes are kept; `None`: `<cache>/sessions`.
    pub state_dir: Option<PathBuf>,
    /// stdio: the name the conversation's sandbox is kept under across runs.
    pub persist: Option<String>,
}

/// Serves until stdin closes (stdio), or SIGINT/SIGTERM; then destroys every
/// sandbox.
pub async fn serve(options: ServeOptions) -> Result<()> {
    let tokens = auth::Tokens::load(
        options.tokens_file.as_deref(),
        options.tokens_env.as_deref(),
    )?;
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
    let store = match &options.persist {
        Some(name) => Some(Arc::new(open_persisted(&options, &cache, name)?)),
        None => None,
    };
    let sessions = match store {
        Some(_) => None,
        None => PausedSessions::open(&options, &cache)?,
    };
    let start = crate::sandbox::StartOptions {
        staging_root: match &store {
            Some(store) => Some(store.root().to_path_buf()),
            None => sessions.as_ref().map(|s| s.dir.clone()),
        },
        ..Default::default()
    };
    let backend = Arc::new(backend::LazyPool::start(
        cache, exe, shape, pool_size, start,
    ));
    let metrics = Arc::new(Metrics::new());
    let registry = match store {
        Some(store) => Registry::start_durable(
            backend.clone(),
            options.limits,
            shape.memory_mib,
            metrics,
            store,
            true,
        )?,
        None => Registry::start(backend.clone(), options.limits, shape.memory_mib, metrics),
    };
    let call_limits = tools::CallLimits {
        max_timeout: options.max_timeout,
        vcpus: shape.vcpus,
        memory_mib: shape.memory_mib,
    };
    let served = match options.http {
        Some(addr) => {
            let app = http::App {
                registry: registry.clone(),
                backend,
                tokens,
                call_limits,
            };
            http::serve(addr, app, &options).await
        }
        None => serve_stdio(registry.clone(), call_limits).await,
    };
    tracing::info!("shutting down: destroying every sandbox");
    registry.shutdown().await;
    drop(sessions);
    served
}

/// The store a `--persist NAME` sandbox is kept in: `persist-NAME` under
/// the state directory, one server at a time.
fn open_persisted(
    options: &ServeOptions,
    cache: &std::path::Path,
    name: &str,
) -> Result<crate::sandbox::registry::Store> {
    if options.http.is_some() {
        bail!("--persist is for stdio mode; over HTTP, sessionless sandbox ids name sandboxes");
    }
    let valid = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if !valid {
        bail!("--persist {name:?}: use 1 to 64 letters, digits, '-' or '_'");
    }
    let root = options
        .state_dir
        .clone()
        .unwrap_or_else(|| cache.join("sessions"))
        .join(format!("persist-{name}"));
    let store = crate::sandbox::registry::Store::open(&root)?;
    tracing::info!(dir = %root.display(), "the conversation's sandbox is kept across runs");
    Ok(store)
}

/// This server's directory of paused sandboxes, under --state-dir. Each
/// run has its own (several servers may share a state directory) and
/// removes it at exit: without a durable registry, nothing in it could be
/// found again by a later run.
struct PausedSessions {
    dir: std::path::PathBuf,
}

impl PausedSessions {
    fn open(options: &ServeOptions, cache: &std::path::Path) -> Result<Option<PausedSessions>> {
        if options.limits.pause_after.is_zero() {
            return Ok(None);
        }
        let root = options
            .state_dir
            .clone()
            .unwrap_or_else(|| cache.join("sessions"));
        let mut id = [0u8; 8];
        if !crate::vmm::devices::virtio::rng::fill_random(&mut id) {
            bail!("the host has no entropy for a state directory name");
        }
        let name: String = id.iter().map(|b| format!("{b:02x}")).collect();
        let dir = root.join(format!("run-{name}"));
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("cannot create the state directory {}", dir.display()))?;
        tracing::info!(dir = %dir.display(), pause_after = ?options.limits.pause_after, "idle sandboxes pause to disk");
        Ok(Some(PausedSessions { dir }))
    }
}

impl Drop for PausedSessions {
    fn drop(&mut self) {
        if let Err(err) = std::fs::remove_dir_all(&self.dir) {
            tracing::warn!(dir = %self.dir.display(), %err, "cannot remove the state directory");
        }
    }
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

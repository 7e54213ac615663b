//! HTTP mode: MCP over Streamable HTTP at `/mcp`, plus `/healthz` and
//! Prometheus `/metrics`, behind bearer-token auth and Host/Origin checks.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use axum::Router;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use rmcp::transport::streamable_http_server::session::local::LocalSessionManager;
use rmcp::transport::streamable_http_server::{StreamableHttpServerConfig, StreamableHttpService};
use tokio_util::sync::CancellationToken;

use super::admission::{Admission, SessionOwners, admit};
use super::auth::{Tokens, require_token};
use super::backend::LazyPool;
use super::session::SandboxSessions;
use super::tools::{AirlockServer, CallLimits, MAX_FILE_BYTES, Mode};
use super::{Registry, ServeOptions};
use crate::metrics::Live;

/// Largest request body: a 10 MiB file, base64-encoded (4/3), in JSON.
pub const MAX_REQUEST_BODY: usize = MAX_FILE_BYTES / 3 * 4 + (4 << 20);
/// How long open streams may take to end at shutdown.
const DRAIN: Duration = Duration::from_secs(5);

#[derive(Clone)]
pub struct App {
    pub registry: Arc<Registry>,
    pub backend: Arc<LazyPool>,
    pub tokens: Tokens,
    pub call_limits: CallLimits,
    /// Its metering by principal shows in `/metrics`.
    pub egress: Option<Arc<crate::egress::Egress>>,
}

/// Refuses to expose an unauthenticated server beyond loopback.
pub fn check_bind(addr: SocketAddr, tokens: &Tokens, insecure_no_auth: bool) -> Result<()> {
    if !addr.ip().is_loopback() && tokens.is_empty() && !insecure_no_auth {
        bail!(
            "refusing to serve {addr} without authentication: anyone who can reach it could run code. \
             Give tokens with --tokens-file FILE or AIRLOCK_TOKENS (one `principal:token` per line), \
             bind a loopback address such as 127.0.0.1:8080, or pass --insecure-no-auth if something in \
             front of airlock authenticates callers"
        );
    }
    Ok(())
}

/// Host values accepted: loopback names, the bound address, and `extra`.
fn allowed_hosts(addr: SocketAddr, extra: &[String]) -> Vec<String> {
    let mut hosts: Vec<String> = vec!["localhost".into(), "127.0.0.1".into(), "::1".into()];
    if !addr.ip().is_unspecified() {
        hosts.push(addr.ip().to_string());
    }
    hosts.extend(extra.iter().cloned());
    hosts.sort();
    hosts.dedup();
    hosts
}

/// Browser origins accepted: `extra`, and when bound to loopback, pages
/// served from loopback on any port (the MCP Inspector's UI, local web
/// clients). A page elsewhere cannot reach a loopback server then; one
/// beyond loopback is refused unless named. Tokens are checked either way.
fn allowed_origins(addr: SocketAddr, extra: &[String]) -> Vec<String> {
    let mut origins: Vec<String> = extra.to_vec();
    if addr.ip().is_loopback() {
        for scheme in ["http", "https"] {
            for host in ["localhost", "127.0.0.1", "[::1]"] {
                origins.push(format!("{scheme}://{host}:*"));
            }
        }
    }
    origins.sort();
    origins.dedup();
    origins
}

pub async fn serve(addr: SocketAddr, app: App, options: &ServeOptions) -> Result<()> {
    let stop = CancellationToken::new();
    let hosts = allowed_hosts(addr, &options.allowed_hosts);
    let origins = allowed_origins(addr, &options.allowed_origins);
    let mut sessions = LocalSessionManager::default();
    // A session outlives its sandbox's idle timeout, so that a call after
    // the sandbox expired hears so (instead of "unknown session").
    sessions.session_config.keep_alive = Some(
        (options.limits.idle_timeout * 2)
            .max(Duration::from_secs(30 * 60))
            .max(options.max_timeout + Duration::from_secs(60)),
    );
    let owners = SessionOwners::default();
    let admission = Arc::new(Admission::new(
        options.http_limits,
        owners.clone(),
        app.registry.metrics().clone(),
    ));
    let sessions = Arc::new(SandboxSessions::new(sessions, app.registry.clone(), owners));
    let config = StreamableHttpServerConfig::default()
        .with_legacy_session_mode(true)
        .with_allowed_hosts(hosts.clone())
        .with_allowed_origins(origins)
        .enforce_origin_validation()
        .with_max_request_body_bytes(MAX_REQUEST_BODY)
        .with_cancellation_token(stop.child_token());
    let registry = app.registry.clone();
    let call_limits = app.call_limits.clone();
    // Runs once per session and once per sessionless request: it must stay
    // cheap, and never make a sandbox.
    let service = StreamableHttpService::new(
        move || {
            Ok(AirlockServer::new(
                registry.clone(),
                Mode::Http,
                call_limits.clone(),
            ))
        },
        sessions,
        config,
    );
    let router = Router::new()
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .with_state(app.clone())
        .nest_service("/mcp", service)
        .layer(axum::middleware::from_fn_with_state(admission, admit))
        .layer(axum::middleware::from_fn(delete_answers_no_content))
        .layer(axum::middleware::from_fn_with_state(
            app.tokens.clone(),
            require_token,
        ));
    let listener = listen(addr).with_context(|| format!("cannot listen on {addr}"))?;
    let local = listener.local_addr().unwrap_or(addr);
    let auth = if app.tokens.is_empty() {
        "no auth".to_string()
    } else {
        format!("{} bearer token(s)", app.tokens.len())
    };
    eprintln!(
        "airlock: serving MCP at http://{local}/mcp ({auth}; Host allowed: {})",
        hosts.join(", ")
    );
    tracing::info!(%local, "listening");
    let signalled = CancellationToken::new();
    let on_signal = signalled.clone();
    let stop_sessions = stop.clone();
    let mut server = std::pin::pin!(
        axum::serve(listener, router)
            .with_graceful_shutdown(async move {
                on_signal.cancelled().await;
                stop_sessions.cancel();
            })
            .into_future()
    );
    tokio::select! {
        result = &mut server => return result.context("the HTTP server failed"),
        signal = super::shutdown_signal() => tracing::info!("{signal}"),
    }
    app.registry.stop_accepting();
    signalled.cancel();
    // Sessions end with the token; give open streams a moment to close.
    if tokio::time::timeout(DRAIN, &mut server).await.is_err() {
        tracing::warn!("some HTTP connections were still open after {DRAIN:?}; closing them");
    }
    Ok(())
}

/// Connections waiting to be accepted. A burst of connections past the
/// backlog has its SYNs dropped and retried seconds later, which would make
/// one tenant's flood delay every other tenant's connect; admission answers
/// the flood with 429s only once it is accepted. (The kernel caps this at
/// net.core.somaxconn.)
const LISTEN_BACKLOG: u32 = 8192;

fn listen(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let socket = match addr {
        SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// A session DELETE succeeds with 204 No Content: rmcp answers 202, which
/// clients such as the Python SDK log as a failed termination.
async fn delete_answers_no_content(
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let is_delete = request.method() == http::Method::DELETE;
    let mut response = next.run(request).await;
    if is_delete && response.status() == http::StatusCode::ACCEPTED {
        *response.status_mut() = http::StatusCode::NO_CONTENT;
    }
    response
}

/// Anyone may ask (no token), so it says ready, preparing or failed and
/// nothing else: why it failed is in the server's log, and counts and
/// versions are for /metrics, behind a token.
async fn healthz(State(app): State<App>) -> Response {
    let (status, _detail) = app.backend.status();
    let body = serde_json::json!({ "status": status });
    let code = if status == "failed" {
        http::StatusCode::SERVICE_UNAVAILABLE
    } else {
        http::StatusCode::OK
    };
    (code, axum::Json(body)).into_response()
}

async fn metrics(State(app): State<App>) -> Response {
    let usage = app.registry.live_usage();
    let live = Live {
        active_sandboxes: app.registry.active() as u64,
        pool_ready: app.registry.pool_ready().await as u64,
        vcpu_seconds: usage.vcpu_seconds,
        memory_gb_seconds: usage.memory_gb_seconds,
        runs: usage.runs,
        snapshots: app.registry.snapshot_usage(None),
    };
    let mut text = app.registry.metrics().render(live);
    let egress = app
        .egress
        .as_ref()
        .map(|e| e.principal_reports())
        .unwrap_or_default();
    crate::egress::traffic::render_metrics(&mut text, &egress);
    (
        [(
            http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        text,
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unauthenticated_public_bind_is_refused() {
        let none = Tokens::default();
        let public: SocketAddr = "0.0.0.0:8080".parse().unwrap();
        let loopback: SocketAddr = "127.0.0.1:8080".parse().unwrap();
        assert!(check_bind(loopback, &none, false).is_ok());
        let err = check_bind(public, &none, false).unwrap_err().to_string();
        assert!(
            err.contains("--insecure-no-auth") && err.contains("--tokens-file"),
            "{err}"
        );
        assert!(check_bind(public, &none, true).is_ok());
        let tokens = Tokens::parse("a:0123456789abcdef0123", "t").unwrap();
        assert!(check_bind(public, &tokens, false).is_ok());
    }

    #[test]
    fn loopback_servers_accept_loopback_origins_only() {
        let loopback: SocketAddr = "127.0.0.1:18080".parse().unwrap();
        let origins = allowed_origins(loopback, &[]);
        for o in [
            "http://localhost:*",
            "http://127.0.0.1:*",
            "http://[::1]:*",
            "https://localhost:*",
        ] {
            assert!(origins.contains(&o.to_string()), "{o}: {origins:?}");
        }
        assert!(!origins.iter().any(|o| o.contains("evil")));
        let public: SocketAddr = "0.0.0.0:8080".parse().unwrap();
        assert!(allowed_origins(public, &[]).is_empty());
        assert_eq!(
            allowed_origins(public, &["https://app.example.com:443".into()]),
            ["https://app.example.com:443"]
        );
    }

    #[test]
    fn body_limit_fits_a_ten_mib_file() {
        let encoded = (10 << 20) / 3 * 4 + 4;
        assert!(MAX_REQUEST_BODY > encoded + 64 * 1024, "{MAX_REQUEST_BODY}");
        let hosts = allowed_hosts("10.1.2.3:80".parse().unwrap(), &["mcp.example.com".into()]);
        assert!(
            hosts.contains(&"10.1.2.3".to_string())
                && hosts.contains(&"mcp.example.com".to_string())
        );
    }
}

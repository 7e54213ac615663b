//! The gateway's egress service: it listens where one VM's guest connections
//! to [`EGRESS_VSOCK_PORT`] arrive, reads each one's proxy request, applies
//! the owning principal's policy, connects, answers and splices.
//!
//! The gateway does the connecting; the VMM process only forwards vsock
//! streams to a Unix socket and has no network of its own.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use airlock_protocol::EGRESS_VSOCK_PORT;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UnixListener, UnixStream};
use tokio::task::JoinHandle;

use super::policy::{Policy, Refusal, Resolver};
use super::request::{self, Method};
use super::splice::{self, SpliceLimits};
use super::traffic::{PrincipalReport, PrincipalTotals, Traffic};

/// How long a client may take to send its request head.
const HEAD_TIMEOUT: Duration = Duration::from_secs(30);
/// How long one upstream connect may take (each resolved address in turn).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Resolving one name.
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long, and for how many bytes, a refused connection is read before
/// it is closed (see `answer`).
const LINGER: Duration = Duration::from_secs(2);
const LINGER_BYTES: usize = 64 * 1024;
/// Denials logged per minute; the rest are counted and summarised.
const DENY_LOGS_PER_MINUTE: u32 = 20;

/// Bounds on one sandbox's egress.
#[derive(Debug, Clone)]
pub struct EgressLimits {
    pub max_connections_per_sandbox: usize,
    pub idle_timeout: Duration,
    /// Shared by all of a sandbox's connections, both ways; `None`: unlimited.
    pub bytes_per_second: Option<u64>,
    /// Per direction per connection: host memory per connection is ~2×.
    pub buffer_bytes: usize,
}

pub const DEFAULT_MAX_CONNECTIONS: usize = 64;
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(120);

impl Default for EgressLimits {
    fn default() -> Self {
        EgressLimits {
            max_connections_per_sandbox: DEFAULT_MAX_CONNECTIONS,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            bytes_per_second: None,
            buffer_bytes: 32 * 1024,
        }
    }
}

/// A policy with the patterns it was made from (to tell a client).
pub struct NamedPolicy {
    pub policy: Policy,
    pub patterns: Vec<String>,
}

/// Patterns named in a sandbox's description of its network.
const PATTERNS_SHOWN: usize = 8;

/// Policies by principal, the limits, and the metering by principal.
pub struct Egress {
    default_policy: Arc<NamedPolicy>,
    principal_policies: BTreeMap<String, Arc<NamedPolicy>>,
    limits: EgressLimits,
    resolver: Arc<dyn Resolver>,
    totals: Mutex<BTreeMap<String, Arc<PrincipalTotals>>>,
    deny_log: DenyLog,
}

/// Whom a VM's egress belongs to, once the registry hands it out.
#[derive(Clone)]
pub struct Binding {
    pub sandbox_id: String,
    pub principal: String,
    pub traffic: Arc<Traffic>,
    /// Where its denials are told to its owner.
    pub events: Option<crate::sandbox::registry::EventFeed>,
}

type BindingSlot = Arc<Mutex<Option<Binding>>>;

/// One VM's egress listener; dropping it stops listening (connections in
/// flight end with the VM, which closes their streams).
pub struct Attachment {
    binding: BindingSlot,
    task: JoinHandle<()>,
    path: PathBuf,
}

impl Attachment {
    /// The guest's connections from now on belong to `binding`.
    pub fn bind(&self, binding: Binding) {
        *lock(&self.binding) = Some(binding);
    }
}

impl Drop for Attachment {
    fn drop(&mut self) {
        self.task.abort();
        let _ = std::fs::remove_file(&self.path);
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The Unix socket where the VMM whose vsock socket is in `run_dir`
/// forwards the guest's egress connections.
pub fn socket_path(run_dir: &Path) -> PathBuf {
    run_dir.join(format!("vsock.sock_{EGRESS_VSOCK_PORT}"))
}

impl std::fmt::Debug for Egress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Egress")
            .field("principal_policies", &self.principal_policies.len())
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}

impl Egress {
    pub fn new(
        default_policy: NamedPolicy,
        principal_policies: BTreeMap<String, NamedPolicy>,
        limits: EgressLimits,
        resolver: Arc<dyn Resolver>,
    ) -> Egress {
        Egress {
            default_policy: Arc::new(default_policy),
            principal_policies: principal_policies
                .into_iter()
                .map(|(k, v)| (k, Arc::new(v)))
                .collect(),
            limits,
            resolver,
            totals: Mutex::default(),
            deny_log: DenyLog::default(),
        }
    }

    /// Whether any principal may reach anything: otherwise no guest gets a
    /// relay, and proxied connections are refused inside the guest.
    pub fn enabled(&self) -> bool {
        !self.default_policy.policy.allows_nothing()
            || self
                .principal_policies
                .values()
                .any(|p| !p.policy.allows_nothing())
    }

    pub fn limits(&self) -> &EgressLimits {
        &self.limits
    }

    fn policy_for(&self, principal: &str) -> Arc<NamedPolicy> {
        self.principal_policies
            .get(principal)
            .unwrap_or(&self.default_policy)
            .clone()
    }

    /// What `principal`'s sandboxes can reach, in a sentence for a model.
    pub fn describe(&self, principal: &str) -> String {
        let named = self.policy_for(principal);
        if named.policy.allows_nothing() {
            return "no network (the egress policy allows nothing for this client)".into();
        }
        let mut shown: Vec<&str> = (named.patterns.iter())
            .take(PATTERNS_SHOWN)
            .map(String::as_str)
            .collect();
        let more = named.patterns.len().saturating_sub(PATTERNS_SHOWN);
        let more = if more > 0 {
            format!(" and {more} more")
        } else {
            String::new()
        };
        shown.sort_unstable();
        format!(
            "network only through the egress proxy (HTTP and HTTPS, set in the environment) to {}{more}; anything else is refused",
            shown.join(", ")
        )
    }

    fn totals_for(&self, principal: &str) -> Arc<PrincipalTotals> {
        lock(&self.totals)
            .entry(principal.to_string())
            .or_default()
            .clone()
    }

    /// Metering by principal, for `/metrics`.
    pub fn principal_reports(&self) -> Vec<(String, PrincipalReport)> {
        lock(&self.totals)
            .iter()
            .map(|(p, t)| (p.clone(), t.report()))
            .collect()
    }

    /// Listens for the guest connections of the VM whose run directory is
    /// `run_dir` (the VMM must be started with the forward).
    pub fn attach(self: &Arc<Self>, run_dir: &Path) -> std::io::Result<Attachment> {
        let path = socket_path(run_dir);
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path)?;
        // The jailed VMM runs as another user; only it can see this
        // directory (its own mount namespace holds nothing else).
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666))?;
        let binding: BindingSlot = Arc::default();
        let task = tokio::spawn(self.clone().accept_loop(listener, binding.clone()));
        Ok(Attachment {
            binding,
            task,
            path,
        })
    }

    async fn accept_loop(self: Arc<Self>, listener: UnixListener, binding: BindingSlot) {
        loop {
            let stream = match listener.accept().await {
                Ok((stream, _)) => stream,
                Err(err) => {
                    // Out of descriptors: back off rather than spin.
                    tracing::warn!(%err, "egress: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let bound = lock(&binding).clone();
            tokio::spawn(self.clone().serve(stream, bound));
        }
    }

    async fn serve(self: Arc<Self>, mut stream: UnixStream, binding: Option<Binding>) {
        let Some(binding) = binding else {
            // A pooled VM not handed to anyone yet has no user code running.
            let body = "blocked by airlock egress policy: this sandbox has no owner yet";
            answer(&mut stream, request::reply(403, "Forbidden", body)).await;
            return;
        };
        let totals = self.totals_for(&binding.principal);
        let traffic = binding.traffic.clone();
        let deny = |why: &str| {
            let tell = traffic.denied();
            totals
                .denied
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            self.deny_log.note(&binding, why);
            if let Some(events) = binding.events.as_ref().filter(|_| tell) {
                events.emit(
                    &binding.sandbox_id,
                    crate::sandbox::registry::SandboxEvent::EgressDenied {
                        why: why.to_string(),
                    },
                );
            }
        };
        let limit = self.limits.max_connections_per_sandbox;
        let Some(_slot) = traffic.try_open(limit) else {
            deny("connection limit");
            let body = format!(
                "airlock egress: this sandbox already has {limit} connections open (the limit); close some and retry"
            );
            answer(&mut stream, request::reply(429, "Too Many Requests", &body)).await;
            return;
        };
        let head = tokio::time::timeout(HEAD_TIMEOUT, request::read_request(&mut stream)).await;
        let (req, leftover) = match head {
            Ok(Ok(parsed)) => parsed,
            Ok(Err(err)) => {
                if let Some((status, reason)) = err.status() {
                    deny("bad request");
                    let body = format!("airlock egress: {err}");
                    answer(&mut stream, request::reply(status, reason, &body)).await;
                }
                return;
            }
            Err(_) => {
                deny("request head timeout");
                let body = "airlock egress: the request head did not arrive in time";
                answer(&mut stream, request::reply(408, "Request Timeout", body)).await;
                return;
            }
        };
        let upstream = match self.open_upstream(&binding, &req.host, req.port).await {
            Ok(upstream) => upstream,
            Err(Failure::Refused(refusal)) => {
                deny(&refusal.to_string());
                let body = format!("blocked by airlock egress policy: {refusal}");
                answer(&mut stream, request::reply(403, "Forbidden", &body)).await;
                return;
            }
            Err(Failure::Unreachable(why)) => {
                // Allowed, but not there: not a denial.
                let body = format!("airlock egress: {why}");
                answer(&mut stream, request::reply(502, "Bad Gateway", &body)).await;
                return;
            }
        };
        traffic.allowed();
        totals
            .allowed
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let first = match req.method {
            Method::Connect => {
                if stream
                    .write_all(&request::connect_established())
                    .await
                    .is_err()
                {
                    return;
                }
                leftover
            }
            Method::Forward => {
                let mut first = req.upstream_head;
                first.extend_from_slice(&leftover);
                first
            }
        };
        let limits = SpliceLimits {
            idle_timeout: self.limits.idle_timeout,
            buffer_bytes: self.limits.buffer_bytes,
        };
        let rate = traffic.rate(self.limits.bytes_per_second);
        let report = splice::splice(stream, upstream, &first, &limits, &traffic.bytes, rate).await;
        totals
            .bytes_out
            .fetch_add(report.to_upstream, std::sync::atomic::Ordering::Relaxed);
        totals
            .bytes_in
            .fetch_add(report.from_upstream, std::sync::atomic::Ordering::Relaxed);
        tracing::debug!(
            sandbox = %binding.sandbox_id,
            host = %req.host,
            port = req.port,
            out = report.to_upstream,
            r#in = report.from_upstream,
            end = ?report.end,
            "egress: connection ended"
        );
    }

    /// Decides, resolves (off the runtime: getaddrinfo blocks) and connects
    /// to the first vetted address that answers.
    async fn open_upstream(
        &self,
        binding: &Binding,
        host: &str,
        port: u16,
    ) -> Result<TcpStream, Failure> {
        let named = self.policy_for(&binding.principal);
        let resolver = self.resolver.clone();
        let asked = host.to_string();
        let decided = tokio::time::timeout(
            RESOLVE_TIMEOUT,
            tokio::task::spawn_blocking(move || named.policy.decide(&asked, port, &*resolver)),
        )
        .await;
        let addrs: Vec<SocketAddr> = match decided {
            Ok(Ok(Ok(addrs))) => addrs,
            Ok(Ok(Err(refusal))) if refusal.is_policy() => return Err(Failure::Refused(refusal)),
            Ok(Ok(Err(refusal))) => return Err(Failure::Unreachable(refusal.to_string())),
            Ok(Err(join)) => return Err(Failure::Unreachable(format!("resolver failed: {join}"))),
            Err(_) => {
                return Err(Failure::Unreachable(format!(
                    "{host} did not resolve within {RESOLVE_TIMEOUT:?}"
                )));
            }
        };
        let mut last_error = String::from("no address");
        for addr in addrs {
            match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr)).await {
                Ok(Ok(stream)) => {
                    let _ = stream.set_nodelay(true);
                    return Ok(stream);
                }
                Ok(Err(err)) => last_error = format!("{addr}: {err}"),
                Err(_) => last_error = format!("{addr}: no answer within {CONNECT_TIMEOUT:?}"),
            }
        }
        Err(Failure::Unreachable(format!(
            "cannot connect to {host}:{port} ({last_error})"
        )))
    }
}

/// Sends a refusal and closes. The guest's request may not have been read
/// (or not all of it): a Unix socket closed with unread bytes resets its
/// peer, and the VMM would drop the answer with it, so what arrives is read
/// and discarded for a moment first (bounded in bytes and time).
async fn answer(stream: &mut UnixStream, reply: Vec<u8>) {
    if stream.write_all(&reply).await.is_err() {
        return;
    }
    let _ = stream.shutdown().await;
    let drain = async {
        let mut buf = [0u8; 4096];
        let mut left = LINGER_BYTES;
        while left > 0 {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => left = left.saturating_sub(n),
            }
        }
    };
    let _ = tokio::time::timeout(LINGER, drain).await;
}

enum Failure {
    Refused(Refusal),
    Unreachable(String),
}

/// Logs denials, at most [`DENY_LOGS_PER_MINUTE`] a minute; the rest are
/// counted and the count logged when the next minute starts.
#[derive(Default)]
struct DenyLog {
    window: Mutex<Option<(Instant, u32, u64)>>,
}

impl DenyLog {
    fn note(&self, binding: &Binding, why: &str) {
        let mut window = lock(&self.window);
        let now = Instant::now();
        let (start, logged, suppressed) = window.get_or_insert((now, 0, 0));
        if now.duration_since(*start) >= Duration::from_secs(60) {
            if *suppressed > 0 {
                tracing::warn!(
                    suppressed = *suppressed,
                    "egress: more denials in the last minute were not logged"
                );
            }
            (*start, *logged, *suppressed) = (now, 0, 0);
        }
        if *logged < DENY_LOGS_PER_MINUTE {
            *logged += 1;
            tracing::warn!(
                sandbox = %binding.sandbox_id,
                principal = %binding.principal,
                why,
                "egress: connection denied"
            );
        } else {
            *suppressed += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A refusal written while the client's request is still unread must
    /// reach the client whole: closing a Unix socket with unread bytes
    /// resets the peer, which is how the VMM lost such answers.
    #[tokio::test]
    async fn a_refusal_reaches_a_client_whose_request_was_not_read() {
        let (mut server, mut client) = UnixStream::pair().unwrap();
        client
            .write_all(b"CONNECT allowed.test:443 HTTP/1.1\r\nHost: allowed.test:443\r\n\r\n")
            .await
            .unwrap();
        let reply = request::reply(429, "Too Many Requests", "limit");
        let expected = reply.clone();
        let answering = tokio::spawn(async move { answer(&mut server, reply).await });
        let mut got = Vec::new();
        client.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, expected);
        drop(client);
        answering.await.unwrap();
    }
}

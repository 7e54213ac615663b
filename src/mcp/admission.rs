//! Admission in HTTP mode: how much one principal and the whole server may
//! hold at once, and who owns each session.
//!
//! - Concurrent requests are bounded per principal, then globally; past
//!   either the caller gets 429 with `Retry-After`, so one tenant flooding
//!   the server cannot crowd out another. A request counts until its
//!   response (a tool call's event stream) ends; a session's standalone GET
//!   stream counts only while it opens, its number being bounded by the
//!   sessions cap.
//! - Request bodies being received are bounded in bytes, server-wide.
//! - Every request has a deadline, its response stream included.
//! - A session belongs to the principal that opened it: another token
//!   presenting its id hears "no such session", so it can neither attach,
//!   call, cancel nor DELETE it. Open sessions per principal are capped.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::auth::Principal;
use super::http::MAX_REQUEST_BODY;
use crate::metrics::Metrics;

pub const DEFAULT_MAX_REQUESTS: usize = 256;
pub const DEFAULT_MAX_REQUESTS_PER_PRINCIPAL: usize = 32;
pub const DEFAULT_MAX_SESSIONS_PER_PRINCIPAL: usize = 64;
pub const DEFAULT_MAX_INFLIGHT_BODY_MIB: usize = 256;
/// What a request may take beyond the longest tool timeout.
pub const REQUEST_SLACK: Duration = Duration::from_secs(120);
/// Told to callers refused for load; the limits free up as calls end.
const RETRY_AFTER_SECS: u64 = 1;
/// Body bytes are counted in KiB so that the semaphore's u32 permits reach
/// any sane budget.
const BODY_UNIT: usize = 1024;

const SESSION_HEADER: &str = "mcp-session-id";
const PROTOCOL_HEADER: &str = "mcp-protocol-version";

#[derive(Debug, Clone, Copy)]
pub struct HttpLimits {
    pub max_requests: usize,
    pub max_requests_per_principal: usize,
    pub max_sessions_per_principal: usize,
    pub max_inflight_body_bytes: usize,
    /// Bound on a whole request, its response stream included.
    pub request_timeout: Duration,
}

impl HttpLimits {
    /// The defaults, with requests bounded by the longest tool timeout.
    pub fn for_max_timeout(max_timeout: Duration) -> HttpLimits {
        HttpLimits {
            max_requests: DEFAULT_MAX_REQUESTS,
            max_requests_per_principal: DEFAULT_MAX_REQUESTS_PER_PRINCIPAL,
            max_sessions_per_principal: DEFAULT_MAX_SESSIONS_PER_PRINCIPAL,
            max_inflight_body_bytes: DEFAULT_MAX_INFLIGHT_BODY_MIB << 20,
            request_timeout: max_timeout + REQUEST_SLACK,
        }
    }

    pub fn validate(&self) -> anyhow::Result<()> {
        if self.max_requests == 0
            || self.max_requests_per_principal == 0
            || self.max_sessions_per_principal == 0
        {
            anyhow::bail!(
                "--max-requests, --max-requests-per-principal and --max-sessions-per-principal must be at least 1"
            );
        }
        if self.max_inflight_body_bytes < MAX_REQUEST_BODY {
            anyhow::bail!(
                "--max-inflight-body-mib must allow one largest request ({} MiB)",
                MAX_REQUEST_BODY.div_ceil(1 << 20)
            );
        }
        Ok(())
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Which principal opened each session, shared with the session manager
/// (which forgets a session when it closes).
#[derive(Clone, Default)]
pub struct SessionOwners(Arc<Mutex<Owners>>);

#[derive(Default)]
struct Owners {
    by_id: HashMap<String, String>,
    /// Open sessions plus initializes under way, per principal.
    per_principal: HashMap<String, usize>,
}

impl Owners {
    fn release(&mut self, principal: &str) {
        if let Some(n) = self.per_principal.get_mut(principal) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.per_principal.remove(principal);
            }
        }
    }
}

impl SessionOwners {
    fn owner(&self, id: &str) -> Option<String> {
        lock(&self.0).by_id.get(id).cloned()
    }

    /// Counts an initialize under way, if the principal is below `max`.
    fn reserve(&self, principal: &str, max: usize) -> bool {
        let mut owners = lock(&self.0);
        let n = owners
            .per_principal
            .entry(principal.to_string())
            .or_default();
        if *n >= max {
            return false;
        }
        *n += 1;
        true
    }

    /// The initialize ended: with a session, it now counts as that session.
    fn settle(&self, principal: &str, session: Option<String>) {
        let mut owners = lock(&self.0);
        match session {
            Some(id) => {
                if let Some(previous) = owners.by_id.insert(id, principal.to_string()) {
                    // The manager reused an id: keep one count per session.
                    owners.release(&previous);
                }
            }
            None => owners.release(principal),
        }
    }

    /// The session closed (DELETE, idle expiry, shutdown); repeat calls are harmless.
    pub fn forget(&self, id: &str) {
        let mut owners = lock(&self.0);
        if let Some(principal) = owners.by_id.remove(id) {
            owners.release(&principal);
        }
    }

    pub fn open_sessions(&self, principal: &str) -> usize {
        lock(&self.0)
            .per_principal
            .get(principal)
            .copied()
            .unwrap_or(0)
    }
}

pub struct Admission {
    limits: HttpLimits,
    requests: Arc<Semaphore>,
    body_units: Arc<Semaphore>,
    in_flight: Arc<Mutex<HashMap<String, usize>>>,
    sessions: SessionOwners,
    metrics: Arc<Metrics>,
}

/// One principal's share of the concurrency, returned on drop.
struct PrincipalSlot {
    in_flight: Arc<Mutex<HashMap<String, usize>>>,
    principal: String,
}

impl Drop for PrincipalSlot {
    fn drop(&mut self) {
        let mut in_flight = lock(&self.in_flight);
        if let Some(n) = in_flight.get_mut(&self.principal) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                in_flight.remove(&self.principal);
            }
        }
    }
}

/// What a request holds while it runs.
struct Held {
    _principal: PrincipalSlot,
    _global: OwnedSemaphorePermit,
}

impl Admission {
    pub fn new(limits: HttpLimits, sessions: SessionOwners, metrics: Arc<Metrics>) -> Admission {
        let body_units = (limits.max_inflight_body_bytes / BODY_UNIT).min(Semaphore::MAX_PERMITS);
        Admission {
            limits,
            requests: Arc::new(Semaphore::new(
                limits.max_requests.min(Semaphore::MAX_PERMITS),
            )),
            body_units: Arc::new(Semaphore::new(body_units)),
            in_flight: Arc::new(Mutex::new(HashMap::new())),
            sessions,
            metrics,
        }
    }

    fn take_principal_slot(&self, principal: &str) -> Option<PrincipalSlot> {
        let mut in_flight = lock(&self.in_flight);
        let n = in_flight.entry(principal.to_string()).or_default();
        if *n >= self.limits.max_requests_per_principal {
            return None;
        }
        *n += 1;
        Some(PrincipalSlot {
            in_flight: self.in_flight.clone(),
            principal: principal.to_string(),
        })
    }

    /// The requests `principal` has in flight.
    pub fn in_flight(&self, principal: &str) -> usize {
        lock(&self.in_flight).get(principal).copied().unwrap_or(0)
    }

    fn refuse(&self, label: &'static str, message: String) -> Response {
        self.metrics.http_refused(label);
        (
            http::StatusCode::TOO_MANY_REQUESTS,
            [(http::header::RETRY_AFTER, RETRY_AFTER_SECS.to_string())],
            format!("airlock: {message}; retry after {RETRY_AFTER_SECS} s\n"),
        )
            .into_response()
    }
}

fn no_such_session() -> Response {
    (
        http::StatusCode::NOT_FOUND,
        "airlock: no such session; start a new one with initialize\n",
    )
        .into_response()
}

/// Axum middleware for `/mcp` (after authentication, which put the
/// [`Principal`] in the request's extensions).
pub async fn admit(
    State(admission): State<Arc<Admission>>,
    request: Request,
    next: Next,
) -> Response {
    let principal = request
        .extensions()
        .get::<Principal>()
        .cloned()
        .unwrap_or_else(Principal::anonymous)
        .0;
    let session = request
        .headers()
        .get(SESSION_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    if let Some(id) = &session
        && admission
            .sessions
            .owner(id)
            .is_some_and(|owner| owner != principal)
    {
        // The same answer as for an id that never existed: ids don't leak.
        return no_such_session();
    }
    let limits = admission.limits;
    let Some(slot) = admission.take_principal_slot(&principal) else {
        return admission.refuse(
            "http_principal_requests",
            format!(
                "this client has {} requests in flight, its limit",
                limits.max_requests_per_principal
            ),
        );
    };
    let Ok(global) = admission.requests.clone().try_acquire_owned() else {
        return admission.refuse(
            "http_requests",
            format!(
                "the server has {} requests in flight, its limit",
                limits.max_requests
            ),
        );
    };
    let held = Held {
        _principal: slot,
        _global: global,
    };
    let declared = request
        .headers()
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|n| n > MAX_REQUEST_BODY) {
        return (
            http::StatusCode::PAYLOAD_TOO_LARGE,
            format!("airlock: a request body may be at most {MAX_REQUEST_BODY} bytes\n"),
        )
            .into_response();
    }
    // A body of unknown length may grow to the largest allowed.
    let body_bytes = match *request.method() {
        http::Method::GET | http::Method::DELETE => declared.unwrap_or(0),
        _ => declared.unwrap_or(MAX_REQUEST_BODY),
    };
    let units = u32::try_from(body_bytes.div_ceil(BODY_UNIT)).unwrap_or(u32::MAX);
    let Ok(body_permit) = admission.body_units.clone().try_acquire_many_owned(units) else {
        return admission.refuse(
            "http_body_bytes",
            "the server is receiving as many request bytes as it allows".to_string(),
        );
    };
    // An initialize: a POST outside any session, before a protocol
    // version was agreed (sessionless requests of later revisions carry one).
    let opens_session = request.method() == http::Method::POST
        && session.is_none()
        && !request.headers().contains_key(PROTOCOL_HEADER);
    if opens_session
        && !admission
            .sessions
            .reserve(&principal, limits.max_sessions_per_principal)
    {
        return admission.refuse(
            "http_sessions",
            format!(
                "this client has {} open sessions, its limit; close one (DELETE /mcp) or let one expire",
                limits.max_sessions_per_principal
            ),
        );
    }
    let method = request.method().clone();
    let deadline = tokio::time::Instant::now() + limits.request_timeout;
    let response = tokio::time::timeout_at(deadline, next.run(request)).await;
    // The body has been read once the response has begun.
    drop(body_permit);
    let response = match response {
        Ok(response) => response,
        Err(_) => {
            if opens_session {
                admission.sessions.settle(&principal, None);
            }
            admission.metrics.http_refused("http_timeout");
            return (
                http::StatusCode::GATEWAY_TIMEOUT,
                format!(
                    "airlock: the request took longer than {:?}\n",
                    limits.request_timeout
                ),
            )
                .into_response();
        }
    };
    if opens_session {
        let opened = response
            .status()
            .is_success()
            .then(|| response.headers().get(SESSION_HEADER))
            .flatten()
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        admission.sessions.settle(&principal, opened);
    }
    if method == http::Method::DELETE
        && response.status().is_success()
        && let Some(id) = &session
    {
        admission.sessions.forget(id);
    }
    if method == http::Method::GET {
        return response;
    }
    // The request counts, and its deadline holds, until its stream ends.
    let (parts, body) = response.into_parts();
    let stream = body
        .into_data_stream()
        .take_until(tokio::time::sleep_until(deadline))
        .map(move |chunk| {
            let _held = &held;
            chunk
        });
    Response::from_parts(parts, Body::from_stream(stream))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sessions_count_per_principal_and_are_forgotten_once() {
        let owners = SessionOwners::default();
        assert!(owners.reserve("a", 2));
        owners.settle("a", Some("s1".into()));
        assert!(owners.reserve("a", 2));
        assert!(!owners.reserve("a", 2), "a reservation counts");
        owners.settle("a", None);
        assert_eq!(owners.open_sessions("a"), 1);
        assert_eq!(owners.owner("s1").as_deref(), Some("a"));
        owners.forget("s1");
        owners.forget("s1");
        assert_eq!(owners.open_sessions("a"), 0);
        assert!(owners.owner("s1").is_none());
    }

    #[test]
    fn the_in_flight_budget_must_fit_one_largest_request() {
        let mut limits = HttpLimits::for_max_timeout(Duration::from_secs(60));
        assert!(limits.validate().is_ok());
        limits.max_inflight_body_bytes = 1 << 20;
        assert!(limits.validate().is_err());
    }

    #[test]
    fn principal_slots_come_back_on_drop() {
        let mut limits = HttpLimits::for_max_timeout(Duration::from_secs(1));
        limits.max_requests_per_principal = 2;
        let admission = Admission::new(limits, SessionOwners::default(), Arc::new(Metrics::new()));
        let a = admission.take_principal_slot("p");
        let b = admission.take_principal_slot("p");
        assert!(a.is_some() && b.is_some());
        assert!(admission.take_principal_slot("p").is_none());
        assert!(
            admission.take_principal_slot("q").is_some(),
            "another principal is not held up"
        );
        drop(a);
        assert_eq!(admission.in_flight("p"), 1);
        assert!(admission.take_principal_slot("p").is_some());
    }
}

//! Which sandbox belongs to which conversation, for how long, and what it has
//! used.
//!
//! - A conversation (the stdio server, or one HTTP session) is bound to one
//!   sandbox, created at its first tool call. Clients without sessions hold
//!   an explicit sandbox id instead (128 random bits), bound to the principal
//!   that created it: another principal presenting the id is refused.
//! - A sandbox idle for longer than the idle timeout, or older than the
//!   maximum lifetime, is destroyed by a reaper; the registry remembers that
//!   it ended and why, so a later call gets a clear "expired" error instead
//!   of a mysterious "not found".
//! - Limits on live sandboxes (global and per principal) refuse new ones with
//!   a clear error; sandboxes being created count too.
//! - Usage per sandbox: vCPU-seconds (CPU time of its VMM process),
//!   memory GB-seconds (configured guest memory × wall time), runs.
//!
//! The registry is generic over where sandboxes come from ([`Provider`]) so
//! its bookkeeping is tested without VMs; the server uses the warm pool.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use tokio::sync::{OwnedRwLockReadGuard, RwLock};
use tokio_util::sync::CancellationToken;

use crate::metrics::{EndReason, Metrics};

pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(15 * 60);
pub const DEFAULT_MAX_LIFETIME: Duration = Duration::from_secs(8 * 3600);
pub const DEFAULT_MAX_SANDBOXES: usize = 32;
pub const DEFAULT_MAX_PER_PRINCIPAL: usize = 8;
/// Ended sandboxes remembered for "expired" errors.
const REMEMBER_ENDED: usize = 10_000;

/// Where sandboxes come from.
pub trait Provider: Send + Sync + 'static {
    type Sandbox: Hosted;
    /// A fresh sandbox, never handed to anyone before.
    fn take(&self) -> impl Future<Output = anyhow::Result<Self::Sandbox>> + Send;
    /// Sandboxes ready to hand out at once.
    fn ready(&self) -> impl Future<Output = usize> + Send;
    /// Stops making sandboxes and destroys the ones not handed out.
    fn close(&self) -> impl Future<Output = ()> + Send;
}

/// A sandbox as the registry sees it.
pub trait Hosted: Send + Sync + 'static {
    /// The VMM process, for CPU accounting.
    fn pid(&self) -> Option<u32>;
    /// Ends it for good (no VMM process left behind).
    fn destroy(self) -> impl Future<Output = ()> + Send;
}

impl Provider for super::pool::WarmPool {
    type Sandbox = super::Sandbox;

    async fn take(&self) -> anyhow::Result<super::Sandbox> {
        super::pool::WarmPool::take(self).await
    }

    async fn ready(&self) -> usize {
        self.ready_count().await
    }

    async fn close(&self) {
        super::pool::WarmPool::close(self).await
    }
}

impl Hosted for super::Sandbox {
    fn pid(&self) -> Option<u32> {
        Some(super::Sandbox::pid(self))
    }

    async fn destroy(self) {
        super::Sandbox::destroy(self).await
    }
}

/// Lifetimes and limits.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub idle_timeout: Duration,
    pub max_lifetime: Duration,
    /// Live sandboxes in all.
    pub max_sandboxes: usize,
    /// Live sandboxes per principal (token).
    pub max_per_principal: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            max_lifetime: DEFAULT_MAX_LIFETIME,
            max_sandboxes: DEFAULT_MAX_SANDBOXES,
            max_per_principal: DEFAULT_MAX_PER_PRINCIPAL,
        }
    }
}

/// A conversation with an implicit sandbox.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Conversation {
    /// The one conversation of a stdio server.
    Stdio,
    /// An HTTP session, by its Mcp-Session-Id.
    Session(String),
}

/// Why a sandbox cannot be had; the messages are meant for the model.
#[derive(Debug, Clone, thiserror::Error)]
pub enum RegistryError {
    #[error("{0}")]
    Expired(String),
    #[error("{0}")]
    Limit(String),
    #[error(
        "no sandbox has id {0:?}; call the tool without sandbox_id to create a new sandbox (its id comes back in the result)"
    )]
    Unknown(String),
    #[error(
        "sandbox {0:?} belongs to another client and cannot be used with this token; call the tool without sandbox_id to create your own"
    )]
    Forbidden(String),
    #[error("the sandbox could not be started: {0}; try again in a moment")]
    Start(String),
    #[error("the server is shutting down; no new sandbox can be started")]
    ShuttingDown,
}

impl RegistryError {
    /// A short label for metrics.
    pub fn label(&self) -> &'static str {
        match self {
            RegistryError::Expired(_) => "expired",
            RegistryError::Limit(_) => "limit",
            RegistryError::Unknown(_) => "unknown",
            RegistryError::Forbidden(_) => "forbidden",
            RegistryError::Start(_) => "start_failed",
            RegistryError::ShuttingDown => "shutting_down",
        }
    }
}

/// What a sandbox has used so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize, schemars::JsonSchema)]
pub struct Usage {
    /// CPU time of the sandbox's VMM process (all its vCPUs and device threads).
    pub vcpu_seconds: f64,
    /// Configured guest memory in GB times the seconds the sandbox has lived.
    pub memory_gb_seconds: f64,
    /// run_code and run_command calls.
    pub runs: u64,
}

/// A snapshot of one sandbox for `sandbox_info`.
#[derive(Debug, Clone)]
pub struct Info {
    pub id: String,
    pub age: Duration,
    pub idle: Duration,
    /// Time until it is destroyed if left idle from now (or reaches its lifetime).
    pub expires_in: Duration,
    pub lifetime_left: Duration,
    pub usage: Usage,
    pub active_calls: usize,
}

struct Slot<S> {
    sandbox: S,
    cancel: CancellationToken,
}

/// One live sandbox and its bookkeeping. Its id stays the same across
/// `reset`, which swaps the VM underneath.
pub struct Handle<S> {
    id: String,
    principal: String,
    slot: Arc<RwLock<Option<Slot<S>>>>,
    /// Cancels the calls running in the current VM (reset, destroy).
    cancel: Mutex<CancellationToken>,
    bound_at: Instant,
    created: Mutex<Instant>,
    last_used: Mutex<Instant>,
    active: AtomicUsize,
    runs: AtomicU64,
    cpu: Mutex<CpuMeter>,
    memory_gb: f64,
    ended: AtomicBool,
}

#[derive(Default)]
struct CpuMeter {
    pid: Option<u32>,
    /// CPU time of `pid` when it was bound.
    base: Duration,
    /// CPU time of the VMs this handle had before a reset.
    before: Duration,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl<S: Hosted> Handle<S> {
    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn principal(&self) -> &str {
        &self.principal
    }

    fn idle(&self, now: Instant) -> Duration {
        if self.active.load(Ordering::SeqCst) > 0 {
            Duration::ZERO
        } else {
            now.saturating_duration_since(*lock(&self.last_used))
        }
    }

    fn age(&self, now: Instant) -> Duration {
        now.saturating_duration_since(*lock(&self.created))
    }

    fn usage(&self) -> Usage {
        let cpu = {
            let meter = lock(&self.cpu);
            let current = meter
                .pid
                .and_then(process_cpu_time)
                .map(|t| t.saturating_sub(meter.base))
                .unwrap_or_default();
            meter.before + current
        };
        Usage {
            vcpu_seconds: cpu.as_secs_f64(),
            memory_gb_seconds: self.memory_gb * self.bound_at.elapsed().as_secs_f64(),
            runs: self.runs.load(Ordering::Relaxed),
        }
    }

    fn set_vm(&self, pid: Option<u32>) {
        let mut meter = lock(&self.cpu);
        let current = meter
            .pid
            .and_then(process_cpu_time)
            .map(|t| t.saturating_sub(meter.base))
            .unwrap_or_default();
        meter.before += current;
        meter.pid = pid;
        meter.base = pid.and_then(process_cpu_time).unwrap_or_default();
    }
}

/// Use of one sandbox by one tool call. While any lease is held the sandbox
/// is not idle; dropping it marks the sandbox used now.
pub struct Lease<S: Hosted> {
    handle: Arc<Handle<S>>,
    guard: OwnedRwLockReadGuard<Option<Slot<S>>>,
    cancel: CancellationToken,
}

impl<S: Hosted> Lease<S> {
    pub fn id(&self) -> &str {
        &self.handle.id
    }

    pub fn sandbox(&self) -> &S {
        // A lease is only made from a slot that holds a sandbox.
        &self
            .guard
            .as_ref()
            .expect("a leased slot holds a sandbox")
            .sandbox
    }

    /// Fires when the sandbox is being reset or destroyed under this call.
    pub fn cancelled(&self) -> tokio_util::sync::WaitForCancellationFuture<'_> {
        self.cancel.cancelled()
    }

    /// Counts one run (run_code, run_command) for usage.
    pub fn count_run(&self) {
        self.handle.runs.fetch_add(1, Ordering::Relaxed);
    }
}

impl<S: Hosted> Drop for Lease<S> {
    fn drop(&mut self) {
        *lock(&self.handle.last_used) = Instant::now();
        self.handle.active.fetch_sub(1, Ordering::SeqCst);
    }
}

#[derive(Debug, Clone)]
struct Ended {
    reason: EndReason,
    after: Duration,
}

struct State<S> {
    handles: HashMap<String, Arc<Handle<S>>>,
    conversations: HashMap<Conversation, Arc<tokio::sync::Mutex<Option<String>>>>,
    ended: HashMap<String, Ended>,
    ended_order: VecDeque<String>,
    /// Sandboxes being created, per principal.
    creating: HashMap<String, usize>,
}

impl<S> State<S> {
    fn live(&self, principal: Option<&str>) -> usize {
        match principal {
            None => self.handles.len() + self.creating.values().sum::<usize>(),
            Some(p) => {
                self.handles.values().filter(|h| h.principal == p).count()
                    + self.creating.get(p).copied().unwrap_or(0)
            }
        }
    }

    fn unreserve(&mut self, principal: &str) {
        if let Some(n) = self.creating.get_mut(principal) {
            *n -= 1;
            if *n == 0 {
                self.creating.remove(principal);
            }
        }
    }

    fn remember(&mut self, id: &str, ended: Ended) {
        if self.ended.insert(id.to_string(), ended).is_none() {
            self.ended_order.push_back(id.to_string());
        }
        while self.ended_order.len() > REMEMBER_ENDED {
            if let Some(old) = self.ended_order.pop_front() {
                self.ended.remove(&old);
            }
        }
    }
}

pub struct Registry<P: Provider> {
    provider: Arc<P>,
    limits: Limits,
    memory_gb: f64,
    metrics: Arc<Metrics>,
    state: Mutex<State<P::Sandbox>>,
    closed: AtomicBool,
    reaper_stop: CancellationToken,
}

impl<P: Provider> Registry<P> {
    /// A registry handing out sandboxes of `memory_mib` guest memory from
    /// `provider`, with a reaper task enforcing `limits`.
    pub fn start(
        provider: Arc<P>,
        limits: Limits,
        memory_mib: u32,
        metrics: Arc<Metrics>,
    ) -> Arc<Self> {
        let registry = Arc::new(Registry {
            provider,
            limits,
            memory_gb: f64::from(memory_mib) / 1024.0,
            metrics,
            state: Mutex::new(State {
                handles: HashMap::new(),
                conversations: HashMap::new(),
                ended: HashMap::new(),
                ended_order: VecDeque::new(),
                creating: HashMap::new(),
            }),
            closed: AtomicBool::new(false),
            reaper_stop: CancellationToken::new(),
        });
        let tick = (limits.idle_timeout.min(limits.max_lifetime) / 5)
            .clamp(Duration::from_millis(200), Duration::from_secs(30));
        let weak = Arc::downgrade(&registry);
        let stop = registry.reaper_stop.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(tick) => {}
                }
                let Some(registry) = weak.upgrade() else {
                    return;
                };
                registry.reap().await;
            }
        });
        registry
    }

    pub fn limits(&self) -> Limits {
        self.limits
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    fn state(&self) -> MutexGuard<'_, State<P::Sandbox>> {
        lock(&self.state)
    }

    /// The conversation's sandbox, created now if it has none yet.
    pub async fn acquire(
        &self,
        conversation: &Conversation,
        principal: &str,
    ) -> Result<Lease<P::Sandbox>, RegistryError> {
        self.check_open()?;
        let binding = self
            .state()
            .conversations
            .entry(conversation.clone())
            .or_default()
            .clone();
        let mut bound = binding.lock().await;
        if let Some(id) = bound.as_ref() {
            return self.lease(id, principal, Some(conversation)).await;
        }
        let handle = self.create(principal).await?;
        *bound = Some(handle.id.clone());
        let still_there = self
            .state()
            .conversations
            .get(conversation)
            .is_some_and(|b| Arc::ptr_eq(b, &binding));
        drop(bound);
        if !still_there {
            // The conversation ended while its sandbox was being made.
            self.end(&handle, EndReason::Closed).await;
            return Err(RegistryError::Expired(
                "the conversation ended while its sandbox was starting".into(),
            ));
        }
        self.lease(&handle.id, principal, Some(conversation)).await
    }

    /// The conversation's sandbox if it has one, without creating it.
    pub async fn existing(
        &self,
        conversation: &Conversation,
        principal: &str,
    ) -> Result<Option<Lease<P::Sandbox>>, RegistryError> {
        let binding = self.state().conversations.get(conversation).cloned();
        let Some(binding) = binding else {
            return Ok(None);
        };
        let id = binding.lock().await.clone();
        match id {
            Some(id) => self
                .lease(&id, principal, Some(conversation))
                .await
                .map(Some),
            None => Ok(None),
        }
    }

    /// A new sandbox with an explicit id, for clients without sessions.
    pub async fn create_explicit(
        &self,
        principal: &str,
    ) -> Result<Lease<P::Sandbox>, RegistryError> {
        self.check_open()?;
        let handle = self.create(principal).await?;
        self.lease(&handle.id, principal, None).await
    }

    /// The sandbox with this explicit id, if `principal` owns it.
    pub async fn get(&self, id: &str, principal: &str) -> Result<Lease<P::Sandbox>, RegistryError> {
        self.check_open()?;
        self.lease(id, principal, None).await
    }

    fn check_open(&self) -> Result<(), RegistryError> {
        if self.closed.load(Ordering::SeqCst) {
            Err(RegistryError::ShuttingDown)
        } else {
            Ok(())
        }
    }

    async fn lease(
        &self,
        id: &str,
        principal: &str,
        conversation: Option<&Conversation>,
    ) -> Result<Lease<P::Sandbox>, RegistryError> {
        let handle = {
            let state = self.state();
            match state.handles.get(id) {
                Some(handle) => handle.clone(),
                None => {
                    return Err(match state.ended.get(id) {
                        Some(ended) => self.expired_error(id, ended, conversation.is_some()),
                        None => RegistryError::Unknown(id.to_string()),
                    });
                }
            }
        };
        if handle.principal != principal {
            return Err(RegistryError::Forbidden(id.to_string()));
        }
        // Expire it now if the reaper has not come round yet.
        if let Some(reason) = self.due(&handle, Instant::now()) {
            self.end(&handle, reason).await;
            let ended = Ended {
                reason,
                after: handle.age(Instant::now()),
            };
            return Err(self.expired_error(id, &ended, conversation.is_some()));
        }
        handle.active.fetch_add(1, Ordering::SeqCst);
        let guard = handle.slot.clone().read_owned().await;
        // The token of the VM this lease holds (a reset may have replaced
        // the VM while we waited).
        let cancel = guard
            .as_ref()
            .map(|slot| slot.cancel.clone())
            .unwrap_or_default();
        let lease = Lease {
            handle: handle.clone(),
            guard,
            cancel,
        };
        if lease.guard.is_none() || handle.ended.load(Ordering::SeqCst) {
            // Destroyed while we waited; the lease's drop undoes the count.
            drop(lease);
            let ended = self.state().ended.get(id).cloned();
            return Err(match ended {
                Some(ended) => self.expired_error(id, &ended, conversation.is_some()),
                None => RegistryError::Expired(format!(
                    "sandbox {id} was shut down; its files and state are gone"
                )),
            });
        }
        Ok(lease)
    }

    fn expired_error(&self, id: &str, ended: &Ended, implicit: bool) -> RegistryError {
        let why = match ended.reason {
            EndReason::Idle => format!(
                "it was idle for longer than the idle timeout ({})",
                fmt_duration(self.limits.idle_timeout)
            ),
            EndReason::Lifetime => format!(
                "it reached the maximum sandbox lifetime ({})",
                fmt_duration(self.limits.max_lifetime)
            ),
            EndReason::Closed => "its conversation was closed".to_string(),
        };
        let next = if implicit {
            "Call reset_sandbox to start a fresh sandbox for this conversation, then recreate any files or variables you need."
        } else {
            "Call the tool without sandbox_id to create a new sandbox, then recreate any files or variables you need."
        };
        RegistryError::Expired(format!(
            "sandbox {id} has expired: {why}, after {} of life. Its files, variables and processes are gone. {next}",
            fmt_duration(ended.after)
        ))
    }

    /// Makes a new handle for `principal`, within the limits.
    async fn create(&self, principal: &str) -> Result<Arc<Handle<P::Sandbox>>, RegistryError> {
        {
            let mut state = self.state();
            if state.live(None) >= self.limits.max_sandboxes {
                self.metrics.refused("global_limit");
                return Err(RegistryError::Limit(format!(
                    "the server is at its limit of {} live sandboxes; try again later, or end sandboxes you no longer need",
                    self.limits.max_sandboxes
                )));
            }
            if state.live(Some(principal)) >= self.limits.max_per_principal {
                self.metrics.refused("principal_limit");
                return Err(RegistryError::Limit(format!(
                    "this client already has {} live sandboxes, its limit; reuse one (pass its sandbox_id) or let an unused one expire ({} idle timeout)",
                    self.limits.max_per_principal,
                    fmt_duration(self.limits.idle_timeout)
                )));
            }
            *state.creating.entry(principal.to_string()).or_default() += 1;
        }
        let taken = self.provider.take().await;
        let sandbox = match taken {
            Ok(sandbox) => sandbox,
            Err(err) => {
                self.state().unreserve(principal);
                self.metrics.restore_failed();
                return Err(RegistryError::Start(format!("{err:#}")));
            }
        };
        let Some(id) = new_id() else {
            self.state().unreserve(principal);
            sandbox.destroy().await;
            return Err(RegistryError::Start(
                "the host has no entropy for a sandbox id".into(),
            ));
        };
        let now = Instant::now();
        let pid = sandbox.pid();
        let cancel = CancellationToken::new();
        let handle = Arc::new(Handle {
            id: id.clone(),
            principal: principal.to_string(),
            slot: Arc::new(RwLock::new(Some(Slot {
                sandbox,
                cancel: cancel.clone(),
            }))),
            cancel: Mutex::new(cancel),
            bound_at: now,
            created: Mutex::new(now),
            last_used: Mutex::new(now),
            active: AtomicUsize::new(0),
            runs: AtomicU64::new(0),
            cpu: Mutex::new(CpuMeter::default()),
            memory_gb: self.memory_gb,
            ended: AtomicBool::new(false),
        });
        handle.set_vm(pid);
        {
            // Counted as live from now on instead of as being created.
            let mut state = self.state();
            state.unreserve(principal);
            state.handles.insert(id.clone(), handle.clone());
        }
        self.metrics.restore();
        tracing::info!(sandbox = %id, %principal, "sandbox bound");
        if self.closed.load(Ordering::SeqCst) {
            self.end(&handle, EndReason::Closed).await;
            return Err(RegistryError::ShuttingDown);
        }
        Ok(handle)
    }

    /// Replaces the conversation's sandbox with a fresh one (creating one if
    /// it had none or it expired). Calls running in the old one are cancelled.
    pub async fn reset_conversation(
        &self,
        conversation: &Conversation,
        principal: &str,
    ) -> Result<Lease<P::Sandbox>, RegistryError> {
        self.check_open()?;
        let binding = self
            .state()
            .conversations
            .entry(conversation.clone())
            .or_default()
            .clone();
        let mut bound = binding.lock().await;
        let current = bound
            .as_ref()
            .and_then(|id| self.state().handles.get(id).cloned());
        match current {
            Some(handle) => {
                drop(bound);
                self.swap(&handle, principal).await?;
                self.lease(&handle.id, principal, Some(conversation)).await
            }
            None => {
                let handle = self.create(principal).await?;
                *bound = Some(handle.id.clone());
                drop(bound);
                self.lease(&handle.id, principal, Some(conversation)).await
            }
        }
    }

    /// Replaces the VM behind an explicit id with a fresh one.
    pub async fn reset_explicit(
        &self,
        id: &str,
        principal: &str,
    ) -> Result<Lease<P::Sandbox>, RegistryError> {
        self.check_open()?;
        // Checks ownership and expiry.
        drop(self.lease(id, principal, None).await?);
        let handle = self.state().handles.get(id).cloned();
        let Some(handle) = handle else {
            return Err(RegistryError::Unknown(id.to_string()));
        };
        self.swap(&handle, principal).await?;
        self.lease(id, principal, None).await
    }

    async fn swap(
        &self,
        handle: &Arc<Handle<P::Sandbox>>,
        principal: &str,
    ) -> Result<(), RegistryError> {
        if handle.principal != principal {
            return Err(RegistryError::Forbidden(handle.id.clone()));
        }
        let fresh = match self.provider.take().await {
            Ok(sandbox) => sandbox,
            Err(err) => {
                self.metrics.restore_failed();
                return Err(RegistryError::Start(format!("{err:#}")));
            }
        };
        self.metrics.restore();
        let cancel = CancellationToken::new();
        let old_cancel = std::mem::replace(&mut *lock(&handle.cancel), cancel.clone());
        old_cancel.cancel();
        let pid = fresh.pid();
        let old = {
            let mut slot = handle.slot.write().await;
            if handle.ended.load(Ordering::SeqCst) {
                drop(slot);
                fresh.destroy().await;
                return Err(RegistryError::Expired(format!(
                    "sandbox {} ended while it was being reset; call reset_sandbox again",
                    handle.id
                )));
            }
            slot.replace(Slot {
                sandbox: fresh,
                cancel,
            })
        };
        handle.set_vm(pid);
        *lock(&handle.created) = Instant::now();
        *lock(&handle.last_used) = Instant::now();
        if let Some(old) = old {
            old.sandbox.destroy().await;
        }
        tracing::info!(sandbox = %handle.id, "sandbox reset");
        Ok(())
    }

    /// The conversation ended (session closed): its sandbox is destroyed.
    /// Calling it again is harmless.
    pub async fn release(&self, conversation: &Conversation) {
        let binding = self.state().conversations.remove(conversation);
        let Some(binding) = binding else { return };
        let id = binding.lock().await.clone();
        let handle = id.and_then(|id| self.state().handles.get(&id).cloned());
        if let Some(handle) = handle {
            self.end(&handle, EndReason::Closed).await;
        }
    }

    /// Facts about one sandbox.
    pub fn info(&self, lease: &Lease<P::Sandbox>) -> Info {
        let handle = &lease.handle;
        let now = Instant::now();
        let age = handle.age(now);
        let lifetime_left = self.limits.max_lifetime.saturating_sub(age);
        Info {
            id: handle.id.clone(),
            age,
            // This call itself holds a lease, so "idle" is the time before it.
            idle: Duration::ZERO,
            expires_in: self.limits.idle_timeout.min(lifetime_left),
            lifetime_left,
            usage: handle.usage(),
            active_calls: handle.active.load(Ordering::SeqCst).saturating_sub(1),
        }
    }

    /// Live sandboxes bound to conversations or ids.
    pub fn active(&self) -> usize {
        self.state().handles.len()
    }

    pub async fn pool_ready(&self) -> usize {
        self.provider.ready().await
    }

    /// Usage of the live sandboxes, summed.
    pub fn live_usage(&self) -> Usage {
        let handles: Vec<_> = self.state().handles.values().cloned().collect();
        handles
            .iter()
            .map(|h| h.usage())
            .fold(Usage::default(), |a, u| Usage {
                vcpu_seconds: a.vcpu_seconds + u.vcpu_seconds,
                memory_gb_seconds: a.memory_gb_seconds + u.memory_gb_seconds,
                runs: a.runs + u.runs,
            })
    }

    fn due(&self, handle: &Handle<P::Sandbox>, now: Instant) -> Option<EndReason> {
        if handle.age(now) >= self.limits.max_lifetime {
            Some(EndReason::Lifetime)
        } else if handle.idle(now) >= self.limits.idle_timeout {
            Some(EndReason::Idle)
        } else {
            None
        }
    }

    /// Destroys the sandboxes past their idle timeout or lifetime.
    pub async fn reap(&self) {
        let now = Instant::now();
        let due: Vec<_> = self
            .state()
            .handles
            .values()
            .filter_map(|h| self.due(h, now).map(|reason| (h.clone(), reason)))
            .collect();
        for (handle, reason) in due {
            tracing::info!(sandbox = %handle.id, reason = reason.label(), "sandbox expired");
            self.end(&handle, reason).await;
        }
    }

    /// Removes a handle, cancels its calls and destroys its VM.
    async fn end(&self, handle: &Arc<Handle<P::Sandbox>>, reason: EndReason) {
        if handle.ended.swap(true, Ordering::SeqCst) {
            return;
        }
        let age = handle.age(Instant::now());
        {
            let mut state = self.state();
            state.handles.remove(&handle.id);
            state.remember(&handle.id, Ended { reason, after: age });
        }
        lock(&handle.cancel).cancel();
        let slot = handle.slot.write().await.take();
        let usage = handle.usage();
        self.metrics.ended(
            reason,
            usage.vcpu_seconds,
            usage.memory_gb_seconds,
            usage.runs,
        );
        if let Some(slot) = slot {
            slot.cancel.cancel();
            slot.sandbox.destroy().await;
        }
        tracing::info!(sandbox = %handle.id, reason = reason.label(), ?usage, "sandbox destroyed");
    }

    /// Destroys every sandbox and the pool; new requests are refused.
    pub async fn shutdown(&self) {
        self.closed.store(true, Ordering::SeqCst);
        self.reaper_stop.cancel();
        let handles: Vec<_> = self.state().handles.values().cloned().collect();
        let ends = handles.iter().map(|h| self.end(h, EndReason::Closed));
        futures_join_all(ends).await;
        self.provider.close().await;
    }
}

/// Runs the futures concurrently (no extra crate).
async fn futures_join_all<F: Future<Output = ()>>(futures: impl IntoIterator<Item = F>) {
    let mut set: Vec<std::pin::Pin<Box<F>>> = futures.into_iter().map(Box::pin).collect();
    std::future::poll_fn(|cx| {
        set.retain_mut(|f| f.as_mut().poll(cx).is_pending());
        if set.is_empty() {
            std::task::Poll::Ready(())
        } else {
            std::task::Poll::Pending
        }
    })
    .await
}

/// 128 random bits, hex.
fn new_id() -> Option<String> {
    let mut bytes = [0u8; 16];
    crate::vmm::devices::virtio::rng::fill_random(&mut bytes)
        .then(|| bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// User plus system CPU time of a process, from /proc/<pid>/stat.
fn process_cpu_time(pid: u32) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces; the fields after it start at state.
    let rest = stat.rsplit_once(')')?.1;
    let mut fields = rest.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let ticks = u64::try_from(ticks).ok().filter(|t| *t > 0)?;
    Some(Duration::from_micros((utime + stime) * 1_000_000 / ticks))
}

/// `15m`, `8h`, `5s`, `1h 30m`.
pub fn fmt_duration(d: Duration) -> String {
    let secs = d.as_secs();
    if secs == 0 {
        return format!("{}ms", d.as_millis());
    }
    humantime::format_duration(Duration::from_secs(secs)).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Fake {
        made: AtomicUsize,
        destroyed: Arc<AtomicUsize>,
        fail: AtomicBool,
    }

    struct FakeSandbox {
        n: usize,
        destroyed: Arc<AtomicUsize>,
    }

    impl Hosted for FakeSandbox {
        fn pid(&self) -> Option<u32> {
            Some(std::process::id())
        }
        async fn destroy(self) {
            self.destroyed.fetch_add(1, Ordering::SeqCst);
        }
    }

    impl Provider for Fake {
        type Sandbox = FakeSandbox;
        async fn take(&self) -> anyhow::Result<FakeSandbox> {
            if self.fail.load(Ordering::SeqCst) {
                anyhow::bail!("no VM today");
            }
            Ok(FakeSandbox {
                n: self.made.fetch_add(1, Ordering::SeqCst),
                destroyed: self.destroyed.clone(),
            })
        }
        async fn ready(&self) -> usize {
            0
        }
        async fn close(&self) {}
    }

    fn registry(limits: Limits) -> (Arc<Registry<Fake>>, Arc<Fake>) {
        let fake = Arc::new(Fake {
            made: AtomicUsize::new(0),
            destroyed: Arc::new(AtomicUsize::new(0)),
            fail: AtomicBool::new(false),
        });
        (
            Registry::start(fake.clone(), limits, 1024, Arc::new(Metrics::new())),
            fake,
        )
    }

    fn session(s: &str) -> Conversation {
        Conversation::Session(s.into())
    }

    #[tokio::test]
    async fn one_sandbox_per_conversation() {
        let (r, fake) = registry(Limits::default());
        let a1 = r.acquire(&session("a"), "p").await.unwrap();
        let a2 = r.acquire(&session("a"), "p").await.unwrap();
        let b = r.acquire(&session("b"), "p").await.unwrap();
        assert_eq!(a1.id(), a2.id());
        assert_ne!(a1.id(), b.id());
        assert_eq!(a1.id().len(), 32);
        assert_eq!((a1.sandbox().n, b.sandbox().n), (0, 1));
        assert_eq!(r.active(), 2);
        drop((a1, a2, b));
        r.release(&session("a")).await;
        r.release(&session("a")).await;
        assert_eq!(r.active(), 1);
        assert_eq!(fake.destroyed.load(Ordering::SeqCst), 1);
        assert!(r.existing(&session("a"), "p").await.unwrap().is_none());
        r.shutdown().await;
        assert_eq!(fake.destroyed.load(Ordering::SeqCst), 2);
        assert!(matches!(
            r.acquire(&session("c"), "p").await,
            Err(RegistryError::ShuttingDown)
        ));
    }

    #[tokio::test]
    async fn concurrent_first_calls_share_one_sandbox() {
        let (r, fake) = registry(Limits::default());
        let (x, y) = tokio::join!(
            r.acquire(&Conversation::Stdio, "p"),
            r.acquire(&Conversation::Stdio, "p")
        );
        assert_eq!(x.unwrap().id(), y.unwrap().id());
        assert_eq!(fake.made.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn explicit_ids_are_bound_to_their_principal() {
        let (r, _) = registry(Limits::default());
        let id = r.create_explicit("alice").await.unwrap().id().to_string();
        assert_eq!(r.get(&id, "alice").await.unwrap().id(), id);
        let err = r.get(&id, "mallory").await.err().unwrap();
        assert!(matches!(err, RegistryError::Forbidden(_)), "{err}");
        let err = r.get("0123", "alice").await.err().unwrap();
        assert!(matches!(err, RegistryError::Unknown(_)), "{err}");
        assert!(err.to_string().contains("without sandbox_id"));
    }

    #[tokio::test]
    async fn limits_refuse_with_clear_errors() {
        let (r, fake) = registry(Limits {
            max_sandboxes: 3,
            max_per_principal: 2,
            ..Limits::default()
        });
        let _a = r.create_explicit("a").await.unwrap();
        let _b = r.create_explicit("a").await.unwrap();
        let err = r.create_explicit("a").await.err().unwrap();
        assert!(
            matches!(err, RegistryError::Limit(_)) && err.to_string().contains("limit"),
            "{err}"
        );
        let c = r.acquire(&session("s"), "b").await.unwrap();
        let err = r.acquire(&session("t"), "b").await.err().unwrap();
        assert!(err.to_string().contains("limit of 3"), "{err}");
        drop(c);
        // A failed start frees its reservation.
        r.release(&session("s")).await;
        fake.fail.store(true, Ordering::SeqCst);
        let err = r.acquire(&session("t"), "b").await.err().unwrap();
        assert!(matches!(err, RegistryError::Start(_)), "{err}");
        fake.fail.store(false, Ordering::SeqCst);
        r.acquire(&session("t"), "b").await.unwrap();
    }

    #[tokio::test]
    async fn idle_sandboxes_expire_with_a_clear_error() {
        let limits = Limits {
            idle_timeout: Duration::from_millis(300),
            ..Limits::default()
        };
        let (r, fake) = registry(limits);
        let id = r.create_explicit("p").await.unwrap().id().to_string();
        drop(r.acquire(&session("s"), "p").await.unwrap());
        // A held lease keeps its sandbox alive.
        let held = r.acquire(&Conversation::Stdio, "p").await.unwrap();
        tokio::time::sleep(Duration::from_millis(1200)).await;
        assert_eq!(fake.destroyed.load(Ordering::SeqCst), 2);
        let err = r.get(&id, "p").await.err().unwrap();
        assert!(matches!(err, RegistryError::Expired(_)), "{err}");
        assert!(err.to_string().contains("idle timeout"), "{err}");
        let err = r.acquire(&session("s"), "p").await.err().unwrap();
        assert!(err.to_string().contains("reset_sandbox"), "{err}");
        // reset gives the conversation a fresh sandbox.
        let fresh = r.reset_conversation(&session("s"), "p").await.unwrap();
        assert_eq!(fresh.sandbox().n, 3);
        drop(fresh);
        assert_eq!(r.acquire(&session("s"), "p").await.unwrap().sandbox().n, 3);
        drop(held);
    }

    #[tokio::test]
    async fn lifetime_ends_even_a_busy_sandbox() {
        let limits = Limits {
            max_lifetime: Duration::from_millis(300),
            ..Limits::default()
        };
        let (r, _) = registry(limits);
        let lease = r.acquire(&Conversation::Stdio, "p").await.unwrap();
        // The running call is told to stop, and must let go.
        tokio::time::timeout(Duration::from_secs(5), lease.cancelled())
            .await
            .unwrap();
        drop(lease);
        tokio::time::sleep(Duration::from_millis(500)).await;
        let err = r.acquire(&Conversation::Stdio, "p").await.err().unwrap();
        assert!(
            err.to_string().contains("maximum sandbox lifetime"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn reset_keeps_the_id_and_cancels_running_calls() {
        let (r, fake) = registry(Limits::default());
        let lease = r.create_explicit("p").await.unwrap();
        let id = lease.id().to_string();
        let r2 = r.clone();
        let id2 = id.clone();
        let reset =
            tokio::spawn(async move { r2.reset_explicit(&id2, "p").await.map(|l| l.sandbox().n) });
        tokio::time::timeout(Duration::from_secs(5), lease.cancelled())
            .await
            .unwrap();
        drop(lease);
        assert_eq!(reset.await.unwrap().unwrap(), 1);
        assert_eq!(fake.destroyed.load(Ordering::SeqCst), 1);
        let again = r.get(&id, "p").await.unwrap();
        assert_eq!(again.sandbox().n, 1);
        r.count_usage_check(&again);
    }

    impl Registry<Fake> {
        fn count_usage_check(&self, lease: &Lease<FakeSandbox>) {
            lease.count_run();
            let info = self.info(lease);
            assert_eq!(info.usage.runs, 1);
            assert!(info.usage.memory_gb_seconds > 0.0);
            assert!(info.usage.vcpu_seconds >= 0.0);
            assert!(info.expires_in <= DEFAULT_IDLE_TIMEOUT);
        }
    }
}

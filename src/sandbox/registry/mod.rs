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
//! - Ending or resetting a sandbox kills its VM first, then waits (bounded)
//!   for the calls holding it: a stalled guest never holds up the reaper,
//!   other tenants or shutdown. A reset replaces the VM in place, so a
//!   sandbox never holds two VMs and resets cannot outgrow the limits;
//!   resets of one sandbox run one at a time, and one asked for while
//!   another was waiting is served by it.
//!
//! The registry is generic over where sandboxes come from ([`Provider`]) so
//! its bookkeeping is tested without VMs; the server uses the warm pool.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use crate::metrics::{EndReason, Metrics};

mod durable;
mod handle;
mod pausing;
mod policy;
mod store;
#[cfg(test)]
mod tests;

use handle::{Handle, Slot, lock, new_id};
pub use handle::{Info, Lease, PauseRecord, Usage};
pub use policy::*;
pub use store::Store;

/// Where sandboxes come from.
pub trait Provider: Send + Sync + 'static {
    type Sandbox: Hosted;
    /// A fresh sandbox, never handed to anyone before.
    fn take(&self) -> impl Future<Output = anyhow::Result<Self::Sandbox>> + Send;
    /// Sandboxes ready to hand out at once.
    fn ready(&self) -> impl Future<Output = usize> + Send;
    /// Stops making sandboxes and destroys the ones not handed out.
    fn close(&self) -> impl Future<Output = ()> + Send;
    /// A sandbox again from the state a pause saved (which stays as it is:
    /// the registry discards it once a newer one is saved).
    fn resume(
        &self,
        saved: &<Self::Sandbox as Hosted>::Saved,
    ) -> impl Future<Output = anyhow::Result<Self::Sandbox>> + Send;
    /// The saved state a durable record names (by [`Hosted::saved_name`]),
    /// found again after a restart.
    fn load_saved(&self, name: &str) -> anyhow::Result<<Self::Sandbox as Hosted>::Saved>;
}

/// A sandbox as the registry sees it.
pub trait Hosted: Send + Sync + 'static {
    /// What a pause leaves: the sandbox's state, saved.
    type Saved: Send + Sync + 'static;
    /// The VMM process, for CPU accounting.
    fn pid(&self) -> Option<u32>;
    /// Kills the VM at once from anywhere, without the sandbox itself.
    fn kill_switch(&self) -> KillSwitch;
    /// Ends it for good (no VMM process left behind).
    fn destroy(self) -> impl Future<Output = ()> + Send;
    /// Saves it and ends its VM. On error it comes back if it runs on (its
    /// state could not be written), and is gone otherwise.
    fn pause(
        self,
    ) -> impl Future<Output = Result<Self::Saved, (anyhow::Error, Option<Self>)>> + Send
    where
        Self: Sized;
    /// Bytes the saved state takes on disk.
    fn saved_bytes(saved: &Self::Saved) -> u64;
    /// Removes saved state no one will resume.
    fn discard(saved: Self::Saved);
    /// The saved state's name in the durable store (its directory).
    fn saved_name(saved: &Self::Saved) -> String;
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

    async fn resume(&self, saved: &super::SavedSandbox) -> anyhow::Result<super::Sandbox> {
        super::pool::WarmPool::resume(self, saved).await
    }

    fn load_saved(&self, name: &str) -> anyhow::Result<super::SavedSandbox> {
        super::pool::WarmPool::load_saved(self, name)
    }
}

impl Hosted for super::Sandbox {
    type Saved = super::SavedSandbox;

    fn pid(&self) -> Option<u32> {
        Some(super::Sandbox::pid(self))
    }

    fn kill_switch(&self) -> KillSwitch {
        let vm = self.vm_kill_switch();
        KillSwitch::new(move || vm.kill())
    }

    async fn destroy(self) {
        super::Sandbox::destroy(self).await
    }

    async fn pause(self) -> Result<super::SavedSandbox, (anyhow::Error, Option<Self>)> {
        super::SavedSandbox::pause(self)
            .await
            .map_err(|failed| (failed.error, failed.sandbox))
    }

    fn saved_bytes(saved: &super::SavedSandbox) -> u64 {
        saved.disk_bytes
    }

    fn discard(saved: super::SavedSandbox) {
        saved.discard();
    }

    fn saved_name(saved: &super::SavedSandbox) -> String {
        saved.name()
    }
}

/// Stops a sandbox's VM at once, from any task and without the sandbox (a
/// stalled call may hold that). Firing it again, or after the VM ended, is
/// harmless.
#[derive(Clone)]
pub struct KillSwitch(Option<Arc<dyn Fn() + Send + Sync>>);

impl KillSwitch {
    pub fn new(kill: impl Fn() + Send + Sync + 'static) -> KillSwitch {
        KillSwitch(Some(Arc::new(kill)))
    }

    /// A switch that does nothing (the sandbox is ended by `destroy` alone).
    pub fn none() -> KillSwitch {
        KillSwitch(None)
    }

    pub fn fire(&self) {
        if let Some(kill) = &self.0 {
            kill();
        }
    }
}

#[derive(Debug, Clone)]
struct Ended {
    reason: EndReason,
    after: Duration,
}

struct State<S: Hosted> {
    handles: HashMap<String, Arc<Handle<S>>>,
    conversations: HashMap<Conversation, Arc<tokio::sync::Mutex<Option<String>>>>,
    ended: HashMap<String, Ended>,
    ended_order: VecDeque<String>,
    /// Sandboxes being created, per principal.
    creating: HashMap<String, usize>,
}

impl<S: Hosted> State<S> {
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
    /// The durable record, if sandboxes outlive this process.
    store: Option<Arc<Store>>,
    /// At shutdown, pause every sandbox into the store instead of ending it.
    keep_on_shutdown: bool,
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
        Self::build(provider, limits, memory_mib, metrics, None, false)
    }

    /// A registry kept in `store`: the sandboxes an earlier run recorded
    /// are taken up (paused, or reported as lost), and with
    /// `keep_on_shutdown` a shutdown pauses every sandbox into it.
    pub fn start_durable(
        provider: Arc<P>,
        limits: Limits,
        memory_mib: u32,
        metrics: Arc<Metrics>,
        store: Arc<Store>,
        keep_on_shutdown: bool,
    ) -> anyhow::Result<Arc<Self>> {
        let registry = Self::build(
            provider,
            limits,
            memory_mib,
            metrics,
            Some(store),
            keep_on_shutdown,
        );
        registry.recover()?;
        Ok(registry)
    }

    fn build(
        provider: Arc<P>,
        limits: Limits,
        memory_mib: u32,
        metrics: Arc<Metrics>,
        store: Option<Arc<Store>>,
        keep_on_shutdown: bool,
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
            store,
            keep_on_shutdown,
        });
        let mut soonest = limits.idle_timeout.min(limits.max_lifetime);
        if !limits.pause_after.is_zero() {
            soonest = soonest.min(limits.pause_after);
        }
        let tick = (soonest / 5).clamp(Duration::from_millis(200), Duration::from_secs(30));
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
                registry.reap();
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

    /// The conversation's binding to its sandbox id, made if it has none.
    fn binding(&self, conversation: &Conversation) -> Arc<tokio::sync::Mutex<Option<String>>> {
        self.state()
            .conversations
            .entry(conversation.clone())
            .or_default()
            .clone()
    }

    /// The conversation's sandbox, created now if it has none yet.
    pub async fn acquire(
        &self,
        conversation: &Conversation,
        principal: &str,
    ) -> Result<Lease<P::Sandbox>, RegistryError> {
        self.check_open()?;
        let binding = self.binding(conversation);
        let mut bound = binding.lock().await;
        if let Some(id) = bound.as_ref() {
            return self.lease(id, principal, Some(conversation)).await;
        }
        let handle = self
            .create(principal, *conversation == Conversation::Stdio)
            .await?;
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
        let handle = self.create(principal, false).await?;
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

    /// The live handle `id`, if `principal` owns it and it has not expired
    /// (expiring it now if the reaper has not come round yet).
    async fn find(
        &self,
        id: &str,
        principal: &str,
        conversation: Option<&Conversation>,
    ) -> Result<Arc<Handle<P::Sandbox>>, RegistryError> {
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
        if let Some(reason) = self.due(&handle, Instant::now()) {
            self.end(&handle, reason).await;
            let ended = Ended {
                reason,
                after: handle.age(Instant::now()),
            };
            return Err(self.expired_error(id, &ended, conversation.is_some()));
        }
        Ok(handle)
    }

    async fn lease(
        &self,
        id: &str,
        principal: &str,
        conversation: Option<&Conversation>,
    ) -> Result<Lease<P::Sandbox>, RegistryError> {
        let handle = self.find(id, principal, conversation).await?;
        handle.active.fetch_add(1, Ordering::SeqCst);
        // A pause begun before this call counted may hold the slot; once it
        // lets go the sandbox is paused, and is resumed on the next round
        // (no new pause starts while this call counts as active).
        let mut rounds = 0;
        let guard = loop {
            if let Err(err) = self.resume_if_paused(&handle).await {
                handle.active.fetch_sub(1, Ordering::SeqCst);
                return Err(err);
            }
            let guard = handle.slot.clone().read_owned().await;
            rounds += 1;
            if guard.is_some() || !handle.paused.load(Ordering::SeqCst) || rounds >= 3 {
                break guard;
            }
        };
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
        if handle.ended.load(Ordering::SeqCst) {
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
        if lease.guard.is_none() {
            drop(lease);
            return Err(RegistryError::Start(format!(
                "sandbox {id} has no VM: its last reset or pause failed; call reset_sandbox for a fresh one"
            )));
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
            EndReason::Lost => {
                "the server stopped while it was running, before it had ever been saved to disk"
                    .to_string()
            }
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
    async fn create(
        &self,
        principal: &str,
        stdio: bool,
    ) -> Result<Arc<Handle<P::Sandbox>>, RegistryError> {
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
        let handle = Arc::new(Handle::new(
            id.clone(),
            principal,
            sandbox,
            self.memory_gb,
            stdio,
        ));
        {
            // Counted as live from now on instead of as being created.
            let mut state = self.state();
            state.unreserve(principal);
            state.handles.insert(id.clone(), handle.clone());
        }
        if let Err(err) = self.record_new(&handle) {
            self.end(&handle, EndReason::Closed).await;
            return Err(RegistryError::Start(format!("{err:#}")));
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
        let binding = self.binding(conversation);
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
                let handle = self
                    .create(principal, *conversation == Conversation::Stdio)
                    .await?;
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
        let handle = self.find(id, principal, None).await?;
        self.swap(&handle, principal).await?;
        self.lease(id, principal, None).await
    }

    /// Gives `handle` a fresh VM in place of its current one. The old VM
    /// goes first, so the sandbox never holds two (the limits count one per
    /// sandbox), and calls that arrive meanwhile wait for the new one.
    async fn swap(
        &self,
        handle: &Arc<Handle<P::Sandbox>>,
        principal: &str,
    ) -> Result<(), RegistryError> {
        if handle.principal != principal {
            return Err(RegistryError::Forbidden(handle.id.clone()));
        }
        let asked_at = handle.resets_begun.load(Ordering::SeqCst);
        let _turn = handle.resetting.lock().await;
        if handle.resets_begun.load(Ordering::SeqCst) != asked_at {
            // A reset that began after this one was asked for has finished:
            // the VM it left is as fresh as this one would be.
            return Ok(());
        }
        handle.resets_begun.fetch_add(1, Ordering::SeqCst);
        let cancel = CancellationToken::new();
        std::mem::replace(&mut *lock(&handle.cancel), cancel.clone()).cancel();
        lock(&handle.kill).fire();
        let Ok(mut slot) = tokio::time::timeout(self.limits.stall_grace, handle.slot.write()).await
        else {
            tracing::warn!(sandbox = %handle.id, "reset: calls still hold the killed VM");
            return Err(RegistryError::Start(format!(
                "calls in sandbox {} did not end within {} of its VM being stopped; try again",
                handle.id,
                fmt_duration(self.limits.stall_grace)
            )));
        };
        if let Some(old) = slot.take() {
            old.sandbox.destroy().await;
        }
        handle.forget_saved();
        let fresh = match self.provider.take().await {
            Ok(sandbox) => sandbox,
            Err(err) => {
                self.metrics.restore_failed();
                handle.set_vm(None);
                return Err(RegistryError::Start(format!("{err:#}")));
            }
        };
        if handle.ended.load(Ordering::SeqCst) {
            drop(slot);
            fresh.destroy().await;
            return Err(RegistryError::Expired(format!(
                "sandbox {} ended while it was being reset; call reset_sandbox again",
                handle.id
            )));
        }
        self.metrics.restore();
        handle.set_vm(fresh.pid());
        *lock(&handle.kill) = fresh.kill_switch();
        *lock(&handle.created) = Instant::now();
        *lock(&handle.last_used) = Instant::now();
        *slot = Some(Slot {
            sandbox: fresh,
            cancel,
        });
        *lock(&handle.created_wall) = std::time::SystemTime::now();
        self.record(handle);
        tracing::info!(sandbox = %handle.id, "sandbox reset");
        Ok(())
    }

    /// The conversation ended (session closed): its sandbox is destroyed.
    /// Calling it again is harmless.
    pub async fn release(&self, conversation: &Conversation) {
        let binding = self.state().conversations.remove(conversation);
        let Some(binding) = binding else { return };
        if self.keeping() {
            // Its sandbox is paused by the shutdown, to outlive this run.
            return;
        }
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
            pauses: handle.pause_record(),
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

    /// Ends the sandboxes past their idle timeout or lifetime, each in a
    /// task of its own, so the reaper's next round never waits for one that
    /// is slow to go.
    fn reap(self: &Arc<Self>) {
        let now = Instant::now();
        let due: Vec<_> = self
            .state()
            .handles
            .values()
            .filter_map(|h| self.due(h, now).map(|reason| (h.clone(), reason)))
            .collect();
        for (handle, reason) in due {
            tracing::info!(sandbox = %handle.id, reason = reason.label(), "sandbox expired");
            let registry = self.clone();
            tokio::spawn(async move { registry.end(&handle, reason).await });
        }
        self.pause_idle(now);
    }

    /// Removes a handle, cancels its calls, kills its VM, and destroys it
    /// once the calls let go (or leaves that to the last of them).
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
        lock(&handle.kill).fire();
        let slot = match tokio::time::timeout(self.limits.stall_grace, handle.slot.write()).await {
            Ok(mut slot) => slot.take(),
            Err(_) => {
                // Its VM is dead; the sandbox drops with the last lease.
                tracing::warn!(sandbox = %handle.id, "calls still hold an ended sandbox's VM");
                None
            }
        };
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
        self.record_end(handle);
        handle.forget_saved();
        tracing::info!(sandbox = %handle.id, reason = reason.label(), ?usage, "sandbox destroyed");
    }

    /// New requests are refused from now on (a shutdown has begun).
    pub fn stop_accepting(&self) {
        self.closed.store(true, Ordering::SeqCst);
    }

    /// Shutting down, and keeping the sandboxes for a later run.
    fn keeping(&self) -> bool {
        self.keep_on_shutdown && self.store.is_some() && self.closed.load(Ordering::SeqCst)
    }

    /// Destroys every sandbox (or, keeping them, pauses each into the
    /// store) and the pool; new requests are refused.
    pub async fn shutdown(&self) {
        self.closed.store(true, Ordering::SeqCst);
        self.reaper_stop.cancel();
        let handles: Vec<_> = self.state().handles.values().cloned().collect();
        if self.keeping() {
            futures::future::join_all(handles.iter().map(|h| self.keep(h))).await;
        } else {
            futures::future::join_all(handles.iter().map(|h| self.end(h, EndReason::Closed))).await;
        }
        self.provider.close().await;
    }
}

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

mod checkpoints;
mod durable;
mod events;
mod handle;
mod leasing;
mod lifecycle;
mod pausing;
mod policy;
mod store;
#[cfg(test)]
mod tests;

pub use checkpoints::{CheckpointList, fmt_bytes};
pub use events::{EventFeed, Notice, SandboxEvent};
pub use handle::{CheckpointInfo, Info, Lease, PauseRecord, SandboxRef, SnapshotUsage, Usage};
use handle::{Handle, lock};
pub use policy::*;
pub use store::LOCK_FILE as STATE_LOCK_FILE;
pub use store::Store;

/// The saved state of a provider's sandboxes.
type SavedOf<P> = <<P as Provider>::Sandbox as Hosted>::Saved;

/// Where sandboxes come from.
pub trait Provider: Send + Sync + 'static {
    type Sandbox: Hosted;
    /// A fresh sandbox of `image` (none: the default image), never handed
    /// to anyone before.
    fn take(
        &self,
        image: Option<&str>,
    ) -> impl Future<Output = anyhow::Result<Self::Sandbox>> + Send;
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
    /// What a pause leaves: the sandbox's state, saved. A copy names the
    /// same state on disk (removed only by [`Hosted::discard`]).
    type Saved: Clone + Send + Sync + 'static;
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
    /// Its egress connections belong to `binding` from now on.
    fn bind_egress(&self, _binding: crate::egress::Binding) {}
    /// The name of the image it runs.
    fn image(&self) -> &str {
        crate::image::names::DEFAULT_IMAGE
    }
    /// Its guest memory in MiB, when it is not the server's (metered as
    /// GB-seconds).
    fn memory_mib(&self) -> Option<u32> {
        None
    }
    /// The name of the image a saved state resumes into.
    fn saved_image(_saved: &Self::Saved) -> String {
        crate::image::names::DEFAULT_IMAGE.to_string()
    }
}

impl Provider for super::pool::WarmPool {
    type Sandbox = super::Sandbox;

    async fn take(&self, image: Option<&str>) -> anyhow::Result<super::Sandbox> {
        if let Some(image) = image
            && image != self.image_name()
        {
            anyhow::bail!(
                "this pool makes sandboxes of {}, not {image}",
                self.image_name()
            );
        }
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

    fn bind_egress(&self, binding: crate::egress::Binding) {
        super::Sandbox::bind_egress(self, binding)
    }

    fn image(&self) -> &str {
        super::Sandbox::image(self)
    }

    fn memory_mib(&self) -> Option<u32> {
        Some(super::Sandbox::memory_mib(self))
    }

    fn saved_image(saved: &super::SavedSandbox) -> String {
        saved.image.clone()
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
    /// Held while a checkpoint is admitted against the quota and recorded.
    checkpoint_admission: Mutex<()>,
    events: EventFeed,
    /// How often the reaper looks.
    reaper_tick: Duration,
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
        let mut soonest = limits.idle_timeout.min(limits.max_lifetime);
        if !limits.pause_after.is_zero() {
            soonest = soonest.min(limits.pause_after);
        }
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
            checkpoint_admission: Mutex::new(()),
            events: EventFeed::default(),
            reaper_tick: reaper_tick(soonest),
        });
        let tick = registry.reaper_tick;
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

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// What happens to each sandbox, as it happens.
    pub fn events(&self) -> &EventFeed {
        &self.events
    }

    /// Where sandboxes come from.
    pub fn provider(&self) -> &Arc<P> {
        &self.provider
    }

    /// How long before an expiry its sandbox's owner is warned: a fifth of
    /// the idle timeout, at most 5 minutes, and never less than two reaper
    /// rounds (or the warning could be missed) nor more than half the idle
    /// timeout.
    pub fn expiry_warning_lead(&self) -> Duration {
        (self.limits.idle_timeout / 5)
            .min(Duration::from_secs(300))
            .max(self.reaper_tick * 2)
            .min(self.limits.idle_timeout / 2)
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

    /// Facts about one sandbox.
    pub fn info(&self, lease: &Lease<P::Sandbox>) -> Info {
        let handle = &lease.handle;
        let now = Instant::now();
        let age = handle.age(now);
        let lifetime_left = self.limits.max_lifetime.saturating_sub(age);
        // Counted apart: a guard in the struct expression would live on
        // while checkpoint_bytes takes the same lock.
        let checkpoints = lock(&handle.checkpoints).len();
        Info {
            id: handle.id.clone(),
            image: lock(&handle.image).clone(),
            memory_mib: (handle.memory_gb * 1024.0).round() as u32,
            age,
            // This call itself holds a lease, so "idle" is the time before it.
            idle: Duration::ZERO,
            expires_in: self.limits.idle_timeout.min(lifetime_left),
            lifetime_left,
            usage: handle.usage(),
            active_calls: handle.active.load(Ordering::SeqCst).saturating_sub(1),
            pauses: handle.pause_record(),
            checkpoints,
            checkpoint_bytes: handle.checkpoint_bytes(),
            egress: handle.traffic.report(),
        }
    }

    /// Snapshot metering per principal (live sandboxes and, with a store,
    /// ended ones), sorted by principal; only `principal`'s if named.
    pub fn snapshot_usage(&self, principal: Option<&str>) -> Vec<(String, SnapshotUsage)> {
        let mut by: std::collections::BTreeMap<String, SnapshotUsage> = Default::default();
        if let Some(store) = &self.store {
            let history = match principal {
                Some(name) => store
                    .principal_history(name)
                    .map(|c| vec![(name.to_string(), c)]),
                None => store.principal_histories(),
            };
            match history {
                Ok(rows) => {
                    for (name, c) in rows {
                        let u = by.entry(name).or_default();
                        u.writes += c.snapshot_writes;
                        u.restores += c.snapshot_restores;
                        u.byte_seconds += c.snapshot_byte_seconds;
                    }
                }
                Err(err) => {
                    tracing::warn!(err = %format!("{err:#}"), "cannot read principals' metering")
                }
            }
        }
        let handles: Vec<_> = self.state().handles.values().cloned().collect();
        for handle in handles {
            let record = lock(&handle.record).clone();
            let u = by.entry(handle.principal.clone()).or_default();
            u.writes += record.snapshot_writes;
            u.restores += record.snapshot_restores;
            u.byte_seconds += record.stored_byte_seconds();
            u.stored_bytes += record.stored_bytes;
        }
        by.into_iter()
            .filter(|(name, _)| principal.is_none_or(|p| p == name))
            .collect()
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
}

/// How often the reaper looks, for the soonest of the timeouts.
fn reaper_tick(soonest: Duration) -> Duration {
    (soonest / 5).clamp(Duration::from_millis(200), Duration::from_secs(30))
}

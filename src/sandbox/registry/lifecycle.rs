//! The lifecycle of a sandbox, the registry's state machine:
//!
//! ```text
//!  create ──► running ◄──── resume ──── paused
//!              │  ▲  └──── pause (idle, shutdown) ──►┘
//!              │  └─ reset, rollback (a new VM, same id)
//!              ▼
//!            ended (idle timeout, lifetime, conversation closed, lost)
//! ```
//!
//! Each step runs under the handle's slot lock; ending and resetting kill
//! the VM first, then wait (bounded) for the calls that hold it.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use super::handle::{Handle, Slot, lock, new_id};
use super::*;

impl<P: Provider> Registry<P> {
    /// Makes a new handle for `principal`, within the limits, for
    /// `conversation` (or for an explicit id).
    pub(super) async fn create(
        &self,
        principal: &str,
        conversation: Option<&Conversation>,
        image: Option<&str>,
    ) -> Result<Arc<Handle<P::Sandbox>>, RegistryError> {
        let image = self
            .limits
            .image_for(principal, image)
            .map_err(RegistryError::Invalid)?;
        self.reserve(principal)?;
        let started = Instant::now();
        let taken = self.provider.take(image.as_deref()).await;
        let sandbox = match taken {
            Ok(sandbox) => sandbox,
            Err(err) => {
                self.state().unreserve(principal);
                self.metrics.restore_failed();
                return Err(RegistryError::Start(format!("{err:#}")));
            }
        };
        let handle = self
            .register(
                principal,
                sandbox,
                conversation == Some(&Conversation::Stdio),
            )
            .await?;
        if let Some(conversation) = conversation {
            handle.mark_session(conversation);
        }
        self.events.emit(
            &handle.id,
            SandboxEvent::Started {
                took: started.elapsed(),
            },
        );
        Ok(handle)
    }

    /// Counts a sandbox being made for `principal`, if the limits allow
    /// one more; [`Registry::register`] or `unreserve` undoes it.
    pub(super) fn reserve(&self, principal: &str) -> Result<(), RegistryError> {
        let mut state = self.state();
        if state.live(None) >= self.limits.max_sandboxes {
            self.metrics.refused("global_limit");
            return Err(RegistryError::Limit(format!(
                "the server is at its limit of {} live sandboxes; try again later, or end sandboxes you no longer need",
                self.limits.max_sandboxes
            )));
        }
        let own_limit = self.limits.max_sandboxes_of(principal);
        if state.live(Some(principal)) >= own_limit {
            self.metrics.refused("principal_limit");
            return Err(RegistryError::Limit(format!(
                "this client already has {} live sandboxes, its limit; reuse one (pass its sandbox_id) or let an unused one expire ({} idle timeout)",
                own_limit,
                fmt_duration(self.limits.idle_timeout)
            )));
        }
        *state.creating.entry(principal.to_string()).or_default() += 1;
        Ok(())
    }

    /// Gives a sandbox made under a reservation its handle and id, and
    /// records it.
    pub(super) async fn register(
        &self,
        principal: &str,
        sandbox: P::Sandbox,
        stdio: bool,
    ) -> Result<Arc<Handle<P::Sandbox>>, RegistryError> {
        let Some(id) = new_id() else {
            self.state().unreserve(principal);
            sandbox.destroy().await;
            return Err(RegistryError::Start(
                "the host has no entropy for a sandbox id".into(),
            ));
        };
        let memory_gb = sandbox
            .memory_mib()
            .map_or(self.memory_gb, |mib| f64::from(mib) / 1024.0);
        let handle = Arc::new(Handle::new(
            id.clone(),
            principal,
            sandbox,
            memory_gb,
            stdio,
            self.events.clone(),
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
                let handle = self.create(principal, Some(conversation), None).await?;
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
    pub(super) async fn swap(
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
        let image = lock(&handle.image).clone();
        let fresh = match self.provider.take(Some(&image)).await {
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
        handle.adopt(&fresh);
        *lock(&handle.kill) = fresh.kill_switch();
        *lock(&handle.created) = Instant::now();
        *lock(&handle.last_used) = Instant::now();
        *slot = Some(Slot {
            sandbox: fresh,
            cancel,
        });
        *lock(&handle.created_wall) = std::time::SystemTime::now();
        self.record(handle);
        self.events.emit(&handle.id, SandboxEvent::Reset);
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

    pub(super) fn due(&self, handle: &Handle<P::Sandbox>, now: Instant) -> Option<EndReason> {
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
    pub(super) fn reap(self: &Arc<Self>) {
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
        self.warn_of_expiry(now);
        self.pause_idle(now);
    }

    /// Tells each sandbox's owner, once per deadline, that it ends soon.
    fn warn_of_expiry(&self, now: Instant) {
        let lead = self.expiry_warning_lead();
        let handles: Vec<_> = self.state().handles.values().cloned().collect();
        for handle in handles {
            let idle_deadline = *lock(&handle.last_used) + self.limits.idle_timeout;
            let life_deadline = *lock(&handle.created) + self.limits.max_lifetime;
            let (deadline, reason) = if life_deadline <= idle_deadline {
                (life_deadline, EndReason::Lifetime)
            } else {
                (idle_deadline, EndReason::Idle)
            };
            let within = deadline.saturating_duration_since(now);
            if within.is_zero() || within > lead {
                continue;
            }
            if lock(&handle.expiry_warned).replace(deadline) == Some(deadline) {
                continue;
            }
            self.events
                .emit(&handle.id, SandboxEvent::ExpiresSoon { within, reason });
        }
    }

    /// Removes a handle, cancels its calls, kills its VM, and destroys it
    /// once the calls let go (or leaves that to the last of them).
    pub(super) async fn end(&self, handle: &Arc<Handle<P::Sandbox>>, reason: EndReason) {
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
        handle.forget_checkpoints();
        self.events.emit(&handle.id, SandboxEvent::Ended { reason });
        tracing::info!(sandbox = %handle.id, reason = reason.label(), ?usage, "sandbox destroyed");
    }

    /// New requests are refused from now on (a shutdown has begun).
    pub fn stop_accepting(&self) {
        self.closed.store(true, Ordering::SeqCst);
    }

    /// Shutting down, and keeping the sandboxes for a later run.
    pub(super) fn keeping(&self) -> bool {
        self.keep_on_shutdown && self.store.is_some() && self.closed.load(Ordering::SeqCst)
    }

    /// Destroys every sandbox (or, keeping them, pauses each into the
    /// store) and the pool; new requests are refused.
    pub async fn shutdown(&self) {
        self.closed.store(true, Ordering::SeqCst);
        self.reaper_stop.cancel();
        let handles: Vec<_> = self.state().handles.values().cloned().collect();
        if self.keeping() {
            // A session does not outlive the server, so neither does its
            // sandbox; sandboxes named by id (and forks) are kept.
            let (ending, kept): (Vec<_>, Vec<_>) = handles
                .iter()
                .partition(|h| h.session_bound.load(Ordering::SeqCst));
            futures::future::join(
                futures::future::join_all(ending.iter().map(|h| self.end(h, EndReason::Closed))),
                futures::future::join_all(kept.iter().map(|h| self.keep(h))),
            )
            .await;
        } else {
            futures::future::join_all(handles.iter().map(|h| self.end(h, EndReason::Closed))).await;
        }
        self.provider.close().await;
    }
}

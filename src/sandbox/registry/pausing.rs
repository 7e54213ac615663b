//! Pausing idle sandboxes to disk and resuming them at their next call.
//!
//! A sandbox idle for `pause_after` is paused by the reaper: its VM saves
//! itself and ends, and the handle keeps the saved state. The next lease
//! resumes it before the call runs, under the slot's write lock, so calls
//! never see a half-resumed sandbox. The saved state outlives the resume
//! (it is the last durable state) until a newer pause replaces it, or the
//! sandbox is reset or ends.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Instant, SystemTime};

use super::handle::{Handle, Slot, lock};
use super::{Hosted, Provider, Registry, RegistryError, SavedOf};

impl<P: Provider> Registry<P> {
    /// Starts a pause, each in a task of its own, of every running sandbox
    /// idle for `pause_after`.
    pub(super) fn pause_idle(self: &Arc<Self>, now: Instant) {
        let after = self.limits.pause_after;
        if after.is_zero() {
            return;
        }
        let due: Vec<_> = self
            .state()
            .handles
            .values()
            .filter(|h| !h.paused.load(Ordering::SeqCst) && h.idle(now) >= after)
            .cloned()
            .collect();
        for handle in due {
            let registry = self.clone();
            tokio::spawn(async move { registry.pause(&handle).await });
        }
    }

    /// Pauses `handle` if no call holds it (one that does makes it busy,
    /// not idle: it is paused later).
    async fn pause(&self, handle: &Arc<Handle<P::Sandbox>>) {
        let Ok(mut slot) = handle.slot.clone().try_write_owned() else {
            return;
        };
        if handle.active.load(Ordering::SeqCst) > 0 || handle.ended.load(Ordering::SeqCst) {
            return;
        }
        self.pause_slot(handle, &mut slot).await;
    }

    /// At shutdown: stops the sandbox's calls and pauses it into the store,
    /// to be taken up by the next run. One that cannot be saved keeps its
    /// last saved state, or is recorded as gone if it has none.
    pub(super) async fn keep(&self, handle: &Arc<Handle<P::Sandbox>>) {
        lock(&handle.cancel).cancel();
        match tokio::time::timeout(self.limits.stall_grace, handle.slot.write()).await {
            Ok(mut slot) => {
                self.pause_slot(handle, &mut slot).await;
                if let Some(current) = slot.take() {
                    // Its state could not be written: it ends here.
                    current.sandbox.destroy().await;
                    handle.set_vm(None);
                    handle.paused.store(handle.restorable(), Ordering::SeqCst);
                }
            }
            Err(_) => {
                tracing::warn!(sandbox = %handle.id, "calls still hold the sandbox at shutdown; keeping its last saved state");
                lock(&handle.kill).fire();
                handle.paused.store(handle.restorable(), Ordering::SeqCst);
            }
        }
        if handle.restorable() {
            self.record(handle);
        } else {
            self.record_end(handle);
        }
    }

    /// Pauses the sandbox in `slot`, if any: on success the slot is empty
    /// and the handle holds the saved state, recorded before the older one
    /// is removed.
    async fn pause_slot(
        &self,
        handle: &Arc<Handle<P::Sandbox>>,
        slot: &mut Option<Slot<P::Sandbox>>,
    ) {
        let Some(current) = slot.take() else {
            return;
        };
        let started = Instant::now();
        let Slot { sandbox, cancel } = current;
        match sandbox.pause().await {
            Ok(saved) => {
                let took = started.elapsed();
                let bytes = P::Sandbox::saved_bytes(&saved);
                let old = lock(&handle.saved).replace(saved);
                *lock(&handle.saved_at) = Some(SystemTime::now());
                *lock(&handle.resume_checkpoint) = None;
                handle.set_vm(None);
                handle.paused.store(true, Ordering::SeqCst);
                {
                    let mut record = lock(&handle.record);
                    record.pauses += 1;
                    record.snapshot_writes += 1;
                    record.pause_seconds += took.as_secs_f64();
                }
                handle.update_stored();
                // The older state goes only once the record names the new
                // one: a crash in between leaves the new one unnamed.
                if self.record(handle) {
                    if let Some(old) = old {
                        P::Sandbox::discard(old);
                    }
                } else if old.is_some() {
                    tracing::warn!(sandbox = %handle.id, "the record still names the older saved state; it is kept on disk");
                }
                self.metrics.paused(took, bytes);
                let idle = handle.idle(Instant::now());
                handle
                    .events
                    .emit(&handle.id, super::SandboxEvent::Paused { idle });
                tracing::info!(sandbox = %handle.id, ?took, bytes, "sandbox paused");
            }
            Err((err, Some(sandbox))) => {
                // Not written (a full disk, say): it runs on as it was.
                self.metrics.pause_failed();
                tracing::error!(sandbox = %handle.id, err = %format!("{err:#}"), "sandbox pause failed; it keeps running");
                *lock(&handle.kill) = sandbox.kill_switch();
                *slot = Some(Slot { sandbox, cancel });
            }
            Err((err, None)) => {
                // The VM is gone; a state saved before, if any, is what a
                // call resumes now.
                let fallback = self.fall_back(handle);
                self.metrics.pause_failed();
                tracing::error!(sandbox = %handle.id, err = %format!("{err:#}"), fallback, "sandbox pause failed");
            }
        }
    }

    /// Resumes `handle` if it is paused, before a call uses it.
    pub(super) async fn resume_if_paused(
        &self,
        handle: &Arc<Handle<P::Sandbox>>,
    ) -> Result<(), RegistryError> {
        if !handle.paused.load(Ordering::SeqCst) {
            return Ok(());
        }
        let mut slot = handle.slot.write().await;
        if slot.is_some() || !handle.paused.load(Ordering::SeqCst) {
            return Ok(());
        }
        // The last saved state stays the last durable state after the
        // resume. After a crash, a checkpoint newer than it may be what
        // the sandbox comes back from.
        let Some(saved) = self.resume_source(handle) else {
            handle.paused.store(false, Ordering::SeqCst);
            return Ok(());
        };
        let started = Instant::now();
        let resumed = self.provider.resume(&saved).await;
        let sandbox = match resumed {
            Ok(sandbox) => sandbox,
            Err(err) => {
                self.metrics.resume_failed();
                tracing::error!(sandbox = %handle.id, err = %format!("{err:#}"), "sandbox resume failed");
                return Err(RegistryError::Start(format!(
                    "sandbox {} is paused and could not be resumed ({err:#}); its saved state is kept, so try again",
                    handle.id
                )));
            }
        };
        let took = started.elapsed();
        handle.adopt(&sandbox);
        *lock(&handle.kill) = sandbox.kill_switch();
        let cancel = lock(&handle.cancel).clone();
        *slot = Some(Slot { sandbox, cancel });
        handle.paused.store(false, Ordering::SeqCst);
        {
            let mut record = lock(&handle.record);
            record.resumes += 1;
            record.snapshot_restores += 1;
            record.resume_seconds += took.as_secs_f64();
            record.last_resumed = Some(SystemTime::now());
            record.last_resume_seconds = Some(took.as_secs_f64());
        }
        *lock(&handle.resume_checkpoint) = None;
        self.record(handle);
        self.metrics.resumed(took);
        self.events
            .emit(&handle.id, super::SandboxEvent::Resumed { took });
        tracing::info!(sandbox = %handle.id, ?took, "sandbox resumed");
        Ok(())
    }

    /// What a paused handle resumes from: its last saved state, or the
    /// checkpoint it was brought back to after a crash.
    fn resume_source(&self, handle: &Handle<P::Sandbox>) -> Option<SavedOf<P>> {
        // A checkpoint named here is newer than the last pause (set after a
        // crash or a failed rollback; a pause clears it).
        let id = lock(&handle.resume_checkpoint).clone();
        if let Some(id) = id {
            let found = lock(&handle.checkpoints)
                .iter()
                .find(|c| c.id == id)
                .map(|c| c.saved.clone());
            if found.is_some() {
                return found;
            }
        }
        lock(&handle.saved).clone()
    }

    /// The VM ended in a failed pause or checkpoint: the next call resumes
    /// the newest state kept (its last pause, or a newer checkpoint) and its
    /// result says so. False if nothing was kept.
    pub(super) fn fall_back(&self, handle: &Handle<P::Sandbox>) -> bool {
        handle.set_vm(None);
        let saved_at = *lock(&handle.saved_at);
        let newest = lock(&handle.checkpoints)
            .iter()
            .max_by_key(|c| c.created)
            .map(|c| (c.id.clone(), c.created));
        if let Some((id, created)) = newest
            && saved_at.is_none_or(|at| created > at)
        {
            *lock(&handle.resume_checkpoint) = Some(id);
        }
        let restorable = handle.restorable();
        handle.paused.store(restorable, Ordering::SeqCst);
        if restorable {
            *lock(&handle.notice) = Some(
                "Note: this sandbox's VM ended while it was being saved. It was brought back as it was when it was last saved (its last pause or checkpoint); files written and variables set after that are gone.".into(),
            );
        }
        restorable
    }
}

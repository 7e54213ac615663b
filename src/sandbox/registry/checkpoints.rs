//! Checkpoints of a sandbox, and rolling back to or forking from one.
//!
//! A checkpoint is a pause followed at once by a resume from what it saved:
//! the saved state (the template plus the pages the sandbox wrote) stays on
//! disk as the checkpoint, and the sandbox runs on from it, so the sandbox
//! and the checkpoint hold exactly the same state. A rollback ends the VM
//! and resumes the checkpoint in its place, under the same id; checkpoints
//! taken after it are discarded. A fork resumes a checkpoint as a new
//! sandbox of the same principal. Every resume is refreshed (entropy,
//! clock) like any restore, so a fork never shares random numbers with its
//! parent.
//!
//! A checkpoint lives as long as its sandbox (across pauses, resets and
//! server restarts) or until a rollback to an earlier one; the checkpoints
//! of a principal's sandboxes together stay within its storage quota.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Instant, SystemTime};

use tokio::sync::OwnedRwLockWriteGuard;
use tokio_util::sync::CancellationToken;

use super::handle::{Checkpoint, CheckpointInfo, Handle, Slot, lock, new_id};
use super::store::CheckpointRow;
use super::{Hosted, Lease, Provider, Registry, RegistryError, SandboxRef, SavedOf, fmt_duration};

/// Checkpoints one sandbox keeps at most.
pub const MAX_CHECKPOINTS_PER_SANDBOX: usize = 32;
/// Longest checkpoint label, in characters.
pub const MAX_LABEL_CHARS: usize = 200;

/// A principal's checkpoints, and its quota.
#[derive(Debug, Clone)]
pub struct CheckpointList {
    pub sandbox_id: String,
    pub checkpoints: Vec<CheckpointInfo>,
    /// Bytes the principal's checkpoints take, over all its sandboxes.
    pub principal_bytes: u64,
    pub quota_bytes: u64,
}

/// A checkpoint found, and the handle of the sandbox that keeps it.
type Found<P> = (
    Arc<Handle<<P as Provider>::Sandbox>>,
    Checkpoint<SavedOf<P>>,
);

/// Counts a handle as busy (not idle, not to be paused) while held.
struct Busy<'a, S: Hosted>(&'a Handle<S>);

impl<'a, S: Hosted> Busy<'a, S> {
    fn new(handle: &'a Handle<S>) -> Self {
        handle.active.fetch_add(1, Ordering::SeqCst);
        Busy(handle)
    }
}

impl<S: Hosted> Drop for Busy<'_, S> {
    fn drop(&mut self) {
        *lock(&self.0.last_used) = Instant::now();
        self.0.active.fetch_sub(1, Ordering::SeqCst);
    }
}

/// `8 KiB`, `12.5 MiB`: sizes for the model to read.
pub fn fmt_bytes(bytes: u64) -> String {
    if bytes < 1 << 20 {
        format!("{} KiB", bytes.div_ceil(1024))
    } else {
        format!("{:.1} MiB", bytes as f64 / f64::from(1u32 << 20))
    }
}

/// A label as given, checked.
pub fn check_label(label: &str) -> Result<(), RegistryError> {
    if label.chars().count() > MAX_LABEL_CHARS {
        return Err(RegistryError::Invalid(format!(
            "label is {} characters long; at most {MAX_LABEL_CHARS} are accepted",
            label.chars().count()
        )));
    }
    if label.chars().any(char::is_control) {
        return Err(RegistryError::Invalid(
            "label contains control characters (newlines, tabs, ...)".into(),
        ));
    }
    Ok(())
}

impl<P: Provider> Registry<P> {
    /// Bytes the checkpoints of `principal`'s live sandboxes take.
    fn principal_checkpoint_bytes(&self, principal: &str) -> u64 {
        let handles: Vec<_> = self
            .state()
            .handles
            .values()
            .filter(|h| h.principal == principal)
            .cloned()
            .collect();
        handles.iter().map(|h| h.checkpoint_bytes()).sum()
    }

    fn over_quota(&self, principal: &str, used: u64) -> RegistryError {
        RegistryError::Limit(format!(
            "this client's checkpoints take {} of its {} snapshot storage quota; a rollback discards the checkpoints taken after its target, and ending a sandbox discards all of its checkpoints",
            fmt_bytes(used),
            fmt_bytes(self.limits.snapshot_quota_of(principal))
        ))
    }

    /// The sandbox's VM, held for a checkpoint: resumed first if paused,
    /// and waited for (bounded) while other calls use it.
    async fn hold_vm(
        &self,
        handle: &Arc<Handle<P::Sandbox>>,
    ) -> Result<OwnedRwLockWriteGuard<Option<Slot<P::Sandbox>>>, RegistryError> {
        for _ in 0..3 {
            self.resume_if_paused(handle).await?;
            let slot = tokio::time::timeout(
                self.limits.stall_grace,
                handle.slot.clone().write_owned(),
            )
            .await
            .map_err(|_| {
                RegistryError::Busy(format!(
                    "another call has been running in sandbox {} for over {}; checkpoint it when that call has finished",
                    handle.id,
                    fmt_duration(self.limits.stall_grace)
                ))
            })?;
            if handle.ended.load(Ordering::SeqCst) {
                return Err(RegistryError::Expired(format!(
                    "sandbox {} ended before the checkpoint could be taken",
                    handle.id
                )));
            }
            if slot.is_some() {
                return Ok(slot);
            }
            if !handle.paused.load(Ordering::SeqCst) {
                break;
            }
        }
        Err(RegistryError::Start(format!(
            "sandbox {} has no VM: its last reset, rollback or pause failed; call reset_sandbox for a fresh one, or rollback_sandbox to a checkpoint",
            handle.id
        )))
    }

    /// Takes a checkpoint of the sandbox (resumed first if paused).
    pub async fn checkpoint(
        &self,
        sandbox: &SandboxRef<P::Sandbox>,
        label: Option<String>,
    ) -> Result<CheckpointInfo, RegistryError> {
        self.checkpoint_handle(&sandbox.0, label.unwrap_or_default())
            .await
    }

    async fn checkpoint_handle(
        &self,
        handle: &Arc<Handle<P::Sandbox>>,
        label: String,
    ) -> Result<CheckpointInfo, RegistryError> {
        self.check_open()?;
        check_label(&label)?;
        let Some(store) = self.store.clone() else {
            return Err(RegistryError::Invalid(
                "this server keeps no state on disk, so it cannot take checkpoints".into(),
            ));
        };
        if lock(&handle.checkpoints).len() >= MAX_CHECKPOINTS_PER_SANDBOX {
            return Err(RegistryError::Limit(format!(
                "sandbox {} already has {MAX_CHECKPOINTS_PER_SANDBOX} checkpoints, its limit; roll back to an earlier one to discard the ones after it",
                handle.id
            )));
        }
        let quota = self.limits.snapshot_quota_of(&handle.principal);
        let used = self.principal_checkpoint_bytes(&handle.principal);
        if used >= quota {
            return Err(self.over_quota(&handle.principal, used));
        }
        let _busy = Busy::new(handle);
        let mut slot = self.hold_vm(handle).await?;
        let Some(Slot { sandbox, cancel }) = slot.take() else {
            return Err(RegistryError::Start("the sandbox has no VM".into()));
        };
        let started = Instant::now();
        let saved = match sandbox.pause().await {
            Ok(saved) => saved,
            Err((err, Some(sandbox))) => {
                // Not written (a full disk, say): it runs on as it was.
                self.metrics.pause_failed();
                *lock(&handle.kill) = sandbox.kill_switch();
                *slot = Some(Slot { sandbox, cancel });
                return Err(RegistryError::Start(format!(
                    "the checkpoint could not be written ({err:#}); the sandbox runs on unchanged"
                )));
            }
            Err((err, None)) => {
                let fallback = self.fall_back(handle);
                self.metrics.pause_failed();
                return Err(RegistryError::Start(format!(
                    "the checkpoint failed and the sandbox's VM ended ({err:#}); {}",
                    if fallback {
                        "the next call resumes it from its last pause"
                    } else {
                        "call reset_sandbox, or rollback_sandbox to an earlier checkpoint"
                    }
                )));
            }
        };
        let resumed = self.provider.resume(&saved).await;
        let bytes = P::Sandbox::saved_bytes(&saved);
        let Some(id) = new_id() else {
            P::Sandbox::discard(saved);
            return Err(RegistryError::Start(
                "the host has no entropy for a checkpoint id".into(),
            ));
        };
        let checkpoint = Checkpoint {
            id,
            label,
            created: SystemTime::now(),
            bytes,
            saved,
        };
        // Counted against the quota once its size is known.
        let row = CheckpointRow {
            id: checkpoint.id.clone(),
            sandbox_id: handle.id.clone(),
            principal: handle.principal.clone(),
            label: Some(checkpoint.label.clone()).filter(|l| !l.is_empty()),
            created: checkpoint.created,
            dir: P::Sandbox::saved_name(&checkpoint.saved),
            bytes,
        };
        // Admitted and recorded under one lock, so checkpoints taken at
        // once cannot each pass the quota or the count.
        let admission = lock(&self.checkpoint_admission);
        let used_now = self.principal_checkpoint_bytes(&handle.principal);
        let refused = if handle.ended.load(Ordering::SeqCst) {
            Some(RegistryError::Expired(format!(
                "sandbox {} ended while its checkpoint was being taken",
                handle.id
            )))
        } else if lock(&handle.checkpoints).len() >= MAX_CHECKPOINTS_PER_SANDBOX {
            Some(RegistryError::Limit(format!(
                "sandbox {} already has {MAX_CHECKPOINTS_PER_SANDBOX} checkpoints, its limit",
                handle.id
            )))
        } else if used_now + bytes > quota {
            Some(self.over_quota(&handle.principal, used_now + bytes))
        } else {
            store
                .insert_checkpoint(&row)
                .err()
                .map(|err| RegistryError::Start(format!("{err:#}")))
        };
        if refused.is_none() {
            lock(&handle.checkpoints).push(checkpoint.clone());
        }
        drop(admission);
        match resumed {
            Ok(sandbox) => {
                handle.adopt(&sandbox);
                *lock(&handle.kill) = sandbox.kill_switch();
                *slot = Some(Slot { sandbox, cancel });
            }
            Err(err) => {
                handle.set_vm(None);
                self.metrics.resume_failed();
                if refused.is_some() {
                    // Its only copy of the state is the refused checkpoint:
                    // keep it as the state the next call resumes.
                    let old = lock(&handle.saved).replace(checkpoint.saved);
                    *lock(&handle.saved_at) = Some(checkpoint.created);
                    *lock(&handle.resume_checkpoint) = None;
                    handle.paused.store(true, Ordering::SeqCst);
                    if self.record(handle)
                        && let Some(old) = old
                    {
                        P::Sandbox::discard(old);
                    }
                    handle.update_stored();
                    return Err(RegistryError::Start(format!(
                        "the sandbox could not be resumed after its state was saved ({err:#}); the next call resumes it"
                    )));
                }
                // The next call resumes the checkpoint just taken.
                *lock(&handle.resume_checkpoint) = Some(checkpoint.id.clone());
                handle.paused.store(true, Ordering::SeqCst);
                handle.update_stored();
                self.record(handle);
                return Err(RegistryError::Start(format!(
                    "checkpoint {} was saved, but the sandbox could not be resumed from it ({err:#}); the next call tries again",
                    checkpoint.id
                )));
            }
        }
        {
            let mut record = lock(&handle.record);
            record.snapshot_writes += 1;
            record.snapshot_restores += 1;
        }
        if let Some(refused) = refused {
            P::Sandbox::discard(checkpoint.saved);
            self.record(handle);
            return Err(refused);
        }
        let info = checkpoint.info();
        handle.update_stored();
        self.record(handle);
        self.metrics.checkpointed(started.elapsed(), bytes);
        tracing::info!(sandbox = %handle.id, checkpoint = %info.checkpoint_id, bytes, took = ?started.elapsed(), "checkpoint taken");
        Ok(info)
    }

    /// The checkpoints of the sandbox, and its principal's quota.
    pub fn list_checkpoints(&self, sandbox: &SandboxRef<P::Sandbox>) -> CheckpointList {
        let handle = &sandbox.0;
        // Taken first: the total below locks every handle's list.
        let checkpoints = lock(&handle.checkpoints)
            .iter()
            .map(Checkpoint::info)
            .collect();
        CheckpointList {
            sandbox_id: handle.id.clone(),
            checkpoints,
            principal_bytes: self.principal_checkpoint_bytes(&handle.principal),
            quota_bytes: self.limits.snapshot_quota_of(&handle.principal),
        }
    }

    /// The checkpoint `id` of one of `principal`'s sandboxes, and that
    /// sandbox's id.
    fn find_checkpoint(&self, id: &str, principal: &str) -> Result<Found<P>, RegistryError> {
        let handles: Vec<_> = self.state().handles.values().cloned().collect();
        for handle in handles {
            let found = lock(&handle.checkpoints)
                .iter()
                .find(|c| c.id == id)
                .cloned();
            if let Some(found) = found {
                if handle.principal != principal {
                    return Err(RegistryError::ForbiddenCheckpoint(id.to_string()));
                }
                return Ok((handle, found));
            }
        }
        Err(RegistryError::Invalid(format!(
            "no checkpoint has id {id:?}; list_checkpoints shows a sandbox's checkpoints (a rollback discards those taken after its target, and ending a sandbox discards all of them)"
        )))
    }

    /// Rolls the leased sandbox back to its checkpoint `id`: its VM is
    /// replaced by one resumed from the checkpoint (calls running in it
    /// are cancelled), and the checkpoints taken after it are discarded.
    pub async fn rollback(
        &self,
        sandbox: &SandboxRef<P::Sandbox>,
        id: &str,
    ) -> Result<Vec<String>, RegistryError> {
        let handle = sandbox.0.clone();
        self.check_open()?;
        let (owner, _) = self.find_checkpoint(id, &handle.principal)?;
        if owner.id != handle.id {
            return Err(RegistryError::Invalid(format!(
                "checkpoint {id} belongs to sandbox {}, not {}: a rollback applies to the checkpoint's own sandbox. Use fork_sandbox with this checkpoint_id for a new sandbox from it",
                owner.id, handle.id
            )));
        }
        let _busy = Busy::new(&handle);
        let _turn = handle.resetting.lock().await;
        // Looked up again in turn: a rollback that ran meanwhile may have
        // discarded it.
        let target = lock(&handle.checkpoints)
            .iter()
            .find(|c| c.id == id)
            .cloned()
            .ok_or_else(|| {
                RegistryError::Invalid(format!(
                    "checkpoint {id} was discarded by a rollback to an earlier checkpoint while this one waited"
                ))
            })?;
        let cancel = CancellationToken::new();
        std::mem::replace(&mut *lock(&handle.cancel), cancel.clone()).cancel();
        lock(&handle.kill).fire();
        let Ok(mut slot) = tokio::time::timeout(self.limits.stall_grace, handle.slot.write()).await
        else {
            return Err(RegistryError::Busy(format!(
                "calls in sandbox {} did not end within {} of its VM being stopped; try again",
                handle.id,
                fmt_duration(self.limits.stall_grace)
            )));
        };
        if let Some(old) = slot.take() {
            old.sandbox.destroy().await;
        }
        handle.set_vm(None);
        // Its last pause is of the state being rolled back from.
        handle.forget_saved();
        let started = Instant::now();
        let sandbox = match self.provider.resume(&target.saved).await {
            Ok(sandbox) => sandbox,
            Err(err) => {
                // The next call (or rollback) resumes the checkpoint.
                self.metrics.resume_failed();
                *lock(&handle.resume_checkpoint) = Some(id.to_string());
                handle.paused.store(true, Ordering::SeqCst);
                self.record(&handle);
                return Err(RegistryError::Start(format!(
                    "the sandbox could not be resumed from checkpoint {id} ({err:#}); it is kept, and the next call tries again"
                )));
            }
        };
        if handle.ended.load(Ordering::SeqCst) {
            drop(slot);
            sandbox.destroy().await;
            return Err(RegistryError::Expired(format!(
                "sandbox {} ended while it was being rolled back",
                handle.id
            )));
        }
        handle.adopt(&sandbox);
        *lock(&handle.kill) = sandbox.kill_switch();
        *slot = Some(Slot { sandbox, cancel });
        drop(slot);
        let later: Vec<_> = {
            let mut checkpoints = lock(&handle.checkpoints);
            let position = checkpoints.iter().position(|c| c.id == id);
            match position {
                Some(at) => checkpoints.split_off(at + 1),
                None => Vec::new(),
            }
        };
        let discarded: Vec<String> = later.iter().map(|c| c.id.clone()).collect();
        if let Some(store) = &self.store
            && let Err(err) = store.remove_checkpoints(&discarded)
        {
            tracing::error!(sandbox = %handle.id, err = %format!("{err:#}"), "cannot remove rolled-back checkpoints from the registry; their files are collected at the next start");
        }
        for checkpoint in later {
            P::Sandbox::discard(checkpoint.saved);
        }
        lock(&handle.record).snapshot_restores += 1;
        handle.update_stored();
        self.record(&handle);
        self.metrics.rolled_back(started.elapsed());
        tracing::info!(sandbox = %handle.id, checkpoint = %id, discarded = discarded.len(), took = ?started.elapsed(), "sandbox rolled back");
        Ok(discarded)
    }

    /// A new sandbox of the lease's principal from checkpoint `id` (of any
    /// of its sandboxes), or from a checkpoint of the leased sandbox taken
    /// now. Returns the new sandbox and the checkpoint taken, if any.
    pub async fn fork(
        &self,
        sandbox: &SandboxRef<P::Sandbox>,
        id: Option<&str>,
    ) -> Result<(Lease<P::Sandbox>, Option<CheckpointInfo>), RegistryError> {
        let parent = sandbox.0.clone();
        self.check_open()?;
        let principal = parent.principal.clone();
        let (taken, id) = match id {
            Some(id) => (None, id.to_string()),
            None => {
                let info = self
                    .checkpoint_handle(&parent, format!("fork of sandbox {}", parent.id))
                    .await?;
                let id = info.checkpoint_id.clone();
                (Some(info), id)
            }
        };
        let (owner, checkpoint) = self.find_checkpoint(&id, &principal)?;
        self.reserve(&principal)?;
        let started = Instant::now();
        // No rollback of the owner discards the checkpoint while it is read.
        let turn = owner.resetting.lock().await;
        let resumed = self.provider.resume(&checkpoint.saved).await;
        drop(turn);
        let sandbox = match resumed {
            Ok(sandbox) => sandbox,
            Err(err) => {
                self.state().unreserve(&principal);
                self.metrics.resume_failed();
                return Err(RegistryError::Start(format!(
                    "the fork could not be started from checkpoint {id} ({err:#})"
                )));
            }
        };
        let child = self.register(&principal, sandbox, false).await?;
        lock(&child.record).snapshot_restores += 1;
        self.record(&child);
        self.metrics.forked(started.elapsed());
        tracing::info!(parent = %parent.id, child = %child.id, checkpoint = %id, took = ?started.elapsed(), "sandbox forked");
        let lease = self.lease(&child.id, &principal, None).await?;
        Ok((lease, taken))
    }
}

//! Keeping the registry in its [`Store`] and taking it up again after a
//! restart or a crash.
//!
//! Each change of a sandbox's lifecycle is written when it happens: a new
//! sandbox, a pause (after its state is on disk, before the older state is
//! removed), a resume, a reset, an end. A restart brings back every sandbox
//! with a complete saved state, paused, to resume at its next call; one
//! that was running is brought back from its last pause and says so once;
//! one that never was saved is reported as lost, never half-restored.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime};

use super::handle::{Checkpoint, Handle, lock};
use super::store::{CheckpointRow, SandboxRow, SavedRow, Store};
use super::{Conversation, Ended, Hosted, KillSwitch, Provider, Registry, SavedOf};
use crate::metrics::EndReason;

/// An `Instant` that was `wall` on the wall clock (now if in the future).
fn instant_of(wall: SystemTime) -> Instant {
    let ago = SystemTime::now().duration_since(wall).unwrap_or_default();
    Instant::now().checked_sub(ago).unwrap_or_else(Instant::now)
}

fn wall_of(instant: Instant) -> SystemTime {
    SystemTime::now()
        .checked_sub(instant.elapsed())
        .unwrap_or_else(SystemTime::now)
}

/// A handle taken up from its record, and the saved state it no longer
/// needs (removed once the record stops naming it).
type Restored<P> = (Handle<<P as Provider>::Sandbox>, Option<SavedOf<P>>);

impl<P: Provider> Registry<P> {
    fn store(&self) -> Option<&Arc<Store>> {
        self.store.as_ref()
    }

    /// Records a sandbox just made.
    pub(super) fn record_new(&self, handle: &Handle<P::Sandbox>) -> anyhow::Result<()> {
        let Some(store) = self.store() else {
            return Ok(());
        };
        store.insert_sandbox(
            &handle.id,
            &handle.principal,
            handle.stdio,
            *lock(&handle.created_wall),
        )
    }

    /// Writes `handle`'s state (saved state, clocks, counters); false if it
    /// could not be written (logged: the record keeps what it had).
    pub(super) fn record(&self, handle: &Handle<P::Sandbox>) -> bool {
        let Some(store) = self.store() else {
            return true;
        };
        let saved = {
            let saved = lock(&handle.saved);
            saved.as_ref().map(|s| SavedRow {
                dir: P::Sandbox::saved_name(s),
                bytes: P::Sandbox::saved_bytes(s),
                at: lock(&handle.saved_at).unwrap_or_else(SystemTime::now),
            })
        };
        // Read first: no guard may live through the database's fsync.
        let created = *lock(&handle.created_wall);
        let last_used = wall_of(*lock(&handle.last_used));
        let counters = handle.counters();
        let notice = lock(&handle.notice).clone();
        let written = store.update_sandbox(
            &handle.id,
            saved.as_ref(),
            handle.paused.load(Ordering::SeqCst),
            created,
            last_used,
            &counters,
            notice.as_deref(),
        );
        match written {
            Ok(()) => true,
            Err(err) => {
                tracing::error!(sandbox = %handle.id, err = %format!("{err:#}"), "cannot record the sandbox's state");
                false
            }
        }
    }

    /// Removes an ended sandbox's record (before its saved state goes, so a
    /// crash between the two leaves only unnamed files).
    pub(super) fn record_end(&self, handle: &Handle<P::Sandbox>) {
        if let Some(store) = self.store()
            && let Err(err) =
                store.remove_sandbox(&handle.id, &handle.principal, &handle.counters())
        {
            tracing::error!(sandbox = %handle.id, err = %format!("{err:#}"), "cannot remove the sandbox's record");
        }
    }

    /// Takes up the sandboxes an earlier run recorded.
    pub(super) fn recover(&self) -> anyhow::Result<()> {
        let Some(store) = self.store() else {
            return Ok(());
        };
        let mut checkpoints = store.checkpoints()?;
        for row in store.sandboxes()? {
            // The stdio conversation finds its sandbox again, or hears that
            // it was lost.
            if row.stdio {
                self.state().conversations.insert(
                    Conversation::Stdio,
                    Arc::new(tokio::sync::Mutex::new(Some(row.id.clone()))),
                );
            }
            let mut own = Vec::new();
            checkpoints.retain(|c| {
                if c.sandbox_id == row.id {
                    own.push(c.clone());
                    false
                } else {
                    true
                }
            });
            match self.restore_row(&row, &own) {
                Ok((handle, superseded)) => {
                    tracing::info!(sandbox = %row.id, principal = %row.principal, resumable_from = ?row.saved.as_ref().map(|s| &s.dir), checkpoints = own.len(), "sandbox taken up from the registry");
                    let handle = Arc::new(handle);
                    self.state().handles.insert(row.id.clone(), handle.clone());
                    if let Some(old) = superseded
                        && self.record(&handle)
                    {
                        P::Sandbox::discard(old);
                    }
                }
                Err(why) => {
                    tracing::warn!(sandbox = %row.id, %why, "sandbox lost");
                    store.remove_sandbox(&row.id, &row.principal, &row.counters)?;
                    let c = &row.counters;
                    self.metrics.ended(
                        EndReason::Lost,
                        c.vcpu_seconds,
                        c.memory_gb_seconds,
                        c.runs,
                    );
                    let mut state = self.state();
                    let after = SystemTime::now()
                        .duration_since(row.created)
                        .unwrap_or(Duration::ZERO);
                    state.remember(
                        &row.id,
                        Ended {
                            reason: EndReason::Lost,
                            after,
                        },
                    );
                }
            }
        }
        Ok(())
    }

    /// The checkpoints `rows` names whose state is still on disk (those
    /// that are not are dropped from the store, and their files are
    /// collected at the next start).
    fn load_checkpoints(&self, rows: &[CheckpointRow]) -> Vec<Checkpoint<SavedOf<P>>> {
        let mut loaded = Vec::new();
        let mut gone = Vec::new();
        for row in rows {
            match self.provider.load_saved(&row.dir) {
                Ok(saved) => loaded.push(Checkpoint {
                    id: row.id.clone(),
                    label: row.label.clone().unwrap_or_default(),
                    created: row.created,
                    bytes: row.bytes,
                    saved,
                }),
                Err(err) => {
                    tracing::warn!(checkpoint = %row.id, sandbox = %row.sandbox_id, err = %format!("{err:#}"), "checkpoint lost");
                    gone.push(row.id.clone());
                }
            }
        }
        if let Some(store) = self.store()
            && let Err(err) = store.remove_checkpoints(&gone)
        {
            tracing::error!(err = %format!("{err:#}"), "cannot remove lost checkpoints from the registry");
        }
        loaded
    }

    /// A paused handle for `row` and its checkpoints, or why it cannot
    /// come back. A sandbox that was running comes back from the newer of
    /// its last pause and its last checkpoint.
    fn restore_row(
        &self,
        row: &SandboxRow,
        checkpoint_rows: &[CheckpointRow],
    ) -> Result<Restored<P>, String> {
        let checkpoints = self.load_checkpoints(checkpoint_rows);
        let saved = match &row.saved {
            Some(saved_row) => match self.provider.load_saved(&saved_row.dir) {
                Ok(saved) => Some((saved, saved_row.at)),
                Err(err) if checkpoints.is_empty() => {
                    return Err(format!("its saved state cannot be used: {err:#}"));
                }
                Err(err) => {
                    tracing::warn!(sandbox = %row.id, err = %format!("{err:#}"), "its last pause cannot be used; it comes back from its last checkpoint");
                    None
                }
            },
            None => None,
        };
        let newest_checkpoint = checkpoints.iter().max_by_key(|c| c.created);
        let from_checkpoint = match (&saved, newest_checkpoint) {
            (None, Some(c)) => Some((c.id.clone(), c.created)),
            (Some((_, at)), Some(c)) if !row.paused && c.created > *at => {
                Some((c.id.clone(), c.created))
            }
            (None, None) => {
                return Err(
                    "it was running when the server stopped, and had never been saved".into(),
                );
            }
            _ => None,
        };
        let handle = Handle::empty(
            row.id.clone(),
            &row.principal,
            None,
            KillSwitch::none(),
            self.memory_gb,
            row.stdio,
            self.events.clone(),
        );
        handle.carry_over(&row.counters);
        *lock(&handle.created) = instant_of(row.created);
        *lock(&handle.created_wall) = row.created;
        *lock(&handle.last_used) = instant_of(row.last_used);
        let saved_at = saved.as_ref().map(|(_, at)| *at);
        let image = match (&from_checkpoint, &saved) {
            (Some((id, _)), _) => checkpoints
                .iter()
                .find(|c| &c.id == id)
                .map(|c| P::Sandbox::saved_image(&c.saved)),
            (None, Some((s, _))) => Some(P::Sandbox::saved_image(s)),
            (None, None) => None,
        };
        if let Some(image) = image {
            *lock(&handle.image) = image;
        }
        let mut superseded = None;
        *lock(&handle.checkpoints) = checkpoints;
        match from_checkpoint {
            Some((ref id, _)) => {
                // The last pause is older than the checkpoint: it goes once
                // the record no longer names it.
                *lock(&handle.saved) = None;
                superseded = saved.map(|(s, _)| s);
                *lock(&handle.resume_checkpoint) = Some(id.clone());
            }
            None => {
                *lock(&handle.saved) = saved.map(|(s, _)| s);
                *lock(&handle.saved_at) = saved_at;
            }
        }
        handle.update_stored();
        handle.paused.store(true, Ordering::SeqCst);
        // One the last run had not said yet stands, unless a newer one
        // replaces it.
        *lock(&handle.notice) = row.notice.clone();
        if !row.paused {
            let (what, at) = match (&from_checkpoint, saved_at) {
                (Some((id, at)), _) => (format!("at its checkpoint {id}"), *at),
                (None, Some(at)) => ("when it was last paused".to_string(), at),
                (None, None) => ("when it was last saved".to_string(), SystemTime::now()),
            };
            *lock(&handle.notice) = Some(format!(
                "Note: the server stopped unexpectedly while this sandbox was running. It was brought back as it was {what} ({} ago); files written and variables set after that are gone.",
                super::fmt_duration(SystemTime::now().duration_since(at).unwrap_or_default())
            ));
        }
        Ok((handle, superseded))
    }
}

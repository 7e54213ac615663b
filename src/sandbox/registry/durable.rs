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

use super::handle::{Handle, lock};
use super::store::{SandboxRow, SavedRow, Store};
use super::{Conversation, Ended, Hosted, KillSwitch, Provider, Registry};
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
        let written = store.update_sandbox(
            &handle.id,
            saved.as_ref(),
            handle.paused.load(Ordering::SeqCst),
            *lock(&handle.created_wall),
            wall_of(*lock(&handle.last_used)),
            &handle.counters(),
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
        for row in store.sandboxes()? {
            // The stdio conversation finds its sandbox again, or hears that
            // it was lost.
            if row.stdio {
                self.state().conversations.insert(
                    Conversation::Stdio,
                    Arc::new(tokio::sync::Mutex::new(Some(row.id.clone()))),
                );
            }
            match self.restore_row(&row) {
                Ok(handle) => {
                    tracing::info!(sandbox = %row.id, principal = %row.principal, resumable_from = ?row.saved.as_ref().map(|s| &s.dir), "sandbox taken up from the registry");
                    self.state()
                        .handles
                        .insert(row.id.clone(), Arc::new(handle));
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

    /// A paused handle for `row`, or why it cannot come back.
    fn restore_row(&self, row: &SandboxRow) -> Result<Handle<P::Sandbox>, String> {
        let Some(saved_row) = &row.saved else {
            return Err("it was running when the server stopped, and had never been saved".into());
        };
        let saved = self
            .provider
            .load_saved(&saved_row.dir)
            .map_err(|err| format!("its saved state cannot be used: {err:#}"))?;
        let handle = Handle::empty(
            row.id.clone(),
            &row.principal,
            None,
            KillSwitch::none(),
            self.memory_gb,
            row.stdio,
        );
        handle.carry_over(&row.counters);
        *lock(&handle.created) = instant_of(row.created);
        *lock(&handle.created_wall) = row.created;
        *lock(&handle.last_used) = instant_of(row.last_used);
        lock(&handle.record).set_stored(P::Sandbox::saved_bytes(&saved));
        *lock(&handle.saved) = Some(saved);
        *lock(&handle.saved_at) = Some(saved_row.at);
        handle.paused.store(true, Ordering::SeqCst);
        if !row.paused {
            *lock(&handle.notice) = Some(format!(
                "Note: the server stopped unexpectedly while this sandbox was running. It was brought back as it was when it was last saved ({} ago); files written and variables set after that are gone.",
                super::fmt_duration(
                    SystemTime::now()
                        .duration_since(saved_row.at)
                        .unwrap_or_default()
                )
            ));
        }
        Ok(handle)
    }
}

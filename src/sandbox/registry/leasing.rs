//! Finding a call's sandbox: a conversation's (made at its first call), or
//! one named by id, checked against its owner and its lifetime, resumed if
//! paused, and held by a [`Lease`] for the call.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use super::handle::Handle;
use super::*;

impl<P: Provider> Registry<P> {
    /// The conversation's sandbox, created now if it has none yet.
    pub async fn acquire(
        &self,
        conversation: &Conversation,
        principal: &str,
        image: Option<&str>,
    ) -> Result<Lease<P::Sandbox>, RegistryError> {
        self.check_open()?;
        let binding = self.binding(conversation);
        let mut bound = binding.lock().await;
        if let Some(id) = bound.as_ref() {
            // Checked before the lease, which would resume a paused sandbox.
            let running = self.state().handles.get(id).map(|h| lock(&h.image).clone());
            if let (Some(wanted), Some(running)) = (image, running)
                && wanted != running
            {
                return Err(RegistryError::Invalid(format!(
                    "this conversation's sandbox runs the image {running:?}; `image` chooses the image of a new sandbox only (reset_sandbox keeps the image)"
                )));
            }
            return self.lease(id, principal, Some(conversation)).await;
        }
        let handle = self.create(principal, Some(conversation), image).await?;
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
        match self.bound_id(conversation).await {
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
        image: Option<&str>,
    ) -> Result<Lease<P::Sandbox>, RegistryError> {
        self.check_open()?;
        let handle = self.create(principal, None, image).await?;
        self.lease(&handle.id, principal, None).await
    }

    /// The sandbox with this explicit id, if `principal` owns it.
    pub async fn get(&self, id: &str, principal: &str) -> Result<Lease<P::Sandbox>, RegistryError> {
        self.check_open()?;
        self.lease(id, principal, None).await
    }

    /// The sandbox a call names (by id, or as its conversation's), checked
    /// against its owner and its lifetime, whether or not it has a VM now
    /// (a rollback can give it one).
    pub async fn resolve(
        &self,
        conversation: Option<&Conversation>,
        id: Option<&str>,
        principal: &str,
    ) -> Result<SandboxRef<P::Sandbox>, RegistryError> {
        self.check_open()?;
        let id = match (id, conversation) {
            (Some(id), _) => id.to_string(),
            (None, Some(conversation)) => self.bound_id(conversation).await.ok_or_else(|| {
                    RegistryError::Invalid(
                        "this conversation has no sandbox yet: its first tool call (run_code, write_file, ...) creates it".into(),
                    )
                })?,
            (None, None) => {
                return Err(RegistryError::Invalid(
                    "name the sandbox: pass the sandbox_id returned by an earlier call".into(),
                ));
            }
        };
        let handle = self.find(&id, principal, conversation).await?;
        Ok(SandboxRef(handle))
    }

    /// The id of the sandbox `conversation` is bound to, if any.
    async fn bound_id(&self, conversation: &Conversation) -> Option<String> {
        let binding = self.state().conversations.get(conversation).cloned()?;
        binding.lock().await.clone()
    }

    pub(super) fn check_open(&self) -> Result<(), RegistryError> {
        if self.closed.load(Ordering::SeqCst) {
            Err(RegistryError::ShuttingDown)
        } else {
            Ok(())
        }
    }

    /// The live handle `id`, if `principal` owns it and it has not expired
    /// (expiring it now if the reaper has not come round yet).
    pub(super) async fn find(
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

    pub(super) async fn lease(
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

    pub(super) fn expired_error(&self, id: &str, ended: &Ended, implicit: bool) -> RegistryError {
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
}

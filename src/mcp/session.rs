//! HTTP sessions: rmcp's in-memory session manager, plus one hook: when a
//! session closes (client DELETE, idle session worker, server shutdown), the
//! sandbox bound to it is destroyed and its owner forgets it. Sessions are
//! never restored from an id alone: an unknown id is just unknown.

use std::sync::Arc;

use futures::Stream;
use rmcp::model::{ClientJsonRpcMessage, ServerJsonRpcMessage};
use rmcp::transport::streamable_http_server::session::local::LocalSessionManager;
use rmcp::transport::streamable_http_server::session::{
    EventStore, RestoreOutcome, ServerSseMessage, SessionId, SessionManager,
};

use super::Registry;
use super::admission::SessionOwners;
use crate::sandbox::registry::Conversation;

pub struct SandboxSessions {
    inner: LocalSessionManager,
    registry: Arc<Registry>,
    owners: SessionOwners,
}

impl SandboxSessions {
    pub fn new(
        inner: LocalSessionManager,
        registry: Arc<Registry>,
        owners: SessionOwners,
    ) -> SandboxSessions {
        SandboxSessions {
            inner,
            registry,
            owners,
        }
    }
}

impl SessionManager for SandboxSessions {
    type Error = <LocalSessionManager as SessionManager>::Error;
    type Transport = <LocalSessionManager as SessionManager>::Transport;

    async fn create_session(&self) -> Result<(SessionId, Self::Transport), Self::Error> {
        self.inner.create_session().await
    }

    async fn initialize_session(
        &self,
        id: &SessionId,
        message: ClientJsonRpcMessage,
    ) -> Result<ServerJsonRpcMessage, Self::Error> {
        self.inner.initialize_session(id, message).await
    }

    async fn has_session(&self, id: &SessionId) -> Result<bool, Self::Error> {
        self.inner.has_session(id).await
    }

    async fn close_session(&self, id: &SessionId) -> Result<(), Self::Error> {
        // Fires on DELETE and again when the session worker exits: both the
        // registry and the inner manager take a second close calmly.
        self.registry
            .release(&Conversation::Session(id.to_string()))
            .await;
        self.owners.forget(id);
        match self.inner.close_session(id).await {
            Ok(()) => Ok(()),
            // Already gone (the second close).
            Err(err) if !self.inner.has_session(id).await.unwrap_or(false) => {
                tracing::debug!(session = %id, %err, "session already closed");
                Ok(())
            }
            Err(err) => Err(err),
        }
    }

    async fn create_stream(
        &self,
        id: &SessionId,
        message: ClientJsonRpcMessage,
    ) -> Result<impl Stream<Item = ServerSseMessage> + Send + Sync + 'static, Self::Error> {
        self.inner.create_stream(id, message).await
    }

    async fn accept_message(
        &self,
        id: &SessionId,
        message: ClientJsonRpcMessage,
    ) -> Result<(), Self::Error> {
        self.inner.accept_message(id, message).await
    }

    async fn create_standalone_stream(
        &self,
        id: &SessionId,
    ) -> Result<impl Stream<Item = ServerSseMessage> + Send + Sync + 'static, Self::Error> {
        self.inner.create_standalone_stream(id).await
    }

    async fn resume(
        &self,
        id: &SessionId,
        last_event_id: String,
    ) -> Result<impl Stream<Item = ServerSseMessage> + Send + Sync + 'static, Self::Error> {
        self.inner.resume(id, last_event_id).await
    }

    async fn restore_session(
        &self,
        _id: SessionId,
    ) -> Result<RestoreOutcome<Self::Transport>, Self::Error> {
        Ok(RestoreOutcome::NotSupported)
    }

    fn event_store(&self) -> Option<Arc<dyn EventStore>> {
        self.inner.event_store()
    }
}

//! The egress relay: user code's only way out of the guest.
//!
//! The guest has no network device. While the host grants egress, the
//! agent listens on 127.0.0.1:[`EGRESS_PROXY_PORT`] (user code's
//! `HTTP_PROXY`/`HTTPS_PROXY` point there) and relays each accepted TCP
//! connection, byte for byte, over its own vsock connection to the host's
//! [`EGRESS_VSOCK_PORT`]. The relay understands nothing of HTTP: the host
//! reads the proxy request, applies the policy and answers, so nothing in
//! here can be talked into reaching anything the host would not.
//!
//! Without egress nothing listens, and a proxied connection is refused at
//! once. The host bounds connections per sandbox; the bound here only keeps
//! a flood from exhausting PID 1's descriptors.

use std::sync::Arc;
use std::sync::Mutex;

use airlock_protocol::{EGRESS_PROXY_PORT, EGRESS_VSOCK_PORT};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;
use tokio_vsock::{VMADDR_CID_HOST, VsockAddr, VsockStream};

use crate::log::log;

/// Relayed connections open at once; past this new ones are closed at once.
/// Above what the VMM forwards (224) and the host's per-sandbox bound, so
/// the host's bound is the one a program meets, with an answer saying so.
const MAX_RELAYED: usize = 256;
/// Per direction per connection. Bigger than tokio's 8 KiB default: each
/// read and write is a guest system call, and those are what cost here.
const RELAY_BUFFER: usize = 32 * 1024;

#[derive(Default)]
pub struct EgressRelay {
    listener: Mutex<Option<JoinHandle<()>>>,
}

impl EgressRelay {
    /// Starts or stops listening; returns whether the relay listens now.
    /// Stopping closes the listener; relayed connections run to their end.
    pub async fn set(&self, on: bool) -> Result<bool, String> {
        if !on {
            if let Some(task) = self.take() {
                task.abort();
            }
            return Ok(false);
        }
        if self.is_running() {
            return Ok(true);
        }
        let listener = TcpListener::bind(("127.0.0.1", EGRESS_PROXY_PORT))
            .await
            .map_err(|e| format!("egress relay: cannot listen on port {EGRESS_PROXY_PORT}: {e}"))?;
        let task = tokio::spawn(serve(listener));
        let mut slot = self.listener.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(old) = slot.replace(task) {
            old.abort();
        }
        Ok(true)
    }

    fn is_running(&self) -> bool {
        let slot = self.listener.lock().unwrap_or_else(|e| e.into_inner());
        slot.as_ref().is_some_and(|task| !task.is_finished())
    }

    fn take(&self) -> Option<JoinHandle<()>> {
        self.listener
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
    }
}

async fn serve(listener: TcpListener) {
    let permits = Arc::new(Semaphore::new(MAX_RELAYED));
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                // EMFILE and friends: drop this one and go on; the permits
                // bound how many we hold.
                log!("egress relay: accept: {e}");
                tokio::task::yield_now().await;
                continue;
            }
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            continue; // Dropping the stream closes it.
        };
        tokio::spawn(async move {
            relay(stream).await;
            drop(permit);
        });
    }
}

async fn relay(mut tcp: TcpStream) {
    let addr = VsockAddr::new(VMADDR_CID_HOST, EGRESS_VSOCK_PORT);
    let mut vsock = match VsockStream::connect(addr).await {
        Ok(stream) => stream,
        // The host refused: the client sees its connection closed.
        Err(_) => return,
    };
    let _ =
        tokio::io::copy_bidirectional_with_sizes(&mut tcp, &mut vsock, RELAY_BUFFER, RELAY_BUFFER)
            .await;
}

//! The airlock guest agent. It runs as PID 1 inside each microVM: it sets up
//! the system, reaps zombies and answers the host over vsock.
//!
//! Guest system calls, interrupts and wake-ups are expensive (about 1 ms each
//! under a software hypervisor), so the agent is quiet: a single-threaded
//! runtime, no timers or polling while idle, and few system calls per request.
//!
//! PID 1 must never exit (the kernel panics), so panics are caught at every
//! level and `main` never returns when running as init.

mod conn;
mod init;
mod log;
mod reaper;
mod server;

use std::io;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::time::Duration;

use airlock_protocol::{AGENT_VSOCK_PORT, PROTOCOL_VERSION};

use crate::log::log;

pub const VERSION: &str = env!("CARGO_PKG_VERSION");

fn main() {
    // As PID 1 the arguments are whatever the kernel command line left over:
    // never let them make init exit.
    if std::process::id() != 1 {
        println!("airlock-agent {VERSION} (protocol {PROTOCOL_VERSION})");
        return;
    }
    run_as_init()
}

fn run_as_init() -> ! {
    std::panic::set_hook(Box::new(|info| log!("panic: {info}")));
    init::setup();
    // Before the runtime exists, so the reaper is in place for every child.
    let reaper = reaper::Reaper::start();
    if let Err(e) = &reaper {
        log!("cannot start the reaper (zombies will pile up): {e}");
    }
    let agent = Arc::new(server::Agent::new(Box::new(server::reboot_guest)));
    loop {
        match catch_unwind(AssertUnwindSafe(|| serve(&agent))) {
            Ok(e) => log!("cannot start the runtime: {e}"),
            Err(_) => log!("the server panicked; restarting it"),
        }
        std::thread::sleep(Duration::from_secs(1));
    }
}

/// Runs the listener, which does not return; a fresh runtime on each call.
fn serve(agent: &Arc<server::Agent>) -> io::Error {
    // current_thread: no worker threads to wake. The time driver only fires
    // for the listener's failure backoff; with no timer armed it costs nothing.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .enable_time()
        .build();
    match runtime {
        Ok(runtime) => {
            runtime.block_on(server::listen(agent.clone(), AGENT_VSOCK_PORT));
            io::Error::other("the vsock listener returned")
        }
        Err(e) => e,
    }
}

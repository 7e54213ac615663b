//! The airlock guest agent. It runs as PID 1 inside each microVM: it sets up
//! the system, reaps zombies and answers the host over vsock: it runs
//! commands and code (in warm interpreters) as the unprivileged sandbox user,
//! and reads and writes files.
//!
//! Guest system calls, interrupts and wake-ups are expensive (about 1 ms each
//! under a software hypervisor), so the agent is quiet: a single-threaded
//! runtime, no timers or polling while idle, and few system calls per request.
//!
//! PID 1 must never exit (the kernel panics), so panics are caught at every
//! level and `main` never returns when running as init.
//!
//! `airlock-agent --serve-unix PATH [--home DIR]` serves the same protocol
//! on a Unix socket as the current user, without mounts or cgroups: for
//! tests and for measuring the agent (e.g. under `strace -f -c`) on a host.
//! There, `AIRLOCK_IMAGE_CONFIG=FILE` stands for a custom image's
//! `/etc/airlock/image.json` (see `image`).

mod cgroup;
mod config;
mod conn;
mod egress;
mod exec;
mod file_helper;
mod files;
mod freshness;
mod image;
mod init;
mod interp;
mod log;
mod ops;
mod pipe;
mod reaper;
mod request;
mod server;
mod spawn;
mod sys;

use std::io;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use airlock_protocol::{AGENT_VSOCK_PORT, PROTOCOL_VERSION};

use crate::log::log;

pub const VERSION: &str = env!("CARGO_PKG_VERSION");

fn main() {
    // As PID 1 the arguments are whatever the kernel command line left over:
    // never let them make init exit.
    if std::process::id() == 1 {
        run_as_init()
    }
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some(file_helper::HELPER_ARG) => {
            let home = args
                .get(1)
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from("/"));
            if let Err(e) = file_helper::serve(&home) {
                eprintln!("airlock-agent file helper: {e}");
                std::process::exit(1);
            }
        }
        Some("--serve-unix") => {
            let Some(path) = args.get(1) else {
                eprintln!("usage: airlock-agent --serve-unix PATH [--home DIR]");
                std::process::exit(2);
            };
            let home = match args.get(2).map(String::as_str) {
                Some("--home") => args.get(3).map(PathBuf::from),
                _ => None,
            };
            if let Err(e) = serve_unix(PathBuf::from(path), home) {
                eprintln!("airlock-agent: {e}");
                std::process::exit(1);
            }
        }
        _ => println!("airlock-agent {VERSION} (protocol {PROTOCOL_VERSION})"),
    }
}

fn run_as_init() -> ! {
    std::panic::set_hook(Box::new(|info| log!("panic: {info}")));
    init::setup();
    // Before the runtime exists, so the reaper is in place for every child.
    let reaper = reaper::Reaper::start();
    if let Err(e) = &reaper {
        log!("cannot start the reaper (zombies will pile up, no user code): {e}");
    }
    let reaper = reaper.ok();
    loop {
        match catch_unwind(AssertUnwindSafe(|| serve(reaper.clone()))) {
            Ok(e) => log!("cannot start the runtime: {e}"),
            Err(_) => log!("the server panicked; restarting it"),
        }
        std::thread::sleep(Duration::from_secs(1));
    }
}

/// current_thread: no worker threads to wake. The time driver only fires for
/// request timeouts and the listener's failure backoff; with no timer armed
/// it costs nothing.
fn runtime() -> io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .enable_time()
        .build()
}

/// Runs the listener, which does not return; a fresh runtime on each call.
/// The warm interpreters start here (again, after a panic: their cgroups are
/// emptied first).
fn serve(reaper: Option<reaper::Reaper>) -> io::Error {
    match runtime() {
        Ok(runtime) => {
            runtime.block_on(async {
                let mut agent = server::Agent::new(Box::new(server::reboot_guest));
                if let Some(reaper) = reaper {
                    agent = agent.with_ops(ops::Ops::start(config::Config::guest(), reaper));
                }
                server::listen(Arc::new(agent), AGENT_VSOCK_PORT).await
            });
            io::Error::other("the vsock listener returned")
        }
        Err(e) => e,
    }
}

/// The debug mode: the protocol on a Unix socket, as the current user.
fn serve_unix(path: PathBuf, home: Option<PathBuf>) -> io::Result<()> {
    // Orphans of user code come to us, as they do to PID 1.
    // SAFETY: prctl with integer arguments.
    unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
    let reaper = reaper::Reaper::start()?;
    let home = match home {
        Some(h) => h,
        None => std::env::current_dir()?,
    };
    let run_dir = std::env::temp_dir().join(format!("airlock-agent-{}", std::process::id()));
    let config = config::Config::debug(home, run_dir);
    let _ = std::fs::remove_file(&path);
    runtime()?.block_on(async {
        let ops = ops::Ops::start(config, reaper);
        let agent = Arc::new(server::Agent::new(Box::new(|| std::process::exit(0))).with_ops(ops));
        let listener = tokio::net::UnixListener::bind(&path)?;
        log!("{VERSION} serving on {}", path.display());
        loop {
            let (stream, _) = listener.accept().await?;
            // The same stream type as for vsock, so that measurements here
            // tell what the guest does.
            let conn = conn::Conn::new(std::os::fd::OwnedFd::from(stream.into_std()?))?;
            tokio::spawn(server::serve_connection(
                agent.clone(),
                conn.clone(),
                conn,
                "unix",
            ));
        }
    })
}

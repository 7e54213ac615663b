//! Zombie reaping for PID 1, without signals or polling.
//!
//! One thread blocks in `waitid(P_ALL)` while the agent has any child
//! (orphans reparented to PID 1 included), and on a condition variable while
//! it has none. Each exit therefore costs one `waitid` return and one `waitpid`,
//! nothing else; an idle agent costs nothing. A SIGCHLD handler would add a signal delivery
//! and a self-pipe round trip per exit.
//!
//! Because this thread reaps every child, nothing else in the agent may wait
//! for a child (no `Child::wait`, no `tokio::process`): children are started
//! through [`Reaper::spawn`], which hands their exit status back.

use std::collections::HashMap;
use std::io;
use std::os::unix::process::ExitStatusExt;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::process::ExitStatus;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};

use tokio::sync::oneshot;

use crate::log::log;

#[derive(Clone)]
pub struct Reaper {
    shared: Arc<Shared>,
}

struct Shared {
    state: Mutex<State>,
    spawned: Condvar,
}

#[derive(Default)]
struct State {
    /// Bumped on every spawn, so the reaper can tell "no children" from "no
    /// children yet".
    generation: u64,
    waiters: HashMap<libc::pid_t, oneshot::Sender<ExitStatus>>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Reaper {
    pub fn start() -> io::Result<Reaper> {
        let shared = Arc::new(Shared {
            state: Mutex::default(),
            spawned: Condvar::new(),
        });
        let thread_shared = shared.clone();
        std::thread::Builder::new()
            .name("reaper".into())
            .spawn(move || {
                loop {
                    // A panic must not stop reaping for good.
                    if catch_unwind(AssertUnwindSafe(|| reap_forever(&thread_shared))).is_err() {
                        log!("reaper panicked; restarting it");
                    }
                }
            })?;
        Ok(Reaper { shared })
    }

    /// Runs `spawn`, which must start exactly one child and return it with
    /// its pid; the child's exit status arrives on the returned receiver.
    ///
    /// `spawn` runs under the reaper's lock, so the child cannot be reaped
    /// before its waiter is registered.
    pub fn spawn<T>(
        &self,
        spawn: impl FnOnce() -> io::Result<(T, u32)>,
    ) -> io::Result<(T, oneshot::Receiver<ExitStatus>)> {
        let mut state = self.shared.lock();
        let (value, pid) = spawn()?;
        let (tx, rx) = oneshot::channel();
        state.waiters.insert(pid as libc::pid_t, tx);
        state.generation += 1;
        drop(state);
        self.shared.spawned.notify_one();
        Ok((value, rx))
    }
}

fn reap_forever(shared: &Shared) {
    loop {
        let seen = shared.lock().generation;
        // Wait for a child to be waitable without reaping it yet: while a
        // spawn is in progress (it holds the lock), std may itself wait for
        // a child whose exec failed, and must find it there.
        // SAFETY: waitid fills a zeroed plain-data struct.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        let rc = unsafe { libc::waitid(libc::P_ALL, 0, &mut info, libc::WEXITED | libc::WNOWAIT) };
        if rc == 0 {
            // SAFETY: waitid succeeded with WEXITED: si_pid is set.
            let pid = unsafe { info.si_pid() };
            let mut state = shared.lock();
            let mut status = 0;
            // SAFETY: plain system call with a valid out-pointer. ECHILD or
            // 0 here means a spawner reaped it (a failed exec): nothing to do.
            if unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) } == pid {
                // Unregistered pids are orphans: reaping them is all they need.
                if let Some(tx) = state.waiters.remove(&pid) {
                    let _ = tx.send(ExitStatus::from_raw(status));
                }
            }
            continue;
        }
        match io::Error::last_os_error().raw_os_error() {
            Some(libc::EINTR) => {}
            Some(libc::ECHILD) => {
                let mut state = shared.lock();
                if state.generation == seen {
                    // No child at all, and none started since we looked:
                    // any waiter left lost its child to someone else's wait.
                    state.waiters.clear();
                    while state.generation == seen {
                        state = shared
                            .spawned
                            .wait(state)
                            .unwrap_or_else(PoisonError::into_inner);
                    }
                }
            }
            _ => {
                // Cannot happen with these arguments; do not spin if it does.
                log!("waitid: {}", io::Error::last_os_error());
                std::thread::sleep(std::time::Duration::from_secs(1));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;
    use std::time::Duration;

    // The only test in this binary that starts processes: the reaper reaps
    // every child of the test process.
    #[test]
    fn statuses_reach_their_waiters_and_orphans_are_reaped() {
        // Become a subreaper so that orphans come to us as they do to PID 1.
        // SAFETY: prctl with integer arguments.
        assert_eq!(
            unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) },
            0
        );
        let reaper = Reaper::start().unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        rt.block_on(async {
            let start = |script: &str| {
                let mut cmd = Command::new("/bin/sh");
                cmd.args(["-c", script]);
                reaper
                    .spawn(|| {
                        let child = cmd.spawn()?;
                        let pid = child.id();
                        Ok((child, pid))
                    })
                    .unwrap()
                    .1
            };
            // Leaves a grandchild behind that becomes our orphan.
            let orphaner = start("sleep 0.2 & echo $! > /dev/null; exit 0");
            let exit3 = start("exit 3");
            let killed = start("kill -9 $$");
            // An exec that fails: std waits for that child itself, which
            // must not race with the reaper.
            for _ in 0..20 {
                let err = reaper
                    .spawn(|| {
                        let child = Command::new("/no/such/program").spawn()?;
                        let pid = child.id();
                        Ok((child, pid))
                    })
                    .expect_err("no such program");
                assert_eq!(err.kind(), std::io::ErrorKind::NotFound);
            }
            let ok = start("true");
            let timeout = Duration::from_secs(10);
            let get = |rx| tokio::time::timeout(timeout, rx);
            assert_eq!(get(exit3).await.unwrap().unwrap().code(), Some(3));
            assert_eq!(get(killed).await.unwrap().unwrap().signal(), Some(9));
            assert!(get(ok).await.unwrap().unwrap().success());
            assert!(get(orphaner).await.unwrap().unwrap().success());
            // After a pause with no children, a new spawn wakes the reaper.
            tokio::time::sleep(Duration::from_millis(500)).await;
            assert_eq!(get(start("exit 7")).await.unwrap().unwrap().code(), Some(7));
        });
        // The orphan (sleep 0.2) has been reaped too: no zombie children left.
        std::thread::sleep(Duration::from_millis(100));
        // SAFETY: WNOHANG probe for any child.
        let left = unsafe { libc::waitpid(-1, std::ptr::null_mut(), libc::WNOHANG) };
        assert_eq!(left, -1, "a child is still there");
    }
}

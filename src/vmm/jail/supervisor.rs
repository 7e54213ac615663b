//! The fork into the new PID namespace, and the supervisor that stays
//! outside: it tells the child its host pid, forwards stop signals to it,
//! removes its cgroup when it ends, and exits as it did.
//!
//! The supervisor keeps the control pipes open but never reads or writes
//! them; the VMM inside owns the channel. It runs under its own seccomp
//! filter.

use std::io::Read;
use std::os::fd::{AsRawFd, OwnedFd};

use super::cgroup::Cgroup;
use super::{JailError, check, owned};
use crate::vmm::seccomp;
use crate::vmm::seccomp_filters::Role;

/// The child's end of the fork: where its host pid arrives.
pub struct Handshake(OwnedFd);

impl Handshake {
    /// Waits for the supervisor to say which pid the host gave this child.
    pub fn host_pid(self) -> Result<u32, JailError> {
        let mut file = std::fs::File::from(self.0);
        let mut bytes = [0u8; 4];
        file.read_exact(&mut bytes).map_err(super::os_error(
            "cannot read the host pid from the supervisor",
        ))?;
        Ok(u32::from_le_bytes(bytes))
    }
}

/// The supervisor's end: the child's pid and where to tell it.
pub struct ParentEnd {
    child: libc::pid_t,
}

/// Forks. The child gets `Some(Handshake)`; the parent gets `None` and the
/// child's pid. After `unshare(CLONE_NEWPID)`, the child is PID 1 inside.
pub fn fork() -> Result<(Option<Handshake>, ParentEnd), JailError> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two fds into the array.
    check(
        unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) },
        "pipe2",
    )?;
    let (read_end, write_end) = (owned(fds[0]), owned(fds[1]));
    // Blocked before the fork, so a child that ends at once is not missed.
    let signals = supervised_signals();
    // SAFETY: changes this thread's signal mask only.
    unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &signals, std::ptr::null_mut()) };
    // SAFETY: the process is single-threaded here (the VMM has started no
    // thread yet), so the child may go on running Rust code.
    let pid = unsafe { libc::fork() };
    check(pid, "fork")?;
    if pid == 0 {
        drop(write_end);
        // The VMM takes its stop signals itself (still blocked); SIGCHLD is
        // the supervisor's.
        // SAFETY: as above, on a set we own.
        unsafe {
            let mut chld = std::mem::zeroed::<libc::sigset_t>();
            libc::sigemptyset(&mut chld);
            libc::sigaddset(&mut chld, libc::SIGCHLD);
            libc::pthread_sigmask(libc::SIG_UNBLOCK, &chld, std::ptr::null_mut());
        }
        // The VMM dies with its supervisor, even if that is SIGKILLed.
        // SAFETY: prctl with these arguments only sets a flag.
        check(
            unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) },
            "PR_SET_PDEATHSIG",
        )?;
        return Ok((Some(Handshake(read_end)), ParentEnd { child: 0 }));
    }
    drop(read_end);
    let bytes = (pid as u32).to_le_bytes();
    // SAFETY: writes 4 bytes from our buffer to the pipe we own.
    let written = unsafe { libc::write(write_end.as_raw_fd(), bytes.as_ptr().cast(), 4) };
    if written != 4 {
        return Err(JailError::Setup(
            "cannot tell the jailed VMM its pid".into(),
        ));
    }
    Ok((None, ParentEnd { child: pid }))
}

/// The supervisor's life: forward stop signals, wait for the child, clean
/// up, exit with its status.
pub fn run(parent: ParentEnd, cgroup: Option<Cgroup>) -> ! {
    let signals = supervised_signals();
    if let Err(err) = seccomp::try_confine(Role::Jailer) {
        eprintln!("airlock vmm supervisor: {err}");
        // SAFETY: kill and _exit are plain syscalls.
        unsafe {
            libc::kill(parent.child, libc::SIGKILL);
            libc::_exit(1);
        }
    }
    let code = loop {
        if let Some(code) = reap(parent.child) {
            break code;
        }
        // SAFETY: waits for one of the blocked signals; no memory is shared.
        let sig = unsafe { libc::sigtimedwait(&signals, std::ptr::null_mut(), std::ptr::null()) };
        match sig {
            libc::SIGTERM | libc::SIGINT | libc::SIGHUP => {
                // SAFETY: signals our own child.
                unsafe { libc::kill(parent.child, sig) };
            }
            _ => {}
        }
    };
    if let Some(cgroup) = cgroup {
        cgroup.remove();
    }
    // SAFETY: ends this process; nothing of ours needs unwinding.
    unsafe { libc::_exit(code) }
}

/// The child's exit code once it has ended, as a shell would give it.
fn reap(child: libc::pid_t) -> Option<i32> {
    let mut status = 0;
    // SAFETY: waitpid writes the status of our own child.
    let pid = unsafe { libc::waitpid(child, &mut status, libc::WNOHANG) };
    if pid != child {
        return None;
    }
    if libc::WIFEXITED(status) {
        Some(libc::WEXITSTATUS(status))
    } else if libc::WIFSIGNALED(status) {
        let sig = libc::WTERMSIG(status);
        if sig == libc::SIGSYS {
            // Killed by the kernel for a syscall (the filter traps; this is
            // the backstop): say so on the control channel, as the handler would.
            let line = format!(
                "{{\"event\":\"{}\",\"syscall\":-1,\"thread\":\"unknown\"}}\n",
                seccomp::VIOLATION_EVENT
            );
            // SAFETY: writes our buffer to stdout.
            unsafe { libc::write(1, line.as_ptr().cast(), line.len()) };
        }
        Some(128 + sig)
    } else {
        None
    }
}

fn supervised_signals() -> libc::sigset_t {
    // SAFETY: sigemptyset/sigaddset fill the set we own.
    unsafe {
        let mut set = std::mem::zeroed::<libc::sigset_t>();
        libc::sigemptyset(&mut set);
        for sig in [libc::SIGCHLD, libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
            libc::sigaddset(&mut set, sig);
        }
        set
    }
}

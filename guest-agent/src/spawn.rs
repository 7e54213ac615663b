//! Starting user processes: as the sandbox user, in their own session
//! (process group) and cgroup, with the pipes the agent reads.
//!
//! Everything that must hold before the program runs is done in the child
//! between fork and exec, with raw system calls only (no allocation): join
//! the cgroup (so nothing escapes it), undo the agent's OOM immunity, start
//! a new session, map extra fds, drop privileges, change directory.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};

use tokio::sync::oneshot;

use crate::reaper::Reaper;
use crate::sys::{self, Creds};

pub struct SpawnSpec {
    /// Program (a path, or a name looked up in the PATH of `env`) and arguments.
    pub argv: Vec<String>,
    /// The whole environment.
    pub env: Vec<(String, String)>,
    pub cwd: PathBuf,
    /// Drop to these; `None` keeps the agent's own (debug mode).
    pub creds: Option<Creds>,
    /// The `cgroup.procs` of the group to join.
    pub cgroup_procs: Option<OwnedFd>,
    /// Child's stdin; `None` is /dev/null.
    pub stdin: Option<OwnedFd>,
    pub stdout: OwnedFd,
    pub stderr: OwnedFd,
    /// Become fds 3, 4, ... in the child.
    pub extra_fds: Vec<OwnedFd>,
    /// The child's oom_score_adj (the agent runs at -1000, which children
    /// would inherit); `None` leaves it.
    pub oom_score_adj: Option<&'static [u8]>,
}

/// A started process. Its exit status arrives on `exit` (the reaper owns waitpid).
pub struct Spawned {
    pub pid: i32,
    pub exit: oneshot::Receiver<ExitStatus>,
}

/// Why a spawn failed, in words a model can act on.
pub fn describe_spawn_error(program: &str, e: &io::Error) -> String {
    match e.kind() {
        io::ErrorKind::NotFound => format!("command not found: {program}"),
        io::ErrorKind::PermissionDenied => format!("permission denied: {program}"),
        _ => format!("cannot run {program}: {e}"),
    }
}

pub fn spawn(reaper: &Reaper, spec: SpawnSpec) -> io::Result<Spawned> {
    let Some(program) = spec.argv.first() else {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "empty argv"));
    };
    if spec.argv.iter().any(|a| a.contains('\0')) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "an argument contains a NUL byte",
        ));
    }
    let mut cmd = std::process::Command::new(program);
    cmd.args(&spec.argv[1..]);
    cmd.env_clear();
    for (k, v) in &spec.env {
        if k.is_empty() || k.contains(['=', '\0']) || v.contains('\0') {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("invalid environment variable {k:?}"),
            ));
        }
        cmd.env(k, v);
    }
    cmd.stdin(match spec.stdin {
        Some(fd) => Stdio::from(fd),
        None => Stdio::null(),
    });
    cmd.stdout(Stdio::from(spec.stdout));
    cmd.stderr(Stdio::from(spec.stderr));

    let cwd = sys::cstring(&spec.cwd)?;
    let oom_path = CString::new("/proc/self/oom_score_adj").unwrap_or_default();
    let cgroup_fd: RawFd = spec.cgroup_procs.as_ref().map_or(-1, |fd| fd.as_raw_fd());
    let extra: Vec<RawFd> = spec.extra_fds.iter().map(|fd| fd.as_raw_fd()).collect();
    let creds = spec.creds;
    let oom_score = spec.oom_score_adj;
    // SAFETY: the closure runs in the forked child and only makes raw,
    // async-signal-safe system calls on data prepared before the fork.
    unsafe {
        cmd.pre_exec(move || child_setup(cgroup_fd, oom_score, &oom_path, &extra, creds, &cwd));
    }
    let (pid, exit) = reaper.spawn(|| {
        let child = cmd.spawn()?;
        let pid = child.id();
        // The Child is dropped without waiting: the reaper collects it.
        Ok((pid as i32, pid))
    })?;
    // Our copies of the child's ends (cgroup.procs, extra fds) close here;
    // `cmd` holds the stdio ends until it is dropped, also here.
    drop(cmd);
    drop(spec.cgroup_procs);
    drop(spec.extra_fds);
    Ok(Spawned { pid, exit })
}

/// What user code may hold: no core dumps (they would fill the tmpfs that
/// holds the user's files), and bounded descriptors and processes per
/// process tree (the cgroup bounds the whole sandbox too).
const USER_RLIMITS: [(libc::__rlimit_resource_t, libc::rlim_t); 3] = [
    (libc::RLIMIT_CORE, 0),
    (libc::RLIMIT_NOFILE, 65_536),
    (libc::RLIMIT_NPROC, 4_096),
];

/// Runs in the child between fork and exec.
fn child_setup(
    cgroup_fd: RawFd,
    oom_score: Option<&[u8]>,
    oom_path: &CString,
    extra: &[RawFd],
    creds: Option<Creds>,
    cwd: &CString,
) -> io::Result<()> {
    // SAFETY (whole body): raw system calls on fds and buffers we own.
    unsafe {
        if cgroup_fd >= 0 && libc::write(cgroup_fd, b"0".as_ptr().cast(), 1) != 1 {
            return Err(io::Error::last_os_error());
        }
        if let Some(value) = oom_score {
            let fd = libc::open(oom_path.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
            if fd >= 0 {
                libc::write(fd, value.as_ptr().cast(), value.len());
                libc::close(fd);
            }
        }
        if libc::setsid() < 0 {
            return Err(io::Error::last_os_error());
        }
        // Dispositions set to "ignore" survive exec, and a shell started with
        // SIGINT ignored cannot trap it: interrupting a cell would fail. (The
        // agent may itself have been started that way, e.g. under nohup.)
        for signal in [libc::SIGINT, libc::SIGQUIT] {
            if libc::signal(signal, libc::SIG_DFL) == libc::SIG_ERR {
                return Err(io::Error::last_os_error());
            }
        }
        // Move the sources out of the way first: one may already sit on a
        // target number.
        let mut high = [0 as RawFd; 8];
        if extra.len() > high.len() {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        for (i, &fd) in extra.iter().enumerate() {
            high[i] = libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 100);
            if high[i] < 0 {
                return Err(io::Error::last_os_error());
            }
        }
        for (i, &fd) in high[..extra.len()].iter().enumerate() {
            // dup2 clears close-on-exec on the target.
            if libc::dup2(fd, 3 + i as RawFd) < 0 {
                return Err(io::Error::last_os_error());
            }
        }
        if let Some(c) = creds {
            // While still root: past the drop, raising a hard limit fails.
            for (resource, value) in USER_RLIMITS {
                let limit = libc::rlimit {
                    rlim_cur: value,
                    rlim_max: value,
                };
                if libc::setrlimit(resource, &limit) != 0 {
                    return Err(io::Error::last_os_error());
                }
            }
            let groups = [c.gid as libc::gid_t];
            if libc::syscall(libc::SYS_setgroups, 1, groups.as_ptr()) != 0
                || libc::syscall(libc::SYS_setresgid, c.gid, c.gid, c.gid) != 0
                || libc::syscall(libc::SYS_setresuid, c.uid, c.uid, c.uid) != 0
            {
                return Err(io::Error::last_os_error());
            }
            // No setuid binary or file capability can give it back.
            if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
                return Err(io::Error::last_os_error());
            }
        }
        if libc::chdir(cwd.as_ptr()) != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

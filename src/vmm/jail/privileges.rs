//! Namespaces, identity and limits of the jailed VMM.

use super::{JailError, check};

/// Open files a VMM may hold: its image files, eventfds, epoll, the host's
/// vsock connections (the muxer bounds those well below this).
const MAX_OPEN_FILES: u64 = 512;
/// Slack over the console cap or snapshot size for FSIZE.
const FSIZE_SLACK: u64 = 1 << 20;

pub fn is_root() -> bool {
    // SAFETY: geteuid cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// New mount, PID, IPC, UTS and network namespaces; with `user_ns`, a user
/// namespace too (for a caller without root), in which the caller keeps its
/// own uid and gid and gains, for the setup only, the capabilities to mount.
pub fn unshare_namespaces(user_ns: bool) -> Result<(), JailError> {
    // SAFETY: geteuid/getegid cannot fail.
    let (uid, gid) = unsafe { (libc::geteuid(), libc::getegid()) };
    let mut flags = libc::CLONE_NEWNS
        | libc::CLONE_NEWPID
        | libc::CLONE_NEWIPC
        | libc::CLONE_NEWUTS
        | libc::CLONE_NEWNET;
    if user_ns {
        flags |= libc::CLONE_NEWUSER;
    }
    // SAFETY: unshare only changes this process's namespaces.
    check(unsafe { libc::unshare(flags) }, "unshare").map_err(|e| {
        JailError::Setup(format!(
            "{e} (see `airlock doctor` for what this host allows)"
        ))
    })?;
    if user_ns {
        write_proc("/proc/self/setgroups", "deny")?;
        write_proc("/proc/self/uid_map", &format!("{uid} {uid} 1"))?;
        write_proc("/proc/self/gid_map", &format!("{gid} {gid} 1"))?;
    }
    Ok(())
}

fn write_proc(path: &str, text: &str) -> Result<(), JailError> {
    std::fs::write(path, text).map_err(super::os_error(format!("cannot write {path}")))
}

pub fn set_hostname(name: &str) -> Result<(), JailError> {
    // SAFETY: the pointer and length describe `name`.
    check(
        unsafe { libc::sethostname(name.as_ptr().cast(), name.len()) },
        "sethostname",
    )
}

/// NOFILE, FSIZE (the console cap, or the snapshot's size for a VMM that
/// saves one) and CORE. NPROC is set once the VMM's threads run (see
/// `forbid_new_processes`).
pub fn set_rlimits(console_bytes: u64, snapshot_bytes: Option<u64>) -> Result<(), JailError> {
    let fsize = console_bytes.max(snapshot_bytes.unwrap_or(0)) + FSIZE_SLACK;
    // Past FSIZE a write fails with EFBIG instead of killing the process.
    // SAFETY: sets a signal's disposition to "ignore".
    unsafe { libc::signal(libc::SIGXFSZ, libc::SIG_IGN) };
    set_rlimit(libc::RLIMIT_NOFILE, MAX_OPEN_FILES, "RLIMIT_NOFILE")?;
    set_rlimit(libc::RLIMIT_FSIZE, fsize, "RLIMIT_FSIZE")?;
    set_rlimit(libc::RLIMIT_CORE, 0, "RLIMIT_CORE")
}

/// RLIMIT_NPROC = 0: no process or thread can be made from here on.
pub fn forbid_new_processes() -> Result<(), JailError> {
    set_rlimit(libc::RLIMIT_NPROC, 0, "RLIMIT_NPROC")
}

fn set_rlimit(
    resource: libc::__rlimit_resource_t,
    value: u64,
    what: &str,
) -> Result<(), JailError> {
    let limit = libc::rlimit {
        rlim_cur: value,
        rlim_max: value,
    };
    // SAFETY: passes a valid rlimit struct.
    check(unsafe { libc::setrlimit(resource, &limit) }, what)
}

/// Leaves root for `uid`/`gid` (as root), or drops every capability (in a
/// user namespace); then no_new_privs and not dumpable.
pub fn drop_privileges(as_root: bool, uid: u32, gid: u32) -> Result<(), JailError> {
    drop_bounding_set();
    if as_root {
        // SAFETY: plain identity syscalls.
        unsafe {
            check(libc::setgroups(0, std::ptr::null()), "setgroups")?;
            check(libc::setresgid(gid, gid, gid), "setresgid")?;
            check(libc::setresuid(uid, uid, uid), "setresuid")?;
        }
    }
    clear_capabilities()?;
    // SAFETY: prctl with these arguments only sets flags.
    unsafe {
        check(
            libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0),
            "PR_SET_NO_NEW_PRIVS",
        )?;
        check(
            libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0),
            "PR_SET_DUMPABLE",
        )?;
    }
    Ok(())
}

fn drop_bounding_set() {
    for cap in 0..=libc::c_ulong::from(63u8) {
        // SAFETY: PR_CAPBSET_DROP of a capability; EINVAL past the last one.
        if unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) } < 0 {
            break;
        }
    }
}

fn clear_capabilities() -> Result<(), JailError> {
    #[repr(C)]
    struct Header {
        version: u32,
        pid: libc::c_int,
    }
    #[repr(C)]
    #[derive(Clone, Copy, Default)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    const VERSION_3: u32 = 0x2008_0522;
    let header = Header {
        version: VERSION_3,
        pid: 0,
    };
    let data = [Data::default(); 2];
    // SAFETY: capset reads the header and two data structs we own.
    let ret = unsafe { libc::syscall(libc::SYS_capset, &header, data.as_ptr()) };
    check(ret as libc::c_int, "capset")
}

/// Makes `path` the jailed uid's, so the VMM can create its sockets there.
pub fn give_to(path: &std::path::Path, uid: u32, gid: u32) -> Result<(), JailError> {
    std::os::unix::fs::chown(path, Some(uid), Some(gid)).map_err(super::os_error(format!(
        "cannot hand {} to the jailed user",
        path.display()
    )))
}

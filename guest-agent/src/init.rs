//! What PID 1 sets up before serving: filesystems, console, hostname,
//! loopback, and the environment its children inherit.
//!
//! The root filesystem is a read-only ext4, so every writable place is a
//! tmpfs, and mount points must already exist in the image (we cannot create
//! them). Each step is a handful of system calls at boot, none later.

use std::ffi::CString;
use std::io;
use std::path::Path;

use crate::log::log;

/// uid/gid of the unprivileged user that runs user code.
pub const SANDBOX_UID: u32 = 1000;
pub const SANDBOX_GID: u32 = 1000;
pub const SANDBOX_HOME: &str = "/home/sandbox";
pub const HOSTNAME: &str = "airlock";
const PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

const NOSUID: libc::c_ulong = libc::MS_NOSUID;
const NODEV: libc::c_ulong = libc::MS_NODEV;
const NOEXEC: libc::c_ulong = libc::MS_NOEXEC;

/// Whether a failure is worth a console line.
#[derive(Clone, Copy, PartialEq)]
enum Need {
    Required,
    /// Kernel options or image directories that may legitimately be absent.
    Optional,
}

/// Shares of guest RAM for the writable file systems (tmpfs pages are RAM).
/// /tmp and the home each get a quarter, /dev/shm an eighth: filling them
/// ends in ENOSPC for user code well before the memory limit.
const TMP_DIVISOR: u64 = 4;
const HOME_DIVISOR: u64 = 4;
const SHM_DIVISOR: u64 = 8;

pub fn setup() {
    use Need::*;
    // The OOM killer must pick user code, never init.
    if let Err(e) = crate::sys::write_small(Path::new("/proc/self/oom_score_adj"), b"-1000") {
        log!("oom_score_adj: {e}");
    }
    // The kernel mounted the root read-only but with setuid honoured.
    mount(
        "",
        "/",
        "",
        libc::MS_REMOUNT | libc::MS_RDONLY | NOSUID | NODEV,
        "",
        Required,
    );
    mount(
        "proc",
        "/proc",
        "proc",
        NOSUID | NODEV | NOEXEC,
        "",
        Required,
    );
    mount(
        "sysfs",
        "/sys",
        "sysfs",
        NOSUID | NODEV | NOEXEC,
        "",
        Required,
    );
    // With CONFIG_DEVTMPFS_MOUNT the kernel has mounted it already (EBUSY).
    mount(
        "devtmpfs",
        "/dev",
        "devtmpfs",
        NOSUID,
        "mode=0755",
        Required,
    );
    ensure_console();
    let ram = crate::sys::total_memory().unwrap_or(512 << 20);
    let size = |divisor: u64| format!("size={}", ram / divisor);
    // /dev is a writable devtmpfs, so its subdirectories can be made here.
    if mkdir("/dev/pts", 0o755) {
        // gid 5 is Debian's tty group.
        let opts = "gid=5,mode=0620,ptmxmode=0666";
        // devtmpfs's own /dev/ptmx node finds this instance (Linux >= 4.7).
        mount(
            "devpts",
            "/dev/pts",
            "devpts",
            NOSUID | NOEXEC,
            opts,
            Optional,
        );
    }
    if mkdir("/dev/shm", 0o755) {
        mount(
            "tmpfs",
            "/dev/shm",
            "tmpfs",
            NOSUID | NODEV,
            &format!("mode=1777,{}", size(SHM_DIVISOR)),
            Optional,
        );
    }
    for (target, link) in [
        ("/proc/self/fd", "/dev/fd"),
        ("/proc/self/fd/0", "/dev/stdin"),
        ("/proc/self/fd/1", "/dev/stdout"),
        ("/proc/self/fd/2", "/dev/stderr"),
    ] {
        symlink(target, link);
    }
    mount(
        "tmpfs",
        "/tmp",
        "tmpfs",
        NOSUID | NODEV,
        &format!("mode=1777,{}", size(TMP_DIVISOR)),
        Required,
    );
    mount(
        "tmpfs",
        "/run",
        "tmpfs",
        NOSUID | NODEV,
        "mode=0755",
        Required,
    );
    let home_opts = format!(
        "mode=0755,uid={SANDBOX_UID},gid={SANDBOX_GID},{}",
        size(HOME_DIVISOR)
    );
    mount(
        "tmpfs",
        SANDBOX_HOME,
        "tmpfs",
        NOSUID | NODEV,
        &home_opts,
        Required,
    );
    // For the limits on user code (see cgroup.rs); absent without CGROUPS.
    let cgroup_flags = NOSUID | NODEV | NOEXEC;
    mount(
        "cgroup2",
        "/sys/fs/cgroup",
        "cgroup2",
        cgroup_flags,
        "",
        Optional,
    );

    // SAFETY: plain system call on a valid buffer of the given length.
    if unsafe { libc::sethostname(HOSTNAME.as_ptr().cast(), HOSTNAME.len()) } != 0 {
        log!("sethostname: {}", io::Error::last_os_error());
    }
    loopback_up();

    // SAFETY: called from main before any other thread exists.
    unsafe {
        std::env::set_var("PATH", PATH);
        std::env::set_var("HOME", SANDBOX_HOME);
        std::env::set_var("LANG", "C.UTF-8");
    }
}

/// Changes the size limit of a tmpfs mounted by [`setup`].
pub fn resize_tmpfs(target: &Path, bytes: u64) -> io::Result<()> {
    let tgt = crate::sys::cstring(target)?;
    let data = cstr(&format!("size={bytes}"));
    // SAFETY: valid NUL-terminated strings; a remount takes no source or type.
    let rc = unsafe {
        libc::mount(
            std::ptr::null(),
            tgt.as_ptr(),
            std::ptr::null(),
            libc::MS_REMOUNT | NOSUID | NODEV,
            data.as_ptr().cast(),
        )
    };
    crate::sys::cvt(rc).map(drop)
}

fn cstr(s: &str) -> CString {
    // Our own constant paths: no interior NUL.
    CString::new(s).unwrap_or_default()
}

fn mount(source: &str, target: &str, fstype: &str, flags: libc::c_ulong, data: &str, need: Need) {
    let (src, tgt, fs, dat) = (cstr(source), cstr(target), cstr(fstype), cstr(data));
    // SAFETY: valid NUL-terminated strings that outlive the call.
    let rc = unsafe {
        libc::mount(
            src.as_ptr(),
            tgt.as_ptr(),
            fs.as_ptr(),
            flags,
            if data.is_empty() {
                std::ptr::null()
            } else {
                dat.as_ptr().cast()
            },
        )
    };
    if rc == 0 {
        return;
    }
    let err = io::Error::last_os_error();
    // Already mounted (by the kernel, or by a previous agent run).
    if err.raw_os_error() == Some(libc::EBUSY) {
        return;
    }
    let absent = matches!(err.raw_os_error(), Some(libc::ENOENT | libc::ENODEV));
    if need == Need::Required || !absent {
        log!("mount {fstype} on {target}: {err}");
    }
}

/// Creates a directory; true if it exists afterwards.
fn mkdir(path: &str, mode: libc::mode_t) -> bool {
    let p = cstr(path);
    // SAFETY: valid NUL-terminated string.
    if unsafe { libc::mkdir(p.as_ptr(), mode) } == 0 {
        return true;
    }
    io::Error::last_os_error().raw_os_error() == Some(libc::EEXIST)
}

fn symlink(target: &str, link: &str) {
    let (t, l) = (cstr(target), cstr(link));
    // SAFETY: valid NUL-terminated strings. EEXIST is fine: devtmpfs or the
    // kernel may have made it.
    unsafe { libc::symlink(t.as_ptr(), l.as_ptr()) };
}

/// The kernel opens /dev/console as fds 0-2 for init when it can; when it
/// could not, Rust's startup code has put /dev/null there (or nothing, if
/// that was missing too). Then open the console now that devtmpfs is
/// mounted, so that logs reach the serial port.
fn ensure_console() {
    // SAFETY: fstat into a zeroed plain-data struct; open/dup2/close on fds
    // this process owns, with a valid NUL-terminated path.
    unsafe {
        let mut st: libc::stat = std::mem::zeroed();
        let ok = libc::fstat(2, &mut st) == 0;
        let is_null =
            ok && (st.st_mode & libc::S_IFMT) == libc::S_IFCHR && st.st_rdev == libc::makedev(1, 3);
        if ok && !is_null {
            return;
        }
        let console = cstr("/dev/console");
        let fd = libc::open(console.as_ptr(), libc::O_RDWR | libc::O_NOCTTY);
        if fd < 0 {
            return;
        }
        for target in 0..3 {
            if fd != target {
                libc::dup2(fd, target);
            }
        }
        if fd > 2 {
            libc::close(fd);
        }
    }
}

/// Brings `lo` up: user code may talk to servers it starts on localhost.
fn loopback_up() {
    // SAFETY: a throwaway socket for the interface ioctls; `ifreq` is plain
    // data, zero-initialised, with a NUL-terminated name.
    unsafe {
        let sock = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if sock < 0 {
            // No INET in the kernel: nothing to bring up.
            return;
        }
        let mut req: libc::ifreq = std::mem::zeroed();
        req.ifr_name[0] = b'l' as libc::c_char;
        req.ifr_name[1] = b'o' as libc::c_char;
        req.ifr_ifru.ifru_flags =
            (libc::IFF_UP | libc::IFF_LOOPBACK | libc::IFF_RUNNING) as libc::c_short;
        if libc::ioctl(sock, libc::SIOCSIFFLAGS, &req) != 0 {
            log!("bringing up lo: {}", io::Error::last_os_error());
        }
        libc::close(sock);
    }
}

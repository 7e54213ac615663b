//! Thin wrappers over the system calls the agent makes directly: pipes,
//! signals, credentials, and one-shot reads and writes of small files.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;

/// User and group that user code runs as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Creds {
    pub uid: u32,
    pub gid: u32,
}

pub fn cvt(rc: libc::c_int) -> io::Result<libc::c_int> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

pub fn cstring(path: &Path) -> io::Result<CString> {
    use std::os::unix::ffi::OsStrExt;
    CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains a NUL byte"))
}

/// A close-on-exec pipe: (read end, write end).
pub fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills the two-element array on success.
    cvt(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) })?;
    // SAFETY: both fds are fresh and owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

pub fn set_nonblocking(fd: &impl AsRawFd) -> io::Result<()> {
    let mut on: libc::c_int = 1;
    // SAFETY: FIONBIO with a valid int pointer on an fd we hold.
    cvt(unsafe { libc::ioctl(fd.as_raw_fd(), libc::FIONBIO, &mut on) }).map(drop)
}

/// Grows a pipe's buffer (fewer wake-ups and reads for bulk output). Best effort.
pub fn set_pipe_size(fd: &impl AsRawFd, bytes: usize) {
    // SAFETY: F_SETPIPE_SZ takes an int argument.
    unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETPIPE_SZ, bytes as libc::c_int) };
}

/// Sends `signal` to a process group; ESRCH (already gone) is not an error.
pub fn kill_group(pgid: i32, signal: i32) {
    if pgid > 1 {
        // SAFETY: plain system call.
        unsafe { libc::kill(-pgid, signal) };
    }
}

pub fn kill_pid(pid: i32, signal: i32) {
    if pid > 1 {
        // SAFETY: plain system call.
        unsafe { libc::kill(pid, signal) };
    }
}

/// Writes `data` to `path` in one open/write/close (sysfs, cgroupfs, procfs).
pub fn write_small(path: &Path, data: &[u8]) -> io::Result<()> {
    let c = cstring(path)?;
    // SAFETY: valid NUL-terminated path.
    let fd = cvt(unsafe { libc::open(c.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC) })?;
    // SAFETY: we own the fresh fd.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    write_fd(fd.as_raw_fd(), data)
}

/// One write(2) of all of `data` (retrying short writes and EINTR).
pub fn write_fd(fd: RawFd, mut data: &[u8]) -> io::Result<()> {
    while !data.is_empty() {
        // SAFETY: pointer and length describe `data`.
        let n = unsafe { libc::write(fd, data.as_ptr().cast(), data.len()) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        data = &data[n as usize..];
    }
    Ok(())
}

/// Reads a small file (procfs, cgroupfs) with one read, up to 64 KiB.
pub fn read_small(path: &Path) -> io::Result<String> {
    let c = cstring(path)?;
    // SAFETY: valid NUL-terminated path.
    let fd = cvt(unsafe { libc::open(c.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC) })?;
    // SAFETY: we own the fresh fd.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut buf = vec![0u8; 64 << 10];
    let mut len = 0;
    loop {
        // SAFETY: pointer and length describe the unfilled part of `buf`.
        let n = unsafe {
            libc::read(
                fd.as_raw_fd(),
                buf[len..].as_mut_ptr().cast(),
                buf.len() - len,
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n == 0 || len + n as usize == buf.len() {
            len += n as usize;
            break;
        }
        len += n as usize;
    }
    buf.truncate(len);
    Ok(String::from_utf8_lossy(&buf).into_owned())
}

/// Total guest RAM in bytes.
pub fn total_memory() -> Option<u64> {
    // SAFETY: sysinfo fills a zeroed plain-data struct.
    let mut info: libc::sysinfo = unsafe { std::mem::zeroed() };
    // SAFETY: valid out-pointer.
    if unsafe { libc::sysinfo(&mut info) } != 0 {
        return None;
    }
    Some(info.totalram as u64 * info.mem_unit as u64)
}

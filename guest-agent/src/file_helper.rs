//! File operations in a process of their own, run as the sandbox user for
//! real: its uids, gids and groups are the user's, it has no capabilities
//! and no way to gain any (no_new_privs). /proc/sys is therefore read-only
//! to it and the agent's /proc/1 unreadable. A thread of the agent would not
//! do: the kernel lets any thread read its own process's /proc entries,
//! whatever its credentials.
//!
//! The agent's file thread hands each request to the helper over a
//! socketpair as one protocol frame and reads one frame back. A helper that
//! dies or garbles its answer is replaced at the next request.

use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use airlock_protocol::{Decoder, Frame, Message};

use crate::sys::Creds;

/// The helper's end of the socketpair.
const HELPER_FD: i32 = 3;
/// How long the helper may go without moving a byte of a request or answer.
const STALL: Duration = Duration::from_secs(120);
/// The argument that makes the agent binary a helper.
pub const HELPER_ARG: &str = "--file-helper";

pub struct Helper {
    pid: i32,
    stream: UnixStream,
    decoder: Decoder,
}

impl Helper {
    /// Starts `/proc/self/exe --file-helper HOME` as `creds`.
    pub fn start(creds: Creds, home: &Path) -> io::Result<Helper> {
        let (ours, theirs) = UnixStream::pair()?;
        let theirs: OwnedFd = theirs.into();
        let their_fd = theirs.as_raw_fd();
        let mut cmd = std::process::Command::new("/proc/self/exe");
        cmd.arg(HELPER_ARG)
            .arg(home)
            .env_clear()
            .env("PATH", "/usr/bin:/bin")
            .current_dir("/")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        // SAFETY: only raw system calls between fork and exec, no allocation.
        unsafe {
            cmd.pre_exec(move || drop_to(creds, their_fd));
        }
        // A helper that makes no progress (a file operation stuck on a FIFO
        // the user made, say) is given up on, killed and replaced.
        ours.set_read_timeout(Some(STALL))?;
        ours.set_write_timeout(Some(STALL))?;
        let child = cmd.spawn()?;
        drop(theirs);
        let pid = i32::try_from(child.id()).unwrap_or(-1);
        // The reaper (PID 1's) collects it when it exits.
        drop(child);
        Ok(Helper {
            pid,
            stream: ours,
            decoder: Decoder::new(),
        })
    }

    /// One request, one answer.
    pub fn call(&mut self, message: Message, payload: Vec<u8>) -> io::Result<(Message, Vec<u8>)> {
        let bytes = Frame::new(0, message)
            .with_payload(payload)
            .encode()
            .map_err(io::Error::other)?;
        self.stream.write_all(&bytes)?;
        let frame = read_frame(&mut self.stream, &mut self.decoder)?;
        Ok((frame.message, frame.payload))
    }
}

impl Drop for Helper {
    fn drop(&mut self) {
        if self.pid > 0 {
            // SAFETY: signals our own child, which the reaper then collects.
            unsafe { libc::kill(self.pid, libc::SIGKILL) };
        }
    }
}

/// In the child before exec: the helper's fd, then the user's identity for
/// good (all three uids and gids, so no capability survives), no_new_privs.
fn drop_to(creds: Creds, fd: i32) -> io::Result<()> {
    let groups = [creds.gid as libc::gid_t];
    // SAFETY: raw system calls on plain values and a one-element array.
    unsafe {
        if libc::dup2(fd, HELPER_FD) < 0
            || libc::setgroups(1, groups.as_ptr()) != 0
            || libc::setresgid(creds.gid, creds.gid, creds.gid) != 0
            || libc::setresuid(creds.uid, creds.uid, creds.uid) != 0
            || libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0
        {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Reads one frame, blocking.
fn read_frame(stream: &mut UnixStream, decoder: &mut Decoder) -> io::Result<Frame> {
    let mut buf = vec![0u8; 64 << 10];
    loop {
        if let Some(frame) = decoder.decode().map_err(io::Error::other)? {
            return Ok(frame);
        }
        let n = stream.read(&mut buf)?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the file helper closed its socket",
            ));
        }
        decoder.feed(&buf[..n]);
    }
}

/// The helper's life: answer requests on fd 3 until the agent goes.
pub fn serve(home: &Path) -> io::Result<()> {
    // SAFETY: fd 3 is the socket the agent gave us; nothing else owns it.
    let mut stream = unsafe { UnixStream::from_raw_fd(HELPER_FD) };
    let mut decoder = Decoder::new();
    loop {
        let frame = match read_frame(&mut stream, &mut decoder) {
            Ok(frame) => frame,
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e),
        };
        let (message, payload) = crate::files::run(home, frame.message, frame.payload);
        let bytes = Frame::new(frame.request_id, message)
            .with_payload(payload)
            .encode()
            .map_err(io::Error::other)?;
        stream.write_all(&bytes)?;
    }
}

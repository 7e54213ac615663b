//! Non-blocking pipe ends driven by the runtime's epoll, spending as few
//! system calls as possible: a read that returns less than it asked for
//! drained the pipe, so readiness is forgotten without another read that
//! would only say EAGAIN (as `conn.rs` does for the vsock socket).

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::task::{Context, Poll};

use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

use crate::sys;

pub struct PipeReader {
    fd: AsyncFd<OwnedFd>,
    eof: bool,
}

impl PipeReader {
    pub fn new(fd: OwnedFd) -> io::Result<PipeReader> {
        sys::set_nonblocking(&fd)?;
        Ok(PipeReader {
            // SAFETY: the AsyncFd owns the OwnedFd, which stays open and
            // keeps its number until the AsyncFd is dropped.
            fd: unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE) }?,
            eof: false,
        })
    }

    /// Reads what is there (waiting for it); `Ok(0)` at end of file, after
    /// which this never completes again (so it can stay in a `select!`).
    pub async fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.eof {
            return std::future::pending().await;
        }
        std::future::poll_fn(|cx| self.poll_read(cx, buf)).await
    }

    fn poll_read(&mut self, cx: &mut Context<'_>, buf: &mut [u8]) -> Poll<io::Result<usize>> {
        loop {
            let mut guard = match self.fd.poll_read_ready(cx) {
                Poll::Ready(Ok(guard)) => guard,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            };
            let len = buf.len();
            let result = guard.try_io(|fd| {
                // SAFETY: pointer and length describe `buf`.
                let n = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), len) };
                if n < 0 {
                    Err(io::Error::last_os_error())
                } else {
                    Ok(n as usize)
                }
            });
            match result {
                Ok(Ok(n)) => {
                    if n == 0 {
                        self.eof = true;
                    } else if n < len {
                        guard.clear_ready();
                    }
                    return Poll::Ready(Ok(n));
                }
                Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => {}
                Ok(Err(e)) => {
                    // Not expected on a pipe; never spin on it.
                    self.eof = true;
                    return Poll::Ready(Err(e));
                }
                Err(_would_block) => {}
            }
        }
    }

    /// Reads whatever is in the pipe now, with a system call whatever the
    /// runtime believes: `None` if it is empty (or at end of file). For
    /// output written by a process that has exited: its exit was learnt
    /// outside epoll, so the pipe's readiness may not have been seen yet.
    pub fn read_now(&mut self, buf: &mut [u8]) -> Option<io::Result<usize>> {
        if self.eof {
            return None;
        }
        loop {
            // SAFETY: pointer and length describe `buf`.
            let n = unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            if n > 0 {
                return Some(Ok(n as usize));
            }
            if n == 0 {
                self.eof = true;
                return None;
            }
            let e = io::Error::last_os_error();
            match e.kind() {
                io::ErrorKind::Interrupted => {}
                io::ErrorKind::WouldBlock => return None,
                _ => return Some(Err(e)),
            }
        }
    }

    /// Reads only if the runtime already knows the pipe is readable (no
    /// system call otherwise): `None` means nothing is known to be there.
    ///
    /// Correct after the peer's last write because epoll queues a pipe's
    /// readiness at write time: by the time a later event (e.g. "done" on a
    /// control pipe) is seen, this pipe's readiness has been seen too.
    pub fn read_if_ready(&mut self, buf: &mut [u8]) -> Option<io::Result<usize>> {
        if self.eof {
            return None;
        }
        let waker = std::task::Waker::noop();
        let mut cx = Context::from_waker(waker);
        match self.poll_read(&mut cx, buf) {
            Poll::Ready(r) => Some(r),
            Poll::Pending => None,
        }
    }
}

pub struct PipeWriter {
    fd: AsyncFd<OwnedFd>,
}

impl PipeWriter {
    pub fn new(fd: OwnedFd) -> io::Result<PipeWriter> {
        sys::set_nonblocking(&fd)?;
        Ok(PipeWriter {
            // SAFETY: as for PipeReader.
            fd: unsafe { AsyncFd::register_with_interest(fd, Interest::WRITABLE) }?,
        })
    }

    /// Writes all of `data`, waiting while the pipe is full.
    pub async fn write_all(&self, mut data: &[u8]) -> io::Result<()> {
        while !data.is_empty() {
            let mut guard = self.fd.writable().await?;
            let result = guard.try_io(|fd| {
                // SAFETY: pointer and length describe `data`.
                let n = unsafe { libc::write(fd.as_raw_fd(), data.as_ptr().cast(), data.len()) };
                if n < 0 {
                    Err(io::Error::last_os_error())
                } else {
                    Ok(n as usize)
                }
            });
            match result {
                Ok(Ok(n)) => {
                    if n < data.len() {
                        guard.clear_ready();
                    }
                    data = &data[n..];
                }
                Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => {}
                Ok(Err(e)) => return Err(e),
                Err(_would_block) => {}
            }
        }
        Ok(())
    }
}

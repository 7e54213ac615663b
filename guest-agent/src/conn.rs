//! An accepted vsock connection as a tokio stream that spends as few system
//! calls as possible.
//!
//! tokio-vsock's own stream forgets readiness only when a read returns
//! EAGAIN, which costs one extra `recv` per wake-up. Like tokio's TCP stream,
//! this one also forgets it after a short read (the socket is drained; with
//! edge-triggered epoll any later data raises a new event). At ~1 ms per guest
//! system call that is a real share of a request.
//!
//! The socket is registered for reading only. Registered for writing too,
//! it would wake the agent after every reply, when the host has read it and
//! buffer space frees up (an EPOLLOUT edge) though nothing waits to write.
//! A write that finds the buffer full registers a duplicate of the socket
//! for writability, and drops it once the write went through.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, ready};

use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};

/// Both halves of a connection: clones share the socket, which closes when
/// the last clone is dropped.
#[derive(Clone)]
pub struct Conn {
    fd: Arc<AsyncFd<OwnedFd>>,
    /// A duplicate registered for writability while a write waits for room.
    write_wait: Arc<Mutex<Option<AsyncFd<OwnedFd>>>>,
}

impl Conn {
    /// Takes an accepted (blocking) socket and registers it with the runtime.
    pub fn new(fd: OwnedFd) -> io::Result<Conn> {
        let mut on: libc::c_int = 1;
        // SAFETY: FIONBIO on an fd we own, with a valid int pointer.
        if unsafe { libc::ioctl(fd.as_raw_fd(), libc::FIONBIO, &mut on) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: the AsyncFd owns the OwnedFd, which stays open and keeps
        // its number until the AsyncFd is dropped.
        let fd = unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE) }?;
        Ok(Conn {
            fd: Arc::new(fd),
            write_wait: Arc::default(),
        })
    }

    /// Waits until the socket has room: registers a duplicate of it for
    /// writability (the original is registered for reading only).
    fn poll_room(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut wait = self
            .write_wait
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if wait.is_none() {
            // SAFETY: F_DUPFD_CLOEXEC on an fd we hold.
            let dup = unsafe { libc::fcntl(self.fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 0) };
            if dup < 0 {
                return Poll::Ready(Err(io::Error::last_os_error()));
            }
            // SAFETY: a fresh fd we own; the AsyncFd owns it from here on and
            // it keeps its number until the AsyncFd is dropped.
            let dup = unsafe { OwnedFd::from_raw_fd(dup) };
            *wait = Some(unsafe { AsyncFd::register_with_interest(dup, Interest::WRITABLE) }?);
        }
        let Some(waiter) = wait.as_ref() else {
            return Poll::Ready(Ok(()));
        };
        let mut guard = ready!(waiter.poll_write_ready(cx))?;
        guard.clear_ready();
        Poll::Ready(Ok(()))
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            let mut guard = ready!(self.fd.poll_read_ready(cx))?;
            // SAFETY: the kernel only writes to this memory; we mark as
            // initialised exactly the bytes it reports.
            let unfilled = unsafe { buf.unfilled_mut() };
            let len = unfilled.len();
            let result = guard.try_io(|fd| {
                // SAFETY: pointer and length describe `unfilled`.
                let n = unsafe { libc::recv(fd.as_raw_fd(), unfilled.as_mut_ptr().cast(), len, 0) };
                if n < 0 {
                    Err(io::Error::last_os_error())
                } else {
                    Ok(n as usize)
                }
            });
            match result {
                Ok(Ok(n)) => {
                    // SAFETY: recv initialised `n` bytes.
                    unsafe { buf.assume_init(n) };
                    buf.advance(n);
                    if n > 0 && n < len {
                        guard.clear_ready();
                    }
                    return Poll::Ready(Ok(()));
                }
                Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => {}
                Ok(Err(e)) => return Poll::Ready(Err(e)),
                Err(_would_block) => {}
            }
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        loop {
            // SAFETY: pointer and length describe `buf`. MSG_NOSIGNAL: a
            // closed peer is an error, not a SIGPIPE.
            let n = unsafe {
                libc::send(
                    self.fd.as_raw_fd(),
                    buf.as_ptr().cast(),
                    buf.len(),
                    libc::MSG_NOSIGNAL,
                )
            };
            if n >= 0 {
                // Done waiting for room: stop watching for it.
                let mut wait = self
                    .write_wait
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner);
                if wait.is_some() {
                    *wait = None;
                }
                return Poll::Ready(Ok(n as usize));
            }
            let e = io::Error::last_os_error();
            match e.kind() {
                io::ErrorKind::Interrupted => {}
                io::ErrorKind::WouldBlock => ready!(self.poll_room(cx))?,
                _ => return Poll::Ready(Err(e)),
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // SAFETY: shutdown on an fd we own.
        if unsafe { libc::shutdown(self.fd.as_raw_fd(), libc::SHUT_WR) } != 0 {
            return Poll::Ready(Err(io::Error::last_os_error()));
        }
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    //! Conn works on any stream socket; a Unix socket pair stands in for vsock.

    use std::os::unix::net::UnixStream as StdUnixStream;
    use std::sync::Arc;
    use std::time::Duration;

    use airlock_protocol::{Frame, FrameReader, Hello, Message, PROTOCOL_VERSION, write_frame};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::UnixStream;

    use super::*;
    use crate::server::{Agent, serve_connection};

    fn pair() -> (Conn, UnixStream) {
        let (a, b) = StdUnixStream::pair().unwrap();
        b.set_nonblocking(true).unwrap();
        (
            Conn::new(OwnedFd::from(a)).unwrap(),
            UnixStream::from_std(b).unwrap(),
        )
    }

    #[tokio::test]
    async fn bulk_both_ways_with_short_reads_and_full_buffers() {
        let (conn, peer) = pair();
        let data: Vec<u8> = (0..8 << 20).map(|i: u32| (i * 7) as u8).collect();
        let expected = data.clone();
        let (mut peer_read, mut peer_write) = peer.into_split();
        // Peer → Conn in uneven chunks with pauses: short reads, then new data.
        let sender = tokio::spawn(async move {
            for chunk in data.chunks(100_003) {
                peer_write.write_all(chunk).await.unwrap();
                tokio::task::yield_now().await;
            }
            peer_write.shutdown().await.unwrap();
        });
        // Conn → peer faster than the peer reads: fills the socket buffer.
        let mut writer = conn.clone();
        let echo = expected.clone();
        let writing = tokio::spawn(async move {
            writer.write_all(&echo).await.unwrap();
            writer.shutdown().await.unwrap();
        });
        let reading = tokio::spawn(async move {
            let mut got = Vec::new();
            tokio::time::sleep(Duration::from_millis(50)).await;
            peer_read.read_to_end(&mut got).await.unwrap();
            got
        });
        let mut got = Vec::new();
        let mut reader = conn;
        reader.read_to_end(&mut got).await.unwrap();
        assert!(got == expected, "Conn read corrupted data");
        sender.await.unwrap();
        writing.await.unwrap();
        assert!(
            reading.await.unwrap() == expected,
            "Conn write corrupted data"
        );
    }

    #[tokio::test]
    async fn serves_the_protocol_over_a_real_socket() {
        let (conn, peer) = pair();
        let agent = Arc::new(Agent::new(Box::new(|| {})));
        let server =
            tokio::spawn(async move { serve_connection(agent, conn.clone(), conn, "pair").await });
        let (read, mut write) = peer.into_split();
        let mut frames = FrameReader::new(read);
        let hello = Hello {
            protocol_version: PROTOCOL_VERSION,
            client: String::new(),
        };
        write_frame(&mut write, &Frame::new(0, Message::Hello(hello)))
            .await
            .unwrap();
        assert!(matches!(
            frames.read_frame().await.unwrap().unwrap().message,
            Message::HelloOk(_)
        ));
        for id in 1..=100 {
            write_frame(&mut write, &Frame::new(id, Message::Ping))
                .await
                .unwrap();
            let pong = frames.read_frame().await.unwrap().unwrap();
            assert_eq!(pong.request_id, id);
        }
        drop(write);
        assert!(frames.read_frame().await.unwrap().is_none());
        server.await.unwrap();
    }
}

//! One vsock stream, host- or guest-initiated: its state machine (virtio
//! 1.2 §5.10.6), credit accounting in both directions, and the buffer of
//! guest bytes the host socket has not accepted yet.
//!
//! A connection knows nothing about epoll or virtqueues: the muxer tells it
//! what the host socket can do (`on_host_*`), hands it validated guest
//! packets (`on_guest_packet`), and asks it for the next packet owed to the
//! guest (`next_rx`). `interest()` says which socket events it wants.

use std::collections::VecDeque;
use std::io::{self, ErrorKind, Read};
use std::net::Shutdown;
use std::num::Wrapping;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;

use super::packet::{
    HOST_CID, Header, Op, SHUTDOWN_BOTH, SHUTDOWN_RCV, SHUTDOWN_SEND, TYPE_STREAM,
};

/// Receive buffer we advertise to the guest per connection: guest bytes the
/// host has not read yet are held up to this much, and never more.
pub const BUF_ALLOC: u32 = 256 * 1024;

/// Tell the guest about freed buffer space once its view of our free space
/// drops below this; earlier updates would only waste RX buffers.
const CREDIT_UPDATE_THRESHOLD: u32 = BUF_ALLOC / 2;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    /// Our REQUEST is owed to the guest (`request_sent == false`) or awaits
    /// the guest's RESPONSE.
    Connecting {
        request_sent: bool,
    },
    /// The guest asked (REQUEST) and the host socket is connected: our
    /// RESPONSE is owed.
    Accepting,
    Established,
    /// Only the final RST (after an owed SHUTDOWN, if any) is left to send.
    Closing,
    /// Nothing left to say; the muxer frees the connection.
    Closed,
}

/// Host-socket readiness a connection wants to hear about. Hang-ups and
/// errors are always reported.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Interest {
    pub read: bool,
    pub write: bool,
}

#[derive(Debug)]
pub struct Connection {
    stream: UnixStream,
    guest_cid: u64,
    local_port: u32,
    peer_port: u32,
    state: State,

    // Guest → host.
    /// Guest bytes the host socket would not take yet (≤ BUF_ALLOC).
    to_host: VecDeque<u8>,
    /// Guest bytes written to the host socket (or discarded once it is gone).
    fwd_cnt: Wrapping<u32>,
    /// `fwd_cnt` as carried by our last packet to the guest.
    fwd_cnt_told: Wrapping<u32>,
    /// SHUTDOWN flags the guest has sent.
    guest_shut: u32,
    host_write_shut: bool,

    // Host → guest.
    peer_buf_alloc: u32,
    peer_fwd_cnt: Wrapping<u32>,
    /// Payload bytes sent to the guest.
    rx_cnt: Wrapping<u32>,
    /// The host socket reported data (or EOF) we have not read yet.
    host_readable: bool,
    /// We read EOF from the host socket and told the guest.
    host_eof: bool,
    /// The host socket hung up: drain what is left, then close.
    host_hup: bool,
    /// A CREDIT_REQUEST went out and no credit has arrived since.
    credit_requested: bool,

    credit_update_owed: bool,
    /// SHUTDOWN flags owed to the guest before the final RST.
    shutdown_owed: u32,
}

impl Connection {
    /// A connection the host asked for: a REQUEST to `peer_port` is owed.
    pub fn new(stream: UnixStream, guest_cid: u64, local_port: u32, peer_port: u32) -> Self {
        Connection {
            stream,
            guest_cid,
            local_port,
            peer_port,
            state: State::Connecting {
                request_sent: false,
            },
            to_host: VecDeque::new(),
            fwd_cnt: Wrapping(0),
            fwd_cnt_told: Wrapping(0),
            guest_shut: 0,
            host_write_shut: false,
            peer_buf_alloc: 0,
            peer_fwd_cnt: Wrapping(0),
            rx_cnt: Wrapping(0),
            host_readable: false,
            host_eof: false,
            host_hup: false,
            credit_requested: false,
            credit_update_owed: false,
            shutdown_owed: 0,
        }
    }

    /// A connection the guest asked for with `request` (already checked to
    /// be a REQUEST to a port the host forwards), whose host end is `stream`:
    /// a RESPONSE is owed, and nothing is written to the host first.
    pub fn accepted(stream: UnixStream, guest_cid: u64, request: &Header) -> Self {
        let mut conn = Connection::new(stream, guest_cid, request.dst_port, request.src_port);
        conn.state = State::Accepting;
        conn.peer_buf_alloc = request.buf_alloc;
        conn.peer_fwd_cnt = Wrapping(request.fwd_cnt);
        conn
    }

    #[cfg(test)]
    pub fn state(&self) -> State {
        self.state
    }

    pub fn is_closed(&self) -> bool {
        self.state == State::Closed
    }

    pub fn stream(&self) -> &UnixStream {
        &self.stream
    }

    /// Guest bytes waiting for the host socket.
    #[cfg(test)]
    pub fn buffered(&self) -> usize {
        self.to_host.len()
    }

    /// Which host-socket events to watch; `None` means stop watching it.
    pub fn interest(&self) -> Option<Interest> {
        match self.state {
            // Only hang-ups matter until the guest answers or is answered.
            State::Connecting { .. } => Some(Interest::default()),
            // A host end that already hung up would report it forever.
            State::Accepting if self.host_hup => None,
            State::Accepting => Some(Interest::default()),
            // The socket hung up for good; a level-triggered HUP would spin.
            State::Established if self.host_hup => None,
            State::Established => Some(Interest {
                read: !self.host_readable && self.may_send_to_guest(),
                write: !self.to_host.is_empty(),
            }),
            State::Closing | State::Closed => None,
        }
    }

    /// Whether `next_rx` has something to say (or to try reading).
    pub fn has_pending_rx(&self) -> bool {
        match self.state {
            State::Connecting { request_sent } => !request_sent,
            State::Accepting | State::Closing => true,
            State::Closed => false,
            State::Established => {
                self.credit_update_owed
                    || (self.wants_host_read()
                        && (self.peer_credit() > 0 || !self.credit_requested))
            }
        }
    }

    /// Produces the next packet for the guest, reading host data into
    /// `buf` (its length bounds the payload) when that is what is owed.
    pub fn next_rx(&mut self, buf: &mut [u8]) -> Option<Header> {
        match self.state {
            State::Closed | State::Connecting { request_sent: true } => None,
            State::Connecting {
                request_sent: false,
            } => {
                self.state = State::Connecting { request_sent: true };
                Some(self.header(Op::Request, 0, 0))
            }
            State::Accepting => {
                self.state = State::Established;
                tracing::debug!(
                    port = self.local_port,
                    peer = self.peer_port,
                    "vsock: guest connection accepted"
                );
                // Host data may already be waiting; the muxer's refresh
                // re-arms the read watch now that we are established.
                Some(self.header(Op::Response, 0, 0))
            }
            State::Closing if self.shutdown_owed != 0 => {
                let flags = std::mem::take(&mut self.shutdown_owed);
                Some(self.header(Op::Shutdown, 0, flags))
            }
            State::Closing => {
                self.state = State::Closed;
                Some(self.header(Op::Rst, 0, 0))
            }
            State::Established => self.next_established_rx(buf),
        }
    }

    fn next_established_rx(&mut self, buf: &mut [u8]) -> Option<Header> {
        if self.wants_host_read() {
            let credit = self.peer_credit() as usize;
            if credit == 0 {
                if !self.credit_requested {
                    self.credit_requested = true;
                    return Some(self.header(Op::CreditRequest, 0, 0));
                }
            } else if !buf.is_empty() {
                let want = buf.len().min(credit);
                match self.stream.read(&mut buf[..want]) {
                    Ok(0) => return Some(self.on_host_eof()),
                    Ok(n) => {
                        let len = n as u32; // n <= MAX_PAYLOAD
                        self.rx_cnt += len;
                        // Every packet carries our credit.
                        self.credit_update_owed = false;
                        return Some(self.header(Op::Rw, len, 0));
                    }
                    Err(e) if is_transient(&e) => self.host_readable = false,
                    Err(e) => {
                        tracing::debug!(port = self.local_port, %e, "vsock: host read failed");
                        self.kill();
                        return self.next_rx(buf);
                    }
                }
            }
        }
        if self.credit_update_owed {
            self.credit_update_owed = false;
            return Some(self.header(Op::CreditUpdate, 0, 0));
        }
        None
    }

    /// Absorbs a validated guest packet addressed to this connection.
    pub fn on_guest_packet(&mut self, hdr: &Header, op: Op, payload: &[u8]) {
        if matches!(self.state, State::Closing | State::Closed) {
            return; // An RST is on its way; nothing the guest says matters.
        }
        if op == Op::Rst {
            self.state = State::Closed;
            return;
        }
        self.peer_buf_alloc = hdr.buf_alloc;
        self.peer_fwd_cnt = Wrapping(hdr.fwd_cnt);
        if self.peer_credit() > 0 {
            self.credit_requested = false;
        }
        match (self.state, op) {
            (_, Op::CreditUpdate) => {}
            (State::Connecting { request_sent: true }, Op::Response) => self.establish(),
            (State::Established, Op::Rw) if self.guest_shut & SHUTDOWN_SEND == 0 => {
                self.write_to_host(payload)
            }
            (State::Established, Op::Shutdown) => {
                self.guest_shut |= hdr.flags & SHUTDOWN_BOTH;
                self.check_finished();
            }
            (State::Established, Op::CreditRequest) => self.credit_update_owed = true,
            (state, op) => {
                crate::guest_warn!(
                    port = self.local_port,
                    ?state,
                    ?op,
                    "vsock: unexpected guest packet"
                );
                self.kill();
            }
        }
    }

    pub fn on_host_readable(&mut self) {
        if self.state == State::Established {
            self.host_readable = true;
        }
    }

    pub fn on_host_writable(&mut self) {
        if self.state != State::Established {
            return;
        }
        while !self.to_host.is_empty() {
            let (chunk, _) = self.to_host.as_slices();
            match send(&self.stream, chunk) {
                Ok(0) => break,
                Ok(n) => {
                    self.to_host.drain(..n);
                    self.fwd_cnt += n as u32; // n <= BUF_ALLOC
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) => {
                    tracing::debug!(port = self.local_port, %e, "vsock: host write failed");
                    self.kill();
                    return;
                }
            }
        }
        self.note_forwarded();
        self.check_finished();
    }

    /// The host socket hung up (closed, or both directions shut).
    pub fn on_host_hangup(&mut self) {
        match self.state {
            State::Connecting { .. } => self.kill(),
            // The host may answer and close before the guest hears it was
            // accepted (a refusal with a reason): accept, deliver what the
            // host wrote, then close.
            State::Accepting => {
                self.host_hup = true;
                self.host_readable = true;
            }
            State::Established => {
                self.host_hup = true;
                // Nobody will read these any more.
                self.to_host.clear();
                if self.host_eof || !self.may_send_to_guest() {
                    self.close_with_shutdown();
                } else {
                    // Data the host wrote before closing still goes out;
                    // reading it ends in EOF, which finishes the close.
                    self.host_readable = true;
                }
            }
            State::Closing | State::Closed => {}
        }
    }

    pub fn on_host_error(&mut self) {
        tracing::debug!(port = self.local_port, "vsock: host socket error");
        self.kill();
    }

    /// Aborts the connection: the guest gets an RST (if it ever heard of
    /// it) and the host socket is shut at once.
    pub fn kill(&mut self) {
        self.state = match self.state {
            State::Connecting {
                request_sent: false,
            }
            | State::Closed => State::Closed,
            _ => State::Closing,
        };
        self.shutdown_owed = 0;
        self.enter_teardown();
    }

    fn establish(&mut self) {
        self.state = State::Established;
        // The socket is fresh and nothing else was ever written to it, so
        // this short line fits its send buffer; if not, give up.
        let line = format!("OK {}\n", self.local_port);
        match send(&self.stream, line.as_bytes()) {
            Ok(n) if n == line.len() => {
                tracing::debug!(
                    port = self.local_port,
                    peer = self.peer_port,
                    "vsock: connected"
                )
            }
            res => {
                tracing::debug!(
                    port = self.local_port,
                    ?res,
                    "vsock: cannot confirm to host"
                );
                self.kill();
            }
        }
    }

    fn write_to_host(&mut self, payload: &[u8]) {
        if payload.is_empty() {
            return;
        }
        if self.to_host.len() + payload.len() > BUF_ALLOC as usize {
            crate::guest_warn!(
                port = self.local_port,
                buffered = self.to_host.len(),
                len = payload.len(),
                "vsock: guest overran its credit"
            );
            self.kill();
            return;
        }
        if self.host_hup {
            // The host is gone; count the bytes so the guest's credit flows.
            self.fwd_cnt += payload.len() as u32;
            return;
        }
        let mut written = 0;
        if self.to_host.is_empty() {
            match send(&self.stream, payload) {
                Ok(n) => written = n,
                Err(e) if is_transient(&e) => {}
                Err(e) => {
                    tracing::debug!(port = self.local_port, %e, "vsock: host write failed");
                    self.kill();
                    return;
                }
            }
        }
        self.fwd_cnt += written as u32; // written <= MAX_PAYLOAD
        self.to_host.extend(&payload[written..]);
        self.note_forwarded();
    }

    /// Owes the guest a credit update once its view of our free space is low
    /// and we have actually freed some since we last told it.
    fn note_forwarded(&mut self) {
        let received = self.fwd_cnt + Wrapping(self.to_host.len() as u32);
        let guest_view_used = (received - self.fwd_cnt_told).0;
        let guest_view_free = BUF_ALLOC.saturating_sub(guest_view_used);
        if guest_view_free < CREDIT_UPDATE_THRESHOLD && self.fwd_cnt != self.fwd_cnt_told {
            self.credit_update_owed = true;
        }
    }

    /// Once the guest is done sending and we flushed its data, the host
    /// learns EOF; once neither side will send more, the connection ends.
    fn check_finished(&mut self) {
        if self.state != State::Established || !self.to_host.is_empty() {
            return;
        }
        if self.guest_shut & SHUTDOWN_SEND == 0 {
            return;
        }
        if !self.host_write_shut {
            self.host_write_shut = true;
            let _ = self.stream.shutdown(Shutdown::Write);
        }
        if self.host_eof || self.guest_shut & SHUTDOWN_RCV != 0 {
            self.state = State::Closing;
            self.enter_teardown();
        }
    }

    /// EOF from the host: tell the guest we send no more; if the host also
    /// hung up, nothing can flow either way, so finish with an RST.
    fn on_host_eof(&mut self) -> Header {
        self.host_eof = true;
        self.host_readable = false;
        if self.host_hup {
            self.state = State::Closing;
            self.enter_teardown();
            return self.header(Op::Shutdown, 0, SHUTDOWN_BOTH);
        }
        let hdr = self.header(Op::Shutdown, 0, SHUTDOWN_SEND);
        self.check_finished();
        hdr
    }

    fn close_with_shutdown(&mut self) {
        self.state = State::Closing;
        self.enter_teardown();
        self.shutdown_owed = SHUTDOWN_BOTH;
    }

    fn enter_teardown(&mut self) {
        self.to_host.clear();
        self.host_readable = false;
        self.credit_update_owed = false;
        let _ = self.stream.shutdown(Shutdown::Both);
    }

    /// The guest still accepts data and we have not seen host EOF.
    fn may_send_to_guest(&self) -> bool {
        !self.host_eof && self.guest_shut & SHUTDOWN_RCV == 0
    }

    fn wants_host_read(&self) -> bool {
        self.host_readable && self.may_send_to_guest()
    }

    /// Bytes the guest can still take. A guest claiming to have forwarded
    /// more than we sent gets no credit rather than a wrapped huge one.
    fn peer_credit(&self) -> u32 {
        let in_flight = (self.rx_cnt - self.peer_fwd_cnt).0;
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    fn header(&mut self, op: Op, len: u32, flags: u32) -> Header {
        self.fwd_cnt_told = self.fwd_cnt;
        Header {
            src_cid: HOST_CID,
            dst_cid: self.guest_cid,
            src_port: self.local_port,
            dst_port: self.peer_port,
            len,
            type_: TYPE_STREAM,
            op: op as u16,
            flags,
            buf_alloc: BUF_ALLOC,
            fwd_cnt: self.fwd_cnt.0,
        }
    }
}

fn is_transient(e: &io::Error) -> bool {
    matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted)
}

/// `send(2)` with MSG_NOSIGNAL: a host client that went away must cost us
/// an EPIPE, not a SIGPIPE.
fn send(stream: &UnixStream, buf: &[u8]) -> io::Result<usize> {
    // SAFETY: `buf` is valid for reads of `buf.len()` bytes and the fd is
    // owned by `stream`, which outlives the call.
    let n = unsafe {
        libc::send(
            stream.as_raw_fd(),
            buf.as_ptr().cast(),
            buf.len(),
            libc::MSG_NOSIGNAL,
        )
    };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;
    use crate::vmm::devices::virtio::vsock::packet::MAX_PAYLOAD;

    const GUEST: u64 = 3;
    const LOCAL: u32 = 1 << 30;
    const PEER: u32 = 1024;

    /// A connection plus the host's end of its socket.
    fn pair() -> (Connection, UnixStream) {
        let (ours, host) = UnixStream::pair().unwrap();
        ours.set_nonblocking(true).unwrap();
        host.set_nonblocking(true).unwrap();
        (Connection::new(ours, GUEST, LOCAL, PEER), host)
    }

    fn guest_hdr(op: Op, len: u32, buf_alloc: u32, fwd_cnt: u32) -> Header {
        Header {
            src_cid: GUEST,
            dst_cid: HOST_CID,
            src_port: PEER,
            dst_port: LOCAL,
            len,
            type_: TYPE_STREAM,
            op: op as u16,
            flags: 0,
            buf_alloc,
            fwd_cnt,
        }
    }

    fn rx(conn: &mut Connection) -> Option<Header> {
        let mut buf = vec![0u8; MAX_PAYLOAD];
        conn.next_rx(&mut buf)
    }

    fn read_all(host: &mut UnixStream) -> Vec<u8> {
        let mut out = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            match host.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => out.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) => panic!("{e}"),
            }
        }
        out
    }

    /// Sends REQUEST, feeds RESPONSE with the given guest credit.
    fn established(buf_alloc: u32) -> (Connection, UnixStream) {
        let (mut conn, mut host) = pair();
        let req = rx(&mut conn).unwrap();
        assert_eq!(req.op, Op::Request as u16);
        assert_eq!((req.src_cid, req.dst_cid), (HOST_CID, GUEST));
        assert_eq!((req.src_port, req.dst_port), (LOCAL, PEER));
        assert!(!conn.has_pending_rx());
        conn.on_guest_packet(&guest_hdr(Op::Response, 0, buf_alloc, 0), Op::Response, &[]);
        assert_eq!(conn.state(), State::Established);
        assert_eq!(read_all(&mut host), format!("OK {LOCAL}\n").as_bytes());
        (conn, host)
    }

    #[test]
    fn host_data_never_exceeds_guest_credit() {
        let (mut conn, mut host) = established(10);
        host.write_all(&[7u8; 100]).unwrap();
        conn.on_host_readable();
        assert_eq!(
            conn.interest(),
            Some(Interest {
                read: false,
                write: false
            })
        );
        let pkt = rx(&mut conn).unwrap();
        assert_eq!((pkt.op, pkt.len), (Op::Rw as u16, 10));
        // Out of credit: ask once, then stay quiet.
        let pkt = rx(&mut conn).unwrap();
        assert_eq!(pkt.op, Op::CreditRequest as u16);
        assert!(!conn.has_pending_rx());
        assert_eq!(rx(&mut conn), None);
        // The guest consumed the 10 bytes.
        conn.on_guest_packet(
            &guest_hdr(Op::CreditUpdate, 0, 10, 10),
            Op::CreditUpdate,
            &[],
        );
        assert!(conn.has_pending_rx());
        let pkt = rx(&mut conn).unwrap();
        assert_eq!((pkt.op, pkt.len), (Op::Rw as u16, 10));
    }

    #[test]
    fn lying_guest_fwd_cnt_yields_no_credit() {
        let (mut conn, mut host) = established(0);
        conn.on_guest_packet(
            &guest_hdr(Op::CreditUpdate, 0, 100, 5000),
            Op::CreditUpdate,
            &[],
        );
        host.write_all(b"x").unwrap();
        conn.on_host_readable();
        assert_eq!(rx(&mut conn).unwrap().op, Op::CreditRequest as u16);
    }

    #[test]
    fn guest_data_is_buffered_up_to_buf_alloc_then_overrun_resets() {
        let (mut conn, mut host) = established(0);
        // Play a conforming guest against a host that does not read.
        let mut sent = Wrapping(0u32);
        let mut told_fwd = Wrapping(0u32);
        let chunk = vec![1u8; MAX_PAYLOAD];
        loop {
            while let Some(pkt) = rx(&mut conn) {
                assert_eq!(pkt.buf_alloc, BUF_ALLOC);
                told_fwd = Wrapping(pkt.fwd_cnt);
            }
            let credit = BUF_ALLOC - (sent - told_fwd).0;
            if credit == 0 {
                break;
            }
            let len = credit.min(MAX_PAYLOAD as u32);
            let hdr = guest_hdr(Op::Rw, len, 0, 0);
            conn.on_guest_packet(&hdr, Op::Rw, &chunk[..len as usize]);
            sent += len;
            assert_eq!(conn.state(), State::Established);
            assert!(conn.buffered() <= BUF_ALLOC as usize);
        }
        assert_eq!(conn.buffered(), BUF_ALLOC as usize);
        assert!(conn.interest().unwrap().write);

        // One byte beyond the credit.
        conn.on_guest_packet(&guest_hdr(Op::Rw, 1, 0, 0), Op::Rw, b"!");
        assert_eq!(conn.state(), State::Closing);
        assert_eq!(conn.buffered(), 0);
        assert_eq!(rx(&mut conn).unwrap().op, Op::Rst as u16);
        assert!(conn.is_closed());
        // The host sees the bytes that made it, then EOF.
        host.set_nonblocking(false).unwrap();
        let mut got = Vec::new();
        host.read_to_end(&mut got).unwrap();
        assert!(got.len() < sent.0 as usize && got.iter().all(|&b| b == 1));
    }

    #[test]
    fn flushing_to_host_sends_credit_update() {
        let (mut conn, mut host) = established(0);
        let chunk = vec![2u8; MAX_PAYLOAD];
        for _ in 0..4 {
            conn.on_guest_packet(&guest_hdr(Op::Rw, MAX_PAYLOAD as u32, 0, 0), Op::Rw, &chunk);
        }
        assert!(conn.buffered() > 0, "the socket should have filled up");
        let mut last_fwd = 0;
        while let Some(pkt) = rx(&mut conn) {
            last_fwd = pkt.fwd_cnt;
        }
        let mut total = 0;
        for _ in 0..1000 {
            total += read_all(&mut host).len();
            conn.on_host_writable();
            while let Some(pkt) = rx(&mut conn) {
                assert_eq!(pkt.op, Op::CreditUpdate as u16);
                last_fwd = pkt.fwd_cnt;
            }
            if total == 4 * MAX_PAYLOAD {
                break;
            }
        }
        assert_eq!(total, 4 * MAX_PAYLOAD);
        assert_eq!(conn.buffered(), 0);
        // The guest was told enough to keep sending at full speed.
        let guest_view_used = 4 * MAX_PAYLOAD as u32 - last_fwd;
        assert!(BUF_ALLOC - guest_view_used >= CREDIT_UPDATE_THRESHOLD);
        assert!(last_fwd > 0);
        assert_eq!(
            conn.interest(),
            Some(Interest {
                read: true,
                write: false
            })
        );
    }

    #[test]
    fn guest_credit_request_gets_credit_update() {
        let (mut conn, _host) = established(0);
        conn.on_guest_packet(
            &guest_hdr(Op::CreditRequest, 0, 0, 0),
            Op::CreditRequest,
            &[],
        );
        let pkt = rx(&mut conn).unwrap();
        assert_eq!(
            (pkt.op, pkt.buf_alloc),
            (Op::CreditUpdate as u16, BUF_ALLOC)
        );
    }

    #[test]
    fn host_half_close_then_guest_shutdown_ends_with_rst() {
        let (mut conn, host) = established(4096);
        host.shutdown(Shutdown::Write).unwrap();
        conn.on_host_readable();
        let pkt = rx(&mut conn).unwrap();
        assert_eq!((pkt.op, pkt.flags), (Op::Shutdown as u16, SHUTDOWN_SEND));
        assert_eq!(conn.state(), State::Established);
        // The guest still sends, then finishes.
        conn.on_guest_packet(&guest_hdr(Op::Rw, 2, 4096, 0), Op::Rw, b"hi");
        let mut shut = guest_hdr(Op::Shutdown, 0, 4096, 0);
        shut.flags = SHUTDOWN_BOTH;
        conn.on_guest_packet(&shut, Op::Shutdown, &[]);
        assert_eq!(rx(&mut conn).unwrap().op, Op::Rst as u16);
        assert!(conn.is_closed());
        let mut host = host;
        host.set_nonblocking(false).unwrap();
        let mut got = Vec::new();
        host.read_to_end(&mut got).unwrap();
        assert_eq!(got, b"hi");
    }

    #[test]
    fn host_close_drains_data_then_shutdown_then_rst() {
        let (mut conn, mut host) = established(4096);
        host.write_all(b"last words").unwrap();
        drop(host);
        conn.on_host_readable();
        conn.on_host_hangup();
        assert_eq!(conn.interest(), None);
        let mut buf = [0u8; 64];
        let pkt = conn.next_rx(&mut buf).unwrap();
        assert_eq!(pkt.op, Op::Rw as u16);
        assert_eq!(&buf[..pkt.len as usize], b"last words");
        let pkt = conn.next_rx(&mut buf).unwrap();
        assert_eq!((pkt.op, pkt.flags), (Op::Shutdown as u16, SHUTDOWN_BOTH));
        assert_eq!(conn.next_rx(&mut buf).unwrap().op, Op::Rst as u16);
        assert!(conn.is_closed());
        assert_eq!(conn.next_rx(&mut buf), None);
    }

    #[test]
    fn guest_send_shutdown_gives_host_eof_after_flush() {
        let (mut conn, mut host) = established(4096);
        conn.on_guest_packet(&guest_hdr(Op::Rw, 3, 4096, 0), Op::Rw, b"abc");
        let mut shut = guest_hdr(Op::Shutdown, 0, 4096, 0);
        shut.flags = SHUTDOWN_SEND;
        conn.on_guest_packet(&shut, Op::Shutdown, &[]);
        assert_eq!(conn.state(), State::Established);
        host.set_nonblocking(false).unwrap();
        let mut got = Vec::new();
        host.read_to_end(&mut got).unwrap();
        assert_eq!(got, b"abc");
        // The host can still answer.
        host.write_all(b"reply").unwrap();
        conn.on_host_readable();
        assert_eq!(rx(&mut conn).unwrap().len, 5);
    }

    #[test]
    fn host_hangup_while_connecting_resets() {
        let (mut conn, host) = pair();
        assert_eq!(rx(&mut conn).unwrap().op, Op::Request as u16);
        drop(host);
        conn.on_host_hangup();
        assert_eq!(rx(&mut conn).unwrap().op, Op::Rst as u16);
        assert!(conn.is_closed());
    }

    #[test]
    fn kill_before_request_is_silent() {
        let (mut conn, _host) = pair();
        conn.kill();
        assert!(conn.is_closed());
        assert_eq!(rx(&mut conn), None);
    }

    #[test]
    fn out_of_state_packets_reset() {
        // Data before the handshake completed.
        let (mut conn, _host) = pair();
        rx(&mut conn).unwrap();
        conn.on_guest_packet(&guest_hdr(Op::Rw, 1, 0, 0), Op::Rw, b"x");
        assert_eq!(conn.state(), State::Closing);

        // A second RESPONSE, a REQUEST on an open connection.
        for op in [Op::Response, Op::Request] {
            let (mut conn, _host) = established(0);
            conn.on_guest_packet(&guest_hdr(op, 0, 0, 0), op, &[]);
            assert_eq!(conn.state(), State::Closing, "{op:?}");
        }

        // Data after the guest said it sends no more.
        let (mut conn, _host) = established(0);
        let mut shut = guest_hdr(Op::Shutdown, 0, 0, 0);
        shut.flags = SHUTDOWN_SEND;
        conn.on_guest_packet(&shut, Op::Shutdown, &[]);
        conn.on_guest_packet(&guest_hdr(Op::Rw, 1, 0, 0), Op::Rw, b"x");
        assert_eq!(conn.state(), State::Closing);
    }

    #[test]
    fn guest_rst_closes_without_reply() {
        let (mut conn, _host) = established(0);
        conn.on_guest_packet(&guest_hdr(Op::Rst, 0, 0, 0), Op::Rst, &[]);
        assert!(conn.is_closed());
        assert_eq!(rx(&mut conn), None);
    }
}

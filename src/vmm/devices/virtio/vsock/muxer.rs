//! The host side of the device: the Unix listener, the `CONNECT <port>`
//! handshake of freshly accepted host streams, local port allocation, the
//! table of connections, and the order in which they get to send to the
//! guest.
//!
//! Host convention (as Firecracker's): a host process connects to the
//! device's Unix socket and writes `CONNECT <guest port>\n`; the guest is
//! sent a REQUEST from a fresh host port, and once it answers with RESPONSE
//! the host reads `OK <host port>\n`, after which the stream carries the
//! connection's bytes.
//!
//! Guest-initiated connections (a guest REQUEST to CID 2) are forwarded only
//! to the host ports the VMM was told to forward, also Firecracker's way:
//! the muxer connects to the Unix socket `<uds path>_<port>`, without
//! blocking, and answers RESPONSE once connected or RST if nobody listens
//! there. Every other guest REQUEST is refused with an RST.
//!
//! The muxer owns the epoll instance the device thread sleeps on; the
//! thread registers its own event fds with tokens below
//! `FIRST_STREAM_TOKEN`.

use std::collections::{HashMap, HashSet, VecDeque};
use std::io::{self, ErrorKind, Read};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use super::connection::{Connection, Interest};
use super::packet::{Header, Op};

const TOKEN_LISTENER: u64 = 0;
/// Tokens `1..FIRST_STREAM_TOKEN` are the device thread's own.
pub const FIRST_STREAM_TOKEN: u64 = 16;

/// Open connections; each may hold `BUF_ALLOC` bytes of guest data.
const MAX_CONNECTIONS: usize = 256;
/// Accepted host streams that have not finished their CONNECT line.
const MAX_HANDSHAKES: usize = 64;
/// `CONNECT 4294967295\n` is 19 bytes; anything this long is garbage.
const CONNECT_LINE_MAX: usize = 32;
/// RSTs owed to the guest for packets no connection owns. Past this the
/// guest is flooding us and further ones are dropped.
const MAX_QUEUED_RSTS: usize = 1024;
/// Accepts per listener wake-up; level-triggered epoll brings us back.
const ACCEPTS_PER_EVENT: usize = 16;
/// Host ports are handed out round-robin from [2^30, 2^31).
const LOCAL_PORT_FIRST: u32 = 1 << 30;
const LOCAL_PORT_END: u32 = 1 << 31;
/// Of `MAX_CONNECTIONS`, the most the guest may open: host callers (the
/// agent connection) always find room.
pub const MAX_GUEST_CONNECTIONS: usize = 224;

/// A connection's identity on the wire: its host port and its guest port.
/// Host-initiated connections each have their own host port; the guest's
/// connections to a forwarded host port share it and differ by guest port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct ConnKey {
    local: u32,
    peer: u32,
}

/// Guest connections to these host ports go to `<uds path>_<port>`.
#[derive(Clone, Debug, Default)]
pub struct GuestForwards {
    uds_path: PathBuf,
    ports: Vec<u32>,
}

impl GuestForwards {
    /// Ports must lie below the range handed out to host connections.
    pub fn new(uds_path: &Path, ports: &[u32]) -> io::Result<GuestForwards> {
        if let Some(bad) = ports.iter().find(|&&p| p >= LOCAL_PORT_FIRST) {
            return Err(io::Error::new(
                ErrorKind::InvalidInput,
                format!("forwarded vsock port {bad} is not below {LOCAL_PORT_FIRST}"),
            ));
        }
        Ok(GuestForwards {
            uds_path: uds_path.to_path_buf(),
            ports: ports.to_vec(),
        })
    }

    /// The socket a guest connection to `port` goes to, if it is forwarded.
    fn target(&self, port: u32) -> Option<PathBuf> {
        self.ports.contains(&port).then(|| {
            let mut path = self.uds_path.clone().into_os_string();
            path.push(format!("_{port}"));
            PathBuf::from(path)
        })
    }
}

/// A host stream that has yet to say where it wants to go.
struct Handshake {
    stream: UnixStream,
    line: Vec<u8>,
}

enum LineRead {
    Pending,
    Port(u32),
    Bad(&'static str),
}

impl Handshake {
    /// Reads byte by byte so nothing past the newline, which belongs to the
    /// guest, is consumed here.
    fn read_line(&mut self) -> LineRead {
        loop {
            if self.line.len() >= CONNECT_LINE_MAX {
                return LineRead::Bad("CONNECT line too long");
            }
            let mut byte = [0u8; 1];
            match self.stream.read(&mut byte) {
                Ok(0) => return LineRead::Bad("closed before CONNECT"),
                Ok(_) if byte[0] == b'\n' => return parse_connect(&self.line),
                Ok(_) => self.line.push(byte[0]),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) if e.kind() == ErrorKind::WouldBlock => return LineRead::Pending,
                Err(_) => return LineRead::Bad("read error"),
            }
        }
    }
}

fn parse_connect(line: &[u8]) -> LineRead {
    let Ok(line) = std::str::from_utf8(line) else {
        return LineRead::Bad("CONNECT line is not UTF-8");
    };
    let mut words = line.split_ascii_whitespace();
    match (words.next(), words.next(), words.next()) {
        (Some(cmd), Some(port), None) if cmd.eq_ignore_ascii_case("connect") => {
            match port.parse::<u32>() {
                // u32::MAX is VMADDR_PORT_ANY, never a real destination.
                Ok(port) if port != u32::MAX => LineRead::Port(port),
                _ => LineRead::Bad("bad port in CONNECT line"),
            }
        }
        _ => LineRead::Bad("expected CONNECT <port>"),
    }
}

enum Slot {
    Handshake(Handshake),
    Conn(ConnKey),
}

struct Entry {
    conn: Connection,
    token: u64,
    /// What epoll currently watches for this stream; `None` = not registered.
    watched: Option<Interest>,
    /// Already in `rx_order`.
    queued: bool,
}

pub struct Muxer {
    guest_cid: u64,
    epoll: Epoll,
    listener: UnixListener,
    listener_watched: bool,
    /// Epoll token → host stream.
    slots: HashMap<u64, Slot>,
    conns: HashMap<ConnKey, Entry>,
    /// Host ports of host-initiated connections (each has its own).
    host_ports: HashSet<u32>,
    /// Guest-initiated connections open.
    guest_conns: usize,
    forwards: GuestForwards,
    /// Connections with something to send to the guest, served round-robin.
    rx_order: VecDeque<ConnKey>,
    /// (host port, guest port) pairs owed an RST.
    rsts: VecDeque<(u32, u32)>,
    next_token: u64,
    next_port: u32,
}

impl Muxer {
    pub fn new(
        guest_cid: u64,
        listener: UnixListener,
        forwards: GuestForwards,
    ) -> io::Result<Muxer> {
        listener.set_nonblocking(true)?;
        let epoll = Epoll::new()?;
        epoll.ctl(
            ControlOperation::Add,
            listener.as_raw_fd(),
            EpollEvent::new(EventSet::IN, TOKEN_LISTENER),
        )?;
        Ok(Muxer {
            guest_cid,
            epoll,
            listener,
            listener_watched: true,
            slots: HashMap::new(),
            conns: HashMap::new(),
            host_ports: HashSet::new(),
            guest_conns: 0,
            forwards,
            rx_order: VecDeque::new(),
            rsts: VecDeque::new(),
            next_token: FIRST_STREAM_TOKEN,
            next_port: random_first_port(),
        })
    }

    pub fn guest_cid(&self) -> u64 {
        self.guest_cid
    }

    /// Lets the device thread wait on its own fds in the same epoll.
    pub fn add_thread_fd(&self, fd: RawFd, token: u64) -> io::Result<()> {
        debug_assert!(token != TOKEN_LISTENER && token < FIRST_STREAM_TOKEN);
        self.epoll.ctl(
            ControlOperation::Add,
            fd,
            EpollEvent::new(EventSet::IN, token),
        )
    }

    pub fn remove_thread_fd(&self, fd: RawFd) {
        let _ = self
            .epoll
            .ctl(ControlOperation::Delete, fd, EpollEvent::default());
    }

    /// Sleeps until some fd is ready (`timeout_ms` < 0: no timeout).
    pub fn wait(&self, timeout_ms: i32, events: &mut [EpollEvent]) -> io::Result<usize> {
        self.epoll.wait(timeout_ms, events)
    }

    #[cfg(test)]
    pub fn connection_count(&self) -> usize {
        self.conns.len()
    }

    pub fn handshake_count(&self) -> usize {
        self.slots.len().saturating_sub(self.conns.len())
    }

    /// Dispatches one epoll event for a token this muxer registered.
    pub fn handle_event(&mut self, token: u64, events: EventSet) {
        if token == TOKEN_LISTENER {
            self.accept_host_streams();
            return;
        }
        match self.slots.get(&token) {
            Some(Slot::Conn(key)) => {
                let key = *key;
                self.conn_event(key, events);
            }
            Some(Slot::Handshake(_)) => self.handshake_event(token, events),
            // A stream removed earlier in the same batch of events.
            None => {}
        }
    }

    /// Routes a validated guest packet.
    pub fn handle_guest_packet(&mut self, hdr: &Header, op: Op, payload: &[u8]) {
        tracing::debug!(?hdr, "vsock: guest packet");
        let Some(key) = self.owner(hdr) else {
            match op {
                // Never answer an RST with an RST.
                Op::Rst => {}
                Op::Request => self.accept_guest_connection(hdr),
                _ => self.queue_rst(hdr.dst_port, hdr.src_port),
            }
            return;
        };
        if let Some(entry) = self.conns.get_mut(&key) {
            entry.conn.on_guest_packet(hdr, op, payload);
        }
        self.refresh(key);
    }

    /// A guest packet failed validation: if it names a connection, that
    /// connection is reset.
    pub fn handle_malformed(&mut self, hdr: &Header) {
        let Some(key) = self.owner(hdr) else { return };
        if let Some(entry) = self.conns.get_mut(&key) {
            entry.conn.kill();
        }
        self.refresh(key);
    }

    pub fn has_pending_rx(&self) -> bool {
        !self.rsts.is_empty() || !self.rx_order.is_empty()
    }

    /// The next packet for the guest; its payload (`hdr.len` bytes) is in
    /// `buf`, whose length bounds it.
    pub fn next_rx(&mut self, buf: &mut [u8]) -> Option<Header> {
        if let Some((host_port, guest_port)) = self.rsts.pop_front() {
            return Some(Header::rst(self.guest_cid, host_port, guest_port));
        }
        // Each queued connection gets one turn; one with more to say goes
        // to the back, so a busy stream cannot starve the others.
        for _ in 0..self.rx_order.len() {
            let Some(key) = self.rx_order.pop_front() else {
                break;
            };
            let Some(entry) = self.conns.get_mut(&key) else {
                continue;
            };
            entry.queued = false;
            let pkt = entry.conn.next_rx(buf);
            self.refresh(key);
            if let Some(hdr) = pkt {
                tracing::debug!(?hdr, "vsock: packet to guest");
                return Some(hdr);
            }
        }
        None
    }

    /// Forgets every connection without telling the guest (which is about
    /// to be told by a transport reset, or is being reset itself). Host
    /// streams see EOF.
    pub fn drop_connections(&mut self) {
        let keys: Vec<ConnKey> = self.conns.keys().copied().collect();
        for key in keys {
            self.remove_conn(key);
        }
        self.rx_order.clear();
        self.rsts.clear();
    }

    /// The connection a guest packet belongs to: the host port it targets
    /// and the guest port it comes from.
    fn owner(&self, hdr: &Header) -> Option<ConnKey> {
        let key = ConnKey {
            local: hdr.dst_port,
            peer: hdr.src_port,
        };
        self.conns.contains_key(&key).then_some(key)
    }

    /// A guest REQUEST no connection owns: connected to the host socket its
    /// port forwards to, or refused with an RST.
    fn accept_guest_connection(&mut self, hdr: &Header) {
        let refuse = |m: &mut Muxer, why: &str| {
            tracing::debug!(port = hdr.dst_port, why, "vsock: guest connect refused");
            m.queue_rst(hdr.dst_port, hdr.src_port);
        };
        let Some(path) = self.forwards.target(hdr.dst_port) else {
            return refuse(self, "port not forwarded");
        };
        if self.guest_conns >= MAX_GUEST_CONNECTIONS || self.conns.len() >= MAX_CONNECTIONS {
            crate::guest_warn!("vsock: too many guest connections, refusing one");
            return refuse(self, "too many connections");
        }
        let stream = match connect_nonblocking(&path) {
            Ok(stream) => stream,
            // Nobody listens, or the listener's backlog is full.
            Err(e) => {
                tracing::debug!(%e, path = %path.display(), "vsock: forward connect failed");
                return refuse(self, "host socket unavailable");
            }
        };
        let token = self.next_token;
        self.next_token += 1;
        let watched = Some(Interest::default());
        if let Err(e) = self.epoll.ctl(
            ControlOperation::Add,
            stream.as_raw_fd(),
            EpollEvent::new(events(Interest::default()), token),
        ) {
            crate::guest_warn!(%e, "vsock: cannot watch forwarded stream");
            return refuse(self, "epoll");
        }
        let key = ConnKey {
            local: hdr.dst_port,
            peer: hdr.src_port,
        };
        let conn = Connection::accepted(stream, self.guest_cid, hdr);
        self.guest_conns += 1;
        self.add_conn(key, conn, token, watched);
    }

    fn queue_rst(&mut self, host_port: u32, guest_port: u32) {
        if self.rsts.len() < MAX_QUEUED_RSTS {
            self.rsts.push_back((host_port, guest_port));
        } else {
            tracing::debug!("vsock: RST queue full, dropping one");
        }
    }

    fn accept_host_streams(&mut self) {
        for _ in 0..ACCEPTS_PER_EVENT {
            let stream = match self.listener.accept() {
                Ok((stream, _)) => stream,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e)
                    if matches!(
                        e.kind(),
                        ErrorKind::Interrupted | ErrorKind::ConnectionAborted
                    ) =>
                {
                    continue;
                }
                Err(e) => {
                    // E.g. out of fds: the listener would stay readable and
                    // spin the thread, so stop watching it until a stream
                    // closes.
                    crate::guest_warn!(%e, "vsock: accept failed; pausing the listener");
                    self.watch_listener(false);
                    return;
                }
            };
            if self.handshake_count() >= MAX_HANDSHAKES || self.conns.len() >= MAX_CONNECTIONS {
                crate::guest_warn!("vsock: too many host connections, refusing one");
                continue;
            }
            if let Err(e) = stream.set_nonblocking(true) {
                crate::guest_warn!(%e, "vsock: cannot make host stream non-blocking");
                continue;
            }
            let token = self.next_token;
            self.next_token += 1;
            let ev = EpollEvent::new(EventSet::IN, token);
            if let Err(e) = self
                .epoll
                .ctl(ControlOperation::Add, stream.as_raw_fd(), ev)
            {
                crate::guest_warn!(%e, "vsock: cannot watch host stream");
                continue;
            }
            let hs = Handshake {
                stream,
                line: Vec::with_capacity(CONNECT_LINE_MAX),
            };
            self.slots.insert(token, Slot::Handshake(hs));
        }
    }

    fn watch_listener(&mut self, watch: bool) {
        if watch == self.listener_watched {
            return;
        }
        let fd = self.listener.as_raw_fd();
        let res = if watch {
            self.epoll.ctl(
                ControlOperation::Add,
                fd,
                EpollEvent::new(EventSet::IN, TOKEN_LISTENER),
            )
        } else {
            self.epoll
                .ctl(ControlOperation::Delete, fd, EpollEvent::default())
        };
        match res {
            Ok(()) => self.listener_watched = watch,
            Err(e) => crate::guest_warn!(%e, watch, "vsock: cannot change listener watch"),
        }
    }

    fn handshake_event(&mut self, token: u64, events: EventSet) {
        let Some(Slot::Handshake(hs)) = self.slots.get_mut(&token) else {
            return;
        };
        match hs.read_line() {
            LineRead::Pending if events.intersects(EventSet::HANG_UP | EventSet::ERROR) => {
                self.close_handshake(token, "hang-up before CONNECT")
            }
            LineRead::Pending => {}
            LineRead::Bad(why) => self.close_handshake(token, why),
            LineRead::Port(port) => self.start_connection(token, port),
        }
    }

    fn close_handshake(&mut self, token: u64, why: &str) {
        tracing::debug!(why, "vsock: dropping host stream");
        if let Some(Slot::Handshake(hs)) = self.slots.remove(&token) {
            self.unwatch(hs.stream.as_raw_fd());
        }
        self.watch_listener(true);
    }

    fn start_connection(&mut self, token: u64, guest_port: u32) {
        let Some(Slot::Handshake(hs)) = self.slots.remove(&token) else {
            return;
        };
        let Some(local_port) = self.alloc_port() else {
            crate::guest_warn!("vsock: out of host ports");
            self.unwatch(hs.stream.as_raw_fd());
            return;
        };
        tracing::debug!(local_port, guest_port, "vsock: host connect");
        let conn = Connection::new(hs.stream, self.guest_cid, local_port, guest_port);
        // The handshake registration (IN) carries over; refresh adjusts it.
        let watched = Some(Interest {
            read: true,
            write: false,
        });
        let key = ConnKey {
            local: local_port,
            peer: guest_port,
        };
        self.host_ports.insert(local_port);
        self.add_conn(key, conn, token, watched);
    }

    /// Tables a new connection whose stream epoll watches as `watched`
    /// under `token`, and lets it say its first packet.
    fn add_conn(&mut self, key: ConnKey, conn: Connection, token: u64, watched: Option<Interest>) {
        let entry = Entry {
            conn,
            token,
            watched,
            queued: false,
        };
        self.conns.insert(key, entry);
        self.slots.insert(token, Slot::Conn(key));
        self.refresh(key);
    }

    /// Round-robin over the port range, skipping ports in use; with at most
    /// MAX_CONNECTIONS in use this ends quickly.
    fn alloc_port(&mut self) -> Option<u32> {
        if self.conns.len() >= MAX_CONNECTIONS {
            return None;
        }
        for _ in 0..=MAX_CONNECTIONS {
            let port = self.next_port;
            self.next_port = if port + 1 >= LOCAL_PORT_END {
                LOCAL_PORT_FIRST
            } else {
                port + 1
            };
            if !self.host_ports.contains(&port) {
                return Some(port);
            }
        }
        None
    }

    fn conn_event(&mut self, key: ConnKey, events: EventSet) {
        let Some(entry) = self.conns.get_mut(&key) else {
            return;
        };
        let conn = &mut entry.conn;
        if events.contains(EventSet::ERROR) {
            conn.on_host_error();
        } else {
            if events.contains(EventSet::OUT) {
                conn.on_host_writable();
            }
            if events.contains(EventSet::IN) {
                conn.on_host_readable();
            }
            if events.contains(EventSet::HANG_UP) {
                conn.on_host_hangup();
            }
        }
        self.refresh(key);
    }

    /// Brings epoll and the RX order in line with a connection's state after
    /// anything happened to it, and frees it once it is closed.
    fn refresh(&mut self, key: ConnKey) {
        let Some(entry) = self.conns.get_mut(&key) else {
            return;
        };
        let want = entry.conn.interest();
        if !entry.conn.is_closed()
            && want != entry.watched
            && let Err(e) = update_watch(&self.epoll, entry, want)
        {
            crate::guest_warn!(?key, %e, "vsock: epoll update failed; resetting connection");
            entry.conn.kill();
            // A killed connection is never watched.
            let _ = self.epoll.ctl(
                ControlOperation::Delete,
                entry.conn.stream().as_raw_fd(),
                EpollEvent::default(),
            );
            entry.watched = None;
        }
        if entry.conn.is_closed() {
            self.remove_conn(key);
            return;
        }
        if entry.conn.has_pending_rx() && !entry.queued {
            entry.queued = true;
            self.rx_order.push_back(key);
        }
    }

    fn remove_conn(&mut self, key: ConnKey) {
        let Some(entry) = self.conns.remove(&key) else {
            return;
        };
        if entry.watched.is_some() {
            self.unwatch(entry.conn.stream().as_raw_fd());
        }
        self.slots.remove(&entry.token);
        if !self.host_ports.remove(&key.local) {
            self.guest_conns = self.guest_conns.saturating_sub(1);
        }
        tracing::debug!(?key, "vsock: connection freed");
        // Stale `rx_order` entries are skipped by `next_rx`.
        self.watch_listener(true);
    }

    fn unwatch(&self, fd: RawFd) {
        let _ = self
            .epoll
            .ctl(ControlOperation::Delete, fd, EpollEvent::default());
    }
}

fn update_watch(epoll: &Epoll, entry: &mut Entry, want: Option<Interest>) -> io::Result<()> {
    let fd = entry.conn.stream().as_raw_fd();
    match (entry.watched, want) {
        (None, None) => {}
        (Some(_), None) => epoll.ctl(ControlOperation::Delete, fd, EpollEvent::default())?,
        (None, Some(i)) => epoll.ctl(
            ControlOperation::Add,
            fd,
            EpollEvent::new(events(i), entry.token),
        )?,
        (Some(_), Some(i)) => epoll.ctl(
            ControlOperation::Modify,
            fd,
            EpollEvent::new(events(i), entry.token),
        )?,
    }
    entry.watched = want;
    Ok(())
}

fn events(i: Interest) -> EventSet {
    let mut set = EventSet::empty();
    if i.read {
        set |= EventSet::IN;
    }
    if i.write {
        set |= EventSet::OUT;
    }
    set
}

/// Connects a Unix stream socket without ever blocking: a listener whose
/// backlog is full fails at once (EAGAIN) instead of stalling the device
/// thread. Unix sockets connect synchronously otherwise.
fn connect_nonblocking(path: &Path) -> io::Result<UnixStream> {
    use std::os::fd::FromRawFd;
    use std::os::unix::ffi::OsStrExt;

    // SAFETY: an all-zero sockaddr_un is valid; it is filled in below.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let bytes = path.as_os_str().as_bytes();
    if bytes.len() >= addr.sun_path.len() {
        return Err(io::Error::new(
            ErrorKind::InvalidInput,
            "socket path too long",
        ));
    }
    for (dst, src) in addr.sun_path.iter_mut().zip(bytes) {
        *dst = *src as libc::c_char;
    }
    // SAFETY: plain socket creation; the fd is owned by the stream below.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh socket nobody else owns.
    let stream = unsafe { UnixStream::from_raw_fd(fd) };
    let len = std::mem::size_of::<libc::sa_family_t>() + bytes.len() + 1;
    // SAFETY: `addr` is a valid sockaddr_un and `len` covers its used part.
    let rc = unsafe {
        libc::connect(
            fd,
            (&raw const addr).cast::<libc::sockaddr>(),
            len as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(stream)
}

/// Where port allocation starts. A restored guest may still hold
/// connections on ports an earlier VMM process handed out until it processes
/// the transport reset; a random start keeps a new connection off them.
fn random_first_port() -> u32 {
    let mut bytes = [0u8; 4];
    let span = LOCAL_PORT_END - LOCAL_PORT_FIRST;
    if crate::vmm::devices::virtio::rng::fill_random(&mut bytes) {
        LOCAL_PORT_FIRST + u32::from_le_bytes(bytes) % span
    } else {
        LOCAL_PORT_FIRST
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;
    use crate::vmm::devices::virtio::vsock::connection::BUF_ALLOC;
    use crate::vmm::devices::virtio::vsock::packet::{HOST_CID, MAX_PAYLOAD, SHUTDOWN_BOTH};
    use crate::vmm::devices::virtio::vsock::test_utils::{
        FORWARDED_PORT, GUEST_CID, Host, guest_hdr,
    };

    fn rx(m: &mut Muxer) -> Option<Header> {
        let mut buf = vec![0u8; MAX_PAYLOAD];
        m.next_rx(&mut buf)
    }

    fn from_guest(op: Op, src_port: u32, dst_port: u32) -> Header {
        guest_hdr(op, src_port, dst_port, 0)
    }

    /// Host connects to guest port 1024; returns the REQUEST it caused.
    fn connect(h: &mut Host) -> (UnixStream, Header) {
        let mut c = h.client();
        c.write_all(b"CONNECT 1024\n").unwrap();
        h.poll_until(|m| m.connection_count() == 1);
        let req = rx(&mut h.muxer).unwrap();
        assert_eq!(req.op, Op::Request as u16);
        assert_eq!(
            (req.src_cid, req.dst_cid, req.dst_port),
            (HOST_CID, GUEST_CID, 1024)
        );
        assert!((LOCAL_PORT_FIRST..LOCAL_PORT_END).contains(&req.src_port));
        (c, req)
    }

    fn read_line(c: &mut UnixStream) -> String {
        let mut out = Vec::new();
        let mut b = [0u8; 1];
        while c.read(&mut b).unwrap() == 1 && b[0] != b'\n' {
            out.push(b[0]);
        }
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn connect_response_ok_then_data_both_ways() {
        let mut h = Host::new();
        let (mut c, req) = connect(&mut h);
        let resp = from_guest(Op::Response, 1024, req.src_port);
        h.muxer.handle_guest_packet(&resp, Op::Response, &[]);
        assert_eq!(read_line(&mut c), format!("OK {}", req.src_port));

        // Host → guest.
        c.write_all(b"ping").unwrap();
        h.poll_until(|m| m.has_pending_rx());
        let mut buf = [0u8; 64];
        let pkt = h.muxer.next_rx(&mut buf).unwrap();
        assert_eq!((pkt.op, pkt.len, pkt.dst_port), (Op::Rw as u16, 4, 1024));
        assert_eq!(&buf[..4], b"ping");
        assert_eq!(pkt.buf_alloc, BUF_ALLOC);

        // Guest → host.
        let rw = guest_hdr(Op::Rw, 1024, req.src_port, 4);
        h.muxer.handle_guest_packet(&rw, Op::Rw, b"pong");
        let mut got = [0u8; 4];
        c.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"pong");

        // Guest RST frees it; the host sees EOF.
        h.muxer
            .handle_guest_packet(&from_guest(Op::Rst, 1024, req.src_port), Op::Rst, &[]);
        assert_eq!(h.muxer.connection_count(), 0);
        assert_eq!(c.read(&mut got).unwrap(), 0);
        assert!(rx(&mut h.muxer).is_none());
    }

    #[test]
    fn bytes_after_connect_line_go_to_guest() {
        let mut h = Host::new();
        let mut c = h.client();
        c.write_all(b"connect 7\nearly").unwrap();
        h.poll_until(|m| m.connection_count() == 1);
        let req = rx(&mut h.muxer).unwrap();
        assert_eq!(req.dst_port, 7);
        h.muxer.handle_guest_packet(
            &from_guest(Op::Response, 7, req.src_port),
            Op::Response,
            &[],
        );
        h.poll_until(|m| m.has_pending_rx());
        let mut buf = [0u8; 64];
        let pkt = h.muxer.next_rx(&mut buf).unwrap();
        assert_eq!(&buf[..pkt.len as usize], b"early");
    }

    #[test]
    fn garbage_connect_lines_close_the_stream() {
        for line in [
            &b"HELLO 1\n"[..],
            b"CONNECT\n",
            b"CONNECT x\n",
            b"CONNECT 1 2\n",
            b"CONNECT -1\n",
            b"CONNECT 4294967295\n",
            b"CONNECT 99999999999\n",
            b"\xff\xfe\n",
            &[b'A'; 100],
        ] {
            let mut h = Host::new();
            let mut c = h.client();
            c.write_all(line).unwrap();
            h.poll_until(|m| m.handshake_count() == 1);
            h.poll_until(|m| m.handshake_count() == 0);
            assert!(h.muxer.slots.is_empty());
            assert_eq!(h.muxer.connection_count(), 0);
            assert!(!h.muxer.has_pending_rx());
            let mut b = [0u8; 1];
            assert_eq!(c.read(&mut b).unwrap_or(0), 0, "{line:?}");
        }
    }

    #[test]
    fn host_close_before_connect_line_is_cleaned_up() {
        let mut h = Host::new();
        let mut c = h.client();
        c.write_all(b"CONN").unwrap();
        h.poll_until(|m| m.handshake_count() == 1);
        h.poll(); // the partial line
        assert_eq!(h.muxer.handshake_count(), 1);
        drop(c);
        h.poll_until(|m| m.handshake_count() == 0);
        assert!(h.muxer.slots.is_empty());
    }

    #[test]
    fn guest_connection_to_a_port_not_forwarded_is_refused() {
        let mut h = Host::new();
        let req = from_guest(Op::Request, 5000, 80);
        h.muxer.handle_guest_packet(&req, Op::Request, &[]);
        let rst = rx(&mut h.muxer).unwrap();
        assert_eq!(rst.op, Op::Rst as u16);
        assert_eq!(
            (rst.src_port, rst.dst_port, rst.dst_cid),
            (80, 5000, GUEST_CID)
        );
        // An RST for nothing is not answered.
        h.muxer
            .handle_guest_packet(&from_guest(Op::Rst, 5000, 80), Op::Rst, &[]);
        assert!(!h.muxer.has_pending_rx());
    }

    /// A listener where `Host` forwards guest connections to FORWARDED_PORT.
    fn forward_listener(h: &Host) -> UnixListener {
        let mut path = h.path.clone().into_os_string();
        path.push(format!("_{FORWARDED_PORT}"));
        UnixListener::bind(PathBuf::from(path)).unwrap()
    }

    /// The guest connects from `guest_port`; returns the host's end.
    fn guest_connect(h: &mut Host, listener: &UnixListener, guest_port: u32) -> UnixStream {
        let req = from_guest(Op::Request, guest_port, FORWARDED_PORT);
        h.muxer.handle_guest_packet(&req, Op::Request, &[]);
        let resp = rx(&mut h.muxer).unwrap();
        assert_eq!(resp.op, Op::Response as u16);
        assert_eq!(
            (resp.src_port, resp.dst_port, resp.dst_cid),
            (FORWARDED_PORT, guest_port, GUEST_CID)
        );
        let (stream, _) = listener.accept().unwrap();
        stream
            .set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .unwrap();
        stream
    }

    #[test]
    fn guest_connections_to_a_forwarded_port_reach_its_socket() {
        let mut h = Host::new();
        let listener = forward_listener(&h);
        let mut a = guest_connect(&mut h, &listener, 5000);
        let mut b = guest_connect(&mut h, &listener, 5001);
        assert_eq!(h.muxer.connection_count(), 2);

        // Guest → host, each to its own stream; nothing precedes the data.
        for (port, stream, data) in [(5000, &mut a, b"to-a"), (5001, &mut b, b"to-b")] {
            let rw = guest_hdr(Op::Rw, port, FORWARDED_PORT, 4);
            h.muxer.handle_guest_packet(&rw, Op::Rw, data);
            let mut got = [0u8; 4];
            stream.read_exact(&mut got).unwrap();
            assert_eq!(&got, data);
        }
        // Host → guest.
        b.write_all(b"back").unwrap();
        h.poll_until(|m| m.has_pending_rx());
        let mut buf = [0u8; 64];
        let pkt = h.muxer.next_rx(&mut buf).unwrap();
        assert_eq!(
            (pkt.op, pkt.src_port, pkt.dst_port, pkt.len),
            (Op::Rw as u16, FORWARDED_PORT, 5001, 4)
        );
        assert_eq!(&buf[..4], b"back");

        // The guest's RST ends one; the other lives on.
        h.muxer
            .handle_guest_packet(&from_guest(Op::Rst, 5000, FORWARDED_PORT), Op::Rst, &[]);
        assert_eq!(h.muxer.connection_count(), 1);
        assert_eq!(a.read(&mut buf).unwrap(), 0);
        // The host's close reaches the guest as SHUTDOWN; its RST frees it.
        drop(b);
        h.poll_until(|m| m.has_pending_rx());
        assert_eq!(rx(&mut h.muxer).unwrap().op, Op::Shutdown as u16);
        h.muxer
            .handle_guest_packet(&from_guest(Op::Rst, 5001, FORWARDED_PORT), Op::Rst, &[]);
        assert_eq!(h.muxer.connection_count(), 0);
        assert_eq!(h.muxer.guest_conns, 0);
    }

    #[test]
    fn a_host_that_answers_and_closes_before_the_response_is_heard() {
        let mut h = Host::new();
        let listener = forward_listener(&h);
        let req = from_guest(Op::Request, 5000, FORWARDED_PORT);
        h.muxer.handle_guest_packet(&req, Op::Request, &[]);
        // The host refuses with a reason and hangs up before the RESPONSE
        // has gone out to the guest.
        let (mut stream, _) = listener.accept().unwrap();
        stream.write_all(b"HTTP/1.1 429 x\r\n\r\n").unwrap();
        drop(stream);
        h.poll();
        let mut buf = [0u8; 64];
        let resp = h.muxer.next_rx(&mut buf).unwrap();
        assert_eq!(resp.op, Op::Response as u16);
        let data = h.muxer.next_rx(&mut buf).unwrap();
        assert_eq!(data.op, Op::Rw as u16);
        assert_eq!(&buf[..data.len as usize], b"HTTP/1.1 429 x\r\n\r\n");
        let end = rx(&mut h.muxer).unwrap();
        assert_eq!((end.op, end.flags), (Op::Shutdown as u16, SHUTDOWN_BOTH));
        assert_eq!(rx(&mut h.muxer).unwrap().op, Op::Rst as u16);
        assert_eq!(h.muxer.connection_count(), 0);
    }

    #[test]
    fn guest_connection_to_a_forwarded_port_nobody_serves_is_reset() {
        let mut h = Host::new();
        let req = from_guest(Op::Request, 5000, FORWARDED_PORT);
        h.muxer.handle_guest_packet(&req, Op::Request, &[]);
        let rst = rx(&mut h.muxer).unwrap();
        assert_eq!(
            (rst.op, rst.src_port, rst.dst_port),
            (Op::Rst as u16, FORWARDED_PORT, 5000)
        );
        assert_eq!(h.muxer.connection_count(), 0);
    }

    #[test]
    fn guest_connections_are_bounded_and_leave_room_for_the_host() {
        let mut h = Host::new();
        let listener = forward_listener(&h);
        listener.set_nonblocking(true).unwrap();
        let mut accepted = Vec::new();
        for i in 0..MAX_GUEST_CONNECTIONS as u32 + 5 {
            let req = from_guest(Op::Request, 10_000 + i, FORWARDED_PORT);
            h.muxer.handle_guest_packet(&req, Op::Request, &[]);
            let answer = rx(&mut h.muxer).unwrap();
            let want = if (i as usize) < MAX_GUEST_CONNECTIONS {
                Op::Response
            } else {
                Op::Rst
            };
            assert_eq!(answer.op, want as u16, "connection {i}");
            // Keep the backlog from filling up.
            while let Ok((s, _)) = listener.accept() {
                accepted.push(s);
            }
        }
        assert_eq!(h.muxer.guest_conns, MAX_GUEST_CONNECTIONS);
        // The host can still reach the guest.
        let mut c = h.client();
        c.write_all(b"CONNECT 1024\n").unwrap();
        h.poll_until(|m| m.connection_count() == MAX_GUEST_CONNECTIONS + 1);
    }

    #[test]
    fn forwarded_ports_must_be_below_host_ports() {
        let err = GuestForwards::new(Path::new("/x"), &[LOCAL_PORT_FIRST]).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidInput);
        let ok = GuestForwards::new(Path::new("/run/v.sock"), &[1080]).unwrap();
        assert_eq!(ok.target(1080), Some(PathBuf::from("/run/v.sock_1080")));
        assert_eq!(ok.target(1081), None);
    }

    #[test]
    fn rst_flood_is_bounded() {
        let mut h = Host::new();
        for port in 0..(MAX_QUEUED_RSTS as u32 * 2) {
            h.muxer
                .handle_guest_packet(&from_guest(Op::Rw, port, 1), Op::Rw, &[]);
        }
        assert_eq!(h.muxer.rsts.len(), MAX_QUEUED_RSTS);
    }

    #[test]
    fn packet_with_wrong_guest_port_does_not_touch_connection() {
        let mut h = Host::new();
        let (_c, req) = connect(&mut h);
        let bad = from_guest(Op::Response, 999, req.src_port);
        h.muxer.handle_guest_packet(&bad, Op::Response, &[]);
        assert_eq!(rx(&mut h.muxer).unwrap().op, Op::Rst as u16);
        assert_eq!(h.muxer.connection_count(), 1);
        // A malformed one for the right ports resets it.
        h.muxer
            .handle_malformed(&from_guest(Op::Rw, 1024, req.src_port));
        let rst = rx(&mut h.muxer).unwrap();
        assert_eq!((rst.op, rst.src_port), (Op::Rst as u16, req.src_port));
        assert_eq!(h.muxer.connection_count(), 0);
    }

    #[test]
    fn host_hangup_while_connecting_resets_guest() {
        let mut h = Host::new();
        let (c, req) = connect(&mut h);
        drop(c);
        h.poll_until(|m| m.has_pending_rx());
        let rst = rx(&mut h.muxer).unwrap();
        assert_eq!((rst.op, rst.src_port), (Op::Rst as u16, req.src_port));
        assert_eq!(h.muxer.connection_count(), 0);
        assert!(h.muxer.slots.is_empty());
    }

    #[test]
    fn host_close_sends_shutdown_then_rst_and_frees() {
        let mut h = Host::new();
        let (mut c, req) = connect(&mut h);
        let resp = from_guest(Op::Response, 1024, req.src_port);
        h.muxer.handle_guest_packet(&resp, Op::Response, &[]);
        read_line(&mut c);
        drop(c);
        h.poll_until(|m| m.has_pending_rx());
        let pkt = rx(&mut h.muxer).unwrap();
        assert_eq!((pkt.op, pkt.flags), (Op::Shutdown as u16, SHUTDOWN_BOTH));
        assert_eq!(rx(&mut h.muxer).unwrap().op, Op::Rst as u16);
        assert_eq!(h.muxer.connection_count(), 0);
        assert!(h.muxer.slots.is_empty());
    }

    #[test]
    fn ports_are_unique_and_round_robin() {
        let mut h = Host::new();
        h.muxer.next_port = LOCAL_PORT_FIRST;
        let (_a, ra) = connect(&mut h);
        let mut b = h.client();
        b.write_all(b"CONNECT 1024\n").unwrap();
        h.poll_until(|m| m.connection_count() == 2);
        let rb = rx(&mut h.muxer).unwrap();
        assert_eq!(rb.op, Op::Request as u16);
        assert_ne!(ra.src_port, rb.src_port);
        h.muxer.next_port = LOCAL_PORT_END - 1;
        assert_eq!(h.muxer.alloc_port(), Some(LOCAL_PORT_END - 1));
        // Wraps around, skipping the two ports in use.
        assert_eq!(h.muxer.alloc_port(), Some(LOCAL_PORT_FIRST + 2));
    }

    #[test]
    fn connections_are_served_round_robin() {
        let mut h = Host::new();
        let (mut a, ra) = connect(&mut h);
        let (mut b, rb) = connect_second(&mut h);
        for (c, r) in [(&mut a, &ra), (&mut b, &rb)] {
            let resp = from_guest(Op::Response, 1024, r.src_port);
            h.muxer.handle_guest_packet(&resp, Op::Response, &[]);
            read_line(c);
            c.write_all(&[0u8; 8192]).unwrap();
        }
        h.poll_until(|m| m.rx_order.len() == 2);
        let mut buf = [0u8; 1000];
        let first = h.muxer.next_rx(&mut buf).unwrap().src_port;
        let second = h.muxer.next_rx(&mut buf).unwrap().src_port;
        let third = h.muxer.next_rx(&mut buf).unwrap().src_port;
        assert_ne!(first, second);
        assert_eq!(first, third);
    }

    fn connect_second(h: &mut Host) -> (UnixStream, Header) {
        let mut c = h.client();
        c.write_all(b"CONNECT 1024\n").unwrap();
        h.poll_until(|m| m.connection_count() == 2);
        let req = rx(&mut h.muxer).unwrap();
        assert_eq!(req.op, Op::Request as u16);
        (c, req)
    }

    #[test]
    fn drop_connections_closes_host_streams() {
        let mut h = Host::new();
        let (mut c, _req) = connect(&mut h);
        h.muxer
            .handle_guest_packet(&from_guest(Op::Request, 1, 2), Op::Request, &[]);
        h.muxer.drop_connections();
        assert_eq!(h.muxer.connection_count(), 0);
        assert!(!h.muxer.has_pending_rx());
        let mut b = [0u8; 1];
        assert_eq!(c.read(&mut b).unwrap(), 0);
        // The listener still works.
        let (_c2, _) = connect(&mut h);
    }
}

//! What the fuzz targets share: guest memory and split queues laid out from
//! raw fuzz bytes, a persistent vsock muxer with an optional established
//! connection, and differential frame decoding.

use std::cell::RefCell;
use std::future::Future;
use std::io::Write;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::pin::Pin;
use std::task::{Context, Poll};

use airlock::vmm::devices::virtio::device::GuestMemory;
use airlock::vmm::devices::virtio::vsock::fuzzing::{GuestForwards, HOST_CID, Header, Muxer, Op};
use airlock_protocol::{Decoder, Frame, FrameError, FrameReader};
use tokio::io::{AsyncRead, ReadBuf};
use virtio_queue::{Queue, QueueState};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::epoll::{EpollEvent, EventSet};

/// Guest memory of every virtio target: small, so that descriptors the
/// fuzzer writes land in it often.
pub const MEM_SIZE: usize = 0x1_0000;
pub const GUEST_CID: u64 = 3;
/// Four bytes of the fuzz input equal to this are replaced by the host port
/// of the established connection (which the muxer picks at random), so the
/// fuzzer can address it.
pub const PORT_TOKEN: [u8; 4] = *b"PORT";

pub fn memory() -> GuestMemory {
    GuestMemory::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).expect("guest memory")
}

/// Zeroes guest memory, then writes `image` from address 0 (cut at the end
/// of memory).
pub fn load_memory(mem: &GuestMemory, image: &[u8]) {
    static ZERO: [u8; MEM_SIZE] = [0; MEM_SIZE];
    mem.write_slice(&ZERO, GuestAddress(0))
        .expect("zero memory");
    let n = image.len().min(MEM_SIZE);
    mem.write_slice(&image[..n], GuestAddress(0))
        .expect("load memory");
}

/// Where the rings of one split queue of `size` live.
#[derive(Debug, Clone, Copy)]
pub struct Rings {
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
    /// First byte after the used ring (16-aligned).
    pub end: u64,
}

/// Lays out `count` queues of `size` back to back from `base`, with the
/// alignments virtio requires: many small inputs then cover every ring.
pub fn layout(size: u16, base: u64, count: usize) -> Vec<Rings> {
    let n = u64::from(size);
    let mut at = base;
    (0..count)
        .map(|_| {
            let desc = at;
            let avail = desc + 16 * n;
            let used = (avail + 6 + 2 * n).next_multiple_of(4);
            let end = (used + 6 + 8 * n).next_multiple_of(16);
            at = end;
            Rings {
                desc,
                avail,
                used,
                end,
            }
        })
        .collect()
}

/// A queue as the transport hands it to a device: `Queue::try_from` is what
/// a snapshot restore uses, and devices only get queues that are valid in
/// guest memory. `start` is both ring positions (0 after a fresh activation,
/// the used index after a restore).
pub fn queue(
    mem: &GuestMemory,
    max_size: u16,
    size: u16,
    rings: Rings,
    start: u16,
    event_idx: bool,
) -> Option<Queue> {
    let state = QueueState {
        max_size,
        next_avail: start,
        next_used: start,
        event_idx_enabled: event_idx,
        size,
        ready: true,
        desc_table: rings.desc,
        avail_ring: rings.avail,
        used_ring: rings.used,
    };
    let q = Queue::try_from(state).ok()?;
    use virtio_queue::QueueT;
    q.is_valid(mem).then_some(q)
}

/// A queue size from one fuzz byte: a power of two up to 256.
pub fn queue_size(byte: u8) -> u16 {
    1 << (byte % 9)
}

/// Replaces every `PORT_TOKEN` in `bytes` by `port`.
pub fn patch_port(bytes: &mut [u8], port: u32) {
    let mut i = 0;
    while i + 4 <= bytes.len() {
        if bytes[i..i + 4] == PORT_TOKEN {
            bytes[i..i + 4].copy_from_slice(&port.to_le_bytes());
            i += 4;
        } else {
            i += 1;
        }
    }
}

/// One muxer for the whole fuzzing process (binding a socket and making an
/// epoll instance per input would dominate the run time); each input starts
/// from `Host::reset`, which leaves it without connections or owed packets.
pub struct Host {
    _dir: tempfile::TempDir,
    path: PathBuf,
    pub muxer: Muxer,
    events: Vec<EpollEvent>,
    _forwarded: UnixListener,
}

impl Host {
    pub fn new() -> Host {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("vsock.sock");
        let listener = UnixListener::bind(&path).expect("bind");
        // Guest connections to port 1080 reach a listener that never
        // accepts: the guest-initiated path is fuzzed up to a full backlog.
        let forwarded = UnixListener::bind(dir.path().join("vsock.sock_1080")).expect("bind");
        let forwards = GuestForwards::new(&path, &[1080]).expect("forwards");
        let muxer = Muxer::new(GUEST_CID, listener, forwards).expect("muxer");
        Host {
            _dir: dir,
            path,
            muxer,
            events: vec![EpollEvent::default(); 16],
            _forwarded: forwarded,
        }
    }

    /// Forgets every connection and owed packet, and whatever events their
    /// streams left.
    pub fn reset(&mut self) {
        self.muxer.drop_connections();
        self.poll(0);
    }

    /// Dispatches ready host-socket events, waiting at most `timeout_ms` for
    /// the first; returns how many there were.
    pub fn poll(&mut self, timeout_ms: i32) -> usize {
        let n = self.muxer.wait(timeout_ms, &mut self.events).unwrap_or(0);
        for i in 0..n {
            let ev = self.events[i];
            self.muxer
                .handle_event(ev.data(), EventSet::from_bits_truncate(ev.events()));
        }
        n
    }

    /// A host process connects to guest port 1024 and the guest accepts.
    /// Returns the host stream and the connection's host port, or `None`
    /// if the handshake did not complete (the harness then skips the
    /// connection: it is not what is being fuzzed).
    pub fn establish(&mut self, host_bytes: usize) -> Option<(UnixStream, u32)> {
        let mut c = UnixStream::connect(&self.path).ok()?;
        c.write_all(b"CONNECT 1024\n").ok()?;
        for _ in 0..20 {
            if self.muxer.has_pending_rx() {
                break;
            }
            self.poll(1000);
        }
        let req = self.muxer.next_rx(&mut [0u8; 16])?;
        if req.op != Op::Request as u16 {
            return None;
        }
        let port = req.src_port;
        let resp = Header {
            src_cid: GUEST_CID,
            dst_cid: HOST_CID,
            src_port: 1024,
            dst_port: port,
            len: 0,
            type_: 1,
            op: Op::Response as u16,
            flags: 0,
            buf_alloc: 256 * 1024,
            fwd_cnt: 0,
        };
        self.muxer.handle_guest_packet(&resp, Op::Response, &[]);
        if host_bytes > 0 {
            c.write_all(&vec![0x42; host_bytes]).ok()?;
            for _ in 0..20 {
                if self.muxer.has_pending_rx() {
                    break;
                }
                self.poll(1000);
            }
        }
        Some((c, port))
    }
}

impl Default for Host {
    fn default() -> Self {
        Host::new()
    }
}

thread_local! {
    static RUNTIME: tokio::runtime::Runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    static HOST: RefCell<Option<Host>> = const { RefCell::new(None) };
}

/// Runs `f` with the process's muxer, reset for this input.
pub fn with_host<R>(f: impl FnOnce(&mut Host) -> R) -> R {
    HOST.with(|h| {
        let mut h = h.borrow_mut();
        let host = h.get_or_insert_with(Host::new);
        host.reset();
        f(host)
    })
}

pub fn block_on<F: Future>(f: F) -> F::Output {
    RUNTIME.with(|rt| rt.block_on(f))
}

/// What decoding produced, comparable across decoders: a frame, or an
/// error (by its message, which names its cause).
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    Frame(Frame),
    Error(String),
}

impl Outcome {
    fn of(r: Result<Frame, FrameError>) -> Outcome {
        match r {
            Ok(f) => Outcome::Frame(f),
            Err(e) => Outcome::Error(e.to_string()),
        }
    }
}

/// At most this many frames are decoded from one input.
const MAX_FRAMES: usize = 256;

/// Decodes `bytes` with a decoder fed all at once: the frames and
/// recoverable errors, then the error that stopped it, if any. `truncated`
/// says whether a partial frame was left.
pub fn decode_whole(bytes: &[u8]) -> (Vec<Outcome>, bool) {
    let mut d = Decoder::new();
    d.feed(bytes);
    let mut out = Vec::new();
    for _ in 0..MAX_FRAMES {
        match d.decode() {
            Ok(Some(f)) => out.push(Outcome::Frame(f)),
            Ok(None) => {
                if let Some(m) = d.missing() {
                    assert!(m > 0, "decoder waits for a frame that is complete");
                }
                return (out, d.buffered() > 0);
            }
            Err(e) => {
                let stop = !e.is_recoverable();
                out.push(Outcome::Error(e.to_string()));
                if stop {
                    return (out, false);
                }
            }
        }
    }
    (out, false)
}

/// The same with `bytes` fed in chunks of the given sizes (cycled),
/// decoding after each: must give what `decode_whole` gives.
pub fn decode_chunked(bytes: &[u8], sizes: &[usize]) -> Vec<Outcome> {
    let mut d = Decoder::new();
    let mut out = Vec::new();
    let mut rest = bytes;
    let mut sizes = sizes.iter().copied().cycle();
    loop {
        let n = sizes.next().unwrap_or(1).max(1).min(rest.len());
        let (chunk, tail) = rest.split_at(n);
        rest = tail;
        d.feed(chunk);
        loop {
            if out.len() >= MAX_FRAMES {
                return out;
            }
            match d.decode() {
                Ok(Some(f)) => out.push(Outcome::Frame(f)),
                Ok(None) => break,
                Err(e) => {
                    let stop = !e.is_recoverable();
                    out.push(Outcome::Error(e.to_string()));
                    if stop {
                        return out;
                    }
                }
            }
        }
        if rest.is_empty() {
            return out;
        }
    }
}

/// An `AsyncRead` that hands out `data` in chunks of the given sizes, as a
/// socket might.
pub struct Chunked<'a> {
    data: &'a [u8],
    sizes: &'a [usize],
    next: usize,
}

impl<'a> Chunked<'a> {
    pub fn new(data: &'a [u8], sizes: &'a [usize]) -> Chunked<'a> {
        Chunked {
            data,
            sizes,
            next: 0,
        }
    }
}

impl AsyncRead for Chunked<'_> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let size = if self.sizes.is_empty() {
            usize::MAX
        } else {
            self.sizes[self.next % self.sizes.len()].max(1)
        };
        self.next += 1;
        let n = size.min(self.data.len()).min(buf.remaining());
        let (chunk, rest) = self.data.split_at(n);
        buf.put_slice(chunk);
        self.data = rest;
        Poll::Ready(Ok(()))
    }
}

/// Frames through `FrameReader` (as both the host's reader task and the
/// agent read them), `prefix` being bytes already read (the host's CONNECT
/// reply leftover). Ends at the first error or a clean end of stream; a
/// truncated frame is an error here.
pub fn decode_reader(prefix: &[u8], data: &[u8], sizes: &[usize]) -> Vec<Outcome> {
    block_on(async {
        let mut r = FrameReader::with_buffered(Chunked::new(data, sizes), prefix);
        let mut out = Vec::new();
        for _ in 0..MAX_FRAMES {
            match r.read_frame().await {
                Ok(Some(f)) => out.push(Outcome::Frame(f)),
                Ok(None) => break,
                Err(e) => {
                    let stop = !e.is_recoverable();
                    out.push(Outcome::of(Err(e)));
                    if stop {
                        break;
                    }
                }
            }
        }
        out
    })
}

/// Checks the three decoders agree on `bytes`, and that every frame
/// decoded survives an encode/decode round trip. Returns the frames.
pub fn decode_all_ways(bytes: &[u8], split: usize, sizes: &[usize]) -> Vec<Frame> {
    let (whole, truncated) = decode_whole(bytes);
    let chunked = decode_chunked(bytes, sizes);
    assert_eq!(whole, chunked, "chunked decoding differs");
    let split = split.min(bytes.len());
    let mut read = decode_reader(&bytes[..split], &bytes[split..], sizes);
    // The reader reports a partial frame at the end of the stream, which a
    // decoder just keeps waiting on.
    if truncated && whole.len() < MAX_FRAMES {
        match read.pop() {
            Some(Outcome::Error(e)) => assert!(e.contains("closed in the middle"), "{e}"),
            other => panic!("reader did not report truncation: {other:?}"),
        }
    }
    assert_eq!(whole, read, "FrameReader decoding differs");
    let frames: Vec<Frame> = whole
        .into_iter()
        .filter_map(|o| match o {
            Outcome::Frame(f) => Some(f),
            Outcome::Error(_) => None,
        })
        .collect();
    for f in &frames {
        round_trip(f);
    }
    frames
}

/// A decoded frame encodes (it came in within the limits) and decodes back
/// to itself.
pub fn round_trip(f: &Frame) {
    let bytes = match f.encode() {
        Ok(b) => b,
        // The JSON header may grow on re-encoding (escapes): only a header
        // past the limit may fail.
        Err(FrameError::HeaderTooLarge { .. }) => return,
        Err(e) => panic!("decoded frame does not encode: {e}"),
    };
    let mut d = Decoder::new();
    d.feed(&bytes);
    let back = d.decode().expect("re-decode").expect("a whole frame");
    assert_eq!(&back, f, "frame changed in a round trip");
    assert_eq!(d.buffered(), 0);
}

/// Cheap little-endian reads from a fuzz input.
pub struct Input<'a>(pub &'a [u8]);

impl<'a> Input<'a> {
    pub fn u8(&mut self) -> u8 {
        match self.0.split_first() {
            Some((b, rest)) => {
                self.0 = rest;
                *b
            }
            None => 0,
        }
    }

    pub fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.u8(), self.u8()])
    }

    pub fn bytes(&mut self, n: usize) -> &'a [u8] {
        let n = n.min(self.0.len());
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        a
    }

    pub fn rest(self) -> &'a [u8] {
        self.0
    }
}

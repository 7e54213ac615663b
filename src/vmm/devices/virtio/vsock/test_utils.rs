//! Test helpers: a guest driver that writes well-formed or hostile chains
//! into mock split queues, canary checks on guest memory, and a host side
//! (socket path + muxer) to connect to.

use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::time::Duration;

use virtio_queue::Queue;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::epoll::{EpollEvent, EventSet};

use super::muxer::{GuestForwards, Muxer};
use super::packet::{HDR_SIZE, HOST_CID, Header, Op, TYPE_STREAM};
use crate::vmm::devices::virtio::device::GuestMemory;

pub const GUEST_CID: u64 = 3;
/// The host port `Host` forwards guest connections for.
pub const FORWARDED_PORT: u32 = 1080;
pub const MEM_SIZE: u64 = 0x10_0000;
pub const QUEUE_SIZE: u16 = 256;
/// Queue rings live below BUF_BASE; guest buffers above it.
pub const RX_BASE: u64 = 0x0;
pub const TX_BASE: u64 = 0x4000;
pub const EVT_BASE: u64 = 0x8000;
pub const BUF_BASE: u64 = 0x1_0000;
pub const CANARY: u8 = 0xA5;

pub const F_NEXT: u16 = 1;
pub const F_WRITE: u16 = 2;
pub const F_INDIRECT: u16 = 4;

pub fn memory() -> GuestMemory {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]).unwrap()
}

/// Fills the buffer area with the canary.
pub fn fill_canary(mem: &GuestMemory) {
    let fill = vec![CANARY; (MEM_SIZE - BUF_BASE) as usize];
    mem.write_slice(&fill, GuestAddress(BUF_BASE)).unwrap();
}

/// Asserts the buffer area still holds the canary outside `allowed`
/// (start, len) ranges.
pub fn assert_canary(mem: &GuestMemory, allowed: &[(u64, u64)]) {
    let mut area = vec![0u8; (MEM_SIZE - BUF_BASE) as usize];
    mem.read_slice(&mut area, GuestAddress(BUF_BASE)).unwrap();
    for (i, b) in area.iter().enumerate() {
        let addr = BUF_BASE + i as u64;
        if allowed
            .iter()
            .any(|&(start, len)| addr >= start && addr < start + len)
        {
            continue;
        }
        assert_eq!(*b, CANARY, "guest memory at {addr:#x} was overwritten");
    }
}

/// A descriptor exactly as the guest writes it (`next` is an absolute
/// table index).
#[derive(Clone, Copy, Debug)]
pub struct Desc {
    pub addr: u64,
    pub len: u32,
    pub flags: u16,
    pub next: u16,
}

/// The driver side of one split queue.
pub struct GuestQueue<'a> {
    mem: &'a GuestMemory,
    vq: MockSplitQueue<'a, GuestMemory>,
    next_desc: u16,
}

impl<'a> GuestQueue<'a> {
    pub fn new(mem: &'a GuestMemory, base: u64) -> Self {
        let vq = MockSplitQueue::create(mem, GuestAddress(base), QUEUE_SIZE);
        assert!(vq.end().0 < base + 0x4000);
        GuestQueue {
            mem,
            vq,
            next_desc: 0,
        }
    }

    pub fn queue(&self) -> Queue {
        self.vq.create_queue().unwrap()
    }

    /// The device's view with VIRTIO_RING_F_EVENT_IDX negotiated.
    pub fn queue_with_event_idx(&self) -> Queue {
        use virtio_queue::QueueT;
        let mut q = self.queue();
        q.set_event_idx(true);
        q
    }

    /// `avail_event`, which the device writes after the used ring.
    pub fn avail_event(&self) -> u16 {
        let at = self.vq.used_addr().0 + 4 + 8 * u64::from(QUEUE_SIZE);
        self.mem.read_obj(GuestAddress(at)).unwrap()
    }

    pub fn set_avail_event(&self, value: u16) {
        let at = self.vq.used_addr().0 + 4 + 8 * u64::from(QUEUE_SIZE);
        self.mem.write_obj(value, GuestAddress(at)).unwrap();
    }

    /// Writes `used_event`, after the available ring: any value, as a
    /// hostile or confused driver might.
    pub fn set_used_event(&self, value: u16) {
        let at = self.vq.avail_addr().0 + 4 + 2 * u64::from(QUEUE_SIZE);
        self.mem.write_obj(value, GuestAddress(at)).unwrap();
    }

    /// One chain over `bufs` (addr, len, device-writable), linked in order.
    pub fn push(&mut self, bufs: &[(u64, u32, bool)]) -> u16 {
        let base = self.next_desc;
        let descs: Vec<Desc> = bufs
            .iter()
            .enumerate()
            .map(|(i, &(addr, len, write))| {
                let last = i + 1 == bufs.len();
                let flags = if write { F_WRITE } else { 0 } | if last { 0 } else { F_NEXT };
                let next = if last {
                    0
                } else {
                    (base + i as u16 + 1) % QUEUE_SIZE
                };
                Desc {
                    addr,
                    len,
                    flags,
                    next,
                }
            })
            .collect();
        self.push_raw(&descs, 0)
    }

    /// Writes `descs` at the next free table slots as given and publishes
    /// slot `head` of them. Returns the index of the first slot, so tests
    /// can craft `next` values: see `next_index`.
    pub fn push_raw(&mut self, descs: &[Desc], head: u16) -> u16 {
        let base = self.next_desc;
        for (i, d) in descs.iter().enumerate() {
            let idx = (base + i as u16) % QUEUE_SIZE;
            let addr = self.vq.desc_table_addr().0 + 16 * u64::from(idx);
            let desc = Descriptor::new(d.addr, d.len, d.flags, d.next);
            self.mem.write_obj(desc, GuestAddress(addr)).unwrap();
        }
        self.next_desc = (base + descs.len() as u16) % QUEUE_SIZE;
        self.publish((base + head) % QUEUE_SIZE);
        base
    }

    pub fn next_index(&self) -> u16 {
        self.next_desc
    }

    /// Puts any head index, valid or not, into the available ring.
    pub fn publish(&mut self, head: u16) {
        let avail = self.vq.avail_addr().0;
        let idx: u16 = self.mem.read_obj(GuestAddress(avail + 2)).unwrap();
        let slot = avail + 4 + 2 * u64::from(idx % QUEUE_SIZE);
        self.mem.write_obj(head, GuestAddress(slot)).unwrap();
        self.mem
            .write_obj(idx.wrapping_add(1), GuestAddress(avail + 2))
            .unwrap();
    }

    /// Overwrites the available index (to fake a wild driver).
    pub fn set_avail_idx(&mut self, idx: u16) {
        let avail = self.vq.avail_addr().0;
        self.mem.write_obj(idx, GuestAddress(avail + 2)).unwrap();
    }

    pub fn used_idx(&self) -> u16 {
        self.mem
            .read_obj(GuestAddress(self.vq.used_addr().0 + 2))
            .unwrap()
    }

    /// Used ring entry `i`: (head index, length).
    pub fn used(&self, i: u16) -> (u32, u32) {
        let at = self.vq.used_addr().0 + 4 + 8 * u64::from(i % QUEUE_SIZE);
        let id: u32 = self.mem.read_obj(GuestAddress(at)).unwrap();
        let len: u32 = self.mem.read_obj(GuestAddress(at + 4)).unwrap();
        (id, len)
    }
}

/// A guest→host header.
pub fn guest_hdr(op: Op, src_port: u32, dst_port: u32, len: u32) -> Header {
    Header {
        src_cid: GUEST_CID,
        dst_cid: HOST_CID,
        src_port,
        dst_port,
        len,
        type_: TYPE_STREAM,
        op: op as u16,
        flags: 0,
        buf_alloc: 256 * 1024,
        fwd_cnt: 0,
    }
}

pub fn write_bytes(mem: &GuestMemory, addr: u64, bytes: &[u8]) {
    mem.write_slice(bytes, GuestAddress(addr)).unwrap();
}

pub fn read_bytes(mem: &GuestMemory, addr: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
    v
}

pub fn read_hdr(mem: &GuestMemory, addr: u64) -> Header {
    let mut raw = [0u8; HDR_SIZE];
    mem.read_slice(&mut raw, GuestAddress(addr)).unwrap();
    Header::from_bytes(&raw)
}

/// A muxer listening on a socket in a fresh temporary directory.
pub struct Host {
    _dir: tempfile::TempDir,
    pub path: PathBuf,
    pub muxer: Muxer,
}

impl Host {
    pub fn new() -> Host {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vsock.sock");
        let forwards = GuestForwards::new(&path, &[FORWARDED_PORT]).unwrap();
        let muxer = Muxer::new(GUEST_CID, UnixListener::bind(&path).unwrap(), forwards).unwrap();
        Host {
            _dir: dir,
            path,
            muxer,
        }
    }

    /// A host client with a read timeout, so a broken test fails instead
    /// of hanging.
    pub fn client(&self) -> UnixStream {
        let s = UnixStream::connect(&self.path).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s
    }

    /// Waits (at most 5 s) for host-socket events and dispatches them.
    pub fn poll(&mut self) -> usize {
        let mut events = vec![EpollEvent::default(); 16];
        let n = self.muxer.wait(5000, &mut events).unwrap();
        for ev in &events[..n] {
            self.muxer
                .handle_event(ev.data(), EventSet::from_bits_truncate(ev.events()));
        }
        n
    }

    /// Polls until `done` holds; each step blocks on real socket events.
    pub fn poll_until(&mut self, mut done: impl FnMut(&Muxer) -> bool) {
        for _ in 0..50 {
            if done(&self.muxer) {
                return;
            }
            assert!(self.poll() > 0, "timed out waiting for host events");
        }
        panic!("condition never reached");
    }
}

/// Hands out guest buffers from BUF_BASE up, with gaps between them so
/// stray writes land on canary bytes.
pub struct Bufs {
    next: u64,
}

impl Bufs {
    pub fn new() -> Bufs {
        Bufs { next: BUF_BASE }
    }

    pub fn alloc(&mut self, len: u64) -> u64 {
        let addr = self.next;
        self.next = (addr + len + 0x100).next_multiple_of(0x100);
        assert!(self.next <= MEM_SIZE);
        addr
    }
}

/// A copy of the whole buffer area, to prove the device wrote nothing.
pub fn snapshot(mem: &GuestMemory) -> Vec<u8> {
    read_bytes(mem, BUF_BASE, (MEM_SIZE - BUF_BASE) as usize)
}

//! A read-only virtio-blk device serving the guest's root filesystem.
//! Requests are served on the vCPU thread that kicked the queue: reads hit
//! the host page cache, which every VM of one image shares.

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::{ByteValued, GuestMemoryMmap};

use super::device::{
    ActivateError, GuestMemory, Interrupt, TYPE_BLOCK, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX,
    VirtioDevice, rearm_notification,
};

pub const SECTOR_SIZE: u64 = 512;
const VIRTIO_BLK_F_RO: u64 = 1 << 5;
/// What the device offers (a template bakes in what its guest accepted).
pub const FEATURES: u64 = VIRTIO_F_VERSION_1 | VIRTIO_BLK_F_RO | VIRTIO_RING_F_EVENT_IDX;
const QUEUE_SIZE: u16 = 256;
/// Larger requests are refused: a bound on the bounce buffer a guest can make us allocate.
pub const MAX_REQUEST_BYTES: usize = 4 << 20;
const ID_BYTES: usize = 20;

const VIRTIO_BLK_T_IN: u32 = 0;
const VIRTIO_BLK_T_OUT: u32 = 1;
const VIRTIO_BLK_T_FLUSH: u32 = 4;
const VIRTIO_BLK_T_GET_ID: u32 = 8;
const VIRTIO_BLK_S_OK: u8 = 0;
const VIRTIO_BLK_S_IOERR: u8 = 1;
const VIRTIO_BLK_S_UNSUPP: u8 = 2;

#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
struct RequestHeader {
    request_type: u32,
    reserved: u32,
    sector: u64,
}

// SAFETY: plain integers, no padding, any bit pattern is valid.
unsafe impl ByteValued for RequestHeader {}

#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    #[error("cannot open the disk image {path}: {source}")]
    Open {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the disk image {0} is not a whole number of 512-byte sectors")]
    NotSectorAligned(String),
}

struct Active {
    mem: GuestMemory,
    queue: Queue,
    interrupt: Arc<Interrupt>,
}

pub struct Block {
    disk: File,
    disk_bytes: u64,
    id: [u8; ID_BYTES],
    config: [u8; 8],
    active: Option<Active>,
}

impl Block {
    pub fn open(path: &Path) -> Result<Block, BlockError> {
        let shown = path.display().to_string();
        let disk = File::open(path).map_err(|source| BlockError::Open {
            path: shown.clone(),
            source,
        })?;
        let disk_bytes = disk
            .metadata()
            .map_err(|source| BlockError::Open {
                path: shown.clone(),
                source,
            })?
            .len();
        if disk_bytes % SECTOR_SIZE != 0 {
            return Err(BlockError::NotSectorAligned(shown));
        }
        let mut id = [0u8; ID_BYTES];
        let name = b"airlock-rootfs";
        id[..name.len()].copy_from_slice(name);
        Ok(Block {
            disk,
            disk_bytes,
            id,
            config: (disk_bytes / SECTOR_SIZE).to_le_bytes(),
            active: None,
        })
    }

    /// Serves every available request; returns how many were completed.
    pub fn process_queue(&mut self) -> usize {
        let Some(active) = self.active.as_mut() else {
            return 0;
        };
        let mut done = 0;
        // A guest refilling the ring from another vCPU cannot keep us here
        // forever; one that does stalls only its own disk.
        for _ in 0..usize::from(QUEUE_SIZE) * 2 {
            let Some(chain) = active.queue.pop_descriptor_chain(&active.mem) else {
                if rearm_notification(&mut active.queue, &active.mem) {
                    continue;
                }
                break;
            };
            let head = chain.head_index();
            let used = serve(&self.disk, self.disk_bytes, &self.id, &active.mem, chain);
            if let Err(err) = active.queue.add_used(&active.mem, head, used) {
                crate::guest_warn!(%err, "virtio-blk: cannot return a used buffer");
                break;
            }
            done += 1;
        }
        if done > 0 && active.queue.needs_notification(&active.mem).unwrap_or(true) {
            active.interrupt.signal_used_queue();
        }
        done
    }
}

/// Serves one request; returns the number of bytes written to the guest.
fn serve(
    disk: &File,
    disk_bytes: u64,
    id: &[u8; ID_BYTES],
    mem: &GuestMemory,
    chain: DescriptorChain<&GuestMemoryMmap<()>>,
) -> u32 {
    let header = chain
        .clone()
        .reader(mem)
        .ok()
        .and_then(|mut r| r.read_obj::<RequestHeader>().ok());
    let Ok(mut data) = chain.writer(mem) else {
        crate::guest_warn!("virtio-blk: request with unusable writable buffers");
        return 0;
    };
    let writable = data.available_bytes();
    if writable == 0 {
        crate::guest_warn!("virtio-blk: request without a status byte");
        return 0;
    }
    let Ok(mut status_writer) = data.split_at(writable - 1) else {
        return 0;
    };
    let (status, written) = match header {
        None => (VIRTIO_BLK_S_IOERR, 0),
        Some(h) => match h.request_type {
            VIRTIO_BLK_T_IN => read_sectors(disk, disk_bytes, h.sector, &mut data),
            VIRTIO_BLK_T_GET_ID => {
                let n = data.available_bytes().min(ID_BYTES);
                match data.write_all(&id[..n]) {
                    Ok(()) => (VIRTIO_BLK_S_OK, n),
                    Err(_) => (VIRTIO_BLK_S_IOERR, 0),
                }
            }
            VIRTIO_BLK_T_FLUSH => (VIRTIO_BLK_S_OK, 0),
            VIRTIO_BLK_T_OUT => (VIRTIO_BLK_S_IOERR, 0), // read-only disk
            _ => (VIRTIO_BLK_S_UNSUPP, 0),
        },
    };
    if status_writer.write_all(&[status]).is_err() {
        return 0;
    }
    (written + 1) as u32
}

fn read_sectors(
    disk: &File,
    disk_bytes: u64,
    sector: u64,
    data: &mut virtio_queue::Writer<'_>,
) -> (u8, usize) {
    let len = data.available_bytes();
    let in_bounds = sector
        .checked_mul(SECTOR_SIZE)
        .and_then(|start| start.checked_add(len as u64).map(|end| (start, end)))
        .filter(|(_, end)| *end <= disk_bytes);
    let Some((start, _)) = in_bounds else {
        crate::guest_warn!(sector, len, "virtio-blk: read beyond the end of the disk");
        return (VIRTIO_BLK_S_IOERR, 0);
    };
    if len > MAX_REQUEST_BYTES {
        crate::guest_warn!(len, "virtio-blk: request larger than the limit");
        return (VIRTIO_BLK_S_IOERR, 0);
    }
    let mut buf = vec![0u8; len];
    if let Err(err) = disk.read_exact_at(&mut buf, start) {
        crate::guest_warn!(%err, "virtio-blk: host read failed");
        return (VIRTIO_BLK_S_IOERR, 0);
    }
    match data.write_all(&buf) {
        Ok(()) => (VIRTIO_BLK_S_OK, len),
        Err(_) => (VIRTIO_BLK_S_IOERR, 0),
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        TYPE_BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        FEATURES
    }

    fn ack_features(&mut self, _features: u64) {}

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        copy_config(&self.config, offset, data);
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}

    fn activate(
        &mut self,
        mem: GuestMemory,
        queues: Vec<Queue>,
        interrupt: Arc<Interrupt>,
    ) -> Result<(), ActivateError> {
        let queue = queues
            .into_iter()
            .next()
            .ok_or(ActivateError::BadQueue(0))?;
        self.active = Some(Active {
            mem,
            queue,
            interrupt,
        });
        Ok(())
    }

    fn queue_notify(&mut self, _queue: u16) {
        self.process_queue();
    }

    fn reset(&mut self) {
        self.active = None;
    }
}

/// Copies the part of `config` at `offset` into `data`; the rest reads as zero.
pub fn copy_config(config: &[u8], offset: u64, data: &mut [u8]) {
    data.fill(0);
    let Ok(start) = usize::try_from(offset) else {
        return;
    };
    if let Some(src) = config.get(start..) {
        let n = src.len().min(data.len());
        data[..n].copy_from_slice(&src[..n]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_queue::desc::{RawDescriptor, split::Descriptor as SplitDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Address, Bytes, GuestAddress};
    use vmm_sys_util::eventfd::EventFd;

    const F_NEXT: u16 = 1;
    const F_WRITE: u16 = 2;
    const MEM_BYTES: usize = 0x10_0000;

    fn disk(bytes: usize) -> tempfile::NamedTempFile {
        let file = tempfile::NamedTempFile::new().unwrap();
        let content: Vec<u8> = (0..bytes).map(|i| (i % 251) as u8).collect();
        std::fs::write(file.path(), content).unwrap();
        file
    }

    /// One queue with the given chain; returns the device, memory and queue.
    fn run(
        descs: &[(u64, u32, u16)],
        header: Option<(u32, u64)>,
        disk_bytes: usize,
    ) -> (GuestMemory, u32) {
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), MEM_BYTES)]).unwrap();
        // Canary everywhere, so writes outside the buffers show.
        mem.write_slice(&vec![0xcc; MEM_BYTES], GuestAddress(0))
            .unwrap();
        let mock = MockSplitQueue::new(&mem, 16);
        let raw: Vec<RawDescriptor> = descs
            .iter()
            .enumerate()
            .map(|(i, (addr, len, flags))| {
                RawDescriptor::from(SplitDescriptor::new(*addr, *len, *flags, (i + 1) as u16))
            })
            .collect();
        mock.build_desc_chain(&raw).unwrap();
        if let Some((t, sector)) = header {
            let h = RequestHeader {
                request_type: t,
                reserved: 0,
                sector,
            };
            mem.write_obj(h, GuestAddress(descs[0].0)).unwrap();
        }
        let queue: Queue = mock.create_queue().unwrap();
        let file = disk(disk_bytes);
        let mut blk = Block::open(file.path()).unwrap();
        let irq = Interrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap());
        blk.activate(mem.clone(), vec![queue], irq).unwrap();
        let done = blk.process_queue();
        assert!(done <= 1);
        let used_len: u32 = mem
            .read_obj(mock.used_addr().checked_add(8).unwrap())
            .unwrap_or(0);
        (mem, used_len)
    }

    fn canary_intact(mem: &GuestMemory, from: u64, to: u64) -> bool {
        let mut buf = vec![0u8; (to - from) as usize];
        mem.read_slice(&mut buf, GuestAddress(from)).unwrap();
        buf.iter().all(|b| *b == 0xcc)
    }

    const HDR: u64 = 0x8_0000;
    const DATA: u64 = 0x8_1000;
    const STATUS: u64 = 0x8_3000;

    #[test]
    fn reads_sectors_into_guest_buffers() {
        let (mem, used) = run(
            &[
                (HDR, 16, F_NEXT),
                (DATA, 1024, F_NEXT | F_WRITE),
                (STATUS, 1, F_WRITE),
            ],
            Some((VIRTIO_BLK_T_IN, 1)),
            4096,
        );
        assert_eq!(used, 1025);
        let mut data = [0u8; 1024];
        mem.read_slice(&mut data, GuestAddress(DATA)).unwrap();
        assert!(
            data.iter()
                .enumerate()
                .all(|(i, b)| *b == ((512 + i) % 251) as u8)
        );
        assert_eq!(
            mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap(),
            VIRTIO_BLK_S_OK
        );
        assert!(canary_intact(&mem, DATA + 1024, STATUS));
        assert!(canary_intact(&mem, STATUS + 1, STATUS + 0x100));
    }

    #[test]
    fn read_past_the_end_is_an_io_error_and_writes_nothing() {
        let (mem, used) = run(
            &[
                (HDR, 16, F_NEXT),
                (DATA, 1024, F_NEXT | F_WRITE),
                (STATUS, 1, F_WRITE),
            ],
            Some((VIRTIO_BLK_T_IN, 7)),
            4096,
        );
        assert_eq!(used, 1);
        assert_eq!(
            mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap(),
            VIRTIO_BLK_S_IOERR
        );
        assert!(canary_intact(&mem, DATA, DATA + 1024));
        // A sector number that overflows when turned into bytes.
        let (mem, _) = run(
            &[
                (HDR, 16, F_NEXT),
                (DATA, 512, F_NEXT | F_WRITE),
                (STATUS, 1, F_WRITE),
            ],
            Some((VIRTIO_BLK_T_IN, u64::MAX / 2)),
            4096,
        );
        assert_eq!(
            mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap(),
            VIRTIO_BLK_S_IOERR
        );
    }

    #[test]
    fn writes_are_refused_on_a_read_only_disk() {
        let (mem, used) = run(
            &[(HDR, 16, F_NEXT), (DATA, 512, F_NEXT), (STATUS, 1, F_WRITE)],
            Some((VIRTIO_BLK_T_OUT, 0)),
            4096,
        );
        assert_eq!(used, 1);
        assert_eq!(
            mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap(),
            VIRTIO_BLK_S_IOERR
        );
    }

    #[test]
    fn hostile_chains_do_not_escape_their_buffers() {
        // Data buffer outside guest memory.
        let (mem, used) = run(
            &[
                (HDR, 16, F_NEXT),
                (MEM_BYTES as u64 + 0x1000, 512, F_NEXT | F_WRITE),
                (STATUS, 1, F_WRITE),
            ],
            Some((VIRTIO_BLK_T_IN, 0)),
            4096,
        );
        assert_eq!(used, 0);
        assert!(canary_intact(&mem, STATUS, STATUS + 1));
        // Oversized length straddling the end of memory.
        let (_, used) = run(
            &[
                (HDR, 16, F_NEXT),
                (DATA, u32::MAX, F_NEXT | F_WRITE),
                (STATUS, 1, F_WRITE),
            ],
            Some((VIRTIO_BLK_T_IN, 0)),
            4096,
        );
        assert_eq!(used, 0);
        // No status byte at all.
        let (mem, used) = run(&[(HDR, 16, 0)], Some((VIRTIO_BLK_T_IN, 0)), 4096);
        assert_eq!(used, 0);
        assert!(canary_intact(&mem, DATA, STATUS + 0x100));
        // Short header: the status says I/O error.
        let (mem, used) = run(&[(HDR, 8, F_NEXT), (STATUS, 1, F_WRITE)], None, 4096);
        assert_eq!(used, 1);
        assert_eq!(
            mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap(),
            VIRTIO_BLK_S_IOERR
        );
        // Zero-length data buffer, and buffers that overlap the header.
        let (mem, used) = run(
            &[
                (HDR, 16, F_NEXT),
                (DATA, 0, F_NEXT | F_WRITE),
                (STATUS, 1, F_WRITE),
            ],
            Some((VIRTIO_BLK_T_IN, 0)),
            4096,
        );
        assert_eq!(used, 1);
        assert_eq!(
            mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap(),
            VIRTIO_BLK_S_OK
        );
        let (_, used) = run(
            &[
                (HDR, 16, F_NEXT),
                (HDR, 512, F_NEXT | F_WRITE),
                (HDR + 4, 1, F_WRITE),
            ],
            Some((VIRTIO_BLK_T_IN, 0)),
            4096,
        );
        assert_eq!(used, 513);
        // A request larger than the bounce-buffer limit.
        let (mem, used) = run(
            &[
                (HDR, 16, F_NEXT),
                (
                    0x1000,
                    (MAX_REQUEST_BYTES + 512) as u32 / 2,
                    F_NEXT | F_WRITE,
                ),
                (0x1000 + 0x40_0000, 0x20_0000, F_NEXT | F_WRITE),
                (STATUS, 1, F_WRITE),
            ],
            Some((VIRTIO_BLK_T_IN, 0)),
            8 << 20,
        );
        assert!(used <= 1);
        let _ = mem;
    }

    #[test]
    fn a_descriptor_loop_ends() {
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), MEM_BYTES)]).unwrap();
        let mock = MockSplitQueue::new(&mem, 16);
        // Two descriptors pointing at each other, forever.
        let raw = [
            RawDescriptor::from(SplitDescriptor::new(HDR, 16, F_NEXT, 1)),
            RawDescriptor::from(SplitDescriptor::new(DATA, 512, F_NEXT | F_WRITE, 0)),
        ];
        mock.add_desc_chains(&raw, 0).unwrap();
        let queue: Queue = mock.create_queue().unwrap();
        let file = disk(4096);
        let mut blk = Block::open(file.path()).unwrap();
        let irq = Interrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap());
        blk.activate(mem.clone(), vec![queue], irq).unwrap();
        assert!(blk.process_queue() <= 2);
    }

    #[test]
    fn config_reads_are_bounded() {
        let mut out = [0xffu8; 4];
        copy_config(&[1, 2, 3], 1, &mut out);
        assert_eq!(out, [2, 3, 0, 0]);
        copy_config(&[1, 2, 3], u64::MAX, &mut out);
        assert_eq!(out, [0; 4]);
    }
}

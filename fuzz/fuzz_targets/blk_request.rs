//! virtio-blk requests from a hostile guest: the fuzz input is guest memory
//! (descriptor table, rings, request headers and buffers) of the block
//! device's one queue, served by `Block::process_queue` from a small disk.
//!
//! Input: `size | flags | start (u16 LE) | guest memory image...`
//! flags: 1 = VIRTIO_F_EVENT_IDX.
#![no_main]

use std::os::unix::fs::FileExt;
use std::sync::Arc;

use airlock::vmm::devices::virtio::blk::Block;
use airlock::vmm::devices::virtio::device::{GuestMemory, Interrupt, VirtioDevice};
use airlock_fuzz::{Input, layout, load_memory, memory, queue, queue_size};
use libfuzzer_sys::fuzz_target;
use vmm_sys_util::eventfd::EventFd;

/// 16 sectors.
const DISK_BYTES: usize = 8192;

struct Fixture {
    disk: tempfile::NamedTempFile,
    content: [u8; DISK_BYTES],
    blk: Block,
    mem: GuestMemory,
    interrupt: Arc<Interrupt>,
}

thread_local! {
    static FIXTURE: std::cell::RefCell<Fixture> = std::cell::RefCell::new({
        let disk = tempfile::NamedTempFile::new().unwrap();
        let content: [u8; DISK_BYTES] = std::array::from_fn(|i| (i % 251) as u8);
        std::fs::write(disk.path(), content).unwrap();
        Fixture {
            blk: Block::open(disk.path()).unwrap(),
            disk,
            content,
            mem: memory(),
            interrupt: Interrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap()),
        }
    });
}

fuzz_target!(|data: &[u8]| {
    let mut input = Input(data);
    let size = queue_size(input.u8());
    let flags = input.u8();
    let start = input.u16();
    let image = input.rest();
    FIXTURE.with(|f| {
        let f = &mut *f.borrow_mut();
        load_memory(&f.mem, image);
        let rings = layout(size, 0, 1)[0];
        // The transport activates only queues valid in guest memory.
        let Some(q) = queue(&f.mem, 256, size, rings, start, flags & 1 != 0) else {
            return;
        };
        f.blk
            .activate(f.mem.clone(), vec![q], f.interrupt.clone())
            .unwrap();
        let done = f.blk.process_queue();
        assert!(done <= 512, "{done} requests served in one pass");
        // The used ring is not checked here: a guest may point its buffers
        // at it, and the disk data then lands on its own used entries. What
        // holds whatever the guest does: the disk is never written.
        let mut now = [0u8; DISK_BYTES];
        f.disk.as_file().read_exact_at(&mut now, 0).unwrap();
        assert!(now == f.content, "the read-only disk was written");
        f.blk.reset();
        let _ = f.interrupt.irqfd().read();
    });
});

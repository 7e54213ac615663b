//! Descriptor chains from a hostile guest through the vsock device's three
//! queues, as the device thread pumps them: TX (guest packets into the
//! muxer), the event queue (a transport reset), then RX (packets to the
//! guest). The fuzz input is guest memory: descriptor tables, rings and
//! buffers; a few leading bytes pick the queue size, ring positions and
//! whether a host connection is established first.
//!
//! Input: `size | flags | start (u16 LE) | guest memory image...`
//! flags: 1 = establish a connection (its host port replaces every "PORT"
//! in the image), 2 = the host has sent data on it, 4 = a transport reset
//! is pending, 8 = VIRTIO_F_EVENT_IDX.
#![no_main]

use std::io::Read;

use airlock::vmm::devices::virtio::device::{GuestMemory, Interrupt};
use airlock::vmm::devices::virtio::vsock::fuzzing::{
    HeldTx, MAX_PAYLOAD, notify_guest, process_event, process_rx, process_tx,
};
use airlock_fuzz::{Input, layout, load_memory, memory, patch_port, queue, queue_size, with_host};
use libfuzzer_sys::fuzz_target;
use vmm_sys_util::eventfd::EventFd;

struct Fixture {
    mem: GuestMemory,
    interrupt: std::sync::Arc<Interrupt>,
    scratch: Vec<u8>,
}

thread_local! {
    static FIXTURE: std::cell::RefCell<Fixture> = std::cell::RefCell::new(Fixture {
        mem: memory(),
        interrupt: Interrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap()),
        scratch: vec![0; MAX_PAYLOAD],
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
        with_host(|host| {
            let mut conn = None;
            let mut image = image.to_vec();
            if flags & 1 != 0 {
                let host_bytes = if flags & 2 != 0 { 3000 } else { 0 };
                if let Some((c, port)) = host.establish(host_bytes) {
                    patch_port(&mut image, port);
                    conn = Some(c);
                }
            }
            load_memory(&f.mem, &image);
            // In virtio order: rx, tx, event; laid out tx first, as the
            // fuzzer writes the start of memory most.
            let r = layout(size, 0, 3);
            let (tx_rings, rx_rings, ev_rings) = (r[0], r[1], r[2]);
            let event_idx = flags & 8 != 0;
            // The device is only activated with queues valid in memory.
            let (Some(mut rxq), Some(mut txq), Some(mut evq)) = (
                queue(&f.mem, 256, size, rx_rings, start, event_idx),
                queue(&f.mem, 256, size, tx_rings, start, event_idx),
                queue(&f.mem, 256, size, ev_rings, start, event_idx),
            ) else {
                return;
            };
            let mut pending = flags & 4 != 0;
            let mut held = HeldTx::default();
            // The worker's pump, a bounded number of rounds.
            for _ in 0..4 {
                let tx = process_tx(&mut host.muxer, &f.mem, &mut txq, &mut f.scratch, &mut held);
                assert!(held.len() < HeldTx::limit(size), "held TX chains stay bounded");
                if tx.used {
                    notify_guest(&mut txq, &f.mem, &f.interrupt);
                }
                let ev = process_event(&mut pending, &f.mem, &mut evq, &mut None);
                if ev.used {
                    notify_guest(&mut evq, &f.mem, &f.interrupt);
                }
                // Host streams react to what the guest sent (credit, data,
                // shutdown): their events come before the next RX pass.
                host.poll(0);
                let rx = process_rx(&mut host.muxer, &f.mem, &mut rxq, &mut f.scratch);
                if rx.used {
                    // Held chains ride along with the interrupt.
                    let mut back = Default::default();
                    held.give_back(&mut txq, &f.mem, &mut back);
                    notify_guest(&mut txq, &f.mem, &f.interrupt);
                    notify_guest(&mut rxq, &f.mem, &f.interrupt);
                }
                if !(tx.more || rx.more || ev.more) {
                    break;
                }
            }
            if let Some(mut c) = conn {
                // Whatever reached the host side is readable, never more
                // than the guest could have sent.
                c.set_nonblocking(true).unwrap();
                let mut buf = [0u8; 4096];
                let _ = c.read(&mut buf);
            }
        });
        let _ = f.interrupt.irqfd().read();
    });
});

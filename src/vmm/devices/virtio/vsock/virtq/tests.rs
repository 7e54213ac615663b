use std::io::{Read, Write};
use std::os::unix::net::UnixStream;

use virtio_queue::desc::split::Descriptor;
use vm_memory::{Bytes, GuestAddress};

use super::*;
use crate::vmm::devices::virtio::vsock::packet::{
    HOST_CID, MAX_PAYLOAD, SHUTDOWN_BOTH, TYPE_STREAM,
};
use crate::vmm::devices::virtio::vsock::test_utils::*;

fn tx(h: &mut Host, mem: &GuestMemory, q: &mut Queue) -> Pass {
    let mut held = HeldTx::default();
    let pass = process_tx(&mut h.muxer, mem, q, &mut vec![0; MAX_PAYLOAD], &mut held);
    assert!(held.is_empty(), "nothing is held without EVENT_IDX");
    pass
}

fn rx(h: &mut Host, mem: &GuestMemory, q: &mut Queue) -> Pass {
    process_rx(&mut h.muxer, mem, q, &mut vec![0; MAX_PAYLOAD])
}

/// Host connects to guest port 1024 and the guest accepts (through the
/// muxer directly). Returns the client and the host port.
fn established(h: &mut Host) -> (UnixStream, u32) {
    let mut c = h.client();
    c.write_all(b"CONNECT 1024\n").unwrap();
    h.poll_until(|m| m.has_pending_rx());
    let req = h.muxer.next_rx(&mut [0u8; 16]).unwrap();
    assert_eq!(req.op, Op::Request as u16);
    let port = req.src_port;
    h.muxer
        .handle_guest_packet(&guest_hdr(Op::Response, 1024, port, 0), Op::Response, &[]);
    let expected = format!("OK {port}\n");
    let mut line = vec![0u8; expected.len()];
    c.read_exact(&mut line).unwrap();
    assert_eq!(line, expected.as_bytes());
    (c, port)
}

/// The muxer's next packet must be an RST for `port`, after which the
/// connection is gone and the host sees EOF.
fn assert_reset(h: &mut Host, c: &mut UnixStream, port: u32) {
    let rst = h.muxer.next_rx(&mut [0u8; 16]).unwrap();
    assert_eq!(
        (rst.op, rst.src_port, rst.dst_port),
        (Op::Rst as u16, port, 1024)
    );
    assert_eq!(h.muxer.connection_count(), 0);
    assert!(!h.muxer.has_pending_rx());
    let mut b = [0u8; 16];
    assert_eq!(c.read(&mut b).unwrap(), 0);
}

/// Exactly one chain went to the used ring, with length 0.
fn assert_used_once_empty(gq: &GuestQueue, head: u16) {
    assert_eq!(gq.used_idx(), 1);
    assert_eq!(gq.used(0), (u32::from(head), 0));
}

#[test]
fn tx_header_split_across_descriptors_works() {
    let mem = memory();
    fill_canary(&mem);
    let mut h = Host::new();
    let (mut c, port) = established(&mut h);
    let (mut gq, mut bufs) = (GuestQueue::new(&mem, TX_BASE), Bufs::new());
    let mut q = gq.queue();
    let hdr = guest_hdr(Op::Rw, 1024, port, 5).to_bytes();
    let (a, b, p) = (bufs.alloc(10), bufs.alloc(34), bufs.alloc(5));
    write_bytes(&mem, a, &hdr[..10]);
    write_bytes(&mem, b, &hdr[10..]);
    write_bytes(&mem, p, b"hello");
    let head = gq.push(&[(a, 10, false), (b, 34, false), (p, 5, false)]);
    let before = snapshot(&mem);

    let pass = tx(&mut h, &mem, &mut q);
    assert_eq!(
        pass,
        Pass {
            used: true,
            more: false
        }
    );
    assert_used_once_empty(&gq, head);
    let mut got = [0u8; 5];
    c.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"hello");
    assert_eq!(snapshot(&mem), before, "TX must not write guest buffers");
}

#[test]
fn tx_short_or_empty_chains_are_dropped() {
    let mem = memory();
    let mut h = Host::new();
    let (_c, port) = established(&mut h);
    let (mut gq, mut bufs) = (GuestQueue::new(&mem, TX_BASE), Bufs::new());
    let mut q = gq.queue();
    let a = bufs.alloc(43);
    write_bytes(&mem, a, &guest_hdr(Op::Rst, 1024, port, 0).to_bytes()[..43]);
    gq.push(&[(a, 43, false)]);
    gq.push(&[(a, 0, false), (a, 0, false), (a, 0, false)]);
    // Header bytes only in a device-writable descriptor: not readable.
    gq.push(&[(a, 44, true)]);

    tx(&mut h, &mem, &mut q);
    assert_eq!(gq.used_idx(), 3);
    for i in 0..3 {
        assert_eq!(gq.used(i).1, 0);
    }
    assert!(!h.muxer.has_pending_rx());
    assert_eq!(h.muxer.connection_count(), 1);
}

#[test]
fn tx_descriptors_outside_guest_memory_are_dropped() {
    let mem = memory();
    fill_canary(&mem);
    let mut h = Host::new();
    let mut gq = GuestQueue::new(&mem, TX_BASE);
    let mut q = gq.queue();
    for (addr, len) in [
        (MEM_SIZE + 0x1000, 44),
        (MEM_SIZE - 20, 44),
        (u64::MAX - 10, 44),
        (BUF_BASE, u32::MAX),
    ] {
        gq.push(&[(addr, len, false)]);
    }
    // Total length overflowing u32 across descriptors.
    gq.push(&[
        (BUF_BASE, 0x8000_0000, false),
        (BUF_BASE, 0x8000_0000, false),
    ]);
    let before = snapshot(&mem);

    tx(&mut h, &mem, &mut q);
    assert_eq!(gq.used_idx(), 5);
    for i in 0..5 {
        assert_eq!(gq.used(i).1, 0);
    }
    assert!(!h.muxer.has_pending_rx());
    assert_eq!(snapshot(&mem), before);
}

#[test]
fn tx_indirect_tables_are_bounded() {
    let mem = memory();
    let mut h = Host::new();
    let (mut gq, mut bufs) = (GuestQueue::new(&mem, TX_BASE), Bufs::new());
    let mut q = gq.queue();
    // A table outside memory, one whose size is not whole descriptors,
    // and one that nests another indirect table.
    let nested = bufs.alloc(16);
    let inner = Descriptor::new(nested, 16, F_INDIRECT, 0);
    mem.write_obj(inner, GuestAddress(nested)).unwrap();
    for (addr, len) in [(MEM_SIZE + 0x1000, 16), (nested, 15), (nested, 16)] {
        gq.push_raw(
            &[Desc {
                addr,
                len,
                flags: F_INDIRECT,
                next: 0,
            }],
            0,
        );
    }
    tx(&mut h, &mem, &mut q);
    assert_eq!(gq.used_idx(), 3);
    assert!(!h.muxer.has_pending_rx());
}

#[test]
fn tx_len_larger_than_chain_resets_connection() {
    let mem = memory();
    let mut h = Host::new();
    let (mut c, port) = established(&mut h);
    let (mut gq, mut bufs) = (GuestQueue::new(&mem, TX_BASE), Bufs::new());
    let mut q = gq.queue();
    let a = bufs.alloc(54);
    write_bytes(&mem, a, &guest_hdr(Op::Rw, 1024, port, 100).to_bytes());
    let head = gq.push(&[(a, 54, false)]);

    tx(&mut h, &mem, &mut q);
    assert_used_once_empty(&gq, head);
    assert_reset(&mut h, &mut c, port);
}

#[test]
fn tx_oversized_len_field_resets_connection() {
    let mem = memory();
    let mut h = Host::new();
    let (mut c, port) = established(&mut h);
    let (mut gq, mut bufs) = (GuestQueue::new(&mem, TX_BASE), Bufs::new());
    let mut q = gq.queue();
    let a = bufs.alloc(0x2_0000);
    write_bytes(&mem, a, &guest_hdr(Op::Rw, 1024, port, u32::MAX).to_bytes());
    gq.push(&[(a, 0x2_0000, false)]);

    tx(&mut h, &mem, &mut q);
    assert_eq!(gq.used(0).1, 0);
    assert_reset(&mut h, &mut c, port);
}

#[test]
fn tx_bad_header_fields_reset_connection() {
    type Mutation = (&'static str, fn(&mut Header));
    let mutations: [Mutation; 6] = [
        ("type", |h| h.type_ = 2),
        ("src_cid", |h| h.src_cid = 99),
        ("dst_cid", |h| h.dst_cid = 7),
        ("op 0", |h| h.op = 0),
        ("op 42", |h| h.op = 42),
        ("control with payload", |h| {
            h.op = Op::Shutdown as u16;
            h.len = 4;
        }),
    ];
    for (what, mutate) in mutations {
        let mem = memory();
        let mut h = Host::new();
        let (mut c, port) = established(&mut h);
        let (mut gq, mut bufs) = (GuestQueue::new(&mem, TX_BASE), Bufs::new());
        let mut q = gq.queue();
        let mut hdr = guest_hdr(Op::Rw, 1024, port, 0);
        mutate(&mut hdr);
        let a = bufs.alloc(64);
        write_bytes(&mem, a, &hdr.to_bytes());
        gq.push(&[(a, 64, false)]);
        tx(&mut h, &mem, &mut q);
        assert_eq!(gq.used(0).1, 0, "{what}");
        assert_reset(&mut h, &mut c, port);
    }
}

#[test]
fn tx_descriptor_loops_are_bounded() {
    let mem = memory();
    let mut h = Host::new();
    let (mut gq, mut bufs) = (GuestQueue::new(&mem, TX_BASE), Bufs::new());
    let mut q = gq.queue();
    // A self-loop holding a REQUEST (refused with an RST), then a
    // two-descriptor loop with the header split across it.
    let a = bufs.alloc(44);
    write_bytes(&mem, a, &guest_hdr(Op::Request, 5, 80, 0).to_bytes());
    let i = gq.next_index();
    gq.push_raw(
        &[Desc {
            addr: a,
            len: 44,
            flags: F_NEXT,
            next: i,
        }],
        0,
    );
    let i = gq.next_index();
    gq.push_raw(
        &[
            Desc {
                addr: a,
                len: 20,
                flags: F_NEXT,
                next: i + 1,
            },
            Desc {
                addr: a + 20,
                len: 24,
                flags: F_NEXT,
                next: i,
            },
        ],
        0,
    );

    let pass = tx(&mut h, &mem, &mut q);
    assert!(pass.used && !pass.more);
    assert_eq!(gq.used_idx(), 2);
    for _ in 0..2 {
        let rst = h.muxer.next_rx(&mut [0u8; 16]).unwrap();
        assert_eq!(
            (rst.op, rst.src_port, rst.dst_port),
            (Op::Rst as u16, 80, 5)
        );
    }
    assert!(!h.muxer.has_pending_rx());
}

#[test]
fn tx_overlapping_descriptors_are_read_as_given() {
    let mem = memory();
    let mut h = Host::new();
    let (mut c, port) = established(&mut h);
    let (mut gq, mut bufs) = (GuestQueue::new(&mem, TX_BASE), Bufs::new());
    let mut q = gq.queue();
    // The payload descriptor is the header itself.
    let a = bufs.alloc(44);
    let hdr = guest_hdr(Op::Rw, 1024, port, 44).to_bytes();
    write_bytes(&mem, a, &hdr);
    gq.push(&[(a, 44, false), (a, 44, false)]);
    tx(&mut h, &mem, &mut q);
    let mut got = [0u8; 44];
    c.read_exact(&mut got).unwrap();
    assert_eq!(got, hdr);
    assert_eq!(h.muxer.connection_count(), 1);
}

#[test]
fn tx_wild_avail_index_and_head_do_no_harm() {
    let mem = memory();
    let mut h = Host::new();
    let (mut gq, mut bufs) = (GuestQueue::new(&mem, TX_BASE), Bufs::new());
    let mut q = gq.queue();
    gq.set_avail_idx(1000);
    assert_eq!(tx(&mut h, &mem, &mut q), Pass::default());

    let mut gq = GuestQueue::new(&mem, TX_BASE);
    let mut q = gq.queue();
    gq.publish(QUEUE_SIZE + 44); // not a descriptor index
    let a = bufs.alloc(44);
    write_bytes(&mem, a, &guest_hdr(Op::Request, 5, 80, 0).to_bytes());
    let head = gq.push(&[(a, 44, false)]);
    tx(&mut h, &mem, &mut q);
    // The bogus head cannot be returned; the good one still is.
    assert_eq!(gq.used_idx(), 1);
    assert_eq!(gq.used(0), (u32::from(head), 0));
    assert_eq!(h.muxer.next_rx(&mut [0u8; 16]).unwrap().op, Op::Rst as u16);
}

#[test]
fn tx_work_per_pass_is_capped() {
    let mem = memory();
    let mut h = Host::new();
    let (mut gq, mut bufs) = (GuestQueue::new(&mem, TX_BASE), Bufs::new());
    let mut q = gq.queue();
    let a = bufs.alloc(44);
    write_bytes(&mem, a, &guest_hdr(Op::Rst, 5, 80, 0).to_bytes());
    for _ in 0..100 {
        gq.push(&[(a, 44, false)]);
    }
    assert_eq!(
        tx(&mut h, &mem, &mut q),
        Pass {
            used: true,
            more: true
        }
    );
    assert_eq!(gq.used_idx(), CHAINS_PER_PASS as u16);
    assert_eq!(
        tx(&mut h, &mem, &mut q),
        Pass {
            used: true,
            more: false
        }
    );
    assert_eq!(gq.used_idx(), 100);
}

#[test]
fn rx_bad_chains_are_returned_empty_and_packet_kept() {
    let mem = memory();
    fill_canary(&mem);
    let mut h = Host::new();
    h.muxer
        .handle_guest_packet(&guest_hdr(Op::Request, 5, 80, 0), Op::Request, &[]);
    let (mut gq, mut bufs) = (GuestQueue::new(&mem, RX_BASE), Bufs::new());
    let mut q = gq.queue();
    let (small, ro, good) = (bufs.alloc(43), bufs.alloc(4096), bufs.alloc(4096));
    gq.push(&[(MEM_SIZE + 0x1000, 4096, true)]);
    gq.push(&[(MEM_SIZE - 20, 4096, true)]);
    gq.push(&[(ro, 4096, false)]);
    gq.push(&[(small, 43, true)]);
    gq.push(&[(good, 0, true)]);
    let head = gq.push(&[(good, 4096, true)]);

    let pass = rx(&mut h, &mem, &mut q);
    assert!(pass.used && !pass.more);
    assert_eq!(gq.used_idx(), 6);
    for i in 0..5 {
        assert_eq!(gq.used(i).1, 0);
    }
    assert_eq!(gq.used(5), (u32::from(head), 44));
    let rst = read_hdr(&mem, good);
    assert_eq!(rst, Header::rst(GUEST_CID, 80, 5));
    assert_canary(&mem, &[(good, 44)]);
}

#[test]
fn rx_header_split_and_payload_bounded_by_chain() {
    let mem = memory();
    fill_canary(&mem);
    let mut h = Host::new();
    let (mut c, port) = established(&mut h);
    c.write_all(&[0x42; 10_000]).unwrap();
    h.poll_until(|m| m.has_pending_rx());
    let (mut gq, mut bufs) = (GuestQueue::new(&mem, RX_BASE), Bufs::new());
    let mut q = gq.queue();
    let (a, b, p) = (bufs.alloc(10), bufs.alloc(34), bufs.alloc(100));
    let head = gq.push(&[(a, 10, true), (b, 34, true), (p, 100, true)]);

    rx(&mut h, &mem, &mut q);
    assert_eq!(gq.used(0), (u32::from(head), 144));
    let mut raw = read_bytes(&mem, a, 10);
    raw.extend(read_bytes(&mem, b, 34));
    let hdr = Header::from_bytes(&raw.try_into().unwrap());
    assert_eq!(
        (hdr.op, hdr.len, hdr.src_port, hdr.dst_port),
        (Op::Rw as u16, 100, port, 1024)
    );
    assert_eq!(
        (hdr.src_cid, hdr.dst_cid, hdr.type_),
        (HOST_CID, GUEST_CID, TYPE_STREAM)
    );
    assert_eq!(read_bytes(&mem, p, 100), vec![0x42; 100]);
    assert_canary(&mem, &[(a, 10), (b, 34), (p, 100)]);
}

#[test]
fn rx_looping_and_overlapping_descriptors_stay_in_bounds() {
    let mem = memory();
    fill_canary(&mem);
    let mut h = Host::new();
    for port in [80, 81] {
        h.muxer
            .handle_guest_packet(&guest_hdr(Op::Request, 5, port, 0), Op::Request, &[]);
    }
    let (mut gq, mut bufs) = (GuestQueue::new(&mem, RX_BASE), Bufs::new());
    let mut q = gq.queue();
    let (x, y) = (bufs.alloc(8), bufs.alloc(40));
    let i = gq.next_index();
    gq.push_raw(
        &[Desc {
            addr: x,
            len: 8,
            flags: F_WRITE | F_NEXT,
            next: i,
        }],
        0,
    );
    gq.push(&[(y, 30, true), (y + 10, 30, true)]);

    rx(&mut h, &mem, &mut q);
    assert_eq!(gq.used_idx(), 2);
    // Both had room for a header (as far as the chain walk could see).
    assert_eq!(gq.used(0).1, 44);
    assert_eq!(gq.used(1).1, 44);
    assert_canary(&mem, &[(x, 8), (y, 40)]);
}

#[test]
fn rx_without_buffers_keeps_packets() {
    let mem = memory();
    let mut h = Host::new();
    h.muxer
        .handle_guest_packet(&guest_hdr(Op::Request, 5, 80, 0), Op::Request, &[]);
    let (mut gq, mut bufs) = (GuestQueue::new(&mem, RX_BASE), Bufs::new());
    let mut q = gq.queue();
    assert_eq!(rx(&mut h, &mem, &mut q), Pass::default());
    assert!(h.muxer.has_pending_rx());
    let a = bufs.alloc(64);
    gq.push(&[(a, 64, true)]);
    assert!(rx(&mut h, &mem, &mut q).used);
    assert_eq!(read_hdr(&mem, a).op, Op::Rst as u16);
    assert!(!h.muxer.has_pending_rx());
}

#[test]
fn rx_chain_is_given_back_when_nothing_comes_of_it() {
    let mem = memory();
    let mut h = Host::new();
    // A connection that queues a REQUEST, then vanishes before sending
    // it, leaves a stale entry behind.
    let mut c = h.client();
    c.write_all(b"CONNECT 1024\n").unwrap();
    h.poll_until(|m| m.connection_count() == 1);
    drop(c);
    h.poll_until(|m| m.connection_count() == 0);
    assert!(h.muxer.has_pending_rx());

    let (mut gq, mut bufs) = (GuestQueue::new(&mem, RX_BASE), Bufs::new());
    let mut q = gq.queue();
    let a = bufs.alloc(64);
    let head = gq.push(&[(a, 64, true)]);
    assert_eq!(rx(&mut h, &mem, &mut q), Pass::default());
    assert_eq!(gq.used_idx(), 0);
    assert!(!h.muxer.has_pending_rx());

    // The same chain carries the next packet.
    h.muxer
        .handle_guest_packet(&guest_hdr(Op::Request, 5, 80, 0), Op::Request, &[]);
    rx(&mut h, &mem, &mut q);
    assert_eq!(gq.used(0), (u32::from(head), 44));
}

#[test]
fn event_queue_gets_transport_reset() {
    let mem = memory();
    fill_canary(&mem);
    let (mut gq, mut bufs) = (GuestQueue::new(&mem, EVT_BASE), Bufs::new());
    let mut q = gq.queue();
    let (small, ro, good) = (bufs.alloc(2), bufs.alloc(4), bufs.alloc(4));
    gq.push(&[(small, 2, true)]);
    gq.push(&[(ro, 4, false)]);
    let head = gq.push(&[(good, 4, true)]);
    gq.push(&[(bufs.alloc(4), 4, true)]);

    let mut pending = false;
    assert_eq!(
        process_event(&mut pending, &mem, &mut q, &mut None),
        Pass::default()
    );
    pending = true;
    let pass = process_event(&mut pending, &mem, &mut q, &mut None);
    assert!(pass.used && !pending);
    assert_eq!(gq.used_idx(), 3);
    assert_eq!((gq.used(0).1, gq.used(1).1), (0, 0));
    assert_eq!(gq.used(2), (u32::from(head), 4));
    assert_eq!(
        read_bytes(&mem, good, 4),
        EVENT_TRANSPORT_RESET.to_le_bytes()
    );
    assert_canary(&mem, &[(good, 4)]);
}

/// The muxer end to end through real queues: a host client connects,
/// the test plays the guest, bytes flow both ways, the guest closes.
#[test]
fn end_to_end_through_queues() {
    let mem = memory();
    fill_canary(&mem);
    let mut h = Host::new();
    let (mut rxg, mut txg) = (
        GuestQueue::new(&mem, RX_BASE),
        GuestQueue::new(&mem, TX_BASE),
    );
    let (mut rxq, mut txq) = (rxg.queue(), txg.queue());
    let mut bufs = Bufs::new();
    // Guest memory that may change: RX buffers, and what the test wrote.
    let mut allowed = Vec::new();
    let rx_buf = |rxg: &mut GuestQueue, bufs: &mut Bufs, allowed: &mut Vec<_>| {
        let a = bufs.alloc(4096);
        rxg.push(&[(a, 4096, true)]);
        allowed.push((a, 4096));
        a
    };
    let tx_buf = |bufs: &mut Bufs, bytes: &[u8], allowed: &mut Vec<_>| {
        let a = bufs.alloc(bytes.len() as u64);
        write_bytes(&mem, a, bytes);
        allowed.push((a, bytes.len() as u64));
        a
    };

    let mut c = h.client();
    c.write_all(b"CONNECT 1024\n").unwrap();
    h.poll_until(|m| m.has_pending_rx());
    let a = rx_buf(&mut rxg, &mut bufs, &mut allowed);
    assert!(rx(&mut h, &mem, &mut rxq).used);
    let req = read_hdr(&mem, a);
    assert_eq!(
        (req.op, req.src_cid, req.dst_cid),
        (Op::Request as u16, HOST_CID, GUEST_CID)
    );
    assert_eq!(req.dst_port, 1024);
    let port = req.src_port;

    // The guest accepts.
    let resp = guest_hdr(Op::Response, 1024, port, 0).to_bytes();
    let t = tx_buf(&mut bufs, &resp, &mut allowed);
    txg.push(&[(t, 44, false)]);
    tx(&mut h, &mem, &mut txq);
    let expected = format!("OK {port}\n");
    let mut line = vec![0u8; expected.len()];
    c.read_exact(&mut line).unwrap();
    assert_eq!(line, expected.as_bytes());

    // Host → guest.
    c.write_all(b"from host").unwrap();
    h.poll_until(|m| m.has_pending_rx());
    let a = rx_buf(&mut rxg, &mut bufs, &mut allowed);
    rx(&mut h, &mem, &mut rxq);
    let pkt = read_hdr(&mem, a);
    assert_eq!((pkt.op, pkt.len), (Op::Rw as u16, 9));
    assert_eq!(read_bytes(&mem, a + 44, 9), b"from host");

    // Guest → host, header and payload in separate descriptors.
    let rw = guest_hdr(Op::Rw, 1024, port, 10).to_bytes();
    let t = tx_buf(&mut bufs, &rw, &mut allowed);
    let p = tx_buf(&mut bufs, b"from guest", &mut allowed);
    txg.push(&[(t, 44, false), (p, 10, false)]);
    tx(&mut h, &mem, &mut txq);
    let mut got = [0u8; 10];
    c.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"from guest");

    // The guest closes; the device answers with an RST and frees it.
    let mut shut = guest_hdr(Op::Shutdown, 1024, port, 0);
    shut.flags = SHUTDOWN_BOTH;
    let t = tx_buf(&mut bufs, &shut.to_bytes(), &mut allowed);
    txg.push(&[(t, 44, false)]);
    tx(&mut h, &mem, &mut txq);
    let a = rx_buf(&mut rxg, &mut bufs, &mut allowed);
    rx(&mut h, &mem, &mut rxq);
    assert_eq!(read_hdr(&mem, a).op, Op::Rst as u16);
    assert_eq!(h.muxer.connection_count(), 0);
    assert_eq!(c.read(&mut got).unwrap(), 0);
    assert_eq!((rxg.used_idx(), txg.used_idx()), (3, 3));

    assert_canary(&mem, &allowed);
}

#[test]
fn event_idx_tx_chains_are_held_until_a_quarter_of_the_ring() {
    let mem = memory();
    let mut h = Host::new();
    let (mut gq, mut bufs) = (GuestQueue::new(&mem, TX_BASE), Bufs::new());
    let mut q = gq.queue_with_event_idx();
    let mut held = HeldTx::default();
    let limit = HeldTx::limit(QUEUE_SIZE);
    assert_eq!(limit, 64);
    // Short chains are dropped, but their slots are held all the same.
    let chain = bufs.alloc(8);
    for _ in 0..limit - 1 {
        gq.push(&[(chain, 8, false)]);
    }
    let mut scratch = vec![0; MAX_PAYLOAD];
    let pass = process_tx(&mut h.muxer, &mem, &mut q, &mut scratch, &mut held);
    assert!(!pass.used && !pass.more);
    assert_eq!((held.len(), gq.used_idx()), (limit - 1, 0));
    assert_eq!(gq.avail_event(), 63, "caught up: the next packet notifies");
    gq.push(&[(chain, 8, false)]);
    let pass = process_tx(&mut h.muxer, &mem, &mut q, &mut scratch, &mut held);
    assert!(pass.used, "the limit gives them all back");
    assert_eq!((held.len(), gq.used_idx()), (0, 64));
    assert_eq!(gq.avail_event(), 64);
    // Without EVENT_IDX nothing is held.
    let mem = memory();
    let mut gq = GuestQueue::new(&mem, TX_BASE);
    let mut q = gq.queue();
    gq.push(&[(chain, 8, false)]);
    process_tx(&mut h.muxer, &mem, &mut q, &mut scratch, &mut held);
    assert_eq!((held.len(), gq.used_idx()), (0, 1));
}

#[test]
fn event_idx_rx_asks_for_buffers_only_when_starved() {
    let mem = memory();
    let mut h = Host::new();
    let (mut gq, mut bufs) = (GuestQueue::new(&mem, RX_BASE), Bufs::new());
    let mut q = gq.queue_with_event_idx();
    gq.set_avail_event(0x1234);
    let _c1 = h.client();
    let mut c2 = h.client();
    c2.write_all(b"CONNECT 7\n").unwrap();
    h.poll_until(|m| m.has_pending_rx());
    // Buffers while there is something to say: refills need no notice.
    let buf = bufs.alloc(4096);
    gq.push(&[(buf, 4096, true)]);
    let pass = rx(&mut h, &mem, &mut q);
    assert!(pass.used);
    assert_eq!(gq.avail_event(), 0x1234, "not starved: left alone");
    // Starved with something to say: the next buffer must notify.
    let mut c3 = h.client();
    c3.write_all(b"CONNECT 8\n").unwrap();
    h.poll_until(|m| m.has_pending_rx());
    let pass = rx(&mut h, &mem, &mut q);
    assert!(!pass.used && !pass.more);
    assert_eq!(gq.avail_event(), 1, "starved at 1: notify on the next");
}

#[test]
fn event_queue_asks_for_every_new_buffer_however_many_are_posted() {
    let mem = memory();
    let (mut gq, mut bufs) = (GuestQueue::new(&mem, EVT_BASE), Bufs::new());
    let mut q = gq.queue_with_event_idx();
    for _ in 0..3 {
        gq.push(&[(bufs.alloc(4), 4, true)]);
    }
    let mut pending = false;
    let pass = process_event(&mut pending, &mem, &mut q, &mut None);
    assert!(!pass.used && !pass.more);
    assert_eq!(gq.avail_event(), 3, "spares posted: notify past them");
    pending = true;
    let pass = process_event(&mut pending, &mem, &mut q, &mut None);
    assert!(pass.used && !pending);
    assert_eq!((gq.used_idx(), gq.avail_event()), (1, 3));
}

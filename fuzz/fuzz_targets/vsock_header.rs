//! The vsock packet header as the guest writes it (`Header::from_bytes`),
//! its checks (`validate_tx`), and the muxer acting on a sequence of such
//! packets: the connection state machine (credit, data, shutdown, reset)
//! with or without an established host connection.
//!
//! Input: `flags | (header (44 bytes) | available/4 (u16 LE) | payload | rx room/16 (u8))*`
//! flags: 1 = establish a connection first (its host port replaces every
//! "PORT" in the input), 2 = the host has sent data on it.
#![no_main]

use std::io::Read;

use airlock::vmm::devices::virtio::vsock::fuzzing::{
    HDR_SIZE, HOST_CID, Header, MAX_PAYLOAD, Op, PacketError,
};
use airlock_fuzz::{GUEST_CID, Input, patch_port, with_host};
use libfuzzer_sys::fuzz_target;

/// What validate_tx promises about a header it accepts.
fn check_accepted(h: &Header, op: Op, available: usize) {
    assert!(h.len as usize <= MAX_PAYLOAD);
    assert!(h.len as usize <= available);
    assert_eq!(h.type_, 1);
    assert_eq!(h.src_cid, GUEST_CID);
    assert_eq!(h.dst_cid, HOST_CID);
    assert_eq!(op as u16, h.op);
    assert!(op == Op::Rw || h.len == 0);
}

fuzz_target!(|data: &[u8]| {
    let mut input = Input(data);
    let flags = input.u8();
    let mut rest = input.rest().to_vec();
    with_host(|host| {
        let mut conn = None;
        if flags & 1 != 0 {
            let host_bytes = if flags & 2 != 0 { 5000 } else { 0 };
            if let Some((c, port)) = host.establish(host_bytes) {
                patch_port(&mut rest, port);
                conn = Some(c);
            }
        }
        let mut input = Input(&rest);
        let mut buf = vec![0u8; 4096];
        for _ in 0..64 {
            let raw = input.bytes(HDR_SIZE);
            let Ok(raw) = <&[u8; HDR_SIZE]>::try_from(raw) else {
                break;
            };
            let hdr = Header::from_bytes(raw);
            assert_eq!(&hdr.to_bytes(), raw, "header does not round-trip");
            // How many chain bytes follow the header; the payload is what
            // there is of them in the input.
            let available = usize::from(input.u16()) * 4;
            match hdr.validate_tx(GUEST_CID, available) {
                Ok(op) => {
                    check_accepted(&hdr, op, available);
                    let payload = input.bytes(hdr.len as usize);
                    if payload.len() < hdr.len as usize {
                        break;
                    }
                    host.muxer.handle_guest_packet(&hdr, op, payload);
                }
                Err(e) => {
                    if let PacketError::TooLong(len) = e {
                        assert!(len as usize > MAX_PAYLOAD);
                    }
                    host.muxer.handle_malformed(&hdr);
                }
            }
            host.poll(0);
            // The guest takes packets with a buffer of varying room.
            let room = (usize::from(input.u8()) * 16).min(buf.len());
            for _ in 0..4 {
                let Some(out) = host.muxer.next_rx(&mut buf[..room]) else {
                    break;
                };
                assert_eq!(out.src_cid, HOST_CID);
                assert_eq!(out.dst_cid, GUEST_CID);
                assert_eq!(out.type_, 1);
                assert!(out.len as usize <= room, "payload beyond the guest's room");
                assert!(Op::from_raw(out.op).is_some());
                assert!(out.op == Op::Rw as u16 || out.len == 0);
            }
        }
        if let Some(mut c) = conn {
            c.set_nonblocking(true).unwrap();
            let _ = c.read(&mut buf);
        }
    });
});

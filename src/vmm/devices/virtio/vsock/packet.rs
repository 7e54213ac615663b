//! The virtio-vsock packet header (virtio 1.2 §5.10.6) and the checks a
//! guest-supplied header must pass before the muxer acts on it.

/// The host's CID; every guest packet we accept is addressed to it.
pub const HOST_CID: u64 = 2;

/// Size of `struct virtio_vsock_hdr` on the wire.
pub const HDR_SIZE: usize = 44;

/// Largest payload we accept from, or send to, the guest in one packet. It
/// matches Linux's VIRTIO_VSOCK_MAX_PKT_BUF_SIZE, so a conforming guest never
/// exceeds it, and it bounds the copy we make of each TX payload.
pub const MAX_PAYLOAD: usize = 64 * 1024;

/// The only socket type this device implements.
pub const TYPE_STREAM: u16 = 1;

/// SHUTDOWN flags: the sender will receive / send no more data.
pub const SHUTDOWN_RCV: u32 = 1;
pub const SHUTDOWN_SEND: u32 = 2;
pub const SHUTDOWN_BOTH: u32 = SHUTDOWN_RCV | SHUTDOWN_SEND;

/// `struct virtio_vsock_event` id telling the driver that every connection
/// is gone (e.g. after a snapshot restore).
pub const EVENT_TRANSPORT_RESET: u32 = 0;

/// Packet operations.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u16)]
pub enum Op {
    Request = 1,
    Response = 2,
    Rst = 3,
    Shutdown = 4,
    Rw = 5,
    CreditUpdate = 6,
    CreditRequest = 7,
}

impl Op {
    pub fn from_raw(op: u16) -> Option<Op> {
        Some(match op {
            1 => Op::Request,
            2 => Op::Response,
            3 => Op::Rst,
            4 => Op::Shutdown,
            5 => Op::Rw,
            6 => Op::CreditUpdate,
            7 => Op::CreditRequest,
            _ => return None,
        })
    }
}

/// A decoded header. Fields are raw: decoding never fails, validation is a
/// separate step so a bad header can still name the connection it targets.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Header {
    pub src_cid: u64,
    pub dst_cid: u64,
    pub src_port: u32,
    pub dst_port: u32,
    pub len: u32,
    pub type_: u16,
    pub op: u16,
    pub flags: u32,
    pub buf_alloc: u32,
    pub fwd_cnt: u32,
}

/// Why a guest packet was dropped.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PacketError {
    #[error("len {0} exceeds the {MAX_PAYLOAD}-byte payload cap")]
    TooLong(u32),
    #[error("len {len} exceeds the {available} bytes left in the chain")]
    Truncated { len: u32, available: usize },
    #[error("unsupported socket type {0}")]
    Type(u16),
    #[error("src_cid {0} is not the guest's CID")]
    SrcCid(u64),
    #[error("dst_cid {0} is not the host's CID")]
    DstCid(u64),
    #[error("unknown op {0}")]
    UnknownOp(u16),
    #[error("{0:?} packet carries a {1}-byte payload")]
    PayloadOnControl(Op, u32),
}

impl Header {
    pub fn from_bytes(b: &[u8; HDR_SIZE]) -> Header {
        Header {
            src_cid: le_u64(b, 0),
            dst_cid: le_u64(b, 8),
            src_port: le_u32(b, 16),
            dst_port: le_u32(b, 20),
            len: le_u32(b, 24),
            type_: le_u16(b, 28),
            op: le_u16(b, 30),
            flags: le_u32(b, 32),
            buf_alloc: le_u32(b, 36),
            fwd_cnt: le_u32(b, 40),
        }
    }

    pub fn to_bytes(self) -> [u8; HDR_SIZE] {
        let mut b = [0u8; HDR_SIZE];
        b[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        b[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        b[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        b[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b[28..30].copy_from_slice(&self.type_.to_le_bytes());
        b[30..32].copy_from_slice(&self.op.to_le_bytes());
        b[32..36].copy_from_slice(&self.flags.to_le_bytes());
        b[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        b[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        b
    }

    /// A host-to-guest RST for a pair of ports no connection owns.
    pub fn rst(guest_cid: u64, host_port: u32, guest_port: u32) -> Header {
        Header {
            src_cid: HOST_CID,
            dst_cid: guest_cid,
            src_port: host_port,
            dst_port: guest_port,
            type_: TYPE_STREAM,
            op: Op::Rst as u16,
            ..Header::default()
        }
    }

    /// Checks a header read from the TX queue. `available` is how many chain
    /// bytes follow the header.
    pub fn validate_tx(&self, guest_cid: u64, available: usize) -> Result<Op, PacketError> {
        if self.len as usize > MAX_PAYLOAD {
            return Err(PacketError::TooLong(self.len));
        }
        if self.len as usize > available {
            return Err(PacketError::Truncated {
                len: self.len,
                available,
            });
        }
        if self.type_ != TYPE_STREAM {
            return Err(PacketError::Type(self.type_));
        }
        if self.src_cid != guest_cid {
            return Err(PacketError::SrcCid(self.src_cid));
        }
        if self.dst_cid != HOST_CID {
            return Err(PacketError::DstCid(self.dst_cid));
        }
        let op = Op::from_raw(self.op).ok_or(PacketError::UnknownOp(self.op))?;
        if op != Op::Rw && self.len != 0 {
            return Err(PacketError::PayloadOnControl(op, self.len));
        }
        Ok(op)
    }
}

fn le_u16(b: &[u8; HDR_SIZE], at: usize) -> u16 {
    let mut v = [0u8; 2];
    v.copy_from_slice(&b[at..at + 2]);
    u16::from_le_bytes(v)
}

fn le_u32(b: &[u8; HDR_SIZE], at: usize) -> u32 {
    let mut v = [0u8; 4];
    v.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(v)
}

fn le_u64(b: &[u8; HDR_SIZE], at: usize) -> u64 {
    let mut v = [0u8; 8];
    v.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    const GUEST: u64 = 3;

    fn valid(op: Op, len: u32) -> Header {
        Header {
            src_cid: GUEST,
            dst_cid: HOST_CID,
            src_port: 1024,
            dst_port: 1 << 30,
            len,
            type_: TYPE_STREAM,
            op: op as u16,
            flags: 0,
            buf_alloc: 4096,
            fwd_cnt: 7,
        }
    }

    #[test]
    fn wire_layout_is_little_endian_and_44_bytes() {
        let h = Header {
            src_cid: 0x0102_0304_0506_0708,
            dst_cid: 2,
            src_port: 0xAABB_CCDD,
            dst_port: 5,
            len: 6,
            type_: 1,
            op: 5,
            flags: 3,
            buf_alloc: 0x1000,
            fwd_cnt: 9,
        };
        let b = h.to_bytes();
        assert_eq!(&b[0..8], &[8, 7, 6, 5, 4, 3, 2, 1]);
        assert_eq!(&b[16..20], &[0xDD, 0xCC, 0xBB, 0xAA]);
        assert_eq!(&b[28..32], &[1, 0, 5, 0]);
        assert_eq!(&b[40..44], &[9, 0, 0, 0]);
        assert_eq!(Header::from_bytes(&b), h);
    }

    #[test]
    fn accepts_well_formed_packets() {
        assert_eq!(valid(Op::Rw, 10).validate_tx(GUEST, 10), Ok(Op::Rw));
        assert_eq!(
            valid(Op::Response, 0).validate_tx(GUEST, 0),
            Ok(Op::Response)
        );
        // Trailing bytes beyond `len` are ignored, not an error.
        assert_eq!(valid(Op::Rw, 1).validate_tx(GUEST, 4096), Ok(Op::Rw));
    }

    #[test]
    fn rejects_each_bad_field() {
        let too_long = MAX_PAYLOAD as u32 + 1;
        assert_eq!(
            valid(Op::Rw, too_long).validate_tx(GUEST, usize::MAX),
            Err(PacketError::TooLong(too_long))
        );
        assert_eq!(
            valid(Op::Rw, u32::MAX).validate_tx(GUEST, usize::MAX),
            Err(PacketError::TooLong(u32::MAX))
        );
        assert_eq!(
            valid(Op::Rw, 11).validate_tx(GUEST, 10),
            Err(PacketError::Truncated {
                len: 11,
                available: 10
            })
        );
        let mut h = valid(Op::Rw, 0);
        h.type_ = 2;
        assert_eq!(h.validate_tx(GUEST, 0), Err(PacketError::Type(2)));
        let mut h = valid(Op::Rw, 0);
        h.src_cid = 4;
        assert_eq!(h.validate_tx(GUEST, 0), Err(PacketError::SrcCid(4)));
        let mut h = valid(Op::Rw, 0);
        h.dst_cid = 1;
        assert_eq!(h.validate_tx(GUEST, 0), Err(PacketError::DstCid(1)));
        for op in [0u16, 8, u16::MAX] {
            let mut h = valid(Op::Rw, 0);
            h.op = op;
            assert_eq!(h.validate_tx(GUEST, 0), Err(PacketError::UnknownOp(op)));
        }
        assert_eq!(
            valid(Op::Shutdown, 4).validate_tx(GUEST, 4),
            Err(PacketError::PayloadOnControl(Op::Shutdown, 4))
        );
    }

    #[test]
    fn op_round_trips() {
        for raw in 1..=7u16 {
            assert_eq!(Op::from_raw(raw).map(|op| op as u16), Some(raw));
        }
    }
}

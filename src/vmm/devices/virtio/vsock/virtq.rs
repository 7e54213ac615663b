//! Moves packets between the three virtqueues and the muxer. Every
//! descriptor chain is checked here, through virtio-queue's bounded chain
//! walk and its `Reader`/`Writer` (which only touch guest memory the chain
//! names, after validating it); the muxer only ever sees a validated header
//! and a payload slice of at most `MAX_PAYLOAD` bytes.

use std::io::{self, Read, Write};

use virtio_queue::{Queue, QueueOwnedT, QueueT};

use super::muxer::Muxer;
use super::packet::{EVENT_TRANSPORT_RESET, HDR_SIZE, Header, Op, PacketError};
use crate::vmm::devices::virtio::device::{
    GuestMemory, Interrupt, notify_on_next_post, rearm_notification,
};

/// Chains handled per queue per wake-up, so one busy queue cannot hold the
/// thread; `Pass::more` asks for another round right away.
pub const CHAINS_PER_PASS: usize = 64;

/// What one pass over a queue did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Pass {
    /// Some chain went to the used ring.
    pub used: bool,
    /// Stopped at the budget with work possibly left.
    pub more: bool,
}

#[derive(Debug, thiserror::Error)]
enum ChainError {
    #[error("bad descriptor chain: {0}")]
    Chain(virtio_queue::Error),
    #[error("{0} readable bytes, shorter than a header")]
    Short(usize),
    #[error("cannot read chain: {0}")]
    Read(io::Error),
    #[error(transparent)]
    Packet(PacketError),
}

/// A rejected TX chain, with its header if one could be read.
struct Malformed {
    hdr: Option<Header>,
    err: ChainError,
}

/// TX chains the device has read but not yet given back. Giving them back
/// is what costs the guest an interrupt (a status read and an ack, two
/// exits), and its driver needs them only to reuse ring slots. So with
/// EVENT_IDX they are held until the guest is interrupted anyway (for RX),
/// or until a quarter of the ring is held: a packet takes at most two
/// descriptors, so the guest always keeps half its ring.
#[derive(Debug, Default)]
pub struct HeldTx {
    heads: Vec<u16>,
}

impl HeldTx {
    pub fn len(&self) -> usize {
        self.heads.len()
    }

    pub fn is_empty(&self) -> bool {
        self.heads.is_empty()
    }

    /// Most chains held at once for a ring of `size` entries.
    pub fn limit(size: u16) -> usize {
        usize::from(size / 4).max(1)
    }

    /// Takes a finished chain: held with EVENT_IDX, else given back now.
    fn take(&mut self, queue: &mut Queue, mem: &GuestMemory, head: u16, pass: &mut Pass) {
        if !queue.event_idx_enabled() {
            add_used(queue, mem, head, 0, pass);
            return;
        }
        self.heads.push(head);
        if self.heads.len() >= Self::limit(queue.size()) {
            self.give_back(queue, mem, pass);
        }
    }

    /// Puts every held chain on the used ring (used length 0).
    pub fn give_back(&mut self, queue: &mut Queue, mem: &GuestMemory, pass: &mut Pass) {
        for head in self.heads.drain(..) {
            add_used(queue, mem, head, 0, pass);
        }
    }
}

/// Handles the guest's TX chains. Each is given back with used length 0,
/// at once or later through `held` (see `HeldTx`).
pub fn process_tx(
    muxer: &mut Muxer,
    mem: &GuestMemory,
    queue: &mut Queue,
    scratch: &mut [u8],
    held: &mut HeldTx,
) -> Pass {
    let mut pass = Pass::default();
    for _ in 0..CHAINS_PER_PASS {
        let Some(chain) = queue.pop_descriptor_chain(mem) else {
            // Caught up: the next packet must notify us.
            pass.more = rearm_notification(queue, mem);
            return pass;
        };
        let head = chain.head_index();
        match parse_tx(chain.reader(mem), muxer.guest_cid(), scratch) {
            Ok((hdr, op, len)) => muxer.handle_guest_packet(&hdr, op, &scratch[..len]),
            Err(bad) => {
                crate::guest_warn!(head, err = %bad.err, hdr = ?bad.hdr, "vsock: dropping TX chain");
                if let Some(hdr) = bad.hdr {
                    muxer.handle_malformed(&hdr);
                }
            }
        }
        held.take(queue, mem, head, &mut pass);
    }
    pass.more = true;
    pass
}

/// Reads and validates one TX packet; its payload lands in `scratch`.
fn parse_tx(
    reader: Result<virtio_queue::Reader<'_>, virtio_queue::Error>,
    guest_cid: u64,
    scratch: &mut [u8],
) -> Result<(Header, Op, usize), Malformed> {
    let no_hdr = |err| Malformed { hdr: None, err };
    let mut reader = reader.map_err(|e| no_hdr(ChainError::Chain(e)))?;
    let available = reader.available_bytes();
    if available < HDR_SIZE {
        return Err(no_hdr(ChainError::Short(available)));
    }
    let mut raw = [0u8; HDR_SIZE];
    reader
        .read_exact(&mut raw)
        .map_err(|e| no_hdr(ChainError::Read(e)))?;
    let hdr = Header::from_bytes(&raw);
    let with_hdr = |err| Malformed {
        hdr: Some(hdr),
        err,
    };
    let op = hdr
        .validate_tx(guest_cid, reader.available_bytes())
        .map_err(|e| with_hdr(ChainError::Packet(e)))?;
    let len = hdr.len as usize;
    let payload = scratch
        .get_mut(..len)
        .ok_or_else(|| with_hdr(ChainError::Packet(PacketError::TooLong(hdr.len))))?;
    reader
        .read_exact(payload)
        .map_err(|e| with_hdr(ChainError::Read(e)))?;
    Ok((hdr, op, len))
}

/// Fills the guest's RX chains with whatever the muxer has to say. Chains
/// too small for a header, or naming memory the guest does not have, are
/// returned with used length 0 and nothing owed is lost.
pub fn process_rx(
    muxer: &mut Muxer,
    mem: &GuestMemory,
    queue: &mut Queue,
    scratch: &mut [u8],
) -> Pass {
    let mut pass = Pass::default();
    for _ in 0..CHAINS_PER_PASS {
        if !muxer.has_pending_rx() {
            return pass;
        }
        let Some(chain) = queue.pop_descriptor_chain(mem) else {
            // Starved: only now does the device need to hear of new
            // buffers; refills while it has some cost the guest no exit.
            pass.more = rearm_notification(queue, mem);
            return pass;
        };
        let head = chain.head_index();
        let mut writer = match chain.writer(mem) {
            Ok(w) if w.available_bytes() >= HDR_SIZE => w,
            Ok(w) => {
                let n = w.available_bytes();
                crate::guest_warn!(head, bytes = n, "vsock: RX chain too small for a header");
                add_used(queue, mem, head, 0, &mut pass);
                continue;
            }
            Err(e) => {
                crate::guest_warn!(head, %e, "vsock: bad RX chain");
                add_used(queue, mem, head, 0, &mut pass);
                continue;
            }
        };
        let room = (writer.available_bytes() - HDR_SIZE).min(scratch.len());
        let Some(hdr) = muxer.next_rx(&mut scratch[..room]) else {
            // Nothing could be produced after all (e.g. the host stream had
            // no data): give the chain back for next time.
            queue.go_to_previous_position();
            return pass;
        };
        let payload = scratch.get(..hdr.len as usize).unwrap_or_default();
        let written = write_rx(&mut writer, &hdr, payload);
        add_used(queue, mem, head, written, &mut pass);
    }
    pass.more = muxer.has_pending_rx();
    pass
}

fn write_rx(writer: &mut virtio_queue::Writer<'_>, hdr: &Header, payload: &[u8]) -> u32 {
    // The writer's room was checked, so this cannot fall short; if it did,
    // the guest would see a truncated length rather than garbage.
    if let Err(e) = writer
        .write_all(&hdr.to_bytes())
        .and_then(|()| writer.write_all(payload))
    {
        tracing::error!(%e, "vsock: RX write fell short");
    }
    writer.bytes_written() as u32
}

/// Delivers a pending transport-reset event, if any.
/// `delivered_at` gets the driver's avail index as it was just before the
/// event went on the used ring: a later one means the driver has posted a
/// buffer since, which it does once it handled the event.
pub fn process_event(
    pending: &mut bool,
    mem: &GuestMemory,
    queue: &mut Queue,
    delivered_at: &mut Option<u16>,
) -> Pass {
    let mut pass = Pass::default();
    for _ in 0..CHAINS_PER_PASS {
        if !*pending {
            // The guest re-posting an event buffer is how it shows it
            // handled a transport reset: every new one must notify us.
            pass.more = notify_on_next_post(queue, mem);
            return pass;
        }
        let Some(chain) = queue.pop_descriptor_chain(mem) else {
            pass.more = notify_on_next_post(queue, mem);
            return pass;
        };
        let head = chain.head_index();
        let id = EVENT_TRANSPORT_RESET.to_le_bytes();
        let written = match chain.writer(mem) {
            Ok(mut w) if w.available_bytes() >= id.len() => match w.write_all(&id) {
                Ok(()) => id.len() as u32,
                Err(e) => {
                    crate::guest_warn!(head, %e, "vsock: cannot write event");
                    0
                }
            },
            Ok(_) => {
                crate::guest_warn!(head, "vsock: event chain too small");
                0
            }
            Err(e) => {
                crate::guest_warn!(head, %e, "vsock: bad event chain");
                0
            }
        };
        if written > 0 {
            *pending = false;
            *delivered_at = queue
                .avail_idx(mem, std::sync::atomic::Ordering::Acquire)
                .map_or(Some(0), |idx| Some(idx.0));
        }
        add_used(queue, mem, head, written, &mut pass);
    }
    pass.more = *pending;
    pass
}

fn add_used(queue: &mut Queue, mem: &GuestMemory, head: u16, len: u32, pass: &mut Pass) {
    match queue.add_used(mem, head, len) {
        Ok(()) => pass.used = true,
        Err(e) => crate::guest_warn!(head, ?e, "vsock: cannot return chain"),
    }
}

/// Interrupts the guest if it wants to hear about the used buffers.
pub fn notify_guest(queue: &mut Queue, mem: &GuestMemory, interrupt: &Interrupt) {
    if wants_interrupt(queue, mem) {
        interrupt.signal_used_queue();
    }
}

/// Whether the driver wants an interrupt for what was just put on `queue`'s
/// used ring (EVENT_IDX `used_event`); if its ring cannot be read, it gets one.
pub fn wants_interrupt(queue: &mut Queue, mem: &GuestMemory) -> bool {
    queue.needs_notification(mem).unwrap_or(true)
}

#[cfg(test)]
mod tests;

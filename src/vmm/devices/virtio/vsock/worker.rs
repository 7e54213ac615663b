//! The device thread: sleeps in epoll_wait on the muxer's host sockets, the
//! queue-notify event fd, a control event fd and a stop event fd, and after
//! every wake-up runs the queues until nothing more can move.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, mpsc};

use virtio_queue::{Queue, QueueT};
use vmm_sys_util::epoll::{EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::muxer::Muxer;
use super::packet::MAX_PAYLOAD;
use super::virtq;
use crate::vmm::devices::virtio::device::{GuestMemory, Interrupt};

const TOKEN_QUEUE: u64 = 1;
const TOKEN_STOP: u64 = 2;
const TOKEN_CONTROL: u64 = 3;
/// How often an unacknowledged transport reset is looked at again (ms),
/// doubling per nudge up to 2^RESET_POLL_BACKOFF times that.
const RESET_POLL_MS: i32 = 20;
const RESET_POLL_BACKOFF: u32 = 5;

/// Requests from other threads that outlive one activation of the device.
#[derive(Debug)]
pub struct Control {
    evt: EventFd,
    transport_reset: AtomicBool,
    /// Callers waiting for the held TX chains to be given back.
    give_back: Mutex<Vec<mpsc::Sender<()>>>,
}

impl Control {
    pub fn new() -> io::Result<Control> {
        Ok(Control {
            evt: EventFd::new(libc::EFD_NONBLOCK)?,
            transport_reset: AtomicBool::new(false),
            give_back: Mutex::new(Vec::new()),
        })
    }

    /// Asks the running device thread to give back every TX chain it
    /// holds; the receiver hears when it has.
    pub fn request_give_back(&self) -> mpsc::Receiver<()> {
        let (done, heard) = mpsc::channel();
        if let Ok(mut waiting) = self.give_back.lock() {
            waiting.push(done);
        }
        if let Err(e) = self.evt.write(1) {
            crate::guest_warn!(%e, "vsock: cannot wake the device thread");
        }
        heard
    }

    fn take_give_back(&self) -> Vec<mpsc::Sender<()>> {
        self.give_back
            .lock()
            .map(|mut waiting| std::mem::take(&mut *waiting))
            .unwrap_or_default()
    }

    /// Asks the running (or next) device thread for a transport reset.
    pub fn request_transport_reset(&self) {
        self.transport_reset.store(true, Ordering::SeqCst);
        if let Err(e) = self.evt.write(1) {
            crate::guest_warn!(%e, "vsock: cannot wake the device thread");
        }
    }

    pub fn take_transport_reset(&self) -> bool {
        self.transport_reset.swap(false, Ordering::SeqCst)
    }
}

pub struct Worker {
    mem: GuestMemory,
    queues: [Queue; 3],
    interrupt: Arc<Interrupt>,
    muxer: Muxer,
    queue_evt: EventFd,
    stop_evt: EventFd,
    control: Arc<Control>,
    scratch: Vec<u8>,
    held_tx: virtq::HeldTx,
    event_pending: bool,
    /// After a transport reset, the event queue's avail index when the event
    /// went out. Nothing goes to the guest until the driver has handled the
    /// reset, which it shows by re-posting the event buffer: a connection
    /// made before that would be torn down by the reset itself.
    reset_unacked_at: Option<u16>,
    /// Interrupts repeated while waiting for that acknowledgement.
    reset_nudges: u32,
}

impl Worker {
    /// `queues` are rx, tx, event, in virtio's order.
    pub fn new(
        mem: GuestMemory,
        queues: [Queue; 3],
        interrupt: Arc<Interrupt>,
        muxer: Muxer,
        queue_evt: EventFd,
        stop_evt: EventFd,
        control: Arc<Control>,
    ) -> Worker {
        Worker {
            mem,
            queues,
            interrupt,
            muxer,
            queue_evt,
            stop_evt,
            control,
            scratch: vec![0; MAX_PAYLOAD],
            held_tx: virtq::HeldTx::default(),
            event_pending: false,
            reset_unacked_at: None,
            reset_nudges: 0,
        }
    }

    /// Registers the thread's fds with the muxer's epoll. On failure none
    /// stay registered, and `into_muxer` gives the muxer back.
    pub fn register(&self) -> io::Result<()> {
        let fds = self.thread_fds();
        for (i, (fd, token)) in fds.iter().enumerate() {
            if let Err(e) = self.muxer.add_thread_fd(*fd, *token) {
                for (fd, _) in &fds[..i] {
                    self.muxer.remove_thread_fd(*fd);
                }
                return Err(e);
            }
        }
        Ok(())
    }

    pub fn into_muxer(self) -> Muxer {
        self.muxer
    }

    fn thread_fds(&self) -> [(RawFd, u64); 3] {
        [
            (self.queue_evt.as_raw_fd(), TOKEN_QUEUE),
            (self.stop_evt.as_raw_fd(), TOKEN_STOP),
            (self.control.evt.as_raw_fd(), TOKEN_CONTROL),
        ]
    }

    /// Runs until the stop event fd fires; returns the muxer so the device
    /// keeps its listener across resets.
    pub fn run(mut self) -> Muxer {
        let mut events = vec![EpollEvent::default(); 64];
        // A reset requested while the device was inactive, and buffers the
        // driver queued before DRIVER_OK, are handled by a first pass.
        self.take_control();
        let mut timeout = 0;
        'run: loop {
            let n = match self.muxer.wait(timeout, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::error!(%e, "vsock: epoll_wait failed; device stops");
                    break;
                }
            };
            for ev in &events[..n] {
                match ev.data() {
                    TOKEN_STOP => break 'run,
                    TOKEN_QUEUE => {
                        let _ = self.queue_evt.read();
                    }
                    TOKEN_CONTROL => {
                        let _ = self.control.evt.read();
                        self.take_control();
                    }
                    token => self
                        .muxer
                        .handle_event(token, EventSet::from_bits_truncate(ev.events())),
                }
            }
            // Only the reset poll's own timer, not a busy pass, nudges.
            if n == 0 && timeout > 0 && self.reset_unacked_at.is_some() {
                self.nudge_unacked_reset();
            }
            timeout = if self.pump() {
                0
            } else if self.reset_unacked_at.is_some() {
                // The ack is the guest's re-posted event buffer; it is also
                // looked for on a timer (backing off), so a lost notification
                // either way cannot leave the device waiting.
                RESET_POLL_MS << self.reset_nudges.min(RESET_POLL_BACKOFF)
            } else {
                -1
            };
        }
        for (fd, _) in self.thread_fds() {
            self.muxer.remove_thread_fd(fd);
        }
        self.muxer
    }

    /// The guest has not shown it handled the transport reset within a poll
    /// interval: interrupt it again (harmless if it had the first one).
    fn nudge_unacked_reset(&mut self) {
        self.reset_nudges += 1;
        if self.reset_nudges == 1 || self.reset_nudges.is_power_of_two() {
            tracing::debug!(
                nudges = self.reset_nudges,
                "vsock: transport reset not acknowledged yet; interrupting the guest again"
            );
        }
        self.interrupt.signal_used_queue();
    }

    fn take_control(&mut self) {
        if self.control.take_transport_reset() {
            tracing::debug!("vsock: transport reset");
            self.muxer.drop_connections();
            self.event_pending = true;
        }
        let waiting = self.control.take_give_back();
        if !waiting.is_empty() {
            self.give_back_held(true);
            for done in waiting {
                let _ = done.send(());
            }
        }
    }

    /// One pass over every queue; true if some queue has more to do now.
    /// The guest is interrupted at most once per pass, and only if a queue
    /// it wants to hear from has news (EVENT_IDX `used_event`); held TX
    /// chains go back with that interrupt (see `HeldTx`).
    fn pump(&mut self) -> bool {
        let [rxq, txq, evq] = &mut self.queues;
        let mem = &self.mem;
        let tx = virtq::process_tx(
            &mut self.muxer,
            mem,
            txq,
            &mut self.scratch,
            &mut self.held_tx,
        );
        let mut interrupt = tx.used && virtq::wants_interrupt(txq, mem);
        let mut delivered_at = None;
        let ev = virtq::process_event(&mut self.event_pending, mem, evq, &mut delivered_at);
        interrupt |= ev.used && virtq::wants_interrupt(evq, mem);
        if delivered_at.is_some() {
            tracing::debug!("vsock: transport reset delivered");
            self.reset_unacked_at = delivered_at;
            self.reset_nudges = 0;
        } else if let (Some(at), Ok(now)) =
            (self.reset_unacked_at, evq.avail_idx(mem, Ordering::Acquire))
            && now.0 != at
        {
            tracing::debug!(
                nudges = self.reset_nudges,
                "vsock: the guest handled the transport reset"
            );
            self.reset_unacked_at = None;
            self.reset_nudges = 0;
        }
        let mut rx = virtq::Pass::default();
        if self.reset_unacked_at.is_none() {
            rx = virtq::process_rx(&mut self.muxer, mem, rxq, &mut self.scratch);
            interrupt |= rx.used && virtq::wants_interrupt(rxq, mem);
        }
        if interrupt {
            self.give_back_held(false);
            self.interrupt.signal_used_queue();
        }
        tx.more || rx.more || ev.more
    }

    /// Puts the held TX chains on the used ring; interrupts the guest for
    /// them only if `alone` (no interrupt is about to carry them).
    fn give_back_held(&mut self, alone: bool) {
        if self.held_tx.is_empty() {
            return;
        }
        let txq = &mut self.queues[1];
        let mut pass = virtq::Pass::default();
        self.held_tx.give_back(txq, &self.mem, &mut pass);
        // Keeps the queue's count of unsignalled entries right either way.
        let wanted = pass.used && virtq::wants_interrupt(txq, &self.mem);
        if alone && wanted {
            self.interrupt.signal_used_queue();
        }
    }
}

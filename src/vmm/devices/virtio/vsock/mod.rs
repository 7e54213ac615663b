//! virtio-vsock (virtio 1.2 §5.10) backed by a host Unix socket.
//!
//! Host processes reach guest ports through the Unix socket at `uds_path`
//! using Firecracker's convention (see `muxer`). The guest can open
//! connections only to the host ports the VMM forwards (each to its own
//! Unix socket beside `uds_path`); other REQUESTs are answered with RST.
//!
//! Layout: `packet` (wire header and its checks), `connection` (one stream's
//! state machine and credit), `muxer` (host sockets, ports, routing),
//! `virtq` (descriptor chains ↔ packets), `worker` (the device thread).

mod connection;
mod muxer;
mod packet;
#[cfg(test)]
mod test_utils;
mod virtq;
mod worker;

/// What the fuzz targets in `fuzz/` drive directly: the queue processing
/// and the packet header, below the device thread. Not an API.
#[doc(hidden)]
pub mod fuzzing {
    pub use super::muxer::{GuestForwards, Muxer};
    pub use super::packet::{HDR_SIZE, HOST_CID, Header, MAX_PAYLOAD, Op, PacketError};
    pub use super::virtq::{HeldTx, Pass, notify_guest, process_event, process_rx, process_tx};
}

use std::io;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::mpsc;

use virtio_queue::{Queue, QueueT};
use vmm_sys_util::eventfd::EventFd;

use self::muxer::{GuestForwards, Muxer};
use self::worker::{Control, Worker};
use super::device::{
    ActivateError, GuestMemory, Interrupt, TYPE_VSOCK, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX,
    VirtioDevice,
};

/// rx, tx, event.
const QUEUE_SIZES: [u16; 3] = [256; 3];
/// How long a snapshot waits for the device thread to give back held
/// buffers (it answers within one pass of its loop).
const GIVE_BACK_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);
/// What the device offers (a template bakes in what its guest accepted).
/// Stream sockets are implied when no socket-type feature is offered.
pub const FEATURES: u64 = VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX;

#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    #[error("guest CID {0} is reserved or out of range")]
    InvalidCid(u64),
    #[error("{}: another process is serving this socket", .0.display())]
    InUse(PathBuf),
    #[error("{}: cannot remove stale socket: {source}", path.display())]
    RemoveStale { path: PathBuf, source: io::Error },
    #[error("{}: cannot bind: {source}", path.display())]
    Bind { path: PathBuf, source: io::Error },
    #[error("cannot set up the vsock event loop: {0}")]
    EventLoop(#[source] io::Error),
}

/// The virtio-vsock device. Dropping it stops its thread and removes the
/// socket file.
pub struct Vsock {
    guest_cid: u64,
    uds_path: PathBuf,
    /// Host ports the guest may connect to (see `muxer`).
    forwards: GuestForwards,
    acked_features: u64,
    /// Written by `queue_notify` on vCPU threads; read by the device thread.
    queue_evt: EventFd,
    control: Arc<Control>,
    /// The muxer lives here while the device is inactive, in the thread
    /// while it runs, so the listener survives driver resets.
    muxer: Option<Muxer>,
    thread: DeviceThread,
    /// The running worker's stop event.
    running: Option<EventFd>,
}

/// The device thread lives as long as the device: it is started with the
/// VMM, before any seccomp filter, so it installs its own filter and a
/// vCPU thread that activates the device never has to create a thread.
struct DeviceThread {
    jobs: mpsc::Sender<Worker>,
    done: mpsc::Receiver<Muxer>,
}

impl DeviceThread {
    fn start() -> io::Result<DeviceThread> {
        let (jobs, job_rx) = mpsc::channel::<Worker>();
        let (done_tx, done) = mpsc::channel();
        std::thread::Builder::new()
            .name("vsock".into())
            .spawn(move || {
                crate::vmm::seccomp::confine_this_thread(crate::vmm::seccomp_filters::Role::Device);
                // Ends when the device is dropped (the sender goes).
                while let Ok(worker) = job_rx.recv() {
                    if done_tx.send(worker.run()).is_err() {
                        return;
                    }
                }
            })?;
        Ok(DeviceThread { jobs, done })
    }
}

/// A cloneable, thread-safe way to ask the device for a transport reset
/// (e.g. from snapshot-restore code that does not own the device).
#[derive(Clone, Debug)]
pub struct VsockHandle {
    control: Arc<Control>,
}

impl VsockHandle {
    /// Queues VIRTIO_VSOCK_EVENT_TRANSPORT_RESET for the guest and drops
    /// every connection. If the device is not active, this happens when it
    /// next activates.
    pub fn send_transport_reset(&self) {
        self.control.request_transport_reset();
    }
}

impl Vsock {
    /// Binds the host Unix socket at `uds_path`, replacing a stale socket
    /// file left by a process that is gone.
    pub fn new(
        guest_cid: u64,
        uds_path: PathBuf,
        forwarded_ports: &[u32],
    ) -> Result<Vsock, VsockError> {
        // 0, 1 and 2 are reserved, as is u32::MAX (VMADDR_CID_ANY); Linux
        // only uses the low 32 bits.
        if guest_cid < 3 || guest_cid >= u64::from(u32::MAX) {
            return Err(VsockError::InvalidCid(guest_cid));
        }
        let forwards =
            GuestForwards::new(&uds_path, forwarded_ports).map_err(VsockError::EventLoop)?;
        let listener = bind_listener(&uds_path)?;
        let muxer =
            Muxer::new(guest_cid, listener, forwards.clone()).map_err(VsockError::EventLoop)?;
        let queue_evt = EventFd::new(libc::EFD_NONBLOCK).map_err(VsockError::EventLoop)?;
        let control = Arc::new(Control::new().map_err(VsockError::EventLoop)?);
        let thread = DeviceThread::start().map_err(VsockError::EventLoop)?;
        Ok(Vsock {
            guest_cid,
            uds_path,
            forwards,
            acked_features: 0,
            queue_evt,
            control,
            muxer: Some(muxer),
            thread,
            running: None,
        })
    }

    pub fn guest_cid(&self) -> u64 {
        self.guest_cid
    }

    pub fn uds_path(&self) -> &Path {
        &self.uds_path
    }

    pub fn handle(&self) -> VsockHandle {
        VsockHandle {
            control: self.control.clone(),
        }
    }

    /// The event fd the device thread wakes on for queue notifications. The
    /// VMM registers it with KVM as an ioeventfd on QueueNotify, so a guest's
    /// kick reaches this thread without an exit to the VMM.
    pub fn notify_eventfd(&self) -> io::Result<EventFd> {
        self.queue_evt.try_clone()
    }

    /// See `VsockHandle::send_transport_reset`.
    pub fn send_transport_reset(&self) {
        self.control.request_transport_reset();
    }

    /// Stops the running worker and takes the muxer back.
    fn stop(&mut self) {
        let Some(stop_evt) = self.running.take() else {
            return;
        };
        if let Err(e) = stop_evt.write(1) {
            // Waiting now could hang forever; give the muxer up instead.
            tracing::error!(%e, "vsock: cannot stop the device thread");
            return;
        }
        match self.thread.done.recv() {
            Ok(muxer) => self.muxer = Some(muxer),
            Err(_) => tracing::error!("vsock: device thread panicked"),
        }
    }

    fn take_or_rebuild_muxer(&mut self) -> Result<Muxer, ActivateError> {
        if let Some(muxer) = self.muxer.take() {
            return Ok(muxer);
        }
        // Only after the thread died: bind afresh.
        let listener = bind_listener(&self.uds_path).map_err(device_error)?;
        Muxer::new(self.guest_cid, listener, self.forwards.clone()).map_err(device_error)
    }
}

fn device_error(e: impl std::fmt::Display) -> ActivateError {
    ActivateError::Device(format!("vsock: {e}"))
}

fn bind_listener(path: &Path) -> Result<UnixListener, VsockError> {
    if let Ok(meta) = std::fs::symlink_metadata(path)
        && meta.file_type().is_socket()
    {
        if UnixStream::connect(path).is_ok() {
            return Err(VsockError::InUse(path.to_owned()));
        }
        std::fs::remove_file(path).map_err(|source| VsockError::RemoveStale {
            path: path.to_owned(),
            source,
        })?;
    }
    // Anything else at `path` (a regular file, say) makes bind fail: we only
    // ever delete sockets.
    UnixListener::bind(path).map_err(|source| VsockError::Bind {
        path: path.to_owned(),
        source,
    })
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        TYPE_VSOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    fn features(&self) -> u64 {
        FEATURES
    }

    fn ack_features(&mut self, features: u64) {
        self.acked_features = features & self.features();
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let config = self.guest_cid.to_le_bytes();
        for (i, byte) in data.iter_mut().enumerate() {
            *byte = usize::try_from(offset)
                .ok()
                .and_then(|o| o.checked_add(i))
                .and_then(|at| config.get(at))
                .copied()
                .unwrap_or(0);
        }
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        tracing::debug!(offset, len = data.len(), "vsock: ignoring config write");
    }

    fn activate(
        &mut self,
        mem: GuestMemory,
        queues: Vec<Queue>,
        interrupt: Arc<Interrupt>,
    ) -> Result<(), ActivateError> {
        if self.running.is_some() {
            return Err(device_error("already active"));
        }
        let queues: [Queue; 3] = queues
            .try_into()
            .map_err(|q: Vec<Queue>| device_error(format!("expected 3 queues, got {}", q.len())))?;
        if let Some(i) = queues.iter().position(|q| !q.is_valid(&mem)) {
            return Err(ActivateError::BadQueue(i));
        }
        let queue_evt = self.queue_evt.try_clone().map_err(device_error)?;
        let stop_evt = EventFd::new(libc::EFD_NONBLOCK).map_err(device_error)?;
        let stop_handle = stop_evt.try_clone().map_err(device_error)?;
        let muxer = self.take_or_rebuild_muxer()?;
        let control = self.control.clone();
        let worker = Worker::new(mem, queues, interrupt, muxer, queue_evt, stop_evt, control);
        if let Err(e) = worker.register() {
            self.muxer = Some(worker.into_muxer());
            return Err(device_error(e));
        }
        // If the thread is gone the muxer goes with the worker; a later
        // activation binds the socket again.
        self.thread
            .jobs
            .send(worker)
            .map_err(|_| device_error("the device thread is gone"))?;
        self.running = Some(stop_handle);
        Ok(())
    }

    fn queue_notify(&mut self, queue: u16) {
        if usize::from(queue) >= QUEUE_SIZES.len() {
            tracing::debug!(queue, "vsock: notify for a queue that does not exist");
            return;
        }
        if let Err(e) = self.queue_evt.write(1) {
            crate::guest_warn!(%e, "vsock: cannot wake the device thread");
        }
    }

    fn quiesce(&mut self) {
        if self.running.is_none() {
            return;
        }
        let given_back = self.control.request_give_back();
        if given_back.recv_timeout(GIVE_BACK_TIMEOUT).is_err() {
            tracing::error!("vsock: the device thread did not give back its held buffers");
        }
    }

    fn reset(&mut self) {
        self.stop();
        if let Some(muxer) = &mut self.muxer {
            muxer.drop_connections();
        }
        // A fresh driver has no connections to be told about.
        self.control.take_transport_reset();
        self.acked_features = 0;
    }
}

impl Drop for Vsock {
    fn drop(&mut self) {
        self.stop();
        self.muxer = None;
        let _ = std::fs::remove_file(&self.uds_path);
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::os::fd::AsRawFd;

    use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

    use super::packet::{EVENT_TRANSPORT_RESET, Op};
    use super::test_utils::*;
    use super::*;

    /// Blocks (at most 5 s) until the device raises its interrupt.
    fn wait_irq(irq: &EventFd) {
        let epoll = Epoll::new().unwrap();
        epoll
            .ctl(
                ControlOperation::Add,
                irq.as_raw_fd(),
                EpollEvent::new(EventSet::IN, 0),
            )
            .unwrap();
        let mut ev = [EpollEvent::default()];
        assert_eq!(
            epoll.wait(5000, &mut ev).unwrap(),
            1,
            "no interrupt from the device"
        );
        irq.read().unwrap();
    }

    fn wait_used(irq: &EventFd, gq: &GuestQueue, n: u16) {
        for _ in 0..20 {
            if gq.used_idx() >= n {
                return;
            }
            wait_irq(irq);
        }
        panic!("queue never reached {n} used entries");
    }

    fn interrupt() -> (Arc<Interrupt>, EventFd) {
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        (Interrupt::new(irq.try_clone().unwrap()), irq)
    }

    #[test]
    fn new_rejects_reserved_cids() {
        let dir = tempfile::tempdir().unwrap();
        for cid in [0, 1, 2, u64::from(u32::MAX), u64::MAX] {
            let err = Vsock::new(cid, dir.path().join("v.sock"), &[])
                .err()
                .unwrap();
            assert!(matches!(err, VsockError::InvalidCid(c) if c == cid));
        }
        assert!(Vsock::new(3, dir.path().join("v.sock"), &[]).is_ok());
    }

    #[test]
    fn stale_socket_is_replaced_live_one_and_files_are_not() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v.sock");
        drop(UnixListener::bind(&path).unwrap());
        assert!(path.exists());
        let dev = Vsock::new(3, path.clone(), &[]).unwrap();
        assert!(matches!(
            Vsock::new(4, path.clone(), &[]),
            Err(VsockError::InUse(_))
        ));
        drop(dev);
        assert!(!path.exists(), "dropping the device removes its socket");

        std::fs::write(&path, b"precious").unwrap();
        assert!(matches!(
            Vsock::new(3, path.clone(), &[]),
            Err(VsockError::Bind { .. })
        ));
        assert_eq!(std::fs::read(&path).unwrap(), b"precious");
    }

    #[test]
    fn config_space_and_features() {
        let dir = tempfile::tempdir().unwrap();
        let mut dev = Vsock::new(0x1234_5678, dir.path().join("v.sock"), &[]).unwrap();
        assert_eq!(dev.device_type(), TYPE_VSOCK);
        assert_eq!(dev.queue_max_sizes(), &[256, 256, 256]);
        assert_eq!(dev.features(), VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX);
        dev.ack_features(u64::MAX);
        assert_eq!(
            dev.acked_features,
            VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX
        );

        let mut cfg = [0xffu8; 8];
        dev.read_config(0, &mut cfg);
        assert_eq!(cfg, 0x1234_5678u64.to_le_bytes());
        let mut cfg = [0xffu8; 8];
        dev.read_config(4, &mut cfg);
        assert_eq!(cfg, [0, 0, 0, 0, 0, 0, 0, 0]);
        let mut cfg = [0xffu8; 4];
        dev.read_config(1, &mut cfg);
        assert_eq!(cfg, [0x56, 0x34, 0x12, 0]);
        let mut cfg = [0xffu8; 2];
        dev.read_config(u64::MAX, &mut cfg);
        assert_eq!(cfg, [0, 0]);
        dev.write_config(0, &[1, 2, 3]);
        let mut cfg = [0u8; 1];
        dev.read_config(0, &mut cfg);
        assert_eq!(cfg, [0x78]);
    }

    #[test]
    fn activate_rejects_bad_queues_and_stays_usable() {
        let dir = tempfile::tempdir().unwrap();
        let mut dev = Vsock::new(GUEST_CID, dir.path().join("v.sock"), &[]).unwrap();
        let mem = memory();
        let qs = [RX_BASE, TX_BASE, EVT_BASE].map(|b| GuestQueue::new(&mem, b));
        let (irq, _evt) = interrupt();

        let two = vec![qs[0].queue(), qs[1].queue()];
        assert!(matches!(
            dev.activate(mem.clone(), two, irq.clone()),
            Err(ActivateError::Device(_))
        ));
        let mut not_ready = qs[2].queue();
        not_ready.set_ready(false);
        let bad = vec![qs[0].queue(), qs[1].queue(), not_ready];
        assert!(matches!(
            dev.activate(mem.clone(), bad, irq.clone()),
            Err(ActivateError::BadQueue(2))
        ));

        let good = qs.iter().map(GuestQueue::queue).collect();
        dev.activate(mem.clone(), good, irq.clone()).unwrap();
        let again = qs.iter().map(GuestQueue::queue).collect();
        assert!(dev.activate(mem, again, irq).is_err());
        dev.reset();
    }

    /// The device thread end to end: host connect, guest accept, data,
    /// transport reset, driver reset, and a second activation.
    #[test]
    fn device_thread_end_to_end() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v.sock");
        let mut dev = Vsock::new(GUEST_CID, path.clone(), &[]).unwrap();
        let mem = memory();
        let mut bufs = Bufs::new();
        let [mut rxg, mut txg, mut evg] =
            [RX_BASE, TX_BASE, EVT_BASE].map(|b| GuestQueue::new(&mem, b));
        let rx_bufs: Vec<u64> = (0..4).map(|_| bufs.alloc(4096)).collect();
        for &a in &rx_bufs {
            rxg.push(&[(a, 4096, true)]);
        }
        let ev_buf = bufs.alloc(4);
        write_bytes(&mem, ev_buf, &[0xff; 4]);
        evg.push(&[(ev_buf, 4, true)]);
        let (irq, irq_evt) = interrupt();
        let queues = vec![rxg.queue(), txg.queue(), evg.queue()];
        dev.activate(mem.clone(), queues, irq.clone()).unwrap();

        let mut c = UnixStream::connect(&path).unwrap();
        c.set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .unwrap();
        c.write_all(b"CONNECT 1024\n").unwrap();
        wait_used(&irq_evt, &rxg, 1);
        let req = read_hdr(&mem, rx_bufs[0]);
        assert_eq!((req.op, req.dst_port), (Op::Request as u16, 1024));
        let port = req.src_port;

        let t = bufs.alloc(44);
        write_bytes(&mem, t, &guest_hdr(Op::Response, 1024, port, 0).to_bytes());
        txg.push(&[(t, 44, false)]);
        dev.queue_notify(1);
        let expected = format!("OK {port}\n");
        let mut line = vec![0u8; expected.len()];
        c.read_exact(&mut line).unwrap();
        assert_eq!(line, expected.as_bytes());

        c.write_all(b"hi").unwrap();
        wait_used(&irq_evt, &rxg, 2);
        let pkt = read_hdr(&mem, rx_bufs[1]);
        assert_eq!((pkt.op, pkt.len), (Op::Rw as u16, 2));
        assert_eq!(read_bytes(&mem, rx_bufs[1] + 44, 2), b"hi");

        dev.handle().send_transport_reset();
        let mut b = [0u8; 1];
        assert_eq!(
            c.read(&mut b).unwrap(),
            0,
            "transport reset drops connections"
        );
        wait_used(&irq_evt, &evg, 1);
        assert_eq!(evg.used(0).1, 4);
        assert_eq!(
            read_bytes(&mem, ev_buf, 4),
            EVENT_TRANSPORT_RESET.to_le_bytes()
        );

        // Driver reset: the thread stops, the listener stays.
        dev.reset();
        assert!(dev.running.is_none() && dev.muxer.is_some());
        let mem = memory();
        let mut rxg = GuestQueue::new(&mem, RX_BASE);
        let a = Bufs::new().alloc(4096);
        rxg.push(&[(a, 4096, true)]);
        let queues = vec![
            rxg.queue(),
            GuestQueue::new(&mem, TX_BASE).queue(),
            GuestQueue::new(&mem, EVT_BASE).queue(),
        ];
        dev.activate(mem.clone(), queues, irq).unwrap();
        let mut c = UnixStream::connect(&path).unwrap();
        c.write_all(b"CONNECT 2048\n").unwrap();
        wait_used(&irq_evt, &rxg, 1);
        assert_eq!(read_hdr(&mem, a).dst_port, 2048);
        drop(dev);
        assert!(!path.exists());
    }

    /// No interrupt within a short while (the device thread answers in
    /// well under a millisecond; this only has to fail if one comes).
    fn assert_no_irq(irq: &EventFd) {
        std::thread::sleep(std::time::Duration::from_millis(100));
        assert!(
            irq.read().is_err(),
            "an interrupt the driver did not ask for"
        );
    }

    #[test]
    fn device_thread_with_event_idx_interrupts_only_as_the_driver_asks() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v.sock");
        let mut dev = Vsock::new(3, path.clone(), &[]).unwrap();
        let mem = memory();
        let mut bufs = Bufs::new();
        let [mut rxg, mut txg, mut evg] =
            [RX_BASE, TX_BASE, EVT_BASE].map(|b| GuestQueue::new(&mem, b));
        let rx_bufs: Vec<u64> = (0..8).map(|_| bufs.alloc(4096)).collect();
        for &a in &rx_bufs {
            rxg.push(&[(a, 4096, true)]);
        }
        evg.push(&[(bufs.alloc(4), 4, true)]);
        let (irq, irq_evt) = interrupt();
        let queues = vec![
            rxg.queue_with_event_idx(),
            txg.queue_with_event_idx(),
            evg.queue_with_event_idx(),
        ];
        dev.activate(mem.clone(), queues, irq).unwrap();

        let mut c = UnixStream::connect(&path).unwrap();
        c.set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .unwrap();
        c.write_all(b"CONNECT 1024\n").unwrap();
        wait_used(&irq_evt, &rxg, 1);
        let port = read_hdr(&mem, rx_bufs[0]).src_port;

        // The guest's answer goes through, but its chain is held: no
        // interrupt for it alone.
        let t = bufs.alloc(44);
        write_bytes(&mem, t, &guest_hdr(Op::Response, 1024, port, 0).to_bytes());
        txg.push(&[(t, 44, false)]);
        dev.queue_notify(1);
        let mut line = [0u8; 32];
        let n = c.read(&mut line).unwrap();
        assert_eq!(&line[..n], format!("OK {port}\n").as_bytes());
        assert_no_irq(&irq_evt);
        assert_eq!(txg.used_idx(), 0, "held");
        assert_eq!(txg.avail_event(), 1, "the next packet must notify");

        // The next RX interrupt carries it back.
        rxg.set_used_event(1);
        c.write_all(b"a").unwrap();
        wait_used(&irq_evt, &rxg, 2);
        assert_eq!(txg.used_idx(), 1, "given back with the RX interrupt");

        // Hostile and out-of-order used_event values: far ahead, behind,
        // wrapped. The device obeys (no interrupt) and loses nothing.
        for (i, wild) in [0x8000u16, 0, 0xffff, 1].into_iter().enumerate() {
            rxg.set_used_event(wild);
            c.write_all(b"b").unwrap();
            let want = 3 + i as u16;
            for _ in 0..500 {
                if rxg.used_idx() >= want {
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            assert_eq!(rxg.used_idx(), want, "delivered without an interrupt");
            let _ = irq_evt.read();
        }
        // Exactly at used_event: interrupted.
        rxg.set_used_event(rxg.used_idx());
        c.write_all(b"c").unwrap();
        wait_irq(&irq_evt);

        // A snapshot's quiesce gives back what is held, and interrupts.
        let t2 = bufs.alloc(44);
        let credit = guest_hdr(Op::CreditUpdate, 1024, port, 0);
        write_bytes(&mem, t2, &credit.to_bytes());
        txg.push(&[(t2, 44, false)]);
        dev.queue_notify(1);
        for _ in 0..500 {
            if txg.avail_event() == 2 {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        assert_eq!(txg.used_idx(), 1);
        txg.set_used_event(1);
        dev.quiesce();
        assert_eq!(txg.used_idx(), 2, "quiesce gives back held chains");
        wait_irq(&irq_evt);
        drop(dev);
    }
}

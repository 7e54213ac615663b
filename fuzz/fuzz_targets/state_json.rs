//! What airlock reads back from a template directory: the snapshot state
//! file (`snapshot::read_state`: version, checksum, `MachineState`) and
//! what a restore checks of it before KVM is involved (image identity,
//! vCPU count, the serial port's saved registers, each virtio transport's
//! saved queues against guest memory), and the template's seal file
//! (`seal::verify`: its JSON, version and MAC).
//!
//! Input: `mode | text`. mode & 3: 0 = `text` is state.json as is;
//! 1 = `text` is the `state` body, wrapped with format version 1 and its
//! correct checksum (the fuzzer cannot forge SHA-256, so this is how it
//! reaches `MachineState`); 2, 3 = `text` is seal.json.
#![no_main]

use std::path::PathBuf;
use std::sync::Arc;

use airlock::seal;
use airlock::vmm::config::MAX_VCPUS;
use airlock::vmm::devices::console::{ConsoleSink, ConsoleTail};
use airlock::vmm::devices::serial::SerialDevice;
use airlock::vmm::devices::virtio::blk::Block;
use airlock::vmm::devices::virtio::device::{
    ActivateError, GuestMemory, Interrupt, TYPE_VSOCK, VIRTIO_F_VERSION_1, VirtioDevice,
};
use airlock::vmm::devices::virtio::mmio::MmioTransport;
use airlock::vmm::devices::virtio::rng::Rng;
use airlock::vmm::snapshot::{self, identity::ImageIdentity};
use airlock_fuzz::memory;
use libfuzzer_sys::fuzz_target;
use sha2::{Digest, Sha256};
use virtio_queue::Queue;
use vmm_sys_util::eventfd::EventFd;

/// Stands in for the vsock device, whose real activation starts a thread
/// and binds a socket: what is fuzzed here is the transport's restore.
struct Vsock;

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        TYPE_VSOCK
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[256; 3]
    }
    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1
    }
    fn ack_features(&mut self, _: u64) {}
    fn read_config(&self, _: u64, data: &mut [u8]) {
        data.fill(0);
    }
    fn write_config(&mut self, _: u64, _: &[u8]) {}
    fn activate(
        &mut self,
        _: GuestMemory,
        queues: Vec<Queue>,
        _: Arc<Interrupt>,
    ) -> Result<(), ActivateError> {
        assert_eq!(queues.len(), 3);
        Ok(())
    }
    fn queue_notify(&mut self, _: u16) {}
    fn reset(&mut self) {}
}

struct Fixture {
    dir: tempfile::TempDir,
    disk: PathBuf,
    mem: GuestMemory,
}

thread_local! {
    static FIXTURE: Fixture = {
        // tmpfs when there is one: a file is written per input.
        let dir = tempfile::Builder::new()
            .tempdir_in("/dev/shm")
            .or_else(|_| tempfile::tempdir())
            .unwrap();
        let disk = dir.path().join("disk");
        std::fs::write(&disk, vec![0u8; 4096]).unwrap();
        Fixture { dir, disk, mem: memory() }
    };
}

const KEY: [u8; 32] = [7; 32];

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn irq() -> EventFd {
    EventFd::new(libc::EFD_NONBLOCK).unwrap()
}

/// What `machine::restore` and `create_devices` check of a parsed state
/// before any KVM call.
fn check_restore(f: &Fixture, state: &snapshot::MachineState) {
    let identity = ImageIdentity {
        recipe_hash: "r".into(),
        kernel_fingerprint: "k".into(),
        rootfs_fingerprint: "f".into(),
    };
    let _ = state.image.check_matches(&identity);
    if state.vcpus.is_empty() || state.vcpus.len() > usize::from(MAX_VCPUS) {
        return;
    }
    let (events, _rx) = airlock::vmm::event::channel();
    let sink = ConsoleSink::new(None, 1 << 16, ConsoleTail::default(), events);
    if let Ok(serial) = SerialDevice::restore(irq(), sink, &state.serial) {
        let _ = serial.snapshot();
    }
    if state.transports.len() != 3 {
        return;
    }
    for (i, saved) in state.transports.iter().enumerate() {
        let device: Box<dyn VirtioDevice> = match i {
            0 => Box::new(Block::open(&f.disk).unwrap()),
            1 => Box::new(Rng::default()),
            _ => Box::new(Vsock),
        };
        let mut t = MmioTransport::new(device, f.mem.clone(), Interrupt::new(irq())).unwrap();
        if t.restore_state(saved).is_err() {
            return;
        }
        // A restored transport saves what it was given.
        let again = t.save_state();
        assert_eq!(again.device_type, saved.device_type);
        assert_eq!(again.queues.len(), saved.queues.len());
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, text)) = data.split_first() else {
        return;
    };
    FIXTURE.with(|f| match mode & 3 {
        0 | 1 => {
            let path = snapshot::state_path(f.dir.path());
            if mode & 3 == 0 {
                std::fs::write(&path, text).unwrap();
            } else {
                let Ok(body) = std::str::from_utf8(text) else {
                    return;
                };
                let body = body.trim_matches([' ', '\t', '\n', '\r']);
                let sum = hex(&Sha256::digest(body.as_bytes()));
                let file = format!(
                    "{{\"format_version\":{},\"checksum\":\"{sum}\",\"state\":{body}}}",
                    snapshot::FORMAT_VERSION
                );
                std::fs::write(&path, file).unwrap();
            }
            if let Ok(state) = snapshot::read_state(f.dir.path()) {
                check_restore(f, &state);
            }
        }
        _ => {
            std::fs::write(f.dir.path().join(seal::SEAL_FILE), text).unwrap();
            // Only a seal with the right MAC gets past the parsing, and what
            // it lists is then trusted: the fuzzer cannot forge one.
            let _ = seal::verify(f.dir.path(), &KEY);
        }
    });
});

//! virtio-rng: entropy for the guest from the host's getrandom(2), so a
//! guest's kernel RNG is seeded from outside even right after boot or restore.

use std::io::Write;
use std::sync::Arc;

use virtio_queue::{Queue, QueueT};

use super::device::{
    ActivateError, GuestMemory, Interrupt, TYPE_RNG, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX,
    VirtioDevice, rearm_notification,
};

const QUEUE_SIZE: u16 = 64;
/// What the device offers (a template bakes in what its guest accepted).
pub const FEATURES: u64 = VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX;
/// The guest asks for small amounts; more per request only burns host time.
pub const MAX_BYTES_PER_REQUEST: usize = 64 * 1024;

struct Active {
    mem: GuestMemory,
    queue: Queue,
    interrupt: Arc<Interrupt>,
}

#[derive(Default)]
pub struct Rng {
    active: Option<Active>,
}

impl Rng {
    pub fn process_queue(&mut self) -> usize {
        let Some(active) = self.active.as_mut() else {
            return 0;
        };
        let mut done = 0;
        for _ in 0..usize::from(QUEUE_SIZE) * 2 {
            let Some(chain) = active.queue.pop_descriptor_chain(&active.mem) else {
                if rearm_notification(&mut active.queue, &active.mem) {
                    continue;
                }
                break;
            };
            let head = chain.head_index();
            let written = match chain.writer(&active.mem) {
                Ok(mut writer) => {
                    let len = writer.available_bytes().min(MAX_BYTES_PER_REQUEST);
                    let mut buf = vec![0u8; len];
                    if fill_random(&mut buf) && writer.write_all(&buf).is_ok() {
                        len as u32
                    } else {
                        0
                    }
                }
                Err(err) => {
                    crate::guest_warn!(%err, "virtio-rng: unusable buffer");
                    0
                }
            };
            if let Err(err) = active.queue.add_used(&active.mem, head, written) {
                crate::guest_warn!(%err, "virtio-rng: cannot return a used buffer");
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

/// Fills `buf` from getrandom(2); false if the host cannot provide entropy.
pub fn fill_random(buf: &mut [u8]) -> bool {
    let mut filled = 0;
    while filled < buf.len() {
        let rest = &mut buf[filled..];
        // SAFETY: getrandom writes at most rest.len() bytes into rest.
        let n = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        if n < 0 {
            if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return false;
        }
        filled += n as usize;
    }
    true
}

impl VirtioDevice for Rng {
    fn device_type(&self) -> u32 {
        TYPE_RNG
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        FEATURES
    }

    fn ack_features(&mut self, _features: u64) {}

    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
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

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_queue::desc::{RawDescriptor, split::Descriptor as SplitDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Address, Bytes, GuestAddress};
    use vmm_sys_util::eventfd::EventFd;

    const F_NEXT: u16 = 1;
    const F_WRITE: u16 = 2;

    fn run(descs: &[(u64, u32, u16)]) -> (GuestMemory, u32) {
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        mem.write_slice(&vec![0u8; 0x10_0000], GuestAddress(0))
            .unwrap();
        let mock = MockSplitQueue::new(&mem, 16);
        let raw: Vec<RawDescriptor> = descs
            .iter()
            .enumerate()
            .map(|(i, (a, l, f))| {
                RawDescriptor::from(SplitDescriptor::new(*a, *l, *f, (i + 1) as u16))
            })
            .collect();
        mock.build_desc_chain(&raw).unwrap();
        let mut rng = Rng::default();
        let irq = Interrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap());
        rng.activate(mem.clone(), vec![mock.create_queue().unwrap()], irq)
            .unwrap();
        assert_eq!(rng.process_queue(), 1);
        let used: u32 = mem
            .read_obj(mock.used_addr().checked_add(8).unwrap())
            .unwrap();
        (mem, used)
    }

    #[test]
    fn fills_writable_buffers_only() {
        let (mem, used) = run(&[(0x8000, 64, F_NEXT | F_WRITE), (0x9000, 64, F_WRITE)]);
        assert_eq!(used, 128);
        let mut a = [0u8; 64];
        mem.read_slice(&mut a, GuestAddress(0x8000)).unwrap();
        assert_ne!(a, [0u8; 64]);
        let mut after = [0u8; 64];
        mem.read_slice(&mut after, GuestAddress(0x8040)).unwrap();
        assert_eq!(after, [0u8; 64], "wrote past the buffer");
    }

    #[test]
    fn hostile_buffers_get_nothing() {
        let (_, used) = run(&[(0x2000_0000, 64, F_WRITE)]);
        assert_eq!(used, 0);
        let (mem, used) = run(&[(0x8000, 0x20_0000, F_WRITE)]);
        assert_eq!(used, 0);
        let mut a = [0u8; 16];
        mem.read_slice(&mut a, GuestAddress(0x8000)).unwrap();
        assert_eq!(a, [0u8; 16]);
        // A huge but valid buffer gets at most the cap.
        let (_, used) = run(&[(0x1_0000, 0x8_0000, F_WRITE)]);
        assert_eq!(used as usize, MAX_BYTES_PER_REQUEST);
    }
}

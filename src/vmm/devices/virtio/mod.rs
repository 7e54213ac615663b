//! virtio devices and their MMIO transport.

pub mod blk;
pub mod device;
pub mod mmio;
pub mod rng;
pub mod vsock;

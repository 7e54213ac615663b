//! Emulated devices of the microVM.

pub mod console;
pub mod i8042;
pub mod serial;
pub mod virtio;

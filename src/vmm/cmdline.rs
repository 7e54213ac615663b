//! The guest kernel command line.

use crate::host_kvm::KvmFlavor;
use crate::vmm::devices::virtio::{blk, rng, vsock};
use crate::vmm::layout::MMIO_DEVICE_SIZE;
use crate::vmm::x86_64::cpuid::{PVM_CMDLINE, PVM_USER_ENV};

/// Options for every airlock guest. `reboot=k` makes the kernel reset through
/// the i8042, which the VMM takes as the guest's orderly exit; `panic=-1`
/// resets at once on a panic, which the VMM reports as one.
const BASE: &str = "console=ttyS0 8250.nr_uarts=1 quiet reboot=k panic=-1 root=/dev/vda ro rootfstype=ext4 \
                    random.trust_cpu=off random.trust_bootloader=off";

/// A short fingerprint of what a guest booted on `flavor` bakes into a
/// template: its command line (the PVM options only on kvm_pvm), its
/// CPUID profile and the virtio features its drivers could accept.
/// Templates are kept apart by it, so changing any of them, or
/// moving the cache to the other kind of KVM, makes new ones.
pub fn profile_fingerprint(flavor: KvmFlavor) -> String {
    use sha2::{Digest, Sha256};
    let cmdline = build(flavor, "", &[], "");
    let profile = crate::vmm::x86_64::cpuid::CpuidProfile::for_flavor(flavor);
    let virtio = [blk::FEATURES, rng::FEATURES, vsock::FEATURES];
    let digest = Sha256::digest(format!(
        "{}\n{profile:?}\n{cmdline}\n{virtio:x?}",
        flavor.key()
    ));
    digest[..4].iter().map(|b| format!("{b:02x}")).collect()
}

/// A virtio-mmio device as the kernel's `virtio_mmio.device=` parameter wants it.
pub struct MmioDeviceArg {
    pub base: u64,
    pub irq: u32,
}

pub fn build(flavor: KvmFlavor, init: &str, devices: &[MmioDeviceArg], extra: &str) -> String {
    let mut parts = vec![BASE.to_string()];
    if flavor == KvmFlavor::SoftwareNestedPvm {
        parts.push(PVM_CMDLINE.to_string());
        parts.push(
            PVM_USER_ENV
                .split_whitespace()
                .collect::<Vec<_>>()
                .join(" "),
        );
    }
    parts.push(format!("init={init}"));
    for dev in devices {
        parts.push(format!(
            "virtio_mmio.device={}K@{:#x}:{}",
            MMIO_DEVICE_SIZE >> 10,
            dev.base,
            dev.irq
        ));
    }
    if !extra.trim().is_empty() {
        parts.push(extra.trim().to_string());
    }
    parts.join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pvm_profile_only_on_pvm_hosts() {
        let dev = [MmioDeviceArg {
            base: 0xd000_0000,
            irq: 5,
        }];
        let pvm = build(KvmFlavor::SoftwareNestedPvm, "/init", &dev, "quiet");
        assert!(pvm.contains("clearcpuid=") && pvm.contains("noxsave"));
        assert!(pvm.contains(" AIRLOCK_NO_AVX=1 GLIBC_TUNABLES=glibc.cpu.hwcaps=-AVX,"));
        assert!(!pvm.contains("  "), "{pvm}");
        assert!(pvm.contains("virtio_mmio.device=4K@0xd0000000:5"));
        assert!(pvm.ends_with("quiet"));
        let hw = build(KvmFlavor::Hardware, "/init", &dev, "");
        assert!(!hw.contains("clearcpuid") && !hw.contains("AIRLOCK_NO_AVX"));
        assert!(hw.contains("init=/init"));
    }

    #[test]
    fn each_kind_of_kvm_has_its_own_fingerprint() {
        let hw = profile_fingerprint(KvmFlavor::Hardware);
        let pvm = profile_fingerprint(KvmFlavor::SoftwareNestedPvm);
        assert_ne!(hw, pvm);
        assert_eq!(hw, profile_fingerprint(KvmFlavor::Hardware));
    }
}

//! The CPUID a guest sees: KVM's supported set, with per-vCPU topology, and
//! on a software-nested host (kvm_pvm) without the features whose
//! instructions that host's emulator cannot run (see KVM-NOTES).

use kvm_bindings::{CpuId, kvm_cpuid_entry2};

/// Which CPUID profile to apply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CpuidProfile {
    /// Hardware KVM: the supported set, untouched but for topology.
    Hardware,
    /// kvm_pvm: hide features the emulator cannot run, advertise xsaveerptr.
    SoftwareNestedPvm,
}

impl CpuidProfile {
    pub fn for_flavor(flavor: crate::host_kvm::KvmFlavor) -> CpuidProfile {
        match flavor {
            crate::host_kvm::KvmFlavor::Hardware => CpuidProfile::Hardware,
            crate::host_kvm::KvmFlavor::SoftwareNestedPvm => CpuidProfile::SoftwareNestedPvm,
        }
    }
}

/// A feature bit in one CPUID register of one leaf.
#[derive(Debug, Clone, Copy)]
struct Feature {
    leaf: u32,
    subleaf: u32,
    reg: Reg,
    bit: u32,
}

#[derive(Debug, Clone, Copy)]
enum Reg {
    Ebx,
    Ecx,
    Edx,
}

const fn feature(leaf: u32, subleaf: u32, reg: Reg, bit: u32) -> Feature {
    Feature {
        leaf,
        subleaf,
        reg,
        bit,
    }
}

/// Features whose instructions kvm_pvm's emulator lacks, or that make the
/// kernel take paths that use them (pni, xsave, smap, ...).
const PVM_HIDDEN: &[Feature] = &[
    feature(1, 0, Reg::Ecx, 0),            // pni (SSE3)
    feature(1, 0, Reg::Ecx, 23),           // popcnt
    feature(1, 0, Reg::Ecx, 26),           // xsave
    feature(1, 0, Reg::Ecx, 27),           // osxsave
    feature(1, 0, Reg::Ecx, 28),           // avx
    feature(1, 0, Reg::Ecx, 30),           // rdrand
    feature(7, 0, Reg::Ebx, 0),            // fsgsbase
    feature(7, 0, Reg::Ebx, 5),            // avx2
    feature(7, 0, Reg::Ebx, 7),            // smep
    feature(7, 0, Reg::Ebx, 9),            // erms
    feature(7, 0, Reg::Ebx, 10),           // invpcid
    feature(7, 0, Reg::Ebx, 20),           // smap
    feature(7, 0, Reg::Ecx, 2),            // umip
    feature(7, 0, Reg::Ecx, 22),           // rdpid
    feature(7, 0, Reg::Edx, 4),            // fsrm
    feature(7, 0, Reg::Edx, 29),           // arch_capabilities
    feature(0x8000_0001, 0, Reg::Edx, 27), // rdtscp
];

/// Without it the kernel runs its AMD FXSAVE-leak workaround (fnclex, emms,
/// fild), which the emulator cannot run.
const PVM_ADDED: &[Feature] = &[feature(0x8000_0008, 0, Reg::Ebx, 2)]; // xsaveerptr

const HYPERVISOR_BIT: Feature = feature(1, 0, Reg::Ecx, 31);

/// Init's environment on kvm_pvm (the kernel hands unknown `NAME=value`
/// parameters to init, and the agent passes these on to everything it
/// starts). The guest kernel saves only the FXSAVE state (x87, SSE) across a
/// context switch, since the emulator cannot run XRSTOR; yet guest user
/// space runs CPUID natively and sees the host's AVX, AVX2 and AVX-512.
/// Libraries that use them then lose the upper vector state whenever a task
/// is preempted, and leak it across processes: glibc's memcpy came back with
/// 64-byte runs of zeros or of another process's bytes, and node crashed.
/// So every CPU-dispatching library here is told to stay with SSE: glibc's
/// string functions, OpenSSL, numpy, OpenBLAS, node's simdutf, and V8 (`AIRLOCK_NO_AVX`
/// makes the agent pass node its flags). glibc keeps `rep movsb` (ERMS):
/// it copies without vector registers, and with SSE loops instead the
/// agent's large copies still came back corrupted here.
pub const PVM_USER_ENV: &str = "AIRLOCK_NO_AVX=1 \
    GLIBC_TUNABLES=glibc.cpu.hwcaps=-AVX,-AVX2,-AVX512F,-AVX512VL,-AVX512BW,-AVX512DQ,-AVX512CD,-AVX_VNNI,-AVX512_VNNI,-FMA,-FMA4,-F16C \
    OPENSSL_ia32cap=~0x1800100000000000:~0x00005e42d0230020 \
    NPY_DISABLE_CPU_FEATURES=AVX,F16C,FMA3,AVX2,AVX512F,AVX512CD,AVX512_SKX,AVX512_CLX,AVX512_CNL,AVX512_ICL \
    OPENBLAS_CORETYPE=Nehalem \
    SIMDUTF_FORCE_IMPLEMENTATION=westmere";

/// The kernel command line that goes with the PVM profile.
pub const PVM_CMDLINE: &str = "noxsave clearcpuid=smap,smep,fsgsbase,popcnt,rdrand,invpcid,xsave,avx,avx2,rdtscp,rdpid,umip,erms,fsrm no_timer_check tsc=reliable lpj=5192244 mitigations=off";

fn reg_mut(entry: &mut kvm_cpuid_entry2, reg: Reg) -> &mut u32 {
    match reg {
        Reg::Ebx => &mut entry.ebx,
        Reg::Ecx => &mut entry.ecx,
        Reg::Edx => &mut entry.edx,
    }
}

fn matches(entry: &kvm_cpuid_entry2, f: &Feature) -> bool {
    entry.function == f.leaf && (entry.index == f.subleaf || !has_subleaves(f.leaf))
}

fn has_subleaves(leaf: u32) -> bool {
    matches!(leaf, 4 | 7 | 0xb | 0xd | 0x1f | 0x8000_001d)
}

/// Adjusts `cpuid` (from KVM_GET_SUPPORTED_CPUID) for vCPU `cpu_index` of `cpu_count`.
pub fn adjust(cpuid: &mut CpuId, profile: CpuidProfile, cpu_index: u8, cpu_count: u8) {
    for entry in cpuid.as_mut_slice() {
        set_bit(entry, HYPERVISOR_BIT, true);
        match entry.function {
            1 => {
                // Initial APIC id and the number of logical processors.
                entry.ebx = (entry.ebx & 0x0000_ffff)
                    | (u32::from(cpu_index) << 24)
                    | (u32::from(cpu_count) << 16);
                if cpu_count > 1 {
                    entry.edx |= 1 << 28; // htt: the count above is valid
                }
            }
            0xb | 0x1f => {
                entry.edx = u32::from(cpu_index); // x2APIC id
            }
            _ => {}
        }
        if profile == CpuidProfile::SoftwareNestedPvm {
            for f in PVM_HIDDEN {
                set_bit(entry, *f, false);
            }
            for f in PVM_ADDED {
                set_bit(entry, *f, true);
            }
        }
    }
}

fn set_bit(entry: &mut kvm_cpuid_entry2, f: Feature, on: bool) {
    if matches(entry, &f) {
        let reg = reg_mut(entry, f.reg);
        if on {
            *reg |= 1 << f.bit;
        } else {
            *reg &= !(1 << f.bit);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32, index: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            eax: 0,
            ebx: !0,
            ecx: !0,
            edx: !0,
            ..Default::default()
        }
    }

    #[test]
    fn pvm_profile_hides_and_adds_features() {
        let mut cpuid =
            CpuId::from_entries(&[entry(1, 0), entry(7, 0), entry(0x8000_0008, 0)]).unwrap();
        for e in cpuid.as_mut_slice() {
            if e.function == 0x8000_0008 {
                e.ebx = 0;
            }
        }
        adjust(&mut cpuid, CpuidProfile::SoftwareNestedPvm, 2, 4);
        let entries = cpuid.as_slice();
        assert_eq!(entries[0].ecx & (1 << 23), 0, "popcnt hidden");
        assert_ne!(entries[0].ecx & (1 << 31), 0, "hypervisor bit");
        assert_eq!(entries[0].ebx >> 24, 2, "apic id");
        assert_eq!(entries[1].ebx & (1 << 20), 0, "smap hidden");
        assert_ne!(entries[2].ebx & (1 << 2), 0, "xsaveerptr added");
    }

    #[test]
    fn hardware_profile_keeps_features() {
        let mut cpuid = CpuId::from_entries(&[entry(7, 0)]).unwrap();
        adjust(&mut cpuid, CpuidProfile::Hardware, 0, 1);
        assert_ne!(cpuid.as_slice()[0].ebx & (1 << 20), 0);
    }
}

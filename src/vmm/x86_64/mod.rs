//! x86-64 specifics: boot protocol, CPU registers, CPUID, MSRs, MP table.

pub mod boot_params;
pub mod cpuid;
pub mod mptable;
pub mod regs;

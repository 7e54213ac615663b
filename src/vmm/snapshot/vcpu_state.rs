//! One vCPU's architectural state, saved while it is stopped outside KVM_RUN.

use kvm_bindings::{
    CpuId, KVM_MAX_CPUID_ENTRIES, Msrs, kvm_cpuid_entry2, kvm_debugregs, kvm_lapic_state,
    kvm_mp_state, kvm_msr_entry, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave,
};
use kvm_ioctls::{Kvm, VcpuFd};
use serde::{Deserialize, Serialize};

use super::{SnapshotError, kvm_error};

#[derive(Debug, Serialize, Deserialize)]
pub struct VcpuState {
    pub cpuid: Vec<kvm_cpuid_entry2>,
    pub mp_state: kvm_mp_state,
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    pub xsave: kvm_xsave,
    pub xcrs: kvm_xcrs,
    pub debug_regs: kvm_debugregs,
    pub lapic: kvm_lapic_state,
    pub msrs: Vec<kvm_msr_entry>,
    pub events: kvm_vcpu_events,
}

impl VcpuState {
    /// `msr_indices` comes from KVM_GET_MSR_INDEX_LIST.
    pub fn save(vcpu: &VcpuFd, msr_indices: &[u32]) -> Result<VcpuState, SnapshotError> {
        let cpuid = vcpu
            .get_cpuid2(KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm_error("KVM_GET_CPUID2"))?;
        Ok(VcpuState {
            cpuid: cpuid.as_slice().to_vec(),
            mp_state: vcpu.get_mp_state().map_err(kvm_error("KVM_GET_MP_STATE"))?,
            regs: vcpu.get_regs().map_err(kvm_error("KVM_GET_REGS"))?,
            sregs: vcpu.get_sregs().map_err(kvm_error("KVM_GET_SREGS"))?,
            xsave: vcpu.get_xsave().map_err(kvm_error("KVM_GET_XSAVE"))?,
            xcrs: vcpu.get_xcrs().map_err(kvm_error("KVM_GET_XCRS"))?,
            debug_regs: vcpu
                .get_debug_regs()
                .map_err(kvm_error("KVM_GET_DEBUGREGS"))?,
            lapic: vcpu.get_lapic().map_err(kvm_error("KVM_GET_LAPIC"))?,
            msrs: read_msrs(vcpu, msr_indices)?,
            events: vcpu
                .get_vcpu_events()
                .map_err(kvm_error("KVM_GET_VCPU_EVENTS"))?,
        })
    }

    /// Restores in the order KVM needs: CPUID first (it shapes what the
    /// other state may hold), LAPIC before MSRs (TSC deadline), events last.
    pub fn restore(&self, vcpu: &VcpuFd) -> Result<(), SnapshotError> {
        let cpuid = CpuId::from_entries(&self.cpuid).map_err(|_| {
            SnapshotError::Invalid(format!("{} CPUID entries are too many", self.cpuid.len()))
        })?;
        vcpu.set_cpuid2(&cpuid)
            .map_err(kvm_error("KVM_SET_CPUID2"))?;
        vcpu.set_mp_state(self.mp_state)
            .map_err(kvm_error("KVM_SET_MP_STATE"))?;
        vcpu.set_regs(&self.regs)
            .map_err(kvm_error("KVM_SET_REGS"))?;
        vcpu.set_sregs(&self.sregs)
            .map_err(kvm_error("KVM_SET_SREGS"))?;
        // SAFETY: the buffer is a kvm_xsave that KVM_GET_XSAVE filled on a vCPU
        // with the same CPUID (checked above by KVM_SET_CPUID2).
        unsafe { vcpu.set_xsave(&self.xsave) }.map_err(kvm_error("KVM_SET_XSAVE"))?;
        vcpu.set_xcrs(&self.xcrs)
            .map_err(kvm_error("KVM_SET_XCRS"))?;
        vcpu.set_debug_regs(&self.debug_regs)
            .map_err(kvm_error("KVM_SET_DEBUGREGS"))?;
        vcpu.set_lapic(&self.lapic)
            .map_err(kvm_error("KVM_SET_LAPIC"))?;
        let msrs = Msrs::from_entries(&self.msrs).map_err(|_| {
            SnapshotError::Invalid(format!("{} MSRs are too many", self.msrs.len()))
        })?;
        let set = vcpu.set_msrs(&msrs).map_err(kvm_error("KVM_SET_MSRS"))?;
        if set != self.msrs.len() {
            let failed = self.msrs.get(set).map_or(0, |m| m.index);
            return Err(SnapshotError::Invalid(format!(
                "KVM refused to restore MSR {failed:#x}"
            )));
        }
        vcpu.set_vcpu_events(&self.events)
            .map_err(kvm_error("KVM_SET_VCPU_EVENTS"))?;
        Ok(())
    }
}

/// The MSRs KVM can save on this host.
pub fn msr_indices(kvm: &Kvm) -> Result<Vec<u32>, SnapshotError> {
    let list = kvm
        .get_msr_index_list()
        .map_err(kvm_error("KVM_GET_MSR_INDEX_LIST"))?;
    Ok(list.as_slice().to_vec())
}

/// Reads every listed MSR the vCPU will give; KVM_GET_MSRS stops at the first
/// one it refuses, so that one is dropped and the rest read again.
fn read_msrs(vcpu: &VcpuFd, indices: &[u32]) -> Result<Vec<kvm_msr_entry>, SnapshotError> {
    let mut saved = Vec::with_capacity(indices.len());
    let mut rest: &[u32] = indices;
    while !rest.is_empty() {
        let entries: Vec<kvm_msr_entry> = rest
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs = Msrs::from_entries(&entries)
            .map_err(|_| SnapshotError::Invalid("too many MSRs".into()))?;
        let read = vcpu
            .get_msrs(&mut msrs)
            .map_err(kvm_error("KVM_GET_MSRS"))?;
        saved.extend_from_slice(&msrs.as_slice()[..read]);
        rest = rest.get(read + 1..).unwrap_or(&[]);
    }
    Ok(saved)
}

//! Counters of what the VMM did for its guest: KVM exits by reason and
//! interrupts injected. They do not depend on how fast the host's emulator
//! is, so benchmarks compare them across hosts.

use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;

static INTERRUPTS: AtomicU64 = AtomicU64::new(0);
static WORKING_SET: [AtomicU64; 3] = [const { AtomicU64::new(0) }; 3];
static EXITS: [AtomicU64; ExitKind::COUNT] = [const { AtomicU64::new(0) }; ExitKind::COUNT];

/// The KVM exit reasons the VMM tells apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitKind {
    IoIn,
    IoOut,
    MmioRead,
    MmioWrite,
    Hlt,
    Shutdown,
    InternalError,
    FailEntry,
    SystemEvent,
    Interrupted,
    Other,
}

impl ExitKind {
    const COUNT: usize = 11;
    const ALL: [ExitKind; ExitKind::COUNT] = [
        ExitKind::IoIn,
        ExitKind::IoOut,
        ExitKind::MmioRead,
        ExitKind::MmioWrite,
        ExitKind::Hlt,
        ExitKind::Shutdown,
        ExitKind::InternalError,
        ExitKind::FailEntry,
        ExitKind::SystemEvent,
        ExitKind::Interrupted,
        ExitKind::Other,
    ];

    fn name(self) -> &'static str {
        match self {
            ExitKind::IoIn => "io_in",
            ExitKind::IoOut => "io_out",
            ExitKind::MmioRead => "mmio_read",
            ExitKind::MmioWrite => "mmio_write",
            ExitKind::Hlt => "hlt",
            ExitKind::Shutdown => "shutdown",
            ExitKind::InternalError => "internal_error",
            ExitKind::FailEntry => "fail_entry",
            ExitKind::SystemEvent => "system_event",
            ExitKind::Interrupted => "interrupted",
            ExitKind::Other => "other",
        }
    }
}

pub fn count_exit(kind: ExitKind) {
    EXITS[kind as usize].fetch_add(1, Ordering::Relaxed);
}

/// What mapping a restored template's working set did before the vCPUs ran.
pub fn record_working_set(populated_pages: u64, prefaulted_pages: u64, micros: u64) {
    for (slot, value) in WORKING_SET
        .iter()
        .zip([populated_pages, prefaulted_pages, micros])
    {
        slot.store(value, Ordering::Relaxed);
    }
}

pub fn count_interrupt() {
    INTERRUPTS.fetch_add(1, Ordering::Relaxed);
}

/// A snapshot of the counters.
#[derive(Debug, Clone, Default, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct Stats {
    pub exits_total: u64,
    pub exits: std::collections::BTreeMap<String, u64>,
    pub interrupts_injected: u64,
    /// KVM's own counters (see `kvm_stats`): `kvm_pf_taken`, `kvm_pf_fixed`,
    /// `kvm_exits` (summed over vCPUs), `kvm_pages_4k`...; empty where KVM
    /// has no statistics interface.
    #[serde(default)]
    pub kvm: std::collections::BTreeMap<String, u64>,
    /// The template's working set, mapped at restore (see
    /// `snapshot::working_set`): pages copied for writing, pages entered in
    /// KVM's page tables, and the time it took.
    #[serde(default)]
    pub working_set: WorkingSetStats,
}

#[derive(Debug, Clone, Copy, Default, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct WorkingSetStats {
    pub populated_pages: u64,
    pub prefaulted_pages: u64,
    pub micros: u64,
}

pub fn snapshot() -> Stats {
    let mut exits = std::collections::BTreeMap::new();
    let mut total = 0;
    for kind in ExitKind::ALL {
        let n = EXITS[kind as usize].load(Ordering::Relaxed);
        total += n;
        if n > 0 {
            exits.insert(kind.name().to_string(), n);
        }
    }
    Stats {
        exits_total: total,
        exits,
        interrupts_injected: INTERRUPTS.load(Ordering::Relaxed),
        kvm: super::kvm_stats::snapshot(),
        working_set: WorkingSetStats {
            populated_pages: WORKING_SET[0].load(Ordering::Relaxed),
            prefaulted_pages: WORKING_SET[1].load(Ordering::Relaxed),
            micros: WORKING_SET[2].load(Ordering::Relaxed),
        },
    }
}

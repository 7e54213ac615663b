//! Builds a microVM: the KVM VM, guest memory, the kernel, devices and
//! vCPUs, ready to run.

use std::fs::File;
use std::os::fd::{FromRawFd, IntoRawFd, OwnedFd};
use std::sync::{Arc, Mutex};

use kvm_bindings::{
    KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY, kvm_pit_config, kvm_userspace_memory_region,
};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use linux_loader::loader::{KernelLoader, elf::Elf};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use crate::host_kvm::KvmFlavor;
use crate::vmm::bus::Bus;
use crate::vmm::cmdline::{self, MmioDeviceArg};
use crate::vmm::config::VmmConfig;
use crate::vmm::devices::console::{ConsoleSink, ConsoleTail};
use crate::vmm::devices::i8042::{self, I8042};
use crate::vmm::devices::serial::{self, SerialDevice};
use crate::vmm::devices::virtio::blk::Block;
use crate::vmm::devices::virtio::device::{GuestMemory, Interrupt, VirtioDevice};
use crate::vmm::devices::virtio::mmio::MmioTransport;
use crate::vmm::devices::virtio::rng::Rng;
use crate::vmm::devices::virtio::vsock::{Vsock, VsockHandle};
use crate::vmm::event::VmEventSender;
use crate::vmm::layout::{
    HIGH_MEMORY_START, KVM_IDENTITY_MAP_ADDR, KVM_TSS_ADDR, MMIO_DEVICE_SIZE, MMIO_START,
    SERIAL_IRQ, VIRTIO_FIRST_IRQ,
};
use crate::vmm::snapshot::identity::ImageIdentity;
use crate::vmm::snapshot::{self, MachineState, SnapshotError};
use crate::vmm::x86_64::cpuid::{self, CpuidProfile};
use crate::vmm::x86_64::{boot_params, mptable, regs};

/// The guest's vsock context id (2 is the host; 3 is the first guest id).
pub const GUEST_CID: u64 = 3;

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("{0}")]
    Kvm(#[from] crate::host_kvm::KvmAccessError),
    #[error("KVM refused {what}: {source}")]
    Ioctl {
        what: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error(transparent)]
    Config(#[from] crate::vmm::config::ConfigError),
    #[error("cannot allocate {bytes} bytes of guest memory: {reason}")]
    Memory { bytes: u64, reason: String },
    #[error("cannot open the kernel {path}: {source}")]
    KernelOpen {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot load the kernel {path}: {reason}")]
    KernelLoad { path: String, reason: String },
    #[error(transparent)]
    BootParams(#[from] boot_params::BootParamsError),
    #[error(transparent)]
    Mptable(#[from] mptable::MptableError),
    #[error(transparent)]
    Regs(#[from] regs::RegsError),
    #[error(transparent)]
    Block(#[from] crate::vmm::devices::virtio::blk::BlockError),
    #[error("cannot set up the vsock device: {0}")]
    Vsock(String),
    #[error("cannot create an eventfd: {0}")]
    EventFd(std::io::Error),
    #[error("cannot open the console log {path}: {source}")]
    ConsoleLog {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("device layout: {0}")]
    Layout(String),
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
}

fn ioctl(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> BuildError {
    move |source| BuildError::Ioctl { what, source }
}

/// A VM ready to run: hand the vCPUs to threads and the buses to them too.
pub struct Machine {
    pub vm: VmFd,
    pub vcpus: Vec<VcpuFd>,
    pub pio: Bus,
    pub mmio: Bus,
    pub mem: GuestMemory,
    pub console_tail: ConsoleTail,
    pub cmdline: String,
    pub serial: Arc<Mutex<SerialDevice>>,
    pub transports: Vec<Arc<Mutex<MmioTransport>>>,
    pub vsock: VsockHandle,
    /// MSRs a snapshot saves.
    pub msr_indices: Arc<Vec<u32>>,
    pub identity: ImageIdentity,
    /// Set when memory maps a snapshot copy-on-write: its snapshots are
    /// then diffs over that one.
    pub diff_base: Option<DiffBase>,
}

/// What a diff snapshot of a restored VM needs.
pub struct DiffBase {
    /// The checksum of the base snapshot's state file.
    pub state_checksum: String,
    /// Where the written pages are found; `None` if it could not be opened
    /// (a diff snapshot then fails, saying why).
    pub pagemap: Option<snapshot::dirty::PageMap>,
    /// The ranges a resume mapped from its saved state: saved again by the
    /// next diff, written or not.
    pub inherited: Vec<snapshot::dirty::PageRange>,
}

impl Machine {
    pub fn memory_bytes(&self) -> u64 {
        self.mem.iter().map(|r| r.len()).sum()
    }
}

/// /dev/kvm: the fd a jail opened before it hid the device, or opened here.
fn open_kvm(opened: Option<OwnedFd>) -> Result<Kvm, BuildError> {
    if let Some(fd) = opened {
        // SAFETY: the fd is an open /dev/kvm that we own and hand over.
        return Ok(unsafe { Kvm::from_raw_fd(fd.into_raw_fd()) });
    }
    let device = crate::host_kvm::kvm_device_path();
    crate::host_kvm::check_kvm_access(&device)?;
    let path = std::ffi::CString::new(device.as_os_str().as_encoded_bytes())
        .map_err(|e| BuildError::Layout(e.to_string()))?;
    Kvm::new_with_path(path).map_err(ioctl("opening /dev/kvm"))
}

fn create_vm(kvm: &Kvm) -> Result<VmFd, BuildError> {
    let vm = kvm.create_vm().map_err(ioctl("KVM_CREATE_VM"))?;
    vm.set_tss_address(KVM_TSS_ADDR)
        .map_err(ioctl("KVM_SET_TSS_ADDR"))?;
    vm.set_identity_map_address(KVM_IDENTITY_MAP_ADDR)
        .map_err(ioctl("KVM_SET_IDENTITY_MAP_ADDR"))?;
    vm.create_irq_chip().map_err(ioctl("KVM_CREATE_IRQCHIP"))?;
    let pit = kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    };
    vm.create_pit2(pit).map_err(ioctl("KVM_CREATE_PIT2"))?;
    Ok(vm)
}

/// Boots a new VM from the kernel.
pub fn build(
    config: &VmmConfig,
    flavor: KvmFlavor,
    kvm: Option<OwnedFd>,
    events: VmEventSender,
) -> Result<Machine, BuildError> {
    let mem_bytes = config.memory_bytes()?;
    let kvm = open_kvm(kvm)?;
    let vm = create_vm(&kvm)?;
    let identity = ImageIdentity::of(&config.kernel, &config.rootfs)?;
    let mem = create_memory(&vm, mem_bytes)?;
    let entry = load_kernel(&mem, config)?;

    let console_tail = ConsoleTail::default();
    let devices = create_devices(&vm, &mem, config, console_tail.clone(), events, None)?;

    let init = config
        .init
        .as_deref()
        .unwrap_or(airlock_protocol::AGENT_GUEST_PATH);
    let cmdline = cmdline::build(flavor, init, &devices.mmio_args, &config.extra_cmdline);
    boot_params::write(&mem, &cmdline, mem_bytes)?;
    mptable::write(&mem, config.vcpus)?;
    regs::write_boot_tables(&mem)?;

    let profile = CpuidProfile::for_flavor(flavor);
    let supported = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(ioctl("KVM_GET_SUPPORTED_CPUID"))?;
    let mut vcpus = Vec::with_capacity(usize::from(config.vcpus));
    for index in 0..config.vcpus {
        let vcpu = vm
            .create_vcpu(u64::from(index))
            .map_err(ioctl("KVM_CREATE_VCPU"))?;
        let mut cpuid = supported.clone();
        cpuid::adjust(&mut cpuid, profile, index, config.vcpus);
        vcpu.set_cpuid2(&cpuid).map_err(ioctl("KVM_SET_CPUID2"))?;
        regs::setup_msrs(&vcpu)?;
        regs::setup_fpu(&vcpu)?;
        regs::setup_lapic(&vcpu)?;
        if index == 0 {
            regs::setup_boot_vcpu(&vcpu, entry)?;
        }
        vcpus.push(vcpu);
    }
    register_kvm_stats(&vm, &vcpus);
    Ok(Machine {
        vm,
        vcpus,
        pio: devices.pio,
        mmio: devices.mmio,
        mem,
        console_tail,
        cmdline,
        serial: devices.serial,
        transports: devices.transports,
        vsock: devices.vsock,
        msr_indices: Arc::new(snapshot::vcpu_state::msr_indices(&kvm)?),
        identity,
        diff_base: None,
    })
}

/// The state saved in the diff snapshot `resume`, checked against its base.
fn resumed_state(
    base: &MachineState,
    base_checksum: &str,
    resume: &std::path::Path,
) -> Result<MachineState, SnapshotError> {
    let state = snapshot::read_state(resume)?;
    let Some(overlay) = &state.overlay else {
        return Err(SnapshotError::Invalid(format!(
            "{} is not a diff snapshot",
            resume.display()
        )));
    };
    if overlay.base_state_checksum != base_checksum {
        return Err(SnapshotError::Invalid(format!(
            "{} was taken over another template than this one",
            resume.display()
        )));
    }
    if state.memory_bytes != base.memory_bytes {
        return Err(SnapshotError::Invalid(format!(
            "{} has {} bytes of memory, its base {}",
            resume.display(),
            state.memory_bytes,
            base.memory_bytes
        )));
    }
    Ok(state)
}

/// Restores a VM from the snapshot in `dir` instead of booting it. The VM
/// state goes in before the vCPUs', as KVM wants the irqchip before LAPICs.
/// Restores the snapshot in `dir`, or with `config.resume` the diff
/// snapshot taken over it. `pagemap` is the jail's (or `None`: opened here).
pub fn restore(
    config: &VmmConfig,
    dir: &std::path::Path,
    kvm: Option<OwnedFd>,
    pagemap: Option<OwnedFd>,
    events: VmEventSender,
) -> Result<Machine, BuildError> {
    let (base, base_checksum) = snapshot::read_state_and_checksum(dir)?;
    let state = match &config.resume {
        Some(resume) => resumed_state(&base, &base_checksum, resume)?,
        None if base.overlay.is_some() => {
            return Err(SnapshotError::Invalid(format!(
                "{} is a diff snapshot; restore its base and resume it",
                dir.display()
            ))
            .into());
        }
        None => base,
    };
    let identity = ImageIdentity::of(&config.kernel, &config.rootfs)?;
    state.image.check_matches(&identity)?;
    if state.vcpus.is_empty() || state.vcpus.len() > usize::from(crate::vmm::config::MAX_VCPUS) {
        return Err(
            SnapshotError::Invalid(format!("a snapshot with {} vCPUs", state.vcpus.len())).into(),
        );
    }
    let kvm = open_kvm(kvm)?;
    let vm = create_vm(&kvm)?;
    let mem = snapshot::memory::map_private(&snapshot::memory_path(dir), state.memory_bytes)?;
    snapshot::working_set::advise_random(&mem);
    let mut inherited = Vec::new();
    if let (Some(resume), Some(overlay)) = (&config.resume, &state.overlay) {
        snapshot::overlay::apply(&mem, overlay, &resume.join(snapshot::overlay::OVERLAY_FILE))?;
        inherited = overlay.ranges.clone();
    }
    register_memory(&vm, &mem)?;
    let pagemap = match pagemap {
        Some(fd) => Some(snapshot::dirty::PageMap::from_fd(fd)),
        None => snapshot::dirty::PageMap::open()
            .inspect_err(|e| tracing::warn!("no page map, so no diff snapshots: {e}"))
            .ok(),
    };

    let console_tail = ConsoleTail::default();
    let devices = create_devices(
        &vm,
        &mem,
        config,
        console_tail.clone(),
        events,
        Some(&state),
    )?;
    state.vm.restore(&vm)?;
    let mut vcpus = Vec::with_capacity(state.vcpus.len());
    for (index, saved) in state.vcpus.iter().enumerate() {
        let vcpu = vm
            .create_vcpu(index as u64)
            .map_err(ioctl("KVM_CREATE_VCPU"))?;
        saved.restore(&vcpu)?;
        vcpus.push(vcpu);
    }
    register_kvm_stats(&vm, &vcpus);
    if config.resume.is_none() {
        map_working_set(dir, &state, &vm, &vcpus, &mem);
    }
    // Connections the guest had at snapshot time point nowhere now.
    devices.vsock.send_transport_reset();
    Ok(Machine {
        vm,
        vcpus,
        pio: devices.pio,
        mmio: devices.mmio,
        mem,
        console_tail,
        cmdline: state.cmdline,
        serial: devices.serial,
        transports: devices.transports,
        vsock: devices.vsock,
        msr_indices: Arc::new(snapshot::vcpu_state::msr_indices(&kvm)?),
        identity,
        diff_base: Some(DiffBase {
            state_checksum: base_checksum,
            pagemap,
            inherited,
        }),
    })
}

/// Maps the template's working set, if it recorded one, before the vCPUs
/// run (see `snapshot::working_set`).
fn map_working_set(
    dir: &std::path::Path,
    state: &MachineState,
    vm: &VmFd,
    vcpus: &[VcpuFd],
    mem: &GuestMemory,
) {
    use snapshot::working_set::{WorkingSet, apply, kvm_can_prefault};
    match WorkingSet::load(dir, state.memory_bytes) {
        Ok(Some(set)) => apply(&set, mem, vcpus.first().filter(|_| kvm_can_prefault(vm))),
        Ok(None) => {}
        Err(err) => tracing::warn!(%err, "the template's working set is not used"),
    }
}

fn create_memory(vm: &VmFd, bytes: u64) -> Result<GuestMemory, BuildError> {
    let memory_error = |reason: String| BuildError::Memory { bytes, reason };
    let len = usize::try_from(bytes).map_err(|e| memory_error(e.to_string()))?;
    let mem = GuestMemory::from_ranges(&[(GuestAddress(0), len)])
        .map_err(|e| memory_error(e.to_string()))?;
    register_memory(vm, &mem)?;
    Ok(mem)
}

fn register_memory(vm: &VmFd, mem: &GuestMemory) -> Result<(), BuildError> {
    for (slot, region) in mem.iter().enumerate() {
        let host = mem
            .get_host_address(region.start_addr())
            .map_err(|e| BuildError::Memory {
                bytes: region.len(),
                reason: e.to_string(),
            })?;
        let region = kvm_userspace_memory_region {
            slot: slot as u32,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: host as u64,
            flags: 0,
        };
        // SAFETY: the mapping lives in `mem`, which outlives the VM's use of it
        // (both live until the process exits).
        unsafe { vm.set_user_memory_region(region) }
            .map_err(ioctl("KVM_SET_USER_MEMORY_REGION"))?;
    }
    Ok(())
}

fn load_kernel(mem: &GuestMemory, config: &VmmConfig) -> Result<u64, BuildError> {
    let path = config.kernel.display().to_string();
    let mut file = File::open(&config.kernel).map_err(|source| BuildError::KernelOpen {
        path: path.clone(),
        source,
    })?;
    let loaded =
        Elf::load(mem, None, &mut file, Some(GuestAddress(HIGH_MEMORY_START))).map_err(|e| {
            BuildError::KernelLoad {
                path: path.clone(),
                reason: e.to_string(),
            }
        })?;
    Ok(loaded.kernel_load.0)
}

struct Devices {
    pio: Bus,
    mmio: Bus,
    mmio_args: Vec<MmioDeviceArg>,
    serial: Arc<Mutex<SerialDevice>>,
    transports: Vec<Arc<Mutex<MmioTransport>>>,
    vsock: VsockHandle,
}

fn create_devices(
    vm: &VmFd,
    mem: &GuestMemory,
    config: &VmmConfig,
    console_tail: ConsoleTail,
    events: VmEventSender,
    saved: Option<&MachineState>,
) -> Result<Devices, BuildError> {
    let mut pio = Bus::default();
    let mut mmio = Bus::default();

    let open_log = |path: &std::path::Path| {
        File::options()
            .create(true)
            .append(true)
            .open(path)
            .and_then(|file| file.set_len(0).map(|()| file))
    };
    let log = match &config.console_log {
        Some(path) => Some(open_log(path).map_err(|source| BuildError::ConsoleLog {
            path: path.display().to_string(),
            source,
        })?),
        None => None,
    };
    let serial_irq = irqfd(vm, SERIAL_IRQ)?;
    let sink = ConsoleSink::new(log, config.console_max_bytes, console_tail, events);
    let serial = match saved {
        Some(state) => {
            SerialDevice::restore(serial_irq, sink, &state.serial).map_err(BuildError::Layout)?
        }
        None => SerialDevice::new(serial_irq, sink),
    };
    let serial = Arc::new(Mutex::new(serial));
    pio.insert(serial::COM1_PORT, serial::PORT_COUNT, serial.clone())
        .map_err(|e| BuildError::Layout(e.to_string()))?;
    pio.insert(
        i8042::DATA_PORT,
        i8042::PORT_SPAN,
        Arc::new(Mutex::new(I8042)),
    )
    .map_err(|e| BuildError::Layout(e.to_string()))?;

    let vsock = Vsock::new(
        GUEST_CID,
        config.vsock_socket.clone(),
        &config.vsock_forward,
    )
    .map_err(|e| BuildError::Vsock(e.to_string()))?;
    let vsock_handle = vsock.handle();
    let vsock_notify = vsock.notify_eventfd().map_err(BuildError::EventFd)?;
    let virtio: Vec<Box<dyn VirtioDevice>> = vec![
        Box::new(Block::open(&config.rootfs)?),
        Box::new(Rng::default()),
        Box::new(vsock),
    ];
    if let Some(state) = saved
        && state.transports.len() != virtio.len()
    {
        return Err(SnapshotError::Invalid(format!(
            "a snapshot with {} virtio devices, this VMM has {}",
            state.transports.len(),
            virtio.len()
        ))
        .into());
    }
    let mut args = Vec::new();
    let mut transports = Vec::new();
    for (i, device) in virtio.into_iter().enumerate() {
        let base = MMIO_START + i as u64 * MMIO_DEVICE_SIZE;
        if device.device_type() == crate::vmm::devices::virtio::device::TYPE_VSOCK {
            let notify = kvm_ioctls::IoEventAddress::Mmio(
                base + crate::vmm::devices::virtio::mmio::REG_QUEUE_NOTIFY,
            );
            vm.register_ioevent(&vsock_notify, &notify, kvm_ioctls::NoDatamatch)
                .map_err(ioctl("KVM_IOEVENTFD"))?;
        }
        let irq = VIRTIO_FIRST_IRQ + i as u32;
        let interrupt = Interrupt::new(irqfd(vm, irq)?);
        let mut transport = MmioTransport::new(device, mem.clone(), interrupt)
            .map_err(|e| BuildError::Layout(format!("virtio queue: {e}")))?;
        if let Some(state) = saved {
            transport
                .restore_state(&state.transports[i])
                .map_err(|e| SnapshotError::Invalid(format!("virtio device {i}: {e}")))?;
        }
        let transport = Arc::new(Mutex::new(transport));
        mmio.insert(base, MMIO_DEVICE_SIZE, transport.clone())
            .map_err(|e| BuildError::Layout(e.to_string()))?;
        transports.push(transport);
        args.push(MmioDeviceArg { base, irq });
    }
    Ok(Devices {
        pio,
        mmio,
        mmio_args: args,
        serial,
        transports,
        vsock: vsock_handle,
    })
}

fn irqfd(vm: &VmFd, gsi: u32) -> Result<EventFd, BuildError> {
    let fd = EventFd::new(libc::EFD_NONBLOCK).map_err(BuildError::EventFd)?;
    vm.register_irqfd(&fd, gsi).map_err(ioctl("KVM_IRQFD"))?;
    Ok(fd)
}

/// KVM's counters for this VM, read on `stats` requests (see `kvm_stats`).
fn register_kvm_stats(vm: &VmFd, vcpus: &[VcpuFd]) {
    use std::os::fd::AsRawFd;
    let vcpu_fds: Vec<i32> = vcpus.iter().map(AsRawFd::as_raw_fd).collect();
    crate::vmm::kvm_stats::register(vm.as_raw_fd(), &vcpu_fds);
}

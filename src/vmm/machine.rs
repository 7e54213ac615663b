//! Builds a microVM: the KVM VM, guest memory, the kernel, devices and
//! vCPUs, ready to run.

use std::fs::File;
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
use crate::vmm::devices::virtio::vsock::Vsock;
use crate::vmm::event::VmEventSender;
use crate::vmm::layout::{
    HIGH_MEMORY_START, KVM_IDENTITY_MAP_ADDR, KVM_TSS_ADDR, MMIO_DEVICE_SIZE, MMIO_START,
    SERIAL_IRQ, VIRTIO_FIRST_IRQ,
};
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
}

pub fn build(
    config: &VmmConfig,
    flavor: KvmFlavor,
    events: VmEventSender,
) -> Result<Machine, BuildError> {
    let mem_bytes = config.memory_bytes()?;
    crate::host_kvm::check_kvm_access(&crate::host_kvm::kvm_device_path())?;
    let kvm = Kvm::new_with_path(
        std::ffi::CString::new(
            crate::host_kvm::kvm_device_path()
                .as_os_str()
                .as_encoded_bytes(),
        )
        .map_err(|e| BuildError::Layout(e.to_string()))?,
    )
    .map_err(ioctl("opening /dev/kvm"))?;
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

    let mem = create_memory(&vm, mem_bytes)?;
    let entry = load_kernel(&mem, config)?;

    let console_tail = ConsoleTail::default();
    let (pio, mmio, mmio_args) = create_devices(&vm, &mem, config, console_tail.clone(), events)?;

    let init = config
        .init
        .as_deref()
        .unwrap_or(airlock_protocol::AGENT_GUEST_PATH);
    let cmdline = cmdline::build(flavor, init, &mmio_args, &config.extra_cmdline);
    boot_params::write(&mem, &cmdline, mem_bytes)?;
    mptable::write(&mem, config.vcpus)?;
    regs::write_boot_tables(&mem)?;

    let profile = match flavor {
        KvmFlavor::Hardware => CpuidProfile::Hardware,
        KvmFlavor::SoftwareNestedPvm => CpuidProfile::SoftwareNestedPvm,
    };
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
    Ok(Machine {
        vm,
        vcpus,
        pio,
        mmio,
        mem,
        console_tail,
        cmdline,
    })
}

fn create_memory(vm: &VmFd, bytes: u64) -> Result<GuestMemory, BuildError> {
    let len = usize::try_from(bytes).map_err(|e| BuildError::Memory {
        bytes,
        reason: e.to_string(),
    })?;
    let mem =
        GuestMemory::from_ranges(&[(GuestAddress(0), len)]).map_err(|e| BuildError::Memory {
            bytes,
            reason: e.to_string(),
        })?;
    for (slot, region) in mem.iter().enumerate() {
        let host = mem
            .get_host_address(region.start_addr())
            .map_err(|e| BuildError::Memory {
                bytes,
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
    Ok(mem)
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

type Devices = (Bus, Bus, Vec<MmioDeviceArg>);

fn create_devices(
    vm: &VmFd,
    mem: &GuestMemory,
    config: &VmmConfig,
    console_tail: ConsoleTail,
    events: VmEventSender,
) -> Result<Devices, BuildError> {
    let mut pio = Bus::default();
    let mut mmio = Bus::default();

    let log = match &config.console_log {
        Some(path) => Some(File::create(path).map_err(|source| BuildError::ConsoleLog {
            path: path.display().to_string(),
            source,
        })?),
        None => None,
    };
    let serial_irq = irqfd(vm, SERIAL_IRQ)?;
    let serial = SerialDevice::new(serial_irq, ConsoleSink::new(log, console_tail, events));
    pio.insert(
        serial::COM1_PORT,
        serial::PORT_COUNT,
        Arc::new(Mutex::new(serial)),
    )
    .map_err(|e| BuildError::Layout(e.to_string()))?;
    pio.insert(
        i8042::DATA_PORT,
        i8042::PORT_SPAN,
        Arc::new(Mutex::new(I8042)),
    )
    .map_err(|e| BuildError::Layout(e.to_string()))?;

    let vsock = Vsock::new(GUEST_CID, config.vsock_socket.clone())
        .map_err(|e| BuildError::Vsock(e.to_string()))?;
    let virtio: Vec<Box<dyn VirtioDevice>> = vec![
        Box::new(Block::open(&config.rootfs)?),
        Box::new(Rng::default()),
        Box::new(vsock),
    ];
    let mut args = Vec::new();
    for (i, device) in virtio.into_iter().enumerate() {
        let base = MMIO_START + i as u64 * MMIO_DEVICE_SIZE;
        let irq = VIRTIO_FIRST_IRQ + i as u32;
        let interrupt = Interrupt::new(irqfd(vm, irq)?);
        let transport = MmioTransport::new(device, mem.clone(), interrupt)
            .map_err(|e| BuildError::Layout(format!("virtio queue: {e}")))?;
        mmio.insert(base, MMIO_DEVICE_SIZE, Arc::new(Mutex::new(transport)))
            .map_err(|e| BuildError::Layout(e.to_string()))?;
        args.push(MmioDeviceArg { base, irq });
    }
    Ok((pio, mmio, args))
}

fn irqfd(vm: &VmFd, gsi: u32) -> Result<EventFd, BuildError> {
    let fd = EventFd::new(libc::EFD_NONBLOCK).map_err(BuildError::EventFd)?;
    vm.register_irqfd(&fd, gsi).map_err(ioctl("KVM_IRQFD"))?;
    Ok(fd)
}

//! The seccomp allow-lists of the `airlock vmm` process, one per thread
//! role. Everything a thread may ask the host kernel for is listed here; any
//! other syscall traps, and the VMM reports it and exits (see `seccomp`).
//!
//! Rules of thumb: no thread may open files but the main thread (snapshots),
//! none may create processes or threads after start, map memory
//! executable, or issue an ioctl other than the KVM requests it needs. The
//! one socket any thread may create is the vsock thread's non-blocking Unix
//! stream, to forward a guest connection to its host socket (the jail's
//! empty network namespace and root leave nothing else to reach anyway).

use std::collections::BTreeMap;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

/// Who runs on a thread, and so which filter it gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
#[repr(u8)]
pub enum Role {
    /// The main thread: the event loop, snapshot saving, exit.
    Main = 1,
    /// A vCPU thread: KVM_RUN and the devices it calls into (serial, blk,
    /// rng, virtio-mmio registers).
    Vcpu = 2,
    /// The vsock device thread: epoll, the host's Unix sockets, guest queues.
    Device = 3,
    /// Reads control commands from stdin.
    Control = 4,
    /// Waits for stop signals.
    Signals = 5,
    /// The jail's outer process, which waits for the VMM inside.
    Jailer = 6,
}

impl Role {
    pub const ALL: [Role; 6] = [
        Role::Main,
        Role::Vcpu,
        Role::Device,
        Role::Control,
        Role::Signals,
        Role::Jailer,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Role::Main => "main",
            Role::Vcpu => "vcpu",
            Role::Device => "vsock",
            Role::Control => "control",
            Role::Signals => "signals",
            Role::Jailer => "jailer",
        }
    }

    pub fn from_u8(value: u8) -> Option<Role> {
        Role::ALL.into_iter().find(|r| *r as u8 == value)
    }
}

#[derive(Debug, thiserror::Error)]
#[error("cannot compile the {role} seccomp filter: {source}")]
pub struct FilterError {
    role: &'static str,
    #[source]
    source: seccompiler::BackendError,
}

/// Compiles the filter of `role`: listed syscalls pass, anything else traps
/// (or, with `audit_only`, passes and is logged by the kernel: for finding
/// out what a changed VMM needs, never for serving).
pub fn compile(role: Role, audit_only: bool) -> Result<BpfProgram, FilterError> {
    let error = |source| FilterError {
        role: role.name(),
        source,
    };
    let filter = SeccompFilter::new(
        rules(role).map_err(error)?,
        if audit_only {
            SeccompAction::Log
        } else {
            SeccompAction::Trap
        },
        SeccompAction::Allow,
        TargetArch::x86_64,
    )
    .map_err(error)?;
    filter.try_into().map_err(error)
}

type Rules = BTreeMap<i64, Vec<SeccompRule>>;

fn rules(role: Role) -> Result<Rules, seccompiler::BackendError> {
    let mut rules = Rules::new();
    common(&mut rules)?;
    match role {
        Role::Main => {
            allow(
                &mut rules,
                &[
                    libc::SYS_write,
                    libc::SYS_getpid,
                    libc::SYS_gettid,
                    // pthread_kill, to kick vCPUs out of KVM_RUN for a snapshot.
                    libc::SYS_tgkill,
                    // Saving a snapshot into its directory.
                    libc::SYS_openat,
                    libc::SYS_pwrite64,
                    // A diff snapshot reads the page map.
                    libc::SYS_pread64,
                    libc::SYS_ftruncate,
                    libc::SYS_fsync,
                    libc::SYS_fstat,
                    libc::SYS_newfstatat,
                    libc::SYS_statx,
                    libc::SYS_lseek,
                    libc::SYS_rename,
                    libc::SYS_renameat,
                    libc::SYS_renameat2,
                    // The vsock socket file is removed at exit.
                    libc::SYS_unlink,
                    libc::SYS_unlinkat,
                    // Stopping the device thread at exit.
                    libc::SYS_epoll_ctl,
                ],
            );
            ioctls(&mut rules, &kvm::VM_SAVE)?;
        }
        Role::Vcpu => {
            allow(
                &mut rules,
                &[
                    // Console log (truncated at its cap), irqfds, eventfds.
                    libc::SYS_write,
                    libc::SYS_ftruncate,
                    // virtio-blk reads the rootfs at guest-chosen offsets.
                    libc::SYS_pread64,
                    libc::SYS_preadv,
                    libc::SYS_fdatasync,
                    libc::SYS_fsync,
                    // (virtio-rng's getrandom is in the common list.)
                    // Activating and resetting the vsock device.
                    libc::SYS_eventfd2,
                    libc::SYS_epoll_ctl,
                    libc::SYS_dup,
                ],
            );
            rule(
                &mut rules,
                libc::SYS_fcntl,
                arg_eq(1, libc::F_DUPFD_CLOEXEC as u64)?,
            );
            let mut vcpu = kvm::VCPU_RUN.to_vec();
            vcpu.extend(kvm::VCPU_SAVE);
            ioctls(&mut rules, &vcpu)?;
        }
        Role::Device => {
            allow(
                &mut rules,
                &[
                    libc::SYS_epoll_wait,
                    libc::SYS_epoll_pwait,
                    libc::SYS_epoll_ctl,
                    libc::SYS_accept4,
                    libc::SYS_read,
                    libc::SYS_write,
                    libc::SYS_recvfrom,
                    libc::SYS_sendto,
                    libc::SYS_shutdown,
                ],
            );
            rule(&mut rules, libc::SYS_ioctl, arg_eq(1, libc::FIONBIO)?);
            // Forwarding a guest connection (muxer::connect_nonblocking).
            rule(
                &mut rules,
                libc::SYS_socket,
                SeccompRule::new(vec![
                    SeccompCondition::new(
                        0,
                        SeccompCmpArgLen::Dword,
                        SeccompCmpOp::Eq,
                        libc::AF_UNIX as u64,
                    )?,
                    SeccompCondition::new(
                        1,
                        SeccompCmpArgLen::Dword,
                        SeccompCmpOp::Eq,
                        (libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC) as u64,
                    )?,
                ])?,
            );
            allow(&mut rules, &[libc::SYS_connect]);
            for cmd in [libc::F_GETFL, libc::F_SETFL, libc::F_GETFD, libc::F_SETFD] {
                rule(&mut rules, libc::SYS_fcntl, arg_eq(1, cmd as u64)?);
            }
        }
        Role::Control => allow(&mut rules, &[libc::SYS_read, libc::SYS_write]),
        Role::Signals => allow(&mut rules, &[libc::SYS_rt_sigtimedwait, libc::SYS_write]),
        Role::Jailer => allow(
            &mut rules,
            &[
                libc::SYS_wait4,
                libc::SYS_waitid,
                libc::SYS_kill,
                libc::SYS_rt_sigtimedwait,
                libc::SYS_write,
                // Removing the VMM's cgroup once it is empty.
                libc::SYS_rmdir,
            ],
        ),
    }
    Ok(rules)
}

/// What every thread of a Rust program needs to live and end: memory (never
/// executable), futexes, signals, its own exit, and tracing to stderr.
fn common(rules: &mut Rules) -> Result<(), seccompiler::BackendError> {
    allow(
        rules,
        &[
            libc::SYS_futex,
            libc::SYS_munmap,
            libc::SYS_mremap,
            libc::SYS_madvise,
            libc::SYS_brk,
            libc::SYS_sigaltstack,
            libc::SYS_rt_sigprocmask,
            libc::SYS_rt_sigreturn,
            libc::SYS_sched_yield,
            libc::SYS_clock_gettime,
            libc::SYS_clock_nanosleep,
            libc::SYS_nanosleep,
            libc::SYS_restart_syscall,
            libc::SYS_close,
            libc::SYS_exit,
            libc::SYS_exit_group,
            // HashMap's random keys.
            libc::SYS_getrandom,
        ],
    );
    // Debug builds of std check that an fd is open before closing it.
    rule(rules, libc::SYS_fcntl, arg_eq(1, libc::F_GETFD as u64)?);
    // Memory may be mapped and protected, but never executable.
    let no_exec = SeccompCondition::new(
        2,
        SeccompCmpArgLen::Dword,
        SeccompCmpOp::MaskedEq(libc::PROT_EXEC as u64),
        0,
    )?;
    rule(
        rules,
        libc::SYS_mmap,
        SeccompRule::new(vec![no_exec.clone()])?,
    );
    rule(rules, libc::SYS_mprotect, SeccompRule::new(vec![no_exec])?);
    Ok(())
}

fn allow(rules: &mut Rules, syscalls: &[i64]) {
    for &nr in syscalls {
        // An empty rule list means: always allowed.
        rules.insert(nr, Vec::new());
    }
}

/// Adds a conditional rule; a syscall that is already allowed outright stays so.
fn rule(rules: &mut Rules, nr: i64, rule: SeccompRule) {
    match rules.get_mut(&nr) {
        Some(list) if list.is_empty() => {}
        Some(list) => list.push(rule),
        None => {
            rules.insert(nr, vec![rule]);
        }
    }
}

fn arg_eq(index: u8, value: u64) -> Result<SeccompRule, seccompiler::BackendError> {
    SeccompRule::new(vec![SeccompCondition::new(
        index,
        SeccompCmpArgLen::Qword,
        SeccompCmpOp::Eq,
        value,
    )?])
}

fn ioctls(rules: &mut Rules, requests: &[u64]) -> Result<(), seccompiler::BackendError> {
    for &request in requests {
        rule(rules, libc::SYS_ioctl, arg_eq(1, request)?);
    }
    Ok(())
}

/// The KVM ioctl request numbers the running VMM uses (building and
/// restoring happen before any filter).
mod kvm {
    use kvm_bindings::{
        kvm_clock_data, kvm_cpuid2, kvm_debugregs, kvm_irqchip, kvm_lapic_state, kvm_mp_state,
        kvm_msrs, kvm_pit_state2, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave,
    };

    const KVMIO: u64 = 0xAE;
    const NONE: u64 = 0;
    const WRITE: u64 = 1;
    const READ: u64 = 2;

    const fn ioc(dir: u64, nr: u64, size: usize) -> u64 {
        (dir << 30) | ((size as u64) << 16) | (KVMIO << 8) | nr
    }

    const fn ior<T>(nr: u64) -> u64 {
        ioc(READ, nr, std::mem::size_of::<T>())
    }

    const fn iowr<T>(nr: u64) -> u64 {
        ioc(READ | WRITE, nr, std::mem::size_of::<T>())
    }

    pub const KVM_RUN: u64 = ioc(NONE, 0x80, 0);

    /// KVM_RUN, and the register reads that say where a vCPU failed.
    pub const VCPU_RUN: [u64; 3] = [KVM_RUN, ior::<kvm_regs>(0x81), ior::<kvm_sregs>(0x83)];

    /// A vCPU saving itself for a snapshot.
    pub const VCPU_SAVE: [u64; 9] = [
        iowr::<kvm_cpuid2>(0x91),
        ior::<kvm_mp_state>(0x98),
        ior::<kvm_xsave>(0xa4),
        ior::<kvm_xcrs>(0xa6),
        ior::<kvm_debugregs>(0xa1),
        ior::<kvm_lapic_state>(0x8e),
        iowr::<kvm_msrs>(0x88),
        ior::<kvm_vcpu_events>(0x9f),
        ior::<kvm_regs>(0x81),
    ];

    /// The main thread saving the VM's own state for a snapshot.
    pub const VM_SAVE: [u64; 3] = [
        iowr::<kvm_irqchip>(0x62),
        ior::<kvm_pit_state2>(0x9f),
        ior::<kvm_clock_data>(0x7c),
    ];
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_role_compiles() {
        for role in Role::ALL {
            let program = compile(role, false).unwrap();
            assert!(!program.is_empty(), "{role:?}");
            assert_eq!(Role::from_u8(role as u8), Some(role));
        }
    }

    #[test]
    fn kvm_request_numbers_match_the_kernel_headers() {
        // From <linux/kvm.h> on x86_64.
        assert_eq!(kvm::KVM_RUN, 0xae80);
        assert_eq!(kvm::VCPU_RUN[1], 0x8090_ae81, "KVM_GET_REGS");
        assert_eq!(kvm::VCPU_RUN[2], 0x8138_ae83, "KVM_GET_SREGS");
        assert_eq!(kvm::VCPU_SAVE[2], 0x9000_aea4, "KVM_GET_XSAVE");
        assert_eq!(kvm::VM_SAVE[0], 0xc208_ae62, "KVM_GET_IRQCHIP");
    }
}

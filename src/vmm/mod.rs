//! airlock's virtual machine monitor: one KVM microVM per process.

pub mod bus;
pub mod cmdline;
pub mod config;
pub mod control;
pub mod devices;
pub mod event;
pub mod guest_warn;
pub mod jail;
pub mod kvm_stats;
pub mod layout;
pub mod machine;
pub mod run;
pub mod seccomp;
pub mod seccomp_filters;
pub mod snapshot;
pub mod stats;
pub mod vcpu;
pub mod x86_64;

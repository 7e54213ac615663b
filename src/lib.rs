//! airlock: an MCP server that runs AI agents' code in per-conversation KVM
//! microVMs. The binary in `main.rs` is a thin CLI over this library.

pub mod agent_client;
pub mod bench;
pub mod config;
pub mod confinement;
pub mod doctor;
pub mod egress;
pub mod host_kvm;
pub mod image;
pub mod mcp;
pub mod metrics;
pub mod paths;
pub mod sandbox;
pub mod seal;
pub mod template;
pub mod vm;
pub mod vmm;

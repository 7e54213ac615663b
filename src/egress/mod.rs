//! Network egress by policy. Off unless the operator allows something.
//!
//! The path of one connection out:
//!
//! ```text
//! user code ─HTTP(S)_PROXY─▶ agent relay (127.0.0.1:800 in the guest)
//!   ─vsock, host port 1080─▶ VMM (forwards to <run dir>/vsock.sock_1080)
//!   ─Unix socket─▶ gateway: `service` reads the proxy request (`request`),
//!   the principal's `policy` decides and resolves, the gateway connects and
//!   `splice`s, metering in `traffic`
//! ```
//!
//! Nothing in the guest is a network device, and the VMM never touches the
//! network: every decision and every connection is the gateway's.

pub mod policy;
pub mod request;
pub mod service;
pub mod splice;
pub mod traffic;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};

pub use service::{Attachment, Binding, Egress, EgressLimits, NamedPolicy};
pub use traffic::{Traffic, TrafficReport};

use self::policy::{Allowlist, HostsMap, Policy, SystemResolver};
use crate::config::{self, ConfigFile};

/// A hosts file is a short list, never a data set.
const MAX_HOSTS_FILE_BYTES: u64 = 16 << 20;

/// The egress flags of `airlock serve`.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct EgressArgs {
    /// Let sandboxes reach this (repeatable): `pypi.org`,
    /// `*.pythonhosted.org` (names below it), `api.example.com:443` (one
    /// port), `203.0.113.0/24` (addresses). Without any, sandboxes have no
    /// network at all.
    #[arg(id = "egress_allow", long = "egress-allow", value_name = "PATTERN")]
    pub allow: Vec<String>,
    /// Resolve these names from a hosts-format file (`ADDRESS NAME...`)
    /// before DNS; an address given here is allowed for its name, even a
    /// private one.
    #[arg(id = "egress_hosts", long = "egress-hosts", value_name = "FILE")]
    pub hosts_file: Option<PathBuf>,
    /// Connections one sandbox may have open at once.
    #[arg(
        id = "egress_max_connections",
        long = "egress-max-connections",
        value_name = "N"
    )]
    pub max_connections: Option<usize>,
    /// Close a connection when no byte has moved either way for this long.
    #[arg(id = "egress_idle_timeout", long = "egress-idle-timeout", value_name = "DURATION", value_parser = config::parse_duration)]
    pub idle_timeout: Option<Duration>,
    /// Bytes per second one sandbox may move, both ways together (e.g. 10M).
    #[arg(id = "egress_bytes_per_second", long = "egress-bytes-per-second", value_name = "BYTES", value_parser = config::parse_bytes)]
    pub bytes_per_second: Option<u64>,
}

/// The egress service the flags and the config file ask for, or `None`
/// when nobody may reach anything.
pub fn build(args: &EgressArgs, file: &ConfigFile) -> Result<Option<Arc<Egress>>> {
    let hosts_path = args.hosts_file.as_ref().or(file.egress.hosts_file.as_ref());
    let hosts = Arc::new(match hosts_path {
        Some(path) => load_hosts(path)?,
        None => HostsMap::empty(),
    });
    let own = match policy::host_addresses() {
        Ok(addrs) => addrs,
        Err(err) => {
            // Loopback and private ranges are refused anyway; a public
            // address of this host would not be.
            tracing::warn!(%err, "egress: cannot list this host's addresses; they are not refused by name");
            Vec::new()
        }
    };
    let policy_of = |patterns: &[String]| -> Result<NamedPolicy> {
        let allow = Allowlist::parse(patterns.iter().map(String::as_str))?;
        Ok(NamedPolicy {
            policy: Policy::new(allow, hosts.clone(), own.clone()),
            patterns: patterns.iter().map(|p| p.trim().to_string()).collect(),
        })
    };
    let mut default_patterns = args.allow.clone();
    default_patterns.extend(file.egress.allow.iter().cloned());
    let default_policy = policy_of(&default_patterns).context("egress allowlist")?;
    let mut principal_policies = BTreeMap::new();
    for (name, section) in &file.principals {
        if let Some(patterns) = &section.egress_allow {
            let policy =
                policy_of(patterns).with_context(|| format!("principal {name}: egress_allow"))?;
            principal_policies.insert(name.clone(), policy);
        }
    }
    let mut limits = EgressLimits::default();
    if let Some(n) = args
        .max_connections
        .or(file.egress.max_connections_per_sandbox)
    {
        anyhow::ensure!(n > 0, "the egress connection limit must be at least 1");
        limits.max_connections_per_sandbox = n;
    }
    if let Some(d) = args.idle_timeout {
        limits.idle_timeout = d;
    } else if let Some(text) = &file.egress.idle_timeout {
        limits.idle_timeout = config::parse_duration(text)?;
    }
    limits.bytes_per_second = match (args.bytes_per_second, &file.egress.bytes_per_second) {
        (Some(n), _) => Some(n),
        (None, Some(text)) => Some(config::parse_bytes(text)?),
        (None, None) => None,
    };
    if limits.bytes_per_second == Some(0) {
        anyhow::bail!("the egress rate must be more than zero bytes per second");
    }
    let egress = Egress::new(
        default_policy,
        principal_policies,
        limits,
        Arc::new(SystemResolver),
    );
    Ok(egress.enabled().then(|| Arc::new(egress)))
}

fn load_hosts(path: &std::path::Path) -> Result<HostsMap> {
    let size = std::fs::metadata(path)
        .with_context(|| format!("cannot read the egress hosts file {}", path.display()))?
        .len();
    anyhow::ensure!(
        size <= MAX_HOSTS_FILE_BYTES,
        "egress hosts file {} is {size} bytes; at most {MAX_HOSTS_FILE_BYTES}",
        path.display()
    );
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the egress hosts file {}", path.display()))?;
    HostsMap::parse(&text).with_context(|| format!("egress hosts file {}", path.display()))
}

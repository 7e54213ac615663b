//! Egress policy: may a sandbox open a TCP connection to `host:port`?
//!
//! The operator writes an allowlist of patterns ([`Entry`]):
//! - `pypi.org`: exactly that name, any port; `api.example.com:443`: that name, port 443 only.
//! - `*.pythonhosted.org`: any name strictly below it, never the apex itself. A bare `*` is
//!   refused: it would allow everything.
//! - `203.0.113.7`, `203.0.113.0/24`, `203.0.113.0/24:443`, `2001:db8::/32`, `[2001:db8::1]`,
//!   `[2001:db8::1]:443`: addresses and networks, optionally on one port.
//!
//! Names are ASCII-lowercased, lose one trailing dot and must be plain DNS syntax (punycode for
//! international names). A name whose last label is numeric (`10.1`, `0x7f.1`, `2130706433`) is
//! an IP address spelling, not a name, and is refused.
//!
//! [`Policy::decide`] applies these rules, in order:
//! 1. A host that is neither a DNS name nor an IP literal is [`Refusal::Malformed`]. Every
//!    spelling that glibc's `inet_aton` accepts (`2130706433`, `0x7f.1`, `0177.0.0.1`) *is* that
//!    IPv4 address, and IPv4-mapped/compatible IPv6 is treated as the IPv4 inside it, so no
//!    spelling of an address can pass for a name or dodge an address check.
//! 2. An IP literal is allowed only by an address/network entry covering it; names never allow
//!    literals. An explicit entry allows even loopback or private addresses: the operator's call.
//! 3. A name must match a name entry (and its port), or it is refused *without being resolved*,
//!    so a denied name never leaks to DNS.
//! 4. A name in the operator's hosts map gets the mapped addresses as they are (again the
//!    operator's call); any other name goes to the [`Resolver`].
//! 5. Resolver answers that are special ([`is_special`]) or one of the host's own addresses are
//!    dropped unless an address entry covers them; if nothing is left the connection is
//!    [`Refusal::PrivateAddress`]. This stops DNS rebinding onto internal services and metadata.
//!
//! The caller connects only to the addresses `decide` returns and never resolves again, so the
//! addresses checked are the addresses used.

use std::io;
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::sync::Arc;

mod address;
mod hosts;
mod pattern;
#[cfg(test)]
mod tests;

pub use address::{canonical, host_addresses, is_special};
pub use hosts::{HostsError, HostsMap};
pub use pattern::{Allowlist, Entry, PatternError};

use address::*;

/// Resolves a host name (never an IP literal) to addresses. Blocking.
pub trait Resolver: Send + Sync {
    fn resolve(&self, name: &str) -> io::Result<Vec<IpAddr>>;
}

/// The system resolver: getaddrinfo through `std::net::ToSocketAddrs`.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemResolver;

impl Resolver for SystemResolver {
    fn resolve(&self, name: &str) -> io::Result<Vec<IpAddr>> {
        // Fully qualified: the allowlist names this name, never one the
        // resolver's search domains would make of it.
        let fqdn = format!("{name}.");
        Ok((fqdn.as_str(), 0)
            .to_socket_addrs()?
            .map(|sa| sa.ip())
            .collect())
    }
}

/// Why a connection is refused. Display gives the text after
/// "blocked by airlock egress policy: ".
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// Not in the allowlist (name, IP or port).
    #[error("{host} is not allowed")]
    NotAllowed { host: String, port: u16 },
    /// Every address the name resolves to is special or the host's own.
    #[error("{host} resolves only to addresses that are not allowed ({})", list(.addresses))]
    PrivateAddress {
        host: String,
        addresses: Vec<IpAddr>,
    },
    /// Neither a valid host name nor an IP address.
    #[error("{host:?} is not a valid host name")]
    Malformed { host: String },
    /// Resolution failed: not a policy decision (the proxy answers 502).
    #[error("{host} does not resolve: {error}")]
    Unresolvable { host: String, error: String },
}

impl Refusal {
    /// False only when the name could not be resolved.
    pub fn is_policy(&self) -> bool {
        !matches!(self, Refusal::Unresolvable { .. })
    }
}

/// The first few addresses, comma-separated, for a one-line message.
fn list(addresses: &[IpAddr]) -> String {
    let mut shown: Vec<String> = addresses.iter().take(4).map(IpAddr::to_string).collect();
    if addresses.len() > shown.len() {
        shown.push("…".into());
    }
    shown.join(", ")
}

/// The allowlist with what it needs to judge addresses.
#[derive(Debug, Clone)]
pub struct Policy {
    allow: Allowlist,
    hosts: Arc<HostsMap>,
    own_addresses: Vec<IpAddr>,
}

impl Policy {
    /// `own_addresses` (see [`host_addresses`]) are refused as resolver answers like private ones.
    pub fn new(allow: Allowlist, hosts: Arc<HostsMap>, own_addresses: Vec<IpAddr>) -> Policy {
        let own_addresses = own_addresses.into_iter().map(canonical).collect();
        Policy {
            allow,
            hosts,
            own_addresses,
        }
    }

    pub fn allows_nothing(&self) -> bool {
        self.allow.is_empty()
    }

    /// The vetted addresses to connect to, in resolver order; the caller connects only to these
    /// and never resolves the name again.
    pub fn decide(
        &self,
        host: &str,
        port: u16,
        resolver: &dyn Resolver,
    ) -> Result<Vec<SocketAddr>, Refusal> {
        let not_allowed = || Refusal::NotAllowed {
            host: host.to_string(),
            port,
        };
        let name = match parse_host(host) {
            None => {
                return Err(Refusal::Malformed {
                    host: host.to_string(),
                });
            }
            // Port 0 is never a real destination; entries cannot name it either.
            Some(_) if port == 0 => return Err(not_allowed()),
            Some(Host::Ip(ip)) if self.allow.covers(ip, port) => {
                return Ok(vec![SocketAddr::new(ip, port)]);
            }
            Some(Host::Ip(_)) => return Err(not_allowed()),
            Some(Host::Name(name)) => name,
        };
        if !self.allow.allows_name(&name, port) {
            return Err(not_allowed());
        }
        if let Some(mapped) = self.hosts.lookup(&name) {
            return Ok(mapped.iter().map(|ip| SocketAddr::new(*ip, port)).collect());
        }
        let unresolvable = |error: String| Refusal::Unresolvable {
            host: host.to_string(),
            error,
        };
        let answers = resolver
            .resolve(&name)
            .map_err(|error| unresolvable(error.to_string()))?;
        if answers.is_empty() {
            return Err(unresolvable("no addresses".into()));
        }
        let mut kept: Vec<IpAddr> = Vec::new();
        let mut refused: Vec<IpAddr> = Vec::new();
        for ip in answers.into_iter().map(canonical) {
            let internal = is_special(ip) || self.own_addresses.contains(&ip);
            let bucket = if !internal || self.allow.covers(ip, port) {
                &mut kept
            } else {
                &mut refused
            };
            if !bucket.contains(&ip) {
                bucket.push(ip);
            }
        }
        if kept.is_empty() {
            return Err(Refusal::PrivateAddress {
                host: host.to_string(),
                addresses: refused,
            });
        }
        Ok(kept
            .into_iter()
            .map(|ip| SocketAddr::new(ip, port))
            .collect())
    }
}

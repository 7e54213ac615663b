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

use std::collections::HashMap;
use std::fmt;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, ToSocketAddrs};
use std::str::FromStr;
use std::sync::Arc;

#[cfg(test)]
mod tests;

/// An allowlist pattern that cannot be used; the message says what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("allowlist pattern {pattern:?}: {problem}")]
pub struct PatternError {
    pub pattern: String,
    pub problem: String,
}

/// A hosts-format file line that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("hosts file line {line}: {problem}")]
pub struct HostsError {
    pub line: usize,
    pub problem: String,
}

/// An address with a prefix length; the address has no bits set past the prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Network {
    addr: IpAddr,
    prefix: u8,
}

impl Network {
    /// Builds a network, refusing host bits; IPv4-mapped/compatible IPv6 networks become IPv4
    /// because the addresses they are compared with are canonicalised the same way.
    fn new(addr: IpAddr, prefix: u8) -> Result<Network, String> {
        let masked = mask(addr, prefix);
        if masked != addr {
            return Err(format!("host bits set; did you mean {masked}/{prefix}?"));
        }
        match (addr, canonical(addr)) {
            (IpAddr::V6(_), IpAddr::V4(v4)) if prefix >= 96 => Ok(Network {
                addr: IpAddr::V4(v4),
                prefix: prefix - 96,
            }),
            _ => Ok(Network { addr, prefix }),
        }
    }

    fn is_single(&self) -> bool {
        self.prefix == if self.addr.is_ipv4() { 32 } else { 128 }
    }

    /// `ip` must already be canonical.
    fn contains(&self, ip: IpAddr) -> bool {
        self.addr.is_ipv4() == ip.is_ipv4() && mask(ip, self.prefix) == self.addr
    }
}

fn mask(addr: IpAddr, prefix: u8) -> IpAddr {
    match addr {
        IpAddr::V4(v4) => {
            let keep = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
            IpAddr::V4(Ipv4Addr::from(u32::from(v4) & keep))
        }
        IpAddr::V6(v6) => {
            let keep = u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0);
            IpAddr::V6(Ipv6Addr::from(u128::from(v6) & keep))
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Target {
    /// Exactly this normalised name.
    Name(String),
    /// Any name strictly below this normalised suffix.
    Below(String),
    Network(Network),
}

/// One allowlist entry, parsed from an operator's pattern: a target and an optional port.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Entry {
    target: Target,
    port: Option<u16>,
}

impl FromStr for Entry {
    type Err = PatternError;

    fn from_str(raw: &str) -> Result<Entry, PatternError> {
        let pattern = raw.trim();
        let fail = |problem: String| PatternError {
            pattern: pattern.to_string(),
            problem,
        };
        if pattern.is_empty() {
            return Err(fail("empty pattern".into()));
        }
        let network = |addr: IpAddr, prefix: u8, port: Option<u16>| {
            let network = Network::new(addr, prefix).map_err(fail)?;
            Ok::<_, PatternError>(Entry {
                target: Target::Network(network),
                port,
            })
        };
        // `[v6]` or `[v6]:port`: the only IPv6 form that takes a port.
        if let Some(rest) = pattern.strip_prefix('[') {
            let (inside, after) = rest
                .split_once(']')
                .ok_or_else(|| fail("missing ']'".into()))?;
            let v6: Ipv6Addr = inside
                .parse()
                .map_err(|_| fail(format!("{inside:?} is not an IPv6 address")))?;
            let port = match after {
                "" => None,
                _ => match after.strip_prefix(':') {
                    Some(port) => Some(parse_port(port).map_err(fail)?),
                    None => return Err(fail(format!("unexpected {after:?} after ']'"))),
                },
            };
            return network(IpAddr::V6(v6), 128, port);
        }
        // `ADDR/PREFIX`, with `:port` allowed after an IPv4 network only.
        if let Some((addr_text, rest)) = pattern.split_once('/') {
            let addr: IpAddr = addr_text
                .parse()
                .map_err(|_| fail(format!("{addr_text:?} is not an IP address")))?;
            let (prefix_text, port) = match rest.split_once(':') {
                Some(_) if addr.is_ipv6() => {
                    return Err(fail("an IPv6 network cannot take a port".into()));
                }
                Some((prefix, port)) => (prefix, Some(parse_port(port).map_err(fail)?)),
                None => (rest, None),
            };
            let max = if addr.is_ipv4() { 32 } else { 128 };
            let prefix = parse_decimal(prefix_text, 3)
                .and_then(|prefix| u8::try_from(prefix).ok())
                .filter(|prefix| *prefix <= max)
                .ok_or_else(|| fail(format!("prefix must be a number from 0 to {max}")))?;
            return network(addr, prefix, port);
        }
        if pattern.matches(':').count() > 1 {
            let v6: Ipv6Addr = pattern.parse().map_err(|_| {
                fail("not an IPv6 address (write [addr]:port to give one a port)".into())
            })?;
            return network(IpAddr::V6(v6), 128, None);
        }
        let (host, port) = match pattern.rsplit_once(':') {
            Some((host, port)) => (host, Some(parse_port(port).map_err(fail)?)),
            None => (pattern, None),
        };
        if let Ok(v4) = host.parse::<Ipv4Addr>() {
            return network(IpAddr::V4(v4), 32, port);
        }
        let target = if host == "*" {
            return Err(fail(
                "use an explicit list; `*` would allow everything".into(),
            ));
        } else if let Some(suffix) = host.strip_prefix("*.") {
            Target::Below(normalise_name(suffix).map_err(fail)?)
        } else {
            Target::Name(normalise_name(host).map_err(fail)?)
        };
        Ok(Entry { target, port })
    }
}

impl fmt::Display for Entry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.target, self.port) {
            (Target::Name(name), _) => write!(f, "{name}")?,
            (Target::Below(suffix), _) => write!(f, "*.{suffix}")?,
            (Target::Network(net), Some(_)) if net.is_single() && net.addr.is_ipv6() => {
                write!(f, "[{}]", net.addr)?;
            }
            (Target::Network(net), _) if net.is_single() => write!(f, "{}", net.addr)?,
            (Target::Network(net), _) => write!(f, "{}/{}", net.addr, net.prefix)?,
        }
        match self.port {
            Some(port) => write!(f, ":{port}"),
            None => Ok(()),
        }
    }
}

/// Digits only (no sign, no spaces), at most `max_digits` of them.
fn parse_decimal(text: &str, max_digits: usize) -> Option<u32> {
    let plain = !text.is_empty() && text.len() <= max_digits;
    (plain && text.bytes().all(|b| b.is_ascii_digit())).then(|| text.parse().ok())?
}

fn parse_port(text: &str) -> Result<u16, String> {
    (parse_decimal(text, 5).and_then(|port| u16::try_from(port).ok()))
        .filter(|port| *port != 0)
        .ok_or_else(|| format!("port {text:?} is not a number from 1 to 65535"))
}

/// Lowercases, strips one trailing dot and checks DNS syntax; refuses IP address spellings.
fn normalise_name(raw: &str) -> Result<String, String> {
    if !raw.is_ascii() {
        return Err(format!(
            "{raw:?} is not ASCII; write international names in punycode (xn--) form"
        ));
    }
    let lower = raw.to_ascii_lowercase();
    let name = lower.strip_suffix('.').unwrap_or(&lower);
    if name.is_empty() {
        return Err("empty name".into());
    }
    if name.len() > 253 {
        return Err("name is longer than 253 characters".into());
    }
    for label in name.split('.') {
        if label.is_empty() {
            return Err(format!("{raw:?} has an empty label"));
        }
        if label.len() > 63 {
            return Err(format!("label {label:?} is longer than 63 characters"));
        }
        if label.contains('*') {
            return Err("`*` may only be the whole first label, as in *.example.com".into());
        }
        if let Some(bad) = label
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || *c == '-' || *c == '_'))
        {
            return Err(format!(
                "{bad:?} is not allowed in a name (letters, digits, '-', '_')"
            ));
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err(format!("label {label:?} starts or ends with '-'"));
        }
    }
    // Resolvers and browsers read a name ending in a number as an IPv4 address, so it is one.
    if name.rsplit('.').next().is_some_and(is_numeric_label) {
        return Err(format!(
            "{raw:?} is an IP address spelling, not a name; write IPv4 as a dotted quad like 10.0.0.1"
        ));
    }
    Ok(name.to_string())
}

/// All digits, or `0x` and hex digits: a label the WHATWG URL parser takes as a number.
fn is_numeric_label(label: &str) -> bool {
    match label.strip_prefix("0x") {
        Some(hex) => hex.bytes().all(|b| b.is_ascii_hexdigit()),
        None => !label.is_empty() && label.bytes().all(|b| b.is_ascii_digit()),
    }
}

/// glibc `inet_aton`: 1 to 4 dot-separated C numbers (decimal, 0-octal, 0x-hex), the last one
/// filling all remaining bytes. `text` must be lowercase.
fn parse_inet_aton(text: &str) -> Option<Ipv4Addr> {
    let parts: Vec<&str> = text.split('.').collect();
    if parts.len() > 4 {
        return None;
    }
    let numbers = parts
        .iter()
        .map(|part| parse_c_number(part))
        .collect::<Option<Vec<u32>>>()?;
    let (last, leading) = numbers.split_last()?;
    let mut value = 0u32;
    for (index, byte) in leading.iter().enumerate() {
        if *byte > 0xff {
            return None;
        }
        value |= byte << (24 - 8 * index);
    }
    let room_bits = 32 - 8 * leading.len() as u32;
    if last.checked_shr(room_bits).unwrap_or(0) != 0 {
        return None;
    }
    Some(Ipv4Addr::from(value | last))
}

/// One `strtoul(_, _, 0)` number that fits in 32 bits; leading zeros never overflow.
fn parse_c_number(part: &str) -> Option<u32> {
    let (digits, radix) = match part.strip_prefix("0x") {
        Some(hex) => (hex, 16),
        None if part.len() > 1 && part.starts_with('0') => (&part[1..], 8),
        None => (part, 10),
    };
    if digits.is_empty() {
        return None;
    }
    digits.chars().try_fold(0u32, |value, c| {
        value.checked_mul(radix)?.checked_add(c.to_digit(radix)?)
    })
}

/// A host as the guest asked for it.
enum Host {
    Ip(IpAddr),
    Name(String),
}

fn parse_host(raw: &str) -> Option<Host> {
    if let Some(rest) = raw.strip_prefix('[') {
        // std refuses zone ids (`%eth0`), which must not reach the connect either.
        let v6: Ipv6Addr = rest.strip_suffix(']')?.parse().ok()?;
        return Some(Host::Ip(canonical(IpAddr::V6(v6))));
    }
    if raw.contains(':') {
        let v6: Ipv6Addr = raw.parse().ok()?;
        return Some(Host::Ip(canonical(IpAddr::V6(v6))));
    }
    if !raw.is_ascii() {
        return None;
    }
    let lower = raw.to_ascii_lowercase();
    if let Some(v4) = parse_inet_aton(lower.strip_suffix('.').unwrap_or(&lower)) {
        return Some(Host::Ip(IpAddr::V4(v4)));
    }
    normalise_name(raw).ok().map(Host::Name)
}

/// The ports entries give one name: `None` is any port.
type Ports = Vec<Option<u16>>;

fn add_port(ports: &mut Ports, port: Option<u16>) {
    if !ports.contains(&port) {
        ports.push(port);
    }
}

fn port_allowed(only: Option<u16>, port: u16) -> bool {
    only.is_none_or(|only| only == port)
}

/// The allowlist, of any length: names and wildcard suffixes are hashed, networks scanned.
#[derive(Debug, Clone, Default)]
pub struct Allowlist {
    names: HashMap<String, Ports>,
    below: HashMap<String, Ports>,
    networks: Vec<(Network, Option<u16>)>,
    entry_count: usize,
}

impl Allowlist {
    pub fn new(entries: Vec<Entry>) -> Allowlist {
        let mut allow = Allowlist {
            entry_count: entries.len(),
            ..Allowlist::default()
        };
        for Entry { target, port } in entries {
            match target {
                Target::Name(name) => add_port(allow.names.entry(name).or_default(), port),
                Target::Below(suffix) => add_port(allow.below.entry(suffix).or_default(), port),
                Target::Network(network) => allow.networks.push((network, port)),
            }
        }
        allow
    }

    /// Parses every pattern; the first bad one is the error.
    pub fn parse<'a>(
        patterns: impl IntoIterator<Item = &'a str>,
    ) -> Result<Allowlist, PatternError> {
        let entries = patterns
            .into_iter()
            .map(Entry::from_str)
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Allowlist::new(entries))
    }

    pub fn is_empty(&self) -> bool {
        self.entry_count == 0
    }

    /// The number of entries it was built from, duplicates included.
    pub fn len(&self) -> usize {
        self.entry_count
    }

    /// `name` must be normalised.
    fn allows_name(&self, name: &str, port: u16) -> bool {
        let allows = |ports: &Ports| ports.iter().any(|only| port_allowed(*only, port));
        // Suffixes start after a dot, so `*.b.c` matches `a.b.c` but never `b.c` or `xb.c`.
        self.names.get(name).is_some_and(allows)
            || (name.match_indices('.'))
                .any(|(dot, _)| self.below.get(&name[dot + 1..]).is_some_and(allows))
    }

    /// `ip` must be canonical.
    fn covers(&self, ip: IpAddr, port: u16) -> bool {
        (self.networks.iter())
            .any(|(network, only)| network.contains(ip) && port_allowed(*only, port))
    }
}

/// Operator-supplied name → addresses, from a hosts-format file.
#[derive(Debug, Clone, Default)]
pub struct HostsMap {
    addresses: HashMap<String, Vec<IpAddr>>,
}

impl HostsMap {
    /// `ADDR NAME [NAME...]` lines, `#` comments and blank lines; a name on several lines gets
    /// every address, in file order.
    pub fn parse(text: &str) -> Result<HostsMap, HostsError> {
        let mut map = HostsMap::empty();
        for (index, line) in text.lines().enumerate() {
            let fail = |problem: String| HostsError {
                line: index + 1,
                problem,
            };
            let content = line.split('#').next().unwrap_or_default();
            let mut fields = content.split_whitespace();
            let Some(addr_text) = fields.next() else {
                continue;
            };
            let addr: IpAddr = addr_text
                .parse()
                .map_err(|_| fail(format!("{addr_text:?} is not an IP address")))?;
            let addr = canonical(addr);
            let mut names = fields.peekable();
            if names.peek().is_none() {
                return Err(fail(format!("no name after {addr_text}")));
            }
            for raw_name in names {
                let name = normalise_name(raw_name).map_err(fail)?;
                let known = map.addresses.entry(name).or_default();
                if !known.contains(&addr) {
                    known.push(addr);
                }
            }
        }
        Ok(map)
    }

    pub fn empty() -> HostsMap {
        HostsMap::default()
    }

    /// `name` must already be normalised (lowercase, no trailing dot).
    pub fn lookup(&self, name: &str) -> Option<&[IpAddr]> {
        self.addresses.get(name).map(Vec::as_slice)
    }
}

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

/// The host's own interface addresses (`getifaddrs`), canonical and deduplicated.
pub fn host_addresses() -> io::Result<Vec<IpAddr>> {
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs writes a list head we own until freeifaddrs below.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let mut addresses = Vec::new();
    let mut cursor = head;
    while !cursor.is_null() {
        // SAFETY: `cursor` is a non-null node of the list, alive until freeifaddrs; each
        // `ifa_addr` (when non-null) points to a sockaddr whose family says its real type.
        let ip = unsafe {
            let ifa = &*cursor;
            cursor = ifa.ifa_next;
            if ifa.ifa_addr.is_null() {
                continue;
            }
            match i32::from((*ifa.ifa_addr).sa_family) {
                libc::AF_INET => {
                    let sin = &*ifa.ifa_addr.cast::<libc::sockaddr_in>();
                    IpAddr::V4(Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)))
                }
                libc::AF_INET6 => {
                    let sin6 = &*ifa.ifa_addr.cast::<libc::sockaddr_in6>();
                    IpAddr::V6(Ipv6Addr::from(sin6.sin6_addr.s6_addr))
                }
                _ => continue,
            }
        };
        let ip = canonical(ip);
        if !addresses.contains(&ip) {
            addresses.push(ip);
        }
    }
    // SAFETY: `head` came from a successful getifaddrs and no reference into it outlives this.
    unsafe { libc::freeifaddrs(head) };
    Ok(addresses)
}

/// IPv4-mapped (`::ffff:a.b.c.d`) and IPv4-compatible (`::a.b.c.d`, except `::` and `::1`)
/// IPv6 become the IPv4 address; anything else is returned unchanged.
pub fn canonical(ip: IpAddr) -> IpAddr {
    let IpAddr::V6(v6) = ip else {
        return ip;
    };
    if let Some(v4) = v6.to_ipv4_mapped() {
        return IpAddr::V4(v4);
    }
    let octets = v6.octets();
    if octets[..12].iter().all(|b| *b == 0) && !v6.is_unspecified() && !v6.is_loopback() {
        return IpAddr::V4(Ipv4Addr::from(u128::from(v6) as u32));
    }
    ip
}

/// IPv4 ranges that are not the public internet: this-network, private, shared (CGNAT),
/// loopback, link-local (with cloud metadata), IETF protocol assignments, documentation,
/// 6to4 relay, benchmarking, multicast, reserved and broadcast.
const SPECIAL_V4: [(u32, u8); 15] = [
    (0x0000_0000, 8),  // 0.0.0.0/8
    (0x0a00_0000, 8),  // 10.0.0.0/8
    (0x6440_0000, 10), // 100.64.0.0/10
    (0x7f00_0000, 8),  // 127.0.0.0/8
    (0xa9fe_0000, 16), // 169.254.0.0/16
    (0xac10_0000, 12), // 172.16.0.0/12
    (0xc000_0000, 24), // 192.0.0.0/24
    (0xc000_0200, 24), // 192.0.2.0/24
    (0xc058_6300, 24), // 192.88.99.0/24
    (0xc0a8_0000, 16), // 192.168.0.0/16
    (0xc612_0000, 15), // 198.18.0.0/15
    (0xc633_6400, 24), // 198.51.100.0/24
    (0xcb00_7100, 24), // 203.0.113.0/24
    (0xe000_0000, 4),  // 224.0.0.0/4
    (0xf000_0000, 4),  // 240.0.0.0/4, with 255.255.255.255
];

/// IPv6 ranges that are never public: unspecified, loopback, NAT64 local-use, discard, IETF
/// protocol assignments (Teredo, ORCHID, ...), documentation, unique-local, link-local,
/// site-local and multicast. Global NAT64 and 6to4 are judged by the IPv4 inside them.
const SPECIAL_V6: [(u128, u8); 11] = [
    (0, 128),                     // ::/128
    (1, 128),                     // ::1/128
    (0x0064_ff9b_0001 << 80, 48), // 64:ff9b:1::/48
    (0x0100 << 112, 64),          // 100::/64
    (0x2001 << 112, 23),          // 2001::/23
    (0x2001_0db8 << 96, 32),      // 2001:db8::/32
    (0x3fff << 112, 20),          // 3fff::/20, documentation (RFC 9637)
    (0xfc00 << 112, 7),           // fc00::/7
    (0xfe80 << 112, 10),          // fe80::/10
    (0xfec0 << 112, 10),          // fec0::/10
    (0xff00 << 112, 8),           // ff00::/8
];

/// Loopback, private, link-local, metadata, multicast, documentation, reserved and the like,
/// judged on [`canonical`] form; NAT64 and 6to4 addresses are judged by the IPv4 inside.
pub fn is_special(ip: IpAddr) -> bool {
    match canonical(ip) {
        IpAddr::V4(v4) => is_special_v4(v4),
        IpAddr::V6(v6) => {
            let bits = u128::from(v6);
            let in_net = |net: u128, prefix: u32| {
                bits & u128::MAX.checked_shl(128 - prefix).unwrap_or(0) == net
            };
            if in_net(0x0064_ff9b << 96, 96) {
                return is_special_v4(Ipv4Addr::from(bits as u32));
            }
            if in_net(0x2002 << 112, 16) {
                return is_special_v4(Ipv4Addr::from((bits >> 80) as u32));
            }
            // Only 2000::/3 is assigned as global unicast; the rest is reserved or unassigned.
            !in_net(0x2000 << 112, 3)
                || SPECIAL_V6
                    .iter()
                    .any(|(net, prefix)| in_net(*net, u32::from(*prefix)))
        }
    }
}

fn is_special_v4(v4: Ipv4Addr) -> bool {
    let bits = u32::from(v4);
    SPECIAL_V4.iter().any(|(net, prefix)| {
        bits & u32::MAX.checked_shl(32 - u32::from(*prefix)).unwrap_or(0) == *net
    })
}

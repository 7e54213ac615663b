//! Allowlist patterns ([`Entry`]) and the [`Allowlist`] they make.

use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

use super::address::*;

/// An allowlist pattern that cannot be used; the message says what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("allowlist pattern {pattern:?}: {problem}")]
pub struct PatternError {
    pub pattern: String,
    pub problem: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(super) enum Target {
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
pub(super) fn parse_decimal(text: &str, max_digits: usize) -> Option<u32> {
    let plain = !text.is_empty() && text.len() <= max_digits;
    (plain && text.bytes().all(|b| b.is_ascii_digit())).then(|| text.parse().ok())?
}

pub(super) fn parse_port(text: &str) -> Result<u16, String> {
    (parse_decimal(text, 5).and_then(|port| u16::try_from(port).ok()))
        .filter(|port| *port != 0)
        .ok_or_else(|| format!("port {text:?} is not a number from 1 to 65535"))
}

/// Lowercases, strips one trailing dot and checks DNS syntax; refuses IP address spellings.
pub(super) fn normalise_name(raw: &str) -> Result<String, String> {
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

/// The ports entries give one name: `None` is any port.
pub(super) type Ports = Vec<Option<u16>>;

pub(super) fn add_port(ports: &mut Ports, port: Option<u16>) {
    if !ports.contains(&port) {
        ports.push(port);
    }
}

pub(super) fn port_allowed(only: Option<u16>, port: u16) -> bool {
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
    pub(super) fn allows_name(&self, name: &str, port: u16) -> bool {
        let allows = |ports: &Ports| ports.iter().any(|only| port_allowed(*only, port));
        // Suffixes start after a dot, so `*.b.c` matches `a.b.c` but never `b.c` or `xb.c`.
        self.names.get(name).is_some_and(allows)
            || (name.match_indices('.'))
                .any(|(dot, _)| self.below.get(&name[dot + 1..]).is_some_and(allows))
    }

    /// `ip` must be canonical.
    pub(super) fn covers(&self, ip: IpAddr, port: u16) -> bool {
        (self.networks.iter())
            .any(|(network, only)| network.contains(ip) && port_allowed(*only, port))
    }
}

//! Addresses: networks, every IPv4 spelling `inet_aton` accepts, the
//! canonical form of mapped IPv6, the special ranges, this host's own.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use super::pattern::normalise_name;

/// An address with a prefix length; the address has no bits set past the prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(super) struct Network {
    pub(super) addr: IpAddr,
    pub(super) prefix: u8,
}

impl Network {
    /// Builds a network, refusing host bits; IPv4-mapped/compatible IPv6 networks become IPv4
    /// because the addresses they are compared with are canonicalised the same way.
    pub(super) fn new(addr: IpAddr, prefix: u8) -> Result<Network, String> {
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

    pub(super) fn is_single(&self) -> bool {
        self.prefix == if self.addr.is_ipv4() { 32 } else { 128 }
    }

    /// `ip` must already be canonical.
    pub(super) fn contains(&self, ip: IpAddr) -> bool {
        self.addr.is_ipv4() == ip.is_ipv4() && mask(ip, self.prefix) == self.addr
    }
}

pub(super) fn mask(addr: IpAddr, prefix: u8) -> IpAddr {
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

/// All digits, or `0x` and hex digits: a label the WHATWG URL parser takes as a number.
pub(super) fn is_numeric_label(label: &str) -> bool {
    match label.strip_prefix("0x") {
        Some(hex) => hex.bytes().all(|b| b.is_ascii_hexdigit()),
        None => !label.is_empty() && label.bytes().all(|b| b.is_ascii_digit()),
    }
}

/// glibc `inet_aton`: 1 to 4 dot-separated C numbers (decimal, 0-octal, 0x-hex), the last one
/// filling all remaining bytes. `text` must be lowercase.
pub(super) fn parse_inet_aton(text: &str) -> Option<Ipv4Addr> {
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
pub(super) fn parse_c_number(part: &str) -> Option<u32> {
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
pub(super) enum Host {
    Ip(IpAddr),
    Name(String),
}

pub(super) fn parse_host(raw: &str) -> Option<Host> {
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
pub(super) const SPECIAL_V4: [(u32, u8); 15] = [
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
pub(super) const SPECIAL_V6: [(u128, u8); 11] = [
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

pub(super) fn is_special_v4(v4: Ipv4Addr) -> bool {
    let bits = u32::from(v4);
    SPECIAL_V4.iter().any(|(net, prefix)| {
        bits & u32::MAX.checked_shl(32 - u32::from(*prefix)).unwrap_or(0) == *net
    })
}

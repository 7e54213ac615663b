//! The operator's hosts-format file: names mapped to addresses.

use std::collections::HashMap;
use std::net::IpAddr;

use super::address::*;
use super::pattern::*;

/// A hosts-format file line that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("hosts file line {line}: {problem}")]
pub struct HostsError {
    pub line: usize,
    pub problem: String,
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

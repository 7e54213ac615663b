//! Walking a tar's entries with its extension headers (GNU long names, pax)
//! read here, each bounded, rather than by the tar crate, which reads them
//! whole into memory whatever size they declare.

use std::io::Read;

/// The largest long name or pax header accepted.
pub(super) const MAX_EXTENSION: u64 = 1 << 20;

/// An entry's name and metadata, extension headers applied.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(super) struct Meta {
    pub path: Vec<u8>,
    pub link: Option<Vec<u8>>,
    pub uid: u64,
    pub gid: u64,
    pub mtime: i64,
    /// The `security.capability` xattr (file capabilities, e.g. ping's).
    pub capability: Option<Vec<u8>>,
}

/// The tar crate in raw mode: it parses each header and skips data, nothing
/// more.
pub(super) struct Walker<'a, R: Read> {
    entries: tar::Entries<'a, R>,
}

impl<'a, R: Read> Walker<'a, R> {
    pub(super) fn new(entries: tar::Entries<'a, R>) -> Self {
        Walker {
            entries: entries.raw(true),
        }
    }

    /// The next real entry with its data unread, or why the tar is malformed.
    #[allow(clippy::type_complexity)]
    pub(super) fn next_entry(&mut self) -> Result<Option<(tar::Entry<'a, R>, Meta)>, String> {
        let mut long_name: Option<Vec<u8>> = None;
        let mut long_link: Option<Vec<u8>> = None;
        let mut pax: Option<Vec<u8>> = None;
        loop {
            let Some(entry) = self.entries.next() else {
                if long_name.is_some() || long_link.is_some() || pax.is_some() {
                    return Err(
                        "the tar ends after an extended header, with no entry for it".into(),
                    );
                }
                return Ok(None);
            };
            let mut entry = entry.map_err(|e| format!("not a valid tar: {e}"))?;
            let ty = entry.header().entry_type();
            // As the tar crate does: old (v7) headers have no extensions.
            let modern = entry.header().as_gnu().is_some() || entry.header().as_ustar().is_some();
            let slot = match () {
                _ if !modern => None,
                _ if ty.is_gnu_longname() => Some(&mut long_name),
                _ if ty.is_gnu_longlink() => Some(&mut long_link),
                _ if ty.is_pax_local_extensions() => Some(&mut pax),
                _ => None,
            };
            if let Some(slot) = slot {
                if slot.is_some() {
                    return Err("two extended headers of one kind for one entry".into());
                }
                let size = entry.size();
                if size > MAX_EXTENSION {
                    return Err(format!(
                        "an extended header of {size} bytes, more than the {MAX_EXTENSION} allowed"
                    ));
                }
                let mut buf = Vec::with_capacity(size as usize);
                entry
                    .read_to_end(&mut buf)
                    .map_err(|e| format!("cannot read an extended header: {e}"))?;
                *slot = Some(buf);
                continue;
            }
            if modern && ty.is_pax_global_extensions() {
                continue;
            }
            let meta = meta(&entry, long_name, long_link, pax)?;
            if ty.is_gnu_sparse() {
                return Err(format!(
                    "entry {}: GNU sparse files are not supported",
                    String::from_utf8_lossy(&meta.path)
                ));
            }
            return Ok(Some((entry, meta)));
        }
    }
}

fn meta<R: Read>(
    entry: &tar::Entry<'_, R>,
    long_name: Option<Vec<u8>>,
    long_link: Option<Vec<u8>>,
    pax: Option<Vec<u8>>,
) -> Result<Meta, String> {
    let header = entry.header();
    let strip_nuls = |mut v: Vec<u8>| {
        while v.last() == Some(&0) {
            v.pop();
        }
        v
    };
    let mut meta = Meta {
        path: long_name
            .map(strip_nuls)
            .unwrap_or_else(|| header.path_bytes().into_owned()),
        link: long_link
            .map(strip_nuls)
            .or_else(|| header.link_name_bytes().map(|l| l.into_owned())),
        uid: numeric(header.uid(), &header.as_old().uid, "uid")?,
        gid: numeric(header.gid(), &header.as_old().gid, "gid")?,
        mtime: numeric(header.mtime(), &header.as_old().mtime, "mtime")?
            .try_into()
            .unwrap_or(i64::MAX),
        capability: None,
    };
    let Some(pax) = pax else {
        return Ok(meta);
    };
    for ext in tar::PaxExtensions::new(&pax) {
        let ext = ext.map_err(|e| format!("malformed pax header: {e}"))?;
        let value = ext.value_bytes();
        let number = || std::str::from_utf8(value).ok();
        match ext.key_bytes() {
            b"path" => meta.path = value.to_vec(),
            b"linkpath" => meta.link = Some(value.to_vec()),
            b"uid" => meta.uid = parse_u64(number(), "uid")?,
            b"gid" => meta.gid = parse_u64(number(), "gid")?,
            // Seconds, maybe with a fraction: the whole seconds are kept.
            b"mtime" => {
                if let Some(secs) = number()
                    .and_then(|s| s.split('.').next())
                    .and_then(|s| s.parse::<i64>().ok())
                {
                    meta.mtime = secs;
                }
            }
            // Raw mode skips the header's size of data: another size here
            // would put us out of step with the stream.
            b"size" if parse_u64(number(), "size")? != entry.size() => {
                return Err(format!(
                    "entry {}: a pax size differs from its header's (files over 8 GiB are not supported)",
                    String::from_utf8_lossy(&meta.path)
                ));
            }
            b"SCHILY.xattr.security.capability" => meta.capability = Some(value.to_vec()),
            _ => {}
        }
    }
    Ok(meta)
}

/// A header's number; a blank field (some writers leave them so) is 0.
fn numeric(parsed: std::io::Result<u64>, raw: &[u8], what: &str) -> Result<u64, String> {
    match parsed {
        Ok(n) => Ok(n),
        Err(_) if raw.iter().all(|b| matches!(b, 0 | b' ')) => Ok(0),
        Err(e) => Err(format!("bad {what} in a header: {e}")),
    }
}

fn parse_u64(value: Option<&str>, what: &str) -> Result<u64, String> {
    value
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("malformed pax {what} record"))
}

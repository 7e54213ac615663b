//! Where the image's files are: a layout directory, or members of a tar
//! (optionally compressed) found by one pass over its headers.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, Seek};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::blob::{self, Capped, Compression, Region};
use super::tarwalk::Walker;
use super::{Limits, OciError, OciSource};

/// Symlinks followed between members of an archive (legacy `docker save`
/// links a layer shared by two images).
const MAX_MEMBER_HOPS: usize = 16;

pub(super) struct Store {
    kind: Kind,
    /// The source's path, for messages.
    pub(super) label: String,
}

enum Kind {
    Dir(PathBuf),
    Tar {
        file: Arc<File>,
        members: HashMap<Vec<u8>, Member>,
    },
}

enum Member {
    File {
        offset: u64,
        size: u64,
    },
    /// A symlink, relative to the member's directory.
    Symlink(Vec<u8>),
    /// A hard link, relative to the archive's root.
    Hard(Vec<u8>),
}

impl Store {
    pub(super) fn new(
        source: &OciSource,
        scratch: &Path,
        limits: &Limits,
        progress: &mut dyn FnMut(&str),
    ) -> Result<Store, OciError> {
        let path = source.path();
        let label = path.display().to_string();
        let read_err = |source| OciError::Read {
            path: label.clone(),
            source,
        };
        let kind = match source {
            OciSource::Layout(dir) => {
                if !fs::metadata(dir).map_err(read_err)?.is_dir() {
                    return Err(OciError::Malformed {
                        what: label,
                        reason: "an OCI layout must be a directory".into(),
                    });
                }
                Kind::Dir(dir.clone())
            }
            OciSource::Archive(path) => {
                let file = File::open(path).map_err(read_err)?;
                let len = file.metadata().map_err(read_err)?.len();
                let mut whole = Region::new(Arc::new(file), 0, len);
                let file = match blob::detect(&mut whole).map_err(read_err)? {
                    Compression::None | Compression::Detect => whole.into_file(),
                    compression => {
                        progress(&format!("decompressing {label}"));
                        Arc::new(decompress(whole, compression, scratch, limits, &label)?)
                    }
                };
                let members = index_tar(&file, limits, &label)?;
                Kind::Tar { file, members }
            }
        };
        Ok(Store { kind, label })
    }

    /// The file `name` (relative to the image's root), or an error naming
    /// `shown` (the blob's digest) as missing.
    pub(super) fn open(&self, name: &str, shown: &str) -> Result<Region, OciError> {
        self.get(name)?.ok_or_else(|| OciError::Blob {
            digest: shown.to_owned(),
            reason: format!("{name} is missing from {}", self.label),
        })
    }

    pub(super) fn get(&self, name: &str) -> Result<Option<Region>, OciError> {
        let Some(key) = normalize(name.as_bytes()) else {
            return Ok(None);
        };
        match &self.kind {
            Kind::Dir(dir) => self.get_file(dir, &key),
            Kind::Tar { file, members } => {
                let mut key = key;
                for _ in 0..MAX_MEMBER_HOPS {
                    let next = match members.get(&key) {
                        None => return Ok(None),
                        Some(Member::File { offset, size }) => {
                            return Ok(Some(Region::new(file.clone(), *offset, *size)));
                        }
                        Some(Member::Hard(target)) => normalize(target),
                        Some(Member::Symlink(target)) => {
                            normalize(&[parent_of(&key), b"/", target].concat())
                        }
                    };
                    let Some(next) = next else {
                        return Ok(None);
                    };
                    key = next;
                }
                Ok(None)
            }
        }
    }

    /// A regular file of the layout directory, reached through no symlink:
    /// the directory may have been made by extracting an untrusted archive.
    fn get_file(&self, dir: &Path, key: &[u8]) -> Result<Option<Region>, OciError> {
        let path = dir.join(std::ffi::OsStr::from_bytes(key));
        let read_err = |source| OciError::Read {
            path: path.display().to_string(),
            source,
        };
        let mut at = dir.to_path_buf();
        for c in key.split(|b| *b == b'/') {
            at.push(std::ffi::OsStr::from_bytes(c));
            match fs::symlink_metadata(&at) {
                Ok(m) if m.file_type().is_symlink() => {
                    return Err(OciError::Malformed {
                        what: at.display().to_string(),
                        reason: "a symlink inside an OCI layout is refused".into(),
                    });
                }
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
                Err(e) => return Err(read_err(e)),
            }
        }
        let file = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&path)
            .map_err(read_err)?;
        let meta = file.metadata().map_err(read_err)?;
        if !meta.is_file() {
            return Err(OciError::Malformed {
                what: path.display().to_string(),
                reason: "not a regular file".into(),
            });
        }
        Ok(Some(Region::new(Arc::new(file), 0, meta.len())))
    }
}

/// The directory part of a member name ("" at the root).
fn parent_of(key: &[u8]) -> &[u8] {
    key.iter()
        .rposition(|c| *c == b'/')
        .map_or(&[], |i| &key[..i])
}

/// A member name with `.` and empty components dropped and `..` applied;
/// None if it climbs above the root.
fn normalize(raw: &[u8]) -> Option<Vec<u8>> {
    let mut parts: Vec<&[u8]> = Vec::new();
    for c in raw.split(|b| *b == b'/') {
        match c {
            b"" | b"." => {}
            b".." => {
                parts.pop()?;
            }
            _ => parts.push(c),
        }
    }
    (!parts.is_empty()).then(|| parts.join(&b'/'))
}

/// Decompresses a whole archive into an unnamed temporary file beside the
/// tree, so that its members can be read by offset.
fn decompress(
    whole: Region,
    compression: Compression,
    scratch: &Path,
    limits: &Limits,
    label: &str,
) -> Result<File, OciError> {
    let mut tmp = tempfile::tempfile_in(scratch).map_err(|source| OciError::Write {
        path: scratch.display().to_string(),
        source,
    })?;
    let malformed = |e: io::Error| OciError::Malformed {
        what: label.to_owned(),
        reason: format!("cannot decompress: {e}"),
    };
    let decoded =
        blob::decoder(BufReader::with_capacity(1 << 18, whole), compression).map_err(malformed)?;
    let mut capped = Capped::new(
        decoded,
        blob::stream_cap(limits),
        "the decompressed archive",
    );
    io::copy(&mut capped, &mut tmp).map_err(malformed)?;
    Ok(tmp)
}

/// One pass over the archive's headers: where each member's data is.
fn index_tar(
    file: &Arc<File>,
    limits: &Limits,
    label: &str,
) -> Result<HashMap<Vec<u8>, Member>, OciError> {
    let malformed = |reason: String| OciError::Malformed {
        what: label.to_owned(),
        reason,
    };
    // The tar crate counts offsets from where it starts reading.
    let mut reader = BufReader::new(&**file);
    reader
        .seek(io::SeekFrom::Start(0))
        .map_err(|source| OciError::Read {
            path: label.to_owned(),
            source,
        })?;
    let mut archive = tar::Archive::new(reader);
    let entries = archive
        .entries_with_seek()
        .map_err(|e| malformed(format!("not a valid tar: {e}")))?;
    let mut walker = Walker::new(entries);
    let mut members = HashMap::new();
    let mut count = 0u64;
    while let Some((entry, meta)) = walker.next_entry().map_err(malformed)? {
        count += 1;
        if count > limits.max_entries {
            return Err(malformed(format!(
                "more than {} members, the limit",
                limits.max_entries
            )));
        }
        let Some(key) = normalize(&meta.path) else {
            continue;
        };
        let member = match (entry.header().entry_type(), meta.link) {
            (tar::EntryType::Regular | tar::EntryType::Continuous, _) => Member::File {
                offset: entry.raw_file_position(),
                size: entry.size(),
            },
            (tar::EntryType::Symlink, Some(target)) => Member::Symlink(target),
            (tar::EntryType::Link, Some(target)) => Member::Hard(target),
            _ => continue,
        };
        // A later member of the same name wins, as when extracting.
        members.insert(key, member);
    }
    Ok(members)
}

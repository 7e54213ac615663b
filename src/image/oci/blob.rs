//! Reading blobs: byte ranges of a file, decompression, digest checks.

use std::fs::File;
use std::io::{self, BufReader, Read};
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use sha2::{Digest as _, Sha256};

use super::Limits;

/// Bytes of decompressed stream allowed per byte of content limit: tar
/// headers and padding come on top of file contents.
pub(super) fn stream_cap(limits: &Limits) -> u64 {
    limits
        .max_total_bytes
        .saturating_add(limits.max_entries.saturating_mul(1024))
}

/// A byte range of a file, read with positional reads so that several can
/// share one file.
#[derive(Debug)]
pub(super) struct Region {
    file: Arc<File>,
    start: u64,
    len: u64,
    pos: u64,
}

impl Region {
    pub(super) fn new(file: Arc<File>, start: u64, len: u64) -> Region {
        Region {
            file,
            start,
            len,
            pos: 0,
        }
    }

    pub(super) fn len(&self) -> u64 {
        self.len
    }

    /// The whole file, for a region that spans it.
    pub(super) fn into_file(self) -> Arc<File> {
        self.file
    }

    pub(super) fn rewind(&mut self) {
        self.pos = 0;
    }
}

impl Read for Region {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let left = self.len - self.pos;
        let want = usize::try_from(left).unwrap_or(usize::MAX).min(buf.len());
        if want == 0 {
            return Ok(0);
        }
        let n = self.file.read_at(&mut buf[..want], self.start + self.pos)?;
        self.pos += n as u64;
        Ok(n)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Compression {
    None,
    Gzip,
    Zstd,
    /// Decided by the stream's magic bytes (legacy `docker save` layers,
    /// whose paths say nothing).
    Detect,
}

/// Reads the magic bytes at the start of `region`, then rewinds it.
pub(super) fn detect(region: &mut Region) -> io::Result<Compression> {
    let mut magic = [0u8; 4];
    let mut got = 0;
    while got < magic.len() {
        let n = region.read(&mut magic[got..])?;
        if n == 0 {
            break;
        }
        got += n;
    }
    region.rewind();
    Ok(match magic[..got] {
        [0x1f, 0x8b, ..] => Compression::Gzip,
        [0x28, 0xb5, 0x2f, 0xfd] => Compression::Zstd,
        _ => Compression::None,
    })
}

pub(super) fn decoder<'a, R: io::BufRead + 'a>(
    reader: R,
    compression: Compression,
) -> io::Result<Box<dyn Read + 'a>> {
    Ok(match compression {
        Compression::None | Compression::Detect => Box::new(reader),
        // Layers may be several gzip members back to back.
        Compression::Gzip => Box::new(flate2::bufread::MultiGzDecoder::new(reader)),
        Compression::Zstd => Box::new(zstd::stream::read::Decoder::with_buffer(reader)?),
    })
}

/// Fails a read past `cap` bytes, naming what was too long: a bound on a
/// decompressed stream, whose size nothing declares.
pub(super) struct Capped<R> {
    inner: R,
    left: u64,
    what: &'static str,
}

impl<R: Read> Capped<R> {
    pub(super) fn new(inner: R, cap: u64, what: &'static str) -> Capped<R> {
        Capped {
            inner,
            left: cap,
            what,
        }
    }
}

impl<R: Read> Read for Capped<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.left == 0 {
            // At the cap: only a clean end is fine.
            let mut probe = [0u8; 1];
            return match self.inner.read(&mut probe)? {
                0 => Ok(0),
                _ => Err(io::Error::other(format!(
                    "{} is longer than the limit allows",
                    self.what
                ))),
            };
        }
        let want = usize::try_from(self.left)
            .unwrap_or(usize::MAX)
            .min(buf.len());
        let n = self.inner.read(&mut buf[..want])?;
        self.left -= n as u64;
        Ok(n)
    }
}

/// What a blob must hash to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Check {
    /// The stored (maybe compressed) bytes: a descriptor's digest and size.
    Blob { hex: String, size: u64 },
    /// The decompressed tar: a legacy config's diff ID.
    DiffId { hex: String },
}

#[derive(Debug)]
pub(super) enum VerifyError {
    /// The bytes are not the ones the image names.
    Mismatch(String),
    /// The bytes could not be read or decompressed.
    Content(String),
}

/// SHA-256 of everything `reader` yields, and how many bytes that was.
pub(super) fn sha256_hex(mut reader: impl Read) -> io::Result<(String, u64)> {
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 18];
    let mut total = 0u64;
    loop {
        let n = match reader.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        hasher.update(&buf[..n]);
        total += n as u64;
    }
    Ok((hex(&hasher.finalize()), total))
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    bytes.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// Checks a layer before any of it is applied; leaves `region` rewound.
pub(super) fn verify_layer(
    region: &mut Region,
    compression: Compression,
    check: &Check,
    limits: &Limits,
) -> Result<(), VerifyError> {
    region.rewind();
    let result = match check {
        Check::Blob { hex, size } => {
            if region.len() != *size {
                return Err(VerifyError::Mismatch(format!(
                    "holds {} bytes, its descriptor says {size}",
                    region.len()
                )));
            }
            let (got, _) = sha256_hex(BufReader::with_capacity(1 << 18, &mut *region))
                .map_err(|e| VerifyError::Content(format!("cannot read: {e}")))?;
            (got, hex)
        }
        Check::DiffId { hex } => {
            let reader = BufReader::with_capacity(1 << 18, &mut *region);
            let decoded = decoder(reader, compression)
                .map_err(|e| VerifyError::Content(format!("cannot decompress: {e}")))?;
            let capped = Capped::new(decoded, stream_cap(limits), "the decompressed layer");
            let (got, _) = sha256_hex(capped)
                .map_err(|e| VerifyError::Content(format!("cannot decompress: {e}")))?;
            (got, hex)
        }
    };
    region.rewind();
    let (got, want) = result;
    if got != *want {
        return Err(VerifyError::Mismatch(format!(
            "its content hashes to sha256:{got}, not the sha256:{want} the image names"
        )));
    }
    Ok(())
}

/// Reads a small blob whole and checks it against `hex` (and `size` when
/// the image declares one).
pub(super) fn read_verified(
    mut region: Region,
    hex: &str,
    size: Option<u64>,
    max: u64,
) -> Result<Vec<u8>, VerifyError> {
    if let Some(size) = size
        && region.len() != size
    {
        return Err(VerifyError::Mismatch(format!(
            "holds {} bytes, its descriptor says {size}",
            region.len()
        )));
    }
    if region.len() > max {
        return Err(VerifyError::Content(format!(
            "{} bytes, more than the {max} allowed for a JSON document",
            region.len()
        )));
    }
    let mut bytes = Vec::new();
    region
        .read_to_end(&mut bytes)
        .map_err(|e| VerifyError::Content(format!("cannot read: {e}")))?;
    let (got, _) = sha256_hex(&bytes[..]).map_err(|e| VerifyError::Content(e.to_string()))?;
    if got != hex {
        return Err(VerifyError::Mismatch(format!(
            "its content hashes to sha256:{got}, not the sha256:{hex} the image names"
        )));
    }
    Ok(bytes)
}

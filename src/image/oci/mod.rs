//! Unpacking an OCI or Docker image into a root-filesystem directory, the
//! base of a custom guest image.
//!
//! Inputs: an OCI image layout directory, an OCI archive (a tar, optionally
//! gzip or zstd, of such a layout), or a `docker save` archive (Docker 25+
//! writes an OCI layout; older ones only the legacy `manifest.json`).
//!
//! The image is untrusted. Every blob is checked against its digest and size
//! before it is used, and each layer's tar headers are checked in that same
//! pass (sizes, counts), so the pass that writes never meets an oversized
//! header. Entry paths may not leave the tree, and symlinks already in the
//! tree are resolved inside it as a chroot would, never on the host.

mod blob;
mod layer;
mod source;
mod store;
mod tarwalk;
#[cfg(test)]
mod tests;

use std::io::{self, BufReader};
use std::path::{Path, PathBuf};

use blob::{Check, Compression};

/// Where an image comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OciSource {
    /// A tar (optionally compressed): an OCI archive or a `docker save`.
    Archive(PathBuf),
    /// An OCI image layout directory.
    Layout(PathBuf),
}

impl OciSource {
    /// Parses `oci-archive:PATH`, `docker-archive:PATH` or `oci-layout:DIR`;
    /// a relative path is taken relative to `relative_to`.
    pub fn parse(spec: &str, relative_to: &Path) -> Result<OciSource, OciError> {
        let bad = |reason: &str| OciError::Spec {
            spec: spec.to_owned(),
            reason: reason.to_owned(),
        };
        let (kind, path) = spec.split_once(':').ok_or_else(|| {
            bad("expected oci-archive:PATH, docker-archive:PATH or oci-layout:DIR")
        })?;
        if path.is_empty() {
            return Err(bad("the path is empty"));
        }
        let path = relative_to.join(path);
        match kind {
            "oci-archive" | "docker-archive" => Ok(OciSource::Archive(path)),
            "oci-layout" => Ok(OciSource::Layout(path)),
            _ => Err(bad(
                "unknown kind: use oci-archive:PATH, docker-archive:PATH or oci-layout:DIR",
            )),
        }
    }

    fn path(&self) -> &Path {
        match self {
            OciSource::Archive(p) | OciSource::Layout(p) => p,
        }
    }
}

/// Bounds on what an untrusted image may make us write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Bytes of regular-file content over all layers (overwritten files
    /// count too). A compressed archive is decompressed to a temporary file
    /// of at most this plus 1 KiB per allowed entry.
    pub max_total_bytes: u64,
    /// Tar entries over all layers, whiteouts included.
    pub max_entries: u64,
    pub max_layers: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_total_bytes: 16 << 30,
            max_entries: 2_000_000,
            max_layers: 128,
        }
    }
}

/// What was unpacked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unpacked {
    /// The chosen manifest's digest; for a legacy `docker save`, which has no
    /// manifest blob, the image ID (its config's digest).
    pub manifest_digest: String,
    /// Layer digests in order (for a legacy `docker save`, the diff IDs).
    pub layers: Vec<String>,
    /// The config's `Env`.
    pub env: Vec<String>,
    /// Entries created: files, directories, links, fifos.
    pub files: u64,
    /// Regular-file bytes written.
    pub bytes: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum OciError {
    #[error("image source {spec:?}: {reason}")]
    Spec { spec: String, reason: String },
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot write {path}: {source}")]
    Write {
        path: String,
        #[source]
        source: io::Error,
    },
    /// A file of the image (archive, index.json, manifest, config) is not
    /// what it must be.
    #[error("{what}: {reason}")]
    Malformed { what: String, reason: String },
    /// A blob is missing, too large, or does not match its descriptor.
    #[error("blob {digest}: {reason}")]
    Blob { digest: String, reason: String },
    #[error("{what} holds no linux/amd64 image (it has: {found})")]
    NoPlatform { what: String, found: String },
    #[error("layer {index} ({digest}): {reason}")]
    Layer {
        index: usize,
        digest: String,
        reason: String,
    },
    #[error("layer {index} ({digest}) entry {entry}: {reason}")]
    Entry {
        index: usize,
        digest: String,
        entry: String,
        reason: String,
    },
}

/// A layer to apply, as the image describes it.
#[derive(Debug)]
struct LayerRef {
    /// Shown and returned: the blob digest, or the diff ID (legacy).
    digest: String,
    /// The member or file holding it, relative to the image's root.
    name: String,
    compression: Compression,
    check: Check,
}

/// The image chosen from the source.
#[derive(Debug)]
struct Resolved {
    manifest_digest: String,
    layers: Vec<LayerRef>,
    env: Vec<String>,
}

/// Unpacks `source` into `tree` (created if missing). On error the tree is
/// left partial: the caller removes it.
pub fn unpack(
    source: &OciSource,
    tree: &Path,
    limits: &Limits,
    progress: &mut dyn FnMut(&str),
) -> Result<Unpacked, OciError> {
    // Scratch space (a decompressed archive) lives beside the tree, on the
    // same disk the tree is written to.
    let scratch = match tree.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    std::fs::create_dir_all(tree).map_err(|source| OciError::Write {
        path: tree.display().to_string(),
        source,
    })?;
    progress(&format!("reading {}", source.path().display()));
    let store = store::Store::new(source, scratch, limits, progress)?;
    let image = source::resolve(&store)?;
    if image.layers.len() > limits.max_layers {
        return Err(OciError::Malformed {
            what: format!("image {}", image.manifest_digest),
            reason: format!(
                "{} layers, more than the limit of {}",
                image.layers.len(),
                limits.max_layers
            ),
        });
    }
    let mut applier = layer::Applier::new(tree, limits);
    let count = image.layers.len();
    for (i, layer) in image.layers.iter().enumerate() {
        let index = i + 1;
        let layer_err = |reason: String| OciError::Layer {
            index,
            digest: layer.digest.clone(),
            reason,
        };
        progress(&format!(
            "layer {index}/{count} {}: verifying",
            layer.digest
        ));
        let mut region = store.open(&layer.name, &layer.digest)?;
        let compression = match layer.compression {
            Compression::Detect => {
                blob::detect(&mut region).map_err(|e| layer_err(format!("cannot read: {e}")))?
            }
            known => known,
        };
        blob::verify_layer(&mut region, compression, &layer.check, limits).map_err(
            |e| match e {
                blob::VerifyError::Mismatch(reason) => OciError::Blob {
                    digest: layer.digest.clone(),
                    reason,
                },
                blob::VerifyError::Content(reason) => layer_err(reason),
            },
        )?;
        progress(&format!("layer {index}/{count} {}: applying", layer.digest));
        region.rewind();
        let reader = blob::decoder(BufReader::with_capacity(1 << 18, region), compression)
            .map_err(|e| layer_err(format!("cannot decompress: {e}")))?;
        let skipped = applier.apply(index, &layer.digest, reader)?;
        if skipped > 0 {
            progress(&format!(
                "layer {index}: skipped {skipped} device node(s) (the guest mounts devtmpfs)"
            ));
        }
    }
    Ok(Unpacked {
        manifest_digest: image.manifest_digest,
        layers: image.layers.into_iter().map(|l| l.digest).collect(),
        env: image.env,
        files: applier.files,
        bytes: applier.bytes,
    })
}

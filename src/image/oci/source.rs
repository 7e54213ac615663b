//! Choosing the image in a store: index.json followed to linux/amd64, or a
//! legacy `docker save` manifest.json; reading its manifest and config.

use std::io::Read;

use oci_spec::image::{
    Arch, Descriptor, DigestAlgorithm, ImageConfiguration, ImageIndex, ImageManifest, MediaType,
    OciLayout, Os,
};
use serde::Deserialize;
use serde::de::DeserializeOwned;

use super::blob::{self, Check, Compression, Region, VerifyError};
use super::store::Store;
use super::{LayerRef, OciError, Resolved};

/// The largest index, manifest or config read.
const MAX_JSON: u64 = 8 << 20;
/// Image indexes followed inside one another.
const MAX_DEPTH: usize = 4;

/// Chooses the image in `store` and reads its manifest and config.
pub(super) fn resolve(store: &Store) -> Result<Resolved, OciError> {
    let label = &store.label;
    if let Some(index) = store.get("index.json")? {
        if let Some(layout) = store.get("oci-layout")? {
            let what = format!("{label}: oci-layout");
            let layout: OciLayout = parse_json(&read_small(layout, &what)?, &what)?;
            if !layout.image_layout_version().starts_with("1.") {
                return Err(OciError::Malformed {
                    what,
                    reason: format!(
                        "image layout version {:?} is not 1.x",
                        layout.image_layout_version()
                    ),
                });
            }
        }
        let what = format!("{label}: index.json");
        let index: ImageIndex = parse_json(&read_small(index, &what)?, &what)?;
        let mut seen = Vec::new();
        let Some(chosen) = select(store, &index, &what, 0, &mut seen)? else {
            seen.dedup();
            return Err(OciError::NoPlatform {
                what,
                found: if seen.is_empty() {
                    "no image manifest".into()
                } else {
                    seen.join(", ")
                },
            });
        };
        return from_manifest(store, &chosen);
    }
    if let Some(manifest) = store.get("manifest.json")? {
        return legacy(store, manifest);
    }
    Err(OciError::Malformed {
        what: label.clone(),
        reason: "holds neither index.json (an OCI layout) nor manifest.json (docker save)".into(),
    })
}

enum DocKind {
    Index,
    Manifest,
    Other,
}

fn doc_kind(media_type: &MediaType) -> DocKind {
    match media_type {
        MediaType::ImageIndex => DocKind::Index,
        MediaType::ImageManifest => DocKind::Manifest,
        MediaType::Other(m) if m == "application/vnd.docker.distribution.manifest.list.v2+json" => {
            DocKind::Index
        }
        MediaType::Other(m) if m == "application/vnd.docker.distribution.manifest.v2+json" => {
            DocKind::Manifest
        }
        _ => DocKind::Other,
    }
}

/// The linux/amd64 manifest of `index`, following nested indexes. A
/// manifest without a platform is taken if it is the only one (Docker's
/// index.json names its image so); its config's platform is checked later.
fn select(
    store: &Store,
    index: &ImageIndex,
    what: &str,
    depth: usize,
    seen: &mut Vec<String>,
) -> Result<Option<Descriptor>, OciError> {
    let mut unplatformed: Vec<Descriptor> = Vec::new();
    for d in index.manifests() {
        if let Some(p) = d.platform() {
            seen.push(format!("{}/{}", p.os(), p.architecture()));
            if *p.os() != Os::Linux || *p.architecture() != Arch::Amd64 {
                continue;
            }
        }
        match doc_kind(d.media_type()) {
            DocKind::Index => {
                if depth >= MAX_DEPTH {
                    return Err(OciError::Malformed {
                        what: what.to_owned(),
                        reason: format!("image indexes nest more than {MAX_DEPTH} deep"),
                    });
                }
                let nested: ImageIndex = read_json(store, d, "image index")?;
                let nested_what = format!("image index {}", d.digest());
                if let Some(m) = select(store, &nested, &nested_what, depth + 1, seen)? {
                    return Ok(Some(m));
                }
            }
            DocKind::Manifest if d.platform().is_some() => return Ok(Some(d.clone())),
            DocKind::Manifest => {
                if !unplatformed.iter().any(|u| u.digest() == d.digest()) {
                    unplatformed.push(d.clone());
                }
            }
            DocKind::Other => {}
        }
    }
    match unplatformed.len() {
        0 => Ok(None),
        1 => Ok(unplatformed.pop()),
        n => Err(OciError::Malformed {
            what: what.to_owned(),
            reason: format!(
                "lists {n} images without a platform: there is no telling which to use"
            ),
        }),
    }
}

fn from_manifest(store: &Store, desc: &Descriptor) -> Result<Resolved, OciError> {
    let manifest: ImageManifest = read_json(store, desc, "manifest")?;
    let config: ImageConfiguration = read_json(store, manifest.config(), "config")?;
    check_platform(&config, &format!("config {}", manifest.config().digest()))?;
    let layers = manifest
        .layers()
        .iter()
        .enumerate()
        .map(|(i, l)| layer_ref(i + 1, l))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Resolved {
        manifest_digest: desc.digest().to_string(),
        layers,
        env: env(&config),
    })
}

fn layer_ref(index: usize, desc: &Descriptor) -> Result<LayerRef, OciError> {
    let digest = desc.digest().to_string();
    let compression = match desc.media_type() {
        MediaType::ImageLayer | MediaType::ImageLayerNonDistributable => Compression::None,
        MediaType::ImageLayerGzip | MediaType::ImageLayerNonDistributableGzip => Compression::Gzip,
        MediaType::ImageLayerZstd | MediaType::ImageLayerNonDistributableZstd => Compression::Zstd,
        MediaType::Other(m) => match m.as_str() {
            "application/vnd.docker.image.rootfs.diff.tar" => Compression::None,
            "application/vnd.docker.image.rootfs.diff.tar.gzip"
            | "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip" => Compression::Gzip,
            "application/vnd.docker.image.rootfs.diff.tar.zstd" => Compression::Zstd,
            _ => return Err(unknown_layer(index, digest, desc.media_type())),
        },
        other => return Err(unknown_layer(index, digest, other)),
    };
    let hex = sha256_hex(desc)?;
    Ok(LayerRef {
        name: blob_path(hex),
        check: Check::Blob {
            hex: hex.to_owned(),
            size: desc.size(),
        },
        digest,
        compression,
    })
}

fn unknown_layer(index: usize, digest: String, media_type: &MediaType) -> OciError {
    OciError::Layer {
        index,
        digest,
        reason: format!(
            "media type {media_type} is not a layer type known here (tar, tar+gzip or tar+zstd)"
        ),
    }
}

/// `docker save` before Docker 25: manifest.json lists the config and the
/// layer tars by path; the config's diff IDs are the layers' digests.
fn legacy(store: &Store, manifest: Region) -> Result<Resolved, OciError> {
    #[derive(Deserialize)]
    #[serde(rename_all = "PascalCase")]
    struct LegacyImage {
        config: String,
        #[serde(default)]
        layers: Vec<String>,
    }
    let what = format!("{}: manifest.json", store.label);
    let mut images: Vec<LegacyImage> = parse_json(&read_small(manifest, &what)?, &what)?;
    let image = match images.len() {
        1 => images.remove(0),
        n => {
            return Err(OciError::Malformed {
                what,
                reason: format!("lists {n} images; an archive of exactly one is needed"),
            });
        }
    };
    // The config is named by its digest (Docker 1.10 and later).
    let file_name = image.config.rsplit('/').next().unwrap_or_default();
    let hex = file_name.strip_suffix(".json").unwrap_or(file_name);
    if !is_sha256_hex(hex) {
        return Err(OciError::Malformed {
            what,
            reason: format!(
                "config {} is not named by its digest, so it cannot be verified",
                image.config
            ),
        });
    }
    let config_digest = format!("sha256:{hex}");
    let region = store.open(&image.config, &config_digest)?;
    let bytes = blob::read_verified(region, hex, None, MAX_JSON)
        .map_err(|e| blob_error(&config_digest, e))?;
    let config: ImageConfiguration = parse_json(&bytes, &format!("config {config_digest}"))?;
    check_platform(&config, &format!("config {config_digest}"))?;
    let diff_ids = config.rootfs().diff_ids();
    if diff_ids.len() != image.layers.len() {
        return Err(OciError::Malformed {
            what: format!("config {config_digest}"),
            reason: format!(
                "names {} layers (diff IDs) but manifest.json lists {}",
                diff_ids.len(),
                image.layers.len()
            ),
        });
    }
    let mut layers = Vec::with_capacity(diff_ids.len());
    for (i, (name, diff_id)) in image.layers.iter().zip(diff_ids).enumerate() {
        let hex = diff_id
            .strip_prefix("sha256:")
            .filter(|h| is_sha256_hex(h))
            .ok_or_else(|| OciError::Layer {
                index: i + 1,
                digest: diff_id.clone(),
                reason: "the diff ID is not a sha256 digest".into(),
            })?;
        layers.push(LayerRef {
            digest: diff_id.clone(),
            name: name.clone(),
            compression: Compression::Detect,
            check: Check::DiffId {
                hex: hex.to_owned(),
            },
        });
    }
    Ok(Resolved {
        manifest_digest: config_digest,
        layers,
        env: env(&config),
    })
}

fn is_sha256_hex(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

fn env(config: &ImageConfiguration) -> Vec<String> {
    config
        .config()
        .as_ref()
        .and_then(|c| c.env().clone())
        .unwrap_or_default()
}

fn check_platform(config: &ImageConfiguration, what: &str) -> Result<(), OciError> {
    if *config.os() == Os::Linux && *config.architecture() == Arch::Amd64 {
        return Ok(());
    }
    Err(OciError::Malformed {
        what: what.to_owned(),
        reason: format!(
            "the image is for {}/{}; the guest needs linux/amd64",
            config.os(),
            config.architecture()
        ),
    })
}

fn sha256_hex(desc: &Descriptor) -> Result<&str, OciError> {
    if *desc.digest().algorithm() != DigestAlgorithm::Sha256 {
        return Err(OciError::Blob {
            digest: desc.digest().to_string(),
            reason: "only sha256 digests are supported".into(),
        });
    }
    Ok(desc.digest().digest())
}

fn blob_path(hex: &str) -> String {
    format!("blobs/sha256/{hex}")
}

fn blob_error(digest: &str, e: VerifyError) -> OciError {
    let (VerifyError::Mismatch(reason) | VerifyError::Content(reason)) = e;
    OciError::Blob {
        digest: digest.to_owned(),
        reason,
    }
}

/// A JSON blob named by `desc`, checked against its digest and size.
fn read_json<T: DeserializeOwned>(
    store: &Store,
    desc: &Descriptor,
    what: &str,
) -> Result<T, OciError> {
    let hex = sha256_hex(desc)?;
    let digest = desc.digest().to_string();
    let region = store.open(&blob_path(hex), &digest)?;
    let bytes = blob::read_verified(region, hex, Some(desc.size()), MAX_JSON)
        .map_err(|e| blob_error(&digest, e))?;
    parse_json(&bytes, &format!("{what} {digest}"))
}

/// A file that no digest names (index.json, oci-layout, manifest.json).
fn read_small(mut region: Region, what: &str) -> Result<Vec<u8>, OciError> {
    if region.len() > MAX_JSON {
        return Err(OciError::Malformed {
            what: what.to_owned(),
            reason: format!("{} bytes, more than the {MAX_JSON} allowed", region.len()),
        });
    }
    let mut bytes = Vec::new();
    region
        .read_to_end(&mut bytes)
        .map_err(|source| OciError::Read {
            path: what.to_owned(),
            source,
        })?;
    Ok(bytes)
}

fn parse_json<T: DeserializeOwned>(bytes: &[u8], what: &str) -> Result<T, OciError> {
    serde_json::from_slice(bytes).map_err(|e| OciError::Malformed {
        what: what.to_owned(),
        reason: format!("invalid JSON: {e}"),
    })
}

//! What `airlock image list|show|remove` print.

use std::fmt::Write;
use std::path::Path;

use anyhow::{Context, Result};

use super::names;

/// One line per image in the cache.
pub fn list(cache: &Path) -> Result<String> {
    let listed = names::list(cache)?;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<20} {:<32} {:<28} {:>9}  BUILT",
        "NAME", "KEY", "BASE", "SIZE"
    );
    for item in &listed {
        let manifest = &item.image.manifest;
        let (name, base) = match &manifest.custom {
            Some(custom) => {
                let name = if item.current {
                    custom.name.clone()
                } else {
                    format!("{} (older)", custom.name)
                };
                (name, custom.base.source.clone())
            }
            None => (
                if item.current {
                    names::DEFAULT_IMAGE.to_string()
                } else {
                    format!("{} (older)", names::DEFAULT_IMAGE)
                },
                format!("debian {} (built-in)", manifest.rootfs.suite),
            ),
        };
        let _ = writeln!(
            out,
            "{:<20} {:<32} {:<28} {:>6} MiB  {}",
            name,
            manifest.recipe_hash,
            shorten(&base, 28),
            item.disk_bytes >> 20,
            manifest.build_date
        );
    }
    if listed.is_empty() {
        let _ = writeln!(out, "(no images in {})", cache.display());
    }
    Ok(out)
}

fn shorten(text: &str, width: usize) -> String {
    if text.chars().count() <= width {
        return text.to_string();
    }
    let tail: String = text
        .chars()
        .rev()
        .take(width - 1)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect();
    format!("…{tail}")
}

/// The manifest, as JSON (every package and version is in it).
pub fn show(cache: &Path, name: &str) -> Result<String> {
    let image = find(cache, name)?;
    let text = std::fs::read_to_string(image.dir.join("manifest.json"))
        .with_context(|| format!("cannot read {}/manifest.json", image.dir.display()))?;
    Ok(text)
}

/// Removes an image and its templates; says what went.
pub fn remove(cache: &Path, name: &str) -> Result<String> {
    let _lock = super::lock::BuildLock::acquire(cache)?;
    let image = names::remove(cache, name)?;
    Ok(format!(
        "airlock: removed the image {} ({}) and its templates",
        image.name(),
        image.manifest.recipe_hash
    ))
}

/// Removes what no one can use any more; says what went and what stayed.
pub fn prune(cache: &Path) -> Result<String> {
    let _lock = super::lock::BuildLock::acquire(cache)?;
    Ok(super::prune::prune(cache)?.describe())
}

fn find(cache: &Path, name: &str) -> Result<super::Image> {
    names::find(cache, name)?.with_context(|| {
        format!(
            "no image {name:?} in {} (see `airlock image list`)",
            cache.display()
        )
    })
}

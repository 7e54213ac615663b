//! Image names: the built-in image is `default`; a recipe's image is known
//! by its recipe's name, which `names/<name>` in the cache maps to the key
//! of its latest build. Listing, showing and removing go through here.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

use super::{Image, read_image};

/// The name of the built-in image.
pub const DEFAULT_IMAGE: &str = "default";

fn names_dir(cache: &Path) -> PathBuf {
    cache.join("names")
}

/// Records that `name` is now the image `key` (atomically: a reader sees
/// the old key or the new one).
pub fn record(cache: &Path, name: &str, key: &str) -> Result<()> {
    let dir = names_dir(cache);
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let path = dir.join(name);
    if std::fs::read_to_string(&path).is_ok_and(|k| k.trim() == key) {
        return Ok(());
    }
    let tmp = dir.join(format!(".{name}.{}", std::process::id()));
    std::fs::write(&tmp, format!("{key}\n"))
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, &path).with_context(|| format!("cannot write {}", path.display()))
}

/// The image built last under `name`, if it is still in the cache.
pub fn lookup(cache: &Path, name: &str) -> Result<Option<Image>> {
    if !super::custom::recipe::is_image_name(name) {
        bail!("{name:?} is not an image name");
    }
    let path = names_dir(cache).join(name);
    let key = match std::fs::read_to_string(&path) {
        Ok(key) => key.trim().to_string(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    };
    if key.is_empty() || !key.chars().all(|c| c.is_ascii_hexdigit()) {
        bail!("{} does not hold an image key", path.display());
    }
    Ok(read_image(&cache.join("images").join(key)))
}

/// One image in the cache.
#[derive(Debug, Clone)]
pub struct Listed {
    pub image: Image,
    /// Whether its name points at it (an older build of a name does not).
    pub current: bool,
    pub disk_bytes: u64,
}

/// Every image in the cache, named ones first, then by build date.
pub fn list(cache: &Path) -> Result<Vec<Listed>> {
    let images = cache.join("images");
    let entries = match std::fs::read_dir(&images) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", images.display())),
    };
    let mut listed = Vec::new();
    for entry in entries {
        let entry = entry.with_context(|| format!("cannot read {}", images.display()))?;
        let Some(image) = read_image(&entry.path()) else {
            continue;
        };
        let current = lookup(cache, image.name())
            .ok()
            .flatten()
            .is_some_and(|named| named.dir == image.dir);
        let disk_bytes = super::prune::disk_bytes(&image.dir);
        listed.push(Listed {
            image,
            current,
            disk_bytes,
        });
    }
    listed.sort_by(|a, b| {
        (b.current, a.image.name(), &b.image.manifest.build_date).cmp(&(
            a.current,
            b.image.name(),
            &a.image.manifest.build_date,
        ))
    });
    Ok(listed)
}

/// Finds an image by name (the latest build) or by key.
pub fn find(cache: &Path, name_or_key: &str) -> Result<Option<Image>> {
    if super::custom::recipe::is_image_key(name_or_key) {
        return Ok(read_image(&cache.join("images").join(name_or_key)));
    }
    lookup(cache, name_or_key)
}

/// Removes an image (by name or key), its templates and its name, unless a
/// running airlock uses it. The caller holds the build lock.
pub fn remove(cache: &Path, name_or_key: &str) -> Result<Image> {
    let image = find(cache, name_or_key)?
        .with_context(|| format!("no image {name_or_key:?} in {}", cache.display()))?;
    let Some(_claim) = super::hold::claim_unused(&image.dir) else {
        anyhow::bail!(
            "the image {} ({}) is in use by a running airlock; stop it first",
            image.name(),
            image.manifest.recipe_hash
        );
    };
    let key = image.manifest.recipe_hash.clone();
    let templates = cache.join("templates");
    if let Ok(entries) = std::fs::read_dir(&templates) {
        for entry in entries.flatten() {
            if entry
                .file_name()
                .to_string_lossy()
                .starts_with(&format!("{key}-"))
            {
                super::prune::make_writable(&entry.path());
                super::lock::remove_tree(&entry.path())?;
            }
        }
    }
    super::lock::remove_tree(&image.dir)?;
    let path = names_dir(cache).join(image.name());
    if std::fs::read_to_string(&path).is_ok_and(|k| k.trim() == key) {
        std::fs::remove_file(&path).with_context(|| format!("cannot remove {}", path.display()))?;
    }
    Ok(image)
}

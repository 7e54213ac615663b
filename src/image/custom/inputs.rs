//! The cache key of a custom image: the recipe and every byte it reads
//! from the build host (files, wheels, the OCI base), so that changing any
//! of them makes a new image and nothing else does.

use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use anyhow::{Context, Result, bail};
use sha2::{Digest, Sha256};

use super::recipe::{Base, RecipeFile};

/// Bumped when the custom build's steps change what they make.
const CUSTOM_STEPS_VERSION: &str = "custom-steps-1";

/// Files a recipe may read from the host, in all: far above any real
/// recipe, so that `from = "/"` fails instead of hashing the disk.
const MAX_INPUT_FILES: usize = 100_000;

/// The image key for `recipe` on top of the kernel and the agent.
pub fn key(recipe: &RecipeFile, kernel_key: &str, agent_sha256: &str) -> Result<String> {
    let mut h = Sha256::new();
    let mut field = |name: &str, value: &[u8]| {
        for part in [name.as_bytes(), value] {
            h.update((part.len() as u64).to_le_bytes());
            h.update(part);
        }
    };
    field("domain", CUSTOM_STEPS_VERSION.as_bytes());
    field("kernel", kernel_key.as_bytes());
    field("agent", agent_sha256.as_bytes());
    let text = serde_json::to_string(&recipe.recipe).context("cannot serialize the recipe")?;
    field("recipe", text.as_bytes());
    match recipe.recipe.base() {
        Base::Debian => field("base", crate::image::recipe::rootfs_key().as_bytes()),
        Base::Oci(spec) => {
            let path = oci_path(&spec);
            let digest = digest_tree(
                &recipe.resolve(Path::new(path)),
                "the OCI base",
                Links::Follow,
            )?;
            field("base", digest.as_bytes());
        }
    }
    if let Some(wheels) = &recipe.recipe.packages.pip_wheels {
        let dir = recipe.resolve(wheels);
        if !dir.is_dir() {
            bail!(
                "packages.pip_wheels: {} is not a directory (paths are relative to the recipe)",
                dir.display()
            );
        }
        field(
            "wheels",
            digest_tree(&dir, "packages.pip_wheels", Links::Follow)?.as_bytes(),
        );
    }
    for (i, file) in recipe.recipe.files.iter().enumerate() {
        let from = recipe.resolve(&file.from);
        let what = format!("files[{i}].from");
        field(
            "file",
            digest_tree(&from, &what, Links::AsLinks)?.as_bytes(),
        );
    }
    let digest = h.finalize();
    Ok(digest[..16].iter().map(|b| format!("{b:02x}")).collect())
}

/// The path part of an OCI base spec.
pub fn oci_path(spec: &str) -> &str {
    spec.split_once(':').map_or(spec, |(_, path)| path)
}

/// How the key sees links: as the build reads them. Wheels and the OCI
/// base are read through links; copied files keep theirs.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Links {
    Follow,
    AsLinks,
}

fn stat(path: &Path, links: Links) -> std::io::Result<std::fs::Metadata> {
    match links {
        Links::Follow => std::fs::metadata(path),
        Links::AsLinks => std::fs::symlink_metadata(path),
    }
}

/// A digest of a file, or of a directory's names, modes, link targets and
/// contents in a stable order.
fn digest_tree(path: &Path, what: &str, links: Links) -> Result<String> {
    let meta =
        stat(path, links).with_context(|| format!("{what}: cannot read {}", path.display()))?;
    let mut h = Sha256::new();
    let mut count = 0usize;
    add(&mut h, path, Path::new(""), &meta, &mut count, what, links)?;
    Ok(format!("{:x}", h.finalize()))
}

fn add(
    h: &mut Sha256,
    path: &Path,
    relative: &Path,
    meta: &std::fs::Metadata,
    count: &mut usize,
    what: &str,
    links: Links,
) -> Result<()> {
    *count += 1;
    if *count > MAX_INPUT_FILES {
        bail!("{what}: more than {MAX_INPUT_FILES} files under it");
    }
    let name = relative.as_os_str().as_encoded_bytes();
    h.update((name.len() as u64).to_le_bytes());
    h.update(name);
    h.update(meta.permissions().mode().to_le_bytes());
    if meta.file_type().is_symlink() {
        let target = std::fs::read_link(path)
            .with_context(|| format!("{what}: cannot read the link {}", path.display()))?;
        h.update(b"L");
        h.update(target.as_os_str().as_encoded_bytes());
    } else if meta.is_file() {
        h.update(b"F");
        h.update(meta.len().to_le_bytes());
        let mut file = std::fs::File::open(path)
            .with_context(|| format!("{what}: cannot read {}", path.display()))?;
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = file
                .read(&mut buf)
                .with_context(|| format!("{what}: cannot read {}", path.display()))?;
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
        }
    } else if meta.is_dir() {
        h.update(b"D");
        let mut entries: Vec<_> = std::fs::read_dir(path)
            .with_context(|| format!("{what}: cannot read {}", path.display()))?
            .collect::<Result<_, _>>()
            .with_context(|| format!("{what}: cannot read {}", path.display()))?;
        entries.sort_by_key(|e| e.file_name());
        for entry in entries {
            let child = entry.path();
            let child_meta = stat(&child, links)
                .with_context(|| format!("{what}: cannot read {}", child.display()))?;
            add(
                h,
                &child,
                &relative.join(entry.file_name()),
                &child_meta,
                count,
                what,
                links,
            )?;
        }
    } else {
        bail!("{what}: {} is a special file", path.display());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn recipe_in(dir: &Path, text: &str) -> RecipeFile {
        let path = dir.join("recipe.toml");
        std::fs::write(&path, text).unwrap();
        RecipeFile::load(&path).unwrap()
    }

    #[test]
    fn the_key_follows_the_recipe_and_the_files_it_reads() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::create_dir(d.join("wheels")).unwrap();
        std::fs::write(d.join("wheels/a-1.0-py3-none-any.whl"), b"one").unwrap();
        std::fs::write(d.join("conf"), b"x").unwrap();
        let text = "name = \"t\"\n[packages]\npip_wheels = \"wheels\"\n[[files]]\nfrom = \"conf\"\nto = \"/etc/conf\"\n";
        let first = key(&recipe_in(d, text), "k", "a").unwrap();
        assert_eq!(first, key(&recipe_in(d, text), "k", "a").unwrap());
        assert_ne!(first, key(&recipe_in(d, text), "k", "b").unwrap());
        std::fs::write(d.join("wheels/a-1.0-py3-none-any.whl"), b"two").unwrap();
        let second = key(&recipe_in(d, text), "k", "a").unwrap();
        assert_ne!(first, second, "a wheel's content");
        std::fs::write(d.join("conf"), b"y").unwrap();
        assert_ne!(
            second,
            key(&recipe_in(d, text), "k", "a").unwrap(),
            "a copied file"
        );
        let other = text.replace("name = \"t\"", "name = \"u\"");
        assert_ne!(
            second,
            key(&recipe_in(d, &other), "k", "a").unwrap(),
            "the recipe"
        );
    }

    #[test]
    fn missing_inputs_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let r = recipe_in(
            dir.path(),
            "name = \"t\"\n[packages]\npip_wheels = \"nowhere\"\n",
        );
        let err = format!("{:#}", key(&r, "k", "a").unwrap_err());
        assert!(
            err.contains("pip_wheels") && err.contains("nowhere"),
            "{err}"
        );
        // What a link points to is what the key covers.
        std::fs::write(dir.path().join("v1.tar"), b"one").unwrap();
        std::fs::write(dir.path().join("v2.tar"), b"two").unwrap();
        std::os::unix::fs::symlink("v1.tar", dir.path().join("current.tar")).unwrap();
        let linked = recipe_in(
            dir.path(),
            "name = \"t\"\nbase = \"oci-archive:current.tar\"\n",
        );
        let before = key(&linked, "k", "a").unwrap();
        std::fs::remove_file(dir.path().join("current.tar")).unwrap();
        std::os::unix::fs::symlink("v2.tar", dir.path().join("current.tar")).unwrap();
        assert_ne!(before, key(&linked, "k", "a").unwrap(), "the link's target");
        let r = recipe_in(
            dir.path(),
            "name = \"t\"\nbase = \"oci-archive:missing.tar\"\n",
        );
        let err = format!("{:#}", key(&r, "k", "a").unwrap_err());
        assert!(
            err.contains("OCI base") && err.contains("missing.tar"),
            "{err}"
        );
    }
}

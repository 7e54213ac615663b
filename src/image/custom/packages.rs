//! What an image holds, read from its package databases as files: no
//! program of the base runs on the build host for it (an OCI base's
//! programs are not trusted), and every read is bounded.

use std::path::{Path, PathBuf};

use anyhow::Result;

use super::tree;
use crate::image::rootfs::Package;

/// dpkg's status file is a few MiB even for a big image.
const STATUS_LIMIT: u64 = 64 << 20;
/// A package's metadata header, or its package.json.
const METADATA_LIMIT: u64 = 1 << 20;
/// Directories scanned, at most (site-packages, node_modules).
const MAX_ENTRIES: usize = 100_000;

/// Installed Debian packages, from /var/lib/dpkg/status.
pub fn debian(root: &Path) -> Result<Vec<Package>> {
    let Some(status) = tree::read_file(root, Path::new("/var/lib/dpkg/status"), STATUS_LIMIT)?
    else {
        return Ok(Vec::new());
    };
    let text = String::from_utf8_lossy(&status);
    let mut packages = Vec::new();
    for stanza in text.split("\n\n") {
        let field = |name: &str| {
            stanza
                .lines()
                .find_map(|l| l.strip_prefix(name).map(|v| v.trim().to_string()))
        };
        let installed = field("Status:").is_some_and(|s| s.ends_with(" installed"));
        if let (true, Some(name), Some(version)) = (installed, field("Package:"), field("Version:"))
        {
            packages.push(Package { name, version });
        }
    }
    Ok(sorted(packages))
}

/// Python distributions, from the .dist-info and .egg-info directories of
/// every site-packages and dist-packages under /usr/lib and /usr/local/lib.
pub fn python(root: &Path) -> Result<Vec<Package>> {
    let mut packages = Vec::new();
    for lib in ["/usr/lib", "/usr/local/lib"] {
        for python in children(root, Path::new(lib))? {
            if !python.to_string_lossy().starts_with("python3") {
                continue;
            }
            for kind in ["site-packages", "dist-packages"] {
                let dir = Path::new(lib).join(&python).join(kind);
                for entry in children(root, &dir)? {
                    let name = entry.to_string_lossy();
                    let metadata = if name.ends_with(".dist-info") {
                        "METADATA"
                    } else if name.ends_with(".egg-info") {
                        "PKG-INFO"
                    } else {
                        continue;
                    };
                    let path = dir.join(&entry).join(metadata);
                    if let Some(package) = read_metadata(root, &path)? {
                        packages.push(package);
                    }
                }
            }
        }
    }
    Ok(sorted(packages))
}

fn read_metadata(root: &Path, path: &Path) -> Result<Option<Package>> {
    let Ok(Some(bytes)) = tree::read_file(root, path, METADATA_LIMIT) else {
        return Ok(None);
    };
    let text = String::from_utf8_lossy(&bytes);
    // The header ends at the first empty line; the description follows.
    let header = text.split("\n\n").next().unwrap_or_default();
    let field = |name: &str| {
        header
            .lines()
            .find_map(|l| l.strip_prefix(name).map(|v| v.trim().to_string()))
    };
    Ok(match (field("Name:"), field("Version:")) {
        (Some(name), Some(version)) => Some(Package { name, version }),
        _ => None,
    })
}

/// Globally installed npm packages, from their package.json files.
pub fn npm(root: &Path) -> Result<Vec<Package>> {
    let mut packages = Vec::new();
    for dir in ["/usr/local/lib/node_modules", "/usr/lib/node_modules"] {
        let dir = Path::new(dir);
        for entry in children(root, dir)? {
            let mut paths = vec![dir.join(&entry)];
            if entry.to_string_lossy().starts_with('@') {
                paths = children(root, &dir.join(&entry))?
                    .into_iter()
                    .map(|scoped| dir.join(&entry).join(scoped))
                    .collect();
            }
            for path in paths {
                let Ok(Some(bytes)) =
                    tree::read_file(root, &path.join("package.json"), METADATA_LIMIT)
                else {
                    continue;
                };
                let Ok(json) = serde_json::from_slice::<serde_json::Value>(&bytes) else {
                    continue;
                };
                if let (Some(name), Some(version)) =
                    (json["name"].as_str(), json["version"].as_str())
                {
                    packages.push(Package {
                        name: name.to_string(),
                        version: version.to_string(),
                    });
                }
            }
        }
    }
    Ok(sorted(packages))
}

/// The names in the directory `guest` of the tree (none if it is not one).
fn children(root: &Path, guest: &Path) -> Result<Vec<PathBuf>> {
    let host = tree::resolve(root, guest, true)?;
    if !std::fs::symlink_metadata(&host).is_ok_and(|m| m.is_dir()) {
        return Ok(Vec::new());
    }
    let mut names: Vec<PathBuf> = std::fs::read_dir(&host)
        .into_iter()
        .flatten()
        .flatten()
        .take(MAX_ENTRIES)
        .map(|e| PathBuf::from(e.file_name()))
        .collect();
    names.sort();
    Ok(names)
}

fn sorted(mut packages: Vec<Package>) -> Vec<Package> {
    packages.sort_by(|a, b| a.name.cmp(&b.name).then(a.version.cmp(&b.version)));
    packages.dedup();
    packages
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packages_are_read_from_their_databases() {
        let root = tempfile::tempdir().unwrap();
        let r = root.path();
        std::fs::create_dir_all(r.join("var/lib/dpkg")).unwrap();
        std::fs::write(
            r.join("var/lib/dpkg/status"),
            "Package: jq\nStatus: install ok installed\nVersion: 1.6-2.1\n\n\
             Package: gone\nStatus: deinstall ok config-files\nVersion: 1\n",
        )
        .unwrap();
        let site = r.join("usr/local/lib/python3.12/site-packages");
        std::fs::create_dir_all(site.join("tabulate-0.9.0.dist-info")).unwrap();
        std::fs::write(
            site.join("tabulate-0.9.0.dist-info/METADATA"),
            "Metadata-Version: 2.1\nName: tabulate\nVersion: 0.9.0\n\nName: not-this\n",
        )
        .unwrap();
        let npm_dir = r.join("usr/local/lib/node_modules/@scope/pkg");
        std::fs::create_dir_all(&npm_dir).unwrap();
        std::fs::write(
            npm_dir.join("package.json"),
            r#"{"name":"@scope/pkg","version":"1.2.3"}"#,
        )
        .unwrap();
        let names = |p: Vec<Package>| {
            p.into_iter()
                .map(|p| format!("{} {}", p.name, p.version))
                .collect::<Vec<_>>()
        };
        assert_eq!(names(debian(r).unwrap()), ["jq 1.6-2.1"]);
        assert_eq!(names(python(r).unwrap()), ["tabulate 0.9.0"]);
        assert_eq!(names(npm(r).unwrap()), ["@scope/pkg 1.2.3"]);
    }
}

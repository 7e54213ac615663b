//! Where airlock keeps its cache: images, kernels and build scratch space.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};

/// The cache root: `$AIRLOCK_HOME`, else `$XDG_CACHE_HOME/airlock`, else
/// `~/.cache/airlock`.
pub fn cache_root() -> Result<PathBuf> {
    if let Some(home) = non_empty_env("AIRLOCK_HOME") {
        return Ok(PathBuf::from(home));
    }
    if let Some(xdg) = non_empty_env("XDG_CACHE_HOME") {
        return Ok(PathBuf::from(xdg).join("airlock"));
    }
    match non_empty_env("HOME") {
        Some(home) => Ok(PathBuf::from(home).join(".cache").join("airlock")),
        None => bail!("cannot find a cache directory: set AIRLOCK_HOME (or HOME)"),
    }
}

/// The cache root, created if missing.
pub fn ensure_cache_root() -> Result<PathBuf> {
    let root = cache_root()?;
    std::fs::create_dir_all(&root)
        .with_context(|| format!("cannot create the cache directory {}", root.display()))?;
    Ok(root)
}

fn non_empty_env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

//! The server's configuration file (`--config FILE`, TOML): egress defaults
//! and, for HTTP mode, each principal's token, allowlist, sandbox limit and
//! storage quota. It adds to the flags and the tokens file; it replaces
//! neither.
//!
//! ```toml
//! [egress]
//! allow = ["pypi.org", "*.pythonhosted.org"]   # added to --egress-allow
//! hosts_file = "/etc/airlock/egress-hosts"       # as --egress-hosts
//! max_connections_per_sandbox = 64
//! idle_timeout = "2m"
//! bytes_per_second = "10M"
//!
//! [principals.alice]
//! token = "…at least 16 characters…"
//! egress_allow = ["api.example.com:443"]         # replaces [egress] allow for alice
//! max_sandboxes = 4
//! max_snapshot_bytes = "1G"
//! images = ["data", "default"]                   # the images alice may use; the first is hers by default
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde::Deserialize;

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    #[serde(default)]
    pub egress: EgressSection,
    #[serde(default)]
    pub principals: BTreeMap<String, PrincipalSection>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EgressSection {
    #[serde(default)]
    pub allow: Vec<String>,
    pub hosts_file: Option<PathBuf>,
    pub max_connections_per_sandbox: Option<usize>,
    /// A duration such as "90s" or "5m".
    pub idle_timeout: Option<String>,
    /// Bytes per second per sandbox, such as "10M".
    pub bytes_per_second: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PrincipalSection {
    pub token: Option<String>,
    /// Replaces the default allowlist for this principal (`[]`: no egress).
    pub egress_allow: Option<Vec<String>>,
    pub max_sandboxes: Option<usize>,
    /// Bytes such as "1G".
    pub max_snapshot_bytes: Option<String>,
    /// The images this principal may use (`--image` names), the first being
    /// its default; absent: every image served.
    pub images: Option<Vec<String>>,
}

/// The longest principal name: it shows in metrics and logs.
const MAX_PRINCIPAL_LEN: usize = 64;
/// A config file is a page of text, never a data set.
const MAX_CONFIG_BYTES: u64 = 4 << 20;

impl ConfigFile {
    pub fn load(path: &Path) -> Result<ConfigFile> {
        let size = std::fs::metadata(path)
            .with_context(|| format!("cannot read the config file {}", path.display()))?
            .len();
        if size > MAX_CONFIG_BYTES {
            bail!(
                "config file {} is {size} bytes; at most {MAX_CONFIG_BYTES}",
                path.display()
            );
        }
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read the config file {}", path.display()))?;
        Self::parse(&text).with_context(|| format!("config file {}", path.display()))
    }

    pub fn parse(text: &str) -> Result<ConfigFile> {
        let config: ConfigFile = toml::from_str(text)?;
        for (name, section) in &config.principals {
            let valid = !name.is_empty()
                && name.len() <= MAX_PRINCIPAL_LEN
                && name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.@".contains(&b));
            if !valid {
                bail!(
                    "principal {name:?}: use 1 to {MAX_PRINCIPAL_LEN} letters, digits, '-', '_', '.' or '@'"
                );
            }
            if section.max_sandboxes == Some(0) {
                bail!("principal {name}: max_sandboxes must be at least 1");
            }
            if let Some(bytes) = &section.max_snapshot_bytes {
                parse_bytes(bytes)
                    .with_context(|| format!("principal {name}: max_snapshot_bytes"))?;
            }
            if let Some(images) = &section.images {
                if images.is_empty() {
                    bail!("principal {name}: images must name at least one image");
                }
                if let Some(bad) = images
                    .iter()
                    .find(|i| !crate::image::custom::recipe::is_image_name(i))
                {
                    bail!("principal {name}: images: {bad:?} is not an image name");
                }
            }
        }
        if let Some(t) = &config.egress.idle_timeout {
            parse_duration(t).context("[egress] idle_timeout")?;
        }
        if let Some(b) = &config.egress.bytes_per_second {
            parse_bytes(b).context("[egress] bytes_per_second")?;
        }
        Ok(config)
    }

    /// The principals' own sandbox limits and storage quotas.
    pub fn principal_limits(
        &self,
    ) -> Result<BTreeMap<String, crate::sandbox::registry::PrincipalLimits>> {
        let mut out = BTreeMap::new();
        for (name, section) in &self.principals {
            let max_snapshot_bytes = match &section.max_snapshot_bytes {
                Some(text) => Some(parse_bytes(text)?),
                None => None,
            };
            out.insert(
                name.clone(),
                crate::sandbox::registry::PrincipalLimits {
                    max_sandboxes: section.max_sandboxes,
                    max_snapshot_bytes,
                    images: section.images.clone(),
                },
            );
        }
        Ok(out)
    }

    /// `principal:token` lines for the tokens list.
    pub fn token_lines(&self) -> String {
        let mut out = String::new();
        for (name, section) in &self.principals {
            if let Some(token) = &section.token {
                out.push_str(&format!("{name}:{token}\n"));
            }
        }
        out
    }
}

/// "300", "64K", "10M", "4G" (powers of 1024).
pub fn parse_bytes(text: &str) -> Result<u64> {
    let text = text.trim();
    let (digits, unit) = match text.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        Some((i, _)) => text.split_at(i),
        None => (text, ""),
    };
    let n: u64 = digits
        .parse()
        .with_context(|| format!("{text:?} is not a byte count such as 512M or 4G"))?;
    let shift = match unit.trim().to_ascii_uppercase().as_str() {
        "" | "B" => 0,
        "K" | "KB" | "KIB" => 10,
        "M" | "MB" | "MIB" => 20,
        "G" | "GB" | "GIB" => 30,
        "T" | "TB" | "TIB" => 40,
        other => bail!("unknown byte unit {other:?} in {text:?}"),
    };
    n.checked_mul(1u64 << shift)
        .with_context(|| format!("{text:?} is too large"))
}

pub fn parse_duration(text: &str) -> Result<Duration> {
    let d = humantime::parse_duration(text.trim())
        .with_context(|| format!("{text:?} is not a duration such as 90s or 5m"))?;
    if d.is_zero() {
        bail!("a duration of zero is not allowed here");
    }
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_file_parses() {
        let config = ConfigFile::parse(
            r#"
            [egress]
            allow = ["pypi.org", "*.pythonhosted.org"]
            max_connections_per_sandbox = 8
            idle_timeout = "90s"
            bytes_per_second = "10M"

            [principals.alice]
            token = "alice-token-0123456789"
            egress_allow = ["allowed.test"]
            max_sandboxes = 2
            max_snapshot_bytes = "1G"

            [principals.bob]
            token = "bob-token-0123456789ab"
            "#,
        )
        .unwrap();
        assert_eq!(config.egress.allow.len(), 2);
        assert_eq!(config.egress.max_connections_per_sandbox, Some(8));
        let alice = &config.principals["alice"];
        assert_eq!(alice.max_sandboxes, Some(2));
        assert_eq!(
            alice.egress_allow.as_deref(),
            Some(&["allowed.test".to_string()][..])
        );
        assert!(config.principals["bob"].egress_allow.is_none());
        assert_eq!(
            config.token_lines(),
            "alice:alice-token-0123456789\nbob:bob-token-0123456789ab\n"
        );
    }

    #[test]
    fn mistakes_are_named() {
        for (text, needle) in [
            ("[egress]\nallowed = []", "unknown field"),
            ("[principals.\"a b\"]\n", "principal \"a b\""),
            ("[principals.a]\nmax_sandboxes = 0", "at least 1"),
            (
                "[principals.a]\nmax_snapshot_bytes = \"lots\"",
                "max_snapshot_bytes",
            ),
            ("[egress]\nidle_timeout = \"0s\"", "idle_timeout"),
            ("[egress]\nbytes_per_second = \"9Q\"", "bytes_per_second"),
        ] {
            let err = format!("{:#}", ConfigFile::parse(text).unwrap_err());
            assert!(err.contains(needle), "{text:?}: {err}");
        }
    }

    #[test]
    fn byte_counts() {
        assert_eq!(parse_bytes("512").unwrap(), 512);
        assert_eq!(parse_bytes("64K").unwrap(), 64 << 10);
        assert_eq!(parse_bytes("10 MiB").unwrap(), 10 << 20);
        assert_eq!(parse_bytes("4G").unwrap(), 4 << 30);
        assert!(parse_bytes("99999999999T").is_err());
        assert!(parse_bytes("").is_err());
    }
}

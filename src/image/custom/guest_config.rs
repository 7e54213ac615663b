//! `/etc/airlock/image.json`: what the guest agent reads of an image's
//! recipe (its interpreters, which to warm, the imports to pre-load and the
//! environment), written at build time.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

/// The path in the guest.
pub const GUEST_PATH: &str = "/etc/airlock/image.json";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GuestConfig {
    pub name: String,
    /// Interpreter paths in the guest; none where the image has none.
    pub python: Option<String>,
    pub node: Option<String>,
    pub bash: Option<String>,
    /// Started and warmed in the template: python, javascript, bash.
    pub warm: Vec<String>,
    pub python_imports: Vec<String>,
    pub env: BTreeMap<String, String>,
}

impl GuestConfig {
    /// The interpreters this image has, by language name.
    pub fn languages(&self) -> Vec<&'static str> {
        let mut have = Vec::new();
        for (lang, path) in [
            ("python", &self.python),
            ("javascript", &self.node),
            ("bash", &self.bash),
        ] {
            if path.is_some() {
                have.push(lang);
            }
        }
        have
    }

    /// Writes it into the tree (root's, world-readable).
    pub fn write_into(&self, root: &Path) -> Result<()> {
        let text = serde_json::to_string_pretty(self).context("cannot serialize image.json")?;
        super::tree::write_file(root, Path::new(GUEST_PATH), (text + "\n").as_bytes(), 0o644)
    }
}

//! Custom images: a recipe file's additions on airlock's Debian root
//! filesystem or on an OCI image, built once and cached like the built-in
//! image, under a key of the recipe and everything it reads.

pub mod build;
pub mod guest_config;
mod inputs;
mod packages;
pub mod recipe;
pub mod tree;

use serde::{Deserialize, Serialize};

pub use build::ensure;
pub use guest_config::GuestConfig;
pub use recipe::{Recipe, RecipeFile};

use super::rootfs::Package;

/// What a custom image adds to the manifest.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CustomManifest {
    pub name: String,
    pub base: ManifestBase,
    /// The recipe as it was built.
    pub recipe: Recipe,
    /// Every Python distribution in the image, with its version.
    pub pip: Vec<Package>,
    /// Every globally installed npm package, with its version.
    pub npm: Vec<Package>,
    /// What the guest agent reads at /etc/airlock/image.json.
    pub guest: GuestConfig,
    pub build_seconds: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ManifestBase {
    /// `debian` or the OCI source as the recipe names it.
    pub source: String,
    /// The OCI manifest's digest (`sha256:…`); none for Debian.
    #[serde(default)]
    pub oci_digest: Option<String>,
    /// The OCI layers applied, in order.
    #[serde(default)]
    pub oci_layers: Vec<String>,
}

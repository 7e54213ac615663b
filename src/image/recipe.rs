//! The image recipe: the files under images/ (embedded at build time) and
//! the hashes that key each cached build product.

use sha2::{Digest, Sha256};

/// Debian suite of the guest root filesystem.
pub const SUITE: &str = "bookworm";

/// Debian package that provides the kernel source.
pub const KERNEL_SOURCE_PACKAGE: &str = "linux-source-6.1";
pub const KERNEL_SOURCE_TARBALL: &str = "/usr/src/linux-source-6.1.tar.xz";
pub const KERNEL_SOURCE_DIR: &str = "linux-source-6.1";

pub const KERNEL_CONFIG_FRAGMENT: &str = include_str!("../../images/kernel/config.fragment");

/// The kernel patch series, applied in this order.
pub const KERNEL_PATCHES: &[(&str, &str)] = &[
    (
        "0001-skip-int3-selftest.patch",
        include_str!("../../images/kernel/patches/0001-skip-int3-selftest.patch"),
    ),
    (
        "0002-fpu-drop-without-fwait.patch",
        include_str!("../../images/kernel/patches/0002-fpu-drop-without-fwait.patch"),
    ),
    (
        "0003-repair-syscall-delivered-as-page-fault.patch",
        include_str!(
            "../../images/kernel/patches/0003-repair-syscall-delivered-as-page-fault.patch"
        ),
    ),
    (
        "0004-repair-int80-delivered-as-ud.patch",
        include_str!("../../images/kernel/patches/0004-repair-int80-delivered-as-ud.patch"),
    ),
];

const ROOTFS_PACKAGES: &str = include_str!("../../images/rootfs/packages.txt");

/// Bumped when the build steps themselves change in a way that changes output.
const KERNEL_STEPS_VERSION: &str = "kernel-steps-1";
const ROOTFS_STEPS_VERSION: &str = "rootfs-steps-2";
const IMAGE_STEPS_VERSION: &str = "image-steps-1";

/// The packages to install into the root filesystem.
pub fn rootfs_packages() -> Vec<&'static str> {
    ROOTFS_PACKAGES
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect()
}

/// One requirement of the config fragment: the option must be set to `value`
/// (`None` means "is not set").
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigRequirement {
    pub option: String,
    pub value: Option<String>,
}

/// Parses the config fragment into requirements, so the build can verify that
/// Kconfig did not silently drop an option (an unmet dependency does that).
pub fn kernel_config_requirements() -> Vec<ConfigRequirement> {
    parse_config_fragment(KERNEL_CONFIG_FRAGMENT)
}

pub fn parse_config_fragment(text: &str) -> Vec<ConfigRequirement> {
    text.lines()
        .filter_map(|line| {
            let line = line.trim();
            if let Some(rest) = line.strip_prefix("# ") {
                let option = rest.strip_suffix(" is not set")?;
                return option.starts_with("CONFIG_").then(|| ConfigRequirement {
                    option: option.to_string(),
                    value: None,
                });
            }
            let (option, value) = line.split_once('=')?;
            option.starts_with("CONFIG_").then(|| ConfigRequirement {
                option: option.to_string(),
                value: Some(value.to_string()),
            })
        })
        .collect()
}

/// Checks a generated `.config` against the fragment; returns the unmet ones.
pub fn unmet_requirements(dot_config: &str) -> Vec<ConfigRequirement> {
    kernel_config_requirements()
        .into_iter()
        .filter(|req| {
            let set = dot_config.lines().find_map(|line| {
                let (option, value) = line.split_once('=')?;
                (option == req.option).then_some(value)
            });
            match (&req.value, set) {
                (None, None) => false,
                (None, Some(_)) => true,
                (Some(want), Some(got)) => want != got,
                (Some(want), None) => want != "n",
            }
        })
        .collect()
}

/// Key of the kernel build: the fragment, the patches, and the exact version
/// of Debian's kernel source package.
pub fn kernel_key(source_version: &str) -> String {
    let mut h = Hasher::new(KERNEL_STEPS_VERSION);
    h.field("source", source_version.as_bytes());
    h.field("fragment", KERNEL_CONFIG_FRAGMENT.as_bytes());
    for (name, body) in KERNEL_PATCHES {
        h.field(name, body.as_bytes());
    }
    h.finish()
}

/// Key of the root filesystem without the agent.
pub fn rootfs_key() -> String {
    let mut h = Hasher::new(ROOTFS_STEPS_VERSION);
    h.field("suite", SUITE.as_bytes());
    for package in rootfs_packages() {
        h.field("package", package.as_bytes());
    }
    h.finish()
}

/// Key of a whole image: kernel, root filesystem and agent binary.
pub fn image_key(kernel_key: &str, rootfs_key: &str, agent_sha256: &str) -> String {
    let mut h = Hasher::new(IMAGE_STEPS_VERSION);
    h.field("kernel", kernel_key.as_bytes());
    h.field("rootfs", rootfs_key.as_bytes());
    h.field("agent", agent_sha256.as_bytes());
    h.finish()
}

/// Hex SHA-256 of a byte slice.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

/// Length-prefixed fields, so that no two different recipes hash alike.
struct Hasher(Sha256);

impl Hasher {
    fn new(domain: &str) -> Self {
        let mut h = Hasher(Sha256::new());
        h.field("domain", domain.as_bytes());
        h
    }

    fn field(&mut self, name: &str, value: &[u8]) {
        for part in [name.as_bytes(), value] {
            self.0.update((part.len() as u64).to_le_bytes());
            self.0.update(part);
        }
    }

    /// 16 bytes of the digest are plenty for a cache key and keep paths short.
    fn finish(self) -> String {
        hex(&self.0.finalize()[..16])
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fragment_parses_set_and_unset_options() {
        let reqs =
            parse_config_fragment("CONFIG_A=y\n# CONFIG_B is not set\n# comment\nCONFIG_C=8\n");
        assert_eq!(reqs.len(), 3);
        assert_eq!(
            reqs[1],
            ConfigRequirement {
                option: "CONFIG_B".into(),
                value: None
            }
        );
        assert_eq!(reqs[2].value.as_deref(), Some("8"));
    }

    #[test]
    fn embedded_fragment_has_the_essentials() {
        let reqs = kernel_config_requirements();
        for must in [
            "CONFIG_VIRTIO_MMIO",
            "CONFIG_VIRTIO_VSOCKETS",
            "CONFIG_EXT4_FS",
            "CONFIG_MEMCG",
        ] {
            assert!(
                reqs.iter()
                    .any(|r| r.option == must && r.value.as_deref() == Some("y")),
                "{must}"
            );
        }
        assert!(
            reqs.iter()
                .any(|r| r.option == "CONFIG_MODULES" && r.value.is_none())
        );
    }

    #[test]
    fn unmet_requirements_are_reported() {
        let full: String = kernel_config_requirements()
            .iter()
            .filter_map(|r| r.value.as_ref().map(|v| format!("{}={v}\n", r.option)))
            .collect();
        assert!(unmet_requirements(&full).is_empty());
        let dropped = full.replace("CONFIG_VIRTIO_VSOCKETS=y\n", "");
        let unmet = unmet_requirements(&dropped);
        assert_eq!(unmet.len(), 1);
        assert_eq!(unmet[0].option, "CONFIG_VIRTIO_VSOCKETS");
        let forced_on = format!("{full}CONFIG_MODULES=y\n");
        assert_eq!(unmet_requirements(&forced_on)[0].option, "CONFIG_MODULES");
    }

    #[test]
    fn keys_depend_on_every_input() {
        assert_eq!(kernel_key("6.1.1"), kernel_key("6.1.1"));
        assert_ne!(kernel_key("6.1.1"), kernel_key("6.1.2"));
        assert_ne!(image_key("k", "r", "a"), image_key("k", "r", "b"));
        assert_ne!(image_key("k", "ra", ""), image_key("kr", "a", ""));
        assert_eq!(kernel_key("x").len(), 32);
    }

    #[test]
    fn package_list_is_the_design_set() {
        let packages = rootfs_packages();
        for must in [
            "python3",
            "python3-numpy",
            "python3-pandas",
            "python3-matplotlib",
            "nodejs",
            "curl",
            "git",
            "python3-pip",
        ] {
            assert!(packages.contains(&must), "{must}");
        }
    }
}

//! Checks that the host has the tools an image build runs, and names the apt
//! packages that provide the missing ones in a single error.

use std::path::Path;

use anyhow::{Result, bail};

use super::recipe;

/// A host tool and the Debian package that provides it.
struct Tool {
    /// An executable name looked up on PATH (and in /usr/sbin, /sbin), or an
    /// absolute path to a file.
    what: &'static str,
    package: &'static str,
}

const KERNEL_TOOLS: &[Tool] = &[
    Tool {
        what: recipe::KERNEL_SOURCE_TARBALL,
        package: recipe::KERNEL_SOURCE_PACKAGE,
    },
    Tool {
        what: "make",
        package: "make",
    },
    Tool {
        what: "gcc",
        package: "gcc",
    },
    Tool {
        what: "flex",
        package: "flex",
    },
    Tool {
        what: "bison",
        package: "bison",
    },
    Tool {
        what: "bc",
        package: "bc",
    },
    Tool {
        what: "patch",
        package: "patch",
    },
    Tool {
        what: "tar",
        package: "tar",
    },
    Tool {
        what: "xz",
        package: "xz-utils",
    },
    Tool {
        what: "/usr/include/libelf.h",
        package: "libelf-dev",
    },
    Tool {
        what: "/usr/include/openssl/ssl.h",
        package: "libssl-dev",
    },
    Tool {
        what: "dpkg-query",
        package: "dpkg",
    },
];

const ROOTFS_TOOLS: &[Tool] = &[
    Tool {
        what: "debootstrap",
        package: "debootstrap",
    },
    Tool {
        what: "chroot",
        package: "coreutils",
    },
    Tool {
        what: "mkfs.ext4",
        package: "e2fsprogs",
    },
    Tool {
        what: "debugfs",
        package: "e2fsprogs",
    },
    Tool {
        what: "/usr/share/keyrings/debian-archive-keyring.gpg",
        package: "debian-archive-keyring",
    },
];

/// Every tool any build step needs: one error lists all missing packages.
pub fn check_all() -> Result<()> {
    let missing: Vec<&Tool> = KERNEL_TOOLS
        .iter()
        .chain(ROOTFS_TOOLS)
        .filter(|t| !is_present(t.what))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    let mut packages: Vec<&str> = missing.iter().map(|t| t.package).collect();
    packages.sort_unstable();
    packages.dedup();
    let names: Vec<&str> = missing.iter().map(|t| t.what).collect();
    bail!(
        "building the guest image needs tools this machine lacks ({}). Install them with: \
         sudo apt-get install -y {}",
        names.join(", "),
        packages.join(" ")
    )
}

fn is_present(what: &str) -> bool {
    if what.starts_with('/') {
        return Path::new(what).exists();
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin".into(), "/sbin".into()])
        .any(|dir| dir.join(what).is_file())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_a_common_tool_and_not_a_made_up_one() {
        assert!(is_present("sh"));
        assert!(!is_present("airlock-no-such-tool"));
        assert!(!is_present("/no/such/file"));
    }
}

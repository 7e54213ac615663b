//! The guest image pipeline, checked by reading what it produced: the kernel
//! ELF and its embedded config, and the ext4 root filesystem via debugfs.

mod common;

use std::io::Read;

use common::{airlock, debugfs, image_dir, run};

#[test]
fn second_build_is_a_noop() {
    let dir = image_dir();
    let manifest = dir.join("manifest.json");
    let before = std::fs::metadata(&manifest).unwrap().modified().unwrap();
    let mut cmd = airlock();
    cmd.args(["image", "build"]);
    let out = run(cmd);
    assert!(out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("is up to date"), "{stderr}");
    assert!(
        !stderr.contains("[kernel") && !stderr.contains("[rootfs"),
        "{stderr}"
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        dir.display().to_string()
    );
    let after = std::fs::metadata(&manifest).unwrap().modified().unwrap();
    assert_eq!(before, after, "manifest was rewritten");
}

#[test]
fn kernel_is_an_x86_64_elf_with_the_expected_config() {
    let vmlinux = std::fs::read(image_dir().join("vmlinux")).unwrap();
    assert_eq!(&vmlinux[..4], b"\x7fELF");
    assert_eq!(vmlinux[4], 2, "64-bit");
    assert_eq!(u16::from_le_bytes([vmlinux[16], vmlinux[17]]), 2, "ET_EXEC");
    assert_eq!(
        u16::from_le_bytes([vmlinux[18], vmlinux[19]]),
        62,
        "EM_X86_64"
    );

    let config = embedded_config(&vmlinux);
    for option in [
        "CONFIG_VIRTIO_MMIO=y",
        "CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES=y",
        "CONFIG_VIRTIO_BLK=y",
        "CONFIG_VSOCKETS=y",
        "CONFIG_VIRTIO_VSOCKETS=y",
        "CONFIG_HW_RANDOM_VIRTIO=y",
        "CONFIG_EXT4_FS=y",
        "CONFIG_TMPFS=y",
        "CONFIG_DEVTMPFS=y",
        "CONFIG_SERIAL_8250_CONSOLE=y",
        "CONFIG_CGROUPS=y",
        "CONFIG_MEMCG=y",
        "CONFIG_KVM_GUEST=y",
        "CONFIG_NO_HZ_IDLE=y",
        "# CONFIG_MODULES is not set",
        "# CONFIG_LEGACY_PTYS is not set",
        "# CONFIG_VT is not set",
    ] {
        assert!(
            config.lines().any(|l| l == option),
            "kernel config lacks {option}"
        );
    }
    // The PVM repairs of the patch series are in the kernel.
    let text = String::from_utf8_lossy(&vmlinux);
    assert!(
        text.contains("pvm_repair_user_syscall"),
        "syscall repair symbol missing"
    );
    assert!(
        text.contains("pvm_repair_int80"),
        "int 0x80 repair symbol missing"
    );
}

/// CONFIG_IKCONFIG stores the config gzipped between two markers.
fn embedded_config(vmlinux: &[u8]) -> String {
    let start = find(vmlinux, b"IKCFG_ST").expect("kernel has an embedded config") + 8;
    let len = find(&vmlinux[start..], b"IKCFG_ED").expect("config end marker");
    let mut config = String::new();
    flate2::read::GzDecoder::new(&vmlinux[start..start + len])
        .read_to_string(&mut config)
        .expect("embedded config is gzip");
    config
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

#[test]
fn rootfs_has_python_node_the_agent_and_the_sandbox_user() {
    let rootfs = image_dir().join("rootfs.ext4");
    let usr_bin = debugfs(&rootfs, "ls -p /usr/bin");
    for program in ["python3", "node", "bash"] {
        assert!(
            usr_bin.contains(&format!("/{program}/")),
            "/usr/bin/{program} missing"
        );
    }
    let numpy = debugfs(
        &rootfs,
        "stat /usr/lib/python3/dist-packages/numpy/__init__.py",
    );
    assert!(numpy.contains("Type: regular"), "numpy missing: {numpy}");
    let passwd = debugfs(&rootfs, "cat /etc/passwd");
    let sandbox = passwd
        .lines()
        .find(|l| l.starts_with("sandbox:"))
        .expect("sandbox user");
    assert!(
        sandbox.contains(":1000:1000:") && sandbox.contains(":/home/sandbox:"),
        "{sandbox}"
    );
    assert!(debugfs(&rootfs, "stat /home/sandbox").contains("Type: directory"));

    // The agent is static, executable, and exactly the one the manifest names.
    let agent_path = airlock_protocol::AGENT_GUEST_PATH;
    let stat = debugfs(&rootfs, &format!("stat {agent_path}"));
    assert!(stat.contains("Mode:  0755"), "{stat}");
    let dump = tempfile::NamedTempFile::new().unwrap();
    debugfs(
        &rootfs,
        &format!("dump {agent_path} {}", dump.path().display()),
    );
    let agent = std::fs::read(dump.path()).unwrap();
    assert_eq!(
        airlock::image::elf_has_interpreter(&agent),
        Some(false),
        "agent is not static"
    );
    let manifest: airlock::image::Manifest =
        serde_json::from_str(&std::fs::read_to_string(image_dir().join("manifest.json")).unwrap())
            .unwrap();
    assert_eq!(
        manifest.agent.sha256,
        airlock::image::recipe::sha256_hex(&agent)
    );
}

#[test]
fn manifest_lists_versions_and_sizes() {
    let dir = image_dir();
    let manifest: airlock::image::Manifest =
        serde_json::from_str(&std::fs::read_to_string(dir.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(
        dir.file_name().unwrap().to_str().unwrap(),
        manifest.recipe_hash
    );
    assert!(
        manifest.kernel.version.starts_with("6.1."),
        "{}",
        manifest.kernel.version
    );
    assert_eq!(
        manifest.kernel.vmlinux_bytes,
        std::fs::metadata(dir.join("vmlinux")).unwrap().len()
    );
    assert_eq!(
        manifest.rootfs.ext4_bytes,
        std::fs::metadata(dir.join("rootfs.ext4")).unwrap().len()
    );
    for name in [
        "python3",
        "python3-pandas",
        "nodejs",
        "bash",
        "coreutils",
        "ca-certificates",
    ] {
        let package = manifest.rootfs.packages.iter().find(|p| p.name == name);
        assert!(
            package.is_some_and(|p| !p.version.is_empty()),
            "{name} not in manifest"
        );
    }
    assert!(humantime::parse_rfc3339(&manifest.build_date).is_ok());
}

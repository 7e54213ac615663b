//! Helpers shared by the integration tests: the built `airlock` binary and
//! the guest image, built once per test binary and cached across runs.

#![allow(dead_code)]

use std::path::PathBuf;
use std::process::{Command, Output};
use std::sync::OnceLock;

pub fn airlock() -> Command {
    Command::new(env!("CARGO_BIN_EXE_airlock"))
}

pub fn run(mut cmd: Command) -> Output {
    cmd.output().expect("the airlock binary runs")
}

/// The image directory, from `airlock image build` (a no-op once built; the
/// first run on a fresh machine builds it, which takes minutes).
pub fn image_dir() -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let mut cmd = airlock();
        cmd.args(["image", "build"])
            .stderr(std::process::Stdio::inherit());
        let out = run(cmd);
        assert!(out.status.success(), "airlock image build failed");
        PathBuf::from(String::from_utf8(out.stdout).expect("utf-8 path").trim())
    })
    .clone()
}

/// Runs one debugfs request against an ext4 image and returns its stdout.
pub fn debugfs(image: &std::path::Path, request: &str) -> String {
    let out = Command::new("debugfs")
        .env("PAGER", "__none__")
        .arg("-R")
        .arg(request)
        .arg(image)
        .output()
        .expect("debugfs runs (apt-get install e2fsprogs)");
    assert!(
        out.status.success(),
        "debugfs {request}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The warm template, created on first use (minutes on kvm_pvm) and cached.
pub async fn template() -> airlock::template::Template {
    let image_dir = image_dir();
    let cache = image_dir
        .parent()
        .and_then(|p| p.parent())
        .expect("cache root")
        .to_path_buf();
    let manifest =
        serde_json::from_str(&std::fs::read_to_string(image_dir.join("manifest.json")).unwrap())
            .unwrap();
    let image = airlock::image::Image {
        dir: image_dir,
        manifest,
    };
    let exe = std::path::Path::new(env!("CARGO_BIN_EXE_airlock"));
    airlock::template::ensure(&cache, &image, Default::default(), exe)
        .await
        .expect("template")
}

/// A VM booting the guest image with `init` as PID 1 (its arguments in
/// `extra_cmdline`, after `--`), confined as this process's policy says.
pub fn boot_spec(
    run_dir: &std::path::Path,
    init: &str,
    extra_cmdline: String,
    label: &str,
) -> airlock::vm::VmSpec {
    let image_dir = image_dir();
    airlock::vm::VmSpec {
        airlock_exe: env!("CARGO_BIN_EXE_airlock").into(),
        kernel: image_dir.join("vmlinux"),
        rootfs: image_dir.join("rootfs.ext4"),
        vcpus: 1,
        memory_mib: 256,
        extra_cmdline,
        init: Some(init.into()),
        run_dir: run_dir.to_path_buf(),
        restore: None,
        resume: None,
        snapshot_dir: None,
        console_max_bytes: 1 << 20,
        label: label.into(),
        confinement: airlock::confinement::Confinement::current(),
        vsock_forward: Vec::new(),
    }
}

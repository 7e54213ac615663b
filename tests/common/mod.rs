//! Helpers shared by the integration tests: the built `airlock` binary and
//! the guest image, built once per test binary and cached across runs.

#![allow(dead_code)]

pub mod test_images;

use std::path::PathBuf;
use std::process::{Command, Output};
use std::sync::Mutex;
use std::sync::OnceLock;
use std::time::Duration;

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

pub struct BoundedOutput {
    /// None when it was killed at its time limit.
    pub status: Option<std::process::ExitStatus>,
    pub stdout: String,
    pub stderr: String,
}

/// Runs `command` in a process group of its own. At `limit` its leader is
/// sent `ask_first` (a script's request for its stacks, say), then the whole
/// group is killed, so a hung client fails with what it printed instead of
/// holding the suite until the nested host's own limit.
pub fn run_bounded(
    mut command: Command,
    limit: Duration,
    ask_first: &[libc::c_int],
) -> BoundedOutput {
    use std::io::Read;
    use std::os::unix::process::CommandExt;
    use std::process::Stdio;
    use std::sync::Arc;

    let mut child = command
        .process_group(0)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the client runs");
    // Read as it comes, so what was printed survives a child that keeps a
    // pipe open past the kill.
    let collect = |pipe: Option<Box<dyn Read + Send>>| {
        let buffer = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&buffer);
        let reader = pipe.map(|mut pipe| {
            std::thread::spawn(move || {
                let mut chunk = [0u8; 8192];
                while let Ok(n) = pipe.read(&mut chunk) {
                    if n == 0 {
                        break;
                    }
                    sink.lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .extend_from_slice(&chunk[..n]);
                }
            })
        });
        (buffer, reader)
    };
    let stdout = collect(
        child
            .stdout
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let stderr = collect(
        child
            .stderr
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let pgid = child.id() as libc::pid_t;
    let started = std::time::Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("waitpid on the client") {
            break Some(status);
        }
        if started.elapsed() > limit {
            for &signal in ask_first {
                // SAFETY: a signal to the child we started, not yet reaped.
                unsafe { libc::kill(pgid, signal) };
            }
            if !ask_first.is_empty() {
                std::thread::sleep(Duration::from_secs(3));
            }
            // SAFETY: as above.
            unsafe { libc::kill(-pgid, libc::SIGKILL) };
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    // The readers see EOF once the last writer is gone; one that escaped the
    // group and keeps a pipe open must not hold the test.
    let drained_by = std::time::Instant::now() + Duration::from_secs(5);
    for reader in [&stdout.1, &stderr.1].into_iter().flatten() {
        while !reader.is_finished() && std::time::Instant::now() < drained_by {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    let text = |(b, _): &(Arc<Mutex<Vec<u8>>>, _)| {
        String::from_utf8_lossy(&b.lock().unwrap_or_else(|e| e.into_inner())).into_owned()
    };
    BoundedOutput {
        status,
        stdout: text(&stdout),
        stderr: text(&stderr),
    }
}

//! The MCP gateway end to end: Python scripts in tests/mcp/ drive the built
//! `airlock serve` with the official `mcp` SDK, over stdio and Streamable
//! HTTP, against real microVMs.
//!
//! The SDK lives in a virtualenv at target/pyenv (made by `cargo xtask test`,
//! or here on first use with `python3 -m venv` and tests/mcp/requirements.txt); AIRLOCK_TEST_PYTHON
//! names another interpreter that has it. The Node.js clients (the MCP
//! Inspector, the conformance suite) are driven from tests/mcp_clients.rs.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

/// The scripts start VMs and measure timeouts: one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

fn manifest_dir() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// A Python interpreter with the `mcp` SDK, set up once.
fn python() -> PathBuf {
    static PYTHON: OnceLock<PathBuf> = OnceLock::new();
    PYTHON
        .get_or_init(|| {
            if let Some(p) = std::env::var_os("AIRLOCK_TEST_PYTHON") {
                return PathBuf::from(p);
            }
            let venv = manifest_dir().join("target").join("pyenv");
            let python = venv.join("bin").join("python");
            let has_sdk = |p: &Path| {
                Command::new(p)
                    .args(["-c", "import mcp.client.streamable_http"])
                    .status()
                    .is_ok_and(|s| s.success())
            };
            if !has_sdk(&python) {
                eprintln!("setting up {} with the mcp SDK", venv.display());
                let made = Command::new("python3")
                    .args(["-m", "venv"])
                    .arg(&venv)
                    .status()
                    .expect("python3 runs (apt-get install python3-venv)");
                assert!(made.success(), "python3 -m venv failed");
                let pip = Command::new(venv.join("bin").join("pip"))
                    .args(["install", "-q", "-r"])
                    .arg(manifest_dir().join("tests/mcp/requirements.txt"))
                    .status()
                    .expect("pip runs");
                assert!(pip.success(), "pip install mcp failed");
            }
            assert!(has_sdk(&python), "{} cannot import mcp", python.display());
            python
        })
        .clone()
}

/// Runs tests/mcp/<script> against the built binary; its output shows with
/// `--nocapture`, and in the failure message.
fn run_script(script: &str) {
    run_script_with(script, &[]);
}

fn run_script_with(script: &str, env: &[(&str, &std::ffi::OsStr)]) {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = manifest_dir().join("tests").join("mcp");
    let started = std::time::Instant::now();
    let mut command = Command::new(python());
    command
        .arg(dir.join(script))
        .current_dir(&dir)
        .env("AIRLOCK_BIN", env!("CARGO_BIN_EXE_airlock"))
        .env("PYTHONUNBUFFERED", "1")
        .envs(env.iter().copied())
        .env(
            "AIRLOCK_TEST_KVM_PVM",
            if airlock::host_kvm::KvmFlavor::detect()
                == airlock::host_kvm::KvmFlavor::SoftwareNestedPvm
            {
                "1"
            } else {
                ""
            },
        );
    // Asked for its Python thread and task stacks first (see harness.py).
    let out = common::run_bounded(command, script_limit(), &[libc::SIGUSR1, libc::SIGUSR2]);
    // Keep the measured latencies visible in the test log.
    for line in out.stderr.lines().filter(|l| l.starts_with("LATENCY")) {
        println!("{line}");
    }
    let status = match out.status {
        Some(status) => format!("{status:?}"),
        None => format!(
            "hung: killed after {:.0?}, with its server and VMs; the Python stacks are at the end of stderr",
            script_limit()
        ),
    };
    assert!(
        out.status.is_some_and(|s| s.success()),
        "{script} failed ({status}) after {:.0?}\n--- stdout\n{}\n--- stderr\n{}",
        started.elapsed(),
        out.stdout,
        out.stderr
    );
    println!("{script}: passed in {:.1?}", started.elapsed());
}

/// How long one script may run before it counts as hung (the slowest takes
/// a few minutes in a nested test host); AIRLOCK_TEST_SCRIPT_LIMIT_SECS
/// overrides it.
fn script_limit() -> Duration {
    std::env::var("AIRLOCK_TEST_SCRIPT_LIMIT_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .map_or(Duration::from_secs(15 * 60), Duration::from_secs)
}

#[test]
fn stdio_one_sandbox_state_timeout_cancel_and_clean_exit() {
    run_script("stdio_test.py");
}

#[test]
fn stdio_idle_sandboxes_pause_to_disk_and_resume_without_loss() {
    run_script("pause_test.py");
}

#[test]
fn stdio_persist_keeps_the_sandbox_across_server_restarts() {
    run_script("persist_test.py");
}

#[test]
fn http_auth_isolation_big_files_sessions_and_sessionless_ids() {
    run_script("http_test.py");
}

#[test]
fn http_checkpoints_rollback_fork_and_restarts_lose_nothing() {
    run_script("checkpoint_test.py");
}

#[test]
fn http_admission_floods_sessions_owners_timeouts_and_resets() {
    run_script("admission_test.py");
}

#[test]
fn http_limits_and_idle_expiry() {
    run_script("expiry_test.py");
}

#[test]
fn http_egress_by_policy_allowlists_bounds_and_principals() {
    run_script("egress_test.py");
}

#[test]
fn http_resources_and_logging_stay_within_their_session() {
    run_script("resources_logging_test.py");
}

#[test]
fn http_custom_images_side_by_side() {
    // Built on the host before the nested hosts start (tests/custom_images.rs
    // runs there first): found here by their key, or built now on a host
    // with a correct KVM of its own.
    common::test_images::ensure_built();
    run_script("images_test.py");
}

/// The uid an unprivileged gateway runs as when the tests run as root.
const UNPRIVILEGED_UID: u32 = 65534;

/// Unmounts a bind mount when the test ends, however it ends.
struct BindMount(std::ffi::CString);

impl BindMount {
    /// Binds `from` read-only at `to`: unlike a hard link, a bind changes
    /// no inode's ctime, which would break the seals of root's templates.
    fn read_only(from: &Path, to: &Path) -> BindMount {
        use std::os::unix::ffi::OsStrExt;
        let c = |p: &Path| std::ffi::CString::new(p.as_os_str().as_bytes()).unwrap();
        let (src, dst) = (c(from), c(to));
        let flags = libc::MS_BIND | libc::MS_RDONLY | libc::MS_REMOUNT;
        // SAFETY: mount(2) with NUL-terminated paths we own.
        let bound = unsafe {
            libc::mount(
                src.as_ptr(),
                dst.as_ptr(),
                std::ptr::null(),
                libc::MS_BIND,
                std::ptr::null(),
            )
        };
        assert_eq!(bound, 0, "bind mount: {}", std::io::Error::last_os_error());
        // Unmounted from here on, even if the remount fails.
        let mount = BindMount(dst);
        // SAFETY: as above.
        let ro = unsafe {
            libc::mount(
                std::ptr::null(),
                mount.0.as_ptr(),
                std::ptr::null(),
                flags,
                std::ptr::null(),
            )
        };
        assert_eq!(
            ro,
            0,
            "read-only remount: {}",
            std::io::Error::last_os_error()
        );
        mount
    }
}

impl Drop for BindMount {
    fn drop(&mut self) {
        // SAFETY: umount2 of the path we mounted.
        unsafe { libc::umount2(self.0.as_ptr(), libc::MNT_DETACH) };
    }
}

#[test]
fn stdio_as_an_unprivileged_user_jails_each_vmm_in_a_user_namespace() {
    let image = common::image_dir();
    let uid = UNPRIVILEGED_UID.to_string();
    if !airlock::confinement::Support::probe().root {
        // Not root: the gateway runs as this user, on this user's cache.
        let cache = image.parent().and_then(Path::parent).unwrap();
        let kvm = airlock::host_kvm::kvm_device_path();
        run_script_with(
            "unprivileged_test.py",
            &[
                ("AIRLOCK_TEST_HOME", cache.as_os_str()),
                ("AIRLOCK_TEST_KVM_DEVICE", kvm.as_os_str()),
            ],
        );
        return;
    }
    // Root: uid 65534 gets a cache of its own, with the image root built
    // bound in (as after `sudo airlock image build`) and no template (the
    // gateway makes one), and a KVM device node of its own, so the host's
    // /dev/kvm stays as it is.
    let home = tempfile::Builder::new()
        .prefix("unprivileged-home-")
        .tempdir_in(manifest_dir().join("target"))
        .unwrap();
    let images = home.path().join("images");
    let bound = images.join(image.file_name().unwrap());
    std::fs::create_dir_all(&bound).unwrap();
    let dev = tempfile::tempdir().unwrap();
    let kvm = dev.path().join("kvm");
    {
        use std::os::unix::ffi::OsStrExt;
        let path = std::ffi::CString::new(kvm.as_os_str().as_bytes()).unwrap();
        // SAFETY: mknod of a character device at a path we own.
        let made =
            unsafe { libc::mknod(path.as_ptr(), libc::S_IFCHR | 0o600, libc::makedev(10, 232)) };
        assert_eq!(made, 0, "mknod: {}", std::io::Error::last_os_error());
    }
    for path in [dev.path(), home.path(), &images, &kvm] {
        std::os::unix::fs::chown(path, Some(UNPRIVILEGED_UID), Some(UNPRIVILEGED_UID)).unwrap();
    }
    let _bind = BindMount::read_only(&image, &bound);
    run_script_with(
        "unprivileged_test.py",
        &[
            ("AIRLOCK_TEST_HOME", home.path().as_os_str()),
            ("AIRLOCK_TEST_KVM_DEVICE", kvm.as_os_str()),
            ("AIRLOCK_TEST_AS_UID", uid.as_ref()),
        ],
    );
}

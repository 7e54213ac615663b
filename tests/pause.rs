//! Pause to disk and resume, on real microVMs: a sandbox restored from the
//! warm template is saved as a diff (the pages it wrote), its VM ends, and a
//! new VMM resumes it over the template with everything it had.

mod common;

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use airlock::bench::run_in;
use airlock::sandbox::{Sandbox, StartOptions};
use airlock_protocol::Language;

fn exe() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_airlock"))
}

fn now_unix() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

/// Sandboxes that pause into `root`.
fn pausable_into(root: &Path) -> StartOptions {
    StartOptions {
        staging_root: Some(root.to_path_buf()),
        ..StartOptions::default()
    }
}

fn pid_alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// The last tick the background loop wrote, and how many it wrote.
async fn ticks(sandbox: &Sandbox) -> (usize, f64) {
    let out = run_in(
        sandbox.client(),
        Language::Bash,
        "wc -l < /tmp/ticks; tail -n 1 /tmp/ticks",
    )
    .await
    .expect("read ticks");
    let mut lines = out.lines();
    let count = lines.next().unwrap().trim().parse().unwrap();
    let last = lines.next().unwrap().trim().parse().unwrap();
    (count, last)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_sandbox_resumes_with_files_interpreters_cwd_and_background_processes() {
    let template = common::template().await;
    let store = tempfile::tempdir().unwrap();
    let options = pausable_into(store.path());
    let sandbox = Sandbox::start(&template, exe(), &options, None)
        .await
        .expect("restore");
    let py = |code: &'static str| (Language::Python, code);
    for (language, code) in [
        py("counter = 41\nopen('/home/sandbox/notes.txt', 'w').write('kept')"),
        (Language::Javascript, "globalThis.carried = 'js-kept';"),
        (
            Language::Bash,
            "mkdir -p /tmp/work && cd /tmp/work && export CARRIED=bash-kept\n\
             (while :; do date +%s >> /tmp/ticks; sleep 1; done) >/dev/null 2>&1 &\n\
             sleep 2",
        ),
    ] {
        run_in(sandbox.client(), language, code)
            .await
            .unwrap_or_else(|e| panic!("{language:?}: {e:#}"));
    }
    let (ticks_before, _) = ticks(&sandbox).await;
    assert!(ticks_before >= 1, "the background loop runs");

    let mut sandbox = sandbox;
    for round in 1..=2u32 {
        let pid = sandbox.pid();
        let paused = sandbox.pause().await.expect("pause");
        assert!(!pid_alive(pid), "a paused sandbox's VMM has exited");
        assert!(
            paused.dirty_bytes > 0 && paused.dirty_bytes < 512 << 20,
            "{paused:?}"
        );
        assert!(
            paused.disk_bytes <= paused.dirty_bytes + (1 << 20),
            "the saved state holds the written pages, not all memory: {paused:?}"
        );
        eprintln!(
            "round {round}: paused {} MiB written, {} MiB on disk, in {:?}",
            paused.dirty_bytes >> 20,
            paused.disk_bytes >> 20,
            paused.took
        );
        // Time passes while it is paused.
        tokio::time::sleep(Duration::from_secs(3)).await;

        let resumed = Sandbox::start(&template, exe(), &options, Some(&paused.dir))
            .await
            .expect("resume");
        std::fs::remove_dir_all(&paused.dir).unwrap();
        let out = run_in(
            resumed.client(),
            Language::Python,
            "counter += 1\nprint(counter, open('/home/sandbox/notes.txt').read())",
        )
        .await
        .unwrap();
        assert_eq!(out.trim(), format!("{} kept", 41 + round));
        let out = run_in(
            resumed.client(),
            Language::Javascript,
            "console.log(globalThis.carried)",
        )
        .await
        .unwrap();
        assert_eq!(out.trim(), "js-kept");
        let out = run_in(resumed.client(), Language::Bash, "echo \"$(pwd) $CARRIED\"")
            .await
            .unwrap();
        assert_eq!(out.trim(), "/tmp/work bash-kept");

        // The clock is the host's again, and the background loop goes on
        // from where it was.
        let guest = run_in(
            resumed.client(),
            Language::Python,
            "import time\nprint(time.time())",
        )
        .await
        .unwrap();
        let guest: f64 = guest.trim().parse().unwrap();
        assert!((guest - now_unix()).abs() < 2.0, "guest clock {guest}");
        let (count_resumed, _) = ticks(&resumed).await;
        tokio::time::sleep(Duration::from_secs(3)).await;
        let (count_later, last) = ticks(&resumed).await;
        assert!(
            count_later > count_resumed,
            "the background loop goes on ({count_resumed} then {count_later})"
        );
        assert!(
            (last - now_unix()).abs() < 3.0,
            "its clock jumped forward: last tick {last}"
        );
        sandbox = resumed;
    }
    sandbox.destroy().await;
    let left: Vec<_> = std::fs::read_dir(store.path().join(".staging"))
        .unwrap()
        .collect();
    assert!(left.is_empty(), "no staging directory is left: {left:?}");
}

/// Unmounts (lazily: the VMM's own mount namespace held a bind of it) when
/// the test ends, however it ends.
struct Tmpfs(std::path::PathBuf);

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pause_the_disk_cannot_hold_leaves_the_sandbox_running_and_nothing_half_written() {
    let template = common::template().await;
    let store = tempfile::tempdir().unwrap();
    // A 1 MiB disk: a restored sandbox has written more than that.
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=1m", "tmpfs"])
        .arg(store.path())
        .status()
        .expect("mount runs");
    assert!(
        mounted.success(),
        "mounting a tmpfs (the VM tests run as root)"
    );
    let _unmount = Tmpfs(store.path().to_path_buf());
    let options = pausable_into(store.path());
    let sandbox = Sandbox::start(&template, exe(), &options, None)
        .await
        .expect("restore");
    run_in(
        sandbox.client(),
        Language::Python,
        "import os\nkept = 7\nblob = os.urandom(4 << 20)",
    )
    .await
    .unwrap();
    let pid = sandbox.pid();
    let failed = sandbox
        .pause()
        .await
        .expect_err("a full disk fails the pause");
    eprintln!("pause failed as it should: {:#}", failed.error);
    let sandbox = failed.sandbox.expect("the sandbox runs on");
    assert!(pid_alive(pid), "its VMM is the same, still running");
    let out = run_in(sandbox.client(), Language::Python, "print(kept, len(blob))")
        .await
        .unwrap();
    assert_eq!(out.trim(), format!("7 {}", 4 << 20));
    let staged: Vec<_> = std::fs::read_dir(store.path().join(".staging"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(staged.len(), 1, "{staged:?}");
    let left: Vec<_> = std::fs::read_dir(&staged[0]).unwrap().collect();
    assert!(left.is_empty(), "nothing half-written is left: {left:?}");
    sandbox.destroy().await;
}

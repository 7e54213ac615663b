//! What the agent tests share: one runtime, call helpers, and the checks
//! that the local agent and the guest must both pass.

#![allow(dead_code, unused_imports)]

pub use std::path::{Path, PathBuf};
pub use std::sync::LazyLock;
pub use std::time::{Duration, Instant};

pub use airlock::agent_client::{AgentClient, Event, ExecOutput, RunOutput};
pub use airlock_protocol::{
    Command, ErrorCode, Exec, FileKind, InterpreterState, Language, ListFiles, OutputLimits,
    RunCode, Stream, WriteFile,
};

/// One runtime for the whole binary: the shared VMs and their clients live
/// in it across tests.
pub static RT: LazyLock<tokio::runtime::Runtime> = LazyLock::new(|| {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
});

pub const SHORT: Duration = Duration::from_secs(30);

pub fn shell(script: &str, timeout: Duration) -> Exec {
    Exec {
        command: Command::Shell(script.to_string()),
        cwd: None,
        env: Vec::new(),
        timeout_ms: Some(timeout.as_millis() as u64),
        output: OutputLimits::default(),
    }
}

pub fn text(out: &ExecOutput) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn run_text(out: &RunOutput) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub async fn run(c: &AgentClient, lang: Language, code: &str, timeout: Duration) -> RunOutput {
    c.run_code(lang, code, timeout)
        .await
        .unwrap_or_else(|e| panic!("run_code {lang:?} {code:?}: {e}"))
}

pub fn assert_ok(out: &RunOutput, what: &str) {
    assert!(
        out.success(),
        "{what}: {:?}\nstdout: {}\nstderr: {}",
        out.result,
        run_text(out),
        String::from_utf8_lossy(&out.stderr)
    );
}

// ---------------------------------------------------------------------------
// Checks shared by the local agent and the guest.

/// Variables, imports and functions survive; an exception keeps them;
/// reset drops them.
pub async fn check_python_state(c: &AgentClient, timeout: Duration) {
    let out = run(
        c,
        Language::Python,
        "import math\nx = 41\ndef f(v):\n    return v + 1\n",
        timeout,
    )
    .await;
    assert_ok(&out, "define");
    let out = run(c, Language::Python, "print(f(x))\nmath.sqrt(16)", timeout).await;
    assert_ok(&out, "use");
    assert_eq!(
        run_text(&out),
        "42\n4.0\n",
        "print, then the trailing expression's repr"
    );

    let out = run(c, Language::Python, "y = 1\n1 / 0", timeout).await;
    let err = out.result.error.as_ref().expect("an exception");
    assert_eq!(err.name, "ZeroDivisionError");
    assert!(err.traceback.contains("1 / 0"), "{}", err.traceback);
    assert!(err.traceback.contains("<cell-"), "{}", err.traceback);
    assert!(
        !err.traceback.contains("driver.py"),
        "driver frames leak: {}",
        err.traceback
    );
    assert_eq!(out.result.process.exit_code, Some(1));
    assert!(!out.result.state_lost);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("ZeroDivisionError"), "{stderr}");

    let out = run(c, Language::Python, "print(x, y, f(1))", timeout).await;
    assert_ok(&out, "after the exception");
    assert_eq!(run_text(&out), "41 1 2\n");

    let out = run(c, Language::Python, "def broken(:\n  pass", timeout).await;
    assert_eq!(
        out.result.error.as_ref().map(|e| e.name.as_str()),
        Some("SyntaxError")
    );

    c.reset(Some(Language::Python)).await.expect("reset");
    let out = run(c, Language::Python, "x", timeout).await;
    assert_eq!(
        out.result.error.as_ref().map(|e| e.name.as_str()),
        Some("NameError"),
        "{:?}",
        out.result
    );
    let out = run(c, Language::Python, "import math; math.floor(2.5)", timeout).await;
    assert_eq!(run_text(&out), "2\n", "imports work again after reset");
}

pub async fn check_javascript_state(c: &AgentClient, timeout: Duration) {
    let out = run(
        c,
        Language::Javascript,
        "var n = 41; let m = 1; function inc(v) { return v + 1; }",
        timeout,
    )
    .await;
    assert_ok(&out, "define");
    let out = run(
        c,
        Language::Javascript,
        "console.log(inc(n)); ({a: m, b: [1, 2]})",
        timeout,
    )
    .await;
    assert_ok(&out, "use");
    assert_eq!(run_text(&out), "42\n{ a: 1, b: [ 1, 2 ] }\n");

    let out = run(c, Language::Javascript, "var k = 5; null.boom", timeout).await;
    let err = out.result.error.as_ref().expect("an exception");
    assert_eq!(err.name, "TypeError");
    assert!(err.traceback.contains("cell-"), "{}", err.traceback);
    assert!(!err.traceback.contains("driver.js"), "{}", err.traceback);
    assert_eq!(out.result.process.exit_code, Some(1));

    let out = run(c, Language::Javascript, "inc(n) + k + m", timeout).await;
    assert_ok(&out, "after the exception");
    assert_eq!(run_text(&out), "48\n");

    let out = run(
        c,
        Language::Javascript,
        "const r = await Promise.resolve(7); r * 6",
        timeout,
    )
    .await;
    assert_ok(&out, "top-level await");
    assert_eq!(run_text(&out), "42\n");

    c.reset(Some(Language::Javascript)).await.expect("reset");
    let out = run(c, Language::Javascript, "typeof n", timeout).await;
    assert_eq!(run_text(&out), "'undefined'\n");
}

pub async fn check_bash_session(c: &AgentClient, timeout: Duration) {
    let out = run(
        c,
        Language::Bash,
        "cd /tmp\nexport AIRLOCK_T=yes\nf() { echo \"f:$1\"; }",
        timeout,
    )
    .await;
    assert_ok(&out, "cd");
    let out = run(c, Language::Bash, "pwd; echo $AIRLOCK_T; f 1", timeout).await;
    assert_ok(&out, "pwd");
    assert_eq!(run_text(&out), "/tmp\nyes\nf:1\n");
    let out = run(c, Language::Bash, "false", timeout).await;
    assert_eq!(out.result.process.exit_code, Some(1));
    assert!(!out.result.state_lost);
    let out = run(c, Language::Bash, "echo still; (exit 3)", timeout).await;
    assert_eq!(
        (out.result.process.exit_code, run_text(&out).as_str()),
        (Some(3), "still\n")
    );
}

/// `while True: pass` is interrupted at its timeout, and the interpreter
/// keeps its state.
pub async fn check_python_timeout(c: &AgentClient) -> Duration {
    run(c, Language::Python, "kept = 'yes'", SHORT * 10).await;
    let started = Instant::now();
    let out = run(
        c,
        Language::Python,
        "while True:\n    pass",
        Duration::from_secs(2),
    )
    .await;
    let took = started.elapsed();
    assert!(out.result.process.timed_out, "{:?}", out.result);
    assert!(!out.success());
    assert!(took < Duration::from_millis(3500), "took {took:?}");
    let out = run(c, Language::Python, "print(kept)", SHORT * 10).await;
    assert_ok(&out, "after the timeout");
    assert_eq!(run_text(&out), "yes\n");
    took
}

// ---------------------------------------------------------------------------
// The agent in debug mode on this host.

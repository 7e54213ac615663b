//! `cargo xtask test`: the whole test suite on a correct KVM. On hardware
//! KVM it is `cargo test`; where /dev/kvm is kvm_pvm or missing, the test
//! binaries are built here and the ones that boot microVMs run inside
//! nested test hosts, several side by side.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::kvm::{self, TestKvm};
use crate::nested::{self, HostShape, Invocation, Output};
use crate::shard;

/// Integration tests that need no KVM: they run on this machine directly.
const HOST_ONLY_TESTS: &[&str] = &["image", "agent_local", "custom_images"];

pub struct SuiteOptions {
    pub kvm: Option<TestKvm>,
    /// Nested hosts side by side (default: one per core, at most 2).
    pub hosts: Option<usize>,
    pub memory: Option<String>,
    pub timeout: Duration,
    /// Concurrent tests in each test binary inside a nested host.
    pub test_threads: u32,
    pub test_args: Vec<OsString>,
}

pub fn run(options: SuiteOptions) -> Result<i32> {
    let choice = match options.kvm {
        Some(kvm) => kvm,
        None => kvm::choose()?,
    };
    match choice {
        TestKvm::Native => run_native(&options),
        TestKvm::Nested => run_nested(&options),
    }
}

fn cargo() -> Command {
    Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
}

fn run_native(options: &SuiteOptions) -> Result<i32> {
    println!(
        "test suite: on this machine's KVM ({})",
        kvm::describe_host()
    );
    let status = cargo()
        .args(["test", "--workspace", "--locked"])
        .args(pass_args(&options.test_args))
        .status()
        .context("cannot run cargo test")?;
    println!("test suite ran on: {}", kvm::describe_host());
    Ok(status.code().unwrap_or(1))
}

fn pass_args(test_args: &[OsString]) -> Vec<OsString> {
    if test_args.is_empty() {
        Vec::new()
    } else {
        std::iter::once(OsString::from("--"))
            .chain(test_args.iter().cloned())
            .collect()
    }
}

/// A test executable that `cargo test --no-run` built.
#[derive(Debug, Clone)]
pub struct TestBinary {
    /// `package/target`, e.g. `airlock/mcp`.
    pub name: String,
    pub path: PathBuf,
    /// Its package's directory: cargo runs tests from there.
    pub cwd: PathBuf,
    pub needs_kvm: bool,
}

fn run_nested(options: &SuiteOptions) -> Result<i32> {
    let started = Instant::now();
    println!(
        "test suite: this machine's KVM is {}; microVM tests run in nested test hosts \
         (QEMU TCG, emulated AMD SVM, kvm_amd inside)",
        kvm::describe_host()
    );
    nested::host::check()?;
    // The build below may rebuild xtask itself (the workspace's features
    // differ from `cargo run -p xtask`'s): the hosts run a copy.
    let runner = std::env::current_dir()?.join("target/nested/xtask-runner");
    std::fs::create_dir_all(runner.parent().context("no target directory")?)?;
    let _ = std::fs::remove_file(&runner);
    std::fs::copy(std::env::current_exe()?, &runner).context("cannot copy the xtask executable")?;
    let binaries = build_test_binaries()?;
    let workspace = std::env::current_dir()?;
    let airlock = workspace.join("target/debug/airlock");

    phase("guest image (built on this machine; cached)");
    let image = Command::new(&airlock)
        .args(["image", "build"])
        .stderr(Stdio::inherit())
        .output()
        .context("cannot run airlock image build")?;
    if !image.status.success() {
        bail!("airlock image build failed");
    }
    let agent = workspace.join("target/agent/x86_64-unknown-linux-gnu/release/airlock-agent");
    let mut env: Vec<(OsString, OsString)> = std::env::vars_os().collect();
    if std::env::var_os("AIRLOCK_AGENT").is_none() && agent.is_file() {
        // Nothing is compiled inside: the image check uses the agent built here.
        env.push(("AIRLOCK_AGENT".into(), agent.into_os_string()));
    }
    if std::env::var_os("RUST_TEST_THREADS").is_none() {
        // One vCPU inside, but the tests mostly wait on guests: run them
        // concurrently, as cargo test does on a bigger machine.
        env.push((
            "RUST_TEST_THREADS".into(),
            options.test_threads.to_string().into(),
        ));
    }

    phase(
        "test clients: the Python mcp SDK; Node.js 22, the MCP Inspector and the conformance suite (the nested hosts have no network)",
    );
    install_test_clients(&workspace)?;

    let timings_path = workspace.join("target/nested/timings.json");
    let mut timings = shard::Timings::load(&timings_path);

    phase("host-side tests (no KVM needed)");
    let mut tally = Tally::default();
    let mut failed: Vec<String> = Vec::new();
    for binary in binaries.iter().filter(|b| !b.needs_kvm) {
        let t0 = Instant::now();
        let ok = run_on_host(binary, &options.test_args, &mut tally)?;
        timings.record(&binary.name, t0.elapsed());
        if !ok {
            failed.push(binary.name.clone());
        }
    }

    let shape = HostShape {
        vcpus: 1,
        memory: options.memory.clone().unwrap_or_else(|| "8G".into()),
        ..HostShape::default()
    };
    phase("warm template for hardware KVM (made in a nested host; cached)");
    let template = nested::run(
        &shape,
        &Invocation {
            argv: vec![
                airlock.clone().into_os_string(),
                "snapshot".into(),
                "create".into(),
            ],
            cwd: workspace.clone(),
            env: env.clone(),
            timeout: Duration::from_secs(1200),
        },
        Output::Prefixed("[template] ".into()),
    )?;
    if !template.success() {
        bail!(
            "airlock snapshot create failed in the nested host (status {})",
            template.exit_code()
        );
    }

    let kvm_binaries: Vec<TestBinary> = binaries.iter().filter(|b| b.needs_kvm).cloned().collect();
    let hosts = options
        .hosts
        .unwrap_or_else(default_hosts)
        .max(1)
        .min(kvm_binaries.len().max(1));
    let shards = shard::split(&kvm_binaries, hosts, &timings);
    phase(&format!(
        "microVM tests in {hosts} nested host(s) of 1 vCPU, {} each",
        shape.memory
    ));
    let shared_tally = Arc::new(Mutex::new(tally));
    let context = ShardContext {
        shape: &shape,
        env: &env,
        workspace: &workspace,
        timeout: options.timeout,
        test_args: &options.test_args,
        tally: &shared_tally,
    };
    let reports: Vec<Result<shard::Report>> = std::thread::scope(|scope| {
        let handles: Vec<_> = shards
            .iter()
            .enumerate()
            .map(|(index, binaries)| {
                let context = &context;
                scope.spawn(move || context.run(index, binaries))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("a shard thread panicked")))
            })
            .collect()
    });
    for report in reports {
        let report = report?;
        failed.extend(report.failed);
        for (name, elapsed) in report.timings {
            timings.record(&name, elapsed);
        }
    }
    timings.save(&timings_path);
    let tally = shared_tally.lock().map(|t| t.clone()).unwrap_or_default();

    println!();
    println!(
        "test suite ran on: hardware-style KVM in nested test hosts (this machine: {}), {:.0} s",
        kvm::describe_host(),
        started.elapsed().as_secs_f64()
    );
    if !failed.is_empty() {
        println!("failed test binaries: {}", failed.join(", "));
    }
    println!(
        "suite: {} passed, {} failed, {} skipped",
        tally.passed, tally.failed, tally.ignored
    );
    Ok(if failed.is_empty() && tally.failed == 0 {
        0
    } else {
        1
    })
}

/// What tests/mcp.rs would install on first use, installed here where the
/// package registries can be reached.
fn install_test_clients(workspace: &Path) -> Result<()> {
    let venv = workspace.join("target/pyenv");
    if !venv.join("bin/python").is_file() {
        run_checked(
            Command::new("python3").args(["-m", "venv"]).arg(&venv),
            "python3 -m venv (apt-get install python3-venv)",
        )?;
    }
    run_checked(
        Command::new(venv.join("bin/pip"))
            .args(["install", "-q", "--disable-pip-version-check", "-r"])
            .arg(workspace.join("tests/mcp/requirements.txt")),
        "pip install -r tests/mcp/requirements.txt",
    )?;
    install_node_clients(workspace)
}

/// Node.js 22, the MCP Inspector and the MCP conformance suite, at the
/// versions tests/mcp/node/package-lock.json pins, into target/mcp-node
/// (again only when the lock changed). Node.js itself comes from the npm
/// registry: the distribution's is too old for both clients.
fn install_node_clients(workspace: &Path) -> Result<()> {
    let source = workspace.join("tests/mcp/node");
    let prefix = workspace.join("target/mcp-node");
    let lock = std::fs::read(source.join("package-lock.json"))
        .context("cannot read tests/mcp/node/package-lock.json")?;
    let stamp = prefix.join("node_modules/.airlock-installed-lock");
    if std::fs::read(&stamp).is_ok_and(|installed| installed == lock) {
        return Ok(());
    }
    std::fs::create_dir_all(&prefix)?;
    for file in ["package.json", "package-lock.json"] {
        std::fs::copy(source.join(file), prefix.join(file))
            .with_context(|| format!("cannot copy tests/mcp/node/{file}"))?;
    }
    // Install scripts stay off: they would run under the system's Node.js,
    // and nothing the tests use needs them.
    run_checked(
        Command::new("npm")
            .args(["ci", "--ignore-scripts", "--no-audit", "--no-fund"])
            .current_dir(&prefix),
        "npm ci of Node.js 22, the MCP Inspector and the conformance suite (apt-get install nodejs npm)",
    )?;
    std::fs::write(&stamp, lock).context("cannot record the installed lock")?;
    Ok(())
}

fn run_checked(cmd: &mut Command, what: &str) -> Result<()> {
    let status = cmd.status().with_context(|| format!("cannot run {what}"))?;
    if !status.success() {
        bail!("{what} failed ({status})");
    }
    Ok(())
}

fn default_hosts() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .clamp(1, 2)
}

fn phase(name: &str) {
    println!("\n=== {name}");
}

/// `cargo test --no-run`, then the executables it built.
fn build_test_binaries() -> Result<Vec<TestBinary>> {
    phase("build (cargo test --no-run on this machine; nothing is compiled inside)");
    let status = cargo()
        .args(["build", "--workspace", "--locked"])
        .status()
        .context("cannot run cargo build")?;
    if !status.success() {
        bail!("cargo build failed");
    }
    let out = cargo()
        .args([
            "test",
            "--workspace",
            "--locked",
            "--no-run",
            "--message-format=json-render-diagnostics",
        ])
        .stderr(Stdio::inherit())
        .output()
        .context("cannot run cargo test --no-run")?;
    if !out.status.success() {
        bail!("cargo test --no-run failed");
    }
    let mut binaries = Vec::new();
    for line in out.stdout.lines() {
        let line = line?;
        let Ok(message) = serde_json::from_str::<serde_json::Value>(&line) else {
            continue;
        };
        if let Some(binary) = test_binary(&message) {
            binaries.push(binary);
        }
    }
    if binaries.is_empty() {
        bail!("cargo test --no-run built no test executable");
    }
    Ok(binaries)
}

fn test_binary(message: &serde_json::Value) -> Option<TestBinary> {
    if message["reason"] != "compiler-artifact" || message["profile"]["test"] != true {
        return None;
    }
    let path = PathBuf::from(message["executable"].as_str()?);
    let target = &message["target"];
    let target_name = target["name"].as_str()?;
    let kinds: Vec<&str> = target["kind"]
        .as_array()?
        .iter()
        .filter_map(|k| k.as_str())
        .collect();
    let manifest = PathBuf::from(message["manifest_path"].as_str()?);
    let cwd = manifest.parent()?.to_path_buf();
    let package = package_name(message["package_id"].as_str()?)?;
    let integration = kinds.contains(&"test");
    let needs_kvm = integration && package == "airlock" && !HOST_ONLY_TESTS.contains(&target_name);
    let kind = if integration {
        "test"
    } else {
        kinds.first().copied().unwrap_or("unit")
    };
    Some(TestBinary {
        name: format!("{package}/{kind}:{target_name}"),
        path,
        cwd,
        needs_kvm,
    })
}

/// The package's name from a cargo package id: `path+file:///w/guest-agent#airlock-agent@0.1.0`
/// names it after `#`; `path+file:///w/xtask#0.1.0` leaves it to the directory.
fn package_name(id: &str) -> Option<String> {
    let (url, fragment) = id.rsplit_once('#')?;
    match fragment.split_once('@') {
        Some((name, _)) => Some(name.to_string()),
        None => Some(url.rsplit('/').next()?.to_string()),
    }
}

fn run_on_host(binary: &TestBinary, test_args: &[OsString], tally: &mut Tally) -> Result<bool> {
    println!("     Running {} ({})", binary.name, binary.path.display());
    let mut child = Command::new(&binary.path)
        .args(test_args)
        .current_dir(&binary.cwd)
        .stdout(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot run {}", binary.path.display()))?;
    let stdout = child.stdout.take().context("no stdout pipe")?;
    for line in std::io::BufReader::new(stdout).lines() {
        let line = line?;
        tally.count(&line);
        println!("{line}");
    }
    Ok(child.wait()?.success())
}

/// What every nested host of one suite run shares.
struct ShardContext<'a> {
    shape: &'a HostShape,
    env: &'a [(OsString, OsString)],
    workspace: &'a Path,
    timeout: Duration,
    test_args: &'a [OsString],
    tally: &'a Arc<Mutex<Tally>>,
}

impl ShardContext<'_> {
    /// Runs one host's share of the test binaries in a fresh nested host.
    fn run(&self, index: usize, binaries: &[TestBinary]) -> Result<shard::Report> {
        let names: Vec<&str> = binaries.iter().map(|b| b.name.as_str()).collect();
        println!("[host {}] runs {}", index + 1, names.join(", "));
        let plan = shard::Plan {
            binaries: binaries.to_vec(),
            test_args: self.test_args.to_vec(),
        };
        let plan_path = self
            .workspace
            .join(format!("target/nested/shard-{index}.json"));
        plan.save(&plan_path)?;
        let runner = self.workspace.join("target/nested/xtask-runner");
        let outcome = nested::run(
            self.shape,
            &Invocation {
                argv: vec![
                    runner.into_os_string(),
                    "run-shard".into(),
                    plan_path.clone().into_os_string(),
                ],
                cwd: self.workspace.to_path_buf(),
                env: self.env.to_vec(),
                timeout: self.timeout,
            },
            Output::Tallied(format!("[host {}] ", index + 1), Arc::clone(self.tally)),
        )?;
        let mut report = shard::Report::load(&plan_path);
        if !outcome.success() && report.failed.is_empty() {
            report.failed.push(format!(
                "host {} (status {})",
                index + 1,
                outcome.exit_code()
            ));
        }
        Ok(report)
    }
}

/// Counts from the test harness's `test result:` lines.
#[derive(Debug, Default, Clone)]
pub struct Tally {
    pub passed: u64,
    pub failed: u64,
    pub ignored: u64,
}

impl Tally {
    pub fn count(&mut self, line: &str) {
        let Some(rest) = line.trim_start().strip_prefix("test result: ") else {
            return;
        };
        let numbers: BTreeMap<&str, u64> = rest
            .split(';')
            .filter_map(|part| {
                let mut words = part.split_whitespace().rev();
                let label = words.next()?;
                let value = words.next()?.parse().ok()?;
                Some((label, value))
            })
            .collect();
        self.passed += numbers.get("passed").copied().unwrap_or(0);
        self.failed += numbers.get("failed").copied().unwrap_or(0);
        self.ignored += numbers.get("ignored").copied().unwrap_or(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tallies_harness_result_lines() {
        let mut tally = Tally::default();
        tally.count("test result: ok. 12 passed; 0 failed; 1 ignored; 0 measured; 0 filtered out; finished in 3.1s");
        tally.count(
            "test result: FAILED. 3 passed; 2 failed; 0 ignored; 0 measured; 0 filtered out",
        );
        tally.count("running 5 tests");
        assert_eq!((tally.passed, tally.failed, tally.ignored), (15, 2, 1));
    }

    #[test]
    fn package_names_from_ids() {
        assert_eq!(
            package_name("path+file:///w/main#airlock@0.1.0").as_deref(),
            Some("airlock")
        );
        assert_eq!(
            package_name("path+file:///w/main/xtask#0.1.0").as_deref(),
            Some("xtask")
        );
    }
}

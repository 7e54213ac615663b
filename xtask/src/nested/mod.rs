//! The nested test host: a QEMU guest under software emulation (TCG) with an
//! emulated AMD CPU that has SVM and nested paging, so that its Linux offers
//! a hardware-style `/dev/kvm` (kvm_amd). It sees this machine's whole
//! filesystem over 9p and runs one command there (../shared/TESTHOST.md).

pub mod host;
mod initramfs;
mod script;

use std::ffi::OsString;
use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use std::sync::{Arc, Mutex};

use anyhow::{Context, Result, bail};

use crate::suite::Tally;

/// How a nested host is shaped.
#[derive(Debug, Clone)]
pub struct HostShape {
    /// vCPUs of the nested host. 1 is the default: with 2, QEMU's
    /// multi-threaded TCG corrupts nested SVM guests (see the suite's notes).
    pub vcpus: u32,
    /// Memory, as QEMU's `-m` takes it (`8G`, `4096M`).
    pub memory: String,
    /// QEMU's TCG threading: `multi` (one host thread per vCPU) or `single`.
    pub tcg_thread: String,
    /// Extra options for the nested host's kernel.
    pub kernel_args: String,
}

/// Speculation mitigations cost much under TCG and guard nothing here.
pub const DEFAULT_KERNEL_ARGS: &str = "mitigations=off";

impl Default for HostShape {
    fn default() -> Self {
        HostShape {
            vcpus: 1,
            memory: "8G".into(),
            tcg_thread: "multi".into(),
            kernel_args: DEFAULT_KERNEL_ARGS.into(),
        }
    }
}

/// One command to run inside.
pub struct Invocation {
    pub argv: Vec<OsString>,
    pub cwd: PathBuf,
    pub env: Vec<(OsString, OsString)>,
    pub timeout: Duration,
}

/// Where the command's output goes.
#[derive(Clone)]
pub enum Output {
    /// Byte for byte to our stdout and stderr.
    PassThrough,
    /// Line by line, each line behind this prefix (for hosts side by side).
    Prefixed(String),
    /// As `Prefixed`, and every line is counted into the suite's tally.
    Tallied(String, Arc<Mutex<Tally>>),
}

#[derive(Debug)]
pub struct Outcome {
    /// The command's exit status; `None` if the host ended without one.
    pub status: Option<i32>,
    pub timed_out: bool,
    pub elapsed: Duration,
}

impl Outcome {
    /// The status to exit with: the command's own, 124 after a timeout (as
    /// timeout(1) does), 125 when the host itself failed.
    pub fn exit_code(&self) -> i32 {
        if self.timed_out {
            124
        } else {
            self.status.unwrap_or(125)
        }
    }

    pub fn success(&self) -> bool {
        self.exit_code() == 0
    }
}

/// The cache the initramfs lives in, beside the airlock image cache.
pub fn cache_root() -> PathBuf {
    if let Some(home) = std::env::var_os("AIRLOCK_HOME").filter(|v| !v.is_empty()) {
        return PathBuf::from(home);
    }
    if let Some(xdg) = std::env::var_os("XDG_CACHE_HOME").filter(|v| !v.is_empty()) {
        return PathBuf::from(xdg).join("airlock");
    }
    let home = std::env::var_os("HOME").unwrap_or_else(|| "/root".into());
    PathBuf::from(home).join(".cache").join("airlock")
}

/// Runs `invocation` in a fresh nested host and waits for it.
pub fn run(shape: &HostShape, invocation: &Invocation, output: Output) -> Result<Outcome> {
    let kernel = host::check()?;
    let cache = cache_root();
    let initramfs = initramfs::ensure(&cache, &kernel)?;
    let run_dir = make_run_dir(&cache)?;
    let run_script = run_dir.join("run.sh");
    fs::write(
        &run_script,
        script::render(&invocation.cwd, &invocation.env, &invocation.argv),
    )
    .context("cannot write the nested run script")?;
    let console_log = run_dir.join("console.log");
    let status_file = run_dir.join("status");

    let mut cmd = Command::new(host::QEMU);
    cmd.args(["-M", "q35", "-cpu", "max", "-nodefaults", "-no-user-config"])
        .args(["-display", "none", "-no-reboot"])
        .arg("-accel")
        .arg(format!("tcg,thread={}", shape.tcg_thread))
        .arg("-smp")
        .arg(shape.vcpus.to_string())
        .arg("-m")
        .arg(&shape.memory)
        .arg("-serial")
        .arg(format!("file:{}", console_log.display()))
        .arg("-kernel")
        .arg(&kernel.vmlinuz)
        .arg("-initrd")
        .arg(&initramfs)
        .arg("-append")
        .arg(format!(
            "console=ttyS0 quiet panic=-1 {} airlock.run={}",
            shape.kernel_args,
            run_script.display()
        ))
        .args([
            "-virtfs",
            "local,path=/,mount_tag=hostroot,security_model=passthrough,id=hostroot,multidevs=remap",
        ])
        .args(["-device", "virtio-serial-pci"])
        // QEMU opens its own stdout and stderr again for the guest's ports,
        // so the bytes flow through the pipes read below.
        .args(["-chardev", "file,id=out,path=/proc/self/fd/1,append=on"])
        .args(["-device", "virtserialport,chardev=out,name=stdout,nr=1"])
        .args(["-chardev", "file,id=err,path=/proc/self/fd/2,append=on"])
        .args(["-device", "virtserialport,chardev=err,name=stderr,nr=2"])
        .arg("-chardev")
        .arg(format!("file,id=status,path={}", status_file.display()))
        .args(["-device", "virtserialport,chardev=status,name=status,nr=3"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());

    let started = Instant::now();
    let mut child = cmd
        .spawn()
        .with_context(|| format!("cannot start {}", host::QEMU))?;
    let forwarders = forward_output(&mut child, &output)?;
    let (exit, timed_out) = wait_with_deadline(&mut child, invocation.timeout)?;
    for handle in forwarders {
        let _ = handle.join();
    }
    let elapsed = started.elapsed();
    let status = fs::read_to_string(&status_file)
        .ok()
        .and_then(|text| text.trim().parse::<i32>().ok());
    let outcome = Outcome {
        status: if timed_out { None } else { status },
        timed_out,
        elapsed,
    };
    if outcome.success() {
        let _ = fs::remove_dir_all(&run_dir);
    } else if status.is_none() {
        report_host_failure(&outcome, exit, &console_log);
    }
    Ok(outcome)
}

fn make_run_dir(cache: &Path) -> Result<PathBuf> {
    let runs = cache.join("nested").join("runs");
    fs::create_dir_all(&runs).with_context(|| format!("cannot create {}", runs.display()))?;
    for n in 0u32.. {
        let dir = runs.join(format!("{}-{n}", std::process::id()));
        match fs::create_dir(&dir) {
            Ok(()) => return Ok(dir),
            Err(err) if err.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(err) => {
                return Err(err).with_context(|| format!("cannot create {}", dir.display()));
            }
        }
    }
    bail!("no free run directory in {}", runs.display())
}

type Forwarder = std::thread::JoinHandle<()>;

fn forward_output(child: &mut Child, output: &Output) -> Result<Vec<Forwarder>> {
    let stdout = child.stdout.take().context("QEMU has no stdout pipe")?;
    let stderr = child.stderr.take().context("QEMU has no stderr pipe")?;
    let out = spawn_forwarder(stdout, output.clone(), false);
    let err = spawn_forwarder(stderr, output.clone(), true);
    Ok(vec![out, err])
}

fn spawn_forwarder(
    source: impl Read + Send + 'static,
    output: Output,
    to_stderr: bool,
) -> Forwarder {
    std::thread::spawn(move || {
        let sink = move |bytes: &[u8]| {
            if to_stderr {
                let mut err = std::io::stderr().lock();
                let _ = err.write_all(bytes);
                let _ = err.flush();
            } else {
                let mut out = std::io::stdout().lock();
                let _ = out.write_all(bytes);
                let _ = out.flush();
            }
        };
        match output {
            Output::PassThrough => {
                let mut source = source;
                let mut buf = [0u8; 16 * 1024];
                while let Ok(n) = source.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    sink(&buf[..n]);
                }
            }
            Output::Prefixed(prefix) => forward_lines(source, &prefix, None, sink),
            Output::Tallied(prefix, tally) => forward_lines(source, &prefix, Some(&tally), sink),
        }
    })
}

fn forward_lines(
    source: impl Read,
    prefix: &str,
    tally: Option<&Mutex<Tally>>,
    sink: impl Fn(&[u8]),
) {
    let mut reader = BufReader::new(source);
    let mut line = Vec::new();
    while let Ok(n) = reader.read_until(b'\n', &mut line) {
        if n == 0 {
            break;
        }
        if !line.ends_with(b"\n") {
            line.push(b'\n');
        }
        if let Some(tally) = tally
            && let Ok(mut tally) = tally.lock()
        {
            tally.count(&String::from_utf8_lossy(&line));
        }
        let mut framed = prefix.as_bytes().to_vec();
        framed.extend_from_slice(&line);
        sink(&framed);
        line.clear();
    }
}

/// Waits for QEMU; past the deadline it is killed. Returns its exit status
/// and whether the deadline passed.
fn wait_with_deadline(child: &mut Child, timeout: Duration) -> Result<(ExitStatus, bool)> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().context("cannot wait for QEMU")? {
            return Ok((status, false));
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let status = child.wait().context("cannot wait for QEMU")?;
            return Ok((status, true));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn report_host_failure(outcome: &Outcome, exit: ExitStatus, console_log: &Path) {
    if outcome.timed_out {
        eprintln!(
            "nested host: the command did not finish within its time limit ({:.0} s); QEMU was killed. Console: {}",
            outcome.elapsed.as_secs_f64(),
            console_log.display()
        );
    } else {
        eprintln!(
            "nested host: ended without the command's exit status (QEMU {exit}). Last console lines ({}):",
            console_log.display()
        );
    }
    let text = fs::read_to_string(console_log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    for line in &lines[lines.len().saturating_sub(20)..] {
        eprintln!("  | {line}");
    }
}

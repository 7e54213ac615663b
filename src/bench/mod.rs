//! `airlock bench`: how fast sandboxes start and answer, and what they cost,
//! measured in one run against baselines from the same run (this machine is
//! shared and noisy, so ratios mean more than absolute numbers). On a
//! software-nested KVM, guest-side times say little about real KVM; the
//! VMM-side times, exit counts and memory figures do not depend on it.

mod conversations;
mod egress;
mod firecracker;
pub mod procfs;
pub mod qemu;
mod restore;
pub mod sessions;
pub mod stats;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use airlock_protocol::{Language, Message, RunCode};
use anyhow::{Context, Result, bail};

use crate::agent_client::AgentClient;
use crate::host_kvm::KvmFlavor;
use crate::sandbox::Sandbox;
use crate::template::{self, Template, TemplateShape};
use crate::vm::{Vm, VmSpec};
use stats::{ms, summarize};

#[derive(Debug, Clone, clap::Args)]
pub struct BenchOptions {
    /// Round trips for the warm run_code measurement.
    #[arg(long, default_value_t = 30)]
    pub rounds: usize,
    /// Restores timed one by one.
    #[arg(long, default_value_t = 5)]
    pub restores: usize,
    /// Sandbox counts at which host memory is measured.
    #[arg(long, value_delimiter = ',', default_value = "1,10,50")]
    pub memory_at: Vec<usize>,
    /// How long 10 idle sandboxes are watched for CPU use.
    #[arg(long, default_value_t = 30)]
    pub idle_seconds: u64,
    /// Concurrency levels at which restores per second are measured (1, the
    /// baseline, is always measured).
    #[arg(long, value_delimiter = ',', default_value = "2,4")]
    pub concurrent_restores: Vec<usize>,
    /// Restores per concurrent task at each level.
    #[arg(long, default_value_t = 4)]
    pub restores_per_task: usize,
    /// Skip the cold boot (minutes on a software-nested KVM).
    #[arg(long)]
    pub skip_cold_boot: bool,
    /// Skip the QEMU comparison.
    #[arg(long)]
    pub skip_qemu: bool,
    /// MiB a sandbox dirties before the pause/resume measurement, per level.
    #[arg(long, value_delimiter = ',', default_value = "0,10,50,200")]
    pub dirty_mib: Vec<u64>,
    /// Forks resumed from one saved sandbox.
    #[arg(long, default_value_t = 10)]
    pub forks: usize,
    /// Pause/resume cycles of the zero-loss soak.
    #[arg(long, default_value_t = 1000)]
    pub soak_cycles: usize,
    /// Skip pause/resume, forks and the soak.
    #[arg(long)]
    pub skip_sessions: bool,
    /// Only pause/resume, forks and the soak.
    #[arg(long)]
    pub only_sessions: bool,
    /// MiB downloaded through the egress path (and by the host, the baseline).
    #[arg(long, default_value_t = 100)]
    pub egress_mib: u64,
    /// Connections timed for the latency the egress path adds.
    #[arg(long, default_value_t = 50)]
    pub egress_connections: usize,
    /// Skip the egress measurement.
    #[arg(long)]
    pub skip_egress: bool,
    /// Only the egress measurement.
    #[arg(long)]
    pub only_egress: bool,
    /// Conversations timed one at a time from a ready warm pool (o).
    #[arg(long, default_value_t = 5)]
    pub pool_conversations: usize,
    /// Conversations beginning at once (p).
    #[arg(long, default_value_t = 50)]
    pub conversations_at_once: usize,
    /// Skip (o) and (p).
    #[arg(long)]
    pub skip_conversations: bool,
    /// A Firecracker binary to restore the same guest with, beside airlock
    /// (q); airlock neither ships nor builds it.
    #[arg(long, value_name = "PATH")]
    pub firecracker: Option<PathBuf>,
    /// Only the comparison with Firecracker (needs --firecracker).
    #[arg(long)]
    pub only_firecracker: bool,
}

const CONNECT_TIMEOUT: Duration = Duration::from_secs(60);
const BOOT_TIMEOUT: Duration = Duration::from_secs(900);
const RUN_TIMEOUT_MS: u64 = 600_000;

/// Runs `code` in the warm Python interpreter; returns its stdout.
pub async fn run_python(client: &AgentClient, code: &str) -> Result<String> {
    run_in(client, Language::Python, code).await
}

/// Runs `code` in the warm interpreter of `language`; its stdout, or an
/// error if it failed.
pub async fn run_in(client: &AgentClient, language: Language, code: &str) -> Result<String> {
    let message = Message::RunCode(RunCode {
        language,
        timeout_ms: Some(RUN_TIMEOUT_MS),
        output: Default::default(),
    });
    let mut response = client.request(message, code.as_bytes().to_vec()).await?;
    let mut stdout = Vec::new();
    while let Some(frame) = response.next().await? {
        match frame.message {
            Message::Output(out) if out.stream == airlock_protocol::Stream::Stdout => {
                stdout.extend(frame.payload)
            }
            Message::RunCodeResult(result) => {
                if result.error.is_some() || result.process.exit_code != Some(0) {
                    bail!("run_code failed: {result:?}");
                }
                return Ok(String::from_utf8_lossy(&stdout).into_owned());
            }
            Message::Error(e) => bail!("agent error: {}", e.message),
            _ => {}
        }
    }
    bail!("the agent closed the request without a result")
}

pub async fn run(opts: &BenchOptions) -> Result<()> {
    let cache = crate::paths::ensure_cache_root()?;
    let (image, _) = crate::image::ensure(&cache)?;
    let exe = std::env::current_exe().context("cannot find the airlock executable")?;
    let shape = TemplateShape::default();
    let template = template::ensure(&cache, &image, shape, &exe).await?;
    let flavor = KvmFlavor::detect();
    println!("airlock bench — host KVM: {}", describe_kvm(flavor));
    println!(
        "image {} · template {} ({} vCPU, {} MiB)",
        image.manifest.recipe_hash,
        template.dir.display(),
        shape.vcpus,
        shape.memory_mib
    );

    if opts.only_sessions {
        return sessions_part(&template, &exe, opts).await;
    }
    if opts.only_firecracker || opts.firecracker.is_some() {
        if let Some(binary) = &opts.firecracker {
            firecracker::beside_firecracker(binary, &template, &exe, opts.restores).await?;
        } else {
            bail!("--only-firecracker needs --firecracker PATH");
        }
        if opts.only_firecracker {
            return Ok(());
        }
    }
    if opts.only_egress {
        return egress::egress(&template, &exe, opts.egress_mib, opts.egress_connections).await;
    }

    // (d) first: the host baseline, while nothing else runs.
    let host = host_python_baseline(opts.rounds.min(10))?;
    println!("\n(d) host `python3 -c 'print(1)'`: {host}");

    let cold = if opts.skip_cold_boot {
        None
    } else {
        Some(cold_boot(&image, &exe, shape).await?)
    };
    if let Some(cold) = cold {
        println!("\n(a) cold boot to first print(1): {}", ms(cold));
    }

    let (restore_total, vmm_part, guest_part) =
        restore::restores(&template, &exe, opts.restores).await?;
    restore::confinement_cost(&template, &exe, opts.restores).await?;
    if let Some(cold) = cold {
        println!(
            "    ratio cold boot / restore-to-first-result: {:.1}x",
            cold.as_secs_f64() / restore_total.median.as_secs_f64()
        );
    }

    let warm = restore::warm_round_trips(&template, &exe, opts.rounds).await?;
    println!(
        "    ratio guest part of a restore (b) / warm round trip: {:.1}x (goal: at most 3x)",
        guest_part.median.as_secs_f64() / warm.median.as_secs_f64()
    );
    println!(
        "    ratio warm round trip / host python3 start: {:.3}",
        warm.median.as_secs_f64() / host.median.as_secs_f64()
    );

    if !opts.skip_conversations {
        conversations::from_the_pool(
            &template,
            &exe,
            opts.pool_conversations,
            crate::mcp::DEFAULT_POOL_SIZE_HTTP,
            &warm,
        )
        .await?;
        conversations::at_once(
            &template,
            &exe,
            opts.conversations_at_once,
            crate::mcp::DEFAULT_POOL_SIZE_HTTP,
            crate::sandbox::pool::DEFAULT_POOL_MAX,
            &warm,
        )
        .await?;
    }
    concurrent_restores(
        &template,
        &exe,
        &opts.concurrent_restores,
        opts.restores_per_task,
    )
    .await?;
    memory_and_rate(&template, &exe, &opts.memory_at).await?;
    idle_cpu(&template, &exe, opts.idle_seconds).await?;

    if opts.skip_qemu {
        println!("\n(h) QEMU: skipped");
    } else if !qemu::available() {
        println!(
            "\n(h) QEMU: skipped ({} not found: apt-get install qemu-system-x86)",
            qemu::QEMU
        );
    } else {
        let q = qemu_restore(&image, shape.memory_mib, flavor)?;
        println!("\n(h) QEMU restore (-incoming from a migrate file) to running: {q}");
        println!(
            "    ratio QEMU restore / airlock VMM part of restore: {:.1}x",
            q.median.as_secs_f64() / vmm_part.median.as_secs_f64()
        );
    }
    if !opts.skip_sessions {
        sessions_part(&template, &exe, opts).await?;
    }
    if !opts.skip_egress {
        egress::egress(&template, &exe, opts.egress_mib, opts.egress_connections).await?;
    }
    Ok(())
}

/// (k), (l), (m): pause and resume, forks, the soak.
async fn sessions_part(template: &Template, exe: &Path, opts: &BenchOptions) -> Result<()> {
    let root = tempfile::Builder::new()
        .prefix("airlock-bench-sessions-")
        .tempdir()
        .context("cannot create a state directory for the bench")?;
    let baseline = sessions::pause_and_resume(template, exe, root.path(), &opts.dirty_mib).await?;
    sessions::forks(template, exe, root.path(), opts.forks, baseline).await?;
    if opts.soak_cycles > 0 {
        sessions::soak(template, exe, root.path(), opts.soak_cycles).await?;
    }
    Ok(())
}

fn host_python_baseline(rounds: usize) -> Result<stats::Summary> {
    let mut samples = Vec::new();
    for _ in 0..rounds.max(1) {
        let started = Instant::now();
        let out = std::process::Command::new("python3")
            .args(["-c", "print(1)"])
            .output()
            .context("python3 on the host")?;
        if !out.status.success() {
            bail!("python3 -c 'print(1)' failed on the host");
        }
        samples.push(started.elapsed());
    }
    summarize(&samples).context("no samples")
}

async fn cold_boot(
    image: &crate::image::Image,
    exe: &Path,
    shape: TemplateShape,
) -> Result<Duration> {
    let run_dir = tempfile::Builder::new()
        .prefix("airlock-bench-")
        .tempdir()?;
    let spec = VmSpec {
        airlock_exe: exe.to_path_buf(),
        kernel: image.vmlinux(),
        rootfs: image.rootfs(),
        vcpus: shape.vcpus,
        memory_mib: shape.memory_mib,
        extra_cmdline: String::new(),
        init: None,
        run_dir: run_dir.path().to_path_buf(),
        restore: None,
        resume: None,
        snapshot_dir: None,
        console_max_bytes: crate::vmm::config::DEFAULT_CONSOLE_MAX_BYTES,
        label: "bench-cold-boot".into(),
        confinement: crate::confinement::Confinement::current(),
        vsock_forward: Vec::new(),
    };
    eprintln!(
        "bench: cold boot (minutes on kvm_pvm: boot plus importing numpy, pandas, matplotlib)"
    );
    let started = Instant::now();
    let mut vm = Vm::spawn(&spec).await?;
    vm.wait_agent_ready(BOOT_TIMEOUT).await?;
    let client = AgentClient::connect(
        vm.vsock_socket(),
        airlock_protocol::AGENT_VSOCK_PORT,
        CONNECT_TIMEOUT,
    )
    .await?;
    let out = run_python(&client, "print(1)").await?;
    let elapsed = started.elapsed();
    if out.trim() != "1" {
        bail!("cold boot print(1) printed {out:?}");
    }
    drop(client);
    let _ = vm.stop(Duration::from_secs(10)).await;
    Ok(elapsed)
}

/// The KVM this run measures, named so that reports from different hosts
/// can be told apart.
fn describe_kvm(flavor: KvmFlavor) -> String {
    let module = ["kvm_amd", "kvm_intel", "kvm_pvm"]
        .into_iter()
        .find(|m| Path::new("/sys/module").join(m).exists())
        .unwrap_or("kvm");
    let nested = if std::env::var_os("AIRLOCK_NESTED").is_some() {
        ", inside the nested test host (QEMU TCG with emulated SVM)"
    } else {
        ""
    };
    format!("{} ({module}{nested})", crate::doctor::flavor_tag(flavor))
}

/// Restores per second with `level` restores in flight at once, against one
/// at a time in the same run. Each restore counts until its first print(1).
async fn concurrent_restores(
    template: &Template,
    exe: &Path,
    levels: &[usize],
    per_task: usize,
) -> Result<()> {
    println!("\n(f2) concurrent restores per second, each until its first print(1)");
    let per_task = per_task.max(1);
    let mut all_levels = vec![1];
    all_levels.extend(levels.iter().copied().filter(|&l| l > 1));
    let mut baseline = None;
    for level in all_levels {
        let started = Instant::now();
        let tasks: Vec<_> = (0..level)
            .map(|_| {
                let template = template.clone();
                let exe = exe.to_path_buf();
                tokio::spawn(async move {
                    for _ in 0..per_task {
                        let sandbox = Sandbox::restore(&template, &exe).await?;
                        let out = run_python(sandbox.client(), "print(1)").await?;
                        sandbox.destroy().await;
                        if out.trim() != "1" {
                            bail!("restored print(1) printed {out:?}");
                        }
                    }
                    Ok(())
                })
            })
            .collect();
        for task in tasks {
            task.await.context("a restore task panicked")??;
        }
        let rate = (level * per_task) as f64 / started.elapsed().as_secs_f64().max(f64::EPSILON);
        let ratio = baseline.map(|b: f64| format!(" = {:.2}x one at a time", rate / b));
        baseline.get_or_insert(rate);
        println!(
            "    {level} at once: {} restores in {:.2} s = {rate:.2} per second{}",
            level * per_task,
            started.elapsed().as_secs_f64(),
            ratio.unwrap_or_default()
        );
    }
    Ok(())
}

async fn memory_and_rate(template: &Template, exe: &Path, levels: &[usize]) -> Result<()> {
    let memory_file = crate::vmm::snapshot::memory_path(&template.dir);
    let mut alive: Vec<Sandbox> = Vec::new();
    let mut restore_times = Vec::new();
    println!("\n(e) host memory per idle restored sandbox (PSS of its VMM process)");
    let mut levels = levels.to_vec();
    levels.sort_unstable();
    for level in levels {
        while alive.len() < level {
            let started = Instant::now();
            alive.push(Sandbox::restore(template, exe).await?);
            restore_times.push(started.elapsed());
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        let samples: Vec<procfs::Pss> = alive
            .iter()
            .filter_map(|s| procfs::pss(s.pid(), &memory_file))
            .collect();
        let avg = |f: fn(&procfs::Pss) -> u64| {
            samples.iter().map(f).sum::<u64>() as f64
                / samples.len().max(1) as f64
                / (1 << 20) as f64
        };
        println!(
            "    {level:>3} alive: PSS {:.1} MiB each = guest memory {:.1} MiB + VMM overhead {:.1} MiB; at this PSS, 16 GiB would hold {:.0} (computed, not started to the limit)",
            avg(|p| p.total),
            avg(|p| p.guest),
            avg(|p| p.vmm_overhead()),
            16.0 * 1024.0 / avg(|p| p.total).max(f64::EPSILON)
        );
    }
    let total: Duration = restore_times.iter().sum();
    println!(
        "\n(f) sandboxes restored one after another: {} in {:.2} s = {:.1} per second (each until its agent answered and was refreshed)",
        restore_times.len(),
        total.as_secs_f64(),
        restore_times.len() as f64 / total.as_secs_f64().max(f64::EPSILON)
    );
    for sandbox in alive {
        sandbox.destroy().await;
    }
    Ok(())
}

async fn idle_cpu(template: &Template, exe: &Path, seconds: u64) -> Result<()> {
    let mut sandboxes = Vec::new();
    for _ in 0..10 {
        sandboxes.push(Sandbox::restore(template, exe).await?);
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let before: Vec<Duration> = sandboxes
        .iter()
        .filter_map(|s| procfs::cpu_time(s.pid()))
        .collect();
    let started = Instant::now();
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    let wall = started.elapsed();
    let after: Vec<Duration> = sandboxes
        .iter()
        .filter_map(|s| procfs::cpu_time(s.pid()))
        .collect();
    let used: Duration = after
        .iter()
        .zip(&before)
        .map(|(a, b)| a.saturating_sub(*b))
        .sum();
    println!(
        "\n(g) 10 idle sandboxes over {:.0} s: {:.3} s of host CPU = {:.2}% of one core",
        wall.as_secs_f64(),
        used.as_secs_f64(),
        100.0 * used.as_secs_f64() / wall.as_secs_f64()
    );
    for sandbox in sandboxes {
        sandbox.destroy().await;
    }
    Ok(())
}

fn qemu_restore(
    image: &crate::image::Image,
    memory_mib: u32,
    flavor: KvmFlavor,
) -> Result<stats::Summary> {
    let dir = tempfile::Builder::new().prefix("airlock-qemu-").tempdir()?;
    eprintln!(
        "bench: booting the image in QEMU to save a migration file (about a minute on kvm_pvm)"
    );
    let state: PathBuf = qemu::prepare_state(image, dir.path(), memory_mib, flavor)?;
    let mut samples = Vec::new();
    for _ in 0..5 {
        samples.push(qemu::time_restore(
            image,
            dir.path(),
            &state,
            memory_mib,
            flavor,
        )?);
    }
    summarize(&samples).context("no samples")
}

//! Sessions that survive, measured: pause and resume against the memory a
//! sandbox dirtied, forks from one saved state (latency and memory), and a
//! soak of pause/resume cycles that counts what was lost. Baselines come
//! from the same run: a fresh restore from the template to its first result,
//! and the PSS of a sandbox restored from the template.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use super::stats::{ms, summarize};
use super::{procfs, run_python};
use crate::sandbox::{Sandbox, SavedSandbox, StartOptions};
use crate::template::Template;

fn mib(bytes: u64) -> f64 {
    bytes as f64 / f64::from(1u32 << 20)
}

fn pausable(root: &Path) -> StartOptions {
    StartOptions {
        staging_root: Some(root.to_path_buf()),
        ..StartOptions::default()
    }
}

async fn pause(sandbox: Sandbox) -> Result<(SavedSandbox, Duration)> {
    let started = Instant::now();
    let saved = SavedSandbox::pause(sandbox)
        .await
        .map_err(|failed| failed.error)
        .context("pause")?;
    Ok((saved, started.elapsed()))
}

/// Resumes `saved` and waits for its first result.
async fn resume(
    template: &Template,
    exe: &Path,
    root: &Path,
    saved: &SavedSandbox,
) -> Result<(Sandbox, Duration)> {
    let started = Instant::now();
    let sandbox = Sandbox::start(template, exe, &pausable(root), Some(&saved.dir))
        .await
        .context("resume")?;
    run_python(sandbox.client(), "print(1)").await?;
    Ok((sandbox, started.elapsed()))
}

/// A fresh restore from the template to its first result: the baseline.
async fn restore_baseline(template: &Template, exe: &Path, root: &Path) -> Result<Duration> {
    let mut samples = Vec::new();
    for _ in 0..3 {
        let started = Instant::now();
        let sandbox = Sandbox::start(template, exe, &pausable(root), None).await?;
        run_python(sandbox.client(), "print(1)").await?;
        samples.push(started.elapsed());
        sandbox.destroy().await;
    }
    Ok(summarize(&samples).context("no restore")?.median)
}

/// (k) Pause and resume times against the MiB a sandbox dirtied.
pub async fn pause_and_resume(
    template: &Template,
    exe: &Path,
    root: &Path,
    dirty_mib: &[u64],
) -> Result<Duration> {
    let baseline = restore_baseline(template, exe, root).await?;
    println!(
        "\n(k) pause to disk and resume, against memory dirtied (state in {}); baseline: a fresh restore to its first result, {}",
        root.display(),
        ms(baseline)
    );
    for &dirty in dirty_mib {
        let sandbox = Sandbox::start(template, exe, &pausable(root), None).await?;
        run_python(
            sandbox.client(),
            &format!("import os\n_bench_blob = os.urandom(1 << 20) * {dirty}\nprint(1)"),
        )
        .await
        .with_context(|| format!("dirtying {dirty} MiB"))?;
        let (saved, paused) = pause(sandbox).await?;
        let (resumed, took) = resume(template, exe, root, &saved).await?;
        let length = run_python(resumed.client(), "print(len(_bench_blob) >> 20)").await?;
        if length.trim() != dirty.to_string() {
            bail!("the resumed sandbox lost its {dirty} MiB: it has {length:?}");
        }
        println!(
            "    {dirty:>4} MiB dirtied: saved {:.1} MiB of pages, {:.1} MiB on disk; pause {} ({:.2}x a restore), resume to first result {} ({:.2}x)",
            mib(saved.dirty_bytes),
            mib(saved.disk_bytes),
            ms(paused),
            paused.as_secs_f64() / baseline.as_secs_f64(),
            ms(took),
            took.as_secs_f64() / baseline.as_secs_f64()
        );
        resumed.destroy().await;
        saved.discard();
    }
    Ok(baseline)
}

/// (l) Forks: sandboxes resumed from one saved state, their start to first
/// result and their memory, against fresh restores.
pub async fn forks(
    template: &Template,
    exe: &Path,
    root: &Path,
    count: usize,
    baseline: Duration,
) -> Result<()> {
    let memory_file = crate::vmm::snapshot::memory_path(&template.dir);
    let parent = Sandbox::start(template, exe, &pausable(root), None).await?;
    run_python(
        parent.client(),
        "import os\n_bench_parent = os.urandom(1 << 20) * 20\nprint(1)",
    )
    .await?;
    let (saved, _) = pause(parent).await?;
    let mut children = Vec::new();
    let mut times = Vec::new();
    for _ in 0..count {
        let (child, took) = resume(template, exe, root, &saved).await?;
        children.push(child);
        times.push(took);
    }
    // Timed alone, as the baseline restore was. Then the memory baseline:
    // as many fresh restores alive beside the forks (they share the
    // template's pages among themselves as the forks do).
    let mut plain = Vec::new();
    for _ in 0..count {
        plain.push(Sandbox::start(template, exe, &pausable(root), None).await?);
    }
    let mut seen = std::collections::HashSet::new();
    for child in &children {
        seen.insert(run_python(child.client(), "import os\nprint(os.urandom(8).hex())").await?);
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let pss: Vec<u64> = children
        .iter()
        .filter_map(|c| procfs::pss(c.pid(), &memory_file).map(|p| p.total))
        .collect();
    let plain_pss: Vec<u64> = plain
        .iter()
        .filter_map(|c| procfs::pss(c.pid(), &memory_file).map(|p| p.total))
        .collect();
    let avg = pss.iter().sum::<u64>() as f64 / pss.len().max(1) as f64;
    let plain_avg = plain_pss.iter().sum::<u64>() as f64 / plain_pss.len().max(1) as f64;
    let latency = summarize(&times).context("no fork")?;
    println!(
        "\n(l) {count} forks of one saved sandbox (20 MiB dirtied): start to first result {latency} = {:.2}x a fresh restore; PSS {:.1} MiB per fork with {count} forks and {count} fresh restores alive, {:.2}x a fresh restore's {:.1} MiB; {} distinct os.urandom values of {count}",
        latency.median.as_secs_f64() / baseline.as_secs_f64(),
        avg / f64::from(1u32 << 20),
        avg / plain_avg.max(1.0),
        plain_avg / f64::from(1u32 << 20),
        seen.len()
    );
    if seen.len() != count {
        bail!("forks of one saved state shared random numbers");
    }
    for sandbox in children.into_iter().chain(plain) {
        sandbox.destroy().await;
    }
    saved.discard();
    Ok(())
}

/// (m) Pause/resume cycles, each after appending a line to a file and
/// incrementing a Python variable; then counts what was lost.
pub async fn soak(template: &Template, exe: &Path, root: &Path, cycles: usize) -> Result<()> {
    let mut sandbox = Sandbox::start(template, exe, &pausable(root), None).await?;
    run_python(sandbox.client(), "_soak = 0\nprint(1)").await?;
    let mut last: Option<SavedSandbox> = None;
    let mut pauses = Vec::with_capacity(cycles);
    let mut resumes = Vec::with_capacity(cycles);
    let started = Instant::now();
    for cycle in 0..cycles {
        let code = format!(
            "_soak += 1\nwith open('/home/sandbox/soak.txt', 'a') as f:\n    f.write('{cycle}\\n')\nprint(1)"
        );
        run_python(sandbox.client(), &code).await?;
        let (saved, paused) = pause(sandbox).await?;
        if let Some(old) = last.replace(saved) {
            old.discard();
        }
        let Some(saved) = last.as_ref() else {
            bail!("no saved state");
        };
        let (resumed, took) = resume(template, exe, root, saved).await?;
        sandbox = resumed;
        pauses.push(paused);
        resumes.push(took);
        if (cycle + 1) % 100 == 0 {
            eprintln!("    soak: {} cycles", cycle + 1);
        }
    }
    let out = run_python(
        sandbox.client(),
        "print(_soak, sum(1 for _ in open('/home/sandbox/soak.txt')))",
    )
    .await?;
    let mut counts = out
        .split_whitespace()
        .map(|n| n.parse::<usize>().unwrap_or(0));
    let (increments, lines) = (counts.next().unwrap_or(0), counts.next().unwrap_or(0));
    println!(
        "\n(m) soak: {cycles} pause/resume cycles in {:.0} s; lost {} increments and {} lines; pause {}, resume to first result {}",
        started.elapsed().as_secs_f64(),
        cycles.saturating_sub(increments),
        cycles.saturating_sub(lines),
        summarize(&pauses).map_or_else(|| "-".into(), |s| s.to_string()),
        summarize(&resumes).map_or_else(|| "-".into(), |s| s.to_string()),
    );
    sandbox.destroy().await;
    if let Some(saved) = last {
        saved.discard();
    }
    if increments != cycles || lines != cycles {
        bail!("the soak lost state: {increments} increments and {lines} lines of {cycles}");
    }
    Ok(())
}

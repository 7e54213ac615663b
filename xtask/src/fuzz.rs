//! `cargo xtask fuzz`: runs the cargo-fuzz targets of `fuzz/` one after
//! another, for a time or a number of executions each, and reports what
//! libFuzzer says of each run (executions, coverage, features).
//!
//! It installs nothing: cargo-fuzz must be on PATH (`cargo install
//! cargo-fuzz --locked`). It works on the stable toolchain: cargo-fuzz
//! passes `-Z` flags to rustc (sanitizer, coverage instrumentation), which
//! `RUSTC_BOOTSTRAP=1` lets stable accept. AddressSanitizer then works too,
//! as the stable toolchain ships its runtime.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result, bail};

pub struct FuzzOptions {
    /// Seconds per target (libFuzzer's -max_total_time).
    pub seconds: Option<u64>,
    /// Executions per target (libFuzzer's -runs).
    pub runs: Option<u64>,
    /// Targets to run; empty means every one.
    pub targets: Vec<String>,
    /// cargo-fuzz's --sanitizer.
    pub sanitizer: String,
    /// Passed to libFuzzer after the options above.
    pub libfuzzer_args: Vec<String>,
}

/// What one target's run came to.
struct Report {
    target: String,
    ok: bool,
    secs: u64,
    execs: Option<u64>,
    cov: Option<u64>,
    ft: Option<u64>,
}

/// Lines of a failed run's output shown (the crash report and reproducer).
const FAILURE_TAIL_LINES: usize = 80;

pub fn run(opts: FuzzOptions) -> Result<i32> {
    let fuzz_dir = fuzz_dir();
    let version = cargo_fuzz(&fuzz_dir)
        .arg("--version")
        .output()
        .context("cannot run cargo")?;
    if !version.status.success() {
        bail!("cargo-fuzz is not installed: cargo install cargo-fuzz --locked");
    }
    let all = list_targets(&fuzz_dir)?;
    let targets = if opts.targets.is_empty() {
        all
    } else {
        for t in &opts.targets {
            if !all.contains(t) {
                bail!("no fuzz target {t:?} (there are: {})", all.join(", "));
            }
        }
        opts.targets.clone()
    };
    let (seconds, runs) = match (opts.seconds, opts.runs) {
        (None, None) => (Some(30), None),
        other => other,
    };

    eprintln!("fuzz: building {} target(s)", targets.len());
    let mut build = cargo_fuzz(&fuzz_dir);
    build.args(["build", "--sanitizer", &opts.sanitizer]);
    if opts.targets.len() == 1 {
        build.arg(&targets[0]);
    }
    let status = build.status().context("cannot run cargo fuzz build")?;
    if !status.success() {
        bail!("cargo fuzz build failed ({status})");
    }

    let mut reports = Vec::new();
    for target in &targets {
        reports.push(run_target(&fuzz_dir, target, seconds, runs, &opts)?);
    }

    println!();
    println!(
        "{:<24} {:>8} {:>14} {:>8} {:>8}  result",
        "target", "seconds", "executions", "cov", "ft"
    );
    let show = |v: Option<u64>| v.map_or_else(|| "-".to_string(), |v| v.to_string());
    for r in &reports {
        println!(
            "{:<24} {:>8} {:>14} {:>8} {:>8}  {}",
            r.target,
            r.secs,
            show(r.execs),
            show(r.cov),
            show(r.ft),
            if r.ok { "ok" } else { "FAILED" }
        );
    }
    let failed: Vec<&str> = reports
        .iter()
        .filter(|r| !r.ok)
        .map(|r| r.target.as_str())
        .collect();
    if failed.is_empty() {
        println!("fuzz: {} target(s), no crash", reports.len());
        Ok(0)
    } else {
        println!(
            "fuzz: {} of {} target(s) failed: {} (reproducers in fuzz/artifacts/)",
            failed.len(),
            reports.len(),
            failed.join(", ")
        );
        Ok(1)
    }
}

fn run_target(
    fuzz_dir: &Path,
    target: &str,
    seconds: Option<u64>,
    runs: Option<u64>,
    opts: &FuzzOptions,
) -> Result<Report> {
    let corpus = fuzz_dir.join("corpus").join(target);
    std::fs::create_dir_all(&corpus)
        .with_context(|| format!("cannot create {}", corpus.display()))?;
    let mut cmd = cargo_fuzz(fuzz_dir);
    cmd.args(["run", "--sanitizer", &opts.sanitizer, target])
        .arg(&corpus)
        .arg("--");
    if let Some(s) = seconds {
        cmd.arg(format!("-max_total_time={s}"));
    }
    if let Some(n) = runs {
        cmd.arg(format!("-runs={n}"));
    }
    // A hang is a failure too; the slowest target's input takes well under
    // a second.
    cmd.args(["-timeout=30", "-print_final_stats=1"]);
    cmd.args(&opts.libfuzzer_args);
    eprintln!(
        "fuzz: {target} ({})",
        match (seconds, runs) {
            (Some(s), Some(n)) => format!("{s} s or {n} executions"),
            (Some(s), None) => format!("{s} s"),
            (None, Some(n)) => format!("{n} executions"),
            (None, None) => "until stopped".into(),
        }
    );
    let started = Instant::now();
    let out = cmd
        .output()
        .with_context(|| format!("cannot run cargo fuzz run {target}"))?;
    let secs = started.elapsed().as_secs();
    // libFuzzer reports on stderr.
    let text = String::from_utf8_lossy(&out.stderr);
    let done = text.lines().rev().find(|l| is_done_line(l));
    let stat = |key: &str| {
        text.lines()
            .rev()
            .find_map(|l| l.strip_prefix(key)?.trim().parse::<u64>().ok())
    };
    let execs = stat("stat::number_of_executed_units:")
        .or_else(|| done.and_then(|l| l[1..].split_whitespace().next()?.parse().ok()));
    let field = |name: &str| done.and_then(|l| field_after(l, name));
    let report = Report {
        target: target.to_string(),
        ok: out.status.success(),
        secs,
        execs,
        cov: field("cov:"),
        ft: field("ft:"),
    };
    match done {
        Some(line) if report.ok => println!("fuzz: {target}: {line}"),
        _ => {
            let lines: Vec<&str> = text.lines().collect();
            let tail = &lines[lines.len().saturating_sub(FAILURE_TAIL_LINES)..];
            println!(
                "fuzz: {target} FAILED ({}); the end of its output:",
                out.status
            );
            for l in tail {
                println!("  {l}");
            }
        }
    }
    Ok(report)
}

/// libFuzzer's last status line: `#<execs>\tDONE   cov: ... ft: ...`.
fn is_done_line(line: &str) -> bool {
    let mut words = line.split_whitespace();
    words.next().is_some_and(|w| w.starts_with('#')) && words.next() == Some("DONE")
}

/// The number after `name` in a libFuzzer status line.
fn field_after(line: &str, name: &str) -> Option<u64> {
    let mut words = line.split_whitespace();
    words.find(|w| *w == name)?;
    words.next()?.parse().ok()
}

fn list_targets(fuzz_dir: &Path) -> Result<Vec<String>> {
    let out = cargo_fuzz(fuzz_dir)
        .arg("list")
        .output()
        .context("cannot run cargo fuzz list")?;
    if !out.status.success() {
        bail!(
            "cargo fuzz list failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let targets: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(String::from)
        .collect();
    if targets.is_empty() {
        bail!("cargo fuzz list found no targets in {}", fuzz_dir.display());
    }
    Ok(targets)
}

/// `cargo fuzz` in `fuzz_dir`, allowed the `-Z` flags it needs on stable.
fn cargo_fuzz(fuzz_dir: &Path) -> Command {
    let mut cmd = Command::new("cargo");
    cmd.arg("fuzz")
        .current_dir(fuzz_dir)
        .env("RUSTC_BOOTSTRAP", "1");
    cmd
}

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap_or(Path::new(".."))
        .join("fuzz")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_libfuzzer_done_line() {
        let line =
            "#1234567\tDONE   cov: 827 ft: 2847 corp: 204/3677b lim: 205 exec/s: 5684 rss: 349Mb";
        assert_eq!(field_after(line, "cov:"), Some(827));
        assert_eq!(field_after(line, "ft:"), Some(2847));
        assert_eq!(field_after(line, "nope:"), None);
        assert!(is_done_line(line));
        assert!(!is_done_line("#100\tpulse  cov: 8 ft: 9"));
        assert!(!is_done_line("Done 100 runs in 1 second(s)"));
    }
}

//! airlock's developer tooling, run as `cargo xtask …` (the cargo-xtask
//! convention): the nested test host and the whole test suite on a correct
//! KVM, and the fuzz targets. None of it is part of the airlock binary.

mod fuzz;
mod kvm;
mod nested;
mod shard;
mod suite;

use std::ffi::OsString;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "airlock developer tasks")]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Run one command inside a nested test host: a QEMU TCG guest with an
    /// emulated AMD SVM CPU, whose kvm_amd gives a hardware-style /dev/kvm.
    /// It sees this machine's filesystem, the current directory and the
    /// environment; stdout, stderr and the exit status come back.
    Nested {
        /// vCPUs of the nested host (2 corrupts nested guests under QEMU's
        /// multi-threaded TCG: see README, "Testing").
        #[arg(long, default_value_t = 1)]
        vcpus: u32,
        /// Memory of the nested host, as QEMU's -m takes it.
        #[arg(long, default_value = "8G")]
        memory: String,
        /// QEMU's TCG threading: multi (a host thread per vCPU) or single.
        #[arg(long, default_value = "multi", value_parser = ["multi", "single"])]
        tcg_thread: String,
        /// Wall-clock limit; past it the host is killed and the status is 124.
        #[arg(long, default_value = "30m", value_parser = humantime::parse_duration)]
        timeout: Duration,
        /// Options for the nested host's kernel.
        #[arg(long, default_value = nested::DEFAULT_KERNEL_ARGS)]
        kernel_args: String,
        /// The command and its arguments.
        #[arg(required = true, last = true)]
        command: Vec<OsString>,
    },
    /// Run the whole test suite on a correct KVM: this machine's if it is
    /// hardware KVM, else nested test hosts side by side.
    /// AIRLOCK_TEST_KVM=native|nested overrides the choice.
    Test {
        /// Where to run: native or nested (default: by this machine's KVM).
        #[arg(long)]
        kvm: Option<kvm::TestKvm>,
        /// Nested hosts side by side (default: one per core, at most 2).
        #[arg(long)]
        hosts: Option<usize>,
        /// Memory of each nested host.
        #[arg(long)]
        memory: Option<String>,
        /// Concurrent tests per test binary inside a nested host.
        #[arg(long, default_value_t = 4)]
        test_threads: u32,
        /// Wall-clock limit for each nested host.
        #[arg(long, default_value = "45m", value_parser = humantime::parse_duration)]
        timeout: Duration,
        /// Passed to every test binary (a filter, --nocapture, ...).
        #[arg(last = true)]
        test_args: Vec<OsString>,
    },
    /// Run the cargo-fuzz targets in fuzz/ one after another, on the stable
    /// toolchain (with RUSTC_BOOTSTRAP=1), and report executions and
    /// coverage of each; fails if any target crashes. Needs cargo-fuzz
    /// (cargo install cargo-fuzz --locked). Default: 30 s per target.
    Fuzz {
        /// Seconds per target (libFuzzer's -max_total_time).
        #[arg(long, value_name = "SECS")]
        smoke: Option<u64>,
        /// Executions per target (libFuzzer's -runs); with --smoke, the
        /// run ends at whichever comes first.
        #[arg(long, value_name = "N")]
        runs: Option<u64>,
        /// Only this target (repeatable; default: every target).
        #[arg(long = "target", value_name = "NAME")]
        targets: Vec<String>,
        /// cargo-fuzz's sanitizer (address works on stable here).
        #[arg(long, default_value = "address", value_parser = ["address", "none"])]
        sanitizer: String,
        /// Further libFuzzer options (e.g. -max_len=8192).
        #[arg(last = true)]
        libfuzzer_args: Vec<String>,
    },
    /// Inside a nested host: run one host's share of the test binaries.
    #[command(hide = true)]
    RunShard { plan: std::path::PathBuf },
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(code) => ExitCode::from(u8::try_from(code).unwrap_or(1)),
        Err(err) => {
            eprintln!("xtask: {err:#}");
            ExitCode::from(1)
        }
    }
}

fn run(cli: Cli) -> Result<i32> {
    match cli.command {
        Task::Nested {
            vcpus,
            memory,
            tcg_thread,
            timeout,
            kernel_args,
            command,
        } => {
            let shape = nested::HostShape {
                vcpus: vcpus.max(1),
                memory,
                tcg_thread,
                kernel_args,
            };
            let invocation = nested::Invocation {
                argv: command,
                cwd: std::env::current_dir().context("cannot read the current directory")?,
                env: std::env::vars_os().collect(),
                timeout,
            };
            let outcome = nested::run(&shape, &invocation, nested::Output::PassThrough)?;
            Ok(outcome.exit_code())
        }
        Task::Test {
            kvm,
            hosts,
            memory,
            test_threads,
            timeout,
            test_args,
        } => suite::run(suite::SuiteOptions {
            kvm,
            hosts,
            memory,
            timeout,
            test_threads: test_threads.max(1),
            test_args,
        }),
        Task::Fuzz {
            smoke,
            runs,
            targets,
            sanitizer,
            libfuzzer_args,
        } => fuzz::run(fuzz::FuzzOptions {
            seconds: smoke,
            runs,
            targets,
            sanitizer,
            libfuzzer_args,
        }),
        Task::RunShard { plan } => shard::run_plan(&plan),
    }
}

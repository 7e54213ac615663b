//! The `airlock` command: a thin CLI over the airlock library.

use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

use airlock::{doctor, host_kvm, image, paths};

#[derive(Parser)]
#[command(
    name = "airlock",
    version,
    about = "Run AI agents' code in disposable KVM microVMs, served over MCP",
    long_about = "airlock is an MCP tool server. Each conversation gets its own microVM, \
                  restored in milliseconds from a pre-warmed snapshot, where tools such as \
                  run_code and write_file execute.\n\nStart with `airlock doctor` to check this \
                  machine, then `airlock serve`."
)]
struct Cli {
    #[command(subcommand)]
    command: Commands,
}

#[derive(Subcommand)]
enum Commands {
    /// Serve MCP: over stdio by default (for desktop assistants), or over
    /// Streamable HTTP with --http. Prepares the guest image on first use.
    Serve {
        /// Listen for Streamable HTTP on this address (e.g. 127.0.0.1:8080)
        /// instead of speaking MCP on stdin/stdout.
        #[arg(long, value_name = "ADDR")]
        http: Option<std::net::SocketAddr>,
    },
    /// Manage the guest image (kernel and root filesystem).
    Image {
        #[command(subcommand)]
        command: ImageCommands,
    },
    /// Check that this machine can run sandboxes, and say what to fix if not.
    Doctor {
        /// Skip booting the image (the boot check takes ~40 s on a
        /// software-nested KVM).
        #[arg(long)]
        no_boot: bool,
    },
    /// Run one microVM (started by airlock itself; not for direct use).
    #[command(hide = true)]
    Vmm(airlock::vmm::config::VmmConfig),
}

#[derive(Subcommand)]
enum ImageCommands {
    /// Build the guest image if the current recipe has none yet, then print
    /// its directory. Needs root the first time (debootstrap); takes ~10 min
    /// on a fresh machine and well under a second once built.
    Build,
}

fn main() -> ExitCode {
    init_logging();
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Commands::Doctor { no_boot } => {
            let report = doctor::run(&paths::cache_root()?, !no_boot);
            print!("{}", report.render());
            Ok(if report.ready() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Commands::Image {
            command: ImageCommands::Build,
        } => {
            let cache = paths::ensure_cache_root()?;
            let (image, outcome) = image::ensure(&cache)?;
            if outcome == image::Outcome::AlreadyBuilt {
                eprintln!(
                    "airlock: image {} is up to date",
                    image.manifest.recipe_hash
                );
            }
            println!("{}", image.dir.display());
            Ok(ExitCode::SUCCESS)
        }
        Commands::Serve { http } => {
            host_kvm::check_kvm_access(&host_kvm::kvm_device_path())?;
            let cache = paths::ensure_cache_root()?;
            let (image, _) = image::ensure(&cache).context("cannot prepare the guest image")?;
            tracing::info!(image = %image.dir.display(), http = ?http, "guest image ready");
            bail!("this build of airlock cannot serve MCP yet: the gateway is not part of it")
        }
        Commands::Vmm(config) => {
            let code = airlock::vmm::run::run(&config);
            Ok(if code == 0 {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(code.clamp(1, 255) as u8)
            })
        }
    }
}

/// Logs go to stderr only: in stdio mode stdout carries MCP.
fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("AIRLOCK_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

//! The `airlock` command: a thin CLI over the airlock library.

use std::process::ExitCode;

use anyhow::{Context, Result};
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
    Serve(ServeArgs),
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
    /// Manage the warm template snapshot that new sandboxes restore from.
    Snapshot {
        #[command(subcommand)]
        command: SnapshotCommands,
    },
    /// Measure sandbox start-up, round trips, memory and CPU, with ratios
    /// against baselines from the same run (several minutes).
    Bench(airlock::bench::BenchOptions),
    /// Run one microVM (started by airlock itself; not for direct use).
    #[command(hide = true)]
    Vmm(airlock::vmm::config::VmmConfig),
}

#[derive(Subcommand)]
enum SnapshotCommands {
    /// Boot the guest image, warm its interpreters (numpy, pandas and
    /// matplotlib imported, node started), and save it as the template that
    /// every new sandbox restores from in milliseconds. Done once per image;
    /// prints the template's directory.
    Create {
        /// vCPUs of the sandboxes made from this template.
        #[arg(long, default_value_t = 1)]
        vcpus: u8,
        /// Guest memory of the sandboxes, in MiB.
        #[arg(long, default_value_t = airlock::vmm::config::DEFAULT_MEMORY_MIB)]
        memory_mib: u32,
        /// The image: `default`, a built image's name, or a recipe file
        /// (built first). A recipe's own shape wins over the flags.
        #[arg(long, value_name = "NAME|RECIPE", default_value = "default")]
        image: String,
    },
}

#[derive(clap::Args)]
struct ServeArgs {
    /// Serve sandboxes of this image: `default` (the built-in image), a
    /// name built by `airlock image build --recipe`, or a recipe file
    /// (built on first use). Repeatable; the first is the default, and a
    /// call that creates a sandbox may choose another with `image`.
    #[arg(long = "image", value_name = "NAME|RECIPE")]
    images: Vec<String>,
    /// Listen for Streamable HTTP on this address (e.g. 127.0.0.1:8080)
    /// instead of speaking MCP on stdin/stdout.
    #[arg(long, value_name = "ADDR")]
    http: Option<std::net::SocketAddr>,
    /// HTTP mode: bearer tokens, one `principal:token` (or bare token) per
    /// line. Without it, tokens come from AIRLOCK_TOKENS (same format, or
    /// comma-separated); with neither, only a loopback address may be served.
    #[arg(long, value_name = "FILE")]
    tokens_file: Option<std::path::PathBuf>,
    /// HTTP mode: serve a non-loopback address without tokens (only behind
    /// something else that authenticates callers).
    #[arg(long)]
    insecure_no_auth: bool,
    /// HTTP mode: also accept this Host header value (e.g. the server's DNS
    /// name); loopback names are always accepted. Repeatable.
    #[arg(long = "allowed-host", value_name = "HOST")]
    allowed_hosts: Vec<String>,
    /// HTTP mode: accept browser requests from this origin (e.g.
    /// https://app.example.com:443). Bound to loopback, pages on loopback
    /// (http://localhost:*, 127.0.0.1, [::1]) are accepted too; requests
    /// with any other Origin are refused. Repeatable.
    #[arg(long = "allowed-origin", value_name = "ORIGIN")]
    allowed_origins: Vec<String>,
    /// Restored sandboxes kept ready for new conversations (default: 1 for
    /// stdio, 2 for HTTP). The pool grows with demand up to --pool-max.
    #[arg(long, value_name = "N")]
    pool_size: Option<usize>,
    /// The most sandboxes kept ready when many conversations begin at once:
    /// the pool keeps as many as began in the last minute, between
    /// --pool-size and this (default: 8 for HTTP, --pool-size for stdio;
    /// never above --max-sandboxes).
    #[arg(long, value_name = "N")]
    pool_max: Option<usize>,
    /// Destroy a sandbox after this long without tool calls (paused or not).
    #[arg(long, value_name = "DURATION", default_value = "1h", value_parser = humantime::parse_duration)]
    idle_timeout: std::time::Duration,
    /// Pause a sandbox to disk after this long without tool calls: its VM
    /// ends and its memory is freed; the next call resumes it with every
    /// file, variable and process. 0 never pauses.
    #[arg(long, value_name = "DURATION", default_value = "5m", value_parser = humantime::parse_duration)]
    pause_after: std::time::Duration,
    /// Where paused sandboxes are kept (default: sessions/ in airlock's cache).
    #[arg(long, value_name = "DIR")]
    state_dir: Option<std::path::PathBuf>,
    /// stdio only: keep this conversation's sandbox under NAME when the
    /// server exits (paused to disk); the next `serve --persist NAME`
    /// resumes it with its files and state.
    #[arg(long, value_name = "NAME")]
    persist: Option<String>,
    /// What a shutdown (SIGTERM, SIGINT, stdin closing) does with the
    /// sandboxes: `pause` keeps each on disk for the next run of the server
    /// with the same state directory (HTTP: the same address), `destroy`
    /// ends them. Default: pause over HTTP and with --persist, else destroy.
    #[arg(long, value_name = "pause|destroy", value_parser = ["pause", "destroy"])]
    on_shutdown: Option<String>,
    /// A TOML file with egress defaults and, for HTTP mode, principals:
    /// each one's token, egress allowlist, sandbox limit and storage quota
    /// (see the README). Adds to the flags and the tokens file.
    #[arg(long, value_name = "FILE")]
    config: Option<std::path::PathBuf>,
    #[command(flatten)]
    egress: airlock::egress::EgressArgs,
    /// Disk the checkpoints of one principal's sandboxes may take: bytes,
    /// or with a K, M or G suffix (powers of 1024).
    #[arg(long, value_name = "BYTES", default_value = "4G", value_parser = airlock::config::parse_bytes)]
    max_snapshot_bytes_per_principal: u64,
    /// Destroy a sandbox this long after it was created, however busy.
    #[arg(long, value_name = "DURATION", default_value = "8h", value_parser = humantime::parse_duration)]
    max_lifetime: std::time::Duration,
    /// Live sandboxes in all.
    #[arg(long, value_name = "N", default_value_t = airlock::sandbox::registry::DEFAULT_MAX_SANDBOXES)]
    max_sandboxes: usize,
    /// Live sandboxes per principal (token).
    #[arg(long, value_name = "N", default_value_t = airlock::sandbox::registry::DEFAULT_MAX_PER_PRINCIPAL)]
    max_sandboxes_per_principal: usize,
    /// The longest timeout_seconds a run_code or run_command may ask for.
    #[arg(long, value_name = "DURATION", default_value = "10m", value_parser = humantime::parse_duration)]
    max_timeout: std::time::Duration,
    /// HTTP mode: requests in flight in all; past it callers get 429.
    #[arg(long, value_name = "N", default_value_t = airlock::mcp::admission::DEFAULT_MAX_REQUESTS)]
    max_requests: usize,
    /// HTTP mode: requests in flight per principal; past it that caller gets 429.
    #[arg(long, value_name = "N", default_value_t = airlock::mcp::admission::DEFAULT_MAX_REQUESTS_PER_PRINCIPAL)]
    max_requests_per_principal: usize,
    /// HTTP mode: open MCP sessions per principal.
    #[arg(long, value_name = "N", default_value_t = airlock::mcp::admission::DEFAULT_MAX_SESSIONS_PER_PRINCIPAL)]
    max_sessions_per_principal: usize,
    /// HTTP mode: request body bytes being received at once, server-wide, in MiB.
    #[arg(long, value_name = "MIB", default_value_t = airlock::mcp::admission::DEFAULT_MAX_INFLIGHT_BODY_MIB)]
    max_inflight_body_mib: usize,
    /// HTTP mode: the longest a request may take, its response stream
    /// included (default: --max-timeout plus 2m).
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    request_timeout: Option<std::time::Duration>,
}

#[derive(Subcommand)]
enum ImageCommands {
    /// Build the guest image if the current recipe has none yet, then print
    /// its directory. Needs root the first time (debootstrap); takes ~10 min
    /// on a fresh machine and well under a second once built.
    Build {
        /// Build a custom image from this recipe file (TOML; see the
        /// README's "Custom images") instead of the built-in one.
        #[arg(long, value_name = "FILE")]
        recipe: Option<std::path::PathBuf>,
    },
    /// List the images in the cache: name, key, base, size and build date.
    List,
    /// Print an image's manifest: every Debian, pip and npm package with its
    /// version, the base (with its OCI digest) and the recipe.
    Show {
        /// An image name, or a key from `airlock image list`.
        name: String,
    },
    /// Remove an image and its templates from the cache.
    Remove {
        /// An image name, or a key from `airlock image list`.
        name: String,
    },
    /// Remove what nothing can use any more: older builds of each name
    /// (unless running or saved sandboxes need them), their templates, and
    /// older kernels and base filesystems. Every build does this too.
    Prune,
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
        Commands::Image { command } => {
            let cache = paths::ensure_cache_root()?;
            match command {
                ImageCommands::Build { recipe } => {
                    let (image, outcome) = match recipe {
                        Some(path) => {
                            let recipe = image::custom::RecipeFile::load(&path)?;
                            image::custom::ensure(&cache, &recipe)?
                        }
                        None => image::ensure(&cache)?,
                    };
                    if outcome == image::Outcome::AlreadyBuilt {
                        eprintln!(
                            "airlock: image {} ({}) is up to date",
                            image.name(),
                            image.manifest.recipe_hash
                        );
                    }
                    println!("{}", image.dir.display());
                }
                ImageCommands::List => print!("{}", image::commands::list(&cache)?),
                ImageCommands::Show { name } => print!("{}", image::commands::show(&cache, &name)?),
                ImageCommands::Remove { name } => {
                    eprintln!("{}", image::commands::remove(&cache, &name)?);
                }
                ImageCommands::Prune => print!("{}", image::commands::prune(&cache)?),
            }
            Ok(ExitCode::SUCCESS)
        }
        Commands::Serve(args) => {
            host_kvm::check_kvm_access(&host_kvm::kvm_device_path())?;
            let config = match &args.config {
                Some(path) => airlock::config::ConfigFile::load(path)?,
                None => airlock::config::ConfigFile::default(),
            };
            let options = airlock::mcp::ServeOptions {
                images: args.images,
                config,
                egress: args.egress,
                http: args.http,
                tokens_file: args.tokens_file,
                tokens_env: std::env::var("AIRLOCK_TOKENS").ok(),
                insecure_no_auth: args.insecure_no_auth,
                allowed_hosts: args.allowed_hosts,
                allowed_origins: args.allowed_origins,
                pool_size: args.pool_size,
                pool_max: args.pool_max,
                limits: airlock::sandbox::registry::Limits {
                    idle_timeout: args.idle_timeout,
                    pause_after: args.pause_after,
                    max_lifetime: args.max_lifetime,
                    max_sandboxes: args.max_sandboxes,
                    max_per_principal: args.max_sandboxes_per_principal,
                    max_snapshot_bytes_per_principal: args.max_snapshot_bytes_per_principal,
                    ..Default::default()
                },
                keep_on_shutdown: args.on_shutdown.as_deref().map(|o| o == "pause"),
                max_timeout: args.max_timeout,
                state_dir: args.state_dir,
                persist: args.persist,
                http_limits: airlock::mcp::admission::HttpLimits {
                    max_requests: args.max_requests,
                    max_requests_per_principal: args.max_requests_per_principal,
                    max_sessions_per_principal: args.max_sessions_per_principal,
                    max_inflight_body_bytes: args.max_inflight_body_mib.saturating_mul(1 << 20),
                    request_timeout: args
                        .request_timeout
                        .unwrap_or(args.max_timeout + airlock::mcp::admission::REQUEST_SLACK),
                },
            };
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .context("cannot start the async runtime")?;
            let served = runtime.block_on(airlock::mcp::serve(options));
            // The stdio reader may be blocked in read(2): do not wait for it.
            runtime.shutdown_timeout(std::time::Duration::from_secs(1));
            served?;
            Ok(ExitCode::SUCCESS)
        }
        Commands::Snapshot {
            command:
                SnapshotCommands::Create {
                    vcpus,
                    memory_mib,
                    image,
                },
        } => {
            host_kvm::check_kvm_access(&host_kvm::kvm_device_path())?;
            let cache = paths::ensure_cache_root()?;
            let image = airlock::mcp::backend::ImageSource::parse(&image)?
                .prepare(&cache)
                .context("cannot prepare the guest image")?;
            let exe = std::env::current_exe().context("cannot find the airlock executable")?;
            let shape = airlock::template::TemplateShape::of(
                &image,
                airlock::template::TemplateShape { vcpus, memory_mib },
            );
            let template =
                runtime()?.block_on(airlock::template::ensure(&cache, &image, shape, &exe))?;
            println!("{}", template.dir.display());
            Ok(ExitCode::SUCCESS)
        }
        Commands::Bench(options) => {
            host_kvm::check_kvm_access(&host_kvm::kvm_device_path())?;
            runtime()?.block_on(airlock::bench::run(&options))?;
            Ok(ExitCode::SUCCESS)
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

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

/// Logs go to stderr only: in stdio mode stdout carries MCP.
fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("AIRLOCK_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,rmcp=warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    /// Clap checks its definitions only when a command is parsed: a clash
    /// (two flags with one id) would otherwise surface as a panic at start.
    #[test]
    fn the_command_line_is_consistent() {
        super::Cli::command().debug_assert();
    }

    #[test]
    fn egress_flags_parse() {
        use clap::Parser;
        let cli = super::Cli::try_parse_from([
            "airlock",
            "serve",
            "--egress-allow",
            "pypi.org",
            "--egress-allow",
            "*.pythonhosted.org",
            "--egress-idle-timeout",
            "90s",
            "--egress-bytes-per-second",
            "10M",
            "--idle-timeout",
            "2h",
        ]);
        assert!(cli.is_ok(), "{:?}", cli.err());
    }
}

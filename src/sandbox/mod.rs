//! A sandbox: one microVM restored from the warm template (or resumed from
//! its own paused state over it), with its agent connection, made fresh
//! (entropy, clock) before anyone uses it.

mod pause;
pub mod pool;
pub mod registry;

pub use pause::{PauseFailed, Paused, SavedSandbox};

use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result};

use crate::agent_client::AgentClient;
use crate::confinement::Confinement;
use crate::template::Template;
use crate::vm::{StartTiming, Vm, VmSpec};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(60);
/// The refresh is one small round trip; a guest that sits on it is broken.
const REFRESH_TIMEOUT: Duration = Duration::from_secs(30);
const STOP_DEADLINE: Duration = Duration::from_secs(5);
/// Refresh steps kept from a guest's report, and the longest name kept.
const MAX_REFRESH_STEPS: usize = 16;
const MAX_STEP_NAME: usize = 32;
/// Fresh entropy handed to each restored guest.
const ENTROPY_BYTES: usize = 64;

/// How long a restore took, split as a benchmark wants it.
#[derive(Debug, Clone, Copy)]
pub struct RestoreTiming {
    pub vm: StartTiming,
    /// From vCPUs running to the agent answering the handshake.
    pub agent_connect: Duration,
    /// The refresh round trip (entropy, clock, interpreter reseed).
    pub refresh: Duration,
    pub total: Duration,
}

pub struct Sandbox {
    id: String,
    /// The name of the image its template was made from.
    image: String,
    /// Its guest memory (an image's recipe may set its own shape).
    memory_mib: u32,
    vm: Vm,
    client: AgentClient,
    // Holds the VM's sockets and console log until the sandbox goes.
    _run_dir: tempfile::TempDir,
    /// Where a pause saves this VM (made at start: the jail binds it).
    staging: Option<PathBuf>,
    created: Instant,
    timing: RestoreTiming,
    /// Where the guest's egress connections arrive, when the server grants
    /// egress to anyone (see `crate::egress`).
    egress: Option<crate::egress::Attachment>,
    /// What each step of the guest's refresh took (µs), for benchmarks.
    refresh_steps: Vec<(String, u64)>,
}

/// How to start a sandbox's VM.
#[derive(Debug, Clone)]
pub struct StartOptions {
    pub confinement: Confinement,
    /// A sandbox that can be paused saves itself into a directory made
    /// under here (on the disk that keeps paused sandboxes, so the saved
    /// state moves into place by a rename).
    pub staging_root: Option<PathBuf>,
    /// The egress service, when anyone may reach anything: the guest's
    /// relay listens and its connections go there.
    pub egress: Option<std::sync::Arc<crate::egress::Egress>>,
}

impl Default for StartOptions {
    fn default() -> Self {
        StartOptions {
            confinement: Confinement::current(),
            staging_root: None,
            egress: None,
        }
    }
}

impl Sandbox {
    /// Restores a new sandbox from `template`, confined as this process's
    /// policy says.
    pub async fn restore(template: &Template, airlock_exe: &std::path::Path) -> Result<Sandbox> {
        Self::start(template, airlock_exe, &StartOptions::default(), None).await
    }

    /// Restores a new sandbox from `template` under `confinement` (the
    /// benchmark compares policies).
    pub async fn restore_confined(
        template: &Template,
        airlock_exe: &std::path::Path,
        confinement: Confinement,
    ) -> Result<Sandbox> {
        let options = StartOptions {
            confinement,
            ..StartOptions::default()
        };
        Self::start(template, airlock_exe, &options, None).await
    }

    /// Restores a new sandbox from `template`, or with `resume` the paused
    /// sandbox saved there over it.
    pub async fn start(
        template: &Template,
        airlock_exe: &std::path::Path,
        options: &StartOptions,
        resume: Option<&std::path::Path>,
    ) -> Result<Sandbox> {
        let started = Instant::now();
        template
            .check_sealed()
            .context("the template cannot be restored")?;
        let id = new_id()?;
        // Short path: a Unix socket path must fit in 108 bytes.
        let run_dir = tempfile::Builder::new()
            .prefix("airlock-")
            .tempdir()
            .context("cannot create a sandbox run directory")?;
        let staging = match &options.staging_root {
            Some(root) => Some(pause::make_staging(root, &id)?),
            None => None,
        };
        let egress = match &options.egress {
            Some(service) => match service.attach(run_dir.path()) {
                Ok(attachment) => Some(attachment),
                Err(err) => {
                    pause::remove_staging(staging.as_deref());
                    return Err(
                        anyhow::Error::new(err).context("cannot listen for the sandbox's egress")
                    );
                }
            },
            None => None,
        };
        let spec = VmSpec {
            airlock_exe: airlock_exe.to_path_buf(),
            kernel: template.image.vmlinux(),
            rootfs: template.image.rootfs(),
            vcpus: template.info.shape.vcpus,
            memory_mib: template.info.shape.memory_mib,
            extra_cmdline: String::new(),
            init: None,
            run_dir: run_dir.path().to_path_buf(),
            restore: Some(template.dir.clone()),
            resume: resume.map(std::path::Path::to_path_buf),
            snapshot_dir: staging.clone(),
            console_max_bytes: crate::vmm::config::DEFAULT_CONSOLE_MAX_BYTES,
            label: id.clone(),
            confinement: options.confinement.clone(),
            vsock_forward: match egress {
                Some(_) => vec![airlock_protocol::EGRESS_VSOCK_PORT],
                None => Vec::new(),
            },
        };
        let spawned = Vm::spawn(&spec).await;
        let mut vm = match spawned {
            Ok(vm) => vm,
            Err(err) => {
                pause::remove_staging(staging.as_deref());
                let what = if resume.is_some() {
                    "cannot resume the paused sandbox"
                } else {
                    "cannot restore the template"
                };
                return Err(anyhow::Error::new(err).context(what));
            }
        };
        let running = Instant::now();
        let client = match AgentClient::connect(
            vm.vsock_socket(),
            airlock_protocol::AGENT_VSOCK_PORT,
            CONNECT_TIMEOUT,
        )
        .await
        {
            Ok(client) => client,
            Err(err) => {
                let _ = vm.stop(STOP_DEADLINE).await;
                pause::remove_staging(staging.as_deref());
                return Err(err).context("the restored agent does not answer");
            }
        };
        let connected = Instant::now();
        let refreshed = tokio::time::timeout(REFRESH_TIMEOUT, refresh(&client, egress.is_some()))
            .await
            .unwrap_or_else(|_| {
                Err(anyhow::anyhow!(
                    "the restored agent did not answer the refresh within {REFRESH_TIMEOUT:?}"
                ))
            });
        let refresh_steps = match refreshed {
            Ok(steps) => steps,
            Err(err) => {
                let _ = vm.stop(STOP_DEADLINE).await;
                pause::remove_staging(staging.as_deref());
                return Err(err);
            }
        };
        let timing = RestoreTiming {
            vm: vm.timing(),
            agent_connect: connected - running,
            refresh: connected.elapsed(),
            total: started.elapsed(),
        };
        Ok(Sandbox {
            id,
            image: template.image.name().to_string(),
            memory_mib: template.info.shape.memory_mib,
            vm,
            client,
            _run_dir: run_dir,
            staging,
            created: Instant::now(),
            timing,
            egress,
            refresh_steps,
        })
    }

    /// What each step of the guest's refresh took, in microseconds.
    pub fn refresh_steps(&self) -> &[(String, u64)] {
        &self.refresh_steps
    }

    /// The guest's egress connections belong to `binding` from now on.
    pub fn bind_egress(&self, binding: crate::egress::Binding) {
        if let Some(egress) = &self.egress {
            egress.bind(binding);
        }
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    /// The name of the image it runs.
    pub fn image(&self) -> &str {
        &self.image
    }

    /// Its guest memory in MiB.
    pub fn memory_mib(&self) -> u32 {
        self.memory_mib
    }

    pub fn client(&self) -> &AgentClient {
        &self.client
    }

    pub fn vm_mut(&mut self) -> &mut Vm {
        &mut self.vm
    }

    pub fn pid(&self) -> u32 {
        self.vm.pid()
    }

    /// Kills the VM from anywhere, without this sandbox (see [`crate::vm::VmKiller`]).
    pub fn vm_kill_switch(&self) -> crate::vm::VmKiller {
        self.vm.killer()
    }

    pub fn age(&self) -> Duration {
        self.created.elapsed()
    }

    pub fn timing(&self) -> RestoreTiming {
        self.timing
    }

    pub fn console_log(&self) -> PathBuf {
        self.vm.console_log().to_path_buf()
    }

    /// Splits the sandbox into its VM, its agent connection and the run
    /// directory that holds the VM's sockets (keep it while the VM lives).
    pub fn into_parts(mut self) -> (Vm, AgentClient, tempfile::TempDir) {
        pause::remove_staging(self.staging.take().as_deref());
        (self.vm, self.client, self._run_dir)
    }

    /// Ends the VM; the sandbox is gone for good.
    pub async fn destroy(mut self) {
        pause::remove_staging(self.staging.take().as_deref());
        let killed = self.vm.killer().fired();
        match self.vm.stop(STOP_DEADLINE).await {
            Ok(_) => {}
            // Killed on purpose (ended or reset): no report is expected.
            Err(err) if killed => tracing::debug!(id = %self.id, %err, "killed sandbox reaped"),
            Err(err) => tracing::warn!(id = %self.id, %err, "sandbox did not stop cleanly"),
        }
    }
}

/// Two sandboxes restored from one template share the guest's RNG state and
/// clock from the moment of the snapshot; this gives each its own.
async fn refresh(client: &AgentClient, egress: bool) -> Result<Vec<(String, u64)>> {
    let mut entropy = vec![0u8; ENTROPY_BYTES];
    if !crate::vmm::devices::virtio::rng::fill_random(&mut entropy) {
        anyhow::bail!("the host has no entropy to give the sandbox");
    }
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .context("the host clock is before 1970")?;
    let message = airlock_protocol::Message::Refresh(airlock_protocol::Refresh {
        wall_clock_unix_ns: Some(now.as_nanos() as u64),
        egress,
    });
    let reply = client
        .request(message, entropy)
        .await
        .and_then_finish()
        .await
        .context("cannot refresh the restored sandbox")?;
    match reply.message {
        airlock_protocol::Message::RefreshReply(r) if egress && !r.egress => {
            anyhow::bail!("the sandbox's egress relay did not start: {:?}", r.warnings)
        }
        airlock_protocol::Message::RefreshReply(r) if r.crng_reseeded && r.clock_set => {
            // The guest wrote these and the sandbox keeps them: bounded.
            Ok(r.steps_us
                .into_iter()
                .take(MAX_REFRESH_STEPS)
                .map(|(mut name, us)| {
                    name.truncate(name.floor_char_boundary(MAX_STEP_NAME));
                    (name, us)
                })
                .collect())
        }
        airlock_protocol::Message::RefreshReply(r) => {
            anyhow::bail!("the restored sandbox could not be made fresh: {r:?}")
        }
        other => anyhow::bail!("unexpected reply to refresh: {other:?}"),
    }
}

/// `request(..).await` then `finish()`, as one step.
trait FinishExt {
    async fn and_then_finish(self) -> crate::agent_client::Result<airlock_protocol::Frame>;
}

impl FinishExt for crate::agent_client::Result<crate::agent_client::Response> {
    async fn and_then_finish(self) -> crate::agent_client::Result<airlock_protocol::Frame> {
        self?.finish().await
    }
}

/// 128 random bits, hex.
fn new_id() -> Result<String> {
    let mut bytes = [0u8; 16];
    if !crate::vmm::devices::virtio::rng::fill_random(&mut bytes) {
        anyhow::bail!("the host has no entropy for a sandbox id");
    }
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

//! Pausing a sandbox to disk. The host lets go of the agent, the VMM saves
//! a diff snapshot (vCPU and device state, and only the guest pages written
//! since the template) into the sandbox's staging directory, and exits: a
//! paused sandbox holds no host memory. Resuming is [`Sandbox::start`] with
//! the saved directory.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow};

use super::Sandbox;
use crate::agent_client::AgentClient;
use crate::vm::VmError;

/// Staging directories live here, under the caller's root; what is left in
/// it after a crash is garbage.
pub const STAGING_DIR: &str = ".staging";

/// A sandbox saved to disk, its VM gone.
#[derive(Debug)]
pub struct Paused {
    /// The directory holding the snapshot, durable on disk; the caller
    /// moves it where paused sandboxes are kept.
    pub dir: PathBuf,
    /// Guest memory written since the template (the diff's pages).
    pub dirty_bytes: u64,
    /// What the saved state takes on disk.
    pub disk_bytes: u64,
    /// From the pause being asked for to the state being durable.
    pub took: Duration,
}

/// A pause that did not happen. If the save could not be written (a full
/// disk, say) the sandbox runs on and comes back here; otherwise its VM is
/// gone. Nothing is left in the staging directory either way.
pub struct PauseFailed {
    pub error: anyhow::Error,
    pub sandbox: Option<Sandbox>,
}

impl std::fmt::Debug for PauseFailed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PauseFailed")
            .field("error", &self.error)
            .field("running", &self.sandbox.is_some())
            .finish()
    }
}

impl PauseFailed {
    fn gone(error: anyhow::Error) -> PauseFailed {
        PauseFailed {
            error,
            sandbox: None,
        }
    }
}

impl Sandbox {
    /// Saves the sandbox to disk and ends its VM.
    pub async fn pause(self) -> Result<Paused, PauseFailed> {
        let Some(dir) = self.staging.clone() else {
            let error = anyhow!(
                "sandbox {} was not started with a place to pause to",
                self.id
            );
            return Err(PauseFailed {
                error,
                sandbox: Some(self),
            });
        };
        let started = Instant::now();
        let Sandbox {
            id,
            mut vm,
            client,
            _run_dir,
            staging,
            created,
            timing,
        } = self;
        // Nothing of the host's is in flight when the guest stops; the
        // resumed guest's connections are reset by its vsock device.
        drop(client);
        let info = match vm.snapshot(&dir).await {
            Ok(info) => info,
            Err(VmError::SnapshotFailed(detail)) => {
                // The VM runs on: connect to its agent again.
                let error = anyhow!("cannot pause sandbox {id}: {detail}");
                let connected = AgentClient::connect(
                    vm.vsock_socket(),
                    airlock_protocol::AGENT_VSOCK_PORT,
                    super::CONNECT_TIMEOUT,
                )
                .await;
                let client = match connected {
                    Ok(client) => client,
                    Err(err) => {
                        tracing::error!(%err, "the agent does not answer after a failed pause");
                        let _ = vm.stop(super::STOP_DEADLINE).await;
                        remove_staging(staging.as_deref());
                        return Err(PauseFailed::gone(error));
                    }
                };
                let sandbox = Sandbox {
                    id,
                    vm,
                    client,
                    _run_dir,
                    staging,
                    created,
                    timing,
                };
                return Err(PauseFailed {
                    error,
                    sandbox: Some(sandbox),
                });
            }
            Err(err) => {
                let _ = vm.stop(super::STOP_DEADLINE).await;
                remove_staging(Some(&dir));
                return Err(PauseFailed::gone(
                    anyhow::Error::new(err).context(format!("cannot pause sandbox {id}")),
                ));
            }
        };
        drop(vm);
        let disk_bytes = match make_durable(&dir) {
            Ok(bytes) => bytes,
            Err(err) => {
                remove_staging(Some(&dir));
                return Err(PauseFailed::gone(
                    err.context(format!("cannot pause sandbox {id}")),
                ));
            }
        };
        Ok(Paused {
            dir,
            dirty_bytes: info.memory_bytes_written,
            disk_bytes,
            took: started.elapsed(),
        })
    }
}

/// Makes `root/.staging/<id>`, empty, for a VM's pause to save into.
pub(super) fn make_staging(root: &Path, id: &str) -> Result<PathBuf> {
    let dir = root.join(STAGING_DIR).join(id);
    std::fs::create_dir_all(&dir)
        .with_context(|| format!("cannot create the pause directory {}", dir.display()))?;
    Ok(dir)
}

pub(super) fn remove_staging(dir: Option<&Path>) {
    if let Some(dir) = dir
        && let Err(err) = std::fs::remove_dir_all(dir)
        && err.kind() != std::io::ErrorKind::NotFound
    {
        tracing::warn!(dir = %dir.display(), %err, "cannot remove a pause directory");
    }
}

/// Flushes every file of `dir` and the directory itself to disk (the VMM
/// flushed the memory, not its state file); returns the bytes they take.
fn make_durable(dir: &Path) -> Result<u64> {
    let mut bytes = 0u64;
    let entries =
        std::fs::read_dir(dir).with_context(|| format!("cannot list {}", dir.display()))?;
    for entry in entries {
        let path = entry
            .with_context(|| format!("cannot list {}", dir.display()))?
            .path();
        let file = std::fs::File::open(&path)
            .with_context(|| format!("cannot open {}", path.display()))?;
        file.sync_all()
            .with_context(|| format!("cannot flush {}", path.display()))?;
        let meta = file
            .metadata()
            .with_context(|| format!("cannot stat {}", path.display()))?;
        bytes += meta.blocks() * 512;
    }
    sync_dir(dir)?;
    Ok(bytes)
}

/// fsync of a directory: its entries (a rename into it, a new file) are on
/// disk once this returns.
pub fn sync_dir(dir: &Path) -> Result<()> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("cannot flush the directory {}", dir.display()))
}

/// A paused sandbox as a server keeps it: the saved state, moved out of
/// staging into the directory of paused sandboxes.
#[derive(Debug)]
pub struct SavedSandbox {
    pub dir: PathBuf,
    pub dirty_bytes: u64,
    pub disk_bytes: u64,
}

impl SavedSandbox {
    /// Pauses `sandbox` and keeps its state beside its staging directory's
    /// parent (a rename on one disk, then flushed).
    pub async fn pause(sandbox: Sandbox) -> Result<SavedSandbox, PauseFailed> {
        let paused = sandbox.pause().await?;
        let kept = match keep(&paused.dir) {
            Ok(dir) => dir,
            Err(err) => {
                remove_staging(Some(&paused.dir));
                return Err(PauseFailed::gone(err));
            }
        };
        Ok(SavedSandbox {
            dir: kept,
            dirty_bytes: paused.dirty_bytes,
            disk_bytes: paused.disk_bytes,
        })
    }

    /// Removes the saved state.
    pub fn discard(self) {
        remove_staging(Some(&self.dir));
    }
}

/// Moves `root/.staging/<id>` to `root/paused-<random>`.
fn keep(staging: &Path) -> Result<PathBuf> {
    let root = staging
        .parent()
        .and_then(Path::parent)
        .context("a staging directory outside its root")?;
    let name = format!("paused-{}", super::new_id()?);
    let kept = root.join(name);
    std::fs::rename(staging, &kept)
        .with_context(|| format!("cannot move {} to {}", staging.display(), kept.display()))?;
    sync_dir(root)?;
    Ok(kept)
}

//! Pausing a sandbox to disk. The host lets go of the agent, the VMM saves
//! a diff snapshot (vCPU and device state, and only the guest pages written
//! since the template) into the sandbox's staging directory, and exits: a
//! paused sandbox holds no host memory. Resuming is [`Sandbox::start`] with
//! the saved directory.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};

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
            image,
            memory_mib,
            mut vm,
            client,
            _run_dir,
            staging,
            created,
            timing,
            egress,
            refresh_steps,
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
                    image,
                    memory_mib,
                    vm,
                    client,
                    _run_dir,
                    staging,
                    created,
                    timing,
                    egress,
                    refresh_steps,
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

/// What a diff snapshot holds; anything else in a pause directory was put
/// there by something other than a healthy VMM.
const SAVED_FILES: [&str; 2] = [
    crate::vmm::snapshot::STATE_FILE,
    crate::vmm::snapshot::overlay::OVERLAY_FILE,
];

/// Flushes the saved files and the directory itself to disk (the VMM
/// flushed the memory, not its state file); returns the bytes they take.
/// The VMM could write this directory, so nothing in it is trusted: only
/// the expected names, each a regular file (opened without following a
/// link and without blocking, so a FIFO cannot hang the gateway).
fn make_durable(dir: &Path) -> Result<u64> {
    let bytes = check_saved_files(dir, true)?;
    sync_dir(dir)?;
    Ok(bytes)
}

/// Checks that `dir` holds only the saved files, each a regular file, and
/// returns the bytes they take, flushing each if `flush`.
fn check_saved_files(dir: &Path, flush: bool) -> Result<u64> {
    use std::os::unix::fs::OpenOptionsExt;
    let listed =
        std::fs::read_dir(dir).with_context(|| format!("cannot list {}", dir.display()))?;
    for entry in listed {
        let name = entry
            .with_context(|| format!("cannot list {}", dir.display()))?
            .file_name();
        if !SAVED_FILES.iter().any(|f| name == *f) {
            bail!("{} holds an unexpected entry {name:?}", dir.display());
        }
    }
    let mut bytes = 0u64;
    for name in SAVED_FILES {
        let path = dir.join(name);
        let file = std::fs::File::options()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
            .open(&path)
            .with_context(|| format!("cannot open {}", path.display()))?;
        let meta = file
            .metadata()
            .with_context(|| format!("cannot stat {}", path.display()))?;
        if !meta.is_file() {
            bail!("{} is not a regular file", path.display());
        }
        if flush {
            // Read-only from now on: a saved state is mapped by every VM
            // resumed from it, and must not change under them.
            use std::os::unix::fs::PermissionsExt;
            // (Defence in depth: only this sandbox's VMMs see it, read-only.)
            if let Err(err) = file.set_permissions(std::fs::Permissions::from_mode(0o444)) {
                tracing::warn!(path = %path.display(), %err, "cannot make a saved state read-only");
            }
            file.sync_all()
                .with_context(|| format!("cannot flush {}", path.display()))?;
        }
        bytes += meta.blocks() * 512;
    }
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
/// staging into the directory of paused sandboxes. A copy names the same
/// directory; only `discard` removes it.
#[derive(Debug, Clone)]
pub struct SavedSandbox {
    pub dir: PathBuf,
    /// The image whose template it resumes over (from its name: see `keep`).
    pub image: String,
    pub dirty_bytes: u64,
    pub disk_bytes: u64,
}

impl SavedSandbox {
    /// Pauses `sandbox` and keeps its state beside its staging directory's
    /// parent (a rename on one disk, then flushed).
    pub async fn pause(sandbox: Sandbox) -> Result<SavedSandbox, PauseFailed> {
        let image = sandbox.image().to_string();
        let paused = sandbox.pause().await?;
        let kept = match keep(&paused.dir, &image) {
            Ok(dir) => dir,
            Err(err) => {
                remove_staging(Some(&paused.dir));
                return Err(PauseFailed::gone(err));
            }
        };
        Ok(SavedSandbox {
            dir: kept,
            image,
            dirty_bytes: paused.dirty_bytes,
            disk_bytes: paused.disk_bytes,
        })
    }

    /// Removes the saved state.
    pub fn discard(self) {
        remove_staging(Some(&self.dir));
    }

    /// Its directory's name under the root it was kept in.
    pub fn name(&self) -> String {
        self.dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    }

    /// The saved state kept as `root/name` by an earlier run (made durable
    /// then): checked as a pause checks what its VMM wrote.
    pub fn load(root: &Path, name: &str) -> Result<SavedSandbox> {
        let Some(image) = image_of(name) else {
            bail!("{name:?} is not the name of a saved sandbox");
        };
        let dir = root.join(name);
        let meta = std::fs::symlink_metadata(&dir)
            .with_context(|| format!("the saved sandbox {} is missing", dir.display()))?;
        if !meta.is_dir() {
            bail!("{} is not a directory", dir.display());
        }
        let disk_bytes = check_saved_files(&dir, false)?;
        Ok(SavedSandbox {
            dir,
            image,
            dirty_bytes: 0,
            disk_bytes,
        })
    }
}

/// Kept states are `root/<KEPT_PREFIX><random>`, with `.<image>` after it
/// for an image other than the built-in one: the name is all a durable
/// record keeps, and the image says which template the state resumes over.
const KEPT_PREFIX: &str = "paused-";

/// The image a kept state's name records; none if it is not such a name.
fn image_of(name: &str) -> Option<String> {
    let rest = name.strip_prefix(KEPT_PREFIX)?;
    let (id, image) = match rest.split_once('.') {
        Some((id, image)) => (id, image),
        None => (rest, crate::image::names::DEFAULT_IMAGE),
    };
    let id_ok = id.len() == 32 && id.chars().all(|c| c.is_ascii_hexdigit());
    (id_ok && crate::image::custom::recipe::is_image_name(image) && !image.contains(".."))
        .then(|| image.to_string())
}

/// Moves `root/.staging/<id>` to `root/paused-<random>[.<image>]`.
fn keep(staging: &Path, image: &str) -> Result<PathBuf> {
    let root = staging
        .parent()
        .and_then(Path::parent)
        .context("a staging directory outside its root")?;
    let name = if image == crate::image::names::DEFAULT_IMAGE {
        format!("{KEPT_PREFIX}{}", super::new_id()?)
    } else {
        format!("{KEPT_PREFIX}{}.{image}", super::new_id()?)
    };
    let kept = root.join(name);
    std::fs::rename(staging, &kept)
        .with_context(|| format!("cannot move {} to {}", staging.display(), kept.display()))?;
    sync_dir(root)?;
    Ok(kept)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_kept_name_records_its_image() {
        let id = "0123456789abcdef0123456789abcdef";
        assert_eq!(
            image_of(&format!("paused-{id}")).as_deref(),
            Some("default")
        );
        assert_eq!(
            image_of(&format!("paused-{id}.data-1.0")).as_deref(),
            Some("data-1.0")
        );
        for bad in [
            "paused-x".to_string(),
            format!("paused-{id}./etc"),
            format!("paused-{id}.."),
            format!("paused-{id}.a..b"),
            format!("other-{id}"),
        ] {
            assert_eq!(image_of(&bad), None, "{bad}");
        }
    }

    #[test]
    fn only_the_saved_files_as_regular_files_are_made_durable() {
        let dir = tempfile::tempdir().unwrap();
        for name in SAVED_FILES {
            std::fs::write(dir.path().join(name), b"x").unwrap();
        }
        assert!(make_durable(dir.path()).unwrap() > 0);

        // A FIFO in place of the state file: refused at once, not a hang.
        let state = dir.path().join(SAVED_FILES[0]);
        std::fs::remove_file(&state).unwrap();
        let c = std::ffi::CString::new(state.to_str().unwrap()).unwrap();
        // SAFETY: a NUL-terminated path we own.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        assert!(make_durable(dir.path()).is_err());

        // A link, or anything unexpected, is refused too.
        std::fs::remove_file(&state).unwrap();
        std::os::unix::fs::symlink("/etc/passwd", &state).unwrap();
        assert!(make_durable(dir.path()).is_err());
        std::fs::remove_file(&state).unwrap();
        std::fs::write(&state, b"x").unwrap();
        std::fs::write(dir.path().join("extra"), b"x").unwrap();
        assert!(make_durable(dir.path()).is_err());
    }
}

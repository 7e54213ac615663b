//! The pre-warmed template: the image booted once, its agent's interpreters
//! warmed (numpy, pandas, matplotlib imported; node started), then saved as a
//! snapshot that every new sandbox restores from.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

use crate::agent_client::AgentClient;
use crate::host_kvm::KvmFlavor;
use crate::image::Image;
use crate::image::lock::{BuildLock, Scratch};
use crate::seal::Sealed;
use crate::vm::{Vm, VmSpec};
use crate::vmm::snapshot;

/// A cold boot on kvm_pvm takes ~40 s; warming the interpreters takes longer.
const BOOT_TIMEOUT: Duration = Duration::from_secs(600);
const WARM_TIMEOUT: Duration = Duration::from_secs(900);
/// How long each warm-status request may wait in the agent before answering.
const WARM_POLL: Duration = Duration::from_secs(30);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(60);
/// Lets the guest finish tearing down the host's connection before the pause.
const SETTLE: Duration = Duration::from_millis(500);

/// The shape of the VMs made from a template.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct TemplateShape {
    pub vcpus: u8,
    pub memory_mib: u32,
}

impl TemplateShape {
    /// The shape of `image`'s sandboxes: its recipe's, else `default`.
    pub fn of(image: &Image, default: TemplateShape) -> TemplateShape {
        image
            .manifest
            .custom
            .as_ref()
            .and_then(|c| c.recipe.shape)
            .map_or(default, |s| TemplateShape {
                vcpus: s.vcpus,
                memory_mib: s.memory_mib,
            })
    }
}

impl Default for TemplateShape {
    fn default() -> Self {
        TemplateShape {
            vcpus: 1,
            memory_mib: crate::vmm::config::DEFAULT_MEMORY_MIB,
        }
    }
}

/// template.json, beside the snapshot.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TemplateInfo {
    pub image_recipe_hash: String,
    pub shape: TemplateShape,
    pub snapshot_format: u32,
    pub created: String,
    pub boot_seconds: f64,
    pub warm_seconds: f64,
    pub memory_bytes_written: u64,
    /// Interpreters that could not be warmed (they start on first use in
    /// each sandbox instead), with the reason.
    #[serde(default)]
    pub not_warm: Vec<String>,
}

#[derive(Debug, Clone)]
pub struct Template {
    pub dir: PathBuf,
    pub image: Image,
    pub info: TemplateInfo,
    /// The verified seal over its files and the image's.
    pub seal: Sealed,
    /// Keeps a prune from removing the image while sandboxes come from it.
    pub hold: std::sync::Arc<crate::image::ImageHold>,
}

/// What a template's seal covers inside its directory.
const SEALED_FILES: [&str; 3] = [snapshot::MEMORY_FILE, snapshot::STATE_FILE, "template.json"];

impl Template {
    /// Refuses to go on if a file of the template or its image changed since
    /// the seal was checked (a rewritten memory file would show in every
    /// sandbox that maps it).
    pub fn check_sealed(&self) -> Result<(), crate::seal::SealError> {
        self.seal.check_unchanged()
    }
}

/// Templates of one image are kept apart by everything a snapshot bakes in:
/// the snapshot format, the kind of KVM with its command line and CPUID
/// profile, the MSRs this KVM saves, and the shape.
fn template_dir(cache: &Path, image: &Image, shape: TemplateShape, flavor: KvmFlavor) -> PathBuf {
    cache.join("templates").join(format!(
        "{}-f{}-{}-k{}-m{}-{}c-{}m",
        image.manifest.recipe_hash,
        snapshot::FORMAT_VERSION,
        flavor.key(),
        crate::vmm::cmdline::profile_fingerprint(flavor),
        msr_fingerprint(),
        shape.vcpus,
        shape.memory_mib
    ))
}

/// A short fingerprint of the MSRs this host's KVM saves and restores. A
/// snapshot holds exactly those, and another kernel's KVM may refuse one
/// (a 6.1 template restored under 6.12 failed on MSR 0x309), so a kernel
/// upgrade makes new templates instead of failing every restore.
fn msr_fingerprint() -> String {
    use sha2::{Digest, Sha256};
    let indices = kvm_ioctls::Kvm::new()
        .ok()
        .and_then(|kvm| snapshot::vcpu_state::msr_indices(&kvm).ok())
        .unwrap_or_default();
    let digest = Sha256::digest(format!("{indices:x?}"));
    digest[..3].iter().map(|b| format!("{b:02x}")).collect()
}

/// The template in `dir`: None if there is none (or one an older airlock
/// made, without a seal or with an older one: it is remade); an error if its
/// seal fails.
pub fn open(cache: &Path, dir: &Path, image: &Image) -> Result<Option<Template>> {
    read_template(cache, dir, image)
}

fn read_template(cache: &Path, dir: &Path, image: &Image) -> Result<Option<Template>> {
    let hold = crate::image::ImageHold::acquire(image)?;
    if !dir.join(crate::seal::SEAL_FILE).is_file() {
        return Ok(None);
    }
    let key = crate::seal::key(cache)?;
    let seal = match crate::seal::verify(dir, &key) {
        Ok(seal) => seal,
        Err(outdated @ crate::seal::SealError::Outdated(..)) => {
            eprintln!("[template] {outdated}: it is made again");
            return Ok(None);
        }
        Err(e) => {
            return Err(e).with_context(|| format!("the template {} is refused", dir.display()));
        }
    };
    let text = std::fs::read_to_string(dir.join("template.json"))
        .with_context(|| format!("cannot read {}/template.json", dir.display()))?;
    let info: TemplateInfo = serde_json::from_str(&text)
        .with_context(|| format!("{}/template.json is not valid", dir.display()))?;
    Ok(Some(Template {
        dir: dir.to_path_buf(),
        image: image.clone(),
        info,
        seal,
        hold: std::sync::Arc::new(hold),
    }))
}

/// Removes a template an older airlock left without a seal (its files may
/// be read-only).
fn remove_unsealed(dir: &Path) -> Result<()> {
    if !dir.exists() {
        return Ok(());
    }
    use std::os::unix::fs::PermissionsExt;
    let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755));
    std::fs::remove_dir_all(dir).with_context(|| format!("cannot remove {}", dir.display()))
}

/// Returns the template for `image` and `shape`, creating it if needed.
pub async fn ensure(
    cache: &Path,
    image: &Image,
    shape: TemplateShape,
    airlock_exe: &Path,
) -> Result<Template> {
    let dir = template_dir(cache, image, shape, KvmFlavor::detect());
    if let Some(template) = read_template(cache, &dir, image)? {
        return Ok(template);
    }
    let lock_cache = cache.to_path_buf();
    let _lock = tokio::task::spawn_blocking(move || BuildLock::acquire(&lock_cache))
        .await
        .context("the lock task failed")??;
    if let Some(template) = read_template(cache, &dir, image)? {
        return Ok(template);
    }
    remove_unsealed(&dir)?;
    create(cache, image, shape, airlock_exe, &dir).await
}

async fn create(
    cache: &Path,
    image: &Image,
    shape: TemplateShape,
    airlock_exe: &Path,
    dest: &Path,
) -> Result<Template> {
    let name = dest
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let hold = crate::image::ImageHold::acquire(image)?;
    crate::image::make_room(
        cache,
        u64::from(shape.memory_mib) << 20,
        "making the warm template",
    )?;
    let scratch = Scratch::create(cache, &format!("template-{name}"))?;
    let run_dir = tempfile::Builder::new()
        .prefix("airlock-tpl-")
        .tempdir()
        .context("cannot create a run directory")?;
    eprintln!(
        "[template] booting image {} to make the warm template (a few minutes on kvm_pvm, once)",
        image.manifest.recipe_hash
    );
    let started = Instant::now();
    let out = scratch.path().join("out");
    std::fs::create_dir_all(&out).with_context(|| format!("cannot create {}", out.display()))?;
    let spec = VmSpec {
        airlock_exe: airlock_exe.to_path_buf(),
        kernel: image.vmlinux(),
        rootfs: image.rootfs(),
        vcpus: shape.vcpus,
        memory_mib: shape.memory_mib,
        extra_cmdline: String::new(),
        init: None,
        run_dir: run_dir.path().to_path_buf(),
        restore: None,
        resume: None,
        snapshot_dir: Some(out.clone()),
        console_max_bytes: crate::vmm::config::DEFAULT_CONSOLE_MAX_BYTES,
        label: "template".into(),
        confinement: crate::confinement::Confinement::current(),
        vsock_forward: Vec::new(),
    };
    let mut vm = Vm::spawn(&spec).await?;
    vm.wait_agent_ready(BOOT_TIMEOUT).await?;
    let boot_seconds = started.elapsed().as_secs_f64();
    eprintln!("[template] agent up after {boot_seconds:.1} s; warming interpreters");
    let not_warm = {
        let client = AgentClient::connect(
            vm.vsock_socket(),
            airlock_protocol::AGENT_VSOCK_PORT,
            CONNECT_TIMEOUT,
        )
        .await
        .context("cannot reach the agent of the template VM")?;
        wait_warm(&client, &required_warm(image)).await?
    };
    for note in &not_warm {
        eprintln!("[template] warning: {note}; it will start on first use in each sandbox");
    }
    let warm_seconds = started.elapsed().as_secs_f64() - boot_seconds;
    eprintln!("[template] interpreters warm after {warm_seconds:.1} s more; saving the snapshot");
    tokio::time::sleep(SETTLE).await;
    let saved = vm.snapshot(&out).await?;
    let mut sealed_files = SEALED_FILES.to_vec();
    match record_working_set(airlock_exe, image, shape, &out).await {
        Ok(set) => {
            let text = serde_json::to_string(&set).context("cannot serialize the working set")?;
            std::fs::write(out.join(snapshot::working_set::FILE), text)
                .context("cannot write the working set")?;
            sealed_files.push(snapshot::working_set::FILE);
            eprintln!(
                "[template] working set recorded: {} pages touched by a restore's refresh and first runs ({} written)",
                set.pages(),
                set.written.iter().map(|r| r.1).sum::<u64>()
            );
        }
        Err(err) => eprintln!(
            "[template] warning: no working set ({err:#}); restored guests fault their pages in one by one"
        ),
    }
    let info = TemplateInfo {
        image_recipe_hash: image.manifest.recipe_hash.clone(),
        shape,
        snapshot_format: snapshot::FORMAT_VERSION,
        created: humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
        boot_seconds,
        warm_seconds,
        memory_bytes_written: saved.memory_bytes_written,
        not_warm,
    };
    let text = serde_json::to_string_pretty(&info).context("cannot serialize template.json")?;
    std::fs::write(out.join("template.json"), text + "\n").context("cannot write template.json")?;
    if let Some(parent) = dest.parent() {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("cannot create {}", parent.display()))?;
    }
    let key = crate::seal::key(cache)?;
    let (kernel, rootfs) = (image.vmlinux(), image.rootfs());
    let sealing = Instant::now();
    crate::seal::seal(&out, &sealed_files, &[&kernel, &rootfs], &key)
        .context("cannot seal the template")?;
    eprintln!(
        "[template] sealed in {:.1} s (read-only, with a keyed digest checked before use)",
        sealing.elapsed().as_secs_f64()
    );
    std::fs::rename(&out, dest)
        .with_context(|| format!("cannot move the template into {}", dest.display()))?;
    // Read-only once in place (a directory must be writable to be moved).
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dest, std::fs::Permissions::from_mode(0o555))
        .with_context(|| format!("cannot make {} read-only", dest.display()))?;
    let seal = crate::seal::verify(dest, &key).context("the new template's seal")?;
    eprintln!(
        "[template] done: {} ({} MiB of guest memory in use)",
        dest.display(),
        saved.memory_bytes_written >> 20
    );
    Ok(Template {
        dir: dest.to_path_buf(),
        image: image.clone(),
        info,
        seal,
        hold: std::sync::Arc::new(hold),
    })
}

/// Restores the new snapshot in `dir` once, as a sandbox would be (refresh,
/// then a first run in each interpreter), and asks its VMM which pages
/// that touched. The memory file leaves the page cache first and the VMM
/// reads guest memory without readahead, so a page is present only if it
/// was touched.
async fn record_working_set(
    airlock_exe: &Path,
    image: &Image,
    shape: TemplateShape,
    dir: &Path,
) -> Result<snapshot::working_set::WorkingSet> {
    drop_from_page_cache(&snapshot::memory_path(dir))?;
    let run_dir = tempfile::Builder::new()
        .prefix("airlock-ws-")
        .tempdir()
        .context("cannot create a run directory")?;
    let spec = VmSpec {
        airlock_exe: airlock_exe.to_path_buf(),
        vcpus: shape.vcpus,
        memory_mib: shape.memory_mib,
        restore: Some(dir.to_path_buf()),
        label: "template-working-set".into(),
        ..VmSpec::for_image(image, run_dir.path()).context("cannot find the airlock executable")?
    };
    let mut vm = Vm::spawn(&spec).await?;
    let recorded = async {
        let client = AgentClient::connect(
            vm.vsock_socket(),
            airlock_protocol::AGENT_VSOCK_PORT,
            CONNECT_TIMEOUT,
        )
        .await
        .context("cannot reach the agent of the restored template")?;
        let mut entropy = vec![0u8; 64];
        if !crate::vmm::devices::virtio::rng::fill_random(&mut entropy) {
            bail!("the host has no entropy to give");
        }
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        client
            .refresh(Some(now), entropy)
            .await
            .context("cannot refresh the restored template")?;
        use airlock_protocol::Language;
        for (language, code) in [
            (Language::Python, "print(1)"),
            (Language::Bash, "echo 1"),
            (Language::Javascript, "console.log(1)"),
        ] {
            // A cold interpreter is not part of a restore's working set.
            let _ = client.run_code(language, code, WARM_TIMEOUT).await;
        }
        let set = vm.working_set().await?;
        set.check(u64::from(shape.memory_mib) << 8)
            .map_err(|e| anyhow::anyhow!("the VMM's working set is not valid: {e}"))?;
        Ok(set)
    }
    .await;
    let _ = vm.stop(CONNECT_TIMEOUT).await;
    // The first sandboxes should find the memory in the page cache again.
    let _ = advise_file(&snapshot::memory_path(dir), libc::POSIX_FADV_WILLNEED);
    recorded
}

/// Evicts a file's clean pages from the page cache (pages mapped elsewhere
/// stay).
fn drop_from_page_cache(path: &Path) -> Result<()> {
    advise_file(path, libc::POSIX_FADV_DONTNEED)
}

fn advise_file(path: &Path, advice: libc::c_int) -> Result<()> {
    use std::os::fd::AsRawFd;
    let file =
        std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    // SAFETY: advice on an open file; it changes no contents.
    let rc = unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, advice) };
    if rc != 0 {
        bail!(
            "cannot advise the kernel on {}: {}",
            path.display(),
            std::io::Error::from_raw_os_error(rc)
        );
    }
    Ok(())
}

/// Interpreters the template must have warm; the others are best effort.
/// (On kvm_pvm, node sometimes dies with SIGSEGV in V8 while starting: the
/// hypervisor's emulation, not airlock; python and bash are what most
/// sandboxes use first.) A custom image requires those of its warm set.
fn required_warm(image: &Image) -> Vec<airlock_protocol::Language> {
    use airlock_protocol::Language;
    let builtin = [Language::Python, Language::Bash];
    match &image.manifest.custom {
        None => builtin.to_vec(),
        Some(custom) => builtin
            .into_iter()
            .filter(|l| custom.guest.warm.iter().any(|w| w == l.name()))
            .collect(),
    }
}

/// Waits until every interpreter has settled (warm, failed, not asked for,
/// or absent from the image); fails if a required one is not warm, and
/// returns notes about the optional ones that failed.
async fn wait_warm(
    client: &AgentClient,
    required: &[airlock_protocol::Language],
) -> Result<Vec<String>> {
    use airlock_protocol::InterpreterState;
    let deadline = Instant::now() + WARM_TIMEOUT;
    loop {
        let ask = airlock_protocol::Message::WarmStatus(airlock_protocol::WarmStatus {
            wait_ms: Some(WARM_POLL.as_millis() as u64),
        });
        let frame = client
            .request(ask, Vec::new())
            .await
            .context("cannot ask the agent whether it is warm")?
            .finish()
            .await
            .context("cannot ask the agent whether it is warm")?;
        let airlock_protocol::Message::WarmStatusReply(status) = frame.message else {
            bail!(
                "unexpected reply to a warm-status request: {:?}",
                frame.message
            );
        };
        if status.settled() {
            for i in &status.interpreters {
                if required.contains(&i.language)
                    && matches!(
                        i.state,
                        InterpreterState::Stopped | InterpreterState::Unavailable
                    )
                {
                    bail!(
                        "the template needs the {} interpreter warm, and the agent reports it {:?}",
                        i.language.name(),
                        i.state
                    );
                }
            }
            let mut notes = Vec::new();
            for i in status
                .interpreters
                .iter()
                .filter(|i| i.state == InterpreterState::Failed)
            {
                let why = format!(
                    "the {} interpreter failed to start: {}",
                    i.language.name(),
                    i.detail.as_deref().unwrap_or("no detail")
                );
                if required.contains(&i.language) {
                    bail!("the template needs it warm: {why}");
                }
                notes.push(why);
            }
            return Ok(notes);
        }
        if Instant::now() > deadline {
            bail!(
                "the template's interpreters did not warm up within {WARM_TIMEOUT:?}: {status:?}"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image() -> Image {
        crate::image::tests::fake_image(Path::new("/cache/images/e9ff"))
    }

    #[test]
    fn templates_for_each_kind_of_kvm_live_apart() {
        let cache = Path::new("/cache");
        let shape = TemplateShape::default();
        let hw = template_dir(cache, &image(), shape, KvmFlavor::Hardware);
        let pvm = template_dir(cache, &image(), shape, KvmFlavor::SoftwareNestedPvm);
        assert_ne!(hw, pvm);
        let hw_name = hw.file_name().unwrap().to_string_lossy().into_owned();
        assert!(
            hw_name.starts_with("e9ff-f") && hw_name.contains("-hw-k"),
            "{hw_name}"
        );
        assert!(pvm.to_string_lossy().contains("-pvm-k"));
    }
}

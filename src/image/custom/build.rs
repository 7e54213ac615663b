//! Builds a custom image from its recipe: the base tree (airlock's Debian
//! root filesystem, copied from its ext4, or an OCI image unpacked), then
//! apt, pip and npm packages, files, build commands, the guest config and
//! the agent, packed into ext4 beside the kernel. Each step reports on
//! stderr; a failing one is named with its last output lines; the whole
//! build happens in scratch space and is renamed into place only when done.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail};

use super::guest_config::GuestConfig;
use super::recipe::{Base, RecipeFile};
use super::{CustomManifest, ManifestBase, inputs, packages, tree};
use crate::image::command::run_logged;
use crate::image::lock::{BuildLock, Scratch};
use crate::image::progress::{Progress, Throttle};
use crate::image::rootfs::{self, Mount};
use crate::image::{
    BuildInputs, Image, ManifestRootfs, Outcome, built, host_tools, kernel, publish,
    recipe as builtin, write_json,
};

/// Where wheels are staged inside the tree while pip runs.
const WHEELS_IN_TREE: &str = "tmp/airlock-wheels";
const PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Returns the image `recipe` describes, building it if the cache has none.
pub fn ensure(cache: &Path, recipe: &RecipeFile) -> Result<(Image, Outcome)> {
    let made_of = BuildInputs::gather(cache)?;
    let key = inputs::key(recipe, &made_of.kernel_key, &made_of.agent_sha256)?;
    let dir = cache.join("images").join(&key);
    let name = &recipe.recipe.name;
    if let Some(image) = built(cache, name, &key)? {
        return Ok((image, Outcome::AlreadyBuilt));
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!(
            "building the image {name:?} runs apt, pip and its commands in a chroot, which needs \
             root: run `sudo -E airlock image build --recipe {}` once; later runs reuse it",
            recipe.path.display()
        );
    }
    host_tools::check_all()?;
    let _lock = BuildLock::acquire(cache)?;
    if let Some(image) = built(cache, name, &key)? {
        return Ok((image, Outcome::AlreadyBuilt));
    }
    clear_interrupted_builds(cache);
    super::super::make_room(
        cache,
        super::super::space::IMAGE_BUILD_BYTES,
        &format!("building the image {name:?}"),
    )?;
    let progress = Progress::new("image");
    progress.step(&format!(
        "building the image {name:?} ({key}) from {}",
        recipe.path.display()
    ));
    let kernel = kernel::ensure(cache, &made_of.source_version)?;
    let scratch = Scratch::create(cache, &format!("custom-{name}-{key}"))?;
    // Outside the scratch space: a failed build's log outlives it.
    let log = build_log(cache, name)?;
    let root = scratch.path().join("tree");
    std::fs::create_dir(&root).context("cannot create the build tree")?;

    let (base, debian_suite) = make_base(cache, recipe, &root, &log, &progress)?;
    let built = Steps {
        recipe,
        root: &root,
        log: &log,
        progress: &progress,
    };
    let guest = built.run_all()?;

    progress.step("listing what the image holds");
    let debian = packages::debian(&root)?;
    let pip = packages::python(&root)?;
    let npm = packages::npm(&root)?;
    if debian.is_empty() {
        // Without dpkg, trim nothing: the paths below belong to Debian.
    } else {
        rootfs::trim(&root)?;
    }
    rootfs::prepare_guest_files(&root)?;
    install_agent(&root, &made_of.agent_bytes)?;

    let out = scratch.path().join("out");
    std::fs::create_dir(&out).context("cannot create the image output directory")?;
    let packed = rootfs::pack_ext4(&root, &out.join("rootfs.ext4"), &log, &progress)?;
    std::fs::copy(kernel.vmlinux(), out.join("vmlinux")).context("cannot copy the kernel")?;
    let rootfs = ManifestRootfs {
        recipe_hash: key.clone(),
        suite: debian_suite,
        ext4_bytes: packed.image_bytes,
        packages: debian,
    };
    let custom = CustomManifest {
        name: name.clone(),
        base,
        recipe: recipe.recipe.clone(),
        pip,
        npm,
        guest,
        build_seconds: progress.elapsed().as_secs_f64(),
    };
    let manifest = made_of.manifest(&key, &kernel, rootfs, Some(custom));
    write_json(&out.join("manifest.json"), &manifest)?;
    publish(&out, &dir)?;
    super::super::names::record(cache, name, &key)?;
    progress.step(&format!("done: {name} is {}", dir.display()));
    super::super::prune_and_say(cache, &progress);
    Ok((Image { dir, manifest }, Outcome::Built))
}

/// Removes what killed custom builds left in the scratch space (their
/// mounts first); the caller holds the build lock, so none is running.
fn clear_interrupted_builds(cache: &Path) {
    let Ok(entries) = std::fs::read_dir(cache.join("tmp")) else {
        return;
    };
    for entry in entries.flatten() {
        if entry.file_name().to_string_lossy().starts_with("custom-")
            && let Err(err) = crate::image::lock::remove_tree(&entry.path())
        {
            eprintln!("warning: cannot clear {}: {err:#}", entry.path().display());
        }
    }
}

/// `logs/image-<name>.log` in the cache, emptied for this build.
fn build_log(cache: &Path, name: &str) -> Result<PathBuf> {
    let dir = cache.join("logs");
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let log = dir.join(format!("image-{name}.log"));
    std::fs::write(&log, b"").with_context(|| format!("cannot create {}", log.display()))?;
    Ok(log)
}

/// Fills `root` with the base; returns what the manifest says of it and the
/// Debian suite ("" for an OCI base).
fn make_base(
    cache: &Path,
    recipe: &RecipeFile,
    root: &Path,
    log: &Path,
    progress: &Progress,
) -> Result<(ManifestBase, String)> {
    match recipe.recipe.base() {
        Base::Debian => {
            let base = rootfs::ensure(cache)?;
            progress.step("copying airlock's Debian root filesystem");
            copy_ext4_tree(&base.ext4(), root, log)?;
            Ok((
                ManifestBase {
                    source: "debian".into(),
                    oci_digest: None,
                    oci_layers: Vec::new(),
                },
                builtin::SUITE.to_string(),
            ))
        }
        Base::Oci(spec) => {
            let source = crate::image::oci::OciSource::parse(&spec, &recipe.dir)
                .with_context(|| format!("base {spec:?}"))?;
            progress.step(&format!("unpacking the OCI image {spec}"));
            let mut throttle = Throttle::new(Duration::from_secs(5));
            let unpacked = crate::image::oci::unpack(
                &source,
                root,
                &crate::image::oci::Limits::default(),
                &mut |line| {
                    if throttle.ready() {
                        eprintln!("[image] {line}");
                    }
                },
            )
            .with_context(|| format!("cannot unpack the OCI base {spec}"))?;
            progress.step(&format!(
                "unpacked {} layers ({} files, {} MiB); adding the sandbox user",
                unpacked.layers.len(),
                unpacked.files,
                unpacked.bytes >> 20
            ));
            tree::add_sandbox_user(root)?;
            Ok((
                ManifestBase {
                    source: spec,
                    oci_digest: Some(unpacked.manifest_digest),
                    oci_layers: unpacked.layers,
                },
                String::new(),
            ))
        }
    }
}

/// Copies an ext4 image's files into `root`, with owners, modes (setuid
/// and sticky bits too) and links, through a read-only loop mount.
fn copy_ext4_tree(ext4: &Path, root: &Path, log: &Path) -> Result<()> {
    let mount_point = root
        .parent()
        .context("the build tree has no parent")?
        .join("base-mount");
    let mounted = Mount::loop_read_only(ext4, &mount_point)?;
    let mut cp = Command::new("cp");
    cp.arg("-a").arg(mount_point.join(".")).arg(root);
    run_logged(cp, "copying the base root filesystem", log, |_| {})?;
    drop(mounted);
    let _ = std::fs::remove_dir(&mount_point);
    Ok(())
}

/// The recipe's own steps, in a chroot of the tree.
struct Steps<'a> {
    recipe: &'a RecipeFile,
    root: &'a Path,
    log: &'a Path,
    progress: &'a Progress,
}

impl Steps<'_> {
    fn run_all(&self) -> Result<GuestConfig> {
        let recipe = &self.recipe.recipe;
        let packages = &recipe.packages;
        let mut apt: Vec<&str> = packages.apt.iter().map(String::as_str).collect();
        let has_npm = tree::find_program(self.root, &["/usr/local/bin/npm", "/usr/bin/npm"]);
        if !packages.npm.is_empty() && has_npm.is_none() && recipe.base() == Base::Debian {
            apt.push("npm");
        }
        if !apt.is_empty() {
            self.progress
                .step(&format!("apt: installing {}", apt.join(", ")));
            rootfs::install_packages(self.root, &apt, self.log)
                .context("step packages.apt failed")?;
        }
        let python = tree::find_program(self.root, &["/usr/local/bin/python3", "/usr/bin/python3"]);
        if !packages.pip.is_empty() || packages.pip_wheels.is_some() {
            let python = python.as_deref().context(
                "packages.pip needs Python in the image, and it has none (/usr/local/bin/python3 or /usr/bin/python3)",
            )?;
            self.pip(python).context("step packages.pip failed")?;
        }
        if !packages.npm.is_empty() {
            let npm = tree::find_program(self.root, &["/usr/local/bin/npm", "/usr/bin/npm"])
                .context("packages.npm needs npm in the image, and it has none")?;
            self.progress
                .step(&format!("npm: installing {}", packages.npm.join(", ")));
            let mut args = vec![
                npm.as_str(),
                "install",
                "--global",
                "--no-audit",
                "--no-fund",
                "--no-update-notifier",
            ];
            args.extend(packages.npm.iter().map(String::as_str));
            self.chroot(&args, "step packages.npm (npm install)")?;
        }
        for (i, file) in recipe.files.iter().enumerate() {
            let from = self.recipe.resolve(&file.from);
            self.progress.step(&format!(
                "copying {} to {}",
                from.display(),
                file.to.display()
            ));
            let mode = file.mode.as_deref().and_then(super::recipe::parse_mode);
            tree::copy_in(self.root, &from, &file.to, mode)
                .with_context(|| format!("step files[{i}] failed"))?;
        }
        for (i, command) in recipe.build.run.iter().enumerate() {
            self.progress.step(&format!("build.run[{i}]: {command}"));
            self.chroot(
                &["/bin/sh", "-c", command],
                &format!("step build.run[{i}] ({command})"),
            )?;
        }
        self.guest_config(python)
    }

    fn pip(&self, python: &str) -> Result<()> {
        let packages = &self.recipe.recipe.packages;
        let mut args: Vec<String> = [
            python,
            "-m",
            "pip",
            "install",
            "--no-cache-dir",
            "--disable-pip-version-check",
            "--no-input",
        ]
        .map(String::from)
        .to_vec();
        let staged_guest = Path::new("/").join(WHEELS_IN_TREE);
        let staged = tree::resolve(self.root, &staged_guest, false)?;
        if let Some(dir) = &packages.pip_wheels {
            let dir = self.recipe.resolve(dir);
            // Staged in a directory of its own, never through the base's links.
            match std::fs::symlink_metadata(&staged) {
                Ok(meta) if meta.is_dir() => std::fs::remove_dir_all(&staged),
                Ok(_) => std::fs::remove_file(&staged),
                Err(_) => Ok(()),
            }
            .context("cannot clear the wheel staging directory")?;
            let staged = tree::make_dirs(self.root, &staged_guest)?;
            let mut wheels = Vec::new();
            for entry in std::fs::read_dir(&dir)
                .with_context(|| format!("cannot read the wheel directory {}", dir.display()))?
            {
                let entry = entry.with_context(|| format!("cannot read {}", dir.display()))?;
                let name = entry.file_name();
                if !name.to_string_lossy().ends_with(".whl") {
                    continue;
                }
                std::fs::copy(entry.path(), staged.join(&name))
                    .with_context(|| format!("cannot stage {}", entry.path().display()))?;
                wheels.push(format!("/{WHEELS_IN_TREE}/{}", name.to_string_lossy()));
            }
            if wheels.is_empty() {
                bail!("packages.pip_wheels: {} holds no .whl file", dir.display());
            }
            wheels.sort();
            args.push("--find-links".into());
            args.push(format!("/{WHEELS_IN_TREE}"));
            if packages.pip.is_empty() {
                // Wheels alone install without the network.
                args.push("--no-index".into());
            }
            args.extend(wheels);
        }
        args.extend(packages.pip.iter().cloned());
        self.progress.step(&format!(
            "pip: installing {}",
            args.iter()
                .skip(7)
                .map(String::as_str)
                .collect::<Vec<_>>()
                .join(" ")
        ));
        let argv: Vec<&str> = args.iter().map(String::as_str).collect();
        let result = self.chroot(&argv, "step packages.pip (pip install)");
        let _ = std::fs::remove_dir_all(&staged);
        result
    }

    /// Runs `argv` in a chroot of the tree, with /proc, the host's DNS and
    /// a few device nodes, and the recipe's environment.
    fn chroot(&self, argv: &[&str], what: &str) -> Result<()> {
        let _mounts = ChrootMounts::set_up(self.root)?;
        let mut cmd = Command::new("chroot");
        cmd.arg(self.root).args(argv);
        cmd.env_clear()
            .env("PATH", PATH)
            .env("HOME", "/root")
            // Every base has the C locale; Python reads it as UTF-8.
            .env("LC_ALL", "C")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .env("PIP_BREAK_SYSTEM_PACKAGES", "1")
            .env("PIP_ROOT_USER_ACTION", "ignore");
        for var in [
            "http_proxy",
            "https_proxy",
            "HTTP_PROXY",
            "HTTPS_PROXY",
            "no_proxy",
            "NO_PROXY",
        ] {
            if let Ok(value) = std::env::var(var) {
                cmd.env(var, value);
            }
        }
        cmd.current_dir("/");
        let mut throttle = Throttle::new(Duration::from_secs(10));
        run_logged(cmd, what, self.log, |line| {
            if throttle.ready() {
                eprintln!("[image]   {line}");
            }
        })
    }

    fn guest_config(&self, python: Option<String>) -> Result<GuestConfig> {
        let recipe = &self.recipe.recipe;
        let node = tree::find_program(self.root, &["/usr/local/bin/node", "/usr/bin/node"]);
        let bash = tree::find_program(self.root, &["/bin/bash", "/usr/bin/bash"]);
        let mut config = GuestConfig {
            name: recipe.name.clone(),
            python,
            node,
            bash,
            warm: Vec::new(),
            python_imports: recipe.warm.python_imports.clone(),
            env: recipe.env.clone(),
        };
        let have = config.languages();
        match &recipe.warm.interpreters {
            Some(asked) => {
                for lang in asked {
                    if !have.contains(&lang.as_str()) {
                        bail!(
                            "warm.interpreters names {lang}, and the image has no interpreter \
                             for it (it has: {})",
                            have.join(", ")
                        );
                    }
                }
                config.warm = asked.clone();
            }
            None => config.warm = have.iter().map(|s| s.to_string()).collect(),
        }
        if !config.python_imports.is_empty() && config.python.is_none() {
            bail!("warm.python_imports needs Python in the image, and it has none");
        }
        if config.python.is_none() && config.bash.is_none() {
            bail!("the image has neither Python nor bash; airlock needs one of them to run code");
        }
        config.write_into(self.root)?;
        Ok(config)
    }
}

/// The agent at its path in the tree, root's and 0755.
fn install_agent(root: &Path, agent: &[u8]) -> Result<()> {
    tree::write_file(
        root,
        Path::new(airlock_protocol::AGENT_GUEST_PATH),
        agent,
        0o755,
    )
}

/// /proc, DNS and /dev/{null,zero,random,urandom} for one chroot command,
/// undone when dropped (the image keeps none of them).
struct ChrootMounts {
    _mounts: Vec<Mount>,
    resolv: PathBuf,
    resolv_before: Option<Vec<u8>>,
    created: Vec<PathBuf>,
}

impl ChrootMounts {
    fn set_up(root: &Path) -> Result<ChrootMounts> {
        let etc = tree::make_dirs(root, Path::new("/etc"))?;
        let resolv = etc.join("resolv.conf");
        // A link (Debian's resolvconf, or a hostile base) is replaced, never
        // written through.
        let resolv_before = match std::fs::symlink_metadata(&resolv) {
            Ok(meta) if meta.is_file() => std::fs::read(&resolv).ok(),
            _ => None,
        };
        let _ = std::fs::remove_file(&resolv);
        std::fs::copy("/etc/resolv.conf", &resolv)
            .context("cannot copy /etc/resolv.conf into the build tree")?;
        let mut mounts = vec![Mount::new(
            "proc",
            &tree::make_dirs(root, Path::new("/proc"))?,
        )?];
        let dev = tree::make_dirs(root, Path::new("/dev"))?;
        let mut created = Vec::new();
        for node in ["null", "zero", "random", "urandom"] {
            let target = dev.join(node);
            // A bind mount follows a link: only a device node or a plain
            // file of the tree's own is bound over, anything else replaced.
            let usable = std::fs::symlink_metadata(&target).is_ok_and(|m| {
                use std::os::unix::fs::FileTypeExt;
                m.file_type().is_char_device() || m.is_file()
            });
            if !usable {
                tree::write_file(root, &Path::new("/dev").join(node), b"", 0o666)?;
                created.push(target.clone());
            }
            mounts.push(Mount::bind(&Path::new("/dev").join(node), &target)?);
        }
        Ok(ChrootMounts {
            _mounts: mounts,
            resolv,
            resolv_before,
            created,
        })
    }
}

impl Drop for ChrootMounts {
    fn drop(&mut self) {
        self._mounts.clear();
        for path in &self.created {
            let _ = std::fs::remove_file(path);
        }
        let _ = std::fs::remove_file(&self.resolv);
        let _ = std::fs::write(&self.resolv, self.resolv_before.as_deref().unwrap_or(b""));
    }
}

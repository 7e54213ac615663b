//! The nested host's initramfs: busybox, the modules that reach the 9p share
//! and /dev/kvm, and an init that switches root to the shared host filesystem.
//! Built from Debian packages only, and cached by a hash of its inputs.

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};
use sha2::{Digest, Sha256};

use super::host::HostKernel;

/// Modules loaded at start, named as in modules.dep; their dependencies come
/// along, loaded first.
const MODULES: &[&str] = &[
    "virtio_pci",     // the PCI transport of every device below
    "9pnet_virtio",   // the host filesystem share...
    "9p",             // ...and its filesystem
    "virtio_console", // the stdout, stderr and status ports
    "kvm_amd",        // /dev/kvm on the emulated SVM CPU
];

/// The nested host's PID 1. The command's stdout, stderr and exit status go
/// to the virtio-serial ports QEMU names `stdout`, `stderr` and `status`,
/// reached as /dev/airlock-NAME (devtmpfs is one instance, so the links show
/// inside the new root too).
const INIT: &str = r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
fail() { echo "nested host: $*" >/dev/console; echo "nested host: $*" >/dev/airlock-stderr; echo 125 >/dev/airlock-status; sync; poweroff -f; }
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
while read -r module; do insmod "/modules/$module" || fail "cannot load $module"; done </modules/order
for port in /sys/class/virtio-ports/*; do ln -sf "/dev/${port##*/}" "/dev/airlock-$(cat "$port/name")"; done
mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000,cache=loose hostroot /root || fail "cannot mount the host filesystem"
mount -t proc proc /root/proc
mount -t sysfs sysfs /root/sys
# cgroup v2, so that airlock gives each VMM its own memory and pids limits.
mount -t cgroup2 cgroup2 /root/sys/fs/cgroup || fail "cannot mount cgroup2"
mount -t devtmpfs devtmpfs /root/dev
mkdir -p /root/dev/pts /root/dev/shm
mount -t devpts devpts /root/dev/pts
mount -t tmpfs -o mode=1777 tmpfs /root/dev/shm
# Unix sockets do not work on 9p: TMPDIR (set by the run script) is this
# tmpfs. /tmp stays this machine's, so a checkout under /tmp can be seen.
chmod 1777 /root/dev/shm
ip link set lo up || fail "cannot bring up loopback"
[ -c /dev/kvm ] || fail "kvm_amd loaded but /dev/kvm is missing: this QEMU's CPU has no SVM"
script=$(sed -n 's/.*airlock\.run=\([^ ]*\).*/\1/p' /proc/cmdline)
[ -n "$script" ] || fail "no airlock.run= on the kernel command line"
# switch_root, not chroot: a chrooted process may not make a user namespace
# (unshare: EPERM), which an unprivileged airlock's jail needs. The rest runs
# on the host's filesystem, with the host's static busybox.
exec switch_root /root /bin/busybox sh -c '/bin/sh "$0" </dev/null; echo $? >/dev/airlock-status; sync; /bin/busybox poweroff -f' "$script"
"#;

/// Returns the cached initramfs for `kernel`, building it if needed.
pub fn ensure(cache_root: &Path, kernel: &HostKernel) -> Result<PathBuf> {
    let busybox = Path::new("/bin/busybox");
    let modules = resolve_modules(&kernel.modules_dir)?;
    let key = cache_key(busybox, &modules, kernel)?;
    let dir = cache_root.join("nested").join(&key);
    let archive = dir.join("initramfs.cpio");
    if archive.is_file() {
        return Ok(archive);
    }
    eprintln!(
        "nested host: building its initramfs (once) in {}",
        dir.display()
    );
    fs::create_dir_all(cache_root.join("nested")).context("cannot create the nested cache")?;
    let staging = tempfile_dir(&cache_root.join("nested"), &key)?;
    let result = build(&staging, busybox, &modules, &kernel.modules_dir);
    if let Err(err) = result {
        let _ = fs::remove_dir_all(&staging);
        return Err(err);
    }
    // Renamed into place whole: an interrupted build leaves nothing half-made.
    match fs::rename(&staging, &dir) {
        Ok(()) => {}
        Err(_) if archive.is_file() => {
            let _ = fs::remove_dir_all(&staging);
        }
        Err(err) => {
            let _ = fs::remove_dir_all(&staging);
            return Err(err)
                .with_context(|| format!("cannot move the initramfs to {}", dir.display()));
        }
    }
    Ok(archive)
}

fn tempfile_dir(parent: &Path, key: &str) -> Result<PathBuf> {
    let dir = parent.join(format!(".{key}.{}.partial", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(dir.join("root"))
        .context("cannot create the initramfs staging directory")?;
    Ok(dir)
}

fn build(staging: &Path, busybox: &Path, modules: &[String], modules_dir: &Path) -> Result<()> {
    let root = staging.join("root");
    for sub in ["bin", "dev", "proc", "sys", "root", "modules"] {
        fs::create_dir_all(root.join(sub))?;
    }
    fs::copy(busybox, root.join("bin/busybox")).context("cannot copy busybox")?;
    let mut order = String::new();
    for module in modules {
        let name = Path::new(module)
            .file_name()
            .context("a module path without a file name")?
            .to_string_lossy()
            .into_owned();
        fs::copy(modules_dir.join(module), root.join("modules").join(&name))
            .with_context(|| format!("cannot copy the module {module}"))?;
        order.push_str(&name);
        order.push('\n');
    }
    fs::write(root.join("modules/order"), order)?;
    write_executable(&root.join("init"), INIT)?;
    pack(&root, &staging.join("initramfs.cpio"))?;
    fs::remove_dir_all(&root).context("cannot remove the initramfs staging tree")?;
    Ok(())
}

fn write_executable(path: &Path, text: &str) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    fs::write(path, text)?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o755))?;
    Ok(())
}

/// Packs `root` as a newc cpio archive (uncompressed: the kernel reads it as is).
fn pack(root: &Path, archive: &Path) -> Result<()> {
    let out = fs::File::create(archive).context("cannot create the initramfs archive")?;
    let mut child = Command::new("cpio")
        .args(["--quiet", "-o", "-H", "newc"])
        .current_dir(root)
        .stdin(Stdio::piped())
        .stdout(out)
        .spawn()
        .context("cannot run cpio (apt-get install cpio)")?;
    let mut names = Vec::new();
    collect(root, Path::new(""), &mut names)?;
    {
        let mut stdin = child.stdin.take().context("cpio has no stdin")?;
        for name in names {
            writeln!(stdin, "{}", name.display())?;
        }
    }
    let status = child.wait()?;
    if !status.success() {
        bail!("cpio failed ({status}) while packing the nested host's initramfs");
    }
    Ok(())
}

fn collect(root: &Path, rel: &Path, names: &mut Vec<PathBuf>) -> Result<()> {
    let mut entries: Vec<_> = fs::read_dir(root.join(rel))?.collect::<Result<_, _>>()?;
    entries.sort_by_key(|e| e.file_name());
    for entry in entries {
        let path = rel.join(entry.file_name());
        names.push(path.clone());
        if entry.file_type()?.is_dir() {
            collect(root, &path, names)?;
        }
    }
    Ok(())
}

/// The modules to load, dependencies first, as paths relative to the
/// kernel's module directory (from its modules.dep).
fn resolve_modules(modules_dir: &Path) -> Result<Vec<String>> {
    let dep_file = modules_dir.join("modules.dep");
    let text = fs::read_to_string(&dep_file).with_context(|| {
        format!(
            "cannot read {}: the nested host needs the kernel's modules (apt-get install linux-image-amd64)",
            dep_file.display()
        )
    })?;
    let deps = parse_modules_dep(&text);
    // Newer kernels build some of these in (6.12: virtio_pci).
    let builtin: Vec<String> = fs::read_to_string(modules_dir.join("modules.builtin"))
        .unwrap_or_default()
        .lines()
        .map(module_name)
        .collect();
    let mut order = Vec::new();
    for wanted in MODULES.iter().filter(|m| !builtin.iter().any(|b| b == *m)) {
        let path = deps
            .keys()
            .find(|path| module_name(path) == *wanted)
            .with_context(|| {
                format!(
                    "the kernel in {} has no module {wanted}",
                    modules_dir.display()
                )
            })?;
        visit(path, &deps, &mut order, 0)?;
    }
    Ok(order)
}

fn visit(
    path: &str,
    deps: &BTreeMap<String, Vec<String>>,
    order: &mut Vec<String>,
    depth: u32,
) -> Result<()> {
    if depth > 32 {
        bail!("modules.dep has a dependency cycle at {path}");
    }
    if order.iter().any(|p| p == path) {
        return Ok(());
    }
    for dep in deps.get(path).map(Vec::as_slice).unwrap_or_default() {
        visit(dep, deps, order, depth + 1)?;
    }
    order.push(path.to_string());
    Ok(())
}

fn parse_modules_dep(text: &str) -> BTreeMap<String, Vec<String>> {
    text.lines()
        .filter_map(|line| {
            let (module, deps) = line.split_once(':')?;
            Some((
                module.trim().to_string(),
                deps.split_whitespace().map(str::to_string).collect(),
            ))
        })
        .collect()
}

/// `kernel/fs/9p/9p.ko` → `9p`; modules.dep spells some names with dashes.
fn module_name(path: &str) -> String {
    let file = path.rsplit('/').next().unwrap_or(path);
    let stem = file.split(".ko").next().unwrap_or(file);
    stem.replace('-', "_")
}

fn cache_key(busybox: &Path, modules: &[String], kernel: &HostKernel) -> Result<String> {
    let mut hash = Sha256::new();
    hash.update(INIT);
    hash.update(&kernel.release);
    let busybox_bytes =
        fs::read(busybox).context("cannot read /bin/busybox (apt-get install busybox-static)")?;
    hash.update(&busybox_bytes);
    for module in modules {
        hash.update(module);
        let meta = fs::metadata(kernel.modules_dir.join(module))?;
        hash.update(meta.len().to_le_bytes());
    }
    let digest = hash.finalize();
    Ok(digest[..6].iter().map(|b| format!("{b:02x}")).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dependencies_come_first_and_once() {
        let deps = parse_modules_dep(
            "kernel/a/kvm-amd.ko: kernel/c/ccp.ko kernel/k/kvm.ko kernel/v/irqbypass.ko\n\
             kernel/k/kvm.ko: kernel/v/irqbypass.ko\nkernel/v/irqbypass.ko:\nkernel/c/ccp.ko:\n",
        );
        let mut order = Vec::new();
        visit("kernel/a/kvm-amd.ko", &deps, &mut order, 0).unwrap();
        visit("kernel/k/kvm.ko", &deps, &mut order, 0).unwrap();
        assert_eq!(
            order,
            [
                "kernel/c/ccp.ko",
                "kernel/v/irqbypass.ko",
                "kernel/k/kvm.ko",
                "kernel/a/kvm-amd.ko"
            ]
        );
        assert_eq!(module_name("kernel/a/kvm-amd.ko"), "kvm_amd");
    }
}

//! The comparison point for restore speed: QEMU restoring the same kernel and
//! root filesystem from a migration file (`-incoming`), timed from process
//! start to the guest running, as reported over QMP.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::host_kvm::KvmFlavor;
use crate::image::Image;
use crate::vmm::x86_64::cpuid::PVM_CMDLINE;

pub const QEMU: &str = "qemu-system-x86_64";
const BOOT_TIMEOUT: Duration = Duration::from_secs(300);

pub fn available() -> bool {
    Command::new(QEMU)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// QEMU's microvm machine with the same kernel, rootfs and memory as ours.
fn command(image: &Image, dir: &Path, memory_mib: u32, flavor: KvmFlavor) -> Command {
    let mut cmdline =
        String::from("console=ttyS0 quiet reboot=k panic=-1 root=/dev/vda ro rootfstype=ext4");
    let mut cpu = "host";
    if flavor == KvmFlavor::SoftwareNestedPvm {
        cmdline.push(' ');
        cmdline.push_str(PVM_CMDLINE);
        cpu = "qemu64,-pni,-arch-capabilities,+xsaveerptr";
    }
    cmdline.push_str(&format!(" init={}", airlock_protocol::AGENT_GUEST_PATH));
    let mut cmd = Command::new(QEMU);
    cmd.args([
        "-M",
        "microvm,x-option-roms=off,rtc=off,acpi=off",
        "-enable-kvm",
        "-cpu",
        cpu,
    ])
    .args([
        "-m",
        &memory_mib.to_string(),
        "-smp",
        "1",
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
    ])
    .arg("-serial")
    .arg(format!("file:{}", dir.join("console.log").display()))
    .arg("-kernel")
    .arg(image.vmlinux())
    .arg("-append")
    .arg(cmdline)
    .arg("-drive")
    .arg(format!(
        "id=root,file={},format=raw,if=none,readonly=on",
        image.rootfs().display()
    ))
    .args(["-device", "virtio-blk-device,drive=root"])
    .arg("-qmp")
    .arg(format!(
        "unix:{},server=on,wait=off",
        dir.join("qmp.sock").display()
    ))
    .stdin(Stdio::null())
    .stdout(Stdio::null())
    .stderr(Stdio::piped());
    cmd
}

struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Qmp {
    fn connect(path: &Path, within: Duration) -> Result<Qmp> {
        let deadline = Instant::now() + within;
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(_) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_micros(200))
                }
                Err(e) => return Err(e).context("cannot reach QEMU's QMP socket"),
            }
        };
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .context("QMP socket")?;
        let writer = stream.try_clone().context("QMP socket")?;
        let mut qmp = Qmp {
            reader: BufReader::new(stream),
            writer,
        };
        qmp.line()?; // greeting
        qmp.execute("qmp_capabilities", None)?;
        Ok(qmp)
    }

    fn line(&mut self) -> Result<serde_json::Value> {
        let mut line = String::new();
        if self.reader.read_line(&mut line).context("QMP read")? == 0 {
            bail!("QEMU closed its QMP socket");
        }
        serde_json::from_str(&line).context("QMP sent something that is not JSON")
    }

    fn execute(
        &mut self,
        command: &str,
        arguments: Option<serde_json::Value>,
    ) -> Result<serde_json::Value> {
        let mut message = serde_json::json!({ "execute": command });
        if let Some(arguments) = arguments {
            message["arguments"] = arguments;
        }
        writeln!(self.writer, "{message}").context("QMP write")?;
        loop {
            let reply = self.line()?;
            if let Some(error) = reply.get("error") {
                bail!("QMP {command}: {error}");
            }
            if let Some(value) = reply.get("return") {
                return Ok(value.clone());
            }
        }
    }
}

/// Boots the image in QEMU until the agent is up, saves it with `migrate`.
pub fn prepare_state(
    image: &Image,
    dir: &Path,
    memory_mib: u32,
    flavor: KvmFlavor,
) -> Result<PathBuf> {
    let mut child = command(image, dir, memory_mib, flavor)
        .spawn()
        .context("cannot start QEMU")?;
    let result = (|| {
        let mut qmp = Qmp::connect(&dir.join("qmp.sock"), Duration::from_secs(10))?;
        let console = dir.join("console.log");
        let deadline = Instant::now() + BOOT_TIMEOUT;
        while !std::fs::read_to_string(&console)
            .unwrap_or_default()
            .contains(airlock_protocol::READY_MARKER)
        {
            if Instant::now() > deadline {
                bail!("the guest did not come up in QEMU within {BOOT_TIMEOUT:?}");
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        let state = dir.join("qemu-state");
        qmp.execute(
            "migrate",
            Some(serde_json::json!({ "uri": format!("exec:cat > {}", state.display()) })),
        )?;
        loop {
            let status = qmp.execute("query-migrate", None)?;
            match status.get("status").and_then(|s| s.as_str()) {
                Some("completed") => break,
                Some("failed") | Some("cancelled") => {
                    bail!("QEMU's migration to a file failed: {status}")
                }
                _ => std::thread::sleep(Duration::from_millis(20)),
            }
        }
        let _ = qmp.execute("quit", None);
        Ok(state)
    })();
    finish(&mut child);
    result
}

/// Restores `state` in a new QEMU process; returns process start to "running".
pub fn time_restore(
    image: &Image,
    dir: &Path,
    state: &Path,
    memory_mib: u32,
    flavor: KvmFlavor,
) -> Result<Duration> {
    let _ = std::fs::remove_file(dir.join("qmp.sock"));
    let mut cmd = command(image, dir, memory_mib, flavor);
    cmd.arg("-incoming")
        .arg(format!("exec:cat {}", state.display()));
    let started = Instant::now();
    let mut child = cmd.spawn().context("cannot start QEMU")?;
    let result = (|| {
        let mut qmp = Qmp::connect(&dir.join("qmp.sock"), Duration::from_secs(10))?;
        loop {
            let status = qmp.execute("query-status", None)?;
            if status.get("status").and_then(|s| s.as_str()) == Some("running") {
                return Ok(started.elapsed());
            }
            if started.elapsed() > Duration::from_secs(60) {
                bail!("QEMU did not resume the guest: {status}");
            }
        }
    })();
    finish(&mut child);
    result
}

fn finish(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

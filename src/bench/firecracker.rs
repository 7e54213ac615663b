//! (q) Firecracker beside airlock: the same kernel, rootfs and agent, booted
//! by a Firecracker binary the operator names (`--firecracker PATH`; airlock
//! neither ships nor builds it), snapshotted once its interpreters are warm,
//! then restored again and again. Each restore is timed to the end of its
//! `PUT /snapshot/load` (the VMM's part) and to the agent's first answer
//! over vsock (Firecracker's vsock speaks the same `CONNECT <port>` scheme
//! as airlock's), the same two points as airlock's own restore in (b).

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::json;

use super::run_python;
use super::stats::{Summary, summarize};
use crate::agent_client::AgentClient;
use crate::image::Image;
use crate::template::{Template, TemplateShape};
use crate::vm::{Vm, VmSpec};

const API_TIMEOUT: Duration = Duration::from_secs(120);
const WARM_TIMEOUT: Duration = Duration::from_secs(900);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(60);
/// airlock's guest command line without its virtio_mmio devices, which
/// Firecracker adds itself.
const BOOT_ARGS: &str = "console=ttyS0 8250.nr_uarts=1 quiet reboot=k panic=-1 root=/dev/vda ro rootfstype=ext4 \
                         random.trust_cpu=off random.trust_bootloader=off init=/usr/sbin/airlock-agent";

/// One Firecracker process with its API socket; killed when dropped.
struct Firecracker {
    child: Child,
    api: PathBuf,
}

impl Firecracker {
    fn spawn(binary: &Path, dir: &Path) -> Result<Firecracker> {
        let api = dir.join("api.sock");
        let child = Command::new(binary)
            .arg("--api-sock")
            .arg(&api)
            .args(["--level", "Warning"])
            // A glibc build has only an allow-all filter; airlock's side of
            // the comparison keeps its own jail and filters.
            .arg("--no-seccomp")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("cannot start {}", binary.display()))?;
        Ok(Firecracker { child, api })
    }

    /// Sends one API request, waiting for the socket to appear first.
    fn call(&self, method: &str, path: &str, body: serde_json::Value) -> Result<()> {
        let deadline = Instant::now() + API_TIMEOUT;
        let mut stream = loop {
            match UnixStream::connect(&self.api) {
                Ok(stream) => break stream,
                Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(1)),
                Err(e) => bail!("Firecracker's API socket: {e}"),
            }
        };
        stream.set_read_timeout(Some(API_TIMEOUT))?;
        let body = body.to_string();
        write!(
            stream,
            "{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )?;
        let mut reader = BufReader::new(stream);
        let mut status = String::new();
        reader.read_line(&mut status)?;
        let code: u16 = status
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .with_context(|| format!("Firecracker answered {status:?}"))?;
        if !(200..300).contains(&code) {
            let mut rest = String::new();
            let _ = reader.take(4096).read_to_string(&mut rest);
            bail!("{method} {path}: Firecracker answered {code}: {rest}");
        }
        Ok(())
    }
}

impl Drop for Firecracker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Boots the image in Firecracker, waits for warm interpreters, and saves a
/// full snapshot in `dir`.
async fn make_snapshot(
    binary: &Path,
    image: &Image,
    shape: TemplateShape,
    dir: &Path,
) -> Result<()> {
    let fc = Firecracker::spawn(binary, dir)?;
    let vsock = dir.join("boot-vsock.sock");
    fc.call(
        "PUT",
        "/machine-config",
        json!({"vcpu_count": shape.vcpus, "mem_size_mib": shape.memory_mib, "smt": false}),
    )?;
    fc.call(
        "PUT",
        "/boot-source",
        json!({"kernel_image_path": image.vmlinux(), "boot_args": BOOT_ARGS}),
    )?;
    fc.call(
        "PUT",
        "/drives/rootfs",
        json!({"drive_id": "rootfs", "path_on_host": image.rootfs(), "is_root_device": false, "is_read_only": true}),
    )?;
    fc.call("PUT", "/entropy", json!({}))?;
    fc.call("PUT", "/vsock", json!({"guest_cid": 3, "uds_path": vsock}))?;
    fc.call("PUT", "/actions", json!({"action_type": "InstanceStart"}))?;
    // Until the guest's agent listens, Firecracker answers CONNECT by closing.
    let deadline = Instant::now() + WARM_TIMEOUT;
    let client = loop {
        match AgentClient::connect(&vsock, airlock_protocol::AGENT_VSOCK_PORT, CONNECT_TIMEOUT)
            .await
        {
            Ok(client) => break client,
            Err(_) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => return Err(e).context("Firecracker's guest agent did not answer"),
        }
    };
    loop {
        let status = client.warm_status(Some(Duration::from_secs(30))).await?;
        if status.settled() {
            break;
        }
        if Instant::now() > deadline {
            bail!("Firecracker's guest did not warm its interpreters");
        }
    }
    drop(client);
    // As airlock's template does before its snapshot.
    tokio::time::sleep(Duration::from_millis(500)).await;
    fc.call("PATCH", "/vm", json!({"state": "Paused"}))?;
    fc.call(
        "PUT",
        "/snapshot/create",
        json!({"snapshot_type": "Full", "snapshot_path": dir.join("state"), "mem_file_path": dir.join("memory")}),
    )?;
    Ok(())
}

/// One restore: (until the load call returned, until the agent answered,
/// until its first print(1)).
async fn restore_once(binary: &Path, snapshot: &Path, run: &Path) -> Result<[Duration; 3]> {
    let vsock = run.join("vsock.sock");
    let started = Instant::now();
    let fc = Firecracker::spawn(binary, run)?;
    fc.call(
        "PUT",
        "/snapshot/load",
        json!({
            "snapshot_path": snapshot.join("state"),
            "mem_backend": {"backend_type": "File", "backend_path": snapshot.join("memory")},
            "resume_vm": true,
            "vsock_override": {"uds_path": vsock},
        }),
    )?;
    let loaded = started.elapsed();
    let client = AgentClient::connect(&vsock, airlock_protocol::AGENT_VSOCK_PORT, CONNECT_TIMEOUT)
        .await
        .context("the restored Firecracker guest's agent did not answer")?;
    let answered = started.elapsed();
    let out = run_python(&client, "print(1)").await?;
    let first_run = started.elapsed();
    if out.trim() != "1" {
        bail!("print(1) in the restored Firecracker guest printed {out:?}");
    }
    drop(client);
    drop(fc);
    Ok([loaded, answered, first_run])
}

/// One airlock restore of its template, timed at the same points (no
/// refresh either, so both guests do the same work).
async fn airlock_restore_once(template: &Template, exe: &Path) -> Result<[Duration; 3]> {
    let run = tempfile::Builder::new()
        .prefix("airlock-")
        .tempdir()
        .context("cannot create a run directory")?;
    let spec = VmSpec {
        airlock_exe: exe.to_path_buf(),
        vcpus: template.info.shape.vcpus,
        memory_mib: template.info.shape.memory_mib,
        restore: Some(template.dir.clone()),
        label: "bench-beside-firecracker".into(),
        ..VmSpec::for_image(&template.image, run.path())
            .context("cannot find the airlock executable")?
    };
    let started = Instant::now();
    let mut vm = Vm::spawn(&spec).await?;
    let running = vm.timing().spawn_to_running;
    let client = AgentClient::connect(
        vm.vsock_socket(),
        airlock_protocol::AGENT_VSOCK_PORT,
        CONNECT_TIMEOUT,
    )
    .await
    .context("the restored airlock guest's agent did not answer")?;
    let answered = started.elapsed();
    let out = run_python(&client, "print(1)").await?;
    let first_run = started.elapsed();
    drop(client);
    let _ = vm.stop(CONNECT_TIMEOUT).await;
    if out.trim() != "1" {
        bail!("print(1) in the restored airlock guest printed {out:?}");
    }
    Ok([running, answered, first_run])
}

/// Runs (q): Firecracker's restores, then airlock's of its own template,
/// alternating so both see the same machine.
pub async fn beside_firecracker(
    binary: &Path,
    template: &Template,
    exe: &Path,
    restores: usize,
) -> Result<()> {
    let (image, shape) = (&template.image, template.info.shape);
    let work = tempfile::Builder::new()
        .prefix("airlock-fc-")
        .tempdir()
        .context("cannot create a work directory")?;
    let snapshot = work.path().join("snapshot");
    std::fs::create_dir_all(&snapshot)?;
    make_snapshot(binary, image, shape, &snapshot).await?;
    let mut fc_samples: [Vec<Duration>; 3] = Default::default();
    let mut airlock_samples: [Vec<Duration>; 3] = Default::default();
    for i in 0..restores.max(1) {
        let run = work.path().join(format!("run-{i}"));
        std::fs::create_dir_all(&run)?;
        let times = restore_once(binary, &snapshot, &run).await?;
        let _ = std::fs::remove_dir_all(&run);
        for (kind, took) in fc_samples.iter_mut().zip(times) {
            kind.push(took);
        }
        let times = airlock_restore_once(template, exe).await?;
        for (kind, took) in airlock_samples.iter_mut().zip(times) {
            kind.push(took);
        }
    }
    let summaries = |samples: [Vec<Duration>; 3]| -> Result<[Summary; 3]> {
        let [a, b, c] = samples.map(|s| summarize(&s));
        Ok([
            a.context("no samples")?,
            b.context("no samples")?,
            c.context("no samples")?,
        ])
    };
    let fc = summaries(fc_samples)?;
    let ours = summaries(airlock_samples)?;
    let ratio = |a: &Summary, b: &Summary| a.median.as_secs_f64() / b.median.as_secs_f64();
    println!(
        "\n(q) beside Firecracker ({}, without its seccomp filter or jailer; airlock confined as it serves): the same kernel, rootfs and agent, a full snapshot with warm interpreters; restores alternate, no refresh on either",
        binary.display()
    );
    for (i, what) in [
        "process start to the VMM's restore done (Firecracker: snapshot/load returned; airlock: vCPUs running)",
        "process start to the agent's first answer over vsock",
        "process start to the first print(1)",
    ]
    .into_iter()
    .enumerate()
    {
        println!("    {what}:");
        println!("      Firecracker {}", fc[i]);
        println!("      airlock     {}", ours[i]);
        println!("      ratio airlock / Firecracker: {:.2}x", ratio(&ours[i], &fc[i]));
    }
    Ok(())
}

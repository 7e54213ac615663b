//! (n) Egress: what the path out of a sandbox costs. One loopback HTTP
//! server on this host serves a file and a short page; a sandbox reaches it
//! through the whole path (guest relay, vsock, VMM forward, gateway policy
//! and splice) under the name `bench.test`, mapped to 127.0.0.1.
//!
//! - Throughput: the guest's `curl` of the file, against this host's own
//!   `curl` of the same file from the same server.
//! - Latency added per connection: one fresh connection and a small GET,
//!   timed in the guest's warm Python, through the proxy against the same
//!   code to a server on the guest's own loopback (same VM, no egress path);
//!   the host's own round trip to the server is shown too.
//!
//! Only 127.0.0.1 is ever connected to.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use super::run_python;
use super::stats::{ms, summarize};
use crate::egress::{Binding, EgressArgs, Traffic};
use crate::sandbox::{Sandbox, StartOptions};
use crate::template::Template;

const NAME: &str = "bench.test";
const PAGE: &[u8] = b"hello\n";

/// Serves GET /x (a short page) and /big (`big_bytes`), one request per
/// connection, until dropped.
async fn serve(listener: TcpListener, big_bytes: u64) {
    loop {
        let Ok((mut stream, _)) = listener.accept().await else {
            continue;
        };
        tokio::spawn(async move {
            let mut head = Vec::with_capacity(1024);
            let mut buf = [0u8; 1024];
            while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 16 * 1024 {
                match stream.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => head.extend_from_slice(&buf[..n]),
                }
            }
            let big = head.starts_with(b"GET /big ");
            let length = if big { big_bytes } else { PAGE.len() as u64 };
            let reply =
                format!("HTTP/1.1 200 OK\r\nContent-Length: {length}\r\nConnection: close\r\n\r\n");
            if stream.write_all(reply.as_bytes()).await.is_err() {
                return;
            }
            if !big {
                let _ = stream.write_all(PAGE).await;
                return;
            }
            let chunk = vec![0x5a_u8; 256 * 1024];
            let mut left = big_bytes;
            while left > 0 {
                let n = left.min(chunk.len() as u64) as usize;
                if stream.write_all(&chunk[..n]).await.is_err() {
                    return;
                }
                left -= n as u64;
            }
        });
    }
}

fn host_curl(url: &str) -> Result<Duration> {
    let started = Instant::now();
    let out = std::process::Command::new("curl")
        .args(["-sS", "-o", "/dev/null", "--noproxy", "*", url])
        .output()
        .context("curl on the host (apt-get install curl)")?;
    if !out.status.success() {
        bail!("host curl {url}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(started.elapsed())
}

/// The Python both sides time: `n` fresh connections, one GET each.
fn timing_code(n: usize, host: &str, port: u16, target: &str) -> String {
    format!(
        "import http.client, time\n\
         _t = []\n\
         for _ in range({n}):\n\
         \x20   s = time.perf_counter()\n\
         \x20   c = http.client.HTTPConnection('{host}', {port}, timeout=60)\n\
         \x20   c.request('GET', '{target}')\n\
         \x20   c.getresponse().read()\n\
         \x20   c.close()\n\
         \x20   _t.append(time.perf_counter() - s)\n\
         _t.sort()\n\
         print(_t[len(_t) // 2] * 1000)\n"
    )
}

fn parse_ms(text: &str) -> Result<f64> {
    text.trim()
        .parse()
        .with_context(|| format!("not a time in ms: {text:?}"))
}

pub async fn egress(template: &Template, exe: &Path, mib: u64, connections: usize) -> Result<()> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    let server = tokio::spawn(serve(listener, mib << 20));

    let dir = tempfile::tempdir()?;
    let hosts = dir.path().join("hosts");
    std::fs::write(&hosts, format!("127.0.0.1 {NAME}\n"))?;
    let args = EgressArgs {
        allow: vec![NAME.into()],
        hosts_file: Some(hosts),
        ..EgressArgs::default()
    };
    let service = crate::egress::build(&args, &Default::default())?
        .context("the bench's egress policy allows nothing")?;
    let options = StartOptions {
        egress: Some(service),
        ..StartOptions::default()
    };
    let sandbox = Sandbox::start(template, exe, &options, None).await?;
    let traffic = Arc::new(Traffic::default());
    sandbox.bind_egress(Binding {
        sandbox_id: "bench".into(),
        principal: "bench".into(),
        traffic: traffic.clone(),
        events: None,
    });
    let result = measure(&sandbox, port, mib, connections).await;
    let report = traffic.report();
    sandbox.destroy().await;
    server.abort();
    result?;
    println!(
        "    metered: {} connections allowed, {:.1} MiB in, {:.1} KiB out",
        report.connections_allowed,
        report.bytes_in as f64 / f64::from(1u32 << 20),
        report.bytes_out as f64 / 1024.0
    );
    Ok(())
}

async fn measure(sandbox: &Sandbox, port: u16, mib: u64, connections: usize) -> Result<()> {
    let client = sandbox.client();
    println!(
        "\n(n) egress through the policy proxy ({NAME} -> 127.0.0.1:{port}); baselines from this run"
    );
    let url = format!("http://127.0.0.1:{port}/big");
    let mut host_samples = Vec::new();
    let mut guest_samples = Vec::new();
    for _ in 0..3 {
        host_samples.push(host_curl(&url)?);
        let script = format!(
            "curl -sS -o /dev/null -w '%{{time_total}} %{{size_download}}' http://{NAME}:{port}/big"
        );
        let out = client.sh(&script, Duration::from_secs(900)).await?;
        if !out.success() {
            bail!(
                "guest curl failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let mut words = text.split_whitespace();
        let seconds: f64 = words.next().unwrap_or("").parse().context("curl time")?;
        let size: u64 = words.next().unwrap_or("").parse().context("curl size")?;
        if size != mib << 20 {
            bail!("the guest downloaded {size} bytes of {}", mib << 20);
        }
        guest_samples.push(Duration::from_secs_f64(seconds));
    }
    let host = summarize(&host_samples).context("no host samples")?.median;
    let guest = summarize(&guest_samples)
        .context("no guest samples")?
        .median;
    let rate = |d: Duration| (mib as f64) / d.as_secs_f64();
    println!(
        "    {mib} MiB download: guest through the proxy {} ({:.0} MiB/s), host curl direct {} ({:.0} MiB/s); throughput ratio guest/host {:.2}",
        ms(guest),
        rate(guest),
        ms(host),
        rate(host),
        host.as_secs_f64() / guest.as_secs_f64()
    );

    // The guest-local baseline: a server on the guest's own loopback.
    run_python(
        client,
        "import http.server, threading\n\
         class _H(http.server.BaseHTTPRequestHandler):\n\
         \x20   def do_GET(self):\n\
         \x20       self.send_response(200); self.send_header('Content-Length', '6'); self.end_headers(); self.wfile.write(b'hello\\n')\n\
         \x20   def log_message(self, *a): pass\n\
         _srv = http.server.ThreadingHTTPServer(('127.0.0.1', 8099), _H)\n\
         threading.Thread(target=_srv.serve_forever, daemon=True).start()\n\
         print(1)\n",
    )
    .await?;
    let local =
        parse_ms(&run_python(client, &timing_code(connections, "127.0.0.1", 8099, "/x")).await?)?;
    let proxied = parse_ms(
        &run_python(
            client,
            &timing_code(
                connections,
                "127.0.0.1",
                airlock_protocol::EGRESS_PROXY_PORT,
                &format!("http://{NAME}:{port}/x"),
            ),
        )
        .await?,
    )?;
    let host_code = timing_code(connections, "127.0.0.1", port, "/x");
    let out = std::process::Command::new("python3")
        .args(["-c", &host_code])
        .output()
        .context("python3 on the host")?;
    let host_ms = parse_ms(&String::from_utf8_lossy(&out.stdout))?;
    println!(
        "    one connection + GET, median of {connections}: guest through the proxy {proxied:.2} ms, guest to its own loopback {local:.2} ms, host direct {host_ms:.2} ms; added by the egress path {:.2} ms ({:.1}x the guest-local round trip)",
        proxied - local,
        proxied / local
    );
    Ok(())
}

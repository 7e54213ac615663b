//! Guests that fight the host, on real microVMs: an impostor agent (a root
//! process as PID 1, speaking the protocol) that floods the host with output
//! frames, and one that stops reading, so it grants no vsock credit. The
//! host must stay bounded and keep serving everyone else.

mod common;

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use airlock::agent_client::{AgentClient, AgentError};
use airlock::metrics::Metrics;
use airlock::sandbox::Sandbox;
use airlock::sandbox::registry::{Hosted, KillSwitch, Limits, Provider, Registry};
use airlock::vm::Vm;
use airlock_protocol::{
    AGENT_VSOCK_PORT, Command, Exec, Frame, HelloOk, MAX_OUTPUT_LIMIT, Message, Output,
    OutputLimits, PROTOCOL_VERSION, Stream, WriteFile,
};
use base64::Engine;
use tokio::sync::Mutex;

/// How much the test process (the host side) may grow while a guest floods it.
const RSS_BOUND_BYTES: u64 = 64 << 20;
/// Output bytes in each of the impostor's frames.
const CHUNK: usize = 32 << 10;

fn exe() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_airlock"))
}

/// The impostor, run by python3 as PID 1: it listens where the agent would,
/// answers the handshake, then floods the first request with output frames
/// without end ("flood") or never reads again ("stall").
fn impostor_script(mode: &str) -> String {
    let b64 = |b: &[u8]| base64::engine::general_purpose::STANDARD.encode(b);
    let hello = Frame::new(
        0,
        Message::HelloOk(HelloOk {
            agent_version: "impostor".into(),
            protocol_version: PROTOCOL_VERSION,
        }),
    )
    .encode()
    .expect("hello frame");
    // Request 1 is the first after the handshake; the frame is sent with its
    // length patched for the payload.
    let output = Frame::new(
        1,
        Message::Output(Output {
            stream: Stream::Stdout,
        }),
    )
    .encode()
    .expect("output frame");
    let script = format!(
        "import base64,socket,struct,time\n\
         hello=base64.b64decode('{hello}')\n\
         tpl=base64.b64decode('{output}')\n\
         out=struct.pack('<I',len(tpl)-4+{CHUNK})+tpl[4:]+b'x'*{CHUNK}\n\
         s=socket.socket(socket.AF_VSOCK,socket.SOCK_STREAM)\n\
         s.bind((socket.VMADDR_CID_ANY,{AGENT_VSOCK_PORT}))\n\
         s.listen(4)\n\
         print('impostor listening',flush=True)\n\
         while True:\n\
         \x20c,_=s.accept()\n\
         \x20c.recv(65536)\n\
         \x20c.sendall(hello)\n\
         \x20if '{mode}'=='flood':\n\
         \x20\x20c.recv(65536)\n\
         \x20\x20try:\n\
         \x20\x20\x20while True:c.sendall(out)\n\
         \x20\x20except OSError:c.close()\n\
         \x20else:\n\
         \x20\x20time.sleep(86400)\n",
        hello = b64(&hello),
        output = b64(&output),
    );
    format!(
        "-- -c \"exec(__import__('base64').b64decode('{}'))\"",
        b64(script.as_bytes())
    )
}

/// Boots a VM whose PID 1 is the impostor, and connects to it as the host
/// connects to an agent.
async fn impostor(mode: &str, dir: &Path) -> (Vm, AgentClient) {
    let spec = common::boot_spec(
        dir,
        "/usr/bin/python3",
        impostor_script(mode),
        &format!("impostor-{mode}"),
    );
    let vm = Vm::spawn(&spec).await.expect("the impostor's VM starts");
    // It says when it listens (python starts slowly under emulation).
    let deadline = Instant::now() + Duration::from_secs(120);
    while !std::fs::read_to_string(vm.console_log())
        .unwrap_or_default()
        .contains("impostor listening")
    {
        assert!(
            Instant::now() < deadline,
            "the impostor never listened:\n{}",
            std::fs::read_to_string(vm.console_log()).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let client = AgentClient::connect(
        vm.vsock_socket(),
        AGENT_VSOCK_PORT,
        Duration::from_secs(120),
    )
    .await
    .unwrap_or_else(|e| {
        let console = std::fs::read_to_string(vm.console_log()).unwrap_or_default();
        panic!("the impostor does not answer: {e}\n{console}")
    });
    (vm, client)
}

fn rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kib| kib * 1024)
}

fn shell(script: &str) -> Exec {
    Exec {
        command: Command::Shell(script.into()),
        cwd: None,
        env: Vec::new(),
        timeout_ms: Some(60_000),
        output: OutputLimits::default(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_impostor_agent_flooding_output_is_cut_off_within_a_memory_bound() {
    let template = common::template().await;
    let other = Sandbox::restore(&template, exe()).await.expect("restore");
    let dir = tempfile::tempdir().unwrap();
    let (mut vm, client) = impostor("flood", dir.path()).await;

    let before = rss_bytes();
    let peak = Arc::new(AtomicU64::new(before));
    let sampling = Arc::new(AtomicBool::new(true));
    let sampler = {
        let (peak, sampling) = (peak.clone(), sampling.clone());
        std::thread::spawn(move || {
            while sampling.load(Ordering::SeqCst) {
                peak.fetch_max(rss_bytes(), Ordering::SeqCst);
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };
    // The other sandbox answers all through the flood.
    let others_calls = async {
        let mut answered = 0;
        for _ in 0..5 {
            let out = other
                .client()
                .exec(shell("echo fine"), Vec::new())
                .await
                .expect("the other sandbox answers");
            assert_eq!(String::from_utf8_lossy(&out.stdout), "fine\n");
            answered += 1;
        }
        answered
    };
    let started = Instant::now();
    // The largest output caps a caller may ask for: the host keeps up to
    // them (8 MiB a stream), and no more.
    let mut widest = shell("echo hello");
    widest.output = OutputLimits {
        stdout_max: Some(MAX_OUTPUT_LIMIT),
        stderr_max: Some(MAX_OUTPUT_LIMIT),
    };
    let (flooded, answered) = tokio::join!(client.exec(widest, Vec::new()), others_calls);
    let took = started.elapsed();
    sampling.store(false, Ordering::SeqCst);
    sampler.join().unwrap();
    let grown = peak.load(Ordering::SeqCst).saturating_sub(before);
    eprintln!(
        "flooded call ended after {took:.1?}: {:?}; host RSS grew at most {} KiB; the other sandbox answered {answered} calls meanwhile",
        flooded
            .as_ref()
            .map(|o| (o.stdout.len(), o.result.stdout.truncated())),
        grown / 1024
    );
    match &flooded {
        Err(AgentError::Flood(why)) => eprintln!("cut off: {why}"),
        Ok(out) => assert!(
            out.result.stdout.truncated(),
            "a flood that ended must be truncated"
        ),
        Err(other) => panic!("expected a truncation or a protocol error, got {other}"),
    }
    assert!(
        grown < RSS_BOUND_BYTES,
        "the host grew {grown} bytes under the flood"
    );
    assert!(
        client.is_closed(),
        "the connection of a guest that keeps sending is closed"
    );
    assert_eq!(answered, 5);
    let _ = vm.stop(Duration::from_secs(10)).await;
    other.destroy().await;
}

/// A registry's sandbox: either restored from the template, or the
/// impostor that stopped reading.
#[expect(
    clippy::large_enum_variant,
    reason = "a handful live at a time, in a test"
)]
enum TestBox {
    Restored(Sandbox),
    Stalled {
        vm: Vm,
        client: AgentClient,
        _dir: tempfile::TempDir,
    },
}

impl TestBox {
    fn client(&self) -> &AgentClient {
        match self {
            TestBox::Restored(s) => s.client(),
            TestBox::Stalled { client, .. } => client,
        }
    }
}

/// This test's registry never pauses (its `pause_after` is zero).
impl Hosted for TestBox {
    type Saved = ();

    async fn pause(self) -> Result<(), (anyhow::Error, Option<Self>)> {
        Err((
            anyhow::anyhow!("this test's sandboxes are not paused"),
            Some(self),
        ))
    }

    fn saved_bytes(_: &()) -> u64 {
        0
    }

    fn discard(_: ()) {}

    fn saved_name(_: &()) -> String {
        String::new()
    }

    fn pid(&self) -> Option<u32> {
        match self {
            TestBox::Restored(s) => Some(s.pid()),
            TestBox::Stalled { vm, .. } => Some(vm.pid()),
        }
    }

    fn kill_switch(&self) -> KillSwitch {
        let killer = match self {
            TestBox::Restored(s) => s.vm_kill_switch(),
            TestBox::Stalled { vm, .. } => vm.killer(),
        };
        KillSwitch::new(move || killer.kill())
    }

    async fn destroy(self) {
        match self {
            TestBox::Restored(s) => s.destroy().await,
            TestBox::Stalled { mut vm, .. } => {
                let _ = vm.stop(Duration::from_secs(5)).await;
            }
        }
    }
}

/// Hands out the stalled impostor first, then restored sandboxes.
struct Boxes {
    stalled: Mutex<Option<TestBox>>,
    template: airlock::template::Template,
}

impl Provider for Boxes {
    type Sandbox = TestBox;

    async fn take(&self, _image: Option<&str>) -> anyhow::Result<TestBox> {
        if let Some(stalled) = self.stalled.lock().await.take() {
            return Ok(stalled);
        }
        Ok(TestBox::Restored(
            Sandbox::restore(&self.template, exe()).await?,
        ))
    }

    async fn ready(&self) -> usize {
        0
    }

    async fn close(&self) {}

    fn load_saved(&self, _: &str) -> anyhow::Result<()> {
        anyhow::bail!("the test boxes are never paused")
    }

    async fn resume(&self, _: &()) -> anyhow::Result<TestBox> {
        anyhow::bail!("this test's sandboxes are not paused")
    }
}

fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            s.rsplit_once(')')
                .is_some_and(|(_, rest)| !rest.trim_start().starts_with('Z'))
        })
        .unwrap_or(false)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guest_that_grants_no_credit_holds_up_neither_the_reaper_nor_shutdown() {
    const IDLE: Duration = Duration::from_secs(15);
    let template = common::template().await;
    let dir = tempfile::tempdir().unwrap();
    let (vm, client) = impostor("stall", dir.path()).await;
    let stalled_pid = vm.pid();
    let boxes = Arc::new(Boxes {
        stalled: Mutex::new(Some(TestBox::Stalled {
            vm,
            client,
            _dir: dir,
        })),
        template,
    });
    let limits = Limits {
        idle_timeout: IDLE,
        ..Limits::default()
    };
    let registry = Registry::start(boxes, limits, 256, Arc::new(Metrics::new()));

    // A call into the stalled guest: 8 MiB that it never reads.
    let stalled = registry
        .create_explicit("p", None)
        .await
        .expect("the stalled sandbox");
    let stalled_id = stalled.id().to_string();
    let write = tokio::spawn(async move {
        let request = WriteFile {
            path: "/home/sandbox/big".into(),
            mode: None,
            create_parents: false,
            append: false,
        };
        let result = stalled
            .sandbox()
            .client()
            .write_file(request, vec![7u8; 8 << 20])
            .await;
        drop(stalled);
        result
    });

    // Another sandbox, used once, then left idle.
    let other = registry
        .create_explicit("q", None)
        .await
        .expect("another sandbox");
    let other_id = other.id().to_string();
    other
        .sandbox()
        .client()
        .exec(shell("echo hi"), Vec::new())
        .await
        .expect("it runs");
    drop(other);
    let idle_since = Instant::now();
    // Looking it up would count as use: watch the live count instead.
    while registry.active() > 1 {
        assert!(
            idle_since.elapsed() < IDLE + Duration::from_secs(20),
            "the idle sandbox outlived its timeout while another guest stalled"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let err = registry.get(&other_id, "q").await.err().expect("expired");
    assert!(err.to_string().contains("idle timeout"), "{err}");
    eprintln!(
        "the idle sandbox expired {:.1?} after its last use",
        idle_since.elapsed()
    );
    assert!(!write.is_finished(), "the guest really stalls the write");
    assert!(alive(stalled_pid));

    let shutdown_started = Instant::now();
    registry.shutdown().await;
    eprintln!("shutdown took {:.1?}", shutdown_started.elapsed());
    assert!(
        !alive(stalled_pid),
        "the stalled guest's VMM is gone after shutdown"
    );
    let result = tokio::time::timeout(Duration::from_secs(30), write)
        .await
        .expect("the stalled call ends once its VM is killed")
        .unwrap();
    assert!(result.is_err(), "the stalled write cannot have succeeded");
    let err = registry
        .get(&stalled_id, "p")
        .await
        .err()
        .expect("shut down");
    eprintln!("after shutdown: {err}");
}

//! The host's agent client against a hostile guest agent: a fake agent on
//! a Unix socket answers the client's Hello (with a good HelloOk, or with
//! fuzz bytes) and its one request with fuzz bytes, then closes. The client
//! runs one typed operation (exec, run_code, files, limits, ...) through
//! its real reader task, request routing, budgets and reply checks.
//!
//! Input: `op | flags | limit | stream`. flags & 1: the handshake is
//! answered with a good HelloOk, and all of `stream` answers the request;
//! otherwise `stream` answers the Hello too.
#![no_main]

use std::cell::RefCell;
use std::path::PathBuf;
use std::time::Duration;

use airlock::agent_client::AgentClient;
use airlock_fuzz::{Input, block_on};
use airlock_protocol::{
    Command, Exec, Frame, FrameReader, HelloOk, Language, ListFiles, Message, OutputLimits,
    PROTOCOL_VERSION, RunCode, SetLimits, WriteFile,
};
use libfuzzer_sys::fuzz_target;
use tokio::io::AsyncWriteExt;
use tokio::net::UnixListener;

struct Agent {
    _dir: tempfile::TempDir,
    path: PathBuf,
    listener: UnixListener,
}

thread_local! {
    static AGENT: RefCell<Option<Agent>> = const { RefCell::new(None) };
}

const LIMIT: Duration = Duration::from_secs(5);

async fn run(agent: &Agent, op: u8, flags: u8, limit: u64, stream: Vec<u8>) {
    let good_hello = flags & 1 != 0;
    let fake = async {
        let Ok((s, _)) = agent.listener.accept().await else {
            return;
        };
        let (read, mut write) = s.into_split();
        let mut frames = FrameReader::new(read);
        let Ok(Some(hello)) = frames.read_frame().await else {
            return;
        };
        if good_hello {
            let ok = Message::HelloOk(HelloOk {
                agent_version: "fuzz".into(),
                protocol_version: PROTOCOL_VERSION,
            });
            let bytes = Frame::new(hello.request_id, ok).encode().unwrap();
            if write.write_all(&bytes).await.is_err() {
                return;
            }
            // The reply comes once the request is in, as from an agent.
            if !matches!(frames.read_frame().await, Ok(Some(_))) {
                return;
            }
        }
        let _ = write.write_all(&stream).await;
        let _ = write.shutdown().await;
        // Read whatever else the client sends until it goes.
        while let Ok(Some(_)) = frames.read_frame().await {}
    };
    let client = async {
        let Ok(c) = AgentClient::connect_unix(&agent.path, LIMIT).await else {
            return;
        };
        let limits = OutputLimits {
            stdout_max: Some(limit),
            stderr_max: Some(limit / 2),
        };
        match op % 14 {
            0 => drop(c.ping().await),
            1 => {
                let exec = Exec {
                    command: Command::Shell("true".into()),
                    cwd: None,
                    env: Vec::new(),
                    timeout_ms: Some(1000),
                    output: limits,
                };
                drop(c.exec(exec, Vec::new()).await);
            }
            2 => {
                let run = RunCode {
                    language: Language::Python,
                    timeout_ms: Some(1000),
                    output: limits,
                };
                if let Ok(call) = c.start_run_code(run, "1").await {
                    drop(call.finish_run(|_| {}).await);
                }
            }
            3 => drop(c.read_file("/f", limit).await),
            4 => drop(c.read_file_range("/f", limit, Some(limit)).await),
            5 => {
                let list = ListFiles {
                    path: "/".into(),
                    recursive: true,
                    max_depth: None,
                    max_entries: None,
                };
                drop(c.list_files(list).await);
            }
            6 => drop(c.stat_file("/f").await),
            7 => {
                let write = WriteFile {
                    path: "/f".into(),
                    mode: None,
                    create_parents: false,
                    append: false,
                };
                drop(c.write_file(write, vec![1, 2, 3]).await);
            }
            8 => drop(c.remove_file("/f", true).await),
            9 => drop(c.warm_status(Some(Duration::from_millis(10))).await),
            10 => drop(c.set_limits(SetLimits::default()).await),
            11 => drop(c.limits().await),
            12 => drop(c.refresh(Some(1), vec![0; 32]).await),
            _ => drop(c.reset(None).await),
        }
        let _ = c.is_closed();
    };
    let both = async { tokio::join!(fake, client) };
    tokio::time::timeout(Duration::from_secs(20), both)
        .await
        .expect("the client hung on a closed connection");
}

fuzz_target!(|data: &[u8]| {
    let mut input = Input(data);
    let op = input.u8();
    let flags = input.u8();
    let limit = u64::from(input.u8()) * 64;
    let stream = input.rest().to_vec();
    AGENT.with(|a| {
        let mut a = a.borrow_mut();
        block_on(async {
            let agent = a.get_or_insert_with(|| {
                let dir = tempfile::tempdir().unwrap();
                let path = dir.path().join("agent.sock");
                let listener = UnixListener::bind(&path).unwrap();
                Agent {
                    _dir: dir,
                    path,
                    listener,
                }
            });
            run(agent, op, flags, limit, stream).await;
        });
    });
});

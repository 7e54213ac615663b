//! The exec operation: one command, as the sandbox user, in its own session
//! and cgroup; output streamed with limits; the whole tree killed on timeout
//! or cancel.

use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::ExitStatus;
use std::time::{Duration, Instant};

use airlock_protocol::{Command, ErrorCode, Exec, ExecResult, MAX_STDIN_LEN, Message, Stream};

use crate::cgroup::Cgroup;
use crate::config::merge_env;
use crate::ops::Ops;
use crate::pipe::{PipeReader, PipeWriter};
use crate::request::{self, Cancel, Capture, Reply};
use crate::spawn::{self, SpawnSpec};
use crate::sys;

/// Read size for output pipes (also the largest Output frame).
pub const READ_CHUNK: usize = 64 << 10;
/// Pipe buffer for output: fewer wake-ups under bulk output.
pub const PIPE_SIZE: usize = 1 << 20;
/// How long to wait for a killed process to be reaped before answering anyway.
const REAP_GRACE: Duration = Duration::from_secs(10);
/// Reads of leftover output after the process exited (writers that outlive it
/// must not keep the call open).
const MAX_DRAIN_READS: usize = 64;

pub async fn exec(
    ops: &Ops,
    req: Exec,
    stdin: Vec<u8>,
    reply: &Reply,
    mut cancel: Cancel,
) -> Message {
    let started = Instant::now();
    let (stdout_max, stderr_max) = match request::output_limits(&req.output) {
        Ok(l) => l,
        Err(e) => return Message::error(ErrorCode::BadRequest, e),
    };
    let timeout = match request::timeout(req.timeout_ms) {
        Ok(t) => t,
        Err(e) => return Message::error(ErrorCode::BadRequest, e),
    };
    if stdin.len() > MAX_STDIN_LEN {
        return Message::error(ErrorCode::TooLarge, "stdin is too large");
    }
    let argv = match req.command {
        Command::Argv(argv) if argv.is_empty() => {
            return Message::error(ErrorCode::BadRequest, "argv is empty");
        }
        Command::Argv(argv) => argv,
        Command::Shell(script) => match &ops.config.bash {
            Some(bash) => vec![bash.clone(), "-c".into(), script],
            None => return Message::error(ErrorCode::Unsupported, ops.config.lacks_shell()),
        },
    };
    let cwd = match &req.cwd {
        Some(dir) => ops.resolve(dir),
        None => ops.config.home.clone(),
    };
    if !cwd.is_dir() {
        return Message::error(
            ErrorCode::NotFound,
            format!("working directory {} does not exist", cwd.display()),
        );
    }
    let mut env = merge_env(ops.config.base_env(), &req.env);
    env.push(("PWD".into(), cwd.to_string_lossy().into_owned()));

    let oom_before = ops.oom_kills();
    let group = match ops.exec_group() {
        Ok(g) => g,
        Err(e) => {
            return Message::error(ErrorCode::Internal, format!("cannot create a cgroup: {e}"));
        }
    };
    let program = argv[0].clone();
    let started_proc = start(ops, argv, env, &cwd, group.as_ref(), !stdin.is_empty());
    let (child, mut stdout, mut stderr, stdin_pipe) = match started_proc {
        Ok(s) => s,
        Err(e) => {
            if let Some(g) = group {
                ops.release_group(g);
            }
            let code = match e.kind() {
                std::io::ErrorKind::NotFound => ErrorCode::NotFound,
                std::io::ErrorKind::PermissionDenied => ErrorCode::PermissionDenied,
                std::io::ErrorKind::InvalidInput => ErrorCode::BadRequest,
                _ => ErrorCode::Internal,
            };
            return Message::error(code, spawn::describe_spawn_error(&program, &e));
        }
    };
    // Stdin is fed by its own task, so that a child that does not read it
    // cannot stall the output.
    let feeder = stdin_pipe.map(|pipe| {
        tokio::spawn(async move {
            let _ = pipe.write_all(&stdin).await;
            // Dropping the pipe closes it: the child sees end of input.
        })
    });

    let mut out_cap = Capture::new(stdout_max);
    let mut err_cap = Capture::new(stderr_max);
    let mut out_buf = vec![0u8; READ_CHUNK];
    let mut err_buf = vec![0u8; READ_CHUNK];
    // One timer for the whole call (see interp.rs).
    let deadline = tokio::time::sleep_until(tokio::time::Instant::from_std(started + timeout));
    tokio::pin!(deadline);
    let mut exit = child.exit;
    let mut status: Option<ExitStatus> = None;
    let (mut timed_out, mut cancelled) = (false, false);
    let mut killed_at: Option<tokio::time::Instant> = None;
    let mut connected = true;

    let kill = |group: &Option<Cgroup>| match group {
        Some(g) => g.kill(),
        None => sys::kill_group(child.pid, libc::SIGKILL),
    };

    while status.is_none() {
        tokio::select! {
            r = stdout.read(&mut out_buf) => {
                if let Ok(n) = r {
                    let keep = out_cap.take(&out_buf[..n]);
                    if !keep.is_empty() && connected {
                        connected = reply.output(Stream::Stdout, keep).await;
                    }
                }
            }
            r = stderr.read(&mut err_buf) => {
                if let Ok(n) = r {
                    let keep = err_cap.take(&err_buf[..n]);
                    if !keep.is_empty() && connected {
                        connected = reply.output(Stream::Stderr, keep).await;
                    }
                }
            }
            s = &mut exit => {
                // A dropped sender means the reaper lost the child (it
                // cannot happen while we own it): report no status.
                status = Some(s.unwrap_or(ExitStatus::from_raw(0xff00)));
            }
            _ = &mut deadline, if killed_at.is_none() => {
                timed_out = true;
                kill(&group);
                killed_at = Some(tokio::time::Instant::now());
            }
            _ = cancel.wait(), if killed_at.is_none() => {
                cancelled = true;
                kill(&group);
                killed_at = Some(tokio::time::Instant::now());
            }
            _ = sleep_until_opt(killed_at.map(|t| t + REAP_GRACE)) => break,
        }
    }
    // The call is over: what the command left running in the background
    // ends with it (a backgrounded fork bomb, a forgotten server). Long-lived
    // background jobs belong in the bash session of run_code.
    if killed_at.is_none() {
        kill(&group);
    }
    // Whatever the process wrote before it exited is in the pipes: take it
    // without waiting for writers it left behind (their output is dropped).
    for (pipe, buf, cap, stream) in [
        (&mut stdout, &mut out_buf, &mut out_cap, Stream::Stdout),
        (&mut stderr, &mut err_buf, &mut err_cap, Stream::Stderr),
    ] {
        for _ in 0..MAX_DRAIN_READS {
            match pipe.read_now(buf) {
                Some(Ok(n)) if n > 0 => {
                    let keep = cap.take(&buf[..n]);
                    if !keep.is_empty() && connected {
                        connected = reply.output(stream, keep).await;
                    }
                }
                _ => break,
            }
        }
    }
    if let Some(f) = feeder {
        f.abort();
    }
    if let Some(g) = group {
        ops.release_group(g);
    }
    let (exit_code, signal) = match status {
        Some(s) => (s.code(), s.signal()),
        None => (None, None),
    };
    Message::ExecResult(ExecResult {
        exit_code,
        signal,
        duration_ms: started.elapsed().as_millis() as u64,
        timed_out,
        cancelled,
        oom_killed: ops.oom_kills() > oom_before,
        stdout: out_cap.stats,
        stderr: err_cap.stats,
    })
}

async fn sleep_until_opt(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

type Started = (spawn::Spawned, PipeReader, PipeReader, Option<PipeWriter>);

fn start(
    ops: &Ops,
    argv: Vec<String>,
    env: Vec<(String, String)>,
    cwd: &Path,
    group: Option<&Cgroup>,
    with_stdin: bool,
) -> std::io::Result<Started> {
    let (out_r, out_w) = sys::pipe()?;
    let (err_r, err_w) = sys::pipe()?;
    sys::set_pipe_size(&out_r, PIPE_SIZE);
    sys::set_pipe_size(&err_r, PIPE_SIZE);
    let (stdin_child, stdin_ours) = if with_stdin {
        let (r, w) = sys::pipe()?;
        (Some(r), Some(PipeWriter::new(w)?))
    } else {
        (None, None)
    };
    let stdout = PipeReader::new(out_r)?;
    let stderr = PipeReader::new(err_r)?;
    let spawned = spawn::spawn(
        &ops.reaper,
        SpawnSpec {
            argv,
            env,
            cwd: cwd.to_path_buf(),
            creds: ops.config.creds,
            cgroup_procs: group.map(Cgroup::procs_file).transpose()?,
            stdin: stdin_child,
            stdout: out_w,
            stderr: err_w,
            extra_fds: Vec::new(),
            oom_score_adj: ops.config.reset_oom_score.then_some(&b"0"[..]),
        },
    )?;
    Ok((spawned, stdout, stderr, stdin_ours))
}

//! Warm, stateful interpreters for run_code: one long-lived process per
//! language (python3, node, bash), started when the agent starts, each
//! running a small driver (drivers/) that executes cells in a persistent
//! namespace. No interpreter process is started on the run_code path, except
//! for one left out of the warm set (`Config::warm`), which starts on its
//! first call. An interpreter the image lacks (see `image`) is never started:
//! its calls are refused, naming the image.
//!
//! Each interpreter runs as the sandbox user in its own session and cgroup.
//! Its fds 1 and 2 are pipes the agent reads (so subprocess output is
//! captured too); fd 3 carries commands to the driver and fd 4 events back,
//! one JSON object per line.
//!
//! A session's process sits behind an async mutex: a start (warm-up) holds
//! it until the driver says "ready", and a run holds it for the cell, so
//! calls queue in order and wait for warm-up, each bounded by its own
//! timeout. On timeout or cancel the interpreter is interrupted (SIGINT to
//! its process group); if it does not answer within a grace period its
//! cgroup is killed and a fresh one starts in the background, and the result
//! says that the state was lost.

use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use airlock_protocol::{
    CodeError, ErrorCode, Image, ImageFormat, InterpreterState, InterpreterStatus, Language,
    MAX_CODE_LEN, MAX_IMAGE_LEN, MAX_IMAGES_PER_RUN, Message, RunCode, RunCodeResult, Stream,
    WarmStatusReply,
};
use base64::Engine;
use serde::Deserialize;
use tokio::sync::{Mutex, OwnedMutexGuard, watch};

use crate::cgroup::Cgroup;
use crate::config::{Config, NODE_NO_AVX_FLAGS, merge_env};
use crate::exec::{PIPE_SIZE, READ_CHUNK};
use crate::log::log;
use crate::ops::Ops;
use crate::pipe::{PipeReader, PipeWriter};
use crate::request::{self, Cancel, Capture, Reply};
use crate::spawn::{self, SpawnSpec};
use crate::sys;

const DRIVER_PY: &str = include_str!("drivers/driver.py");
const DRIVER_JS: &str = include_str!("drivers/driver.js");
const DRIVER_SH: &str = include_str!("drivers/driver.sh");

/// How long a start may take to become warm (node takes over a minute on a
/// software-nested hypervisor).
const WARM_TIMEOUT: Duration = Duration::from_secs(30 * 60);
/// After SIGINT, how long a cell has to stop before the interpreter is killed.
const INTERRUPT_GRACE: Duration = Duration::from_secs(2);
/// How long a killed interpreter may take to be reaped.
const REAP_GRACE: Duration = Duration::from_secs(10);
/// Reset and reseed commands must be answered within this.
const CONTROL_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest event line from a driver (an image is base64 in one line).
const MAX_LINE: usize = 16 << 20;
/// Stderr kept from a failed start, for its error message.
const START_TAIL: usize = 2048;
/// The image's python_imports for driver.py (comma-separated module names).
const PYTHON_IMPORTS_VAR: &str = "AIRLOCK_PYTHON_IMPORTS";

pub struct Interpreters {
    sessions: Vec<Arc<Session>>,
}

struct Session {
    lang: Language,
    /// `None`: the image has no such interpreter.
    argv: Option<Vec<String>>,
    /// Where bash's cells are written.
    cell_path: PathBuf,
    inner: Arc<Mutex<Option<Proc>>>,
    status: watch::Sender<Status>,
    generation: AtomicU64,
}

#[derive(Debug, Clone)]
struct Status {
    state: InterpreterState,
    warm_after_ms: Option<u64>,
    detail: Option<String>,
    starts: u32,
}

struct Proc {
    generation: u64,
    pid: i32,
    group: Option<Cgroup>,
    ctl_in: PipeWriter,
    ctl_out: LineReader,
    stdout: PipeReader,
    stderr: PipeReader,
    exited: watch::Receiver<Option<ExitStatus>>,
}

impl Proc {
    fn is_dead(&self) -> bool {
        self.exited.borrow().is_some()
    }

    fn exit_status(&self) -> Option<ExitStatus> {
        *self.exited.borrow()
    }

    fn kill(&self) {
        match &self.group {
            Some(g) => g.kill(),
            None => sys::kill_group(self.pid, libc::SIGKILL),
        }
    }

    /// Kills the interpreter and waits (bounded) until it has been reaped.
    async fn kill_and_reap(&mut self) {
        self.kill();
        let _ = tokio::time::timeout(REAP_GRACE, self.exited.wait_for(Option::is_some)).await;
        if let Some(g) = &self.group {
            g.remove();
        }
    }
}

/// One event line from a driver.
#[derive(Debug, Deserialize)]
struct Event {
    ev: String,
    #[serde(default)]
    status: Option<i64>,
    #[serde(default)]
    error: Option<CodeError>,
    #[serde(default)]
    exited: bool,
    #[serde(default)]
    width: Option<u32>,
    #[serde(default)]
    height: Option<u32>,
    #[serde(default)]
    data: Option<String>,
    #[serde(default)]
    detail: Option<String>,
    #[serde(default)]
    message: Option<String>,
}

/// How a cell ended.
enum Ending {
    Done {
        status: i64,
        error: Option<CodeError>,
        exited: bool,
    },
    /// The interpreter died (or was killed) before answering.
    Died,
    /// The driver broke its protocol.
    Broken(String),
}

impl Interpreters {
    /// Writes the drivers into the run directory; nothing starts yet.
    pub fn new(config: &Config) -> Interpreters {
        if let Err(e) = write_drivers(&config.run_dir) {
            log!(
                "cannot write the interpreter drivers to {}: {e}",
                config.run_dir.display()
            );
        }
        let dir = &config.run_dir;
        let file = |name: &str| dir.join(name).to_string_lossy().into_owned();
        let cell_path = dir.join("cell.sh");
        let sessions = Language::ALL
            .into_iter()
            .map(|lang| {
                let program = config.program(lang).map(str::to_string);
                let argv = program.map(|program| match lang {
                    Language::Python => vec![program, file("driver.py")],
                    // The REPL's top-level-await rewriter lives in node's internals.
                    // --single-threaded: V8's background GC and compiler threads
                    // crash node on a software-nested KVM (kvm_pvm; seen as a
                    // segfault in GC marking, with our VMM and with QEMU alike), and
                    // a REPL gains little from them; fewer threads also mean fewer
                    // guest wake-ups.
                    Language::Javascript => {
                        let mut argv = vec![program, "--single-threaded".into()];
                        if config.no_avx {
                            argv.extend(NODE_NO_AVX_FLAGS.iter().map(|f| f.to_string()));
                        }
                        argv.extend(["--expose-internals".into(), file("driver.js")]);
                        argv
                    }
                    _ => vec![
                        program,
                        "--noprofile".into(),
                        "--norc".into(),
                        file("driver.sh"),
                        cell_path.to_string_lossy().into_owned(),
                    ],
                });
                // Unavailable for good: never Starting, so nobody waits on it.
                let (state, detail) = match argv {
                    Some(_) => (InterpreterState::Starting, None),
                    None => (InterpreterState::Unavailable, Some(config.lacks(lang))),
                };
                Arc::new(Session {
                    lang,
                    argv,
                    cell_path: cell_path.clone(),
                    inner: Arc::new(Mutex::new(None)),
                    status: watch::Sender::new(Status {
                        state,
                        warm_after_ms: None,
                        detail,
                        starts: 0,
                    }),
                    generation: AtomicU64::new(0),
                })
            })
            .collect();
        Interpreters { sessions }
    }

    /// Starts the interpreters of `eager` in the background, one after the
    /// other in that order (on one vCPU, starting them at once only makes
    /// each of them late). The others start on their first call.
    pub fn start_all(&self, ops: &Arc<Ops>, eager: &[Language]) {
        let mut queue = Vec::new();
        for session in &self.sessions {
            if session.argv.is_none() {
                continue;
            }
            if eager.contains(&session.lang) {
                // Taken now, so that calls queue behind the start.
                let guard = session.inner.clone().try_lock_owned().ok();
                queue.push((
                    eager.iter().position(|l| *l == session.lang),
                    session.clone(),
                    guard,
                ));
            } else {
                session.set_status(|s| s.state = InterpreterState::Stopped);
            }
        }
        queue.sort_by_key(|(order, _, _)| *order);
        let ops = ops.clone();
        tokio::spawn(async move {
            for (_, session, guard) in queue {
                let guard = match guard {
                    Some(g) => g,
                    None => session.inner.clone().lock_owned().await,
                };
                session.clone().start(ops.clone(), guard).await;
            }
        });
    }

    fn get(&self, lang: Language) -> Option<&Arc<Session>> {
        self.sessions.iter().find(|s| s.lang == lang)
    }

    pub async fn run(
        &self,
        ops: &Arc<Ops>,
        req: RunCode,
        code: Vec<u8>,
        reply: &Reply,
        mut cancel: Cancel,
    ) -> Message {
        let started = Instant::now();
        let Some(session) = self.get(req.language) else {
            return Message::error(
                ErrorCode::BadRequest,
                "unsupported language (use python, javascript or bash)",
            );
        };
        if session.argv.is_none() {
            return Message::error(ErrorCode::Unsupported, ops.config.lacks(session.lang));
        }
        let (stdout_max, stderr_max) = match request::output_limits(&req.output) {
            Ok(l) => l,
            Err(e) => return Message::error(ErrorCode::BadRequest, e),
        };
        let timeout = match request::timeout(req.timeout_ms) {
            Ok(t) => t,
            Err(e) => return Message::error(ErrorCode::BadRequest, e),
        };
        if code.len() > MAX_CODE_LEN {
            return Message::error(
                ErrorCode::TooLarge,
                format!(
                    "the code is {} bytes, more than the limit of {MAX_CODE_LEN}",
                    code.len()
                ),
            );
        }
        let (command, bash_code) = match session.lang {
            Language::Bash => (None, code),
            _ => match String::from_utf8(code) {
                Ok(text) => (
                    Some(control_line(
                        &serde_json::json!({"op": "run", "code": text}),
                    )),
                    Vec::new(),
                ),
                Err(_) => {
                    return Message::error(ErrorCode::BadRequest, "the code is not valid UTF-8");
                }
            },
        };
        let deadline = started + timeout;
        let mut guard = match session.acquire(ops, deadline, timeout, &mut cancel).await {
            Ok(guard) => guard,
            Err(message) => return message,
        };
        let oom_before = ops.oom_kills();
        let Some(proc) = guard.as_mut() else {
            return Message::error(ErrorCode::Internal, "no interpreter after acquiring it");
        };

        let sent = match command {
            Some(line) => proc.ctl_in.write_all(&line).await,
            None => match std::fs::write(&session.cell_path, &bash_code) {
                Ok(()) => proc.ctl_in.write_all(b"r").await,
                Err(e) => {
                    return Message::error(
                        ErrorCode::Internal,
                        format!("cannot write the cell: {e}"),
                    );
                }
            },
        };

        let mut out_cap = Capture::new(stdout_max);
        let mut err_cap = Capture::new(stderr_max);
        let mut out_buf = vec![0u8; READ_CHUNK];
        let mut err_buf = vec![0u8; READ_CHUNK];
        // One timer for the whole call (a timer registered anew on every
        // turn of the loop would wake the runtime each time).
        let deadline = tokio::time::sleep_until(tokio::time::Instant::from_std(deadline));
        tokio::pin!(deadline);
        let (mut timed_out, mut cancelled) = (false, false);
        let mut interrupted_at: Option<tokio::time::Instant> = None;
        let mut connected = true;
        let (mut images, mut images_dropped) = (0u32, 0u32);
        let mut killed = false;

        let ending = if sent.is_err() {
            Ending::Died
        } else {
            loop {
                tokio::select! {
                    r = proc.stdout.read(&mut out_buf) => {
                        if let Ok(n) = r {
                            let keep = out_cap.take(&out_buf[..n]);
                            if !keep.is_empty() && connected {
                                connected = reply.output(Stream::Stdout, keep).await;
                            }
                        }
                    }
                    r = proc.stderr.read(&mut err_buf) => {
                        if let Ok(n) = r {
                            let keep = err_cap.take(&err_buf[..n]);
                            if !keep.is_empty() && connected {
                                connected = reply.output(Stream::Stderr, keep).await;
                            }
                        }
                    }
                    line = proc.ctl_out.next_line() => {
                        let event = match line {
                            Ok(Some(line)) => match serde_json::from_slice::<Event>(&line) {
                                Ok(event) => event,
                                Err(e) => break Ending::Broken(format!("unreadable event: {e}")),
                            },
                            // Closed: the process is exiting; the exit
                            // branch will see it.
                            Ok(None) => {
                                let _ = tokio::time::timeout(REAP_GRACE, proc.exited.wait_for(Option::is_some)).await;
                                break Ending::Died;
                            }
                            Err(e) => break Ending::Broken(format!("control pipe: {e}")),
                        };
                        match event.ev.as_str() {
                            "done" => break Ending::Done {
                                status: event.status.unwrap_or(0),
                                error: event.error,
                                exited: event.exited,
                            },
                            "image" => {
                                let bytes = event
                                    .data
                                    .and_then(|d| base64::engine::general_purpose::STANDARD.decode(d).ok());
                                match bytes {
                                    Some(bytes) if images < MAX_IMAGES_PER_RUN && bytes.len() <= MAX_IMAGE_LEN && connected => {
                                        images += 1;
                                        let image = Image {
                                            format: ImageFormat::Png,
                                            width: event.width,
                                            height: event.height,
                                        };
                                        connected = reply.event(Message::Image(image), bytes).await;
                                    }
                                    _ => images_dropped += 1,
                                }
                            }
                            _ => {}
                        }
                    }
                    _ = proc.exited.changed() => break Ending::Died,
                    _ = &mut deadline, if interrupted_at.is_none() => {
                        timed_out = true;
                        sys::kill_group(proc.pid, libc::SIGINT);
                        interrupted_at = Some(tokio::time::Instant::now());
                    }
                    _ = cancel.wait(), if interrupted_at.is_none() => {
                        cancelled = true;
                        sys::kill_group(proc.pid, libc::SIGINT);
                        interrupted_at = Some(tokio::time::Instant::now());
                    }
                    _ = sleep_until_opt(interrupted_at.map(|t| t + INTERRUPT_GRACE)) => {
                        killed = true;
                        proc.kill_and_reap().await;
                        break Ending::Died;
                    }
                }
            }
        };
        // Output written before "done" is in the pipes, and the runtime
        // already knows (its readiness was queued in epoll before "done"'s):
        // take it without a system call when there is none. After a death,
        // read for real.
        let died = !matches!(ending, Ending::Done { .. });
        for (pipe, buf, cap, stream) in [
            (&mut proc.stdout, &mut out_buf, &mut out_cap, Stream::Stdout),
            (&mut proc.stderr, &mut err_buf, &mut err_cap, Stream::Stderr),
        ] {
            for _ in 0..64 {
                let read = if died {
                    pipe.read_now(buf)
                } else {
                    pipe.read_if_ready(buf)
                };
                match read {
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

        let mut result = RunCodeResult {
            images,
            images_dropped,
            ..RunCodeResult::default()
        };
        let lost = match ending {
            Ending::Done {
                status,
                error,
                exited,
            } => {
                result.process.exit_code =
                    Some(status.clamp(i32::MIN as i64, i32::MAX as i64) as i32);
                result.error = error;
                exited
            }
            Ending::Died => true,
            Ending::Broken(why) => {
                log!("{} driver: {why}; restarting it", session.lang.name());
                true
            }
        };
        if lost {
            result.state_lost = true;
            if !killed {
                proc.kill_and_reap().await;
            }
            if let Some(status) = proc.exit_status()
                && result.process.exit_code.is_none()
            {
                result.process.exit_code = status.code();
                result.process.signal = status.signal();
            }
            *guard = None;
            // A fresh interpreter starts now, holding the session until it
            // is warm; the next call waits for it.
            let (session, ops) = (session.clone(), ops.clone());
            tokio::spawn(async move { session.start(ops, guard).await });
        }
        result.process.timed_out = timed_out;
        result.process.cancelled = cancelled;
        result.process.oom_killed = ops.oom_kills() > oom_before;
        result.process.stdout = out_cap.stats;
        result.process.stderr = err_cap.stats;
        result.process.duration_ms = started.elapsed().as_millis() as u64;
        Message::RunCodeResult(result)
    }

    /// Drops the state of one interpreter, or of all.
    pub async fn reset(&self, ops: &Arc<Ops>, lang: Option<Language>) -> Message {
        let chosen: Vec<&Arc<Session>> = match lang {
            Some(Language::Unknown) => {
                return Message::error(ErrorCode::BadRequest, "unsupported language");
            }
            Some(lang) => self.get(lang).into_iter().collect(),
            None => self.sessions.iter().collect(),
        };
        for session in chosen {
            if session.argv.is_none() {
                if lang.is_some() {
                    return Message::error(ErrorCode::Unsupported, ops.config.lacks(session.lang));
                }
                continue;
            }
            let mut guard = session.inner.clone().lock_owned().await;
            // Never started (not warmed at agent start): no state to drop,
            // and it still starts on first use.
            if guard.is_none() && session.status.borrow().state == InterpreterState::Stopped {
                continue;
            }
            let in_place = match guard.as_mut() {
                Some(proc) if !proc.is_dead() && session.lang != Language::Bash => {
                    let line = control_line(&serde_json::json!({"op": "reset"}));
                    control(proc, &line).await.is_ok()
                }
                _ => false,
            };
            if !in_place {
                // bash (no way to clear a shell in place), or an interpreter
                // that is not answering: start a new one.
                if let Some(proc) = guard.as_mut() {
                    proc.kill_and_reap().await;
                }
                *guard = None;
                let (session, ops) = (session.clone(), ops.clone());
                tokio::spawn(async move { session.start(ops, guard).await });
            }
        }
        Message::Done
    }

    /// Reseeds the generators of every warm, idle interpreter; returns the
    /// languages reseeded and why others were not.
    pub async fn reseed_all(&self) -> (Vec<Language>, Vec<String>, Vec<(String, u64)>) {
        // An interpreter the image lacks has nothing to reseed.
        let present = self.sessions.iter().filter(|s| s.argv.is_some());
        let attempts = present.map(|session| async move {
            let started = std::time::Instant::now();
            let result = Self::reseed_one(session).await;
            let took = (
                format!("reseed_{}", session.lang.name()),
                started.elapsed().as_micros() as u64,
            );
            (result, took)
        });
        let mut done = Vec::new();
        let mut warnings = Vec::new();
        let mut took = Vec::new();
        for (result, time) in futures_join_all(attempts).await {
            took.push(time);
            match result {
                Ok(lang) => done.push(lang),
                Err(w) => warnings.push(w),
            }
        }
        (done, warnings, took)
    }

    async fn reseed_one(session: &Session) -> Result<Language, String> {
        {
            let Ok(mut guard) = session.inner.clone().try_lock_owned() else {
                return Err(format!(
                    "{} is busy or starting: not reseeded",
                    session.lang.name()
                ));
            };
            let Some(proc) = guard.as_mut().filter(|p| !p.is_dead()) else {
                return Err(format!(
                    "{} is not running: not reseeded",
                    session.lang.name()
                ));
            };
            let line = match session.lang {
                Language::Bash => b"z".to_vec(),
                _ => control_line(&serde_json::json!({"op": "reseed"})),
            };
            control(proc, &line)
                .await
                .map(|()| session.lang)
                .map_err(|e| format!("{}: reseeding failed: {e}", session.lang.name()))
        }
    }

    pub async fn warm_status(&self, wait_ms: Option<u64>) -> Message {
        if let Some(ms) = wait_ms {
            let all = async {
                for session in &self.sessions {
                    let mut rx = session.status.subscribe();
                    let _ = rx.wait_for(|s| s.state != InterpreterState::Starting).await;
                }
            };
            let _ = tokio::time::timeout(Duration::from_millis(ms), all).await;
        }
        Message::WarmStatusReply(WarmStatusReply {
            interpreters: self
                .sessions
                .iter()
                .map(|s| {
                    let st = s.status.borrow().clone();
                    InterpreterStatus {
                        language: s.lang,
                        state: st.state,
                        warm_after_ms: st.warm_after_ms,
                        detail: st.detail,
                        starts: st.starts,
                    }
                })
                .collect(),
        })
    }
}

/// Runs futures concurrently on this task (no extra crate for join_all).
async fn futures_join_all<F: std::future::Future>(
    futures: impl IntoIterator<Item = F>,
) -> Vec<F::Output> {
    let mut pinned: Vec<_> = futures.into_iter().map(Box::pin).collect();
    let mut results: Vec<Option<F::Output>> = pinned.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (fut, slot) in pinned.iter_mut().zip(results.iter_mut()) {
            if slot.is_none() {
                match fut.as_mut().poll(cx) {
                    std::task::Poll::Ready(v) => *slot = Some(v),
                    std::task::Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            std::task::Poll::Pending
        } else {
            std::task::Poll::Ready(())
        }
    })
    .await;
    results
        .into_iter()
        .map(|r| r.expect("every future completed"))
        .collect()
}

impl Session {
    fn set_status(&self, f: impl FnOnce(&mut Status)) {
        self.status.send_modify(f);
    }

    /// A live interpreter, waiting for warm-up and earlier calls; starts one
    /// (once) if there is none.
    async fn acquire(
        self: &Arc<Self>,
        ops: &Arc<Ops>,
        deadline: Instant,
        timeout: Duration,
        cancel: &mut Cancel,
    ) -> Result<OwnedMutexGuard<Option<Proc>>, Message> {
        let mut restarted = false;
        loop {
            // An idle interpreter is taken at once, without arming a timer.
            let ready = self.inner.clone().try_lock_owned().ok();
            let guard = if let Some(guard) = ready {
                guard
            } else {
                tokio::select! {
                g = self.inner.clone().lock_owned() => g,
                _ = tokio::time::sleep_until(deadline.into()) => {
                    let st = self.status.borrow().clone();
                    let msg = match st.state {
                        InterpreterState::Starting => format!(
                            "the {} interpreter did not become ready within the {:.1} s timeout \
                             (it is still starting); try again",
                            self.lang.name(),
                            timeout.as_secs_f64()
                        ),
                        _ => format!(
                            "the {} interpreter is busy with an earlier call; \
                             the {:.1} s timeout passed while waiting",
                            self.lang.name(),
                            timeout.as_secs_f64()
                        ),
                    };
                    return Err(Message::error(ErrorCode::NotReady, msg));
                }
                _ = cancel.wait() => {
                    return Err(Message::error(ErrorCode::Cancelled, "cancelled while waiting for the interpreter"));
                }
                }
            };
            if guard.as_ref().is_some_and(|p| !p.is_dead()) {
                return Ok(guard);
            }
            if restarted {
                let detail = self.status.borrow().detail.clone().unwrap_or_default();
                return Err(Message::error(
                    ErrorCode::NotReady,
                    format!(
                        "the {} interpreter cannot start: {detail}",
                        self.lang.name()
                    ),
                ));
            }
            restarted = true;
            // Hand our hold to a start task; we queue behind it.
            let (session, ops) = (self.clone(), ops.clone());
            tokio::spawn(async move { session.start(ops, guard).await });
        }
    }

    /// Starts a fresh interpreter and waits for it to be warm, holding the
    /// session all along. Any previous process must be gone already.
    async fn start(self: Arc<Self>, ops: Arc<Ops>, mut guard: OwnedMutexGuard<Option<Proc>>) {
        // Callers check first; an interpreter the image lacks stays as it is.
        let Some(argv) = &self.argv else { return };
        let generation = self.generation.fetch_add(1, Ordering::Relaxed) + 1;
        self.set_status(|s| {
            s.state = InterpreterState::Starting;
            s.starts += 1;
            s.detail = None;
        });
        let t0 = Instant::now();
        let mut proc = match self.spawn(&ops, argv.clone(), generation) {
            Ok(proc) => proc,
            Err(e) => {
                let why = spawn::describe_spawn_error(&argv[0], &e);
                log!("{}: {why}", self.lang.name());
                self.set_status(|s| {
                    s.state = InterpreterState::Failed;
                    s.detail = Some(why);
                });
                return;
            }
        };
        let mut tail = Vec::new();
        let (mut out, mut err) = (vec![0u8; READ_CHUNK], vec![0u8; READ_CHUNK]);
        let warm = async {
            loop {
                tokio::select! {
                    line = proc.ctl_out.next_line() => match line {
                        Ok(Some(line)) => {
                            if let Ok(event) = serde_json::from_slice::<Event>(&line)
                                && event.ev == "ready"
                            {
                                return Ok(event.detail);
                            }
                        }
                        Ok(None) => {
                            let _ = tokio::time::timeout(REAP_GRACE, proc.exited.wait_for(Option::is_some)).await;
                            return Err(match proc.exit_status() {
                                Some(s) => format!("it exited while starting ({s})"),
                                None => "it closed its control pipe while starting".to_string(),
                            });
                        }
                        Err(e) => return Err(format!("control pipe: {e}")),
                    },
                    r = proc.stdout.read(&mut out) => keep_tail(&mut tail, &out, r),
                    r = proc.stderr.read(&mut err) => keep_tail(&mut tail, &err, r),
                    _ = proc.exited.changed() => {
                        let s = proc.exit_status().map(|s| s.to_string()).unwrap_or_default();
                        return Err(format!("it exited while starting ({s})"));
                    }
                    _ = tokio::time::sleep(WARM_TIMEOUT) => {
                        return Err(format!("not ready after {} s", WARM_TIMEOUT.as_secs()));
                    }
                }
            }
        };
        match warm.await {
            Ok(detail) => {
                let ms = t0.elapsed().as_millis() as u64;
                log!(
                    "{} warm in {:.1} s{}",
                    self.lang.name(),
                    ms as f64 / 1000.0,
                    detail
                        .as_deref()
                        .map(|d| format!(" ({d})"))
                        .unwrap_or_default()
                );
                self.set_status(|s| {
                    s.state = InterpreterState::Warm;
                    s.warm_after_ms = Some(ms);
                    s.detail = detail;
                });
                *guard = Some(proc);
            }
            Err(why) => {
                proc.kill_and_reap().await;
                let tail = String::from_utf8_lossy(&tail).trim().to_string();
                let why = if tail.is_empty() {
                    why
                } else {
                    format!("{why}: {tail}")
                };
                log!("{} failed to start: {why}", self.lang.name());
                self.set_status(|s| {
                    s.state = InterpreterState::Failed;
                    s.detail = Some(why);
                });
            }
        }
    }

    fn spawn(
        self: &Arc<Self>,
        ops: &Arc<Ops>,
        argv: Vec<String>,
        generation: u64,
    ) -> std::io::Result<Proc> {
        let (out_r, out_w) = sys::pipe()?;
        let (err_r, err_w) = sys::pipe()?;
        let (in_r, in_w) = sys::pipe()?;
        let (ev_r, ev_w) = sys::pipe()?;
        for fd in [&out_r, &err_r, &in_w, &ev_r] {
            sys::set_pipe_size(fd, PIPE_SIZE);
        }
        let group = match &ops.sandbox {
            Some(sandbox) => Some(sandbox.group(self.lang.name())?),
            None => None,
        };
        let mut env = ops.config.base_env();
        env.push(("PWD".into(), ops.config.home.to_string_lossy().into_owned()));
        if self.lang == Language::Python && !ops.config.python_imports.is_empty() {
            // The driver takes this out of its environment before user code runs.
            env.push((
                PYTHON_IMPORTS_VAR.into(),
                ops.config.python_imports.join(","),
            ));
        }
        let env = merge_env(env, &[]);
        let spawned = spawn::spawn(
            &ops.reaper,
            SpawnSpec {
                argv,
                env,
                cwd: ops.config.home.clone(),
                creds: ops.config.creds,
                cgroup_procs: group.as_ref().map(Cgroup::procs_file).transpose()?,
                stdin: None,
                stdout: out_w,
                stderr: err_w,
                extra_fds: vec![in_r, ev_w],
                // Below exec'd commands: when the sandbox runs out of
                // memory, a runaway command dies before the warm state
                // (an interpreter that is itself the hog still goes).
                oom_score_adj: ops.config.reset_oom_score.then_some(&b"-500"[..]),
            },
        )?;
        let (tx, exited) = watch::channel(None);
        let (session, ops) = (self.clone(), ops.clone());
        tokio::spawn(async move {
            let status = spawned
                .exit
                .await
                .unwrap_or_else(|_| ExitStatus::from_raw(libc::SIGKILL));
            let _ = tx.send(Some(status));
            session.on_exit(ops, generation).await;
        });
        Ok(Proc {
            generation,
            pid: spawned.pid,
            group,
            ctl_in: PipeWriter::new(in_w)?,
            ctl_out: LineReader::new(PipeReader::new(ev_r)?),
            stdout: PipeReader::new(out_r)?,
            stderr: PipeReader::new(err_r)?,
            exited,
        })
    }

    /// The interpreter of `generation` exited. If it died while idle (no
    /// call saw it), start a new one now rather than on the next call.
    async fn on_exit(self: Arc<Self>, ops: Arc<Ops>, generation: u64) {
        let mut guard = self.inner.clone().lock_owned().await;
        if guard.as_ref().is_some_and(|p| p.generation == generation) {
            log!("{} exited while idle; starting a new one", self.lang.name());
            if let Some(proc) = guard.as_mut() {
                proc.kill_and_reap().await;
            }
            *guard = None;
            self.start(ops, guard).await;
        }
    }
}

fn keep_tail(tail: &mut Vec<u8>, buf: &[u8], r: std::io::Result<usize>) {
    if let Ok(n) = r {
        tail.extend_from_slice(&buf[..n]);
        if tail.len() > START_TAIL {
            tail.drain(..tail.len() - START_TAIL);
        }
    }
}

fn control_line(value: &serde_json::Value) -> Vec<u8> {
    let mut line = serde_json::to_vec(value).unwrap_or_default();
    line.push(b'\n');
    line
}

/// Sends a control command and waits for "ok", discarding output meanwhile.
async fn control(proc: &mut Proc, line: &[u8]) -> Result<(), String> {
    proc.ctl_in
        .write_all(line)
        .await
        .map_err(|e| e.to_string())?;
    let (mut out, mut err) = (vec![0u8; READ_CHUNK], vec![0u8; READ_CHUNK]);
    let wait = async {
        loop {
            tokio::select! {
                line = proc.ctl_out.next_line() => match line {
                    Ok(Some(line)) => match serde_json::from_slice::<Event>(&line) {
                        Ok(e) if e.ev == "ok" => return Ok(()),
                        Ok(e) if e.ev == "error" => return Err(e.message.unwrap_or_default()),
                        _ => {}
                    },
                    Ok(None) => return Err("the interpreter closed its control pipe".to_string()),
                    Err(e) => return Err(e.to_string()),
                },
                _ = proc.stdout.read(&mut out) => {}
                _ = proc.stderr.read(&mut err) => {}
                _ = proc.exited.changed() => return Err("the interpreter exited".to_string()),
            }
        }
    };
    tokio::time::timeout(CONTROL_TIMEOUT, wait)
        .await
        .unwrap_or_else(|_| Err("no answer".to_string()))
}

async fn sleep_until_opt(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

fn write_drivers(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(dir)?;
    for (name, text) in [
        ("driver.py", DRIVER_PY),
        ("driver.js", DRIVER_JS),
        ("driver.sh", DRIVER_SH),
        ("cell.sh", ""),
    ] {
        let path = dir.join(name);
        std::fs::write(&path, text)?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644))?;
    }
    Ok(())
}

/// Reads newline-terminated lines from a pipe. Cancel-safe: bytes read stay
/// buffered when a `select!` drops the future.
struct LineReader {
    pipe: PipeReader,
    buf: Vec<u8>,
    scanned: usize,
    chunk: Vec<u8>,
}

impl LineReader {
    fn new(pipe: PipeReader) -> LineReader {
        LineReader {
            pipe,
            buf: Vec::new(),
            scanned: 0,
            chunk: vec![0u8; 256 << 10],
        }
    }

    /// The next line without its newline; `Ok(None)` at end of file.
    async fn next_line(&mut self) -> std::io::Result<Option<Vec<u8>>> {
        loop {
            if let Some(i) = self.buf[self.scanned..].iter().position(|&b| b == b'\n') {
                let end = self.scanned + i;
                let mut line: Vec<u8> = self.buf.drain(..=end).collect();
                line.pop();
                self.scanned = 0;
                return Ok(Some(line));
            }
            self.scanned = self.buf.len();
            if self.buf.len() > MAX_LINE {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    "event line too long",
                ));
            }
            let n = self.pipe.read(&mut self.chunk).await?;
            if n == 0 {
                return Ok(None);
            }
            self.buf.extend_from_slice(&self.chunk[..n]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pipe_pair() -> (LineReader, std::os::fd::OwnedFd) {
        let (r, w) = sys::pipe().unwrap();
        (LineReader::new(PipeReader::new(r).unwrap()), w)
    }

    #[tokio::test]
    async fn lines_split_across_writes_and_several_per_write() {
        let (mut reader, w) = pipe_pair();
        let raw = std::os::fd::AsRawFd::as_raw_fd(&w);
        sys::write_fd(raw, b"{\"ev\":\"ready\"}\n{\"ev\":").unwrap();
        assert_eq!(
            reader.next_line().await.unwrap().unwrap(),
            b"{\"ev\":\"ready\"}"
        );
        // The second line is incomplete: a read that is dropped midway
        // keeps what it had.
        let pending = tokio::time::timeout(Duration::from_millis(50), reader.next_line()).await;
        assert!(pending.is_err());
        sys::write_fd(raw, b"\"done\",\"status\":3}\n\n").unwrap();
        let line = reader.next_line().await.unwrap().unwrap();
        let event: Event = serde_json::from_slice(&line).unwrap();
        assert_eq!((event.ev.as_str(), event.status), ("done", Some(3)));
        assert_eq!(reader.next_line().await.unwrap().unwrap(), b"");
        drop(w);
        assert!(reader.next_line().await.unwrap().is_none());
    }

    #[tokio::test]
    async fn overlong_lines_are_refused() {
        let (mut reader, w) = pipe_pair();
        let writer = std::thread::spawn(move || {
            let chunk = vec![b'x'; 1 << 20];
            let raw = std::os::fd::AsRawFd::as_raw_fd(&w);
            for _ in 0..(MAX_LINE >> 20) + 2 {
                if sys::write_fd(raw, &chunk).is_err() {
                    break;
                }
            }
        });
        let err = reader.next_line().await.unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::InvalidData);
        drop(reader);
        writer.join().unwrap();
    }

    #[test]
    fn every_driver_event_parses() {
        let lines: [&[u8]; 6] = [
            // Python and node.
            br#"{"ev":"ready","ms":812,"detail":"numpy: No module named 'numpy'"}"#,
            br#"{"ev":"done","status":1,"error":{"name":"ZeroDivisionError","value":"division by zero","traceback":"Traceback..."}}"#,
            br#"{"ev":"image","format":"png","width":640,"height":480,"data":"iVBORw0KGgo="}"#,
            br#"{"ev":"ok"}"#,
            // bash.
            br#"{"ev":"done","status":0}"#,
            br#"{"ev":"done","status":5,"exited":true}"#,
        ];
        let events: Vec<Event> = lines
            .iter()
            .map(|l| serde_json::from_slice(l).unwrap())
            .collect();
        assert_eq!(
            events[0].detail.as_deref(),
            Some("numpy: No module named 'numpy'")
        );
        assert_eq!(events[1].error.as_ref().unwrap().name, "ZeroDivisionError");
        assert_eq!((events[2].width, events[2].height), (Some(640), Some(480)));
        let png = base64::engine::general_purpose::STANDARD
            .decode(events[2].data.as_deref().unwrap())
            .unwrap();
        assert_eq!(png, b"\x89PNG\r\n\x1a\n");
        assert!(events[5].exited && !events[4].exited);
    }

    #[test]
    fn control_lines_are_single_json_lines() {
        let code = "print('a\\nb')\n\"quoted\" \u{1F600}";
        let line = control_line(&serde_json::json!({"op": "run", "code": code}));
        assert_eq!(line.iter().filter(|&&b| b == b'\n').count(), 1);
        assert_eq!(line.last(), Some(&b'\n'));
        let back: serde_json::Value = serde_json::from_slice(&line).unwrap();
        assert_eq!(back["code"], code);
    }
}

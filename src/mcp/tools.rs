//! The MCP tools: argument checks, the call into the conversation's
//! sandbox, and results shaped for a model (readable text, structured
//! output, images).
//!
//! Every failure a model can cause or fix (a bad argument, a missing file,
//! an expired sandbox, a limit) is a tool result with `isError` set and a
//! message saying what to do; only protocol failures are MCP errors.

mod checkpoints;

use std::sync::Arc;
use std::time::{Duration, Instant};

use airlock_protocol::{
    Command, ErrorCode, Exec, FileKind, FileStat, Language, ListFiles, OutputLimits, RunCode,
    WriteFile,
};
use base64::Engine as _;
use rmcp::handler::server::wrapper::Parameters;
use rmcp::model::{
    CallToolResult, ContentBlock, Implementation, ProgressNotificationParam, ServerCapabilities,
    ServerConfig,
};
use rmcp::service::RequestContext;
use rmcp::{ErrorData as McpError, RoleServer, ServerHandler, tool, tool_handler, tool_router};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::Registry;
use super::auth::Principal;
use crate::agent_client::{AgentClient, AgentError, Event, OutputText};
use crate::metrics::{Metrics, Outcome};
use crate::sandbox::Sandbox;
use crate::sandbox::registry::{Conversation, Lease, RegistryError, fmt_duration};

/// Largest file written or read in one call, decoded.
pub const MAX_FILE_BYTES: usize = 10 << 20;
/// Largest source for run_code.
pub const MAX_CODE_BYTES: usize = airlock_protocol::MAX_CODE_LEN;
/// Largest command line for run_command.
pub const MAX_COMMAND_BYTES: usize = 256 << 10;
/// Longest path accepted.
pub const MAX_PATH_BYTES: usize = 4096;
/// Entries returned by list_files.
pub const MAX_LIST_ENTRIES: u32 = 1000;
/// Timeout of run_code and run_command when the call names none.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest timeout a call may ask for, unless the server is configured otherwise.
pub const DEFAULT_MAX_TIMEOUT: Duration = Duration::from_secs(600);
/// How often a long run reports progress.
const PROGRESS_EVERY: Duration = Duration::from_secs(2);
/// How long a cancelled run may take to report that it stopped.
const CANCEL_GRACE: Duration = Duration::from_secs(10);
const SANDBOX_HOME: &str = "/home/sandbox";

/// How the server is reached, which decides what a conversation is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// One conversation: the process.
    Stdio,
    /// One conversation per Mcp-Session-Id; sessionless clients use ids.
    Http,
}

/// Bounds on what a call may ask for.
#[derive(Debug, Clone, Copy)]
pub struct CallLimits {
    pub max_timeout: Duration,
    pub vcpus: u8,
    pub memory_mib: u32,
}

#[derive(Clone)]
pub struct AirlockServer {
    registry: Arc<Registry>,
    metrics: Arc<Metrics>,
    mode: Mode,
    limits: CallLimits,
}

#[derive(Debug, Clone, Copy, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum LanguageArg {
    #[serde(alias = "py", alias = "python3")]
    Python,
    #[serde(alias = "js", alias = "node", alias = "nodejs")]
    Javascript,
    #[serde(alias = "sh", alias = "shell")]
    Bash,
}

impl LanguageArg {
    fn protocol(self) -> Language {
        match self {
            LanguageArg::Python => Language::Python,
            LanguageArg::Javascript => Language::Javascript,
            LanguageArg::Bash => Language::Bash,
        }
    }
}

#[derive(Debug, Deserialize, JsonSchema)]
pub struct RunCodeArgs {
    /// The interpreter: "python", "javascript" (Node.js) or "bash".
    pub language: LanguageArg,
    /// The code to run. In python and javascript the value of a trailing
    /// expression is printed, as in a REPL.
    pub code: String,
    /// Stop the code after this many seconds (default 60; at most the
    /// server's maximum, 600 unless configured otherwise).
    #[serde(default)]
    #[schemars(with = "f64", transform = optional)]
    pub timeout_seconds: Option<f64>,
    /// Only for clients without MCP sessions: the sandbox_id returned by an
    /// earlier call, to keep working in that sandbox. Omit it to use this
    /// conversation's sandbox (or, without a session, to create a new one).
    #[serde(default)]
    #[schemars(with = "String", transform = optional)]
    pub sandbox_id: Option<String>,
}

#[derive(Debug, Deserialize, JsonSchema)]
pub struct RunCommandArgs {
    /// A shell command line, run with `bash -c` as the unprivileged user
    /// `sandbox`, e.g. "ls -la && python3 --version".
    pub command: String,
    /// Working directory (default /home/sandbox); relative paths are inside
    /// /home/sandbox.
    #[serde(default)]
    #[schemars(with = "String", transform = optional)]
    pub cwd: Option<String>,
    /// Stop the command (and every process it started) after this many
    /// seconds (default 60; at most the server's maximum, 600 unless configured otherwise).
    #[serde(default)]
    #[schemars(with = "f64", transform = optional)]
    pub timeout_seconds: Option<f64>,
    /// Only for clients without MCP sessions: see run_code.
    #[serde(default)]
    #[schemars(with = "String", transform = optional)]
    pub sandbox_id: Option<String>,
}

#[derive(Debug, Clone, Copy, Default, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum EncodingArg {
    /// `content` is the text itself.
    #[default]
    #[serde(alias = "utf-8", alias = "text")]
    Utf8,
    /// `content` is base64 (standard alphabet) of the bytes.
    Base64,
}

#[derive(Debug, Deserialize, JsonSchema)]
pub struct WriteFileArgs {
    /// Where to write; relative paths are inside /home/sandbox. Missing
    /// parent directories are created. An existing file is replaced.
    pub path: String,
    /// The file's content (at most 10 MiB once decoded).
    pub content: String,
    /// "utf8" (default) for text, "base64" for binary data.
    #[serde(default)]
    pub encoding: EncodingArg,
    /// Only for clients without MCP sessions: see run_code.
    #[serde(default)]
    #[schemars(with = "String", transform = optional)]
    pub sandbox_id: Option<String>,
}

#[derive(Debug, Deserialize, JsonSchema)]
pub struct ReadFileArgs {
    /// The file; relative paths are inside /home/sandbox.
    pub path: String,
    /// First byte to read (default 0).
    #[serde(default)]
    #[schemars(with = "u64", transform = optional)]
    pub offset: Option<u64>,
    /// Bytes to read (default: to the end, at most 10 MiB per call).
    #[serde(default)]
    #[schemars(with = "u64", transform = optional)]
    pub length: Option<u64>,
    /// Only for clients without MCP sessions: see run_code.
    #[serde(default)]
    #[schemars(with = "String", transform = optional)]
    pub sandbox_id: Option<String>,
}

#[derive(Debug, Deserialize, JsonSchema)]
pub struct ListFilesArgs {
    /// The directory (default /home/sandbox); relative paths are inside /home/sandbox.
    #[serde(default)]
    #[schemars(with = "String", transform = optional)]
    pub path: Option<String>,
    /// Also list subdirectories' contents (at most 1000 entries in all).
    #[serde(default)]
    #[schemars(with = "bool", transform = optional)]
    pub recursive: Option<bool>,
    /// Only for clients without MCP sessions: see run_code.
    #[serde(default)]
    #[schemars(with = "String", transform = optional)]
    pub sandbox_id: Option<String>,
}

#[derive(Debug, Deserialize, JsonSchema)]
pub struct SandboxArgs {
    /// Only for clients without MCP sessions: the sandbox_id returned by an
    /// earlier call. Omit it to mean this conversation's sandbox.
    #[serde(default)]
    #[schemars(with = "String", transform = optional)]
    pub sandbox_id: Option<String>,
}

/// An output schema without schemars' integer formats (`uint64`, `uint8`,
/// ...): they are not JSON Schema formats, and validating clients (the MCP
/// Inspector's ajv, among others) warn about every one.
fn portable_output_schema<T: JsonSchema + std::any::Any>()
-> std::sync::Arc<serde_json::Map<String, serde_json::Value>> {
    fn strip(value: &mut serde_json::Value) {
        match value {
            serde_json::Value::Object(map) => {
                if map
                    .get("format")
                    .and_then(|f| f.as_str())
                    .is_some_and(|f| f.starts_with("int") || f.starts_with("uint"))
                {
                    map.remove("format");
                }
                map.values_mut().for_each(strip);
            }
            serde_json::Value::Array(items) => items.iter_mut().for_each(strip),
            _ => {}
        }
    }
    let mut schema = rmcp::handler::server::tool::schema_for_output::<T>()
        .as_ref()
        .clone();
    schema.values_mut().for_each(strip);
    std::sync::Arc::new(schema)
}

/// An optional argument's schema: its type, without the `"default": null`
/// that a `null` default would add (absent is what "optional" means here).
fn optional(schema: &mut schemars::Schema) {
    schema.remove("default");
}

/// The result of run_code and run_command.
#[derive(Debug, Clone, Serialize, JsonSchema)]
pub struct RunResult {
    /// The sandbox that ran it; pass it back as sandbox_id if your client has no session.
    pub sandbox_id: String,
    /// The exit status (0: success). For python and javascript, 1 after an uncaught exception.
    pub exit_code: Option<i32>,
    /// The signal that killed the process, if one did.
    pub signal: Option<i32>,
    /// The timeout expired and the code was stopped.
    pub timed_out: bool,
    /// The client cancelled the call and the code was stopped.
    pub cancelled: bool,
    /// The sandbox ran out of memory and a process was killed.
    pub oom_killed: bool,
    pub duration_ms: u64,
    pub stdout: String,
    pub stderr: String,
    /// stdout was longer than the per-call limit and was cut.
    pub stdout_truncated: bool,
    pub stderr_truncated: bool,
    /// Bytes the code wrote to stdout in all (kept or not).
    pub stdout_bytes: u64,
    pub stderr_bytes: u64,
    /// The exception the code raised (python, javascript).
    pub error: Option<ExceptionInfo>,
    /// The interpreter had to be restarted: variables and imports were lost.
    pub state_lost: bool,
    /// Images (matplotlib figures) returned as image content.
    pub images: u32,
}

#[derive(Debug, Clone, Serialize, JsonSchema)]
pub struct ExceptionInfo {
    /// The exception type, e.g. "ZeroDivisionError".
    pub name: String,
    pub message: String,
}

/// What sandbox_info returns.
#[derive(Debug, Clone, Serialize, JsonSchema)]
pub struct InfoResult {
    /// Null until the conversation's first tool call creates the sandbox.
    pub sandbox_id: Option<String>,
    pub age_seconds: f64,
    /// Seconds until the sandbox is destroyed if no tool uses it.
    pub expires_in_seconds: f64,
    /// Seconds until the sandbox reaches its maximum lifetime, however busy.
    pub lifetime_left_seconds: f64,
    pub idle_timeout_seconds: f64,
    pub max_lifetime_seconds: f64,
    pub max_timeout_seconds: f64,
    pub max_file_bytes: u64,
    pub vcpus: u8,
    pub memory_mib: u32,
    pub usage: crate::sandbox::registry::Usage,
    /// "running", or "paused" (saved to disk; the next call resumes it).
    pub state: &'static str,
    /// Seconds without tool calls after which the sandbox is paused to
    /// disk (0: never).
    pub pause_after_seconds: f64,
    pub pauses: u64,
    pub resumes: u64,
    pub pause_seconds_total: f64,
    pub resume_seconds_total: f64,
    /// When the sandbox was last resumed (Unix seconds), and how long it took.
    pub last_resumed_unix: Option<f64>,
    pub last_resume_seconds: Option<f64>,
    /// Bytes its saved state (kept from its last pause) and its
    /// checkpoints take on disk.
    pub stored_bytes: u64,
    /// Checkpoints it keeps, and what they take on disk.
    pub checkpoints: u64,
    pub checkpoint_bytes: u64,
    /// Snapshots written (pauses, checkpoints) and read back (resumes,
    /// rollbacks, forks), and snapshot storage in GB-hours, for this sandbox.
    pub snapshot_writes: u64,
    pub snapshot_restores: u64,
    pub snapshot_gb_hours: f64,
    /// The same for every sandbox of this client, ended ones included.
    pub principal_snapshot_writes: u64,
    pub principal_snapshot_restores: u64,
    pub principal_snapshot_gb_hours: f64,
}

/// A tool error for the model.
struct Fail(String);

impl From<RegistryError> for Fail {
    fn from(err: RegistryError) -> Fail {
        Fail(err.to_string())
    }
}

type ToolResult = Result<CallToolResult, Fail>;

fn agent_fail(err: AgentError) -> Fail {
    match err {
        AgentError::Remote { code, message } => {
            let hint = match code {
                ErrorCode::NotFound => " Check the path (list_files shows what exists).",
                ErrorCode::PermissionDenied => {
                    " Code runs as the unprivileged user `sandbox`: write under /home/sandbox or /tmp."
                }
                ErrorCode::TooLarge => {
                    " Use a smaller size, or read the file in ranges with offset and length."
                }
                ErrorCode::NoSpace => " The sandbox disk is full: remove files you no longer need.",
                ErrorCode::AlreadyExists => " Choose another path, or remove what is there first.",
                ErrorCode::BadRequest => " Check the arguments.",
                ErrorCode::NotReady => " Try again in a moment.",
                _ => "",
            };
            let hint = if message.to_ascii_lowercase().contains("again") {
                ""
            } else {
                hint
            };
            Fail(format!("{}.{hint}", message.trim_end_matches('.')))
        }
        AgentError::Closed(_)
        | AgentError::Io(_)
        | AgentError::Protocol(_)
        | AgentError::Flood(_) => Fail(format!(
            "the sandbox stopped responding ({err}). Call reset_sandbox to get a fresh one (files and variables will be lost)."
        )),
        other => Fail(format!("the sandbox could not do that: {other}")),
    }
}

/// The last instant RFC 3339 (and humantime) can write: 9999-12-31T23:59:59Z.
const LAST_RFC3339_SECOND: i64 = 253_402_300_799;

/// A guest-supplied mtime for display. The guest can set any time on a
/// file, and humantime panics past year 9999 (as SystemTime arithmetic does
/// on overflow), so out-of-range times are shown as what they are.
fn format_mtime(mtime_ms: i64) -> String {
    let seconds = mtime_ms.div_euclid(1000);
    if !(0..=LAST_RFC3339_SECOND).contains(&seconds) {
        return format!("(out of range: {mtime_ms} ms from 1970)");
    }
    match std::time::UNIX_EPOCH.checked_add(Duration::from_secs(seconds as u64)) {
        Some(time) => humantime::format_rfc3339_seconds(time).to_string(),
        None => format!("(out of range: {mtime_ms} ms from 1970)"),
    }
}

fn check_path(what: &str, path: &str) -> Result<(), Fail> {
    if path.is_empty() {
        return Err(Fail(format!(
            "{what} is empty: give a path such as /home/sandbox/data.csv or data.csv"
        )));
    }
    if path.len() > MAX_PATH_BYTES {
        return Err(Fail(format!(
            "{what} is {} bytes long; at most {MAX_PATH_BYTES} are accepted",
            path.len()
        )));
    }
    if path.contains('\0') {
        return Err(Fail(format!("{what} contains a NUL character")));
    }
    Ok(())
}

fn check_sandbox_id(id: &str) -> Result<(), Fail> {
    if id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit()) {
        Ok(())
    } else {
        Err(Fail(
            "sandbox_id must be the 32-hex-digit id returned by an earlier call; omit it to use (or create) a sandbox without one"
                .into(),
        ))
    }
}

/// Which sandbox a call is about.
enum Target {
    Conversation(Conversation),
    Explicit(String),
    /// A sessionless call without an id: a new sandbox.
    New,
}

impl AirlockServer {
    pub fn new(registry: Arc<Registry>, mode: Mode, limits: CallLimits) -> AirlockServer {
        let metrics = registry.metrics().clone();
        AirlockServer {
            registry,
            metrics,
            mode,
            limits,
        }
    }

    /// The caller's principal and which sandbox the call is about.
    fn target(
        &self,
        ctx: &RequestContext<RoleServer>,
        sandbox_id: Option<String>,
    ) -> Result<(String, Target), Fail> {
        let parts = ctx.extensions.get::<http::request::Parts>();
        let principal = parts
            .and_then(|p| p.extensions.get::<Principal>())
            .cloned()
            .unwrap_or_else(Principal::anonymous)
            .0;
        if let Some(id) = sandbox_id.filter(|id| !id.is_empty()) {
            check_sandbox_id(&id)?;
            return Ok((principal, Target::Explicit(id.to_ascii_lowercase())));
        }
        let target = match self.mode {
            Mode::Stdio => Target::Conversation(Conversation::Stdio),
            Mode::Http => match parts
                .and_then(|p| p.headers.get("mcp-session-id"))
                .and_then(|v| v.to_str().ok())
            {
                Some(session) => Target::Conversation(Conversation::Session(session.to_string())),
                None => Target::New,
            },
        };
        Ok((principal, target))
    }

    /// The sandbox for a call; the flag says it was created for it (a
    /// sessionless call without an id).
    async fn lease(
        &self,
        ctx: &RequestContext<RoleServer>,
        sandbox_id: Option<String>,
    ) -> Result<(Lease<Sandbox>, bool), Fail> {
        let (principal, target) = self.target(ctx, sandbox_id)?;
        let getting = async {
            match &target {
                Target::Conversation(c) => self
                    .registry
                    .acquire(c, &principal)
                    .await
                    .map(|l| (l, false)),
                Target::Explicit(id) => self.registry.get(id, &principal).await.map(|l| (l, false)),
                Target::New => self
                    .registry
                    .create_explicit(&principal)
                    .await
                    .map(|l| (l, true)),
            }
        };
        // The first sandbox of a fresh install waits for the template
        // (minutes): keep the client informed.
        let lease = with_progress(ctx, "starting the sandbox", None, getting).await?;
        Ok(lease)
    }

    fn timeout(&self, seconds: Option<f64>) -> Result<Duration, Fail> {
        let max = self.limits.max_timeout;
        match seconds {
            None => Ok(DEFAULT_TIMEOUT.min(max)),
            Some(s) if s.is_finite() && s > 0.0 && s <= max.as_secs_f64() => {
                Ok(Duration::from_secs_f64(s))
            }
            Some(s) => Err(Fail(format!(
                "timeout_seconds must be more than 0 and at most {} (got {s}); omit it for the default of {}",
                max.as_secs_f64(),
                DEFAULT_TIMEOUT.min(max).as_secs()
            ))),
        }
    }

    /// Records the call and turns a failure into an isError result.
    fn finish(
        &self,
        tool: &'static str,
        started: Instant,
        result: ToolResult,
    ) -> Result<CallToolResult, McpError> {
        let result = result.unwrap_or_else(|Fail(message)| {
            CallToolResult::error(vec![ContentBlock::text(message)])
        });
        let outcome = if result.is_error == Some(true) {
            Outcome::ToolError
        } else {
            Outcome::Ok
        };
        self.metrics.tool_call(tool, outcome, started.elapsed());
        Ok(result)
    }

    /// Drives a started exec or run_code to its end: progress notifications
    /// while it runs, and on the client's cancellation a cancel to the agent
    /// (which kills the code; the sandbox stays usable).
    async fn drive<T>(
        &self,
        ctx: &RequestContext<RoleServer>,
        lease: &Lease<Sandbox>,
        request_id: u64,
        timeout: Duration,
        finish: impl Future<Output = crate::agent_client::Result<T>>,
        mut events: tokio::sync::mpsc::UnboundedReceiver<String>,
    ) -> Result<T, Fail> {
        let client: &AgentClient = lease.sandbox().client();
        let token = ctx.meta.get_progress_token();
        let started = Instant::now();
        let mut ticker =
            tokio::time::interval_at(tokio::time::Instant::now() + PROGRESS_EVERY, PROGRESS_EVERY);
        let mut last_line = String::new();
        let mut cancelled_at: Option<tokio::time::Instant> = None;
        let mut events_open = true;
        tokio::pin!(finish);
        loop {
            let grace = cancelled_at.map(|at| at + CANCEL_GRACE);
            tokio::select! {
                result = &mut finish => return result.map_err(agent_fail),
                _ = ctx.ct.cancelled(), if cancelled_at.is_none() => {
                    tracing::info!(sandbox = lease.id(), "client cancelled the call; stopping the code");
                    if let Err(err) = client.cancel(request_id).await {
                        return Err(agent_fail(err));
                    }
                    cancelled_at = Some(tokio::time::Instant::now());
                }
                _ = tokio::time::sleep_until(grace.unwrap_or_else(tokio::time::Instant::now)), if grace.is_some() => {
                    return Err(Fail("the call was cancelled".into()));
                }
                _ = lease.cancelled() => {
                    return Err(Fail(
                        "the sandbox was reset or destroyed while this call ran; its files and variables are gone".into(),
                    ));
                }
                line = events.recv(), if events_open => match line {
                    Some(line) => last_line = line,
                    None => events_open = false,
                },
                _ = ticker.tick(), if token.is_some() => {
                    let Some(token) = token.clone() else { continue };
                    let elapsed = started.elapsed().as_secs_f64();
                    let mut message = format!("running for {elapsed:.0} s");
                    if !last_line.is_empty() {
                        message.push_str(": ");
                        message.push_str(&last_line);
                    }
                    let param = ProgressNotificationParam::new(token, elapsed)
                        .with_total(timeout.as_secs_f64())
                        .with_message(message);
                    let _ = ctx.peer.notify_progress(param).await;
                }
            }
        }
    }
}

/// Runs `work`, sending progress notifications every few seconds while it
/// takes long (when the client asked for progress).
async fn with_progress<T>(
    ctx: &RequestContext<RoleServer>,
    what: &str,
    total: Option<f64>,
    work: impl Future<Output = Result<T, RegistryError>>,
) -> Result<T, RegistryError> {
    let Some(token) = ctx.meta.get_progress_token() else {
        return work.await;
    };
    let started = Instant::now();
    let mut ticker =
        tokio::time::interval_at(tokio::time::Instant::now() + PROGRESS_EVERY, PROGRESS_EVERY);
    tokio::pin!(work);
    loop {
        tokio::select! {
            result = &mut work => return result,
            _ = ticker.tick() => {
                let elapsed = started.elapsed().as_secs_f64();
                let mut param = ProgressNotificationParam::new(token.clone(), elapsed)
                    .with_message(format!("{what} ({elapsed:.0} s; the first sandbox after an install waits for the warm template)"));
                if let Some(total) = total {
                    param = param.with_total(total);
                }
                let _ = ctx.peer.notify_progress(param).await;
            }
        }
    }
}

/// The last line of a chunk of output, for progress messages.
fn last_line(bytes: &[u8]) -> Option<String> {
    let text = String::from_utf8_lossy(bytes);
    let line = text.lines().rev().find(|l| !l.trim().is_empty())?;
    Some(line.chars().take(200).collect())
}

fn event_sink(tx: tokio::sync::mpsc::UnboundedSender<String>) -> impl FnMut(&Event) + Send {
    move |event| {
        if let Event::Output { bytes, .. } = event
            && let Some(line) = last_line(bytes)
        {
            let _ = tx.send(line);
        }
    }
}

/// What a result says first: that the sandbox was made for this call, and
/// anything the server has to tell about it once (it came back older than
/// it was, after a crash).
fn opening_note(lease: &Lease<Sandbox>, created: bool) -> String {
    let mut note = if created {
        created_note(lease.id())
    } else {
        String::new()
    };
    if let Some(notice) = lease.take_notice() {
        note.push_str(&notice);
        note.push_str("\n\n");
    }
    note
}

fn created_note(id: &str) -> String {
    format!(
        "Created a new sandbox with sandbox_id \"{id}\". Pass sandbox_id=\"{id}\" to every later call to keep using it (its files and variables live there).\n\n"
    )
}

/// The readable text of a run.
fn run_text(r: &RunResult, stdout: &OutputText, stderr: &OutputText, timeout: Duration) -> String {
    let mut text = String::new();
    if !stdout.text.is_empty() {
        text.push_str(&stdout.text);
        if !text.ends_with('\n') {
            text.push('\n');
        }
    }
    if !stderr.text.is_empty() {
        text.push_str("[stderr]\n");
        text.push_str(&stderr.text);
        if !text.ends_with('\n') {
            text.push('\n');
        }
    }
    let seconds = r.duration_ms as f64 / 1000.0;
    let status = if r.timed_out {
        format!(
            "[timed out after {:.1} s and was stopped; the sandbox is still usable. Give a larger timeout_seconds (at most the server's maximum) or make the code faster]",
            timeout.as_secs_f64()
        )
    } else if r.cancelled {
        format!("[cancelled after {seconds:.2} s; the sandbox is still usable]")
    } else if let Some(signal) = r.signal {
        format!("[killed by signal {signal} after {seconds:.2} s]")
    } else {
        match r.exit_code {
            Some(code) => format!("[exit code {code}, {seconds:.2} s]"),
            None => format!("[finished in {seconds:.2} s]"),
        }
    };
    text.push_str(&status);
    if r.oom_killed {
        text.push_str("\n[the sandbox ran out of memory and a process was killed]");
    }
    if r.state_lost {
        text.push_str("\n[the interpreter was restarted: variables, imports and definitions from earlier calls are gone]");
    }
    if r.images > 0 {
        text.push_str(&format!("\n[{} image(s) attached]", r.images));
    }
    text
}

fn structured(value: &impl Serialize) -> Result<serde_json::Value, Fail> {
    serde_json::to_value(value).map_err(|e| Fail(format!("internal error shaping the result: {e}")))
}

fn is_image(bytes: &[u8]) -> Option<&'static str> {
    if bytes.starts_with(b"\x89PNG\r\n\x1a\n") {
        Some("image/png")
    } else if bytes.starts_with(b"\xff\xd8\xff") {
        Some("image/jpeg")
    } else if bytes.starts_with(b"GIF87a") || bytes.starts_with(b"GIF89a") {
        Some("image/gif")
    } else if bytes.len() > 12 && &bytes[..4] == b"RIFF" && &bytes[8..12] == b"WEBP" {
        Some("image/webp")
    } else {
        None
    }
}

fn kind_name(kind: FileKind) -> &'static str {
    match kind {
        FileKind::File => "file",
        FileKind::Dir => "dir",
        FileKind::Symlink => "link",
        FileKind::Other => "other",
        FileKind::Unknown => "?",
    }
}

fn stat_json(s: &FileStat) -> serde_json::Value {
    serde_json::json!({
        "path": s.path,
        "kind": kind_name(s.kind),
        "size": s.size,
        "mode": format!("{:o}", s.mode),
        "mtime": format_mtime(s.mtime_ms),
        "link_target": s.link_target,
    })
}

#[tool_router]
impl AirlockServer {
    #[tool(
        description = "Run code in this conversation's sandbox, a private Linux microVM (no network). \
        language is python, javascript (Node.js) or bash. State persists between calls like a notebook: \
        python and javascript variables, imports and functions survive from one call to the next, and \
        bash keeps its working directory and exported variables; files persist too. A trailing expression's \
        value is printed. numpy, pandas and matplotlib are preinstalled; matplotlib figures come back as PNG \
        images. The sandbox lives as long as the conversation: idle for a while (5 minutes by default) it is \
        paused to disk and the next call resumes it with every file, variable and process; it is destroyed \
        after 1 hour without tool calls or at its maximum lifetime (8 hours), by default; sandbox_info shows \
        the exact limits. A timeout or a cancellation stops the code and leaves the sandbox usable.",
        output_schema = portable_output_schema::<RunResult>(),
        annotations(
            title = "Run code",
            read_only_hint = false,
            destructive_hint = true,
            idempotent_hint = false,
            open_world_hint = false
        )
    )]
    async fn run_code(
        &self,
        Parameters(args): Parameters<RunCodeArgs>,
        ctx: RequestContext<RoleServer>,
    ) -> Result<CallToolResult, McpError> {
        let started = Instant::now();
        let result = self.run_code_inner(args, &ctx).await;
        self.finish("run_code", started, result)
    }

    #[tool(
        description = "Run a shell command line (bash -c) in this conversation's sandbox, a private Linux \
        microVM (no network), as the unprivileged user `sandbox` in /home/sandbox. Returns stdout, stderr and \
        the exit code. Each call is a new shell (use run_code with language bash for a shell whose cd and \
        variables persist); files persist for the life of the sandbox (paused to disk when idle and resumed \
        intact; destroyed after 1 hour without tool calls or 8 hours in all, by default; see sandbox_info). A timeout or a cancellation kills the \
        command and everything it started.",
        output_schema = portable_output_schema::<RunResult>(),
        annotations(
            title = "Run a shell command",
            read_only_hint = false,
            destructive_hint = true,
            idempotent_hint = false,
            open_world_hint = false
        )
    )]
    async fn run_command(
        &self,
        Parameters(args): Parameters<RunCommandArgs>,
        ctx: RequestContext<RoleServer>,
    ) -> Result<CallToolResult, McpError> {
        let started = Instant::now();
        let result = self.run_command_inner(args, &ctx).await;
        self.finish("run_command", started, result)
    }

    #[tool(
        description = "Write a file in this conversation's sandbox (at most 10 MiB). Relative paths are inside \
        /home/sandbox; missing parent directories are created; an existing file is replaced. Use encoding \
        \"base64\" for binary data. The file persists for the life of the sandbox (see sandbox_info) and code \
        run with run_code or run_command can use it.",
        annotations(
            title = "Write a file",
            read_only_hint = false,
            destructive_hint = true,
            idempotent_hint = true,
            open_world_hint = false
        )
    )]
    async fn write_file(
        &self,
        Parameters(args): Parameters<WriteFileArgs>,
        ctx: RequestContext<RoleServer>,
    ) -> Result<CallToolResult, McpError> {
        let started = Instant::now();
        let result = self.write_file_inner(args, &ctx).await;
        self.finish("write_file", started, result)
    }

    #[tool(
        description = "Read a file from this conversation's sandbox: text comes back as text, images (PNG, JPEG, \
        GIF, WebP) as image content, other binary data as base64. At most 10 MiB per call; use offset and \
        length to read a bigger file in pieces. Relative paths are inside /home/sandbox.",
        annotations(
            title = "Read a file",
            read_only_hint = true,
            destructive_hint = false,
            idempotent_hint = true,
            open_world_hint = false
        )
    )]
    async fn read_file(
        &self,
        Parameters(args): Parameters<ReadFileArgs>,
        ctx: RequestContext<RoleServer>,
    ) -> Result<CallToolResult, McpError> {
        let started = Instant::now();
        let result = self.read_file_inner(args, &ctx).await;
        self.finish("read_file", started, result)
    }

    #[tool(
        description = "List a directory in this conversation's sandbox (default /home/sandbox), with each entry's \
        type, size and modification time; recursive lists subdirectories too (at most 1000 entries).",
        annotations(
            title = "List files",
            read_only_hint = true,
            destructive_hint = false,
            idempotent_hint = true,
            open_world_hint = false
        )
    )]
    async fn list_files(
        &self,
        Parameters(args): Parameters<ListFilesArgs>,
        ctx: RequestContext<RoleServer>,
    ) -> Result<CallToolResult, McpError> {
        let started = Instant::now();
        let result = self.list_files_inner(args, &ctx).await;
        self.finish("list_files", started, result)
    }

    #[tool(
        description = "Replace this conversation's sandbox with a fresh one from the clean template: every file, \
        variable and process of the current sandbox is destroyed. Use it to start over, or after a sandbox \
        expired. Keeps the same sandbox_id.",
        annotations(
            title = "Reset the sandbox",
            read_only_hint = false,
            destructive_hint = true,
            idempotent_hint = true,
            open_world_hint = false
        )
    )]
    async fn reset_sandbox(
        &self,
        Parameters(args): Parameters<SandboxArgs>,
        ctx: RequestContext<RoleServer>,
    ) -> Result<CallToolResult, McpError> {
        let started = Instant::now();
        let result = self.reset_inner(args, &ctx).await;
        self.finish("reset_sandbox", started, result)
    }

    #[tool(
        description = "Describe this conversation's sandbox: its id, age, how long until it expires if left idle, \
        its limits (idle timeout, maximum lifetime, longest timeout, largest file, vCPUs, memory) and its usage \
        so far (vCPU-seconds, memory GB-seconds, runs). Does not create a sandbox.",
        output_schema = portable_output_schema::<InfoResult>(),
        annotations(
            title = "Sandbox info",
            read_only_hint = true,
            destructive_hint = false,
            idempotent_hint = true,
            open_world_hint = false
        )
    )]
    async fn sandbox_info(
        &self,
        Parameters(args): Parameters<SandboxArgs>,
        ctx: RequestContext<RoleServer>,
    ) -> Result<CallToolResult, McpError> {
        let started = Instant::now();
        let result = self.info_inner(args, &ctx).await;
        self.finish("sandbox_info", started, result)
    }
}

impl AirlockServer {
    async fn run_code_inner(
        &self,
        args: RunCodeArgs,
        ctx: &RequestContext<RoleServer>,
    ) -> ToolResult {
        if args.code.len() > MAX_CODE_BYTES {
            return Err(Fail(format!(
                "code is {} bytes; at most {MAX_CODE_BYTES} are accepted. Write large inputs to a file with write_file and load them from the code",
                args.code.len()
            )));
        }
        let timeout = self.timeout(args.timeout_seconds)?;
        let (lease, created) = self.lease(ctx, args.sandbox_id).await?;
        lease.count_run();
        let client = lease.sandbox().client();
        let run = RunCode {
            language: args.language.protocol(),
            timeout_ms: Some(timeout.as_millis() as u64),
            output: OutputLimits::default(),
        };
        let call = client
            .start_run_code(run, args.code)
            .await
            .map_err(agent_fail)?;
        let request_id = call.request_id();
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let out = self
            .drive(
                ctx,
                &lease,
                request_id,
                timeout,
                call.finish_run(event_sink(tx)),
                rx,
            )
            .await?;
        let (stdout, stderr) = (out.stdout_text(), out.stderr_text());
        let p = &out.result.process;
        let result = RunResult {
            sandbox_id: lease.id().to_string(),
            exit_code: p.exit_code,
            signal: p.signal,
            timed_out: p.timed_out,
            cancelled: p.cancelled,
            oom_killed: p.oom_killed,
            duration_ms: p.duration_ms,
            stdout: stdout.text.clone(),
            stderr: stderr.text.clone(),
            stdout_truncated: stdout.truncated,
            stderr_truncated: stderr.truncated,
            stdout_bytes: p.stdout.total_bytes,
            stderr_bytes: p.stderr.total_bytes,
            error: out.result.error.as_ref().map(|e| ExceptionInfo {
                name: e.name.clone(),
                message: e.value.clone(),
            }),
            state_lost: out.result.state_lost,
            images: out.images.len() as u32,
        };
        let mut text = run_text(&result, &stdout, &stderr, timeout);
        if out.result.images_dropped > 0 {
            text.push_str(&format!(
                "\n[{} more image(s) were not returned (too many or too large)]",
                out.result.images_dropped
            ));
        }
        text.insert_str(0, &opening_note(&lease, created));
        let mut content = vec![ContentBlock::text(text)];
        for (image, bytes) in &out.images {
            let mime = match image.format {
                airlock_protocol::ImageFormat::Png => "image/png",
                airlock_protocol::ImageFormat::Unknown => {
                    is_image(bytes).unwrap_or("application/octet-stream")
                }
            };
            content.push(ContentBlock::image(
                base64::engine::general_purpose::STANDARD.encode(bytes),
                mime,
            ));
        }
        let mut call_result = CallToolResult::structured(structured(&result)?);
        call_result.content = content;
        Ok(call_result)
    }

    async fn run_command_inner(
        &self,
        args: RunCommandArgs,
        ctx: &RequestContext<RoleServer>,
    ) -> ToolResult {
        if args.command.trim().is_empty() {
            return Err(Fail(
                "command is empty: give a shell command line such as \"ls -la\"".into(),
            ));
        }
        if args.command.len() > MAX_COMMAND_BYTES {
            return Err(Fail(format!(
                "command is {} bytes; at most {MAX_COMMAND_BYTES} are accepted. Put a long script in a file with write_file and run that",
                args.command.len()
            )));
        }
        if let Some(cwd) = &args.cwd {
            check_path("cwd", cwd)?;
        }
        let timeout = self.timeout(args.timeout_seconds)?;
        let (lease, created) = self.lease(ctx, args.sandbox_id).await?;
        lease.count_run();
        let client = lease.sandbox().client();
        let exec = Exec {
            command: Command::Shell(args.command),
            cwd: args.cwd,
            env: Vec::new(),
            timeout_ms: Some(timeout.as_millis() as u64),
            output: OutputLimits::default(),
        };
        let call = client
            .start_exec(exec, Vec::new())
            .await
            .map_err(agent_fail)?;
        let request_id = call.request_id();
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let out = self
            .drive(
                ctx,
                &lease,
                request_id,
                timeout,
                call.finish_exec(event_sink(tx)),
                rx,
            )
            .await?;
        let (stdout, stderr) = (out.stdout_text(), out.stderr_text());
        let p = &out.result;
        let result = RunResult {
            sandbox_id: lease.id().to_string(),
            exit_code: p.exit_code,
            signal: p.signal,
            timed_out: p.timed_out,
            cancelled: p.cancelled,
            oom_killed: p.oom_killed,
            duration_ms: p.duration_ms,
            stdout: stdout.text.clone(),
            stderr: stderr.text.clone(),
            stdout_truncated: stdout.truncated,
            stderr_truncated: stderr.truncated,
            stdout_bytes: p.stdout.total_bytes,
            stderr_bytes: p.stderr.total_bytes,
            error: None,
            state_lost: false,
            images: 0,
        };
        let mut text = run_text(&result, &stdout, &stderr, timeout);
        text.insert_str(0, &opening_note(&lease, created));
        let mut call_result = CallToolResult::structured(structured(&result)?);
        call_result.content = vec![ContentBlock::text(text)];
        Ok(call_result)
    }

    async fn write_file_inner(
        &self,
        args: WriteFileArgs,
        ctx: &RequestContext<RoleServer>,
    ) -> ToolResult {
        check_path("path", &args.path)?;
        let bytes = match args.encoding {
            EncodingArg::Utf8 => args.content.into_bytes(),
            EncodingArg::Base64 => {
                // Tolerate line breaks, as base64 tools often add them.
                let compact: String = args
                    .content
                    .chars()
                    .filter(|c| !c.is_ascii_whitespace())
                    .collect();
                base64::engine::general_purpose::STANDARD.decode(compact.as_bytes()).map_err(|e| {
                    Fail(format!(
                        "content is not valid base64 ({e}); use the standard alphabet with padding, or encoding \"utf8\" for text"
                    ))
                })?
            }
        };
        if bytes.len() > MAX_FILE_BYTES {
            return Err(Fail(format!(
                "the content is {} bytes; at most {MAX_FILE_BYTES} (10 MiB) can be written in one call. Split it and append with run_command (e.g. cat part2 >> file)",
                bytes.len()
            )));
        }
        let (lease, created) = self.lease(ctx, args.sandbox_id).await?;
        let write = WriteFile {
            path: args.path,
            mode: None,
            create_parents: true,
            append: false,
        };
        let size = bytes.len();
        let client = lease.sandbox().client();
        let agent_started = Instant::now();
        let stat = tokio::select! {
            r = client.write_file(write, bytes) => r.map_err(agent_fail)?,
            _ = lease.cancelled() => return Err(Fail("the sandbox was reset or destroyed during the write".into())),
        };
        tracing::debug!(sandbox = lease.id(), size, agent = ?agent_started.elapsed(), "write_file");
        let mut text = format!("Wrote {size} bytes to {}", stat.path);
        text.insert_str(0, &opening_note(&lease, created));
        let mut result = CallToolResult::structured(serde_json::json!({
            "sandbox_id": lease.id(),
            "path": stat.path,
            "size": stat.size,
        }));
        result.content = vec![ContentBlock::text(text)];
        Ok(result)
    }

    async fn read_file_inner(
        &self,
        args: ReadFileArgs,
        ctx: &RequestContext<RoleServer>,
    ) -> ToolResult {
        check_path("path", &args.path)?;
        let offset = args.offset.unwrap_or(0);
        let length = match args.length {
            Some(0) => {
                return Err(Fail(
                    "length must be at least 1; omit it to read to the end".into(),
                ));
            }
            Some(n) if n > MAX_FILE_BYTES as u64 => {
                return Err(Fail(format!(
                    "length is {n}; at most {MAX_FILE_BYTES} (10 MiB) bytes can be read in one call: read in pieces with offset and length"
                )));
            }
            Some(n) => n,
            None => MAX_FILE_BYTES as u64,
        };
        let (lease, created) = self.lease(ctx, args.sandbox_id).await?;
        let client = lease.sandbox().client();
        let agent_started = Instant::now();
        let (data, bytes) = tokio::select! {
            r = client.read_file_range(&args.path, offset, Some(length)) => r.map_err(agent_fail)?,
            _ = lease.cancelled() => return Err(Fail("the sandbox was reset or destroyed during the read".into())),
        };
        tracing::debug!(sandbox = lease.id(), size = bytes.len(), agent = ?agent_started.elapsed(), "read_file");
        let end = data.offset + bytes.len() as u64;
        let whole = data.offset == 0 && data.eof;
        let range = if whole {
            format!("{} bytes", data.size)
        } else {
            format!("bytes {}..{} of {}", data.offset, end, data.size)
        };
        let more = if data.eof {
            String::new()
        } else {
            format!(" More follows: call read_file again with offset={end}.")
        };
        let mut content = Vec::new();
        let mut note = opening_note(&lease, created);
        if let Some(mime) = is_image(&bytes).filter(|_| whole) {
            note.push_str(&format!("{}: {mime} image, {range}.", args.path));
            content.push(ContentBlock::text(note));
            content.push(ContentBlock::image(
                base64::engine::general_purpose::STANDARD.encode(&bytes),
                mime,
            ));
            return Ok(CallToolResult::success(content));
        }
        if whole && bytes.is_empty() {
            note.push_str(&format!("{} is empty (0 bytes).", args.path));
            return Ok(CallToolResult::success(vec![ContentBlock::text(note)]));
        }
        // A range may end inside a character: that is still text.
        let text_part = match std::str::from_utf8(&bytes) {
            Ok(text) => Some(text),
            Err(e) if e.error_len().is_none() && !data.eof => {
                std::str::from_utf8(&bytes[..e.valid_up_to()]).ok()
            }
            Err(_) => None,
        };
        match text_part {
            Some(text) if !data.eof || whole => {
                if !created && whole {
                    content.push(ContentBlock::text(text.to_string()));
                } else {
                    let shown_end = data.offset + text.len() as u64;
                    let more = if shown_end < data.size {
                        format!(" More follows: call read_file again with offset={shown_end}.")
                    } else {
                        String::new()
                    };
                    note.push_str(&format!(
                        "{}: text, bytes {}..{shown_end} of {}.{more}",
                        args.path, data.offset, data.size
                    ));
                    content.push(ContentBlock::text(note));
                    content.push(ContentBlock::text(text.to_string()));
                }
            }
            Some(text) => {
                note.push_str(&format!("{}: text, {range}.{more}", args.path));
                content.push(ContentBlock::text(note));
                content.push(ContentBlock::text(text.to_string()));
            }
            None => {
                note.push_str(&format!(
                    "{}: binary data, {range}, base64-encoded in the next block.{more}",
                    args.path
                ));
                content.push(ContentBlock::text(note));
                content.push(ContentBlock::text(
                    base64::engine::general_purpose::STANDARD.encode(&bytes),
                ));
            }
        }
        Ok(CallToolResult::success(content))
    }

    async fn list_files_inner(
        &self,
        args: ListFilesArgs,
        ctx: &RequestContext<RoleServer>,
    ) -> ToolResult {
        let path = args
            .path
            .filter(|p| !p.is_empty())
            .unwrap_or_else(|| SANDBOX_HOME.to_string());
        check_path("path", &path)?;
        let (lease, created) = self.lease(ctx, args.sandbox_id).await?;
        let list = ListFiles {
            path: path.clone(),
            recursive: args.recursive.unwrap_or(false),
            max_depth: None,
            max_entries: Some(MAX_LIST_ENTRIES),
        };
        let client = lease.sandbox().client();
        let listing = tokio::select! {
            r = client.list_files(list) => r.map_err(agent_fail)?,
            _ = lease.cancelled() => return Err(Fail("the sandbox was reset or destroyed during the listing".into())),
        };
        let mut text = opening_note(&lease, created);
        if listing.entries.is_empty() {
            text.push_str(&format!("{path} is empty"));
        }
        for entry in &listing.entries {
            let mtime = format_mtime(entry.mtime_ms);
            let name = match (&entry.kind, &entry.link_target) {
                (FileKind::Dir, _) => format!("{}/", entry.path),
                (FileKind::Symlink, Some(target)) => format!("{} -> {target}", entry.path),
                _ => entry.path.clone(),
            };
            text.push_str(&format!(
                "{:<5} {:>10}  {mtime}  {name}\n",
                kind_name(entry.kind),
                entry.size
            ));
        }
        if listing.truncated {
            text.push_str(&format!(
                "[listing cut at {MAX_LIST_ENTRIES} entries; list a subdirectory, or without recursive]\n"
            ));
        }
        let mut result = CallToolResult::structured(serde_json::json!({
            "sandbox_id": lease.id(),
            "path": path,
            "entries": listing.entries.iter().map(stat_json).collect::<Vec<_>>(),
            "truncated": listing.truncated,
        }));
        result.content = vec![ContentBlock::text(text.trim_end().to_string())];
        Ok(result)
    }

    async fn reset_inner(&self, args: SandboxArgs, ctx: &RequestContext<RoleServer>) -> ToolResult {
        let (principal, target) = self.target(ctx, args.sandbox_id)?;
        let resetting = async {
            match &target {
                Target::Conversation(c) => self.registry.reset_conversation(c, &principal).await,
                Target::Explicit(id) => self.registry.reset_explicit(id, &principal).await,
                Target::New => self.registry.create_explicit(&principal).await,
            }
        };
        let lease = with_progress(ctx, "starting a fresh sandbox", None, resetting).await?;
        let text = match target {
            Target::New => created_note(lease.id()).trim_end().to_string(),
            _ => format!(
                "Sandbox {} is fresh: every file, variable and process of the previous one is gone.",
                lease.id()
            ),
        };
        let mut result =
            CallToolResult::structured(serde_json::json!({ "sandbox_id": lease.id() }));
        result.content = vec![ContentBlock::text(text)];
        Ok(result)
    }

    async fn info_inner(&self, args: SandboxArgs, ctx: &RequestContext<RoleServer>) -> ToolResult {
        let (principal, target) = self.target(ctx, args.sandbox_id)?;
        let lease = match &target {
            Target::Conversation(c) => self.registry.existing(c, &principal).await?,
            Target::Explicit(id) => Some(self.registry.get(id, &principal).await?),
            Target::New => None,
        };
        let limits = self.registry.limits();
        let mut info = InfoResult {
            sandbox_id: None,
            age_seconds: 0.0,
            expires_in_seconds: limits.idle_timeout.as_secs_f64(),
            lifetime_left_seconds: limits.max_lifetime.as_secs_f64(),
            idle_timeout_seconds: limits.idle_timeout.as_secs_f64(),
            max_lifetime_seconds: limits.max_lifetime.as_secs_f64(),
            max_timeout_seconds: self.limits.max_timeout.as_secs_f64(),
            max_file_bytes: MAX_FILE_BYTES as u64,
            vcpus: self.limits.vcpus,
            memory_mib: self.limits.memory_mib,
            usage: Default::default(),
            state: "running",
            pause_after_seconds: limits.pause_after.as_secs_f64(),
            pauses: 0,
            resumes: 0,
            pause_seconds_total: 0.0,
            resume_seconds_total: 0.0,
            last_resumed_unix: None,
            last_resume_seconds: None,
            stored_bytes: 0,
            checkpoints: 0,
            checkpoint_bytes: 0,
            snapshot_writes: 0,
            snapshot_restores: 0,
            snapshot_gb_hours: 0.0,
            principal_snapshot_writes: 0,
            principal_snapshot_restores: 0,
            principal_snapshot_gb_hours: 0.0,
        };
        if let Some((_, u)) = self.registry.snapshot_usage(Some(&principal)).first() {
            info.principal_snapshot_writes = u.writes;
            info.principal_snapshot_restores = u.restores;
            info.principal_snapshot_gb_hours = u.gb_hours();
        }
        let mut text = String::new();
        match &lease {
            Some(lease) => {
                let i = self.registry.info(lease);
                info.sandbox_id = Some(i.id.clone());
                info.age_seconds = i.age.as_secs_f64();
                info.expires_in_seconds = i.expires_in.as_secs_f64();
                info.lifetime_left_seconds = i.lifetime_left.as_secs_f64();
                info.usage = i.usage;
                let p = &i.pauses;
                info.state = if p.paused { "paused" } else { "running" };
                info.pauses = p.pauses;
                info.resumes = p.resumes;
                info.pause_seconds_total = p.pause_seconds;
                info.resume_seconds_total = p.resume_seconds;
                info.last_resumed_unix = p.last_resumed.and_then(|t| {
                    t.duration_since(std::time::UNIX_EPOCH)
                        .ok()
                        .map(|d| d.as_secs_f64())
                });
                info.last_resume_seconds = p.last_resume_seconds;
                info.stored_bytes = p.stored_bytes;
                info.checkpoints = i.checkpoints as u64;
                info.checkpoint_bytes = i.checkpoint_bytes;
                info.snapshot_writes = p.snapshot_writes;
                info.snapshot_restores = p.snapshot_restores;
                info.snapshot_gb_hours =
                    p.stored_byte_seconds() / f64::from(1u32 << 30) / 3600.0;
                if i.checkpoints > 0 {
                    text.push_str(&format!(
                        "{} checkpoint(s), taking {} (list_checkpoints shows them).\n",
                        i.checkpoints,
                        crate::sandbox::registry::fmt_bytes(i.checkpoint_bytes)
                    ));
                }
                if p.pauses > 0 {
                    text.push_str(&format!(
                        "Paused to disk {} time(s) and resumed {} time(s) with every file, variable and process; its saved state takes {} KiB.\n",
                        p.pauses,
                        p.resumes,
                        p.stored_bytes / 1024
                    ));
                }
                text.push_str(&format!(
                    "Sandbox {}: {} old; destroyed after {} without tool calls, and in any case in {} (maximum lifetime).\n\
                     Usage so far: {:.2} vCPU-seconds, {:.1} memory GB-seconds, {} runs.\n",
                    i.id,
                    fmt_duration(i.age),
                    fmt_duration(limits.idle_timeout),
                    fmt_duration(i.lifetime_left),
                    i.usage.vcpu_seconds,
                    i.usage.memory_gb_seconds,
                    i.usage.runs
                ));
            }
            None if matches!(target, Target::New) => text.push_str(
                "No sandbox named: this client has no session, so pass the sandbox_id returned by an earlier call; any tool called without one creates a new sandbox.\n",
            ),
            None => text.push_str("No sandbox yet: the first tool call (run_code, write_file, ...) creates it.\n"),
        }
        text.push_str(&format!(
            "Limits: idle timeout {}, maximum lifetime {}, longest timeout {}, files up to 10 MiB per call, {} vCPU(s), {} MiB memory, no network.",
            fmt_duration(limits.idle_timeout),
            fmt_duration(limits.max_lifetime),
            fmt_duration(self.limits.max_timeout),
            self.limits.vcpus,
            self.limits.memory_mib
        ));
        let mut result = CallToolResult::structured(structured(&info)?);
        result.content = vec![ContentBlock::text(text)];
        Ok(result)
    }
}

impl AirlockServer {
    /// Every tool: the sandbox tools and the checkpoint tools.
    fn all_tools() -> rmcp::handler::server::router::tool::ToolRouter<Self> {
        Self::tool_router() + Self::checkpoint_tool_router()
    }
}

#[tool_handler(router = Self::all_tools())]
impl ServerHandler for AirlockServer {
    fn get_info(&self) -> ServerConfig {
        let limits = self.registry.limits();
        ServerConfig::new(ServerCapabilities::builder().enable_tools().build())
            .with_server_info(Implementation::new("airlock", env!("CARGO_PKG_VERSION")))
            .with_instructions(format!(
                "airlock runs code in a private Linux microVM (a sandbox) that belongs to this conversation: \
                 Python (numpy, pandas, matplotlib), JavaScript (Node.js) and bash, with a file system and no \
                 network. Variables, imports and files persist between calls. The sandbox is created at the \
                 first tool call; idle, it is paused to disk and resumed intact at the next call; it is \
                 destroyed after {} without tool calls, or {} after it was created; \
                 reset_sandbox starts over. Clients without MCP sessions get a sandbox_id from their first call \
                 and pass it to later calls.",
                fmt_duration(limits.idle_timeout),
                fmt_duration(limits.max_lifetime)
            ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn any_guest_mtime_formats_without_panicking() {
        assert_eq!(format_mtime(0), "1970-01-01T00:00:00Z");
        assert_eq!(format_mtime(1_700_000_000_123), "2023-11-14T22:13:20Z");
        assert_eq!(
            format_mtime(LAST_RFC3339_SECOND * 1000),
            "9999-12-31T23:59:59Z"
        );
        for ms in [i64::MAX, i64::MIN, -1, (LAST_RFC3339_SECOND + 1) * 1000] {
            assert!(format_mtime(ms).starts_with("(out of range"), "{ms}");
        }
    }

    #[test]
    fn tools_have_portable_inputs_and_truthful_annotations() {
        let tools = AirlockServer::all_tools().list_all();
        assert_eq!(tools.len(), 11);
        for tool in &tools {
            let schema = serde_json::to_string(&tool.input_schema).unwrap();
            assert!(!schema.contains("null"), "{}: {schema}", tool.name);
            assert!(schema.contains("sandbox_id"), "{}: {schema}", tool.name);
            let a = tool.annotations.as_ref().expect("annotations");
            let read_only = matches!(
                tool.name.as_ref(),
                "read_file" | "list_files" | "sandbox_info" | "list_checkpoints"
            );
            assert_eq!(a.read_only_hint, Some(read_only), "{}", tool.name);
            assert_eq!(a.open_world_hint, Some(false), "{}", tool.name);
            assert!(
                tool.description.as_ref().is_some_and(|d| d.len() > 80),
                "{}",
                tool.name
            );
        }
        let run_code = tools.iter().find(|t| t.name == "run_code").unwrap();
        let a = run_code.annotations.as_ref().unwrap();
        assert_eq!(
            (a.idempotent_hint, a.destructive_hint),
            (Some(false), Some(true))
        );
        assert!(run_code.output_schema.is_some());
        for tool in &tools {
            if let Some(schema) = &tool.output_schema {
                let text = serde_json::to_string(schema).unwrap();
                assert!(!text.contains("\"format\":\"uint"), "{}: {text}", tool.name);
                if text.contains("\"integer\"") {
                    // Unsigned fields keep their bound once the format goes.
                    assert!(text.contains("\"minimum\":0"), "{}: {text}", tool.name);
                }
            }
        }
        let reset = tools.iter().find(|t| t.name == "reset_sandbox").unwrap();
        assert_eq!(
            reset.annotations.as_ref().unwrap().destructive_hint,
            Some(true)
        );
    }

    #[test]
    fn argument_checks_explain_the_fix() {
        assert!(check_sandbox_id("0123456789abcdef0123456789ABCDEF").is_ok());
        let Fail(m) = check_sandbox_id("xyz").unwrap_err();
        assert!(m.contains("32-hex-digit"), "{m}");
        assert!(check_path("path", "data.csv").is_ok());
        let Fail(m) = check_path("path", &"a".repeat(MAX_PATH_BYTES + 1)).unwrap_err();
        assert!(m.contains("4096"), "{m}");
        assert!(check_path("path", "a\0b").is_err());
        assert!(check_path("path", "").is_err());
        assert_eq!(is_image(b"\x89PNG\r\n\x1a\nrest"), Some("image/png"));
        assert_eq!(is_image(b"hello"), None);
        let Fail(m) = agent_fail(AgentError::Remote {
            code: ErrorCode::NotFound,
            message: "/x: No such file or directory.".into(),
        });
        assert_eq!(
            m,
            "/x: No such file or directory. Check the path (list_files shows what exists)."
        );
    }
}

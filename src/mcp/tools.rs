//! The MCP tools: argument checks, the call into the conversation's
//! sandbox, and results shaped for a model (readable text, structured
//! output, images).
//!
//! Every failure a model can cause or fix (a bad argument, a missing file,
//! an expired sandbox, a limit) is a tool result with `isError` set and a
//! message saying what to do; only protocol failures are MCP errors.
//!
//! This file holds the server, the tool router and what every call shares
//! (which sandbox, progress, cancellation); `args` the arguments and
//! their checks, `calls` each tool's work, `results` the result types
//! and text, and `checkpoints` the checkpoint tools.

mod args;
mod calls;
mod checkpoints;
mod results;

pub use args::*;
pub use results::*;

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
pub const SANDBOX_HOME: &str = "/home/sandbox";

/// How the server is reached, which decides what a conversation is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// One conversation: the process.
    Stdio,
    /// One conversation per Mcp-Session-Id; sessionless clients use ids.
    Http,
}

/// Bounds on what a call may ask for.
#[derive(Debug, Clone)]
pub struct CallLimits {
    pub max_timeout: Duration,
    pub vcpus: u8,
    pub memory_mib: u32,
    /// What sandboxes may reach, told in sandbox_info; `None`: nothing.
    pub egress: Option<Arc<crate::egress::Egress>>,
}

#[derive(Clone)]
pub struct AirlockServer {
    registry: Arc<Registry>,
    metrics: Arc<Metrics>,
    mode: Mode,
    limits: CallLimits,
    /// This session's log level and messages (one server per session).
    log: Arc<super::logging::SessionLog>,
}

/// A tool error for the model.
pub(super) struct Fail(pub(super) String);

impl From<RegistryError> for Fail {
    fn from(err: RegistryError) -> Fail {
        Fail(err.to_string())
    }
}

type ToolResult = Result<CallToolResult, Fail>;

/// Which sandbox a call is about.
pub(super) enum Target {
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
            log: Arc::default(),
        }
    }

    pub(super) fn registry(&self) -> &Arc<Registry> {
        &self.registry
    }

    /// The caller's principal and which sandbox the call is about.
    pub(super) fn target(
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
            Mode::Http => match session_id(ctx) {
                Some(session) => Target::Conversation(Conversation::Session(session.to_string())),
                None => Target::New,
            },
        };
        Ok((principal, target))
    }

    /// Whether the call belongs to a session that outlives it (stdio, or
    /// HTTP with Mcp-Session-Id), which can hear later of its sandbox.
    fn in_session(&self, ctx: &RequestContext<RoleServer>) -> bool {
        self.mode == Mode::Stdio || session_id(ctx).is_some()
    }

    /// The sandbox for a call; the flag says it was created for it (a
    /// sessionless call without an id).
    async fn lease(
        &self,
        ctx: &RequestContext<RoleServer>,
        sandbox_id: Option<String>,
        image: Option<String>,
    ) -> Result<(Lease<Sandbox>, bool), Fail> {
        let (principal, target) = self.target(ctx, sandbox_id)?;
        if let Some(name) = &image
            && !crate::image::custom::recipe::is_image_name(name)
        {
            return Err(Fail(format!(
                "image {name:?} is not an image name; this server serves {}",
                self.registry.provider().image_names().join(", ")
            )));
        }
        let in_session = self.in_session(ctx);
        if in_session {
            self.log.attach(&ctx.peer, self.registry.events());
            if self.registry.provider().is_preparing() {
                self.log.notice(
                    "airlock is preparing the guest image and the warm template (first use after an install: minutes); this call waits for it".into(),
                );
            }
        }
        let getting = async {
            match &target {
                Target::Conversation(c) => self
                    .registry
                    .acquire(c, &principal, image.as_deref())
                    .await
                    .map(|l| (l, false)),
                Target::Explicit(id) => {
                    // Checked before the lease, which would resume it.
                    if let Some(wanted) = &image {
                        let running = self
                            .registry
                            .resolve(None, Some(id), &principal)
                            .await?
                            .image();
                        if *wanted != running {
                            return Err(crate::sandbox::registry::RegistryError::Invalid(format!(
                                "sandbox {id} runs the image {running:?}; `image` chooses the image of a new sandbox only"
                            )));
                        }
                    }
                    self.registry.get(id, &principal).await.map(|l| (l, false))
                }
                Target::New => self
                    .registry
                    .create_explicit(&principal, image.as_deref())
                    .await
                    .map(|l| (l, true)),
            }
        };
        // The first sandbox of a fresh install waits for the template
        // (minutes): keep the client informed.
        let lease = with_progress(ctx, "starting the sandbox", None, getting).await?;
        if in_session {
            self.log.watch(lease.0.id());
        }
        Ok(lease)
    }

    /// The images served that `principal` may use, its default first.
    pub(super) fn images_for(&self, principal: &str) -> Vec<String> {
        let served = self.registry.provider().image_names();
        match self
            .registry
            .limits()
            .principals
            .get(principal)
            .and_then(|p| p.images.as_ref())
        {
            Some(allowed) => allowed
                .iter()
                .filter(|a| served.contains(a))
                .cloned()
                .collect(),
            None => served,
        }
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

/// The HTTP session a call came in, if any.
fn session_id(ctx: &RequestContext<RoleServer>) -> Option<&str> {
    ctx.extensions
        .get::<http::request::Parts>()?
        .headers
        .get("mcp-session-id")?
        .to_str()
        .ok()
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

#[tool_router]
impl AirlockServer {
    #[tool(
        description = "Run code in this conversation's sandbox, a private Linux microVM. It has no network, \
        unless the server's egress policy allows some destinations: then HTTP and HTTPS to those (pip, curl, \
        requests, git) go through the proxy its environment names, and anything else is refused. \
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
        microVM (network only as the egress policy allows), as the unprivileged user `sandbox` in /home/sandbox. Returns stdout, stderr and \
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
    /// Every tool: the sandbox tools and the checkpoint tools.
    fn all_tools() -> rmcp::handler::server::router::tool::ToolRouter<Self> {
        Self::tool_router() + Self::checkpoint_tool_router()
    }
}

#[tool_handler(router = Self::all_tools())]
impl ServerHandler for AirlockServer {
    #[allow(deprecated)] // logging: see mcp/logging.rs
    async fn set_level(
        &self,
        request: rmcp::model::SetLevelRequestParams,
        _ctx: RequestContext<RoleServer>,
    ) -> Result<(), McpError> {
        self.log.set_level(request.level);
        Ok(())
    }

    async fn list_resources(
        &self,
        request: Option<rmcp::model::PaginatedRequestParams>,
        ctx: RequestContext<RoleServer>,
    ) -> Result<rmcp::model::ListResourcesResult, McpError> {
        self.list_sandbox_resources(request.and_then(|r| r.cursor), &ctx)
            .await
    }

    async fn list_resource_templates(
        &self,
        _request: Option<rmcp::model::PaginatedRequestParams>,
        _ctx: RequestContext<RoleServer>,
    ) -> Result<rmcp::model::ListResourceTemplatesResult, McpError> {
        Ok(super::resources::templates())
    }

    async fn read_resource(
        &self,
        request: rmcp::model::ReadResourceRequestParams,
        ctx: RequestContext<RoleServer>,
    ) -> Result<rmcp::model::ReadResourceResponse, McpError> {
        self.read_sandbox_resource(&request.uri, &ctx)
            .await
            .map(Into::into)
    }

    fn get_info(&self) -> ServerConfig {
        let limits = self.registry.limits();
        #[allow(deprecated)] // logging: see mcp/logging.rs
        let capabilities = ServerCapabilities::builder()
            .enable_tools()
            .enable_logging()
            .enable_resources()
            .build();
        ServerConfig::new(capabilities)
            .with_server_info(Implementation::new("airlock", env!("CARGO_PKG_VERSION")))
            .with_instructions(format!(
                "airlock runs code in a private Linux microVM (a sandbox) that belongs to this conversation: \
                 Python (numpy, pandas, matplotlib), JavaScript (Node.js) and bash, with a file system and no \
                 network. Variables, imports and files persist between calls. The sandbox is created at the \
                 first tool call; idle, it is paused to disk and resumed intact at the next call; it is \
                 destroyed after {} without tool calls, or {} after it was created; \
                 reset_sandbox starts over. Clients without MCP sessions get a sandbox_id from their first call \
                 and pass it to later calls. The sandbox's files are resources too \
                 (sandbox:///home/sandbox/<file>).",
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
                assert!(!text.contains("\"type\":["), "{}: {text}", tool.name);
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

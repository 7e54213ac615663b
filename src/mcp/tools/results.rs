//! What the tools return: structured results with portable schemas, and
//! the readable text a model sees (run output, files, agent errors).

use super::*;

/// An output schema without schemars' integer formats (`uint64`, `uint8`,
/// ...): they are not JSON Schema formats, and validating clients (the MCP
/// Inspector's ajv, among others) warn about every one.
pub(super) fn portable_output_schema<T: JsonSchema + std::any::Any>()
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
                split_type_list(map);
                map.values_mut().for_each(strip);
            }
            serde_json::Value::Array(items) => items.iter_mut().for_each(strip),
            _ => {}
        }
    }
    /// `"type": ["integer", "null"]` becomes one `anyOf` branch per type,
    /// the bounds going with the non-null one: clients that map schemas
    /// onto a single-`type` dialect (Gemini's OpenAPI subset) reject lists.
    fn split_type_list(map: &mut serde_json::Map<String, serde_json::Value>) {
        let Some(serde_json::Value::Array(types)) = map.get("type").cloned() else {
            return;
        };
        map.remove("type");
        let branches = types
            .into_iter()
            .map(|t| {
                let mut branch = serde_json::Map::new();
                if t != "null" {
                    for key in ["minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"] {
                        if let Some(bound) = map.remove(key) {
                            branch.insert(key.into(), bound);
                        }
                    }
                }
                branch.insert("type".into(), t);
                serde_json::Value::Object(branch)
            })
            .collect();
        map.insert("anyOf".into(), serde_json::Value::Array(branches));
    }
    let mut schema = rmcp::handler::server::tool::schema_for_output::<T>()
        .as_ref()
        .clone();
    schema.values_mut().for_each(strip);
    std::sync::Arc::new(schema)
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
    /// The image the sandbox runs (null before it exists).
    pub image: Option<String>,
    /// The images this client may use, its default first; a call that
    /// creates a sandbox may choose one with `image`.
    pub images: Vec<String>,
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
    /// Network egress through the server's proxy (none unless the server
    /// allows some destinations).
    pub egress: crate::egress::TrafficReport,
}

pub(super) fn agent_fail(err: AgentError) -> Fail {
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
pub(super) const LAST_RFC3339_SECOND: i64 = 253_402_300_799;

/// A guest-supplied mtime for display. The guest can set any time on a
/// file, and humantime panics past year 9999 (as SystemTime arithmetic does
/// on overflow), so out-of-range times are shown as what they are.
pub(super) fn format_mtime(mtime_ms: i64) -> String {
    let seconds = mtime_ms.div_euclid(1000);
    if !(0..=LAST_RFC3339_SECOND).contains(&seconds) {
        return format!("(out of range: {mtime_ms} ms from 1970)");
    }
    match std::time::UNIX_EPOCH.checked_add(Duration::from_secs(seconds as u64)) {
        Some(time) => humantime::format_rfc3339_seconds(time).to_string(),
        None => format!("(out of range: {mtime_ms} ms from 1970)"),
    }
}

/// What a result says first: that the sandbox was made for this call, and
/// anything the server has to tell about it once (it came back older than
/// it was, after a crash).
pub(super) fn opening_note(lease: &Lease<Sandbox>, created: bool) -> String {
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

pub(super) fn created_note(id: &str) -> String {
    format!(
        "Created a new sandbox with sandbox_id \"{id}\". Pass sandbox_id=\"{id}\" to every later call to keep using it (its files and variables live there).\n\n"
    )
}

/// The readable text of a run.
pub(super) fn run_text(
    r: &RunResult,
    stdout: &OutputText,
    stderr: &OutputText,
    timeout: Duration,
) -> String {
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

pub(super) fn structured(value: &impl Serialize) -> Result<serde_json::Value, Fail> {
    serde_json::to_value(value).map_err(|e| Fail(format!("internal error shaping the result: {e}")))
}

pub(super) fn is_image(bytes: &[u8]) -> Option<&'static str> {
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

pub(super) fn kind_name(kind: FileKind) -> &'static str {
    match kind {
        FileKind::File => "file",
        FileKind::Dir => "dir",
        FileKind::Symlink => "link",
        FileKind::Other => "other",
        FileKind::Unknown => "?",
    }
}

pub(super) fn stat_json(s: &FileStat) -> serde_json::Value {
    serde_json::json!({
        "path": s.path,
        "kind": kind_name(s.kind),
        "size": s.size,
        "mode": format!("{:o}", s.mode),
        "mtime": format_mtime(s.mtime_ms),
        "link_target": s.link_target,
    })
}

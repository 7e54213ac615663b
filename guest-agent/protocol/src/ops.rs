//! The operations: commands, warm interpreters, files, limits and freshness.
//!
//! Every struct here travels as the JSON header of its frame; bulk bytes
//! (stdin, code, file contents, output chunks, images, entropy) travel as the
//! frame payload. Optional fields may be left out; unknown fields are ignored,
//! so fields can be added without a version bump.

use serde::{Deserialize, Serialize};

use crate::MAX_PAYLOAD_LEN;

/// Bytes of stdout (and, separately, of stderr) kept per call unless the
/// request asks for another limit.
pub const DEFAULT_OUTPUT_LIMIT: u64 = 64 << 10;
/// The largest per-stream limit a request may ask for.
pub const MAX_OUTPUT_LIMIT: u64 = 8 << 20;
/// Largest source for [`RunCode`] (the frame payload).
pub const MAX_CODE_LEN: usize = 1 << 20;
/// Largest file written or read in one request (one frame payload). Larger
/// files are read by range.
pub const MAX_FILE_LEN: u64 = MAX_PAYLOAD_LEN as u64;
/// Timeout of [`Exec`] and [`RunCode`] when the request names none.
pub const DEFAULT_TIMEOUT_MS: u64 = 60_000;
/// The longest timeout a request may ask for.
pub const MAX_TIMEOUT_MS: u64 = 24 * 3600 * 1000;
/// Largest stdin for [`Exec`] (the frame payload).
pub const MAX_STDIN_LEN: usize = MAX_PAYLOAD_LEN;
/// Entries returned by [`ListFiles`] unless it asks for another bound.
pub const DEFAULT_LIST_ENTRIES: u32 = 1000;
/// The most entries one [`ListFiles`] may return.
pub const MAX_LIST_ENTRIES: u32 = 10_000;
/// Depth bound of a recursive [`ListFiles`] (1 = the directory's own entries).
pub const MAX_LIST_DEPTH: u32 = 32;
/// Images (matplotlib figures) returned per [`RunCode`]; more are dropped.
pub const MAX_IMAGES_PER_RUN: u32 = 16;
/// Largest single image; a bigger figure is dropped with a note on stderr.
pub const MAX_IMAGE_LEN: usize = 8 << 20;

/// What [`Exec`] runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Command {
    /// A program and its arguments; the program is looked up in PATH.
    Argv(Vec<String>),
    /// A script run by `bash -c`.
    Shell(String),
}

/// Per-stream output limits; `None` means [`DEFAULT_OUTPUT_LIMIT`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutputLimits {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stdout_max: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stderr_max: Option<u64>,
}

/// Client → agent: run a command as the sandbox user, in its own process
/// group and cgroup. The payload is its stdin (empty: stdin is /dev/null).
/// Events: [`crate::Output`]; final: [`ExecResult`].
///
/// The call ends when the command exits; anything it left running in the
/// background is killed then (long-lived background jobs belong in the bash
/// session of [`RunCode`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Exec {
    pub command: Command,
    /// Working directory; the sandbox home when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cwd: Option<String>,
    /// Added to (or replacing entries of) the sandbox's base environment.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub env: Vec<(String, String)>,
    /// `None` means [`DEFAULT_TIMEOUT_MS`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
    #[serde(default)]
    pub output: OutputLimits,
}

/// What happened to one output stream.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamStats {
    /// Bytes the process wrote (as far as the agent read them).
    pub total_bytes: u64,
    /// Bytes sent to the client; the rest was cut.
    pub kept_bytes: u64,
}

impl StreamStats {
    pub fn truncated(&self) -> bool {
        self.total_bytes > self.kept_bytes
    }
}

/// Agent → client: the final frame of [`Exec`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecResult {
    /// The exit code, if the process exited normally.
    #[serde(default)]
    pub exit_code: Option<i32>,
    /// The signal that killed the process, if one did.
    #[serde(default)]
    pub signal: Option<i32>,
    pub duration_ms: u64,
    /// The timeout expired and the process tree was killed.
    #[serde(default)]
    pub timed_out: bool,
    /// The request was cancelled and the process tree was killed.
    #[serde(default)]
    pub cancelled: bool,
    /// The out-of-memory killer killed a sandbox process during the call.
    #[serde(default)]
    pub oom_killed: bool,
    #[serde(default)]
    pub stdout: StreamStats,
    #[serde(default)]
    pub stderr: StreamStats,
}

/// The languages of [`RunCode`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Language {
    Python,
    Javascript,
    Bash,
    /// A language from a newer peer.
    #[serde(other)]
    Unknown,
}

impl Language {
    pub const ALL: [Language; 3] = [Language::Python, Language::Javascript, Language::Bash];

    pub fn name(self) -> &'static str {
        match self {
            Language::Python => "python",
            Language::Javascript => "javascript",
            Language::Bash => "bash",
            Language::Unknown => "unknown",
        }
    }
}

/// Client → agent: run code in the warm, stateful interpreter of
/// `language`. The payload is the source (UTF-8, at most [`MAX_CODE_LEN`]).
/// Events: [`crate::Output`], [`Image`]; final: [`RunCodeResult`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunCode {
    pub language: Language,
    /// `None` means [`DEFAULT_TIMEOUT_MS`]; it includes waiting for the
    /// interpreter to be warm and for earlier calls to finish.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
    #[serde(default)]
    pub output: OutputLimits,
}

/// An exception (Python, JavaScript) raised by the code of a [`RunCode`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CodeError {
    /// The exception's type, e.g. `ZeroDivisionError`, `TypeError`.
    pub name: String,
    /// Its message.
    pub value: String,
    /// The readable traceback, as also written to stderr.
    pub traceback: String,
}

/// Agent → client: the final frame of [`RunCode`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunCodeResult {
    /// As for exec. `exit_code` is 0 on success and 1 after an exception
    /// (Python, JavaScript), or the status of the last command (bash);
    /// `signal` is set when the interpreter itself was killed.
    #[serde(flatten)]
    pub process: ExecResult,
    /// The exception, if the code raised one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<CodeError>,
    /// The interpreter was killed or exited (a timeout it did not answer,
    /// `exit`, running out of memory): variables and imports are gone, and a
    /// fresh interpreter is starting.
    #[serde(default)]
    pub state_lost: bool,
    /// Images sent as [`Image`] events.
    #[serde(default)]
    pub images: u32,
    /// Images the code made but that were not sent (too many or too big).
    #[serde(default)]
    pub images_dropped: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ImageFormat {
    Png,
    #[serde(other)]
    Unknown,
}

/// Agent → client event of [`RunCode`]: an image (a matplotlib figure); the
/// payload holds its bytes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Image {
    pub format: ImageFormat,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub width: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub height: Option<u32>,
}

/// Client → agent: drop the state of one interpreter (or of all); the
/// interpreters stay warm. Final: [`crate::Message::Done`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResetInterpreter {
    /// `None` resets every language.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub language: Option<Language>,
}

/// Client → agent: which interpreters are warm. Final: [`WarmStatusReply`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WarmStatus {
    /// Wait up to this long for every interpreter to be warm (or failed)
    /// before answering; `None` answers at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wait_ms: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InterpreterState {
    /// Not started at agent start-up; the first call starts it.
    Stopped,
    /// Started, not ready yet (importing).
    Starting,
    /// Ready for code.
    Warm,
    /// Could not start; see the detail. The next call tries again.
    Failed,
    /// The image has no such interpreter (its `/etc/airlock/image.json`
    /// says so); calls in this language are refused with
    /// [`crate::ErrorCode::Unsupported`]. It never changes. An older peer
    /// reads it as [`InterpreterState::Unknown`].
    Unavailable,
    #[serde(other)]
    Unknown,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InterpreterStatus {
    pub language: Language,
    pub state: InterpreterState,
    /// How long the last start took to become warm.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warm_after_ms: Option<u64>,
    /// Why it failed, or notes from its start (e.g. a module that would not import).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// How many times it has been started (1 = never restarted).
    #[serde(default)]
    pub starts: u32,
}

/// Agent → client: the answer to [`WarmStatus`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WarmStatusReply {
    pub interpreters: Vec<InterpreterStatus>,
}

impl WarmStatusReply {
    /// Whether every interpreter is warm.
    pub fn all_warm(&self) -> bool {
        !self.interpreters.is_empty()
            && self
                .interpreters
                .iter()
                .all(|i| i.state == InterpreterState::Warm)
    }

    /// Whether no interpreter is starting any more: each is warm, failed,
    /// stopped (started on first use) or unavailable in this image.
    pub fn settled(&self) -> bool {
        !self.interpreters.is_empty()
            && self.interpreters.iter().all(|i| {
                matches!(
                    i.state,
                    InterpreterState::Warm
                        | InterpreterState::Failed
                        | InterpreterState::Stopped
                        | InterpreterState::Unavailable
                )
            })
    }

    pub fn get(&self, language: Language) -> Option<&InterpreterStatus> {
        self.interpreters.iter().find(|i| i.language == language)
    }
}

/// Client → agent, after a snapshot restore and before any user code: make
/// this guest distinct from every other restored from the same template. The
/// payload is fresh entropy from the host. The agent adds it to the kernel's
/// pool and reseeds the kernel CRNG, sets the wall clock, and reseeds the
/// warm interpreters' generators. Final: [`RefreshReply`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Refresh {
    /// The host's CLOCK_REALTIME in nanoseconds since the epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wall_clock_unix_ns: Option<u64>,
    /// Whether the egress relay listens (on 127.0.0.1:[`crate::EGRESS_PROXY_PORT`]).
    /// Off, nothing listens there and a proxied connection is refused at once.
    #[serde(default)]
    pub egress: bool,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RefreshReply {
    /// Entropy bytes credited to the kernel pool (0 when not permitted).
    pub entropy_bytes: u32,
    /// The kernel CRNG was reseeded.
    pub crng_reseeded: bool,
    /// The wall clock was set.
    pub clock_set: bool,
    /// Interpreters whose generators were reseeded.
    pub reseeded: Vec<Language>,
    /// The egress relay listens now.
    #[serde(default)]
    pub egress: bool,
    /// Microseconds each step took, in order (for benchmarks): entropy,
    /// CRNG reseed, clock wound back, interpreters reseeded, clock set,
    /// egress relay.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub steps_us: Vec<(String, u64)>,
    /// What could not be done, for the host's log.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
}

/// Client → agent: change the limits on user code; absent fields stay as
/// they are (send none to read them). Final: [`Limits`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SetLimits {
    /// memory.max of the cgroup holding every user process.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_max_bytes: Option<u64>,
    /// pids.max of that cgroup.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pids_max: Option<u64>,
    /// Size of the /tmp tmpfs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tmp_size_bytes: Option<u64>,
    /// Size of the sandbox home tmpfs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub home_size_bytes: Option<u64>,
}

/// Agent → client: the limits in force, and current use.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    /// Whether the agent confines user code in cgroups at all (not in the
    /// debug `--serve-unix` mode).
    pub cgroups: bool,
    #[serde(default)]
    pub memory_max_bytes: Option<u64>,
    #[serde(default)]
    pub memory_current_bytes: Option<u64>,
    #[serde(default)]
    pub pids_max: Option<u64>,
    #[serde(default)]
    pub pids_current: Option<u64>,
    #[serde(default)]
    pub tmp_size_bytes: Option<u64>,
    #[serde(default)]
    pub home_size_bytes: Option<u64>,
    /// Guest RAM, from the kernel.
    #[serde(default)]
    pub guest_memory_bytes: Option<u64>,
}

/// Client → agent: write a file (the payload is its content, at most
/// [`MAX_FILE_LEN`]) as the sandbox user. Final: [`FileStat`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WriteFile {
    pub path: String,
    /// Permission bits for a new file (default 0o644); an existing file
    /// keeps its own unless this is given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<u32>,
    /// Create missing parent directories (mode 0o755).
    #[serde(default)]
    pub create_parents: bool,
    /// Append instead of replacing.
    #[serde(default)]
    pub append: bool,
}

/// Client → agent: read a file, or a byte range of it. Final: [`FileData`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReadFile {
    pub path: String,
    #[serde(default)]
    pub offset: u64,
    /// Bytes to read; `None` reads to the end, which fails with
    /// [`crate::ErrorCode::TooLarge`] past [`MAX_FILE_LEN`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub length: Option<u64>,
}

/// Agent → client: the answer to [`ReadFile`]; the payload holds the bytes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileData {
    /// The file's whole size.
    pub size: u64,
    pub offset: u64,
    /// The payload reaches the end of the file.
    pub eof: bool,
}

/// Client → agent: list a directory. Final: [`FileList`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListFiles {
    pub path: String,
    #[serde(default)]
    pub recursive: bool,
    /// Depth bound when recursive (default and maximum [`MAX_LIST_DEPTH`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_depth: Option<u32>,
    /// Entry bound (default [`DEFAULT_LIST_ENTRIES`], at most [`MAX_LIST_ENTRIES`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_entries: Option<u32>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FileKind {
    File,
    Dir,
    Symlink,
    Other,
    #[serde(other)]
    Unknown,
}

/// One file's metadata (symlinks are not followed).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileStat {
    /// The absolute path.
    pub path: String,
    pub kind: FileKind,
    pub size: u64,
    /// Permission bits (e.g. 0o644).
    pub mode: u32,
    /// Modification time, milliseconds since the epoch.
    pub mtime_ms: i64,
    #[serde(default)]
    pub uid: u32,
    #[serde(default)]
    pub gid: u32,
    /// A symlink's target.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub link_target: Option<String>,
}

/// Agent → client: the answer to [`ListFiles`], entries in directory order,
/// parents before their children.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileList {
    pub entries: Vec<FileStat>,
    /// The entry or depth bound cut the listing short.
    pub truncated: bool,
}

/// Client → agent: remove a file, or a directory (with `recursive`, and
/// everything in it). Final: [`crate::Message::Done`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RemoveFile {
    pub path: String,
    #[serde(default)]
    pub recursive: bool,
}

/// Client → agent: one file's metadata. Final: [`FileStat`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatFile {
    pub path: String,
}

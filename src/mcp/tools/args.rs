//! The tools' arguments as clients send them, and the checks every tool
//! applies to them before anything reaches a sandbox.

use super::*;

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
    pub(super) fn protocol(self) -> Language {
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
    /// The image of the sandbox this call creates (see sandbox_info's
    /// `images`); default: the server's first. Ignored by calls that use an
    /// existing sandbox, which must name the image it runs if they name one.
    #[serde(default)]
    #[schemars(with = "String", transform = optional)]
    pub image: Option<String>,
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
    /// The image of the sandbox this call creates: see run_code.
    #[serde(default)]
    #[schemars(with = "String", transform = optional)]
    pub image: Option<String>,
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
    /// The image of the sandbox this call creates: see run_code.
    #[serde(default)]
    #[schemars(with = "String", transform = optional)]
    pub image: Option<String>,
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
    /// The image of the sandbox this call creates: see run_code.
    #[serde(default)]
    #[schemars(with = "String", transform = optional)]
    pub image: Option<String>,
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
    /// The image of the sandbox this call creates: see run_code.
    #[serde(default)]
    #[schemars(with = "String", transform = optional)]
    pub image: Option<String>,
}

#[derive(Debug, Deserialize, JsonSchema)]
pub struct SandboxArgs {
    /// Only for clients without MCP sessions: the sandbox_id returned by an
    /// earlier call. Omit it to mean this conversation's sandbox.
    #[serde(default)]
    #[schemars(with = "String", transform = optional)]
    pub sandbox_id: Option<String>,
}

/// An optional argument's schema: its type, without the `"default": null`
/// that a `null` default would add (absent is what "optional" means here).
pub(super) fn optional(schema: &mut schemars::Schema) {
    schema.remove("default");
}

pub(super) fn check_path(what: &str, path: &str) -> Result<(), Fail> {
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

/// A sandbox or checkpoint id as the server makes them: 32 hex digits.
pub(super) fn is_id(id: &str) -> bool {
    id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit())
}

pub(super) fn check_sandbox_id(id: &str) -> Result<(), Fail> {
    if is_id(id) {
        Ok(())
    } else {
        Err(Fail(
            "sandbox_id must be the 32-hex-digit id returned by an earlier call; omit it to use (or create) a sandbox without one"
                .into(),
        ))
    }
}

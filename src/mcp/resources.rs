//! A sandbox's files as MCP resources.
//!
//! - `sandbox:///<absolute path>`: a file in the caller's conversation's
//!   sandbox (stdio, or an HTTP session).
//! - `sandbox://<sandbox id>/<absolute path>`: a file in a sandbox named by
//!   id, for sessionless clients; the id's owner check applies.
//!
//! Resources never create a sandbox: before a conversation's first tool
//! call, `resources/list` is empty and a read says there is no sandbox yet.
//! Reads have read_file's ownership checks and its 10 MiB bound.

use airlock_protocol::{FileKind, ListFiles};
use base64::Engine as _;
use rmcp::model::{ListResourceTemplatesResult, ListResourcesResult, ReadResourceResult};
use rmcp::model::{Resource, ResourceContents, ResourceTemplate};
use rmcp::service::RequestContext;
use rmcp::{ErrorData as McpError, RoleServer};

use super::tools::{AirlockServer, MAX_FILE_BYTES, MAX_PATH_BYTES, SANDBOX_HOME, Target};
use crate::agent_client::AgentError;
use crate::sandbox::Sandbox;
use crate::sandbox::registry::Lease;

pub const SCHEME: &str = "sandbox://";
/// Resources per `resources/list` page.
const PAGE: usize = 100;
/// Files looked at under /home/sandbox for a listing (all pages).
const MAX_LISTED: u32 = 1000;

/// A parsed `sandbox://` URI.
#[derive(Debug, PartialEq, Eq)]
pub struct SandboxUri {
    /// The sandbox named in the URI; `None`: the conversation's.
    pub sandbox_id: Option<String>,
    /// The absolute path in the sandbox, decoded.
    pub path: String,
}

/// Parses and checks a `sandbox://` URI from a client.
pub fn parse_uri(uri: &str) -> Result<SandboxUri, String> {
    let rest = uri.strip_prefix(SCHEME).ok_or_else(|| {
        format!("{uri:?} is not a sandbox file: resources here are sandbox:///<absolute path>")
    })?;
    let (authority, encoded_path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    if encoded_path.len() < 2 {
        return Err(format!(
            "{uri:?} names no file: use sandbox:///home/sandbox/<file>"
        ));
    }
    if encoded_path.contains(['?', '#']) {
        return Err(format!("{uri:?}: a sandbox URI has no query or fragment"));
    }
    let sandbox_id = match authority {
        "" => None,
        id if id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit()) => {
            Some(id.to_ascii_lowercase())
        }
        other => {
            return Err(format!(
                "{other:?} is not a sandbox id (32 hex digits); leave it empty for this conversation's sandbox"
            ));
        }
    };
    let path = percent_decode(encoded_path)?;
    if path.len() > MAX_PATH_BYTES || path.contains('\0') {
        return Err(format!(
            "the path must be at most {MAX_PATH_BYTES} bytes, without NUL"
        ));
    }
    Ok(SandboxUri { sandbox_id, path })
}

/// The URI of `path` (absolute) in the conversation's sandbox, or in the one
/// named `sandbox_id`.
pub fn uri_for(sandbox_id: Option<&str>, path: &str) -> String {
    let mut uri = String::from(SCHEME);
    uri.push_str(sandbox_id.unwrap_or(""));
    for b in path.bytes() {
        if b.is_ascii_alphanumeric() || b"/-._~".contains(&b) {
            uri.push(b as char);
        } else {
            uri.push_str(&format!("%{b:02X}"));
        }
    }
    uri
}

fn percent_decode(encoded: &str) -> Result<String, String> {
    let bytes = encoded.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| format!("bad percent-encoding in {encoded:?}"))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| format!("{encoded:?} does not decode to UTF-8"))
}

/// The MIME type a file's name suggests.
pub fn mime_for(path: &str) -> &'static str {
    let ext = path
        .rsplit('/')
        .next()
        .and_then(|name| name.rsplit_once('.'))
        .map(|(_, ext)| ext.to_ascii_lowercase())
        .unwrap_or_default();
    match ext.as_str() {
        "txt" | "log" | "" => "text/plain",
        "md" => "text/markdown",
        "csv" => "text/csv",
        "tsv" => "text/tab-separated-values",
        "html" | "htm" => "text/html",
        "css" => "text/css",
        "xml" => "application/xml",
        "json" => "application/json",
        "jsonl" | "ndjson" => "application/x-ndjson",
        "yaml" | "yml" => "application/yaml",
        "toml" => "application/toml",
        "py" => "text/x-python",
        "js" | "mjs" | "cjs" => "text/javascript",
        "ts" => "text/x-typescript",
        "sh" => "text/x-shellscript",
        "rs" => "text/x-rust",
        "c" | "h" => "text/x-c",
        "svg" => "image/svg+xml",
        "png" => "image/png",
        "jpg" | "jpeg" => "image/jpeg",
        "gif" => "image/gif",
        "webp" => "image/webp",
        "pdf" => "application/pdf",
        "zip" => "application/zip",
        "gz" => "application/gzip",
        "tar" => "application/x-tar",
        "parquet" => "application/vnd.apache.parquet",
        _ => "application/octet-stream",
    }
}

/// Whether a file of `mime` is returned as text when it decodes as UTF-8.
fn textual(mime: &str) -> bool {
    mime.starts_with("text/")
        || matches!(
            mime,
            "application/json"
                | "application/x-ndjson"
                | "application/xml"
                | "application/yaml"
                | "application/toml"
                | "image/svg+xml"
                | "application/octet-stream"
        )
}

pub fn templates() -> ListResourceTemplatesResult {
    ListResourceTemplatesResult::with_all_items(vec![
        ResourceTemplate::new("sandbox:///{+path}", "sandbox-file")
            .with_title("A file in this conversation's sandbox")
            .with_description(
                "path is absolute without its leading slash, e.g. home/sandbox/results.csv. \
                 Text comes back as text, other data as a base64 blob, at most 10 MiB.",
            ),
        ResourceTemplate::new("sandbox://{sandbox_id}/{+path}", "sandbox-file-by-id")
            .with_title("A file in a sandbox named by its id")
            .with_description(
                "For clients without sessions: sandbox_id is the id a tool call returned.",
            ),
    ])
}

fn registry_error(err: crate::sandbox::registry::RegistryError) -> McpError {
    McpError::resource_not_found(err.to_string(), None)
}

fn agent_error(uri: &str, err: AgentError) -> McpError {
    match err {
        AgentError::Remote {
            code: airlock_protocol::ErrorCode::NotFound,
            message,
        } => McpError::resource_not_found(format!("{uri}: {message}"), None),
        AgentError::Remote { message, .. } => {
            McpError::invalid_params(format!("{uri}: {message}"), None)
        }
        other => {
            McpError::internal_error(format!("{uri}: the sandbox did not answer: {other}"), None)
        }
    }
}

impl AirlockServer {
    /// The sandbox a resource request is about, if it exists; never made.
    /// A sessionless caller that names no sandbox has none.
    async fn resource_lease(
        &self,
        ctx: &RequestContext<RoleServer>,
        sandbox_id: Option<String>,
    ) -> Result<Option<Lease<Sandbox>>, McpError> {
        let (principal, target) = self
            .target(ctx, sandbox_id)
            .map_err(|fail| McpError::invalid_params(fail.0, None))?;
        match target {
            Target::Conversation(c) => self
                .registry()
                .existing(&c, &principal)
                .await
                .map_err(registry_error),
            Target::Explicit(id) => self
                .registry()
                .get(&id, &principal)
                .await
                .map(Some)
                .map_err(registry_error),
            Target::New => Ok(None),
        }
    }

    /// The files under /home/sandbox of the conversation's sandbox, by path,
    /// a page at a time.
    pub(super) async fn list_sandbox_resources(
        &self,
        cursor: Option<String>,
        ctx: &RequestContext<RoleServer>,
    ) -> Result<ListResourcesResult, McpError> {
        let start = match cursor.as_deref() {
            None => 0,
            Some(c) => c
                .parse::<usize>()
                .ok()
                .filter(|&n| n <= MAX_LISTED as usize)
                .ok_or_else(|| McpError::invalid_params("unknown cursor", None))?,
        };
        let Some(lease) = self.resource_lease(ctx, None).await? else {
            return Ok(ListResourcesResult::with_all_items(Vec::new()));
        };
        let list = ListFiles {
            path: SANDBOX_HOME.to_string(),
            recursive: true,
            max_depth: None,
            max_entries: Some(MAX_LISTED),
        };
        let listing = tokio::select! {
            r = lease.sandbox().client().list_files(list) => r.map_err(|e| agent_error(SANDBOX_HOME, e))?,
            _ = lease.cancelled() => return Err(McpError::internal_error("the sandbox was reset or destroyed during the listing", None)),
        };
        let mut files: Vec<_> = listing
            .entries
            .into_iter()
            .filter(|e| e.kind == FileKind::File)
            .collect();
        files.sort_by(|a, b| a.path.cmp(&b.path));
        let page: Vec<Resource> = files
            .iter()
            .skip(start)
            .take(PAGE)
            .map(|f| {
                let name = f
                    .path
                    .strip_prefix(SANDBOX_HOME)
                    .map(|p| p.trim_start_matches('/'))
                    .unwrap_or(&f.path);
                Resource::new(uri_for(None, &f.path), name)
                    .with_mime_type(mime_for(&f.path))
                    .with_size(f.size)
            })
            .collect();
        let mut result = ListResourcesResult::with_all_items(page);
        if start + PAGE < files.len() {
            result.next_cursor = Some((start + PAGE).to_string());
        }
        Ok(result)
    }

    /// One file, whole: text as text, anything else as a base64 blob.
    pub(super) async fn read_sandbox_resource(
        &self,
        uri: &str,
        ctx: &RequestContext<RoleServer>,
    ) -> Result<ReadResourceResult, McpError> {
        let parsed = parse_uri(uri).map_err(|m| McpError::invalid_params(m, None))?;
        let Some(lease) = self.resource_lease(ctx, parsed.sandbox_id.clone()).await? else {
            return Err(McpError::resource_not_found(
                "this conversation has no sandbox yet: it is created at the first tool call \
                 (clients without MCP sessions name theirs: sandbox://<sandbox_id>/<path>)",
                None,
            ));
        };
        let client = lease.sandbox().client();
        let (data, bytes) = tokio::select! {
            r = client.read_file_range(&parsed.path, 0, Some(MAX_FILE_BYTES as u64)) => r.map_err(|e| agent_error(uri, e))?,
            _ = lease.cancelled() => return Err(McpError::internal_error("the sandbox was reset or destroyed during the read", None)),
        };
        if !data.eof {
            return Err(McpError::invalid_params(
                format!(
                    "{uri} is {} bytes; a resource read returns at most {MAX_FILE_BYTES} (10 MiB): use the read_file tool with offset and length",
                    data.size
                ),
                None,
            ));
        }
        let mime = mime_for(&parsed.path);
        let contents = match String::from_utf8(bytes) {
            Ok(text) if textual(mime) => {
                let mime = if mime == "application/octet-stream" {
                    "text/plain"
                } else {
                    mime
                };
                ResourceContents::text(text, uri).with_mime_type(mime)
            }
            Ok(text) => blob(text.into_bytes(), uri, mime),
            Err(e) => blob(e.into_bytes(), uri, mime),
        };
        Ok(ReadResourceResult::new(vec![contents]))
    }
}

fn blob(bytes: Vec<u8>, uri: &str, mime: &str) -> ResourceContents {
    // Bytes that are not UTF-8 are not text, whatever the name says.
    let mime = if textual(mime) {
        "application/octet-stream"
    } else {
        mime
    };
    ResourceContents::blob(base64::engine::general_purpose::STANDARD.encode(bytes), uri)
        .with_mime_type(mime)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uris_round_trip_and_hostile_ones_are_refused() {
        let path = "/home/sandbox/my data/ü#1.csv";
        let uri = uri_for(None, path);
        assert_eq!(uri, "sandbox:///home/sandbox/my%20data/%C3%BC%231.csv");
        assert_eq!(
            parse_uri(&uri).unwrap(),
            SandboxUri {
                sandbox_id: None,
                path: path.into()
            }
        );
        let id = "0123456789abcdef0123456789ABCDEF";
        let parsed = parse_uri(&format!("sandbox://{id}/tmp/x")).unwrap();
        assert_eq!(
            parsed.sandbox_id.as_deref(),
            Some(&*id.to_ascii_lowercase())
        );
        assert_eq!(parsed.path, "/tmp/x");
        for bad in [
            "file:///etc/passwd",
            "test://static-text",
            "sandbox://",
            "sandbox:///",
            "sandbox://host/x",
            "sandbox:///a%zz",
            "sandbox:///a%0",
            "sandbox:///a%00b",
            "sandbox:///a%FF",
            "sandbox:///a?x=1",
        ] {
            assert!(parse_uri(bad).is_err(), "{bad}");
        }
        let long = format!("sandbox:///{}", "a".repeat(MAX_PATH_BYTES + 1));
        assert!(parse_uri(&long).is_err());
    }

    #[test]
    fn mime_types_follow_the_name() {
        assert_eq!(mime_for("/home/sandbox/a.CSV"), "text/csv");
        assert_eq!(mime_for("/home/sandbox/plot.png"), "image/png");
        assert_eq!(mime_for("/home/sandbox/README"), "text/plain");
        assert_eq!(
            mime_for("/home/sandbox/.hidden"),
            "application/octet-stream"
        );
        assert_eq!(mime_for("/home/sandbox/dir.d/blob"), "text/plain");
        assert!(textual("application/json") && !textual("image/png"));
    }
}

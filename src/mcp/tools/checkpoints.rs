//! The checkpoint tools: checkpoint_sandbox, rollback_sandbox,
//! fork_sandbox and list_checkpoints. The registry does the work
//! (`sandbox::registry::checkpoints`); these check the arguments and say
//! in the results what persists and for how long.

use std::time::Instant;

use rmcp::handler::server::wrapper::Parameters;
use rmcp::model::{CallToolResult, ContentBlock};
use rmcp::service::RequestContext;
use rmcp::{ErrorData as McpError, RoleServer, tool, tool_router};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::{
    AirlockServer, Fail, Target, ToolResult, created_note, is_id, optional, portable_output_schema,
    structured, with_progress,
};
use crate::sandbox::Sandbox;
use crate::sandbox::registry::{CheckpointInfo, SandboxRef, fmt_bytes};

#[derive(Debug, Deserialize, JsonSchema)]
pub struct CheckpointArgs {
    /// A short note to recognise the checkpoint by in list_checkpoints (at
    /// most 200 characters).
    #[serde(default)]
    #[schemars(with = "String", transform = optional)]
    pub label: Option<String>,
    /// Only for clients without MCP sessions: the sandbox_id returned by an
    /// earlier call. Omit it to mean this conversation's sandbox.
    #[serde(default)]
    #[schemars(with = "String", transform = optional)]
    pub sandbox_id: Option<String>,
}

#[derive(Debug, Deserialize, JsonSchema)]
pub struct RollbackArgs {
    /// The checkpoint_id returned by checkpoint_sandbox (list_checkpoints
    /// shows them).
    pub checkpoint_id: String,
    /// Only for clients without MCP sessions: the sandbox_id returned by an
    /// earlier call. Omit it to mean this conversation's sandbox.
    #[serde(default)]
    #[schemars(with = "String", transform = optional)]
    pub sandbox_id: Option<String>,
}

#[derive(Debug, Deserialize, JsonSchema)]
pub struct ForkArgs {
    /// The checkpoint to start the copy from (of this sandbox or another
    /// of yours). Omit it to copy the sandbox as it is now (a checkpoint
    /// is taken for it).
    #[serde(default)]
    #[schemars(with = "String", transform = optional)]
    pub checkpoint_id: Option<String>,
    /// Only for clients without MCP sessions: the sandbox_id returned by an
    /// earlier call. Omit it to mean this conversation's sandbox.
    #[serde(default)]
    #[schemars(with = "String", transform = optional)]
    pub sandbox_id: Option<String>,
}

#[derive(Debug, Deserialize, JsonSchema)]
pub struct ListCheckpointsArgs {
    /// Only for clients without MCP sessions: the sandbox_id returned by an
    /// earlier call. Omit it to mean this conversation's sandbox.
    #[serde(default)]
    #[schemars(with = "String", transform = optional)]
    pub sandbox_id: Option<String>,
}

/// What checkpoint_sandbox returns.
#[derive(Debug, Clone, Serialize, JsonSchema)]
pub struct CheckpointResult {
    pub sandbox_id: String,
    #[serde(flatten)]
    pub checkpoint: CheckpointInfo,
}

/// What rollback_sandbox returns.
#[derive(Debug, Clone, Serialize, JsonSchema)]
pub struct RollbackResult {
    pub sandbox_id: String,
    pub checkpoint_id: String,
    /// Checkpoints taken after the target, discarded by the rollback.
    pub discarded_checkpoint_ids: Vec<String>,
}

/// What fork_sandbox returns.
#[derive(Debug, Clone, Serialize, JsonSchema)]
pub struct ForkResult {
    /// The new sandbox: pass it as sandbox_id to use it.
    pub sandbox_id: String,
    pub parent_sandbox_id: String,
    /// The checkpoint the fork started from.
    pub checkpoint_id: String,
}

/// What list_checkpoints returns.
#[derive(Debug, Clone, Serialize, JsonSchema)]
pub struct ListCheckpointsResult {
    pub sandbox_id: String,
    /// Oldest first.
    pub checkpoints: Vec<CheckpointInfo>,
    /// Disk all of this client's checkpoints take, over its sandboxes.
    pub used_bytes: u64,
    /// This client's snapshot storage quota.
    pub quota_bytes: u64,
}

fn check_checkpoint_id(id: &str) -> Result<String, Fail> {
    if is_id(id) {
        Ok(id.to_ascii_lowercase())
    } else {
        Err(Fail(
            "checkpoint_id must be the 32-hex-digit id returned by checkpoint_sandbox (list_checkpoints shows them)"
                .into(),
        ))
    }
}

#[tool_router(router = checkpoint_tool_router, vis = "pub(super)")]
impl AirlockServer {
    #[tool(
        description = "Save this conversation's sandbox as it is now, as a checkpoint to roll back to \
        (rollback_sandbox) or copy (fork_sandbox). The sandbox carries on unchanged. Returns the \
        checkpoint_id. A checkpoint holds the sandbox's whole state (files, variables of every \
        interpreter, processes) and lives as long as its sandbox, across pauses, resets and server \
        restarts, until a rollback to an earlier checkpoint discards it; ending the sandbox discards \
        all of its checkpoints. Checkpoints count against this client's snapshot storage quota \
        (list_checkpoints shows it).",
        output_schema = portable_output_schema::<CheckpointResult>(),
        annotations(
            title = "Checkpoint the sandbox",
            read_only_hint = false,
            destructive_hint = false,
            idempotent_hint = false,
            open_world_hint = false
        )
    )]
    async fn checkpoint_sandbox(
        &self,
        Parameters(args): Parameters<CheckpointArgs>,
        ctx: RequestContext<RoleServer>,
    ) -> Result<CallToolResult, McpError> {
        let started = Instant::now();
        let result = self.checkpoint_inner(args, &ctx).await;
        self.finish("checkpoint_sandbox", started, result)
    }

    #[tool(
        description = "Put this conversation's sandbox back exactly as it was at a checkpoint: files, \
        variables and processes are those of the checkpoint, and everything done since is gone \
        (calls still running are stopped). The sandbox keeps its sandbox_id; the checkpoint is kept, \
        and the checkpoints taken after it are discarded. A checkpoint holds the sandbox's whole \
        state and lives as long as its sandbox, until a rollback to an earlier one discards it.",
        output_schema = portable_output_schema::<RollbackResult>(),
        annotations(
            title = "Roll back to a checkpoint",
            read_only_hint = false,
            destructive_hint = true,
            idempotent_hint = true,
            open_world_hint = false
        )
    )]
    async fn rollback_sandbox(
        &self,
        Parameters(args): Parameters<RollbackArgs>,
        ctx: RequestContext<RoleServer>,
    ) -> Result<CallToolResult, McpError> {
        let started = Instant::now();
        let result = self.rollback_inner(args, &ctx).await;
        self.finish("rollback_sandbox", started, result)
    }

    #[tool(
        description = "Start a new, independent sandbox as a copy of a checkpoint (of this sandbox or \
        another of yours), or, without checkpoint_id, of this sandbox as it is now (a checkpoint is \
        taken for it). The copy has every file, variable and process of the original but its own \
        random numbers and clock; what either does later, the other does not see. Returns the new \
        sandbox_id: pass it to other tools to use the copy. The copy counts as one of this client's \
        sandboxes and expires like any other. A checkpoint holds the sandbox's whole state and lives \
        as long as its sandbox, until a rollback to an earlier one discards it.",
        output_schema = portable_output_schema::<ForkResult>(),
        annotations(
            title = "Fork the sandbox",
            read_only_hint = false,
            destructive_hint = false,
            idempotent_hint = false,
            open_world_hint = false
        )
    )]
    async fn fork_sandbox(
        &self,
        Parameters(args): Parameters<ForkArgs>,
        ctx: RequestContext<RoleServer>,
    ) -> Result<CallToolResult, McpError> {
        let started = Instant::now();
        let result = self.fork_inner(args, &ctx).await;
        self.finish("fork_sandbox", started, result)
    }

    #[tool(
        description = "List the checkpoints of this conversation's sandbox, oldest first: id, label, \
        when it was taken and its size, with the disk all of this client's checkpoints take and its \
        quota. A checkpoint holds the sandbox's whole state and lives as long as its sandbox, until a \
        rollback to an earlier one discards it.",
        output_schema = portable_output_schema::<ListCheckpointsResult>(),
        annotations(
            title = "List checkpoints",
            read_only_hint = true,
            destructive_hint = false,
            idempotent_hint = true,
            open_world_hint = false
        )
    )]
    async fn list_checkpoints(
        &self,
        Parameters(args): Parameters<ListCheckpointsArgs>,
        ctx: RequestContext<RoleServer>,
    ) -> Result<CallToolResult, McpError> {
        let started = Instant::now();
        let result = self.list_checkpoints_inner(args, &ctx).await;
        self.finish("list_checkpoints", started, result)
    }
}

impl AirlockServer {
    /// The sandbox a checkpoint tool is about, found and checked without
    /// holding its VM (a rollback works on one that has none); a sessionless
    /// call must name it.
    async fn named_sandbox(
        &self,
        ctx: &RequestContext<RoleServer>,
        sandbox_id: Option<String>,
    ) -> Result<SandboxRef<Sandbox>, Fail> {
        let (principal, target) = self.target(ctx, sandbox_id)?;
        let found = match &target {
            Target::Conversation(c) => self.registry.resolve(Some(c), None, &principal).await,
            Target::Explicit(id) => self.registry.resolve(None, Some(id), &principal).await,
            Target::New => {
                return Err(Fail(
                    "this client has no session, so name the sandbox: pass the sandbox_id returned by an earlier call"
                        .into(),
                ));
            }
        };
        Ok(found?)
    }

    async fn checkpoint_inner(
        &self,
        args: CheckpointArgs,
        ctx: &RequestContext<RoleServer>,
    ) -> ToolResult {
        let sandbox = self.named_sandbox(ctx, args.sandbox_id).await?;
        let sandbox_id = sandbox.id().to_string();
        let label = args.label.filter(|l| !l.is_empty());
        let taking = self.registry.checkpoint(&sandbox, label);
        let checkpoint = with_progress(ctx, "saving the checkpoint", None, taking).await?;
        let text = format!(
            "Checkpoint {} of sandbox {sandbox_id} saved ({}{}). rollback_sandbox with this checkpoint_id puts the sandbox back to this moment; fork_sandbox starts a copy from it.",
            checkpoint.checkpoint_id,
            fmt_bytes(checkpoint.size_bytes),
            if checkpoint.label.is_empty() {
                String::new()
            } else {
                format!(", label {:?}", checkpoint.label)
            }
        );
        let mut result = CallToolResult::structured(structured(&CheckpointResult {
            sandbox_id,
            checkpoint,
        })?);
        result.content = vec![ContentBlock::text(text)];
        Ok(result)
    }

    async fn rollback_inner(
        &self,
        args: RollbackArgs,
        ctx: &RequestContext<RoleServer>,
    ) -> ToolResult {
        let checkpoint_id = check_checkpoint_id(&args.checkpoint_id)?;
        let sandbox = self.named_sandbox(ctx, args.sandbox_id).await?;
        let sandbox_id = sandbox.id().to_string();
        let rolling = self.registry.rollback(&sandbox, &checkpoint_id);
        let discarded = with_progress(ctx, "rolling back", None, rolling).await?;
        let mut text = format!(
            "Sandbox {sandbox_id} is back as it was at checkpoint {checkpoint_id}: files, variables and processes from after it are gone."
        );
        if !discarded.is_empty() {
            text.push_str(&format!(
                " The {} checkpoint(s) taken after it were discarded.",
                discarded.len()
            ));
        }
        let mut result = CallToolResult::structured(structured(&RollbackResult {
            sandbox_id,
            checkpoint_id,
            discarded_checkpoint_ids: discarded,
        })?);
        result.content = vec![ContentBlock::text(text)];
        Ok(result)
    }

    async fn fork_inner(&self, args: ForkArgs, ctx: &RequestContext<RoleServer>) -> ToolResult {
        let checkpoint_id = match args.checkpoint_id.as_deref().filter(|id| !id.is_empty()) {
            Some(id) => Some(check_checkpoint_id(id)?),
            None => None,
        };
        let sandbox = self.named_sandbox(ctx, args.sandbox_id).await?;
        let parent = sandbox.id().to_string();
        let forking = self.registry.fork(&sandbox, checkpoint_id.as_deref());
        let (child, taken) = with_progress(ctx, "starting the fork", None, forking).await?;
        let from = match (&taken, checkpoint_id) {
            (Some(taken), _) => taken.checkpoint_id.clone(),
            (None, Some(id)) => id,
            (None, None) => String::new(),
        };
        let mut text = created_note(child.id());
        text.push_str(&format!(
            "It is an independent copy of sandbox {parent} at checkpoint {from}{}: what either does from now on, the other does not see.",
            if taken.is_some() {
                " (taken now for this fork)"
            } else {
                ""
            }
        ));
        let mut result = CallToolResult::structured(structured(&ForkResult {
            sandbox_id: child.id().to_string(),
            parent_sandbox_id: parent,
            checkpoint_id: from,
        })?);
        result.content = vec![ContentBlock::text(text)];
        Ok(result)
    }

    async fn list_checkpoints_inner(
        &self,
        args: ListCheckpointsArgs,
        ctx: &RequestContext<RoleServer>,
    ) -> ToolResult {
        let sandbox = self.named_sandbox(ctx, args.sandbox_id).await?;
        let list = self.registry.list_checkpoints(&sandbox);
        let mut text = if list.checkpoints.is_empty() {
            format!(
                "Sandbox {} has no checkpoints (checkpoint_sandbox takes one).\n",
                list.sandbox_id
            )
        } else {
            let mut text = format!(
                "Sandbox {} has {} checkpoint(s), oldest first:\n",
                list.sandbox_id,
                list.checkpoints.len()
            );
            for c in &list.checkpoints {
                let when = std::time::UNIX_EPOCH
                    + std::time::Duration::from_secs_f64(c.created_unix.max(0.0));
                text.push_str(&format!(
                    "{}  {}  {}{}\n",
                    c.checkpoint_id,
                    humantime::format_rfc3339_seconds(when),
                    fmt_bytes(c.size_bytes),
                    if c.label.is_empty() {
                        String::new()
                    } else {
                        format!("  {:?}", c.label)
                    }
                ));
            }
            text
        };
        text.push_str(&format!(
            "This client's checkpoints take {} of its {} quota.",
            fmt_bytes(list.principal_bytes),
            fmt_bytes(list.quota_bytes)
        ));
        let mut result = CallToolResult::structured(structured(&ListCheckpointsResult {
            sandbox_id: list.sandbox_id,
            checkpoints: list.checkpoints,
            used_bytes: list.principal_bytes,
            quota_bytes: list.quota_bytes,
        })?);
        result.content = vec![ContentBlock::text(text)];
        Ok(result)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checkpoint_ids_are_checked() {
        assert!(check_checkpoint_id("0123456789abcdef0123456789ABCDEF").is_ok());
        let Fail(m) = check_checkpoint_id("../x").unwrap_err();
        assert!(m.contains("32-hex-digit"), "{m}");
    }
}

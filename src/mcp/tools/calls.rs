//! The tools' work: each call's arguments checked, its sandbox leased, the
//! agent asked, and the result shaped.

use super::*;

impl AirlockServer {
    pub(super) async fn run_code_inner(
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
        let (lease, created) = self.lease(ctx, args.sandbox_id, args.image).await?;
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

    pub(super) async fn run_command_inner(
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
        let (lease, created) = self.lease(ctx, args.sandbox_id, args.image).await?;
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

    pub(super) async fn write_file_inner(
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
        let (lease, created) = self.lease(ctx, args.sandbox_id, args.image).await?;
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

    pub(super) async fn read_file_inner(
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
        let (lease, created) = self.lease(ctx, args.sandbox_id, args.image).await?;
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

    pub(super) async fn list_files_inner(
        &self,
        args: ListFilesArgs,
        ctx: &RequestContext<RoleServer>,
    ) -> ToolResult {
        let path = args
            .path
            .filter(|p| !p.is_empty())
            .unwrap_or_else(|| SANDBOX_HOME.to_string());
        check_path("path", &path)?;
        let (lease, created) = self.lease(ctx, args.sandbox_id, args.image).await?;
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

    pub(super) async fn reset_inner(
        &self,
        args: SandboxArgs,
        ctx: &RequestContext<RoleServer>,
    ) -> ToolResult {
        let (principal, target) = self.target(ctx, args.sandbox_id)?;
        let resetting = async {
            match &target {
                Target::Conversation(c) => self.registry.reset_conversation(c, &principal).await,
                Target::Explicit(id) => self.registry.reset_explicit(id, &principal).await,
                Target::New => self.registry.create_explicit(&principal, None).await,
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

    pub(super) async fn info_inner(
        &self,
        args: SandboxArgs,
        ctx: &RequestContext<RoleServer>,
    ) -> ToolResult {
        let (principal, target) = self.target(ctx, args.sandbox_id)?;
        let lease = match &target {
            Target::Conversation(c) => self.registry.existing(c, &principal).await?,
            Target::Explicit(id) => Some(self.registry.get(id, &principal).await?),
            Target::New => None,
        };
        let limits = self.registry.limits();
        let mut info = InfoResult {
            sandbox_id: None,
            image: None,
            images: self.images_for(&principal),
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
            egress: Default::default(),
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
                info.image = Some(i.image.clone());
                info.memory_mib = i.memory_mib;
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
                info.egress = i.egress;
                let e = &i.egress;
                if e.connections_allowed + e.connections_denied > 0 {
                    text.push_str(&format!(
                        "Network: {} connection(s) allowed and {} denied by the egress policy; {} sent, {} received.\n",
                        e.connections_allowed,
                        e.connections_denied,
                        crate::sandbox::registry::fmt_bytes(e.bytes_out),
                        crate::sandbox::registry::fmt_bytes(e.bytes_in)
                    ));
                }
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
                    "Sandbox {} (image {}): {} old; destroyed after {} without tool calls, and in any case in {} (maximum lifetime).\n\
                     Usage so far: {:.2} vCPU-seconds, {:.1} memory GB-seconds, {} runs.\n",
                    i.id,
                    i.image,
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
        let network = match &self.limits.egress {
            Some(egress) => egress.describe(&principal),
            None => "no network".into(),
        };
        text.push_str(&format!(
            "Limits: idle timeout {}, maximum lifetime {}, longest timeout {}, files up to 10 MiB per call, {} vCPU(s), {} MiB memory, {network}.",
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

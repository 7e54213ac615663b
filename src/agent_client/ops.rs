//! The typed operations on top of raw requests.

use super::*;

impl AgentClient {
    /// Checks that the agent answers; returns its version and uptime.
    pub async fn ping(&self) -> Result<Pong> {
        let frame = self.call(Message::Ping, "ping").await?;
        match frame.message {
            Message::Pong(pong) => Ok(pong),
            other => Err(AgentError::UnexpectedReply {
                request: Kind::Ping,
                got: other.kind(),
            }),
        }
    }

    /// Asks the agent to sync and reboot the guest, which ends the VM. The
    /// connection may close before the acknowledgement arrives; that counts
    /// as success too.
    pub async fn shutdown(&self) -> Result<()> {
        match self.call(Message::Shutdown, "shutdown").await {
            Ok(frame) if frame.message == Message::ShutdownOk => Ok(()),
            Ok(frame) => Err(AgentError::UnexpectedReply {
                request: Kind::Shutdown,
                got: frame.message.kind(),
            }),
            Err(AgentError::Closed(_)) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// One request, its final frame, within the request timeout.
    async fn call(&self, message: Message, what: &'static str) -> Result<Frame> {
        let exchange = async { self.request(message, Vec::new()).await?.finish().await };
        tokio::time::timeout(self.request_timeout, exchange)
            .await
            .map_err(|_| AgentError::Timeout {
                what,
                after: self.request_timeout,
            })?
    }
    /// Asks the agent to cancel request `request_id` (see [`Response::cancel`]).
    pub async fn cancel(&self, request_id: u64) -> Result<()> {
        let bytes = Frame::new(request_id, Message::Cancel).encode()?;
        self.outbox
            .send(bytes)
            .await
            .map_err(|_| self.shared.closed_error())
    }

    /// One request, its final frame and payload, within `bound`.
    async fn call_with(
        &self,
        message: Message,
        payload: Vec<u8>,
        what: &'static str,
        bound: Duration,
    ) -> Result<Frame> {
        let exchange = async { self.request(message, payload).await?.finish().await };
        tokio::time::timeout(bound, exchange)
            .await
            .map_err(|_| AgentError::Timeout { what, after: bound })?
    }

    /// Starts a command; stream its events with [`Call::next_event`], or
    /// wait for it with [`Call::finish_exec`]. Dropping the call cancels it.
    pub async fn start_exec(&self, exec: Exec, stdin: Vec<u8>) -> Result<Call> {
        let bound = op_bound(exec.timeout_ms);
        let budget = Budget::for_limits(&exec.output);
        let response = self.request(Message::Exec(exec), stdin).await?;
        Ok(Call {
            response,
            bound,
            budget,
        })
    }

    /// Runs a command as the sandbox user and collects its output.
    pub async fn exec(&self, exec: Exec, stdin: Vec<u8>) -> Result<ExecOutput> {
        self.start_exec(exec, stdin)
            .await?
            .finish_exec(|_| {})
            .await
    }

    /// Runs `script` with `bash -c`, with a timeout and default limits.
    pub async fn sh(&self, script: &str, timeout: Duration) -> Result<ExecOutput> {
        self.exec(
            Exec {
                command: Command::Shell(script.to_string()),
                cwd: None,
                env: Vec::new(),
                timeout_ms: Some(timeout.as_millis() as u64),
                output: OutputLimits::default(),
            },
            Vec::new(),
        )
        .await
    }

    /// Starts code in the warm interpreter of its language.
    pub async fn start_run_code(&self, run: RunCode, code: impl Into<Vec<u8>>) -> Result<Call> {
        let bound = op_bound(run.timeout_ms);
        let budget = Budget::for_limits(&run.output);
        let response = self.request(Message::RunCode(run), code.into()).await?;
        Ok(Call {
            response,
            bound,
            budget,
        })
    }

    /// Runs code in the warm interpreter of `language` with a timeout and
    /// default output limits, and collects its output and images.
    pub async fn run_code(
        &self,
        language: Language,
        code: &str,
        timeout: Duration,
    ) -> Result<RunOutput> {
        let run = RunCode {
            language,
            timeout_ms: Some(timeout.as_millis() as u64),
            output: OutputLimits::default(),
        };
        self.start_run_code(run, code)
            .await?
            .finish_run(|_| {})
            .await
    }

    /// Drops the state of one interpreter (or of all); they stay warm (bash
    /// restarts its shell).
    pub async fn reset(&self, language: Option<Language>) -> Result<()> {
        let message = Message::ResetInterpreter(ResetInterpreter { language });
        let frame = self
            .call_with(message, Vec::new(), "reset", self.long_request_timeout)
            .await?;
        expect(frame, Kind::ResetInterpreter, |m| match m {
            Message::Done => Some(()),
            _ => None,
        })
        .map(|(v, _)| v)
    }

    /// Which interpreters are warm; with `wait`, first waits up to that long
    /// for all of them to finish starting.
    pub async fn warm_status(&self, wait: Option<Duration>) -> Result<WarmStatusReply> {
        let wait_ms = wait.map(|w| w.as_millis() as u64);
        let bound = self.request_timeout + wait.unwrap_or_default();
        let frame = self
            .call_with(
                Message::WarmStatus(WarmStatus { wait_ms }),
                Vec::new(),
                "warm status",
                bound,
            )
            .await?;
        expect(frame, Kind::WarmStatus, |m| match m {
            Message::WarmStatusReply(r) => Some(r),
            _ => None,
        })
        .map(|(v, _)| v)
    }

    /// Makes a restored guest fresh: mixes `entropy` into its kernel RNG,
    /// sets its clock, reseeds the interpreters' generators.
    pub async fn refresh(
        &self,
        wall_clock_unix_ns: Option<u64>,
        entropy: Vec<u8>,
    ) -> Result<RefreshReply> {
        let message = Message::Refresh(Refresh {
            wall_clock_unix_ns,
            egress: false,
        });
        let frame = self
            .call_with(message, entropy, "refresh", self.long_request_timeout)
            .await?;
        expect(frame, Kind::Refresh, |m| match m {
            Message::RefreshReply(r) => Some(r),
            _ => None,
        })
        .map(|(v, _)| v)
    }

    /// Changes limits on user code (absent fields stay); returns those in force.
    pub async fn set_limits(&self, limits: SetLimits) -> Result<Limits> {
        let frame = self
            .call_with(
                Message::SetLimits(limits),
                Vec::new(),
                "set limits",
                self.long_request_timeout,
            )
            .await?;
        expect(frame, Kind::SetLimits, |m| match m {
            Message::Limits(l) => Some(l),
            _ => None,
        })
        .map(|(v, _)| v)
    }

    /// The limits in force and current use.
    pub async fn limits(&self) -> Result<Limits> {
        self.set_limits(SetLimits::default()).await
    }

    /// Writes a file as the sandbox user (at most [`MAX_FILE_LEN`] bytes).
    pub async fn write_file(&self, write: WriteFile, content: Vec<u8>) -> Result<FileStat> {
        let frame = self
            .call_with(
                Message::WriteFile(write),
                content,
                "write file",
                self.long_request_timeout,
            )
            .await?;
        expect(frame, Kind::WriteFile, |m| match m {
            Message::FileStat(s) => Some(s),
            _ => None,
        })
        .map(|(v, _)| v)
    }

    /// Reads a byte range of a file (`length: None` reads to the end, up to
    /// [`MAX_FILE_LEN`]).
    pub async fn read_file_range(
        &self,
        path: &str,
        offset: u64,
        length: Option<u64>,
    ) -> Result<(FileData, Vec<u8>)> {
        let message = Message::ReadFile(ReadFile {
            path: path.to_string(),
            offset,
            length,
        });
        let frame = self
            .call_with(message, Vec::new(), "read file", self.long_request_timeout)
            .await?;
        let (data, bytes) = expect(frame, Kind::ReadFile, |m| match m {
            Message::FileData(d) => Some(d),
            _ => None,
        })?;
        check_file_range(&data, bytes.len(), offset, length)?;
        Ok((data, bytes))
    }

    /// Reads a whole file, in ranges if it is bigger than one frame, up to
    /// `max_bytes`.
    pub async fn read_file(&self, path: &str, max_bytes: u64) -> Result<Vec<u8>> {
        let mut out = Vec::new();
        loop {
            let want = (max_bytes - out.len() as u64).min(MAX_FILE_LEN);
            let (data, bytes) = self
                .read_file_range(path, out.len() as u64, Some(want))
                .await?;
            out.extend_from_slice(&bytes);
            if data.eof {
                return Ok(out);
            }
            if out.len() as u64 >= max_bytes || bytes.is_empty() {
                return Err(AgentError::Remote {
                    code: ErrorCode::TooLarge,
                    message: format!("{path} is {} bytes, more than {max_bytes}", data.size),
                });
            }
        }
    }

    pub async fn list_files(&self, list: ListFiles) -> Result<FileList> {
        let frame = self
            .call_with(
                Message::ListFiles(list),
                Vec::new(),
                "list files",
                self.long_request_timeout,
            )
            .await?;
        expect(frame, Kind::ListFiles, |m| match m {
            Message::FileList(l) => Some(l),
            _ => None,
        })
        .map(|(v, _)| v)
    }

    pub async fn remove_file(&self, path: &str, recursive: bool) -> Result<()> {
        let message = Message::RemoveFile(RemoveFile {
            path: path.to_string(),
            recursive,
        });
        let frame = self
            .call_with(
                message,
                Vec::new(),
                "remove file",
                self.long_request_timeout,
            )
            .await?;
        expect(frame, Kind::RemoveFile, |m| match m {
            Message::Done => Some(()),
            _ => None,
        })
        .map(|(v, _)| v)
    }

    pub async fn stat_file(&self, path: &str) -> Result<FileStat> {
        let message = Message::StatFile(StatFile {
            path: path.to_string(),
        });
        let frame = self
            .call_with(message, Vec::new(), "stat file", self.long_request_timeout)
            .await?;
        expect(frame, Kind::StatFile, |m| match m {
            Message::FileStat(s) => Some(s),
            _ => None,
        })
        .map(|(v, _)| v)
    }
}

/// How long to wait for the result of an exec or run_code whose own timeout
/// is `timeout_ms`.
fn op_bound(timeout_ms: Option<u64>) -> Duration {
    let own = Duration::from_millis(timeout_ms.unwrap_or(airlock_protocol::DEFAULT_TIMEOUT_MS));
    own + RESULT_SLACK
}

/// The typed body of a final frame, or an error naming what came instead.
fn expect<T>(
    frame: Frame,
    request: Kind,
    pick: impl FnOnce(Message) -> Option<T>,
) -> Result<(T, Vec<u8>)> {
    let got = frame.message.kind();
    match pick(frame.message) {
        Some(v) => Ok((v, frame.payload)),
        None => Err(AgentError::UnexpectedReply { request, got }),
    }
}

/// A range reply must be the range asked for: callers add its offset and
/// length, and a hostile guest must not make that overflow or run past the
/// request.
fn check_file_range(data: &FileData, got: usize, offset: u64, length: Option<u64>) -> Result<()> {
    let asked = length.unwrap_or(MAX_FILE_LEN).min(MAX_FILE_LEN);
    let got = got as u64;
    if data.offset != offset || got > asked || data.offset.checked_add(got).is_none() {
        return Err(AgentError::BadReply(format!(
            "asked for {asked} bytes at {offset}, got {got} at {} of a {}-byte file",
            data.offset, data.size
        )));
    }
    Ok(())
}

#[cfg(test)]
mod range_tests {
    use super::*;

    #[test]
    fn file_ranges_that_contradict_the_request_are_refused() {
        let data = |offset, size| FileData {
            offset,
            size,
            eof: false,
        };
        assert!(check_file_range(&data(10, 100), 20, 10, Some(20)).is_ok());
        assert!(
            check_file_range(&data(11, 100), 20, 10, Some(20)).is_err(),
            "another offset"
        );
        assert!(
            check_file_range(&data(10, 100), 21, 10, Some(20)).is_err(),
            "more than asked"
        );
        assert!(
            check_file_range(&data(u64::MAX, u64::MAX), 1, u64::MAX, None).is_err(),
            "overflow"
        );
    }
}

//! An exec or run_code in flight, and what it collects.

use super::*;

/// A streamed event of an exec or run_code.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    Output { stream: Stream, bytes: Vec<u8> },
    Image { image: Image, bytes: Vec<u8> },
}

/// An exec or run_code in flight. Dropping it before the end cancels it.
pub struct Call {
    pub(super) response: Response,
    pub(super) bound: Duration,
    pub(super) budget: Budget,
}

/// What one call may keep on the host, whatever the guest sends: the output
/// limits it asked the agent for, images within the protocol's bounds, and
/// a count of frames. An agent keeps to these itself; one that does not is
/// cut off.
#[derive(Debug, Clone, Copy)]
pub struct Budget {
    pub stdout_max: u64,
    pub stderr_max: u64,
    pub images_max: usize,
    pub image_bytes_max: usize,
    pub images_total_bytes_max: usize,
    pub frames_max: u64,
}

/// Output past a cap that is tolerated (a chunk in flight when the agent
/// cut) before the guest counts as flooding.
const OVERRUN_GRACE_BYTES: u64 = 1 << 20;
/// Frames beyond one per byte of output allowed: results, images, empties.
const FRAME_SLACK: u64 = 4096;
/// Image bytes one call keeps in all.
pub const MAX_IMAGE_BYTES_PER_CALL: usize = 32 << 20;

impl Budget {
    pub fn for_limits(limits: &OutputLimits) -> Budget {
        let cap = |max: Option<u64>| max.unwrap_or(DEFAULT_OUTPUT_LIMIT).min(MAX_OUTPUT_LIMIT);
        let (stdout_max, stderr_max) = (cap(limits.stdout_max), cap(limits.stderr_max));
        Budget {
            stdout_max,
            stderr_max,
            images_max: MAX_IMAGES_PER_RUN as usize,
            image_bytes_max: MAX_IMAGE_LEN,
            images_total_bytes_max: MAX_IMAGE_BYTES_PER_CALL,
            // A frame carries at least one byte of output, or is one of few others.
            frames_max: stdout_max + stderr_max + FRAME_SLACK,
        }
    }
}

/// What a finished call returned: its final message and collected events.
struct Collected {
    message: Message,
    stdout: Kept,
    stderr: Kept,
    images: Vec<(Image, Vec<u8>)>,
    images_dropped: u32,
}

/// One output stream as the host kept it.
#[derive(Default)]
struct Kept {
    bytes: Vec<u8>,
    /// Bytes that arrived, kept or not.
    received: u64,
}

impl Kept {
    /// Keeps what fits under `max`; false once the guest is past any grace.
    fn take(&mut self, bytes: &[u8], max: u64) -> bool {
        self.received = self.received.saturating_add(bytes.len() as u64);
        let room = usize::try_from(max.saturating_sub(self.bytes.len() as u64)).unwrap_or(0);
        self.bytes
            .extend_from_slice(&bytes[..bytes.len().min(room)]);
        self.received <= max.saturating_add(OVERRUN_GRACE_BYTES)
    }

    /// The agent's stats, corrected for what the host cut.
    fn stats(&self, agent: StreamStats) -> StreamStats {
        let kept = self.bytes.len() as u64;
        StreamStats {
            kept_bytes: kept,
            total_bytes: agent.total_bytes.max(self.received).max(kept),
        }
    }
}

impl Call {
    pub fn request_id(&self) -> u64 {
        self.response.request_id()
    }

    /// Asks the agent to stop it (kill the command, interrupt the code); the
    /// result still comes, with `cancelled` set.
    pub async fn cancel(&self) -> Result<()> {
        self.response.cancel().await
    }

    /// The next event, or `Ok(None)` once the final frame has arrived (it
    /// is then returned by the `finish_*` methods).
    async fn next_frame(&mut self) -> Result<Frame> {
        match self.response.next().await? {
            Some(frame) => Ok(frame),
            None => Err(self.response.shared.closed_error()),
        }
    }

    /// Ends the connection to a guest that sends past every bound.
    fn cut_off(&self, what: String) -> AgentError {
        let reason = format!("the guest agent sent {what}; the connection was closed");
        self.response.shared.close(reason.clone());
        AgentError::Flood(reason)
    }

    async fn collect(&mut self, mut on_event: impl FnMut(&Event)) -> Result<Collected> {
        let bound = self.bound;
        let budget = self.budget;
        let collecting = async {
            let mut out = Collected {
                message: Message::Done,
                stdout: Kept::default(),
                stderr: Kept::default(),
                images: Vec::new(),
                images_dropped: 0,
            };
            let mut image_bytes = 0usize;
            let mut frames = 0u64;
            loop {
                let frame = self.next_frame().await?;
                frames += 1;
                if frames > budget.frames_max {
                    return Err(self.cut_off(format!(
                        "more than {} frames for one call",
                        budget.frames_max
                    )));
                }
                match frame.message {
                    Message::Output(o) => {
                        let event = Event::Output {
                            stream: o.stream,
                            bytes: frame.payload,
                        };
                        on_event(&event);
                        let Event::Output { stream, bytes } = event else {
                            continue;
                        };
                        let (kept, max) = match stream {
                            Stream::Stdout => (&mut out.stdout, budget.stdout_max),
                            Stream::Stderr => (&mut out.stderr, budget.stderr_max),
                        };
                        if !kept.take(&bytes, max) {
                            return Err(self.cut_off(format!(
                                "{} bytes of {stream:?} where {max} were allowed",
                                kept.received
                            )));
                        }
                    }
                    Message::Image(image) => {
                        let event = Event::Image {
                            image,
                            bytes: frame.payload,
                        };
                        on_event(&event);
                        let Event::Image { image, bytes } = event else {
                            continue;
                        };
                        let fits = out.images.len() < budget.images_max
                            && bytes.len() <= budget.image_bytes_max
                            && image_bytes + bytes.len() <= budget.images_total_bytes_max;
                        if fits {
                            image_bytes += bytes.len();
                            out.images.push((image, bytes));
                        } else {
                            out.images_dropped += 1;
                            if out.images_dropped as usize > budget.images_max {
                                return Err(self.cut_off("images past every bound".into()));
                            }
                        }
                    }
                    message => {
                        into_result(Frame::new(frame.request_id, message.clone()))?;
                        out.message = message;
                        return Ok(out);
                    }
                }
            }
        };
        tokio::time::timeout(bound, collecting)
            .await
            .map_err(|_| AgentError::Timeout {
                what: "the result of a call",
                after: bound,
            })?
    }

    /// Waits for the result of an exec, passing each event to `on_event`.
    pub async fn finish_exec(mut self, on_event: impl FnMut(&Event)) -> Result<ExecOutput> {
        let c = self.collect(on_event).await?;
        match c.message {
            Message::ExecResult(mut result) => {
                result.stdout = c.stdout.stats(result.stdout);
                result.stderr = c.stderr.stats(result.stderr);
                Ok(ExecOutput {
                    result,
                    stdout: c.stdout.bytes,
                    stderr: c.stderr.bytes,
                })
            }
            other => Err(AgentError::UnexpectedReply {
                request: Kind::Exec,
                got: other.kind(),
            }),
        }
    }

    /// Waits for the result of a run_code, passing each event to `on_event`.
    pub async fn finish_run(mut self, on_event: impl FnMut(&Event)) -> Result<RunOutput> {
        let c = self.collect(on_event).await?;
        match c.message {
            Message::RunCodeResult(mut result) => {
                result.process.stdout = c.stdout.stats(result.process.stdout);
                result.process.stderr = c.stderr.stats(result.process.stderr);
                // The agent's counts, corrected for what the host kept.
                result.images = c.images.len() as u32;
                result.images_dropped = result.images_dropped.saturating_add(c.images_dropped);
                Ok(RunOutput {
                    result,
                    stdout: c.stdout.bytes,
                    stderr: c.stderr.bytes,
                    images: c.images,
                })
            }
            other => Err(AgentError::UnexpectedReply {
                request: Kind::RunCode,
                got: other.kind(),
            }),
        }
    }
}

/// The outcome of an exec: its result and the output kept (see the
/// result's stream stats for what was cut).
#[derive(Debug, Clone)]
pub struct ExecOutput {
    pub result: ExecResult,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

impl ExecOutput {
    /// Exited with status 0 (not killed, not timed out).
    pub fn success(&self) -> bool {
        self.result.exit_code == Some(0) && !self.result.timed_out && !self.result.cancelled
    }

    pub fn stdout_text(&self) -> OutputText {
        OutputText::decode(&self.stdout, &self.result.stdout)
    }

    pub fn stderr_text(&self) -> OutputText {
        OutputText::decode(&self.stderr, &self.result.stderr)
    }
}

/// The outcome of a run_code: its result, output kept and images.
#[derive(Debug, Clone)]
pub struct RunOutput {
    pub result: RunCodeResult,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    pub images: Vec<(Image, Vec<u8>)>,
}

impl RunOutput {
    /// Ran to the end without an exception, timeout or lost state.
    pub fn success(&self) -> bool {
        let p = &self.result.process;
        p.exit_code == Some(0)
            && self.result.error.is_none()
            && !p.timed_out
            && !p.cancelled
            && !self.result.state_lost
    }

    pub fn stdout_text(&self) -> OutputText {
        OutputText::decode(&self.stdout, &self.result.process.stdout)
    }

    pub fn stderr_text(&self) -> OutputText {
        OutputText::decode(&self.stderr, &self.result.process.stderr)
    }
}

/// Output decoded for display: invalid UTF-8 replaced (and said so), and a
/// marker where the agent cut it, with the total size.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutputText {
    pub text: String,
    /// Some bytes were not UTF-8 and show as U+FFFD.
    pub lossy: bool,
    pub truncated: bool,
    pub total_bytes: u64,
}

impl OutputText {
    pub fn decode(bytes: &[u8], stats: &StreamStats) -> OutputText {
        let truncated = stats.truncated();
        // A cut can split a character: do not report that as invalid.
        let bytes = if truncated {
            trim_partial_char(bytes)
        } else {
            bytes
        };
        let decoded = String::from_utf8_lossy(bytes);
        let lossy = matches!(decoded, std::borrow::Cow::Owned(_));
        let mut text = decoded.into_owned();
        if truncated {
            if !text.is_empty() && !text.ends_with('\n') {
                text.push('\n');
            }
            text.push_str(&format!(
                "[output truncated: showing the first {} of {} bytes]\n",
                stats.kept_bytes, stats.total_bytes
            ));
        }
        if lossy {
            if !text.is_empty() && !text.ends_with('\n') {
                text.push('\n');
            }
            text.push_str(
                "[the output was not valid UTF-8; invalid bytes are shown as \u{FFFD}]\n",
            );
        }
        OutputText {
            text,
            lossy,
            truncated,
            total_bytes: stats.total_bytes.max(bytes.len() as u64),
        }
    }
}

/// Drops an incomplete UTF-8 sequence at the end of `bytes`.
fn trim_partial_char(bytes: &[u8]) -> &[u8] {
    // A character is at most 4 bytes: look at the last 3 for a lead byte
    // whose sequence does not fit.
    for back in 1..=3.min(bytes.len()) {
        let b = bytes[bytes.len() - back];
        if b & 0xC0 == 0x80 {
            continue; // continuation byte
        }
        let need = match b {
            0xC0..=0xDF => 2,
            0xE0..=0xEF => 3,
            0xF0..=0xF7 => 4,
            _ => 1,
        };
        if need > back {
            return &bytes[..bytes.len() - back];
        }
        break;
    }
    bytes
}

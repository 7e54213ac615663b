//! Runs the external tools of an image build, logging all their output to a
//! file and passing each line to a callback that decides what to show.

use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};

/// How many log lines to show when a step fails.
const FAILURE_TAIL_LINES: usize = 25;

/// Runs `cmd` to completion, appending its stdout and stderr to `log_path`.
pub fn run_logged(
    mut cmd: Command,
    what: &str,
    log_path: &Path,
    mut on_line: impl FnMut(&str),
) -> Result<()> {
    let mut log = File::options()
        .create(true)
        .append(true)
        .open(log_path)
        .with_context(|| format!("cannot open build log {}", log_path.display()))?;
    writeln!(log, "$ {cmd:?}").context("cannot write the build log")?;
    let (reader, writer) = std::io::pipe().context("cannot create a pipe")?;
    cmd.stdin(Stdio::null())
        .stdout(writer.try_clone().context("cannot duplicate a pipe")?)
        .stderr(writer);
    let mut child = cmd
        .spawn()
        .with_context(|| format!("cannot start {what}"))?;
    // The parent's copies of the write end must close, or EOF never comes.
    drop(cmd);
    let mut tail: std::collections::VecDeque<String> = Default::default();
    for line in BufReader::new(reader).split(b'\n') {
        let line = line.context("cannot read a build step's output")?;
        let line = String::from_utf8_lossy(&line);
        let line = line.trim_end_matches('\r');
        log.write_all(line.as_bytes())
            .and_then(|_| log.write_all(b"\n"))
            .context("cannot write the build log")?;
        if tail.len() == FAILURE_TAIL_LINES {
            tail.pop_front();
        }
        tail.push_back(line.to_string());
        on_line(line);
    }
    let status = child
        .wait()
        .with_context(|| format!("cannot wait for {what}"))?;
    if !status.success() {
        let shown: Vec<String> = tail.into_iter().collect();
        bail!(
            "{what} failed ({status}). Last lines of its output:\n{}\nFull log: {}",
            shown.join("\n"),
            log_path.display()
        );
    }
    Ok(())
}

/// Runs a short command and returns its stdout; fails with its stderr.
pub fn run_captured(mut cmd: Command, what: &str) -> Result<String> {
    let output = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot start {what}"))?;
    if !output.status.success() {
        bail!(
            "{what} failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_is_logged_and_seen_line_by_line() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("log");
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "echo one; echo two >&2"]);
        let mut seen = Vec::new();
        run_logged(cmd, "test", &log, |l| seen.push(l.to_string())).unwrap();
        seen.sort();
        assert_eq!(seen, ["one", "two"]);
        assert!(std::fs::read_to_string(&log).unwrap().contains("two"));
    }

    #[test]
    fn failure_shows_the_tail_and_the_log() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("log");
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "echo the-reason; exit 3"]);
        let err = run_logged(cmd, "a step", &log, |_| {})
            .unwrap_err()
            .to_string();
        assert!(err.contains("a step failed"), "{err}");
        assert!(err.contains("the-reason"), "{err}");
        assert!(err.contains(&log.display().to_string()), "{err}");
    }
}

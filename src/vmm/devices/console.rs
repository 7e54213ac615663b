//! Where the guest's serial output goes: a console log file capped in size
//! (past the cap it starts over, with a note), a bounded tail kept in memory
//! for error reports, and a watch for lines that matter to the VMM (a kernel
//! panic, the agent's readiness).

use std::collections::VecDeque;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::sync::{Arc, Mutex};

use crate::vmm::event::{VmEvent, VmEventSender};

/// Lines of console output kept for error reports.
pub const TAIL_LINES: usize = 40;
/// A guest that never ends a line cannot grow our buffer past this.
const MAX_LINE_BYTES: usize = 512;

const PANIC_MARKER: &str = "Kernel panic";

/// The last lines of console output, shared with whoever reports errors.
#[derive(Clone, Default)]
pub struct ConsoleTail(Arc<Mutex<VecDeque<String>>>);

impl ConsoleTail {
    pub fn lines(&self) -> Vec<String> {
        self.0
            .lock()
            .map(|t| t.iter().cloned().collect())
            .unwrap_or_default()
    }

    fn push(&self, line: String) {
        if let Ok(mut tail) = self.0.lock() {
            if tail.len() == TAIL_LINES {
                tail.pop_front();
            }
            tail.push_back(line);
        }
    }
}

pub struct ConsoleSink {
    log: Option<BufWriter<File>>,
    /// Bytes in the log file since it last started over, and the cap.
    log_bytes: u64,
    log_max: u64,
    line: Vec<u8>,
    tail: ConsoleTail,
    events: VmEventSender,
    panicked: bool,
    /// The readiness hint goes out once: a guest that repeats the line
    /// cannot queue events without end.
    ready_sent: bool,
}

impl ConsoleSink {
    /// `log` must be opened for appending, so that starting over is a
    /// truncation and nothing else.
    pub fn new(log: Option<File>, log_max: u64, tail: ConsoleTail, events: VmEventSender) -> Self {
        ConsoleSink {
            log: log.map(BufWriter::new),
            log_bytes: 0,
            log_max: log_max.max(MIN_LOG_BYTES),
            line: Vec::new(),
            tail,
            events,
            panicked: false,
            ready_sent: false,
        }
    }

    fn end_line(&mut self) {
        let text = String::from_utf8_lossy(&self.line)
            .trim_end_matches('\r')
            .to_string();
        self.line.clear();
        if text.contains(PANIC_MARKER) && !self.panicked {
            self.panicked = true;
            self.events.send(VmEvent::GuestPanic);
        }
        if !self.ready_sent
            && text.starts_with("airlock-agent ")
            && text.contains(airlock_protocol::READY_MARKER)
        {
            self.ready_sent = true;
            self.events.send(VmEvent::AgentReadyHint);
        }
        self.tail.push(text);
    }
}

impl ConsoleSink {
    fn log_write(&mut self, buf: &[u8]) {
        let incoming = buf.len() as u64;
        if self.log_bytes.saturating_add(incoming) > self.log_max {
            self.start_log_over();
        }
        let Some(log) = self.log.as_mut() else { return };
        // A full disk must not stop the guest; the tail still works.
        if log.write_all(buf).is_err() {
            self.log = None;
        }
        self.log_bytes = self.log_bytes.saturating_add(incoming);
    }

    fn start_log_over(&mut self) {
        let Some(log) = self.log.as_mut() else { return };
        let note = format!(
            "[airlock: the console log reached its cap of {} bytes and started over]\n",
            self.log_max
        );
        let restarted = log.flush().is_ok()
            && log.get_mut().set_len(0).is_ok()
            && log.write_all(note.as_bytes()).is_ok();
        if restarted {
            self.log_bytes = note.len() as u64;
        } else {
            self.log = None;
        }
    }
}

/// A cap below this would leave room for little but the restart note.
const MIN_LOG_BYTES: u64 = 4096;

impl Write for ConsoleSink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        for chunk in buf.chunks(MIN_LOG_BYTES as usize / 2) {
            self.log_write(chunk);
        }
        for &b in buf {
            if b == b'\n' {
                self.end_line();
                if let Some(log) = self.log.as_mut() {
                    let _ = log.flush();
                }
                continue;
            }
            if self.line.len() >= MAX_LINE_BYTES {
                self.end_line();
            }
            self.line.push(b);
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        if let Some(log) = self.log.as_mut() {
            log.flush()?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_a_bounded_tail_and_spots_a_panic() {
        let (events, rx) = crate::vmm::event::channel();
        let tail = ConsoleTail::default();
        let mut sink = ConsoleSink::new(None, 0, tail.clone(), events);
        for i in 0..100 {
            writeln!(sink, "line {i}").unwrap();
        }
        sink.write_all(&vec![b'x'; 2000]).unwrap();
        writeln!(sink, "Kernel panic - not syncing: VFS").unwrap();
        let lines = tail.lines();
        assert_eq!(lines.len(), TAIL_LINES);
        assert!(lines.iter().all(|l| l.len() <= MAX_LINE_BYTES));
        assert!(lines.last().unwrap().contains("Kernel panic"));
        assert!(matches!(rx.try_recv().unwrap(), VmEvent::GuestPanic));
        let ready = format!("airlock-agent 1.0 {}", airlock_protocol::READY_MARKER);
        for _ in 0..1000 {
            writeln!(sink, "{ready}").unwrap();
        }
        assert!(matches!(rx.try_recv().unwrap(), VmEvent::AgentReadyHint));
        assert!(
            rx.try_recv().is_err(),
            "one hint, however often the guest says it"
        );
    }

    #[test]
    fn the_log_file_never_passes_its_cap() {
        let (events, _rx) = crate::vmm::event::channel();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("console.log");
        let file = File::options()
            .create(true)
            .append(true)
            .open(&path)
            .unwrap();
        let cap = 64 * 1024;
        let mut sink = ConsoleSink::new(Some(file), cap, ConsoleTail::default(), events);
        for i in 0..20_000 {
            writeln!(sink, "guest line {i} with some padding to fill the log").unwrap();
            if i % 997 == 0 {
                sink.flush().unwrap();
                assert!(std::fs::metadata(&path).unwrap().len() <= cap);
            }
        }
        sink.flush().unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.len() as u64 <= cap, "{}", text.len());
        assert!(text.starts_with("[airlock: the console log reached its cap"));
        assert!(
            text.trim_end()
                .ends_with("guest line 19999 with some padding to fill the log")
        );
    }
}

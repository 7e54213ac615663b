//! Where the guest's serial output goes: a console log file, a bounded tail
//! kept in memory for error reports, and a watch for lines that matter to the
//! VMM (a kernel panic, the agent's readiness).

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
    line: Vec<u8>,
    tail: ConsoleTail,
    events: VmEventSender,
    panicked: bool,
}

impl ConsoleSink {
    pub fn new(log: Option<File>, tail: ConsoleTail, events: VmEventSender) -> Self {
        ConsoleSink {
            log: log.map(BufWriter::new),
            line: Vec::new(),
            tail,
            events,
            panicked: false,
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
        if text.starts_with("airlock-agent ") && text.contains(airlock_protocol::READY_MARKER) {
            self.events.send(VmEvent::AgentReadyHint);
        }
        self.tail.push(text);
    }
}

impl Write for ConsoleSink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if let Some(log) = self.log.as_mut() {
            // A full disk must not stop the guest; the tail still works.
            if log.write_all(buf).is_err() {
                self.log = None;
            }
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
        let mut sink = ConsoleSink::new(None, tail.clone(), events);
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
    }
}

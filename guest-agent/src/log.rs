//! Console logging. stderr is /dev/console (the serial port): every write is
//! a system call and every byte a VM exit, so each line goes out in exactly
//! one write and lines are kept few and short.

use std::fmt;
use std::io::Write;

/// Writes one line, prefixed with the agent's name, in a single write.
macro_rules! log {
    ($($arg:tt)*) => {
        $crate::log::line(format_args!("airlock-agent: {}", format_args!($($arg)*)))
    };
}
pub(crate) use log;

/// Writes `args` plus a newline in a single write; errors are ignored (there
/// is nowhere else to report them).
pub fn line(args: fmt::Arguments<'_>) {
    let mut s = String::with_capacity(128);
    let _ = fmt::write(&mut s, args);
    s.push('\n');
    if cfg!(test) {
        // Goes through the test harness's output capture.
        eprint!("{s}");
        return;
    }
    let _ = std::io::stderr().lock().write_all(s.as_bytes());
}

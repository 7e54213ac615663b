//! Installing the per-thread seccomp filters of `seccomp_filters`, and what
//! happens when one trips: a SIGSYS handler writes one control-channel line
//! naming the syscall and the thread's role, then ends the process.
//!
//! Filters are compiled once, before the VMM starts any thread; each thread
//! installs its own as the first thing it does, and the main thread last,
//! after it has started the others (a thread inherits its creator's filter,
//! so the main thread's must not be there when they start).

use std::cell::Cell;
use std::collections::BTreeMap;
use std::sync::OnceLock;

use seccompiler::BpfProgram;

use crate::vmm::seccomp_filters::{self, FilterError, Role};

/// The VMM's exit code after a seccomp violation (128 + SIGSYS, as a shell
/// would show a process killed by it).
pub const VIOLATION_EXIT_CODE: i32 = 128 + libc::SIGSYS;

/// The control-channel line's event name.
pub const VIOLATION_EVENT: &str = "seccomp_violation";

static FILTERS: OnceLock<BTreeMap<Role, BpfProgram>> = OnceLock::new();

thread_local! {
    static ROLE: Cell<u8> = const { Cell::new(0) };
}

#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error(transparent)]
    Compile(#[from] FilterError),
    #[error("cannot install the SIGSYS handler: {0}")]
    Handler(std::io::Error),
    #[error("cannot install the {role} seccomp filter: {source}")]
    Install {
        role: &'static str,
        #[source]
        source: seccompiler::Error,
    },
}

/// Compiles every filter and installs the violation handler (`audit_only`:
/// see `seccomp_filters::compile`). From here on
/// `confine_this_thread` confines; before it (and in unit tests) it does
/// nothing.
pub fn prepare(audit_only: bool) -> Result<(), SeccompError> {
    let mut filters = BTreeMap::new();
    for role in Role::ALL {
        filters.insert(role, seccomp_filters::compile(role, audit_only)?);
    }
    install_violation_handler()?;
    // A second call keeps the first set, which is the same.
    let _ = FILTERS.set(filters);
    Ok(())
}

/// Whether `prepare` has run in this process.
pub fn enabled() -> bool {
    FILTERS.get().is_some()
}

/// Installs `role`'s filter on the calling thread. A thread that cannot be
/// confined must not go on, so failure ends the process with a report.
pub fn confine_this_thread(role: Role) {
    if let Err(err) = try_confine(role) {
        crate::vmm::run::exit_fatal(&err.to_string());
    }
}

pub fn try_confine(role: Role) -> Result<(), SeccompError> {
    let Some(filters) = FILTERS.get() else {
        return Ok(());
    };
    let Some(program) = filters.get(&role) else {
        return Ok(());
    };
    ROLE.with(|r| r.set(role as u8));
    seccompiler::apply_filter(program).map_err(|source| SeccompError::Install {
        role: role.name(),
        source,
    })
}

fn install_violation_handler() -> Result<(), SeccompError> {
    // SAFETY: a zeroed sigaction with a valid handler and an empty mask is
    // well formed; the handler only calls async-signal-safe functions.
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = on_sigsys as *const () as usize;
        action.sa_flags = libc::SA_SIGINFO;
        libc::sigemptyset(&mut action.sa_mask);
        if libc::sigaction(libc::SIGSYS, &action, std::ptr::null_mut()) != 0 {
            return Err(SeccompError::Handler(std::io::Error::last_os_error()));
        }
    }
    Ok(())
}

/// Offset of `si_syscall` in siginfo_t for SIGSYS on x86_64: three ints,
/// padding to 16, then `void *_call_addr`.
const SI_SYSCALL_OFFSET: usize = 24;

extern "C" fn on_sigsys(_: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo for SIGSYS from seccomp.
    let syscall = unsafe {
        info.cast::<u8>()
            .add(SI_SYSCALL_OFFSET)
            .cast::<i32>()
            .read_unaligned()
    };
    let role = ROLE.with(Cell::get);
    let mut line = LineBuf::default();
    line.push(b"{\"event\":\"");
    line.push(VIOLATION_EVENT.as_bytes());
    line.push(b"\",\"syscall\":");
    line.push_number(i64::from(syscall));
    line.push(b",\"thread\":\"");
    line.push(
        Role::from_u8(role)
            .map(Role::name)
            .unwrap_or("unknown")
            .as_bytes(),
    );
    line.push(b"\"}\n");
    // SAFETY: write(2) and _exit(2) are async-signal-safe; the buffer is ours.
    unsafe {
        libc::write(1, line.bytes.as_ptr().cast(), line.len);
        libc::_exit(VIOLATION_EXIT_CODE);
    }
}

/// A fixed buffer, so the handler never allocates.
struct LineBuf {
    bytes: [u8; 128],
    len: usize,
}

impl Default for LineBuf {
    fn default() -> Self {
        LineBuf {
            bytes: [0; 128],
            len: 0,
        }
    }
}

impl LineBuf {
    fn push(&mut self, text: &[u8]) {
        for &b in text {
            if self.len < self.bytes.len() {
                self.bytes[self.len] = b;
                self.len += 1;
            }
        }
    }

    fn push_number(&mut self, value: i64) {
        if value < 0 {
            self.push(b"-");
        }
        let mut digits = [0u8; 20];
        let mut n = value.unsigned_abs();
        let mut i = digits.len();
        loop {
            i -= 1;
            digits[i] = b'0' + (n % 10) as u8;
            n /= 10;
            if n == 0 {
                break;
            }
        }
        self.push(&digits[i..]);
    }
}

/// Makes a syscall that no filter allows, on the calling thread; a debug
/// build's control channel uses it to prove the filters hold.
#[cfg(debug_assertions)]
pub fn make_forbidden_syscall() {
    // SAFETY: socket(2) with these arguments has no memory effects; under a
    // filter it never runs.
    unsafe {
        libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_violation_line_is_built_without_allocating() {
        let mut line = LineBuf::default();
        line.push(b"n=");
        line.push_number(41);
        line.push(b" m=");
        line.push_number(-7);
        line.push(b" z=");
        line.push_number(0);
        assert_eq!(&line.bytes[..line.len], b"n=41 m=-7 z=0");
    }
}

//! Refresh: what a guest restored from a snapshot must do before any user
//! code runs, so that no two guests from one template share random numbers
//! or a stale clock.
//!
//! 1. Host entropy is credited to the kernel pool (RNDADDENTROPY) and the
//!    kernel CRNG reseeded at once (RNDRESEEDCRNG): getrandom and
//!    /dev/urandom diverge from here on.
//! 2. The warm interpreters reseed their own generators from the kernel:
//!    Python's `random` and numpy's global RandomState; node needs nothing
//!    for its own state, but OpenSSL's DRBG inside it (crypto.randomBytes,
//!    and the Math.random the driver provides) was seeded before the
//!    snapshot. OpenSSL reseeds a DRBG when the wall clock is *behind* the
//!    time of its last seeding, so the clock is set to the epoch while the
//!    interpreters draw once, which makes OpenSSL reseed from the kernel.
//!    V8's own Math.random cannot be reseeded; the driver replaces it in the
//!    user context with one drawn from OpenSSL.
//! 3. The wall clock is set to the host's time (plus the time spent here).
//! 4. The egress relay listens or not, as the host says (see `egress`).

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use airlock_protocol::{ErrorCode, Message, Refresh, RefreshReply};

use crate::ops::Ops;
use crate::sys;

/// Most entropy bytes taken per Refresh.
pub const MAX_ENTROPY: usize = 4096;
/// Reseeding must not keep the clock at the epoch for long.
const RESEED_TIMEOUT: Duration = Duration::from_secs(10);

const RNDADDENTROPY: libc::c_ulong = 0x4008_5203;
const RNDRESEEDCRNG: libc::c_ulong = 0x5207;

pub async fn refresh(ops: &Arc<Ops>, req: Refresh, entropy: Vec<u8>) -> Message {
    if entropy.len() > MAX_ENTROPY {
        return Message::error(
            ErrorCode::TooLarge,
            format!("at most {MAX_ENTROPY} bytes of entropy per refresh"),
        );
    }
    let received = Instant::now();
    let mut reply = RefreshReply::default();
    let mut step_started = Instant::now();
    let mut step = |reply: &mut RefreshReply, name: &str| {
        let now = Instant::now();
        let us = now.duration_since(step_started).as_micros() as u64;
        reply.steps_us.push((name.to_string(), us));
        step_started = now;
    };
    let privileged = ops.config.privileged;
    if !entropy.is_empty() {
        match add_entropy(&entropy, privileged) {
            Ok(credited) => reply.entropy_bytes = credited,
            Err(e) => reply.warnings.push(format!("adding entropy: {e}")),
        }
    }
    step(&mut reply, "entropy");
    if privileged {
        match open_random().and_then(|fd| ioctl(&fd, RNDRESEEDCRNG, std::ptr::null())) {
            Ok(()) => reply.crng_reseeded = true,
            Err(e) => reply
                .warnings
                .push(format!("reseeding the kernel CRNG: {e}")),
        }
    }
    let target_ns = req.wall_clock_unix_ns.unwrap_or_else(|| {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64)
    });
    // Back to the 1970s: behind every DRBG's last seeding. (The wall clock
    // may not go below the monotonic clock, i.e. the uptime.)
    step(&mut reply, "crng");
    let warped = privileged && set_clock(monotonic_ns() + 1_000_000_000).is_ok();
    step(&mut reply, "clock_back");
    if !warped {
        reply
            .warnings
            .push("clock not wound back: OpenSSL generators reseed on their own schedule".into());
    }
    let reseeding = ops.interpreters.reseed_all();
    match tokio::time::timeout(RESEED_TIMEOUT, reseeding).await {
        Ok((done, warnings, took)) => {
            reply.reseeded = done;
            reply.warnings.extend(warnings);
            reply.steps_us.extend(took);
        }
        Err(_) => reply
            .warnings
            .push("reseeding the interpreters timed out".into()),
    }
    step(&mut reply, "reseed");
    if privileged {
        let now = target_ns.saturating_add(received.elapsed().as_nanos() as u64);
        match set_clock(now) {
            Ok(()) => reply.clock_set = req.wall_clock_unix_ns.is_some(),
            Err(e) => reply.warnings.push(format!("setting the clock: {e}")),
        }
    } else if req.wall_clock_unix_ns.is_some() {
        reply
            .warnings
            .push("not permitted to set the clock here".into());
    }
    step(&mut reply, "clock_set");
    match ops.egress.set(req.egress).await {
        Ok(listening) => reply.egress = listening,
        Err(e) => reply.warnings.push(e),
    }
    step(&mut reply, "egress");
    Message::RefreshReply(reply)
}

fn open_random() -> io::Result<OwnedFd> {
    // SAFETY: constant NUL-terminated path.
    let fd = sys::cvt(unsafe {
        libc::open(c"/dev/urandom".as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC)
    })?;
    // SAFETY: we own the fresh fd.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn ioctl(fd: &OwnedFd, request: libc::c_ulong, arg: *const libc::c_void) -> io::Result<()> {
    // SAFETY: the caller passes an argument of the layout `request` expects.
    sys::cvt(unsafe { libc::ioctl(fd.as_raw_fd(), request, arg) }).map(drop)
}

/// Credits `bytes` to the kernel pool (needs CAP_SYS_ADMIN); otherwise just
/// mixes them in by writing (credits nothing). Returns the bytes credited.
fn add_entropy(bytes: &[u8], privileged: bool) -> io::Result<u32> {
    let fd = open_random()?;
    if privileged {
        // struct rand_pool_info { int entropy_count; int buf_size; __u32 buf[]; }
        let words = bytes.len().div_ceil(4);
        let mut info = vec![0u32; 2 + words];
        info[0] = (bytes.len() * 8) as u32;
        info[1] = bytes.len() as u32;
        // SAFETY: `info` has room for `bytes` after its two header words.
        unsafe {
            std::ptr::copy_nonoverlapping(
                bytes.as_ptr(),
                info[2..].as_mut_ptr().cast::<u8>(),
                bytes.len(),
            );
        }
        match ioctl(&fd, RNDADDENTROPY, info.as_ptr().cast()) {
            Ok(()) => return Ok(bytes.len() as u32),
            Err(e) if e.raw_os_error() != Some(libc::EPERM) => return Err(e),
            Err(_) => {}
        }
    }
    sys::write_fd(fd.as_raw_fd(), bytes)?;
    Ok(0)
}

fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid out-pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

fn set_clock(unix_ns: u64) -> io::Result<()> {
    let ts = libc::timespec {
        tv_sec: (unix_ns / 1_000_000_000) as libc::time_t,
        tv_nsec: (unix_ns % 1_000_000_000) as libc::c_long,
    };
    // SAFETY: valid timespec.
    sys::cvt(unsafe { libc::clock_settime(libc::CLOCK_REALTIME, &ts) }).map(drop)
}

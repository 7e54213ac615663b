//! The operations the agent performs for the host, and the state they share.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use airlock_protocol::{ErrorCode, Limits, Message, SetLimits};

use crate::cgroup::{Cgroup, Sandbox};
use crate::config::Config;
use crate::files::Files;
use crate::interp::Interpreters;
use crate::log::log;
use crate::reaper::Reaper;
use crate::request::{Cancel, Reply};
use crate::{exec, freshness, sys};

/// Share of guest RAM kept out of the sandbox's reach (for the agent, the
/// kernel, and files the host writes), at least [`MIN_RESERVE`].
const RESERVE_DIVISOR: u64 = 8;
const MIN_RESERVE: u64 = 64 << 20;
/// Processes (and threads) user code may have at once.
pub const DEFAULT_PIDS_MAX: u64 = 512;

pub struct Ops {
    pub config: Config,
    pub reaper: Reaper,
    pub sandbox: Option<Sandbox>,
    pub interpreters: Interpreters,
    pub files: Files,
    pub egress: crate::egress::EgressRelay,
    exec_seq: AtomicU64,
    /// Exec groups still holding background processes; removed once empty.
    lingering: Mutex<Vec<Cgroup>>,
}

impl Ops {
    /// Sets up confinement and starts the warm interpreters (in the
    /// background: this returns at once). Must run inside the runtime.
    pub fn start(config: Config, reaper: Reaper) -> Arc<Ops> {
        let sandbox = if config.cgroups {
            let total = sys::total_memory().unwrap_or(512 << 20);
            let reserve = (total / RESERVE_DIVISOR).max(MIN_RESERVE);
            match Sandbox::setup(Some(total.saturating_sub(reserve)), Some(DEFAULT_PIDS_MAX)) {
                Ok(s) => Some(s),
                Err(e) => {
                    log!("no cgroup limits for user code: {e}");
                    None
                }
            }
        } else {
            None
        };
        let files = Files::start(config.creds, config.home.clone());
        let interpreters = Interpreters::new(&config);
        let ops = Arc::new(Ops {
            config,
            reaper,
            sandbox,
            interpreters,
            files,
            egress: Default::default(),
            exec_seq: AtomicU64::new(0),
            lingering: Mutex::default(),
        });
        ops.interpreters.start_all(&ops, &ops.config.warm);
        ops
    }

    /// A path from the host: relative ones are inside the sandbox home.
    pub fn resolve(&self, path: &str) -> PathBuf {
        resolve(&self.config.home, path)
    }

    pub fn oom_kills(&self) -> u64 {
        self.sandbox.as_ref().map_or(0, Sandbox::oom_kills)
    }

    /// A fresh cgroup for one exec call (`None` without cgroups).
    pub fn exec_group(&self) -> std::io::Result<Option<Cgroup>> {
        let Some(sandbox) = &self.sandbox else {
            return Ok(None);
        };
        self.reap_lingering();
        let n = self.exec_seq.fetch_add(1, Ordering::Relaxed);
        sandbox.group(&format!("exec-{n}")).map(Some)
    }

    /// Removes an exec group, or keeps it for later while background
    /// processes it started still run.
    pub fn release_group(&self, group: Cgroup) {
        if !group.remove() {
            self.lingering
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push(group);
        }
    }

    fn reap_lingering(&self) {
        let mut lingering = self
            .lingering
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        lingering.retain(|g| !g.remove());
    }

    /// Runs one request to its final message and that message's payload.
    pub async fn handle(
        self: &Arc<Self>,
        message: Message,
        payload: Vec<u8>,
        reply: &Reply,
        cancel: Cancel,
    ) -> (Message, Vec<u8>) {
        let message = match message {
            Message::Exec(req) => exec::exec(self, req, payload, reply, cancel).await,
            Message::RunCode(req) => {
                self.interpreters
                    .run(self, req, payload, reply, cancel)
                    .await
            }
            Message::ResetInterpreter(req) => self.interpreters.reset(self, req.language).await,
            Message::WarmStatus(req) => self.interpreters.warm_status(req.wait_ms).await,
            Message::Refresh(req) => freshness::refresh(self, req, payload).await,
            Message::SetLimits(req) => self.set_limits(req),
            Message::WriteFile(_)
            | Message::ReadFile(_)
            | Message::ListFiles(_)
            | Message::RemoveFile(_)
            | Message::StatFile(_) => return self.files.call(message, payload).await,
            other => Message::error(
                ErrorCode::Protocol,
                format!("{:?} is not a request", other.kind()),
            ),
        };
        (message, Vec::new())
    }

    fn set_limits(&self, req: SetLimits) -> Message {
        let fail = |what: &str, e: std::io::Error| {
            Message::error(ErrorCode::Io, format!("cannot set {what}: {e}"))
        };
        if req.memory_max_bytes.is_some() || req.pids_max.is_some() {
            let Some(sandbox) = &self.sandbox else {
                return Message::error(ErrorCode::Unsupported, "user code is not in a cgroup here");
            };
            if let Some(bytes) = req.memory_max_bytes
                && let Err(e) = sandbox.set_memory_max(bytes)
            {
                return fail("memory.max", e);
            }
            if let Some(n) = req.pids_max
                && let Err(e) = sandbox.set_pids_max(n)
            {
                return fail("pids.max", e);
            }
        }
        for (size, mount) in [
            (req.tmp_size_bytes, &self.config.tmpfs_tmp),
            (req.home_size_bytes, &self.config.tmpfs_home),
        ] {
            let Some(size) = size else { continue };
            let Some(mount) = mount else {
                return Message::error(ErrorCode::Unsupported, "no tmpfs mounts to resize here");
            };
            if let Err(e) = crate::init::resize_tmpfs(mount, size) {
                return fail(&format!("the size of {}", mount.display()), e);
            }
        }
        Message::Limits(self.limits())
    }

    pub fn limits(&self) -> Limits {
        let size = |m: &Option<PathBuf>| m.as_deref().and_then(fs_size);
        Limits {
            cgroups: self.sandbox.is_some(),
            memory_max_bytes: self.sandbox.as_ref().and_then(Sandbox::memory_max),
            memory_current_bytes: self.sandbox.as_ref().and_then(Sandbox::memory_current),
            pids_max: self.sandbox.as_ref().and_then(Sandbox::pids_max),
            pids_current: self.sandbox.as_ref().and_then(Sandbox::pids_current),
            tmp_size_bytes: size(&self.config.tmpfs_tmp),
            home_size_bytes: size(&self.config.tmpfs_home),
            guest_memory_bytes: sys::total_memory(),
        }
    }
}

pub fn resolve(home: &Path, path: &str) -> PathBuf {
    let p = Path::new(path);
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        home.join(p)
    }
}

/// A file system's size in bytes (statfs).
fn fs_size(path: &Path) -> Option<u64> {
    let c = sys::cstring(path).ok()?;
    // SAFETY: statfs fills a zeroed plain-data struct from a valid path.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        return None;
    }
    Some(st.f_blocks as u64 * st.f_bsize as u64)
}

//! One live sandbox's bookkeeping (its VM slot, clocks, usage) and the
//! lease a tool call holds on it.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::{OwnedRwLockReadGuard, RwLock};
use tokio_util::sync::CancellationToken;

use super::{Hosted, KillSwitch};

/// What a sandbox has used so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize, schemars::JsonSchema)]
pub struct Usage {
    /// CPU time of the sandbox's VMM process (all its vCPUs and device threads).
    pub vcpu_seconds: f64,
    /// Configured guest memory in GB times the seconds the sandbox has lived.
    pub memory_gb_seconds: f64,
    /// run_code and run_command calls.
    pub runs: u64,
}

/// A snapshot of one sandbox for `sandbox_info`.
#[derive(Debug, Clone)]
pub struct Info {
    pub id: String,
    /// The image it runs.
    pub image: String,
    /// Its guest memory (the image's shape, or the server's).
    pub memory_mib: u32,
    pub age: Duration,
    pub idle: Duration,
    /// Time until it is destroyed if left idle from now (or reaches its lifetime).
    pub expires_in: Duration,
    pub lifetime_left: Duration,
    pub usage: Usage,
    pub active_calls: usize,
    pub pauses: PauseRecord,
    pub checkpoints: usize,
    pub checkpoint_bytes: u64,
    pub egress: crate::egress::TrafficReport,
}

/// Snapshot metering of one principal: its live sandboxes and the ended
/// ones the store remembers.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct SnapshotUsage {
    /// Pauses and checkpoints written.
    pub writes: u64,
    /// Resumes, rollbacks and forks read back.
    pub restores: u64,
    /// Bytes stored times seconds.
    pub byte_seconds: f64,
    /// Bytes stored now (saved states and checkpoints).
    pub stored_bytes: u64,
}

impl SnapshotUsage {
    pub fn gb_hours(&self) -> f64 {
        self.byte_seconds / f64::from(1u32 << 30) / 3600.0
    }
}

/// A sandbox's pauses and resumes so far.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PauseRecord {
    /// Its VM is gone and its state is on disk, to resume at the next call.
    pub paused: bool,
    pub pauses: u64,
    pub resumes: u64,
    pub pause_seconds: f64,
    pub resume_seconds: f64,
    /// When it was last resumed, and how long that took.
    pub last_resumed: Option<std::time::SystemTime>,
    pub last_resume_seconds: Option<f64>,
    /// What its saved state takes on disk (the last pause's, kept until the
    /// next one replaces it).
    pub stored_bytes: u64,
    /// Since when `stored_bytes` has been stored, and the byte-seconds
    /// stored before that.
    pub stored_since: Option<Instant>,
    pub byte_seconds_before: f64,
    /// Snapshots written (pauses and checkpoints) and read back (resumes,
    /// rollbacks, forks), for metering.
    pub snapshot_writes: u64,
    pub snapshot_restores: u64,
}

impl PauseRecord {
    /// What is stored now changes to `bytes`.
    pub(super) fn set_stored(&mut self, bytes: u64) {
        self.byte_seconds_before = self.stored_byte_seconds();
        self.stored_bytes = bytes;
        self.stored_since = Some(Instant::now());
    }

    /// Bytes stored times seconds, so far (snapshot storage metering).
    pub fn stored_byte_seconds(&self) -> f64 {
        let current = self.stored_since.map_or(0.0, |t| {
            self.stored_bytes as f64 * t.elapsed().as_secs_f64()
        });
        self.byte_seconds_before + current
    }
}

/// A sandbox's state kept at one moment, to roll back to or fork from.
#[derive(Clone)]
pub(super) struct Checkpoint<T> {
    pub(super) id: String,
    pub(super) label: String,
    pub(super) created: SystemTime,
    pub(super) bytes: u64,
    pub(super) saved: T,
}

/// What `list_checkpoints` shows of a checkpoint.
#[derive(Debug, Clone, PartialEq, serde::Serialize, schemars::JsonSchema)]
pub struct CheckpointInfo {
    pub checkpoint_id: String,
    /// The label given when it was taken (empty if none).
    pub label: String,
    /// When it was taken, in Unix seconds.
    pub created_unix: f64,
    /// What it takes on disk.
    pub size_bytes: u64,
}

impl<T> Checkpoint<T> {
    pub(super) fn info(&self) -> CheckpointInfo {
        CheckpointInfo {
            checkpoint_id: self.id.clone(),
            label: self.label.clone(),
            created_unix: super::store::unix(self.created),
            size_bytes: self.bytes,
        }
    }
}

pub(super) struct Slot<S> {
    pub(super) sandbox: S,
    pub(super) cancel: CancellationToken,
}

/// One live sandbox and its bookkeeping. Its id stays the same across
/// `reset`, which swaps the VM underneath.
pub(super) struct Handle<S: Hosted> {
    pub(super) id: String,
    pub(super) principal: String,
    pub(super) slot: Arc<RwLock<Option<Slot<S>>>>,
    /// Cancels the calls running in the current VM (reset, destroy).
    pub(super) cancel: Mutex<CancellationToken>,
    pub(super) created: Mutex<Instant>,
    pub(super) last_used: Mutex<Instant>,
    pub(super) active: AtomicUsize,
    pub(super) runs: AtomicU64,
    pub(super) cpu: Mutex<CpuMeter>,
    pub(super) memory_gb: f64,
    pub(super) ended: AtomicBool,
    /// Kills the current VM without its slot, which stalled calls may hold.
    pub(super) kill: Mutex<KillSwitch>,
    /// Held for the whole of a reset: resets of one sandbox run one at a time.
    pub(super) resetting: tokio::sync::Mutex<()>,
    /// Resets begun so far; a reset that finds one begun after it asked
    /// has been served by it.
    pub(super) resets_begun: AtomicU64,
    /// The state its last pause saved (kept after a resume, until a newer
    /// one replaces it), and whether the sandbox is paused now.
    pub(super) saved: Mutex<Option<S::Saved>>,
    /// The image its VM runs (or its saved state resumes into): a reset
    /// makes a fresh one of the same image.
    pub(super) image: Mutex<String>,
    pub(super) saved_at: Mutex<Option<SystemTime>>,
    pub(super) paused: AtomicBool,
    pub(super) record: Mutex<PauseRecord>,
    /// Bound to the stdio conversation (what `--persist` brings back).
    pub(super) stdio: bool,
    /// Bound to an HTTP session, which ends with the server: such a
    /// sandbox is not kept at shutdown.
    pub(super) session_bound: AtomicBool,
    /// `created` on the wall clock, for the durable record.
    pub(super) created_wall: Mutex<SystemTime>,
    /// Where its events are told (its egress denials come from elsewhere).
    pub(super) events: super::EventFeed,
    /// The expiry last warned about, so each is warned about once.
    pub(super) expiry_warned: Mutex<Option<Instant>>,
    /// Said once, with the next call's result (it came back older than it was).
    pub(super) notice: Mutex<Option<String>>,
    /// Its checkpoints, oldest first.
    pub(super) checkpoints: Mutex<Vec<Checkpoint<S::Saved>>>,
    /// Brought back after a crash from this checkpoint (newer than its last
    /// pause): what the next call resumes while it has no saved state.
    pub(super) resume_checkpoint: Mutex<Option<String>>,
    /// Egress metering and bounds, across every VM this sandbox runs in.
    pub(super) traffic: Arc<crate::egress::Traffic>,
}

#[derive(Default)]
pub(super) struct CpuMeter {
    pid: Option<u32>,
    /// Since when a VM has been held, and for how long VMs were held before
    /// (memory is metered only while a VM holds it, not while paused).
    vm_since: Option<Instant>,
    vm_time_before: Duration,
    /// Memory GB-seconds of earlier runs of the server.
    memory_before: f64,
    /// CPU time of `pid` when it was bound.
    base: Duration,
    /// CPU time of the VMs this handle had before a reset.
    before: Duration,
}

pub(super) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl<S: Hosted> Handle<S> {
    /// A handle for `sandbox`, bound now to `principal`.
    pub(super) fn new(
        id: String,
        principal: &str,
        sandbox: S,
        memory_gb: f64,
        stdio: bool,
        events: super::EventFeed,
    ) -> Handle<S> {
        let kill = sandbox.kill_switch();
        let mut handle = Handle::empty(id, principal, None, kill, memory_gb, stdio, events);
        handle.adopt(&sandbox);
        // Not shared yet: the slot is filled without its lock.
        let cancel = lock(&handle.cancel).clone();
        handle.slot = Arc::new(RwLock::new(Some(Slot { sandbox, cancel })));
        handle
    }

    /// A handle with no VM yet (one restored from the durable record).
    pub(super) fn empty(
        id: String,
        principal: &str,
        sandbox: Option<S>,
        kill: KillSwitch,
        memory_gb: f64,
        stdio: bool,
        events: super::EventFeed,
    ) -> Handle<S> {
        let now = Instant::now();
        let cancel = CancellationToken::new();
        Handle {
            id,
            principal: principal.to_string(),
            slot: Arc::new(RwLock::new(sandbox.map(|sandbox| Slot {
                sandbox,
                cancel: cancel.clone(),
            }))),
            cancel: Mutex::new(cancel),
            created: Mutex::new(now),
            last_used: Mutex::new(now),
            active: AtomicUsize::new(0),
            runs: AtomicU64::new(0),
            cpu: Mutex::new(CpuMeter::default()),
            memory_gb,
            ended: AtomicBool::new(false),
            kill: Mutex::new(kill),
            resetting: tokio::sync::Mutex::new(()),
            resets_begun: AtomicU64::new(0),
            saved: Mutex::new(None),
            image: Mutex::new(crate::image::names::DEFAULT_IMAGE.to_string()),
            saved_at: Mutex::new(None),
            paused: AtomicBool::new(false),
            record: Mutex::new(PauseRecord::default()),
            stdio,
            session_bound: AtomicBool::new(false),
            created_wall: Mutex::new(SystemTime::now()),
            events,
            expiry_warned: Mutex::new(None),
            notice: Mutex::new(None),
            checkpoints: Mutex::new(Vec::new()),
            resume_checkpoint: Mutex::new(None),
            traffic: Arc::default(),
        }
    }

    /// `sandbox` is this handle's VM now: CPU metering follows it, and its
    /// egress belongs to this sandbox and principal.
    pub(super) fn adopt(&self, sandbox: &S) {
        self.set_vm(sandbox.pid());
        *lock(&self.image) = sandbox.image().to_string();
        sandbox.bind_egress(crate::egress::Binding {
            sandbox_id: self.id.clone(),
            principal: self.principal.clone(),
            traffic: self.traffic.clone(),
            events: Some(self.events.clone()),
        });
    }

    /// Notes that `conversation` holds it, if that is an HTTP session.
    pub(super) fn mark_session(&self, conversation: &super::Conversation) {
        if matches!(conversation, super::Conversation::Session(_)) {
            self.session_bound.store(true, Ordering::SeqCst);
        }
    }

    pub(super) fn idle(&self, now: Instant) -> Duration {
        if self.active.load(Ordering::SeqCst) > 0 {
            Duration::ZERO
        } else {
            now.saturating_duration_since(*lock(&self.last_used))
        }
    }

    pub(super) fn age(&self, now: Instant) -> Duration {
        now.saturating_duration_since(*lock(&self.created))
    }

    pub(super) fn usage(&self) -> Usage {
        let (cpu, memory_gb_seconds) = {
            let meter = lock(&self.cpu);
            let current = meter
                .pid
                .and_then(process_cpu_time)
                .map(|t| t.saturating_sub(meter.base))
                .unwrap_or_default();
            let held =
                meter.vm_time_before + meter.vm_since.map(|t| t.elapsed()).unwrap_or_default();
            (
                meter.before + current,
                meter.memory_before + self.memory_gb * held.as_secs_f64(),
            )
        };
        Usage {
            vcpu_seconds: cpu.as_secs_f64(),
            memory_gb_seconds,
            runs: self.runs.load(Ordering::Relaxed),
        }
    }

    /// Everything the durable record keeps of its counters.
    pub(super) fn counters(&self) -> super::store::Counters {
        let usage = self.usage();
        let record = lock(&self.record).clone();
        super::store::Counters {
            vcpu_seconds: usage.vcpu_seconds,
            memory_gb_seconds: usage.memory_gb_seconds,
            runs: usage.runs,
            pauses: record.pauses,
            resumes: record.resumes,
            pause_seconds: record.pause_seconds,
            resume_seconds: record.resume_seconds,
            snapshot_writes: record.snapshot_writes,
            snapshot_restores: record.snapshot_restores,
            snapshot_byte_seconds: record.stored_byte_seconds(),
        }
    }

    /// Takes up the counters of an earlier run of the server.
    pub(super) fn carry_over(&self, c: &super::store::Counters) {
        {
            let mut meter = lock(&self.cpu);
            meter.before += Duration::from_secs_f64(c.vcpu_seconds.clamp(0.0, 1e12));
            meter.memory_before += c.memory_gb_seconds.max(0.0);
        }
        self.runs.fetch_add(c.runs, Ordering::Relaxed);
        let mut record = lock(&self.record);
        record.pauses += c.pauses;
        record.resumes += c.resumes;
        record.pause_seconds += c.pause_seconds;
        record.resume_seconds += c.resume_seconds;
        record.byte_seconds_before += c.snapshot_byte_seconds.max(0.0);
        record.snapshot_writes += c.snapshot_writes;
        record.snapshot_restores += c.snapshot_restores;
    }

    pub(super) fn pause_record(&self) -> PauseRecord {
        let mut record = lock(&self.record).clone();
        record.paused = self.paused.load(Ordering::SeqCst);
        record
    }

    /// Drops the saved state (the sandbox was reset, rolled back or ended).
    pub(super) fn forget_saved(&self) {
        self.paused.store(false, Ordering::SeqCst);
        let old = lock(&self.saved).take();
        if let Some(saved) = old {
            S::discard(saved);
        }
        *lock(&self.saved_at) = None;
        *lock(&self.resume_checkpoint) = None;
        self.update_stored();
    }

    /// Whether a state is kept that a call could resume: its last pause,
    /// or the checkpoint it was brought back to after a crash.
    pub(super) fn restorable(&self) -> bool {
        lock(&self.saved).is_some() || lock(&self.resume_checkpoint).is_some()
    }

    /// Drops every checkpoint (the sandbox ended).
    pub(super) fn forget_checkpoints(&self) {
        let gone = std::mem::take(&mut *lock(&self.checkpoints));
        for checkpoint in gone {
            S::discard(checkpoint.saved);
        }
        self.update_stored();
    }

    /// Bytes its checkpoints take on disk.
    pub(super) fn checkpoint_bytes(&self) -> u64 {
        lock(&self.checkpoints).iter().map(|c| c.bytes).sum()
    }

    /// The metered storage becomes what is on disk now: the last saved
    /// state and the checkpoints.
    pub(super) fn update_stored(&self) {
        let saved = lock(&self.saved).as_ref().map_or(0, S::saved_bytes);
        let total = saved + self.checkpoint_bytes();
        lock(&self.record).set_stored(total);
    }

    pub(super) fn set_vm(&self, pid: Option<u32>) {
        let mut meter = lock(&self.cpu);
        let current = meter
            .pid
            .and_then(process_cpu_time)
            .map(|t| t.saturating_sub(meter.base))
            .unwrap_or_default();
        meter.before += current;
        if let Some(since) = meter.vm_since.take() {
            meter.vm_time_before += since.elapsed();
        }
        meter.vm_since = pid.map(|_| Instant::now());
        meter.pid = pid;
        meter.base = pid.and_then(process_cpu_time).unwrap_or_default();
    }
}

/// A sandbox named by a call, found and checked, without holding its VM.
pub struct SandboxRef<S: Hosted>(pub(super) Arc<Handle<S>>);

impl<S: Hosted> SandboxRef<S> {
    pub fn id(&self) -> &str {
        &self.0.id
    }

    /// The image it runs (or its saved state resumes into).
    pub fn image(&self) -> String {
        lock(&self.0.image).clone()
    }
}

/// Use of one sandbox by one tool call. While any lease is held the sandbox
/// is not idle; dropping it marks the sandbox used now.
pub struct Lease<S: Hosted> {
    pub(super) handle: Arc<Handle<S>>,
    pub(super) guard: OwnedRwLockReadGuard<Option<Slot<S>>>,
    pub(super) cancel: CancellationToken,
}

impl<S: Hosted> Lease<S> {
    pub fn id(&self) -> &str {
        &self.handle.id
    }

    pub fn sandbox(&self) -> &S {
        // A lease is only made from a slot that holds a sandbox.
        &self
            .guard
            .as_ref()
            .expect("a leased slot holds a sandbox")
            .sandbox
    }

    /// Fires when the sandbox is being reset or destroyed under this call.
    pub fn cancelled(&self) -> tokio_util::sync::WaitForCancellationFuture<'_> {
        self.cancel.cancelled()
    }

    /// What the server has to say about this sandbox, once (it came back
    /// older than it was, after a crash).
    pub fn take_notice(&self) -> Option<String> {
        lock(&self.handle.notice).take()
    }

    /// Counts one run (run_code, run_command) for usage.
    pub fn count_run(&self) {
        self.handle.runs.fetch_add(1, Ordering::Relaxed);
    }
}

impl<S: Hosted> Drop for Lease<S> {
    fn drop(&mut self) {
        *lock(&self.handle.last_used) = Instant::now();
        self.handle.active.fetch_sub(1, Ordering::SeqCst);
    }
}

/// 128 random bits, hex.
pub(super) fn new_id() -> Option<String> {
    let mut bytes = [0u8; 16];
    crate::vmm::devices::virtio::rng::fill_random(&mut bytes)
        .then(|| bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// User plus system CPU time of a process, from /proc/<pid>/stat.
fn process_cpu_time(pid: u32) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces; the fields after it start at state.
    let rest = stat.rsplit_once(')')?.1;
    let mut fields = rest.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let ticks = u64::try_from(ticks).ok().filter(|t| *t > 0)?;
    Some(Duration::from_micros((utime + stime) * 1_000_000 / ticks))
}

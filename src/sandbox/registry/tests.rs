use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use super::*;

struct Fake {
    made: AtomicUsize,
    destroyed: Arc<AtomicUsize>,
    fail: AtomicBool,
    /// How long a take takes.
    slow: Mutex<Duration>,
    /// VMs made and not destroyed, now and at most.
    live: Arc<AtomicUsize>,
    peak: AtomicUsize,
}

struct FakeSandbox {
    n: usize,
    /// The fake's guest state: a pause saves it, a resume brings it back.
    mark: AtomicUsize,
    destroyed: Arc<AtomicUsize>,
    killed: Arc<AtomicBool>,
    live: Arc<AtomicUsize>,
}

/// A fake pause keeps the sandbox's number, as a real one keeps its state.
#[derive(Clone)]
struct FakeSaved {
    n: usize,
    mark: usize,
    discarded: Arc<AtomicUsize>,
}

impl Hosted for FakeSandbox {
    type Saved = FakeSaved;

    async fn pause(self) -> Result<FakeSaved, (anyhow::Error, Option<Self>)> {
        self.live.fetch_sub(1, Ordering::SeqCst);
        Ok(FakeSaved {
            n: self.n,
            mark: self.mark.load(Ordering::SeqCst),
            discarded: self.destroyed.clone(),
        })
    }

    fn saved_bytes(_: &FakeSaved) -> u64 {
        4096
    }

    fn discard(saved: FakeSaved) {
        saved.discarded.fetch_add(1000, Ordering::SeqCst);
    }

    fn saved_name(saved: &FakeSaved) -> String {
        format!("paused-{}-{}", saved.n, saved.mark)
    }

    fn pid(&self) -> Option<u32> {
        Some(std::process::id())
    }
    fn kill_switch(&self) -> KillSwitch {
        let killed = self.killed.clone();
        KillSwitch::new(move || killed.store(true, Ordering::SeqCst))
    }
    async fn destroy(self) {
        self.live.fetch_sub(1, Ordering::SeqCst);
        self.destroyed.fetch_add(1, Ordering::SeqCst);
    }
}

impl Provider for Fake {
    type Sandbox = FakeSandbox;
    async fn take(&self, _image: Option<&str>) -> anyhow::Result<FakeSandbox> {
        if self.fail.load(Ordering::SeqCst) {
            anyhow::bail!("no VM today");
        }
        let slow = *lock(&self.slow);
        tokio::time::sleep(slow).await;
        let live = self.live.fetch_add(1, Ordering::SeqCst) + 1;
        self.peak.fetch_max(live, Ordering::SeqCst);
        Ok(FakeSandbox {
            n: self.made.fetch_add(1, Ordering::SeqCst),
            mark: AtomicUsize::new(0),
            destroyed: self.destroyed.clone(),
            killed: Arc::new(AtomicBool::new(false)),
            live: self.live.clone(),
        })
    }
    async fn ready(&self) -> usize {
        0
    }
    async fn close(&self) {}
    fn load_saved(&self, name: &str) -> anyhow::Result<FakeSaved> {
        let (n, mark) = name
            .strip_prefix("paused-")
            .and_then(|rest| rest.split_once('-'))
            .and_then(|(n, mark)| Some((n.parse().ok()?, mark.parse().ok()?)))
            .ok_or_else(|| anyhow::anyhow!("no saved state {name}"))?;
        Ok(FakeSaved {
            n,
            mark,
            discarded: self.destroyed.clone(),
        })
    }
    async fn resume(&self, saved: &FakeSaved) -> anyhow::Result<FakeSandbox> {
        if self.fail.load(Ordering::SeqCst) {
            anyhow::bail!("no VM today");
        }
        self.live.fetch_add(1, Ordering::SeqCst);
        Ok(FakeSandbox {
            n: saved.n,
            mark: AtomicUsize::new(saved.mark),
            destroyed: self.destroyed.clone(),
            killed: Arc::new(AtomicBool::new(false)),
            live: self.live.clone(),
        })
    }
}

fn fake() -> Arc<Fake> {
    Arc::new(Fake {
        made: AtomicUsize::new(0),
        destroyed: Arc::new(AtomicUsize::new(0)),
        fail: AtomicBool::new(false),
        slow: Mutex::new(Duration::ZERO),
        live: Arc::new(AtomicUsize::new(0)),
        peak: AtomicUsize::new(0),
    })
}

fn registry(limits: Limits) -> (Arc<Registry<Fake>>, Arc<Fake>) {
    let fake = fake();
    (
        Registry::start(fake.clone(), limits, 1024, Arc::new(Metrics::new())),
        fake,
    )
}

fn session(s: &str) -> Conversation {
    Conversation::Session(s.into())
}

#[tokio::test]
async fn one_sandbox_per_conversation() {
    let (r, fake) = registry(Limits::default());
    let a1 = r.acquire(&session("a"), "p", None).await.unwrap();
    let a2 = r.acquire(&session("a"), "p", None).await.unwrap();
    let b = r.acquire(&session("b"), "p", None).await.unwrap();
    assert_eq!(a1.id(), a2.id());
    assert_ne!(a1.id(), b.id());
    assert_eq!(a1.id().len(), 32);
    assert_eq!((a1.sandbox().n, b.sandbox().n), (0, 1));
    assert_eq!(r.active(), 2);
    drop((a1, a2, b));
    r.release(&session("a")).await;
    r.release(&session("a")).await;
    assert_eq!(r.active(), 1);
    assert_eq!(fake.destroyed.load(Ordering::SeqCst), 1);
    assert!(r.existing(&session("a"), "p").await.unwrap().is_none());
    r.shutdown().await;
    assert_eq!(fake.destroyed.load(Ordering::SeqCst), 2);
    assert!(matches!(
        r.acquire(&session("c"), "p", None).await,
        Err(RegistryError::ShuttingDown)
    ));
}

#[tokio::test]
async fn concurrent_first_calls_share_one_sandbox() {
    let (r, fake) = registry(Limits::default());
    let (x, y) = tokio::join!(
        r.acquire(&Conversation::Stdio, "p", None),
        r.acquire(&Conversation::Stdio, "p", None)
    );
    assert_eq!(x.unwrap().id(), y.unwrap().id());
    assert_eq!(fake.made.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn explicit_ids_are_bound_to_their_principal() {
    let (r, _) = registry(Limits::default());
    let id = r
        .create_explicit("alice", None)
        .await
        .unwrap()
        .id()
        .to_string();
    assert_eq!(r.get(&id, "alice").await.unwrap().id(), id);
    let err = r.get(&id, "mallory").await.err().unwrap();
    assert!(matches!(err, RegistryError::Forbidden(_)), "{err}");
    let err = r.get("0123", "alice").await.err().unwrap();
    assert!(matches!(err, RegistryError::Unknown(_)), "{err}");
    assert!(err.to_string().contains("without sandbox_id"));
}

#[tokio::test]
async fn limits_refuse_with_clear_errors() {
    let (r, fake) = registry(Limits {
        max_sandboxes: 3,
        max_per_principal: 2,
        ..Limits::default()
    });
    let _a = r.create_explicit("a", None).await.unwrap();
    let _b = r.create_explicit("a", None).await.unwrap();
    let err = r.create_explicit("a", None).await.err().unwrap();
    assert!(
        matches!(err, RegistryError::Limit(_)) && err.to_string().contains("limit"),
        "{err}"
    );
    let c = r.acquire(&session("s"), "b", None).await.unwrap();
    let err = r.acquire(&session("t"), "b", None).await.err().unwrap();
    assert!(err.to_string().contains("limit of 3"), "{err}");
    drop(c);
    // A failed start frees its reservation.
    r.release(&session("s")).await;
    fake.fail.store(true, Ordering::SeqCst);
    let err = r.acquire(&session("t"), "b", None).await.err().unwrap();
    assert!(matches!(err, RegistryError::Start(_)), "{err}");
    fake.fail.store(false, Ordering::SeqCst);
    r.acquire(&session("t"), "b", None).await.unwrap();
}

#[tokio::test]
async fn a_principal_s_own_limit_replaces_the_server_s() {
    let mut own = std::collections::BTreeMap::new();
    own.insert(
        "small".to_string(),
        PrincipalLimits {
            max_sandboxes: Some(1),
            max_snapshot_bytes: Some(1 << 20),
            images: None,
        },
    );
    let limits = Limits {
        max_per_principal: 2,
        principals: Arc::new(own),
        ..Limits::default()
    };
    assert_eq!(limits.snapshot_quota_of("small"), 1 << 20);
    assert_eq!(
        limits.snapshot_quota_of("other"),
        limits.max_snapshot_bytes_per_principal
    );
    let (r, _fake) = registry(limits);
    let _s = r.create_explicit("small", None).await.unwrap();
    let err = r.create_explicit("small", None).await.err().unwrap();
    assert!(err.to_string().contains("already has 1 live"), "{err}");
    let _o1 = r.create_explicit("other", None).await.unwrap();
    let _o2 = r.create_explicit("other", None).await.unwrap();
    assert!(r.create_explicit("other", None).await.is_err());
}

#[tokio::test]
async fn idle_sandboxes_expire_with_a_clear_error() {
    let limits = Limits {
        idle_timeout: Duration::from_millis(300),
        ..Limits::default()
    };
    let (r, fake) = registry(limits);
    let id = r.create_explicit("p", None).await.unwrap().id().to_string();
    drop(r.acquire(&session("s"), "p", None).await.unwrap());
    // A held lease keeps its sandbox alive.
    let held = r.acquire(&Conversation::Stdio, "p", None).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_eq!(fake.destroyed.load(Ordering::SeqCst), 2);
    let err = r.get(&id, "p").await.err().unwrap();
    assert!(matches!(err, RegistryError::Expired(_)), "{err}");
    assert!(err.to_string().contains("idle timeout"), "{err}");
    let err = r.acquire(&session("s"), "p", None).await.err().unwrap();
    assert!(err.to_string().contains("reset_sandbox"), "{err}");
    // reset gives the conversation a fresh sandbox.
    let fresh = r.reset_conversation(&session("s"), "p").await.unwrap();
    assert_eq!(fresh.sandbox().n, 3);
    drop(fresh);
    assert_eq!(
        r.acquire(&session("s"), "p", None)
            .await
            .unwrap()
            .sandbox()
            .n,
        3
    );
    drop(held);
}

#[tokio::test]
async fn lifetime_ends_even_a_busy_sandbox() {
    let limits = Limits {
        max_lifetime: Duration::from_millis(300),
        ..Limits::default()
    };
    let (r, _) = registry(limits);
    let lease = r.acquire(&Conversation::Stdio, "p", None).await.unwrap();
    // The running call is told to stop, and must let go.
    tokio::time::timeout(Duration::from_secs(5), lease.cancelled())
        .await
        .unwrap();
    drop(lease);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let err = r
        .acquire(&Conversation::Stdio, "p", None)
        .await
        .err()
        .unwrap();
    assert!(
        err.to_string().contains("maximum sandbox lifetime"),
        "{err}"
    );
}

#[tokio::test]
async fn reset_keeps_the_id_and_cancels_running_calls() {
    let (r, fake) = registry(Limits::default());
    let lease = r.create_explicit("p", None).await.unwrap();
    let id = lease.id().to_string();
    let r2 = r.clone();
    let id2 = id.clone();
    let reset =
        tokio::spawn(async move { r2.reset_explicit(&id2, "p").await.map(|l| l.sandbox().n) });
    tokio::time::timeout(Duration::from_secs(5), lease.cancelled())
        .await
        .unwrap();
    drop(lease);
    assert_eq!(reset.await.unwrap().unwrap(), 1);
    assert_eq!(fake.destroyed.load(Ordering::SeqCst), 1);
    let again = r.get(&id, "p").await.unwrap();
    assert_eq!(again.sandbox().n, 1);
    r.count_usage_check(&again);
}

impl Registry<Fake> {
    fn count_usage_check(&self, lease: &Lease<FakeSandbox>) {
        lease.count_run();
        let info = self.info(lease);
        assert_eq!(info.usage.runs, 1);
        assert!(info.usage.memory_gb_seconds > 0.0);
        assert!(info.usage.vcpu_seconds >= 0.0);
        assert!(info.expires_in <= DEFAULT_IDLE_TIMEOUT);
    }
}

#[tokio::test]
async fn twenty_resets_at_once_stay_within_the_limits() {
    let (r, fake) = registry(Limits {
        max_sandboxes: 2,
        max_per_principal: 2,
        ..Limits::default()
    });
    *lock(&fake.slow) = Duration::from_millis(30);
    let a = r.create_explicit("p", None).await.unwrap().id().to_string();
    let b = r.create_explicit("p", None).await.unwrap().id().to_string();
    let resets = (0..20).map(|i| {
        let (r, id) = (r.clone(), if i % 2 == 0 { a.clone() } else { b.clone() });
        tokio::spawn(async move { r.reset_explicit(&id, "p").await.map(|l| l.sandbox().n) })
    });
    for reset in resets.collect::<Vec<_>>() {
        reset.await.unwrap().unwrap();
    }
    assert!(
        fake.peak.load(Ordering::SeqCst) <= 2,
        "two sandboxes never hold more than two VMs"
    );
    // Resets that queued behind a running one are served by the next one.
    let made = fake.made.load(Ordering::SeqCst);
    assert!(
        (4..=22).contains(&made),
        "{made} VMs for 20 resets of 2 sandboxes"
    );
    assert_eq!(fake.live.load(Ordering::SeqCst), 2);
    assert_ne!(r.get(&a, "p").await.unwrap().sandbox().n, 0);
    // Another principal cannot reset them.
    let err = r.reset_explicit(&a, "q").await.err().unwrap();
    assert!(matches!(err, RegistryError::Forbidden(_)), "{err}");
}

#[tokio::test]
async fn a_stalled_call_holds_up_neither_the_reaper_nor_shutdown() {
    let (r, fake) = registry(Limits {
        max_lifetime: Duration::from_millis(600),
        stall_grace: Duration::from_secs(3),
        ..Limits::default()
    });
    // A call stuck on its guest: it holds its lease and ignores the cancel.
    let stalled = r.create_explicit("p", None).await.unwrap();
    let killed = stalled.sandbox().killed.clone();
    let started = Instant::now();
    let other = r.create_explicit("p", None).await.unwrap().id().to_string();
    while fake.destroyed.load(Ordering::SeqCst) == 0 {
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "the other sandbox outlived its lifetime"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        killed.load(Ordering::SeqCst),
        "the stalled sandbox's VM is killed at once"
    );
    let err = r.get(&other, "p").await.err().unwrap();
    assert!(
        err.to_string().contains("maximum sandbox lifetime"),
        "{err}"
    );
    // Shutdown ends within the grace although the call never lets go.
    let third = r.create_explicit("q", None).await.unwrap();
    let held = third.sandbox().killed.clone();
    let shutdown = Instant::now();
    r.shutdown().await;
    assert!(held.load(Ordering::SeqCst));
    assert!(
        shutdown.elapsed() < Duration::from_secs(5),
        "{:?}",
        shutdown.elapsed()
    );
    drop((stalled, third));
}

#[tokio::test]
async fn an_idle_sandbox_pauses_and_the_next_call_resumes_it() {
    let limits = Limits {
        pause_after: Duration::from_millis(300),
        ..Limits::default()
    };
    let (registry, fake) = registry(limits);
    let lease = registry.acquire(&session("a"), "p", None).await.unwrap();
    let n = lease.sandbox().n;
    // Held by a call, it is busy, not idle.
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert!(!registry.info(&lease).pauses.paused);
    assert_eq!(fake.live.load(Ordering::SeqCst), 1);
    drop(lease);
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert_eq!(fake.live.load(Ordering::SeqCst), 0, "paused: no VM");

    let lease = registry.acquire(&session("a"), "p", None).await.unwrap();
    assert_eq!(lease.sandbox().n, n, "the same sandbox came back");
    let record = registry.info(&lease).pauses;
    assert!(!record.paused);
    assert_eq!((record.pauses, record.resumes), (1, 1));
    assert_eq!(record.stored_bytes, 4096);
    assert!(record.last_resumed.is_some());
    drop(lease);

    // A failed resume keeps the saved state, so a later call gets it back.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    fake.fail.store(true, Ordering::SeqCst);
    assert!(matches!(
        registry.acquire(&session("a"), "p", None).await,
        Err(RegistryError::Start(_))
    ));
    fake.fail.store(false, Ordering::SeqCst);
    let lease = registry.acquire(&session("a"), "p", None).await.unwrap();
    assert_eq!(lease.sandbox().n, n);
    // Two pauses: the first state was discarded when the second was saved.
    assert_eq!(fake.destroyed.load(Ordering::SeqCst), 1000);
    drop(lease);
    registry.release(&session("a")).await;
    assert_eq!(
        fake.destroyed.load(Ordering::SeqCst),
        2001,
        "ending discards the saved state"
    );
}

fn durable(limits: Limits, root: &std::path::Path) -> (Arc<Registry<Fake>>, Arc<Fake>) {
    let fake = fake();
    let store = Arc::new(Store::open(root).unwrap());
    let registry = Registry::start_durable(
        fake.clone(),
        limits,
        1024,
        Arc::new(Metrics::new()),
        store,
        true,
    )
    .unwrap();
    (registry, fake)
}

#[tokio::test]
async fn a_kept_sandbox_outlives_a_restart_and_an_unsaved_one_is_reported_lost() {
    let root = tempfile::tempdir().unwrap();
    let (explicit_id, n) = {
        let (registry, _fake) = durable(Limits::default(), root.path());
        let lease = registry
            .acquire(&Conversation::Stdio, "p", None)
            .await
            .unwrap();
        lease.count_run();
        let n = lease.sandbox().n;
        drop(lease);
        let explicit = registry.create_explicit("p", None).await.unwrap();
        let explicit_id = explicit.id().to_string();
        drop(explicit);
        registry.shutdown().await;
        (explicit_id, n)
    };
    {
        // Both were paused at shutdown and come back at the next call.
        let (registry, fake) = durable(Limits::default(), root.path());
        assert_eq!(fake.live.load(Ordering::SeqCst), 0);
        let lease = registry
            .acquire(&Conversation::Stdio, "p", None)
            .await
            .unwrap();
        assert_eq!(
            lease.sandbox().n,
            n,
            "the stdio conversation's sandbox came back"
        );
        let info = registry.info(&lease);
        assert_eq!(info.usage.runs, 1, "counters survive");
        assert_eq!((info.pauses.pauses, info.pauses.resumes), (1, 1));
        drop(lease);
        assert!(registry.get(&explicit_id, "p").await.is_ok());
        assert!(matches!(
            registry.get(&explicit_id, "q").await,
            Err(RegistryError::Forbidden(_))
        ));
        // A new sandbox, never saved, and then a crash (no shutdown).
        let unsaved = registry.create_explicit("p", None).await.unwrap();
        let unsaved_id = unsaved.id().to_string();
        drop(unsaved);
        drop(registry);
        tokio::time::sleep(Duration::from_millis(100)).await;
        let (registry, _fake) = durable(Limits::default(), root.path());
        match registry.get(&unsaved_id, "p").await {
            Err(RegistryError::Expired(m)) => {
                assert!(m.contains("before it had ever been saved"), "{m}")
            }
            other => panic!("expected lost, got {:?}", other.map(|l| l.id().to_string())),
        }
        // The ones that had been saved come back from their last state.
        assert!(registry.get(&explicit_id, "p").await.is_ok());
    }
}

fn sref(lease: Lease<FakeSandbox>) -> SandboxRef<FakeSandbox> {
    SandboxRef(lease.handle.clone())
}

fn sref_of(lease: &Lease<FakeSandbox>) -> SandboxRef<FakeSandbox> {
    SandboxRef(lease.handle.clone())
}

#[tokio::test]
async fn checkpoints_roll_back_fork_and_stay_within_the_quota() {
    let root = tempfile::tempdir().unwrap();
    let limits = Limits {
        max_snapshot_bytes_per_principal: 2 * 4096,
        ..Limits::default()
    };
    let (registry, _fake) = durable(limits.clone(), root.path());
    let mark = |lease: &Lease<FakeSandbox>| lease.sandbox().mark.load(Ordering::SeqCst);
    let lease = registry
        .acquire(&Conversation::Stdio, "p", None)
        .await
        .unwrap();
    let id = lease.id().to_string();
    lease.sandbox().mark.store(1, Ordering::SeqCst);
    let first = registry
        .checkpoint(&sref(lease), Some("one".into()))
        .await
        .unwrap();
    assert_eq!(first.label, "one");
    let lease = registry
        .acquire(&Conversation::Stdio, "p", None)
        .await
        .unwrap();
    assert_eq!(mark(&lease), 1, "the sandbox runs on from its checkpoint");
    lease.sandbox().mark.store(2, Ordering::SeqCst);
    let second = registry.checkpoint(&sref(lease), None).await.unwrap();
    let lease = registry
        .acquire(&Conversation::Stdio, "p", None)
        .await
        .unwrap();
    match registry.checkpoint(&sref(lease), None).await {
        Err(RegistryError::Limit(m)) => assert!(m.contains("8 KiB of its 8 KiB"), "{m}"),
        other => panic!(
            "expected the quota, got {:?}",
            other.map(|c| c.checkpoint_id)
        ),
    }
    let lease = registry
        .acquire(&Conversation::Stdio, "p", None)
        .await
        .unwrap();
    assert!(matches!(
        registry.checkpoint(&sref(lease), Some("a\nb".into())).await,
        Err(RegistryError::Invalid(_))
    ));

    // Rolled back to the first: its state, the same id, the second gone.
    let lease = registry
        .acquire(&Conversation::Stdio, "p", None)
        .await
        .unwrap();
    lease.sandbox().mark.store(3, Ordering::SeqCst);
    let discarded = registry
        .rollback(&sref(lease), &first.checkpoint_id)
        .await
        .unwrap();
    assert_eq!(discarded, vec![second.checkpoint_id.clone()]);
    let lease = registry
        .acquire(&Conversation::Stdio, "p", None)
        .await
        .unwrap();
    assert_eq!((lease.id(), mark(&lease)), (id.as_str(), 1));
    let listed = registry.list_checkpoints(&sref_of(&lease));
    assert_eq!(listed.checkpoints, vec![first.clone()]);
    assert_eq!(listed.principal_bytes, 4096);
    let gone = registry.rollback(&sref(lease), &second.checkpoint_id).await;
    assert!(matches!(gone, Err(RegistryError::Invalid(_))));

    // A fork: a new id with the checkpoint's state; another principal
    // cannot use the checkpoint.
    let lease = registry
        .acquire(&Conversation::Stdio, "p", None)
        .await
        .unwrap();
    let (child, taken) = registry
        .fork(&sref(lease), Some(&first.checkpoint_id))
        .await
        .unwrap();
    assert!(taken.is_none());
    assert_ne!(child.id(), id);
    assert_eq!(mark(&child), 1);
    child.sandbox().mark.store(7, Ordering::SeqCst);
    drop(child);
    let lease = registry
        .acquire(&Conversation::Stdio, "p", None)
        .await
        .unwrap();
    assert_eq!(mark(&lease), 1, "the parent does not see the fork's writes");
    drop(lease);
    let other = registry.create_explicit("q", None).await.unwrap();
    assert!(matches!(
        registry
            .fork(&sref(other), Some(&first.checkpoint_id))
            .await,
        Err(RegistryError::ForbiddenCheckpoint(_))
    ));

    // Checkpoints outlive a restart with their sandbox.
    registry.shutdown().await;
    drop(registry);
    let (registry, _fake) = durable(limits, root.path());
    let lease = registry
        .acquire(&Conversation::Stdio, "p", None)
        .await
        .unwrap();
    assert_eq!(
        registry.list_checkpoints(&sref_of(&lease)).checkpoints,
        vec![first.clone()]
    );
    registry
        .rollback(&sref(lease), &first.checkpoint_id)
        .await
        .unwrap();
    let lease = registry
        .acquire(&Conversation::Stdio, "p", None)
        .await
        .unwrap();
    assert_eq!(mark(&lease), 1);

    // A rollback whose resume fails leaves no VM; the checkpoint is what
    // the next call resumes, and a rollback still works.
    drop(lease);
    let fake = _fake;
    fake.fail.store(true, Ordering::SeqCst);
    let lease = registry
        .acquire(&Conversation::Stdio, "p", None)
        .await
        .unwrap();
    let target = sref(lease);
    match registry.rollback(&target, &first.checkpoint_id).await {
        Err(RegistryError::Start(m)) => assert!(m.contains("next call tries again"), "{m}"),
        other => panic!("expected a failed resume, got {other:?}"),
    }
    fake.fail.store(false, Ordering::SeqCst);
    registry
        .rollback(&target, &first.checkpoint_id)
        .await
        .unwrap();
    let lease = registry
        .acquire(&Conversation::Stdio, "p", None)
        .await
        .unwrap();
    assert_eq!(mark(&lease), 1);
}

#[tokio::test]
async fn a_sandbox_s_life_is_told_on_the_event_feed_with_one_warning_per_expiry() {
    let limits = Limits {
        idle_timeout: Duration::from_millis(2000),
        pause_after: Duration::from_millis(600),
        ..Limits::default()
    };
    let (r, _fake) = registry(limits);
    let mut events = r.events().subscribe();
    let lease = r.acquire(&session("s"), "p", None).await.unwrap();
    let id = lease.id().to_string();
    drop(lease);
    // Paused at 0.6 s, warned before 2 s, ended at 2 s.
    tokio::time::sleep(Duration::from_millis(3000)).await;
    let mut seen = Vec::new();
    while let Ok(notice) = events.try_recv() {
        assert_eq!(notice.sandbox_id, id);
        seen.push(notice.event);
    }
    let kinds: Vec<&str> = seen
        .iter()
        .map(|e| match e {
            SandboxEvent::Started { .. } => "started",
            SandboxEvent::Paused { .. } => "paused",
            SandboxEvent::ExpiresSoon { .. } => "expires soon",
            SandboxEvent::Ended { .. } => "ended",
            _ => "other",
        })
        .collect();
    assert_eq!(
        kinds,
        ["started", "paused", "expires soon", "ended"],
        "{seen:?}"
    );
    let lead = r.expiry_warning_lead();
    assert!(
        matches!(seen[2], SandboxEvent::ExpiresSoon { within, reason: EndReason::Idle } if within <= lead && !within.is_zero()),
        "{seen:?}"
    );
    assert!(matches!(
        seen[3],
        SandboxEvent::Ended {
            reason: EndReason::Idle
        }
    ));

    // A resume is told, and a call moves the deadline: a new warning.
    let lease = r.acquire(&session("t"), "p", None).await.unwrap();
    let id = lease.id().to_string();
    drop(lease);
    tokio::time::sleep(Duration::from_millis(1000)).await;
    drop(r.acquire(&session("t"), "p", None).await.unwrap());
    let mut resumed = 0;
    let mut warnings = 0;
    loop {
        let notice = tokio::time::timeout(Duration::from_secs(10), events.recv())
            .await
            .expect("the sandbox ends")
            .unwrap();
        assert_eq!(notice.sandbox_id, id);
        match notice.event {
            SandboxEvent::Resumed { .. } => resumed += 1,
            SandboxEvent::ExpiresSoon { .. } => warnings += 1,
            SandboxEvent::Ended { .. } => break,
            _ => {}
        }
    }
    assert_eq!((resumed, warnings), (1, 1));
}

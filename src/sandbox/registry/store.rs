//! The registry's durable record, in SQLite: sandboxes (their principal,
//! lifecycle state, last saved state and counters), checkpoints, and the
//! metering of principals whose sandboxes have ended.
//!
//! A store is one directory: `registry.sqlite3`, a lock held for the
//! server's life (one server per store), and the saved states it names.
//! Saved state is written first (temp directory, fsync, rename), then the
//! database commits; a crash between the two leaves a directory no row
//! names, which [`Store::open`] collects. So the database only ever names
//! complete states.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use rusqlite::{Connection, OptionalExtension, params};

use super::handle::lock;

pub const DATABASE_FILE: &str = "registry.sqlite3";
pub const LOCK_FILE: &str = "lock";

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS sandboxes (
    id TEXT PRIMARY KEY,
    principal TEXT NOT NULL,
    -- 'stdio' for the stdio conversation's sandbox (kept by --persist)
    conversation TEXT,
    -- the last complete saved state (a directory in the store), if any
    saved TEXT,
    saved_bytes INTEGER NOT NULL DEFAULT 0,
    saved_unix REAL,
    -- 1 while its VM is gone and `saved` is what the next call resumes
    paused INTEGER NOT NULL DEFAULT 0,
    created_unix REAL NOT NULL,
    last_used_unix REAL NOT NULL,
    vcpu_seconds REAL NOT NULL DEFAULT 0,
    memory_gb_seconds REAL NOT NULL DEFAULT 0,
    runs INTEGER NOT NULL DEFAULT 0,
    pauses INTEGER NOT NULL DEFAULT 0,
    resumes INTEGER NOT NULL DEFAULT 0,
    pause_seconds REAL NOT NULL DEFAULT 0,
    resume_seconds REAL NOT NULL DEFAULT 0,
    snapshot_writes INTEGER NOT NULL DEFAULT 0,
    snapshot_restores INTEGER NOT NULL DEFAULT 0,
    snapshot_byte_seconds REAL NOT NULL DEFAULT 0,
    -- said with the next call's result (it came back older than it was)
    notice TEXT
);
CREATE TABLE IF NOT EXISTS checkpoints (
    id TEXT PRIMARY KEY,
    sandbox_id TEXT NOT NULL REFERENCES sandboxes(id) ON DELETE CASCADE,
    principal TEXT NOT NULL,
    label TEXT,
    created_unix REAL NOT NULL,
    dir TEXT NOT NULL,
    bytes INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS principals (
    name TEXT PRIMARY KEY,
    snapshot_writes INTEGER NOT NULL DEFAULT 0,
    snapshot_restores INTEGER NOT NULL DEFAULT 0,
    snapshot_byte_seconds REAL NOT NULL DEFAULT 0
);
";

/// Counters a sandbox keeps across pauses and restarts.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Counters {
    pub vcpu_seconds: f64,
    pub memory_gb_seconds: f64,
    pub runs: u64,
    pub pauses: u64,
    pub resumes: u64,
    pub pause_seconds: f64,
    pub resume_seconds: f64,
    /// Pauses and checkpoints written.
    pub snapshot_writes: u64,
    /// Resumes, rollbacks and forks read back.
    pub snapshot_restores: u64,
    /// Bytes stored times seconds (saved state and checkpoints).
    pub snapshot_byte_seconds: f64,
}

/// A saved state as the database names it.
#[derive(Debug, Clone, PartialEq)]
pub struct SavedRow {
    /// Directory name inside the store.
    pub dir: String,
    pub bytes: u64,
    pub at: SystemTime,
}

#[derive(Debug, Clone, PartialEq)]
pub struct SandboxRow {
    pub id: String,
    pub principal: String,
    pub stdio: bool,
    pub saved: Option<SavedRow>,
    pub paused: bool,
    pub created: SystemTime,
    pub last_used: SystemTime,
    pub counters: Counters,
    /// Not yet said to the sandbox's user.
    pub notice: Option<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct CheckpointRow {
    pub id: String,
    pub sandbox_id: String,
    pub principal: String,
    pub label: Option<String>,
    pub created: SystemTime,
    pub dir: String,
    pub bytes: u64,
}

pub struct Store {
    root: PathBuf,
    db: Mutex<Connection>,
    /// Held (flock) while the store is open.
    _lock: File,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("root", &self.root).finish()
    }
}

pub fn unix(t: SystemTime) -> f64 {
    t.duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64()
}

fn from_unix(secs: f64) -> SystemTime {
    let secs = if secs.is_finite() && secs > 0.0 {
        secs
    } else {
        0.0
    };
    UNIX_EPOCH + Duration::from_secs_f64(secs.min(1e11))
}

fn count(n: i64) -> u64 {
    u64::try_from(n).unwrap_or(0)
}

fn sql_int(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// Columns added after the first release of the schema, added to an
/// older database in place.
fn add_missing_columns(db: &Connection) -> rusqlite::Result<()> {
    let mut query = db.prepare("SELECT name FROM pragma_table_info('sandboxes')")?;
    let columns = query
        .query_map([], |r| r.get::<_, String>(0))?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    if !columns.iter().any(|c| c == "notice") {
        db.execute_batch("ALTER TABLE sandboxes ADD COLUMN notice TEXT")?;
    }
    Ok(())
}

impl Store {
    /// Opens (creating) the store at `root`, takes its lock, and removes
    /// every entry in it that the database does not name (a save a crash
    /// interrupted, a staging directory). Fails if another server holds it.
    pub fn open(root: &Path) -> Result<Store> {
        std::fs::create_dir_all(root)
            .with_context(|| format!("cannot create the state directory {}", root.display()))?;
        let lock_path = root.join(LOCK_FILE);
        let lock_file = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .with_context(|| format!("cannot open {}", lock_path.display()))?;
        // SAFETY: flock on a descriptor we own.
        if unsafe { libc::flock(lock_file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            bail!(
                "the state directory {} is in use by another airlock server; give this one its own --state-dir (or --persist name)",
                root.display()
            );
        }
        let path = root.join(DATABASE_FILE);
        let db = Connection::open(&path)
            .with_context(|| format!("cannot open the registry database {}", path.display()))?;
        db.execute_batch(
            "PRAGMA journal_mode=WAL; PRAGMA synchronous=FULL; PRAGMA foreign_keys=ON;",
        )
        .and_then(|()| db.execute_batch(SCHEMA))
        .and_then(|()| add_missing_columns(&db))
        .with_context(|| format!("cannot set up the registry database {}", path.display()))?;
        let store = Store {
            root: root.to_path_buf(),
            db: Mutex::new(db),
            _lock: lock_file,
        };
        store.collect_orphans()?;
        Ok(store)
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Removes what no row names. Returns how many entries went.
    fn collect_orphans(&self) -> Result<usize> {
        let mut named = std::collections::HashSet::new();
        {
            let db = lock(&self.db);
            let mut saved = db.prepare("SELECT saved FROM sandboxes WHERE saved IS NOT NULL")?;
            for dir in saved.query_map([], |r| r.get::<_, String>(0))? {
                named.insert(dir?);
            }
            let mut checkpoints = db.prepare("SELECT dir FROM checkpoints")?;
            for dir in checkpoints.query_map([], |r| r.get::<_, String>(0))? {
                named.insert(dir?);
            }
        }
        let mut removed = 0;
        let listing = std::fs::read_dir(&self.root)
            .with_context(|| format!("cannot list {}", self.root.display()))?;
        for entry in listing {
            let entry = entry.with_context(|| format!("cannot list {}", self.root.display()))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name == LOCK_FILE || name.starts_with(DATABASE_FILE) || named.contains(&name) {
                continue;
            }
            let path = entry.path();
            let gone = if entry.file_type().is_ok_and(|t| t.is_dir()) {
                std::fs::remove_dir_all(&path)
            } else {
                std::fs::remove_file(&path)
            };
            match gone {
                Ok(()) => {
                    tracing::info!(path = %path.display(), "removed saved state no sandbox names");
                    removed += 1;
                }
                Err(err) => {
                    tracing::warn!(path = %path.display(), %err, "cannot remove orphaned state")
                }
            }
        }
        Ok(removed)
    }

    pub fn sandboxes(&self) -> Result<Vec<SandboxRow>> {
        let db = lock(&self.db);
        let mut query = db.prepare(
            "SELECT id, principal, conversation, saved, saved_bytes, saved_unix, paused,
                    created_unix, last_used_unix, vcpu_seconds, memory_gb_seconds, runs,
                    pauses, resumes, pause_seconds, resume_seconds, snapshot_writes,
                    snapshot_restores, snapshot_byte_seconds, notice
             FROM sandboxes",
        )?;
        let rows = query.query_map([], |r| {
            let saved: Option<String> = r.get(3)?;
            Ok(SandboxRow {
                id: r.get(0)?,
                principal: r.get(1)?,
                stdio: r.get::<_, Option<String>>(2)?.as_deref() == Some("stdio"),
                saved: match saved {
                    Some(dir) => Some(SavedRow {
                        dir,
                        bytes: count(r.get(4)?),
                        at: from_unix(r.get::<_, Option<f64>>(5)?.unwrap_or(0.0)),
                    }),
                    None => None,
                },
                paused: r.get::<_, i64>(6)? != 0,
                created: from_unix(r.get(7)?),
                last_used: from_unix(r.get(8)?),
                counters: Counters {
                    vcpu_seconds: r.get(9)?,
                    memory_gb_seconds: r.get(10)?,
                    runs: count(r.get(11)?),
                    pauses: count(r.get(12)?),
                    resumes: count(r.get(13)?),
                    pause_seconds: r.get(14)?,
                    resume_seconds: r.get(15)?,
                    snapshot_writes: count(r.get(16)?),
                    snapshot_restores: count(r.get(17)?),
                    snapshot_byte_seconds: r.get(18)?,
                },
                notice: r.get(19)?,
            })
        })?;
        rows.collect::<rusqlite::Result<Vec<_>>>()
            .context("cannot read the registry's sandboxes")
    }

    pub fn insert_sandbox(
        &self,
        id: &str,
        principal: &str,
        stdio: bool,
        created: SystemTime,
    ) -> Result<()> {
        let now = unix(created);
        lock(&self.db)
            .execute(
                "INSERT INTO sandboxes (id, principal, conversation, created_unix, last_used_unix)
                 VALUES (?1, ?2, ?3, ?4, ?4)",
                params![id, principal, stdio.then_some("stdio"), now],
            )
            .with_context(|| format!("cannot record sandbox {id}"))?;
        Ok(())
    }

    /// Records the sandbox's counters, its clocks and its saved state in
    /// one transaction. `saved` None clears the saved state.
    #[allow(clippy::too_many_arguments)]
    pub fn update_sandbox(
        &self,
        id: &str,
        saved: Option<&SavedRow>,
        paused: bool,
        created: SystemTime,
        last_used: SystemTime,
        c: &Counters,
        notice: Option<&str>,
    ) -> Result<()> {
        let changed = lock(&self.db)
            .execute(
                "UPDATE sandboxes SET saved = ?2, saved_bytes = ?3, saved_unix = ?4, paused = ?5,
                    created_unix = ?6, last_used_unix = ?7, vcpu_seconds = ?8,
                    memory_gb_seconds = ?9, runs = ?10, pauses = ?11, resumes = ?12,
                    pause_seconds = ?13, resume_seconds = ?14, snapshot_writes = ?15,
                    snapshot_restores = ?16, snapshot_byte_seconds = ?17, notice = ?18
                 WHERE id = ?1",
                params![
                    id,
                    saved.map(|s| s.dir.as_str()),
                    sql_int(saved.map_or(0, |s| s.bytes)),
                    saved.map(|s| unix(s.at)),
                    i64::from(paused),
                    unix(created),
                    unix(last_used),
                    c.vcpu_seconds,
                    c.memory_gb_seconds,
                    sql_int(c.runs),
                    sql_int(c.pauses),
                    sql_int(c.resumes),
                    c.pause_seconds,
                    c.resume_seconds,
                    sql_int(c.snapshot_writes),
                    sql_int(c.snapshot_restores),
                    c.snapshot_byte_seconds,
                    notice,
                ],
            )
            .with_context(|| format!("cannot record sandbox {id}"))?;
        if changed != 1 {
            bail!("sandbox {id} is not in the registry database");
        }
        Ok(())
    }

    /// Removes a sandbox and its checkpoints, folding its snapshot
    /// metering into its principal's.
    pub fn remove_sandbox(&self, id: &str, principal: &str, c: &Counters) -> Result<()> {
        let mut db = lock(&self.db);
        let tx = db.transaction()?;
        tx.execute(
            "INSERT INTO principals (name, snapshot_writes, snapshot_restores, snapshot_byte_seconds)
             VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT(name) DO UPDATE SET
                snapshot_writes = snapshot_writes + excluded.snapshot_writes,
                snapshot_restores = snapshot_restores + excluded.snapshot_restores,
                snapshot_byte_seconds = snapshot_byte_seconds + excluded.snapshot_byte_seconds",
            params![
                principal,
                sql_int(c.snapshot_writes),
                sql_int(c.snapshot_restores),
                c.snapshot_byte_seconds
            ],
        )?;
        tx.execute("DELETE FROM checkpoints WHERE sandbox_id = ?1", params![id])?;
        tx.execute("DELETE FROM sandboxes WHERE id = ?1", params![id])?;
        tx.commit()
            .with_context(|| format!("cannot remove sandbox {id} from the registry"))
    }

    pub fn checkpoints(&self) -> Result<Vec<CheckpointRow>> {
        let db = lock(&self.db);
        let mut query = db.prepare(
            "SELECT id, sandbox_id, principal, label, created_unix, dir, bytes
             FROM checkpoints ORDER BY created_unix",
        )?;
        let rows = query.query_map([], |r| {
            Ok(CheckpointRow {
                id: r.get(0)?,
                sandbox_id: r.get(1)?,
                principal: r.get(2)?,
                label: r.get(3)?,
                created: from_unix(r.get(4)?),
                dir: r.get(5)?,
                bytes: count(r.get(6)?),
            })
        })?;
        rows.collect::<rusqlite::Result<Vec<_>>>()
            .context("cannot read the registry's checkpoints")
    }

    pub fn insert_checkpoint(&self, row: &CheckpointRow) -> Result<()> {
        lock(&self.db)
            .execute(
                "INSERT INTO checkpoints (id, sandbox_id, principal, label, created_unix, dir, bytes)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                params![
                    row.id,
                    row.sandbox_id,
                    row.principal,
                    row.label,
                    unix(row.created),
                    row.dir,
                    sql_int(row.bytes)
                ],
            )
            .with_context(|| format!("cannot record checkpoint {}", row.id))?;
        Ok(())
    }

    pub fn remove_checkpoints(&self, ids: &[String]) -> Result<()> {
        let mut db = lock(&self.db);
        let tx = db.transaction()?;
        for id in ids {
            tx.execute("DELETE FROM checkpoints WHERE id = ?1", params![id])?;
        }
        tx.commit()
            .context("cannot remove checkpoints from the registry")
    }

    /// Snapshot metering of every principal's ended sandboxes.
    pub fn principal_histories(&self) -> Result<Vec<(String, Counters)>> {
        let db = lock(&self.db);
        let mut query = db.prepare(
            "SELECT name, snapshot_writes, snapshot_restores, snapshot_byte_seconds FROM principals",
        )?;
        let rows = query.query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                Counters {
                    snapshot_writes: count(r.get(1)?),
                    snapshot_restores: count(r.get(2)?),
                    snapshot_byte_seconds: r.get(3)?,
                    ..Counters::default()
                },
            ))
        })?;
        rows.collect::<rusqlite::Result<Vec<_>>>()
            .context("cannot read the registry's principals")
    }

    /// Snapshot metering of a principal's ended sandboxes.
    pub fn principal_history(&self, principal: &str) -> Result<Counters> {
        let db = lock(&self.db);
        let row = db
            .query_row(
                "SELECT snapshot_writes, snapshot_restores, snapshot_byte_seconds
                 FROM principals WHERE name = ?1",
                params![principal],
                |r| {
                    Ok(Counters {
                        snapshot_writes: count(r.get(0)?),
                        snapshot_restores: count(r.get(1)?),
                        snapshot_byte_seconds: r.get(2)?,
                        ..Counters::default()
                    })
                },
            )
            .optional()?;
        Ok(row.unwrap_or_default())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_survive_a_reopen_and_unnamed_state_is_collected() {
        let root = tempfile::tempdir().unwrap();
        let t0 = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        {
            let store = Store::open(root.path()).unwrap();
            // A second server on the same store is refused.
            let again = Store::open(root.path()).unwrap_err();
            assert!(format!("{again:#}").contains("in use"), "{again:#}");
            store.insert_sandbox("a", "p", true, t0).unwrap();
            std::fs::create_dir(root.path().join("state-1")).unwrap();
            std::fs::create_dir(root.path().join("state-2")).unwrap();
            let saved = SavedRow {
                dir: "state-1".into(),
                bytes: 4096,
                at: t0,
            };
            let counters = Counters {
                runs: 3,
                pauses: 1,
                ..Counters::default()
            };
            store
                .update_sandbox(
                    "a",
                    Some(&saved),
                    true,
                    t0,
                    t0,
                    &counters,
                    Some("said later"),
                )
                .unwrap();
            store
                .insert_checkpoint(&CheckpointRow {
                    id: "c".into(),
                    sandbox_id: "a".into(),
                    principal: "p".into(),
                    label: Some("before".into()),
                    created: t0,
                    dir: "state-2".into(),
                    bytes: 8192,
                })
                .unwrap();
            // Written but never committed: a crash between rename and commit.
            std::fs::create_dir(root.path().join("state-3")).unwrap();
        }
        let store = Store::open(root.path()).unwrap();
        let rows = store.sandboxes().unwrap();
        assert_eq!(rows.len(), 1);
        assert!(rows[0].stdio && rows[0].paused);
        assert_eq!(rows[0].counters.runs, 3);
        assert_eq!(rows[0].notice.as_deref(), Some("said later"));
        assert_eq!(rows[0].saved.as_ref().unwrap().dir, "state-1");
        assert_eq!(
            store.checkpoints().unwrap()[0].label.as_deref(),
            Some("before")
        );
        assert!(root.path().join("state-1").exists());
        assert!(root.path().join("state-2").exists());
        assert!(!root.path().join("state-3").exists());

        let ended = Counters {
            snapshot_writes: 2,
            ..Counters::default()
        };
        store.remove_sandbox("a", "p", &ended).unwrap();
        assert!(store.sandboxes().unwrap().is_empty());
        assert!(store.checkpoints().unwrap().is_empty());
        assert_eq!(store.principal_history("p").unwrap().snapshot_writes, 2);
    }
}

//! The shared state store: one SQLite file (WAL mode) that every `host` process uses for
//! circuit breakers, quota counts and the usage ledger. Transactions are short and take the
//! write lock up front, so concurrent processes queue instead of failing.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};

use crate::clock::{DAY_MS, Millis};

/// A process that finds the WAL longer than this checkpoints it.
const WAL_CHECKPOINT_BYTES: u64 = 256 << 10;

/// How long a process waits for another's write transaction before giving up.
const BUSY_TIMEOUT: Duration = Duration::from_secs(30);

/// Schema migrations, applied in order; `PRAGMA user_version` counts those applied.
const MIGRATIONS: &[&str] = &[
    // 1: the ledger and the breakers.
    "CREATE TABLE attempts (
        id INTEGER PRIMARY KEY,
        service TEXT NOT NULL,
        model TEXT,
        started_ms INTEGER NOT NULL,
        duration_ms INTEGER,
        exit_code INTEGER,
        signal INTEGER,
        tokens_in INTEGER,
        tokens_out INTEGER,
        tokens_total INTEGER,
        estimated INTEGER NOT NULL DEFAULT 0,
        outcome TEXT NOT NULL,
        spawned INTEGER NOT NULL
    );
    CREATE INDEX attempts_by_service_time ON attempts (service, started_ms);
    CREATE INDEX attempts_by_time ON attempts (started_ms);
    CREATE TABLE breakers (
        service TEXT PRIMARY KEY,
        phase TEXT NOT NULL,
        consecutive_failures INTEGER NOT NULL,
        open_until_ms INTEGER NOT NULL,
        closed_since_ms INTEGER NOT NULL,
        probes INTEGER NOT NULL,
        probe_expires_ms INTEGER NOT NULL,
        last_failure TEXT,
        trip_reason TEXT
    );",
    // 2: requests that ran, counted per service and UTC day by a trigger, so that a daily
    // quota costs one lookup instead of a count of the day's ledger; and an index of the
    // requests that ran, for the per-minute quotas.
    "CREATE TABLE spawned_per_day (
        service TEXT NOT NULL,
        day INTEGER NOT NULL,
        requests INTEGER NOT NULL,
        PRIMARY KEY (service, day)
    ) WITHOUT ROWID;
    INSERT INTO spawned_per_day (service, day, requests)
        SELECT service, started_ms / 86400000, COUNT(*) FROM attempts WHERE spawned = 1 GROUP BY 1, 2;
    CREATE TRIGGER attempts_count_spawned AFTER INSERT ON attempts WHEN NEW.spawned = 1 BEGIN
        INSERT INTO spawned_per_day (service, day, requests) VALUES (NEW.service, NEW.started_ms / 86400000, 1)
        ON CONFLICT (service, day) DO UPDATE SET requests = requests + 1;
    END;
    CREATE INDEX attempts_spawned ON attempts (service, started_ms) WHERE spawned = 1;",
    // 3: every per-service query of the ledger is about requests that ran, which the index
    // of migration 2 serves; one index fewer to update makes every insert cheaper. The daily
    // counts are kept by `insert_attempt` itself, which costs less than a trigger program.
    "DROP INDEX attempts_by_service_time;
    DROP TRIGGER attempts_count_spawned;",
];

/// The outcome recorded for an attempt that has not finished (yet, or ever: a crash).
pub const RUNNING: &str = "running";
/// The outcome recorded for a success.
pub const OK: &str = "ok";

/// One row of the usage ledger.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AttemptRow {
    pub service: String,
    pub model: Option<String>,
    pub started_ms: Millis,
    pub duration_ms: Option<i64>,
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    pub tokens_in: Option<i64>,
    pub tokens_out: Option<i64>,
    pub tokens_total: Option<i64>,
    pub estimated: bool,
    /// `ok`, `running`, or a failure kind.
    pub outcome: String,
    /// False for requests refused without running anything (open circuit, quota).
    pub spawned: bool,
}

/// A circuit's state as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct BreakerRow {
    /// `closed`, `open` or `half-open`.
    pub phase: String,
    pub consecutive_failures: u32,
    pub open_until_ms: Millis,
    /// When the circuit last closed: the failure-rate window never reaches back past it.
    pub closed_since_ms: Millis,
    /// Probes admitted and not yet finished while half-open.
    pub probes: u32,
    /// When the admitted probes are presumed lost (their process died).
    pub probe_expires_ms: Millis,
    pub last_failure: Option<String>,
    pub trip_reason: Option<String>,
}

impl BreakerRow {
    pub fn closed(now: Millis) -> BreakerRow {
        BreakerRow {
            phase: "closed".into(),
            consecutive_failures: 0,
            open_until_ms: 0,
            closed_since_ms: now,
            probes: 0,
            probe_expires_ms: 0,
            last_failure: None,
            trip_reason: None,
        }
    }
}

/// The store: a file shared by processes, or memory private to this one.
pub struct State {
    conn: Mutex<Connection>,
    path: Option<PathBuf>,
    /// Commits made through this store, to checkpoint the WAL now and then.
    commits: AtomicU64,
    /// Transactions asked for through `write_soon`/`read_soon`, and the groups they ran in.
    queued: AtomicU64,
    groups: AtomicU64,
    /// A checkpoint is due: the next write that may wait does it.
    checkpoint_due: AtomicBool,
    /// Transactions this process's tasks asked for (see [`State::write_soon`]) and that
    /// have not run yet; they run together, in one transaction.
    pending: Mutex<Vec<Box<dyn Queued>>>,
}

impl State {
    /// `$XDG_STATE_HOME/exechost/state.db`.
    pub fn default_path() -> Option<PathBuf> {
        crate::dirs::state_home().map(|d| d.join("exechost").join("state.db"))
    }

    /// Opens (creating if needed) the state file and brings its schema up to date.
    pub fn open(path: &Path) -> Result<Arc<State>> {
        let advice = "move the file away or delete it (it holds breaker states, quota counts and the usage ledger), or pass --state PATH";
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("creating the state directory {} (pass --state PATH, or --no-state)", dir.display()))?;
        }
        let conn = Connection::open(path).with_context(|| format!("opening the state file {}", path.display()))?;
        // No checkpoint (with its fsync) at every short-lived process's exit: see `prepare`
        // and `committed` for when the WAL is checkpointed.
        conn.set_db_config(rusqlite::config::DbConfig::SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE, true)?;
        let state = State::new(conn, Some(path.to_path_buf()));
        state
            .prepare()
            .with_context(|| format!("state file {} cannot be used; {advice}", path.display()))?;
        Ok(Arc::new(state))
    }

    /// A store in memory: nothing is shared with other processes or kept after exit.
    pub fn in_memory() -> Result<Arc<State>> {
        let state = State::new(Connection::open_in_memory()?, None);
        state.prepare()?;
        Ok(Arc::new(state))
    }

    fn new(conn: Connection, path: Option<PathBuf>) -> State {
        State {
            conn: Mutex::new(conn),
            path,
            commits: AtomicU64::new(0),
            queued: AtomicU64::new(0),
            groups: AtomicU64::new(0),
            checkpoint_due: AtomicBool::new(false),
            pending: Mutex::new(Vec::new()),
        }
    }

    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    fn prepare(&self) -> Result<()> {
        let mut conn = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        conn.busy_timeout(BUSY_TIMEOUT)?;
        // Several processes may create the file at once; switching to WAL needs a moment
        // alone with it, and the busy handler does not cover that.
        let mut tries = 0;
        loop {
            match conn.query_row("PRAGMA journal_mode = WAL", [], |r| r.get::<_, String>(0)) {
                Ok(_) => break,
                Err(rusqlite::Error::SqliteFailure(e, _)) if e.code == rusqlite::ErrorCode::DatabaseBusy && tries < 500 => {
                    tries += 1;
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(e) => return Err(e.into()),
            }
        }
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        // Checkpoints are this store's to schedule (see `committed`), never a commit's side effect.
        conn.pragma_update(None, "wal_autocheckpoint", 0)?;
        // Processes are short-lived and do not checkpoint on close (that would fsync at every
        // exit), but the next process to open the file replays what the WAL holds: whoever
        // finds it long checkpoints it.
        if self.wal_len() > WAL_CHECKPOINT_BYTES {
            checkpoint(&conn, "TRUNCATE");
        }
        let current = conn.query_row("PRAGMA user_version", [], |r| r.get::<_, i64>(0))? as usize;
        if current == MIGRATIONS.len() {
            return Ok(());
        }
        // Migrations take the write lock, and check the version again under it.
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let version = tx.query_row("PRAGMA user_version", [], |r| r.get::<_, i64>(0))? as usize;
        if version > MIGRATIONS.len() {
            anyhow::bail!("its schema version {version} is newer than this host understands ({})", MIGRATIONS.len());
        }
        for migration in &MIGRATIONS[version..] {
            tx.execute_batch(migration)?;
        }
        tx.pragma_update(None, "user_version", MIGRATIONS.len() as i64)?;
        tx.commit()?;
        Ok(())
    }

    /// Runs `f` in a write transaction (the write lock is taken at its start) and commits.
    /// Waits (up to the busy timeout) for another process's write transaction to end.
    pub fn write<T>(&self, f: impl FnOnce(&Connection) -> rusqlite::Result<T>) -> Result<T> {
        let conn = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        let value = transaction(&conn, "BEGIN IMMEDIATE", f)?;
        self.committed(&conn, true);
        Ok(value)
    }

    /// Runs `f` in a read transaction: a consistent snapshot.
    pub fn read<T>(&self, f: impl FnOnce(&Connection) -> rusqlite::Result<T>) -> Result<T> {
        let conn = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        Ok(transaction(&conn, "BEGIN DEFERRED", f)?)
    }

    /// A write transaction for an async task: `f` runs together with the other transactions
    /// this process's tasks ask for meanwhile, in one transaction (one commit, one set of
    /// WAL frames for them all), on the async thread when that needs no waiting and on a
    /// worker thread otherwise. `f` may run more than once; only one run takes effect.
    pub async fn write_soon<T: Send + 'static>(
        self: &Arc<Self>,
        f: impl Fn(&Connection) -> rusqlite::Result<T> + Send + 'static,
    ) -> Result<T> {
        self.queue(f, true).await
    }

    /// A read transaction for an async task, done together with others like
    /// [`State::write_soon`]; it sees a consistent snapshot.
    pub async fn read_soon<T: Send + 'static>(
        self: &Arc<Self>,
        f: impl Fn(&Connection) -> rusqlite::Result<T> + Send + 'static,
    ) -> Result<T> {
        self.queue(f, false).await
    }

    async fn queue<T: Send + 'static>(
        self: &Arc<Self>,
        f: impl Fn(&Connection) -> rusqlite::Result<T> + Send + 'static,
        writes: bool,
    ) -> Result<T> {
        let (reply, answer) = tokio::sync::oneshot::channel();
        let first = {
            let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
            pending.push(Box::new(Work { f, writes, outcome: None, reply }));
            pending.len() == 1
        };
        if first {
            // A task of its own, so that a caller that stops waiting strands no one.
            tokio::spawn(self.clone().flush());
        }
        answer.await.unwrap_or_else(|_| Err(anyhow::anyhow!("the state transaction was abandoned (its task panicked)")))
    }

    /// Runs what is pending: after the tasks that are ready now (and those that the next
    /// look for I/O wakes) have had their turn to add to it.
    async fn flush(self: Arc<Self>) {
        tokio::task::yield_now().await;
        let mut group = std::mem::take(&mut *self.pending.lock().unwrap_or_else(|p| p.into_inner()));
        if group.is_empty() {
            return;
        }
        self.queued.fetch_add(group.len() as u64, Ordering::Relaxed);
        self.groups.fetch_add(1, Ordering::Relaxed);
        let writes = group.iter().any(|w| w.writes());
        if self.run_in_place(&mut group, writes) {
            group.into_iter().for_each(|w| w.deliver(None));
            return;
        }
        // Busy (another process writes, a checkpoint is due) or failed: the waiting way.
        let state = self.clone();
        let _ = tokio::task::spawn_blocking(move || state.run_waiting(group, writes)).await;
    }

    /// Runs a group in one transaction on this thread if that needs no waiting: the
    /// connection is free, no other process holds the lock, and no checkpoint is due (which
    /// may wait on the disk). `false`: it did not commit, and nothing of it took effect.
    fn run_in_place(&self, group: &mut [Box<dyn Queued>], writes: bool) -> bool {
        if writes && self.checkpoint_due.load(Ordering::Relaxed) {
            return false;
        }
        let Some(conn) = self.try_lock() else { return false };
        let _ = conn.busy_timeout(Duration::ZERO);
        let committed = run_group(&conn, group, writes).is_ok();
        let _ = conn.busy_timeout(BUSY_TIMEOUT);
        if committed && writes {
            self.committed(&conn, false);
        }
        committed
    }

    /// Runs a group in one transaction, waiting for the locks as [`State::write`] does; if
    /// that fails, each in a transaction of its own, so that one failure fails only its own.
    fn run_waiting(&self, mut group: Vec<Box<dyn Queued>>, writes: bool) {
        let conn = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        if run_group(&conn, &mut group, writes).is_ok() {
            if writes {
                self.committed(&conn, true);
            }
            group.into_iter().for_each(|w| w.deliver(None));
            return;
        }
        for mut work in group {
            let writes = work.writes();
            match run_group(&conn, std::slice::from_mut(&mut work), writes) {
                Ok(()) => {
                    if writes {
                        self.committed(&conn, true);
                    }
                    work.deliver(None);
                }
                Err(e) => work.deliver(Some(e)),
            }
        }
    }

    fn try_lock(&self) -> Option<std::sync::MutexGuard<'_, Connection>> {
        match self.conn.try_lock() {
            Ok(conn) => Some(conn),
            Err(std::sync::TryLockError::Poisoned(p)) => Some(p.into_inner()),
            Err(std::sync::TryLockError::WouldBlock) => None,
        }
    }

    /// Counts commits; every `CHECKPOINT_EVERY`, checkpoints the WAL (a long batch would
    /// otherwise grow it without end: the automatic checkpoint is off, as it would wait on
    /// the disk in whichever commit happened to trigger it). The checkpoint restarts the WAL
    /// rather than truncating it, so later commits overwrite pages the file already has
    /// instead of growing it page by page again.
    fn committed(&self, conn: &Connection, may_wait: bool) {
        let commits = self.commits.fetch_add(1, Ordering::Relaxed) + 1;
        if self.path.is_some() && commits.is_multiple_of(CHECKPOINT_EVERY) {
            self.checkpoint_due.store(true, Ordering::Relaxed);
        }
        // Not in place: the next write that may wait does it.
        if !may_wait || !self.checkpoint_due.swap(false, Ordering::Relaxed) {
            return;
        }
        checkpoint(conn, "RESTART");
    }

    /// The WAL file's length (0 in memory or when there is none).
    fn wal_len(&self) -> u64 {
        let Some(path) = &self.path else { return 0 };
        let mut name = path.as_os_str().to_owned();
        name.push("-wal");
        std::fs::metadata(PathBuf::from(name)).map_or(0, |m| m.len())
    }
}

impl Drop for State {
    /// A long-running process leaves the WAL short for the next one to open.
    fn drop(&mut self) {
        let (queued, groups) = (self.queued.load(Ordering::Relaxed), self.groups.load(Ordering::Relaxed));
        if groups > 0 {
            tracing::debug!("state: {queued} transactions ran in {groups} groups ({:.1} each)", queued as f64 / groups as f64);
        }
        if self.wal_len() > WAL_CHECKPOINT_BYTES {
            checkpoint(self.conn.get_mut().unwrap_or_else(|p| p.into_inner()), "TRUNCATE");
        }
    }
}

/// How many commits pass between checkpoints of a running process: a few MiB of WAL, as
/// each checkpoint costs a few milliseconds with its fsync. (The store truncates the WAL
/// when it closes, so the next process to open the file finds it short.)
const CHECKPOINT_EVERY: u64 = 256;

/// Checkpoints the WAL (`mode`: RESTART or TRUNCATE) without waiting: a checkpoint is only
/// an optimisation, and one that finds other processes reading or writing copies what it
/// can and leaves the rest to a later one.
fn checkpoint(conn: &Connection, mode: &str) {
    let _ = conn.busy_timeout(Duration::ZERO);
    if let Err(e) = conn.query_row(&format!("PRAGMA wal_checkpoint({mode})"), [], |_| Ok(())) {
        tracing::debug!("state checkpoint ({mode}) incomplete: {e}");
    }
    let _ = conn.busy_timeout(BUSY_TIMEOUT);
}

/// Runs every piece of work of `group` in one transaction: a write transaction if any of
/// them writes. The first failure rolls it all back.
fn run_group(conn: &Connection, group: &mut [Box<dyn Queued>], writes: bool) -> rusqlite::Result<()> {
    let begin = if writes { "BEGIN IMMEDIATE" } else { "BEGIN DEFERRED" };
    transaction(conn, begin, |conn| group.iter_mut().try_for_each(|work| work.run(conn)))
}

/// A transaction's work waiting in [`State::pending`], with the task waiting for its result.
trait Queued: Send {
    fn writes(&self) -> bool;
    /// Runs the work within the open transaction, keeping its result.
    fn run(&mut self, conn: &Connection) -> rusqlite::Result<()>;
    /// Hands the kept result over, or `failed` when the transaction did not commit.
    fn deliver(self: Box<Self>, failed: Option<rusqlite::Error>);
}

struct Work<T, F> {
    f: F,
    writes: bool,
    outcome: Option<T>,
    reply: tokio::sync::oneshot::Sender<Result<T>>,
}

impl<T: Send, F: Fn(&Connection) -> rusqlite::Result<T> + Send> Queued for Work<T, F> {
    fn writes(&self) -> bool {
        self.writes
    }

    fn run(&mut self, conn: &Connection) -> rusqlite::Result<()> {
        self.outcome = Some((self.f)(conn)?);
        Ok(())
    }

    fn deliver(self: Box<Self>, failed: Option<rusqlite::Error>) {
        let result = match (failed, self.outcome) {
            (Some(e), _) => Err(e.into()),
            (None, Some(value)) => Ok(value),
            (None, None) => Err(anyhow::anyhow!("the state transaction did not run")),
        };
        // The task may have stopped waiting (cancelled): then nobody needs the result.
        let _ = self.reply.send(result);
    }
}

/// Runs `f` between `begin` and a commit (a rollback when it fails), with cached statements.
fn transaction<T>(conn: &Connection, begin: &str, f: impl FnOnce(&Connection) -> rusqlite::Result<T>) -> rusqlite::Result<T> {
    if !conn.is_autocommit() {
        // A transaction left open by a panic while the connection was held.
        conn.execute_batch("ROLLBACK")?;
    }
    conn.prepare_cached(begin)?.execute([])?;
    let result = f(conn).and_then(|value| conn.prepare_cached("COMMIT")?.execute([]).map(|_| value));
    if result.is_err() && !conn.is_autocommit() {
        let _ = conn.execute_batch("ROLLBACK");
    }
    result
}

/// Adds an attempt to the ledger, counting it in its day if it ran; returns its id.
pub fn insert_attempt(tx: &Connection, row: &AttemptRow) -> rusqlite::Result<i64> {
    tx.prepare_cached(
        "INSERT INTO attempts (service, model, started_ms, duration_ms, exit_code, signal, tokens_in, tokens_out, tokens_total, estimated, outcome, spawned)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)",
    )?
    .execute(params![
            row.service,
            row.model,
            row.started_ms,
            row.duration_ms,
            row.exit_code,
            row.signal,
            row.tokens_in,
            row.tokens_out,
            row.tokens_total,
            row.estimated,
            row.outcome,
            row.spawned
        ])?;
    let id = tx.last_insert_rowid();
    if row.spawned {
        tx.prepare_cached(
            "INSERT INTO spawned_per_day (service, day, requests) VALUES (?1, ?2, 1)
             ON CONFLICT (service, day) DO UPDATE SET requests = requests + 1",
        )?
        .execute(params![row.service, row.started_ms.div_euclid(DAY_MS)])?;
    }
    Ok(id)
}

/// Completes an attempt recorded as running.
pub fn finish_attempt(tx: &Connection, id: i64, row: &AttemptRow) -> rusqlite::Result<()> {
    tx.prepare_cached(
        "UPDATE attempts SET model = COALESCE(?2, model), duration_ms = ?3, exit_code = ?4, signal = ?5, tokens_in = ?6, tokens_out = ?7,
         tokens_total = ?8, estimated = ?9, outcome = ?10 WHERE id = ?1",
    )?
    .execute(params![id, row.model, row.duration_ms, row.exit_code, row.signal, row.tokens_in, row.tokens_out, row.tokens_total, row.estimated, row.outcome])?;
    Ok(())
}

const SPAWNED_SINCE: &str = "SELECT started_ms, COALESCE(tokens_total, 0) FROM attempts
    WHERE service = ?1 AND spawned = 1 AND started_ms > ?2 ORDER BY started_ms";

/// Attempts of `service` that ran, started after `since`, oldest first: (start, total tokens).
pub fn spawned_since(tx: &Connection, service: &str, since: Millis) -> rusqlite::Result<Vec<(Millis, i64)>> {
    let mut stmt = tx.prepare_cached(SPAWNED_SINCE)?;
    let rows = stmt.query_map(params![service, since], |r| Ok((r.get(0)?, r.get(1)?)))?;
    rows.collect()
}

/// Ledger rows removed per transaction when pruning: other processes wait for each
/// transaction, and the WAL grows by each.
const PRUNE_CHUNK: usize = 10_000;

/// Removes the ledger rows of attempts started before `before`, a chunk per transaction;
/// returns how many.
pub fn prune_attempts(state: &State, before: Millis) -> Result<u64> {
    let mut removed = 0;
    loop {
        let n = state.write(|tx| {
            tx.execute(
                "DELETE FROM attempts WHERE id IN (SELECT id FROM attempts WHERE started_ms < ?1 LIMIT ?2)",
                params![before, PRUNE_CHUNK as i64],
            )
        })?;
        removed += n as u64;
        if n < PRUNE_CHUNK {
            // The counts of days wholly pruned go too.
            state.write(|tx| tx.execute("DELETE FROM spawned_per_day WHERE day < ?1", params![before.div_euclid(DAY_MS)]))?;
            return Ok(removed);
        }
    }
}

/// How many attempts of `service` ran on the UTC day holding `now`.
pub fn spawned_on_day(tx: &Connection, service: &str, now: Millis) -> rusqlite::Result<u64> {
    tx.prepare_cached("SELECT requests FROM spawned_per_day WHERE service = ?1 AND day = ?2")?
        .query_row(params![service, now.div_euclid(DAY_MS)], |r| r.get::<_, i64>(0))
        .optional()
        .map(|n| n.unwrap_or(0) as u64)
}

const OUTCOMES_SINCE: &str =
    "SELECT outcome FROM attempts WHERE service = ?1 AND spawned = 1 AND started_ms > ?2 AND outcome != 'running'";

/// Finished attempts of `service` started after `since`: (calls, outcomes) for the failure-rate window.
pub fn outcomes_since(tx: &Connection, service: &str, since: Millis) -> rusqlite::Result<Vec<String>> {
    let mut stmt = tx.prepare_cached(OUTCOMES_SINCE)?;
    let rows = stmt.query_map(params![service, since], |r| r.get(0))?;
    rows.collect()
}

/// Every ledger row started at or after `since`, oldest first.
pub fn attempts_since(tx: &Connection, since: Millis) -> rusqlite::Result<Vec<AttemptRow>> {
    let mut stmt = tx.prepare(
        "SELECT service, model, started_ms, duration_ms, exit_code, signal, tokens_in, tokens_out, tokens_total, estimated, outcome, spawned
         FROM attempts WHERE started_ms >= ?1 ORDER BY started_ms",
    )?;
    let rows = stmt.query_map(params![since], |r| {
        Ok(AttemptRow {
            service: r.get(0)?,
            model: r.get(1)?,
            started_ms: r.get(2)?,
            duration_ms: r.get(3)?,
            exit_code: r.get(4)?,
            signal: r.get(5)?,
            tokens_in: r.get(6)?,
            tokens_out: r.get(7)?,
            tokens_total: r.get(8)?,
            estimated: r.get(9)?,
            outcome: r.get(10)?,
            spawned: r.get(11)?,
        })
    })?;
    rows.collect()
}

pub fn load_breaker(tx: &Connection, service: &str) -> rusqlite::Result<Option<BreakerRow>> {
    tx.prepare_cached(
        "SELECT phase, consecutive_failures, open_until_ms, closed_since_ms, probes, probe_expires_ms, last_failure, trip_reason
         FROM breakers WHERE service = ?1",
    )?
    .query_row(params![service], |r| {
            Ok(BreakerRow {
                phase: r.get(0)?,
                consecutive_failures: r.get(1)?,
                open_until_ms: r.get(2)?,
                closed_since_ms: r.get(3)?,
                probes: r.get(4)?,
                probe_expires_ms: r.get(5)?,
                last_failure: r.get(6)?,
                trip_reason: r.get(7)?,
            })
        })
    .optional()
}

pub fn save_breaker(tx: &Connection, service: &str, row: &BreakerRow) -> rusqlite::Result<()> {
    tx.prepare_cached(
        "INSERT INTO breakers (service, phase, consecutive_failures, open_until_ms, closed_since_ms, probes, probe_expires_ms, last_failure, trip_reason)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)
         ON CONFLICT (service) DO UPDATE SET phase = ?2, consecutive_failures = ?3, open_until_ms = ?4, closed_since_ms = ?5,
           probes = ?6, probe_expires_ms = ?7, last_failure = ?8, trip_reason = ?9",
    )?
    .execute(params![
            service,
            row.phase,
            row.consecutive_failures,
            row.open_until_ms,
            row.closed_since_ms,
            row.probes,
            row.probe_expires_ms,
            row.last_failure,
            row.trip_reason
        ])?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_that_is_not_a_database_is_a_clear_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.db");
        std::fs::write(&path, vec![b'x'; 4096]).unwrap();
        let err = format!("{:#}", State::open(&path).err().expect("refused"));
        assert!(err.contains(&path.display().to_string()) && err.contains("--state"), "{err}");
    }

    #[test]
    fn the_wal_stays_small_across_short_lived_connections() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.db");
        for i in 0..300 {
            // Like one `host` process each: open, one write, exit.
            let state = State::open(&path).unwrap();
            state.write(|tx| insert_attempt(tx, &row(i))).unwrap();
        }
        let wal = std::fs::metadata(dir.path().join("state.db-wal")).map(|m| m.len()).unwrap_or(0);
        assert!(wal < 2 << 20, "the WAL grew to {wal} bytes");
        let state = State::open(&path).unwrap();
        assert_eq!(state.read(|tx| attempts_since(tx, 0)).unwrap().len(), 300);
    }

    fn row(i: i64) -> AttemptRow {
        AttemptRow { service: "s".into(), started_ms: i, outcome: OK.into(), spawned: true, ..Default::default() }
    }

    #[tokio::test]
    async fn a_long_running_store_keeps_its_wal_bounded_and_leaves_it_empty() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.db");
        let wal = || std::fs::metadata(dir.path().join("state.db-wal")).map(|m| m.len()).unwrap_or(0);
        let state = State::open(&path).unwrap();
        let mut largest = 0;
        for i in 0..3000 {
            let row = row(i);
            state.write_soon(move |tx| insert_attempt(tx, &row)).await.unwrap();
            largest = largest.max(wal());
        }
        // A commit here writes a few 4 KiB pages; the WAL holds at most CHECKPOINT_EVERY commits.
        assert!(largest < CHECKPOINT_EVERY * 8 * 4096, "the WAL grew to {largest} bytes");
        drop(state);
        assert_eq!(wal(), 0, "closing the store truncates the WAL");
        let state = State::open(&path).unwrap();
        assert_eq!(state.read(|tx| attempts_since(tx, 0)).unwrap().len(), 3000);
    }

    #[tokio::test]
    async fn writes_asked_for_together_commit_together() {
        let state = State::in_memory().unwrap();
        let writes: Vec<_> = (0..10).map(|i| {
            let (state, row) = (state.clone(), row(i));
            tokio::spawn(async move { state.write_soon(move |tx| insert_attempt(tx, &row)).await })
        }).collect();
        for write in writes {
            write.await.unwrap().unwrap();
        }
        assert_eq!(state.commits.load(Ordering::Relaxed), 1, "one commit for the ten writes");
        assert_eq!(state.read(|tx| attempts_since(tx, 0)).unwrap().len(), 10);
    }

    #[tokio::test]
    async fn a_failing_write_fails_alone_when_others_go_with_it() {
        let state = State::in_memory().unwrap();
        let bad = {
            let state = state.clone();
            tokio::spawn(async move { state.write_soon(|tx| tx.execute("INSERT INTO nowhere VALUES (1)", [])).await })
        };
        let good: Vec<_> = (0..3).map(|i| {
            let (state, row) = (state.clone(), row(i));
            tokio::spawn(async move { state.write_soon(move |tx| insert_attempt(tx, &row)).await })
        }).collect();
        let error = bad.await.unwrap().unwrap_err();
        assert!(format!("{error:#}").contains("nowhere"), "{error:#}");
        for write in good {
            write.await.unwrap().unwrap();
        }
        assert_eq!(state.read(|tx| attempts_since(tx, 0)).unwrap().len(), 3);
    }

    #[tokio::test]
    async fn a_write_waiting_for_another_process_does_not_stall_the_async_thread() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.db");
        let ours = State::open(&path).unwrap();
        let theirs = Connection::open(&path).unwrap();
        theirs.execute_batch("BEGIN IMMEDIATE").unwrap();
        let write = {
            let ours = ours.clone();
            tokio::spawn(async move { ours.write_soon(|tx| insert_attempt(tx, &row(1))).await })
        };
        // The async thread keeps running other tasks (this one) meanwhile.
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!write.is_finished(), "the write waits for the lock, not the thread");
        theirs.execute_batch("COMMIT").unwrap();
        write.await.unwrap().unwrap();
        assert_eq!(ours.read(|tx| attempts_since(tx, 0)).unwrap().len(), 1);
    }

    #[test]
    fn requests_that_ran_are_counted_per_service_and_utc_day() {
        let state = State::in_memory().unwrap();
        let refused = AttemptRow { spawned: false, ..row(10) };
        let other = AttemptRow { service: "t".into(), ..row(20) };
        for r in [row(0), row(DAY_MS - 1), row(DAY_MS), refused, other] {
            state.write(|tx| insert_attempt(tx, &r)).unwrap();
        }
        let count = |service: &str, now: Millis| state.read(|tx| spawned_on_day(tx, service, now)).unwrap();
        assert_eq!((count("s", 5), count("s", DAY_MS + 5), count("s", 2 * DAY_MS), count("t", 0)), (2, 1, 0, 1));
    }

    #[test]
    fn a_version_1_file_gets_its_daily_counts_from_its_ledger() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.db");
        let old = Connection::open(&path).unwrap();
        old.execute_batch(MIGRATIONS[0]).unwrap();
        old.pragma_update(None, "user_version", 1).unwrap();
        // As a host of schema 1 entered them.
        for (started_ms, spawned) in [(1, true), (2, true), (DAY_MS + 1, true), (3, false)] {
            old.execute(
                "INSERT INTO attempts (service, started_ms, outcome, spawned) VALUES ('s', ?1, 'ok', ?2)",
                params![started_ms, spawned],
            )
            .unwrap();
        }
        drop(old);
        let state = State::open(&path).unwrap();
        let count = |now: Millis| state.read(|tx| spawned_on_day(tx, "s", now)).unwrap();
        assert_eq!((count(0), count(DAY_MS)), (2, 1));
        state.write(|tx| insert_attempt(tx, &row(4))).unwrap();
        assert_eq!(count(0), 3, "inserts count from now on");
    }

    #[test]
    fn the_quota_and_breaker_queries_search_the_index_of_requests_that_ran() {
        let state = State::in_memory().unwrap();
        for query in [SPAWNED_SINCE, OUTCOMES_SINCE] {
            let plan: Vec<String> = state
                .read(|tx| {
                    let mut stmt = tx.prepare(&format!("EXPLAIN QUERY PLAN {query}"))?;
                    let rows = stmt.query_map(params!["s", 0], |r| r.get::<_, String>(3))?;
                    rows.collect()
                })
                .unwrap();
            assert_eq!(plan, ["SEARCH attempts USING INDEX attempts_spawned (service=? AND started_ms>?)"], "{query}");
        }
    }

    #[test]
    fn reopening_keeps_the_rows_and_the_schema_version() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nested/state.db");
        let state = State::open(&path).unwrap();
        state.write(|tx| insert_attempt(tx, &row(5))).unwrap();
        drop(state);
        let state = State::open(&path).unwrap();
        let rows = state.read(|tx| attempts_since(tx, 0)).unwrap();
        assert_eq!(rows, vec![row(5)]);
    }
}

//! [`ExperimentDb`]: the store, on SQLite or PostgreSQL.

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;
use std::time::Duration;

use crate::compare::{Comparison, MetricRow, ParamRow};
use crate::engine::{Arg, Conn, LOCK_TIMEOUT, Row, Sql, StoreLocation, args};
use crate::query::{RunQuery, SortOrder};
use crate::records::{
    ArtifactRecord, Goal, MetricRecord, MetricSummaryRecord, ResumeRecord, RunRecord, RunStatus,
};
use crate::series::downsample;
use crate::writer::{Syncer, Writer};
use crate::writes::{VISIBLE, check_points, ensure_run, ensure_running, now, recompute_summaries};
use crate::{
    EndStatus, Error, MetricPoint, NewArtifact, NewRun, Pulse, Result, RunId, RunTracker,
    migrations,
};

/// kiln's experiment store: one SQLite database file (the default), or a PostgreSQL
/// database that several machines share ([`ExperimentDb::open_location`] with a
/// `postgres://` URL). Both keep the same tables and answer every query alike.
///
/// A SQLite file is opened in WAL mode with foreign keys enforced and a busy timeout
/// of [`ExperimentDb::BUSY_TIMEOUT`], so that several processes can write to one file.
/// Every write is one transaction that holds the store's write lock (SQLite's
/// `BEGIN IMMEDIATE`; on PostgreSQL an advisory transaction lock, waited for at most
/// as long), retried for a while when another writer keeps the store busy or the
/// connection to the server drops, so that neither reaches the caller under ordinary
/// contention or a server restart. Times are seconds since the Unix epoch (UTC) as
/// `f64`.
///
/// # Background writer
///
/// [`RunTracker::log_metrics`] checks the points and hands them to a writer thread that
/// owns its own connection (started on the first call), and returns without waiting
/// for the disk. The thread writes each batch in one transaction, with the run's
/// summaries and heartbeat. Its queue holds [`ExperimentDb::WRITER_QUEUE_BATCHES`]
/// batches: when it is full, `log_metrics` blocks until the thread takes one (points
/// are never dropped). Everything queued is written by [`ExperimentDb::flush`],
/// [`RunTracker::finish_run`], [`ExperimentDb::resume_run`] and when the store is
/// dropped. A batch that fails to be written is reported, as
/// [`Error::WriteFailed`], by the next `log_metrics`, `flush`, `finish_run` or
/// `resume_run` (or, when the store is dropped first, logged with `tracing::error!`).
///
/// The queries of this handle first wait until its queued points are written, so they
/// see them.
///
/// # Run status
///
/// Queries report a RUNNING run whose heartbeat (its start, when it has none) is older
/// than [`ExperimentDb::stale_after`] as [`RunStatus::Lost`]; the row is not rewritten,
/// and the run reads RUNNING again as soon as it beats.
#[derive(Debug)]
pub struct ExperimentDb {
    // Declared first so that it is dropped (its queue written) before `conn` closes.
    writer: Option<Writer>,
    /// The connection of the queries and the synchronous writes. In a cell so that the
    /// queries can take `&self` (a PostgreSQL client needs `&mut` to run anything).
    conn: RefCell<Conn>,
    /// Where the store lives, as given.
    location: StoreLocation,
    /// The same with a SQLite file's absolute path, for the connections opened later
    /// (the writer's, a pulse's, an exit handle's): immune to a change of the working
    /// directory.
    connect_to: StoreLocation,
    stale_after: Duration,
    /// Runs this handle knows to be RUNNING (started, resumed, or already checked), so
    /// that `log_metrics` need not read the database to check them.
    running: HashSet<RunId>,
}

/// What a thread other than the store's owner needs to end a run when the process
/// must exit at once (a second Ctrl-C): the store's file and a way to wait for the
/// owner's queued metric points. Made by [`ExperimentDb::exit_handle`].
#[derive(Debug, Clone)]
pub struct ExitHandle {
    location: StoreLocation,
    syncer: Syncer,
}

impl ExitHandle {
    /// Waits at most `timeout` for the metric points queued so far to be written,
    /// then records `run` as ended with `status` and `reason` through a connection
    /// of its own (waiting for the owner's connection like any other writer). Returns
    /// whether the queued points were all written in time.
    ///
    /// # Errors
    /// The engine's error when the store cannot be opened or written;
    /// [`Error::Invalid`] when the run is not RUNNING (it has ended already).
    pub fn end_run(
        &self,
        run: RunId,
        status: EndStatus,
        reason: &str,
        timeout: Duration,
    ) -> Result<bool> {
        let flushed = self.syncer.sync_within(timeout);
        let mut conn = Conn::open(&self.location)?;
        end_run(&mut conn, run, status, Some(reason))?;
        Ok(flushed)
    }
}

/// Updates `run`'s heartbeat when it is RUNNING.
fn heartbeat(conn: &mut Conn, run: RunId) -> Result<()> {
    conn.write_tx(|tx| {
        let changed = tx.execute(
            "UPDATE runs SET heartbeat_at = ?2 WHERE id = ?1 AND status = 'RUNNING'",
            args![run, now()],
        )?;
        if changed == 0 {
            ensure_run(tx, run)?;
        }
        Ok(())
    })
}

/// Records `run`, which must be RUNNING, as ended.
fn end_run(conn: &mut Conn, run: RunId, status: EndStatus, reason: Option<&str>) -> Result<()> {
    conn.write_tx(|tx| {
        ensure_running(tx, run, "finish it again")?;
        tx.execute(
            "UPDATE runs SET status = ?2, ended_at = ?3, failure_reason = ?4 WHERE id = ?1",
            args![run, RunStatus::from(status), now(), reason],
        )?;
        Ok(())
    })
}

const SELECT_RUN: &str = "SELECT r.id, e.name, r.name, r.status, r.config_json, r.kiln_version,
        r.git_commit, r.host, r.started_at, r.ended_at, r.heartbeat_at, r.attempt,
        r.failure_reason
    FROM runs r JOIN experiments e ON e.id = r.experiment_id";

/// The status as reported, for the run aliased `r`, with `?` bound to the staleness
/// cutoff (see [`ExperimentDb::cutoff`]).
const REPORTED_STATUS: &str = "CASE WHEN r.status = 'RUNNING'
        AND COALESCE(r.heartbeat_at, r.started_at) < ? THEN 'LOST' ELSE r.status END";

/// A run as stored (its status not yet checked for staleness).
fn run_from_row(row: &Row) -> Result<RunRecord> {
    let config: String = row.get(4)?;
    let config = serde_json::from_str(&config)?;
    Ok(RunRecord {
        id: row.get(0)?,
        experiment: row.get(1)?,
        name: row.get(2)?,
        status: row.get(3)?,
        config,
        kiln_version: row.get(5)?,
        git_commit: row.get(6)?,
        host: row.get(7)?,
        started_at: row.get(8)?,
        ended_at: row.get(9)?,
        heartbeat_at: row.get(10)?,
        attempt: row.get(11)?,
        failure_reason: row.get(12)?,
    })
}

const SELECT_SUMMARY: &str = "SELECT key, split, last, last_step, min, min_step, max, max_step
    FROM metric_summaries";

fn summary_from_row(row: &Row) -> Result<MetricSummaryRecord> {
    let pair = |value: Option<f64>, step: Option<u64>| step.zip(value);
    Ok(MetricSummaryRecord {
        key: row.get(0)?,
        split: row.get(1)?,
        last: row.get::<Option<f64>>(2)?.unwrap_or(f64::NAN),
        last_step: row.get(3)?,
        min: pair(row.get(4)?, row.get(5)?),
        max: pair(row.get(6)?, row.get(7)?),
    })
}

fn experiment_id(conn: &mut impl Sql, name: &str) -> Result<i64> {
    conn.query_opt("SELECT id FROM experiments WHERE name = ?1", args![name])?
        .ok_or_else(|| Error::NotFound(format!("experiment {name:?}")))?
        .get(0)
}

/// Inserts params; a key already set to another value is an error, the same value is
/// accepted.
fn insert_params(conn: &mut impl Sql, run: RunId, params: &[(String, String)]) -> Result<()> {
    let mut seen = HashSet::new();
    for (key, value) in params {
        if !seen.insert(key.as_str()) {
            return Err(Error::Invalid(format!(
                "param {key:?} given twice for run {run}"
            )));
        }
        let existing: Option<String> = conn
            .query_opt(
                "SELECT value FROM params WHERE run_id = ?1 AND key = ?2",
                args![run, key],
            )?
            .map(|row| row.get(0))
            .transpose()?;
        match existing {
            Some(old) if old == *value => {}
            Some(old) => {
                return Err(Error::Invalid(format!(
                    "param {key:?} of run {run} is already {old:?}, cannot set it to {value:?}"
                )));
            }
            None => {
                conn.execute(
                    "INSERT INTO params (run_id, key, value) VALUES (?1, ?2, ?3)",
                    args![run, key, value],
                )?;
            }
        }
    }
    Ok(())
}

/// Every visible point of one metric series as `(step, value)`, by step (points at
/// one step in the order they were written); a NaN value reads back as NaN.
fn series_points(conn: &mut Conn, run: RunId, key: &str, split: &str) -> Result<Vec<(u64, f64)>> {
    let sql = format!(
        "SELECT m.step, m.value FROM metrics m
            WHERE m.run_id = ?1 AND m.key = ?2 AND m.split = ?3 AND {VISIBLE}
            ORDER BY m.step, m.id"
    );
    conn.query(&sql, args![run, key, split])?
        .iter()
        .map(|row| Ok((row.get(0)?, row.get::<Option<f64>>(1)?.unwrap_or(f64::NAN))))
        .collect()
}

impl ExperimentDb {
    /// How long a write waits for another writer to finish before it is retried.
    pub const BUSY_TIMEOUT: Duration = LOCK_TIMEOUT;

    /// How old a RUNNING run's heartbeat may be before queries report it LOST, unless
    /// [`ExperimentDb::set_stale_after`] says otherwise.
    pub const DEFAULT_STALE_AFTER: Duration = Duration::from_secs(5 * 60);

    /// How many batches of metric points the background writer's queue holds before
    /// [`RunTracker::log_metrics`] blocks.
    pub const WRITER_QUEUE_BATCHES: usize = 64;

    /// Opens (creating when missing) the SQLite database at `path` and brings its
    /// schema up to date. The parent directory must exist.
    ///
    /// # Errors
    /// [`Error::Sqlite`] when the file cannot be opened or a migration fails;
    /// [`Error::Invalid`] when WAL cannot be enabled or the database was written by a
    /// newer kiln.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        Self::open_location(&StoreLocation::Sqlite(path.as_ref().to_path_buf()))
    }

    /// Opens the store at `location`, a SQLite file (created when missing; its parent
    /// directory must exist) or a PostgreSQL database (which must exist; its tables
    /// are created on first use), and brings its schema up to date.
    ///
    /// ```no_run
    /// use kiln_experiment_db::{ExperimentDb, StoreLocation};
    ///
    /// let shared: StoreLocation = "postgres://kiln@db.lab/kiln".parse()?;
    /// let db = ExperimentDb::open_location(&shared)?;
    /// println!("{} runs", db.list_runs(None)?.len());
    /// # Ok::<(), kiln_experiment_db::Error>(())
    /// ```
    ///
    /// # Errors
    /// [`Error::Unreachable`] when the PostgreSQL server cannot be reached or refuses
    /// the login (saying which); [`Error::Sqlite`] or [`Error::Postgres`] when a
    /// migration fails; [`Error::Invalid`] when WAL cannot be enabled on a SQLite file
    /// or the store was written by a newer kiln.
    pub fn open_location(location: &StoreLocation) -> Result<Self> {
        let mut conn = Conn::open(location)?;
        let applied = conn.retrying(|conn| migrations::apply(conn, now()))?;
        if !applied.is_empty() {
            tracing::info!(store = %location, ?applied, "experiment store migrated");
        }
        let connect_to = match location {
            StoreLocation::Sqlite(path) => {
                StoreLocation::Sqlite(std::fs::canonicalize(path).unwrap_or_else(|_| path.clone()))
            }
            other => other.clone(),
        };
        Ok(Self {
            writer: None,
            conn: RefCell::new(conn),
            location: location.clone(),
            connect_to,
            stale_after: Self::DEFAULT_STALE_AFTER,
            running: HashSet::new(),
        })
    }

    /// Where the store lives, as it was opened.
    pub fn location(&self) -> &StoreLocation {
        &self.location
    }

    /// The schema version of the store (the last migration applied).
    ///
    /// # Errors
    /// The engine's error when the query fails.
    pub fn schema_version(&self) -> Result<i64> {
        migrations::current_version(&mut self.conn.borrow_mut())
    }

    /// The schema version this build of kiln creates.
    pub fn latest_schema_version() -> i64 {
        migrations::latest_version()
    }

    /// How old a RUNNING run's heartbeat may be before queries report it LOST.
    pub fn stale_after(&self) -> Duration {
        self.stale_after
    }

    /// Sets how old a RUNNING run's heartbeat may be before this handle's queries
    /// report it LOST (default [`ExperimentDb::DEFAULT_STALE_AFTER`]). A training loop
    /// that writes metrics less often than that should call
    /// [`ExperimentDb::heartbeat`] in between.
    pub fn set_stale_after(&mut self, stale_after: Duration) {
        self.stale_after = stale_after;
    }

    /// Heartbeats older than this are stale.
    fn cutoff(&self) -> f64 {
        now() - self.stale_after.as_secs_f64()
    }

    /// The run as reported: LOST when it is RUNNING with a heartbeat before `cutoff`.
    fn reported(mut run: RunRecord, cutoff: f64) -> RunRecord {
        if run.status == RunStatus::Running && run.heartbeat_at.unwrap_or(run.started_at) < cutoff {
            run.status = RunStatus::Lost;
        }
        run
    }

    /// The writer thread, started on first use with its own connection.
    fn writer(&mut self) -> Result<&Writer> {
        if self.writer.is_none() {
            let conn = Conn::open(&self.connect_to)?;
            self.writer = Some(Writer::spawn(conn, Self::WRITER_QUEUE_BATCHES)?);
        }
        self.writer.as_ref().ok_or_else(|| {
            Error::Invalid("the experiment store's background writer is missing".into())
        })
    }

    /// Waits until the points queued by this handle are written (failures stay pending
    /// for the next call that reports them).
    fn sync(&self) -> Result<()> {
        match &self.writer {
            Some(writer) => writer.sync(),
            None => Ok(()),
        }
    }

    /// A failure of the writer not reported yet, as an error.
    fn take_failure(&self) -> Result<()> {
        match self.writer.as_ref().and_then(Writer::take_failure) {
            Some(error) => Err(error),
            None => Ok(()),
        }
    }

    /// A handle with which another thread can end a run of this store when the
    /// process must exit at once (see [`ExitHandle`]). Starts the background writer;
    /// the handle does not keep it alive (dropping the store still ends it).
    ///
    /// # Errors
    /// The engine's error when the writer's connection cannot be opened;
    /// [`Error::Invalid`] when its thread cannot be started or has stopped.
    pub fn exit_handle(&mut self) -> Result<ExitHandle> {
        Ok(ExitHandle {
            location: self.connect_to.clone(),
            syncer: self.writer()?.syncer(),
        })
    }

    /// Waits until every metric point handed to [`RunTracker::log_metrics`] is written.
    ///
    /// # Errors
    /// [`Error::WriteFailed`] when batches failed to be written since the last report
    /// (each failure is reported once); [`Error::Invalid`] when the writer thread has
    /// stopped.
    pub fn flush(&mut self) -> Result<()> {
        self.sync()?;
        self.take_failure()
    }

    /// Records that the run is alive (updates `heartbeat_at`). Does nothing for a run
    /// that has ended. The background writer also does this whenever it writes a batch
    /// of the run.
    ///
    /// # Errors
    /// [`Error::NotFound`] when the run does not exist.
    pub fn heartbeat(&mut self, run: RunId) -> Result<()> {
        heartbeat(self.conn.get_mut(), run)
    }

    /// Continues a run as a new attempt that resumes from `from_step` (typically the
    /// step of the checkpoint it restarts from), whatever the run's status: the run
    /// becomes RUNNING again with `attempt + 1`, no end time and no failure reason, and
    /// a fresh heartbeat. From then on the points that earlier attempts wrote at steps
    /// after `from_step` are hidden from [`ExperimentDb::metric_history`], the
    /// summaries and [`ExperimentDb::best_run`] (they stay on disk, see
    /// [`ExperimentDb::metric_points`]); the run's summaries are recomputed from the
    /// visible points. Returns the new attempt number.
    ///
    /// The caller must make sure that no process still writes to the run's previous
    /// attempt. Points queued by this handle are written (as the previous attempt)
    /// before the run is resumed.
    ///
    /// # Errors
    /// A failure of the background writer not reported yet (then the run is not
    /// resumed); [`Error::NotFound`] when the run does not exist; [`Error::Invalid`]
    /// when `from_step` is beyond `i64::MAX`.
    pub fn resume_run(&mut self, run: RunId, from_step: u64) -> Result<u32> {
        self.flush()?;
        let from = i64::try_from(from_step)
            .map_err(|_| Error::Invalid(format!("resume step {from_step} is too large")))?;
        let attempt = self.conn.get_mut().write_tx(|tx| {
            let row = tx
                .query_opt(
                    "SELECT status, attempt, failure_reason FROM runs WHERE id = ?1",
                    args![run],
                )?
                .ok_or_else(|| Error::NotFound(format!("run {run}")))?;
            let (status, attempt, reason): (RunStatus, u32, Option<String>) =
                (row.get(0)?, row.get(1)?, row.get(2)?);
            let next = attempt.checked_add(1).ok_or_else(|| {
                Error::Invalid(format!("run {run} has been resumed too many times"))
            })?;
            let now = now();
            tx.execute(
                "INSERT INTO run_resumes
                    (run_id, attempt, from_step, resumed_at, previous_status, previous_reason)
                    VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                args![run, next, from, now, status, reason],
            )?;
            tx.execute(
                "UPDATE runs SET status = ?2, attempt = ?3, ended_at = NULL,
                    failure_reason = NULL, heartbeat_at = ?4 WHERE id = ?1",
                args![run, RunStatus::Running, next, now],
            )?;
            recompute_summaries(tx, run)?;
            Ok(next)
        })?;
        self.running.insert(run);
        tracing::debug!(run, attempt, from_step, "run resumed");
        Ok(attempt)
    }

    /// The resumes of a run, oldest first (empty for a run never resumed).
    ///
    /// # Errors
    /// [`Error::NotFound`] when the run does not exist.
    pub fn resumes(&self, run: RunId) -> Result<Vec<ResumeRecord>> {
        let conn = &mut *self.conn.borrow_mut();
        ensure_run(conn, run)?;
        conn.query(
            "SELECT attempt, from_step, resumed_at, previous_status, previous_reason
                FROM run_resumes WHERE run_id = ?1 ORDER BY attempt",
            args![run],
        )?
        .iter()
        .map(|row| {
            Ok(ResumeRecord {
                attempt: row.get(0)?,
                from_step: row.get(1)?,
                resumed_at: row.get(2)?,
                previous_status: row.get(3)?,
                previous_reason: row.get(4)?,
            })
        })
        .collect()
    }

    /// Adds params to a run. Setting a param again to the same value is accepted, to
    /// another value is an error (params describe how the run was made).
    ///
    /// # Errors
    /// [`Error::NotFound`] when the run does not exist; [`Error::Invalid`] when a key is
    /// given twice or already has another value (then none is stored).
    pub fn log_params(&mut self, run: RunId, params: &[(String, String)]) -> Result<()> {
        self.conn.get_mut().write_tx(|tx| {
            ensure_run(tx, run)?;
            insert_params(tx, run, params)
        })
    }

    /// Sets a tag of a run, replacing its previous value.
    ///
    /// # Errors
    /// [`Error::NotFound`] when the run does not exist.
    pub fn set_tag(&mut self, run: RunId, key: &str, value: &str) -> Result<()> {
        self.conn.get_mut().write_tx(|tx| {
            ensure_run(tx, run)?;
            tx.execute(
                "INSERT INTO tags (run_id, key, value) VALUES (?1, ?2, ?3)
                    ON CONFLICT (run_id, key) DO UPDATE SET value = excluded.value",
                args![run, key, value],
            )?;
            Ok(())
        })
    }

    /// Records an artifact of a run and returns its id.
    ///
    /// # Errors
    /// [`Error::NotFound`] when the run does not exist; [`Error::Invalid`] when the
    /// path is empty or absolute (it must be relative to the run directory).
    pub fn log_artifact(&mut self, run: RunId, artifact: &NewArtifact) -> Result<i64> {
        if artifact.path.is_empty() || Path::new(&artifact.path).is_absolute() {
            return Err(Error::Invalid(format!(
                "artifact path {:?} must be relative to the run directory",
                artifact.path
            )));
        }
        self.conn.get_mut().write_tx(|tx| {
            ensure_run(tx, run)?;
            tx.query_one(
                "INSERT INTO artifacts (run_id, kind, path, size_bytes, sha256, created_at)
                    VALUES (?1, ?2, ?3, ?4, ?5, ?6) RETURNING id",
                args![
                    run,
                    &artifact.kind,
                    &artifact.path,
                    artifact.size_bytes,
                    artifact.sha256.as_deref(),
                    now()
                ],
            )?
            .get(0)
        })
    }

    /// Runs, of one experiment or of all, in the order they started (then by id).
    ///
    /// # Errors
    /// [`Error::NotFound`] when the experiment is named and does not exist.
    pub fn list_runs(&self, experiment: Option<&str>) -> Result<Vec<RunRecord>> {
        let query = RunQuery {
            experiment: experiment.map(str::to_string),
            ..RunQuery::default()
        };
        self.query_runs(&query)
    }

    /// One run.
    ///
    /// # Errors
    /// [`Error::NotFound`] when the run does not exist.
    pub fn run(&self, id: RunId) -> Result<RunRecord> {
        self.sync()?;
        let sql = format!("{SELECT_RUN} WHERE r.id = ?1");
        let row = self
            .conn
            .borrow_mut()
            .query_opt(&sql, args![id])?
            .ok_or_else(|| Error::NotFound(format!("run {id}")))?;
        Ok(Self::reported(run_from_row(&row)?, self.cutoff()))
    }

    /// The runs that match a query, in its order (see [`RunQuery`]).
    ///
    /// # Errors
    /// [`Error::Invalid`] naming a bad condition (an empty key, a NaN, a param compared
    /// with `<` to something that is not a number, ...); [`Error::NotFound`] when the
    /// experiment is named and does not exist.
    pub fn query_runs(&self, query: &RunQuery) -> Result<Vec<RunRecord>> {
        query.validate()?;
        self.sync()?;
        let cutoff = self.cutoff();
        let mut sql = String::from(SELECT_RUN);
        let mut args: Vec<Arg> = Vec::new();
        let mut conditions: Vec<String> = Vec::new();
        if let Some(order) = &query.order_by {
            sql.push_str(
                " LEFT JOIN metric_summaries o ON o.run_id = r.id AND o.key = ? AND o.split = ?",
            );
            args.push(Arg::Text(order.key.clone()));
            args.push(Arg::Text(order.split.clone()));
        }
        if let Some(name) = &query.experiment {
            experiment_id(&mut *self.conn.borrow_mut(), name)?;
            conditions.push("e.name = ?".into());
            args.push(Arg::Text(name.clone()));
        }
        if !query.statuses.is_empty() {
            let marks = vec!["?"; query.statuses.len()].join(", ");
            conditions.push(format!("({REPORTED_STATUS}) IN ({marks})"));
            args.push(Arg::Real(cutoff));
            args.extend(
                query
                    .statuses
                    .iter()
                    .map(|s| Arg::Text(s.as_str().to_string())),
            );
        }
        for (key, value) in &query.tags {
            conditions.push(
                "EXISTS (SELECT 1 FROM tags t WHERE t.run_id = r.id AND t.key = ? AND t.value = ?)"
                    .into(),
            );
            args.push(Arg::Text(key.clone()));
            args.push(Arg::Text(value.clone()));
        }
        for condition in &query.metrics {
            conditions.push(format!(
                "EXISTS (SELECT 1 FROM metric_summaries s WHERE s.run_id = r.id
                    AND s.key = ? AND s.split = ? AND s.{} {} ?)",
                condition.field.column(),
                condition.op.as_str()
            ));
            args.push(Arg::Text(condition.key.clone()));
            args.push(Arg::Text(condition.split.clone()));
            args.push(Arg::Real(condition.value));
        }
        if !conditions.is_empty() {
            sql.push_str(" WHERE ");
            sql.push_str(&conditions.join(" AND "));
        }
        match &query.order_by {
            Some(order) => {
                let column = order.field.column();
                let direction = match order.order {
                    SortOrder::Ascending => "ASC",
                    SortOrder::Descending => "DESC",
                };
                sql.push_str(&format!(
                    " ORDER BY o.{column} IS NULL, o.{column} {direction}, r.id"
                ));
            }
            None => sql.push_str(" ORDER BY r.started_at, r.id"),
        }
        let rows = self.conn.borrow_mut().query(&sql, &args)?;
        let limit = query.limit.unwrap_or(usize::MAX);
        let mut runs = Vec::new();
        for row in rows {
            if runs.len() >= limit {
                break;
            }
            let run = run_from_row(&row)?;
            if !query.params.is_empty() {
                let params: HashMap<String, String> = self.params(run.id)?.into_iter().collect();
                let matches = query
                    .params
                    .iter()
                    .all(|c| c.matches(params.get(&c.key).map(String::as_str)));
                if !matches {
                    continue;
                }
            }
            runs.push(Self::reported(run, cutoff));
        }
        Ok(runs)
    }

    /// The params of a run, by key.
    ///
    /// # Errors
    /// [`Error::NotFound`] when the run does not exist.
    pub fn params(&self, run: RunId) -> Result<Vec<(String, String)>> {
        let conn = &mut *self.conn.borrow_mut();
        ensure_run(conn, run)?;
        conn.query(
            "SELECT key, value FROM params WHERE run_id = ?1 ORDER BY key",
            args![run],
        )?
        .iter()
        .map(|row| Ok((row.get(0)?, row.get(1)?)))
        .collect()
    }

    /// The tags of a run, by key.
    ///
    /// # Errors
    /// [`Error::NotFound`] when the run does not exist.
    pub fn tags(&self, run: RunId) -> Result<Vec<(String, String)>> {
        let conn = &mut *self.conn.borrow_mut();
        ensure_run(conn, run)?;
        conn.query(
            "SELECT key, value FROM tags WHERE run_id = ?1 ORDER BY key",
            args![run],
        )?
        .iter()
        .map(|row| Ok((row.get(0)?, row.get(1)?)))
        .collect()
    }

    /// The artifacts of a run, in the order they were recorded.
    ///
    /// # Errors
    /// [`Error::NotFound`] when the run does not exist.
    pub fn artifacts(&self, run: RunId) -> Result<Vec<ArtifactRecord>> {
        let conn = &mut *self.conn.borrow_mut();
        ensure_run(conn, run)?;
        conn.query(
            "SELECT id, run_id, kind, path, size_bytes, sha256, created_at
                FROM artifacts WHERE run_id = ?1 ORDER BY id",
            args![run],
        )?
        .iter()
        .map(|row| {
            Ok(ArtifactRecord {
                id: row.get(0)?,
                run: row.get(1)?,
                kind: row.get(2)?,
                path: row.get(3)?,
                size_bytes: row.get(4)?,
                sha256: row.get(5)?,
                created_at: row.get(6)?,
            })
        })
        .collect()
    }

    /// Every visible point of one metric series as `(step, value)`, by step (points at
    /// one step in the order they were written). A NaN value reads back as NaN. Points
    /// hidden by a resume are left out.
    ///
    /// # Errors
    /// [`Error::NotFound`] when the run does not exist.
    pub fn metric_history(&self, run: RunId, key: &str, split: &str) -> Result<Vec<(u64, f64)>> {
        self.sync()?;
        let conn = &mut *self.conn.borrow_mut();
        ensure_run(conn, run)?;
        series_points(conn, run, key, split)
    }

    /// The visible points of one metric series reduced to at most `n_points`, for a
    /// plot: the whole history when it is no longer; otherwise the step range is cut
    /// into `n_points / 2` buckets of equal width, and each bucket keeps its smallest
    /// and its largest point (in step order), so that spikes survive. A NaN counts as
    /// larger than any number (a divergence shows).
    ///
    /// # Errors
    /// [`Error::Invalid`] when `n_points` is below 2; [`Error::NotFound`] when the run
    /// does not exist.
    pub fn metric_history_downsampled(
        &self,
        run: RunId,
        key: &str,
        split: &str,
        n_points: usize,
    ) -> Result<Vec<(u64, f64)>> {
        if n_points < 2 {
            return Err(Error::Invalid(format!(
                "cannot downsample to {n_points} point(s): ask for at least 2"
            )));
        }
        self.sync()?;
        let conn = &mut *self.conn.borrow_mut();
        ensure_run(conn, run)?;
        let sql = format!(
            "SELECT COUNT(*), MIN(m.step), MAX(m.step) FROM metrics m
                WHERE m.run_id = ?1 AND m.key = ?2 AND m.split = ?3 AND {VISIBLE}"
        );
        let row = conn.query_one(&sql, args![run, key, split])?;
        let (count, lo, hi): (u64, Option<u64>, Option<u64>) =
            (row.get(0)?, row.get(1)?, row.get(2)?);
        let (Some(lo), Some(hi)) = (lo, hi) else {
            return Ok(Vec::new());
        };
        let points = series_points(conn, run, key, split)?;
        if usize::try_from(count).is_ok_and(|count| count <= n_points) {
            return Ok(points);
        }
        Ok(downsample(points, lo, hi, n_points / 2))
    }

    /// Every point of a run as stored, by key, split, step and write order; with
    /// `include_hidden`, the points hidden by a resume too (flagged `hidden`).
    ///
    /// # Errors
    /// [`Error::NotFound`] when the run does not exist.
    pub fn metric_points(&self, run: RunId, include_hidden: bool) -> Result<Vec<MetricRecord>> {
        self.sync()?;
        let conn = &mut *self.conn.borrow_mut();
        ensure_run(conn, run)?;
        let sql = format!(
            "SELECT m.key, m.split, m.step, m.epoch, m.value, m.wall_time, m.attempt,
                    NOT ({VISIBLE}) AS hidden
                FROM metrics m WHERE m.run_id = ?1
                ORDER BY m.key, m.split, m.step, m.id"
        );
        conn.query(&sql, args![run])?
            .iter()
            .map(|row| {
                Ok(MetricRecord {
                    key: row.get(0)?,
                    split: row.get(1)?,
                    step: row.get(2)?,
                    epoch: row.get(3)?,
                    value: row.get::<Option<f64>>(4)?.unwrap_or(f64::NAN),
                    wall_time: row.get(5)?,
                    attempt: row.get(6)?,
                    hidden: row.get(7)?,
                })
            })
            .filter(|p| include_hidden || !matches!(p, Ok(p) if p.hidden))
            .collect()
    }

    /// The summary of one metric series; `None` when no visible point of it was written.
    ///
    /// # Errors
    /// [`Error::NotFound`] when the run does not exist.
    pub fn metric_summary(
        &self,
        run: RunId,
        key: &str,
        split: &str,
    ) -> Result<Option<MetricSummaryRecord>> {
        self.sync()?;
        let conn = &mut *self.conn.borrow_mut();
        ensure_run(conn, run)?;
        let sql = format!("{SELECT_SUMMARY} WHERE run_id = ?1 AND key = ?2 AND split = ?3");
        conn.query_opt(&sql, args![run, key, split])?
            .map(|row| summary_from_row(&row))
            .transpose()
    }

    /// The summaries of every metric series of a run, by key then split.
    ///
    /// # Errors
    /// [`Error::NotFound`] when the run does not exist.
    pub fn metric_summaries(&self, run: RunId) -> Result<Vec<MetricSummaryRecord>> {
        self.sync()?;
        let conn = &mut *self.conn.borrow_mut();
        ensure_run(conn, run)?;
        let sql = format!("{SELECT_SUMMARY} WHERE run_id = ?1 ORDER BY key, split");
        conn.query(&sql, args![run])?
            .iter()
            .map(summary_from_row)
            .collect()
    }

    /// The run of an experiment whose metric series reached the best finite value
    /// (smallest for [`Goal::Min`], largest for [`Goal::Max`]) among its visible
    /// points, whatever its status; of equal values the lowest run id wins. `None` when
    /// no run of the experiment has a finite value of that series.
    ///
    /// # Errors
    /// [`Error::NotFound`] when the experiment does not exist.
    pub fn best_run(
        &self,
        experiment: &str,
        key: &str,
        split: &str,
        goal: Goal,
    ) -> Result<Option<RunRecord>> {
        self.sync()?;
        let conn = &mut *self.conn.borrow_mut();
        let experiment = experiment_id(conn, experiment)?;
        let order = match goal {
            Goal::Min => "s.min IS NOT NULL ORDER BY s.min ASC, r.id ASC",
            Goal::Max => "s.max IS NOT NULL ORDER BY s.max DESC, r.id ASC",
        };
        let sql = format!(
            "{SELECT_RUN} JOIN metric_summaries s ON s.run_id = r.id
                WHERE r.experiment_id = ?1 AND s.key = ?2 AND s.split = ?3 AND {order} LIMIT 1"
        );
        let run = conn
            .query_opt(&sql, args![experiment, key, split])?
            .map(|row| run_from_row(&row))
            .transpose()?;
        let cutoff = self.cutoff();
        Ok(run.map(|run| Self::reported(run, cutoff)))
    }

    /// Runs side by side: their params (every key any of them has) and their metric
    /// summaries (every series any of them has), one value per run in the order given.
    ///
    /// # Errors
    /// [`Error::NotFound`] naming the first run that does not exist.
    pub fn compare_runs(&self, runs: &[RunId]) -> Result<Comparison> {
        let records = runs
            .iter()
            .map(|&id| self.run(id))
            .collect::<Result<Vec<_>>>()?;
        let mut params: BTreeMap<String, Vec<Option<String>>> = BTreeMap::new();
        let mut metrics: BTreeMap<(String, String), Vec<Option<MetricSummaryRecord>>> =
            BTreeMap::new();
        for (i, &id) in runs.iter().enumerate() {
            for (key, value) in self.params(id)? {
                params.entry(key).or_insert_with(|| vec![None; runs.len()])[i] = Some(value);
            }
            for summary in self.metric_summaries(id)? {
                let series = (summary.key.clone(), summary.split.clone());
                metrics
                    .entry(series)
                    .or_insert_with(|| vec![None; runs.len()])[i] = Some(summary);
            }
        }
        Ok(Comparison {
            runs: records,
            params: params
                .into_iter()
                .map(|(key, values)| ParamRow { key, values })
                .collect(),
            metrics: metrics
                .into_iter()
                .map(|((key, split), values)| MetricRow { key, split, values })
                .collect(),
        })
    }
}

impl RunTracker for ExperimentDb {
    /// See [`ExperimentDb::heartbeat`].
    fn heartbeat(&mut self, run: RunId) -> Result<()> {
        ExperimentDb::heartbeat(self, run)
    }

    /// See [`ExperimentDb::log_artifact`].
    fn log_artifact(&mut self, run: RunId, artifact: &NewArtifact) -> Result<()> {
        ExperimentDb::log_artifact(self, run, artifact).map(|_| ())
    }

    /// Creates the experiment on first use, inserts the run as RUNNING (attempt 1) and
    /// stores its params, synchronously.
    ///
    /// # Errors
    /// [`Error::Invalid`] when the experiment or run name is empty, the run name is
    /// taken in the experiment, or a param key is given twice.
    fn start_run(&mut self, run: &NewRun) -> Result<RunId> {
        if run.experiment.is_empty() {
            return Err(Error::Invalid("experiment name is empty".into()));
        }
        if run.name.is_empty() {
            return Err(Error::Invalid("run name is empty".into()));
        }
        let config = serde_json::to_string(&run.config)?;
        let id = self.conn.get_mut().write_tx(|tx| {
            let now = now();
            tx.execute(
                "INSERT INTO experiments (name, created_at) VALUES (?1, ?2)
                    ON CONFLICT (name) DO NOTHING",
                args![&run.experiment, now],
            )?;
            let experiment = experiment_id(tx, &run.experiment)?;
            let taken: Option<RunId> = tx
                .query_opt(
                    "SELECT id FROM runs WHERE experiment_id = ?1 AND name = ?2",
                    args![experiment, &run.name],
                )?
                .map(|row| row.get(0))
                .transpose()?;
            if let Some(other) = taken {
                return Err(Error::Invalid(format!(
                    "run name {:?} is already taken in experiment {:?} (run {other})",
                    run.name, run.experiment
                )));
            }
            let id: RunId = tx
                .query_one(
                    "INSERT INTO runs (experiment_id, name, status, config_json, kiln_version,
                            git_commit, host, started_at, heartbeat_at, attempt)
                        VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?8, 1) RETURNING id",
                    args![
                        experiment,
                        &run.name,
                        RunStatus::Running,
                        config.as_str(),
                        &run.kiln_version,
                        run.git_commit.as_deref(),
                        &run.host,
                        now
                    ],
                )?
                .get(0)?;
            insert_params(tx, id, &run.params)?;
            Ok(id)
        })?;
        self.running.insert(id);
        tracing::debug!(run = id, experiment = %run.experiment, name = %run.name, "run started");
        Ok(id)
    }

    /// Checks the points and hands them to the background writer, which inserts them
    /// and updates the run's summaries and heartbeat in one transaction; returns
    /// without waiting for the disk, unless the writer's queue is full (then it blocks
    /// until there is room: points are never dropped).
    ///
    /// # Errors
    /// A failure to write earlier batches not reported yet, as [`Error::WriteFailed`]
    /// (then these points are not taken); [`Error::NotFound`] when the run does not
    /// exist; [`Error::Invalid`] when it has ended or a wall time is not finite (then
    /// no point is stored). A failure to write these points is reported by a later call.
    fn log_metrics(&mut self, run: RunId, points: &[MetricPoint]) -> Result<()> {
        self.take_failure()?;
        check_points(points)?;
        if !self.running.contains(&run) {
            ensure_running(self.conn.get_mut(), run, "log metrics")?;
            self.running.insert(run);
        }
        if points.is_empty() {
            return Ok(());
        }
        self.writer()?.send(run, points.to_vec())
    }

    /// Writes the points still queued, then sets the status, `ended_at` and the reason.
    /// The run is ended even when queued points failed to be written.
    ///
    /// # Errors
    /// A failure to write points not reported yet, as [`Error::WriteFailed`] (the run
    /// is ended nonetheless); [`Error::NotFound`] when the run does not exist;
    /// [`Error::Invalid`] when it has already ended.
    fn finish_run(&mut self, run: RunId, status: EndStatus, reason: Option<&str>) -> Result<()> {
        let written = self.flush();
        self.running.remove(&run);
        let ended = end_run(self.conn.get_mut(), run, status, reason);
        match (written, ended) {
            (Err(error), Err(also)) => {
                tracing::error!(run, error = %also, "could not end the run");
                Err(error)
            }
            (Err(error), Ok(())) | (Ok(()), Err(error)) => Err(error),
            (Ok(()), Ok(())) => {
                tracing::debug!(run, status = status.as_str(), reason, "run finished");
                Ok(())
            }
        }
    }

    /// Heartbeats through a connection of the pulse's own, opened at each beat
    /// (beats are [`crate::HEARTBEAT_INTERVAL`] apart).
    fn pulse(&mut self, run: RunId) -> Option<Pulse> {
        let location = self.connect_to.clone();
        Some(Pulse::new(move || {
            heartbeat(&mut Conn::open(&location)?, run)
        }))
    }

    /// See [`ExperimentDb::flush`].
    fn flush(&mut self) -> Result<()> {
        ExperimentDb::flush(self)
    }

    /// See [`ExperimentDb::resume_run`].
    fn resume_run(&mut self, run: RunId, from_step: u64) -> Result<u32> {
        ExperimentDb::resume_run(self, run, from_step)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn new_run(name: &str) -> NewRun {
        NewRun {
            experiment: "exp".into(),
            name: name.into(),
            config: serde_json::json!({}),
            params: vec![],
            kiln_version: "0.1.0".into(),
            git_commit: None,
            host: "host".into(),
        }
    }

    #[test]
    fn connection_enforces_foreign_keys() {
        let dir = tempfile::tempdir().unwrap();
        let mut db = ExperimentDb::open(dir.path().join("kiln.sqlite")).unwrap();
        let fk: bool = db
            .conn
            .get_mut()
            .query_one("PRAGMA foreign_keys", args![])
            .unwrap()
            .get(0)
            .unwrap();
        assert!(fk);
        let run = db.start_run(&new_run("a")).unwrap();
        let mut insert = |run: RunId| {
            db.conn.get_mut().execute(
                "INSERT INTO metrics (run_id, key, split, step, epoch, value, wall_time)
                    VALUES (?1, 'loss', 'train', 0, 0, 1.0, 0.0)",
                args![run],
            )
        };
        insert(run).unwrap();
        let err = insert(run + 1000).unwrap_err();
        assert!(
            matches!(&err, Error::Sqlite(e)
                if e.sqlite_error_code() == Some(rusqlite::ErrorCode::ConstraintViolation)),
            "{err}"
        );
        assert!(err.to_string().contains("FOREIGN KEY"), "{err}");
    }

    /// What a second Ctrl-C and a waiting multi-node exchange do: another thread
    /// beats for the run and ends it, after the owner's queued points are written.
    #[test]
    fn another_thread_beats_and_ends_a_run_through_its_handles() {
        let dir = tempfile::tempdir().unwrap();
        let mut db = ExperimentDb::open(dir.path().join("kiln.sqlite")).unwrap();
        let run = db.start_run(&new_run("a")).unwrap();
        let points: Vec<MetricPoint> = (0..100)
            .map(|step| MetricPoint {
                key: "loss".into(),
                split: "train".into(),
                step,
                epoch: 0,
                value: step as f64,
                wall_time: now(),
            })
            .collect();
        db.log_metrics(run, &points).unwrap();
        let started = db.run(run).unwrap().heartbeat_at.unwrap_or(0.0);
        let (pulse, exit) = (db.pulse(run).unwrap(), db.exit_handle().unwrap());
        let flushed = std::thread::spawn(move || {
            pulse.beat().unwrap();
            exit.end_run(
                run,
                EndStatus::Killed,
                "a second signal",
                Duration::from_secs(10),
            )
        })
        .join()
        .unwrap()
        .unwrap();
        assert!(flushed);
        let record = db.run(run).unwrap();
        assert_eq!(record.status, RunStatus::Killed);
        assert_eq!(record.failure_reason.as_deref(), Some("a second signal"));
        assert!(record.heartbeat_at.unwrap() >= started);
        assert_eq!(db.metric_history(run, "loss", "train").unwrap().len(), 100);
        // Ended: the handle refuses to end it again, and says why.
        let again = db.exit_handle().unwrap().end_run(
            run,
            EndStatus::Killed,
            "again",
            Duration::from_secs(1),
        );
        assert!(again.unwrap_err().to_string().contains("KILLED"));
        // A handle still held does not keep the writer alive: dropping the store
        // returns (it once waited for the writer thread forever).
        let kept = db.exit_handle().unwrap();
        drop(db);
        assert!(
            kept.end_run(run, EndStatus::Killed, "late", Duration::from_secs(1))
                .is_err()
        );
    }

    #[test]
    fn the_store_can_move_to_another_thread() {
        fn assert_send<T: Send>() {}
        assert_send::<ExperimentDb>();
    }

    #[test]
    fn busy_timeout_is_set() {
        let dir = tempfile::tempdir().unwrap();
        let mut db = ExperimentDb::open(dir.path().join("kiln.sqlite")).unwrap();
        let ms: i64 = db
            .conn
            .get_mut()
            .query_one("PRAGMA busy_timeout", args![])
            .unwrap()
            .get(0)
            .unwrap();
        assert_eq!(ms, 5000);
    }
}

//! [`ExperimentDb`]: the SQLite store.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rusqlite::types::{FromSql, FromSqlError, FromSqlResult, ToSqlOutput, Type, ValueRef};
use rusqlite::{Connection, OptionalExtension, Row, ToSql, TransactionBehavior, params};

use crate::migrations;
use crate::records::{
    ArtifactRecord, Goal, MetricSummaryRecord, NewArtifact, RunRecord, RunStatus,
};
use crate::{EndStatus, Error, MetricPoint, NewRun, Result, RunId, RunTracker};

/// kiln's experiment store: one SQLite database file.
///
/// Opened in WAL mode with foreign keys enforced and a busy timeout of
/// [`ExperimentDb::BUSY_TIMEOUT`], so that several processes can write to one file.
/// Every write is one `BEGIN IMMEDIATE` transaction. Times are seconds since the Unix
/// epoch (UTC) as `f64`.
#[derive(Debug)]
pub struct ExperimentDb {
    conn: Connection,
    path: PathBuf,
}

/// Seconds since the Unix epoch, now.
pub(crate) fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

impl ToSql for RunStatus {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        Ok(ToSqlOutput::from(self.as_str()))
    }
}

impl FromSql for RunStatus {
    fn column_result(value: ValueRef<'_>) -> FromSqlResult<Self> {
        RunStatus::parse(value.as_str()?).map_err(|e| FromSqlError::Other(Box::new(e)))
    }
}

const SELECT_RUN: &str = "SELECT r.id, e.name, r.name, r.status, r.config_json, r.kiln_version,
        r.git_commit, r.host, r.started_at, r.ended_at, r.heartbeat_at, r.attempt,
        r.failure_reason
    FROM runs r JOIN experiments e ON e.id = r.experiment_id";

fn run_from_row(row: &Row<'_>) -> rusqlite::Result<RunRecord> {
    let config: String = row.get(4)?;
    let config = serde_json::from_str(&config)
        .map_err(|e| rusqlite::Error::FromSqlConversionFailure(4, Type::Text, Box::new(e)))?;
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

fn summary_from_row(row: &Row<'_>) -> rusqlite::Result<MetricSummaryRecord> {
    let pair = |value: Option<f64>, step: Option<u64>| step.zip(value);
    Ok(MetricSummaryRecord {
        key: row.get(0)?,
        split: row.get(1)?,
        last: row.get::<_, Option<f64>>(2)?.unwrap_or(f64::NAN),
        last_step: row.get(3)?,
        min: pair(row.get(4)?, row.get(5)?),
        max: pair(row.get(6)?, row.get(7)?),
    })
}

const INSERT_METRIC: &str = "INSERT INTO metrics
    (run_id, key, split, step, epoch, value, wall_time, attempt)
    VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)";

// ?4: the value (NULL for NaN); ?5: its step; ?6: the value when finite, else NULL;
// ?7: its step when finite, else NULL. In `DO UPDATE SET` every right-hand side reads
// the row as it was before the update.
const UPSERT_SUMMARY: &str = "INSERT INTO metric_summaries
    (run_id, key, split, last, last_step, min, min_step, max, max_step)
    VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?6, ?7)
    ON CONFLICT (run_id, key, split) DO UPDATE SET
        last = CASE WHEN excluded.last_step >= metric_summaries.last_step
            THEN excluded.last ELSE metric_summaries.last END,
        last_step = MAX(metric_summaries.last_step, excluded.last_step),
        min = CASE WHEN excluded.min IS NOT NULL
                AND (metric_summaries.min IS NULL OR excluded.min < metric_summaries.min)
            THEN excluded.min ELSE metric_summaries.min END,
        min_step = CASE WHEN excluded.min IS NOT NULL
                AND (metric_summaries.min IS NULL OR excluded.min < metric_summaries.min)
            THEN excluded.min_step ELSE metric_summaries.min_step END,
        max = CASE WHEN excluded.max IS NOT NULL
                AND (metric_summaries.max IS NULL OR excluded.max > metric_summaries.max)
            THEN excluded.max ELSE metric_summaries.max END,
        max_step = CASE WHEN excluded.max IS NOT NULL
                AND (metric_summaries.max IS NULL OR excluded.max > metric_summaries.max)
            THEN excluded.max_step ELSE metric_summaries.max_step END";

/// Fails with [`Error::NotFound`] unless the run exists.
fn ensure_run(conn: &Connection, run: RunId) -> Result<()> {
    run_state(conn, run).map(|_| ())
}

/// The run's stored status and attempt; [`Error::NotFound`] when it does not exist.
fn run_state(conn: &Connection, run: RunId) -> Result<(RunStatus, u32)> {
    conn.prepare_cached("SELECT status, attempt FROM runs WHERE id = ?1")?
        .query_row([run], |row| Ok((row.get(0)?, row.get(1)?)))
        .optional()?
        .ok_or_else(|| Error::NotFound(format!("run {run}")))
}

/// Fails with [`Error::Invalid`] unless the run exists and is RUNNING.
fn ensure_running(conn: &Connection, run: RunId, what: &str) -> Result<u32> {
    let (status, attempt) = run_state(conn, run)?;
    if status.is_ended() {
        return Err(Error::Invalid(format!(
            "run {run} has ended ({status}): cannot {what}"
        )));
    }
    Ok(attempt)
}

fn experiment_id(conn: &Connection, name: &str) -> Result<i64> {
    conn.prepare_cached("SELECT id FROM experiments WHERE name = ?1")?
        .query_row([name], |row| row.get(0))
        .optional()?
        .ok_or_else(|| Error::NotFound(format!("experiment {name:?}")))
}

/// Inserts params; a key already set to another value is an error, the same value is
/// accepted.
fn insert_params(conn: &Connection, run: RunId, params: &[(String, String)]) -> Result<()> {
    let mut seen = HashSet::new();
    for (key, value) in params {
        if !seen.insert(key.as_str()) {
            return Err(Error::Invalid(format!(
                "param {key:?} given twice for run {run}"
            )));
        }
        let existing: Option<String> = conn
            .prepare_cached("SELECT value FROM params WHERE run_id = ?1 AND key = ?2")?
            .query_row(params![run, key], |row| row.get(0))
            .optional()?;
        match existing {
            Some(old) if old == *value => {}
            Some(old) => {
                return Err(Error::Invalid(format!(
                    "param {key:?} of run {run} is already {old:?}, cannot set it to {value:?}"
                )));
            }
            None => {
                conn.prepare_cached("INSERT INTO params (run_id, key, value) VALUES (?1, ?2, ?3)")?
                    .execute(params![run, key, value])?;
            }
        }
    }
    Ok(())
}

impl ExperimentDb {
    /// How long a write waits for another writer to finish before it fails.
    pub const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

    /// Opens (creating when missing) the database at `path` and brings its schema up to
    /// date. The parent directory must exist.
    ///
    /// # Errors
    /// [`Error::Sqlite`] when the file cannot be opened or a migration fails;
    /// [`Error::Invalid`] when WAL cannot be enabled or the database was written by a
    /// newer kiln.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let mut conn = Connection::open(&path)?;
        conn.busy_timeout(Self::BUSY_TIMEOUT)?;
        let mode: String =
            conn.pragma_update_and_check(None, "journal_mode", "WAL", |row| row.get(0))?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(Error::Invalid(format!(
                "{}: cannot use WAL (journal mode is {mode})",
                path.display()
            )));
        }
        // With WAL, NORMAL loses no committed transaction when a process dies, only
        // (possibly) the last ones on a power loss.
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.pragma_update(None, "foreign_keys", true)?;
        let applied = migrations::apply(&mut conn, now())?;
        if !applied.is_empty() {
            tracing::info!(path = %path.display(), ?applied, "experiment store migrated");
        }
        Ok(Self { conn, path })
    }

    /// Path of the database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The schema version of the database (the last migration applied).
    ///
    /// # Errors
    /// [`Error::Sqlite`] when the query fails.
    pub fn schema_version(&self) -> Result<i64> {
        migrations::current_version(&self.conn)
    }

    /// The schema version this build of kiln creates.
    pub fn latest_schema_version() -> i64 {
        migrations::latest_version()
    }

    /// Records that the run is alive (updates `heartbeat_at`). Does nothing for a run
    /// that has ended.
    ///
    /// # Errors
    /// [`Error::NotFound`] when the run does not exist.
    pub fn heartbeat(&mut self, run: RunId) -> Result<()> {
        let changed = self.conn.execute(
            "UPDATE runs SET heartbeat_at = ?2 WHERE id = ?1 AND status = 'RUNNING'",
            params![run, now()],
        )?;
        if changed == 0 {
            ensure_run(&self.conn, run)?;
        }
        Ok(())
    }

    /// Adds params to a run. Setting a param again to the same value is accepted, to
    /// another value is an error (params describe how the run was made).
    ///
    /// # Errors
    /// [`Error::NotFound`] when the run does not exist; [`Error::Invalid`] when a key is
    /// given twice or already has another value (then none is stored).
    pub fn log_params(&mut self, run: RunId, params: &[(String, String)]) -> Result<()> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        ensure_run(&tx, run)?;
        insert_params(&tx, run, params)?;
        tx.commit()?;
        Ok(())
    }

    /// Sets a tag of a run, replacing its previous value.
    ///
    /// # Errors
    /// [`Error::NotFound`] when the run does not exist.
    pub fn set_tag(&mut self, run: RunId, key: &str, value: &str) -> Result<()> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        ensure_run(&tx, run)?;
        tx.execute(
            "INSERT INTO tags (run_id, key, value) VALUES (?1, ?2, ?3)
                ON CONFLICT (run_id, key) DO UPDATE SET value = excluded.value",
            params![run, key, value],
        )?;
        tx.commit()?;
        Ok(())
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
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        ensure_run(&tx, run)?;
        tx.execute(
            "INSERT INTO artifacts (run_id, kind, path, size_bytes, sha256, created_at)
                VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![
                run,
                artifact.kind,
                artifact.path,
                artifact.size_bytes,
                artifact.sha256,
                now()
            ],
        )?;
        let id = tx.last_insert_rowid();
        tx.commit()?;
        Ok(id)
    }

    /// Runs, of one experiment or of all, in the order they started (then by id).
    ///
    /// # Errors
    /// [`Error::NotFound`] when the experiment is named and does not exist.
    pub fn list_runs(&self, experiment: Option<&str>) -> Result<Vec<RunRecord>> {
        let runs = match experiment {
            Some(name) => {
                let id = experiment_id(&self.conn, name)?;
                let sql =
                    format!("{SELECT_RUN} WHERE r.experiment_id = ?1 ORDER BY r.started_at, r.id");
                let mut stmt = self.conn.prepare_cached(&sql)?;
                stmt.query_map([id], run_from_row)?
                    .collect::<rusqlite::Result<_>>()?
            }
            None => {
                let sql = format!("{SELECT_RUN} ORDER BY r.started_at, r.id");
                let mut stmt = self.conn.prepare_cached(&sql)?;
                stmt.query_map([], run_from_row)?
                    .collect::<rusqlite::Result<_>>()?
            }
        };
        Ok(runs)
    }

    /// One run.
    ///
    /// # Errors
    /// [`Error::NotFound`] when the run does not exist.
    pub fn run(&self, id: RunId) -> Result<RunRecord> {
        let sql = format!("{SELECT_RUN} WHERE r.id = ?1");
        self.conn
            .prepare_cached(&sql)?
            .query_row([id], run_from_row)
            .optional()?
            .ok_or_else(|| Error::NotFound(format!("run {id}")))
    }

    /// The params of a run, by key.
    ///
    /// # Errors
    /// [`Error::NotFound`] when the run does not exist.
    pub fn params(&self, run: RunId) -> Result<Vec<(String, String)>> {
        ensure_run(&self.conn, run)?;
        let mut stmt = self
            .conn
            .prepare_cached("SELECT key, value FROM params WHERE run_id = ?1 ORDER BY key")?;
        let params = stmt
            .query_map([run], |row| Ok((row.get(0)?, row.get(1)?)))?
            .collect::<rusqlite::Result<_>>()?;
        Ok(params)
    }

    /// The tags of a run, by key.
    ///
    /// # Errors
    /// [`Error::NotFound`] when the run does not exist.
    pub fn tags(&self, run: RunId) -> Result<Vec<(String, String)>> {
        ensure_run(&self.conn, run)?;
        let mut stmt = self
            .conn
            .prepare_cached("SELECT key, value FROM tags WHERE run_id = ?1 ORDER BY key")?;
        let tags = stmt
            .query_map([run], |row| Ok((row.get(0)?, row.get(1)?)))?
            .collect::<rusqlite::Result<_>>()?;
        Ok(tags)
    }

    /// The artifacts of a run, in the order they were recorded.
    ///
    /// # Errors
    /// [`Error::NotFound`] when the run does not exist.
    pub fn artifacts(&self, run: RunId) -> Result<Vec<ArtifactRecord>> {
        ensure_run(&self.conn, run)?;
        let mut stmt = self.conn.prepare_cached(
            "SELECT id, run_id, kind, path, size_bytes, sha256, created_at
                FROM artifacts WHERE run_id = ?1 ORDER BY id",
        )?;
        let artifacts = stmt
            .query_map([run], |row| {
                Ok(ArtifactRecord {
                    id: row.get(0)?,
                    run: row.get(1)?,
                    kind: row.get(2)?,
                    path: row.get(3)?,
                    size_bytes: row.get(4)?,
                    sha256: row.get(5)?,
                    created_at: row.get(6)?,
                })
            })?
            .collect::<rusqlite::Result<_>>()?;
        Ok(artifacts)
    }

    /// Every point of one metric series as `(step, value)`, by step (points at one step
    /// in the order they were written). A NaN value reads back as NaN.
    ///
    /// # Errors
    /// [`Error::NotFound`] when the run does not exist.
    pub fn metric_history(&self, run: RunId, key: &str, split: &str) -> Result<Vec<(u64, f64)>> {
        ensure_run(&self.conn, run)?;
        let mut stmt = self.conn.prepare_cached(
            "SELECT step, value FROM metrics
                WHERE run_id = ?1 AND key = ?2 AND split = ?3 ORDER BY step, id",
        )?;
        let points = stmt
            .query_map(params![run, key, split], |row| {
                Ok((
                    row.get(0)?,
                    row.get::<_, Option<f64>>(1)?.unwrap_or(f64::NAN),
                ))
            })?
            .collect::<rusqlite::Result<_>>()?;
        Ok(points)
    }

    /// The summary of one metric series; `None` when no point of it was written.
    ///
    /// # Errors
    /// [`Error::NotFound`] when the run does not exist.
    pub fn metric_summary(
        &self,
        run: RunId,
        key: &str,
        split: &str,
    ) -> Result<Option<MetricSummaryRecord>> {
        ensure_run(&self.conn, run)?;
        let sql = format!("{SELECT_SUMMARY} WHERE run_id = ?1 AND key = ?2 AND split = ?3");
        let summary = self
            .conn
            .prepare_cached(&sql)?
            .query_row(params![run, key, split], summary_from_row)
            .optional()?;
        Ok(summary)
    }

    /// The summaries of every metric series of a run, by key then split.
    ///
    /// # Errors
    /// [`Error::NotFound`] when the run does not exist.
    pub fn metric_summaries(&self, run: RunId) -> Result<Vec<MetricSummaryRecord>> {
        ensure_run(&self.conn, run)?;
        let sql = format!("{SELECT_SUMMARY} WHERE run_id = ?1 ORDER BY key, split");
        let mut stmt = self.conn.prepare_cached(&sql)?;
        let summaries = stmt
            .query_map([run], summary_from_row)?
            .collect::<rusqlite::Result<_>>()?;
        Ok(summaries)
    }

    /// The run of an experiment whose metric series reached the best finite value
    /// (smallest for [`Goal::Min`], largest for [`Goal::Max`]), whatever its status;
    /// of equal values the lowest run id wins. `None` when no run of the experiment has
    /// a finite value of that series.
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
        let experiment = experiment_id(&self.conn, experiment)?;
        let order = match goal {
            Goal::Min => "s.min IS NOT NULL ORDER BY s.min ASC, r.id ASC",
            Goal::Max => "s.max IS NOT NULL ORDER BY s.max DESC, r.id ASC",
        };
        let sql = format!(
            "{SELECT_RUN} JOIN metric_summaries s ON s.run_id = r.id
                WHERE r.experiment_id = ?1 AND s.key = ?2 AND s.split = ?3 AND {order} LIMIT 1"
        );
        let run = self
            .conn
            .prepare_cached(&sql)?
            .query_row(params![experiment, key, split], run_from_row)
            .optional()?;
        Ok(run)
    }
}

/// Writes synchronously, each call one transaction (a background writer is to come).
impl RunTracker for ExperimentDb {
    /// Creates the experiment on first use, inserts the run as RUNNING (attempt 1) and
    /// stores its params.
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
        let now = now();
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        tx.execute(
            "INSERT INTO experiments (name, created_at) VALUES (?1, ?2)
                ON CONFLICT (name) DO NOTHING",
            params![run.experiment, now],
        )?;
        let experiment = experiment_id(&tx, &run.experiment)?;
        let taken: Option<RunId> = tx
            .query_row(
                "SELECT id FROM runs WHERE experiment_id = ?1 AND name = ?2",
                params![experiment, run.name],
                |row| row.get(0),
            )
            .optional()?;
        if let Some(other) = taken {
            return Err(Error::Invalid(format!(
                "run name {:?} is already taken in experiment {:?} (run {other})",
                run.name, run.experiment
            )));
        }
        tx.execute(
            "INSERT INTO runs (experiment_id, name, status, config_json, kiln_version,
                    git_commit, host, started_at, heartbeat_at, attempt)
                VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?8, 1)",
            params![
                experiment,
                run.name,
                RunStatus::Running,
                config,
                run.kiln_version,
                run.git_commit,
                run.host,
                now
            ],
        )?;
        let id = tx.last_insert_rowid();
        insert_params(&tx, id, &run.params)?;
        tx.commit()?;
        tracing::debug!(run = id, experiment = %run.experiment, name = %run.name, "run started");
        Ok(id)
    }

    /// Inserts the points and updates the run's metric summaries, in one transaction.
    ///
    /// # Errors
    /// [`Error::NotFound`] when the run does not exist; [`Error::Invalid`] when it has
    /// ended or a wall time is not finite (then no point is stored).
    fn log_metrics(&mut self, run: RunId, points: &[MetricPoint]) -> Result<()> {
        if let Some(p) = points.iter().find(|p| !p.wall_time.is_finite()) {
            return Err(Error::Invalid(format!(
                "metric {:?}/{:?} at step {}: wall time {} is not finite",
                p.key, p.split, p.step, p.wall_time
            )));
        }
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let attempt = ensure_running(&tx, run, "log metrics")?;
        {
            let mut insert = tx.prepare_cached(INSERT_METRIC)?;
            let mut upsert = tx.prepare_cached(UPSERT_SUMMARY)?;
            for p in points {
                // SQLite has no NaN: bound as a double it would become NULL anyway.
                let value = (!p.value.is_nan()).then_some(p.value);
                let finite = p.value.is_finite().then_some(p.value);
                let finite_step = finite.map(|_| p.step);
                insert.execute(params![
                    run,
                    p.key,
                    p.split,
                    p.step,
                    p.epoch,
                    value,
                    p.wall_time,
                    attempt
                ])?;
                upsert.execute(params![
                    run,
                    p.key,
                    p.split,
                    value,
                    p.step,
                    finite,
                    finite_step
                ])?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// Sets the status, `ended_at` and the reason.
    ///
    /// # Errors
    /// [`Error::NotFound`] when the run does not exist; [`Error::Invalid`] when it has
    /// already ended.
    fn finish_run(&mut self, run: RunId, status: EndStatus, reason: Option<&str>) -> Result<()> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        ensure_running(&tx, run, "finish it again")?;
        tx.execute(
            "UPDATE runs SET status = ?2, ended_at = ?3, failure_reason = ?4 WHERE id = ?1",
            params![run, RunStatus::from(status), now(), reason],
        )?;
        tx.commit()?;
        tracing::debug!(run, status = status.as_str(), reason, "run finished");
        Ok(())
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
            .query_row("PRAGMA foreign_keys", [], |r| r.get(0))
            .unwrap();
        assert!(fk);
        let run = db.start_run(&new_run("a")).unwrap();
        let insert = |run: RunId| {
            db.conn.execute(
                "INSERT INTO metrics (run_id, key, split, step, epoch, value, wall_time)
                    VALUES (?1, 'loss', 'train', 0, 0, 1.0, 0.0)",
                [run],
            )
        };
        insert(run).unwrap();
        let err = insert(run + 1000).unwrap_err();
        assert_eq!(
            err.sqlite_error_code(),
            Some(rusqlite::ErrorCode::ConstraintViolation),
            "{err}"
        );
        assert!(err.to_string().contains("FOREIGN KEY"), "{err}");
    }

    #[test]
    fn busy_timeout_is_set() {
        let dir = tempfile::tempdir().unwrap();
        let db = ExperimentDb::open(dir.path().join("kiln.sqlite")).unwrap();
        let ms: i64 = db
            .conn
            .query_row("PRAGMA busy_timeout", [], |r| r.get(0))
            .unwrap();
        assert_eq!(ms, 5000);
    }
}

//! SQL shared by the store's connections: opening one, retrying write transactions
//! that meet a busy database, writing metric points, and the visibility rule of
//! resumed runs.

use std::path::Path;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rusqlite::types::{FromSql, FromSqlError, FromSqlResult, ToSqlOutput, ValueRef};
use rusqlite::{
    Connection, ErrorCode, OptionalExtension, ToSql, Transaction, TransactionBehavior, params,
};

use crate::records::RunStatus;
use crate::series::SummaryAcc;
use crate::{Error, MetricPoint, Result, RunId};

/// How long a statement waits for another writer (SQLite's busy timeout).
pub(crate) const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a write transaction that keeps meeting a busy database is retried, on top
/// of each try's own [`BUSY_TIMEOUT`], before the error reaches the caller.
const BUSY_RETRY_FOR: Duration = Duration::from_secs(30);

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

/// Whether an error means that another connection held a lock for longer than the
/// busy timeout (SQLite's "database is locked").
fn is_busy(error: &Error) -> bool {
    matches!(
        error,
        Error::Sqlite(e) if matches!(
            e.sqlite_error_code(),
            Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked)
        )
    )
}

/// Runs `f` until it succeeds, fails with anything but a busy database, or
/// [`BUSY_RETRY_FOR`] has passed, pausing a little longer after each busy try.
pub(crate) fn retry_busy<T>(mut f: impl FnMut() -> Result<T>) -> Result<T> {
    let started = Instant::now();
    let mut pause = Duration::from_millis(2);
    loop {
        match f() {
            Err(e) if is_busy(&e) && started.elapsed() < BUSY_RETRY_FOR => {
                tracing::debug!(error = %e, "experiment store busy, retrying");
                std::thread::sleep(pause);
                pause = (pause * 2).min(Duration::from_millis(200));
            }
            other => return other,
        }
    }
}

/// Runs `f` in one `BEGIN IMMEDIATE` transaction and commits it; on a busy database the
/// whole transaction is retried (see [`retry_busy`]), so `f` may run more than once.
/// When `f` fails the transaction is rolled back.
pub(crate) fn write_tx<T>(
    conn: &mut Connection,
    mut f: impl FnMut(&Transaction<'_>) -> Result<T>,
) -> Result<T> {
    retry_busy(|| {
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let value = f(&tx)?;
        tx.commit()?;
        Ok(value)
    })
}

/// Opens a connection to the database at `path` and sets it up: busy timeout, WAL,
/// `synchronous = NORMAL`, foreign keys. Applies no migration.
pub(crate) fn open_connection(path: &Path) -> Result<Connection> {
    let conn = Connection::open(path)?;
    conn.busy_timeout(BUSY_TIMEOUT)?;
    retry_busy(|| {
        let mode: String =
            conn.pragma_update_and_check(None, "journal_mode", "WAL", |row| row.get(0))?;
        if mode.eq_ignore_ascii_case("wal") {
            Ok(())
        } else {
            Err(Error::Invalid(format!(
                "{}: cannot use WAL (journal mode is {mode})",
                path.display()
            )))
        }
    })?;
    // With WAL, NORMAL loses no committed transaction when a process dies, only
    // (possibly) the last ones on a power loss.
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    conn.pragma_update(None, "foreign_keys", true)?;
    Ok(conn)
}

/// The run's stored status and attempt; [`Error::NotFound`] when it does not exist.
pub(crate) fn run_state(conn: &Connection, run: RunId) -> Result<(RunStatus, u32)> {
    conn.prepare_cached("SELECT status, attempt FROM runs WHERE id = ?1")?
        .query_row([run], |row| Ok((row.get(0)?, row.get(1)?)))
        .optional()?
        .ok_or_else(|| Error::NotFound(format!("run {run}")))
}

/// Fails with [`Error::NotFound`] unless the run exists.
pub(crate) fn ensure_run(conn: &Connection, run: RunId) -> Result<()> {
    run_state(conn, run).map(|_| ())
}

/// The run's current attempt; fails with [`Error::Invalid`] unless the run exists and is
/// RUNNING as stored.
pub(crate) fn ensure_running(conn: &Connection, run: RunId, what: &str) -> Result<u32> {
    let (status, attempt) = run_state(conn, run)?;
    if status != RunStatus::Running {
        return Err(Error::Invalid(format!(
            "run {run} has ended ({status}): cannot {what}"
        )));
    }
    Ok(attempt)
}

/// Whether the metric row aliased `m` is visible: no later attempt of its run resumed
/// from a step below the row's step.
pub(crate) const VISIBLE: &str = "NOT EXISTS (SELECT 1 FROM run_resumes rr
    WHERE rr.run_id = m.run_id AND rr.attempt > m.attempt AND rr.from_step < m.step)";

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

/// Fails with [`Error::Invalid`] naming the first point whose wall time is not finite.
pub(crate) fn check_points(points: &[MetricPoint]) -> Result<()> {
    match points.iter().find(|p| !p.wall_time.is_finite()) {
        Some(p) => Err(Error::Invalid(format!(
            "metric {:?}/{:?} at step {}: wall time {} is not finite",
            p.key, p.split, p.step, p.wall_time
        ))),
        None => Ok(()),
    }
}

/// Writes one batch of points of a RUNNING run as its current attempt, updates the
/// run's summaries and refreshes its heartbeat, all in the caller's transaction.
/// Points written this way belong to the newest attempt, so they are all visible and
/// the summaries can be updated incrementally.
pub(crate) fn write_points(tx: &Connection, run: RunId, points: &[MetricPoint]) -> Result<()> {
    let attempt = ensure_running(tx, run, "log metrics")?;
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
    tx.prepare_cached("UPDATE runs SET heartbeat_at = ?2 WHERE id = ?1")?
        .execute(params![run, now()])?;
    Ok(())
}

/// Rebuilds every metric summary of a run from a full scan of its visible points (in
/// the order they were written), dropping the summaries of series left without any.
pub(crate) fn recompute_summaries(tx: &Connection, run: RunId) -> Result<()> {
    let sql = format!(
        "SELECT key, split, step, value FROM metrics m
            WHERE m.run_id = ?1 AND {VISIBLE} ORDER BY m.id"
    );
    let mut series: std::collections::BTreeMap<(String, String), SummaryAcc> =
        std::collections::BTreeMap::new();
    {
        let mut stmt = tx.prepare(&sql)?;
        let mut rows = stmt.query([run])?;
        while let Some(row) = rows.next()? {
            let key: String = row.get(0)?;
            let split: String = row.get(1)?;
            let step: u64 = row.get(2)?;
            let value = row.get::<_, Option<f64>>(3)?.unwrap_or(f64::NAN);
            series
                .entry((key, split))
                .and_modify(|acc| acc.push(step, value))
                .or_insert_with(|| SummaryAcc::new(step, value));
        }
    }
    tx.execute("DELETE FROM metric_summaries WHERE run_id = ?1", [run])?;
    let mut insert = tx.prepare_cached(
        "INSERT INTO metric_summaries
            (run_id, key, split, last, last_step, min, min_step, max, max_step)
            VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
    )?;
    for ((key, split), acc) in series {
        let last = (!acc.last.is_nan()).then_some(acc.last);
        insert.execute(params![
            run,
            key,
            split,
            last,
            acc.last_step,
            acc.min.map(|(_, v)| v),
            acc.min.map(|(s, _)| s),
            acc.max.map(|(_, v)| v),
            acc.max.map(|(s, _)| s),
        ])?;
    }
    Ok(())
}

//! Reads and writes shared by the store's connections, whatever their engine: the
//! run checks, writing metric points with their summaries, and the visibility rule
//! of resumed runs.

use std::time::{SystemTime, UNIX_EPOCH};

use std::collections::BTreeMap;

use crate::engine::{Arg, Sql, args};
use crate::records::RunStatus;
use crate::series::SummaryAcc;
use crate::{Error, MetricPoint, Result, RunId};

/// Seconds since the Unix epoch, now.
pub(crate) fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// The run's stored status and attempt; [`Error::NotFound`] when it does not exist.
pub(crate) fn run_state(conn: &mut impl Sql, run: RunId) -> Result<(RunStatus, u32)> {
    let row = conn
        .query_opt("SELECT status, attempt FROM runs WHERE id = ?1", args![run])?
        .ok_or_else(|| Error::NotFound(format!("run {run}")))?;
    Ok((row.get(0)?, row.get(1)?))
}

/// Fails with [`Error::NotFound`] unless the run exists.
pub(crate) fn ensure_run(conn: &mut impl Sql, run: RunId) -> Result<()> {
    run_state(conn, run).map(|_| ())
}

/// The run's current attempt; fails with [`Error::Invalid`] unless the run exists and is
/// RUNNING as stored.
pub(crate) fn ensure_running(conn: &mut impl Sql, run: RunId, what: &str) -> Result<u32> {
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

/// The columns of a metric row, each row's eight placeholders bound in this order.
const INSERT_METRICS: &str = "INSERT INTO metrics
    (run_id, key, split, step, epoch, value, wall_time, attempt) VALUES ";

/// The most rows one `INSERT` of metric points carries. A batch is written in chunks
/// whose sizes are powers of two up to this, so that a connection prepares at most
/// nine shapes of the statement.
const ROWS_PER_INSERT: usize = 256;

// A batch's own summary of one series, merged into the stored one by the same rules
// as writing its points one by one: ?4/?5 its last value (NULL for NaN) and step,
// ?6/?7 its smallest finite value and step, ?8/?9 its largest (NULL when it has none).
// In `DO UPDATE SET` every right-hand side reads the row as it was before the update.
const UPSERT_SUMMARY: &str = "INSERT INTO metric_summaries
    (run_id, key, split, last, last_step, min, min_step, max, max_step)
    VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)
    ON CONFLICT (run_id, key, split) DO UPDATE SET
        last = CASE WHEN excluded.last_step >= metric_summaries.last_step
            THEN excluded.last ELSE metric_summaries.last END,
        last_step = CASE WHEN excluded.last_step >= metric_summaries.last_step
            THEN excluded.last_step ELSE metric_summaries.last_step END,
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
/// the summaries can be updated incrementally: one upsert per series of the batch,
/// with the batch's own summary. The points go in multi-row `INSERT`s, so that a batch
/// costs a few statements rather than two per point (round trips, on PostgreSQL).
pub(crate) fn write_points(tx: &mut impl Sql, run: RunId, points: &[MetricPoint]) -> Result<()> {
    let attempt = ensure_running(tx, run, "log metrics")?;
    let mut rest = points;
    while !rest.is_empty() {
        // The largest power of two that fits, up to ROWS_PER_INSERT.
        let rows = 1usize << rest.len().min(ROWS_PER_INSERT).ilog2();
        let (chunk, tail) = rest.split_at(rows);
        let mut args = Vec::with_capacity(rows * 8);
        for p in chunk {
            // SQLite has no NaN (bound as a double it would become NULL anyway);
            // PostgreSQL stores it as NULL too, so that both stores answer alike.
            let value = (!p.value.is_nan()).then_some(p.value);
            args.extend([
                Arg::from(run),
                Arg::from(&p.key),
                Arg::from(&p.split),
                Arg::from(p.step),
                Arg::from(p.epoch),
                Arg::from(value),
                Arg::from(p.wall_time),
                Arg::from(attempt),
            ]);
        }
        let sql = format!(
            "{INSERT_METRICS}{}",
            vec!["(?, ?, ?, ?, ?, ?, ?, ?)"; rows].join(", ")
        );
        tx.execute(&sql, &args)?;
        rest = tail;
    }
    let mut series: BTreeMap<(&str, &str), SummaryAcc> = BTreeMap::new();
    for p in points {
        series
            .entry((&p.key, &p.split))
            .and_modify(|acc| acc.push(p.step, p.value))
            .or_insert_with(|| SummaryAcc::new(p.step, p.value));
    }
    for ((key, split), acc) in series {
        merge_summary(tx, run, key, split, &acc)?;
    }
    tx.execute(
        "UPDATE runs SET heartbeat_at = ?2 WHERE id = ?1",
        args![run, now()],
    )?;
    Ok(())
}

/// Rebuilds every metric summary of a run from a full scan of its visible points (in
/// the order they were written), dropping the summaries of series left without any.
pub(crate) fn recompute_summaries(tx: &mut impl Sql, run: RunId) -> Result<()> {
    let sql = format!(
        "SELECT key, split, step, value FROM metrics m
            WHERE m.run_id = ?1 AND {VISIBLE} ORDER BY m.id"
    );
    let mut series: BTreeMap<(String, String), SummaryAcc> = BTreeMap::new();
    for row in tx.query(&sql, args![run])? {
        let key: String = row.get(0)?;
        let split: String = row.get(1)?;
        let step: u64 = row.get(2)?;
        let value = row.get::<Option<f64>>(3)?.unwrap_or(f64::NAN);
        series
            .entry((key, split))
            .and_modify(|acc| acc.push(step, value))
            .or_insert_with(|| SummaryAcc::new(step, value));
    }
    tx.execute("DELETE FROM metric_summaries WHERE run_id = ?1", args![run])?;
    // The rows are gone: each merge inserts the series' summary as it is.
    for ((key, split), acc) in series {
        merge_summary(tx, run, &key, &split, &acc)?;
    }
    Ok(())
}

/// Merges `acc`, the summary of points of one series written after those the stored
/// summary covers, into the stored one (inserting it when there is none).
fn merge_summary(
    tx: &mut impl Sql,
    run: RunId,
    key: &str,
    split: &str,
    acc: &SummaryAcc,
) -> Result<()> {
    let last = (!acc.last.is_nan()).then_some(acc.last);
    tx.execute(
        UPSERT_SUMMARY,
        args![
            run,
            key,
            split,
            last,
            acc.last_step,
            acc.min.map(|(_, v)| v),
            acc.min.map(|(s, _)| s),
            acc.max.map(|(_, v)| v),
            acc.max.map(|(s, _)| s),
        ],
    )?;
    Ok(())
}

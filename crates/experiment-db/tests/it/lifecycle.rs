//! The background writer, stale runs read LOST, resumed runs, and the summaries of
//! resumed runs against a full scan (property test), on real stores of both engines.

use std::time::Duration;

use crate::common::*;
use kiln_experiment_db::{
    EndStatus, Error, ExperimentDb, Goal, RunId, RunQuery, RunStatus, RunTracker,
};
use rstest::rstest;

fn count_points(store: &TempStore, run: RunId) -> i64 {
    store.raw().int(
        "SELECT COUNT(*) FROM metrics WHERE run_id = ?1",
        &[run.into()],
    )
}

// ---------------------------------------------------------------- background writer

/// With another connection holding the write lock, `log_metrics` still returns (a
/// synchronous write would wait for the lock, then fail at the busy timeout): the
/// calls all return while the lock is held, none of their points written yet, and
/// the points land once the lock is released.
#[rstest]
fn log_metrics_does_not_wait_for_the_disk(
    #[values(Engine::Sqlite, Engine::Postgres)] engine: Engine,
) {
    let Some((store, mut db)) = temp_store(engine) else {
        return;
    };
    let id = db.start_run(&new_run("e", "r")).unwrap();
    db.log_metrics(id, &losses(&[(0, 1.0)])).unwrap();
    db.flush().unwrap(); // the writer thread is up

    let mut blocker = store.raw();
    blocker.lock_writers();
    for step in 1..=20 {
        db.log_metrics(id, &losses(&[(step, 1.0 / step as f64)]))
            .unwrap();
    }
    // Still locked: the 20 calls returned without writing.
    assert_eq!(count_points(&store, id), 1);
    blocker.unlock_writers();
    db.flush().unwrap();
    assert_eq!(db.metric_history(id, "loss", "train").unwrap().len(), 21);
}

/// When the writer's queue is full, `log_metrics` blocks until there is room: no
/// batch is dropped. With the database locked, the logger gets at most one batch
/// past the queue's capacity (the one the writer holds), and no further until the
/// lock goes.
#[rstest]
fn a_full_queue_blocks_rather_than_drops(
    #[values(Engine::Sqlite, Engine::Postgres)] engine: Engine,
) {
    let Some((store, mut db)) = temp_store(engine) else {
        return;
    };
    let id = db.start_run(&new_run("e", "r")).unwrap();
    db.log_metrics(id, &[]).unwrap();
    db.flush().unwrap();
    let capacity = ExperimentDb::WRITER_QUEUE_BATCHES as u64;
    let batches = capacity + 10;

    let mut blocker = store.raw();
    blocker.lock_writers();
    let (done, progress) = std::sync::mpsc::channel();
    std::thread::scope(|scope| {
        let logger = scope.spawn(|| {
            for step in 0..batches {
                db.log_metrics(id, &losses(&[(step, step as f64)])).unwrap();
                done.send(step + 1).unwrap();
            }
        });
        // The logger fills the queue...
        let mut logged = 0;
        while logged < capacity {
            logged = progress.recv().unwrap();
        }
        // ... then makes no progress past the batch the writer holds while the lock
        // stays (a queue that did not block would finish all batches here).
        while let Ok(n) = progress.recv_timeout(Duration::from_millis(300)) {
            logged = n;
            assert!(
                logged <= capacity + 1,
                "{logged} batches queued behind a locked database: the queue did not block"
            );
        }
        assert!(!logger.is_finished());
        blocker.unlock_writers();
        logger.join().unwrap();
    });
    db.flush().unwrap();
    assert_eq!(count_points(&store, id), batches as i64);
}

/// Dropping the store writes what is still queued.
#[rstest]
fn drop_writes_queued_points(#[values(Engine::Sqlite, Engine::Postgres)] engine: Engine) {
    let Some((store, mut db)) = temp_store(engine) else {
        return;
    };
    let id = db.start_run(&new_run("e", "r")).unwrap();
    for batch in 0..50u64 {
        let points: Vec<(u64, f64)> = (0..20).map(|i| (batch * 20 + i, i as f64)).collect();
        db.log_metrics(id, &losses(&points)).unwrap();
    }
    drop(db);
    assert_eq!(count_points(&store, id), 1000);
    let db = store.open();
    let summary = db.metric_summary(id, "loss", "train").unwrap().unwrap();
    assert_eq!((summary.last_step, summary.last), (999, 19.0));
}

#[derive(Debug, Clone, Copy)]
enum ReportedBy {
    Flush,
    NextLog,
    Finish,
    Resume,
}

/// A batch the writer cannot write (its run was ended by another process) is reported,
/// once, by the next call that reports writer errors; it never panics, and the store
/// keeps working.
#[rstest]
#[case::flush(ReportedBy::Flush)]
#[case::next_log(ReportedBy::NextLog)]
#[case::finish(ReportedBy::Finish)]
#[case::resume(ReportedBy::Resume)]
fn writer_failures_are_reported_once(
    #[case] by: ReportedBy,
    #[values(Engine::Sqlite, Engine::Postgres)] engine: Engine,
) {
    let Some((store, mut db)) = temp_store(engine) else {
        return;
    };
    let id = db.start_run(&new_run("e", "r")).unwrap();
    db.log_metrics(id, &losses(&[(0, 1.0)])).unwrap();
    db.flush().unwrap();

    // Another process ends the run; this handle still believes it RUNNING.
    let mut other = store.open();
    other
        .finish_run(id, EndStatus::Killed, Some("SIGTERM"))
        .unwrap();
    // Two batches that will fail, queued while the writer is held up by a lock (so that
    // the second call cannot already report the first failure).
    let mut blocker = store.raw();
    blocker.lock_writers();
    db.log_metrics(id, &losses(&[(1, 0.5), (2, 0.25), (3, 0.125)]))
        .unwrap();
    db.log_metrics(id, &losses(&[(4, 0.1)])).unwrap();
    blocker.unlock_writers();

    let err = match by {
        ReportedBy::Flush => db.flush().unwrap_err(),
        ReportedBy::NextLog => {
            db.run(id).unwrap(); // waits for the writer, reports nothing
            db.log_metrics(id, &losses(&[(5, 0.1)])).unwrap_err()
        }
        ReportedBy::Finish => db.finish_run(id, EndStatus::Finished, None).unwrap_err(),
        ReportedBy::Resume => db.resume_run(id, 0).unwrap_err(),
    };
    match &err {
        Error::WriteFailed {
            batches,
            points,
            first,
        } => {
            assert_eq!((*batches, *points), (2, 4), "{err}");
            assert!(
                matches!(**first, Error::Invalid(ref m) if m.contains("KILLED")),
                "{err}"
            );
        }
        other => panic!("expected WriteFailed, got {other:?}"),
    }
    assert!(err.to_string().contains("2 batch(es)"), "{err}");
    // Reported once.
    db.flush().unwrap();
    assert_eq!(
        count_points(&store, id),
        1,
        "the failed batches wrote nothing"
    );
    let run = db.run(id).unwrap();
    assert_eq!(run.status, RunStatus::Killed);
    assert_eq!(run.failure_reason.as_deref(), Some("SIGTERM"));
    // The store still works.
    let next = db.start_run(&new_run("e", "next")).unwrap();
    db.log_metrics(next, &losses(&[(0, 1.0)])).unwrap();
    db.finish_run(next, EndStatus::Finished, None).unwrap();
    assert_eq!(count_points(&store, next), 1);
}

/// A failure still pending when the store is dropped is logged, not a panic.
#[rstest]
fn dropping_with_a_pending_failure_does_not_panic(
    #[values(Engine::Sqlite, Engine::Postgres)] engine: Engine,
) {
    let Some((store, mut db)) = temp_store(engine) else {
        return;
    };
    let id = db.start_run(&new_run("e", "r")).unwrap();
    db.log_metrics(id, &[]).unwrap();
    store
        .open()
        .finish_run(id, EndStatus::Failed, Some("x"))
        .unwrap();
    db.log_metrics(id, &losses(&[(1, 0.5)])).unwrap();
    drop(db);
    assert_eq!(count_points(&store, id), 0);
}

// ---------------------------------------------------------------- stale runs

#[derive(Debug, Clone, Copy)]
enum Stored {
    Running,
    Finished,
}

/// A RUNNING run whose heartbeat (or start, without one) is older than the threshold
/// reads LOST, without the row being rewritten.
#[rstest]
#[case::fresh(Stored::Running, Some(10.0), 0.0, 300, RunStatus::Running)]
#[case::stale_heartbeat(Stored::Running, Some(600.0), 900.0, 300, RunStatus::Lost)]
#[case::no_heartbeat_old_start(Stored::Running, None, 600.0, 300, RunStatus::Lost)]
#[case::no_heartbeat_recent_start(Stored::Running, None, 10.0, 300, RunStatus::Running)]
#[case::longer_threshold(Stored::Running, Some(600.0), 900.0, 3600, RunStatus::Running)]
#[case::ended_runs_never_lost(Stored::Finished, Some(9000.0), 9000.0, 300, RunStatus::Finished)]
fn stale_runs_read_lost(
    #[case] stored: Stored,
    #[case] heartbeat_age: Option<f64>,
    #[case] start_age: f64,
    #[case] stale_after_s: u64,
    #[case] expected: RunStatus,
    #[values(Engine::Sqlite, Engine::Postgres)] engine: Engine,
) {
    let Some((store, mut db)) = temp_store(engine) else {
        return;
    };
    assert_eq!(db.stale_after(), ExperimentDb::DEFAULT_STALE_AFTER);
    assert_eq!(ExperimentDb::DEFAULT_STALE_AFTER, Duration::from_secs(300));
    db.set_stale_after(Duration::from_secs(stale_after_s));
    let id = db.start_run(&new_run("e", "r")).unwrap();
    let fresh = db.start_run(&new_run("e", "fresh")).unwrap();
    if let Stored::Finished = stored {
        db.finish_run(id, EndStatus::Finished, None).unwrap();
    }
    let now = now();
    store.raw().execute(
        "UPDATE runs SET heartbeat_at = ?2, started_at = ?3 WHERE id = ?1",
        &[
            id.into(),
            heartbeat_age.map(|a| now - a).into(),
            (now - start_age).into(),
        ],
    );
    let stored_row = || {
        store.raw().query(
            "SELECT status, heartbeat_at FROM runs WHERE id = ?1",
            &[id.into()],
        )
    };
    let before = stored_row();

    assert_eq!(db.run(id).unwrap().status, expected);
    let listed = db.list_runs(Some("e")).unwrap();
    let of = |id| listed.iter().find(|r| r.id == id).unwrap().status;
    assert_eq!(of(id), expected);
    assert_eq!(of(fresh), RunStatus::Running);
    let with_status = |status| {
        db.query_runs(&RunQuery::new().status(status))
            .unwrap()
            .iter()
            .map(|r| r.id)
            .collect::<Vec<_>>()
    };
    assert!(with_status(expected).contains(&id));
    let lost = with_status(RunStatus::Lost);
    assert_eq!(lost.contains(&id), expected == RunStatus::Lost);
    assert!(!lost.contains(&fresh));
    assert_eq!(stored_row(), before, "reading does not rewrite the row");
}

/// The writer beats for the run whenever it commits a batch: a LOST run that logs
/// again reads RUNNING.
#[rstest]
fn the_writer_refreshes_the_heartbeat(#[values(Engine::Sqlite, Engine::Postgres)] engine: Engine) {
    let Some((store, mut db)) = temp_store(engine) else {
        return;
    };
    let id = db.start_run(&new_run("e", "r")).unwrap();
    store.raw().execute(
        "UPDATE runs SET heartbeat_at = ?2 WHERE id = ?1",
        &[id.into(), (now() - 3600.0).into()],
    );
    assert_eq!(db.run(id).unwrap().status, RunStatus::Lost);
    let before = now();
    db.log_metrics(id, &losses(&[(0, 1.0)])).unwrap();
    db.flush().unwrap();
    let run = db.run(id).unwrap();
    assert_eq!(run.status, RunStatus::Running);
    assert!(run.heartbeat_at.unwrap() >= before - 1.0);
    // An explicit heartbeat too, once the last one is stale.
    store.raw().execute(
        "UPDATE runs SET heartbeat_at = ?2 WHERE id = ?1",
        &[id.into(), (now() - 3600.0).into()],
    );
    assert_eq!(db.run(id).unwrap().status, RunStatus::Lost);
    db.heartbeat(id).unwrap();
    assert_eq!(db.run(id).unwrap().status, RunStatus::Running);
}

// ---------------------------------------------------------------- resume

/// Attempt 1 logs steps 0..=20 and dies; attempt 2 resumes from step 10: the points of
/// attempt 1 after step 10 are hidden (not deleted) and the summaries recomputed.
#[rstest]
fn resume_hides_later_points_of_earlier_attempts(
    #[values(Engine::Sqlite, Engine::Postgres)] engine: Engine,
) {
    let Some((store, mut db)) = temp_store(engine) else {
        return;
    };
    let id = db.start_run(&new_run("e", "r")).unwrap();
    // Attempt 1: the loss falls to 0.1 at step 18, then diverges.
    let attempt1: Vec<(u64, f64)> = (0..=20)
        .map(|s| match s {
            18 => (s, 0.1),
            19 => (s, f64::NAN),
            20 => (s, 100.0),
            _ => (s, 10.0 - s as f64 * 0.5),
        })
        .collect();
    db.log_metrics(id, &losses(&attempt1)).unwrap();
    db.log_metrics(id, &[point("acc", "valid", 15, 0.9)])
        .unwrap();
    db.flush().unwrap();
    assert_eq!(
        db.best_run("e", "loss", "train", Goal::Min)
            .unwrap()
            .unwrap()
            .id,
        id
    );

    // The process died; a new one resumes from the checkpoint at step 10.
    drop(db);
    let mut db = store.open();
    assert_eq!(db.resume_run(id, 10).unwrap(), 2);
    let run = db.run(id).unwrap();
    assert_eq!(run.attempt, 2);
    assert_eq!(run.status, RunStatus::Running);
    assert_eq!(run.ended_at, None);

    let visible = &attempt1[..=10];
    assert!(same_points(
        &db.metric_history(id, "loss", "train").unwrap(),
        visible
    ));
    let summary = db.metric_summary(id, "loss", "train").unwrap().unwrap();
    assert!(
        same_summary(&summary, &scan(visible).unwrap()),
        "{summary:?}"
    );
    assert_eq!(summary.min, Some((10, 5.0)));
    assert_eq!(
        db.metric_summary(id, "acc", "valid").unwrap(),
        None,
        "a series left without visible points has no summary"
    );

    // Attempt 2 writes steps 11..=15.
    let attempt2: Vec<(u64, f64)> = (11..=15).map(|s| (s, 4.0 - (s - 10) as f64)).collect();
    db.log_metrics(id, &losses(&attempt2)).unwrap();
    db.finish_run(id, EndStatus::Finished, None).unwrap();
    let expected: Vec<(u64, f64)> = [visible, &attempt2[..]].concat();
    assert!(same_points(
        &db.metric_history(id, "loss", "train").unwrap(),
        &expected
    ));
    let summary = db.metric_summary(id, "loss", "train").unwrap().unwrap();
    assert!(same_summary(&summary, &scan(&expected).unwrap()));

    // Nothing was deleted: the hidden points are flagged.
    let all = db.metric_points(id, true).unwrap();
    assert_eq!(all.len(), 21 + 1 + 5);
    let hidden: Vec<(String, u64, u32)> = all
        .iter()
        .filter(|p| p.hidden)
        .map(|p| (p.key.clone(), p.step, p.attempt))
        .collect();
    let mut expected_hidden: Vec<(String, u64, u32)> = vec![("acc".into(), 15, 1)];
    expected_hidden.extend((11..=20).map(|s| ("loss".to_string(), s, 1)));
    assert_eq!(hidden, expected_hidden);
    assert_eq!(db.metric_points(id, false).unwrap().len(), 11 + 5);
    assert!(
        db.metric_points(id, false)
            .unwrap()
            .iter()
            .filter(|p| p.step > 10)
            .all(|p| p.attempt == 2)
    );
}

/// Any run can be resumed; the resume records the status and reason it replaced.
#[rstest]
#[case::crashed(None, RunStatus::Running, None)]
#[case::failed(
    Some(EndStatus::Failed),
    RunStatus::Failed,
    Some("non-finite loss at step 7")
)]
#[case::killed(Some(EndStatus::Killed), RunStatus::Killed, Some("SIGTERM"))]
#[case::finished(Some(EndStatus::Finished), RunStatus::Finished, None)]
fn resume_starts_a_new_attempt(
    #[case] end: Option<EndStatus>,
    #[case] previous: RunStatus,
    #[case] reason: Option<&str>,
    #[values(Engine::Sqlite, Engine::Postgres)] engine: Engine,
) {
    let Some((_store, mut db)) = temp_store(engine) else {
        return;
    };
    let id = db.start_run(&new_run("e", "r")).unwrap();
    db.log_metrics(id, &losses(&[(0, 3.0), (5, 2.0), (9, 1.0)]))
        .unwrap();
    if let Some(end) = end {
        db.finish_run(id, end, reason).unwrap();
    }
    assert!(db.resumes(id).unwrap().is_empty());
    let before = now();
    assert_eq!(RunTracker::resume_run(&mut db, id, 5).unwrap(), 2);
    let run = db.run(id).unwrap();
    assert_eq!(
        (
            run.status,
            run.attempt,
            run.ended_at,
            run.failure_reason.as_deref()
        ),
        (RunStatus::Running, 2, None, None)
    );
    assert!(run.heartbeat_at.unwrap() >= before - 1.0);
    let resumes = db.resumes(id).unwrap();
    assert_eq!(resumes.len(), 1);
    assert_eq!(resumes[0].attempt, 2);
    assert_eq!(resumes[0].from_step, 5);
    assert_eq!(resumes[0].previous_status, previous);
    assert_eq!(resumes[0].previous_reason.as_deref(), reason);
    // The new attempt logs and ends like any run.
    db.log_metrics(id, &losses(&[(6, 0.5)])).unwrap();
    db.finish_run(id, EndStatus::Finished, None).unwrap();
    assert_eq!(
        db.metric_history(id, "loss", "train").unwrap(),
        vec![(0, 3.0), (5, 2.0), (6, 0.5)]
    );
}

#[rstest]
fn resume_errors(#[values(Engine::Sqlite, Engine::Postgres)] engine: Engine) {
    let Some((_store, mut db)) = temp_store(engine) else {
        return;
    };
    let err = db.resume_run(42, 0).unwrap_err();
    assert!(
        matches!(err, Error::NotFound(ref m) if m == "run 42"),
        "{err}"
    );
    let id = db.start_run(&new_run("e", "r")).unwrap();
    let err = db.resume_run(id, u64::MAX).unwrap_err();
    assert!(matches!(err, Error::Invalid(_)), "{err}");
    assert_eq!(db.run(id).unwrap().attempt, 1);
}

/// Chained resumes: a point is hidden by any later attempt that resumed before its
/// step.
#[rstest]
fn chained_resumes_keep_one_lineage(#[values(Engine::Sqlite, Engine::Postgres)] engine: Engine) {
    let Some((_store, mut db)) = temp_store(engine) else {
        return;
    };
    let id = db.start_run(&new_run("e", "r")).unwrap();
    let a1: Vec<(u64, f64)> = (0..=30).map(|s| (s, 100.0 - s as f64)).collect();
    db.log_metrics(id, &losses(&a1)).unwrap();
    assert_eq!(db.resume_run(id, 20).unwrap(), 2);
    let a2: Vec<(u64, f64)> = (21..=25).map(|s| (s, 50.0 - s as f64)).collect();
    db.log_metrics(id, &losses(&a2)).unwrap();
    assert_eq!(db.resume_run(id, 10).unwrap(), 3);
    let a3: Vec<(u64, f64)> = (11..=12).map(|s| (s, 200.0 + s as f64)).collect();
    db.log_metrics(id, &losses(&a3)).unwrap();
    let expected: Vec<(u64, f64)> = [&a1[..=10], &a3[..]].concat();
    assert!(same_points(
        &db.metric_history(id, "loss", "train").unwrap(),
        &expected
    ));
    let summary = db.metric_summary(id, "loss", "train").unwrap().unwrap();
    assert!(same_summary(&summary, &scan(&expected).unwrap()));
    assert_eq!(
        db.resumes(id)
            .unwrap()
            .iter()
            .map(|r| (r.attempt, r.from_step))
            .collect::<Vec<_>>(),
        vec![(2, 20), (3, 10)]
    );
}

/// Property: for many random sequences of batches and resumes, the stored summary
/// equals a full scan of the visible points, and the history is exactly the visible
/// points.
#[rstest]
fn summaries_equal_a_full_scan_under_random_resumes(
    #[values(Engine::Sqlite, Engine::Postgres)] engine: Engine,
) {
    let Some((_store, mut db)) = temp_store(engine) else {
        return;
    };
    let mut rng = XorShift(0x2545_F491_4F6C_DD1D);
    for case in 0..150 {
        let id = db
            .start_run(&new_run("prop", &format!("case-{case}")))
            .unwrap();
        // (attempt, step, value) in write order, and (attempt, from_step) of resumes.
        let mut written: Vec<(u32, u64, f64)> = Vec::new();
        let mut resumes: Vec<(u32, u64)> = Vec::new();
        let mut attempt = 1;
        for _ in 0..(1 + rng.below(8)) {
            if !written.is_empty() && rng.below(4) == 0 {
                let from = rng.below(60);
                attempt = db.resume_run(id, from).unwrap();
                resumes.push((attempt, from));
            }
            let batch: Vec<(u64, f64)> = (0..rng.below(25))
                .map(|_| {
                    let r = rng.next();
                    let value = match r % 40 {
                        0 => f64::NAN,
                        1 => f64::INFINITY,
                        2 => f64::NEG_INFINITY,
                        _ => ((r >> 8) % 200) as f64 / 10.0 - 10.0,
                    };
                    ((r >> 24) % 80, value)
                })
                .collect();
            db.log_metrics(id, &losses(&batch)).unwrap();
            written.extend(batch.iter().map(|&(s, v)| (attempt, s, v)));
        }
        let visible: Vec<(u64, f64)> = written
            .iter()
            .filter(|&&(a, s, _)| !resumes.iter().any(|&(b, from)| b > a && from < s))
            .map(|&(_, s, v)| (s, v))
            .collect();
        let summary = db.metric_summary(id, "loss", "train").unwrap();
        match (&summary, scan(&visible)) {
            (None, None) => {}
            (Some(stored), Some(scanned)) => assert!(
                same_summary(stored, &scanned),
                "case {case}: {stored:?} != scan {scanned:?}"
            ),
            (stored, scanned) => panic!("case {case}: {stored:?} != scan {scanned:?}"),
        }
        let mut by_step = visible.clone();
        by_step.sort_by_key(|&(s, _)| s); // stable: write order within a step
        assert!(
            same_points(&db.metric_history(id, "loss", "train").unwrap(), &by_step),
            "case {case}"
        );
    }
}

// ---------------------------------------------------------------- a dropped connection

/// The server drops every connection of the store (a restart, a failover, an idle
/// timeout): the handle's reads, its writes and its background writer reconnect and
/// go on, losing nothing.
#[test]
fn connections_dropped_by_the_server_are_made_again() {
    let Some((store, mut db)) = temp_store(Engine::Postgres) else {
        return;
    };
    let id = db.start_run(&new_run("e", "r")).unwrap();
    db.log_metrics(id, &losses(&[(0, 1.0)])).unwrap();
    db.flush().unwrap();
    let terminated = store.raw().int(
        "SELECT COUNT(pg_terminate_backend(pid)) FROM pg_stat_activity
            WHERE datname = current_database() AND pid <> pg_backend_pid()",
        &[],
    );
    assert_eq!(terminated, 2, "the handle's connection and its writer's");
    db.log_metrics(id, &losses(&[(1, 0.5)])).unwrap();
    db.flush().unwrap();
    assert_eq!(
        db.metric_history(id, "loss", "train").unwrap(),
        vec![(0, 1.0), (1, 0.5)]
    );
    store.raw().int(
        "SELECT COUNT(pg_terminate_backend(pid)) FROM pg_stat_activity
            WHERE datname = current_database() AND pid <> pg_backend_pid()",
        &[],
    );
    db.finish_run(id, EndStatus::Finished, None).unwrap();
    assert_eq!(db.run(id).unwrap().status, RunStatus::Finished);
}

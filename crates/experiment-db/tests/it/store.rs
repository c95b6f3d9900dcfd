//! The experiment store on real stores of both engines: SQLite files and databases
//! on a real PostgreSQL server.

use crate::common::{Engine, TempStore, Val, point, same_points, same_summary, scan, temp_store};
use kiln_experiment_db::{
    EndStatus, Error, ExperimentDb, Goal, MetricPoint, MetricSummaryRecord, NewArtifact, NewRun,
    RunId, RunStatus, RunTracker, StoreLocation,
};
use rstest::rstest;

fn new_run(experiment: &str, name: &str) -> NewRun {
    NewRun {
        experiment: experiment.into(),
        name: name.into(),
        config: serde_json::json!({
            "task": {"kind": "lm", "seq_len": 64},
            "coordinator": {"lr": 3e-4, "batch_size": 8, "strategy": "single"},
            "plan": [1, 2, 3],
            "unicode": "é ✓",
        }),
        params: vec![
            ("lr".into(), "0.0003".into()),
            ("batch_size".into(), "8".into()),
        ],
        kiln_version: "0.1.0".into(),
        git_commit: Some("0123abcd".into()),
        host: "node-1".into(),
    }
}

// ---------------------------------------------------------------- schema

#[rstest]
fn migrations_apply_once_and_reopen_is_idempotent(
    #[values(Engine::Sqlite, Engine::Postgres)] engine: Engine,
) {
    let Some((store, mut db)) = temp_store(engine) else {
        return;
    };
    let latest = ExperimentDb::latest_schema_version();
    assert!(latest >= 1);
    assert_eq!(db.schema_version().unwrap(), latest);
    let run = db.start_run(&new_run("e", "r")).unwrap();
    drop(db);

    let applied = || {
        store.raw().query(
            "SELECT version, applied_at FROM schema_migrations ORDER BY version",
            &[],
        )
    };
    let first = applied();
    assert_eq!(
        first.iter().map(|r| r[0].clone()).collect::<Vec<_>>(),
        (1..=latest).map(Val::Int).collect::<Vec<_>>()
    );

    for _ in 0..3 {
        let db = store.open();
        assert_eq!(db.schema_version().unwrap(), latest);
        assert_eq!(db.run(run).unwrap().name, "r", "data survives reopening");
    }
    assert_eq!(applied(), first, "no migration re-ran");
}

#[test]
fn open_sets_wal() {
    let Some((store, _db)) = temp_store(Engine::Sqlite) else {
        unreachable!("SQLite needs nothing");
    };
    let mode = store.raw().query("PRAGMA journal_mode", &[]);
    assert_eq!(mode, vec![vec![Val::Text("wal".into())]]);
}

#[rstest]
fn a_database_from_a_newer_kiln_is_refused(
    #[values(Engine::Sqlite, Engine::Postgres)] engine: Engine,
) {
    let Some((store, db)) = temp_store(engine) else {
        return;
    };
    drop(db);
    store.raw().execute(
        "INSERT INTO schema_migrations (version, applied_at) VALUES (9999, 0)",
        &[],
    );
    let err = ExperimentDb::open_location(&store.location).unwrap_err();
    assert!(
        matches!(err, Error::Invalid(ref m) if m.contains("9999") && m.contains("newer kiln")),
        "{err}"
    );
}

#[test]
fn a_missing_directory_is_an_error_not_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let err = ExperimentDb::open(dir.path().join("no/such/dir/kiln.sqlite")).unwrap_err();
    assert!(matches!(err, Error::Sqlite(_)), "{err}");
}

/// Any change to the schema must update `tests/schema.snapshot.sql`. To regenerate it:
/// `KILN_UPDATE_SNAPSHOTS=1 cargo test -p kiln-experiment-db --test it store::schema_snapshot`.
#[test]
fn schema_snapshot() {
    let Some((store, db)) = temp_store(Engine::Sqlite) else {
        unreachable!("SQLite needs nothing");
    };
    drop(db);
    let statements: Vec<String> = store
        .raw()
        .query(
            "SELECT sql FROM sqlite_master WHERE sql IS NOT NULL ORDER BY name",
            &[],
        )
        .into_iter()
        .map(|row| match &row[0] {
            Val::Text(sql) => sql.clone(),
            other => panic!("{other:?}"),
        })
        .collect();
    let actual: String = statements.iter().map(|s| format!("{s};\n\n")).collect();
    // Read at run time first: cargo may reuse a binary built in another checkout.
    let snapshot = std::path::PathBuf::from(
        std::env::var_os("CARGO_MANIFEST_DIR").unwrap_or_else(|| env!("CARGO_MANIFEST_DIR").into()),
    )
    .join("tests/schema.snapshot.sql");
    if std::env::var_os("KILN_UPDATE_SNAPSHOTS").is_some() {
        std::fs::write(&snapshot, &actual).unwrap();
    }
    let expected = std::fs::read_to_string(&snapshot)
        .unwrap_or_else(|e| panic!("{}: {e}", snapshot.display()))
        .replace("\r\n", "\n");
    assert!(
        actual == expected,
        "the schema differs from {}: a schema change needs a new migration and an \
         updated snapshot (KILN_UPDATE_SNAPSHOTS=1).\n--- actual ---\n{actual}",
        snapshot.display()
    );
}

/// PostgreSQL's schema has SQLite's tables and columns, in the same order.
#[test]
fn both_engines_have_the_same_tables_and_columns() {
    let columns = |engine: Engine| {
        let (store, _db) = temp_store(engine)?;
        let sql = match engine {
            Engine::Sqlite => {
                "SELECT m.name, p.name FROM sqlite_master m, pragma_table_info(m.name) p
                    WHERE m.type = 'table' AND m.name <> 'sqlite_sequence'
                    ORDER BY m.name, p.cid"
            }
            Engine::Postgres => {
                "SELECT table_name::text, column_name::text FROM information_schema.columns
                    WHERE table_schema = current_schema()
                    ORDER BY table_name, ordinal_position"
            }
        };
        Some(store.raw().query(sql, &[]))
    };
    let Some(postgres) = columns(Engine::Postgres) else {
        return;
    };
    let sqlite = columns(Engine::Sqlite).unwrap();
    assert!(sqlite.len() > 40, "{sqlite:?}");
    assert_eq!(postgres, sqlite);
}

// ---------------------------------------------------------------- runs

#[rstest]
fn start_run_round_trips_everything(#[values(Engine::Sqlite, Engine::Postgres)] engine: Engine) {
    let Some((_store, mut db)) = temp_store(engine) else {
        return;
    };
    let new = new_run("lm", "first");
    let before = now();
    let id = db.start_run(&new).unwrap();
    let run = db.run(id).unwrap();
    assert_eq!(run.id, id);
    assert_eq!(run.experiment, "lm");
    assert_eq!(run.name, "first");
    assert_eq!(run.status, RunStatus::Running);
    assert_eq!(run.config, new.config);
    assert_eq!(run.kiln_version, "0.1.0");
    assert_eq!(run.git_commit.as_deref(), Some("0123abcd"));
    assert_eq!(run.host, "node-1");
    assert!(run.started_at >= before - 1.0 && run.started_at <= now() + 1.0);
    assert_eq!(run.ended_at, None);
    assert_eq!(run.heartbeat_at, Some(run.started_at));
    assert_eq!(run.attempt, 1);
    assert_eq!(run.failure_reason, None);
    assert_eq!(
        db.params(id).unwrap(),
        vec![
            ("batch_size".to_string(), "8".to_string()),
            ("lr".to_string(), "0.0003".to_string())
        ]
    );

    let mut bare = new_run("lm", "second");
    bare.git_commit = None;
    bare.params.clear();
    bare.config = serde_json::Value::Null;
    let id2 = db.start_run(&bare).unwrap();
    let run2 = db.run(id2).unwrap();
    assert_eq!(run2.git_commit, None);
    assert_eq!(run2.config, serde_json::Value::Null);
    assert!(db.params(id2).unwrap().is_empty());
}

#[rstest]
#[case::finished(EndStatus::Finished, None, RunStatus::Finished)]
#[case::failed(
    EndStatus::Failed,
    Some("non-finite loss at step 12"),
    RunStatus::Failed
)]
#[case::killed(EndStatus::Killed, Some("SIGTERM"), RunStatus::Killed)]
fn run_lifecycle(
    #[case] end: EndStatus,
    #[case] reason: Option<&str>,
    #[case] expected: RunStatus,
    #[values(Engine::Sqlite, Engine::Postgres)] engine: Engine,
) {
    let Some((store, mut db)) = temp_store(engine) else {
        return;
    };
    let id = db.start_run(&new_run("e", "r")).unwrap();
    assert_eq!(db.run(id).unwrap().status, RunStatus::Running);
    db.log_metrics(id, &[point("loss", "train", 0, 2.0)])
        .unwrap();

    db.finish_run(id, end, reason).unwrap();
    let run = db.run(id).unwrap();
    assert_eq!(run.status, expected);
    assert_eq!(run.status.as_str(), end.as_str());
    assert_eq!(run.failure_reason.as_deref(), reason);
    let ended = run.ended_at.expect("ended_at is set");
    assert!(ended >= run.started_at);

    // An ended run takes no more points and cannot end twice.
    let err = db
        .log_metrics(id, &[point("loss", "train", 1, 1.0)])
        .unwrap_err();
    assert!(matches!(err, Error::Invalid(_)), "{err}");
    let err = db.finish_run(id, EndStatus::Finished, None).unwrap_err();
    assert!(matches!(err, Error::Invalid(_)), "{err}");
    // The heartbeat of an ended run changes nothing.
    db.heartbeat(id).unwrap();
    assert_eq!(db.run(id).unwrap(), run);

    // It is all on disk.
    drop(db);
    assert_eq!(store.open().run(id).unwrap(), run);
}

#[rstest]
fn heartbeat_updates_heartbeat_at(#[values(Engine::Sqlite, Engine::Postgres)] engine: Engine) {
    let Some((store, mut db)) = temp_store(engine) else {
        return;
    };
    let id = db.start_run(&new_run("e", "r")).unwrap();
    // The last beat an hour ago, so that a new one is later whatever the clock's
    // resolution.
    let first = db.run(id).unwrap().heartbeat_at.unwrap() - 3600.0;
    store.raw().execute(
        "UPDATE runs SET heartbeat_at = ?2 WHERE id = ?1",
        &[id.into(), first.into()],
    );
    db.heartbeat(id).unwrap();
    let second = db.run(id).unwrap().heartbeat_at.unwrap();
    assert!(second > first + 3000.0, "{second} > {first}");
    assert!(matches!(db.heartbeat(id + 1000), Err(Error::NotFound(_))));
}

#[rstest]
fn duplicate_run_name_is_refused_by_name(
    #[values(Engine::Sqlite, Engine::Postgres)] engine: Engine,
) {
    let Some((_store, mut db)) = temp_store(engine) else {
        return;
    };
    let first = db.start_run(&new_run("e", "baseline")).unwrap();
    let err = db.start_run(&new_run("e", "baseline")).unwrap_err();
    match &err {
        Error::Invalid(msg) => {
            assert!(
                msg.contains("\"baseline\"") && msg.contains("\"e\""),
                "{msg}"
            );
            assert!(msg.contains(&format!("run {first}")), "{msg}");
        }
        other => panic!("expected Invalid, got {other:?}"),
    }
    // The same name in another experiment is another run.
    db.start_run(&new_run("other", "baseline")).unwrap();
    assert_eq!(db.list_runs(None).unwrap().len(), 2);
}

#[rstest]
#[case::empty_experiment("", "r")]
#[case::empty_name("e", "")]
fn empty_names_are_refused(
    #[case] experiment: &str,
    #[case] name: &str,
    #[values(Engine::Sqlite, Engine::Postgres)] engine: Engine,
) {
    let Some((_store, mut db)) = temp_store(engine) else {
        return;
    };
    let err = db.start_run(&new_run(experiment, name)).unwrap_err();
    assert!(matches!(err, Error::Invalid(_)), "{err}");
    assert!(db.list_runs(None).unwrap().is_empty());
}

#[rstest]
fn a_param_given_twice_stores_no_run(#[values(Engine::Sqlite, Engine::Postgres)] engine: Engine) {
    let Some((_store, mut db)) = temp_store(engine) else {
        return;
    };
    let mut new = new_run("e", "r");
    new.params.push(("lr".into(), "0.1".into()));
    let err = db.start_run(&new).unwrap_err();
    assert!(
        matches!(err, Error::Invalid(ref m) if m.contains("\"lr\"")),
        "{err}"
    );
    assert!(
        db.list_runs(None).unwrap().is_empty(),
        "the transaction was rolled back"
    );
}

#[rstest]
fn log_params_adds_and_refuses_changes(#[values(Engine::Sqlite, Engine::Postgres)] engine: Engine) {
    let Some((_store, mut db)) = temp_store(engine) else {
        return;
    };
    let id = db.start_run(&new_run("e", "r")).unwrap();
    db.log_params(
        id,
        &[("seed".into(), "7".into()), ("lr".into(), "0.0003".into())],
    )
    .unwrap();
    let err = db
        .log_params(id, &[("lr".into(), "0.1".into())])
        .unwrap_err();
    assert!(matches!(err, Error::Invalid(_)), "{err}");
    assert_eq!(
        db.params(id).unwrap(),
        vec![
            ("batch_size".to_string(), "8".to_string()),
            ("lr".to_string(), "0.0003".to_string()),
            ("seed".to_string(), "7".to_string()),
        ]
    );
}

#[rstest]
fn list_runs_orders_by_start_and_filters_by_experiment(
    #[values(Engine::Sqlite, Engine::Postgres)] engine: Engine,
) {
    let Some((_store, mut db)) = temp_store(engine) else {
        return;
    };
    let a1 = db.start_run(&new_run("a", "1")).unwrap();
    let b1 = db.start_run(&new_run("b", "1")).unwrap();
    let a2 = db.start_run(&new_run("a", "2")).unwrap();
    let ids =
        |runs: Vec<kiln_experiment_db::RunRecord>| runs.iter().map(|r| r.id).collect::<Vec<_>>();
    assert_eq!(ids(db.list_runs(None).unwrap()), vec![a1, b1, a2]);
    assert_eq!(ids(db.list_runs(Some("a")).unwrap()), vec![a1, a2]);
    assert_eq!(ids(db.list_runs(Some("b")).unwrap()), vec![b1]);
    let err = db.list_runs(Some("nope")).unwrap_err();
    assert!(
        matches!(err, Error::NotFound(ref m) if m.contains("nope")),
        "{err}"
    );
}

#[rstest]
fn missing_runs_are_not_found(#[values(Engine::Sqlite, Engine::Postgres)] engine: Engine) {
    let Some((_store, mut db)) = temp_store(engine) else {
        return;
    };
    let missing: RunId = 42;
    let not_found = |r: Result<(), Error>| {
        let err = r.unwrap_err();
        assert!(
            matches!(err, Error::NotFound(ref m) if m == "run 42"),
            "{err}"
        );
        assert_eq!(err.to_string(), "experiment store: run 42 not found");
    };
    not_found(db.run(missing).map(|_| ()));
    not_found(db.params(missing).map(|_| ()));
    not_found(db.tags(missing).map(|_| ()));
    not_found(db.artifacts(missing).map(|_| ()));
    not_found(db.metric_history(missing, "loss", "train").map(|_| ()));
    not_found(db.metric_summary(missing, "loss", "train").map(|_| ()));
    not_found(db.metric_summaries(missing).map(|_| ()));
    not_found(db.finish_run(missing, EndStatus::Finished, None));
    not_found(db.heartbeat(missing));
    not_found(db.set_tag(missing, "k", "v"));
    not_found(db.log_params(missing, &[]));
}

/// Foreign keys: a metric for a missing run is refused and nothing is stored.
#[rstest]
fn a_metric_for_a_missing_run_is_refused(
    #[values(Engine::Sqlite, Engine::Postgres)] engine: Engine,
) {
    let Some((store, mut db)) = temp_store(engine) else {
        return;
    };
    let id = db.start_run(&new_run("e", "r")).unwrap();
    let err = db
        .log_metrics(id + 1, &[point("loss", "train", 0, 1.0)])
        .unwrap_err();
    assert!(matches!(err, Error::NotFound(_)), "{err}");
    let count = store.raw().int("SELECT COUNT(*) FROM metrics", &[]);
    assert_eq!(count, 0);
}

// ---------------------------------------------------------------- metrics

#[rstest]
fn metric_history_is_ordered_by_step_and_keeps_non_finite_values(
    #[values(Engine::Sqlite, Engine::Postgres)] engine: Engine,
) {
    let Some((_store, mut db)) = temp_store(engine) else {
        return;
    };
    let id = db.start_run(&new_run("e", "r")).unwrap();
    db.log_metrics(
        id,
        &[
            point("loss", "train", 2, 1.5),
            point("loss", "train", 0, 3.0),
            point("loss", "valid", 1, 9.0),
            point("acc", "train", 1, 0.5),
        ],
    )
    .unwrap();
    db.log_metrics(
        id,
        &[
            point("loss", "train", 1, f64::NAN),
            point("loss", "train", 3, f64::INFINITY),
        ],
    )
    .unwrap();
    db.log_metrics(id, &[]).unwrap();

    let history = db.metric_history(id, "loss", "train").unwrap();
    let steps: Vec<u64> = history.iter().map(|(s, _)| *s).collect();
    assert_eq!(steps, vec![0, 1, 2, 3]);
    assert_eq!(history[0].1, 3.0);
    assert!(history[1].1.is_nan());
    assert_eq!(history[2].1, 1.5);
    assert_eq!(history[3].1, f64::INFINITY);
    assert_eq!(
        db.metric_history(id, "loss", "valid").unwrap(),
        vec![(1, 9.0)]
    );
    assert!(db.metric_history(id, "nope", "train").unwrap().is_empty());
}

#[rstest]
fn a_non_finite_wall_time_stores_nothing(
    #[values(Engine::Sqlite, Engine::Postgres)] engine: Engine,
) {
    let Some((_store, mut db)) = temp_store(engine) else {
        return;
    };
    let id = db.start_run(&new_run("e", "r")).unwrap();
    let mut bad = point("loss", "train", 1, 1.0);
    bad.wall_time = f64::NAN;
    let err = db
        .log_metrics(id, &[point("loss", "train", 0, 1.0), bad])
        .unwrap_err();
    assert!(matches!(err, Error::Invalid(_)), "{err}");
    assert!(db.metric_history(id, "loss", "train").unwrap().is_empty());
}

type Batches = Vec<Vec<(u64, f64)>>;

#[rstest]
#[case::descending(vec![vec![(0, 5.0), (1, 4.0)], vec![(2, 3.0), (3, 3.5)], vec![(4, 2.0)]],
    2.0, 4, Some((4, 2.0)), Some((0, 5.0)))]
#[case::min_in_the_middle(vec![vec![(0, 5.0), (10, 1.0)], vec![(20, 2.0)], vec![(30, 7.0), (40, 6.0)]],
    6.0, 40, Some((10, 1.0)), Some((30, 7.0)))]
#[case::non_finite_ignored_for_extremes(
    vec![vec![(0, 2.0), (1, f64::NEG_INFINITY)], vec![(2, f64::INFINITY), (3, 1.0)], vec![(4, f64::NAN)]],
    f64::NAN, 4, Some((3, 1.0)), Some((0, 2.0)))]
#[case::only_non_finite(vec![vec![(0, f64::NAN)], vec![(1, f64::INFINITY)]],
    f64::INFINITY, 1, None, None)]
#[case::ties_keep_the_first(vec![vec![(0, 1.0), (1, 3.0)], vec![(2, 1.0), (3, 3.0)], vec![(4, 2.0)]],
    2.0, 4, Some((0, 1.0)), Some((1, 3.0)))]
#[case::last_is_the_highest_step(vec![vec![(5, 1.0)], vec![(3, 0.5)], vec![(5, 2.0), (4, 9.0)]],
    2.0, 5, Some((3, 0.5)), Some((4, 9.0)))]
#[case::negative_values(vec![vec![(0, -1.0), (1, -3.0)], vec![(2, 0.0)]],
    0.0, 2, Some((1, -3.0)), Some((2, 0.0)))]
fn summaries_after_several_batches(
    #[case] batches: Batches,
    #[case] last: f64,
    #[case] last_step: u64,
    #[case] min: Option<(u64, f64)>,
    #[case] max: Option<(u64, f64)>,
    #[values(Engine::Sqlite, Engine::Postgres)] engine: Engine,
) {
    let Some((_store, mut db)) = temp_store(engine) else {
        return;
    };
    let id = db.start_run(&new_run("e", "r")).unwrap();
    assert_eq!(db.metric_summary(id, "loss", "train").unwrap(), None);
    for batch in &batches {
        let points: Vec<MetricPoint> = batch
            .iter()
            .map(|&(step, value)| point("loss", "train", step, value))
            .collect();
        db.log_metrics(id, &points).unwrap();
    }
    // Another series of the same run does not interfere.
    db.log_metrics(
        id,
        &[
            point("loss", "valid", 0, -100.0),
            point("acc", "train", 99, 100.0),
        ],
    )
    .unwrap();

    let summary = db.metric_summary(id, "loss", "train").unwrap().unwrap();
    let expected = MetricSummaryRecord {
        key: "loss".into(),
        split: "train".into(),
        last,
        last_step,
        min,
        max,
    };
    assert!(
        same_summary(&summary, &expected),
        "{summary:?} != {expected:?}"
    );
    let all: Vec<(u64, f64)> = batches.concat();
    let scanned = scan(&all).unwrap();
    assert!(
        same_summary(&summary, &scanned),
        "{summary:?} != scan {scanned:?}"
    );

    let keys: Vec<(String, String)> = db
        .metric_summaries(id)
        .unwrap()
        .into_iter()
        .map(|s| (s.key, s.split))
        .collect();
    assert_eq!(
        keys,
        vec![
            ("acc".to_string(), "train".to_string()),
            ("loss".to_string(), "train".to_string()),
            ("loss".to_string(), "valid".to_string()),
        ]
    );
}

/// A pseudo-random stream of points in many batches gives the summary a full scan gives.
#[rstest]
fn summaries_equal_a_full_scan_of_many_points(
    #[values(Engine::Sqlite, Engine::Postgres)] engine: Engine,
) {
    let Some((_store, mut db)) = temp_store(engine) else {
        return;
    };
    let id = db.start_run(&new_run("e", "r")).unwrap();
    let mut state: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let mut all = Vec::new();
    // Batches of several sizes: a batch goes in multi-row INSERTs of 256, 128, ... rows.
    for size in [50, 1, 300, 7, 513, 50, 2, 129, 50, 50] {
        let batch: Vec<(u64, f64)> = (0..size)
            .map(|_| {
                let r = next();
                let value = match r % 50 {
                    0 => f64::NAN,
                    1 => f64::INFINITY,
                    2 => f64::NEG_INFINITY,
                    _ => ((r >> 8) % 1000) as f64 / 100.0 - 5.0,
                };
                ((r >> 20) % 400, value)
            })
            .collect();
        let points: Vec<MetricPoint> = batch
            .iter()
            .map(|&(s, v)| point("loss", "train", s, v))
            .collect();
        db.log_metrics(id, &points).unwrap();
        all.extend(batch);
    }
    let summary = db.metric_summary(id, "loss", "train").unwrap().unwrap();
    let scanned = scan(&all).unwrap();
    assert!(
        same_summary(&summary, &scanned),
        "{summary:?} != scan {scanned:?}"
    );
    // Every point, by step, those of one step in the order written.
    let mut expected = all.clone();
    expected.sort_by_key(|&(step, _)| step);
    assert!(same_points(
        &db.metric_history(id, "loss", "train").unwrap(),
        &expected
    ));
}

// ---------------------------------------------------------------- best run

#[rstest]
#[case::min(Goal::Min, "b")]
#[case::max(Goal::Max, "c")]
fn best_run_uses_the_summaries(
    #[case] goal: Goal,
    #[case] expected: &str,
    #[values(Engine::Sqlite, Engine::Postgres)] engine: Engine,
) {
    let Some((_store, mut db)) = temp_store(engine) else {
        return;
    };
    let series: [(&str, &[f64]); 4] = [
        ("a", &[3.0, 2.0, 2.5]),
        ("b", &[4.0, 0.5, f64::NAN]),
        ("c", &[1.0, 9.0, f64::NEG_INFINITY]),
        ("d", &[f64::NAN, f64::INFINITY]),
    ];
    for (name, values) in series {
        let id = db.start_run(&new_run("e", name)).unwrap();
        let points: Vec<MetricPoint> = values
            .iter()
            .enumerate()
            .map(|(i, &v)| point("loss", "valid", i as u64, v))
            .collect();
        db.log_metrics(id, &points).unwrap();
    }
    // Better values elsewhere do not count: another split, another key, another experiment.
    let other = db.start_run(&new_run("e", "other-series")).unwrap();
    db.log_metrics(
        other,
        &[
            point("loss", "train", 0, -50.0),
            point("loss", "train", 1, 50.0),
            point("acc", "valid", 0, -50.0),
            point("acc", "valid", 1, 50.0),
        ],
    )
    .unwrap();
    let elsewhere = db.start_run(&new_run("f", "x")).unwrap();
    db.log_metrics(
        elsewhere,
        &[
            point("loss", "valid", 0, -50.0),
            point("loss", "valid", 1, 50.0),
        ],
    )
    .unwrap();

    let best = db.best_run("e", "loss", "valid", goal).unwrap().unwrap();
    assert_eq!(best.name, expected);
    assert_eq!(best.experiment, "e");
}

#[rstest]
#[case::min(Goal::Min, 1.0)]
#[case::max(Goal::Max, 9.0)]
fn best_run_ties_go_to_the_lowest_id(
    #[case] goal: Goal,
    #[case] best: f64,
    #[values(Engine::Sqlite, Engine::Postgres)] engine: Engine,
) {
    let Some((_store, mut db)) = temp_store(engine) else {
        return;
    };
    let mut ids = Vec::new();
    for name in ["x", "y", "z"] {
        let id = db.start_run(&new_run("e", name)).unwrap();
        ids.push(id);
    }
    // y and z reach the best value, x does not; z first in time.
    db.log_metrics(ids[2], &[point("m", "valid", 0, best)])
        .unwrap();
    db.log_metrics(
        ids[1],
        &[point("m", "valid", 5, best), point("m", "valid", 6, 5.0)],
    )
    .unwrap();
    db.log_metrics(ids[0], &[point("m", "valid", 0, 5.0)])
        .unwrap();
    let found = db.best_run("e", "m", "valid", goal).unwrap().unwrap();
    assert_eq!(found.id, ids[1]);
    assert!(ids[1] < ids[2]);
}

#[rstest]
fn best_run_without_data_or_experiment(#[values(Engine::Sqlite, Engine::Postgres)] engine: Engine) {
    let Some((_store, mut db)) = temp_store(engine) else {
        return;
    };
    let id = db.start_run(&new_run("e", "r")).unwrap();
    assert_eq!(db.best_run("e", "loss", "valid", Goal::Min).unwrap(), None);
    db.log_metrics(id, &[point("loss", "valid", 0, f64::NAN)])
        .unwrap();
    assert_eq!(db.best_run("e", "loss", "valid", Goal::Min).unwrap(), None);
    assert_eq!(db.best_run("e", "loss", "valid", Goal::Max).unwrap(), None);
    let err = db.best_run("nope", "loss", "valid", Goal::Min).unwrap_err();
    assert!(matches!(err, Error::NotFound(_)), "{err}");
}

#[rstest]
fn best_run_counts_ended_runs(#[values(Engine::Sqlite, Engine::Postgres)] engine: Engine) {
    let Some((_store, mut db)) = temp_store(engine) else {
        return;
    };
    let failed = db.start_run(&new_run("e", "failed")).unwrap();
    db.log_metrics(failed, &[point("loss", "valid", 0, 0.1)])
        .unwrap();
    db.finish_run(failed, EndStatus::Failed, Some("diverged"))
        .unwrap();
    let ok = db.start_run(&new_run("e", "ok")).unwrap();
    db.log_metrics(ok, &[point("loss", "valid", 0, 0.2)])
        .unwrap();
    db.finish_run(ok, EndStatus::Finished, None).unwrap();
    assert_eq!(
        db.best_run("e", "loss", "valid", Goal::Min)
            .unwrap()
            .unwrap()
            .id,
        failed
    );
}

// ---------------------------------------------------------------- tags, artifacts

#[rstest]
fn tags_round_trip_and_replace(#[values(Engine::Sqlite, Engine::Postgres)] engine: Engine) {
    let Some((_store, mut db)) = temp_store(engine) else {
        return;
    };
    let id = db.start_run(&new_run("e", "r")).unwrap();
    db.set_tag(id, "note", "first").unwrap();
    db.set_tag(id, "gpu", "h200").unwrap();
    db.set_tag(id, "note", "second").unwrap();
    assert_eq!(
        db.tags(id).unwrap(),
        vec![
            ("gpu".to_string(), "h200".to_string()),
            ("note".to_string(), "second".to_string())
        ]
    );
}

#[rstest]
fn artifacts_round_trip(#[values(Engine::Sqlite, Engine::Postgres)] engine: Engine) {
    let Some((_store, mut db)) = temp_store(engine) else {
        return;
    };
    let id = db.start_run(&new_run("e", "r")).unwrap();
    let checkpoint = NewArtifact {
        kind: "checkpoint".into(),
        path: "checkpoints/step-100.mpk".into(),
        size_bytes: 123_456_789,
        sha256: Some("ab".repeat(32)),
    };
    let plot = NewArtifact {
        kind: "plot".into(),
        path: "plots/loss.svg".into(),
        size_bytes: 0,
        sha256: None,
    };
    let a = db.log_artifact(id, &checkpoint).unwrap();
    let b = db.log_artifact(id, &plot).unwrap();
    let stored = db.artifacts(id).unwrap();
    assert_eq!(stored.len(), 2);
    for (record, (artifact_id, new)) in stored.iter().zip([(a, &checkpoint), (b, &plot)]) {
        assert_eq!(record.id, artifact_id);
        assert_eq!(record.run, id);
        assert_eq!(record.kind, new.kind);
        assert_eq!(record.path, new.path);
        assert_eq!(record.size_bytes, new.size_bytes);
        assert_eq!(record.sha256, new.sha256);
        assert!(record.created_at > 0.0);
    }
}

#[rstest]
#[case::absolute("/tmp/x.mpk")]
#[case::empty("")]
fn artifact_paths_must_be_relative(
    #[case] path: &str,
    #[values(Engine::Sqlite, Engine::Postgres)] engine: Engine,
) {
    let Some((_store, mut db)) = temp_store(engine) else {
        return;
    };
    let id = db.start_run(&new_run("e", "r")).unwrap();
    let artifact = NewArtifact {
        kind: "checkpoint".into(),
        path: path.into(),
        size_bytes: 1,
        sha256: None,
    };
    let err = db.log_artifact(id, &artifact).unwrap_err();
    assert!(matches!(err, Error::Invalid(_)), "{err}");
    assert!(db.artifacts(id).unwrap().is_empty());
}

fn now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

/// A store left at schema version 1 by an older kiln is upgraded when it opens, its
/// data intact and usable by the features of the new migrations.
#[rstest]
fn a_version_1_database_is_upgraded(#[values(Engine::Sqlite, Engine::Postgres)] engine: Engine) {
    let Some(store) = TempStore::new(engine) else {
        return;
    };
    let (create, initial) = match engine {
        Engine::Sqlite => (
            "CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY, applied_at REAL NOT NULL)",
            include_str!("../../migrations/0001_initial.sql"),
        ),
        Engine::Postgres => (
            "CREATE TABLE schema_migrations (version BIGINT PRIMARY KEY, applied_at DOUBLE PRECISION NOT NULL)",
            include_str!("../../migrations/postgres/0001_initial.sql"),
        ),
    };
    {
        let mut raw = store.raw();
        for sql in [
            create,
            "INSERT INTO schema_migrations VALUES (1, 0)",
            initial,
            "INSERT INTO experiments (id, name, created_at) VALUES (1, 'old', 0)",
            "INSERT INTO runs (id, experiment_id, name, status, config_json, kiln_version,
                 host, started_at, heartbeat_at)
                 VALUES (7, 1, 'r', 'FAILED', '{}', '0.0.1', 'h', 0, 0)",
            "INSERT INTO metrics (run_id, key, split, step, epoch, value, wall_time)
                 VALUES (7, 'loss', 'train', 0, 0, 2.0, 0), (7, 'loss', 'train', 5, 0, 1.0, 0)",
            "INSERT INTO metric_summaries VALUES (7, 'loss', 'train', 1.0, 5, 1.0, 5, 2.0, 0)",
        ] {
            raw.batch(sql);
        }
    }
    let mut db = store.open();
    assert_eq!(
        db.schema_version().unwrap(),
        ExperimentDb::latest_schema_version()
    );
    assert_eq!(db.run(7).unwrap().status, RunStatus::Failed);
    assert_eq!(db.resume_run(7, 2).unwrap(), 2);
    assert_eq!(
        db.metric_history(7, "loss", "train").unwrap(),
        vec![(0, 2.0)]
    );
    let summary = db.metric_summary(7, "loss", "train").unwrap().unwrap();
    assert_eq!((summary.last_step, summary.min), (0, Some((0, 2.0))));
}

// ---------------------------------------------------------------- PostgreSQL's bad input

/// A server that cannot be reached is named, with what to check; never a panic.
#[rstest]
#[case::refused("postgres://kiln@127.0.0.1:1/kiln")]
#[case::no_socket("postgres://kiln@/kiln?host=/nonexistent/kiln-socket-dir")]
fn an_unreachable_server_is_named(#[case] url: &str) {
    let err = ExperimentDb::open_location(&url.parse().unwrap()).unwrap_err();
    assert!(matches!(err, Error::Unreachable { .. }), "{err:?}");
    let text = err.to_string();
    assert!(
        text.contains("cannot connect to postgres://kiln@")
            && text.contains("is the server running"),
        "{text}"
    );
}

/// A malformed URL is refused when parsed, naming what is wrong.
#[rstest]
#[case::port("postgres://kiln@host:port/db", "invalid port")]
#[case::option(
    "postgres://kiln@host/db?frobnicate=1",
    "unknown option \"frobnicate\""
)]
fn a_malformed_url_is_named(#[case] url: &str, #[case] why: &str) {
    let err = url.parse::<StoreLocation>().unwrap_err().to_string();
    assert!(
        err.contains("malformed PostgreSQL URL") && err.contains(why),
        "{err}"
    );
}

/// A wrong password is named as such, and the password is not shown.
#[test]
fn a_wrong_password_is_named() {
    let Some(store) = TempStore::new(Engine::Postgres) else {
        return;
    };
    store.raw().batch(
        "DO $$ BEGIN CREATE ROLE kiln_test_pw LOGIN PASSWORD 'right';
            EXCEPTION WHEN duplicate_object THEN NULL; END $$",
    );
    let url = store.location_arg();
    let Some((scheme, rest)) = url.split_once("://") else {
        panic!("{url}")
    };
    let rest = rest.split_once('@').map_or(rest, |(_, host)| host);
    let wrong: StoreLocation = format!("{scheme}://kiln_test_pw:s3cret-wrong@{rest}")
        .parse()
        .unwrap();
    match ExperimentDb::open_location(&wrong) {
        Err(err) => {
            let text = err.to_string();
            assert!(matches!(err, Error::Unreachable { .. }), "{err:?}");
            assert!(text.contains("password authentication failed"), "{text}");
            assert!(
                text.contains("wrong password") && !text.contains("s3cret"),
                "{text}"
            );
        }
        Ok(_) => {
            assert!(
                std::env::var_os("CI").is_none(),
                "CI's server must check passwords (.ci/run writes its pg_hba.conf)"
            );
            eprintln!(
                "skipped: the test server trusts every login (pg_hba.conf), so a wrong password cannot be tried"
            );
        }
    }
}

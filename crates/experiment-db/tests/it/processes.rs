//! Several processes on one store, and a writer process killed with SIGKILL, on both
//! engines.
//!
//! The child processes are this test binary run again: `processes::child_process_entry` does
//! nothing unless `KILN_EDB_CHILD` names a role, so no extra binary is needed.

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::*;
use kiln_experiment_db::{EndStatus, ExperimentDb, RunStatus, RunTracker, StoreLocation};
use rstest::rstest;

const ROLE: &str = "KILN_EDB_CHILD";
const DB: &str = "KILN_EDB_PATH";
const NAME: &str = "KILN_EDB_NAME";
const GO: &str = "KILN_EDB_GO";

const WRITERS: usize = 4;
const POINTS_PER_WRITER: u64 = 5_000;
const CONCURRENT_BATCH: u64 = 10;
const CRASH_BATCH: u64 = 100;

/// Starts this test binary again as a child in `role`.
fn spawn_child(role: &str, env: &[(&str, &str)], name: &str) -> Child {
    let mut command = Command::new(std::env::current_exe().unwrap());
    command
        .args([
            "processes::child_process_entry",
            "--exact",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(ROLE, role)
        .env(NAME, name)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (key, value) in env {
        command.env(key, value);
    }
    command.spawn().unwrap()
}

/// The child's side: a no-op in a normal test run.
#[test]
fn child_process_entry() {
    let Ok(role) = std::env::var(ROLE) else {
        return;
    };
    let location: StoreLocation = std::env::var(DB).unwrap().parse().unwrap();
    let name = std::env::var(NAME).unwrap();
    match role.as_str() {
        "concurrent" => {
            concurrent_writer(&location, &name, Path::new(&std::env::var_os(GO).unwrap()));
        }
        "crash" => crashing_writer(&location, &name),
        other => panic!("unknown child role {other}"),
    }
}

/// Writes `POINTS_PER_WRITER` points in small batches, through the background writer,
/// as soon as the parent says go.
fn concurrent_writer(location: &StoreLocation, name: &str, go: &Path) {
    let mut db = ExperimentDb::open_location(location).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !go.exists() {
        assert!(Instant::now() < deadline, "never told to go");
        std::thread::sleep(Duration::from_millis(1));
    }
    let run = db.start_run(&new_run("concurrency", name)).unwrap();
    for first in (0..POINTS_PER_WRITER).step_by(CONCURRENT_BATCH as usize) {
        let batch: Vec<(u64, f64)> = (first..first + CONCURRENT_BATCH)
            .map(|s| (s, s as f64))
            .collect();
        db.log_metrics(run, &losses(&batch)).unwrap();
    }
    db.finish_run(run, EndStatus::Finished, None).unwrap();
}

/// Writes batches of `CRASH_BATCH` points until killed, printing `committed N` once the
/// N-th batch is committed.
fn crashing_writer(location: &StoreLocation, name: &str) {
    let mut db = ExperimentDb::open_location(location).unwrap();
    let run = db.start_run(&new_run("crash", name)).unwrap();
    let mut out = std::io::stdout();
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut batch = 0;
    while Instant::now() < deadline {
        let points: Vec<(u64, f64)> = (batch * CRASH_BATCH..(batch + 1) * CRASH_BATCH)
            .map(|s| (s, 1.0 / (s + 1) as f64))
            .collect();
        db.log_metrics(run, &losses(&points)).unwrap();
        db.flush().unwrap();
        batch += 1;
        writeln!(out, "committed {batch}").unwrap();
        out.flush().unwrap();
    }
}

/// Four processes write 5,000 points each into one store at once: all 20,000 are
/// there, and no "database is locked" (or lock timeout) reaches any of them.
#[rstest]
fn four_processes_write_to_one_store(#[values(Engine::Sqlite, Engine::Postgres)] engine: Engine) {
    let Some(store) = TempStore::new(engine) else {
        return;
    };
    drop(store.open()); // created and migrated once
    let go = store.dir.path().join("go");
    let (location, go_arg) = (store.location_arg(), go.display().to_string());
    let children: Vec<Child> = (0..WRITERS)
        .map(|i| {
            spawn_child(
                "concurrent",
                &[(DB, &location), (GO, &go_arg)],
                &format!("writer-{i}"),
            )
        })
        .collect();
    std::fs::write(&go, b"go").unwrap();
    for child in children {
        let output = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            !stderr.contains("database is locked")
                && !stderr.contains("busy")
                && !stderr.contains("lock timeout"),
            "{stderr}"
        );
        assert!(output.status.success(), "child failed: {stderr}");
    }

    let db = store.open();
    let runs = db.list_runs(Some("concurrency")).unwrap();
    assert_eq!(runs.len(), WRITERS);
    let total = store.raw().int("SELECT COUNT(*) FROM metrics", &[]);
    assert_eq!(total, (WRITERS as u64 * POINTS_PER_WRITER) as i64);
    for run in runs {
        assert_eq!(run.status, RunStatus::Finished, "{}", run.name);
        let history = db.metric_history(run.id, "loss", "train").unwrap();
        let expected: Vec<(u64, f64)> = (0..POINTS_PER_WRITER).map(|s| (s, s as f64)).collect();
        assert_eq!(history, expected, "{}", run.name);
        let summary = db.metric_summary(run.id, "loss", "train").unwrap().unwrap();
        let last = POINTS_PER_WRITER - 1;
        assert_eq!(
            (summary.last_step, summary.min, summary.max),
            (last, Some((0, 0.0)), Some((last, last as f64)))
        );
    }
}

/// A writer killed with SIGKILL in the middle of writing leaves a store that holds
/// every batch committed before the kill, each batch whole (and a SQLite file that
/// passes `PRAGMA integrity_check`).
#[rstest]
fn a_writer_killed_mid_write_loses_no_committed_batch(
    #[values(Engine::Sqlite, Engine::Postgres)] engine: Engine,
) {
    let Some(store) = TempStore::new(engine) else {
        return;
    };
    let mut child = spawn_child("crash", &[(DB, &store.location_arg())], "victim");
    let stdout = child.stdout.take().unwrap();
    let mut lines = BufReader::new(stdout).lines();
    // libtest may print "test child_process_entry ... " before the child's first line.
    let committed_count = |line: &str| -> Option<u64> {
        let (_, n) = line.split_once("committed ")?;
        n.trim().parse().ok()
    };
    let mut committed = 0;
    for line in lines.by_ref() {
        if let Some(n) = committed_count(&line.unwrap()) {
            committed = n;
            if n >= 25 {
                break;
            }
        }
    }
    child.kill().unwrap(); // SIGKILL
    // Lines printed before the kill still count: each follows a commit.
    for line in lines {
        if let Some(n) = line.ok().as_deref().and_then(committed_count) {
            committed = n;
        }
    }
    let status = child.wait().unwrap();
    #[cfg(unix)]
    {
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(
            status.signal(),
            Some(9),
            "the child died of SIGKILL: {status}"
        );
    }
    #[cfg(not(unix))]
    assert!(!status.success());
    assert!(committed >= 25, "the child committed {committed} batches");

    let mut conn = store.raw();
    if engine == Engine::Sqlite {
        let check = conn.query("PRAGMA integrity_check", &[]);
        assert_eq!(check, vec![vec![Val::Text("ok".into())]]);
    }
    let steps: Vec<u64> = conn
        .query("SELECT step FROM metrics ORDER BY step", &[])
        .into_iter()
        .map(|row| match row[0] {
            Val::Int(step) => step as u64,
            ref other => panic!("{other:?}"),
        })
        .collect();
    let stored = steps.len() as u64;
    assert!(
        stored >= committed * CRASH_BATCH,
        "{stored} points stored, {committed} batches of {CRASH_BATCH} were committed"
    );
    assert_eq!(stored % CRASH_BATCH, 0, "a batch was written in part");
    assert_eq!(
        steps,
        (0..stored).collect::<Vec<_>>(),
        "batches in order, whole"
    );

    // The store opens and reads it; the run, never ended, reads RUNNING then LOST.
    let mut db = store.open();
    let run = db.list_runs(Some("crash")).unwrap().remove(0);
    assert_eq!(run.status, RunStatus::Running);
    let summary = db.metric_summary(run.id, "loss", "train").unwrap().unwrap();
    assert_eq!(
        summary.last_step,
        stored - 1,
        "summaries committed with points"
    );
    db.set_stale_after(Duration::ZERO);
    assert_eq!(db.run(run.id).unwrap().status, RunStatus::Lost);
}

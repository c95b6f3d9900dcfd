//! Helpers shared by the integration tests: real database files in temporary
//! directories, runs, points, and the reference summary computed by a full scan.

use std::path::{Path, PathBuf};

use kiln_experiment_db::{ExperimentDb, MetricPoint, MetricSummaryRecord, NewRun};
use tempfile::TempDir;

pub fn temp_db() -> (TempDir, PathBuf, ExperimentDb) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kiln.sqlite");
    let db = ExperimentDb::open(&path).unwrap();
    (dir, path, db)
}

pub fn new_run(experiment: &str, name: &str) -> NewRun {
    NewRun {
        experiment: experiment.into(),
        name: name.into(),
        config: serde_json::json!({"task": {"kind": "lm"}}),
        params: vec![],
        kiln_version: "0.1.0".into(),
        git_commit: None,
        host: "node-1".into(),
    }
}

pub fn with_params(mut run: NewRun, params: &[(&str, &str)]) -> NewRun {
    run.params = params
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    run
}

pub fn point(key: &str, split: &str, step: u64, value: f64) -> MetricPoint {
    MetricPoint {
        key: key.into(),
        split: split.into(),
        step,
        epoch: step / 10,
        value,
        wall_time: 1_700_000_000.0 + step as f64,
    }
}

/// `loss`/`train` points at the given `(step, value)`s.
pub fn losses(points: &[(u64, f64)]) -> Vec<MetricPoint> {
    points
        .iter()
        .map(|&(step, value)| point("loss", "train", step, value))
        .collect()
}

pub fn raw(path: &Path) -> rusqlite::Connection {
    rusqlite::Connection::open(path).unwrap()
}

pub fn now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

/// What a `loss`/`train` summary must be, computed by scanning every point in write
/// order.
pub fn scan(points: &[(u64, f64)]) -> Option<MetricSummaryRecord> {
    let (mut last_step, mut last) = *points.first()?;
    let mut min: Option<(u64, f64)> = None;
    let mut max: Option<(u64, f64)> = None;
    for &(step, value) in points {
        if step >= last_step {
            (last_step, last) = (step, value);
        }
        if value.is_finite() {
            if min.is_none_or(|(_, m)| value < m) {
                min = Some((step, value));
            }
            if max.is_none_or(|(_, m)| value > m) {
                max = Some((step, value));
            }
        }
    }
    Some(MetricSummaryRecord {
        key: "loss".into(),
        split: "train".into(),
        last,
        last_step,
        min,
        max,
    })
}

pub fn same_summary(a: &MetricSummaryRecord, b: &MetricSummaryRecord) -> bool {
    let same = |x: f64, y: f64| x == y || (x.is_nan() && y.is_nan());
    a.key == b.key
        && a.split == b.split
        && same(a.last, b.last)
        && a.last_step == b.last_step
        && a.min == b.min
        && a.max == b.max
}

pub fn same_points(a: &[(u64, f64)], b: &[(u64, f64)]) -> bool {
    a.len() == b.len()
        && a.iter()
            .zip(b)
            .all(|(x, y)| x.0 == y.0 && (x.1 == y.1 || (x.1.is_nan() && y.1.is_nan())))
}

/// A seeded xorshift64 generator.
pub struct XorShift(pub u64);

impl XorShift {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// A number in `0..n`.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

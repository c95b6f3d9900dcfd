//! Metrics on their way to the report and to the experiment store.

use std::collections::BTreeMap;

use kiln_core::MetricSummary;
use std::path::Path;
use std::time::Instant;

use kiln_experiment_db::{
    EndStatus, HEARTBEAT_INTERVAL, MetricPoint, NewArtifact, NewRun, Pulse, RunId, RunTracker,
};
use sha2::{Digest, Sha256};

use crate::run_dir::unix_now;
use crate::{CoordinatorError, Result};

/// Keeps each metric's last and best value for the report and forwards points to
/// the run tracker, when there is one.
pub(crate) struct Metrics<'t> {
    tracker: Option<(&'t mut dyn RunTracker, RunId)>,
    last_beat: Instant,
    summaries: BTreeMap<String, MetricSummary>,
    pending: Vec<MetricPoint>,
}

impl<'t> Metrics<'t> {
    pub fn start(tracker: Option<&'t mut dyn RunTracker>, run: &NewRun) -> Result<Self> {
        let tracker = match tracker {
            Some(t) => {
                let id = t.start_run(run)?;
                Some((t, id))
            }
            None => None,
        };
        Ok(Self {
            tracker,
            last_beat: Instant::now(),
            summaries: BTreeMap::new(),
            pending: Vec::new(),
        })
    }

    /// Summaries only, recorded nowhere (the books of a worker other than rank 0).
    pub fn detached() -> Self {
        Self {
            tracker: None,
            last_beat: Instant::now(),
            summaries: BTreeMap::new(),
            pending: Vec::new(),
        }
    }

    /// Continues a run from a checkpoint taken at `step`: a new attempt in the store
    /// (when the run was recorded and a store is given), summaries restored.
    /// Returns the attempt number the store gave.
    pub fn resume(
        tracker: Option<&'t mut dyn RunTracker>,
        run_id: Option<RunId>,
        step: u64,
        summaries: BTreeMap<String, MetricSummary>,
    ) -> Result<(Self, Option<u32>)> {
        let (tracker, attempt) = match (tracker, run_id) {
            (Some(t), Some(id)) => {
                let attempt = t.resume_run(id, step)?;
                (Some((t, id)), Some(attempt))
            }
            (Some(_), None) => {
                tracing::warn!(
                    "the checkpoint's run was not recorded in an experiment store: \
                     this attempt is not recorded either"
                );
                (None, None)
            }
            (None, _) => (None, None),
        };
        Ok((
            Self {
                tracker,
                last_beat: Instant::now(),
                summaries,
                pending: Vec::new(),
            },
            attempt,
        ))
    }

    /// Heartbeats of the run that another thread can send (see [`Pulse`]).
    pub fn pulse(&mut self) -> Option<Pulse> {
        self.tracker.as_mut().and_then(|(t, id)| t.pulse(*id))
    }

    pub fn run_id(&self) -> Option<RunId> {
        self.tracker.as_ref().map(|(_, id)| *id)
    }

    /// Records one value; it reaches the store at the next [`flush`](Self::flush).
    pub fn record(&mut self, split: &str, key: &str, step: u64, epoch: usize, value: f64) {
        let higher_is_better = kiln_core::higher_is_better(key);
        let entry = self
            .summaries
            .entry(format!("{split}/{key}"))
            .or_insert(MetricSummary {
                last: value,
                best: value,
                best_step: step,
            });
        entry.last = value;
        let better = if higher_is_better {
            value > entry.best
        } else {
            value < entry.best
        };
        if better || !entry.best.is_finite() {
            entry.best = value;
            entry.best_step = step;
        }
        if self.tracker.is_some() {
            self.pending.push(MetricPoint {
                key: key.to_string(),
                split: split.to_string(),
                step,
                epoch: epoch as u64,
                value,
                wall_time: unix_now(),
            });
        }
    }

    /// Sends a heartbeat when [`HEARTBEAT_INTERVAL`] has passed since the last one, so
    /// a run that logs rarely (or validates for long) never reads LOST while alive.
    pub fn heartbeat(&mut self) -> Result<()> {
        if self.last_beat.elapsed() < HEARTBEAT_INTERVAL {
            return Ok(());
        }
        self.last_beat = Instant::now();
        if let Some((tracker, id)) = self.tracker.as_mut() {
            tracker.heartbeat(*id)?;
        }
        Ok(())
    }

    pub fn flush(&mut self) -> Result<()> {
        if let Some((tracker, id)) = self.tracker.as_mut()
            && !self.pending.is_empty()
        {
            tracker.log_metrics(*id, &self.pending)?;
            self.pending.clear();
        }
        Ok(())
    }

    pub fn finish(&mut self, status: EndStatus, reason: Option<&str>) -> Result<()> {
        self.flush()?;
        if let Some((tracker, id)) = self.tracker.as_mut() {
            tracker.finish_run(*id, status, reason)?;
        }
        Ok(())
    }

    /// Records `rel` (a file under `run_dir`, or a checkpoint directory, hashed by its
    /// manifest) as an artifact of `kind` in the store, when there is one.
    pub fn artifact(&mut self, run_dir: &Path, kind: &str, rel: &str) -> Result<()> {
        let Some((tracker, id)) = self.tracker.as_mut() else {
            return Ok(());
        };
        let path = run_dir.join(rel);
        let hashed = if path.is_dir() {
            path.join("manifest.json")
        } else {
            path.clone()
        };
        let (hashed_len, sha256) =
            sha256_of_file(&hashed).map_err(|e| CoordinatorError::io(&hashed, e))?;
        let size_bytes = if path.is_dir() {
            std::fs::read_dir(&path)
                .map_err(|e| CoordinatorError::io(&path, e))?
                .filter_map(|e| e.ok()?.metadata().ok())
                .map(|m| m.len())
                .sum()
        } else {
            hashed_len
        };
        let artifact = NewArtifact {
            kind: kind.into(),
            path: rel.into(),
            size_bytes,
            sha256: Some(sha256),
        };
        tracker.log_artifact(*id, &artifact)?;
        Ok(())
    }

    pub fn summaries(&self) -> &BTreeMap<String, MetricSummary> {
        &self.summaries
    }
}

/// The length and the sha256 (hex) of the file at `path`, read in pieces of 1 MiB:
/// an artifact of any size is hashed in constant memory.
fn sha256_of_file(path: &Path) -> std::io::Result<(u64, String)> {
    use std::io::Read;
    let mut file = std::fs::File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buffer = vec![0u8; 1 << 20];
    let mut len = 0u64;
    loop {
        match file.read(&mut buffer) {
            Ok(0) => break,
            Ok(n) => {
                hasher.update(&buffer[..n]);
                len += n as u64;
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    let hex = hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    Ok((len, hex))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rstest::rstest;

    /// Streamed in pieces, the hash is the one of the whole file (3 MiB + 5 bytes:
    /// pieces and a short last one).
    #[test]
    fn a_file_is_hashed_in_pieces_as_a_whole() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("weights.bin");
        let bytes: Vec<u8> = (0..(3 << 20) + 5).map(|i: u32| (i % 251) as u8).collect();
        std::fs::write(&path, &bytes).unwrap();
        let whole: String = Sha256::digest(&bytes)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(sha256_of_file(&path).unwrap(), (bytes.len() as u64, whole));
    }

    /// A summary's best is the largest value of a metric where larger is better
    /// (throughput, accuracies, scores), the smallest otherwise.
    #[rstest]
    #[case::throughput("train", "items_per_s", 9.0)]
    #[case::accuracy("valid", "accuracy", 9.0)]
    #[case::f1("valid", "f1", 9.0)]
    #[case::loss("valid", "loss", 5.0)]
    #[case::error_rate("valid", "wer", 5.0)]
    fn the_best_value_follows_the_metric(
        #[case] split: &str,
        #[case] key: &str,
        #[case] best: f64,
    ) {
        let mut metrics = Metrics::detached();
        for (step, value) in [(1, 7.0), (2, 9.0), (3, 5.0), (4, 8.0)] {
            metrics.record(split, key, step, 0, value);
        }
        let summary = &metrics.summaries()[&format!("{split}/{key}")];
        assert_eq!(summary.best, best);
        assert_eq!(summary.last, 8.0);
    }
}

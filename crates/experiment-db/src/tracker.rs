//! [`RunTracker`]: the narrow interface through which a training loop records a run.
//!
//! The coordinator talks to this trait only and issues no SQL; [`crate::ExperimentDb`]
//! implements it, and so can any other store.

use serde::{Deserialize, Serialize};

use crate::Result;

/// How often a training loop should call [`RunTracker::heartbeat`]: well inside the
/// store's default staleness threshold of five minutes.
pub const HEARTBEAT_INTERVAL: std::time::Duration = std::time::Duration::from_secs(30);

/// A run's id in the store.
pub type RunId = i64;

/// An artifact to record for a run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NewArtifact {
    /// Kind: `checkpoint`, `plot`, `config`, ...
    pub kind: String,
    /// Path relative to the run directory.
    pub path: String,
    /// Size in bytes.
    pub size_bytes: u64,
    /// SHA-256 of the content as lowercase hex, when computed.
    pub sha256: Option<String>,
}

/// What is known of a run when it starts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NewRun {
    /// Experiment the run belongs to (created on first use).
    pub experiment: String,
    /// Run name, unique within its experiment.
    pub name: String,
    /// The whole configuration as JSON (task spec, coordinator configuration, plan).
    pub config: serde_json::Value,
    /// Flat parameters worth querying by (`lr`, `batch_size`, `strategy`, ...).
    pub params: Vec<(String, String)>,
    /// kiln's version.
    pub kiln_version: String,
    /// Git commit of the code, when known.
    pub git_commit: Option<String>,
    /// Host name.
    pub host: String,
}

/// One metric value at one step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MetricPoint {
    /// Metric name, e.g. `loss`.
    pub key: String,
    /// `train` or `valid`.
    pub split: String,
    /// Optimizer step the value belongs to.
    pub step: u64,
    /// Epoch (0-based) the value belongs to.
    pub epoch: u64,
    /// The value (finite or not: a diverged loss is recorded as it was).
    pub value: f64,
    /// Seconds since the Unix epoch when the value was measured.
    pub wall_time: f64,
}

/// How a run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum EndStatus {
    /// Trained to the end.
    Finished,
    /// Stopped by an error.
    Failed,
    /// Stopped by the user.
    Killed,
}

impl EndStatus {
    /// The status as stored: `FINISHED`, `FAILED` or `KILLED`.
    pub fn as_str(self) -> &'static str {
        match self {
            EndStatus::Finished => "FINISHED",
            EndStatus::Failed => "FAILED",
            EndStatus::Killed => "KILLED",
        }
    }
}

/// Heartbeats of one run that any thread can send: for waits that block the
/// training thread (a multi-node exchange may wait minutes for a slow node), so
/// that a live run never reads LOST. Made by [`RunTracker::pulse`].
#[derive(Clone)]
pub struct Pulse(std::sync::Arc<dyn Fn() -> crate::Result<()> + Send + Sync>);

impl Pulse {
    /// A pulse that calls `beat` for each heartbeat.
    pub fn new(beat: impl Fn() -> crate::Result<()> + Send + Sync + 'static) -> Self {
        Self(std::sync::Arc::new(beat))
    }

    /// Sends one heartbeat.
    ///
    /// # Errors
    /// Whatever the store's heartbeat returns.
    pub fn beat(&self) -> crate::Result<()> {
        (self.0)()
    }
}

impl std::fmt::Debug for Pulse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Pulse")
    }
}

/// Records runs. Every method may be called from the training thread (which may
/// be another thread than the one that started the run, hence `Send`): an
/// implementation must not block it on the disk for long (buffer and write in the
/// background), and must have written everything by the time `finish_run` returns.
pub trait RunTracker: Send {
    /// Registers a run as RUNNING and returns its id.
    fn start_run(&mut self, run: &NewRun) -> Result<RunId>;
    /// Records metric points of a run.
    fn log_metrics(&mut self, run: RunId, points: &[MetricPoint]) -> Result<()>;
    /// Marks the run ended, with the reason when it failed; flushes pending points first.
    fn finish_run(&mut self, run: RunId, status: EndStatus, reason: Option<&str>) -> Result<()>;

    /// Waits until every point handed to [`RunTracker::log_metrics`] is written, and
    /// reports a failure to write any of them. The default does nothing (for trackers
    /// that write synchronously).
    fn flush(&mut self) -> Result<()> {
        Ok(())
    }

    /// Tells the store the run's process is alive (a run whose heartbeat is stale
    /// reads LOST). The coordinator calls it every [`HEARTBEAT_INTERVAL`] while it
    /// trains or validates, whatever the logging interval.
    fn heartbeat(&mut self, run: RunId) -> Result<()> {
        let _ = run;
        Ok(())
    }

    /// Heartbeats of `run` that another thread can send while the training thread
    /// waits (see [`Pulse`]). The default has none: such waits then send no
    /// heartbeat.
    fn pulse(&mut self, run: RunId) -> Option<Pulse> {
        let _ = run;
        None
    }

    /// Records a file the run wrote (the final weights, the report, a checkpoint).
    /// A tracker without an artifact list ignores it.
    fn log_artifact(&mut self, run: RunId, artifact: &NewArtifact) -> Result<()> {
        let _ = (run, artifact);
        Ok(())
    }

    /// Continues a run as a new attempt, resuming from `from_step`: points of earlier
    /// attempts after that step are hidden from then on. Returns the new attempt
    /// number. The default refuses (for trackers that cannot resume).
    fn resume_run(&mut self, run: RunId, from_step: u64) -> Result<u32> {
        let _ = from_step;
        Err(crate::Error::Invalid(format!(
            "this run tracker cannot resume runs (run {run})"
        )))
    }
}

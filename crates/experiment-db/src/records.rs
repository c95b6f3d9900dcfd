//! What the store's queries return.

use serde::{Deserialize, Serialize};

use crate::{EndStatus, Error, Result, RunId};

/// A run's status.
///
/// Four statuses are stored; [`RunStatus::Lost`] never is: the queries report a
/// RUNNING run whose heartbeat is stale as LOST (see
/// [`crate::ExperimentDb::set_stale_after`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum RunStatus {
    /// Started and not ended yet, with a recent heartbeat.
    Running,
    /// Trained to the end.
    Finished,
    /// Stopped by an error; the run's `failure_reason` says which.
    Failed,
    /// Stopped by the user.
    Killed,
    /// Stored as RUNNING, but its heartbeat (or its start, when it has none) is older
    /// than the staleness threshold: its process is presumed dead. Never stored.
    Lost,
}

impl RunStatus {
    /// Every status, stored ones first.
    pub const ALL: [RunStatus; 5] = [
        RunStatus::Running,
        RunStatus::Finished,
        RunStatus::Failed,
        RunStatus::Killed,
        RunStatus::Lost,
    ];

    /// The status's name: `RUNNING`, `FINISHED`, `FAILED`, `KILLED` or `LOST`.
    pub fn as_str(self) -> &'static str {
        match self {
            RunStatus::Running => "RUNNING",
            RunStatus::Finished => "FINISHED",
            RunStatus::Failed => "FAILED",
            RunStatus::Killed => "KILLED",
            RunStatus::Lost => "LOST",
        }
    }

    /// Parses a status name as [`RunStatus::as_str`] writes it (`LOST` included, so
    /// that a filter can name it).
    ///
    /// # Errors
    /// [`Error::Invalid`] for anything else.
    pub fn parse(s: &str) -> Result<Self> {
        RunStatus::ALL
            .into_iter()
            .find(|status| status.as_str() == s)
            .ok_or_else(|| {
                Error::Invalid(format!(
                    "unknown run status {s:?} (expected RUNNING, FINISHED, FAILED, KILLED or LOST)"
                ))
            })
    }

    /// Whether the run has ended (a LOST run is presumed to have).
    pub fn is_ended(self) -> bool {
        self != RunStatus::Running
    }
}

impl From<EndStatus> for RunStatus {
    fn from(status: EndStatus) -> Self {
        match status {
            EndStatus::Finished => RunStatus::Finished,
            EndStatus::Failed => RunStatus::Failed,
            EndStatus::Killed => RunStatus::Killed,
        }
    }
}

impl std::fmt::Display for RunStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A run as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunRecord {
    /// The run's id.
    pub id: RunId,
    /// Name of the experiment the run belongs to.
    pub experiment: String,
    /// Run name, unique within its experiment.
    pub name: String,
    /// Status: as stored, except that a RUNNING run whose heartbeat is stale reads
    /// [`RunStatus::Lost`].
    pub status: RunStatus,
    /// The whole configuration as given to [`crate::RunTracker::start_run`].
    pub config: serde_json::Value,
    /// kiln's version.
    pub kiln_version: String,
    /// Git commit of the code, when known.
    pub git_commit: Option<String>,
    /// Host name.
    pub host: String,
    /// Seconds since the Unix epoch when the run started.
    pub started_at: f64,
    /// Seconds since the Unix epoch when the run ended; `None` while it runs.
    pub ended_at: Option<f64>,
    /// Seconds since the Unix epoch of the last heartbeat (the start counts as one).
    pub heartbeat_at: Option<f64>,
    /// Attempt number, 1 for a run that was never resumed, one more for each resume.
    pub attempt: u32,
    /// Why the run ended, when a reason was given (always for a failure).
    pub failure_reason: Option<String>,
}

/// Summary of one metric series (one key and split of one run), kept current as
/// points are written, over the points visible (those that no resume hid).
///
/// Non-finite values count for `last` but never for `min` or `max`. Of equal minima
/// (maxima) the one written first is kept.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MetricSummaryRecord {
    /// Metric name.
    pub key: String,
    /// Split (`train`, `valid`, ...).
    pub split: String,
    /// Value at the highest step written (of points at one step, the last written);
    /// NaN when that value was NaN.
    pub last: f64,
    /// Highest step written.
    pub last_step: u64,
    /// `(step, value)` of the smallest finite value; `None` when no value was finite.
    pub min: Option<(u64, f64)>,
    /// `(step, value)` of the largest finite value; `None` when no value was finite.
    pub max: Option<(u64, f64)>,
}

/// Which end of a metric is best.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Goal {
    /// Smaller is better (a loss).
    Min,
    /// Larger is better (an accuracy).
    Max,
}

/// An artifact as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ArtifactRecord {
    /// The artifact's id.
    pub id: i64,
    /// Run the artifact belongs to.
    pub run: RunId,
    /// Kind: `checkpoint`, `plot`, `config`, ...
    pub kind: String,
    /// Path relative to the run directory.
    pub path: String,
    /// Size in bytes.
    pub size_bytes: u64,
    /// SHA-256 of the content as lowercase hex, when computed.
    pub sha256: Option<String>,
    /// Seconds since the Unix epoch when it was recorded.
    pub created_at: f64,
}

/// One resume of a run: the start of a new attempt (see
/// [`crate::ExperimentDb::resume_run`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResumeRecord {
    /// The attempt that the resume started (2 for the first resume).
    pub attempt: u32,
    /// The step the new attempt resumed from: points of earlier attempts after it are
    /// hidden.
    pub from_step: u64,
    /// Seconds since the Unix epoch when the run was resumed.
    pub resumed_at: f64,
    /// The run's stored status just before the resume (RUNNING when its process died
    /// without saying so).
    pub previous_status: RunStatus,
    /// The reason the previous attempt ended with, if any.
    pub previous_reason: Option<String>,
}

/// One metric point as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MetricRecord {
    /// Metric name.
    pub key: String,
    /// Split (`train`, `valid`, ...).
    pub split: String,
    /// Optimizer step.
    pub step: u64,
    /// Epoch (0-based).
    pub epoch: u64,
    /// The value; NaN when it was NaN.
    pub value: f64,
    /// Seconds since the Unix epoch when the value was measured.
    pub wall_time: f64,
    /// The attempt of the run that wrote the point.
    pub attempt: u32,
    /// Whether a later attempt resumed from a step before this point's, which hides it
    /// from the other queries.
    pub hidden: bool,
}

//! kiln's experiment store.
//!
//! Knows nothing of Burn: it stores numbers, strings and JSON.
//!
//! [`ExperimentDb`] is one SQLite file (WAL, foreign keys enforced, a busy timeout)
//! whose schema is created and upgraded by numbered migrations when it opens. A
//! training loop records runs through the [`RunTracker`] trait; the queries
//! ([`ExperimentDb::list_runs`], [`ExperimentDb::metric_history`],
//! [`ExperimentDb::best_run`], ...) read them back. Times are seconds since the Unix
//! epoch (UTC) as `f64`.

mod db;
mod error;
mod migrations;
mod records;
mod tracker;

pub use db::ExperimentDb;
pub use error::Error;
pub use records::{ArtifactRecord, Goal, MetricSummaryRecord, NewArtifact, RunRecord, RunStatus};
pub use tracker::{EndStatus, MetricPoint, NewRun, RunId, RunTracker};

/// Result alias for the experiment store.
pub type Result<T, E = Error> = std::result::Result<T, E>;

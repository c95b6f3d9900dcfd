//! kiln's experiment store.
//!
//! Knows nothing of Burn: it stores numbers, strings and JSON.
//!
//! [`ExperimentDb`] is one SQLite file (WAL, foreign keys enforced, a busy timeout),
//! or a PostgreSQL database that several machines share ([`StoreLocation`]: a
//! `postgres://` URL), whose schema is created and upgraded by numbered migrations
//! when it opens. A
//! training loop records runs through the [`RunTracker`] trait; metric points are
//! written by a background thread so that the loop never waits on the disk. The
//! queries ([`ExperimentDb::list_runs`], [`ExperimentDb::query_runs`],
//! [`ExperimentDb::metric_history`], [`ExperimentDb::best_run`],
//! [`ExperimentDb::compare_runs`], ...) read them back.
//!
//! Lifecycle: a run is RUNNING until it ends FINISHED, FAILED (with its reason) or
//! KILLED; a RUNNING run whose heartbeat is stale is reported LOST. A resumed run
//! ([`ExperimentDb::resume_run`]) continues as a new attempt, and the points its
//! earlier attempts wrote after the resume step are hidden from queries (kept on disk).
//!
//! Times are seconds since the Unix epoch (UTC) as `f64`.

mod compare;
mod db;
mod engine;
mod error;
mod migrations;
#[cfg(feature = "plot")]
pub mod plot;
mod query;
mod records;
mod series;
#[cfg(feature = "testing")]
pub mod testing;
mod tracker;
mod writer;
mod writes;

pub use compare::{Comparison, MetricRow, ParamRow};
pub use db::{ExitHandle, ExperimentDb};
pub use engine::StoreLocation;
pub use error::Error;
pub use query::{
    CompareOp, Filter, MetricCondition, MetricField, MetricOrder, ParamCondition, RunQuery,
    SortOrder,
};
pub use records::{
    ArtifactRecord, Goal, MetricRecord, MetricSummaryRecord, ResumeRecord, RunRecord, RunStatus,
};
pub use tracker::{
    EndStatus, HEARTBEAT_INTERVAL, MetricPoint, NewArtifact, NewRun, Pulse, RunId, RunTracker,
};

/// Result alias for the experiment store.
pub type Result<T, E = Error> = std::result::Result<T, E>;

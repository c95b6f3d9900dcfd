use std::path::PathBuf;

use kiln_core::TrainReport;

/// Everything that can stop the coordinator.
#[derive(Debug, thiserror::Error)]
pub enum CoordinatorError {
    /// A configuration value, task spec, model or data module is not usable.
    #[error(transparent)]
    Config(#[from] kiln_core::Error),
    /// The configuration asks for something this build or this version cannot run yet.
    #[error("{what} is not available: {reason}")]
    NotAvailable {
        /// What was asked for, e.g. `strategy ddp with 2 devices`.
        what: String,
        /// Why not, and what would provide it.
        reason: String,
    },
    /// The experiment store failed.
    #[error(transparent)]
    Tracker(#[from] kiln_experiment_db::Error),
    /// A file of the run could not be written.
    #[error("cannot write {path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A checkpoint cannot be used: missing, truncated, corrupt, or written for
    /// another model, task or world size.
    #[error("cannot use checkpoint {path}: {reason}")]
    Checkpoint {
        /// The checkpoint directory or file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The exchange between data-parallel workers failed, or another worker of the
    /// group failed (its message is included).
    #[error("data-parallel training failed: {0}")]
    Collective(String),
    /// Model weights could not be saved.
    #[error("cannot save the model to {path}: {reason}")]
    Record {
        /// The file.
        path: PathBuf,
        /// The cause.
        reason: String,
    },
    /// Training was stopped through the coordinator's [`StopHandle`](crate::StopHandle)
    /// (e.g. on SIGINT/SIGTERM); the run is recorded as KILLED and the error carries
    /// the report.
    #[error("run stopped by request after {} optimizer steps", report.optimizer_steps)]
    Stopped {
        /// The report of the stopped run.
        report: Box<TrainReport>,
    },
    /// Training started but failed; the run is recorded as FAILED and the report
    /// holds what was done until then.
    #[error("run failed: {reason}")]
    RunFailed {
        /// What went wrong, e.g. `loss is NaN at step 12 (epoch 0, batch 11)`.
        reason: String,
        /// The report of the failed run.
        report: Box<TrainReport>,
    },
}

impl CoordinatorError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        CoordinatorError::Io {
            path: path.into(),
            source,
        }
    }
}

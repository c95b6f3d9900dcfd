//! kiln's shared vocabulary.
//!
//! Everything the other kiln crates agree on lives here and nothing else does:
//!
//! - [`TaskSpec`]: what is being learned (language modelling, classification,
//!   regression); the loss and the metrics follow from its kind.
//! - [`CoordinatorConfig`] and its parts ([`Strategy`], [`Precision`], [`Devices`]),
//!   parsed from the strings PyTorch Lightning users already know.
//! - [`TaskModel`] and [`DataModule`]: what a model and a data source implement to be
//!   trained, generic over the Burn backend.
//! - [`TrainReport`]: what a run returns.
//! - [`launch`]: a node's place in a multi-node run, from torchrun's or SLURM's
//!   environment or from flags.
//! - [`Error`]: the one error type of this crate.
//!
//! `kiln-core` names no concrete backend: it depends on Burn's traits only.

mod config;
mod data;
mod error;
pub mod launch;
mod model;
mod report;
pub mod rng;
mod task;

pub use config::{
    CheckpointPolicy, CkptPath, CoordinatorConfig, DeviceSelection, Devices, LossScaling,
    LrSchedule, MonitorMode, OptimizerConfig, Precision, ProgressMode, Strategy,
};
pub use data::{Batch, DataModule, Split};
pub use error::Error;
pub use model::{Inputs, Prediction, Targets, TaskModel};
pub use report::{
    Engine, MetricSummary, ProcessGroupBackend, ResolvedPlan, RunStatus, Throughput, TrainReport,
};
pub use task::{TASK_SPEC_SCHEMA_VERSION, TaskKind, TaskSpec, higher_is_better};

/// Result alias for kiln-core.
pub type Result<T, E = Error> = std::result::Result<T, E>;

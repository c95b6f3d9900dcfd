//! kiln's `TrainingCoordinator`: one entry point that trains a Burn model on a data
//! module for a task, on the strategy, devices and precision asked for, and records
//! the run.
//!
//! ```no_run
//! use kiln_backend_cpu::Flex;
//! use kiln_coordinator::TrainingCoordinator;
//! use kiln_core::TaskSpec;
//! use kiln_models::{CharTokenizer, TextDataModule, TinyGptConfig, builtin_corpus};
//! use burn::backend::Autodiff;
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let text = builtin_corpus();
//! let tok = CharTokenizer::from_text(&text);
//! let data = TextDataModule::new(tok.encode(&text)?, tok.vocab_size(), 64)?;
//! let task = TaskSpec::lm_tiny();
//! let device = Default::default();
//! let model = TinyGptConfig::tiny(65).init::<Autodiff<Flex>>(1337, &device)?;
//!
//! let coordinator = TrainingCoordinator::builder().strategy("auto").devices("auto").build()?;
//! let trained = coordinator.train(model, &data, &task, None, 1)?;
//! println!("valid loss {:?}", trained.report.final_metrics.get("valid/loss"));
//! # Ok(()) }
//! ```
//!
//! How each parameter maps to Lightning's `Trainer` is documented on
//! [`CoordinatorBuilder`] and in `README.md`.

#[doc(hidden)]
pub mod bench;
mod builder;
mod checkpoint;
mod collective;
mod coordinator;
mod error;
mod grad;
mod group;
#[cfg(feature = "learner")]
mod learner;
mod loss_log;
mod native;
mod objective;
mod optim;
mod outputs;
mod plan;
mod precision;
mod progress;
mod run;
mod run_dir;
mod schedule;
mod step;
mod stop;
mod sync;
mod tracking;
mod update;
mod workload;

pub use builder::CoordinatorBuilder;
pub use coordinator::{Trained, TrainingCoordinator};
pub use error::CoordinatorError;
pub use outputs::{StepOutput, burn_metric};
pub use plan::resolve_plan;
pub use schedule::KilnSchedule;
pub use stop::StopHandle;
pub use workload::{Datasets, LossStep, ModelBatcher, TrainBatcher, TrainModel, ValidBatcher};

/// Result alias for the coordinator.
pub type Result<T, E = CoordinatorError> = std::result::Result<T, E>;

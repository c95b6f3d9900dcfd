//! What a data source implements to feed kiln.

use std::fmt;

use burn::prelude::Backend;

use crate::model::{Inputs, Targets};
use crate::{Result, TaskSpec};

/// Which part of the data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Split {
    /// Training examples.
    Train,
    /// Validation examples.
    Valid,
}

impl fmt::Display for Split {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Split::Train => "train",
            Split::Valid => "valid",
        })
    }
}

/// One batch of examples on a device.
#[derive(Debug, Clone)]
pub struct Batch<B: Backend> {
    /// Model inputs.
    pub inputs: Inputs<B>,
    /// Targets the loss compares the prediction with.
    pub targets: Targets<B>,
}

/// A source of examples addressed by index, the counterpart of a Lightning
/// `LightningDataModule`.
///
/// The coordinator owns the data order: it draws a seeded permutation of
/// `0..len(Train)` every epoch and asks for batches by index. That is what makes two
/// runs with one seed see the same batches, and what lets a checkpoint resume in the
/// middle of an epoch.
pub trait DataModule: Send + Sync {
    /// Number of examples in `split`.
    fn len(&self, split: Split) -> usize;

    /// Builds the batch made of examples `indices` of `split` on `device`.
    fn batch<B: Backend>(
        &self,
        split: Split,
        indices: &[usize],
        device: &B::Device,
    ) -> Result<Batch<B>>;

    /// Checks that this data fits `task` (e.g. the vocabulary size); called once
    /// before training.
    fn check_task(&self, task: &TaskSpec) -> Result<()> {
        let _ = task;
        Ok(())
    }

    /// Items per example for throughput figures: tokens per sequence for language
    /// modelling, 1 otherwise.
    fn items_per_example(&self) -> usize {
        1
    }
}

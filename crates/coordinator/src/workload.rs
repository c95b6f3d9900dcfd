//! What the training loop asks of a model and its data, whichever way a user gave
//! them: the examples of each split, one micro-batch's forward and backward passes,
//! and one validation batch.
//!
//! Two workloads exist:
//! - [`StepWork`]: a Burn user's own training code, i.e. a model implementing
//!   burn-train's `TrainStep` (on the autodiff backend) and `InferenceStep` (on the
//!   inner one), datasets of items and a `Batcher` (the general path,
//!   [`TrainingCoordinator::fit`](crate::TrainingCoordinator::fit));
//! - [`TaskWork`]: kiln's simple path, a `TaskModel` with a `DataModule` and a
//!   `TaskSpec` whose kind gives the loss
//!   ([`TrainingCoordinator::train`](crate::TrainingCoordinator::train)).
//!
//! The loop itself (`native.rs`) owns everything else: the data order, the shards
//! of a data-parallel group, accumulation, the exchange, clipping, the optimizer and
//! the schedule, validation's batching, checkpoints and the books.

use std::any::Any;
use std::sync::Arc;

use burn::data::dataloader::batcher::Batcher;
use burn::data::dataset::Dataset;
use burn::module::AutodiffModule;
use burn::optim::GradientsParams;
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;
use burn::train::metric::{
    AccuracyInput, AccuracyMetric, Adaptor, LossInput, LossMetric, Metric, MetricMetadata, Numeric,
    NumericEntry,
};
use burn::train::{ClassificationOutput, InferenceStep, SequenceOutput, TrainOutput, TrainStep};
use kiln_core::{Batch, DataModule, Precision, Split, TaskModel, TaskSpec};

#[cfg(feature = "learner")]
use crate::checkpoint::Loaded;
use crate::grad;
use crate::objective::{self, EvalSums};
use crate::precision;
use crate::run::Failure;
use crate::step::{MicroStep, task_backward};
use crate::{CoordinatorError, Result};
#[cfg(feature = "learner")]
use crate::{
    progress::Progress,
    run::{LoopInputs, LoopStats},
    sync::BackendSync,
    tracking::Metrics,
};

/// What the loop needs of a model `M` (trained on `B`) and its data.
pub(crate) trait Workload<B: AutodiffBackend, M: AutodiffModule<B>>: Sync {
    /// A training batch, built before the loop checks for a stop request.
    type Batch;

    /// Examples in `split`.
    fn len(&self, split: Split) -> usize;

    /// Items per example for throughput figures (tokens per sequence for language
    /// modelling).
    fn items_per_example(&self) -> usize {
        1
    }

    /// Builds the training batch of examples `indices` on `device`.
    fn batch(&self, indices: &[usize], device: &B::Device) -> Result<Self::Batch>;

    /// Forward and backward passes of one micro-batch: the gradients of the loss
    /// weighted as `micro` says (× the loss scale under `16-mixed`), and the loss
    /// itself; a non-finite loss is an error ([`MicroStep::check`]).
    fn backward(
        &self,
        model: &M,
        batch: Self::Batch,
        micro: &MicroStep,
    ) -> Result<(GradientsParams, f64), Failure>;

    /// Whether the Learner engine can train this workload.
    const ON_LEARNER: bool = false;

    /// Whether every precision can run (else `32-true` alone).
    const ALL_PRECISIONS: bool = false;

    /// Trains on the Learner engine (burn-train's `SupervisedTraining`), where
    /// [`ON_LEARNER`](Self::ON_LEARNER) says it can.
    #[cfg(feature = "learner")]
    #[allow(clippy::too_many_arguments)]
    fn fit_learner(
        &self,
        inputs: &LoopInputs<'_, B, Self>,
        devices: &[B::Device],
        model: M,
        resume: Option<&Loaded>,
        sharded: bool,
        sync: Option<BackendSync<B>>,
        metrics: &mut Metrics<'_>,
        progress: &mut Progress,
        stats: &mut LoopStats,
    ) -> Result<M, Failure>
    where
        Self: Sized,
    {
        let _ = (
            inputs, devices, model, resume, sharded, sync, metrics, progress, stats,
        );
        Err(Failure::Error(CoordinatorError::NotAvailable {
            what: "the Learner engine".into(),
            reason: "this model trains on kiln's native loop".into(),
        }))
    }

    /// Validates on examples `indices` of the validation split, adding to `sums`.
    fn evaluate(
        &self,
        model: &M::InnerModule,
        indices: &[usize],
        device: &B::Device,
        precision: Precision,
        sums: &mut EvalSums,
    ) -> Result<()>;
}

/// kiln's simple path: a [`TaskModel`] on a [`DataModule`], the loss from the
/// task's kind.
pub(crate) struct TaskWork<'a, D> {
    pub data: &'a D,
    pub task: &'a TaskSpec,
}

impl<B, M, D> Workload<B, M> for TaskWork<'_, D>
where
    B: AutodiffBackend,
    M: AutodiffModule<B> + TaskModel<B> + 'static,
    M::InnerModule: TaskModel<B::InnerBackend>,
    D: DataModule,
{
    type Batch = Batch<B>;

    const ON_LEARNER: bool = true;

    const ALL_PRECISIONS: bool = true;

    #[cfg(feature = "learner")]
    fn fit_learner(
        &self,
        inputs: &LoopInputs<'_, B, Self>,
        devices: &[B::Device],
        model: M,
        resume: Option<&Loaded>,
        sharded: bool,
        sync: Option<BackendSync<B>>,
        metrics: &mut Metrics<'_>,
        progress: &mut Progress,
        stats: &mut LoopStats,
    ) -> Result<M, Failure> {
        crate::learner::fit::<B, M, D>(
            &inputs.with_data(self.data),
            devices,
            model,
            resume,
            sharded,
            sync,
            metrics,
            progress,
            stats,
        )
    }

    fn len(&self, split: Split) -> usize {
        self.data.len(split)
    }

    fn items_per_example(&self) -> usize {
        self.data.items_per_example()
    }

    fn batch(&self, indices: &[usize], device: &B::Device) -> Result<Batch<B>> {
        Ok(self.data.batch::<B>(Split::Train, indices, device)?)
    }

    fn backward(
        &self,
        model: &M,
        batch: Batch<B>,
        micro: &MicroStep,
    ) -> Result<(GradientsParams, f64), Failure> {
        task_backward(&self.task.kind, model, batch, micro, None)
    }

    fn evaluate(
        &self,
        model: &M::InnerModule,
        indices: &[usize],
        device: &B::Device,
        precision: Precision,
        sums: &mut EvalSums,
    ) -> Result<()> {
        let batch = self
            .data
            .batch::<B::InnerBackend>(Split::Valid, indices, device)?;
        // True modes store the model in their dtype: the inputs follow, the loss is
        // taken in f32. Mixed modes validate the f32 masters.
        let prediction = match precision::stored_dtype(precision) {
            Some(dtype) => {
                precision::to_f32(model.forward(precision::cast_inputs(batch.inputs, dtype))?)
            }
            None => model.forward(batch.inputs)?,
        };
        sums.add(objective::evaluate(
            &self.task.kind,
            prediction,
            batch.targets,
        )?);
        Ok(())
    }
}

/// The output of a model's step, as kiln reads it: the loss through burn-train's
/// own [`Adaptor`] to [`LossInput`], as burn-train's `LossMetric` reads it.
///
/// Every output burn-train provides (`ClassificationOutput`, `RegressionOutput`,
/// `MultiLabelClassificationOutput`, `SequenceOutput`) has it; a user's own output
/// type implements `Adaptor<LossInput<B>>`:
///
/// ```compile_fail
/// // An output kiln cannot read a loss from does not compile:
/// use burn::prelude::Backend;
/// struct NoLoss;
/// fn needs_a_loss<B: Backend, O: kiln_coordinator::StepOutput<B>>() {}
/// fn train<B: Backend>() {
///     needs_a_loss::<B, NoLoss>();
/// }
/// ```
///
/// Besides the loss, kiln validates with the accuracy of burn-train's
/// `ClassificationOutput` and `SequenceOutput` (burn-train's `AccuracyMetric`
/// through their `Adaptor<AccuracyInput<B>>`), logged as `valid/accuracy`.
#[diagnostic::on_unimplemented(
    message = "kiln reads the training loss from `{Self}` and cannot: implement \
               burn-train's `Adaptor<LossInput<B>>` for it",
    label = "this step output has no loss adaptor",
    note = "burn-train's ClassificationOutput, RegressionOutput, \
            MultiLabelClassificationOutput and SequenceOutput have one"
)]
pub trait StepOutput<B: Backend> {
    /// The mean loss of the step, as an `f64`.
    fn loss_value(&self) -> f64;

    /// The fraction of correct predictions, for the outputs burn-train gives an
    /// accuracy (`ClassificationOutput`, `SequenceOutput`); `None` for others.
    fn accuracy(&self) -> Option<f64>;
}

impl<B: Backend, T: Adaptor<LossInput<B>> + 'static> StepOutput<B> for T {
    fn loss_value(&self) -> f64 {
        numeric(LossMetric::<B>::new(), &self.adapt())
    }

    fn accuracy(&self) -> Option<f64> {
        // Rust cannot ask whether `T` adapts to the accuracy's input; burn-train's
        // own outputs are known types, so they are recognised by type.
        let any = self as &dyn Any;
        let input: AccuracyInput<B> = match (
            any.downcast_ref::<ClassificationOutput<B>>(),
            any.downcast_ref::<SequenceOutput<B>>(),
        ) {
            (Some(output), _) => output.adapt(),
            (_, Some(output)) => output.adapt(),
            _ => return None,
        };
        // burn-train reports a percentage; kiln logs fractions.
        Some(numeric(AccuracyMetric::<B>::new(), &input) / 100.0)
    }
}

/// The value burn-train's `metric` gives for one `input`.
fn numeric<T: Metric + Numeric>(mut metric: T, input: &T::Input) -> f64 {
    let metadata = MetricMetadata {
        progress: burn::data::dataloader::Progress::new(1, 1),
        global_progress: burn::data::dataloader::Progress::new(0, 1),
        iteration: None,
        lr: None,
    };
    metric.update(input, &metadata);
    match metric.value() {
        NumericEntry::Value(v) => v,
        NumericEntry::Aggregated {
            aggregated_value, ..
        } => aggregated_value,
    }
}

/// A Burn user's data, as burn-train's `SupervisedTraining` takes it: a training
/// and a validation [`Dataset`] of items `I`, and one [`Batcher`] that turns items
/// into the model's input, on the autodiff backend for training and on the inner
/// backend for validation (a batcher generic over the backend is both).
///
/// kiln owns the data order: every epoch it draws a seeded permutation of the
/// training set's indices (cut into shards across a data-parallel group) and asks
/// the dataset for those items, so two runs with one seed see the same batches and
/// a checkpoint resumes in the middle of an epoch. Validation reads the validation
/// set in order. `batch_size` comes from the coordinator's configuration.
///
/// ```
/// use burn::data::dataset::InMemDataset;
/// use kiln_coordinator::Datasets;
///
/// #[derive(Clone)]
/// struct Batcher;
/// let data = Datasets::new(InMemDataset::new(vec![1.0f32, 2.0]), InMemDataset::new(vec![3.0f32]), Batcher);
/// assert_eq!(data.len(kiln_core::Split::Train), 2);
/// ```
pub struct Datasets<I, T> {
    train: Arc<dyn Dataset<I>>,
    valid: Arc<dyn Dataset<I>>,
    batcher: T,
}

impl<I, T> Datasets<I, T> {
    /// The training set, the validation set (it may be empty: no validation) and
    /// the batcher.
    pub fn new(
        train: impl Dataset<I> + 'static,
        valid: impl Dataset<I> + 'static,
        batcher: T,
    ) -> Self {
        Self {
            train: Arc::new(train),
            valid: Arc::new(valid),
            batcher,
        }
    }

    /// Items in `split`.
    pub fn len(&self, split: Split) -> usize {
        match split {
            Split::Train => self.train.len(),
            Split::Valid => self.valid.len(),
        }
    }
}

/// The general path: a Burn user's model with its own `TrainStep` and
/// `InferenceStep`, on [`Datasets`].
pub(crate) struct StepWork<'a, I, T> {
    pub data: &'a Datasets<I, T>,
}

impl<I, T> StepWork<'_, I, T> {
    fn items(&self, split: Split, indices: &[usize]) -> Result<Vec<I>> {
        let dataset = match split {
            Split::Train => &self.data.train,
            Split::Valid => &self.data.valid,
        };
        indices
            .iter()
            .map(|&i| {
                dataset.get(i).ok_or_else(|| {
                    CoordinatorError::from(kiln_core::Error::Data(format!(
                        "the {split} dataset has no item {i}, though its len() is {}",
                        dataset.len()
                    )))
                })
            })
            .collect()
    }
}

impl<B, M, I, T> Workload<B, M> for StepWork<'_, I, T>
where
    B: AutodiffBackend,
    M: AutodiffModule<B> + TrainStep,
    M::Output: StepOutput<B>,
    M::InnerModule: InferenceStep,
    <M::InnerModule as InferenceStep>::Output: StepOutput<B::InnerBackend>,
    I: Send + Sync,
    T: Batcher<B, I, M::Input>
        + Batcher<B::InnerBackend, I, <M::InnerModule as InferenceStep>::Input>,
{
    type Batch = M::Input;

    fn len(&self, split: Split) -> usize {
        self.data.len(split)
    }

    fn batch(&self, indices: &[usize], device: &B::Device) -> Result<M::Input> {
        let items = self.items(Split::Train, indices)?;
        Ok(Batcher::<B, I, M::Input>::batch(
            &self.data.batcher,
            items,
            device,
        ))
    }

    fn backward(
        &self,
        model: &M,
        batch: M::Input,
        micro: &MicroStep,
    ) -> Result<(GradientsParams, f64), Failure> {
        // The model's own step runs backward; its gradients are weighted after
        // (the same sum as weighting the loss, up to float rounding).
        let TrainOutput { mut grads, item } = model.step(batch);
        let value = item.loss_value();
        micro.check(value)?;
        let factor = micro.factor();
        if factor != 1.0 {
            grad::scale::<B, M>(model, &mut grads, factor);
        }
        Ok((grads, value))
    }

    fn evaluate(
        &self,
        model: &M::InnerModule,
        indices: &[usize],
        device: &B::Device,
        _precision: Precision,
        sums: &mut EvalSums,
    ) -> Result<()> {
        let items = self.items(Split::Valid, indices)?;
        let batch = Batcher::<B::InnerBackend, I, _>::batch(&self.data.batcher, items, device);
        let output = InferenceStep::step(model, batch);
        // The mean over examples: each batch weighs as many examples as it holds.
        let n = indices.len() as f64;
        sums.add(EvalSums {
            loss_sum: output.loss_value() * n,
            correct: output.accuracy().map(|accuracy| accuracy * n),
            count: n,
        });
        Ok(())
    }
}

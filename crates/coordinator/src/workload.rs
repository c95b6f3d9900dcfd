//! What the training loop asks of a model and its data, whichever way a user gave
//! them: the examples of each split, one micro-batch's forward and backward passes,
//! and one validation batch.
//!
//! A [`Workload`] builds batches from its data (borrowed for the run); its
//! [`Steps`] run on them (owned, so that burn-train's `'static` stepper can hold
//! them). Two workloads exist:
//! - [`StepWork`] with [`ModelSteps`]: a Burn user's own training code, i.e. a
//!   model implementing burn-train's `TrainStep` (on the autodiff backend) and
//!   `InferenceStep` (on the inner one), datasets of items and a `Batcher` (the
//!   general path, [`TrainingCoordinator::fit`](crate::TrainingCoordinator::fit));
//! - [`TaskWork`] with [`TaskSteps`]: kiln's simple path, a `TaskModel` with a
//!   `DataModule` and a `TaskSpec` whose kind gives the loss
//!   ([`TrainingCoordinator::train`](crate::TrainingCoordinator::train)).
//!
//! The engines own everything else (the native loop in `native.rs`, burn-train's
//! Learner in `learner/`): the data order, the shards of a data-parallel group,
//! accumulation, the exchange, clipping, the optimizer and the schedule,
//! validation's batching, checkpoints and the books.

use std::marker::PhantomData;
use std::sync::Arc;

use burn::data::dataloader::batcher::Batcher;
use burn::data::dataset::Dataset;
use burn::module::AutodiffModule;
use burn::prelude::*;
use burn::tensor::FloatDType;
use burn::tensor::backend::AutodiffBackend;
use burn::train::{InferenceStep, TrainOutput, TrainStep};
use kiln_core::{Batch, DataModule, Precision, Split, TaskKind, TaskModel, TaskSpec};

use crate::grad;
use crate::objective::{self, EvalSums};
use crate::outputs::StepOutput;
use crate::precision;
use crate::run::Failure;
use crate::step::{MicroStep, OutputMetrics, Passed, backward_from_loss, task_backward};
use crate::{CoordinatorError, Result};

/// What the loop needs of a model `M` (trained on `B`) and its data: the examples
/// of each split, and batches of them. What runs on a batch is the workload's
/// [`Steps`], which both engines call.
pub(crate) trait Workload<B: AutodiffBackend, M: AutodiffModule<B>>: Sync {
    /// The forward and backward passes and the validation of one batch.
    type Steps: Steps<B, M>;

    /// The passes over one batch, for the loop to call (cheap: built per step).
    fn steps(&self) -> Self::Steps;

    /// Examples in `split`.
    fn len(&self, split: Split) -> usize;

    /// Items per example for throughput figures (tokens per sequence for language
    /// modelling).
    fn items_per_example(&self) -> usize {
        1
    }

    /// Builds the training batch of examples `indices` on `device`.
    fn batch(&self, indices: &[usize], device: &B::Device) -> Result<TrainBatch<B, M, Self>>;

    /// Builds the validation batch of examples `indices` on `device` (the inner
    /// backend's: no autodiff).
    fn valid_batch(&self, indices: &[usize], device: &B::Device) -> Result<ValidBatch<B, M, Self>>;
}

/// A workload's training batch.
pub(crate) type TrainBatch<B, M, W> = <<W as Workload<B, M>>::Steps as Steps<B, M>>::Batch;

/// A workload's validation batch.
pub(crate) type ValidBatch<B, M, W> = <<W as Workload<B, M>>::Steps as Validates<
    <B as AutodiffBackend>::InnerBackend,
    <M as AutodiffModule<B>>::InnerModule,
>>::ValidBatch;

/// What runs on one training batch of model `M`: owned, so that burn-train's
/// `'static` stepper can hold it (the Learner engine), and called by the native
/// loop alike.
pub(crate) trait Steps<B: AutodiffBackend, M: AutodiffModule<B>>:
    Validates<B::InnerBackend, M::InnerModule> + Clone + Send + Sync + 'static
{
    /// A training batch.
    type Batch: Send + 'static;

    /// Whether kiln runs the backward pass itself (from a task model's loss, or a
    /// [`LossStep`]'s), so that it can cast the inputs, scale the loss and add a
    /// term to it: mixed precisions and the backend's gradient synchronisation
    /// need it. A model's own `TrainStep` runs backward itself: `32-true` and
    /// burn-collective's exchange only.
    const KILN_BACKWARD: bool;

    /// Forward and backward passes of one micro-batch: the gradients of the loss
    /// weighted as `micro` says (× the loss scale under `16-mixed`), the loss
    /// itself, and on logged steps the output's metrics; a non-finite loss is an
    /// error ([`MicroStep::check`]). `extra` is added to the loss before backward
    /// (the zero term of the backend's gradient synchronisation); only steps with
    /// [`Steps::KILN_BACKWARD`] are given one.
    fn backward(
        &self,
        model: &M,
        batch: Self::Batch,
        micro: &MicroStep,
        extra: Option<Tensor<B, 1>>,
    ) -> Result<Passed, Failure>;
}

/// What runs on one validation batch of the inner model `IM` (on `IB`, without
/// autodiff). A trait of its own: burn-train's inference step is implemented for
/// the inner model's types alone.
pub(crate) trait Validates<IB: Backend, IM>: Send + Sync + 'static {
    /// A validation batch.
    type ValidBatch: Send + 'static;

    /// The sums of one validation batch of `examples` examples; true precision
    /// modes store the model in their dtype, mixed ones validate the f32 masters.
    fn evaluate(
        &self,
        model: &IM,
        batch: Self::ValidBatch,
        examples: usize,
        precision: Precision,
    ) -> Result<EvalSums>;
}

/// kiln's simple path: a [`TaskModel`] on a [`DataModule`], the loss from the
/// task's kind.
pub(crate) struct TaskWork<'a, D> {
    pub data: &'a D,
    pub task: &'a TaskSpec,
}

/// A task model's passes: the task kind's loss.
#[derive(Debug, Clone)]
pub(crate) struct TaskSteps {
    kind: TaskKind,
}

impl<B, M, D> Workload<B, M> for TaskWork<'_, D>
where
    B: AutodiffBackend,
    M: AutodiffModule<B> + TaskModel<B> + 'static,
    M::InnerModule: TaskModel<B::InnerBackend>,
    D: DataModule,
{
    type Steps = TaskSteps;

    fn steps(&self) -> TaskSteps {
        TaskSteps {
            kind: self.task.kind.clone(),
        }
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

    fn valid_batch(&self, indices: &[usize], device: &B::Device) -> Result<Batch<B::InnerBackend>> {
        Ok(self
            .data
            .batch::<B::InnerBackend>(Split::Valid, indices, device)?)
    }
}

impl<B, M> Steps<B, M> for TaskSteps
where
    B: AutodiffBackend,
    M: AutodiffModule<B> + TaskModel<B>,
    M::InnerModule: TaskModel<B::InnerBackend>,
{
    type Batch = Batch<B>;

    const KILN_BACKWARD: bool = true;

    fn backward(
        &self,
        model: &M,
        batch: Batch<B>,
        micro: &MicroStep,
        extra: Option<Tensor<B, 1>>,
    ) -> Result<Passed, Failure> {
        task_backward(&self.kind, model, batch, micro, extra)
    }
}

impl<IB: Backend, IM: TaskModel<IB>> Validates<IB, IM> for TaskSteps {
    type ValidBatch = Batch<IB>;

    fn evaluate(
        &self,
        model: &IM,
        batch: Batch<IB>,
        _examples: usize,
        precision: Precision,
    ) -> Result<EvalSums> {
        // True modes store the model in their dtype: the inputs follow, the loss is
        // taken in f32. Mixed modes validate the f32 masters.
        let prediction = match precision::stored_dtype(precision) {
            Some(dtype) => {
                precision::to_f32(model.forward(precision::cast_inputs(batch.inputs, dtype))?)
            }
            None => model.forward(batch.inputs)?,
        };
        Ok(objective::evaluate(&self.kind, prediction, batch.targets)?)
    }
}

/// A Burn user's data, as burn-train's `SupervisedTraining` takes it: a training
/// and a validation [`Dataset`] of items `I`, and the [`Batcher`]s that turn items
/// into the model's input: `T` on the autodiff backend for training, `V` on the
/// inner backend for validation. One batcher generic over the backend is both
/// ([`Datasets::new`]); a validation batcher of its own (without augmentation,
/// say) replaces it there ([`Datasets::with_valid_batcher`]), as burn-train's
/// two data loaders would.
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
/// struct Augmenting;
/// struct Plain;
/// let data = Datasets::new(InMemDataset::new(vec![1.0f32, 2.0]), InMemDataset::new(vec![3.0f32]), Augmenting)
///     .with_valid_batcher(Plain);
/// assert_eq!(data.len(kiln_core::Split::Train), 2);
/// ```
pub struct Datasets<I, T, V = T> {
    train: Arc<dyn Dataset<I>>,
    valid: Arc<dyn Dataset<I>>,
    batcher: Arc<T>,
    valid_batcher: Arc<V>,
}

impl<I, T> Datasets<I, T> {
    /// The training set, the validation set (it may be empty: no validation) and
    /// the batcher of both.
    pub fn new(
        train: impl Dataset<I> + 'static,
        valid: impl Dataset<I> + 'static,
        batcher: T,
    ) -> Self {
        let batcher = Arc::new(batcher);
        Self {
            train: Arc::new(train),
            valid: Arc::new(valid),
            valid_batcher: batcher.clone(),
            batcher,
        }
    }
}

impl<I, T, V> Datasets<I, T, V> {
    /// The same data with `batcher` building the validation batches.
    pub fn with_valid_batcher<W>(self, batcher: W) -> Datasets<I, T, W> {
        Datasets {
            train: self.train,
            valid: self.valid,
            batcher: self.batcher,
            valid_batcher: Arc::new(batcher),
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
/// `InferenceStep`, on [`Datasets`]; its passes are `K`: the model's own step
/// ([`ModelSteps`]), or kiln's backward from its loss ([`LossSteps`]).
pub(crate) struct StepWork<'a, I, T, V, K> {
    pub data: &'a Datasets<I, T, V>,
    pub steps: K,
}

impl<I, T, V, K> StepWork<'_, I, T, V, K> {
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

/// A Burn model's own passes: its `TrainStep` and its inner module's
/// `InferenceStep`.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct ModelSteps;

impl<B, M, I, T, V, K> Workload<B, M> for StepWork<'_, I, T, V, K>
where
    B: AutodiffBackend,
    M: TrainModel<B>,
    I: Send + Sync,
    T: TrainBatcher<B, I, M>,
    V: ValidBatcher<B, I, M>,
    K: Steps<B, M, Batch = M::Input>
        + Validates<
            B::InnerBackend,
            M::InnerModule,
            ValidBatch = <M::InnerModule as InferenceStep>::Input,
        >,
{
    type Steps = K;

    fn steps(&self) -> K {
        self.steps.clone()
    }

    fn len(&self, split: Split) -> usize {
        self.data.len(split)
    }

    fn batch(&self, indices: &[usize], device: &B::Device) -> Result<M::Input> {
        let items = self.items(Split::Train, indices)?;
        Ok(Batcher::<B, I, M::Input>::batch(
            &*self.data.batcher,
            items,
            device,
        ))
    }

    fn valid_batch(
        &self,
        indices: &[usize],
        device: &B::Device,
    ) -> Result<<M::InnerModule as InferenceStep>::Input> {
        let items = self.items(Split::Valid, indices)?;
        Ok(Batcher::<B::InnerBackend, I, _>::batch(
            &*self.data.valid_batcher,
            items,
            device,
        ))
    }
}

impl<B: AutodiffBackend, M: TrainModel<B>> Steps<B, M> for ModelSteps {
    type Batch = M::Input;

    const KILN_BACKWARD: bool = false;

    fn backward(
        &self,
        model: &M,
        batch: M::Input,
        micro: &MicroStep,
        extra: Option<Tensor<B, 1>>,
    ) -> Result<Passed, Failure> {
        if extra.is_some() {
            // The coordinator refuses the backend's synchronisation for such a
            // model (`Workload::KILN_BACKWARD`); this is its last guard.
            return Err(Failure::Error(CoordinatorError::NotAvailable {
                what: "a term added to the loss of a model with its own TrainStep".into(),
                reason: "the model's step runs its own backward pass".into(),
            }));
        }
        // The model's own step runs backward; its gradients are weighted after
        // (the same sum as weighting the loss, up to float rounding).
        let TrainOutput { mut grads, item } = model.step(batch);
        let value = item.loss_value();
        micro.check(value)?;
        let factor = micro.factor();
        if factor != 1.0 {
            grad::scale::<B, M>(model, &mut grads, factor);
        }
        Ok(Passed {
            grads,
            loss: value,
            metrics: logged_metrics(micro, &item),
        })
    }
}

impl<IB, IM> Validates<IB, IM> for ModelSteps
where
    IB: Backend,
    IM: InferenceStep,
    IM::Output: StepOutput<IB>,
{
    type ValidBatch = IM::Input;

    fn evaluate(
        &self,
        model: &IM,
        batch: IM::Input,
        examples: usize,
        _precision: Precision,
    ) -> Result<EvalSums> {
        Ok(inference_sums::<IB, IM>(model, batch, examples))
    }
}

/// The further metrics of a step's `output`, on logged steps only (some, such as
/// AUROC or the error rates, cost a pass over the output).
fn logged_metrics<B: Backend, O: StepOutput<B>>(micro: &MicroStep, output: &O) -> OutputMetrics {
    match micro.logged {
        true => output.metrics(),
        false => Vec::new(),
    }
}

/// The sums of one validation batch of `examples` examples through the model's
/// own `InferenceStep`: each batch weighs as many examples as it holds.
fn inference_sums<IB, IM>(model: &IM, batch: IM::Input, examples: usize) -> EvalSums
where
    IB: Backend,
    IM: InferenceStep,
    IM::Output: StepOutput<IB>,
{
    let output = model.step(batch);
    EvalSums::of_batch(output.loss_value(), examples as f64, &output.metrics())
}

/// A Burn model as `fit` takes it, the bounds named once: a `TrainStep` on the
/// autodiff backend whose inner module is an `InferenceStep`, both with outputs
/// kiln reads ([`StepOutput`]). Every such model is one (a blanket impl).
pub trait TrainModel<B: AutodiffBackend>:
    AutodiffModule<B, InnerModule: InferenceStep<Output: StepOutput<B::InnerBackend>>>
    + TrainStep<Output: StepOutput<B>>
    + 'static
{
}

impl<B, M> TrainModel<B> for M
where
    B: AutodiffBackend,
    M: AutodiffModule<B> + TrainStep + 'static,
    M::Output: StepOutput<B>,
    M::InnerModule: InferenceStep,
    <M::InnerModule as InferenceStep>::Output: StepOutput<B::InnerBackend>,
{
}

/// A batcher of items `I` into model `M`'s training input, on the autodiff
/// backend (what [`Datasets`]' `T` is). Every such batcher is one.
pub trait TrainBatcher<B: AutodiffBackend, I, M: TrainModel<B>>: Batcher<B, I, M::Input> {}

impl<B, I, M, T> TrainBatcher<B, I, M> for T
where
    B: AutodiffBackend,
    M: TrainModel<B>,
    T: Batcher<B, I, M::Input>,
{
}

/// A batcher of items `I` into model `M`'s validation input, on the inner backend
/// (what [`Datasets`]' `V` is). Every such batcher is one.
pub trait ValidBatcher<B: AutodiffBackend, I, M: TrainModel<B>>:
    Batcher<B::InnerBackend, I, <M::InnerModule as InferenceStep>::Input>
{
}

impl<B, I, M, V> ValidBatcher<B, I, M> for V
where
    B: AutodiffBackend,
    M: TrainModel<B>,
    V: Batcher<B::InnerBackend, I, <M::InnerModule as InferenceStep>::Input>,
{
}

/// A batcher of items `I` for model `M` (a [`TrainModel`]) that serves both splits:
/// its training input on the autodiff backend, its validation input on the inner
/// backend (a batcher generic over the backend is both). Every such batcher is one.
pub trait ModelBatcher<B: AutodiffBackend, I, M: TrainModel<B>>:
    TrainBatcher<B, I, M> + ValidBatcher<B, I, M>
{
}

impl<B, I, M, T> ModelBatcher<B, I, M> for T
where
    B: AutodiffBackend,
    M: TrainModel<B>,
    T: TrainBatcher<B, I, M> + ValidBatcher<B, I, M>,
{
}

/// A model with its own `TrainStep` whose step kiln can also run up to the loss,
/// taking the backward pass itself: what such a model implements to train in
/// `bf16-mixed` or `16-mixed`, whose working copy and loss scaling sit between the
/// loss and backward (Lightning's `training_step` returning the loss). Trained
/// through [`TrainingCoordinator::fit_with_loss`](crate::TrainingCoordinator::fit_with_loss).
///
/// ```
/// use burn::prelude::*;
/// use burn::tensor::FloatDType;
/// use burn::tensor::backend::AutodiffBackend;
/// use burn::train::{RegressionOutput, TrainOutput, TrainStep};
/// use kiln_coordinator::LossStep;
///
/// #[derive(Module, Debug)]
/// struct Model<B: Backend> {
///     linear: burn::nn::Linear<B>,
/// }
///
/// struct Batch<B: Backend> {
///     x: Tensor<B, 2>,
///     y: Tensor<B, 2>,
/// }
///
/// impl<B: AutodiffBackend> TrainStep for Model<B> {
///     type Input = Batch<B>;
///     type Output = RegressionOutput<B>;
///
///     fn step(&self, batch: Batch<B>) -> TrainOutput<RegressionOutput<B>> {
///         let (loss, output) = self.forward_loss(batch);
///         TrainOutput::new(self, loss.backward(), output)
///     }
/// }
///
/// impl<B: AutodiffBackend> LossStep<B> for Model<B> {
///     fn forward_loss(&self, batch: Batch<B>) -> (Tensor<B, 1>, RegressionOutput<B>) {
///         let output = self.linear.forward(batch.x);
///         let loss = (output.clone() - batch.y.clone()).powi_scalar(2).mean();
///         (loss.clone(), RegressionOutput::new(loss, output, batch.y))
///     }
///
///     fn cast_input(batch: Batch<B>, dtype: FloatDType) -> Batch<B> {
///         Batch { x: batch.x.cast(dtype), ..batch }
///     }
/// }
/// ```
pub trait LossStep<B: AutodiffBackend>: TrainStep {
    /// The step's forward pass without backward: the loss to minimise (one
    /// element; kiln takes it in f32) and the output the step returns.
    fn forward_loss(&self, input: Self::Input) -> (Tensor<B, 1>, Self::Output);

    /// `input` with its float tensors cast to `dtype`, the dtype a mixed
    /// precision computes in (integer tensors such as class ids stay as they are).
    fn cast_input(input: Self::Input, dtype: FloatDType) -> Self::Input;
}

/// Kiln's backward pass from a [`LossStep`]'s loss: every mixed precision runs.
pub(crate) struct LossSteps<B, M>(PhantomData<fn() -> (B, M)>);

impl<B, M> Clone for LossSteps<B, M> {
    fn clone(&self) -> Self {
        Self::default()
    }
}

impl<B, M> Default for LossSteps<B, M> {
    fn default() -> Self {
        Self(PhantomData)
    }
}

impl<B, M> Steps<B, M> for LossSteps<B, M>
where
    B: AutodiffBackend,
    M: TrainModel<B> + LossStep<B>,
{
    type Batch = M::Input;

    const KILN_BACKWARD: bool = true;

    fn backward(
        &self,
        model: &M,
        batch: M::Input,
        micro: &MicroStep,
        extra: Option<Tensor<B, 1>>,
    ) -> Result<Passed, Failure> {
        backward_from_loss(model, micro, extra, |model, dtype| {
            Ok(match dtype {
                Some(dtype) => {
                    let (loss, output) = model.forward_loss(M::cast_input(batch, dtype));
                    (loss.cast(FloatDType::F32), logged_metrics(micro, &output))
                }
                None => {
                    let (loss, output) = model.forward_loss(batch);
                    (loss, logged_metrics(micro, &output))
                }
            })
        })
    }
}

impl<B: AutodiffBackend, M: TrainModel<B>> Validates<B::InnerBackend, M::InnerModule>
    for LossSteps<B, M>
{
    type ValidBatch = <M::InnerModule as InferenceStep>::Input;

    /// Mixed precisions validate the f32 masters; true ones an f32 copy of the
    /// stored model (the batch, built in f32, is the model's to cast, and its
    /// `InferenceStep` has no cast).
    fn evaluate(
        &self,
        model: &M::InnerModule,
        batch: Self::ValidBatch,
        examples: usize,
        precision: Precision,
    ) -> Result<EvalSums> {
        Ok(match precision::stored_dtype(precision) {
            Some(_) => {
                let f32_copy = precision::working_copy(model, FloatDType::F32);
                inference_sums::<B::InnerBackend, _>(&f32_copy, batch, examples)
            }
            None => inference_sums::<B::InnerBackend, _>(model, batch, examples),
        })
    }
}

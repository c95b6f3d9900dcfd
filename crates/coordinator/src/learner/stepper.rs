//! [`Stepper`]: a kiln model as burn-train's `TrainStep`/`InferenceStep`.
//!
//! burn-train calls, per micro-batch, `lr_step`, `TrainStep::step` and then
//! `TrainStep::optimize`. kiln keeps its own semantics inside those calls, so that
//! both engines take the same steps: the loss of the task kind, gradients averaged
//! over an accumulation group (burn-train would sum them and drop an epoch's last
//! short group), global-norm clipping (burn-train clips per tensor), the schedule
//! evaluated per optimizer step, and checkpoints taken between steps.

use std::marker::PhantomData;

use burn::module::{AutodiffModule, Devices, Module, ModuleMapper, ModuleVisitor};
use burn::optim::{GradientsAccumulator, GradientsParams, Optimizer};
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;
use burn::train::metric::{Adaptor, ItemLazy, LossInput};
use burn::train::{InferenceStep, TrainOutput, TrainStep};
use kiln_core::{Batch, TaskModel};

use super::shared::{Event, SharedRef};
use crate::checkpoint::Snapshot;
use crate::native::post_process;
use crate::objective;
use crate::run::{Failure, SaveAt, StepRecord};

/// A kiln model wrapped for burn-train; its parameters are the model's (the
/// [`Module`] implementation delegates every call to it).
#[derive(Debug, Clone)]
pub(crate) struct Stepper<B: Backend, M> {
    pub model: M,
    shared: SharedRef,
    backend: PhantomData<B>,
}

impl<B: Backend, M> Stepper<B, M> {
    pub fn new(model: M, shared: SharedRef) -> Self {
        Self {
            model,
            shared,
            backend: PhantomData,
        }
    }
}

impl<B: Backend, M: Module<B>> Module<B> for Stepper<B, M> {
    type Record = M::Record;

    fn collect_devices(&self, devices: Devices<B>) -> Devices<B> {
        self.model.collect_devices(devices)
    }

    fn fork(self, device: &B::Device) -> Self {
        Self::new(self.model.fork(device), self.shared)
    }

    fn to_device(self, device: &B::Device) -> Self {
        Self::new(self.model.to_device(device), self.shared)
    }

    fn visit<V: ModuleVisitor<B>>(&self, visitor: &mut V) {
        self.model.visit(visitor);
    }

    fn map<Mapper: ModuleMapper<B>>(self, mapper: &mut Mapper) -> Self {
        Self::new(self.model.map(mapper), self.shared)
    }

    fn load_record(self, record: Self::Record) -> Self {
        Self::new(self.model.load_record(record), self.shared)
    }

    fn into_record(self) -> Self::Record {
        self.model.into_record()
    }
}

impl<B: AutodiffBackend, M: AutodiffModule<B>> AutodiffModule<B> for Stepper<B, M> {
    type InnerModule = Stepper<B::InnerBackend, M::InnerModule>;

    fn valid(&self) -> Self::InnerModule {
        Stepper::new(self.model.valid(), self.shared.clone())
    }

    fn from_inner(inner: Self::InnerModule) -> Self {
        Self::new(M::from_inner(inner.model), inner.shared)
    }
}

impl<B: Backend, M: Module<B>> std::fmt::Display for Stepper<B, M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "kiln model, {} parameters", self.model.num_params())
    }
}

/// What one step hands to burn-train's event processor: the loss (NaN when the step
/// failed). kiln books its numbers itself; this feeds burn-train's own renderer.
#[derive(Debug, Clone, Copy)]
pub(crate) struct StepItem {
    pub loss: f64,
}

impl ItemLazy for StepItem {
    type ItemSync = StepItem;

    fn sync(self) -> Self::ItemSync {
        self
    }
}

impl<B: Backend> Adaptor<LossInput<B>> for StepItem {
    fn adapt(&self) -> LossInput<B> {
        LossInput::new(Tensor::from_floats([self.loss as f32], &Default::default()))
    }
}

impl<B, M> TrainStep for Stepper<B, M>
where
    B: AutodiffBackend,
    M: AutodiffModule<B> + TaskModel<B>,
{
    type Input = Batch<B>;
    type Output = StepItem;

    fn step(&self, batch: Batch<B>) -> TrainOutput<StepItem> {
        let shared = &self.shared.0;
        let nothing = |loss| TrainOutput {
            grads: GradientsParams::new(),
            item: StepItem { loss },
        };
        if shared.failed() {
            return nothing(f64::NAN);
        }
        let (epoch, batch_index, group, steps) = {
            let p = shared.position();
            (p.epoch, p.batch, p.group_len(&shared.settings), p.steps)
        };
        let forward = || -> Result<_, Failure> {
            let prediction = self.model.forward(batch.inputs)?;
            Ok(objective::loss(
                &shared.settings.kind,
                prediction,
                batch.targets,
            )?)
        };
        let loss = match forward() {
            Ok(loss) => loss,
            Err(failure) => {
                shared.fail(failure);
                return nothing(f64::NAN);
            }
        };
        let value = loss.clone().into_scalar().elem::<f64>();
        if !value.is_finite() {
            shared.fail(Failure::Diverged(format!(
                "training loss is {value} at step {} (epoch {epoch}, batch {batch_index})",
                steps + 1
            )));
            return nothing(value);
        }
        let loss = if group > 1 {
            loss.div_scalar(group as f64)
        } else {
            loss
        };
        let grads = GradientsParams::from_grads(loss.backward(), &self.model);
        let mut p = shared.position();
        p.group_losses.push(value);
        let grads = match p.pending.take() {
            None => grads,
            Some(previous) => {
                let mut sum = GradientsAccumulator::<M>::new();
                sum.accumulate(&self.model, previous);
                sum.accumulate(&self.model, grads);
                sum.grads()
            }
        };
        p.batch += 1;
        if p.group_losses.len() == group {
            p.ready = Some(grads);
        } else {
            p.pending = Some(grads);
        }
        // burn-train gets no gradients from kiln: the step happens in `optimize`,
        // with the group's gradients, once the group is complete.
        nothing(value)
    }

    fn optimize<BO, O>(self, optim: &mut O, _lr: f64, _grads: GradientsParams) -> Self
    where
        BO: AutodiffBackend,
        O: Optimizer<Self, BO>,
        Self: AutodiffModule<BO>,
    {
        let shared = self.shared.0.clone();
        let settings = &shared.settings;
        let (mut grads, losses, epoch, batch, steps) = {
            let mut p = shared.position();
            let Some(grads) = p.ready.take() else {
                return self;
            };
            let losses = std::mem::take(&mut p.group_losses);
            (grads, losses, p.epoch, p.batch, p.steps)
        };
        let step = steps + 1;
        let logging = step.is_multiple_of(settings.log_every_n_steps) || step == settings.total;
        let clip = settings.gradient_clip_val;
        let norm =
            match post_process::<B, M>(clip, &self.model, &mut grads, logging, None, step, epoch) {
                Ok(norm) => norm,
                Err(failure) => {
                    shared.fail(failure);
                    return self;
                }
            };
        let lr = settings
            .schedule
            .lr_at(settings.base_lr, steps, settings.total);
        let stepped = optim.step(lr, self, grads);

        let mut p = shared.position();
        p.steps = step;
        let record = StepRecord {
            step,
            epoch,
            loss: losses.iter().sum::<f64>() / losses.len().max(1) as f64,
            lr,
            grad_norm: norm,
            logging,
            loss_scale: None,
            samples: p.samples,
            train_seconds: p.train_seconds(),
        };
        shared.send(Event::Step(record));
        let last = step >= settings.total;
        if last {
            p.optimizer_state_bytes = crate::checkpoint::encoded_len::<BO, _>(optim.to_record());
        }
        if let Some(policy) = &settings.checkpoints {
            let epoch_done = batch == settings.per_epoch;
            let time_due = p.clock.time_due(policy);
            if let Some(when) = p
                .clock
                .due_at(policy, step, epoch, epoch_done, last, time_due)
            {
                match Snapshot::take::<B, M, BO, _>(&stepped.model, optim.to_record()) {
                    Ok(snapshot) => {
                        p.clock.saved(step);
                        drop(p);
                        shared.send(Event::Save {
                            snapshot,
                            epoch,
                            batch,
                            after_validation: when == SaveAt::AfterValidation,
                        });
                    }
                    Err(e) => {
                        drop(p);
                        shared.fail(Failure::Error(e));
                    }
                }
            }
        }
        stepped
    }
}

impl<B, M> InferenceStep for Stepper<B, M>
where
    B: Backend,
    M: Module<B> + TaskModel<B>,
{
    type Input = Batch<B>;
    type Output = StepItem;

    fn step(&self, batch: Batch<B>) -> StepItem {
        let shared = &self.shared.0;
        if shared.failed() {
            return StepItem { loss: f64::NAN };
        }
        let evaluate = || -> Result<_, Failure> {
            let prediction = self.model.forward(batch.inputs)?;
            Ok(objective::evaluate(
                &shared.settings.kind,
                prediction,
                batch.targets,
            )?)
        };
        match evaluate() {
            Ok(sums) => {
                shared.send(Event::ValidBatch(sums));
                StepItem {
                    loss: sums.loss_sum / sums.count.max(1.0),
                }
            }
            Err(failure) => {
                shared.fail(failure);
                StepItem { loss: f64::NAN }
            }
        }
    }
}

//! [`Stepper`]: a model and its workload's [`Steps`] as burn-train's
//! `TrainStep`/`InferenceStep`, and [`StepperOptim`], the run's optimizer for it.
//!
//! burn-train calls, per micro-batch, `lr_step`, `TrainStep::step` and then
//! `TrainStep::optimize`. kiln keeps its own semantics inside those calls, so that
//! both engines take the same steps: the workload's passes (a task kind's loss, or
//! the model's own `TrainStep`) with Burn's RNG seeded per micro-batch, gradients
//! averaged over an accumulation group (burn-train would sum them and drop an
//! epoch's last short group), global-norm clipping (burn-train clips per tensor),
//! the run's scheduler stepped once per optimizer step (burn-train steps its own
//! per micro-batch), and checkpoints taken between steps.

use std::marker::PhantomData;
use std::panic::AssertUnwindSafe;

use burn::module::{AutodiffModule, Devices, Module, ModuleMapper, ModuleVisitor};
use burn::optim::{GradientsAccumulator, GradientsParams, MultiGradientsParams, Optimizer};
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;
use burn::train::metric::{Adaptor, ItemLazy, LossInput};
use burn::train::{InferenceStep, TrainOutput, TrainStep};

use super::group::Member;
use super::loader::{Counted, Micro};
use super::shared::{Event, SharedRef};
use crate::checkpoint::Snapshot;
use crate::run::{Failure, SaveAt, StepRecord, ready_gradients};
use crate::step::MicroStep;
use crate::sync::zero_over_params;
use crate::workload::{Steps, Validates};

/// A model wrapped for burn-train with what runs on its batches (`St`, the
/// workload's [`Steps`]); its parameters are the model's (the [`Module`]
/// implementation delegates every call to it).
#[derive(Clone)]
pub(crate) struct Stepper<B: Backend, M, St> {
    pub model: M,
    steps: St,
    shared: SharedRef,
    backend: PhantomData<B>,
}

impl<B: Backend, M, St> Stepper<B, M, St> {
    pub fn new(model: M, steps: St, shared: SharedRef) -> Self {
        Self {
            model,
            steps,
            shared,
            backend: PhantomData,
        }
    }

    /// The same wrapper around `change(self.model)`.
    fn with_model(self, change: impl FnOnce(M) -> M) -> Self {
        Self::new(change(self.model), self.steps, self.shared)
    }
}

impl<B: Backend, M: std::fmt::Debug, St> std::fmt::Debug for Stepper<B, M, St> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stepper")
            .field("model", &self.model)
            .finish()
    }
}

impl<B, M, St> Module<B> for Stepper<B, M, St>
where
    B: Backend,
    M: Module<B>,
    St: Clone + Send + Sync + 'static,
{
    type Record = M::Record;

    fn collect_devices(&self, devices: Devices<B>) -> Devices<B> {
        self.model.collect_devices(devices)
    }

    fn fork(self, device: &B::Device) -> Self {
        self.with_model(|model| model.fork(device))
    }

    fn to_device(self, device: &B::Device) -> Self {
        self.with_model(|model| model.to_device(device))
    }

    fn visit<V: ModuleVisitor<B>>(&self, visitor: &mut V) {
        self.model.visit(visitor);
    }

    fn map<Mapper: ModuleMapper<B>>(self, mapper: &mut Mapper) -> Self {
        self.with_model(|model| model.map(mapper))
    }

    fn load_record(self, record: Self::Record) -> Self {
        self.with_model(|model| model.load_record(record))
    }

    fn into_record(self) -> Self::Record {
        self.model.into_record()
    }
}

impl<B, M, St> AutodiffModule<B> for Stepper<B, M, St>
where
    B: AutodiffBackend,
    M: AutodiffModule<B>,
    St: Clone + Send + Sync + 'static,
{
    type InnerModule = Stepper<B::InnerBackend, M::InnerModule, St>;

    fn valid(&self) -> Self::InnerModule {
        Stepper::new(self.model.valid(), self.steps.clone(), self.shared.clone())
    }

    fn from_inner(inner: Self::InnerModule) -> Self {
        Self::new(M::from_inner(inner.model), inner.steps, inner.shared)
    }
}

impl<B: Backend, M: Module<B>, St> std::fmt::Display for Stepper<B, M, St> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "kiln model, {} parameters", self.model.num_params())
    }
}

/// The run's optimizer `O` (for model `M`) as the optimizer of its [`Stepper`]:
/// the same state, the same record.
#[derive(Clone)]
pub(crate) struct StepperOptim<O>(pub O);

impl<B, M, St, O> Optimizer<Stepper<B, M, St>, B> for StepperOptim<O>
where
    B: AutodiffBackend,
    M: AutodiffModule<B>,
    St: Clone + Send + Sync + 'static,
    O: Optimizer<M, B>,
{
    type Record = O::Record;

    fn step(
        &mut self,
        lr: f64,
        stepper: Stepper<B, M, St>,
        grads: GradientsParams,
    ) -> Stepper<B, M, St> {
        stepper.with_model(|model| self.0.step(lr, model, grads))
    }

    fn step_multi(
        &mut self,
        lr: f64,
        stepper: Stepper<B, M, St>,
        grads: MultiGradientsParams,
    ) -> Stepper<B, M, St> {
        stepper.with_model(|model| self.0.step_multi(lr, model, grads))
    }

    fn to_record(&self) -> Self::Record {
        self.0.to_record()
    }

    fn load_record(self, record: Self::Record) -> Self {
        Self(self.0.load_record(record))
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

impl<B, M, St> TrainStep for Stepper<B, M, St>
where
    B: AutodiffBackend,
    M: AutodiffModule<B> + 'static,
    St: Steps<B, M>,
{
    type Input = Micro<St::Batch>;
    type Output = StepItem;

    fn step(&self, micro: Micro<St::Batch>) -> TrainOutput<StepItem> {
        let shared = &self.shared.0;
        let in_group = shared.member.is_some();
        let synced = shared.settings.backend_sync;
        let (epoch, batch_index, group, steps, failed) = {
            let p = shared.position();
            let group = p.group_len(&shared.settings);
            (p.epoch, p.batch, group, p.steps, p.failure.is_some())
        };
        // Forward and backward of this worker's examples; none once it failed (in
        // a group it still completes the accumulation group, to meet the others at
        // the exchange).
        let work = match (failed, micro.batch) {
            (false, Some(batch)) => {
                let forward = || -> Result<_, Failure> {
                    let step = MicroStep {
                        in_group,
                        group,
                        share: micro.share,
                        precision: kiln_core::Precision::F32,
                        loss_scale: None,
                        step: steps + 1,
                        epoch,
                        batch: batch_index,
                    };
                    let settings = &shared.settings;
                    let _turn = self.model.devices().first().and_then(|device| {
                        step.seed_rng::<B>(device, settings.seed, settings.rank, settings.in_turn)
                    });
                    let zero = synced.then(|| zero_over_params(&self.model)).flatten();
                    let (grads, value) = self.steps.backward(&self.model, batch, &step, zero)?;
                    Ok(Some((value, grads)))
                };
                std::panic::catch_unwind(AssertUnwindSafe(forward)).unwrap_or_else(|panic| {
                    Err(Failure::Panicked(crate::run::panic_message(panic.as_ref())))
                })
            }
            _ => Ok(None),
        };
        // Under the backend's synchronisation every worker runs a backward pass
        // over every parameter for every micro-batch, or the others wait for it:
        // one that has no examples here, or failed, runs a zero loss.
        let work = match work {
            Ok(None) | Err(_) if synced => {
                let zero = || {
                    zero_over_params(&self.model)
                        .map(|zero| GradientsParams::from_grads(zero.backward(), &self.model))
                };
                let grads = std::panic::catch_unwind(AssertUnwindSafe(zero))
                    .ok()
                    .flatten();
                match (work, grads) {
                    (Ok(_), Some(grads)) => Ok(Some((0.0, grads))),
                    (work, _) => work,
                }
            }
            work => work,
        };
        let (value, grads) = match work {
            Ok(Some((value, grads))) => (value, Some(grads)),
            Ok(None) => (0.0, None),
            Err(failure) => {
                let value = match &failure {
                    Failure::Diverged(_) => f64::NAN,
                    _ => 0.0,
                };
                shared.fail(failure);
                (value, None)
            }
        };
        let mut p = shared.position();
        // This worker's share of the step's loss (the whole of it on one device).
        p.group_losses.push(value * micro.share);
        if let Some(grads) = grads {
            p.pending = Some(match p.pending.take() {
                None => grads,
                Some(previous) => {
                    let mut sum = GradientsAccumulator::<M>::new();
                    sum.accumulate(&self.model, previous);
                    sum.accumulate(&self.model, grads);
                    sum.grads()
                }
            });
        }
        p.batch += 1;
        p.ready = p.group_losses.len() == group;
        // burn-train gets no gradients from kiln: the step happens in `optimize`,
        // with the group's gradients, once the group is complete.
        TrainOutput {
            grads: GradientsParams::new(),
            item: StepItem { loss: value },
        }
    }

    fn optimize<BO, O>(self, optim: &mut O, _: f64, _: GradientsParams) -> Self
    where
        BO: AutodiffBackend,
        O: Optimizer<Self, BO>,
        Self: AutodiffModule<BO>,
    {
        let shared = self.shared.0.clone();
        let settings = &shared.settings;
        let member = shared
            .member
            .as_ref()
            .and_then(|m| m.downcast_ref::<Member<B, M>>());
        let (grads, losses, epoch, batch, steps) = {
            let mut p = shared.position();
            // On one device a failure ends the run at once: no step.
            if !p.ready || (member.is_none() && p.failure.is_some()) {
                return self;
            }
            p.ready = false;
            let losses = std::mem::take(&mut p.group_losses);
            (p.pending.take(), losses, p.epoch, p.batch, p.steps)
        };
        let step = steps + 1;
        let logging = step.is_multiple_of(settings.log_every_n_steps) || step == settings.total;
        let loss = losses.iter().sum::<f64>() / losses.len().max(1) as f64;
        let time_due = |rank: usize| {
            rank == 0
                && settings
                    .checkpoints
                    .as_ref()
                    .is_some_and(|policy| shared.position().clock.time_due(policy))
        };
        let (mut grads, loss, time_due) = match member {
            None => (grads.unwrap_or_default(), loss, time_due(0)),
            Some(member) => match member.exchange(
                &shared,
                &self.model,
                grads,
                loss,
                time_due(member.rank),
                step,
            ) {
                Ok(summed) => summed,
                Err(failure) => {
                    shared.end_with(Some(failure));
                    return self;
                }
            },
        };
        let lr = shared.step_lr();
        let owner = member.filter(|m| m.sharded);
        let owns = |i| owner.is_some_and(|m| m.owns(i));
        let norm = match ready_gradients::<B, M>(
            settings.gradient_clip_val,
            &self.model,
            &mut grads,
            logging,
            None,
            owner.map(|_| &owns as &dyn Fn(usize) -> bool),
            step,
            epoch,
        ) {
            Ok(norm) => norm,
            Err(failure) => {
                // Every worker holds the same summed gradients: all end here.
                shared.end_with(Some(failure));
                return self;
            }
        };
        let mut stepped = optim.step(lr, self, grads);
        if let Some(member) = member.filter(|m| m.sharded) {
            match member.gather(&shared, stepped.model.clone()) {
                // The gathered parameters are new tensors: marked again for the
                // backend's synchronisation when it runs.
                Ok(model) if settings.backend_sync => stepped.model = crate::sync::mark(model),
                Ok(model) => stepped.model = model,
                Err(failure) => {
                    shared.end_with(Some(failure));
                    return stepped;
                }
            }
        }

        if let Some(member) = member.filter(|_| settings.check_replicas) {
            member.check(&shared, &stepped.model, step);
        }

        let mut p = shared.position();
        p.steps = step;
        let record = StepRecord {
            step,
            epoch,
            loss,
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
            if let Some(when) = p
                .clock
                .due_at(policy, step, epoch, epoch_done, last, time_due)
            {
                p.clock.saved(step);
                drop(p);
                let snapshot = match member {
                    // fsdp: every worker hands its optimizer shard to rank 0.
                    Some(member) if member.sharded => member
                        .whole_record::<BO, _>(optim.to_record())
                        .map(|record| record.and_then(|r| Snapshot::with_optim(&stepped.model, r))),
                    Some(member) if member.rank != 0 => None,
                    _ => Some(Snapshot::take::<B, M, BO, _>(
                        &stepped.model,
                        optim.to_record(),
                    )),
                }
                .map(|snapshot| snapshot.and_then(|s| shared.with_scheduler(s)));
                match snapshot {
                    Some(Ok(snapshot)) => shared.send(Event::Save {
                        snapshot,
                        epoch,
                        batch,
                        after_validation: when == SaveAt::AfterValidation,
                    }),
                    Some(Err(e)) => shared.fail(Failure::Error(e)),
                    None => {}
                }
            }
        }
        stepped
    }
}

impl<IB, IM, St> InferenceStep for Stepper<IB, IM, St>
where
    IB: Backend,
    IM: Module<IB>,
    St: Validates<IB, IM>,
{
    type Input = Counted<St::ValidBatch>;
    type Output = StepItem;

    fn step(&self, counted: Counted<St::ValidBatch>) -> StepItem {
        let shared = &self.shared.0;
        if shared.failed() {
            return StepItem { loss: f64::NAN };
        }
        let Counted { batch, examples } = counted;
        let evaluate = || {
            Ok(self
                .steps
                .evaluate(&self.model, batch, examples, kiln_core::Precision::F32)?)
        };
        // A panic is this worker's failure (in a group, told at the next exchange).
        let evaluated =
            std::panic::catch_unwind(AssertUnwindSafe(evaluate)).unwrap_or_else(|panic| {
                Err(Failure::Panicked(crate::run::panic_message(panic.as_ref())))
            });
        match evaluated {
            Ok(sums) => {
                let loss = sums.loss_sum / sums.count.max(1.0);
                shared.send(Event::ValidBatch(sums));
                StepItem { loss }
            }
            Err(failure) => {
                shared.fail(failure);
                StepItem { loss: f64::NAN }
            }
        }
    }
}

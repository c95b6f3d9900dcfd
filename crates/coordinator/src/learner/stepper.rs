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
use burn::optim::{GradientsParams, MultiGradientsParams, Optimizer};
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;
use burn::train::metric::{Adaptor, ItemLazy, LossInput};
use burn::train::{InferenceStep, TrainOutput, TrainStep};

use super::loader::{Counted, Micro};
use super::member::Member;
use super::shared::{Event, Shared, SharedRef};
use crate::checkpoint::Snapshot;
use crate::precision::LossScaler;
use crate::run::{Failure, SaveAt, StepRecord};
use crate::step::{MicroStep, Passed};
use crate::sync::zero_over_params;
use crate::update::{StepAt, StepEngine, Summed, take_step};
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
        let (epoch, batch_index, group, steps, failed, loss_scale) = {
            let p = shared.position();
            let group = p.group_len(&shared.settings);
            let scale = p.scaler.as_ref().map(LossScaler::scale);
            (p.epoch, p.batch, group, p.steps, p.failure.is_some(), scale)
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
                        precision: shared.settings.precision,
                        loss_scale,
                        logged: shared.settings.rank == 0
                            && StepRecord::is_logged(
                                shared.settings.log_every_n_steps,
                                steps + 1,
                                shared.settings.total,
                            ),
                        step: steps + 1,
                        epoch,
                        batch: batch_index,
                    };
                    let settings = &shared.settings;
                    let _turn = self.model.devices().first().and_then(|device| {
                        step.seed_rng::<B>(device, settings.seed, settings.rank, settings.in_turn)
                    });
                    let zero = synced.then(|| zero_over_params(&self.model)).flatten();
                    Ok(Some(self.steps.backward(
                        &self.model,
                        batch,
                        &step,
                        zero,
                    )?))
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
                    (Ok(_), Some(grads)) => Ok(Some(Passed {
                        grads,
                        loss: 0.0,
                        metrics: Vec::new(),
                    })),
                    (work, _) => work,
                }
            }
            work => work,
        };
        let (value, grads, metrics) = match work {
            Ok(Some(passed)) => (passed.loss, Some(passed.grads), passed.metrics),
            Ok(None) => (0.0, None, Vec::new()),
            Err(failure) => {
                let value = match &failure {
                    Failure::Diverged(_) => f64::NAN,
                    _ => 0.0,
                };
                shared.fail(failure);
                (value, None, Vec::new())
            }
        };
        let mut p = shared.position();
        // This worker's share of the step's loss (the whole of it on one device).
        p.accumulated
            .add(&self.model, grads, value, micro.share, &metrics);
        p.batch += 1;
        p.ready = p.accumulated.len() == group;
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
        let (summed, epoch, batch, steps) = {
            let mut p = shared.position();
            // On one device a failure ends the run at once: no step.
            if !p.ready || (member.is_none() && p.failure.is_some()) {
                return self;
            }
            p.ready = false;
            let accumulated = std::mem::take(&mut p.accumulated);
            (accumulated.finish(), p.epoch, p.batch, p.steps)
        };
        let Summed {
            grads,
            loss,
            metrics,
        } = summed;
        let step = steps + 1;
        let logging = StepRecord::is_logged(settings.log_every_n_steps, step, settings.total);
        let time_due = |rank: usize| {
            rank == 0
                && settings
                    .checkpoints
                    .as_ref()
                    .is_some_and(|policy| shared.position().clock.time_due(policy))
        };
        let (grads, loss, time_due) = match member {
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
        let owner = member.filter(|m| m.sharded);
        let owns = |i| owner.is_some_and(|m| m.owns(i));
        let at = StepAt {
            step,
            epoch,
            loss,
            logging,
            metrics,
            clip: settings.gradient_clip_val,
            owns: owner.map(|_| &owns as &dyn Fn(usize) -> bool),
        };
        let mut engine = LearnerStep {
            optim: &mut *optim,
            shared: &shared,
            member,
            backend: PhantomData,
        };
        // The scaler is taken out of the shared state for the step (the engine
        // locks that state itself).
        let mut scaler = shared.position().scaler.take();
        let (stepped, record) =
            take_step::<BO, Self, _>(&mut engine, self, grads, at, scaler.as_mut());
        let loss_scale = scaler.as_ref().map(LossScaler::state);
        shared.position().scaler = scaler;
        let record = match record {
            Ok(record) => record,
            Err(failure) => {
                shared.end_with(Some(failure));
                return stepped;
            }
        };

        let mut p = shared.position();
        p.steps = step;
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
                        loss_scale,
                    }),
                    Some(Err(e)) => shared.fail(Failure::Error(e)),
                    None => {}
                }
            }
        }
        stepped
    }
}

/// The Learner engine's side of an optimizer step ([`take_step`]): burn-train's
/// optimizer on the stepper, the run's scheduler through the shared state, and
/// the worker's [`Member`] for fsdp's gather and the replica check.
struct LearnerStep<'a, O, BO, B: AutodiffBackend, M> {
    optim: &'a mut O,
    shared: &'a Shared,
    member: Option<&'a Member<B, M>>,
    backend: PhantomData<BO>,
}

impl<O, BO, B, M, St> StepEngine<Stepper<B, M, St>> for LearnerStep<'_, O, BO, B, M>
where
    BO: AutodiffBackend,
    O: Optimizer<Stepper<B, M, St>, BO>,
    B: AutodiffBackend,
    M: AutodiffModule<B> + 'static,
    St: Steps<B, M>,
    Stepper<B, M, St>: AutodiffModule<BO>,
{
    fn lr(&mut self) -> f64 {
        self.shared.step_lr()
    }

    fn optimize(
        &mut self,
        stepper: Stepper<B, M, St>,
        lr: f64,
        grads: GradientsParams,
    ) -> Stepper<B, M, St> {
        self.optim.step(lr, stepper, grads)
    }

    fn gather(
        &mut self,
        stepper: &Stepper<B, M, St>,
    ) -> Result<Option<Stepper<B, M, St>>, Failure> {
        let Some(member) = self.member.filter(|m| m.sharded) else {
            return Ok(None);
        };
        let model = member.gather(self.shared, stepper.model.clone())?;
        // The gathered parameters are new tensors: marked again for the backend's
        // synchronisation when it runs.
        let model = match self.shared.settings.backend_sync {
            true => crate::sync::mark(model),
            false => model,
        };
        Ok(Some(Stepper::new(
            model,
            stepper.steps.clone(),
            stepper.shared.clone(),
        )))
    }

    fn check(&mut self, stepper: &Stepper<B, M, St>, step: u64) -> Result<(), Failure> {
        // A difference is this worker's failure, told at the next exchange.
        if let Some(member) = self.member.filter(|_| self.shared.settings.check_replicas) {
            member.check(self.shared, &stepper.model, step);
        }
        Ok(())
    }

    fn counters(&self) -> (u64, f64) {
        let p = self.shared.position();
        (p.samples, p.train_seconds())
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
                .evaluate(&self.model, batch, examples, shared.settings.precision)?)
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

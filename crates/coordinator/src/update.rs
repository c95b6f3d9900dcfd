//! One optimizer step of either engine, from its micro-batches to its record.
//!
//! A step is taken in three parts, and this module holds the two that come after
//! the micro-batches' passes (`crate::step`):
//! 1. each micro-batch's gradients and share-weighted loss are summed over the
//!    accumulation group ([`Accumulation`]);
//! 2. the engine sums them over a data-parallel group: the native loop through its
//!    `Peer`, the Learner engine through its `Member` (both `crate::group`'s
//!    exchange);
//! 3. [`take_step`]: `16-mixed`'s unscaling and skip rule, the learning rate, the
//!    gradients readied (`run::ready_gradients`: clipping, the norm, fsdp's shard),
//!    the optimizer's update, fsdp's gather of the updated parameters, the replica
//!    check, and the step's [`StepRecord`].
//!
//! What differs between the engines (their scheduler, optimizer and group, how a
//! failure travels) comes in through [`StepEngine`].

use burn::module::AutodiffModule;
use burn::optim::{GradientsAccumulator, GradientsParams};
use burn::tensor::backend::AutodiffBackend;

use crate::grad::{self, global_norm};
use crate::objective::EvalSums;
use crate::precision::LossScaler;
use crate::run::{Failure, StepRecord, ready_gradients};
use crate::step::OutputMetrics;

/// The gradients and the loss of one accumulation group's micro-batches on one
/// worker, summed as they come.
#[derive(Default)]
pub(crate) struct Accumulation {
    /// Summed gradients (none yet, or none of this worker's: no share of a short
    /// global batch, or a failure).
    grads: Option<GradientsParams>,
    /// Σ micro-batch loss × this worker's share of it.
    loss: f64,
    /// The outputs' further metrics, weighted by the share likewise.
    metrics: EvalSums,
    /// Micro-batches added.
    len: usize,
}

impl Accumulation {
    /// Adds one micro-batch: its gradients, if this worker has any, and its loss
    /// and output metrics weighted by the worker's `share` of the global
    /// micro-batch (1 on one worker; 0 for a micro-batch it has no share of).
    pub fn add<B, M>(
        &mut self,
        model: &M,
        grads: Option<GradientsParams>,
        loss: f64,
        share: f64,
        metrics: &[(&'static str, f64)],
    ) where
        B: AutodiffBackend,
        M: AutodiffModule<B>,
    {
        self.loss += loss * share;
        self.len += 1;
        if !metrics.is_empty() {
            self.metrics.add(EvalSums::of_batch(loss, share, metrics));
        }
        let Some(grads) = grads else {
            return;
        };
        self.grads = Some(match self.grads.take() {
            None => grads,
            Some(previous) => {
                let mut sum = GradientsAccumulator::<M>::new();
                sum.accumulate(model, previous);
                sum.accumulate(model, grads);
                sum.grads()
            }
        });
    }

    /// Micro-batches added so far.
    #[cfg_attr(not(feature = "learner"), allow(dead_code))]
    pub fn len(&self) -> usize {
        self.len
    }

    /// The summed gradients, the group's loss (the weighted losses' mean over the
    /// micro-batches added: every micro-batch of the accumulation group, those this
    /// worker had no share of too), and this worker's mean of each output metric
    /// over its micro-batches.
    pub fn finish(self) -> Summed {
        Summed {
            grads: self.grads,
            loss: self.loss / self.len.max(1) as f64,
            metrics: self.metrics.means(),
        }
    }
}

/// An accumulation group's sums on one worker ([`Accumulation::finish`]); none
/// for a worker that failed or was stopped.
#[derive(Default)]
pub(crate) struct Summed {
    pub grads: Option<GradientsParams>,
    pub loss: f64,
    pub metrics: OutputMetrics,
}

/// Where a step stands and the rules its gradients follow.
pub(crate) struct StepAt<'a> {
    /// The step (1-based) and its epoch.
    pub step: u64,
    pub epoch: usize,
    /// The step's loss (the group's, once summed over the workers).
    pub loss: f64,
    /// Whether the step is logged ([`StepRecord::is_logged`]).
    pub logging: bool,
    /// The step outputs' further metrics (rank 0's micro-batches), when logged.
    pub metrics: OutputMetrics,
    /// `gradient_clip_val`.
    pub clip: Option<f64>,
    /// fsdp: the parameters (visiting order) this worker owns.
    pub owns: Option<&'a dyn Fn(usize) -> bool>,
}

/// What an engine brings to [`take_step`] for a model held as `T` (the model, or
/// the Learner engine's stepper around it).
pub(crate) trait StepEngine<T> {
    /// The learning rate of this step: the run's scheduler, stepped once per
    /// optimizer step.
    fn lr(&mut self) -> f64;

    /// The optimizer's update of `model` with `grads` at `lr`.
    fn optimize(&mut self, model: T, lr: f64, grads: GradientsParams) -> T;

    /// fsdp: `model` with every worker's parameters as their owners updated them
    /// (`None` under ddp and on one device: nothing to gather).
    fn gather(&mut self, model: &T) -> Result<Option<T>, Failure>;

    /// `check_replicas`: compares `model` with the other replicas after `step`. A
    /// failure the engine tells the others at the next exchange is not returned.
    fn check(&mut self, model: &T, step: u64) -> Result<(), Failure>;

    /// Examples trained on and training seconds so far, for the record.
    fn counters(&self) -> (u64, f64);
}

/// Takes one optimizer step with the group's summed `grads`: see the module's
/// documentation for the sequence. Returns the model (updated, or as it was when
/// the step failed or `16-mixed` skipped it) with the step's record or its
/// failure; on failure the run ends.
pub(crate) fn take_step<B, T, E>(
    engine: &mut E,
    model: T,
    mut grads: GradientsParams,
    at: StepAt<'_>,
    scaler: Option<&mut LossScaler>,
) -> (T, Result<StepRecord, Failure>)
where
    B: AutodiffBackend,
    T: AutodiffModule<B>,
    E: StepEngine<T>,
{
    // 16-mixed: the gradients are unscaled and checked; a step whose gradients are
    // not finite is skipped (identically on every worker: they all hold the same
    // summed gradients).
    let (take, known_norm, loss_scale) = match scaler {
        Some(scaler) => {
            grad::scale::<B, T>(&model, &mut grads, 1.0 / scaler.scale());
            let norm = global_norm::<B, T>(&model, &grads);
            let take = match scaler.update(norm.is_finite()) {
                Ok(take) => take,
                Err(message) => return (model, Err(Failure::Diverged(message))),
            };
            if !take {
                tracing::debug!(
                    step = at.step,
                    scale = scaler.scale(),
                    "16-mixed: non-finite gradients, step skipped"
                );
            }
            (take, take.then_some(norm), Some(scaler.scale()))
        }
        None => (true, None, None),
    };
    let lr = engine.lr();
    let mut model = model;
    let mut grad_norm = None;
    if take {
        grad_norm = match ready_gradients::<B, T>(
            at.clip, &model, &mut grads, at.logging, known_norm, at.owns, at.step, at.epoch,
        ) {
            Ok(norm) => norm,
            // Every worker holds the same summed gradients: all end here.
            Err(failure) => return (model, Err(failure)),
        };
        model = engine.optimize(model, lr, grads);
        match engine.gather(&model) {
            Ok(Some(gathered)) => model = gathered,
            Ok(None) => {}
            Err(failure) => return (model, Err(failure)),
        }
        if let Err(failure) = engine.check(&model, at.step) {
            return (model, Err(failure));
        }
    }
    let (samples, train_seconds) = engine.counters();
    let record = StepRecord {
        step: at.step,
        epoch: at.epoch,
        loss: at.loss,
        lr,
        grad_norm,
        logging: at.logging,
        metrics: at.metrics,
        loss_scale,
        samples,
        train_seconds,
    };
    (model, Ok(record))
}

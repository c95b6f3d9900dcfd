//! One micro-batch's forward and backward passes, as both engines take them: how
//! its loss counts in the optimizer step (accumulation, a worker's share of a
//! group's batch, `16-mixed`'s scale), the seed of Burn's RNG for it, the rule for
//! a non-finite loss, and a task model's forward, loss and backward. Both engines
//! reach it through a workload's [`Steps`](crate::workload::Steps).

use std::sync::{Mutex, MutexGuard};

use burn::module::AutodiffModule;
use burn::optim::GradientsParams;
use burn::prelude::*;
use burn::tensor::FloatDType;
use burn::tensor::backend::AutodiffBackend;
use kiln_core::rng::SplitMix64;
use kiln_core::{Batch, Precision, TaskKind, TaskModel};

use crate::objective;
use crate::precision;
use crate::run::Failure;

/// One micro-batch as the forward and backward passes see it: how its loss counts
/// in the optimizer step, the precision, and where it is (for the messages).
#[derive(Debug, Clone, Copy)]
pub(crate) struct MicroStep {
    /// In a data-parallel group: the loss is weighted by this worker's share.
    pub in_group: bool,
    /// Micro-batches in this accumulation group (the loss is averaged over them).
    pub group: usize,
    /// This worker's share of the global micro-batch (1 on one worker).
    pub share: f64,
    /// The precision that runs.
    pub precision: Precision,
    /// `16-mixed`: the loss scale.
    pub loss_scale: Option<f64>,
    /// The optimizer step is logged and this worker keeps the books (rank 0):
    /// the output's training metrics are read.
    pub logged: bool,
    /// The optimizer step this micro-batch is part of (1-based), its epoch, and the
    /// micro-batch's index in the epoch.
    pub step: u64,
    pub epoch: usize,
    pub batch: usize,
}

impl MicroStep {
    /// How the loss counts: as it is alone on one worker without accumulation,
    /// averaged over an accumulation group, or, in a group of workers, weighted by
    /// this worker's share of the global micro-batch and averaged over the
    /// accumulation group (the sum over workers is then the global batch's mean).
    fn weighting(&self) -> Weighting {
        match (self.in_group, self.group > 1) {
            (false, false) => Weighting::Whole,
            (false, true) => Weighting::Mean(self.group as f64),
            (true, _) => Weighting::Share(self.share / self.group as f64),
        }
    }

    /// The factor the loss's gradients are multiplied by, for a step that ran its
    /// own backward pass.
    pub fn factor(&self) -> f64 {
        match self.weighting() {
            Weighting::Whole => 1.0,
            Weighting::Mean(group) => 1.0 / group,
            Weighting::Share(factor) => factor,
        }
    }

    /// The loss as it enters backward.
    fn weigh<B: Backend>(&self, loss: Tensor<B, 1>) -> Tensor<B, 1> {
        match self.weighting() {
            Weighting::Whole => loss,
            Weighting::Mean(group) => loss.div_scalar(group),
            Weighting::Share(factor) => loss.mul_scalar(factor),
        }
    }

    /// The seed of Burn's RNG for this micro-batch on worker `rank` of a run seeded
    /// with `seed`: dropout and any other random op in a model draw the same
    /// numbers in two runs with one seed, on either engine, and again after a
    /// resume; every worker draws its own.
    pub fn seed(&self, seed: u64, rank: usize) -> u64 {
        let per_step = SplitMix64::derived(seed, self.step).next_u64();
        SplitMix64::derived(per_step, ((self.batch as u64) << 20) ^ rank as u64).next_u64()
    }

    /// Seeds Burn's RNG on `device` for this micro-batch on worker `rank` of a run
    /// seeded with `seed` ([`seed`](Self::seed)). `in_turn` (`deterministic`, a
    /// group of workers in one process): the returned guard is this worker's turn
    /// with the RNG, held while its passes draw from it, so that every worker's
    /// draws follow its own seed whatever the threads' timing.
    pub fn seed_rng<B: Backend>(
        &self,
        device: &B::Device,
        seed: u64,
        rank: usize,
        in_turn: bool,
    ) -> Option<MutexGuard<'static, ()>> {
        static TURN: Mutex<()> = Mutex::new(());
        let turn = in_turn.then(|| TURN.lock().unwrap_or_else(|p| p.into_inner()));
        B::seed(device, self.seed(seed, rank));
        turn
    }

    /// `error` (the batch's targets do not fit the task) with this micro-batch's
    /// place in the run.
    pub fn locate(&self, error: kiln_core::Error) -> Failure {
        let error = match error {
            kiln_core::Error::TaskMismatch(message) => kiln_core::Error::TaskMismatch(format!(
                "{message} (training step {}, epoch {}, batch {})",
                self.step, self.epoch, self.batch
            )),
            other => other,
        };
        Failure::Error(error.into())
    }

    /// `Ok` for a finite loss; a non-finite one ends the run, named here.
    pub fn check(&self, loss: f64) -> Result<(), Failure> {
        match loss.is_finite() {
            true => Ok(()),
            false => Err(Failure::Diverged(format!(
                "training loss is {loss} at step {} (epoch {}, batch {})",
                self.step, self.epoch, self.batch
            ))),
        }
    }
}

/// What one micro-batch's passes give.
pub(crate) struct Passed {
    /// The gradients of the loss, weighted as the [`MicroStep`] says.
    pub grads: GradientsParams,
    /// The loss (unweighted).
    pub loss: f64,
    /// On logged steps: the step output's further metrics (`StepOutput::metrics`),
    /// logged as `train/<name>`; none otherwise, and none for a task model.
    pub metrics: OutputMetrics,
}

/// See [`MicroStep::weighting`].
enum Weighting {
    Whole,
    Mean(f64),
    Share(f64),
}

/// A task model's forward pass, the task kind's loss and the backward pass of one
/// micro-batch, as both engines run it ([`backward_from_loss`]).
pub(crate) fn task_backward<B, M>(
    kind: &TaskKind,
    model: &M,
    batch: Batch<B>,
    micro: &MicroStep,
    extra: Option<Tensor<B, 1>>,
) -> Result<Passed, Failure>
where
    B: AutodiffBackend,
    M: AutodiffModule<B> + TaskModel<B>,
{
    backward_from_loss(model, micro, extra, |model, dtype| {
        // The inputs in the working dtype; the loss in f32.
        let prediction = match dtype {
            Some(dtype) => {
                precision::to_f32(model.forward(precision::cast_inputs(batch.inputs, dtype))?)
            }
            None => model.forward(batch.inputs)?,
        };
        let loss = objective::loss(kind, prediction, batch.targets).map_err(|e| micro.locate(e))?;
        Ok((loss, Vec::new()))
    })
}

/// The backward pass of one micro-batch from the loss `forward` computes (in f32)
/// on the model it is given, with the inputs in the dtype it is given (with the
/// output's metrics on logged steps): the gradients of the loss weighted as `micro`
/// says, on `model`'s parameters, the loss and the metrics. Mixed precisions run `forward` on a working copy in their dtype, made by
/// casting every parameter inside the autodiff graph (the gradients arrive on the
/// f32 masters in f32); true modes store `model` in their dtype already. A
/// non-finite loss is an error before backward. `extra` is added to the loss as it
/// enters backward (the zero term over every parameter of
/// `process_group_backend = nccl`); `16-mixed` scales it by the loss scale.
pub(crate) fn backward_from_loss<B, M>(
    model: &M,
    micro: &MicroStep,
    extra: Option<Tensor<B, 1>>,
    forward: impl FnOnce(&M, Option<FloatDType>) -> Result<(Tensor<B, 1>, OutputMetrics), Failure>,
) -> Result<Passed, Failure>
where
    B: AutodiffBackend,
    M: AutodiffModule<B>,
{
    let precision = micro.precision;
    let dtype = precision::working_dtype(precision);
    let copy;
    let runs = match dtype {
        Some(dtype) if !precision::is_true(precision) => {
            copy = precision::working_copy(model, dtype);
            &copy
        }
        _ => model,
    };
    let (loss, metrics) = forward(runs, dtype)?;
    let value = loss.clone().into_scalar().elem::<f64>();
    micro.check(value)?;
    let mut loss = micro.weigh(loss);
    if let Some(extra) = extra {
        loss = loss + extra;
    }
    // 16-mixed: scaled so that small f16 gradients do not underflow.
    let loss = match micro.loss_scale {
        Some(scale) => loss.mul_scalar(scale),
        None => loss,
    };
    Ok(Passed {
        grads: GradientsParams::from_grads(loss.backward(), model),
        loss: value,
        metrics,
    })
}

/// A step output's further metrics: `(name, value)`.
pub(crate) type OutputMetrics = Vec<(&'static str, f64)>;

#[cfg(test)]
mod tests {
    use super::*;

    fn micro(step: u64, batch: usize) -> MicroStep {
        MicroStep {
            in_group: true,
            group: 1,
            share: 0.5,
            precision: Precision::F32,
            loss_scale: None,
            logged: false,
            step,
            epoch: 0,
            batch,
        }
    }

    /// Every worker, micro-batch and step draws from a seed of its own (dropout
    /// masks differ across a data-parallel group), and the same one again after a
    /// resume.
    #[test]
    fn each_worker_and_micro_batch_draws_its_own_seed() {
        let seeds: Vec<u64> = [(1, 0, 0), (1, 0, 1), (1, 1, 0), (2, 0, 0), (2, 1, 1)]
            .into_iter()
            .map(|(step, batch, rank)| micro(step, batch).seed(7, rank))
            .collect();
        let distinct: std::collections::BTreeSet<_> = seeds.iter().collect();
        assert_eq!(distinct.len(), seeds.len(), "{seeds:?}");
        assert_eq!(micro(2, 1).seed(7, 1), seeds[4]);
        assert_ne!(micro(2, 1).seed(8, 1), seeds[4]);
    }
}

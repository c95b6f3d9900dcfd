//! What both engines share about one run: its inputs, its counters, where a resumed
//! run continues (its position, counters, optimizer and scheduler), when steps end
//! epochs and when checkpoints are due, and how a step and a checkpoint are booked.
//!
//! The native loop and the Learner engine train differently but must book the same
//! things the same way; keeping that here is what makes their runs, checkpoints and
//! store records interchangeable.

use std::path::Path;
use std::time::Instant;

use burn::module::AutodiffModule;
use burn::optim::lr_scheduler::LrScheduler;
use burn::optim::{GradientsParams, Optimizer, SimpleOptimizer};
use burn::prelude::Backend;
use burn::tensor::FloatDType;
use burn::tensor::backend::AutodiffBackend;
use kiln_core::rng::{SplitMix64, permutation};
use kiln_core::{CheckpointPolicy, CoordinatorConfig, TaskSpec};

use crate::CoordinatorError;
use crate::checkpoint::{self, Loaded, Signatures, Snapshot, TrainerState};
use crate::grad::{clip_global_norm, clip_to, global_norm, retain_owned};
use crate::objective::perplexity;
use crate::optim::{OptimRecord, Optimization, shard_of};
use crate::progress::Progress;
use crate::tracking::Metrics;

/// What the loop did, kept up to date so a failure can still be reported.
#[derive(Debug, Default)]
pub(crate) struct LoopStats {
    pub epochs: usize,
    pub steps: u64,
    pub step_losses: Vec<f32>,
    pub train_seconds: f64,
    pub samples: u64,
    /// Encoded size of this worker's optimizer state at the end.
    pub optimizer_state_bytes: u64,
    /// Steps skipped by loss scaling (`16-mixed`).
    pub skipped_steps: u64,
    /// Seconds spent in collective exchanges (data-parallel groups).
    pub collective_seconds: f64,
    /// With `check_replicas`: the largest replica difference seen after a step.
    pub replica_spread: Option<f64>,
    /// Rank 0's run id in the experiment store, learned in a group's first
    /// exchange (a node other than 0 needs it to end the run if node 0 died).
    pub run_id: Option<i64>,
}

/// Why a loop stopped early.
#[derive(Debug)]
pub(crate) enum Failure {
    /// The run diverged (non-finite loss or gradient norm).
    Diverged(String),
    /// Something else failed (data, task mismatch, the store).
    Error(CoordinatorError),
    /// A model, data module or kernel panicked; the message.
    Panicked(String),
    /// The [`StopHandle`](crate::StopHandle) was triggered (e.g. SIGINT/SIGTERM).
    Stopped,
}

impl<E: Into<CoordinatorError>> From<E> for Failure {
    fn from(e: E) -> Self {
        Failure::Error(e.into())
    }
}

/// The text of a panic payload.
pub(crate) fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    let text = payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic payload".into());
    format!("panicked during training: {text}")
}

/// Where a resumed run continues: `(epoch, micro-batch)`. A checkpoint taken at the
/// end of an epoch (after its validation) continues at the next epoch.
pub(crate) fn resume_position(loaded: Option<&Loaded>, per_epoch: usize) -> (usize, usize) {
    match loaded.map(|l| &l.state) {
        Some(s) if s.batch_in_epoch >= per_epoch && s.epochs_completed > s.epoch => {
            (s.epoch + 1, 0)
        }
        Some(s) => (s.epoch, s.batch_in_epoch),
        None => (0, 0),
    }
}

/// Restores the counters a checkpoint carries.
pub(crate) fn restore_stats(loaded: &Loaded, stats: &mut LoopStats) {
    let s = &loaded.state;
    stats.steps = s.step;
    stats.epochs = s.epochs_completed;
    stats.step_losses = s.step_losses.clone();
    stats.samples = s.samples;
    stats.train_seconds = s.train_seconds;
}

/// The optimizer and the scheduler as `loaded` left them, for this worker's
/// replica `model` on `device`: the optimizer's state cast to `stored` (a true
/// mode's dtype; checkpoints hold f32) and cut to the parameters this worker `owns`
/// (fsdp).
pub(crate) fn resume_optimization<B, M, S, LR>(
    optimization: Optimization<B, M, S, LR>,
    loaded: &Loaded,
    model: &M,
    device: &B::Device,
    stored: Option<FloatDType>,
    owns: Option<&dyn Fn(usize) -> bool>,
) -> Result<Optimization<B, M, S, LR>, CoordinatorError>
where
    B: AutodiffBackend,
    M: AutodiffModule<B>,
    S: SimpleOptimizer<B::InnerBackend> + 'static,
    LR: LrScheduler,
{
    let Optimization {
        mut optimizer,
        mut scheduler,
        cast_state,
    } = optimization;
    let mut record: OptimRecord<S, B, M> = loaded.optim::<B, _>(device)?;
    if let Some((dtype, cast)) = stored.zip(cast_state) {
        record = cast(model, record, dtype);
    }
    if let Some(owns) = owns {
        record = shard_of(model, record, owns);
    }
    optimizer = optimizer.load_record(record);
    if let Some(record) = loaded.scheduler::<B, LR::Record<B>>(device)? {
        scheduler = scheduler.load_record::<B>(record);
    }
    Ok(Optimization {
        optimizer,
        scheduler,
        cast_state,
    })
}

/// The training order of `epoch`: a permutation of the `n` examples drawn from the
/// run's `seed`, the same on every engine, worker and node.
pub(crate) fn epoch_order(seed: u64, epoch: usize, n: usize) -> Vec<usize> {
    permutation(n, &mut SplitMix64::derived(seed, epoch as u64))
}

/// Micro-batch `m` of an epoch's `order` as worker `rank` of `world` takes it, with
/// `batch_size` examples per worker: this worker's examples (fewer, or none, in a
/// short last global batch) and the size of the global micro-batch.
pub(crate) fn shard(
    order: &[usize],
    m: usize,
    batch_size: usize,
    rank: usize,
    world: usize,
) -> (&[usize], usize) {
    let global = batch_size * world;
    let chunk = &order[(m * global).min(order.len())..((m + 1) * global).min(order.len())];
    let len = chunk.len();
    (
        &chunk[(rank * batch_size).min(len)..((rank + 1) * batch_size).min(len)],
        len,
    )
}

/// Everything a loop reads but does not change.
pub(crate) struct LoopInputs<'a, B: Backend, D> {
    pub config: &'a CoordinatorConfig,
    /// The run's directory (checkpoints, report, model).
    #[cfg_attr(not(feature = "learner"), allow(dead_code))]
    pub run_dir: &'a Path,
    pub stop: &'a crate::StopHandle,
    pub task: &'a TaskSpec,
    pub data: &'a D,
    pub device: &'a B::Device,
    pub n_epochs: usize,
    pub checkpoints: Option<CheckpointCtx<'a>>,
}

/// Where checkpoints go and what they must carry; `None` in [`LoopInputs`] when
/// checkpointing is off.
#[derive(Clone)]
pub(crate) struct CheckpointCtx<'a> {
    pub run_dir: &'a Path,
    pub policy: &'a CheckpointPolicy,
    pub signatures: Signatures,
    pub run_id: Option<i64>,
    pub attempt: u32,
}

/// The sizes a loop runs by, derived once from the configuration and the data.
pub(crate) struct RunShape {
    pub n_train: usize,
    /// Micro-batches per epoch (global ones with several workers).
    pub per_epoch: usize,
    pub accumulate: usize,
    /// Optimizer steps of the whole run.
    pub total: u64,
    pub items_per_example: f64,
}

impl RunShape {
    pub fn of(
        config: &CoordinatorConfig,
        n_train: usize,
        items_per_example: usize,
        n_epochs: usize,
        world: usize,
    ) -> Self {
        Self {
            n_train,
            per_epoch: batches_per_epoch(config, n_train, world),
            accumulate: config.accumulate_grad_batches as usize,
            total: total_steps(config, n_train, n_epochs, world),
            items_per_example: items_per_example as f64,
        }
    }
}

/// Optimizer steps the run will take with `world` workers.
pub(crate) fn total_steps(
    config: &CoordinatorConfig,
    n_train: usize,
    n_epochs: usize,
    world: usize,
) -> u64 {
    let per_epoch =
        batches_per_epoch(config, n_train, world).div_ceil(config.accumulate_grad_batches as usize);
    let total = per_epoch as u64 * n_epochs as u64;
    config.max_steps.map_or(total, |m| total.min(m))
}

/// Micro-batches in one epoch (`limit_train_batches` applied). With `world` workers
/// a micro-batch is global: `batch_size` examples per worker.
pub(crate) fn batches_per_epoch(config: &CoordinatorConfig, n_train: usize, world: usize) -> usize {
    let n = n_train.div_ceil(config.batch_size * world.max(1));
    config.limit_train_batches.map_or(n, |l| n.min(l))
}

/// Where an epoch that starts at micro-batch `from` with `steps` optimizer steps
/// already taken stops: `(micro-batch it stops before, steps taken by then)`, at the
/// epoch's end or where the run reaches `total` steps. Accumulation groups are
/// `accumulate` micro-batches, the last one of an epoch possibly shorter.
#[cfg_attr(not(feature = "learner"), allow(dead_code))]
pub(crate) fn epoch_stop(
    per_epoch: usize,
    accumulate: usize,
    from: usize,
    mut steps: u64,
    total: u64,
) -> (usize, u64) {
    let mut b = from;
    while b < per_epoch && steps < total {
        b += accumulate.min(per_epoch - b);
        steps += 1;
    }
    (b, steps)
}

/// When the checkpoint an optimizer step makes due is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SaveAt {
    /// Now, between two steps of an epoch.
    Now,
    /// After this epoch's validation, so that it carries the monitored metric.
    AfterValidation,
}

/// Tells after each optimizer step whether the checkpoint policy wants a save.
pub(crate) struct SaveClock {
    last_step: u64,
    last_time: Instant,
}

impl SaveClock {
    /// A clock whose last save was at `step`, now.
    pub fn new(step: u64) -> Self {
        Self {
            last_step: step,
            last_time: Instant::now(),
        }
    }

    /// Whether the policy's time interval has passed since the last save.
    pub fn time_due(&self, policy: &CheckpointPolicy) -> bool {
        policy
            .train_time_interval_s
            .is_some_and(|t| self.last_time.elapsed().as_secs_f64() >= t)
    }

    /// Whether optimizer step `step` of `epoch` asks for a checkpoint. `epoch_done`:
    /// the step consumed the epoch's last micro-batch; `last`: it is the run's last;
    /// `time_due`: the policy's time interval has passed ([`time_due`](Self::time_due)
    /// here, or rank 0's for every worker of a group).
    pub fn due_at(
        &self,
        policy: &CheckpointPolicy,
        step: u64,
        epoch: usize,
        epoch_done: bool,
        last: bool,
        time_due: bool,
    ) -> Option<SaveAt> {
        let by_epoch = policy
            .every_n_epochs
            .is_some_and(|n| (epoch as u64 + 1).is_multiple_of(n));
        if (epoch_done && by_epoch) || (last && self.last_step != step) {
            return Some(SaveAt::AfterValidation);
        }
        let by_steps = policy.every_n_steps.is_some_and(|n| step.is_multiple_of(n));
        (by_steps || time_due).then_some(SaveAt::Now)
    }

    /// Notes a save at `step`.
    pub fn saved(&mut self, step: u64) {
        self.last_step = step;
        self.last_time = Instant::now();
    }
}

/// The trainer state after the optimizer step that consumed micro-batch `b - 1` of
/// `epoch`.
pub(crate) fn trainer_state(
    ctx: &CheckpointCtx<'_>,
    stats: &LoopStats,
    metrics: &Metrics<'_>,
    seed: u64,
    epoch: usize,
    b: usize,
) -> TrainerState {
    TrainerState {
        step: stats.steps,
        epoch,
        batch_in_epoch: b,
        epochs_completed: stats.epochs,
        seed,
        samples: stats.samples,
        train_seconds: stats.train_seconds,
        step_losses: stats.step_losses.clone(),
        summaries: metrics.summaries().clone(),
        run_id: ctx.run_id,
        attempt: ctx.attempt,
        monitor: metrics.summaries().get(&ctx.policy.monitor).map(|s| s.last),
        loss_scale: None,
    }
}

/// Writes a checkpoint, records it as an artifact and applies retention.
pub(crate) fn write_checkpoint(
    ctx: &CheckpointCtx<'_>,
    snapshot: &Snapshot,
    state: &TrainerState,
    metrics: &mut Metrics<'_>,
) -> Result<(), CoordinatorError> {
    let dir = checkpoint::save(ctx.run_dir, snapshot, state, &ctx.signatures)?;
    tracing::info!(dir = %dir.display(), step = state.step, "checkpoint written");
    let rel = dir
        .strip_prefix(ctx.run_dir)
        .unwrap_or(&dir)
        .to_string_lossy()
        .into_owned();
    metrics.artifact(ctx.run_dir, "checkpoint", &rel)?;
    checkpoint::retain(ctx.run_dir, ctx.policy)
}

/// One optimizer step as both engines report it.
#[derive(Debug, Clone)]
pub(crate) struct StepRecord {
    pub step: u64,
    pub epoch: usize,
    /// Mean loss over the step's micro-batches.
    pub loss: f64,
    pub lr: f64,
    /// Global gradient norm before clipping, on the steps that clip or log.
    pub grad_norm: Option<f64>,
    /// Whether this step is logged (`log_every_n_steps`, and the last step).
    pub logging: bool,
    /// On logged steps: the step outputs' further metrics (`StepOutput::metrics`,
    /// the mean over rank 0's micro-batches), logged as `train/<name>`.
    pub metrics: Vec<(&'static str, f64)>,
    /// `16-mixed`: the loss scale after this step's update.
    pub loss_scale: Option<f64>,
    /// Examples trained on so far.
    pub samples: u64,
    /// Training seconds so far (validation excluded).
    pub train_seconds: f64,
}

impl StepRecord {
    /// Whether step `step` (1-based) of `total` is logged, logging every
    /// `log_every_n_steps` steps and the last.
    pub fn is_logged(log_every_n_steps: u64, step: u64, total: u64) -> bool {
        step.is_multiple_of(log_every_n_steps) || step == total
    }
}

/// Readies the summed gradients of one optimizer step, as both engines do before
/// the optimizer steps: clips their global norm when `gradient_clip_val` is set
/// (measuring it when clipping or logging; a non-finite norm ends the run), and
/// under fsdp drops the gradients of the parameters this worker does not own
/// (`owns`), so that its optimizer neither keeps state for them nor updates them.
/// Returns the norm, when measured.
///
/// `known_norm`: the norm, when the caller has measured it already (loss scaling).
#[allow(clippy::too_many_arguments)]
pub(crate) fn ready_gradients<B, M>(
    gradient_clip_val: Option<f64>,
    model: &M,
    grads: &mut GradientsParams,
    logging: bool,
    known_norm: Option<f64>,
    owns: Option<&dyn Fn(usize) -> bool>,
    step: u64,
    epoch: usize,
) -> Result<Option<f64>, Failure>
where
    B: AutodiffBackend,
    M: AutodiffModule<B>,
{
    // The global norm costs one reduction over every gradient: only on the steps
    // that clip or log it.
    let norm = match (gradient_clip_val, known_norm) {
        (Some(max_norm), Some(norm)) => {
            clip_to::<B, M>(model, grads, norm, max_norm);
            Some(norm)
        }
        (Some(max_norm), None) => Some(clip_global_norm::<B, M>(model, grads, max_norm)),
        (None, Some(norm)) => Some(norm),
        (None, None) if logging => Some(global_norm::<B, M>(model, grads)),
        (None, None) => None,
    };
    if let Some(bad) = norm.filter(|n| !n.is_finite()) {
        return Err(Failure::Diverged(format!(
            "gradient norm is {bad} at step {step} (epoch {epoch})"
        )));
    }
    if let Some(owns) = owns {
        retain_owned::<B, M>(model, grads, owns);
    }
    Ok(norm)
}

/// Books one optimizer step: counters, metrics (on logged steps), heartbeat,
/// progress.
pub(crate) fn book_step(
    record: &StepRecord,
    task: &TaskSpec,
    items_per_example: f64,
    stats: &mut LoopStats,
    metrics: &mut Metrics<'_>,
    progress: &mut Progress,
) -> Result<(), CoordinatorError> {
    let StepRecord {
        step,
        epoch,
        loss,
        lr,
        ..
    } = *record;
    stats.steps = step;
    stats.step_losses.push(loss as f32);
    stats.samples = record.samples;
    stats.train_seconds = record.train_seconds;
    let rate = stats.samples as f64 * items_per_example / stats.train_seconds.max(1e-9);
    metrics.heartbeat()?;
    if record.logging {
        metrics.record("train", "loss", step, epoch, loss);
        if task.kind.metric_names().contains(&"perplexity") {
            metrics.record("train", "perplexity", step, epoch, perplexity(loss));
        }
        metrics.record("train", "lr", step, epoch, lr);
        if let Some(norm) = record.grad_norm {
            metrics.record("train", "grad_norm", step, epoch, norm);
        }
        if let Some(scale) = record.loss_scale {
            metrics.record("train", "loss_scale", step, epoch, scale);
        }
        metrics.record("train", "items_per_s", step, epoch, rate);
        for &(name, value) in &record.metrics {
            metrics.record("train", name, step, epoch, value);
        }
        metrics.flush()?;
    }
    progress.step(step, epoch, loss, lr, rate);
    Ok(())
}

/// Books the end of `epoch`'s validation.
pub(crate) fn book_validation(
    results: &[(&'static str, f64)],
    epoch: usize,
    stats: &mut LoopStats,
    metrics: &mut Metrics<'_>,
    progress: &mut Progress,
) -> Result<(), CoordinatorError> {
    stats.epochs = epoch + 1;
    for (key, value) in results {
        metrics.record("valid", key, stats.steps, epoch, *value);
    }
    metrics.flush()?;
    progress.validation(epoch, results);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rstest::rstest;

    /// Each worker's shard of a global micro-batch; a short last one leaves the
    /// last worker fewer examples, or none.
    #[rstest]
    #[case::whole(0, 0, &[0, 1, 2], 6)]
    #[case::second_worker(0, 1, &[3, 4, 5], 6)]
    #[case::short_last(1, 0, &[6, 7, 8], 4)]
    #[case::short_last_second(1, 1, &[9], 4)]
    fn a_worker_takes_its_shard(
        #[case] m: usize,
        #[case] rank: usize,
        #[case] want: &[usize],
        #[case] global: usize,
    ) {
        let order: Vec<usize> = (0..10).collect();
        assert_eq!(shard(&order, m, 3, rank, 2), (want, global));
    }

    #[test]
    fn a_worker_past_a_short_last_batch_takes_nothing() {
        let order: Vec<usize> = (0..7).collect();
        assert_eq!(shard(&order, 1, 3, 1, 2), (&[][..], 1));
    }

    #[rstest]
    #[case::whole_epoch(10, 1, 0, 0, 100, 10)]
    #[case::groups(10, 4, 0, 0, 100, 10)]
    #[case::cut_by_total(10, 1, 0, 95, 100, 5)]
    #[case::cut_by_total_in_groups(10, 4, 0, 98, 100, 8)]
    #[case::resumed_mid_epoch(10, 2, 4, 0, 100, 10)]
    #[case::nothing_left(10, 1, 3, 100, 100, 3)]
    fn epoch_stop_follows_groups_and_total(
        #[case] per_epoch: usize,
        #[case] accumulate: usize,
        #[case] from: usize,
        #[case] steps: u64,
        #[case] total: u64,
        #[case] want: usize,
    ) {
        assert_eq!(
            epoch_stop(per_epoch, accumulate, from, steps, total).0,
            want
        );
    }

    #[rstest]
    #[case::epoch_end(Some(1), None, 5, 0, true, false, Some(SaveAt::AfterValidation))]
    #[case::not_every_epoch(Some(2), None, 5, 0, true, false, None)]
    #[case::by_steps(None, Some(5), 5, 0, false, false, Some(SaveAt::Now))]
    #[case::by_steps_off(None, Some(5), 6, 0, false, false, None)]
    #[case::last_step(None, None, 7, 0, false, true, Some(SaveAt::AfterValidation))]
    fn save_clock(
        #[case] every_n_epochs: Option<u64>,
        #[case] every_n_steps: Option<u64>,
        #[case] step: u64,
        #[case] epoch: usize,
        #[case] epoch_done: bool,
        #[case] last: bool,
        #[case] want: Option<SaveAt>,
    ) {
        let policy = CheckpointPolicy {
            every_n_epochs,
            every_n_steps,
            ..Default::default()
        };
        let clock = SaveClock::new(0);
        assert_eq!(
            clock.due_at(&policy, step, epoch, epoch_done, last, false),
            want
        );
    }

    #[test]
    fn last_step_already_saved_is_not_saved_twice() {
        let policy = CheckpointPolicy {
            every_n_epochs: None,
            ..Default::default()
        };
        let mut clock = SaveClock::new(0);
        clock.saved(7);
        assert_eq!(clock.due_at(&policy, 7, 0, false, true, false), None);
    }
}

//! kiln's native training loop on one device (the seed's "vanilla" loop).
//!
//! Per optimizer step: `accumulate_grad_batches` micro-batches, each forward →
//! task loss → backward, gradients averaged over the micro-batches, optional
//! global-norm clipping, the learning rate of the schedule at this step, one AdamW
//! step. Validation after every epoch (and after a `max_steps` cut). Data order is
//! a permutation of the training set drawn from `(seed, epoch)`, so a run is
//! reproducible bit for bit on CPU.

use std::path::Path;
use std::time::Instant;

use burn::module::AutodiffModule;
use burn::optim::{AdamWConfig, GradientsAccumulator, GradientsParams, Optimizer};
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;
use kiln_core::rng::{SplitMix64, permutation};
use kiln_core::{CheckpointPolicy, CoordinatorConfig, DataModule, Split, TaskModel, TaskSpec};

use crate::CoordinatorError;
use crate::checkpoint::{self, Loaded, Signatures, TrainerState};
use crate::grad::{clip_global_norm, global_norm};
use crate::objective::{self, EvalSums, perplexity};
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
}

/// Why the loop stopped early.
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

/// Everything the loop reads but does not change.
pub(crate) struct LoopInputs<'a, B: Backend, D> {
    pub config: &'a CoordinatorConfig,
    pub stop: &'a crate::StopHandle,
    pub task: &'a TaskSpec,
    pub data: &'a D,
    pub device: &'a B::Device,
    pub n_epochs: usize,
    pub checkpoints: Option<CheckpointCtx<'a>>,
}

/// Optimizer steps the run will take.
pub(crate) fn total_steps(config: &CoordinatorConfig, n_train: usize, n_epochs: usize) -> u64 {
    let per_epoch =
        batches_per_epoch(config, n_train).div_ceil(config.accumulate_grad_batches as usize);
    let total = per_epoch as u64 * n_epochs as u64;
    config.max_steps.map_or(total, |m| total.min(m))
}

fn batches_per_epoch(config: &CoordinatorConfig, n_train: usize) -> usize {
    let n = n_train.div_ceil(config.batch_size);
    config.limit_train_batches.map_or(n, |l| n.min(l))
}

/// Where checkpoints go and what they must carry; `None` in [`LoopInputs`] when
/// checkpointing is off.
pub(crate) struct CheckpointCtx<'a> {
    pub run_dir: &'a Path,
    pub policy: &'a CheckpointPolicy,
    pub signatures: Signatures,
    pub run_id: Option<i64>,
    pub attempt: u32,
}

pub(crate) fn fit<B, M, D>(
    inputs: &LoopInputs<'_, B, D>,
    model: M,
    resume: Option<&Loaded>,
    metrics: &mut Metrics<'_>,
    progress: &mut Progress,
    stats: &mut LoopStats,
) -> Result<M, Failure>
where
    B: AutodiffBackend,
    M: AutodiffModule<B> + TaskModel<B>,
    M::InnerModule: TaskModel<B::InnerBackend>,
    D: DataModule,
{
    let LoopInputs {
        config,
        stop,
        task,
        data,
        device,
        n_epochs,
        checkpoints,
    } = inputs;
    let (config, task, data, device, n_epochs) = (*config, *task, *data, *device, *n_epochs);
    let n_train = data.len(Split::Train);
    let batch_size = config.batch_size;
    let per_epoch = batches_per_epoch(config, n_train);
    let accumulate = config.accumulate_grad_batches as usize;
    let total = total_steps(config, n_train, n_epochs);
    let items_per_example = data.items_per_example() as f64;
    let o = &config.optimizer;

    B::seed(device, config.seed);
    let mut optim = AdamWConfig::new()
        .with_beta_1(o.beta1)
        .with_beta_2(o.beta2)
        .with_epsilon(o.eps)
        .with_weight_decay(o.weight_decay)
        .init::<B, M>();
    let mut model = model;
    let (mut start_epoch, mut start_batch) = (0, 0);
    let mut previous_seconds = 0.0;
    if let Some(loaded) = resume {
        model = loaded.model::<B, M>(model, device)?;
        optim = optim.load_record(loaded.optim::<B, _>(device)?);
        let s = &loaded.state;
        (start_epoch, start_batch) = (s.epoch, s.batch_in_epoch);
        stats.steps = s.step;
        stats.epochs = s.epochs_completed;
        stats.step_losses = s.step_losses.clone();
        stats.samples = s.samples;
        stats.train_seconds = s.train_seconds;
        previous_seconds = s.train_seconds;
    }
    // Materialise lazily initialised parameters on the device before anything is
    // cloned (Burn 0.21, #5040: clones of lazy params initialise independently).
    let mut model = model.fork(device);
    let started = Instant::now();
    let mut validation_seconds = 0.0;
    let mut last_save = (stats.steps, Instant::now());
    let epoch_save_due = |epoch: usize| {
        checkpoints.as_ref().is_some_and(|c| {
            c.policy
                .every_n_epochs
                .is_some_and(|n| (epoch as u64 + 1).is_multiple_of(n))
        })
    };

    for epoch in start_epoch..n_epochs {
        if stats.steps >= total {
            break;
        }
        progress.epoch(epoch, n_epochs);
        let order = permutation(n_train, &mut SplitMix64::derived(config.seed, epoch as u64));
        let mut b = if epoch == start_epoch { start_batch } else { 0 };
        while b < per_epoch {
            let group = accumulate.min(per_epoch - b);
            let mut accumulator = GradientsAccumulator::<M>::new();
            let mut single = None;
            let mut loss_sum = 0.0;
            for _ in 0..group {
                if stop.is_stopped() {
                    return Err(Failure::Stopped);
                }
                let indices = &order[b * batch_size..((b + 1) * batch_size).min(n_train)];
                let batch = data.batch::<B>(Split::Train, indices, device)?;
                let prediction = model.forward(batch.inputs)?;
                let loss = objective::loss(&task.kind, prediction, batch.targets)?;
                let value = loss.clone().into_scalar().elem::<f64>();
                if !value.is_finite() {
                    return Err(Failure::Diverged(format!(
                        "training loss is {value} at step {} (epoch {epoch}, batch {b})",
                        stats.steps + 1
                    )));
                }
                loss_sum += value;
                let loss = if group > 1 {
                    loss.div_scalar(group as f64)
                } else {
                    loss
                };
                let grads = GradientsParams::from_grads(loss.backward(), &model);
                if group > 1 {
                    accumulator.accumulate(&model, grads);
                } else {
                    single = Some(grads);
                }
                stats.samples += indices.len() as u64;
                b += 1;
            }
            let mut grads = single.unwrap_or_else(|| accumulator.grads());
            let logging = (stats.steps + 1).is_multiple_of(config.log_every_n_steps)
                || stats.steps + 1 == total;
            // The global norm costs one reduction over every gradient: only on the
            // steps that clip or log it.
            let grad_norm = match config.gradient_clip_val {
                Some(max_norm) => Some(clip_global_norm::<B, M>(&model, &mut grads, max_norm)),
                None if logging => Some(global_norm::<B, M>(&model, &grads)),
                None => None,
            };
            if let Some(norm) = grad_norm.filter(|n| !n.is_finite()) {
                return Err(Failure::Diverged(format!(
                    "gradient norm is {norm} at step {} (epoch {epoch})",
                    stats.steps + 1
                )));
            }
            let lr = o.schedule.lr_at(o.lr, stats.steps, total);
            model = optim.step(lr, model, grads);
            stats.steps += 1;
            let step_loss = loss_sum / group as f64;
            stats.step_losses.push(step_loss as f32);
            stats.train_seconds =
                previous_seconds + started.elapsed().as_secs_f64() - validation_seconds;

            let step = stats.steps;
            let rate = stats.samples as f64 * items_per_example / stats.train_seconds.max(1e-9);
            metrics.heartbeat()?;
            if logging {
                metrics.record("train", "loss", step, epoch, step_loss);
                if task.kind.metric_names().contains(&"perplexity") {
                    metrics.record("train", "perplexity", step, epoch, perplexity(step_loss));
                }
                metrics.record("train", "lr", step, epoch, lr);
                if let Some(norm) = grad_norm {
                    metrics.record("train", "grad_norm", step, epoch, norm);
                }
                metrics.record("train", "items_per_s", step, epoch, rate);
                metrics.flush()?;
            }
            progress.step(step, epoch, step_loss, lr, rate);
            if let Some(ctx) = checkpoints {
                let p = ctx.policy;
                let by_steps = p.every_n_steps.is_some_and(|n| step.is_multiple_of(n));
                let by_time = p
                    .train_time_interval_s
                    .is_some_and(|t| last_save.1.elapsed().as_secs_f64() >= t);
                // An epoch-end checkpoint follows at once: do not write this step twice.
                let epoch_end_follows = (b == per_epoch || step >= total) && epoch_save_due(epoch);
                if (by_steps || by_time) && !epoch_end_follows {
                    let state =
                        trainer_state(ctx, stats, metrics, config.seed, epoch, b, per_epoch);
                    save_checkpoint::<B, M, _>(ctx, &model, &optim, &state, metrics)?;
                    last_save = (step, Instant::now());
                }
            }
            if step >= total {
                break;
            }
        }
        let finished_epoch = b >= per_epoch;
        // Epochs whose validation ran (a last epoch cut by max_steps counts).
        stats.epochs = epoch + 1;
        let validation_started = Instant::now();
        let results = validate::<B, M, D>(inputs, &model, metrics)?;
        validation_seconds += validation_started.elapsed().as_secs_f64();
        for (key, value) in &results {
            metrics.record("valid", key, stats.steps, epoch, *value);
        }
        metrics.flush()?;
        progress.validation(epoch, &results);
        if let Some(ctx) = checkpoints {
            let last = stats.steps >= total;
            if (finished_epoch && epoch_save_due(epoch)) || (last && last_save.0 != stats.steps) {
                let state = trainer_state(ctx, stats, metrics, config.seed, epoch, b, per_epoch);
                save_checkpoint::<B, M, _>(ctx, &model, &optim, &state, metrics)?;
                last_save = (stats.steps, Instant::now());
            }
        }
        if stats.steps >= total {
            break;
        }
    }
    Ok(model)
}

/// The trainer state after the optimizer step that consumed micro-batch `b - 1` of
/// `epoch`.
fn trainer_state(
    ctx: &CheckpointCtx<'_>,
    stats: &LoopStats,
    metrics: &Metrics<'_>,
    seed: u64,
    epoch: usize,
    b: usize,
    per_epoch: usize,
) -> TrainerState {
    TrainerState {
        step: stats.steps,
        epoch,
        batch_in_epoch: b.min(per_epoch),
        epochs_completed: stats.epochs,
        seed,
        samples: stats.samples,
        train_seconds: stats.train_seconds,
        step_losses: stats.step_losses.clone(),
        summaries: metrics.summaries().clone(),
        run_id: ctx.run_id,
        attempt: ctx.attempt,
        monitor: metrics.summaries().get(&ctx.policy.monitor).map(|s| s.last),
    }
}

fn save_checkpoint<B, M, O>(
    ctx: &CheckpointCtx<'_>,
    model: &M,
    optim: &O,
    state: &TrainerState,
    metrics: &mut Metrics<'_>,
) -> Result<(), CoordinatorError>
where
    B: AutodiffBackend,
    M: AutodiffModule<B>,
    O: Optimizer<M, B>,
{
    let dir = checkpoint::save::<B, M, _>(
        ctx.run_dir,
        model,
        optim.to_record(),
        state,
        &ctx.signatures,
    )?;
    tracing::info!(dir = %dir.display(), step = state.step, "checkpoint written");
    let rel = dir
        .strip_prefix(ctx.run_dir)
        .unwrap_or(&dir)
        .to_string_lossy()
        .into_owned();
    metrics.artifact(ctx.run_dir, "checkpoint", &rel)?;
    checkpoint::retain(ctx.run_dir, ctx.policy)
}

/// Mean validation loss and the task's metrics over the validation split.
pub(crate) fn validate<B, M, D>(
    inputs: &LoopInputs<'_, B, D>,
    model: &M,
    metrics: &mut Metrics<'_>,
) -> Result<Vec<(&'static str, f64)>, CoordinatorError>
where
    B: AutodiffBackend,
    M: AutodiffModule<B>,
    M::InnerModule: TaskModel<B::InnerBackend>,
    D: DataModule,
{
    let (config, data) = (inputs.config, inputs.data);
    let n_valid = data.len(Split::Valid);
    if n_valid == 0 {
        return Ok(Vec::new());
    }
    let inner = model.valid();
    let mut batches = n_valid.div_ceil(config.batch_size);
    if let Some(limit) = config.limit_val_batches {
        batches = batches.min(limit);
    }
    let all: Vec<usize> = (0..n_valid).collect();
    let mut sums = EvalSums::default();
    for chunk in all.chunks(config.batch_size).take(batches) {
        let batch = data.batch::<B::InnerBackend>(Split::Valid, chunk, inputs.device)?;
        let prediction = inner.forward(batch.inputs)?;
        sums.add(objective::evaluate(
            &inputs.task.kind,
            prediction,
            batch.targets,
        )?);
        metrics.heartbeat()?;
    }
    Ok(sums.metrics(&inputs.task.kind))
}

//! kiln's native training loop on one device (the seed's "vanilla" loop).
//!
//! Per optimizer step: `accumulate_grad_batches` micro-batches, each forward →
//! task loss → backward, gradients averaged over the micro-batches, optional
//! global-norm clipping, the learning rate of the schedule at this step, one AdamW
//! step. Validation after every epoch (and after a `max_steps` cut). Data order is
//! a permutation of the training set drawn from `(seed, epoch)`, so a run is
//! reproducible bit for bit on CPU.

use std::time::Instant;

use burn::module::AutodiffModule;
use burn::optim::{AdamWConfig, GradientsAccumulator, GradientsParams, Optimizer};
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;
use kiln_core::rng::{SplitMix64, permutation};
use kiln_core::{CoordinatorConfig, DataModule, Split, TaskModel};

use crate::CoordinatorError;
use crate::checkpoint::{Loaded, Snapshot};
use crate::grad::{clip_global_norm, global_norm};
use crate::objective::{self, EvalSums};
use crate::progress::Progress;
use crate::run::{
    Failure, LoopInputs, LoopStats, SaveAt, SaveClock, StepRecord, batches_per_epoch, book_step,
    book_validation, total_steps, trainer_state, write_checkpoint,
};
use crate::tracking::Metrics;

/// kiln's AdamW, configured from the run's optimizer settings (both engines use it).
pub(crate) fn adamw(config: &CoordinatorConfig) -> AdamWConfig {
    let o = &config.optimizer;
    AdamWConfig::new()
        .with_beta_1(o.beta1)
        .with_beta_2(o.beta2)
        .with_epsilon(o.eps)
        .with_weight_decay(o.weight_decay)
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
        ..
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
    let mut optim = adamw(config).init::<B, M>();
    let mut model = model;
    let (start_epoch, start_batch) = resume_position(resume, per_epoch);
    if let Some(loaded) = resume {
        model = loaded.model::<B, M>(model, device)?;
        optim = optim.load_record(loaded.optim::<B, _>(device)?);
        restore_stats(loaded, stats);
    }
    let previous_seconds = stats.train_seconds;
    // Materialise lazily initialised parameters on the device before anything is
    // cloned (Burn 0.21, #5040: clones of lazy params initialise independently).
    let mut model = model.fork(device);
    let started = Instant::now();
    let mut validation_seconds = 0.0;
    let mut clock = SaveClock::new(stats.steps);

    for epoch in start_epoch..n_epochs {
        if stats.steps >= total {
            break;
        }
        progress.epoch(epoch, n_epochs);
        let order = permutation(n_train, &mut SplitMix64::derived(config.seed, epoch as u64));
        let mut b = if epoch == start_epoch { start_batch } else { 0 };
        let mut save_after_validation = None;
        while b < per_epoch {
            let group = accumulate.min(per_epoch - b);
            let mut accumulator = GradientsAccumulator::<M>::new();
            let mut single = None;
            let mut loss_sum = 0.0;
            for _ in 0..group {
                let indices = &order[b * batch_size..((b + 1) * batch_size).min(n_train)];
                let batch = data.batch::<B>(Split::Train, indices, device)?;
                // Checked once the batch is built: a stop asked meanwhile (a signal, or
                // the data module itself) ends the run before the batch is trained on.
                if stop.is_stopped() {
                    return Err(Failure::Stopped);
                }
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
            let step = stats.steps + 1;
            let logging = StepRecord::is_logged(config, step, total);
            let (norm, lr) = (
                post_process::<B, M>(
                    config.gradient_clip_val,
                    &model,
                    &mut grads,
                    logging,
                    step,
                    epoch,
                )?,
                o.schedule.lr_at(o.lr, stats.steps, total),
            );
            model = optim.step(lr, model, grads);
            let record = StepRecord {
                step,
                epoch,
                loss: loss_sum / group as f64,
                lr,
                grad_norm: norm,
                logging,
                samples: stats.samples,
                train_seconds: previous_seconds + started.elapsed().as_secs_f64()
                    - validation_seconds,
            };
            book_step(&record, task, items_per_example, stats, metrics, progress)?;
            if let Some(ctx) = checkpoints {
                let epoch_done = b == per_epoch;
                match clock.due(ctx.policy, step, epoch, epoch_done, step >= total) {
                    Some(SaveAt::Now) => {
                        let snapshot = Snapshot::take::<B, M, B, _>(&model, optim.to_record())?;
                        let state = trainer_state(ctx, stats, metrics, config.seed, epoch, b);
                        write_checkpoint(ctx, &snapshot, &state, metrics)?;
                        clock.saved(step);
                    }
                    Some(SaveAt::AfterValidation) => save_after_validation = Some(b),
                    None => {}
                }
            }
            if step >= total {
                break;
            }
        }
        let validation_started = Instant::now();
        let results = validate::<B, M, D>(inputs, &model, metrics)?;
        validation_seconds += validation_started.elapsed().as_secs_f64();
        book_validation(&results, epoch, stats, metrics, progress)?;
        if let (Some(ctx), Some(b)) = (checkpoints, save_after_validation) {
            let snapshot = Snapshot::take::<B, M, B, _>(&model, optim.to_record())?;
            let state = trainer_state(ctx, stats, metrics, config.seed, epoch, b);
            write_checkpoint(ctx, &snapshot, &state, metrics)?;
            clock.saved(stats.steps);
        }
        if stats.steps >= total {
            break;
        }
    }
    Ok(model)
}

/// Clips the gradients (when `gradient_clip_val` is set) and measures their global
/// norm (when clipping or logging); a non-finite norm ends the run.
pub(crate) fn post_process<B, M>(
    gradient_clip_val: Option<f64>,
    model: &M,
    grads: &mut GradientsParams,
    logging: bool,
    step: u64,
    epoch: usize,
) -> Result<Option<f64>, Failure>
where
    B: AutodiffBackend,
    M: AutodiffModule<B>,
{
    // The global norm costs one reduction over every gradient: only on the steps
    // that clip or log it.
    let norm = match gradient_clip_val {
        Some(max_norm) => Some(clip_global_norm::<B, M>(model, grads, max_norm)),
        None if logging => Some(global_norm::<B, M>(model, grads)),
        None => None,
    };
    match norm.filter(|n| !n.is_finite()) {
        Some(bad) => Err(Failure::Diverged(format!(
            "gradient norm is {bad} at step {step} (epoch {epoch})"
        ))),
        None => Ok(norm),
    }
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

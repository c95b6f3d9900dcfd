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
use kiln_core::{CoordinatorConfig, DataModule, Split, TaskKind, TaskModel, TaskSpec};

use crate::CoordinatorError;
use crate::grad::clip_global_norm;
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
}

impl<E: Into<CoordinatorError>> From<E> for Failure {
    fn from(e: E) -> Self {
        Failure::Error(e.into())
    }
}

/// Everything the loop reads but does not change.
pub(crate) struct LoopInputs<'a, B: Backend, D> {
    pub config: &'a CoordinatorConfig,
    pub task: &'a TaskSpec,
    pub data: &'a D,
    pub device: &'a B::Device,
    pub n_epochs: usize,
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

pub(crate) fn fit<B, M, D>(
    inputs: &LoopInputs<'_, B, D>,
    model: M,
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
        task,
        data,
        device,
        n_epochs,
    } = *inputs;
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
    // Materialise lazily initialised parameters on the device before anything is
    // cloned (Burn 0.21, #5040: clones of lazy params initialise independently).
    let mut model = model.fork(device);
    let started = Instant::now();
    let mut validation_seconds = 0.0;

    for epoch in 0..n_epochs {
        progress.epoch(epoch, n_epochs);
        let order = permutation(n_train, &mut SplitMix64::derived(config.seed, epoch as u64));
        let mut b = 0;
        while b < per_epoch {
            let group = accumulate.min(per_epoch - b);
            let mut accumulator = GradientsAccumulator::<M>::new();
            let mut single = None;
            let mut loss_sum = 0.0;
            for _ in 0..group {
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
            if let Some(max_norm) = config.gradient_clip_val {
                let norm = clip_global_norm::<B, M>(&model, &mut grads, max_norm);
                if !norm.is_finite() {
                    return Err(Failure::Diverged(format!(
                        "gradient norm is {norm} at step {} (epoch {epoch})",
                        stats.steps + 1
                    )));
                }
            }
            let lr = o.schedule.lr_at(o.lr, stats.steps, total);
            model = optim.step(lr, model, grads);
            stats.steps += 1;
            let step_loss = loss_sum / group as f64;
            stats.step_losses.push(step_loss as f32);
            stats.train_seconds = started.elapsed().as_secs_f64() - validation_seconds;

            let step = stats.steps;
            if step.is_multiple_of(config.log_every_n_steps) || step == total {
                metrics.record("train", "loss", step, epoch, step_loss);
                if let TaskKind::Lm { .. } = task.kind {
                    metrics.record("train", "perplexity", step, epoch, perplexity(step_loss));
                }
                metrics.record("train", "lr", step, epoch, lr);
                metrics.flush()?;
            }
            let rate = stats.samples as f64 * items_per_example / stats.train_seconds.max(1e-9);
            progress.step(step, epoch, step_loss, lr, rate);
            if step >= total {
                break;
            }
        }
        stats.epochs = epoch + 1;
        let validation_started = Instant::now();
        let results = validate::<B, M, D>(inputs, &model)?;
        validation_seconds += validation_started.elapsed().as_secs_f64();
        for (key, value) in &results {
            metrics.record("valid", key, stats.steps, epoch, *value);
        }
        metrics.flush()?;
        progress.validation(epoch, &results);
        if stats.steps >= total {
            break;
        }
    }
    Ok(model)
}

/// Mean validation loss and the task's metrics over the validation split.
pub(crate) fn validate<B, M, D>(
    inputs: &LoopInputs<'_, B, D>,
    model: &M,
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
    }
    Ok(sums.metrics(&inputs.task.kind))
}

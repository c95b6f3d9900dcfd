//! The Learner engine: a run through burn-train's `SupervisedTraining` (the seed's
//! "Lightning Trainer"), on one device (`ExecutionStrategy::SingleDevice`) or on
//! several (kiln's data-parallel group as a custom training strategy, [`group`]).
//!
//! The threads that take part:
//! - the **training thread** runs `SupervisedTraining::launch`: burn-train's epoch
//!   loop, validation and event processing, calling kiln's [`Stepper`] for each
//!   micro-batch (in a group: rank 0's loop; the other workers run theirs on threads
//!   of their own);
//! - the **producer threads** (one per worker) build batches from the borrowed
//!   workload (a data module, or datasets and a batcher) when the loaders ask
//!   (burn-train needs `'static` loaders);
//! - the **calling thread** keeps the books: it receives [`Event`]s in order and
//!   logs metrics, shows progress and writes checkpoints, exactly as the native loop
//!   does (the experiment store and progress bar stay on the thread that owns them).
//!
//! What burn-train would do differently is kept out (see [`stepper`]): the run takes
//! the same optimizer steps as the native loop, and writes the same checkpoints.

mod group;
mod loader;
mod member;
mod shared;
mod stepper;

use std::marker::PhantomData;
use std::panic::AssertUnwindSafe;
use std::sync::mpsc;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

use burn::module::AutodiffModule;
use burn::optim::SimpleOptimizer;
use burn::optim::lr_scheduler::LrScheduler;
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;
use burn::train::logger::MetricLogger;
use burn::train::metric::store::{EpochSummary, MetricsUpdate, Split as BurnSplit};
use burn::train::metric::{MetricDefinition, NumericEntry};
use burn::train::renderer::{
    EvaluationName, EvaluationProgress, MetricState, MetricsRenderer, MetricsRendererEvaluation,
    MetricsRendererTraining, ProgressType, TrainingProgress,
};
use burn::train::{ExecutionStrategy, Interrupter, Learner, SupervisedTraining, TrainingStrategy};
use kiln_core::{Precision, Split};

use crate::checkpoint::Loaded;
use crate::objective::EvalSums;
use crate::optim::Optimization;
use crate::precision::{self, LossScaler, ScalerState};
use crate::progress::Progress;
use crate::run::{
    Failure, LoopInputs, LoopStats, RunShape, SaveClock, book_step, book_validation, epoch_stop,
    restore_stats, resume_optimization, resume_position, trainer_state, write_checkpoint,
};
use crate::sync::BackendSync;
use crate::tracking::Metrics;
use crate::update::Accumulation;
use crate::workload::{Steps, Workload};
use group::{Components, GroupStrategy, Worker};
use loader::{TrainLoader, ValidLoader, produce};
use member::{Member, merge_shards};
use shared::{Event, OnBackend, Position, Settings, Shared, SharedRef, ShownLr};
use stepper::{Stepper, StepperOptim};

/// Trains `model` through burn-train on `devices`; the counterpart of
/// [`crate::native::fit`] (one device) and [`crate::native::fit_group`] (several:
/// kiln's [`group::GroupStrategy`], `sharded` for fsdp), with the same inputs,
/// optimizer, scheduler, books and result. `sync`: the backend's own gradient
/// synchronisation for a group (`process_group_backend = nccl`), instead of
/// burn-collective's.
#[allow(clippy::too_many_arguments)]
pub(crate) fn fit<B, M, W, S, LR>(
    inputs: &LoopInputs<'_, B, W>,
    devices: &[B::Device],
    model: M,
    optimization: Optimization<B, M, S, LR>,
    resume: Option<&Loaded>,
    (sharded, precision): (bool, Precision),
    sync: Option<BackendSync<B>>,
    metrics: &mut Metrics<'_>,
    progress: &mut Progress,
    stats: &mut LoopStats,
) -> Result<M, Failure>
where
    B: AutodiffBackend,
    M: AutodiffModule<B> + 'static,
    W: Workload<B, M>,
    S: SimpleOptimizer<B::InnerBackend> + 'static,
    LR: LrScheduler + 'static,
{
    let LoopInputs {
        config,
        data,
        device,
        n_epochs,
        ..
    } = *inputs;
    if devices.is_empty() {
        return Err(Failure::Error(crate::CoordinatorError::Collective(
            "no device to train on".into(),
        )));
    }
    let world = devices.len();
    let RunShape {
        n_train,
        per_epoch,
        accumulate,
        total,
        items_per_example,
    } = RunShape::of(
        config,
        data.len(kiln_core::Split::Train),
        data.items_per_example(),
        n_epochs,
        world,
    );

    B::seed(device, config.seed);
    let mut model = model;
    let (start_epoch, start_batch) = resume_position(resume, per_epoch);
    if let Some(loaded) = resume {
        model = loaded.model::<B, M>(model, device)?;
        restore_stats(loaded, stats);
    }
    // True modes store the parameters (and so the optimizer's state) in their
    // dtype; checkpoints hold f32 (as on the native loop).
    let stored = precision::stored_dtype(precision).filter(|_| optimization.cast_state.is_some());
    if let Some(dtype) = stored {
        model = precision::store_as(model, dtype);
    }
    let epochs = epochs_left(
        (start_epoch, start_batch),
        n_epochs,
        (per_epoch, accumulate),
        stats.steps,
        total,
    );
    // Materialise lazily initialised parameters before anything is cloned (#5040).
    let model = model.fork(device);
    if epochs == 0 {
        return Ok(model);
    }

    let _only_group = (world > 1).then(crate::group::one_at_a_time);
    // The plan gives the backend's synchronisation only to groups.
    let session = match sync {
        Some(sync) => Some((sync.start)(devices).map_err(Failure::Error)?),
        None => None,
    };
    let backend_sync = session.is_some();

    let (events, received) = mpsc::channel();
    // One producer thread per worker, named after it (`kiln-worker-<rank>-data`).
    let mut asked = Vec::with_capacity(world);
    let interrupter = Interrupter::new();
    let settings = Settings {
        seed: config.seed,
        rank: 0,
        // Under the backend's synchronisation a worker's backward pass waits for
        // the others': no turns (its RNG is the device's).
        in_turn: config.deterministic && world > 1 && !backend_sync,
        per_epoch,
        accumulate,
        total,
        log_every_n_steps: config.log_every_n_steps,
        gradient_clip_val: config.gradient_clip_val,
        checkpoints: inputs.checkpoints.as_ref().map(|c| c.policy.clone()),
        check_replicas: config.check_replicas,
        backend_sync,
        precision,
    };
    let group = (world > 1).then(|| Arc::new(crate::group::Group::<Vec<u8>>::new()));
    // The synchronisation closes when training is over (the group is dropped),
    // or at once when a worker leaves on a panic: the others may wait in it.
    if let (Some(group), Some(session)) = (&group, session) {
        group.on_leave(move || drop(session));
    }
    // Each worker: its state shared with the loader and the scheduler, its loader,
    // and its learner (model replica and optimizer, the shard of it under fsdp).
    let mut workers = Vec::with_capacity(world);
    for (rank, worker_device) in devices.iter().enumerate() {
        let member = group.as_ref().map(|group| {
            Arc::new(Member::<B, M> {
                rank,
                world,
                sharded,
                device: worker_device.clone(),
                group: group.clone(),
                peer: OnceLock::new(),
                merge: merge_shards::<B, M, S>,
                marker: PhantomData,
            })
        });
        // Only rank 0's events reach the books.
        let events = match rank {
            0 => events.clone(),
            _ => mpsc::channel().0,
        };
        let replica = match rank {
            0 => model.clone(),
            _ => model.clone().fork(worker_device),
        };
        let owns = |i| member.as_ref().is_some_and(|m| m.owns(i));
        let Optimization {
            optimizer,
            scheduler,
            ..
        } = match resume {
            Some(loaded) => resume_optimization(
                optimization.clone(),
                loaded,
                &replica,
                worker_device,
                stored,
                sharded.then_some(&owns as &dyn Fn(usize) -> bool),
            )?,
            None => optimization.clone(),
        };
        let shared = Shared::new(
            Settings {
                rank,
                ..settings.clone()
            },
            member
                .clone()
                .map(|m| m as Arc<dyn std::any::Any + Send + Sync>),
            inputs.stop.clone(),
            interrupter.clone(),
            events,
            Position {
                epoch: start_epoch,
                batch: start_batch,
                steps: stats.steps,
                samples: stats.samples,
                accumulated: Accumulation::default(),
                ready: false,
                previous_seconds: stats.train_seconds,
                started: Instant::now(),
                validation_seconds: 0.0,
                clock: SaveClock::new(stats.steps),
                failure: None,
                ended: false,
                collective_seconds: 0.0,
                replica_spread: None,
                optimizer_state_bytes: 0,
                lr: 0.0,
                scaler: (precision == Precision::F16Mixed).then(|| {
                    LossScaler::new(
                        &config.loss_scaling,
                        resume.and_then(|l| l.state.loss_scale),
                    )
                }),
            },
            Box::new(OnBackend::<B, LR>(scheduler, PhantomData)),
        );
        let (requests, to_serve) = mpsc::channel();
        asked.push(to_serve);
        let loader = Arc::new(TrainLoader::<B, _, _> {
            requests,
            device: worker_device.clone(),
            shared: shared.clone(),
            seed: config.seed,
            n_items: n_train,
            batch_size: config.batch_size,
            rank,
            world,
            next: Arc::new(Mutex::new((start_epoch, start_batch))),
        });
        // burn-train's `grad_sharded`: the backend sums these parameters' gradients.
        let replica = match backend_sync {
            true => crate::sync::mark(replica),
            false => replica,
        };
        let learner = Learner::new(
            Stepper::new(replica, data.steps(), SharedRef(shared.clone())),
            StepperOptim(optimizer),
            ShownLr(shared.clone()),
        );
        workers.push((learner, loader, shared, member));
    }
    drop(events);
    let (learner, train_loader, shared, first_member) = workers.remove(0);
    let strategy = first_member.map(|member| GroupStrategy {
        first: (shared.clone(), member),
        others: Mutex::new(
            workers
                .into_iter()
                .filter_map(|(learner, loader, shared, member)| {
                    Some(Worker {
                        learner,
                        loader,
                        shared,
                        member: member?,
                    })
                })
                .collect(),
        ),
    });
    let device = device.clone();
    let valid_loader = Arc::new(ValidLoader::<B, _, _> {
        requests: train_loader.requests.clone(),
        device: device.clone(),
        shared: shared.clone(),
        items: 0..data.len(Split::Valid),
        batch_size: config.batch_size,
        limit_batches: config.limit_val_batches,
    });
    let run_dir = inputs.run_dir.to_path_buf();
    let tui_asked = config.progress == kiln_core::ProgressMode::Tui;
    // `SupervisedTraining` is not `Send`: it is put together on the thread it runs on.
    let launch = move || {
        let execution: TrainingStrategy<Components<B, M, W::Steps, S>> = match strategy {
            Some(group) => TrainingStrategy::Custom(Arc::new(group)),
            None => ExecutionStrategy::SingleDevice(device).into(),
        };
        let training = SupervisedTraining::new(run_dir, train_loader, valid_loader)
            .with_metric_logger(Discard)
            .with_application_logger(None)
            .with_interrupter(interrupter.clone())
            .num_epochs(epochs)
            .with_training_strategy(execution);
        let training = match tui_asked {
            true => tui::<B, M, W::Steps, S>(training, interrupter),
            false => training.renderer(Quiet),
        };
        training.launch(learner).model
    };
    let mut books = Books {
        inputs,
        metrics,
        progress,
        stats,
        items_per_example,
        sums: EvalSums::default(),
        after_validation: None,
    };
    let trained = std::thread::scope(|scope| {
        let producers = asked
            .into_iter()
            .enumerate()
            .map(|(rank, asked)| {
                std::thread::Builder::new()
                    .name(format!("kiln-worker-{rank}-data"))
                    .spawn_scoped(scope, move || produce::<B, M, W>(data, asked))
            })
            .collect::<std::io::Result<Vec<_>>>();
        // Returning drops the loaders: the producers already started see their
        // requests end, and stop.
        let producers = match producers {
            Ok(producers) => producers,
            Err(e) => return Err(e),
        };
        let closer = shared.clone();
        let trainer = scope.spawn(move || {
            let result = std::panic::catch_unwind(AssertUnwindSafe(launch));
            closer.close();
            result
        });
        // A panic while booking (a run tracker's, say) is the run's failure like an
        // error; the events that follow are drained unbooked.
        let mut broken = false;
        for event in received {
            if broken {
                continue;
            }
            match std::panic::catch_unwind(AssertUnwindSafe(|| books.take(event))) {
                Ok(Ok(())) => {}
                Ok(Err(e)) => shared.fail(Failure::Error(e)),
                Err(panic) => {
                    broken = true;
                    shared.fail(Failure::Panicked(crate::run::panic_message(panic.as_ref())));
                }
            }
        }
        let trained = trainer.join();
        for producer in producers {
            let _ = producer.join();
        }
        Ok(trained)
    });
    let trained = match trained {
        Err(e) => {
            return Err(Failure::Error(crate::CoordinatorError::NotAvailable {
                what: "a data producer thread".into(),
                reason: e.to_string(),
            }));
        }
        Ok(Ok(Ok(inner))) => inner,
        Ok(Ok(Err(panic)) | Err(panic)) => {
            return Err(Failure::Panicked(crate::run::panic_message(panic.as_ref())));
        }
    };
    let mut position = shared.position();
    stats.optimizer_state_bytes = position.optimizer_state_bytes;
    stats.collective_seconds += position.collective_seconds;
    stats.replica_spread = position.replica_spread;
    if let Some(scaler) = &position.scaler {
        stats.skipped_steps = scaler.state().skipped;
    }
    if let Some(failure) = position.failure.take() {
        return Err(failure);
    }
    drop(position);
    Ok(M::from_inner(trained.model))
}

/// burn-train epochs left to run: epochs from `start` until `n_epochs` or until
/// the run reaches `total` optimizer steps.
fn epochs_left(
    start: (usize, usize),
    n_epochs: usize,
    (per_epoch, accumulate): (usize, usize),
    mut steps: u64,
    total: u64,
) -> usize {
    let (mut epoch, mut from) = start;
    let mut count = 0;
    while epoch < n_epochs && steps < total {
        let (_, after) = epoch_stop(per_epoch, accumulate, from, steps, total);
        steps = after;
        count += 1;
        epoch += 1;
        from = 0;
    }
    count
}

/// The calling thread's side: the run's books, fed by [`Event`]s.
struct Books<'a, 'i, 't, B: Backend, D> {
    inputs: &'a LoopInputs<'i, B, D>,
    metrics: &'a mut Metrics<'t>,
    progress: &'a mut Progress,
    stats: &'a mut LoopStats,
    items_per_example: f64,
    sums: EvalSums,
    /// A checkpoint waiting for the end of its epoch's validation.
    after_validation: Option<(
        crate::checkpoint::Snapshot,
        usize,
        usize,
        Option<ScalerState>,
    )>,
}

impl<B: Backend, D> Books<'_, '_, '_, B, D> {
    fn take(&mut self, event: Event) -> Result<(), crate::CoordinatorError> {
        let (config, task) = (self.inputs.config, self.inputs.task);
        match event {
            Event::Epoch(epoch) => self.progress.epoch(epoch, self.inputs.n_epochs),
            Event::Step(record) => book_step(
                &record,
                task,
                self.items_per_example,
                self.stats,
                self.metrics,
                self.progress,
            )?,
            Event::Save {
                snapshot,
                epoch,
                batch,
                after_validation,
                loss_scale,
            } => match (&self.inputs.checkpoints, after_validation) {
                (Some(_), true) => {
                    self.after_validation = Some((snapshot, epoch, batch, loss_scale))
                }
                (Some(ctx), false) => {
                    let mut state =
                        trainer_state(ctx, self.stats, self.metrics, config.seed, epoch, batch);
                    state.loss_scale = loss_scale;
                    write_checkpoint(ctx, &snapshot, &state, self.metrics)?;
                }
                (None, _) => {}
            },
            Event::ValidBatch(sums) => {
                self.sums.add(sums);
                self.metrics.heartbeat()?;
            }
            Event::ValidEnd(epoch) => {
                let sums = std::mem::take(&mut self.sums);
                let results = match sums.count > 0.0 {
                    true => sums.metrics(&task.kind),
                    false => Vec::new(),
                };
                book_validation(&results, epoch, self.stats, self.metrics, self.progress)?;
                if let (Some(ctx), Some((snapshot, epoch, batch, loss_scale))) =
                    (&self.inputs.checkpoints, self.after_validation.take())
                {
                    let mut state =
                        trainer_state(ctx, self.stats, self.metrics, config.seed, epoch, batch);
                    state.loss_scale = loss_scale;
                    write_checkpoint(ctx, &snapshot, &state, self.metrics)?;
                }
            }
        }
        Ok(())
    }
}

/// kiln books every number itself: burn-train's metric loggers get nothing to write.
struct Discard;

impl MetricLogger for Discard {
    fn log(&mut self, _: MetricsUpdate, _: usize, _: &BurnSplit) {}

    fn read_numeric(
        &mut self,
        _: &str,
        _: usize,
        _: &BurnSplit,
    ) -> Result<Vec<NumericEntry>, String> {
        Err("kiln keeps metrics in its experiment store".into())
    }

    fn log_metric_definition(&mut self, _: MetricDefinition) {}

    fn log_epoch_summary(&mut self, _: EpochSummary) {}
}

/// burn-train's renderer when kiln shows progress itself (or nothing is shown).
struct Quiet;

impl MetricsRendererTraining for Quiet {
    fn update_train(&mut self, _: MetricState) {}
    fn update_valid(&mut self, _: MetricState) {}
    fn render_train(&mut self, _: TrainingProgress, _: Vec<ProgressType>) {}
    fn render_valid(&mut self, _: TrainingProgress, _: Vec<ProgressType>) {}
}

impl MetricsRendererEvaluation for Quiet {
    fn update_test(&mut self, _: EvaluationName, _: MetricState) {}
    fn render_test(&mut self, _: EvaluationProgress, _: Vec<ProgressType>) {}
}

impl MetricsRenderer for Quiet {
    fn manual_close(&mut self) {}
    fn register_metric(&mut self, _: MetricDefinition) {}
}

type Training<B, M, St, S> = SupervisedTraining<Components<B, M, St, S>>;

/// burn-train's terminal dashboard, showing the loss.
#[cfg(feature = "tui")]
fn tui<B, M, St, S>(
    training: Training<B, M, St, S>,
    interrupter: Interrupter,
) -> Training<B, M, St, S>
where
    B: AutodiffBackend,
    M: AutodiffModule<B> + 'static,
    St: Steps<B, M>,
    S: SimpleOptimizer<B::InnerBackend> + 'static,
{
    use burn::train::metric::LossMetric;
    use burn::train::renderer::tui::TuiMetricsRendererWrapper;
    training
        .metrics((LossMetric::<B::InnerBackend>::new(),))
        .renderer(TuiMetricsRendererWrapper::new(interrupter, None))
}

/// Without the `tui` feature the plan refuses `ProgressMode::Tui` before training;
/// should it get here, nothing is rendered.
#[cfg(not(feature = "tui"))]
fn tui<B, M, St, S>(training: Training<B, M, St, S>, _: Interrupter) -> Training<B, M, St, S>
where
    B: AutodiffBackend,
    M: AutodiffModule<B> + 'static,
    St: Steps<B, M>,
    S: SimpleOptimizer<B::InnerBackend> + 'static,
{
    training.renderer(Quiet)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rstest::rstest;

    #[rstest]
    #[case::fresh((0, 0), 3, (10, 1), 0, 30, 3)]
    #[case::cut_by_max_steps((0, 0), 3, (10, 1), 0, 15, 2)]
    #[case::resumed_mid_epoch((1, 4), 3, (10, 1), 14, 30, 2)]
    #[case::finished((3, 0), 3, (10, 1), 30, 30, 0)]
    #[case::accumulated((0, 0), 2, (10, 4), 0, 6, 2)]
    fn epochs_left_counts_what_remains(
        #[case] start: (usize, usize),
        #[case] n_epochs: usize,
        #[case] shape: (usize, usize),
        #[case] steps: u64,
        #[case] total: u64,
        #[case] want: usize,
    ) {
        assert_eq!(epochs_left(start, n_epochs, shape, steps, total), want);
    }
}

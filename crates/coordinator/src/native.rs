//! kiln's native training loop, for one worker or a data-parallel group (the
//! seed's "vanilla" loop).
//!
//! Per optimizer step: `accumulate_grad_batches` micro-batches, each a forward and
//! backward pass of the [`Workload`] (a `TaskModel`'s task loss, or a Burn model's
//! own `TrainStep`), gradients averaged over the micro-batches, optional
//! global-norm clipping, the scheduler's learning rate, one step of the run's
//! optimizer. Validation after every epoch (and after a `max_steps` cut). Data
//! order is a permutation of the training set drawn from `(seed, epoch)`, and
//! Burn's RNG is seeded from `(seed, step, micro-batch, rank)` before each
//! micro-batch, so a run (dropout included) is reproducible bit for bit on CPU and
//! resumes exactly.

use std::panic::AssertUnwindSafe;
use std::time::Instant;

use burn::module::AutodiffModule;
use burn::optim::adaptor::OptimizerAdaptor;
use burn::optim::lr_scheduler::LrScheduler;
use burn::optim::{GradientsParams, Optimizer, SimpleOptimizer};
use burn::tensor::backend::AutodiffBackend;
use kiln_core::Split;

use crate::CoordinatorError;
use crate::checkpoint::{Loaded, Snapshot};
use crate::collective::{Link, Peer};
use crate::group::{
    Group, Offer, StartGate, check_replicas, exchange_failure, exchange_step, failure_text,
    gather_shards, guard, on_own_threads, spawn_worker, threads_per_worker,
};
use crate::objective::EvalSums;
use crate::optim::{OptimRecord, Optimization};
use crate::precision::{self, LossScaler};
use crate::progress::Progress;
use crate::run::{
    CheckpointCtx, Failure, LoopInputs, LoopStats, RunShape, SaveAt, SaveClock, StepRecord,
    book_step, book_validation, epoch_order, restore_stats, resume_optimization, resume_position,
    shard, trainer_state, write_checkpoint,
};
use crate::step::MicroStep;
use crate::stop::StopHandle;
use crate::tracking::Metrics;
use crate::update::{Accumulation, StepAt, StepEngine, Summed, take_step};
use crate::workload::{Steps, Validates, Workload};

/// This worker's place in a data-parallel group; [`Replica::single`] for a run on
/// one device.
pub(crate) struct Replica<'g, B, M, S>
where
    B: AutodiffBackend,
    M: AutodiffModule<B>,
    S: SimpleOptimizer<B::InnerBackend> + 'static,
{
    /// Rank of this worker among every worker of every node (0 keeps the books
    /// and writes checkpoints).
    pub rank: usize,
    /// Workers in the group, every node's.
    pub world: usize,
    /// Workers of the group in this process.
    pub local: usize,
    /// How this process reaches the other nodes' workers (multi-node runs).
    pub link: Option<&'g Link>,
    /// fsdp: each worker keeps the optimizer state of, and updates, only its share
    /// of the parameters (ZeRO stage 1).
    pub sharded: bool,
    /// What the group's workers share in this process.
    pub group: Option<&'g Group<OptimRecord<S, B, M>>>,
    /// The precision that runs (resolved against the backend).
    pub precision: kiln_core::Precision,
}

impl<B, M, S> Replica<'_, B, M, S>
where
    B: AutodiffBackend,
    M: AutodiffModule<B>,
    S: SimpleOptimizer<B::InnerBackend> + 'static,
{
    pub fn single(precision: kiln_core::Precision) -> Self {
        Self {
            rank: 0,
            world: 1,
            local: 1,
            link: None,
            sharded: false,
            group: None,
            precision,
        }
    }

    /// Whether this worker owns the parameter at `index` (visiting order).
    fn owns(&self, index: usize) -> bool {
        crate::group::owns(self.sharded, self.rank, self.world, index)
    }
}

/// One accumulation group's work on this worker, before the exchange.
struct Local {
    /// This worker's sums over the group's micro-batches: its loss is the mean of
    /// loss × its share of each micro-batch (summed over workers: the step's mean
    /// loss; the share is exactly 1 with one worker).
    summed: Summed,
    /// Examples of the global batches (all workers).
    samples: u64,
}

/// Trains `model` with kiln's native loop as worker `replica` (see `run.rs` for
/// what the books hold). With one worker this is the seed's plain loop; with
/// several, each worker trains on its shard of every global batch and the group sums
/// the weighted gradients through burn-collective before each identical optimizer
/// step.
#[allow(clippy::too_many_arguments)]
pub(crate) fn fit<B, M, W, S, LR>(
    inputs: &LoopInputs<'_, B, W>,
    model: M,
    optimization: Optimization<B, M, S, LR>,
    resume: Option<&Loaded>,
    replica: &Replica<'_, B, M, S>,
    metrics: &mut Metrics<'_>,
    progress: &mut Progress,
    stats: &mut LoopStats,
) -> Result<M, Failure>
where
    B: AutodiffBackend,
    M: AutodiffModule<B>,
    W: Workload<B, M>,
    S: SimpleOptimizer<B::InnerBackend> + 'static,
    LR: LrScheduler,
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
    let (rank, world) = (replica.rank, replica.world);
    let _worker = (world > 1).then(|| {
        let node = replica.link.map_or(0, Link::node_rank);
        tracing::info_span!("worker", node, rank).entered()
    });
    let RunShape {
        n_train,
        per_epoch,
        accumulate,
        total,
        items_per_example,
    } = RunShape::of(
        config,
        data.len(Split::Train),
        data.items_per_example(),
        n_epochs,
        world,
    );
    // Only rank 0 writes checkpoints; every worker takes the same decisions.
    let writes = rank == 0;

    B::seed(device, config.seed);
    let mut model = model;
    let (start_epoch, start_batch) = resume_position(resume, per_epoch);
    // True modes store the parameters (and so the optimizer's state) in their
    // dtype; checkpoints hold f32. The coordinator refuses a true mode for an
    // optimizer whose state kiln cannot cast.
    let stored =
        precision::stored_dtype(replica.precision).filter(|_| optimization.cast_state.is_some());
    if let Some(loaded) = resume {
        model = loaded.model::<B, M>(model, device)?;
    }
    if let Some(dtype) = stored {
        model = precision::store_as(model, dtype);
    }
    let optimization = match resume {
        Some(loaded) => {
            restore_stats(loaded, stats);
            let owns = |i| replica.owns(i);
            resume_optimization(
                optimization,
                loaded,
                &model,
                device,
                stored,
                replica.sharded.then_some(&owns as &dyn Fn(usize) -> bool),
            )?
        }
        None => optimization,
    };
    let Optimization {
        optimizer: mut optim,
        mut scheduler,
        ..
    } = optimization;
    let mut scaler = (replica.precision == kiln_core::Precision::F16Mixed).then(|| {
        LossScaler::new(
            &config.loss_scaling,
            resume.and_then(|l| l.state.loss_scale),
        )
    });
    let previous_seconds = stats.train_seconds;
    // Materialise lazily initialised parameters on the device before anything is
    // cloned (Burn 0.21, #5040: clones of lazy params initialise independently).
    let mut model = model.fork(device);
    let peer = match replica.group {
        Some(_) => Some(Peer::<B>::register(
            rank,
            world,
            replica.local,
            device,
            replica.link,
        )?),
        None => None,
    };
    let exchanged = |e| match replica.group {
        Some(group) => group.explain(stop, e),
        None => exchange_failure(stop, e),
    };
    let outcome = (|| -> Result<M, Failure> {
        if let (Some(peer), Some(group)) = (&peer, replica.group) {
            // Replicas copied in one process are identical, and so are those of
            // every node (kiln's seeded initialisation). Rank 0 tells its run id
            // to the others.
            let run = checkpoints.as_ref().and_then(|c| c.run_id);
            stats.run_id = check_replicas(peer, group, &model, run, stop, "the start")?.1;
        }
        let started = Instant::now();
        let mut validation_seconds = 0.0;
        let mut clock = SaveClock::new(stats.steps);
        // A failure of this worker outside a step (booking, validation, a checkpoint)
        // is told to the others at the next exchange.
        let mut deferred: Option<Failure> = None;

        for epoch in start_epoch..n_epochs {
            if stats.steps >= total {
                break;
            }
            progress.epoch(epoch, n_epochs);
            let order = epoch_order(config.seed, epoch, n_train);
            let mut b = if epoch == start_epoch { start_batch } else { 0 };
            let mut save_after_validation = None;
            // Writes a checkpoint after micro-batch `b` of this epoch; a failure to
            // write is deferred to the next exchange in a group.
            let write = |ctx: &CheckpointCtx<'_>,
                         model: &M,
                         optim: &OptimizerAdaptor<S, M, B>,
                         scheduler: &LR,
                         scaler: Option<&LossScaler>,
                         stats: &LoopStats,
                         metrics: &mut Metrics<'_>,
                         b: usize,
                         deferred: &mut Option<Failure>| {
                save(
                    ctx,
                    replica,
                    model,
                    optim,
                    scheduler,
                    scaler,
                    stats,
                    metrics,
                    config.seed,
                    epoch,
                    b,
                )
                .or_else(|e| defer(deferred, e, peer.is_some()))
            };
            while b < per_epoch {
                let group = accumulate.min(per_epoch - b);
                let step = stats.steps + 1;
                let logging = StepRecord::is_logged(config.log_every_n_steps, step, total);
                let local = std::panic::catch_unwind(AssertUnwindSafe(|| {
                    train_group::<B, M, W, S>(
                        inputs,
                        &model,
                        &order,
                        (b, group),
                        replica,
                        scaler.as_ref().map(LossScaler::scale),
                        (step, epoch, logging),
                    )
                }))
                .unwrap_or_else(|panic| {
                    Err(Failure::Panicked(crate::run::panic_message(panic.as_ref())))
                });
                b += group;
                let time_due = writes
                    && checkpoints
                        .as_ref()
                        .is_some_and(|c| clock.time_due(c.policy));
                let member = peer.as_ref().zip(replica.group);
                let (grads, step_loss, samples, time_due, outputs) = match (member, local) {
                    (None, Ok(Local { summed, samples })) => (
                        summed.grads.unwrap_or_default(),
                        summed.loss,
                        samples,
                        time_due,
                        summed.metrics,
                    ),
                    (None, Err(failure)) => return Err(failure),
                    (Some((peer, group)), local) => {
                        let stopped = matches!(local, Err(Failure::Stopped));
                        let (summed, samples, own) = match local {
                            Ok(Local { summed, samples }) => (summed, samples, deferred.take()),
                            Err(Failure::Stopped) => (Summed::default(), 0, deferred.take()),
                            Err(f) => (Summed::default(), 0, Some(f)),
                        };
                        let Summed {
                            grads,
                            loss: mine_loss,
                            metrics: outputs,
                        } = summed;
                        let offer = Offer {
                            grads: grads.as_ref(),
                            loss: mine_loss,
                            stopped: stopped || stop.is_stopped(),
                            failure: own,
                            time_due,
                            status_only: false,
                        };
                        let exchange = Instant::now();
                        let (summed, all) = exchange_step(
                            peer,
                            group,
                            rank,
                            &model,
                            offer,
                            stop,
                            &format!("step {step}"),
                        )?;
                        stats.collective_seconds += exchange.elapsed().as_secs_f64();
                        // Rank 0's clock decides time-based checkpoints for all.
                        (summed, all.loss, samples, all.save_due > 0.0, outputs)
                    }
                };
                stats.samples += samples;
                let owns = |i| replica.owns(i);
                let at = StepAt {
                    step,
                    epoch,
                    loss: step_loss,
                    logging,
                    metrics: outputs,
                    clip: config.gradient_clip_val,
                    owns: replica.sharded.then_some(&owns as &dyn Fn(usize) -> bool),
                };
                let mut engine = NativeStep {
                    optim: &mut optim,
                    scheduler: &mut scheduler,
                    peer: peer.as_ref(),
                    replica,
                    check_replicas: config.check_replicas,
                    stop,
                    exchanged: &exchanged,
                    stats: &mut *stats,
                    deferred: &mut deferred,
                    started,
                    seconds_before: previous_seconds - validation_seconds,
                };
                let (stepped, record) =
                    take_step::<B, M, _>(&mut engine, model, grads, at, scaler.as_mut());
                model = stepped;
                let record = record?;
                if let Some(scaler) = &scaler {
                    stats.skipped_steps = scaler.state().skipped;
                }
                if let Err(e) =
                    book_step(&record, task, items_per_example, stats, metrics, progress)
                {
                    defer(&mut deferred, e.into(), peer.is_some())?;
                }
                if let Some(ctx) = checkpoints {
                    let epoch_done = b == per_epoch;
                    let due =
                        clock.due_at(ctx.policy, step, epoch, epoch_done, step >= total, time_due);
                    match due {
                        Some(SaveAt::Now) => {
                            write(
                                ctx,
                                &model,
                                &optim,
                                &scheduler,
                                scaler.as_ref(),
                                stats,
                                metrics,
                                b,
                                &mut deferred,
                            )?;
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
            if writes {
                let validation_started = Instant::now();
                // A panic here (a model or data module) is this worker's failure like
                // any other: in a group the others learn of it at the next exchange
                // instead of waiting there for a worker that is gone.
                let validated = std::panic::catch_unwind(AssertUnwindSafe(|| {
                    validate::<B, M, W>(inputs, &model, replica.precision, metrics).and_then(
                        |results| book_validation(&results, epoch, stats, metrics, progress),
                    )
                }));
                validation_seconds += validation_started.elapsed().as_secs_f64();
                let validated = match validated {
                    Ok(outcome) => outcome.map_err(Failure::from),
                    Err(panic) => Err(Failure::Panicked(crate::run::panic_message(panic.as_ref()))),
                };
                if let Err(failure) = validated {
                    defer(&mut deferred, failure, peer.is_some())?;
                }
            } else {
                stats.epochs = epoch + 1;
            }
            if let (Some(ctx), Some(b)) = (checkpoints, save_after_validation) {
                write(
                    ctx,
                    &model,
                    &optim,
                    &scheduler,
                    scaler.as_ref(),
                    stats,
                    metrics,
                    b,
                    &mut deferred,
                )?;
                clock.saved(stats.steps);
            }
            if stats.steps >= total {
                break;
            }
        }
        // Every worker ends here after the same steps; one last exchange tells each
        // whether another failed after the last step.
        if let (Some(peer), Some(group)) = (&peer, replica.group) {
            let offer = Offer {
                failure: deferred.take(),
                ..Offer::default()
            };
            exchange_step(peer, group, rank, &model, offer, stop, "the end")?;
        }
        stats.optimizer_state_bytes = crate::checkpoint::encoded_len::<B, _>(optim.to_record());
        match deferred {
            Some(failure) => Err(failure),
            None => Ok(model),
        }
    })();
    // Leaving the group matters only when the run went well: after a failure the
    // group may be gone already (released from a worker that panicked).
    let finished = peer.map(|peer| peer.finish()).transpose();
    match (outcome, finished) {
        (Ok(_), Err(e)) => Err(e.into()),
        (outcome, _) => outcome,
    }
}

/// The shape of a data-parallel group as seen from this process.
pub(crate) struct GroupPlan<'l> {
    /// fsdp (optimizer state sharded) rather than ddp.
    pub sharded: bool,
    /// The precision that runs.
    pub precision: kiln_core::Precision,
    /// Global rank of this process's first worker (node rank × local workers).
    pub first_rank: usize,
    /// Workers of every node.
    pub world: usize,
    /// How to reach the other nodes (multi-node runs).
    pub link: Option<&'l Link>,
}

/// Trains with one worker per device of `devices` (ranks `plan.first_rank..` in
/// that order): the first on this thread (it keeps the books on node 0), the others
/// on their own threads. Returns the first worker's model; every worker ends with
/// the same weights.
#[allow(clippy::too_many_arguments)]
pub(crate) fn fit_group<B, M, W, S, LR>(
    inputs: &LoopInputs<'_, B, W>,
    devices: &[B::Device],
    model: M,
    optimization: Optimization<B, M, S, LR>,
    resume: Option<&Loaded>,
    plan: &GroupPlan<'_>,
    metrics: &mut Metrics<'_>,
    progress: &mut Progress,
    stats: &mut LoopStats,
) -> Result<M, Failure>
where
    B: AutodiffBackend,
    M: AutodiffModule<B>,
    W: Workload<B, M>,
    S: SimpleOptimizer<B::InnerBackend> + 'static,
    LR: LrScheduler,
{
    let _only_group = crate::group::one_at_a_time();
    let local = devices.len();
    let replica = |rank: usize, group| Replica {
        rank: plan.first_rank + rank,
        world: plan.world,
        local,
        link: plan.link,
        sharded: plan.sharded,
        group: Some(group),
        precision: plan.precision,
    };
    // Materialised once, then copied: every replica starts from the same weights.
    let model = model.fork(&devices[0]);
    let group = Group::<OptimRecord<S, B, M>>::new();
    let in_process = plan.link.is_none();
    let gate = StartGate::new();
    let threads = threads_per_worker(local);
    std::thread::scope(|scope| {
        let _undecided = gate.close_if_undecided();
        let workers: Result<Vec<_>, Failure> = (1..local)
            .map(|rank| {
                let replica_model = model.clone().fork(&devices[rank]);
                let group = &group;
                let device = &devices[rank];
                let replica = &replica;
                let optimization = optimization.clone();
                let rank_in_run = plan.first_rank + rank;
                let name = format!("kiln-worker-{rank_in_run}");
                spawn_worker(scope, &gate, rank_in_run, name, move || {
                    on_own_threads(rank_in_run, threads, move || {
                        let inputs = LoopInputs {
                            device,
                            checkpoints: inputs.checkpoints.as_ref().map(|c| CheckpointCtx {
                                run_dir: c.run_dir,
                                policy: c.policy,
                                signatures: c.signatures.clone(),
                                run_id: None,
                                attempt: c.attempt,
                            }),
                            ..*inputs
                        };
                        guard::<B, _, _>(group, rank_in_run, in_process, || {
                            fit(
                                &inputs,
                                replica_model,
                                optimization,
                                resume,
                                &replica(rank, group),
                                &mut Metrics::detached(),
                                &mut Progress::new(kiln_core::ProgressMode::Off, 0),
                                &mut LoopStats::default(),
                            )
                        })
                        .and_then(|outcome| outcome.map(|_| ()))
                    })
                })
            })
            .collect();
        // A worker that could not start fails the run; those that did return at once.
        gate.decide(workers.is_ok());
        let workers = workers?;
        let outcome = on_own_threads(plan.first_rank, threads, || {
            guard::<B, _, _>(&group, plan.first_rank, in_process, || {
                fit(
                    inputs,
                    model,
                    optimization,
                    resume,
                    &replica(0, &group),
                    metrics,
                    progress,
                    stats,
                )
            })
        })
        .and_then(|outcome| outcome);
        let mut others = Vec::new();
        for (rank, worker) in (1..local).zip(workers) {
            let rank = plan.first_rank + rank;
            match worker.join() {
                Ok(Some(Ok(())) | None) => {}
                Ok(Some(Err(failure))) => others.push((rank, failure)),
                Err(panic) => others.push((
                    rank,
                    Failure::Panicked(crate::run::panic_message(panic.as_ref())),
                )),
            }
        }
        match (outcome, others.into_iter().next()) {
            (Ok(model), None) => Ok(model),
            (Err(failure), _) => Err(failure),
            (Ok(_), Some((rank, failure))) => Err(Failure::Error(CoordinatorError::Collective(
                format!("worker {rank} failed: {}", failure_text(&failure)),
            ))),
        }
    })
}

/// Keeps a failure outside a step for the next exchange (several workers), or ends
/// the run with it now (one worker).
fn defer(deferred: &mut Option<Failure>, failure: Failure, in_group: bool) -> Result<(), Failure> {
    match in_group {
        true => {
            deferred.get_or_insert(failure);
            Ok(())
        }
        false => Err(failure),
    }
}

/// The forward and backward passes of one accumulation group on this worker's
/// shards: micro-batches `b..b + group` of `order`.
fn train_group<B, M, W, S>(
    inputs: &LoopInputs<'_, B, W>,
    model: &M,
    order: &[usize],
    (b, group): (usize, usize),
    replica: &Replica<'_, B, M, S>,
    loss_scale: Option<f64>,
    (step, epoch, logged): (u64, usize, bool),
) -> Result<Local, Failure>
where
    B: AutodiffBackend,
    M: AutodiffModule<B>,
    W: Workload<B, M>,
    S: SimpleOptimizer<B::InnerBackend> + 'static,
{
    let (config, work, device) = (inputs.config, inputs.data, inputs.device);
    let (rank, world) = (replica.rank, replica.world);
    let batch_size = config.batch_size;
    let steps = work.steps();
    let mut sum = Accumulation::default();
    let mut samples = 0;
    for m in b..b + group {
        let (mine, global) = shard(order, m, batch_size, rank, world);
        samples += global as u64;
        if mine.is_empty() {
            // A short last global batch: this worker sends zero gradients.
            if inputs.stop.is_stopped() {
                return Err(Failure::Stopped);
            }
            sum.add(model, None, 0.0, 0.0, &[]);
            continue;
        }
        let batch = work.batch(mine, device)?;
        // Checked once the batch is built: a stop asked meanwhile (a signal, or the
        // data module itself) ends the run before the batch is trained on.
        if inputs.stop.is_stopped() {
            return Err(Failure::Stopped);
        }
        // This worker's share of the micro-batch, and of the group.
        let share = mine.len() as f64 / global as f64;
        let micro = MicroStep {
            in_group: world > 1,
            group,
            share,
            precision: replica.precision,
            loss_scale,
            logged: logged && rank == 0,
            step,
            epoch,
            batch: m,
        };
        let turn = config.deterministic && replica.local > 1;
        let _turn = micro.seed_rng::<B>(device, config.seed, rank, turn);
        let passed = steps.backward(model, batch, &micro, None)?;
        sum.add(
            model,
            Some(passed.grads),
            passed.loss,
            share,
            &passed.metrics,
        );
    }
    Ok(Local {
        summed: sum.finish(),
        samples,
    })
}

/// The native loop's side of an optimizer step ([`take_step`]): its scheduler and
/// optimizer, and its `Peer` for fsdp's gather and the replica check.
struct NativeStep<'a, B, M, S, LR>
where
    B: AutodiffBackend,
    M: AutodiffModule<B>,
    S: SimpleOptimizer<B::InnerBackend> + 'static,
{
    optim: &'a mut OptimizerAdaptor<S, M, B>,
    scheduler: &'a mut LR,
    peer: Option<&'a Peer<B>>,
    replica: &'a Replica<'a, B, M, S>,
    check_replicas: bool,
    stop: &'a StopHandle,
    /// An exchange's error as the run's failure.
    exchanged: &'a dyn Fn(CoordinatorError) -> Failure,
    stats: &'a mut LoopStats,
    /// This worker's failure for the next exchange.
    deferred: &'a mut Option<Failure>,
    /// When this attempt started training, and the training seconds before it
    /// less validation's.
    started: Instant,
    seconds_before: f64,
}

impl<B, M, S, LR> StepEngine<M> for NativeStep<'_, B, M, S, LR>
where
    B: AutodiffBackend,
    M: AutodiffModule<B>,
    S: SimpleOptimizer<B::InnerBackend> + 'static,
    LR: LrScheduler,
{
    fn lr(&mut self) -> f64 {
        self.scheduler.step()
    }

    fn optimize(&mut self, model: M, lr: f64, grads: GradientsParams) -> M {
        self.optim.step(lr, model, grads)
    }

    fn gather(&mut self, model: &M) -> Result<Option<M>, Failure> {
        let Some(peer) = self.peer.filter(|_| self.replica.sharded) else {
            return Ok(None);
        };
        let exchange = Instant::now();
        let replica = self.replica;
        let gathered = peer
            .gather_params(model.clone(), &|i| replica.owns(i))
            .map_err(self.exchanged);
        self.stats.collective_seconds += exchange.elapsed().as_secs_f64();
        gathered.map(Some)
    }

    fn check(&mut self, model: &M, step: u64) -> Result<(), Failure> {
        let (Some(peer), Some(group), true) = (self.peer, self.replica.group, self.check_replicas)
        else {
            return Ok(());
        };
        let at = format!("step {step}");
        match check_replicas(peer, group, model, None, self.stop, &at) {
            Ok((spread, _)) => {
                let spread = self.stats.replica_spread.unwrap_or(0.0).max(spread);
                self.stats.replica_spread = Some(spread);
                Ok(())
            }
            // Told to the others at the next exchange.
            Err(failure @ Failure::Error(_)) => defer(self.deferred, failure, true),
            Err(other) => Err(other),
        }
    }

    fn counters(&self) -> (u64, f64) {
        let seconds = self.seconds_before + self.started.elapsed().as_secs_f64();
        (self.stats.samples, seconds)
    }
}

/// Writes a checkpoint (rank 0), gathering the optimizer shards first under fsdp.
#[allow(clippy::too_many_arguments)]
fn save<B, M, S, LR>(
    ctx: &CheckpointCtx<'_>,
    replica: &Replica<'_, B, M, S>,
    model: &M,
    optim: &OptimizerAdaptor<S, M, B>,
    scheduler: &LR,
    scaler: Option<&LossScaler>,
    stats: &LoopStats,
    metrics: &mut Metrics<'_>,
    seed: u64,
    epoch: usize,
    b: usize,
) -> Result<(), Failure>
where
    B: AutodiffBackend,
    M: AutodiffModule<B>,
    S: SimpleOptimizer<B::InnerBackend> + 'static,
    LR: LrScheduler,
{
    let shards = gather_shards(
        replica.group,
        replica.rank,
        replica.sharded,
        replica.world,
        optim.to_record(),
    )?;
    let Some((mut record, others)) = shards else {
        return Ok(());
    };
    for shard in others {
        record.extend(shard);
    }
    let snapshot = Snapshot::take::<B, M, B, _>(model, record)?
        .with_scheduler::<B, _>(scheduler.to_record::<B>())?;
    let mut state = trainer_state(ctx, stats, metrics, seed, epoch, b);
    state.loss_scale = scaler.map(LossScaler::state);
    write_checkpoint(ctx, &snapshot, &state, metrics)?;
    Ok(())
}

/// Mean validation loss and the task's metrics over the validation split.
pub(crate) fn validate<B, M, W>(
    inputs: &LoopInputs<'_, B, W>,
    model: &M,
    precision: kiln_core::Precision,
    metrics: &mut Metrics<'_>,
) -> Result<Vec<(&'static str, f64)>, CoordinatorError>
where
    B: AutodiffBackend,
    M: AutodiffModule<B>,
    W: Workload<B, M>,
{
    let (config, work) = (inputs.config, inputs.data);
    let n_valid = work.len(Split::Valid);
    if n_valid == 0 {
        return Ok(Vec::new());
    }
    let inner = model.valid();
    let mut batches = n_valid.div_ceil(config.batch_size);
    if let Some(limit) = config.limit_val_batches {
        batches = batches.min(limit);
    }
    let all: Vec<usize> = (0..n_valid).collect();
    let steps = work.steps();
    let mut sums = EvalSums::default();
    for chunk in all.chunks(config.batch_size).take(batches) {
        let batch = work.valid_batch(chunk, inputs.device)?;
        sums.add(steps.evaluate(&inner, batch, chunk.len(), precision)?);
        metrics.heartbeat()?;
    }
    Ok(sums.metrics(&inputs.task.kind))
}

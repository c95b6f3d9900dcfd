//! What the training thread (inside burn-train) and the bookkeeping thread share:
//! the run's fixed settings, the step counters, and the events sent from one to the
//! other.

use std::any::Any;
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use std::marker::PhantomData;

use burn::optim::lr_scheduler::LrScheduler;
use burn::prelude::Backend;
use burn::train::Interrupter;
use kiln_core::{CheckpointPolicy, Precision};

use crate::checkpoint::Snapshot;
use crate::objective::EvalSums;
use crate::precision::{LossScaler, ScalerState};
use crate::run::{Failure, SaveClock, StepRecord};
use crate::update::Accumulation;
use crate::{CoordinatorError, StopHandle};

/// What the training thread tells the bookkeeping thread, in order.
pub(crate) enum Event {
    /// Training of `epoch` begins.
    Epoch(usize),
    /// An optimizer step was taken.
    Step(StepRecord),
    /// A checkpoint to write: now, or after the validation that follows.
    Save {
        snapshot: Snapshot,
        epoch: usize,
        batch: usize,
        after_validation: bool,
        /// `16-mixed`: the loss scaler's state at the step.
        loss_scale: Option<ScalerState>,
    },
    /// Sums of one validation batch.
    ValidBatch(EvalSums),
    /// `epoch`'s validation is complete.
    ValidEnd(usize),
}

/// Settings fixed for the whole run.
#[derive(Debug, Clone)]
pub(crate) struct Settings {
    /// The run's seed, and this worker's rank (Burn's RNG is seeded from them
    /// before every micro-batch).
    pub seed: u64,
    pub rank: usize,
    /// `deterministic` in a group: the workers take turns with Burn's RNG
    /// ([`MicroStep::seed_rng`](crate::step::MicroStep::seed_rng)).
    pub in_turn: bool,
    pub per_epoch: usize,
    pub accumulate: usize,
    pub total: u64,
    pub log_every_n_steps: u64,
    pub gradient_clip_val: Option<f64>,
    pub checkpoints: Option<CheckpointPolicy>,
    /// Compare the replicas after every step (`check_replicas`).
    pub check_replicas: bool,
    /// The backend sums the gradients over the group during backward
    /// (`process_group_backend = nccl`, [`crate::sync`]).
    pub backend_sync: bool,
    /// The precision that runs (`docs/precision.md`).
    pub precision: Precision,
}

/// Where the training thread stands.
pub(crate) struct Position {
    /// Kiln epoch being trained.
    pub epoch: usize,
    /// Next micro-batch of the epoch.
    pub batch: usize,
    /// Optimizer steps taken.
    pub steps: u64,
    /// The learning rate of the last step.
    pub lr: f64,
    /// Examples trained on.
    pub samples: u64,
    /// The current accumulation group's gradients and losses so far.
    pub accumulated: Accumulation,
    /// The accumulation group is complete: the optimizer step is next.
    pub ready: bool,
    /// Training seconds before this attempt (resume).
    pub previous_seconds: f64,
    pub started: Instant,
    pub validation_seconds: f64,
    pub clock: SaveClock,
    /// Why the run must end, once known (in a group of workers: this worker's
    /// failure, told to the others at the next exchange, until the run ends).
    pub failure: Option<Failure>,
    /// The run is ending: the loaders give nothing more.
    pub ended: bool,
    /// Seconds spent in the group's exchanges.
    pub collective_seconds: f64,
    /// With `check_replicas`: the largest replica difference seen after a step.
    pub replica_spread: Option<f64>,
    /// Encoded size of the optimizer state after the last step.
    pub optimizer_state_bytes: u64,
    /// `16-mixed`: the loss scale and its record of skipped steps.
    pub scaler: Option<LossScaler>,
}

impl Position {
    /// Training seconds so far (validation excluded).
    pub fn train_seconds(&self) -> f64 {
        self.previous_seconds + self.started.elapsed().as_secs_f64() - self.validation_seconds
    }

    /// Micro-batches in the accumulation group that starts at `self.batch`.
    pub fn group_len(&self, settings: &Settings) -> usize {
        let start = self.batch - self.batch % settings.accumulate;
        settings.accumulate.min(settings.per_epoch - start)
    }
}

/// Shared by every clone of the model wrapper, the data loaders and the scheduler.
pub(crate) struct Shared {
    pub settings: Settings,
    /// This worker's place in a data-parallel group (a `group::Member<B, M>`,
    /// typed where it is used); `None` on one device.
    pub member: Option<Arc<dyn Any + Send + Sync>>,
    pub stop: StopHandle,
    pub interrupter: Interrupter,
    events: Mutex<Option<Sender<Event>>>,
    position: Mutex<Position>,
    /// The run's learning-rate scheduler (this worker's copy), stepped once per
    /// optimizer step.
    scheduler: Mutex<Box<dyn Scheduled>>,
}

impl Shared {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        settings: Settings,
        member: Option<Arc<dyn Any + Send + Sync>>,
        stop: StopHandle,
        interrupter: Interrupter,
        events: Sender<Event>,
        position: Position,
        scheduler: Box<dyn Scheduled>,
    ) -> Arc<Self> {
        Arc::new(Self {
            settings,
            member,
            stop,
            interrupter,
            events: Mutex::new(Some(events)),
            position: Mutex::new(position),
            scheduler: Mutex::new(scheduler),
        })
    }

    /// Steps the scheduler: the learning rate of the optimizer step being taken.
    pub fn step_lr(&self) -> f64 {
        let lr = self
            .scheduler
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .step();
        self.position().lr = lr;
        lr
    }

    /// `snapshot` with the scheduler's record.
    pub fn with_scheduler(&self, snapshot: Snapshot) -> Result<Snapshot, CoordinatorError> {
        self.scheduler
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .attach(snapshot)
    }

    /// The position, even if a panicking thread poisoned the lock (the panic is
    /// reported on its own).
    pub fn position(&self) -> MutexGuard<'_, Position> {
        self.position.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Sends `event` to the bookkeeping thread (dropped once it has hung up).
    pub fn send(&self, event: Event) {
        let events = self.events.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(tx) = events.as_ref() {
            let _ = tx.send(event);
        }
    }

    /// Hangs up: the bookkeeping thread sees the end of the events.
    pub fn close(&self) {
        self.events.lock().unwrap_or_else(|p| p.into_inner()).take();
    }

    /// Records `failure` (the first one wins). On one device the run ends here and
    /// burn-train is asked to stop; in a group the failure waits for the next
    /// exchange, which ends the run on every worker at the same step.
    pub fn fail(&self, failure: Failure) {
        {
            let mut position = self.position();
            if position.failure.is_none() {
                position.failure = Some(failure);
            }
        }
        if self.member.is_none() {
            self.end_with(None);
        }
    }

    /// Ends the run (the group decided it: `failure` is this worker's outcome).
    pub fn end_with(&self, failure: Option<Failure>) {
        let reason = {
            let mut position = self.position();
            if let Some(failure) = failure {
                position.failure = Some(failure);
            }
            position.ended = true;
            match &position.failure {
                Some(Failure::Stopped) | None => "stopped".to_string(),
                Some(other) => format!("{other:?}"),
            }
        };
        self.interrupter.stop(Some(&reason));
    }

    /// Whether this worker failed (it skips its work from then on).
    pub fn failed(&self) -> bool {
        self.position().failure.is_some()
    }

    /// Whether the run is ending.
    pub fn ended(&self) -> bool {
        self.position().ended
    }
}

/// The shared state as a non-module field of the model wrapper: cloning shares it.
#[derive(Clone)]
pub(crate) struct SharedRef(pub Arc<Shared>);

impl std::fmt::Debug for SharedRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("kiln step state")
    }
}

/// A learning-rate scheduler with its record's backend fixed, so that the state
/// shared by every clone of the stepper can hold any scheduler.
pub(crate) trait Scheduled: Send {
    /// The next optimizer step's learning rate.
    fn step(&mut self) -> f64;

    /// `snapshot` with this scheduler's record.
    fn attach(&self, snapshot: Snapshot) -> Result<Snapshot, CoordinatorError>;
}

/// Scheduler `LR`, its record on backend `B`.
pub(crate) struct OnBackend<B, LR>(pub LR, pub PhantomData<fn() -> B>);

impl<B: Backend, LR: LrScheduler> Scheduled for OnBackend<B, LR> {
    fn step(&mut self) -> f64 {
        self.0.step()
    }

    fn attach(&self, snapshot: Snapshot) -> Result<Snapshot, CoordinatorError> {
        snapshot.with_scheduler::<B, _>(self.0.to_record::<B>())
    }
}

/// burn-train's scheduler, for its dashboard: the rate of the last optimizer step.
/// The run's own scheduler is stepped once per optimizer step by the stepper
/// ([`Shared::step_lr`]); burn-train steps its scheduler once per micro-batch.
#[derive(Clone)]
pub(crate) struct ShownLr(pub Arc<Shared>);

impl LrScheduler for ShownLr {
    type Record<B: Backend> = ();

    fn step(&mut self) -> f64 {
        self.0.position().lr
    }

    fn to_record<B: Backend>(&self) {}

    fn load_record<B: Backend>(self, _: ()) -> Self {
        self
    }
}

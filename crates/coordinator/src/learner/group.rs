//! The Learner engine's data-parallel mode (`ddp`, `fsdp`): a burn-train custom
//! training strategy ([`GroupStrategy`]) running one `Learner` per device.
//!
//! Each worker runs burn-train's own step calls (`lr_step`, `train_step`,
//! `optimizer_step`) on its shard of every global batch; kiln's [`Stepper`] makes
//! each optimizer step one exchange of the group (`crate::group`, the same rules as
//! the native loop's), so every worker takes the same step, and stops or fails at
//! the same one. Rank 0 runs on burn-train's training thread: it feeds burn-train's
//! event processor (its dashboard), validates, and its events keep the run's books.
//! The other workers run on threads of their own and write nothing.
//!
//! burn-train's own `MultiDevice` strategy is not used: it sums gradients (no
//! average), slices the dataset in contiguous blocks instead of sharding each global
//! batch, and steps one optimizer on the main device.

use std::sync::{Arc, Mutex, OnceLock};

use burn::data::dataloader::{DataLoader, Progress};
use burn::module::AutodiffModule;
use burn::optim::adaptor::OptimizerAdaptor;
use burn::optim::{GradientsParams, SimpleOptimizer};
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;
use burn::train::{
    EventProcessorTraining, InferenceStep, Learner, LearnerEvent, LearningComponentsMarker,
    SupervisedLearningStrategy, SupervisedTrainingEventProcessor, TrainingComponents, TrainingItem,
};

use super::ShownLr;
use super::loader::{Counted, Micro};
use super::shared::Shared;
use super::stepper::{Stepper, StepperOptim};
use crate::CoordinatorError;
use crate::checkpoint::{decode_record, encode_record};
use crate::collective::Peer;
use crate::group::{
    Group, Offer, StartGate, check_replicas, exchange_step, gather_shards, guard, spawn_worker,
};
use crate::optim::OptimRecord;
use crate::run::Failure;
use crate::workload::{Steps, Validates};

/// burn-train's components for model `M` with its workload's steps `St`, trained
/// with optimizer `S`.
pub(crate) type Components<B, M, St, S> = LearningComponentsMarker<
    B,
    ShownLr,
    Stepper<B, M, St>,
    StepperOptim<OptimizerAdaptor<S, M, B>>,
>;

/// A training batch of steps `St`.
type TrainItem<B, M, St> = Micro<<St as Steps<B, M>>::Batch>;

/// A validation batch of steps `St`.
type ValidItem<B, M, St> = Counted<
    <St as Validates<
        <B as AutodiffBackend>::InnerBackend,
        <M as AutodiffModule<B>>::InnerModule,
    >>::ValidBatch,
>;

/// One worker's place in the group, reached by its [`Stepper`] through its
/// [`Shared`] state.
pub(crate) struct Member<B: AutodiffBackend, M> {
    pub rank: usize,
    pub world: usize,
    /// fsdp: this worker keeps the optimizer state of, and updates, only its share
    /// of the parameters.
    pub sharded: bool,
    pub device: B::Device,
    /// The group's first failure, and fsdp's encoded optimizer shards.
    pub group: Arc<Group<Vec<u8>>>,
    /// Registered on the worker's own thread when it starts.
    pub peer: OnceLock<Peer<B>>,
    /// fsdp checkpoints: merges encoded optimizer shards into one record
    /// ([`merge_shards`] for the run's optimizer).
    pub merge: MergeShards<B>,
    pub marker: std::marker::PhantomData<fn() -> M>,
}

/// Merges rank 0's encoded optimizer shard with the others' into one encoded
/// record.
pub(crate) type MergeShards<B> =
    fn(Vec<u8>, Vec<Vec<u8>>, &burn::tensor::Device<B>) -> Result<Vec<u8>, CoordinatorError>;

/// [`MergeShards`] for optimizer `S` and model `M`.
pub(crate) fn merge_shards<B, M, S>(
    mine: Vec<u8>,
    others: Vec<Vec<u8>>,
    device: &B::Device,
) -> Result<Vec<u8>, CoordinatorError>
where
    B: AutodiffBackend,
    M: AutodiffModule<B>,
    S: SimpleOptimizer<B::InnerBackend>,
{
    let mut whole: OptimRecord<S, B, M> = decode_record::<B, _>(mine, device)?;
    for shard in others {
        let shard: OptimRecord<S, B, M> = decode_record::<B, _>(shard, device)?;
        whole.extend(shard);
    }
    encode_record::<B, _>(whole)
}

impl<B: AutodiffBackend, M: AutodiffModule<B>> Member<B, M> {
    /// Whether this worker owns the parameter at `index` (visiting order).
    pub fn owns(&self, index: usize) -> bool {
        crate::group::owns(self.sharded, self.rank, self.world, index)
    }

    fn peer(&self) -> Result<&Peer<B>, Failure> {
        self.peer.get().ok_or_else(|| {
            Failure::Error(CoordinatorError::Collective(format!(
                "worker {} trained before joining its group",
                self.rank
            )))
        })
    }

    /// Sums one step over the group: the summed gradients, the step's loss and
    /// whether rank 0's clock asks for a checkpoint. Under the backend's
    /// synchronisation (`Settings::backend_sync`) `grads` already are the group's
    /// sums and only the status numbers are exchanged.
    pub fn exchange(
        &self,
        shared: &Shared,
        model: &M,
        grads: Option<GradientsParams>,
        loss: f64,
        time_due: bool,
        step: u64,
    ) -> Result<(GradientsParams, f64, bool), Failure> {
        // A stop reaches a worker through its loader, which checks it once a batch
        // is built (as the native loop does), or through burn-train's interrupter
        // (its dashboard). The stop handle itself is not read here: the next batch
        // may be built ahead, during this step, and the step is taken all the same.
        let own = shared.position().failure.take();
        let stopped = matches!(own, Some(Failure::Stopped)) || shared.interrupter.should_stop();
        let synced = shared.settings.backend_sync;
        let offer = Offer {
            grads: grads.as_ref().filter(|_| !synced),
            loss,
            stopped,
            failure: own.filter(|f| !matches!(f, Failure::Stopped)),
            time_due,
            status_only: synced,
        };
        let started = std::time::Instant::now();
        let peer = self.peer()?;
        let outcome = exchange_step(
            peer,
            &self.group,
            self.rank,
            model,
            offer,
            &shared.stop,
            &format!("step {step}"),
        );
        shared.position().collective_seconds += started.elapsed().as_secs_f64();
        let (summed, all) = outcome?;
        let summed = match synced {
            true => grads.unwrap_or_default(),
            false => summed,
        };
        Ok((summed, all.loss, all.save_due > 0.0))
    }

    /// fsdp: every worker's parameters updated by their owners.
    pub fn gather(&self, shared: &Shared, model: M) -> Result<M, Failure> {
        let started = std::time::Instant::now();
        let gathered = self
            .peer()?
            .gather_params(model, &|i| self.owns(i))
            .map_err(|e| self.group.explain(&shared.stop, e));
        shared.position().collective_seconds += started.elapsed().as_secs_f64();
        gathered
    }

    /// With `check_replicas`: compares this worker's weights with the group's after
    /// step `step`; a difference is this worker's failure, told at the next exchange.
    pub fn check(&self, shared: &Shared, model: &M, step: u64) {
        let checked = self.peer().and_then(|peer| {
            check_replicas(
                peer,
                &self.group,
                model,
                None,
                &shared.stop,
                &format!("step {step}"),
            )
        });
        match checked {
            Ok((spread, _)) => {
                let mut p = shared.position();
                p.replica_spread = Some(p.replica_spread.unwrap_or(0.0).max(spread));
            }
            Err(failure) => shared.fail(failure),
        }
    }

    /// fsdp checkpoints: rank 0 gets the whole optimizer record, encoded (its own
    /// shard and every other worker's); the others hand theirs over and get `None`.
    pub fn whole_record<BR: Backend, R: burn::record::Record<BR>>(
        &self,
        record: R,
    ) -> Option<Result<Vec<u8>, CoordinatorError>> {
        let (mine, error) = match encode_record::<BR, R>(record) {
            Ok(bytes) => (bytes, None),
            // Handed over all the same (empty), so that rank 0 does not wait for it.
            Err(e) => (Vec::new(), Some(e)),
        };
        let gathered = gather_shards(Some(&*self.group), self.rank, true, self.world, mine);
        if let Some(e) = error {
            return Some(Err(e));
        }
        match gathered {
            Ok(Some((mine, others))) => Some((self.merge)(mine, others, &self.device)),
            Ok(None) => None,
            Err(e) => Some(Err(e)),
        }
    }
}

/// One worker other than rank 0, put together before training.
pub(crate) struct Worker<B, M, St, S>
where
    B: AutodiffBackend,
    M: AutodiffModule<B> + 'static,
    St: Steps<B, M>,
    S: SimpleOptimizer<B::InnerBackend> + 'static,
{
    pub learner: Learner<Components<B, M, St, S>>,
    pub loader: Arc<dyn DataLoader<B, TrainItem<B, M, St>>>,
    pub shared: Arc<Shared>,
    pub member: Arc<Member<B, M>>,
}

/// kiln's data-parallel group as a burn-train training strategy: rank 0 is the
/// learner burn-train launches; the others are handed over ready-made.
pub(crate) struct GroupStrategy<B, M, St, S>
where
    B: AutodiffBackend,
    M: AutodiffModule<B> + 'static,
    St: Steps<B, M>,
    S: SimpleOptimizer<B::InnerBackend> + 'static,
{
    pub first: (Arc<Shared>, Arc<Member<B, M>>),
    pub others: Mutex<Vec<Worker<B, M, St, S>>>,
}

impl<B, M, St, S> SupervisedLearningStrategy<Components<B, M, St, S>> for GroupStrategy<B, M, St, S>
where
    B: AutodiffBackend,
    M: AutodiffModule<B> + 'static,
    St: Steps<B, M>,
    S: SimpleOptimizer<B::InnerBackend> + 'static,
{
    fn fit(
        &self,
        components: TrainingComponents<Components<B, M, St, S>>,
        learner: Learner<Components<B, M, St, S>>,
        dataloader_train: Arc<dyn DataLoader<B, TrainItem<B, M, St>>>,
        dataloader_valid: Arc<dyn DataLoader<B::InnerBackend, ValidItem<B, M, St>>>,
        starting_epoch: usize,
    ) -> (
        Stepper<B, M, St>,
        SupervisedTrainingEventProcessor<Components<B, M, St, S>>,
    ) {
        let mut processor = components.event_processor;
        let others = std::mem::take(&mut *self.others.lock().unwrap_or_else(|p| p.into_inner()));
        let epochs = (starting_epoch, components.num_epochs);
        let (shared, member) = (&self.first.0, &self.first.1);
        let gate = StartGate::new();
        let model = std::thread::scope(|scope| {
            let _undecided = gate.close_if_undecided();
            let workers: Result<Vec<_>, Failure> = others
                .into_iter()
                .map(|w| {
                    let rank = w.member.rank;
                    let name = format!("kiln-worker-{rank}");
                    let handle = spawn_worker(scope, &gate, rank, name, move || {
                        let (shared, member) = (&w.shared, &w.member);
                        let ran = guard::<B, _, _>(&member.group, rank, true, || {
                            run(w.learner, &*w.loader, shared, member, None, epochs);
                        });
                        if let Err(failure) = ran {
                            shared.end_with(Some(failure));
                        }
                    })?;
                    Ok((rank, handle))
                })
                .collect();
            // Should rank 0's loop panic, the run fails and this model is returned.
            let kept = learner.model();
            // A worker that could not start fails the run; those that did return at
            // once.
            gate.decide(workers.is_ok());
            let workers = match workers {
                Ok(workers) => workers,
                Err(failure) => {
                    shared.end_with(Some(failure));
                    return kept;
                }
            };
            let books = Books {
                processor: &mut processor,
                valid: &*dataloader_valid,
            };
            let model = guard::<B, _, _>(&member.group, 0, true, || {
                run(
                    learner,
                    &*dataloader_train,
                    shared,
                    member,
                    Some(books),
                    epochs,
                )
            })
            .unwrap_or_else(|failure| {
                shared.end_with(Some(failure));
                kept
            });
            for (rank, worker) in workers {
                if let Err(panic) = worker.join() {
                    shared.fail(Failure::Error(CoordinatorError::Collective(format!(
                        "worker {rank} failed: {}",
                        crate::run::panic_message(panic.as_ref())
                    ))));
                }
            }
            model
        });
        (model, processor)
    }
}

/// Rank 0's extra duties: burn-train's event processor and validation.
struct Books<'a, B, M, St, S>
where
    B: AutodiffBackend,
    M: AutodiffModule<B> + 'static,
    St: Steps<B, M>,
    S: SimpleOptimizer<B::InnerBackend> + 'static,
{
    processor: &'a mut SupervisedTrainingEventProcessor<Components<B, M, St, S>>,
    valid: &'a dyn DataLoader<B::InnerBackend, ValidItem<B, M, St>>,
}

/// One worker's training: burn-train's step calls, epoch after epoch, until the
/// group ends the run or the epochs are done; then one last exchange, so that a
/// failure after the last step (rank 0's books) ends every worker's run alike.
fn run<B, M, St, S>(
    mut learner: Learner<Components<B, M, St, S>>,
    loader: &dyn DataLoader<B, TrainItem<B, M, St>>,
    shared: &Shared,
    member: &Member<B, M>,
    mut books: Option<Books<'_, B, M, St, S>>,
    (starting_epoch, num_epochs): (usize, usize),
) -> Stepper<B, M, St>
where
    B: AutodiffBackend,
    M: AutodiffModule<B> + 'static,
    St: Steps<B, M>,
    S: SimpleOptimizer<B::InnerBackend> + 'static,
{
    let _worker = tracing::info_span!("worker", rank = member.rank).entered();
    if let Err(failure) = join(&learner, shared, member) {
        shared.end_with(Some(failure));
        return learner.model();
    }
    for epoch in starting_epoch..=num_epochs {
        let mut iterator = loader.iter();
        let mut iteration = 0;
        while let Some(micro) = iterator.next() {
            iteration += 1;
            learner.lr_step();
            let output = learner.train_step(micro);
            learner.optimizer_step(output.grads);
            if let Some(books) = books.as_mut() {
                books
                    .processor
                    .process_train(LearnerEvent::ProcessedItem(TrainingItem::new(
                        output.item,
                        iterator.progress(),
                        Progress::new(epoch, num_epochs),
                        Some(iteration),
                        Some(learner.lr_current()),
                    )));
            }
            if shared.ended() {
                break;
            }
        }
        if let Some(books) = books.as_mut() {
            books.processor.process_train(LearnerEvent::EndEpoch(epoch));
        }
        if shared.ended() {
            break;
        }
        if let Some(books) = books.as_mut() {
            let model = learner.model().valid();
            let mut iterator = books.valid.iter();
            let mut iteration = 0;
            while let Some(batch) = iterator.next() {
                iteration += 1;
                let item = model.step(batch);
                books
                    .processor
                    .process_valid(LearnerEvent::ProcessedItem(TrainingItem::new(
                        item,
                        iterator.progress(),
                        Progress::new(epoch, num_epochs),
                        Some(iteration),
                        None,
                    )));
            }
            books.processor.process_valid(LearnerEvent::EndEpoch(epoch));
        }
    }
    if !shared.ended() {
        let offer = Offer {
            failure: shared.position().failure.take(),
            ..Offer::default()
        };
        let ended = member.peer().and_then(|peer| {
            exchange_step(
                peer,
                &member.group,
                member.rank,
                &learner.model().model,
                offer,
                &shared.stop,
                "the end",
            )
        });
        if let Err(failure) = ended {
            shared.end_with(Some(failure));
        }
    }
    if let Some(peer) = member.peer.get()
        && let Err(e) = peer.finish()
    {
        shared.fail(Failure::Error(e));
    }
    learner.model()
}

/// Joins the group on this worker's thread and checks that every replica starts
/// from the same weights.
fn join<B, M, St, S>(
    learner: &Learner<Components<B, M, St, S>>,
    shared: &Shared,
    member: &Member<B, M>,
) -> Result<(), Failure>
where
    B: AutodiffBackend,
    M: AutodiffModule<B> + 'static,
    St: Steps<B, M>,
    S: SimpleOptimizer<B::InnerBackend> + 'static,
{
    let peer = Peer::<B>::register(
        member.rank,
        member.world,
        member.world,
        &member.device,
        None,
    )
    .map_err(Failure::Error)?;
    let peer = member.peer.get_or_init(|| peer);
    check_replicas(
        peer,
        &member.group,
        &learner.model().model,
        None,
        &shared.stop,
        "the start",
    )?;
    Ok(())
}

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

use std::sync::{Arc, Mutex};

use burn::data::dataloader::{DataLoader, Progress};
use burn::module::AutodiffModule;
use burn::optim::SimpleOptimizer;
use burn::optim::adaptor::OptimizerAdaptor;
use burn::tensor::backend::AutodiffBackend;
use burn::train::{
    EventProcessorTraining, InferenceStep, Learner, LearnerEvent, LearningComponentsMarker,
    SupervisedLearningStrategy, SupervisedTrainingEventProcessor, TrainingComponents, TrainingItem,
};

use super::loader::{Counted, Micro};
use super::member::Member;
use super::shared::{Shared, ShownLr};
use super::stepper::{Stepper, StepperOptim};
use crate::CoordinatorError;
use crate::collective::Peer;
use crate::group::{
    Offer, StartGate, check_replicas, exchange_step, guard, on_own_threads, spawn_worker,
    threads_per_worker,
};
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
        let threads = threads_per_worker(others.len() + 1);
        let model = std::thread::scope(|scope| {
            let _undecided = gate.close_if_undecided();
            let workers: Result<Vec<_>, Failure> = others
                .into_iter()
                .map(|w| {
                    let rank = w.member.rank;
                    let name = format!("kiln-worker-{rank}");
                    let handle = spawn_worker(scope, &gate, rank, name, move || {
                        let (shared, member) = (&w.shared, &w.member);
                        let ran = on_own_threads(rank, threads, || {
                            guard::<B, _, _>(&member.group, rank, true, || {
                                run(w.learner, &*w.loader, shared, member, None, epochs);
                            })
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
            let model = on_own_threads(member.rank, threads, || {
                guard::<B, _, _>(&member.group, 0, true, || {
                    run(
                        learner,
                        &*dataloader_train,
                        shared,
                        member,
                        Some(books),
                        epochs,
                    )
                })
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

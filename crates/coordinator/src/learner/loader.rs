//! kiln's data order as burn-train data loaders.
//!
//! burn-train wants `'static` loaders; a run's data (a kiln `DataModule`, or Burn
//! datasets with a batcher) is borrowed for the call to `train` or `fit`. So the
//! loaders hold no data: they ask a producer thread, which borrows the
//! [`Workload`], for each batch by index, one batch ahead of training.
//! The order is kiln's (a permutation per `(seed, epoch)`), so both engines see the
//! same batches, and a resumed run starts at the micro-batch its checkpoint names.
//! In a group of workers each worker's loader serves its shard of every global
//! batch, exactly as the native loop cuts it.

use std::ops::Range;
use std::panic::AssertUnwindSafe;
use std::sync::mpsc::{Receiver, Sender, SyncSender, sync_channel};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use burn::data::dataloader::{DataLoader, DataLoaderIterator, Progress};
use burn::module::AutodiffModule;
use burn::tensor::backend::AutodiffBackend;

use super::shared::{Event, Shared};
use crate::run::{Failure, epoch_order, epoch_stop, shard};
use crate::workload::{TrainBatch, ValidBatch, Workload};

/// A request for one batch of type `T`, built on a device `D`.
pub(crate) struct Job<D, T> {
    indices: Vec<usize>,
    device: D,
    reply: SyncSender<Result<T, Failure>>,
}

/// A request to the producer: a training batch `T` (autodiff backend) or a
/// validation batch `V` (its inner backend), on a device `D`.
pub(crate) enum Request<D, T, V> {
    Train(Job<D, T>),
    Valid(Job<D, V>),
}

/// The requests of workload `W`'s loaders.
pub(crate) type Requests<B, M, W> =
    Request<burn::tensor::Device<B>, TrainBatch<B, M, W>, ValidBatch<B, M, W>>;

/// Builds the batches asked for until every loader is gone.
pub(crate) fn produce<B, M, W>(work: &W, requests: Receiver<Requests<B, M, W>>)
where
    B: AutodiffBackend,
    M: AutodiffModule<B>,
    W: Workload<B, M>,
{
    fn answer<D, T>(job: Job<D, T>, build: impl FnOnce(&[usize], &D) -> crate::Result<T>) {
        // A panicking data module or batcher ends the run FAILED with its message,
        // as it does in the native loop.
        let built = std::panic::catch_unwind(AssertUnwindSafe(|| build(&job.indices, &job.device)));
        let batch = match built {
            Ok(batch) => batch.map_err(Failure::from),
            Err(panic) => Err(Failure::Panicked(crate::run::panic_message(panic.as_ref()))),
        };
        // The loader may be gone (its epoch was cut short); nothing to do then.
        let _ = job.reply.send(batch);
    }
    for request in requests {
        match request {
            Request::Train(job) => answer(job, |indices, device| work.batch(indices, device)),
            Request::Valid(job) => answer(job, |indices, device| work.valid_batch(indices, device)),
        }
    }
}

/// One micro-batch as the training step gets it.
pub(crate) struct Micro<T> {
    /// This worker's examples; none when it has no share of a short global batch,
    /// or once it failed or was asked to stop (in a group it still takes part in
    /// the step's exchange).
    pub batch: Option<T>,
    /// This worker's share of the global micro-batch (1 on one device).
    pub share: f64,
}

/// One validation batch as the inference step gets it, with its number of
/// examples (a batch's loss weighs by them).
pub(crate) struct Counted<V> {
    pub batch: V,
    pub examples: usize,
}

/// The training loader: one epoch of kiln's order per `iter()`, this worker's
/// shard of it; batches `T` (and the validation loader's `V` through the same
/// producer).
pub(crate) struct TrainLoader<B: AutodiffBackend, T, V> {
    pub requests: Sender<Request<B::Device, T, V>>,
    pub device: B::Device,
    pub shared: Arc<Shared>,
    pub seed: u64,
    pub n_items: usize,
    /// Examples per worker and micro-batch.
    pub batch_size: usize,
    /// This worker's rank and the number of workers.
    pub rank: usize,
    pub world: usize,
    /// Kiln epoch of the next `iter()` and the micro-batch it starts at.
    pub next: Arc<Mutex<(usize, usize)>>,
}

impl<B, T, V> DataLoader<B, Micro<T>> for TrainLoader<B, T, V>
where
    B: AutodiffBackend,
    T: Send + 'static,
    V: Send + 'static,
{
    fn iter<'a>(&'a self) -> Box<dyn DataLoaderIterator<Micro<T>> + 'a> {
        let (epoch, from) = {
            let mut next = self.next.lock().unwrap_or_else(|p| p.into_inner());
            let current = *next;
            *next = (current.0 + 1, 0);
            current
        };
        let settings = &self.shared.settings;
        let stop = {
            let mut p = self.shared.position();
            let (stop, _) = epoch_stop(
                settings.per_epoch,
                settings.accumulate,
                from,
                p.steps,
                settings.total,
            );
            (p.epoch, p.batch) = (epoch, from);
            stop
        };
        self.shared.send(Event::Epoch(epoch));
        let order = epoch_order(self.seed, epoch, self.n_items);
        let batches = (from..stop)
            .map(|b| {
                let (mine, global) = shard(&order, b, self.batch_size, self.rank, self.world);
                (mine.to_vec(), global)
            })
            .collect();
        Box::new(Batches::<B::Device, T, V, T, Micro<T>> {
            requests: self.requests.clone(),
            wrap: Request::Train,
            finish: |batch, share, _| Some(Micro { batch, share }),
            in_group: self.shared.member.is_some(),
            training: true,
            device: self.device.clone(),
            shared: self.shared.clone(),
            batches,
            next: 0,
            ahead: None,
            on_end: None,
        })
    }

    fn num_items(&self) -> usize {
        self.n_items
    }

    fn to_device(&self, device: &B::Device) -> Arc<dyn DataLoader<B, Micro<T>>> {
        Arc::new(Self {
            requests: self.requests.clone(),
            device: device.clone(),
            shared: self.shared.clone(),
            seed: self.seed,
            n_items: self.n_items,
            batch_size: self.batch_size,
            rank: self.rank,
            world: self.world,
            next: self.next.clone(),
        })
    }

    fn slice(&self, _start: usize, _end: usize) -> Arc<dyn DataLoader<B, Micro<T>>> {
        // Only burn-train's own multi-device strategies slice a loader; kiln's
        // group strategy gives each worker its own loader over the global order.
        tracing::warn!("kiln's training loader is not sliced: it keeps the global order");
        self.to_device(&self.device)
    }
}

/// The validation loader: the validation split in order, every epoch.
pub(crate) struct ValidLoader<B: AutodiffBackend, T, V> {
    pub requests: Sender<Request<B::Device, T, V>>,
    pub device: B::Device,
    pub shared: Arc<Shared>,
    pub items: Range<usize>,
    pub batch_size: usize,
    pub limit_batches: Option<usize>,
}

impl<B, T, V> DataLoader<B::InnerBackend, Counted<V>> for ValidLoader<B, T, V>
where
    B: AutodiffBackend,
    T: Send + 'static,
    V: Send + 'static,
{
    fn iter<'a>(&'a self) -> Box<dyn DataLoaderIterator<Counted<V>> + 'a> {
        let all: Vec<usize> = self.items.clone().collect();
        let batches = all
            .chunks(self.batch_size.max(1))
            .take(self.limit_batches.unwrap_or(usize::MAX))
            .map(|chunk| (chunk.to_vec(), chunk.len()))
            .collect();
        Box::new(Batches::<B::Device, T, V, V, Counted<V>> {
            requests: self.requests.clone(),
            wrap: Request::Valid,
            finish: |batch, _, examples| batch.map(|batch| Counted { batch, examples }),
            in_group: false,
            training: false,
            device: self.device.clone(),
            shared: self.shared.clone(),
            batches,
            next: 0,
            ahead: None,
            on_end: Some(Instant::now()),
        })
    }

    fn num_items(&self) -> usize {
        self.items.len()
    }

    fn to_device(&self, device: &B::Device) -> Arc<dyn DataLoader<B::InnerBackend, Counted<V>>> {
        Arc::new(Self {
            requests: self.requests.clone(),
            device: device.clone(),
            shared: self.shared.clone(),
            items: self.items.clone(),
            batch_size: self.batch_size,
            limit_batches: self.limit_batches,
        })
    }

    fn slice(&self, start: usize, end: usize) -> Arc<dyn DataLoader<B::InnerBackend, Counted<V>>> {
        let len = self.items.len();
        let (start, end) = (start.min(len), end.min(len));
        Arc::new(Self {
            requests: self.requests.clone(),
            device: self.device.clone(),
            shared: self.shared.clone(),
            items: self.items.start + start..self.items.start + end.max(start),
            batch_size: self.batch_size,
            limit_batches: self.limit_batches,
        })
    }
}

/// The batches `X` of one pass (`T`s for training, `V`s for validation), asked of
/// the producer one ahead, yielded as `O`s.
struct Batches<D, T, V, X, O> {
    requests: Sender<Request<D, T, V>>,
    wrap: fn(Job<D, X>) -> Request<D, T, V>,
    /// What the iterator yields for a batch (or for none), given this worker's
    /// share and its number of examples.
    finish: fn(Option<X>, f64, usize) -> Option<O>,
    /// A group's training pass: a worker that failed, was asked to stop or has no
    /// share goes on yielding empty micro-batches until the group ends the run,
    /// so that it meets the others at every exchange.
    in_group: bool,
    /// A training pass (it counts the examples trained on).
    training: bool,
    device: D,
    shared: Arc<Shared>,
    /// This worker's examples of each micro-batch, and the global micro-batch's size.
    batches: Vec<(Vec<usize>, usize)>,
    next: usize,
    ahead: Option<Receiver<Result<X, Failure>>>,
    /// For a validation pass: when it started; its end is reported once.
    on_end: Option<Instant>,
}

impl<D: Clone, T, V, X, O> Batches<D, T, V, X, O> {
    fn ask(&self, i: usize) -> Option<Receiver<Result<X, Failure>>> {
        let indices = self.batches.get(i)?.0.clone();
        if indices.is_empty() {
            return None;
        }
        let (reply, answer) = sync_channel(1);
        let job = Job {
            indices,
            device: self.device.clone(),
            reply,
        };
        self.requests.send((self.wrap)(job)).ok()?;
        Some(answer)
    }

    fn end(&mut self) -> Option<O> {
        if let Some(started) = self.on_end.take() {
            let epoch = {
                let mut p = self.shared.position();
                p.validation_seconds += started.elapsed().as_secs_f64();
                p.epoch
            };
            if !self.shared.failed() {
                self.shared.send(Event::ValidEnd(epoch));
            }
        }
        None
    }

    /// After a failure or a stop: an empty micro-batch in a group, the end of the
    /// pass otherwise.
    fn nothing(&mut self) -> Option<O> {
        match self.in_group {
            true => (self.finish)(None, 0.0, 0),
            false => self.end(),
        }
    }
}

impl<D: Clone, T, V, X, O> Iterator for Batches<D, T, V, X, O> {
    type Item = O;

    fn next(&mut self) -> Option<O> {
        if self.shared.ended() || self.next >= self.batches.len() {
            return self.end();
        }
        let i = self.next;
        let (mine, global) = (self.batches[i].0.len(), self.batches[i].1);
        if self.shared.failed() {
            self.next += 1;
            self.ahead = None;
            return self.nothing();
        }
        if mine == 0 {
            // A short last global batch: this worker sends zero gradients.
            self.next += 1;
            self.shared.position().samples += global as u64;
            return (self.finish)(None, 0.0, 0);
        }
        let answer = match self.ahead.take().or_else(|| self.ask(i)) {
            Some(answer) => answer,
            None => {
                self.shared.fail(Failure::Panicked(
                    "the data producer thread ended (a data module or batcher panicked)".into(),
                ));
                return self.nothing();
            }
        };
        let received = answer.recv();
        self.next += 1;
        // Checked once the batch is here (and before the next one is asked for), like
        // the native loop: a stop asked while it was built ends the run before it is
        // trained on.
        if self.shared.stop.is_stopped() {
            self.shared.fail(Failure::Stopped);
            return self.nothing();
        }
        self.ahead = self.ask(self.next);
        match received {
            Ok(Ok(batch)) => {
                if self.training {
                    self.shared.position().samples += global as u64;
                }
                (self.finish)(Some(batch), mine as f64 / global as f64, mine)
            }
            Ok(Err(failure)) => {
                self.shared.fail(failure);
                self.nothing()
            }
            Err(_) => {
                self.shared.fail(Failure::Panicked(
                    "the data producer thread ended (a data module or batcher panicked)".into(),
                ));
                self.nothing()
            }
        }
    }
}

impl<D: Clone, T, V, X, O> DataLoaderIterator<O> for Batches<D, T, V, X, O> {
    fn progress(&self) -> Progress {
        Progress::new(self.next, self.batches.len())
    }
}

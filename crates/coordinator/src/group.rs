//! What the workers of a data-parallel group share, whichever engine runs them:
//! the group's first failure, fsdp's optimizer shards, the exchange of one step
//! and the rules that make every worker take the same decision from it.

use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use burn::module::AutodiffModule;
use burn::optim::GradientsParams;
use burn::tensor::backend::AutodiffBackend;

use crate::collective::{Peer, Status};
use crate::run::Failure;
use crate::{CoordinatorError, StopHandle};

/// What the workers of a group share in this process: the first failure (so every
/// worker reports the one that started it), and, for fsdp, the optimizer shards `S`
/// handed to rank 0 when it writes a checkpoint.
pub(crate) struct Group<S> {
    failure: Mutex<Option<(usize, String)>>,
    shards: Mutex<Vec<S>>,
    shards_ready: Condvar,
    /// What else a worker that leaves on a panic releases (the backend's gradient
    /// synchronisation, which the others may wait in).
    on_leave: Mutex<Option<Box<dyn FnOnce() + Send>>>,
}

impl<S> Group<S> {
    /// A group with no failure and no shard yet.
    pub fn new() -> Self {
        Self {
            failure: Mutex::new(None),
            shards: Mutex::new(Vec::new()),
            shards_ready: Condvar::new(),
            on_leave: Mutex::new(None),
        }
    }

    /// Runs `release` when a worker leaves the group on a panic ([`guard`]), or
    /// drops it with the group.
    #[cfg_attr(not(feature = "learner"), allow(dead_code))]
    pub fn on_leave(&self, release: impl FnOnce() + Send + 'static) {
        *self.on_leave.lock().unwrap_or_else(|p| p.into_inner()) = Some(Box::new(release));
    }

    /// Records `failure` as worker `rank`'s, unless a worker's failure came first;
    /// rank 0 stops waiting for shards ([`collect`](Self::collect)).
    pub fn note_failure(&self, rank: usize, failure: &Failure) {
        let mut first = self.failure.lock().unwrap_or_else(|p| p.into_inner());
        if first.is_none() {
            *first = Some((rank, failure_text(failure)));
        }
        drop(first);
        let _shards = self.shards.lock().unwrap_or_else(|p| p.into_inner());
        self.shards_ready.notify_all();
    }

    /// The failure another worker reported, as this worker's error.
    pub fn failure_elsewhere(&self) -> Failure {
        let first = self.failure.lock().unwrap_or_else(|p| p.into_inner());
        match first.as_ref() {
            Some((rank, text)) => Failure::Error(CoordinatorError::Collective(format!(
                "worker {rank} failed: {text}"
            ))),
            None => Failure::Error(CoordinatorError::Collective("another worker failed".into())),
        }
    }

    /// Why an exchange failed, as this worker reports it: the failure a worker
    /// noted first when there is one (a worker that panicked outside its steps
    /// releases the others from the exchange it will never join, [`guard`]), else
    /// the exchange's own error.
    pub fn explain(&self, stop: &StopHandle, e: CoordinatorError) -> Failure {
        let noted = self
            .failure
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some();
        match noted {
            true => self.failure_elsewhere(),
            false => exchange_failure(stop, e),
        }
    }

    /// Hands a worker's optimizer shard to rank 0.
    pub fn deposit(&self, shard: S) {
        self.shards
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(shard);
        self.shards_ready.notify_all();
    }

    /// Rank 0: waits for the `n` other workers' shards, at most `limit`, and not
    /// past a worker's failure: either ends the wait with an error naming it.
    pub fn collect(&self, n: usize, limit: Duration) -> Result<Vec<S>, CoordinatorError> {
        let deadline = Instant::now() + limit;
        let mut shards = self.shards.lock().unwrap_or_else(|p| p.into_inner());
        while shards.len() < n {
            if let Some((rank, text)) = &*self.failure.lock().unwrap_or_else(|p| p.into_inner()) {
                return Err(CoordinatorError::Collective(format!(
                    "worker {rank} failed before handing over its optimizer shard: {text}"
                )));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(CoordinatorError::Collective(format!(
                    "{} of {n} optimizer shards arrived within {limit:?} for a checkpoint",
                    shards.len()
                )));
            }
            shards = self
                .shards_ready
                .wait_timeout(shards, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        Ok(std::mem::take(&mut *shards))
    }
}

/// Runs one worker's training (`body`). A panic that escapes it (outside the steps,
/// which catch their own: in a run tracker, an optimizer step, a renderer) is
/// noted as this worker's failure, and the workers of this process waiting for it
/// in an exchange are released (`in_process`; across nodes the exchange's timeout
/// ends the others), so that they end with its message instead of waiting forever.
pub(crate) fn guard<B: AutodiffBackend, S, T>(
    group: &Group<S>,
    rank: usize,
    in_process: bool,
    body: impl FnOnce() -> T,
) -> Result<T, Failure> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(body)).map_err(|panic| {
        let failure = Failure::Panicked(crate::run::panic_message(panic.as_ref()));
        group.note_failure(rank, &failure);
        if in_process {
            crate::collective::release_local_exchanges::<B::InnerBackend>();
        }
        let release = group
            .on_leave
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(release) = release {
            let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(release));
        }
        failure
    })
}

/// Whether the workers of a group, once all started, may begin: none of them takes
/// part in an exchange before every thread is running, so a thread the system refuses
/// leaves no worker waiting for it ([`spawn_worker`]).
pub(crate) struct StartGate {
    open: Mutex<Option<bool>>,
    decided: Condvar,
}

impl StartGate {
    /// A gate not yet decided.
    pub fn new() -> Self {
        Self {
            open: Mutex::new(None),
            decided: Condvar::new(),
        }
    }

    /// Lets the workers begin (`go`) or return at once. The first decision stands.
    pub fn decide(&self, go: bool) {
        self.open
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_or_insert(go);
        self.decided.notify_all();
    }

    /// Closes the gate when dropped undecided: should the thread that starts the
    /// workers panic before deciding, the workers it started return instead of
    /// waiting, and the scope that joins them ends.
    pub fn close_if_undecided(&self) -> impl Drop + '_ {
        struct Close<'a>(&'a StartGate);
        impl Drop for Close<'_> {
            fn drop(&mut self) {
                self.0.decide(false);
            }
        }
        Close(self)
    }

    /// Waits for [`decide`](Self::decide), which the thread that starts the workers
    /// calls right after the last one, whether it started or not.
    fn wait(&self) -> bool {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            match *open {
                Some(go) => return go,
                None => open = self.decided.wait(open).unwrap_or_else(|p| p.into_inner()),
            }
        }
    }
}

/// How many threads each of the `local` workers of one process computes on: the
/// process's rayon pool (one thread per core by default) split evenly, at least one
/// each. On 2 cores, two workers get one thread each, as PyTorch's DDP runs one
/// single-threaded process per core.
pub(crate) fn threads_per_worker(local: usize) -> usize {
    (rayon::current_num_threads() / local.max(1)).max(1)
}

/// Runs worker `rank`'s `body` with its kernels on a rayon pool of its own of
/// `threads` threads, so that the workers of one process do not take turns on the
/// same threads (and each keeps its data in its own core's caches). Results do not
/// change: kiln's kernels split their work by size, never by thread count. A lone
/// worker (`threads` as many as the calling thread's pool has) keeps that pool.
/// Should the system refuse the threads, `body` runs on the calling thread's pool,
/// with a warning.
pub(crate) fn on_own_threads<T: Send>(
    rank: usize,
    threads: usize,
    body: impl FnOnce() -> T + Send,
) -> T {
    if threads >= rayon::current_num_threads() {
        return body();
    }
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .thread_name(move |i| format!("kiln-worker-{rank}-cpu{i}"))
        .build();
    match pool {
        Ok(pool) => pool.install(body),
        Err(e) => {
            tracing::warn!(
                "worker {rank} computes on the process's shared threads: a pool of \
                 {threads} of its own was refused ({e})"
            );
            body()
        }
    }
}

/// Starts worker `rank`'s thread (named `name`) in `scope`; it runs `body` once
/// `gate` opens, and returns `None` without running it if the gate closes. When the
/// system refuses the thread, the error names the worker and the system's reason:
/// the caller closes the gate and fails the run with it.
pub(crate) fn spawn_worker<'scope, T: Send + 'scope>(
    scope: &'scope std::thread::Scope<'scope, '_>,
    gate: &'scope StartGate,
    rank: usize,
    name: String,
    body: impl FnOnce() -> T + Send + 'scope,
) -> Result<std::thread::ScopedJoinHandle<'scope, Option<T>>, Failure> {
    let refused = |e: std::io::Error| {
        Failure::Error(CoordinatorError::Collective(format!(
            "cannot start the thread of worker {rank}: {e}"
        )))
    };
    #[cfg(test)]
    if tests::refused(rank) {
        return Err(refused(std::io::Error::other("refused by the test")));
    }
    std::thread::Builder::new()
        .name(name)
        .spawn_scoped(scope, move || gate.wait().then(body))
        .map_err(refused)
}

pub(crate) fn failure_text(failure: &Failure) -> String {
    match failure {
        Failure::Diverged(reason) | Failure::Panicked(reason) => reason.clone(),
        Failure::Error(e) => e.to_string(),
        Failure::Stopped => "stopped".into(),
    }
}

/// Compares this worker's weights with the group's mean (an exchange: every worker
/// calls it at the same point). Returns the largest difference and rank 0's run
/// id (given by rank 0 as `run`); replicas that differ beyond float rounding are
/// an error naming `at` ("start", "step 12").
pub(crate) fn check_replicas<B: AutodiffBackend, M: AutodiffModule<B>, S>(
    peer: &Peer<B>,
    group: &Group<S>,
    model: &M,
    run: Option<i64>,
    stop: &StopHandle,
    at: &str,
) -> Result<(f64, Option<i64>), Failure> {
    let (spread, scale, run) = peer
        .replica_spread(model, run)
        .map_err(|e| group.explain(stop, e))?;
    // A float sum over the group is not exact, hence the tolerance (replicas that
    // really differ, e.g. initialised independently, differ at the weights' scale).
    if spread > 1e-6 * scale.max(1e-6) {
        return Err(Failure::Error(CoordinatorError::Collective(format!(
            "the replicas differ at {at} (largest difference {spread:e}): every worker \
             must hold the same weights"
        ))));
    }
    Ok((spread, run))
}

/// Whether worker `rank` of `world` owns the parameter at `index` (visiting order):
/// every worker under ddp, round-robin under fsdp (`sharded`).
pub(crate) fn owns(sharded: bool, rank: usize, world: usize, index: usize) -> bool {
    !sharded || index % world == rank
}

/// Waits until no other group trains in this process: burn-collective 0.21 keeps
/// one local server per backend type in a process (memo §4.1).
pub(crate) fn one_at_a_time() -> MutexGuard<'static, ()> {
    static ONE_GROUP: Mutex<()> = Mutex::new(());
    ONE_GROUP.lock().unwrap_or_else(|p| p.into_inner())
}

/// What a worker brings to the exchange of a step.
#[derive(Default)]
pub(crate) struct Offer<'a> {
    /// This worker's gradients (none: zeros, e.g. no share of a short batch).
    pub grads: Option<&'a GradientsParams>,
    /// This worker's share-weighted loss (summed over the group: the step's loss).
    pub loss: f64,
    /// This worker was asked to stop.
    pub stopped: bool,
    /// This worker's failure, in the step or since the last exchange.
    pub failure: Option<Failure>,
    /// A time-based checkpoint is due by this worker's clock (rank 0's decides).
    pub time_due: bool,
    /// Exchange the status numbers only: the backend summed the gradients during
    /// backward (`process_group_backend = nccl`); no gradients come back.
    pub status_only: bool,
}

/// Sums one step over the group. Every worker gets the same sums, so every
/// worker takes the same decision: when any failed, each ends with its own
/// failure or the first one's ("worker 1 failed: ..."); when any was asked to
/// stop, all stop after this step's exchange.
pub(crate) fn exchange_step<B: AutodiffBackend, M: AutodiffModule<B>, S>(
    peer: &Peer<B>,
    group: &Group<S>,
    rank: usize,
    model: &M,
    offer: Offer<'_>,
    stop: &StopHandle,
    at: &str,
) -> Result<(GradientsParams, Status), Failure> {
    if let Some(failure) = &offer.failure {
        group.note_failure(rank, failure);
    }
    let status = Status {
        loss: offer.loss,
        stop: f64::from(u8::from(offer.stopped)),
        failed: f64::from(u8::from(offer.failure.is_some())),
        save_due: f64::from(u8::from(offer.time_due)),
        ..Status::default()
    };
    let (summed, all) = match offer.status_only {
        true => peer
            .sum_status(status, at)
            .map(|all| (GradientsParams::new(), all)),
        false => peer.sum_step(model, offer.grads, status, at),
    }
    .map_err(|e| group.explain(stop, e))?;
    if all.failed > 0.0 {
        return Err(offer.failure.unwrap_or_else(|| group.failure_elsewhere()));
    }
    if all.stop > 0.0 {
        return Err(Failure::Stopped);
    }
    Ok((summed, all))
}

/// An exchange that fails after this worker was asked to stop ends the run as
/// stopped (node 0's orchestrator may have stopped on the same signal).
pub(crate) fn exchange_failure(stop: &StopHandle, e: CoordinatorError) -> Failure {
    match stop.is_stopped() {
        true => Failure::Stopped,
        false => Failure::Error(e),
    }
}

/// The optimizer shards a checkpoint gathers: on rank 0, its own and every other
/// worker's under fsdp (they hand theirs over here and get `None`, as does any
/// rank but 0 under ddp, where rank 0's record is whole).
pub(crate) fn gather_shards<S>(
    group: Option<&Group<S>>,
    rank: usize,
    sharded: bool,
    world: usize,
    mine: S,
) -> Result<Option<(S, Vec<S>)>, CoordinatorError> {
    Ok(match (rank, sharded, group) {
        (0, true, Some(group)) => Some((mine, group.collect(world - 1, SHARD_WAIT)?)),
        (_, true, Some(group)) => {
            group.deposit(mine);
            None
        }
        (0, ..) => Some((mine, Vec::new())),
        _ => None,
    })
}

/// How long rank 0 waits for the other workers' optimizer shards (they hand them
/// over in the same step, right after its exchange) before the checkpoint fails.
const SHARD_WAIT: Duration = Duration::from_secs(300);

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// The rank whose worker thread the next group start is refused (a test's
    /// fault), `usize::MAX` for none.
    pub static REFUSE_THREAD_OF: AtomicUsize = AtomicUsize::new(usize::MAX);

    /// The workers of one process split its pool: each of two workers on a pool of
    /// `n` threads computes on `n / 2` of its own (one on 2 cores), in that pool, and
    /// a lone worker keeps the whole pool.
    #[test]
    fn each_worker_computes_on_its_own_share_of_the_threads() {
        let all = rayon::current_num_threads();
        assert_eq!(threads_per_worker(1), all);
        assert_eq!(threads_per_worker(all * 2), 1, "at least one thread each");
        let share = threads_per_worker(2);
        assert_eq!(share, (all / 2).max(1));
        let (threads, name) = on_own_threads(1, share, || {
            (
                rayon::current_num_threads(),
                std::thread::current().name().map(String::from),
            )
        });
        assert_eq!(threads, share);
        if share < all {
            assert_eq!(
                name.as_deref(),
                Some("kiln-worker-1-cpu0"),
                "ran on its own pool"
            );
        }
        assert_eq!(on_own_threads(0, all, rayon::current_num_threads), all);
    }

    /// Whether this start of worker `rank`'s thread is to be refused (once).
    pub fn refused(rank: usize) -> bool {
        REFUSE_THREAD_OF
            .compare_exchange(rank, usize::MAX, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok()
    }

    /// Rank 0's wait for fsdp shards is bounded: by a worker's failure, at once,
    /// and by the time limit; shards that arrive are taken.
    #[test]
    fn the_wait_for_shards_ends() {
        let group = Group::<u8>::new();
        group.deposit(1);
        assert_eq!(group.collect(1, Duration::from_secs(5)).unwrap(), [1]);

        let err = group.collect(1, Duration::from_millis(20)).unwrap_err();
        assert!(
            err.to_string().contains("0 of 1 optimizer shards arrived"),
            "{err}"
        );

        let waiting = std::thread::scope(|scope| {
            let rank0 = scope.spawn(|| group.collect(1, Duration::from_secs(600)));
            group.note_failure(1, &Failure::Panicked("boom".into()));
            rank0.join().unwrap()
        });
        let err = waiting.unwrap_err().to_string();
        assert!(
            err.contains("worker 1 failed") && err.contains("boom"),
            "{err}"
        );
    }

    /// A worker thread the system refuses ends the run with an error naming the
    /// worker, on either engine: the workers already started return without ever
    /// waiting for it in an exchange.
    #[rstest::rstest]
    #[case::native("native")]
    #[case::learner("auto")]
    fn a_worker_thread_the_system_refuses_fails_the_run(#[case] engine: &'static str) {
        use burn::backend::Autodiff;
        use kiln_backend_cpu::Flex;
        use kiln_core::{ProgressMode, TaskSpec};
        use kiln_models::{MlpConfig, TabularDataModule};
        type B = Autodiff<Flex>;

        // The refusal is global: one case at a time.
        static ONE_CASE: Mutex<()> = Mutex::new(());
        let _one_case = ONE_CASE.lock().unwrap_or_else(|p| p.into_inner());
        let (ended, end) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let dir = tempfile::tempdir().unwrap();
            let task = TaskSpec::reg_tiny();
            let model = MlpConfig::for_task(&task.kind, 16)
                .unwrap()
                .init::<B>(1, &Default::default())
                .unwrap();
            let data = TabularDataModule::linear(1, 16, 256, 64, 1);
            let coordinator = crate::TrainingCoordinator::builder()
                .progress(ProgressMode::Off)
                .default_root_dir(dir.path())
                .engine(engine)
                .strategy("ddp")
                .devices("3")
                .batch_size(16)
                .build()
                .unwrap();
            REFUSE_THREAD_OF.store(2, Ordering::SeqCst);
            let result = coordinator.train::<B, _, _>(model, &data, &task, None, 1);
            let _ = ended.send(result.map(|_| ()).map_err(|e| e.to_string()));
        });
        let result = end
            .recv_timeout(Duration::from_secs(300))
            .expect("the run ends instead of waiting for the worker that never started");
        let err = result.expect_err("the run fails");
        assert!(err.contains("cannot start the thread of worker 2"), "{err}");
    }
}

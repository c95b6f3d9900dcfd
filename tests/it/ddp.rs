//! Data-parallel training on CPU worker threads: DDP and fsdp give what one device
//! gives with the same global batch, stop together, fail together, resume exactly —
//! on both engines (burn-train's Learner through kiln's group strategy, and kiln's
//! native loop).

use std::path::Path;

use burn::backend::Autodiff;
use kiln_backend_cpu::Flex;
use kiln_coordinator::{CoordinatorBuilder, CoordinatorError, StopHandle};
use kiln_core::{
    DataModule, ProcessGroupBackend, RunStatus, Split, Strategy, TaskSpec, TrainReport,
};
use kiln_experiment_db::{EndStatus, ExperimentDb, MetricPoint, NewRun, RunId, RunTracker};
use kiln_models::{TextDataModule, TinyGpt};
use kiln_tests::{Hooked, corpus_data, loss_bits, param_values, quiet, small_gpt};
use rstest::rstest;

type B = Autodiff<Flex>;

fn model(vocab: usize) -> TinyGpt<B> {
    small_gpt(vocab, 32)
        .init::<B>(9, &Default::default())
        .unwrap()
}

fn builder(root: &Path, strategy: &str, devices: &str, batch_size: usize) -> CoordinatorBuilder {
    quiet(root)
        .run_name("r")
        .engine("auto")
        .strategy(strategy)
        .devices(devices)
        .seed(9)
        .batch_size(batch_size)
        .learning_rate(2e-3)
        .gradient_clip_val(1.0)
        .max_steps(20)
}

fn train(b: CoordinatorBuilder, data: &TextDataModule, task: &TaskSpec) -> (TrainReport, Vec<u32>) {
    let trained = b
        .build()
        .unwrap()
        .train::<B, _, _>(model(data.vocab_size()), data, task, None, 5)
        .unwrap();
    (trained.report, param_values(&trained.model))
}

/// `a` and `b` agree within `tol`, relative for values above 1 and absolute below
/// (weights near zero move by Adam-normalised steps: rounding differences in their
/// tiny gradients show at that scale, not relative to the weight).
fn close(what: &str, a: &[f32], b: &[f32], tol: f32) {
    assert_eq!(a.len(), b.len(), "{what}: lengths");
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        assert!(
            (x - y).abs() <= tol * y.abs().max(1.0),
            "{what} {i}: {x} vs {y}"
        );
    }
}

fn floats(bits: &[u32]) -> Vec<f32> {
    bits.iter().map(|b| f32::from_bits(*b)).collect()
}

/// The data-parallel issue's equivalence: 2 workers × batch b against one device
/// with batch 2b, 20 steps; and fsdp against ddp; on each engine. The corpus size
/// leaves a short last global batch that only one worker gets a part of.
#[rstest]
fn two_workers_give_what_one_device_gives_with_the_same_global_batch(
    #[values("learner", "native")] engine: &str,
) {
    let (data, task) = corpus_data(21_000, 32);
    let single_dir = tempfile::tempdir().unwrap();
    let (single, single_w) = train(builder(single_dir.path(), "vanilla", "1", 16), &data, &task);
    let ddp_dir = tempfile::tempdir().unwrap();
    // Every worker's weights are compared after every step.
    let (ddp, ddp_w) = train(
        builder(ddp_dir.path(), "ddp", "2", 8)
            .engine(engine)
            .check_replicas(true),
        &data,
        &task,
    );
    let fsdp_dir = tempfile::tempdir().unwrap();
    let (fsdp, fsdp_w) = train(
        builder(fsdp_dir.path(), "fsdp", "2", 8)
            .engine(engine)
            .check_replicas(true),
        &data,
        &task,
    );
    // Identical replicas after each of the 20 steps: the same summed gradients
    // (ddp) or the same gathered parameters (fsdp), bit for bit.
    assert_eq!(ddp.replica_spread, Some(0.0), "{ddp:?}");
    assert_eq!(fsdp.replica_spread, Some(0.0), "{fsdp:?}");
    assert_eq!(single.replica_spread, None);

    assert_eq!(ddp.plan.strategy, Strategy::Ddp);
    assert_eq!(fsdp.plan.strategy, Strategy::Fsdp);
    assert_eq!(ddp.plan.engine.to_string(), engine);
    assert_eq!(fsdp.plan.engine.to_string(), engine);
    assert_eq!((ddp.plan.world_size, fsdp.plan.world_size), (2, 2));
    // The CPU build synchronises through burn-collective; one device has no group.
    for r in [&ddp, &fsdp] {
        assert_eq!(
            r.plan.process_group_backend,
            Some(ProcessGroupBackend::Collective)
        );
    }
    assert_eq!(single.plan.process_group_backend, None);
    assert_eq!(single.optimizer_steps, 20);
    assert_eq!(ddp.optimizer_steps, 20);
    assert_eq!(fsdp.optimizer_steps, 20);
    close(
        "ddp vs single, step loss",
        &ddp.step_losses,
        &single.step_losses,
        1e-4,
    );
    close(
        "ddp vs single, weight",
        &floats(&ddp_w),
        &floats(&single_w),
        1e-4,
    );
    close(
        "fsdp vs ddp, step loss",
        &fsdp.step_losses,
        &ddp.step_losses,
        1e-4,
    );
    close(
        "fsdp vs ddp, weight",
        &floats(&fsdp_w),
        &floats(&ddp_w),
        1e-4,
    );
    let (a, b) = (
        ddp.final_metrics["valid/loss"],
        single.final_metrics["valid/loss"],
    );
    assert!((a - b).abs() <= 1e-4 * b, "valid loss {a} vs {b}");
    assert!(
        fsdp.optimizer_state_bytes < ddp.optimizer_state_bytes,
        "{fsdp:?}"
    );
}

/// The two engines run a group alike: the same steps with gradient accumulation
/// (including an epoch's last, short group), clipping and a short last global batch.
#[test]
fn both_engines_take_the_same_group_steps_with_accumulation() {
    let (data, task) = corpus_data(9_000, 32);
    // 2 workers × 6 examples: a short last global batch, and an epoch whose
    // micro-batches do not fill its last accumulation group of 3.
    let n = data.len(Split::Train);
    assert!(
        n % 12 != 0 && n.div_ceil(12) % 3 != 0,
        "{n} training examples"
    );
    let run = |engine: &str, strategy: &str| {
        let dir = tempfile::tempdir().unwrap();
        train(
            builder(dir.path(), strategy, "2", 6)
                .engine(engine)
                .accumulate_grad_batches(3)
                .max_steps(1_000),
            &data,
            &task,
        )
    };
    for strategy in ["ddp", "fsdp"] {
        let (native, native_w) = run("native", strategy);
        let (learner, learner_w) = run("learner", strategy);
        assert_eq!(learner.optimizer_steps, native.optimizer_steps);
        assert!(
            native.epochs >= 1 && native.optimizer_steps > 5,
            "{native:?}"
        );
        close(
            &format!("{strategy}: learner vs native, step loss"),
            &learner.step_losses,
            &native.step_losses,
            1e-5,
        );
        close(
            &format!("{strategy}: learner vs native, weight"),
            &floats(&learner_w),
            &floats(&native_w),
            1e-5,
        );
    }
}

/// Uneven data never deadlocks: whole epochs with a short last global batch.
#[rstest]
#[timeout(std::time::Duration::from_secs(600))]
fn uneven_epochs_end_together(#[values("learner", "native")] engine: &str) {
    let (data, task) = corpus_data(6_000, 32);
    let dir = tempfile::tempdir().unwrap();
    let b = quiet(dir.path())
        .engine(engine)
        .strategy("ddp")
        .devices("3")
        .batch_size(7)
        .learning_rate(1e-3);
    let trained = b
        .build()
        .unwrap()
        .train::<B, _, _>(model(data.vocab_size()), &data, &task, None, 2)
        .unwrap();
    let r = trained.report;
    assert_eq!(r.plan.engine.to_string(), engine);
    let n = data.len(Split::Train);
    assert_eq!(r.optimizer_steps as usize, 2 * n.div_ceil(21));
    assert_eq!(r.epochs, 2);
}

/// Whether this batch is built for a worker other than rank 0: the native loop
/// trains rank k > 0 on a thread named `kiln-worker-k`, the Learner engine builds
/// rank k's batches on `kiln-worker-k-data`; rank 0 is the calling thread or
/// `kiln-worker-0-data`.
fn on_another_worker() -> bool {
    std::thread::current()
        .name()
        .and_then(|name| name.strip_prefix("kiln-worker-"))
        .is_some_and(|rest| !rest.starts_with("0"))
}

/// Stops the run when a worker other than rank 0 asks for its batch number
/// `after + 1`.
fn stop_on_worker(stop: StopHandle, after: usize) -> impl Fn(usize) -> kiln_core::Result<()> {
    let seen = std::sync::atomic::AtomicUsize::new(0);
    move |_| {
        if on_another_worker() && seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst) >= after {
            stop.stop();
        }
        Ok(())
    }
}

#[rstest]
#[timeout(std::time::Duration::from_secs(600))]
fn an_error_on_one_worker_ends_the_run_with_its_message_not_a_hang(
    #[values("learner", "native")] engine: &str,
) {
    let (data, task) = corpus_data(20_000, 32);
    let dir = tempfile::tempdir().unwrap();
    let seen = std::sync::atomic::AtomicUsize::new(0);
    let failing = Hooked::new(&data, |_| {
        if on_another_worker() && seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst) >= 3 {
            return Err(kiln_core::Error::Data(
                "the shard file of worker 1 is unreadable".into(),
            ));
        }
        Ok(())
    });
    let err = builder(dir.path(), "ddp", "2", 8)
        .engine(engine)
        .build()
        .unwrap()
        .train::<B, _, _>(model(data.vocab_size()), &failing, &task, None, 5)
        .unwrap_err();
    let CoordinatorError::RunFailed { reason, report } = err else {
        panic!("expected a failed run, got {err}")
    };
    assert!(
        reason.contains("worker 1 failed") && reason.contains("shard file of worker 1"),
        "{reason}"
    );
    assert!(matches!(report.status, RunStatus::Failed { .. }));
    assert_eq!(report.optimizer_steps, 3);
}

/// The data, except that building a validation batch panics.
struct PanicsInValidation<'a>(&'a TextDataModule);

impl DataModule for PanicsInValidation<'_> {
    fn len(&self, split: Split) -> usize {
        self.0.len(split)
    }
    fn batch<BB: burn::prelude::Backend>(
        &self,
        split: Split,
        idx: &[usize],
        device: &BB::Device,
    ) -> kiln_core::Result<kiln_core::Batch<BB>> {
        if split == Split::Valid {
            panic!("the validation shard is corrupt");
        }
        self.0.batch(split, idx, device)
    }
    fn check_task(&self, task: &TaskSpec) -> kiln_core::Result<()> {
        self.0.check_task(task)
    }
    fn items_per_example(&self) -> usize {
        self.0.items_per_example()
    }
}

/// A panic during rank 0's validation ends the run FAILED with its message: the
/// other workers, waiting at the next exchange, learn of it there.
#[rstest]
#[timeout(std::time::Duration::from_secs(300))]
fn a_panic_in_validation_fails_the_group_not_hangs_it(#[values("learner", "native")] engine: &str) {
    let (data, task) = corpus_data(6_000, 32);
    let dir = tempfile::tempdir().unwrap();
    let err = builder(dir.path(), "ddp", "2", 8)
        .engine(engine)
        .max_steps(1_000)
        .build()
        .unwrap()
        .train::<B, _, _>(
            model(data.vocab_size()),
            &PanicsInValidation(&data),
            &task,
            None,
            3,
        )
        .unwrap_err();
    let CoordinatorError::RunFailed { reason, report } = err else {
        panic!("expected a failed run, got {err}")
    };
    assert!(
        reason.contains("the validation shard is corrupt"),
        "{reason}"
    );
    assert!(matches!(report.status, RunStatus::Failed { .. }));
    // The run ended at the first exchange after epoch 1's validation.
    let per_epoch = data.len(Split::Train).div_ceil(16) as u64;
    assert_eq!(report.optimizer_steps, per_epoch);
}

/// The real store, whose `log_metrics` panics the first time it is given a point
/// of step `at` or later: a user's tracker that panics on rank 0, outside any step.
struct PanicsAtStep {
    inner: ExperimentDb,
    at: u64,
    fired: bool,
}

impl RunTracker for PanicsAtStep {
    fn start_run(&mut self, run: &NewRun) -> kiln_experiment_db::Result<RunId> {
        self.inner.start_run(run)
    }
    fn log_metrics(
        &mut self,
        run: RunId,
        points: &[MetricPoint],
    ) -> kiln_experiment_db::Result<()> {
        if !self.fired && points.iter().any(|p| p.step >= self.at) {
            self.fired = true;
            panic!("the tracker lost its disk at step {}", self.at);
        }
        self.inner.log_metrics(run, points)
    }
    fn finish_run(
        &mut self,
        run: RunId,
        status: EndStatus,
        reason: Option<&str>,
    ) -> kiln_experiment_db::Result<()> {
        self.inner.finish_run(run, status, reason)
    }
}

/// A panic outside every step on rank 0 (here: in the run tracker, while booking
/// step 3) fails the group with its message instead of leaving the other workers
/// waiting at the next exchange.
#[rstest]
#[timeout(std::time::Duration::from_secs(300))]
fn a_panic_outside_the_steps_fails_the_group_not_hangs_it(
    #[values("learner", "native")] engine: &str,
) {
    let (data, task) = corpus_data(6_000, 32);
    let dir = tempfile::tempdir().unwrap();
    let mut tracker = PanicsAtStep {
        inner: ExperimentDb::open(dir.path().join("kiln.sqlite")).unwrap(),
        at: 3,
        fired: false,
    };
    let err = builder(dir.path(), "ddp", "2", 8)
        .engine(engine)
        .log_every_n_steps(1)
        .build()
        .unwrap()
        .train::<B, _, _>(
            model(data.vocab_size()),
            &data,
            &task,
            Some(&mut tracker),
            3,
        )
        .unwrap_err();
    let CoordinatorError::RunFailed { reason, report } = err else {
        panic!("expected a failed run, got {err}")
    };
    assert!(
        reason.contains("the tracker lost its disk at step 3"),
        "{reason}"
    );
    assert!(matches!(report.status, RunStatus::Failed { .. }));
    assert!(
        report.optimizer_steps <= 4,
        "{} steps",
        report.optimizer_steps
    );
    // The store says so too (the tracker's one panic was its last).
    let stored = tracker.inner.run(report.run_id.unwrap()).unwrap();
    assert_eq!(stored.status, kiln_experiment_db::RunStatus::Failed);
}

#[rstest]
#[timeout(std::time::Duration::from_secs(600))]
fn a_stop_seen_by_one_worker_stops_them_all(#[values("learner", "native")] engine: &str) {
    let (data, task) = corpus_data(20_000, 32);
    let dir = tempfile::tempdir().unwrap();
    let coordinator = builder(dir.path(), "fsdp", "2", 8)
        .engine(engine)
        .build()
        .unwrap();
    let stopping = Hooked::new(&data, stop_on_worker(coordinator.stop_handle(), 4));
    let err = coordinator
        .train::<B, _, _>(model(data.vocab_size()), &stopping, &task, None, 5)
        .unwrap_err();
    let CoordinatorError::Stopped { report } = err else {
        panic!("expected a stop, got {err}")
    };
    assert_eq!(report.status, RunStatus::Killed);
    // The native loop builds each batch just before training on it: the stop asked
    // while worker 1 builds its fifth batch ends the run after step 4. The Learner
    // engine's loaders build the next batch during a step, so the stop may reach
    // rank 0's loader one batch earlier; either way every worker stops at the same
    // exchange.
    let steps = report.optimizer_steps;
    match engine {
        "native" => assert_eq!(steps, 4),
        _ => assert!((3..=4).contains(&steps), "{steps} steps"),
    }
}

/// Exact resume with two workers: rank 0 writes (for fsdp, with every worker's
/// optimizer shard), every worker loads; the resumed run ends with the weights of the
/// uninterrupted one, bit for bit.
#[rstest]
fn two_workers_resume_to_the_same_weights_bit_for_bit(
    #[values("ddp", "fsdp")] strategy: &str,
    #[values("learner", "native")] engine: &str,
) {
    let (data, task) = corpus_data(20_000, 32);
    let straight_dir = tempfile::tempdir().unwrap();
    let (straight, straight_w) = train(
        builder(straight_dir.path(), strategy, "2", 8).engine(engine),
        &data,
        &task,
    );

    let dir = tempfile::tempdir().unwrap();
    let first = builder(dir.path(), strategy, "2", 8)
        .engine(engine)
        .checkpoint_every_n_steps(5)
        .build()
        .unwrap();
    let stopping = Hooked::new(&data, stop_on_worker(first.stop_handle(), 7));
    let err = first
        .train::<B, _, _>(model(data.vocab_size()), &stopping, &task, None, 5)
        .unwrap_err();
    assert!(matches!(err, CoordinatorError::Stopped { .. }), "{err}");
    let (resumed, resumed_w) = train(
        builder(dir.path(), strategy, "2", 8)
            .engine(engine)
            .ckpt_path("last"),
        &data,
        &task,
    );
    assert_eq!(loss_bits(&resumed), loss_bits(&straight));
    assert_eq!(resumed_w, straight_w);
}

/// Reduced precisions through the group: gradients and parameters are exchanged in
/// f32 and cast back, the loss scale's decisions are the same on every worker (they
/// hold the same summed gradients), and fsdp's gathered parameters keep their dtype.
#[rstest]
#[case::ddp_f16_mixed("ddp", "16-mixed")]
#[case::fsdp_bf16_true("fsdp", "bf16-true")]
fn reduced_precision_trains_in_a_group(#[case] strategy: &str, #[case] precision: &str) {
    let (data, task) = corpus_data(21_000, 32);
    let dir = tempfile::tempdir().unwrap();
    let (report, _) = train(
        builder(dir.path(), strategy, "2", 8)
            .precision(precision)
            .strict_precision(true)
            .max_steps(10),
        &data,
        &task,
    );
    assert_eq!(report.plan.precision.to_string(), precision);
    assert_eq!(report.plan.world_size, 2);
    assert_eq!(report.optimizer_steps, 10);
    assert!(
        report.step_losses[9] < report.step_losses[0],
        "{:?}",
        report.step_losses
    );
}

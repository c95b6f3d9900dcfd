//! Data-parallel training on CPU worker threads: DDP and fsdp give what one device
//! gives with the same global batch, stop together, fail together, resume exactly.

use std::path::Path;

use burn::backend::Autodiff;
use kiln_backend_cpu::Flex;
use kiln_coordinator::{CoordinatorBuilder, CoordinatorError, StopHandle};
use kiln_core::{DataModule, RunStatus, Split, Strategy, TaskSpec, TrainReport};
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
/// with batch 2b, 20 steps; and fsdp against ddp. The corpus size leaves a short
/// last global batch that only one worker gets a part of.
#[test]
fn two_workers_give_what_one_device_gives_with_the_same_global_batch() {
    let (data, task) = corpus_data(21_000, 32);
    let single_dir = tempfile::tempdir().unwrap();
    let (single, single_w) = train(builder(single_dir.path(), "vanilla", "1", 16), &data, &task);
    let ddp_dir = tempfile::tempdir().unwrap();
    let (ddp, ddp_w) = train(builder(ddp_dir.path(), "ddp", "2", 8), &data, &task);
    let fsdp_dir = tempfile::tempdir().unwrap();
    let (fsdp, fsdp_w) = train(builder(fsdp_dir.path(), "fsdp", "2", 8), &data, &task);

    assert_eq!(ddp.plan.strategy, Strategy::Ddp);
    assert_eq!(fsdp.plan.strategy, Strategy::Fsdp);
    assert_eq!((ddp.plan.world_size, fsdp.plan.world_size), (2, 2));
    assert_eq!(single.optimizer_steps, 20);
    assert_eq!(ddp.optimizer_steps, 20);
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

/// Uneven data never deadlocks: whole epochs with a short last global batch.
#[test]
fn uneven_epochs_end_together() {
    let (data, task) = corpus_data(6_000, 32);
    let dir = tempfile::tempdir().unwrap();
    let b = quiet(dir.path())
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
    let n = data.len(Split::Train);
    assert_eq!(r.optimizer_steps as usize, 2 * n.div_ceil(21));
    assert_eq!(r.epochs, 2);
}

/// Rank 0 trains on the calling (test) thread, the other ranks on unnamed threads:
/// whether this batch is built for a worker other than rank 0.
fn on_another_worker() -> bool {
    std::thread::current().name().is_none()
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

#[test]
fn an_error_on_one_worker_ends_the_run_with_its_message_not_a_hang() {
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

#[test]
fn a_stop_seen_by_one_worker_stops_them_all() {
    let (data, task) = corpus_data(20_000, 32);
    let dir = tempfile::tempdir().unwrap();
    let coordinator = builder(dir.path(), "fsdp", "2", 8).build().unwrap();
    let stopping = Hooked::new(&data, stop_on_worker(coordinator.stop_handle(), 4));
    let err = coordinator
        .train::<B, _, _>(model(data.vocab_size()), &stopping, &task, None, 5)
        .unwrap_err();
    let CoordinatorError::Stopped { report } = err else {
        panic!("expected a stop, got {err}")
    };
    assert_eq!(report.status, RunStatus::Killed);
    assert_eq!(report.optimizer_steps, 4);
}

/// Exact resume with two workers: rank 0 writes (for fsdp, with every worker's
/// optimizer shard), every worker loads; the resumed run ends with the weights of the
/// uninterrupted one, bit for bit.
#[rstest]
#[case::ddp("ddp")]
#[case::fsdp("fsdp")]
fn two_workers_resume_to_the_same_weights_bit_for_bit(#[case] strategy: &str) {
    let (data, task) = corpus_data(20_000, 32);
    let straight_dir = tempfile::tempdir().unwrap();
    let (straight, straight_w) =
        train(builder(straight_dir.path(), strategy, "2", 8), &data, &task);

    let dir = tempfile::tempdir().unwrap();
    let first = builder(dir.path(), strategy, "2", 8)
        .checkpoint_every_n_steps(5)
        .build()
        .unwrap();
    let stopping = Hooked::new(&data, stop_on_worker(first.stop_handle(), 7));
    let err = first
        .train::<B, _, _>(model(data.vocab_size()), &stopping, &task, None, 5)
        .unwrap_err();
    assert!(matches!(err, CoordinatorError::Stopped { .. }), "{err}");
    let (resumed, resumed_w) = train(
        builder(dir.path(), strategy, "2", 8).ckpt_path("last"),
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

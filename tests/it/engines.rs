//! The Learner engine (burn-train) and the native loop take the same steps.

use burn::backend::Autodiff;
use kiln_backend_cpu::Flex;
use kiln_core::{Engine, TrainReport};
use kiln_tests::{corpus_data, loss_bits, param_values, quiet, small_gpt};
use rstest::rstest;

type B = Autodiff<Flex>;

/// Seed card, scenario 4 (backward compatibility): same seed, data order and
/// optimizer settings give the same per-step losses on both engines, within 1e-5
/// relative, for 50 steps; the final weights agree as well. Cases cover kiln's
/// own semantics inside burn-train: gradient accumulation with an epoch's last short
/// group, global-norm clipping and the warm-up + cosine schedule.
#[rstest]
#[case::plain(1, None, None)]
#[case::accumulated_and_clipped(3, Some(0.5), Some(10))]
fn learner_and_native_loop_take_the_same_50_steps(
    #[case] accumulate: u32,
    #[case] clip: Option<f64>,
    #[case] limit_train_batches: Option<usize>,
) {
    let (data, task) = corpus_data(30_000, 32);
    let run = |strategy: &str| {
        let dir = tempfile::tempdir().unwrap();
        let model = small_gpt(data.vocab_size(), 32)
            .init::<B>(5, &Default::default())
            .unwrap();
        let mut builder = quiet(dir.path())
            .strategy(strategy)
            .seed(5)
            .batch_size(8)
            .max_steps(50)
            .learning_rate(2e-3)
            .accumulate_grad_batches(accumulate)
            .checkpoint_every_n_steps(20);
        if let Some(clip) = clip {
            builder = builder.gradient_clip_val(clip);
        }
        if let Some(limit) = limit_train_batches {
            builder = builder.limit_train_batches(limit);
        }
        let trained = builder
            .build()
            .unwrap()
            .train::<B, _, _>(model, &data, &task, None, 100)
            .unwrap();
        (trained.report, param_values(&trained.model))
    };
    let (learner, learner_weights) = run("auto");
    let (native, native_weights) = run("vanilla");
    assert_eq!(learner.plan.engine, Engine::Learner);
    assert_eq!(native.plan.engine, Engine::Native);
    assert_eq!(learner.optimizer_steps, 50);
    assert_eq!(native.optimizer_steps, 50);
    for (step, (a, b)) in learner
        .step_losses
        .iter()
        .zip(&native.step_losses)
        .enumerate()
    {
        assert!(
            (a - b).abs() <= 1e-5 * b.abs(),
            "step {}: learner {a} vs native {b}",
            step + 1
        );
    }
    assert_eq!(learner_weights.len(), native_weights.len());
    for (a, b) in learner_weights.iter().zip(&native_weights) {
        let (a, b) = (f32::from_bits(*a), f32::from_bits(*b));
        assert!(
            (a - b).abs() <= 1e-4 * b.abs().max(1e-3),
            "weights {a} vs {b}"
        );
    }
    same_books(&learner, &native);
}

/// Both engines book the same things: epochs, samples, validation metrics.
fn same_books(learner: &TrainReport, native: &TrainReport) {
    assert_eq!(learner.epochs, native.epochs);
    assert_eq!(
        learner.metrics.keys().collect::<Vec<_>>(),
        native.metrics.keys().collect::<Vec<_>>()
    );
    let (a, b) = (
        learner.final_metrics["valid/loss"],
        native.final_metrics["valid/loss"],
    );
    assert!((a - b).abs() <= 1e-5 * b.abs(), "valid loss {a} vs {b}");
    assert!(learner.throughput.samples_per_s > 0.0);
}

/// A checkpoint written by one engine resumes in the other: the native loop trains 8
/// steps (its last checkpoint mid-epoch), the Learner engine continues to 16, and
/// the result is the straight 16-step run's, bit for bit on Flex.
#[rstest]
#[case::native_then_learner("vanilla", "auto")]
#[case::learner_then_native("auto", "vanilla")]
fn a_checkpoint_of_one_engine_resumes_in_the_other(#[case] first: &str, #[case] then: &str) {
    let (data, task) = corpus_data(20_000, 32);
    let model = || {
        small_gpt(data.vocab_size(), 32)
            .init::<B>(3, &Default::default())
            .unwrap()
    };
    let builder = |root: &std::path::Path, strategy: &str, max_steps: u64| {
        quiet(root)
            .run_name("r")
            .strategy(strategy)
            .seed(3)
            .batch_size(16)
            .learning_rate(1e-3)
            .limit_train_batches(6)
            .max_steps(max_steps)
    };
    let straight_dir = tempfile::tempdir().unwrap();
    let straight = builder(straight_dir.path(), then, 16)
        .build()
        .unwrap()
        .train::<B, _, _>(model(), &data, &task, None, 5)
        .unwrap();

    let dir = tempfile::tempdir().unwrap();
    let part = builder(dir.path(), first, 8)
        .build()
        .unwrap()
        .train::<B, _, _>(model(), &data, &task, None, 5)
        .unwrap();
    assert_eq!(part.report.optimizer_steps, 8);
    let resumed = builder(dir.path(), then, 16)
        .ckpt_path("last")
        .build()
        .unwrap()
        .train::<B, _, _>(model(), &data, &task, None, 5)
        .unwrap();
    assert_eq!(loss_bits(&resumed.report), loss_bits(&straight.report));
    assert_eq!(param_values(&resumed.model), param_values(&straight.model));
}

/// Every precision takes the same steps on both engines: the Learner engine runs
/// kiln's micro-batch passes and optimizer step (`16-mixed`'s loss scale, its
/// unscaling and skipped steps; the true modes' stored dtype) as the native loop
/// does, alone and in a data-parallel group, with accumulation and clipping.
#[rstest]
#[case::bf16_mixed("bf16-mixed", "auto", "1")]
#[case::f16_mixed("16-mixed", "auto", "1")]
#[case::bf16_true("bf16-true", "auto", "1")]
#[case::bf16_mixed_ddp("bf16-mixed", "ddp", "2")]
#[case::f16_mixed_fsdp("16-mixed", "fsdp", "2")]
fn both_engines_take_the_same_steps_in_every_precision(
    #[case] precision: &str,
    #[case] strategy: &str,
    #[case] devices: &str,
) {
    let (data, task) = corpus_data(20_000, 32);
    let run = |engine: &str| {
        let dir = tempfile::tempdir().unwrap();
        let model = small_gpt(data.vocab_size(), 32)
            .init::<B>(5, &Default::default())
            .unwrap();
        quiet(dir.path())
            .strategy(strategy)
            .devices(devices)
            .engine(engine)
            .precision(precision)
            .strict_precision(true)
            .seed(5)
            .batch_size(8)
            .max_steps(20)
            .learning_rate(2e-3)
            .accumulate_grad_batches(2)
            .gradient_clip_val(1.0)
            .log_every_n_steps(5)
            .checkpoint_every_n_steps(10)
            .build()
            .unwrap()
            .train::<B, _, _>(model, &data, &task, None, 100)
            .unwrap()
            .report
    };
    let learner = run("learner");
    let native = run("native");
    assert_eq!(learner.plan.engine, Engine::Learner);
    assert_eq!(native.plan.engine, Engine::Native);
    assert_eq!(learner.plan.precision.to_string(), precision);
    assert_eq!(learner.optimizer_steps, 20);
    assert_eq!(learner.skipped_steps, native.skipped_steps);
    assert_eq!(
        loss_bits(&learner),
        loss_bits(&native),
        "per-step losses differ:\nlearner {:?}\nnative  {:?}",
        learner.step_losses,
        native.step_losses
    );
    same_books(&learner, &native);
    if precision == "16-mixed" {
        assert_eq!(
            learner.final_metrics["train/loss_scale"],
            native.final_metrics["train/loss_scale"]
        );
    }
}

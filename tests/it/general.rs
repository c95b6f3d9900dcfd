//! The general path: Burn models written for burn-train (`TrainStep` /
//! `InferenceStep`, a `Dataset` and a `Batcher`, burn-optim optimizers and
//! schedulers) trained through `TrainingCoordinator::fit`, unchanged.
//!
//! Burn's RNG is one per process on Flex, and the other tests of this binary train
//! (and reseed it) on parallel threads: every test here that draws from it
//! (initialisation, dropout) runs in a process of its own ([`own_process`]).

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use burn::backend::Autodiff;
use burn::data::dataloader::batcher::Batcher;
use burn::data::dataset::{Dataset, InMemDataset};
use burn::lr_scheduler::composed::ComposedLrSchedulerConfig;
use burn::lr_scheduler::cosine::CosineAnnealingLrSchedulerConfig;
use burn::lr_scheduler::linear::LinearLrSchedulerConfig;
use burn::lr_scheduler::noam::NoamLrSchedulerConfig;
use burn::optim::momentum::MomentumConfig;
use burn::optim::{AdaGradConfig, AdamConfig, AdamWConfig, RmsPropConfig, SgdConfig};
use burn::prelude::*;
use kiln_backend_cpu::Flex;
use kiln_coordinator::{CoordinatorError, Datasets, KilnSchedule, StopHandle};
use kiln_core::launch::{NodeFlags, NodeLaunch, NodeSettings, free_master_port};
use kiln_core::{Engine, LrSchedule, RunStatus, Strategy, TrainReport};
use kiln_examples::image_classifier::{
    ImageBatch, ImageBatcher, ImageClassifier, ImageClassifierConfig, ImageItem, SIDE,
    synthetic_images,
};
use kiln_examples::regressor::{
    RegressionBatcher, RegressionItem, Regressor, RegressorConfig, synthetic_regression,
};
use kiln_experiment_db::ExperimentDb;
use kiln_tests::{loss_bits, output_within, own_process, param_values, quiet, test_name};
use rstest::rstest;

type B = Autodiff<Flex>;

/// The CNN, initialised from Burn's RNG seeded with 3.
fn cnn(dropout: f64) -> ImageClassifier<B> {
    let device = Default::default();
    B::seed(&device, 3);
    ImageClassifierConfig::new(4)
        .with_dropout(dropout)
        .init::<B>(&device)
}

fn images<T>(batcher: T) -> Datasets<ImageItem, T> {
    Datasets::new(
        synthetic_images(256, 4, 1),
        synthetic_images(64, 4, 2),
        batcher,
    )
}

fn mean(xs: &[f32]) -> f32 {
    xs.iter().sum::<f32>() / xs.len() as f32
}

/// The CNN of the examples (4-D inputs, dropout, Adam) trains on one device, on
/// two data-parallel workers and with the optimizer state sharded, on both
/// engines, and its loss falls.
#[rstest]
#[case::single_on_the_learner("auto", "1", "auto", Strategy::Single, Engine::Learner)]
#[case::single_native("auto", "1", "native", Strategy::Single, Engine::Native)]
#[case::ddp_on_the_learner("ddp", "2", "learner", Strategy::Ddp, Engine::Learner)]
#[case::ddp_native("ddp", "2", "native", Strategy::Ddp, Engine::Native)]
#[case::fsdp_on_the_learner("fsdp", "2", "auto", Strategy::Fsdp, Engine::Learner)]
fn the_cnn_trains_with_dropout_and_its_loss_falls(
    #[case] strategy: &str,
    #[case] devices: &str,
    #[case] engine: &str,
    #[case] want: Strategy,
    #[case] want_engine: Engine,
) {
    if !own_process() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let trained = quiet(dir.path())
        .strategy(strategy)
        .devices(devices)
        .engine(engine)
        .batch_size(16)
        .build()
        .unwrap()
        .fit(
            cnn(0.25),
            AdamConfig::new().init(),
            3e-3,
            &images(ImageBatcher),
            None,
            4,
        )
        .unwrap();
    let report = &trained.report;
    assert_eq!(report.status, RunStatus::Finished);
    assert_eq!(report.plan.strategy, want);
    assert_eq!(report.plan.engine, want_engine);
    let losses = &report.step_losses;
    assert!(losses.len() >= 32, "{} steps", losses.len());
    let (first, last) = (mean(&losses[..4]), mean(&losses[losses.len() - 8..]));
    assert!(
        last < 0.7 * first,
        "the loss did not fall: first steps {first}, last steps {last}"
    );
    let valid = report.final_metrics["valid/loss"];
    assert!(valid.is_finite() && valid < 1.2, "valid/loss {valid}");
    // burn-train's accuracy of a ClassificationOutput, as a fraction (4 classes:
    // chance is 0.25).
    let accuracy = report.final_metrics["valid/accuracy"];
    assert!(
        accuracy > 0.6 && accuracy <= 1.0,
        "valid/accuracy {accuracy}"
    );
    // burn-train's other metrics of a ClassificationOutput (4 classes: no top-5
    // accuracy, no binary AUROC).
    for metric in ["valid/precision", "valid/recall", "valid/f1"] {
        let value = report.final_metrics[metric];
        assert!(value > 0.3 && value <= 1.0, "{metric} {value}");
    }
    let perplexity = report.final_metrics["valid/perplexity"];
    assert!(
        perplexity >= 1.0 && perplexity < valid.exp() * 1.5,
        "valid/perplexity {perplexity}, valid/loss {valid}"
    );
    assert!(!report.final_metrics.contains_key("valid/top5_accuracy"));
    assert!(!report.final_metrics.contains_key("valid/auroc"));
    // The same metrics of the training steps' outputs (rank 0's micro-batches of
    // the logged steps, dropout on).
    for metric in ["accuracy", "precision", "recall", "f1"] {
        let value = report.final_metrics[&format!("train/{metric}")];
        assert!(value > 0.3 && value <= 1.0, "train/{metric} {value}");
    }
    assert!(report.final_metrics["train/perplexity"] >= 1.0);
}

/// Without dropout, two workers with 8 examples each take the steps one device
/// takes with 16 (ddp, and fsdp with the optimizer state sharded).
#[rstest]
#[case::ddp("ddp")]
#[case::fsdp("fsdp")]
fn without_dropout_two_workers_take_the_steps_of_one_device(#[case] strategy: &str) {
    if !own_process() {
        return;
    }
    let model = cnn(0.0);
    let run = |strategy: &str, devices: &str, batch_size: usize| {
        let dir = tempfile::tempdir().unwrap();
        let trained = quiet(dir.path())
            .strategy(strategy)
            .devices(devices)
            .batch_size(batch_size)
            .max_steps(20)
            .build()
            .unwrap()
            .fit(
                model.clone(),
                AdamConfig::new().init(),
                3e-3,
                &images(ImageBatcher),
                None,
                2,
            )
            .unwrap();
        (trained.report, param_values(&trained.model))
    };
    let (single, single_weights) = run("single", "1", 16);
    let (group, group_weights) = run(strategy, "2", 8);
    assert_eq!(group.plan.world_size, 2);
    assert_eq!(single.step_losses.len(), 20);
    for (step, (a, b)) in single
        .step_losses
        .iter()
        .zip(&group.step_losses)
        .enumerate()
    {
        assert!(
            (a - b).abs() <= 1e-4 * a.abs().max(1.0),
            "step {}: one device {a}, two workers {b}",
            step + 1
        );
    }
    let worst = single_weights
        .iter()
        .zip(&group_weights)
        .map(|(a, b)| (f32::from_bits(*a) - f32::from_bits(*b)).abs())
        .fold(0.0f32, f32::max);
    assert!(worst <= 1e-4, "final weights differ by {worst}");
}

/// burn-train's Learner engine and kiln's native loop take the same steps with a
/// model of its own `TrainStep`: Burn's RNG is seeded alike before every
/// micro-batch (dropout on, one device), and the run's scheduler is stepped once
/// per optimizer step on both (accumulation of 2, a linear schedule, one device
/// and two fsdp workers). Two workers in one process share Flex's one RNG, so
/// their dropout masks depend on the threads' timing: that case runs without.
#[rstest]
#[case::single_with_dropout("single", "1", 0.25)]
#[case::fsdp("fsdp", "2", 0.0)]
fn both_engines_take_the_same_steps(
    #[case] strategy: &str,
    #[case] devices: &str,
    #[case] dropout: f64,
) {
    if !own_process() {
        return;
    }
    let model = cnn(dropout);
    let run = |engine: &str| {
        let dir = tempfile::tempdir().unwrap();
        let trained = quiet(dir.path())
            .strategy(strategy)
            .devices(devices)
            .engine(engine)
            .batch_size(8)
            .accumulate_grad_batches(2)
            .max_steps(12)
            .build()
            .unwrap()
            .fit(
                model.clone(),
                AdamConfig::new().init(),
                LinearLrSchedulerConfig::new(3e-3, 1e-4, 12).init().unwrap(),
                &images(ImageBatcher),
                None,
                2,
            )
            .unwrap();
        (trained.report, param_values(&trained.model))
    };
    let (native, native_weights) = run("native");
    let (learner, learner_weights) = run("learner");
    assert_eq!(learner.plan.engine, Engine::Learner);
    assert_eq!(learner.optimizer_steps, 12);
    assert_eq!(
        learner.metrics.keys().collect::<Vec<_>>(),
        native.metrics.keys().collect::<Vec<_>>()
    );
    for (step, (a, b)) in learner
        .step_losses
        .iter()
        .zip(&native.step_losses)
        .enumerate()
    {
        assert!(
            (a - b).abs() <= 1e-5 * b.abs(),
            "step {}: learner {a}, native {b}",
            step + 1
        );
    }
    let worst = learner_weights
        .iter()
        .zip(&native_weights)
        .map(|(a, b)| (f32::from_bits(*a) - f32::from_bits(*b)).abs())
        .fold(0.0f32, f32::max);
    assert!(worst <= 1e-5, "final weights differ by {worst}");
    for metric in ["valid/loss", "valid/accuracy"] {
        let (a, b) = (learner.final_metrics[metric], native.final_metrics[metric]);
        assert!(
            (a - b).abs() <= 1e-5 * b.abs().max(1.0),
            "{metric}: {a} vs {b}"
        );
    }
}

/// Dropout draws from Burn's RNG, which kiln seeds before every micro-batch from
/// the run's seed: two runs with one seed take the same steps bit for bit, and a
/// run without dropout takes others. Two workers in one process share Flex's RNG:
/// `deterministic` gives them turns, on either engine.
#[rstest]
#[case::one_device("single", "1", "auto", false)]
#[case::ddp_deterministic("ddp", "2", "native", true)]
#[case::ddp_deterministic_on_the_learner("ddp", "2", "learner", true)]
fn two_runs_with_one_seed_and_dropout_take_the_same_steps_bit_for_bit(
    #[case] strategy: &str,
    #[case] devices: &str,
    #[case] engine: &str,
    #[case] deterministic: bool,
) {
    if !own_process() {
        return;
    }
    let run = |model: ImageClassifier<B>| {
        let dir = tempfile::tempdir().unwrap();
        quiet(dir.path())
            .strategy(strategy)
            .devices(devices)
            .engine(engine)
            .deterministic(deterministic)
            .batch_size(16)
            .max_steps(12)
            .seed(9)
            .build()
            .unwrap()
            .fit(
                model,
                AdamConfig::new().init(),
                3e-3,
                &images(ImageBatcher),
                None,
                1,
            )
            .unwrap()
            .report
    };
    let model = cnn(0.5);
    let first = run(model.clone());
    let second = run(model.clone());
    assert_eq!(loss_bits(&first), loss_bits(&second));
    let plain = run(cnn(0.0));
    assert_ne!(
        loss_bits(&plain),
        loss_bits(&first),
        "dropout 0.5 changed no loss"
    );
}

/// A batcher that asks the run to stop while it builds training batch `at`
/// (counted from 0; validation batches are not counted).
#[derive(Clone)]
struct StopAt<T> {
    inner: T,
    stop: Option<StopHandle>,
    at: usize,
    seen: std::sync::Arc<AtomicUsize>,
}

impl<T> StopAt<T> {
    fn new(inner: T, stop: Option<StopHandle>, at: usize) -> Self {
        Self {
            inner,
            stop,
            at,
            seen: Default::default(),
        }
    }
}

impl<Bk: Backend, I, O, T: Batcher<Bk, I, O>> Batcher<Bk, I, O> for StopAt<T> {
    fn batch(&self, items: Vec<I>, device: &Bk::Device) -> O {
        let counted = Bk::ad_enabled(device);
        if let (true, Some(stop)) = (counted, &self.stop)
            && self.seen.fetch_add(1, Ordering::SeqCst) == self.at
        {
            stop.stop();
        }
        self.inner.batch(items, device)
    }
}

/// Trains `model` on `engine` straight through, and again stopped while training
/// batch 11 is built and resumed from the last checkpoint: the same losses,
/// weights and validation loss, bit for bit.
#[allow(clippy::too_many_arguments)]
fn stop_and_resume<M, I, T, S, LR>(
    engine: &str,
    model: M,
    optimizer: impl Fn() -> burn::optim::adaptor::OptimizerAdaptor<S, M, B>,
    scheduler: impl Fn() -> LR,
    data: impl Fn(StopAt<T>) -> Datasets<I, StopAt<T>>,
    batcher: T,
    accumulate: u32,
) where
    M: kiln_coordinator::TrainModel<B>,
    I: Send + Sync,
    T: Clone,
    StopAt<T>: kiln_coordinator::ModelBatcher<B, I, M>,
    S: burn::optim::SimpleOptimizer<<B as burn::tensor::backend::AutodiffBackend>::InnerBackend>
        + 'static,
    LR: burn::lr_scheduler::LrScheduler + 'static,
{
    let builder = |root: &Path| {
        quiet(root)
            .engine(engine)
            .run_name("r")
            .batch_size(16)
            .max_steps(14)
            .accumulate_grad_batches(accumulate)
            .gradient_clip_val(1.0)
            .checkpoint_every_n_steps(2)
    };
    let straight_dir = tempfile::tempdir().unwrap();
    let expected = builder(straight_dir.path())
        .build()
        .unwrap()
        .fit(
            model.clone(),
            optimizer(),
            scheduler(),
            &data(StopAt::new(batcher.clone(), None, 0)),
            None,
            3,
        )
        .unwrap();

    let dir = tempfile::tempdir().unwrap();
    let first = builder(dir.path()).build().unwrap();
    let stopping = data(StopAt::new(batcher.clone(), Some(first.stop_handle()), 11));
    let err = first
        .fit(model.clone(), optimizer(), scheduler(), &stopping, None, 3)
        .unwrap_err();
    let CoordinatorError::Stopped { report } = err else {
        panic!("expected a stop, got {err}")
    };
    // Batch 11 is never trained on: 11 micro-batches make this many steps.
    assert_eq!(report.optimizer_steps, 11 / accumulate as u64);

    let resumed = builder(dir.path())
        .ckpt_path("last")
        .build()
        .unwrap()
        .fit(
            model,
            optimizer(),
            scheduler(),
            &data(StopAt::new(batcher, None, 0)),
            None,
            3,
        )
        .unwrap();
    assert_eq!(resumed.report.optimizer_steps, 14);
    assert_eq!(resumed.report.plan.engine.to_string(), engine);
    assert_eq!(
        loss_bits(&resumed.report),
        loss_bits(&expected.report),
        "per-step losses differ"
    );
    assert_eq!(
        param_values(&resumed.model),
        param_values(&expected.model),
        "final weights differ"
    );
    assert_eq!(
        resumed.report.final_metrics["valid/loss"].to_bits(),
        expected.report.final_metrics["valid/loss"].to_bits()
    );
}

/// The CNN with dropout, Adam and a linear schedule, on either engine.
#[rstest]
fn the_cnn_with_dropout_and_adam_resumes_bit_for_bit(#[values("learner", "native")] engine: &str) {
    if !own_process() {
        return;
    }
    stop_and_resume(
        engine,
        cnn(0.25),
        || AdamConfig::new().init(),
        || LinearLrSchedulerConfig::new(3e-3, 1e-4, 14).init().unwrap(),
        images,
        ImageBatcher,
        1,
    );
}

/// The regressor with its own loss and dropout, SGD with momentum, a cosine
/// schedule and gradient accumulation.
#[test]
fn the_regressor_with_dropout_and_sgd_momentum_resumes_bit_for_bit() {
    if !own_process() {
        return;
    }
    let device = Default::default();
    B::seed(&device, 4);
    let model: Regressor<B> = RegressorConfig::new().with_dropout(0.2).init(&device);
    stop_and_resume(
        "native",
        model,
        || {
            SgdConfig::new()
                .with_momentum(Some(MomentumConfig::new().with_momentum(0.9)))
                .init()
        },
        || {
            CosineAnnealingLrSchedulerConfig::new(0.05, 14)
                .init()
                .unwrap()
        },
        |batcher| {
            Datasets::new(
                synthetic_regression(256, 1),
                synthetic_regression(64, 2),
                batcher,
            )
        },
        RegressionBatcher,
        2,
    );
}

/// The regressor with dropout resumes bit for bit with burn-optim's other
/// optimizers and schedulers too (their state in the checkpoint): RmsProp with a
/// Noam schedule, AdaGrad with a composed one (linear × cosine), and AdamW with
/// kiln's warm-up + cosine, each with accumulation and clipping.
#[test]
fn the_regressor_resumes_bit_for_bit_with_other_optimizers_and_schedulers() {
    if !own_process() {
        return;
    }
    let data = |batcher| {
        Datasets::new(
            synthetic_regression(256, 1),
            synthetic_regression(64, 2),
            batcher,
        )
    };
    stop_and_resume(
        "native",
        regressor(0.2),
        || RmsPropConfig::new().with_momentum(0.5).init(),
        || {
            NoamLrSchedulerConfig::new(0.05)
                .with_warmup_steps(4)
                .with_model_size(16)
                .init()
                .unwrap()
        },
        data,
        RegressionBatcher,
        2,
    );
    stop_and_resume(
        "learner",
        regressor(0.2),
        || AdaGradConfig::new().init(),
        || {
            ComposedLrSchedulerConfig::new()
                .linear(LinearLrSchedulerConfig::new(1.0, 0.1, 14))
                .cosine(CosineAnnealingLrSchedulerConfig::new(0.05, 14))
                .init()
                .unwrap()
        },
        data,
        RegressionBatcher,
        1,
    );
    stop_and_resume(
        "native",
        regressor(0.2),
        || AdamWConfig::new().with_weight_decay(0.01).init(),
        || {
            let schedule = LrSchedule::WarmupCosine {
                warmup_steps: 3,
                min_lr_ratio: 0.1,
            };
            KilnSchedule::new(1e-2, schedule, 14)
        },
        data,
        RegressionBatcher,
        2,
    );
}

/// Set in the processes that [`two_nodes_train_the_cnn_as_one_device_does`] starts:
/// the root directory their run writes to. Such a process is a node.
const NODE_ROOT: &str = "KILN_TEST_NODE_ROOT";

/// The CNN (no dropout, one worker per node, 8 examples each) trained on `nodes`
/// nodes, or on one device with the same global batch.
fn cnn_on_nodes(root: &Path, nodes: u32, node: NodeSettings) -> TrainReport {
    quiet(root)
        .experiment("nodes")
        .run_name("r")
        .num_nodes(nodes)
        .node(node)
        .batch_size(16 / nodes as usize)
        .max_steps(12)
        .build()
        .unwrap()
        .fit(
            cnn(0.0),
            AdamConfig::new().init(),
            3e-3,
            &images(ImageBatcher),
            None,
            1,
        )
        .unwrap()
        .report
}

/// A model with its own `TrainStep` trains across two nodes (two processes of this
/// test binary, wired by torchrun's variables as a user's launcher does): the run
/// takes the steps one device takes with the global batch.
#[test]
fn two_nodes_train_the_cnn_as_one_device_does() {
    if let Some(root) = std::env::var_os(NODE_ROOT) {
        let launch = NodeLaunch::from_env(&NodeFlags::default()).unwrap();
        let report = cnn_on_nodes(Path::new(&root), launch.num_nodes, launch.settings);
        assert_eq!(report.status, RunStatus::Finished);
        return;
    }
    if !own_process() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let port = free_master_port(2).expect("a free range of ports");
    let name = test_name();
    let nodes: Vec<_> = (0..2)
        .map(|rank| {
            Command::new(std::env::current_exe().unwrap())
                .args([name.as_str(), "--exact", "--test-threads", "1"])
                .env(NODE_ROOT, dir.path())
                .env("WORLD_SIZE", "2")
                .env("NODE_RANK", rank.to_string())
                .env("MASTER_ADDR", "127.0.0.1")
                .env("MASTER_PORT", port.to_string())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for (rank, node) in nodes.into_iter().enumerate() {
        let output = output_within(node, Duration::from_secs(300), &format!("node {rank}"));
        assert!(
            output.status.success(),
            "node {rank} failed:\n{}\n{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let report: TrainReport =
        serde_json::from_slice(&std::fs::read(dir.path().join("nodes/r/report.json")).unwrap())
            .unwrap();
    assert_eq!(report.plan.num_nodes, 2);
    assert_eq!(report.plan.world_size, 2);
    // The run says, once, that its ports are open to anyone who can reach them.
    let open = report
        .plan
        .warnings
        .iter()
        .filter(|w| w.contains("without authentication") && w.contains("trusted network"))
        .count();
    assert_eq!(open, 1, "{:?}", report.plan.warnings);
    let single_dir = tempfile::tempdir().unwrap();
    let single = cnn_on_nodes(single_dir.path(), 1, NodeSettings::default());
    assert_eq!(report.step_losses.len(), 12);
    for (step, (a, b)) in single
        .step_losses
        .iter()
        .zip(&report.step_losses)
        .enumerate()
    {
        assert!(
            (a - b).abs() <= 1e-4 * a.abs().max(1.0),
            "step {}: one device {a}, two nodes {b}",
            step + 1
        );
    }
}

/// What a bad input to `fit` gives: an error that names it, the run FAILED in the
/// store where training had started, never a panic.
#[test]
fn an_empty_training_dataset_is_refused_before_anything_is_written() {
    if !own_process() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let data = Datasets::new(
        InMemDataset::<ImageItem>::new(Vec::new()),
        synthetic_images(8, 4, 2),
        ImageBatcher,
    );
    let err = quiet(dir.path())
        .build()
        .unwrap()
        .fit(cnn(0.0), AdamConfig::new().init(), 1e-3, &data, None, 1)
        .unwrap_err();
    assert!(
        matches!(err, CoordinatorError::Config(_)),
        "expected a configuration error, got {err:?}"
    );
    assert!(
        err.to_string().contains("training dataset is empty"),
        "{err}"
    );
    assert!(
        !dir.path().join("default").exists(),
        "a run directory was made"
    );
}

/// Images of the wrong shape for the model: two channels where it takes one.
#[derive(Clone)]
struct TwoChannels;

impl<Bk: Backend> Batcher<Bk, ImageItem, ImageBatch<Bk>> for TwoChannels {
    fn batch(&self, items: Vec<ImageItem>, device: &Bk::Device) -> ImageBatch<Bk> {
        let n = items.len();
        let batch: ImageBatch<Bk> = ImageBatcher.batch(items, device);
        ImageBatch {
            images: batch.images.reshape([n, 2, SIDE / 2, SIDE]),
            targets: batch.targets,
        }
    }
}

/// A dataset whose `len()` promises more items than `get` gives.
struct Short(InMemDataset<ImageItem>);

impl Dataset<ImageItem> for Short {
    fn get(&self, index: usize) -> Option<ImageItem> {
        self.0.get(index)
    }
    fn len(&self) -> usize {
        self.0.len() + 16
    }
}

fn failed_run<I: Send + Sync + 'static, T>(data: &Datasets<I, T>) -> (String, TrainReport, String)
where
    T: Batcher<B, I, ImageBatch<B>>
        + Batcher<<B as burn::tensor::backend::AutodiffBackend>::InnerBackend, I, ImageBatch<Flex>>,
{
    let dir = tempfile::tempdir().unwrap();
    let mut db = ExperimentDb::open(dir.path().join("kiln.sqlite")).unwrap();
    let err = quiet(dir.path())
        .batch_size(16)
        .build()
        .unwrap()
        .fit(
            cnn(0.0),
            AdamConfig::new().init(),
            1e-3,
            data,
            Some(&mut db),
            1,
        )
        .unwrap_err();
    let CoordinatorError::RunFailed { reason, report } = err else {
        panic!("expected a failed run, got {err:?}")
    };
    let runs = db.list_runs(None).unwrap();
    assert_eq!(runs.len(), 1);
    // The run's params name the user's optimizer and scheduler; kiln's own `lr`
    // and `weight_decay` settings do not apply to them and are not recorded.
    let params: std::collections::BTreeMap<String, String> =
        db.params(runs[0].id).unwrap().into_iter().collect();
    assert_eq!(params["task_type"], "custom");
    assert_eq!(params["optimizer"], "adam");
    assert_eq!(params["lr_scheduler"], "f64");
    assert!(!params.contains_key("lr"), "{params:?}");
    (reason, *report, runs[0].status.to_string())
}

#[test]
fn a_batch_that_does_not_fit_the_model_fails_the_run_naming_it() {
    if !own_process() {
        return;
    }
    let (reason, report, status) = failed_run(&images(TwoChannels));
    assert_eq!(status, "FAILED");
    assert_eq!(report.optimizer_steps, 0);
    assert!(
        reason.contains("conv2d") && reason.contains("channels"),
        "{reason}"
    );
}

#[test]
fn a_dataset_shorter_than_its_len_fails_the_run_naming_the_item() {
    if !own_process() {
        return;
    }
    let data = Datasets::new(
        Short(synthetic_images(32, 4, 1)),
        synthetic_images(8, 4, 2),
        ImageBatcher,
    );
    let (reason, _, status) = failed_run(&data);
    assert_eq!(status, "FAILED");
    assert!(
        reason.contains("the train dataset has no item") && reason.contains("len() is 48"),
        "{reason}"
    );
}

/// A validation batcher of its own: `ImageBatcher`'s batches, counted.
#[derive(Clone, Default)]
struct CountedValid(std::sync::Arc<AtomicUsize>);

impl<Bk: Backend> Batcher<Bk, ImageItem, ImageBatch<Bk>> for CountedValid {
    fn batch(&self, items: Vec<ImageItem>, device: &Bk::Device) -> ImageBatch<Bk> {
        assert!(
            !Bk::ad_enabled(device),
            "a training batch from the validation batcher"
        );
        self.0.fetch_add(1, Ordering::SeqCst);
        ImageBatcher.batch(items, device)
    }
}

/// The CNN (no dropout) for 8 steps on `engine` with `data`, validated after its
/// one epoch.
fn cnn_with<V>(engine: &str, data: &Datasets<ImageItem, ImageBatcher, V>) -> TrainReport
where
    V: kiln_coordinator::ValidBatcher<B, ImageItem, ImageClassifier<B>>,
{
    let dir = tempfile::tempdir().unwrap();
    quiet(dir.path())
        .engine(engine)
        .batch_size(16)
        .limit_train_batches(8)
        .build()
        .unwrap()
        .fit(cnn(0.0), AdamConfig::new().init(), 3e-3, data, None, 1)
        .unwrap()
        .report
}

/// A validation batcher of its own (burn-train's second data loader) builds every
/// validation batch, and only those: the same run as with one batcher for both.
#[rstest]
fn a_validation_batcher_of_its_own_builds_the_validation_batches(
    #[values("learner", "native")] engine: &str,
) {
    if !own_process() {
        return;
    }
    let counted = CountedValid::default();
    let two = cnn_with(
        engine,
        &images(ImageBatcher).with_valid_batcher(counted.clone()),
    );
    let one = cnn_with(engine, &images(ImageBatcher));
    // 64 validation images in batches of 16.
    assert_eq!(counted.0.load(Ordering::SeqCst), 4);
    assert_eq!(loss_bits(&two), loss_bits(&one));
    assert_eq!(
        two.final_metrics["valid/loss"].to_bits(),
        one.final_metrics["valid/loss"].to_bits()
    );
}

/// A regressor (dropout, SGD with momentum) seeded like the resume test's.
fn regressor(dropout: f64) -> Regressor<B> {
    let device = Default::default();
    B::seed(&device, 4);
    RegressorConfig::new().with_dropout(dropout).init(&device)
}

fn regression<T>(batcher: T) -> Datasets<RegressionItem, T> {
    Datasets::new(
        synthetic_regression(256, 1),
        synthetic_regression(64, 2),
        batcher,
    )
}

/// The regressor with an output of the user's own, which names a metric of its own.
#[derive(Module, Debug)]
struct WithMae<B: Backend> {
    inner: Regressor<B>,
}

/// A user's output type: the loss and the mean absolute error.
struct MaeOutput<B: Backend> {
    loss: Tensor<B, 1>,
    mae: f64,
}

impl<B: Backend> MaeOutput<B> {
    fn of(output: burn::train::RegressionOutput<B>) -> Self {
        let mae = (output.output - output.targets)
            .abs()
            .mean()
            .into_scalar()
            .elem::<f64>();
        Self {
            loss: output.loss,
            mae,
        }
    }
}

impl<B: Backend> burn::train::metric::ItemLazy for MaeOutput<B> {
    type ItemSync = Self;

    fn sync(self) -> Self {
        self
    }
}

impl<B: Backend> burn::train::metric::Adaptor<burn::train::metric::LossInput<B>> for MaeOutput<B> {
    fn adapt(&self) -> burn::train::metric::LossInput<B> {
        burn::train::metric::LossInput::new(self.loss.clone())
    }
}

impl<B: Backend> kiln_coordinator::StepOutput<B> for MaeOutput<B> {
    fn metrics(&self) -> Vec<(&'static str, f64)> {
        vec![("mae", self.mae)]
    }
}

impl<B: burn::tensor::backend::AutodiffBackend> burn::train::TrainStep for WithMae<B> {
    type Input = kiln_examples::regressor::RegressionBatch<B>;
    type Output = MaeOutput<B>;

    fn step(&self, batch: Self::Input) -> burn::train::TrainOutput<MaeOutput<B>> {
        let output = self.inner.forward_regression(batch.inputs, batch.targets);
        let grads = output.loss.backward();
        burn::train::TrainOutput::new(self, grads, MaeOutput::of(output))
    }
}

impl<B: Backend> burn::train::InferenceStep for WithMae<B> {
    type Input = kiln_examples::regressor::RegressionBatch<B>;
    type Output = MaeOutput<B>;

    fn step(&self, batch: Self::Input) -> MaeOutput<B> {
        MaeOutput::of(self.inner.forward_regression(batch.inputs, batch.targets))
    }
}

/// A user's own output type is logged with the metrics it names, on both engines.
#[rstest]
fn a_users_output_logs_its_own_metrics(#[values("learner", "native")] engine: &str) {
    if !own_process() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let report = quiet(dir.path())
        .engine(engine)
        .batch_size(16)
        .build()
        .unwrap()
        .fit(
            WithMae {
                inner: regressor(0.0),
            },
            AdamConfig::new().init(),
            1e-2,
            &regression(RegressionBatcher),
            None,
            2,
        )
        .unwrap()
        .report;
    let mae = report.final_metrics["valid/mae"];
    let loss = report.final_metrics["valid/loss"];
    // Huber's loss is at most half the squared error near 0 and below the absolute
    // error beyond: a positive MAE of the same order.
    assert!(
        mae > 0.0 && mae < 2.0 && loss < mae * 1.5,
        "mae {mae}, loss {loss}"
    );
    // The best MAE is the smallest seen (lower is better for a metric not known
    // to be a score).
    assert!(report.metrics["valid/mae"].best <= mae);
    // The training steps' outputs name it too, logged on the logged steps.
    let train = report.final_metrics["train/mae"];
    let train_loss = report.final_metrics["train/loss"];
    assert!(
        train > 0.0 && train < 2.0 && train_loss < train * 1.5,
        "train/mae {train}, train/loss {train_loss}"
    );
}

/// A model that is also a `LossStep` trains in the mixed precisions through
/// `fit_with_loss`: kiln runs backward from its loss (scaled under `16-mixed`),
/// the loss falls as it does in `32-true`, and `32-true` takes the steps `fit`
/// takes (kiln weighs the loss before backward where `fit` scales the gradients
/// after: float rounding apart), on either engine.
#[rstest]
#[case::bf16_mixed("bf16-mixed", 0.05)]
#[case::f16_mixed("16-mixed", 0.05)]
#[case::f32("32-true", 1e-5)]
fn a_loss_step_trains_in_mixed_precision(
    #[case] precision: &str,
    #[case] tolerance: f32,
    #[values("native", "learner")] engine: &str,
) {
    if !own_process() {
        return;
    }
    let builder = |root: &Path, precision: &str| {
        quiet(root)
            .engine(engine)
            .precision(precision)
            .batch_size(16)
            .accumulate_grad_batches(2)
            .max_steps(24)
    };
    let sgd = || {
        SgdConfig::new()
            .with_momentum(Some(MomentumConfig::new().with_momentum(0.9)))
            .init()
    };
    let dir = tempfile::tempdir().unwrap();
    let mixed = builder(dir.path(), precision)
        .build()
        .unwrap()
        .fit_with_loss(
            regressor(0.1),
            sgd(),
            0.02,
            &regression(RegressionBatcher),
            None,
            4,
        )
        .unwrap()
        .report;
    assert_eq!(mixed.plan.precision.to_string(), precision);
    assert_eq!(mixed.plan.engine.to_string(), engine);
    if precision == "16-mixed" {
        assert!(
            mixed.metrics.contains_key("train/loss_scale"),
            "{:?}",
            mixed.metrics.keys()
        );
    }
    let reference_dir = tempfile::tempdir().unwrap();
    let reference = builder(reference_dir.path(), "32-true")
        .build()
        .unwrap()
        .fit(
            regressor(0.1),
            sgd(),
            0.02,
            &regression(RegressionBatcher),
            None,
            4,
        )
        .unwrap()
        .report;
    assert_eq!(mixed.step_losses.len(), 24);
    if precision != "32-true" {
        assert_ne!(
            loss_bits(&mixed),
            loss_bits(&reference),
            "{precision} computed in f32"
        );
    }
    let (first, last) = (
        mean(&mixed.step_losses[..4]),
        mean(&mixed.step_losses[20..]),
    );
    assert!(
        last < 0.8 * first,
        "the loss did not fall: {first} -> {last}"
    );
    for (step, (a, b)) in mixed
        .step_losses
        .iter()
        .zip(&reference.step_losses)
        .enumerate()
    {
        assert!(
            (a - b).abs() <= tolerance * b.abs().max(1.0),
            "step {}: {precision} {a}, fit in 32-true {b}",
            step + 1
        );
    }
}

/// In a true precision the parameters and Adam's or AdamW's moments live in the
/// working dtype: the regressor trains in `bf16-true` through `fit_with_loss`, and
/// a run stopped at a checkpoint resumes to the straight run's steps bit for bit
/// (checkpoints hold f32; the moments are cast back on resume).
#[rstest]
fn a_loss_step_trains_and_resumes_in_a_true_precision(
    #[values("bf16-true", "16-true")] precision: &str,
) {
    if !own_process() {
        return;
    }
    let run = |root: &Path, max_steps: u64, resume: bool| {
        let mut builder = quiet(root)
            .run_name("r")
            .precision(precision)
            .batch_size(16)
            .max_steps(max_steps)
            .checkpoint_every_n_steps(4);
        if resume {
            builder = builder.ckpt_path("last");
        }
        builder
            .build()
            .unwrap()
            .fit_with_loss(
                regressor(0.1),
                AdamConfig::new().with_epsilon(1e-4).init(),
                3e-3,
                &regression(RegressionBatcher),
                None,
                2,
            )
            .unwrap()
            .report
    };
    let straight_dir = tempfile::tempdir().unwrap();
    let straight = run(straight_dir.path(), 20, false);
    assert_eq!(straight.plan.precision.to_string(), precision);
    let (first, last) = (
        mean(&straight.step_losses[..4]),
        mean(&straight.step_losses[16..]),
    );
    assert!(
        last < 0.8 * first,
        "the loss did not fall: {first} -> {last}"
    );
    let dir = tempfile::tempdir().unwrap();
    assert_eq!(run(dir.path(), 12, false).optimizer_steps, 12);
    let resumed = run(dir.path(), 20, true);
    assert_eq!(resumed.optimizer_steps, 20);
    assert_eq!(loss_bits(&resumed), loss_bits(&straight));
}

/// What this version does not run for a model with its own step is an error that
/// says so, never a silent substitute: a mixed precision for a model whose
/// `TrainStep` runs backward names `LossStep`, a true precision the optimizer's
/// state.
#[rstest]
#[case::mixed_precision("16-mixed", false, "LossStep")]
#[case::true_precision("bf16-true", false, "LossStep")]
#[case::true_precision_with_sgd("bf16-true", true, "optimizer sgd")]
fn what_the_general_path_cannot_run_is_named(
    #[case] precision: &str,
    #[case] with_loss: bool,
    #[case] needle: &str,
) {
    if !own_process() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let coordinator = quiet(dir.path()).precision(precision).build().unwrap();
    let data = regression(RegressionBatcher);
    let err = match with_loss {
        true => coordinator.fit_with_loss(
            regressor(0.0),
            SgdConfig::new().init(),
            1e-3,
            &data,
            None,
            1,
        ),
        false => coordinator.fit(
            regressor(0.0),
            AdamConfig::new().init(),
            1e-3,
            &data,
            None,
            1,
        ),
    }
    .unwrap_err();
    assert!(
        matches!(err, CoordinatorError::NotAvailable { .. }),
        "{err:?}"
    );
    assert!(err.to_string().contains(needle), "{err}");
    assert!(err.to_string().contains(precision), "{err}");
}

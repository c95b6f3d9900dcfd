//! Precision modes on CPU: every mode on Flex, 16-mixed's loss scaling, the fallback
//! on NdArray.

use burn::backend::Autodiff;
use burn::module::{Module, ModuleVisitor, Param};
use burn::prelude::*;
use burn::tensor::DType;
use kiln_backend_cpu::{Flex, NdArray};
use kiln_coordinator::CoordinatorError;
use std::sync::atomic::{AtomicUsize, Ordering};

use kiln_core::{
    Batch, DataModule, LossScaling, OptimizerConfig, Precision, RunStatus, Split, Targets,
    TaskKind, TaskSpec, TrainReport,
};
use kiln_experiment_db::ExperimentDb;
use kiln_models::{MlpConfig, TabularDataModule};
use kiln_tests::{corpus_data, param_values, quiet, small_gpt};
use rstest::rstest;

/// The dtypes of a model's float parameters.
fn dtypes<B: Backend, M: Module<B>>(model: &M) -> Vec<DType> {
    struct Dtypes(Vec<DType>);
    impl<B: Backend> ModuleVisitor<B> for Dtypes {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            self.0.push(param.val().dtype());
        }
    }
    let mut v = Dtypes(Vec::new());
    model.visit(&mut v);
    v.0
}

fn run<B: kiln_kernels::FusedAutodiffBackend>(
    precision: &str,
    strict: bool,
) -> Result<(TrainReport, Vec<DType>), CoordinatorError> {
    run_with::<B>(precision, strict, OptimizerConfig::default().eps)
}

fn run_with<B: kiln_kernels::FusedAutodiffBackend>(
    precision: &str,
    strict: bool,
    eps: f32,
) -> Result<(TrainReport, Vec<DType>), CoordinatorError> {
    let dir = tempfile::tempdir().unwrap();
    let (data, task) = corpus_data(40_000, 32);
    let model = small_gpt(data.vocab_size(), 32)
        .init::<B>(21, &Default::default())
        .unwrap();
    let trained = quiet(dir.path())
        .precision(precision)
        .strict_precision(strict)
        .seed(21)
        .batch_size(16)
        .optimizer(OptimizerConfig {
            eps,
            ..Default::default()
        })
        .learning_rate(3e-3)
        .max_steps(100)
        .build()
        .unwrap()
        .train::<B, _, _>(model, &data, &task, None, 10)?;
    let dtypes = dtypes(&trained.model);
    Ok((trained.report, dtypes))
}

/// The precision issue's test: bf16-mixed on Flex trains; after 100 steps its loss
/// is within 2% of the f32 run's with the same seed; the master weights and the
/// optimizer state stay f32.
#[test]
fn bf16_mixed_on_flex_trains_like_f32_with_f32_masters() {
    type B = Autodiff<Flex>;
    let (f32_run, _) = run::<B>("32-true", false).unwrap();
    let (bf16_run, master_dtypes) = run::<B>("bf16-mixed", true).unwrap();
    assert_eq!(bf16_run.plan.precision, Precision::Bf16Mixed);
    assert_eq!(bf16_run.optimizer_steps, 100);
    let mean_tail = |r: &TrainReport| {
        let tail = &r.step_losses[r.step_losses.len() - 10..];
        tail.iter().sum::<f32>() / tail.len() as f32
    };
    let (a, b) = (mean_tail(&bf16_run), mean_tail(&f32_run));
    assert!(
        (a - b).abs() <= 0.02 * b,
        "bf16-mixed {a} vs f32 {b} (last 10 steps)"
    );
    assert!(
        a < f32_run.step_losses[0] - 0.5,
        "bf16-mixed did not learn: {a}"
    );
    // bf16 really ran: the losses are not the f32 run's.
    assert_ne!(bf16_run.step_losses, f32_run.step_losses);
    assert!(
        master_dtypes.iter().all(|d| *d == DType::F32),
        "{master_dtypes:?}"
    );
    // f32 moments for every parameter, as in the f32 run.
    assert_eq!(
        bf16_run.optimizer_state_bytes,
        f32_run.optimizer_state_bytes
    );
}

/// NdArray has no bf16: bf16-mixed falls back to 32-true with the warning; with
/// strict precision it is an error naming the backend and what it supports.
#[test]
fn ndarray_falls_back_to_f32_or_refuses_when_strict() {
    type B = Autodiff<NdArray>;
    let (report, _) = run::<B>("bf16-mixed", false).unwrap();
    assert_eq!(report.plan.precision, Precision::F32);
    assert!(
        report
            .plan
            .warnings
            .iter()
            .any(|w| w.contains("bf16-mixed is not supported by backend") && w.contains("32-true")),
        "{:?}",
        report.plan.warnings
    );
    let err = run::<B>("bf16-mixed", true).unwrap_err().to_string();
    assert!(
        err.contains("invalid precision \"bf16-mixed\"") && err.contains("supports: 32-true"),
        "{err}"
    );
}

/// `inner`, with the targets of training batch number `spike` (0-based, in the
/// order the loop asks for them) multiplied by `factor`: the loss (taken in f32)
/// stays finite, the gradient reaching the f16 working copy does not.
struct Spiked {
    inner: TabularDataModule,
    spike: usize,
    factor: f64,
    seen: AtomicUsize,
}

impl DataModule for Spiked {
    fn len(&self, split: Split) -> usize {
        self.inner.len(split)
    }
    fn batch<B: Backend>(
        &self,
        split: Split,
        idx: &[usize],
        device: &B::Device,
    ) -> kiln_core::Result<Batch<B>> {
        let mut batch = self.inner.batch::<B>(split, idx, device)?;
        if split == Split::Train && self.seen.fetch_add(1, Ordering::SeqCst) == self.spike {
            batch.targets = match batch.targets {
                Targets::Values(y) => Targets::Values(y.mul_scalar(self.factor)),
                other => other,
            };
        }
        Ok(batch)
    }
    fn check_task(&self, task: &TaskSpec) -> kiln_core::Result<()> {
        self.inner.check_task(task)
    }
}

/// A 16-mixed regression run of `max_steps` whose 3rd training batch is spiked:
/// the report, the final weights and the loss scale after every step.
fn spiked_run(max_steps: u64) -> (TrainReport, Vec<u32>, Vec<(u64, f64)>) {
    type B = Autodiff<Flex>;
    let dir = tempfile::tempdir().unwrap();
    let task = TaskSpec::new("regression", TaskKind::Regression { outputs: 1 });
    let data = Spiked {
        inner: TabularDataModule::linear(1, 16, 2048, 64, 5),
        spike: 2,
        factor: 1e4,
        seen: AtomicUsize::new(0),
    };
    let model = MlpConfig::for_task(&task.kind, 16)
        .unwrap()
        .init::<B>(5, &Default::default())
        .unwrap();
    let mut db = ExperimentDb::open(dir.path().join("kiln.sqlite")).unwrap();
    let trained = quiet(dir.path())
        .precision("16-mixed")
        .strict_precision(true)
        .loss_scaling(LossScaling {
            init_scale: 1024.0,
            growth_interval: 4,
            ..Default::default()
        })
        .seed(5)
        .batch_size(32)
        .log_every_n_steps(1)
        .max_steps(max_steps)
        .build()
        .unwrap()
        .train::<B, _, _>(model, &data, &task, Some(&mut db), 1)
        .unwrap();
    let scales = db
        .metric_history(trained.report.run_id.unwrap(), "loss_scale", "train")
        .unwrap();
    (trained.report, param_values(&trained.model), scales)
}

/// The precision issue's test: under 16-mixed an injected overflow (a batch whose
/// f16 gradients are infinite) skips that step and halves the scale; training goes
/// on and the scale grows back after `growth_interval` clean steps.
#[test]
fn f16_mixed_skips_an_overflowing_step_halves_the_scale_and_grows_it_back() {
    let (report, weights, scales) = spiked_run(9);
    assert_eq!(report.plan.precision, Precision::F16Mixed);
    assert_eq!(report.optimizer_steps, 9);
    assert_eq!(report.skipped_steps, 1, "{scales:?}");
    let scale: Vec<f64> = scales.iter().map(|p| p.1).collect();
    // Steps 1-2 clean, 3 overflows (halved), 4-7 clean (grows at the 4th), 8-9 clean.
    assert_eq!(
        scale,
        vec![
            1024.0, 1024.0, 512.0, 512.0, 512.0, 512.0, 1024.0, 1024.0, 1024.0
        ],
        "loss scale after each step"
    );
    assert!(report.step_losses.iter().all(|l| l.is_finite()));
    assert!(matches!(report.status, RunStatus::Finished));

    // Skipped means skipped: the weights after step 3 are the weights after step 2.
    let (_, after_two, _) = spiked_run(2);
    let (three, after_three, _) = spiked_run(3);
    assert_eq!(three.skipped_steps, 1);
    assert_eq!(
        after_two, after_three,
        "the overflowing step changed the weights"
    );
    assert_ne!(after_two, weights);
}

/// Every reduced-precision mode trains the tiny GPT on Flex; true modes store the
/// parameters in their dtype, mixed modes keep f32 masters.
#[rstest]
#[case::f16_mixed("16-mixed", DType::F32, 1e-8)]
#[case::bf16_true("bf16-true", DType::BF16, 1e-8)]
#[case::f16_true("16-true", DType::F16, 1e-4)]
fn every_mode_trains_the_tiny_gpt_on_flex(
    #[case] precision: &str,
    #[case] stored: DType,
    #[case] eps: f32,
) {
    type B = Autodiff<Flex>;
    let (report, params) = run_with::<B>(precision, true, eps).unwrap();
    assert_eq!(report.plan.precision.to_string(), precision);
    assert_eq!(report.optimizer_steps, 100);
    assert!(params.iter().all(|d| *d == stored), "{params:?}");
    let first = report.step_losses[0];
    let tail = &report.step_losses[90..];
    let last = tail.iter().sum::<f32>() / tail.len() as f32;
    assert!(
        last < first - 0.5,
        "{precision} did not learn: {first} -> {last}"
    );
}

/// 16-true keeps AdamW's moments and eps in f16, where the default eps (1e-8) is
/// zero and the first update divides by zero: refused before training, naming the
/// value and what works.
#[test]
fn f16_true_refuses_an_eps_that_is_zero_in_f16() {
    type B = Autodiff<Flex>;
    let err = run::<B>("16-true", true).unwrap_err().to_string();
    assert!(
        err.contains("invalid eps") && err.contains(">= 6.1e-5") && err.contains("16-mixed"),
        "{err}"
    );
}

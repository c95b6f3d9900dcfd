//! How runs end: honest statuses, clear errors, nothing silently wrong.

use burn::backend::Autodiff;
use burn::prelude::*;
use kiln_backend_cpu::NdArray;
use kiln_coordinator::{CoordinatorError, TrainingCoordinator};
use kiln_core::{Batch, DataModule, Inputs, RunStatus, Split, Targets, TaskKind, TaskSpec};
use kiln_models::{MlpConfig, TabularDataModule};
use kiln_tests::{corpus_data, quiet, small_gpt};
use rstest::rstest;

type B = Autodiff<NdArray>;

/// Regression data whose features turn NaN from example `bad_from` on.
struct PoisonedData {
    bad_from: usize,
}

impl DataModule for PoisonedData {
    fn len(&self, _split: Split) -> usize {
        64
    }

    fn batch<Bk: Backend>(
        &self,
        _split: Split,
        indices: &[usize],
        device: &Bk::Device,
    ) -> kiln_core::Result<Batch<Bk>> {
        let n = indices.len();
        let x: Vec<f32> = indices
            .iter()
            .flat_map(|&i| {
                [if i >= self.bad_from {
                    f32::NAN
                } else {
                    i as f32 / 64.0
                }; 4]
            })
            .collect();
        Ok(Batch {
            inputs: Inputs::Features(Tensor::from_data(TensorData::new(x, [n, 4]), device)),
            targets: Targets::Values(Tensor::zeros([n, 1], device)),
        })
    }
}

#[test]
fn a_non_finite_loss_fails_the_run_with_the_step_and_writes_the_report() {
    let dir = tempfile::tempdir().unwrap();
    let task = TaskSpec::reg_tiny();
    let model = MlpConfig::for_task(&task.kind, 4)
        .unwrap()
        .init::<B>(1, &Default::default())
        .unwrap();
    let coordinator = quiet(dir.path()).batch_size(64).build().unwrap();
    let err = coordinator
        .train::<B, _, _>(model, &PoisonedData { bad_from: 0 }, &task, None, 2)
        .unwrap_err();
    let CoordinatorError::RunFailed { reason, report } = err else {
        panic!("expected RunFailed, got {err}");
    };
    assert_eq!(reason, "training loss is NaN at step 1 (epoch 0, batch 0)");
    assert_eq!(
        report.status,
        RunStatus::Failed {
            reason: reason.clone()
        }
    );
    assert_eq!(report.optimizer_steps, 0);
    let saved = std::fs::read_to_string(report.run_dir.unwrap().join("report.json")).unwrap();
    assert!(
        saved.contains("\"FAILED\"") && saved.contains("NaN at step 1"),
        "{saved}"
    );
}

#[rstest]
#[case::vocabulary(|_| small_gpt(10, 32), "the model has a vocabulary of 10 tokens but the task's vocab_size is")]
#[case::context(|v| small_gpt(v, 16), "the model's context is 16 tokens but the task's seq_len is 32")]
fn a_model_that_does_not_fit_the_task_is_refused_before_training(
    #[case] cfg: fn(usize) -> kiln_models::TinyGptConfig,
    #[case] needle: &str,
) {
    let dir = tempfile::tempdir().unwrap();
    let (data, task) = corpus_data(20_000, 32);
    let model = cfg(data.vocab_size())
        .init::<B>(1, &Default::default())
        .unwrap();
    let err = quiet(dir.path())
        .build()
        .unwrap()
        .train::<B, _, _>(model, &data, &task, None, 1);
    let msg = err.unwrap_err().to_string();
    assert!(msg.contains(needle), "{msg}");
    assert!(
        std::fs::read_dir(dir.path()).unwrap().next().is_none(),
        "no run directory is made"
    );
}

/// Data whose batches panic: a bug in user code.
struct PanickingData;

impl DataModule for PanickingData {
    fn len(&self, _split: Split) -> usize {
        8
    }

    fn batch<Bk: Backend>(
        &self,
        _split: Split,
        _indices: &[usize],
        _device: &Bk::Device,
    ) -> kiln_core::Result<Batch<Bk>> {
        panic!("user bug in batch()")
    }
}

#[test]
fn a_panic_during_training_ends_the_run_failed_not_running() {
    let dir = tempfile::tempdir().unwrap();
    let task = TaskSpec::reg_tiny();
    let model = MlpConfig::for_task(&task.kind, 4)
        .unwrap()
        .init::<B>(1, &Default::default())
        .unwrap();
    let err =
        quiet(dir.path())
            .build()
            .unwrap()
            .train::<B, _, _>(model, &PanickingData, &task, None, 1);
    let Err(CoordinatorError::RunFailed { reason, report }) = err else {
        panic!("expected RunFailed");
    };
    assert_eq!(reason, "panicked during training: user bug in batch()");
    assert_eq!(report.status.label(), "FAILED");
}

#[rstest]
#[case::text_for_classification(
    TaskSpec::cls_tiny(),
    "text data feeds language modelling, not classification"
)]
#[case::wrong_seq_len(TaskSpec::new("x", TaskKind::Lm { vocab_size: 200, seq_len: 16 }), "task's seq_len is 16")]
#[case::vocab_too_small(TaskSpec::new("x", TaskKind::Lm { vocab_size: 5, seq_len: 32 }), "task's vocab_size is 5")]
fn data_that_does_not_fit_the_task_is_refused_before_training(
    #[case] task: TaskSpec,
    #[case] needle: &str,
) {
    let dir = tempfile::tempdir().unwrap();
    let (data, _) = corpus_data(20_000, 32);
    let model = small_gpt(data.vocab_size(), 32)
        .init::<B>(1, &Default::default())
        .unwrap();
    let err = quiet(dir.path())
        .build()
        .unwrap()
        .train::<B, _, _>(model, &data, &task, None, 1);
    let msg = err.unwrap_err().to_string();
    assert!(msg.contains(needle), "{msg}");
    assert!(
        std::fs::read_dir(dir.path()).unwrap().next().is_none(),
        "no run directory is made"
    );
}

#[rstest]
#[case::unknown_strategy(TrainingCoordinator::builder().strategy("horovod"), "invalid strategy \"horovod\"")]
#[case::unknown_precision(TrainingCoordinator::builder().precision("fp8"), "invalid precision \"fp8\"")]
#[case::devices_zero(TrainingCoordinator::builder().devices("0"), "invalid devices \"0\"")]
#[case::devices_negative(TrainingCoordinator::builder().devices("-2"), "invalid devices \"-2\"")]
#[case::devices_letters(TrainingCoordinator::builder().devices("a,b"), "invalid devices \"a,b\"")]
#[case::num_nodes_zero(TrainingCoordinator::builder().num_nodes(0), "invalid num_nodes \"0\"")]
#[case::log_every_zero(TrainingCoordinator::builder().log_every_n_steps(0), "invalid log_every_n_steps \"0\"")]
#[case::batch_zero(TrainingCoordinator::builder().batch_size(0), "invalid batch_size \"0\"")]
#[case::negative_lr(TrainingCoordinator::builder().learning_rate(-1.0), "invalid lr \"-1\"")]
fn the_builder_refuses_bad_values_by_name(
    #[case] builder: kiln_coordinator::CoordinatorBuilder,
    #[case] needle: &str,
) {
    let msg = builder.build().unwrap_err().to_string();
    assert!(msg.starts_with(needle), "{msg}");
}

#[test]
fn ddp_on_one_device_runs_single_and_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let data = TabularDataModule::blobs(2, 16, 256, 64, 3);
    let task = TaskSpec::cls_tiny();
    let model = MlpConfig::for_task(&task.kind, 16)
        .unwrap()
        .init::<B>(1, &Default::default())
        .unwrap();
    let coordinator = quiet(dir.path())
        .strategy("ddp")
        .devices("auto")
        .learning_rate(1e-2)
        .build()
        .unwrap();
    let report = coordinator
        .train::<B, _, _>(model, &data, &task, None, 3)
        .unwrap()
        .report;
    assert_eq!(report.plan.strategy, kiln_core::Strategy::Single);
    assert_eq!(
        report.plan.warnings,
        vec!["strategy ddp with one device runs as single (nothing to distribute)"]
    );
    assert!(
        report.final_metrics["valid/accuracy"] > 0.9,
        "{:?}",
        report.final_metrics
    );
}

/// A node whose master never answers fails within its timeout, naming the master
/// and what to check, before any training (the rest: `crates/cli/tests/it/multi_node.rs`).
#[test]
fn a_node_that_cannot_reach_its_master_fails_within_the_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let data = TabularDataModule::blobs(2, 16, 64, 16, 3);
    let task = TaskSpec::cls_tiny();
    let model = MlpConfig::for_task(&task.kind, 16)
        .unwrap()
        .init::<B>(1, &Default::default())
        .unwrap();
    // A port nothing listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let err = quiet(dir.path())
        .strategy("ddp")
        .num_nodes(2)
        .node(kiln_core::launch::NodeSettings {
            node_rank: 1,
            master_port: port.min(65_000),
            timeout_s: 1.0,
            ..Default::default()
        })
        .build()
        .unwrap()
        .train::<B, _, _>(model, &data, &task, None, 1)
        .unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("node 1: cannot reach the master at 127.0.0.1:")
            && msg.contains("within 1 s")
            && msg.contains("MASTER_ADDR/--master-addr"),
        "{msg}"
    );
    // Nothing was written: node 1 keeps no books.
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
}

#[test]
fn a_run_name_is_never_reused() {
    let dir = tempfile::tempdir().unwrap();
    let data = TabularDataModule::linear(1, 16, 64, 16, 3);
    let task = TaskSpec::reg_tiny();
    let coordinator = quiet(dir.path()).run_name("r1").build().unwrap();
    let model = || {
        MlpConfig::for_task(&task.kind, 16)
            .unwrap()
            .init::<B>(1, &Default::default())
            .unwrap()
    };
    coordinator
        .train::<B, _, _>(model(), &data, &task, None, 1)
        .unwrap();
    let msg = coordinator
        .train::<B, _, _>(model(), &data, &task, None, 1)
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("invalid run_name \"r1\"") && msg.contains("directory exists"),
        "{msg}"
    );
}

#[test]
fn a_stop_request_ends_the_run_killed_with_its_report() {
    let dir = tempfile::tempdir().unwrap();
    let data = TabularDataModule::linear(1, 16, 256, 16, 3);
    let task = TaskSpec::reg_tiny();
    let coordinator = quiet(dir.path()).batch_size(8).build().unwrap();
    let model = MlpConfig::for_task(&task.kind, 16)
        .unwrap()
        .init::<B>(1, &Default::default())
        .unwrap();
    coordinator.stop_handle().stop();
    let err = coordinator
        .train::<B, _, _>(model, &data, &task, None, 1)
        .unwrap_err();
    let CoordinatorError::Stopped { report } = err else {
        panic!("expected Stopped, got {err}")
    };
    assert_eq!(report.status, RunStatus::Killed);
    let saved = std::fs::read_to_string(report.run_dir.unwrap().join("report.json")).unwrap();
    assert!(saved.contains("\"KILLED\""), "{saved}");
}

/// Text data whose training batch `bad` carries the token id `vocab`, one past the
/// vocabulary (a data module's bug).
struct OutOfVocabulary<'a> {
    inner: &'a kiln_models::TextDataModule,
    bad: usize,
    seen: std::sync::atomic::AtomicUsize,
}

impl DataModule for OutOfVocabulary<'_> {
    fn len(&self, split: Split) -> usize {
        self.inner.len(split)
    }

    fn items_per_example(&self) -> usize {
        self.inner.items_per_example()
    }

    fn check_task(&self, task: &TaskSpec) -> kiln_core::Result<()> {
        self.inner.check_task(task)
    }

    fn batch<Bk: Backend>(
        &self,
        split: Split,
        indices: &[usize],
        device: &Bk::Device,
    ) -> kiln_core::Result<Batch<Bk>> {
        let mut batch = self.inner.batch::<Bk>(split, indices, device)?;
        let n = self.seen.fetch_add(
            (split == Split::Train) as usize,
            std::sync::atomic::Ordering::SeqCst,
        );
        if let (Split::Train, true, Targets::Tokens(t)) = (split, n == self.bad, &batch.targets) {
            let vocab = self.inner.vocab_size() as i64;
            batch.targets = Targets::Tokens(t.clone().mul_scalar(0).add_scalar(vocab));
        }
        Ok(batch)
    }
}

/// A token id past the vocabulary ends the run FAILED with a message naming the id,
/// the limit and the batch, not an index panic.
#[test]
fn a_token_id_past_the_vocabulary_is_named_with_its_batch() {
    let dir = tempfile::tempdir().unwrap();
    let (text, task) = corpus_data(20_000, 32);
    let data = OutOfVocabulary {
        inner: &text,
        bad: 2,
        seen: 0.into(),
    };
    let model = small_gpt(text.vocab_size(), 32)
        .init::<B>(1, &Default::default())
        .unwrap();
    let err = quiet(dir.path())
        .strategy("vanilla")
        .batch_size(8)
        .build()
        .unwrap()
        .train::<B, _, _>(model, &data, &task, None, 1);
    let Err(CoordinatorError::RunFailed { reason, report }) = err else {
        panic!("expected RunFailed, got {err:?}");
    };
    let vocab = text.vocab_size();
    assert!(
        reason.contains(&format!(
            "token id {vocab} is out of range: the task's vocab_size is {vocab}"
        )) && reason.contains("(training step 3, epoch 0, batch 2)"),
        "{reason}"
    );
    assert!(!reason.contains("panicked"), "{reason}");
    assert_eq!(report.status.label(), "FAILED");
    assert_eq!(report.optimizer_steps, 2);
}

/// Whatever fails at the end of a run (here `report.json` cannot be written: a
/// directory of that name stands in its place, as a full disk would fail it) ends
/// the run FAILED in the store with the reason, returns the error, and leaves no
/// temporary file behind.
#[test]
fn a_failure_while_ending_the_run_records_it_failed() {
    let dir = tempfile::tempdir().unwrap();
    let run_dir = dir.path().join("default").join("r");
    let (text, task) = corpus_data(20_000, 32);
    let data = kiln_tests::Hooked::new(&text, |batch| {
        if batch == 1 {
            std::fs::create_dir_all(run_dir.join("report.json"))
                .map_err(|e| kiln_core::Error::Data(e.to_string()))?;
        }
        Ok(())
    });
    let model = small_gpt(text.vocab_size(), 32)
        .init::<B>(1, &Default::default())
        .unwrap();
    let mut db = kiln_experiment_db::ExperimentDb::open(dir.path().join("kiln.sqlite")).unwrap();
    let err = quiet(dir.path())
        .run_name("r")
        .strategy("vanilla")
        .batch_size(8)
        .max_steps(3)
        .build()
        .unwrap()
        .train::<B, _, _>(model, &data, &task, Some(&mut db), 1)
        .unwrap_err()
        .to_string();
    assert!(err.contains("report.json"), "{err}");
    let runs = db.list_runs(None).unwrap();
    assert_eq!(runs.len(), 1);
    assert_eq!(runs[0].status.to_string(), "FAILED", "{:?}", runs[0]);
    let reason = runs[0].failure_reason.clone().unwrap_or_default();
    assert!(
        reason.starts_with("ending the run: ") && reason.contains("report.json"),
        "{reason}"
    );
    assert!(!run_dir.join(".report.json.tmp").exists());
}

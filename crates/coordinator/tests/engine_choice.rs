//! Which engine runs: the Learner engine when it is compiled in, kiln's native loop
//! (with one warning) when it is not. CI runs this file in both builds
//! (`cargo test -p kiln-coordinator` and `... --no-default-features`).

use std::io::Write;
use std::sync::{Arc, Mutex};

use burn::backend::Autodiff;
use kiln_backend_cpu::Flex;
use kiln_coordinator::TrainingCoordinator;
use kiln_core::{Engine, ProgressMode, TaskSpec};
use kiln_models::{MlpConfig, TabularDataModule};

type B = Autodiff<Flex>;

/// Collects what a tracing subscriber writes.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Trains a small classifier with `strategy`; returns the report's engine and
/// warnings, and the warnings logged through `tracing`.
fn train(strategy: &str) -> (Engine, Vec<String>, String) {
    let dir = tempfile::tempdir().unwrap();
    let data = TabularDataModule::blobs(2, 8, 128, 32, 3);
    let task = TaskSpec::cls_tiny();
    let model = MlpConfig::for_task(&task.kind, 8)
        .unwrap()
        .init::<B>(1, &Default::default())
        .unwrap();
    let coordinator = TrainingCoordinator::builder()
        .strategy(strategy)
        .learning_rate(1e-2)
        .progress(ProgressMode::Off)
        .default_root_dir(dir.path())
        .build()
        .unwrap();
    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::WARN)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    let report = tracing::subscriber::with_default(subscriber, || {
        coordinator
            .train::<B, _, _>(model, &data, &task, None, 3)
            .unwrap()
            .report
    });
    assert!(
        report.final_metrics["valid/accuracy"] > 0.8,
        "{:?}",
        report.final_metrics
    );
    let logged = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
    (report.plan.engine, report.plan.warnings, logged)
}

/// Seed card, scenario 2: built without `learner`, the coordinator trains through
/// the native loop and says so once.
#[cfg(not(feature = "learner"))]
#[test]
fn without_the_learner_feature_the_native_loop_trains_and_warns_once() {
    let (engine, warnings, logged) = train("auto");
    assert_eq!(engine, Engine::Native);
    let want = "the Learner engine is not compiled in (cargo feature `learner` of \
                kiln-coordinator): kiln's native loop runs instead";
    assert_eq!(warnings, vec![want.to_string()]);
    assert_eq!(
        logged.matches("Learner engine is not compiled in").count(),
        1,
        "{logged}"
    );
    assert!(logged.contains("WARN"), "{logged}");
}

#[cfg(feature = "learner")]
#[test]
fn with_the_learner_feature_auto_runs_through_burn_train_without_warnings() {
    let (engine, warnings, logged) = train("auto");
    assert_eq!(engine, Engine::Learner);
    assert!(warnings.is_empty(), "{warnings:?}");
    assert!(logged.is_empty(), "{logged}");
    // burn-train installs a global subscriber (and a panic hook) by default; kiln
    // asks it not to: the process's logging stays the application's choice.
    let global_is_none = std::thread::spawn(|| {
        tracing::dispatcher::get_default(|d| d.is::<tracing::subscriber::NoSubscriber>())
    })
    .join()
    .unwrap();
    assert!(global_is_none, "a global tracing subscriber was installed");
}

/// `vanilla` selects the native loop in any build, without a warning.
#[test]
fn vanilla_selects_the_native_loop_in_any_build() {
    let (engine, warnings, logged) = train("vanilla");
    assert_eq!(engine, Engine::Native);
    assert!(warnings.is_empty(), "{warnings:?}");
    assert!(logged.is_empty(), "{logged}");
}

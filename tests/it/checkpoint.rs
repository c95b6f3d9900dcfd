//! Checkpoints and exact resume.

use std::path::{Path, PathBuf};

use burn::backend::Autodiff;
use kiln_backend_cpu::Flex;
use kiln_coordinator::{CoordinatorBuilder, CoordinatorError, TrainingCoordinator};
use kiln_core::{LrSchedule, RunStatus, TrainReport};
use kiln_models::TinyGpt;
use kiln_tests::{Hooked, corpus_data, loss_bits, param_values, quiet, small_gpt};
use rstest::rstest;

type B = Autodiff<Flex>;

fn builder(root: &Path) -> CoordinatorBuilder {
    quiet(root)
        .run_name("r")
        .batch_size(16)
        .limit_train_batches(5)
        .max_steps(12)
        .checkpoint_every_n_steps(3)
        .learning_rate(1e-3)
        .lr_schedule(LrSchedule::WarmupCosine {
            warmup_steps: 4,
            min_lr_ratio: 0.1,
        })
        .gradient_clip_val(1.0)
}

fn model(vocab: usize) -> TinyGpt<B> {
    small_gpt(vocab, 32)
        .init::<B>(11, &Default::default())
        .unwrap()
}

/// Both engines: the Learner engine (`auto`) and the native loop (`vanilla`); and
/// the native loop in 16-mixed (the loss scale is checkpointed) and bf16-true (the
/// parameters and AdamW's moments are stored in bf16, checkpoints hold f32).
#[rstest]
#[case::learner("auto", "32-true")]
#[case::native("vanilla", "32-true")]
#[case::f16_mixed("vanilla", "16-mixed")]
#[case::bf16_true("vanilla", "bf16-true")]
fn a_run_stopped_mid_epoch_resumes_to_the_same_weights_bit_for_bit(
    #[case] strategy: &str,
    #[case] precision: &str,
) {
    let (data, task) = corpus_data(20_000, 32);
    let v = data.vocab_size();
    let builder = |root: &Path| {
        builder(root)
            .strategy(strategy)
            .precision(precision)
            .strict_precision(true)
            // 16-mixed: a scale that grows within the run, so that resuming with
            // the wrong one would show.
            .loss_scaling(kiln_core::LossScaling {
                init_scale: 256.0,
                growth_interval: 2,
                ..Default::default()
            })
    };

    let straight_dir = tempfile::tempdir().unwrap();
    let straight = builder(straight_dir.path()).build().unwrap();
    let expected = straight
        .train::<B, _, _>(model(v), &data, &task, None, 3)
        .unwrap();

    let dir = tempfile::tempdir().unwrap();
    let first = builder(dir.path()).build().unwrap();
    // Training batch 8 (the 3rd of epoch 1) asks to stop while it is built: the run
    // stops before training on it, after step 7; its last checkpoint is step 6's.
    let stop = first.stop_handle();
    let stopping = Hooked::new(&data, |seen| {
        if seen + 1 == 8 {
            stop.stop();
        }
        Ok(())
    });
    let err = first
        .train::<B, _, _>(model(v), &stopping, &task, None, 3)
        .unwrap_err();
    let CoordinatorError::Stopped { report } = err else {
        panic!("expected a stop, got {err}")
    };
    assert_eq!(report.optimizer_steps, 7);
    assert_eq!(
        report.plan.engine.to_string(),
        if strategy == "vanilla" {
            "native"
        } else {
            "learner"
        }
    );

    if precision == "16-mixed" {
        // The loss scale travels with the checkpoint (step 6: grown three times).
        let state: serde_json::Value = serde_json::from_slice(
            &std::fs::read(
                dir.path()
                    .join("default/r/checkpoints/step-00000006/state.json"),
            )
            .unwrap(),
        )
        .unwrap();
        assert_eq!(state["loss_scale"]["scale"], 2048.0, "{state}");
    }

    let resumed = builder(dir.path()).ckpt_path("last").build().unwrap();
    let got = resumed
        .train::<B, _, _>(model(v), &data, &task, None, 3)
        .unwrap();

    assert_eq!(got.report.optimizer_steps, 12);
    assert_eq!(
        loss_bits(&got.report),
        loss_bits(&expected.report),
        "per-step losses differ"
    );
    assert_eq!(
        param_values(&got.model),
        param_values(&expected.model),
        "final weights differ"
    );
    assert_eq!(
        got.report.final_metrics["valid/loss"].to_bits(),
        expected.report.final_metrics["valid/loss"].to_bits()
    );
}

#[test]
fn retention_keeps_the_last_and_the_best_and_nothing_half_written() {
    let (data, task) = corpus_data(20_000, 32);
    let dir = tempfile::tempdir().unwrap();
    let c = builder(dir.path())
        .checkpoint_every_n_steps(1)
        .build()
        .unwrap();
    c.train::<B, _, _>(model(data.vocab_size()), &data, &task, None, 3)
        .unwrap();
    let root = dir.path().join("default/r/checkpoints");
    let mut names: Vec<String> = std::fs::read_dir(&root)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert!(
        names.len() <= 2 && names.contains(&"step-00000012".to_string()),
        "{names:?}"
    );
    assert!(names.iter().all(|n| !n.starts_with('.')), "{names:?}");
    for n in &names {
        assert!(root.join(n).join("manifest.json").is_file());
    }
}

#[test]
fn save_top_k_two_keeps_exactly_the_two_best_and_the_last() {
    let (data, task) = corpus_data(20_000, 32);
    let dir = tempfile::tempdir().unwrap();
    let policy = kiln_core::CheckpointPolicy {
        save_top_k: 2,
        every_n_epochs: Some(1),
        ..Default::default()
    };
    // Five epochs of 5 steps, a checkpoint at each epoch end (after its validation),
    // and a high learning rate so that validation loss does not simply fall.
    let c = quiet(dir.path())
        .run_name("r")
        .batch_size(16)
        .limit_train_batches(5)
        .learning_rate(3e-2)
        .checkpoint_policy(policy)
        .build()
        .unwrap();
    let mut db = kiln_experiment_db::ExperimentDb::open(dir.path().join("kiln.sqlite")).unwrap();
    let r = c
        .train::<B, _, _>(model(data.vocab_size()), &data, &task, Some(&mut db), 5)
        .unwrap()
        .report;
    assert_eq!(r.optimizer_steps, 25);
    let root = dir.path().join("default/r/checkpoints");
    let mut kept: Vec<u64> = std::fs::read_dir(&root)
        .unwrap()
        .map(|e| {
            e.unwrap().file_name().to_string_lossy()["step-".len()..]
                .parse()
                .unwrap()
        })
        .collect();
    kept.sort_unstable();
    // The validation loss of every epoch end, as the store recorded it.
    let history = db
        .metric_history(r.run_id.unwrap(), "loss", "valid")
        .unwrap();
    assert_eq!(
        history.iter().map(|p| p.0).collect::<Vec<_>>(),
        vec![5, 10, 15, 20, 25]
    );
    let mut ranked = history.clone();
    ranked.sort_by(|a, b| a.1.total_cmp(&b.1));
    let mut expected: Vec<u64> = ranked.iter().take(2).map(|p| p.0).chain([25]).collect();
    expected.sort_unstable();
    expected.dedup();
    assert_eq!(kept, expected, "valid losses {history:?}");

    // Every checkpoint written, the final weights and the report are in the store.
    let artifacts = db.artifacts(r.run_id.unwrap()).unwrap();
    let of = |kind: &str| artifacts.iter().filter(|a| a.kind == kind).count();
    assert_eq!(
        (of("checkpoint"), of("model"), of("report")),
        (5, 1, 1),
        "{artifacts:?}"
    );
    let report = artifacts.iter().find(|a| a.kind == "report").unwrap();
    assert_eq!(report.path, "report.json");
    assert_eq!(report.sha256.as_ref().map(String::len), Some(64));
}

fn checkpoint_dir(root: &Path) -> PathBuf {
    let (data, task) = corpus_data(20_000, 32);
    let c = builder(root).max_steps(3).build().unwrap();
    c.train::<B, _, _>(model(data.vocab_size()), &data, &task, None, 1)
        .unwrap();
    root.join("default/r/checkpoints/step-00000003")
}

#[rstest]
#[case::flipped_byte("model.mpk", "sha256 does not match")]
#[case::truncated("optim.mpk", "truncated")]
#[case::missing_state("state.json", "cannot read it")]
#[case::missing_manifest("manifest.json", "not a complete checkpoint")]
#[case::garbled_manifest("manifest.json!", "the manifest is corrupt")]
fn damaged_checkpoints_are_refused_naming_the_file(#[case] file: &str, #[case] needle: &str) {
    let dir = tempfile::tempdir().unwrap();
    let ckpt = checkpoint_dir(dir.path());
    let name = file.trim_end_matches('!');
    let path = ckpt.join(name);
    match file {
        "model.mpk" => {
            let mut b = std::fs::read(&path).unwrap();
            let i = b.len() / 2;
            b[i] ^= 0xff;
            std::fs::write(&path, b).unwrap();
        }
        "optim.mpk" => {
            let b = std::fs::read(&path).unwrap();
            std::fs::write(&path, &b[..b.len() - 1]).unwrap(); // one byte short
        }
        "manifest.json!" => std::fs::write(&path, b"{ not json").unwrap(),
        _ => std::fs::remove_file(&path).unwrap(),
    }
    let (data, task) = corpus_data(20_000, 32);
    let c = builder(dir.path())
        .ckpt_path(ckpt.to_str().unwrap())
        .build()
        .unwrap();
    let msg = c
        .train::<B, _, _>(model(data.vocab_size()), &data, &task, None, 1)
        .unwrap_err()
        .to_string();
    assert!(msg.contains(needle), "{msg}");
    assert!(msg.contains("step-00000003"), "{msg}");
}

#[test]
fn a_checkpoint_of_another_model_or_task_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let ckpt = checkpoint_dir(dir.path());
    let (data, task) = corpus_data(20_000, 32);
    let v = data.vocab_size();
    let c = builder(dir.path())
        .ckpt_path(ckpt.to_str().unwrap())
        .build()
        .unwrap();
    let wider = kiln_models::TinyGptConfig {
        d_model: 64,
        ..small_gpt(v, 32)
    }
    .init::<B>(1, &Default::default())
    .unwrap();
    let msg = c
        .train::<B, _, _>(wider, &data, &task, None, 1)
        .unwrap_err()
        .to_string();
    assert!(msg.contains("written for another model"), "{msg}");

    let mut other_task = task.clone();
    other_task.kind = kiln_core::TaskKind::Lm {
        vocab_size: v + 1,
        seq_len: 32,
    };
    let bigger = small_gpt(v + 1, 32)
        .init::<B>(1, &Default::default())
        .unwrap();
    let msg = c
        .train::<B, _, _>(bigger, &data, &other_task, None, 1)
        .unwrap_err()
        .to_string();
    assert!(msg.contains("written for task"), "{msg}");
}

#[test]
fn resume_last_without_any_checkpoint_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let (data, task) = corpus_data(20_000, 32);
    let c = TrainingCoordinator::builder()
        .progress(kiln_core::ProgressMode::Off)
        .default_root_dir(dir.path())
        .ckpt_path("last")
        .build()
        .unwrap();
    let msg = c
        .train::<B, _, _>(model(data.vocab_size()), &data, &task, None, 1)
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("ckpt_path last: no run of experiment \"default\" has a checkpoint yet"),
        "{msg}"
    );
}

/// Resumes the run of [`checkpoint_dir`] from `last` and trains to `max_steps`.
fn resume_last(root: &Path, max_steps: u64) -> TrainReport {
    let (data, task) = corpus_data(20_000, 32);
    let c = builder(root)
        .ckpt_path("last")
        .max_steps(max_steps)
        .build()
        .unwrap();
    c.train::<B, _, _>(model(data.vocab_size()), &data, &task, None, 1)
        .unwrap()
        .report
}

#[test]
fn an_interrupted_write_leaves_the_previous_checkpoint_usable() {
    let dir = tempfile::tempdir().unwrap();
    let ckpt = checkpoint_dir(dir.path());
    let root = ckpt.parent().unwrap();
    // A crash while writing step 6: a partial temporary directory without a manifest.
    std::fs::create_dir(root.join(".tmp-step-00000006")).unwrap();
    std::fs::write(root.join(".tmp-step-00000006/model.mpk"), b"partial").unwrap();
    let r = resume_last(dir.path(), 5);
    assert_eq!(r.status, RunStatus::Finished);
    assert_eq!(r.optimizer_steps, 5);
    assert!(
        !root.join(".tmp-step-00000006").exists(),
        "the partial write is cleaned up"
    );
}

#[test]
fn a_replacement_cut_short_puts_the_old_checkpoint_back() {
    let dir = tempfile::tempdir().unwrap();
    let ckpt = checkpoint_dir(dir.path());
    let root = ckpt.parent().unwrap();
    // A crash between moving step 3 aside and moving its replacement in.
    std::fs::rename(&ckpt, root.join(".old-step-00000003")).unwrap();
    let r = resume_last(dir.path(), 4);
    assert_eq!((r.status, r.optimizer_steps), (RunStatus::Finished, 4));
    assert_eq!(
        r.step_losses.len(),
        4,
        "steps 1-3 come from the restored checkpoint"
    );
}

/// A resume from a checkpoint's directory continues that checkpoint's run: another
/// run name with it is a conflict named before anything is written, never silently
/// ignored. (With `last` or `best` the run name says which run to resume.)
#[test]
fn a_resume_under_another_run_name_is_refused() {
    let (data, task) = corpus_data(20_000, 32);
    let dir = tempfile::tempdir().unwrap();
    builder(dir.path())
        .max_steps(3)
        .build()
        .unwrap()
        .train::<B, _, _>(model(data.vocab_size()), &data, &task, None, 1)
        .unwrap();
    let checkpoint = dir.path().join("default/r/checkpoints/step-00000003");
    assert!(checkpoint.is_dir());
    let err = builder(dir.path())
        .run_name("other")
        .ckpt_path(checkpoint.to_str().unwrap())
        .build()
        .unwrap()
        .train::<B, _, _>(model(data.vocab_size()), &data, &task, None, 1)
        .unwrap_err()
        .to_string();
    assert!(
        err.starts_with("invalid run_name \"other\": expected the resumed run's name \"r\""),
        "{err}"
    );
    let runs: Vec<_> = std::fs::read_dir(dir.path().join("default"))
        .unwrap()
        .collect();
    assert_eq!(runs.len(), 1, "a second run directory was made");
}

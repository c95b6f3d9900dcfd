//! Training on the GPU, when the probe finds one. Without a GPU each test prints a
//! note and returns (they are never `#[ignore]`d: CI runs them and they check the
//! probe).

use kiln_backend_cuda::{CudaAutodiff, cuda_device_count, cuda_devices, cuda_memory_used};
use kiln_coordinator::TrainingCoordinator;
use kiln_core::{Precision, ProgressMode, TaskKind, TaskSpec};
use kiln_models::{TextDataModule, TinyGptConfig};

fn gpu_present(test: &str) -> bool {
    let n = cuda_device_count();
    if n == 0 {
        eprintln!("{test}: no CUDA device here; nothing to check on a GPU");
    }
    n > 0
}

/// The task of these tests: a 65-token vocabulary, context 64.
fn lm_task() -> TaskSpec {
    TaskSpec::new(
        "gpu",
        TaskKind::Lm {
            vocab_size: 65,
            seq_len: 64,
        },
    )
}

/// The tiny GPT trains on the first GPU in 32-true and bf16-mixed (the GPU has bf16
/// tensors, so nothing falls back), and the memory probe sees the device in use.
#[test]
fn the_tiny_gpt_trains_on_the_gpu_in_32_and_bf16_mixed() {
    if !gpu_present("the_tiny_gpt_trains_on_the_gpu_in_32_and_bf16_mixed") {
        return;
    }
    let devices = cuda_devices();
    let data = TextDataModule::random(65, 40_000, 64, 3).unwrap();
    let task = lm_task();
    for precision in ["32-true", "bf16-mixed"] {
        let dir = tempfile::tempdir().unwrap();
        let model = TinyGptConfig::tiny(65)
            .init::<CudaAutodiff>(3, &devices[0])
            .unwrap();
        let report = TrainingCoordinator::builder()
            .precision(precision)
            .strict_precision(true)
            .devices("1")
            .max_steps(30)
            .learning_rate(3e-3)
            .progress(ProgressMode::Off)
            .default_root_dir(dir.path())
            .build()
            .unwrap()
            .train_on::<CudaAutodiff, _, _>(&devices, model, &data, &task, None, 1)
            .unwrap()
            .report;
        assert_eq!(
            report.plan.precision,
            precision.parse::<Precision>().unwrap()
        );
        assert_eq!(report.optimizer_steps, 30);
        assert!(
            report.step_losses[29] < report.step_losses[0],
            "{precision}: {:?}",
            report.step_losses
        );
    }
    assert!(cuda_memory_used(0).is_some_and(|b| b > 0));
}

/// Asking for more GPUs than exist is an error naming how many there are.
#[test]
fn more_devices_than_gpus_is_an_error_naming_the_count() {
    if !gpu_present("more_devices_than_gpus_is_an_error_naming_the_count") {
        return;
    }
    let devices = cuda_devices();
    let too_many = (devices.len() + 1).to_string();
    let data = TextDataModule::random(65, 4_000, 64, 3).unwrap();
    let task = lm_task();
    let model = TinyGptConfig::tiny(65)
        .init::<CudaAutodiff>(3, &devices[0])
        .unwrap();
    let err = TrainingCoordinator::builder()
        .devices(too_many.as_str())
        .progress(ProgressMode::Off)
        .build()
        .unwrap()
        .train_on::<CudaAutodiff, _, _>(&devices, model, &data, &task, None, 1)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains(&format!("at most {} (devices present)", devices.len())),
        "{err}"
    );
}

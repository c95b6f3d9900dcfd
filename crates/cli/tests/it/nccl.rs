//! `--process-group-backend nccl` (burn-train's NCCL synchronisation) against
//! `collective` (burn-collective) on two GPUs: the same steps, to float rounding.
//!
//! Compiled only in a kiln built with `--features cuda-nccl`; the comparison needs
//! two CUDA devices (one NCCL group cannot hold the same GPU twice) and says so and
//! returns on a machine with fewer: `cargo test -p kiln-cli --features cuda-nccl
//! --test it nccl::`.
#![cfg(feature = "cuda-nccl")]

use std::process::Command;

use rstest::rstest;

/// Trains the tiny GPT on two GPUs with `process_group` and `strategy`; the
/// report's JSON.
fn train(dir: &std::path::Path, strategy: &str, process_group: &str) -> serde_json::Value {
    let out = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args([
            "train",
            "--backend",
            "cuda",
            "--strategy",
            strategy,
            "--devices",
            "2",
            "--process-group-backend",
            process_group,
            "--batch-size",
            "8",
            "--max-steps",
            "20",
            "--log-every-n-steps",
            "1",
            "--progress",
            "off",
            "--no-db",
            "--json",
            "--output-dir",
        ])
        .arg(dir.join(process_group))
        .output()
        .expect("kiln runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{process_group}: {stderr}");
    serde_json::from_slice(&out.stdout).expect("the report as JSON")
}

#[rstest]
#[case::ddp("ddp")]
#[case::fsdp("fsdp")]
fn nccl_takes_the_steps_burn_collective_takes(#[case] strategy: &str) {
    let gpus = kiln_backend_cuda::cuda_device_count();
    if gpus < 2 {
        eprintln!("nccl: {gpus} CUDA device(s) here; the comparison needs 2");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let nccl = train(dir.path(), strategy, "nccl");
    let collective = train(dir.path(), strategy, "collective");
    assert_eq!(nccl["plan"]["process_group_backend"], "nccl");
    assert_eq!(collective["plan"]["process_group_backend"], "collective");
    let losses = |r: &serde_json::Value| -> Vec<f64> {
        r["step_losses"]
            .as_array()
            .expect("step losses")
            .iter()
            .map(|v| v.as_f64().expect("a number"))
            .collect()
    };
    let (a, b) = (losses(&nccl), losses(&collective));
    assert_eq!(a.len(), 20, "{a:?}");
    assert_eq!(a.len(), b.len());
    for (step, (x, y)) in a.iter().zip(&b).enumerate() {
        assert!(
            (x - y).abs() <= 1e-4 * y.abs().max(1.0),
            "step {}: nccl {x} vs collective {y}",
            step + 1
        );
    }
}

/// That build has no CPU backend to train on, and says so instead of failing
/// obscurely (burn's `distributed` feature leaves NdArray and Flex without autodiff).
#[rstest]
#[case::flex(&["train", "--backend", "flex", "--max-steps", "1", "--no-db"], "backend flex is not in this kiln")]
#[case::ndarray(&["train", "--backend", "ndarray", "--max-steps", "1", "--no-db"], "backend ndarray is not in this kiln")]
#[case::bench(&["bench", "--steps", "1"], "kiln bench measures the CPU backends, which this kiln lacks")]
fn the_cpu_backends_are_refused_by_name(#[case] args: &[&str], #[case] needle: &str) {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(args)
        .current_dir(dir.path())
        .output()
        .expect("kiln runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains(needle), "{stderr}");
}

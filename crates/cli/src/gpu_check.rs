//! `kiln gpu-check`: trains the tiny GPT and a GPT-2-small-sized one on the first
//! CUDA device in `32-true` and `bf16-mixed`, and prints one JSON line per run with
//! tokens/s, peak device memory and the final loss.
//!
//! Needs a kiln built with the `cuda` feature and a GPU; says so otherwise.

use anyhow::Result;
use clap::Parser;

/// Train on the GPU in 32-true and bf16-mixed and print tokens/s, peak memory and
/// final loss as JSON lines.
#[derive(Debug, Clone, Parser)]
pub struct GpuCheckArgs {
    /// Optimizer steps per run.
    #[arg(long, default_value_t = 200)]
    steps: u64,
    /// Model configurations: tiny (d 128, 2 layers, T 64), large (d 768, 12 layers,
    /// T 256), comma-separated.
    #[arg(long, default_value = "tiny,large")]
    configs: String,
    /// Precisions, comma-separated.
    #[arg(long, default_value = "32-true,bf16-mixed")]
    precisions: String,
    /// Sequences per batch.
    #[arg(long, default_value_t = 32)]
    batch: usize,
}

#[cfg(not(feature = "cuda"))]
pub fn run(_args: &GpuCheckArgs) -> Result<()> {
    anyhow::bail!(
        "this kiln was built without CUDA: rebuild it with `cargo build --release -p \
         kiln-cli --features cuda` (or run `cargo xtask gpu-check`)"
    )
}

#[cfg(feature = "cuda")]
pub fn run(args: &GpuCheckArgs) -> Result<()> {
    imp::run(args)
}

#[cfg(feature = "cuda")]
mod imp {
    use std::sync::atomic::{AtomicU64, Ordering};

    use anyhow::{Context, Result};
    use burn::prelude::Backend;
    use kiln_backend_cuda::{CudaAutodiff, cuda_devices, cuda_memory_used};
    use kiln_coordinator::TrainingCoordinator;
    use kiln_core::{Batch, DataModule, ProgressMode, Split, TaskKind, TaskSpec};
    use kiln_models::{CharTokenizer, TextDataModule, TinyGptConfig, builtin_corpus};

    use super::GpuCheckArgs;

    /// `inner`, sampling the device memory in use before every training batch.
    struct MemoryProbe<'a> {
        inner: &'a TextDataModule,
        device: usize,
        peak: AtomicU64,
    }

    impl DataModule for MemoryProbe<'_> {
        fn len(&self, split: Split) -> usize {
            self.inner.len(split)
        }
        fn batch<B: Backend>(
            &self,
            split: Split,
            idx: &[usize],
            device: &B::Device,
        ) -> kiln_core::Result<Batch<B>> {
            if let Some(used) = cuda_memory_used(self.device) {
                self.peak.fetch_max(used, Ordering::Relaxed);
            }
            self.inner.batch(split, idx, device)
        }
        fn check_task(&self, task: &TaskSpec) -> kiln_core::Result<()> {
            self.inner.check_task(task)
        }
        fn items_per_example(&self) -> usize {
            self.inner.items_per_example()
        }
    }

    #[allow(clippy::print_stdout)] // the JSON lines are this command's output
    pub fn run(args: &GpuCheckArgs) -> Result<()> {
        let devices = cuda_devices();
        let Some(device) = devices.first() else {
            anyhow::bail!(
                "gpu-check: no CUDA device found (no driver, or no GPU visible to this \
                 process)"
            );
        };
        let text = builtin_corpus();
        let tokenizer = CharTokenizer::from_text(&text);
        let vocab = tokenizer.vocab_size();
        let tokens = tokenizer.encode(&text)?;
        let root = std::env::temp_dir().join(format!("kiln-gpu-check-{}", std::process::id()));
        for config in args.configs.split(',').map(str::trim) {
            let gpt = match config {
                "tiny" => TinyGptConfig::tiny(vocab),
                "large" => TinyGptConfig {
                    vocab_size: vocab,
                    seq_len: 256,
                    d_model: 768,
                    n_heads: 12,
                    n_layers: 12,
                    d_ff: 3072,
                },
                other => anyhow::bail!("invalid config {other:?}: expected tiny or large"),
            };
            let data = TextDataModule::new(tokens.clone(), vocab, gpt.seq_len)?;
            let task = TaskSpec::new(
                "gpu_check",
                TaskKind::Lm {
                    vocab_size: vocab,
                    seq_len: gpt.seq_len,
                },
            );
            // Enough epochs for the steps (max_steps ends the last one).
            let per_epoch = data.len(Split::Train).div_ceil(args.batch).max(1);
            let epochs = (args.steps as usize).div_ceil(per_epoch).max(1);
            for precision in args.precisions.split(',').map(str::trim) {
                let coordinator = TrainingCoordinator::builder()
                    .precision(precision)
                    .strict_precision(true)
                    .batch_size(args.batch)
                    .max_steps(args.steps)
                    .limit_val_batches(4)
                    .enable_checkpointing(false)
                    .progress(ProgressMode::Off)
                    .default_root_dir(&root)
                    .build()?;
                let probe = MemoryProbe {
                    inner: &data,
                    device: 0,
                    peak: AtomicU64::new(0),
                };
                let model = gpt.init::<CudaAutodiff>(1337, device)?;
                let trained = coordinator
                    .train_on::<CudaAutodiff, _, _>(
                        std::slice::from_ref(device),
                        model,
                        &probe,
                        &task,
                        None,
                        epochs,
                    )
                    .with_context(|| format!("gpu-check {config} {precision}"))?;
                let r = &trained.report;
                let line = serde_json::json!({
                    "kind": "gpu-check",
                    "config": config,
                    "params": gpt.num_params(),
                    "precision": r.plan.precision.to_string(),
                    "engine": r.plan.engine.to_string(),
                    "batch": args.batch,
                    "seq_len": gpt.seq_len,
                    "steps": r.optimizer_steps,
                    "tokens_per_s": r.throughput.items_per_s,
                    "peak_memory_mib": probe.peak.load(Ordering::Relaxed) as f64 / (1 << 20) as f64,
                    "final_loss": r.step_losses.last(),
                    "valid_loss": r.final_metrics.get("valid/loss"),
                });
                println!("{line}");
            }
        }
        let _ = std::fs::remove_dir_all(&root);
        Ok(())
    }
}

//! Train a Burn CNN written for burn-train (`image_classifier.rs`: `TrainStep`,
//! `InferenceStep`, a `Dataset` and a `Batcher`, Adam) through kiln, unchanged.
//!
//! ```text
//! cargo run --release -p kiln-examples --example train_cnn
//! cargo run --release -p kiln-examples --example train_cnn -- ddp 2
//! ```
//!
//! The optional arguments are the strategy and the number of CPU workers.

use anyhow::Result;
use burn::backend::Autodiff;
use burn::optim::AdamConfig;
use burn::prelude::Backend;
use kiln_backend_cpu::Flex;
use kiln_coordinator::{Datasets, TrainingCoordinator};
use kiln_examples::image_classifier::{ImageBatcher, ImageClassifierConfig, synthetic_images};

fn main() -> Result<()> {
    type B = Autodiff<Flex>;
    let mut args = std::env::args().skip(1);
    let strategy = args.next().unwrap_or_else(|| "auto".into());
    let devices = args.next().unwrap_or_else(|| "auto".into());

    // What a burn-train user already has: the model, the data, the optimizer.
    let device = Default::default();
    B::seed(&device, 42);
    let model = ImageClassifierConfig::new(4).init::<B>(&device);
    let data = Datasets::new(
        synthetic_images(2048, 4, 1),
        synthetic_images(256, 4, 2),
        ImageBatcher,
    );
    let optimizer = AdamConfig::new().init();

    // kiln's part: Lightning's settings, and the run recorded.
    let coordinator = TrainingCoordinator::builder()
        .strategy(strategy.as_str())
        .devices(devices.as_str())
        .batch_size(32)
        .log_every_n_steps(8)
        .seed(42)
        .default_root_dir("runs")
        .experiment("examples")
        .build()?;
    let trained = coordinator.fit(model, optimizer, 2e-3, &data, None, 3)?;
    let report = &trained.report;
    eprintln!(
        "{} after {} steps ({}): valid loss {:.4}; outputs in {}",
        report.status.label(),
        report.optimizer_steps,
        report.plan,
        report
            .final_metrics
            .get("valid/loss")
            .copied()
            .unwrap_or(f64::NAN),
        report
            .run_dir
            .as_ref()
            .map(|d| d.display().to_string())
            .unwrap_or_default()
    );
    Ok(())
}

//! Train a Burn regression model with its own loss (Huber's) and dropout
//! (`regressor.rs`) through kiln with SGD, momentum and weight decay, and a
//! cosine-annealing scheduler from burn-optim; the run is recorded in the
//! experiment store.
//!
//! ```text
//! cargo run --release -p kiln-examples --example train_regressor
//! ```

use anyhow::Result;
use burn::backend::Autodiff;
use burn::optim::SgdConfig;
use burn::optim::decay::WeightDecayConfig;
use burn::optim::lr_scheduler::cosine::CosineAnnealingLrSchedulerConfig;
use burn::optim::momentum::MomentumConfig;
use burn::prelude::Backend;
use kiln_backend_cpu::Flex;
use kiln_coordinator::{Datasets, TrainingCoordinator};
use kiln_examples::regressor::{RegressionBatcher, RegressorConfig, synthetic_regression};
use kiln_experiment_db::ExperimentDb;

fn main() -> Result<()> {
    type B = Autodiff<Flex>;
    let device = Default::default();
    B::seed(&device, 7);
    let model = RegressorConfig::new().init::<B>(&device);
    let data = Datasets::new(
        synthetic_regression(4096, 1),
        synthetic_regression(512, 2),
        RegressionBatcher,
    );
    let optimizer = SgdConfig::new()
        .with_momentum(Some(MomentumConfig::new().with_momentum(0.9)))
        .with_weight_decay(Some(WeightDecayConfig::new(1e-4)))
        .init();
    let epochs = 4;
    let batch_size = 64;
    let steps = epochs * 4096usize.div_ceil(batch_size);
    let scheduler = CosineAnnealingLrSchedulerConfig::new(0.05, steps)
        .with_min_lr(0.005)
        .init()
        .map_err(anyhow::Error::msg)?;

    std::fs::create_dir_all("runs")?;
    let mut db = ExperimentDb::open("runs/kiln.sqlite")?;
    let coordinator = TrainingCoordinator::builder()
        .batch_size(batch_size)
        .gradient_clip_val(5.0)
        .default_root_dir("runs")
        .experiment("examples")
        .build()?;
    let trained = coordinator.fit(model, optimizer, scheduler, &data, Some(&mut db), epochs)?;
    let report = &trained.report;
    eprintln!(
        "{} after {} steps: valid loss {:.4}; recorded as run {} in runs/kiln.sqlite",
        report.status.label(),
        report.optimizer_steps,
        report
            .final_metrics
            .get("valid/loss")
            .copied()
            .unwrap_or(f64::NAN),
        report
            .run_id
            .map_or_else(|| "-".into(), |id| id.to_string())
    );
    Ok(())
}

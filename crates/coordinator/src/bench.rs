//! Measurements for `kiln bench` that need the coordinator's internals.

use std::path::Path;
use std::time::Instant;

use burn::module::{AutodiffModule, ModuleVisitor, Param};
use burn::optim::{GradientsParams, Optimizer};
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;
use kiln_core::CoordinatorConfig;

use crate::Result;
use crate::checkpoint::{self, Signatures, Snapshot, TrainerState};

/// One checkpoint written and read back.
#[derive(Debug, Clone, Copy)]
pub struct CheckpointTiming {
    /// Bytes of the checkpoint's files (model, optimizer, trainer state).
    pub bytes: u64,
    /// Seconds to encode and write it (temporary directory, fsync, rename).
    pub save_s: f64,
    /// Seconds to read, verify (sizes, sha256) and decode it into a model and an
    /// optimizer.
    pub load_s: f64,
}

/// Writes a checkpoint of `model` with a full AdamW state (after one step) into
/// `run_dir`, then loads it back, timing both the way training does them.
pub fn checkpoint_roundtrip<B, M>(model: M, run_dir: &Path) -> Result<CheckpointTiming>
where
    B: AutodiffBackend,
    M: AutodiffModule<B>,
{
    struct Ones<'a>(&'a mut GradientsParams);
    impl<B: AutodiffBackend> ModuleVisitor<B> for Ones<'_> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            let value = param.val().inner();
            self.0
                .register::<B::InnerBackend, D>(param.id, value.ones_like());
        }
    }
    let device = model.devices().first().cloned().unwrap_or_default();
    let config = CoordinatorConfig::default();
    let mut optim = crate::optim::adamw(&config).init::<B, M>();
    let mut grads = GradientsParams::new();
    model.visit(&mut Ones(&mut grads));
    let model = optim.step(1e-3, model, grads);
    let signatures = Signatures {
        task: "bench".into(),
        model: checkpoint::model_signature::<B, M>(&model),
        world_size: 1,
    };
    let state = TrainerState {
        step: 1,
        step_losses: vec![0.0],
        ..Default::default()
    };

    let started = Instant::now();
    let snapshot = Snapshot::take::<B, M, B, _>(&model, optim.to_record())?;
    let dir = checkpoint::save(run_dir, &snapshot, &state, &signatures)?;
    let save_s = started.elapsed().as_secs_f64();

    let started = Instant::now();
    let loaded = checkpoint::load(&dir, &signatures)?;
    let restored = loaded.model::<B, M>(model, &device)?;
    let _optim = crate::optim::adamw(&config)
        .init::<B, M>()
        .load_record(loaded.optim::<B, _>(&device)?);
    let load_s = started.elapsed().as_secs_f64();
    drop(restored);

    let bytes = std::fs::read_dir(&dir)
        .map_err(|e| crate::CoordinatorError::io(&dir, e))?
        .filter_map(|e| e.ok()?.metadata().ok())
        .map(|m| m.len())
        .sum();
    Ok(CheckpointTiming {
        bytes,
        save_s,
        load_s,
    })
}

//! The optimizer and the learning-rate scheduler a run steps with, and their
//! records: any burn-optim optimizer with any `LrScheduler` (the general path), or
//! kiln's AdamW with kiln's schedule (the simple path).

use burn::module::AutodiffModule;
use burn::optim::adaptor::OptimizerAdaptor;
use burn::optim::{AdamW, AdamWConfig, Optimizer, SimpleOptimizer};
use burn::tensor::FloatDType;
use burn::tensor::backend::AutodiffBackend;
use kiln_core::CoordinatorConfig;

/// The record of optimizer `S` (a burn-optim optimizer) for model `M` on `B`: its
/// state per parameter.
pub(crate) type OptimRecord<S, B, M> = <OptimizerAdaptor<S, M, B> as Optimizer<M, B>>::Record;

/// The optimizer record of kiln's AdamW for model `M` on backend `B`.
pub(crate) type AdamWRecord<B, M> = OptimRecord<AdamW, B, M>;

/// kiln's AdamW, configured from the run's optimizer settings (both engines use it).
pub(crate) fn adamw(config: &CoordinatorConfig) -> AdamWConfig {
    let o = &config.optimizer;
    AdamWConfig::new()
        .with_beta_1(o.beta1)
        .with_beta_2(o.beta2)
        .with_epsilon(o.eps)
        .with_weight_decay(o.weight_decay)
}

/// The optimizer and the learning-rate scheduler a run steps with: the user's
/// (any burn-optim optimizer, any `LrScheduler`), or kiln's AdamW and schedule.
pub(crate) struct Optimization<B, M, S, LR>
where
    B: AutodiffBackend,
    M: AutodiffModule<B>,
    S: SimpleOptimizer<B::InnerBackend> + 'static,
{
    pub optimizer: OptimizerAdaptor<S, M, B>,
    /// Stepped once per optimizer step; its record is in every checkpoint.
    pub scheduler: LR,
    /// Puts the optimizer's state in a dtype (true precision modes keep it in the
    /// parameters' dtype); `None` where that is not implemented for `S`.
    pub cast_state: Option<CastState<B, M, S>>,
}

/// Casts an optimizer record's state to a dtype.
pub(crate) type CastState<B, M, S> =
    fn(&M, OptimRecord<S, B, M>, FloatDType) -> OptimRecord<S, B, M>;

impl<B, M, S, LR> Clone for Optimization<B, M, S, LR>
where
    B: AutodiffBackend,
    M: AutodiffModule<B>,
    S: SimpleOptimizer<B::InnerBackend> + 'static,
    LR: Clone,
{
    fn clone(&self) -> Self {
        Self {
            optimizer: self.optimizer.clone(),
            scheduler: self.scheduler.clone(),
            cast_state: self.cast_state,
        }
    }
}

//! The optimizer and the learning-rate scheduler a run steps with, and their
//! records: any burn-optim optimizer with any `LrScheduler` (the general path), or
//! kiln's AdamW (burn-optim's, bit for bit, its update fused:
//! [`kiln_kernels::AdamW`]) with kiln's schedule (the simple path).

use burn::module::{AutodiffModule, ModuleVisitor, Param, ParamId};
use burn::optim::adaptor::OptimizerAdaptor;
use burn::optim::{Optimizer, SimpleOptimizer};
use burn::prelude::*;
use burn::tensor::FloatDType;
use burn::tensor::backend::AutodiffBackend;
use kiln_core::CoordinatorConfig;

/// The record of optimizer `S` (a burn-optim optimizer) for model `M` on `B`: its
/// state per parameter.
pub(crate) type OptimRecord<S, B, M> = <OptimizerAdaptor<S, M, B> as Optimizer<M, B>>::Record;

/// kiln's AdamW, configured from the run's optimizer settings (both engines use it).
pub(crate) fn adamw(config: &CoordinatorConfig) -> kiln_kernels::AdamW {
    let o = &config.optimizer;
    kiln_kernels::AdamW::new(o.beta1, o.beta2, o.eps, o.weight_decay)
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

/// The part of a full optimizer record that a worker owning `owns` keeps (fsdp).
pub(crate) fn shard_of<B, M, S>(
    model: &M,
    mut record: OptimRecord<S, B, M>,
    owns: &dyn Fn(usize) -> bool,
) -> OptimRecord<S, B, M>
where
    B: AutodiffBackend,
    M: AutodiffModule<B>,
    S: SimpleOptimizer<B::InnerBackend>,
{
    struct Owned<'a> {
        keep: Vec<ParamId>,
        owns: &'a dyn Fn(usize) -> bool,
        index: usize,
    }
    impl<B: AutodiffBackend> ModuleVisitor<B> for Owned<'_> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            if (self.owns)(self.index) {
                self.keep.push(param.id);
            }
            self.index += 1;
        }
    }
    let mut owned = Owned {
        keep: Vec::new(),
        owns,
        index: 0,
    };
    model.visit(&mut owned);
    record.retain(|id, _| owned.keep.contains(id));
    record
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

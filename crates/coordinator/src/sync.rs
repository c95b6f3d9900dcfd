//! The backend's own gradient synchronisation for a data-parallel group
//! (`process_group_backend = nccl`): burn-train's DDP machinery, on CUDA through
//! NCCL, in a build with the `cuda-nccl` feature.
//!
//! With it, every worker's parameters are marked as distributed (burn-train's
//! `ModuleSharder`, what its DDP strategy's `grad_sharded` does) and burn's
//! autodiff all-reduces (sums) each gradient over the group's devices during the
//! backward pass, once every device has it. kiln's own exchange then carries only
//! the step's status numbers (loss, stop, failure), through burn-collective.
//!
//! The synchronisation counts backward passes: every worker must run one for every
//! micro-batch, each covering every parameter, or the others wait for it. kiln's
//! step ([`crate::learner`]) keeps that rule: a worker with no share of a short
//! batch, or one that failed, runs a zero loss over every parameter instead.
//!
//! Generic code cannot name `DistributedBackend` (it exists only in builds where
//! burn's `distributed` feature is on, which removes autodiff from the CPU
//! backends), so the synchronisation reaches the loop as a plain function,
//! [`BackendSync`], made where the backend type is known
//! (`TrainingCoordinator::train_on_nccl`).

use burn::prelude::*;

use crate::CoordinatorError;

/// Starts the backend's gradient synchronisation for a group on the given devices.
#[cfg_attr(not(feature = "learner"), allow(dead_code))]
pub(crate) struct BackendSync<B: Backend> {
    pub start: fn(&[B::Device]) -> Result<SyncSession, CoordinatorError>,
}

impl<B: Backend> Clone for BackendSync<B> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<B: Backend> Copy for BackendSync<B> {}

/// A running synchronisation; dropping it closes it.
#[cfg_attr(not(feature = "cuda-nccl"), allow(dead_code))]
pub(crate) struct SyncSession {
    close: Option<Box<dyn FnOnce() + Send>>,
}

impl Drop for SyncSession {
    fn drop(&mut self) {
        if let Some(close) = self.close.take() {
            // Closing after a failed run must not turn the failure into a panic.
            let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(close));
        }
    }
}

/// NCCL through burn-train's DDP runtime (`ExecutionStrategy::ddp`), summing the
/// gradients (kiln weights each worker's loss by its share of the global batch).
#[cfg(feature = "cuda-nccl")]
pub(crate) fn nccl<B>() -> BackendSync<B>
where
    B: burn::tensor::backend::AutodiffBackend
        + burn::tensor::backend::distributed::DistributedBackend,
{
    fn start<B>(devices: &[B::Device]) -> Result<SyncSession, CoordinatorError>
    where
        B: burn::tensor::backend::AutodiffBackend
            + burn::tensor::backend::distributed::DistributedBackend,
    {
        use burn::tensor::backend::distributed::{DistributedConfig, ReduceOperation};
        use burn::train::ExecutionStrategy;
        let config = DistributedConfig {
            all_reduce_op: ReduceOperation::Sum,
        };
        let runtime = match ExecutionStrategy::<B>::ddp(devices.to_vec(), config) {
            ExecutionStrategy::DistributedDataParallel { runtime, .. } => runtime,
            _ => {
                return Err(CoordinatorError::NotAvailable {
                    what: "process_group_backend nccl".into(),
                    reason: "burn-train's `ExecutionStrategy::ddp` made no distributed runtime"
                        .into(),
                });
            }
        };
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| runtime.start())).map_err(
            |panic| CoordinatorError::NotAvailable {
                what: "process_group_backend nccl".into(),
                reason: format!(
                    "burn's NCCL synchronisation did not start (is libnccl installed?): {}",
                    crate::run::panic_message(panic.as_ref())
                ),
            },
        )?;
        Ok(SyncSession {
            close: Some(Box::new(move || runtime.close())),
        })
    }
    BackendSync { start: start::<B> }
}

/// Marks every parameter of `model` as synchronised by the backend (burn-train's
/// `ModuleSharder`); parameters a mapper replaced lose the mark and are marked
/// again this way.
#[cfg(feature = "cuda-nccl")]
pub(crate) fn mark<B: burn::tensor::backend::AutodiffBackend, M: Module<B>>(model: M) -> M {
    model.map(&mut burn::train::ModuleSharder)
}

/// Without `cuda-nccl` no synchronisation can be started, so nothing is marked.
#[cfg(all(feature = "learner", not(feature = "cuda-nccl")))]
pub(crate) fn mark<B: burn::tensor::backend::AutodiffBackend, M: Module<B>>(model: M) -> M {
    model
}

/// Zero times the sum of every parameter of `model` (`None` without parameters):
/// added to a loss, or standing for it, so that a backward pass covers every
/// parameter, as the backend's synchronisation needs of every worker.
#[cfg(feature = "learner")]
pub(crate) fn zero_over_params<B, M>(model: &M) -> Option<Tensor<B, 1>>
where
    B: burn::tensor::backend::AutodiffBackend,
    M: Module<B>,
{
    use burn::module::{ModuleVisitor, Param};
    struct Sum<B: Backend>(Option<Tensor<B, 1>>);
    impl<B: burn::tensor::backend::AutodiffBackend> ModuleVisitor<B> for Sum<B> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            let part = param.val().sum().mul_scalar(0.0);
            self.0 = Some(match self.0.take() {
                None => part,
                Some(sum) => sum + part,
            });
        }
    }
    let mut sum = Sum(None);
    model.visit(&mut sum);
    sum.0
}

#[cfg(all(test, feature = "learner", not(feature = "cuda-nccl")))]
mod tests {
    use super::*;
    use burn::backend::Autodiff;
    use burn::module::{ModuleVisitor, Param};
    use burn::optim::GradientsParams;
    use kiln_backend_cpu::NdArray;
    use kiln_models::TinyGptConfig;

    type B = Autodiff<NdArray>;

    /// What the NCCL synchronisation needs of a worker with nothing to train on: a
    /// backward pass that reaches every parameter, with zero gradients.
    #[test]
    fn the_zero_loss_reaches_every_parameter_with_zero_gradients() {
        struct Check<'a> {
            grads: &'a GradientsParams,
            params: usize,
            largest: f32,
        }
        impl ModuleVisitor<B> for Check<'_> {
            fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
                self.params += 1;
                let grad = self
                    .grads
                    .get::<NdArray, D>(param.id)
                    .expect("every parameter has a gradient");
                let largest = grad.abs().max().into_scalar();
                self.largest = self.largest.max(largest);
            }
        }
        let model = TinyGptConfig::tiny(65)
            .init::<B>(1, &Default::default())
            .unwrap();
        let zero = zero_over_params(&model).expect("the model has parameters");
        assert_eq!(zero.clone().into_scalar(), 0.0);
        let grads = GradientsParams::from_grads(zero.backward(), &model);
        let mut check = Check {
            grads: &grads,
            params: 0,
            largest: f32::NAN,
        };
        model.visit(&mut check);
        assert!(check.params > 10, "{} parameters", check.params);
        assert_eq!(grads.len(), check.params);
        assert_eq!(check.largest, 0.0);
    }
}

//! [`AdamW`]: burn-optim's AdamW, bit for bit, with the update fused.

use burn::module::AutodiffModule;
use burn::optim::adaptor::OptimizerAdaptor;
use burn::optim::{AdamWState, AdaptiveMomentumState, LearningRate, SimpleOptimizer};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Device, Tensor, TensorPrimitive};

use crate::adamw_step::{AdamWStep, AdamWUpdate};
use crate::dispatch;

/// AdamW (decoupled weight decay) whose step is one fused pass over each parameter
/// tensor on Flex, in place on the parameter and its moments, instead of about
/// fifteen of Burn's element-wise ops; on other backends it is Burn's ops.
///
/// It computes burn-optim 0.21's `AdamW` (without AMSGrad or cautious weight decay)
/// operation for operation, so both give the same bits, and its state is burn's
/// [`AdamWState`]: a record saved by either loads into the other. Gradient clipping
/// is the caller's (kiln's coordinator clips before the step).
///
/// ```
/// use burn::backend::{Autodiff, Flex};
/// use burn::nn::{Linear, LinearConfig};
/// use burn::optim::{GradientsParams, Optimizer};
/// use burn::prelude::*;
///
/// type B = Autodiff<Flex>;
/// let device = Default::default();
/// let model: Linear<B> = LinearConfig::new(3, 2).init(&device);
/// let mut optim = kiln_kernels::AdamW::new(0.9, 0.999, 1e-8, 0.01).init::<B, Linear<B>>();
/// let loss = model.forward(Tensor::<B, 2>::ones([4, 3], &device)).sum();
/// let grads = GradientsParams::from_grads(loss.backward(), &model);
/// let model = optim.step(1e-3, model, grads);
/// assert_eq!(model.weight.dims(), [3, 2]);
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamW {
    /// β₁, the first moment's decay.
    pub beta_1: f32,
    /// β₂, the second moment's decay.
    pub beta_2: f32,
    /// ε, added to the second moment's root.
    pub epsilon: f32,
    /// λ, the decoupled weight decay.
    pub weight_decay: f32,
}

impl AdamW {
    /// AdamW with these hyper-parameters (burn-optim's defaults are 0.9, 0.999,
    /// 1e-5 and 1e-4).
    pub fn new(beta_1: f32, beta_2: f32, epsilon: f32, weight_decay: f32) -> Self {
        Self {
            beta_1,
            beta_2,
            epsilon,
            weight_decay,
        }
    }

    /// The optimizer for module `M` on `B`, as burn-optim's `AdamWConfig::init`
    /// gives it.
    pub fn init<B: AutodiffBackend, M: AutodiffModule<B>>(&self) -> OptimizerAdaptor<Self, M, B> {
        OptimizerAdaptor::from(*self)
    }
}

impl<B: Backend> SimpleOptimizer<B> for AdamW {
    type State<const D: usize> = AdamWState<B, D>;

    fn step<const D: usize>(
        &self,
        lr: LearningRate,
        tensor: Tensor<B, D>,
        grad: Tensor<B, D>,
        state: Option<Self::State<D>>,
    ) -> (Tensor<B, D>, Option<Self::State<D>>) {
        let primitive = |t: Tensor<B, D>| t.into_primitive().tensor();
        let (time, moments) = match state {
            Some(AdamWState { momentum }) => (
                momentum.time + 1,
                Some((primitive(momentum.moment_1), primitive(momentum.moment_2))),
            ),
            None => (1, None),
        };
        let step = AdamWStep {
            lr,
            time,
            beta_1: self.beta_1,
            beta_2: self.beta_2,
            epsilon: self.epsilon,
            weight_decay: self.weight_decay,
        };
        let AdamWUpdate {
            param,
            moment_1,
            moment_2,
        } = dispatch::adamw::<B>(primitive(tensor), primitive(grad), moments, &step);
        let tensor = |p| Tensor::from_primitive(TensorPrimitive::Float(p));
        let momentum = AdaptiveMomentumState::new(time, tensor(moment_1), tensor(moment_2));
        (tensor(param), Some(AdamWState::new(momentum)))
    }

    fn to_device<const D: usize>(state: Self::State<D>, device: &Device<B>) -> Self::State<D> {
        AdamWState::new(state.momentum.to_device(device))
    }
}

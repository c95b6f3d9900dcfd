//! Layers on the fused operations.

use burn::module::Param;
use burn::prelude::*;

use crate::FusedOps;

/// Layer normalisation over the last dimension with a learned scale γ (ones at
/// first) and shift β (zeros), like `burn::nn::LayerNorm` with its bias, trained
/// through [`FusedOps::fused_layer_norm`]: one node of the autodiff graph instead of
/// about ten.
///
/// ```
/// use burn::backend::{Autodiff, Flex};
/// use burn::prelude::*;
/// use kiln_kernels::LayerNorm;
///
/// type B = Autodiff<Flex>;
/// let device = Default::default();
/// let norm = LayerNorm::<B>::new(4, 1e-5, &device);
/// let x = Tensor::<B, 2>::from_floats([[1.0, 2.0, 3.0, 4.0]], &device).require_grad();
/// let y = norm.forward(x.clone());
/// let grads = y.sum().backward();
/// assert_eq!(x.grad(&grads).unwrap().dims(), [1, 4]);
/// ```
#[derive(Module, Debug)]
pub struct LayerNorm<B: Backend> {
    /// The scale γ, `[d]`.
    pub gamma: Param<Tensor<B, 1>>,
    /// The shift β, `[d]`.
    pub beta: Param<Tensor<B, 1>>,
    epsilon: f64,
}

impl<B: Backend> LayerNorm<B> {
    /// A layer norm over `d` features, `epsilon` added to the variance.
    pub fn new(d: usize, epsilon: f64, device: &B::Device) -> Self {
        Self {
            gamma: Param::from_tensor(Tensor::ones([d], device)),
            beta: Param::from_tensor(Tensor::zeros([d], device)),
            epsilon,
        }
    }
}

impl<B: FusedOps> LayerNorm<B> {
    /// Normalises `x` over its last dimension.
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        crate::layer_norm(x, self.gamma.val(), self.beta.val(), self.epsilon)
    }
}

/// The exact GELU as a layer, through [`FusedOps::fused_gelu`].
#[derive(Module, Clone, Debug, Default)]
pub struct Gelu;

impl Gelu {
    /// Applies the GELU to every element.
    pub fn forward<B: FusedOps, const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        crate::gelu(x)
    }
}

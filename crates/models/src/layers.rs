//! Building blocks with kiln-seeded initialisation.

use burn::module::Param;
use burn::prelude::*;
use kiln_core::rng::SplitMix64;
use kiln_kernels::FusedOps;

/// Standard deviation of every weight's N(0, σ²) initialisation.
pub const INIT_STD: f64 = 0.02;

/// A fully connected layer `y = x W + b` with `W: [d_in, d_out]`, initialised
/// N(0, 0.02²) with zero bias, applied through kiln's fused linear operation
/// ([`kiln_kernels::linear`]).
#[derive(Module, Debug)]
pub struct Dense<B: Backend> {
    /// `[d_in, d_out]`.
    pub weight: Param<Tensor<B, 2>>,
    /// `[d_out]`.
    pub bias: Param<Tensor<B, 1>>,
}

impl<B: Backend> Dense<B> {
    /// A new layer with weights drawn from `rng`.
    pub fn new(d_in: usize, d_out: usize, rng: &mut SplitMix64, device: &B::Device) -> Self {
        Self {
            weight: Param::from_tensor(normal_tensor([d_in, d_out], rng, device)),
            bias: Param::from_tensor(Tensor::zeros([d_out], device)),
        }
    }
}

impl<B: FusedOps> Dense<B> {
    /// Applies the layer to `[rows, d_in]`.
    pub fn forward(&self, x: Tensor<B, 2>) -> Tensor<B, 2> {
        kiln_kernels::linear(x, self.weight.val(), self.bias.val())
    }
}

/// A tensor of N(0, [`INIT_STD`]²) values drawn from `rng`.
pub fn normal_tensor<B: Backend, const D: usize>(
    shape: [usize; D],
    rng: &mut SplitMix64,
    device: &B::Device,
) -> Tensor<B, D> {
    let n = shape.iter().product();
    Tensor::from_data(
        TensorData::new(rng.normal_vec(n, 0.0, INIT_STD), shape),
        device,
    )
}

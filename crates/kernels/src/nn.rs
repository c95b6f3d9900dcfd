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

/// A linear layer `y = x · W + b`, with the fields and the initialisation of
/// `burn::nn::Linear` (so its records load either way), trained through
/// [`FusedOps::fused_linear`]: the product and the bias are one node of the autodiff
/// graph, and on Flex the products are split across the cores by kiln
/// ([`crate::products`]). Without a bias it is Burn's `matmul`.
///
/// ```
/// use burn::backend::{Autodiff, Flex};
/// use burn::nn::LinearConfig;
/// use burn::prelude::*;
/// use kiln_kernels::Linear;
///
/// type B = Autodiff<Flex>;
/// let device = Default::default();
/// let layer = Linear::<B>::new(&LinearConfig::new(4, 2), &device);
/// let x = Tensor::<B, 3>::ones([2, 3, 4], &device).require_grad();
/// let y = layer.forward(x.clone());
/// assert_eq!(y.dims(), [2, 3, 2]);
/// let grads = y.sum().backward();
/// assert!(layer.weight.grad(&grads).is_some());
/// ```
#[derive(Module, Debug)]
pub struct Linear<B: Backend> {
    /// The weight, `[d_in, d_out]`.
    pub weight: Param<Tensor<B, 2>>,
    /// The bias, `[d_out]`.
    pub bias: Option<Param<Tensor<B, 1>>>,
}

impl<B: Backend> Linear<B> {
    /// A layer initialised exactly as `config.init(device)` initialises Burn's.
    pub fn new(config: &burn::nn::LinearConfig, device: &B::Device) -> Self {
        config.init(device).into()
    }
}

impl<B: Backend> From<burn::nn::Linear<B>> for Linear<B> {
    fn from(layer: burn::nn::Linear<B>) -> Self {
        Self {
            weight: layer.weight,
            bias: layer.bias,
        }
    }
}

impl<B: FusedOps> Linear<B> {
    /// Applies the layer over the last dimension of `x`.
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        match &self.bias {
            Some(bias) => crate::linear(x, self.weight.val(), bias.val()),
            None => x.matmul(self.weight.val().unsqueeze()),
        }
    }
}

/// Causal multi-head self-attention as a layer: query, key and value projections, the
/// fused attention ([`FusedOps::fused_causal_attention`]: per sequence and head, no
/// head split or merge copies, probabilities recomputed in the backward pass) and an
/// output projection, every projection a [`Linear`] with a bias.
///
/// ```
/// use burn::backend::{Autodiff, Flex};
/// use burn::prelude::*;
/// use kiln_kernels::CausalSelfAttention;
///
/// type B = Autodiff<Flex>;
/// let device = Default::default();
/// let attention = CausalSelfAttention::<B>::new(8, 2, &device);
/// let x = Tensor::<B, 3>::ones([2, 5, 8], &device).require_grad();
/// let y = attention.forward(x.clone());
/// assert_eq!(y.dims(), [2, 5, 8]);
/// let grads = y.sum().backward();
/// assert!(x.grad(&grads).is_some());
/// ```
#[derive(Module, Debug)]
pub struct CausalSelfAttention<B: Backend> {
    /// Query projection, `[d, d]`.
    pub query: Linear<B>,
    /// Key projection, `[d, d]`.
    pub key: Linear<B>,
    /// Value projection, `[d, d]`.
    pub value: Linear<B>,
    /// Output projection, `[d, d]`.
    pub output: Linear<B>,
    heads: usize,
}

impl<B: Backend> CausalSelfAttention<B> {
    /// Attention over `d_model` features in `heads` heads, its projections
    /// initialised as `burn::nn::LinearConfig::new(d_model, d_model)` initialises.
    ///
    /// # Panics
    /// If `heads` is 0 or does not divide `d_model`.
    pub fn new(d_model: usize, heads: usize, device: &B::Device) -> Self {
        assert!(
            heads > 0 && d_model.is_multiple_of(heads),
            "attention over {d_model} features in {heads} heads: the heads must divide the features"
        );
        let projection = || Linear::new(&burn::nn::LinearConfig::new(d_model, d_model), device);
        Self {
            query: projection(),
            key: projection(),
            value: projection(),
            output: projection(),
            heads,
        }
    }
}

impl<B: FusedOps> CausalSelfAttention<B> {
    /// Attends over `x: [b, t, d]`, each position to itself and the ones before it.
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let (q, k, v) = (
            self.query.forward(x.clone()),
            self.key.forward(x.clone()),
            self.value.forward(x),
        );
        self.output
            .forward(crate::causal_attention(q, k, v, self.heads))
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

//! [`FusedOps`]: the backend extension, one method per fused operation.

use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::ops::FloatTensor;

use crate::grads::{AttentionGrads, LayerNormGrads, LinearGrads};
use crate::reference;

/// Fused operations with hand-written backward passes: Burn's backend-extension
/// pattern.
///
/// Every method has a default built from Burn's ordinary ops, so a backend opts in
/// with an empty `impl` and gets exactly Burn's results; kiln implements it for
/// `Flex` with its own kernels ([`crate::cpu`]), for `NdArray` and CUDA with the
/// defaults, and for `Autodiff<B>` over any of them, where each operation becomes one
/// node of the graph whose backward calls the `*_backward` method of `B` (instead of
/// the five to ten nodes Burn's autodiff makes of a softmax or a layer norm).
///
/// Call them through [`crate::gelu`], [`crate::softmax`], [`crate::linear`],
/// [`crate::causal_attention`], [`crate::Linear`] and [`crate::LayerNorm`].
pub trait FusedOps: Backend {
    /// The exact GELU, `x/2 · (1 + erf(x/√2))`.
    fn fused_gelu(x: FloatTensor<Self>) -> FloatTensor<Self> {
        Self::gelu(x)
    }

    /// `grad · gelu'(x)`.
    fn fused_gelu_backward(x: FloatTensor<Self>, grad: FloatTensor<Self>) -> FloatTensor<Self> {
        Self::gelu_backward(x, grad)
    }

    /// `x · weight + bias` for `x: [rows, d_in]`, `weight: [d_in, d_out]` and
    /// `bias: [d_out]`.
    fn fused_linear(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        reference::linear::<Self>(x, weight, bias)
    }

    /// The gradients of [`FusedOps::fused_linear`] for the output gradient `grad`.
    fn fused_linear_backward(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        grad: FloatTensor<Self>,
    ) -> LinearGrads<Self> {
        reference::linear_backward::<Self>(x, weight, grad)
    }

    /// Softmax along `dim`.
    fn fused_softmax(x: FloatTensor<Self>, dim: usize) -> FloatTensor<Self> {
        Self::softmax(x, dim)
    }

    /// The input's gradient of a softmax along `dim`, from its output `y`.
    fn fused_softmax_backward(
        y: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        dim: usize,
    ) -> FloatTensor<Self> {
        reference::softmax_backward::<Self>(y, grad, dim)
    }

    /// Layer normalisation over the last dimension:
    /// `(x - mean)/√(var + ε) · γ + β`.
    fn fused_layer_norm(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        epsilon: f64,
    ) -> FloatTensor<Self> {
        Self::layer_norm(x, gamma, Some(beta), epsilon)
    }

    /// The gradients of [`FusedOps::fused_layer_norm`] for the output gradient `grad`.
    fn fused_layer_norm_backward(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        epsilon: f64,
    ) -> LayerNormGrads<Self> {
        reference::layer_norm_backward::<Self>(x, gamma, grad, epsilon)
    }

    /// Causal multi-head self-attention of queries, keys and values `[b, t, d]` split
    /// into `heads` heads of `d / heads` features: for each head,
    /// `softmax(Q Kᵀ / √(d/heads) + causal mask) V`, the heads' outputs side by side in
    /// `[b, t, d]`.
    fn fused_causal_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        heads: usize,
    ) -> FloatTensor<Self> {
        reference::causal_attention::<Self>(q, k, v, heads)
    }

    /// The gradients of [`FusedOps::fused_causal_attention`] for the output gradient
    /// `grad`.
    fn fused_causal_attention_backward(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        heads: usize,
    ) -> AttentionGrads<Self> {
        reference::causal_attention_backward::<Self>(q, k, v, grad, heads)
    }
}

/// A training backend whose validation backend has [`FusedOps`] too: the bound a
/// generic training function over a model built on the fused ops names.
///
/// ```
/// fn train<B: kiln_kernels::FusedAutodiffBackend>() {}
/// train::<burn::backend::Autodiff<burn::backend::Flex>>();
/// ```
pub trait FusedAutodiffBackend: AutodiffBackend<InnerBackend: FusedOps> + FusedOps {}

impl<B> FusedAutodiffBackend for B where B: AutodiffBackend<InnerBackend: FusedOps> + FusedOps {}

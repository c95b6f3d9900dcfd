//! [`FusedOps`]: the backend extension, one method per fused operation.

use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::ops::{FloatTensor, IntTensor};

use crate::adamw_step::{AdamWStep, AdamWUpdate};
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

    /// The GELU of `x` and what [`FusedOps::fused_gelu_backward_saved`] needs for its
    /// gradient later: `x` itself by default. Flex keeps the derivative `gelu'(x)`
    /// instead, computed with the output from the same exponential and erf, so that
    /// its backward pass is one multiplication (and `x` need not be kept).
    fn fused_gelu_saving(x: FloatTensor<Self>) -> (FloatTensor<Self>, FloatTensor<Self>) {
        (Self::fused_gelu(x.clone()), x)
    }

    /// `grad · gelu'(x)` from what [`FusedOps::fused_gelu_saving`] kept.
    fn fused_gelu_backward_saved(
        saved: FloatTensor<Self>,
        grad: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        Self::fused_gelu_backward(saved, grad)
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

    /// The mean cross-entropy of `logits` `[n, c]` against class ids `targets` `[n]`,
    /// `mean(logsumexp(row) - row[target])`, as a `[1]` tensor.
    fn fused_cross_entropy(
        logits: FloatTensor<Self>,
        targets: IntTensor<Self>,
    ) -> FloatTensor<Self> {
        reference::cross_entropy::<Self>(logits, targets)
    }

    /// The logits' gradient of [`FusedOps::fused_cross_entropy`] for the loss's
    /// gradient `grad` (`[1]`): `(softmax(row) - onehot(target)) · grad / n`.
    fn fused_cross_entropy_backward(
        logits: FloatTensor<Self>,
        targets: IntTensor<Self>,
        grad: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        reference::cross_entropy_backward::<Self>(logits, targets, grad)
    }

    /// One AdamW step of a parameter tensor from its gradient and its moments
    /// (`None` on its first step), burn-optim's `AdamW` bit for bit
    /// ([`AdamWStep`]); [`crate::AdamW`] is the optimizer that calls it.
    fn fused_adamw(
        param: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        moments: Option<(FloatTensor<Self>, FloatTensor<Self>)>,
        step: &AdamWStep,
    ) -> AdamWUpdate<Self> {
        reference::adamw::<Self>(param, grad, moments, step)
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

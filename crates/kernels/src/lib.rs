//! Fused operations for kiln's models, through Burn's backend-extension mechanism.
//!
//! Burn's autodiff builds a softmax from five element-wise nodes and a layer norm
//! from about ten, each with its own backward pass and temporary tensors, and Burn's
//! Flex CPU backend computes the exact GELU one element at a time with libm's `erff`.
//! [`FusedOps`] gives each of them one node with a hand-written backward pass:
//!
//! - **Every backend** works: the trait's default methods are Burn's own ops, so on
//!   NdArray and CUDA the results are Burn's.
//! - **`Autodiff<B>`** makes each op one graph node whose backward pass is `B`'s
//!   fused backward ([`autodiff`]).
//! - **Flex** runs [`cpu`]'s kernels on f32: a vectorised exact GELU that keeps its
//!   derivative for the backward pass, the softmax, layer-norm and cross-entropy
//!   backward passes, causal attention and the linear layer's products, split across
//!   the cores in fixed-size pieces, so that results never depend on the thread
//!   count.
//!
//! Two work from code generic over any backend, as kiln's coordinator is: the loss
//! [`cross_entropy`] and the optimizer [`AdamW`] (burn-optim's AdamW bit for bit,
//! its update one in-place pass on Flex) find Flex's kernels by type at run time.
//!
//! Use them through [`gelu`], [`softmax`], [`cross_entropy`], [`LayerNorm`],
//! [`Linear`], [`CausalSelfAttention`], [`Gelu`] and [`AdamW`]:
//!
//! ```
//! use burn::backend::{Autodiff, Flex};
//! use burn::prelude::*;
//!
//! type B = Autodiff<Flex>;
//! let x = Tensor::<B, 2>::from_floats([[-1.0, 0.0, 2.0]], &Default::default()).require_grad();
//! let y = kiln_kernels::softmax(kiln_kernels::gelu(x.clone()), 1);
//! let grads = (y * 3.0).sum().backward();
//! assert!(x.grad(&grads).is_some());
//! ```
//!
//! Each backend's `impl` lives here (the orphan rule wants the trait's crate); the
//! cargo features `flex`, `ndarray` and `cuda` choose which are built.

mod adamw_step;
mod autodiff;
mod backends;
#[cfg(feature = "flex")]
pub mod cpu;
mod dispatch;
#[cfg(feature = "flex")]
mod flex;
#[cfg(feature = "flex")]
pub mod gemm;
mod grads;
pub mod math;
mod nn;
mod ops;
mod optim;
#[cfg(feature = "flex")]
pub mod products;
pub mod reference;

use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorPrimitive};

pub use adamw_step::{AdamWStep, AdamWUpdate};
pub use grads::{AttentionGrads, LayerNormGrads, LinearGrads};
pub use nn::{CausalSelfAttention, Gelu, LayerNorm, Linear};
pub use ops::{FusedAutodiffBackend, FusedOps};
pub use optim::AdamW;

/// The exact GELU of every element, `x/2 · (1 + erf(x/√2))`.
pub fn gelu<B: FusedOps, const D: usize>(x: Tensor<B, D>) -> Tensor<B, D> {
    Tensor::from_primitive(TensorPrimitive::Float(B::fused_gelu(
        x.into_primitive().tensor(),
    )))
}

/// `x · weight + bias` over the last dimension of `x` (`[..., d_in]`), with
/// `weight: [d_in, d_out]` and `bias: [d_out]`: the product of `burn::nn::Linear`, as
/// one node of the autodiff graph.
///
/// # Panics
/// If the last dimension of `x` is not `d_in` or the bias is not `d_out` long.
pub fn linear<B: FusedOps, const D: usize>(
    x: Tensor<B, D>,
    weight: Tensor<B, 2>,
    bias: Tensor<B, 1>,
) -> Tensor<B, D> {
    let dims = x.dims();
    let [d_in, d_out] = weight.dims();
    assert!(
        D > 0 && dims[D - 1] == d_in && bias.dims() == [d_out],
        "a linear layer of weight [{d_in}, {d_out}] and bias {:?} on an input {dims:?}",
        bias.dims()
    );
    let rows = dims[..D - 1].iter().product();
    let y = B::fused_linear(
        x.reshape([rows, d_in]).into_primitive().tensor(),
        weight.into_primitive().tensor(),
        bias.into_primitive().tensor(),
    );
    let mut out_dims = dims;
    out_dims[D - 1] = d_out;
    Tensor::<B, 2>::from_primitive(TensorPrimitive::Float(y)).reshape(out_dims)
}

/// Softmax along `dim`.
///
/// # Panics
/// If `dim` is not below `D`, as Burn's own softmax does.
pub fn softmax<B: FusedOps, const D: usize>(x: Tensor<B, D>, dim: usize) -> Tensor<B, D> {
    assert!(
        dim < D,
        "softmax along dimension {dim} of a {D}-dimensional tensor"
    );
    Tensor::from_primitive(TensorPrimitive::Float(B::fused_softmax(
        x.into_primitive().tensor(),
        dim,
    )))
}

/// The mean cross-entropy of `logits` `[n, classes]` against class ids `targets`
/// `[n]`, `mean(logsumexp(row) - row[target])`, as a `[1]` tensor: what
/// `burn::nn::loss::CrossEntropyLoss` computes without smoothing or weights.
///
/// Generic over any backend: on `Autodiff<Flex>` it is one node of the graph with a
/// fused backward (`softmax - onehot`, in place on the logits), on `Flex` a fused
/// forward, elsewhere Burn's `log_softmax` and `gather`.
///
/// ```
/// use burn::backend::{Autodiff, Flex};
/// use burn::prelude::*;
///
/// type B = Autodiff<Flex>;
/// let device = Default::default();
/// let logits = Tensor::<B, 2>::zeros([2, 4], &device).require_grad();
/// let targets = Tensor::<B, 1, Int>::from_ints([0, 3], &device);
/// let loss = kiln_kernels::cross_entropy(logits.clone(), targets);
/// assert!((loss.clone().into_scalar() - 4f32.ln()).abs() < 1e-6);
/// let grads = loss.backward();
/// assert_eq!(logits.grad(&grads).unwrap().dims(), [2, 4]);
/// ```
///
/// # Panics
/// If `targets` is not as long as `logits` has rows, or (on Flex) a class id is out
/// of range.
pub fn cross_entropy<B: Backend>(logits: Tensor<B, 2>, targets: Tensor<B, 1, Int>) -> Tensor<B, 1> {
    let ([n, _], [m]) = (logits.dims(), targets.dims());
    assert_eq!(
        n, m,
        "cross-entropy of {n} rows of logits against {m} class ids"
    );
    Tensor::from_primitive(TensorPrimitive::Float(dispatch::cross_entropy::<B>(
        logits.into_primitive().tensor(),
        targets.into_primitive(),
    )))
}

/// Layer normalisation of `x` over its last dimension with scale `gamma` and shift
/// `beta` (both `[d]`): `(x - mean)/√(var + ε) · γ + β`.
pub fn layer_norm<B: FusedOps, const D: usize>(
    x: Tensor<B, D>,
    gamma: Tensor<B, 1>,
    beta: Tensor<B, 1>,
    epsilon: f64,
) -> Tensor<B, D> {
    Tensor::from_primitive(TensorPrimitive::Float(B::fused_layer_norm(
        x.into_primitive().tensor(),
        gamma.into_primitive().tensor(),
        beta.into_primitive().tensor(),
        epsilon,
    )))
}

/// Causal multi-head self-attention of queries, keys and values `[b, t, d]` in
/// `heads` heads: for each head `softmax(Q Kᵀ / √(d/heads) + causal mask) V`, the
/// heads' outputs side by side, `[b, t, d]`.
///
/// # Panics
/// If the three shapes differ or `heads` does not divide `d`.
pub fn causal_attention<B: FusedOps>(
    q: Tensor<B, 3>,
    k: Tensor<B, 3>,
    v: Tensor<B, 3>,
    heads: usize,
) -> Tensor<B, 3> {
    let [_, _, d] = q.dims();
    assert!(
        q.dims() == k.dims() && k.dims() == v.dims(),
        "attention of queries {:?}, keys {:?} and values {:?}: the shapes must agree",
        q.dims(),
        k.dims(),
        v.dims()
    );
    assert!(
        heads > 0 && d % heads == 0,
        "attention over {d} features in {heads} heads: the heads must divide the features"
    );
    Tensor::from_primitive(TensorPrimitive::Float(B::fused_causal_attention(
        q.into_primitive().tensor(),
        k.into_primitive().tensor(),
        v.into_primitive().tensor(),
        heads,
    )))
}

#[cfg(test)]
mod tests;

//! The backward passes in Burn's ordinary ops: the defaults of [`crate::FusedOps`],
//! and what a fused kernel falls back to for a dtype or layout it does not cover.

use burn::tensor::activation::{log_softmax, softmax};
use burn::tensor::backend::Backend;
use burn::tensor::ops::{FloatTensor, IntTensor};
use burn::tensor::{Bool, Int, Tensor, TensorMetadata, TensorPrimitive};

use crate::adamw_step::{AdamWStep, AdamWUpdate};
use crate::grads::{AttentionGrads, LayerNormGrads, LinearGrads};

fn wrap<B: Backend, const D: usize>(primitive: FloatTensor<B>) -> Tensor<B, D> {
    Tensor::from_primitive(TensorPrimitive::Float(primitive))
}

fn unwrap<B: Backend, const D: usize>(tensor: Tensor<B, D>) -> FloatTensor<B> {
    tensor.into_primitive().tensor()
}

/// `x · weight + bias`, as `burn::nn::Linear` computes it.
pub fn linear<B: Backend>(
    x: FloatTensor<B>,
    weight: FloatTensor<B>,
    bias: FloatTensor<B>,
) -> FloatTensor<B> {
    let x: Tensor<B, 2> = wrap(x);
    let bias: Tensor<B, 1> = wrap(bias);
    unwrap(x.matmul(wrap(weight)) + bias.unsqueeze::<2>())
}

/// `dx = grad · weightᵀ`, `dweight = xᵀ · grad`, `dbias = Σ_rows grad`.
pub fn linear_backward<B: Backend>(
    x: FloatTensor<B>,
    weight: FloatTensor<B>,
    grad: FloatTensor<B>,
) -> LinearGrads<B> {
    let (x, weight, grad): (Tensor<B, 2>, Tensor<B, 2>, Tensor<B, 2>) =
        (wrap(x), wrap(weight), wrap(grad));
    let d_out = grad.dims()[1];
    LinearGrads {
        x: unwrap(grad.clone().matmul(weight.transpose())),
        weight: unwrap(x.transpose().matmul(grad.clone())),
        bias: unwrap(grad.sum_dim(0).reshape([d_out])),
    }
}

/// `dx = y · (g - Σ_dim g·y)`.
pub fn softmax_backward<B: Backend>(
    y: FloatTensor<B>,
    grad: FloatTensor<B>,
    dim: usize,
) -> FloatTensor<B> {
    let s = B::float_sum_dim(B::float_mul(grad.clone(), y.clone()), dim);
    B::float_mul(y, B::float_sub(grad, s))
}

/// The gradients of a layer norm over the last dimension, with the input flattened to
/// rows: `dx = rstd · (g - mean(g) - x̂ · mean(g · x̂))` with `g = grad · γ`,
/// `dγ = Σ grad · x̂`, `dβ = Σ grad`.
pub fn layer_norm_backward<B: Backend>(
    x: FloatTensor<B>,
    gamma: FloatTensor<B>,
    grad: FloatTensor<B>,
    epsilon: f64,
) -> LayerNormGrads<B> {
    let shape = x.shape();
    let width = shape[shape.num_dims() - 1];
    let rows = shape.num_elements() / width.max(1);
    let flat =
        |t: FloatTensor<B>| -> Tensor<B, 2> { wrap(B::float_reshape(t, [rows, width].into())) };
    let x = flat(x);
    let grad = flat(grad);
    let gamma: Tensor<B, 1> = wrap(gamma);

    let centered = x.clone() - x.mean_dim(1);
    let var = (centered.clone() * centered.clone()).mean_dim(1);
    // Divisions, not `recip`: NdArray's SIMD reciprocal is an approximation
    // (about 12 bits), which showed as 4e-4 relative errors in γ's gradient.
    let std = (var + epsilon).sqrt();
    let xhat = centered / std.clone();
    let g = grad.clone() * gamma.unsqueeze::<2>();
    let mean_g = g.clone().mean_dim(1);
    let mean_gx = (g.clone() * xhat.clone()).mean_dim(1);
    let dx = (g - mean_g - xhat.clone() * mean_gx) / std;
    LayerNormGrads {
        x: B::float_reshape(unwrap(dx), shape),
        gamma: unwrap((grad.clone() * xhat).sum_dim(0).reshape([width])),
        beta: unwrap(grad.sum_dim(0).reshape([width])),
    }
}

/// `[b, t, d]` as `[b, heads, t, d / heads]`.
fn split_heads<B: Backend>(x: FloatTensor<B>, heads: usize) -> Tensor<B, 4> {
    let shape = x.shape();
    let (b, t, d) = (shape[0], shape[1], shape[2]);
    wrap::<B, 3>(x)
        .reshape([b, t, heads, d / heads])
        .swap_dims(1, 2)
}

/// `[b, heads, t, hd]` back to `[b, t, heads · hd]`.
fn merge_heads<B: Backend>(x: Tensor<B, 4>) -> FloatTensor<B> {
    let [b, heads, t, hd] = x.dims();
    unwrap(x.swap_dims(1, 2).reshape([b, t, heads * hd]))
}

/// The causal attention probabilities `softmax(Q Kᵀ / √hd)` of `[b, h, t, hd]` queries
/// and keys, every key after its query masked out (a mask built on the device).
fn probabilities<B: Backend>(q: Tensor<B, 4>, k: Tensor<B, 4>) -> Tensor<B, 4> {
    let [_, _, t, hd] = q.dims();
    let later = Tensor::<B, 2, Bool>::tril_mask([t, t], 0, &q.device());
    let scores = q
        .matmul(k.swap_dims(2, 3))
        .mul_scalar(1.0 / (hd as f64).sqrt())
        .mask_fill(later.unsqueeze::<4>(), f32::NEG_INFINITY);
    wrap(B::softmax(unwrap(scores), 3))
}

/// Causal multi-head self-attention in Burn's ops (reshapes, matmuls, softmax).
pub fn causal_attention<B: Backend>(
    q: FloatTensor<B>,
    k: FloatTensor<B>,
    v: FloatTensor<B>,
    heads: usize,
) -> FloatTensor<B> {
    let p = probabilities(split_heads::<B>(q, heads), split_heads::<B>(k, heads));
    merge_heads(p.matmul(split_heads::<B>(v, heads)))
}

/// The gradients of [`causal_attention`], the probabilities recomputed:
/// `dV = Pᵀ dO`, `dS = P ∘ (dO Vᵀ - Σ (dO Vᵀ)·P)`, `dQ = dS K / √hd`, `dK = dSᵀ Q / √hd`.
pub fn causal_attention_backward<B: Backend>(
    q: FloatTensor<B>,
    k: FloatTensor<B>,
    v: FloatTensor<B>,
    grad: FloatTensor<B>,
    heads: usize,
) -> AttentionGrads<B> {
    let split = |x| split_heads::<B>(x, heads);
    let (q, k, v, grad) = (split(q), split(k), split(v), split(grad));
    let [.., hd] = q.dims();
    let scale = 1.0 / (hd as f64).sqrt();
    let p = probabilities(q.clone(), k.clone());
    let dv = p.clone().swap_dims(2, 3).matmul(grad.clone());
    let dp = grad.matmul(v.swap_dims(2, 3));
    let ds = p.clone() * (dp.clone() - (dp * p).sum_dim(3));
    AttentionGrads {
        q: merge_heads(ds.clone().matmul(k).mul_scalar(scale)),
        k: merge_heads(ds.swap_dims(2, 3).matmul(q).mul_scalar(scale)),
        v: merge_heads(dv),
    }
}

/// One AdamW step in Burn's ops, in burn-optim 0.21's order of operations (so the
/// same bits as its `AdamW`): the moments (`None` on the first step, where they
/// start from the gradient alone), their bias corrections, the decay, the update.
pub fn adamw<B: Backend>(
    param: FloatTensor<B>,
    grad: FloatTensor<B>,
    moments: Option<(FloatTensor<B>, FloatTensor<B>)>,
    step: &AdamWStep,
) -> AdamWUpdate<B> {
    let c = step.coefficients();
    // Every op here is element-wise, so the tensors are wrapped as rank 1 whatever
    // their rank: Burn's element-wise ops keep the primitive's shape.
    let grad: Tensor<B, 1> = wrap(grad);
    let (m, v) = match moments {
        Some((m, v)) => (
            wrap::<B, 1>(m)
                .mul_scalar(c.beta_1)
                .add(grad.clone().mul_scalar(c.factor_1)),
            wrap::<B, 1>(v)
                .mul_scalar(c.beta_2)
                .add(grad.square().mul_scalar(c.factor_2)),
        ),
        None => (
            grad.clone().mul_scalar(c.factor_1),
            grad.square().mul_scalar(c.factor_2),
        ),
    };
    let m_hat = m.clone().div_scalar(c.correction_1);
    let v_hat = v.clone().div_scalar(c.correction_2);
    let delta = m_hat.div(v_hat.sqrt().add_scalar(c.epsilon));
    let param: Tensor<B, 1> = wrap(param);
    let param = match c.decay {
        Some(decay) => param.mul_scalar(decay),
        None => param,
    };
    AdamWUpdate {
        param: unwrap(param - delta.mul_scalar(c.lr)),
        moment_1: unwrap(m),
        moment_2: unwrap(v),
    }
}

/// The mean cross-entropy of logits `[n, c]` against class ids `[n]` in Burn's ops:
/// `-mean(gather(log_softmax(logits), targets))`.
pub fn cross_entropy<B: Backend>(logits: FloatTensor<B>, targets: IntTensor<B>) -> FloatTensor<B> {
    let logits: Tensor<B, 2> = wrap(logits);
    let [n, _] = logits.dims();
    let targets = Tensor::<B, 1, Int>::from_primitive(targets).reshape([n, 1]);
    unwrap(log_softmax(logits, 1).gather(1, targets).mean().neg())
}

/// The logits' gradient of [`cross_entropy`]: `(softmax(row) - onehot(target)) ·
/// grad / n`.
pub fn cross_entropy_backward<B: Backend>(
    logits: FloatTensor<B>,
    targets: IntTensor<B>,
    grad: FloatTensor<B>,
) -> FloatTensor<B> {
    let logits: Tensor<B, 2> = wrap(logits);
    let [n, c] = logits.dims();
    let device = logits.device();
    let targets = Tensor::<B, 1, Int>::from_primitive(targets)
        .reshape([n, 1])
        .expand([n, c]);
    let hits = Tensor::<B, 1, Int>::arange(0..c as i64, &device)
        .reshape([1, c])
        .expand([n, c])
        .equal(targets);
    let scale = wrap::<B, 1>(grad).div_scalar(n as f64).reshape([1, 1]);
    unwrap((softmax(logits, 1) - hits.float()) * scale.expand([n, c]))
}

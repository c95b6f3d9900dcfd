//! What a fused operation's backward pass returns when it has several inputs.

use burn::tensor::backend::Backend;
use burn::tensor::ops::FloatTensor;

/// The gradients of a layer normalisation: of its input, its scale γ and its shift β.
#[derive(Debug, Clone)]
pub struct LayerNormGrads<B: Backend> {
    /// Gradient of the input, shaped like it.
    pub x: FloatTensor<B>,
    /// Gradient of γ, `[d]`.
    pub gamma: FloatTensor<B>,
    /// Gradient of β, `[d]`.
    pub beta: FloatTensor<B>,
}

/// The gradients of a causal self-attention: of its queries, keys and values.
#[derive(Debug, Clone)]
pub struct AttentionGrads<B: Backend> {
    /// Gradient of the queries, `[b, t, d]`.
    pub q: FloatTensor<B>,
    /// Gradient of the keys, `[b, t, d]`.
    pub k: FloatTensor<B>,
    /// Gradient of the values, `[b, t, d]`.
    pub v: FloatTensor<B>,
}

/// The gradients of a linear layer: of its input, its weight and its bias.
#[derive(Debug, Clone)]
pub struct LinearGrads<B: Backend> {
    /// Gradient of the input, `[rows, d_in]`.
    pub x: FloatTensor<B>,
    /// Gradient of the weight, `[d_in, d_out]`.
    pub weight: FloatTensor<B>,
    /// Gradient of the bias, `[d_out]`.
    pub bias: FloatTensor<B>,
}

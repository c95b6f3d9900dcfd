//! [`FusedOps`] for Burn's Flex backend: [`crate::cpu`]'s kernels on f32 tensors.
//!
//! The forward passes of the softmax and the layer norm are Flex's own fused kernels
//! (SIMD, split across rows); what Flex lacks is the exact GELU in SIMD and the two
//! backward passes, which Burn's autodiff would otherwise build from five to ten
//! element-wise ops each. Other dtypes (bf16, f16 under a mixed precision) take the
//! trait's defaults.

use burn::tensor::ops::ActivationOps;
use burn::tensor::{DType, TensorData, TensorMetadata};
use burn_flex::{Flex, FlexTensor};

use crate::cpu::{self, AttentionShape};
use crate::grads::{AttentionGrads, LayerNormGrads};
use crate::ops::FusedOps;
use crate::reference;

/// `tensor` as one contiguous f32 buffer, or `None` for another dtype.
fn contiguous_f32(tensor: &FlexTensor) -> Option<FlexTensor> {
    (tensor.dtype() == DType::F32).then(|| tensor.to_contiguous())
}

/// The elements of a tensor from [`contiguous_f32`].
fn values(tensor: &FlexTensor) -> &[f32] {
    tensor
        .as_slice::<f32>()
        .unwrap_or_else(|| unreachable!("contiguous_f32 made the tensor contiguous f32"))
}

/// A new f32 tensor of `shape` holding `values`.
fn tensor(values: Vec<f32>, shape: burn::tensor::Shape) -> FlexTensor {
    FlexTensor::from_data(TensorData::new(values, shape))
}

impl FusedOps for Flex {
    fn fused_gelu(x: FlexTensor) -> FlexTensor {
        let Some(x) = contiguous_f32(&x) else {
            return Flex::gelu(x);
        };
        let x_values = values(&x);
        let mut out = vec![0.0; x_values.len()];
        cpu::gelu(x_values, &mut out);
        tensor(out, x.shape())
    }

    fn fused_gelu_backward(x: FlexTensor, grad: FlexTensor) -> FlexTensor {
        let (Some(x), Some(grad)) = (contiguous_f32(&x), contiguous_f32(&grad)) else {
            return Flex::gelu_backward(x, grad);
        };
        let mut out = vec![0.0; values(&x).len()];
        cpu::gelu_backward(values(&x), values(&grad), &mut out);
        tensor(out, x.shape())
    }

    fn fused_softmax_backward(y: FlexTensor, grad: FlexTensor, dim: usize) -> FlexTensor {
        let shape = y.shape();
        let last = shape.num_dims().saturating_sub(1);
        let (true, Some(y), Some(grad)) = (dim == last, contiguous_f32(&y), contiguous_f32(&grad))
        else {
            return reference::softmax_backward::<Flex>(y, grad, dim);
        };
        let mut out = vec![0.0; values(&y).len()];
        cpu::softmax_backward(values(&y), values(&grad), shape[last], &mut out);
        tensor(out, shape)
    }

    fn fused_layer_norm_backward(
        x: FlexTensor,
        gamma: FlexTensor,
        grad: FlexTensor,
        epsilon: f64,
    ) -> LayerNormGrads<Flex> {
        let (Some(x), Some(gamma), Some(grad)) = (
            contiguous_f32(&x),
            contiguous_f32(&gamma),
            contiguous_f32(&grad),
        ) else {
            return reference::layer_norm_backward::<Flex>(x, gamma, grad, epsilon);
        };
        let mut dx = vec![0.0; values(&x).len()];
        let (dgamma, dbeta) = cpu::layer_norm_backward(
            values(&x),
            values(&gamma),
            values(&grad),
            epsilon as f32,
            &mut dx,
        );
        LayerNormGrads {
            x: tensor(dx, x.shape()),
            gamma: tensor(dgamma, gamma.shape()),
            beta: tensor(dbeta, gamma.shape()),
        }
    }

    fn fused_causal_attention(
        q: FlexTensor,
        k: FlexTensor,
        v: FlexTensor,
        heads: usize,
    ) -> FlexTensor {
        let (Some(q), Some(k), Some(v)) =
            (contiguous_f32(&q), contiguous_f32(&k), contiguous_f32(&v))
        else {
            return reference::causal_attention::<Flex>(q, k, v, heads);
        };
        let shape = q.shape();
        let mut out = vec![0.0; values(&q).len()];
        let dims = AttentionShape {
            t: shape[1],
            d: shape[2],
            heads,
        };
        cpu::causal_attention(values(&q), values(&k), values(&v), dims, &mut out);
        tensor(out, shape)
    }

    fn fused_causal_attention_backward(
        q: FlexTensor,
        k: FlexTensor,
        v: FlexTensor,
        grad: FlexTensor,
        heads: usize,
    ) -> AttentionGrads<Flex> {
        let (Some(q), Some(k), Some(v), Some(grad)) = (
            contiguous_f32(&q),
            contiguous_f32(&k),
            contiguous_f32(&v),
            contiguous_f32(&grad),
        ) else {
            return reference::causal_attention_backward::<Flex>(q, k, v, grad, heads);
        };
        let shape = q.shape();
        let n = values(&q).len();
        let (mut dq, mut dk, mut dv) = (vec![0.0; n], vec![0.0; n], vec![0.0; n]);
        let dims = AttentionShape {
            t: shape[1],
            d: shape[2],
            heads,
        };
        let (qv, kv, vv) = (values(&q), values(&k), values(&v));
        cpu::causal_attention_backward(qv, kv, vv, values(&grad), dims, &mut dq, &mut dk, &mut dv);
        AttentionGrads {
            q: tensor(dq, shape.clone()),
            k: tensor(dk, shape.clone()),
            v: tensor(dv, shape),
        }
    }
}

//! [`FusedOps`] for Burn's Flex backend: [`crate::cpu`]'s kernels on f32 tensors.
//!
//! The forward passes of the softmax and the layer norm are Flex's own fused kernels
//! (SIMD, split across rows); what Flex lacks is the exact GELU in SIMD and the two
//! backward passes, which Burn's autodiff would otherwise build from five to ten
//! element-wise ops each. Other dtypes (bf16, f16 under a mixed precision) take the
//! trait's defaults.

use burn::tensor::ops::{ActivationOps, FloatTensorOps};
use burn::tensor::{DType, TensorData, TensorMetadata};
use burn_flex::{Flex, FlexTensor};

use crate::adamw_step::{AdamWStep, AdamWUpdate};
use crate::cpu::{self, AttentionShape};
use crate::grads::{AttentionGrads, LayerNormGrads, LinearGrads};
use crate::ops::FusedOps;
use crate::products::{self, LinearShape};
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

/// An f32 `tensor` as a contiguous tensor whose buffer it owns alone (copied if it
/// is shared), for a kernel to overwrite in place.
fn owned(tensor: FlexTensor) -> FlexTensor {
    let whole = tensor.is_contiguous()
        && tensor.layout().start_offset() == 0
        && tensor.storage::<f32>().len() == tensor.shape().num_elements();
    let mut tensor = if whole {
        tensor
    } else {
        tensor.to_contiguous()
    };
    // Copy on write: a no-op for the gradients autodiff hands over, held nowhere else.
    tensor.storage_mut::<f32>();
    tensor
}

/// The elements of a tensor from [`owned`], to overwrite.
fn values_mut(tensor: &mut FlexTensor) -> &mut [f32] {
    tensor.storage_mut::<f32>()
}

/// A new f32 tensor of `shape` holding `values`.
fn tensor(values: Vec<f32>, shape: burn::tensor::Shape) -> FlexTensor {
    FlexTensor::from_data(TensorData::new(values, shape))
}

/// The shape of `x · w` for `x: [rows, d_in]` and `w: [d_in, d_out]`.
fn linear_shape(x: &FlexTensor, w: &FlexTensor) -> LinearShape {
    let (x, w) = (x.shape(), w.shape());
    LinearShape {
        rows: x[0],
        d_in: x[1],
        d_out: w[1],
    }
}

/// The class ids of an int tensor `[n]`, each below `classes`.
///
/// # Panics
/// On an id out of range, naming it (Burn's `gather` would read past the row).
fn class_ids(targets: FlexTensor, classes: usize) -> Vec<usize> {
    let ids = targets
        .into_data()
        .convert::<i64>()
        .to_vec::<i64>()
        .unwrap_or_else(|e| unreachable!("converted to i64 just before: {e:?}"));
    ids.into_iter()
        .map(|id| match usize::try_from(id) {
            Ok(id) if id < classes => id,
            _ => panic!("class id {id} is out of range: the logits have {classes} classes (ids 0..{classes})"),
        })
        .collect()
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
        if x.dtype() != DType::F32 || grad.dtype() != DType::F32 {
            return Flex::gelu_backward(x, grad);
        }
        let (x, mut grad) = (x.to_contiguous(), owned(grad));
        cpu::gelu_backward(values(&x), values_mut(&mut grad));
        grad
    }

    /// On f32 the derivative is kept, on other dtypes the input (the defaults):
    /// [`FusedOps::fused_gelu_backward_saved`] tells them apart by dtype.
    fn fused_gelu_saving(x: FlexTensor) -> (FlexTensor, FlexTensor) {
        let Some(x) = contiguous_f32(&x) else {
            return (Flex::gelu(x.clone()), x);
        };
        let x_values = values(&x);
        let (mut out, mut slope) = (vec![0.0; x_values.len()], vec![0.0; x_values.len()]);
        cpu::gelu_and_slope(x_values, &mut out, &mut slope);
        (tensor(out, x.shape()), tensor(slope, x.shape()))
    }

    fn fused_gelu_backward_saved(saved: FlexTensor, grad: FlexTensor) -> FlexTensor {
        if saved.dtype() != DType::F32 {
            return Flex::gelu_backward(saved, grad);
        }
        let dtype = grad.dtype();
        if dtype != DType::F32 {
            return Flex::float_mul(grad, Flex::float_cast(saved, dtype.into()));
        }
        let (slope, mut grad) = (saved.to_contiguous(), owned(grad));
        cpu::multiply(values_mut(&mut grad), values(&slope));
        grad
    }

    fn fused_linear(x: FlexTensor, weight: FlexTensor, bias: FlexTensor) -> FlexTensor {
        let (Some(x), Some(w), Some(b)) = (
            contiguous_f32(&x),
            contiguous_f32(&weight),
            contiguous_f32(&bias),
        ) else {
            return reference::linear::<Flex>(x, weight, bias);
        };
        let shape = linear_shape(&x, &w);
        let out = products::linear(values(&x), values(&w), values(&b), shape);
        tensor(out, [shape.rows, shape.d_out].into())
    }

    fn fused_linear_backward(
        x: FlexTensor,
        weight: FlexTensor,
        grad: FlexTensor,
    ) -> LinearGrads<Flex> {
        if [&x, &weight, &grad].iter().any(|t| t.dtype() != DType::F32) {
            return reference::linear_backward::<Flex>(x, weight, grad);
        }
        let (w, g) = (weight.to_contiguous(), grad.to_contiguous());
        let mut dx = owned(x);
        let shape = linear_shape(&dx, &w);
        let (dw, db) =
            products::linear_backward(values_mut(&mut dx), values(&w), values(&g), shape);
        LinearGrads {
            x: dx,
            weight: tensor(dw, w.shape()),
            bias: tensor(db, [shape.d_out].into()),
        }
    }

    fn fused_softmax_backward(y: FlexTensor, grad: FlexTensor, dim: usize) -> FlexTensor {
        let shape = y.shape();
        let last = shape.num_dims().saturating_sub(1);
        if dim != last || y.dtype() != DType::F32 || grad.dtype() != DType::F32 {
            return reference::softmax_backward::<Flex>(y, grad, dim);
        }
        let (y, mut grad) = (y.to_contiguous(), owned(grad));
        cpu::softmax_backward(values(&y), values_mut(&mut grad), shape[last]);
        grad
    }

    fn fused_layer_norm_backward(
        x: FlexTensor,
        gamma: FlexTensor,
        grad: FlexTensor,
        epsilon: f64,
    ) -> LayerNormGrads<Flex> {
        if [&x, &gamma, &grad].iter().any(|t| t.dtype() != DType::F32) {
            return reference::layer_norm_backward::<Flex>(x, gamma, grad, epsilon);
        }
        let (x, gamma, mut dx) = (x.to_contiguous(), gamma.to_contiguous(), owned(grad));
        let (dgamma, dbeta) = cpu::layer_norm_backward(
            values(&x),
            values(&gamma),
            values_mut(&mut dx),
            epsilon as f32,
        );
        LayerNormGrads {
            x: dx,
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

    fn fused_cross_entropy(logits: FlexTensor, targets: FlexTensor) -> FlexTensor {
        let Some(logits) = contiguous_f32(&logits) else {
            return reference::cross_entropy::<Flex>(logits, targets);
        };
        let classes = logits.shape()[1];
        let ids = class_ids(targets, classes);
        let loss = cpu::cross_entropy(values(&logits), &ids, classes);
        tensor(vec![loss], [1].into())
    }

    fn fused_cross_entropy_backward(
        logits: FlexTensor,
        targets: FlexTensor,
        grad: FlexTensor,
    ) -> FlexTensor {
        if logits.dtype() != DType::F32 || grad.dtype() != DType::F32 {
            return reference::cross_entropy_backward::<Flex>(logits, targets, grad);
        }
        let grad = grad.to_contiguous();
        let mut logits = owned(logits);
        let classes = logits.shape()[1];
        let ids = class_ids(targets, classes);
        let scale = values(&grad)[0] / ids.len().max(1) as f32;
        cpu::cross_entropy_backward(values_mut(&mut logits), &ids, classes, scale);
        logits
    }

    fn fused_adamw(
        param: FlexTensor,
        grad: FlexTensor,
        moments: Option<(FlexTensor, FlexTensor)>,
        step: &AdamWStep,
    ) -> AdamWUpdate<Flex> {
        let f32s = |t: &FlexTensor| t.dtype() == DType::F32;
        if !(f32s(&param)
            && f32s(&grad)
            && moments.as_ref().is_none_or(|(m, v)| f32s(m) && f32s(v)))
        {
            return reference::adamw::<Flex>(param, grad, moments, step);
        }
        let grad = grad.to_contiguous();
        let mut param = owned(param);
        let first = moments.is_none();
        let (mut m, mut v) = match moments {
            Some((m, v)) => (owned(m), owned(v)),
            None => {
                let zeros = || tensor(vec![0.0; values(&grad).len()], param.shape());
                (zeros(), zeros())
            }
        };
        cpu::adamw(
            values_mut(&mut param),
            values(&grad),
            values_mut(&mut m),
            values_mut(&mut v),
            step.coefficients(),
            first,
        );
        AdamWUpdate {
            param,
            moment_1: m,
            moment_2: v,
        }
    }
}

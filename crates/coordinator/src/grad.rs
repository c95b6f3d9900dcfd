//! Gradient post-processing: global-norm clipping and scaling.
//!
//! Burn's `GradientClippingConfig::Norm` clips each parameter tensor on its own;
//! Lightning's `gradient_clip_val` (and PyTorch's `clip_grad_norm_`) clip the norm
//! of all gradients taken together. kiln does the latter.

use burn::module::{AutodiffModule, ModuleVisitor, Param};
use burn::optim::GradientsParams;
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{DType, FloatDType};

/// The global L2 norm of `grads` over the parameters of `model`.
pub(crate) fn global_norm<B: AutodiffBackend, M: AutodiffModule<B>>(
    model: &M,
    grads: &GradientsParams,
) -> f64 {
    let mut visitor = SquaredSum::<B> { grads, total: None };
    model.visit(&mut visitor);
    visitor
        .total
        .map(|t| t.into_scalar().elem::<f64>().sqrt())
        .unwrap_or(0.0)
}

/// Scales `grads` so that their global norm is at most `max_norm`; returns the norm
/// before clipping.
pub(crate) fn clip_global_norm<B: AutodiffBackend, M: AutodiffModule<B>>(
    model: &M,
    grads: &mut GradientsParams,
    max_norm: f64,
) -> f64 {
    let norm = global_norm::<B, M>(model, grads);
    clip_to::<B, M>(model, grads, norm, max_norm);
    norm
}

/// Scales `grads`, whose global norm is `norm`, so that it is at most `max_norm`.
pub(crate) fn clip_to<B: AutodiffBackend, M: AutodiffModule<B>>(
    model: &M,
    grads: &mut GradientsParams,
    norm: f64,
    max_norm: f64,
) {
    if norm.is_finite() && norm > max_norm {
        scale::<B, M>(model, grads, max_norm / (norm + 1e-6));
    }
}

/// Multiplies every gradient by `factor`.
pub(crate) fn scale<B: AutodiffBackend, M: AutodiffModule<B>>(
    model: &M,
    grads: &mut GradientsParams,
    factor: f64,
) {
    model.visit(&mut Scale::<B> {
        grads,
        factor,
        _b: Default::default(),
    });
}

/// Drops the gradients of the parameters this worker does not own (fsdp; `owns`
/// takes a parameter's index in visiting order): its optimizer then neither keeps
/// state for them nor updates them.
pub(crate) fn retain_owned<B: AutodiffBackend, M: AutodiffModule<B>>(
    model: &M,
    grads: &mut GradientsParams,
    owns: &dyn Fn(usize) -> bool,
) {
    struct Retain<'a> {
        grads: &'a mut GradientsParams,
        owns: &'a dyn Fn(usize) -> bool,
        index: usize,
    }
    impl<B: AutodiffBackend> ModuleVisitor<B> for Retain<'_> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            if !(self.owns)(self.index) {
                self.grads.remove::<B::InnerBackend, D>(param.id);
            }
            self.index += 1;
        }
    }
    model.visit(&mut Retain {
        grads,
        owns,
        index: 0,
    });
}

struct SquaredSum<'a, B: AutodiffBackend> {
    grads: &'a GradientsParams,
    total: Option<Tensor<B::InnerBackend, 1>>,
}

impl<B: AutodiffBackend> ModuleVisitor<B> for SquaredSum<'_, B> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        if let Some(g) = self.grads.get::<B::InnerBackend, D>(param.id) {
            // Summed in f32: squares of f16 or bf16 gradients overflow or lose the
            // small ones.
            let g = match g.dtype() {
                DType::F32 | DType::F64 => g,
                _ => g.cast(FloatDType::F32),
            };
            let s = g.powi_scalar(2).sum();
            self.total = Some(match self.total.take() {
                Some(t) => t + s,
                None => s,
            });
        }
    }
}

struct Scale<'a, B: AutodiffBackend> {
    grads: &'a mut GradientsParams,
    factor: f64,
    _b: std::marker::PhantomData<B>,
}

impl<B: AutodiffBackend> ModuleVisitor<B> for Scale<'_, B> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        if let Some(g) = self.grads.remove::<B::InnerBackend, D>(param.id) {
            self.grads.register(param.id, g.mul_scalar(self.factor));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::Autodiff;
    use kiln_backend_cpu::NdArray;

    type B = Autodiff<NdArray>;

    #[derive(Module, Debug)]
    struct Two<B: Backend> {
        a: Param<Tensor<B, 1>>,
        b: Param<Tensor<B, 2>>,
    }

    fn grads_of(model: &Two<B>) -> GradientsParams {
        // loss = 3·sum(a) + 4·sum(b): grad a = 3 (one element), grad b = 4 (one element)
        let loss = model.a.val().sum().mul_scalar(3.0) + model.b.val().sum().mul_scalar(4.0);
        GradientsParams::from_grads(loss.backward(), model)
    }

    fn model() -> Two<B> {
        let dev = Default::default();
        Two {
            a: Param::from_tensor(Tensor::from_data([1.0], &dev)),
            b: Param::from_tensor(Tensor::from_data([[2.0]], &dev)),
        }
    }

    #[test]
    fn norm_is_taken_over_all_parameters_together() {
        let m = model();
        let grads = grads_of(&m);
        assert!((global_norm::<B, _>(&m, &grads) - 5.0).abs() < 1e-6);
    }

    #[test]
    fn clipping_scales_every_gradient_by_one_factor() {
        let m = model();
        let mut grads = grads_of(&m);
        let before = clip_global_norm::<B, _>(&m, &mut grads, 1.0);
        assert!((before - 5.0).abs() < 1e-6);
        assert!((global_norm::<B, _>(&m, &grads) - 1.0).abs() < 1e-5);
        let ga: Tensor<NdArray, 1> = grads.get(m.a.id).unwrap();
        let gb: Tensor<NdArray, 2> = grads.get(m.b.id).unwrap();
        // direction kept: 3:4
        let ratio = ga.into_scalar().elem::<f64>() / gb.into_scalar().elem::<f64>();
        assert!((ratio - 0.75).abs() < 1e-5, "{ratio}");
    }

    #[test]
    fn small_gradients_are_left_alone() {
        let m = model();
        let mut grads = grads_of(&m);
        clip_global_norm::<B, _>(&m, &mut grads, 10.0);
        assert!((global_norm::<B, _>(&m, &grads) - 5.0).abs() < 1e-6);
    }
}

//! Precision: which mode runs on this backend, and the bf16 working copy of
//! `bf16-mixed` (see `docs/precision.md`).
//!
//! Burn 0.21 has no autocast: kiln builds mixed precision from differentiable casts
//! (memo §5). The master weights and AdamW's state stay f32; each micro-batch runs
//! forward and backward on a bf16 copy made by casting every parameter inside the
//! autodiff graph, so the gradients arrive on the f32 masters as f32.

use burn::module::{Module, ModuleMapper, Param};
use burn::prelude::*;
use burn::tensor::{DType, FloatDType};
use kiln_core::{Inputs, Precision, Prediction};

use crate::{CoordinatorError, Result};

/// The precision that runs for `asked` on a backend that `supports` a dtype, and
/// the warning when it falls back to `32-true`.
pub(crate) fn resolve(
    asked: Precision,
    backend: &str,
    supports: impl Fn(DType) -> bool,
    strict: bool,
) -> Result<(Precision, Option<String>)> {
    let supported: Vec<&str> = [("32-true", true), ("bf16-mixed", supports(DType::BF16))]
        .into_iter()
        .filter_map(|(name, ok)| ok.then_some(name))
        .collect();
    match asked {
        Precision::F32 => Ok((Precision::F32, None)),
        Precision::Bf16Mixed if supports(DType::BF16) => Ok((Precision::Bf16Mixed, None)),
        Precision::Bf16Mixed if strict => Err(kiln_core::Error::invalid(
            "precision",
            asked,
            format!(
                "a mode backend {backend} supports: {} (it has no bf16 tensors; \
                 strict precision is on)",
                supported.join(", ")
            ),
        )
        .into()),
        Precision::Bf16Mixed => Ok((
            Precision::F32,
            Some(format!(
                "precision bf16-mixed is not supported by backend {backend} (no bf16 \
                 tensors): training in 32-true instead (strict precision makes this an \
                 error; the flex and cuda backends have bf16)"
            )),
        )),
        other => Err(CoordinatorError::NotAvailable {
            what: format!("precision {other}"),
            reason: "kiln implements 32-true and bf16-mixed so far; 16-mixed (with loss \
                     scaling), bf16-true and 16-true are tracked by the precision issue"
                .into(),
        }),
    }
}

/// The working dtype of a precision's forward and backward passes (`None`: f32).
pub(crate) fn working_dtype(precision: Precision) -> Option<FloatDType> {
    match precision {
        Precision::Bf16Mixed => Some(FloatDType::BF16),
        _ => None,
    }
}

/// Casts every float parameter inside the autodiff graph: the copy's gradients
/// flow back to the originals in their own dtype.
struct CastTo(FloatDType);

impl<B: Backend> ModuleMapper<B> for CastTo {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        let (id, tensor, mapper) = param.consume();
        Param::from_mapped_value(id, tensor.cast(self.0), mapper)
    }
}

/// A working copy of `model` in `dtype`.
pub(crate) fn working_copy<B: Backend, M: Module<B>>(model: &M, dtype: FloatDType) -> M {
    model.clone().map(&mut CastTo(dtype))
}

/// `inputs` in `dtype` (token ids are left as they are).
pub(crate) fn cast_inputs<B: Backend>(inputs: Inputs<B>, dtype: FloatDType) -> Inputs<B> {
    match inputs {
        Inputs::Features(x) => Inputs::Features(x.cast(dtype)),
        tokens => tokens,
    }
}

/// `prediction` in f32, where the loss is computed.
pub(crate) fn to_f32<B: Backend>(prediction: Prediction<B>) -> Prediction<B> {
    let f32 = FloatDType::F32;
    match prediction {
        Prediction::TokenLogits(x) => Prediction::TokenLogits(x.cast(f32)),
        Prediction::ClassLogits(x) => Prediction::ClassLogits(x.cast(f32)),
        Prediction::Values(x) => Prediction::Values(x.cast(f32)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rstest::rstest;

    #[rstest]
    #[case::f32_anywhere(Precision::F32, false, false, Precision::F32, false)]
    #[case::bf16_supported(Precision::Bf16Mixed, true, false, Precision::Bf16Mixed, false)]
    #[case::bf16_falls_back(Precision::Bf16Mixed, false, false, Precision::F32, true)]
    fn resolution(
        #[case] asked: Precision,
        #[case] bf16: bool,
        #[case] strict: bool,
        #[case] want: Precision,
        #[case] warns: bool,
    ) {
        let (got, warning) =
            resolve(asked, "ndarray", |d| bf16 && d == DType::BF16, strict).unwrap();
        assert_eq!(got, want);
        assert_eq!(warning.is_some(), warns, "{warning:?}");
    }

    #[test]
    fn strict_precision_names_the_backend_and_its_modes() {
        let err = resolve(Precision::Bf16Mixed, "ndarray", |_| false, true)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("invalid precision \"bf16-mixed\"")
                && err.contains("backend ndarray supports: 32-true"),
            "{err}"
        );
    }

    #[test]
    fn modes_not_built_yet_say_so() {
        let err = resolve(Precision::F16Mixed, "flex", |_| true, false).unwrap_err();
        assert!(
            matches!(err, CoordinatorError::NotAvailable { .. }),
            "{err}"
        );
    }
}

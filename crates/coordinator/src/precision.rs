//! Precision: which mode runs on this backend, the working dtype of each mode, and
//! `16-mixed`'s loss scaler (see `docs/precision.md`).
//!
//! Burn 0.21 has no autocast and no loss scaler: kiln builds them from differentiable
//! casts (memo §5).
//! - Mixed modes keep the master weights and AdamW's state in f32; each micro-batch
//!   runs forward and backward on a working copy made by casting every parameter
//!   inside the autodiff graph, so the gradients arrive on the f32 masters as f32.
//!   `16-mixed` multiplies the loss by a [`LossScaler`]'s scale before the backward
//!   pass (f16 gradients underflow otherwise) and divides the gradients by it after.
//! - True modes store the parameters themselves in the working dtype (the optimizer
//!   state follows the gradients' dtype).
//!
//! Either way the inputs are cast to the working dtype and the loss is computed in
//! f32.

use std::any::{Any, TypeId};
use std::marker::PhantomData;

use burn::module::{AutodiffModule, Module, ModuleMapper, ModuleVisitor, Param};
use burn::optim::record::AdaptorRecord;
use burn::optim::{Adam, AdamState, AdamW, AdamWState, AdaptiveMomentumState, SimpleOptimizer};
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{DType, FloatDType};
use kiln_core::{Inputs, LossScaling, Precision, Prediction};
use kiln_kernels::AdamW as FusedAdamW;
use serde::{Deserialize, Serialize};

use crate::Result;
use crate::optim::{CastState, OptimRecord};

/// The dtype a precision computes in (`None`: f32).
pub(crate) fn working_dtype(precision: Precision) -> Option<FloatDType> {
    match precision {
        Precision::F32 => None,
        Precision::Bf16Mixed | Precision::Bf16True => Some(FloatDType::BF16),
        Precision::F16Mixed | Precision::F16True => Some(FloatDType::F16),
    }
}

/// Whether a precision stores the parameters themselves in its working dtype.
pub(crate) fn is_true(precision: Precision) -> bool {
    matches!(precision, Precision::Bf16True | Precision::F16True)
}

/// The dtype a true mode stores the parameters in (`None`: f32 masters).
pub(crate) fn stored_dtype(precision: Precision) -> Option<FloatDType> {
    working_dtype(precision).filter(|_| is_true(precision))
}

/// The precision that runs for `asked` on a backend that `supports` a dtype, and
/// the warning when it falls back to `32-true`.
pub(crate) fn resolve(
    asked: Precision,
    backend: &str,
    supports: impl Fn(DType) -> bool,
    strict: bool,
) -> Result<(Precision, Option<String>)> {
    let runs = |p: Precision| match working_dtype(p) {
        None => true,
        Some(d) => supports(DType::from(d)),
    };
    if runs(asked) {
        return Ok((asked, None));
    }
    let dtype = match working_dtype(asked) {
        Some(FloatDType::F16) => "f16",
        _ => "bf16",
    };
    if strict {
        let supported: Vec<String> = [
            Precision::F32,
            Precision::Bf16Mixed,
            Precision::F16Mixed,
            Precision::Bf16True,
            Precision::F16True,
        ]
        .into_iter()
        .filter(|p| runs(*p))
        .map(|p| p.to_string())
        .collect();
        return Err(kiln_core::Error::invalid(
            "precision",
            asked,
            format!(
                "a mode backend {backend} supports: {} (it has no {dtype} tensors; strict \
                 precision is on)",
                supported.join(", ")
            ),
        )
        .into());
    }
    Ok((
        Precision::F32,
        Some(format!(
            "precision {asked} is not supported by backend {backend} (no {dtype} tensors): \
             training in 32-true instead (strict precision makes this an error; the flex \
             and cuda backends have bf16 and f16)"
        )),
    ))
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

/// A working copy of `model` in `dtype` (mixed modes).
pub(crate) fn working_copy<B: Backend, M: Module<B>>(model: &M, dtype: FloatDType) -> M {
    model.clone().map(&mut CastTo(dtype))
}

/// Stores every float parameter in another dtype, as a new leaf of the graph.
struct StoreAs(FloatDType);

impl<B: AutodiffBackend> ModuleMapper<B> for StoreAs {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        let (id, tensor, mapper) = param.consume();
        let tracked = tensor.is_require_grad();
        let mut value = Tensor::<B, D>::from_inner(tensor.inner().cast(self.0));
        if tracked {
            value = value.require_grad();
        }
        Param::from_mapped_value(id, value, mapper)
    }
}

/// `model` with its parameters stored in `dtype` (true modes; checkpoints hold f32,
/// so a resumed model is stored back in its dtype with this too).
pub(crate) fn store_as<B: AutodiffBackend, M: AutodiffModule<B>>(model: M, dtype: FloatDType) -> M {
    model.map(&mut StoreAs(dtype))
}

/// An optimizer whose per-parameter state kiln can store in a true precision's
/// dtype: burn-optim's Adam and AdamW and kiln's fused AdamW, whose state is an
/// adaptive momentum with public tensors. (burn-optim 0.21 keeps the state of SGD's momentum, RmsProp and
/// AdaGrad private.)
trait MomentState<B: Backend>: SimpleOptimizer<B> {
    fn momentum<const D: usize>(state: &mut Self::State<D>) -> &mut AdaptiveMomentumState<B, D>;
}

impl<B: Backend> MomentState<B> for AdamW {
    fn momentum<const D: usize>(state: &mut AdamWState<B, D>) -> &mut AdaptiveMomentumState<B, D> {
        &mut state.momentum
    }
}

impl<B: Backend> MomentState<B> for FusedAdamW {
    fn momentum<const D: usize>(state: &mut AdamWState<B, D>) -> &mut AdaptiveMomentumState<B, D> {
        &mut state.momentum
    }
}

impl<B: Backend> MomentState<B> for Adam {
    fn momentum<const D: usize>(state: &mut AdamState<B, D>) -> &mut AdaptiveMomentumState<B, D> {
        &mut state.momentum
    }
}

/// The cast of optimizer `S`'s state to a dtype, for the optimizers kiln can cast
/// ([`MomentState`]): a checkpoint holds the state in f32, a true mode keeps it in
/// the parameters' dtype. `None` for the others.
pub(crate) fn state_cast<B, M, S>() -> Option<CastState<B, M, S>>
where
    B: AutodiffBackend,
    M: AutodiffModule<B> + 'static,
    S: SimpleOptimizer<B::InnerBackend> + 'static,
{
    let s = TypeId::of::<S>();
    [
        TypeId::of::<AdamW>(),
        TypeId::of::<FusedAdamW>(),
        TypeId::of::<Adam>(),
    ]
    .contains(&s)
    .then_some(cast_moments::<B, M, S>)
}

/// `record` with the moments of Adam or either AdamW in `dtype` (recognised by type;
/// another optimizer's record is returned as it is).
fn cast_moments<B, M, S>(
    model: &M,
    mut record: OptimRecord<S, B, M>,
    dtype: FloatDType,
) -> OptimRecord<S, B, M>
where
    B: AutodiffBackend,
    M: AutodiffModule<B> + 'static,
    S: SimpleOptimizer<B::InnerBackend> + 'static,
{
    let any = &mut record as &mut dyn Any;
    if let Some(adamw) = any.downcast_mut::<OptimRecord<AdamW, B, M>>() {
        *adamw = moments_as::<B, M, AdamW>(model, std::mem::take(adamw), dtype);
    } else if let Some(adamw) = any.downcast_mut::<OptimRecord<FusedAdamW, B, M>>() {
        *adamw = moments_as::<B, M, FusedAdamW>(model, std::mem::take(adamw), dtype);
    } else if let Some(adam) = any.downcast_mut::<OptimRecord<Adam, B, M>>() {
        *adam = moments_as::<B, M, Adam>(model, std::mem::take(adam), dtype);
    }
    record
}

/// The record of optimizer `S` with its moments in `dtype`.
fn moments_as<B, M, S>(
    model: &M,
    record: OptimRecord<S, B, M>,
    dtype: FloatDType,
) -> OptimRecord<S, B, M>
where
    B: AutodiffBackend,
    M: AutodiffModule<B>,
    S: MomentState<B::InnerBackend>,
{
    struct Cast<B: AutodiffBackend, M: AutodiffModule<B>, S: SimpleOptimizer<B::InnerBackend>> {
        record: OptimRecord<S, B, M>,
        dtype: FloatDType,
        model: PhantomData<M>,
    }
    impl<B, M, S> ModuleVisitor<B> for Cast<B, M, S>
    where
        B: AutodiffBackend,
        M: AutodiffModule<B>,
        S: MomentState<B::InnerBackend>,
    {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            if let Some(entry) = self.record.remove(&param.id) {
                let mut state = entry.into_state::<D>();
                let m = S::momentum(&mut state);
                m.moment_1 = m.moment_1.clone().cast(self.dtype);
                m.moment_2 = m.moment_2.clone().cast(self.dtype);
                m.max_moment_2 = m.max_moment_2.take().map(|t| t.cast(self.dtype));
                self.record
                    .insert(param.id, AdaptorRecord::from_state(state));
            }
        }
    }
    let mut cast = Cast::<B, M, S> {
        record,
        dtype,
        model: PhantomData,
    };
    model.visit(&mut cast);
    cast.record
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

/// Where `16-mixed`'s loss scaling stands; saved in checkpoints so that a resumed
/// run continues with the same scale.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub(crate) struct ScalerState {
    /// The scale the next step's loss is multiplied by.
    pub scale: f64,
    /// Finite steps in a row since the scale last changed.
    pub clean_steps: u32,
    /// Steps skipped in a row (non-finite gradients).
    pub skipped_in_a_row: u32,
    /// Steps skipped in the whole run.
    pub skipped: u64,
}

/// Dynamic loss scaling (PyTorch's `GradScaler`): back off on non-finite gradients,
/// grow after a run of finite ones.
#[derive(Debug, Clone)]
pub(crate) struct LossScaler {
    config: LossScaling,
    state: ScalerState,
}

/// Steps skipped in a row after which a run is declared diverged: the scale has then
/// fallen by `backoff_factor^limit` (2^-64 with the defaults) and the gradients are
/// still not finite, so no scale will make them finite.
const SKIPS_BEFORE_DIVERGED: u32 = 64;

impl LossScaler {
    /// A scaler starting from `state`, or from the configured initial scale.
    pub fn new(config: &LossScaling, state: Option<ScalerState>) -> Self {
        Self {
            config: *config,
            state: state.unwrap_or(ScalerState {
                scale: config.init_scale,
                clean_steps: 0,
                skipped_in_a_row: 0,
                skipped: 0,
            }),
        }
    }

    /// The scale of the next step's loss.
    pub fn scale(&self) -> f64 {
        self.state.scale
    }

    /// The state to checkpoint.
    pub fn state(&self) -> ScalerState {
        self.state
    }

    /// Updates the scale after a step whose gradients were `finite` or not; returns
    /// whether the optimizer step is taken, or an error once skipping is hopeless.
    pub fn update(&mut self, finite: bool) -> std::result::Result<bool, String> {
        let s = &mut self.state;
        if finite {
            s.skipped_in_a_row = 0;
            s.clean_steps += 1;
            if s.clean_steps >= self.config.growth_interval {
                s.scale *= self.config.growth_factor;
                s.clean_steps = 0;
            }
            return Ok(true);
        }
        s.scale *= self.config.backoff_factor;
        s.clean_steps = 0;
        s.skipped_in_a_row += 1;
        s.skipped += 1;
        if s.skipped_in_a_row >= SKIPS_BEFORE_DIVERGED {
            return Err(format!(
                "16-mixed: {} steps in a row had non-finite gradients; the loss scale \
                 fell to {:e} without making them finite",
                s.skipped_in_a_row, s.scale
            ));
        }
        Ok(false)
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
                && err.contains("backend ndarray supports: 32-true")
                && err.contains("no bf16 tensors"),
            "{err}"
        );
    }

    #[rstest]
    #[case::f16_mixed(Precision::F16Mixed, "no f16 tensors")]
    #[case::bf16_true(Precision::Bf16True, "no bf16 tensors")]
    #[case::f16_true(Precision::F16True, "no f16 tensors")]
    fn every_mode_falls_back_or_refuses_without_its_dtype(
        #[case] asked: Precision,
        #[case] why: &str,
    ) {
        let (got, warning) = resolve(asked, "ndarray", |_| false, false).unwrap();
        assert_eq!(got, Precision::F32);
        assert!(warning.unwrap().contains(why));
        assert!(resolve(asked, "ndarray", |_| false, true).is_err());
        assert_eq!(
            resolve(asked, "flex", |_| true, true).unwrap(),
            (asked, None)
        );
    }

    fn scaling(growth_interval: u32) -> LossScaling {
        LossScaling {
            init_scale: 1024.0,
            growth_interval,
            ..Default::default()
        }
    }

    #[test]
    fn scaler_backs_off_on_overflow_and_grows_after_clean_steps() {
        let mut s = LossScaler::new(&scaling(3), None);
        assert_eq!(s.update(true), Ok(true));
        assert_eq!(s.update(false), Ok(false));
        assert_eq!(s.scale(), 512.0);
        // The run of clean steps starts again after a skip.
        assert_eq!(s.update(true), Ok(true));
        assert_eq!(s.update(true), Ok(true));
        assert_eq!(s.scale(), 512.0);
        assert_eq!(s.update(true), Ok(true));
        assert_eq!(s.scale(), 1024.0);
        assert_eq!(s.state().clean_steps, 0);
    }

    #[test]
    fn scaler_resumes_from_its_state() {
        let mut s = LossScaler::new(&scaling(2), None);
        s.update(true).unwrap();
        let mut resumed = LossScaler::new(&scaling(2), Some(s.state()));
        resumed.update(true).unwrap();
        assert_eq!(resumed.scale(), 2048.0);
    }

    #[test]
    fn endless_overflow_is_divergence() {
        let mut s = LossScaler::new(&scaling(2), None);
        let err = (0..SKIPS_BEFORE_DIVERGED)
            .map(|_| s.update(false))
            .find_map(|r| r.err())
            .expect("an error after the last skip");
        assert!(err.contains("64 steps in a row"), "{err}");
    }
}

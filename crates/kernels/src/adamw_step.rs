//! What the fused AdamW update takes and returns: the step's hyper-parameters, the
//! scalars every element uses, and the updated tensors.

use burn::tensor::backend::Backend;
use burn::tensor::ops::FloatTensor;

/// One AdamW step of one parameter tensor: its hyper-parameters and its count.
///
/// The update is burn-optim 0.21's `AdamW` without AMSGrad or cautious weight
/// decay, rounded the same way, operation by operation:
/// `m = β₁m + (1-β₁)g`, `v = β₂v + (1-β₂)g²`,
/// `p = p·(1 - lr·λ) - lr · (m/(1-β₁ᵗ)) / (√(v/(1-β₂ᵗ)) + ε)`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWStep {
    /// The learning rate of this step.
    pub lr: f64,
    /// The step's number for this tensor, from 1 (the bias correction's `t`).
    pub time: usize,
    /// β₁, the first moment's decay.
    pub beta_1: f32,
    /// β₂, the second moment's decay.
    pub beta_2: f32,
    /// ε, added to the second moment's root.
    pub epsilon: f32,
    /// λ, the decoupled weight decay.
    pub weight_decay: f32,
}

/// The scalars of an [`AdamWStep`] as every element uses them, computed once per
/// tensor in burn-optim's precisions (the decay in f64, then f32).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Coefficients {
    pub beta_1: f32,
    pub beta_2: f32,
    /// `1 - β₁`.
    pub factor_1: f32,
    /// `1 - β₂`.
    pub factor_2: f32,
    /// `1 - β₁ᵗ`.
    pub correction_1: f32,
    /// `1 - β₂ᵗ`.
    pub correction_2: f32,
    pub epsilon: f32,
    /// `1 - lr·λ`, or `None` where `lr·λ` is 0 (the parameter is not multiplied).
    pub decay: Option<f32>,
    pub lr: f32,
}

impl AdamWStep {
    pub(crate) fn coefficients(&self) -> Coefficients {
        let time = i32::try_from(self.time).unwrap_or(i32::MAX);
        let decay_rate = self.lr * f64::from(self.weight_decay);
        Coefficients {
            beta_1: self.beta_1,
            beta_2: self.beta_2,
            factor_1: 1.0 - self.beta_1,
            factor_2: 1.0 - self.beta_2,
            correction_1: 1.0 - self.beta_1.powi(time),
            correction_2: 1.0 - self.beta_2.powi(time),
            epsilon: self.epsilon,
            decay: (decay_rate != 0.0).then_some((1.0 - decay_rate) as f32),
            lr: self.lr as f32,
        }
    }
}

/// A parameter tensor after an AdamW step, with its two moments.
#[derive(Debug, Clone)]
pub struct AdamWUpdate<B: Backend> {
    /// The updated parameter.
    pub param: FloatTensor<B>,
    /// The first moment `m`.
    pub moment_1: FloatTensor<B>,
    /// The second moment `v`.
    pub moment_2: FloatTensor<B>,
}

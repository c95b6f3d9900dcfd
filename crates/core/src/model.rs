//! What a model implements to be trained by kiln.

use burn::module::Module;
use burn::prelude::{Backend, Int, Tensor};

use crate::{Error, Result, TaskSpec};

/// A batch's inputs.
#[derive(Debug, Clone)]
pub enum Inputs<B: Backend> {
    /// Token ids, `[batch, seq_len]`.
    Tokens(Tensor<B, 2, Int>),
    /// Real-valued features, `[batch, features]`.
    Features(Tensor<B, 2>),
}

impl<B: Backend> Inputs<B> {
    /// The token ids, or a [`Error::TaskMismatch`] naming what came instead.
    pub fn into_tokens(self) -> Result<Tensor<B, 2, Int>> {
        match self {
            Inputs::Tokens(t) => Ok(t),
            Inputs::Features(_) => Err(Error::TaskMismatch(
                "the model expects token ids but the batch holds features".into(),
            )),
        }
    }

    /// The features, or a [`Error::TaskMismatch`] naming what came instead.
    pub fn into_features(self) -> Result<Tensor<B, 2>> {
        match self {
            Inputs::Features(t) => Ok(t),
            Inputs::Tokens(_) => Err(Error::TaskMismatch(
                "the model expects features but the batch holds token ids".into(),
            )),
        }
    }
}

/// A batch's targets; which variant a task needs follows from its [`TaskKind`](crate::TaskKind).
#[derive(Debug, Clone)]
pub enum Targets<B: Backend> {
    /// Next-token ids, `[batch, seq_len]` (language modelling).
    Tokens(Tensor<B, 2, Int>),
    /// Class ids, `[batch]` (classification).
    Classes(Tensor<B, 1, Int>),
    /// Real targets, `[batch, outputs]` (regression).
    Values(Tensor<B, 2>),
}

/// What a model's forward pass returns; the coordinator derives the loss and the
/// metrics from it and the task kind.
#[derive(Debug, Clone)]
pub enum Prediction<B: Backend> {
    /// Unnormalised scores over the vocabulary, `[batch, seq_len, vocab]`.
    TokenLogits(Tensor<B, 3>),
    /// Unnormalised class scores, `[batch, classes]`.
    ClassLogits(Tensor<B, 2>),
    /// Predicted values, `[batch, outputs]`.
    Values(Tensor<B, 2>),
}

/// A Burn module that kiln can train: a forward pass from [`Inputs`] to a
/// [`Prediction`].
///
/// Implement it for the model generic over the backend; the coordinator trains the
/// `Autodiff` version and validates with the inner one, so both are covered by one
/// generic impl:
///
/// ```
/// use burn::prelude::*;
/// use kiln_core::{Inputs, Prediction, TaskModel};
///
/// #[derive(Module, Debug)]
/// struct Affine<B: Backend> {
///     w: burn::module::Param<Tensor<B, 2>>,
/// }
///
/// impl<B: Backend> TaskModel<B> for Affine<B> {
///     fn forward(&self, inputs: Inputs<B>) -> kiln_core::Result<Prediction<B>> {
///         let x = inputs.into_features()?;
///         Ok(Prediction::Values(x.matmul(self.w.val())))
///     }
/// }
/// ```
pub trait TaskModel<B: Backend>: Module<B> {
    /// The forward pass. Return [`Error::TaskMismatch`] for inputs the model cannot take.
    fn forward(&self, inputs: Inputs<B>) -> Result<Prediction<B>>;

    /// Checks, before training starts, that the model's shapes fit `task` (e.g. its
    /// vocabulary and context length), so that a mismatch is an error naming both
    /// sizes rather than an out-of-range index deep inside a kernel.
    fn check_task(&self, task: &TaskSpec) -> Result<()> {
        let _ = task;
        Ok(())
    }
}

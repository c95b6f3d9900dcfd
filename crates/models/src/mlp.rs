//! A multi-layer perceptron for classification and regression.

use burn::prelude::*;
use burn::tensor::activation::gelu;
use kiln_core::rng::SplitMix64;
use kiln_core::{Error, Inputs, Prediction, TaskKind, TaskModel, TaskSpec};
use kiln_kernels::FusedOps;

use crate::layers::Dense;

/// What an [`Mlp`] predicts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MlpHead {
    /// Class logits.
    Classes,
    /// Real values.
    Values,
}

/// Shape of an [`Mlp`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MlpConfig {
    /// Input features.
    pub inputs: usize,
    /// Width of each hidden layer.
    pub hidden: usize,
    /// Hidden layers (>= 1).
    pub layers: usize,
    /// Classes or outputs.
    pub outputs: usize,
    /// What the output means.
    pub head: MlpHead,
}

impl MlpConfig {
    /// An MLP for `task` over `inputs` features: 2 hidden layers of 64.
    pub fn for_task(task: &TaskKind, inputs: usize) -> kiln_core::Result<Self> {
        let (outputs, head) = match *task {
            TaskKind::Classification { num_classes } => (num_classes, MlpHead::Classes),
            TaskKind::Regression { outputs } => (outputs, MlpHead::Values),
            TaskKind::Lm { .. } => {
                return Err(Error::TaskMismatch(
                    "an MLP does not do language modelling; use the tiny GPT".into(),
                ));
            }
            TaskKind::Custom => {
                return Err(Error::TaskMismatch(
                    "kiln's MLP computes a task's loss; a custom task is a model's own \
                     TrainStep (TrainingCoordinator::fit)"
                        .into(),
                ));
            }
        };
        Ok(Self {
            inputs,
            hidden: 64,
            layers: 2,
            outputs,
            head,
        })
    }

    /// Builds the model with weights drawn from `seed`.
    pub fn init<B: Backend>(&self, seed: u64, device: &B::Device) -> kiln_core::Result<Mlp<B>> {
        for (field, v) in [
            ("inputs", self.inputs),
            ("hidden", self.hidden),
            ("layers", self.layers),
            ("outputs", self.outputs),
        ] {
            if v == 0 {
                return Err(Error::invalid(field, v, "an integer >= 1"));
            }
        }
        let mut rng = SplitMix64::new(seed);
        let mut hidden = Vec::with_capacity(self.layers);
        let mut width = self.inputs;
        for _ in 0..self.layers {
            hidden.push(Dense::new(width, self.hidden, &mut rng, device));
            width = self.hidden;
        }
        let out = Dense::new(width, self.outputs, &mut rng, device);
        Ok(Mlp {
            hidden,
            out,
            classes: self.head == MlpHead::Classes,
        })
    }
}

/// A GELU MLP. Build it with [`MlpConfig::init`].
#[derive(Module, Debug)]
pub struct Mlp<B: Backend> {
    hidden: Vec<Dense<B>>,
    out: Dense<B>,
    classes: bool,
}

impl<B: FusedOps> TaskModel<B> for Mlp<B> {
    fn forward(&self, inputs: Inputs<B>) -> kiln_core::Result<Prediction<B>> {
        let mut x = inputs.into_features()?;
        for layer in &self.hidden {
            x = gelu(layer.forward(x));
        }
        let y = self.out.forward(x);
        Ok(if self.classes {
            Prediction::ClassLogits(y)
        } else {
            Prediction::Values(y)
        })
    }

    fn check_task(&self, task: &TaskSpec) -> kiln_core::Result<()> {
        let [_, outputs] = self.out.weight.dims();
        let (want, kind_ok) = match task.kind {
            TaskKind::Classification { num_classes } => (num_classes, self.classes),
            TaskKind::Regression { outputs } => (outputs, !self.classes),
            TaskKind::Lm { .. } | TaskKind::Custom => (0, false),
        };
        if !kind_ok {
            let has = if self.classes {
                "classification"
            } else {
                "regression"
            };
            return Err(Error::TaskMismatch(format!(
                "this MLP was built for {has}, the task is {}",
                task.kind.type_name()
            )));
        }
        if want != outputs {
            return Err(Error::TaskMismatch(format!(
                "the MLP has {outputs} outputs but the task needs {want}"
            )));
        }
        Ok(())
    }
}

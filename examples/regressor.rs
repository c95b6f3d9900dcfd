//! A regression model with a loss of its own (Huber's, written out) and dropout,
//! written as a burn-train user writes one: `RegressionOutput` from its
//! `TrainStep`/`InferenceStep`, a `Batcher`, synthetic data. Its one kiln item is
//! an implementation of `kiln_coordinator::LossStep` (the loss before backward,
//! and the batch cast to a dtype), with which it trains in mixed precision too.

use burn::data::dataloader::batcher::Batcher;
use burn::data::dataset::InMemDataset;
use burn::nn::{Dropout, DropoutConfig, Gelu, Linear, LinearConfig};
use burn::prelude::*;
use burn::tensor::FloatDType;
use burn::tensor::backend::AutodiffBackend;
use burn::train::{InferenceStep, RegressionOutput, TrainOutput, TrainStep};
use kiln_coordinator::LossStep;
use kiln_core::rng::SplitMix64;

/// Features per example.
pub const FEATURES: usize = 8;

/// Two linear layers with GELU and dropout between them.
#[derive(Module, Debug)]
pub struct Regressor<B: Backend> {
    hidden: Linear<B>,
    out: Linear<B>,
    dropout: Dropout,
    activation: Gelu,
    /// Huber's threshold between the quadratic and the linear part.
    delta: f64,
}

/// The regressor's sizes.
#[derive(Config, Debug)]
pub struct RegressorConfig {
    /// Width of the hidden layer.
    #[config(default = "32")]
    pub hidden: usize,
    /// Dropout probability.
    #[config(default = "0.1")]
    pub dropout: f64,
    /// Huber's threshold.
    #[config(default = "1.0")]
    pub delta: f64,
}

impl RegressorConfig {
    /// A regressor with Burn's default initialisation.
    pub fn init<B: Backend>(&self, device: &B::Device) -> Regressor<B> {
        Regressor {
            hidden: LinearConfig::new(FEATURES, self.hidden).init(device),
            out: LinearConfig::new(self.hidden, 1).init(device),
            dropout: DropoutConfig::new(self.dropout).init(),
            activation: Gelu::new(),
            delta: self.delta,
        }
    }
}

impl<B: Backend> Regressor<B> {
    /// Predictions `[batch, 1]`.
    pub fn forward(&self, x: Tensor<B, 2>) -> Tensor<B, 2> {
        let x = self.activation.forward(self.hidden.forward(x));
        self.out.forward(self.dropout.forward(x))
    }

    /// The forward pass with the Huber loss: quadratic within `delta` of the
    /// target, linear beyond.
    pub fn forward_regression(
        &self,
        x: Tensor<B, 2>,
        targets: Tensor<B, 2>,
    ) -> RegressionOutput<B> {
        let output = self.forward(x);
        let error = (output.clone() - targets.clone()).abs();
        let quadratic = error.clone().clamp_max(self.delta);
        let linear = error - quadratic.clone();
        let loss =
            (quadratic.powi_scalar(2).mul_scalar(0.5) + linear.mul_scalar(self.delta)).mean();
        RegressionOutput::new(loss, output, targets)
    }
}

impl<B: AutodiffBackend> TrainStep for Regressor<B> {
    type Input = RegressionBatch<B>;
    type Output = RegressionOutput<B>;

    fn step(&self, batch: RegressionBatch<B>) -> TrainOutput<RegressionOutput<B>> {
        let (loss, item) = self.forward_loss(batch);
        TrainOutput::new(self, loss.backward(), item)
    }
}

/// The step up to its loss: kiln runs backward itself, so that the model trains
/// in `bf16-mixed` and `16-mixed` (`TrainingCoordinator::fit_with_loss`).
impl<B: AutodiffBackend> LossStep<B> for Regressor<B> {
    fn forward_loss(&self, batch: RegressionBatch<B>) -> (Tensor<B, 1>, RegressionOutput<B>) {
        let item = self.forward_regression(batch.inputs, batch.targets);
        (item.loss.clone(), item)
    }

    fn cast_input(batch: RegressionBatch<B>, dtype: FloatDType) -> RegressionBatch<B> {
        RegressionBatch {
            inputs: batch.inputs.cast(dtype),
            targets: batch.targets.cast(dtype),
        }
    }
}

impl<B: Backend> InferenceStep for Regressor<B> {
    type Input = RegressionBatch<B>;
    type Output = RegressionOutput<B>;

    fn step(&self, batch: RegressionBatch<B>) -> RegressionOutput<B> {
        self.forward_regression(batch.inputs, batch.targets)
    }
}

/// One example: features and a target.
#[derive(Debug, Clone)]
pub struct RegressionItem {
    /// `FEATURES` values.
    pub x: Vec<f32>,
    /// The target.
    pub y: f32,
}

/// Features `[batch, FEATURES]` and targets `[batch, 1]`.
#[derive(Debug, Clone)]
pub struct RegressionBatch<B: Backend> {
    /// The features.
    pub inputs: Tensor<B, 2>,
    /// The targets.
    pub targets: Tensor<B, 2>,
}

/// Stacks items into a batch.
#[derive(Debug, Clone, Default)]
pub struct RegressionBatcher;

impl<B: Backend> Batcher<B, RegressionItem, RegressionBatch<B>> for RegressionBatcher {
    fn batch(&self, items: Vec<RegressionItem>, device: &B::Device) -> RegressionBatch<B> {
        let n = items.len();
        let x: Vec<f32> = items.iter().flat_map(|i| i.x.clone()).collect();
        let y: Vec<f32> = items.iter().map(|i| i.y).collect();
        RegressionBatch {
            inputs: Tensor::from_data(TensorData::new(x, [n, FEATURES]), device),
            targets: Tensor::from_data(TensorData::new(y, [n, 1]), device),
        }
    }
}

/// `n` examples of `y = sin(x₀) + Σ wᵢxᵢ + noise`, with a few outliers (where
/// Huber's loss pays off), features N(0, 1).
pub fn synthetic_regression(n: usize, seed: u64) -> InMemDataset<RegressionItem> {
    let mut rng = SplitMix64::new(seed);
    let weights: Vec<f64> = (0..FEATURES).map(|i| 0.5 - 0.1 * i as f64).collect();
    let items = (0..n)
        .map(|_| {
            let x: Vec<f64> = (0..FEATURES).map(|_| rng.normal()).collect();
            let mut y = x[0].sin() + x.iter().zip(&weights).map(|(a, w)| a * w).sum::<f64>();
            y += 0.05 * rng.normal();
            if rng.below(20) == 0 {
                y += 5.0 * rng.normal();
            }
            RegressionItem {
                x: x.iter().map(|&v| v as f32).collect(),
                y: y as f32,
            }
        })
        .collect();
    InMemDataset::new(items)
}

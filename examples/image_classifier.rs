//! A small CNN image classifier written exactly as a burn-train user writes one
//! (burn's guide): `Conv2d`, pooling, dropout, `Linear`, a `ClassificationOutput`
//! from `TrainStep`/`InferenceStep`, a `Batcher` of 4-D image tensors, and synthetic
//! images to train on. Nothing in it knows kiln.

use burn::data::dataloader::batcher::Batcher;
use burn::data::dataset::InMemDataset;
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::loss::CrossEntropyLossConfig;
use burn::nn::pool::{AdaptiveAvgPool2d, AdaptiveAvgPool2dConfig};
use burn::nn::{Dropout, DropoutConfig, Linear, LinearConfig, PaddingConfig2d, Relu};
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;
use burn::train::{ClassificationOutput, InferenceStep, TrainOutput, TrainStep};
use kiln_core::rng::SplitMix64;

/// Side of the square, one-channel synthetic images.
pub const SIDE: usize = 12;

/// The classifier: two convolutions, adaptive average pooling, two linear layers,
/// dropout between them.
#[derive(Module, Debug)]
pub struct ImageClassifier<B: Backend> {
    conv1: Conv2d<B>,
    conv2: Conv2d<B>,
    pool: AdaptiveAvgPool2d,
    dropout: Dropout,
    linear1: Linear<B>,
    linear2: Linear<B>,
    activation: Relu,
}

/// The classifier's sizes.
#[derive(Config, Debug)]
pub struct ImageClassifierConfig {
    /// Number of classes.
    pub num_classes: usize,
    /// Width of the hidden linear layer.
    #[config(default = "32")]
    pub hidden_size: usize,
    /// Dropout probability.
    #[config(default = "0.25")]
    pub dropout: f64,
}

impl ImageClassifierConfig {
    /// A classifier with Burn's default initialisation (from Burn's RNG: seed it
    /// with `B::seed` first for the same weights every time).
    pub fn init<B: Backend>(&self, device: &B::Device) -> ImageClassifier<B> {
        ImageClassifier {
            conv1: Conv2dConfig::new([1, 8], [3, 3])
                .with_padding(PaddingConfig2d::Same)
                .init(device),
            conv2: Conv2dConfig::new([8, 16], [3, 3]).init(device),
            pool: AdaptiveAvgPool2dConfig::new([4, 4]).init(),
            activation: Relu::new(),
            linear1: LinearConfig::new(16 * 4 * 4, self.hidden_size).init(device),
            linear2: LinearConfig::new(self.hidden_size, self.num_classes).init(device),
            dropout: DropoutConfig::new(self.dropout).init(),
        }
    }
}

impl<B: Backend> ImageClassifier<B> {
    /// Class scores `[batch, classes]` of images `[batch, 1, SIDE, SIDE]`.
    pub fn forward(&self, images: Tensor<B, 4>) -> Tensor<B, 2> {
        let x = self.activation.forward(self.conv1.forward(images));
        let x = self.dropout.forward(x);
        let x = self.activation.forward(self.conv2.forward(x));
        let x = self.pool.forward(x).flatten::<2>(1, 3);
        let x = self
            .dropout
            .forward(self.activation.forward(self.linear1.forward(x)));
        self.linear2.forward(x)
    }

    /// The forward pass with its cross-entropy loss.
    pub fn forward_classification(
        &self,
        images: Tensor<B, 4>,
        targets: Tensor<B, 1, Int>,
    ) -> ClassificationOutput<B> {
        let output = self.forward(images);
        let loss = CrossEntropyLossConfig::new()
            .init(&output.device())
            .forward(output.clone(), targets.clone());
        ClassificationOutput::new(loss, output, targets)
    }
}

impl<B: AutodiffBackend> TrainStep for ImageClassifier<B> {
    type Input = ImageBatch<B>;
    type Output = ClassificationOutput<B>;

    fn step(&self, batch: ImageBatch<B>) -> TrainOutput<ClassificationOutput<B>> {
        let item = self.forward_classification(batch.images, batch.targets);
        TrainOutput::new(self, item.loss.backward(), item)
    }
}

impl<B: Backend> InferenceStep for ImageClassifier<B> {
    type Input = ImageBatch<B>;
    type Output = ClassificationOutput<B>;

    fn step(&self, batch: ImageBatch<B>) -> ClassificationOutput<B> {
        self.forward_classification(batch.images, batch.targets)
    }
}

/// One synthetic image and its class.
#[derive(Debug, Clone)]
pub struct ImageItem {
    /// `SIDE × SIDE` pixels, row by row.
    pub pixels: Vec<f32>,
    /// The class.
    pub label: usize,
}

/// A batch of images `[batch, 1, SIDE, SIDE]` and their classes `[batch]`.
#[derive(Debug, Clone)]
pub struct ImageBatch<B: Backend> {
    /// The images.
    pub images: Tensor<B, 4>,
    /// The classes.
    pub targets: Tensor<B, 1, Int>,
}

/// Stacks image items into a batch (one batcher serves every backend).
#[derive(Debug, Clone, Default)]
pub struct ImageBatcher;

impl<B: Backend> Batcher<B, ImageItem, ImageBatch<B>> for ImageBatcher {
    fn batch(&self, items: Vec<ImageItem>, device: &B::Device) -> ImageBatch<B> {
        let n = items.len();
        let pixels: Vec<f32> = items.iter().flat_map(|i| i.pixels.clone()).collect();
        let labels: Vec<i64> = items.iter().map(|i| i.label as i64).collect();
        ImageBatch {
            images: Tensor::from_data(TensorData::new(pixels, [n, 1, SIDE, SIDE]), device),
            targets: Tensor::from_data(TensorData::new(labels, [n]), device),
        }
    }
}

/// `n` synthetic images of `classes` classes: class `k` is a bright 3×3 square at
/// its own place, on noise, shifted by up to a pixel.
pub fn synthetic_images(n: usize, classes: usize, seed: u64) -> InMemDataset<ImageItem> {
    let mut rng = SplitMix64::new(seed);
    let items = (0..n)
        .map(|_| {
            let label = rng.below(classes as u64) as usize;
            let mut pixels: Vec<f32> = (0..SIDE * SIDE)
                .map(|_| 0.3 * rng.next_f64() as f32)
                .collect();
            let (row, col) = (
                1 + (label * 5) % 7 + rng.below(2) as usize,
                1 + (label * 3) % 7 + rng.below(2) as usize,
            );
            for r in row..row + 3 {
                for c in col..col + 3 {
                    pixels[r * SIDE + c] = 1.0;
                }
            }
            ImageItem { pixels, label }
        })
        .collect();
    InMemDataset::new(items)
}

//! Data modules over token streams and tabular examples.

use burn::prelude::*;
use kiln_core::rng::SplitMix64;
use kiln_core::{Batch, DataModule, Error, Inputs, Split, Targets, TaskKind, TaskSpec};

/// Language-modelling examples cut from a token stream: example `i` of a split is
/// the window of `seq_len + 1` tokens starting at `i · seq_len` (input = the first
/// `seq_len`, target = the last `seq_len`). The first 90 % of the stream trains and
/// the rest validates, so no validation window overlaps a training one.
#[derive(Debug, Clone)]
pub struct TextDataModule {
    train: Vec<u32>,
    valid: Vec<u32>,
    seq_len: usize,
    vocab_size: usize,
}

/// Fraction of a token stream kept for validation.
pub const VALID_FRACTION: f64 = 0.1;

impl TextDataModule {
    /// Windows of `seq_len` over `tokens`, whose ids are below `vocab_size`.
    pub fn new(tokens: Vec<u32>, vocab_size: usize, seq_len: usize) -> kiln_core::Result<Self> {
        if seq_len == 0 {
            return Err(Error::invalid("seq_len", 0, "an integer >= 1"));
        }
        if let Some(bad) = tokens.iter().find(|&&t| t as usize >= vocab_size) {
            return Err(Error::Data(format!(
                "token id {bad} is not below vocab_size {vocab_size}"
            )));
        }
        let n_valid = ((tokens.len() as f64) * VALID_FRACTION) as usize;
        let split_at = tokens.len() - n_valid;
        let module = Self {
            valid: tokens[split_at..].to_vec(),
            train: tokens[..split_at].to_vec(),
            seq_len,
            vocab_size,
        };
        let need = 10 * (seq_len + 1);
        if module.len(Split::Train) == 0 || module.len(Split::Valid) == 0 {
            return Err(Error::Data(format!(
                "the text has {} tokens: too short for sequences of {seq_len} \
                 (at least {need} needed for one training and one validation window)",
                tokens.len()
            )));
        }
        Ok(module)
    }

    /// A seeded stream of `n_tokens` uniform random tokens below `vocab_size` (the
    /// benchmark's default data).
    pub fn random(
        vocab_size: usize,
        n_tokens: usize,
        seq_len: usize,
        seed: u64,
    ) -> kiln_core::Result<Self> {
        let mut rng = SplitMix64::new(seed);
        let tokens = (0..n_tokens)
            .map(|_| rng.below(vocab_size as u64) as u32)
            .collect();
        Self::new(tokens, vocab_size, seq_len)
    }

    /// Context length.
    pub fn seq_len(&self) -> usize {
        self.seq_len
    }

    /// Vocabulary size.
    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    fn stream(&self, split: Split) -> &[u32] {
        match split {
            Split::Train => &self.train,
            Split::Valid => &self.valid,
        }
    }
}

impl DataModule for TextDataModule {
    fn len(&self, split: Split) -> usize {
        self.stream(split).len().saturating_sub(1) / self.seq_len
    }

    fn batch<B: Backend>(
        &self,
        split: Split,
        indices: &[usize],
        device: &B::Device,
    ) -> kiln_core::Result<Batch<B>> {
        let (t, stream, len) = (self.seq_len, self.stream(split), self.len(split));
        let mut x = Vec::with_capacity(indices.len() * t);
        let mut y = Vec::with_capacity(indices.len() * t);
        for &i in indices {
            if i >= len {
                return Err(Error::Data(format!(
                    "{split} example {i} out of range (len {len})"
                )));
            }
            let w = &stream[i * t..i * t + t + 1];
            x.extend(w[..t].iter().map(|&v| v as i64));
            y.extend(w[1..].iter().map(|&v| v as i64));
        }
        let shape = [indices.len(), t];
        Ok(Batch {
            inputs: Inputs::Tokens(Tensor::from_data(TensorData::new(x, shape), device)),
            targets: Targets::Tokens(Tensor::from_data(TensorData::new(y, shape), device)),
        })
    }

    fn check_task(&self, task: &TaskSpec) -> kiln_core::Result<()> {
        match task.kind {
            TaskKind::Lm {
                vocab_size,
                seq_len,
            } => {
                if vocab_size < self.vocab_size {
                    return Err(Error::TaskMismatch(format!(
                        "the data has {} distinct tokens but the task's vocab_size is {vocab_size}",
                        self.vocab_size
                    )));
                }
                if seq_len != self.seq_len {
                    return Err(Error::TaskMismatch(format!(
                        "the data's sequences have {} tokens but the task's seq_len is {seq_len}",
                        self.seq_len
                    )));
                }
                Ok(())
            }
            ref other => Err(Error::TaskMismatch(format!(
                "text data feeds language modelling, not {}",
                other.type_name()
            ))),
        }
    }

    fn items_per_example(&self) -> usize {
        self.seq_len
    }
}

/// Targets of a [`TabularDataModule`].
#[derive(Debug, Clone)]
enum TabularTargets {
    Classes(Vec<i64>),
    Values { values: Vec<f32>, outputs: usize },
}

#[derive(Debug, Clone)]
struct TabularSplit {
    features: Vec<f32>,
    targets: TabularTargets,
}

/// Synthetic tabular examples: Gaussian blobs for classification, a noisy linear
/// map for regression. Deterministic for a seed.
#[derive(Debug, Clone)]
pub struct TabularDataModule {
    n_features: usize,
    train: TabularSplit,
    valid: TabularSplit,
}

impl TabularDataModule {
    /// `num_classes` Gaussian blobs (unit variance, centres drawn N(0, 2²)) in
    /// `n_features` dimensions.
    pub fn blobs(
        num_classes: usize,
        n_features: usize,
        n_train: usize,
        n_valid: usize,
        seed: u64,
    ) -> Self {
        let mut rng = SplitMix64::new(seed);
        let centres: Vec<f32> = rng.normal_vec(num_classes * n_features, 0.0, 2.0);
        let mut make = |n: usize| {
            let mut features = Vec::with_capacity(n * n_features);
            let mut classes = Vec::with_capacity(n);
            for _ in 0..n {
                let c = rng.below(num_classes as u64) as usize;
                classes.push(c as i64);
                for f in 0..n_features {
                    features.push(centres[c * n_features + f] + rng.normal() as f32);
                }
            }
            TabularSplit {
                features,
                targets: TabularTargets::Classes(classes),
            }
        };
        let train = make(n_train);
        let valid = make(n_valid);
        Self {
            n_features,
            train,
            valid,
        }
    }

    /// `y = x W + 0.1 ε` with `W` drawn N(0, 1), `outputs` values per example.
    pub fn linear(
        outputs: usize,
        n_features: usize,
        n_train: usize,
        n_valid: usize,
        seed: u64,
    ) -> Self {
        let mut rng = SplitMix64::new(seed);
        let w: Vec<f32> = rng.normal_vec(n_features * outputs, 0.0, 1.0);
        let mut make = |n: usize| {
            let features: Vec<f32> = rng.normal_vec(n * n_features, 0.0, 1.0);
            let mut values = Vec::with_capacity(n * outputs);
            for row in features.chunks(n_features) {
                for o in 0..outputs {
                    let dot: f32 = row
                        .iter()
                        .enumerate()
                        .map(|(f, x)| x * w[f * outputs + o])
                        .sum();
                    values.push(dot + 0.1 * rng.normal() as f32);
                }
            }
            TabularSplit {
                features,
                targets: TabularTargets::Values { values, outputs },
            }
        };
        let train = make(n_train);
        let valid = make(n_valid);
        Self {
            n_features,
            train,
            valid,
        }
    }

    /// Features per example.
    pub fn n_features(&self) -> usize {
        self.n_features
    }

    fn split(&self, split: Split) -> &TabularSplit {
        match split {
            Split::Train => &self.train,
            Split::Valid => &self.valid,
        }
    }
}

impl DataModule for TabularDataModule {
    fn len(&self, split: Split) -> usize {
        self.split(split).features.len() / self.n_features
    }

    fn batch<B: Backend>(
        &self,
        split: Split,
        indices: &[usize],
        device: &B::Device,
    ) -> kiln_core::Result<Batch<B>> {
        let (s, f, len) = (self.split(split), self.n_features, self.len(split));
        if let Some(&i) = indices.iter().find(|&&i| i >= len) {
            return Err(Error::Data(format!(
                "{split} example {i} out of range (len {len})"
            )));
        }
        let n = indices.len();
        let x: Vec<f32> = indices
            .iter()
            .flat_map(|&i| s.features[i * f..(i + 1) * f].iter().copied())
            .collect();
        let inputs = Inputs::Features(Tensor::from_data(TensorData::new(x, [n, f]), device));
        let targets = match &s.targets {
            TabularTargets::Classes(c) => {
                let y: Vec<i64> = indices.iter().map(|&i| c[i]).collect();
                Targets::Classes(Tensor::from_data(TensorData::new(y, [n]), device))
            }
            TabularTargets::Values { values, outputs } => {
                let o = *outputs;
                let y: Vec<f32> = indices
                    .iter()
                    .flat_map(|&i| values[i * o..(i + 1) * o].iter().copied())
                    .collect();
                Targets::Values(Tensor::from_data(TensorData::new(y, [n, o]), device))
            }
        };
        Ok(Batch { inputs, targets })
    }

    fn check_task(&self, task: &TaskSpec) -> kiln_core::Result<()> {
        match (&task.kind, &self.train.targets) {
            (TaskKind::Classification { num_classes }, TabularTargets::Classes(c)) => {
                let max = c.iter().copied().max().unwrap_or(0) as usize;
                if max >= *num_classes {
                    return Err(Error::TaskMismatch(format!(
                        "the data has class id {max} but the task has {num_classes} classes"
                    )));
                }
                Ok(())
            }
            (TaskKind::Regression { outputs }, TabularTargets::Values { outputs: have, .. })
                if outputs == have =>
            {
                Ok(())
            }
            (kind, _) => Err(Error::TaskMismatch(format!(
                "these tabular targets do not fit a {} task ({:?})",
                kind.type_name(),
                kind
            ))),
        }
    }
}

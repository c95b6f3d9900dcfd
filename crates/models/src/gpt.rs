//! The tiny character-level GPT of `shared/bench/README.md`.
//!
//! Pre-LayerNorm decoder blocks (`x += Attn(LN1(x)); x += MLP(LN2(x))`), learned
//! absolute positions, causal multi-head self-attention with separate Q, K, V
//! projections, an exact (erf) GELU MLP, a final LayerNorm and an untied head, every
//! Linear with a bias. Parameter count
//! `V·d + T·d + L·(12d² + 13d) + 2d + d·V + V` = 421,697 for V = 65, T = 64,
//! d = 128, L = 2.
//!
//! Its GELU, softmax and LayerNorms are kiln's fused operations ([`kiln_kernels`]),
//! so the model wants a backend with [`FusedOps`]: every backend kiln ships has it.

use burn::module::Param;
use burn::prelude::*;
use kiln_core::rng::SplitMix64;
use kiln_core::{Error, Inputs, Prediction, TaskKind, TaskModel, TaskSpec};
use kiln_kernels::{FusedOps, LayerNorm, causal_attention, gelu};

use crate::layers::{Dense, normal_tensor};

/// The ε of every LayerNorm.
const LN_EPS: f64 = 1e-5;

/// Shape of a [`TinyGpt`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TinyGptConfig {
    /// Vocabulary size V.
    pub vocab_size: usize,
    /// Context length T.
    pub seq_len: usize,
    /// Model width d.
    pub d_model: usize,
    /// Attention heads (must divide `d_model`).
    pub n_heads: usize,
    /// Decoder blocks L.
    pub n_layers: usize,
    /// Hidden width of each block's MLP.
    pub d_ff: usize,
}

impl TinyGptConfig {
    /// The benchmark's configuration for a vocabulary of `vocab_size` tokens:
    /// T = 64, d = 128, 4 heads, 2 layers, MLP 512.
    pub fn tiny(vocab_size: usize) -> Self {
        Self {
            vocab_size,
            seq_len: 64,
            d_model: 128,
            n_heads: 4,
            n_layers: 2,
            d_ff: 512,
        }
    }

    /// The benchmark's second, larger configuration: d = 256, 4 layers, T = 128.
    pub fn small(vocab_size: usize) -> Self {
        Self {
            vocab_size,
            seq_len: 128,
            d_model: 256,
            n_heads: 4,
            n_layers: 4,
            d_ff: 1024,
        }
    }

    /// Number of trainable parameters this configuration has.
    pub fn num_params(&self) -> usize {
        let (v, t, d, f) = (self.vocab_size, self.seq_len, self.d_model, self.d_ff);
        let block = 2 * d + 4 * (d * d + d) + 2 * d + (d * f + f) + (f * d + d);
        v * d + t * d + self.n_layers * block + 2 * d + d * v + v
    }

    /// Builds the model with weights drawn from `seed`.
    pub fn init<B: Backend>(&self, seed: u64, device: &B::Device) -> kiln_core::Result<TinyGpt<B>> {
        if self.n_heads == 0 || !self.d_model.is_multiple_of(self.n_heads) {
            return Err(Error::invalid(
                "n_heads",
                self.n_heads,
                format!("a divisor of d_model {}", self.d_model),
            ));
        }
        for (field, v) in [
            ("vocab_size", self.vocab_size),
            ("seq_len", self.seq_len),
            ("d_model", self.d_model),
            ("n_layers", self.n_layers),
            ("d_ff", self.d_ff),
        ] {
            if v == 0 {
                return Err(Error::invalid(field, v, "an integer >= 1"));
            }
        }
        let mut rng = SplitMix64::new(seed);
        let d = self.d_model;
        let tok_emb = Param::from_tensor(normal_tensor([self.vocab_size, d], &mut rng, device));
        let pos_emb = Param::from_tensor(normal_tensor([self.seq_len, d], &mut rng, device));
        let blocks = (0..self.n_layers)
            .map(|_| Block::new(d, self.n_heads, self.d_ff, &mut rng, device))
            .collect();
        let ln_f = LayerNorm::new(d, LN_EPS, device);
        let head = Dense::new(d, self.vocab_size, &mut rng, device);
        Ok(TinyGpt {
            tok_emb,
            pos_emb,
            blocks,
            ln_f,
            head,
        })
    }
}

/// One pre-LN decoder block.
#[derive(Module, Debug)]
pub struct Block<B: Backend> {
    ln1: LayerNorm<B>,
    q: Dense<B>,
    k: Dense<B>,
    v: Dense<B>,
    proj: Dense<B>,
    ln2: LayerNorm<B>,
    up: Dense<B>,
    down: Dense<B>,
    n_heads: usize,
}

impl<B: Backend> Block<B> {
    fn new(
        d: usize,
        n_heads: usize,
        d_ff: usize,
        rng: &mut SplitMix64,
        device: &B::Device,
    ) -> Self {
        let ln = || LayerNorm::new(d, LN_EPS, device);
        Self {
            ln1: ln(),
            q: Dense::new(d, d, rng, device),
            k: Dense::new(d, d, rng, device),
            v: Dense::new(d, d, rng, device),
            proj: Dense::new(d, d, rng, device),
            ln2: ln(),
            up: Dense::new(d, d_ff, rng, device),
            down: Dense::new(d_ff, d, rng, device),
            n_heads,
        }
    }
}

impl<B: FusedOps> Block<B> {
    /// `x`: `[b·t, d]`, `b` sequences of `t` tokens.
    fn forward(&self, x: Tensor<B, 2>, b: usize, t: usize) -> Tensor<B, 2> {
        let [_, d] = x.dims();
        let a = self.ln1.forward(x.clone());
        let seqs = |y: Tensor<B, 2>| y.reshape([b, t, d]);
        let q = seqs(self.q.forward(a.clone()));
        let k = seqs(self.k.forward(a.clone()));
        let v = seqs(self.v.forward(a));
        let y = causal_attention(q, k, v, self.n_heads).reshape([b * t, d]);
        let x = x + self.proj.forward(y);
        let m = self
            .down
            .forward(gelu(self.up.forward(self.ln2.forward(x.clone()))));
        x + m
    }
}

/// The tiny GPT. Build it with [`TinyGptConfig::init`].
#[derive(Module, Debug)]
pub struct TinyGpt<B: Backend> {
    tok_emb: Param<Tensor<B, 2>>,
    pos_emb: Param<Tensor<B, 2>>,
    blocks: Vec<Block<B>>,
    ln_f: LayerNorm<B>,
    head: Dense<B>,
}

impl<B: FusedOps> TinyGpt<B> {
    /// Logits `[b, t, V]` for token ids `[b, t]`, `t` at most the configured context.
    pub fn logits(&self, tokens: Tensor<B, 2, Int>) -> kiln_core::Result<Tensor<B, 3>> {
        let [b, t] = tokens.dims();
        let [max_t, d] = self.pos_emb.dims();
        if t == 0 || t > max_t {
            return Err(Error::TaskMismatch(format!(
                "sequence length {t} does not fit the model's context of {max_t} tokens"
            )));
        }
        let pos = self.pos_emb.val().narrow(0, 0, t).unsqueeze::<3>();
        let x = burn::tensor::module::embedding(self.tok_emb.val(), tokens) + pos;
        let mut x = x.reshape([b * t, d]);
        for block in &self.blocks {
            x = block.forward(x, b, t);
        }
        let logits = self.head.forward(self.ln_f.forward(x));
        let [_, v] = logits.dims();
        Ok(logits.reshape([b, t, v]))
    }
}

impl<B: FusedOps> TaskModel<B> for TinyGpt<B> {
    fn forward(&self, inputs: Inputs<B>) -> kiln_core::Result<Prediction<B>> {
        Ok(Prediction::TokenLogits(self.logits(inputs.into_tokens()?)?))
    }

    fn check_task(&self, task: &TaskSpec) -> kiln_core::Result<()> {
        let [vocab, _] = self.tok_emb.dims();
        let [context, _] = self.pos_emb.dims();
        match task.kind {
            TaskKind::Lm {
                vocab_size,
                seq_len,
            } => {
                if vocab_size != vocab {
                    return Err(Error::TaskMismatch(format!(
                        "the model has a vocabulary of {vocab} tokens but the task's vocab_size is {vocab_size}"
                    )));
                }
                if seq_len > context {
                    return Err(Error::TaskMismatch(format!(
                        "the model's context is {context} tokens but the task's seq_len is {seq_len}"
                    )));
                }
                Ok(())
            }
            ref other => Err(Error::TaskMismatch(format!(
                "the GPT does language modelling, not {}",
                other.type_name()
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_backend_cpu::NdArray;
    use rstest::rstest;

    #[rstest]
    #[case::benchmark(TinyGptConfig::tiny(65), 421_697)]
    #[case::small(TinyGptConfig::small(65), 3_225_665)]
    fn parameter_count_matches_the_benchmark_formula(
        #[case] cfg: TinyGptConfig,
        #[case] want: usize,
    ) {
        let (v, t, d, l) = (cfg.vocab_size, cfg.seq_len, cfg.d_model, cfg.n_layers);
        // shared/bench/README.md: P = V·d + T·d + L·(12d² + 13d) + 2d + d·V + V (with d_ff = 4d)
        assert_eq!(
            v * d + t * d + l * (12 * d * d + 13 * d) + 2 * d + d * v + v,
            want
        );
        assert_eq!(cfg.num_params(), want);
        let model = cfg.init::<NdArray>(1, &Default::default()).unwrap();
        assert_eq!(model.num_params(), want);
    }

    #[test]
    fn logits_have_the_task_shape_and_too_long_inputs_are_refused() {
        let dev = Default::default();
        let model = TinyGptConfig {
            seq_len: 8,
            ..TinyGptConfig::tiny(11)
        }
        .init::<NdArray>(1, &dev)
        .unwrap();
        let tokens = Tensor::<NdArray, 2, Int>::zeros([3, 8], &dev);
        assert_eq!(model.logits(tokens).unwrap().dims(), [3, 8, 11]);
        let long = Tensor::<NdArray, 2, Int>::zeros([1, 9], &dev);
        let err = model.logits(long).unwrap_err().to_string();
        assert!(
            err.contains("sequence length 9 does not fit the model's context of 8"),
            "{err}"
        );
    }

    #[test]
    fn the_same_seed_builds_the_same_weights() {
        let dev = Default::default();
        let a = TinyGptConfig::tiny(5)
            .init::<NdArray>(3, &dev)
            .unwrap()
            .into_record();
        let b = TinyGptConfig::tiny(5)
            .init::<NdArray>(3, &dev)
            .unwrap()
            .into_record();
        let c = TinyGptConfig::tiny(5)
            .init::<NdArray>(4, &dev)
            .unwrap()
            .into_record();
        let head = |r: &TinyGptRecord<NdArray>| r.head.weight.val().into_data();
        assert_eq!(head(&a), head(&b));
        assert_ne!(head(&a), head(&c));
    }

    /// Loss and the gradient of the token embedding after one forward and backward.
    fn loss_and_grad<B: kiln_kernels::FusedAutodiffBackend>() -> (f32, Vec<f32>) {
        use burn::tensor::activation::log_softmax;
        let dev = Default::default();
        let model = TinyGptConfig::tiny(13).init::<B>(5, &dev).unwrap();
        let ids: Vec<i32> = (0..2 * 64).map(|i| i * 7 % 13).collect();
        let tokens = Tensor::<B, 2, Int>::from_data(TensorData::new(ids, [2, 64]), &dev);
        let logits = model.logits(tokens.clone()).unwrap();
        let loss = log_softmax(logits, 2)
            .gather(2, tokens.unsqueeze_dim::<3>(2))
            .mean()
            .neg();
        let grads = loss.backward();
        let grad = model.tok_emb.grad(&grads).unwrap();
        (
            loss.into_scalar().elem(),
            grad.into_data().to_vec().unwrap(),
        )
    }

    /// Flex runs kiln's fused kernels, NdArray Burn's ops: the same model agrees.
    #[test]
    fn the_fused_kernels_train_as_burns_ops_do() {
        use burn::backend::Autodiff;
        use kiln_backend_cpu::Flex;
        let (flex_loss, flex_grad) = loss_and_grad::<Autodiff<Flex>>();
        let (ndarray_loss, ndarray_grad) = loss_and_grad::<Autodiff<NdArray>>();
        assert!(
            (flex_loss - ndarray_loss).abs() < 1e-5,
            "{flex_loss} vs {ndarray_loss}"
        );
        // The embedding's gradient sums many tokens' terms with cancellations: compare
        // each element against the largest.
        let scale = ndarray_grad.iter().fold(0.0f32, |m, g| m.max(g.abs()));
        let worst = flex_grad
            .iter()
            .zip(&ndarray_grad)
            .fold(0.0f32, |m, (f, n)| m.max((f - n).abs()));
        assert!(
            worst < 5e-4 * scale,
            "largest difference {worst}, largest gradient {scale}"
        );
    }
}

//! Reference models and data for kiln.
//!
//! - [`gpt`]: the tiny decoder-only character-level GPT of the benchmark
//!   (421,697 parameters at vocabulary 65), built from [`layers`].
//! - [`mlp`]: an MLP for classification and regression.
//! - [`text`]: the character tokenizer, the built-in corpus and text-file loading.
//! - [`data`]: data modules over token streams and tabular examples.
//!
//! Every weight is drawn from kiln's own seeded generator ([`kiln_core::rng`]), not
//! Burn's process-global RNG, so a model built from one seed is the same in every
//! thread and every process.

pub mod data;
pub mod gpt;
pub mod layers;
pub mod mlp;
pub mod text;

pub use data::{TabularDataModule, TextDataModule};
pub use gpt::{TinyGpt, TinyGptConfig};
pub use mlp::{Mlp, MlpConfig};
pub use text::{CharTokenizer, builtin_corpus, load_text_file};

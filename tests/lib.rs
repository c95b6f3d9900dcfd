//! Helpers shared by kiln's cross-crate tests.

use kiln_coordinator::{CoordinatorBuilder, TrainingCoordinator};
use kiln_core::{ProgressMode, TaskKind, TaskSpec};
use kiln_models::{CharTokenizer, TextDataModule, TinyGptConfig, builtin_corpus};

/// The first `chars` characters of the built-in corpus as an LM data module with
/// context `seq_len`, and the matching task spec.
pub fn corpus_data(chars: usize, seq_len: usize) -> (TextDataModule, TaskSpec) {
    let text: String = builtin_corpus().chars().take(chars).collect();
    let tok = CharTokenizer::from_text(&builtin_corpus());
    let data = TextDataModule::new(tok.encode(&text).unwrap(), tok.vocab_size(), seq_len).unwrap();
    let task = TaskSpec::new(
        "lm_test",
        TaskKind::Lm {
            vocab_size: tok.vocab_size(),
            seq_len,
        },
    );
    (data, task)
}

/// A GPT small enough for debug-build tests: d 32, 2 heads, 1 layer.
pub fn small_gpt(vocab_size: usize, seq_len: usize) -> TinyGptConfig {
    TinyGptConfig {
        vocab_size,
        seq_len,
        d_model: 32,
        n_heads: 2,
        n_layers: 1,
        d_ff: 64,
    }
}

/// A builder with quiet progress writing into `dir`.
pub fn quiet(dir: &std::path::Path) -> CoordinatorBuilder {
    TrainingCoordinator::builder()
        .progress(ProgressMode::Off)
        .default_root_dir(dir)
}

//! Train the tiny GPT on the built-in corpus through the `TrainingCoordinator`,
//! using kiln as a library.
//!
//! ```text
//! cargo run --release -p kiln-examples --example train_tiny_gpt
//! ```

use anyhow::Result;
use burn::backend::Autodiff;
use kiln_backend_cpu::Flex;
use kiln_coordinator::TrainingCoordinator;
use kiln_core::{LrSchedule, TaskKind, TaskSpec};
use kiln_models::{CharTokenizer, TextDataModule, TinyGptConfig, builtin_corpus};

fn main() -> Result<()> {
    type B = Autodiff<Flex>;
    let text = builtin_corpus();
    let tokenizer = CharTokenizer::from_text(&text);
    let vocab = tokenizer.vocab_size();
    let data = TextDataModule::new(tokenizer.encode(&text)?, vocab, 64)?;
    let task = TaskSpec {
        kind: TaskKind::Lm {
            vocab_size: vocab,
            seq_len: 64,
        },
        ..TaskSpec::lm_tiny()
    };
    let model = TinyGptConfig::tiny(vocab).init::<B>(1337, &Default::default())?;

    // The seed card's constructor, in Lightning's words.
    let coordinator = TrainingCoordinator::builder()
        .strategy("auto")
        .precision("32-true")
        .devices("auto")
        .num_nodes(1)
        .enable_checkpointing(true)
        .log_every_n_steps(10)
        .learning_rate(1e-3)
        .lr_schedule(LrSchedule::WarmupCosine {
            warmup_steps: 20,
            min_lr_ratio: 0.1,
        })
        .max_steps(200)
        .default_root_dir("runs")
        .experiment("examples")
        .build()?;
    let trained = coordinator.train::<B, _, _>(model, &data, &task, None, 1)?;
    let report = &trained.report;
    eprintln!(
        "{} in {} steps: valid loss {:.4}, {:.0} tokens/s; outputs in {}",
        report.status.label(),
        report.optimizer_steps,
        report
            .final_metrics
            .get("valid/loss")
            .copied()
            .unwrap_or(f64::NAN),
        report.throughput.items_per_s,
        report
            .run_dir
            .as_ref()
            .map(|d| d.display().to_string())
            .unwrap_or_default()
    );
    Ok(())
}

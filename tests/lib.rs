//! Helpers shared by kiln's cross-crate tests.

use std::io::Read;
use std::process::{Child, Output};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use burn::prelude::Backend;
use kiln_coordinator::{CoordinatorBuilder, TrainingCoordinator};
use kiln_core::{Batch, DataModule, ProgressMode, Split, TaskKind, TaskSpec};
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

/// The per-step training losses of `report` as bits: two runs took the same steps
/// exactly when these are equal.
pub fn loss_bits(report: &kiln_core::TrainReport) -> Vec<u32> {
    report.step_losses.iter().map(|x| x.to_bits()).collect()
}

/// Every float parameter of `model`, flattened in visiting order: two models hold
/// the same weights exactly when these vectors are equal bit for bit.
pub fn param_values<B: burn::prelude::Backend, M: burn::module::Module<B>>(model: &M) -> Vec<u32> {
    use burn::module::{ModuleVisitor, Param};
    use burn::prelude::Tensor;
    struct Collect(Vec<u32>);
    impl<B: burn::prelude::Backend> ModuleVisitor<B> for Collect {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            let data = param.val().into_data().convert::<f32>();
            self.0.extend(
                data.as_slice::<f32>()
                    .unwrap_or(&[])
                    .iter()
                    .map(|x| x.to_bits()),
            );
        }
    }
    let mut c = Collect(Vec::new());
    model.visit(&mut c);
    c.0
}

/// `inner`, with `hook` called before every training batch is built: a test's way to
/// stop a run or fail a batch at a chosen point. The hook gets the number of training
/// batches asked for before this one.
pub struct Hooked<'a, F> {
    /// The data served.
    pub inner: &'a TextDataModule,
    /// Called before each training batch; an error fails that batch.
    pub hook: F,
    seen: std::sync::atomic::AtomicUsize,
}

impl<'a, F: Fn(usize) -> kiln_core::Result<()> + Send + Sync> Hooked<'a, F> {
    /// `inner` with `hook`.
    pub fn new(inner: &'a TextDataModule, hook: F) -> Self {
        Self {
            inner,
            hook,
            seen: 0.into(),
        }
    }
}

impl<F: Fn(usize) -> kiln_core::Result<()> + Send + Sync> DataModule for Hooked<'_, F> {
    fn len(&self, split: Split) -> usize {
        self.inner.len(split)
    }
    fn batch<B: Backend>(
        &self,
        split: Split,
        idx: &[usize],
        device: &B::Device,
    ) -> kiln_core::Result<Batch<B>> {
        if split == Split::Train {
            (self.hook)(self.seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst))?;
        }
        self.inner.batch(split, idx, device)
    }
    fn check_task(&self, task: &TaskSpec) -> kiln_core::Result<()> {
        self.inner.check_task(task)
    }
    fn items_per_example(&self) -> usize {
        self.inner.items_per_example()
    }
}

/// The output of `child` once it exits, waited for at most `limit`. Its pipes are
/// read on threads (a full pipe never blocks it), and their end, when the child
/// exits, is the event waited for; past `limit` the child is killed and the test
/// fails naming `what`.
pub fn output_within(mut child: Child, limit: Duration, what: &str) -> Output {
    let (ended, end) = mpsc::channel();
    let stdout = read_all(child.stdout.take(), ended.clone());
    let stderr = read_all(child.stderr.take(), ended);
    let deadline = Instant::now() + limit;
    for _ in 0..2 {
        let left = deadline.saturating_duration_since(Instant::now());
        if end.recv_timeout(left).is_err() {
            let _ = child.kill();
            panic!("{what} still running after {limit:?}: it hangs");
        }
    }
    Output {
        status: child.wait().unwrap(),
        stdout: stdout.join().unwrap(),
        stderr: stderr.join().unwrap(),
    }
}

/// Reads `stream` to its end on a thread, then says so on `ended`.
fn read_all(
    stream: Option<impl Read + Send + 'static>,
    ended: mpsc::Sender<()>,
) -> std::thread::JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut bytes = Vec::new();
        if let Some(mut stream) = stream {
            let _ = stream.read_to_end(&mut bytes);
        }
        let _ = ended.send(());
        bytes
    })
}

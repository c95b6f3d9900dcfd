//! Helpers shared by kiln's cross-crate tests.

use std::io::Read;
use std::process::{Child, Command, Output, Stdio};
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

/// Marks a process of the test binary started by [`own_process`] to run one test.
const OWN_PROCESS: &str = "KILN_TEST_OWN_PROCESS";

/// The full name of the running test (`module::test`, and `::case_N_name` for an
/// rstest case): libtest names each test's thread after it.
pub fn test_name() -> String {
    std::thread::current()
        .name()
        .filter(|name| *name != "main")
        .expect("a test runs on a thread libtest named after it")
        .to_owned()
}

/// Whether the calling test runs its body here. For a test that needs a
/// process-wide resource to itself: Burn's RNG on the CPU backends is one per
/// process, and every training run of the other tests reseeds it.
///
/// In the shared test process this starts the binary again with the test as its
/// only one, waits for it (at most 15 minutes), fails if it failed or ran no test,
/// and returns `false`: the caller returns, its body having passed there. In that
/// process of its own it returns `true`.
///
/// ```no_run
/// #[test]
/// fn two_runs_draw_the_same_dropout_masks() {
///     if !kiln_tests::own_process() {
///         return;
///     }
///     // ... train twice and compare
/// }
/// ```
pub fn own_process() -> bool {
    if std::env::var_os(OWN_PROCESS).is_some() {
        return true;
    }
    let name = test_name();
    let child = Command::new(std::env::current_exe().expect("the test binary's path"))
        .args([name.as_str(), "--exact", "--nocapture", "--test-threads=1"])
        .env(OWN_PROCESS, &name)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the test binary starts again");
    let output = output_within(child, Duration::from_secs(900), &name);
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "{name} failed in its own process ({}):\n{stdout}\n{stderr}",
        output.status
    );
    // A filter that matched nothing would pass without running the body.
    assert!(
        stdout.contains("test result: ok. 1 passed"),
        "{name} did not run in its own process:\n{stdout}\n{stderr}"
    );
    eprintln!("{name}: passed in a process of its own");
    false
}

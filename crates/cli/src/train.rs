//! `kiln train`.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
#[cfg(not(feature = "cuda-nccl"))]
use burn::backend::Autodiff;
use burn::module::AutodiffModule;
use burn::tensor::backend::AutodiffBackend;
use clap::Parser;
use kiln_backend_cpu::CpuBackend;
#[cfg(not(feature = "cuda-nccl"))]
use kiln_backend_cpu::{Flex, NdArray};
use kiln_coordinator::{CoordinatorBuilder, CoordinatorError, Trained, TrainingCoordinator};
use kiln_core::launch::{NodeFlags, NodeLaunch, NodeSettings};
use kiln_core::{
    CoordinatorConfig, DataModule, LrSchedule, ProgressMode, TaskKind, TaskModel, TaskSpec,
    TrainReport,
};
use kiln_experiment_db::{ExperimentDb, RunTracker, StoreLocation};
use kiln_kernels::FusedAutodiffBackend;
use kiln_models::{
    CharTokenizer, MlpConfig, TabularDataModule, TextDataModule, TinyGptConfig, builtin_corpus,
    load_text_file,
};

use crate::signals::{CurrentRun, stop_on_signals};

/// Train a model. With no flags: the tiny GPT on the built-in corpus for one epoch
/// on CPU.
#[derive(Debug, Clone, Parser)]
#[command(name = "kiln train")]
pub struct TrainArgs {
    /// Task preset: lm_tiny (tiny GPT on text), cls_tiny or reg_tiny (MLP on synthetic tables).
    #[arg(long, default_value = "lm_tiny")]
    task: String,
    /// UTF-8 text file to train the language model on (default: the built-in corpus).
    #[arg(long, value_name = "FILE")]
    text: Option<PathBuf>,
    /// Backend: flex or ndarray (CPU), or cuda (needs a `kiln` built with
    /// `--features cuda`; trains on the GPUs `--devices` selects).
    #[arg(long, default_value = "flex")]
    backend: String,
    /// auto, single, vanilla, ddp, ddp_spawn or fsdp (Lightning's `strategy`).
    #[arg(long, default_value = "auto")]
    strategy: String,
    /// auto, learner (burn-train's Learner) or native (kiln's own loop): the
    /// engine that runs the loop; auto picks the Learner engine where it can run.
    #[arg(long, default_value = "auto")]
    engine: String,
    /// auto, collective or nccl: what carries a data-parallel group's gradients
    /// (Lightning's `process_group_backend`): burn-collective's all-reduce once per
    /// step, or burn-train's NCCL synchronisation during backward (--backend cuda,
    /// a kiln built with --features cuda-nccl); auto picks nccl where it can run.
    #[arg(long, default_value = "auto")]
    process_group_backend: String,
    /// 32-true, bf16-mixed, 16-mixed, bf16-true, 16-true (Lightning's `precision`).
    #[arg(long, default_value = "32-true")]
    precision: String,
    /// Fail when the backend lacks the precision's dtype (NdArray has no bf16)
    /// instead of training in 32-true with a warning.
    #[arg(long)]
    strict_precision: bool,
    /// auto, a count, -1, or a list such as 0,2 (Lightning's `devices`).
    #[arg(long, default_value = "auto")]
    devices: String,
    /// Number of machines (Lightning's `num_nodes`; default 1, or what torchrun's
    /// or SLURM's environment says: docs/multi-node.md).
    #[arg(long)]
    num_nodes: Option<u32>,
    /// This machine's rank in a multi-node run (default 0, or from the environment).
    #[arg(long)]
    node_rank: Option<u32>,
    /// Host of node 0, where the rendezvous listens (default 127.0.0.1).
    #[arg(long)]
    master_addr: Option<String>,
    /// Port of the rendezvous on node 0 (default 29500); node k also listens on
    /// master-port + 1 + k.
    #[arg(long)]
    master_port: Option<u16>,
    /// This node's address as the other nodes reach it (default: loopback for a
    /// loopback master, else the address of the route to the master).
    #[arg(long, env = "KILN_NODE_ADDR")]
    node_addr: Option<String>,
    /// Seconds a node waits for the others at any exchange before the run fails,
    /// naming the missing node (must exceed node 0's validation and checkpoint time).
    #[arg(long, value_name = "SECONDS", default_value_t = kiln_core::launch::NodeSettings::DEFAULT_TIMEOUT_S)]
    node_timeout: f64,
    /// Epochs to train.
    #[arg(long, default_value_t = 1)]
    epochs: usize,
    /// Stop after this many optimizer steps.
    #[arg(long)]
    max_steps: Option<u64>,
    /// Train on at most this many batches per epoch.
    #[arg(long)]
    limit_train_batches: Option<usize>,
    /// Validate on at most this many batches per epoch.
    #[arg(long)]
    limit_val_batches: Option<usize>,
    /// Examples per batch.
    #[arg(long, default_value_t = 32)]
    batch_size: usize,
    /// Learning rate.
    #[arg(long, default_value_t = 3e-4)]
    lr: f64,
    /// AdamW's eps (16-true needs >= 6.1e-5: smaller is zero in f16).
    #[arg(long, default_value_t = 1e-8)]
    eps: f32,
    /// Linear warm-up steps, then cosine decay to 10% (0: constant learning rate).
    #[arg(long, default_value_t = 0)]
    warmup_steps: u64,
    /// Micro-batches per optimizer step (gradients averaged).
    #[arg(long, default_value_t = 1)]
    accumulate_grad_batches: u32,
    /// Clip the global gradient norm to this value.
    #[arg(long)]
    gradient_clip_val: Option<f64>,
    /// Seed for weights, data order and synthetic data.
    #[arg(long, default_value_t = 1337)]
    seed: u64,
    /// Log metrics every N optimizer steps.
    #[arg(long, default_value_t = 10)]
    log_every_n_steps: u64,
    /// Context length of the language model.
    #[arg(long, default_value_t = 64)]
    seq_len: usize,
    /// Where run directories go.
    #[arg(long, default_value = "runs")]
    output_dir: PathBuf,
    /// Experiment name.
    #[arg(long, default_value = "default")]
    experiment: String,
    /// Run name (generated when absent).
    #[arg(long)]
    run_name: Option<String>,
    /// Progress display: auto, bar, lines, off, or tui (burn-train's dashboard).
    #[arg(long, default_value = "auto")]
    progress: String,
    /// burn-train's terminal dashboard (same as --progress tui; needs a `kiln`
    /// built with `--features tui` and the Learner engine).
    #[arg(long, conflicts_with = "progress")]
    tui: bool,
    /// Do not write checkpoints or the trained weights.
    #[arg(long)]
    no_checkpointing: bool,
    /// Resume the run from its checkpoint: last, best, or a checkpoint directory
    /// (with --run-name, last/best look in that run; else in the newest run).
    #[arg(long, value_name = "last|best|DIR")]
    resume: Option<String>,
    /// Also write a checkpoint every N optimizer steps (default: every epoch only).
    #[arg(long, value_name = "N")]
    checkpoint_every_n_steps: Option<u64>,
    /// Keep this many best checkpoints by validation loss, besides the last.
    #[arg(long, default_value_t = 1)]
    save_top_k: usize,
    /// Experiment store to record the run in: a SQLite file, or a shared PostgreSQL
    /// database as postgres://user[:password]@host[:port]/dbname (default:
    /// <output-dir>/kiln.sqlite).
    #[arg(long, value_name = "FILE|URL")]
    db: Option<StoreLocation>,
    /// Do not record the run in an experiment store.
    #[arg(long, conflicts_with = "db")]
    no_db: bool,
    /// Print the whole report as JSON on stdout.
    #[arg(long)]
    json: bool,
}

impl TrainArgs {
    fn coordinator(&self) -> Result<TrainingCoordinator> {
        let schedule = if self.warmup_steps > 0 {
            LrSchedule::WarmupCosine {
                warmup_steps: self.warmup_steps,
                min_lr_ratio: 0.1,
            }
        } else {
            LrSchedule::Constant
        };
        let launch = NodeLaunch::from_env(&NodeFlags {
            num_nodes: self.num_nodes,
            node_rank: self.node_rank,
            master_addr: self.master_addr.clone(),
            master_port: self.master_port,
        })?;
        let mut config = CoordinatorConfig {
            num_nodes: launch.num_nodes,
            node: NodeSettings {
                node_addr: self.node_addr.clone(),
                timeout_s: self.node_timeout,
                ..launch.settings
            },
            enable_checkpointing: !self.no_checkpointing,
            log_every_n_steps: self.log_every_n_steps,
            max_steps: self.max_steps,
            limit_train_batches: self.limit_train_batches,
            limit_val_batches: self.limit_val_batches,
            accumulate_grad_batches: self.accumulate_grad_batches,
            gradient_clip_val: self.gradient_clip_val,
            batch_size: self.batch_size,
            seed: self.seed,
            progress: match self.tui {
                true => ProgressMode::Tui,
                false => self.progress.parse::<ProgressMode>()?,
            },
            default_root_dir: self.output_dir.clone(),
            experiment: self.experiment.clone(),
            run_name: self.run_name.clone(),
            ..CoordinatorConfig::default()
        };
        config.optimizer.lr = self.lr;
        config.optimizer.eps = self.eps;
        config.checkpoint.every_n_steps = self.checkpoint_every_n_steps;
        config.checkpoint.save_top_k = self.save_top_k;
        if let Some(which) = &self.resume {
            config.ckpt_path = Some(which.parse()?);
        }
        config.optimizer.schedule = schedule;
        Ok(CoordinatorBuilder::from_config(config)
            .strategy(&self.strategy)
            .engine(&self.engine)
            .process_group_backend(&self.process_group_backend)
            .precision(&self.precision)
            .strict_precision(self.strict_precision)
            .devices(&self.devices)
            .build()?)
    }
}

pub fn run(args: &TrainArgs) -> Result<()> {
    // Check every argument before loading data or building a model.
    let coordinator = args.coordinator()?;
    let config = coordinator.config();
    // Every log line of a node of a multi-node run carries its rank (the workers'
    // own spans add theirs).
    let _node = (config.num_nodes > 1)
        .then(|| tracing::info_span!("node", rank = config.node.node_rank).entered());
    let node = config.node.node_rank;
    let multi = config.num_nodes > 1;
    train(args, &coordinator).map_err(|e| match multi {
        true => e.context(format!("node {node}")),
        false => e,
    })
}

fn train(args: &TrainArgs, coordinator: &TrainingCoordinator) -> Result<()> {
    let backend: Backend = args.backend.parse()?;
    if args.epochs == 0 {
        anyhow::bail!("invalid epochs 0: expected an integer >= 1");
    }
    let task = TaskSpec::preset(&args.task)?;
    let mut stdout = match coordinator.config().num_nodes > 1 {
        true => quiet_stdout()?,
        false => Box::new(std::io::stdout()),
    };
    let mut db = if args.no_db {
        None
    } else {
        Some(open_db(args.db.as_ref(), &args.output_dir)?)
    };
    let exit = db.as_mut().map(ExperimentDb::exit_handle).transpose()?;
    let current = CurrentRun::default();
    stop_on_signals(coordinator, exit, current.clone());
    let mut watched = db.as_mut().map(|db| current.watch(db));
    let tracker = watched.as_mut().map(|t| t as &mut dyn RunTracker);
    let report = match backend {
        #[cfg(not(feature = "cuda-nccl"))]
        Backend::Cpu(CpuBackend::NdArray) => {
            train_task::<Autodiff<NdArray>, _>(args, coordinator, task, tracker, None, Plain)?
        }
        #[cfg(not(feature = "cuda-nccl"))]
        Backend::Cpu(CpuBackend::Flex) => {
            train_task::<Autodiff<Flex>, _>(args, coordinator, task, tracker, None, Plain)?
        }
        #[cfg(feature = "cuda-nccl")]
        Backend::Cpu(cpu) => anyhow::bail!(
            "backend {cpu} is not in this kiln: it was built with --features cuda-nccl, and \
             burn's distributed feature (NCCL) leaves the CPU backends without autodiff; \
             use --backend cuda, or a kiln built without cuda-nccl"
        ),
        #[cfg(feature = "cuda")]
        Backend::Cuda => {
            let devices = kiln_backend_cuda::cuda_devices();
            if devices.is_empty() {
                anyhow::bail!(
                    "backend cuda: no CUDA device found (no driver, or no GPU visible to \
                     this process); use --backend flex to train on the CPU"
                );
            }
            train_task::<kiln_backend_cuda::CudaAutodiff, _>(
                args,
                coordinator,
                task,
                tracker,
                Some(devices),
                CudaLaunch::default(),
            )?
        }
    };
    print_summary(
        &mut stdout,
        &report,
        db.as_ref().map(ExperimentDb::location),
        args.json,
    )
}

/// The backend `--backend` names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Backend {
    Cpu(CpuBackend),
    /// Burn's CUDA backend (feature `cuda`).
    #[cfg(feature = "cuda")]
    Cuda,
}

impl std::str::FromStr for Backend {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        if s.trim().eq_ignore_ascii_case("cuda") {
            #[cfg(feature = "cuda")]
            return Ok(Backend::Cuda);
            #[cfg(not(feature = "cuda"))]
            anyhow::bail!(
                "backend cuda is not compiled into this kiln: rebuild it with `cargo build \
                 --release -p kiln-cli --features cuda` (this build has: {})",
                CpuBackend::ACCEPTED
            );
        }
        s.parse::<CpuBackend>()
            .map(Backend::Cpu)
            .map_err(|e| anyhow::anyhow!("{e} (or cuda, with a kiln built with --features cuda)"))
    }
}

/// The run was stopped by SIGINT/SIGTERM; `main` exits with 130.
#[derive(Debug, thiserror::Error)]
#[error("stopped by a signal: the run is recorded as KILLED")]
pub struct Interrupted;

/// Opens the experiment store at `location`, or `<output_dir>/kiln.sqlite`; creates
/// a SQLite file's folder.
pub fn open_db(location: Option<&StoreLocation>, output_dir: &Path) -> Result<ExperimentDb> {
    let location = location
        .cloned()
        .unwrap_or_else(|| StoreLocation::Sqlite(output_dir.join("kiln.sqlite")));
    if let Some(parent) = location
        .sqlite_path()
        .and_then(Path::parent)
        .filter(|p| !p.as_os_str().is_empty())
    {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("cannot create {}", parent.display()))?;
    }
    open_store(&location)
}

/// The store a reading command (`kiln runs`, `kiln ui`) names: `db`, or
/// `<output_dir>/kiln.sqlite`, which must exist (reading creates no store).
pub fn existing_store(db: Option<&StoreLocation>, output_dir: &Path) -> Result<StoreLocation> {
    let location = db
        .cloned()
        .unwrap_or_else(|| StoreLocation::Sqlite(output_dir.join("kiln.sqlite")));
    if let Some(path) = location.sqlite_path()
        && !path.is_file()
    {
        anyhow::bail!(
            "no experiment store at {} (train a model first, or give --db)",
            path.display()
        );
    }
    Ok(location)
}

/// Opens the experiment store at `location`; a SQLite file's error names the file (a
/// PostgreSQL error names the server already).
pub fn open_store(location: &StoreLocation) -> Result<ExperimentDb> {
    let db = ExperimentDb::open_location(location);
    match location.sqlite_path() {
        Some(path) => db.with_context(|| format!("cannot open {}", path.display())),
        None => Ok(db?),
    }
}

/// How a run is handed to the coordinator: `TrainingCoordinator::train_on`, unless
/// the backend brings more (burn's NCCL synchronisation on CUDA in a `cuda-nccl`
/// build).
trait Launch<B: AutodiffBackend>: Copy {
    #[allow(clippy::too_many_arguments)]
    fn train<M, D>(
        self,
        coordinator: &TrainingCoordinator,
        devices: &[B::Device],
        model: M,
        data: &D,
        task: &TaskSpec,
        tracker: Option<&mut dyn RunTracker>,
        epochs: usize,
    ) -> std::result::Result<Trained<M>, CoordinatorError>
    where
        M: AutodiffModule<B> + TaskModel<B> + 'static,
        M::InnerModule: TaskModel<B::InnerBackend>,
        D: DataModule,
    {
        coordinator.train_on::<B, M, D>(devices, model, data, task, tracker, epochs)
    }
}

/// `TrainingCoordinator::train_on`.
#[derive(Clone, Copy, Default)]
#[cfg_attr(feature = "cuda-nccl", allow(dead_code))]
struct Plain;

impl<B: AutodiffBackend> Launch<B> for Plain {}

/// `TrainingCoordinator::train_on_nccl`.
#[cfg(feature = "cuda-nccl")]
#[derive(Clone, Copy, Default)]
struct Nccl;

#[cfg(feature = "cuda-nccl")]
impl Launch<kiln_backend_cuda::CudaAutodiff> for Nccl {
    fn train<M, D>(
        self,
        coordinator: &TrainingCoordinator,
        devices: &[kiln_backend_cuda::CudaDevice],
        model: M,
        data: &D,
        task: &TaskSpec,
        tracker: Option<&mut dyn RunTracker>,
        epochs: usize,
    ) -> std::result::Result<Trained<M>, CoordinatorError>
    where
        M: AutodiffModule<kiln_backend_cuda::CudaAutodiff>
            + TaskModel<kiln_backend_cuda::CudaAutodiff>
            + 'static,
        M::InnerModule: TaskModel<kiln_backend_cuda::Cuda>,
        D: DataModule,
    {
        coordinator.train_on_nccl(devices, model, data, task, tracker, epochs)
    }
}

/// How a CUDA run is handed over in this build.
#[cfg(feature = "cuda-nccl")]
type CudaLaunch = Nccl;
#[cfg(all(feature = "cuda", not(feature = "cuda-nccl")))]
type CudaLaunch = Plain;

fn train_task<B: FusedAutodiffBackend, L: Launch<B>>(
    args: &TrainArgs,
    coordinator: &TrainingCoordinator,
    mut task: TaskSpec,
    tracker: Option<&mut dyn RunTracker>,
    devices: Option<Vec<B::Device>>,
    launch: L,
) -> Result<TrainReport> {
    // The model is built on the first device; the coordinator copies it to the others.
    let device = devices
        .as_ref()
        .and_then(|d| d.first().cloned())
        .unwrap_or_default();
    let devices = devices.as_deref();
    match task.kind {
        TaskKind::Lm { .. } => {
            let text = match &args.text {
                Some(path) => load_text_file(path)?,
                None => builtin_corpus(),
            };
            let tokenizer = CharTokenizer::from_text(&text);
            let vocab = tokenizer.vocab_size();
            let data = TextDataModule::new(tokenizer.encode(&text)?, vocab, args.seq_len)?;
            task.kind = TaskKind::Lm {
                vocab_size: vocab,
                seq_len: args.seq_len,
            };
            let model = TinyGptConfig {
                seq_len: args.seq_len,
                ..TinyGptConfig::tiny(vocab)
            }
            .init::<B>(args.seed, &device)?;
            fit(
                coordinator,
                model,
                &data,
                &task,
                tracker,
                devices,
                args,
                launch,
            )
        }
        TaskKind::Classification { num_classes } => {
            let data = TabularDataModule::blobs(num_classes, 16, 4096, 512, args.seed);
            let model = MlpConfig::for_task(&task.kind, 16)?.init::<B>(args.seed, &device)?;
            fit(
                coordinator,
                model,
                &data,
                &task,
                tracker,
                devices,
                args,
                launch,
            )
        }
        TaskKind::Regression { outputs } => {
            let data = TabularDataModule::linear(outputs, 16, 4096, 512, args.seed);
            let model = MlpConfig::for_task(&task.kind, 16)?.init::<B>(args.seed, &device)?;
            fit(
                coordinator,
                model,
                &data,
                &task,
                tracker,
                devices,
                args,
                launch,
            )
        }
        TaskKind::Custom => anyhow::bail!(
            "task {:?} is of kind custom: `kiln train` trains kiln's own models (tasks of \
             kind lm, classification or regression); a model with its own TrainStep is \
             trained from Rust with TrainingCoordinator::fit",
            task.name
        ),
    }
}

#[allow(clippy::too_many_arguments)]
fn fit<B, M, D, L>(
    coordinator: &TrainingCoordinator,
    model: M,
    data: &D,
    task: &TaskSpec,
    tracker: Option<&mut dyn RunTracker>,
    devices: Option<&[B::Device]>,
    args: &TrainArgs,
    launch: L,
) -> Result<TrainReport>
where
    B: AutodiffBackend,
    L: Launch<B>,
    M: AutodiffModule<B> + TaskModel<B> + 'static,
    M::InnerModule: TaskModel<B::InnerBackend>,
    D: DataModule,
{
    let trained = match devices {
        Some(devices) => launch.train(
            coordinator,
            devices,
            model,
            data,
            task,
            tracker,
            args.epochs,
        ),
        None => coordinator.train::<B, M, D>(model, data, task, tracker, args.epochs),
    };
    match trained {
        Ok(Trained { report, .. }) => Ok(report),
        Err(CoordinatorError::Stopped { report }) => {
            eprintln!(
                "kiln: stopped after {} optimizer steps; outputs in {}",
                report.optimizer_steps,
                report
                    .run_dir
                    .as_ref()
                    .map(|d| d.display().to_string())
                    .unwrap_or_default()
            );
            Err(Interrupted.into())
        }
        Err(e) => Err(anyhow::Error::new(e).context("training did not complete")),
    }
}

/// burn-collective 0.21 prints `Connecting to ws://...` on stdout at every exchange
/// of a multi-node run. For the run, the process's stdout goes to /dev/null and kiln
/// writes its own output (the summary, `--json`) to the returned copy of it.
#[cfg(unix)]
fn quiet_stdout() -> Result<Box<dyn Write>> {
    std::io::stdout().flush()?;
    let saved = nix::unistd::dup(std::io::stdout()).context("cannot copy stdout")?;
    let null = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/null")
        .context("cannot open /dev/null")?;
    nix::unistd::dup2_stdout(&null).context("cannot redirect stdout")?;
    Ok(Box::new(std::fs::File::from(saved)))
}

#[cfg(not(unix))]
fn quiet_stdout() -> Result<Box<dyn Write>> {
    Ok(Box::new(std::io::stdout()))
}

fn print_summary(
    out: &mut dyn Write,
    report: &TrainReport,
    db: Option<&StoreLocation>,
    json: bool,
) -> Result<()> {
    if json {
        writeln!(out, "{}", serde_json::to_string_pretty(report)?)?;
        return Ok(());
    }
    let get = |k: &str| report.final_metrics.get(k).copied();
    writeln!(
        out,
        "kiln: {} after {} epoch(s), {} optimizer steps in {:.1} s ({:.0} items/s, {})",
        report.status.label(),
        report.epochs,
        report.optimizer_steps,
        report.wall_time_s,
        report.throughput.items_per_s,
        report.plan
    )?;
    if let Some(loss) = get("valid/loss") {
        let mut line = format!("kiln: final validation loss {loss:.4}");
        if let Some(ppl) = get("valid/perplexity") {
            line.push_str(&format!(", perplexity {ppl:.2}"));
        }
        if let Some(acc) = get("valid/accuracy") {
            line.push_str(&format!(", accuracy {:.2}%", acc * 100.0));
        }
        writeln!(out, "{line}")?;
    }
    if let Some(dir) = &report.run_dir {
        writeln!(out, "kiln: run outputs in {}", dir.display())?;
    }
    if let (Some(db), Some(id)) = (db, report.run_id) {
        writeln!(out, "kiln: recorded as run {id} in {db} (see `kiln runs`)")?;
    }
    Ok(())
}

//! [`CoordinatorBuilder`]: the seed's constructor, with Lightning's argument names.

use std::path::PathBuf;

use kiln_core::{CheckpointPolicy, CoordinatorConfig, LrSchedule, OptimizerConfig, ProgressMode};

use crate::{Result, TrainingCoordinator};

impl TrainingCoordinator {
    /// A builder taking Lightning's argument names and strings (here, so that the
    /// builder sits above the coordinator it builds).
    pub fn builder() -> CoordinatorBuilder {
        CoordinatorBuilder::default()
    }
}

/// Builds a [`TrainingCoordinator`] from the strings Lightning users know.
///
/// Setters take the values as written on a command line or in a config file; they
/// are parsed and checked in [`build`](Self::build), whose error names the first
/// bad value and the accepted ones.
///
/// How each setting reaches burn-train when the Learner engine runs (`auto`/`single`
/// on one device, feature `learner`; see `docs/strategies.md`):
///
/// | kiln | Lightning `Trainer` | burn-train 0.21 (Learner engine) |
/// | --- | --- | --- |
/// | `strategy("auto"\|"single")` | `strategy` | `ExecutionStrategy::SingleDevice`; `vanilla` selects kiln's native loop instead; `ddp`/`fsdp` on several devices run kiln's data-parallel groups, as a custom training strategy (`TrainingStrategy::Custom`) on the Learner engine |
/// | `process_group_backend("collective"\|"nccl")` | `DDPStrategy(process_group_backend=...)` | burn-collective's all-reduce once per step, or burn-train's DDP synchronisation (NCCL inside backward; `cuda-nccl` builds, `TrainingCoordinator::train_on_nccl`) |
/// | `engine("native"\|"learner")` | — | the Learner engine (`SupervisedTraining`) or kiln's native loop; `auto` picks the Learner engine where it can run |
/// | `precision("32-true"\|"bf16-mixed"\|...)` | `precision` | 32-true only; other modes run on the native loop (`docs/precision.md`) |
/// | `devices("auto"\|"2"\|"-1"\|"0,2")` | `devices` | the device of `SingleDevice` |
/// | `num_nodes(n)` | `num_nodes` | (burn-collective nodes) |
/// | `enable_checkpointing(b)` | `enable_checkpointing` | kiln's checkpoints, written between steps; burn-train's `with_file_checkpointer` is not used |
/// | `checkpoint_policy(p)` | `ModelCheckpoint(...)` callback | kiln's policy (burn-train's `with_checkpointing_strategy` is epoch-only) |
/// | `ckpt_path("last"\|"best"\|dir)` | `fit(ckpt_path=...)` | kiln's loaders start at the checkpoint's micro-batch (burn-train's `.checkpoint(epoch)` resumes at epoch ends only) |
/// | `log_every_n_steps(n)` | `log_every_n_steps` | (burn-train logs every batch; kiln counts optimizer steps) |
/// | `max_steps(n)` | `max_steps` | `.num_epochs(..)` plus kiln's loaders ending the last epoch at the step |
/// | `limit_train_batches(n)` | `limit_train_batches` (count) | kiln's loaders |
/// | `accumulate_grad_batches(n)` | `accumulate_grad_batches` (mean) | done in kiln's `TrainStep` (burn-train's `grads_accumulation` sums) |
/// | `gradient_clip_val(x)` | `gradient_clip_val` (global norm) | done in kiln's `TrainStep::optimize` (burn-train's `GradientClippingConfig::Norm` is per tensor) |
/// | `learning_rate(lr)`, `lr_schedule(s)` | optimizer / scheduler | kiln's schedule as burn-train's `LrScheduler`, per optimizer step |
/// | `progress(mode)` | `enable_progress_bar` | a silent renderer (kiln draws), or burn-train's TUI for `ProgressMode::Tui` |
/// | `default_root_dir(p)` | `default_root_dir` | `SupervisedTraining::new(run dir, ..)` |
/// | `deterministic(b)` | `deterministic` | kiln seeds Burn's RNG per micro-batch and worker; with it a group's workers in one process draw in turn |
///
/// ```
/// let err = kiln_coordinator::TrainingCoordinator::builder()
///     .strategy("deepspeed")
///     .build()
///     .unwrap_err();
/// assert!(err.to_string().contains("auto, single, vanilla, ddp, ddp_spawn, fsdp"));
/// ```
#[derive(Debug, Clone, Default)]
pub struct CoordinatorBuilder {
    config: CoordinatorConfig,
    strategy: Option<String>,
    engine: Option<String>,
    process_group_backend: Option<String>,
    precision: Option<String>,
    devices: Option<String>,
    ckpt_path: Option<String>,
}

impl CoordinatorBuilder {
    /// Starts from a configuration (e.g. one read from JSON).
    pub fn from_config(config: CoordinatorConfig) -> Self {
        Self {
            config,
            ..Default::default()
        }
    }

    /// `auto`, `single`, `vanilla`, `ddp`, `ddp_spawn` or `fsdp`.
    pub fn strategy(mut self, s: impl Into<String>) -> Self {
        self.strategy = Some(s.into());
        self
    }

    /// The engine that runs the loop: `auto` (default: the Learner engine when it
    /// is compiled in and can run the plan), `learner` (burn-train) or `native`
    /// (kiln's own loop). See `docs/strategies.md`.
    pub fn engine(mut self, s: impl Into<String>) -> Self {
        self.engine = Some(s.into());
        self
    }

    /// What carries a data-parallel group's gradients: `auto` (default: NCCL where
    /// it can run, else burn-collective), `collective` (burn-collective's all-reduce,
    /// once per step) or `nccl` (burn-train's DDP synchronisation: NCCL all-reduces
    /// the gradients during backward; CUDA, one node, the Learner engine, a build
    /// with the `cuda-nccl` feature). See `docs/strategies.md`.
    pub fn process_group_backend(mut self, s: impl Into<String>) -> Self {
        self.process_group_backend = Some(s.into());
        self
    }

    /// `32`, `32-true`, `bf16-mixed`, `16-mixed`, `bf16-true`, `16-true`, `bf16`, `16`.
    pub fn precision(mut self, s: impl Into<String>) -> Self {
        self.precision = Some(s.into());
        self
    }

    /// When the backend lacks the precision's dtype (NdArray has no bf16): fail
    /// instead of training in `32-true` with a warning.
    pub fn strict_precision(mut self, on: bool) -> Self {
        self.config.strict_precision = on;
        self
    }

    /// `16-mixed`'s dynamic loss scaling (PyTorch `GradScaler`'s defaults unless set).
    pub fn loss_scaling(mut self, scaling: kiln_core::LossScaling) -> Self {
        self.config.loss_scaling = scaling;
        self
    }

    /// `auto`, a count, `-1`, or a list such as `0,2`.
    pub fn devices(mut self, s: impl Into<String>) -> Self {
        self.devices = Some(s.into());
        self
    }

    /// Number of machines.
    pub fn num_nodes(mut self, n: u32) -> Self {
        self.config.num_nodes = n;
        self
    }

    /// This node's rank and the rendezvous of a multi-node run
    /// (`docs/multi-node.md`; `kiln_core::launch::NodeLaunch::from_env` reads them
    /// from torchrun's or SLURM's environment).
    pub fn node(mut self, node: kiln_core::launch::NodeSettings) -> Self {
        self.config.node = node;
        self
    }

    /// Whether the run's weights are saved.
    pub fn enable_checkpointing(mut self, on: bool) -> Self {
        self.config.enable_checkpointing = on;
        self
    }

    /// When checkpoints are written and which are kept.
    pub fn checkpoint_policy(mut self, policy: CheckpointPolicy) -> Self {
        self.config.checkpoint = policy;
        self
    }

    /// Also write a checkpoint every `n` optimizer steps.
    pub fn checkpoint_every_n_steps(mut self, n: u64) -> Self {
        self.config.checkpoint.every_n_steps = Some(n);
        self
    }

    /// Resume from `last`, `best` or a checkpoint directory (Lightning's
    /// `fit(ckpt_path=...)`).
    pub fn ckpt_path(mut self, which: impl Into<String>) -> Self {
        self.ckpt_path = Some(which.into());
        self
    }

    /// Log metrics every `n` optimizer steps.
    pub fn log_every_n_steps(mut self, n: u64) -> Self {
        self.config.log_every_n_steps = n;
        self
    }

    /// Stop after `n` optimizer steps.
    pub fn max_steps(mut self, n: u64) -> Self {
        self.config.max_steps = Some(n);
        self
    }

    /// Train on at most `n` batches per epoch.
    pub fn limit_train_batches(mut self, n: usize) -> Self {
        self.config.limit_train_batches = Some(n);
        self
    }

    /// Validate on at most `n` batches per epoch.
    pub fn limit_val_batches(mut self, n: usize) -> Self {
        self.config.limit_val_batches = Some(n);
        self
    }

    /// Average gradients over `n` micro-batches per optimizer step.
    pub fn accumulate_grad_batches(mut self, n: u32) -> Self {
        self.config.accumulate_grad_batches = n;
        self
    }

    /// Clip the global gradient norm to `max_norm`.
    pub fn gradient_clip_val(mut self, max_norm: f64) -> Self {
        self.config.gradient_clip_val = Some(max_norm);
        self
    }

    /// Examples per micro-batch.
    pub fn batch_size(mut self, n: usize) -> Self {
        self.config.batch_size = n;
        self
    }

    /// Every AdamW setting at once (learning rate and schedule included; the
    /// setters below change one of them).
    pub fn optimizer(mut self, optimizer: OptimizerConfig) -> Self {
        self.config.optimizer = optimizer;
        self
    }

    /// Base learning rate.
    pub fn learning_rate(mut self, lr: f64) -> Self {
        self.config.optimizer.lr = lr;
        self
    }

    /// Learning-rate schedule.
    pub fn lr_schedule(mut self, schedule: LrSchedule) -> Self {
        self.config.optimizer.schedule = schedule;
        self
    }

    /// Seed for data order and the loop's randomness.
    pub fn seed(mut self, seed: u64) -> Self {
        self.config.seed = seed;
        self
    }

    /// How progress is shown.
    pub fn progress(mut self, mode: ProgressMode) -> Self {
        self.config.progress = mode;
        self
    }

    /// Where run directories are created.
    pub fn default_root_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.config.default_root_dir = dir.into();
        self
    }

    /// Experiment name.
    pub fn experiment(mut self, name: impl Into<String>) -> Self {
        self.config.experiment = name.into();
        self
    }

    /// Data-parallel groups compare every worker's weights after every step (one
    /// more exchange per step; for debugging and tests).
    pub fn check_replicas(mut self, on: bool) -> Self {
        self.config.check_replicas = on;
        self
    }

    /// Lightning's `deterministic`: a data-parallel group in one process takes the
    /// same steps in every run with one seed, dropout included (the workers'
    /// passes run one at a time on backends with one RNG per process: slower).
    pub fn deterministic(mut self, on: bool) -> Self {
        self.config.deterministic = on;
        self
    }

    /// Run name (generated when not set).
    pub fn run_name(mut self, name: impl Into<String>) -> Self {
        self.config.run_name = Some(name.into());
        self
    }

    /// Parses and validates everything; the error names the first bad value.
    pub fn build(self) -> Result<TrainingCoordinator> {
        let mut config = self.config;
        if let Some(s) = self.strategy {
            config.strategy = s.parse()?;
        }
        if let Some(s) = self.engine {
            config.engine = kiln_core::Engine::parse_choice(&s)?;
        }
        if let Some(s) = self.process_group_backend {
            config.process_group_backend = kiln_core::ProcessGroupBackend::parse_choice(&s)?;
        }
        if let Some(s) = self.precision {
            config.precision = s.parse()?;
        }
        if let Some(s) = self.devices {
            config.devices = s.parse()?;
        }
        if let Some(s) = self.ckpt_path {
            config.ckpt_path = Some(s.parse()?);
        }
        TrainingCoordinator::new(config)
    }
}

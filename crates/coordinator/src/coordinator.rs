//! [`TrainingCoordinator`]: validated configuration in, trained model and report out.

use std::panic::AssertUnwindSafe;
use std::time::Instant;

use burn::module::AutodiffModule;
use burn::optim::SimpleOptimizer;
use burn::optim::adaptor::OptimizerAdaptor;
use burn::optim::lr_scheduler::LrScheduler;
use burn::prelude::Backend;
use burn::tensor::backend::AutodiffBackend;
use kiln_core::{
    CoordinatorConfig, DataModule, Devices, ProgressMode, RunStatus, Split, Strategy, TaskModel,
    TaskSpec, Throughput, TrainReport,
};
use kiln_experiment_db::{EndStatus, NewRun, RunTracker};

use crate::checkpoint::{self, Signatures};
use crate::native;
use crate::optim::{Optimization, adamw};
use crate::plan::{resolve_plan, resolve_process_group};
use crate::progress::Progress;
use crate::run::{self, CheckpointCtx, Failure, LoopInputs, LoopStats, panic_message};
use crate::run_dir::RunDir;
use crate::schedule::KilnSchedule;
use crate::sync::BackendSync;
use crate::tracking::Metrics;
use crate::workload::{
    LossStep, LossSteps, ModelSteps, StepWork, Steps, TaskWork, TrainBatcher, TrainModel,
    ValidBatcher, Workload,
};
use crate::{CoordinatorError, Datasets, Result, StopHandle};

/// A trained model and the report of its run.
#[derive(Debug)]
pub struct Trained<M> {
    /// The model after the last optimizer step.
    pub model: M,
    /// What happened.
    pub report: TrainReport,
}

/// Trains models: the Rust counterpart of PyTorch Lightning's `Trainer`, wrapped
/// the way the seed card's `TrainingCoordinator` wraps it.
///
/// Built from a [`CoordinatorConfig`] (validated here: a bad value is an error that
/// names it and the accepted ones; nothing panics), or through
/// [`TrainingCoordinator::builder`] with Lightning's strings. The same coordinator
/// can train any number of models.
#[derive(Debug, Clone)]
pub struct TrainingCoordinator {
    config: CoordinatorConfig,
    stop: StopHandle,
}

impl TrainingCoordinator {
    /// A coordinator for `config`, after checking it.
    pub fn new(config: CoordinatorConfig) -> Result<Self> {
        config.validate()?;
        Ok(Self {
            config,
            stop: StopHandle::default(),
        })
    }

    /// A handle that stops this coordinator's training runs from another thread or
    /// a signal handler: the run ends at the next batch, recorded as KILLED, and
    /// `train` returns [`CoordinatorError::Stopped`] with the report. kiln installs no
    /// signal handler itself; the `kiln` binary connects SIGINT and SIGTERM to it.
    pub fn stop_handle(&self) -> StopHandle {
        self.stop.clone()
    }

    /// The configuration.
    pub fn config(&self) -> &CoordinatorConfig {
        &self.config
    }

    /// Trains `model` on `data` for `task` for `n_epochs` epochs on the backend's
    /// default device, recording the run in `experiment_db` when given.
    ///
    /// This is the seed's `train(model, datamodule, task_spec, experiment_db,
    /// n_epochs)`. The resolved plan is logged at start and returned in the report;
    /// the run's files go to `<default_root_dir>/<experiment>/<run name>/`.
    ///
    /// # Errors
    /// - [`CoordinatorError::Config`]: the task spec, model or data do not fit
    ///   together (checked before training starts);
    /// - [`CoordinatorError::NotAvailable`]: the strategy, device count, node count
    ///   or precision asked for is not implemented by this build;
    /// - [`CoordinatorError::RunFailed`]: training started and failed (e.g. a
    ///   non-finite loss); the run is recorded as FAILED and the error carries the
    ///   report.
    pub fn train<B, M, D>(
        &self,
        model: M,
        data: &D,
        task: &TaskSpec,
        experiment_db: Option<&mut dyn RunTracker>,
        n_epochs: usize,
    ) -> Result<Trained<M>>
    where
        B: AutodiffBackend,
        M: AutodiffModule<B> + TaskModel<B> + 'static,
        M::InnerModule: TaskModel<B::InnerBackend>,
        D: DataModule,
    {
        self.train_on(
            &self.default_devices::<B>()?,
            model,
            data,
            task,
            experiment_db,
            n_epochs,
        )
    }

    /// [`train`](Self::train) on the given devices; the configuration's `devices`
    /// selects among them by index.
    pub fn train_on<B, M, D>(
        &self,
        devices: &[B::Device],
        model: M,
        data: &D,
        task: &TaskSpec,
        experiment_db: Option<&mut dyn RunTracker>,
        n_epochs: usize,
    ) -> Result<Trained<M>>
    where
        B: AutodiffBackend,
        M: AutodiffModule<B> + TaskModel<B> + 'static,
        M::InnerModule: TaskModel<B::InnerBackend>,
        D: DataModule,
    {
        self.train_with(devices, model, data, task, experiment_db, n_epochs, None)
    }

    /// [`train_on`](Self::train_on) with burn's own gradient synchronisation
    /// available to data-parallel groups: burn-train's DDP machinery, NCCL on CUDA
    /// (`process_group_backend` `auto` or `nccl`; see `docs/strategies.md`).
    ///
    /// Only in builds with the `cuda-nccl` feature, where burn's `distributed`
    /// feature is on: that build cannot train on the CPU backends at all (Burn 0.21
    /// gives autodiff only to backends with a distributed implementation).
    ///
    /// # Errors
    /// As [`train_on`](Self::train_on); and [`CoordinatorError::NotAvailable`] when
    /// NCCL cannot start (no `libnccl`, or devices it cannot join).
    #[cfg(feature = "cuda-nccl")]
    pub fn train_on_nccl<B, M, D>(
        &self,
        devices: &[B::Device],
        model: M,
        data: &D,
        task: &TaskSpec,
        experiment_db: Option<&mut dyn RunTracker>,
        n_epochs: usize,
    ) -> Result<Trained<M>>
    where
        B: AutodiffBackend + burn::tensor::backend::distributed::DistributedBackend,
        M: AutodiffModule<B> + TaskModel<B> + 'static,
        M::InnerModule: TaskModel<B::InnerBackend>,
        D: DataModule,
    {
        let sync = crate::sync::nccl::<B>();
        self.train_with(
            devices,
            model,
            data,
            task,
            experiment_db,
            n_epochs,
            Some(sync),
        )
    }

    /// Trains a Burn model written for burn-train, unchanged: `model` implements
    /// `TrainStep` (its `step` runs forward and backward and returns the
    /// gradients with an output item) and its inner module `InferenceStep`;
    /// `optimizer` is any burn-optim optimizer (`AdamConfig::new().init()`,
    /// `SgdConfig::new().with_momentum(..).init()`, ...); `lr_scheduler` any
    /// `LrScheduler` (a plain `f64` is a constant rate, [`KilnSchedule`](crate::KilnSchedule)
    /// kiln's warm-up + cosine); `data` the datasets and batchers ([`Datasets`]). Trains for `n_epochs` epochs on the backend's
    /// default device, recording the run in `experiment_db` when given.
    ///
    /// kiln reads each step's loss through burn-train's `Adaptor<LossInput<B>>`
    /// ([`StepOutput`](crate::StepOutput)), and owns what burn-train's Learner
    /// would: the data order (seeded, sharded across a data-parallel group),
    /// gradient accumulation (averaged), global-norm clipping, one scheduler step
    /// per optimizer step, validation, checkpoints with the optimizer's and the
    /// scheduler's state (exact resume), and Burn's RNG seeded before every
    /// micro-batch (dropout is reproducible). Strategies `single`, `vanilla`,
    /// `ddp` and `fsdp` (the optimizer's state sharded) run in `32-true` on
    /// either engine (burn-train's Learner, or kiln's native loop, across nodes
    /// too), as for [`train`](Self::train); see `docs/from-burn-train.md`.
    ///
    /// # Errors
    /// As [`train`](Self::train); [`CoordinatorError::NotAvailable`] for a
    /// precision other than `32-true`: the model's step runs backward itself, so
    /// kiln cannot cast or scale around it (implement [`LossStep`] and train with
    /// [`fit_with_loss`](Self::fit_with_loss)).
    pub fn fit<B, M, I, T, V, S, LR>(
        &self,
        model: M,
        optimizer: OptimizerAdaptor<S, M, B>,
        lr_scheduler: LR,
        data: &Datasets<I, T, V>,
        experiment_db: Option<&mut dyn RunTracker>,
        n_epochs: usize,
    ) -> Result<Trained<M>>
    where
        B: AutodiffBackend,
        M: TrainModel<B>,
        I: Send + Sync,
        T: TrainBatcher<B, I, M>,
        V: ValidBatcher<B, I, M>,
        S: SimpleOptimizer<B::InnerBackend> + 'static,
        LR: LrScheduler + 'static,
    {
        self.fit_on(
            &self.default_devices::<B>()?,
            model,
            optimizer,
            lr_scheduler,
            data,
            experiment_db,
            n_epochs,
        )
    }

    /// [`fit`](Self::fit) on the given devices; the configuration's `devices`
    /// selects among them by index.
    #[allow(clippy::too_many_arguments)]
    pub fn fit_on<B, M, I, T, V, S, LR>(
        &self,
        devices: &[B::Device],
        model: M,
        optimizer: OptimizerAdaptor<S, M, B>,
        lr_scheduler: LR,
        data: &Datasets<I, T, V>,
        experiment_db: Option<&mut dyn RunTracker>,
        n_epochs: usize,
    ) -> Result<Trained<M>>
    where
        B: AutodiffBackend,
        M: TrainModel<B>,
        I: Send + Sync,
        T: TrainBatcher<B, I, M>,
        V: ValidBatcher<B, I, M>,
        S: SimpleOptimizer<B::InnerBackend> + 'static,
        LR: LrScheduler + 'static,
    {
        let work = StepWork {
            data,
            steps: ModelSteps,
        };
        self.fit_work(
            devices,
            model,
            (optimizer, lr_scheduler),
            &work,
            experiment_db,
            n_epochs,
        )
    }

    /// [`fit`](Self::fit) for a model that is also a [`LossStep`]: kiln runs its
    /// step up to the loss and takes the backward pass itself, so that it trains
    /// in every precision (`docs/precision.md`): mixed modes on a working copy of
    /// the parameters in the working dtype, true modes with the parameters stored
    /// in it; the inputs cast by [`LossStep::cast_input`], the loss in f32, scaled
    /// before backward under `16-mixed`. In `32-true` it takes the steps `fit`
    /// takes, up to float rounding (kiln weighs the loss for accumulation before
    /// backward, where `fit` scales the gradients after).
    ///
    /// # Errors
    /// As [`fit`](Self::fit); [`CoordinatorError::NotAvailable`] for `bf16-true`
    /// and `16-true` with an optimizer other than Adam and AdamW, whose state
    /// kiln cannot store in the parameters' dtype (burn-optim keeps it private).
    pub fn fit_with_loss<B, M, I, T, V, S, LR>(
        &self,
        model: M,
        optimizer: OptimizerAdaptor<S, M, B>,
        lr_scheduler: LR,
        data: &Datasets<I, T, V>,
        experiment_db: Option<&mut dyn RunTracker>,
        n_epochs: usize,
    ) -> Result<Trained<M>>
    where
        B: AutodiffBackend,
        M: TrainModel<B> + LossStep<B>,
        I: Send + Sync,
        T: TrainBatcher<B, I, M>,
        V: ValidBatcher<B, I, M>,
        S: SimpleOptimizer<B::InnerBackend> + 'static,
        LR: LrScheduler + 'static,
    {
        self.fit_with_loss_on(
            &self.default_devices::<B>()?,
            model,
            optimizer,
            lr_scheduler,
            data,
            experiment_db,
            n_epochs,
        )
    }

    /// [`fit_with_loss`](Self::fit_with_loss) on the given devices; the
    /// configuration's `devices` selects among them by index.
    #[allow(clippy::too_many_arguments)]
    pub fn fit_with_loss_on<B, M, I, T, V, S, LR>(
        &self,
        devices: &[B::Device],
        model: M,
        optimizer: OptimizerAdaptor<S, M, B>,
        lr_scheduler: LR,
        data: &Datasets<I, T, V>,
        experiment_db: Option<&mut dyn RunTracker>,
        n_epochs: usize,
    ) -> Result<Trained<M>>
    where
        B: AutodiffBackend,
        M: TrainModel<B> + LossStep<B>,
        I: Send + Sync,
        T: TrainBatcher<B, I, M>,
        V: ValidBatcher<B, I, M>,
        S: SimpleOptimizer<B::InnerBackend> + 'static,
        LR: LrScheduler + 'static,
    {
        let work = StepWork {
            data,
            steps: LossSteps::default(),
        };
        self.fit_work(
            devices,
            model,
            (optimizer, lr_scheduler),
            &work,
            experiment_db,
            n_epochs,
        )
    }

    /// A model with its own step on `work`, with the user's optimizer and
    /// scheduler; recorded under the model's type name.
    fn fit_work<'d, B, M, I, T, V, K, S, LR>(
        &self,
        devices: &[B::Device],
        model: M,
        (optimizer, lr_scheduler): (OptimizerAdaptor<S, M, B>, LR),
        work: &StepWork<'d, I, T, V, K>,
        experiment_db: Option<&mut dyn RunTracker>,
        n_epochs: usize,
    ) -> Result<Trained<M>>
    where
        B: AutodiffBackend,
        M: AutodiffModule<B> + 'static,
        StepWork<'d, I, T, V, K>: Workload<B, M>,
        S: SimpleOptimizer<B::InnerBackend> + 'static,
        LR: LrScheduler + 'static,
    {
        let task = TaskSpec::custom(model_name::<M>());
        let optimization = |_total, _start| Optimization {
            optimizer,
            scheduler: lr_scheduler,
            cast_state: crate::precision::state_cast::<B, M, S>(),
        };
        self.run(
            devices,
            model,
            work,
            &task,
            optimization,
            experiment_db,
            n_epochs,
            None,
        )
    }

    #[allow(clippy::too_many_arguments)]
    fn train_with<B, M, D>(
        &self,
        devices: &[B::Device],
        model: M,
        data: &D,
        task: &TaskSpec,
        experiment_db: Option<&mut dyn RunTracker>,
        n_epochs: usize,
        sync: Option<BackendSync<B>>,
    ) -> Result<Trained<M>>
    where
        B: AutodiffBackend,
        M: AutodiffModule<B> + TaskModel<B> + 'static,
        M::InnerModule: TaskModel<B::InnerBackend>,
        D: DataModule,
    {
        task.validate()?;
        if task.kind == kiln_core::TaskKind::Custom {
            return Err(kiln_core::Error::InvalidTaskSpec(format!(
                "task {:?} is of kind custom, the task of a model with its own TrainStep \
                 (TrainingCoordinator::fit); a TaskModel needs kind lm, classification or \
                 regression",
                task.name
            ))
            .into());
        }
        data.check_task(task)?;
        model.check_task(task)?;
        let o = &self.config.optimizer;
        // kiln's AdamW and schedule; a resumed run's schedule continues at its step.
        let optimization = |total, start| Optimization {
            optimizer: adamw(&self.config).init::<B, M>(),
            scheduler: KilnSchedule::new(o.lr, o.schedule, total).starting_at(start),
            cast_state: crate::precision::state_cast::<B, M, kiln_kernels::AdamW>(),
        };
        self.run(
            devices,
            model,
            &TaskWork { data, task },
            task,
            optimization,
            experiment_db,
            n_epochs,
            sync,
        )
    }

    /// One run of `model` on `work`, whichever way it was given: the plan, the run
    /// directory, the store, resuming, the loop, the report.
    #[allow(clippy::too_many_arguments)]
    fn run<B, M, W, S, LR>(
        &self,
        devices: &[B::Device],
        model: M,
        work: &W,
        task: &TaskSpec,
        optimization: impl FnOnce(u64, u64) -> Optimization<B, M, S, LR>,
        experiment_db: Option<&mut dyn RunTracker>,
        n_epochs: usize,
        sync: Option<BackendSync<B>>,
    ) -> Result<Trained<M>>
    where
        B: AutodiffBackend,
        M: AutodiffModule<B> + 'static,
        W: Workload<B, M>,
        S: SimpleOptimizer<B::InnerBackend> + 'static,
        LR: LrScheduler + 'static,
    {
        let started = Instant::now();
        let config = &self.config;
        if n_epochs == 0 {
            return Err(kiln_core::Error::invalid("n_epochs", 0, "an integer >= 1").into());
        }
        if work.len(Split::Train) == 0 {
            return Err(kiln_core::Error::Data(
                "the training dataset is empty (0 examples)".into(),
            )
            .into());
        }
        let first = devices.first().ok_or_else(|| {
            kiln_core::Error::invalid("devices", "[]", "at least one device to train on")
        })?;
        let backend = <B as Backend>::name(first);
        let mut plan = resolve_plan(config, &backend, devices.len())?;
        let (precision, fallback) = crate::precision::resolve(
            config.precision,
            &backend,
            |dtype| B::supports_dtype(first, dtype),
            config.strict_precision,
        )?;
        plan.precision = precision;
        plan.warnings.extend(fallback);
        // f16's smallest normal number: a smaller eps is flushed to zero or loses its
        // precision where 16-true keeps AdamW's moments.
        const F16_MIN_EPS: f32 = 6.1e-5;
        // kiln's AdamW (the simple path); a user's optimizer carries its own eps.
        let kiln_adamw = task.kind != kiln_core::TaskKind::Custom;
        if precision == kiln_core::Precision::F16True
            && kiln_adamw
            && config.optimizer.eps < F16_MIN_EPS
        {
            return Err(kiln_core::Error::invalid(
                "eps",
                config.optimizer.eps,
                "a number >= 6.1e-5 under 16-true (AdamW's moments and eps are f16 there, \
                 where a smaller eps is zero and the update divides by it; or train in \
                 16-mixed, which keeps them in f32)",
            )
            .into());
        }
        if precision != kiln_core::Precision::F32 && !<W::Steps as Steps<B, M>>::KILN_BACKWARD {
            return Err(CoordinatorError::NotAvailable {
                what: format!("precision {precision} for a model whose TrainStep runs backward"),
                reason: "kiln casts the model's inputs and scales its loss between the loss \
                         and backward: implement kiln_coordinator::LossStep for the model \
                         and train it with fit_with_loss (docs/from-burn-train.md)"
                    .into(),
            });
        }
        if crate::precision::is_true(precision)
            && crate::precision::state_cast::<B, M, S>().is_none()
        {
            return Err(CoordinatorError::NotAvailable {
                what: format!("precision {precision} with optimizer {}", model_name::<S>()),
                reason: "a true precision keeps the optimizer's state in the parameters' \
                         dtype, which kiln converts for Adam and AdamW (burn-optim keeps \
                         the others' state private): train in bf16-mixed or 16-mixed, or \
                         with Adam or AdamW"
                    .into(),
            });
        }
        if precision != kiln_core::Precision::F32
            && plan.engine == kiln_core::Engine::Learner
            && config.engine.is_none()
        {
            // `auto` keeps the native loop for the other precisions, where they
            // first ran; `engine = learner` runs them through burn-train alike
            // (the same step, `update::take_step`).
            plan.engine = kiln_core::Engine::Native;
            plan.warnings.push(format!(
                "precision {precision} runs on kiln's native loop (engine auto;                  engine = learner runs it on burn-train's Learner)"
            ));
        }
        resolve_process_group(
            config,
            &mut plan,
            (cfg!(feature = "cuda-nccl"), sync.is_some()),
        )?;
        if config.num_nodes > 1 {
            let node = &config.node;
            let [even, odd] = node.data_ports(node.node_rank, config.num_nodes);
            plan.warnings.push(format!(
                "multi-node: the nodes listen on every interface without authentication \
                 (node 0's orchestrator on port {}, this node's data on ports {even} and \
                 {odd}): train across nodes on a trusted network only",
                node.master_port
            ));
        }
        for warning in &plan.warnings {
            tracing::warn!("{warning}");
        }
        let device = &devices[plan.devices[0]];
        // Burn's own initialisation draws lazily, when a parameter is first used:
        // seeded from the run's seed and drawn here, once, every replica and every
        // run with this seed start from the same weights.
        B::seed(device, config.seed);
        let model = model.fork(device);

        // A multi-node run: node 0 keeps the books (store, checkpoints, files); the
        // others train and write nothing (docs/multi-node.md).
        let leader = config.node.node_rank == 0 || config.num_nodes == 1;
        let link = match config.num_nodes > 1 {
            true => Some(crate::collective::Link::open(
                config.num_nodes,
                &config.node,
            )?),
            false => None,
        };
        let signatures = Signatures {
            task: serde_json::to_string(&task.kind).unwrap_or_default(),
            model: checkpoint::model_signature::<B, M>(&model),
            world_size: plan.world_size,
        };
        // A resume continues the run the checkpoint belongs to, in its directory;
        // everything about the checkpoint is checked before anything is written.
        let resume = match &config.ckpt_path {
            Some(which) => {
                let dir = checkpoint::locate(config, which, leader)?;
                Some(checkpoint::load(&dir, &signatures)?)
            }
            None => None,
        };
        let run_dir = match (&resume, leader) {
            (_, false) => None,
            (Some(loaded), true) => {
                let run_dir = RunDir::open_for(&loaded.dir)?;
                // A resume continues its run: a different name is a conflict,
                // never silently ignored.
                match &config.run_name {
                    Some(asked) if *asked != run_dir.name => {
                        return Err(kiln_core::Error::invalid(
                            "run_name",
                            asked,
                            format!(
                                "the resumed run's name {:?}, or none (a resume continues \
                                 the run of its checkpoint, {})",
                                run_dir.name,
                                loaded.dir.display()
                            ),
                        )
                        .into());
                    }
                    _ => Some(run_dir),
                }
            }
            (None, true) => Some(RunDir::create(
                &config.default_root_dir,
                &config.experiment,
                config.run_name.as_deref(),
                &task.name,
            )?),
        };
        let record = serde_json::json!({ "task": task, "config": config, "plan": plan });
        // Nodes other than 0 keep the store only to end the run if node 0 died.
        let (experiment_db, mut follower_db) = match leader {
            true => (experiment_db, None),
            false => (None, experiment_db),
        };
        let (mut metrics, attempt) = match (&resume, &run_dir) {
            (_, None) => (Metrics::detached(), 1),
            (None, Some(run_dir)) => {
                run_dir.write_json("config.json", &record)?;
                let new_run = NewRun {
                    experiment: config.experiment.clone(),
                    name: run_dir.name.clone(),
                    config: record,
                    params: run_params(
                        config,
                        task,
                        &plan,
                        (model_name::<S>(), model_name::<LR>()),
                    ),
                    kiln_version: env!("CARGO_PKG_VERSION").to_string(),
                    git_commit: None,
                    host: host_name(),
                };
                (Metrics::start(experiment_db, &new_run)?, 1)
            }
            (Some(loaded), Some(_)) => {
                let s = &loaded.state;
                let (metrics, attempt) =
                    Metrics::resume(experiment_db, s.run_id, s.step, s.summaries.clone())?;
                (metrics, attempt.unwrap_or(s.attempt + 1))
            }
        };
        if let (Some(link), Some(pulse)) = (&link, metrics.pulse()) {
            link.beat_while_waiting(pulse);
        }
        let node = match config.num_nodes {
            1 => String::new(),
            n => format!("node {} of {n}: ", config.node.node_rank),
        };
        if let Some(run_dir) = &run_dir {
            tracing::info!(run = %run_dir.name, dir = %run_dir.path.display(), %plan, "training");
        } else {
            tracing::info!(%plan, "training (node {} writes no files)", config.node.node_rank);
        }
        if config.progress != ProgressMode::Off {
            match &run_dir {
                Some(run_dir) => eprintln!(
                    "kiln: {node}run {} in {}",
                    run_dir.name,
                    run_dir.path.display()
                ),
                None => eprintln!("kiln: {node}training; node 0 keeps the run's records"),
            }
            if let Some(loaded) = &resume {
                eprintln!(
                    "kiln: {node}resuming from {} (step {}, attempt {attempt})",
                    loaded.dir.display(),
                    loaded.state.step
                );
            }
            eprintln!("kiln: {node}plan {plan}");
            for warning in &plan.warnings {
                eprintln!("kiln: {node}warning: {warning}");
            }
        }

        let total = run::total_steps(config, work.len(Split::Train), n_epochs, plan.world_size);
        let optimization = optimization(total, resume.as_ref().map_or(0, |l| l.state.step));
        let workers: Vec<B::Device> = plan.devices.iter().map(|&i| devices[i].clone()).collect();
        let progress_mode = match leader {
            true => config.progress,
            false => ProgressMode::Off,
        };
        let mut progress = Progress::new(progress_mode, total);
        let mut stats = LoopStats::default();
        let no_dir = std::path::PathBuf::new();
        let run_path = run_dir.as_ref().map_or(&no_dir, |d| &d.path);
        let inputs = LoopInputs {
            config,
            run_dir: run_path,
            stop: &self.stop,
            task,
            data: work,
            device,
            n_epochs,
            checkpoints: (config.enable_checkpointing && leader).then(|| CheckpointCtx {
                run_dir: run_path,
                policy: &config.checkpoint,
                signatures: signatures.clone(),
                run_id: metrics.run_id(),
                attempt,
            }),
        };
        // A panic inside a model, a data module or a backend kernel must not leave
        // the run RUNNING forever: it ends the run as FAILED with the panic's message.
        let outcome = std::panic::catch_unwind(AssertUnwindSafe(|| match plan.engine {
            #[cfg(feature = "learner")]
            kiln_core::Engine::Learner => crate::learner::fit(
                &inputs,
                &workers,
                model,
                optimization,
                resume.as_ref(),
                (plan.strategy == Strategy::Fsdp, plan.precision),
                sync.filter(|_| {
                    plan.process_group_backend == Some(kiln_core::ProcessGroupBackend::Nccl)
                }),
                &mut metrics,
                &mut progress,
                &mut stats,
            ),
            _ if plan.world_size == 1 => native::fit(
                &inputs,
                model,
                optimization,
                resume.as_ref(),
                &native::Replica::single(plan.precision),
                &mut metrics,
                &mut progress,
                &mut stats,
            ),
            _ => native::fit_group(
                &inputs,
                &workers,
                model,
                optimization,
                resume.as_ref(),
                &native::GroupPlan {
                    sharded: plan.strategy == Strategy::Fsdp,
                    precision: plan.precision,
                    first_rank: config.node.node_rank as usize * workers.len(),
                    world: plan.world_size,
                    link: link.as_ref(),
                },
                &mut metrics,
                &mut progress,
                &mut stats,
            ),
        }))
        .unwrap_or_else(|panic| Err(Failure::Panicked(panic_message(panic.as_ref()))));
        progress.finish();

        let outcome = outcome.and_then(|model| {
            if let (true, Some(run_dir)) = (config.enable_checkpointing, &run_dir) {
                run_dir.save_model::<B, M>(&model)?;
            }
            Ok(model)
        });
        let (status, model) = match outcome {
            Ok(model) => (RunStatus::Finished, Some(model)),
            Err(Failure::Stopped) => (RunStatus::Killed, None),
            Err(Failure::Diverged(reason) | Failure::Panicked(reason)) => {
                (RunStatus::Failed { reason }, None)
            }
            Err(Failure::Error(e)) => (
                RunStatus::Failed {
                    reason: e.to_string(),
                },
                None,
            ),
        };
        let end_status = match status {
            RunStatus::Finished => EndStatus::Finished,
            RunStatus::Killed => EndStatus::Killed,
            _ => EndStatus::Failed,
        };
        let reason = match &status {
            RunStatus::Failed { reason } => Some(reason.clone()),
            _ => None,
        };
        let items = stats.samples as f64 * work.items_per_example() as f64;
        let seconds = stats.train_seconds.max(1e-9);
        let report = TrainReport {
            status,
            plan,
            epochs: stats.epochs,
            optimizer_steps: stats.steps,
            step_losses: stats.step_losses,
            final_metrics: metrics
                .summaries()
                .iter()
                .map(|(k, s)| (k.clone(), s.last))
                .collect(),
            metrics: metrics.summaries().clone(),
            throughput: Throughput {
                items_per_s: items / seconds,
                samples_per_s: stats.samples as f64 / seconds,
            },
            wall_time_s: started.elapsed().as_secs_f64(),
            run_dir: run_dir.as_ref().map(|d| d.path.clone()),
            run_id: metrics.run_id().or(stats.run_id),
            optimizer_state_bytes: stats.optimizer_state_bytes,
            skipped_steps: stats.skipped_steps,
            collective_s: stats.collective_seconds,
            weights_sha256: model.as_ref().map(checkpoint::weights_sha256::<B, M>),
            replica_spread: stats.replica_spread,
        };
        match &run_dir {
            Some(run_dir) => {
                // The report and the files go into the store before the run is
                // closed; whatever fails here (a full disk), the run is still
                // closed, FAILED with the reason, and the error returned.
                let saved_model = model.is_some() && config.enable_checkpointing;
                let ending = run_dir
                    .write_json("report.json", &report)
                    .and_then(|_| metrics.artifact(&run_dir.path, "report", "report.json"))
                    .and_then(|()| match saved_model {
                        true => metrics.artifact(&run_dir.path, "model", "model.mpk"),
                        false => Ok(()),
                    });
                let (end_status, stored_reason) = match &ending {
                    Ok(()) => (end_status, reason.clone()),
                    Err(e) => (
                        EndStatus::Failed,
                        Some(match &reason {
                            Some(reason) => format!("{reason}; then, ending the run: {e}"),
                            None => format!("ending the run: {e}"),
                        }),
                    ),
                };
                let ended = metrics.finish(end_status, stored_reason.as_deref());
                match (ended, &stored_reason) {
                    // The run's own failure is the error to return; another node
                    // may have ended the run FAILED already (multi-node runs).
                    (Err(e), Some(_)) => tracing::warn!("could not end the failed run: {e}"),
                    (ended, _) => ended?,
                }
                ending?;
            }
            None => {
                if let (Some(db), Some(run), Some(reason)) =
                    (follower_db.as_mut(), stats.run_id, &reason)
                {
                    end_for_node0(&mut **db, run, config.node.node_rank, reason);
                }
            }
        }
        match (model, reason) {
            (Some(model), _) => Ok(Trained { model, report }),
            (None, None) => Err(CoordinatorError::Stopped {
                report: Box::new(report),
            }),
            (None, Some(reason)) => Err(CoordinatorError::RunFailed {
                reason,
                report: Box::new(report),
            }),
        }
    }
}

/// A node other than 0 that failed ends the run FAILED in the store, unless node 0
/// (alive, and told of the failure in the same exchange) did first: node 0 is given
/// a moment, then the store refuses to end a run twice.
fn end_for_node0(db: &mut dyn RunTracker, run: i64, node: u32, reason: &str) {
    std::thread::sleep(std::time::Duration::from_secs(2));
    let reason = match reason.contains(&format!("node {node}")) {
        true => reason.to_string(),
        false => format!("node {node}: {reason}"),
    };
    match db.finish_run(run, EndStatus::Failed, Some(&reason)) {
        Ok(()) => tracing::warn!(run, "node {node} ended the run FAILED (node 0 did not)"),
        Err(e) => tracing::debug!(run, "node 0 ended the run: {e}"),
    }
}

impl TrainingCoordinator {
    /// The devices `train` and `fit` run on: the backend's default device, once
    /// per worker on a CPU backend ([`cpu_workers`]).
    fn default_devices<B: Backend>(&self) -> Result<Vec<B::Device>> {
        let device = B::Device::default();
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let workers = cpu_workers(&self.config, &<B as Backend>::name(&device), cores)?;
        Ok(vec![device; workers])
    }
}

/// CPU worker threads allowed per core: more only slow training down (and enough
/// of them exhaust the process's memory for thread stacks and model replicas).
const CPU_WORKERS_PER_CORE: usize = 4;

/// Worker threads `train` runs on a CPU backend of `cores` cores: one per device
/// asked for (`devices = N` is N workers on the CPU device, a list as many as its
/// largest index + 1), one for `auto` and `-1`; at most [`CPU_WORKERS_PER_CORE`]
/// per core. Other backends have their own devices.
fn cpu_workers(config: &CoordinatorConfig, backend: &str, cores: usize) -> Result<usize> {
    let cpu = ["ndarray", "flex"].iter().any(|b| backend.contains(b));
    let workers = match (&config.devices, cpu) {
        (Devices::Count(n), true) => *n,
        (Devices::List(list), true) => list.iter().max().map_or(1, |m| m + 1),
        _ => 1,
    };
    let limit = CPU_WORKERS_PER_CORE * cores.max(1);
    match workers > limit {
        true => Err(kiln_core::Error::invalid(
            "devices",
            &config.devices,
            format!(
                "at most {limit} worker threads on the CPU backend {backend} \
                 ({CPU_WORKERS_PER_CORE} per core of this machine's {cores}: more only \
                 slow training down)"
            ),
        )
        .into()),
        false => Ok(workers),
    }
}

/// The name of type `M` without path or generics, lower-cased: a run name for a
/// model type (`my_crate::Cnn<Autodiff<Flex>>` names runs `cnn-...`), and how an
/// optimizer (`adamw`, `sgd`) or scheduler type is recorded.
fn model_name<M>() -> String {
    let full = std::any::type_name::<M>();
    let bare = full.split('<').next().unwrap_or(full);
    let name = bare.rsplit("::").next().unwrap_or(bare).to_lowercase();
    match name.is_empty() {
        true => "model".into(),
        false => name,
    }
}

/// Flat parameters stored with the run for querying (strategy and precision as they
/// run, after resolution).
///
/// `optimization`: the optimizer's and the scheduler's type names. A model with its
/// own `TrainStep` brings them, configured by the user: kiln's `lr` and
/// `weight_decay` settings do not apply to it and are not recorded.
fn run_params(
    config: &CoordinatorConfig,
    task: &TaskSpec,
    plan: &kiln_core::ResolvedPlan,
    (optimizer, scheduler): (String, String),
) -> Vec<(String, String)> {
    let o = &config.optimizer;
    let mut params: Vec<(String, String)> = vec![
        ("task".into(), task.name.clone()),
        ("task_type".into(), task.kind.type_name().into()),
        ("strategy".into(), plan.strategy.to_string()),
        ("engine".into(), plan.engine.to_string()),
        ("precision".into(), plan.precision.to_string()),
        ("devices".into(), config.devices.to_string()),
        ("num_nodes".into(), config.num_nodes.to_string()),
        ("batch_size".into(), config.batch_size.to_string()),
        (
            "accumulate_grad_batches".into(),
            config.accumulate_grad_batches.to_string(),
        ),
        ("optimizer".into(), optimizer),
        ("seed".into(), config.seed.to_string()),
    ];
    match task.kind {
        kiln_core::TaskKind::Custom => params.push(("lr_scheduler".into(), scheduler)),
        _ => params.extend([
            ("lr".into(), o.lr.to_string()),
            ("weight_decay".into(), o.weight_decay.to_string()),
        ]),
    }
    if let Some(backend) = plan.process_group_backend {
        params.push(("process_group_backend".into(), backend.to_string()));
    }
    params
}

/// This machine's name as the system gives it (`gethostname(2)`; shells seldom
/// export `$HOSTNAME`, and a stale one would name the wrong machine), `unknown`
/// where there is none.
fn host_name() -> String {
    #[cfg(unix)]
    let name = nix::unistd::gethostname()
        .ok()
        .map(|h| h.to_string_lossy().into_owned());
    #[cfg(not(unix))]
    let name = std::env::var("COMPUTERNAME").ok();
    name.map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "unknown".into())
}

#[cfg(test)]
mod tests {
    use super::{host_name, model_name};
    use kiln_core::{CoordinatorConfig, Devices};

    /// Set in the copy of this test binary that [`the_host_name_comes_from_the_system`]
    /// starts: it prints the host name.
    const PRINT_HOST: &str = "KILN_TEST_PRINT_HOST";

    /// The host name a run records is the system's, whatever `$HOSTNAME` says: the
    /// test runs itself again with a wrong `$HOSTNAME` and compares.
    #[cfg(target_os = "linux")]
    #[test]
    fn the_host_name_comes_from_the_system() {
        if std::env::var_os(PRINT_HOST).is_some() {
            // The test's own output, read by the copy that started it.
            #[allow(clippy::print_stdout)]
            {
                println!("host={}", host_name());
            }
            return;
        }
        let child = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "coordinator::tests::the_host_name_comes_from_the_system",
            ])
            .args(["--nocapture", "--test-threads", "1"])
            .env(PRINT_HOST, "1")
            .env("HOSTNAME", "not-this-machine")
            .output()
            .unwrap();
        let out = String::from_utf8_lossy(&child.stdout);
        // libtest prints the test's name first, on the same line.
        let printed = out
            .split("host=")
            .nth(1)
            .and_then(|rest| rest.lines().next())
            .unwrap_or_else(|| panic!("the child printed no host name:\n{out}"));
        let system = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
        assert_eq!(printed, system.trim());
    }

    struct Cnn<T>(T);
    mod nested {
        pub struct ImageClassifier;
    }

    /// A CPU worker count the machine cannot hold is refused before anything is
    /// allocated, naming the value and the rule.
    #[rstest::rstest]
    #[case::count(
        Devices::Count(9999),
        Some("invalid devices \"9999\": expected at most 8 worker threads")
    )]
    #[case::list(Devices::List(vec![0, 8]), Some("invalid devices \"0,8\""))]
    #[case::at_the_limit(Devices::Count(8), None)]
    fn cpu_workers_are_bounded_by_the_cores(
        #[case] devices: Devices,
        #[case] refused: Option<&str>,
    ) {
        let config = CoordinatorConfig {
            devices,
            ..Default::default()
        };
        match (super::cpu_workers(&config, "autodiff<flex>", 2), refused) {
            (Ok(n), None) => assert_eq!(n, 8),
            (Err(e), Some(needle)) => assert!(e.to_string().starts_with(needle), "{e}"),
            (outcome, _) => panic!("{outcome:?}"),
        }
        // Another backend's devices are its own.
        assert_eq!(super::cpu_workers(&config, "cuda", 2).unwrap(), 1);
    }

    #[test]
    fn runs_are_named_after_the_model_type() {
        assert_eq!(model_name::<Cnn<Vec<u8>>>(), "cnn");
        assert_eq!(model_name::<nested::ImageClassifier>(), "imageclassifier");
        let _ = Cnn(0);
    }
}

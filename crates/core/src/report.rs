//! What a training run returns and records.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::{Precision, Strategy};

/// The engine that ran the training loop.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Engine {
    /// kiln's own loop (the seed's "vanilla PyTorch loop").
    Native,
    /// burn-train's `Learner` (the seed's "Lightning Trainer").
    Learner,
}

impl Engine {
    /// Every accepted spelling, for error messages.
    pub const ACCEPTED: &'static str = "auto, learner, native";

    /// Parses an engine choice: `auto` (kiln chooses) is `None`.
    ///
    /// ```
    /// use kiln_core::Engine;
    /// assert_eq!(Engine::parse_choice("native").unwrap(), Some(Engine::Native));
    /// assert_eq!(Engine::parse_choice("auto").unwrap(), None);
    /// assert!(Engine::parse_choice("lightning").is_err());
    /// ```
    pub fn parse_choice(s: &str) -> crate::Result<Option<Engine>> {
        Ok(match s.trim().to_ascii_lowercase().as_str() {
            "auto" => None,
            "learner" | "burn-train" => Some(Engine::Learner),
            "native" | "vanilla" => Some(Engine::Native),
            _ => return Err(crate::Error::invalid("engine", s, Engine::ACCEPTED)),
        })
    }
}

impl fmt::Display for Engine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Engine::Native => "native",
            Engine::Learner => "learner",
        })
    }
}

/// What carries a data-parallel group's gradients from worker to worker
/// (Lightning's `process_group_backend`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProcessGroupBackend {
    /// burn-collective's all-reduce, once per optimizer step (every backend; the
    /// only one across nodes).
    Collective,
    /// burn-train's DDP synchronisation: NCCL all-reduces each gradient on the GPUs
    /// during the backward pass (CUDA, one node, a build with `cuda-nccl`).
    Nccl,
}

impl ProcessGroupBackend {
    /// Every accepted spelling, for error messages.
    pub const ACCEPTED: &'static str = "auto, collective, nccl";

    /// Parses a choice: `auto` (kiln chooses) is `None`.
    ///
    /// ```
    /// use kiln_core::ProcessGroupBackend;
    /// assert_eq!(ProcessGroupBackend::parse_choice("nccl").unwrap(), Some(ProcessGroupBackend::Nccl));
    /// assert_eq!(ProcessGroupBackend::parse_choice("auto").unwrap(), None);
    /// assert!(ProcessGroupBackend::parse_choice("gloo").is_err());
    /// ```
    pub fn parse_choice(s: &str) -> crate::Result<Option<ProcessGroupBackend>> {
        Ok(match s.trim().to_ascii_lowercase().as_str() {
            "auto" => None,
            "collective" | "burn-collective" => Some(ProcessGroupBackend::Collective),
            "nccl" => Some(ProcessGroupBackend::Nccl),
            _ => {
                return Err(crate::Error::invalid(
                    "process_group_backend",
                    s,
                    ProcessGroupBackend::ACCEPTED,
                ));
            }
        })
    }
}

impl fmt::Display for ProcessGroupBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ProcessGroupBackend::Collective => "collective",
            ProcessGroupBackend::Nccl => "nccl",
        })
    }
}

/// What will run, resolved once from the configuration, the build and the
/// hardware; printed at start, stored with the run and returned in the report.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResolvedPlan {
    /// Engine running the loop.
    pub engine: Engine,
    /// Strategy actually used (never `auto`).
    pub strategy: Strategy,
    /// Device indices used on this node.
    pub devices: Vec<usize>,
    /// Number of nodes.
    pub num_nodes: u32,
    /// This node's rank (0 with one node).
    #[serde(default)]
    pub node_rank: u32,
    /// Workers in total (devices × nodes).
    pub world_size: usize,
    /// Precision actually used.
    pub precision: Precision,
    /// Backend name, e.g. `ndarray`, `flex`, `cuda`.
    pub backend: String,
    /// What carries the gradients of a data-parallel group (`None` with one
    /// worker).
    #[serde(default)]
    pub process_group_backend: Option<ProcessGroupBackend>,
    /// Warnings raised while resolving (also logged once).
    pub warnings: Vec<String>,
}

impl fmt::Display for ResolvedPlan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "engine={} strategy={} backend={} devices={:?} nodes={} world={} precision={}",
            self.engine,
            self.strategy,
            self.backend,
            self.devices,
            self.num_nodes,
            self.world_size,
            self.precision
        )?;
        if self.num_nodes > 1 {
            write!(f, " node_rank={}", self.node_rank)?;
        }
        if let Some(backend) = self.process_group_backend {
            write!(f, " process_group={backend}")?;
        }
        Ok(())
    }
}

/// How a run ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "SCREAMING_SNAKE_CASE")]
pub enum RunStatus {
    /// Still training.
    Running,
    /// Trained to the end.
    Finished,
    /// Stopped by an error (e.g. a non-finite loss at step N).
    Failed {
        /// What went wrong.
        reason: String,
    },
    /// Stopped by the user (SIGINT/SIGTERM).
    Killed,
}

impl RunStatus {
    /// `RUNNING`, `FINISHED`, `FAILED` or `KILLED`.
    pub fn label(&self) -> &'static str {
        match self {
            RunStatus::Running => "RUNNING",
            RunStatus::Finished => "FINISHED",
            RunStatus::Failed { .. } => "FAILED",
            RunStatus::Killed => "KILLED",
        }
    }
}

/// A metric's last and best values over the run.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct MetricSummary {
    /// The last value logged.
    pub last: f64,
    /// The best value logged (lowest for losses, highest for accuracies).
    pub best: f64,
    /// Optimizer step at which `best` was logged.
    pub best_step: u64,
}

/// Training speed over the whole run, validation excluded.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Throughput {
    /// Items per second: tokens for language modelling, samples otherwise.
    pub items_per_s: f64,
    /// Samples (examples) per second.
    pub samples_per_s: f64,
}

/// What [`TrainingCoordinator::train`](../kiln_coordinator/struct.TrainingCoordinator.html#method.train)
/// returns: the upstream result dictionary, typed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainReport {
    /// How the run ended.
    pub status: RunStatus,
    /// What ran.
    pub plan: ResolvedPlan,
    /// Epochs completed (a partial last epoch cut by `max_steps` counts).
    pub epochs: usize,
    /// Optimizer steps taken.
    pub optimizer_steps: u64,
    /// Training loss of every optimizer step, in order (mean over its micro-batches).
    pub step_losses: Vec<f32>,
    /// Last value of each metric, keyed `split/name` (e.g. `valid/loss`).
    pub final_metrics: BTreeMap<String, f64>,
    /// Last and best value of each metric, keyed like `final_metrics`.
    pub metrics: BTreeMap<String, MetricSummary>,
    /// Training speed.
    pub throughput: Throughput,
    /// Wall time of the whole call, seconds.
    pub wall_time_s: f64,
    /// Where the run's files are.
    pub run_dir: Option<PathBuf>,
    /// The run's id in the experiment store, when one was given.
    pub run_id: Option<i64>,
    /// Bytes of optimizer state one worker keeps (rank 0's, encoded at full
    /// precision): the whole model's AdamW moments for `single` and `ddp`, about a
    /// world-size share of them for `fsdp`. 0 when training never started.
    #[serde(default)]
    pub optimizer_state_bytes: u64,
    /// Optimizer steps skipped because their gradients were not finite (`16-mixed`
    /// loss scaling backing off); 0 in every other mode.
    #[serde(default)]
    pub skipped_steps: u64,
    /// Seconds rank 0 spent in the data-parallel exchanges (one all-reduce per
    /// optimizer step, waiting for the slowest worker included); 0 on one device.
    #[serde(default)]
    pub collective_s: f64,
    /// SHA-256 of the final weights (every parameter's f32 values in visiting
    /// order, little-endian): equal on every worker and node of a data-parallel run,
    /// and between two runs that trained bit for bit alike. Absent when training
    /// did not finish.
    #[serde(default)]
    pub weights_sha256: Option<String>,
    /// With `check_replicas`: the largest difference between a worker's weights
    /// and the group's mean seen after any step (0 when the replicas stayed
    /// identical); absent otherwise.
    #[serde(default)]
    pub replica_spread: Option<f64>,
}

//! The coordinator's configuration, parsed from the strings Lightning users know.
//!
//! Each value type implements [`FromStr`](std::str::FromStr) and `Display`, and
//! serialises as its canonical string, so a configuration round-trips through JSON,
//! the command line and the experiment store unchanged.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::launch::NodeSettings;
use crate::{Engine, Error, ProcessGroupBackend, Result};

macro_rules! string_serde {
    ($t:ty) => {
        impl Serialize for $t {
            fn serialize<S: serde::Serializer>(
                &self,
                s: S,
            ) -> std::result::Result<S::Ok, S::Error> {
                s.collect_str(self)
            }
        }
        impl<'de> Deserialize<'de> for $t {
            fn deserialize<D: serde::Deserializer<'de>>(
                d: D,
            ) -> std::result::Result<Self, D::Error> {
                let raw = StringOrNumber::deserialize(d)?;
                raw.0.parse().map_err(serde::de::Error::custom)
            }
        }
    };
}

/// Accepts `"2"` and `2` alike when reading JSON.
struct StringOrNumber(String);

impl<'de> Deserialize<'de> for StringOrNumber {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            S(String),
            I(i64),
            L(Vec<i64>),
        }
        Ok(StringOrNumber(match Raw::deserialize(d)? {
            Raw::S(s) => s,
            Raw::I(i) => i.to_string(),
            Raw::L(l) => l.iter().map(i64::to_string).collect::<Vec<_>>().join(","),
        }))
    }
}

/// How training is distributed. Lightning's `strategy` argument.
///
/// | value | meaning |
/// | --- | --- |
/// | `auto` | the best the build and the devices allow (see `docs/strategies.md`) |
/// | `single` | one device |
/// | `vanilla` | kiln's native loop on one device, in any build |
/// | `ddp` | data parallel: one replica per device, gradients averaged each step |
/// | `ddp_spawn` | accepted as `ddp` (kiln's workers are threads: nothing to spawn) |
/// | `fsdp` | data parallel with the optimizer state sharded across workers (`fsdp_native` is an alias) |
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Strategy {
    /// Let kiln choose.
    #[default]
    Auto,
    /// One device.
    Single,
    /// The native loop on one device, whatever the build.
    Vanilla,
    /// Distributed data parallel.
    Ddp,
    /// Lightning's `ddp_spawn`; runs as [`Strategy::Ddp`].
    DdpSpawn,
    /// Sharded optimizer state (ZeRO stage 1).
    Fsdp,
}

impl Strategy {
    /// Every accepted spelling, for error messages.
    pub const ACCEPTED: &'static str = "auto, single, vanilla, ddp, ddp_spawn, fsdp";
}

impl FromStr for Strategy {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s.trim().to_ascii_lowercase().as_str() {
            "auto" => Strategy::Auto,
            "single" | "single_device" => Strategy::Single,
            "vanilla" | "native" => Strategy::Vanilla,
            "ddp" => Strategy::Ddp,
            "ddp_spawn" => Strategy::DdpSpawn,
            "fsdp" | "fsdp_native" => Strategy::Fsdp,
            _ => return Err(Error::invalid("strategy", s, Strategy::ACCEPTED)),
        })
    }
}

impl fmt::Display for Strategy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Strategy::Auto => "auto",
            Strategy::Single => "single",
            Strategy::Vanilla => "vanilla",
            Strategy::Ddp => "ddp",
            Strategy::DdpSpawn => "ddp_spawn",
            Strategy::Fsdp => "fsdp",
        })
    }
}
string_serde!(Strategy);

/// Numeric precision of training. Lightning's `precision` argument.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Precision {
    /// f32 throughout (`32`, `32-true`).
    #[default]
    F32,
    /// f32 master weights, bf16 forward and backward (`bf16-mixed`, alias `bf16`).
    Bf16Mixed,
    /// f32 master weights, f16 forward and backward with loss scaling (`16-mixed`, alias `16`).
    F16Mixed,
    /// The whole model in bf16 (`bf16-true`).
    Bf16True,
    /// The whole model in f16 (`16-true`).
    F16True,
}

impl Precision {
    /// Every accepted spelling, for error messages.
    pub const ACCEPTED: &'static str =
        "32, 32-true, bf16-mixed, 16-mixed, bf16-true, 16-true (aliases: bf16, 16)";
}

impl FromStr for Precision {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s.trim().to_ascii_lowercase().as_str() {
            "32" | "32-true" => Precision::F32,
            "bf16-mixed" | "bf16" => Precision::Bf16Mixed,
            "16-mixed" | "16" => Precision::F16Mixed,
            "bf16-true" => Precision::Bf16True,
            "16-true" => Precision::F16True,
            _ => return Err(Error::invalid("precision", s, Precision::ACCEPTED)),
        })
    }
}

impl fmt::Display for Precision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Precision::F32 => "32-true",
            Precision::Bf16Mixed => "bf16-mixed",
            Precision::F16Mixed => "16-mixed",
            Precision::Bf16True => "bf16-true",
            Precision::F16True => "16-true",
        })
    }
}
string_serde!(Precision);

/// Which devices to train on. Lightning's `devices` argument.
///
/// `auto` (every accelerator found, else one CPU worker), `N` (the first N devices),
/// `-1` (all devices), or a comma-separated list of device indices such as `"0,2"`
/// (also `[0, 2]` in JSON).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub enum Devices {
    /// Let kiln choose.
    #[default]
    Auto,
    /// The first `n` devices (`n >= 1`).
    Count(usize),
    /// Every device (`-1`).
    All,
    /// These device indices, distinct, in this order.
    List(Vec<usize>),
}

impl Devices {
    /// Every accepted form, for error messages.
    pub const ACCEPTED: &'static str =
        "auto, a positive count such as 2, -1 for all, or distinct indices such as \"0,2\"";

    /// Resolves against the number of devices present.
    ///
    /// Returns the indices to use, or an error naming what was asked and what exists.
    pub fn select(&self, available: usize) -> Result<DeviceSelection> {
        let too_many = |asked: String| {
            Error::invalid(
                "devices",
                asked,
                format!("at most {available} (devices present)"),
            )
        };
        let indices = match self {
            Devices::Auto | Devices::All => (0..available.max(1)).collect(),
            Devices::Count(n) if *n > available.max(1) => return Err(too_many(n.to_string())),
            Devices::Count(n) => (0..*n).collect(),
            Devices::List(list) => {
                if let Some(bad) = list.iter().find(|&&i| i >= available.max(1)) {
                    return Err(Error::invalid(
                        "devices",
                        self,
                        format!(
                            "indices below {} (device {bad} does not exist)",
                            available.max(1)
                        ),
                    ));
                }
                list.clone()
            }
        };
        Ok(DeviceSelection { indices })
    }
}

/// The device indices a [`Devices`] value resolved to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceSelection {
    /// Device indices, in worker order.
    pub indices: Vec<usize>,
}

impl FromStr for Devices {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        let bad = || Error::invalid("devices", s, Devices::ACCEPTED);
        let t = s.trim();
        if t.eq_ignore_ascii_case("auto") {
            return Ok(Devices::Auto);
        }
        if t == "-1" {
            return Ok(Devices::All);
        }
        let inner = t.strip_prefix('[').and_then(|r| r.strip_suffix(']'));
        let is_list = inner.is_some() || t.contains(',');
        let body = inner.unwrap_or(t);
        if !is_list {
            return match body.parse::<i64>() {
                Ok(n) if n >= 1 => Ok(Devices::Count(n as usize)),
                _ => Err(bad()),
            };
        }
        let mut list = Vec::new();
        for part in body.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let idx: usize = part.parse().map_err(|_| bad())?;
            if list.contains(&idx) {
                return Err(Error::invalid("devices", s, "distinct device indices"));
            }
            list.push(idx);
        }
        if list.is_empty() {
            return Err(bad());
        }
        Ok(Devices::List(list))
    }
}

impl fmt::Display for Devices {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Devices::Auto => f.write_str("auto"),
            Devices::All => f.write_str("-1"),
            Devices::Count(n) => write!(f, "{n}"),
            Devices::List(l) => {
                let parts: Vec<String> = l.iter().map(usize::to_string).collect();
                write!(f, "{}", parts.join(","))
            }
        }
    }
}
string_serde!(Devices);

/// How progress is shown while training.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProgressMode {
    /// A progress bar when stderr is a terminal (and not in CI), plain lines otherwise.
    #[default]
    Auto,
    /// Always a progress bar.
    Bar,
    /// Plain periodic lines on stderr.
    Lines,
    /// Nothing.
    Off,
    /// burn-train's terminal dashboard (Learner engine built with the `tui`
    /// feature; `kiln train --tui`).
    Tui,
}

impl FromStr for ProgressMode {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s.trim().to_ascii_lowercase().as_str() {
            "auto" => ProgressMode::Auto,
            "bar" => ProgressMode::Bar,
            "lines" => ProgressMode::Lines,
            "off" | "none" => ProgressMode::Off,
            "tui" => ProgressMode::Tui,
            _ => return Err(Error::invalid("progress", s, "auto, bar, lines, off, tui")),
        })
    }
}

/// Learning-rate schedule, evaluated per optimizer step.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum LrSchedule {
    /// The base learning rate at every step.
    Constant,
    /// Linear warm-up from 0 to the base rate over `warmup_steps`, then a cosine
    /// decay to `min_lr_ratio` × base at the last step (no restart).
    WarmupCosine {
        /// Optimizer steps of linear warm-up.
        warmup_steps: u64,
        /// Final learning rate as a fraction of the base rate, in `[0, 1]`.
        min_lr_ratio: f64,
    },
}

impl LrSchedule {
    /// The learning rate at optimizer step `step` (0-based) of `total_steps`.
    ///
    /// ```
    /// use kiln_core::LrSchedule;
    /// let s = LrSchedule::WarmupCosine { warmup_steps: 10, min_lr_ratio: 0.1 };
    /// assert_eq!(s.lr_at(1.0, 0, 100), 0.1);          // first warm-up step
    /// assert!((s.lr_at(1.0, 9, 100) - 1.0).abs() < 1e-12);
    /// assert!((s.lr_at(1.0, 99, 100) - 0.1).abs() < 1e-12); // ends at the floor
    /// ```
    pub fn lr_at(&self, base: f64, step: u64, total_steps: u64) -> f64 {
        match *self {
            LrSchedule::Constant => base,
            LrSchedule::WarmupCosine {
                warmup_steps,
                min_lr_ratio,
            } => {
                if step < warmup_steps {
                    return base * (step + 1) as f64 / warmup_steps as f64;
                }
                let decay_steps = total_steps.saturating_sub(warmup_steps).max(1);
                let last = decay_steps.saturating_sub(1).max(1) as f64;
                let t = ((step - warmup_steps) as f64 / last).min(1.0);
                let floor = base * min_lr_ratio;
                floor + 0.5 * (base - floor) * (1.0 + (std::f64::consts::PI * t).cos())
            }
        }
    }
}

/// Which way a monitored metric improves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MonitorMode {
    /// Lower is better (losses).
    #[default]
    Min,
    /// Higher is better (accuracies).
    Max,
}

impl FromStr for MonitorMode {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "min" => Ok(MonitorMode::Min),
            "max" => Ok(MonitorMode::Max),
            _ => Err(Error::invalid("mode", s, "min, max")),
        }
    }
}

/// When checkpoints are written and which are kept (Lightning's `ModelCheckpoint`).
///
/// The defaults are the ones a user never regrets: a checkpoint at the end of every
/// epoch, the last one kept, and the best one by validation loss kept.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct CheckpointPolicy {
    /// Also write a checkpoint every this many optimizer steps.
    pub every_n_steps: Option<u64>,
    /// Write a checkpoint at the end of every this many epochs.
    pub every_n_epochs: Option<u64>,
    /// Also write a checkpoint when this many seconds of training passed since the last one.
    pub train_time_interval_s: Option<f64>,
    /// Always keep the newest checkpoint.
    pub save_last: bool,
    /// Keep this many best checkpoints by `monitor` (0: none kept for being best).
    pub save_top_k: usize,
    /// Metric ranking checkpoints, as `split/name` (e.g. `valid/loss`).
    pub monitor: String,
    /// Whether `monitor` improves downwards or upwards.
    pub mode: MonitorMode,
}

impl Default for CheckpointPolicy {
    fn default() -> Self {
        Self {
            every_n_steps: None,
            every_n_epochs: Some(1),
            train_time_interval_s: None,
            save_last: true,
            save_top_k: 1,
            monitor: "valid/loss".into(),
            mode: MonitorMode::Min,
        }
    }
}

/// Dynamic loss scaling of `16-mixed` (PyTorch's `GradScaler`, whose defaults these
/// are).
///
/// Each micro-batch's loss is multiplied by the scale before the backward pass and
/// the gradients are divided by it before clipping and the optimizer step. A step
/// whose gradients are not finite is skipped and the scale multiplied by
/// `backoff_factor`; after `growth_interval` finite steps in a row it is multiplied by
/// `growth_factor`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct LossScaling {
    /// The scale of the first step.
    pub init_scale: f64,
    /// Applied after `growth_interval` finite steps in a row (`> 1`).
    pub growth_factor: f64,
    /// Applied when a step's gradients are not finite (in `(0, 1)`).
    pub backoff_factor: f64,
    /// Finite steps in a row before the scale grows (`>= 1`).
    pub growth_interval: u32,
}

impl Default for LossScaling {
    fn default() -> Self {
        Self {
            init_scale: 65536.0,
            growth_factor: 2.0,
            backoff_factor: 0.5,
            growth_interval: 2000,
        }
    }
}

/// Which checkpoint to resume from (Lightning's `ckpt_path`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CkptPath {
    /// The newest checkpoint of the run.
    Last,
    /// The best checkpoint of the run by the policy's monitor.
    Best,
    /// A checkpoint directory.
    Path(PathBuf),
}

impl FromStr for CkptPath {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.trim() {
            "" => Err(Error::invalid(
                "ckpt_path",
                s,
                "last, best or a checkpoint directory",
            )),
            "last" => Ok(CkptPath::Last),
            "best" => Ok(CkptPath::Best),
            p => Ok(CkptPath::Path(PathBuf::from(p))),
        }
    }
}

impl fmt::Display for CkptPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CkptPath::Last => f.write_str("last"),
            CkptPath::Best => f.write_str("best"),
            CkptPath::Path(p) => write!(f, "{}", p.display()),
        }
    }
}
string_serde!(CkptPath);

/// AdamW settings. The defaults are the benchmark workload's (`lr` 3e-4, betas
/// (0.9, 0.95), eps 1e-8, weight decay 0.1), not Burn's (whose eps is 1e-5).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct OptimizerConfig {
    /// Base learning rate.
    pub lr: f64,
    /// Decoupled weight decay, applied to every parameter.
    pub weight_decay: f32,
    /// First-moment decay.
    pub beta1: f32,
    /// Second-moment decay.
    pub beta2: f32,
    /// Denominator term for numerical stability.
    pub eps: f32,
    /// Learning-rate schedule.
    pub schedule: LrSchedule,
}

impl Default for OptimizerConfig {
    fn default() -> Self {
        Self {
            lr: 3e-4,
            weight_decay: 0.1,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            schedule: LrSchedule::Constant,
        }
    }
}

/// Everything a [`TrainingCoordinator`](../kiln_coordinator/struct.TrainingCoordinator.html)
/// is configured with.
///
/// The first six fields are the seed card's constructor arguments and keep
/// Lightning's names; the rest are the `Trainer` arguments of the same names
/// (`max_steps`, `limit_train_batches`, `accumulate_grad_batches`,
/// `gradient_clip_val`, `default_root_dir`) plus what Lightning leaves to the
/// `LightningModule` and the data module (optimizer, batch size, seed).
///
/// ```
/// use kiln_core::{CoordinatorConfig, Strategy};
/// let cfg = CoordinatorConfig { strategy: "ddp".parse().unwrap(), ..Default::default() };
/// assert_eq!(cfg.strategy, Strategy::Ddp);
/// cfg.validate().unwrap();
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct CoordinatorConfig {
    /// How training is distributed.
    pub strategy: Strategy,
    /// The engine that runs the loop: `None` lets kiln choose (the Learner engine
    /// when it is compiled in and can run the plan, else the native loop; see
    /// `docs/strategies.md`). Asking for one that cannot run the plan is an error.
    pub engine: Option<Engine>,
    /// Numeric precision.
    pub precision: Precision,
    /// When the backend lacks the precision's dtype: an error instead of falling back
    /// to `32-true` with a warning.
    pub strict_precision: bool,
    /// Loss scaling of `16-mixed` (unused by the other modes).
    pub loss_scaling: LossScaling,
    /// Devices per node.
    pub devices: Devices,
    /// Number of machines (`>= 1`).
    pub num_nodes: u32,
    /// This node's rank and the rendezvous of a multi-node run (unused with one
    /// node; see [`crate::launch`]).
    pub node: NodeSettings,
    /// What carries a data-parallel group's gradients (Lightning's
    /// `process_group_backend`): `None` lets kiln choose (NCCL where the build, the
    /// backend and the plan allow it, else burn-collective; see
    /// `docs/strategies.md`). Asking for one that cannot run the plan is an error.
    pub process_group_backend: Option<ProcessGroupBackend>,
    /// Data-parallel groups compare every worker's weights after every optimizer
    /// step (one more exchange of the parameters per step: for debugging and
    /// tests); a difference fails the run. The largest difference seen is in the
    /// report (`replica_spread`).
    pub check_replicas: bool,
    /// Lightning's `deterministic`: a data-parallel group of workers in one process
    /// takes the same steps in every run with one seed, random ops in the model
    /// (dropout) included, where the backend's RNG is one per process (the CPU
    /// ones): the workers then run their passes of a micro-batch one at a time,
    /// each right after seeding the RNG with its own seed; slower, as Lightning
    /// warns for its flag (under NCCL's synchronisation, whose backward passes
    /// wait for each other, the workers keep their own devices' RNGs instead).
    /// Without it each worker still draws its own numbers, in an order the
    /// threads' timing decides. One worker per process is deterministic either
    /// way.
    pub deterministic: bool,
    /// Whether checkpoints are written.
    pub enable_checkpointing: bool,
    /// When checkpoints are written and which are kept.
    pub checkpoint: CheckpointPolicy,
    /// Resume from this checkpoint (Lightning's `fit(ckpt_path=...)`).
    pub ckpt_path: Option<CkptPath>,
    /// Metrics are logged every this many optimizer steps (`>= 1`).
    pub log_every_n_steps: u64,
    /// Stop after this many optimizer steps, whatever the epoch count.
    pub max_steps: Option<u64>,
    /// Train on at most this many batches per epoch (quick runs).
    pub limit_train_batches: Option<usize>,
    /// Validate on at most this many batches per epoch.
    pub limit_val_batches: Option<usize>,
    /// Micro-batches per optimizer step; gradients are averaged over them (`>= 1`).
    pub accumulate_grad_batches: u32,
    /// Clip the global gradient norm (over every parameter) to this value.
    pub gradient_clip_val: Option<f64>,
    /// Examples per micro-batch.
    pub batch_size: usize,
    /// Seed for data order and any randomness the loop draws.
    pub seed: u64,
    /// Optimizer settings.
    pub optimizer: OptimizerConfig,
    /// How progress is shown.
    pub progress: ProgressMode,
    /// Where run directories are created.
    pub default_root_dir: PathBuf,
    /// Experiment the run belongs to.
    pub experiment: String,
    /// Run name; generated when absent.
    pub run_name: Option<String>,
}

impl Default for CoordinatorConfig {
    fn default() -> Self {
        Self {
            strategy: Strategy::Auto,
            engine: None,
            precision: Precision::F32,
            strict_precision: false,
            loss_scaling: LossScaling::default(),
            devices: Devices::Auto,
            num_nodes: 1,
            node: NodeSettings::default(),
            process_group_backend: None,
            check_replicas: false,
            deterministic: false,
            enable_checkpointing: true,
            checkpoint: CheckpointPolicy::default(),
            ckpt_path: None,
            log_every_n_steps: 10,
            max_steps: None,
            limit_train_batches: None,
            limit_val_batches: None,
            accumulate_grad_batches: 1,
            gradient_clip_val: None,
            batch_size: 32,
            seed: 1337,
            optimizer: OptimizerConfig::default(),
            progress: ProgressMode::Auto,
            default_root_dir: PathBuf::from("runs"),
            experiment: "default".into(),
            run_name: None,
        }
    }
}

impl CoordinatorConfig {
    /// Checks every numeric field; the error names the field and the accepted range.
    pub fn validate(&self) -> Result<()> {
        let positive = |field: &'static str, v: u64| {
            if v == 0 {
                Err(Error::invalid(field, v, "an integer >= 1"))
            } else {
                Ok(())
            }
        };
        positive("num_nodes", self.num_nodes as u64)?;
        self.node.validate(self.num_nodes)?;
        positive("log_every_n_steps", self.log_every_n_steps)?;
        positive(
            "accumulate_grad_batches",
            self.accumulate_grad_batches as u64,
        )?;
        positive("batch_size", self.batch_size as u64)?;
        if let Some(n) = self.max_steps {
            positive("max_steps", n)?;
        }
        if let Some(n) = self.limit_train_batches {
            positive("limit_train_batches", n as u64)?;
        }
        if let Some(n) = self.limit_val_batches {
            positive("limit_val_batches", n as u64)?;
        }
        if let Devices::Count(0) = self.devices {
            return Err(Error::invalid("devices", 0, Devices::ACCEPTED));
        }
        if let Some(c) = self.gradient_clip_val
            && !(c.is_finite() && c > 0.0)
        {
            return Err(Error::invalid(
                "gradient_clip_val",
                c,
                "a finite number > 0",
            ));
        }
        let o = &self.optimizer;
        if !(o.lr.is_finite() && o.lr > 0.0) {
            return Err(Error::invalid("lr", o.lr, "a finite number > 0"));
        }
        if !(o.weight_decay.is_finite() && o.weight_decay >= 0.0) {
            return Err(Error::invalid(
                "weight_decay",
                o.weight_decay,
                "a finite number >= 0",
            ));
        }
        for (field, b) in [("beta1", o.beta1), ("beta2", o.beta2)] {
            if !(0.0..1.0).contains(&b) {
                return Err(Error::invalid(field, b, "a number in [0, 1)"));
            }
        }
        if !(o.eps.is_finite() && o.eps > 0.0) {
            return Err(Error::invalid("eps", o.eps, "a finite number > 0"));
        }
        if let LrSchedule::WarmupCosine { min_lr_ratio, .. } = o.schedule
            && !(0.0..=1.0).contains(&min_lr_ratio)
        {
            return Err(Error::invalid(
                "min_lr_ratio",
                min_lr_ratio,
                "a number in [0, 1]",
            ));
        }
        let s = &self.loss_scaling;
        if !(s.init_scale.is_finite() && s.init_scale > 0.0) {
            return Err(Error::invalid(
                "init_scale",
                s.init_scale,
                "a finite number > 0",
            ));
        }
        if !(s.growth_factor.is_finite() && s.growth_factor > 1.0) {
            return Err(Error::invalid(
                "growth_factor",
                s.growth_factor,
                "a finite number > 1",
            ));
        }
        if !(s.backoff_factor > 0.0 && s.backoff_factor < 1.0) {
            return Err(Error::invalid(
                "backoff_factor",
                s.backoff_factor,
                "a number in (0, 1)",
            ));
        }
        positive("growth_interval", s.growth_interval as u64)?;
        let c = &self.checkpoint;
        if c.every_n_steps == Some(0) {
            return Err(Error::invalid("every_n_steps", 0, "an integer >= 1"));
        }
        if c.every_n_epochs == Some(0) {
            return Err(Error::invalid("every_n_epochs", 0, "an integer >= 1"));
        }
        if let Some(t) = c.train_time_interval_s
            && !(t.is_finite() && t > 0.0)
        {
            return Err(Error::invalid(
                "train_time_interval",
                t,
                "a finite number of seconds > 0",
            ));
        }
        if !c.monitor.contains('/') {
            return Err(Error::invalid(
                "monitor",
                &c.monitor,
                "split/name such as valid/loss",
            ));
        }
        directory_name("experiment", &self.experiment)?;
        if let Some(name) = &self.run_name {
            directory_name("run_name", name)?;
        }
        Ok(())
    }
}

/// `name` (of `field`) as one directory's name below the output directory: not
/// empty, no path separator, not `.` or `..`, so that a run never lands outside
/// `default_root_dir`.
fn directory_name(field: &'static str, name: &str) -> Result<()> {
    let bad = name.trim().is_empty()
        || name.contains(['/', '\\'])
        || name == "."
        || name == ".."
        || name.contains('\0');
    match bad {
        true => Err(Error::invalid(
            field,
            name,
            "a non-empty name without slashes, not . or .. (one directory below the \
             output directory)",
        )),
        false => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rstest::rstest;

    /// Experiment and run names are one directory each below the output
    /// directory: a name that would leave it, or name none, is refused by name.
    #[rstest]
    #[case::escape_experiment("experiment", "../../escape")]
    #[case::parent_experiment("experiment", "..")]
    #[case::nested_experiment("experiment", "a/b")]
    #[case::blank_experiment("experiment", " ")]
    #[case::escape_run("run_name", "../x")]
    #[case::backslash_run("run_name", "a\\b")]
    #[case::dot_run("run_name", ".")]
    fn names_that_leave_the_output_directory_are_refused(#[case] field: &str, #[case] name: &str) {
        let mut config = CoordinatorConfig::default();
        match field {
            "experiment" => config.experiment = name.into(),
            _ => config.run_name = Some(name.into()),
        }
        let err = config.validate().unwrap_err().to_string();
        assert!(
            err.starts_with(&format!("invalid {field} {name:?}")),
            "{err}"
        );
    }

    #[rstest]
    #[case("auto", Strategy::Auto)]
    #[case("DDP", Strategy::Ddp)]
    #[case("ddp_spawn", Strategy::DdpSpawn)]
    #[case("fsdp_native", Strategy::Fsdp)]
    #[case("vanilla", Strategy::Vanilla)]
    #[case("single", Strategy::Single)]
    fn strategies_parse(#[case] s: &str, #[case] want: Strategy) {
        assert_eq!(s.parse::<Strategy>().unwrap(), want);
    }

    #[rstest]
    #[case("32", Precision::F32)]
    #[case("32-true", Precision::F32)]
    #[case("bf16", Precision::Bf16Mixed)]
    #[case("bf16-mixed", Precision::Bf16Mixed)]
    #[case("16", Precision::F16Mixed)]
    #[case("16-mixed", Precision::F16Mixed)]
    #[case("bf16-true", Precision::Bf16True)]
    #[case("16-true", Precision::F16True)]
    fn precisions_parse(#[case] s: &str, #[case] want: Precision) {
        assert_eq!(s.parse::<Precision>().unwrap(), want);
        // The canonical spelling parses back to the same value.
        assert_eq!(want.to_string().parse::<Precision>().unwrap(), want);
    }

    #[rstest]
    #[case("auto", Devices::Auto)]
    #[case("2", Devices::Count(2))]
    #[case("-1", Devices::All)]
    #[case("0,2", Devices::List(vec![0, 2]))]
    #[case("[1, 3]", Devices::List(vec![1, 3]))]
    #[case("[0]", Devices::List(vec![0]))]
    fn devices_parse(#[case] s: &str, #[case] want: Devices) {
        assert_eq!(s.parse::<Devices>().unwrap(), want);
    }

    #[rstest]
    #[case::unknown_strategy("strategy", "deepspeed", "auto, single, vanilla, ddp")]
    #[case::empty_strategy("strategy", "", "auto, single")]
    #[case::unknown_precision("precision", "8-mixed", "bf16-mixed")]
    #[case::precision_64("precision", "64", "32-true")]
    #[case::devices_zero("devices", "0", "positive count")]
    #[case::devices_minus_two("devices", "-2", "-1 for all")]
    #[case::devices_letters("devices", "a,b", "distinct indices")]
    #[case::devices_duplicate("devices", "1,1", "distinct device indices")]
    #[case::devices_empty_list("devices", "[]", "auto")]
    #[case::devices_word("devices", "gpu", "auto")]
    fn bad_values_name_the_value_and_the_choices(
        #[case] field: &str,
        #[case] value: &str,
        #[case] needle: &str,
    ) {
        let err = match field {
            "strategy" => value.parse::<Strategy>().map(|_| ()),
            "precision" => value.parse::<Precision>().map(|_| ()),
            _ => value.parse::<Devices>().map(|_| ()),
        }
        .unwrap_err()
        .to_string();
        assert!(err.contains(field), "{err}");
        assert!(err.contains(&format!("{value:?}")), "{err}");
        assert!(err.contains(needle), "{err}");
    }

    #[rstest]
    #[case::num_nodes_zero(CoordinatorConfig { num_nodes: 0, ..Default::default() }, "num_nodes")]
    #[case::log_every_zero(CoordinatorConfig { log_every_n_steps: 0, ..Default::default() }, "log_every_n_steps")]
    #[case::accumulate_zero(CoordinatorConfig { accumulate_grad_batches: 0, ..Default::default() }, "accumulate_grad_batches")]
    #[case::batch_zero(CoordinatorConfig { batch_size: 0, ..Default::default() }, "batch_size")]
    #[case::max_steps_zero(CoordinatorConfig { max_steps: Some(0), ..Default::default() }, "max_steps")]
    #[case::limit_zero(CoordinatorConfig { limit_train_batches: Some(0), ..Default::default() }, "limit_train_batches")]
    #[case::devices_count_zero(CoordinatorConfig { devices: Devices::Count(0), ..Default::default() }, "devices")]
    #[case::clip_negative(CoordinatorConfig { gradient_clip_val: Some(-1.0), ..Default::default() }, "gradient_clip_val")]
    #[case::clip_nan(CoordinatorConfig { gradient_clip_val: Some(f64::NAN), ..Default::default() }, "gradient_clip_val")]
    #[case::lr_zero(CoordinatorConfig { optimizer: OptimizerConfig { lr: 0.0, ..Default::default() }, ..Default::default() }, "lr")]
    #[case::beta_one(CoordinatorConfig { optimizer: OptimizerConfig { beta2: 1.0, ..Default::default() }, ..Default::default() }, "beta2")]
    #[case::empty_experiment(CoordinatorConfig { experiment: " ".into(), ..Default::default() }, "experiment")]
    #[case::scale_zero(CoordinatorConfig { loss_scaling: LossScaling { init_scale: 0.0, ..Default::default() }, ..Default::default() }, "init_scale")]
    #[case::growth_one(CoordinatorConfig { loss_scaling: LossScaling { growth_factor: 1.0, ..Default::default() }, ..Default::default() }, "growth_factor")]
    #[case::backoff_one(CoordinatorConfig { loss_scaling: LossScaling { backoff_factor: 1.0, ..Default::default() }, ..Default::default() }, "backoff_factor")]
    #[case::growth_interval_zero(CoordinatorConfig { loss_scaling: LossScaling { growth_interval: 0, ..Default::default() }, ..Default::default() }, "growth_interval")]
    fn invalid_configurations_are_refused(#[case] cfg: CoordinatorConfig, #[case] field: &str) {
        let err = cfg.validate().unwrap_err().to_string();
        assert!(err.starts_with(&format!("invalid {field} ")), "{err}");
    }

    #[test]
    fn config_round_trips_through_json_with_lightning_spellings() {
        let cfg = CoordinatorConfig {
            strategy: Strategy::Fsdp,
            precision: Precision::Bf16Mixed,
            devices: Devices::List(vec![0, 2]),
            ..Default::default()
        };
        let json = serde_json::to_value(&cfg).unwrap();
        assert_eq!(json["strategy"], "fsdp");
        assert_eq!(json["precision"], "bf16-mixed");
        assert_eq!(json["devices"], "0,2");
        let back: CoordinatorConfig = serde_json::from_value(json).unwrap();
        assert_eq!(back, cfg);
        let from_numbers: CoordinatorConfig =
            serde_json::from_str(r#"{"devices": 2, "precision": 32}"#).unwrap();
        assert_eq!(from_numbers.devices, Devices::Count(2));
        assert_eq!(from_numbers.precision, Precision::F32);
    }

    #[rstest]
    #[case(Devices::Auto, 0, vec![0])]
    #[case(Devices::Auto, 3, vec![0, 1, 2])]
    #[case(Devices::Count(2), 4, vec![0, 1])]
    #[case(Devices::List(vec![2, 0]), 4, vec![2, 0])]
    fn devices_select(#[case] d: Devices, #[case] available: usize, #[case] want: Vec<usize>) {
        assert_eq!(d.select(available).unwrap().indices, want);
    }

    #[test]
    fn selecting_more_devices_than_present_is_an_error() {
        let err = Devices::Count(4).select(2).unwrap_err().to_string();
        assert!(err.contains("at most 2"), "{err}");
        let err = Devices::List(vec![0, 5]).select(2).unwrap_err().to_string();
        assert!(err.contains("device 5 does not exist"), "{err}");
    }

    #[test]
    fn warmup_cosine_never_restarts() {
        let s = LrSchedule::WarmupCosine {
            warmup_steps: 5,
            min_lr_ratio: 0.0,
        };
        let lrs: Vec<f64> = (0..60).map(|i| s.lr_at(1.0, i, 50)).collect();
        // rises during warm-up, then never rises again, and stays at the floor past the end
        assert!(lrs[..5].windows(2).all(|w| w[1] > w[0]));
        assert!(lrs[5..].windows(2).all(|w| w[1] <= w[0] + 1e-15));
        assert!(lrs[49..].iter().all(|&l| l.abs() < 1e-12));
    }
}

//! `kiln bench`: training throughput of the tiny GPT, as JSON lines.
//!
//! For each backend and model configuration it measures, in one process:
//! - `hand`: a minimal hand-written Burn loop (batches built before timing,
//!   forward + loss + backward + AdamW step, as the PyTorch reference does);
//! - `coordinator`: the same number of steps through `TrainingCoordinator`
//!   (which builds its batches as it goes and keeps its books).
//!
//! - `ddp2`: the coordinator with `strategy ddp, devices 2` (two CPU worker threads,
//!   engine `auto`: the Learner engine's group where it is compiled in) at the same
//!   global batch, with the time rank 0 spent in the per-step exchange;
//!   `ddp2_native`: the same group on kiln's native loop.
//!
//! `overhead` = hand tokens/s over all steps ÷ coordinator tokens/s − 1, both
//! counted over the same steps (warm-up included), measured back to back.
//!
//! A kiln built with `cuda-nccl` has no CPU backend to measure: there `kiln bench`
//! says so (the measuring code is compiled all the same, unused).
#![cfg_attr(feature = "cuda-nccl", allow(dead_code, unused_imports))]

use std::time::Instant;

use anyhow::Result;
use burn::backend::Autodiff;
use burn::nn::loss::CrossEntropyLossConfig;
use burn::optim::{AdamWConfig, GradientsParams, Optimizer};
use burn::prelude::*;
use clap::Parser;
use kiln_backend_cpu::{CpuBackend, Flex, NdArray};
use kiln_coordinator::TrainingCoordinator;
use kiln_core::rng::SplitMix64;
use kiln_core::{Batch, DataModule, Inputs, ProgressMode, Split, Targets, TaskKind, TaskSpec};
use kiln_kernels::FusedAutodiffBackend;
use kiln_models::{TextDataModule, TinyGptConfig};

/// Measure training throughput of the tiny GPT.
#[derive(Debug, Clone, Parser)]
pub struct BenchArgs {
    /// Backends to measure: ndarray, flex or all.
    #[arg(long, default_value = "all")]
    backend: String,
    /// Model configurations: tiny (d 128, 2 layers, T 64), small (d 256, 4 layers, T 128) or all.
    #[arg(long, default_value = "tiny")]
    config: String,
    /// Untimed warm-up steps.
    #[arg(long, default_value_t = 5)]
    warmup: usize,
    /// Timed steps.
    #[arg(long, default_value_t = 30)]
    steps: usize,
    /// Rounds (each measures every backend and configuration once).
    #[arg(long, default_value_t = 1)]
    rounds: usize,
    /// Sequences per batch.
    #[arg(long, default_value_t = 32)]
    batch: usize,
    /// Also measure the experiment store (insert throughput, the training overhead of
    /// logging every step) and checkpoint files (save and load MB/s).
    #[arg(long)]
    store: bool,
    /// With `--store`: measure this store (a postgres:// URL, or a SQLite file)
    /// instead of a temporary SQLite file. Its runs are left in it, in experiment
    /// "bench".
    #[arg(long, value_name = "FILE|URL", requires = "store")]
    db: Option<kiln_experiment_db::StoreLocation>,
    /// Measure one worker only (the hand loop and the coordinator), without the
    /// two-worker runs: what `cargo xtask bench --paired` times against PyTorch.
    #[arg(long)]
    one_worker: bool,
}

const VOCAB: usize = 65;

#[cfg(feature = "cuda-nccl")]
pub fn run(_args: &BenchArgs) -> Result<()> {
    anyhow::bail!(
        "kiln bench measures the CPU backends, which this kiln lacks: it was built with \
         --features cuda-nccl (burn's distributed feature leaves NdArray and Flex without \
         autodiff); run it from a build without cuda-nccl"
    )
}

#[cfg(not(feature = "cuda-nccl"))]
pub fn run(args: &BenchArgs) -> Result<()> {
    let backends: Vec<CpuBackend> = match args.backend.as_str() {
        "all" => vec![CpuBackend::NdArray, CpuBackend::Flex],
        other => vec![other.parse()?],
    };
    let configs: Vec<(&str, TinyGptConfig)> = match args.config.as_str() {
        "tiny" => vec![("tiny", TinyGptConfig::tiny(VOCAB))],
        "small" => vec![("small", TinyGptConfig::small(VOCAB))],
        "all" => vec![
            ("tiny", TinyGptConfig::tiny(VOCAB)),
            ("small", TinyGptConfig::small(VOCAB)),
        ],
        other => anyhow::bail!("invalid config {other:?}: expected tiny, small or all"),
    };
    if args.steps == 0 || args.batch == 0 {
        anyhow::bail!("--steps and --batch must be at least 1");
    }
    for round in 1..=args.rounds {
        for (name, cfg) in &configs {
            for backend in &backends {
                let line = match backend {
                    CpuBackend::NdArray => measure::<Autodiff<NdArray>>(args, name, *cfg)?,
                    CpuBackend::Flex => measure::<Autodiff<Flex>>(args, name, *cfg)?,
                };
                let mut line = line;
                line["backend"] = backend.to_string().into();
                line["round"] = round.into();
                emit(&line);
            }
        }
        if args.store {
            emit(&store_insert_throughput(round, args.db.as_ref())?);
            emit(&logging_overhead(args, round)?);
            for line in checkpoint_speed(round)? {
                emit(&line);
            }
        }
    }
    Ok(())
}

/// Points per second written through `RunTracker::log_metrics` in batches of 100,
/// flushed to the store: `location`, or a temporary SQLite file.
fn store_insert_throughput(
    round: usize,
    location: Option<&kiln_experiment_db::StoreLocation>,
) -> Result<serde_json::Value> {
    use kiln_experiment_db::{ExperimentDb, MetricPoint, NewRun, RunTracker, StoreLocation};
    let dir = tempfile_dir()?.join(format!("store-{round}"));
    std::fs::create_dir_all(&dir)?;
    let location = location
        .cloned()
        .unwrap_or_else(|| StoreLocation::Sqlite(dir.join("bench.sqlite")));
    let mut db = ExperimentDb::open_location(&location)?;
    let started = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis());
    let run = db.start_run(&NewRun {
        experiment: "bench".into(),
        name: format!("insert-{round}-{}-{started}", std::process::id()),
        config: serde_json::json!({}),
        params: vec![],
        kiln_version: env!("CARGO_PKG_VERSION").into(),
        git_commit: None,
        host: "bench".into(),
    })?;
    let (batches, per_batch) = (1_000u64, 100u64);
    let start = Instant::now();
    for b in 0..batches {
        let points: Vec<MetricPoint> = (0..per_batch)
            .map(|i| MetricPoint {
                key: format!("m{}", i % 4),
                split: "train".into(),
                step: b * per_batch + i,
                epoch: 0,
                value: (b * per_batch + i) as f64 * 1e-3,
                wall_time: 1.0,
            })
            .collect();
        db.log_metrics(run, &points)?;
    }
    db.flush()?;
    let seconds = start.elapsed().as_secs_f64();
    drop(db);
    let _ = std::fs::remove_dir_all(&dir);
    let measure = if location.is_postgres() {
        "insert_points_per_s_postgres"
    } else {
        "insert_points_per_s"
    };
    Ok(serde_json::json!({
        "kind": "store", "measure": measure, "round": round,
        "value": (batches * per_batch) as f64 / seconds, "batch": per_batch,
    }))
}

/// Save and load speed of a checkpoint of the small GPT (3.2 M parameters: the model
/// and its AdamW state, about 39 MB), the way training writes and resume reads it.
#[cfg(not(feature = "cuda-nccl"))]
fn checkpoint_speed(round: usize) -> Result<Vec<serde_json::Value>> {
    type B = Autodiff<Flex>;
    let dir = tempfile_dir()?.join(format!("checkpoint-{round}"));
    std::fs::create_dir_all(&dir)?;
    let model = TinyGptConfig::small(VOCAB).init::<B>(1, &Default::default())?;
    let t = kiln_coordinator::bench::checkpoint_roundtrip::<B, _>(model, &dir)?;
    let _ = std::fs::remove_dir_all(&dir);
    let mb = t.bytes as f64 / 1e6;
    Ok(vec![
        serde_json::json!({
            "kind": "store", "measure": "checkpoint_save_mb_per_s", "round": round,
            "value": mb / t.save_s, "megabytes": mb,
        }),
        serde_json::json!({
            "kind": "store", "measure": "checkpoint_load_mb_per_s", "round": round,
            "value": mb / t.load_s, "megabytes": mb,
        }),
    ])
}

/// Tokens/s of the tiny GPT through the coordinator with the store at
/// `log_every_n_steps = 1` against no store, measured alternately (without, with,
/// with, without) in one process.
#[cfg(not(feature = "cuda-nccl"))]
fn logging_overhead(args: &BenchArgs, round: usize) -> Result<serde_json::Value> {
    use kiln_experiment_db::ExperimentDb;
    type B = Autodiff<Flex>;
    let cfg = TinyGptConfig::tiny(VOCAB);
    let data = TextDataModule::random(VOCAB, 1_000_000, cfg.seq_len, 1337)?;
    let task = TaskSpec::new(
        "bench",
        TaskKind::Lm {
            vocab_size: VOCAB,
            seq_len: cfg.seq_len,
        },
    );
    let dir = tempfile_dir()?.join(format!("overhead-{round}"));
    std::fs::create_dir_all(&dir)?;
    let steps = (args.warmup + args.steps) as u64;
    let measure = |with_store: bool| -> Result<f64> {
        let coordinator = TrainingCoordinator::builder()
            .batch_size(args.batch)
            .max_steps(steps)
            .limit_val_batches(1)
            .log_every_n_steps(1)
            .enable_checkpointing(false)
            .progress(ProgressMode::Off)
            .default_root_dir(&dir)
            .build()?;
        let model = cfg.init::<B>(1337, &Default::default())?;
        let report = if with_store {
            let mut db = ExperimentDb::open(dir.join("bench.sqlite"))?;
            coordinator
                .train::<B, _, _>(model, &data, &task, Some(&mut db), 1)?
                .report
        } else {
            coordinator
                .train::<B, _, _>(model, &data, &task, None, 1)?
                .report
        };
        Ok(report.throughput.items_per_s)
    };
    // Alternate the two so that drift in the machine's load hits both alike.
    let mut without = 0.0;
    let mut with = 0.0;
    for with_store in [false, true, true, false] {
        let tokens_per_s = measure(with_store)?;
        if with_store {
            with += tokens_per_s / 2.0
        } else {
            without += tokens_per_s / 2.0
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(serde_json::json!({
        "kind": "store", "measure": "logging_overhead_every_step", "round": round,
        "value": without / with - 1.0, "tokens_per_s_without_store": without, "tokens_per_s_with_store": with,
    }))
}

#[allow(clippy::print_stdout)] // JSON lines on stdout are this command's output
fn emit(line: &serde_json::Value) {
    println!("{line}");
}

fn measure<B: FusedAutodiffBackend>(
    args: &BenchArgs,
    name: &str,
    cfg: TinyGptConfig,
) -> Result<serde_json::Value> {
    let seed = 1337;
    let data = TextDataModule::random(VOCAB, 1_000_000, cfg.seq_len, seed)?;
    let total = args.warmup + args.steps;
    let tokens_per_step = (args.batch * cfg.seq_len) as f64;

    let hand = hand_loop::<B>(args, cfg, &data, seed)?;

    let dir = tempfile_dir()?;
    let task = TaskSpec::new(
        "bench",
        TaskKind::Lm {
            vocab_size: VOCAB,
            seq_len: cfg.seq_len,
        },
    );
    // `steps` steps through the coordinator with `workers` CPU workers of
    // `batch / workers` examples each (the same global batch).
    let run_steps = |strategy: &str,
                     engine: &str,
                     workers: usize,
                     steps: usize|
     -> Result<kiln_core::TrainReport> {
        let report = TrainingCoordinator::builder()
            .strategy(strategy)
            .engine(engine)
            .devices(workers.to_string())
            .batch_size(args.batch / workers)
            .max_steps(steps as u64)
            .limit_val_batches(1)
            .log_every_n_steps(1_000_000)
            .enable_checkpointing(false)
            .progress(ProgressMode::Off)
            .default_root_dir(&dir)
            .seed(seed)
            .build()?
            .train::<B, _, _>(
                cfg.init::<B>(seed, &Default::default())?,
                &data,
                &task,
                None,
                1,
            )?
            .report;
        Ok(report)
    };
    let run =
        |strategy: &str, engine: &str, workers: usize| run_steps(strategy, engine, workers, total);
    let report = run("auto", "auto", 1)?;
    let coordinator_tps = report.throughput.items_per_s;
    // The timed steps alone, as the hand loop and PyTorch's reference time them: the
    // training seconds of all steps less those of a run of the warm-up steps alone
    // (same seed, same data, same start-up).
    let training_seconds = |r: &kiln_core::TrainReport| {
        r.throughput.samples_per_s.recip() * (r.optimizer_steps as f64 * args.batch as f64)
    };
    let coordinator_timed_tps = match args.warmup {
        0 => coordinator_tps,
        warmup => {
            let warm = run_steps("auto", "auto", 1, warmup)?;
            tokens_per_step * args.steps as f64
                / (training_seconds(&report) - training_seconds(&warm)).max(1e-9)
        }
    };
    // The same global batch on two CPU workers (ddp): what a second core buys. Only
    // for an even batch, which splits exactly.
    // The default engine's group, then the native loop's: the two engines' cost.
    let (ddp, ddp_native) = match (args.one_worker, args.batch % 2) {
        (false, 0) => (Some(run("ddp", "auto", 2)?), Some(run("ddp", "native", 2)?)),
        _ => (None, None),
    };
    let _ = std::fs::remove_dir_all(&dir);
    let ddp_tps = ddp.as_ref().map(|r| r.throughput.items_per_s);
    let ddp_native_tps = ddp_native.as_ref().map(|r| r.throughput.items_per_s);

    Ok(serde_json::json!({
        "config": name,
        "params": cfg.num_params(),
        "batch": args.batch,
        "seq_len": cfg.seq_len,
        "warmup": args.warmup,
        "steps": args.steps,
        "hand_tokens_per_s": hand.timed_tokens_per_s,
        "hand_ms_per_step": 1000.0 * tokens_per_step / hand.timed_tokens_per_s,
        "hand_all_steps_tokens_per_s": hand.all_tokens_per_s,
        "coordinator_tokens_per_s": coordinator_tps,
        "coordinator_timed_tokens_per_s": coordinator_timed_tps,
        "overhead": hand.all_tokens_per_s / coordinator_tps - 1.0,
        "hand_final_loss": hand.final_loss,
        "coordinator_final_loss": report.step_losses.last(),
        "ddp2_engine": ddp.as_ref().map(|r| r.plan.engine.to_string()),
        "ddp2_tokens_per_s": ddp_tps,
        "ddp2_native_tokens_per_s": ddp_native_tps,
        "ddp2_speedup": ddp_tps.map(|t| t / coordinator_tps),
        "ddp2_exchange_ms_per_step": ddp
            .as_ref()
            .map(|r| 1000.0 * r.collective_s / r.optimizer_steps.max(1) as f64),
        "grad_bytes": cfg.num_params() * 4,
        "threads": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
    }))
}

struct HandResult {
    timed_tokens_per_s: f64,
    all_tokens_per_s: f64,
    final_loss: f64,
}

/// The minimal loop a Burn user would write by hand, as in `shared/bench/`.
fn hand_loop<B: FusedAutodiffBackend>(
    args: &BenchArgs,
    cfg: TinyGptConfig,
    data: &TextDataModule,
    seed: u64,
) -> Result<HandResult> {
    let device = B::Device::default();
    let mut model = cfg.init::<B>(seed, &device)?;
    let mut optim = AdamWConfig::new()
        .with_beta_2(0.95)
        .with_epsilon(1e-8)
        .with_weight_decay(0.1)
        .init::<B, kiln_models::TinyGpt<B>>();
    let ce = CrossEntropyLossConfig::new().init(&device);
    let total = args.warmup + args.steps;
    let mut rng = SplitMix64::new(seed);
    let n = data.len(Split::Train) as u64;
    let mut batches = Vec::with_capacity(total);
    for _ in 0..total {
        let idx: Vec<usize> = (0..args.batch).map(|_| rng.below(n) as usize).collect();
        let Batch { inputs, targets } = data.batch::<B>(Split::Train, &idx, &device)?;
        match (inputs, targets) {
            (Inputs::Tokens(x), Targets::Tokens(y)) => batches.push((x, y)),
            _ => anyhow::bail!("text data gave non-token batches"),
        }
    }
    let tokens_per_step = (args.batch * cfg.seq_len) as f64;
    let mut final_loss = f64::NAN;
    let start = Instant::now();
    let mut timed_start = start;
    for (i, (x, y)) in batches.into_iter().enumerate() {
        if i == args.warmup {
            timed_start = Instant::now();
        }
        let logits = model.logits(x)?;
        let [b, t, v] = logits.dims();
        let loss = ce.forward(logits.reshape([b * t, v]), y.reshape([b * t]));
        final_loss = loss.clone().into_scalar().elem::<f64>();
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        model = optim.step(3e-4, model, grads);
    }
    let timed = timed_start.elapsed().as_secs_f64();
    let all = start.elapsed().as_secs_f64();
    Ok(HandResult {
        timed_tokens_per_s: tokens_per_step * args.steps as f64 / timed,
        all_tokens_per_s: tokens_per_step * total as f64 / all,
        final_loss,
    })
}

fn tempfile_dir() -> Result<std::path::PathBuf> {
    let dir = std::env::temp_dir().join(format!("kiln-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

//! kiln's developer tasks. Runs cargo and the built binaries; links no kiln crate.
//!
//! - `cargo xtask train [ARGS...]`: builds the release `kiln` binary and runs
//!   `kiln train ARGS...` (training in a debug build is never what you want).
//! - `cargo xtask bench [--rounds N] [--config tiny|small|all] [--compare-pytorch]
//!   [--paired N] [--no-write]`: builds the release binary, runs `kiln bench` for N rounds,
//!   interleaved with the PyTorch reference of `../shared/bench/` when asked and
//!   torch is installed, prints JSON lines and medians, and rewrites the generated
//!   section of `docs/benchmarks.md`. With `--paired N` it instead runs N pairs per
//!   configuration of one worker against PyTorch, back to back in alternating order,
//!   and writes the medians of the pairs' ratios to their own section.
//! - `cargo xtask launch [--nodes N] [--master-port P] -- [TRAIN ARGS...]`: builds
//!   the release binary and runs `kiln launch`: a multi-node run on this machine,
//!   one `kiln train` process per node on the loopback interface.
//! - `cargo xtask ui [ARGS...]`: builds the release binary and runs `kiln ui ARGS...`,
//!   the web dashboard over the experiment store (http://127.0.0.1:8080).
//! - `cargo xtask gpu-check [ARGS...]`: builds the release binary with the `cuda`
//!   feature and runs `kiln gpu-check ARGS...` (200 steps of the tiny GPT and of a
//!   d 768 / 12-layer / T 256 GPT in 32-true and bf16-mixed on the first GPU; JSON
//!   lines with tokens/s, peak memory and final loss). Without a GPU it says so.

#![allow(clippy::print_stdout)] // printing results is what xtask is for

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};

use serde_json::Value;

type Result<T> = std::result::Result<T, String>;

#[cfg(test)]
mod tidy;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some(command @ ("train" | "runs" | "launch" | "ui")) => run_kiln(command, &args[1..], &[]),
        Some("gpu-check") => run_kiln("gpu-check", &args[1..], &["cuda"]),
        Some("bench") if args.get(1).map(String::as_str) == Some("--summarise") => {
            resummarise(args.get(2).map_or("", String::as_str))
        }
        Some("bench") => bench(&args[1..]),
        _ => Err(
            "usage: cargo xtask train [ARGS...] | cargo xtask launch [--nodes N] \
                  [--master-port P] -- [TRAIN ARGS...] | cargo xtask bench [--rounds N] \
                  [--config tiny|small|all] [--compare-pytorch] [--paired N] [--no-write] | cargo xtask \
                  gpu-check [ARGS...] | cargo xtask ui [--db FILE|URL] [--port P]"
                .into(),
        ),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e}");
            ExitCode::FAILURE
        }
    }
}

fn root() -> PathBuf {
    // Read at run time first: cargo may reuse a binary built in another checkout.
    std::path::PathBuf::from(
        std::env::var_os("CARGO_MANIFEST_DIR").unwrap_or_else(|| env!("CARGO_MANIFEST_DIR").into()),
    )
    .parent()
    .map(Path::to_path_buf)
    .unwrap_or_default()
}

fn cargo() -> Command {
    Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
}

/// Builds the release `kiln` binary with `features` and returns its path.
fn build_release(features: &[&str]) -> Result<PathBuf> {
    let mut args = vec!["build", "--release", "--quiet", "-p", "kiln-cli"];
    let list = features.join(",");
    if !features.is_empty() {
        args.extend(["--features", &list]);
    }
    let command = format!("cargo {}", args.join(" "));
    eprintln!("xtask: building the release kiln binary ({command})");
    let status = cargo()
        .current_dir(root())
        .args(&args)
        .status()
        .map_err(|e| format!("cannot run cargo: {e}"))?;
    if !status.success() {
        return Err(format!("{command} failed"));
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("target"));
    Ok(target
        .join("release")
        .join(format!("kiln{}", std::env::consts::EXE_SUFFIX)))
}

/// `cargo xtask train|runs|launch|ui|gpu-check ARGS...` = `kiln train|runs|... ARGS...`
/// with the release binary built with `features`.
fn run_kiln(command: &str, args: &[String], features: &[&str]) -> Result<()> {
    let kiln = build_release(features)?;
    let status = Command::new(&kiln)
        .arg(command)
        .args(args)
        .status()
        .map_err(|e| format!("cannot run {}: {e}", kiln.display()))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("kiln {command} exited with {status}"))
    }
}

struct BenchOptions {
    rounds: usize,
    config: String,
    compare_pytorch: bool,
    store: bool,
    write: bool,
    /// `--paired N`: N back-to-back pairs of one worker and PyTorch per configuration.
    paired: Option<usize>,
}

fn parse_bench(args: &[String]) -> Result<BenchOptions> {
    let mut o = BenchOptions {
        rounds: 3,
        config: "all".into(),
        compare_pytorch: false,
        store: false,
        write: true,
        paired: None,
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--rounds" => {
                let v = it.next().ok_or("--rounds needs a value")?;
                o.rounds = v
                    .parse()
                    .ok()
                    .filter(|&n| n >= 1)
                    .ok_or(format!("invalid --rounds {v:?}: expected an integer >= 1"))?;
            }
            "--config" => {
                let v = it.next().ok_or("--config needs a value")?;
                if !["tiny", "small", "all"].contains(&v.as_str()) {
                    return Err(format!(
                        "invalid --config {v:?}: expected tiny, small or all"
                    ));
                }
                o.config = v.clone();
            }
            "--paired" => {
                let v = it.next().ok_or("--paired needs a value")?;
                o.paired = Some(
                    v.parse()
                        .ok()
                        .filter(|&n| n >= 1)
                        .ok_or(format!("invalid --paired {v:?}: expected an integer >= 1"))?,
                );
            }
            "--compare-pytorch" => o.compare_pytorch = true,
            "--store" => o.store = true,
            "--no-write" => o.write = false,
            other => return Err(format!("unknown bench flag {other:?}")),
        }
    }
    Ok(o)
}

fn bench(args: &[String]) -> Result<()> {
    let opts = parse_bench(args)?;
    let kiln = build_release(&[])?;
    let torch_script = root().join("../shared/bench/torch_tinygpt.py");
    if let Some(pairs) = opts.paired {
        return paired(&opts, pairs, &kiln, &torch_script, args);
    }
    let torch = opts.compare_pytorch && torch_available(&torch_script);
    let mut kiln_lines: Vec<Value> = Vec::new();
    let mut torch_lines: Vec<Value> = Vec::new();
    for round in 1..=opts.rounds {
        eprintln!("xtask: round {round}/{}", opts.rounds);
        let mut bench_args = vec!["--config", opts.config.as_str()];
        if opts.store {
            bench_args.push("--store");
        }
        for mut v in kiln_bench(&kiln, &bench_args)? {
            v["round"] = round.into();
            println!("{v}");
            kiln_lines.push(v);
        }
        if opts.config != "small" {
            // A failed two-node round is recorded, not fatal (docs/multi-node.md:
            // burn-collective 0.21 can stall an exchange; kiln's timeout ends it).
            let mut v = nodes_round(&kiln).unwrap_or_else(|e| {
                eprintln!("xtask: the two-node round failed: {e}");
                serde_json::json!({ "kind": "nodes", "config": "tiny", "failed": e })
            });
            v["round"] = round.into();
            println!("{v}");
            kiln_lines.push(v);
        }
        if torch {
            // One process with 2 threads, and DDP over 2 processes of 1 thread each
            // (gloo on loopback) at the same global batch.
            for (config, ddp) in configs(&opts.config).iter().flat_map(|c| [(c, 1), (c, 2)]) {
                let mut v = torch_reference(&torch_script, config, ddp)?;
                v["round"] = round.into();
                println!("{v}");
                torch_lines.push(v);
            }
        }
    }
    let cmd = format!("cargo xtask bench {}", args.join(" "));
    summarise_and_write(
        kiln_lines,
        &torch_lines,
        opts.write.then_some(cmd.trim_end()),
    )
}

/// The model configurations `--config` names.
fn configs(config: &str) -> &'static [&'static str] {
    match config {
        "tiny" => &["tiny"],
        "small" => &["small"],
        _ => &["tiny", "small"],
    }
}

/// Whether the PyTorch reference can run here; says why not when it cannot.
fn torch_available(script: &Path) -> bool {
    let ok = script.exists()
        && Command::new("python3")
            .args(["-c", "import torch"])
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
    if !ok {
        eprintln!(
            "xtask: PyTorch reference skipped: needs {} and `pip install torch`",
            script.display()
        );
    }
    ok
}

/// The JSON lines of one `kiln bench --rounds 1 ARGS...`.
fn kiln_bench(kiln: &Path, args: &[&str]) -> Result<Vec<Value>> {
    let out = Command::new(kiln)
        .args(["bench", "--rounds", "1"])
        .args(args)
        .stderr(Stdio::inherit())
        .output()
        .map_err(|e| format!("cannot run kiln bench: {e}"))?;
    if !out.status.success() {
        return Err(format!("kiln bench exited with {}", out.status));
    }
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|line| serde_json::from_str(line).map_err(|e| format!("bad bench line {line:?}: {e}")))
        .collect()
}

/// One run of the PyTorch reference (5 warm-up + 30 timed steps): 2 threads in one
/// process (`ddp` 1) or `--ddp 2` (two processes of one thread, gloo). A failed run
/// (gloo has aborted a `--ddp 2` run here) is recorded as such, not fatal: the
/// sitting goes on and its medians use the others.
fn torch_reference(script: &Path, config: &str, ddp: u64) -> Result<Value> {
    let mut cmd = Command::new("python3");
    cmd.arg(script).args(["--warmup", "5", "--steps", "30"]);
    match ddp {
        1 => cmd.args(["--threads", "2"]),
        _ => cmd.args(["--ddp", "2"]),
    };
    if config == "small" {
        cmd.args(["--d-model", "256", "--layers", "4", "--seq", "128"]);
    }
    let out = cmd
        .output()
        .map_err(|e| format!("cannot run python3: {e}"))?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let last = stderr.lines().last().unwrap_or_default().to_string();
        eprintln!("xtask: the PyTorch reference failed: {last}");
        return Ok(serde_json::json!({
            "backend": "pytorch", "config": config, "ddp": ddp, "failed": last,
        }));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().last().unwrap_or_default();
    let mut v: Value =
        serde_json::from_str(line).map_err(|e| format!("bad PyTorch line {line:?}: {e}"))?;
    v["config"] = config.into();
    v["backend"] = "pytorch".into();
    v["ddp"] = ddp.into();
    Ok(v)
}

/// `cargo xtask bench --paired N`: one worker on Flex against PyTorch's one process
/// of 2 threads, in N pairs per configuration, the two runs of a pair back to back
/// and their order alternating, so that both meet the same load on a shared machine.
/// The verdict is the median of the pairs' ratios.
fn paired(
    opts: &BenchOptions,
    pairs: usize,
    kiln: &Path,
    torch_script: &Path,
    args: &[String],
) -> Result<()> {
    if !torch_available(torch_script) {
        return Err("--paired compares with PyTorch, which cannot run here".into());
    }
    let mut lines = Vec::new();
    for pair in 1..=pairs {
        for &config in configs(&opts.config) {
            eprintln!("xtask: pair {pair}/{pairs}, {config}");
            let kiln_first = pair % 2 == 1;
            let run_kiln = || -> Result<Value> {
                let args = ["--backend", "flex", "--config", config, "--one-worker"];
                kiln_bench(kiln, &args)?
                    .pop()
                    .ok_or_else(|| "kiln bench printed no line".to_string())
            };
            let (k, t) = if kiln_first {
                let k = run_kiln()?;
                (k, torch_reference(torch_script, config, 1)?)
            } else {
                let t = torch_reference(torch_script, config, 1)?;
                (run_kiln()?, t)
            };
            let torch_tps = field(&t, "tokens_per_s");
            let ratio = |key: &str| field(&k, key).zip(torch_tps).map(|(a, b)| a / b);
            let v = serde_json::json!({
                "kind": "pair", "config": config, "pair": pair, "kiln_first": kiln_first,
                "hand_tokens_per_s": field(&k, "hand_tokens_per_s"),
                "coordinator_timed_tokens_per_s": field(&k, "coordinator_timed_tokens_per_s"),
                "pytorch_tokens_per_s": torch_tps,
                "pytorch_failed": t.get("failed"),
                "ratio_hand_to_pytorch": ratio("hand_tokens_per_s"),
                "ratio_timed_to_pytorch": ratio("coordinator_timed_tokens_per_s"),
            });
            println!("{v}");
            lines.push(v);
        }
    }
    let summary = summarise_pairs(&lines);
    for s in &summary {
        println!("{s}");
    }
    if opts.write {
        let cmd = format!("cargo xtask bench {}", args.join(" "));
        write_pairs_md(cmd.trim_end(), &summary)?;
    }
    Ok(())
}

/// Per configuration: the median, lowest and highest of the pairs' ratios.
fn summarise_pairs(lines: &[Value]) -> Vec<Value> {
    let mut out = Vec::new();
    for config in ["tiny", "small"] {
        let rows: Vec<&Value> = lines.iter().filter(|v| v["config"] == config).collect();
        if rows.is_empty() {
            continue;
        }
        let stats = |key: &str| {
            let v: Vec<f64> = rows.iter().filter_map(|r| field(r, key)).collect();
            let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
            let hi = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let at_least_one = v.iter().filter(|&&x| x >= 1.0).count();
            serde_json::json!({
                "pairs": v.len(), "median": median(v), "min": lo, "max": hi,
                "pairs_at_least_1": at_least_one,
            })
        };
        out.push(serde_json::json!({
            "summary": true, "kind": "paired", "config": config,
            "hand_to_pytorch": stats("ratio_hand_to_pytorch"),
            "timed_to_pytorch": stats("ratio_timed_to_pytorch"),
            "median_pytorch_tokens_per_s":
                median(rows.iter().filter_map(|r| field(r, "pytorch_tokens_per_s")).collect()),
        }));
    }
    out
}

/// `cargo xtask bench --summarise FILE`: the summary and `docs/benchmarks.md` of the
/// JSON lines a bench printed (kept when a later round failed).
fn resummarise(file: &str) -> Result<()> {
    let text = std::fs::read_to_string(file).map_err(|e| format!("cannot read {file}: {e}"))?;
    let lines: Vec<Value> = text
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["summary"] != true)
        .collect();
    let (torch, kiln): (Vec<Value>, Vec<Value>) =
        lines.into_iter().partition(|v| v["backend"] == "pytorch");
    let cmd = format!("cargo xtask bench --summarise {file}");
    summarise_and_write(kiln, &torch, Some(&cmd))
}

fn summarise_and_write(
    kiln_lines: Vec<Value>,
    torch_lines: &[Value],
    write: Option<&str>,
) -> Result<()> {
    let (store_lines, kiln_lines): (Vec<Value>, Vec<Value>) =
        kiln_lines.into_iter().partition(|v| v["kind"] == "store");
    let (node_lines, kiln_lines): (Vec<Value>, Vec<Value>) =
        kiln_lines.into_iter().partition(|v| v["kind"] == "nodes");
    let mut summary = summarise(&kiln_lines, torch_lines);
    summary.extend(summarise_nodes(&node_lines, &kiln_lines, torch_lines));
    summary.extend(summarise_store(&store_lines));
    for s in &summary {
        println!("{s}");
    }
    if let Some(cmd) = write {
        write_benchmarks_md(cmd, &summary)?;
    }
    Ok(())
}

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn field(v: &Value, k: &str) -> Option<f64> {
    v.get(k).and_then(Value::as_f64)
}

/// Medians per (config, backend), with ratios to PyTorch measured in the same sitting.
fn summarise(kiln: &[Value], torch: &[Value]) -> Vec<Value> {
    let mut keys: Vec<(String, String)> = kiln
        .iter()
        .map(|v| {
            (
                v["config"].as_str().unwrap_or("").into(),
                v["backend"].as_str().unwrap_or("").into(),
            )
        })
        .collect();
    keys.dedup();
    keys.sort();
    keys.dedup();
    let mut out = Vec::new();
    for (config, backend) in keys {
        let rows: Vec<&Value> = kiln
            .iter()
            .filter(|v| v["config"] == config.as_str() && v["backend"] == backend.as_str())
            .collect();
        let med = |k: &str| median(rows.iter().filter_map(|v| field(v, k)).collect());
        let torch_med = |ddp: u64| {
            median(
                torch
                    .iter()
                    .filter(|v| v["config"] == config.as_str() && v["ddp"] == ddp)
                    .filter_map(|v| field(v, "tokens_per_s"))
                    .collect(),
            )
        };
        let (torch_tps, torch_ddp) = (torch_med(1), torch_med(2));
        let finite = |x: f64| {
            if x.is_finite() {
                Value::from(x)
            } else {
                Value::Null
            }
        };
        let hand = med("hand_tokens_per_s");
        let coord = med("coordinator_tokens_per_s");
        let timed = med("coordinator_timed_tokens_per_s");
        let ddp = med("ddp2_tokens_per_s");
        out.push(serde_json::json!({
            "summary": true,
            "config": config,
            "backend": backend,
            "rounds": rows.len(),
            "hand_tokens_per_s": hand,
            "coordinator_tokens_per_s": coord,
            "coordinator_timed_tokens_per_s": finite(timed),
            "overhead": med("overhead"),
            "ddp2_tokens_per_s": finite(ddp),
            "ddp2_native_tokens_per_s": finite(med("ddp2_native_tokens_per_s")),
            "ratio_ddp2_to_one_worker": finite(ddp / coord),
            "ddp2_exchange_ms_per_step": finite(med("ddp2_exchange_ms_per_step")),
            "grad_mb": finite(med("grad_bytes") / 1e6),
            "pytorch_tokens_per_s": finite(torch_tps),
            "pytorch_ddp2_tokens_per_s": finite(torch_ddp),
            "ratio_hand_to_pytorch": finite(hand / torch_tps),
            "ratio_coordinator_to_pytorch": finite(coord / torch_tps),
            "ratio_timed_to_pytorch": finite(timed / torch_tps),
            "ratio_ddp2_to_pytorch_ddp2": finite(ddp / torch_ddp),
            "ratio_best_to_pytorch": finite(coord.max(ddp) / torch_tps.max(torch_ddp)),
        }));
    }
    out
}

/// Steps of the tiny GPT timed by the multi-node measurement.
const NODE_STEPS: &str = "60";

/// One round of the multi-node measurement on the tiny GPT (global batch 32):
/// `kiln launch --nodes 2` (two processes of one worker, exchanging through
/// burn-collective's orchestrator on loopback) against one process with two workers
/// (`--strategy ddp --devices 2`), both through `kiln train`.
fn nodes_round(kiln: &Path) -> Result<Value> {
    let dir = std::env::temp_dir().join(format!("kiln-xtask-nodes-{}", std::process::id()));
    let out_dir = dir.to_string_lossy().to_string();
    let train = [
        "--max-steps",
        NODE_STEPS,
        "--batch-size",
        "16",
        "--limit-val-batches",
        "1",
        "--json",
        "--no-db",
        "--no-checkpointing",
        "--progress",
        "off",
        "--output-dir",
        &out_dir,
    ];
    let report = |args: &[&str], prefix: &str| -> Result<Value> {
        let out = Command::new(kiln)
            .args(args)
            .args(train)
            .stderr(Stdio::inherit())
            .output()
            .map_err(|e| format!("cannot run kiln: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "kiln {} exited with {}",
                args.join(" "),
                out.status
            ));
        }
        let text = String::from_utf8_lossy(&out.stdout);
        let json: Vec<&str> = text
            .lines()
            .filter_map(|l| l.strip_prefix(prefix))
            .skip_while(|l| *l != "{")
            .collect();
        serde_json::from_str(&json.join("\n")).map_err(|e| format!("no report from kiln: {e}"))
    };
    // `kiln launch` picks a free range of ports for the nodes.
    let nodes = report(&["launch", "--nodes", "2", "--"], "[node 0] ")?;
    let group = report(&["train", "--strategy", "ddp", "--devices", "2"], "")?;
    let _ = std::fs::remove_dir_all(&dir);
    let per_step = |r: &Value, k: &str| {
        let steps = field(r, "optimizer_steps").unwrap_or(f64::NAN);
        // Two exchanges besides the steps' own: the start and the end.
        field(r, k).map(|s| s * 1e3 / (steps + 2.0))
    };
    Ok(serde_json::json!({
        "kind": "nodes",
        "config": "tiny",
        "nodes2_tokens_per_s": r_tps(&nodes),
        "ddp2_tokens_per_s": r_tps(&group),
        "nodes2_exchange_ms_per_step": per_step(&nodes, "collective_s"),
        "ddp2_exchange_ms_per_step": per_step(&group, "collective_s"),
    }))
}

fn r_tps(report: &Value) -> Option<f64> {
    report["throughput"]["items_per_s"].as_f64()
}

/// Medians of the multi-node rounds, with the gradient size of `kiln bench` and
/// PyTorch's `--ddp 2` of the same sitting.
fn summarise_nodes(lines: &[Value], kiln: &[Value], torch: &[Value]) -> Vec<Value> {
    if lines.is_empty() {
        return Vec::new();
    }
    let failed = lines.iter().filter(|v| v.get("failed").is_some()).count();
    let med = |rows: &[Value], k: &str| median(rows.iter().filter_map(|v| field(v, k)).collect());
    let tiny: Vec<Value> = kiln
        .iter()
        .filter(|v| v["config"] == "tiny")
        .cloned()
        .collect();
    let torch_ddp: Vec<Value> = torch
        .iter()
        .filter(|v| v["config"] == "tiny" && v["ddp"] == 2)
        .cloned()
        .collect();
    let (nodes, group) = (
        med(lines, "nodes2_tokens_per_s"),
        med(lines, "ddp2_tokens_per_s"),
    );
    let torch_ddp = med(&torch_ddp, "tokens_per_s");
    let finite = |x: f64| {
        if x.is_finite() {
            Value::from(x)
        } else {
            Value::Null
        }
    };
    vec![serde_json::json!({
        "summary": true,
        "kind": "nodes",
        "config": "tiny",
        "rounds": lines.len() - failed,
        "failed_rounds": failed,
        "nodes2_tokens_per_s": nodes,
        "ddp2_tokens_per_s": group,
        "ratio_nodes2_to_ddp2": nodes / group,
        "nodes2_exchange_ms_per_step": med(lines, "nodes2_exchange_ms_per_step"),
        "ddp2_exchange_ms_per_step": med(lines, "ddp2_exchange_ms_per_step"),
        "grad_mb": finite(med(&tiny, "grad_bytes") / 1e6),
        "pytorch_ddp2_tokens_per_s": finite(torch_ddp),
        "ratio_nodes2_to_pytorch_ddp2": finite(nodes / torch_ddp),
    })]
}

/// Medians of the store measurements, by measure.
fn summarise_store(lines: &[Value]) -> Vec<Value> {
    let mut measures: Vec<String> = lines
        .iter()
        .filter_map(|v| v["measure"].as_str().map(String::from))
        .collect();
    measures.sort();
    measures.dedup();
    measures
        .into_iter()
        .map(|m| {
            let values: Vec<f64> =
                lines.iter().filter(|v| v["measure"] == m.as_str()).filter_map(|v| field(v, "value")).collect();
            serde_json::json!({ "summary": true, "kind": "store", "measure": m, "rounds": values.len(), "median": median(values) })
        })
        .collect()
}

const START: &str = "<!-- xtask-bench:start -->";
const END: &str = "<!-- xtask-bench:end -->";

const PAIRED_START: &str = "<!-- xtask-paired:start -->";
const PAIRED_END: &str = "<!-- xtask-paired:end -->";

/// Replaces what lies between `start` and `end` in `docs/benchmarks.md` (a missing
/// section is added at the end) with `body`, which begins with `start`.
fn replace_section(start: &str, end: &str, body: &str) -> Result<()> {
    let path = root().join("docs/benchmarks.md");
    let mut old = std::fs::read_to_string(&path).unwrap_or_else(|_| "# Benchmarks\n".into());
    if old.find(start).is_none() && old.find(end).is_none() {
        old.push_str(&format!("\n{start}\n{end}\n"));
    }
    let (Some(s), Some(e)) = (old.find(start), old.find(end)) else {
        return Err(format!(
            "{} lacks one of the markers {start} / {end}",
            path.display()
        ));
    };
    let new = format!("{}{}{}", &old[..s], body, &old[e..]);
    std::fs::write(&path, new).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    eprintln!("xtask: wrote {}", path.display());
    Ok(())
}

/// The paired sitting's table in `docs/benchmarks.md`.
fn write_pairs_md(command: &str, summary: &[Value]) -> Result<()> {
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let mut table = format!(
        "{PAIRED_START}\nGenerated by `{command}` ({threads} hardware threads): one worker on \
         Flex against PyTorch eager (one process, 2 threads), each pair's two runs back to \
         back, their order alternating.\n\n\
         | config | pairs | PyTorch tokens/s (median) | coordinator timed / PyTorch: median | lowest | highest | pairs ≥ 1.0 | hand loop / PyTorch: median | lowest | highest |\n\
         | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n"
    );
    for v in summary {
        let (t, h) = (&v["timed_to_pytorch"], &v["hand_to_pytorch"]);
        let r = |x: &Value, k: &str| field(x, k).map_or("—".into(), |x| format!("{x:.3}"));
        table.push_str(&format!(
            "| {} | {} | {:.0} | {} | {} | {} | {} | {} | {} | {} |\n",
            v["config"].as_str().unwrap_or(""),
            t["pairs"],
            field(v, "median_pytorch_tokens_per_s").unwrap_or(f64::NAN),
            r(t, "median"),
            r(t, "min"),
            r(t, "max"),
            t["pairs_at_least_1"],
            r(h, "median"),
            r(h, "min"),
            r(h, "max"),
        ));
    }
    replace_section(PAIRED_START, PAIRED_END, &table)
}

fn write_benchmarks_md(command: &str, summary: &[Value]) -> Result<()> {
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let fmt = |v: &Value, k: &str| match field(v, k) {
        Some(x) if k.starts_with("ratio") || k == "overhead" => format!("{x:.3}"),
        Some(x) => format!("{x:.0}"),
        None => "—".into(),
    };
    let mut table = format!(
        "{START}\nGenerated by `{command}` ({threads} hardware threads), medians over rounds.\n\n\
         | config | backend | rounds | hand loop tokens/s | coordinator tokens/s, all steps | coordinator overhead | coordinator tokens/s, timed steps | PyTorch tokens/s | coordinator all / PyTorch | coordinator timed / PyTorch |\n\
         | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n"
    );
    let rows: Vec<&Value> = summary
        .iter()
        .filter(|v| v["kind"] != "store" && v["kind"] != "nodes")
        .collect();
    for v in &rows {
        table.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
            v["config"].as_str().unwrap_or(""),
            v["backend"].as_str().unwrap_or(""),
            v["rounds"],
            fmt(v, "hand_tokens_per_s"),
            fmt(v, "coordinator_tokens_per_s"),
            fmt(v, "overhead"),
            fmt(v, "coordinator_timed_tokens_per_s"),
            fmt(v, "pytorch_tokens_per_s"),
            fmt(v, "ratio_coordinator_to_pytorch"),
            fmt(v, "ratio_timed_to_pytorch"),
        ));
    }
    table.push_str(
        "\nThe hand loop and PyTorch time the steps after 5 warm-up steps; the coordinator's \
         *all steps* figure is its training time over every step (warm-up included), its \
         *timed steps* figure the same run's time less that of a run of the warm-up steps \
         alone (the like-for-like figure).\n",
    );
    table.push_str(
        "\nTwo CPU workers (`strategy ddp, devices 2`, same global batch; engine auto: the \
         Learner engine's group, then the same group on the native loop) against one, and \
         PyTorch's `--ddp 2` (two processes of one thread, gloo):\n\n\
         | config | backend | ddp×2 tokens/s | ddp×2 native loop | ddp×2 / one worker | exchange ms/step | gradient MB | PyTorch ddp×2 tokens/s | ddp×2 / PyTorch ddp×2 | best kiln / best PyTorch |\n\
         | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n",
    );
    for v in &rows {
        let ms = field(v, "ddp2_exchange_ms_per_step").map_or("—".into(), |x| format!("{x:.2}"));
        let mb = field(v, "grad_mb").map_or("—".into(), |x| format!("{x:.2}"));
        table.push_str(&format!(
            "| {} | {} | {} | {} | {} | {ms} | {mb} | {} | {} | {} |\n",
            v["config"].as_str().unwrap_or(""),
            v["backend"].as_str().unwrap_or(""),
            fmt(v, "ddp2_tokens_per_s"),
            fmt(v, "ddp2_native_tokens_per_s"),
            fmt(v, "ratio_ddp2_to_one_worker"),
            fmt(v, "pytorch_ddp2_tokens_per_s"),
            fmt(v, "ratio_ddp2_to_pytorch_ddp2"),
            fmt(v, "ratio_best_to_pytorch"),
        ));
    }
    for v in summary.iter().filter(|v| v["kind"] == "nodes") {
        let ms = |k: &str| field(v, k).map_or("—".into(), |x| format!("{x:.1}"));
        let mb = field(v, "grad_mb").map_or("—".into(), |x| format!("{x:.2}"));
        table.push_str(&format!(
            "\nTwo nodes on loopback (`kiln launch --nodes 2`, one worker each, exchanging \
             through burn-collective's orchestrator and websockets) against one process \
             with two workers, both `kiln train` on the tiny GPT, global batch 32, \
             {NODE_STEPS} steps, {} rounds ({} failed: an exchange stalled):\n\n\
             | | tokens/s | exchange ms/step | gradient MB |\n| --- | ---: | ---: | ---: |\n\
             | 2 nodes × 1 worker | {} | {} | {mb} |\n\
             | 1 process × 2 workers | {} | {} | {mb} |\n\
             | PyTorch `--ddp 2` (gloo) | {} | | |\n\n\
             2 nodes / 1 process: {}; 2 nodes / PyTorch ddp×2: {}.\n",
            v["rounds"],
            v["failed_rounds"],
            fmt(v, "nodes2_tokens_per_s"),
            ms("nodes2_exchange_ms_per_step"),
            fmt(v, "ddp2_tokens_per_s"),
            ms("ddp2_exchange_ms_per_step"),
            fmt(v, "pytorch_ddp2_tokens_per_s"),
            fmt(v, "ratio_nodes2_to_ddp2"),
            fmt(v, "ratio_nodes2_to_pytorch_ddp2"),
        ));
    }
    let store: Vec<&Value> = summary.iter().filter(|v| v["kind"] == "store").collect();
    if !store.is_empty() {
        table.push_str("\n| store and checkpoints | rounds | median |\n| --- | ---: | ---: |\n");
        for v in store {
            let m = v["measure"].as_str().unwrap_or("");
            let value = field(v, "median").unwrap_or(f64::NAN);
            let shown = if m.contains("overhead") {
                format!("{:+.1} %", value * 100.0)
            } else if m.contains("mb_per_s") {
                format!("{value:.1}")
            } else {
                format!("{value:.0}")
            };
            table.push_str(&format!("| {m} | {} | {shown} |\n", v["rounds"]));
        }
    }
    replace_section(START, END, &table)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(config: &str, timed: f64, hand: f64) -> Value {
        serde_json::json!({
            "kind": "pair", "config": config, "pytorch_tokens_per_s": 100.0,
            "ratio_timed_to_pytorch": timed, "ratio_hand_to_pytorch": hand,
        })
    }

    #[test]
    fn pairs_are_summarised_by_their_median_ratio() {
        let lines = [
            pair("tiny", 1.2, 0.9),
            pair("tiny", 0.8, 1.0),
            pair("tiny", 1.05, 1.1),
            pair("small", 0.9, 0.95),
        ];
        let summary = summarise_pairs(&lines);
        assert_eq!(summary.len(), 2);
        let tiny = &summary[0]["timed_to_pytorch"];
        assert_eq!(
            (tiny["median"].as_f64(), tiny["pairs"].as_u64()),
            (Some(1.05), Some(3))
        );
        assert_eq!(
            (tiny["min"].as_f64(), tiny["max"].as_f64()),
            (Some(0.8), Some(1.2))
        );
        assert_eq!(tiny["pairs_at_least_1"].as_u64(), Some(2));
        assert_eq!(summary[1]["hand_to_pytorch"]["median"].as_f64(), Some(0.95));
    }

    #[test]
    fn bad_pair_counts_are_named() {
        let err = parse_bench(&["--paired".into(), "0".into()]).err().unwrap();
        assert!(err.contains("invalid --paired \"0\""), "{err}");
    }
}

//! Multi-node runs on the loopback interface: several `kiln train` processes, one
//! per node, wired together through torchrun's variables (`kiln launch` or by
//! hand), as a user runs them.
//!
//! Every test enforces its own time limit: a node that hangs fails the test. They
//! train on the CPU backends, which a kiln built with `cuda-nccl` lacks.
#![cfg(not(feature = "cuda-nccl"))]

use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use rstest::rstest;
use serde_json::Value;

/// One multi-node test at a time: each starts several training processes on a
/// machine that may have two cores.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner())
}

const KILN: &str = env!("CARGO_BIN_EXE_kiln");

/// A `MASTER_PORT` whose range is free for up to 3 nodes.
fn free_ports() -> u16 {
    kiln_core::launch::free_master_port(3).expect("a free range of ports")
}

/// Waits for `child`'s exit (an event: a thread blocks in `wait`) at most `limit`;
/// kills it and fails the test past that.
fn wait_within(child: &mut Child, limit: Duration, what: &str) -> std::process::ExitStatus {
    let pid = child.id().to_string();
    let (ended, end) = std::sync::mpsc::channel();
    std::thread::scope(|scope| {
        scope.spawn(move || {
            let _ = ended.send(child.wait());
        });
        match end.recv_timeout(limit) {
            Ok(status) => status.unwrap(),
            Err(_) => {
                // The waiting thread returns once the child is gone.
                let _ = Command::new("kill").args(["-KILL", &pid]).status();
                panic!("{what} still running after {limit:?}: it hangs");
            }
        }
    })
}

/// Output of `child`, read on a thread so that a full pipe never blocks it. Bytes, made
/// text only at the end: a stream picked up mid-way may start inside a character.
fn collect(mut stream: impl Read + Send + 'static) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut bytes = Vec::new();
        let _ = stream.read_to_end(&mut bytes);
        String::from_utf8_lossy(&bytes).into_owned()
    })
}

/// The training arguments every run of a comparison shares.
fn train_args(out_dir: &str, steps: u32) -> Vec<String> {
    [
        "--max-steps",
        &steps.to_string(),
        "--progress",
        "off",
        "--no-db",
        "--json",
        "--output-dir",
        out_dir,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// The report a node printed with `--json`: the node's stdout lines (prefixed
/// `[node k] ` by `kiln launch`, or not), from the line `{` on.
fn report(stdout: &str, node: Option<u32>) -> Value {
    let lines: Vec<&str> = stdout
        .lines()
        .filter_map(|l| match node {
            Some(k) => l.strip_prefix(&format!("[node {k}] ")),
            None => Some(l),
        })
        .skip_while(|l| *l != "{")
        .collect();
    serde_json::from_str(&lines.join("\n"))
        .unwrap_or_else(|e| panic!("no report from node {node:?} ({e}) in:\n{stdout}"))
}

fn losses(report: &Value) -> Vec<f64> {
    report["step_losses"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect()
}

#[rstest]
// 2 nodes × 1 worker × batch 8 against 1 process × 1 worker × batch 16.
#[case::one_worker_per_node(&["--batch-size", "8"], &["--batch-size", "16"])]
// 2 nodes × 2 workers × batch 4 against 1 process × 4 workers × batch 4.
#[case::two_workers_per_node(
    &["--strategy", "ddp", "--devices", "2", "--batch-size", "4"],
    &["--strategy", "ddp", "--devices", "4", "--batch-size", "4"]
)]
fn two_nodes_train_as_one_process_with_the_same_global_batch(
    #[case] per_node: &[&str],
    #[case] one_process: &[&str],
) {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let out_dir = dir.path().to_str().unwrap();
    let steps = 30;

    let single = Command::new(KILN)
        .arg("train")
        .args(train_args(out_dir, steps))
        .args(one_process)
        .output()
        .unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&single.stdout),
        String::from_utf8_lossy(&single.stderr),
    );
    assert!(single.status.success(), "{stderr}");
    let single = report(&stdout, None);

    let mut args = train_args(out_dir, steps);
    args.extend(per_node.iter().map(|s| s.to_string()));
    let nodes = launch(&args, &|| {});

    let want = losses(&single);
    assert_eq!(want.len(), steps as usize);
    for node in &nodes {
        assert_eq!(node["status"]["status"], "FINISHED");
        assert_eq!(node["plan"]["num_nodes"], 2);
        assert_eq!(
            node["plan"]["world_size"],
            single["plan"]["world_size"].as_u64().unwrap().max(2)
        );
        let got = losses(node);
        assert_eq!(got.len(), want.len());
        for (step, (g, w)) in got.iter().zip(&want).enumerate() {
            assert!(
                (g - w).abs() <= 1e-4 * w.abs(),
                "step {}: two nodes {g}, one process {w}",
                step + 1
            );
        }
    }
    // Every node ends with the same weights, bit for bit.
    let sha = |r: &Value| r["weights_sha256"].as_str().unwrap().to_string();
    assert_eq!(sha(&nodes[0]), sha(&nodes[1]));
    // Only node 0 writes the run's files.
    assert!(nodes[0]["run_dir"].is_string(), "{}", nodes[0]);
    assert!(nodes[1]["run_dir"].is_null(), "{}", nodes[1]);
}

/// Starts node `rank` of `world` by hand, the way torchrun would.
fn node(rank: u32, world: u32, port: u16, args: &[&str]) -> Child {
    Command::new(KILN)
        .arg("train")
        .args(args)
        .env("WORLD_SIZE", world.to_string())
        .env("NODE_RANK", rank.to_string())
        .env("MASTER_ADDR", "127.0.0.1")
        .env("MASTER_PORT", port.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

#[rstest]
#[case::node_1_dies(1)]
#[case::node_0_dies(0)]
fn a_node_killed_mid_run_makes_the_other_fail_within_the_timeout(#[case] victim: u32) {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let out_dir = dir.path().to_str().unwrap();
    let port = free_ports();
    let timeout_s = 10;
    let args = |progress| {
        vec![
            "--epochs",
            "100",
            "--batch-size",
            "8",
            "--progress",
            progress,
            "--output-dir",
            out_dir,
            "--run-name",
            "two-nodes",
            "--node-timeout",
            "10",
        ]
    };
    let mut nodes = [
        node(0, 2, port, &args("lines")),
        node(1, 2, port, &args("off")),
    ];
    // Wait until node 0 reports progress a second time (about a second apart): the
    // run is under way.
    let mut stderr0 = BufReader::new(nodes[0].stderr.take().unwrap());
    let mut seen = String::new();
    let mut line = String::new();
    let mut reports = 0;
    while reports < 2 && stderr0.read_line(&mut line).unwrap() > 0 {
        seen.push_str(&line);
        reports += usize::from(line.contains(" step "));
        line.clear();
    }
    if reports < 2 {
        for node in &mut nodes {
            let _ = node.kill();
        }
        panic!("node 0 ended before training two steps: {seen}");
    }
    let survivor = 1 - victim;
    let survivor_err = match survivor {
        // The reader itself, not its inner pipe: what it has buffered is part of the rest.
        0 => collect(stderr0),
        _ => {
            let rest = collect(stderr0);
            std::thread::spawn(move || drop(rest.join()));
            collect(nodes[1].stderr.take().unwrap())
        }
    };
    let survivor_out = collect(nodes[survivor as usize].stdout.take().unwrap());
    nodes[victim as usize].kill().unwrap(); // SIGKILL
    let killed_at = Instant::now();
    let _ = nodes[victim as usize].wait();

    let status = wait_within(
        &mut nodes[survivor as usize],
        Duration::from_secs(timeout_s + 30),
        "the surviving node",
    );
    let err = survivor_err.join().unwrap();
    let err = format!("{status}\n{}{err}", survivor_out.join().unwrap());
    assert!(!status.success(), "{err}");
    assert!(
        killed_at.elapsed() < Duration::from_secs(timeout_s + 30),
        "{err}"
    );
    assert!(err.contains(&format!("node {victim}")), "{err}");
    // kiln itself never panics; burn-collective 0.21's own tokio threads may print a
    // panic of theirs when the dead node's websocket resets (docs/multi-node.md).
    let kiln_panics: Vec<&str> = err
        .lines()
        .filter(|l| l.contains(" panicked at "))
        .filter(|l| !l.contains("/burn-communication-") && !l.contains("/burn-collective-"))
        .collect();
    assert!(kiln_panics.is_empty(), "{err}");

    // The run is FAILED in the store (written by the survivor when node 0 died).
    let runs = Command::new(KILN)
        .args(["runs", "--output-dir", out_dir])
        .output()
        .unwrap();
    let listing = String::from_utf8_lossy(&runs.stdout);
    let row = listing
        .lines()
        .find(|l| l.contains("two-nodes"))
        .unwrap_or_default();
    assert!(row.contains("FAILED"), "{listing}\n{err}");
}

#[rstest]
#[case::wrong_world_size(Some(3), "disagree on the number of nodes")]
#[case::unreachable_master(None, "cannot reach the master")]
fn a_node_with_a_wrong_setup_gets_a_clear_error(
    #[case] other_world: Option<u32>,
    #[case] needle: &str,
) {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let out_dir = dir.path().to_str().unwrap();
    let port = free_ports();
    let args = [
        "--max-steps",
        "5",
        "--progress",
        "off",
        "--no-db",
        "--output-dir",
        out_dir,
        "--node-timeout",
        "5",
    ];
    // Node 0 (when there is one) says 2 nodes, node 1 says `other_world`; with no
    // node 0, nothing listens on the master port.
    let mut children = match other_world {
        Some(world) => vec![node(0, 2, port, &args), node(1, world, port, &args)],
        None => vec![node(1, 2, port, &args)],
    };
    let mut errors = String::new();
    for child in &mut children {
        let err = collect(child.stderr.take().unwrap());
        let status = wait_within(child, Duration::from_secs(60), "a misconfigured node");
        let err = err.join().unwrap();
        assert!(!status.success(), "{err}");
        // kiln's own error ends every node's output (burn-collective's threads may
        // print a panic of theirs before it).
        assert!(err.contains("kiln: error: node "), "{err}");
        errors.push_str(&err);
    }
    assert!(errors.contains(needle), "{errors}");
}

/// Runs `kiln launch` with `args` for every node; the two nodes' reports.
///
/// burn-collective 0.21 can, rarely (about once in a few thousand exchanges here),
/// stall or break off an exchange (docs/multi-node.md); kiln then ends both nodes
/// with an error naming the exchange, which is what it must do. Such a run is tried once
/// more (after `tidy`, which removes what the failed attempt wrote that the next
/// would refuse, e.g. a named run's directory), so that the engine's defect does not
/// make this suite flaky; any other failure fails the test.
fn launch(args: &[String], tidy: &dyn Fn()) -> [Value; 2] {
    for attempt in 1..=2 {
        let port = free_ports();
        let mut launch = Command::new(KILN)
            .args([
                "launch",
                "--nodes",
                "2",
                "--master-port",
                &port.to_string(),
                "--",
            ])
            .args(args)
            .args(["--node-timeout", "30"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stdout = collect(launch.stdout.take().unwrap());
        let stderr = collect(launch.stderr.take().unwrap());
        let status = wait_within(&mut launch, Duration::from_secs(240), "kiln launch");
        let (stdout, stderr) = (stdout.join().unwrap(), stderr.join().unwrap());
        if !status.success() && attempt == 1 && burn_collective_stalled(&stderr) {
            let before = RETRIES.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            assert_eq!(
                before, 0,
                "burn-collective stalled a second time in this test run: not the rare \
                 engine defect any more\n{stderr}"
            );
            eprintln!("an exchange stalled inside burn-collective; trying again:\n{stderr}");
            tidy();
            continue;
        }
        assert!(status.success(), "{stderr}");
        return [report(&stdout, Some(0)), report(&stdout, Some(1))];
    }
    unreachable!("the loop returns or panics")
}

/// Runs of this test binary tried again after a burn-collective stall: one is
/// tolerated, a second fails the test that needs it.
static RETRIES: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Whether `stderr` shows burn-collective 0.21's known defect, as kiln reports it
/// (`crates/coordinator/src/collective.rs`): an exchange that did not complete in
/// time, broke off inside the engine, or mixed two exchanges up. Any other exchange
/// error (a refused setting, a node that never started) is a failure.
fn burn_collective_stalled(stderr: &str) -> bool {
    stderr.contains("the exchange of ")
        && [
            "did not complete within",
            "broke off inside burn-collective",
            "mixed two exchanges up",
        ]
        .iter()
        .any(|signature| stderr.contains(signature))
}

#[test]
fn a_multi_node_run_resumes_from_its_checkpoint_to_the_uninterrupted_result() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let out_dir = dir.path().to_str().unwrap();
    let args = |steps: u32, name: &str, extra: &[&str]| {
        let mut args = train_args(out_dir, steps);
        args.retain(|a| a != "--no-db");
        args.extend(
            ["--batch-size", "8", "--run-name", name]
                .iter()
                .chain(extra)
                .map(|s| s.to_string()),
        );
        args
    };
    // A constant learning rate: the 8-step run takes the 16-step run's first steps.
    // A retried launch needs its run name free again: its run directory and the
    // store (which holds nothing the later steps read before the resumed run's
    // first launch succeeded) go.
    let remove = |name: &'static str| {
        let root = dir.path().to_path_buf();
        move || {
            let _ = std::fs::remove_dir_all(root.join("default").join(name));
            for file in ["kiln.sqlite", "kiln.sqlite-wal", "kiln.sqlite-shm"] {
                let _ = std::fs::remove_file(root.join(file));
            }
        }
    };
    let straight = launch(&args(16, "straight", &[]), &remove("straight"));
    let first = launch(
        &args(8, "resumed", &["--checkpoint-every-n-steps", "4"]),
        &remove("resumed"),
    );
    assert_eq!(losses(&first[0]).len(), 8);
    let resumed = launch(&args(16, "resumed", &["--resume", "last"]), &|| {});
    for node in &resumed {
        // The resumed report holds every step, those before the checkpoint included.
        assert_eq!(losses(node), losses(&straight[0]));
    }
    let sha = |r: &Value| r["weights_sha256"].as_str().unwrap().to_string();
    assert_eq!(sha(&resumed[0]), sha(&straight[0]));
    assert_eq!(sha(&resumed[1]), sha(&straight[0]));
    // Node 0 continued the same run in the store.
    assert_eq!(resumed[0]["run_id"], first[0]["run_id"]);
}

//! The `kiln` binary as a user runs it.
//!
//! It trains on the CPU backends, which a kiln built with `cuda-nccl` lacks.
#![cfg(not(feature = "cuda-nccl"))]

use std::process::{Command, Output};

use rstest::rstest;

fn kiln(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(args)
        .output()
        .expect("kiln runs")
}

fn text(o: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&o.stdout).into(),
        String::from_utf8_lossy(&o.stderr).into(),
    )
}

#[rstest]
#[case::missing_file(None, "no such file")]
#[case::empty_file(Some(&b""[..]), "the file is empty")]
#[case::not_utf8(Some(&b"\xff\xfe"[..]), "not valid UTF-8")]
#[case::too_short(Some(&b"hello"[..]), "too short for sequences of 64")]
fn bad_text_files_fail_cleanly(#[case] content: Option<&[u8]>, #[case] needle: &str) {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("corpus.txt");
    if let Some(bytes) = content {
        std::fs::write(&file, bytes).unwrap();
    }
    let out_dir = dir.path().join("runs");
    let out = kiln(&[
        "train",
        "--text",
        file.to_str().unwrap(),
        "--output-dir",
        out_dir.to_str().unwrap(),
    ]);
    let (_, err) = text(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains(needle), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}

#[rstest]
#[case(&["train", "--strategy", "deepspeed"], "invalid strategy \"deepspeed\": expected auto, single, vanilla, ddp, ddp_spawn, fsdp")]
#[case(&["train", "--precision", "fp8"], "invalid precision \"fp8\"")]
#[case(&["train", "--devices", "a,b"], "invalid devices \"a,b\"")]
#[case(&["train", "--backend", "tpu"], "invalid backend \"tpu\": expected ndarray, flex")]
#[case(&["train", "--task", "lm_huge"], "invalid task preset \"lm_huge\"")]
#[case(&["train", "--num-nodes", "0"], "invalid num_nodes \"0\"")]
#[case(&["train", "--precision", "16-true"], "invalid eps \"0.00000001\": expected a number >= 6.1e-5 under 16-true")]
#[case(&["train", "--process-group-backend", "gloo"], "invalid process_group_backend \"gloo\": expected auto, collective, nccl")]
#[case(&["train", "--strategy", "ddp", "--devices", "2", "--process-group-backend", "nccl"], "process_group_backend nccl is not available: this build of kiln-coordinator lacks its `cuda-nccl` feature")]
#[case(&["train", "--backend", "cuda"], "backend cuda is not compiled into this kiln: rebuild it with `cargo build --release -p kiln-cli --features cuda`")]
#[case(&["train", "--backend", "ndarray", "--precision", "bf16-mixed", "--strict-precision"], "invalid precision \"bf16-mixed\": expected a mode backend autodiff<ndarray> supports: 32-true")]
#[case(&["train", "--devices", "9999"], "invalid devices \"9999\": expected at most")]
#[case(&["train", "--experiment", "../../escape"], "invalid experiment \"../../escape\": expected a non-empty name without slashes")]
#[case(&["train", "--run-name", ".."], "invalid run_name \"..\"")]
#[case(&["train", "--db", "postgres://kiln:pw@127.0.0.1:1/kiln"], "cannot connect to postgres://kiln:***@127.0.0.1:1/kiln")]
fn bad_arguments_fail_with_the_value_named(#[case] args: &[&str], #[case] needle: &str) {
    let dir = tempfile::tempdir().unwrap();
    let mut all = args.to_vec();
    all.extend([
        "--output-dir",
        dir.path().to_str().unwrap(),
        "--max-steps",
        "1",
    ]);
    let out = kiln(&all);
    let (_, err) = text(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains(needle), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    // Nothing outside the output directory (`--experiment ../../escape`).
    let parent = dir.path().parent().unwrap();
    assert!(!parent.join("escape").exists() && !dir.path().join("..").join("escape").exists());
}

/// A malformed `--db` URL is a usage error (exit 2) that says what is wrong, for
/// `train` and `runs` alike; nothing is trained or written.
#[rstest]
#[case::train_port(&["train", "--db", "postgres://kiln@host:port/kiln"], "invalid port \"port\"")]
#[case::runs_option(&["runs", "--db", "postgres://kiln@host/kiln?colour=red"], "unknown option \"colour\"")]
fn a_malformed_store_url_is_a_usage_error(#[case] args: &[&str], #[case] why: &str) {
    let dir = tempfile::tempdir().unwrap();
    let mut all = args.to_vec();
    all.extend(["--output-dir", dir.path().to_str().unwrap()]);
    let out = kiln(&all);
    let (_, err) = text(&out);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("malformed PostgreSQL URL") && err.contains(why),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
    assert_eq!(
        std::fs::read_dir(dir.path()).unwrap().count(),
        0,
        "nothing written"
    );
}

/// `kiln ui` without a store, or on a port another program holds: a clear error,
/// exit 1, nothing created.
#[test]
fn kiln_ui_refuses_a_missing_store_and_a_taken_port() {
    let dir = tempfile::tempdir().unwrap();
    let o = dir.path().to_str().unwrap();
    let out = kiln(&["ui", "--output-dir", o, "--port", "0"]);
    let (_, err) = text(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("no experiment store at") && err.contains("train a model first"),
        "{err}"
    );
    assert_eq!(
        std::fs::read_dir(dir.path()).unwrap().count(),
        0,
        "nothing created"
    );

    let out = kiln(&[
        "train",
        "--max-steps",
        "1",
        "--progress",
        "off",
        "--output-dir",
        o,
    ]);
    assert!(out.status.success(), "{}", text(&out).1);
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port().to_string();
    let out = kiln(&["ui", "--output-dir", o, "--port", &port]);
    let (_, err) = text(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains(&format!("cannot listen on 127.0.0.1:{port}"))
            && err.contains("choose another port"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
}

/// A CPU-only kiln says how to get the GPU check instead of failing obscurely.
#[test]
fn gpu_check_without_cuda_says_how_to_build_it() {
    let out = kiln(&["gpu-check", "--steps", "1"]);
    let (_, err) = text(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("built without CUDA") && err.contains("--features cuda"),
        "{err}"
    );
}

#[test]
fn a_short_run_trains_reports_and_is_recorded() {
    let dir = tempfile::tempdir().unwrap();
    let out_dir = dir.path().to_str().unwrap();
    let out = kiln(&[
        "train",
        "--max-steps",
        "3",
        "--progress",
        "off",
        "--output-dir",
        out_dir,
        "--run-name",
        "smoke",
    ]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stdout.contains("kiln: FINISHED after 1 epoch(s), 3 optimizer steps"),
        "{stdout}"
    );
    assert!(stdout.contains("final validation loss"), "{stdout}");
    assert!(
        stdout.contains("run outputs in") && stdout.contains("smoke"),
        "{stdout}"
    );
    assert!(dir.path().join("default/smoke/model.mpk").is_file());

    let out = kiln(&["runs", "--output-dir", out_dir]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    let row = stdout
        .lines()
        .find(|l| l.contains("smoke"))
        .unwrap_or_default();
    assert!(row.contains("FINISHED"), "{stdout}");
}

/// `--devices 2 --strategy ddp` on CPU: two worker threads, said in the plan line;
/// on the Learner engine by default, on the native loop with `--engine native`.
#[rstest]
#[case::auto("auto", "learner")]
#[case::native("native", "native")]
fn two_cpu_workers_train_with_ddp(#[case] engine: &str, #[case] runs: &str) {
    let dir = tempfile::tempdir().unwrap();
    let out = kiln(&[
        "train",
        "--engine",
        engine,
        "--strategy",
        "ddp",
        "--devices",
        "2",
        "--batch-size",
        "16",
        "--max-steps",
        "3",
        "--progress",
        "lines",
        "--no-db",
        "--output-dir",
        dir.path().to_str().unwrap(),
    ]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains(&format!("engine={runs} strategy=ddp"))
            && stderr.contains("world=2")
            && stderr.contains("process_group=collective"),
        "{stderr}"
    );
    assert!(stdout.contains("3 optimizer steps"), "{stdout}");
}

/// One SIGTERM stops the run at the next batch; a second, sent as soon as the first
/// is acknowledged, exits at once. Either way the process exits with 130 and the
/// store records the run KILLED (before the fix, the second signal left it RUNNING).
#[rstest]
#[case::one_signal(1)]
#[case::two_signals(2)]
fn sigterm_stops_training_and_the_run_is_recorded_killed(#[case] signals: usize) {
    use std::io::{BufRead, BufReader};
    let dir = tempfile::tempdir().unwrap();
    let out_dir = dir.path().to_str().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args([
            "train",
            "--epochs",
            "100",
            "--progress",
            "lines",
            "--output-dir",
            out_dir,
            "--run-name",
            "long",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let mut seen = String::new();
    // Reads stderr up to a line holding `what` (or its end).
    let mut wait_for = |what: &str| {
        let mut line = String::new();
        loop {
            line.clear();
            if stderr.read_line(&mut line).unwrap() == 0 {
                return false;
            }
            seen.push_str(&line);
            if line.contains(what) {
                return true;
            }
        }
    };
    let term = |pid: u32| {
        Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .unwrap()
    };
    // Wait until the first optimizer step is reported, then ask it to stop.
    assert!(wait_for("step 1/"), "{seen}");
    assert!(term(child.id()).success());
    if signals == 2 {
        assert!(wait_for("stopping at the next batch"), "{seen}");
        // The process may have finished the step and exited in between.
        let second = term(child.id());
        eprintln!("second signal delivered: {}", second.success());
    }
    wait_for("\0never printed");
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(130), "{seen}");
    assert!(seen.contains("recorded as KILLED"), "{seen}");
    assert!(!seen.contains("panicked"), "{seen}");

    let out = kiln(&["runs", "--output-dir", out_dir]);
    let (stdout, _) = text(&out);
    let row = stdout
        .lines()
        .find(|l| l.contains("long"))
        .unwrap_or_default();
    assert!(row.contains("KILLED"), "{stdout}");
}

/// Where a test records its runs.
#[derive(Debug, Clone, Copy)]
enum Store {
    /// The default: `<output-dir>/kiln.sqlite`.
    Sqlite,
    /// `--db postgres://...`: a throwaway database on the test server.
    Postgres,
}

/// The same commands on the default SQLite file and on a PostgreSQL database.
#[rstest]
fn runs_commands_list_show_compare_best_export_and_plot_real_runs(
    #[values(Store::Sqlite, Store::Postgres)] store: Store,
) {
    let database = match store {
        Store::Sqlite => None,
        Store::Postgres => match kiln_experiment_db::testing::TempDatabase::create() {
            Some(database) => Some(database),
            None => return,
        },
    };
    let db_args: Vec<&str> = match &database {
        Some(database) => vec!["--db", database.url.as_str()],
        None => vec![],
    };
    let dir = tempfile::tempdir().unwrap();
    let o = dir.path().to_str().unwrap();
    for (name, lr) in [("a", "1e-3"), ("b", "3e-3")] {
        let mut train = vec![
            "train",
            "--max-steps",
            "4",
            "--log-every-n-steps",
            "1",
            "--progress",
            "off",
            "--output-dir",
            o,
            "--run-name",
            name,
            "--lr",
            lr,
        ];
        train.extend(&db_args);
        let out = kiln(&train);
        let (stdout, stderr) = text(&out);
        assert!(out.status.success(), "{stderr}");
        if let Some(database) = &database {
            // The summary names the store, its password (if any) masked.
            assert!(
                stdout.contains("recorded as run") && stdout.contains("kiln_test_"),
                "{stdout}"
            );
            assert!(!dir.path().join("kiln.sqlite").exists(), "{}", database.url);
        }
    }
    let ok = |args: &[&str]| {
        let mut all = vec!["runs"];
        all.extend_from_slice(args);
        all.extend(["--output-dir", o]);
        all.extend(&db_args);
        let out = kiln(&all);
        let (stdout, stderr) = text(&out);
        assert!(out.status.success(), "{args:?}: {stderr}");
        stdout
    };
    let listed = ok(&["list", "--filter", "param.lr>=0.002"]);
    assert!(
        listed.contains(" b ") && !listed.contains(" a "),
        "{listed}"
    );
    let shown = ok(&["show", "1"]);
    assert!(
        shown.contains("status   FINISHED") && shown.contains("train/loss"),
        "{shown}"
    );
    let compared = ok(&["compare", "1", "2"]);
    assert!(
        compared.lines().any(|l| l.starts_with("* lr")),
        "{compared}"
    );
    let best = ok(&["best", "--metric", "train/loss", "--mode", "min"]);
    assert!(best.starts_with("best run by train/loss (min): "), "{best}");
    let csv = ok(&["export", "--format", "csv", "--run", "1"]);
    assert!(csv.starts_with("run_id,run_name,key,split,step"), "{csv}");
    assert!(
        csv.lines().filter(|l| l.contains(",loss,train,")).count() == 4,
        "{csv}"
    );
    let json = ok(&["export", "--format", "json"]);
    assert!(
        serde_json::from_str::<serde_json::Value>(&json)
            .unwrap()
            .as_array()
            .unwrap()
            .len()
            > 8
    );

    let stem = dir.path().join("curves");
    let plotted = ok(&[
        "plot",
        "1",
        "2",
        "--metric",
        "train/loss",
        "--out",
        stem.to_str().unwrap(),
    ]);
    assert!(plotted.starts_with("wrote "), "{plotted}");
    let png = std::fs::read(stem.with_extension("png")).unwrap();
    assert!(
        png.len() > 1000 && png.starts_with(b"\x89PNG"),
        "png of {} bytes",
        png.len()
    );
    let svg = std::fs::read_to_string(stem.with_extension("svg")).unwrap();
    assert!(
        svg.contains("<svg") && svg.contains("train/loss") && svg.contains("polyline"),
        "{svg}"
    );
}

#[rstest]
#[case(&["runs", "list", "--filter", "param.lr~1"], "param.lr~1")]
#[case(&["runs", "plot", "1", "--metric", "loss"], "invalid metric \"loss\"")]
#[case(&["runs", "export", "--format", "xml"], "invalid format \"xml\"")]
#[case(&["runs", "show", "99"], "run 99 not found")]
fn bad_runs_queries_are_errors_not_panics(#[case] args: &[&str], #[case] needle: &str) {
    let dir = tempfile::tempdir().unwrap();
    let o = dir.path().to_str().unwrap();
    let out = kiln(&[
        "train",
        "--max-steps",
        "1",
        "--progress",
        "off",
        "--output-dir",
        o,
    ]);
    assert!(out.status.success(), "{}", text(&out).1);
    let mut all = args.to_vec();
    all.extend(["--output-dir", o]);
    let out = kiln(&all);
    let (_, err) = text(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains(needle), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}

/// The float parameters of a saved tiny GPT, as bits, in visiting order.
fn weights(file: &std::path::Path, vocab: usize) -> Vec<u32> {
    use burn::module::{Module, ModuleVisitor, Param};
    use burn::prelude::{Backend, Tensor};
    use burn::record::{FullPrecisionSettings, NamedMpkFileRecorder, Recorder};
    type B = kiln_backend_cpu::Flex;
    struct Bits(Vec<u32>);
    impl<B: Backend> ModuleVisitor<B> for Bits {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            let data = param.val().into_data().convert::<f32>();
            self.0
                .extend(data.as_slice::<f32>().unwrap().iter().map(|x| x.to_bits()));
        }
    }
    let device = Default::default();
    let record = NamedMpkFileRecorder::<FullPrecisionSettings>::new()
        .load(file.to_path_buf(), &device)
        .unwrap();
    let model = kiln_models::TinyGptConfig::tiny(vocab)
        .init::<B>(0, &device)
        .unwrap()
        .load_record(record);
    let mut bits = Bits(Vec::new());
    model.visit(&mut bits);
    bits.0
}

fn report_json(run_dir: &std::path::Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(run_dir.join("report.json")).unwrap()).unwrap()
}

/// Kill -9 in the middle of training, resume with `--resume last`, and land on the
/// same losses and validation metrics as a run that was never interrupted: on one
/// device (the Learner engine), and with DDP on 2 CPU workers (global batch 32 in
/// both cases).
#[rstest]
#[case::one_device(&[])]
#[case::ddp_two_workers(&["--strategy", "ddp", "--devices", "2", "--batch-size", "16"])]
fn a_run_killed_with_sigkill_resumes_to_the_uninterrupted_result(#[case] extra: &[&str]) {
    let dir = tempfile::tempdir().unwrap();
    let o = dir.path().to_str().unwrap();
    let corpus: String = kiln_models::builtin_corpus().chars().take(40_000).collect();
    let text_file = dir.path().join("corpus.txt");
    std::fs::write(&text_file, corpus).unwrap();
    let args = |name: &'static str| {
        vec![
            "train",
            "--text",
            text_file.to_str().unwrap(),
            "--epochs",
            "3",
            "--limit-train-batches",
            "8",
            "--checkpoint-every-n-steps",
            "2",
            "--log-every-n-steps",
            "1",
            "--warmup-steps",
            "5",
            "--progress",
            "off",
            "--output-dir",
            o,
            "--run-name",
            name,
        ]
        .into_iter()
        .chain(extra.iter().copied())
        .map(String::from)
        .collect::<Vec<_>>()
    };
    let straight = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(args("u"))
        .output()
        .unwrap();
    assert!(straight.status.success(), "{}", text(&straight).1);

    let mut child = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(args("k"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let ckpts = dir.path().join("default/k/checkpoints");
    let newest_step = || -> u64 {
        std::fs::read_dir(&ckpts)
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .filter_map(|e| {
                        e.file_name()
                            .to_string_lossy()
                            .strip_prefix("step-")?
                            .parse()
                            .ok()
                    })
                    .max()
                    .unwrap_or(0)
            })
            .unwrap_or(0)
    };
    // A kill point chosen at random (logged, so that a failure can be replayed).
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    let target = 4 + (nanos % 17) as u64; // 4..=20
    eprintln!("SIGKILL once a checkpoint at step >= {target} exists");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    while newest_step() < target && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    Command::new("kill")
        .args(["-KILL", &child.id().to_string()])
        .status()
        .unwrap();
    child.wait().unwrap();
    let killed_at = newest_step();
    eprintln!("killed with the newest checkpoint at step {killed_at}");
    assert!(
        (target..24).contains(&killed_at),
        "killed after checkpoint {killed_at}"
    );

    let mut resume = args("k");
    resume.extend(["--resume".into(), "last".into()]);
    let resumed = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(&resume)
        .output()
        .unwrap();
    let (stdout, stderr) = text(&resumed);
    assert!(resumed.status.success(), "{stderr}");
    assert!(
        stdout.contains("FINISHED after 3 epoch(s), 24 optimizer steps"),
        "{stdout}"
    );

    let (u, k) = (
        report_json(&dir.path().join("default/u")),
        report_json(&dir.path().join("default/k")),
    );
    assert_eq!(
        u["step_losses"], k["step_losses"],
        "per-step losses differ after the resume"
    );
    assert_eq!(
        u["final_metrics"]["valid/loss"],
        k["final_metrics"]["valid/loss"]
    );
    let corpus_text = std::fs::read_to_string(&text_file).unwrap();
    let vocab = kiln_models::CharTokenizer::from_text(&corpus_text).vocab_size();
    assert_eq!(
        weights(&dir.path().join("default/u/model.mpk"), vocab),
        weights(&dir.path().join("default/k/model.mpk"), vocab),
        "final weights differ after the resume"
    );

    // The store knows it as one run in two attempts.
    let shown = kiln(&["runs", "show", "2", "--output-dir", o]);
    let (shown, _) = text(&shown);
    assert!(shown.contains("status   FINISHED (attempt 2)"), "{shown}");
    assert!(shown.contains("resume   attempt 2 from step"), "{shown}");
}

/// The CPU-speed issue's rule: what makes the `kiln` binary faster (its allocator,
/// mimalloc) changes no result. The binary's per-step losses equal, bit for bit,
/// those of the same run through the library in this test process (the system
/// allocator).
#[test]
fn the_binary_trains_exactly_as_the_library_does() {
    use burn::backend::Autodiff;
    use kiln_backend_cpu::Flex;
    use kiln_core::{ProgressMode, TaskKind, TaskSpec};
    use kiln_models::{CharTokenizer, TextDataModule, TinyGptConfig, builtin_corpus};

    let dir = tempfile::tempdir().unwrap();
    let out = kiln(&[
        "train",
        "--max-steps",
        "8",
        "--batch-size",
        "8",
        "--lr",
        "3e-3",
        "--seed",
        "5",
        "--no-db",
        "--no-checkpointing",
        "--progress",
        "off",
        "--json",
        "--output-dir",
        dir.path().to_str().unwrap(),
    ]);
    let (stdout, err) = text(&out);
    assert!(out.status.success(), "{err}");
    let report: kiln_core::TrainReport = serde_json::from_str(&stdout).unwrap();

    type B = Autodiff<Flex>;
    let text = builtin_corpus();
    let tokenizer = CharTokenizer::from_text(&text);
    let vocab = tokenizer.vocab_size();
    let data = TextDataModule::new(tokenizer.encode(&text).unwrap(), vocab, 64).unwrap();
    let mut task = TaskSpec::preset("lm_tiny").unwrap();
    task.kind = TaskKind::Lm {
        vocab_size: vocab,
        seq_len: 64,
    };
    let model = TinyGptConfig::tiny(vocab)
        .init::<B>(5, &Default::default())
        .unwrap();
    let library = kiln_coordinator::TrainingCoordinator::builder()
        .max_steps(8)
        .batch_size(8)
        .learning_rate(3e-3)
        .seed(5)
        .enable_checkpointing(false)
        .progress(ProgressMode::Off)
        .default_root_dir(dir.path())
        .build()
        .unwrap()
        .train::<B, _, _>(model, &data, &task, None, 1)
        .unwrap()
        .report;
    assert_eq!(report.plan.engine, library.plan.engine);
    let bits = |r: &kiln_core::TrainReport| -> Vec<u32> {
        r.step_losses.iter().map(|x| x.to_bits()).collect()
    };
    assert_eq!(report.step_losses.len(), 8);
    assert_eq!(bits(&report), bits(&library), "per-step losses differ");
}

//! The `kiln` binary as a user runs it.

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
#[case(&["train", "--precision", "bf16-mixed"], "precision bf16-mixed is not available")]
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

#[test]
fn sigterm_stops_training_and_the_run_is_recorded_killed() {
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
    // Wait until the first optimizer step is reported, then ask it to stop.
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let mut seen = String::new();
    let mut line = String::new();
    while stderr.read_line(&mut line).unwrap() > 0 {
        seen.push_str(&line);
        if line.contains("step 1/") {
            break;
        }
        line.clear();
    }
    assert!(seen.contains("step 1/"), "{seen}");
    let killed = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut stderr, &mut rest).unwrap();
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(130), "{seen}{rest}");
    assert!(rest.contains("recorded as KILLED"), "{rest}");

    let out = kiln(&["runs", "--output-dir", out_dir]);
    let (stdout, _) = text(&out);
    let row = stdout
        .lines()
        .find(|l| l.contains("long"))
        .unwrap_or_default();
    assert!(row.contains("KILLED"), "{stdout}");
}

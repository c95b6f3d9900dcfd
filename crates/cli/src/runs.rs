//! `kiln runs`: the runs recorded in the experiment store.

use std::path::PathBuf;

use anyhow::Result;
use clap::Parser;
use kiln_experiment_db::ExperimentDb;

/// List recorded runs, oldest first.
#[derive(Debug, Clone, Parser)]
pub struct RunsArgs {
    /// Only this experiment's runs.
    #[arg(long)]
    experiment: Option<String>,
    /// Experiment store (default: <output-dir>/kiln.sqlite).
    #[arg(long, value_name = "FILE")]
    db: Option<PathBuf>,
    /// Directory whose kiln.sqlite to read.
    #[arg(long, default_value = "runs")]
    output_dir: PathBuf,
}

#[allow(clippy::print_stdout)] // the listing is this command's output
pub fn run(args: &RunsArgs) -> Result<()> {
    let path = args
        .db
        .clone()
        .unwrap_or_else(|| args.output_dir.join("kiln.sqlite"));
    if !path.is_file() {
        anyhow::bail!(
            "no experiment store at {} (train a model first)",
            path.display()
        );
    }
    let db = ExperimentDb::open(&path)?;
    let runs = db.list_runs(args.experiment.as_deref())?;
    println!(
        "{:>4}  {:<12} {:<28} {:<9} {:>10} {:>10}",
        "id", "experiment", "name", "status", "valid/loss", "train/loss"
    );
    for r in runs {
        let last = |key: &str, split: &str| -> Result<String> {
            Ok(match db.metric_summary(r.id, key, split)? {
                Some(s) => format!("{:.4}", s.last),
                None => "-".into(),
            })
        };
        println!(
            "{:>4}  {:<12} {:<28} {:<9} {:>10} {:>10}",
            r.id,
            r.experiment,
            r.name,
            r.status.to_string(),
            last("loss", "valid")?,
            last("loss", "train")?
        );
        if let Some(reason) = &r.failure_reason {
            println!("      reason: {reason}");
        }
    }
    Ok(())
}

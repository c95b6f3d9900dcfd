//! `kiln runs ...`: read the experiment store.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use kiln_experiment_db::plot::plot_runs;
use kiln_experiment_db::{
    ExperimentDb, Goal, MetricField, MetricSummaryRecord, RunId, RunQuery, RunRecord, SortOrder,
    StoreLocation,
};

/// Query the runs recorded in the experiment store.
#[derive(Debug, Clone, Parser)]
pub struct RunsArgs {
    /// Experiment store: a SQLite file, or a shared PostgreSQL database as
    /// postgres://user[:password]@host[:port]/dbname (default: <output-dir>/kiln.sqlite).
    #[arg(long, value_name = "FILE|URL", global = true)]
    db: Option<StoreLocation>,
    /// Directory whose kiln.sqlite to read.
    #[arg(long, default_value = "runs", global = true)]
    output_dir: PathBuf,
    #[command(subcommand)]
    command: Option<RunsCommand>,
}

#[derive(Debug, Clone, Subcommand)]
enum RunsCommand {
    /// List runs, oldest first (the default).
    List(ListArgs),
    /// One run: status, config, params, metric summaries, resumes.
    Show {
        /// Run id.
        run: RunId,
    },
    /// Runs side by side: params (differences marked) and metric summaries.
    Compare {
        /// Run ids.
        #[arg(required = true, num_args = 2..)]
        runs: Vec<RunId>,
    },
    /// The best run of an experiment by a metric.
    Best {
        /// Metric as split/name.
        #[arg(long, default_value = "valid/loss")]
        metric: String,
        /// min or max.
        #[arg(long, default_value = "min")]
        mode: String,
        /// Experiment.
        #[arg(long, default_value = "default")]
        experiment: String,
    },
    /// Metric points as CSV or JSON on stdout (or into --out).
    Export {
        /// csv or json.
        #[arg(long, default_value = "csv")]
        format: String,
        /// Only these runs (default: all).
        #[arg(long = "run")]
        runs: Vec<RunId>,
        /// Also the points hidden by resumes.
        #[arg(long)]
        include_hidden: bool,
        /// Write here instead of stdout.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Draw a metric of runs as PNG and SVG curves.
    Plot {
        /// Run ids.
        #[arg(required = true)]
        runs: Vec<RunId>,
        /// Metric as split/name.
        #[arg(long, default_value = "train/loss")]
        metric: String,
        /// Output path without extension (default: <output-dir>/plots/<metric>-runs-<ids>).
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

#[derive(Debug, Clone, Default, Args)]
struct ListArgs {
    /// Only this experiment.
    #[arg(long)]
    experiment: Option<String>,
    /// Filters such as `status=FINISHED`, `param.lr>=0.001`, `metric.valid/loss<2`, `tag.k=v`.
    #[arg(long = "filter", value_name = "FILTER")]
    filters: Vec<String>,
    /// Order by a metric's last value, as split/name.
    #[arg(long, value_name = "SPLIT/NAME")]
    order_by: Option<String>,
    /// Descending order (with --order-by).
    #[arg(long)]
    desc: bool,
    /// At most this many runs.
    #[arg(long)]
    limit: Option<usize>,
}

fn split_metric(metric: &str) -> Result<(&str, &str)> {
    metric
        .split_once('/')
        .filter(|(s, k)| !s.is_empty() && !k.is_empty())
        .ok_or_else(|| {
            anyhow::anyhow!("invalid metric {metric:?}: expected split/name such as valid/loss")
        })
}

pub fn run(args: &RunsArgs) -> Result<()> {
    let location = crate::train::existing_store(args.db.as_ref(), &args.output_dir)?;
    let db = crate::train::open_store(&location)?;
    let mut out = std::io::stdout().lock();
    match args
        .command
        .clone()
        .unwrap_or(RunsCommand::List(ListArgs::default()))
    {
        RunsCommand::List(l) => list(&db, &l, &mut out),
        RunsCommand::Show { run } => show(&db, run, &mut out),
        RunsCommand::Compare { runs } => compare(&db, &runs, &mut out),
        RunsCommand::Best {
            metric,
            mode,
            experiment,
        } => {
            let (split, key) = split_metric(&metric)?;
            let goal = match mode.as_str() {
                "min" => Goal::Min,
                "max" => Goal::Max,
                other => anyhow::bail!("invalid mode {other:?}: expected min or max"),
            };
            match db.best_run(&experiment, key, split, goal)? {
                Some(r) => {
                    let v = db.metric_summary(r.id, key, split)?;
                    writeln!(out, "best run by {metric} ({mode}): {} ({})", r.id, r.name)?;
                    if let Some((step, value)) =
                        v.and_then(|s| if goal == Goal::Min { s.min } else { s.max })
                    {
                        writeln!(out, "{metric} = {value:.6} at step {step}")?;
                    }
                    Ok(())
                }
                None => anyhow::bail!("no run of experiment {experiment:?} has a finite {metric}"),
            }
        }
        RunsCommand::Export {
            format,
            runs,
            include_hidden,
            out: file,
        } => {
            let text = export(&db, &format, &runs, include_hidden)?;
            match file {
                Some(f) => std::fs::write(&f, text)
                    .with_context(|| format!("cannot write {}", f.display()))?,
                None => out.write_all(text.as_bytes())?,
            }
            Ok(())
        }
        RunsCommand::Plot {
            runs,
            metric,
            out: stem,
        } => {
            let (split, key) = split_metric(&metric)?;
            let stem = stem.unwrap_or_else(|| default_plot_stem(&args.output_dir, &metric, &runs));
            if let Some(parent) = stem.parent().filter(|p| !p.as_os_str().is_empty()) {
                std::fs::create_dir_all(parent)?;
            }
            let (png, svg) = plot_runs(&db, &runs, key, split, &stem)?;
            writeln!(out, "wrote {} and {}", png.display(), svg.display())?;
            Ok(())
        }
    }
}

fn default_plot_stem(output_dir: &Path, metric: &str, runs: &[RunId]) -> PathBuf {
    let ids: Vec<String> = runs.iter().map(ToString::to_string).collect();
    output_dir.join("plots").join(format!(
        "{}-runs-{}",
        metric.replace('/', "-"),
        ids.join("-")
    ))
}

fn last_of(db: &ExperimentDb, run: RunId, split: &str, key: &str) -> Result<String> {
    Ok(match db.metric_summary(run, key, split)? {
        Some(s) => format!("{:.4}", s.last),
        None => "-".into(),
    })
}

fn list(db: &ExperimentDb, l: &ListArgs, out: &mut impl Write) -> Result<()> {
    let mut query = RunQuery::new().filters(l.filters.iter())?;
    if let Some(e) = &l.experiment {
        query = query.experiment(e);
    }
    if let Some(m) = &l.order_by {
        let (split, key) = split_metric(m)?;
        let order = if l.desc {
            SortOrder::Descending
        } else {
            SortOrder::Ascending
        };
        query = query.order_by(key, split, MetricField::Last, order);
    }
    if let Some(n) = l.limit {
        query = query.limit(n);
    }
    let runs = db.query_runs(&query)?;
    writeln!(
        out,
        "{:>4}  {:<12} {:<30} {:<9} {:>7} {:>10} {:>10}",
        "id", "experiment", "name", "status", "attempt", "valid/loss", "train/loss"
    )?;
    for r in runs {
        writeln!(
            out,
            "{:>4}  {:<12} {:<30} {:<9} {:>7} {:>10} {:>10}",
            r.id,
            r.experiment,
            r.name,
            r.status.to_string(),
            r.attempt,
            last_of(db, r.id, "valid", "loss")?,
            last_of(db, r.id, "train", "loss")?
        )?;
        if let Some(reason) = &r.failure_reason {
            writeln!(out, "      reason: {reason}")?;
        }
    }
    Ok(())
}

fn show(db: &ExperimentDb, run: RunId, out: &mut impl Write) -> Result<()> {
    let r: RunRecord = db.run(run)?;
    writeln!(
        out,
        "run {} {:?} in experiment {:?}",
        r.id, r.name, r.experiment
    )?;
    writeln!(out, "status   {} (attempt {})", r.status, r.attempt)?;
    if let Some(reason) = &r.failure_reason {
        writeln!(out, "reason   {reason}")?;
    }
    writeln!(out, "host     {}  kiln {}", r.host, r.kiln_version)?;
    writeln!(out, "params")?;
    for (k, v) in db.params(run)? {
        writeln!(out, "  {k:<26} {v}")?;
    }
    writeln!(
        out,
        "metrics  {:<22} {:>12} {:>12} {:>8} {:>12} {:>8}",
        "", "last", "min", "@step", "max", "@step"
    )?;
    for s in db.metric_summaries(run)? {
        writeln!(out, "  {}", summary_line(&s))?;
    }
    for resume in db.resumes(run)? {
        writeln!(
            out,
            "resume   attempt {} from step {} (previous attempt {})",
            resume.attempt, resume.from_step, resume.previous_status
        )?;
    }
    if let Some(plan) = r.config.get("plan") {
        writeln!(out, "plan     {plan}")?;
    }
    Ok(())
}

fn summary_line(s: &MetricSummaryRecord) -> String {
    let pair = |p: Option<(u64, f64)>| match p {
        Some((step, v)) => (format!("{v:.6}"), step.to_string()),
        None => ("-".into(), "-".into()),
    };
    let (min, min_step) = pair(s.min);
    let (max, max_step) = pair(s.max);
    format!(
        "{:<29} {:>12.6} {:>12} {:>8} {:>12} {:>8}",
        format!("{}/{}", s.split, s.key),
        s.last,
        min,
        min_step,
        max,
        max_step
    )
}

fn compare(db: &ExperimentDb, runs: &[RunId], out: &mut impl Write) -> Result<()> {
    let c = db.compare_runs(runs)?;
    let header: Vec<String> = c
        .runs
        .iter()
        .map(|r| format!("{} ({})", r.id, r.name))
        .collect();
    writeln!(
        out,
        "{:<28} {}",
        "",
        header
            .iter()
            .map(|h| format!("{h:>24}"))
            .collect::<String>()
    )?;
    writeln!(out, "params (* = differs)")?;
    for p in &c.params {
        let mark = if p.differs() { "*" } else { " " };
        let vals: String = p
            .values
            .iter()
            .map(|v| format!("{:>24}", v.as_deref().unwrap_or("-")))
            .collect();
        writeln!(out, "{mark} {:<26} {vals}", p.key)?;
    }
    writeln!(out, "metrics (last)")?;
    for m in &c.metrics {
        let vals: String = m
            .values
            .iter()
            .map(|v| {
                format!(
                    "{:>24}",
                    v.as_ref()
                        .map(|s| format!("{:.6}", s.last))
                        .unwrap_or("-".into())
                )
            })
            .collect();
        writeln!(out, "  {:<26} {vals}", format!("{}/{}", m.split, m.key))?;
    }
    Ok(())
}

fn export(db: &ExperimentDb, format: &str, runs: &[RunId], include_hidden: bool) -> Result<String> {
    let ids: Vec<RunId> = if runs.is_empty() {
        db.list_runs(None)?.into_iter().map(|r| r.id).collect()
    } else {
        runs.to_vec()
    };
    let mut rows = Vec::new();
    for id in ids {
        let name = db.run(id)?.name;
        for p in db.metric_points(id, include_hidden)? {
            rows.push((id, name.clone(), p));
        }
    }
    match format {
        "csv" => csv_table(rows.iter().map(|(id, name, p)| {
            [
                id.to_string(),
                name.clone(),
                p.key.clone(),
                p.split.clone(),
                p.step.to_string(),
                p.epoch.to_string(),
                p.value.to_string(),
                p.wall_time.to_string(),
                p.attempt.to_string(),
                p.hidden.to_string(),
            ]
        })),
        "json" => {
            let v: Vec<serde_json::Value> = rows
                .into_iter()
                .map(|(id, name, p)| {
                    serde_json::json!({
                        "run_id": id, "run_name": name, "key": p.key, "split": p.split,
                        "step": p.step, "epoch": p.epoch,
                        "value": if p.value.is_finite() { serde_json::json!(p.value) } else { serde_json::json!(p.value.to_string()) },
                        "wall_time": p.wall_time, "attempt": p.attempt, "hidden": p.hidden,
                    })
                })
                .collect();
            Ok(serde_json::to_string_pretty(&v)? + "\n")
        }
        other => anyhow::bail!("invalid format {other:?}: expected csv or json"),
    }
}

/// The exported metric points as CSV (RFC 4180, quoted by the `csv` crate where a
/// field needs it: commas, quotes, line breaks of either kind).
fn csv_table(rows: impl Iterator<Item = [String; 10]>) -> Result<String> {
    let mut out = csv::Writer::from_writer(Vec::new());
    out.write_record([
        "run_id",
        "run_name",
        "key",
        "split",
        "step",
        "epoch",
        "value",
        "wall_time",
        "attempt",
        "hidden",
    ])?;
    for row in rows {
        out.write_record(&row)?;
    }
    Ok(String::from_utf8(out.into_inner()?)?)
}

#[cfg(test)]
mod tests {
    use super::csv_table;

    /// Every field reads back as written, carriage returns, quotes and commas
    /// included (a run name is free text).
    #[test]
    fn csv_fields_read_back_as_written() {
        let awkward = ["r\rn", "a,b", "say \"hi\"", "two\nlines", " padded "];
        let rows = awkward.iter().map(|name| {
            let mut row: [String; 10] = Default::default();
            row[1] = name.to_string();
            row
        });
        let text = csv_table(rows).unwrap();
        let mut reader = csv::Reader::from_reader(text.as_bytes());
        let read: Vec<String> = reader
            .records()
            .map(|r| r.unwrap()[1].to_string())
            .collect();
        assert_eq!(read, awkward);
    }
}

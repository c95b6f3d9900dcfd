//! `kiln`: train models, from the command line, through the `TrainingCoordinator`.

mod allocator;
mod bench;
mod gpu_check;
mod launch;
mod runs;
mod signals;
mod train;
mod ui;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// kiln: train Burn models through one coordinator.
#[derive(Debug, Parser)]
#[command(name = "kiln", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Train a model (the default when no command is given).
    Train(Box<train::TrainArgs>),
    /// List the runs recorded in the experiment store.
    Runs(runs::RunsArgs),
    /// Serve a web dashboard over the experiment store (runs, one run, comparisons,
    /// live curves) on http://127.0.0.1:8080.
    Ui(ui::UiArgs),
    /// Start a multi-node run on this machine: one `kiln train` process per node
    /// (`kiln launch --nodes 2 -- --max-steps 30`).
    Launch(launch::LaunchArgs),
    /// Measure training throughput (JSON lines on stdout).
    Bench(bench::BenchArgs),
    /// Train on the GPU in 32-true and bf16-mixed; print tokens/s, peak memory and
    /// final loss (needs the `cuda` feature and a GPU).
    GpuCheck(gpu_check::GpuCheckArgs),
}

fn main() -> ExitCode {
    allocator::keep_freed_memory();
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
    let result = match cli.command {
        None => train::run(&train::TrainArgs::parse_from(["kiln"])),
        Some(Command::Train(args)) => train::run(&args),
        Some(Command::Runs(args)) => runs::run(&args),
        Some(Command::Ui(args)) => ui::run(&args),
        Some(Command::Launch(args)) => launch::run(&args),
        Some(Command::Bench(args)) => bench::run(&args),
        Some(Command::GpuCheck(args)) => gpu_check::run(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) if err.downcast_ref::<train::Interrupted>().is_some() => {
            eprintln!("kiln: {err:#}");
            ExitCode::from(130)
        }
        Err(err) => {
            eprintln!("kiln: error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

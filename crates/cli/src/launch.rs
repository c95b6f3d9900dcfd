//! `kiln launch`: a multi-node run on this machine, one `kiln train` process per
//! node, wired together the way torchrun wires them (`WORLD_SIZE`, `NODE_RANK`,
//! `MASTER_ADDR`, `MASTER_PORT`), on the loopback interface.

use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Command, ExitStatus, Stdio};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use clap::Parser;

/// Start a multi-node run on this machine: one `kiln train` process per node,
/// their output prefixed with `[node k]`.
#[derive(Debug, Clone, Parser)]
#[command(name = "kiln launch")]
pub struct LaunchArgs {
    /// Number of node processes.
    #[arg(long, default_value_t = 2)]
    nodes: u32,
    /// `MASTER_PORT` given to the nodes: kiln's orchestrator listens on the next
    /// port, and node k of N on the two after it + k and + N + k. Default: the
    /// first of a range of ports free now.
    #[arg(long)]
    master_port: Option<u16>,
    /// Arguments of `kiln train`, after `--`.
    #[arg(last = true)]
    train: Vec<String>,
}

pub fn run(args: &LaunchArgs) -> Result<()> {
    if args.nodes == 0 {
        bail!("invalid nodes 0: expected an integer >= 1");
    }
    if let Some(flag) = args.train.iter().find(|a| {
        [
            "--num-nodes",
            "--node-rank",
            "--master-addr",
            "--master-port",
        ]
        .iter()
        .any(|f| a.split('=').next() == Some(*f))
    }) {
        bail!("{flag} is set by kiln launch for each node: leave it out of the train arguments");
    }
    let master_port = match args.master_port {
        Some(port) => port,
        None => kiln_core::launch::free_master_port(args.nodes).with_context(|| {
            format!(
                "no range of {} free ports found for the nodes: pass --master-port",
                2 + 2 * args.nodes
            )
        })?,
    };
    let kiln = std::env::current_exe().context("cannot find the kiln binary")?;
    let started = Instant::now();
    let mut children = Vec::new();
    for rank in 0..args.nodes {
        let mut child = Command::new(&kiln)
            .arg("train")
            .args(&args.train)
            .env("WORLD_SIZE", args.nodes.to_string())
            .env("NODE_RANK", rank.to_string())
            .env("MASTER_ADDR", "127.0.0.1")
            .env("MASTER_PORT", master_port.to_string())
            .env_remove("GROUP_RANK")
            .env_remove("LOCAL_WORLD_SIZE")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("cannot start node {rank}"))?;
        let out = child.stdout.take().map(|s| prefix(s, rank, false));
        let err = child.stderr.take().map(|s| prefix(s, rank, true));
        children.push((rank, child, [out, err]));
    }
    eprintln!(
        "kiln launch: {} nodes on 127.0.0.1, rendezvous port {}",
        args.nodes, master_port
    );
    // Every node ends by itself (a missing node makes the others fail within their
    // timeout); the launcher waits for all of them.
    let mut first_failure: Option<(u32, ExitStatus)> = None;
    for (rank, mut child, pipes) in children {
        let status = child
            .wait()
            .with_context(|| format!("cannot wait for node {rank}"))?;
        for pipe in pipes.into_iter().flatten() {
            let _ = pipe.join();
        }
        if !status.success() && first_failure.is_none() {
            first_failure = Some((rank, status));
        }
    }
    match first_failure {
        None => {
            eprintln!(
                "kiln launch: every node finished in {:.1} s",
                started.elapsed().as_secs_f64()
            );
            Ok(())
        }
        Some((rank, status)) => bail!("node {rank} exited with {status}"),
    }
}

/// Copies `stream` line by line to this process's stdout or stderr, each line
/// prefixed with the node's rank.
fn prefix(
    stream: impl Read + Send + 'static,
    rank: u32,
    to_stderr: bool,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        for line in BufReader::new(stream).lines() {
            let Ok(line) = line else { break };
            let line = format!("[node {rank}] {line}\n");
            let _ = match to_stderr {
                true => std::io::stderr().lock().write_all(line.as_bytes()),
                false => std::io::stdout().lock().write_all(line.as_bytes()),
            };
        }
    })
}

//! `kiln launch`: a multi-node run on this machine, one `kiln train` process per
//! node, wired together the way torchrun wires them (`WORLD_SIZE`, `NODE_RANK`,
//! `MASTER_ADDR`, `MASTER_PORT`), on the loopback interface.

use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Child, Command, ExitStatus, Stdio};
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
    let children = start_nodes(args.nodes, |rank| {
        Command::new(&kiln)
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
    })?;
    let children: Vec<_> = children
        .into_iter()
        .enumerate()
        .map(|(rank, mut child)| {
            let rank = rank as u32;
            let out = child.stdout.take().map(|s| prefix(s, rank, false));
            let err = child.stderr.take().map(|s| prefix(s, rank, true));
            (rank, child, [out, err])
        })
        .collect();
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

/// Starts node `0..nodes` with `spawn`. When one cannot be started, the nodes
/// already started are killed (they would otherwise wait for it until their
/// timeout) before the error is returned.
fn start_nodes(
    nodes: u32,
    mut spawn: impl FnMut(u32) -> std::io::Result<Child>,
) -> Result<Vec<Child>> {
    let mut children = Vec::new();
    for rank in 0..nodes {
        match spawn(rank) {
            Ok(child) => children.push(child),
            Err(e) => {
                for child in &mut children {
                    let _ = child.kill();
                    let _ = child.wait();
                }
                return Err(e).with_context(|| {
                    format!(
                        "cannot start node {rank} (the {} started before it were stopped)",
                        children.len()
                    )
                });
            }
        }
    }
    Ok(children)
}

/// Copies `stream` to this process's stdout or stderr on a thread of its own (see
/// [`copy_prefixed`]).
fn prefix(
    stream: impl Read + Send + 'static,
    rank: u32,
    to_stderr: bool,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let stream = BufReader::new(stream);
        match to_stderr {
            true => copy_prefixed(stream, rank, &mut std::io::stderr()),
            false => copy_prefixed(stream, rank, &mut std::io::stdout()),
        }
    })
}

/// Copies `stream` to `out` line by line, each line prefixed with the node's rank,
/// until the stream ends: bytes that are not UTF-8 are shown as U+FFFD, and a failed
/// write (a closed terminal) drops the line but goes on reading, so that the node
/// never blocks on a full pipe.
fn copy_prefixed(mut stream: impl BufRead, rank: u32, out: &mut impl Write) {
    let mut line = Vec::new();
    loop {
        line.clear();
        match stream.read_until(b'\n', &mut line) {
            Ok(0) => return,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => return,
        }
        let text = String::from_utf8_lossy(&line);
        let text = text.strip_suffix('\n').unwrap_or(&text);
        let _ = out.write_all(format!("[node {rank}] {text}\n").as_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_line_is_prefixed_even_after_bytes_that_are_not_utf8() {
        let mut input = b"first\n\xff\xfe broken\n".to_vec();
        // More than a pipe holds, then a last line without its newline.
        input.extend(std::iter::repeat_n(b'x', 200_000));
        input.extend(b"\nlast");
        let mut out = Vec::new();
        copy_prefixed(&input[..], 3, &mut out);
        let out = String::from_utf8(out).unwrap();
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 4, "{}", &out[..80]);
        assert_eq!(lines[0], "[node 3] first");
        assert_eq!(lines[1], "[node 3] \u{fffd}\u{fffd} broken");
        assert_eq!(lines[2].len(), "[node 3] ".len() + 200_000);
        assert_eq!(lines[3], "[node 3] last");
    }

    /// A node that cannot be started stops those started before it.
    #[test]
    fn a_node_that_cannot_start_stops_the_started_ones() {
        let mut first = None;
        let err = start_nodes(3, |rank| match rank {
            0 => {
                let child = Command::new("sleep").arg("600").spawn()?;
                first = Some(child.id());
                Ok(child)
            }
            _ => Err(std::io::Error::other("no more processes")),
        })
        .unwrap_err();
        let message = format!("{err:#}");
        assert!(message.contains("cannot start node 1"), "{message}");
        assert!(message.contains("no more processes"), "{message}");
        // The first node was killed and reaped: its process no longer exists.
        let pid = first.unwrap();
        let alive = Command::new("kill")
            .args(["-0", &pid.to_string()])
            .stderr(Stdio::null())
            .status()
            .unwrap();
        assert!(!alive.success(), "node 0 (pid {pid}) still runs");
    }
}

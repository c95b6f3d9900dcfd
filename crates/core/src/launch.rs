//! Where this process sits in a multi-node run: [`NodeSettings`], and how they are
//! read from torchrun's or SLURM's environment or given as flags ([`NodeLaunch`]).
//!
//! kiln runs one process per node; each process drives its node's devices with one
//! worker thread per device. The order of precedence is documented in
//! `docs/multi-node.md`:
//!
//! 1. torchrun's variables (`WORLD_SIZE` with `GROUP_RANK` or `NODE_RANK`,
//!    `MASTER_ADDR`, `MASTER_PORT`), also what `kiln launch` sets; torchrun's agent
//!    already listens on `MASTER_PORT`, so kiln's `master_port` is `MASTER_PORT + 1`;
//! 2. SLURM's (`SLURM_NNODES`, `SLURM_NODEID`, the first host of
//!    `SLURM_NODELIST`, a port derived from `SLURM_JOB_ID` unless `MASTER_PORT`
//!    is set);
//! 3. flags (`--num-nodes --node-rank --master-addr --master-port`).
//!
//! A flag that is also given by the environment must agree with it: a mismatch is
//! an error naming both, never a silent choice.

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// The rendezvous settings of one node of a multi-node run. Unused when
/// `num_nodes` is 1.
///
/// Node 0 hosts burn-collective's orchestrator on `master_port`; node `k` of `n`
/// serves its gradients to the other nodes on `master_port + 1 + k` and
/// `master_port + 1 + n + k` (alternate exchanges).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct NodeSettings {
    /// This node's rank, `0..num_nodes` (Lightning's `node_rank`).
    pub node_rank: u32,
    /// Host of node 0, where the orchestrator listens (default loopback).
    pub master_addr: String,
    /// Port of the orchestrator on node 0.
    pub master_port: u16,
    /// This node's address as the other nodes reach it; when absent, the loopback
    /// address for a loopback master, else the local address of the route to the
    /// master.
    pub node_addr: Option<String>,
    /// Seconds any rendezvous or exchange may wait for the other nodes before the
    /// run fails naming the node(s) missing. It must exceed the longest pause of
    /// node 0 between two steps (validation, a checkpoint).
    pub timeout_s: f64,
}

impl NodeSettings {
    /// The default rendezvous port (torchrun's).
    pub const DEFAULT_PORT: u16 = 29500;
    /// The default timeout, in seconds.
    pub const DEFAULT_TIMEOUT_S: f64 = 300.0;

    /// Checks the settings for a run of `num_nodes` nodes.
    pub fn validate(&self, num_nodes: u32) -> Result<()> {
        if num_nodes == 0 {
            return Err(Error::invalid("num_nodes", 0, "an integer >= 1"));
        }
        if self.node_rank >= num_nodes {
            return Err(Error::invalid(
                "node_rank",
                self.node_rank,
                format!("a rank in 0..{num_nodes} (num_nodes is {num_nodes})"),
            ));
        }
        if num_nodes > 1 {
            let last = self.master_port as u32 + 2 * num_nodes;
            if self.master_port == 0 || last > u16::MAX as u32 {
                return Err(Error::invalid(
                    "master_port",
                    self.master_port,
                    format!(
                        "a port in 1..={} (node k also listens on master_port + 1 + k and \
                         master_port + 1 + num_nodes + k)",
                        u16::MAX as u32 - 2 * num_nodes
                    ),
                ));
            }
        }
        for (field, host) in [
            ("master_addr", Some(&self.master_addr)),
            ("node_addr", self.node_addr.as_ref()),
        ] {
            if let Some(host) = host
                && (host.trim().is_empty() || host.contains("://") || host.contains('/'))
            {
                return Err(Error::invalid(
                    field,
                    host,
                    "a host name or IP address, without scheme or port",
                ));
            }
        }
        if !(self.timeout_s.is_finite() && self.timeout_s > 0.0) {
            return Err(Error::invalid(
                "timeout",
                self.timeout_s,
                "a finite number of seconds > 0",
            ));
        }
        Ok(())
    }

    /// The two ports node `rank` of `num_nodes` serves its data on, one for even
    /// exchanges and one for odd ones: `master_port + 1 + rank` and
    /// `master_port + 1 + num_nodes + rank`. Alternating spares an exchange from
    /// binding the port the previous one is still releasing.
    pub fn data_ports(&self, rank: u32, num_nodes: u32) -> [u16; 2] {
        let port = |offset: u32| (self.master_port as u32 + 1 + offset).min(u16::MAX as u32) as u16;
        [port(rank), port(num_nodes + rank)]
    }

    /// Whether the master is this machine's loopback interface.
    pub fn master_is_loopback(&self) -> bool {
        is_loopback(&self.master_addr)
    }
}

/// A `MASTER_PORT` (torchrun's variable) for a run of `num_nodes` nodes on this
/// machine: the port and the `1 + 2 × num_nodes` after it (kiln's orchestrator
/// and two data ports per node, [`NodeSettings::data_ports`]) can all be listened
/// on now, on every interface. `None` when no such range turned up. For a launcher
/// that starts every node here (`kiln launch`, like torchrun's `--standalone`);
/// another process may still take one of the ports before the run does.
pub fn free_master_port(num_nodes: u32) -> Option<u16> {
    use std::net::TcpListener;
    let span = u16::try_from(1 + 2 * num_nodes).ok()?;
    (0..100).find_map(|_| {
        let base = TcpListener::bind("127.0.0.1:0")
            .ok()?
            .local_addr()
            .ok()?
            .port();
        let last = base.checked_add(span)?;
        (base..=last)
            .all(|p| TcpListener::bind(("0.0.0.0", p)).is_ok())
            .then_some(base)
    })
}

impl Default for NodeSettings {
    fn default() -> Self {
        Self {
            node_rank: 0,
            master_addr: "127.0.0.1".into(),
            master_port: Self::DEFAULT_PORT,
            node_addr: None,
            timeout_s: Self::DEFAULT_TIMEOUT_S,
        }
    }
}

fn is_loopback(host: &str) -> bool {
    let host = host.trim();
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// Where the node settings came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LaunchSource {
    /// torchrun's variables (or `cargo xtask launch`, which sets the same).
    Torchrun,
    /// A SLURM job step (`srun`).
    Slurm,
    /// Flags or the library's configuration.
    Flags,
}

impl std::fmt::Display for LaunchSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Torchrun => "torchrun",
            Self::Slurm => "slurm",
            Self::Flags => "flags",
        })
    }
}

/// Node settings as given on the command line (each optional).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct NodeFlags {
    /// `--num-nodes`.
    pub num_nodes: Option<u32>,
    /// `--node-rank`.
    pub node_rank: Option<u32>,
    /// `--master-addr`.
    pub master_addr: Option<String>,
    /// `--master-port`.
    pub master_port: Option<u16>,
}

/// The node count and settings of this process, and where they came from.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeLaunch {
    /// Which source gave them.
    pub source: LaunchSource,
    /// Number of nodes.
    pub num_nodes: u32,
    /// This node's settings (the timeout and node address keep their defaults).
    pub settings: NodeSettings,
}

impl NodeLaunch {
    /// Reads the launch from this process's environment and `flags`.
    pub fn from_env(flags: &NodeFlags) -> Result<Self> {
        Self::resolve(flags, |name| std::env::var(name).ok())
    }

    /// Reads the launch from `var` (an environment lookup) and `flags`, in the
    /// documented order: torchrun, SLURM, flags.
    ///
    /// ```
    /// use kiln_core::launch::{LaunchSource, NodeFlags, NodeLaunch};
    /// let env = |name: &str| match name {
    ///     "WORLD_SIZE" => Some("2".to_string()),
    ///     "NODE_RANK" => Some("1".to_string()),
    ///     "MASTER_ADDR" => Some("10.0.0.5".to_string()),
    ///     "MASTER_PORT" => Some("29400".to_string()),
    ///     _ => None,
    /// };
    /// let launch = NodeLaunch::resolve(&NodeFlags::default(), env).unwrap();
    /// assert_eq!(launch.source, LaunchSource::Torchrun);
    /// assert_eq!((launch.num_nodes, launch.settings.node_rank), (2, 1));
    /// // torchrun's agent listens on MASTER_PORT; kiln takes the next port.
    /// assert_eq!(launch.settings.master_port, 29401);
    /// ```
    pub fn resolve(flags: &NodeFlags, var: impl Fn(&str) -> Option<String>) -> Result<Self> {
        let env = if let Some(env) = torchrun(&var)? {
            env
        } else if let Some(env) = slurm(&var)? {
            env
        } else {
            let mut settings = NodeSettings::default();
            let num_nodes = flags.num_nodes.unwrap_or(1);
            if let Some(rank) = flags.node_rank {
                settings.node_rank = rank;
            }
            if let Some(addr) = &flags.master_addr {
                settings.master_addr = addr.clone();
            }
            if let Some(port) = flags.master_port {
                settings.master_port = port;
            }
            settings.validate(num_nodes)?;
            return Ok(Self {
                source: LaunchSource::Flags,
                num_nodes,
                settings,
            });
        };
        let source = env.source;
        let agree = |field: &'static str, flag: Option<String>, env: String, var: &str| match flag {
            Some(flag) if flag != env => Err(Error::invalid(
                field,
                flag,
                format!("{env}, as {var} says ({source} launch): drop the flag or make them agree"),
            )),
            _ => Ok(()),
        };
        let vars = match source {
            LaunchSource::Slurm => [
                "SLURM_NNODES",
                "SLURM_NODEID",
                "SLURM_NODELIST",
                "MASTER_PORT or SLURM_JOB_ID",
            ],
            _ => [
                "WORLD_SIZE",
                "GROUP_RANK/NODE_RANK",
                "MASTER_ADDR",
                "MASTER_PORT",
            ],
        };
        agree(
            "num_nodes",
            flags.num_nodes.map(|v| v.to_string()),
            env.num_nodes.to_string(),
            vars[0],
        )?;
        agree(
            "node_rank",
            flags.node_rank.map(|v| v.to_string()),
            env.node_rank.to_string(),
            vars[1],
        )?;
        let mut settings = NodeSettings {
            node_rank: env.node_rank,
            ..NodeSettings::default()
        };
        match env.master_addr {
            Some(addr) => {
                agree(
                    "master_addr",
                    flags.master_addr.clone(),
                    addr.clone(),
                    vars[2],
                )?;
                settings.master_addr = addr;
            }
            None => {
                if let Some(addr) = &flags.master_addr {
                    settings.master_addr = addr.clone();
                }
            }
        }
        match env.master_port {
            Some(port) => {
                // The flag names the same port as the variable (torchrun's, before
                // kiln's + 1).
                let given = match source {
                    LaunchSource::Torchrun => port - 1,
                    _ => port,
                };
                agree(
                    "master_port",
                    flags.master_port.map(|v| v.to_string()),
                    given.to_string(),
                    vars[3],
                )?;
                settings.master_port = port;
            }
            None => {
                if let Some(port) = flags.master_port {
                    settings.master_port = port;
                }
            }
        }
        settings.validate(env.num_nodes)?;
        Ok(Self {
            source,
            num_nodes: env.num_nodes,
            settings,
        })
    }
}

/// What an environment says.
struct EnvLaunch {
    source: LaunchSource,
    num_nodes: u32,
    node_rank: u32,
    master_addr: Option<String>,
    master_port: Option<u16>,
}

fn number<T: std::str::FromStr>(
    var: &impl Fn(&str) -> Option<String>,
    name: &'static str,
    expected: &str,
) -> Result<Option<T>> {
    match var(name) {
        None => Ok(None),
        Some(raw) => raw
            .trim()
            .parse()
            .map(Some)
            .map_err(|_| Error::invalid(name, raw, expected)),
    }
}

fn torchrun(var: &impl Fn(&str) -> Option<String>) -> Result<Option<EnvLaunch>> {
    let rank_var = match (var("GROUP_RANK"), var("NODE_RANK")) {
        (Some(_), _) => "GROUP_RANK",
        (None, Some(_)) => "NODE_RANK",
        (None, None) => return Ok(None),
    };
    let Some(num_nodes) = number::<u32>(var, "WORLD_SIZE", "the number of nodes, an integer >= 1")?
    else {
        return Ok(None);
    };
    if let Some(local) = number::<u32>(var, "LOCAL_WORLD_SIZE", "an integer >= 1")?
        && local != 1
    {
        return Err(Error::invalid(
            "LOCAL_WORLD_SIZE",
            local,
            "1: kiln runs one process per node and one worker thread per device \
             (torchrun --nproc-per-node 1; choose the devices with --devices)",
        ));
    }
    let node_rank = number::<u32>(var, rank_var, "an integer >= 0")?.unwrap_or(0);
    if num_nodes == 0 || node_rank >= num_nodes {
        return Err(Error::invalid(
            rank_var,
            node_rank,
            format!("a rank below WORLD_SIZE={num_nodes}"),
        ));
    }
    Ok(Some(EnvLaunch {
        source: LaunchSource::Torchrun,
        num_nodes,
        node_rank,
        master_addr: var("MASTER_ADDR").filter(|a| !a.trim().is_empty()),
        // torchrun's agent on node 0 already listens on MASTER_PORT (its rendezvous
        // store): kiln's orchestrator takes the next port.
        master_port: number::<u16>(var, "MASTER_PORT", "a port number 1..=65534")?
            .map(|port| {
                port.checked_add(1).ok_or_else(|| {
                    Error::invalid(
                        "MASTER_PORT",
                        port,
                        "a port number 1..=65534 (kiln listens on MASTER_PORT + 1 under torchrun)",
                    )
                })
            })
            .transpose()?,
    }))
}

fn slurm(var: &impl Fn(&str) -> Option<String>) -> Result<Option<EnvLaunch>> {
    let (Some(num_nodes), Some(node_rank)) = (
        number::<u32>(var, "SLURM_NNODES", "the number of nodes, an integer >= 1")?,
        number::<u32>(var, "SLURM_NODEID", "an integer >= 0")?,
    ) else {
        return Ok(None);
    };
    if let Some(tasks) = number::<u32>(var, "SLURM_NTASKS", "an integer >= 1")?
        && tasks != num_nodes
    {
        return Err(Error::invalid(
            "SLURM_NTASKS",
            tasks,
            format!(
                "{num_nodes} (SLURM_NNODES): kiln runs one task per node \
                 (srun --ntasks-per-node=1) and one worker thread per device"
            ),
        ));
    }
    if node_rank >= num_nodes {
        return Err(Error::invalid(
            "SLURM_NODEID",
            node_rank,
            format!("a rank below SLURM_NNODES={num_nodes}"),
        ));
    }
    let master_addr = var("SLURM_NODELIST")
        .or_else(|| var("SLURM_JOB_NODELIST"))
        .and_then(|list| first_host(&list));
    let master_port = match number::<u16>(var, "MASTER_PORT", "a port number 1..=65535")? {
        Some(port) => Some(port),
        // Lightning's rule: 15000 + the job id's last four digits.
        None => number::<u64>(var, "SLURM_JOB_ID", "an integer")?
            .map(|job| 15000 + (job % 10000) as u16),
    };
    Ok(Some(EnvLaunch {
        source: LaunchSource::Slurm,
        num_nodes,
        node_rank,
        master_addr,
        master_port,
    }))
}

/// The first host of a SLURM node list: `gpu[07-09,12],cpu01` → `gpu07`.
pub fn first_host(list: &str) -> Option<String> {
    let list = list.trim();
    // The first entry ends at the first comma outside brackets.
    let mut depth = 0;
    let end = list
        .char_indices()
        .find(|&(_, c)| {
            match c {
                '[' => depth += 1,
                ']' => depth -= 1,
                _ => {}
            }
            c == ',' && depth == 0
        })
        .map_or(list.len(), |(i, _)| i);
    let entry = &list[..end];
    let host = match (entry.find('['), entry.find(']')) {
        (Some(open), Some(close)) if open < close => {
            let first = entry[open + 1..close]
                .split(',')
                .next()
                .and_then(|range| range.split('-').next())
                .unwrap_or("");
            format!("{}{first}{}", &entry[..open], &entry[close + 1..])
        }
        _ => entry.to_string(),
    };
    (!host.is_empty()).then_some(host)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rstest::rstest;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |name| map.get(name).cloned()
    }

    #[rstest]
    #[case::nothing(&[], LaunchSource::Flags, 1, 0, "127.0.0.1", 29500)]
    #[case::torchrun(&[("WORLD_SIZE", "2"), ("GROUP_RANK", "1"), ("MASTER_ADDR", "10.0.0.1"), ("MASTER_PORT", "1234")], LaunchSource::Torchrun, 2, 1, "10.0.0.1", 1235)]
    #[case::node_rank(&[("WORLD_SIZE", "3"), ("NODE_RANK", "2")], LaunchSource::Torchrun, 3, 2, "127.0.0.1", 29500)]
    #[case::world_alone_is_not_torchrun(&[("WORLD_SIZE", "4")], LaunchSource::Flags, 1, 0, "127.0.0.1", 29500)]
    #[case::slurm(&[("SLURM_NNODES", "4"), ("SLURM_NODEID", "3"), ("SLURM_NTASKS", "4"), ("SLURM_NODELIST", "gpu[07-09,12]"), ("SLURM_JOB_ID", "4242917")], LaunchSource::Slurm, 4, 3, "gpu07", 17917)]
    #[case::slurm_master_port(&[("SLURM_NNODES", "2"), ("SLURM_NODEID", "0"), ("SLURM_NODELIST", "a1,b2"), ("SLURM_JOB_ID", "7"), ("MASTER_PORT", "4000")], LaunchSource::Slurm, 2, 0, "a1", 4000)]
    #[case::torchrun_before_slurm(&[("WORLD_SIZE", "2"), ("NODE_RANK", "0"), ("SLURM_NNODES", "4"), ("SLURM_NODEID", "3")], LaunchSource::Torchrun, 2, 0, "127.0.0.1", 29500)]
    fn the_environment_gives_the_node(
        #[case] vars: &[(&str, &str)],
        #[case] source: LaunchSource,
        #[case] num_nodes: u32,
        #[case] rank: u32,
        #[case] addr: &str,
        #[case] port: u16,
    ) {
        let launch = NodeLaunch::resolve(&NodeFlags::default(), env(vars)).unwrap();
        assert_eq!(launch.source, source);
        assert_eq!(
            (launch.num_nodes, launch.settings.node_rank),
            (num_nodes, rank)
        );
        assert_eq!(launch.settings.master_addr, addr);
        assert_eq!(launch.settings.master_port, port);
    }

    #[test]
    fn flags_fill_what_the_environment_leaves_out() {
        let flags = NodeFlags {
            num_nodes: Some(2),
            node_rank: Some(1),
            master_addr: Some("host0".into()),
            master_port: Some(4100),
        };
        let launch = NodeLaunch::resolve(&flags, env(&[])).unwrap();
        assert_eq!(launch.source, LaunchSource::Flags);
        assert_eq!((launch.num_nodes, launch.settings.node_rank), (2, 1));
        assert_eq!(
            (
                launch.settings.master_addr.as_str(),
                launch.settings.master_port
            ),
            ("host0", 4100)
        );
        // torchrun without MASTER_ADDR: the flag gives it.
        let launch = NodeLaunch::resolve(
            &NodeFlags {
                master_addr: Some("host0".into()),
                ..NodeFlags::default()
            },
            env(&[("WORLD_SIZE", "2"), ("NODE_RANK", "1")]),
        )
        .unwrap();
        assert_eq!(launch.settings.master_addr, "host0");
    }

    #[rstest]
    #[case::flag_disagrees(NodeFlags { num_nodes: Some(3), ..NodeFlags::default() }, &[("WORLD_SIZE", "2"), ("NODE_RANK", "0")], &["num_nodes \"3\"", "WORLD_SIZE", "torchrun"])]
    #[case::rank_too_large(NodeFlags::default(), &[("WORLD_SIZE", "2"), ("NODE_RANK", "2")], &["NODE_RANK", "below WORLD_SIZE=2"])]
    #[case::several_processes(NodeFlags::default(), &[("WORLD_SIZE", "2"), ("NODE_RANK", "0"), ("LOCAL_WORLD_SIZE", "8")], &["LOCAL_WORLD_SIZE", "--nproc-per-node 1"])]
    #[case::not_a_number(NodeFlags::default(), &[("WORLD_SIZE", "two"), ("NODE_RANK", "0")], &["WORLD_SIZE \"two\""])]
    #[case::slurm_tasks(NodeFlags::default(), &[("SLURM_NNODES", "2"), ("SLURM_NODEID", "0"), ("SLURM_NTASKS", "16")], &["SLURM_NTASKS", "--ntasks-per-node=1"])]
    #[case::no_nodes(NodeFlags { num_nodes: Some(0), ..NodeFlags::default() }, &[], &["invalid num_nodes \"0\"", ">= 1"])]
    #[case::flag_rank(NodeFlags { num_nodes: Some(2), node_rank: Some(2), ..NodeFlags::default() }, &[], &["node_rank \"2\"", "0..2"])]
    #[case::bad_addr(NodeFlags { num_nodes: Some(2), master_addr: Some("ws://h:1".into()), ..NodeFlags::default() }, &[], &["master_addr", "without scheme"])]
    fn a_bad_launch_is_named(
        #[case] flags: NodeFlags,
        #[case] vars: &[(&str, &str)],
        #[case] needles: &[&str],
    ) {
        let err = NodeLaunch::resolve(&flags, env(vars))
            .unwrap_err()
            .to_string();
        for needle in needles {
            assert!(err.contains(needle), "{needle:?} not in {err}");
        }
    }

    #[rstest]
    #[case("node01", "node01")]
    #[case("node[01-04]", "node01")]
    #[case("gpu[12,07-09],cpu01", "gpu12")]
    #[case("a-b[003-005]-x,c", "a-b003-x")]
    #[case("host1,host2", "host1")]
    fn the_master_is_the_first_host(#[case] list: &str, #[case] want: &str) {
        assert_eq!(first_host(list).as_deref(), Some(want));
    }

    #[test]
    fn ports_and_loopback() {
        let s = NodeSettings::default();
        assert_eq!(s.data_ports(0, 4), [29501, 29505]);
        assert_eq!(s.data_ports(3, 4), [29504, 29508]);
        assert!(s.master_is_loopback());
        assert!(
            !NodeSettings {
                master_addr: "10.1.2.3".into(),
                ..s.clone()
            }
            .master_is_loopback()
        );
        let err = NodeSettings {
            master_port: 65535,
            ..s.clone()
        }
        .validate(2)
        .unwrap_err();
        assert!(err.to_string().contains("master_port"), "{err}");
        let err = NodeSettings {
            timeout_s: 0.0,
            ..s
        }
        .validate(2)
        .unwrap_err();
        assert!(err.to_string().contains("timeout"), "{err}");
    }
}

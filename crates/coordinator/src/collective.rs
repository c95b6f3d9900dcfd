//! The one place kiln talks to burn-collective: register a worker, all-reduce one
//! flat vector per optimizer step, leave.
//!
//! Every exchange is a single all-reduce (sum) of one 1-D tensor: all gradients (or
//! parameters) flattened in the model's visiting order, followed by a few status
//! numbers (the step's weighted loss, "stop", "failed"). One exchange per step is
//! burn-collective 0.21's verified pattern (memo §4.3: repeated global all-reduces
//! on one registration hang across nodes), it keeps the message count independent of
//! the model, and it lets every worker learn in the same exchange whether another
//! one failed or was asked to stop, so that no worker ever waits for one that left.
//!
//! In-process workers on one machine use burn-collective's local server, which works
//! on every Burn backend (CPU included), and register once for the whole run.
//!
//! Across nodes ([`Link`]), burn-collective's global level adds the other nodes
//! through its orchestrator (hosted by node 0) and websocket data services. Its
//! 0.21 release hangs on a second global all-reduce of one registration (memo
//! §4.3), so each exchange registers, all-reduces and finishes; and it has no
//! timeouts, so every exchange runs on a helper thread that this module waits for
//! at most [`NodeSettings::timeout_s`]: a node that died or never came makes the
//! others fail with an error naming it instead of hanging. When the engine is
//! fixed, only this module changes.

use std::marker::PhantomData;
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError, mpsc};
use std::time::{Duration, Instant};

use burn::collective::{
    AllReduceStrategy, CollectiveConfig, PeerId, ReduceOperation, all_reduce, finish_collective,
    register,
};
use burn::module::{AutodiffModule, ModuleMapper, ModuleVisitor, Param};
use burn::optim::GradientsParams;
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::ops::FloatTensor;
use burn::tensor::{FloatDType, TensorPrimitive};
use burn_communication::Address;
use kiln_core::launch::NodeSettings;

use kiln_experiment_db::{HEARTBEAT_INTERVAL, Pulse};

use crate::CoordinatorError;

/// Status numbers sent with each step's gradients.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub(crate) struct Status {
    /// The worker's loss, weighted by its share of the global batch (summed: the
    /// global batch's mean loss).
    pub loss: f64,
    /// 1 when the worker was asked to stop.
    pub stop: f64,
    /// 1 when the worker failed.
    pub failed: f64,
    /// 1 when rank 0's time-based checkpoint interval has elapsed.
    pub save_due: f64,
    /// Rank 0's run id in the experiment store plus one (0: none), in two exact
    /// f32 halves of 24 bits: a node that outlives node 0 can end the run FAILED.
    pub run: (f64, f64),
    /// 1 from every worker: the sum is the number of workers that took part.
    pub present: f64,
}

const STATUS_LEN: usize = 7;
const HALF: i64 = 1 << 24;

impl Status {
    fn to_vec(self) -> [f32; STATUS_LEN] {
        [
            self.loss as f32,
            self.stop as f32,
            self.failed as f32,
            self.save_due as f32,
            self.run.0 as f32,
            self.run.1 as f32,
            1.0,
        ]
    }

    fn from_slice(v: &[f32]) -> Self {
        Self {
            loss: v[0] as f64,
            stop: v[1] as f64,
            failed: v[2] as f64,
            save_due: v[3] as f64,
            run: (v[4] as f64, v[5] as f64),
            present: v[6] as f64,
        }
    }

    /// Carries `run` (rank 0's run id).
    pub fn with_run(self, run: Option<i64>) -> Self {
        let run = match run {
            Some(id) if (0..HALF * HALF - 1).contains(&id) => {
                (((id + 1) / HALF) as f64, ((id + 1) % HALF) as f64)
            }
            _ => (0.0, 0.0),
        };
        Self { run, ..self }
    }

    /// The run id carried, if any.
    pub fn run_id(&self) -> Option<i64> {
        let id = self.run.0 as i64 * HALF + self.run.1 as i64;
        (id > 0).then_some(id - 1)
    }
}

/// How the workers of this process reach those of the other nodes; built once per
/// run by [`Link::open`].
#[derive(Debug, Clone)]
pub(crate) struct Link {
    num_nodes: u32,
    node_rank: u32,
    orchestrator: Address,
    /// This node's two data addresses (even and odd exchanges) and their ports.
    node_addresses: [Address; 2],
    data_ports: [u16; 2],
    timeout: Duration,
    /// The run's heartbeats, sent while an exchange waits (node 0, which keeps the
    /// books, has them once its run is recorded); shared by the link's clones.
    pulse: Arc<Mutex<Option<Pulse>>>,
}

impl Link {
    /// Checks that this node can take part before any training: its data port is
    /// free, node 0's orchestrator port is free (node 0, which then starts the
    /// orchestrator) or reachable (the others) within the timeout.
    pub fn open(num_nodes: u32, node: &NodeSettings) -> Result<Self, CoordinatorError> {
        node.validate(num_nodes)?;
        let timeout = Duration::from_secs_f64(node.timeout_s);
        let data_ports = node.data_ports(node.node_rank, num_nodes);
        let master = format!("{}:{}", node.master_addr, node.master_port);
        if node.node_rank == 0 {
            start_orchestrator(node.master_port)?;
        }
        for port in data_ports {
            free_port(
                port,
                format!(
                    "a data port of node {} (master_port + 1 + node_rank, and + num_nodes)",
                    node.node_rank
                ),
            )?;
        }
        let addrs: Vec<_> = master
            .to_socket_addrs()
            .map_err(|e| {
                CoordinatorError::Collective(format!(
                    "cannot resolve the master address {master}: {e} (set MASTER_ADDR or \
                     --master-addr to node 0's host)"
                ))
            })?
            .collect();
        let started = Instant::now();
        let reached = loop {
            let left = timeout.saturating_sub(started.elapsed());
            let attempt = Duration::from_secs(2)
                .min(left)
                .max(Duration::from_millis(10));
            if addrs
                .iter()
                .any(|a| TcpStream::connect_timeout(a, attempt).is_ok())
            {
                break true;
            }
            if started.elapsed() >= timeout {
                break false;
            }
            std::thread::sleep(Duration::from_millis(200).min(left));
        };
        if !reached {
            return Err(CoordinatorError::Collective(format!(
                "node {}: cannot reach the master at {master} within {:.0} s: nothing \
                 answers there (node 0 hosts the orchestrator on master_port). Check \
                 MASTER_ADDR/--master-addr and MASTER_PORT/--master-port, that node 0 \
                 is running, and that the port is open",
                node.node_rank,
                timeout.as_secs_f64()
            )));
        }
        let host = match &node.node_addr {
            Some(host) => host.clone(),
            None if node.master_is_loopback() => "127.0.0.1".into(),
            None => route_to(&addrs).ok_or_else(|| {
                CoordinatorError::Collective(format!(
                    "node {}: cannot tell this machine's address on the route to {master}; \
                     give it with --node-addr (KILN_NODE_ADDR)",
                    node.node_rank
                ))
            })?,
        };
        Ok(Self {
            num_nodes,
            node_rank: node.node_rank,
            orchestrator: ws(&master),
            node_addresses: data_ports.map(|port| ws(&format!("{host}:{port}"))),
            data_ports,
            timeout,
            pulse: Arc::default(),
        })
    }

    /// Sends the run's heartbeats through `pulse` whenever an exchange has waited
    /// [`HEARTBEAT_INTERVAL`]: a node waiting minutes for a slow one (up to the node
    /// timeout) is alive, and its run must not read LOST.
    pub fn beat_while_waiting(&self, pulse: Pulse) {
        *self.pulse.lock().unwrap_or_else(PoisonError::into_inner) = Some(pulse);
    }

    /// One heartbeat, when the link has a pulse; a failed one is logged.
    fn beat(&self) {
        let pulse = self
            .pulse
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        if let Some(Err(e)) = pulse.map(|p| p.beat()) {
            tracing::warn!("heartbeat during an exchange failed: {e}");
        }
    }

    /// This node's rank.
    pub fn node_rank(&self) -> u32 {
        self.node_rank
    }

    /// The other nodes, for error messages: "node 1", "nodes 0 and 2", ...
    fn others(&self) -> String {
        let others: Vec<String> = (0..self.num_nodes)
            .filter(|&n| n != self.node_rank)
            .map(|n| n.to_string())
            .collect();
        match others.as_slice() {
            [one] => format!("node {one}"),
            [rest @ .., last] => format!("one of nodes {} and {last}", rest.join(", ")),
            [] => "no other node".into(),
        }
    }
}

fn ws(host_port: &str) -> Address {
    // burn-communication wants the scheme (memo §4.2); parsing a string never fails.
    format!("ws://{host_port}")
        .parse()
        .unwrap_or_else(|_: String| unreachable!("Address::from_str is infallible"))
}

/// The local address of this machine's route to `addrs` (no packet is sent).
fn route_to(addrs: &[std::net::SocketAddr]) -> Option<String> {
    let addr = addrs.first()?;
    let bind = if addr.is_ipv4() {
        "0.0.0.0:0"
    } else {
        "[::]:0"
    };
    let socket = std::net::UdpSocket::bind(bind).ok()?;
    socket.connect(addr).ok()?;
    Some(socket.local_addr().ok()?.ip().to_string())
}

/// Fails naming `what` when nothing can listen on `port` (burn-communication
/// listens on every interface).
fn free_port(port: u16, what: String) -> Result<(), CoordinatorError> {
    TcpListener::bind(("0.0.0.0", port)).map(drop).map_err(|e| {
        CoordinatorError::Collective(format!(
            "port {port}, {what}, cannot be listened on: {e} (another run on this \
             machine? choose another --master-port)"
        ))
    })
}

/// Starts burn-collective's orchestrator on `port` in this process, once: it then
/// serves every multi-node run of the process until it exits (or until SIGINT or
/// SIGTERM, which it listens for itself).
fn start_orchestrator(port: u16) -> Result<(), CoordinatorError> {
    static STARTED: OnceLock<u16> = OnceLock::new();
    if let Some(&running) = STARTED.get() {
        return match running == port {
            true => Ok(()),
            false => Err(CoordinatorError::NotAvailable {
                what: format!("master_port {port}"),
                reason: format!(
                    "this process already hosts the orchestrator on port {running}; a \
                     process hosts one"
                ),
            }),
        };
    }
    free_port(port, "the orchestrator's (master_port, node 0)".into())?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .map_err(|e| CoordinatorError::Collective(format!("cannot start the orchestrator: {e}")))?;
    std::thread::Builder::new()
        .name("kiln-orchestrator".into())
        .spawn(move || {
            runtime.block_on(burn_collective::start_global_orchestrator(port));
            tracing::warn!(port, "the orchestrator stopped");
        })
        .map_err(|e| CoordinatorError::Collective(format!("cannot start the orchestrator: {e}")))?;
    let _ = STARTED.set(port);
    // Listening within a few seconds, or the first exchange will say so.
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(5)
        && TcpStream::connect(("127.0.0.1", port)).is_err()
    {
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// One registered worker of a data-parallel group.
pub(crate) struct Peer<B: AutodiffBackend> {
    id: PeerId,
    world: usize,
    device: B::Device,
    config: CollectiveConfig,
    link: Option<Link>,
    /// Exchanges across nodes so far (their parity picks the data port).
    exchanges: std::sync::atomic::AtomicU64,
    backend: PhantomData<B>,
}

impl<B: AutodiffBackend> Peer<B> {
    /// Joins worker `rank` of `world` (`local` of them in this process) on
    /// `device`. Within one node this returns once every local worker has
    /// registered; across nodes ([`Link`]) each exchange registers anew.
    pub fn register(
        rank: usize,
        world: usize,
        local: usize,
        device: &B::Device,
        link: Option<&Link>,
    ) -> Result<Self, CoordinatorError> {
        let id = PeerId::from(rank as u32);
        let mut config = CollectiveConfig::default().with_num_devices(local);
        if let Some(link) = link {
            config = config
                .with_num_nodes(link.num_nodes)
                .with_global_address(link.orchestrator.clone())
                .with_global_all_reduce_strategy(AllReduceStrategy::Ring);
        } else {
            register::<B::InnerBackend>(id, device.clone(), config.clone())
                .map_err(|e| collective_error("register", rank, e))?;
        }
        Ok(Self {
            id,
            world,
            device: device.clone(),
            config,
            link: link.cloned(),
            exchanges: std::sync::atomic::AtomicU64::new(0),
            backend: PhantomData,
        })
    }

    /// Leaves the group.
    pub fn finish(&self) -> Result<(), CoordinatorError> {
        if self.link.is_some() {
            // Each exchange already finished its registration.
            return Ok(());
        }
        finish_collective::<B::InnerBackend>(self.id)
            .map_err(|e| collective_error("finish", self.id.0 as usize, e))
    }

    /// Sums `grads` (zeros for a worker that has none) and `status` over the group.
    /// `at` names the exchange in errors ("step 12").
    pub fn sum_step<M: AutodiffModule<B>>(
        &self,
        model: &M,
        grads: Option<&GradientsParams>,
        status: Status,
        at: &str,
    ) -> Result<(GradientsParams, Status), CoordinatorError> {
        let mut flatten = Flatten::<B> {
            parts: Vec::new(),
            source: Source::Grads(grads),
        };
        model.visit(&mut flatten);
        let (flat, n) = self.sum(flatten.parts, status, at)?;
        let mut unflatten = Unflatten::<B> {
            flat: &flat,
            offset: 0,
            grads: GradientsParams::new(),
        };
        model.visit(&mut unflatten);
        let grads = unflatten.grads;
        Ok((grads, self.status(&flat, n, at)?))
    }

    /// Sums only `status` over the group (the gradients are summed elsewhere: by
    /// the backend's synchronisation during backward).
    #[cfg_attr(not(feature = "learner"), allow(dead_code))]
    pub fn sum_status(&self, status: Status, at: &str) -> Result<Status, CoordinatorError> {
        let (flat, n) = self.sum(Vec::new(), status, at)?;
        self.status(&flat, n, at)
    }

    /// The summed status numbers at `n` in `flat`; checks that every worker took
    /// part.
    fn status(
        &self,
        flat: &Tensor<B::InnerBackend, 1>,
        n: usize,
        at: &str,
    ) -> Result<Status, CoordinatorError> {
        let status = Status::from_slice(
            &flat
                .clone()
                .narrow(0, n, STATUS_LEN)
                .into_data()
                .to_vec::<f32>()
                .map_err(|e| {
                    CoordinatorError::Collective(format!("cannot read the status numbers: {e:?}"))
                })?,
        );
        if status.present.round() as usize != self.world {
            return Err(CoordinatorError::Collective(format!(
                "the exchange of {at} summed {} workers' numbers instead of {}: the \
                 group came apart (burn-collective 0.21 mixed two exchanges up)",
                status.present, self.world
            )));
        }
        Ok(status)
    }

    /// Sums the parameters `owned` selects (zeros elsewhere) over the group and puts
    /// the sums into `model`: each parameter ends up with its owner's value.
    pub fn gather_params<M: AutodiffModule<B>>(
        &self,
        model: M,
        owned: &dyn Fn(usize) -> bool,
    ) -> Result<M, CoordinatorError> {
        let mut flatten = Flatten::<B> {
            parts: Vec::new(),
            source: Source::Params(owned, 0),
        };
        model.visit(&mut flatten);
        let (flat, n) = self.sum(flatten.parts, Status::default(), "the fsdp parameters")?;
        self.status(&flat, n, "the fsdp parameters")?;
        Ok(model.map(&mut Replace::<B> {
            flat: &flat,
            offset: 0,
        }))
    }

    /// The group's first exchange: the largest difference between this worker's
    /// parameters and their mean over the group, the largest parameter magnitude
    /// (the first is zero, to float rounding, when every replica holds the same
    /// weights), and rank 0's run id (`run`, given by rank 0).
    pub fn replica_spread<M: AutodiffModule<B>>(
        &self,
        model: &M,
        run: Option<i64>,
    ) -> Result<(f64, f64, Option<i64>), CoordinatorError> {
        let mut flatten = Flatten::<B> {
            parts: Vec::new(),
            source: Source::Params(&|_| true, 0),
        };
        model.visit(&mut flatten);
        let mine = Tensor::cat(flatten.parts.clone(), 0);
        let at = "the start (every worker joining)";
        let (sum, n) = self.sum(flatten.parts, Status::default().with_run(run), at)?;
        let status = self.status(&sum, n, at)?;
        let mean = sum.narrow(0, 0, n).div_scalar(self.world as f64);
        let scale = mine.clone().abs().max().into_scalar().elem::<f64>();
        let spread = (mean - mine).abs().max().into_scalar().elem::<f64>();
        Ok((spread, scale, status.run_id()))
    }

    /// All-reduces `parts` followed by `status`; returns the sum and the length of
    /// the parts.
    fn sum(
        &self,
        parts: Vec<Tensor<B::InnerBackend, 1>>,
        status: Status,
        at: &str,
    ) -> Result<(Tensor<B::InnerBackend, 1>, usize), CoordinatorError> {
        let n: usize = parts.iter().map(|t| t.dims()[0]).sum();
        let mut parts = parts;
        parts.push(Tensor::from_floats(status.to_vec(), &self.device));
        let flat = Tensor::cat(parts, 0);
        let primitive = match flat.into_primitive() {
            TensorPrimitive::Float(p) => p,
            TensorPrimitive::QFloat(_) => {
                return Err(CoordinatorError::Collective(
                    "quantized tensors cannot be all-reduced".into(),
                ));
            }
        };
        let summed = match &self.link {
            None => all_reduce::<B::InnerBackend>(self.id, primitive, ReduceOperation::Sum)
                .map_err(|e| collective_error("all-reduce", self.id.0 as usize, e))?,
            // Asked to stop: node 0's orchestrator may be stopping too (it listens
            // for SIGINT itself), so the last exchange waits less.
            Some(link) => self.global_sum(primitive, link, at, status.stop > 0.0)?,
        };
        Ok((Tensor::from_primitive(TensorPrimitive::Float(summed)), n))
    }

    /// Register, all-reduce, finish across nodes, on a helper thread waited for
    /// at most the link's timeout (a timed-out helper is left blocked: this
    /// process's collective server is unusable afterwards, and the run fails).
    fn global_sum(
        &self,
        tensor: FloatTensor<B::InnerBackend>,
        link: &Link,
        at: &str,
        stopping: bool,
    ) -> Result<FloatTensor<B::InnerBackend>, CoordinatorError> {
        const REGISTERING: u8 = 0;
        const REDUCING: u8 = 1;
        const FINISHING: u8 = 2;
        let phase = Arc::new(AtomicU8::new(REGISTERING));
        let (tx, rx) = mpsc::channel();
        // Every worker of a node is at the same exchange, so they agree on the port.
        let parity = (self
            .exchanges
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            % 2) as usize;
        let config = self
            .config
            .clone()
            .with_node_address(link.node_addresses[parity].clone())
            .with_data_service_port(link.data_ports[parity]);
        let (id, device) = (self.id, self.device.clone());
        let rank = id.0 as usize;
        let helper_phase = phase.clone();
        std::thread::Builder::new()
            .name(format!("kiln-exchange-{rank}"))
            .spawn(move || {
                let result = (|| {
                    register::<B::InnerBackend>(id, device, config)
                        .map_err(|e| ("register", format!("{e:?}")))?;
                    helper_phase.store(REDUCING, Ordering::SeqCst);
                    let summed = all_reduce::<B::InnerBackend>(id, tensor, ReduceOperation::Sum)
                        .map_err(|e| ("all-reduce", format!("{e:?}")));
                    helper_phase.store(FINISHING, Ordering::SeqCst);
                    let finished = finish_collective::<B::InnerBackend>(id)
                        .map_err(|e| ("finish", format!("{e:?}")));
                    let summed = summed?;
                    finished.map(|()| summed)
                })();
                let _ = tx.send(result);
            })
            .map_err(|e| CoordinatorError::Collective(format!("cannot start an exchange: {e}")))?;
        let timeout = match stopping {
            true => link.timeout.min(Duration::from_secs(10)),
            false => link.timeout,
        };
        let node = link.node_rank;
        match recv_beating(&rx, timeout, HEARTBEAT_INTERVAL, || link.beat()) {
            Ok(Ok(summed)) => Ok(summed),
            Ok(Err((what, e))) if e.contains("RegisterParamsMismatch") => {
                Err(CoordinatorError::Collective(format!(
                    "node {node}: the nodes disagree on the number of nodes at {at} (this \
                     node was started with num_nodes {}): start every node with the same \
                     --num-nodes / WORLD_SIZE ({what}: {e})",
                    link.num_nodes
                )))
            }
            Ok(Err((what, e))) if e.contains("DoubleRegister") => {
                Err(CoordinatorError::Collective(format!(
                    "node {node}: another node registered this node's address {} at {at}: \
                     two nodes were given the same node rank? ({what}: {e})",
                    link.node_addresses[parity]
                )))
            }
            Ok(Err((what, e))) => Err(CoordinatorError::Collective(format!(
                "node {node}: the exchange of {at} failed in burn-collective's {what}: {e} \
                 (is {} still running?)",
                link.others()
            ))),
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                Err(CoordinatorError::Collective(format!(
                    "node {node}: the exchange of {at} broke off inside burn-collective (a \
                 connection to {} failed; its message is above): every node ends the run",
                    link.others()
                )))
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                let waiting = match phase.load(Ordering::SeqCst) {
                    REGISTERING => "to join it at the orchestrator",
                    REDUCING => "to send its part of the all-reduce",
                    _ => "to leave the exchange",
                };
                Err(CoordinatorError::Collective(format!(
                    "node {node}: the exchange of {at} did not complete within {:.0} s: \
                     waited for {} {waiting}. It died, stalled or was never started \
                     (or the nodes were given different settings); every node ends the \
                     run",
                    timeout.as_secs_f64(),
                    link.others(),
                )))
            }
        }
    }
}

/// Waits at most `timeout` for `rx`, calling `beat` each time `interval` has passed
/// without an answer.
fn recv_beating<T>(
    rx: &mpsc::Receiver<T>,
    timeout: Duration,
    interval: Duration,
    beat: impl Fn(),
) -> Result<T, mpsc::RecvTimeoutError> {
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left.min(interval)) {
            Err(mpsc::RecvTimeoutError::Timeout) if Instant::now() < deadline => beat(),
            received => return received,
        }
    }
}

/// Releases every worker of this process waiting in an exchange on backend `B`: a
/// worker that will never come (it panicked outside its steps) would otherwise keep
/// them there. burn-collective's local server forgets its peers and pending
/// operations; their calls end with an error (the server is usable again for the
/// next group).
pub(crate) fn release_local_exchanges<B: Backend>() {
    burn::collective::reset_collective::<B>();
}

fn collective_error(what: &str, rank: usize, e: impl std::fmt::Debug) -> CoordinatorError {
    CoordinatorError::Collective(format!("{what} failed on worker {rank}: {e:?}"))
}

enum Source<'a> {
    /// The gradients (zeros where missing or when there are none).
    Grads(Option<&'a GradientsParams>),
    /// The parameter values the predicate selects by visiting index (zeros
    /// elsewhere), and the next index.
    Params(&'a dyn Fn(usize) -> bool, usize),
}

struct Flatten<'a, B: AutodiffBackend> {
    parts: Vec<Tensor<B::InnerBackend, 1>>,
    source: Source<'a>,
}

impl<B: AutodiffBackend> ModuleVisitor<B> for Flatten<'_, B> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        let value = param.val().inner();
        let n = value.shape().num_elements();
        let device = value.device();
        let part = match &mut self.source {
            Source::Grads(grads) => grads
                .and_then(|g| g.get::<B::InnerBackend, D>(param.id))
                .map(|g| g.reshape([n]))
                .unwrap_or_else(|| Tensor::zeros([n], &device)),
            Source::Params(owned, index) => {
                let mine = owned(*index);
                *index += 1;
                match mine {
                    true => value.reshape([n]),
                    false => Tensor::zeros([n], &device),
                }
            }
        };
        // Exchanged in f32 (the status numbers are f32; bf16-true and 16-true
        // parameters and gradients are cast back on arrival).
        self.parts.push(part.cast(FloatDType::F32));
    }
}

struct Unflatten<'a, B: AutodiffBackend> {
    flat: &'a Tensor<B::InnerBackend, 1>,
    offset: usize,
    grads: GradientsParams,
}

impl<B: AutodiffBackend> ModuleVisitor<B> for Unflatten<'_, B> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        let value = param.val();
        let shape = value.shape();
        let n = shape.num_elements();
        let part = self.flat.clone().narrow(0, self.offset, n).reshape(shape);
        self.offset += n;
        self.grads
            .register::<B::InnerBackend, D>(param.id, part.cast(value.dtype()));
    }
}

struct Replace<'a, B: AutodiffBackend> {
    flat: &'a Tensor<B::InnerBackend, 1>,
    offset: usize,
}

impl<B: AutodiffBackend> ModuleMapper<B> for Replace<'_, B> {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        let (id, tensor, mapper) = param.consume();
        let shape = tensor.shape();
        let n = shape.num_elements();
        let part = self.flat.clone().narrow(0, self.offset, n).reshape(shape);
        self.offset += n;
        let mut value = Tensor::<B, D>::from_inner(part.cast(tensor.dtype()));
        if tensor.is_require_grad() {
            value = value.require_grad();
        }
        Param::from_mapped_value(id, value, mapper)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rstest::rstest;

    #[rstest]
    #[case(None)]
    #[case(Some(0))]
    #[case(Some(41))]
    #[case(Some(HALF - 1))]
    #[case(Some(HALF * 1000 + 7))]
    fn the_run_id_travels_exactly_in_f32(#[case] id: Option<i64>) {
        let status = Status::default().with_run(id);
        let sent = status.to_vec();
        // What arrives is the sum over workers: rank 0's numbers plus zeros.
        let summed: Vec<f32> = sent.iter().map(|v| v + 0.0).collect();
        assert_eq!(Status::from_slice(&summed).run_id(), id);
    }

    #[test]
    fn the_other_nodes_are_named() {
        let link = |num_nodes, node_rank| Link {
            num_nodes,
            node_rank,
            orchestrator: ws("h:1"),
            node_addresses: [ws("h:2"), ws("h:3")],
            data_ports: [2, 3],
            timeout: Duration::from_secs(1),
            pulse: Arc::default(),
        };
        assert_eq!(link(2, 0).others(), "node 1");
        assert_eq!(link(2, 1).others(), "node 0");
        assert_eq!(link(4, 2).others(), "one of nodes 0, 1 and 3");
    }

    /// A wait beats at every interval without an answer, and returns the answer when
    /// it comes: here the third beat sends it, so there are exactly three beats.
    #[test]
    fn a_long_wait_beats_until_the_answer_comes() {
        let (tx, rx) = mpsc::channel();
        let beats = std::sync::atomic::AtomicUsize::new(0);
        let got = recv_beating(
            &rx,
            Duration::from_secs(60),
            Duration::from_millis(5),
            || {
                if beats.fetch_add(1, Ordering::SeqCst) + 1 == 3 {
                    tx.send(7).unwrap();
                }
            },
        );
        assert_eq!(got, Ok(7));
        assert_eq!(beats.load(Ordering::SeqCst), 3);
    }

    #[test]
    fn a_wait_without_an_answer_ends_at_its_timeout() {
        let (_tx, rx) = mpsc::channel::<()>();
        let beats = std::sync::atomic::AtomicUsize::new(0);
        let got = recv_beating(
            &rx,
            Duration::from_millis(30),
            Duration::from_millis(5),
            || {
                beats.fetch_add(1, Ordering::SeqCst);
            },
        );
        assert_eq!(got, Err(mpsc::RecvTimeoutError::Timeout));
        assert!(beats.load(Ordering::SeqCst) >= 1);
    }
}

//! Strategy resolution: what will actually run. See `docs/strategies.md`.

use kiln_core::{
    CoordinatorConfig, Engine, Precision, ProcessGroupBackend, ProgressMode, ResolvedPlan, Strategy,
};

use crate::{CoordinatorError, Result};

/// Resolves `config` against the backend and the number of devices present.
///
/// | asked | devices resolved | runs |
/// | --- | --- | --- |
/// | `auto`, `single` | 1 | `single`: the Learner engine (burn-train), or the native loop with a warning when the `learner` feature is not compiled in |
/// | `vanilla` | 1 | `single` on kiln's native loop, in any build |
/// | `ddp`, `ddp_spawn`, `fsdp` | 1 | as `auto`, with a warning (nothing to distribute) |
/// | `auto`, `ddp` | > 1 | `ddp`: one worker per device, on the Learner engine (burn-train, through kiln's custom training strategy) or the native loop |
/// | `ddp_spawn` | > 1 | `ddp`, with a warning (threads need no spawn) |
/// | `fsdp` | > 1 | `fsdp` (optimizer state sharded, ZeRO-1), on either engine |
/// | `single`, `vanilla` | > 1 | error: these run on one device |
/// | `auto`, `ddp`, `ddp_spawn`, `num_nodes > 1` | any | `ddp` on the native loop across every worker of every node (`docs/multi-node.md`) |
/// | `fsdp`, `num_nodes > 1` | | not available: its checkpoints gather the optimizer shards in one process |
/// | `single`, `vanilla`, `num_nodes > 1` | | error: these run on one device |
/// | precision | | as asked here; the coordinator then checks it against the backend's dtypes (`precision.rs`) |
///
/// The engine: `engine` when set (`learner` is refused for `vanilla`, across nodes
/// and in a build without the `learner` feature), else the Learner engine when it
/// is compiled in, except for `vanilla` and multi-node runs (native loop).
///
/// `progress = tui` (burn-train's dashboard) needs the Learner engine and the
/// `tui` feature; otherwise it is an error naming what is missing.
pub fn resolve_plan(
    config: &CoordinatorConfig,
    backend: &str,
    available_devices: usize,
) -> Result<ResolvedPlan> {
    config.validate()?;
    let selection = config.devices.select(available_devices)?;
    let n = selection.indices.len();
    let nodes = config.num_nodes as usize;
    let mut warnings = Vec::new();
    let strategy = match (config.strategy, n * nodes) {
        (Strategy::Auto | Strategy::Single | Strategy::Vanilla, 1) => Strategy::Single,
        (Strategy::Ddp | Strategy::DdpSpawn | Strategy::Fsdp, 1) => {
            warnings.push(format!(
                "strategy {} with one device runs as single (nothing to distribute)",
                config.strategy
            ));
            Strategy::Single
        }
        (Strategy::Single | Strategy::Vanilla, _) if nodes > 1 => {
            return Err(kiln_core::Error::invalid(
                "strategy",
                config.strategy,
                format!(
                    "ddp or auto with num_nodes {nodes} (single and vanilla run on one device)"
                ),
            )
            .into());
        }
        (Strategy::Single | Strategy::Vanilla, _) => {
            return Err(kiln_core::Error::invalid(
                "devices",
                &config.devices,
                format!(
                    "one device for strategy {} (use ddp for {n})",
                    config.strategy
                ),
            )
            .into());
        }
        (Strategy::Fsdp, _) if nodes > 1 => {
            return Err(CoordinatorError::NotAvailable {
                what: format!("strategy fsdp with num_nodes {nodes}"),
                reason: "kiln's fsdp (optimizer state sharded across workers) gathers a \
                         checkpoint's shards inside one process; across nodes use ddp"
                    .into(),
            });
        }
        (Strategy::Fsdp, _) => Strategy::Fsdp,
        (Strategy::DdpSpawn, _) => {
            warnings.push(
                "strategy ddp_spawn runs as ddp (kiln's workers are threads: there is \
                 nothing to spawn)"
                    .to_string(),
            );
            Strategy::Ddp
        }
        _ => Strategy::Ddp,
    };
    let engine = resolve_engine(config, &mut warnings)?;
    if config.progress == ProgressMode::Tui {
        if engine != Engine::Learner {
            return Err(kiln_core::Error::invalid(
                "progress",
                "tui",
                "auto, bar, lines or off with the native loop (the dashboard is \
                 burn-train's: it needs the Learner engine, strategy auto or single)",
            )
            .into());
        }
        if !cfg!(feature = "tui") {
            return Err(CoordinatorError::NotAvailable {
                what: "progress tui".into(),
                reason: "this build of kiln-coordinator lacks its `tui` feature (the \
                         `kiln` binary: build with `--features tui`)"
                    .into(),
            });
        }
    }
    Ok(ResolvedPlan {
        engine,
        strategy,
        devices: selection.indices,
        num_nodes: config.num_nodes,
        node_rank: config.node.node_rank,
        world_size: n * nodes,
        precision: config.precision,
        backend: backend.to_string(),
        process_group_backend: None,
        warnings,
    })
}

/// What carries the gradients of `plan`'s group, once its engine is final (the
/// coordinator may move a plan to the native loop for its precision): sets
/// `plan.process_group_backend` (`None` with one worker). `nccl`: whether the
/// `cuda-nccl` feature is compiled in, and whether the caller brought burn's NCCL
/// synchronisation (`TrainingCoordinator::train_on_nccl`, only in such builds).
///
/// `auto` takes NCCL when it is offered and can run the plan (the Learner engine,
/// one node, `32-true`), else burn-collective; `nccl` where it cannot run is an error naming
/// what is missing.
pub(crate) fn resolve_process_group(
    config: &CoordinatorConfig,
    plan: &mut ResolvedPlan,
    (nccl_compiled, nccl_offered): (bool, bool),
) -> Result<()> {
    let asked = config.process_group_backend;
    if plan.world_size == 1 {
        if asked == Some(ProcessGroupBackend::Nccl) {
            plan.warnings
                .push("process_group_backend nccl with one worker: nothing to synchronise".into());
        }
        plan.process_group_backend = None;
        return Ok(());
    }
    let nodes = plan.num_nodes;
    let learner = plan.engine == Engine::Learner;
    let chosen = match asked {
        Some(ProcessGroupBackend::Collective) => ProcessGroupBackend::Collective,
        Some(ProcessGroupBackend::Nccl) if !nccl_compiled => {
            return Err(CoordinatorError::NotAvailable {
                what: "process_group_backend nccl".into(),
                reason: "this build of kiln-coordinator lacks its `cuda-nccl` feature (the \
                         `kiln` binary: build it with `--features cuda-nccl`, a CUDA-only \
                         build)"
                    .into(),
            });
        }
        Some(ProcessGroupBackend::Nccl) if nodes > 1 => {
            return Err(CoordinatorError::NotAvailable {
                what: format!("process_group_backend nccl with num_nodes {nodes}"),
                reason: "burn-train's NCCL synchronisation runs inside one process; across \
                         nodes kiln's groups exchange through burn-collective (auto or \
                         collective)"
                    .into(),
            });
        }
        Some(ProcessGroupBackend::Nccl) if !learner => {
            return Err(kiln_core::Error::invalid(
                "process_group_backend",
                "nccl",
                format!(
                    "auto or collective with engine {} (NCCL synchronisation runs through \
                     burn-train's Learner: engine auto or learner, precision 32-true)",
                    plan.engine
                ),
            )
            .into());
        }
        Some(ProcessGroupBackend::Nccl) if plan.precision != Precision::F32 => {
            return Err(kiln_core::Error::invalid(
                "process_group_backend",
                "nccl",
                format!(
                    "auto or collective with precision {} (NCCL synchronisation runs in \
                     precision 32-true)",
                    plan.precision
                ),
            )
            .into());
        }
        Some(ProcessGroupBackend::Nccl) if !nccl_offered => {
            return Err(CoordinatorError::NotAvailable {
                what: format!("process_group_backend nccl on backend {}", plan.backend),
                reason: "NCCL synchronises CUDA devices: train with `kiln train --backend \
                         cuda` (library: `TrainingCoordinator::train_on_nccl`)"
                    .into(),
            });
        }
        Some(ProcessGroupBackend::Nccl) => ProcessGroupBackend::Nccl,
        None if nccl_offered && learner && nodes == 1 && plan.precision == Precision::F32 => {
            ProcessGroupBackend::Nccl
        }
        None => ProcessGroupBackend::Collective,
    };
    plan.process_group_backend = Some(chosen);
    Ok(())
}

/// The engine of the plan: the one asked for, if it can run it, or kiln's choice.
fn resolve_engine(config: &CoordinatorConfig, warnings: &mut Vec<String>) -> Result<Engine> {
    let nodes = config.num_nodes;
    let learner_compiled = cfg!(feature = "learner");
    match (config.engine, config.strategy) {
        (Some(Engine::Learner), Strategy::Vanilla) => Err(kiln_core::Error::invalid(
            "engine",
            "learner",
            "auto or native with strategy vanilla (vanilla is kiln's native loop)",
        )
        .into()),
        (Some(Engine::Learner), _) if nodes > 1 => Err(CoordinatorError::NotAvailable {
            what: format!("engine learner with num_nodes {nodes}"),
            reason: "the Learner engine runs its workers in one process; across nodes \
                     kiln's native loop runs (engine auto or native)"
                .into(),
        }),
        (Some(Engine::Learner), _) if !learner_compiled => Err(CoordinatorError::NotAvailable {
            what: "engine learner".into(),
            reason: "this build of kiln-coordinator lacks its `learner` feature".into(),
        }),
        (Some(engine), _) => Ok(engine),
        (None, Strategy::Vanilla) => Ok(Engine::Native),
        // Across nodes the group runs on the native loop (docs/multi-node.md).
        (None, _) if nodes > 1 => Ok(Engine::Native),
        (None, _) if learner_compiled => Ok(Engine::Learner),
        (None, _) => {
            warnings.push(
                "the Learner engine is not compiled in (cargo feature `learner` of \
                 kiln-coordinator): kiln's native loop runs instead"
                    .to_string(),
            );
            Ok(Engine::Native)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_core::Devices;
    use rstest::rstest;

    fn cfg(strategy: &str, devices: &str) -> CoordinatorConfig {
        CoordinatorConfig {
            strategy: strategy.parse().unwrap(),
            devices: devices.parse().unwrap(),
            ..Default::default()
        }
    }

    #[rstest]
    #[case("auto", "auto", 1, Strategy::Single, 0)]
    #[case("single", "1", 1, Strategy::Single, 0)]
    #[case("vanilla", "auto", 1, Strategy::Single, 0)]
    #[case("ddp", "1", 1, Strategy::Single, 1)]
    #[case("ddp_spawn", "auto", 1, Strategy::Single, 1)]
    #[case("fsdp", "[0]", 1, Strategy::Single, 1)]
    fn one_device_resolves_to_single(
        #[case] strategy: &str,
        #[case] devices: &str,
        #[case] available: usize,
        #[case] want: Strategy,
        #[case] n_warnings: usize,
    ) {
        let plan = resolve_plan(&cfg(strategy, devices), "ndarray", available).unwrap();
        assert_eq!(plan.strategy, want);
        let native = strategy == "vanilla" || !cfg!(feature = "learner");
        assert_eq!(plan.engine == Engine::Native, native, "{plan}");
        assert_eq!(plan.world_size, 1);
        // Without the Learner engine, every strategy but vanilla also warns that the
        // native loop runs instead.
        let fallback = usize::from(strategy != "vanilla" && !cfg!(feature = "learner"));
        assert_eq!(
            plan.warnings.len(),
            n_warnings + fallback,
            "{:?}",
            plan.warnings
        );
    }

    fn nodes(strategy: &str, devices: &str, num_nodes: u32) -> CoordinatorConfig {
        CoordinatorConfig {
            num_nodes,
            node: kiln_core::launch::NodeSettings {
                node_rank: num_nodes - 1,
                ..Default::default()
            },
            ..cfg(strategy, devices)
        }
    }

    #[rstest]
    #[case("auto", "1", 2, 2)]
    #[case("ddp", "2", 2, 4)]
    #[case("ddp_spawn", "1", 3, 3)]
    fn several_nodes_resolve_to_ddp(
        #[case] strategy: &str,
        #[case] devices: &str,
        #[case] num_nodes: u32,
        #[case] world: usize,
    ) {
        let plan = resolve_plan(&nodes(strategy, devices, num_nodes), "flex", 2).unwrap();
        assert_eq!(
            (plan.strategy, plan.engine),
            (Strategy::Ddp, Engine::Native)
        );
        assert_eq!((plan.world_size, plan.node_rank), (world, num_nodes - 1));
        assert!(
            plan.to_string()
                .contains(&format!("node_rank={}", num_nodes - 1))
        );
    }

    #[rstest]
    #[case("single", "invalid strategy \"single\"")]
    #[case("vanilla", "ddp or auto with num_nodes 2")]
    #[case("fsdp", "not available")]
    fn what_cannot_run_on_several_nodes_says_so(#[case] strategy: &str, #[case] needle: &str) {
        let err = resolve_plan(&nodes(strategy, "1", 2), "flex", 1)
            .unwrap_err()
            .to_string();
        assert!(err.contains(needle), "{err}");
        // One line, as written: no run of spaces from a broken line continuation.
        assert!(!err.contains("  ") && !err.contains('\n'), "{err:?}");
    }

    #[rstest]
    #[case("ddp", "2", Strategy::Ddp, 0)]
    #[case("auto", "auto", Strategy::Ddp, 0)]
    #[case("ddp_spawn", "2", Strategy::Ddp, 1)]
    #[case("fsdp", "-1", Strategy::Fsdp, 0)]
    fn several_devices_resolve_to_data_parallel(
        #[case] strategy: &str,
        #[case] devices: &str,
        #[case] want: Strategy,
        #[case] n_warnings: usize,
    ) {
        let plan = resolve_plan(&cfg(strategy, devices), "ndarray", 2).unwrap();
        assert_eq!(plan.strategy, want);
        let learner = cfg!(feature = "learner");
        assert_eq!(plan.engine == Engine::Learner, learner, "{plan}");
        assert_eq!((plan.world_size, plan.devices.clone()), (2, vec![0, 1]));
        let fallback = usize::from(!learner);
        assert_eq!(
            plan.warnings.len(),
            n_warnings + fallback,
            "{:?}",
            plan.warnings
        );
    }

    #[rstest]
    #[case::native_ddp("ddp", "2", 1, "native", Ok(Engine::Native))]
    #[case::native_single("auto", "1", 1, "native", Ok(Engine::Native))]
    #[case::learner_vanilla(
        "vanilla",
        "1",
        1,
        "learner",
        Err("auto or native with strategy vanilla")
    )]
    #[case::learner_nodes("ddp", "1", 2, "learner", Err("engine learner with num_nodes 2"))]
    #[case::auto_nodes("ddp", "1", 2, "auto", Ok(Engine::Native))]
    fn an_engine_asked_for_runs_or_is_refused_by_name(
        #[case] strategy: &str,
        #[case] devices: &str,
        #[case] num_nodes: u32,
        #[case] engine: &str,
        #[case] want: std::result::Result<Engine, &str>,
    ) {
        let config = CoordinatorConfig {
            engine: Engine::parse_choice(engine).unwrap(),
            ..nodes(strategy, devices, num_nodes)
        };
        match (resolve_plan(&config, "flex", 2), want) {
            (Ok(plan), Ok(engine)) => assert_eq!(plan.engine, engine, "{plan}"),
            (Err(e), Err(needle)) => assert!(e.to_string().contains(needle), "{e}"),
            (got, want) => panic!("{got:?} vs {want:?}"),
        }
    }

    #[cfg(feature = "learner")]
    #[test]
    fn the_learner_engine_runs_a_group_when_asked() {
        let config = CoordinatorConfig {
            engine: Some(Engine::Learner),
            ..cfg("fsdp", "2")
        };
        let plan = resolve_plan(&config, "flex", 2).unwrap();
        assert_eq!(
            (plan.engine, plan.strategy),
            (Engine::Learner, Strategy::Fsdp)
        );
    }

    /// What carries the gradients, by what is asked, what the caller offers and the
    /// plan's engine and shape (the engine is set here, whatever this build
    /// resolves by itself; `nccl`: the feature compiled in, NCCL offered).
    #[rstest]
    #[case::auto_collective(
        "auto",
        2,
        1,
        Engine::Learner,
        (false, false),
        Ok(Some(ProcessGroupBackend::Collective))
    )]
    #[case::auto_nccl(
        "auto",
        2,
        1,
        Engine::Learner,
        (true, true),
        Ok(Some(ProcessGroupBackend::Nccl))
    )]
    #[case::auto_native(
        "auto",
        2,
        1,
        Engine::Native,
        (true, true),
        Ok(Some(ProcessGroupBackend::Collective))
    )]
    #[case::auto_nodes(
        "auto",
        1,
        2,
        Engine::Native,
        (true, true),
        Ok(Some(ProcessGroupBackend::Collective))
    )]
    #[case::one_worker("auto", 1, 1, Engine::Learner, (true, true), Ok(None))]
    #[case::nccl_one_worker("nccl", 1, 1, Engine::Learner, (true, true), Ok(None))]
    #[case::collective_asked(
        "collective",
        2,
        1,
        Engine::Learner,
        (true, true),
        Ok(Some(ProcessGroupBackend::Collective))
    )]
    #[case::nccl_not_compiled(
        "nccl",
        2,
        1,
        Engine::Learner,
        (false, false),
        Err("lacks its `cuda-nccl` feature")
    )]
    #[case::nccl_nodes(
        "nccl",
        1,
        2,
        Engine::Native,
        (true, true),
        Err("process_group_backend nccl with num_nodes 2")
    )]
    #[case::nccl_native(
        "nccl",
        2,
        1,
        Engine::Native,
        (true, true),
        Err("auto or collective with engine native")
    )]
    #[case::nccl_on_cpu(
        "nccl",
        2,
        1,
        Engine::Learner,
        (true, false),
        Err("process_group_backend nccl on backend flex")
    )]
    #[case::nccl(
        "nccl",
        2,
        1,
        Engine::Learner,
        (true, true),
        Ok(Some(ProcessGroupBackend::Nccl))
    )]
    fn the_process_group_backend_runs_or_is_refused_by_name(
        #[case] asked: &str,
        #[case] devices: usize,
        #[case] num_nodes: u32,
        #[case] engine: Engine,
        #[case] nccl: (bool, bool),
        #[case] want: std::result::Result<Option<ProcessGroupBackend>, &str>,
    ) {
        let config = CoordinatorConfig {
            process_group_backend: ProcessGroupBackend::parse_choice(asked).unwrap(),
            ..nodes("ddp", &devices.to_string(), num_nodes)
        };
        let mut plan = resolve_plan(&config, "flex", devices).unwrap();
        plan.engine = engine;
        let warnings = plan.warnings.len();
        match (resolve_process_group(&config, &mut plan, nccl), want) {
            (Ok(()), Ok(backend)) => assert_eq!(plan.process_group_backend, backend, "{plan}"),
            (Err(e), Err(needle)) => assert!(e.to_string().contains(needle), "{e}"),
            (got, want) => panic!("{got:?} vs {want:?} ({plan})"),
        }
        if asked == "nccl" && plan.world_size == 1 {
            assert_eq!(plan.warnings.len(), warnings + 1, "{:?}", plan.warnings);
        }
    }

    /// NCCL's synchronisation runs in `32-true` only: asked for in another
    /// precision it is refused by name, and `auto` takes burn-collective.
    #[rstest]
    #[case::asked("nccl", Err("precision bf16-mixed"))]
    #[case::auto("auto", Ok(Some(ProcessGroupBackend::Collective)))]
    fn nccl_runs_in_32_true_only(
        #[case] asked: &str,
        #[case] want: std::result::Result<Option<ProcessGroupBackend>, &str>,
    ) {
        let config = CoordinatorConfig {
            process_group_backend: ProcessGroupBackend::parse_choice(asked).unwrap(),
            ..nodes("ddp", "2", 1)
        };
        let mut plan = resolve_plan(&config, "cuda", 2).unwrap();
        plan.engine = Engine::Learner;
        plan.precision = Precision::Bf16Mixed;
        match (
            resolve_process_group(&config, &mut plan, (true, true)),
            want,
        ) {
            (Ok(()), Ok(backend)) => assert_eq!(plan.process_group_backend, backend, "{plan}"),
            (Err(e), Err(needle)) => assert!(e.to_string().contains(needle), "{e}"),
            (got, want) => panic!("{got:?} vs {want:?} ({plan})"),
        }
    }

    #[test]
    fn single_on_several_devices_is_a_config_error() {
        let err = resolve_plan(&cfg("single", "2"), "cuda", 2)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("invalid devices \"2\"") && err.contains("use ddp"),
            "{err}"
        );
    }

    #[test]
    fn more_devices_than_present_is_a_config_error() {
        let config = CoordinatorConfig {
            devices: Devices::Count(3),
            ..Default::default()
        };
        let err = resolve_plan(&config, "ndarray", 1).unwrap_err().to_string();
        assert!(err.contains("invalid devices \"3\""), "{err}");
    }
}

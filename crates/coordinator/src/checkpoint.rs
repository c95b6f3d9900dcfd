//! Checkpoints: everything needed to continue a run exactly, written so that a crash
//! at any moment never damages the previous good checkpoint.
//!
//! ```text
//! <run dir>/step_losses.f32   every step's loss, appended ([`crate::loss_log`])
//! <run dir>/checkpoints/
//!     step-00000120/
//!         model.mpk       model record, full precision (Burn's NamedMpk format)
//!         optim.mpk       optimizer record (the optimizer's state per parameter:
//!                         AdamW's moments, SGD's momentum, ...)
//!         scheduler.mpk   the learning-rate scheduler's record
//!         state.json      trainer state: step, epoch, batch position, seed, ...
//!         manifest.json   written last: sizes and sha256 of the files above,
//!                         kiln version, task and model signatures, world size
//!     .tmp-step-00000150/ a checkpoint being written (ignored, removed on the next run)
//! ```
//!
//! A checkpoint is written into a temporary directory, each file fsynced, then the
//! directory is renamed into place and its parent fsynced: a checkpoint either exists
//! whole (with its manifest) or not at all. Retention deletes old checkpoints only
//! after the new one is in place.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use burn::module::{Module, ModuleVisitor, Param};
use burn::prelude::*;
use burn::record::{FullPrecisionSettings, NamedMpkBytesRecorder, Record, Recorder};
use kiln_core::{CheckpointPolicy, CkptPath, CoordinatorConfig, MetricSummary, MonitorMode};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::CoordinatorError;

/// Layout version of a checkpoint directory.
const FORMAT: u32 = 1;
/// Name of the checkpoints directory inside a run directory.
pub(crate) const DIR: &str = "checkpoints";
const MODEL: &str = "model.mpk";
const OPTIM: &str = "optim.mpk";
/// The learning-rate scheduler's record (absent from checkpoints written before
/// kiln stepped a scheduler of the user's, whose schedule was a function of the
/// step).
const SCHEDULER: &str = "scheduler.mpk";
const STATE: &str = "state.json";
const MANIFEST: &str = "manifest.json";

type Bytes = NamedMpkBytesRecorder<FullPrecisionSettings>;

/// Where training stands, as saved in `state.json`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub(crate) struct TrainerState {
    /// Optimizer steps taken.
    pub step: u64,
    /// Epoch to continue in.
    pub epoch: usize,
    /// Next micro-batch of that epoch's permutation (a multiple of the accumulation
    /// group: checkpoints are only taken between optimizer steps).
    pub batch_in_epoch: usize,
    /// Epochs whose validation has run.
    pub epochs_completed: usize,
    /// The run's seed (data order is a function of seed and epoch).
    pub seed: u64,
    /// Examples trained on so far.
    pub samples: u64,
    /// Training seconds so far (validation excluded).
    pub train_seconds: f64,
    /// Loss of every optimizer step so far: kept in the run directory's append-only
    /// [`crate::loss_log`], not in `state.json` (read from it only in checkpoints
    /// written before, which held them), so that a checkpoint's size does not grow
    /// with the run.
    #[serde(default, skip_serializing)]
    pub step_losses: Vec<f32>,
    /// Metric summaries so far.
    pub summaries: BTreeMap<String, MetricSummary>,
    /// Run id in the experiment store, when the run is recorded.
    pub run_id: Option<i64>,
    /// Attempt number (1 for the first, +1 per resume).
    pub attempt: u32,
    /// Value of the policy's monitored metric when the checkpoint was taken.
    pub monitor: Option<f64>,
    /// `16-mixed`'s loss scaling (absent in every other mode).
    #[serde(default)]
    pub loss_scale: Option<crate::precision::ScalerState>,
}

/// What a checkpoint must match to be loaded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Signatures {
    /// The task kind as JSON.
    pub task: String,
    /// Parameter count and shapes, hashed.
    pub model: String,
    /// Workers in the run.
    pub world_size: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct FileEntry {
    name: String,
    size: u64,
    sha256: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Manifest {
    format: u32,
    kiln_version: String,
    step: u64,
    epoch: usize,
    signatures: Signatures,
    monitor: Option<f64>,
    files: Vec<FileEntry>,
}

/// A checkpoint read back and verified.
pub(crate) struct Loaded {
    pub dir: PathBuf,
    pub state: TrainerState,
    model: Vec<u8>,
    optim: Vec<u8>,
    scheduler: Option<Vec<u8>>,
}

impl Loaded {
    /// Loads the model record into `model`.
    pub fn model<B: Backend, M: Module<B>>(
        &self,
        model: M,
        device: &B::Device,
    ) -> Result<M, CoordinatorError> {
        let record = Bytes::default()
            .load::<M::Record>(self.model.clone(), device)
            .map_err(|e| {
                bad(
                    &self.dir.join(MODEL),
                    format!("cannot read the model record: {e}"),
                )
            })?;
        Ok(model.load_record(record))
    }

    /// The optimizer record.
    pub fn optim<B: Backend, R: Record<B>>(
        &self,
        device: &B::Device,
    ) -> Result<R, CoordinatorError> {
        Bytes::default()
            .load::<R>(self.optim.clone(), device)
            .map_err(|e| {
                bad(
                    &self.dir.join(OPTIM),
                    format!("cannot read the optimizer record: {e}"),
                )
            })
    }

    /// The learning-rate scheduler's record, when the checkpoint holds one.
    pub fn scheduler<B: Backend, R: Record<B>>(
        &self,
        device: &B::Device,
    ) -> Result<Option<R>, CoordinatorError> {
        let Some(bytes) = &self.scheduler else {
            return Ok(None);
        };
        Bytes::default()
            .load::<R>(bytes.clone(), device)
            .map(Some)
            .map_err(|e| {
                bad(
                    &self.dir.join(SCHEDULER),
                    format!("cannot read the scheduler record: {e}"),
                )
            })
    }
}

fn bad(path: &Path, reason: impl Into<String>) -> CoordinatorError {
    CoordinatorError::Checkpoint {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> CoordinatorError + '_ {
    move |e| CoordinatorError::io(path, e)
}

/// The signature of a model: its parameter shapes in visiting order, hashed.
pub(crate) fn model_signature<B: Backend, M: Module<B>>(model: &M) -> String {
    struct Shapes(Vec<String>);
    impl<B: Backend> ModuleVisitor<B> for Shapes {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            self.0.push(format!("{:?}", param.val().dims()));
        }
    }
    let mut shapes = Shapes(Vec::new());
    model.visit(&mut shapes);
    format!(
        "{} params, shapes sha256 {}",
        model.num_params(),
        hex(&Sha256::digest(shapes.0.join(";")))
    )
}

/// SHA-256 of a model's weights: every parameter's values as f32, little-endian,
/// in visiting order (see `TrainReport::weights_sha256`).
pub(crate) fn weights_sha256<B: Backend, M: Module<B>>(model: &M) -> String {
    struct Weights(Sha256);
    impl<B: Backend> ModuleVisitor<B> for Weights {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            let values = param
                .val()
                .cast(burn::tensor::FloatDType::F32)
                .into_data()
                .to_vec::<f32>()
                .unwrap_or_default();
            for v in values {
                self.0.update(v.to_le_bytes());
            }
        }
    }
    let mut weights = Weights(Sha256::new());
    model.visit(&mut weights);
    hex(&weights.0.finalize())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<FileEntry, CoordinatorError> {
    let mut f = File::create(path).map_err(io(path))?;
    f.write_all(bytes).map_err(io(path))?;
    f.sync_all().map_err(io(path))?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    Ok(FileEntry {
        name,
        size: bytes.len() as u64,
        sha256: hex(&Sha256::digest(bytes)),
    })
}

fn sync_dir(dir: &Path) -> Result<(), CoordinatorError> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(io(dir))
}

fn step_dir_name(step: u64) -> String {
    format!("step-{step:08}")
}

/// A model and its optimizer state, encoded: what a checkpoint writes, taken on the
/// training thread (cheap) and written by whichever thread keeps the run's books.
pub(crate) struct Snapshot {
    model: Vec<u8>,
    optim: Vec<u8>,
    scheduler: Option<Vec<u8>>,
}

impl Snapshot {
    /// Encodes `model` and the optimizer record `optim` (full precision).
    pub fn take<BM: Backend, M: Module<BM>, BR: Backend, R: Record<BR>>(
        model: &M,
        optim: R,
    ) -> Result<Self, CoordinatorError> {
        Self::with_optim(model, encode_record::<BR, R>(optim)?)
    }

    /// Encodes `model`, with an optimizer record encoded already.
    pub fn with_optim<BM: Backend, M: Module<BM>>(
        model: &M,
        optim: Vec<u8>,
    ) -> Result<Self, CoordinatorError> {
        Ok(Self {
            model: Recorder::<BM>::record(&Bytes::default(), model.clone().into_record(), ())
                .map_err(|e| encode_error(MODEL, e))?,
            optim,
            scheduler: None,
        })
    }

    /// Adds the learning-rate scheduler's record.
    pub fn with_scheduler<B: Backend, R: Record<B>>(
        mut self,
        record: R,
    ) -> Result<Self, CoordinatorError> {
        self.scheduler = Some(
            Recorder::<B>::record(&Bytes::default(), record, ())
                .map_err(|e| encode_error(SCHEDULER, e))?,
        );
        Ok(self)
    }
}

fn encode_error(what: &str, e: burn::record::RecorderError) -> CoordinatorError {
    CoordinatorError::Checkpoint {
        path: PathBuf::from(what),
        reason: format!("cannot encode it: {e}"),
    }
}

/// Encodes an optimizer record as a checkpoint stores it.
pub(crate) fn encode_record<B: Backend, R: Record<B>>(
    record: R,
) -> Result<Vec<u8>, CoordinatorError> {
    Recorder::<B>::record(&Bytes::default(), record, ()).map_err(|e| encode_error(OPTIM, e))
}

/// Decodes an optimizer record [`encode_record`] encoded (the Learner engine's
/// fsdp shards).
#[cfg(feature = "learner")]
pub(crate) fn decode_record<B: Backend, R: Record<B>>(
    bytes: Vec<u8>,
    device: &B::Device,
) -> Result<R, CoordinatorError> {
    Bytes::default()
        .load::<R>(bytes, device)
        .map_err(|e| CoordinatorError::Checkpoint {
            path: PathBuf::from(OPTIM),
            reason: format!("cannot decode an optimizer shard: {e}"),
        })
}

/// Size of `record` encoded as a checkpoint stores it (0 if it cannot be encoded).
pub(crate) fn encoded_len<B: Backend, R: Record<B>>(record: R) -> u64 {
    Recorder::<B>::record(&Bytes::default(), record, ()).map_or(0, |b| b.len() as u64)
}

/// Writes `snapshot` with `state` as `<run_dir>/checkpoints/step-N` (see the module
/// documentation for the layout and the guarantees).
pub(crate) fn save(
    run_dir: &Path,
    snapshot: &Snapshot,
    state: &TrainerState,
    signatures: &Signatures,
) -> Result<PathBuf, CoordinatorError> {
    let root = run_dir.join(DIR);
    std::fs::create_dir_all(&root).map_err(io(&root))?;
    // The losses reach their log before the checkpoint that counts them exists.
    crate::loss_log::write(run_dir, &state.step_losses)?;
    let name = step_dir_name(state.step);
    let tmp = root.join(format!(".tmp-{name}"));
    let dest = root.join(&name);
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(io(&tmp))?;
    }
    std::fs::create_dir(&tmp).map_err(io(&tmp))?;
    let (model_bytes, optim_bytes) = (&snapshot.model, &snapshot.optim);
    let state_bytes =
        serde_json::to_vec_pretty(state).map_err(|e| bad(&tmp.join(STATE), e.to_string()))?;
    let mut files = vec![
        write_synced(&tmp.join(MODEL), model_bytes)?,
        write_synced(&tmp.join(OPTIM), optim_bytes)?,
        write_synced(&tmp.join(STATE), &state_bytes)?,
    ];
    if let Some(bytes) = &snapshot.scheduler {
        files.push(write_synced(&tmp.join(SCHEDULER), bytes)?);
    }
    let manifest = Manifest {
        format: FORMAT,
        kiln_version: env!("CARGO_PKG_VERSION").into(),
        step: state.step,
        epoch: state.epoch,
        signatures: signatures.clone(),
        monitor: state.monitor,
        files,
    };
    let manifest_bytes = serde_json::to_vec_pretty(&manifest)
        .map_err(|e| bad(&tmp.join(MANIFEST), e.to_string()))?;
    write_synced(&tmp.join(MANIFEST), &manifest_bytes)?;
    sync_dir(&tmp)?;
    if dest.exists() {
        // The same step saved again (e.g. at the end of training): the newer state
        // replaces it; the old one is removed only once the new one is complete.
        let old = root.join(format!(".old-{name}"));
        std::fs::rename(&dest, &old).map_err(io(&dest))?;
        std::fs::rename(&tmp, &dest).map_err(io(&dest))?;
        std::fs::remove_dir_all(&old).map_err(io(&old))?;
    } else {
        std::fs::rename(&tmp, &dest).map_err(io(&dest))?;
    }
    sync_dir(&root)?;
    Ok(dest)
}

/// Reads and verifies the checkpoint in `dir` against `expect`, for a resume: the
/// run's loss log is cut back to the checkpoint's step ([`crate::loss_log::resume`]).
pub(crate) fn load(dir: &Path, expect: &Signatures) -> Result<Loaded, CoordinatorError> {
    if !dir.is_dir() {
        return Err(bad(dir, "no such checkpoint directory"));
    }
    let manifest_path = dir.join(MANIFEST);
    let text = std::fs::read(&manifest_path).map_err(|e| {
        bad(
            &manifest_path,
            format!("cannot read the manifest ({e}): not a complete checkpoint"),
        )
    })?;
    let manifest: Manifest = serde_json::from_slice(&text)
        .map_err(|e| bad(&manifest_path, format!("the manifest is corrupt: {e}")))?;
    if manifest.format != FORMAT {
        return Err(bad(
            &manifest_path,
            format!("checkpoint format {} is not {FORMAT}", manifest.format),
        ));
    }
    let sig = &manifest.signatures;
    if sig.task != expect.task {
        return Err(bad(
            dir,
            format!(
                "it was written for task {} but this run's task is {}",
                sig.task, expect.task
            ),
        ));
    }
    if sig.model != expect.model {
        return Err(bad(
            dir,
            format!(
                "it was written for another model ({}; this model: {})",
                sig.model, expect.model
            ),
        ));
    }
    if sig.world_size != expect.world_size {
        return Err(bad(
            dir,
            format!(
                "it was written by {} workers but this run has {}",
                sig.world_size, expect.world_size
            ),
        ));
    }
    let mut contents: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    for name in [MODEL, OPTIM, STATE, SCHEDULER] {
        let path = dir.join(name);
        let entry = manifest.files.iter().find(|f| f.name == name);
        let entry = match (entry, name) {
            (Some(entry), _) => entry,
            (None, SCHEDULER) => continue,
            (None, _) => {
                return Err(bad(
                    &manifest_path,
                    format!("the manifest does not list {name}"),
                ));
            }
        };
        let bytes = std::fs::read(&path).map_err(|e| bad(&path, format!("cannot read it: {e}")))?;
        if bytes.len() as u64 != entry.size {
            return Err(bad(
                &path,
                format!(
                    "it has {} bytes, the manifest says {} (truncated?)",
                    bytes.len(),
                    entry.size
                ),
            ));
        }
        if hex(&Sha256::digest(&bytes)) != entry.sha256 {
            return Err(bad(
                &path,
                "its sha256 does not match the manifest (corrupt)",
            ));
        }
        contents.insert(name.into(), bytes);
    }
    let mut state: TrainerState = serde_json::from_slice(&contents[STATE]).map_err(|e| {
        bad(
            &dir.join(STATE),
            format!("the trainer state is corrupt: {e}"),
        )
    })?;
    if state.step_losses.is_empty() && state.step > 0 {
        state.step_losses = crate::loss_log::resume(&run_dir_of(dir)?, state.step)?;
    }
    Ok(Loaded {
        dir: dir.to_path_buf(),
        state,
        model: contents.remove(MODEL).unwrap_or_default(),
        optim: contents.remove(OPTIM).unwrap_or_default(),
        scheduler: contents.remove(SCHEDULER),
    })
}

/// A complete checkpoint found on disk.
#[derive(Debug, Clone)]
pub(crate) struct Found {
    pub dir: PathBuf,
    pub step: u64,
    pub monitor: Option<f64>,
}

/// The complete checkpoints of a run (those with a readable manifest), by step.
pub(crate) fn list(run_dir: &Path) -> Vec<Found> {
    let root = run_dir.join(DIR);
    let Ok(entries) = std::fs::read_dir(&root) else {
        return Vec::new();
    };
    let mut found: Vec<Found> = entries
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with("step-"))
        .filter_map(|e| {
            let manifest: Manifest =
                serde_json::from_slice(&std::fs::read(e.path().join(MANIFEST)).ok()?).ok()?;
            Some(Found {
                dir: e.path(),
                step: manifest.step,
                monitor: manifest.monitor,
            })
        })
        .collect();
    found.sort_by_key(|f| f.step);
    found
}

/// The checkpoints of `found` that carry a finite monitored value, best first by
/// `mode`, ties to the newest.
fn ranked(found: &[Found], mode: MonitorMode) -> Vec<&Found> {
    let mut ranked: Vec<&Found> = found
        .iter()
        .filter(|f| f.monitor.is_some_and(f64::is_finite))
        .collect();
    ranked.sort_by(|a, b| {
        let (x, y) = (a.monitor.unwrap_or(f64::NAN), b.monitor.unwrap_or(f64::NAN));
        match mode {
            MonitorMode::Min => x.total_cmp(&y),
            MonitorMode::Max => y.total_cmp(&x),
        }
        .then(b.step.cmp(&a.step))
    });
    ranked
}

/// The best of `found` by `mode`, ties to the newest.
pub(crate) fn best(found: &[Found], mode: MonitorMode) -> Option<&Found> {
    ranked(found, mode).first().copied()
}

/// Deletes the checkpoints the policy no longer keeps (never the newest one while
/// `save_last` is on).
pub(crate) fn retain(run_dir: &Path, policy: &CheckpointPolicy) -> Result<(), CoordinatorError> {
    let found = list(run_dir);
    let mut keep: Vec<&Path> = Vec::new();
    if policy.save_last
        && let Some(last) = found.last()
    {
        keep.push(&last.dir);
    }
    keep.extend(
        ranked(&found, policy.mode)
            .iter()
            .take(policy.save_top_k)
            .map(|f| f.dir.as_path()),
    );
    for f in &found {
        if !keep.contains(&f.dir.as_path()) {
            std::fs::remove_dir_all(&f.dir).map_err(io(&f.dir))?;
        }
    }
    Ok(())
}

/// Tidies what interrupted writes left: a `.tmp-*` directory is removed; an
/// `.old-NAME` directory is put back as `NAME` when the replacement never arrived,
/// and removed otherwise.
pub(crate) fn clean_partial(run_dir: &Path) -> Result<(), CoordinatorError> {
    let root = run_dir.join(DIR);
    let Ok(entries) = std::fs::read_dir(&root) else {
        return Ok(());
    };
    for e in entries.filter_map(|e| e.ok()) {
        let name = e.file_name().to_string_lossy().into_owned();
        let path = e.path();
        if name.starts_with(".tmp-") {
            tracing::info!(dir = %path.display(), "removing an interrupted checkpoint write");
            std::fs::remove_dir_all(&path).map_err(io(&path))?;
        } else if let Some(original) = name.strip_prefix(".old-") {
            let dest = root.join(original);
            if dest.exists() {
                std::fs::remove_dir_all(&path).map_err(io(&path))?;
            } else {
                std::fs::rename(&path, &dest).map_err(io(&dest))?;
            }
        }
    }
    Ok(())
}

/// The checkpoint directory `which` names for this configuration's run.
///
/// `last`/`best` look in the run named by `run_name`, or, without one, in the run of
/// the experiment with the newest checkpoint.
///
/// With `tidy`, leftovers of interrupted writes in that run are tidied first (see
/// [`clean_partial`]), so a checkpoint whose replacement was cut short is found
/// again; the nodes other than node 0 of a multi-node run only read.
pub(crate) fn locate(
    config: &CoordinatorConfig,
    which: &CkptPath,
    tidy: bool,
) -> Result<PathBuf, CoordinatorError> {
    if let CkptPath::Path(p) = which {
        if tidy {
            clean_partial(&run_dir_of(p)?)?;
        }
        return Ok(p.clone());
    }
    let experiment_dir = config.default_root_dir.join(&config.experiment);
    let run_dir = match &config.run_name {
        Some(name) => {
            let dir = experiment_dir.join(name);
            if !dir.is_dir() {
                return Err(bad(
                    &dir,
                    format!(
                        "ckpt_path {which}: there is no run {name:?} in {}",
                        experiment_dir.display()
                    ),
                ));
            }
            dir
        }
        None => newest_run_with_checkpoints(&experiment_dir).ok_or_else(|| {
            bad(
                &experiment_dir,
                format!(
                    "ckpt_path {which}: no run of experiment {:?} has a checkpoint yet",
                    config.experiment
                ),
            )
        })?,
    };
    if tidy {
        clean_partial(&run_dir)?;
    }
    let found = list(&run_dir);
    let pick = match which {
        CkptPath::Best => best(&found, config.checkpoint.mode),
        _ => found.last(),
    };
    pick.map(|f| f.dir.clone()).ok_or_else(|| {
        bad(
            &run_dir.join(DIR),
            format!("ckpt_path {which}: no complete checkpoint in this run"),
        )
    })
}

fn newest_run_with_checkpoints(experiment_dir: &Path) -> Option<PathBuf> {
    std::fs::read_dir(experiment_dir)
        .ok()?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let last = list(&e.path()).pop()?;
            let modified = std::fs::metadata(&last.dir)
                .and_then(|m| m.modified())
                .ok()?;
            Some((modified, e.path()))
        })
        .max_by_key(|(modified, _)| *modified)
        .map(|(_, dir)| dir)
}

/// The run directory a checkpoint directory belongs to (`<run>/checkpoints/step-N`).
pub(crate) fn run_dir_of(checkpoint_dir: &Path) -> Result<PathBuf, CoordinatorError> {
    let parent = checkpoint_dir
        .parent()
        .filter(|p| p.file_name().is_some_and(|n| n == DIR));
    parent
        .and_then(Path::parent)
        .map(Path::to_path_buf)
        .ok_or_else(|| {
            bad(
                checkpoint_dir,
                format!("a checkpoint to resume from must sit at <run dir>/{DIR}/step-N"),
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn signatures() -> Signatures {
        Signatures {
            task: "task".into(),
            model: "model".into(),
            world_size: 1,
        }
    }

    /// A checkpoint's files do not grow with the run (its losses go to the run's
    /// append-only log), and loading it gives every loss back.
    #[test]
    fn a_checkpoint_stays_the_same_size_however_long_the_run() {
        let run = tempfile::tempdir().unwrap();
        let snapshot = Snapshot {
            model: vec![1; 8],
            optim: vec![2; 8],
            scheduler: None,
        };
        let state_size = |steps: u64| {
            let state = TrainerState {
                step: steps,
                step_losses: (0..steps).map(|i| i as f32 * 0.5).collect(),
                ..TrainerState::default()
            };
            let dir = save(run.path(), &snapshot, &state, &signatures()).unwrap();
            let loaded = load(&dir, &signatures()).unwrap();
            assert_eq!(loaded.state.step_losses, state.step_losses);
            std::fs::metadata(dir.join(STATE)).unwrap().len()
        };
        let (short, long) = (state_size(10), state_size(100_000));
        assert!(
            long <= short + 8,
            "state.json: {short} bytes at step 10, {long} at step 100000"
        );
    }
}

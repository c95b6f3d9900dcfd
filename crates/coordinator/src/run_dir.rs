//! The run directory: where a run's files go.
//!
//! ```text
//! <default_root_dir>/<experiment>/<run name>/
//!     config.json   task spec, coordinator configuration and resolved plan (at start)
//!     model.mpk     final weights, full precision (when checkpointing is enabled)
//!     report.json   the TrainReport (at the end, also for failed runs)
//! ```

use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use burn::module::Module;
use burn::prelude::Backend;
use burn::record::{DefaultRecorder, Recorder};
use serde::Serialize;

use crate::{CoordinatorError, Result};

pub(crate) struct RunDir {
    pub path: PathBuf,
    pub name: String,
}

impl RunDir {
    /// Creates `<root>/<experiment>/<name>`; an existing run directory is an error,
    /// never overwritten.
    pub fn create(root: &Path, experiment: &str, name: Option<&str>, task: &str) -> Result<Self> {
        let name = match name {
            Some(n) => n.to_string(),
            None => generated_name(task),
        };
        if name.is_empty() || name.contains(['/', '\\']) || name == "." || name == ".." {
            return Err(kiln_core::Error::invalid(
                "run_name",
                &name,
                "a non-empty name without slashes",
            )
            .into());
        }
        let parent = root.join(experiment);
        std::fs::create_dir_all(&parent).map_err(|e| CoordinatorError::io(&parent, e))?;
        let path = parent.join(&name);
        std::fs::create_dir(&path).map_err(|e| match e.kind() {
            std::io::ErrorKind::AlreadyExists => kiln_core::Error::invalid(
                "run_name",
                &name,
                format!(
                    "a name not used yet in {} (the directory exists)",
                    parent.display()
                ),
            )
            .into(),
            _ => CoordinatorError::io(&path, e),
        })?;
        Ok(Self { path, name })
    }

    /// The existing run directory that `checkpoint_dir` belongs to.
    pub fn open_for(checkpoint_dir: &Path) -> Result<Self> {
        let path = crate::checkpoint::run_dir_of(checkpoint_dir)?;
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        Ok(Self { path, name })
    }

    /// Writes `value` as pretty JSON to `file` inside the run directory, through a
    /// temporary file and a rename so a crash never leaves half a file.
    pub fn write_json(&self, file: &str, value: &impl Serialize) -> Result<PathBuf> {
        let path = self.path.join(file);
        let tmp = self.path.join(format!(".{file}.tmp"));
        let text = serde_json::to_string_pretty(value)
            .map_err(|e| CoordinatorError::io(&path, std::io::Error::other(e)))?;
        let written = std::fs::write(&tmp, text)
            .map_err(|e| CoordinatorError::io(&tmp, e))
            .and_then(|()| {
                std::fs::rename(&tmp, &path).map_err(|e| CoordinatorError::io(&path, e))
            });
        if written.is_err() {
            // Nothing half-written stays behind (a full disk leaves an empty file).
            let _ = std::fs::remove_file(&tmp);
        }
        written.map(|()| path)
    }

    /// Saves `model`'s weights in full precision as `model.mpk`.
    pub fn save_model<B: Backend, M: Module<B>>(&self, model: &M) -> Result<PathBuf> {
        let partial = self.path.join("model-partial");
        let written = partial.with_extension("mpk");
        let path = self.path.join("model.mpk");
        DefaultRecorder::new()
            .record(model.clone().into_record(), partial)
            .map_err(|e| CoordinatorError::Record {
                path: path.clone(),
                reason: e.to_string(),
            })?;
        std::fs::rename(&written, &path).map_err(|e| CoordinatorError::io(&path, e))?;
        Ok(path)
    }
}

/// `<task>-<unix seconds>-<4 hex digits>`: sortable by start time, unique enough for
/// runs started in the same second.
fn generated_name(task: &str) -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let salt = (now.subsec_nanos() ^ std::process::id().rotate_left(16)) & 0xffff;
    format!("{task}-{}-{salt:04x}", now.as_secs())
}

/// Seconds since the Unix epoch.
pub(crate) fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

//! SIGINT (Ctrl-C) and SIGTERM during `kiln train`.
//!
//! The first signal asks the coordinator to stop at the next batch: the run ends as
//! KILLED through the ordinary path (checkpoint, report, store). The second means
//! "now": the handler waits at most [`FLUSH_TIMEOUT`] for the store's queued metric
//! points, records the run KILLED through a connection of its own, and exits with
//! 130, so that a run stuck in a long step is never left RUNNING (and later LOST).

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use kiln_coordinator::TrainingCoordinator;
use kiln_experiment_db::{
    EndStatus, ExitHandle, MetricPoint, NewArtifact, NewRun, Pulse, Result, RunId, RunTracker,
};

/// How long the second signal waits for the queued metric points to be written.
pub const FLUSH_TIMEOUT: Duration = Duration::from_secs(5);

/// The reason recorded for a run ended by a second signal.
pub const SECOND_SIGNAL_REASON: &str =
    "interrupted twice (SIGINT/SIGTERM): kiln exited without finishing the step";

/// The run the store is tracking, once it has one: what the second signal ends.
#[derive(Debug, Clone, Default)]
pub struct CurrentRun(Arc<Mutex<Option<RunId>>>);

impl CurrentRun {
    fn set(&self, run: RunId) {
        *self.0.lock().unwrap_or_else(PoisonError::into_inner) = Some(run);
    }

    fn get(&self) -> Option<RunId> {
        *self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// `tracker`, noting here the run it starts or resumes.
    pub fn watch<'a>(&self, tracker: &'a mut dyn RunTracker) -> Watched<'a> {
        Watched {
            inner: tracker,
            current: self.clone(),
        }
    }
}

/// A [`RunTracker`] that passes everything on and notes the run id in a
/// [`CurrentRun`].
pub struct Watched<'a> {
    inner: &'a mut dyn RunTracker,
    current: CurrentRun,
}

impl RunTracker for Watched<'_> {
    fn start_run(&mut self, run: &NewRun) -> Result<RunId> {
        let id = self.inner.start_run(run)?;
        self.current.set(id);
        Ok(id)
    }

    fn log_metrics(&mut self, run: RunId, points: &[MetricPoint]) -> Result<()> {
        self.inner.log_metrics(run, points)
    }

    fn finish_run(&mut self, run: RunId, status: EndStatus, reason: Option<&str>) -> Result<()> {
        self.inner.finish_run(run, status, reason)
    }

    fn flush(&mut self) -> Result<()> {
        self.inner.flush()
    }

    fn heartbeat(&mut self, run: RunId) -> Result<()> {
        self.inner.heartbeat(run)
    }

    fn pulse(&mut self, run: RunId) -> Option<Pulse> {
        self.inner.pulse(run)
    }

    fn log_artifact(&mut self, run: RunId, artifact: &NewArtifact) -> Result<()> {
        self.inner.log_artifact(run, artifact)
    }

    fn resume_run(&mut self, run: RunId, from_step: u64) -> Result<u32> {
        let attempt = self.inner.resume_run(run, from_step)?;
        self.current.set(run);
        Ok(attempt)
    }
}

/// Installs the handler: the first signal stops `coordinator` at the next batch; the
/// second ends the current run in the store (when there is one) and exits.
pub fn stop_on_signals(
    coordinator: &TrainingCoordinator,
    store: Option<ExitHandle>,
    current: CurrentRun,
) {
    let stop = coordinator.stop_handle();
    let installed = ctrlc::set_handler(move || {
        if !stop.is_stopped() {
            eprintln!("\nkiln: stopping at the next batch (send the signal again to exit now)");
            stop.stop();
            return;
        }
        if let (Some(store), Some(run)) = (&store, current.get()) {
            let ended = store.end_run(run, EndStatus::Killed, SECOND_SIGNAL_REASON, FLUSH_TIMEOUT);
            match ended {
                Ok(true) => eprintln!("kiln: interrupted again: run {run} recorded as KILLED"),
                Ok(false) => eprintln!(
                    "kiln: interrupted again: run {run} recorded as KILLED; metric points \
                     still queued after {FLUSH_TIMEOUT:?} were dropped"
                ),
                Err(e) => eprintln!("kiln: interrupted again: run {run} not recorded: {e}"),
            }
        }
        eprintln!("kiln: exiting now");
        std::process::exit(130);
    });
    if let Err(e) = installed {
        tracing::warn!("cannot install the SIGINT/SIGTERM handler: {e}");
    }
}

//! [`StopHandle`]: asking a running training loop to stop.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

/// Stops training runs from elsewhere (another thread, a signal handler).
///
/// Cloning shares the flag. Once stopped, every run of the coordinator it came from
/// stops at its next batch until [`reset`](Self::reset) is called.
///
/// ```
/// let coordinator = kiln_coordinator::TrainingCoordinator::builder().build().unwrap();
/// let stop = coordinator.stop_handle();
/// assert!(!stop.is_stopped());
/// stop.stop(); // e.g. from a SIGTERM handler
/// assert!(coordinator.stop_handle().is_stopped());
/// ```
#[derive(Debug, Clone, Default)]
pub struct StopHandle(Arc<AtomicBool>);

impl StopHandle {
    /// Asks the runs to stop.
    pub fn stop(&self) {
        self.0.store(true, Ordering::SeqCst);
    }

    /// Whether a stop was asked.
    pub fn is_stopped(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }

    /// Clears the request, so the next run trains again.
    pub fn reset(&self) {
        self.0.store(false, Ordering::SeqCst);
    }
}

//! Retrying what fails for a moment: another writer holding the store's lock, a
//! connection the server dropped.

use std::time::{Duration, Instant};

use crate::{Error, Result};

/// How long a write transaction that keeps meeting a transient failure is retried,
/// on top of each try's own wait for the write lock, before the error reaches the
/// caller.
const RETRY_FOR: Duration = Duration::from_secs(30);

/// How long a statement waits for another writer's lock (SQLite's busy timeout,
/// PostgreSQL's `lock_timeout`).
pub(crate) const LOCK_TIMEOUT: Duration = Duration::from_secs(5);

/// Runs `f` on `state` until it succeeds, fails with an error that `transient` does
/// not accept, or [`RETRY_FOR`] has passed, pausing a little longer after each try
/// and calling `recover` before the next.
pub(crate) fn retry<S, T>(
    state: &mut S,
    mut f: impl FnMut(&mut S) -> Result<T>,
    transient: impl Fn(&Error) -> bool,
    mut recover: impl FnMut(&mut S),
) -> Result<T> {
    let started = Instant::now();
    let mut pause = Duration::from_millis(2);
    loop {
        match f(state) {
            Err(e) if transient(&e) && started.elapsed() < RETRY_FOR => {
                tracing::debug!(error = %e, "experiment store busy or unreachable, retrying");
                std::thread::sleep(pause);
                pause = (pause * 2).min(Duration::from_millis(200));
                recover(state);
            }
            other => return other,
        }
    }
}

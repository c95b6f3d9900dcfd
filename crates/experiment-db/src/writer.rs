//! The background writer: a thread owning its own connection that writes the batches
//! of metric points handed to it, one transaction per batch, in the order received.
//!
//! The queue between the caller and the thread is bounded
//! ([`crate::ExperimentDb::WRITER_QUEUE_BATCHES`] batches): when it is full, handing
//! over a batch blocks until the thread has taken one, so that a store slower than
//! training slows training down rather than losing points or memory. A failed batch is
//! recorded (its transaction rolled back) and reported by [`Writer::take_failure`]; the
//! thread goes on with the next batches. The thread never panics on a store error.

use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::engine::Conn;
use crate::writes::write_points;
use crate::{Error, MetricPoint, Result, RunId};

/// What the thread is asked to do.
enum Command {
    /// Write a batch of points of a run in one transaction.
    Batch {
        run: RunId,
        points: Vec<MetricPoint>,
    },
    /// Answer once everything handed over before has been written (or has failed).
    Sync(SyncSender<()>),
}

/// Batches that failed since the last report.
#[derive(Debug, Default)]
struct Failures {
    first: Option<Error>,
    batches: usize,
    points: usize,
}

/// Handle to the writer thread. Dropping it writes what is queued, then stops the
/// thread; a failure not reported by then is logged (`tracing::error!`).
#[derive(Debug)]
pub(crate) struct Writer {
    sender: Option<SyncSender<Command>>,
    thread: Option<JoinHandle<()>>,
    failures: Arc<Mutex<Failures>>,
    /// The queue's entry for [`Syncer`]s, emptied when the writer is dropped: a
    /// `Syncer` must not keep the queue open (the thread would never end, and
    /// dropping the writer would wait for it forever).
    shared: Arc<Mutex<Option<SyncSender<Command>>>>,
}

impl Writer {
    /// Starts the thread, which writes through `conn`, with a queue of `capacity`
    /// batches.
    pub(crate) fn spawn(conn: Conn, capacity: usize) -> Result<Self> {
        let (sender, receiver) = sync_channel(capacity);
        let failures = Arc::new(Mutex::new(Failures::default()));
        let thread_failures = Arc::clone(&failures);
        let thread = std::thread::Builder::new()
            .name("kiln-experiment-db-writer".into())
            .spawn(move || serve(conn, &receiver, &thread_failures))
            .map_err(|e| Error::Invalid(format!("cannot start the background writer: {e}")))?;
        Ok(Self {
            shared: Arc::new(Mutex::new(Some(sender.clone()))),
            sender: Some(sender),
            thread: Some(thread),
            failures,
        })
    }

    fn sender(&self) -> Result<&SyncSender<Command>> {
        self.sender.as_ref().ok_or_else(stopped)
    }

    /// Hands a batch over; blocks while the queue is full.
    pub(crate) fn send(&self, run: RunId, points: Vec<MetricPoint>) -> Result<()> {
        self.sender()?
            .send(Command::Batch { run, points })
            .map_err(|_| stopped())
    }

    /// Waits until every batch handed over before has been written or has failed.
    pub(crate) fn sync(&self) -> Result<()> {
        let (reply, done) = sync_channel(1);
        self.sender()?
            .send(Command::Sync(reply))
            .map_err(|_| stopped())?;
        done.recv().map_err(|_| stopped())
    }

    /// A handle that another thread can use to wait for the queued batches.
    pub(crate) fn syncer(&self) -> Syncer {
        Syncer(Arc::clone(&self.shared))
    }

    /// The failure of the batches that failed since the last call, as one
    /// [`Error::WriteFailed`]; `None` when none did. Does not wait for the thread.
    pub(crate) fn take_failure(&self) -> Option<Error> {
        let mut failures = self.failures.lock().unwrap_or_else(PoisonError::into_inner);
        let taken = std::mem::take(&mut *failures);
        taken.first.map(|first| Error::WriteFailed {
            batches: taken.batches,
            points: taken.points,
            first: Box::new(first),
        })
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        // Closing the queue lets the thread write what is queued, then return.
        self.shared
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        drop(self.sender.take());
        if let Some(thread) = self.thread.take()
            && thread.join().is_err()
        {
            tracing::error!("the experiment store's background writer panicked");
        }
        if let Some(error) = self.take_failure() {
            tracing::error!(%error, "metric points were lost when the experiment store closed");
        }
    }
}

/// Waits, from any thread, for the batches queued before the call to be written.
/// It holds no open end of the queue: once the writer is dropped, there is nothing
/// left to wait for.
#[derive(Debug, Clone)]
pub(crate) struct Syncer(Arc<Mutex<Option<SyncSender<Command>>>>);

impl Syncer {
    /// Whether every batch queued before the call was written or failed within
    /// `timeout` (the time to get a place in a full queue counts too).
    pub(crate) fn sync_within(&self, timeout: Duration) -> bool {
        let sender = self
            .0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let Some(sender) = sender else {
            // The writer was dropped, which wrote everything queued.
            return true;
        };
        let deadline = std::time::Instant::now() + timeout;
        let (reply, done) = sync_channel(1);
        let mut command = Command::Sync(reply);
        loop {
            match sender.try_send(command) {
                Ok(()) => break,
                Err(std::sync::mpsc::TrySendError::Full(back)) => {
                    if std::time::Instant::now() >= deadline {
                        return false;
                    }
                    command = back;
                    // The queue is full: the writer is busy writing; look again soon.
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(std::sync::mpsc::TrySendError::Disconnected(_)) => return true,
            }
        }
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        done.recv_timeout(left).is_ok()
    }
}

fn stopped() -> Error {
    Error::Invalid("the experiment store's background writer has stopped".into())
}

/// The thread's loop: runs until the queue is closed and empty.
fn serve(mut conn: Conn, receiver: &Receiver<Command>, failures: &Mutex<Failures>) {
    for command in receiver {
        match command {
            Command::Batch { run, points } => {
                if let Err(error) = conn.write_tx(|tx| write_points(tx, run, &points)) {
                    tracing::warn!(run, points = points.len(), %error, "metric batch not written");
                    let mut failures = failures.lock().unwrap_or_else(PoisonError::into_inner);
                    failures.batches += 1;
                    failures.points += points.len();
                    failures.first.get_or_insert(error);
                }
            }
            Command::Sync(reply) => {
                // The waiting side may have gone; nothing to do then.
                let _ = reply.send(());
            }
        }
    }
}

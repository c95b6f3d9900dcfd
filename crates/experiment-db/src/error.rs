/// Errors of the experiment store.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// SQLite failed.
    #[error("experiment store: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// A run or experiment that was named does not exist.
    #[error("experiment store: {0} not found")]
    NotFound(String),
    /// A value could not be (de)serialised.
    #[error("experiment store: bad JSON: {0}")]
    Json(#[from] serde_json::Error),
    /// The store was used in a way it does not allow.
    #[error("experiment store: {0}")]
    Invalid(String),
    /// Batches of metric points handed to the background writer could not be written
    /// (each batch is all or nothing). Reported once, by the first call after the
    /// failure that reports writer errors.
    #[error(
        "experiment store: {batches} batch(es) of metric points ({points} points) could not \
         be written in the background; the first failed with: {first}"
    )]
    WriteFailed {
        /// How many batches failed since the last report.
        batches: usize,
        /// How many points those batches held.
        points: usize,
        /// The error of the first of them.
        first: Box<Error>,
    },
}

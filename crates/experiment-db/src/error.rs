/// Errors of the experiment store.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// SQLite failed.
    #[error("experiment store: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// The PostgreSQL server returned an error, or the connection to it failed.
    #[error("experiment store (PostgreSQL): {}", postgres_message(.0))]
    Postgres(#[from] postgres::Error),
    /// The PostgreSQL server could not be reached, or refused the login.
    #[error("experiment store: cannot connect to {location}: {reason}")]
    Unreachable {
        /// The store's URL, its password masked.
        location: String,
        /// What failed, and what to check.
        reason: String,
    },
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

/// A PostgreSQL error with the server's message, which the client's own `Display`
/// leaves to its source.
fn postgres_message(error: &postgres::Error) -> String {
    match (error.as_db_error(), std::error::Error::source(error)) {
        (Some(db), _) => match db.detail() {
            Some(detail) => format!("{}: {} ({detail})", db.severity(), db.message()),
            None => format!("{}: {}", db.severity(), db.message()),
        },
        (None, Some(source)) => format!("{error}: {source}"),
        (None, None) => error.to_string(),
    }
}

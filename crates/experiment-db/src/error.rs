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
}

use std::path::PathBuf;

/// Everything that can go wrong in kiln-core: bad configuration values, task and
/// model mismatches, unreadable data.
///
/// Every variant that comes from user input names the bad value and, where the
/// choices are finite, the accepted ones.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A configuration value is not one of the accepted values.
    #[error("invalid {field} {value:?}: expected {expected}")]
    InvalidValue {
        /// The configuration field, e.g. `strategy`.
        field: &'static str,
        /// The value as given.
        value: String,
        /// What would have been accepted.
        expected: String,
    },
    /// A task spec could not be read or does not describe a usable task.
    #[error("invalid task spec: {0}")]
    InvalidTaskSpec(String),
    /// The model produced a prediction that does not fit the task kind, or the data
    /// module produced targets that do not fit it.
    #[error("task mismatch: {0}")]
    TaskMismatch(String),
    /// A data file could not be used.
    #[error("cannot use data file {path}: {reason}")]
    DataFile {
        /// The file as given.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// A data module cannot provide what was asked of it.
    #[error("data: {0}")]
    Data(String),
}

impl Error {
    /// Shorthand for [`Error::InvalidValue`].
    pub fn invalid(field: &'static str, value: impl ToString, expected: impl ToString) -> Self {
        Error::InvalidValue {
            field,
            value: value.to_string(),
            expected: expected.to_string(),
        }
    }
}

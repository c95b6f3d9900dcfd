//! The values that cross between the store's SQL and either engine: the arguments
//! bound to placeholders ([`Arg`]) and the rows read back ([`Row`] of [`Cell`]s).

use crate::records::RunStatus;
use crate::{Error, Result};

/// An argument bound to a placeholder.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Arg {
    Null,
    Int(i64),
    Real(f64),
    Text(String),
    /// An unsigned value beyond `i64::MAX`, which neither engine stores: binding it
    /// fails with an error naming it.
    TooLarge(u64),
}

impl From<i64> for Arg {
    fn from(v: i64) -> Self {
        Arg::Int(v)
    }
}

impl From<u64> for Arg {
    fn from(v: u64) -> Self {
        i64::try_from(v).map_or(Arg::TooLarge(v), Arg::Int)
    }
}

impl From<u32> for Arg {
    fn from(v: u32) -> Self {
        Arg::Int(i64::from(v))
    }
}

impl From<f64> for Arg {
    fn from(v: f64) -> Self {
        Arg::Real(v)
    }
}

impl From<&str> for Arg {
    fn from(v: &str) -> Self {
        Arg::Text(v.to_string())
    }
}

impl From<&String> for Arg {
    fn from(v: &String) -> Self {
        Arg::Text(v.clone())
    }
}

impl From<String> for Arg {
    fn from(v: String) -> Self {
        Arg::Text(v)
    }
}

impl From<RunStatus> for Arg {
    fn from(v: RunStatus) -> Self {
        Arg::Text(v.as_str().to_string())
    }
}

impl<T: Into<Arg>> From<Option<T>> for Arg {
    fn from(v: Option<T>) -> Self {
        v.map_or(Arg::Null, Into::into)
    }
}

impl Arg {
    /// The error for a value beyond `i64::MAX`.
    pub(super) fn too_large(v: u64) -> Error {
        Error::Invalid(format!(
            "value {v} is too large for the experiment store (at most {})",
            i64::MAX
        ))
    }
}

/// `args![a, b, ...]`: the arguments of a statement, each converted with `Arg::from`.
macro_rules! args {
    ($($arg:expr),* $(,)?) => {
        &[$($crate::engine::Arg::from($arg)),*] as &[$crate::engine::Arg]
    };
}
pub(crate) use args;

/// One value of a result row.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Cell {
    Null,
    Int(i64),
    Real(f64),
    Text(String),
    Bool(bool),
}

/// A result row.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Row(pub(crate) Vec<Cell>);

impl Row {
    /// Column `i` read as `T`; [`Error::Invalid`] naming the column when it holds
    /// something else.
    pub(crate) fn get<T: FromCell>(&self, i: usize) -> Result<T> {
        let cell = self.0.get(i).unwrap_or(&Cell::Null);
        T::from_cell(cell).ok_or_else(|| {
            Error::Invalid(format!(
                "unexpected value in the experiment store: column {i} holds {cell:?}, \
                 expected {}",
                T::WHAT
            ))
        })
    }
}

/// A Rust value a [`Cell`] can be read as.
pub(crate) trait FromCell: Sized {
    /// What is expected, for the error.
    const WHAT: &'static str;
    /// The value, or `None` when the cell holds another kind.
    fn from_cell(cell: &Cell) -> Option<Self>;
}

impl FromCell for i64 {
    const WHAT: &'static str = "an integer";
    fn from_cell(cell: &Cell) -> Option<Self> {
        match cell {
            Cell::Int(v) => Some(*v),
            _ => None,
        }
    }
}

impl FromCell for u64 {
    const WHAT: &'static str = "an integer >= 0";
    fn from_cell(cell: &Cell) -> Option<Self> {
        i64::from_cell(cell).and_then(|v| u64::try_from(v).ok())
    }
}

impl FromCell for u32 {
    const WHAT: &'static str = "an integer in 0..=u32::MAX";
    fn from_cell(cell: &Cell) -> Option<Self> {
        i64::from_cell(cell).and_then(|v| u32::try_from(v).ok())
    }
}

impl FromCell for f64 {
    const WHAT: &'static str = "a number";
    fn from_cell(cell: &Cell) -> Option<Self> {
        match cell {
            Cell::Real(v) => Some(*v),
            #[allow(clippy::cast_precision_loss)] // SQLite may keep a whole REAL as an integer
            Cell::Int(v) => Some(*v as f64),
            _ => None,
        }
    }
}

impl FromCell for bool {
    const WHAT: &'static str = "a boolean";
    fn from_cell(cell: &Cell) -> Option<Self> {
        match cell {
            Cell::Bool(v) => Some(*v),
            Cell::Int(v) => Some(*v != 0),
            _ => None,
        }
    }
}

impl FromCell for String {
    const WHAT: &'static str = "text";
    fn from_cell(cell: &Cell) -> Option<Self> {
        match cell {
            Cell::Text(v) => Some(v.clone()),
            _ => None,
        }
    }
}

impl FromCell for RunStatus {
    const WHAT: &'static str = "a run status";
    fn from_cell(cell: &Cell) -> Option<Self> {
        match cell {
            Cell::Text(v) => RunStatus::parse(v).ok(),
            _ => None,
        }
    }
}

impl<T: FromCell> FromCell for Option<T> {
    const WHAT: &'static str = T::WHAT;
    fn from_cell(cell: &Cell) -> Option<Self> {
        match cell {
            Cell::Null => Some(None),
            other => T::from_cell(other).map(Some),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn large_unsigned_values_are_named_not_wrapped() {
        assert_eq!(Arg::from(7u64), Arg::Int(7));
        assert_eq!(Arg::from(u64::MAX), Arg::TooLarge(u64::MAX));
        assert!(
            Arg::too_large(u64::MAX)
                .to_string()
                .contains("18446744073709551615")
        );
    }

    #[test]
    fn cells_read_as_what_they_hold() {
        let row = Row(vec![
            Cell::Int(3),
            Cell::Null,
            Cell::Text("FAILED".into()),
            Cell::Int(-1),
        ]);
        assert_eq!(row.get::<i64>(0).unwrap(), 3);
        assert_eq!(row.get::<f64>(0).unwrap(), 3.0);
        assert_eq!(row.get::<Option<f64>>(1).unwrap(), None);
        assert_eq!(row.get::<RunStatus>(2).unwrap(), RunStatus::Failed);
        assert!(row.get::<bool>(0).unwrap());
        let err = row.get::<u64>(3).unwrap_err().to_string();
        assert!(err.contains("column 3") && err.contains(">= 0"), "{err}");
        assert!(row.get::<String>(1).is_err());
    }
}

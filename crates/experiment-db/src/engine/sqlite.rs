//! The SQLite engine: opening a file with WAL, a busy timeout and foreign keys,
//! binding [`Arg`]s and reading [`Row`]s.

use std::path::Path;

use rusqlite::types::{ToSqlOutput, ValueRef};
use rusqlite::{Connection, ErrorCode, ToSql, params_from_iter};

use super::retry::{LOCK_TIMEOUT, retry};
use super::value::{Arg, Cell, Row};
use crate::{Error, Result};

/// Opens the database at `path` and sets it up: busy timeout, WAL,
/// `synchronous = NORMAL`, foreign keys.
pub(super) fn open(path: &Path) -> Result<Connection> {
    let mut conn = Connection::open(path)?;
    conn.busy_timeout(LOCK_TIMEOUT)?;
    // Switching to WAL needs a moment alone with the file: retried like a write.
    retry(
        &mut conn,
        |conn| {
            let mode: String =
                conn.pragma_update_and_check(None, "journal_mode", "WAL", |row| row.get(0))?;
            if mode.eq_ignore_ascii_case("wal") {
                Ok(())
            } else {
                Err(Error::Invalid(format!(
                    "{}: cannot use WAL (journal mode is {mode})",
                    path.display()
                )))
            }
        },
        |e| matches!(e, Error::Sqlite(e) if is_busy(e)),
        |_| {},
    )?;
    // With WAL, NORMAL loses no committed transaction when a process dies, only
    // (possibly) the last ones on a power loss.
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    conn.pragma_update(None, "foreign_keys", true)?;
    Ok(conn)
}

/// Whether another connection held a lock for longer than the busy timeout
/// ("database is locked").
pub(super) fn is_busy(error: &rusqlite::Error) -> bool {
    matches!(
        error.sqlite_error_code(),
        Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked)
    )
}

impl ToSql for Arg {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        Ok(match self {
            Arg::Null => ToSqlOutput::Borrowed(ValueRef::Null),
            Arg::Int(v) => ToSqlOutput::Borrowed(ValueRef::Integer(*v)),
            Arg::Real(v) => ToSqlOutput::Borrowed(ValueRef::Real(*v)),
            Arg::Text(v) => ToSqlOutput::Borrowed(ValueRef::Text(v.as_bytes())),
            Arg::TooLarge(v) => {
                return Err(rusqlite::Error::ToSqlConversionFailure(Box::new(
                    Arg::too_large(*v),
                )));
            }
        })
    }
}

pub(super) fn execute(conn: &Connection, sql: &str, args: &[Arg]) -> Result<u64> {
    let changed = conn.prepare_cached(sql)?.execute(params_from_iter(args))?;
    Ok(changed as u64)
}

pub(super) fn query(conn: &Connection, sql: &str, args: &[Arg]) -> Result<Vec<Row>> {
    let mut stmt = conn.prepare_cached(sql)?;
    let columns = stmt.column_count();
    let mut rows = stmt.query(params_from_iter(args))?;
    let mut out = Vec::new();
    while let Some(row) = rows.next()? {
        let cells = (0..columns)
            .map(|i| {
                Ok(match row.get_ref(i)? {
                    ValueRef::Null => Cell::Null,
                    ValueRef::Integer(v) => Cell::Int(v),
                    ValueRef::Real(v) => Cell::Real(v),
                    ValueRef::Text(v) => Cell::Text(String::from_utf8_lossy(v).into_owned()),
                    ValueRef::Blob(_) => {
                        return Err(Error::Invalid(format!(
                            "unexpected value in the experiment store: column {i} holds a blob"
                        )));
                    }
                })
            })
            .collect::<Result<Vec<_>>>()?;
        out.push(Row(cells));
    }
    Ok(out)
}

//! The two SQL engines behind the store, SQLite and PostgreSQL, under one interface.
//!
//! - [`StoreLocation`]: where a store lives, a SQLite file or a `postgres://` URL.
//! - [`Conn`]: one connection to either engine; [`Tx`]: one of its transactions.
//!   Both run the store's SQL through [`Sql`], with the same arguments ([`Arg`]) and
//!   the same rows back ([`Row`]).
//! - [`Conn::write_tx`]: every write is one transaction that holds the store's write
//!   lock (SQLite's `BEGIN IMMEDIATE`; on PostgreSQL an advisory transaction lock), so
//!   that writers see each other's commits as on one SQLite file, and is retried while
//!   the engine reports a transient failure (a busy file, a lost connection, a
//!   serialisation failure).
//!
//! The store's SQL is written once, with SQLite's `?N` and `?` placeholders; for
//! PostgreSQL they are numbered `$N` ([`postgres::numbered`]). What the dialects do
//! differently (the schema files, the write lock, looking a table up) lives in the
//! two engine modules.

mod postgres;
mod retry;
mod sqlite;
mod value;

use std::fmt;
use std::path::{Path, PathBuf};

use crate::{Error, Result};
pub(crate) use retry::LOCK_TIMEOUT;
use retry::retry;
pub(crate) use value::{Arg, Row, args};

/// Where an experiment store lives: a SQLite file (the default, needing nothing) or
/// a PostgreSQL database that several machines share.
///
/// Parsed from what `--db` takes: a `postgres://` or `postgresql://` URL names a
/// PostgreSQL database (libpq's URL form: `postgres://user:password@host:port/dbname`,
/// with `?host=/path/to/socket/dir` for a unix socket); anything else is the path of a
/// SQLite file. Shown with the password masked.
///
/// ```
/// use kiln_experiment_db::StoreLocation;
///
/// let pg: StoreLocation = "postgres://kiln:secret@db.lab/runs".parse()?;
/// assert_eq!(pg.to_string(), "postgres://kiln:***@db.lab/runs");
/// let file: StoreLocation = "runs/kiln.sqlite".parse()?;
/// assert!(matches!(file, StoreLocation::Sqlite(_)));
/// # Ok::<(), kiln_experiment_db::Error>(())
/// ```
#[derive(Clone, PartialEq, Eq)]
pub enum StoreLocation {
    /// A SQLite database file.
    Sqlite(PathBuf),
    /// A PostgreSQL database, by its connection URL.
    Postgres(String),
}

impl StoreLocation {
    /// Whether the location is a PostgreSQL URL.
    pub fn is_postgres(&self) -> bool {
        matches!(self, StoreLocation::Postgres(_))
    }

    /// The SQLite file, when the store is one.
    pub fn sqlite_path(&self) -> Option<&Path> {
        match self {
            StoreLocation::Sqlite(path) => Some(path),
            StoreLocation::Postgres(_) => None,
        }
    }
}

impl std::str::FromStr for StoreLocation {
    type Err = Error;

    /// # Errors
    /// [`Error::Invalid`] naming a malformed `postgres://` URL, or an empty path.
    fn from_str(s: &str) -> Result<Self> {
        let lower = s.trim_start().to_ascii_lowercase();
        if lower.starts_with("postgres://") || lower.starts_with("postgresql://") {
            postgres::check_url(s.trim())?;
            return Ok(StoreLocation::Postgres(s.trim().to_string()));
        }
        if s.is_empty() {
            return Err(Error::Invalid(
                "the experiment store's location is empty: give a SQLite file path or a \
                 postgres:// URL"
                    .into(),
            ));
        }
        Ok(StoreLocation::Sqlite(PathBuf::from(s)))
    }
}

impl From<&Path> for StoreLocation {
    fn from(path: &Path) -> Self {
        StoreLocation::Sqlite(path.to_path_buf())
    }
}

impl fmt::Display for StoreLocation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoreLocation::Sqlite(path) => write!(f, "{}", path.display()),
            StoreLocation::Postgres(url) => f.write_str(&postgres::masked(url)),
        }
    }
}

impl fmt::Debug for StoreLocation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoreLocation::Sqlite(path) => f.debug_tuple("Sqlite").field(path).finish(),
            StoreLocation::Postgres(_) => {
                f.debug_tuple("Postgres").field(&self.to_string()).finish()
            }
        }
    }
}

/// Runs the store's SQL: implemented by a connection and by a transaction.
pub(crate) trait Sql {
    /// Runs one statement; returns how many rows it changed.
    fn execute(&mut self, sql: &str, args: &[Arg]) -> Result<u64>;

    /// Runs one query; returns all its rows.
    fn query(&mut self, sql: &str, args: &[Arg]) -> Result<Vec<Row>>;

    /// The first row of a query, if any.
    fn query_opt(&mut self, sql: &str, args: &[Arg]) -> Result<Option<Row>> {
        Ok(self.query(sql, args)?.into_iter().next())
    }

    /// The first row of a query that always returns one.
    fn query_one(&mut self, sql: &str, args: &[Arg]) -> Result<Row> {
        self.query_opt(sql, args)?.ok_or_else(|| {
            Error::Invalid(format!("the experiment store returned no row for: {sql}"))
        })
    }
}

/// A connection to either engine.
pub(crate) enum Conn {
    Sqlite(rusqlite::Connection),
    /// Boxed: a client with its configuration is several times a SQLite handle.
    Postgres(Box<postgres::Conn>),
}

impl fmt::Debug for Conn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Conn::Sqlite(_) => f.write_str("Conn::Sqlite"),
            Conn::Postgres(c) => write!(f, "Conn::Postgres({})", c.location()),
        }
    }
}

/// A transaction of either engine, holding the store's write lock.
pub(crate) enum Tx<'c> {
    Sqlite(rusqlite::Transaction<'c>),
    Postgres(postgres::Tx<'c>),
}

impl Conn {
    /// Opens a connection and sets it up (SQLite: WAL, busy timeout, foreign keys;
    /// PostgreSQL: lock timeout). Applies no migration.
    ///
    /// # Errors
    /// [`Error::Sqlite`] when the file cannot be opened; [`Error::Unreachable`] when
    /// the PostgreSQL server cannot be reached or refuses the login;
    /// [`Error::Invalid`] when SQLite cannot use WAL.
    pub(crate) fn open(location: &StoreLocation) -> Result<Self> {
        match location {
            StoreLocation::Sqlite(path) => sqlite::open(path).map(Conn::Sqlite),
            StoreLocation::Postgres(url) => {
                postgres::Conn::connect(url).map(|c| Conn::Postgres(Box::new(c)))
            }
        }
    }

    /// Whether the table exists (in the connection's schema, on PostgreSQL).
    pub(crate) fn has_table(&mut self, table: &str) -> Result<bool> {
        let sql = match self {
            Conn::Sqlite(_) => "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?1",
            Conn::Postgres(_) => {
                "SELECT 1 FROM information_schema.tables
                    WHERE table_schema = current_schema() AND table_name = ?1"
            }
        };
        Ok(self.query_opt(sql, args![table])?.is_some())
    }

    /// Runs `f` in one transaction holding the store's write lock and commits it;
    /// while the engine reports a transient failure the whole transaction is retried
    /// (for up to 30 s, pausing a little longer each time), so `f` may run
    /// more than once. When `f` fails the transaction is rolled back.
    pub(crate) fn write_tx<T>(&mut self, mut f: impl FnMut(&mut Tx<'_>) -> Result<T>) -> Result<T> {
        self.retrying(|conn| {
            let mut tx = conn.begin_write()?;
            let value = f(&mut tx)?;
            tx.commit()?;
            Ok(value)
        })
    }

    /// Runs `f` until it succeeds, fails with anything but a transient failure, or
    /// `RETRY_FOR` has passed (see [`retry`]); reconnects first when the connection
    /// was lost.
    pub(crate) fn retrying<T>(&mut self, f: impl FnMut(&mut Conn) -> Result<T>) -> Result<T> {
        retry(self, f, is_transient, |conn| {
            if let Conn::Postgres(c) = conn {
                c.reconnect_if_closed();
            }
        })
    }

    fn begin_write(&mut self) -> Result<Tx<'_>> {
        match self {
            Conn::Sqlite(c) => Ok(Tx::Sqlite(
                c.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?,
            )),
            Conn::Postgres(c) => c.begin_write().map(Tx::Postgres),
        }
    }
}

impl Tx<'_> {
    /// Commits the transaction.
    pub(crate) fn commit(self) -> Result<()> {
        match self {
            Tx::Sqlite(tx) => Ok(tx.commit()?),
            Tx::Postgres(tx) => tx.commit(),
        }
    }

    /// Runs a script of several statements (a migration).
    pub(crate) fn batch(&mut self, sql: &str) -> Result<()> {
        match self {
            Tx::Sqlite(tx) => Ok(tx.execute_batch(sql)?),
            Tx::Postgres(tx) => tx.batch(sql),
        }
    }
}

impl Sql for Conn {
    fn execute(&mut self, sql: &str, args: &[Arg]) -> Result<u64> {
        match self {
            Conn::Sqlite(c) => sqlite::execute(c, sql, args),
            Conn::Postgres(c) => c.execute(sql, args),
        }
    }

    fn query(&mut self, sql: &str, args: &[Arg]) -> Result<Vec<Row>> {
        match self {
            Conn::Sqlite(c) => sqlite::query(c, sql, args),
            Conn::Postgres(c) => c.query(sql, args),
        }
    }
}

impl Sql for Tx<'_> {
    fn execute(&mut self, sql: &str, args: &[Arg]) -> Result<u64> {
        match self {
            Tx::Sqlite(tx) => sqlite::execute(tx, sql, args),
            Tx::Postgres(tx) => tx.execute(sql, args),
        }
    }

    fn query(&mut self, sql: &str, args: &[Arg]) -> Result<Vec<Row>> {
        match self {
            Tx::Sqlite(tx) => sqlite::query(tx, sql, args),
            Tx::Postgres(tx) => tx.query(sql, args),
        }
    }
}

/// Whether an error is worth retrying the transaction for: another writer held the
/// lock for longer than [`LOCK_TIMEOUT`], the server dropped the connection, or it
/// asked for a retry (a serialisation failure, a deadlock).
pub(crate) fn is_transient(error: &Error) -> bool {
    match error {
        Error::Sqlite(e) => sqlite::is_busy(e),
        Error::Postgres(e) => postgres::is_transient(e),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locations_parse_and_hide_passwords() {
        let pg: StoreLocation = "postgresql://u:pw@h:5433/db?sslmode=disable"
            .parse()
            .unwrap();
        assert!(pg.is_postgres());
        assert_eq!(
            pg.to_string(),
            "postgresql://u:***@h:5433/db?sslmode=disable"
        );
        assert!(!format!("{pg:?}").contains("pw"));
        let file: StoreLocation = "a/kiln.sqlite".parse().unwrap();
        assert_eq!(file.sqlite_path(), Some(Path::new("a/kiln.sqlite")));
        assert!("".parse::<StoreLocation>().is_err());
    }
}

//! Schema migrations: numbered SQL files embedded in the binary and applied in order
//! when a database opens, each recorded in `schema_migrations` and never re-run.
//!
//! A shipped migration is never edited; a schema change is a new file
//! `migrations/NNNN_what.sql` added to [`MIGRATIONS`] (and an updated
//! `tests/schema.snapshot.sql`).

use rusqlite::{Connection, OptionalExtension, TransactionBehavior};

use crate::{Error, Result};

/// One migration: its version, file name and SQL.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Migration {
    /// Version, 1 for the first; the file name starts with it, zero-padded to 4 digits.
    pub(crate) version: i64,
    /// File name under `migrations/`.
    pub(crate) name: &'static str,
    /// The SQL, run as one batch.
    pub(crate) sql: &'static str,
}

/// Every migration, in the order they are applied.
pub(crate) const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "0001_initial.sql",
        sql: include_str!("../migrations/0001_initial.sql"),
    },
    Migration {
        version: 2,
        name: "0002_resumes.sql",
        sql: include_str!("../migrations/0002_resumes.sql"),
    },
];

/// The schema version this build creates.
pub(crate) fn latest_version() -> i64 {
    MIGRATIONS.last().map_or(0, |m| m.version)
}

const CREATE_SCHEMA_MIGRATIONS: &str = "CREATE TABLE IF NOT EXISTS schema_migrations (
    version     INTEGER PRIMARY KEY,
    applied_at  REAL NOT NULL
)";

/// The highest migration version recorded in the database, 0 for a fresh one.
pub(crate) fn current_version(conn: &Connection) -> Result<i64> {
    let has_table: Option<i64> = conn
        .query_row(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'schema_migrations'",
            [],
            |row| row.get(0),
        )
        .optional()?;
    if has_table.is_none() {
        return Ok(0);
    }
    let version: Option<i64> =
        conn.query_row("SELECT MAX(version) FROM schema_migrations", [], |row| {
            row.get(0)
        })?;
    Ok(version.unwrap_or(0))
}

/// Applies the migrations the database lacks, in one write transaction (so that
/// processes opening one database at once apply each migration once). Returns the
/// versions applied.
///
/// # Errors
/// [`Error::Invalid`] when the database was written by a newer kiln (it holds a
/// migration this build does not know); [`Error::Sqlite`] when a migration fails (then
/// none of them is applied).
pub(crate) fn apply(conn: &mut Connection, now: f64) -> Result<Vec<i64>> {
    let latest = latest_version();
    // Fast path, without taking the write lock: already up to date.
    if current_version(conn)? == latest {
        return Ok(Vec::new());
    }
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    tx.execute_batch(CREATE_SCHEMA_MIGRATIONS)?;
    let applied: Vec<i64> = {
        let mut stmt = tx.prepare("SELECT version FROM schema_migrations ORDER BY version")?;
        stmt.query_map([], |row| row.get(0))?
            .collect::<rusqlite::Result<_>>()?
    };
    if let Some(&unknown) = applied
        .iter()
        .find(|v| !MIGRATIONS.iter().any(|m| m.version == **v))
    {
        return Err(Error::Invalid(format!(
            "the database has schema migration {unknown}, which this kiln does not know \
             (it knows up to {latest}): it was written by a newer kiln"
        )));
    }
    let mut done = Vec::new();
    for migration in MIGRATIONS.iter().filter(|m| !applied.contains(&m.version)) {
        tracing::info!(
            version = migration.version,
            name = migration.name,
            "applying migration"
        );
        tx.execute_batch(migration.sql)?;
        tx.execute(
            "INSERT INTO schema_migrations (version, applied_at) VALUES (?1, ?2)",
            rusqlite::params![migration.version, now],
        )?;
        done.push(migration.version);
    }
    tx.commit()?;
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_are_consecutive_and_match_file_names() {
        for (i, m) in MIGRATIONS.iter().enumerate() {
            let expected = i64::try_from(i).unwrap() + 1;
            assert_eq!(m.version, expected, "{}", m.name);
            assert!(
                m.name.starts_with(&format!("{expected:04}_")) && m.name.ends_with(".sql"),
                "migration file {} must be named {expected:04}_<what>.sql",
                m.name
            );
            assert!(!m.sql.trim().is_empty(), "{} is empty", m.name);
        }
        assert_eq!(latest_version(), i64::try_from(MIGRATIONS.len()).unwrap());
    }

    #[test]
    fn every_migration_file_is_listed() {
        // Read at run time first: cargo may reuse a binary built in another checkout.
        let dir = std::path::PathBuf::from(
            std::env::var_os("CARGO_MANIFEST_DIR")
                .unwrap_or_else(|| env!("CARGO_MANIFEST_DIR").into()),
        )
        .join("migrations");
        let mut files: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| n.ends_with(".sql"))
            .collect();
        files.sort();
        let listed: Vec<&str> = MIGRATIONS.iter().map(|m| m.name).collect();
        assert_eq!(files, listed);
    }
}

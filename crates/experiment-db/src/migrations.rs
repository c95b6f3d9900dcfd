//! Schema migrations: numbered SQL files embedded in the binary and applied in order
//! when a store opens, each recorded in `schema_migrations` and never re-run.
//!
//! Each engine has its own files with the same numbers (`migrations/NNNN_what.sql` for
//! SQLite, `migrations/postgres/NNNN_what.sql` for PostgreSQL): the same tables in each
//! dialect's types. A shipped migration is never edited; a schema change is a new file
//! for each engine, added to [`SQLITE`] and [`POSTGRES`] (and an updated
//! `tests/schema.snapshot.sql`).

use crate::engine::{Conn, Sql, args};
use crate::{Error, Result};

/// One migration: its version, file name and SQL.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Migration {
    /// Version, 1 for the first; the file name starts with it, zero-padded to 4 digits.
    pub(crate) version: i64,
    /// File name under the engine's migrations folder.
    pub(crate) name: &'static str,
    /// The SQL, run as one batch.
    pub(crate) sql: &'static str,
}

/// SQLite's migrations, in the order they are applied.
pub(crate) const SQLITE: &[Migration] = &[
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

/// PostgreSQL's migrations, in the order they are applied: the same versions as
/// [`SQLITE`].
pub(crate) const POSTGRES: &[Migration] = &[
    Migration {
        version: 1,
        name: "0001_initial.sql",
        sql: include_str!("../migrations/postgres/0001_initial.sql"),
    },
    Migration {
        version: 2,
        name: "0002_resumes.sql",
        sql: include_str!("../migrations/postgres/0002_resumes.sql"),
    },
];

/// The migrations of the connection's engine.
fn migrations(conn: &Conn) -> &'static [Migration] {
    match conn {
        Conn::Sqlite(_) => SQLITE,
        Conn::Postgres(_) => POSTGRES,
    }
}

/// The schema version this build creates.
pub(crate) fn latest_version() -> i64 {
    SQLITE.last().map_or(0, |m| m.version)
}

/// The table of applied migrations, in the engine's types.
fn create_schema_migrations(conn: &Conn) -> &'static str {
    match conn {
        // SQLite keeps this text in its schema (tests/schema.snapshot.sql).
        Conn::Sqlite(_) => {
            "CREATE TABLE IF NOT EXISTS schema_migrations (
    version     INTEGER PRIMARY KEY,
    applied_at  REAL NOT NULL
)"
        }
        Conn::Postgres(_) => {
            "CREATE TABLE IF NOT EXISTS schema_migrations (
    version     BIGINT PRIMARY KEY,
    applied_at  DOUBLE PRECISION NOT NULL
)"
        }
    }
}

/// The highest migration version recorded in the store, 0 for a fresh one.
pub(crate) fn current_version(conn: &mut Conn) -> Result<i64> {
    if !conn.has_table("schema_migrations")? {
        return Ok(0);
    }
    let version: Option<i64> = conn
        .query_one("SELECT MAX(version) FROM schema_migrations", args![])?
        .get(0)?;
    Ok(version.unwrap_or(0))
}

/// Applies the migrations the store lacks, in one write transaction (so that
/// processes opening one store at once apply each migration once). Returns the
/// versions applied.
///
/// # Errors
/// [`Error::Invalid`] when the store was written by a newer kiln (it holds a migration
/// this build does not know); the engine's error when a migration fails (then none of
/// them is applied).
pub(crate) fn apply(conn: &mut Conn, now: f64) -> Result<Vec<i64>> {
    let latest = latest_version();
    // Fast path, without taking the write lock: already up to date.
    if current_version(conn)? == latest {
        return Ok(Vec::new());
    }
    let (migrations, create) = (migrations(conn), create_schema_migrations(conn));
    conn.write_tx(|tx| {
        tx.batch(create)?;
        let applied = tx
            .query(
                "SELECT version FROM schema_migrations ORDER BY version",
                args![],
            )?
            .iter()
            .map(|row| row.get::<i64>(0))
            .collect::<Result<Vec<_>>>()?;
        if let Some(&unknown) = applied
            .iter()
            .find(|v| !migrations.iter().any(|m| m.version == **v))
        {
            return Err(Error::Invalid(format!(
                "the store has schema migration {unknown}, which this kiln does not know \
                 (it knows up to {latest}): it was written by a newer kiln"
            )));
        }
        let mut done = Vec::new();
        for migration in migrations.iter().filter(|m| !applied.contains(&m.version)) {
            tracing::info!(
                version = migration.version,
                name = migration.name,
                "applying migration"
            );
            tx.batch(migration.sql)?;
            tx.execute(
                "INSERT INTO schema_migrations (version, applied_at) VALUES (?1, ?2)",
                args![migration.version, now],
            )?;
            done.push(migration.version);
        }
        Ok(done)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[rstest::rstest]
    #[case::sqlite(SQLITE)]
    #[case::postgres(POSTGRES)]
    fn versions_are_consecutive_and_match_file_names(#[case] list: &[Migration]) {
        for (i, m) in list.iter().enumerate() {
            let expected = i64::try_from(i).unwrap() + 1;
            assert_eq!(m.version, expected, "{}", m.name);
            assert!(
                m.name.starts_with(&format!("{expected:04}_")) && m.name.ends_with(".sql"),
                "migration file {} must be named {expected:04}_<what>.sql",
                m.name
            );
            assert!(!m.sql.trim().is_empty(), "{} is empty", m.name);
        }
        assert_eq!(latest_version(), i64::try_from(list.len()).unwrap());
    }

    #[test]
    fn both_engines_have_the_same_migrations() {
        let names =
            |list: &[Migration]| list.iter().map(|m| (m.version, m.name)).collect::<Vec<_>>();
        assert_eq!(names(SQLITE), names(POSTGRES));
    }

    #[rstest::rstest]
    #[case::sqlite("migrations", SQLITE)]
    #[case::postgres("migrations/postgres", POSTGRES)]
    fn every_migration_file_is_listed(#[case] folder: &str, #[case] list: &[Migration]) {
        // Read at run time first: cargo may reuse a binary built in another checkout.
        let dir = std::path::PathBuf::from(
            std::env::var_os("CARGO_MANIFEST_DIR")
                .unwrap_or_else(|| env!("CARGO_MANIFEST_DIR").into()),
        )
        .join(folder);
        let mut files: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| n.ends_with(".sql"))
            .collect();
        files.sort();
        let listed: Vec<&str> = list.iter().map(|m| m.name).collect();
        assert_eq!(files, listed);
    }
}

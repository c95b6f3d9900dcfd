//! Throwaway PostgreSQL databases for tests (feature `testing`): the store's own tests
//! and those of the crates that use it run their PostgreSQL cases on the server that
//! [`POSTGRES_ENV`] names (`.ci/run` starts one), each in a database of its own that
//! is dropped afterwards.

use std::sync::atomic::{AtomicU32, Ordering};

/// The variable naming the PostgreSQL server tests may use: the URL of a database
/// that a user allowed to create databases can connect to, e.g.
/// `postgres://kiln@/postgres?host=/tmp/pg` (a unix socket) or
/// `postgres://kiln:pw@127.0.0.1:5432/postgres`.
pub const POSTGRES_ENV: &str = "KILN_TEST_POSTGRES";

/// A fresh, empty database on the test server, dropped (connections and all) when
/// this is dropped.
#[derive(Debug)]
pub struct TempDatabase {
    /// The URL of the new database.
    pub url: String,
    admin: String,
    name: String,
}

impl TempDatabase {
    /// Creates a database on the server [`POSTGRES_ENV`] names. Without one, it says
    /// on stderr that the case is skipped and why, and returns `None`.
    ///
    /// # Panics
    /// When [`POSTGRES_ENV`] is not set under CI (`CI` set: CI runs every case), or the
    /// server it names cannot be reached or refuses to create the database.
    pub fn create() -> Option<Self> {
        let Some(admin) = std::env::var(POSTGRES_ENV).ok().filter(|v| !v.is_empty()) else {
            assert!(
                std::env::var_os("CI").is_none(),
                "{POSTGRES_ENV} is not set: CI runs the PostgreSQL cases (.ci/run starts a \
                 server and sets it)"
            );
            eprintln!(
                "skipped: this PostgreSQL case needs a server; set {POSTGRES_ENV}=\
                 postgres://USER@HOST/DB (a user that may create databases) to run it"
            );
            return None;
        };
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "kiln_test_{}_{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let mut client = postgres::Client::connect(&admin, postgres::NoTls)
            .unwrap_or_else(|e| panic!("cannot reach the test server {POSTGRES_ENV}: {e}"));
        // Two statements: CREATE DATABASE cannot share a (implicit) transaction.
        for sql in [
            format!("DROP DATABASE IF EXISTS {name}"),
            format!("CREATE DATABASE {name}"),
        ] {
            client
                .batch_execute(&sql)
                .unwrap_or_else(|e| panic!("{sql}: {}", crate::Error::from(e)));
        }
        Some(Self {
            url: with_database(&admin, &name),
            admin,
            name,
        })
    }
}

impl Drop for TempDatabase {
    fn drop(&mut self) {
        if let Ok(mut client) = postgres::Client::connect(&self.admin, postgres::NoTls) {
            let sql = format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name);
            if let Err(e) = client.batch_execute(&sql) {
                eprintln!("could not drop test database {}: {e}", self.name);
            }
        }
    }
}

/// `url` naming database `name` instead of its own.
fn with_database(url: &str, name: &str) -> String {
    let (head, query) = match url.split_once('?') {
        Some((head, query)) => (head, format!("?{query}")),
        None => (url, String::new()),
    };
    let authority_start = head.find("://").map_or(0, |i| i + 3);
    let base = match head[authority_start..].find('/') {
        Some(slash) => &head[..authority_start + slash],
        None => head,
    };
    format!("{base}/{name}{query}")
}

#[cfg(test)]
mod tests {
    use rstest::rstest;

    use super::*;

    #[rstest]
    #[case::socket(
        "postgres://kiln@/postgres?host=/tmp/pg",
        "postgres://kiln@/t1?host=/tmp/pg"
    )]
    #[case::tcp(
        "postgres://u:p@127.0.0.1:5432/postgres",
        "postgres://u:p@127.0.0.1:5432/t1"
    )]
    #[case::no_database("postgres://u@h", "postgres://u@h/t1")]
    fn the_database_name_is_replaced(#[case] url: &str, #[case] expected: &str) {
        assert_eq!(with_database(url, "t1"), expected);
    }
}

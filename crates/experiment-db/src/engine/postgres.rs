//! The PostgreSQL engine, through the `postgres` client: connecting (with errors that
//! say what went wrong), the store's write lock, numbering placeholders, a statement
//! cache per connection, binding [`Arg`]s by the types the server inferred, and
//! reading [`Row`]s.

use std::collections::HashMap;
use std::time::Duration;

use postgres::error::SqlState;
use postgres::types::{ToSql, Type};
use postgres::{Client, Config, NoTls, Statement};

use super::retry::LOCK_TIMEOUT;
use super::value::{Arg, Cell, Row};
use crate::{Error, Result};

/// The advisory lock every write transaction holds (pg_advisory_xact_lock's key):
/// writers of one database take turns, as on one SQLite file. "kiln" in ASCII.
const WRITE_LOCK: i64 = 0x6b69_6c6e;

/// How long connecting may take when the URL does not say (`connect_timeout`).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Fails with [`Error::Invalid`] naming what is wrong with a `postgres://` URL.
pub(super) fn check_url(url: &str) -> Result<()> {
    url.parse::<Config>().map(|_| ()).map_err(|e| {
        let why = diagnose(url).unwrap_or_else(|| e.to_string());
        Error::Invalid(format!(
            "malformed PostgreSQL URL {}: {why} (expected \
             postgres://user[:password]@host[:port]/dbname[?option=value&...])",
            masked(url)
        ))
    })
}

/// The options a URL's query may set (those of libpq that the client knows).
const URL_OPTIONS: &[&str] = &[
    "user",
    "password",
    "dbname",
    "options",
    "application_name",
    "sslmode",
    "host",
    "hostaddr",
    "port",
    "connect_timeout",
    "tcp_user_timeout",
    "keepalives",
    "keepalives_idle",
    "keepalives_interval",
    "keepalives_retries",
    "target_session_attrs",
    "channel_binding",
    "load_balance_hosts",
    "sslnegotiation",
];

/// What is wrong with a URL the client refused, where it can be said more precisely
/// than the client's "invalid connection string": a port that is not a number, or an
/// option the client does not know.
fn diagnose(url: &str) -> Option<String> {
    let rest = url.split_once("://")?.1;
    let (head, query) = rest.split_once('?').unwrap_or((rest, ""));
    let authority = head.split('/').next().unwrap_or_default();
    let hosts = authority
        .rsplit_once('@')
        .map_or(authority, |(_, hosts)| hosts);
    for host in hosts.split(',') {
        // An IPv6 address is bracketed; its port follows the bracket.
        let port = match host.rsplit_once(']') {
            Some((_, after)) => after.strip_prefix(':'),
            None => host.split_once(':').map(|(_, port)| port),
        };
        if let Some(port) = port
            && port.parse::<u16>().is_err()
        {
            return Some(format!(
                "invalid port {port:?}: expected a number in 0..=65535"
            ));
        }
    }
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let key = pair.split_once('=').map_or(pair, |(key, _)| key);
        if !URL_OPTIONS.contains(&key) {
            return Some(format!(
                "unknown option {key:?}: expected one of {}",
                URL_OPTIONS.join(", ")
            ));
        }
    }
    None
}

/// The URL with its password, if any, shown as `***` (in the user-info part and in a
/// `password=` query parameter).
pub(super) fn masked(url: &str) -> String {
    let mut out = url.to_string();
    if let Some(scheme_end) = out.find("://") {
        let rest = scheme_end + 3;
        let authority_end = out[rest..].find(['/', '?']).map_or(out.len(), |i| rest + i);
        if let Some(at) = out[rest..authority_end].rfind('@').map(|i| rest + i)
            && let Some(colon) = out[rest..at].find(':').map(|i| rest + i)
        {
            out.replace_range(colon + 1..at, "***");
        }
    }
    if let Some(query) = out.find('?') {
        let (head, tail) = out.split_at(query + 1);
        let tail: Vec<String> = tail
            .split('&')
            .map(|pair| match pair.split_once('=') {
                Some((key, _)) if key.eq_ignore_ascii_case("password") => format!("{key}=***"),
                _ => pair.to_string(),
            })
            .collect();
        out = format!("{head}{}", tail.join("&"));
    }
    out
}

/// Rewrites SQLite's placeholders as PostgreSQL's: `?N` becomes `$N`, and each bare
/// `?` the next number after the largest so far (as SQLite numbers them). Quoted
/// strings and identifiers are left alone.
pub(super) fn numbered(sql: &str) -> String {
    let mut out = String::with_capacity(sql.len() + 8);
    let mut chars = sql.chars().peekable();
    let mut quote: Option<char> = None;
    let mut largest = 0u32;
    while let Some(c) = chars.next() {
        match (quote, c) {
            (Some(q), c) => {
                out.push(c);
                if c == q {
                    quote = None;
                }
            }
            (None, '\'' | '"') => {
                quote = Some(c);
                out.push(c);
            }
            (None, '?') => {
                let mut digits = String::new();
                while let Some(d) = chars.peek().filter(|d| d.is_ascii_digit()) {
                    digits.push(*d);
                    chars.next();
                }
                let n = match digits.parse::<u32>() {
                    Ok(n) => n,
                    Err(_) => largest + 1,
                };
                largest = largest.max(n);
                out.push('$');
                out.push_str(&n.to_string());
            }
            (None, c) => out.push(c),
        }
    }
    out
}

/// Whether the failure is worth retrying: the connection was lost, the server is
/// shutting down or starting, another writer held the write lock for longer than
/// [`LOCK_TIMEOUT`], or the server asked for a retry.
pub(super) fn is_transient(error: &postgres::Error) -> bool {
    if error.is_closed() {
        return true;
    }
    match error.code() {
        Some(code) => [
            SqlState::T_R_SERIALIZATION_FAILURE,
            SqlState::T_R_DEADLOCK_DETECTED,
            SqlState::LOCK_NOT_AVAILABLE,
            SqlState::ADMIN_SHUTDOWN,
            SqlState::CRASH_SHUTDOWN,
            SqlState::CANNOT_CONNECT_NOW,
            SqlState::CONNECTION_EXCEPTION,
            SqlState::CONNECTION_FAILURE,
        ]
        .contains(code),
        // No SQL state: the socket failed.
        None => std::error::Error::source(error).is_some_and(|s| s.is::<std::io::Error>()),
    }
}

/// A connection to a PostgreSQL database.
pub(crate) struct Conn {
    client: Client,
    config: Config,
    url: String,
    /// Prepared statements by the SQL they were made from (SQLite's placeholders).
    statements: HashMap<String, Statement>,
}

impl Conn {
    /// Connects, with a connect timeout of [`CONNECT_TIMEOUT`] unless the URL sets
    /// one, and sets the connection's `lock_timeout` to [`LOCK_TIMEOUT`].
    ///
    /// # Errors
    /// [`Error::Invalid`] for a malformed URL; [`Error::Unreachable`] when the server
    /// cannot be reached or refuses the login, saying which.
    pub(super) fn connect(url: &str) -> Result<Self> {
        let mut config: Config = url.parse().map_err(|_| match check_url(url) {
            Err(e) => e,
            Ok(()) => Error::Invalid(format!("malformed PostgreSQL URL {}", masked(url))),
        })?;
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(CONNECT_TIMEOUT);
        }
        if config.get_application_name().is_none() {
            config.application_name("kiln");
        }
        let client = open_client(&config, url)?;
        Ok(Self {
            client,
            config,
            url: url.to_string(),
            statements: HashMap::new(),
        })
    }

    /// The URL, its password masked.
    pub(super) fn location(&self) -> String {
        masked(&self.url)
    }

    /// Connects again when the server closed the connection; a failure leaves it
    /// closed (the next statement then fails as transient again).
    pub(super) fn reconnect_if_closed(&mut self) {
        if !self.client.is_closed() {
            return;
        }
        match open_client(&self.config, &self.url) {
            Ok(client) => {
                tracing::info!(store = %self.location(), "reconnected to the experiment store");
                self.client = client;
                self.statements.clear();
            }
            Err(error) => tracing::debug!(%error, "cannot reconnect to the experiment store yet"),
        }
    }

    /// Begins a transaction that holds the store's write lock.
    pub(super) fn begin_write(&mut self) -> Result<Tx<'_>> {
        let mut tx = self.client.transaction()?;
        tx.batch_execute(&format!("SELECT pg_advisory_xact_lock({WRITE_LOCK})"))?;
        Ok(Tx {
            tx,
            statements: &mut self.statements,
        })
    }

    pub(super) fn execute(&mut self, sql: &str, args: &[Arg]) -> Result<u64> {
        self.once_more_if_closed(|c| {
            let stmt = prepared(&mut c.client, &mut c.statements, sql)?;
            let params = bind(args, stmt.params())?;
            Ok(c.client.execute(&stmt, &refs(&params))?)
        })
    }

    pub(super) fn query(&mut self, sql: &str, args: &[Arg]) -> Result<Vec<Row>> {
        self.once_more_if_closed(|c| {
            let stmt = prepared(&mut c.client, &mut c.statements, sql)?;
            let params = bind(args, stmt.params())?;
            c.client
                .query(&stmt, &refs(&params))?
                .iter()
                .map(row)
                .collect()
        })
    }

    /// Runs `f`, and once more after reconnecting when the connection was lost: a
    /// single statement outside a transaction (a read, or a heartbeat) is safe to run
    /// again.
    fn once_more_if_closed<T>(&mut self, mut f: impl FnMut(&mut Self) -> Result<T>) -> Result<T> {
        match f(self) {
            Err(Error::Postgres(_)) if self.client.is_closed() => {
                self.reconnect_if_closed();
                f(self)
            }
            other => other,
        }
    }
}

fn open_client(config: &Config, url: &str) -> Result<Client> {
    let mut client = config
        .connect(NoTls)
        .map_err(|e| unreachable_error(url, &e))?;
    client
        .batch_execute(&format!("SET lock_timeout = {}", LOCK_TIMEOUT.as_millis()))
        .map_err(|e| unreachable_error(url, &e))?;
    Ok(client)
}

/// A failure to connect, with what a person can do about it.
fn unreachable_error(url: &str, error: &postgres::Error) -> Error {
    let hint = match error.code() {
        Some(c) if *c == SqlState::INVALID_PASSWORD => {
            " (wrong password: check the URL's user and password)"
        }
        Some(c) if *c == SqlState::INVALID_AUTHORIZATION_SPECIFICATION => {
            " (the server refused this user: check pg_hba.conf and the user name)"
        }
        Some(c) if *c == SqlState::INVALID_CATALOG_NAME => {
            " (the database does not exist: create it first, e.g. `createdb NAME`)"
        }
        Some(_) => "",
        None => " (is the server running, and are the host and port right?)",
    };
    let reason = match std::error::Error::source(error) {
        Some(source) => format!("{error}: {source}"),
        None => error.to_string(),
    };
    Error::Unreachable {
        location: masked(url),
        reason: format!("{reason}{hint}"),
    }
}

/// The statement prepared for `sql` on this connection, from the cache when it was
/// prepared before.
fn prepared(
    client: &mut impl postgres::GenericClient,
    statements: &mut HashMap<String, Statement>,
    sql: &str,
) -> Result<Statement> {
    if let Some(stmt) = statements.get(sql) {
        return Ok(stmt.clone());
    }
    let stmt = client.prepare(&numbered(sql))?;
    statements.insert(sql.to_string(), stmt.clone());
    Ok(stmt)
}

/// A transaction that holds the store's write lock.
pub(crate) struct Tx<'c> {
    tx: postgres::Transaction<'c>,
    statements: &'c mut HashMap<String, Statement>,
}

impl Tx<'_> {
    pub(super) fn commit(self) -> Result<()> {
        Ok(self.tx.commit()?)
    }

    pub(super) fn batch(&mut self, sql: &str) -> Result<()> {
        Ok(self.tx.batch_execute(sql)?)
    }

    pub(super) fn execute(&mut self, sql: &str, args: &[Arg]) -> Result<u64> {
        let stmt = prepared(&mut self.tx, self.statements, sql)?;
        let params = bind(args, stmt.params())?;
        Ok(self.tx.execute(&stmt, &refs(&params))?)
    }

    pub(super) fn query(&mut self, sql: &str, args: &[Arg]) -> Result<Vec<Row>> {
        let stmt = prepared(&mut self.tx, self.statements, sql)?;
        let params = bind(args, stmt.params())?;
        self.tx
            .query(&stmt, &refs(&params))?
            .iter()
            .map(row)
            .collect()
    }
}

type Param = Box<dyn ToSql + Sync>;

fn refs(params: &[Param]) -> Vec<&(dyn ToSql + Sync)> {
    params.iter().map(AsRef::as_ref).collect()
}

/// The arguments as values of the types the server inferred for the placeholders.
fn bind(args: &[Arg], types: &[Type]) -> Result<Vec<Param>> {
    if args.len() != types.len() {
        return Err(Error::Invalid(format!(
            "the statement takes {} argument(s), {} given",
            types.len(),
            args.len()
        )));
    }
    args.iter()
        .zip(types)
        .enumerate()
        .map(|(i, (arg, ty))| {
            let mismatch = || {
                Error::Invalid(format!(
                    "placeholder ${} is {ty}, which cannot take {arg:?}",
                    i + 1
                ))
            };
            let value: Param = match (arg, ty) {
                (Arg::TooLarge(v), _) => return Err(Arg::too_large(*v)),
                (Arg::Null, &Type::INT8) => Box::new(None::<i64>),
                (Arg::Null, &Type::INT4) => Box::new(None::<i32>),
                (Arg::Null, &Type::FLOAT8) => Box::new(None::<f64>),
                (Arg::Null, &Type::BOOL) => Box::new(None::<bool>),
                (Arg::Null, _) => Box::new(None::<String>),
                (Arg::Int(v), &Type::INT8) => Box::new(*v),
                (Arg::Int(v), &Type::INT4) => Box::new(i32::try_from(*v).map_err(|_| mismatch())?),
                #[allow(clippy::cast_precision_loss)] // a whole number for a REAL column
                (Arg::Int(v), &Type::FLOAT8) => Box::new(*v as f64),
                (Arg::Real(v), &Type::FLOAT8) => Box::new(*v),
                (Arg::Text(v), &Type::TEXT | &Type::VARCHAR | &Type::NAME | &Type::BPCHAR) => {
                    Box::new(v.clone())
                }
                _ => return Err(mismatch()),
            };
            Ok(value)
        })
        .collect()
}

/// A row as [`Cell`]s, by the columns' types.
fn row(row: &postgres::Row) -> Result<Row> {
    let cells = row
        .columns()
        .iter()
        .enumerate()
        .map(|(i, column)| {
            let cell = match *column.type_() {
                Type::INT8 => row.try_get::<_, Option<i64>>(i)?.map(Cell::Int),
                Type::INT4 => row
                    .try_get::<_, Option<i32>>(i)?
                    .map(|v| Cell::Int(v.into())),
                Type::INT2 => row
                    .try_get::<_, Option<i16>>(i)?
                    .map(|v| Cell::Int(v.into())),
                Type::FLOAT8 => row.try_get::<_, Option<f64>>(i)?.map(Cell::Real),
                Type::FLOAT4 => row
                    .try_get::<_, Option<f32>>(i)?
                    .map(|v| Cell::Real(v.into())),
                Type::BOOL => row.try_get::<_, Option<bool>>(i)?.map(Cell::Bool),
                Type::TEXT | Type::VARCHAR | Type::NAME | Type::BPCHAR => {
                    row.try_get::<_, Option<String>>(i)?.map(Cell::Text)
                }
                ref other => {
                    return Err(Error::Invalid(format!(
                        "unexpected column type {other} in the experiment store (column {i}, {})",
                        column.name()
                    )));
                }
            };
            Ok(cell.unwrap_or(Cell::Null))
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(Row(cells))
}

#[cfg(test)]
mod tests {
    use rstest::rstest;

    use super::*;

    #[rstest]
    #[case::numbered("a = ?1 AND b = ?2 OR c = ?1", "a = $1 AND b = $2 OR c = $1")]
    #[case::bare("x IN (?, ?, ?)", "x IN ($1, $2, $3)")]
    #[case::bare_after_numbered("?3 ? ?", "$3 $4 $5")]
    #[case::quoted(
        "s = '?' AND t = ? AND \"?x\" = ?2",
        "s = '?' AND t = $1 AND \"?x\" = $2"
    )]
    fn placeholders_are_numbered(#[case] sql: &str, #[case] expected: &str) {
        assert_eq!(numbered(sql), expected);
    }

    #[rstest]
    #[case::user_info("postgres://u:secret@h/db", "postgres://u:***@h/db")]
    #[case::no_password("postgres://u@h:5432/db", "postgres://u@h:5432/db")]
    #[case::no_user("postgres:///db?host=/run/pg", "postgres:///db?host=/run/pg")]
    #[case::query_password(
        "postgres://h/db?user=u&password=secret",
        "postgres://h/db?user=u&password=***"
    )]
    #[case::at_in_password("postgres://u:p@ss@h/db", "postgres://u:***@h/db")]
    fn passwords_are_masked(#[case] url: &str, #[case] expected: &str) {
        assert_eq!(masked(url), expected);
    }

    #[rstest]
    #[case::bad_port("postgres://u@h:notaport/db", "invalid port \"notaport\"")]
    #[case::port_too_large("postgres://u@h:70000/db", "invalid port \"70000\"")]
    #[case::unknown_option("postgres://u@h/db?frobnicate=1", "unknown option \"frobnicate\"")]
    fn malformed_urls_are_named(#[case] url: &str, #[case] why: &str) {
        let err = check_url(url).unwrap_err().to_string();
        assert!(
            err.contains("malformed PostgreSQL URL postgres://u@h"),
            "{err}"
        );
        assert!(err.contains(why), "{err}");
    }
}

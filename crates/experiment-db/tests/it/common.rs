//! Helpers shared by the integration tests: real stores (SQLite files in temporary
//! directories, and fresh databases on a real PostgreSQL server), runs, points, raw
//! SQL beside the store's API, and the reference summary computed by a full scan.

use kiln_experiment_db::testing::TempDatabase;
use kiln_experiment_db::{ExperimentDb, MetricPoint, MetricSummaryRecord, NewRun, StoreLocation};
use tempfile::TempDir;

/// The engines every store test runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Engine {
    Sqlite,
    Postgres,
}

/// The advisory lock kiln's writers hold on PostgreSQL (engine/postgres.rs).
const WRITE_LOCK: i64 = 0x6b69_6c6e;

/// A fresh, empty store that is removed when dropped: a SQLite file in a temporary
/// directory, or a database of its own on the test's PostgreSQL server.
pub struct TempStore {
    pub location: StoreLocation,
    pub dir: TempDir,
    _database: Option<TempDatabase>,
}

impl TempStore {
    /// A new store on `engine`; `None` when the engine is PostgreSQL and no server was
    /// given, outside CI (see [`TempDatabase::create`]).
    pub fn new(engine: Engine) -> Option<Self> {
        let dir = tempfile::tempdir().unwrap();
        Some(match engine {
            Engine::Sqlite => Self {
                location: StoreLocation::Sqlite(dir.path().join("kiln.sqlite")),
                dir,
                _database: None,
            },
            Engine::Postgres => {
                let database = TempDatabase::create()?;
                Self {
                    location: StoreLocation::Postgres(database.url.clone()),
                    dir,
                    _database: Some(database),
                }
            }
        })
    }

    /// Opens the store (migrating it on first use).
    pub fn open(&self) -> ExperimentDb {
        ExperimentDb::open_location(&self.location).unwrap()
    }

    /// A connection of the test's own to the store's database, for SQL beside the
    /// store's API.
    pub fn raw(&self) -> Raw {
        match &self.location {
            StoreLocation::Sqlite(path) => Raw::Sqlite(rusqlite::Connection::open(path).unwrap()),
            StoreLocation::Postgres(url) => {
                Raw::Postgres(postgres::Client::connect(url, postgres::NoTls).unwrap())
            }
        }
    }

    /// The store's location as `--db` takes it.
    pub fn location_arg(&self) -> String {
        match &self.location {
            StoreLocation::Sqlite(path) => path.display().to_string(),
            StoreLocation::Postgres(url) => url.clone(),
        }
    }
}

/// A fresh store on `engine` and a handle on it; `None` when the case is skipped.
pub fn temp_store(engine: Engine) -> Option<(TempStore, ExperimentDb)> {
    let store = TempStore::new(engine)?;
    let db = store.open();
    Some((store, db))
}

/// A value bound to, or read from, raw SQL.
#[derive(Debug, Clone, PartialEq)]
pub enum Val {
    Null,
    Int(i64),
    Real(f64),
    Text(String),
}

impl From<i64> for Val {
    fn from(v: i64) -> Self {
        Val::Int(v)
    }
}

impl From<f64> for Val {
    fn from(v: f64) -> Self {
        Val::Real(v)
    }
}

impl From<Option<f64>> for Val {
    fn from(v: Option<f64>) -> Self {
        v.map_or(Val::Null, Val::Real)
    }
}

/// A connection of the test's own, to either engine. SQL is written with `?N`
/// placeholders.
pub enum Raw {
    Sqlite(rusqlite::Connection),
    Postgres(postgres::Client),
}

impl Raw {
    pub fn execute(&mut self, sql: &str, args: &[Val]) -> u64 {
        match self {
            Raw::Sqlite(c) => {
                let params = sqlite_args(args);
                c.execute(sql, rusqlite::params_from_iter(params)).unwrap() as u64
            }
            Raw::Postgres(c) => {
                let boxed = pg_args(args);
                let refs: Vec<&(dyn postgres::types::ToSql + Sync)> =
                    boxed.iter().map(AsRef::as_ref).collect();
                c.execute(&sql.replace('?', "$"), &refs).unwrap()
            }
        }
    }

    /// The rows of a query.
    pub fn query(&mut self, sql: &str, args: &[Val]) -> Vec<Vec<Val>> {
        match self {
            Raw::Sqlite(c) => {
                let params = sqlite_args(args);
                let mut stmt = c.prepare(sql).unwrap();
                let n = stmt.column_count();
                stmt.query_map(rusqlite::params_from_iter(params), |row| {
                    (0..n)
                        .map(|i| {
                            Ok(match row.get::<_, rusqlite::types::Value>(i)? {
                                rusqlite::types::Value::Null => Val::Null,
                                rusqlite::types::Value::Integer(v) => Val::Int(v),
                                rusqlite::types::Value::Real(v) => Val::Real(v),
                                rusqlite::types::Value::Text(v) => Val::Text(v),
                                rusqlite::types::Value::Blob(_) => panic!("a blob"),
                            })
                        })
                        .collect()
                })
                .unwrap()
                .collect::<rusqlite::Result<_>>()
                .unwrap()
            }
            Raw::Postgres(c) => {
                let boxed = pg_args(args);
                let refs: Vec<&(dyn postgres::types::ToSql + Sync)> =
                    boxed.iter().map(AsRef::as_ref).collect();
                c.query(&sql.replace('?', "$"), &refs)
                    .unwrap()
                    .iter()
                    .map(|row| {
                        (0..row.len())
                            .map(|i| match *row.columns()[i].type_() {
                                postgres::types::Type::INT8 => {
                                    row.get::<_, Option<i64>>(i).map_or(Val::Null, Val::Int)
                                }
                                postgres::types::Type::FLOAT8 => {
                                    row.get::<_, Option<f64>>(i).map_or(Val::Null, Val::Real)
                                }
                                _ => row.get::<_, Option<String>>(i).map_or(Val::Null, Val::Text),
                            })
                            .collect()
                    })
                    .collect()
            }
        }
    }

    /// Runs a script of statements without arguments.
    pub fn batch(&mut self, sql: &str) {
        match self {
            Raw::Sqlite(c) => c.execute_batch(sql).unwrap(),
            Raw::Postgres(c) => c.batch_execute(sql).unwrap(),
        }
    }

    /// The integer in the first column of the first row.
    pub fn int(&mut self, sql: &str, args: &[Val]) -> i64 {
        match self.query(sql, args).first().and_then(|r| r.first()) {
            Some(Val::Int(v)) => *v,
            other => panic!("{sql}: expected an integer, got {other:?}"),
        }
    }

    /// Takes the store's write lock and keeps it until [`Raw::unlock_writers`]: the
    /// store's writers wait (SQLite: an open `BEGIN IMMEDIATE`; PostgreSQL: the
    /// advisory lock they take).
    pub fn lock_writers(&mut self) {
        match self {
            Raw::Sqlite(c) => c.execute_batch("BEGIN IMMEDIATE").unwrap(),
            Raw::Postgres(c) => {
                c.batch_execute(&format!("SELECT pg_advisory_lock({WRITE_LOCK})"))
                    .unwrap();
            }
        }
    }

    pub fn unlock_writers(&mut self) {
        match self {
            Raw::Sqlite(c) => c.execute_batch("COMMIT").unwrap(),
            Raw::Postgres(c) => {
                c.batch_execute(&format!("SELECT pg_advisory_unlock({WRITE_LOCK})"))
                    .unwrap();
            }
        }
    }
}

fn sqlite_args(args: &[Val]) -> Vec<rusqlite::types::Value> {
    args.iter()
        .map(|a| match a {
            Val::Null => rusqlite::types::Value::Null,
            Val::Int(v) => rusqlite::types::Value::Integer(*v),
            Val::Real(v) => rusqlite::types::Value::Real(*v),
            Val::Text(v) => rusqlite::types::Value::Text(v.clone()),
        })
        .collect()
}

fn pg_args(args: &[Val]) -> Vec<Box<dyn postgres::types::ToSql + Sync>> {
    args.iter()
        .map(|a| -> Box<dyn postgres::types::ToSql + Sync> {
            match a {
                Val::Null => Box::new(None::<f64>),
                Val::Int(v) => Box::new(*v),
                Val::Real(v) => Box::new(*v),
                Val::Text(v) => Box::new(v.clone()),
            }
        })
        .collect()
}

pub fn new_run(experiment: &str, name: &str) -> NewRun {
    NewRun {
        experiment: experiment.into(),
        name: name.into(),
        config: serde_json::json!({"task": {"kind": "lm"}}),
        params: vec![],
        kiln_version: "0.1.0".into(),
        git_commit: None,
        host: "node-1".into(),
    }
}

pub fn with_params(mut run: NewRun, params: &[(&str, &str)]) -> NewRun {
    run.params = params
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    run
}

pub fn point(key: &str, split: &str, step: u64, value: f64) -> MetricPoint {
    MetricPoint {
        key: key.into(),
        split: split.into(),
        step,
        epoch: step / 10,
        value,
        wall_time: 1_700_000_000.0 + step as f64,
    }
}

/// `loss`/`train` points at the given `(step, value)`s.
pub fn losses(points: &[(u64, f64)]) -> Vec<MetricPoint> {
    points
        .iter()
        .map(|&(step, value)| point("loss", "train", step, value))
        .collect()
}

pub fn now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

/// What a `loss`/`train` summary must be, computed by scanning every point in write
/// order.
pub fn scan(points: &[(u64, f64)]) -> Option<MetricSummaryRecord> {
    let (mut last_step, mut last) = *points.first()?;
    let mut min: Option<(u64, f64)> = None;
    let mut max: Option<(u64, f64)> = None;
    for &(step, value) in points {
        if step >= last_step {
            (last_step, last) = (step, value);
        }
        if value.is_finite() {
            if min.is_none_or(|(_, m)| value < m) {
                min = Some((step, value));
            }
            if max.is_none_or(|(_, m)| value > m) {
                max = Some((step, value));
            }
        }
    }
    Some(MetricSummaryRecord {
        key: "loss".into(),
        split: "train".into(),
        last,
        last_step,
        min,
        max,
    })
}

pub fn same_summary(a: &MetricSummaryRecord, b: &MetricSummaryRecord) -> bool {
    let same = |x: f64, y: f64| x == y || (x.is_nan() && y.is_nan());
    a.key == b.key
        && a.split == b.split
        && same(a.last, b.last)
        && a.last_step == b.last_step
        && a.min == b.min
        && a.max == b.max
}

pub fn same_points(a: &[(u64, f64)], b: &[(u64, f64)]) -> bool {
    a.len() == b.len()
        && a.iter()
            .zip(b)
            .all(|(x, y)| x.0 == y.0 && (x.1 == y.1 || (x.1.is_nan() && y.1.is_nan())))
}

/// A seeded xorshift64 generator.
pub struct XorShift(pub u64);

impl XorShift {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// A number in `0..n`.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

CREATE TABLE artifacts (
    id          INTEGER PRIMARY KEY,
    run_id      INTEGER NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
    kind        TEXT NOT NULL,
    path        TEXT NOT NULL,
    size_bytes  INTEGER NOT NULL CHECK (size_bytes >= 0),
    sha256      TEXT,
    created_at  REAL NOT NULL
);

CREATE INDEX artifacts_by_run ON artifacts (run_id, kind);

CREATE TABLE experiments (
    id          INTEGER PRIMARY KEY,
    name        TEXT NOT NULL UNIQUE CHECK (name <> ''),
    created_at  REAL NOT NULL
);

CREATE TABLE metric_summaries (
    run_id      INTEGER NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
    key         TEXT NOT NULL,
    split       TEXT NOT NULL,
    last        REAL,
    last_step   INTEGER NOT NULL,
    min         REAL,
    min_step    INTEGER,
    max         REAL,
    max_step    INTEGER,
    PRIMARY KEY (run_id, key, split)
) WITHOUT ROWID;

CREATE TABLE metrics (
    id          INTEGER PRIMARY KEY,
    run_id      INTEGER NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
    key         TEXT NOT NULL,
    split       TEXT NOT NULL,
    step        INTEGER NOT NULL CHECK (step >= 0),
    epoch       INTEGER NOT NULL CHECK (epoch >= 0),
    value       REAL,
    wall_time   REAL NOT NULL,
    attempt     INTEGER NOT NULL DEFAULT 1 CHECK (attempt >= 1)
);

CREATE INDEX metrics_by_series ON metrics (run_id, key, split, step);

CREATE TABLE params (
    run_id  INTEGER NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
    key     TEXT NOT NULL,
    value   TEXT NOT NULL,
    PRIMARY KEY (run_id, key)
) WITHOUT ROWID;

CREATE TABLE run_resumes (
    run_id           INTEGER NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
    attempt          INTEGER NOT NULL CHECK (attempt >= 2),
    from_step        INTEGER NOT NULL CHECK (from_step >= 0),
    resumed_at       REAL NOT NULL,
    previous_status  TEXT NOT NULL
        CHECK (previous_status IN ('RUNNING', 'FINISHED', 'FAILED', 'KILLED')),
    previous_reason  TEXT,
    PRIMARY KEY (run_id, attempt)
) WITHOUT ROWID;

CREATE TABLE runs (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    experiment_id   INTEGER NOT NULL REFERENCES experiments (id) ON DELETE CASCADE,
    name            TEXT NOT NULL CHECK (name <> ''),
    status          TEXT NOT NULL CHECK (status IN ('RUNNING', 'FINISHED', 'FAILED', 'KILLED')),
    config_json     TEXT NOT NULL,
    kiln_version    TEXT NOT NULL,
    git_commit      TEXT,
    host            TEXT NOT NULL,
    started_at      REAL NOT NULL,
    ended_at        REAL,
    heartbeat_at    REAL,
    attempt         INTEGER NOT NULL DEFAULT 1 CHECK (attempt >= 1),
    failure_reason  TEXT,
    UNIQUE (experiment_id, name)
);

CREATE INDEX runs_by_start ON runs (started_at, id);

CREATE TABLE schema_migrations (
    version     INTEGER PRIMARY KEY,
    applied_at  REAL NOT NULL
);

CREATE TABLE sqlite_sequence(name,seq);

CREATE TABLE tags (
    run_id  INTEGER NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
    key     TEXT NOT NULL,
    value   TEXT NOT NULL,
    PRIMARY KEY (run_id, key)
) WITHOUT ROWID;

CREATE INDEX tags_by_key_value ON tags (key, value);


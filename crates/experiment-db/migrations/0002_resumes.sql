-- 0002: resume attempts.
--
-- A resumed run continues as a new attempt (runs.attempt + 1) from a step reached by
-- an earlier attempt; each resume is one row here. A metric point of attempt A at step
-- S is hidden from queries when a later attempt resumed from a step below S: the
-- points an abandoned attempt wrote after the resume step are kept, never deleted,
-- and never rewritten.

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

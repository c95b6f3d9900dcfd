-- 0002: resume attempts, PostgreSQL's edition of ../0002_resumes.sql.
--
-- A resumed run continues as a new attempt (runs.attempt + 1) from a step reached by
-- an earlier attempt; each resume is one row here. A metric point of attempt A at step
-- S is hidden from queries when a later attempt resumed from a step below S: the
-- points an abandoned attempt wrote after the resume step are kept, never deleted,
-- and never rewritten.

CREATE TABLE run_resumes (
    run_id           BIGINT NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
    attempt          BIGINT NOT NULL CHECK (attempt >= 2),
    from_step        BIGINT NOT NULL CHECK (from_step >= 0),
    resumed_at       DOUBLE PRECISION NOT NULL,
    previous_status  TEXT NOT NULL
        CHECK (previous_status IN ('RUNNING', 'FINISHED', 'FAILED', 'KILLED')),
    previous_reason  TEXT,
    PRIMARY KEY (run_id, attempt)
);

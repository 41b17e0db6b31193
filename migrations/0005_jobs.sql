-- Jobs: one command rolled out over many devices (docs/ARCHITECTURE.md,
-- "Jobs"). Written only by applying committed entries, like every table.
--
-- A job's counters (`n_*`) are kept by apply as its executions move, so
-- the rollout bounds and the abort rule read one row.
CREATE TABLE jobs (
    id                 TEXT PRIMARY KEY NOT NULL,
    state              TEXT NOT NULL CHECK (state IN
                           ('scheduled', 'in_progress', 'completed', 'canceled', 'aborted')),
    command_name       TEXT NOT NULL,
    params             TEXT NOT NULL,       -- JSON
    selector           TEXT,                -- JSON object of labels; NULL for a list of devices
    max_per_minute     INTEGER NOT NULL,
    max_in_flight      INTEGER NOT NULL,
    abort_percent      INTEGER,             -- NULL: no abort rule
    abort_min_finished INTEGER,
    timeout_ms         INTEGER NOT NULL,
    start_at           INTEGER,             -- ms since the epoch; NULL: at once
    reason             TEXT,                -- why it was aborted, or ran on part of its selector
    idempotency_key    TEXT,                -- the client's, if any: one job per key
    created_at         INTEGER NOT NULL,
    started_at         INTEGER,
    finished_at        INTEGER,
    updated_at         INTEGER NOT NULL,
    n_total            INTEGER NOT NULL DEFAULT 0,
    n_launched         INTEGER NOT NULL DEFAULT 0,
    n_queued           INTEGER NOT NULL DEFAULT 0,
    n_in_progress      INTEGER NOT NULL DEFAULT 0,
    n_succeeded        INTEGER NOT NULL DEFAULT 0,
    n_failed           INTEGER NOT NULL DEFAULT 0,
    n_timed_out        INTEGER NOT NULL DEFAULT 0,
    n_canceled         INTEGER NOT NULL DEFAULT 0,
    -- Launch credit (a token bucket): in 1/60,000ths of a launch, and the
    -- entry stamp (ms) it was computed at. Set when the job starts;
    -- refilled at max_per_minute up to one second's worth, debited by
    -- each launch (jobs::RateCredit).
    rate_credit        INTEGER NOT NULL DEFAULT 0,
    rate_at            INTEGER NOT NULL DEFAULT 0
);

CREATE INDEX jobs_state ON jobs (state, id);
CREATE UNIQUE INDEX jobs_idempotency_key ON jobs (idempotency_key)
    WHERE idempotency_key IS NOT NULL;

-- One execution per (job, device). `command` is set when it is launched
-- (its id is derived from the job and the device).
CREATE TABLE job_executions (
    job        TEXT NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    device     TEXT NOT NULL,
    status     TEXT NOT NULL CHECK (status IN
                   ('queued', 'in_progress', 'succeeded', 'failed', 'timed_out', 'canceled')),
    command    TEXT,
    updated_at INTEGER NOT NULL,
    PRIMARY KEY (job, device)
) WITHOUT ROWID;

CREATE INDEX job_executions_status ON job_executions (job, status, device);
CREATE INDEX job_executions_device ON job_executions (device, status);
CREATE UNIQUE INDEX job_executions_command ON job_executions (command)
    WHERE command IS NOT NULL;

-- Entente replicated state machine (gateway/src/state), SQLite.
--
-- Every row here is written only by applying committed log entries, so every
-- replica holds the same rows. Unsigned 64-bit values (times in ms since the
-- Unix epoch, versions, epochs, node ids, log indexes) are stored as INTEGER,
-- clamped to i64::MAX. JSON documents are stored as TEXT.

-- Bookkeeping: `applied_index` is the last log index applied; it is written
-- in the same transaction as the entries it covers (exactly-once apply).
CREATE TABLE meta (
    key   TEXT PRIMARY KEY NOT NULL,
    value INTEGER NOT NULL
) WITHOUT ROWID;

INSERT INTO meta (key, value) VALUES ('applied_index', 0);

-- API tokens, by SHA-256 (hex) of the token.
CREATE TABLE tokens (
    token_hash TEXT PRIMARY KEY NOT NULL,
    role       TEXT NOT NULL CHECK (role IN ('viewer', 'operator', 'admin')),
    name       TEXT NOT NULL,
    created_at INTEGER NOT NULL
) WITHOUT ROWID;

-- Registered devices. `presence_epoch` is the highest session epoch seen
-- (presence with a lower epoch is stale and ignored).
CREATE TABLE devices (
    id             TEXT PRIMARY KEY NOT NULL,
    secret_hash    TEXT NOT NULL,
    labels         TEXT NOT NULL,           -- JSON object of strings
    attributes     TEXT NOT NULL,           -- JSON
    online         INTEGER NOT NULL DEFAULT 0 CHECK (online IN (0, 1)),
    gateway        INTEGER,                 -- node id holding the session, if online
    presence_epoch INTEGER NOT NULL DEFAULT 0,
    created_at     INTEGER NOT NULL,
    updated_at     INTEGER NOT NULL
);

CREATE INDEX devices_online ON devices (online, id);
CREATE INDEX devices_gateway ON devices (gateway) WHERE gateway IS NOT NULL;

-- One row per (device, label key): the index behind the label filter.
-- `devices.labels` holds the same map for reading.
CREATE TABLE device_labels (
    device TEXT NOT NULL REFERENCES devices (id) ON DELETE CASCADE,
    key    TEXT NOT NULL,
    value  TEXT NOT NULL,
    PRIMARY KEY (device, key)
) WITHOUT ROWID;

CREATE INDEX device_labels_kv ON device_labels (key, value, device);

-- Shadows: one per device, created with it.
CREATE TABLE shadows (
    device           TEXT PRIMARY KEY NOT NULL REFERENCES devices (id) ON DELETE CASCADE,
    desired          TEXT NOT NULL,         -- JSON object
    reported         TEXT NOT NULL,         -- JSON object
    version          INTEGER NOT NULL,
    desired_updated  TEXT NOT NULL,         -- JSON object: top-level key -> ms
    reported_updated TEXT NOT NULL          -- JSON object: top-level key -> ms
);

-- Commands. A repeated (device, idempotency_key) returns the first command.
CREATE TABLE commands (
    id              TEXT PRIMARY KEY NOT NULL,
    device          TEXT NOT NULL REFERENCES devices (id) ON DELETE CASCADE,
    name            TEXT NOT NULL,
    params          TEXT NOT NULL,          -- JSON
    status          TEXT NOT NULL CHECK (status IN
                        ('queued', 'sent', 'accepted', 'succeeded', 'failed', 'expired', 'canceled')),
    output          TEXT,                   -- JSON, once a result arrived
    idempotency_key TEXT,
    issued_at       INTEGER NOT NULL,
    expires_at      INTEGER NOT NULL,
    updated_at      INTEGER NOT NULL
);

CREATE INDEX commands_device ON commands (device, id);
CREATE INDEX commands_device_status ON commands (device, status, id);
CREATE INDEX commands_status ON commands (status);
CREATE UNIQUE INDEX commands_idempotency ON commands (device, idempotency_key)
    WHERE idempotency_key IS NOT NULL;
CREATE INDEX commands_open_expiry ON commands (expires_at, id)
    WHERE status IN ('queued', 'sent', 'accepted');

-- Committed changes for the event stream, keyed by log index (at most one
-- event per entry). Bounded: apply drops events more than 100,000 indexes
-- behind the applied index.
CREATE TABLE events (
    idx  INTEGER PRIMARY KEY NOT NULL,
    kind TEXT NOT NULL,
    data TEXT NOT NULL                      -- JSON
);

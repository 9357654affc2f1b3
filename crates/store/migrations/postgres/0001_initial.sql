-- lienthong schema v1 (PostgreSQL). Times are integer microseconds since the Unix
-- epoch (UTC), as on SQLite, so time filters behave identically.

CREATE TABLE members (
    id              TEXT    NOT NULL PRIMARY KEY,
    display_name    TEXT    NOT NULL,
    roles           TEXT    NOT NULL, -- comma-separated role names
    enabled         BOOLEAN NOT NULL,
    disabled_reason TEXT    NOT NULL,
    created_at_us   BIGINT  NOT NULL,
    updated_at_us   BIGINT  NOT NULL
);

CREATE TABLE endpoints (
    id            TEXT    NOT NULL PRIMARY KEY,
    provider      TEXT    NOT NULL,
    url           TEXT    NOT NULL,
    created_at_us BIGINT  NOT NULL,
    UNIQUE (provider, url)
);

CREATE TABLE grants (
    id                    TEXT    NOT NULL PRIMARY KEY,
    consumer              TEXT    NOT NULL,
    record_type           TEXT    NOT NULL,
    fields                TEXT    NOT NULL, -- JSON GrantFields
    purposes              TEXT    NOT NULL, -- JSON array of strings
    valid_from_us         BIGINT  NOT NULL,
    valid_until_us        BIGINT,
    rate_limit_per_minute BIGINT  NOT NULL,
    revoked_at_us         BIGINT,
    revoked_reason        TEXT    NOT NULL,
    created_by            TEXT    NOT NULL,
    created_at_us         BIGINT  NOT NULL
);
CREATE INDEX grants_by_consumer ON grants (consumer, created_at_us);
CREATE INDEX grants_by_record_type ON grants (record_type, created_at_us);

CREATE TABLE record_type_versions (
    name             TEXT    NOT NULL,
    version          BIGINT  NOT NULL,
    description      TEXT    NOT NULL,
    owner            TEXT    NOT NULL,
    query_schema     TEXT    NOT NULL, -- JSON
    record_schema    TEXT    NOT NULL, -- JSON
    subject_key      TEXT    NOT NULL,
    deprecated       BOOLEAN NOT NULL,
    deprecation_note TEXT    NOT NULL,
    registered_at_us BIGINT  NOT NULL,
    registered_by    TEXT    NOT NULL,
    compatibility    TEXT    NOT NULL,
    field_pointers   TEXT    NOT NULL, -- JSON array of strings
    digest           TEXT    NOT NULL,
    PRIMARY KEY (name, version)
);

CREATE TABLE change_counter (
    id    BIGINT  NOT NULL PRIMARY KEY CHECK (id = 1),
    value BIGINT  NOT NULL
);
INSERT INTO change_counter (id, value) VALUES (1, 0);

CREATE TABLE audit_logs (
    log_id        TEXT    NOT NULL PRIMARY KEY,
    public_key    BYTEA   NOT NULL,
    created_at_us BIGINT  NOT NULL,
    size          BIGINT  NOT NULL DEFAULT 0 -- entries appended; kept in step by append_entries
);

CREATE TABLE audit_entries (
    log_id       TEXT    NOT NULL REFERENCES audit_logs (log_id),
    sequence     BIGINT  NOT NULL,
    leaf_hash    BYTEA   NOT NULL,
    leaf         TEXT    NOT NULL,
    time_us      BIGINT  NOT NULL,
    kind         TEXT    NOT NULL,
    actor        TEXT    NOT NULL,
    provider     TEXT    NOT NULL,
    record_type  TEXT    NOT NULL,
    purpose      TEXT    NOT NULL,
    outcome      TEXT    NOT NULL,
    subject_hash TEXT    NOT NULL,
    PRIMARY KEY (log_id, sequence)
);
CREATE INDEX audit_entries_by_actor ON audit_entries (log_id, actor, sequence);
CREATE INDEX audit_entries_by_provider ON audit_entries (log_id, provider, sequence);
CREATE INDEX audit_entries_by_record_type ON audit_entries (log_id, record_type, sequence);
CREATE INDEX audit_entries_by_purpose ON audit_entries (log_id, purpose, sequence);
CREATE INDEX audit_entries_by_outcome ON audit_entries (log_id, outcome, sequence);
CREATE INDEX audit_entries_by_kind ON audit_entries (log_id, kind, sequence);
CREATE INDEX audit_entries_by_time ON audit_entries (log_id, time_us);
-- Partial: most administrative entries have no subject.
CREATE INDEX audit_entries_by_subject ON audit_entries (subject_hash, time_us) WHERE subject_hash <> '';

CREATE TABLE tree_heads (
    log_id       TEXT    NOT NULL REFERENCES audit_logs (log_id),
    tree_size    BIGINT  NOT NULL,
    root_hash    BYTEA   NOT NULL,
    timestamp_ms BIGINT  NOT NULL,
    signature    BYTEA   NOT NULL,
    PRIMARY KEY (log_id, tree_size)
);

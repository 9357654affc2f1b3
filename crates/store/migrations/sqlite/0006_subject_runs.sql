-- A citizen's history is found through sorted runs of postings instead of an
-- index on the entries. Subject hashes are random, so each entry fell on a
-- page of that index of its own, and every audit commit wrote one such page
-- per entry: a quarter of the broker's CPU per lookup, and most of what the
-- database file's sync flushed. Runs are written in key order, a few pages
-- for thousands of entries, and merged in the background (subjects.rs).
-- Entries logged before this migration are indexed the same way, in the
-- background, from the first start; until then histories read them directly.

-- Entries of a log below this sequence are in live runs; the others are read
-- directly when a history is asked for.
ALTER TABLE audit_logs ADD COLUMN subject_indexed INTEGER NOT NULL DEFAULT 0;

CREATE TABLE audit_subject_runs (
    run          INTEGER NOT NULL PRIMARY KEY,
    -- The run indexes entries [first_seq, end_seq) of this log.
    log_no       INTEGER NOT NULL REFERENCES audit_logs (log_no),
    first_seq    INTEGER NOT NULL,
    end_seq      INTEGER NOT NULL,
    level        INTEGER NOT NULL,
    -- live: read by queries; building: being merged into from the runs whose
    -- merging_into names it; dead: replaced, its postings being deleted.
    state        TEXT    NOT NULL CHECK (state IN ('live', 'building', 'dead')),
    postings     INTEGER NOT NULL,
    next_chunk   INTEGER NOT NULL DEFAULT 0,
    merging_into INTEGER
);

CREATE TABLE audit_subject_postings (
    run          INTEGER NOT NULL,
    subject_hash BLOB    NOT NULL,
    time_us      INTEGER NOT NULL,
    log_no       INTEGER NOT NULL,
    sequence     INTEGER NOT NULL,
    PRIMARY KEY (run, subject_hash, time_us, log_no, sequence)
) WITHOUT ROWID;

DROP INDEX audit_entries_by_subject;

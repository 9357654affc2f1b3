-- A citizen's history is found through sorted runs of postings instead of an
-- index on the entries. Subject hashes are random, so each entry fell on a
-- page of that index of its own, and every audit commit wrote one such page
-- per entry: a quarter of the broker's CPU per lookup and most of what the
-- database file's sync flushes. Runs are written in key order, a few pages
-- for thousands of entries, and merged in the background (see subjects.rs).

-- Entries of a log below this sequence are in live runs; the others are read
-- directly when a history is asked for.
ALTER TABLE audit_logs ADD COLUMN subject_indexed INTEGER NOT NULL DEFAULT 0;

CREATE TABLE audit_subject_runs (
    run          INTEGER NOT NULL PRIMARY KEY,
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

-- The entries already logged make one run, above the levels that are merged.
INSERT INTO audit_subject_runs (run, level, state, postings)
SELECT 1, 1000, 'live', COUNT(*) FROM audit_entries
WHERE subject_hash IS NOT NULL AND kind = 'access'
HAVING COUNT(*) > 0;

INSERT INTO audit_subject_postings (run, subject_hash, time_us, log_no, sequence)
SELECT 1, subject_hash, time_us, log_no, sequence FROM audit_entries
WHERE subject_hash IS NOT NULL AND kind = 'access'
ORDER BY subject_hash, time_us, log_no, sequence;

UPDATE audit_logs SET subject_indexed = size;

DROP INDEX audit_entries_by_subject;

-- Fewer B-trees per audit entry. Every durable lookup waits for its entry's
-- commit, and each secondary index added a B-tree insert and usually a dirty
-- page per commit (see BENCHMARKS.md). An allowed access entry now updates the
-- table and five indexes (actor, provider, record type, time, subject)
-- instead of eight.
--
-- Outcome and kind have a few values and one of them is nearly every row: a
-- full index on them never narrowed a scan of allowed access entries, while the
-- rare ones (denials, failures, authentication and admin entries) are what an
-- auditor asks for. Partial indexes keep those fast and cost nothing for the
-- common row. Queries name the partial-index predicate literally so both
-- planners can use them.
DROP INDEX audit_entries_by_outcome;
DROP INDEX audit_entries_by_kind;
CREATE INDEX audit_entries_not_allowed ON audit_entries (log_id, outcome, sequence) WHERE outcome <> 'allowed';
CREATE INDEX audit_entries_not_access ON audit_entries (log_id, kind, sequence) WHERE kind <> 'access';

-- Purpose is asked together with a consumer or a record type, whose indexes
-- narrow the scan; the purpose is checked on those rows.
DROP INDEX audit_entries_by_purpose;

-- Stored nodes of each log's Merkle tree, so that an inclusion or consistency
-- proof reads O(log n) rows instead of every leaf hash of the log.
--
-- A row is the RFC 9162 hash of the perfect subtree over leaves
-- [idx * 2^level, (idx + 1) * 2^level), for levels 8 and up (subtrees of 256
-- leaves and larger: about one row per 128 entries). Below level 8 a proof
-- hashes the stored leaf hashes of one or two 256-leaf blocks. The writer
-- stores the nodes an append completes in the append's own transaction; the
-- broker fills them in for entries written before this migration when it
-- opens the log.
CREATE TABLE audit_tree_nodes (
    log_no BIGINT  NOT NULL REFERENCES audit_logs (log_no),
    level  INTEGER NOT NULL,
    idx    BIGINT  NOT NULL,
    hash   BYTEA   NOT NULL,
    PRIMARY KEY (log_no, level, idx)
);

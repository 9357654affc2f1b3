-- A grant's rate limit counted for the whole federation: one token bucket
-- per grant, shared by every replica. Replicas take tokens from it a few at
-- a time (a lease), so a lookup rarely waits for the database; the tokens
-- handed out never exceed what one bucket allows. `units`: tokens times
-- 60,000,000 (microseconds per minute), so a bucket of N per minute refills
-- N units per microsecond; `updated_us`: the database's clock at the last
-- take, so the replicas' own clocks do not matter.
CREATE TABLE grant_rate_buckets (
    grant_id   TEXT   NOT NULL PRIMARY KEY,
    units      BIGINT NOT NULL,
    updated_us BIGINT NOT NULL
);

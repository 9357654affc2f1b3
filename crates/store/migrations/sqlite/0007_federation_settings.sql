-- Settings the federation's brokers must agree on, recorded by the first
-- broker to start. `subject_key_fingerprint`: a hash of the subject HMAC
-- secret, so that a replica started with another secret (whose lookups no
-- citizen's history would find) refuses to start instead of logging them.
CREATE TABLE federation_settings (
    name  TEXT NOT NULL PRIMARY KEY,
    value TEXT NOT NULL
);

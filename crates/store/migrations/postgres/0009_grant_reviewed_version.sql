-- The record type version a grant's fields were checked against when it was
-- made. A grant covers fields as that version declares them; without the
-- number, the broker had to guess it from registration times, and a newer
-- version (deprecated, or not yet seen by the replica making the grant)
-- could widen a grant nobody had reviewed against it. NULL for grants made
-- before: the newest version in use when they were made stands in.
ALTER TABLE grants ADD COLUMN reviewed_version BIGINT;

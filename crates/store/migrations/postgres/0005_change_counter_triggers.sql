-- Every change to the federation's registry moves the change counter, and
-- announces it to the other replicas, in its own transaction. The broker used
-- to bump the counter in a transaction of its own after the change and its
-- audit entry: when either of those failed after the change had committed (a
-- revocation whose audit commit timed out), the counter did not move and no
-- replica ever reloaded it, so a revoked grant kept releasing data until the
-- next unrelated change or a restart. The notification is delivered at commit.
CREATE FUNCTION lienthong_registry_changed() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    v BIGINT;
BEGIN
    UPDATE change_counter SET value = value + 1 WHERE id = 1 RETURNING value INTO v;
    PERFORM pg_notify('lienthong_changes', v::text);
    RETURN NULL;
END
$$;

CREATE TRIGGER members_changed AFTER INSERT OR UPDATE OR DELETE ON members
    FOR EACH STATEMENT EXECUTE FUNCTION lienthong_registry_changed();
CREATE TRIGGER endpoints_changed AFTER INSERT OR UPDATE OR DELETE ON endpoints
    FOR EACH STATEMENT EXECUTE FUNCTION lienthong_registry_changed();
CREATE TRIGGER grants_changed AFTER INSERT OR UPDATE OR DELETE ON grants
    FOR EACH STATEMENT EXECUTE FUNCTION lienthong_registry_changed();
CREATE TRIGGER record_types_changed AFTER INSERT OR UPDATE OR DELETE ON record_type_versions
    FOR EACH STATEMENT EXECUTE FUNCTION lienthong_registry_changed();

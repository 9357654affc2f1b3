-- Every change to the federation's registry moves the change counter in its
-- own transaction. The broker used to bump the counter in a transaction of its
-- own after the change and its audit entry: when either of those failed after
-- the change had committed (a revocation whose audit commit timed out), the
-- counter did not move and no broker ever reloaded it, so a revoked grant
-- kept releasing data until the next unrelated change or a restart.
CREATE TRIGGER members_changed_insert AFTER INSERT ON members
BEGIN UPDATE change_counter SET value = value + 1 WHERE id = 1; END;
CREATE TRIGGER members_changed_update AFTER UPDATE ON members
BEGIN UPDATE change_counter SET value = value + 1 WHERE id = 1; END;
CREATE TRIGGER members_changed_delete AFTER DELETE ON members
BEGIN UPDATE change_counter SET value = value + 1 WHERE id = 1; END;

CREATE TRIGGER endpoints_changed_insert AFTER INSERT ON endpoints
BEGIN UPDATE change_counter SET value = value + 1 WHERE id = 1; END;
CREATE TRIGGER endpoints_changed_update AFTER UPDATE ON endpoints
BEGIN UPDATE change_counter SET value = value + 1 WHERE id = 1; END;
CREATE TRIGGER endpoints_changed_delete AFTER DELETE ON endpoints
BEGIN UPDATE change_counter SET value = value + 1 WHERE id = 1; END;

CREATE TRIGGER grants_changed_insert AFTER INSERT ON grants
BEGIN UPDATE change_counter SET value = value + 1 WHERE id = 1; END;
CREATE TRIGGER grants_changed_update AFTER UPDATE ON grants
BEGIN UPDATE change_counter SET value = value + 1 WHERE id = 1; END;
CREATE TRIGGER grants_changed_delete AFTER DELETE ON grants
BEGIN UPDATE change_counter SET value = value + 1 WHERE id = 1; END;

CREATE TRIGGER record_types_changed_insert AFTER INSERT ON record_type_versions
BEGIN UPDATE change_counter SET value = value + 1 WHERE id = 1; END;
CREATE TRIGGER record_types_changed_update AFTER UPDATE ON record_type_versions
BEGIN UPDATE change_counter SET value = value + 1 WHERE id = 1; END;
CREATE TRIGGER record_types_changed_delete AFTER DELETE ON record_type_versions
BEGIN UPDATE change_counter SET value = value + 1 WHERE id = 1; END;

-- Member certificates the brokers refuse although the federation CA signed
-- them and they have not expired (a leaked key, a member moved to a new
-- certificate). The broker identifies a member by the SPIFFE ID its
-- certificate names, so without this list a leaked certificate could only be
-- shut out by disabling the member, which also refuses its new certificate.
-- Rows are never deleted: a revocation is permanent, and its history stays
-- explainable.
CREATE TABLE revoked_certificates (
    fingerprint   TEXT    NOT NULL PRIMARY KEY, -- SHA-256 of the DER, 64 lowercase hex digits
    member_id     TEXT    NOT NULL,
    reason        TEXT    NOT NULL,
    not_after_us  INTEGER,                      -- the certificate's expiry, when known
    revoked_at_us INTEGER NOT NULL,
    revoked_by    TEXT    NOT NULL
);

CREATE TRIGGER revoked_certificates_changed_insert AFTER INSERT ON revoked_certificates
BEGIN UPDATE change_counter SET value = value + 1 WHERE id = 1; END;
CREATE TRIGGER revoked_certificates_changed_update AFTER UPDATE ON revoked_certificates
BEGIN UPDATE change_counter SET value = value + 1 WHERE id = 1; END;
CREATE TRIGGER revoked_certificates_changed_delete AFTER DELETE ON revoked_certificates
BEGIN UPDATE change_counter SET value = value + 1 WHERE id = 1; END;

-- Member certificates the brokers refuse although the federation CA signed
-- them and they have not expired (a leaked key, a member moved to a new
-- certificate). The broker identifies a member by the SPIFFE ID its
-- certificate names, so without this list a leaked certificate could only be
-- shut out by disabling the member, which also refuses its new certificate.
-- Rows are never deleted: a revocation is permanent, and its history stays
-- explainable. Every replica reloads the list through the change counter.
CREATE TABLE revoked_certificates (
    fingerprint   TEXT   NOT NULL PRIMARY KEY, -- SHA-256 of the DER, 64 lowercase hex digits
    member_id     TEXT   NOT NULL,
    reason        TEXT   NOT NULL,
    not_after_us  BIGINT,                      -- the certificate's expiry, when known
    revoked_at_us BIGINT NOT NULL,
    revoked_by    TEXT   NOT NULL
);

CREATE TRIGGER revoked_certificates_changed AFTER INSERT OR UPDATE OR DELETE ON revoked_certificates
    FOR EACH STATEMENT EXECUTE FUNCTION lienthong_registry_changed();

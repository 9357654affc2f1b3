//! Row shapes shared by both backends (`sqlx::FromRow` derives a decoder for
//! each database) and their conversion to and from the domain types.

use crate::{LogInfo, Result, StoreError, StoredEntry, StoredTreeHead};
use lienthong_core::audit::{EntryKind, Outcome};
use lienthong_core::{
    Compatibility, Endpoint, Fingerprint, Grant, GrantFields, Member, MemberId, RecordTypeDefinition,
    RecordTypeVersion, RevokedCertificate, Role,
};
use serde::Serialize;
use serde::de::DeserializeOwned;
use time::OffsetDateTime;

/// Microseconds since the epoch, rounded down (both backends use this column format).
pub(crate) fn to_us(t: OffsetDateTime) -> i64 {
    let us = t.unix_timestamp_nanos().div_euclid(1000);
    // `time` limits years to ±9999, well inside i64 microseconds.
    i64::try_from(us).unwrap_or(if us < 0 { i64::MIN } else { i64::MAX })
}

pub(crate) fn from_us(us: i64, column: &str) -> Result<OffsetDateTime> {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(us) * 1000)
        .map_err(|_| StoreError::Corrupt(format!("{column} holds an out-of-range time")))
}

/// Converts a `u64` counter or sequence to the signed column type.
pub(crate) fn to_i64(v: u64, what: &str) -> Result<i64> {
    i64::try_from(v).map_err(|_| StoreError::Config(format!("{what} {v} is beyond the database's range")))
}

pub(crate) fn to_u64(v: i64, column: &str) -> Result<u64> {
    u64::try_from(v).map_err(|_| StoreError::Corrupt(format!("{column} holds a negative value")))
}

fn to_u32(v: i64, column: &str) -> Result<u32> {
    u32::try_from(v).map_err(|_| StoreError::Corrupt(format!("{column} holds {v}, outside 0..=4294967295")))
}

fn member_id(s: String, column: &str) -> Result<MemberId> {
    MemberId::new(s).map_err(|_| StoreError::Corrupt(format!("{column} holds an invalid member id")))
}

pub(crate) fn to_json<T: Serialize + ?Sized>(v: &T, what: &str) -> Result<String> {
    serde_json::to_string(v).map_err(|e| StoreError::Config(format!("cannot encode {what} as JSON: {e}")))
}

fn from_json<T: DeserializeOwned>(s: &str, column: &str) -> Result<T> {
    serde_json::from_str(s).map_err(|e| StoreError::Corrupt(format!("{column} is not valid JSON for its type: {e}")))
}

fn hash32(v: Vec<u8>, column: &str) -> Result<[u8; 32]> {
    <[u8; 32]>::try_from(v.as_slice())
        .map_err(|_| StoreError::Corrupt(format!("{column} holds {} bytes, expected 32", v.len())))
}

/// Roles as stored: comma-separated [`Role::as_str`] names.
pub(crate) fn roles_text(roles: &[Role]) -> String {
    roles.iter().map(|r| r.as_str()).collect::<Vec<_>>().join(",")
}

/// The stable name of a compatibility mode (its serde name).
pub(crate) fn compatibility_text(c: Compatibility) -> Result<String> {
    match serde_json::to_value(c) {
        Ok(serde_json::Value::String(s)) => Ok(s),
        _ => Err(StoreError::Config("cannot encode the compatibility mode".into())),
    }
}

/// Decodes the rows of a table read whole, leaving out (with an error
/// naming it) a row that cannot be decoded, so that one odd row does not
/// stop every replica from loading the federation. Only for tables where a
/// row left out takes capabilities away and gives none: a member (then
/// unknown: it cannot call, and its register is not called), a grant (access
/// is denied by default), an endpoint (a register is not called there).
/// Revoked certificates and record type versions are decoded whole or not
/// at all: see `list_revoked_certificates` and `list_record_type_versions`.
pub(crate) fn decode_or_skip<R, T>(
    rows: Vec<R>,
    table: &str,
    key: impl Fn(&R) -> String,
    decode: impl Fn(R) -> Result<T>,
) -> Vec<T> {
    let mut decoded = Vec::with_capacity(rows.len());
    for row in rows {
        let name = key(&row);
        match decode(row) {
            Ok(v) => decoded.push(v),
            Err(e) => tracing::error!(
                table = %table,
                row = %name,
                error = %e,
                "a row cannot be decoded and is left out, which takes away what it would allow; repair or delete it"
            ),
        }
    }
    decoded
}

/// `e`, saying which row it is about when it is the row's content at fault.
fn name_row(e: StoreError, row: &str) -> StoreError {
    match e {
        StoreError::Corrupt(m) => StoreError::Corrupt(format!("{row}: {m}")),
        other => other,
    }
}

#[derive(sqlx::FromRow)]
pub(crate) struct MemberRow {
    id: String,
    display_name: String,
    roles: String,
    enabled: bool,
    disabled_reason: String,
    created_at_us: i64,
    updated_at_us: i64,
}

impl MemberRow {
    /// The row's id, to name it in a log.
    pub(crate) fn key(&self) -> String {
        format!("{:?}", self.id)
    }

    /// The member, refusing a role this version does not know: a member read
    /// to be changed and written back must not lose it.
    pub(crate) fn into_member(self) -> Result<Member> {
        let roles = self
            .roles
            .split(',')
            .filter(|r| !r.is_empty())
            .map(|r| {
                Role::parse(r).ok_or_else(|| StoreError::Corrupt(format!("members.roles holds unknown role {r:?}")))
            })
            .collect::<Result<Vec<_>>>()?;
        self.with_roles(roles)
    }

    /// The member with the roles this version knows, for reading only. A
    /// role it does not know (one a newer replica on the same database
    /// gave) is left out with a warning: a role only grants, so the member
    /// is refused what the role would allow here, and nothing else.
    pub(crate) fn into_member_known_roles(self) -> Result<Member> {
        let mut roles = Vec::new();
        for r in self.roles.split(',').filter(|r| !r.is_empty()) {
            match Role::parse(r) {
                Some(role) => roles.push(role),
                None => tracing::warn!(
                    member = %self.id,
                    role = %r,
                    "members.roles holds a role this version does not know; the member is treated as not holding it"
                ),
            }
        }
        self.with_roles(roles)
    }

    fn with_roles(self, roles: Vec<Role>) -> Result<Member> {
        Ok(Member {
            id: member_id(self.id, "members.id")?,
            display_name: self.display_name,
            roles,
            enabled: self.enabled,
            disabled_reason: self.disabled_reason,
            created_at: from_us(self.created_at_us, "members.created_at_us")?,
            updated_at: from_us(self.updated_at_us, "members.updated_at_us")?,
        })
    }
}

#[derive(sqlx::FromRow)]
pub(crate) struct RevokedCertificateRow {
    fingerprint: String,
    member_id: String,
    reason: String,
    not_after_us: Option<i64>,
    revoked_at_us: i64,
    revoked_by: String,
}

impl RevokedCertificateRow {
    /// The revocation. One that cannot be decoded fails the reload it is
    /// read for, so the error names its row (by what it holds, escaped): the
    /// operator must find it to repair it, and must not delete the wrong one.
    pub(crate) fn into_revoked(self) -> Result<RevokedCertificate> {
        let row = format!(
            "revoked_certificates row fingerprint={:?} member_id={:?}",
            self.fingerprint, self.member_id
        );
        self.decode_revoked().map_err(|e| name_row(e, &row))
    }

    fn decode_revoked(self) -> Result<RevokedCertificate> {
        Ok(RevokedCertificate {
            fingerprint: {
                let mut bytes = [0u8; 32];
                hex::decode_to_slice(&self.fingerprint, &mut bytes).map_err(|_| {
                    StoreError::Corrupt("revoked_certificates.fingerprint holds an invalid fingerprint".into())
                })?;
                Fingerprint(bytes)
            },
            member: member_id(self.member_id, "revoked_certificates.member_id")?,
            reason: self.reason,
            not_after: self
                .not_after_us
                .map(|us| from_us(us, "revoked_certificates.not_after_us"))
                .transpose()?,
            revoked_at: from_us(self.revoked_at_us, "revoked_certificates.revoked_at_us")?,
            revoked_by: member_id(self.revoked_by, "revoked_certificates.revoked_by")?,
        })
    }
}

#[derive(sqlx::FromRow)]
pub(crate) struct EndpointRow {
    id: String,
    provider: String,
    url: String,
    created_at_us: i64,
}

impl EndpointRow {
    /// The row's id, to name it in a log.
    pub(crate) fn key(&self) -> String {
        format!("{:?}", self.id)
    }

    pub(crate) fn into_endpoint(self) -> Result<Endpoint> {
        Ok(Endpoint {
            id: self.id,
            provider: member_id(self.provider, "endpoints.provider")?,
            url: self.url,
            created_at: from_us(self.created_at_us, "endpoints.created_at_us")?,
        })
    }
}

#[derive(sqlx::FromRow)]
pub(crate) struct GrantRow {
    id: String,
    consumer: String,
    record_type: String,
    fields: String,
    purposes: String,
    valid_from_us: i64,
    valid_until_us: Option<i64>,
    rate_limit_per_minute: i64,
    revoked_at_us: Option<i64>,
    revoked_reason: String,
    created_by: String,
    created_at_us: i64,
    reviewed_version: Option<i64>,
}

impl GrantRow {
    /// The row's id, to name it in a log.
    pub(crate) fn key(&self) -> String {
        format!("{:?}", self.id)
    }

    pub(crate) fn into_grant(self) -> Result<Grant> {
        Ok(Grant {
            id: self.id,
            consumer: member_id(self.consumer, "grants.consumer")?,
            record_type: self.record_type,
            fields: from_json::<GrantFields>(&self.fields, "grants.fields")?,
            purposes: from_json(&self.purposes, "grants.purposes")?,
            valid_from: from_us(self.valid_from_us, "grants.valid_from_us")?,
            valid_until: self
                .valid_until_us
                .map(|t| from_us(t, "grants.valid_until_us"))
                .transpose()?,
            rate_limit_per_minute: to_u32(self.rate_limit_per_minute, "grants.rate_limit_per_minute")?,
            revoked_at: self
                .revoked_at_us
                .map(|t| from_us(t, "grants.revoked_at_us"))
                .transpose()?,
            revoked_reason: self.revoked_reason,
            created_by: member_id(self.created_by, "grants.created_by")?,
            created_at: from_us(self.created_at_us, "grants.created_at_us")?,
            reviewed_version: self
                .reviewed_version
                .map(|v| to_u32(v, "grants.reviewed_version"))
                .transpose()?,
        })
    }
}

#[derive(sqlx::FromRow)]
pub(crate) struct RecordTypeRow {
    name: String,
    version: i64,
    description: String,
    owner: String,
    query_schema: String,
    record_schema: String,
    subject_key: String,
    deprecated: bool,
    deprecation_note: String,
    registered_at_us: i64,
    registered_by: String,
    compatibility: String,
    field_pointers: String,
    digest: String,
}

impl RecordTypeRow {
    /// The version. One that cannot be decoded fails the reload it is read
    /// for, so the error names its row.
    pub(crate) fn into_version(self) -> Result<RecordTypeVersion> {
        let row = format!("record_type_versions row name={:?} version={}", self.name, self.version);
        self.decode_version().map_err(|e| name_row(e, &row))
    }

    fn decode_version(self) -> Result<RecordTypeVersion> {
        Ok(RecordTypeVersion {
            definition: RecordTypeDefinition {
                name: self.name,
                description: self.description,
                owner: member_id(self.owner, "record_type_versions.owner")?,
                query_schema: from_json(&self.query_schema, "record_type_versions.query_schema")?,
                record_schema: from_json(&self.record_schema, "record_type_versions.record_schema")?,
                subject_key: self.subject_key,
            },
            version: to_u32(self.version, "record_type_versions.version")?,
            deprecated: self.deprecated,
            deprecation_note: self.deprecation_note,
            registered_at: from_us(self.registered_at_us, "record_type_versions.registered_at_us")?,
            registered_by: member_id(self.registered_by, "record_type_versions.registered_by")?,
            compatibility: serde_json::from_value(serde_json::Value::String(self.compatibility))
                .map_err(|_| StoreError::Corrupt("record_type_versions.compatibility holds an unknown mode".into()))?,
            field_pointers: from_json(&self.field_pointers, "record_type_versions.field_pointers")?,
            digest: self.digest,
        })
    }
}

#[derive(sqlx::FromRow)]
pub(crate) struct LogRow {
    log_id: String,
    public_key: Vec<u8>,
    created_at_us: i64,
}

impl LogRow {
    pub(crate) fn into_log(self) -> Result<LogInfo> {
        Ok(LogInfo {
            log_id: self.log_id,
            public_key: self.public_key,
            created_at: from_us(self.created_at_us, "audit_logs.created_at_us")?,
        })
    }
}

#[derive(sqlx::FromRow)]
pub(crate) struct EntryRow {
    log_id: String,
    sequence: i64,
    leaf_hash: Vec<u8>,
    leaf: String,
    time_us: i64,
    kind: String,
    actor: String,
    provider: String,
    record_type: String,
    purpose: String,
    outcome: String,
    subject_hash: Option<Vec<u8>>,
}

impl EntryRow {
    pub(crate) fn into_entry(self) -> Result<StoredEntry> {
        Ok(StoredEntry {
            sequence: to_u64(self.sequence, "audit_entries.sequence")?,
            leaf_hash: hash32(self.leaf_hash, "audit_entries.leaf_hash")?,
            time: from_us(self.time_us, "audit_entries.time_us")?,
            kind: EntryKind::parse(&self.kind)
                .ok_or_else(|| StoreError::Corrupt("audit_entries.kind holds an unknown kind".into()))?,
            outcome: Outcome::parse(&self.outcome)
                .ok_or_else(|| StoreError::Corrupt("audit_entries.outcome holds an unknown outcome".into()))?,
            log_id: self.log_id,
            leaf: self.leaf,
            actor: self.actor,
            provider: self.provider,
            record_type: self.record_type,
            purpose: self.purpose,
            subject_hash: self.subject_hash.map(hex::encode).unwrap_or_default(),
        })
    }
}

impl EntryRow {
    /// The entry's sequence as stored.
    pub(crate) fn sequence(&self) -> i64 {
        self.sequence
    }

    /// [`EntryRow::into_entry`], a column that cannot be decoded named with
    /// its entry's sequence.
    pub(crate) fn into_named_entry(self) -> Result<StoredEntry> {
        let sequence = self.sequence;
        self.into_entry().map_err(|e| match e {
            StoreError::Corrupt(m) => StoreError::Corrupt(format!("entry {sequence}: {m}")),
            other => other,
        })
    }
}

#[derive(sqlx::FromRow)]
pub(crate) struct TreeHeadRow {
    log_id: String,
    tree_size: i64,
    root_hash: Vec<u8>,
    timestamp_ms: i64,
    signature: Vec<u8>,
}

impl TreeHeadRow {
    pub(crate) fn into_head(self) -> Result<StoredTreeHead> {
        Ok(StoredTreeHead {
            log_id: self.log_id,
            tree_size: to_u64(self.tree_size, "tree_heads.tree_size")?,
            root_hash: hash32(self.root_hash, "tree_heads.root_hash")?,
            timestamp_ms: to_u64(self.timestamp_ms, "tree_heads.timestamp_ms")?,
            signature: self.signature,
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn times_round_down_to_the_microsecond_on_both_sides_of_the_epoch() {
        let t = OffsetDateTime::from_unix_timestamp_nanos(1_700_000_000_123_456_789).unwrap();
        assert_eq!(to_us(t), 1_700_000_000_123_456);
        assert_eq!(
            from_us(to_us(t), "c").unwrap().unix_timestamp_nanos(),
            1_700_000_000_123_456_000
        );
        let before = OffsetDateTime::from_unix_timestamp_nanos(-1_500).unwrap();
        assert_eq!(to_us(before), -2);
        let far = time::macros::datetime!(9999-12-31 23:59:59.999999 UTC);
        assert_eq!(from_us(to_us(far), "c").unwrap(), far);
    }

    #[test]
    fn roles_round_trip_through_their_text_form() {
        let text = roles_text(&[Role::Admin, Role::SubjectPortal]);
        assert_eq!(text, "admin,subject-portal");
    }

    #[test]
    fn a_revocation_that_cannot_be_decoded_is_named_by_its_row() {
        let row = RevokedCertificateRow {
            fingerprint: "zz-not-hex".into(),
            member_id: "civil-status".into(),
            reason: String::new(),
            not_after_us: None,
            revoked_at_us: 1,
            revoked_by: "federation-admin".into(),
        };
        let Err(StoreError::Corrupt(m)) = row.into_revoked() else {
            panic!("corrupt")
        };
        assert!(
            m.contains(r#"fingerprint="zz-not-hex""#) && m.contains(r#"member_id="civil-status""#),
            "{m}"
        );
        assert!(m.contains("holds an invalid fingerprint"), "{m}");
    }

    #[test]
    fn a_short_hash_is_corrupt() {
        assert!(matches!(hash32(vec![0; 31], "c"), Err(StoreError::Corrupt(_))));
    }
}

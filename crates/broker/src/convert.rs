//! Conversions between domain types and their wire messages.

use crate::error::BrokerError;
use lienthong::v1 as pb;
use lienthong_core::schema::BreakingChange;
use lienthong_core::{
    Compatibility, Endpoint, Grant, GrantFields, Member, RecordTypeVersion, RevokedCertificate, Role,
};
use time::OffsetDateTime;

/// Domain time to protobuf Timestamp.
pub fn ts(t: OffsetDateTime) -> prost_types::Timestamp {
    let nanos = t.unix_timestamp_nanos();
    prost_types::Timestamp {
        seconds: t.unix_timestamp(),
        nanos: (nanos.rem_euclid(1_000_000_000)) as i32,
    }
}

/// Protobuf Timestamp to domain time; `None` when out of range, or when its
/// `nanos` is not 0 to 999,999,999 (which the Timestamp type calls invalid:
/// carried into the seconds, it would be another time than the one meant).
pub fn from_ts(t: &prost_types::Timestamp) -> Option<OffsetDateTime> {
    if !(0..1_000_000_000).contains(&t.nanos) {
        return None;
    }
    let nanos = i128::from(t.seconds) * 1_000_000_000 + i128::from(t.nanos);
    OffsetDateTime::from_unix_timestamp_nanos(nanos).ok()
}

/// [`from_ts`] for the request field `field`, refused in words that say
/// what is wrong with it.
pub fn time_field(field: &str, t: &prost_types::Timestamp) -> Result<OffsetDateTime, BrokerError> {
    if !(0..1_000_000_000).contains(&t.nanos) {
        return Err(BrokerError::InvalidArgument(format!(
            "{field}.nanos is {}: a Timestamp's nanos must be 0 to 999999999 (whole seconds go in seconds)",
            t.nanos
        )));
    }
    from_ts(t).ok_or_else(|| {
        BrokerError::InvalidArgument(format!(
            "{field} is out of range: give a time between 0001-01-01 and 9999-12-31 UTC"
        ))
    })
}

/// Domain role to wire role.
pub fn role_to_pb(r: Role) -> pb::Role {
    match r {
        Role::Admin => pb::Role::Admin,
        Role::Provider => pb::Role::Provider,
        Role::Consumer => pb::Role::Consumer,
        Role::Integrator => pb::Role::Integrator,
        Role::Auditor => pb::Role::Auditor,
        Role::SubjectPortal => pb::Role::SubjectPortal,
    }
}

/// Wire role number to domain role; `None` for unspecified or unknown numbers.
pub fn role_from_pb(n: i32) -> Option<Role> {
    match pb::Role::try_from(n).ok()? {
        pb::Role::Unspecified => None,
        pb::Role::Admin => Some(Role::Admin),
        pb::Role::Provider => Some(Role::Provider),
        pb::Role::Consumer => Some(Role::Consumer),
        pb::Role::Integrator => Some(Role::Integrator),
        pb::Role::Auditor => Some(Role::Auditor),
        pb::Role::SubjectPortal => Some(Role::SubjectPortal),
    }
}

/// Certificate revocation to wire.
pub fn revoked_certificate(r: &RevokedCertificate) -> pb::RevokedCertificate {
    pb::RevokedCertificate {
        fingerprint_sha256: r.fingerprint.to_string(),
        member: r.member.to_string(),
        reason: r.reason.clone(),
        revoked_at: Some(ts(r.revoked_at)),
        revoked_by: r.revoked_by.to_string(),
        not_after: r.not_after.map(ts),
    }
}

/// Member to wire.
pub fn member(m: &Member) -> pb::Member {
    pb::Member {
        id: m.id.to_string(),
        display_name: m.display_name.clone(),
        roles: m.roles.iter().map(|r| role_to_pb(*r) as i32).collect(),
        enabled: m.enabled,
        disabled_reason: m.disabled_reason.clone(),
        created_at: Some(ts(m.created_at)),
        updated_at: Some(ts(m.updated_at)),
    }
}

/// Endpoint to wire.
pub fn endpoint(e: &Endpoint) -> pb::Endpoint {
    pb::Endpoint {
        id: e.id.clone(),
        provider: e.provider.to_string(),
        url: e.url.clone(),
        created_at: Some(ts(e.created_at)),
    }
}

/// Grant to wire.
pub fn grant(g: &Grant) -> pb::Grant {
    pb::Grant {
        id: g.id.clone(),
        consumer: g.consumer.to_string(),
        record_type: g.record_type.clone(),
        fields: match &g.fields {
            GrantFields::All => vec!["*".to_string()],
            GrantFields::Pointers(p) => p.clone(),
        },
        purposes: g.purposes.clone(),
        valid_from: Some(ts(g.valid_from)),
        valid_until: g.valid_until.map(ts),
        rate_limit_per_minute: g.rate_limit_per_minute,
        revoked_at: g.revoked_at.map(ts),
        revoked_reason: g.revoked_reason.clone(),
        created_by: g.created_by.to_string(),
        created_at: Some(ts(g.created_at)),
        reviewed_version: g.reviewed_version.unwrap_or_default(),
    }
}

/// Compatibility to wire.
pub fn compatibility(c: Compatibility) -> pb::Compatibility {
    match c {
        Compatibility::Backward => pb::Compatibility::Backward,
        Compatibility::None => pb::Compatibility::None,
    }
}

/// Record type version to wire.
pub fn record_type_version(v: &RecordTypeVersion) -> pb::RecordTypeVersion {
    let d = &v.definition;
    pb::RecordTypeVersion {
        definition: Some(pb::RecordTypeDefinition {
            name: d.name.clone(),
            description: d.description.clone(),
            owner: d.owner.to_string(),
            query_schema_json: d.query_schema.to_string(),
            record_schema_json: d.record_schema.to_string(),
            subject_key: d.subject_key.clone(),
        }),
        version: v.version,
        deprecated: v.deprecated,
        deprecation_note: v.deprecation_note.clone(),
        registered_at: Some(ts(v.registered_at)),
        registered_by: v.registered_by.to_string(),
        compatibility: compatibility(v.compatibility) as i32,
        field_pointers: v.field_pointers.clone(),
        digest: v.digest.clone(),
    }
}

/// Breaking change to wire.
pub fn breaking_change(c: &BreakingChange) -> pb::BreakingChange {
    pb::BreakingChange {
        kind: c.kind.clone(),
        pointer: c.pointer.clone(),
        message: c.message.clone(),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn timestamps_with_nanos_outside_a_second_are_refused() {
        let at = |seconds, nanos| prost_types::Timestamp { seconds, nanos };
        assert_eq!(from_ts(&at(10, 999_999_999)).unwrap().unix_timestamp(), 10);
        // Carried into the seconds, these would be 12 and 8 seconds.
        for nanos in [2_000_000_000, 1_000_000_000, -1, -1_000_000_000, i32::MIN, i32::MAX] {
            assert!(from_ts(&at(10, nanos)).is_none(), "{nanos}");
            let e = time_field("valid_from", &at(10, nanos)).unwrap_err();
            assert!(
                matches!(&e, BrokerError::InvalidArgument(m) if m.starts_with("valid_from.nanos is ")),
                "{e}"
            );
        }
        let e = time_field("valid_until", &at(i64::MAX, 0)).unwrap_err();
        assert!(e.to_string().contains("valid_until is out of range"), "{e}");
        assert!(time_field("valid_until", &at(0, 0)).is_ok());
    }
}

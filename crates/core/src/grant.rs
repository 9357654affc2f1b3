//! Grants (who may read which fields of which record type, why, when) and
//! provider endpoints.

use crate::member::MemberId;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

/// Fields a grant releases.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GrantFields {
    /// Every field of the record (`*`).
    All,
    /// These JSON Pointers (schema properties; array levels are transparent:
    /// `/children/full_name` is `full_name` of every item of `children`).
    /// Sorted, without duplicates.
    Pointers(Vec<String>),
}

/// Permission for one consumer to read fields of one record type.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Grant {
    /// Identifier.
    pub id: String,
    /// Consumer member.
    pub consumer: MemberId,
    /// Record type name.
    pub record_type: String,
    /// Fields released.
    pub fields: GrantFields,
    /// Legal-basis codes the access may be made for; at least one.
    pub purposes: Vec<String>,
    /// Start of validity, inclusive.
    #[serde(with = "time::serde::rfc3339")]
    pub valid_from: OffsetDateTime,
    /// End of validity, exclusive; `None` means no end.
    #[serde(with = "time::serde::rfc3339::option")]
    pub valid_until: Option<OffsetDateTime>,
    /// Lookups per minute; 0 means unlimited.
    pub rate_limit_per_minute: u32,
    /// When revoked.
    #[serde(with = "time::serde::rfc3339::option")]
    pub revoked_at: Option<OffsetDateTime>,
    /// Why revoked.
    pub revoked_reason: String,
    /// Admin that created it.
    pub created_by: MemberId,
    /// When created.
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    /// The record type version whose fields the grant was checked against
    /// when it was made: it covers fields as that version declares them.
    /// `None` for grants made before this was recorded.
    #[serde(default)]
    pub reviewed_version: Option<u32>,
}

/// A network address of a provider's RecordProvider service.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Endpoint {
    /// Identifier.
    pub id: String,
    /// Provider member.
    pub provider: MemberId,
    /// `https://host:port`.
    pub url: String,
    /// When added.
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
}

impl Grant {
    /// Whether the grant allows lookups now or will later: not revoked, not ended.
    pub fn is_live(&self, now: OffsetDateTime) -> bool {
        self.revoked_at.is_none() && self.valid_until.is_none_or(|until| until > now)
    }

    /// Whether `other` allows exactly what this grant allows from `now` on:
    /// the same consumer, record type, reviewed version, fields, purposes,
    /// rate limit and window. A start already past is the same start as
    /// any other past start (both allow from now on), so a grant made
    /// without `valid_from` repeats one made earlier.
    pub fn same_effect_as(&self, other: &Grant, now: OffsetDateTime) -> bool {
        let start = |g: &Grant| g.valid_from.max(now);
        self.consumer == other.consumer
            && self.record_type == other.record_type
            && self.reviewed_version == other.reviewed_version
            && self.fields == other.fields
            && self.purposes == other.purposes
            && self.rate_limit_per_minute == other.rate_limit_per_minute
            && start(self) == start(other)
            && self.valid_until == other.valid_until
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use time::Duration;
    use time::macros::datetime;

    fn grant(id: &str) -> Grant {
        let at = datetime!(2026-01-01 00:00 UTC);
        Grant {
            id: id.into(),
            consumer: MemberId::new("tax-office").unwrap(),
            record_type: "ee.civil.person".into(),
            fields: GrantFields::Pointers(vec!["/name".into()]),
            purposes: vec!["tax-law/art-1".into()],
            valid_from: at,
            valid_until: Some(at + Duration::days(30)),
            rate_limit_per_minute: 60,
            revoked_at: None,
            revoked_reason: String::new(),
            created_by: MemberId::new("admin").unwrap(),
            created_at: at,
            reviewed_version: Some(1),
        }
    }

    #[test]
    fn a_grant_repeating_another_is_told_apart_from_one_that_differs() {
        let now = datetime!(2026-01-02 00:00 UTC);
        let a = grant("g-a");
        // Made a day later without a start, by another admin: the same grant.
        let mut b = grant("g-b");
        b.valid_from = now;
        b.created_at = now;
        b.created_by = MemberId::new("other-admin").unwrap();
        assert!(a.same_effect_as(&b, now) && b.same_effect_as(&a, now));

        type Change<'a> = Box<dyn Fn(&mut Grant) + 'a>;
        let differs: Vec<(&str, Change<'_>)> = vec![
            ("consumer", Box::new(|g| g.consumer = MemberId::new("police").unwrap())),
            ("record type", Box::new(|g| g.record_type = "ee.civil.marriage".into())),
            ("reviewed version", Box::new(|g| g.reviewed_version = Some(2))),
            ("legacy version", Box::new(|g| g.reviewed_version = None)),
            ("fields", Box::new(|g| g.fields = GrantFields::All)),
            ("purposes", Box::new(|g| g.purposes.push("other/art-2".into()))),
            ("rate", Box::new(|g| g.rate_limit_per_minute = 0)),
            ("end", Box::new(|g| g.valid_until = None)),
            ("later start", Box::new(|g| g.valid_from = now + Duration::days(1))),
        ];
        for (what, change) in differs {
            let mut c = grant("g-c");
            change(&mut c);
            assert!(!a.same_effect_as(&c, now), "{what}");
        }
    }

    #[test]
    fn only_a_grant_neither_revoked_nor_ended_is_live() {
        let g = grant("g-a");
        let end = g.valid_until.unwrap();
        assert!(g.is_live(end - Duration::seconds(1)));
        assert!(!g.is_live(end));
        let mut revoked = grant("g-b");
        revoked.revoked_at = Some(g.valid_from);
        assert!(!revoked.is_live(g.valid_from));
    }
}

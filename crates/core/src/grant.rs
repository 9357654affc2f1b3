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

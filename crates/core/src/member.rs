//! Member agencies and their roles.

use serde::{Deserialize, Serialize};
use std::fmt;
use time::OffsetDateTime;

/// What a member may do; a member holds one or more.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Administers the federation.
    Admin,
    /// Owns record types and answers lookups.
    Provider,
    /// Looks records up within its grants.
    Consumer,
    /// Registers its agency's record types.
    Integrator,
    /// Reads the audit log.
    Auditor,
    /// Citizen portal: asks for one subject's access history.
    SubjectPortal,
}

impl Role {
    /// Every role, in a fixed order.
    pub const ALL: [Role; 6] = [
        Role::Admin,
        Role::Provider,
        Role::Consumer,
        Role::Integrator,
        Role::Auditor,
        Role::SubjectPortal,
    ];

    /// Stable name used in storage, config and the CLI (`subject-portal`).
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Provider => "provider",
            Role::Consumer => "consumer",
            Role::Integrator => "integrator",
            Role::Auditor => "auditor",
            Role::SubjectPortal => "subject-portal",
        }
    }

    /// Parses a name produced by [`Role::as_str`] (also accepts `subject_portal`).
    pub fn parse(s: &str) -> Option<Role> {
        match s {
            "admin" => Some(Role::Admin),
            "provider" => Some(Role::Provider),
            "consumer" => Some(Role::Consumer),
            "integrator" => Some(Role::Integrator),
            "auditor" => Some(Role::Auditor),
            "subject-portal" | "subject_portal" => Some(Role::SubjectPortal),
            _ => None,
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A validated member id: `[a-z0-9][a-z0-9-]{1,62}`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct MemberId(String);

/// Why a member id was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("member id {:?} is invalid: use 2 to 63 characters from a-z, 0-9 and '-', starting with a letter or digit", shown(.0))]
pub struct InvalidMemberId(pub String);

/// At most the first 64 characters of a refused id: the message goes back
/// to the client and into the log.
pub(crate) fn shown(id: &str) -> String {
    match id.char_indices().nth(64) {
        Some((end, _)) => format!("{}…", &id[..end]),
        None => id.to_owned(),
    }
}

impl MemberId {
    /// Validates and wraps a member id.
    pub fn new(s: impl Into<String>) -> Result<Self, InvalidMemberId> {
        let s = s.into();
        let ok = (2..=63).contains(&s.len())
            && s.bytes()
                .enumerate()
                .all(|(i, b)| b.is_ascii_lowercase() || b.is_ascii_digit() || (i > 0 && b == b'-'));
        if ok { Ok(MemberId(s)) } else { Err(InvalidMemberId(s)) }
    }

    /// The id as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for MemberId {
    type Error = InvalidMemberId;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        MemberId::new(s)
    }
}

impl From<MemberId> for String {
    fn from(m: MemberId) -> String {
        m.0
    }
}

impl fmt::Display for MemberId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::borrow::Borrow<str> for MemberId {
    fn borrow(&self) -> &str {
        &self.0
    }
}

/// A member agency.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    /// Identifier, also the `<member-id>` of its certificate's SPIFFE URI.
    pub id: MemberId,
    /// Human-readable name.
    pub display_name: String,
    /// Roles held, sorted and without duplicates.
    pub roles: Vec<Role>,
    /// False once disabled.
    pub enabled: bool,
    /// Why it was disabled; empty while enabled.
    pub disabled_reason: String,
    /// When admitted.
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    /// Last change.
    #[serde(with = "time::serde::rfc3339")]
    pub updated_at: OffsetDateTime,
}

impl Member {
    /// True if the member holds `role`.
    pub fn has_role(&self, role: Role) -> bool {
        self.roles.contains(&role)
    }
}

/// The SHA-256 of a certificate's DER encoding: what `openssl x509
/// -fingerprint -sha256` prints, and how a revoked certificate is named.
/// Shown as 64 lowercase hex digits; `lienthong_tls::parse_fingerprint` reads
/// what people paste.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Fingerprint(pub [u8; 32]);

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

/// A member certificate the broker refuses although the federation CA
/// signed it and it has not expired: its key leaked, or the member moved to
/// a new certificate. Permanent, like an X.509 revocation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RevokedCertificate {
    /// The certificate.
    pub fingerprint: Fingerprint,
    /// The member its SPIFFE ID names.
    pub member: MemberId,
    /// Why, as the admin gave it; shown to whoever presents the certificate.
    pub reason: String,
    /// The certificate's own expiry, when the admin gave the certificate
    /// itself: after it, TLS refuses the certificate anyway.
    pub not_after: Option<OffsetDateTime>,
    /// When it was revoked.
    pub revoked_at: OffsetDateTime,
    /// The admin who revoked it.
    pub revoked_by: MemberId,
}

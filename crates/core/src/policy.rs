//! The authorization decision: may this member read these fields of this
//! record type for this purpose, now? Pure and allocation-free on the allow
//! path except for the returned [`Allowed`].

use crate::grant::{Grant, GrantFields};
use crate::member::{Member, Role};
use std::time::Duration;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

/// What a consumer asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AccessRequest<'a> {
    /// Record type name.
    pub record_type: &'a str,
    /// Purpose (legal-basis code) stated.
    pub purpose: &'a str,
    /// Requested JSON Pointers; empty means "everything the grant releases".
    pub fields: &'a [String],
}

/// The outcome of [`decide`].
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// Access allowed under a grant.
    Allow(Allowed),
    /// Access refused.
    Deny(DenyReason),
}

impl Decision {
    /// True for [`Decision::Allow`].
    pub fn is_allowed(&self) -> bool {
        matches!(self, Decision::Allow(_))
    }
}

/// What an allowed request may receive.
#[derive(Debug, Clone, PartialEq)]
pub struct Allowed {
    /// The grant that allows it.
    pub grant_id: String,
    /// Fields to release: the requested pointers (sorted, deduplicated) if the
    /// request named fields, else the grant's fields.
    pub fields: GrantFields,
    /// The grant's rate limit; 0 means unlimited.
    pub rate_limit_per_minute: u32,
}

/// Why access was refused; each message says what to do about it.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum DenyReason {
    /// The member does not hold the consumer role (or is unknown).
    #[error("member is not a consumer; ask the federation admin to give it the consumer role")]
    NotAConsumer,
    /// The member is disabled.
    #[error("member is disabled; ask the federation admin to re-enable it")]
    MemberDisabled,
    /// No grant covers the record type for this member.
    #[error("no grant gives access to record type {record_type:?}; ask the federation admin for a grant")]
    NoGrant {
        /// The record type asked for.
        record_type: String,
    },
    /// Live grants exist, but no grant (live or not) names the purpose.
    #[error(
        "purpose {purpose:?} is not granted for this record type; state a granted purpose or ask the federation admin to add it"
    )]
    PurposeNotGranted {
        /// The purpose stated.
        purpose: String,
    },
    /// The only grants naming the purpose start later.
    #[error("grant is not valid before {}; retry then or ask the federation admin", rfc3339(.valid_from))]
    GrantNotYetValid {
        /// Start of validity.
        valid_from: OffsetDateTime,
    },
    /// The only grants naming the purpose have expired.
    #[error("grant expired at {}; ask the federation admin to renew it", rfc3339(.valid_until))]
    GrantExpired {
        /// End of validity.
        valid_until: OffsetDateTime,
    },
    /// The only grants naming the purpose were revoked.
    #[error("grant was revoked{}; ask the federation admin for a new grant", revoked_because(.reason))]
    GrantRevoked {
        /// Why it was revoked.
        reason: String,
    },
    /// A live grant with the purpose exists but lacks a requested field.
    #[error("grant has no field {field}; ask the federation admin to extend the grant or request fewer fields")]
    FieldNotGranted {
        /// The first requested field not covered.
        field: String,
    },
    /// The grant's rate limit is exhausted.
    #[error("rate limit of the grant exceeded; retry in {} ms", millis_ceil(.retry_after))]
    RateLimited {
        /// When a request will be accepted again.
        retry_after: Duration,
    },
}

fn rfc3339(t: &OffsetDateTime) -> String {
    t.format(&Rfc3339).unwrap_or_else(|_| t.to_string())
}

fn revoked_because(reason: &str) -> String {
    if reason.trim().is_empty() {
        String::new()
    } else {
        format!(" ({reason})")
    }
}

fn millis_ceil(d: &Duration) -> u128 {
    d.as_nanos().div_ceil(1_000_000)
}

impl DenyReason {
    /// Stable snake_case code for audit entries, metrics and clients.
    pub fn code(&self) -> &'static str {
        match self {
            DenyReason::NotAConsumer => "not_a_consumer",
            DenyReason::MemberDisabled => "member_disabled",
            DenyReason::NoGrant { .. } => "no_grant",
            DenyReason::PurposeNotGranted { .. } => "purpose_not_granted",
            DenyReason::GrantNotYetValid { .. } => "grant_not_yet_valid",
            DenyReason::GrantExpired { .. } => "grant_expired",
            DenyReason::GrantRevoked { .. } => "grant_revoked",
            DenyReason::FieldNotGranted { .. } => "field_not_granted",
            DenyReason::RateLimited { .. } => "rate_limited",
        }
    }
}

/// Where a grant stands at a given time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GrantState {
    /// Usable (subject to purpose and fields).
    Live,
    /// Revoked.
    Revoked,
    /// Before `valid_from`.
    NotYetValid,
    /// At or after `valid_until`.
    Expired,
}

/// The state of `grant` at `now`; revocation wins over the validity window.
pub fn grant_state(grant: &Grant, now: OffsetDateTime) -> GrantState {
    if grant.revoked_at.is_some() {
        GrantState::Revoked
    } else if now < grant.valid_from {
        GrantState::NotYetValid
    } else if grant.valid_until.is_some_and(|until| now >= until) {
        GrantState::Expired
    } else {
        GrantState::Live
    }
}

/// True if granted pointer `granted` covers requested pointer `requested`
/// (equal, or an ancestor of it).
pub fn pointer_covers(granted: &str, requested: &str) -> bool {
    match requested.strip_prefix(granted) {
        Some(rest) => rest.is_empty() || rest.starts_with('/') || granted.is_empty(),
        None => false,
    }
}

/// True if `fields` cover `pointer`.
pub fn fields_cover(fields: &GrantFields, pointer: &str) -> bool {
    match fields {
        GrantFields::All => true,
        GrantFields::Pointers(granted) => granted.iter().any(|g| pointer_covers(g, pointer)),
    }
}

/// The first requested pointer `fields` do not cover.
fn first_missing<'r>(fields: &GrantFields, requested: &'r [String]) -> Option<&'r str> {
    requested.iter().find(|p| !fields_cover(fields, p)).map(String::as_str)
}

/// Deterministic preference among grants: most recently created, then smallest id.
fn precedes(a: &Grant, b: &Grant) -> bool {
    a.created_at > b.created_at || (a.created_at == b.created_at && a.id < b.id)
}

fn prefer<'g>(current: Option<&'g Grant>, candidate: &'g Grant) -> Option<&'g Grant> {
    match current {
        Some(c) if !precedes(candidate, c) => Some(c),
        _ => Some(candidate),
    }
}

/// Decides `request` by `member` given its grants for the record type (any
/// state; grants of other consumers or record types are ignored). Default deny;
/// on denial the most specific reason is given.
pub fn decide(member: &Member, grants: &[Grant], request: &AccessRequest<'_>, now: OffsetDateTime) -> Decision {
    if !member.enabled {
        return Decision::Deny(DenyReason::MemberDisabled);
    }
    if !member.has_role(Role::Consumer) {
        return Decision::Deny(DenyReason::NotAConsumer);
    }
    let mut usable: Option<&Grant> = None;
    let mut lacking_field: Option<&Grant> = None;
    let mut dead_with_purpose: Option<&Grant> = None;
    let mut any_live = false;
    for grant in grants {
        if grant.consumer != member.id || grant.record_type != request.record_type {
            continue;
        }
        let has_purpose = grant.purposes.iter().any(|p| p == request.purpose);
        if grant_state(grant, now) != GrantState::Live {
            if has_purpose {
                dead_with_purpose = prefer(dead_with_purpose, grant);
            }
            continue;
        }
        any_live = true;
        if !has_purpose {
            continue;
        }
        if first_missing(&grant.fields, request.fields).is_none() {
            usable = prefer(usable, grant);
        } else {
            lacking_field = prefer(lacking_field, grant);
        }
    }
    if let Some(grant) = usable {
        let fields = if request.fields.is_empty() {
            grant.fields.clone()
        } else {
            let mut requested = request.fields.to_vec();
            requested.sort();
            requested.dedup();
            GrantFields::Pointers(requested)
        };
        return Decision::Allow(Allowed {
            grant_id: grant.id.clone(),
            fields,
            rate_limit_per_minute: grant.rate_limit_per_minute,
        });
    }
    let reason = if let Some(field) = lacking_field.and_then(|g| first_missing(&g.fields, request.fields)) {
        DenyReason::FieldNotGranted {
            field: field.to_owned(),
        }
    } else if let Some(grant) = dead_with_purpose {
        // Before "purpose not granted": the consumer's grant for this purpose
        // exists, and what to do (wait, renew, ask again) depends on why it
        // is unusable, whatever grants it holds for other purposes.
        match grant_state(grant, now) {
            GrantState::NotYetValid => DenyReason::GrantNotYetValid {
                valid_from: grant.valid_from,
            },
            GrantState::Expired => DenyReason::GrantExpired {
                valid_until: grant.valid_until.unwrap_or(grant.valid_from),
            },
            GrantState::Revoked | GrantState::Live => DenyReason::GrantRevoked {
                reason: grant.revoked_reason.clone(),
            },
        }
    } else if any_live {
        DenyReason::PurposeNotGranted {
            purpose: request.purpose.to_owned(),
        }
    } else {
        DenyReason::NoGrant {
            record_type: request.record_type.to_owned(),
        }
    };
    Decision::Deny(reason)
}

//! lienthong domain model: members, record types and their schemas, grants, the
//! authorization decision and field filtering.
//!
//! Pure: no I/O, no async runtime. Everything here takes the current time as an
//! argument so it can be tested and benchmarked deterministically.
#![forbid(unsafe_code)]

pub mod audit;
pub mod filter;
pub mod grant;
pub mod json;
pub mod member;
pub mod policy;
pub mod ratelimit;
pub mod schema;
pub mod snapshot;

pub use filter::{FieldSelection, filter_record};
pub use grant::{Endpoint, Grant, GrantFields};
pub use json::{JsonError, parse_unique_keys};
pub use member::{Fingerprint, Member, MemberId, RevokedCertificate, Role};
pub use policy::{AccessRequest, Allowed, Decision, DenyReason, decide};
pub use ratelimit::{Held, Leases, RateLimiter};
pub use schema::{
    BreakingChange, Compatibility, CompiledRecordType, RecordTypeDefinition, RecordTypeVersion, SchemaError,
    SchemaLimits, ValidationFailure,
};
pub use snapshot::Snapshot;

/// `text`, cut to at most `max` bytes at a character boundary: for a
/// caller's or a register's text bound for a message or the log.
pub fn clip(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

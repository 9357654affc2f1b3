//! The audit event: what the access log records for every lookup, collect item,
//! authentication failure and administrative change.
//!
//! The canonical serialisation of an [`AuditEvent`] (`serde_json::to_string`,
//! fields in declaration order) is the Merkle leaf, so the field order and names
//! here are part of the log format: append new fields at the end only.

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

/// Kind of event.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EntryKind {
    /// A lookup or one collect item.
    Access,
    /// A request refused because its caller could not be authenticated.
    Authentication,
    /// A change to members, endpoints, grants or record types.
    Admin,
    /// A read of the audit log about one citizen (their access history), or
    /// a request to the audit service refused for the caller's roles.
    AuditRead,
}

impl EntryKind {
    /// Stable name used in storage.
    pub fn as_str(self) -> &'static str {
        match self {
            EntryKind::Access => "access",
            EntryKind::Authentication => "authentication",
            EntryKind::Admin => "admin",
            EntryKind::AuditRead => "audit_read",
        }
    }

    /// Parses [`EntryKind::as_str`].
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "access" => Some(EntryKind::Access),
            "authentication" => Some(EntryKind::Authentication),
            "admin" => Some(EntryKind::Admin),
            "audit_read" => Some(EntryKind::AuditRead),
            _ => None,
        }
    }
}

/// How the recorded request ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Data released, or the change applied.
    Allowed,
    /// Refused by policy or authentication.
    Denied,
    /// Allowed but failed (register down, no record, invalid answer, ...).
    Failed,
    /// Malformed request, rejected before policy.
    Invalid,
}

impl Outcome {
    /// Stable name used in storage and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Allowed => "allowed",
            Outcome::Denied => "denied",
            Outcome::Failed => "failed",
            Outcome::Invalid => "invalid",
        }
    }

    /// Parses [`Outcome::as_str`].
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "allowed" => Some(Outcome::Allowed),
            "denied" => Some(Outcome::Denied),
            "failed" => Some(Outcome::Failed),
            "invalid" => Some(Outcome::Invalid),
            _ => None,
        }
    }
}

/// One event of the access log. Never holds a subject key in clear nor record
/// contents: `subject_hash` is an HMAC, `payload_digest` a SHA-256.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditEvent {
    /// When it happened (UTC).
    #[serde(with = "time::serde::rfc3339")]
    pub time: OffsetDateTime,
    /// Kind of event.
    pub kind: EntryKind,
    /// Request id (caller-supplied or server-assigned).
    pub request_id: String,
    /// W3C trace id, hex; empty when untraced.
    pub trace_id: String,
    /// Calling member; for authentication failures, the identity claimed.
    pub actor: String,
    /// Provider owning the record type.
    pub provider: String,
    /// Record type.
    pub record_type: String,
    /// Schema version used; 0 when none was resolved.
    pub schema_version: u32,
    /// Purpose (legal basis) stated.
    pub purpose: String,
    /// HMAC-SHA-256 of the subject key, hex; empty when there is none.
    pub subject_hash: String,
    /// JSON Pointers of fields released.
    pub fields_released: Vec<String>,
    /// How it ended.
    pub outcome: Outcome,
    /// `code: message` for denials and failures; empty when allowed.
    pub reason: String,
    /// SHA-256 of the released record JSON, hex; empty when nothing released.
    pub payload_digest: String,
    /// Broker time spent, microseconds.
    pub latency_us: u64,
    /// Admin entries: action, e.g. `grant.revoke`; authentication and audit
    /// read entries: the RPC, e.g. `Audit.SubjectHistory`.
    pub action: String,
    /// Admin entries: object acted on, e.g. the grant id.
    pub target: String,
    /// Access entries: the grant a lookup was allowed under; empty when none
    /// allowed it. Left out of the leaf when empty, so that the leaves of
    /// entries written before it existed read and hash as they were written.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub grant_id: String,
}

impl AuditEvent {
    /// An empty event of `kind` at `time`, to be filled in field by field.
    pub fn new(kind: EntryKind, time: OffsetDateTime) -> Self {
        AuditEvent {
            time,
            kind,
            request_id: String::new(),
            trace_id: String::new(),
            actor: String::new(),
            provider: String::new(),
            record_type: String::new(),
            schema_version: 0,
            purpose: String::new(),
            subject_hash: String::new(),
            fields_released: Vec::new(),
            outcome: Outcome::Allowed,
            reason: String::new(),
            payload_digest: String::new(),
            latency_us: 0,
            action: String::new(),
            target: String::new(),
            grant_id: String::new(),
        }
    }

    /// The event as the log keeps it: every NUL character replaced by
    /// U+FFFD, and every text cut to [`MAX_TEXT_BYTES`] ([`MAX_REASON_BYTES`]
    /// for the reason), marked with `…`. PostgreSQL's text columns refuse
    /// NUL, and an entry is written in one commit with others: a client's
    /// `purpose` holding one must not fail the commit, nor go unlogged
    /// itself. And a refused request's text is the client's: megabytes of it
    /// must not enter the permanent log.
    pub fn storable(mut self) -> Self {
        fn bounded(text: &mut String, max: usize) {
            if text.contains('\0') {
                *text = text.replace('\0', "\u{FFFD}");
            }
            if text.len() > max {
                let end = crate::clip(text, max).len();
                text.truncate(end);
                text.push('…');
            }
        }
        let clean = |text: &mut String| bounded(text, MAX_TEXT_BYTES);
        // Destructured so that a text field added later cannot be missed.
        let AuditEvent {
            time: _,
            kind: _,
            request_id,
            trace_id,
            actor,
            provider,
            record_type,
            schema_version: _,
            purpose,
            subject_hash,
            fields_released,
            outcome: _,
            reason,
            payload_digest,
            latency_us: _,
            action,
            target,
            grant_id,
        } = &mut self;
        for text in [
            request_id,
            trace_id,
            actor,
            provider,
            record_type,
            purpose,
            subject_hash,
            payload_digest,
            action,
            target,
            grant_id,
        ] {
            clean(text);
        }
        bounded(reason, MAX_REASON_BYTES);
        fields_released.iter_mut().for_each(clean);
        self
    }

    /// The canonical leaf bytes hashed into the Merkle tree.
    /// Fails only for a time outside RFC 3339's years 0000-9999.
    pub fn to_leaf(&self) -> Result<String, serde_json::Error> {
        serde_json::to_string(self)
    }
}

/// Whether `c` must not reach the log, a log line or a terminal as is: a
/// control character (C0 and C1, DEL: newlines that forge rows, ESC that
/// starts terminal escape sequences), a line or paragraph separator, or a
/// bidirectional override or isolate (which reorder the text around them
/// on display).
pub fn is_unprintable(c: char) -> bool {
    c.is_control() || matches!(c, '\u{2028}' | '\u{2029}' | '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}')
}

/// The first [`is_unprintable`] character of `text`, if any.
pub fn first_unprintable(text: &str) -> Option<char> {
    text.chars().find(|c| is_unprintable(*c))
}

/// `text` with every [`is_unprintable`] character written as its Rust
/// escape (`\n`, `\u{1b}`), the rest as it is: what the log keeps of a
/// client's text that was refused for holding one.
pub fn escape_unprintable(text: &str) -> std::borrow::Cow<'_, str> {
    if first_unprintable(text).is_none() {
        return std::borrow::Cow::Borrowed(text);
    }
    let mut escaped = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        if is_unprintable(c) {
            escaped.extend(c.escape_default());
        } else {
            escaped.push(c);
        }
    }
    std::borrow::Cow::Owned(escaped)
}

/// Longest text an audit entry keeps of a name, id or target (bytes).
pub const MAX_TEXT_BYTES: usize = 256;
/// Longest reason an audit entry keeps (bytes).
pub const MAX_REASON_BYTES: usize = 2048;

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_storable_event_holds_no_nul_and_keeps_the_rest() {
        let mut event = AuditEvent::new(EntryKind::Access, OffsetDateTime::UNIX_EPOCH);
        event.purpose = "law\0/art-1".into();
        event.record_type = "\0".into();
        event.request_id = "app-42".into();
        event.reason = "purpose_not_granted: \"law\0\"".into();
        event.fields_released = vec!["/a\0b".into()];
        let stored = event.clone().storable();
        assert_eq!(stored.purpose, "law\u{FFFD}/art-1");
        assert_eq!(stored.record_type, "\u{FFFD}");
        assert_eq!(stored.request_id, "app-42");
        assert_eq!(stored.fields_released, ["/a\u{FFFD}b"]);
        let leaf = stored.to_leaf().unwrap();
        assert!(!leaf.contains("\\u0000") && !leaf.contains('\0'), "{leaf}");
        // A refused request's own text is kept bounded.
        let mut huge = AuditEvent::new(EntryKind::Admin, OffsetDateTime::UNIX_EPOCH);
        huge.target = "é".repeat(1_000_000);
        huge.reason = format!(
            "member x may not manage record types owned by {}",
            "y".repeat(3_000_000)
        );
        let kept = huge.storable();
        assert!(kept.target.len() <= MAX_TEXT_BYTES + '…'.len_utf8() && kept.target.ends_with('…'));
        assert!(kept.reason.len() <= MAX_REASON_BYTES + '…'.len_utf8() && kept.reason.starts_with("member x"));
        // Nothing to replace: the same event.
        let clean = AuditEvent::new(EntryKind::Admin, OffsetDateTime::UNIX_EPOCH);
        assert_eq!(clean.clone().storable(), clean);
    }

    #[test]
    fn unprintable_characters_are_escaped_and_the_rest_kept() {
        assert_eq!(escape_unprintable("tax-law/art-17"), "tax-law/art-17");
        assert!(matches!(
            escape_unprintable("Nguyễn \"Văn\" A"),
            std::borrow::Cow::Borrowed(_)
        ));
        assert_eq!(
            escape_unprintable("a\nforged row\u{1b}[31m\0\u{202E}\u{85}"),
            "a\\nforged row\\u{1b}[31m\\u{0}\\u{202e}\\u{85}"
        );
        assert_eq!(first_unprintable("ok\r"), Some('\r'));
        assert_eq!(first_unprintable("ok"), None);
    }

    /// A leaf written before entries named their grant: what an old broker
    /// serialised for an allowed lookup.
    const OLD_LEAF: &str = r#"{"time":"2026-03-01T08:00:00Z","kind":"access","request_id":"r-1","trace_id":"","actor":"tax-office","provider":"civil-status","record_type":"civil_status.birth_record","schema_version":1,"purpose":"tax-law-38-2019/art-17","subject_hash":"ab","fields_released":["/full_name"],"outcome":"allowed","reason":"","payload_digest":"cd","latency_us":12,"action":"","target":""}"#;

    #[test]
    fn a_leaf_without_a_grant_id_reads_and_hashes_as_written() {
        let old: AuditEvent = serde_json::from_str(OLD_LEAF).unwrap();
        assert_eq!(old.grant_id, "");
        assert_eq!(old.actor, "tax-office");
        // Serialised again byte for byte: its leaf hash still verifies.
        assert_eq!(old.to_leaf().unwrap(), OLD_LEAF);
        assert_eq!(old.clone().storable().to_leaf().unwrap(), OLD_LEAF);
    }

    #[test]
    fn an_allowed_access_names_its_grant_in_its_leaf() {
        let mut event: AuditEvent = serde_json::from_str(OLD_LEAF).unwrap();
        event.grant_id = "g-0194".into();
        let leaf = event.clone().storable().to_leaf().unwrap();
        assert!(leaf.ends_with(r#","target":"","grant_id":"g-0194"}"#), "{leaf}");
        let read: AuditEvent = serde_json::from_str(&leaf).unwrap();
        assert_eq!(read, event);
    }
}

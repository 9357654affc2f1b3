//! lienthong's tamper-evident access log, modelled on Certificate Transparency
//! (RFC 9162): entries are leaves of an append-only Merkle tree, the broker signs
//! tree heads with Ed25519, and anyone holding the public key verifies inclusion
//! and consistency proofs offline.
//!
//! * [`merkle`]: RFC 9162 hashing, proofs and the compact frontier.
//! * [`keys`]: the signing key and the subject HMAC secret on disk.
//! * [`sth`]: signed tree heads.
//! * `pin`: the newest signed head, kept beside the signing key and checked
//!   against the database at every start.
//! * [`log`]: the group-commit writer, signer and proof server ([`AuditLog`]).
//! * [`verify`]: offline verification of an export.
#![forbid(unsafe_code)]

pub mod keys;
pub mod log;
pub mod merkle;
mod pin;
pub mod sth;
pub mod verify;

pub use keys::LogKeys;
pub use log::{AuditConfig, AuditError, AuditLog, HistoryCheck, Receipt, WriterStats, entry_mismatch};
pub use merkle::{Frontier, Hash};
pub use sth::{SignedTreeHead, signing_input, verify_tree_head};
pub use verify::{ExportLine, VerifierState, VerifyError, VerifyReport, verify_export};

//! Offline verification of an exported log (`lienthong audit verify`): needs
//! only the export, a signed tree head and the log's public key, plus the
//! verifier's own record of the last head it accepted.

use crate::merkle::{self, Frontier, Hash};
use crate::sth::{SignedTreeHead, verify_tree_head};
use lienthong_store::StoredEntry;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::io::{BufRead, Write};
use std::path::Path;

/// Why an export does not verify. Each variant names the first place found.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    /// A tree head's signature does not verify under the public key.
    #[error("tree head of log {log_id} at size {tree_size} has an invalid signature")]
    BadSignature {
        /// Log named by the head.
        log_id: String,
        /// Size named by the head.
        tree_size: u64,
    },
    /// The public key supplied is unusable.
    #[error("public key is unusable: {0}")]
    BadPublicKey(String),
    /// A tree head belongs to another log than the public key's.
    #[error("tree head belongs to log {found}, but the public key is that of log {expected}")]
    WrongLog {
        /// Log id of the public key.
        expected: String,
        /// Log id found.
        found: String,
    },
    /// An export line belongs to another log.
    #[error("entry {sequence} belongs to log {found}, not to the verified log {expected}")]
    ForeignEntry {
        /// Sequence of the line.
        sequence: u64,
        /// Log being verified.
        expected: String,
        /// Log id on the line.
        found: String,
    },
    /// An entry is missing: the export jumps over `expected`.
    #[error("entry {expected} is missing (sequence {found} is in its place): rows were deleted or reordered")]
    Gap {
        /// Sequence that should come next.
        expected: u64,
        /// Sequence found instead.
        found: u64,
    },
    /// Entries are out of order or duplicated.
    #[error(
        "entries out of order at sequence {expected}: found sequence {found} in its place; rows were swapped or duplicated"
    )]
    OutOfOrder {
        /// Sequence that should come next.
        expected: u64,
        /// Sequence found instead.
        found: u64,
    },
    /// An entry's stored leaf hash does not match its contents.
    #[error("entry {sequence} was altered: its contents do not match its stored leaf hash")]
    LeafHashMismatch {
        /// The entry.
        sequence: u64,
    },
    /// The entries do not hash to the signed root.
    #[error(
        "entries 0..{tree_size} do not hash to the signed root of size {tree_size}: an entry was altered (with its leaf hash recomputed) or rows were reordered"
    )]
    RootMismatch {
        /// Size of the signed head.
        tree_size: u64,
    },
    /// The entries up to the previously verified head are intact, but the rest
    /// do not hash to the signed root.
    #[error(
        "entries {verified_size}..{tree_size} do not hash to the signed root of size {tree_size}: an entry appended after the last verified head (size {verified_size}) was altered or rows were reordered"
    )]
    RootMismatchSince {
        /// Size of the previously verified head; entries before it are intact.
        verified_size: u64,
        /// Size of the signed head.
        tree_size: u64,
    },
    /// The log is not an append-only extension of the previously verified head.
    #[error(
        "log rewritten: entries 0..{old_size} no longer hash to the root verified earlier at size {old_size} (now at size {new_size}); an entry before sequence {old_size} was altered or the log forked"
    )]
    Inconsistent {
        /// Size verified earlier.
        old_size: u64,
        /// Size of the head now.
        new_size: u64,
    },
    /// The signed head is smaller than one verified earlier.
    #[error(
        "log rolled back: a head of size {verified} was verified earlier but the signed head now covers only {signed}"
    )]
    RolledBack {
        /// Size verified earlier.
        verified: u64,
        /// Size signed now.
        signed: u64,
    },
    /// The signed head is dated before one verified earlier: the log signs
    /// its heads at times that never go back, so this is another history.
    #[error(
        "the signed head of size {signed} is dated {signed_ms} ms after the epoch, before the head of size {verified} \
         verified earlier ({verified_ms}); the log never signs a head earlier than its last, so this head is from \
         another history of the log (a restored or forked database)"
    )]
    TimeWentBack {
        /// Size verified earlier.
        verified: u64,
        /// Its timestamp.
        verified_ms: u64,
        /// Size signed now.
        signed: u64,
        /// Its timestamp.
        signed_ms: u64,
    },
    /// The export has fewer entries than the signed head covers.
    #[error(
        "export truncated: it ends after {have} entries but the signed head covers {signed}; entries {have}..{signed} are missing"
    )]
    Truncated {
        /// Entries in the export.
        have: u64,
        /// Entries covered by the signed head.
        signed: u64,
    },
    /// An entry could not be read (the broker's export broke off there), so
    /// nothing from it on was checked.
    #[error("entry {sequence} could not be read, so nothing from it on was checked: {message}")]
    Unreadable {
        /// The entry.
        sequence: u64,
        /// Why, as the source said.
        message: String,
    },
    /// An export line cannot be parsed.
    #[error("export line {line} is malformed: {message}")]
    Malformed {
        /// 1-based line number.
        line: u64,
        /// What is wrong.
        message: String,
    },
    /// The verifier state file cannot be read or written.
    #[error("verifier state {path}: {message}")]
    State {
        /// The file.
        path: String,
        /// What went wrong.
        message: String,
    },
}

/// One line of an export (JSON Lines): an entry with its stored leaf hash.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExportLine {
    /// Log the entry belongs to.
    pub log_id: String,
    /// Position in the log.
    pub sequence: u64,
    /// Stored RFC 9162 leaf hash, hex.
    pub leaf_hash: String,
    /// Canonical leaf JSON (an `AuditEvent`), exactly the bytes hashed.
    pub leaf: String,
}

impl ExportLine {
    /// The export line of a stored entry.
    pub fn from_entry(entry: &StoredEntry) -> Self {
        ExportLine {
            log_id: entry.log_id.clone(),
            sequence: entry.sequence,
            leaf_hash: hex::encode(entry.leaf_hash),
            leaf: entry.leaf.clone(),
        }
    }

    /// Parses line number `line` (1-based) of an export.
    pub fn parse(line: u64, text: &str) -> Result<ExportLine, VerifyError> {
        serde_json::from_str(text).map_err(|e| VerifyError::Malformed {
            line,
            message: e.to_string(),
        })
    }
}

/// Reads an export as JSON Lines, skipping blank lines.
pub fn read_export<R: BufRead>(reader: R) -> impl Iterator<Item = Result<ExportLine, VerifyError>> {
    reader.lines().enumerate().filter_map(|(i, text)| {
        let line = i as u64 + 1;
        match text {
            Ok(text) if text.trim().is_empty() => None,
            Ok(text) => Some(ExportLine::parse(line, &text)),
            Err(e) => Some(Err(VerifyError::Malformed {
                line,
                message: format!("cannot read: {e}"),
            })),
        }
    })
}

/// What a successful verification established.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VerifyReport {
    /// Log verified.
    pub log_id: String,
    /// Entries in the export, all with intact leaf hashes and dense sequences.
    pub entries: u64,
    /// The head the first `tree_head.tree_size` entries were proven against.
    pub tree_head: SignedTreeHead,
    /// Size of the previously verified head the log was shown to extend.
    pub consistent_with_previous: Option<u64>,
}

/// Verifies an export against a signed tree head: dense sequences from 0, every
/// leaf hash, the head's signature and root, that nothing the head covers is
/// missing, and, given the previously verified head, that the log only grew
/// since (its first entries still hash to the old root; a supplied consistency
/// proof is checked too).
pub fn verify_export(
    lines: impl Iterator<Item = ExportLine>,
    sth: &SignedTreeHead,
    public_key: &[u8; 32],
    previous: Option<&SignedTreeHead>,
    consistency_proof: Option<&[Hash]>,
) -> Result<VerifyReport, VerifyError> {
    verify_entries(lines.map(Ok), sth, public_key, previous, consistency_proof)
}

/// [`verify_export`] over a JSON Lines reader; parse errors name the line.
pub fn verify_export_reader<R: BufRead>(
    reader: R,
    sth: &SignedTreeHead,
    public_key: &[u8; 32],
    previous: Option<&SignedTreeHead>,
    consistency_proof: Option<&[Hash]>,
) -> Result<VerifyReport, VerifyError> {
    verify_entries(read_export(reader), sth, public_key, previous, consistency_proof)
}

/// [`verify_export`] over entries as they arrive, each read either as a line
/// or as the reason it could not be (which ends the verification with it).
/// Entries are consumed one at a time and not kept: a log of any size
/// verifies in the memory of its Merkle frontier.
pub fn verify_entries(
    lines: impl Iterator<Item = Result<ExportLine, VerifyError>>,
    sth: &SignedTreeHead,
    public_key: &[u8; 32],
    previous: Option<&SignedTreeHead>,
    consistency_proof: Option<&[Hash]>,
) -> Result<VerifyReport, VerifyError> {
    verify_tree_head(sth, public_key)?;
    if sth.tree_size == 0 && sth.root_hash != merkle::empty_root() {
        return Err(VerifyError::RootMismatch { tree_size: 0 });
    }
    if let Some(prev) = previous {
        verify_tree_head(prev, public_key)?;
        let forked = || VerifyError::Inconsistent {
            old_size: prev.tree_size,
            new_size: sth.tree_size,
        };
        if prev.tree_size > sth.tree_size {
            return Err(VerifyError::RolledBack {
                verified: prev.tree_size,
                signed: sth.tree_size,
            });
        }
        if prev.tree_size == sth.tree_size && prev.root_hash != sth.root_hash {
            return Err(forked());
        }
        if sth.timestamp_ms < prev.timestamp_ms {
            return Err(VerifyError::TimeWentBack {
                verified: prev.tree_size,
                verified_ms: prev.timestamp_ms,
                signed: sth.tree_size,
                signed_ms: sth.timestamp_ms,
            });
        }
        if prev.tree_size == 0 && prev.root_hash != merkle::empty_root() {
            return Err(forked());
        }
    }
    // A failing supplied proof is reported after the entries were read, so a
    // more precise finding (a named entry, a truncated tail) comes first.
    let proof_failed = previous.zip(consistency_proof).is_some_and(|(prev, proof)| {
        !merkle::verify_consistency(prev.tree_size, sth.tree_size, &prev.root_hash, &sth.root_hash, proof)
    });

    let mut frontier = Frontier::new();
    let mut lines = lines.peekable();
    let mut position = 0u64;
    while let Some(item) = lines.next() {
        position += 1;
        let line = item?;
        let expected = frontier.size();
        if line.log_id != sth.log_id {
            return Err(VerifyError::ForeignEntry {
                sequence: line.sequence,
                expected: sth.log_id.clone(),
                found: line.log_id,
            });
        }
        if line.sequence != expected {
            let found = line.sequence;
            // Two swapped rows show the skipped sequence right after; a deletion
            // does not.
            let swapped = matches!(lines.peek(), Some(Ok(next)) if next.sequence == expected);
            return Err(if found > expected && !swapped {
                VerifyError::Gap { expected, found }
            } else {
                VerifyError::OutOfOrder { expected, found }
            });
        }
        let stored = parse_hash(&line.leaf_hash).ok_or_else(|| VerifyError::Malformed {
            line: position,
            message: format!("leaf_hash of entry {} is not 64 hex digits", line.sequence),
        })?;
        let computed = merkle::leaf_hash(line.leaf.as_bytes());
        if stored != computed {
            return Err(VerifyError::LeafHashMismatch {
                sequence: line.sequence,
            });
        }
        frontier.push(computed);
        let size = frontier.size();
        let prefix_rewritten = |prev: &&SignedTreeHead| size == prev.tree_size && frontier.root() != prev.root_hash;
        if let Some(prev) = previous.filter(prefix_rewritten) {
            return Err(VerifyError::Inconsistent {
                old_size: prev.tree_size,
                new_size: sth.tree_size,
            });
        }
        if size == sth.tree_size && frontier.root() != sth.root_hash {
            return Err(match previous {
                Some(prev) if prev.tree_size > 0 => VerifyError::RootMismatchSince {
                    verified_size: prev.tree_size,
                    tree_size: sth.tree_size,
                },
                _ => VerifyError::RootMismatch {
                    tree_size: sth.tree_size,
                },
            });
        }
    }
    let have = frontier.size();
    if have < sth.tree_size {
        return Err(VerifyError::Truncated {
            have,
            signed: sth.tree_size,
        });
    }
    if let (true, Some(prev)) = (proof_failed, previous) {
        return Err(VerifyError::Inconsistent {
            old_size: prev.tree_size,
            new_size: sth.tree_size,
        });
    }
    Ok(VerifyReport {
        log_id: sth.log_id.clone(),
        entries: have,
        tree_head: sth.clone(),
        consistent_with_previous: previous.map(|p| p.tree_size),
    })
}

fn parse_hash(text: &str) -> Option<Hash> {
    hex::decode(text).ok()?.try_into().ok()
}

/// The verifier's memory: the last head it accepted for each log, so the next
/// run can prove the log only grew since.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VerifierState {
    /// Last verified head per log id.
    pub logs: BTreeMap<String, SignedTreeHead>,
}

impl VerifierState {
    /// Reads the state file; a missing file is an empty state.
    pub fn load(path: &Path) -> Result<VerifierState, VerifyError> {
        let state_error = |message: String| VerifyError::State {
            path: path.display().to_string(),
            message,
        };
        match std::fs::read(path) {
            Ok(bytes) => {
                serde_json::from_slice(&bytes).map_err(|e| state_error(format!("not a verifier state file: {e}")))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(VerifierState::default()),
            Err(e) => Err(state_error(format!("cannot read: {e}"))),
        }
    }

    /// Writes the state file atomically (temporary file, fsync, rename), so a
    /// crash leaves either the old or the new state, never a torn one.
    pub fn save(&self, path: &Path) -> Result<(), VerifyError> {
        let state_error = |message: String| VerifyError::State {
            path: path.display().to_string(),
            message,
        };
        let json = serde_json::to_vec_pretty(self).map_err(|e| state_error(format!("cannot encode: {e}")))?;
        let name = path
            .file_name()
            .ok_or_else(|| state_error("path names no file".into()))?
            .to_string_lossy()
            .into_owned();
        let temp = path.with_file_name(format!(".{name}.tmp-{}", std::process::id()));
        let written = (|| {
            let mut file = std::fs::File::create(&temp)?;
            file.write_all(&json)?;
            file.write_all(b"\n")?;
            file.sync_all()?;
            std::fs::rename(&temp, path)
        })();
        if let Err(e) = written {
            let _ = std::fs::remove_file(&temp);
            return Err(state_error(format!("cannot write: {e}")));
        }
        // Make the rename itself durable; not every platform can sync a directory.
        let dir = path.parent().filter(|d| !d.as_os_str().is_empty());
        if let Some(dir) = dir.and_then(|d| std::fs::File::open(d).ok()) {
            let _ = dir.sync_all();
        }
        Ok(())
    }

    /// The last verified head of `log_id`.
    pub fn previous(&self, log_id: &str) -> Option<&SignedTreeHead> {
        self.logs.get(log_id)
    }

    /// Remembers a head that just verified.
    pub fn record(&mut self, sth: SignedTreeHead) {
        self.logs.insert(sth.log_id.clone(), sth);
    }
}

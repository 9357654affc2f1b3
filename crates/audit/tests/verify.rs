//! Offline verification of exports: every tampering case fails, naming the place.
#![allow(clippy::unwrap_used)]

mod common;

use common::{FakeStore, event};
use lienthong_audit::merkle::{self, Hash};
use lienthong_audit::verify::{VerifyError, read_export, verify_export_reader};
use lienthong_audit::{AuditConfig, AuditLog, ExportLine, LogKeys, SignedTreeHead, VerifierState, verify_export};
use lienthong_store::Store;
use std::sync::Arc;
use std::time::Duration;

/// An honest export of `n` entries and heads signed over its prefixes.
struct Fixture {
    keys: LogKeys,
    lines: Vec<ExportLine>,
}

impl Fixture {
    fn new(n: u64) -> Fixture {
        let keys = LogKeys::generate().unwrap();
        let lines = (0..n)
            .map(|i| {
                let leaf = event(i).to_leaf().unwrap();
                ExportLine {
                    log_id: keys.log_id(),
                    sequence: i,
                    leaf_hash: hex::encode(merkle::leaf_hash(leaf.as_bytes())),
                    leaf,
                }
            })
            .collect();
        Fixture { keys, lines }
    }

    fn head(&self, size: u64) -> SignedTreeHead {
        let hashes: Vec<Hash> = self.lines[..size as usize]
            .iter()
            .map(|l| merkle::leaf_hash(l.leaf.as_bytes()))
            .collect();
        self.keys
            .sign_tree_head(size, &merkle::root(&hashes), 1_750_000_000_000 + size)
    }

    fn verify(
        &self,
        lines: Vec<ExportLine>,
        sth: &SignedTreeHead,
        previous: Option<&SignedTreeHead>,
    ) -> Result<u64, VerifyError> {
        verify_export(lines.into_iter(), sth, &self.keys.public_key(), previous, None).map(|r| r.entries)
    }
}

fn alter(line: &mut ExportLine) {
    line.leaf = line.leaf.replace("income-tax-assessment", "child-benefit-review");
}

#[test]
fn an_intact_export_verifies() {
    let f = Fixture::new(20);
    let sth = f.head(20);
    let report = verify_export(f.lines.clone().into_iter(), &sth, &f.keys.public_key(), None, None).unwrap();
    assert_eq!(report.entries, 20);
    assert_eq!(report.log_id, f.keys.log_id());
    assert_eq!(report.tree_head, sth);
    assert_eq!(report.consistent_with_previous, None);

    // Against an earlier head, with and without a consistency proof.
    let old = f.head(13);
    let hashes: Vec<Hash> = f.lines.iter().map(|l| merkle::leaf_hash(l.leaf.as_bytes())).collect();
    let proof = merkle::consistency_proof(13, &hashes);
    let report = verify_export(
        f.lines.clone().into_iter(),
        &sth,
        &f.keys.public_key(),
        Some(&old),
        Some(&proof),
    )
    .unwrap();
    assert_eq!(report.consistent_with_previous, Some(13));

    // An export may run ahead of the newest head.
    assert_eq!(f.verify(f.lines.clone(), &f.head(15), None).unwrap(), 20);
    // The empty log.
    assert_eq!(f.verify(Vec::new(), &f.head(0), None).unwrap(), 0);
}

#[test]
fn a_changed_leaf_is_named_by_its_sequence() {
    let f = Fixture::new(20);
    let mut lines = f.lines.clone();
    alter(&mut lines[7]);
    let err = f.verify(lines, &f.head(20), None).unwrap_err();
    assert!(matches!(err, VerifyError::LeafHashMismatch { sequence: 7 }), "{err:?}");
    assert!(err.to_string().contains("entry 7 "), "{err}");
}

#[test]
fn a_changed_leaf_with_recomputed_hash_breaks_the_root() {
    let f = Fixture::new(20);
    let mut lines = f.lines.clone();
    alter(&mut lines[7]);
    lines[7].leaf_hash = hex::encode(merkle::leaf_hash(lines[7].leaf.as_bytes()));

    // Without history: the signed root no longer matches.
    let err = f.verify(lines.clone(), &f.head(20), None).unwrap_err();
    assert!(matches!(err, VerifyError::RootMismatch { tree_size: 20 }), "{err:?}");
    assert!(err.to_string().contains("0..20"), "{err}");

    // A previously verified head covering it says the rewrite lies below it.
    let err = f.verify(lines.clone(), &f.head(20), Some(&f.head(10))).unwrap_err();
    assert!(
        matches!(
            err,
            VerifyError::Inconsistent {
                old_size: 10,
                new_size: 20
            }
        ),
        "{err:?}"
    );
    assert!(err.to_string().contains("before sequence 10"), "{err}");

    // A previously verified head before it narrows the change to the new part.
    let err = f.verify(lines, &f.head(20), Some(&f.head(5))).unwrap_err();
    assert!(
        matches!(
            err,
            VerifyError::RootMismatchSince {
                verified_size: 5,
                tree_size: 20
            }
        ),
        "{err:?}"
    );
    assert!(err.to_string().contains("entries 5..20"), "{err}");
}

#[test]
fn a_deleted_row_is_a_gap_at_its_sequence() {
    let f = Fixture::new(20);
    let mut lines = f.lines.clone();
    lines.remove(9);
    let err = f.verify(lines, &f.head(20), None).unwrap_err();
    assert!(matches!(err, VerifyError::Gap { expected: 9, found: 10 }), "{err:?}");
    assert!(err.to_string().contains("entry 9 is missing"), "{err}");
}

#[test]
fn swapped_rows_name_the_first_out_of_place_sequence() {
    let f = Fixture::new(20);
    // Rows moved as a whole: the sequence column gives them away.
    let mut lines = f.lines.clone();
    lines.swap(4, 5);
    let err = f.verify(lines, &f.head(20), None).unwrap_err();
    assert!(
        matches!(err, VerifyError::OutOfOrder { expected: 4, found: 5 }),
        "{err:?}"
    );
    assert!(err.to_string().contains("at sequence 4"), "{err}");

    // Contents swapped and renumbered: hashes are self-consistent, the root is not.
    let mut lines = f.lines.clone();
    lines.swap(4, 5);
    lines[4].sequence = 4;
    lines[5].sequence = 5;
    let err = f.verify(lines, &f.head(20), None).unwrap_err();
    assert!(matches!(err, VerifyError::RootMismatch { tree_size: 20 }), "{err:?}");

    // A duplicated row.
    let mut lines = f.lines.clone();
    lines.insert(3, lines[2].clone());
    let err = f.verify(lines, &f.head(20), None).unwrap_err();
    assert!(
        matches!(err, VerifyError::OutOfOrder { expected: 3, found: 2 }),
        "{err:?}"
    );
}

#[test]
fn a_truncated_tail_is_reported() {
    let f = Fixture::new(20);
    let mut lines = f.lines.clone();
    lines.truncate(16);
    let err = f.verify(lines.clone(), &f.head(20), None).unwrap_err();
    assert!(
        matches!(err, VerifyError::Truncated { have: 16, signed: 20 }),
        "{err:?}"
    );
    assert!(err.to_string().contains("entries 16..20 are missing"), "{err}");

    // Truncated below the previously verified head too, even with a head that
    // was re-signed over the shortened log.
    let shortened = f.head(16);
    let err = f.verify(lines, &shortened, Some(&f.head(20))).unwrap_err();
    assert!(
        matches!(
            err,
            VerifyError::RolledBack {
                verified: 20,
                signed: 16
            }
        ),
        "{err:?}"
    );
}

/// The log never dates a head before its last: a larger head dated earlier
/// than one verified before is from another history, however well it hashes.
#[test]
fn a_head_dated_before_one_verified_earlier_is_refused() {
    let f = Fixture::new(20);
    let earlier = f.head(12);
    let backdated = f
        .keys
        .sign_tree_head(20, &f.head(20).root_hash, earlier.timestamp_ms - 1);
    let err = f.verify(f.lines.clone(), &backdated, Some(&earlier)).unwrap_err();
    assert!(
        matches!(
            err,
            VerifyError::TimeWentBack {
                verified: 12,
                signed: 20,
                ..
            }
        ),
        "{err:?}"
    );
    assert!(err.to_string().contains("another history"), "{err}");
    // Dated the same as, or after, the head verified before: verified.
    let same_time = f.keys.sign_tree_head(20, &f.head(20).root_hash, earlier.timestamp_ms);
    assert_eq!(f.verify(f.lines.clone(), &same_time, Some(&earlier)).unwrap(), 20);
}

#[test]
fn heads_must_be_signed_by_the_logs_key() {
    let f = Fixture::new(8);
    let mut sth = f.head(8);
    sth.timestamp_ms += 1;
    let err = f.verify(f.lines.clone(), &sth, None).unwrap_err();
    assert!(matches!(err, VerifyError::BadSignature { tree_size: 8, .. }), "{err:?}");

    let stranger = LogKeys::generate().unwrap();
    let err = verify_export(
        f.lines.clone().into_iter(),
        &f.head(8),
        &stranger.public_key(),
        None,
        None,
    )
    .unwrap_err();
    assert!(matches!(err, VerifyError::WrongLog { .. }), "{err:?}");

    // A forged previous head (e.g. an edited state file) is refused as well.
    let mut prev = f.head(4);
    prev.root_hash[0] ^= 1;
    let err = f.verify(f.lines.clone(), &f.head(8), Some(&prev)).unwrap_err();
    assert!(matches!(err, VerifyError::BadSignature { tree_size: 4, .. }), "{err:?}");
}

#[test]
fn foreign_entries_and_bad_consistency_proofs_are_refused() {
    let f = Fixture::new(8);
    let mut lines = f.lines.clone();
    lines[3].log_id = "0".repeat(64);
    let err = f.verify(lines, &f.head(8), None).unwrap_err();
    assert!(matches!(err, VerifyError::ForeignEntry { sequence: 3, .. }), "{err:?}");

    let hashes: Vec<Hash> = f.lines.iter().map(|l| merkle::leaf_hash(l.leaf.as_bytes())).collect();
    let mut proof = merkle::consistency_proof(3, &hashes);
    proof[0][5] ^= 1;
    let err = verify_export(
        f.lines.clone().into_iter(),
        &f.head(8),
        &f.keys.public_key(),
        Some(&f.head(3)),
        Some(&proof),
    )
    .unwrap_err();
    assert!(
        matches!(
            err,
            VerifyError::Inconsistent {
                old_size: 3,
                new_size: 8
            }
        ),
        "{err:?}"
    );
}

#[test]
fn reader_names_malformed_lines() {
    let f = Fixture::new(4);
    let mut text = String::new();
    for line in &f.lines {
        text.push_str(&serde_json::to_string(line).unwrap());
        text.push('\n');
    }
    text.push('\n');
    let report = verify_export_reader(text.as_bytes(), &f.head(4), &f.keys.public_key(), None, None).unwrap();
    assert_eq!(report.entries, 4);

    let mut lines: Vec<&str> = text.lines().collect();
    lines[2] = "{\"log_id\": \"x\", \"sequence\": \"two\"}";
    let broken = lines.join("\n");
    let err = verify_export_reader(broken.as_bytes(), &f.head(4), &f.keys.public_key(), None, None).unwrap_err();
    assert!(matches!(err, VerifyError::Malformed { line: 3, .. }), "{err:?}");
    assert!(err.to_string().starts_with("export line 3 is malformed"), "{err}");

    let mut bad_hash = f.lines[1].clone();
    bad_hash.leaf_hash = "zz".into();
    let err = f
        .verify(vec![f.lines[0].clone(), bad_hash], &f.head(2), None)
        .unwrap_err();
    assert!(matches!(err, VerifyError::Malformed { line: 2, .. }), "{err:?}");

    assert_eq!(read_export("\n\n".as_bytes()).count(), 0);
}

#[test]
fn verifier_state_round_trips_atomically() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.json");
    assert_eq!(VerifierState::load(&path).unwrap(), VerifierState::default());

    let f = Fixture::new(5);
    let mut state = VerifierState::default();
    state.record(f.head(3));
    state.save(&path).unwrap();
    state.record(f.head(5));
    state.save(&path).unwrap();
    let loaded = VerifierState::load(&path).unwrap();
    assert_eq!(loaded, state);
    assert_eq!(loaded.previous(&f.keys.log_id()), Some(&f.head(5)));
    let names: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(
        names,
        vec![std::ffi::OsString::from("state.json")],
        "no temporary file is left behind"
    );

    std::fs::write(&path, "{not json").unwrap();
    let err = VerifierState::load(&path).unwrap_err();
    assert!(matches!(err, VerifyError::State { .. }), "{err:?}");
    assert!(err.to_string().contains("state.json"), "{err}");
}

/// The whole chain: writer, store rows, export, offline verification, state,
/// then tampering the rows and verifying again.
#[tokio::test]
async fn exports_of_the_writer_verify_and_later_tampering_is_caught() {
    let store = Arc::new(FakeStore::new());
    let config = AuditConfig {
        sign_interval: Duration::from_secs(3600),
        ..AuditConfig::default()
    };
    let log = AuditLog::open(store.clone() as Arc<dyn Store>, LogKeys::generate().unwrap(), config)
        .await
        .unwrap();
    for i in 0..30 {
        log.append(event(i)).await.unwrap();
    }
    let first = log.sign_now().await.unwrap();
    let public_key = log.keys().public_key();
    let log_id = log.log_id().to_string();
    let export = |store: &FakeStore| {
        store
            .entries(&log_id)
            .iter()
            .map(ExportLine::from_entry)
            .collect::<Vec<_>>()
    };

    let dir = tempfile::tempdir().unwrap();
    let state_path = dir.path().join("verifier.json");
    let mut state = VerifierState::load(&state_path).unwrap();
    let report = verify_export(
        export(&store).into_iter(),
        &first,
        &public_key,
        state.previous(&log_id),
        None,
    )
    .unwrap();
    assert_eq!(report.entries, 30);
    state.record(report.tree_head);
    state.save(&state_path).unwrap();

    log.append_many((30..40).map(event).collect()).await.unwrap();
    let second = log.shutdown().await.unwrap().unwrap();
    let proof = log
        .consistency_proof(&log_id, first.tree_size, second.tree_size)
        .await
        .unwrap();
    let state = VerifierState::load(&state_path).unwrap();
    let report = verify_export(
        export(&store).into_iter(),
        &second,
        &public_key,
        state.previous(&log_id),
        Some(&proof),
    )
    .unwrap();
    assert_eq!(report.consistent_with_previous, Some(30));

    // An attacker with database access rewrites entry 12, hash included.
    store.tamper(&log_id, 12, |e| {
        e.leaf = e.leaf.replace("tax-board", "police");
        e.leaf_hash = merkle::leaf_hash(e.leaf.as_bytes());
    });
    let err = verify_export(
        export(&store).into_iter(),
        &second,
        &public_key,
        state.previous(&log_id),
        None,
    )
    .unwrap_err();
    assert!(matches!(err, VerifyError::Inconsistent { old_size: 30, .. }), "{err:?}");
}

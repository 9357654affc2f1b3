//! The access log end to end: tampering caught by `lienthong audit verify`,
//! a SIGKILL in the middle of a load, and failing closed when the database
//! cannot be written.

use crate::harness::*;
use lienthong::v1 as pb;
use lienthong_cli::federation::{Federation, JUDICIAL_OFFICE, PURPOSE_CERTIFICATE, STATE_AUDIT};
use sqlx::sqlite::SqlitePoolOptions;
use sqlx::{Row, SqlitePool};
use std::time::Duration;
use tonic::Code;

async fn lookups(fed: &Federation, n: u32) -> Vec<pb::Receipt> {
    let office = client(fed, JUDICIAL_OFFICE).await;
    let mut receipts = Vec::new();
    for i in 0..n {
        let r = office
            .exchange()
            .lookup(birth_lookup(&citizen_id(fed, 100 + i), PURPOSE_CERTIFICATE))
            .await
            .unwrap();
        receipts.push(r.into_inner().receipt.unwrap());
    }
    receipts
}

/// Waits until a signed tree head covers the whole log.
async fn signed_up_to_date(fed: &Federation) -> u64 {
    let audit = fed.broker.broker.audit.clone();
    assert!(
        eventually(Duration::from_secs(10), async || {
            let size = audit.size();
            audit.latest_signed().is_some_and(|h| h.tree_size == size)
        })
        .await,
        "a tree head covering the log is signed"
    );
    audit.size()
}

async fn db(fed: &Federation) -> SqlitePool {
    let path = fed.dir.join("broker-data/lienthong.db");
    SqlitePoolOptions::new()
        .max_connections(1)
        .connect(&format!("sqlite://{}", path.display()))
        .await
        .unwrap()
}

async fn row(pool: &SqlitePool, seq: i64) -> (String, Vec<u8>) {
    let r = sqlx::query("SELECT leaf, leaf_hash FROM audit_entries WHERE sequence = ?")
        .bind(seq)
        .fetch_one(pool)
        .await
        .unwrap();
    (r.get(0), r.get(1))
}

async fn put(pool: &SqlitePool, seq: i64, (leaf, hash): &(String, Vec<u8>)) {
    sqlx::query("UPDATE audit_entries SET leaf = ?, leaf_hash = ? WHERE sequence = ?")
        .bind(leaf)
        .bind(hash)
        .bind(seq)
        .execute(pool)
        .await
        .unwrap();
}

#[tokio::test]
async fn tampering_with_stored_rows_is_caught_and_named() {
    let (dir, fed) = federation().await;
    lookups(&fed, 12).await;
    let size = signed_up_to_date(&fed).await as i64;
    let state = dir.path().join("verifier-state.json");
    let state = state.to_str().unwrap();
    let verify = async || cli_as(&fed, STATE_AUDIT, &["audit", "verify", "--state", state]).await;
    let (ok, out) = verify().await;
    assert!(ok && out.contains("OK"), "a clean log verifies: {out}");

    let pool = db(&fed).await;
    let victim = size - 5;
    let original = row(&pool, victim).await;

    // One row changed (the consumer rewritten), its stored hash left alone.
    let forged = original.0.replace(JUDICIAL_OFFICE, "hanoi-tax-dept");
    assert_ne!(forged, original.0);
    put(&pool, victim, &(forged.clone(), original.1.clone())).await;
    let (ok, out) = verify().await;
    assert!(!ok && out.contains(&format!("entry {victim} was altered")), "{out}");
    // ... and with the hash recomputed too: the copy kept from the last run
    // names it (and the signed root no longer matches).
    let rehashed = lienthong_audit::merkle::leaf_hash(forged.as_bytes()).to_vec();
    put(&pool, victim, &(forged, rehashed)).await;
    let (ok, out) = verify().await;
    assert!(!ok && out.contains(&format!("entry {victim} differs")), "{out}");
    put(&pool, victim, &original).await;
    assert!(verify().await.0, "restored log verifies");

    // One row deleted.
    sqlx::query("DELETE FROM audit_entries WHERE sequence = ?")
        .bind(victim)
        .execute(&pool)
        .await
        .unwrap();
    let (ok, out) = verify().await;
    assert!(!ok && out.contains(&format!("entry {victim} is missing")), "{out}");
    let log_id = fed.broker.broker.audit.log_id().to_string();
    restore_row(&pool, &log_id, victim, &original).await;
    assert!(verify().await.0);

    // Two rows swapped.
    let next = row(&pool, victim + 1).await;
    put(&pool, victim, &next).await;
    put(&pool, victim + 1, &original).await;
    let (ok, out) = verify().await;
    assert!(!ok && out.contains(&format!("entry {victim} differs")), "{out}");
    put(&pool, victim, &original).await;
    put(&pool, victim + 1, &next).await;
    assert!(verify().await.0);

    // The tail truncated.
    sqlx::query("DELETE FROM audit_entries WHERE sequence >= ?")
        .bind(size - 3)
        .execute(&pool)
        .await
        .unwrap();
    let (ok, out) = verify().await;
    assert!(
        !ok && out.contains("truncated") && out.contains(&format!("{}", size - 3)),
        "{out}"
    );
    fed.shutdown().await.unwrap();
}

async fn restore_row(pool: &SqlitePool, log_id: &str, seq: i64, (leaf, hash): &(String, Vec<u8>)) {
    let ev: lienthong_core::audit::AuditEvent = serde_json::from_str(leaf).unwrap();
    sqlx::query(
        "INSERT INTO audit_entries (log_no, sequence, leaf_hash, leaf, time_us, kind, actor, provider, record_type, purpose, outcome, subject_hash) \
         VALUES ((SELECT log_no FROM audit_logs WHERE log_id = ?), ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
    )
    .bind(log_id)
    .bind(seq)
    .bind(hash)
    .bind(leaf)
    .bind((ev.time.unix_timestamp_nanos() / 1000) as i64)
    .bind(ev.kind.as_str())
    .bind(&ev.actor)
    .bind(&ev.provider)
    .bind(&ev.record_type)
    .bind(&ev.purpose)
    .bind(ev.outcome.as_str())
    .bind((!ev.subject_hash.is_empty()).then(|| hex::decode(&ev.subject_hash).unwrap()))
    .execute(pool)
    .await
    .unwrap();
}

#[tokio::test]
async fn sigkill_under_load_loses_no_released_lookup() {
    let (dir, mut fed) = federation().await;
    let mut process = BrokerProcess::take_over(&mut fed, &[]).await;
    let certs = fed.certs.clone();
    let files = lienthong_cli::client::member_files(&certs, JUDICIAL_OFFICE);
    let office = lienthong_cli::client::connect(&process.url, &files).await.unwrap();
    let receipts = std::sync::Arc::new(std::sync::Mutex::new(Vec::<pb::Receipt>::new()));
    let mut tasks = Vec::new();
    for t in 0..8u32 {
        let office = office.clone();
        let receipts = receipts.clone();
        let seed = fed.options.seed;
        tasks.push(tokio::spawn(async move {
            for i in 0..2000u32 {
                let subject = lienthong_provider::demo::citizen_national_id(seed, t * 2000 + i);
                match look_up_birth(&office, &subject).await {
                    Ok(r) => receipts.lock().unwrap().push(r.into_inner().receipt.unwrap()),
                    Err(_) => return,
                }
            }
        }));
    }
    // Let the load run, then kill the broker without warning.
    assert!(eventually(Duration::from_secs(30), async || receipts.lock().unwrap().len() >= 200).await);
    process.kill();
    for t in tasks {
        let _ = t.await;
    }
    let receipts = receipts.lock().unwrap().clone();
    assert!(receipts.len() >= 200);

    let mut process = BrokerProcess::start(&fed.config_path);
    let auditor =
        lienthong_cli::client::connect(&process.url, &lienthong_cli::client::member_files(&certs, STATE_AUDIT))
            .await
            .unwrap();
    let entries = logged_leaves(&auditor, "").await;
    for r in &receipts {
        assert_eq!(
            entries.get(&r.sequence),
            Some(&r.leaf_hash),
            "entry {} of a released lookup survived the crash",
            r.sequence
        );
    }
    // The restarted broker signs a head covering everything, and the log verifies.
    let env = [
        ("LIENTHONG_BROKER", process.url.clone()),
        ("LIENTHONG_CERTS", certs.display().to_string()),
        ("LIENTHONG_AS", STATE_AUDIT.to_string()),
    ];
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let state = dir.path().join("state.json");
    let ok = eventually(Duration::from_secs(10), async || {
        run_cli(&["audit", "verify", "--state", state.to_str().unwrap()], &env).0
    })
    .await;
    assert!(
        ok,
        "log verifies after the crash: {}",
        run_cli(&["audit", "verify", "--state", state.to_str().unwrap()], &env).1
    );
    assert_eq!(process.terminate().code(), Some(0), "SIGTERM exits cleanly");
    fed.shutdown_registers().await;
}

#[tokio::test]
async fn an_unwritable_log_fails_closed_and_recovers() {
    let (_dir, fed) = federation().await;
    let office = client(&fed, JUDICIAL_OFFICE).await;
    let subject = citizen_id(&fed, 321);
    look_up_birth(&office, &subject).await.unwrap();
    let before = fed.broker.broker.audit.size();

    // Another process holds the database's write lock (as a stuck backup job
    // would): the broker cannot commit audit entries.
    let pool = db(&fed).await;
    let mut conn = pool.acquire().await.unwrap();
    sqlx::query("BEGIN EXCLUSIVE").execute(&mut *conn).await.unwrap();
    let err = look_up_birth(&office, &subject).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(err.message().contains("no data was released"), "{}", err.message());
    assert_eq!(
        fed.broker.broker.audit.size(),
        before,
        "nothing was logged, nothing released"
    );

    sqlx::query("ROLLBACK").execute(&mut *conn).await.unwrap();
    drop(conn);
    let r = look_up_birth(&office, &subject).await.expect("writes resume");
    assert_eq!(
        r.into_inner().receipt.unwrap().sequence,
        before,
        "the log continues densely"
    );
    fed.shutdown().await.unwrap();
}

/// The database file moved away (or deleted) under the running broker: its
/// commits would go to a file the next start does not open, so lookups fail
/// closed until the file is back, and the log goes on densely then.
#[tokio::test]
async fn a_database_file_moved_away_fails_closed_until_it_is_back() {
    let (_dir, fed) = federation().await;
    let office = client(&fed, JUDICIAL_OFFICE).await;
    let subject = citizen_id(&fed, 322);
    look_up_birth(&office, &subject).await.unwrap();
    let before = fed.broker.broker.audit.size();

    let db = fed.dir.join("broker-data/lienthong.db");
    let away = fed.dir.join("broker-data/lienthong.db.away");
    std::fs::rename(&db, &away).unwrap();
    let err = look_up_birth(&office, &subject).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(err.message().contains("no data was released"), "{}", err.message());

    std::fs::rename(&away, &db).unwrap();
    let r = look_up_birth(&office, &subject).await.expect("writes resume");
    // The refused lookup's entry landed in the file all the same, and the
    // log's writer took it back in: the log goes on after it.
    assert_eq!(r.into_inner().receipt.unwrap().sequence, before + 1);
    fed.shutdown().await.unwrap();
}

/// An admin change the store committed whose audit entry then fails (the
/// database refuses the log's insert, as a full disk would): the admin hears
/// it is in effect and not to repeat it, and no entry claims it failed.
#[tokio::test]
async fn a_change_in_effect_but_not_audited_is_not_logged_as_failed() {
    let (_dir, fed) = federation().await;
    let admin = client(&fed, lienthong_cli::federation::ADMIN).await;
    let pool = db(&fed).await;
    // Only the change's own entry is refused: an entry claiming it failed
    // would be written, and is what this test looks for.
    sqlx::query(
        "CREATE TRIGGER refuse_audit BEFORE INSERT ON audit_entries WHEN NEW.outcome = 'allowed' \
         BEGIN SELECT RAISE(ABORT, 'database or disk is full'); END",
    )
    .execute(&pool)
    .await
    .unwrap();
    let before = fed.broker.broker.audit.size();
    let err = admin
        .admin()
        .create_grant(birth_grant(lienthong_cli::federation::TAX_DEPT, &["/full_name"], 0))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Internal, "{err:?}");
    assert!(
        err.message().contains("was applied and is in effect") && err.message().contains("do not repeat it"),
        "{err:?}"
    );
    sqlx::query("DROP TRIGGER refuse_audit").execute(&pool).await.unwrap();
    pool.close().await;

    // The grant is live, and the log holds no entry saying it failed.
    let grants = admin
        .admin()
        .list_grants(pb::ListGrantsRequest {
            consumer: lienthong_cli::federation::TAX_DEPT.into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .grants;
    assert_eq!(grants.len(), 1, "{grants:?}");
    let failed = logged(
        &fed,
        pb::EntryFilter {
            kind: pb::EntryKind::Admin as i32,
            outcome: pb::Outcome::Failed as i32,
            ..Default::default()
        },
    )
    .await;
    assert!(failed.is_empty(), "{failed:?}");
    // The log goes on densely once it can be written.
    let r = look_up_birth(&client(&fed, JUDICIAL_OFFICE).await, &citizen_id(&fed, 5))
        .await
        .expect("writes resume");
    assert_eq!(r.into_inner().receipt.unwrap().sequence, before);
    fed.shutdown().await.unwrap();
}

/// An entry altered in the database while the broker was down, deep enough
/// in the log that the opening (from the stored Merkle tree nodes) does not
/// read it: the check behind the opening finds it, and the broker stops
/// releasing data (lookups UNAVAILABLE, its exchange NOT_SERVING so load
/// balancers go elsewhere), while the audit service stays up for the
/// auditors who look into it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_entry_altered_while_the_broker_was_down_stops_its_lookups() {
    let (_dir, mut fed) = federation().await;
    // Past 512 entries, so that the opening reads the node over entries
    // 0..512 and not entry 5 itself.
    let before = fed.broker.broker.audit.size();
    lookups(&fed, 600).await;
    assert!(fed.broker.broker.audit.size() >= before + 600);
    let stop = fed.broker.take_shutdown().unwrap();
    let _ = stop.send(());
    fed.broker.wait().await.unwrap();

    let pool = db(&fed).await;
    let (leaf, _) = row(&pool, 5).await;
    // Rewritten with its leaf hash, as someone with the database would.
    let forged = format!("{leaf} ");
    sqlx::query("UPDATE audit_entries SET leaf = ?, leaf_hash = ? WHERE sequence = 5")
        .bind(&forged)
        .bind(lienthong_audit::merkle::leaf_hash(forged.as_bytes()).to_vec())
        .execute(&pool)
        .await
        .unwrap();
    pool.close().await;

    let process = BrokerProcess::start(&fed.config_path);
    let ca = fed.certs.join("ca.pem");
    let found = eventually(Duration::from_secs(30), async || {
        let (ok, out) = exchange_health(&process.url, &ca).await;
        !ok && out.contains("NOT_SERVING")
    })
    .await;
    assert!(
        found,
        "the exchange still serves: {:?}",
        exchange_health(&process.url, &ca).await
    );

    let files = lienthong_cli::client::member_files(&fed.certs, JUDICIAL_OFFICE);
    let office = lienthong_cli::client::connect(&process.url, &files).await.unwrap();
    let refused = look_up_birth(&office, &citizen_id(&fed, 7)).await.unwrap_err();
    assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");
    assert!(refused.message().contains("no data was released"), "{refused:?}");

    // Auditors still reach the log, and the altered entry is in it for them to see.
    let auditor = lienthong_cli::client::connect(
        &process.url,
        &lienthong_cli::client::member_files(&fed.certs, STATE_AUDIT),
    )
    .await
    .unwrap();
    let leaves = logged_leaves(&auditor, "").await;
    assert!(leaves.contains_key(&5));
    fed.shutdown_registers().await;
}

#[tokio::test]
async fn an_export_verifies_offline_and_says_what_no_signature_covers_yet() {
    let (_dir, fed) = federation().await;
    lookups(&fed, 3).await;
    let signed = signed_up_to_date(&fed).await;
    let (ok, sth) = cli_as(&fed, STATE_AUDIT, &["audit", "sth", "--json"]).await;
    assert!(ok, "{sth}");
    // Taken after the head: two entries no signature in hand covers.
    lookups(&fed, 2).await;
    let export = fed.dir.join("log.jsonl");
    let (ok, out) = cli_as(
        &fed,
        STATE_AUDIT,
        &["audit", "export", "--out", export.to_str().unwrap()],
    )
    .await;
    assert!(ok, "{out}");
    let sth_file = fed.dir.join("sth.json");
    std::fs::write(&sth_file, sth).unwrap();
    // The key to pin, as an auditor keeps it.
    let (ok, pem) = cli_as(&fed, STATE_AUDIT, &["audit", "key"]).await;
    assert!(ok && pem.starts_with("-----BEGIN PUBLIC KEY-----"), "{pem}");
    let key_file = fed.dir.join("log-key.pem");
    std::fs::write(&key_file, &pem).unwrap();
    let log_id = fed.broker.broker.audit.log_id().to_string();
    let state = fed.dir.join("offline-state.json");
    let verify_offline = || {
        run_cli(
            &[
                "audit",
                "verify",
                "--export",
                export.to_str().unwrap(),
                "--sth",
                sth_file.to_str().unwrap(),
                "--public-key",
                key_file.to_str().unwrap(),
                "--state",
                state.to_str().unwrap(),
            ],
            &[],
        )
    };
    let (ok, out) = verify_offline();
    assert!(ok, "{out}");
    let total = signed + 2;
    assert!(
        out.contains(&format!(
            "log {log_id}: OK, {total} entries, signed tree head of size {signed} verified; entries {signed} to {} are past it",
            total - 1
        )),
        "{out}"
    );

    // A tree head file with its log id tampered with fails, naming it, and
    // names no file outside the state's directory.
    let head: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&sth_file).unwrap()).unwrap();
    for forged in ["€€€€€€€€€€€€€€€€€€€€€", "../../../../tmp/x"] {
        let mut tampered = head.clone();
        tampered["log_id"] = forged.into();
        std::fs::write(&sth_file, tampered.to_string()).unwrap();
        let (ok, out) = verify_offline();
        assert!(!ok && !out.contains("panicked"), "{forged}: {out}");
        assert!(out.contains("is not a log id"), "{forged}: {out}");
    }
    fed.shutdown().await.unwrap();
}

/// What a client gets for proofs and pages the log cannot give: a code it
/// can act on (OUT_OF_RANGE: ask again later; INVALID_ARGUMENT: fix the
/// request), never INTERNAL or NOT_FOUND for a log that exists.
#[tokio::test]
async fn proofs_and_pages_past_the_log_get_codes_a_client_can_act_on() {
    let (_dir, fed) = federation().await;
    let signed = signed_up_to_date(&fed).await;
    let auditor = client(&fed, STATE_AUDIT).await;
    let mut audit = auditor.audit();
    let code = |r: Result<tonic::Response<pb::InclusionProof>, tonic::Status>| r.unwrap_err().code();

    // An entry no signed head covers yet: ask again after the next one. (A
    // head signed between the lookup and the request covers it: try again.)
    let mut err = None;
    for _ in 0..5 {
        let receipt = lookups(&fed, 1).await.remove(0);
        let asked = audit
            .get_inclusion_proof(pb::GetInclusionProofRequest {
                sequence: receipt.sequence,
                ..Default::default()
            })
            .await;
        if let Err(status) = asked {
            err = Some(status);
            break;
        }
    }
    let err = err.expect("every entry was covered at once");
    assert_eq!(err.code(), Code::OutOfRange, "{err:?}");
    assert!(err.message().contains("ask again after the next one"), "{err:?}");
    // A tree larger than the log, for a proof or a consistency proof.
    let past = pb::GetInclusionProofRequest {
        sequence: 0,
        tree_size: 1_000_000,
        ..Default::default()
    };
    assert_eq!(code(audit.get_inclusion_proof(past).await), Code::OutOfRange);
    let err = audit
        .get_consistency_proof(pb::GetConsistencyProofRequest {
            first: 1,
            second: 1_000_000,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::OutOfRange, "{err:?}");
    // A request that can never succeed.
    let inverted = pb::GetInclusionProofRequest {
        sequence: signed,
        tree_size: signed,
        ..Default::default()
    };
    assert_eq!(code(audit.get_inclusion_proof(inverted).await), Code::InvalidArgument);
    for log_id in ["not-a-log", "ÄÖ", &"F".repeat(64)] {
        let err = audit
            .get_signed_tree_head(pb::GetSignedTreeHeadRequest { log_id: log_id.into() })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{log_id}: {err:?}");
        assert!(err.message().contains("64 lowercase hex digits"), "{err:?}");
    }
    let unknown = "f".repeat(64);
    let err = audit
        .get_signed_tree_head(pb::GetSignedTreeHeadRequest { log_id: unknown })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");

    // A filter on an outcome or kind this version does not know.
    for filter in [
        pb::EntryFilter {
            outcome: 9,
            ..Default::default()
        },
        pb::EntryFilter {
            kind: 9,
            ..Default::default()
        },
    ] {
        let field = if filter.outcome != 0 {
            "filter.outcome 9"
        } else {
            "filter.kind 9"
        };
        let err = audit
            .query_entries(pb::QueryEntriesRequest {
                filter: Some(filter.clone()),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
        assert!(err.message().contains(field), "{err:?}");
        let err = audit
            .export_entries(pb::ExportEntriesRequest {
                filter: Some(filter),
                from_sequence: 0,
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    }

    // Pages: a token never returned is refused; a start past any log's end
    // streams nothing.
    for token in ["9223372036854775808", "18446744073709551615", "x"] {
        let err = audit
            .query_entries(pb::QueryEntriesRequest {
                page_token: token.into(),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{token}: {err:?}");
    }
    let mut stream = audit
        .export_entries(pb::ExportEntriesRequest {
            from_sequence: u64::MAX,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(stream.message().await.unwrap().is_none());
    fed.shutdown().await.unwrap();
}

/// The size of the head of `log_id` a verifier state file records.
fn verified_size(state: &std::path::Path, log_id: &str) -> Option<u64> {
    let state: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(state).ok()?).ok()?;
    state["logs"][log_id]["tree_size"].as_u64()
}

/// The CLI environment of the state auditor against a broker process.
fn auditor_env(fed: &Federation, process: &BrokerProcess) -> Vec<(&'static str, String)> {
    vec![
        ("LIENTHONG_BROKER", process.url.clone()),
        ("LIENTHONG_CERTS", fed.certs.display().to_string()),
        ("LIENTHONG_AS", STATE_AUDIT.to_string()),
    ]
}

/// Runs the CLI with an environment from [`auditor_env`].
fn run_with(args: &[&str], env: &[(&'static str, String)]) -> (bool, String) {
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    run_cli(args, &env)
}

/// Stops the federation's in-process broker, so that a broker process can
/// take its data directory over.
async fn stop_in_process_broker(fed: &mut Federation) {
    let stop = fed.broker.take_shutdown().unwrap();
    let _ = stop.send(());
    fed.broker.wait().await.unwrap();
}

/// A federation whose first log was retired as a rescheduled pod retires it
/// (a new key makes a new log; the old one stays in the database), served
/// by a broker process; both logs verified once into `state`.
struct RetiredLog {
    _dir: tempfile::TempDir,
    fed: Federation,
    process: BrokerProcess,
    old: String,
    old_size: u64,
    new: String,
    state: std::path::PathBuf,
}

impl RetiredLog {
    async fn start() -> RetiredLog {
        let (dir, mut fed) = federation().await;
        lookups(&fed, 3).await;
        signed_up_to_date(&fed).await;
        let old = fed.broker.broker.audit.log_id().to_string();
        stop_in_process_broker(&mut fed).await;
        let data = fed.dir.join("broker-data");
        let kept = dir.path().join("old-log-key");
        std::fs::create_dir_all(&kept).unwrap();
        for file in ["audit-signing.key", "audit-head.json"] {
            std::fs::rename(data.join(file), kept.join(file)).unwrap();
        }
        let process = BrokerProcess::start(&fed.config_path);
        let env = auditor_env(&fed, &process);
        let (ok, key) = run_with(&["--json", "audit", "key"], &env);
        assert!(ok, "{key}");
        let key: serde_json::Value = serde_json::from_str(&key).unwrap();
        let new = key["log_id"].as_str().unwrap().to_string();
        assert_ne!(new, old);
        let state = dir.path().join("state.json");
        let mut retired = RetiredLog {
            _dir: dir,
            fed,
            process,
            old,
            old_size: 0,
            new,
            state,
        };
        let both_ok = eventually(Duration::from_secs(10), async || {
            let (ok, out) = retired.verify(&[]);
            ok && out.contains(&format!("log {}: OK", retired.old)) && out.contains(&format!("log {}: OK", retired.new))
        })
        .await;
        assert!(both_ok, "both logs verify: {}", retired.verify(&[]).1);
        retired.old_size = verified_size(&retired.state, &retired.old).unwrap();
        assert!(retired.old_size > 3);
        retired
    }

    fn verify(&self, extra: &[&str]) -> (bool, String) {
        let mut args = vec!["audit", "verify", "--state", self.state.to_str().unwrap()];
        args.extend_from_slice(extra);
        run_with(&args, &auditor_env(&self.fed, &self.process))
    }

    /// The database, with the number of the old log.
    async fn db(&self) -> (SqlitePool, i64) {
        let pool = db(&self.fed).await;
        let old_no = sqlx::query("SELECT log_no FROM audit_logs WHERE log_id = ?")
            .bind(&self.old)
            .fetch_one(&pool)
            .await
            .unwrap()
            .get(0);
        (pool, old_no)
    }

    async fn shutdown(mut self) {
        assert_eq!(self.process.terminate().code(), Some(0));
        self.fed.shutdown_registers().await;
    }
}

/// Online, a pinned key verifies its own log only, and the auditor is told
/// which other logs of the federation that run did not check, rather than
/// taking a success for the whole federation's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn online_verify_with_a_pinned_key_names_the_logs_it_left_unchecked() {
    let retired = RetiredLog::start().await;
    let (old, new) = (&retired.old, &retired.new);
    let env = auditor_env(&retired.fed, &retired.process);
    let (ok, key) = run_with(&["audit", "key", "--log", old], &env);
    assert!(ok, "{key}");
    let (ok, out) = retired.verify(&["--public-key", &key]);
    assert!(ok && out.contains(&format!("log {old}: OK")), "{out}");
    assert!(!out.contains(&format!("log {new}: OK")), "{out}");
    assert!(
        out.contains(&format!("only log {old} was verified (the log of --public-key)"))
            && out.contains(&format!("1 other log(s) in this federation's database were not: {new}")),
        "{out}"
    );
    let (ok, out) = retired.verify(&["--log", new]);
    assert!(ok && out.contains(&format!("were not: {old}")), "{out}");
    let (ok, out) = retired.verify(&[]);
    assert!(ok && !out.contains("were not"), "{out}");
    retired.shutdown().await;
}

/// A log verified before whose signed heads, then whole self, were deleted
/// from the database fails, naming the size verified before: online
/// verification goes by the state file, not only by what the database lists.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn online_verify_fails_a_log_verified_before_that_was_deleted() {
    let retired = RetiredLog::start().await;
    let (old, new, old_size) = (&retired.old, &retired.new, retired.old_size);
    let (pool, old_no) = retired.db().await;
    sqlx::query("DELETE FROM tree_heads WHERE log_id = ?")
        .bind(old)
        .execute(&pool)
        .await
        .unwrap();
    let (ok, out) = retired.verify(&[]);
    assert!(
        !ok && out.contains(&format!(
            "log {old}: FAILED: it has no signed tree head, but one of size {old_size} was verified before"
        )),
        "{out}"
    );
    assert!(out.contains(&format!("log {new}: OK")), "{out}");

    sqlx::query("PRAGMA foreign_keys = OFF").execute(&pool).await.unwrap();
    for table in ["audit_entries", "audit_tree_nodes", "audit_subject_runs", "audit_logs"] {
        sqlx::query(&format!("DELETE FROM {table} WHERE log_no = ?"))
            .bind(old_no)
            .execute(&pool)
            .await
            .unwrap();
    }
    pool.close().await;
    let gone = format!(
        "log {old}: FAILED: a signed tree head of size {old_size} was verified before, but the log is no longer in this federation's database"
    );
    let (ok, out) = retired.verify(&[]);
    assert!(!ok && out.contains(&gone), "{out}");
    let (ok, out) = retired.verify(&["--log", old]);
    assert!(!ok && out.contains(&gone), "{out}");
    assert_eq!(
        verified_size(&retired.state, old),
        Some(old_size),
        "the state keeps naming it"
    );
    retired.shutdown().await;
}

/// A row of one log the broker cannot read fails that log, naming the
/// entry; the other logs are still verified, and their state saved.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreadable_entry_fails_its_log_only_and_names_the_entry() {
    let retired = RetiredLog::start().await;
    let (old, new) = (&retired.old, &retired.new);
    let (pool, old_no) = retired.db().await;
    let hash: Vec<u8> = sqlx::query("SELECT leaf_hash FROM audit_entries WHERE log_no = ? AND sequence = 1")
        .bind(old_no)
        .fetch_one(&pool)
        .await
        .unwrap()
        .get(0);
    let set_hash = async |hash: &[u8]| {
        sqlx::query("UPDATE audit_entries SET leaf_hash = ? WHERE log_no = ? AND sequence = 1")
            .bind(hash)
            .bind(old_no)
            .execute(&pool)
            .await
            .unwrap();
    };
    // A one-byte leaf hash: a row the store refuses to decode.
    set_hash(&[0]).await;
    // The new log forgotten, to see its state saved again.
    let mut saved: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&retired.state).unwrap()).unwrap();
    saved["logs"].as_object_mut().unwrap().remove(new);
    std::fs::write(&retired.state, saved.to_string()).unwrap();
    let (ok, out) = retired.verify(&[]);
    assert!(!ok, "{out}");
    assert!(
        out.contains(&format!("log {old}: FAILED: entry 1 could not be read")),
        "the unreadable entry is named: {out}"
    );
    assert!(
        out.contains(&format!("log {new}: OK")),
        "the other log is verified: {out}"
    );
    assert!(
        verified_size(&retired.state, new).is_some(),
        "and its state saved: {out}"
    );
    set_hash(&hash).await;
    let (ok, out) = retired.verify(&[]);
    assert!(ok, "{out}");
    pool.close().await;
    retired.shutdown().await;
}

/// `--log` with an id that is not one, or names no log: an error, never a
/// silent success.
#[tokio::test]
async fn verify_of_a_log_not_in_the_database_is_an_error() {
    let (dir, fed) = federation().await;
    let state = dir.path().join("state.json");
    let state = state.to_str().unwrap();
    let own = fed.broker.broker.audit.log_id().to_string();
    let verify =
        async |log: &str| cli_as(&fed, STATE_AUDIT, &["audit", "verify", "--state", state, "--log", log]).await;
    for malformed in [own.to_uppercase(), "nonsense".to_string()] {
        let (ok, out) = verify(&malformed).await;
        assert!(
            !ok && out.contains(&format!("--log {malformed:?} is not a log id")),
            "{out}"
        );
    }
    let unknown = format!("{}0", &own[..63]);
    let unknown = if unknown == own {
        format!("{}1", &own[..63])
    } else {
        unknown
    };
    let (ok, out) = verify(&unknown).await;
    assert!(
        !ok && out.contains(&format!("log {unknown} is not in this federation's database")),
        "{out}"
    );
    // Nor is its export or a query of it an empty success.
    let export = dir.path().join("unknown.jsonl");
    let (ok, out) = cli_as(
        &fed,
        STATE_AUDIT,
        &["audit", "export", "--log", &unknown, "--out", export.to_str().unwrap()],
    )
    .await;
    assert!(!ok && out.contains(&format!("log {unknown} not found")), "{out}");
    assert!(!export.exists(), "no empty export is left behind");
    let (ok, out) = cli_as(&fed, STATE_AUDIT, &["audit", "query", "--log", &unknown]).await;
    assert!(!ok && out.contains(&format!("log {unknown} not found")), "{out}");
    let err = client(&fed, STATE_AUDIT)
        .await
        .audit()
        .query_entries(pb::QueryEntriesRequest {
            filter: Some(pb::EntryFilter {
                log_id: unknown.clone(),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    // The broker signs its first head within its sign interval of starting.
    let mut out = String::new();
    let verified = eventually(Duration::from_secs(10), async || {
        let (ok, text) = verify(&own).await;
        out = text;
        ok && out.contains(&format!("log {own}: OK"))
    })
    .await;
    assert!(verified, "{out}");
    fed.shutdown().await.unwrap();
}

/// Online, entries past the signed head are not counted as verified: the
/// summary says, in the offline words, that no signature covers them yet.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn online_verify_says_what_no_signature_covers_yet() {
    let (dir, mut fed) = federation().await;
    let own = fed.broker.broker.audit.log_id().to_string();
    stop_in_process_broker(&mut fed).await;
    // The broker again, signing hourly: an entry made now stays unsigned.
    let config = std::fs::read_to_string(&fed.config_path).unwrap();
    let hourly = config.replace("sign_interval_ms = 200", "sign_interval_ms = 3600000");
    assert_ne!(hourly, config);
    let hourly_path = dir.path().join("hourly.toml");
    std::fs::write(&hourly_path, hourly).unwrap();
    let mut process = BrokerProcess::start(&hourly_path);
    let env = auditor_env(&fed, &process);
    let (ok, out) = run_with(&["audit", "history", "--subject", &citizen_id(&fed, 3)], &env);
    assert!(ok, "{out}");
    let state = dir.path().join("state.json");
    let (ok, out) = run_with(&["audit", "verify", "--state", state.to_str().unwrap()], &env);
    let signed = verified_size(&state, &own).unwrap();
    assert!(ok, "{out}");
    assert!(
        out.contains(&format!(
            "log {own}: OK, {} entries, signed tree head of size {signed} verified; entry {signed} is past it: its leaf hash is intact, but no signature covers it yet",
            signed + 1
        )),
        "{out}"
    );
    // No proof against the size the log has but no head signed: no root
    // anyone holds could check it.
    let files = lienthong_cli::client::member_files(&fed.certs, STATE_AUDIT);
    let auditor = lienthong_cli::client::connect(&process.url, &files).await.unwrap();
    let err = auditor
        .audit()
        .get_inclusion_proof(pb::GetInclusionProofRequest {
            sequence: 0,
            tree_size: signed + 1,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::OutOfRange, "{err:?}");
    assert!(err.message().contains(&format!("covers {signed} entries")), "{err:?}");
    let err = auditor
        .audit()
        .get_consistency_proof(pb::GetConsistencyProofRequest {
            first: 1,
            second: signed + 1,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::OutOfRange, "{err:?}");
    assert!(
        auditor
            .audit()
            .get_inclusion_proof(pb::GetInclusionProofRequest {
                sequence: 0,
                tree_size: signed,
                ..Default::default()
            })
            .await
            .is_ok()
    );
    assert_eq!(process.terminate().code(), Some(0));
    fed.shutdown_registers().await;
}

/// A head, then an export, then the log's key, as an auditor fetches them.
async fn offline_files(fed: &Federation) -> (std::path::PathBuf, std::path::PathBuf, std::path::PathBuf) {
    signed_up_to_date(fed).await;
    let (ok, sth) = cli_as(fed, STATE_AUDIT, &["audit", "sth", "--json"]).await;
    assert!(ok, "{sth}");
    let sth_file = fed.dir.join("sth.json");
    std::fs::write(&sth_file, sth).unwrap();
    let export = fed.dir.join("log.jsonl");
    let (ok, out) = cli_as(
        fed,
        STATE_AUDIT,
        &["audit", "export", "--out", export.to_str().unwrap()],
    )
    .await;
    assert!(ok, "{out}");
    let (ok, pem) = cli_as(fed, STATE_AUDIT, &["audit", "key"]).await;
    assert!(ok, "{pem}");
    let key_file = fed.dir.join("log-key.pem");
    std::fs::write(&key_file, &pem).unwrap();
    (export, sth_file, key_file)
}

/// `audit verify --export` with these files.
fn verify_offline(
    export: &std::path::Path,
    sth: &std::path::Path,
    key: &std::path::Path,
    state: &std::path::Path,
) -> (bool, String) {
    let path = |p: &std::path::Path| p.to_str().unwrap().to_string();
    run_cli(
        &[
            "audit",
            "verify",
            "--export",
            &path(export),
            "--sth",
            &path(sth),
            "--public-key",
            &path(key),
            "--state",
            &path(state),
        ],
        &[],
    )
}

/// A `--public-key` file that is not there is said to be missing, not to be
/// bad key text.
#[tokio::test]
async fn a_missing_public_key_file_is_said_to_be_missing() {
    let (_dir, fed) = federation().await;
    let (export, sth, _) = offline_files(&fed).await;
    let state = fed.dir.join("state.json");
    let (ok, out) = verify_offline(&export, &sth, &fed.dir.join("log-key.pme"), &state);
    assert!(!ok && out.contains("log-key.pme: No such file"), "{out}");
    let (ok, out) = cli_as(
        &fed,
        STATE_AUDIT,
        &[
            "audit",
            "verify",
            "--state",
            state.to_str().unwrap(),
            "--public-key",
            "/nonexistent/log-key.pem",
        ],
    )
    .await;
    assert!(!ok && out.contains("/nonexistent/log-key.pem: No such file"), "{out}");
    fed.shutdown().await.unwrap();
}

/// A state that cannot be written does not make an intact log FAILED: the
/// log is reported verified, and the saving fails with its cause; offline
/// and online alike.
#[tokio::test]
async fn an_unwritable_state_is_not_a_failed_verification() {
    let (_dir, fed) = federation().await;
    lookups(&fed, 2).await;
    signed_up_to_date(&fed).await;
    let log_id = fed.broker.broker.audit.log_id().to_string();
    let (export, sth, key) = offline_files(&fed).await;
    let nowhere = fed.dir.join("no-such-dir/state.json");
    let (ok, out) = verify_offline(&export, &sth, &key, &nowhere);
    let online = cli_as(
        &fed,
        STATE_AUDIT,
        &["audit", "verify", "--state", nowhere.to_str().unwrap()],
    )
    .await;
    for (ok, out) in [(ok, out), online] {
        assert!(!ok, "{out}");
        assert!(
            out.contains(&format!("log {log_id}: OK")) && !out.contains("FAILED"),
            "{out}"
        );
        assert!(
            out.contains("could not be saved") && out.contains("No such file or directory"),
            "{out}"
        );
    }
    fed.shutdown().await.unwrap();
}

/// An export older than the head it is checked against (the head fetched
/// after it, as the documentation once said) is no tampering alarm: the
/// failure says to fetch the head first, and that order verifies.
#[tokio::test]
async fn an_export_older_than_its_head_says_to_fetch_the_head_first() {
    let (_dir, fed) = federation().await;
    let (export, _, key) = offline_files(&fed).await;
    let exported = std::fs::read_to_string(&export).unwrap().lines().count();
    lookups(&fed, 2).await;
    let later = signed_up_to_date(&fed).await;
    let (ok, sth) = cli_as(&fed, STATE_AUDIT, &["audit", "sth", "--json"]).await;
    assert!(ok, "{sth}");
    let later_sth = fed.dir.join("sth-later.json");
    std::fs::write(&later_sth, sth).unwrap();
    let state = fed.dir.join("state.json");
    let (ok, out) = verify_offline(&export, &later_sth, &key, &state);
    assert!(!ok, "{out}");
    assert!(
        out.contains(&format!(
            "the export ends after {exported} entries, but the signed tree head covers {later}"
        )) && out.contains("fetch the head first"),
        "{out}"
    );
    assert!(!out.contains("export truncated"), "{out}");
    let (export, sth, key) = offline_files(&fed).await;
    let (ok, out) = verify_offline(&export, &sth, &key, &state);
    assert!(ok, "{out}");
    fed.shutdown().await.unwrap();
}

/// A line deleted from an export and the lines after it renumbered reads
/// as a short export: the copy of the leaf hashes kept from an earlier run
/// names the first entry that differs instead of calling it harmless.
#[tokio::test]
async fn a_line_deleted_and_renumbered_is_named_not_called_a_short_export() {
    let (_dir, fed) = federation().await;
    lookups(&fed, 6).await;
    let (export, sth, key) = offline_files(&fed).await;
    let state = fed.dir.join("state.json");
    let (ok, out) = verify_offline(&export, &sth, &key, &state);
    assert!(ok, "{out}");

    let lines: Vec<serde_json::Value> = std::fs::read_to_string(&export)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let victim = 4;
    let mut edited = String::new();
    for (i, mut line) in lines.into_iter().enumerate().filter(|(i, _)| *i != victim) {
        line["sequence"] = (if i > victim { i - 1 } else { i }).into();
        edited.push_str(&format!("{line}\n"));
    }
    std::fs::write(&export, edited).unwrap();
    let (ok, out) = verify_offline(&export, &sth, &key, &state);
    assert!(!ok, "{out}");
    assert!(
        out.contains(&format!(
            "entry {victim} differs from the copy verified on an earlier run"
        )),
        "{out}"
    );
    assert!(!out.contains("fetch the head first"), "{out}");
    fed.shutdown().await.unwrap();
}

/// Columns altered on a running broker (one access hidden from its
/// citizen's history and its agency renamed; another access put into a
/// second citizen's history): queries and histories refuse the altered
/// entry with DATA_LOSS naming it rather than show what the columns say, and
/// `audit verify` fails naming it.
#[tokio::test]
async fn altered_columns_are_never_shown_and_verify_names_the_entry() {
    let (dir, fed) = federation().await;
    let receipts = lookups(&fed, 3).await;
    signed_up_to_date(&fed).await;
    let (hidden, moved) = (receipts[1].sequence as i64, receipts[2].sequence as i64);
    let pool = db(&fed).await;
    sqlx::query("UPDATE audit_entries SET subject_hash = zeroblob(32), actor = 'nobody' WHERE sequence = ?")
        .bind(hidden)
        .execute(&pool)
        .await
        .unwrap();

    let auditor = client(&fed, STATE_AUDIT).await;
    let err = auditor
        .audit()
        .query_entries(pb::QueryEntriesRequest {
            page_size: 1000,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::DataLoss, "{err:?}");
    assert!(
        err.message()
            .contains(&format!("entry {hidden} has columns that are not its leaf's"))
            && err.message().contains("actor is \"nobody\""),
        "{err:?}"
    );
    let (ok, out) = cli_as(&fed, STATE_AUDIT, &["audit", "query", "--actor", "nobody"]).await;
    assert!(!ok && out.contains(&format!("entry {hidden}")), "{out}");

    let state = dir.path().join("verifier-state.json");
    let (ok, out) = cli_as(
        &fed,
        STATE_AUDIT,
        &["audit", "verify", "--state", state.to_str().unwrap()],
    )
    .await;
    assert!(
        !ok && out.contains(&format!("entry {hidden} is shown differently from what was logged"))
            && out.contains("actor is \"nobody\""),
        "{out}"
    );

    // Another citizen's access moved into the first one's history.
    let first: Vec<u8> = sqlx::query_scalar("SELECT subject_hash FROM audit_entries WHERE sequence = ?")
        .bind(receipts[0].sequence as i64)
        .fetch_one(&pool)
        .await
        .unwrap();
    sqlx::query("UPDATE audit_entries SET subject_hash = ? WHERE sequence = ?")
        .bind(&first)
        .bind(moved)
        .execute(&pool)
        .await
        .unwrap();
    let portal = client(&fed, lienthong_cli::federation::CITIZEN_PORTAL).await;
    let err = portal
        .audit()
        .subject_history(pb::SubjectHistoryRequest {
            subject_key: citizen_id(&fed, 100),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::DataLoss, "{err:?}");
    assert!(err.message().contains(&format!("entry {moved} ")), "{err:?}");
    assert!(
        !err.message().contains(&citizen_id(&fed, 100)),
        "no national id: {err:?}"
    );
    pool.close().await;
    fed.shutdown().await.unwrap();
}

/// Another log's key, as every log's, comes as a PEM to pin: never an empty
/// file written with success.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_key_of_another_log_is_a_pem_to_pin() {
    let retired = RetiredLog::start().await;
    let env = auditor_env(&retired.fed, &retired.process);
    for log in [&retired.old, &retired.new] {
        let (ok, pem) = run_with(&["audit", "key", "--log", log], &env);
        assert!(ok, "{pem}");
        let key = lienthong_audit::keys::parse_public_key(&pem).unwrap_or_else(|e| panic!("{e}: {pem:?}"));
        assert_eq!(&lienthong_audit::keys::log_id_of(&key), log);
    }
    let files = lienthong_cli::client::member_files(&retired.fed.certs, STATE_AUDIT);
    let auditor = lienthong_cli::client::connect(&retired.process.url, &files)
        .await
        .unwrap();
    let listed = auditor
        .audit()
        .list_logs(pb::ListLogsRequest {})
        .await
        .unwrap()
        .into_inner()
        .logs;
    assert_eq!(listed.len(), 2);
    for log in listed {
        let key = lienthong_audit::keys::parse_public_key(&log.public_key_pem).unwrap();
        assert_eq!(key.to_vec(), log.public_key, "{}", log.log_id);
        let served = auditor
            .audit()
            .get_public_key(pb::GetPublicKeyRequest {
                log_id: log.log_id.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(served.public_key_pem, log.public_key_pem);
    }
    retired.shutdown().await;
}

/// Asking for the head of a log the database does not hold says so, rather
/// than that the log has no head yet (which would have an auditor wait).
#[tokio::test]
async fn the_head_of_an_unknown_log_is_not_found_as_such() {
    let (_dir, fed) = federation().await;
    let auditor = client(&fed, STATE_AUDIT).await;
    let err = auditor
        .audit()
        .get_signed_tree_head(pb::GetSignedTreeHeadRequest { log_id: "a".repeat(64) })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert!(
        err.message().contains("is not in this federation's database"),
        "{err:?}"
    );
    fed.shutdown().await.unwrap();
}

/// A consumer checks its receipt from the command line: the entry's inclusion
/// proof against the newest signed head, under the log's key (pinned or
/// checked to be the log's); a receipt that is not the entry's fails saying
/// which hash the log holds.
#[tokio::test]
async fn audit_receipt_proves_a_lookups_receipt_and_refuses_a_wrong_one() {
    let (_dir, fed) = federation().await;
    let office = client(&fed, JUDICIAL_OFFICE).await;
    let receipt = look_up_birth(&office, &citizen_id(&fed, 2))
        .await
        .unwrap()
        .into_inner()
        .receipt
        .unwrap();
    let auditor = client(&fed, STATE_AUDIT).await;
    let signed = eventually(Duration::from_secs(30), async || {
        let head = auditor
            .audit()
            .get_signed_tree_head(pb::GetSignedTreeHeadRequest::default())
            .await;
        head.is_ok_and(|h| h.into_inner().tree_size > receipt.sequence)
    })
    .await;
    assert!(signed);
    let sequence = receipt.sequence.to_string();
    let leaf = hex::encode(&receipt.leaf_hash);
    let args = |leaf: &str| {
        vec![
            "audit".to_string(),
            "receipt".into(),
            "--log".into(),
            receipt.log_id.clone(),
            "--sequence".into(),
            sequence.clone(),
            "--leaf-hash".into(),
            leaf.to_string(),
        ]
    };
    let run = async |args: Vec<String>| {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        cli_as(&fed, JUDICIAL_OFFICE, &args).await
    };
    let (ok, out) = run(args(&leaf)).await;
    assert!(ok && out.contains("VERIFIED"), "{out}");
    assert!(
        out.contains(&format!("entry #{sequence} of log {}", receipt.log_id)),
        "{out}"
    );

    // Pinned: the log's own key passes, another log's key is refused.
    let (ok, key) = cli_as(&fed, STATE_AUDIT, &["audit", "key"]).await;
    assert!(ok, "{key}");
    let mut pinned = args(&leaf);
    pinned.extend(["--public-key".into(), key.clone()]);
    let (ok, out) = run(pinned).await;
    assert!(ok && out.contains("VERIFIED"), "{out}");
    // As `audit verify` takes it too: the PEM inline, dashes first.
    let state = fed.dir.join("receipt-verifier-state.json");
    let (ok, out) = cli_as(
        &fed,
        STATE_AUDIT,
        &[
            "audit",
            "verify",
            "--state",
            state.to_str().unwrap(),
            "--public-key",
            &key,
        ],
    )
    .await;
    assert!(ok, "{out}");
    let mut other = args(&leaf);
    other.extend(["--public-key".into(), "11".repeat(32)]);
    let (ok, out) = run(other).await;
    assert!(!ok && out.contains("not of the receipt's log"), "{out}");

    let wrong = "00".repeat(32);
    let (ok, out) = run(args(&wrong)).await;
    assert!(!ok, "{out}");
    assert!(
        out.contains(&format!("has leaf hash {leaf}, not the receipt's {wrong}")),
        "{out}"
    );
    let (ok, out) = run(args("xyz")).await;
    assert!(!ok && out.contains("--leaf-hash must be 64 hex digits"), "{out}");
    fed.shutdown().await.unwrap();
}

/// A citizen's history in text says "read" only of what was released: a
/// refused attempt is shown as asked for, with nothing released.
#[tokio::test]
async fn a_citizens_history_says_read_only_of_released_records() {
    let (_dir, fed) = federation().await;
    let subject = citizen_id(&fed, 6);
    let office = client(&fed, JUDICIAL_OFFICE).await;
    look_up_birth(&office, &subject).await.unwrap();
    let tax = client(&fed, lienthong_cli::federation::TAX_DEPT).await;
    look_up_birth(&tax, &subject).await.unwrap_err();
    // An auditor sees which grant allowed each access, and that none allowed a refusal.
    let accesses = logged(
        &fed,
        pb::EntryFilter {
            kind: pb::EntryKind::Access as i32,
            ..Default::default()
        },
    )
    .await;
    let allowed = accesses.iter().find(|e| e.actor == JUDICIAL_OFFICE).unwrap();
    assert!(!allowed.grant_id.is_empty() && allowed.leaf_json.contains(&allowed.grant_id));
    let refused = accesses.iter().find(|e| e.actor == "hanoi-tax-dept").unwrap();
    assert_eq!(refused.grant_id, "");
    let (ok, out) = cli_as(
        &fed,
        lienthong_cli::federation::CITIZEN_PORTAL,
        &["audit", "history", "--subject", &subject],
    )
    .await;
    assert!(ok, "{out}");
    let line = |who: &str| out.lines().find(|l| l.contains(who)).unwrap_or_default().to_string();
    let refused = line("hanoi-tax-dept");
    assert!(
        refused.contains(") asked for civil_status.birth_record") && refused.ends_with("denied, nothing released"),
        "{out}"
    );
    let released = line("hanoi-judicial-office");
    assert!(
        released.contains(") read civil_status.birth_record")
            && released.contains("/full_name")
            && released.ends_with("allowed"),
        "{out}"
    );
    // `--since` keeps only what happened from then on.
    for (since, lines) in [("2000-01-01T00:00:00Z", 2), ("2999-01-01T00:00:00Z", 0)] {
        let (ok, out) = cli_as(
            &fed,
            lienthong_cli::federation::CITIZEN_PORTAL,
            &["audit", "history", "--subject", &subject, "--since", since],
        )
        .await;
        assert!(ok && out.lines().count() == lines, "{since}: {out}");
    }
    let (ok, out) = cli_as(
        &fed,
        lienthong_cli::federation::CITIZEN_PORTAL,
        &["audit", "history", "--subject", &subject, "--since", "yesterday"],
    )
    .await;
    assert!(!ok && out.contains("not an RFC 3339 time"), "{out}");
    fed.shutdown().await.unwrap();
}

/// A member without the auditor role running `audit verify` is told so, not
/// that a log FAILED verification (a false alarm of tampering).
#[tokio::test]
async fn audit_verify_by_a_non_auditor_says_it_lacks_the_role_not_that_a_log_failed() {
    let (dir, fed) = federation().await;
    // A log with a signed head, whose entries a verifier must then read.
    let auditor = client(&fed, STATE_AUDIT).await;
    let signed = eventually(Duration::from_secs(30), async || {
        auditor
            .audit()
            .get_signed_tree_head(pb::GetSignedTreeHeadRequest::default())
            .await
            .is_ok()
    })
    .await;
    assert!(signed);
    let state = dir.path().join("state.json");
    let (ok, out) = cli_as(
        &fed,
        JUDICIAL_OFFICE,
        &["audit", "verify", "--state", state.to_str().unwrap()],
    )
    .await;
    assert!(!ok, "{out}");
    assert!(
        out.contains("cannot verify the logs") && out.contains("auditor role"),
        "{out}"
    );
    assert!(!out.contains("FAILED") && !out.contains("failed verification"), "{out}");
    fed.shutdown().await.unwrap();
}

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
    // Hand the data directory to a broker process of its own.
    let stop = fed.broker.take_shutdown().unwrap();
    let _ = stop.send(());
    fed.broker.wait().await.unwrap();
    let mut process = BrokerProcess::start(&fed.config_path);
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
    let (ok, out) = run_cli(
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
    );
    assert!(ok, "{out}");
    let total = signed + 2;
    assert!(
        out.contains(&format!(
            "log {log_id}: OK, {total} entries, signed tree head of size {signed} verified; entries {signed}..{total} are past it"
        )),
        "{out}"
    );
    fed.shutdown().await.unwrap();
}

//! Several broker replicas on one PostgreSQL: shared members, grants and
//! schemas with changes reaching every replica within a second, one audit log
//! per replica, and failing closed through a database outage.

use crate::harness::*;
use lienthong::v1 as pb;
use lienthong_cli::client::{Clients, connect, member_files};
use lienthong_cli::federation::{
    ADMIN, CIVIL_STATUS, Federation, FederationOptions, JUDICIAL_OFFICE, PURPOSE_CERTIFICATE, STATE_AUDIT, TAX_DEPT,
    write_config,
};
use lienthong_store::testing::PgCluster;
use std::time::{Duration, Instant};
use tempfile::TempDir;
use tokio::net::TcpListener;
use tonic::Code;

/// A second broker on the same database, with its own data directory (own
/// log and signing key) and the federation's shared subject-hashing secret.
async fn second_broker(fed: &Federation, database_url: &str) -> (TempDir, lienthong_broker::ServerHandle, String) {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("broker-data");
    std::fs::create_dir_all(&data).unwrap();
    let secret = data.join("subject-hmac.key");
    std::fs::copy(fed.dir.join("broker-data/subject-hmac.key"), &secret).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
    let mut opts = FederationOptions::new(dir.path());
    opts.database_url = Some(database_url.to_string());
    let (_, config) = write_config(&opts, &fed.certs, &data).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let handle = lienthong_broker::start(config, Some(listener)).await.unwrap();
    let url = format!("https://127.0.0.1:{}", handle.addr.port());
    (dir, handle, url)
}

/// A replica started without the federation's subject secret would make one
/// of its own, and no citizen's history would find the lookups it logs: it
/// refuses to start, saying which file to copy; with the file it starts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_without_the_shared_subject_secret_refuses_to_start() {
    let cluster = PgCluster::start().expect("PostgreSQL binaries (the test command installs them)");
    let (_dir, fed, url) = pg_federation(&cluster, "").await;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("broker-data");
    let mut opts = FederationOptions::new(dir.path());
    opts.database_url = Some(url.clone());
    let (_, config) = write_config(&opts, &fed.certs, &data).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let refused = lienthong_broker::start(config.clone(), Some(listener))
        .await
        .err()
        .expect("a replica with a subject secret of its own started");
    let why = refused.to_string();
    assert!(
        why.contains("is not the subject secret this federation's database was started with")
            && why.contains("subject-hmac.key"),
        "{why}"
    );
    // The secret it made is replaced by the shared one, as the message says.
    let secret = data.join("subject-hmac.key");
    std::fs::copy(fed.dir.join("broker-data/subject-hmac.key"), &secret).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let handle = lienthong_broker::start(config, Some(listener)).await.unwrap();
    handle.shutdown().await.unwrap();
}

/// A data directory copied to a second host would have two brokers write one
/// log with one key, each taking the other's entries for a lost commit of
/// its own: the copy is refused at start, naming the log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_started_on_a_copy_of_another_ones_data_directory_is_refused() {
    let cluster = PgCluster::start().expect("PostgreSQL binaries (the test command installs them)");
    let (_dir, fed, url) = pg_federation(&cluster, "").await;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("broker-data");
    std::fs::create_dir_all(&data).unwrap();
    use std::os::unix::fs::PermissionsExt;
    for file in ["audit-signing.key", "subject-hmac.key"] {
        std::fs::copy(fed.dir.join("broker-data").join(file), data.join(file)).unwrap();
        std::fs::set_permissions(data.join(file), std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    let mut opts = FederationOptions::new(dir.path());
    opts.database_url = Some(url);
    let (_, config) = write_config(&opts, &fed.certs, &data).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let refused = lienthong_broker::start(config, Some(listener))
        .await
        .err()
        .expect("a replica on a copy of another's data directory started");
    let why = refused.to_string();
    let log_id = fed.broker.broker.audit.log_id();
    assert!(
        why.contains("another broker is writing audit log") && why.contains(log_id),
        "{why}"
    );
    look_up_birth(&client(&fed, JUDICIAL_OFFICE).await, &citizen_id(&fed, 2))
        .await
        .unwrap();
    fed.shutdown().await.unwrap();
}

/// The claim on a log is a PostgreSQL session's advisory lock, which goes
/// with the session: a broker whose session ended and whose log another
/// broker (on a copy of its data directory) took meanwhile stops, rather
/// than write one log from two brokers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_whose_log_another_took_stops() {
    use sqlx::Connection;
    let cluster = PgCluster::start().expect("PostgreSQL binaries (the test command installs them)");
    let (_dir, mut fed, url) = pg_federation(&cluster, "").await;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("broker-data");
    std::fs::create_dir_all(&data).unwrap();
    use std::os::unix::fs::PermissionsExt;
    for file in ["audit-signing.key", "subject-hmac.key"] {
        std::fs::copy(fed.dir.join("broker-data").join(file), data.join(file)).unwrap();
        std::fs::set_permissions(data.join(file), std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    let mut opts = FederationOptions::new(dir.path());
    opts.database_url = Some(url.clone());
    let (_, config) = write_config(&opts, &fed.certs, &data).unwrap();
    // The session holding the claim ends (a restart, a firewall, a timeout).
    let mut admin = sqlx::PgConnection::connect(&url).await.unwrap();
    let ended: Vec<bool> = sqlx::query_scalar(
        "SELECT pg_terminate_backend(pid) FROM pg_locks WHERE locktype = 'advisory' AND objsubid = 2",
    )
    .fetch_all(&mut admin)
    .await
    .unwrap();
    assert!(!ended.is_empty(), "no advisory lock held");
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let copy = lienthong_broker::start(config, Some(listener))
        .await
        .expect("the copy takes the unclaimed log");
    let stopped = tokio::time::timeout(Duration::from_secs(30), fed.broker.wait())
        .await
        .expect("the first broker went on writing a log another holds");
    let why = stopped.expect_err("stopped with an error").to_string();
    assert!(why.contains("another broker took this broker's audit log"), "{why}");
    copy.shutdown().await.unwrap();
    fed.shutdown_registers().await;
}

async fn as_member(url: &str, fed: &Federation, member: &str) -> Clients {
    connect(url, &member_files(&fed.certs, member)).await.unwrap()
}

async fn pg_federation(cluster: &PgCluster, extra_config: &str) -> (TempDir, Federation, String) {
    let url = cluster.create_database().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut opts = FederationOptions::new(dir.path());
    opts.database_url = Some(url.clone());
    opts.extra_config = extra_config.to_string();
    let fed = Federation::start(opts).await.expect("federation on PostgreSQL");
    (dir, fed, url)
}

/// A grant's rate limit holds for the federation, not per replica: lookups
/// spread over two replicas get N a minute in all, and past them both refuse
/// with RESOURCE_EXHAUSTED and a retry-after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rate_limit_holds_across_replicas() {
    let cluster = PgCluster::start().expect("PostgreSQL binaries (the test command installs them)");
    let (_dir, fed, url) = pg_federation(&cluster, "").await;
    let (_dir_b, broker_b, url_b) = second_broker(&fed, &url).await;
    let started = Instant::now();
    client(&fed, ADMIN)
        .await
        .admin()
        .create_grant(birth_grant(TAX_DEPT, &["/full_name"], 6))
        .await
        .unwrap();
    let replicas = [client(&fed, TAX_DEPT).await, as_member(&url_b, &fed, TAX_DEPT).await];
    let mut allowed = [0usize; 2];
    let mut exhausted = [0usize; 2];
    let mut i = 0u32;
    // Until both replicas have refused twice (B may not know the grant for
    // the first few hundred milliseconds: PERMISSION_DENIED, tried again).
    while exhausted.iter().any(|&n| n < 2) {
        assert!(started.elapsed() < Duration::from_secs(10), "allowed {allowed:?}");
        let r = (i % 2) as usize;
        i += 1;
        match replicas[r]
            .exchange()
            .lookup(birth_lookup(&citizen_id(&fed, 40 + i), "tax-law-38-2019/art-17"))
            .await
        {
            Ok(_) => allowed[r] += 1,
            Err(e) if e.code() == Code::ResourceExhausted => {
                assert!(e.metadata().get("retry-after").is_some(), "{e:?}");
                assert!(
                    e.message().contains("rate limit of 6 lookups per minute"),
                    "{}",
                    e.message()
                );
                exhausted[r] += 1;
            }
            Err(e) if e.code() == Code::PermissionDenied && r == 1 => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("lookup {i} through replica {r}: {e:?}"),
        }
    }
    // One token every ten seconds refills the shared bucket of six.
    let refilled = (started.elapsed().as_secs() / 10) as usize;
    let total = allowed[0] + allowed[1];
    assert!(
        (6..=6 + refilled).contains(&total),
        "two replicas allowed {allowed:?} under one limit of 6 a minute"
    );
    assert!(allowed[0] > 0 && allowed[1] > 0, "both replicas served: {allowed:?}");
    broker_b.shutdown().await.unwrap();
    fed.shutdown().await.unwrap();
}

/// Lookups that find no leased token wait for the one lease being taken
/// instead of each taking their own: 200 at once under a grant of 60,000 a
/// minute (leases of 100) take a few hundred tokens from the shared bucket,
/// not 200 leases' worth.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_lookups_share_one_lease() {
    let cluster = PgCluster::start().expect("PostgreSQL binaries (the test command installs them)");
    let (_dir, fed, url) = pg_federation(&cluster, "").await;
    let grant = client(&fed, ADMIN)
        .await
        .admin()
        .create_grant(birth_grant(TAX_DEPT, &["/full_name"], 60_000))
        .await
        .unwrap()
        .into_inner();
    let tax = client(&fed, TAX_DEPT).await;
    let lookups: Vec<_> = (0..200u32)
        .map(|i| {
            let (mut exchange, request) = (
                tax.exchange(),
                birth_lookup(&citizen_id(&fed, i), "tax-law-38-2019/art-17"),
            );
            tokio::spawn(async move { exchange.lookup(request).await })
        })
        .collect();
    for lookup in lookups {
        lookup.await.unwrap().unwrap();
    }
    let db = sqlx::postgres::PgPoolOptions::new().connect(&url).await.unwrap();
    let units: i64 = sqlx::query_scalar("SELECT units FROM grant_rate_buckets WHERE grant_id = $1")
        .bind(&grant.id)
        .fetch_one(&db)
        .await
        .unwrap();
    // What the bucket lacks: what was leased, less what it refilled since.
    let lacking = 60_000 - units / 60_000_000;
    assert!(
        (0..=200 + 2 * 100).contains(&lacking),
        "200 lookups took {lacking} tokens from the shared bucket"
    );
    fed.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_share_state_and_keep_two_verifiable_logs() {
    let cluster = PgCluster::start().expect("PostgreSQL binaries (the test command installs them)");
    let (dir, fed, url) = pg_federation(&cluster, "").await;
    let (_dir_b, broker_b, url_b) = second_broker(&fed, &url).await;
    let admin_a = client(&fed, ADMIN).await;
    let tax_b = as_member(&url_b, &fed, TAX_DEPT).await;
    let subject = citizen_id(&fed, 501);
    let lookup = birth_lookup(&subject, "tax-law-38-2019/art-17");
    // Members read from PostgreSQL: an id that cannot be a member (here one
    // PostgreSQL would not even take as text) is not found, not an error.
    for id in ["no\0such", "No Such Agency", "x"] {
        let missing = admin_a
            .admin()
            .get_member(pb::GetMemberRequest { id: id.into() })
            .await
            .unwrap_err();
        assert_eq!(missing.code(), Code::NotFound, "{id:?}: {missing:?}");
    }

    // A grant created through A is usable through B...
    let g = granted(&admin_a, birth_grant(TAX_DEPT, &["/full_name"], 0)).await;
    let t = tax_b.clone();
    assert!(
        eventually(Duration::from_secs(1), async || t
            .exchange()
            .lookup(lookup.clone())
            .await
            .is_ok())
        .await,
        "grant reaches replica B within a second"
    );
    // ...and revoked through A, B denies within one second.
    revoke(&admin_a, &g.id, "audit finished").await;
    let revoked_at = Instant::now();
    let t = tax_b.clone();
    let denied = eventually(
        Duration::from_secs(1),
        async || matches!(t.exchange().lookup(lookup.clone()).await, Err(e) if e.code() == Code::PermissionDenied),
    )
    .await;
    assert!(denied, "revocation reached B after {:?}", revoked_at.elapsed());

    // A certificate revoked through A is refused by B, on B's open connection,
    // within one second.
    admin_a
        .admin()
        .revoke_certificate(pb::RevokeCertificateRequest {
            certificate_pem: std::fs::read_to_string(fed.certs.join(format!("{TAX_DEPT}.pem"))).unwrap(),
            reason: "key found on a public file share".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let revoked_at = Instant::now();
    let t = tax_b.clone();
    let refused = eventually(Duration::from_secs(1), async || {
        matches!(
            t.schemas().list_record_types(pb::ListRecordTypesRequest::default()).await,
            Err(e) if e.code() == Code::Unauthenticated && e.message().contains("revoked")
        )
    })
    .await;
    assert!(
        refused,
        "certificate revocation reached B after {:?}",
        revoked_at.elapsed()
    );

    // A schema version registered through B is usable through A.
    let birth = lienthong_provider::demo::demo_schemas()
        .into_iter()
        .find(|(t, _)| *t == "civil_status.birth_record")
        .unwrap()
        .1;
    let mut def: serde_json::Value = serde_json::from_str(birth).unwrap();
    def["record_schema"]["properties"]["remarks"] =
        serde_json::json!({"type": "string", "description": "Notes of the registrar"});
    let def = lienthong_cli::federation::definition_from_json(&def.to_string()).unwrap();
    let civil_b = as_member(&url_b, &fed, CIVIL_STATUS).await;
    let v = civil_b
        .schemas()
        .register(pb::RegisterRequest {
            definition: Some(def),
            compatibility: 0,
        })
        .await
        .unwrap()
        .into_inner()
        .version
        .unwrap();
    assert_eq!(v.version, 2);
    let office_a = client(&fed, JUDICIAL_OFFICE).await;
    let mut pinned = birth_lookup(&subject, PURPOSE_CERTIFICATE);
    pinned.schema_version = 2;
    let o = office_a.clone();
    assert!(
        eventually(Duration::from_secs(1), async || o
            .exchange()
            .lookup(pinned.clone())
            .await
            .is_ok())
        .await,
        "version 2 registered through B serves lookups through A"
    );

    // Lookups through both land in two logs, and both verify.
    let office_b = as_member(&url_b, &fed, JUDICIAL_OFFICE).await;
    for i in 0..5 {
        office_a
            .exchange()
            .lookup(birth_lookup(&citizen_id(&fed, 600 + i), PURPOSE_CERTIFICATE))
            .await
            .unwrap();
        office_b
            .exchange()
            .lookup(birth_lookup(&citizen_id(&fed, 700 + i), PURPOSE_CERTIFICATE))
            .await
            .unwrap();
    }
    let portal_b = as_member(&url_b, &fed, lienthong_cli::federation::CITIZEN_PORTAL).await;
    let page = async |limit: u32, page_token: String| {
        portal_b
            .audit()
            .subject_history(pb::SubjectHistoryRequest {
                subject_key: subject.clone(),
                since: None,
                limit,
                page_token,
            })
            .await
            .unwrap()
            .into_inner()
    };
    let history = page(100, String::new()).await.accesses;
    let logs: std::collections::HashSet<String> = history
        .iter()
        .filter_map(|a| a.receipt.as_ref().map(|r| r.log_id.clone()))
        .collect();
    assert_eq!(logs.len(), 2, "the subject's history spans both replicas' logs");
    // A page at a time, across both logs: the same history, in order.
    let mut paged = Vec::new();
    let mut token = String::new();
    loop {
        let next = page(1, token).await;
        assert!(next.accesses.len() <= 1);
        paged.extend(next.accesses);
        if next.next_page_token.is_empty() {
            break;
        }
        token = next.next_page_token;
    }
    assert_eq!(paged, history);
    tokio::time::sleep(Duration::from_millis(600)).await; // both sign a head covering the lookups
    let state = dir.path().join("verifier.json");
    let (ok, out) = cli_as(
        &fed,
        STATE_AUDIT,
        &["audit", "verify", "--state", state.to_str().unwrap()],
    )
    .await;
    assert!(ok, "{out}");
    assert_eq!(out.matches(": OK").count(), 2, "two logs verified: {out}");
    broker_b.shutdown().await.unwrap();
    fed.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_outage_fails_closed_and_traffic_resumes_without_restart() {
    let cluster = PgCluster::start().expect("PostgreSQL binaries (the test command installs them)");
    // Fail fast while the database is down, as an operator would configure it.
    let (dir, fed, _url) = pg_federation(&cluster, "\n[limits]\ndatabase_acquire_timeout_ms = 500\n").await;
    let office = client(&fed, JUDICIAL_OFFICE).await;
    let receipts = std::sync::Arc::new(std::sync::Mutex::new(Vec::<pb::Receipt>::new()));
    let refused = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut tasks = Vec::new();
    for t in 0..4u32 {
        let (office, receipts, refused, stop) = (office.clone(), receipts.clone(), refused.clone(), stop.clone());
        let seed = fed.options.seed;
        tasks.push(tokio::spawn(async move {
            let mut i = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let subject = lienthong_provider::demo::citizen_national_id(seed, t * 10_000 + i);
                i += 1;
                match look_up_birth(&office, &subject).await {
                    Ok(r) => receipts.lock().unwrap().push(r.into_inner().receipt.unwrap()),
                    Err(e) => {
                        assert_eq!(e.code(), Code::Unavailable, "only UNAVAILABLE during the outage: {e:?}");
                        refused.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
            }
        }));
    }
    assert!(eventually(Duration::from_secs(10), async || receipts.lock().unwrap().len() >= 50).await);
    cluster.stop().unwrap();
    let during = receipts.lock().unwrap().len();
    assert!(
        eventually(Duration::from_secs(20), async || refused
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 8)
        .await,
        "lookups are refused while the database is down"
    );
    cluster.restart().unwrap();
    assert!(
        eventually(Duration::from_secs(30), async || receipts.lock().unwrap().len()
            >= during + 50)
        .await,
        "traffic resumes once the database is back, without restarting the broker"
    );
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    // Every lookup that released data has its entry in the log.
    let auditor = client(&fed, STATE_AUDIT).await;
    let stored = logged_leaves(&auditor, "").await;
    for r in receipts.lock().unwrap().iter() {
        assert_eq!(
            stored.get(&r.sequence),
            Some(&r.leaf_hash),
            "released lookup #{} is logged",
            r.sequence
        );
    }
    tokio::time::sleep(Duration::from_millis(600)).await;
    let state = dir.path().join("verifier.json");
    let (ok, out) = cli_as(
        &fed,
        STATE_AUDIT,
        &["audit", "verify", "--state", state.to_str().unwrap()],
    )
    .await;
    assert!(ok, "{out}");
    fed.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_that_hangs_fails_lookups_after_the_commit_timeout_and_nothing_leaves() {
    let cluster = PgCluster::start().expect("PostgreSQL binaries (the test command installs them)");
    // Bare keys land in [audit] (see FederationOptions::extra_config). A long
    // acquire timeout: a pool that checks a connection before lending it
    // would otherwise give up first, but a query sent just before the hang
    // waits with no pool timeout at all.
    let (_dir, fed, _url) = pg_federation(
        &cluster,
        "commit_timeout_ms = 1000\n\n[limits]\ndatabase_acquire_timeout_ms = 60000\n",
    )
    .await;
    let office = client(&fed, JUDICIAL_OFFICE).await;
    let subject = lienthong_provider::demo::citizen_national_id(fed.options.seed, 5);
    look_up_birth(&office, &subject).await.expect("healthy first");
    // A grant without a rate limit: its lookups wait for nothing but the
    // audit commit, where the office's (600 a minute) first waits for the
    // count of its limit, which the replicas share in the database.
    client(&fed, ADMIN)
        .await
        .admin()
        .create_grant(birth_grant(TAX_DEPT, &["/full_name"], 0))
        .await
        .unwrap();
    let tax = client(&fed, TAX_DEPT).await;
    let tax_lookup = birth_lookup(&subject, "tax-law-38-2019/art-17");
    let t = tax.clone();
    assert!(
        eventually(Duration::from_secs(2), async || t
            .exchange()
            .lookup(tax_lookup.clone())
            .await
            .is_ok())
        .await,
        "the tax department's grant is in effect"
    );

    // The database host hangs: connections stay open, nothing answers.
    cluster.freeze().unwrap();
    // The consumers would wait far longer than the commit timeout: the broker
    // answers first, and without the record.
    let mut req = tonic::Request::new(birth_lookup(&subject, PURPOSE_CERTIFICATE));
    req.set_timeout(Duration::from_secs(15));
    let mut tax_req = tonic::Request::new(tax_lookup);
    tax_req.set_timeout(Duration::from_secs(15));
    let (mut office_exchange, mut tax_exchange) = (office.exchange(), tax.exchange());
    let (limited, unlimited) = tokio::join!(office_exchange.lookup(req), tax_exchange.lookup(tax_req));
    cluster.thaw().unwrap();
    for (during, what) in [(limited, "rate-limited"), (unlimited, "unlimited")] {
        let err = during.expect_err("no record without a durable entry");
        assert_eq!(err.code(), Code::Unavailable, "{what}: {err:?}");
        assert!(
            err.message().contains("no data was released"),
            "{what}: {}",
            err.message()
        );
    }

    assert!(
        eventually(Duration::from_secs(30), async || look_up_birth(&office, &subject)
            .await
            .is_ok())
        .await,
        "lookups succeed again once the database answers, without a restart"
    );
    fed.shutdown().await.unwrap();
}

/// PostgreSQL's text columns refuse NUL. A member sending one in a lookup's
/// purpose, record type or request id is refused (as any control character)
/// and audited like any other caller, the character escaped, and fails none
/// of the lookups committed with its entry; in an admin's text it is
/// refused as a bad argument, not an internal error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nul_character_is_audited_and_fails_no_other_lookup_on_postgresql() {
    let cluster = PgCluster::start().expect("PostgreSQL binaries (the test command installs them)");
    let (_dir, fed, _url) = pg_federation(&cluster, "").await;
    let office = client(&fed, JUDICIAL_OFFICE).await;
    let mut calls = Vec::new();
    for i in 0..40u32 {
        let office = office.clone();
        let mut request = birth_lookup(&citizen_id(&fed, i), PURPOSE_CERTIFICATE);
        request.request_id = format!("nul-test-{i}");
        // Five poisoned lookups among the others, so they share commits.
        let poison = match i {
            0 | 24 => Some("purpose"),
            16 => Some("record_type"),
            8 | 32 => Some("request_id"),
            _ => None,
        };
        match poison {
            Some("purpose") => request.purpose.push('\0'),
            Some("record_type") => request.record_type.push('\0'),
            Some(_) => request.request_id = format!("nul-{i}\0"),
            None => {}
        }
        calls.push(tokio::spawn(async move {
            (poison, office.exchange().lookup(request).await)
        }));
    }
    let mut refused = 0;
    for call in calls {
        match call.await.unwrap() {
            (None, answer) => {
                answer.unwrap();
            }
            (Some(_), answer) => {
                let status = answer.unwrap_err();
                assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
                refused += 1;
            }
        }
    }
    assert_eq!(refused, 5);
    let logged = logged(&fed, pb::EntryFilter::default()).await;
    let escaped = logged
        .iter()
        .filter(|e| e.purpose.contains("\\u{0}") || e.record_type.contains("\\u{0}") || e.request_id.contains("\\u{0}"))
        .count();
    assert_eq!(escaped, 5, "every poisoned lookup is in the log");
    assert_eq!(
        logged.iter().filter(|e| e.request_id.starts_with("nul-test-")).count(),
        38
    );

    let admin = client(&fed, ADMIN).await;
    let err = admin
        .admin()
        .add_member(pb::AddMemberRequest {
            id: "nul-office".into(),
            display_name: "Office\0".into(),
            roles: vec![pb::Role::Consumer as i32],
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    let err = client(&fed, STATE_AUDIT)
        .await
        .audit()
        .query_entries(pb::QueryEntriesRequest {
            filter: Some(pb::EntryFilter {
                purpose: "x\0".into(),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    fed.shutdown().await.unwrap();
}

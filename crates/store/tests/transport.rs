//! The connection to PostgreSQL: verified TLS to a real server, and no
//! unverified connection to another host unless the operator allows it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use lienthong_store::testing::PgCluster;
use lienthong_store::{StoreError, StoreOptions, open};
use std::time::Duration;

fn options(url: &str, allow_unverified_postgres: bool) -> StoreOptions {
    StoreOptions {
        url: url.to_owned(),
        max_connections: 2,
        acquire_timeout: Duration::from_secs(5),
        allow_unverified_postgres,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_store_speaks_verified_tls_to_postgresql() {
    lienthong_tls::install_crypto_provider();
    let cluster = PgCluster::start().expect("PostgreSQL test cluster");
    let ca = lienthong_tls::CertificateAuthority::generate("gov.test").unwrap();
    // For 127.0.0.1 and localhost, where the cluster listens.
    let server = ca.issue(&lienthong_tls::IssueSpec::member("database")).unwrap();
    cluster.enable_tls(&server.cert_pem, &server.key_pem).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let ca_path = dir.path().join("database-ca.pem");
    std::fs::write(&ca_path, ca.cert_pem()).unwrap();
    let url = format!(
        "{}?sslmode=verify-full&sslrootcert={}",
        cluster.url(),
        ca_path.display()
    );
    let store = open(&options(&url, false)).await.expect("verified TLS to the cluster");
    store.close().await;

    // The connection is TLS, as the server sees it.
    use sqlx::Connection;
    let mut conn = sqlx::PgConnection::connect(&url).await.unwrap();
    let ssl: bool = sqlx::query_scalar("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert!(ssl, "the connection is not TLS");

    // A server whose certificate another CA signed is refused.
    let other = lienthong_tls::CertificateAuthority::generate("gov.test").unwrap();
    let other_path = dir.path().join("other-ca.pem");
    std::fs::write(&other_path, other.cert_pem()).unwrap();
    let forged = format!(
        "{}?sslmode=verify-full&sslrootcert={}",
        cluster.url(),
        other_path.display()
    );
    assert!(
        open(&options(&forged, false)).await.is_err(),
        "a server of another CA was trusted"
    );
}

#[tokio::test]
async fn an_unverified_connection_to_another_host_is_refused_unless_allowed() {
    for url in [
        "postgres://lienthong@db.example.invalid:5432/lienthong",
        "postgres://lienthong@db.example.invalid:5432/lienthong?sslmode=require",
        "postgres://lienthong@192.0.2.10/lienthong?sslmode=prefer",
    ] {
        match open(&options(url, false)).await {
            Err(StoreError::Config(m)) => {
                assert!(m.contains("sslmode=verify-full"), "{m}");
                assert!(m.contains("allow_unverified_database"), "{m}");
            }
            Err(other) => panic!("{url}: {other:?}"),
            Ok(_) => panic!("{url}: opened"),
        }
        // Allowed, it goes on to connect (and finds no such host).
        let allowed = open(&StoreOptions {
            acquire_timeout: Duration::from_millis(300),
            ..options(url, true)
        })
        .await;
        if let Err(StoreError::Config(m)) = allowed {
            panic!("{url}: refused although allowed: {m}");
        }
    }
}

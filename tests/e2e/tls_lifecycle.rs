//! The federation's certificates over their life: what the broker accepts,
//! what it records of what it refuses, and what it will not pretend to revoke.

use crate::harness::*;
use lienthong::v1 as pb;
use lienthong_cli::client::Clients;
use lienthong_cli::federation::{ADMIN, JUDICIAL_OFFICE, STATE_AUDIT};
use lienthong_tls::{IssueSpec, fingerprint_hex};
use tonic::Code;

async fn refused(c: &Clients) -> tonic::Status {
    let err = c
        .schemas()
        .list_record_types(pb::ListRecordTypesRequest::default())
        .await
        .expect_err("refused");
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    err
}

async fn authentication_entries(fed: &lienthong_cli::federation::Federation) -> Vec<pb::AuditEntry> {
    client(fed, STATE_AUDIT)
        .await
        .audit()
        .query_entries(pb::QueryEntriesRequest {
            filter: Some(pb::EntryFilter {
                kind: pb::EntryKind::Authentication as i32,
                ..Default::default()
            }),
            page_size: 100,
            page_token: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .entries
}

/// The SHA-256 of a PEM certificate, as the audit log and `certs fingerprint` print it.
fn sha256_of(pem: &str) -> String {
    fingerprint_hex(&lienthong_tls::summarize_pem(pem, "").unwrap().sha256)
}

/// A sub-CA the federation CA signed (by mistake, or stolen) cannot mint the
/// admin: the broker accepts only certificates the CA signed itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_issued_through_an_intermediate_ca_is_refused() {
    let (_dir, fed) = federation().await;
    let forged = lienthong_tls::testing::through_intermediate(&ca(&fed), &IssueSpec::member(ADMIN));
    let admin = connect_with(&fed, &forged.cert_pem, &forged.key_pem).await;
    let err = refused(&admin).await;
    assert!(err.message().contains("not issued by this federation's CA"), "{err:?}");
    fed.shutdown().await.unwrap();
}

/// An expired certificate naming an office and a foreign-CA one naming the
/// admin: each entry says what the certificate claimed and which it was,
/// without making the claim the actor (it would show in that member's history).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_certificate_is_audited_with_its_claim_and_fingerprint() {
    let (_dir, fed) = federation().await;
    let td = fed.options.trust_domain.clone();
    let now = time::OffsetDateTime::now_utc();
    let expired = ca(&fed)
        .issue(&IssueSpec {
            not_before: now - time::Duration::days(30),
            not_after: now - time::Duration::days(1),
            ..IssueSpec::member(JUDICIAL_OFFICE)
        })
        .unwrap();
    refused(&connect_with(&fed, &expired.cert_pem, &expired.key_pem).await).await;
    let foreign = lienthong_tls::CertificateAuthority::generate(&td)
        .unwrap()
        .issue(&IssueSpec::member(ADMIN))
        .unwrap();
    refused(&connect_with(&fed, &foreign.cert_pem, &foreign.key_pem).await).await;

    let entries = authentication_entries(&fed).await;
    for (pem, member, why) in [
        (&expired.cert_pem, JUDICIAL_OFFICE, "expired"),
        (&foreign.cert_pem, ADMIN, "not issued by this federation's CA"),
    ] {
        let sha256 = sha256_of(pem);
        let entry = entries
            .iter()
            .find(|e| e.reason.contains(&sha256))
            .unwrap_or_else(|| panic!("no entry names {sha256}: {entries:#?}"));
        assert_eq!(entry.actor, "", "{entry:?}");
        assert!(entry.reason.contains(why), "{entry:?}");
        assert!(
            entry
                .reason
                .contains(&format!("claimed (unverified) spiffe://{td}/member/{member}")),
            "{entry:?}"
        );
        assert!(entry.reason.contains("from 127.0.0.1"), "{entry:?}");
    }
    fed.shutdown().await.unwrap();
}

/// Revoking the broker's own certificate or the CA by fingerprint would be
/// reported done and refuse nothing: it is refused, as by PEM, under any
/// encoding of the certificate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_brokers_own_certificate_and_the_ca_cannot_be_revoked_by_fingerprint() {
    let (_dir, fed) = federation().await;
    let admin = client(&fed, ADMIN).await;
    let broker = std::fs::read_to_string(fed.certs.join("broker.pem")).unwrap();
    let ca_pem = std::fs::read_to_string(fed.certs.join("ca.pem")).unwrap();
    for (pem, needle) in [(&broker, "the broker's certificate"), (&ca_pem, "a CA certificate")] {
        let encodings = lienthong_tls::summarize_pem(pem, "").unwrap().fingerprints;
        assert!(encodings.iter().count() >= 2, "the signature negated too");
        for fingerprint in encodings.iter() {
            let err = admin
                .admin()
                .revoke_certificate(pb::RevokeCertificateRequest {
                    certificate_pem: String::new(),
                    fingerprint_sha256: fingerprint_hex(fingerprint),
                    member: ADMIN.into(),
                    reason: "broker key leaked".into(),
                })
                .await
                .unwrap_err();
            assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
            assert!(err.message().contains(needle), "{err:?}");
        }
    }
    let listed = admin
        .admin()
        .list_revoked_certificates(pb::ListRevokedCertificatesRequest::default())
        .await
        .unwrap()
        .into_inner()
        .certificates;
    assert!(listed.is_empty(), "{listed:?}");
    fed.shutdown().await.unwrap();
}

/// `certs issue` as an operator meets it: a wildcard or a malformed host is
/// refused, issuing again says which certificate it replaced and how to
/// revoke it, and `certs fingerprint` on a key file names that file.
#[test]
fn certs_issue_refuses_wildcards_and_names_the_certificate_it_replaces() {
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("certs");
    let certs_arg = certs.to_str().unwrap();
    let (ok, out) = run_cli(&["certs", "init", "--dir", certs_arg, "--trust-domain", "gov"], &[]);
    assert!(ok, "{out}");
    for host in ["*.gov.vn", "*", "a b"] {
        let (ok, out) = run_cli(
            &[
                "certs", "issue", "--dir", certs_arg, "--member", "registry", "--host", host,
            ],
            &[],
        );
        assert!(!ok && out.contains(&format!("{host:?}")), "{out}");
        assert!(!certs.join("registry.pem").exists());
    }

    let (ok, first) = run_cli(&["certs", "issue", "--dir", certs_arg, "--member", "office"], &[]);
    assert!(ok && !first.contains("replaced"), "{first}");
    let old = std::fs::read_to_string(certs.join("office.pem")).unwrap();
    let old_fingerprint = fingerprint_hex(&lienthong_tls::summarize_pem(&old, "gov").unwrap().sha256);
    let (ok, second) = run_cli(&["certs", "issue", "--dir", certs_arg, "--member", "office"], &[]);
    assert!(ok, "{second}");
    assert!(
        second.contains(&format!(
            "replaced the certificate that was there (sha256 fingerprint {old_fingerprint}"
        )),
        "{second}"
    );
    assert!(
        second.contains(&format!("certs revoke --fingerprint {old_fingerprint} --member office")),
        "{second}"
    );

    let key = certs.join("office.key");
    let (ok, out) = run_cli(&["certs", "fingerprint", key.to_str().unwrap()], &[]);
    assert!(!ok, "{out}");
    assert!(
        out.contains(&key.display().to_string()) && out.contains("private key, not a certificate"),
        "{out}"
    );
    assert!(!out.contains("<certificate>"), "{out}");
}

/// A register presenting a revoked certificate: the consumer and the audit
/// log read why (revoked, which certificate), not a message cut off inside
/// the register's URL and rustls' wrappers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_register_certificate_is_named_in_full_to_the_consumer_and_the_audit_log() {
    use lienthong_cli::federation::CIVIL_STATUS;
    let (_dir, fed) = federation().await;
    let office = client(&fed, JUDICIAL_OFFICE).await;
    let subject = citizen_id(&fed, 3);
    look_up_birth(&office, &subject).await.unwrap();
    let register_pem = std::fs::read_to_string(fed.certs.join(format!("{CIVIL_STATUS}.pem"))).unwrap();
    let sha256 = sha256_of(&register_pem);
    client(&fed, ADMIN)
        .await
        .admin()
        .revoke_certificate(pb::RevokeCertificateRequest {
            certificate_pem: register_pem,
            reason: "register's key copied off a backup tape".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let err = look_up_birth(&office, &subject).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    let why = format!("(sha256 {sha256}) was revoked by the federation admin");
    assert!(err.message().contains(&why), "{err:?}");
    assert!(!err.message().contains("OtherError"), "{err:?}");
    assert!(!err.message().contains(&subject), "{err:?}");

    let failed = client(&fed, STATE_AUDIT)
        .await
        .audit()
        .query_entries(pb::QueryEntriesRequest {
            filter: Some(pb::EntryFilter {
                actor: JUDICIAL_OFFICE.into(),
                outcome: pb::Outcome::Failed as i32,
                ..Default::default()
            }),
            page_size: 100,
            page_token: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .entries;
    assert!(failed.iter().any(|e| e.reason.contains(&why)), "{failed:#?}");
    fed.shutdown().await.unwrap();
}

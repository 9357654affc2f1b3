//! The federation's certificates over their life: what the broker accepts,
//! what it records of what it refuses, and what it will not pretend to revoke.

use crate::harness::*;
use lienthong::v1 as pb;
use lienthong_cli::client::Clients;
use lienthong_cli::federation::{ADMIN, JUDICIAL_OFFICE, STATE_AUDIT};
use lienthong_tls::{IssueSpec, fingerprint_hex};
use std::time::Duration;
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
    logged(
        fed,
        pb::EntryFilter {
            kind: pb::EntryKind::Authentication as i32,
            ..Default::default()
        },
    )
    .await
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

/// The SHA-256 of the certificate the broker at `url` serves to a new
/// connection; empty when `certs/ca.pem` does not vouch for it (a CA roll
/// the broker has not taken yet).
async fn served_sha256(url: &str, certs: &std::path::Path) -> String {
    let material =
        lienthong_tls::TlsMaterial::load(&lienthong_cli::client::member_files(certs, JUDICIAL_OFFICE)).unwrap();
    let config = lienthong_tls::client_config(&material, None).unwrap();
    let dialer = lienthong_tls::Dialer::new(url, config, Duration::from_secs(5)).unwrap();
    let Ok(stream) = dialer.dial().await else {
        return String::new();
    };
    let served = stream.get_ref().1.peer_certificates().unwrap()[0].clone();
    fingerprint_hex(&lienthong_tls::CertificateFingerprints::of(&served).presented())
}

/// Whether the broker at `url` serves the certificate `sha256` to new
/// connections within ten seconds, calling `meanwhile` before each look.
async fn comes_to_serve(url: &str, certs: &std::path::Path, sha256: &str, meanwhile: impl Fn()) -> bool {
    eventually(Duration::from_secs(10), async || {
        meanwhile();
        served_sha256(url, certs).await == sha256
    })
    .await
}

/// `lienthong certs issue --broker-cert` into the federation's directory: the
/// documented renewal, writing a new broker.pem and broker.key in place.
async fn renew_broker_certificate(certs: &std::path::Path) -> String {
    let dir = certs.display().to_string();
    let (ok, out) =
        tokio::task::spawn_blocking(move || run_cli(&["certs", "issue", "--dir", &dir, "--broker-cert"], &[]))
            .await
            .unwrap();
    assert!(ok, "{out}");
    // A routine renewal: no register has to be told anything.
    assert!(
        out.contains("take the new files at their next look") && out.contains("only if the old key leaked"),
        "{out}"
    );
    sha256_of(&std::fs::read_to_string(certs.join("broker.pem")).unwrap())
}

/// Renewing the broker's certificate takes no restart: the broker serves the
/// new one to new connections and presents it to registers, so a register can
/// refuse the old one at once (the procedure for a leaked broker key). Files
/// it would not start with (a key that is not the certificate's, as in a copy
/// half done) leave it serving what it had, and say so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renewed_broker_certificate_is_served_and_presented_to_registers_without_a_restart() {
    use lienthong_cli::federation::CIVIL_STATUS;
    let (_dir, fed) = federation().await;
    let office = client(&fed, JUDICIAL_OFFICE).await;
    let subject = citizen_id(&fed, 3);
    look_up_birth(&office, &subject).await.unwrap();
    let old = sha256_of(&std::fs::read_to_string(fed.certs.join("broker.pem")).unwrap());
    assert_eq!(served_sha256(&fed.broker_url, &fed.certs).await, old);
    let metrics = &fed.broker.broker.metrics;

    // Half a copy: a new key beside the old certificate.
    let stray = ca(&fed).issue(&IssueSpec::broker()).unwrap();
    let old_key = std::fs::read(fed.certs.join("broker.key")).unwrap();
    std::fs::write(fed.certs.join("broker.key"), &stray.key_pem).unwrap();
    fed.broker.reload_tls();
    assert!(
        eventually(Duration::from_secs(10), async || metrics.tls_files_refused.get() == 1).await,
        "files whose key is not the certificate's are refused"
    );
    assert_eq!(served_sha256(&fed.broker_url, &fed.certs).await, old);
    look_up_birth(&office, &subject)
        .await
        .expect("still serving with what it had");
    std::fs::write(fed.certs.join("broker.key"), &old_key).unwrap();

    // Not valid yet (the issuing host's clock ahead): refused, then taken once
    // valid, the files unchanged meanwhile.
    let old_cert = std::fs::read(fed.certs.join("broker.pem")).unwrap();
    let early = ca(&fed)
        .issue(&IssueSpec {
            not_before: time::OffsetDateTime::now_utc() + time::Duration::seconds(2),
            ..IssueSpec::broker()
        })
        .unwrap();
    std::fs::write(fed.certs.join("broker.pem"), &early.cert_pem).unwrap();
    std::fs::write(fed.certs.join("broker.key"), &early.key_pem).unwrap();
    fed.broker.reload_tls();
    assert!(
        eventually(Duration::from_secs(10), async || metrics.tls_files_refused.get() == 1).await,
        "a certificate not valid yet is refused"
    );
    assert_eq!(served_sha256(&fed.broker_url, &fed.certs).await, old);
    assert!(
        comes_to_serve(&fed.broker_url, &fed.certs, &sha256_of(&early.cert_pem), || fed
            .broker
            .reload_tls())
        .await,
        "taken once valid"
    );
    std::fs::write(fed.certs.join("broker.pem"), old_cert).unwrap();
    std::fs::write(fed.certs.join("broker.key"), old_key).unwrap();

    let new = renew_broker_certificate(&fed.certs).await;
    assert_ne!(new, old);
    fed.broker.reload_tls();
    assert!(
        comes_to_serve(&fed.broker_url, &fed.certs, &new, || ()).await,
        "the renewed certificate is served"
    );
    assert_eq!(metrics.tls_files_refused.get(), 0);
    let expiry = lienthong_tls::summarize_pem(&std::fs::read_to_string(fed.certs.join("broker.pem")).unwrap(), "")
        .unwrap()
        .not_after
        .unix_timestamp();
    assert_eq!(metrics.certificate_expiry.get(), expiry);

    // The register refuses the old certificate from its next fetch: the broker
    // reaches it with the new one.
    let register = fed.registers.iter().find(|r| r.member == CIVIL_STATUS).unwrap();
    let old_fingerprint: [u8; 32] = hex::decode(&old).unwrap().try_into().unwrap();
    register.refused.replace([old_fingerprint].into());
    look_up_birth(&office, &subject)
        .await
        .expect("the broker presents its renewed certificate to the register");
    fed.shutdown().await.unwrap();
}

/// `lienthong serve` reloads its TLS files on SIGHUP (here with the periodic
/// look turned off), and goes on serving: SIGHUP does not end it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_has_lienthong_serve_take_its_renewed_certificate() {
    let (_dir, mut fed) = federation().await;
    let mut process = BrokerProcess::take_over(&mut fed, &[("LIENTHONG_TLS_RELOAD_CHECK_MS", "0")]).await;
    let old = served_sha256(&process.url, &fed.certs).await;
    let new = renew_broker_certificate(&fed.certs).await;
    assert_eq!(
        served_sha256(&process.url, &fed.certs).await,
        old,
        "not before it is asked"
    );
    process.signal("HUP");
    assert!(
        comes_to_serve(&process.url, &fed.certs, &new, || ()).await,
        "served after SIGHUP"
    );
    assert!(
        process.child.try_wait().unwrap().is_none(),
        "SIGHUP does not stop the broker"
    );
    let office = lienthong_cli::client::connect(
        &process.url,
        &lienthong_cli::client::member_files(&fed.certs, JUDICIAL_OFFICE),
    )
    .await
    .unwrap();
    look_up_birth(&office, &citizen_id(&fed, 4)).await.unwrap();
    assert_eq!(process.terminate().code(), Some(0));
    fed.shutdown_registers().await;
}

/// Without a signal, the broker finds renewed files at its next look
/// (`tls.reload_check_ms`), as when Kubernetes updates a mounted Secret.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_broker_finds_its_renewed_certificate_by_itself() {
    let (_dir, mut fed) = federation().await;
    let mut process = BrokerProcess::take_over(&mut fed, &[("LIENTHONG_TLS_RELOAD_CHECK_MS", "100")]).await;
    let new = renew_broker_certificate(&fed.certs).await;
    assert!(
        comes_to_serve(&process.url, &fed.certs, &new, || ()).await,
        "served at the next look"
    );
    assert_eq!(process.terminate().code(), Some(0));
    fed.shutdown_registers().await;
}

/// `demo-provider --help` names the register's own files: its `--ca`,
/// `--cert` and `--key` replace files in `--tls-dir`, not a client's
/// `--certs`/`--as`, which it refuses; and it says the files are read again,
/// which a CA roll counts on.
#[test]
fn demo_provider_help_names_its_own_files_and_their_reload() {
    let (ok, help) = run_cli(&["demo-provider", "--help"], &[]);
    assert!(ok, "{help}");
    let flag = |name: &str| {
        let at = help
            .find(&format!("      --{name} <"))
            .unwrap_or_else(|| panic!("--{name}:\n{help}"));
        let rest = &help[at..];
        let end = rest[1..].find("\n      --").map_or(rest.len(), |i| i + 1);
        rest[..end].to_owned()
    };
    for name in ["ca", "cert", "key"] {
        let text = flag(name);
        assert!(text.contains("--tls-dir"), "--{name} names --tls-dir:\n{text}");
        assert!(!text.contains("Client"), "--{name} is not a client's:\n{text}");
    }
    let tls_dir = flag("tls-dir");
    assert!(tls_dir.contains("without a restart"), "{tls_dir}");
}

/// SIGHUP has `lienthong demo-provider` take its renewed certificate at once,
/// as it has the broker, rather than at its next look a minute later; it
/// used to end the register, without a word, in the middle of a CA roll.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_has_demo_provider_take_its_renewed_certificate() {
    use std::io::{BufRead, BufReader};
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("certs");
    let certs_arg = certs.to_str().unwrap();
    let register = [
        "certs",
        "issue",
        "--dir",
        certs_arg,
        "--member",
        "civil-status",
        "--host",
        "127.0.0.1",
    ];
    for args in [
        &["certs", "init", "--dir", certs_arg, "--trust-domain", "gov"][..],
        &register[..],
        &["certs", "issue", "--dir", certs_arg, "--member", JUDICIAL_OFFICE][..],
    ] {
        let (ok, out) = run_cli(args, &[]);
        assert!(ok, "{out}");
    }
    let mut child = std::process::Command::new(bin())
        .args([
            "demo-provider",
            "civil-status",
            "--listen",
            "127.0.0.1:0",
            "--trust-domain",
            "gov",
        ])
        .args(["--tls-dir", certs_arg])
        .env("RUST_LOG", "warn")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Some((_, addr)) = line.split_once("register serving on ") {
                let _ = tx.send(addr.trim().to_owned());
            }
            eprintln!("[civil-status] {line}");
        }
    });
    let addr = rx
        .recv_timeout(Duration::from_secs(30))
        .expect("the register says where it serves");
    let url = format!("https://{addr}");
    let old = served_sha256(&url, &certs).await;
    let (ok, out) = run_cli(&register, &[]);
    assert!(ok, "{out}");
    let new = sha256_of(&std::fs::read_to_string(certs.join("civil-status.pem")).unwrap());
    assert_ne!(old, new);
    let hup = std::process::Command::new("kill")
        .args(["-HUP", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(hup.success());
    // Its own look comes a minute later: within ten seconds, only SIGHUP.
    assert!(comes_to_serve(&url, &certs, &new, || ()).await, "served after SIGHUP");
    assert!(child.try_wait().unwrap().is_none(), "SIGHUP does not stop the register");
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    assert!(child.wait().unwrap().success());
}

/// A CA taken out of `tls.ca` (the last step of a CA roll, or a CA that
/// leaked) is out from the reload on, on connections opened before too: a
/// member certificate only it vouches for is refused at its next request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ca_taken_out_of_the_bundle_vouches_for_no_open_connection() {
    let (_dir, fed) = federation().await;
    let office = client(&fed, JUDICIAL_OFFICE).await;
    let list = |c: &Clients| {
        let c = c.clone();
        async move {
            c.schemas()
                .list_record_types(pb::ListRecordTypesRequest::default())
                .await
        }
    };
    list(&office)
        .await
        .expect("the office's certificate is from the CA in tls.ca");

    // The CA roll's end: a new CA alone in tls.ca, the broker's certificate from it.
    let next = lienthong_tls::CertificateAuthority::generate(&fed.options.trust_domain).unwrap();
    let broker = next.issue(&IssueSpec::broker()).unwrap();
    std::fs::write(fed.certs.join("ca.pem"), next.cert_pem()).unwrap();
    std::fs::write(fed.certs.join("broker.pem"), &broker.cert_pem).unwrap();
    std::fs::write(fed.certs.join("broker.key"), &broker.key_pem).unwrap();
    fed.broker.reload_tls();
    assert!(
        comes_to_serve(&fed.broker_url, &fed.certs, &sha256_of(&broker.cert_pem), || ()).await,
        "the new files are taken"
    );
    let err = list(&office)
        .await
        .expect_err("no CA in tls.ca vouches for the office any more");
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    fed.shutdown().await.unwrap();
}

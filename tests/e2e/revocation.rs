//! Certificate revocation: a member's leaked certificate is refused at once,
//! on open connections too, while the member's new certificate works.

use crate::harness::*;
use lienthong::v1 as pb;
use lienthong_cli::client::Clients;
use lienthong_cli::federation::{ADMIN, JUDICIAL_OFFICE};
use tonic::Code;

fn write_pem(dir: &std::path::Path, name: &str, pem: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, pem).unwrap();
    path.display().to_string()
}

async fn revocations(admin: &Clients) -> Vec<pb::RevokedCertificate> {
    admin
        .admin()
        .list_revoked_certificates(pb::ListRevokedCertificatesRequest::default())
        .await
        .unwrap()
        .into_inner()
        .certificates
}

async fn refused_with(c: &Clients, needles: &[&str]) {
    let err = c
        .schemas()
        .list_record_types(pb::ListRecordTypesRequest::default())
        .await
        .expect_err("a revoked certificate is refused");
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    for needle in needles {
        assert!(
            err.message().contains(needle),
            "{:?} should say {needle:?}",
            err.message()
        );
    }
}

/// The operator's story: an office's key leaks, the admin issues it a new
/// certificate and revokes the old one with the CLI. The old one is refused
/// on its open connection's next request and on new connections, saying
/// why; the new one is served; the revocation and every refusal are audited.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_certificate_is_refused_while_the_members_new_one_works() {
    let (dir, fed) = federation().await;
    let subject = citizen_id(&fed, 42);
    let (old_cert, old_key) = issue(&fed, JUDICIAL_OFFICE);
    let old = connect_with(&fed, &old_cert, &old_key).await;
    look_up_birth(&old, &subject).await.unwrap();
    let (new_cert, new_key) = issue(&fed, JUDICIAL_OFFICE);

    let file = write_pem(dir.path(), "leaked.pem", &old_cert);
    let (ok, fingerprint) = cli_as(&fed, ADMIN, &["certs", "fingerprint", &file]).await;
    assert!(ok, "{fingerprint}");
    let fingerprint = fingerprint.trim().to_string();
    assert_eq!(fingerprint.len(), 64, "{fingerprint}");
    let (ok, out) = cli_as(
        &fed,
        ADMIN,
        &["certs", "revoke", &file, "--reason", "laptop stolen on 2026-11-27"],
    )
    .await;
    assert!(ok, "{out}");
    assert!(out.contains(&fingerprint) && out.contains(JUDICIAL_OFFICE), "{out}");

    // The open connection's next request, and a new connection, are refused.
    refused_with(&old, &["revoked", &fingerprint, "laptop stolen"]).await;
    let err = look_up_birth(&old, &subject).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    refused_with(&connect_with(&fed, &old_cert, &old_key).await, &["revoked"]).await;
    // The member itself is not shut out.
    let new = connect_with(&fed, &new_cert, &new_key).await;
    look_up_birth(&new, &subject).await.unwrap();
    look_up_birth(&client(&fed, JUDICIAL_OFFICE).await, &subject)
        .await
        .unwrap();

    // Listed, with the certificate's expiry; a second revocation is refused.
    let (ok, out) = cli_as(&fed, ADMIN, &["certs", "revoked", "--member", JUDICIAL_OFFICE]).await;
    assert!(
        ok && out.contains(&fingerprint) && out.contains("laptop stolen"),
        "{out}"
    );
    let (ok, out) = cli_as(&fed, ADMIN, &["certs", "revoked", "--member", "civil-status"]).await;
    assert!(ok && out.trim().is_empty(), "{out}");
    let listed = revocations(&client(&fed, ADMIN).await).await;
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].member, JUDICIAL_OFFICE);
    assert_eq!(listed[0].revoked_by, ADMIN);
    assert!(listed[0].not_after.is_some());
    let again = client(&fed, ADMIN)
        .await
        .admin()
        .revoke_certificate(pb::RevokeCertificateRequest {
            fingerprint_sha256: fingerprint.clone(),
            member: JUDICIAL_OFFICE.into(),
            reason: "again".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(again.code(), Code::AlreadyExists, "{again:?}");
    assert!(again.message().contains("laptop stolen"), "{again:?}");

    // Audited: the revocation, and the refusals naming the member.
    let revocations = admin_entries(&fed).await;
    let revocation = revocations
        .iter()
        .find(|e| e.action == "certificate.revoke" && e.outcome == pb::Outcome::Allowed as i32)
        .expect("the revocation is audited");
    assert_eq!(revocation.actor, ADMIN);
    assert_eq!(revocation.target, JUDICIAL_OFFICE);
    assert!(revocation.reason.contains(&fingerprint), "{revocation:?}");
    let refusals = logged(
        &fed,
        pb::EntryFilter {
            kind: pb::EntryKind::Authentication as i32,
            actor: JUDICIAL_OFFICE.into(),
            ..Default::default()
        },
    )
    .await;
    assert!(
        refusals.len() >= 3 && refusals.iter().all(|e| e.reason.contains("revoked")),
        "{refusals:?}"
    );
    fed.shutdown().await.unwrap();
}

/// `certs revoke FILE` sends the broker the file's certificates only. A file
/// holding a private key (the CA's key given by mistake, or a certificate
/// with its key) is refused before anything is sent, and the key is not
/// printed; a chain with text around it is sent as its certificate blocks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoking_from_a_file_holding_a_private_key_sends_nothing() {
    let (dir, fed) = federation().await;
    let admin = client(&fed, ADMIN).await;
    let (cert, key) = issue(&fed, JUDICIAL_OFFICE);
    let ca_key = fed.certs.join("ca.key");
    let with_key = write_pem(dir.path(), "office-and-key.pem", &format!("{cert}{key}"));
    let audited = admin_entries(&fed).await.len();
    for (file, secret) in [
        (ca_key.display().to_string(), std::fs::read_to_string(&ca_key).unwrap()),
        (with_key, key.clone()),
    ] {
        let (ok, out) = cli_as(&fed, ADMIN, &["certs", "revoke", &file, "--reason", "leak"]).await;
        assert!(!ok, "{out}");
        assert!(
            out.contains(&file) && out.contains("private key") && out.contains("not sent"),
            "{out}"
        );
        for line in secret.lines().filter(|l| !l.starts_with("-----")) {
            assert!(!out.contains(line), "the key is printed: {out}");
        }
    }
    let empty = write_pem(dir.path(), "notes.txt", "the judicial office's old certificate\n");
    let (ok, out) = cli_as(&fed, ADMIN, &["certs", "revoke", &empty, "--reason", "leak"]).await;
    assert!(!ok && out.contains("holds no certificate"), "{out}");
    // Nothing reached the broker: no revocation, no refused one audited.
    assert!(revocations(&admin).await.is_empty());
    assert_eq!(admin_entries(&fed).await.len(), audited);

    let ca = std::fs::read_to_string(fed.certs.join("ca.pem")).unwrap();
    let chain = write_pem(
        dir.path(),
        "chain.pem",
        &format!("judicial office, issued 2026-11-27\n{cert}\nfederation CA\n{ca}"),
    );
    let (ok, out) = cli_as(&fed, ADMIN, &["certs", "revoke", &chain, "--reason", "leak"]).await;
    assert!(ok && out.contains(JUDICIAL_OFFICE), "{out}");
    refused_with(&connect_with(&fed, &cert, &key).await, &["revoked", "leak"]).await;
    fed.shutdown().await.unwrap();
}

/// Bad revocations are refused with a message naming the problem, and
/// change nothing; an admin cannot revoke the certificate it calls with.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_revocations_are_refused_and_change_nothing() {
    let (_dir, fed) = federation().await;
    let admin = client(&fed, ADMIN).await;
    let (office_cert, office_key) = issue(&fed, JUDICIAL_OFFICE);
    let revoke = |r: pb::RevokeCertificateRequest| {
        let mut a = admin.admin();
        async move { a.revoke_certificate(r).await.unwrap_err() }
    };
    let request = |pem: &str, fingerprint: &str, member: &str, reason: &str| pb::RevokeCertificateRequest {
        certificate_pem: pem.into(),
        fingerprint_sha256: fingerprint.into(),
        member: member.into(),
        reason: reason.into(),
    };
    let own = std::fs::read_to_string(fed.certs.join(format!("{ADMIN}.pem"))).unwrap();
    let broker = std::fs::read_to_string(fed.certs.join("broker.pem")).unwrap();
    let other_ca = lienthong_tls::CertificateAuthority::generate("elsewhere.example").unwrap();
    let foreign = other_ca
        .issue(&lienthong_tls::IssueSpec::member(JUDICIAL_OFFICE))
        .unwrap()
        .cert_pem;
    let cases = [
        (
            request(&office_cert, "", "", " "),
            Code::InvalidArgument,
            "reason to revoke a certificate is required",
        ),
        (
            request(&office_cert, "", "", &"x".repeat(501)),
            Code::InvalidArgument,
            "500",
        ),
        (
            request(&office_cert, "", "", "stolen\0 laptop"),
            Code::InvalidArgument,
            "without control characters",
        ),
        (
            request("", "", "", "leak"),
            Code::InvalidArgument,
            "name the certificate",
        ),
        (
            request("", "abcd", JUDICIAL_OFFICE, "leak"),
            Code::InvalidArgument,
            "64 hex digits",
        ),
        (
            request("", &"ab".repeat(32), "", "leak"),
            Code::InvalidArgument,
            "name the certificate",
        ),
        (
            request("", &"ab".repeat(32), "no-such-agency", "leak"),
            Code::NotFound,
            "not registered",
        ),
        (
            request("not a certificate", "", "", "leak"),
            Code::InvalidArgument,
            "certificate_pem",
        ),
        (
            request(&office_cert, "", "civil-status", "leak"),
            Code::InvalidArgument,
            "belongs to member",
        ),
        (
            request(&office_cert, &"ab".repeat(32), "", "leak"),
            Code::InvalidArgument,
            "is not the fingerprint",
        ),
        (request(&foreign, "", "", "leak"), Code::InvalidArgument, "trust domain"),
        (
            request(&broker, "", "", "leak"),
            Code::FailedPrecondition,
            "every register to refuse",
        ),
        (
            request(&own, "", "", "leak"),
            Code::FailedPrecondition,
            "this call was made with",
        ),
    ];
    for (r, code, needle) in cases {
        let err = revoke(r.clone()).await;
        assert_eq!(err.code(), code, "{r:?}: {err:?}");
        assert!(
            err.message().contains(needle),
            "{r:?}: {:?} should say {needle:?}",
            err.message()
        );
    }
    // Only admins revoke; the refusal is audited.
    let office = client(&fed, JUDICIAL_OFFICE).await;
    let err = office
        .admin()
        .revoke_certificate(request(&office_cert, "", "", "leak"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    let listed = revocations(&admin).await;
    assert!(listed.is_empty(), "{listed:?}");
    connect_with(&fed, &office_cert, &office_key)
        .await
        .schemas()
        .list_record_types(pb::ListRecordTypesRequest::default())
        .await
        .unwrap();
    let refused = admin_entries(&fed)
        .await
        .into_iter()
        .filter(|e| e.action == "certificate.revoke" || e.action == "Admin.RevokeCertificate")
        .count();
    assert!(refused >= 14, "every refused revocation is audited: {refused}");

    // By fingerprint as OpenSSL prints it, with the member: refused from then on.
    let der = lienthong_tls::summarize_pem(&office_cert, &fed.options.trust_domain)
        .unwrap()
        .sha256;
    let openssl = format!(
        "sha256 Fingerprint={}",
        der.iter().map(|b| format!("{b:02X}")).collect::<Vec<_>>().join(":")
    );
    let revoked = admin
        .admin()
        .revoke_certificate(request("", &openssl, JUDICIAL_OFFICE, "moved to a new certificate"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(revoked.fingerprint_sha256, lienthong_core::Fingerprint(der).to_string());
    assert_eq!(revoked.not_after, None);
    refused_with(
        &connect_with(&fed, &office_cert, &office_key).await,
        &["moved to a new certificate"],
    )
    .await;
    fed.shutdown().await.unwrap();
}

/// A revoked member certificate re-encoded by whoever holds it and its key
/// (its ECDSA signature (r, s) as the equally valid (r, n − s): same CA, same
/// member, another fingerprint) is refused as the original is. And the other
/// way round: revoking the re-encoded copy by its fingerprint refuses the
/// original.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_certificate_re_encoded_is_still_refused() {
    let (dir, fed) = federation().await;
    let subject = citizen_id(&fed, 11);
    let (cert, key) = issue(&fed, JUDICIAL_OFFICE);
    let mut re_encoded = material(&fed, &cert, &key);
    let fingerprint = lienthong_tls::fingerprint_hex(&lienthong_tls::sha256_fingerprint(&re_encoded.chain[0]));
    re_encoded.chain[0] = lienthong_tls::testing::with_negated_signature(&re_encoded.chain[0]);
    // A valid certificate of the member: served.
    let open = connect_presenting(&fed, &re_encoded).await;
    look_up_birth(&open, &subject).await.unwrap();

    let file = write_pem(dir.path(), "leaked.pem", &cert);
    let (ok, out) = cli_as(&fed, ADMIN, &["certs", "revoke", &file, "--reason", "key leaked"]).await;
    assert!(ok && out.contains(&fingerprint), "{out}");
    refused_with(&open, &["revoked", &fingerprint, "key leaked"]).await;
    let err = look_up_birth(&open, &subject).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    refused_with(&connect_presenting(&fed, &re_encoded).await, &["revoked", &fingerprint]).await;

    // Only the re-encoded copy is at hand (found with the intruder).
    let (cert, key) = issue(&fed, JUDICIAL_OFFICE);
    let copy = lienthong_tls::testing::with_negated_signature(&material(&fed, &cert, &key).chain[0]);
    client(&fed, ADMIN)
        .await
        .admin()
        .revoke_certificate(pb::RevokeCertificateRequest {
            fingerprint_sha256: lienthong_tls::fingerprint_hex(&lienthong_tls::sha256_fingerprint(&copy)),
            member: JUDICIAL_OFFICE.into(),
            reason: "copy found on the intruder's server".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    refused_with(
        &connect_with(&fed, &cert, &key).await,
        &["revoked", "copy found on the intruder's server"],
    )
    .await;
    // The original, revoked in its turn, is named as revoked already
    // rather than filed a second time.
    let err = client(&fed, ADMIN)
        .await
        .admin()
        .revoke_certificate(pb::RevokeCertificateRequest {
            certificate_pem: cert.clone(),
            reason: "key leaked".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists, "{err:?}");
    assert!(
        err.message().contains("revoked already") && err.message().contains("copy found on the intruder's server"),
        "{err:?}"
    );
    let listed = revocations(&client(&fed, ADMIN).await).await;
    assert_eq!(listed.len(), 2, "{listed:?}");
    // The member's other certificate works.
    look_up_birth(&client(&fed, JUDICIAL_OFFICE).await, &subject)
        .await
        .unwrap();
    fed.shutdown().await.unwrap();
}

/// A register's revoked certificate: the broker stops calling the register
/// that presents it (a leaked register key must not let someone else answer
/// for the register), and calls it again once it serves a new certificate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_register_presenting_a_revoked_certificate_is_not_called() {
    use lienthong_cli::federation::CIVIL_STATUS;
    let (_dir, fed) = federation().await;
    let office = client(&fed, JUDICIAL_OFFICE).await;
    let subject = citizen_id(&fed, 7);
    look_up_birth(&office, &subject).await.unwrap();

    let admin = client(&fed, ADMIN).await;
    let old = std::fs::read_to_string(fed.certs.join(format!("{CIVIL_STATUS}.pem"))).unwrap();
    revoke_and_expect_no_call(&admin, old, &office, &subject).await;

    // The register comes back with a new certificate on a new endpoint.
    let (cert, key) = issue(&fed, CIVIL_STATUS);
    let (stop, register) = serve_civil_status(&fed, &material(&fed, &cert, &key)).await;
    look_up_birth(&office, &subject).await.unwrap();
    let _ = stop.send(());
    register.await.unwrap().unwrap();
    fed.shutdown().await.unwrap();
}

/// A register presenting its revoked certificate re-encoded (same key, its
/// ECDSA signature (r, s) as (r, n − s), another fingerprint) is not called
/// either: the relay checks every encoding of the certificate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_register_presenting_its_revoked_certificate_re_encoded_is_not_called() {
    use lienthong_cli::federation::CIVIL_STATUS;
    let (_dir, fed) = federation().await;
    let office = client(&fed, JUDICIAL_OFFICE).await;
    let subject = citizen_id(&fed, 8);
    let cert = std::fs::read_to_string(fed.certs.join(format!("{CIVIL_STATUS}.pem"))).unwrap();
    let key = std::fs::read_to_string(fed.certs.join(format!("{CIVIL_STATUS}.key"))).unwrap();
    let mut re_encoded = material(&fed, &cert, &key);
    re_encoded.chain[0] = lienthong_tls::testing::with_negated_signature(&re_encoded.chain[0]);

    // The register serves the re-encoded certificate: it is valid, and called.
    let (stop, register) = serve_civil_status(&fed, &re_encoded).await;
    look_up_birth(&office, &subject).await.unwrap();

    // The original is revoked, as the admin knows it.
    let admin = client(&fed, ADMIN).await;
    revoke_and_expect_no_call(&admin, cert, &office, &subject).await;
    let _ = stop.send(());
    register.await.unwrap().unwrap();
    fed.shutdown().await.unwrap();
}

/// Revokes the civil-status register's certificate `pem` as `admin`; the
/// office's next lookup is then UNAVAILABLE, naming no national id.
async fn revoke_and_expect_no_call(
    admin: &lienthong_cli::client::Clients,
    pem: String,
    office: &lienthong_cli::client::Clients,
    subject: &str,
) {
    admin
        .admin()
        .revoke_certificate(pb::RevokeCertificateRequest {
            certificate_pem: pem,
            reason: "register's key copied off a backup tape".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let err = look_up_birth(office, subject).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(!err.message().contains(subject), "{err:?}");
}

/// A civil-status demo register presenting `material`, made the register's
/// only endpoint; it stops when the sender is sent to or dropped.
async fn serve_civil_status(
    fed: &lienthong_cli::federation::Federation,
    material: &lienthong_tls::TlsMaterial,
) -> (
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<Result<(), lienthong_provider::ProviderError>>,
) {
    let tls = std::sync::Arc::new(lienthong_tls::ServerTls::new(material, &fed.options.trust_domain).unwrap());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("https://127.0.0.1:{}", listener.local_addr().unwrap().port());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let register = tokio::spawn(lienthong_provider::demo::run_demo_register(
        lienthong_provider::demo::DemoRegisterKind::CivilStatus,
        fed.options.seed,
        tls,
        lienthong_provider::ProviderConfig::new(&fed.options.trust_domain),
        listener,
        async move {
            let _ = stopped.await;
        },
    ));
    replace_civil_endpoint(fed, &url).await;
    (stop, register)
}

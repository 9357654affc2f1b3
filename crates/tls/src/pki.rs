//! The federation PKI: one self-signed ECDSA P-256 CA issuing broker and member certificates.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
#[cfg(test)]
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, SanType,
};
use time::{Duration, OffsetDateTime};
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::GeneralName;

use crate::TlsError;
use crate::identity::{Identity, is_valid_member_id, is_valid_trust_domain};
use crate::keyfile::{GroupAccess, Replace, check_dir, prepare_dir, read_private_key, write_file};
use crate::material::{certs, read};

const CA_VALIDITY: Duration = Duration::days(3650);
const LEAF_VALIDITY: Duration = Duration::days(365);
/// Back-dating absorbs modest clock skew between the issuing and verifying machines.
const BACKDATE: Duration = Duration::hours(1);

/// The federation certificate authority.
pub struct CertificateAuthority {
    trust_domain: String,
    cert_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl std::fmt::Debug for CertificateAuthority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertificateAuthority")
            .field("trust_domain", &self.trust_domain)
            .finish_non_exhaustive()
    }
}

impl CertificateAuthority {
    /// Creates a new CA for `trust_domain`, valid for ten years.
    ///
    /// The trust domain is recorded as the CA's URI SAN `spiffe://<trust-domain>` so
    /// [`trust_domain_from_ca_cert`] can recover it later.
    pub fn generate(trust_domain: &str) -> Result<Self, TlsError> {
        check_trust_domain(trust_domain)?;
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let now = OffsetDateTime::now_utc();
        let mut params = CertificateParams::default();
        params.distinguished_name = name(&format!("lienthong federation CA {trust_domain}"));
        // Every CA of a trust domain would otherwise have the same name, and a
        // certificate from another one (the wrong ca.pem after a CA roll) would
        // read as a bad signature rather than as a certificate of another CA.
        params.distinguished_name.push(
            DnType::OrganizationalUnitName,
            format!(
                "created {}, key {}",
                now.date(),
                &hex::encode(crate::identity::sha256_fingerprint(key.public_key_raw()))[..16]
            ),
        );
        params.subject_alt_names = vec![SanType::URI(format!("spiffe://{trust_domain}").try_into()?)];
        // Path length 0: the CA signs leaves directly and nothing else.
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.not_before = now - BACKDATE;
        params.not_after = now + CA_VALIDITY;
        let cert = params.self_signed(&key)?;
        Ok(CertificateAuthority {
            trust_domain: trust_domain.to_owned(),
            cert_pem: cert.pem(),
            issuer: Issuer::new(params, key),
        })
    }

    /// Loads an existing CA; the key must match the certificate, and if the certificate
    /// records a trust domain it must be `trust_domain`. A key file its group or other
    /// users can access is refused (see [`read_private_key`]): unlike a node's key, the
    /// CA key is never a Kubernetes Secret mounted for a group.
    pub fn load(cert_pem_path: &Path, key_pem_path: &Path, trust_domain: &str) -> Result<Self, TlsError> {
        check_trust_domain(trust_domain)?;
        let cert_pem = read(cert_pem_path)?;
        let der = certs(&cert_pem, cert_pem_path)?.swap_remove(0);
        let bad_cert = |reason: String| TlsError::BadPem {
            path: cert_pem_path.to_owned(),
            reason,
        };
        let (_, parsed) =
            x509_parser::parse_x509_certificate(&der).map_err(|e| bad_cert(format!("unparsable certificate: {e}")))?;
        if !parsed.is_ca() {
            return Err(bad_cert("certificate is not a CA (basicConstraints CA:false)".into()));
        }
        if let Some(found) = recorded_trust_domain(&parsed)
            && found != trust_domain
        {
            return Err(bad_cert(format!(
                "CA belongs to trust domain {found:?}, not {trust_domain:?}"
            )));
        }
        let bad_key = |reason: String| TlsError::BadPem {
            path: key_pem_path.to_owned(),
            reason,
        };
        let key = KeyPair::from_pem(&read_private_key(key_pem_path, GroupAccess::Refuse)?)
            .map_err(|e| bad_key(format!("unusable private key: {e}")))?;
        if key.public_key_raw() != parsed.public_key().subject_public_key.data.as_ref() {
            return Err(bad_key(format!(
                "private key does not belong to the CA certificate {}",
                cert_pem_path.display()
            )));
        }
        let issuer = Issuer::from_ca_cert_der(&der, key).map_err(|e| bad_cert(format!("cannot use as issuer: {e}")))?;
        Ok(CertificateAuthority {
            trust_domain: trust_domain.to_owned(),
            cert_pem,
            issuer,
        })
    }

    /// The federation's trust domain.
    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// The CA certificate in PEM.
    pub fn cert_pem(&self) -> String {
        self.cert_pem.clone()
    }

    /// The CA as rcgen signs with it, for tests that make odd certificates.
    #[cfg(any(test, feature = "testing"))]
    pub(crate) fn issuer(&self) -> &Issuer<'static, KeyPair> {
        &self.issuer
    }

    /// The CA private key in PEM (PKCS#8). Secret: store with mode 0600.
    pub fn key_pem(&self) -> String {
        self.issuer.key().serialize_pem()
    }

    /// Issues a leaf certificate: a TLS client certificate, and a TLS server one for
    /// `spec.hosts` when it names any (none: the holder serves nowhere, so its
    /// certificate cannot pass for a server's either).
    pub fn issue(&self, spec: &IssueSpec) -> Result<IssuedCert, TlsError> {
        let common_name = match &spec.identity {
            Identity::Broker => "broker".to_owned(),
            Identity::Member(id) if is_valid_member_id(id) => id.clone(),
            Identity::Member(id) => {
                return Err(TlsError::InvalidRequest(format!(
                    "member id {id:?} is invalid: use 2 to 63 characters from a-z, 0-9 and '-', starting with a letter or digit"
                )));
            }
        };
        if spec.not_before >= spec.not_after {
            return Err(TlsError::InvalidRequest(
                "not_before must be earlier than not_after".into(),
            ));
        }
        let mut params = CertificateParams::default();
        params.distinguished_name = name(&common_name);
        params.subject_alt_names = vec![SanType::URI(spec.identity.spiffe_uri(&self.trust_domain).try_into()?)];
        for host in &spec.hosts {
            params.subject_alt_names.push(match host.parse::<IpAddr>() {
                Ok(ip) => SanType::IpAddress(ip),
                Err(_) => SanType::DnsName(check_host_name(host)?.try_into()?),
            });
        }
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = if spec.hosts.is_empty() {
            vec![ExtendedKeyUsagePurpose::ClientAuth]
        } else {
            vec![ExtendedKeyUsagePurpose::ClientAuth, ExtendedKeyUsagePurpose::ServerAuth]
        };
        params.use_authority_key_identifier_extension = true;
        params.not_before = spec.not_before;
        params.not_after = spec.not_after;
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(IssuedCert {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

/// What to put in a leaf certificate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IssueSpec {
    /// The identity written as the URI SAN.
    pub identity: Identity,
    /// DNS names or IP addresses the holder serves on (e.g. `localhost`, `127.0.0.1`);
    /// empty for a certificate that only connects (no server authentication).
    pub hosts: Vec<String>,
    /// Start of validity.
    pub not_before: OffsetDateTime,
    /// End of validity.
    pub not_after: OffsetDateTime,
}

impl IssueSpec {
    /// A member certificate valid from an hour ago for one year, for localhost.
    pub fn member(id: &str) -> Self {
        Self::default_for(Identity::Member(id.to_owned()))
    }

    /// A member certificate valid from an hour ago for one year that serves
    /// nowhere: a client certificate only.
    pub fn client(id: &str) -> Self {
        IssueSpec {
            hosts: Vec::new(),
            ..Self::member(id)
        }
    }

    /// A broker certificate valid from an hour ago for one year, for localhost.
    pub fn broker() -> Self {
        Self::default_for(Identity::Broker)
    }

    fn default_for(identity: Identity) -> Self {
        let now = OffsetDateTime::now_utc();
        IssueSpec {
            identity,
            hosts: vec!["localhost".into(), "127.0.0.1".into()],
            not_before: now - BACKDATE,
            not_after: now + LEAF_VALIDITY,
        }
    }
}

/// A freshly issued certificate and its private key, both PEM.
#[derive(Clone)]
pub struct IssuedCert {
    /// The certificate.
    pub cert_pem: String,
    /// The private key (PKCS#8). Secret.
    pub key_pem: String,
}

impl std::fmt::Debug for IssuedCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IssuedCert").finish_non_exhaustive()
    }
}

impl IssuedCert {
    /// Writes `dir/<stem>.pem` and `dir/<stem>.key` (mode 0600), replacing existing files
    /// (a link there is replaced, never followed). Refuses a `dir` its group or others
    /// may write in.
    pub fn write(&self, dir: &Path, stem: &str) -> Result<(PathBuf, PathBuf), TlsError> {
        check_dir(dir)?;
        let cert_path = dir.join(format!("{stem}.pem"));
        let key_path = dir.join(format!("{stem}.key"));
        write_file(&key_path, self.key_pem.as_bytes(), SECRET, Replace::Yes)?;
        write_file(&cert_path, self.cert_pem.as_bytes(), PUBLIC, Replace::Yes)?;
        Ok((cert_path, key_path))
    }
}

/// `lienthong certs init`: writes `ca.pem`, `ca.key`, `broker.pem`, `broker.key` into `dir`,
/// creating it with mode 0700 if it does not exist.
///
/// Refuses to run if `dir/ca.key` exists: replacing the CA would silently invalidate every
/// certificate the federation has issued. Refuses an existing `dir` its group or others
/// may write in.
pub fn init_dir(dir: &Path, trust_domain: &str) -> Result<(), TlsError> {
    init_dir_with_hosts(dir, trust_domain, &[])
}

/// [`init_dir`] with the host names or IPs the broker certificate serves (a
/// Kubernetes Service name, a load balancer's DNS name); empty means
/// `localhost` and `127.0.0.1`.
pub fn init_dir_with_hosts(dir: &Path, trust_domain: &str, hosts: &[String]) -> Result<(), TlsError> {
    let ca_key = dir.join("ca.key");
    // symlink_metadata: a dangling link is something there too.
    if std::fs::symlink_metadata(&ca_key).is_ok() {
        return Err(TlsError::AlreadyExists { path: ca_key });
    }
    prepare_dir(dir)?;
    let ca = CertificateAuthority::generate(trust_domain)?;
    let mut spec = IssueSpec::broker();
    if !hosts.is_empty() {
        spec.hosts = hosts.to_vec();
    }
    let broker = ca.issue(&spec)?;
    // Written first and never over an existing file, so two runs at once leave one CA.
    write_file(&ca_key, ca.key_pem().as_bytes(), SECRET, Replace::No)?;
    write_file(&dir.join("ca.pem"), ca.cert_pem().as_bytes(), PUBLIC, Replace::Yes)?;
    broker.write(dir, "broker")?;
    Ok(())
}

/// `lienthong certs issue`: signs `dir/<member_id>.pem` + `.key` with `dir/ca.pem` + `ca.key`.
///
/// The trust domain is read back from the CA certificate. An empty `hosts` makes a
/// client certificate only (a member that runs no register); a register's certificate
/// names the hosts it serves on.
pub fn issue_member_in_dir(dir: &Path, member_id: &str, hosts: &[String]) -> Result<IssuedFiles, TlsError> {
    issue_in_dir(dir, Identity::Member(member_id.to_string()), hosts)
}

/// `lienthong certs issue --broker`: a new `dir/broker.pem` + `.key` under the
/// existing CA, to rotate the broker's certificate or change its host names.
/// An empty `hosts` means `localhost` and `127.0.0.1`.
pub fn issue_broker_in_dir(dir: &Path, hosts: &[String]) -> Result<IssuedFiles, TlsError> {
    issue_in_dir(dir, Identity::Broker, hosts)
}

/// The files [`issue_member_in_dir`] or [`issue_broker_in_dir`] wrote, and the
/// certificate they replaced.
#[derive(Clone, Debug)]
pub struct IssuedFiles {
    /// The new certificate.
    pub cert: PathBuf,
    /// Its private key.
    pub key: PathBuf,
    /// The certificate that was at `cert` before, which stays valid until it
    /// expires unless revoked.
    pub replaced: Option<ReplacedCertificate>,
}

/// A certificate `certs issue` wrote over.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReplacedCertificate {
    /// SHA-256 of its DER encoding, as revocations name it.
    pub sha256: [u8; 32],
    /// Start of its validity.
    pub not_before: OffsetDateTime,
    /// End of its validity.
    pub not_after: OffsetDateTime,
}

/// The certificate at `path`, if one is there and readable.
fn existing_certificate(path: &Path) -> Option<ReplacedCertificate> {
    let pem = std::fs::read_to_string(path).ok()?;
    let der = certs(&pem, path).ok()?.into_iter().next()?;
    let (_, parsed) = x509_parser::parse_x509_certificate(&der).ok()?;
    Some(ReplacedCertificate {
        sha256: crate::identity::sha256_fingerprint(&der),
        not_before: parsed.validity().not_before.to_datetime(),
        not_after: parsed.validity().not_after.to_datetime(),
    })
}

fn issue_in_dir(dir: &Path, identity: Identity, hosts: &[String]) -> Result<IssuedFiles, TlsError> {
    if let Identity::Member(id) = &identity
        && matches!(id.as_str(), "ca" | "broker")
    {
        // `<id>.pem` and `<id>.key` would replace the federation CA's or the
        // broker's own files: the CA key would be lost for good.
        return Err(TlsError::InvalidRequest(format!(
            "a member cannot be called {id:?} in a certificate directory: {id}.pem and {id}.key are the \
             federation's own files there; choose another member id"
        )));
    }
    // Before the CA key is even read: a directory others may write in could
    // hold a planted link for the new key.
    check_dir(dir)?;
    let ca_pem = dir.join("ca.pem");
    let trust_domain = trust_domain_from_ca_cert(&ca_pem)?;
    let ca = CertificateAuthority::load(&ca_pem, &dir.join("ca.key"), &trust_domain)?;
    let (stem, serves) = match &identity {
        Identity::Broker => ("broker".to_string(), true),
        Identity::Member(id) => (id.clone(), false),
    };
    let mut spec = IssueSpec::default_for(identity);
    if !hosts.is_empty() || !serves {
        spec.hosts = hosts.to_vec();
    }
    let in_place = dir.join(format!("{stem}.pem"));
    // A renewal is taken up without a restart (the broker and kit registers
    // reload their files), so a name left out here would be refused by
    // everyone who reaches the holder by it, as soon as the files change.
    let lost = names_lost(&in_place, &spec.hosts);
    if !lost.is_empty() {
        return Err(TlsError::InvalidRequest(format!(
            "{} also serves on {}, which the new certificate would not name: whoever reaches its holder by \
             them would refuse it once it is in use. Give them again with --host (only the names given are \
             kept), or move {} away first to drop them",
            in_place.display(),
            lost.join(", "),
            in_place.display()
        )));
    }
    let issued = ca.issue(&spec)?;
    let replaced = existing_certificate(&in_place);
    let (cert, key) = issued.write(dir, &stem)?;
    Ok(IssuedFiles { cert, key, replaced })
}

/// The host names and IP addresses the certificate at `path` serves on that
/// `hosts` leaves out (empty when no certificate is there to read).
fn names_lost(path: &Path, hosts: &[String]) -> Vec<String> {
    let normal = |name: &str| match name.parse::<IpAddr>() {
        Ok(ip) => ip.to_string(),
        Err(_) => name.strip_suffix('.').unwrap_or(name).to_ascii_lowercase(),
    };
    let Some(der) = std::fs::read_to_string(path)
        .ok()
        .and_then(|pem| certs(&pem, path).ok())
        .and_then(|mut ders| (!ders.is_empty()).then(|| ders.swap_remove(0)))
    else {
        return Vec::new();
    };
    let Ok((_, parsed)) = x509_parser::parse_x509_certificate(&der) else {
        return Vec::new();
    };
    let Ok(Some(san)) = parsed.subject_alternative_name() else {
        return Vec::new();
    };
    let kept: Vec<String> = hosts.iter().map(|h| normal(h)).collect();
    san.value
        .general_names
        .iter()
        .filter_map(|name| match name {
            GeneralName::DNSName(dns) => Some(normal(dns)),
            GeneralName::IPAddress(bytes) => match bytes.len() {
                4 => <[u8; 4]>::try_from(*bytes).ok().map(|b| IpAddr::from(b).to_string()),
                16 => <[u8; 16]>::try_from(*bytes).ok().map(|b| IpAddr::from(b).to_string()),
                _ => None,
            },
            _ => None,
        })
        .filter(|name| !kept.contains(name))
        .collect()
}

/// `host` if it is a DNS host name (RFC 1123: dot-separated labels of letters,
/// digits and inner hyphens): no wildcard, which would let the holder serve as
/// any host under it.
fn check_host_name(host: &str) -> Result<&str, TlsError> {
    let bad = |why: &str| TlsError::InvalidRequest(format!("host {host:?} {why}"));
    if host.contains('*') {
        return Err(bad(
            "is a wildcard: a certificate names the exact host names (or IP addresses) its holder serves on; \
             give each with its own --host",
        ));
    }
    let name = host.strip_suffix('.').unwrap_or(host);
    let label_ok = |label: &str| {
        (1..=63).contains(&label.len())
            && label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            && !label.starts_with('-')
            && !label.ends_with('-')
    };
    if name.is_empty() || name.len() > 253 || !name.split('.').all(label_ok) {
        return Err(bad(
            "is neither an IP address nor a DNS host name (letters, digits and '-' in dot-separated labels of \
             at most 63 characters, no '-' at either end of a label)",
        ));
    }
    Ok(host)
}

/// The trust domain recorded in a CA certificate written by [`CertificateAuthority::generate`].
pub fn trust_domain_from_ca_cert(cert_pem_path: &Path) -> Result<String, TlsError> {
    let der = certs(&read(cert_pem_path)?, cert_pem_path)?.swap_remove(0);
    let bad = |reason: String| TlsError::BadPem {
        path: cert_pem_path.to_owned(),
        reason,
    };
    let (_, parsed) =
        x509_parser::parse_x509_certificate(&der).map_err(|e| bad(format!("unparsable certificate: {e}")))?;
    recorded_trust_domain(&parsed).ok_or_else(|| {
        bad("CA certificate records no spiffe://<trust-domain> URI; was it made by `lienthong certs init`?".into())
    })
}

/// The `spiffe://<td>` URI SAN (no path) of a CA certificate.
fn recorded_trust_domain(cert: &X509Certificate<'_>) -> Option<String> {
    let san = cert.subject_alternative_name().ok()??;
    san.value.general_names.iter().find_map(|name| match name {
        GeneralName::URI(uri) => uri
            .strip_prefix("spiffe://")
            .filter(|td| is_valid_trust_domain(td))
            .map(str::to_owned),
        _ => None,
    })
}

fn check_trust_domain(td: &str) -> Result<(), TlsError> {
    if is_valid_trust_domain(td) {
        Ok(())
    } else {
        Err(TlsError::InvalidRequest(format!(
            "trust domain {td:?} is invalid: use 1 to 255 characters from a-z, 0-9, '.', '-' and '_'"
        )))
    }
}

fn name(common_name: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "lienthong");
    dn.push(DnType::CommonName, common_name);
    dn
}

/// Mode of private key files written here.
const SECRET: u32 = 0o600;
/// Mode of certificate files written here (before the umask).
const PUBLIC: u32 = 0o644;

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[cfg(unix)]
    fn mode_of(path: &Path) -> u32 {
        use std::os::unix::fs::PermissionsExt;
        std::fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn a_renewal_that_would_drop_a_name_the_certificate_serves_on_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let certs_dir = dir.path().join("certs");
        let names = |extra: &[&str]| {
            let mut v: Vec<String> = vec!["localhost".into(), "127.0.0.1".into()];
            v.extend(extra.iter().map(|s| s.to_string()));
            v
        };
        init_dir_with_hosts(&certs_dir, "gov.example", &names(&["broker.gov.example"])).unwrap();
        let before = std::fs::read(certs_dir.join("broker.pem")).unwrap();
        let err = issue_broker_in_dir(&certs_dir, &names(&[])).unwrap_err().to_string();
        assert!(err.contains("broker.pem also serves on broker.gov.example,"), "{err}");
        assert!(err.contains("--host") && err.contains("move"), "{err}");
        assert_eq!(
            std::fs::read(certs_dir.join("broker.pem")).unwrap(),
            before,
            "nothing written"
        );
        // Kept (in any case, with a trailing dot), or added to: issued.
        issue_broker_in_dir(&certs_dir, &names(&["Broker.Gov.Example."])).unwrap();
        issue_broker_in_dir(&certs_dir, &names(&["broker.gov.example", "lb.gov.example"])).unwrap();
        // A register's certificate renewed as a client certificate only.
        issue_member_in_dir(&certs_dir, "land", &names(&["::1"])).unwrap();
        let err = issue_member_in_dir(&certs_dir, "land", &[]).unwrap_err().to_string();
        assert!(err.contains("localhost, 127.0.0.1, ::1,"), "{err}");
        // Moved away: a fresh start.
        std::fs::rename(certs_dir.join("land.pem"), dir.path().join("old-land.pem")).unwrap();
        issue_member_in_dir(&certs_dir, "land", &[]).unwrap();
    }

    #[test]
    fn init_then_issue_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let certs_dir = dir.path().join("certs");
        init_dir(&certs_dir, "gov.example").unwrap();
        for f in ["ca.pem", "ca.key", "broker.pem", "broker.key"] {
            assert!(certs_dir.join(f).is_file(), "{f} missing");
        }
        assert_eq!(
            trust_domain_from_ca_cert(&certs_dir.join("ca.pem")).unwrap(),
            "gov.example"
        );

        let IssuedFiles { cert, key, replaced } =
            issue_member_in_dir(&certs_dir, "tax-office", &["tax.internal".into()]).unwrap();
        assert_eq!(replaced, None);
        assert_eq!(cert, certs_dir.join("tax-office.pem"));
        assert_eq!(key, certs_dir.join("tax-office.key"));

        let pem = std::fs::read_to_string(&cert).unwrap();
        let der = certs(&pem, &cert).unwrap().swap_remove(0);
        let (_, parsed) = x509_parser::parse_x509_certificate(&der).unwrap();
        assert_eq!(
            crate::identity::identity_of(&parsed, "gov.example"),
            Ok(Identity::Member("tax-office".into()))
        );
        let names = format!("{:?}", parsed.subject_alternative_name().unwrap());
        assert!(names.contains("tax.internal"), "{names}");
        assert!(!names.contains("localhost"), "explicit hosts replace the defaults");

        // The member certificate verifies against the CA written by init.
        let material = crate::TlsMaterial::load(&crate::TlsFiles {
            ca: certs_dir.join("ca.pem"),
            cert,
            key: key.clone(),
        })
        .unwrap();
        let server = crate::ServerTls::new(&material, "gov.example").unwrap();
        assert_eq!(
            server.verify_peer(Some(&material.chain)).0,
            Ok(Identity::Member("tax-office".into()))
        );

        #[cfg(unix)]
        {
            assert_eq!(mode_of(&certs_dir), 0o700, "a directory init creates is private");
            assert_eq!(mode_of(&certs_dir.join("ca.key")), 0o600);
            assert_eq!(mode_of(&certs_dir.join("broker.key")), 0o600);
            assert_eq!(mode_of(&key), 0o600);
        }
    }

    #[test]
    fn init_refuses_to_overwrite_the_ca_key() {
        let dir = tempfile::tempdir().unwrap();
        init_dir(dir.path(), "gov").unwrap();
        let before = std::fs::read(dir.path().join("ca.key")).unwrap();
        let err = init_dir(dir.path(), "gov").unwrap_err();
        assert!(matches!(err, TlsError::AlreadyExists { .. }));
        assert!(err.to_string().contains("ca.key"), "{err}");
        assert_eq!(std::fs::read(dir.path().join("ca.key")).unwrap(), before);
    }

    /// A member called "ca" or "broker" would have its certificate written
    /// over the federation's own files (the police are commonly "CA").
    #[test]
    fn a_member_named_after_the_federations_files_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        init_dir(dir.path(), "gov").unwrap();
        let files = ["ca.pem", "ca.key", "broker.pem", "broker.key"];
        let before: Vec<Vec<u8>> = files
            .iter()
            .map(|f| std::fs::read(dir.path().join(f)).unwrap())
            .collect();
        for id in ["ca", "broker"] {
            let err = issue_member_in_dir(dir.path(), id, &[]).unwrap_err();
            assert!(matches!(err, TlsError::InvalidRequest(_)), "{err:?}");
            assert!(err.to_string().contains("choose another member id"), "{err}");
        }
        let after: Vec<Vec<u8>> = files
            .iter()
            .map(|f| std::fs::read(dir.path().join(f)).unwrap())
            .collect();
        assert_eq!(after, before);
        issue_member_in_dir(dir.path(), "ca-police", &[]).unwrap();
    }

    #[cfg(unix)]
    use crate::keyfile::set_mode;

    /// `chmod 644 ca.key; lienthong certs issue --member m2` used to sign
    /// with the exposed key.
    #[cfg(unix)]
    #[test]
    fn a_ca_key_others_can_read_is_refused_and_nothing_is_issued() {
        let dir = tempfile::tempdir().unwrap();
        init_dir(dir.path(), "gov").unwrap();
        let ca_key = dir.path().join("ca.key");
        set_mode(&ca_key, 0o644);
        let err = issue_member_in_dir(dir.path(), "m2", &[]).unwrap_err();
        assert!(
            matches!(err, TlsError::KeyFile(crate::KeyFileError::Exposed { .. })),
            "{err:?}"
        );
        let text = err.to_string();
        assert!(
            text.contains(&ca_key.display().to_string()) && text.contains("chmod 600"),
            "{text}"
        );
        assert!(!dir.path().join("m2.key").exists() && !dir.path().join("m2.pem").exists());
        let err = CertificateAuthority::load(&dir.path().join("ca.pem"), &ca_key, "gov").unwrap_err();
        assert!(matches!(err, TlsError::KeyFile(_)), "{err:?}");

        // Group-readable too: the CA key is never a Secret mounted for a group.
        set_mode(&ca_key, 0o640);
        let err = issue_member_in_dir(dir.path(), "m2", &[]).unwrap_err();
        assert!(
            matches!(
                err,
                TlsError::KeyFile(crate::KeyFileError::Exposed { whom: "its group", .. })
            ),
            "{err:?}"
        );

        set_mode(&ca_key, 0o600);
        issue_member_in_dir(dir.path(), "m2", &[]).unwrap();
    }

    /// `ln -s /some/victim.txt certs/evil.key; lienthong certs issue --member evil`
    /// used to write the key into victim.txt and chmod it 0600.
    #[cfg(unix)]
    #[test]
    fn issuing_replaces_planted_links_instead_of_writing_through_them() {
        let dir = tempfile::tempdir().unwrap();
        let certs_dir = dir.path().join("certs");
        init_dir(&certs_dir, "gov").unwrap();
        let victims = [dir.path().join("victim.txt"), dir.path().join("victim.pem")];
        for victim in &victims {
            std::fs::write(victim, "precious").unwrap();
            set_mode(victim, 0o644);
        }
        std::os::unix::fs::symlink(&victims[0], certs_dir.join("evil.key")).unwrap();
        std::os::unix::fs::symlink(&victims[1], certs_dir.join("evil.pem")).unwrap();

        let IssuedFiles { cert, key, .. } = issue_member_in_dir(&certs_dir, "evil", &[]).unwrap();
        for victim in &victims {
            assert_eq!(std::fs::read_to_string(victim).unwrap(), "precious");
            assert_eq!(mode_of(victim), 0o644);
        }
        for file in [&cert, &key] {
            assert!(
                std::fs::symlink_metadata(file).unwrap().file_type().is_file(),
                "{file:?}"
            );
        }
        assert_eq!(mode_of(&key), 0o600);
        assert!(std::fs::read_to_string(&key).unwrap().contains("PRIVATE KEY"));
    }

    #[cfg(unix)]
    #[test]
    fn a_certificate_directory_others_can_write_in_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let shared = dir.path().join("shared");
        std::fs::create_dir(&shared).unwrap();
        set_mode(&shared, 0o777);
        let err = init_dir(&shared, "gov").unwrap_err();
        assert!(matches!(err, TlsError::InsecureDirectory { .. }), "{err:?}");
        assert!(err.to_string().contains(&shared.display().to_string()), "{err}");
        assert_eq!(std::fs::read_dir(&shared).unwrap().count(), 0, "nothing written");

        set_mode(&shared, 0o755);
        init_dir(&shared, "gov").unwrap();
        set_mode(&shared, 0o775);
        let err = issue_member_in_dir(&shared, "m2", &[]).unwrap_err();
        assert!(matches!(err, TlsError::InsecureDirectory { .. }), "{err:?}");
        let err = CertificateAuthority::generate("gov")
            .unwrap()
            .issue(&IssueSpec::member("m2"))
            .unwrap()
            .write(&shared, "m2")
            .unwrap_err();
        assert!(matches!(err, TlsError::InsecureDirectory { .. }), "{err:?}");
        assert!(!shared.join("m2.key").exists());
    }

    /// A link where ca.key goes, even one pointing nowhere, counts as a CA key.
    #[cfg(unix)]
    #[test]
    fn init_does_not_create_the_ca_key_through_a_dangling_link() {
        let dir = tempfile::tempdir().unwrap();
        let elsewhere = dir.path().join("elsewhere.key");
        std::os::unix::fs::symlink(&elsewhere, dir.path().join("ca.key")).unwrap();
        let err = init_dir(dir.path(), "gov").unwrap_err();
        assert!(matches!(err, TlsError::AlreadyExists { .. }), "{err:?}");
        assert!(!elsewhere.exists());
    }

    #[test]
    fn rewriting_a_key_tightens_its_mode() {
        let dir = tempfile::tempdir().unwrap();
        let ca = CertificateAuthority::generate("gov").unwrap();
        let key = dir.path().join("m1.key");
        std::fs::write(&key, "old").unwrap();
        ca.issue(&IssueSpec::member("m1"))
            .unwrap()
            .write(dir.path(), "m1")
            .unwrap();
        #[cfg(unix)]
        assert_eq!(mode_of(&key), 0o600);
        assert!(std::fs::read_to_string(&key).unwrap().contains("PRIVATE KEY"));
    }

    #[test]
    fn load_checks_key_and_trust_domain() {
        let dir = tempfile::tempdir().unwrap();
        init_dir(dir.path(), "gov").unwrap();
        let (ca_pem, ca_key) = (dir.path().join("ca.pem"), dir.path().join("ca.key"));
        assert_eq!(
            CertificateAuthority::load(&ca_pem, &ca_key, "gov")
                .unwrap()
                .trust_domain(),
            "gov"
        );
        let err = CertificateAuthority::load(&ca_pem, &ca_key, "other").unwrap_err();
        assert!(err.to_string().contains("\"gov\""), "{err}");
        // broker.key is a valid key, but not the CA's.
        let err = CertificateAuthority::load(&ca_pem, &dir.path().join("broker.key"), "gov").unwrap_err();
        assert!(err.to_string().contains("does not belong"), "{err}");
        // broker.pem is not a CA.
        let err = CertificateAuthority::load(&dir.path().join("broker.pem"), &ca_key, "gov").unwrap_err();
        assert!(err.to_string().contains("not a CA"), "{err}");
    }

    /// `certs issue --host '*.gov.vn'` would let the holder serve as any
    /// agency's host; `a b` is no name at all.
    #[test]
    fn hosts_are_exact_dns_names_or_ip_addresses() {
        let ca = CertificateAuthority::generate("gov").unwrap();
        let with_host = |host: &str| {
            ca.issue(&IssueSpec {
                hosts: vec![host.into()],
                ..IssueSpec::member("m1")
            })
        };
        for good in [
            "registry.gov.vn",
            "localhost",
            "127.0.0.1",
            "::1",
            "a-1.b2.",
            "civil-status",
        ] {
            with_host(good).unwrap();
        }
        for bad in [
            "*.gov.vn",
            "*",
            "a b",
            "",
            "-a.gov.vn",
            "a-.gov.vn",
            "a..b",
            "gov.vn/x",
            &"a".repeat(64),
        ] {
            let err = with_host(bad).unwrap_err();
            assert!(matches!(err, TlsError::InvalidRequest(_)), "{bad}: {err:?}");
            assert!(err.to_string().contains(&format!("{bad:?}")), "{err}");
        }
        assert!(with_host("*.gov.vn").unwrap_err().to_string().contains("wildcard"));
    }

    /// A member that runs no register gets a client certificate only: a
    /// stock TLS client checking host names cannot take it for a server's.
    #[test]
    fn only_certificates_that_name_hosts_may_serve() {
        use rustls::client::danger::ServerCertVerifier;
        let ca = CertificateAuthority::generate("gov").unwrap();
        let material = |spec: &IssueSpec| {
            let issued = ca.issue(spec).unwrap();
            crate::TlsMaterial::from_pem(&ca.cert_pem(), &issued.cert_pem, &issued.key_pem).unwrap()
        };
        let server_verifier = |material: &crate::TlsMaterial| {
            let mut roots = rustls::RootCertStore::empty();
            roots.add(material.roots[0].clone()).unwrap();
            rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::new(roots), crate::provider())
                .build()
                .unwrap()
        };
        let as_server = server_verifier(&material(&IssueSpec::broker()));
        let localhost = rustls_pki_types::ServerName::try_from("localhost").unwrap();
        let now = rustls_pki_types::UnixTime::now();
        let client_only = material(&IssueSpec::client("consumer"));
        let err = as_server
            .verify_server_cert(&client_only.chain[0], &[], &localhost, &[], now)
            .unwrap_err();
        assert!(err.to_string().contains("extended key usage"), "{err}");
        let server = crate::ServerTls::new(&material(&IssueSpec::broker()), "gov").unwrap();
        assert_eq!(
            server.verify_peer(Some(&client_only.chain)).0,
            Ok(Identity::Member("consumer".into())),
            "it still authenticates its holder"
        );
        let register = material(&IssueSpec::member("civil-status"));
        as_server
            .verify_server_cert(&register.chain[0], &[], &localhost, &[], now)
            .unwrap();

        // `certs issue` without --host: a client certificate; a broker's always serves.
        let dir = tempfile::tempdir().unwrap();
        init_dir(dir.path(), "gov").unwrap();
        for (files, serves) in [
            (issue_member_in_dir(dir.path(), "consumer", &[]).unwrap(), false),
            (issue_broker_in_dir(dir.path(), &[]).unwrap(), true),
        ] {
            let material = crate::TlsMaterial::load(&crate::TlsFiles {
                ca: dir.path().join("ca.pem"),
                cert: files.cert,
                key: files.key,
            })
            .unwrap();
            let verified = server_verifier(&material).verify_server_cert(&material.chain[0], &[], &localhost, &[], now);
            assert_eq!(verified.is_ok(), serves, "{verified:?}");
        }
    }

    /// Re-issuing a member's certificate says which one it replaced, so that
    /// it can be revoked: it stays valid until it expires otherwise.
    #[test]
    fn issuing_again_names_the_certificate_it_replaced() {
        let dir = tempfile::tempdir().unwrap();
        init_dir(dir.path(), "gov").unwrap();
        let first = issue_member_in_dir(dir.path(), "m1", &[]).unwrap();
        assert_eq!(first.replaced, None);
        let pem = std::fs::read_to_string(&first.cert).unwrap();
        let summary = crate::summarize_pem(&pem, "gov").unwrap();
        let second = issue_member_in_dir(dir.path(), "m1", &[]).unwrap();
        let replaced = second.replaced.unwrap();
        assert_eq!(replaced.sha256, summary.sha256);
        assert_eq!(replaced.not_after, summary.not_after);
        assert!(replaced.not_before < replaced.not_after);
        assert_ne!(std::fs::read_to_string(&second.cert).unwrap(), pem);
    }

    /// Two CAs of one trust domain have different names, so a certificate of
    /// the other reads as "not issued by this CA", not as a bad signature.
    #[test]
    fn every_ca_has_a_name_of_its_own() {
        let subject = |ca: &CertificateAuthority| {
            let der = certs(&ca.cert_pem(), Path::new("<ca>")).unwrap().remove(0);
            let (_, parsed) = x509_parser::parse_x509_certificate(&der).unwrap();
            parsed.subject().to_string()
        };
        let (a, b) = (
            CertificateAuthority::generate("gov").unwrap(),
            CertificateAuthority::generate("gov").unwrap(),
        );
        assert_ne!(subject(&a), subject(&b));
        assert!(subject(&a).contains("lienthong federation CA gov"), "{}", subject(&a));
    }

    #[test]
    fn issue_rejects_bad_requests() {
        let ca = CertificateAuthority::generate("gov").unwrap();
        assert!(matches!(
            ca.issue(&IssueSpec::member("../etc")),
            Err(TlsError::InvalidRequest(_))
        ));
        let mut spec = IssueSpec::member("m1");
        spec.not_after = spec.not_before;
        assert!(matches!(ca.issue(&spec), Err(TlsError::InvalidRequest(_))));
        assert!(matches!(
            CertificateAuthority::generate("Bad/Domain"),
            Err(TlsError::InvalidRequest(_))
        ));
    }
}

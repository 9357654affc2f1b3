//! The broker's own TLS: its certificate, key and CAs, checked as its peers
//! will check them, and kept current while it runs. Operators renew the
//! broker's certificate (or roll the federation CA) by replacing the files;
//! the broker serves the new ones from the next connection on, and goes on
//! serving the old ones when the new ones would be refused by its peers.

use crate::config::Config;
use crate::error::BrokerError;
use crate::expiry::EXPIRY_WARNING;
use crate::server::StartError;
use crate::state::Broker;
use arc_swap::ArcSwap;
use lienthong_tls::{ServerTls, TlsFiles, TlsMaterial};
use sha2::{Digest, Sha256};
use std::sync::Arc;
use std::time::Duration;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use tokio::sync::Notify;
use tokio::task::JoinHandle;

/// The broker's TLS as configured, checked: what it serves and the
/// certificate's expiry.
pub(crate) struct OwnTls {
    /// The files' contents, for the relay's connections to registers.
    pub material: TlsMaterial,
    /// The gRPC listener's TLS.
    pub server: ServerTls,
    /// The metrics listener's, when it has one.
    pub metrics: Option<Arc<rustls::ServerConfig>>,
    /// When the broker's certificate expires.
    pub expires: OffsetDateTime,
}

impl OwnTls {
    /// Reads `tls.ca`, `tls.cert` and `tls.key` (and the scrapers' CA) and
    /// refuses what members and registers would refuse.
    pub(crate) fn load(config: &Config) -> Result<OwnTls, StartError> {
        let material = TlsMaterial::load(&TlsFiles {
            ca: config.tls.ca.clone(),
            cert: config.tls.cert.clone(),
            key: config.tls.key.clone(),
        })?;
        check_own_identity(config)?;
        let server = ServerTls::new(&material, &config.trust_domain)?;
        let expires = check_own_certificate(config, &server, &material)?;
        let metrics = metrics_config(config, &material)?;
        Ok(OwnTls {
            material,
            server,
            metrics,
            expires,
        })
    }
}

/// Refuses a certificate that does not name this broker in the configured
/// trust domain. Registers accept only `spiffe://<trust_domain>/broker` and
/// members are checked against `trust_domain`, so a mismatch would start a
/// broker that refuses every member and is refused by every register, with
/// the cause only in each peer's error.
fn check_own_identity(config: &Config) -> Result<(), StartError> {
    let path = &config.tls.cert;
    let pem = std::fs::read_to_string(path).map_err(|source| StartError::Io {
        what: format!("cannot read tls.cert {}", path.display()),
        source,
    })?;
    let named = lienthong_tls::summarize_pem(&pem, &config.trust_domain)?.identity;
    if named == Ok(lienthong_tls::Identity::Broker) {
        return Ok(());
    }
    let why = match named {
        Ok(other) => format!("it names {}", other.spiffe_uri(&config.trust_domain)),
        Err(e) => e.to_string(),
    };
    Err(BrokerError::InvalidArgument(format!(
        "tls.cert {} is not this broker's certificate in trust domain {:?} ({why}): the broker's certificate must \
         name spiffe://{}/broker; set `trust_domain` to the domain its CA was made for \
         (`lienthong certs init --trust-domain`), or issue the broker a certificate in this one \
         (`lienthong certs issue --broker-cert`)",
        path.display(),
        config.trust_domain,
        config.trust_domain
    ))
    .into())
}

/// Refuses a certificate members and registers would refuse now: not issued
/// by a CA in `tls.ca` (a slip in a CA roll), expired, or not valid yet. The
/// broker would otherwise say it serves while every connection fails, with
/// the cause only in each peer's error. Returns the certificate's expiry.
fn check_own_certificate(
    config: &Config,
    server_tls: &ServerTls,
    material: &TlsMaterial,
) -> Result<OffsetDateTime, StartError> {
    let (cert, ca) = (config.tls.cert.display(), config.tls.ca.display());
    let (verified, not_after) = server_tls.verify_peer(Some(&material.chain));
    let why = match (verified, not_after) {
        (Ok(_), Some(not_after)) => return Ok(not_after),
        (Ok(_), None) => format!("tls.cert {cert} has no readable expiry"),
        (Err(lienthong_tls::AuthError::UnknownIssuer), _) => format!(
            "tls.cert {cert} is not issued by a CA in tls.ca {ca}, so members and registers would refuse the \
             broker: during a CA roll put both the old and the new CA certificate in tls.ca, or issue the broker \
             a certificate from the CA in tls.ca (`lienthong certs issue --broker-cert`)"
        ),
        (Err(lienthong_tls::AuthError::Expired { not_after }), _) => format!(
            "tls.cert {cert} expired at {not_after}, so members and registers would refuse the broker: issue it \
             a new certificate (`lienthong certs issue --broker-cert`) and restart"
        ),
        (Err(lienthong_tls::AuthError::NotYetValid), _) => format!(
            "tls.cert {cert} is not valid yet by this host's clock, so members and registers would refuse the \
             broker: check the clock (and the issuing host's), or wait until the certificate's validity starts"
        ),
        (Err(other), _) => format!("tls.cert {cert} is not usable as the broker's certificate: {other}"),
    };
    Err(BrokerError::FailedPrecondition(why).into())
}

/// Warns when the broker's certificate expires within [`EXPIRY_WARNING`] of
/// `now`; whether it did.
pub(crate) fn warn_if_expiring(cert: &std::path::Path, not_after: OffsetDateTime, now: OffsetDateTime) -> bool {
    let left = not_after - now;
    if left > EXPIRY_WARNING {
        return false;
    }
    tracing::warn!(
        tls_cert = %cert.display(),
        not_after = %not_after.format(&Rfc3339).unwrap_or_default(),
        days_left = left.whole_days(),
        "the broker's certificate expires soon, and then every member and register refuses the broker: issue a \
         new one (`lienthong certs issue --broker-cert`) and put it in place of tls.cert and tls.key on each \
         replica, which takes it within tls.reload_check_ms or on SIGHUP"
    );
    true
}

/// The metrics listener's TLS config, when `telemetry.metrics_client_ca` is
/// set and metrics are on: the broker's own certificate, client certificates
/// from that CA required.
fn metrics_config(config: &Config, material: &TlsMaterial) -> Result<Option<Arc<rustls::ServerConfig>>, StartError> {
    if !config.telemetry.metrics_tls() || config.telemetry.metrics_addr().is_none() {
        return Ok(None);
    }
    let invalid = |e: lienthong_tls::TlsError| {
        StartError::Broker(BrokerError::InvalidArgument(format!(
            "telemetry.metrics_client_ca: {e}"
        )))
    };
    let roots = lienthong_tls::read_trust_anchors(&config.telemetry.metrics_client_ca).map_err(invalid)?;
    if roots.iter().any(|root| material.roots.contains(root)) {
        // Allowed (an operator may issue the scraper's certificate from the
        // federation CA), but then every member's certificate scrapes too.
        tracing::warn!(
            "telemetry.metrics_client_ca holds the federation CA: every member agency's certificate can read \
             /metrics (who asks for which record types, how often); give the scrapers a CA of their own"
        );
    }
    let server_config =
        lienthong_tls::client_auth_required_config(&material.chain, &material.key, &roots, &[b"http/1.1"])
            .map_err(invalid)?;
    Ok(Some(server_config))
}

/// What the broker serves its TLS with, kept current by [`spawn_watch`].
pub(crate) struct Served {
    /// The gRPC listener's.
    pub server: Arc<ServerTls>,
    /// The metrics listener's, when it has one.
    pub metrics: Option<Arc<ArcSwap<rustls::ServerConfig>>>,
}

/// The contents of the files the broker's TLS is made of, to tell when they
/// change: a file that cannot be read counts by its error, so that it is
/// reported once rather than at every look.
fn files_digest(config: &Config) -> [u8; 32] {
    let mut digest = Sha256::new();
    let scrapers = config
        .telemetry
        .metrics_tls()
        .then_some(&config.telemetry.metrics_client_ca);
    for path in [&config.tls.ca, &config.tls.cert, &config.tls.key]
        .into_iter()
        .chain(scrapers)
    {
        match std::fs::read(path) {
            Ok(bytes) => {
                digest.update((bytes.len() as u64).to_be_bytes());
                digest.update(&bytes);
            }
            Err(e) => digest.update(format!("unreadable: {:?}", e.kind())),
        }
    }
    digest.finalize().into()
}

/// Puts the files' new contents in service, or says why they are refused.
fn renew(config: &Config, broker: &Broker, served: &Served) -> Result<OffsetDateTime, StartError> {
    let own = OwnTls::load(config)?;
    let sha256 = own
        .material
        .chain
        .first()
        .map(|der| hex::encode(Sha256::digest(der)))
        .unwrap_or_default();
    served.server.replace(own.server);
    if let (Some(swap), Some(metrics)) = (&served.metrics, own.metrics) {
        swap.store(metrics);
    }
    broker.relay.renew_identity(own.material);
    broker.metrics.certificate_expiry.set(own.expires.unix_timestamp());
    tracing::info!(
        tls_cert = %config.tls.cert.display(),
        sha256 = %sha256,
        not_after = %own.expires.format(&Rfc3339).unwrap_or_default(),
        "the broker's TLS files changed: new connections, and new connections to registers, use them"
    );
    Ok(own.expires)
}

/// When the expiry warnings are first given after the start; then daily.
const FIRST_EXPIRY_REPORT: Duration = Duration::from_secs(10 * 60);

/// Keeps the broker's TLS in line with its files: looks at them every
/// `tls.reload_check_ms` (when not 0) and whenever `asked` is notified (on
/// SIGHUP, by `lienthong serve`); and warns daily of its own certificate's
/// expiry, and of members' and registers' (see [`crate::expiry`]).
pub(crate) fn spawn_watch(
    config: Arc<Config>,
    broker: Arc<Broker>,
    served: Served,
    mut expires: OffsetDateTime,
    asked: Arc<Notify>,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut seen = files_digest(&config);
        let mut refused: Option<String> = None;
        let check = Duration::from_millis(config.tls.reload_check_ms);
        let start = tokio::time::Instant::now();
        let mut looks = (!check.is_zero()).then(|| tokio::time::interval_at(start + check, check));
        let day = Duration::from_secs(24 * 60 * 60);
        // Members have connected, and registers been called, by the first.
        let mut daily = tokio::time::interval_at(start + FIRST_EXPIRY_REPORT, day);
        loop {
            let on_request = tokio::select! {
                () = asked.notified() => true,
                _ = async {
                    match looks.as_mut() {
                        Some(looks) => looks.tick().await,
                        None => std::future::pending().await,
                    }
                } => false,
                _ = daily.tick() => {
                    let now = OffsetDateTime::now_utc();
                    warn_if_expiring(&config.tls.cert, expires, now);
                    crate::expiry::warn_of_expiring(&broker, now);
                    continue;
                }
            };
            let now_seen = files_digest(&config);
            // Refused files are tried again at every look, unchanged too: a
            // certificate refused as not valid yet becomes valid by itself.
            if now_seen == seen && refused.is_none() {
                if on_request {
                    tracing::info!("asked to reload the broker's TLS files, which have not changed");
                }
                continue;
            }
            seen = now_seen;
            match renew(&config, &broker, &served) {
                Ok(renewed) => {
                    expires = renewed;
                    refused = None;
                    broker.metrics.tls_files_refused.set(0);
                    warn_if_expiring(&config.tls.cert, expires, OffsetDateTime::now_utc());
                }
                Err(e) => {
                    broker.metrics.tls_files_refused.set(1);
                    let why = e.to_string();
                    // Once per reason (and whenever asked), not at every look.
                    if on_request || refused.as_ref() != Some(&why) {
                        tracing::error!(
                            error = %why,
                            "the broker's TLS files changed into ones it refuses; it goes on serving the ones it \
                             had (until they expire): correct the files, and the broker takes them at its next look"
                        );
                    }
                    refused = Some(why);
                }
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A config whose tls.ca is `ca`, and the broker's TLS from `broker`'s certificate.
    fn own_certificate(
        ca: &lienthong_tls::CertificateAuthority,
        broker: &lienthong_tls::IssueSpec,
    ) -> Result<OffsetDateTime, StartError> {
        let issued = ca.issue(broker).map_err(StartError::Tls)?;
        let mut config = Config {
            trust_domain: "gov".into(),
            ..Config::default()
        };
        config.tls.ca = "certs/ca.pem".into();
        config.tls.cert = "certs/broker.pem".into();
        let material = TlsMaterial::from_pem(&ca.cert_pem(), &issued.cert_pem, &issued.key_pem)?;
        let server_tls = ServerTls::new(&material, "gov")?;
        check_own_certificate(&config, &server_tls, &material)
    }

    #[allow(clippy::unwrap_used)]
    #[test]
    fn the_broker_refuses_to_start_with_a_certificate_its_peers_would_refuse() {
        let ca = lienthong_tls::CertificateAuthority::generate("gov").unwrap();
        let good = lienthong_tls::IssueSpec::broker();
        let not_after = own_certificate(&ca, &good).unwrap();
        assert!(not_after > OffsetDateTime::now_utc() + time::Duration::days(300));

        // Issued by a CA that is not in tls.ca (the same name, another key).
        let next = lienthong_tls::CertificateAuthority::generate("gov").unwrap();
        let issued = next.issue(&good).unwrap();
        let mut material = TlsMaterial::from_pem(&ca.cert_pem(), &issued.cert_pem, &issued.key_pem).unwrap();
        let mut config = Config::default();
        config.tls.ca = "certs/ca.pem".into();
        config.tls.cert = "certs/broker.pem".into();
        let server_tls = ServerTls::new(&material, "gov").unwrap();
        let err = check_own_certificate(&config, &server_tls, &material)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("certs/broker.pem is not issued by a CA in tls.ca certs/ca.pem") && err.contains("CA roll"),
            "{err}"
        );
        // A CA roll: both CAs in tls.ca.
        material.roots = TlsMaterial::from_pem(
            &format!("{}{}", ca.cert_pem(), next.cert_pem()),
            &issued.cert_pem,
            &issued.key_pem,
        )
        .unwrap()
        .roots;
        let server_tls = ServerTls::new(&material, "gov").unwrap();
        check_own_certificate(&config, &server_tls, &material).unwrap();

        let now = OffsetDateTime::now_utc();
        let expired = lienthong_tls::IssueSpec {
            not_before: now - time::Duration::days(400),
            not_after: now - time::Duration::days(1),
            ..lienthong_tls::IssueSpec::broker()
        };
        let err = own_certificate(&ca, &expired).unwrap_err().to_string();
        assert!(
            err.contains("expired at") && err.contains("certs issue --broker-cert"),
            "{err}"
        );
        let future = lienthong_tls::IssueSpec {
            not_before: now + time::Duration::days(1),
            ..lienthong_tls::IssueSpec::broker()
        };
        let err = own_certificate(&ca, &future).unwrap_err().to_string();
        assert!(err.contains("not valid yet") && err.contains("clock"), "{err}");
    }

    #[test]
    fn the_broker_warns_in_the_last_thirty_days_of_its_certificate() {
        let now = OffsetDateTime::now_utc();
        let cert = std::path::Path::new("certs/broker.pem");
        assert!(!warn_if_expiring(cert, now + time::Duration::days(31), now));
        assert!(warn_if_expiring(cert, now + time::Duration::days(29), now));
        assert!(warn_if_expiring(cert, now - time::Duration::days(1), now));
    }
}

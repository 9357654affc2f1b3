//! `lienthong health`: asks a broker's `grpc.health.v1.Health/Check` whether it
//! serves, for container health checks and Kubernetes `exec` probes.
//!
//! Probes run without a member certificate (no probe should hold one), so the
//! client only verifies the broker against the federation CA; the broker
//! answers Health to clients without a certificate.

use anyhow::{Context, Result, bail};
use lienthong_cli::client::ConnectArgs;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

/// `lienthong health`: exits 0 when the broker reports SERVING, 1 otherwise.
#[derive(Debug, clap::Args)]
pub struct HealthArgs {
    /// Service to ask about; the empty default is the whole server (e.g.
    /// `lienthong.v1.Exchange` turns NOT_SERVING as soon as a shutdown starts).
    #[arg(long, default_value = "")]
    pub service: String,
    /// Give up (and fail) after this many seconds, connection included.
    #[arg(long, default_value_t = 5)]
    pub timeout_secs: u64,
}

/// Checks the broker at `conn.broker`, trusting `--ca` (or `--certs DIR`'s `ca.pem`).
pub async fn run(conn: &ConnectArgs, args: HealthArgs, json: bool) -> Result<()> {
    let ca = ca_file(conn)?;
    let config = client_config(&ca)?;
    let timeout = Duration::from_secs(args.timeout_secs.max(1));
    let status = tokio::time::timeout(timeout, check(&conn.broker, config, &args.service, timeout))
        .await
        .with_context(|| format!("{} did not answer the health check within {timeout:?}", conn.broker))??;
    let what = if args.service.is_empty() {
        "broker".to_string()
    } else {
        format!("service {}", args.service)
    };
    if json {
        let answer = serde_json::json!({
            "broker": conn.broker,
            "service": args.service,
            "status": status.as_str_name(),
        });
        println!("{answer}");
    }
    if status != ServingStatus::Serving {
        bail!("{what} at {} is {}", conn.broker, status.as_str_name());
    }
    if !json {
        println!("{what} at {} is SERVING", conn.broker);
    }
    Ok(())
}

fn ca_file(conn: &ConnectArgs) -> Result<PathBuf> {
    conn.ca
        .clone()
        .or_else(|| conn.certs.as_ref().map(|d| d.join("ca.pem")))
        .context("no CA certificate to verify the broker with: pass --ca FILE or --certs DIR (or LIENTHONG_CA)")
}

/// Verifies the broker against the CA roots and presents no client certificate.
fn client_config(ca: &Path) -> Result<Arc<rustls::ClientConfig>> {
    let pem = std::fs::read(ca).with_context(|| format!("cannot read the CA certificate {}", ca.display()))?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&pem) {
        let cert = cert.with_context(|| format!("{} is not valid PEM", ca.display()))?;
        roots
            .add(cert)
            .with_context(|| format!("{} holds an unusable CA certificate", ca.display()))?;
    }
    if roots.is_empty() {
        bail!("{} holds no PEM certificate", ca.display());
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

async fn check(
    url: &str,
    config: Arc<rustls::ClientConfig>,
    service: &str,
    timeout: Duration,
) -> Result<ServingStatus> {
    let channel = lienthong_tls::connect_channel(url, config, timeout).await?;
    let response = HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: service.to_string(),
        })
        .await
        .map_err(|s| anyhow::anyhow!("health check refused: {:?}: {}", s.code(), s.message()))?;
    Ok(response.into_inner().status())
}

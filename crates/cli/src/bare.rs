//! The bench's `bare` relay (`lienthong bench-bare`, hidden): the broker's
//! own protocol stack with none of its work, to split the broker's cost per
//! lookup into what the stack costs and what policy, validation and audit add.
//!
//! It is made of the parts a broker's lookup goes through on its way to a
//! register and back: the mutual-TLS acceptor (`lienthong_tls::incoming`),
//! tonic's server with the broker's HTTP/2 settings and telemetry, and the
//! broker's [`Relay`] (its register connections, breaker, retry budget and
//! `provider_call` span). It serves `RecordProvider.Fetch` and hands each
//! request to the one register it was given, as nginx `grpc_pass` does in the
//! `proxy` scenario: no membership, grant, schema, filtering or audit. It is
//! a measuring instrument, never a way to run a federation.

use crate::client::member_files;
use anyhow::{Context, Result, anyhow};
use lienthong::provider::v1::record_provider_server::{RecordProvider, RecordProviderServer};
use lienthong::provider::v1::{FetchRequest, FetchResponse};
use lienthong_broker::config::{RelayConfig, Telemetry};
use lienthong_broker::relay::{Relay, RelayError};
use lienthong_broker::telemetry::TelemetryOptions;
use lienthong_core::{Endpoint, MemberId};
use lienthong_tls::{AcceptOptions, ServerTls, TlsMaterial};
use opentelemetry::trace::SpanContext;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use time::OffsetDateTime;
use tokio::net::TcpListener;
use tonic::{Request, Response, Status};

/// The line `lienthong bench` waits for; the address follows it.
pub const READY: &str = "bare relay serving on ";

/// `lienthong bench-bare` options.
#[derive(Debug, Clone, clap::Args)]
#[command(
    about = "The bench's bare relay: the broker's TLS, gRPC and relay stack without its work (used by `bench`)",
    long_about = "The bench's bare relay: the broker's TLS, gRPC and relay stack without its work.\n\n\
        Serves RecordProvider.Fetch with mutual TLS and relays every call to one register through the \
        broker's relay, with no authorization, validation, filtering or audit. `lienthong bench --scenarios \
        bare` starts it to measure what the broker's protocol stack alone costs; it is not a way to run a \
        federation."
)]
pub struct BareArgs {
    /// Listen address.
    #[arg(long, default_value = "127.0.0.1:0")]
    pub listen: String,
    /// Certificates directory (ca.pem and the member certificate the relay serves and calls with).
    #[arg(long = "tls-dir")]
    pub tls_dir: PathBuf,
    /// Member whose certificate the relay presents on both sides (a register answers only the broker).
    #[arg(long, default_value = "broker")]
    pub member: String,
    /// Federation trust domain.
    #[arg(long, default_value = "lienthong.gov.vn")]
    pub trust_domain: String,
    /// The register's member id (its certificate must name it).
    #[arg(long)]
    pub provider: String,
    /// The register's URL, `https://host:port`.
    #[arg(long)]
    pub register: String,
    /// `RUST_LOG`-style filter (the broker's `telemetry.log_filter`); the bench
    /// gives its broker and this relay the same one.
    #[arg(long, default_value = "warn")]
    pub log_filter: String,
}

/// Runs the bare relay until the process is stopped.
pub async fn serve(args: BareArgs) -> Result<()> {
    lienthong_tls::install_crypto_provider();
    // The broker's logging and span set-up, so spans cost what they cost there.
    let telemetry = Telemetry {
        log_filter: args.log_filter.clone(),
        ..Telemetry::default()
    };
    let _telemetry = lienthong_broker::telemetry::init(&TelemetryOptions::from_config(&telemetry))?;
    let material = TlsMaterial::load(&member_files(&args.tls_dir, &args.member))?;
    let tls = Arc::new(ServerTls::new(&material, &args.trust_domain)?);
    let config = RelayConfig::default();
    let timeout = Duration::from_millis(config.provider_timeout_ms);
    let provider = MemberId::new(args.provider.clone()).map_err(|e| anyhow!("--provider: {e}"))?;
    let relay = Relay::new(material, args.trust_domain.clone(), config);
    relay.sync(
        &[Endpoint {
            id: "bench".into(),
            provider,
            url: args.register.clone(),
            created_at: OffsetDateTime::now_utc(),
        }],
        Default::default(),
    );
    let listener = TcpListener::bind(&args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let addr = listener.local_addr()?;
    let incoming = lienthong_tls::incoming(listener, tls, AcceptOptions::default());
    eprintln!("{READY}{addr}");
    tonic::transport::Server::builder()
        // As the broker's server (`lienthong_broker::server`).
        .initial_connection_window_size(Some(1 << 20))
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
        .add_service(RecordProviderServer::new(Bare {
            relay,
            provider: args.provider,
            timeout,
        }))
        .serve_with_incoming(incoming)
        .await
        .context("the bare relay stopped")
}

struct Bare {
    relay: Relay,
    provider: String,
    timeout: Duration,
}

#[tonic::async_trait]
impl RecordProvider for Bare {
    async fn fetch(&self, request: Request<FetchRequest>) -> Result<Response<FetchResponse>, Status> {
        let deadline = Instant::now() + self.timeout;
        let fetched = Box::pin(self.relay.fetch(
            &self.provider,
            request.into_inner(),
            deadline,
            false,
            &SpanContext::empty_context(),
        ))
        .await;
        match fetched {
            Ok(record) => match String::from_utf8(record.into()) {
                Ok(record_json) => Ok(Response::new(FetchResponse { record_json })),
                Err(_) => Err(Status::data_loss("the register's record is not UTF-8 text")),
            },
            Err(RelayError::NotFound) => Err(Status::not_found("the register holds no such record")),
            Err(RelayError::Rejected) => Err(Status::invalid_argument("the register could not use the query")),
            Err(RelayError::NotServed) => Err(Status::unimplemented("the register does not serve the record type")),
            Err(e @ (RelayError::Unavailable(_) | RelayError::NotAsked(_))) => Err(Status::unavailable(e.to_string())),
            Err(e @ RelayError::Deadline(_)) => Err(Status::deadline_exceeded(e.to_string())),
            Err(RelayError::Malformed(why)) => Err(Status::data_loss(why)),
        }
    }
}

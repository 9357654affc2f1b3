//! lienthong provider kit and demo registers.
//!
//! * [`kit`] (re-exported at the root): implement [`RecordSource`] and call
//!   [`serve`] to answer the broker's lookups over mutual TLS.
//! * [`demo`]: the civil status and judicial records registers with synthetic,
//!   deterministic data for [`demo::DEMO_CITIZENS`] citizens.
//! * [`testing`]: misbehaving providers for the broker's end-to-end tests.
//!
//! A minimal register (the README's "Connecting a register"):
//!
//! ```no_run
//! use std::sync::Arc;
//!
//! use lienthong_provider::{FetchContext, FetchError, ProviderConfig, RecordSource, serve};
//! use lienthong_tls::{ServerTls, TlsFiles, TlsMaterial};
//! use serde_json::{Value, json};
//!
//! /// The register's database (here, one parcel).
//! struct LandRegister;
//!
//! #[async_trait::async_trait]
//! impl RecordSource for LandRegister {
//!     fn record_types(&self) -> Vec<String> {
//!         vec!["land.parcel_owner".to_owned()]
//!     }
//!
//!     async fn fetch(&self, ctx: FetchContext) -> Result<Value, FetchError> {
//!         let Some(national_id) = ctx.query["national_id"].as_str() else {
//!             return Err(FetchError::InvalidQuery("national_id must be a string".to_owned()));
//!         };
//!         // Bound the database call by the broker's deadline: a later answer is lost.
//!         let lookup = async { (national_id == "001084004217").then(|| "HN-0042") };
//!         let found = match ctx.deadline {
//!             Some(deadline) => tokio::time::timeout_at(deadline.into(), lookup)
//!                 .await
//!                 .map_err(|_| FetchError::Unavailable("the database did not answer in time".to_owned()))?,
//!             None => lookup.await,
//!         };
//!         match found {
//!             // The whole record, valid against the record schema of ctx.schema_version.
//!             Some(parcel) => Ok(json!({ "national_id": national_id, "parcel": parcel })),
//!             // Never an empty object; never the national ID in a message.
//!             None => Err(FetchError::NotFound("no parcel for this subject".to_owned())),
//!         }
//!     }
//! }
//!
//! #[tokio::main]
//! async fn main() -> Result<(), Box<dyn std::error::Error>> {
//!     lienthong_tls::install_crypto_provider();
//!     // Issued with `lienthong certs issue --member land-registry --host land.gov.example`.
//!     let material = TlsMaterial::load(&TlsFiles {
//!         ca: "certs/ca.pem".into(),
//!         cert: "certs/land-registry.pem".into(),
//!         key: "certs/land-registry.key".into(),
//!     })?;
//!     let tls = Arc::new(ServerTls::new(&material, "gov.example")?);
//!     let mut config = ProviderConfig::new("gov.example");
//!     config.member = Some("land-registry".to_owned());
//!     let listener = tokio::net::TcpListener::bind("0.0.0.0:9101").await?;
//!     let shutdown = async {
//!         let _ = tokio::signal::ctrl_c().await;
//!     };
//!     serve(Arc::new(LandRegister), tls, config, listener, shutdown).await?;
//!     Ok(())
//! }
//! ```
#![forbid(unsafe_code)]

pub mod demo;
mod edge;
pub mod kit;
mod own_certificate;
pub mod testing;

pub use kit::{
    DEFAULT_MAX_ANSWER_BYTES, DEFAULT_MAX_CONCURRENT_STREAMS, DEFAULT_MAX_REQUEST_BYTES, DEFAULT_SHUTDOWN_GRACE,
    FetchContext, FetchError, GOODBYE, ProviderConfig, ProviderError, RecordSource, RefusedCertificates,
    read_refused_certificates, serve, trace_id_from_metadata,
};

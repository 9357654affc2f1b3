//! lienthong broker: the gRPC services (Admin, SchemaRegistry, Exchange,
//! Audit), mutual-TLS identity, the relay to providers, configuration and
//! server assembly.
#![forbid(unsafe_code)]

pub mod admin;
pub mod audit;
pub mod config;
pub mod convert;
pub mod error;
pub mod exchange;
pub mod expiry;
pub mod freshness;
pub mod metrics;
mod own_tls;
mod protocol;
pub mod reflection;
pub mod refusals;
pub mod relay;
pub mod schema;
pub mod server;
pub mod state;
pub mod telemetry;

pub use config::Config;
pub use error::BrokerError;
pub use server::{ServerHandle, StartError, start};

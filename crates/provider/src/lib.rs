//! lienthong provider kit and demo registers.
//!
//! * [`kit`] (re-exported at the root): implement [`RecordSource`] and call
//!   [`serve`] to answer the broker's lookups over mutual TLS.
//! * [`demo`]: the civil status and judicial records registers with synthetic,
//!   deterministic data for [`demo::DEMO_CITIZENS`] citizens.
//! * [`testing`]: misbehaving providers for the broker's end-to-end tests.
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

//! lienthong provider kit and demo registers.
//!
//! * [`kit`] (re-exported at the root): implement [`RecordSource`] and call
//!   [`serve`] to answer the broker's lookups over mutual TLS.
//! * [`demo`]: the civil status and judicial records registers with synthetic,
//!   deterministic data for [`demo::DEMO_CITIZENS`] citizens.
//! * [`testing`]: misbehaving providers for the broker's end-to-end tests.
//!
//! A minimal register is `examples/land_registry.rs`, shown whole in the
//! README's "Connecting a register" (a test keeps the two the same).
#![forbid(unsafe_code)]

pub mod demo;
mod edge;
pub mod kit;
mod own_certificate;
pub mod testing;

pub use kit::{
    DEFAULT_MAX_ANSWER_BYTES, DEFAULT_MAX_CONCURRENT_STREAMS, DEFAULT_MAX_REQUEST_BYTES, DEFAULT_SHUTDOWN_GRACE,
    FetchContext, FetchError, GOODBYE, ProviderConfig, ProviderError, RecordSource, RefusedCertificates,
    read_refused_certificates, serve, serve_announced, trace_id_from_metadata,
};

#[cfg(test)]
mod tests {
    /// What integrators copy is what compiles: the README shows the example whole.
    #[test]
    fn the_readme_shows_the_compiled_register_example_whole() {
        let readme = include_str!("../../../README.md");
        let example = include_str!("../examples/land_registry.rs");
        assert!(
            readme.contains(&format!("```rust\n{example}```")),
            "README.md's example in \"Connecting a register\" differs from crates/provider/examples/land_registry.rs: \
             put the file there whole"
        );
    }
}

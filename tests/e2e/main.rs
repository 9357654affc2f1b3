//! End-to-end tests of a whole federation: real mutual TLS with generated
//! certificates, real SQLite (and PostgreSQL where noted), real gRPC servers on
//! ephemeral ports, and the built `lienthong` binary where a separate process
//! is the point.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod admin_refusals;
mod audit_log;
mod authz;
mod bench;
mod cli_json;
mod deploy;
mod foundation;
mod harness;
mod health;
mod independent_verifier;
mod keyfiles;
mod lookup_races;
mod observability;
mod protocol;
mod refusals;
mod relay;
mod replicas;
mod revocation;
mod schemas;
mod snapshot_lag;
mod stock_client;
mod tls_lifecycle;

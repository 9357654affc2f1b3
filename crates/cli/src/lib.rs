//! The `lienthong` command line: serve, demo, certificates, administration,
//! lookups, audit and benchmarks. The binary is `src/main.rs`; this library
//! holds the pieces the end-to-end tests reuse (the in-process federation).
#![forbid(unsafe_code)]

pub mod bare;
pub mod bench;
pub mod client;
pub mod commands;
pub mod demo;
pub mod federation;

/// Domain role to wire role.
pub fn convert_role(r: lienthong_core::Role) -> lienthong::v1::Role {
    use lienthong::v1::Role as P;
    use lienthong_core::Role as D;
    match r {
        D::Admin => P::Admin,
        D::Provider => P::Provider,
        D::Consumer => P::Consumer,
        D::Integrator => P::Integrator,
        D::Auditor => P::Auditor,
        D::SubjectPortal => P::SubjectPortal,
    }
}

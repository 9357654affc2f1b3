//! The lienthong v1 wire contract: messages and gRPC clients/servers generated
//! from `proto/`.
#![forbid(unsafe_code)]
#![allow(clippy::all, missing_docs)]

/// Encoded `FileDescriptorSet` of every lienthong proto, for server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/lienthong_descriptor.bin"));

/// `lienthong.v1`: Admin, SchemaRegistry, Exchange, Audit.
pub mod v1 {
    tonic::include_proto!("lienthong.v1");
}

/// `lienthong.provider.v1`: the RecordProvider service registers implement.
pub mod provider {
    /// Version 1.
    pub mod v1 {
        tonic::include_proto!("lienthong.provider.v1");
    }
}

/// Fully qualified names of every service of the v1 contract.
pub const SERVICE_NAMES: &[&str] = &[
    "lienthong.v1.Admin",
    "lienthong.v1.SchemaRegistry",
    "lienthong.v1.Exchange",
    "lienthong.v1.Audit",
];

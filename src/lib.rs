//! The lienthong v1 wire contract: messages and gRPC clients/servers generated
//! from `proto/`.
#![forbid(unsafe_code)]
#![allow(clippy::all, missing_docs)]

/// Encoded `FileDescriptorSet` of every lienthong proto, for server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/lienthong_descriptor.bin"));

#[warn(clippy::all)]
pub mod health;

#[warn(clippy::all)]
pub mod protocol;

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

/// W3C trace context (`traceparent`, `tracestate`) carried in gRPC metadata,
/// the way the broker and the registers hand a trace on to each other.
pub mod trace_context {
    use opentelemetry::propagation::{Extractor, Injector};
    use tonic::metadata::{KeyRef, MetadataKey, MetadataMap, MetadataValue};

    /// Reads W3C trace-context headers from gRPC metadata.
    #[derive(Debug)]
    pub struct MetadataExtractor<'a>(pub &'a MetadataMap);

    impl Extractor for MetadataExtractor<'_> {
        fn get(&self, key: &str) -> Option<&str> {
            self.0.get(key).and_then(|v| v.to_str().ok())
        }

        fn keys(&self) -> Vec<&str> {
            self.0
                .keys()
                .filter_map(|k| match k {
                    KeyRef::Ascii(k) => Some(k.as_str()),
                    KeyRef::Binary(_) => None,
                })
                .collect()
        }
    }

    /// Writes W3C trace-context headers into gRPC metadata; values that are
    /// not valid metadata are dropped rather than sent half-formed.
    #[derive(Debug)]
    pub struct MetadataInjector<'a>(pub &'a mut MetadataMap);

    impl Injector for MetadataInjector<'_> {
        fn set(&mut self, key: &str, value: String) {
            if value.is_empty() {
                return;
            }
            if let (Ok(key), Ok(value)) = (
                MetadataKey::from_bytes(key.as_bytes()),
                MetadataValue::try_from(value.as_str()),
            ) {
                self.0.insert(key, value);
            }
        }
    }
}

/// Fully qualified names of every service of the v1 contract.
pub const SERVICE_NAMES: &[&str] = &[
    "lienthong.v1.Admin",
    "lienthong.v1.SchemaRegistry",
    "lienthong.v1.Exchange",
    "lienthong.v1.Audit",
];

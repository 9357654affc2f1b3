//! Compiles `proto/` with protox (pure Rust), so building needs no system `protoc`.

use prost::Message;
use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let files = [
        "proto/lienthong/v1/admin.proto",
        "proto/lienthong/v1/schema_registry.proto",
        "proto/lienthong/v1/exchange.proto",
        "proto/lienthong/v1/audit.proto",
        "proto/lienthong/provider/v1/provider.proto",
    ];
    let fds = protox::compile(files, ["proto"])?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    // compile_fds writes no descriptor set; reflection needs one.
    std::fs::write(out.join("lienthong_descriptor.bin"), fds.encode_to_vec())?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)?;
    Ok(())
}

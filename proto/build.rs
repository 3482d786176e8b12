//! Compiles `protos/grpc_service.proto` (and, with the `tonic` feature, KEDA's
//! `protos/externalscaler.proto`) without a system `protoc`: protox parses it into a
//! descriptor set in pure Rust, prost (and, with the `tonic` feature, tonic) generate the code.

use std::{env, error::Error, path::PathBuf};

fn main() -> Result<(), Box<dyn Error>> {
    let mut protos = vec!["protos/grpc_service.proto"];
    if cfg!(feature = "tonic") {
        protos.push("protos/externalscaler.proto");
    }
    for proto in &protos {
        println!("cargo:rerun-if-changed={proto}");
    }
    let descriptors = protox::compile(&protos, ["protos"])?;
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);

    #[cfg(feature = "tonic")]
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .out_dir(&out_dir)
        .compile_fds(descriptors)?;

    #[cfg(not(feature = "tonic"))]
    prost_build::Config::new()
        .out_dir(&out_dir)
        .compile_fds(descriptors)?;

    Ok(())
}

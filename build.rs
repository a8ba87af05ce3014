//! Generates the gRPC code at build time without a system `protoc`:
//! `protox` parses the proto in Rust, tonic-prost-build emits the code.
//! (Envoy's metrics service is served by hand in `src/sink/grpc.rs`; its
//! message types come from `envoy-types`.)
//!
//! Also writes the encoded FileDescriptorSets gRPC reflection serves.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");

    // KEDA's external scaler: server for activescale, client for the tests.
    let fds = protox::compile(["externalscaler.proto"], ["proto"])?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_fds(fds)?;

    // For gRPC reflection (src/reflection.rs): one descriptor set per gRPC
    // port, each with every file it imports, so `grpcurl describe` resolves
    // every message type. Source info keeps the proto comments, which
    // `grpcurl describe` prints. envoy-types ships no descriptors, so Envoy's
    // metrics service is compiled from its vendored sources
    // (proto/vendor/README.md).
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    for (file, proto) in [
        ("scaler_descriptor.bin", "externalscaler.proto"),
        (
            "sink_descriptor.bin",
            "envoy/service/metrics/v3/metrics_service.proto",
        ),
    ] {
        let mut compiler = protox::Compiler::new(["proto", "proto/vendor"])?;
        compiler.include_imports(true).include_source_info(true);
        compiler.open_files([proto])?;
        std::fs::write(out.join(file), compiler.encode_file_descriptor_set())?;
    }

    Ok(())
}

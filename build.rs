//! Generates the gRPC code at build time without a system `protoc`:
//! `protox` parses the proto in Rust, tonic-prost-build emits the code.
//! (Envoy's metrics service is served by hand in `src/sink/grpc.rs`; its
//! message types come from `envoy-types`.)

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");

    // KEDA's external scaler: server for activescale, client for the tests.
    let fds = protox::compile(["externalscaler.proto"], ["proto"])?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_fds(fds)?;

    Ok(())
}

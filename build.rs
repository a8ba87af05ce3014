//! Generates the gRPC code at build time without a system `protoc`:
//! `protox` parses the proto in Rust, tonic-prost-build emits the code.

use std::{env, path::PathBuf};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");

    // KEDA's external scaler: server for activescale, client for the tests.
    let fds = protox::compile(["externalscaler.proto"], ["proto"])?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_fds(fds)?;

    // Envoy's metrics service with a codec that hands the sink the raw message
    // bytes: the sink walks them and decodes only the few families it keeps,
    // instead of materialising every one of ~600 families per message. The
    // message types themselves come from `envoy-types`.
    let sink = tonic_build::manual::Service::builder()
        .name("MetricsService")
        .package("envoy.service.metrics.v3")
        .method(
            tonic_build::manual::Method::builder()
                .name("stream_metrics")
                .route_name("StreamMetrics")
                .input_type("crate::sink::wire::RawMessage")
                .output_type("envoy_types::pb::envoy::service::metrics::v3::StreamMetricsResponse")
                .codec_path("crate::sink::codec::RawCodec")
                .client_streaming()
                .build(),
        )
        .build();
    let out = PathBuf::from(env::var("OUT_DIR")?).join("raw");
    std::fs::create_dir_all(&out)?;
    tonic_build::manual::Builder::new()
        .build_client(false)
        .out_dir(&out)
        .compile(&[sink]);
    Ok(())
}

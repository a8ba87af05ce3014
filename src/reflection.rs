//! gRPC server reflection (`grpc.reflection.v1` and `v1alpha`) on both gRPC
//! ports, so `grpcurl <addr> list` and `describe` work without a proto file.
//!
//! Each port lists what it serves: its own service, health and reflection.
//! The descriptor sets are built by `build.rs` from `proto/` (and Envoy's
//! vendored protos for the sink); the health and reflection services bring
//! their own.

use tonic_reflection::server::{
    Builder, Error,
    v1::{ServerReflection, ServerReflectionServer},
    v1alpha,
};

/// KEDA's external scaler, as served on the scaler port.
pub const SCALER_DESCRIPTORS: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/scaler_descriptor.bin"));

/// Envoy's metrics service and everything it imports, as served on the sink port.
pub const SINK_DESCRIPTORS: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/sink_descriptor.bin"));

const HEALTH: &str = "grpc.health.v1.Health";
const REFLECTION_V1: &str = "grpc.reflection.v1.ServerReflection";
const REFLECTION_V1ALPHA: &str = "grpc.reflection.v1alpha.ServerReflection";

/// The two reflection services of one port: v1, and v1alpha for the clients
/// (older grpcurl, grpcui, IDE plugins) that only speak it.
pub struct Reflection<A, B> {
    pub v1: ServerReflectionServer<A>,
    pub v1alpha: v1alpha::ServerReflectionServer<B>,
}

/// Reflection for a port serving `service`, described by `descriptors`.
pub fn for_port(
    descriptors: &'static [u8],
    service: &str,
) -> Result<Reflection<impl ServerReflection, impl v1alpha::ServerReflection>, Error> {
    // Both versions list both, as the port serves both.
    let builder = || {
        [service, HEALTH, REFLECTION_V1, REFLECTION_V1ALPHA]
            .into_iter()
            .fold(Builder::configure(), Builder::with_service_name)
            .register_encoded_file_descriptor_set(descriptors)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    Ok(Reflection {
        // Each version's builder adds its own descriptor; the other one's is
        // registered here so that `describe` resolves every listed service.
        v1: builder()
            .register_encoded_file_descriptor_set(
                tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
            )
            .build_v1()?,
        v1alpha: builder()
            .register_encoded_file_descriptor_set(tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET)
            .build_v1alpha()?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_descriptor_sets_build() {
        for_port(SCALER_DESCRIPTORS, crate::scaler::SERVICE_NAME).unwrap();
        for_port(SINK_DESCRIPTORS, crate::sink::SERVICE_NAME).unwrap();
    }
}

//! gRPC server reflection on both gRPC ports, through tonic-reflection's own
//! client: what `grpcurl <addr> list` and `describe` ask.

mod common;

use std::{collections::HashSet, net::SocketAddr};

use common::{start_server, test_config};
use prost::Message;
use prost_types::FileDescriptorProto;
use tonic::transport::Channel;
use tonic_reflection::pb::{v1, v1alpha};

/// tonic-reflection's clients are generated without `connect`.
async fn channel(addr: SocketAddr) -> Channel {
    Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .expect("connect")
}

/// One request on a fresh reflection stream, v1.
async fn ask(
    addr: SocketAddr,
    request: v1::server_reflection_request::MessageRequest,
) -> v1::server_reflection_response::MessageResponse {
    let mut client = v1::server_reflection_client::ServerReflectionClient::new(channel(addr).await);
    let request = v1::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(request),
    };
    let mut responses = client
        .server_reflection_info(futures::stream::iter([request]))
        .await
        .expect("reflection call")
        .into_inner();
    responses
        .message()
        .await
        .expect("a response")
        .expect("not end of stream")
        .message_response
        .expect("a message response")
}

async fn list(addr: SocketAddr) -> HashSet<String> {
    use v1::server_reflection_response::MessageResponse;
    match ask(
        addr,
        v1::server_reflection_request::MessageRequest::ListServices(String::new()),
    )
    .await
    {
        MessageResponse::ListServicesResponse(list) => {
            list.service.into_iter().map(|s| s.name).collect()
        }
        other => panic!("list services: {other:?}"),
    }
}

async fn files(
    addr: SocketAddr,
    request: v1::server_reflection_request::MessageRequest,
) -> Vec<FileDescriptorProto> {
    use v1::server_reflection_response::MessageResponse;
    match ask(addr, request.clone()).await {
        MessageResponse::FileDescriptorResponse(r) => r
            .file_descriptor_proto
            .iter()
            .map(|bytes| FileDescriptorProto::decode(bytes.as_slice()).expect("a descriptor"))
            .collect(),
        other => panic!("{request:?}: {other:?}"),
    }
}

/// Resolves `symbol` and then, by file name as grpcurl does, every file it
/// imports; returns the file that defines `symbol`.
async fn describe(addr: SocketAddr, symbol: &str) -> FileDescriptorProto {
    use v1::server_reflection_request::MessageRequest;
    let found = files(addr, MessageRequest::FileContainingSymbol(symbol.into())).await;
    let mut seen: HashSet<String> = found.iter().filter_map(|f| f.name.clone()).collect();
    let mut todo: Vec<String> = found.iter().flat_map(|f| f.dependency.clone()).collect();
    while let Some(name) = todo.pop() {
        if !seen.insert(name.clone()) {
            continue;
        }
        for file in files(addr, MessageRequest::FileByFilename(name)).await {
            todo.extend(file.dependency);
        }
    }
    found.into_iter().next().expect("one file")
}

#[tokio::test]
async fn both_grpc_ports_list_and_describe_their_services() {
    let server = start_server(test_config()).await;
    let common = [
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
    ];
    for (addr, service) in [
        (server.scaler, "externalscaler.ExternalScaler"),
        (server.sink, "envoy.service.metrics.v3.MetricsService"),
    ] {
        let expected: HashSet<String> = common
            .iter()
            .chain([&service])
            .map(|s| s.to_string())
            .collect();
        assert_eq!(list(addr).await, expected, "services on {addr}");
        for listed in &expected {
            describe(addr, listed).await;
        }
    }

    let scaler = describe(server.scaler, "externalscaler.ExternalScaler").await;
    assert_eq!(scaler.package.as_deref(), Some("externalscaler"));
    let methods: Vec<&str> = scaler.service[0]
        .method
        .iter()
        .filter_map(|m| m.name.as_deref())
        .collect();
    assert!(methods.contains(&"GetMetrics"), "{methods:?}");
    assert!(methods.contains(&"StreamIsActive"), "{methods:?}");
    // The message types resolve too (`grpcurl describe externalscaler.GetMetricsRequest`).
    describe(server.scaler, "externalscaler.GetMetricsRequest").await;

    let sink = describe(server.sink, "envoy.service.metrics.v3.MetricsService").await;
    assert_eq!(
        sink.service[0].method[0].name.as_deref(),
        Some("StreamMetrics")
    );
    describe(server.sink, "io.prometheus.client.MetricFamily").await;

    server.stop().await.unwrap();
}

/// Older clients (grpcui, grpcurl before 1.9, IDE plugins) ask v1alpha only.
#[tokio::test]
async fn v1alpha_lists_the_scaler() {
    let server = start_server(test_config()).await;
    let mut client = v1alpha::server_reflection_client::ServerReflectionClient::new(
        channel(server.scaler).await,
    );
    let request = v1alpha::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(
            v1alpha::server_reflection_request::MessageRequest::ListServices(String::new()),
        ),
    };
    let response = client
        .server_reflection_info(futures::stream::iter([request]))
        .await
        .unwrap()
        .into_inner()
        .message()
        .await
        .unwrap()
        .unwrap();
    match response.message_response {
        Some(v1alpha::server_reflection_response::MessageResponse::ListServicesResponse(l)) => {
            assert!(
                l.service
                    .iter()
                    .any(|s| s.name == "externalscaler.ExternalScaler"),
                "{l:?}"
            );
        }
        other => panic!("{other:?}"),
    }
    server.stop().await.unwrap();
}

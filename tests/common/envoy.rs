//! A fake Istio sidecar: a real gRPC client generated from Envoy's published
//! protos (`envoy-types`), holding one `StreamMetrics` stream the way Envoy
//! does, with the identifier on the first message only.

use std::{
    future::Future,
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::metrics::v3::{
    StreamMetricsMessage, StreamMetricsResponse, metrics_service_client::MetricsServiceClient,
    stream_metrics_message::Identifier,
};
use envoy_types::pb::io::prometheus::client::{Gauge, Metric, MetricFamily, MetricType};
use tokio::{sync::mpsc, task::JoinHandle};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Response, Status};

#[allow(unused_imports)]
pub use super::builders::{POD_IP, inbound, istio_node, istio_node_at};

pub struct Sidecar {
    tx: Option<mpsc::Sender<StreamMetricsMessage>>,
    identifier: Option<Identifier>,
    pub task: JoinHandle<Result<Response<StreamMetricsResponse>, Status>>,
}

impl Sidecar {
    /// Opens a stream; `node` is sent with the first message.
    pub async fn connect(sink: SocketAddr, node: Node) -> Self {
        Self::connect_from(sink, None, node).await
    }

    /// [`Sidecar::connect`] from the local address `from` (any of
    /// 127.0.0.0/8 works on Linux): a sidecar of another pod IP.
    pub async fn connect_from(sink: SocketAddr, from: Option<IpAddr>, node: Node) -> Self {
        let mut client = MetricsServiceClient::new(channel(sink, from).await)
            .max_encoding_message_size(64 << 20);
        let (tx, rx) = mpsc::channel(16);
        let task =
            tokio::spawn(async move { client.stream_metrics(ReceiverStream::new(rx)).await });
        Self {
            tx: Some(tx),
            identifier: Some(Identifier { node: Some(node) }),
            task,
        }
    }

    /// Pushes one message with these families (gauges).
    pub async fn push(&mut self, families: Vec<MetricFamily>) {
        let msg = StreamMetricsMessage {
            identifier: self.identifier.take(),
            envoy_metrics: families,
        };
        self.tx
            .as_ref()
            .expect("stream open")
            .send(msg)
            .await
            .expect("sink stream closed");
    }

    /// Pushes gauges given as (stat name, value).
    pub async fn push_gauges(&mut self, gauges: &[(&str, f64)]) {
        self.push(gauges.iter().map(|(n, v)| gauge(n, *v)).collect())
            .await;
    }

    /// Ends the stream the way Envoy does on shutdown (half-close).
    pub async fn close(mut self) -> Result<Response<StreamMetricsResponse>, Status> {
        self.tx.take();
        self.task.await.expect("sidecar task")
    }
}

/// A connection to the sink from `from` (the default local address when `None`).
pub async fn channel(sink: SocketAddr, from: Option<IpAddr>) -> tonic::transport::Channel {
    tonic::transport::Endpoint::from_shared(format!("http://{sink}"))
        .expect("uri")
        .local_address(from)
        .connect()
        .await
        .expect("connect to sink")
}

/// A sidecar whose messages are bytes encoded by the test (another encoder
/// than Envoy's, or deliberately odd input), on one stream held open.
pub struct RawSidecar {
    tx: Option<mpsc::Sender<bytes::Bytes>>,
    pub task: JoinHandle<Result<Response<StreamMetricsResponse>, Status>>,
}

impl RawSidecar {
    pub async fn connect(sink: SocketAddr) -> Self {
        let mut grpc =
            tonic::client::Grpc::new(channel(sink, None).await).max_encoding_message_size(64 << 20);
        let (tx, rx) = mpsc::channel::<bytes::Bytes>(16);
        let task = tokio::spawn(async move {
            grpc.ready()
                .await
                .map_err(|e| Status::unknown(e.to_string()))?;
            let path = tonic::codegen::http::uri::PathAndQuery::from_static(
                "/envoy.service.metrics.v3.MetricsService/StreamMetrics",
            );
            grpc.client_streaming(
                tonic::Request::new(ReceiverStream::new(rx)),
                path,
                BytesCodec,
            )
            .await
        });
        Self { tx: Some(tx), task }
    }

    /// Sends one message, as encoded.
    pub async fn push(&mut self, message: impl Into<bytes::Bytes>) {
        self.tx
            .as_ref()
            .expect("stream open")
            .send(message.into())
            .await
            .expect("sink stream closed");
    }
}

pub fn gauge(name: &str, value: f64) -> MetricFamily {
    MetricFamily {
        name: Some(name.into()),
        r#type: Some(MetricType::Gauge as i32),
        metric: vec![Metric {
            gauge: Some(Gauge { value: Some(value) }),
            ..Default::default()
        }],
        ..Default::default()
    }
}

/// Awaits `check` becoming true, re-evaluating every few milliseconds; panics
/// after `limit`. For conditions that are only observable from outside (a
/// value over gRPC), this is the event wait.
pub async fn eventually<F, Fut>(limit: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if check().await {
            return;
        }
        if tokio::time::Instant::now() > deadline {
            panic!("timed out waiting for: {what}");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Sends raw bytes as StreamMetrics messages (for malformed input), returning
/// how the server ended the stream.
pub async fn send_raw(sink: SocketAddr, messages: Vec<bytes::Bytes>) -> Result<(), Status> {
    let channel = tonic::transport::Channel::from_shared(format!("http://{sink}"))
        .expect("uri")
        .connect()
        .await
        .expect("connect");
    let mut grpc = tonic::client::Grpc::new(channel).max_encoding_message_size(64 << 20);
    grpc.ready()
        .await
        .map_err(|e| Status::unknown(e.to_string()))?;
    let path = tonic::codegen::http::uri::PathAndQuery::from_static(
        "/envoy.service.metrics.v3.MetricsService/StreamMetrics",
    );
    let stream = tokio_stream::iter(messages);
    grpc.client_streaming::<_, bytes::Bytes, StreamMetricsResponse, _>(
        tonic::Request::new(stream),
        path,
        BytesCodec,
    )
    .await
    .map(drop)
}

/// Encodes requests as the bytes given; decodes responses with prost.
#[derive(Clone, Copy, Default)]
pub struct BytesCodec;

impl tonic::codec::Codec for BytesCodec {
    type Encode = bytes::Bytes;
    type Decode = StreamMetricsResponse;
    type Encoder = BytesCodec;
    type Decoder = BytesCodec;
    fn encoder(&mut self) -> Self::Encoder {
        BytesCodec
    }
    fn decoder(&mut self) -> Self::Decoder {
        BytesCodec
    }
}

impl tonic::codec::Encoder for BytesCodec {
    type Item = bytes::Bytes;
    type Error = Status;
    fn encode(
        &mut self,
        item: bytes::Bytes,
        dst: &mut tonic::codec::EncodeBuf<'_>,
    ) -> Result<(), Status> {
        bytes::BufMut::put(dst, item);
        Ok(())
    }
}

impl tonic::codec::Decoder for BytesCodec {
    type Item = StreamMetricsResponse;
    type Error = Status;
    fn decode(
        &mut self,
        src: &mut tonic::codec::DecodeBuf<'_>,
    ) -> Result<Option<StreamMetricsResponse>, Status> {
        use prost::Message;
        StreamMetricsResponse::decode(src)
            .map(Some)
            .map_err(|e| Status::internal(e.to_string()))
    }
}

//! Connections and streams to the server: sidecars sending pre-encoded
//! messages, KEDA's GetMetrics, and waiting on the server's counters.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use activescale::proto::{
    GetMetricsRequest, ScaledObjectRef, external_scaler_client::ExternalScalerClient,
};
use bytes::{BufMut, Bytes};
use envoy_types::pb::envoy::service::metrics::v3::{
    StreamMetricsMessage, StreamMetricsResponse, metrics_service_client::MetricsServiceClient,
};
use prost::Message;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{
    Status,
    codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder},
    codegen::http::uri::PathAndQuery,
    transport::{Channel, Endpoint},
};

use crate::{Res, common};

/// Envoy's default stats flush interval.
pub const ENVOY_FLUSH: Duration = Duration::from_secs(5);

/// Sends pre-encoded `StreamMetricsMessage` bytes as they are.
#[derive(Clone, Copy, Default)]
pub struct RawCodec;

pub struct RawEncoder;
pub struct ResponseDecoder;

impl Codec for RawCodec {
    type Encode = Bytes;
    type Decode = StreamMetricsResponse;
    type Encoder = RawEncoder;
    type Decoder = ResponseDecoder;
    fn encoder(&mut self) -> RawEncoder {
        RawEncoder
    }
    fn decoder(&mut self) -> ResponseDecoder {
        ResponseDecoder
    }
}

impl Encoder for RawEncoder {
    type Item = Bytes;
    type Error = Status;
    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for ResponseDecoder {
    type Item = StreamMetricsResponse;
    type Error = Status;
    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Self::Item>, Status> {
        StreamMetricsResponse::decode(src)
            .map(Some)
            .map_err(|e| Status::internal(e.to_string()))
    }
}

pub async fn connect(addr: SocketAddr) -> Res<Channel> {
    Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|e| e.to_string())?
        .tcp_nodelay(true)
        .initial_connection_window_size(Some(16 << 20))
        .initial_stream_window_size(Some(1 << 20))
        .connect()
        .await
        .map_err(|e| format!("connecting to {addr}: {e}"))
}

pub async fn connections(addr: SocketAddr, n: usize) -> Res<Vec<Channel>> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n.max(1) {
        out.push(connect(addr).await?);
    }
    Ok(out)
}

/// One sidecar stream: whatever is sent on the returned sender goes out as
/// one message. Dropping the sender half-closes the stream.
pub fn open_stream(channel: Channel, errors: Arc<AtomicU64>) -> mpsc::Sender<Bytes> {
    let (tx, rx) = mpsc::channel::<Bytes>(2);
    tokio::spawn(async move {
        let mut grpc = tonic::client::Grpc::new(channel).max_encoding_message_size(64 << 20);
        let path =
            PathAndQuery::from_static("/envoy.service.metrics.v3.MetricsService/StreamMetrics");
        if grpc.ready().await.is_err() {
            errors.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let r: Result<tonic::Response<StreamMetricsResponse>, Status> = grpc
            .client_streaming(tonic::Request::new(ReceiverStream::new(rx)), path, RawCodec)
            .await;
        if r.is_err() {
            errors.fetch_add(1, Ordering::Relaxed);
        }
    });
    tx
}

/// Same, with envoy-types' generated client (prost-encodes every message).
pub fn open_envoy_stream(
    channel: Channel,
    errors: Arc<AtomicU64>,
) -> mpsc::Sender<StreamMetricsMessage> {
    let (tx, rx) = mpsc::channel(2);
    tokio::spawn(async move {
        let mut client = MetricsServiceClient::new(channel).max_encoding_message_size(64 << 20);
        if client
            .stream_metrics(ReceiverStream::new(rx))
            .await
            .is_err()
        {
            errors.fetch_add(1, Ordering::Relaxed);
        }
    });
    tx
}

/// Waits (polling the server's counters) until `check` holds, or fails.
pub async fn wait_for(what: &str, limit: Duration, mut check: impl AsyncFnMut() -> bool) -> Res {
    let deadline = Instant::now() + limit;
    while !check().await {
        if Instant::now() > deadline {
            return Err(format!("timed out waiting for {what}"));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

/// Pushes one identifying message per pod (value `value` on `kept` gauges)
/// and keeps the streams open. Returns the senders, one per pod.
pub async fn populate(
    sink: SocketAddr,
    namespace: &str,
    app: &str,
    pods: usize,
    value: f64,
    conns: usize,
    errors: &Arc<AtomicU64>,
) -> Res<Vec<mpsc::Sender<Bytes>>> {
    let channels = connections(sink, conns.min(pods)).await?;
    let body = flush_body(value);
    let mut senders = Vec::with_capacity(pods);
    for i in 0..pods {
        let tx = open_stream(channels[i % channels.len()].clone(), errors.clone());
        let mut first =
            common::identifier_field(common::sidecar_node(namespace, &format!("{app}-{i}"), app));
        first.extend_from_slice(&body);
        tx.send(Bytes::from(first))
            .await
            .map_err(|_| "sidecar stream closed".to_string())?;
        senders.push(tx);
    }
    Ok(senders)
}

/// A sidecar's periodic message (no identifier): 600 families, one kept.
pub fn flush_body(value: f64) -> Bytes {
    Bytes::from(common::encode(
        None,
        common::istio_families(600, &common::kept(1, value)),
    ))
}

pub async fn get_metrics(
    client: &mut ExternalScalerClient<Channel>,
    so: &ScaledObjectRef,
) -> Res<f64> {
    let r = client
        .get_metrics(GetMetricsRequest {
            scaled_object_ref: Some(so.clone()),
            metric_name: "s0-active_requests".into(),
        })
        .await
        .map_err(|s| format!("GetMetrics: {s}"))?;
    r.into_inner()
        .metric_values
        .first()
        .map(|v| v.metric_value_float)
        .ok_or_else(|| "GetMetrics: no value".into())
}

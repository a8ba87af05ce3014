//! HTTP/2 floods on the sink: many streams, each declaring a large message and
//! never finishing it. See `main.rs`.

use std::{cell::Cell, convert::Infallible, net::SocketAddr, time::Duration};

use activescale::config::Config;

use bytes::Bytes;
use http_body_util::StreamBody;
use hyper::{body::Frame, client::conn::http2::SendRequest};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::{net::TcpStream, sync::mpsc, task::JoinHandle};
use tokio_stream::wrappers::ReceiverStream;

use envoy_types::pb::envoy::service::metrics::v3::{
    StreamMetricsMessage, stream_metrics_message::Identifier,
};
use prost::Message;

use crate::common::{envoy::*, *};

const WAIT: Duration = Duration::from_secs(60);
const STREAM_METRICS: &str = "/envoy.service.metrics.v3.MetricsService/StreamMetrics";

type FrameTx = mpsc::Sender<Result<Frame<Bytes>, Infallible>>;
type Body = StreamBody<ReceiverStream<Result<Frame<Bytes>, Infallible>>>;

/// A raw HTTP/2 connection to the sink: what a hostile client drives by hand.
async fn connection(sink: SocketAddr) -> SendRequest<Body> {
    let tcp = TcpStream::connect(sink).await.expect("connect to sink");
    let (send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
            .await
            .expect("HTTP/2 handshake");
    tokio::spawn(conn);
    send
}

/// Opens a `StreamMetrics` stream; returns the body's sender (kept open) and
/// the response's `grpc-status`, once it comes.
async fn open_stream(
    send: &mut SendRequest<Body>,
    sink: SocketAddr,
) -> (FrameTx, JoinHandle<Option<String>>) {
    let (tx, rx) = mpsc::channel(64);
    let request = hyper::Request::post(format!("http://{sink}{STREAM_METRICS}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(StreamBody::new(ReceiverStream::new(rx)))
        .expect("request");
    send.ready().await.expect("connection ready");
    let response = send.send_request(request);
    let status = tokio::spawn(async move {
        let response = response.await.ok()?;
        // An error ends the stream trailers-only: the status is a header.
        let status = response.headers().get("grpc-status")?;
        Some(status.to_str().ok()?.to_string())
    });
    (tx, status)
}

/// A gRPC prefix declaring `len` bytes, then `sent` bytes of it in 16 KiB frames.
async fn start_message(tx: &FrameTx, len: u32, sent: usize) {
    let mut prefix = vec![0u8];
    prefix.extend_from_slice(&len.to_be_bytes());
    let _ = tx.send(Ok(Frame::data(Bytes::from(prefix)))).await;
    let chunk = Bytes::from(vec![7u8; 16 * 1024]);
    for _ in 0..sent / chunk.len() {
        // The sink stops reading when its budget is spent; then these wait
        // on HTTP/2 flow control, so do not wait for them here.
        if tx.try_send(Ok(Frame::data(chunk.clone()))).is_err() {
            return;
        }
    }
}

/// A value of the server's own `/metrics`, by its exposition line prefix.
async fn exported(server: &TestServer, name: &str) -> Option<f64> {
    let (_, text) = http_get(&server.http_url("/metrics")).await;
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
}

fn web() -> activescale::proto::ScaledObjectRef {
    so_ref(
        "shop",
        "web",
        &[("labelSelector", "app=web"), ("targetValue", "10")],
    )
}

/// A server whose sink may hold `budget` bytes of messages of at most
/// `max_message`, each whole within `timeout` (the default when `None`).
async fn budget_server(budget: usize, max_message: usize, timeout: Option<Duration>) -> TestServer {
    let mut c = test_config();
    c.sink.max_buffered_bytes = budget;
    c.sink.max_message_bytes = max_message;
    if let Some(timeout) = timeout {
        c.sink.message_timeout = timeout;
    }
    start_server(c).await
}

/// Awaits GetMetrics of `web()` answering `want`, for at most `limit`.
async fn await_web(
    scaler: &activescale::proto::external_scaler_client::ExternalScalerClient<
        tonic::transport::Channel,
    >,
    limit: Duration,
    what: &str,
    want: f64,
) {
    eventually(limit, what, || {
        let mut c = scaler.clone();
        async move { get_metric(&mut c, &web()).await.ok() == Some(want) }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unfinished_messages_are_held_to_the_budget_then_end_resource_exhausted() {
    const BUDGET: usize = 1 << 20;
    let server = budget_server(BUDGET, BUDGET, Some(Duration::from_secs(2))).await;

    // 4 connections x 50 streams x 64 KiB sent of a declared 1 MiB: 12.5 MiB
    // offered against a budget of 1 MiB.
    let mut streams = Vec::new();
    for _ in 0..4 {
        let mut send = connection(server.sink).await;
        for _ in 0..50 {
            let (tx, status) = open_stream(&mut send, server.sink).await;
            start_message(&tx, BUDGET as u32, 64 * 1024).await;
            streams.push((tx, status));
        }
    }

    // The budget fills up and never overflows.
    let peak = Cell::new(0.0f64);
    eventually(WAIT, "the budget is spent", || async {
        let held = exported(&server, "activescale_sink_buffered_bytes")
            .await
            .unwrap_or(0.0);
        peak.set(peak.get().max(held));
        held > (BUDGET - 64 * 1024) as f64
    })
    .await;
    let peak = peak.get();
    assert!(
        peak <= BUDGET as f64,
        "held {peak} bytes over a budget of {BUDGET}"
    );

    // The scaler keeps answering meanwhile, and so does the HTTP port.
    let mut scaler = server.scaler_client().await;
    let answer = get_metric(&mut scaler, &web()).await;
    assert!(answer.is_ok(), "GetMetrics during the flood: {answer:?}");
    assert_eq!(http_get(&server.http_url("/healthz")).await.0, 200);

    // Every flooding stream times out with RESOURCE_EXHAUSTED (8) ...
    for (tx, status) in streams {
        let status = tokio::time::timeout(WAIT, status)
            .await
            .expect("a stalled stream is ended by the server")
            .expect("status task");
        assert_eq!(
            status.as_deref(),
            Some("8"),
            "grpc-status of a stalled stream"
        );
        drop(tx);
    }
    // ... and gives its bytes back; the stalls are counted.
    eventually(WAIT, "the budget is given back", || async {
        exported(&server, "activescale_sink_buffered_bytes").await == Some(0.0)
    })
    .await;
    let stalled = exported(
        &server,
        "activescale_sink_stream_errors_total{reason=\"stalled\"}",
    )
    .await
    .unwrap_or(0.0);
    assert!(stalled >= 200.0, "stalled streams counted: {stalled}");

    // A real sidecar is served afterwards as before.
    let node = istio_node("shop", "web-1", &[("app", "web")], "web");
    let mut sidecar = Sidecar::connect(server.sink, node).await;
    sidecar.push_gauges(&[(&inbound(8080), 3.0)]).await;
    await_web(&scaler, WAIT, "the sidecar's value", 3.0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_connection_gets_at_most_its_stream_limit() {
    let server = start_server({
        let mut c = test_config();
        c.sink.max_concurrent_streams = 8;
        c
    })
    .await;
    let mut send = connection(server.sink).await;
    let mut streams = Vec::new();
    for _ in 0..20 {
        // The client learns the limit from the server's SETTINGS; streams
        // past it wait client-side. Open them without waiting.
        let (tx, rx) = mpsc::channel::<Result<Frame<Bytes>, Infallible>>(1);
        let request = hyper::Request::post(format!("http://{}{STREAM_METRICS}", server.sink))
            .header("content-type", "application/grpc")
            .body(StreamBody::new(ReceiverStream::new(rx)))
            .expect("request");
        send.ready().await.expect("connection ready");
        let response = send.send_request(request);
        streams.push((tx, tokio::spawn(response)));
    }
    eventually(WAIT, "8 streams open", || async {
        exported(&server, "activescale_sink_streams_open").await == Some(8.0)
    })
    .await;
    // Another look after the server has had every chance to take more.
    let mut ops = server.scaler_client().await;
    let _ = get_metric(&mut ops, &web()).await;
    assert_eq!(
        exported(&server, "activescale_sink_streams_open").await,
        Some(8.0),
        "streams past sink_max_concurrent_streams were opened"
    );
}

#[test]
fn budget_and_stream_settings_outside_their_range_are_refused_naming_the_setting() {
    for (key, value) in [
        ("sink_max_buffered_bytes", "1000"),
        ("sink_max_concurrent_streams", "0"),
        ("sink_message_timeout", "0s"),
    ] {
        let e = Config::load_from(None, std::iter::empty(), &[(key, value.to_string())])
            .unwrap_err()
            .to_string();
        assert!(e.contains(key) && e.contains(value), "{e}");
    }
    let e = Config::load_from(
        None,
        std::iter::empty(),
        &[
            ("sink_max_buffered_bytes", (2u64 << 20).to_string()),
            ("max_message_bytes", (4u64 << 20).to_string()),
        ],
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("max_message_bytes"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sidecars_flushing_at_once_past_the_budget_are_all_stored() {
    // 24 sidecars' ~200 KB messages all in the middle of arriving at once
    // (first halves sent, then second halves), against a budget of 1 MiB:
    // together five times what the sink may hold. Granted frame by frame,
    // every stream held a part of the budget and waited for more until all
    // of them stalled; admitted whole, they take turns and all finish.
    const BUDGET: usize = 1 << 20;
    const SIDECARS: usize = 24;
    let server = budget_server(BUDGET, BUDGET, None).await;
    let mut streams = Vec::new();
    for i in 0..SIDECARS {
        // Outbound families, which the sink reads and skips, make up the size.
        let mut families: Vec<_> = (0..2_500)
            .map(|f| {
                gauge(
                    &format!("cluster.outbound|80||svc-{f:05}.shop.svc.upstream_rq_active"),
                    1.0,
                )
            })
            .collect();
        families.push(gauge(&inbound(8080), 1.0));
        let message = StreamMetricsMessage {
            identifier: Some(Identifier {
                node: Some(istio_node(
                    "shop",
                    &format!("web-{i}"),
                    &[("app", "web")],
                    "web",
                )),
            }),
            envoy_metrics: families,
        }
        .encode_to_vec();
        assert!(message.len() > 150_000, "{}", message.len());
        let mut framed = vec![0u8];
        framed.extend_from_slice(&(message.len() as u32).to_be_bytes());
        framed.extend_from_slice(&message);
        let mut send = connection(server.sink).await;
        let (tx, status) = open_stream(&mut send, server.sink).await;
        let mut framed = Bytes::from(framed);
        let first = framed.split_to(framed.len() / 2);
        tx.send(Ok(Frame::data(first))).await.expect("first half");
        streams.push((tx, framed, status, send));
    }
    for (tx, second, ..) in &streams {
        tx.send(Ok(Frame::data(second.clone())))
            .await
            .expect("second half");
    }

    let scaler = server.scaler_client().await;
    await_web(&scaler, WAIT, "every sidecar's value", SIDECARS as f64).await;
    let stalled = exported(
        &server,
        "activescale_sink_stream_errors_total{reason=\"stalled\"}",
    )
    .await
    .unwrap_or(0.0);
    assert_eq!(stalled, 0.0, "no sidecar's stream stalled");
    // Ending the streams, each gets OK.
    for (tx, _, status, _send) in streams {
        drop(tx);
        let status = tokio::time::timeout(WAIT, status)
            .await
            .expect("the stream ends")
            .expect("status task");
        assert_eq!(status, None, "an OK stream carries its status in trailers");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn declaring_the_budget_without_sending_it_holds_it_only_briefly() {
    // Admission is whole, so a prefix alone is charged the length it
    // declares. Four streams declaring the whole budget and sending nothing
    // more would each keep a real sidecar waiting the full 30 s message
    // timeout; held to the pace, each loses its grant after 1/16 of it.
    const BUDGET: usize = 1 << 20;
    let server = budget_server(BUDGET, BUDGET, Some(Duration::from_secs(30))).await;
    let mut send = connection(server.sink).await;
    let mut greedy = Vec::new();
    for _ in 0..4 {
        let (tx, status) = open_stream(&mut send, server.sink).await;
        start_message(&tx, BUDGET as u32, 0).await;
        greedy.push((tx, status));
    }
    eventually(WAIT, "a declaration is charged", || async {
        exported(&server, "activescale_sink_buffered_bytes").await == Some(BUDGET as f64)
    })
    .await;

    let node = istio_node("shop", "web-1", &[("app", "web")], "web");
    let mut sidecar = Sidecar::connect(server.sink, node).await;
    sidecar.push_gauges(&[(&inbound(8080), 3.0)]).await;
    let scaler = server.scaler_client().await;
    // Well inside one message timeout, let alone four.
    await_web(&scaler, Duration::from_secs(20), "the sidecar's value", 3.0).await;
    for (tx, status) in greedy {
        let status = tokio::time::timeout(WAIT, status)
            .await
            .expect("a greedy stream is ended")
            .expect("status task");
        assert_eq!(status.as_deref(), Some("8"), "RESOURCE_EXHAUSTED");
        drop(tx);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_pod_holds_at_most_one_messages_share_of_the_budget() {
    // Streams declaring 64 KiB are inside the pace's slack, so each holds its
    // grant for the whole message timeout while sending nothing. Twenty of
    // them from one address would hold the whole 1 MiB budget for 30 s; the
    // address's share is one largest message (256 KiB), so the rest wait
    // holding nothing and another pod's sidecar is admitted at once.
    const BUDGET: usize = 1 << 20;
    const SHARE: usize = 256 << 10;
    let server = budget_server(BUDGET, SHARE, Some(Duration::from_secs(30))).await;
    let mut send = connection(server.sink).await;
    let mut greedy = Vec::new();
    for _ in 0..20 {
        let (tx, status) = open_stream(&mut send, server.sink).await;
        start_message(&tx, 64 << 10, 0).await;
        greedy.push((tx, status));
    }
    eventually(WAIT, "the greedy pod's share is held", || async {
        exported(&server, "activescale_sink_buffered_bytes").await == Some(SHARE as f64)
    })
    .await;

    let node = istio_node_at("127.0.0.2", "shop", "web-1", &[("app", "web")], "web");
    let from = Some(std::net::IpAddr::from([127, 0, 0, 2]));
    let mut sidecar = Sidecar::connect_from(server.sink, from, node).await;
    sidecar.push_gauges(&[(&inbound(8080), 3.0)]).await;
    let scaler = server.scaler_client().await;
    await_web(
        &scaler,
        Duration::from_secs(20),
        "the other pod's value",
        3.0,
    )
    .await;
    assert_eq!(
        exported(&server, "activescale_sink_buffered_bytes").await,
        Some(SHARE as f64),
        "the greedy pod still holds only its share"
    );
}

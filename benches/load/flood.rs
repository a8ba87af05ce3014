//! `flood`: what a hostile client can make the sink hold. C connections x S
//! streams each send a gRPC prefix declaring a large message, then part of
//! it, and never finish. Reports the server's RSS growth and the bytes its
//! budget says it holds (`activescale_sink_buffered_bytes`).

use std::{convert::Infallible, net::SocketAddr, time::Duration};

use bytes::Bytes;
use clap::Args;
use http_body_util::StreamBody;
use hyper::body::Frame;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::json;
use tokio::{net::TcpStream, sync::mpsc};
use tokio_stream::wrappers::ReceiverStream;

use crate::{
    Cli, Res,
    report::{emit, server_metric, status_kib},
    sidecars::wait_for,
};

const STREAM_METRICS: &str = "/envoy.service.metrics.v3.MetricsService/StreamMetrics";

#[derive(Args)]
pub struct FloodArgs {
    #[arg(long)]
    sink: SocketAddr,
    /// HTTP/2 connections.
    #[arg(long, default_value_t = 40)]
    connections: usize,
    /// Total streams, spread over the connections.
    #[arg(long, default_value_t = 4000)]
    streams: usize,
    /// Message length each prefix declares. The default is the most a stream
    /// can declare beyond what it sends (`--sent`) and keep its grant for the
    /// whole message timeout: the sink's pace allows 64 KiB ahead. Declaring
    /// 16 MiB, a stream is cut within a fraction of a second.
    #[arg(long, default_value_t = (256 + 64) << 10)]
    declared: u32,
    /// Bytes of it each stream sends.
    #[arg(long, default_value_t = 256 << 10)]
    sent: usize,
    /// Seconds to hold the flood before measuring (the server must not free
    /// it by timing streams out first: keep it under sink_message_timeout).
    #[arg(long, default_value_t = 5.0)]
    hold: f64,
}

type Body = StreamBody<ReceiverStream<Result<Frame<Bytes>, Infallible>>>;

pub async fn flood(cli: &Cli, a: &FloodArgs) -> Res {
    let rss_before = cli.pid.and_then(|p| status_kib(p, "VmRSS"));
    let per_conn = a.streams.div_ceil(a.connections.max(1));
    let chunk = Bytes::from(vec![7u8; 16 * 1024]);
    let mut senders = Vec::new();
    let mut opened = 0;
    for _ in 0..a.connections {
        let tcp = TcpStream::connect(a.sink)
            .await
            .map_err(|e| e.to_string())?;
        let (mut send, conn) = hyper::client::conn::http2::handshake::<_, _, Body>(
            TokioExecutor::new(),
            TokioIo::new(tcp),
        )
        .await
        .map_err(|e| e.to_string())?;
        tokio::spawn(conn);
        for _ in 0..per_conn.min(a.streams - opened) {
            let (tx, rx) = mpsc::channel(a.sent / chunk.len() + 2);
            let request = hyper::Request::post(format!("http://{}{STREAM_METRICS}", a.sink))
                .header("content-type", "application/grpc")
                .body(StreamBody::new(ReceiverStream::new(rx)))
                .map_err(|e| e.to_string())?;
            send.ready().await.map_err(|e| e.to_string())?;
            let response = send.send_request(request);
            tokio::spawn(async move {
                let _ = response.await;
            });
            let mut prefix = vec![0u8];
            prefix.extend_from_slice(&a.declared.to_be_bytes());
            let _ = tx.try_send(Ok(Frame::data(Bytes::from(prefix))));
            for _ in 0..a.sent / chunk.len() {
                let _ = tx.try_send(Ok(Frame::data(chunk.clone())));
            }
            senders.push(tx);
            opened += 1;
        }
    }
    // The flood has reached the server once its streams are open.
    let want = opened as f64;
    wait_for(
        "the flood's streams open",
        Duration::from_secs(60),
        async || {
            server_metric(cli.http, "activescale_sink_streams_open")
                .await
                .is_some_and(|n| n >= want)
                || cli.http.is_none()
        },
    )
    .await?;
    tokio::time::sleep(Duration::from_secs_f64(a.hold)).await;
    let rss_after = cli.pid.and_then(|p| status_kib(p, "VmRSS"));
    let held = server_metric(cli.http, "activescale_sink_buffered_bytes").await;
    let open = server_metric(cli.http, "activescale_sink_streams_open").await;
    emit(
        cli,
        json!({
            "figure": "flood",
            "connections": a.connections,
            "streams": opened,
            "declared_bytes": a.declared,
            "sent_bytes_per_stream": a.sent,
            "offered_mib": (opened * a.sent) as f64 / (1 << 20) as f64,
            "streams_open": open,
            "budget_held_mib": held.map(|h| h / (1 << 20) as f64),
            "server_rss_kib": rss_after,
            "rss_growth_mib": rss_before.zip(rss_after).map(|(b, a2)| (a2 as f64 - b as f64) / 1024.0),
            "server_vmhwm_kib": cli.pid.and_then(|p| status_kib(p, "VmHWM")),
        }),
    );
    drop(senders);
    Ok(())
}

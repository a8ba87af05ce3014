//! `sink`: N sidecar streams over C HTTP/2 connections push a message of F
//! families every interval (0 = as fast as the server takes them).

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use clap::Args;
use envoy_types::pb::envoy::service::metrics::v3::StreamMetricsMessage;
use serde_json::json;

use crate::{
    Cli, Res, common,
    report::{cpu_between, emit, server_metric, snap, status_kib},
    sidecars::{connections, open_envoy_stream, open_stream, wait_for},
};

#[derive(Args)]
pub struct SinkArgs {
    #[arg(long)]
    sink: SocketAddr,
    /// Sidecar streams (one pod each).
    #[arg(long, default_value_t = 1000)]
    streams: usize,
    /// TCP connections the streams are spread over (Envoys have one each).
    #[arg(long)]
    connections: Option<usize>,
    /// Push interval per stream in ms; 0 pushes as fast as the server takes.
    #[arg(long, default_value_t = 5000)]
    interval_ms: u64,
    /// Measured seconds (after every stream has identified itself).
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    #[arg(long, default_value_t = 600)]
    families: usize,
    /// Kept families per message (1-4).
    #[arg(long, default_value_t = 2)]
    kept: usize,
    /// Re-encode every message with envoy-types' generated client.
    #[arg(long)]
    envoy_client: bool,
    /// Every stream flushes at the same moment (Envoys started together),
    /// instead of spreading the first pushes over one interval.
    #[arg(long)]
    aligned: bool,
}

pub async fn sink(cli: &Cli, a: &SinkArgs) -> Res {
    let conns = a.connections.unwrap_or(a.streams.min(1000));
    // Before connecting too: a connection's own cost (HTTP/2 codec buffers,
    // its task) is part of what a sidecar costs the sink.
    let rss_unconnected = cli.pid.and_then(|p| status_kib(p, "VmRSS"));
    let channels = connections(a.sink, conns).await?;
    let errors = Arc::new(AtomicU64::new(0));
    let families = common::istio_families(a.families, &common::kept(a.kept, 1.0));
    let body = Bytes::from(common::encode(None, families.clone()));
    let sent = Arc::new(AtomicU64::new(0));
    let rss_before = cli.pid.and_then(|p| status_kib(p, "VmRSS"));
    let messages_before = server_metric(cli.http, "activescale_sink_messages_total")
        .await
        .unwrap_or(0.0);
    let interval = Duration::from_millis(a.interval_ms);
    let start = tokio::time::Instant::now();
    for i in 0..a.streams {
        let channel = channels[i % channels.len()].clone();
        let node = common::sidecar_node(&format!("load-{}", i % 50), &format!("web-{i}"), "web");
        // Spread the first pushes over one interval, like Envoys started at
        // different times.
        let offset = if a.aligned {
            Duration::ZERO
        } else {
            interval.mul_f64(i as f64 / a.streams as f64)
        };
        let (sent, errors) = (sent.clone(), errors.clone());
        if a.envoy_client {
            let tx = open_envoy_stream(channel, errors);
            let families = families.clone();
            tokio::spawn(async move {
                let mut identifier = Some(envoy_types::pb::envoy::service::metrics::v3::stream_metrics_message::Identifier { node: Some(node) });
                let mut next = start + offset;
                loop {
                    tokio::time::sleep_until(next).await;
                    let msg = StreamMetricsMessage {
                        identifier: identifier.take(),
                        envoy_metrics: families.clone(),
                    };
                    if tx.send(msg).await.is_err() {
                        return;
                    }
                    sent.fetch_add(1, Ordering::Relaxed);
                    next += interval;
                }
            });
        } else {
            let tx = open_stream(channel, errors);
            let mut first = common::identifier_field(node);
            first.extend_from_slice(&body);
            let (first, body) = (Bytes::from(first), body.clone());
            tokio::spawn(async move {
                tokio::time::sleep_until(start + offset).await;
                if tx.send(first).await.is_err() {
                    return;
                }
                sent.fetch_add(1, Ordering::Relaxed);
                let mut next = start + offset + interval;
                loop {
                    tokio::time::sleep_until(next).await;
                    if tx.send(body.clone()).await.is_err() {
                        return;
                    }
                    sent.fetch_add(1, Ordering::Relaxed);
                    next += interval;
                }
            });
        }
    }
    // Every stream has identified itself (its first message arrived).
    let streams = a.streams as f64;
    wait_for(
        "every sidecar's first message",
        Duration::from_secs(120),
        async || {
            server_metric(cli.http, "activescale_sink_messages_total")
                .await
                .is_some_and(|m| m - messages_before >= streams)
                || (cli.http.is_none() && sent.load(Ordering::Relaxed) >= a.streams as u64)
        },
    )
    .await?;
    let m0 = server_metric(cli.http, "activescale_sink_messages_total").await;
    let s0 = sent.load(Ordering::Relaxed);
    let p0 = snap(cli.pid);
    let t0 = Instant::now();
    tokio::time::sleep(Duration::from_secs_f64(a.duration)).await;
    let m1 = server_metric(cli.http, "activescale_sink_messages_total").await;
    let s1 = sent.load(Ordering::Relaxed);
    let p1 = snap(cli.pid);
    let elapsed = t0.elapsed().as_secs_f64();
    let kept_ok = server_metric(cli.http, "activescale_pods_tracked").await;
    // Messages the server processed (its counter) when it is reachable.
    let messages = match (m0, m1) {
        (Some(a), Some(b)) => b - a,
        _ => (s1 - s0) as f64,
    };
    let cpu = cpu_between(p0, p1);
    let rss_after = cli.pid.and_then(|p| status_kib(p, "VmRSS"));
    let msgs_per_s = messages / elapsed;
    let fam_per_s = msgs_per_s * a.families as f64;
    let offered = if a.interval_ms == 0 {
        None
    } else {
        Some(a.streams as f64 * 1000.0 / a.interval_ms as f64)
    };
    emit(
        cli,
        json!({
            "figure": "sink",
            "streams": a.streams,
            "connections": channels.len(),
            "interval_ms": a.interval_ms,
            "families_per_message": a.families,
            "kept_per_message": a.kept,
            "envoy_client": a.envoy_client,
            "aligned": a.aligned,
            "seconds": elapsed,
            "messages_per_s": msgs_per_s,
            "offered_messages_per_s": offered,
            "families_per_s": fam_per_s,
            "server_cpu_s": cpu,
            "server_cores_used": cpu.map(|c| c / elapsed),
            "families_per_cpu_s": cpu.filter(|c| *c > 0.0).map(|c| messages * a.families as f64 / c),
            "cpu_s_per_1000_pods_per_flush": cpu.filter(|_| messages > 0.0).map(|c| c / (messages / 1000.0)),
            "server_rss_kib": rss_after,
            // Growth from the streams and their messages, the connections
            // already open: the figure earlier rounds report.
            "rss_kib_per_stream": rss_before.zip(rss_after).map(|(b, a2)| (a2 as f64 - b as f64) / streams),
            // Growth from before the connections were opened.
            "rss_kib_per_stream_with_connections": rss_unconnected.zip(rss_after).map(|(b, a2)| (a2 as f64 - b as f64) / streams),
            "server_vmhwm_kib": cli.pid.and_then(|p| status_kib(p, "VmHWM")),
            "pods_tracked": kept_ok,
            "stream_errors": errors.load(Ordering::Relaxed),
        }),
    );
    Ok(())
}

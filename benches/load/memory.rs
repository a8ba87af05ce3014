//! `memory`: P pods created by a few streams that re-identify on every
//! message (the sink takes an identifier on any message); server RSS per
//! tracked pod.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use clap::Args;
use serde_json::json;

use crate::{
    Cli, Res, common,
    report::{emit, server_metric, status_kib},
    sidecars::{connections, open_stream, wait_for},
};

#[derive(Args)]
pub struct MemoryArgs {
    #[arg(long)]
    sink: SocketAddr,
    #[arg(long, default_value_t = 100_000)]
    pods: usize,
    /// Streams that create the pods (each re-identifies per message).
    #[arg(long, default_value_t = 100)]
    streams: usize,
    /// Pods per namespace.
    #[arg(long, default_value_t = 1000)]
    per_namespace: usize,
    /// Pods per workload (label set).
    #[arg(long, default_value_t = 10)]
    per_workload: usize,
}

pub async fn memory(cli: &Cli, a: &MemoryArgs) -> Res {
    let pid = cli.pid.ok_or("memory needs --pid")?;
    let errors = Arc::new(AtomicU64::new(0));
    let channels = connections(a.sink, a.streams.min(16)).await?;
    let senders: Vec<_> = (0..a.streams)
        .map(|i| open_stream(channels[i % channels.len()].clone(), errors.clone()))
        .collect();
    // The streams are open and idle: what follows is the pods.
    let tracked_before = server_metric(cli.http, "activescale_pods_tracked")
        .await
        .unwrap_or(0.0);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let rss_before = status_kib(pid, "VmRSS").ok_or("no VmRSS")?;
    let body = common::encode(
        None,
        vec![common::istio_families(1, &common::kept(1, 1.0)).remove(0)],
    );
    let mut tasks = Vec::new();
    for (s, tx) in senders.iter().enumerate() {
        let (tx, body, a_pods, streams) = (tx.clone(), body.clone(), a.pods, a.streams);
        let (per_ns, per_wl) = (a.per_namespace, a.per_workload);
        tasks.push(tokio::spawn(async move {
            let mut i = s;
            while i < a_pods {
                let ns = format!("mem-{}", i / per_ns);
                let app = format!("app-{}", i / per_wl);
                let mut msg = common::identifier_field(common::sidecar_node(
                    &ns,
                    &format!("{app}-{i}"),
                    &app,
                ));
                msg.extend_from_slice(&body);
                if tx.send(Bytes::from(msg)).await.is_err() {
                    return;
                }
                i += streams;
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    let want = tracked_before + a.pods as f64;
    wait_for(
        &format!("{} pods tracked", a.pods),
        Duration::from_secs(300),
        async || {
            server_metric(cli.http, "activescale_pods_tracked")
                .await
                .is_some_and(|n| n >= want)
        },
    )
    .await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let rss_after = status_kib(pid, "VmRSS").ok_or("no VmRSS")?;
    emit(
        cli,
        json!({
            "figure": "memory",
            "pods": a.pods,
            "streams": a.streams,
            "pods_per_namespace": a.per_namespace,
            "pods_per_workload": a.per_workload,
            "rss_before_kib": rss_before,
            "rss_after_kib": rss_after,
            "vmhwm_kib": status_kib(pid, "VmHWM"),
            "bytes_per_pod": (rss_after as f64 - rss_before as f64) * 1024.0 / a.pods as f64,
            "stream_errors": errors.load(Ordering::Relaxed),
        }),
    );
    drop(senders);
    Ok(())
}

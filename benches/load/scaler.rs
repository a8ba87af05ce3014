//! `scaler`: P pods pushed once, then concurrent KEDA clients calling
//! GetMetrics (or IsActive) in a closed loop or at fixed offered loads.

use std::{
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use activescale::proto::external_scaler_client::ExternalScalerClient;
use clap::Args;
use serde_json::json;

use crate::{
    Cli, Res, common,
    report::{cpu_between, emit, nanos, new_hist, server_metric, snap, status_kib, us},
    sidecars::{ENVOY_FLUSH, connections, flush_body, get_metrics, populate, wait_for},
};

#[derive(Args)]
pub struct ScalerArgs {
    #[arg(long)]
    sink: SocketAddr,
    #[arg(long)]
    scaler: SocketAddr,
    /// Pods of the queried workload.
    #[arg(long, default_value_t = 1000)]
    pods: usize,
    /// Concurrent-client counts to measure, comma separated.
    #[arg(long, default_value = "1,64", value_delimiter = ',')]
    clients: Vec<usize>,
    /// HTTP/2 connections the clients share.
    #[arg(long, default_value_t = 4)]
    connections: usize,
    /// Seconds per client count.
    #[arg(long, default_value_t = 5.0)]
    duration: f64,
    /// getmetrics | isactive
    #[arg(long, default_value = "getmetrics")]
    method: String,
    /// Offered loads to measure per client count, in calls/s over all
    /// clients, comma separated. 0 = closed loop: each client calls again as
    /// soon as it has its answer (the server's saturation throughput). A rate
    /// is an open loop: each client's calls are due on a fixed schedule, and a
    /// call that starts late because the previous one was still running
    /// counts from when it was due (no coordinated omission).
    #[arg(long, default_value = "0", value_delimiter = ',')]
    rates: Vec<f64>,
}

pub async fn scaler(cli: &Cli, a: &ScalerArgs) -> Res {
    let errors = Arc::new(AtomicU64::new(0));
    let ns = format!("scale-{}", a.pods);
    let messages_before = server_metric(cli.http, "activescale_sink_messages_total").await;
    let sidecars = populate(a.sink, &ns, "web", a.pods, 1.0, 1000, &errors).await?;
    let so = common::so_ref(
        &ns,
        "web",
        &[("labelSelector", "app=web"), ("targetValue", "10")],
    );
    let channels = connections(a.scaler, a.connections).await?;
    let mut probe = ExternalScalerClient::new(channels[0].clone());
    let want = a.pods as f64;
    let mut last = Err(String::new());
    // Like Envoy, sidecars send again every flush until every pod is in: a
    // store may refuse part of a burst of first writes (the Redis pool's
    // deadline), and a real sidecar's next flush repairs that. Flushes are
    // spread over the interval, as independent sidecars' timers are.
    let body = flush_body(1.0);
    let since = Instant::now();
    let mut sent = 0usize;
    wait_for(
        &format!("GetMetrics to see {} pods", a.pods),
        Duration::from_secs(120),
        async || {
            let due = (since.elapsed().as_secs_f64() / ENVOY_FLUSH.as_secs_f64()
                * sidecars.len() as f64) as usize;
            while sent < due {
                let _ = sidecars[sent % sidecars.len()].try_send(body.clone());
                sent += 1;
            }
            last = get_metrics(&mut probe, &so).await;
            last.as_ref().is_ok_and(|v| *v == want)
        },
    )
    .await
    .map_err(|e| format!("{e} (last answer {last:?})"))?;
    // Pods already stored by an earlier run answer at once: still wait until
    // the server has taken this run's messages, or the measurement would
    // start inside their ingest.
    if let Some(before) = messages_before {
        wait_for(
            "the server to take every sidecar's message",
            Duration::from_secs(120),
            async || {
                server_metric(cli.http, "activescale_sink_messages_total")
                    .await
                    .is_some_and(|m| m - before >= a.pods as f64)
            },
        )
        .await?;
    }
    let isactive = a.method == "isactive";
    let runs = a
        .clients
        .iter()
        .flat_map(|&c| a.rates.iter().map(move |&r| (c, r)));
    for (clients, rate) in runs {
        let hist = Arc::new(Mutex::new(new_hist()));
        let calls = Arc::new(AtomicU64::new(0));
        let failures = Arc::new(AtomicU64::new(0));
        let t0 = Instant::now();
        let stop = t0 + Duration::from_secs_f64(a.duration);
        // Open loop: client c starts its k-th call at t0 + (k + c/clients) * every.
        let every = (rate > 0.0).then(|| Duration::from_secs_f64(clients as f64 / rate));
        let p0 = snap(cli.pid);
        let mut tasks = Vec::new();
        for c in 0..clients {
            let mut client = ExternalScalerClient::new(channels[c % channels.len()].clone());
            let (so, hist, calls, failures) =
                (so.clone(), hist.clone(), calls.clone(), failures.clone());
            let mut due = every.map(|e| t0 + e.mul_f64(c as f64 / clients as f64));
            tasks.push(tokio::spawn(async move {
                let mut local = new_hist();
                while Instant::now() < stop {
                    let started = match (due, every) {
                        (Some(at), Some(e)) => {
                            due = Some(at + e);
                            if Instant::now() < at {
                                // On time: the call starts when the timer
                                // fires (tokio's 1 ms timer resolution is
                                // the client's lateness, not the server's).
                                tokio::time::sleep_until(at.into()).await;
                                Instant::now()
                            } else {
                                // Behind schedule (the previous call ran
                                // late): that wait counts.
                                at
                            }
                        }
                        _ => Instant::now(),
                    };
                    let ok = if isactive {
                        client
                            .is_active(so.clone())
                            .await
                            .is_ok_and(|r| r.into_inner().result)
                    } else {
                        get_metrics(&mut client, &so).await.is_ok_and(|v| v == want)
                    };
                    let _ = local.record(nanos(started.elapsed()));
                    calls.fetch_add(1, Ordering::Relaxed);
                    if !ok {
                        failures.fetch_add(1, Ordering::Relaxed);
                    }
                }
                if let Ok(mut h) = hist.lock() {
                    let _ = h.add(&local);
                }
            }));
        }
        for t in tasks {
            let _ = t.await;
        }
        let elapsed = t0.elapsed().as_secs_f64();
        let cpu = cpu_between(p0, snap(cli.pid));
        let h = hist.lock().map_err(|_| "poisoned")?.clone();
        let n = calls.load(Ordering::Relaxed) as f64;
        emit(
            cli,
            json!({
                "figure": "scaler",
                "method": a.method,
                "pods": a.pods,
                "clients": clients,
                "connections": channels.len(),
                "offered_calls_per_s": (rate > 0.0).then_some(rate),
                "calls_per_s": n / elapsed,
                "p50_us": us(&h, 0.5),
                "p90_us": us(&h, 0.9),
                "p99_us": us(&h, 0.99),
                "max_us": h.max() as f64 / 1000.0,
                "server_cpu_s": cpu,
                "server_cpu_us_per_call": cpu.map(|c| c * 1e6 / n),
                "wrong_or_failed": failures.load(Ordering::Relaxed),
                "server_vmhwm_kib": cli.pid.and_then(|p| status_kib(p, "VmHWM")),
            }),
        );
    }
    Ok(())
}

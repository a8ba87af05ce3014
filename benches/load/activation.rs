//! `activation`: W open StreamIsActive streams on one workload whose load
//! flips 0 → 1 → 0; each stream's report is timed from the moment the
//! flipping message is handed to the sidecar's stream.

use std::{
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use activescale::proto::external_scaler_client::ExternalScalerClient;
use clap::Args;
use hdrhistogram::Histogram;
use serde_json::json;
use tokio::sync::Notify;
use tokio_stream::StreamExt;

use crate::{
    Cli, Res, common,
    report::{cpu_between, emit, nanos, new_hist, server_metric, snap, us},
    sidecars::{connections, flush_body, get_metrics, populate, wait_for},
};

#[derive(Args)]
pub struct ActivationArgs {
    #[arg(long)]
    sink: SocketAddr,
    #[arg(long)]
    scaler: SocketAddr,
    /// Open StreamIsActive streams on the workload.
    #[arg(long, default_value_t = 1000)]
    watchers: usize,
    /// Pods of the workload (one of them flips).
    #[arg(long, default_value_t = 10)]
    pods: usize,
    /// Flips (each 0 → 1 and back).
    #[arg(long, default_value_t = 20)]
    rounds: usize,
    #[arg(long, default_value_t = 4)]
    connections: usize,
}

struct Flip {
    /// The state every watcher is expected to report next.
    want: std::sync::atomic::AtomicBool,
    /// When the flipping message was handed to the sidecar stream.
    at: Mutex<Instant>,
    seen: AtomicUsize,
    done: Notify,
    up: Mutex<Histogram<u64>>,
    down: Mutex<Histogram<u64>>,
    wrong: AtomicU64,
}

pub async fn activation(cli: &Cli, a: &ActivationArgs) -> Res {
    let errors = Arc::new(AtomicU64::new(0));
    let ns = format!("act-{}", a.watchers);
    let sidecars = populate(a.sink, &ns, "web", a.pods, 0.0, a.pods, &errors).await?;
    let (zero, one) = (flush_body(0.0), flush_body(1.0));
    let so = common::so_ref(
        &ns,
        "web",
        &[
            ("labelSelector", "app=web"),
            ("targetValue", "10"),
            ("activationValue", "0"),
        ],
    );
    let channels = connections(a.scaler, a.connections).await?;
    let mut probe = ExternalScalerClient::new(channels[0].clone());
    wait_for("the workload's pods", Duration::from_secs(60), async || {
        // The Redis store does not count pods locally (its gauge stays 0).
        let n = match cli.store.as_str() {
            "redis" => None,
            _ => server_metric(cli.http, "activescale_pods_tracked").await,
        };
        get_metrics(&mut probe, &so).await.is_ok_and(|v| v == 0.0)
            && n.is_none_or(|n| n >= a.pods as f64)
    })
    .await?;
    let flip = Arc::new(Flip {
        want: false.into(),
        at: Mutex::new(Instant::now()),
        seen: AtomicUsize::new(0),
        done: Notify::new(),
        up: Mutex::new(new_hist()),
        down: Mutex::new(new_hist()),
        wrong: AtomicU64::new(0),
    });
    let watchers = a.watchers;
    for w in 0..watchers {
        let mut client = ExternalScalerClient::new(channels[w % channels.len()].clone());
        let (so, flip) = (so.clone(), flip.clone());
        tokio::spawn(async move {
            let Ok(stream) = client.stream_is_active(so).await else {
                flip.wrong.fetch_add(1, Ordering::Relaxed);
                return;
            };
            let mut stream = stream.into_inner();
            while let Some(Ok(msg)) = stream.next().await {
                let now = Instant::now();
                let want = flip.want.load(Ordering::Acquire);
                if msg.result != want {
                    flip.wrong.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                let at = *flip.at.lock().expect("flip clock");
                let hist = if want { &flip.up } else { &flip.down };
                let _ = hist.lock().expect("histogram").record(nanos(now - at));
                if flip.seen.fetch_add(1, Ordering::AcqRel) + 1 == watchers {
                    flip.done.notify_one();
                }
            }
        });
    }
    // Every stream first reports the current state (inactive).
    tokio::time::timeout(Duration::from_secs(60), flip.done.notified())
        .await
        .map_err(|_| {
            format!(
                "only {} of {watchers} streams opened",
                flip.seen.load(Ordering::Relaxed)
            )
        })?;
    // The opening reports are not flips.
    *flip.down.lock().map_err(|_| "poisoned")? = new_hist();
    let p0 = snap(cli.pid);
    for _ in 0..a.rounds {
        for want in [true, false] {
            flip.seen.store(0, Ordering::Release);
            flip.want.store(want, Ordering::Release);
            let notified = flip.done.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            *flip.at.lock().map_err(|_| "poisoned")? = Instant::now();
            sidecars[0]
                .send(if want { one.clone() } else { zero.clone() })
                .await
                .map_err(|_| "sidecar stream closed")?;
            tokio::time::timeout(Duration::from_secs(30), notified)
                .await
                .map_err(|_| {
                    format!(
                        "flip to {want}: only {} of {watchers} streams reported",
                        flip.seen.load(Ordering::Relaxed)
                    )
                })?;
        }
    }
    let cpu = cpu_between(p0, snap(cli.pid));
    let up = flip.up.lock().map_err(|_| "poisoned")?.clone();
    let down = flip.down.lock().map_err(|_| "poisoned")?.clone();
    emit(
        cli,
        json!({
            "figure": "activation",
            "watchers": watchers,
            "pods": a.pods,
            "rounds": a.rounds,
            "samples": up.len(),
            "up_p50_us": us(&up, 0.5),
            "up_p99_us": us(&up, 0.99),
            "up_max_us": up.max() as f64 / 1000.0,
            "down_p50_us": us(&down, 0.5),
            "down_p99_us": us(&down, 0.99),
            "server_cpu_s_per_flip": cpu.map(|c| c / (2 * a.rounds) as f64),
            "wrong_reports": flip.wrong.load(Ordering::Relaxed),
        }),
    );
    Ok(())
}

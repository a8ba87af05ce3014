//! `prom`: the same per-pod gauges on a loopback exporter scraped by a real
//! `prometheus` (the integration tests' harness, `testkit/prometheus.rs`);
//! `sum(...)` over its HTTP API (latency, its CPU) and gauge change → visible
//! time, beside activescale's push → visible in GetMetrics.

#[path = "../../testkit/prometheus.rs"]
#[allow(dead_code)]
pub(crate) mod harness;

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
    report::{cpu_between, emit, nanos, new_hist, snap, us},
    sidecars::{connections, flush_body, get_metrics, populate, wait_for},
};
use harness::{Exporter, Options, Prometheus};

#[derive(Args)]
pub struct PromArgs {
    #[arg(long)]
    sink: SocketAddr,
    #[arg(long)]
    scaler: SocketAddr,
    /// Series (pods) per size, comma separated.
    #[arg(long, default_value = "10,1000,10000", value_delimiter = ',')]
    sizes: Vec<usize>,
    #[arg(long, default_value = "1,64", value_delimiter = ',')]
    clients: Vec<usize>,
    #[arg(long, default_value_t = 5.0)]
    duration: f64,
    #[arg(long, default_value = "prometheus")]
    prometheus_bin: String,
    /// Prometheus scrape interval, seconds.
    #[arg(long, default_value_t = 5)]
    scrape_interval: u64,
    /// Gauge flips timed on each side.
    #[arg(long, default_value_t = 6)]
    rounds: usize,
}

pub(crate) const GAUGE: &str = "envoy_http_downstream_rq_active";

/// Sets the gauge of pod `web-<i>` of `namespace` as an Istio sidecar's
/// `/stats/prometheus` (or a pod exporter) would show it.
pub(crate) fn set_pod(exporter: &Exporter, namespace: &str, i: usize, value: f64) {
    exporter.set(
        GAUGE,
        &[
            ("namespace", namespace),
            ("pod", &format!("web-{i}")),
            ("app", "web"),
            ("http_conn_manager_prefix", "inbound_0.0.0.0_8080"),
        ],
        value,
    );
}

/// One instant query; the scalar result.
async fn prom_query(prometheus: &Prometheus, http: &reqwest::Client, q: &str) -> Res<f64> {
    prometheus
        .query(http, q)
        .await?
        .ok_or_else(|| format!("empty result for {q}"))
}

/// A small deterministic jitter source (no rand dependency).
pub(crate) fn jitter(state: &mut u64, max: Duration) -> Duration {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    max.mul_f64((*state % 10_000) as f64 / 10_000.0)
}

pub async fn prom(cli: &Cli, a: &PromArgs) -> Res {
    let exporter = Exporter::start();
    for &n in &a.sizes {
        for i in 0..n {
            set_pod(&exporter, &format!("prom-{n}"), i, 1.0);
        }
    }
    set_pod(&exporter, "vis", 0, 0.0);
    let options = Options {
        bin: a.prometheus_bin.clone(),
        scrape_interval: Duration::from_secs(a.scrape_interval),
    };
    let prometheus = Arc::new(Prometheus::start_with_options(&[exporter.addr], &options).await);
    let prom_pid = prometheus.pid();
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(256)
        .build()
        .map_err(|e| e.to_string())?;
    let total: usize = a.sizes.iter().sum::<usize>() + 1;
    wait_for(
        "prometheus to scrape every series",
        Duration::from_secs(120),
        async || {
            prom_query(&prometheus, &http, "count(envoy_http_downstream_rq_active)")
                .await
                .is_ok_and(|n| n as usize == total)
        },
    )
    .await?;

    // Query latency and CPU, prometheus and activescale on the same pods.
    let scaler_channels = connections(a.scaler, 4).await?;
    let errors = Arc::new(AtomicU64::new(0));
    for &size in &a.sizes {
        let ns = format!("prom-{size}");
        let _sidecars = populate(a.sink, &ns, "web", size, 1.0, 1000, &errors).await?;
        let so = common::so_ref(
            &ns,
            "web",
            &[("labelSelector", "app=web"), ("targetValue", "10")],
        );
        let mut probe = ExternalScalerClient::new(scaler_channels[0].clone());
        wait_for(
            "activescale to see the pods",
            Duration::from_secs(120),
            async || {
                get_metrics(&mut probe, &so)
                    .await
                    .is_ok_and(|v| v == size as f64)
            },
        )
        .await?;
        let query =
            format!("sum(envoy_http_downstream_rq_active{{namespace=\"{ns}\",app=\"web\"}})");
        for &clients in &a.clients {
            for side in ["prometheus", "activescale"] {
                let pid = if side == "prometheus" {
                    prom_pid
                } else {
                    cli.pid
                };
                let hist = Arc::new(Mutex::new(new_hist()));
                let calls = Arc::new(AtomicU64::new(0));
                let failures = Arc::new(AtomicU64::new(0));
                let stop = Instant::now() + Duration::from_secs_f64(a.duration);
                let p0 = snap(pid);
                let t0 = Instant::now();
                let mut tasks = Vec::new();
                for c in 0..clients {
                    let (hist, calls, failures) = (hist.clone(), calls.clone(), failures.clone());
                    let (http, prometheus, query, so) =
                        (http.clone(), prometheus.clone(), query.clone(), so.clone());
                    let mut client = ExternalScalerClient::new(
                        scaler_channels[c % scaler_channels.len()].clone(),
                    );
                    let want = size as f64;
                    tasks.push(tokio::spawn(async move {
                        let mut local = new_hist();
                        while Instant::now() < stop {
                            let started = Instant::now();
                            let v = if side == "prometheus" {
                                prom_query(&prometheus, &http, &query).await
                            } else {
                                get_metrics(&mut client, &so).await
                            };
                            let _ = local.record(nanos(started.elapsed()));
                            calls.fetch_add(1, Ordering::Relaxed);
                            if v.ok() != Some(want) {
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
                let cpu = cpu_between(p0, snap(pid));
                let h = hist.lock().map_err(|_| "poisoned")?.clone();
                let n = calls.load(Ordering::Relaxed) as f64;
                emit(
                    cli,
                    json!({
                        "figure": "query",
                        "side": side,
                        "pods": size,
                        "clients": clients,
                        "calls_per_s": n / elapsed,
                        "p50_us": us(&h, 0.5),
                        "p99_us": us(&h, 0.99),
                        "cpu_us_per_call": cpu.map(|c| c * 1e6 / n),
                        "wrong_or_failed": failures.load(Ordering::Relaxed),
                    }),
                );
            }
        }
    }

    // Change → visible. Prometheus: the exporter's gauge flips, the query is
    // polled every 5 ms. activescale: the sidecar pushes the flip, GetMetrics
    // is polled every 1 ms (and StreamIsActive would push it: see `activation`).
    let sidecars = populate(a.sink, "vis", "web", 1, 0.0, 1, &errors).await?;
    let (zero, one) = (flush_body(0.0), flush_body(1.0));
    let so = common::so_ref(
        "vis",
        "web",
        &[("labelSelector", "app=web"), ("targetValue", "10")],
    );
    let mut client = ExternalScalerClient::new(scaler_channels[0].clone());
    let vis_q = "sum(envoy_http_downstream_rq_active{namespace=\"vis\",app=\"web\"})";
    let mut prom_h = new_hist();
    let mut ours_h = new_hist();
    let mut rng = 0x9E37_79B9_7F4A_7C15u64;
    let scrape = Duration::from_secs(a.scrape_interval);
    for round in 0..a.rounds {
        let value = if round % 2 == 0 { 1.0 } else { 0.0 };
        // Flip at a random phase of the scrape cycle.
        tokio::time::sleep(jitter(&mut rng, scrape)).await;
        let t0 = Instant::now();
        set_pod(&exporter, "vis", 0, value);
        loop {
            if prom_query(&prometheus, &http, vis_q).await.ok() == Some(value) {
                break;
            }
            if t0.elapsed() > scrape * 4 {
                return Err("prometheus never showed the flip".into());
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let _ = prom_h.record(nanos(t0.elapsed()));
        let t0 = Instant::now();
        sidecars[0]
            .send(if value > 0.0 {
                one.clone()
            } else {
                zero.clone()
            })
            .await
            .map_err(|_| "sidecar stream closed")?;
        loop {
            if get_metrics(&mut client, &so).await.ok() == Some(value) {
                break;
            }
            if t0.elapsed() > Duration::from_secs(10) {
                return Err("activescale never showed the flip".into());
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let _ = ours_h.record(nanos(t0.elapsed()));
    }
    emit(
        cli,
        json!({
            "figure": "visibility",
            "scrape_interval_s": a.scrape_interval,
            "rounds": a.rounds,
            "prometheus_p50_us": us(&prom_h, 0.5),
            "prometheus_max_us": prom_h.max() as f64 / 1000.0,
            "activescale_p50_us": us(&ours_h, 0.5),
            "activescale_max_us": ours_h.max() as f64 / 1000.0,
            "ratio_p50": us(&prom_h, 0.5) / us(&ours_h, 0.5),
        }),
    );
    drop(prometheus);
    Ok(())
}

//! `cma`: the Custom Metrics API's pods list (what an HPA reads through the
//! aggregator) over HTTPS, beside GetMetrics on the same pods and beside the
//! query prometheus-adapter sends for the same list, on a real Prometheus
//! scraping the same number of per-pod series (`prom`'s harness).
//!
//! P pods are pushed through the sink (the sidecar generator every mode
//! uses), then each side is called in a closed loop by 1 and 64 clients;
//! every answer is checked (P items, P, P series) and a wrong one counts as
//! failed.

use std::{
    net::SocketAddr,
    sync::{Arc, atomic::AtomicU64},
    time::Duration,
};

use activescale::proto::external_scaler_client::ExternalScalerClient;
use clap::Args;
use serde_json::{Value, json};

use crate::{
    Cli, Res, common,
    prom::{
        GAUGE,
        harness::{Exporter, Options, Prometheus},
        set_pod,
    },
    report::{Call, closed_loop, cpu_between, emit, snap, us},
    sidecars::{connections, get_metrics, populate, wait_for},
};

#[derive(Args)]
pub struct CmaArgs {
    #[arg(long)]
    sink: SocketAddr,
    #[arg(long)]
    scaler: SocketAddr,
    /// The server's `custom_metrics_addr` (loopback: no client certificate).
    #[arg(long)]
    custom_metrics: SocketAddr,
    #[arg(long, default_value_t = 1000)]
    pods: usize,
    #[arg(long, default_value = "1,64", value_delimiter = ',')]
    clients: Vec<usize>,
    /// Seconds per side and client count.
    #[arg(long, default_value_t = 5.0)]
    duration: f64,
    #[arg(long, default_value = "prometheus")]
    prometheus_bin: String,
    /// Prometheus scrape interval, seconds.
    #[arg(long, default_value_t = 5)]
    scrape_interval: u64,
}

/// application/x-www-form-urlencoded for one value: everything but
/// unreserved characters escaped.
fn form_escape(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// What prometheus-adapter sends for a pods list: the pods the selector
/// matched (it lists them from the API server) as one regex alternative,
/// summed by pod.
fn adapter_query(ns: &str, pods: usize) -> String {
    let names: Vec<String> = (0..pods).map(|i| format!("web-{i}")).collect();
    format!(
        "sum({GAUGE}{{namespace=\"{ns}\",pod=~\"{}\"}}) by (pod)",
        names.join("|")
    )
}

/// How many items (series) an answer lists, if it is well formed.
fn count(body: &Value, list: &str) -> Option<usize> {
    Some(body.pointer(list)?.as_array()?.len())
}

pub async fn cma(cli: &Cli, a: &CmaArgs) -> Res {
    let ns = format!("cma-{}", a.pods);
    let want = a.pods;

    // Prometheus first: its scrapes of the same number of series settle
    // while the sidecars push.
    let exporter = Exporter::start();
    for i in 0..a.pods {
        set_pod(&exporter, &ns, i, 1.0);
    }
    let options = Options {
        bin: a.prometheus_bin.clone(),
        scrape_interval: Duration::from_secs(a.scrape_interval),
    };
    let prometheus = Prometheus::start_with_options(&[exporter.addr], &options).await;
    let prom_pid = prometheus.pid();
    let prom_url = format!("{}/api/v1/query", prometheus.url);
    let prom_body = format!("query={}", form_escape(&adapter_query(&ns, a.pods)));
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(256)
        .build()
        .map_err(|e| e.to_string())?;
    let prom_call = {
        let (http, url, body) = (http.clone(), prom_url.clone(), prom_body.clone());
        move || {
            let (http, url, body) = (http.clone(), url.clone(), body.clone());
            async move {
                let Ok(r) = http
                    .post(url)
                    .header("content-type", "application/x-www-form-urlencoded")
                    .body(body)
                    .send()
                    .await
                else {
                    return false;
                };
                r.json::<Value>()
                    .await
                    .is_ok_and(|b| count(&b, "/data/result") == Some(want))
            }
        }
    };

    let errors = Arc::new(AtomicU64::new(0));
    let _sidecars = populate(a.sink, &ns, "web", a.pods, 1.0, 1000, &errors).await?;
    let so = common::so_ref(
        &ns,
        "web",
        &[("labelSelector", "app=web"), ("targetValue", "10")],
    );
    let channels = connections(a.scaler, 4).await?;
    let mut probe = ExternalScalerClient::new(channels[0].clone());
    wait_for(
        &format!("GetMetrics to see {} pods", a.pods),
        Duration::from_secs(120),
        async || {
            get_metrics(&mut probe, &so)
                .await
                .is_ok_and(|v| v == want as f64)
        },
    )
    .await?;

    // The self-signed certificate made at start-up: skip verification, as
    // an APIService with `insecureSkipTLSVerify: true` does.
    let https = reqwest::Client::builder()
        .tls_danger_accept_invalid_certs(true)
        .pool_max_idle_per_host(256)
        .build()
        .map_err(|e| e.to_string())?;
    let cma_url = format!(
        "https://{}/apis/custom.metrics.k8s.io/v1beta2/namespaces/{ns}/pods/*/active_requests?labelSelector=app%3Dweb",
        a.custom_metrics
    );
    let cma_call = {
        let (https, url) = (https.clone(), cma_url.clone());
        move || {
            let (https, url) = (https.clone(), url.clone());
            async move {
                let Ok(r) = https.get(url).send().await else {
                    return false;
                };
                let ok = r.status().is_success();
                ok && r
                    .json::<Value>()
                    .await
                    .is_ok_and(|b| count(&b, "/items") == Some(want))
            }
        }
    };
    for (what, ok) in [
        ("the Custom Metrics API to list every pod", cma_call().await),
        ("prometheus to answer for every pod", prom_call().await),
    ] {
        if !ok {
            wait_for(what, Duration::from_secs(120), async || {
                if what.starts_with("the Custom") {
                    cma_call().await
                } else {
                    prom_call().await
                }
            })
            .await?;
        }
    }

    for &clients in &a.clients {
        for side in ["custom_metrics", "getmetrics", "prometheus"] {
            let callers: Vec<Call> = (0..clients)
                .map(|c| -> Call {
                    match side {
                        "custom_metrics" => {
                            let f = cma_call.clone();
                            Box::new(move || Box::pin(f()))
                        }
                        "prometheus" => {
                            let f = prom_call.clone();
                            Box::new(move || Box::pin(f()))
                        }
                        _ => {
                            let client =
                                ExternalScalerClient::new(channels[c % channels.len()].clone());
                            let so = so.clone();
                            Box::new(move || {
                                let (mut client, so) = (client.clone(), so.clone());
                                Box::pin(async move {
                                    get_metrics(&mut client, &so)
                                        .await
                                        .is_ok_and(|v| v == want as f64)
                                })
                            })
                        }
                    }
                })
                .collect();
            let pid = if side == "prometheus" {
                prom_pid
            } else {
                cli.pid
            };
            let p0 = snap(pid);
            let r = closed_loop(callers, Duration::from_secs_f64(a.duration)).await;
            let cpu = cpu_between(p0, snap(pid));
            emit(
                cli,
                json!({
                    "figure": "cma",
                    "side": side,
                    "pods": a.pods,
                    "clients": clients,
                    "calls_per_s": r.per_s(),
                    "p50_us": us(&r.hist, 0.5),
                    "p99_us": us(&r.hist, 0.99),
                    "max_us": r.hist.max() as f64 / 1000.0,
                    "cpu_us_per_call": cpu.map(|c| c * 1e6 / r.calls as f64),
                    "wrong_or_failed": r.failures,
                }),
            );
        }
    }
    drop(prometheus);
    Ok(())
}

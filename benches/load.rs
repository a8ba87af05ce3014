//! Load tool: drives a running activescale over real sockets and measures it.
//!
//! ```text
//! cargo bench --bench load -- <mode> [options]      (see --help)
//! ```
//!
//! Modes (each prints a summary and appends one JSON object per figure to
//! `--out`):
//! - `sink`: N sidecar streams over C HTTP/2 connections push a 600-family
//!   message every interval (0 = as fast as the server takes them);
//!   messages/s, families/s, server CPU-seconds per 1,000 pods per flush.
//! - `scaler`: P pods pushed once, then 1 and 64 (`--clients`) concurrent
//!   KEDA clients calling GetMetrics (or IsActive) in a loop; calls/s, p50/p99.
//! - `activation`: W open StreamIsActive streams on one workload; the
//!   workload's load flips 0 → 1 → 0 and each stream's push is timed from
//!   the moment the flipping message is handed to the sidecar's stream.
//! - `memory`: P pods created by a few streams that re-identify on every
//!   message (the sink takes an identifier on any message); server RSS per
//!   tracked pod.
//! - `prom`: the same per-pod gauges on a loopback exporter scraped by a real
//!   `prometheus` child process; `sum(...)` over its HTTP API (latency, its
//!   CPU) and gauge change → visible time, beside activescale's
//!   push → visible in GetMetrics.
//!
//! Server CPU comes from `/proc/<pid>/stat` (utime + stime) and memory from
//! `/proc/<pid>/status` (VmRSS, VmHWM) of `--pid`.
//!
//! Sidecars send bytes prost encoded once from `envoy-types` messages
//! (`common::istio_families`) through a raw-bytes tonic codec: the wire is
//! exactly what the generated Envoy client sends, but the generator does not
//! spend a core re-encoding 600 families per message on the machine it shares
//! with the server. `--envoy-client` uses the generated
//! `MetricsServiceClient` instead.

mod common;

use std::{
    net::SocketAddr,
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use activescale::proto::{
    GetMetricsRequest, ScaledObjectRef, external_scaler_client::ExternalScalerClient,
};
use bytes::{BufMut, Bytes};
use clap::{Args, Parser, Subcommand};
use envoy_types::pb::envoy::service::metrics::v3::{
    StreamMetricsMessage, StreamMetricsResponse, metrics_service_client::MetricsServiceClient,
};
use hdrhistogram::Histogram;
use prost::Message;
use serde_json::{Value, json};
use tokio::sync::{Notify, mpsc};
use tokio_stream::{StreamExt, wrappers::ReceiverStream};
use tonic::{
    Status,
    codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder},
    codegen::http::uri::PathAndQuery,
    transport::{Channel, Endpoint},
};

/// Envoy's default stats flush interval.
const ENVOY_FLUSH: Duration = Duration::from_secs(5);

#[derive(Parser)]
#[command(about = "activescale load tool (see benches/load.rs)")]
struct Cli {
    #[command(subcommand)]
    mode: Mode,
    /// Server process id, for CPU and RSS.
    #[arg(long, global = true)]
    pid: Option<u32>,
    /// JSON lines file to append results to.
    #[arg(long, global = true)]
    out: Option<PathBuf>,
    /// Free-form tag stored with every figure (e.g. the store: memory, redis).
    #[arg(long, global = true, default_value = "memory")]
    store: String,
    /// The server's HTTP port (for its counters and pod count).
    #[arg(long, global = true)]
    http: Option<SocketAddr>,
}

#[path = "load/flood.rs"]
mod flood;

#[derive(Subcommand)]
enum Mode {
    Sink(SinkArgs),
    Flood(flood::FloodArgs),
    Scaler(ScalerArgs),
    Activation(ActivationArgs),
    Memory(MemoryArgs),
    Prom(PromArgs),
}

#[derive(Args)]
struct SinkArgs {
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

#[derive(Args)]
struct ScalerArgs {
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

#[derive(Args)]
struct ActivationArgs {
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

#[derive(Args)]
struct MemoryArgs {
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

#[derive(Args)]
struct PromArgs {
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

fn main() {
    // `cargo bench` passes `--bench` to every bench target.
    let args: Vec<String> = std::env::args().filter(|a| a != "--bench").collect();
    if args.len() <= 1 {
        println!("load: no mode given, nothing to do (see `cargo bench --bench load -- --help`)");
        return;
    }
    let cli = Cli::parse_from(args);
    let _ = rustls::crypto::ring::default_provider().install_default();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let result = rt.block_on(async {
        match &cli.mode {
            Mode::Sink(a) => sink(&cli, a).await,
            Mode::Flood(a) => flood::flood(&cli, a).await,
            Mode::Scaler(a) => scaler(&cli, a).await,
            Mode::Activation(a) => activation(&cli, a).await,
            Mode::Memory(a) => memory(&cli, a).await,
            Mode::Prom(a) => prom(&cli, a).await,
        }
    });
    if let Err(e) = result {
        eprintln!("load: {e}");
        std::process::exit(1);
    }
    // Thousands of open streams: do not wait for each to wind down.
    rt.shutdown_background();
}

type Res<T = ()> = Result<T, String>;

// ---------------------------------------------------------------- reporting

fn emit(cli: &Cli, mut figure: Value) {
    figure["store"] = json!(cli.store);
    println!("{figure}");
    if let Some(path) = &cli.out {
        use std::io::Write;
        let line = format!("{figure}\n");
        let written = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .and_then(|mut f| f.write_all(line.as_bytes()));
        if let Err(e) = written {
            eprintln!("load: writing {}: {e}", path.display());
        }
    }
}

fn new_hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 600_000_000_000, 3).expect("histogram bounds")
}

fn us(h: &Histogram<u64>, q: f64) -> f64 {
    h.value_at_quantile(q) as f64 / 1000.0
}

fn nanos(d: Duration) -> u64 {
    (d.as_nanos() as u64).max(1)
}

/// Server CPU and memory from /proc.
#[derive(Clone, Copy)]
struct ProcSnap {
    cpu_s: f64,
}

fn clk_tck() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100.0)
}

fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces); utime and stime
    // are fields 14 and 15 of the whole line.
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    Some(ticks / clk_tck())
}

fn status_kib(pid: u32, key: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find(|l| l.starts_with(key))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

fn snap(pid: Option<u32>) -> Option<ProcSnap> {
    Some(ProcSnap {
        cpu_s: cpu_seconds(pid?)?,
    })
}

fn cpu_between(a: Option<ProcSnap>, b: Option<ProcSnap>) -> Option<f64> {
    Some(b?.cpu_s - a?.cpu_s)
}

/// A counter or gauge from the server's /metrics.
async fn server_metric(http: Option<SocketAddr>, name: &str) -> Option<f64> {
    let text = reqwest::get(format!("http://{}/metrics", http?))
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    text.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

// ---------------------------------------------------------------- sidecars

/// Sends pre-encoded `StreamMetricsMessage` bytes as they are.
#[derive(Clone, Copy, Default)]
struct RawCodec;

struct RawEncoder;
struct ResponseDecoder;

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

async fn connect(addr: SocketAddr) -> Res<Channel> {
    Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|e| e.to_string())?
        .tcp_nodelay(true)
        .initial_connection_window_size(Some(16 << 20))
        .initial_stream_window_size(Some(1 << 20))
        .connect()
        .await
        .map_err(|e| format!("connecting to {addr}: {e}"))
}

async fn connections(addr: SocketAddr, n: usize) -> Res<Vec<Channel>> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n.max(1) {
        out.push(connect(addr).await?);
    }
    Ok(out)
}

/// One sidecar stream: whatever is sent on the returned sender goes out as
/// one message. Dropping the sender half-closes the stream.
fn open_stream(channel: Channel, errors: Arc<AtomicU64>) -> mpsc::Sender<Bytes> {
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
fn open_envoy_stream(
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
async fn wait_for(what: &str, limit: Duration, mut check: impl AsyncFnMut() -> bool) -> Res {
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
async fn populate(
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
fn flush_body(value: f64) -> Bytes {
    Bytes::from(common::encode(
        None,
        common::istio_families(600, &common::kept(1, value)),
    ))
}

fn scaled_object(namespace: &str, name: &str, meta: &[(&str, &str)]) -> ScaledObjectRef {
    ScaledObjectRef {
        name: name.into(),
        namespace: namespace.into(),
        scaler_metadata: meta
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    }
}

async fn get_metrics(client: &mut ExternalScalerClient<Channel>, so: &ScaledObjectRef) -> Res<f64> {
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

// ---------------------------------------------------------------- sink

async fn sink(cli: &Cli, a: &SinkArgs) -> Res {
    let conns = a.connections.unwrap_or(a.streams.min(1000));
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
            "rss_kib_per_stream": rss_before.zip(rss_after).map(|(b, a2)| (a2 as f64 - b as f64) / streams),
            "server_vmhwm_kib": cli.pid.and_then(|p| status_kib(p, "VmHWM")),
            "pods_tracked": kept_ok,
            "stream_errors": errors.load(Ordering::Relaxed),
        }),
    );
    Ok(())
}

// ---------------------------------------------------------------- scaler

async fn scaler(cli: &Cli, a: &ScalerArgs) -> Res {
    let errors = Arc::new(AtomicU64::new(0));
    let ns = format!("scale-{}", a.pods);
    let messages_before = server_metric(cli.http, "activescale_sink_messages_total").await;
    let sidecars = populate(a.sink, &ns, "web", a.pods, 1.0, 1000, &errors).await?;
    let so = scaled_object(
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

// ---------------------------------------------------------------- activation

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

async fn activation(cli: &Cli, a: &ActivationArgs) -> Res {
    let errors = Arc::new(AtomicU64::new(0));
    let ns = format!("act-{}", a.watchers);
    let sidecars = populate(a.sink, &ns, "web", a.pods, 0.0, a.pods, &errors).await?;
    let zero = Bytes::from(common::encode(
        None,
        common::istio_families(600, &common::kept(1, 0.0)),
    ));
    let one = Bytes::from(common::encode(
        None,
        common::istio_families(600, &common::kept(1, 1.0)),
    ));
    let so = scaled_object(
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

// ---------------------------------------------------------------- memory

async fn memory(cli: &Cli, a: &MemoryArgs) -> Res {
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
                let mut msg =
                    common::identifier_field(common::sidecar_node(&ns, &format!("{app}-{i}"), &app));
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

// ---------------------------------------------------------------- prometheus

/// The per-pod gauges, in Prometheus' text format, as an Istio sidecar's
/// `/stats/prometheus` (or a pod exporter) would show them.
struct Exporter {
    sizes: Vec<usize>,
    /// Value of pod 0 of the `vis` namespace (f64 bits).
    flipped: AtomicU64,
}

impl Exporter {
    fn render(&self) -> String {
        let mut out = String::with_capacity(self.sizes.iter().sum::<usize>() * 160);
        out.push_str("# TYPE envoy_http_downstream_rq_active gauge\n");
        let series = self.sizes.iter().map(|&n| (format!("prom-{n}"), n, 1.0));
        let vis = std::iter::once((
            "vis".to_string(),
            1,
            f64::from_bits(self.flipped.load(Ordering::Acquire)),
        ));
        for (ns, n, v) in series.chain(vis) {
            for i in 0..n {
                out.push_str(&format!(
                    "envoy_http_downstream_rq_active{{namespace=\"{ns}\",pod=\"web-{i}\",app=\"web\",http_conn_manager_prefix=\"inbound_0.0.0.0_8080\"}} {v}\n"
                ));
            }
        }
        out
    }
}

/// A `prometheus` child process, killed on drop.
struct Prometheus {
    child: tokio::process::Child,
    base: String,
    _dir: tempfile::TempDir,
}

impl Prometheus {
    async fn start(bin: &str, target: SocketAddr, scrape_s: u64) -> Res<Self> {
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(|e| e.to_string())?
            .port();
        let config = format!(
            "global:\n  scrape_interval: {scrape_s}s\n  scrape_timeout: {scrape_s}s\nscrape_configs:\n  - job_name: pods\n    honor_labels: true\n    static_configs:\n      - targets: ['{target}']\n"
        );
        let path = dir.path().join("prometheus.yml");
        std::fs::write(&path, config).map_err(|e| e.to_string())?;
        let child = tokio::process::Command::new(bin)
            .arg(format!("--config.file={}", path.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .arg("--log.level=warn")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| format!("starting {bin}: {e}"))?;
        Ok(Self {
            child,
            base: format!("http://127.0.0.1:{port}"),
            _dir: dir,
        })
    }

    fn pid(&self) -> Option<u32> {
        self.child.id()
    }
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'_' | b'.' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// One instant query; the scalar result.
async fn prom_query(http: &reqwest::Client, base: &str, q: &str) -> Res<f64> {
    let body = http
        .get(format!("{base}/api/v1/query?query={}", urlencode(q)))
        .send()
        .await
        .map_err(|e| e.to_string())?
        .text()
        .await
        .map_err(|e| e.to_string())?;
    let body: Value = serde_json::from_str(&body).map_err(|e| e.to_string())?;
    body["data"]["result"][0]["value"][1]
        .as_str()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("empty result for {q}"))
}

/// A small deterministic jitter source (no rand dependency).
fn jitter(state: &mut u64, max: Duration) -> Duration {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    max.mul_f64((*state % 10_000) as f64 / 10_000.0)
}

async fn prom(cli: &Cli, a: &PromArgs) -> Res {
    let exporter = Arc::new(Exporter {
        sizes: a.sizes.clone(),
        flipped: AtomicU64::new(0f64.to_bits()),
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|e| e.to_string())?;
    let target = listener.local_addr().map_err(|e| e.to_string())?;
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get({
            let exporter = exporter.clone();
            move || {
                let exporter = exporter.clone();
                async move { exporter.render() }
            }
        }),
    );
    tokio::spawn(async move { axum::serve(listener, app).await });
    let prometheus = Prometheus::start(&a.prometheus_bin, target, a.scrape_interval).await?;
    let prom_pid = prometheus.pid();
    let base = prometheus.base.clone();
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(256)
        .build()
        .map_err(|e| e.to_string())?;
    let total: usize = a.sizes.iter().sum::<usize>() + 1;
    wait_for(
        "prometheus to scrape every series",
        Duration::from_secs(120),
        async || {
            prom_query(&http, &base, "count(envoy_http_downstream_rq_active)")
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
        let so = scaled_object(
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
                    let (http, base, query, so) =
                        (http.clone(), base.clone(), query.clone(), so.clone());
                    let mut client = ExternalScalerClient::new(
                        scaler_channels[c % scaler_channels.len()].clone(),
                    );
                    let want = size as f64;
                    tasks.push(tokio::spawn(async move {
                        let mut local = new_hist();
                        while Instant::now() < stop {
                            let started = Instant::now();
                            let v = if side == "prometheus" {
                                prom_query(&http, &base, &query).await
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
    let zero = Bytes::from(common::encode(
        None,
        common::istio_families(600, &common::kept(1, 0.0)),
    ));
    let one = Bytes::from(common::encode(
        None,
        common::istio_families(600, &common::kept(1, 1.0)),
    ));
    let so = scaled_object(
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
        exporter
            .flipped
            .store(f64::to_bits(value), Ordering::Release);
        loop {
            if prom_query(&http, &base, vis_q).await.ok() == Some(value) {
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

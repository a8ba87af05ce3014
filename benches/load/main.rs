//! Load tool: drives a running activescale over real sockets and measures it.
//!
//! ```text
//! cargo bench --bench load -- <mode> [options]      (see --help)
//! ```
//!
//! One file a mode, each printing a summary and appending one JSON object
//! per figure to `--out` ([`report`], which also reads the server's CPU and
//! memory from `/proc/<pid>` of `--pid`):
//! - [`sink`]: N sidecar streams over C HTTP/2 connections push a 600-family
//!   message every interval; messages/s, families/s, server CPU-seconds per
//!   1,000 pods per flush.
//! - [`flood`]: streams that declare large messages and never finish them.
//! - [`scaler`]: P pods pushed once, then concurrent KEDA clients calling
//!   GetMetrics (or IsActive); calls/s, p50/p99.
//! - [`activation`]: StreamIsActive streams on a workload whose load flips.
//! - [`memory`]: server RSS per tracked pod.
//! - [`prom`]: a real Prometheus on the same gauges, through the integration
//!   tests' harness (`testkit/prometheus.rs`).
//! - [`proxy`]: HTTP/1.1 and gRPC at 64 connections to an in-process
//!   upstream directly, through the activator and through nginx; then cold
//!   starts (upstream bound → held request answered).
//! - [`cma`]: the Custom Metrics API's pods list over HTTPS beside
//!   GetMetrics and a prometheus-adapter style query on the same pods.
//!
//! [`sidecars`] holds the connections and streams every mode drives.
//!
//! Sidecars send bytes prost encoded once from `envoy-types` messages
//! (`common::istio_families`) through a raw-bytes tonic codec: the wire is
//! exactly what the generated Envoy client sends, but the generator does not
//! spend a core re-encoding 600 families per message on the machine it shares
//! with the server. `--envoy-client` uses the generated
//! `MetricsServiceClient` instead.

#[path = "../common/mod.rs"]
mod common;

mod activation;
mod cma;
mod flood;
mod memory;
mod prom;
mod proxy;
mod report;
mod scaler;
mod sidecars;
mod sink;

use std::{net::SocketAddr, path::PathBuf};

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "activescale load tool (see benches/load/main.rs)")]
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

#[derive(Subcommand)]
enum Mode {
    /// Sidecar streams pushing stats dumps: messages/s, server CPU per flush.
    Sink(sink::SinkArgs),
    /// Streams that declare large messages and never finish them: memory held.
    Flood(flood::FloodArgs),
    /// KEDA clients calling GetMetrics or IsActive: calls/s, latency.
    Scaler(scaler::ScalerArgs),
    /// StreamIsActive watchers of a workload that flips: push latency.
    Activation(activation::ActivationArgs),
    /// Many pods created by a few streams: server RSS per pod.
    Memory(memory::MemoryArgs),
    /// A real Prometheus on the same gauges, side by side.
    Prom(prom::PromArgs),
    /// HTTP/1.1 and gRPC through the activator, beside direct and nginx; cold starts.
    Proxy(proxy::ProxyArgs),
    /// The Custom Metrics API's pods list beside GetMetrics and Prometheus.
    Cma(cma::CmaArgs),
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
            Mode::Sink(a) => sink::sink(&cli, a).await,
            Mode::Flood(a) => flood::flood(&cli, a).await,
            Mode::Scaler(a) => scaler::scaler(&cli, a).await,
            Mode::Activation(a) => activation::activation(&cli, a).await,
            Mode::Memory(a) => memory::memory(&cli, a).await,
            Mode::Prom(a) => prom::prom(&cli, a).await,
            Mode::Proxy(a) => proxy::proxy(&cli, a).await,
            Mode::Cma(a) => cma::cma(&cli, a).await,
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

//! activescale: a KEDA external scaler fed by Envoy's metrics service.
//!
//! # Layout
//!
//! Data flows one way, sink → store → engine → front ends (see
//! `docs/architecture.md`):
//!
//! ```text
//!  Envoy sidecars ─StreamMetrics─▶ sink ─ingest─▶ store ─summary/pods/watch─▶ engine ─▶ scaler (KEDA, :9090)
//!                   (:9000)               memory | redis                       │        custom_metrics (HPA)
//!                   activator proxy ─route counts─▶ store  prometheus ────────┘        view (HTTP :8080)
//! ```
//!
//! The activator proxy writes its routes' counts into the store as the sink
//! writes pods ([`activator::publish`]); `source: activator` reads them back
//! through the engine.
//!
//! - [`sink`]: `envoy.service.metrics.v3.MetricsService`; learns each stream's
//!   pod, keeps the inbound `downstream_rq_active` gauges, writes them to the
//!   store. Bounds what a client can make it hold (streams, bytes, time).
//! - [`store`]: the [`store::Store`] trait the two sides share, with
//!   [`store::memory`] and [`store::redis`]; TTL, value history, change
//!   signals, and how long the store needs before its answers are whole.
//! - [`engine`]: what any parsed trigger's value is now, and one shared feed
//!   of its changes per distinct query, for every front end alike; it
//!   records who asked what ([`engine::Asker`]) for the live view.
//! - [`scaler`]: KEDA's `externalscaler.ExternalScaler`, a thin adapter over
//!   the engine; the one place where request errors become gRPC statuses.
//! - [`trigger`]: a parsed trigger (target, activation, metric name, source)
//!   and the parsed-trigger cache.
//! - [`source`]: one module per source (`envoy`, `prometheus`, `activator`), each owning
//!   its metadata keys and parser, plugged into one [`source::Source`] enum.
//! - [`metadata`]: typed readers of trigger-metadata keys and their errors.
//! - [`selector`]: Kubernetes label selectors.
//! - [`prometheus`]: the optional Prometheus backend that runs
//!   `source: prometheus` triggers (client, PromQL checks, formulas, presets).
//! - [`http`]: `/healthz`, `/readyz`, `/metrics`, `/v1/pods`, and the live view.
//! - [`view`]: what KEDA and HPAs asked and were answered (recorded by the
//!   engine), for the page at `/`.
//! - [`custom_metrics`]: the Custom Metrics API (`custom.metrics.k8s.io`)
//!   for plain HPAs, HTTPS with front-proxy authentication.
//! - [`tls`]: optional TLS/mTLS on both gRPC ports, certificates reloaded on rotation.
//! - [`reflection`]: gRPC server reflection on both gRPC ports (`grpcurl`).
//! - [`activator`]: the optional proxy that holds requests for a workload at
//!   zero, counts them for KEDA at once (each replica publishes its routes'
//!   counts into the store, summed over replicas) and forwards them once it
//!   is ready.
//! - [`check`]: `activescale check`, offline validation of ScaledObject YAML.
//! - [`config`]: the one typed configuration, validated before anything binds
//!   (certificates and the Redis URL parsed too); a leaf that imports no other
//!   module. Grouped per part ([`config::SinkConfig`], [`config::StoreConfig`],
//!   [`config::EngineConfig`], [`config::TlsConfig`], ...); each part takes its group.
//! - [`telemetry`]: logs, the service's own metrics, summary lines.
//!
//! [`run`] serves one server per bound [`Port`] (sink, scaler, HTTP, and the
//! Custom Metrics API and activator when configured) until `shutdown`
//! resolves; `main` only parses flags, runs [`preflight`], binds and calls
//! it, and the integration tests bind any subset on `127.0.0.1:0`.

#![forbid(unsafe_code)]

// The builders shared with the integration tests and benches name the crate
// `activescale`, as they do from outside it.
#[cfg(test)]
extern crate self as activescale;
#[cfg(test)]
#[path = "../testkit/builders.rs"]
pub(crate) mod testkit;

pub mod activator;
pub mod check;
pub mod config;
pub mod custom_metrics;
pub mod engine;
pub mod http;
pub mod metadata;
pub mod prometheus;
pub mod reflection;
pub mod scaler;
pub mod selector;
pub mod sink;
pub mod source;
pub mod store;
pub mod telemetry;
pub mod tls;
pub mod trigger;
pub mod view;

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use config::{Config, StoreConfig};
use store::SharedStore;
use telemetry::Metrics;

/// Code generated from `proto/externalscaler.proto`.
pub mod proto {
    tonic::include_proto!("externalscaler");
}

/// Why the service could not start or stopped serving. Request errors are
/// [`scaler::RequestError`] (and [`engine::EvalError`] beneath it).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Store(#[from] store::StoreError),
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    /// A certificate or key that does not load; the message names the setting.
    #[error("invalid configuration: {0}")]
    Tls(#[from] tls::TlsError),
    #[error("{0}: {1}")]
    Io(String, #[source] std::io::Error),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A port activescale serves. Each is one server in [`run`], with its own
/// listener, TLS choice and part in the drain.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Port {
    /// Envoy's `StreamMetrics` (`sink_addr`).
    Sink,
    /// KEDA's external scaler (`scaler_addr`).
    Scaler,
    /// Probes, `/metrics`, `/v1/*` and the live view (`http_addr`).
    Http,
    /// The Custom Metrics API (`custom_metrics_addr`; off unless set).
    CustomMetrics,
    /// The activator proxy (`activator_addr`; off unless set).
    Activator,
}

impl Port {
    pub const ALL: [Port; 5] = [
        Port::Sink,
        Port::Scaler,
        Port::Http,
        Port::CustomMetrics,
        Port::Activator,
    ];

    /// What logs and errors call it.
    pub fn name(self) -> &'static str {
        match self {
            Port::Sink => "sink",
            Port::Scaler => "scaler",
            Port::Http => "HTTP",
            Port::CustomMetrics => "custom metrics",
            Port::Activator => "activator",
        }
    }

    /// Where the config puts it; `None`: turned off.
    pub fn addr(self, config: &Config) -> Option<SocketAddr> {
        match self {
            Port::Sink => Some(config.servers.sink_addr),
            Port::Scaler => Some(config.servers.scaler_addr),
            Port::Http => Some(config.servers.http_addr),
            Port::CustomMetrics => config.servers.custom_metrics_addr,
            Port::Activator => config.servers.activator_addr,
        }
    }
}

/// The listening sockets, bound before [`run`] so that tests can use port 0
/// and learn the real addresses. [`run`] serves exactly the ports bound here.
pub struct Listeners(Vec<(Port, TcpListener)>);

impl Listeners {
    /// Binds every port the config turns on.
    pub async fn bind(config: &Config) -> Result<Self> {
        Self::bind_only(config, &Port::ALL).await
    }

    /// Binds those of `ports` the config turns on (tests start subsets).
    pub async fn bind_only(config: &Config, ports: &[Port]) -> Result<Self> {
        let mut bound = Vec::new();
        for &port in ports {
            if let Some(addr) = port.addr(config) {
                let listener = TcpListener::bind(addr).await.map_err(|e| {
                    Error::Io(format!("binding the {} port {addr}", port.name()), e)
                })?;
                bound.push((port, listener));
            }
        }
        Ok(Self(bound))
    }

    /// The bound address of `port`, if it is bound.
    pub fn addr_of(&self, port: Port) -> Option<SocketAddr> {
        let (_, l) = self.0.iter().find(|(p, _)| *p == port)?;
        l.local_addr().ok()
    }

    fn take(&mut self, port: Port) -> Option<TcpListener> {
        let i = self.0.iter().position(|(p, _)| *p == port)?;
        Some(self.0.swap_remove(i).1)
    }
}

/// What [`Config::validate`] cannot check without importing the parts it
/// must not (config is a leaf): the Custom Metrics API's catalogue (its
/// PromQL rules) and whether this build serves what it names. `main` calls
/// it before binding anything (a failure exits 2, naming the setting); `run`
/// calls it again for callers that did not.
pub fn preflight(config: &Config) -> Result<()> {
    if config.servers.custom_metrics_addr.is_some() {
        custom_metrics::Catalogue::from_config(config)?;
    }
    Ok(())
}

/// This `run`'s name as a replica in the store (the activator's route
/// counts, the stream's replica of each pod) and in `/v1/status`:
/// [`store::replica_name`] (the pod name), and for a second `run` in one
/// process (tests simulating two replicas) a `#n` after it, so the two do
/// not overwrite each other's counts and can be told apart. A restarted
/// container keeps its pod's name and so its entries.
fn nth_replica() -> Arc<str> {
    static RUNS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let name = store::replica_name();
    match RUNS.fetch_add(1, Ordering::Relaxed) {
        0 => name.into(),
        // The suffix may pass the bound by a few bytes: tests only.
        n => format!("{name}#{}", n + 1).into(),
    }
}

/// Builds the store the config asks for.
pub async fn open_store(config: &Config) -> Result<SharedStore> {
    let engine = &config.engine;
    Ok(match &config.store {
        StoreConfig::Memory(_) => Arc::new(
            store::memory::MemoryStore::new(engine.pod_ttl, engine.max_window)
                .warming_up_for(config.effective_warmup()),
        ),
        StoreConfig::Redis(r) => Arc::new(store::redis::RedisStore::connect(r, engine).await?),
    })
}

/// Serves the sink, the scaler and the HTTP port until `shutdown` resolves,
/// then drains for at most `config.servers.drain_timeout`.
pub async fn run(
    config: Config,
    listeners: Listeners,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    // reqwest and the Redis client use rustls without choosing a provider.
    let _ = rustls::crypto::ring::default_provider().install_default();
    preflight(&config)?;
    let mut listeners = listeners;
    let sink_addr = listeners.addr_of(Port::Sink);
    // For the start-up line: each port's address, or "off".
    let [sink_at, scaler_at, http_at, custom_metrics_at, activator_at] = Port::ALL.map(|p| {
        listeners
            .addr_of(p)
            .map_or_else(|| "off".to_string(), |a| a.to_string())
    });
    let mut metrics = Metrics::new();
    // Checked and built before anything is served: a bad route names its setting.
    let activator = match listeners.take(Port::Activator) {
        Some(l) => Some((
            activator::Activator::new(
                activator::ActivatorSettings::from_config(&config),
                &mut metrics.registry,
            )
            .map_err(|e| Error::Config(config::ConfigError(e.to_string())))?,
            l,
        )),
        None => None,
    };
    let metrics = Arc::new(metrics);
    let token = CancellationToken::new();
    let store = open_store(&config).await?;
    let replica = nth_replica();
    let tls = config.tls.as_ref().map(tls::Tls::from_config).transpose()?;
    if let (Some(tls), Some(settings)) = (&tls, &config.tls) {
        tokio::spawn(tls.clone().watch(settings.reload_interval, token.clone()));
    }

    let filter = sink::names::NameFilter::new(
        &config.sink.metric_include,
        &config.sink.metric_exclude,
        // The bound port: what the scaler's own sidecar names its inbound scope by.
        config
            .sink
            .exclude_sink_scope
            .then_some(sink_addr.map(|a| a.port()))
            .flatten(),
    );
    let sink = sink::Sink::new(
        store.clone(),
        filter,
        replica.clone(),
        sink::SinkSettings::from_config(&config.sink),
        metrics.clone(),
        token.clone(),
    );
    let prom_settings = config.prometheus.clone();
    // Off: no recorder at all, so the engine does no work per call for it.
    let view = config.http.view_enabled.then(view::Recorder::new);
    let triggers = Arc::new(trigger::TriggerCache::new(
        trigger::TriggerSettings {
            max_window: config.engine.max_window,
            allow_cross_namespace: config.engine.allow_cross_namespace,
            prometheus: prom_settings.clone(),
        },
        config.engine.metadata_cache_size,
    ));
    let engine = engine::Engine::new(
        store.clone(),
        prometheus::PromBackend::counted(prom_settings.clone(), metrics.prometheus_queries.clone()),
        prom_settings.poll_interval,
        metrics.clone(),
        token.clone(),
    );
    let engine = match &activator {
        Some((a, _)) => {
            // Counts combine through the store, so that KEDA may ask any replica.
            activator::publish(
                &a.routes(),
                store.clone(),
                replica.clone(),
                config.engine.pod_ttl,
                token.clone(),
            );
            engine.with_routes(a.routes())
        }
        None => engine,
    };
    let engine = match &view {
        Some(v) => engine.with_record(Arc::new(v.clone())),
        None => engine,
    };
    let scaler = scaler::Scaler::new(engine.clone(), triggers, metrics.clone(), token.clone());

    let (health, health_service) = tonic_health::server::health_reporter();
    let ready = Arc::new(AtomicBool::new(false));
    let server = || {
        tonic::transport::Server::builder()
            .http2_keepalive_interval(Some(config.servers.http2_keepalive_interval))
            .http2_keepalive_timeout(Some(config.servers.http2_keepalive_timeout))
            .tcp_nodelay(true)
    };
    // The sink's connection window is 256 KiB instead of hyper's 1 MiB
    // (sink::grpc::CONNECTION_WINDOW says why); stream windows stay at
    // hyper's default. A 128 KiB stream window was tried earlier: saturated
    // ingest ran 20-30 % slower with it (one run each, not repeated).
    let sink_reflection = reflection::for_port(reflection::SINK_DESCRIPTORS, sink::SERVICE_NAME)
        .expect("the sink's descriptor set, checked by reflection's tests");
    let scaler_reflection =
        reflection::for_port(reflection::SCALER_DESCRIPTORS, scaler::SERVICE_NAME)
            .expect("the scaler's descriptor set, checked by reflection's tests");
    let read_limits = sink::ReadLimits {
        max_message: config.sink.max_message_bytes,
        message_timeout: config.sink.message_timeout,
        budget: sink::Budget::new(
            config.sink.max_buffered_bytes,
            metrics.sink_buffered_bytes.clone(),
        ),
        peer_shares: config
            .sink
            .verify_peer_address
            .then(|| Arc::new(sink::PeerShares::new(config.sink.max_message_bytes))),
    };
    let mut servers = Servers::default();
    // Per connection: a sidecar opens one stream, so a connection with many
    // is a client multiplying what it can make the sink hold.
    if let Some(l) = listeners.take(Port::Sink) {
        let tls = tls
            .clone()
            .filter(|_| config.tls.as_ref().is_some_and(|t| t.sink));
        servers.spawn(
            Port::Sink,
            server()
                .initial_connection_window_size(Some(sink::grpc::CONNECTION_WINDOW))
                .max_concurrent_streams(Some(config.sink.max_concurrent_streams))
                .add_service(health_service.clone())
                .add_service(sink_reflection.v1)
                .add_service(sink_reflection.v1alpha)
                .add_service(sink::MetricsServiceServer::new(sink, read_limits))
                .serve_with_incoming_shutdown(
                    tls::incoming(l, tls),
                    token.clone().cancelled_owned(),
                ),
        );
    }
    if let Some(l) = listeners.take(Port::Scaler) {
        let names = tls::ClientNames::new(
            config.tls.as_ref().map_or(&[][..], |t| &t.client_names),
            metrics.scaler_clients_refused.clone(),
        );
        servers.spawn(
            Port::Scaler,
            server()
                .add_service(health_service)
                .add_service(scaler_reflection.v1)
                .add_service(scaler_reflection.v1alpha)
                .add_service(scaler::ExternalScalerServer::new(scaler))
                .serve_with_incoming_shutdown(
                    tls::incoming(l, tls.clone()).client_names(names),
                    token.clone().cancelled_owned(),
                ),
        );
    }
    if let Some(l) = listeners.take(Port::CustomMetrics) {
        let api = custom_metrics::CustomMetricsApi::new(
            &config,
            Arc::new(custom_metrics::EngineSource::new(engine.clone())),
            ready.clone(),
        )?;
        let (reload, token) = (config.custom_metrics.reload_interval, token.clone());
        servers.spawn(Port::CustomMetrics, async move {
            api.serve(l, reload, token).await;
            Ok::<(), std::convert::Infallible>(())
        });
    }
    let routes = activator.as_ref().map(|(a, _)| a.routes());
    if let Some((activator, l)) = activator {
        let token = token.clone();
        servers.spawn(Port::Activator, async move {
            activator.serve(l, token).await;
            Ok::<(), std::convert::Infallible>(())
        });
    }
    if let Some(l) = listeners.take(Port::Http) {
        let app = http::router(http::AppState {
            store: store.clone(),
            metrics: metrics.clone(),
            ready: ready.clone(),
            view,
            store_kind: config.store.kind(),
            replica: replica.to_string(),
            activator: routes,
        });
        let serve = http::serve(l, app, config.http.header_timeout, token.clone());
        servers.spawn(Port::Http, async move {
            serve.await;
            Ok::<(), std::convert::Infallible>(())
        });
    }

    let readiness = tokio::spawn(watch_readiness(store.clone(), ready, health, token.clone()));
    let summary = tokio::spawn(summarise(
        metrics.clone(),
        store.clone(),
        config.telemetry.summary_interval,
        token.clone(),
    ));
    info!(sink_addr = %sink_at, scaler_addr = %scaler_at, http_addr = %http_at,
        custom_metrics_addr = %custom_metrics_at, activator_addr = %activator_at, store = ?config.store.kind(), pod_ttl = ?config.engine.pod_ttl,
        tls = tls.is_some(), mtls = tls.as_ref().is_some_and(|t| t.verifies_clients()), "activescale serving");

    let stopping = token.clone();
    tokio::select! {
        _ = shutdown => info!("shutting down: draining"),
        _ = stopping.cancelled() => {}
    }
    token.cancel();
    if tokio::time::timeout(config.servers.drain_timeout, servers.drain())
        .await
        .is_err()
    {
        warn!(timeout = ?config.servers.drain_timeout, "drain timed out; closing what is left");
    }
    readiness.abort();
    summary.abort();
    info!("stopped");
    Ok(())
}

/// The servers `run` started, each named by its port.
#[derive(Default)]
struct Servers {
    tasks: Vec<(
        Port,
        tokio::task::JoinHandle<std::result::Result<(), String>>,
    )>,
}

impl Servers {
    fn spawn<E: std::fmt::Display>(
        &mut self,
        port: Port,
        server: impl Future<Output = std::result::Result<(), E>> + Send + 'static,
    ) {
        let task = tokio::spawn(async move { server.await.map_err(|e| e.to_string()) });
        self.tasks.push((port, task));
    }

    /// Waits for every server to finish its drain, logging failures.
    async fn drain(self) {
        for (port, task) in self.tasks {
            match task.await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => error!(server = port.name(), error = %e, "server failed"),
                Err(e) => error!(server = port.name(), error = %e, "server task panicked"),
            }
        }
    }
}

/// Keeps `/readyz` and the gRPC health status in step with the store.
async fn watch_readiness(
    store: SharedStore,
    ready: Arc<AtomicBool>,
    health: tonic_health::server::HealthReporter,
    token: CancellationToken,
) {
    let mut last = None;
    loop {
        let ok = match store.ready().await {
            Ok(()) => true,
            Err(e) => {
                if last != Some(false) {
                    warn!(error = %e, "store not ready");
                }
                false
            }
        };
        if last != Some(ok) {
            ready.store(ok, Ordering::Release);
            let status = if ok {
                tonic_health::ServingStatus::Serving
            } else {
                tonic_health::ServingStatus::NotServing
            };
            for name in ["", sink::SERVICE_NAME, scaler::SERVICE_NAME] {
                health.set_service_status(name, status).await;
            }
            if ok {
                info!("ready");
            }
            last = Some(ok);
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(if ok { 2 } else { 1 })) => {}
            _ = token.cancelled() => return,
        }
    }
}

/// Logs one line for ingest and one for the API every `period`.
async fn summarise(
    metrics: Arc<Metrics>,
    store: SharedStore,
    period: Duration,
    token: CancellationToken,
) {
    let mut tick = tokio::time::interval(period);
    tick.tick().await;
    let counters = |m: &Metrics| {
        [
            m.sink_messages.get(),
            m.family("kept").get(),
            m.family("skipped").get(),
            m.family("rejected").get(),
            m.sink_identity_missing.get(),
            m.sink_store_errors.get(),
            m.api_calls.get(),
            m.api_errors.get(),
            m.scaler_pushes.get(),
        ]
    };
    let mut before = counters(&metrics);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = token.cancelled() => return,
        }
        let now = counters(&metrics);
        let d: Vec<u64> = now.iter().zip(before).map(|(n, b)| n - b).collect();
        before = now;
        info!(
            messages = d[0],
            kept = d[1],
            skipped = d[2],
            rejected = d[3],
            identity_missing = d[4],
            store_errors = d[5],
            streams = metrics.sink_streams.get(),
            pods = store.tracked_pods(),
            "metrics batches received; stored active_requests"
        );
        info!(
            calls = d[6],
            errors = d[7],
            pushes = d[8],
            streams = metrics.scaler_streams.get(),
            "API responses"
        );
    }
}

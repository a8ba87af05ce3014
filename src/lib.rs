//! activescale: a KEDA external scaler fed by Envoy's metrics service.
//!
//! # Layout
//!
//! Data flows one way, sink → store → scaler:
//!
//! ```text
//!  Envoy sidecars ──StreamMetrics──▶ sink ──record──▶ store ──summary/watch──▶ scaler ◀──gRPC── KEDA
//!                    (:9000)                      memory | redis                (:9090)
//!                                                                      prometheus ─┘ (source: prometheus)
//! ```
//!
//! - [`sink`]: `envoy.service.metrics.v3.MetricsService`; learns each stream's
//!   pod, keeps the inbound `downstream_rq_active` gauges, writes them to the store.
//! - [`store`]: the [`store::Store`] trait the two sides share, with
//!   [`store::memory`] and [`store::redis`]; TTL, value history, change signals.
//! - [`scaler`]: KEDA's `externalscaler.ExternalScaler`; the one place where
//!   errors become gRPC statuses. StreamIsActive streams of one query share a
//!   read loop (a feed).
//! - [`trigger`]: trigger-metadata parsing and the parsed-trigger cache.
//! - [`selector`]: Kubernetes label selectors.
//! - [`prometheus`]: the optional Prometheus backend (`source: prometheus`).
//! - [`http`]: `/healthz`, `/readyz`, `/metrics`, `/v1/pods`, and the live view.
//! - [`view`]: what KEDA asked and was answered, for the page at `/`.
//! - [`custom_metrics`]: the Custom Metrics API (`custom.metrics.k8s.io`)
//!   for plain HPAs, HTTPS with front-proxy authentication.
//! - [`tls`]: optional TLS/mTLS on both gRPC ports, certificates reloaded on rotation.
//! - [`reflection`]: gRPC server reflection on both gRPC ports (`grpcurl`).
//! - [`activator`]: the optional proxy that holds requests for a workload at
//!   zero, counts them for KEDA at once and forwards them once it is ready.
//! - [`check`]: `activescale check`, offline validation of ScaledObject YAML.
//! - [`config`]: the one typed configuration, validated before anything binds.
//! - [`telemetry`]: logs, the service's own metrics, summary lines.
//!
//! [`run`] serves everything on listeners the caller bound, until `shutdown`
//! resolves; `main` only parses flags, binds and calls it, and the integration
//! tests call it with `127.0.0.1:0` listeners.

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
pub mod prometheus;
pub mod reflection;
pub mod scaler;
pub mod selector;
pub mod sink;
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

use config::{Config, StoreKind};
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
    #[error("{0}: {1}")]
    Io(String, #[source] std::io::Error),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The three listening sockets, bound before [`run`] so that tests can use
/// port 0 and learn the real addresses.
pub struct Listeners {
    pub sink: TcpListener,
    pub scaler: TcpListener,
    pub http: TcpListener,
}

impl Listeners {
    /// Binds the addresses of `config`.
    pub async fn bind(config: &Config) -> Result<Self> {
        async fn one(addr: SocketAddr, what: &str) -> Result<TcpListener> {
            TcpListener::bind(addr)
                .await
                .map_err(|e| Error::Io(format!("binding the {what} port {addr}"), e))
        }
        Ok(Self {
            sink: one(config.sink_addr, "sink").await?,
            scaler: one(config.scaler_addr, "scaler").await?,
            http: one(config.http_addr, "HTTP").await?,
        })
    }

    /// The bound addresses (sink, scaler, http).
    pub fn addrs(&self) -> Result<(SocketAddr, SocketAddr, SocketAddr)> {
        let addr = |l: &TcpListener| {
            l.local_addr()
                .map_err(|e| Error::Io("local address".into(), e))
        };
        Ok((addr(&self.sink)?, addr(&self.scaler)?, addr(&self.http)?))
    }
}

/// Builds the store the config asks for.
pub async fn open_store(config: &Config) -> Result<SharedStore> {
    Ok(match config.store {
        StoreKind::Memory => Arc::new(
            store::memory::MemoryStore::new(config.pod_ttl, config.max_window)
                .warming_up_for(config.effective_warmup()),
        ),
        StoreKind::Redis => Arc::new(store::redis::RedisStore::connect(config).await?),
    })
}

/// Serves the sink, the scaler and the HTTP port until `shutdown` resolves,
/// then drains for at most `config.drain_timeout`.
pub async fn run(
    config: Config,
    listeners: Listeners,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    // reqwest and the Redis client use rustls without choosing a provider.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let (sink_addr, scaler_addr, http_addr) = listeners.addrs()?;
    let metrics = Arc::new(Metrics::new());
    let token = CancellationToken::new();
    let store = open_store(&config).await?;
    let tls = tls::Tls::from_config(&config)?;
    if let Some(tls) = &tls {
        tokio::spawn(tls.clone().watch(config.tls_reload_interval, token.clone()));
    }

    let filter = sink::names::NameFilter::new(
        &config.metric_include,
        &config.metric_exclude,
        // The bound port: what the scaler's own sidecar names its inbound scope by.
        config.exclude_sink_scope.then_some(sink_addr.port()),
    );
    let sink = sink::Sink::new(
        store.clone(),
        filter,
        sink::SinkSettings::from_config(&config),
        metrics.clone(),
        token.clone(),
    );
    let prom_settings = prometheus::PromSettings {
        enforce_namespace: config.prometheus_enforce_namespace,
        cache_ttl: config.prometheus_cache_ttl,
        poll_interval: config.prometheus_poll_interval,
        default_timeout: config.prometheus_timeout,
        credentials_dir: config.prometheus_credentials_dir.clone(),
        max_response_bytes: config.prometheus_max_response_bytes,
    };
    let view = view::Recorder::new();
    let triggers = Arc::new(trigger::TriggerCache::new(
        trigger::TriggerSettings {
            max_window: config.max_window,
            allow_cross_namespace: config.allow_cross_namespace,
            prometheus: prom_settings.clone(),
        },
        config.metadata_cache_size,
    ));
    let engine = engine::Engine::new(
        store.clone(),
        prometheus::PromBackend::counted(prom_settings.clone(), metrics.prometheus_queries.clone()),
        prom_settings.poll_interval,
        metrics.clone(),
        token.clone(),
    );
    let scaler = scaler::Scaler::new(
        engine,
        triggers,
        metrics.clone(),
        token.clone(),
        view.clone(),
    );

    let (health, health_service) = tonic_health::server::health_reporter();
    let ready = Arc::new(AtomicBool::new(false));
    let server = || {
        tonic::transport::Server::builder()
            .http2_keepalive_interval(Some(config.http2_keepalive_interval))
            .http2_keepalive_timeout(Some(config.http2_keepalive_timeout))
            .tcp_nodelay(true)
    };
    // hyper's default HTTP/2 windows (1 MiB per stream) stay: a sidecar sends
    // one message per flush, so little is ever unread. A 128 KiB stream window
    // was tried: it bounded what a flooding client parks in the server, but
    // saturated ingest ran 20-30 % slower with it (one run each; likely the
    // extra WINDOW_UPDATE frames).
    let sink_reflection = reflection::for_port(reflection::SINK_DESCRIPTORS, sink::SERVICE_NAME)
        .expect("the sink's descriptor set, checked by reflection's tests");
    let scaler_reflection =
        reflection::for_port(reflection::SCALER_DESCRIPTORS, scaler::SERVICE_NAME)
            .expect("the scaler's descriptor set, checked by reflection's tests");
    let read_limits = sink::ReadLimits {
        max_message: config.max_message_bytes,
        message_timeout: config.sink_message_timeout,
        budget: sink::Budget::new(
            config.sink_max_buffered_bytes,
            metrics.sink_buffered_bytes.clone(),
        ),
    };
    // Per connection: a sidecar opens one stream, so a connection with many
    // is a client multiplying what it can make the sink hold.
    let sink_server = server()
        .max_concurrent_streams(Some(config.sink_max_concurrent_streams))
        .add_service(health_service.clone())
        .add_service(sink_reflection.v1)
        .add_service(sink_reflection.v1alpha)
        .add_service(sink::MetricsServiceServer::new(sink, read_limits))
        .serve_with_incoming_shutdown(
            tls::incoming(listeners.sink, tls.clone().filter(|_| config.tls_sink)),
            token.clone().cancelled_owned(),
        );
    let scaler_server = server()
        .add_service(health_service)
        .add_service(scaler_reflection.v1)
        .add_service(scaler_reflection.v1alpha)
        .add_service(scaler::ExternalScalerServer::new(scaler))
        .serve_with_incoming_shutdown(
            tls::incoming(listeners.scaler, tls.clone()).client_names(tls::ClientNames::new(
                &config.tls_client_names,
                metrics.scaler_clients_refused.clone(),
            )),
            token.clone().cancelled_owned(),
        );
    let app = http::router(http::AppState {
        store: store.clone(),
        metrics: metrics.clone(),
        ready: ready.clone(),
        view: config.view_enabled.then_some(view),
        store_kind: config.store,
        replica: view::replica_name(),
        activator: None,
    });
    let http_server = http::serve(
        listeners.http,
        app,
        config.http_header_timeout,
        token.clone(),
    );

    let readiness = tokio::spawn(watch_readiness(store.clone(), ready, health, token.clone()));
    let summary = tokio::spawn(summarise(
        metrics.clone(),
        store.clone(),
        config.summary_interval,
        token.clone(),
    ));
    info!(%sink_addr, %scaler_addr, %http_addr, store = ?config.store, pod_ttl = ?config.pod_ttl,
        tls = tls.is_some(), mtls = tls.as_ref().is_some_and(|t| t.verifies_clients()), "activescale serving");

    let sink_task = tokio::spawn(sink_server);
    let scaler_task = tokio::spawn(scaler_server);
    let http_task = tokio::spawn(async move {
        http_server.await;
        Ok::<(), std::convert::Infallible>(())
    });

    let stopping = token.clone();
    tokio::select! {
        _ = shutdown => info!("shutting down: draining"),
        _ = stopping.cancelled() => {}
    }
    token.cancel();
    let drain = async {
        let (a, b, c) = tokio::join!(sink_task, scaler_task, http_task);
        for (what, r) in [
            ("sink", a.map(|r| r.map_err(|e| e.to_string()))),
            ("scaler", b.map(|r| r.map_err(|e| e.to_string()))),
            ("http", c.map(|r| r.map_err(|e| e.to_string()))),
        ] {
            match r {
                Ok(Ok(())) => {}
                Ok(Err(e)) => error!(server = what, error = %e, "server failed"),
                Err(e) => error!(server = what, error = %e, "server task panicked"),
            }
        }
    };
    if tokio::time::timeout(config.drain_timeout, drain)
        .await
        .is_err()
    {
        warn!(timeout = ?config.drain_timeout, "drain timed out; closing what is left");
    }
    readiness.abort();
    summary.abort();
    info!("stopped");
    Ok(())
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

//! Logs, the service's own Prometheus metrics, and the periodic summary lines.
//!
//! Log level: `RUST_LOG` when set, else `LOG_VERBOSITY` read the klog way
//! (0–2 info, 3–4 debug, 5+ trace), else info. `--log-format json` switches
//! to one JSON object per line.

use std::{
    sync::{
        Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};
use tracing_subscriber::{EnvFilter, fmt, prelude::*};

/// How log lines are written.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum LogFormat {
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// Installs the global tracing subscriber. Safe to call more than once (tests):
/// later calls are ignored.
pub fn init(format: LogFormat) {
    let filter = match std::env::var("RUST_LOG") {
        Ok(spec) if !spec.is_empty() => EnvFilter::new(spec),
        _ => EnvFilter::new(level_for_verbosity(
            std::env::var("LOG_VERBOSITY").ok().as_deref(),
        )),
    };
    let registry = tracing_subscriber::registry().with(filter);
    let _ = match format {
        LogFormat::Json => registry
            .with(fmt::layer().json().flatten_event(true))
            .try_init(),
        LogFormat::Text => registry
            .with(fmt::layer().with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout())))
            .try_init(),
    };
}

/// klog verbosity to a tracing level for this crate (dependencies stay at info
/// until trace, where everything is shown).
pub fn level_for_verbosity(v: Option<&str>) -> &'static str {
    match v.and_then(|v| v.trim().parse::<u32>().ok()) {
        Some(0..=2) | None => "info",
        Some(3..=4) => "info,activescale=debug",
        Some(_) => "trace",
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabel {
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RpcLabels {
    pub method: &'static str,
    pub code: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MethodLabel {
    pub method: &'static str,
}

/// Every metric the service exports on `/metrics`.
pub struct Metrics {
    pub registry: Registry,
    /// Envoy messages received.
    pub sink_messages: Counter,
    /// Metric families by outcome: kept; rejected (a value no gauge has, no
    /// value, or a new family past `max_families_per_pod`); skipped (filtered
    /// out, repeated in its message, or on a stream without a usable or
    /// accepted identity).
    pub sink_families: Family<OutcomeLabel, Counter>,
    /// Messages whose stream had no usable pod identity.
    pub sink_identity_missing: Counter,
    /// Messages dropped because the pod identity their stream claims was
    /// refused, by reason: `inconsistent` (metadata names another pod than
    /// the node id), `peer_address` (the stream does not come from an IP the
    /// node claims), `bound_elsewhere` (the pod is live and bound to another
    /// address).
    pub sink_identity_refused: Family<ReasonLabel, Counter>,
    /// Streams ended by an error, by reason.
    pub sink_stream_errors: Family<ReasonLabel, Counter>,
    /// Messages whose samples could not be written to the store.
    pub sink_store_errors: Counter,
    /// Envoy streams open now.
    pub sink_streams: Gauge,
    /// Bytes of Envoy messages held while they arrive (`sink_max_buffered_bytes`).
    pub sink_buffered_bytes: Gauge,
    /// Pods the store tracks (where the store can tell cheaply).
    pub pods_tracked: Gauge,
    /// 1 while the store answers its readiness check (what `/readyz` says).
    pub store_ready: Gauge,
    /// Requests sent to Prometheus servers for prometheus-source triggers
    /// (cache hits and joined in-flight requests are not counted), by
    /// outcome: `value`, `empty` or `error`.
    pub prometheus_queries: Family<OutcomeLabel, Counter>,
    /// KEDA RPCs by method and gRPC code.
    pub rpc_requests: Family<RpcLabels, Counter>,
    /// KEDA RPC latency by method.
    pub rpc_duration: Family<MethodLabel, Histogram>,
    /// StreamIsActive streams open now.
    pub scaler_streams: Gauge,
    /// StreamIsActive messages pushed.
    pub scaler_pushes: Counter,
    /// Scaler-port connections closed after the TLS handshake because the
    /// client certificate carries none of `tls_client_names`.
    pub scaler_clients_refused: Counter,
    /// Shared read loops behind the StreamIsActive streams of Envoy triggers
    /// (one per distinct query): the store reads per change.
    pub scaler_feeds: Gauge,
    /// Feeds whose last read failed: their streams are silent until one succeeds.
    pub scaler_feeds_unknown: Gauge,
    /// KEDA RPCs answered, and of those with an error (for the summary line;
    /// `rpc_requests` has the breakdown).
    pub api_calls: Counter,
    pub api_errors: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("activescale");
        let m = Metrics {
            sink_messages: Counter::default(),
            sink_families: Family::default(),
            sink_identity_missing: Counter::default(),
            sink_identity_refused: Family::default(),
            sink_stream_errors: Family::default(),
            sink_store_errors: Counter::default(),
            sink_streams: Gauge::default(),
            sink_buffered_bytes: Gauge::default(),
            pods_tracked: Gauge::default(),
            store_ready: Gauge::default(),
            prometheus_queries: Family::default(),
            rpc_requests: Family::default(),
            rpc_duration: Family::new_with_constructor(|| {
                // 50 µs .. ~3 s: an in-memory answer is tens of µs, a
                // Prometheus round trip tens of ms.
                Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
                    0.00005, 2.5, 13,
                ))
            }),
            scaler_streams: Gauge::default(),
            scaler_pushes: Counter::default(),
            scaler_clients_refused: Counter::default(),
            scaler_feeds: Gauge::default(),
            scaler_feeds_unknown: Gauge::default(),
            api_calls: Counter::default(),
            api_errors: Counter::default(),
            registry: Registry::default(),
        };
        registry.register(
            "sink_messages",
            "Envoy metrics messages received",
            m.sink_messages.clone(),
        );
        registry.register(
            "sink_families",
            "Metric families received, by outcome",
            m.sink_families.clone(),
        );
        registry.register(
            "sink_identity_missing",
            "Messages on streams without a usable pod identity",
            m.sink_identity_missing.clone(),
        );
        registry.register(
            "sink_identity_refused",
            "Messages dropped because their stream's claimed pod identity was refused, by reason",
            m.sink_identity_refused.clone(),
        );
        registry.register(
            "sink_stream_errors",
            "Envoy streams ended by an error, by reason",
            m.sink_stream_errors.clone(),
        );
        registry.register(
            "sink_store_errors",
            "Messages whose samples the store did not take",
            m.sink_store_errors.clone(),
        );
        registry.register(
            "sink_streams_open",
            "Envoy metrics streams open",
            m.sink_streams.clone(),
        );
        registry.register(
            "sink_buffered_bytes",
            "Bytes of Envoy messages held while they arrive (at most sink_max_buffered_bytes)",
            m.sink_buffered_bytes.clone(),
        );
        registry.register(
            "pods_tracked",
            "Pods with a live sample in the store",
            m.pods_tracked.clone(),
        );
        registry.register(
            "store_ready",
            "1 while the store answers its readiness check",
            m.store_ready.clone(),
        );
        registry.register(
            "prometheus_queries",
            "Requests sent to Prometheus servers for prometheus-source triggers, by outcome",
            m.prometheus_queries.clone(),
        );
        registry.register(
            "rpc_requests",
            "KEDA external scaler RPCs, by method and code",
            m.rpc_requests.clone(),
        );
        registry.register(
            "rpc_duration_seconds",
            "KEDA external scaler RPC latency",
            m.rpc_duration.clone(),
        );
        registry.register(
            "scaler_streams_open",
            "StreamIsActive streams open",
            m.scaler_streams.clone(),
        );
        registry.register(
            "scaler_pushes",
            "StreamIsActive messages sent",
            m.scaler_pushes.clone(),
        );
        registry.register(
            "scaler_clients_refused",
            "Scaler connections closed because the client certificate has no name in tls_client_names",
            m.scaler_clients_refused.clone(),
        );
        registry.register(
            "scaler_feeds_running",
            "Shared store reads behind StreamIsActive streams (one per distinct query)",
            m.scaler_feeds.clone(),
        );
        registry.register(
            "scaler_feeds_unknown",
            "Feeds whose last read failed; their StreamIsActive streams stay open and silent",
            m.scaler_feeds_unknown.clone(),
        );
        Metrics { registry, ..m }
    }

    /// The text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }

    pub fn family(&self, outcome: &'static str) -> Counter {
        self.sink_families
            .get_or_create(&OutcomeLabel { outcome })
            .clone()
    }
}

/// Logs at most once per `period`, counting what it held back.
///
/// Network input can produce an error per message from thousands of streams;
/// one line per period with the count says the same without flooding.
pub struct RateLimit {
    period: Duration,
    last: Mutex<Option<Instant>>,
    suppressed: AtomicU64,
}

impl RateLimit {
    pub const fn new(period: Duration) -> Self {
        Self {
            period,
            last: Mutex::new(None),
            suppressed: AtomicU64::new(0),
        }
    }

    /// `Some(n)` when the caller should log now (`n` lines were held back
    /// since the last one), `None` when it should stay quiet.
    pub fn check(&self) -> Option<u64> {
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        match *last {
            Some(t) if now.duration_since(t) < self.period => {
                self.suppressed.fetch_add(1, Ordering::Relaxed);
                None
            }
            _ => {
                *last = Some(now);
                Some(self.suppressed.swap(0, Ordering::Relaxed))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn klog_verbosity_levels() {
        assert_eq!(level_for_verbosity(None), "info");
        assert_eq!(level_for_verbosity(Some("2")), "info");
        assert_eq!(level_for_verbosity(Some("4")), "info,activescale=debug");
        assert_eq!(level_for_verbosity(Some("7")), "trace");
        assert_eq!(level_for_verbosity(Some("loud")), "info");
    }

    #[test]
    fn rate_limit_counts_what_it_holds_back() {
        let r = RateLimit::new(Duration::from_secs(3600));
        assert_eq!(r.check(), Some(0));
        assert_eq!(r.check(), None);
        assert_eq!(r.check(), None);
        *r.last.lock().unwrap() = Some(Instant::now() - Duration::from_secs(7200));
        assert_eq!(r.check(), Some(2));
    }

    #[test]
    fn exposition_names_the_metrics() {
        let m = Metrics::new();
        m.sink_messages.inc();
        m.family("kept").inc_by(3);
        let text = m.encode();
        assert!(text.contains("activescale_sink_messages_total 1"), "{text}");
        assert!(
            text.contains("activescale_sink_families_total{outcome=\"kept\"} 3"),
            "{text}"
        );
    }
}

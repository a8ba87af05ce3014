//! The service's configuration: one typed struct, loaded and validated once at
//! start-up, before anything binds.
//!
//! Sources, later ones winning: built-in defaults, `--config FILE` (YAML or
//! TOML), the Redis variables operators of the earlier tool use (`REDIS_URL`,
//! `REDIS_PASSWORD`, ...), environment variables `ACTIVESCALE_<FIELD>` (for
//! example `ACTIVESCALE_POD_TTL=20s`), then command-line flags. Every field has
//! a default; durations are written the humantime way (`15s`, `500ms`, `2m`).
//!
//! Those sources fill a private flat struct, `FileConfig`, whose field names
//! are the file keys, the `ACTIVESCALE_*` names and the flags. It is checked
//! (files and URLs included: everything that can be known before binding),
//! then turned once into [`Config`], one group per part ([`SinkConfig`],
//! [`StoreConfig`], [`EngineConfig`], [`PrometheusConfig`], [`TlsConfig`],
//! ...); each part is built from its group. This module imports nothing else
//! of the crate, so every part may depend on it.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use serde::{Deserialize, Serialize};

/// Which store backs the sink and the scaler.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum StoreKind {
    /// In-process; one replica only.
    #[default]
    Memory,
    /// Redis or Valkey, shared by every replica.
    Redis,
}

/// Log line format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// Every setting of the service in the flat form of the file, the
/// environment and the flags: its field names are the file keys, the
/// `ACTIVESCALE_*` names and the flags (the contract with users'
/// configs, the chart's `config:` values and scripts/helm-lint.py, which
/// reads this struct's fields). serde's `flatten` cannot be combined with
/// `deny_unknown_fields`, so the groups of [`Config`] are built from this
/// once, after it is checked, instead of being deserialized directly.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct FileConfig {
    /// Where the Envoy metrics sink (gRPC `StreamMetrics`) listens.
    pub sink_addr: SocketAddr,
    /// Where KEDA's external scaler gRPC service listens.
    pub scaler_addr: SocketAddr,
    /// Where `/healthz`, `/readyz`, `/metrics` and `/v1/pods` are served.
    pub http_addr: SocketAddr,
    /// A pod not heard from for this long drops out of every answer
    /// (three Envoy flushes by default).
    #[serde(with = "humantime_serde")]
    pub pod_ttl: Duration,
    /// `memory` (one replica) or `redis` (several replicas, one view).
    pub store: StoreKind,
    /// Largest Envoy message accepted, in bytes. A full Envoy stats dump can
    /// exceed gRPC's usual 4 MiB. With `sink_verify_peer_address`, also what
    /// one pod address may hold of `sink_max_buffered_bytes` at once.
    pub max_message_bytes: usize,
    /// Stat-name globs the sink keeps (`*` matches anything).
    pub metric_include: Vec<String>,
    /// Stat-name globs the sink drops even when included.
    pub metric_exclude: Vec<String>,
    /// Also drop the sink's own inbound scope
    /// (`http.inbound_0.0.0.0_<sink port>;`), where the scaler's sidecar counts
    /// Envoy's long-lived metrics streams as requests in flight.
    pub exclude_sink_scope: bool,
    /// Distinct stat families kept per pod (1 to 1024). Families past it, in
    /// one message or over time, are rejected and counted; those a pod
    /// already has keep updating. Bounds what one pod costs the store.
    pub max_families_per_pod: usize,
    /// Accept a sidecar stream only from the pod IP its node id (or its
    /// `INSTANCE_IPS`) names. Turn off where something between the sidecars
    /// and the sink rewrites source addresses (SNAT); a pod then still stays
    /// bound to the address it was first seen from until it expires. While
    /// on, one address holds at most `max_message_bytes` of
    /// `sink_max_buffered_bytes` at once (off, addresses are not pods).
    pub sink_verify_peer_address: bool,
    /// Bytes of Envoy messages all sidecar streams together may hold while
    /// they arrive (1 MiB to 1 GiB, at least `max_message_bytes`). A message
    /// is admitted whole when its prefix declares its length; one that does
    /// not fit is not read (HTTP/2 flow control holds its sender back) and
    /// holds nothing until it does.
    pub sink_max_buffered_bytes: usize,
    /// Concurrent HTTP/2 streams per sink connection (1 to 10000). A sidecar
    /// opens one.
    pub sink_max_concurrent_streams: u32,
    /// A message whose first byte has arrived must be whole within this long
    /// (1s to 5m), and once admitted arrive at the pace that finishes it in
    /// time (64 KiB ahead); else its stream ends with
    /// RESOURCE_EXHAUSTED and gives its bytes back.
    #[serde(with = "humantime_serde")]
    pub sink_message_timeout: Duration,
    /// Longest `window` a trigger may ask for; pod history older than this is
    /// forgotten.
    #[serde(with = "humantime_serde")]
    pub max_window: Duration,
    /// After start-up, envoy-source answers are UNAVAILABLE for this long so
    /// that an empty store is not read as "no load" before sidecars have
    /// reconnected. Unset: 10s with the memory store, 0s with Redis (its data
    /// outlives a restart). With Redis, the same span (unset: 10s) applies
    /// after a restart of the Redis node instead.
    #[serde(with = "humantime_serde")]
    pub warmup: Option<Duration>,
    /// Let a trigger's `namespace` metadata read pods of another namespace.
    /// Off: a trigger sees only its ScaledObject's namespace.
    pub allow_cross_namespace: bool,
    /// Serve the live view on the HTTP port: the page at `/` and its JSON,
    /// `/v1/triggers` (what KEDA asked and was answered) and `/v1/status`.
    /// Off: those three answer 404. The view shows every namespace's
    /// triggers to whoever reaches the HTTP port.
    pub view_enabled: bool,
    /// Parsed trigger metadata kept (one entry per ScaledObject trigger).
    pub metadata_cache_size: usize,
    /// `text` or `json`.
    pub log_format: LogFormat,
    /// How often the ingest and API summary lines are logged.
    #[serde(with = "humantime_serde")]
    pub summary_interval: Duration,
    /// On SIGTERM, how long open streams and calls get to finish.
    #[serde(with = "humantime_serde")]
    pub drain_timeout: Duration,
    /// The HTTP port closes a connection that has not sent a whole request
    /// head within this long (slowloris), so such connections neither pile
    /// up nor stretch the drain. 1s to 30s.
    #[serde(with = "humantime_serde")]
    pub http_header_timeout: Duration,
    /// HTTP/2 keepalive ping interval on both gRPC ports, so idle
    /// StreamIsActive and Envoy streams survive proxies and NAT.
    #[serde(with = "humantime_serde")]
    pub http2_keepalive_interval: Duration,
    /// How long a keepalive ping may go unanswered before the connection is closed.
    #[serde(with = "humantime_serde")]
    pub http2_keepalive_timeout: Duration,

    /// Redis/Valkey URL: `redis://`, `rediss://` (TLS). Also `REDIS_URL`.
    pub redis_url: String,
    /// ACL user name (`REDIS_USERNAME`).
    pub redis_username: Option<String>,
    /// Password (`REDIS_PASSWORD`).
    pub redis_password: Option<String>,
    /// Database number (`REDIS_DB`); not available with cluster mode.
    pub redis_db: Option<i64>,
    /// Use TLS even with a `redis://` URL (`REDIS_TLS=true`).
    pub redis_tls: bool,
    /// CA bundle to verify the server with (`REDIS_CA_FILE`).
    pub redis_ca_file: Option<PathBuf>,
    /// Skip server certificate verification (`REDIS_TLS_INSECURE=true`). Never in production.
    pub redis_tls_insecure: bool,
    /// Client certificate for mutual TLS (`REDIS_CERT_FILE`).
    pub redis_cert_file: Option<PathBuf>,
    /// Client key for mutual TLS (`REDIS_KEY_FILE`).
    pub redis_key_file: Option<PathBuf>,
    /// Redis Cluster / Valkey cluster mode (`REDIS_CLUSTER=true`).
    pub redis_cluster: bool,
    /// Connections in the command pool.
    pub redis_pool_size: usize,
    /// Deadline for one Redis command or pipeline.
    #[serde(with = "humantime_serde")]
    pub redis_timeout: Duration,
    /// Prefix of every key and channel, so several installs can share one Redis.
    pub redis_key_prefix: String,

    /// Inject `namespace="<ScaledObject namespace>"` into every vector selector
    /// of prometheus-source queries.
    pub prometheus_enforce_namespace: bool,
    /// How long a Prometheus result is reused for the same (server, query).
    #[serde(with = "humantime_serde")]
    pub prometheus_cache_ttl: Duration,
    /// How often StreamIsActive re-reads prometheus-source triggers.
    #[serde(with = "humantime_serde")]
    pub prometheus_poll_interval: Duration,
    /// Default query timeout when the trigger sets none.
    #[serde(with = "humantime_serde")]
    pub prometheus_timeout: Duration,
    /// Largest Prometheus response body read; a longer one is an error
    /// (UNAVAILABLE), not a reason to keep reading.
    pub prometheus_max_response_bytes: usize,
    /// Files named by triggers (`caCert`, `bearerTokenFile`, `passwordFile`)
    /// are read only from `<this>/<ScaledObject namespace>/`.
    pub prometheus_credentials_dir: PathBuf,

    /// PEM certificate chain for TLS on both gRPC ports.
    pub tls_cert: Option<PathBuf>,
    /// PEM private key for `tls_cert`.
    pub tls_key: Option<PathBuf>,
    /// PEM CA bundle; when set, clients must present a certificate it signed (mTLS).
    pub tls_client_ca: Option<PathBuf>,
    /// Client certificate names the scaler port accepts (needs
    /// `tls_client_ca`): a URI SAN such as KEDA's SPIFFE ID, a DNS SAN, or,
    /// on a certificate without SANs, the subject CN. The scaler answers for
    /// any namespace a caller names, so only KEDA should be able to call;
    /// empty: any certificate `tls_client_ca` signed.
    pub tls_client_names: Vec<String>,
    /// How often the TLS files are checked for changes (cert-manager rotation).
    #[serde(with = "humantime_serde")]
    pub tls_reload_interval: Duration,
    /// Serve the Envoy sink with TLS too when `tls_cert` is set. Off: TLS (and
    /// mTLS) towards KEDA only, while sidecars keep their plaintext metrics
    /// connection (they connect outside the mesh, and a CA or client
    /// certificate in every sidecar is rarely practical).
    pub tls_sink: bool,

    // The Custom Metrics API (`custom.metrics.k8s.io`, src/custom_metrics/).
    /// Where the Custom Metrics API listens (HTTPS only). Unset: not served.
    pub custom_metrics_addr: Option<SocketAddr>,
    /// PEM certificate chain of the Custom Metrics API, reloaded like
    /// `tls_cert`. Unset: a self-signed certificate is made at start-up.
    pub custom_metrics_tls_cert: Option<PathBuf>,
    /// PEM private key for `custom_metrics_tls_cert`.
    pub custom_metrics_tls_key: Option<PathBuf>,
    /// DNS names and IP addresses of the self-signed certificate.
    pub custom_metrics_tls_names: Vec<String>,
    /// The front-proxy CA (`requestheader-client-ca-file` of the
    /// `extension-apiserver-authentication` ConfigMap): requests must come
    /// with a client certificate it signed. Unset: allowed only on a loopback
    /// `custom_metrics_addr`, and nothing is checked.
    pub custom_metrics_client_ca: Option<PathBuf>,
    /// Common names the front-proxy certificate may have
    /// (`requestheader-allowed-names`); empty: any certificate of the CA.
    pub custom_metrics_allowed_names: Vec<String>,
    /// Headers naming the user, first non-empty wins (`requestheader-username-headers`).
    pub custom_metrics_username_headers: Vec<String>,
    /// Headers listing the user's groups (`requestheader-group-headers`).
    pub custom_metrics_group_headers: Vec<String>,
    /// Prefixes of headers carrying the user's extra attributes
    /// (`requestheader-extra-headers-prefix`).
    pub custom_metrics_extra_headers_prefix: Vec<String>,
    /// Windowed forms of `active_requests`, `<max|avg>_<duration>` each:
    /// `max_30s` serves `active_requests_max_30s`, every pod's peak over 30 s.
    pub custom_metrics_windows: Vec<String>,
    /// Per-pod metrics computed by Prometheus (see [`CustomMetricsRule`]).
    pub custom_metrics_rules: Vec<CustomMetricsRule>,
    // The activator (src/activator): the proxy that holds requests for a
    // workload at zero until it can take them.
    /// Where the activator proxy listens (HTTP/1.1 and cleartext HTTP/2);
    /// unset: no proxy.
    pub activator_addr: Option<SocketAddr>,
    /// Which Host (and path prefix) goes to which upstream; config file only.
    pub activator_routes: Vec<ActivatorRoute>,
    /// Requests one route holds while its upstream cannot take them; past
    /// it, 503 with `Retry-After`.
    pub activator_max_pending: usize,
    /// Requests all routes together hold: bounds memory under a burst
    /// however many routes there are.
    pub activator_max_pending_total: usize,
    /// Longest a request is held; then 504.
    #[serde(with = "humantime_serde")]
    pub activator_hold_timeout: Duration,
    /// Connect probes of an upstream start at least this often while
    /// requests wait for it.
    #[serde(with = "humantime_serde")]
    pub activator_probe_interval: Duration,
    /// While nothing waits, probes back off (doubling) up to this interval.
    #[serde(with = "humantime_serde")]
    pub activator_probe_max_interval: Duration,
    /// Deadline of one TCP connect to an upstream (probe or request); a
    /// request whose connect fails or times out is held again.
    #[serde(with = "humantime_serde")]
    pub activator_connect_timeout: Duration,
    /// A client must send a complete request head within this long of
    /// connecting or of its previous response (also the keep-alive idle
    /// timeout of HTTP/1.1 connections).
    #[serde(with = "humantime_serde")]
    pub activator_header_read_timeout: Duration,
    /// Client connections open at once; past it, new ones wait in the
    /// kernel's accept queue.
    pub activator_max_connections: usize,
}

/// One route of the activator proxy.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ActivatorRoute {
    /// `Host` / `:authority` to match (port ignored): a DNS name, or
    /// `*.example.com` for any name under `example.com`.
    pub host: String,
    /// Path prefix to match, by whole segments (`/api` matches `/api` and
    /// `/api/x`, not `/apix`); unset: `/`.
    #[serde(default)]
    pub path_prefix: Option<String>,
    /// `host:port` requests are forwarded to, e.g. `web.shop.svc.cluster.local:80`.
    pub upstream: String,
    /// The namespace whose triggers may read this route's count.
    pub namespace: String,
}

impl Default for FileConfig {
    fn default() -> Self {
        Self {
            sink_addr: ([0, 0, 0, 0], 9000).into(),
            scaler_addr: ([0, 0, 0, 0], 9090).into(),
            http_addr: ([0, 0, 0, 0], 8080).into(),
            pod_ttl: Duration::from_secs(15),
            store: StoreKind::Memory,
            max_message_bytes: 16 * 1024 * 1024,
            metric_include: default_metric_include(),
            metric_exclude: default_metric_exclude(),
            exclude_sink_scope: true,
            max_families_per_pod: DEFAULT_MAX_FAMILIES,
            sink_verify_peer_address: true,
            sink_max_buffered_bytes: 64 * 1024 * 1024,
            sink_max_concurrent_streams: 100,
            sink_message_timeout: Duration::from_secs(10),
            max_window: Duration::from_secs(600),
            warmup: None,
            allow_cross_namespace: false,
            view_enabled: true,
            metadata_cache_size: 10_000,
            log_format: LogFormat::Text,
            summary_interval: Duration::from_secs(60),
            drain_timeout: Duration::from_secs(10),
            http_header_timeout: Duration::from_secs(10),
            http2_keepalive_interval: Duration::from_secs(30),
            http2_keepalive_timeout: Duration::from_secs(10),
            redis_url: "redis://127.0.0.1:6379".into(),
            redis_username: None,
            redis_password: None,
            redis_db: None,
            redis_tls: false,
            redis_ca_file: None,
            redis_tls_insecure: false,
            redis_cert_file: None,
            redis_key_file: None,
            redis_cluster: false,
            redis_pool_size: 16,
            redis_timeout: Duration::from_millis(500),
            redis_key_prefix: "activescale".into(),
            prometheus_enforce_namespace: true,
            prometheus_cache_ttl: Duration::from_secs(2),
            prometheus_poll_interval: Duration::from_secs(5),
            prometheus_timeout: Duration::from_secs(5),
            prometheus_max_response_bytes: PROMETHEUS_MAX_RESPONSE_BYTES,
            prometheus_credentials_dir: PROMETHEUS_CREDENTIALS_DIR.into(),
            tls_cert: None,
            tls_key: None,
            tls_client_ca: None,
            tls_client_names: Vec::new(),
            tls_reload_interval: Duration::from_secs(10),
            tls_sink: true,
            custom_metrics_addr: None,
            custom_metrics_tls_cert: None,
            custom_metrics_tls_key: None,
            custom_metrics_tls_names: vec!["localhost".into()],
            custom_metrics_client_ca: None,
            custom_metrics_allowed_names: Vec::new(),
            custom_metrics_username_headers: vec!["X-Remote-User".into()],
            custom_metrics_group_headers: vec!["X-Remote-Group".into()],
            custom_metrics_extra_headers_prefix: vec!["X-Remote-Extra-".into()],
            custom_metrics_windows: Vec::new(),
            custom_metrics_rules: Vec::new(),
            activator_addr: None,
            activator_routes: Vec::new(),
            activator_max_pending: 1000,
            activator_max_pending_total: 10_000,
            activator_hold_timeout: Duration::from_secs(60),
            activator_probe_interval: Duration::from_millis(100),
            activator_probe_max_interval: Duration::from_secs(10),
            activator_connect_timeout: Duration::from_secs(1),
            activator_header_read_timeout: Duration::from_secs(15),
            activator_max_connections: 20_000,
        }
    }
}

/// Default of `metric_include`: the inbound HTTP connection managers' gauge
/// of requests in flight (see `sink::names` for why these names).
pub fn default_metric_include() -> Vec<String> {
    vec!["http.inbound_*.downstream_rq_active".into()]
}

/// Default of `metric_exclude`; the sink's own inbound scope is added from
/// its bound port at start-up (`exclude_sink_scope`).
pub fn default_metric_exclude() -> Vec<String> {
    vec![
        "http.admin.*".into(),
        "http.agent.*".into(),
        "http.stats.*".into(),
        "http.outbound_*".into(),
    ]
}

/// Default of `max_families_per_pod`: distinct stat families a pod may hold.
/// A pod serves on a handful of inbound ports; 64 leaves room for many.
pub const DEFAULT_MAX_FAMILIES: usize = 64;

/// Default of `prometheus_credentials_dir`. Files named by triggers
/// (`caCert`, `bearerTokenFile`, `passwordFile`) are read only from
/// `<this>/<ScaledObject namespace>/`: a trigger must not be able to make the
/// scaler send a file of its own choosing (its service-account token, another
/// tenant's password) to a server of its own choosing, nor read a device, a
/// FIFO or `/proc`.
pub const PROMETHEUS_CREDENTIALS_DIR: &str = "/etc/activescale/prometheus";

/// Default of `prometheus_max_response_bytes`: an instant query answered
/// with one series is a few hundred bytes.
pub const PROMETHEUS_MAX_RESPONSE_BYTES: usize = 8 << 20;

/// Longest Prometheus query timeout, a trigger's `timeout` or
/// `prometheus_timeout`: KEDA's own call to the scaler times out long before.
pub const PROMETHEUS_MAX_TIMEOUT: Duration = Duration::from_secs(60);

/// Largest `max_families_per_pod`: a pod's sum (at most this many values of
/// at most 1e9) stays far below 2^53, where f64 sums stop being exact, and a
/// pod's state stays small.
pub const MAX_FAMILIES_LIMIT: usize = 1024;

/// A setting that cannot be used; the message names it.
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration: {0}")]
pub struct ConfigError(pub String);

/// Environment variables kept from the earlier tool, and the field each sets.
pub const LEGACY_ENV: &[(&str, &str)] = &[
    ("REDIS_URL", "redis_url"),
    ("REDIS_USERNAME", "redis_username"),
    ("REDIS_PASSWORD", "redis_password"),
    ("REDIS_DB", "redis_db"),
    ("REDIS_TLS", "redis_tls"),
    ("REDIS_CA_FILE", "redis_ca_file"),
    ("REDIS_TLS_INSECURE", "redis_tls_insecure"),
    ("REDIS_CERT_FILE", "redis_cert_file"),
    ("REDIS_KEY_FILE", "redis_key_file"),
    ("REDIS_CLUSTER", "redis_cluster"),
];

/// Fields that hold lists (comma-separated in the environment and on flags).
const LIST_FIELDS: &[&str] = &[
    "metric_include",
    "metric_exclude",
    "tls_client_names",
    "custom_metrics_tls_names",
    "custom_metrics_allowed_names",
    "custom_metrics_username_headers",
    "custom_metrics_group_headers",
    "custom_metrics_extra_headers_prefix",
    "custom_metrics_windows",
];

impl Config {
    /// Loads defaults, then `file`, then the environment, then `overrides`
    /// (field name → value, from command-line flags), and validates the result.
    pub fn load(file: Option<&Path>, overrides: &[(&str, String)]) -> Result<Self, ConfigError> {
        Self::load_from(file, std::env::vars(), overrides)
    }

    /// [`Config::load`] with an explicit environment (for tests).
    pub fn load_from(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
        overrides: &[(&str, String)],
    ) -> Result<Self, ConfigError> {
        let err = |e: config::ConfigError| ConfigError(e.to_string());
        let defaults = config::Config::try_from(&FileConfig::default()).map_err(err)?;
        let mut builder = config::Config::builder().add_source(defaults);
        if let Some(path) = file {
            builder = builder.add_source(config::File::from(path).required(true));
        }
        let env: Vec<(String, String)> = env.into_iter().collect();
        for (var, field) in LEGACY_ENV {
            if let Some((_, v)) = env.iter().find(|(k, _)| k == var) {
                builder = set(builder, field, v).map_err(err)?;
            }
        }
        for (var, value) in &env {
            if let Some(field) = var.strip_prefix("ACTIVESCALE_") {
                if is_service_link(field) {
                    continue;
                }
                let field = field.to_ascii_lowercase();
                builder = set(builder, &field, value).map_err(err)?;
            }
        }
        for (field, value) in overrides {
            builder = set(builder, field, value).map_err(err)?;
        }
        let cfg: FileConfig = builder
            .build()
            .map_err(err)?
            .try_deserialize()
            .map_err(err)?;
        cfg.validate()?;
        Ok(cfg.into())
    }

    /// Checks what serde cannot: ranges, pairs of settings, files. Messages
    /// name the settings as they are written (`pod_ttl`, `redis_url`), so
    /// this checks the flat form.
    pub fn validate(&self) -> Result<(), ConfigError> {
        FileConfig::from(self.clone()).validate()
    }

    /// The warm-up that applies to this store (see [`EngineConfig::warmup`]).
    pub fn effective_warmup(&self) -> Duration {
        self.engine.warmup.unwrap_or(match self.store {
            StoreConfig::Memory(_) => Duration::from_secs(10),
            StoreConfig::Redis(_) => Duration::ZERO,
        })
    }
}

impl FileConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        let bad = |field: &str, why: &str| Err(ConfigError(format!("{field}: {why}")));
        if self.pod_ttl.is_zero() {
            return bad("pod_ttl", "must be greater than 0");
        }
        if self.max_message_bytes < 1024 {
            return bad("max_message_bytes", "must be at least 1024");
        }
        if !(1 << 20..=1 << 30).contains(&self.sink_max_buffered_bytes) {
            return bad(
                "sink_max_buffered_bytes",
                &format!(
                    "{} is not between 1048576 (1 MiB) and 1073741824 (1 GiB)",
                    self.sink_max_buffered_bytes
                ),
            );
        }
        if self.sink_max_buffered_bytes < self.max_message_bytes {
            return bad(
                "sink_max_buffered_bytes",
                &format!(
                    "{} is less than max_message_bytes ({}): the largest message could never arrive",
                    self.sink_max_buffered_bytes, self.max_message_bytes
                ),
            );
        }
        if !(1..=10_000).contains(&self.sink_max_concurrent_streams) {
            return bad(
                "sink_max_concurrent_streams",
                &format!(
                    "{} is not between 1 and 10000",
                    self.sink_max_concurrent_streams
                ),
            );
        }
        if !(Duration::from_secs(1)..=Duration::from_secs(300)).contains(&self.sink_message_timeout)
        {
            return bad(
                "sink_message_timeout",
                &format!(
                    "{} is not between 1s and 5m",
                    humantime::format_duration(self.sink_message_timeout)
                ),
            );
        }
        if !(1..=MAX_FAMILIES_LIMIT).contains(&self.max_families_per_pod) {
            return bad(
                "max_families_per_pod",
                &format!(
                    "{} is not between 1 and {MAX_FAMILIES_LIMIT}",
                    self.max_families_per_pod
                ),
            );
        }
        if self.metric_include.is_empty() {
            return bad("metric_include", "needs at least one pattern");
        }
        if self.summary_interval.is_zero() {
            return bad("summary_interval", "must be greater than 0");
        }
        if !(Duration::from_secs(1)..=Duration::from_secs(30)).contains(&self.http_header_timeout) {
            return bad(
                "http_header_timeout",
                &format!(
                    "{} is not between 1s and 30s",
                    humantime::format_duration(self.http_header_timeout)
                ),
            );
        }
        if self.metadata_cache_size == 0 {
            return bad("metadata_cache_size", "must be at least 1");
        }
        if self.redis_pool_size == 0 {
            return bad("redis_pool_size", "must be at least 1");
        }
        if self.redis_timeout.is_zero() {
            return bad("redis_timeout", "must be greater than 0");
        }
        if self.prometheus_poll_interval.is_zero() {
            return bad("prometheus_poll_interval", "must be greater than 0");
        }
        if self.prometheus_timeout.is_zero() || self.prometheus_timeout > PROMETHEUS_MAX_TIMEOUT {
            return bad(
                "prometheus_timeout",
                &format!(
                    "{} is not between 1ms and {}",
                    humantime::format_duration(self.prometheus_timeout),
                    humantime::format_duration(PROMETHEUS_MAX_TIMEOUT)
                ),
            );
        }
        if self.prometheus_max_response_bytes < 1024 {
            return bad("prometheus_max_response_bytes", "must be at least 1024");
        }
        if !self.prometheus_credentials_dir.is_absolute() {
            return bad("prometheus_credentials_dir", "must be an absolute path");
        }
        if self.redis_key_prefix.is_empty() || self.redis_key_prefix.contains(['{', '}']) {
            return bad(
                "redis_key_prefix",
                "must be non-empty and free of '{' and '}'",
            );
        }
        if self.store == StoreKind::Redis {
            self.redis_config().check()?;
        }
        if self.tls_cert.is_some() != self.tls_key.is_some() {
            return bad("tls_cert", "tls_cert and tls_key go together");
        }
        if self.tls_client_ca.is_some() && self.tls_cert.is_none() {
            return bad(
                "tls_client_ca",
                "client verification needs tls_cert and tls_key",
            );
        }
        if !self.tls_client_names.is_empty() && self.tls_client_ca.is_none() {
            return bad(
                "tls_client_names",
                "names are checked on client certificates, which only tls_client_ca asks for; set it too",
            );
        }
        if let Some(n) = self
            .tls_client_names
            .iter()
            .find(|n| n.trim().is_empty() || n.chars().any(char::is_control))
        {
            return bad(
                "tls_client_names",
                &format!("{n:?} is not a certificate name"),
            );
        }
        if let (Some(cert), Some(key)) = (&self.tls_cert, &self.tls_key) {
            pem_pair(("tls_cert", cert), ("tls_key", key))?;
        }
        if let Some(ca) = &self.tls_client_ca {
            pem_certs("tls_client_ca", ca)?;
        }
        self.validate_custom_metrics()?;
        self.validate_activator()?;
        Ok(())
    }
}

// ---- activator settings -------------------------------------------------

impl FileConfig {
    fn validate_activator(&self) -> Result<(), ConfigError> {
        let bad = |field: &str, why: &str| Err(ConfigError(format!("{field}: {why}")));
        for (field, n) in [
            ("activator_max_pending", self.activator_max_pending),
            (
                "activator_max_pending_total",
                self.activator_max_pending_total,
            ),
            ("activator_max_connections", self.activator_max_connections),
        ] {
            if n == 0 {
                return bad(field, "must be at least 1");
            }
        }
        for (field, d) in [
            ("activator_hold_timeout", self.activator_hold_timeout),
            ("activator_probe_interval", self.activator_probe_interval),
            ("activator_connect_timeout", self.activator_connect_timeout),
            (
                "activator_header_read_timeout",
                self.activator_header_read_timeout,
            ),
        ] {
            if d.is_zero() {
                return bad(field, "must be greater than 0");
            }
        }
        if self.activator_probe_max_interval < self.activator_probe_interval {
            return bad(
                "activator_probe_max_interval",
                "must be at least activator_probe_interval",
            );
        }
        if self.activator_addr.is_some() && self.activator_routes.is_empty() {
            return bad(
                "activator_routes",
                "activator_addr is set but no route is configured",
            );
        }
        check_activator_routes(&self.activator_routes)
    }
}

/// Checks every route and that no two share host and path prefix; the error
/// names the route by index, e.g. `activator_routes[2].upstream: "web" is not host:port`.
pub fn check_activator_routes(routes: &[ActivatorRoute]) -> Result<(), ConfigError> {
    for (i, route) in routes.iter().enumerate() {
        route
            .check()
            .map_err(|(field, why)| ConfigError(format!("activator_routes[{i}].{field}: {why}")))?;
        let key = (route.match_host(), route.match_prefix());
        if let Some(j) = routes[..i]
            .iter()
            .position(|r| (r.match_host(), r.match_prefix()) == key)
        {
            return Err(ConfigError(format!(
                "activator_routes[{i}]: same host and path_prefix as activator_routes[{j}]"
            )));
        }
    }
    Ok(())
}

impl ActivatorRoute {
    /// The host as matched: lowercase, without a trailing dot.
    pub fn match_host(&self) -> String {
        self.host.trim_end_matches('.').to_ascii_lowercase()
    }

    /// The path prefix as matched: `/` when unset, else without trailing `/`.
    pub fn match_prefix(&self) -> &str {
        match self.path_prefix.as_deref().map(|p| p.trim_end_matches('/')) {
            None | Some("") => "/",
            Some(p) => p,
        }
    }

    /// The first problem, as (field, why).
    fn check(&self) -> Result<(), (&'static str, String)> {
        let host = self.host.strip_suffix('.').unwrap_or(&self.host);
        let name = host.strip_prefix("*.").unwrap_or(host);
        if name.contains('*') {
            return Err((
                "host",
                format!("{:?}: only a leading `*.` wildcard is allowed", self.host),
            ));
        }
        if !is_dns_name(name) {
            return Err(("host", format!("{:?} is not a DNS name", self.host)));
        }
        if let Some(p) = &self.path_prefix
            && (!p.starts_with('/')
                || p.len() > 1024
                || p.contains(['?', '#', '*'])
                || p.chars().any(|c| c.is_whitespace() || c.is_control()))
        {
            return Err((
                "path_prefix",
                format!(
                    "{p:?} must start with '/' and be at most 1024 characters without \
                     '?', '#', '*', spaces or control characters"
                ),
            ));
        }
        if !is_host_port(&self.upstream) {
            return Err(("upstream", format!("{:?} is not host:port", self.upstream)));
        }
        if !is_dns_label(&self.namespace) {
            return Err((
                "namespace",
                format!(
                    "{:?} is not a namespace name (an RFC 1123 label: a-z, 0-9, '-', at most 63)",
                    self.namespace
                ),
            ));
        }
        Ok(())
    }
}

/// RFC 1123 host name: dot-separated labels of letters, digits and '-', none
/// starting or ending with '-', at most 253 characters.
pub fn is_dns_name(name: &str) -> bool {
    (1..=253).contains(&name.len())
        && name.split('.').all(|label| {
            (1..=63).contains(&label.len())
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

/// A Kubernetes namespace name: one lowercase RFC 1123 label.
fn is_dns_label(name: &str) -> bool {
    !name.contains('.') && is_dns_name(name) && !name.bytes().any(|b| b.is_ascii_uppercase())
}

/// `name:port`, `1.2.3.4:port` or `[::1]:port`, with a port of 1-65535.
fn is_host_port(s: &str) -> bool {
    let Some((host, port)) = s.rsplit_once(':') else {
        return false;
    };
    let port_ok = !port.is_empty()
        && port.bytes().all(|b| b.is_ascii_digit())
        && port.parse::<u16>().is_ok_and(|p| p > 0);
    let host_ok = match host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        Some(v6) => v6.parse::<std::net::Ipv6Addr>().is_ok(),
        None => host.parse::<std::net::Ipv4Addr>().is_ok() || is_dns_name(host),
    };
    port_ok && host_ok
}

fn set(
    builder: config::ConfigBuilder<config::builder::DefaultState>,
    field: &str,
    value: &str,
) -> Result<config::ConfigBuilder<config::builder::DefaultState>, config::ConfigError> {
    if LIST_FIELDS.contains(&field) {
        let items: Vec<String> = value
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(String::from)
            .collect();
        builder.set_override(field, items)
    } else {
        builder.set_override(field, value)
    }
}

/// Kubernetes injects `<SERVICE>_SERVICE_HOST`, `<SERVICE>_PORT_9000_TCP`, ...
/// for every Service of the namespace; a Service named `activescale` produces
/// `ACTIVESCALE_*` variables that are not settings.
fn is_service_link(field: &str) -> bool {
    field.starts_with("SERVICE_HOST")
        || field.starts_with("SERVICE_PORT")
        || field == "PORT"
        || field.starts_with("PORT_")
}

// ---- The settings of each part, as the part takes them. `FileConfig` is
// the form of the file, the environment and the flags (their names stay as
// they are); `Config` groups it once, and each part is built from its group.

/// Every setting of the service, grouped by the part that takes it. Loaded
/// with [`Config::load`]; (de)serializes in the flat form of the file (the
/// keys of the README's configuration table), so `--help` defaults and
/// rendered configs read the same names users write.
///
/// Settings a group does not use are not kept: with `store: memory` the
/// `redis_*` keys, without `tls_cert` the other `tls_*` keys but
/// `tls_reload_interval` (the Custom Metrics API's certificate is reloaded
/// as often).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(into = "FileConfig", from = "FileConfig")]
pub struct Config {
    /// Where each port listens, and what all servers share.
    pub servers: ServersConfig,
    /// The Envoy metrics sink.
    pub sink: SinkConfig,
    /// Which store backs the sink and the scaler, with its settings.
    pub store: StoreConfig,
    /// Pod lifetime, history and trigger reading, whatever the store.
    pub engine: EngineConfig,
    /// The Prometheus backend of prometheus-source triggers and rules.
    pub prometheus: PrometheusConfig,
    /// TLS on the gRPC ports; `None` when `tls_cert` is unset.
    pub tls: Option<TlsConfig>,
    /// The Custom Metrics API (served when `servers.custom_metrics_addr` is set).
    pub custom_metrics: CustomMetricsConfig,
    /// The activator proxy (served when `servers.activator_addr` is set).
    pub activator: ActivatorConfig,
    /// The HTTP port (`/healthz`, `/metrics`, the view).
    pub http: HttpConfig,
    /// Logs and summary lines.
    pub telemetry: TelemetryConfig,
}

impl Default for Config {
    fn default() -> Self {
        FileConfig::default().into()
    }
}

/// Where each port listens, and what all servers share.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServersConfig {
    /// `sink_addr`.
    pub sink_addr: SocketAddr,
    /// `scaler_addr`.
    pub scaler_addr: SocketAddr,
    /// `http_addr`.
    pub http_addr: SocketAddr,
    /// `custom_metrics_addr`; unset: the API is not served.
    pub custom_metrics_addr: Option<SocketAddr>,
    /// `activator_addr`; unset: no proxy.
    pub activator_addr: Option<SocketAddr>,
    /// `drain_timeout`: on SIGTERM, how long open streams and calls get.
    pub drain_timeout: Duration,
    /// `http2_keepalive_interval` (both gRPC ports and the activator).
    pub http2_keepalive_interval: Duration,
    /// `http2_keepalive_timeout`.
    pub http2_keepalive_timeout: Duration,
}

/// What the Envoy metrics sink takes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SinkConfig {
    /// `max_message_bytes`.
    pub max_message_bytes: usize,
    /// `metric_include`.
    pub metric_include: Vec<String>,
    /// `metric_exclude`.
    pub metric_exclude: Vec<String>,
    /// `exclude_sink_scope`.
    pub exclude_sink_scope: bool,
    /// `max_families_per_pod`.
    pub max_families_per_pod: usize,
    /// `sink_verify_peer_address`.
    pub verify_peer_address: bool,
    /// `sink_max_buffered_bytes`.
    pub max_buffered_bytes: usize,
    /// `sink_max_concurrent_streams`.
    pub max_concurrent_streams: u32,
    /// `sink_message_timeout`.
    pub message_timeout: Duration,
}

/// Pod lifetime, history and trigger reading: what the stores and the
/// scaler's engine share, whichever store is chosen.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EngineConfig {
    /// `pod_ttl`.
    pub pod_ttl: Duration,
    /// `max_window`: the longest trigger window; older history is forgotten.
    pub max_window: Duration,
    /// `warmup` as set; [`Config::effective_warmup`] applies the store's
    /// default. With Redis it applies after a restart of the node.
    pub warmup: Option<Duration>,
    /// `allow_cross_namespace`.
    pub allow_cross_namespace: bool,
    /// `metadata_cache_size`.
    pub metadata_cache_size: usize,
}

/// What the Prometheus backend takes (`prometheus_*`).
#[derive(Clone, Debug, PartialEq)]
pub struct PrometheusConfig {
    /// `prometheus_enforce_namespace`.
    pub enforce_namespace: bool,
    /// `prometheus_cache_ttl`.
    pub cache_ttl: Duration,
    /// `prometheus_poll_interval`.
    pub poll_interval: Duration,
    /// `prometheus_timeout`: a trigger's query timeout when it sets none.
    pub default_timeout: Duration,
    /// `prometheus_credentials_dir`: where each namespace's credential files are.
    pub credentials_dir: PathBuf,
    /// `prometheus_max_response_bytes`.
    pub max_response_bytes: usize,
}

impl Default for PrometheusConfig {
    fn default() -> Self {
        Config::default().prometheus
    }
}

/// TLS on the gRPC ports (`tls_*`), when `tls_cert` is set.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsConfig {
    /// `tls_cert`.
    pub cert: PathBuf,
    /// `tls_key`.
    pub key: PathBuf,
    /// `tls_client_ca`: when set, clients must present a certificate it signed.
    pub client_ca: Option<PathBuf>,
    /// `tls_client_names`.
    pub client_names: Vec<String>,
    /// `tls_reload_interval`.
    pub reload_interval: Duration,
    /// `tls_sink`: the sink port uses TLS too.
    pub sink: bool,
}

/// Which store backs the sink and the scaler, with its settings.
// Built once at start-up: the size difference between variants costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, PartialEq)]
pub enum StoreConfig {
    Memory(MemoryConfig),
    Redis(RedisConfig),
}

impl StoreConfig {
    /// `store` as written.
    pub fn kind(&self) -> StoreKind {
        match self {
            StoreConfig::Memory(_) => StoreKind::Memory,
            StoreConfig::Redis(_) => StoreKind::Redis,
        }
    }

    /// The Redis settings, when the store is Redis.
    pub fn redis(&self) -> Option<&RedisConfig> {
        match self {
            StoreConfig::Redis(r) => Some(r),
            StoreConfig::Memory(_) => None,
        }
    }

    /// The Redis settings to change, switching a memory store to Redis with
    /// the default `redis_*` settings first.
    pub fn redis_mut(&mut self) -> &mut RedisConfig {
        if let StoreConfig::Memory(_) = self {
            *self = StoreConfig::Redis(RedisConfig::default());
        }
        match self {
            StoreConfig::Redis(r) => r,
            StoreConfig::Memory(_) => unreachable!("switched to Redis above"),
        }
    }
}

/// What the memory store takes beyond [`EngineConfig`]: nothing yet; the
/// variant exists so that each store has its own settings type.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MemoryConfig {}

/// What the Custom Metrics API takes (`custom_metrics_*`; its address is
/// in [`ServersConfig`]).
#[derive(Clone, Debug, PartialEq)]
pub struct CustomMetricsConfig {
    /// `custom_metrics_tls_cert`; unset: a self-signed certificate.
    pub tls_cert: Option<PathBuf>,
    /// `custom_metrics_tls_key`.
    pub tls_key: Option<PathBuf>,
    /// `custom_metrics_tls_names`: names of the self-signed certificate.
    pub tls_names: Vec<String>,
    /// `custom_metrics_client_ca`: the front-proxy CA.
    pub client_ca: Option<PathBuf>,
    /// `custom_metrics_allowed_names`.
    pub allowed_names: Vec<String>,
    /// `custom_metrics_username_headers`.
    pub username_headers: Vec<String>,
    /// `custom_metrics_group_headers`.
    pub group_headers: Vec<String>,
    /// `custom_metrics_extra_headers_prefix`.
    pub extra_headers_prefix: Vec<String>,
    /// `custom_metrics_windows`.
    pub windows: Vec<String>,
    /// `custom_metrics_rules`.
    pub rules: Vec<CustomMetricsRule>,
    /// `tls_reload_interval`: the API's files are checked as often as the
    /// gRPC ports'.
    pub reload_interval: Duration,
}

/// What the activator proxy takes: each field is the `activator_*` setting of
/// the same name (its address is in [`ServersConfig`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ActivatorConfig {
    /// Host (and path prefix) → upstream, validated by the activator.
    pub routes: Vec<ActivatorRoute>,
    /// Held requests per route; past it 503.
    pub max_pending: usize,
    /// Held requests over all routes; past it 503.
    pub max_pending_total: usize,
    /// Longest hold, from arrival; then 504.
    pub hold_timeout: Duration,
    /// Probe interval while requests wait.
    pub probe_interval: Duration,
    /// Probe interval ceiling while idle (doubling from `probe_interval`).
    pub probe_max_interval: Duration,
    /// One TCP connect to an upstream, probe or request.
    pub connect_timeout: Duration,
    /// Request head deadline (from connect, and between keep-alive requests).
    pub header_read_timeout: Duration,
    /// Client connections at once.
    pub max_connections: usize,
}

/// What the HTTP port takes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HttpConfig {
    /// `view_enabled`.
    pub view_enabled: bool,
    /// `http_header_timeout`.
    pub header_timeout: Duration,
}

/// Logs and summary lines.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TelemetryConfig {
    /// `log_format`.
    pub log_format: LogFormat,
    /// `summary_interval`.
    pub summary_interval: Duration,
}

impl From<FileConfig> for Config {
    fn from(f: FileConfig) -> Self {
        let store = match f.store {
            StoreKind::Memory => StoreConfig::Memory(MemoryConfig {}),
            StoreKind::Redis => StoreConfig::Redis(f.redis_config()),
        };
        let tls = match (&f.tls_cert, &f.tls_key) {
            (Some(cert), Some(key)) => Some(TlsConfig {
                cert: cert.clone(),
                key: key.clone(),
                client_ca: f.tls_client_ca.clone(),
                client_names: f.tls_client_names.clone(),
                reload_interval: f.tls_reload_interval,
                sink: f.tls_sink,
            }),
            _ => None,
        };
        Config {
            servers: ServersConfig {
                sink_addr: f.sink_addr,
                scaler_addr: f.scaler_addr,
                http_addr: f.http_addr,
                custom_metrics_addr: f.custom_metrics_addr,
                activator_addr: f.activator_addr,
                drain_timeout: f.drain_timeout,
                http2_keepalive_interval: f.http2_keepalive_interval,
                http2_keepalive_timeout: f.http2_keepalive_timeout,
            },
            sink: SinkConfig {
                max_message_bytes: f.max_message_bytes,
                metric_include: f.metric_include,
                metric_exclude: f.metric_exclude,
                exclude_sink_scope: f.exclude_sink_scope,
                max_families_per_pod: f.max_families_per_pod,
                verify_peer_address: f.sink_verify_peer_address,
                max_buffered_bytes: f.sink_max_buffered_bytes,
                max_concurrent_streams: f.sink_max_concurrent_streams,
                message_timeout: f.sink_message_timeout,
            },
            store,
            engine: EngineConfig {
                pod_ttl: f.pod_ttl,
                max_window: f.max_window,
                warmup: f.warmup,
                allow_cross_namespace: f.allow_cross_namespace,
                metadata_cache_size: f.metadata_cache_size,
            },
            prometheus: PrometheusConfig {
                enforce_namespace: f.prometheus_enforce_namespace,
                cache_ttl: f.prometheus_cache_ttl,
                poll_interval: f.prometheus_poll_interval,
                default_timeout: f.prometheus_timeout,
                credentials_dir: f.prometheus_credentials_dir,
                max_response_bytes: f.prometheus_max_response_bytes,
            },
            tls,
            custom_metrics: CustomMetricsConfig {
                tls_cert: f.custom_metrics_tls_cert,
                tls_key: f.custom_metrics_tls_key,
                tls_names: f.custom_metrics_tls_names,
                client_ca: f.custom_metrics_client_ca,
                allowed_names: f.custom_metrics_allowed_names,
                username_headers: f.custom_metrics_username_headers,
                group_headers: f.custom_metrics_group_headers,
                extra_headers_prefix: f.custom_metrics_extra_headers_prefix,
                windows: f.custom_metrics_windows,
                rules: f.custom_metrics_rules,
                reload_interval: f.tls_reload_interval,
            },
            activator: ActivatorConfig {
                routes: f.activator_routes,
                max_pending: f.activator_max_pending,
                max_pending_total: f.activator_max_pending_total,
                hold_timeout: f.activator_hold_timeout,
                probe_interval: f.activator_probe_interval,
                probe_max_interval: f.activator_probe_max_interval,
                connect_timeout: f.activator_connect_timeout,
                header_read_timeout: f.activator_header_read_timeout,
                max_connections: f.activator_max_connections,
            },
            http: HttpConfig {
                view_enabled: f.view_enabled,
                header_timeout: f.http_header_timeout,
            },
            telemetry: TelemetryConfig {
                log_format: f.log_format,
                summary_interval: f.summary_interval,
            },
        }
    }
}

/// Back to the flat form; what a group does not keep (see [`Config`]) takes
/// its default.
impl From<Config> for FileConfig {
    fn from(c: Config) -> Self {
        let d = FileConfig::default();
        let (store, redis) = match c.store {
            StoreConfig::Memory(MemoryConfig {}) => (StoreKind::Memory, d.redis_config()),
            StoreConfig::Redis(r) => (StoreKind::Redis, r),
        };
        let tls = c.tls;
        let cm = c.custom_metrics;
        FileConfig {
            sink_addr: c.servers.sink_addr,
            scaler_addr: c.servers.scaler_addr,
            http_addr: c.servers.http_addr,
            pod_ttl: c.engine.pod_ttl,
            store,
            max_message_bytes: c.sink.max_message_bytes,
            metric_include: c.sink.metric_include,
            metric_exclude: c.sink.metric_exclude,
            exclude_sink_scope: c.sink.exclude_sink_scope,
            max_families_per_pod: c.sink.max_families_per_pod,
            sink_verify_peer_address: c.sink.verify_peer_address,
            sink_max_buffered_bytes: c.sink.max_buffered_bytes,
            sink_max_concurrent_streams: c.sink.max_concurrent_streams,
            sink_message_timeout: c.sink.message_timeout,
            max_window: c.engine.max_window,
            warmup: c.engine.warmup,
            allow_cross_namespace: c.engine.allow_cross_namespace,
            view_enabled: c.http.view_enabled,
            metadata_cache_size: c.engine.metadata_cache_size,
            log_format: c.telemetry.log_format,
            summary_interval: c.telemetry.summary_interval,
            drain_timeout: c.servers.drain_timeout,
            http_header_timeout: c.http.header_timeout,
            http2_keepalive_interval: c.servers.http2_keepalive_interval,
            http2_keepalive_timeout: c.servers.http2_keepalive_timeout,
            redis_url: redis.url,
            redis_username: redis.username,
            redis_password: redis.password,
            redis_db: redis.db,
            redis_tls: redis.tls,
            redis_ca_file: redis.ca_file,
            redis_tls_insecure: redis.tls_insecure,
            redis_cert_file: redis.cert_file,
            redis_key_file: redis.key_file,
            redis_cluster: redis.cluster,
            redis_pool_size: redis.pool_size,
            redis_timeout: redis.timeout,
            redis_key_prefix: redis.key_prefix,
            prometheus_enforce_namespace: c.prometheus.enforce_namespace,
            prometheus_cache_ttl: c.prometheus.cache_ttl,
            prometheus_poll_interval: c.prometheus.poll_interval,
            prometheus_timeout: c.prometheus.default_timeout,
            prometheus_max_response_bytes: c.prometheus.max_response_bytes,
            prometheus_credentials_dir: c.prometheus.credentials_dir,
            tls_cert: tls.as_ref().map(|t| t.cert.clone()),
            tls_key: tls.as_ref().map(|t| t.key.clone()),
            tls_client_ca: tls.as_ref().and_then(|t| t.client_ca.clone()),
            tls_client_names: tls
                .as_ref()
                .map_or(d.tls_client_names, |t| t.client_names.clone()),
            // One key feeds both: the gRPC ports' group wins when both are
            // there (they are equal unless a caller changed one).
            tls_reload_interval: tls
                .as_ref()
                .map_or(cm.reload_interval, |t| t.reload_interval),
            tls_sink: tls.as_ref().map_or(d.tls_sink, |t| t.sink),
            custom_metrics_addr: c.servers.custom_metrics_addr,
            custom_metrics_tls_cert: cm.tls_cert,
            custom_metrics_tls_key: cm.tls_key,
            custom_metrics_tls_names: cm.tls_names,
            custom_metrics_client_ca: cm.client_ca,
            custom_metrics_allowed_names: cm.allowed_names,
            custom_metrics_username_headers: cm.username_headers,
            custom_metrics_group_headers: cm.group_headers,
            custom_metrics_extra_headers_prefix: cm.extra_headers_prefix,
            custom_metrics_windows: cm.windows,
            custom_metrics_rules: cm.rules,
            activator_addr: c.servers.activator_addr,
            activator_routes: c.activator.routes,
            activator_max_pending: c.activator.max_pending,
            activator_max_pending_total: c.activator.max_pending_total,
            activator_hold_timeout: c.activator.hold_timeout,
            activator_probe_interval: c.activator.probe_interval,
            activator_probe_max_interval: c.activator.probe_max_interval,
            activator_connect_timeout: c.activator.connect_timeout,
            activator_header_read_timeout: c.activator.header_read_timeout,
            activator_max_connections: c.activator.max_connections,
        }
    }
}

// ---- Certificates and keys: parsed here, so a bad file stops start-up
// before any port is bound. The servers and the Redis client parse them
// again when they load (and on every rotation).

fn read_file(field: &str, path: &Path) -> Result<Vec<u8>, ConfigError> {
    std::fs::read(path)
        .map_err(|e| ConfigError(format!("{field}: cannot read {}: {e}", path.display())))
}

/// The PEM certificates of `path`; none, or a file that is not PEM, is an error.
fn pem_certs(
    field: &str,
    path: &Path,
) -> Result<Vec<rustls::pki_types::CertificateDer<'static>>, ConfigError> {
    let pem = read_file(field, path)?;
    let bad = |why: String| ConfigError(format!("{field}: {}: {why}", path.display()));
    let certs = rustls_pemfile::certs(&mut &pem[..])
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(format!("not valid PEM: {e}")))?;
    if certs.is_empty() {
        return Err(bad("no PEM CERTIFICATE block found".into()));
    }
    Ok(certs)
}

/// A certificate chain and its private key: both parse, the key is of a kind
/// rustls can sign with, and it is the key of the chain's first certificate.
fn pem_pair(
    (cert_field, cert): (&str, &Path),
    (key_field, key): (&str, &Path),
) -> Result<(), ConfigError> {
    let certs = pem_certs(cert_field, cert)?;
    let pem = read_file(key_field, key)?;
    let bad = |why: String| ConfigError(format!("{key_field}: {}: {why}", key.display()));
    let der = rustls_pemfile::private_key(&mut &pem[..])
        .map_err(|e| bad(format!("not valid PEM: {e}")))?
        .ok_or_else(|| bad("no PEM private key (PKCS#8, PKCS#1 or SEC1) found".into()))?;
    rustls::sign::CertifiedKey::from_der(certs, der, &rustls::crypto::ring::default_provider())
        .map_err(|e| bad(format!("not usable with {cert_field}: {e}")))?;
    Ok(())
}

// ---- Redis ----

/// What the Redis store takes: the `redis_*` settings (the pod TTL, history
/// and warm-up it applies come from [`EngineConfig`]).
#[derive(Clone, Debug, PartialEq)]
pub struct RedisConfig {
    pub url: String,
    pub username: Option<String>,
    pub password: Option<String>,
    pub db: Option<i64>,
    pub tls: bool,
    pub ca_file: Option<PathBuf>,
    pub tls_insecure: bool,
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    pub cluster: bool,
    pub pool_size: usize,
    pub timeout: Duration,
    pub key_prefix: String,
}

impl Default for RedisConfig {
    fn default() -> Self {
        FileConfig::default().redis_config()
    }
}

/// `redis_url` taken apart: TLS and cluster mode (from the scheme or the
/// flags) and one URL per seed host.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RedisSeeds {
    pub tls: bool,
    pub cluster: bool,
    /// `redis://` or `rediss://` URLs, one host each, with the URL's
    /// credentials, database and options.
    pub urls: Vec<String>,
}

impl FileConfig {
    /// The `redis_*` settings.
    fn redis_config(&self) -> RedisConfig {
        RedisConfig {
            url: self.redis_url.clone(),
            username: self.redis_username.clone(),
            password: self.redis_password.clone(),
            db: self.redis_db,
            tls: self.redis_tls,
            ca_file: self.redis_ca_file.clone(),
            tls_insecure: self.redis_tls_insecure,
            cert_file: self.redis_cert_file.clone(),
            key_file: self.redis_key_file.clone(),
            cluster: self.redis_cluster,
            pool_size: self.redis_pool_size,
            timeout: self.redis_timeout,
            key_prefix: self.redis_key_prefix.clone(),
        }
    }
}

impl RedisConfig {
    /// `url` split into seeds. It takes one or several comma-separated seed
    /// hosts: `redis://[user:pass@]host:port[,host:port...][/db]`. The scheme
    /// picks TLS (`rediss`) and cluster mode (`redis+cluster`,
    /// `rediss+cluster`); `tls` and `cluster` do the same for `redis://`.
    pub fn seeds(&self) -> Result<RedisSeeds, ConfigError> {
        let (scheme_tls, scheme_cluster, seeds) = split_redis_url(&self.url)?;
        let tls = scheme_tls || self.tls;
        let cluster = scheme_cluster || self.cluster;
        if !cluster && seeds.len() > 1 {
            return Err(ConfigError(
                "redis_url lists several hosts: that needs cluster mode (redis+cluster:// or redis_cluster)".into(),
            ));
        }
        let urls = seeds
            .iter()
            .map(|seed| {
                let mut url = format!("{}://{seed}", if tls { "rediss" } else { "redis" });
                if tls && self.tls_insecure && !url.contains('#') {
                    // The redis crate's switch for "do not verify the server certificate".
                    url.push_str("#insecure");
                }
                url
            })
            .collect();
        Ok(RedisSeeds { tls, cluster, urls })
    }

    /// `url` without its password, for messages.
    pub fn redacted_url(&self) -> String {
        redact(&self.url)
    }

    /// Everything that can be known without a server: the URL and each seed
    /// parse, the database fits the mode, the certificate files parse and the
    /// client key matches its certificate.
    pub fn check(&self) -> Result<(), ConfigError> {
        use redis::IntoConnectionInfo;
        let seeds = self.seeds()?;
        for url in &seeds.urls {
            url.as_str()
                .into_connection_info()
                .map_err(|e| ConfigError(format!("redis_url {:?}: {e}", self.redacted_url())))?;
        }
        if let Some(db) = self.db
            && seeds.cluster
            && db != 0
        {
            return Err(ConfigError(format!(
                "redis_db {db}: a Redis Cluster has only database 0"
            )));
        }
        match (&self.cert_file, &self.key_file) {
            (Some(cert), Some(key)) => {
                pem_pair(("redis_cert_file", cert), ("redis_key_file", key))?
            }
            (None, None) => {}
            _ => {
                return Err(ConfigError(
                    "redis_cert_file: redis_cert_file and redis_key_file go together".into(),
                ));
            }
        }
        if let Some(ca) = &self.ca_file {
            pem_certs("redis_ca_file", ca)?;
        }
        Ok(())
    }
}

/// `(tls, cluster, seeds)`; each seed is `userinfo@host:port/path?query#fragment`
/// without the scheme.
fn split_redis_url(url: &str) -> Result<(bool, bool, Vec<String>), ConfigError> {
    let bad = |why: &str| ConfigError(format!("redis_url {:?}: {why}", redact(url)));
    let (scheme, rest) = url.split_once("://").ok_or_else(|| {
        bad("not a redis://, rediss://, redis+cluster:// or rediss+cluster:// URL")
    })?;
    let (tls, cluster) = match scheme {
        "redis" => (false, false),
        "rediss" => (true, false),
        "redis+cluster" => (false, true),
        "rediss+cluster" => (true, true),
        _ => {
            return Err(bad(
                "not a redis://, rediss://, redis+cluster:// or rediss+cluster:// URL",
            ));
        }
    };
    let split_at = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(split_at);
    let (userinfo, hosts) = match authority.rsplit_once('@') {
        Some((u, h)) => (Some(u), h),
        None => (None, authority),
    };
    let seeds: Vec<String> = hosts
        .split(',')
        .map(str::trim)
        .filter(|h| !h.is_empty())
        .map(|h| match userinfo {
            Some(u) => format!("{u}@{h}{tail}"),
            None => format!("{h}{tail}"),
        })
        .collect();
    if seeds.is_empty() {
        return Err(bad("no host"));
    }
    Ok((tls, cluster, seeds))
}

/// The URL without its password, for error messages.
fn redact(url: &str) -> String {
    match (url.split_once("://"), url.rfind('@')) {
        (Some((scheme, rest)), Some(_)) => {
            let (userinfo, hosts) = rest.rsplit_once('@').unwrap_or(("", rest));
            let user = userinfo.split(':').next().unwrap_or("");
            format!("{scheme}://{user}:***@{hosts}")
        }
        _ => url.to_string(),
    }
}

// ---- The Custom Metrics API's settings: plain data, checked here. ----

/// The metric every pod has: its requests in flight now.
pub const ACTIVE_REQUESTS: &str = "active_requests";
/// Most windowed forms and Prometheus rules accepted.
pub const MAX_CUSTOM_METRICS_WINDOWS: usize = 16;
pub const MAX_CUSTOM_METRICS_RULES: usize = 64;
/// Longest rule query template, in bytes (the PromQL guard's limit).
pub const MAX_CUSTOM_METRICS_QUERY: usize = 16 * 1024;
/// Longest `timeout` of a rule.
const MAX_RULE_TIMEOUT: Duration = PROMETHEUS_MAX_TIMEOUT;

/// A per-pod metric computed by Prometheus, the way prometheus-adapter's
/// `metricsQuery` rules work: the query is a template over the pods of the
/// request, and its result has one series per pod.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CustomMetricsRule {
    /// The metric's name in the API (`pods/<name>`).
    pub name: String,
    /// Prometheus base URL (`http://` or `https://`).
    pub server: String,
    /// PromQL with `<<.LabelMatchers>>` (required: the request's namespace,
    /// pod and selectors as label matchers) and optionally `<<.GroupBy>>`
    /// (`pod_label`), e.g.
    /// `sum by (<<.GroupBy>>) (rate(http_requests_total{<<.LabelMatchers>>}[2m]))`.
    pub query: String,
    /// The label of the result that names the pod.
    #[serde(default = "default_pod_label")]
    pub pod_label: String,
    /// Reported as `windowSeconds` (for example the range of a `rate()`).
    #[serde(default, with = "humantime_serde")]
    pub window: Option<Duration>,
    /// Which pods the request's `labelSelector` picks.
    #[serde(default)]
    pub pods_from: PodsFrom,
    /// Query timeout; unset: `prometheus_timeout`.
    #[serde(default, with = "humantime_serde")]
    pub timeout: Option<Duration>,
}

fn default_pod_label() -> String {
    "pod".into()
}

/// How a rule applies the request's `labelSelector`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PodsFrom {
    /// The selector's terms become label matchers on the series (the pods'
    /// labels must be on them, as Prometheus' `labelmap` of
    /// `__meta_kubernetes_pod_label_(.+)` puts them, `.`/`/`/`-` as `_`).
    #[default]
    Prometheus,
    /// The selector picks the live pods whose sidecars report to
    /// activescale (their labels as Istio sends them); the query is over the
    /// namespace and its result is kept for those pods only.
    Sidecars,
}

/// How a windowed `active_requests` reduces each pod's values.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum WindowFunction {
    Max,
    Avg,
}

/// Parses a `custom_metrics_windows` entry: `max_30s`, `avg_2m`. The length
/// is whole seconds (it is reported as `windowSeconds`) and written with
/// lowercase letters and digits only, so the metric name stays a plain word.
pub fn parse_custom_metrics_window(spec: &str) -> Result<(WindowFunction, Duration), String> {
    let (function, length) = spec
        .split_once('_')
        .ok_or_else(|| format!("{spec:?} is not <max|avg>_<duration>, e.g. max_30s"))?;
    let function = match function {
        "max" => WindowFunction::Max,
        "avg" => WindowFunction::Avg,
        other => return Err(format!("{spec:?}: {other:?} is not max or avg")),
    };
    if length.is_empty()
        || !length
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
    {
        return Err(format!(
            "{spec:?}: the duration is written with digits and units only, e.g. 30s, 2m, 1m30s"
        ));
    }
    let length = humantime::parse_duration(length)
        .map_err(|e| format!("{spec:?}: {length:?} is not a duration ({e})"))?;
    if length.is_zero() || length.subsec_nanos() != 0 {
        return Err(format!(
            "{spec:?}: the window must be a whole number of seconds, at least 1s"
        ));
    }
    Ok((function, length))
}

/// A Prometheus label name (`[a-zA-Z_][a-zA-Z0-9_]*`).
pub fn is_prometheus_label_name(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && (b[0].is_ascii_alphabetic() || b[0] == b'_')
        && b.iter().all(|c| c.is_ascii_alphanumeric() || *c == b'_')
}

/// A metric name the API can serve: a letter, then letters, digits, `_`,
/// `-`, `.` or `:`, at most 128 in all (a URL path segment as it is).
pub fn is_custom_metric_name(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 128
        && b[0].is_ascii_alphabetic()
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'-' | b'.' | b':'))
}

/// An HTTP header name (RFC 9110 token).
fn is_header_name(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|c| c.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&c))
}

impl FileConfig {
    fn validate_custom_metrics(&self) -> Result<(), ConfigError> {
        let bad = |field: &str, why: String| Err(ConfigError(format!("{field}: {why}")));
        if self.custom_metrics_tls_cert.is_some() != self.custom_metrics_tls_key.is_some() {
            return bad(
                "custom_metrics_tls_cert",
                "custom_metrics_tls_cert and custom_metrics_tls_key go together".into(),
            );
        }
        if let (Some(cert), Some(key)) =
            (&self.custom_metrics_tls_cert, &self.custom_metrics_tls_key)
        {
            pem_pair(
                ("custom_metrics_tls_cert", cert),
                ("custom_metrics_tls_key", key),
            )?;
        }
        if let Some(ca) = &self.custom_metrics_client_ca {
            pem_certs("custom_metrics_client_ca", ca)?;
        }
        if let Some(addr) = self.custom_metrics_addr
            && self.custom_metrics_client_ca.is_none()
            && !addr.ip().is_loopback()
        {
            return bad(
                "custom_metrics_client_ca",
                format!(
                    "required when custom_metrics_addr ({addr}) is not a loopback address: \
                     without the front-proxy CA anyone who reaches the port is answered \
                     (use the requestheader-client-ca-file of the extension-apiserver-authentication ConfigMap)"
                ),
            );
        }
        if !self.custom_metrics_allowed_names.is_empty() && self.custom_metrics_client_ca.is_none()
        {
            return bad(
                "custom_metrics_allowed_names",
                "names are checked on certificates of custom_metrics_client_ca, which is unset"
                    .into(),
            );
        }
        if let Some(n) = self
            .custom_metrics_allowed_names
            .iter()
            .find(|n| n.trim().is_empty())
        {
            return bad("custom_metrics_allowed_names", format!("{n:?} is empty"));
        }
        if self.custom_metrics_tls_cert.is_none() {
            if self.custom_metrics_tls_names.is_empty() {
                return bad(
                    "custom_metrics_tls_names",
                    "the self-signed certificate needs at least one name".into(),
                );
            }
            if let Some(n) = self.custom_metrics_tls_names.iter().find(|n| {
                n.parse::<std::net::IpAddr>().is_err()
                    && (n.is_empty()
                        || n.len() > 253
                        || !n
                            .bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b"-.*".contains(&b)))
            }) {
                return bad(
                    "custom_metrics_tls_names",
                    format!("{n:?} is neither a DNS name nor an IP address"),
                );
            }
        }
        if self.custom_metrics_username_headers.is_empty() {
            return bad(
                "custom_metrics_username_headers",
                "needs at least one header (Kubernetes sends X-Remote-User)".into(),
            );
        }
        for (field, names) in [
            (
                "custom_metrics_username_headers",
                &self.custom_metrics_username_headers,
            ),
            (
                "custom_metrics_group_headers",
                &self.custom_metrics_group_headers,
            ),
            (
                "custom_metrics_extra_headers_prefix",
                &self.custom_metrics_extra_headers_prefix,
            ),
        ] {
            if let Some(n) = names.iter().find(|n| !is_header_name(n)) {
                return bad(field, format!("{n:?} is not an HTTP header name"));
            }
        }

        let mut names = vec![ACTIVE_REQUESTS.to_string()];
        if self.custom_metrics_windows.len() > MAX_CUSTOM_METRICS_WINDOWS {
            return bad(
                "custom_metrics_windows",
                format!("at most {MAX_CUSTOM_METRICS_WINDOWS} entries"),
            );
        }
        for spec in &self.custom_metrics_windows {
            let (_, length) = parse_custom_metrics_window(spec)
                .map_err(|why| ConfigError(format!("custom_metrics_windows: {why}")))?;
            if length > self.max_window {
                return bad(
                    "custom_metrics_windows",
                    format!("{spec:?} is longer than max_window ({:?})", self.max_window),
                );
            }
            let name = format!("{ACTIVE_REQUESTS}_{spec}");
            if names.contains(&name) {
                return bad(
                    "custom_metrics_windows",
                    format!("{spec:?} is listed twice"),
                );
            }
            names.push(name);
        }

        if self.custom_metrics_rules.len() > MAX_CUSTOM_METRICS_RULES {
            return bad(
                "custom_metrics_rules",
                format!("at most {MAX_CUSTOM_METRICS_RULES} rules"),
            );
        }
        for (i, rule) in self.custom_metrics_rules.iter().enumerate() {
            let field = |f: &str| format!("custom_metrics_rules[{i}].{f}");
            if !is_custom_metric_name(&rule.name) {
                return bad(
                    &field("name"),
                    format!(
                        "{:?}: a letter, then letters, digits, '_', '-', '.' or ':', at most 128",
                        rule.name
                    ),
                );
            }
            if names.contains(&rule.name) {
                return bad(&field("name"), format!("{:?} is already served", rule.name));
            }
            names.push(rule.name.clone());
            let scheme_ok = ["http://", "https://"].iter().any(|p| {
                rule.server
                    .strip_prefix(p)
                    .is_some_and(|rest| !rest.is_empty())
            });
            if !scheme_ok {
                return bad(
                    &field("server"),
                    format!("{:?} is not an http:// or https:// URL", rule.server),
                );
            }
            if rule.query.trim().is_empty() || rule.query.len() > MAX_CUSTOM_METRICS_QUERY {
                return bad(
                    &field("query"),
                    format!("must be non-empty and at most {MAX_CUSTOM_METRICS_QUERY} bytes"),
                );
            }
            if !is_prometheus_label_name(&rule.pod_label) {
                return bad(
                    &field("pod_label"),
                    format!("{:?} is not a Prometheus label name", rule.pod_label),
                );
            }
            if let Some(w) = rule.window
                && (w.is_zero() || w.subsec_nanos() != 0)
            {
                return bad(
                    &field("window"),
                    "a whole number of seconds, at least 1s".into(),
                );
            }
            if let Some(t) = rule.timeout
                && (t.is_zero() || t > MAX_RULE_TIMEOUT)
            {
                return bad(
                    &field("timeout"),
                    format!("between 1ms and {MAX_RULE_TIMEOUT:?}"),
                );
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(env: &[(&str, &str)], overrides: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let env = env.iter().map(|(k, v)| (k.to_string(), v.to_string()));
        let overrides: Vec<(&str, String)> =
            overrides.iter().map(|(k, v)| (*k, v.to_string())).collect();
        Config::load_from(None, env, &overrides)
    }

    #[test]
    fn defaults_are_the_contract() {
        let c = load(&[], &[]).unwrap();
        assert_eq!(c, Config::default());
        assert_eq!(c.servers.sink_addr.port(), 9000);
        assert_eq!(c.servers.scaler_addr.port(), 9090);
        assert_eq!(c.servers.http_addr.port(), 8080);
        assert_eq!(c.engine.pod_ttl, Duration::from_secs(15));
        assert_eq!(c.store.kind(), StoreKind::Memory);
        assert_eq!(c.sink.max_message_bytes, 16 << 20);
        assert_eq!(c.sink.max_families_per_pod, 64);
        assert!(c.sink.verify_peer_address);
        assert_eq!(c.prometheus.max_response_bytes, 8 << 20);
        assert_eq!(
            c.prometheus.credentials_dir,
            Path::new("/etc/activescale/prometheus")
        );
    }

    #[test]
    fn env_then_flags_win() {
        let c = load(
            &[
                ("ACTIVESCALE_POD_TTL", "20s"),
                ("ACTIVESCALE_SINK_ADDR", "127.0.0.1:1"),
            ],
            &[("pod_ttl", "30s")],
        )
        .unwrap();
        assert_eq!(c.engine.pod_ttl, Duration::from_secs(30));
        assert_eq!(c.servers.sink_addr, "127.0.0.1:1".parse().unwrap());
    }

    #[test]
    fn legacy_redis_variables() {
        let c = load(
            &[
                ("REDIS_URL", "rediss://cache:6380"),
                ("REDIS_PASSWORD", "s3cret"),
                ("REDIS_DB", "2"),
                ("REDIS_TLS_INSECURE", "true"),
            ],
            &[("store", "redis")],
        )
        .unwrap();
        assert_eq!(c.store.redis().unwrap().url, "rediss://cache:6380");
        assert_eq!(c.store.redis().unwrap().password.as_deref(), Some("s3cret"));
        assert_eq!(c.store.redis().unwrap().db, Some(2));
        assert!(c.store.redis().unwrap().tls_insecure);
        // The prefixed name wins over the legacy one.
        let c = load(
            &[
                ("REDIS_URL", "redis://a"),
                ("ACTIVESCALE_REDIS_URL", "redis://b"),
            ],
            &[("store", "redis")],
        )
        .unwrap();
        assert_eq!(c.store.redis().unwrap().url, "redis://b");
    }

    #[test]
    fn kubernetes_service_links_are_not_settings() {
        let c = load(
            &[
                ("ACTIVESCALE_SERVICE_HOST", "10.0.0.1"),
                ("ACTIVESCALE_SERVICE_PORT_GRPC_SCALER", "9090"),
                ("ACTIVESCALE_PORT", "tcp://10.0.0.1:9000"),
                ("ACTIVESCALE_PORT_9000_TCP_ADDR", "10.0.0.1"),
            ],
            &[],
        );
        assert_eq!(c.unwrap(), Config::default());
    }

    #[test]
    fn lists_are_comma_separated() {
        let c = load(&[("ACTIVESCALE_METRIC_EXCLUDE", "a.*, b.*")], &[]).unwrap();
        assert_eq!(c.sink.metric_exclude, vec!["a.*", "b.*"]);
    }

    /// A self-signed certificate, its key, another key and a file that is
    /// not PEM, written to a directory.
    struct PemFiles {
        cert: String,
        key: String,
        other_key: String,
        not_pem: String,
    }

    impl PemFiles {
        fn new(dir: &Path) -> Self {
            let write = |name: &str, text: &str| {
                let path = dir.join(name);
                std::fs::write(&path, text).unwrap();
                path.to_string_lossy().into_owned()
            };
            let key = rcgen::KeyPair::generate().unwrap();
            let cert = rcgen::CertificateParams::new(vec!["localhost".into()])
                .unwrap()
                .self_signed(&key)
                .unwrap();
            Self {
                cert: write("cert.pem", &cert.pem()),
                key: write("key.pem", &key.serialize_pem()),
                other_key: write(
                    "other.pem",
                    &rcgen::KeyPair::generate().unwrap().serialize_pem(),
                ),
                not_pem: write("not.pem", "not a certificate\n"),
            }
        }
    }

    #[test]
    fn certificates_and_keys_are_parsed_and_paired() {
        let dir = tempfile::tempdir().unwrap();
        let pem = PemFiles::new(dir.path());
        for (cert_field, key_field, ca_field, needs) in [
            ("tls_cert", "tls_key", "tls_client_ca", &[][..]),
            (
                "custom_metrics_tls_cert",
                "custom_metrics_tls_key",
                "custom_metrics_client_ca",
                &[][..],
            ),
            (
                "redis_cert_file",
                "redis_key_file",
                "redis_ca_file",
                &[("store", "redis")][..],
            ),
        ] {
            let with = |cert: &str, key: &str, ca: &str| {
                let mut o: Vec<(&str, &str)> = needs.to_vec();
                o.extend([(cert_field, cert), (key_field, key), (ca_field, ca)]);
                load(&[], &o)
            };
            with(&pem.cert, &pem.key, &pem.cert).unwrap();
            for (cert, key, ca, field, why) in [
                (
                    &pem.not_pem,
                    &pem.key,
                    &pem.cert,
                    cert_field,
                    "no PEM CERTIFICATE",
                ),
                (
                    &pem.key,
                    &pem.key,
                    &pem.cert,
                    cert_field,
                    "no PEM CERTIFICATE",
                ),
                (
                    &pem.cert,
                    &pem.not_pem,
                    &pem.cert,
                    key_field,
                    "no PEM private key",
                ),
                (
                    &pem.cert,
                    &pem.other_key,
                    &pem.cert,
                    key_field,
                    "not usable with",
                ),
                (
                    &pem.cert,
                    &pem.key,
                    &pem.not_pem,
                    ca_field,
                    "no PEM CERTIFICATE",
                ),
            ] {
                let e = with(cert, key, ca).unwrap_err().to_string();
                assert!(
                    e.starts_with(&format!("invalid configuration: {field}: ")) && e.contains(why),
                    "{e:?} should name {field} and say {why:?}"
                );
            }
        }
    }

    #[test]
    fn redis_settings_are_checked_with_the_redis_store_only() {
        let redis = |url: &str, extra: &[(&'static str, &'static str)]| {
            let mut o = vec![("store", "redis"), ("redis_url", url)];
            o.extend_from_slice(extra);
            load(&[], &o).map(drop).map_err(|e| e.to_string())
        };
        redis("redis://cache:6379/2", &[]).unwrap();
        redis("rediss+cluster://u:p@a:1,b:2", &[]).unwrap();
        for (url, extra, expect) in [
            ("cache:6379", &[][..], "redis_url"),
            ("http://cache", &[][..], "redis_url"),
            ("redis://", &[][..], "redis_url"),
            ("redis://a:1,b:2", &[][..], "cluster mode"),
            ("redis://a:notaport", &[][..], "redis_url"),
            ("redis+cluster://a:1", &[("redis_db", "3")][..], "redis_db"),
            (
                "redis://a:1",
                &[("redis_cert_file", "/x.pem")][..],
                "go together",
            ),
            (
                "redis://a:1",
                &[("redis_ca_file", "/nonexistent.pem")][..],
                "redis_ca_file",
            ),
        ] {
            let e = redis(url, extra).unwrap_err();
            assert!(
                e.contains(expect),
                "{url} {extra:?}: {e:?} should say {expect}"
            );
        }
        let e = redis("redis://u:secret@a:1,b:2", &[]).unwrap_err();
        assert!(!e.contains("secret"), "{e}");
        // The memory store reads none of them.
        load(&[], &[("redis_url", "cache:6379")]).unwrap();
    }

    #[test]
    fn each_part_gets_its_group_under_the_same_names() {
        let dir = tempfile::tempdir().unwrap();
        let pem = PemFiles::new(dir.path());
        let c = load(
            &[
                ("ACTIVESCALE_PROMETHEUS_TIMEOUT", "7s"),
                ("ACTIVESCALE_TLS_CERT", &pem.cert),
                ("REDIS_URL", "rediss://cache:6380"),
            ],
            &[("tls_key", &pem.key), ("tls_sink", "false")],
        )
        .unwrap();
        let p = &c.prometheus;
        assert_eq!(p.default_timeout, Duration::from_secs(7));
        assert_eq!(p.poll_interval, Duration::from_secs(5));
        assert_eq!(
            PrometheusConfig::default().credentials_dir,
            Path::new(PROMETHEUS_CREDENTIALS_DIR)
        );
        let t = c.tls.as_ref().unwrap();
        assert_eq!((t.cert.to_str(), t.sink), (Some(pem.cert.as_str()), false));
        // The memory store keeps no Redis settings; with `store: redis` the
        // legacy variable lands in the store's group.
        assert_eq!(c.store, StoreConfig::Memory(MemoryConfig {}));
        let r = load(
            &[("REDIS_URL", "rediss://cache:6380")],
            &[("store", "redis")],
        )
        .unwrap();
        assert_eq!(r.store.redis().unwrap().url, "rediss://cache:6380");
        assert!(Config::default().tls.is_none());
        assert_eq!(
            Config::default().engine,
            EngineConfig {
                pod_ttl: Duration::from_secs(15),
                max_window: Duration::from_secs(600),
                warmup: None,
                allow_cross_namespace: false,
                metadata_cache_size: 10_000,
            }
        );

        for bad in ["0s", "61s"] {
            let e = load(&[], &[("prometheus_timeout", bad)]).unwrap_err();
            assert!(e.to_string().contains("prometheus_timeout"), "{e}");
        }
    }

    #[test]
    fn tls_client_names_need_the_client_ca() {
        let dir = tempfile::tempdir().unwrap();
        let pem = PemFiles::new(dir.path());
        let tls = [
            ("tls_cert", pem.cert.as_str()),
            ("tls_key", pem.key.as_str()),
            ("tls_client_ca", pem.cert.as_str()),
        ];
        let keda = "spiffe://cluster.local/ns/keda/sa/keda-operator";
        let names = format!("{keda}, keda-operator.keda.svc");
        let c = load(&[("ACTIVESCALE_TLS_CLIENT_NAMES", &names)], &tls).unwrap();
        assert_eq!(
            c.tls.as_ref().unwrap().client_names,
            [keda, "keda-operator.keda.svc"]
        );

        let e = load(&[], &[("tls_client_names", keda)])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("tls_client_names") && e.contains("tls_client_ca"),
            "{e}"
        );
        // Lists from the environment drop empty items; a config file can
        // still hold one.
        let mut blank = c;
        blank.tls.as_mut().unwrap().client_names = vec!["a".into(), " ".into()];
        let e = blank.validate().unwrap_err().to_string();
        assert!(e.contains("tls_client_names") && e.contains("\" \""), "{e}");
    }

    #[test]
    fn bad_values_name_the_setting() {
        for (env, field) in [
            (("ACTIVESCALE_POD_TTL", "soon"), "pod_ttl"),
            (("ACTIVESCALE_POD_TTL", "0s"), "pod_ttl"),
            (("ACTIVESCALE_STORE", "etcd"), "store"),
            (("ACTIVESCALE_SINK_ADDR", "nowhere"), "sink_addr"),
            (("ACTIVESCALE_MAX_MESSAGE_BYTES", "12"), "max_message_bytes"),
            (
                ("ACTIVESCALE_SINK_MAX_BUFFERED_BYTES", "1000"),
                "sink_max_buffered_bytes",
            ),
            (
                ("ACTIVESCALE_SINK_MAX_CONCURRENT_STREAMS", "0"),
                "sink_max_concurrent_streams",
            ),
            (
                ("ACTIVESCALE_SINK_MESSAGE_TIMEOUT", "10m"),
                "sink_message_timeout",
            ),
            (
                ("ACTIVESCALE_MAX_FAMILIES_PER_POD", "0"),
                "max_families_per_pod",
            ),
            (
                ("ACTIVESCALE_MAX_FAMILIES_PER_POD", "1025"),
                "max_families_per_pod",
            ),
            (
                ("ACTIVESCALE_PROMETHEUS_MAX_RESPONSE_BYTES", "12"),
                "prometheus_max_response_bytes",
            ),
            (
                ("ACTIVESCALE_PROMETHEUS_CREDENTIALS_DIR", "creds"),
                "prometheus_credentials_dir",
            ),
            (("ACTIVESCALE_TLS_CERT", "/nonexistent.pem"), "tls_cert"),
            (("ACTIVESCALE_NO_SUCH_SETTING", "1"), "no_such_setting"),
        ] {
            let e = load(&[env], &[]).unwrap_err().to_string();
            assert!(e.contains(field), "{e:?} should name {field}");
        }
        let e = load(&[("REDIS_URL", "http://x")], &[("store", "redis")]).unwrap_err();
        assert!(e.to_string().contains("redis_url"), "{e}");
    }

    #[test]
    fn config_file_between_defaults_and_env() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.yaml");
        std::fs::write(
            &path,
            "pod_ttl: 45s\nstore: memory\nhttp_addr: 127.0.0.1:18080\n",
        )
        .unwrap();
        let env = vec![("ACTIVESCALE_POD_TTL".to_string(), "50s".to_string())];
        let c = Config::load_from(Some(&path), env, &[]).unwrap();
        assert_eq!(c.engine.pod_ttl, Duration::from_secs(50));
        assert_eq!(c.servers.http_addr.port(), 18080);
    }

    fn route(host: &str, prefix: Option<&str>, upstream: &str, ns: &str) -> ActivatorRoute {
        ActivatorRoute {
            host: host.into(),
            path_prefix: prefix.map(String::from),
            upstream: upstream.into(),
            namespace: ns.into(),
        }
    }

    #[test]
    fn activator_routes_load_from_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.yaml");
        std::fs::write(
            &path,
            "activator_addr: 0.0.0.0:8081\n\
             activator_routes:\n\
             \x20 - host: web.example.com\n\
             \x20   path_prefix: /\n\
             \x20   upstream: web.shop.svc.cluster.local:80\n\
             \x20   namespace: shop\n\
             \x20 - host: \"*.example.com\"\n\
             \x20   upstream: 10.0.0.1:8080\n\
             \x20   namespace: shop\n",
        )
        .unwrap();
        let c = Config::load_from(Some(&path), std::iter::empty(), &[]).unwrap();
        assert_eq!(
            c.servers.activator_addr,
            Some("0.0.0.0:8081".parse().unwrap())
        );
        // The environment and flags override the address like any setting.
        let env = vec![(
            "ACTIVESCALE_ACTIVATOR_ADDR".to_string(),
            "127.0.0.1:18081".to_string(),
        )];
        let flags = [("activator_hold_timeout", "2m".to_string())];
        let o = Config::load_from(Some(&path), env, &flags).unwrap();
        assert_eq!(
            o.servers.activator_addr,
            Some("127.0.0.1:18081".parse().unwrap())
        );
        assert_eq!(o.activator.hold_timeout, Duration::from_secs(120));
        assert_eq!(o.activator.routes, c.activator.routes);
        assert_eq!(
            c.activator.routes,
            vec![
                route(
                    "web.example.com",
                    Some("/"),
                    "web.shop.svc.cluster.local:80",
                    "shop"
                ),
                route("*.example.com", None, "10.0.0.1:8080", "shop"),
            ]
        );
        let c = load(
            &[("ACTIVESCALE_ACTIVATOR_HOLD_TIMEOUT", "5s")],
            &[("activator_max_pending", "7")],
        )
        .unwrap();
        assert_eq!(c.activator.hold_timeout, Duration::from_secs(5));
        assert_eq!(c.activator.max_pending, 7);
        assert_eq!(c.servers.activator_addr, None);
    }

    #[test]
    fn activator_defaults() {
        let c = Config::default();
        assert_eq!(c.activator.max_pending, 1000);
        assert_eq!(c.activator.max_pending_total, 10_000);
        assert_eq!(c.activator.hold_timeout, Duration::from_secs(60));
        assert_eq!(c.activator.probe_interval, Duration::from_millis(100));
        assert!(c.activator.routes.is_empty() && c.servers.activator_addr.is_none());
    }

    #[test]
    fn bad_activator_routes_name_the_index_and_field() {
        let ok = route("web.example.com", None, "web:80", "shop");
        for (bad, expect) in [
            (
                route("web", None, "web", "shop"),
                "activator_routes[1].upstream: \"web\" is not host:port",
            ),
            (
                route("web", None, "web:0", "shop"),
                "activator_routes[1].upstream",
            ),
            (
                route("web", None, "web:http", "shop"),
                "activator_routes[1].upstream",
            ),
            (
                route("web", None, "[::1:80", "shop"),
                "activator_routes[1].upstream",
            ),
            (
                route("a.*.com", None, "web:80", "shop"),
                "activator_routes[1].host",
            ),
            (
                route("*", None, "web:80", "shop"),
                "activator_routes[1].host",
            ),
            (
                route("we b", None, "web:80", "shop"),
                "activator_routes[1].host",
            ),
            (
                route("-web.com", None, "web:80", "shop"),
                "activator_routes[1].host",
            ),
            (
                route("web", Some("api"), "web:80", "shop"),
                "activator_routes[1].path_prefix",
            ),
            (
                route("web", Some("/a?b"), "web:80", "shop"),
                "activator_routes[1].path_prefix",
            ),
            (
                route("web", None, "web:80", "Shop"),
                "activator_routes[1].namespace",
            ),
            (
                route("web", None, "web:80", "a.b"),
                "activator_routes[1].namespace",
            ),
            (
                route("web", None, "web:80", ""),
                "activator_routes[1].namespace",
            ),
            (
                route("WEB.example.com.", Some("/"), "other:80", "shop"),
                "activator_routes[1]: same host and path_prefix as activator_routes[0]",
            ),
        ] {
            let c = FileConfig {
                activator_routes: vec![ok.clone(), bad],
                ..FileConfig::default()
            };
            let e = c.validate().unwrap_err().to_string();
            assert!(e.contains(expect), "{e:?} should contain {expect:?}");
        }
        for good in [
            route("*.example.com", Some("/api/"), "10.1.2.3:8080", "shop"),
            route("web.example.com", Some("/api"), "[::1]:80", "shop-2"),
        ] {
            let c = FileConfig {
                activator_routes: vec![ok.clone(), good],
                ..FileConfig::default()
            };
            c.validate().unwrap();
        }
    }

    #[test]
    fn activator_settings_are_checked() {
        for (c, field) in [
            (
                FileConfig {
                    activator_addr: Some("127.0.0.1:0".parse().unwrap()),
                    ..FileConfig::default()
                },
                "activator_routes",
            ),
            (
                FileConfig {
                    activator_max_pending: 0,
                    ..FileConfig::default()
                },
                "activator_max_pending",
            ),
            (
                FileConfig {
                    activator_hold_timeout: Duration::ZERO,
                    ..FileConfig::default()
                },
                "activator_hold_timeout",
            ),
            (
                FileConfig {
                    activator_probe_max_interval: Duration::from_millis(10),
                    ..FileConfig::default()
                },
                "activator_probe_max_interval",
            ),
        ] {
            let e = c.validate().unwrap_err().to_string();
            assert!(e.contains(field), "{e:?} should name {field}");
        }
    }

    #[test]
    fn warmup_depends_on_the_store() {
        let mut c = Config::default();
        assert_eq!(c.effective_warmup(), Duration::from_secs(10));
        c.store.redis_mut();
        assert_eq!(c.store.kind(), StoreKind::Redis);
        assert_eq!(c.effective_warmup(), Duration::ZERO);
        c.engine.warmup = Some(Duration::from_secs(3));
        assert_eq!(c.effective_warmup(), Duration::from_secs(3));
    }

    #[test]
    fn custom_metrics_defaults_and_environment() {
        let c = Config::default();
        assert_eq!(c.servers.custom_metrics_addr, None, "off unless asked for");
        assert_eq!(c.custom_metrics.username_headers, ["X-Remote-User"]);
        assert_eq!(c.custom_metrics.group_headers, ["X-Remote-Group"]);
        assert_eq!(c.custom_metrics.extra_headers_prefix, ["X-Remote-Extra-"]);
        assert_eq!(c.custom_metrics.tls_names, ["localhost"]);
        let c = load(
            &[
                ("ACTIVESCALE_CUSTOM_METRICS_ADDR", "127.0.0.1:6443"),
                ("ACTIVESCALE_CUSTOM_METRICS_WINDOWS", "max_30s, avg_2m"),
                (
                    "ACTIVESCALE_CUSTOM_METRICS_TLS_NAMES",
                    "activescale.keda.svc,10.0.0.1",
                ),
            ],
            &[],
        )
        .unwrap();
        assert_eq!(
            c.servers.custom_metrics_addr,
            Some("127.0.0.1:6443".parse().unwrap())
        );
        assert_eq!(c.custom_metrics.windows, ["max_30s", "avg_2m"]);
        assert_eq!(
            c.custom_metrics.tls_names,
            ["activescale.keda.svc", "10.0.0.1"]
        );
    }

    #[test]
    fn custom_metrics_rules_from_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.yaml");
        std::fs::write(
            &path,
            r#"custom_metrics_addr: 127.0.0.1:6443
custom_metrics_rules:
  - name: http_requests_per_second
    server: http://prometheus:9090
    query: 'sum by (<<.GroupBy>>) (rate(http_requests_total{<<.LabelMatchers>>}[2m]))'
    window: 2m
    pods_from: sidecars
"#,
        )
        .unwrap();
        let c = Config::load_from(Some(&path), Vec::new(), &[]).unwrap();
        let r = &c.custom_metrics.rules[0];
        assert_eq!(r.pod_label, "pod");
        assert_eq!(r.window, Some(Duration::from_secs(120)));
        assert_eq!(r.pods_from, PodsFrom::Sidecars);
        assert_eq!(r.timeout, None);
    }

    #[test]
    fn custom_metrics_refusals_name_the_setting() {
        let dir = tempfile::tempdir().unwrap();
        let ca = PemFiles::new(dir.path()).cert;
        let rule = |f: &dyn Fn(&mut CustomMetricsRule)| {
            let mut r = CustomMetricsRule {
                name: "rps".into(),
                server: "http://prometheus:9090".into(),
                query: "x{<<.LabelMatchers>>}".into(),
                pod_label: "pod".into(),
                window: None,
                pods_from: PodsFrom::Prometheus,
                timeout: None,
            };
            f(&mut r);
            FileConfig {
                custom_metrics_rules: vec![r],
                ..FileConfig::default()
            }
        };
        for (env, field) in [
            (
                vec![("ACTIVESCALE_CUSTOM_METRICS_ADDR", "0.0.0.0:6443")],
                "custom_metrics_client_ca",
            ),
            (
                vec![("ACTIVESCALE_CUSTOM_METRICS_ADDR", "[::]:6443")],
                "custom_metrics_client_ca",
            ),
            (
                vec![("ACTIVESCALE_CUSTOM_METRICS_TLS_CERT", ca.as_str())],
                "custom_metrics_tls_cert",
            ),
            (
                vec![("ACTIVESCALE_CUSTOM_METRICS_CLIENT_CA", "/nonexistent.pem")],
                "custom_metrics_client_ca",
            ),
            (
                vec![(
                    "ACTIVESCALE_CUSTOM_METRICS_ALLOWED_NAMES",
                    "front-proxy-client",
                )],
                "custom_metrics_allowed_names",
            ),
            (
                vec![(
                    "ACTIVESCALE_CUSTOM_METRICS_USERNAME_HEADERS",
                    "X Remote User",
                )],
                "custom_metrics_username_headers",
            ),
            (
                vec![("ACTIVESCALE_CUSTOM_METRICS_USERNAME_HEADERS", "")],
                "custom_metrics_username_headers",
            ),
            (
                vec![("ACTIVESCALE_CUSTOM_METRICS_TLS_NAMES", "bad name")],
                "custom_metrics_tls_names",
            ),
            (
                vec![("ACTIVESCALE_CUSTOM_METRICS_WINDOWS", "max30s")],
                "custom_metrics_windows",
            ),
            (
                vec![("ACTIVESCALE_CUSTOM_METRICS_WINDOWS", "p99_30s")],
                "custom_metrics_windows",
            ),
            (
                vec![("ACTIVESCALE_CUSTOM_METRICS_WINDOWS", "max_1500ms")],
                "custom_metrics_windows",
            ),
            (
                vec![("ACTIVESCALE_CUSTOM_METRICS_WINDOWS", "max_1m 30s")],
                "custom_metrics_windows",
            ),
            (
                vec![("ACTIVESCALE_CUSTOM_METRICS_WINDOWS", "max_11m")],
                "custom_metrics_windows",
            ),
            (
                vec![("ACTIVESCALE_CUSTOM_METRICS_WINDOWS", "max_30s,max_30s")],
                "custom_metrics_windows",
            ),
        ] {
            let e = load(&env, &[]).unwrap_err().to_string();
            assert!(e.contains(field), "{env:?}: {e:?} should name {field}");
        }
        for (config, field) in [
            (
                rule(&|r| r.name = "active_requests".into()),
                "custom_metrics_rules[0].name",
            ),
            (
                rule(&|r| r.name = "9lives".into()),
                "custom_metrics_rules[0].name",
            ),
            (
                rule(&|r| r.name = "a/b".into()),
                "custom_metrics_rules[0].name",
            ),
            (
                rule(&|r| r.server = "prometheus:9090".into()),
                "custom_metrics_rules[0].server",
            ),
            (
                rule(&|r| r.query = " ".into()),
                "custom_metrics_rules[0].query",
            ),
            (
                rule(&|r| r.pod_label = "pod-name".into()),
                "custom_metrics_rules[0].pod_label",
            ),
            (
                rule(&|r| r.window = Some(Duration::from_millis(1500))),
                "custom_metrics_rules[0].window",
            ),
            (
                rule(&|r| r.timeout = Some(Duration::from_secs(61))),
                "custom_metrics_rules[0].timeout",
            ),
        ] {
            let e = config.validate().unwrap_err().to_string();
            assert!(e.contains(field), "{e:?} should name {field}");
        }
        // Loopback without a CA is the local and test set-up.
        load(
            &[("ACTIVESCALE_CUSTOM_METRICS_ADDR", "127.0.0.1:6443")],
            &[],
        )
        .unwrap();
        load(&[("ACTIVESCALE_CUSTOM_METRICS_ADDR", "[::1]:6443")], &[]).unwrap();
        load(
            &[
                ("ACTIVESCALE_CUSTOM_METRICS_ADDR", "0.0.0.0:6443"),
                ("ACTIVESCALE_CUSTOM_METRICS_CLIENT_CA", ca.as_str()),
                (
                    "ACTIVESCALE_CUSTOM_METRICS_ALLOWED_NAMES",
                    "front-proxy-client",
                ),
            ],
            &[],
        )
        .unwrap();
    }

    /// A flat config that sets every key to something other than its
    /// default, valid as a whole (the files it names exist).
    fn every_key(pem: &PemFiles, dir: &Path) -> serde_json::Value {
        let rule = CustomMetricsRule {
            name: "rps".into(),
            server: "http://prometheus:9090".into(),
            query: "x{<<.LabelMatchers>>}".into(),
            pod_label: "pod_name".into(),
            window: Some(Duration::from_secs(120)),
            pods_from: PodsFrom::Sidecars,
            timeout: Some(Duration::from_secs(3)),
        };
        let f = FileConfig {
            sink_addr: "127.0.0.1:19000".parse().unwrap(),
            scaler_addr: "127.0.0.1:19090".parse().unwrap(),
            http_addr: "127.0.0.1:18080".parse().unwrap(),
            pod_ttl: Duration::from_secs(20),
            store: StoreKind::Redis,
            max_message_bytes: 8 << 20,
            metric_include: vec!["a.*".into(), "b.*".into()],
            metric_exclude: vec!["c.*".into()],
            exclude_sink_scope: false,
            max_families_per_pod: 32,
            sink_verify_peer_address: false,
            sink_max_buffered_bytes: 32 << 20,
            sink_max_concurrent_streams: 50,
            sink_message_timeout: Duration::from_secs(20),
            max_window: Duration::from_secs(900),
            warmup: Some(Duration::from_secs(3)),
            allow_cross_namespace: true,
            view_enabled: false,
            metadata_cache_size: 500,
            log_format: LogFormat::Json,
            summary_interval: Duration::from_secs(30),
            drain_timeout: Duration::from_secs(20),
            http_header_timeout: Duration::from_secs(5),
            http2_keepalive_interval: Duration::from_secs(40),
            http2_keepalive_timeout: Duration::from_secs(20),
            redis_url: "rediss://cache:6380".into(),
            redis_username: Some("scaler".into()),
            redis_password: Some("s3cret".into()),
            redis_db: Some(0),
            redis_tls: true,
            redis_ca_file: Some(pem.cert.clone().into()),
            redis_tls_insecure: true,
            redis_cert_file: Some(pem.cert.clone().into()),
            redis_key_file: Some(pem.key.clone().into()),
            redis_cluster: true,
            redis_pool_size: 4,
            redis_timeout: Duration::from_secs(2),
            redis_key_prefix: "other".into(),
            prometheus_enforce_namespace: false,
            prometheus_cache_ttl: Duration::from_secs(3),
            prometheus_poll_interval: Duration::from_secs(6),
            prometheus_timeout: Duration::from_secs(7),
            prometheus_max_response_bytes: 1 << 20,
            prometheus_credentials_dir: dir.join("creds"),
            tls_cert: Some(pem.cert.clone().into()),
            tls_key: Some(pem.key.clone().into()),
            tls_client_ca: Some(pem.cert.clone().into()),
            tls_client_names: vec!["keda".into()],
            tls_reload_interval: Duration::from_secs(20),
            tls_sink: false,
            custom_metrics_addr: Some("127.0.0.1:16443".parse().unwrap()),
            custom_metrics_tls_cert: Some(pem.cert.clone().into()),
            custom_metrics_tls_key: Some(pem.key.clone().into()),
            custom_metrics_tls_names: vec!["api.example".into()],
            custom_metrics_client_ca: Some(pem.cert.clone().into()),
            custom_metrics_allowed_names: vec!["front-proxy-client".into()],
            custom_metrics_username_headers: vec!["X-User".into()],
            custom_metrics_group_headers: vec!["X-Group".into()],
            custom_metrics_extra_headers_prefix: vec!["X-Extra-".into()],
            custom_metrics_windows: vec!["max_30s".into()],
            custom_metrics_rules: vec![rule],
            activator_addr: Some("127.0.0.1:18081".parse().unwrap()),
            activator_routes: vec![route("web.example.com", None, "web:80", "shop")],
            activator_max_pending: 10,
            activator_max_pending_total: 100,
            activator_hold_timeout: Duration::from_secs(30),
            activator_probe_interval: Duration::from_millis(200),
            activator_probe_max_interval: Duration::from_secs(5),
            activator_connect_timeout: Duration::from_secs(2),
            activator_header_read_timeout: Duration::from_secs(10),
            activator_max_connections: 100,
        };
        serde_json::to_value(f).unwrap()
    }

    /// How a key's value is written in the environment and on a flag;
    /// `None`: a file-only setting (routes, rules).
    fn as_flag(value: &serde_json::Value) -> Option<String> {
        use serde_json::Value;
        match value {
            Value::String(s) => Some(s.clone()),
            Value::Bool(_) | Value::Number(_) => Some(value.to_string()),
            Value::Array(items) => items
                .iter()
                .map(|i| i.as_str().map(String::from))
                .collect::<Option<Vec<_>>>()
                .map(|items| items.join(",")),
            _ => None,
        }
    }

    #[test]
    fn every_key_round_trips_through_the_groups() {
        let dir = tempfile::tempdir().unwrap();
        let pem = PemFiles::new(dir.path());
        let all = every_key(&pem, dir.path());
        let defaults = serde_json::to_value(FileConfig::default()).unwrap();
        let keys = all.as_object().unwrap();
        // Every key is set, and away from its default: a key the groups
        // dropped or swapped could not come back unchanged below.
        assert_eq!(keys.len(), defaults.as_object().unwrap().len());
        for (key, value) in keys {
            assert_ne!(Some(value), defaults.get(key), "{key} is at its default");
        }
        let path = dir.path().join("all.yaml");
        std::fs::write(&path, serde_yaml::to_string(&all).unwrap()).unwrap();
        let c = Config::load_from(Some(&path), std::iter::empty(), &[]).unwrap();
        assert_eq!(serde_json::to_value(&c).unwrap(), all);
        // And back in through serde, as the chart tests read rendered configs.
        let again: Config = serde_json::from_value(all.clone()).unwrap();
        assert_eq!(again, c);
        // A few groups by hand: each part sees its keys under its own names.
        assert_eq!(c.servers.scaler_addr.port(), 19090);
        assert_eq!(c.sink.max_buffered_bytes, 32 << 20);
        assert_eq!(c.store.redis().unwrap().key_prefix, "other");
        assert_eq!(c.engine.metadata_cache_size, 500);
        assert_eq!(c.prometheus.default_timeout, Duration::from_secs(7));
        assert!(!c.tls.as_ref().unwrap().sink);
        assert_eq!(c.custom_metrics.reload_interval, Duration::from_secs(20));
        assert_eq!(c.activator.max_pending_total, 100);
        assert_eq!(c.http.header_timeout, Duration::from_secs(5));
        assert_eq!(c.telemetry.log_format, LogFormat::Json);
    }

    #[test]
    fn every_key_loads_from_the_environment_and_flags_by_its_name() {
        let dir = tempfile::tempdir().unwrap();
        let pem = PemFiles::new(dir.path());
        let all = every_key(&pem, dir.path());
        let want = {
            let path = dir.path().join("all.yaml");
            std::fs::write(&path, serde_yaml::to_string(&all).unwrap()).unwrap();
            Config::load_from(Some(&path), std::iter::empty(), &[]).unwrap()
        };
        let mut checked = 0;
        for (key, value) in all.as_object().unwrap() {
            let Some(text) = as_flag(value) else {
                continue;
            };
            // The file without this key, which then comes from elsewhere.
            let mut rest = all.clone();
            rest.as_object_mut().unwrap().remove(key);
            let path = dir.path().join("rest.yaml");
            std::fs::write(&path, serde_yaml::to_string(&rest).unwrap()).unwrap();
            let env = vec![(
                format!("ACTIVESCALE_{}", key.to_ascii_uppercase()),
                text.clone(),
            )];
            let from_env = Config::load_from(Some(&path), env, &[])
                .unwrap_or_else(|e| panic!("{key} from the environment: {e}"));
            assert_eq!(from_env, want, "{key} from the environment");
            let from_flag = Config::load_from(Some(&path), std::iter::empty(), &[(key, text)])
                .unwrap_or_else(|e| panic!("{key} from a flag: {e}"));
            assert_eq!(from_flag, want, "{key} from a flag");
            checked += 1;
        }
        assert_eq!(
            checked,
            all.as_object().unwrap().len() - 2,
            "all but routes and rules"
        );
    }

    #[test]
    fn unknown_keys_are_refused_as_before() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.yaml");
        std::fs::write(&path, "pod_ttl: 20s\nno_such_setting: 1\n").unwrap();
        let e = Config::load_from(Some(&path), std::iter::empty(), &[])
            .unwrap_err()
            .to_string();
        // serde's message, listing the flat keys: the file layer is unchanged.
        assert!(
            e.starts_with(
                "invalid configuration: unknown field `no_such_setting`, expected one of `sink_addr`, `scaler_addr`"
            ),
            "{e}"
        );
        // Group names are not keys.
        std::fs::write(&path, "engine:\n  pod_ttl: 20s\n").unwrap();
        let e = Config::load_from(Some(&path), std::iter::empty(), &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown field `engine`"), "{e}");
    }

    #[test]
    fn window_specs() {
        assert_eq!(
            parse_custom_metrics_window("max_30s").unwrap(),
            (WindowFunction::Max, Duration::from_secs(30))
        );
        assert_eq!(
            parse_custom_metrics_window("avg_1m30s").unwrap(),
            (WindowFunction::Avg, Duration::from_secs(90))
        );
        for bad in ["", "max", "max_", "max_0s", "min_30s", "max_30S", "max_-1s"] {
            assert!(parse_custom_metrics_window(bad).is_err(), "{bad:?}");
        }
    }
}

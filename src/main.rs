//! The `activescale` binary: parse flags, load config, set up logs, bind, run.

use std::{io::Write, path::PathBuf};

use anyhow::Context;
use clap::{Args, CommandFactory, FromArgMatches, Parser, Subcommand};

use activescale::{Listeners, config::Config};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

// Parsed once at start-up: the size difference between variants costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Command {
    /// Serve the Envoy sink, the KEDA scaler and the HTTP port.
    #[command(after_help = SERVE_AFTER_HELP)]
    Serve(ServeArgs),
    /// Validate the activescale triggers of ScaledObjects in Kubernetes YAML,
    /// offline, with the server's own parser. Exits 1 on any error.
    Check(CheckArgs),
}

const SERVE_AFTER_HELP: &str = "\
Each flag sets the config field of the same name, as ACTIVESCALE_<FIELD> does \
(--pod-ttl 20s, ACTIVESCALE_POD_TTL=20s); a flag wins over the environment, \
which wins over --config. The defaults shown are the built-in ones. Settings \
without a flag are set in the file or the environment (see README).";

#[derive(Args)]
struct CheckArgs {
    /// YAML files, multi-document; `-` reads standard input.
    #[arg(required = true)]
    files: Vec<String>,
    /// Glob over an external trigger's `scalerAddress` that marks it as
    /// activescale's (repeatable; `*` checks every external trigger).
    #[arg(long, value_name = "GLOB", default_value = activescale::check::DEFAULT_SCALER_ADDRESS)]
    scaler_address: Vec<String>,
    /// The server's config file, for the limits triggers are checked
    /// against (`max_window`, `allow_cross_namespace`); default: built-in defaults.
    #[arg(long)]
    config: Option<PathBuf>,
}

/// Flags override the config file and the environment. Each sets the config
/// field of the same name (`--pod-ttl` sets `pod_ttl`); see README. The
/// `[default: ...]` of each flag's help is appended at start-up from
/// `Config::default()` ([`with_defaults`]), so it cannot drift from the code.
#[derive(Args, Default)]
struct ServeArgs {
    /// YAML or TOML file with any config fields.
    #[arg(long, env = "ACTIVESCALE_CONFIG")]
    config: Option<PathBuf>,
    /// Where the Envoy metrics sink (gRPC StreamMetrics) listens.
    #[arg(long)]
    sink_addr: Option<String>,
    /// Where KEDA's external scaler gRPC service listens.
    #[arg(long)]
    scaler_addr: Option<String>,
    /// Where /healthz, /readyz, /metrics, /v1/pods and the live view are served.
    #[arg(long)]
    http_addr: Option<String>,
    /// A pod not heard from for this long drops out of every answer.
    #[arg(long)]
    pod_ttl: Option<String>,
    /// memory (one replica) | redis (several replicas, one view).
    #[arg(long)]
    store: Option<String>,
    /// Largest Envoy message accepted, in bytes; also one pod address's share
    /// of sink_max_buffered_bytes while sink_verify_peer_address is on.
    #[arg(long)]
    max_message_bytes: Option<String>,
    /// Comma-separated stat-name globs to keep.
    #[arg(long)]
    metric_include: Option<String>,
    /// Comma-separated stat-name globs to drop even when included.
    #[arg(long)]
    metric_exclude: Option<String>,
    /// Distinct stat families kept per pod, 1 to 1024.
    #[arg(long)]
    max_families_per_pod: Option<String>,
    /// Accept a sidecar stream only from the pod IP its node id names (false
    /// where source addresses are rewritten).
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    sink_verify_peer_address: Option<String>,
    /// Bytes of Envoy messages all sink streams may hold while they arrive,
    /// 1 MiB to 1 GiB; a message is admitted whole when its prefix arrives.
    #[arg(long)]
    sink_max_buffered_bytes: Option<String>,
    /// Concurrent HTTP/2 streams per sink connection, 1 to 10000.
    #[arg(long)]
    sink_max_concurrent_streams: Option<String>,
    /// A started Envoy message must be whole within this, 1s to 5m, arriving
    /// at the pace that finishes it in time.
    #[arg(long)]
    sink_message_timeout: Option<String>,
    /// Longest `window` a trigger may ask for; older pod history is forgotten.
    #[arg(long)]
    max_window: Option<String>,
    /// Envoy-source answers are UNAVAILABLE this long after start-up; unset:
    /// 10s with the memory store, 0s with redis.
    #[arg(long)]
    warmup: Option<String>,
    /// Let a trigger's `namespace` metadata read pods of another namespace.
    #[arg(long)]
    allow_cross_namespace: Option<String>,
    /// Serve the live view (`/`, `/v1/triggers`, `/v1/status`) on the HTTP
    /// port; false: those answer 404.
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    view_enabled: Option<String>,
    /// text | json
    #[arg(long)]
    log_format: Option<String>,
    /// How often the ingest and API summary lines are logged.
    #[arg(long)]
    summary_interval: Option<String>,
    /// On SIGTERM, how long open streams and calls get to finish.
    #[arg(long)]
    drain_timeout: Option<String>,
    /// Close HTTP-port connections that send no whole request head within
    /// this long, 1s to 30s.
    #[arg(long)]
    http_header_timeout: Option<String>,
    /// redis://, rediss:// (TLS), redis+cluster:// or rediss+cluster:// URL
    /// (also REDIS_URL).
    #[arg(long)]
    redis_url: Option<String>,
    /// Redis Cluster / Valkey cluster mode (or use a redis+cluster:// URL).
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    redis_cluster: Option<String>,
    /// Connections in the Redis command pool.
    #[arg(long)]
    redis_pool_size: Option<String>,
    /// Deadline for one Redis command or pipeline.
    #[arg(long)]
    redis_timeout: Option<String>,
    /// Prefix of every Redis key and channel, so installs can share one Redis.
    #[arg(long)]
    redis_key_prefix: Option<String>,
    /// Inject namespace="<ScaledObject namespace>" into every selector of
    /// prometheus-source queries.
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    prometheus_enforce_namespace: Option<String>,
    /// How long a Prometheus result is reused for the same server and query.
    #[arg(long)]
    prometheus_cache_ttl: Option<String>,
    /// How often StreamIsActive re-reads prometheus-source triggers.
    #[arg(long)]
    prometheus_poll_interval: Option<String>,
    /// Largest Prometheus response body read, in bytes; a longer one is an error.
    #[arg(long)]
    prometheus_max_response_bytes: Option<String>,
    /// Trigger credential files are read only from <this>/<ScaledObject namespace>/.
    #[arg(long)]
    prometheus_credentials_dir: Option<String>,
    /// PEM certificate chain for TLS on both gRPC ports; unset: plaintext.
    #[arg(long)]
    tls_cert: Option<String>,
    /// PEM private key for --tls-cert.
    #[arg(long)]
    tls_key: Option<String>,
    /// PEM CA bundle: clients must present a certificate it signed (mTLS).
    #[arg(long)]
    tls_client_ca: Option<String>,
    /// Comma-separated client certificate names the scaler port accepts
    /// (URI or DNS SANs, or the CN); empty: any certificate of tls_client_ca.
    #[arg(long)]
    tls_client_names: Option<String>,
    /// Serve the Custom Metrics API (HTTPS) on this address; unset: off.
    #[arg(long)]
    custom_metrics_addr: Option<String>,
    /// PEM certificate chain of the Custom Metrics API; unset: self-signed.
    #[arg(long)]
    custom_metrics_tls_cert: Option<String>,
    /// PEM private key for --custom-metrics-tls-cert.
    #[arg(long)]
    custom_metrics_tls_key: Option<String>,
    /// The front-proxy CA (requestheader-client-ca-file).
    #[arg(long)]
    custom_metrics_client_ca: Option<String>,
    /// Comma-separated common names of the front-proxy certificate; none: any.
    #[arg(long)]
    custom_metrics_allowed_names: Option<String>,
    /// Comma-separated windowed forms of active_requests, e.g. max_30s,avg_2m.
    #[arg(long)]
    custom_metrics_windows: Option<String>,
    /// Where the activator proxy listens (unset: no proxy); routes come from
    /// the config file.
    #[arg(long)]
    activator_addr: Option<String>,
    /// Requests one route holds while its upstream cannot take them; past it, 503.
    #[arg(long)]
    activator_max_pending: Option<String>,
    /// Longest a request is held; then 504.
    #[arg(long)]
    activator_hold_timeout: Option<String>,
}

impl ServeArgs {
    fn overrides(&self) -> Vec<(&'static str, String)> {
        [
            ("sink_addr", &self.sink_addr),
            ("scaler_addr", &self.scaler_addr),
            ("http_addr", &self.http_addr),
            ("pod_ttl", &self.pod_ttl),
            ("store", &self.store),
            ("max_message_bytes", &self.max_message_bytes),
            ("metric_include", &self.metric_include),
            ("metric_exclude", &self.metric_exclude),
            ("max_families_per_pod", &self.max_families_per_pod),
            ("sink_max_buffered_bytes", &self.sink_max_buffered_bytes),
            (
                "sink_max_concurrent_streams",
                &self.sink_max_concurrent_streams,
            ),
            ("sink_message_timeout", &self.sink_message_timeout),
            ("sink_verify_peer_address", &self.sink_verify_peer_address),
            ("max_window", &self.max_window),
            ("warmup", &self.warmup),
            ("allow_cross_namespace", &self.allow_cross_namespace),
            ("view_enabled", &self.view_enabled),
            ("log_format", &self.log_format),
            ("summary_interval", &self.summary_interval),
            ("drain_timeout", &self.drain_timeout),
            ("http_header_timeout", &self.http_header_timeout),
            ("redis_url", &self.redis_url),
            ("redis_cluster", &self.redis_cluster),
            ("redis_pool_size", &self.redis_pool_size),
            ("redis_timeout", &self.redis_timeout),
            ("redis_key_prefix", &self.redis_key_prefix),
            (
                "prometheus_enforce_namespace",
                &self.prometheus_enforce_namespace,
            ),
            ("prometheus_cache_ttl", &self.prometheus_cache_ttl),
            ("prometheus_poll_interval", &self.prometheus_poll_interval),
            (
                "prometheus_max_response_bytes",
                &self.prometheus_max_response_bytes,
            ),
            (
                "prometheus_credentials_dir",
                &self.prometheus_credentials_dir,
            ),
            ("tls_cert", &self.tls_cert),
            ("tls_key", &self.tls_key),
            ("tls_client_ca", &self.tls_client_ca),
            ("tls_client_names", &self.tls_client_names),
            ("custom_metrics_addr", &self.custom_metrics_addr),
            ("custom_metrics_tls_cert", &self.custom_metrics_tls_cert),
            ("custom_metrics_tls_key", &self.custom_metrics_tls_key),
            ("custom_metrics_client_ca", &self.custom_metrics_client_ca),
            (
                "custom_metrics_allowed_names",
                &self.custom_metrics_allowed_names,
            ),
            ("custom_metrics_windows", &self.custom_metrics_windows),
            ("activator_addr", &self.activator_addr),
            ("activator_max_pending", &self.activator_max_pending),
            ("activator_hold_timeout", &self.activator_hold_timeout),
        ]
        .into_iter()
        .filter_map(|(k, v)| v.clone().map(|v| (k, v)))
        .collect()
    }
}

/// The `serve` flags' help with `[default: ...]` appended, as clap would show
/// a `default_value`. Not a `default_value` itself: a flag given no value must
/// leave the config file's and the environment's settings alone.
fn with_defaults(cli: clap::Command) -> clap::Command {
    let defaults = match serde_json::to_value(Config::default()) {
        Ok(serde_json::Value::Object(fields)) => fields,
        _ => Default::default(),
    };
    cli.mut_subcommand("serve", |serve| {
        let ids: Vec<String> = serve
            .get_arguments()
            .map(|a| a.get_id().to_string())
            .collect();
        ids.into_iter().fold(serve, |serve, id| {
            let shown = match (id.as_str(), defaults.get(&id)) {
                // No file: only built-in defaults, the environment and flags.
                ("config", _) => Some("unset".to_string()),
                (_, Some(value)) => Some(default_text(value)),
                // `--help`, `--version`: no setting behind them.
                (_, None) => None,
            };
            match shown {
                Some(shown) => serve.mut_arg(id, |arg| {
                    let help = arg.get_help().map(|h| h.to_string()).unwrap_or_default();
                    arg.help(format!("{help} [default: {shown}]"))
                }),
                None => serve,
            }
        })
    })
}

/// A default as it would be written on the command line: durations in
/// humantime form (serde's), lists comma-separated, `unset` for no value.
fn default_text(value: &serde_json::Value) -> String {
    use serde_json::Value;
    match value {
        Value::Null => "unset".into(),
        Value::String(s) if s.is_empty() => "\"\"".into(),
        Value::String(s) => s.clone(),
        Value::Array(items) if items.is_empty() => "none".into(),
        Value::Array(items) => items.iter().map(default_text).collect::<Vec<_>>().join(","),
        other => other.to_string(),
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let matches = with_defaults(Cli::command()).get_matches();
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    match cli.command {
        Command::Serve(args) => serve(args).await,
        Command::Check(args) => check(args),
    }
}

fn check(args: CheckArgs) -> anyhow::Result<()> {
    use activescale::check;
    let config = match &args.config {
        // Only the file: the environment of whoever runs the check is not the server's.
        Some(path) => Config::load_from(Some(path), std::iter::empty(), &[])?,
        None => Config::default(),
    };
    let options = check::Options::new(&args.scaler_address, &config);
    let report = check::check(&check::read_inputs(&args.files), &options);
    let mut out = std::io::stdout().lock();
    for finding in &report.findings {
        // A closed pipe (`| head`) is the reader's choice, not a failure.
        if writeln!(out, "{finding}").is_err() {
            break;
        }
    }
    drop(out);
    eprintln!("{}", report.summary());
    if report.failed() {
        std::process::exit(1);
    }
    Ok(())
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let config = match Config::load(args.config.as_deref(), &args.overrides()) {
        Ok(c) => c,
        Err(e) => {
            // One line naming the setting, non-zero exit, nothing bound.
            eprintln!("activescale: {e}");
            std::process::exit(2);
        }
    };
    if let Err(e) = activescale::preflight(&config) {
        eprintln!("activescale: {e}");
        std::process::exit(2);
    }
    activescale::telemetry::init(match config.telemetry.log_format {
        activescale::config::LogFormat::Text => activescale::telemetry::LogFormat::Text,
        activescale::config::LogFormat::Json => activescale::telemetry::LogFormat::Json,
    });
    if config.store.redis().is_some_and(|r| r.tls_insecure) {
        tracing::warn!(
            "REDIS_TLS_INSECURE is set: the Redis server's certificate is NOT verified; \
             anyone on the path can read and forge scaling data"
        );
    }
    raise_open_file_limit();
    let listeners = Listeners::bind(&config).await.context("binding ports")?;
    activescale::run(config, listeners, shutdown_signal()).await?;
    Ok(())
}

/// Every sidecar stream, KEDA stream and HTTP connection is a descriptor; the
/// usual soft limit (1024) would refuse connections long before memory or
/// CPU run short, so take what the hard limit allows.
fn raise_open_file_limit() {
    let before = rlimit::Resource::NOFILE.get().ok();
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(now) => tracing::info!(before = ?before.map(|b| b.0), now, "open-file limit"),
        Err(e) => tracing::warn!(error = %e, "could not raise the open-file limit"),
    }
}

/// SIGTERM (what Kubernetes sends) or Ctrl-C.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
}

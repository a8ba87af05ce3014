//! Prometheus backend for `source: prometheus` triggers.
//!
//! - [`formula`]: the safe arithmetic language of `formula`.
//! - [`presets`]: the named worker formulas of `preset`.
//! - [`promql`]: PromQL checks and namespace injection, done at parse time.
//! - [`client`]: HTTP, TLS, credentials, result cache and single-flight.
//! - [`files`]: the files trigger keys name (`caCert`, credential files), read
//!   only inside the namespace's credentials directory.
//!
//! A trigger is parsed once (the [`crate::trigger::TriggerCache`] keeps it):
//! every query is checked and rewritten then, so a bad one is
//! `INVALID_ARGUMENT` on the first `GetMetricSpec`. At query time a trigger is
//! one or more instant queries and, for presets and formulas, a formula over
//! their results. Nothing that fails becomes a number: every failure is a
//! [`PromError`] the scaler turns into a gRPC status.

pub mod client;
pub mod files;
pub mod formula;
pub mod presets;
pub mod promql;

use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use reqwest::header::{AUTHORIZATION, HeaderName, HeaderValue};
use tracing::warn;

use crate::trigger::{Metadata, MetadataError};
use client::{Auth, Connections, Endpoint, Outcome, Secret};
use files::CredentialFile;
use formula::Formula;
use promql::Rewrite;

/// Default of `prometheus_credentials_dir`. Files named by triggers
/// (`caCert`, `bearerTokenFile`, `passwordFile`) are read only from
/// `<this>/<ScaledObject namespace>/`: a trigger must not be able to make the
/// scaler send a file of its own choosing (its service-account token, another
/// tenant's password) to a server of its own choosing, nor read a device, a
/// FIFO or `/proc` (see [`files`]).
pub const CREDENTIALS_DIR: &str = "/etc/activescale/prometheus";

/// Default of `prometheus_max_response_bytes`: an instant query answered
/// with one series is a few hundred bytes.
pub const MAX_RESPONSE_BYTES: usize = 8 << 20;

/// Longest `timeout` a trigger may ask for.
const MAX_TIMEOUT: Duration = Duration::from_secs(60);

/// Most characters of a refused value shown in the error. A status message
/// travels in an HTTP/2 trailer, and a 16 KiB query echoed whole makes the
/// client drop the response (a protocol error instead of the reason).
const SHOWN_CHARS: usize = 200;

/// [`MetadataError::invalid`] with the value cut to [`SHOWN_CHARS`].
pub(crate) fn invalid(key: &str, value: &str, expected: impl Into<String>) -> MetadataError {
    MetadataError::invalid(key, &excerpt(value), expected)
}

/// `value`, or its first [`SHOWN_CHARS`] characters and its length.
pub(crate) fn excerpt(value: &str) -> std::borrow::Cow<'_, str> {
    match value.char_indices().nth(SHOWN_CHARS) {
        None => value.into(),
        Some((cut, _)) => format!("{}… ({} bytes in all)", &value[..cut], value.len()).into(),
    }
}

/// Service-wide settings of the Prometheus backend (from [`crate::config::Config`]).
#[derive(Clone, Debug, PartialEq)]
pub struct PromSettings {
    pub enforce_namespace: bool,
    pub cache_ttl: Duration,
    pub poll_interval: Duration,
    pub default_timeout: Duration,
    /// Where each namespace's credential files are (see [`CREDENTIALS_DIR`]).
    pub credentials_dir: PathBuf,
    /// Largest response body read from a Prometheus server.
    pub max_response_bytes: usize,
}

impl Default for PromSettings {
    fn default() -> Self {
        Self {
            enforce_namespace: true,
            cache_ttl: Duration::from_secs(2),
            poll_interval: Duration::from_secs(5),
            default_timeout: Duration::from_secs(5),
            credentials_dir: PathBuf::from(CREDENTIALS_DIR),
            max_response_bytes: MAX_RESPONSE_BYTES,
        }
    }
}

/// A parsed prometheus-source trigger: where to ask, what to ask (already
/// checked and rewritten), and how to combine the answers.
#[derive(Clone, Debug, PartialEq)]
pub struct PromTrigger {
    endpoint: Arc<Endpoint>,
    /// (name, query as sent); one entry for `query`.
    queries: Vec<(String, String)>,
    /// Over the answers of `queries`, in order; `None` for a single `query`.
    formula: Option<Formula>,
    /// An empty answer counts as 0 instead of being an error.
    ignore_null: bool,
}

/// What makes two prometheus triggers read the same value: the endpoint
/// (server, TLS, credentials, timeout), the queries as sent, the formula and
/// `ignoreNullValues`. A feed is shared per key.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PromKey {
    endpoint: Arc<Endpoint>,
    queries: Vec<(String, String)>,
    /// The parsed formula's canonical form (it holds floats, which do not hash).
    formula: Option<String>,
    ignore_null: bool,
}

impl PromTrigger {
    /// This trigger's [`PromKey`].
    pub fn feed_key(&self) -> PromKey {
        PromKey {
            endpoint: self.endpoint.clone(),
            queries: self.queries.clone(),
            formula: self.formula.as_ref().map(|f| format!("{f:?}")),
            ignore_null: self.ignore_null,
        }
    }
}

/// What [`PromTrigger::parse`] yields: the trigger and the defaults its preset gives.
pub struct ParsedProm {
    pub trigger: PromTrigger,
    pub default_target: Option<f64>,
    pub default_metric_name: &'static str,
}

const QUERY_PREFIX: &str = "query.";

impl PromTrigger {
    /// Metadata keys of the prometheus source (besides the common ones).
    pub const KEYS: &'static [&'static str] = &[
        "serverAddress",
        "query",
        "preset",
        "formula",
        "selector",
        "jobsPerWorker",
        "bufferRatio",
        "capacityTarget",
        "ignoreNullValues",
        "timeout",
        "unsafeSsl",
        "caCert",
        "bearerTokenFile",
        "username",
        "password",
        "passwordFile",
        "customHeaders",
    ];
    /// Key prefixes of the prometheus source (`query.<name>`).
    pub const KEY_PREFIXES: &'static [&'static str] = &[QUERY_PREFIX];

    pub fn parse(
        meta: &Metadata<'_>,
        namespace: &str,
        settings: &PromSettings,
    ) -> Result<ParsedProm, MetadataError> {
        parse_trigger(meta, namespace, settings)
    }

    /// The queries as they are sent, by name.
    pub fn queries(&self) -> impl Iterator<Item = (&str, &str)> {
        self.queries.iter().map(|(n, q)| (n.as_str(), q.as_str()))
    }
}

/// The body of [`PromTrigger::parse`].
fn parse_trigger(
    meta: &Metadata<'_>,
    namespace: &str,
    settings: &PromSettings,
) -> Result<ParsedProm, MetadataError> {
    let endpoint = Arc::new(endpoint(meta, namespace, settings)?);
    let ignore_null = meta.boolean("ignoreNullValues")?.unwrap_or(false);
    let rewrite = Rewrite {
        extra: &[],
        namespace: settings.enforce_namespace.then_some(namespace),
    };

    let named: Vec<(&str, &str)> = {
        let mut v: Vec<(&str, &str)> = meta
            .0
            .keys()
            .filter_map(|k| k.strip_prefix(QUERY_PREFIX).map(|n| (k.as_str(), n)))
            .collect();
        v.sort();
        v
    };
    let given: Vec<&str> = ["query", "preset", "formula"]
        .into_iter()
        .filter(|k| meta.get(k).is_some())
        .collect();
    if given.len() != 1 {
        let got = if given.is_empty() {
            "none".to_owned()
        } else {
            given.join(", ")
        };
        return Err(MetadataError::Conflict(format!(
            "give exactly one of `query`, `preset` or `formula` (with `query.<name>` entries); got: {got}"
        )));
    }
    if !named.is_empty() && given[0] != "formula" {
        return Err(MetadataError::Conflict(format!(
            "`{}` is used only with `formula`",
            named[0].0
        )));
    }
    if given[0] != "preset"
        && let Some(k) = ["selector"]
            .iter()
            .chain(presets::PARAM_KEYS)
            .find(|k| meta.get(k).is_some())
    {
        return Err(MetadataError::Conflict(format!(
            "`{k}` is used only with `preset`"
        )));
    }

    let prepare = |key: &str, text: &str, rewrite: Rewrite<'_>| {
        promql::prepare(text, rewrite).map_err(|why| {
            invalid(
                key,
                text,
                format!("a PromQL expression yielding a scalar or one series: {why}"),
            )
        })
    };

    let parsed = match given[0] {
        "query" => {
            let text = meta.get("query").unwrap_or_default();
            ParsedProm {
                trigger: PromTrigger {
                    endpoint,
                    queries: vec![("query".into(), prepare("query", text, rewrite)?)],
                    formula: None,
                    ignore_null,
                },
                default_target: None,
                default_metric_name: "prometheus_query",
            }
        }
        "formula" => {
            let text = meta.get("formula").unwrap_or_default();
            if named.is_empty() {
                return Err(MetadataError::missing(
                    "query.<name>",
                    "at least one named query for `formula`, e.g. `query.lag: sum(kafka_consumergroup_lag)`",
                ));
            }
            let mut queries = Vec::with_capacity(named.len());
            for (key, name) in &named {
                if !formula::is_identifier(name) || formula::is_function(name) {
                    return Err(invalid(
                        key,
                        meta.0.get(*key).map(String::as_str).unwrap_or_default(),
                        "a key `query.<name>` whose name is letters, digits and `_`, not starting with a digit \
                         and not a function name",
                    ));
                }
                let q = meta
                    .get(key)
                    .ok_or_else(|| MetadataError::missing(key, "a PromQL expression"))?;
                queries.push((name.to_string(), prepare(key, q, rewrite)?));
            }
            let names: Vec<&str> = named.iter().map(|(_, n)| *n).collect();
            let f = Formula::parse(text, &names).map_err(|e| {
                invalid(
                    "formula",
                    text,
                    format!(
                        "an expression of numbers, query names, + - * /, parentheses, min, max, ceil, floor, round, \
                         abs and clamp ({e})"
                    ),
                )
            })?;
            let used = f.variables();
            if let Some(i) = (0..names.len()).find(|i| !used.contains(i)) {
                return Err(MetadataError::Conflict(format!(
                    "`query.{}` is defined but `formula` does not use it",
                    names[i]
                )));
            }
            ParsedProm {
                trigger: PromTrigger {
                    endpoint,
                    queries,
                    formula: Some(f),
                    ignore_null,
                },
                default_target: None,
                default_metric_name: "prometheus_formula",
            }
        }
        _ => {
            let name = meta.get("preset").unwrap_or_default();
            let expanded = presets::expand(name, meta)?;
            let extra = match meta.get("selector") {
                None => Vec::new(),
                Some(s) => promql::parse_selector(s).map_err(|why| {
                    invalid(
                        "selector",
                        s,
                        format!("label matchers such as namespace=\"membrane\" ({why})"),
                    )
                })?,
            };
            let rewrite = Rewrite {
                extra: &extra,
                ..rewrite
            };
            let mut queries = Vec::with_capacity(expanded.queries.len());
            for (qname, q) in &expanded.queries {
                let key = if extra.is_empty() {
                    "preset"
                } else {
                    "selector"
                };
                let value = meta.get(key).unwrap_or_default();
                let sent = promql::prepare(q, rewrite).map_err(|why| invalid(key, value, why))?;
                queries.push((qname.to_string(), sent));
            }
            let names: Vec<&str> = expanded.queries.iter().map(|(n, _)| *n).collect();
            let f = Formula::parse(&expanded.formula, &names).map_err(|e| {
                MetadataError::Conflict(format!(
                    "preset `{name}` did not expand ({e}); please report this"
                ))
            })?;
            if expanded.is_ratio {
                warn!(
                    preset = name,
                    "this preset's value is a utilisation ratio: the ScaledObject trigger must set `metricType: Value`, \
                     or the HPA multiplies it by the replica count and mis-scales"
                );
            }
            ParsedProm {
                trigger: PromTrigger {
                    endpoint,
                    queries,
                    formula: Some(f),
                    ignore_null,
                },
                default_target: Some(expanded.default_target),
                default_metric_name: expanded.metric_name,
            }
        }
    };
    Ok(parsed)
}

/// Connection settings: `serverAddress`, `timeout`, TLS, credentials, headers.
fn endpoint(
    meta: &Metadata<'_>,
    namespace: &str,
    settings: &PromSettings,
) -> Result<Endpoint, MetadataError> {
    let credentials_dir = settings.credentials_dir.as_path();
    let raw = meta.get("serverAddress").ok_or_else(|| {
        MetadataError::missing(
            "serverAddress",
            "the Prometheus HTTP API base URL, e.g. http://prometheus.monitoring:9090",
        )
    })?;
    let url = reqwest::Url::parse(raw).map_err(|e| {
        invalid(
            "serverAddress",
            raw,
            format!("an http:// or https:// URL ({e})"),
        )
    })?;
    if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
        return Err(invalid(
            "serverAddress",
            raw,
            "an http:// or https:// URL with a host",
        ));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(invalid(
            "serverAddress",
            "<redacted: contains credentials>",
            "a URL without user:password; use `username` with `passwordFile` or `password`",
        ));
    }
    let timeout = match meta.duration("timeout")? {
        None => settings.default_timeout,
        Some(t) if t.is_zero() || t > MAX_TIMEOUT => {
            return Err(invalid(
                "timeout",
                meta.get("timeout").unwrap_or_default(),
                "a duration greater than 0 and at most 60s",
            ));
        }
        Some(t) => t,
    };
    let unsafe_ssl = meta.boolean("unsafeSsl")?.unwrap_or(false);
    let ca_pem = meta
        .get("caCert")
        .map(|v| ca_cert(v, namespace, credentials_dir))
        .transpose()?;

    let credential = |key: &str| -> Result<Option<CredentialFile>, MetadataError> {
        meta.get(key)
            .map(|p| credential_file(key, p, namespace, credentials_dir))
            .transpose()
    };
    let bearer = credential("bearerTokenFile")?;
    let password_file = credential("passwordFile")?;
    let username = meta.get("username");
    let password = meta.0.get("password").filter(|p| !p.is_empty());
    let auth = match (bearer, username, password_file, password) {
        (None, None, None, None) => Auth::None,
        (Some(path), None, None, None) => Auth::BearerFile(path),
        (Some(_), ..) => {
            return Err(MetadataError::Conflict(
                "give either `bearerTokenFile` or basic auth (`username` with `passwordFile` or `password`), not both".into(),
            ));
        }
        (None, Some(u), Some(path), None) => Auth::Basic {
            username: u.to_owned(),
            password: Secret::File(path),
        },
        (None, Some(u), None, Some(p)) => Auth::Basic {
            username: u.to_owned(),
            password: Secret::Inline(p.clone()),
        },
        (None, Some(_), Some(_), Some(_)) => {
            return Err(MetadataError::Conflict(
                "give either `passwordFile` or `password`, not both".into(),
            ));
        }
        (None, Some(_), None, None) => {
            return Err(MetadataError::missing(
                "passwordFile",
                "with `username`: `passwordFile` or `password`",
            ));
        }
        (None, None, ..) => {
            return Err(MetadataError::missing(
                "username",
                "with `passwordFile` or `password`: the basic-auth user",
            ));
        }
    };
    if username.is_some_and(|u| u.contains(':')) {
        return Err(invalid(
            "username",
            username.unwrap_or_default(),
            "a user name without ':'",
        ));
    }
    let headers = meta
        .get("customHeaders")
        .map(custom_headers)
        .transpose()?
        .unwrap_or_default();
    if auth != Auth::None
        && headers
            .iter()
            .any(|(k, _)| k.eq_ignore_ascii_case(AUTHORIZATION.as_str()))
    {
        return Err(MetadataError::Conflict(
            "`customHeaders` sets Authorization and a credential key is given too; give one".into(),
        ));
    }
    Ok(Endpoint {
        url: raw.to_owned(),
        timeout,
        unsafe_ssl,
        ca_pem,
        auth,
        headers,
    })
}

/// `caCert`: the PEM itself, or the name of a PEM file in the namespace's
/// credentials directory; must hold a certificate. Read now, once per
/// trigger (the trigger cache keeps the result).
fn ca_cert(value: &str, namespace: &str, credentials_dir: &Path) -> Result<Vec<u8>, MetadataError> {
    let expected = |dir: &Path| {
        format!(
            "PEM text (-----BEGIN CERTIFICATE-----...) or {}",
            CredentialFile::expected(dir)
        )
    };
    let pem = if value.starts_with("-----BEGIN") {
        value.as_bytes().to_vec()
    } else {
        let file = CredentialFile::locate(value, namespace, credentials_dir)
            .map_err(|_| invalid("caCert", value, expected(&credentials_dir.join(namespace))))?;
        files::off_worker(|| file.read_blocking())
            .map_err(|e| invalid("caCert", value, format!("{} ({e})", expected(file.dir()))))?
    };
    match reqwest::Certificate::from_pem_bundle(&pem) {
        Ok(certs) if !certs.is_empty() => Ok(pem),
        _ => Err(invalid(
            "caCert",
            value,
            "PEM with at least one CERTIFICATE block",
        )),
    }
}

/// A credential file named relative to `<dir>/<namespace>/`, not leaving
/// it, and readable now (it is read again on every request: tokens rotate).
fn credential_file(
    key: &str,
    value: &str,
    namespace: &str,
    dir: &Path,
) -> Result<CredentialFile, MetadataError> {
    let file = CredentialFile::locate(value, namespace, dir)
        .map_err(|expected| invalid(key, value, expected))?;
    files::off_worker(|| file.check_blocking()).map_err(|e| {
        invalid(
            key,
            value,
            format!("{} ({e})", CredentialFile::expected(file.dir())),
        )
    })?;
    Ok(file)
}

/// `customHeaders`: `Name=value,Other=value`.
fn custom_headers(raw: &str) -> Result<Vec<(String, String)>, MetadataError> {
    let bad = |why: &str| {
        invalid(
            "customHeaders",
            raw,
            format!("Name=value pairs separated by ',' ({why})"),
        )
    };
    let mut out = Vec::new();
    for pair in raw.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (k, v) = pair
            .split_once('=')
            .ok_or_else(|| bad(&format!("{pair:?} has no '='")))?;
        let (k, v) = (k.trim(), v.trim());
        HeaderName::from_bytes(k.as_bytes())
            .map_err(|_| bad(&format!("{k:?} is not a header name")))?;
        HeaderValue::from_str(v)
            .map_err(|_| bad(&format!("the value of {k} is not a header value")))?;
        out.push((k.to_owned(), v.to_owned()));
    }
    if out.is_empty() {
        return Err(bad("none given"));
    }
    Ok(out)
}

/// Failures of a Prometheus read; none is ever turned into a value.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum PromError {
    /// Unreachable, HTTP error, timeout.
    #[error("prometheus unavailable: {0}")]
    Unavailable(String),
    /// The query returned no series (and `ignoreNullValues` is not set).
    #[error("prometheus returned no data: {0}")]
    Empty(String),
    /// NaN, ±Inf, a division by zero in a formula, more than one series.
    #[error("prometheus value unusable: {0}")]
    BadValue(String),
    /// The server rejected the query.
    #[error("prometheus rejected the query: {0}")]
    Rejected(String),
}

/// Runs prometheus-source triggers, with a short result cache; clones share it.
#[derive(Clone)]
pub struct PromBackend {
    connections: Arc<Connections>,
}

impl Default for PromBackend {
    fn default() -> Self {
        Self::new(PromSettings::default())
    }
}

impl PromBackend {
    pub fn new(settings: PromSettings) -> Self {
        Self {
            connections: Arc::new(Connections::new(
                settings.cache_ttl,
                settings.max_response_bytes,
            )),
        }
    }

    /// As [`PromBackend::new`], counting the requests it sends in `queries`.
    pub fn counted(
        settings: PromSettings,
        queries: prometheus_client::metrics::family::Family<
            crate::telemetry::OutcomeLabel,
            prometheus_client::metrics::counter::Counter,
        >,
    ) -> Self {
        Self {
            connections: Arc::new(
                Connections::new(settings.cache_ttl, settings.max_response_bytes).counted(queries),
            ),
        }
    }

    /// The trigger's current value. The queries of a formula run concurrently.
    pub async fn value(&self, trigger: &PromTrigger) -> Result<f64, PromError> {
        let answers = futures::future::join_all(
            trigger
                .queries
                .iter()
                .map(|(_, q)| self.connections.query(&trigger.endpoint, q)),
        )
        .await;
        let mut values = Vec::with_capacity(answers.len());
        for ((name, query), answer) in trigger.queries.iter().zip(answers) {
            let answer = answer.map_err(|e| match (&trigger.formula, e) {
                (Some(_), PromError::BadValue(m)) => PromError::BadValue(format!("`{name}`: {m}")),
                (_, e) => e,
            })?;
            values.push(match answer {
                Outcome::Value(v) => v,
                Outcome::Empty if trigger.ignore_null => 0.0,
                Outcome::Empty => {
                    return Err(PromError::Empty(format!(
                        "`{name}` ({query}) returned no series; set ignoreNullValues: \"true\" to count that as 0"
                    )));
                }
            });
        }
        match &trigger.formula {
            None => Ok(values.first().copied().unwrap_or_default()),
            Some(f) => f
                .eval(&values)
                .map_err(|e| PromError::BadValue(format!("formula: {e}"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testkit::meta;

    fn parse(pairs: &[(&str, &str)]) -> Result<ParsedProm, MetadataError> {
        let mut m = meta(pairs);
        m.entry("serverAddress".into())
            .or_insert_with(|| "http://prom:9090".into());
        PromTrigger::parse(&Metadata(&m), "shop", &PromSettings::default())
    }

    fn err(pairs: &[(&str, &str)]) -> String {
        match parse(pairs) {
            Ok(_) => panic!("{pairs:?} should be refused"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn query_trigger() {
        let p = parse(&[("query", "sum(rate(http_requests_total[1m]))")]).unwrap();
        assert_eq!(p.default_target, None);
        assert_eq!(p.default_metric_name, "prometheus_query");
        let q: Vec<_> = p.trigger.queries().collect();
        assert_eq!(
            q,
            vec![(
                "query",
                "sum(rate(http_requests_total{namespace=\"shop\"}[1m]))"
            )]
        );
        assert!(!p.trigger.ignore_null);
    }

    #[test]
    fn formula_trigger() {
        let p = parse(&[
            (
                "query.lag",
                "sum(kafka_consumergroup_lag{topic=\"purchases\"})",
            ),
            (
                "query.partitions",
                "max(kafka_topic_partitions{topic=\"purchases\"})",
            ),
            ("formula", "min(ceil(lag / 100), partitions)"),
            ("ignoreNullValues", "true"),
        ])
        .unwrap();
        let q: Vec<_> = p.trigger.queries().map(|(n, _)| n).collect();
        assert_eq!(q, vec!["lag", "partitions"]);
        assert!(
            p.trigger
                .queries()
                .all(|(_, q)| q.contains("namespace=\"shop\""))
        );
        assert!(p.trigger.ignore_null);
        assert_eq!(
            p.trigger.formula.as_ref().unwrap().eval(&[250.0, 2.0]),
            Ok(2.0)
        );
    }

    #[test]
    fn preset_trigger_with_selector() {
        let p = parse(&[
            ("preset", "membrane-capacity"),
            ("selector", "app=\"runner\""),
        ])
        .unwrap();
        assert_eq!(p.default_target, Some(0.45));
        assert_eq!(p.default_metric_name, "membrane_capacity");
        for (_, q) in p.trigger.queries() {
            assert!(
                q.contains("app=\"runner\"") && q.contains("namespace=\"shop\""),
                "{q}"
            );
        }
    }

    #[test]
    fn enforcement_off_leaves_namespaces_alone() {
        let m = meta(&[
            ("serverAddress", "http://p:9090"),
            ("query", "sum(x{namespace=\"other\"})"),
        ]);
        let s = PromSettings {
            enforce_namespace: false,
            ..Default::default()
        };
        let p = PromTrigger::parse(&Metadata(&m), "shop", &s).unwrap();
        assert_eq!(
            p.trigger.queries().next().unwrap().1,
            "sum(x{namespace=\"other\"})"
        );
    }

    #[test]
    fn refusals_name_key_value_and_expectation() {
        type Case<'a> = (&'a [(&'a str, &'a str)], &'a [&'a str]);
        let cases: &[Case] = &[
            (
                &[],
                &["exactly one of `query`, `preset` or `formula`", "none"],
            ),
            (
                &[("query", "up"), ("preset", "membrane-capacity")],
                &["exactly one", "query, preset"],
            ),
            (&[("query", "up"), ("formula", "a")], &["exactly one"]),
            (
                &[("query", "sum(rate(x[5m])")],
                &["`query`", "sum(rate(x[5m])", "PromQL"],
            ),
            (
                &[("query", "x{namespace=\"other\"}")],
                &["`query`", "another namespace", "shop"],
            ),
            (
                &[("query", "up"), ("query.a", "up")],
                &["`query.a`", "formula"],
            ),
            (&[("formula", "a + 1")], &["query.<name>"]),
            (
                &[("formula", "a + b"), ("query.a", "up")],
                &["formula", "unknown name `b`"],
            ),
            (
                &[("formula", "a"), ("query.a", "up"), ("query.b", "up")],
                &["query.b", "does not use"],
            ),
            (
                &[("formula", "a"), ("query.a", "up{")],
                &["query.a", "PromQL"],
            ),
            (
                &[("formula", "1"), ("query.min", "up")],
                &["query.min", "function"],
            ),
            (&[("formula", "1"), ("query.a-b", "up")], &["query.a-b"]),
            (
                &[("query", "up"), ("selector", "a=\"b\"")],
                &["selector", "preset"],
            ),
            (
                &[("query", "up"), ("jobsPerWorker", "3")],
                &["jobsPerWorker", "preset"],
            ),
            (
                &[("preset", "membrane-capacity"), ("selector", "a=")],
                &["selector", "a="],
            ),
            (
                &[
                    ("preset", "membrane-capacity"),
                    ("selector", "namespace=\"other\""),
                ],
                &["selector", "another namespace"],
            ),
            (
                &[("query", "up"), ("serverAddress", "prom:9090")],
                &["serverAddress", "http"],
            ),
            (
                &[("query", "up"), ("serverAddress", "ftp://prom")],
                &["serverAddress"],
            ),
            (
                &[("query", "up"), ("serverAddress", "http://u:p@prom")],
                &["serverAddress", "redacted"],
            ),
            (&[("query", "up"), ("timeout", "2h")], &["timeout", "60s"]),
            (
                &[("query", "up"), ("timeout", "soon")],
                &["timeout", "soon"],
            ),
            (
                &[("query", "up"), ("ignoreNullValues", "yes")],
                &["ignoreNullValues", "yes"],
            ),
            (&[("query", "up"), ("unsafeSsl", "maybe")], &["unsafeSsl"]),
            (
                &[("query", "up"), ("caCert", "/nonexistent/ca.pem")],
                &["caCert", "/nonexistent/ca.pem"],
            ),
            (
                &[
                    ("query", "up"),
                    ("caCert", "-----BEGIN CERTIFICATE-----\nxx"),
                ],
                &["caCert"],
            ),
            (
                &[("query", "up"), ("customHeaders", "X-Scope-OrgID")],
                &["customHeaders", "no '='"],
            ),
            (
                &[("query", "up"), ("customHeaders", "bad header=1")],
                &["customHeaders", "header name"],
            ),
            (&[("query", "up"), ("username", "u")], &["passwordFile"]),
            (&[("query", "up"), ("password", "p")], &["username"]),
            (
                &[
                    ("query", "up"),
                    (
                        "bearerTokenFile",
                        "/var/run/secrets/kubernetes.io/serviceaccount/token",
                    ),
                ],
                &["bearerTokenFile", "relative"],
            ),
            (
                &[("query", "up"), ("bearerTokenFile", "../other/token")],
                &["bearerTokenFile", "'..'"],
            ),
            (
                &[("query", "up"), ("bearerTokenFile", "token")],
                &["bearerTokenFile", "No such file"],
            ),
            (
                &[
                    ("query", "up"),
                    ("username", "u"),
                    ("password", "p"),
                    ("customHeaders", "Authorization=x"),
                ],
                &["Authorization"],
            ),
        ];
        for (pairs, needles) in cases {
            let e = err(pairs);
            for n in *needles {
                assert!(e.contains(n), "{pairs:?}: {e:?} should mention {n:?}");
            }
        }
        assert!(
            !err(&[
                ("query", "up"),
                ("username", "u"),
                ("password", "hunter2"),
                ("passwordFile", "f")
            ])
            .contains("hunter2")
        );
    }

    #[test]
    fn files_come_from_the_namespace_directory() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("shop")).unwrap();
        std::fs::write(dir.path().join("shop/token"), "t").unwrap();
        std::fs::create_dir_all(dir.path().join("other")).unwrap();
        std::fs::write(dir.path().join("other/token"), "t").unwrap();
        let ca = rcgen::generate_simple_self_signed(vec!["prom".to_string()]).unwrap();
        std::fs::write(dir.path().join("shop/ca.pem"), ca.cert.pem()).unwrap();
        std::fs::write(dir.path().join("shop/big.pem"), vec![b' '; (1 << 20) + 1]).unwrap();
        let settings = PromSettings {
            credentials_dir: dir.path().to_owned(),
            ..Default::default()
        };
        let parse = |ns: &str, pairs: &[(&str, &str)]| {
            let mut m = meta(pairs);
            m.insert("serverAddress".into(), "http://p:9090".into());
            m.insert("query".into(), "up".into());
            PromTrigger::parse(&Metadata(&m), ns, &settings)
        };
        let err = |pairs: &[(&str, &str)]| match parse("shop", pairs) {
            Ok(_) => panic!("{pairs:?} should be refused"),
            Err(e) => e.to_string(),
        };
        let p = parse("shop", &[("bearerTokenFile", "token")]).unwrap();
        assert_eq!(
            p.trigger.endpoint.auth,
            Auth::BearerFile(CredentialFile::locate("token", "shop", dir.path()).unwrap())
        );
        assert!(err(&[("bearerTokenFile", "../other/token")]).contains("'..'"));
        let p = parse("shop", &[("username", "u"), ("passwordFile", "token")]).unwrap();
        assert!(matches!(
            p.trigger.endpoint.auth,
            Auth::Basic {
                password: Secret::File(_),
                ..
            }
        ));

        let p = parse("shop", &[("caCert", "ca.pem")]).unwrap();
        assert_eq!(p.trigger.endpoint.ca_pem, Some(ca.cert.pem().into_bytes()));
        let p = parse("shop", &[("caCert", &ca.cert.pem())]).unwrap();
        assert!(p.trigger.endpoint.ca_pem.is_some(), "inline PEM");
        for (value, needle) in [
            ("/dev/zero", "no leading '/'"),
            ("/proc/self/environ", "no leading '/'"),
            ("../other/token", "no '..'"),
            ("big.pem", "larger than 1 MiB"),
            ("token", "at least one CERTIFICATE"),
            ("missing.pem", "No such file"),
        ] {
            let e = err(&[("caCert", value)]);
            assert!(
                e.contains("`caCert`") && e.contains(value) && e.contains(needle),
                "{value}: {e}"
            );
        }
        assert!(err(&[("bearerTokenFile", "big.pem")]).contains("larger than 1 MiB"));
    }

    #[test]
    fn custom_headers_parse() {
        assert_eq!(
            custom_headers("X-Scope-OrgID=tenant, X-Other = v=1").unwrap(),
            vec![
                ("X-Scope-OrgID".into(), "tenant".into()),
                ("X-Other".into(), "v=1".into())
            ]
        );
    }
}

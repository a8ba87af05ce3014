//! The `prometheus` source: a Prometheus query, preset or formula, checked
//! and rewritten once at parse time so a bad one is `INVALID_ARGUMENT` on
//! the first `GetMetricSpec`. What it parses into, a [`PromTrigger`], is run
//! by [`crate::prometheus::PromBackend`].
//!
//! Keys: exactly one of `query`, `preset` (with `selector` and the preset's
//! parameters) or `formula` (with `query.<name>` entries); `serverAddress`,
//! `timeout`, TLS (`unsafeSsl`, `caCert`), credentials (`bearerTokenFile`, or
//! `username` with `passwordFile` or `password`), `customHeaders` and
//! `ignoreNullValues`.

use std::{path::Path, sync::Arc, time::Duration};

use reqwest::header::{AUTHORIZATION, HeaderName, HeaderValue};
use tracing::warn;

use crate::{
    metadata::{Metadata, MetadataError, invalid_excerpt},
    prometheus::{
        PromSettings, PromTrigger,
        client::{Auth, Endpoint, Secret},
        files::{self, CredentialFile},
        formula::{self, Formula},
        presets,
        promql::{self, Rewrite},
    },
};

use super::{Kind, Parsed, Source, TriggerSettings};

/// Longest `timeout` a trigger may ask for.
const MAX_TIMEOUT: Duration = crate::config::PROMETHEUS_MAX_TIMEOUT;

const QUERY_PREFIX: &str = "query.";

/// Metadata keys of the prometheus source (besides the common ones).
pub const KEYS: &[&str] = &[
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

/// The prometheus source's entry in [`super::KINDS`].
pub const KIND: Kind = Kind {
    keys: KEYS,
    key_prefixes: &[QUERY_PREFIX],
    parse,
};

/// [`parse_trigger`] as a [`Kind`] parser: a preset gives the target when
/// `targetValue` does not.
fn parse(
    meta: &Metadata<'_>,
    namespace: &str,
    settings: &TriggerSettings,
    target: Option<f64>,
) -> Result<Parsed, MetadataError> {
    let parsed = parse_trigger(meta, namespace, &settings.prometheus)?;
    let target = target.or(parsed.default_target).ok_or_else(|| {
        MetadataError::missing(
            "targetValue",
            "a number greater than 0 (the per-replica target)",
        )
    })?;
    Ok(Parsed {
        source: Source::Prometheus(Box::new(parsed.trigger)),
        target,
        default_metric_name: parsed.default_metric_name,
    })
}

/// What [`parse_trigger`] yields: the trigger and the defaults its preset gives.
pub struct ParsedProm {
    pub trigger: PromTrigger,
    pub default_target: Option<f64>,
    pub default_metric_name: &'static str,
}

/// What a form (`query`, `formula` or `preset`) asks: the queries as sent,
/// the formula over their answers, and the defaults it gives.
struct Asked {
    queries: Vec<(String, String)>,
    formula: Option<Formula>,
    default_target: Option<f64>,
    default_metric_name: &'static str,
}

/// Which of the three forms a trigger gives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Form {
    Query,
    Formula,
    Preset,
}

/// Parses the prometheus keys of a trigger of a ScaledObject in `namespace`.
pub fn parse_trigger(
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
    let named = named_queries(meta);
    let asked = match form(meta, &named)? {
        Form::Query => query(meta, rewrite)?,
        Form::Formula => formula(meta, &named, rewrite)?,
        Form::Preset => preset(meta, rewrite)?,
    };
    Ok(ParsedProm {
        trigger: PromTrigger {
            endpoint,
            queries: asked.queries,
            formula: asked.formula,
            ignore_null,
        },
        default_target: asked.default_target,
        default_metric_name: asked.default_metric_name,
    })
}

/// The `query.<name>` entries as (key, name), sorted.
fn named_queries<'a>(meta: &Metadata<'a>) -> Vec<(&'a str, &'a str)> {
    let mut v: Vec<(&str, &str)> = meta
        .0
        .keys()
        .filter_map(|k| k.strip_prefix(QUERY_PREFIX).map(|n| (k.as_str(), n)))
        .collect();
    v.sort();
    v
}

/// The form given: exactly one of `query`, `preset` or `formula`, and no key
/// that belongs to another form.
fn form(meta: &Metadata<'_>, named: &[(&str, &str)]) -> Result<Form, MetadataError> {
    let given: Vec<(&str, Form)> = [
        ("query", Form::Query),
        ("preset", Form::Preset),
        ("formula", Form::Formula),
    ]
    .into_iter()
    .filter(|(k, _)| meta.get(k).is_some())
    .collect();
    let [(_, form)] = given[..] else {
        let got = if given.is_empty() {
            "none".to_owned()
        } else {
            given.iter().map(|(k, _)| *k).collect::<Vec<_>>().join(", ")
        };
        return Err(MetadataError::Conflict(format!(
            "give exactly one of `query`, `preset` or `formula` (with `query.<name>` entries); got: {got}"
        )));
    };
    if let Some((key, _)) = named.first()
        && form != Form::Formula
    {
        return Err(MetadataError::Conflict(format!(
            "`{key}` is used only with `formula`"
        )));
    }
    if form != Form::Preset
        && let Some(k) = ["selector"]
            .iter()
            .chain(presets::PARAM_KEYS)
            .find(|k| meta.get(k).is_some())
    {
        return Err(MetadataError::Conflict(format!(
            "`{k}` is used only with `preset`"
        )));
    }
    Ok(form)
}

/// `text` checked and rewritten as PromQL; refusals name `key`.
fn prepare(key: &str, text: &str, rewrite: Rewrite<'_>) -> Result<String, MetadataError> {
    promql::prepare(text, rewrite).map_err(|why| {
        invalid_excerpt(
            key,
            text,
            format!("a PromQL expression yielding a scalar or one series: {why}"),
        )
    })
}

/// `query`: one query, its answer the value.
fn query(meta: &Metadata<'_>, rewrite: Rewrite<'_>) -> Result<Asked, MetadataError> {
    let text = meta.get("query").unwrap_or_default();
    Ok(Asked {
        queries: vec![("query".into(), prepare("query", text, rewrite)?)],
        formula: None,
        default_target: None,
        default_metric_name: "prometheus_query",
    })
}

/// `formula` over the `query.<name>` entries, each of which it must use.
fn formula(
    meta: &Metadata<'_>,
    named: &[(&str, &str)],
    rewrite: Rewrite<'_>,
) -> Result<Asked, MetadataError> {
    let text = meta.get("formula").unwrap_or_default();
    if named.is_empty() {
        return Err(MetadataError::missing(
            "query.<name>",
            "at least one named query for `formula`, e.g. `query.lag: sum(kafka_consumergroup_lag)`",
        ));
    }
    let mut queries = Vec::with_capacity(named.len());
    for (key, name) in named {
        if !formula::is_identifier(name) || formula::is_function(name) {
            return Err(invalid_excerpt(
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
        invalid_excerpt(
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
    Ok(Asked {
        queries,
        formula: Some(f),
        default_target: None,
        default_metric_name: "prometheus_formula",
    })
}

/// `preset`, expanded with its parameters, its queries narrowed by `selector`.
fn preset(meta: &Metadata<'_>, rewrite: Rewrite<'_>) -> Result<Asked, MetadataError> {
    let name = meta.get("preset").unwrap_or_default();
    let expanded = presets::expand(name, meta)?;
    let extra = match meta.get("selector") {
        None => Vec::new(),
        Some(s) => promql::parse_selector(s).map_err(|why| {
            invalid_excerpt(
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
    // A preset's own queries are correct; a refusal is the selector's doing,
    // or the namespace's when there is none.
    let key = if extra.is_empty() {
        "preset"
    } else {
        "selector"
    };
    let value = meta.get(key).unwrap_or_default();
    let mut queries = Vec::with_capacity(expanded.queries.len());
    for (qname, q) in &expanded.queries {
        let sent = promql::prepare(q, rewrite).map_err(|why| invalid_excerpt(key, value, why))?;
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
    Ok(Asked {
        queries,
        formula: Some(f),
        default_target: Some(expanded.default_target),
        default_metric_name: expanded.metric_name,
    })
}

/// Connection settings: `serverAddress`, `timeout`, TLS, credentials, headers.
fn endpoint(
    meta: &Metadata<'_>,
    namespace: &str,
    settings: &PromSettings,
) -> Result<Endpoint, MetadataError> {
    let url = server_address(meta)?;
    let timeout = timeout(meta, settings.default_timeout)?;
    let unsafe_ssl = meta.boolean("unsafeSsl")?.unwrap_or(false);
    let credentials_dir = settings.credentials_dir.as_path();
    let ca_pem = meta
        .get("caCert")
        .map(|v| ca_cert(v, namespace, credentials_dir))
        .transpose()?;
    let auth = auth(meta, namespace, credentials_dir)?;
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
        url: url.to_owned(),
        timeout,
        unsafe_ssl,
        ca_pem,
        auth,
        headers,
    })
}

/// `serverAddress`: an http(s) URL with a host and no credentials in it.
fn server_address<'a>(meta: &Metadata<'a>) -> Result<&'a str, MetadataError> {
    let raw = meta.get("serverAddress").ok_or_else(|| {
        MetadataError::missing(
            "serverAddress",
            "the Prometheus HTTP API base URL, e.g. http://prometheus.monitoring:9090",
        )
    })?;
    let url = reqwest::Url::parse(raw).map_err(|e| {
        invalid_excerpt(
            "serverAddress",
            raw,
            format!("an http:// or https:// URL ({e})"),
        )
    })?;
    if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
        return Err(invalid_excerpt(
            "serverAddress",
            raw,
            "an http:// or https:// URL with a host",
        ));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(invalid_excerpt(
            "serverAddress",
            "<redacted: contains credentials>",
            "a URL without user:password; use `username` with `passwordFile` or `password`",
        ));
    }
    Ok(raw)
}

/// `timeout`: at most [`MAX_TIMEOUT`]; the service default when absent.
fn timeout(meta: &Metadata<'_>, default: Duration) -> Result<Duration, MetadataError> {
    match meta.duration("timeout")? {
        None => Ok(default),
        Some(t) if t.is_zero() || t > MAX_TIMEOUT => Err(invalid_excerpt(
            "timeout",
            meta.get("timeout").unwrap_or_default(),
            "a duration greater than 0 and at most 60s",
        )),
        Some(t) => Ok(t),
    }
}

/// Credentials: `bearerTokenFile`, or `username` with `passwordFile` or
/// `password`; at most one way.
fn auth(meta: &Metadata<'_>, namespace: &str, dir: &Path) -> Result<Auth, MetadataError> {
    let credential = |key: &str| -> Result<Option<CredentialFile>, MetadataError> {
        meta.get(key)
            .map(|p| credential_file(key, p, namespace, dir))
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
    if let Some(u) = username.filter(|u| u.contains(':')) {
        return Err(invalid_excerpt("username", u, "a user name without ':'"));
    }
    Ok(auth)
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
        let file = CredentialFile::locate(value, namespace, credentials_dir).map_err(|_| {
            invalid_excerpt("caCert", value, expected(&credentials_dir.join(namespace)))
        })?;
        files::off_worker(|| file.read_blocking()).map_err(|e| {
            invalid_excerpt("caCert", value, format!("{} ({e})", expected(file.dir())))
        })?
    };
    match reqwest::Certificate::from_pem_bundle(&pem) {
        Ok(certs) if !certs.is_empty() => Ok(pem),
        _ => Err(invalid_excerpt(
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
        .map_err(|expected| invalid_excerpt(key, value, expected))?;
    files::off_worker(|| file.check_blocking()).map_err(|e| {
        invalid_excerpt(
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
        invalid_excerpt(
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testkit::meta;

    fn parse(pairs: &[(&str, &str)]) -> Result<ParsedProm, MetadataError> {
        let mut m = meta(pairs);
        m.entry("serverAddress".into())
            .or_insert_with(|| "http://prom:9090".into());
        parse_trigger(&Metadata(&m), "shop", &PromSettings::default())
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
        let p = parse_trigger(&Metadata(&m), "shop", &s).unwrap();
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
            parse_trigger(&Metadata(&m), ns, &settings)
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
    fn a_preset_gives_the_target_when_targetvalue_does_not() {
        let settings = crate::source::tests::settings();
        let kind = |pairs: &[(&str, &str)], target| {
            let mut m = meta(pairs);
            m.insert("serverAddress".into(), "http://p:9090".into());
            super::parse(&Metadata(&m), "shop", &settings, target)
        };
        let p = kind(&[("preset", "membrane-capacity")], None).unwrap();
        assert_eq!(
            (p.target, p.default_metric_name),
            (0.45, "membrane_capacity")
        );
        let p = kind(&[("preset", "membrane-capacity")], Some(2.0)).unwrap();
        assert_eq!(p.target, 2.0);
        assert!(matches!(p.source, Source::Prometheus(_)));
        let e = kind(&[("query", "up")], None).unwrap_err().to_string();
        assert!(
            e.contains("`targetValue`") && e.contains("per-replica target"),
            "{e}"
        );
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

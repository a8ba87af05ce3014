//! The Grafana dashboard (`helm/activescale/dashboards/activescale.json`)
//! cannot drift from the code: every panel query is parsed with
//! `promql-parser`, and every `activescale_*` metric it names must be one a
//! running server exports on `/metrics`. Other names must be in
//! [`EXTERNAL`], the KEDA and kube-state-metrics series the README lists.

mod common;

use std::{collections::BTreeSet, path::PathBuf, time::Duration};

use activescale::{
    activator::{Activator, ActivatorSettings},
    config::ActivatorRoute,
    proto::GetMetricsRequest,
};
use common::{envoy::*, *};
use promql_parser::{
    label::MatchOp,
    parser::{self, Expr},
};
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(10);

/// Series the dashboard reads from other exporters (README, "Grafana
/// dashboard"): KEDA's operator and kube-state-metrics.
const EXTERNAL: &[&str] = &[
    "keda_scaler_metrics_value",
    "keda_scaler_active",
    "keda_scaled_object_errors_total",
    "kube_horizontalpodautoscaler_status_current_replicas",
    "kube_horizontalpodautoscaler_status_desired_replicas",
    "kube_horizontalpodautoscaler_spec_max_replicas",
];

fn dashboard() -> Value {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("helm/activescale/dashboards/activescale.json");
    let text = std::fs::read_to_string(&path).unwrap();
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// `(where, PromQL)` of every panel target, nested row panels included.
fn panel_queries(dash: &Value) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut todo: Vec<&Value> = dash["panels"].as_array().unwrap().iter().collect();
    while let Some(p) = todo.pop() {
        if let Some(inner) = p["panels"].as_array() {
            todo.extend(inner);
        }
        for t in p["targets"].as_array().into_iter().flatten() {
            let expr = t["expr"]
                .as_str()
                .unwrap_or_else(|| panic!("panel {:?}: a target without expr: {t}", p["title"]));
            out.push((format!("panel {}", p["title"]), expr.to_string()));
        }
    }
    out
}

/// The metric of each `label_values(metric, label)` template variable.
fn variable_metrics(dash: &Value) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for v in dash["templating"]["list"].as_array().unwrap() {
        let Some(q) = v["query"]["query"].as_str() else {
            continue;
        };
        let args = q
            .strip_prefix("label_values(")
            .and_then(|rest| rest.strip_suffix(')'))
            .unwrap_or_else(|| panic!("variable {:?}: unexpected query {q}", v["name"]));
        let (metric, _label) = args.split_once(',').unwrap();
        out.push((format!("variable {}", v["name"]), metric.trim().to_string()));
    }
    out
}

/// Grafana's interval macros are not PromQL; `5m` stands in for them.
fn substitute(expr: &str) -> String {
    ["$__rate_interval", "$__interval", "$__range"]
        .iter()
        .fold(expr.to_string(), |e, m| e.replace(m, "5m"))
}

/// Metric names a query selects: selector names and `__name__="..."`
/// matchers, collected with a stack rather than recursion.
fn metric_names(expr: &str) -> Result<BTreeSet<String>, String> {
    let root = parser::parse(&substitute(expr))?;
    let mut names = BTreeSet::new();
    let mut todo = vec![&root];
    while let Some(e) = todo.pop() {
        let vs = match e {
            Expr::Aggregate(a) => {
                todo.push(&a.expr);
                todo.extend(a.param.as_deref());
                continue;
            }
            Expr::Unary(u) => {
                todo.push(&u.expr);
                continue;
            }
            Expr::Binary(b) => {
                todo.push(&b.lhs);
                todo.push(&b.rhs);
                continue;
            }
            Expr::Paren(p) => {
                todo.push(&p.expr);
                continue;
            }
            Expr::Subquery(s) => {
                todo.push(&s.expr);
                continue;
            }
            Expr::Call(c) => {
                todo.extend(c.args.args.iter().map(|a| &**a));
                continue;
            }
            Expr::NumberLiteral(_) | Expr::StringLiteral(_) => continue,
            Expr::Extension(_) => return Err("an extension expression".into()),
            Expr::VectorSelector(vs) => vs,
            Expr::MatrixSelector(ms) => &ms.vs,
        };
        let by_matcher = vs
            .matchers
            .matchers
            .iter()
            .chain(vs.matchers.or_matchers.iter().flatten())
            .filter(|m| m.name == "__name__" && matches!(m.op, MatchOp::Equal))
            .map(|m| m.value.clone());
        let before = names.len();
        names.extend(vs.name.clone().into_iter().chain(by_matcher));
        if names.len() == before && vs.name.is_none() {
            return Err(format!("a selector without a metric name: {vs}"));
        }
    }
    Ok(names)
}

/// Sample names `/metrics` can carry: each `# TYPE` line's family with the
/// suffixes its type adds, and every sample line's name.
fn exported(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut it = rest.split_whitespace();
            let (Some(name), Some(kind)) = (it.next(), it.next()) else {
                continue;
            };
            let suffixes: &[&str] = match kind {
                "counter" => &["_total", "_created"],
                "histogram" => &["_bucket", "_sum", "_count", "_created"],
                "summary" => &["", "_sum", "_count", "_created"],
                "info" => &["_info"],
                _ => &[""],
            };
            out.extend(suffixes.iter().map(|s| format!("{name}{s}")));
        } else if !line.starts_with('#') && !line.is_empty() {
            let end = line.find(['{', ' ']).unwrap_or(line.len());
            out.insert(line[..end].to_string());
        }
    }
    out
}

/// Every name a query uses that is neither exported (`activescale_*`) nor
/// in [`EXTERNAL`], and every query that does not parse.
fn problems(queries: &[(String, String)], exported: &BTreeSet<String>) -> Vec<String> {
    let mut out = Vec::new();
    for (place, expr) in queries {
        match metric_names(expr) {
            Err(e) => out.push(format!("{place}: does not parse: {e}: {expr}")),
            Ok(names) => {
                for n in names {
                    if n.starts_with("activescale_") {
                        if !exported.contains(&n) {
                            out.push(format!("{place}: {n} is not exported"));
                        }
                    } else if !EXTERNAL.contains(&n.as_str()) {
                        out.push(format!("{place}: {n} is neither activescale's nor allowed"));
                    }
                }
            }
        }
    }
    out
}

/// `/metrics` of a server that has taken sidecar data, answered KEDA
/// (GetMetrics, IsActive, StreamIsActive) and asked an unreachable
/// Prometheus, plus the activator's families, which the binary does not
/// serve yet: they come from an `Activator` built with one route, which
/// registers them as the binary will.
async fn live_names() -> BTreeSet<String> {
    let server = start_server(test_config()).await;
    let mut pod = Sidecar::connect(
        server.sink,
        istio_node("shop", "web-1", &[("app", "web")], "web"),
    )
    .await;
    pod.push_gauges(&[(&inbound(8080), 7.0)]).await;
    let r = so_ref(
        "shop",
        "web",
        &[("labelSelector", "app=web"), ("targetValue", "5")],
    );
    let client = server.scaler_client().await;
    eventually(WAIT, "GetMetrics = 7", || {
        let mut c = client.clone();
        let r = r.clone();
        async move { get_metric(&mut c, &r).await.ok() == Some(7.0) }
    })
    .await;
    let mut c = client.clone();
    c.is_active(r.clone()).await.expect("IsActive");
    let mut stream = c.stream_is_active(r.clone()).await.unwrap().into_inner();
    tokio::time::timeout(WAIT, stream.message())
        .await
        .expect("a push in time")
        .expect("stream ok");
    let prom = so_ref(
        "shop",
        "worker",
        &[
            ("source", "prometheus"),
            // Nothing listens on port 1: the query is sent and fails.
            ("serverAddress", "http://127.0.0.1:1"),
            ("query", "sum(jobs)"),
            ("targetValue", "2"),
        ],
    );
    let answer = c
        .get_metrics(GetMetricsRequest {
            scaled_object_ref: Some(prom),
            metric_name: String::new(),
        })
        .await;
    assert!(answer.is_err(), "{answer:?}");

    // Families with no series are not exposed at all, so the sink's error
    // counters need one each: a stream claiming another pod IP than it
    // comes from, and a malformed message.
    let mut liar = Sidecar::connect(
        server.sink,
        istio_node_at("10.0.0.9", "shop", "web-2", &[("app", "web")], "web"),
    )
    .await;
    liar.push_gauges(&[(&inbound(8080), 5.0)]).await;
    let garbage = send_raw(
        server.sink,
        vec![bytes::Bytes::from_static(&[0x12, 100, 0])],
    )
    .await;
    assert!(garbage.is_err(), "{garbage:?}");
    let refused = "activescale_sink_identity_refused_total{reason=\"peer_address\"} 1";
    eventually(WAIT, refused, || async {
        http_get(&server.http_url("/metrics"))
            .await
            .1
            .contains(refused)
    })
    .await;

    let (status, text) = http_get(&server.http_url("/metrics")).await;
    assert_eq!(status, 200);
    for sample in [
        "activescale_sink_messages_total ",
        "activescale_rpc_requests_total{method=\"GetMetrics\",code=\"OK\"}",
        "activescale_scaler_pushes_total 1",
        "activescale_store_ready 1",
        "activescale_prometheus_queries_total{outcome=\"error\"} 1",
    ] {
        assert!(text.contains(sample), "{sample} not in /metrics:\n{text}");
    }
    let mut names = exported(&text);

    // The activator's series exist per route from the start; one route is
    // enough. Nothing is served: only its registry is read.
    let mut registry = prometheus_client::registry::Registry::with_prefix("activescale");
    let _activator = Activator::new(activator_settings(), &mut registry).expect("activator");
    let mut activator = String::new();
    prometheus_client::encoding::text::encode(&mut activator, &registry).unwrap();
    names.extend(exported(&activator));
    names
}

fn activator_settings() -> ActivatorSettings {
    ActivatorSettings {
        config: activescale::config::ActivatorConfig {
            routes: vec![ActivatorRoute {
                host: "web.example.com".into(),
                path_prefix: None,
                upstream: "127.0.0.1:1".into(),
                namespace: "shop".into(),
            }],
            max_pending: 10,
            max_pending_total: 100,
            hold_timeout: Duration::from_secs(20),
            probe_interval: Duration::from_secs(1),
            probe_max_interval: Duration::from_secs(2),
            connect_timeout: Duration::from_secs(1),
            header_read_timeout: Duration::from_secs(10),
            max_connections: 100,
        },
        http2_keepalive_interval: Duration::from_secs(30),
        http2_keepalive_timeout: Duration::from_secs(10),
    }
}

#[tokio::test]
async fn every_dashboard_metric_is_exported() {
    let dash = dashboard();
    assert_eq!(dash["uid"], "activescale");
    let vars: Vec<&str> = dash["templating"]["list"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap())
        .collect();
    assert!(vars.contains(&"datasource"), "{vars:?}");
    let queries = panel_queries(&dash);
    assert!(queries.len() > 20, "only {} panel queries", queries.len());
    // Every panel reads through the datasource variable.
    for p in dash["panels"].as_array().unwrap() {
        if p["type"] != "row" {
            assert_eq!(p["datasource"]["uid"], "${datasource}", "{}", p["title"]);
        }
    }

    let names = live_names().await;
    let mut all = queries.clone();
    all.extend(variable_metrics(&dash));
    let found = problems(&all, &names);
    assert!(found.is_empty(), "dashboard drifted:\n{}", found.join("\n"));

    // The dashboard covers what issue 18 asks it to show.
    let used: BTreeSet<String> = queries
        .iter()
        .flat_map(|(_, q)| metric_names(q).unwrap())
        .collect();
    for want in [
        "activescale_sink_messages_total",
        "activescale_sink_families_total",
        "activescale_sink_identity_missing_total",
        "activescale_sink_identity_refused_total",
        "activescale_pods_tracked",
        "activescale_rpc_requests_total",
        "activescale_rpc_duration_seconds_bucket",
        "activescale_scaler_pushes_total",
        "activescale_scaler_streams_open",
        "activescale_sink_store_errors_total",
        "activescale_store_ready",
        "activescale_prometheus_queries_total",
        "activescale_activator_pending_requests",
        "activescale_activator_active_requests",
        "activescale_activator_cold_starts_total",
        "activescale_activator_hold_seconds_bucket",
    ]
    .iter()
    .chain(EXTERNAL)
    {
        assert!(used.contains(*want), "no panel shows {want}");
    }
}

#[test]
fn the_checker_catches_drift() {
    let exported = exported(
        "# TYPE activescale_sink_messages counter\n\
         activescale_sink_messages_total 3\n\
         # TYPE activescale_rpc_duration_seconds histogram\n\
         # TYPE activescale_pods_tracked gauge\n",
    );
    let ok = |q: &str| problems(&[("q".into(), q.into())], &exported);
    assert!(ok("rate(activescale_sink_messages_total[$__rate_interval])").is_empty());
    assert!(
        ok("histogram_quantile(0.99, sum by (le) (rate(activescale_rpc_duration_seconds_bucket[5m])))")
            .is_empty()
    );
    assert!(ok("activescale_pods_tracked / on() keda_scaler_active").is_empty());

    // A misspelt or removed metric, with or without a suffix.
    let bogus = ok(r#"sum(rate(activescale_sink_mesages_total{job=~"$job"}[5m]))"#);
    assert_eq!(bogus, ["q: activescale_sink_mesages_total is not exported"]);
    assert_eq!(ok("activescale_pods_tracked_total").len(), 1);
    assert_eq!(ok("activescale_sink_messages").len(), 1);
    // Deep inside binary operators and function arguments, and by __name__.
    assert_eq!(
        ok("1 + (clamp_min(max(activescale_nope), 0) * activescale_pods_tracked)").len(),
        1
    );
    assert_eq!(ok(r#"{__name__="activescale_nope"}"#).len(), 1);
    // A name from an exporter the README does not list.
    assert_eq!(
        ok("node_cpu_seconds_total"),
        ["q: node_cpu_seconds_total is neither activescale's nor allowed"]
    );
    // A query that is not PromQL.
    assert!(ok("sum(rate(activescale_sink_messages_total[5m])")[0].contains("does not parse"));
}

//! `source: prometheus` end to end: a real `prometheus` scraping an exporter
//! served by the test, and the real scaler gRPC API in front of it.
//!
//! Tests share one Prometheus (see `common::prometheus_server::shared`) and
//! keep apart by the `namespace` label: each uses its own ScaledObject
//! namespace, which namespace enforcement pins every query to. The test that
//! stops Prometheus has one of its own.

mod common;

use std::time::Duration;

use activescale::proto::{
    GetMetricsRequest, ScaledObjectRef, external_scaler_client::ExternalScalerClient,
};
use common::{prometheus_server::*, *};
use tonic::{Code, Status, transport::Channel};

/// A server whose Prometheus results are reused only briefly, so that
/// polling for freshly scraped data does not wait out the 2 s default.
async fn server() -> (TestServer, ExternalScalerClient<Channel>) {
    let mut config = test_config();
    config.prometheus.cache_ttl = Duration::from_millis(100);
    config.prometheus.poll_interval = Duration::from_millis(200);
    let server = start_server(config).await;
    let client = server.scaler_client().await;
    (server, client)
}

fn so(namespace: &str, prometheus: &str, pairs: &[(&str, &str)]) -> ScaledObjectRef {
    let mut metadata: std::collections::HashMap<String, String> = pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    metadata.insert("source".into(), "prometheus".into());
    metadata
        .entry("serverAddress".into())
        .or_insert_with(|| prometheus.to_owned());
    ScaledObjectRef {
        name: "worker".into(),
        namespace: namespace.into(),
        scaler_metadata: metadata,
    }
}

async fn metrics(
    client: &mut ExternalScalerClient<Channel>,
    r: &ScaledObjectRef,
) -> Result<f64, Status> {
    client
        .get_metrics(GetMetricsRequest {
            scaled_object_ref: Some(r.clone()),
            metric_name: String::new(),
        })
        .await
        .map(|resp| resp.into_inner().metric_values[0].metric_value_float)
}

/// Polls GetMetrics until it answers with a value (the exporter's series have
/// been scraped); the wait is for data, the assertion on the value follows.
async fn first_value(client: &mut ExternalScalerClient<Channel>, r: &ScaledObjectRef) -> f64 {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        match metrics(client, r).await {
            Ok(v) => return v,
            Err(s) if s.code() == Code::NotFound && tokio::time::Instant::now() < deadline => {}
            Err(s) => panic!("GetMetrics for {:?}: {s:?}", r.scaler_metadata),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn spec(
    client: &mut ExternalScalerClient<Channel>,
    r: &ScaledObjectRef,
) -> Result<(String, f64), Status> {
    client.get_metric_spec(r.clone()).await.map(|s| {
        let s = &s.into_inner().metric_specs[0];
        (s.metric_name.clone(), s.target_size_float)
    })
}

#[tokio::test]
async fn preset_membrane_instant_tasks_sums_active_and_waiting_jobs() {
    let p = shared().await;
    let ns = "t-instant";
    p.exporter.set(
        "instant_tasks_jobs_active",
        &[("namespace", ns), ("pod", "a")],
        3.0,
    );
    p.exporter.set(
        "instant_tasks_jobs_active",
        &[("namespace", ns), ("pod", "b")],
        4.0,
    );
    p.exporter.set(
        "instant_tasks_jobs_waiting",
        &[("namespace", ns), ("pod", "a")],
        5.0,
    );
    let (_server, mut c) = server().await;

    let r = so(
        ns,
        &p.prometheus.url,
        &[("preset", "membrane-instant-tasks")],
    );
    assert_eq!(
        spec(&mut c, &r).await.unwrap(),
        ("membrane_instant_tasks".into(), 5.0)
    );
    assert_eq!(first_value(&mut c, &r).await, (3.0 + 4.0) + 5.0);

    let r = so(
        ns,
        &p.prometheus.url,
        &[("preset", "membrane-instant-tasks"), ("jobsPerWorker", "4")],
    );
    assert_eq!(spec(&mut c, &r).await.unwrap().1, 4.0);
    assert_eq!(first_value(&mut c, &r).await, 12.0);
}

#[tokio::test]
async fn preset_membrane_queued_tasks_adds_the_buffer_ratio() {
    let p = shared().await;
    let ns = "t-queued";
    p.exporter.set(
        "queued_tasks_workers_required",
        &[("namespace", ns), ("queue", "a")],
        7.0,
    );
    p.exporter.set(
        "queued_tasks_workers_required",
        &[("namespace", ns), ("queue", "b")],
        10.0,
    );
    let (_server, mut c) = server().await;

    let r = so(
        ns,
        &p.prometheus.url,
        &[("preset", "membrane-queued-tasks")],
    );
    assert_eq!(
        spec(&mut c, &r).await.unwrap(),
        ("membrane_queued_tasks".into(), 1.0)
    );
    // max(...) * (1 + 0.3), the same IEEE operations in the same order.
    assert_eq!(first_value(&mut c, &r).await, 10.0 * (1.0 + 0.3));

    let r = so(
        ns,
        &p.prometheus.url,
        &[("preset", "membrane-queued-tasks"), ("bufferRatio", "0.5")],
    );
    assert_eq!(first_value(&mut c, &r).await, 15.0);
}

#[tokio::test]
async fn preset_membrane_capacity_is_the_used_fraction_and_honours_the_selector() {
    let p = shared().await;
    let ns = "t-capacity";
    for (pool, pod, total, remaining) in [
        ("main", "a", 4.0, 1.0),
        ("main", "b", 4.0, 1.0),
        ("spare", "c", 100.0, 0.0),
    ] {
        let labels = [("namespace", ns), ("pool", pool), ("pod", pod)];
        p.exporter
            .set("custom_code_runner_total_job_spaces", &labels, total);
        p.exporter.set(
            "custom_code_runner_remaining_job_spaces",
            &labels,
            remaining,
        );
    }
    let (_server, mut c) = server().await;

    let all = so(ns, &p.prometheus.url, &[("preset", "membrane-capacity")]);
    assert_eq!(
        spec(&mut c, &all).await.unwrap(),
        ("membrane_capacity".into(), 0.45)
    );
    assert_eq!(first_value(&mut c, &all).await, (108.0 - 2.0) / 108.0);

    let main = so(
        ns,
        &p.prometheus.url,
        &[
            ("preset", "membrane-capacity"),
            ("selector", "pool=\"main\""),
            ("capacityTarget", "0.6"),
        ],
    );
    assert_eq!(spec(&mut c, &main).await.unwrap().1, 0.6);
    assert_eq!(first_value(&mut c, &main).await, 0.75);
}

#[tokio::test]
async fn raw_query_yields_its_value() {
    let p = shared().await;
    let ns = "t-raw";
    p.exporter
        .set("raw_probe", &[("namespace", ns), ("pod", "a")], 1.5);
    p.exporter
        .set("raw_probe", &[("namespace", ns), ("pod", "b")], 2.25);
    let (_server, mut c) = server().await;

    let r = so(
        ns,
        &p.prometheus.url,
        &[("query", "sum(raw_probe)"), ("targetValue", "2")],
    );
    assert_eq!(
        spec(&mut c, &r).await.unwrap(),
        ("prometheus_query".into(), 2.0)
    );
    assert_eq!(first_value(&mut c, &r).await, 3.75);

    let scalar = so(
        ns,
        &p.prometheus.url,
        &[
            ("query", "scalar(sum(raw_probe)) * 2"),
            ("targetValue", "2"),
        ],
    );
    assert_eq!(first_value(&mut c, &scalar).await, 7.5);

    let active = c.is_active(r.clone()).await.unwrap().into_inner().result;
    assert!(active, "3.75 > activationValue 0");
    let idle = so(
        ns,
        &p.prometheus.url,
        &[
            ("query", "sum(raw_probe)"),
            ("targetValue", "2"),
            ("activationValue", "5"),
        ],
    );
    assert!(
        !c.is_active(idle).await.unwrap().into_inner().result,
        "3.75 <= activationValue 5"
    );
}

#[tokio::test]
async fn kafka_lag_formula_is_capped_by_partitions() {
    let p = shared().await;
    let pairs = [
        (
            "query.lag",
            "sum(kafka_consumergroup_lag{topic=\"purchases\"})",
        ),
        (
            "query.partitions",
            "max(kafka_topic_partitions{topic=\"purchases\"})",
        ),
        ("formula", "min(ceil(lag / 100), partitions)"),
        ("targetValue", "1"),
    ];
    for (ns, lags, partitions, want) in [
        ("t-kafka-light", [120.0, 80.0, 50.0], 12.0, 3.0),
        ("t-kafka-heavy", [3000.0, 1500.0, 500.0], 4.0, 4.0),
    ] {
        for (i, lag) in lags.iter().enumerate() {
            let part = i.to_string();
            let labels = [
                ("namespace", ns),
                ("topic", "purchases"),
                ("partition", part.as_str()),
            ];
            p.exporter.set("kafka_consumergroup_lag", &labels, *lag);
        }
        // Another topic's lag must not count.
        p.exporter.set(
            "kafka_consumergroup_lag",
            &[("namespace", ns), ("topic", "refunds")],
            1e6,
        );
        p.exporter.set(
            "kafka_topic_partitions",
            &[("namespace", ns), ("topic", "purchases")],
            partitions,
        );
        let (_server, mut c) = server().await;
        let r = so(ns, &p.prometheus.url, &pairs);
        assert_eq!(
            spec(&mut c, &r).await.unwrap(),
            ("prometheus_formula".into(), 1.0)
        );
        assert_eq!(first_value(&mut c, &r).await, want, "{ns}");
    }
}

#[tokio::test]
async fn empty_result_is_not_found_unless_ignore_null_values() {
    let p = shared().await;
    let ns = "t-empty";
    // Something of this namespace is scraped, so the server is answering.
    p.exporter
        .set("empty_probe_present", &[("namespace", ns)], 1.0);
    p.prometheus
        .wait_for("empty_probe_present{namespace=\"t-empty\"}")
        .await;
    let (_server, mut c) = server().await;

    let strict = so(
        ns,
        &p.prometheus.url,
        &[
            ("query", "sum(never_exported_metric)"),
            ("targetValue", "1"),
        ],
    );
    let e = metrics(&mut c, &strict).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    assert!(e.message().contains("ignoreNullValues"), "{e:?}");
    let e = c.is_active(strict.clone()).await.unwrap_err();
    assert_eq!(
        e.code(),
        Code::NotFound,
        "IsActive must not say false for missing data: {e:?}"
    );

    let lenient = so(
        ns,
        &p.prometheus.url,
        &[
            ("query", "sum(never_exported_metric)"),
            ("targetValue", "1"),
            ("ignoreNullValues", "true"),
        ],
    );
    assert_eq!(metrics(&mut c, &lenient).await.unwrap(), 0.0);

    // In a formula, ignoreNullValues applies to each named query.
    let formula = so(
        ns,
        &p.prometheus.url,
        &[
            ("query.present", "sum(empty_probe_present)"),
            ("query.absent", "sum(never_exported_metric)"),
            ("formula", "present + absent"),
            ("targetValue", "1"),
            ("ignoreNullValues", "true"),
        ],
    );
    assert_eq!(metrics(&mut c, &formula).await.unwrap(), 1.0);
}

#[tokio::test]
async fn bad_promql_and_bad_formulas_are_invalid_argument_at_once() {
    let p = shared().await;
    let (_server, mut c) = server().await;
    let cases: &[(&[(&str, &str)], &str)] = &[
        (
            &[
                ("query", "sum(rate(http_requests_total[5m])"),
                ("targetValue", "1"),
            ],
            "query",
        ),
        (&[("query", "rate(x[5m]"), ("targetValue", "1")], "PromQL"),
        (&[("query", "x[5m]"), ("targetValue", "1")], "matrix"),
        (
            &[
                ("query.a", "sum(x)"),
                ("formula", "a + b"),
                ("targetValue", "1"),
            ],
            "unknown name `b`",
        ),
        (
            &[
                ("query.a", "sum(x)"),
                ("formula", "a +"),
                ("targetValue", "1"),
            ],
            "formula",
        ),
        (
            &[("query", "up"), ("preset", "membrane-capacity")],
            "exactly one of",
        ),
        (&[("preset", "membrane-everything")], "preset"),
    ];
    for (pairs, needle) in cases {
        let r = so("t-bad", &p.prometheus.url, pairs);
        let e = spec(&mut c, &r).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{pairs:?}: {e:?}");
        assert!(
            e.message().contains(needle),
            "{pairs:?}: {e:?} should mention {needle:?}"
        );
        let e = metrics(&mut c, &r).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{pairs:?}: {e:?}");
    }
}

#[tokio::test]
async fn a_query_the_server_refuses_is_invalid_argument() {
    let p = shared().await;
    let (_server, mut c) = server().await;
    // Valid for the parser; Prometheus refuses to evaluate it (an invalid
    // destination label name).
    let r = so(
        "t-refused",
        &p.prometheus.url,
        &[
            (
                "query",
                "label_replace(vector(1), \"0bad\", \"x\", \"\", \"\")",
            ),
            ("targetValue", "1"),
        ],
    );
    spec(&mut c, &r).await.expect("the parser accepts it");
    let e = metrics(&mut c, &r).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(
        e.message().contains("rejected the query") && e.message().contains("0bad"),
        "{e:?}"
    );
}

#[tokio::test]
async fn namespace_enforcement_hides_other_namespaces() {
    let p = shared().await;
    p.exporter
        .set("tenant_probe", &[("namespace", "t-own")], 1.0);
    p.exporter
        .set("tenant_probe", &[("namespace", "t-other")], 100.0);
    // Both series are in Prometheus...
    assert_eq!(
        p.prometheus
            .wait_for("sum(tenant_probe{namespace=\"t-other\"})")
            .await,
        100.0
    );
    assert_eq!(p.prometheus.wait_for("sum(tenant_probe)").await, 101.0);
    let (_server, mut c) = server().await;

    // ...but a ScaledObject in t-own sees only its own.
    let own = so(
        "t-own",
        &p.prometheus.url,
        &[("query", "sum(tenant_probe)"), ("targetValue", "1")],
    );
    assert_eq!(first_value(&mut c, &own).await, 1.0);
    let nested = so(
        "t-own",
        &p.prometheus.url,
        &[
            (
                "query",
                "max_over_time(sum(tenant_probe)[30s:1s]) + count(tenant_probe)",
            ),
            ("targetValue", "1"),
        ],
    );
    assert_eq!(first_value(&mut c, &nested).await, 2.0);

    // Naming another namespace is refused outright.
    let theft = so(
        "t-own",
        &p.prometheus.url,
        &[
            ("query", "sum(tenant_probe{namespace=\"t-other\"})"),
            ("targetValue", "1"),
        ],
    );
    let e = spec(&mut c, &theft).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("another namespace"), "{e:?}");
}

#[tokio::test]
async fn enforcement_can_be_turned_off_by_the_operator() {
    let p = shared().await;
    p.exporter
        .set("open_probe", &[("namespace", "t-open-a")], 2.0);
    p.exporter
        .set("open_probe", &[("namespace", "t-open-b")], 3.0);
    let mut config = test_config();
    config.prometheus.enforce_namespace = false;
    config.prometheus.cache_ttl = Duration::from_millis(100);
    let server = start_server(config).await;
    let mut c = server.scaler_client().await;
    let r = so(
        "t-open-a",
        &p.prometheus.url,
        &[
            ("query", "sum(open_probe{namespace=~\"t-open-.*\"})"),
            ("targetValue", "1"),
        ],
    );
    assert_eq!(first_value(&mut c, &r).await, 5.0);
}

#[tokio::test]
async fn unusable_values_are_failed_precondition() {
    let p = shared().await;
    let ns = "t-unusable";
    p.exporter
        .set("multi_probe", &[("namespace", ns), ("pod", "a")], 1.0);
    p.exporter
        .set("multi_probe", &[("namespace", ns), ("pod", "b")], 2.0);
    p.exporter.set("nan_probe", &[("namespace", ns)], f64::NAN);
    p.exporter.set("zero_probe", &[("namespace", ns)], 0.0);
    p.prometheus
        .wait_for("count(multi_probe{namespace=\"t-unusable\"}) == 2")
        .await;
    p.prometheus
        .wait_for("count(nan_probe{namespace=\"t-unusable\"})")
        .await;
    p.prometheus
        .wait_for("zero_probe{namespace=\"t-unusable\"}")
        .await;
    let (_server, mut c) = server().await;

    for (pairs, needle) in [
        (vec![("query", "multi_probe")], "2 series"),
        (vec![("query", "sum(nan_probe)")], "NaN"),
        (
            vec![
                ("query.a", "sum(multi_probe)"),
                ("query.z", "sum(zero_probe)"),
                ("formula", "a / z"),
            ],
            "division by zero",
        ),
    ] {
        let mut pairs = pairs;
        pairs.push(("targetValue", "1"));
        let r = so(ns, &p.prometheus.url, &pairs);
        let e = metrics(&mut c, &r).await.unwrap_err();
        assert_eq!(e.code(), Code::FailedPrecondition, "{pairs:?}: {e:?}");
        assert!(
            e.message().contains(needle),
            "{pairs:?}: {e:?} should mention {needle:?}"
        );
    }
}

#[tokio::test]
async fn prometheus_stopped_mid_test_is_unavailable_never_zero() {
    let exporter = Exporter::start();
    exporter.set("stop_probe", &[("namespace", "t-stop")], 5.0);
    let mut prometheus = Prometheus::start(&[exporter.addr]).await;
    let (_server, mut c) = server().await;
    let r = so(
        "t-stop",
        &prometheus.url,
        &[("query", "sum(stop_probe)"), ("targetValue", "1")],
    );
    assert_eq!(first_value(&mut c, &r).await, 5.0);

    prometheus.stop();
    // Until the cached answer expires it may still be 5; after that, only
    // errors. Never 0, never anything else.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let error = loop {
        match metrics(&mut c, &r).await {
            Ok(v) => assert_eq!(v, 5.0, "a stopped Prometheus must not produce a new value"),
            Err(e) => break e,
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "still answering 10s after Prometheus stopped"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(error.code(), Code::Unavailable, "{error:?}");
    let e = c.is_active(r.clone()).await.unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");

    prometheus.restart().await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        match metrics(&mut c, &r).await {
            Ok(v) => {
                assert_eq!(v, 5.0);
                break;
            }
            Err(e) => assert!(
                tokio::time::Instant::now() < deadline
                    && matches!(e.code(), Code::Unavailable | Code::NotFound),
                "{e:?}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn https_servers_need_their_ca_cert_or_unsafe_ssl() {
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = rcgen::CertifiedIssuer::self_signed(ca_params, rcgen::KeyPair::generate().unwrap())
        .unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let cert =
        rcgen::CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()])
            .unwrap()
            .signed_by(&key, &ca)
            .unwrap();
    // `caCert` names a file in the namespace's credentials directory.
    let credentials = tempfile::tempdir().unwrap();
    std::fs::create_dir(credentials.path().join("t-tls")).unwrap();
    std::fs::write(credentials.path().join("t-tls/ca.pem"), ca.pem()).unwrap();

    let exporter = Exporter::start();
    exporter.set("tls_probe", &[("namespace", "t-tls")], 6.0);
    let prometheus = Prometheus::start_tls(
        &[exporter.addr],
        &cert.pem(),
        &key.serialize_pem(),
        &ca.pem(),
    )
    .await;
    assert!(prometheus.url.starts_with("https://"));
    prometheus.wait_for("tls_probe{namespace=\"t-tls\"}").await;
    let mut config = test_config();
    config.prometheus.credentials_dir = credentials.path().to_owned();
    let server = start_server(config).await;
    let mut c = server.scaler_client().await;
    let query = [("query", "sum(tls_probe)"), ("targetValue", "1")];

    let trusted = so(
        "t-tls",
        &prometheus.url,
        &[query[0], query[1], ("caCert", "ca.pem")],
    );
    assert_eq!(first_value(&mut c, &trusted).await, 6.0);
    let inline = so(
        "t-tls",
        &prometheus.url,
        &[query[0], query[1], ("caCert", &ca.pem())],
    );
    assert_eq!(first_value(&mut c, &inline).await, 6.0);

    let unverified = so(
        "t-tls",
        &prometheus.url,
        &[query[0], query[1], ("unsafeSsl", "true")],
    );
    assert_eq!(first_value(&mut c, &unverified).await, 6.0);

    let untrusted = so("t-tls", &prometheus.url, &query);
    let e = metrics(&mut c, &untrusted).await.unwrap_err();
    assert_eq!(
        e.code(),
        Code::Unavailable,
        "an unknown issuer must not be trusted: {e:?}"
    );
}

async fn next(
    s: &mut tonic::Streaming<activescale::proto::IsActiveResponse>,
) -> Result<bool, Status> {
    use tokio_stream::StreamExt;
    tokio::time::timeout(Duration::from_secs(20), s.next())
        .await
        .expect("a push within 20s")
        .expect("stream open")
        .map(|m| m.result)
}

#[tokio::test]
async fn identical_concurrent_calls_cost_prometheus_one_query() {
    let exporter = Exporter::start();
    exporter.set("flight_probe", &[("namespace", "t-flight")], 8.0);
    let prometheus = Prometheus::start(&[exporter.addr]).await;
    prometheus
        .wait_for("flight_probe{namespace=\"t-flight\"}")
        .await;
    // The default cache TTL (2 s), as KEDA's operator and metrics server see it.
    let server = start_server(test_config()).await;
    let c = server.scaler_client().await;
    let r = so(
        "t-flight",
        &prometheus.url,
        &[("query", "sum(flight_probe)"), ("targetValue", "1")],
    );

    let before = prometheus.settled_query_count().await;
    let calls = (0..20).map(|_| {
        let (mut c, r) = (c.clone(), r.clone());
        async move { metrics(&mut c, &r).await }
    });
    let answers = futures::future::join_all(calls).await;
    assert!(
        answers.iter().all(|a| a.as_ref().ok() == Some(&8.0)),
        "{answers:?}"
    );
    let after = prometheus.settled_query_count().await;
    assert_eq!(after - before, 1.0, "20 identical calls, one query");
}

#[tokio::test]
async fn stream_is_active_follows_the_query() {
    let p = shared().await;
    let ns = "t-stream";
    p.exporter.set("stream_probe", &[("namespace", ns)], 3.0);
    let (_server, mut c) = server().await;
    let r = so(
        ns,
        &p.prometheus.url,
        &[("query", "sum(stream_probe)"), ("targetValue", "1")],
    );
    assert_eq!(first_value(&mut c, &r).await, 3.0);

    let mut stream = c.stream_is_active(r.clone()).await.unwrap().into_inner();
    assert!(
        next(&mut stream).await.unwrap(),
        "active while the query is above 0"
    );
    p.exporter.set("stream_probe", &[("namespace", ns)], 0.0);
    assert!(
        !next(&mut stream).await.unwrap(),
        "inactive once it reads 0"
    );
}

/// The gauge `name` of the server's own `/metrics`.
async fn exported(server: &TestServer, name: &str) -> Option<f64> {
    let (_, text) = http_get(&server.http_url("/metrics")).await;
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
}

#[tokio::test]
async fn stream_is_active_streams_of_one_query_share_one_feed() {
    let p = shared().await;
    let ns = "t-feed";
    p.exporter.set("feed_probe", &[("namespace", ns)], 2.0);
    let (server, mut c) = server().await;
    let query = so(
        ns,
        &p.prometheus.url,
        &[("query", "sum(feed_probe)"), ("targetValue", "1")],
    );
    assert_eq!(first_value(&mut c, &query).await, 2.0);

    // Ten ScaledObjects with the same trigger, and one with another query.
    let mut streams = Vec::new();
    for i in 0..10 {
        let mut r = query.clone();
        r.name = format!("worker-{i}");
        streams.push(c.stream_is_active(r).await.unwrap().into_inner());
    }
    let other = so(
        ns,
        &p.prometheus.url,
        &[("query", "max(feed_probe)"), ("targetValue", "1")],
    );
    streams.push(c.stream_is_active(other).await.unwrap().into_inner());
    for s in &mut streams {
        assert!(next(s).await.unwrap(), "every stream hears the value");
    }
    assert_eq!(
        exported(&server, "activescale_scaler_feeds_running").await,
        Some(2.0),
        "one poll loop per distinct query, not per stream"
    );
}

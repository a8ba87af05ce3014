//! End-to-end: fake Istio sidecars push over real sockets, a real KEDA-shaped
//! client asks, against the real server started by `run`.

mod common;

use std::time::Duration;

use activescale::proto::{GetMetricsRequest, IsActiveResponse};
use common::{envoy::*, *};
use tonic::{Code, Streaming};

const WAIT: Duration = Duration::from_secs(10);

fn web_trigger() -> Vec<(&'static str, &'static str)> {
    vec![
        ("scalerAddress", "activescale.keda:9090"),
        ("labelSelector", "app=web"),
        ("targetValue", "10"),
    ]
}

/// Waits until GetMetrics for `r` reads `want`.
async fn await_value(server: &TestServer, r: &activescale::proto::ScaledObjectRef, want: f64) {
    let client = server.scaler_client().await;
    eventually(WAIT, &format!("GetMetrics = {want}"), || {
        let mut c = client.clone();
        let r = r.clone();
        async move { get_metric(&mut c, &r).await.ok() == Some(want) }
    })
    .await;
}

async fn next_state(stream: &mut Streaming<IsActiveResponse>) -> bool {
    tokio::time::timeout(WAIT, stream.message())
        .await
        .expect("StreamIsActive message in time")
        .expect("stream ok")
        .expect("stream open")
        .result
}

#[tokio::test]
async fn pods_on_separate_streams_sum_with_identity_on_first_message_only() {
    let server = start_server(test_config()).await;
    let mut a = Sidecar::connect(
        server.sink,
        istio_node("shop", "web-a", &[("app", "web")], "web"),
    )
    .await;
    let mut b = Sidecar::connect(
        server.sink,
        istio_node("shop", "web-b.v2", &[("app", "web")], "web"),
    )
    .await;
    a.push_gauges(&[(&inbound(8080), 1.0)]).await;
    b.push_gauges(&[(&inbound(8080), 2.0)]).await;
    let r = so_ref("shop", "web", &web_trigger());
    await_value(&server, &r, 3.0).await;
    // Later messages carry no identifier; the stream remembers the pod.
    a.push_gauges(&[(&inbound(8080), 4.0)]).await;
    await_value(&server, &r, 6.0).await;

    let mut client = server.scaler_client().await;
    let resp = client
        .get_metrics(GetMetricsRequest {
            scaled_object_ref: Some(r.clone()),
            metric_name: "s0-active_requests".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(resp.metric_values[0].metric_name, "s0-active_requests");
    assert_eq!(resp.metric_values[0].metric_value, 6);
    let spec = client
        .get_metric_spec(r.clone())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(spec.metric_specs[0].metric_name, "active_requests");
    assert_eq!(spec.metric_specs[0].target_size_float, 10.0);
    assert_eq!(spec.metric_specs[0].target_size, 10);
    assert!(
        client
            .is_active(r.clone())
            .await
            .unwrap()
            .into_inner()
            .result
    );

    // max and avg over the same pods.
    let mut t = web_trigger();
    t.push(("aggregation", "max"));
    assert_eq!(
        get_metric(&mut client, &so_ref("shop", "web", &t))
            .await
            .unwrap(),
        4.0
    );
    t.pop();
    t.push(("aggregation", "avg"));
    assert_eq!(
        get_metric(&mut client, &so_ref("shop", "web", &t))
            .await
            .unwrap(),
        3.0
    );
    // The workload key selects the same pods.
    let w = so_ref("shop", "web", &[("workload", "web"), ("targetValue", "5")]);
    assert_eq!(get_metric(&mut client, &w).await.unwrap(), 6.0);

    // A sidecar that ends its stream cleanly gets the empty response and OK
    // (the sink frames the method by hand: Envoy's generated client decodes it).
    a.close().await.expect("a clean end of stream is OK");
    // The pod stays until its TTL: its next stream may be on another replica.
    assert_eq!(get_metric(&mut client, &r).await.unwrap(), 6.0);
}

#[tokio::test]
async fn families_split_over_two_messages_keep_their_values() {
    let server = start_server(test_config()).await;
    let mut s = Sidecar::connect(
        server.sink,
        istio_node("shop", "web-1", &[("app", "web")], "web"),
    )
    .await;
    s.push_gauges(&[(&inbound(8080), 2.0)]).await;
    s.push_gauges(&[("http.inbound_0.0.0.0_8443.downstream_rq_active", 5.0)])
        .await;
    let r = so_ref("shop", "web", &web_trigger());
    // Both ports count: the second message did not erase the first family.
    await_value(&server, &r, 7.0).await;
    s.push_gauges(&[(&inbound(8080), 0.0)]).await;
    await_value(&server, &r, 5.0).await;
    let (status, body) =
        http_get(&server.http_url("/v1/pods?namespace=shop&labelSelector=app%3Dweb")).await;
    assert_eq!(status, 200);
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["count"], 1);
    assert_eq!(v["pods"][0]["name"], "web-1");
    assert_eq!(v["pods"][0]["value"], 5.0);
    assert_eq!(
        v["pods"][0]["families"]["http.inbound_0.0.0.0_8080;.downstream_rq_active"],
        0.0
    );
    assert_eq!(v["pods"][0]["workload"], "web");
}

#[tokio::test]
async fn dropped_scopes_never_count() {
    let server = start_server(test_config()).await;
    let mut s = Sidecar::connect(
        server.sink,
        istio_node("shop", "web-1", &[("app", "web")], "web"),
    )
    .await;
    // The sink's own inbound scope, derived from the port it listens on.
    let own = server.sink.port();
    let own_new = format!("http.inbound_0.0.0.0_{own};.downstream_rq_active");
    let own_old = format!("http.inbound_0.0.0.0_{own}.downstream_rq_active");
    s.push_gauges(&[
        ("http.admin.downstream_rq_active", 100.0),
        ("http.agent.downstream_rq_active", 100.0),
        ("http.stats.downstream_rq_active", 100.0),
        ("http.outbound_0.0.0.0_80;.downstream_rq_active", 100.0),
        (&own_new, 100.0),
        (&own_old, 100.0),
        ("http.inbound_0.0.0.0_8080;.downstream_rq_total", 100.0),
        ("http.inbound_0.0.0.0_8080.downstream_rq_active", 1.0),
    ])
    .await;
    let r = so_ref("shop", "web", &web_trigger());
    await_value(&server, &r, 1.0).await;
    let (_, metrics) = http_get(&server.http_url("/metrics")).await;
    assert!(
        metrics.contains("activescale_sink_families_total{outcome=\"kept\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("activescale_sink_families_total{outcome=\"skipped\"} 7"),
        "{metrics}"
    );
}

#[tokio::test]
async fn bad_values_are_rejected_and_counted() {
    let server = start_server(test_config()).await;
    let mut s = Sidecar::connect(
        server.sink,
        istio_node("shop", "web-1", &[("app", "web")], "web"),
    )
    .await;
    s.push_gauges(&[
        (&inbound(8080), f64::NAN),
        (&inbound(8081), -3.0),
        (&inbound(8082), f64::INFINITY),
        (&inbound(8083), 2.0),
    ])
    .await;
    await_value(&server, &so_ref("shop", "web", &web_trigger()), 2.0).await;
    let (_, metrics) = http_get(&server.http_url("/metrics")).await;
    assert!(
        metrics.contains("activescale_sink_families_total{outcome=\"rejected\"} 3"),
        "{metrics}"
    );
}

#[tokio::test]
async fn namespaces_are_isolated() {
    let server = start_server(test_config()).await;
    let mut a = Sidecar::connect(
        server.sink,
        istio_node("team-a", "web-1", &[("app", "web")], "web"),
    )
    .await;
    let mut b = Sidecar::connect(
        server.sink,
        istio_node("team-b", "web-1", &[("app", "web")], "web"),
    )
    .await;
    a.push_gauges(&[(&inbound(8080), 1.0)]).await;
    b.push_gauges(&[(&inbound(8080), 20.0)]).await;
    await_value(&server, &so_ref("team-a", "web", &web_trigger()), 1.0).await;
    await_value(&server, &so_ref("team-b", "web", &web_trigger()), 20.0).await;
    // Asking for the other namespace explicitly is refused, not answered.
    let mut t = web_trigger();
    t.push(("namespace", "team-b"));
    let mut client = server.scaler_client().await;
    let err = get_metric(&mut client, &so_ref("team-a", "web", &t))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    assert!(err.message().contains("team-b"), "{err:?}");
}

#[tokio::test]
async fn cross_namespace_reads_when_the_operator_allows() {
    let mut config = test_config();
    config.engine.allow_cross_namespace = true;
    let server = start_server(config).await;
    let mut b = Sidecar::connect(
        server.sink,
        istio_node("team-b", "web-1", &[("app", "web")], "web"),
    )
    .await;
    b.push_gauges(&[(&inbound(8080), 4.0)]).await;
    let mut t = web_trigger();
    t.push(("namespace", "team-b"));
    await_value(&server, &so_ref("team-a", "web", &t), 4.0).await;
}

#[tokio::test]
async fn every_metadata_error_is_invalid_argument_naming_the_key() {
    let server = start_server(test_config()).await;
    let mut client = server.scaler_client().await;
    let cases: &[(&[(&str, &str)], &str)] = &[
        (&[("labelSelector", "app=web")], "targetValue"),
        (
            &[("labelSelector", "app=web"), ("targetValue", "ten")],
            "ten",
        ),
        (
            &[("labelSelector", "app=web"), ("targetValue", "0")],
            "targetValue",
        ),
        (&[("targetValue", "1")], "labelSelector"),
        (
            &[
                ("labelSelector", "app=web"),
                ("workload", "web"),
                ("targetValue", "1"),
            ],
            "workload",
        ),
        (
            &[("labelSelector", "app in (web"), ("targetValue", "1")],
            "labelSelector",
        ),
        (
            &[
                ("labelSelector", "app=web"),
                ("targetValue", "1"),
                ("activationValue", "x"),
            ],
            "activationValue",
        ),
        (
            &[
                ("labelSelector", "app=web"),
                ("targetValue", "1"),
                ("aggregation", "p50"),
            ],
            "aggregation",
        ),
        (
            &[
                ("labelSelector", "app=web"),
                ("targetValue", "1"),
                ("metricName", "a b"),
            ],
            "metricName",
        ),
        (
            &[
                ("labelSelector", "app=web"),
                ("targetValue", "1"),
                ("window", "forever"),
            ],
            "window",
        ),
        (
            &[
                ("labelSelector", "app=web"),
                ("targetValue", "1"),
                ("window", "1h"),
            ],
            "window",
        ),
        (
            &[
                ("labelSelector", "app=web"),
                ("targetValue", "1"),
                ("windowAggregation", "max"),
            ],
            "windowAggregation",
        ),
        (
            &[
                ("labelSelector", "app=web"),
                ("targetValue", "1"),
                ("source", "graphite"),
            ],
            "source",
        ),
        (
            &[
                ("labelSelector", "app=web"),
                ("targetValue", "1"),
                ("lableSelector", "x"),
            ],
            "lableSelector",
        ),
    ];
    for (pairs, needle) in cases {
        let r = so_ref("shop", "web", pairs);
        let checks = [
            client.get_metric_spec(r.clone()).await.map(drop),
            client.is_active(r.clone()).await.map(drop),
            get_metric(&mut client, &r).await.map(drop),
            client.stream_is_active(r.clone()).await.map(drop),
        ];
        for result in checks {
            let err = result.expect_err("invalid metadata must fail");
            assert_eq!(err.code(), Code::InvalidArgument, "{pairs:?}: {err:?}");
            assert!(
                err.message().contains(needle),
                "{pairs:?}: {:?} should name {needle}",
                err.message()
            );
        }
    }
    // A metric name KEDA did not get from GetMetricSpec.
    let err = client
        .get_metrics(GetMetricsRequest {
            scaled_object_ref: Some(so_ref("shop", "web", &web_trigger())),
            metric_name: "s0-something_else".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let err = client
        .stream_metric_spec(so_ref("shop", "web", &web_trigger()))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unimplemented);
}

#[tokio::test]
async fn stream_is_active_sends_state_then_only_changes_then_false_on_expiry() {
    let mut config = test_config();
    // Long enough that a loaded CI machine does not expire the pod between
    // the pushes below; the expiry at the end is awaited, not slept for.
    config.engine.pod_ttl = Duration::from_millis(1500);
    let server = start_server(config).await;
    let mut client = server.scaler_client().await;
    let r = so_ref("shop", "web", &web_trigger());
    let mut stream = client
        .stream_is_active(r.clone())
        .await
        .unwrap()
        .into_inner();
    assert!(
        !next_state(&mut stream).await,
        "state on open: no pods, inactive"
    );

    let mut s = Sidecar::connect(
        server.sink,
        istio_node("shop", "web-1", &[("app", "web")], "web"),
    )
    .await;
    s.push_gauges(&[(&inbound(8080), 3.0)]).await;
    assert!(
        next_state(&mut stream).await,
        "the ingest flips it, pushed at once"
    );

    // Ingests that keep it active (same value, other values above the
    // activation) must not be repeated on the stream: the next message is
    // the flip back, nothing in between.
    s.push_gauges(&[(&inbound(8080), 3.0)]).await;
    s.push_gauges(&[(&inbound(8080), 5.0)]).await;
    s.push_gauges(&[(&inbound(8080), 0.0)]).await;
    assert!(!next_state(&mut stream).await, "back to zero in flight");
    s.push_gauges(&[(&inbound(8080), 2.0)]).await;
    assert!(next_state(&mut stream).await);
    // The sidecar goes silent: the pod expires and the stream says so.
    assert!(!next_state(&mut stream).await, "expiry is a change");
    assert_eq!(get_metric(&mut client, &r).await.unwrap(), 0.0);
    let (_, body) = http_get(&server.http_url("/v1/pods?namespace=shop")).await;
    assert!(body.contains("\"count\":0"), "{body}");
}

/// The feeds gauge reads `want`.
async fn await_feeds(server: &TestServer, want: u32) {
    let http = server.http_url("/metrics");
    let line = format!("activescale_scaler_feeds_running {want}\n");
    eventually(WAIT, &line, || {
        let http = http.clone();
        let line = line.clone();
        async move { http_get(&http).await.1.contains(&line) }
    })
    .await;
}

#[tokio::test]
async fn activation_value_and_many_streams_sharing_one_read() {
    let server = start_server(test_config()).await;
    let mut t = web_trigger();
    t.push(("activationValue", "4"));
    let r = so_ref("shop", "web", &t);
    // Another ScaledObject on the same query with its own threshold: same
    // feed, its own decision.
    let mut low = web_trigger();
    low.push(("activationValue", "1"));
    let r_low = so_ref("shop", "web-canary", &low);
    // Another query: a feed of its own.
    let r_api = so_ref(
        "shop",
        "api",
        &[("labelSelector", "app=api"), ("targetValue", "10")],
    );
    let client = server.scaler_client().await;
    let open = |r: activescale::proto::ScaledObjectRef| {
        let mut c = client.clone();
        async move {
            let mut s = c.stream_is_active(r).await.unwrap().into_inner();
            assert!(!next_state(&mut s).await, "nothing in flight yet");
            s
        }
    };
    let mut streams = Vec::new();
    for _ in 0..50 {
        streams.push(open(r.clone()).await);
    }
    let mut low_streams = Vec::new();
    for _ in 0..5 {
        low_streams.push(open(r_low.clone()).await);
    }
    let api_stream = open(r_api.clone()).await;
    await_feeds(&server, 2).await;

    let mut sidecar = Sidecar::connect(
        server.sink,
        istio_node("shop", "web-1", &[("app", "web")], "web"),
    )
    .await;
    sidecar.push_gauges(&[(&inbound(8080), 4.0)]).await;
    for s in &mut low_streams {
        assert!(next_state(s).await, "4 is above 1");
    }
    await_value(&server, &r, 4.0).await;
    assert!(
        !client
            .clone()
            .is_active(r.clone())
            .await
            .unwrap()
            .into_inner()
            .result,
        "4 is not above 4"
    );
    sidecar.push_gauges(&[(&inbound(8080), 5.0)]).await;
    for s in &mut streams {
        assert!(next_state(s).await);
    }
    sidecar.push_gauges(&[(&inbound(8080), 0.0)]).await;
    for s in streams.iter_mut().chain(&mut low_streams) {
        assert!(!next_state(s).await);
    }
    // Cancelled streams free their resources on the server, feeds included.
    drop(api_stream);
    await_feeds(&server, 1).await;
    drop(streams);
    drop(low_streams);
    let http = server.http_url("/metrics");
    eventually(WAIT, "scaler streams closed", || {
        let http = http.clone();
        async move {
            http_get(&http)
                .await
                .1
                .contains("activescale_scaler_streams_open 0")
        }
    })
    .await;
    await_feeds(&server, 0).await;
    // A stream opened after its feed stopped starts a new one.
    let mut again = open(r.clone()).await;
    await_feeds(&server, 1).await;
    sidecar.push_gauges(&[(&inbound(8080), 5.0)]).await;
    assert!(next_state(&mut again).await);
}

#[tokio::test]
async fn windowed_trigger_remembers_the_peak() {
    let server = start_server(test_config()).await;
    let mut s = Sidecar::connect(
        server.sink,
        istio_node("shop", "web-1", &[("app", "web")], "web"),
    )
    .await;
    s.push_gauges(&[(&inbound(8080), 9.0)]).await;
    let plain = so_ref("shop", "web", &web_trigger());
    await_value(&server, &plain, 9.0).await;
    s.push_gauges(&[(&inbound(8080), 1.0)]).await;
    await_value(&server, &plain, 1.0).await;
    let mut t = web_trigger();
    t.push(("window", "30s"));
    let mut client = server.scaler_client().await;
    assert_eq!(
        get_metric(&mut client, &so_ref("shop", "web", &t))
            .await
            .unwrap(),
        9.0
    );
}

#[tokio::test]
async fn malformed_message_ends_only_its_own_stream() {
    let server = start_server(test_config()).await;
    let mut good = Sidecar::connect(
        server.sink,
        istio_node("shop", "web-1", &[("app", "web")], "web"),
    )
    .await;
    good.push_gauges(&[(&inbound(8080), 1.0)]).await;
    let r = so_ref("shop", "web", &web_trigger());
    await_value(&server, &r, 1.0).await;

    // Field 2 declared 100 bytes long with 1 byte present.
    let err = send_raw(
        server.sink,
        vec![bytes::Bytes::from_static(&[0x12, 100, 0])],
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("malformed"), "{err:?}");

    good.push_gauges(&[(&inbound(8080), 2.0)]).await;
    await_value(&server, &r, 2.0).await;
    let (_, metrics) = http_get(&server.http_url("/metrics")).await;
    assert!(
        metrics.contains("activescale_sink_stream_errors_total{reason=\"malformed\"} 1"),
        "{metrics}"
    );
}

#[tokio::test]
async fn oversized_message_is_refused_and_counted() {
    let mut config = test_config();
    config.sink.max_message_bytes = 64 * 1024;
    let server = start_server(config).await;
    let mut good = Sidecar::connect(
        server.sink,
        istio_node("shop", "web-1", &[("app", "web")], "web"),
    )
    .await;
    let mut big = Sidecar::connect(
        server.sink,
        istio_node("shop", "web-2", &[("app", "web")], "web"),
    )
    .await;
    let families: Vec<_> = (0..3000)
        .map(|i| {
            gauge(
                &format!("cluster.outbound|{i}||svc.default.svc.cluster.local.upstream_cx_active"),
                1.0,
            )
        })
        .collect();
    big.push(families).await;
    let err = big.close().await.unwrap_err();
    assert_eq!(err.code(), Code::OutOfRange, "{err:?}");
    good.push_gauges(&[(&inbound(8080), 1.0)]).await;
    let r = so_ref("shop", "web", &web_trigger());
    await_value(&server, &r, 1.0).await;
    let (_, metrics) = http_get(&server.http_url("/metrics")).await;
    assert!(
        metrics.contains("activescale_sink_stream_errors_total{reason=\"oversized\"} 1"),
        "{metrics}"
    );
}

#[tokio::test]
async fn stream_without_identity_is_counted_and_stores_nothing() {
    let server = start_server(test_config()).await;
    let node = envoy_types::pb::envoy::config::core::v3::Node {
        id: "router~10.0.0.1~gateway~istio-system.svc.cluster.local".into(),
        ..Default::default()
    };
    let mut s = Sidecar::connect(server.sink, node).await;
    s.push_gauges(&[(&inbound(8080), 5.0)]).await;
    let http = server.http_url("/metrics");
    eventually(WAIT, "identity_missing counted", || {
        let http = http.clone();
        async move {
            http_get(&http)
                .await
                .1
                .contains("activescale_sink_identity_missing_total 1")
        }
    })
    .await;
    let (_, body) = http_get(&server.http_url("/v1/pods?namespace=istio-system")).await;
    assert!(body.contains("\"count\":0"), "{body}");
}

#[tokio::test]
async fn health_endpoints_and_grpc_health() {
    let server = start_server(test_config()).await;
    assert_eq!(http_get(&server.http_url("/healthz")).await.0, 200);
    let ready = server.http_url("/readyz");
    eventually(WAIT, "ready", || {
        let ready = ready.clone();
        async move { http_get(&ready).await.0 == 200 }
    })
    .await;
    assert_eq!(
        http_get(&server.http_url("/v1/pods")).await.0,
        400,
        "namespace is required"
    );
    assert_eq!(
        http_get(&server.http_url("/v1/pods?namespace=a&labelSelector=%3D%3D"))
            .await
            .0,
        400
    );
    for addr in [server.sink, server.scaler] {
        let channel = tonic::transport::Channel::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect()
            .await
            .unwrap();
        let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
        let resp = health
            .check(tonic_health::pb::HealthCheckRequest {
                service: String::new(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            resp.status,
            tonic_health::pb::health_check_response::ServingStatus::Serving as i32
        );
    }
}

#[tokio::test]
async fn warmup_refuses_envoy_answers_instead_of_reading_an_empty_store_as_zero() {
    let mut config = test_config();
    config.engine.warmup = Some(Duration::from_secs(3600));
    let server = start_server(config).await;
    let mut client = server.scaler_client().await;
    let err = get_metric(&mut client, &so_ref("shop", "web", &web_trigger()))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    let err = client
        .is_active(so_ref("shop", "web", &web_trigger()))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable);
}

#[tokio::test]
async fn shutdown_ends_open_streams_and_run_returns() {
    let server = start_server(test_config()).await;
    let mut client = server.scaler_client().await;
    let mut stream = client
        .stream_is_active(so_ref("shop", "web", &web_trigger()))
        .await
        .unwrap()
        .into_inner();
    assert!(!next_state(&mut stream).await);
    let sidecar = Sidecar::connect(
        server.sink,
        istio_node("shop", "web-1", &[("app", "web")], "web"),
    )
    .await;
    tokio::time::timeout(WAIT, server.stop())
        .await
        .expect("drained in time")
        .expect("run ok");
    // The open streams were ended by the server, not left hanging, and
    // cleanly (status OK): KEDA resets its reconnect backoff only then.
    let end = tokio::time::timeout(WAIT, stream.message())
        .await
        .expect("stream ended");
    assert!(matches!(end, Ok(None)), "{end:?}");
    let _ = tokio::time::timeout(WAIT, sidecar.task)
        .await
        .expect("sink stream ended");
}

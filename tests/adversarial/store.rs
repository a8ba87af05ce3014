//! A store that refuses writes, namespaces that are not names, and
//! StreamIsActive through a store outage. See `main.rs`.
//!
//! Real `redis-server` processes throughout: one at `maxmemory` with
//! `noeviction`, one made a replica of another (it then refuses writes with
//! `READONLY`), one killed and restarted under open streams.

use std::time::Duration;

use activescale::proto::{IsActiveResponse, ScaledObjectRef};
use tonic::{Code, Status, Streaming};
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

use crate::common::{
    envoy::{Sidecar, eventually, inbound, istio_node},
    prometheus_server::{Exporter, Prometheus},
    redis_server::RedisServer,
    *,
};

const WAIT: Duration = Duration::from_secs(10);

/// The envoy trigger of the `web` pods of `shop`: active above 0.
fn web() -> ScaledObjectRef {
    so_ref(
        "shop",
        "web",
        &[("labelSelector", "app=web"), ("targetValue", "10")],
    )
}

async fn web_sidecar(server: &TestServer) -> Sidecar {
    Sidecar::connect(
        server.sink,
        istio_node("shop", "web-1", &[("app", "web")], "web"),
    )
    .await
}

/// Waits until GetMetrics of [`web`] answers `want`.
async fn await_metric(server: &TestServer, want: Result<f64, Code>) {
    let client = server.scaler_client().await;
    eventually(WAIT, &format!("GetMetrics answers {want:?}"), || {
        let mut c = client.clone();
        async move {
            match get_metric(&mut c, &web()).await {
                Ok(v) => want == Ok(v),
                Err(s) => want == Err(s.code()),
            }
        }
    })
    .await;
}

/// `/readyz` and the gRPC health status of both ports, as one answer.
async fn readiness(server: &TestServer) -> (u16, Vec<i32>) {
    let (readyz, _) = http_get(&server.http_url("/readyz")).await;
    let mut grpc = Vec::new();
    for addr in [server.sink, server.scaler] {
        let channel = tonic::transport::Channel::from_shared(format!("http://{addr}"))
            .expect("uri")
            .connect()
            .await
            .expect("connect for health");
        let mut health = HealthClient::new(channel);
        let status = health
            .check(HealthCheckRequest {
                service: String::new(),
            })
            .await
            .expect("health check")
            .into_inner()
            .status;
        grpc.push(status);
    }
    (readyz, grpc)
}

async fn await_readiness(server: &TestServer, ready: bool) {
    let want = if ready {
        (200, vec![ServingStatus::Serving as i32; 2])
    } else {
        (503, vec![ServingStatus::NotServing as i32; 2])
    };
    eventually(WAIT, &format!("readiness {want:?}"), || async {
        readiness(server).await == want
    })
    .await;
}

/// While the store refuses writes: GetMetrics and IsActive answer
/// UNAVAILABLE, every time (never a value), and the replica is not ready.
async fn assert_refused(server: &TestServer) {
    await_metric(server, Err(Code::Unavailable)).await;
    await_readiness(server, false).await;
    let mut client = server.scaler_client().await;
    for _ in 0..20 {
        let metric = get_metric(&mut client, &web()).await;
        assert_eq!(
            metric.as_ref().map_err(Status::code),
            Err(Code::Unavailable),
            "GetMetrics while writes fail: {metric:?}"
        );
        let message = metric.unwrap_err().message().to_owned();
        assert!(message.contains("writes failing"), "{message}");
        let active = client.is_active(web()).await.map(|r| r.into_inner().result);
        assert_eq!(
            active.as_ref().map_err(Status::code),
            Err(Code::Unavailable),
            "IsActive while writes fail: {active:?}"
        );
    }
}

async fn config_set(redis: &RedisServer, pairs: &[(&str, &str)]) {
    let mut raw = redis.client().await;
    for (k, v) in pairs {
        redis::cmd("CONFIG")
            .arg("SET")
            .arg(k)
            .arg(v)
            .query_async::<()>(&mut raw)
            .await
            .unwrap_or_else(|e| panic!("CONFIG SET {k} {v}: {e}"));
    }
}

#[tokio::test]
async fn redis_at_maxmemory_is_unavailable_not_stale_until_writes_succeed() {
    let redis = RedisServer::start();
    let server = start_server(redis.config(test_config())).await;
    await_readiness(&server, true).await;
    let mut sidecar = web_sidecar(&server).await;
    sidecar.push_gauges(&[(&inbound(8080), 4.0)]).await;
    await_metric(&server, Ok(4.0)).await;

    // Full: every write is refused with OOM; reads still work.
    config_set(
        &redis,
        &[("maxmemory-policy", "noeviction"), ("maxmemory", "1")],
    )
    .await;
    // The pod now has 5 in flight; Redis still holds 4.
    sidecar.push_gauges(&[(&inbound(8080), 5.0)]).await;
    assert_refused(&server).await;

    // Room again: readiness comes back with no sidecar traffic at all (the
    // probe write), then the next flush is answered.
    config_set(&redis, &[("maxmemory", "0")]).await;
    await_readiness(&server, true).await;
    sidecar.push_gauges(&[(&inbound(8080), 6.0)]).await;
    await_metric(&server, Ok(6.0)).await;
}

#[tokio::test]
async fn redis_turned_read_only_replica_is_unavailable_not_zero_until_writable() {
    let primary = RedisServer::start();
    let redis = RedisServer::start();
    let server = start_server(redis.config(test_config())).await;
    await_readiness(&server, true).await;
    let mut sidecar = web_sidecar(&server).await;
    sidecar.push_gauges(&[(&inbound(8080), 4.0)]).await;
    await_metric(&server, Ok(4.0)).await;

    // A failover gone wrong: our node follows another one. It takes the
    // other's (empty) data set and refuses writes with READONLY.
    let mut raw = redis.client().await;
    redis::cmd("REPLICAOF")
        .arg("127.0.0.1")
        .arg(primary.port)
        .query_async::<()>(&mut raw)
        .await
        .unwrap();
    sidecar.push_gauges(&[(&inbound(8080), 5.0)]).await;
    assert_refused(&server).await;

    let mut raw = redis.client().await;
    redis::cmd("REPLICAOF")
        .arg("NO")
        .arg("ONE")
        .query_async::<()>(&mut raw)
        .await
        .unwrap();
    await_readiness(&server, true).await;
    sidecar.push_gauges(&[(&inbound(8080), 6.0)]).await;
    await_metric(&server, Ok(6.0)).await;
}

/// Namespaces that are not Kubernetes namespace names (RFC 1123 labels).
fn not_namespaces() -> Vec<String> {
    [
        ".",
        "..",
        "a/b",
        "../etc",
        "Shop",
        "shop\n",
        "sh\nop",
        "-shop",
        "shop-",
        "shop.prod",
        "shop_prod",
        "",
    ]
    .map(String::from)
    .into_iter()
    .chain([
        "a".repeat(64),
        "\u{e9}t\u{e9}".into(),
        "shop\"} or vector(1) #".into(),
    ])
    .collect()
}

/// Every call KEDA makes with `r` is INVALID_ARGUMENT naming `field`, the
/// escaped value and what is accepted.
async fn assert_refused_everywhere(server: &TestServer, r: &ScaledObjectRef, field: &str, v: &str) {
    let mut client = server.scaler_client().await;
    let calls = [
        client.get_metric_spec(r.clone()).await.map(drop),
        client.is_active(r.clone()).await.map(drop),
        get_metric(&mut client, r).await.map(drop),
        client.stream_is_active(r.clone()).await.map(drop),
    ];
    for result in calls {
        let e = result.expect_err(&format!("{field} = {v:?} must be refused"));
        assert_eq!(e.code(), Code::InvalidArgument, "{field} = {v:?}: {e:?}");
        for needle in [field, &format!("{v:?}"), "RFC 1123"] {
            assert!(
                e.message().contains(needle),
                "{field} = {v:?}: {:?} should mention {needle:?}",
                e.message()
            );
        }
    }
}

#[tokio::test]
async fn scaled_object_namespace_must_be_a_namespace_name_for_every_source() {
    let server = start_server(test_config()).await;
    let sources: [&[(&str, &str)]; 2] = [
        &[("labelSelector", "app=web"), ("targetValue", "10")],
        &[
            ("source", "prometheus"),
            ("serverAddress", "http://127.0.0.1:1"),
            ("query", "sum(up)"),
            ("targetValue", "10"),
        ],
    ];
    for pairs in sources {
        // The same trigger in a proper namespace is fine.
        let mut client = server.scaler_client().await;
        client
            .get_metric_spec(so_ref("shop", "web", pairs))
            .await
            .expect("a valid trigger");
        for ns in not_namespaces() {
            let r = so_ref(&ns, "web", pairs);
            assert_refused_everywhere(&server, &r, "namespace", &ns).await;
        }
    }
}

#[tokio::test]
async fn trigger_namespace_key_must_be_a_namespace_name() {
    for allow_cross_namespace in [false, true] {
        let mut config = test_config();
        config.engine.allow_cross_namespace = allow_cross_namespace;
        let server = start_server(config).await;
        // Metadata values are trimmed and an empty one is absent: those
        // forms would name a proper namespace (or none), so they are not here.
        for ns in not_namespaces()
            .into_iter()
            .filter(|v| !v.trim().is_empty() && v.trim() == v)
        {
            let r = so_ref(
                "shop",
                "web",
                &[
                    ("labelSelector", "app=web"),
                    ("targetValue", "10"),
                    ("namespace", &ns),
                ],
            );
            assert_refused_everywhere(&server, &r, "`namespace`", &ns).await;
        }
    }
}

/// Silence on a stream: nothing arrives within a moment. Evidence only in
/// one direction (a slow server would pass it too); the message that follows
/// the outage is what proves nothing was sent.
async fn assert_silent(stream: &mut Streaming<IsActiveResponse>) {
    let got = tokio::time::timeout(Duration::from_millis(500), stream.message()).await;
    assert!(got.is_err(), "the stream sent {got:?} during the outage");
}

async fn next_state(stream: &mut Streaming<IsActiveResponse>) -> bool {
    tokio::time::timeout(WAIT, stream.message())
        .await
        .expect("a StreamIsActive message in time")
        .expect("the stream did not end with an error")
        .expect("the stream is still open")
        .result
}

/// One of the server's own metrics, from `/metrics`.
async fn own_metric(server: &TestServer, name: &str) -> f64 {
    let (_, body) = http_get(&server.http_url("/metrics")).await;
    body.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in /metrics"))
}

/// Waits until the feed behind the stream has seen the store fail (`true`)
/// or has read a value again (`false`).
async fn await_feed_unknown(server: &TestServer, unknown: bool) {
    let want = if unknown { 1.0 } else { 0.0 };
    eventually(WAIT, &format!("feeds unknown = {want}"), || async {
        own_metric(server, "activescale_scaler_feeds_unknown").await == want
    })
    .await;
}

#[tokio::test]
async fn stream_is_active_stays_open_and_silent_through_redis_outages() {
    // An append-only file, so that a restart brings the pods back as they
    // were; a long TTL, so that they are still live after it.
    let mut redis = RedisServer::start_with(&["--appendonly", "yes", "--appendfsync", "always"]);
    let mut config = redis.config(test_config());
    config.engine.pod_ttl = Duration::from_secs(120);
    let server = start_server(config).await;
    await_readiness(&server, true).await;
    let mut sidecar = web_sidecar(&server).await;
    sidecar.push_gauges(&[(&inbound(8080), 3.0)]).await;
    await_metric(&server, Ok(3.0)).await;
    let mut stream = server
        .scaler_client()
        .await
        .stream_is_active(web())
        .await
        .unwrap()
        .into_inner();
    assert!(next_state(&mut stream).await);
    let pushes = "activescale_scaler_pushes_total";
    let pushed = own_metric(&server, pushes).await;

    // Outage 1, back with the same state: polls fail, the stream says nothing.
    redis.stop();
    await_metric(&server, Err(Code::Unavailable)).await;
    await_feed_unknown(&server, true).await;
    assert_silent(&mut stream).await;
    redis.restart();
    await_metric(&server, Ok(3.0)).await;
    await_feed_unknown(&server, false).await;
    assert_eq!(
        own_metric(&server, pushes).await,
        pushed,
        "the same state was pushed again"
    );

    // Outage 2, back with another state (the data is lost).
    redis.stop();
    await_metric(&server, Err(Code::Unavailable)).await;
    await_feed_unknown(&server, true).await;
    assert_silent(&mut stream).await;
    std::fs::remove_dir_all(redis.dir().join("appendonlydir")).unwrap();
    redis.restart();
    await_metric(&server, Ok(0.0)).await;
    // The first message since the stream opened, on the same stream: it
    // never ended.
    assert!(!next_state(&mut stream).await);
    eventually(WAIT, "one push counted", || async {
        own_metric(&server, pushes).await == pushed + 1.0
    })
    .await;
    // And only one: the next message is the next change.
    sidecar.push_gauges(&[(&inbound(8080), 2.0)]).await;
    assert!(next_state(&mut stream).await);
}

#[tokio::test]
async fn drain_during_a_redis_outage_ends_streams_with_ok() {
    let mut redis = RedisServer::start();
    let server = start_server(redis.config(test_config())).await;
    await_readiness(&server, true).await;
    let mut stream = server
        .scaler_client()
        .await
        .stream_is_active(web())
        .await
        .unwrap()
        .into_inner();
    assert!(!next_state(&mut stream).await);
    redis.stop();
    await_metric(&server, Err(Code::Unavailable)).await;
    tokio::time::timeout(WAIT, server.stop())
        .await
        .expect("drained in time")
        .expect("run ok");
    // A clean end (status OK): KEDA resets its reconnect backoff on it.
    let end = tokio::time::timeout(WAIT, stream.message())
        .await
        .expect("the stream ended");
    assert!(matches!(end, Ok(None)), "{end:?}");
}

#[tokio::test]
async fn prometheus_source_stream_stays_open_and_silent_through_an_outage() {
    let exporter = Exporter::start();
    exporter.set("outage_probe", &[("namespace", "t-outage")], 3.0);
    let mut prometheus = Prometheus::start(&[exporter.addr]).await;
    let mut config = test_config();
    config.prometheus.cache_ttl = Duration::from_millis(100);
    config.prometheus.poll_interval = Duration::from_millis(200);
    let server = start_server(config).await;
    let r = so_ref(
        "t-outage",
        "worker",
        &[
            ("source", "prometheus"),
            ("serverAddress", &prometheus.url),
            ("query", "sum(outage_probe)"),
            ("targetValue", "1"),
        ],
    );
    let client = server.scaler_client().await;
    eventually(Duration::from_secs(20), "the series is scraped", || {
        let (mut c, r) = (client.clone(), r.clone());
        async move { get_metric(&mut c, &r).await.ok() == Some(3.0) }
    })
    .await;
    let mut stream = client
        .clone()
        .stream_is_active(r.clone())
        .await
        .unwrap()
        .into_inner();
    assert!(next_state(&mut stream).await);

    prometheus.stop();
    eventually(WAIT, "GetMetrics is UNAVAILABLE", || {
        let (mut c, r) = (client.clone(), r.clone());
        async move {
            get_metric(&mut c, &r)
                .await
                .is_err_and(|s| s.code() == Code::Unavailable)
        }
    })
    .await;
    assert_silent(&mut stream).await;
    exporter.set("outage_probe", &[("namespace", "t-outage")], 0.0);
    prometheus.restart().await;
    // The first message after the outage is the new state, on the same stream.
    assert!(!next_state(&mut stream).await);
}

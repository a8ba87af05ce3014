//! The Redis store end to end, against real `redis-server` processes: two
//! replicas sharing one Redis, an outage and its healing, TLS, ACL, a
//! 3-master cluster, and the cost of one Envoy message.

mod common;

use std::{sync::Arc, time::Duration};

use activescale::{
    config::Config,
    proto::{
        GetMetricsRequest, IsActiveResponse, ScaledObjectRef,
        external_scaler_client::ExternalScalerClient,
    },
    store::{
        Ingest, Ingested, PodIdentity, PodQuery, PodSelector, Store, Summary, redis::RedisStore,
    },
};
use common::{
    builders::app_pod,
    envoy::*,
    redis_server::{self, RedisCluster, RedisServer},
    *,
};
use tonic::{Code, Status, transport::Channel};

fn scaled_object(ns: &str, selector: &str) -> ScaledObjectRef {
    ScaledObjectRef {
        name: "web".into(),
        namespace: ns.into(),
        scaler_metadata: [
            ("labelSelector".to_string(), selector.to_string()),
            ("targetValue".to_string(), "10".to_string()),
        ]
        .into(),
    }
}

async fn get_metrics(client: &ExternalScalerClient<Channel>, ns: &str) -> Result<f64, Status> {
    let mut c = client.clone();
    c.get_metrics(GetMetricsRequest {
        scaled_object_ref: Some(scaled_object(ns, "app=web")),
        metric_name: "s0-active_requests".into(),
    })
    .await
    .map(|r| r.into_inner().metric_values[0].metric_value_float)
}

async fn is_active(client: &ExternalScalerClient<Channel>, ns: &str) -> Result<bool, Status> {
    let mut c = client.clone();
    c.is_active(scaled_object(ns, "app=web"))
        .await
        .map(|r| r.into_inner().result)
}

async fn await_value(client: &ExternalScalerClient<Channel>, ns: &str, want: f64) {
    eventually(
        Duration::from_secs(10),
        &format!("GetMetrics = {want}"),
        || async { get_metrics(client, ns).await.is_ok_and(|v| v == want) },
    )
    .await;
}

async fn await_code(client: &ExternalScalerClient<Channel>, ns: &str, code: Code) {
    eventually(
        Duration::from_secs(10),
        &format!("GetMetrics fails with {code:?}"),
        || async {
            get_metrics(client, ns)
                .await
                .is_err_and(|s| s.code() == code)
        },
    )
    .await;
}

async fn await_ready(server: &TestServer, status: u16) {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let url = server.http_url("/readyz");
    eventually(
        Duration::from_secs(10),
        &format!("/readyz {status}"),
        || async {
            reqwest::get(&url)
                .await
                .is_ok_and(|r| r.status().as_u16() == status)
        },
    )
    .await;
}

/// The next StreamIsActive message, awaited as an event.
async fn next(s: &mut tonic::Streaming<IsActiveResponse>) -> bool {
    tokio::time::timeout(Duration::from_secs(10), s.message())
        .await
        .expect("no StreamIsActive message")
        .unwrap()
        .expect("stream ended")
        .result
}

/// A StreamIsActive on the web workload of `shop`, held open.
async fn open_stream(client: &ExternalScalerClient<Channel>) -> tonic::Streaming<IsActiveResponse> {
    client
        .clone()
        .stream_is_active(scaled_object("shop", "app=web"))
        .await
        .unwrap()
        .into_inner()
}

fn redis_config(redis_url: &str) -> Config {
    let mut c = test_config();
    c.store.redis_mut().url = redis_url.into();
    c
}

fn web_node(ns: &str, pod: &str) -> envoy_types::pb::envoy::config::core::v3::Node {
    istio_node(ns, pod, &[("app", "web")], "web")
}

#[tokio::test]
async fn two_replicas_behave_as_one() {
    let redis = RedisServer::start();
    let a = start_server(redis.config(test_config())).await;
    let b = start_server(redis.config(test_config())).await;
    await_ready(&b, 200).await;
    let b_client = b.scaler_client().await;

    // A StreamIsActive held open on B, before anything is ingested anywhere.
    let mut stream = open_stream(&b_client).await;
    assert!(!next(&mut stream).await, "nothing ingested yet");

    // Ingest on A only.
    let mut sidecar = Sidecar::connect(a.sink, web_node("shop", "web-1")).await;
    sidecar.push_gauges(&[(&inbound(8080), 3.0)]).await;
    assert!(next(&mut stream).await, "B's stream flips on A's ingest");
    await_value(&b_client, "shop", 3.0).await;
    assert!(is_active(&b_client, "shop").await.unwrap());

    sidecar.push_gauges(&[(&inbound(8080), 0.0)]).await;
    assert!(!next(&mut stream).await, "and back");
    await_value(&b_client, "shop", 0.0).await;
    // A sees the same.
    await_value(&a.scaler_client().await, "shop", 0.0).await;
}

/// A replica's name, as its `/v1/status` gives it.
async fn replica_of(server: &TestServer) -> String {
    let (status, body) = http_get(&server.http_url("/v1/status")).await;
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    v["replica"].as_str().expect("a replica name").to_string()
}

/// Pod name → its stream's replica, from `server`'s `/v1/pods`.
async fn pod_replicas(server: &TestServer, ns: &str) -> Vec<(String, serde_json::Value)> {
    let (status, body) = http_get(&server.http_url(&format!("/v1/pods?namespace={ns}"))).await;
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    v["pods"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["name"].as_str().unwrap().to_string(),
                p["replica"].clone(),
            )
        })
        .collect()
}

#[tokio::test]
async fn pods_name_the_replica_holding_the_stream() {
    let redis = RedisServer::start();
    let a = start_server(redis.config(test_config())).await;
    let b = start_server(redis.config(test_config())).await;
    await_ready(&a, 200).await;
    await_ready(&b, 200).await;
    let (ra, rb) = (replica_of(&a).await, replica_of(&b).await);
    assert_ne!(ra, rb, "two runs in one process are told apart");

    let mut on_a = Sidecar::connect(a.sink, web_node("shop", "web-1")).await;
    let mut on_b = Sidecar::connect(b.sink, web_node("shop", "web-2")).await;
    on_a.push_gauges(&[(&inbound(8080), 1.0)]).await;
    on_b.push_gauges(&[(&inbound(8080), 2.0)]).await;
    let want = vec![
        ("web-1".to_string(), serde_json::Value::from(ra.clone())),
        ("web-2".to_string(), serde_json::Value::from(rb.clone())),
    ];
    // Pushes are not acknowledged: await the sum, then read the listing.
    await_value(&a.scaler_client().await, "shop", 3.0).await;
    for server in [&a, &b] {
        assert_eq!(pod_replicas(server, "shop").await, want);
    }

    // web-1's sidecar reconnects to B: the next write moves it.
    drop(on_a);
    let mut moved = Sidecar::connect(b.sink, web_node("shop", "web-1")).await;
    moved.push_gauges(&[(&inbound(8080), 4.0)]).await;
    await_value(&b.scaler_client().await, "shop", 6.0).await;
    let want = vec![
        ("web-1".to_string(), serde_json::Value::from(rb.clone())),
        ("web-2".to_string(), serde_json::Value::from(rb.clone())),
    ];
    for server in [&a, &b] {
        assert_eq!(pod_replicas(server, "shop").await, want);
    }
}

#[tokio::test]
async fn streams_of_one_trigger_share_one_read_per_change() {
    let redis = RedisServer::start();
    let server = start_server(redis.config(test_config())).await;
    await_ready(&server, 200).await;
    let client = server.scaler_client().await;
    let mut streams = Vec::new();
    for _ in 0..20 {
        let mut s = open_stream(&client).await;
        assert!(!next(&mut s).await);
        streams.push(s);
    }
    let mut sidecar = Sidecar::connect(server.sink, web_node("shop", "web-1")).await;
    let mut raw = redis.client().await;
    let before = command_calls(&mut raw).await;
    sidecar.push_gauges(&[(&inbound(8080), 3.0)]).await;
    for s in &mut streams {
        assert!(next(s).await);
    }
    let after = command_calls(&mut raw).await;
    let scripts = after["evalsha"] - before.get("evalsha").copied().unwrap_or(0);
    // The sidecar's write, one shared read, perhaps a sweep: not one read
    // per stream (that would be 21 or more).
    assert!(scripts <= 4, "{scripts} scripts ran for one change");
}

#[tokio::test]
async fn redis_outage_gives_errors_then_heals_without_restart() {
    // The process starts before Redis: it must come up, not ready.
    let mut redis = RedisServer::reserve();
    let server = start_server(redis.config(test_config())).await;
    let client = server.scaler_client().await;
    await_code(&client, "shop", Code::Unavailable).await;
    await_ready(&server, 503).await;
    // StreamIsActive streams opened together (one shared read) stay open and
    // say nothing, neither a made-up state nor an error (which would grow
    // KEDA's reconnect wait): their first message is the state once known.
    let mut streams = futures::future::try_join_all((0..3).map(|_| {
        let mut c = client.clone();
        async move {
            c.stream_is_active(scaled_object("shop", "app=web"))
                .await
                .map(|r| r.into_inner())
        }
    }))
    .await
    .unwrap();
    for s in &mut streams {
        let early = tokio::time::timeout(Duration::from_millis(200), s.message()).await;
        assert!(early.is_err(), "sent during the outage: {early:?}");
    }

    redis.restart();
    await_ready(&server, 200).await;
    for s in &mut streams {
        assert!(!next(s).await, "nothing ingested: inactive");
    }
    let mut sidecar = Sidecar::connect(server.sink, web_node("shop", "web-1")).await;
    sidecar.push_gauges(&[(&inbound(8080), 4.0)]).await;
    await_value(&client, "shop", 4.0).await;

    // Redis goes away: errors, never 0 or the last value.
    redis.stop();
    await_code(&client, "shop", Code::Unavailable).await;
    assert_eq!(
        is_active(&client, "shop").await.unwrap_err().code(),
        Code::Unavailable
    );
    await_ready(&server, 503).await;
    // The sink keeps the Envoy stream and counts what it could not store.
    let metrics_url = server.http_url("/metrics");
    let store_errors = || async {
        let (_, body) = http_get(&metrics_url).await;
        body.lines()
            .find(|l| l.starts_with("activescale_sink_store_errors"))
            .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    let before = store_errors().await;
    sidecar.push_gauges(&[(&inbound(8080), 5.0)]).await;
    eventually(
        Duration::from_secs(10),
        "a failed write is counted",
        || async { store_errors().await > before },
    )
    .await;
    assert!(
        !sidecar.task.is_finished(),
        "the sink ended the Envoy stream"
    );

    // Redis is back (empty: no persistence here); the next flush refills it.
    redis.restart();
    await_ready(&server, 200).await;
    sidecar.push_gauges(&[(&inbound(8080), 6.0)]).await;
    await_value(&client, "shop", 6.0).await;
}

#[tokio::test]
async fn tls_with_a_test_ca_and_client_certificates() {
    let redis = RedisServer::start_tls(true);
    let files = redis.tls.as_ref().unwrap();
    let mut config = redis_config(&redis.url());
    config.store.redis_mut().ca_file = Some(files.ca.clone());
    config.store.redis_mut().cert_file = Some(files.client_cert.clone());
    config.store.redis_mut().key_file = Some(files.client_key.clone());
    let server = start_server(config.clone()).await;
    await_ready(&server, 200).await;
    let mut sidecar = Sidecar::connect(server.sink, web_node("shop", "web-1")).await;
    sidecar.push_gauges(&[(&inbound(8080), 2.0)]).await;
    await_value(&server.scaler_client().await, "shop", 2.0).await;

    // Without the client certificate the server refuses us: errors, not zeros.
    let mut no_cert = config.clone();
    no_cert.store.redis_mut().cert_file = None;
    no_cert.store.redis_mut().key_file = None;
    let refused = start_server(no_cert).await;
    await_code(&refused.scaler_client().await, "shop", Code::Unavailable).await;
    await_ready(&refused, 503).await;

    // Without our CA the server's certificate is not trusted.
    let mut untrusted = config.clone();
    untrusted.store.redis_mut().ca_file = None;
    let s = redis_server::connect(&untrusted).await.unwrap();
    let e = s.ready().await.unwrap_err();
    assert!(e.to_string().contains("certificate"), "{e}");

    // redis_tls=true upgrades a redis:// URL.
    let mut upgraded = config.clone();
    upgraded.store.redis_mut().url = format!("redis://127.0.0.1:{}", redis.port);
    upgraded.store.redis_mut().tls = true;
    let s = redis_server::connect(&upgraded).await.unwrap();
    ready_soon(&s).await;
    assert_eq!(s.values(&web_query("shop")).await.unwrap(), vec![2.0]);
}

#[tokio::test]
async fn tls_insecure_skips_verification() {
    let redis = RedisServer::start_tls(false);
    let mut config = redis_config(&redis.url());
    config.store.redis_mut().tls_insecure = true;
    let s = redis_server::connect(&config).await.unwrap();
    ready_soon(&s).await;
}

fn web_query(ns: &str) -> PodQuery {
    PodQuery {
        namespace: ns.into(),
        selector: PodSelector::Labels(activescale::selector::Selector::parse("app=web").unwrap()),
        window: None,
    }
}

async fn ready_soon(s: &RedisStore) {
    eventually(Duration::from_secs(10), "store ready", || async {
        s.ready().await.is_ok()
    })
    .await;
}

#[tokio::test]
async fn acl_user_and_password() {
    let redis = RedisServer::start_with(&[
        "--user",
        "default",
        "off",
        "--user",
        "scaler",
        "on",
        ">s3cret",
        "~{activescale:*",
        "&activescale:*",
        "+@all",
    ]);
    let mut config = redis_config(&redis.url());
    config.store.redis_mut().username = Some("scaler".into());
    config.store.redis_mut().password = Some("s3cret".into());
    let server = start_server(config.clone()).await;
    await_ready(&server, 200).await;
    let mut sidecar = Sidecar::connect(server.sink, web_node("shop", "web-1")).await;
    sidecar.push_gauges(&[(&inbound(8080), 7.0)]).await;
    await_value(&server.scaler_client().await, "shop", 7.0).await;

    // Credentials in the URL work too.
    let mut in_url = redis_config(&format!("redis://scaler:s3cret@127.0.0.1:{}", redis.port));
    in_url.engine.pod_ttl = config.engine.pod_ttl;
    let s = redis_server::connect(&in_url).await.unwrap();
    ready_soon(&s).await;
    assert_eq!(s.values(&web_query("shop")).await.unwrap(), vec![7.0]);

    // A wrong password is an error everywhere, never an empty answer.
    let mut wrong = config.clone();
    wrong.store.redis_mut().password = Some("nope".into());
    let bad = start_server(wrong).await;
    await_code(&bad.scaler_client().await, "shop", Code::Unavailable).await;
    assert_eq!(
        is_active(&bad.scaler_client().await, "shop")
            .await
            .unwrap_err()
            .code(),
        Code::Unavailable
    );
    await_ready(&bad, 503).await;
}

#[tokio::test]
async fn three_master_cluster() {
    let cluster = RedisCluster::start();
    let config = redis_config(&cluster.url());
    let a = start_server(config.clone()).await;
    let b = start_server(config).await;
    await_ready(&b, 200).await;
    let b_client = b.scaler_client().await;
    // Namespaces hash to different slots, so to different masters.
    let namespaces = ["shop", "billing", "search", "auth", "cart", "ads"];
    let mut sidecars = Vec::new();
    for (i, ns) in namespaces.iter().enumerate() {
        let mut s = Sidecar::connect(a.sink, web_node(ns, "web-1")).await;
        s.push_gauges(&[(&inbound(8080), i as f64 + 1.0)]).await;
        sidecars.push(s);
    }
    for (i, ns) in namespaces.iter().enumerate() {
        await_value(&b_client, ns, i as f64 + 1.0).await;
    }
    // Keys of one namespace share a hash tag: each namespace lives on one node.
    let mut masters_used = std::collections::HashSet::new();
    for ns in namespaces {
        let mut raw = cluster.nodes[0].client().await;
        let slot: u32 = redis::cmd("CLUSTER")
            .arg("KEYSLOT")
            .arg(format!("{{activescale:{ns}}}:seen"))
            .query_async(&mut raw)
            .await
            .unwrap();
        masters_used.insert(slot * 3 / 16384);
    }
    assert!(
        masters_used.len() > 1,
        "the test namespaces all landed on one master"
    );

    // StreamIsActive across replicas on a cluster.
    let mut stream = open_stream(&b_client).await;
    assert!(next(&mut stream).await);
    sidecars[0].push_gauges(&[(&inbound(8080), 0.0)]).await;
    assert!(!next(&mut stream).await);
}

/// Commands of the server's `INFO commandstats` (calls from scripts included).
async fn command_calls(
    conn: &mut redis::aio::MultiplexedConnection,
) -> std::collections::HashMap<String, u64> {
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(conn)
        .await
        .unwrap();
    info.lines()
        .filter_map(|l| {
            let (name, rest) = l.strip_prefix("cmdstat_")?.split_once(':')?;
            let calls = rest
                .strip_prefix("calls=")?
                .split(',')
                .next()?
                .parse()
                .ok()?;
            Some((name.to_string(), calls))
        })
        .collect()
}

#[tokio::test]
async fn one_round_trip_per_message_and_no_rewrite_when_unchanged() {
    let redis = RedisServer::start();
    let store = redis_server::connect(&redis.config(test_config()))
        .await
        .unwrap();
    ready_soon(&store).await;
    let mut raw = redis.client().await;
    let p = app_pod("shop", "web-1", "web");
    let families = vec![("f".to_string(), 3.0)];
    store.record(&p, &families).await.unwrap();
    let before = command_calls(&mut raw).await;
    for _ in 0..20 {
        store.record(&p, &families).await.unwrap();
    }
    let after = command_calls(&mut raw).await;
    let delta = |c: &str| after.get(c).copied().unwrap_or(0) - before.get(c).copied().unwrap_or(0);
    // The store's own commands: one EVALSHA per message, nothing else
    // (no PING on checkout). INFO itself is ours.
    assert_eq!(delta("evalsha"), 20);
    for other in ["ping", "eval", "script|load"] {
        assert_eq!(delta(other), 0, "{other}");
    }
    // Unchanged value: only the last-seen score is written.
    assert_eq!(delta("hset"), 0);
    assert_eq!(delta("zadd"), 20);
    assert_eq!(delta("publish"), 0, "an unchanged value wakes nobody");

    store.record(&p, &[("f".to_string(), 4.0)]).await.unwrap();
    let changed = command_calls(&mut raw).await;
    assert_eq!(
        changed["hset"] - after.get("hset").copied().unwrap_or(0),
        4,
        "state, history, the group's sum and the value the pod is counted with"
    );
    assert_eq!(
        changed["publish"] - after.get("publish").copied().unwrap_or(0),
        1
    );
}

#[tokio::test]
async fn key_prefixes_keep_installs_apart_and_reads_touch_one_namespace() {
    let redis = RedisServer::start();
    let mut one = redis.config(test_config());
    one.store.redis_mut().key_prefix = "one".into();
    let mut two = one.clone();
    two.store.redis_mut().key_prefix = "two".into();
    let (one, two) = (
        redis_server::connect(&one).await.unwrap(),
        redis_server::connect(&two).await.unwrap(),
    );
    ready_soon(&one).await;
    one.record(&app_pod("shop", "web-1", "web"), &[("f".into(), 1.0)])
        .await
        .unwrap();
    two.record(&app_pod("shop", "web-1", "web"), &[("f".into(), 2.0)])
        .await
        .unwrap();
    one.record(&app_pod("other", "web-1", "web"), &[("f".into(), 9.0)])
        .await
        .unwrap();
    assert_eq!(one.values(&web_query("shop")).await.unwrap(), vec![1.0]);
    assert_eq!(two.values(&web_query("shop")).await.unwrap(), vec![2.0]);
    let mut raw = redis.client().await;
    let mut keys: Vec<String> = redis::cmd("KEYS")
        .arg("*")
        .query_async(&mut raw)
        .await
        .unwrap();
    keys.sort();
    // Besides the namespaces: the readiness probe's key of `one` (only it
    // was asked whether it is ready), in its prefix too.
    let (probes, data): (Vec<&String>, Vec<&String>) =
        keys.iter().partition(|k| k.contains(":probe}:"));
    assert_eq!(probes.len(), 1, "{probes:?}");
    assert!(probes[0].starts_with("{one:probe}:replica:"), "{probes:?}");
    assert_eq!(
        data,
        [
            "{one:other}:g",
            "{one:other}:gc",
            "{one:other}:gl",
            "{one:other}:gs",
            "{one:other}:h",
            "{one:other}:id",
            "{one:other}:rep",
            "{one:other}:seen",
            "{one:other}:st",
            "{one:shop}:g",
            "{one:shop}:gc",
            "{one:shop}:gl",
            "{one:shop}:gs",
            "{one:shop}:h",
            "{one:shop}:id",
            "{one:shop}:rep",
            "{one:shop}:seen",
            "{one:shop}:st",
            "{two:shop}:g",
            "{two:shop}:gc",
            "{two:shop}:gl",
            "{two:shop}:gs",
            "{two:shop}:h",
            "{two:shop}:id",
            "{two:shop}:rep",
            "{two:shop}:seen",
            "{two:shop}:st",
        ]
    );
    // Every key has a TTL: an abandoned namespace disappears.
    for k in &keys {
        let ttl: i64 = redis::cmd("PTTL")
            .arg(k)
            .query_async(&mut raw)
            .await
            .unwrap();
        assert!(ttl > 0, "{k} has no TTL");
    }
    let before = command_calls(&mut raw).await;
    one.values(&web_query("shop")).await.unwrap();
    let after = command_calls(&mut raw).await;
    for scan in ["keys", "scan"] {
        assert_eq!(after.get(scan), before.get(scan), "a read used {scan}");
    }
}

/// Not a test of behaviour: measures what 1,000 pods cost in Redis, for the
/// README's sizing line. Run with `--ignored --nocapture`.
#[tokio::test]
#[ignore]
async fn measure_memory_per_1000_pods() {
    let redis = RedisServer::start();
    let mut config = redis.config(test_config());
    config.engine.pod_ttl = Duration::from_secs(600);
    let store = redis_server::connect(&config).await.unwrap();
    ready_soon(&store).await;
    let mut raw = redis.client().await;
    let used = |raw: &mut redis::aio::MultiplexedConnection| {
        let mut raw = raw.clone();
        async move {
            let info: String = redis::cmd("INFO")
                .arg("memory")
                .query_async(&mut raw)
                .await
                .unwrap();
            info.lines()
                .find_map(|l| l.strip_prefix("used_memory:"))
                .unwrap()
                .trim()
                .parse::<i64>()
                .unwrap()
        }
    };
    // PODS=100000 for BENCHMARKS.md's figure: 1,000 pods per namespace, as
    // the load tool's memory set.
    let pods: usize = std::env::var("PODS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000);
    let base = used(&mut raw).await;
    for i in 0..pods {
        let p = PodIdentity {
            namespace: if i < 1000 {
                "shop".into()
            } else {
                format!("shop-{}", i / 1000)
            },
            name: format!("web-7d9c6b5f4-{i:05}"),
            workload: Some("web".into()),
            labels: Arc::new(
                [
                    ("app", "web"),
                    ("pod-template-hash", "7d9c6b5f4"),
                    ("security.istio.io/tlsMode", "istio"),
                    ("service.istio.io/canonical-name", "web"),
                    ("service.istio.io/canonical-revision", "v1"),
                    ("version", "v1"),
                ]
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .into(),
            ),
        };
        // A few value changes each, as a busy pod has within max_window,
        // from one of three replicas named as a Deployment's pods are.
        for v in [1.0, 3.0, 2.0, 5.0] {
            store
                .ingest(&Ingest {
                    pod: &p,
                    families: &[("http.inbound_0.0.0.0_8080;.downstream_rq_active".into(), v)],
                    peer: None,
                    max_families: 64,
                    replica: [
                        "activescale-6f8d9c7b5-2xkqz",
                        "activescale-6f8d9c7b5-9wq4t",
                        "activescale-6f8d9c7b5-m7rjp",
                    ][i % 3],
                })
                .await
                .unwrap();
        }
    }
    let total = used(&mut raw).await - base;
    for k in [
        "seen", "id", "st", "h", "g", "gl", "gs", "gc", "addr", "rep",
    ] {
        let key = format!("{{activescale:shop}}:{k}");
        // Nil for a key never written (`addr`: these writes have no peer).
        let bytes: Option<i64> = redis::cmd("MEMORY")
            .arg("USAGE")
            .arg(&key)
            .arg("SAMPLES")
            .arg(0)
            .query_async(&mut raw)
            .await
            .unwrap();
        println!("{key}: {bytes:?} bytes for the first 1000 pods");
    }
    println!(
        "used_memory grew by {total} bytes for {pods} pods: {} bytes per pod",
        total / pods as i64
    );
    // What the stream's replica costs: the same data without its hashes.
    let namespaces = pods.div_ceil(1000);
    for n in 0..namespaces {
        let ns = if n == 0 {
            "shop".to_string()
        } else {
            format!("shop-{n}")
        };
        let _: i64 = redis::cmd("DEL")
            .arg(format!("{{activescale:{ns}}}:rep"))
            .query_async(&mut raw)
            .await
            .unwrap();
    }
    let without = used(&mut raw).await - base;
    println!(
        "without the replica hashes: {without} bytes, {} bytes per pod",
        without / pods as i64
    );
    assert!(total > without && without > 0);
}

/// The real `activescale` binary, killed on drop.
struct Process {
    child: std::process::Child,
    sink: std::net::SocketAddr,
    scaler: std::net::SocketAddr,
    http: std::net::SocketAddr,
}

impl Process {
    /// `activescale serve` with the Redis store, configured the way operators
    /// of the earlier tool do (`REDIS_URL`).
    fn spawn(redis_url: &str) -> Self {
        use common::redis_server::free_port;
        let addr = |p: u16| std::net::SocketAddr::from(([127, 0, 0, 1], p));
        let (sink, scaler, http) = (addr(free_port()), addr(free_port()), addr(free_port()));
        let child = std::process::Command::new(env!("CARGO_BIN_EXE_activescale"))
            .args(["serve", "--store", "redis"])
            .args(["--sink-addr", &sink.to_string()])
            .args(["--scaler-addr", &scaler.to_string()])
            .args(["--http-addr", &http.to_string()])
            .args(["--warmup", "0s"])
            .env("REDIS_URL", redis_url)
            .env("RUST_LOG", "warn")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("spawn activescale");
        Self {
            child,
            sink,
            scaler,
            http,
        }
    }

    async fn ready(&self) {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let url = format!("http://{}/readyz", self.http);
        eventually(Duration::from_secs(20), "process ready", || async {
            reqwest::get(&url)
                .await
                .is_ok_and(|r| r.status().is_success())
        })
        .await;
    }

    async fn client(&self) -> ExternalScalerClient<Channel> {
        ExternalScalerClient::connect(format!("http://{}", self.scaler))
            .await
            .unwrap()
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test]
async fn two_scaler_processes_share_one_redis() {
    let redis = RedisServer::start();
    let (a, b) = (Process::spawn(&redis.url()), Process::spawn(&redis.url()));
    a.ready().await;
    b.ready().await;
    let b_client = b.client().await;
    let mut stream = open_stream(&b_client).await;
    assert!(!next(&mut stream).await);
    let mut sidecar = Sidecar::connect(a.sink, web_node("shop", "web-1")).await;
    sidecar.push_gauges(&[(&inbound(8080), 2.0)]).await;
    assert!(next(&mut stream).await, "B's stream flips on A's ingest");
    await_value(&b_client, "shop", 2.0).await;
    await_value(&a.client().await, "shop", 2.0).await;
}

#[tokio::test]
async fn slow_redis_is_a_timeout_not_a_value() {
    let redis = RedisServer::start();
    let mut config = redis.config(test_config());
    config.store.redis_mut().timeout = Duration::from_millis(200);
    let store = redis_server::connect(&config).await.unwrap();
    ready_soon(&store).await;
    store
        .record(&app_pod("shop", "web-1", "web"), &[("f".into(), 3.0)])
        .await
        .unwrap();
    let mut raw = redis.client().await;
    // Every client's commands wait until the pause ends (3 s).
    let _: () = redis::cmd("CLIENT")
        .arg("PAUSE")
        .arg(3000)
        .arg("ALL")
        .query_async(&mut raw)
        .await
        .unwrap();
    let e = store.values(&web_query("shop")).await.unwrap_err();
    assert!(
        matches!(e, activescale::store::StoreError::Timeout(_)),
        "{e}"
    );
    assert!(
        store
            .record(&app_pod("shop", "web-1", "web"), &[("f".into(), 4.0)])
            .await
            .is_err()
    );
    assert!(store.ready().await.is_err());
    eventually(Duration::from_secs(10), "answers again", || async {
        store
            .values(&web_query("shop"))
            .await
            .is_ok_and(|v| v == vec![3.0])
    })
    .await;
}

async fn uptime_secs(conn: &mut redis::aio::MultiplexedConnection) -> u64 {
    let info: String = redis::cmd("INFO")
        .arg("server")
        .query_async(conn)
        .await
        .unwrap();
    info.lines()
        .find_map(|l| l.strip_prefix("uptime_in_seconds:"))
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

#[tokio::test]
async fn a_young_redis_is_not_read_as_no_load() {
    // A Redis that just (re)started may have lost what the sidecars reported:
    // values are refused until it has been up for `warmup`.
    let redis = RedisServer::start();
    let mut config = redis.config(test_config());
    config.engine.warmup = Some(Duration::from_secs(3));
    let store = redis_server::connect(&config).await.unwrap();
    ready_soon(&store).await;
    store
        .record(&app_pod("shop", "web-1", "web"), &[("f".into(), 5.0)])
        .await
        .unwrap();
    let early = store.values(&web_query("shop")).await;
    let early_summary = store.summary(&web_query("shop"), false).await;
    let early_pods = store.answer_pods("shop", None, None).await;
    let mut raw = redis.client().await;
    // Checked after the calls: if the server is still young now, it was then.
    if uptime_secs(&mut raw).await < 3 {
        let e = early.unwrap_err();
        assert!(e.to_string().contains("warming up"), "{e}");
        let e = early_summary.unwrap_err();
        assert!(e.to_string().contains("warming up"), "{e}");
        // Per-pod answers (the Custom Metrics API) are refused like sums.
        let e = early_pods.unwrap_err();
        assert!(e.to_string().contains("warming up"), "{e}");
    }
    // The debug view is not a scaling answer: it shows what is there.
    assert_eq!(store.pods("shop", None).await.unwrap().len(), 1);
    eventually(
        Duration::from_secs(10),
        "answers once Redis is old enough",
        || async {
            store
                .values(&web_query("shop"))
                .await
                .is_ok_and(|v| v == vec![5.0])
        },
    )
    .await;
}

fn selector_query(ns: &str, selector: &str) -> PodQuery {
    PodQuery {
        namespace: ns.into(),
        selector: PodSelector::Labels(activescale::selector::Selector::parse(selector).unwrap()),
        window: None,
    }
}

/// `summary` (from the group aggregates) must equal the per-pod answer.
async fn summary_agrees(store: &RedisStore, q: &PodQuery, what: &str) -> Summary {
    let grouped = store.summary(q, false).await.unwrap();
    let per_pod = Summary::of(&store.values(q).await.unwrap());
    assert_eq!(
        (grouped.count, grouped.sum),
        (per_pod.count, per_pod.sum),
        "{what}: {q:?}"
    );
    grouped
}

/// The group keys against the pods: every stored pod counted once, in its
/// identity's group, with its state's value.
async fn groups_are_exact(raw: &mut redis::aio::MultiplexedConnection, ns: &str) {
    let key = |k: &str| format!("{{activescale:{ns}}}:{k}");
    let seen: Vec<String> = redis::cmd("ZRANGE")
        .arg(key("seen"))
        .arg(0)
        .arg(-1)
        .query_async(raw)
        .await
        .unwrap();
    let hash = |k: &str| {
        let k = key(k);
        let mut raw = raw.clone();
        async move {
            redis::cmd("HGETALL")
                .arg(k)
                .query_async::<std::collections::HashMap<String, String>>(&mut raw)
                .await
                .unwrap()
        }
    };
    let (g, gl, gs, gc, id, st) = (
        hash("g").await,
        hash("gl").await,
        hash("gs").await,
        hash("gc").await,
        hash("id").await,
        hash("st").await,
    );
    assert_eq!(g.len(), seen.len(), "one group entry per stored pod");
    let mut sums = std::collections::HashMap::<String, f64>::new();
    let mut counts = std::collections::HashMap::<String, u64>::new();
    for pod in &seen {
        let (gid, v) = g[pod].split_once(' ').unwrap();
        let v: f64 = v.parse().unwrap();
        let state: Vec<String> = serde_json::from_str(&st[pod]).unwrap();
        assert_eq!(v, state[0].parse::<f64>().unwrap(), "value of {pod}");
        assert_eq!(gl[gid], id[pod], "group of {pod}");
        *sums.entry(gid.to_string()).or_default() += v;
        *counts.entry(gid.to_string()).or_default() += 1;
    }
    let stored_counts: std::collections::HashMap<String, u64> = gc
        .iter()
        .map(|(k, v)| (k.clone(), v.parse().unwrap()))
        .collect();
    let stored_sums: std::collections::HashMap<String, f64> = gs
        .iter()
        .map(|(k, v)| (k.clone(), v.parse().unwrap()))
        .collect();
    assert_eq!(stored_counts, counts, "counts per group");
    assert_eq!(stored_sums, sums, "sums per group");
    assert_eq!(gl.len(), counts.len(), "no group without pods");
}

/// Makes a stored pod look expired without waiting for its TTL.
async fn expire(raw: &mut redis::aio::MultiplexedConnection, ns: &str, pod: &str) {
    let _: i64 = redis::cmd("ZADD")
        .arg(format!("{{activescale:{ns}}}:seen"))
        .arg("XX")
        .arg(1)
        .arg(pod)
        .query_async(raw)
        .await
        .unwrap();
}

#[tokio::test]
async fn group_aggregates_do_not_drift() {
    let redis = RedisServer::start();
    let store = redis_server::connect(&redis.config(test_config()))
        .await
        .unwrap();
    ready_soon(&store).await;
    let mut raw = redis.client().await;
    type LabelSet = (
        &'static [(&'static str, &'static str)],
        Option<&'static str>,
    );
    let label_sets: [LabelSet; 4] = [
        (&[("app", "web"), ("tier", "front")], Some("web")),
        (&[("app", "web"), ("tier", "back")], Some("web")),
        (&[("app", "api")], Some("api")),
        (&[("app", "api")], None),
    ];
    let queries = [
        "app=web",
        "tier=front",
        "app=api",
        "!tier",
        "app",
        "app=none",
    ]
    .map(|s| selector_query("shop", s));
    // A fixed xorshift: the same operations on every run.
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut rnd = move |n: u64| {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state % n
    };
    let mut set_of = [0usize; 24];
    let mut watcher = None;
    for step in 0..600 {
        let i = rnd(24) as usize;
        let name = format!("p{i}");
        match rnd(10) {
            0..=6 => {
                if rnd(5) == 0 {
                    set_of[i] = rnd(4) as usize;
                }
                let (l, w) = label_sets[set_of[i]];
                let families: Vec<(String, f64)> = (0..rnd(3))
                    .map(|f| (format!("f{}", rnd(3) + f), rnd(20) as f64))
                    .collect();
                let pod = PodIdentity {
                    namespace: "shop".into(),
                    name,
                    workload: w.map(Into::into),
                    labels: Arc::new(
                        l.iter()
                            .map(|(k, v)| (k.to_string(), v.to_string()))
                            .collect(),
                    ),
                };
                store.record(&pod, &families).await.unwrap();
            }
            _ => expire(&mut raw, "shop", &name).await,
        }
        if step == 300 {
            // From here on the sweeper removes expired pods too, concurrently.
            watcher = Some(store.watch("shop"));
        }
        if step % 20 == 0 {
            for q in &queries {
                summary_agrees(&store, q, &format!("step {step}")).await;
            }
            groups_are_exact(&mut raw, "shop").await;
        }
    }
    drop(watcher);
    for q in &queries {
        summary_agrees(&store, q, "end").await;
    }
    groups_are_exact(&mut raw, "shop").await;
    let all = summary_agrees(&store, &selector_query("shop", "app"), "end").await;
    assert!(all.count > 0, "the operations left some pods alive");
}

#[tokio::test]
async fn groups_are_rebuilt_from_data_without_them() {
    let redis = RedisServer::start();
    let store = redis_server::connect(&redis.config(test_config()))
        .await
        .unwrap();
    ready_soon(&store).await;
    let mut raw = redis.client().await;
    for (i, v) in [3.0, 4.0, 5.0].into_iter().enumerate() {
        store
            .record(
                &app_pod("shop", &format!("web-{i}"), "web"),
                &[("f".into(), v)],
            )
            .await
            .unwrap();
    }
    let q = web_query("shop");
    let key = |k: &str| format!("{{activescale:shop}}:{k}");
    // A healthy namespace is answered from the groups: no per-pod read. (The
    // first call loads the scripts.)
    summary_agrees(&store, &q, "loads the scripts").await;
    let before = command_calls(&mut raw).await;
    assert_eq!(summary_agrees(&store, &q, "healthy").await.sum, 12.0);
    let after = command_calls(&mut raw).await;
    let delta = |c: &str| after.get(c).copied().unwrap_or(0) - before.get(c).copied().unwrap_or(0);
    // Two calls: summary (one EVALSHA) and values (read.lua, two HMGETs).
    assert_eq!(delta("evalsha"), 2);
    assert_eq!(delta("hmget"), 2, "only values reads pods");

    // Data of the previous version: pods without group keys.
    let _: i64 = redis::cmd("DEL")
        .arg(key("g"))
        .arg(key("gl"))
        .arg(key("gs"))
        .arg(key("gc"))
        .query_async(&mut raw)
        .await
        .unwrap();
    assert_eq!(summary_agrees(&store, &q, "without groups").await.sum, 12.0);
    groups_are_exact(&mut raw, "shop").await;

    // A writer of the previous version expires a pod without the groups.
    let _: i64 = redis::cmd("ZREM")
        .arg(key("seen"))
        .arg("web-0")
        .query_async(&mut raw)
        .await
        .unwrap();
    for k in ["id", "st", "h"] {
        let _: i64 = redis::cmd("HDEL")
            .arg(key(k))
            .arg("web-0")
            .query_async(&mut raw)
            .await
            .unwrap();
    }
    assert_eq!(
        summary_agrees(&store, &q, "removed without groups")
            .await
            .sum,
        9.0
    );
    groups_are_exact(&mut raw, "shop").await;

    // ... or changes a value without them: the next message heals the count,
    // even when it changes nothing itself.
    let _: i64 = redis::cmd("HSET")
        .arg(key("st"))
        .arg("web-1")
        .arg(r#"["9","f","9"]"#)
        .query_async(&mut raw)
        .await
        .unwrap();
    store
        .record(&app_pod("shop", "web-1", "web"), &[("f".into(), 9.0)])
        .await
        .unwrap();
    assert_eq!(summary_agrees(&store, &q, "value healed").await.sum, 14.0);
    groups_are_exact(&mut raw, "shop").await;
}

async fn hset(raw: &mut redis::aio::MultiplexedConnection, key: &str, field: &str, value: &str) {
    let _: i64 = redis::cmd("HSET")
        .arg(key)
        .arg(field)
        .arg(value)
        .query_async(raw)
        .await
        .unwrap();
}

/// What a version that did not check values could leave behind: a pod's
/// state holding `1e308` twice (its value inf), its group's sum NaN after
/// `inf - inf`, or a residue of fractions. The summary recounts such a
/// namespace from cleaned states; a message heals its own pod's state.
#[tokio::test]
async fn sums_poisoned_before_values_were_checked_heal() {
    let redis = RedisServer::start();
    let store = redis_server::connect(&redis.config(test_config()))
        .await
        .unwrap();
    ready_soon(&store).await;
    let mut raw = redis.client().await;
    for (i, v) in [3.0, 4.0].into_iter().enumerate() {
        store
            .record(
                &app_pod("shop", &format!("web-{i}"), "web"),
                &[("f".into(), v)],
            )
            .await
            .unwrap();
    }
    let q = web_query("shop");
    let key = |k: &str| format!("{{activescale:shop}}:{k}");
    let counted: String = redis::cmd("HGET")
        .arg(key("g"))
        .arg("web-0")
        .query_async(&mut raw)
        .await
        .unwrap();
    let gid = counted.split(' ').next().unwrap().to_string();

    hset(
        &mut raw,
        &key("st"),
        "web-0",
        r#"["inf","a","1e308","b","1e308","f","3"]"#,
    )
    .await;
    hset(&mut raw, &key("g"), "web-0", &format!("{gid} inf")).await;
    hset(&mut raw, &key("gs"), &gid, "nan").await;
    assert_eq!(summary_agrees(&store, &q, "NaN recounted").await.sum, 7.0);
    groups_are_exact(&mut raw, "shop").await;
    let web0 = &store.pods("shop", None).await.unwrap()[0];
    assert_eq!(
        web0.families,
        [("f".to_string(), 3.0)].into(),
        "inf dropped"
    );

    hset(&mut raw, &key("gs"), &gid, "7.0000000001").await;
    assert_eq!(
        summary_agrees(&store, &q, "residue recounted").await.sum,
        7.0
    );
    groups_are_exact(&mut raw, "shop").await;

    // A state with a fraction heals with the pod's next message, even one
    // that changes nothing.
    hset(
        &mut raw,
        &key("st"),
        "web-1",
        r#"["4.5","f","4","x","0.5"]"#,
    )
    .await;
    store
        .record(&app_pod("shop", "web-1", "web"), &[("f".into(), 4.0)])
        .await
        .unwrap();
    let web1 = &store.pods("shop", None).await.unwrap()[1];
    assert_eq!((web1.value, web1.families.len()), (4.0, 1));
    assert_eq!(summary_agrees(&store, &q, "state healed").await.sum, 7.0);
    groups_are_exact(&mut raw, "shop").await;
}

/// The address binding adds a compare per message, no write; a refused
/// message writes nothing at all.
#[tokio::test]
async fn the_address_binding_costs_no_write_per_message() {
    let redis = RedisServer::start();
    let store = redis_server::connect(&redis.config(test_config()))
        .await
        .unwrap();
    ready_soon(&store).await;
    let mut raw = redis.client().await;
    let p = app_pod("shop", "web-1", "web");
    let families = vec![("f".to_string(), 3.0)];
    let from = |peer: [u8; 4]| Ingest {
        pod: &p,
        families: &families,
        peer: Some(peer.into()),
        max_families: 64,
        replica: "activescale-0",
    };
    let stored = Ingested::Stored { refused: 0 };
    assert_eq!(store.ingest(&from([10, 0, 0, 1])).await.unwrap(), stored);
    let before = command_calls(&mut raw).await;
    for _ in 0..20 {
        assert_eq!(store.ingest(&from([10, 0, 0, 1])).await.unwrap(), stored);
    }
    let after = command_calls(&mut raw).await;
    let delta = |c: &str| after.get(c).copied().unwrap_or(0) - before.get(c).copied().unwrap_or(0);
    assert_eq!(delta("evalsha"), 20);
    assert_eq!(delta("hset") + delta("hsetnx"), 0);
    assert_eq!(delta("zadd"), 20);

    assert_eq!(
        store.ingest(&from([10, 0, 0, 2])).await.unwrap(),
        Ingested::BoundElsewhere {
            bound: [10, 0, 0, 1].into()
        }
    );
    let refused = command_calls(&mut raw).await;
    for c in ["zadd", "hset", "pexpire", "publish"] {
        assert_eq!(
            refused.get(c).copied().unwrap_or(0),
            after.get(c).copied().unwrap_or(0),
            "{c}"
        );
    }
}

/// What a replica of the previous version leaves during a rolling upgrade:
/// it removes expired pods without their `rep` field. The sweeper of this
/// version deletes such fields; a live pod's field stays.
#[tokio::test]
async fn replica_fields_of_pods_removed_by_an_older_writer_are_swept() {
    let redis = RedisServer::start();
    let store = redis_server::connect(&redis.config(test_config()))
        .await
        .unwrap();
    ready_soon(&store).await;
    let mut raw = redis.client().await;
    // The sweeper runs for watched namespaces only.
    let _watching = store.watch("shop");
    store
        .record(&app_pod("shop", "web-1", "web"), &[("f".into(), 1.0)])
        .await
        .unwrap();
    let rep = "{activescale:shop}:rep";
    hset(&mut raw, rep, "web-0", "activescale-old").await;
    let fields = |raw: &mut redis::aio::MultiplexedConnection| {
        let mut raw = raw.clone();
        async move {
            let mut f: Vec<String> = redis::cmd("HKEYS")
                .arg(rep)
                .query_async(&mut raw)
                .await
                .unwrap();
            f.sort();
            f
        }
    };
    eventually(Duration::from_secs(10), "the orphan field swept", || {
        let raw = raw.clone();
        async move { fields(&mut raw.clone()).await == ["web-1"] }
    })
    .await;
    let pods = store.pods("shop", None).await.unwrap();
    assert_eq!(pods.len(), 1);
    assert!(pods[0].replica.is_some(), "the live pod keeps its replica");
}

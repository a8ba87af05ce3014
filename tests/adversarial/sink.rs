//! What any meshed pod can push at the sink: values that lie, family floods,
//! identities it does not own, and the zeros proto3 encoders leave out. Each
//! runs against the real server with real gRPC sidecars and a real KEDA
//! client; where the store matters, once with the memory store and once with
//! a real `redis-server`.

use std::{
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use activescale::{
    config::Config,
    proto::{IsActiveResponse, ScaledObjectRef},
};
use envoy_types::pb::envoy::{
    config::core::v3::Node, service::metrics::v3::stream_metrics_message::Identifier,
};
use prost::Message;
use tonic::Streaming;

use crate::common::{builders::string, envoy::*, redis_server::RedisServer, *};

const WAIT: Duration = Duration::from_secs(30);

/// Which store a scenario runs against; `Redis` keeps its server alive.
enum Backend {
    Memory,
    Redis(Box<RedisServer>),
}

impl Backend {
    fn redis() -> Self {
        Backend::Redis(Box::new(RedisServer::start()))
    }

    fn config(&self) -> Config {
        match self {
            Backend::Memory => test_config(),
            Backend::Redis(r) => r.config(test_config()),
        }
    }

    async fn start(&self, tweak: impl FnOnce(&mut Config)) -> TestServer {
        let mut config = self.config();
        tweak(&mut config);
        start_server(config).await
    }
}

fn web(ns: &str) -> ScaledObjectRef {
    so_ref(
        ns,
        "web",
        &[
            ("scalerAddress", "activescale.keda:9090"),
            ("labelSelector", "app=web"),
            ("targetValue", "10"),
        ],
    )
}

fn node(ns: &str, pod: &str) -> Node {
    istio_node(ns, pod, &[("app", "web")], "web")
}

fn node_at(ip: &str, ns: &str, pod: &str) -> Node {
    istio_node_at(ip, ns, pod, &[("app", "web")], "web")
}

fn set_meta(node: &mut Node, key: &str, value: &str) {
    node.metadata
        .as_mut()
        .expect("istio nodes carry metadata")
        .fields
        .insert(key.into(), string(value));
}

fn loopback(last: u8) -> Option<IpAddr> {
    Some(IpAddr::from([127, 0, 0, last]))
}

/// Awaits GetMetrics of the `web` workload of `ns` reading exactly `want`.
async fn await_metric(server: &TestServer, ns: &str, want: f64) {
    let client = server.scaler_client().await;
    let r = web(ns);
    eventually(WAIT, &format!("GetMetrics {ns} = {want}"), || {
        let mut c = client.clone();
        let r = r.clone();
        async move { get_metric(&mut c, &r).await.ok() == Some(want) }
    })
    .await;
}

async fn metric(server: &TestServer, ns: &str) -> f64 {
    let mut client = server.scaler_client().await;
    get_metric(&mut client, &web(ns)).await.expect("GetMetrics")
}

/// Awaits `/metrics` holding the exposition line `line` (name, labels, value).
async fn await_exposition(server: &TestServer, line: &str) {
    let url = server.http_url("/metrics");
    let line = format!("{line}\n");
    eventually(WAIT, &line, || {
        let url = url.clone();
        let line = line.clone();
        async move { http_get(&url).await.1.contains(&line) }
    })
    .await;
}

fn rejected(n: usize) -> String {
    format!("activescale_sink_families_total{{outcome=\"rejected\"}} {n}")
}

fn refused(reason: &str, n: usize) -> String {
    format!("activescale_sink_identity_refused_total{{reason=\"{reason}\"}} {n}")
}

/// `/v1/pods` of `ns`, parsed.
async fn pods(server: &TestServer, ns: &str) -> serde_json::Value {
    let (status, body) = http_get(&server.http_url(&format!("/v1/pods?namespace={ns}"))).await;
    assert_eq!(status, 200, "{body}");
    serde_json::from_str(&body).expect("pods JSON")
}

async fn next_state(stream: &mut Streaming<IsActiveResponse>) -> bool {
    tokio::time::timeout(WAIT, stream.message())
        .await
        .expect("StreamIsActive message in time")
        .expect("stream ok")
        .expect("stream open")
        .result
}

// --- 3. Values that lie ------------------------------------------------------

/// A pod reports `1e308` on two ports, then `1e17`, then fractions and a value
/// past 1e9, next to an honest pod. Before: GetMetrics answered `inf`
/// (i64::MAX: the HPA's maximum), and with Redis the group sum became
/// `inf - inf = NaN` for good once the liar reported 0.
async fn lying_values(backend: Backend) {
    let server = backend.start(|_| {}).await;
    let mut liar = Sidecar::connect(server.sink, node("shop", "web-1")).await;
    let mut honest = Sidecar::connect(server.sink, node("shop", "web-2")).await;
    honest.push_gauges(&[(&inbound(8080), 3.0)]).await;
    // Good and bad families in one message: the good one is kept.
    liar.push_gauges(&[
        (&inbound(8080), 1e308),
        (&inbound(8081), 1e308),
        (&inbound(8082), 2.0),
    ])
    .await;
    await_metric(&server, "shop", 5.0).await;
    await_exposition(&server, &rejected(2)).await;

    // 1e17 would absorb the honest pod's 3 (1e17 + 3 == 1e17 in f64) and
    // take it away again with the next 0.
    liar.push_gauges(&[(&inbound(8080), 1e17)]).await;
    await_exposition(&server, &rejected(3)).await;
    liar.push_gauges(&[(&inbound(8080), 0.0), (&inbound(8082), 0.0)])
        .await;
    await_metric(&server, "shop", 3.0).await;

    // Fractions leave residues (0.1 + 0.2 - 0.3 != 0) that keep a workload
    // active; past 1e9 is no gauge Envoy reports.
    liar.push_gauges(&[
        (&inbound(8083), 0.1),
        (&inbound(8084), 0.2),
        (&inbound(8085), 2.5),
        (&inbound(8086), 1e9 + 1.0),
    ])
    .await;
    await_exposition(&server, &rejected(7)).await;
    // The bounds themselves are whole numbers in range: kept.
    honest.push_gauges(&[(&inbound(8080), 1e9)]).await;
    await_metric(&server, "shop", 1e9).await;
    honest.push_gauges(&[(&inbound(8080), 0.0)]).await;
    liar.push_gauges(&[(&inbound(8080), 0.0)]).await;
    await_metric(&server, "shop", 0.0).await;
    let answer = pods(&server, "shop").await;
    assert_eq!(answer["count"], 2, "{answer}");
    assert_eq!(answer["sum"], 0.0, "{answer}");
    for pod in answer["pods"].as_array().unwrap() {
        for (name, v) in pod["families"].as_object().unwrap() {
            assert_eq!(v.as_f64(), Some(0.0), "{name} of {pod}: nothing bad stored");
        }
    }
}

#[tokio::test]
async fn lying_values_are_rejected_and_never_stored_memory() {
    lying_values(Backend::Memory).await;
}

#[tokio::test]
async fn lying_values_are_rejected_and_never_stored_redis() {
    lying_values(Backend::redis()).await;
}

// --- 4. One message, 200,000 kept families -------------------------------------

/// A kept name of its own for each `i` (another listener address than
/// 0.0.0.0, so that no `i` is the sink's own excluded port).
fn numbered(i: usize) -> String {
    format!("http.inbound_10.1.2.3_{i};.downstream_rq_active")
}

/// One message with 200,000 kept families from one pod. Before: the merge was
/// quadratic under the memory store's write lock (or inside one Lua call),
/// every family was kept, and other namespaces' GetMetrics waited.
async fn family_flood(backend: Backend) {
    const FLOOD: usize = 200_000;
    const CAP: usize = 64;
    let server = backend.start(|_| {}).await;
    let mut calm = Sidecar::connect(server.sink, node("calm", "web-1")).await;
    calm.push_gauges(&[(&inbound(8080), 4.0)]).await;
    await_metric(&server, "calm", 4.0).await;

    let mut flood = Sidecar::connect(server.sink, node("flood", "web-1")).await;
    flood
        .push((0..FLOOD).map(|i| gauge(&numbered(i), 1.0)).collect())
        .await;
    // Another namespace is answered while the message is taken apart.
    assert_eq!(metric(&server, "calm").await, 4.0);
    await_exposition(&server, &rejected(FLOOD - CAP)).await;
    await_metric(&server, "flood", CAP as f64).await;
    let answer = pods(&server, "flood").await;
    let families = answer["pods"][0]["families"].as_object().unwrap();
    assert_eq!(families.len(), CAP, "kept families are capped");
    // The first ones in message order are the ones kept.
    assert!(families.contains_key(&numbered(0)), "{families:?}");
    assert!(families.contains_key(&numbered(CAP - 1)), "{families:?}");

    // Later messages: kept families go on updating, new ones stay out.
    flood
        .push_gauges(&[(&numbered(0), 5.0), (&numbered(FLOOD + 1), 1.0)])
        .await;
    await_metric(&server, "flood", (CAP - 1) as f64 + 5.0).await;
    await_exposition(&server, &rejected(FLOOD - CAP + 1)).await;
    assert_eq!(metric(&server, "calm").await, 4.0);
}

#[tokio::test]
async fn a_family_flood_is_capped_and_counted_memory() {
    family_flood(Backend::Memory).await;
}

#[tokio::test]
async fn a_family_flood_is_capped_and_counted_redis() {
    family_flood(Backend::redis()).await;
}

/// The same name twice in one message sets it twice (the last wins); it
/// must not add up. Before: the memory store summed both for a new pod.
async fn duplicates(backend: Backend) {
    let server = backend.start(|c| c.sink.max_families_per_pod = 2).await;
    let mut s = Sidecar::connect(server.sink, node("shop", "web-1")).await;
    s.push_gauges(&[
        (&inbound(8080), 3.0),
        (&inbound(8080), 4.0),
        (&inbound(8081), 1.0),
    ])
    .await;
    await_metric(&server, "shop", 5.0).await;
    // The configured cap: two families, a third name is refused.
    s.push_gauges(&[(&inbound(8082), 9.0), (&inbound(8081), 2.0)])
        .await;
    await_metric(&server, "shop", 6.0).await;
    await_exposition(&server, &rejected(1)).await;
    let answer = pods(&server, "shop").await;
    assert_eq!(
        answer["pods"][0]["families"].as_object().unwrap().len(),
        2,
        "{answer}"
    );
}

#[tokio::test]
async fn duplicate_families_set_once_and_the_cap_is_configurable_memory() {
    duplicates(Backend::Memory).await;
}

#[tokio::test]
async fn duplicate_families_set_once_and_the_cap_is_configurable_redis() {
    duplicates(Backend::redis()).await;
}

// --- 6. Identity is whatever a stream says ---------------------------------------

/// A second stream, from another address, claims a live pod. Before: it
/// silently overwrote the real pod's 10 with 0. With Redis the claim reaches
/// another replica than the real stream. After the real pod expires, the
/// name is free again (a StatefulSet pod back with a new IP).
async fn takeover(backend: Backend) {
    let ttl = |c: &mut Config| c.engine.pod_ttl = Duration::from_secs(5);
    let real_side = backend.start(ttl).await;
    let other_side = match backend {
        Backend::Memory => None,
        Backend::Redis(_) => Some(backend.start(ttl).await),
    };
    let claim_side = other_side.as_ref().unwrap_or(&real_side);

    let mut real = Sidecar::connect(real_side.sink, node("shop", "web-1")).await;
    real.push_gauges(&[(&inbound(8080), 10.0)]).await;
    await_metric(&real_side, "shop", 10.0).await;
    await_metric(claim_side, "shop", 10.0).await;

    let mut thief = Sidecar::connect_from(
        claim_side.sink,
        loopback(2),
        node_at("127.0.0.2", "shop", "web-1"),
    )
    .await;
    thief.push_gauges(&[(&inbound(8080), 0.0)]).await;
    await_exposition(claim_side, &refused("bound_elsewhere", 1)).await;
    real.push_gauges(&[(&inbound(8080), 10.0)]).await;
    assert_eq!(metric(claim_side, "shop").await, 10.0);
    assert_eq!(metric(&real_side, "shop").await, 10.0);

    // The real pod goes away; once it has expired, the new address binds.
    real.close().await.expect("clean close");
    let client = claim_side.scaler_client().await;
    let thief = tokio::sync::Mutex::new(thief);
    eventually(
        WAIT,
        "the expired pod's name taken by the new address",
        || {
            let mut c = client.clone();
            let thief = &thief;
            async move {
                thief
                    .lock()
                    .await
                    .push_gauges(&[(&inbound(8080), 7.0)])
                    .await;
                get_metric(&mut c, &web("shop")).await.ok() == Some(7.0)
            }
        },
    )
    .await;
}

#[tokio::test]
async fn a_live_pod_cannot_be_claimed_from_another_address_memory() {
    takeover(Backend::Memory).await;
}

#[tokio::test]
async fn a_live_pod_cannot_be_claimed_from_another_address_across_redis_replicas() {
    takeover(Backend::redis()).await;
}

#[tokio::test]
async fn the_node_id_ip_must_be_the_stream_address() {
    let server = start_server(test_config()).await;
    // From 127.0.0.1, claiming to be 10.0.0.9: refused, nothing stored.
    let mut liar = Sidecar::connect(server.sink, node_at("10.0.0.9", "shop", "web-1")).await;
    liar.push_gauges(&[(&inbound(8080), 5.0)]).await;
    await_exposition(&server, &refused("peer_address", 1)).await;
    liar.push_gauges(&[(&inbound(8080), 5.0)]).await;
    await_exposition(&server, &refused("peer_address", 2)).await;
    assert_eq!(pods(&server, "shop").await["count"], 0);

    // INSTANCE_IPS lists every IP of the pod (dual stack): one of them is enough.
    let mut n = node_at("10.0.0.9", "shop", "web-2");
    set_meta(&mut n, "INSTANCE_IPS", "10.0.0.9,127.0.0.1");
    let mut dual = Sidecar::connect(server.sink, n).await;
    dual.push_gauges(&[(&inbound(8080), 2.0)]).await;
    // An IPv4-mapped IPv6 address in the node id is the IPv4 address.
    let mut mapped =
        Sidecar::connect(server.sink, node_at("::ffff:127.0.0.1", "shop", "web-3")).await;
    mapped.push_gauges(&[(&inbound(8080), 3.0)]).await;
    await_metric(&server, "shop", 5.0).await;
    assert_eq!(pods(&server, "shop").await["count"], 2);
}

#[tokio::test]
async fn metadata_cannot_contradict_the_node_id() {
    let server = start_server(test_config()).await;
    // The node id says shop/web-1; the metadata claims a pod in `bank`.
    let mut n = node("shop", "web-1");
    set_meta(&mut n, "NAMESPACE", "bank");
    let mut s = Sidecar::connect(server.sink, n).await;
    s.push_gauges(&[(&inbound(8080), 5.0)]).await;
    let mut n = node("shop", "web-2");
    set_meta(&mut n, "NAME", "web-9");
    let mut t = Sidecar::connect(server.sink, n).await;
    t.push_gauges(&[(&inbound(8080), 5.0)]).await;
    await_exposition(&server, &refused("inconsistent", 2)).await;
    assert_eq!(pods(&server, "bank").await["count"], 0);
    assert_eq!(pods(&server, "shop").await["count"], 0);
}

#[tokio::test]
async fn ipv4_mapped_peer_addresses_are_their_ipv4_address() {
    // A dual-stack listener sees IPv4 peers as ::ffff:a.b.c.d.
    let mut config = test_config();
    config.servers.sink_addr = "[::]:0".parse().unwrap();
    let server = start_server(config).await;
    let sink = SocketAddr::from(([127, 0, 0, 1], server.sink.port()));
    let mut s = Sidecar::connect(sink, node("shop", "web-1")).await;
    s.push_gauges(&[(&inbound(8080), 6.0)]).await;
    await_metric(&server, "shop", 6.0).await;
}

#[tokio::test]
async fn with_the_peer_check_off_live_pods_stay_bound_to_their_first_address() {
    let mut config = test_config();
    config.sink.verify_peer_address = false;
    let server = start_server(config).await;
    // Behind address rewriting the node id's IP is not the peer: accepted.
    let mut real = Sidecar::connect(server.sink, node_at("10.0.0.1", "shop", "web-1")).await;
    real.push_gauges(&[(&inbound(8080), 10.0)]).await;
    await_metric(&server, "shop", 10.0).await;
    // Another connection address still cannot take the live pod over.
    let mut thief = Sidecar::connect_from(
        server.sink,
        loopback(3),
        node_at("10.0.0.1", "shop", "web-1"),
    )
    .await;
    thief.push_gauges(&[(&inbound(8080), 0.0)]).await;
    await_exposition(&server, &refused("bound_elsewhere", 1)).await;
    assert_eq!(metric(&server, "shop").await, 10.0);
}

// --- A gauge without its value field is 0 ---------------------------------------

/// The Prometheus client model as a proto3 encoder sees it (`double value = 1`
/// without `optional`): prost, like protoc's proto3 encoders, leaves a zero
/// out.
mod proto3 {
    use super::Identifier;

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct StreamMetricsMessage {
        #[prost(message, optional, tag = "1")]
        pub identifier: Option<Identifier>,
        #[prost(message, repeated, tag = "2")]
        pub envoy_metrics: Vec<MetricFamily>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct MetricFamily {
        #[prost(string, tag = "1")]
        pub name: String,
        #[prost(int32, tag = "3")]
        pub r#type: i32,
        #[prost(message, repeated, tag = "4")]
        pub metric: Vec<Metric>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Metric {
        #[prost(message, optional, tag = "2")]
        pub gauge: Option<Gauge>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Gauge {
        #[prost(double, tag = "1")]
        pub value: f64,
    }
}

fn proto3_message(node: Option<Node>, value: f64) -> Vec<u8> {
    proto3::StreamMetricsMessage {
        identifier: node.map(|n| Identifier { node: Some(n) }),
        envoy_metrics: vec![proto3::MetricFamily {
            name: inbound(8080),
            r#type: 1, // GAUGE
            metric: vec![proto3::Metric {
                gauge: Some(proto3::Gauge { value }),
            }],
        }],
    }
    .encode_to_vec()
}

#[tokio::test]
async fn a_gauge_without_its_value_field_is_zero() {
    assert!(
        proto3::Gauge { value: 0.0 }.encode_to_vec().is_empty(),
        "a proto3 encoder sends a zero gauge as an empty Gauge"
    );
    let mut config = test_config();
    // No expiry during the test: only the zero itself can turn it inactive.
    config.engine.pod_ttl = Duration::from_secs(3600);
    let server = start_server(config).await;
    let mut client = server.scaler_client().await;
    let mut active = client
        .stream_is_active(web("shop"))
        .await
        .unwrap()
        .into_inner();
    assert!(!next_state(&mut active).await, "nothing yet");

    let mut s = RawSidecar::connect(server.sink).await;
    s.push(proto3_message(Some(node("shop", "web-1")), 3.0))
        .await;
    assert!(next_state(&mut active).await, "3 requests in flight");
    assert_eq!(metric(&server, "shop").await, 3.0);
    // Before: `Gauge {}` read as "no value", the 3 stayed and the workload
    // never went inactive.
    s.push(proto3_message(None, 0.0)).await;
    assert!(!next_state(&mut active).await, "the zero is news");
    assert_eq!(metric(&server, "shop").await, 0.0);
    let answer = pods(&server, "shop").await;
    assert_eq!(answer["count"], 1, "the pod is there, at 0: {answer}");
    assert_eq!(answer["pods"][0]["value"], 0.0);
}

//! Message builders shared by the micro-benchmarks (`benches/micro.rs`) and
//! the load tool (`benches/load/`): what an Istio sidecar pushes, built
//! with Envoy's published protos (`envoy-types`) and encoded by prost.
#![allow(dead_code)]

#[path = "../../testkit/builders.rs"]
mod builders;

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::io::prometheus::client::{
    Bucket, Counter, Gauge, Histogram, Metric, MetricFamily, MetricType,
};
use prost::Message;

// Not every bench uses every builder.
#[allow(unused_imports)]
pub use builders::{inbound, istio_node, labels, message, so_ref};

/// Inbound ports whose `downstream_rq_active` the sink keeps, in order.
pub const KEPT_PORTS: [u16; 4] = [8080, 8081, 9080, 3000];

/// Envoy stamps every metric with the flush time.
const FLUSH_MS: i64 = 1_763_900_000_000;

fn metric(kind: MetricType, value: f64) -> Metric {
    let mut m = Metric {
        timestamp_ms: Some(FLUSH_MS),
        ..Default::default()
    };
    match kind {
        MetricType::Gauge => m.gauge = Some(Gauge { value: Some(value) }),
        MetricType::Counter => {
            m.counter = Some(Counter {
                value: Some(value),
                ..Default::default()
            })
        }
        _ => {
            // Envoy's histograms: cumulative counts per default bucket bound.
            const BOUNDS: [f64; 19] = [
                0.5, 1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0,
                10000.0, 30000.0, 60000.0, 300000.0, 600000.0, 1800000.0, 3600000.0,
            ];
            m.histogram = Some(Histogram {
                sample_count: Some(value as u64 * 19),
                sample_sum: Some(value * 123.0),
                bucket: BOUNDS
                    .iter()
                    .enumerate()
                    .map(|(i, b)| Bucket {
                        cumulative_count: Some(value as u64 * (i as u64 + 1)),
                        upper_bound: Some(*b),
                        ..Default::default()
                    })
                    .collect(),
                ..Default::default()
            });
        }
    }
    m
}

fn family(name: String, kind: MetricType, value: f64) -> MetricFamily {
    MetricFamily {
        name: Some(name),
        r#type: Some(kind as i32),
        metric: vec![metric(kind, value)],
        ..Default::default()
    }
}

/// A stats dump the way an Istio sidecar without a stats matcher pushes it:
/// `total` families (cluster, listener, http, server scopes; counters,
/// gauges and histograms), of which the inbound `downstream_rq_active` gauges
/// of `kept` (port, value) are the only ones the default filter keeps. Other
/// `downstream_rq_active` scopes (admin, agent, stats, outbound, the sink's
/// own port 9000) are present too, as in a real dump.
pub fn istio_families(total: usize, kept: &[(u16, f64)]) -> Vec<MetricFamily> {
    use MetricType::{Counter as C, Gauge as G, Histogram as H};
    let mut out = Vec::with_capacity(total);
    for &(port, value) in kept {
        out.push(family(inbound(port), G, value));
    }
    let fixed: &[(&str, MetricType)] = &[
        ("http.admin.downstream_rq_active", G),
        ("http.agent.downstream_rq_active", G),
        ("http.stats.downstream_rq_active", G),
        ("http.outbound_0.0.0.0_80;.downstream_rq_active", G),
        ("http.inbound_0.0.0.0_8080;.downstream_rq_total", C),
        ("http.inbound_0.0.0.0_8080;.downstream_rq_2xx", C),
        ("http.inbound_0.0.0.0_8080;.downstream_rq_5xx", C),
        ("http.inbound_0.0.0.0_8080;.downstream_cx_active", G),
        ("http.inbound_0.0.0.0_8080;.downstream_rq_time", H),
        ("http.outbound_0.0.0.0_80;.downstream_rq_total", C),
        ("http.outbound_0.0.0.0_80;.downstream_cx_active", G),
        ("listener.0.0.0.0_15006.downstream_cx_active", G),
        ("listener.0.0.0.0_15006.downstream_cx_total", C),
        ("listener.0.0.0.0_15006.downstream_cx_destroy", C),
        ("listener.0.0.0.0_15001.downstream_cx_active", G),
        ("listener.0.0.0.0_15001.downstream_cx_total", C),
        ("listener.0.0.0.0_15090.downstream_cx_active", G),
        ("listener.0.0.0.0_15021.downstream_cx_active", G),
        ("listener.admin.downstream_cx_active", G),
        ("listener_manager.total_listeners_active", G),
        ("listener_manager.lds.update_success", C),
        ("cluster_manager.active_clusters", G),
        ("cluster_manager.cds.update_success", C),
        ("server.live", G),
        ("server.uptime", G),
        ("server.memory_allocated", G),
        ("server.memory_heap_size", G),
        ("server.concurrency", G),
        ("server.total_connections", G),
        ("server.days_until_first_cert_expiring", G),
        ("runtime.num_keys", G),
        ("wasm.envoy.wasm.runtime.null.active", G),
        ("tcp.inbound_0.0.0.0_5432.downstream_cx_total", C),
    ];
    for (name, kind) in fixed {
        if out.len() == total {
            return out;
        }
        out.push(family(name.to_string(), *kind, 1.0));
    }
    // The bulk of a dump: every outbound cluster (one per Service in the
    // mesh) times ~40 stats.
    const CLUSTER_STATS: &[(&str, MetricType)] = &[
        ("upstream_cx_active", G),
        ("upstream_cx_total", C),
        ("upstream_cx_http2_total", C),
        ("upstream_cx_connect_fail", C),
        ("upstream_cx_connect_timeout", C),
        ("upstream_cx_destroy", C),
        ("upstream_cx_destroy_local", C),
        ("upstream_cx_destroy_remote", C),
        ("upstream_cx_rx_bytes_total", C),
        ("upstream_cx_tx_bytes_total", C),
        ("upstream_cx_rx_bytes_buffered", G),
        ("upstream_cx_tx_bytes_buffered", G),
        ("upstream_cx_none_healthy", C),
        ("upstream_cx_pool_overflow", C),
        ("upstream_rq_active", G),
        ("upstream_rq_total", C),
        ("upstream_rq_pending_active", G),
        ("upstream_rq_pending_total", C),
        ("upstream_rq_pending_overflow", C),
        ("upstream_rq_cancelled", C),
        ("upstream_rq_completed", C),
        ("upstream_rq_timeout", C),
        ("upstream_rq_retry", C),
        ("upstream_rq_retry_success", C),
        ("upstream_rq_retry_overflow", C),
        ("upstream_rq_per_try_timeout", C),
        ("upstream_rq_rx_reset", C),
        ("upstream_rq_tx_reset", C),
        ("upstream_rq_200", C),
        ("upstream_rq_2xx", C),
        ("upstream_rq_503", C),
        ("upstream_rq_5xx", C),
        ("upstream_rq_time", H),
        ("upstream_cx_length_ms", H),
        ("upstream_cx_connect_ms", H),
        ("membership_healthy", G),
        ("membership_total", G),
        ("membership_degraded", G),
        ("lb_healthy_panic", C),
        ("circuit_breakers.default.cx_open", G),
    ];
    let mut service = 0;
    while out.len() < total {
        let cluster = match service {
            0 => "inbound|8080||".to_string(),
            1 => "PassthroughCluster".to_string(),
            2 => "BlackHoleCluster".to_string(),
            3 => "xds-grpc".to_string(),
            n => format!("outbound|80||svc-{n}.shop-{}.svc.cluster.local", n % 7),
        };
        for (stat, kind) in CLUSTER_STATS {
            if out.len() == total {
                break;
            }
            out.push(family(
                format!("cluster.{cluster}.{stat}"),
                *kind,
                (service % 13) as f64,
            ));
        }
        service += 1;
    }
    out
}

/// The first `k` kept gauges (k ≤ 4), each with `value`.
pub fn kept(k: usize, value: f64) -> Vec<(u16, f64)> {
    KEPT_PORTS.iter().take(k).map(|p| (*p, value)).collect()
}

/// The labels of a pod of `app`, as a Deployment in a meshed namespace has them.
pub fn pod_labels(app: &str) -> [(&str, &str); 6] {
    [
        ("app", app),
        ("version", "v1"),
        ("pod-template-hash", "7d9c5b8f6"),
        ("security.istio.io/tlsMode", "istio"),
        ("service.istio.io/canonical-name", app),
        ("service.istio.io/canonical-revision", "v1"),
    ]
}

/// The node of pod `pod` of `app` (labels [`pod_labels`], workload `app`),
/// at `builders::POD_IP`, where the load tool connects from.
pub fn sidecar_node(namespace: &str, pod: &str, app: &str) -> Node {
    istio_node(namespace, pod, &pod_labels(app), app)
}

/// A whole message, encoded.
pub fn encode(node: Option<Node>, families: Vec<MetricFamily>) -> Vec<u8> {
    message(node, families).encode_to_vec()
}

/// Protobuf messages concatenate: the identifier field of a message alone.
/// `identifier_field(node) ++ encode(None, families)` is the encoding of the
/// message with both, so a load generator encodes the shared families once.
pub fn identifier_field(node: Node) -> Vec<u8> {
    encode(Some(node), Vec::new())
}

//! Builders for the inputs tests and benches feed activescale: trigger
//! metadata, KEDA's ScaledObjectRef, pod identities, and the Envoy node an
//! Istio sidecar identifies itself with.
//!
//! One plain file so that every kind of target can include it: the unit tests
//! (`src/lib.rs`, where `activescale` names the crate itself), the integration
//! tests (`tests/common`) and the benches (`benches/common`).
#![allow(dead_code)]

use std::{collections::HashMap, sync::Arc};

use activescale::{proto::ScaledObjectRef, selector::Labels, store::PodIdentity};
use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::metrics::v3::{
    StreamMetricsMessage, stream_metrics_message::Identifier,
};
use envoy_types::pb::google::protobuf::{Struct, Value, value::Kind};
use envoy_types::pb::io::prometheus::client::MetricFamily;

/// Trigger metadata from pairs.
pub fn meta(pairs: &[(&str, &str)]) -> HashMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// A label set from pairs.
pub fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// A ScaledObjectRef as KEDA sends it.
pub fn so_ref(namespace: &str, name: &str, pairs: &[(&str, &str)]) -> ScaledObjectRef {
    ScaledObjectRef {
        name: name.into(),
        namespace: namespace.into(),
        scaler_metadata: meta(pairs),
    }
}

/// A pod as the sink learns it from a node.
pub fn pod(
    namespace: &str,
    name: &str,
    labels: &[(&str, &str)],
    workload: Option<&str>,
) -> PodIdentity {
    PodIdentity {
        namespace: namespace.into(),
        name: name.into(),
        workload: workload.map(Into::into),
        labels: Arc::new(self::labels(labels)),
    }
}

/// A pod of workload `app` labelled `app=<app>`, the shape most tests query.
pub fn app_pod(namespace: &str, name: &str, app: &str) -> PodIdentity {
    pod(namespace, name, &[("app", app)], Some(app))
}

/// A protobuf string value.
pub fn string(v: &str) -> Value {
    Value {
        kind: Some(Kind::StringValue(v.into())),
    }
}

/// A node with `id` and these metadata fields, nothing else.
pub fn node(id: &str, fields: Vec<(&str, Value)>) -> Node {
    Node {
        id: id.into(),
        metadata: Some(Struct {
            fields: fields
                .into_iter()
                .map(|(k, v)| (k.to_string(), v))
                .collect(),
        }),
        ..Default::default()
    }
}

/// The pod IP in the node ids of [`istio_node`]: where the fake sidecars and
/// the load tool connect from, as a pod's Envoy connects from its pod IP (the
/// sink checks the two agree unless `sink_verify_peer_address` is off).
pub const POD_IP: &str = "127.0.0.1";

/// A node as Istio sends it: sidecar id, NAME/NAMESPACE/WORKLOAD_NAME/LABELS
/// and the mesh fields the sink does not read, for a pod at [`POD_IP`].
pub fn istio_node(namespace: &str, pod: &str, labels: &[(&str, &str)], workload: &str) -> Node {
    istio_node_at(POD_IP, namespace, pod, labels, workload)
}

/// [`istio_node`] for a pod at `ip`.
pub fn istio_node_at(
    ip: &str,
    namespace: &str,
    pod: &str,
    labels: &[(&str, &str)],
    workload: &str,
) -> Node {
    let labels = Struct {
        fields: labels
            .iter()
            .map(|(k, v)| (k.to_string(), string(v)))
            .collect(),
    };
    Node {
        cluster: format!("{workload}.{namespace}"),
        ..node(
            &format!("sidecar~{ip}~{pod}.{namespace}~{namespace}.svc.cluster.local"),
            vec![
                ("NAME", string(pod)),
                ("NAMESPACE", string(namespace)),
                ("WORKLOAD_NAME", string(workload)),
                ("CLUSTER_ID", string("Kubernetes")),
                ("MESH_ID", string("cluster.local")),
                (
                    "LABELS",
                    Value {
                        kind: Some(Kind::StructValue(labels)),
                    },
                ),
            ],
        )
    }
}

/// One sidecar message: the identifier (Envoy sends it on the first message
/// of a stream only) and the families.
pub fn message(node: Option<Node>, families: Vec<MetricFamily>) -> StreamMetricsMessage {
    StreamMetricsMessage {
        identifier: node.map(|n| Identifier { node: Some(n) }),
        envoy_metrics: families,
    }
}

/// The inbound `downstream_rq_active` gauge of `port`, in the recent (`;`)
/// form: the stat the sink keeps by default.
pub fn inbound(port: u16) -> String {
    format!("http.inbound_0.0.0.0_{port};.downstream_rq_active")
}

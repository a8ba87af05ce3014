//! A fake Istio sidecar: a real gRPC client generated from Envoy's published
//! protos (`envoy-types`), holding one `StreamMetrics` stream the way Envoy
//! does, with the identifier on the first message only.

use std::{future::Future, net::SocketAddr, time::Duration};

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::metrics::v3::{
    StreamMetricsMessage, StreamMetricsResponse, metrics_service_client::MetricsServiceClient,
    stream_metrics_message::Identifier,
};
use envoy_types::pb::google::protobuf::{Struct, Value, value::Kind};
use envoy_types::pb::io::prometheus::client::{Gauge, Metric, MetricFamily, MetricType};
use tokio::{sync::mpsc, task::JoinHandle};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Response, Status};

pub struct Sidecar {
    tx: Option<mpsc::Sender<StreamMetricsMessage>>,
    identifier: Option<Identifier>,
    pub task: JoinHandle<Result<Response<StreamMetricsResponse>, Status>>,
}

impl Sidecar {
    /// Opens a stream; `node` is sent with the first message.
    pub async fn connect(sink: SocketAddr, node: Node) -> Self {
        let mut client = MetricsServiceClient::connect(format!("http://{sink}"))
            .await
            .expect("connect to sink")
            .max_encoding_message_size(64 << 20);
        let (tx, rx) = mpsc::channel(16);
        let task =
            tokio::spawn(async move { client.stream_metrics(ReceiverStream::new(rx)).await });
        Self {
            tx: Some(tx),
            identifier: Some(Identifier { node: Some(node) }),
            task,
        }
    }

    /// Pushes one message with these families (gauges).
    pub async fn push(&mut self, families: Vec<MetricFamily>) {
        let msg = StreamMetricsMessage {
            identifier: self.identifier.take(),
            envoy_metrics: families,
        };
        self.tx
            .as_ref()
            .expect("stream open")
            .send(msg)
            .await
            .expect("sink stream closed");
    }

    /// Pushes gauges given as (stat name, value).
    pub async fn push_gauges(&mut self, gauges: &[(&str, f64)]) {
        self.push(gauges.iter().map(|(n, v)| gauge(n, *v)).collect())
            .await;
    }

    /// Ends the stream the way Envoy does on shutdown (half-close).
    pub async fn close(mut self) -> Result<Response<StreamMetricsResponse>, Status> {
        self.tx.take();
        self.task.await.expect("sidecar task")
    }
}

/// The inbound gauge of `port`, in the recent (`;`) form.
pub fn inbound(port: u16) -> String {
    format!("http.inbound_0.0.0.0_{port};.downstream_rq_active")
}

pub fn gauge(name: &str, value: f64) -> MetricFamily {
    MetricFamily {
        name: Some(name.into()),
        r#type: Some(MetricType::Gauge as i32),
        metric: vec![Metric {
            gauge: Some(Gauge { value: Some(value) }),
            ..Default::default()
        }],
        ..Default::default()
    }
}

fn string(v: &str) -> Value {
    Value {
        kind: Some(Kind::StringValue(v.into())),
    }
}

/// A node as Istio sends it: sidecar id plus NAME/NAMESPACE/LABELS/WORKLOAD_NAME.
pub fn istio_node(namespace: &str, pod: &str, labels: &[(&str, &str)], workload: &str) -> Node {
    let labels = Struct {
        fields: labels
            .iter()
            .map(|(k, v)| (k.to_string(), string(v)))
            .collect(),
    };
    Node {
        id: format!("sidecar~10.0.0.1~{pod}.{namespace}~{namespace}.svc.cluster.local"),
        metadata: Some(Struct {
            fields: [
                ("NAME".to_string(), string(pod)),
                ("NAMESPACE".to_string(), string(namespace)),
                ("WORKLOAD_NAME".to_string(), string(workload)),
                (
                    "LABELS".to_string(),
                    Value {
                        kind: Some(Kind::StructValue(labels)),
                    },
                ),
            ]
            .into_iter()
            .collect(),
        }),
        ..Default::default()
    }
}

/// Awaits `check` becoming true, re-evaluating every few milliseconds; panics
/// after `limit`. For conditions that are only observable from outside (a
/// value over gRPC), this is the event wait.
pub async fn eventually<F, Fut>(limit: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if check().await {
            return;
        }
        if tokio::time::Instant::now() > deadline {
            panic!("timed out waiting for: {what}");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

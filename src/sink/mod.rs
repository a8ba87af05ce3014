//! The Envoy metrics sink: `envoy.service.metrics.v3.MetricsService/StreamMetrics`.
//!
//! Each sidecar holds one stream and pushes a message every stats flush. The
//! first message names the pod ([`identity`]); every message carries ~600
//! stat families, of which [`names`] keeps the inbound `downstream_rq_active`
//! gauges and [`wire`] decodes only those. The result goes to the store. A bad
//! message ends its own stream and nothing else; a store failure is counted
//! and the stream goes on (the next flush will try again). [`grpc`] frames
//! the method itself, so an idle stream holds no buffer between flushes.
//!
//! What a stream may claim is bounded: values must be gauges (whole numbers
//! in `[0, 1e9]`), a pod holds at most `max_families_per_pod` families, and
//! its identity is tied to the connection. The node id names the pod; with
//! `sink_verify_peer_address` (the default) the stream must come from the IP
//! the node id (or `INSTANCE_IPS`) gives, as a sidecar's Envoy does; and the
//! store keeps a live pod bound to the address it was first seen from, so a
//! second stream from elsewhere cannot overwrite it. Without the Kubernetes
//! API nothing proves that an IP belongs to the pod it names: a pod can
//! still report an invented pod from its own IP, but not take over a live
//! one. Refusals are counted by reason and logged at most every 10 s.

pub mod grpc;
pub mod identity;
pub mod names;
pub mod wire;

use std::{
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use envoy_types::pb::envoy::{
    config::core::v3::Node, service::metrics::v3::stream_metrics_message::Identifier,
};
use prost::Message;
use tokio_util::sync::CancellationToken;
use tonic::Status;
use tracing::{Instrument, debug, field, info_span, warn};

use crate::{
    config::SinkConfig,
    store::{Ingest, Ingested, PodIdentity, SharedStore},
    telemetry::{Metrics, RateLimit, ReasonLabel},
};
use identity::IdentityError;
use names::NameFilter;
use wire::{KeptFamily, RawMessage};

pub use grpc::{Budget, MetricsServiceServer, PeerShares, ReadLimits};
use grpc::{Messages, ReadError};

/// gRPC service name, for the health reporter.
pub const SERVICE_NAME: &str = "envoy.service.metrics.v3.MetricsService";

static MALFORMED_LOG: RateLimit = RateLimit::new(Duration::from_secs(10));
static IDENTITY_LOG: RateLimit = RateLimit::new(Duration::from_secs(10));
static PEER_LOG: RateLimit = RateLimit::new(Duration::from_secs(10));
static BOUND_LOG: RateLimit = RateLimit::new(Duration::from_secs(10));
static STORE_LOG: RateLimit = RateLimit::new(Duration::from_secs(10));
static REJECTED_LOG: RateLimit = RateLimit::new(Duration::from_secs(10));

/// What the sink takes from the config.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SinkSettings {
    /// `max_families_per_pod`.
    pub max_families_per_pod: usize,
    /// `sink_verify_peer_address`.
    pub verify_peer_address: bool,
}

impl SinkSettings {
    pub fn from_config(config: &SinkConfig) -> Self {
        Self {
            max_families_per_pod: config.max_families_per_pod,
            verify_peer_address: config.verify_peer_address,
        }
    }
}

/// The sink service; one per process, shared by every stream.
#[derive(Clone)]
pub struct Sink {
    store: SharedStore,
    filter: Arc<NameFilter>,
    /// This replica's name, written with every pod (the stream's replica).
    replica: Arc<str>,
    settings: SinkSettings,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
}

/// Who a stream is, as far as the sink is concerned.
enum Claim {
    /// No identifier yet, or one that names no pod.
    Unknown,
    /// A pod the stream may not speak for; the reason is the metric label.
    Refused(&'static str),
    Pod(PodIdentity),
}

/// The state of one stream between its messages.
struct Stream {
    /// The peer's IP, IPv4-mapped IPv6 as IPv4: what node ids are compared
    /// with and pods are bound to.
    peer: Option<IpAddr>,
    claim: Claim,
    /// Reused for every message of the stream.
    kept: Vec<KeptFamily>,
}

impl Sink {
    pub fn new(
        store: SharedStore,
        filter: NameFilter,
        replica: Arc<str>,
        settings: SinkSettings,
        metrics: Arc<Metrics>,
        shutdown: CancellationToken,
    ) -> Self {
        Self {
            store,
            filter: Arc::new(filter),
            replica,
            settings,
            metrics,
            shutdown,
        }
    }

    /// Handles one message. `Err` ends the stream.
    async fn handle(
        &self,
        raw: &RawMessage,
        stream: &mut Stream,
        span: &tracing::Span,
    ) -> Result<(), StreamError> {
        self.metrics.sink_messages.inc();
        let mut skipped = Vec::new();
        let parsed = match wire::parse(
            &raw.0,
            &self.filter,
            self.settings.max_families_per_pod,
            &mut stream.kept,
            &mut skipped,
        ) {
            Ok(p) => p,
            Err(e) => return Err(StreamError::Malformed(e.to_string())),
        };
        if let Some(bytes) = parsed.identifier {
            let node = Identifier::decode(bytes)
                .map_err(|e| StreamError::Malformed(format!("identifier: {e}")))?
                .node
                .unwrap_or_default();
            stream.claim = self.identify(&node, stream.peer, span);
        }
        for name in &skipped {
            debug!(name = %String::from_utf8_lossy(name), "skipping metric name");
        }
        let total = parsed.families;
        let pod = match &stream.claim {
            Claim::Pod(pod) => pod,
            Claim::Unknown => {
                self.metrics.sink_identity_missing.inc();
                self.metrics.family("skipped").inc_by(total);
                if let Some(held_back) = IDENTITY_LOG.check() {
                    warn!(held_back, "missing pod identity: message dropped");
                }
                return Ok(());
            }
            Claim::Refused(reason) => {
                self.count_refused(reason);
                self.metrics.family("skipped").inc_by(total);
                return Ok(());
            }
        };
        if let Some((name, why)) = parsed.first_rejected
            && let Some(held_back) = REJECTED_LOG.check()
        {
            warn!(
                name = %String::from_utf8_lossy(name),
                reason = ?why,
                rejected = parsed.rejected,
                held_back,
                "rejected metric families (values must be whole numbers in [0, 1e9]; \
                 at most max_families_per_pod families per pod)"
            );
        }
        let mut samples: Vec<(String, f64)> =
            stream.kept.drain(..).map(|f| (f.name, f.value)).collect();
        // The order the stores merge in; a few names, no repeats (wire::parse).
        samples.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        let ingest = Ingest {
            pod,
            families: &samples,
            peer: stream.peer,
            max_families: self.settings.max_families_per_pod,
            replica: &self.replica,
        };
        let (kept, rejected) = match self.store.ingest(&ingest).await {
            Ok(Ingested::Stored { refused }) => {
                if refused > 0
                    && let Some(held_back) = REJECTED_LOG.check()
                {
                    warn!(
                        refused,
                        held_back,
                        "rejected new metric families: the pod already holds max_families_per_pod"
                    );
                }
                debug!(
                    families = samples.len() as u64 - refused,
                    refused, "stored active_requests"
                );
                (samples.len() as u64 - refused, parsed.rejected + refused)
            }
            Ok(Ingested::BoundElsewhere { bound }) => {
                self.count_refused("bound_elsewhere");
                self.metrics.family("skipped").inc_by(total);
                if let Some(held_back) = BOUND_LOG.check() {
                    warn!(
                        bound = %bound,
                        peer = ?stream.peer,
                        held_back,
                        "pod identity refused: the pod is live and bound to the address it was \
                         first seen from, until it expires (pod_ttl); message dropped"
                    );
                }
                return Ok(());
            }
            Err(e) => {
                self.metrics.sink_store_errors.inc();
                if let Some(held_back) = STORE_LOG.check() {
                    warn!(error = %e, held_back, "could not store active_requests");
                }
                (samples.len() as u64, parsed.rejected)
            }
        };
        self.metrics.family("kept").inc_by(kept);
        self.metrics.family("rejected").inc_by(rejected);
        self.metrics
            .family("skipped")
            .inc_by(total.saturating_sub(kept + rejected));
        Ok(())
    }

    /// Decides who a stream speaks for, from its node and its peer address.
    fn identify(&self, node: &Node, peer: Option<IpAddr>, span: &tracing::Span) -> Claim {
        let claimed = match identity::from_node(node) {
            Ok(c) => c,
            Err(e @ IdentityError::Inconsistent { .. }) => {
                if let Some(held_back) = IDENTITY_LOG.check() {
                    warn!(error = %e, held_back, "pod identity refused");
                }
                return Claim::Refused("inconsistent");
            }
            Err(e) => {
                if let Some(held_back) = IDENTITY_LOG.check() {
                    warn!(error = %e, held_back, "missing pod identity");
                }
                return Claim::Unknown;
            }
        };
        let id = &claimed.identity;
        span.record("namespace", id.namespace.as_str());
        span.record("pod", id.name.as_str());
        if self.settings.verify_peer_address && !claimed.is_at(peer) {
            if let Some(held_back) = PEER_LOG.check() {
                warn!(
                    claimed = ?claimed.ips,
                    peer = ?peer,
                    held_back,
                    "pod identity refused: the stream does not come from the pod IP its node \
                     id or INSTANCE_IPS name. If something between the sidecars and the sink \
                     rewrites source addresses, set sink_verify_peer_address=false \
                     (ACTIVESCALE_SINK_VERIFY_PEER_ADDRESS). The scaler's own sidecar does \
                     when it captures the sink port (peers are then 127.0.0.6): exclude the \
                     port from it instead, as the chart does"
                );
            }
            return Claim::Refused("peer_address");
        }
        debug!(workload = ?id.workload, labels = id.labels.len(), "pod identified");
        Claim::Pod(claimed.identity)
    }

    fn count_refused(&self, reason: &'static str) {
        self.metrics
            .sink_identity_refused
            .get_or_create(&ReasonLabel { reason })
            .inc();
    }

    /// Counts and logs why a stream ends, and gives its final status.
    fn end(&self, e: StreamError) -> Status {
        let reason = e.reason();
        self.count_stream_error(reason);
        if reason == "disconnected" {
            // The peer went away (reset, broken connection): a normal end.
            debug!(error = %e, "stream broken");
        } else if let Some(held_back) = MALFORMED_LOG.check() {
            warn!(error = %e, held_back, reason, "bad metrics message: ending stream");
        }
        status_of(e)
    }

    fn count_stream_error(&self, reason: &'static str) {
        self.metrics
            .sink_stream_errors
            .get_or_create(&ReasonLabel { reason })
            .inc();
    }
}

/// Why a sidecar stream ends before its client ends it.
#[derive(Debug, thiserror::Error)]
enum StreamError {
    #[error(transparent)]
    Read(ReadError),
    #[error("malformed StreamMetricsMessage: {0}")]
    Malformed(String),
}

impl StreamError {
    /// The `reason` label of `activescale_sink_stream_errors_total`.
    fn reason(&self) -> &'static str {
        match self {
            StreamError::Read(ReadError::Oversized { .. }) => "oversized",
            StreamError::Read(ReadError::Stalled(..) | ReadError::TooSlow { .. }) => "stalled",
            StreamError::Read(ReadError::Broken(_)) => "disconnected",
            StreamError::Read(ReadError::Compressed(_) | ReadError::Truncated)
            | StreamError::Malformed(_) => "malformed",
        }
    }
}

/// The one mapping from sink errors to the stream's final gRPC status.
fn status_of(e: StreamError) -> Status {
    match e {
        StreamError::Read(ReadError::Oversized { .. }) => Status::out_of_range(e.to_string()),
        StreamError::Read(ReadError::Stalled(..) | ReadError::TooSlow { .. }) => {
            Status::resource_exhausted(e.to_string())
        }
        // The client's own status, as it broke the stream.
        StreamError::Read(ReadError::Broken(status)) => status,
        StreamError::Read(ReadError::Compressed(_) | ReadError::Truncated) => {
            Status::invalid_argument(format!("malformed StreamMetricsMessage: {e}"))
        }
        StreamError::Malformed(_) => Status::invalid_argument(e.to_string()),
    }
}

/// Keeps the open-streams gauge right however a stream ends.
struct StreamGuard<'a>(&'a Metrics);

impl Drop for StreamGuard<'_> {
    fn drop(&mut self) {
        self.0.sink_streams.dec();
    }
}

impl Sink {
    /// Serves one sidecar stream until it ends. `Err` is the stream's final status.
    async fn stream_metrics(
        self,
        mut messages: Messages,
        peer: Option<SocketAddr>,
    ) -> Result<(), Status> {
        let span = info_span!(
            "envoy_stream",
            peer = ?peer,
            namespace = field::Empty,
            pod = field::Empty
        );
        async move {
            self.metrics.sink_streams.inc();
            let _guard = StreamGuard(&self.metrics);
            debug!("stream opened");
            let mut stream = Stream {
                peer: peer.map(|p| p.ip().to_canonical()),
                claim: Claim::Unknown,
                kept: Vec::new(),
            };
            loop {
                let next = tokio::select! {
                    _ = self.shutdown.cancelled() => break,
                    next = messages.next() => next,
                };
                let raw = match next {
                    Ok(Some(raw)) => raw,
                    Ok(None) => break,
                    Err(e) => return Err(self.end(StreamError::Read(e))),
                };
                let span = tracing::Span::current();
                if let Err(e) = self.handle(&RawMessage(raw), &mut stream, &span).await {
                    return Err(self.end(e));
                }
            }
            debug!("stream closed");
            // The pod is not deleted: its next stream may already be on
            // another replica; the TTL retires it if it is really gone.
            Ok(())
        }
        .instrument(span)
        .await
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tonic::Code;

    use super::*;

    #[test]
    fn every_stream_error_has_one_status_and_one_reason() {
        let cases = [
            (
                StreamError::Read(ReadError::Oversized { len: 9, max: 1 }),
                Code::OutOfRange,
                "oversized",
            ),
            (
                StreamError::Read(ReadError::Stalled(Duration::from_secs(10), 5)),
                Code::ResourceExhausted,
                "stalled",
            ),
            (
                StreamError::Read(ReadError::TooSlow {
                    len: 1 << 24,
                    arrived: 0,
                    timeout: Duration::from_secs(10),
                }),
                Code::ResourceExhausted,
                "stalled",
            ),
            (
                StreamError::Read(ReadError::Compressed(1)),
                Code::InvalidArgument,
                "malformed",
            ),
            (
                StreamError::Read(ReadError::Truncated),
                Code::InvalidArgument,
                "malformed",
            ),
            (
                StreamError::Malformed("bad tag".into()),
                Code::InvalidArgument,
                "malformed",
            ),
            (
                StreamError::Read(ReadError::Broken(Status::cancelled("reset"))),
                Code::Cancelled,
                "disconnected",
            ),
        ];
        for (e, code, reason) in cases {
            assert_eq!(e.reason(), reason, "{e}");
            let status = status_of(e);
            assert_eq!(status.code(), code, "{status:?}");
        }
        let status = status_of(StreamError::Read(ReadError::Truncated));
        assert!(
            status
                .message()
                .starts_with("malformed StreamMetricsMessage: "),
            "{status:?}"
        );
    }
}

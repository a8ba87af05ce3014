//! The Envoy metrics sink: `envoy.service.metrics.v3.MetricsService/StreamMetrics`.
//!
//! Each sidecar holds one stream and pushes a message every stats flush. The
//! first message names the pod ([`identity`]); every message carries ~600
//! stat families, of which [`names`] keeps the inbound `downstream_rq_active`
//! gauges and [`wire`] decodes only those. The result goes to the store. A bad
//! message ends its own stream and nothing else; a store failure is counted
//! and the stream goes on (the next flush will try again). [`grpc`] frames
//! the method itself, so an idle stream holds no buffer between flushes.

pub mod grpc;
pub mod identity;
pub mod names;
pub mod wire;

use std::{net::SocketAddr, sync::Arc, time::Duration};

use envoy_types::pb::envoy::service::metrics::v3::stream_metrics_message::Identifier;
use prost::Message;
use tokio_util::sync::CancellationToken;
use tonic::Status;
use tracing::{Instrument, debug, field, info_span, warn};

use crate::{
    store::{PodIdentity, SharedStore},
    telemetry::{Metrics, RateLimit, ReasonLabel},
};
use names::NameFilter;
use wire::{KeptFamily, RawMessage};

pub use grpc::MetricsServiceServer;
use grpc::{Messages, ReadError};

/// gRPC service name, for the health reporter.
pub const SERVICE_NAME: &str = "envoy.service.metrics.v3.MetricsService";

static MALFORMED_LOG: RateLimit = RateLimit::new(Duration::from_secs(10));
static IDENTITY_LOG: RateLimit = RateLimit::new(Duration::from_secs(10));
static STORE_LOG: RateLimit = RateLimit::new(Duration::from_secs(10));
static REJECTED_LOG: RateLimit = RateLimit::new(Duration::from_secs(10));

/// The sink service; one per process, shared by every stream.
#[derive(Clone)]
pub struct Sink {
    store: SharedStore,
    filter: Arc<NameFilter>,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
}

impl Sink {
    pub fn new(
        store: SharedStore,
        filter: NameFilter,
        metrics: Arc<Metrics>,
        shutdown: CancellationToken,
    ) -> Self {
        Self {
            store,
            filter: Arc::new(filter),
            metrics,
            shutdown,
        }
    }

    /// Handles one message. `Err` ends the stream.
    async fn handle(
        &self,
        raw: &RawMessage,
        identity: &mut Option<PodIdentity>,
        kept: &mut Vec<KeptFamily>,
        span: &tracing::Span,
    ) -> Result<(), Status> {
        self.metrics.sink_messages.inc();
        let mut skipped = Vec::new();
        let parsed = match wire::parse(&raw.0, &self.filter, kept, &mut skipped) {
            Ok(p) => p,
            Err(e) => return Err(self.malformed(e.to_string())),
        };
        if let Some(bytes) = parsed.identifier {
            let node = Identifier::decode(bytes)
                .map_err(|e| self.malformed(format!("identifier: {e}")))?
                .node
                .unwrap_or_default();
            match identity::from_node(&node) {
                Ok(id) => {
                    span.record("namespace", id.namespace.as_str());
                    span.record("pod", id.name.as_str());
                    debug!(workload = ?id.workload, labels = id.labels.len(), "pod identified");
                    *identity = Some(id);
                }
                Err(e) => {
                    *identity = None;
                    if let Some(held_back) = IDENTITY_LOG.check() {
                        warn!(error = %e, held_back, "missing pod identity");
                    }
                }
            }
        }
        for name in &skipped {
            debug!(name = %String::from_utf8_lossy(name), "skipping metric name");
        }
        let total = parsed.families;
        let Some(pod) = identity.as_ref() else {
            self.metrics.sink_identity_missing.inc();
            self.metrics.family("skipped").inc_by(total);
            if let Some(held_back) = IDENTITY_LOG.check() {
                warn!(held_back, "missing pod identity: message dropped");
            }
            return Ok(());
        };
        let mut samples = Vec::with_capacity(kept.len());
        let mut rejected = 0;
        for family in kept.drain(..) {
            match family.value {
                Some(v) if v.is_finite() && v >= 0.0 => samples.push((family.name, v)),
                value => {
                    rejected += 1;
                    if let Some(held_back) = REJECTED_LOG.check() {
                        warn!(
                            name = family.name,
                            ?value,
                            held_back,
                            "rejected metric value"
                        );
                    }
                }
            }
        }
        self.metrics.family("kept").inc_by(samples.len() as u64);
        self.metrics.family("rejected").inc_by(rejected);
        self.metrics
            .family("skipped")
            .inc_by(total - samples.len() as u64 - rejected);
        match self.store.record(pod, &samples).await {
            Ok(()) => {
                debug!(
                    families = samples.len(),
                    value = samples.iter().map(|s| s.1).sum::<f64>(),
                    "stored active_requests"
                );
            }
            Err(e) => {
                self.metrics.sink_store_errors.inc();
                if let Some(held_back) = STORE_LOG.check() {
                    warn!(error = %e, held_back, "could not store active_requests");
                }
            }
        }
        Ok(())
    }

    fn malformed(&self, detail: String) -> Status {
        self.count_stream_error("malformed");
        if let Some(held_back) = MALFORMED_LOG.check() {
            warn!(error = %detail, held_back, "malformed metrics message: ending stream");
        }
        Status::invalid_argument(format!("malformed StreamMetricsMessage: {detail}"))
    }

    fn count_stream_error(&self, reason: &'static str) {
        self.metrics
            .sink_stream_errors
            .get_or_create(&ReasonLabel { reason })
            .inc();
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
            let mut identity = None;
            let mut kept = Vec::new();
            loop {
                let next = tokio::select! {
                    _ = self.shutdown.cancelled() => break,
                    next = messages.next() => next,
                };
                match next {
                    Ok(Some(raw)) => {
                        self.handle(
                            &RawMessage(raw),
                            &mut identity,
                            &mut kept,
                            &tracing::Span::current(),
                        )
                        .await?
                    }
                    Ok(None) => break,
                    Err(e @ ReadError::Oversized { .. }) => {
                        self.count_stream_error("oversized");
                        if let Some(held_back) = MALFORMED_LOG.check() {
                            warn!(error = %e, held_back, "oversized metrics message: ending stream");
                        }
                        return Err(Status::out_of_range(e.to_string()));
                    }
                    Err(e @ (ReadError::Compressed(_) | ReadError::Truncated)) => {
                        return Err(self.malformed(e.to_string()));
                    }
                    Err(ReadError::Broken(status)) => {
                        // The peer went away (reset, broken connection): a normal end.
                        self.count_stream_error("disconnected");
                        debug!(error = %status.message(), "stream broken");
                        return Err(status);
                    }
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

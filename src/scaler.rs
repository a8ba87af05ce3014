//! KEDA's `externalscaler.ExternalScaler`: the answers the autoscaler acts on.
//!
//! Every call resolves its trigger through the [`TriggerCache`], reads the
//! value from the store (envoy source) or Prometheus, and answers. This is the
//! one place where errors become gRPC statuses ([`status_of`]): a failure is
//! always an error KEDA can fall back on, never a 0 that would scale a
//! workload down.

use std::{pin::Pin, sync::Arc, time::Duration};

use futures::Stream;
use tokio::{sync::mpsc, time::Instant};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};
use tracing::{Instrument, debug, info_span, warn};

use crate::{
    Error,
    prometheus::{PromBackend, PromError},
    proto::{
        GetMetricSpecResponse, GetMetricsRequest, GetMetricsResponse, IsActiveResponse, MetricSpec,
        MetricValue, ScaledObjectRef, external_scaler_server::ExternalScaler,
    },
    store::{SharedStore, StoreError},
    telemetry::{MethodLabel, Metrics, RpcLabels},
    trigger::{MetadataError, Source, Trigger, TriggerCache},
};

pub use crate::proto::external_scaler_server::ExternalScalerServer;

mod feed;

/// gRPC service name, for the health reporter.
pub const SERVICE_NAME: &str = "externalscaler.ExternalScaler";

/// How often a windowed envoy trigger's stream re-reads without an ingest:
/// values fall out of a window with time alone.
const WINDOW_RECHECK: Duration = Duration::from_secs(1);

/// The scaler service; clones share everything.
#[derive(Clone)]
pub struct Scaler {
    store: SharedStore,
    triggers: Arc<TriggerCache>,
    prometheus: PromBackend,
    metrics: Arc<Metrics>,
    /// Envoy-source answers are refused before this instant (see `Config::warmup`).
    warm_at: Instant,
    shutdown: CancellationToken,
    /// Shared reads for StreamIsActive streams of Envoy triggers.
    feeds: Arc<feed::Feeds>,
    /// What the live view shows of each answer.
    view: crate::view::Recorder,
}

/// The one mapping from library errors to gRPC statuses.
pub fn status_of(error: &Error) -> Status {
    let msg = error.to_string();
    match error {
        Error::Metadata(MetadataError::CrossNamespace(_)) => Status::permission_denied(msg),
        Error::Metadata(_) | Error::UnknownMetric { .. } => Status::invalid_argument(msg),
        Error::Store(StoreError::Unavailable(_) | StoreError::Timeout(_)) => {
            Status::unavailable(msg)
        }
        Error::Store(StoreError::Corrupt(_)) => Status::internal(msg),
        Error::Prometheus(PromError::Unavailable(_)) => Status::unavailable(msg),
        Error::Prometheus(PromError::Empty(_)) => Status::not_found(msg),
        Error::Prometheus(PromError::BadValue(_)) => Status::failed_precondition(msg),
        Error::Prometheus(PromError::Rejected(_)) => Status::invalid_argument(msg),
        Error::WarmingUp(_) => Status::unavailable(msg),
        Error::Config(_) | Error::Io(..) => Status::internal(msg),
    }
}

impl Scaler {
    pub fn new(
        store: SharedStore,
        triggers: Arc<TriggerCache>,
        prometheus: PromBackend,
        metrics: Arc<Metrics>,
        warmup: Duration,
        shutdown: CancellationToken,
        view: crate::view::Recorder,
    ) -> Self {
        Self {
            store,
            triggers,
            prometheus,
            metrics,
            warm_at: Instant::now() + warmup,
            shutdown,
            feeds: Arc::default(),
            view,
        }
    }

    fn trigger(&self, r: &ScaledObjectRef) -> Result<Arc<Trigger>, Error> {
        Ok(self
            .triggers
            .get(&r.namespace, &r.name, &r.scaler_metadata)?)
    }

    /// The trigger's current value.
    pub async fn value(&self, trigger: &Trigger) -> Result<f64, Error> {
        match &trigger.source {
            Source::Envoy { query, aggregation } => {
                let now = Instant::now();
                if now < self.warm_at {
                    return Err(Error::WarmingUp(self.warm_at - now));
                }
                let s = self.store.summary(query, aggregation.needs_max()).await?;
                Ok(aggregation.of(&s))
            }
            Source::Prometheus(p) => Ok(self.prometheus.value(p).await?),
        }
    }

    /// Runs one unary call: span, latency, outcome, error mapping.
    async fn observe<T>(
        &self,
        method: &'static str,
        r: Option<&ScaledObjectRef>,
        call: impl Future<Output = Result<T, Error>>,
    ) -> Result<Response<T>, Status> {
        let span = info_span!(
            "rpc",
            method,
            namespace = r.map(|r| r.namespace.as_str()),
            scaled_object = r.map(|r| r.name.as_str())
        );
        let started = std::time::Instant::now();
        let result = call.instrument(span.clone()).await;
        let code = match &result {
            Ok(_) => "OK",
            Err(e) => {
                let _enter = span.enter();
                debug!(error = %e, "call failed");
                code_name(status_of(e).code())
            }
        };
        self.metrics.api_calls.inc();
        if result.is_err() {
            self.metrics.api_errors.inc();
        }
        self.metrics
            .rpc_requests
            .get_or_create(&RpcLabels { method, code })
            .inc();
        self.metrics
            .rpc_duration
            .get_or_create(&MethodLabel { method })
            .observe(started.elapsed().as_secs_f64());
        result.map(Response::new).map_err(|e| status_of(&e))
    }
}

fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "OK",
        Cancelled => "CANCELLED",
        Unknown => "UNKNOWN",
        InvalidArgument => "INVALID_ARGUMENT",
        DeadlineExceeded => "DEADLINE_EXCEEDED",
        NotFound => "NOT_FOUND",
        AlreadyExists => "ALREADY_EXISTS",
        PermissionDenied => "PERMISSION_DENIED",
        ResourceExhausted => "RESOURCE_EXHAUSTED",
        FailedPrecondition => "FAILED_PRECONDITION",
        Aborted => "ABORTED",
        OutOfRange => "OUT_OF_RANGE",
        Unimplemented => "UNIMPLEMENTED",
        Internal => "INTERNAL",
        Unavailable => "UNAVAILABLE",
        DataLoss => "DATA_LOSS",
        Unauthenticated => "UNAUTHENTICATED",
    }
}

/// `s0-active_requests` → `active_requests`: KEDA names metrics `s<N>-<name>`
/// towards the HPA and may send either form.
pub fn strip_index_prefix(name: &str) -> &str {
    if let Some(rest) = name.strip_prefix('s')
        && let Some((digits, tail)) = rest.split_once('-')
        && !digits.is_empty()
        && digits.bytes().all(|b| b.is_ascii_digit())
    {
        return tail;
    }
    name
}

/// KEDA's deprecated integer fields: rounded up so a fractional load is never
/// read as 0.
fn ceil_i64(v: f64) -> i64 {
    v.ceil().clamp(i64::MIN as f64, i64::MAX as f64) as i64
}

type ResponseStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

#[tonic::async_trait]
impl ExternalScaler for Scaler {
    async fn is_active(
        &self,
        request: Request<ScaledObjectRef>,
    ) -> Result<Response<IsActiveResponse>, Status> {
        let r = request.into_inner();
        self.observe("IsActive", Some(&r), async {
            let t = self.trigger(&r)?;
            let v = self.view.answer(&r, &t, self.value(&t).await)?;
            Ok(IsActiveResponse {
                result: v > t.activation,
            })
        })
        .await
    }

    type StreamIsActiveStream = ResponseStream<IsActiveResponse>;

    async fn stream_is_active(
        &self,
        request: Request<ScaledObjectRef>,
    ) -> Result<Response<Self::StreamIsActiveStream>, Status> {
        let r = request.into_inner();
        let trigger = self
            .observe("StreamIsActive", Some(&r), async { self.trigger(&r) })
            .await?
            .into_inner();
        let (tx, rx) = mpsc::channel(4);
        let span = info_span!("active_stream", namespace = %r.namespace, scaled_object = %r.name);
        let seen = self.view.ask(&r, &trigger);
        tokio::spawn(
            self.clone()
                .push_activity(trigger, tx, seen)
                .instrument(span),
        );
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn get_metric_spec(
        &self,
        request: Request<ScaledObjectRef>,
    ) -> Result<Response<GetMetricSpecResponse>, Status> {
        let r = request.into_inner();
        self.observe("GetMetricSpec", Some(&r), async {
            let t = self.trigger(&r)?;
            Ok(GetMetricSpecResponse {
                metric_specs: vec![MetricSpec {
                    metric_name: t.metric_name.clone(),
                    target_size: ceil_i64(t.target),
                    target_size_float: t.target,
                }],
            })
        })
        .await
    }

    async fn get_metrics(
        &self,
        request: Request<GetMetricsRequest>,
    ) -> Result<Response<GetMetricsResponse>, Status> {
        let req = request.into_inner();
        let r = req.scaled_object_ref.unwrap_or_default();
        self.observe("GetMetrics", Some(&r), async {
            let t = self.trigger(&r)?;
            let asked = strip_index_prefix(&req.metric_name);
            if !asked.is_empty() && asked != t.metric_name {
                return Err(Error::UnknownMetric {
                    asked: req.metric_name.clone(),
                    served: t.metric_name.clone(),
                });
            }
            let v = self.view.answer(&r, &t, self.value(&t).await)?;
            Ok(GetMetricsResponse {
                metric_values: vec![MetricValue {
                    metric_name: if req.metric_name.is_empty() {
                        t.metric_name.clone()
                    } else {
                        req.metric_name.clone()
                    },
                    metric_value: ceil_i64(v),
                    metric_value_float: v,
                }],
            })
        })
        .await
    }

    type StreamMetricSpecStream = ResponseStream<GetMetricSpecResponse>;

    async fn stream_metric_spec(
        &self,
        _request: Request<ScaledObjectRef>,
    ) -> Result<Response<Self::StreamMetricSpecStream>, Status> {
        // Targets come from the ScaledObject and change only with it; KEDA
        // falls back to GetMetricSpec on UNIMPLEMENTED.
        Err(Status::unimplemented(
            "StreamMetricSpec: targets change only with the ScaledObject; use GetMetricSpec",
        ))
    }
}

impl Scaler {
    /// Body of one StreamIsActive stream: the state when it is first known,
    /// then each change, never a repeat (KEDA treats every `true` as fresh
    /// activity). While the value is unknown (the store or Prometheus fails)
    /// the stream stays open and says nothing; GetMetrics and IsActive
    /// answer the error, so KEDA falls back. Ending the stream with the error
    /// would grow KEDA's reconnect wait instead (2 s doubling to 60 s, reset
    /// only by a clean end). On drain it ends cleanly (status OK).
    async fn push_activity(
        self,
        trigger: Arc<Trigger>,
        tx: mpsc::Sender<Result<IsActiveResponse, Status>>,
        seen: crate::view::TriggerKey,
    ) {
        self.metrics.scaler_streams.inc();
        let _guard = GaugeGuard(&self.metrics.scaler_streams);
        debug!("stream opened");
        let mut pusher = Pusher {
            tx,
            last: None,
            metrics: &self.metrics,
            view: (&self.view, seen),
        };
        match &trigger.source {
            Source::Envoy { query, aggregation } => {
                let mut feed = self.subscribe((query.clone(), *aggregation), &trigger);
                loop {
                    let reading = *feed.borrow_and_update();
                    if let Some(v) = reading
                        && !pusher.push(v, trigger.activation).await
                    {
                        return;
                    }
                    tokio::select! {
                        ok = feed.changed() => if ok.is_err() { return },
                        _ = pusher.tx.closed() => { debug!("stream closed by the client"); return }
                        _ = self.shutdown.cancelled() => return,
                    }
                }
            }
            Source::Prometheus(_) => {
                let poll = self.triggers.settings().prometheus.poll_interval;
                let mut failing = false;
                loop {
                    match self.value(&trigger).await {
                        Ok(v) => {
                            failing = false;
                            if !pusher.push(v, trigger.activation).await {
                                return;
                            }
                        }
                        Err(e) => {
                            if !failing {
                                warn!(error = %e, "activity unknown: the stream stays open and silent until Prometheus answers");
                            }
                            failing = true;
                        }
                    }
                    tokio::select! {
                        _ = tokio::time::sleep(poll) => {}
                        _ = pusher.tx.closed() => { debug!("stream closed by the client"); return }
                        _ = self.shutdown.cancelled() => return,
                    }
                }
            }
        }
    }
}

/// The sending end of one StreamIsActive stream.
struct Pusher<'a> {
    tx: mpsc::Sender<Result<IsActiveResponse, Status>>,
    last: Option<bool>,
    metrics: &'a Metrics,
    view: (&'a crate::view::Recorder, crate::view::TriggerKey),
}

impl Pusher<'_> {
    /// Sends the state of `value` if it differs from the last one sent. False
    /// when the client has gone.
    async fn push(&mut self, value: f64, activation: f64) -> bool {
        let active = value > activation;
        if self.last == Some(active) {
            return true;
        }
        debug!(active, value, "activity changed");
        if self
            .tx
            .send(Ok(IsActiveResponse { result: active }))
            .await
            .is_err()
        {
            return false;
        }
        self.metrics.scaler_pushes.inc();
        self.view.0.pushed(&self.view.1, active);
        self.last = Some(active);
        true
    }
}

struct GaugeGuard<'a>(&'a prometheus_client::metrics::gauge::Gauge);

impl Drop for GaugeGuard<'_> {
    fn drop(&mut self) {
        self.0.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn index_prefix_is_stripped_only_when_it_is_one() {
        assert_eq!(strip_index_prefix("s0-active_requests"), "active_requests");
        assert_eq!(strip_index_prefix("s12-x"), "x");
        assert_eq!(strip_index_prefix("active_requests"), "active_requests");
        assert_eq!(strip_index_prefix("s-x"), "s-x");
        assert_eq!(strip_index_prefix("sx-y"), "sx-y");
        assert_eq!(strip_index_prefix("status-x"), "status-x");
    }

    #[test]
    fn integer_fields_round_up() {
        assert_eq!(ceil_i64(0.2), 1);
        assert_eq!(ceil_i64(3.0), 3);
        assert_eq!(ceil_i64(0.0), 0);
        assert_eq!(ceil_i64(1e300), i64::MAX);
    }

    #[test]
    fn failures_are_never_ok() {
        let cases = [
            Error::Store(StoreError::Unavailable("down".into())),
            Error::Store(StoreError::Timeout(Duration::from_millis(5))),
            Error::Prometheus(PromError::Unavailable("down".into())),
            Error::Prometheus(PromError::Empty("q".into())),
            Error::WarmingUp(Duration::from_secs(1)),
        ];
        for e in cases {
            assert_ne!(status_of(&e).code(), tonic::Code::Ok);
        }
        assert_eq!(
            status_of(&Error::Store(StoreError::Unavailable("x".into()))).code(),
            tonic::Code::Unavailable
        );
        assert_eq!(
            status_of(&Error::Metadata(MetadataError::missing("targetValue", "x"))).code(),
            tonic::Code::InvalidArgument
        );
    }
}

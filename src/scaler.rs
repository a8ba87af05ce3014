//! KEDA's `externalscaler.ExternalScaler`: the answers the autoscaler acts on.
//!
//! A thin adapter: every call resolves its trigger through the
//! [`TriggerCache`], asks the [`Engine`] as KEDA's ScaledObject (a value, or
//! a watch of its activity for StreamIsActive; the engine records both for
//! the live view), and answers. This is the one place where
//! request errors become gRPC statuses ([`status_of`]): a failure is always an
//! error KEDA can fall back on, never a 0 that would scale a workload down.

use std::{pin::Pin, sync::Arc};

use futures::Stream;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};
use tracing::{Instrument, debug, info_span};

use crate::{
    engine::{Asker, Engine, EvalError},
    metadata::MetadataError,
    prometheus::PromError,
    proto::{
        GetMetricSpecResponse, GetMetricsRequest, GetMetricsResponse, IsActiveResponse, MetricSpec,
        MetricValue, ScaledObjectRef, external_scaler_server::ExternalScaler,
    },
    store::StoreError,
    telemetry::{MethodLabel, Metrics, RpcLabels},
    trigger::{Trigger, TriggerCache},
};

pub use crate::proto::external_scaler_server::ExternalScalerServer;

/// gRPC service name, for the health reporter.
pub const SERVICE_NAME: &str = "externalscaler.ExternalScaler";

/// Why a call was not answered with a value.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    #[error(transparent)]
    Metadata(#[from] MetadataError),
    #[error(transparent)]
    Eval(#[from] EvalError),
    #[error("metric {asked:?} is not served by this trigger (it serves {served:?})")]
    UnknownMetric { asked: String, served: String },
}

/// The scaler service; clones share everything.
#[derive(Clone)]
pub struct Scaler {
    engine: Engine,
    triggers: Arc<TriggerCache>,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
}

/// The one mapping from request errors to gRPC statuses.
pub fn status_of(error: &RequestError) -> Status {
    let msg = error.to_string();
    match error {
        RequestError::Metadata(MetadataError::CrossNamespace(_)) => Status::permission_denied(msg),
        RequestError::Metadata(_) | RequestError::UnknownMetric { .. } => {
            Status::invalid_argument(msg)
        }
        RequestError::Eval(e) => match e {
            EvalError::Store(StoreError::Unavailable(_) | StoreError::Timeout(_)) => {
                Status::unavailable(msg)
            }
            EvalError::Store(StoreError::Corrupt(_)) => Status::internal(msg),
            EvalError::Prometheus(PromError::Unavailable(_)) => Status::unavailable(msg),
            EvalError::Prometheus(PromError::Empty(_)) => Status::not_found(msg),
            EvalError::Prometheus(PromError::BadValue(_)) => Status::failed_precondition(msg),
            EvalError::Prometheus(PromError::Rejected(_)) => Status::invalid_argument(msg),
            EvalError::WarmingUp(_) => Status::unavailable(msg),
            EvalError::NoRoute { .. } => Status::not_found(msg),
        },
    }
}

impl Scaler {
    pub fn new(
        engine: Engine,
        triggers: Arc<TriggerCache>,
        metrics: Arc<Metrics>,
        shutdown: CancellationToken,
    ) -> Self {
        Self {
            engine,
            triggers,
            metrics,
            shutdown,
        }
    }

    fn trigger(&self, r: &ScaledObjectRef) -> Result<Arc<Trigger>, RequestError> {
        Ok(self
            .triggers
            .get(&r.namespace, &r.name, &r.scaler_metadata)?)
    }

    /// The trigger's current value, asked as `r`'s.
    async fn value(&self, r: &ScaledObjectRef, t: &Trigger) -> Result<f64, RequestError> {
        Ok(self.engine.value(&t.source, asker(r, t)).await?)
    }

    /// Runs one unary call: span, latency, outcome, error mapping.
    async fn observe<T>(
        &self,
        method: &'static str,
        r: Option<&ScaledObjectRef>,
        call: impl Future<Output = Result<T, RequestError>>,
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

/// Who asks: the ScaledObject `r` for its trigger `t`.
fn asker<'a>(r: &'a ScaledObjectRef, t: &'a Trigger) -> Asker<'a> {
    Asker::Keda {
        namespace: &r.namespace,
        scaled_object: &r.name,
        trigger: t,
        metadata: &r.scaler_metadata,
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
            let v = self.value(&r, &t).await?;
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
        // Asked now, on the request: the watch is recorded before the
        // stream's first message.
        let activity = self
            .engine
            .watch(&trigger.source, trigger.activation, asker(&r, &trigger));
        tokio::spawn(self.clone().push_activity(activity, tx).instrument(span));
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
                return Err(RequestError::UnknownMetric {
                    asked: req.metric_name.clone(),
                    served: t.metric_name.clone(),
                });
            }
            let v = self.value(&r, &t).await?;
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
    /// Body of one StreamIsActive stream: each state the engine's watch
    /// yields (the first known one, then each change, never a repeat: KEDA
    /// treats every `true` as fresh activity). While the value is unknown
    /// (the store or Prometheus fails) the stream stays open and says
    /// nothing; GetMetrics and IsActive answer the error, so KEDA falls back.
    /// Ending the stream with the error would grow KEDA's reconnect wait
    /// instead (2 s doubling to 60 s, reset only by a clean end). On drain it
    /// ends cleanly (status OK).
    async fn push_activity(
        self,
        mut activity: crate::engine::Activity,
        tx: mpsc::Sender<Result<IsActiveResponse, Status>>,
    ) {
        self.metrics.scaler_streams.inc();
        let _guard = GaugeGuard(&self.metrics.scaler_streams);
        debug!("stream opened");
        loop {
            tokio::select! {
                next = activity.changed() => {
                    let Some(active) = next else { return };
                    debug!(active, "activity changed");
                    if tx.send(Ok(IsActiveResponse { result: active })).await.is_err() {
                        return;
                    }
                    self.metrics.scaler_pushes.inc();
                }
                _ = tx.closed() => { debug!("stream closed by the client"); return }
                _ = self.shutdown.cancelled() => return,
            }
        }
    }
}

pub(crate) struct GaugeGuard<'a>(pub(crate) &'a prometheus_client::metrics::gauge::Gauge);

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
        use std::time::Duration;
        let cases = [
            EvalError::Store(StoreError::Unavailable("down".into())),
            EvalError::Store(StoreError::Timeout(Duration::from_millis(5))),
            EvalError::Prometheus(PromError::Unavailable("down".into())),
            EvalError::Prometheus(PromError::Empty("q".into())),
            EvalError::WarmingUp(Duration::from_secs(1)),
        ];
        for e in cases {
            assert_ne!(status_of(&e.into()).code(), tonic::Code::Ok);
        }
        assert_eq!(
            status_of(&EvalError::Store(StoreError::Unavailable("x".into())).into()).code(),
            tonic::Code::Unavailable
        );
        assert_eq!(
            status_of(&MetadataError::missing("targetValue", "x").into()).code(),
            tonic::Code::InvalidArgument
        );
    }
}

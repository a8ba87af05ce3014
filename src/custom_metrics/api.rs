//! The router: discovery, the metric paths, health, and every failure as a
//! Kubernetes `Status` (the one place errors become HTTP answers).
//!
//! Paths (both versions; `v1beta2` is preferred):
//! - `GET /apis`, `/apis/custom.metrics.k8s.io`, `/apis/custom.metrics.k8s.io/{version}`:
//!   `APIGroupList`, `APIGroup`, `APIResourceList` (one `pods/<metric>` per
//!   metric). Served whatever the store's state: the aggregator marks the
//!   APIService unavailable when discovery fails, and an unavailable
//!   APIService blocks namespace deletion (kubernetes/kubernetes#83332).
//! - `GET .../namespaces/{ns}/pods/*/{metric}?labelSelector=&metricLabelSelector=`:
//!   a `MetricValueList` with one item per live pod matching; `pods/{name}`:
//!   exactly one item (client-go's custom-metrics client requires it) or 404.
//! - `/healthz`, `/livez` (200 while the process runs), `/readyz`: without
//!   authentication, for kubelet probes.
//! - `/openapi/v2`, `/openapi/v3`: 404 (the aggregator asks; a 404 means
//!   "no spec").
//!
//! Answers, as custom-metrics-apiserver gives them: an unknown metric or a
//! resource other than pods is 404 `NotFound` ("the server could not find
//! the metric m for pods"); a malformed namespace, pod name or selector is
//! 400 `BadRequest`; no verified front-proxy certificate is 401; the store
//! or Prometheus unreachable, or the warm-up, is 503 (never a list of zeros:
//! the HPA keeps the current size on an error); no matching pods is an empty
//! `items` list.
//!
//! `metricLabelSelector`: the sidecar metrics have no metric labels, so the
//! selector is matched against the empty label set, as Kubernetes selectors
//! mean: one that any series passes (`!x`, `x!=y`, `x notin (...)`) changes
//! nothing, one that needs a label (`x=y`, `x`, `x in (...)`) matches no
//! series, so the list is empty (or the single pod is 404). For Prometheus
//! rules the selector becomes label matchers, as prometheus-adapter does.
//! Either way a selector given is echoed in each item's `metric.selector`.

use std::{
    collections::HashSet,
    fmt::Write as _,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use axum::{
    Json, Router,
    extract::{Path, Query, Request, State, rejection::PathRejection},
    handler::Handler,
    http::{HeaderValue, StatusCode, Uri, header},
    middleware::{self, Next},
    response::{IntoResponse, Response},
    routing::{self, MethodRouter},
};
use rustls::pki_types::CertificateDer;
use serde::Deserialize;
use tracing::{debug, warn};

use super::{
    Catalogue, MetricDef, PodMetricSource, PodQuery, PodSample, PodScope, SourceError,
    auth::{Guard, User},
    quantity,
    types::{
        ApiGroup, ApiGroupList, ApiResource, ApiResourceList, GROUP, LabelSelector,
        MetricIdentifier, MetricValue, MetricValueList, MetricValueV1Beta1, ObjectReference,
        Status, StatusDetails, StatusReason, VERSIONS,
    },
};
use crate::selector::{Labels, Selector};

/// Longest query string accepted, in bytes. An HPA's selectors are a few
/// dozen bytes.
pub const MAX_QUERY_BYTES: usize = 8 * 1024;
/// Most items one answer may hold. More pods than this is an error, not a
/// truncated list (an average over part of the pods would be wrong).
pub const MAX_ITEMS: usize = 10_000;
/// How long the source may take for one request.
pub const SOURCE_TIMEOUT: Duration = Duration::from_secs(30);

/// What the handlers share.
#[derive(Clone)]
pub struct ApiState {
    pub source: Arc<dyn PodMetricSource>,
    pub catalogue: Arc<Catalogue>,
    pub guard: Guard,
    /// `/readyz`.
    pub ready: Arc<AtomicBool>,
}

/// The connection a request came on, set by [`super::server`] on every request.
#[derive(Clone, Debug, Default)]
pub struct Peer {
    pub addr: Option<SocketAddr>,
    /// What the client presented in the TLS handshake, end entity first.
    pub certificates: Option<Arc<[CertificateDer<'static>]>>,
}

/// The router of the Custom Metrics API port.
pub fn router(state: ApiState) -> Router {
    let group = format!("/apis/{GROUP}");
    let api = Router::new()
        .route("/apis", get(group_list))
        .route(&group, get(group_info))
        .route(&format!("{group}/{{version}}"), get(resources))
        .route(&format!("{group}/{{version}}/{{*rest}}"), get(metric))
        .route("/openapi/v2", get(no_openapi))
        .route("/openapi/v3", get(no_openapi))
        .route("/openapi/v3/{*rest}", get(no_openapi))
        .fallback(not_found)
        .layer(middleware::from_fn_with_state(state.clone(), authenticate));
    Router::new()
        .route("/healthz", routing::get(|| async { "ok\n" }))
        .route("/livez", routing::get(|| async { "ok\n" }))
        .route("/readyz", routing::get(readyz))
        .merge(api)
        .with_state(state)
}

/// GET (and HEAD); any other method is 405 with a `Status`.
fn get<H, T>(handler: H) -> MethodRouter<ApiState>
where
    H: Handler<T, ApiState>,
    T: 'static,
{
    routing::get(handler).fallback(method_not_allowed)
}

/// A `Status` answer.
fn status(reason: StatusReason, message: impl Into<String>) -> Response {
    respond(Status::failure(reason, message))
}

/// `status` as the response, with `Retry-After` when its details say when.
fn respond(status: Status) -> Response {
    let code = StatusCode::from_u16(status.code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let retry = status.details.as_ref().and_then(|d| d.retry_after_seconds);
    let mut response = (code, Json(status)).into_response();
    if let Some(v) = retry.and_then(|s| HeaderValue::from_str(&s.to_string()).ok()) {
        response.headers_mut().insert(header::RETRY_AFTER, v);
    }
    response
}

/// Why a metric request is not answered with a list; boxed, it is large.
type Refused = Box<Status>;

fn refuse(reason: StatusReason, message: impl Into<String>) -> Refused {
    Box::new(Status::failure(reason, message))
}

fn resource_not_found() -> Status {
    Status::failure(
        StatusReason::NotFound,
        "the server could not find the requested resource",
    )
}

fn not_found_resource() -> Response {
    respond(resource_not_found())
}

/// custom-metrics-apiserver's `NewMetricNotFoundError` and
/// `NewMetricNotFoundForError` (`pkg/provider/errors.go`).
fn metric_not_found(resource: &str, metric: &str, object: Option<&str>) -> Refused {
    let message = match object {
        None => format!("the server could not find the metric {metric} for {resource}"),
        Some(name) => {
            format!("the server could not find the metric {metric} for {resource} {name}")
        }
    };
    Box::new(
        Status::failure(StatusReason::NotFound, message).with_details(StatusDetails {
            name: metric.into(),
            group: GROUP.into(),
            kind: resource.into(),
            retry_after_seconds: None,
        }),
    )
}

async fn not_found() -> Response {
    not_found_resource()
}

async fn method_not_allowed() -> Response {
    status(
        StatusReason::MethodNotAllowed,
        "only GET is supported on custom metrics",
    )
}

async fn no_openapi() -> Response {
    status(
        StatusReason::NotFound,
        "the server does not serve an OpenAPI document",
    )
}

async fn readyz(State(s): State<ApiState>) -> Response {
    if s.ready.load(Ordering::Acquire) {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n").into_response()
    }
}

/// Front-proxy authentication before anything but health is answered.
async fn authenticate(State(s): State<ApiState>, mut req: Request, next: Next) -> Response {
    let peer = req.extensions().get::<Peer>().cloned().unwrap_or_default();
    match s.guard.check(peer.certificates.as_deref(), req.headers()) {
        Ok(user) => {
            if let Some(user) = user {
                req.extensions_mut().insert(user);
            }
            next.run(req).await
        }
        Err(e) => {
            debug!(peer = ?peer.addr, path = %req.uri().path(), error = %e, "custom metrics request not authenticated");
            status(StatusReason::Unauthorized, format!("Unauthorized: {e}"))
        }
    }
}

async fn group_list() -> Json<ApiGroupList> {
    Json(ApiGroupList::custom_metrics())
}

async fn group_info() -> Json<ApiGroup> {
    Json(ApiGroup::custom_metrics())
}

fn known_version(v: &str) -> Option<&'static str> {
    VERSIONS.iter().copied().find(|known| *known == v)
}

async fn resources(
    State(s): State<ApiState>,
    path: Result<Path<String>, PathRejection>,
) -> Response {
    let Some(version) = path.ok().and_then(|Path(v)| known_version(&v)) else {
        return not_found_resource();
    };
    let resources = s
        .catalogue
        .iter()
        .map(|m| ApiResource::pod_metric(&m.name))
        .collect();
    Json(ApiResourceList::new(version, resources)).into_response()
}

async fn metric(
    State(s): State<ApiState>,
    path: Result<Path<(String, String)>, PathRejection>,
    user: Option<axum::Extension<User>>,
    uri: Uri,
) -> Response {
    let Some((version, rest)) = path
        .ok()
        .and_then(|Path((v, rest))| Some((known_version(&v)?, rest)))
    else {
        return not_found_resource();
    };
    let user = user.map(|u| u.0.name);
    match answer(&s, version, &rest, &uri, user.as_deref()).await {
        Ok(response) => response,
        Err(status) => respond(*status),
    }
}

/// What a metric path names.
#[derive(Debug, PartialEq)]
struct Target<'a> {
    namespace: &'a str,
    /// `*` or a pod name.
    name: &'a str,
    metric: &'a str,
}

/// Splits and checks the path after `/apis/custom.metrics.k8s.io/{version}/`.
fn target(rest: &str) -> Result<Target<'_>, Refused> {
    let segments: Vec<&str> = rest.split('/').collect();
    let t = match segments.as_slice() {
        ["namespaces", _, "metrics", metric] => {
            return Err(metric_not_found("namespaces", metric, None));
        }
        ["namespaces", namespace, resource, name, metric] => {
            if *resource != "pods" {
                return Err(metric_not_found(resource, metric, None));
            }
            Target {
                namespace,
                name,
                metric,
            }
        }
        [resource, _, metric] => return Err(metric_not_found(resource, metric, None)),
        _ => return Err(Box::new(resource_not_found())),
    };
    check_dns_label(t.namespace).map_err(|why| {
        refuse(
            StatusReason::BadRequest,
            format!("namespace {:?} is not a namespace name: {why}", t.namespace),
        )
    })?;
    if t.name != "*" {
        check_dns_subdomain(t.name).map_err(|why| {
            refuse(
                StatusReason::BadRequest,
                format!("pod name {:?} is not a pod name: {why}", t.name),
            )
        })?;
    }
    Ok(t)
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct MetricParams {
    label_selector: Option<String>,
    metric_label_selector: Option<String>,
}

/// `labelSelector` and `metricLabelSelector`; absent or empty is "everything".
fn selectors(uri: &Uri) -> Result<(Option<Selector>, Option<Selector>), Refused> {
    if uri.query().is_some_and(|q| q.len() > MAX_QUERY_BYTES) {
        return Err(refuse(
            StatusReason::BadRequest,
            format!("the query string is longer than {MAX_QUERY_BYTES} bytes"),
        ));
    }
    let Query(params) = Query::<MetricParams>::try_from_uri(uri).map_err(|e| {
        refuse(
            StatusReason::BadRequest,
            format!("invalid query parameters: {e}"),
        )
    })?;
    let parse = |param: &str, text: Option<String>| match text
        .as_deref()
        .map(str::trim)
        .filter(|t| !t.is_empty())
    {
        None => Ok(None),
        Some(t) => Selector::parse(t).map(Some).map_err(|e| {
            refuse(
                StatusReason::BadRequest,
                format!("{param} {t:?} is not a label selector: {e}"),
            )
        }),
    };
    Ok((
        parse("labelSelector", params.label_selector)?,
        parse("metricLabelSelector", params.metric_label_selector)?,
    ))
}

/// One metric request, from its path to its list.
async fn answer(
    s: &ApiState,
    version: &str,
    rest: &str,
    uri: &Uri,
    user: Option<&str>,
) -> Result<Response, Refused> {
    let t = target(rest)?;
    let def = s
        .catalogue
        .get(t.metric)
        .ok_or_else(|| metric_not_found("pods", t.metric, None))?;
    let (pod_selector, metric_selector) = selectors(uri)?;
    // The single-pod form ignores labelSelector, as custom-metrics-apiserver does.
    let pods = match t.name {
        "*" => PodScope::Matching(pod_selector.as_ref()),
        name => PodScope::Named(name),
    };
    let query = PodQuery {
        namespace: t.namespace,
        pods,
        metric: def,
        metric_selector: metric_selector.as_ref(),
    };
    let samples = samples(s, &query, user).await?;
    let items = items(&query, samples).map_err(|why| {
        warn!(namespace = t.namespace, metric = t.metric, error = %why, "custom metrics answer refused");
        refuse(StatusReason::InternalError, why)
    })?;
    if let PodScope::Named(pod) = pods
        && items.is_empty()
    {
        return Err(match &metric_selector {
            None => metric_not_found("pods", t.metric, Some(pod)),
            Some(sel) => refuse(
                StatusReason::NotFound,
                format!(
                    "the server could not find the metric {} for pods {pod} with selector {sel}",
                    t.metric
                ),
            ),
        });
    }
    debug!(
        namespace = t.namespace,
        metric = t.metric,
        user,
        items = items.len(),
        "custom metrics answered"
    );
    Ok(match version {
        "v1beta1" => {
            let items: Vec<MetricValueV1Beta1> = items.into_iter().map(Into::into).collect();
            Json(MetricValueList::new(version, items)).into_response()
        }
        _ => Json(MetricValueList::new(version, items)).into_response(),
    })
}

/// The source's samples for `query`, bounded in time. A `metricLabelSelector`
/// on a metric without metric labels is decided here (see the module docs).
async fn samples(
    s: &ApiState,
    query: &PodQuery<'_>,
    user: Option<&str>,
) -> Result<Vec<PodSample>, Refused> {
    if !query.metric.has_metric_labels()
        && query
            .metric_selector
            .is_some_and(|sel| !sel.matches(&Labels::new()))
    {
        return Ok(Vec::new());
    }
    let outcome = match tokio::time::timeout(SOURCE_TIMEOUT, s.source.pods(query)).await {
        Ok(outcome) => outcome,
        Err(_) => Err(SourceError::Unavailable(format!(
            "no answer within {SOURCE_TIMEOUT:?}"
        ))),
    };
    outcome.map_err(|e| source_failed(query, user, e))
}

/// The one mapping of source errors to statuses.
fn source_failed(query: &PodQuery<'_>, user: Option<&str>, e: SourceError) -> Refused {
    let (metric, namespace) = (&query.metric.name, query.namespace);
    let reason = match &e {
        SourceError::Unavailable(_) | SourceError::WarmingUp(_) => {
            warn!(namespace, metric = %metric, user, error = %e, "custom metrics unavailable");
            StatusReason::ServiceUnavailable
        }
        SourceError::Invalid(_) => StatusReason::BadRequest,
        SourceError::Failed(_) => {
            warn!(namespace, metric = %metric, user, error = %e, "custom metrics failed");
            StatusReason::InternalError
        }
    };
    let mut status = Status::failure(reason, e.to_string());
    if let SourceError::WarmingUp(d) = e {
        status = status.with_details(StatusDetails {
            retry_after_seconds: Some(d.as_secs_f64().ceil().clamp(1.0, 3600.0) as i32),
            ..StatusDetails::default()
        });
    }
    Box::new(status)
}

/// The items of an answer, sorted by pod; an error when the samples cannot
/// be served as they are (a value that is no quantity, the same pod twice,
/// too many pods).
fn items(query: &PodQuery<'_>, mut samples: Vec<PodSample>) -> Result<Vec<MetricValue>, String> {
    if let PodScope::Named(pod) = query.pods {
        samples.retain(|s| s.name == pod);
    }
    if samples.len() > MAX_ITEMS {
        return Err(format!(
            "{} pods match, more than the {MAX_ITEMS} one answer may hold",
            samples.len()
        ));
    }
    samples.sort_by(|a, b| a.name.cmp(&b.name));
    let mut seen = HashSet::with_capacity(samples.len());
    let selector = query.metric_selector.map(LabelSelector::from);
    let def: &MetricDef = query.metric;
    let window_seconds = def.window_seconds();
    samples
        .into_iter()
        .map(|s| {
            if !seen.insert(s.name.clone()) {
                return Err(format!("pod {} has more than one value", s.name));
            }
            let value =
                quantity::format(s.value).map_err(|e| format!("pod {}: the value {e}", s.name))?;
            let timestamp = rfc3339(s.last_report)
                .ok_or_else(|| format!("pod {}: the time of its value is out of range", s.name))?;
            Ok(MetricValue {
                described_object: ObjectReference::pod(query.namespace, &s.name),
                metric: MetricIdentifier {
                    name: def.name.clone(),
                    selector: selector.clone(),
                },
                timestamp,
                window_seconds,
                value,
            })
        })
        .collect()
}

/// `metav1.Time` as JSON writes it: RFC 3339, UTC, whole seconds. `None`
/// outside 1970..9999 (humantime's range).
fn rfc3339(t: SystemTime) -> Option<String> {
    t.duration_since(UNIX_EPOCH).ok()?;
    let mut out = String::new();
    write!(out, "{}", humantime::format_rfc3339_seconds(t)).ok()?;
    Some(out)
}

/// An RFC 1123 label (a namespace name): at most 63 characters, lowercase
/// letters, digits and `-`, alphanumeric at both ends.
fn check_dns_label(s: &str) -> Result<(), &'static str> {
    let b = s.as_bytes();
    if b.is_empty() || b.len() > 63 {
        return Err("1 to 63 characters");
    }
    if !b
        .iter()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
    {
        return Err("lowercase letters, digits and '-' only");
    }
    if b[0] == b'-' || b[b.len() - 1] == b'-' {
        return Err("must start and end with a letter or digit");
    }
    Ok(())
}

/// An RFC 1123 subdomain (a pod name): at most 253 characters, labels
/// separated by `.`.
pub(crate) fn check_dns_subdomain(s: &str) -> Result<(), &'static str> {
    if s.is_empty() || s.len() > 253 {
        return Err("1 to 253 characters");
    }
    s.split('.')
        .try_for_each(check_dns_label)
        .map_err(|_| "lowercase letters, digits, '-' and '.', each part starting and ending with a letter or digit")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{config::Config, custom_metrics::SourceError};
    use async_trait::async_trait;
    use axum::body::Body;
    use serde_json::Value;
    use std::sync::Mutex;
    use tower::ServiceExt;

    /// In-process source for the router's unit tests.
    #[derive(Default)]
    struct Fake {
        samples: Vec<PodSample>,
        error: Option<fn() -> SourceError>,
        calls: Mutex<Vec<String>>,
    }

    #[async_trait]
    impl PodMetricSource for Fake {
        async fn pods(&self, q: &PodQuery<'_>) -> Result<Vec<PodSample>, SourceError> {
            self.calls
                .lock()
                .unwrap()
                .push(format!("{} {:?} {}", q.namespace, q.pods, q.metric.name));
            match self.error {
                Some(e) => Err(e()),
                None => Ok(self.samples.clone()),
            }
        }
    }

    fn sample(name: &str, value: f64) -> PodSample {
        PodSample {
            name: name.into(),
            value,
            last_report: UNIX_EPOCH + Duration::from_secs(1_767_323_045),
        }
    }

    fn app(fake: Fake) -> (Router, Arc<Fake>) {
        let fake = Arc::new(fake);
        let mut config = Config::default();
        config.custom_metrics.windows = vec!["max_30s".into()];
        let state = ApiState {
            source: fake.clone(),
            catalogue: Arc::new(Catalogue::from_config(&config).unwrap()),
            guard: Guard::open(),
            ready: Arc::new(AtomicBool::new(true)),
        };
        (router(state), fake)
    }

    async fn get(router: &Router, uri: &str) -> (StatusCode, Value) {
        let response = router
            .clone()
            .oneshot(Request::get(uri).body(Body::empty()).unwrap())
            .await
            .unwrap();
        let code = response.status();
        let bytes = axum::body::to_bytes(response.into_body(), 1 << 20)
            .await
            .unwrap();
        let body = serde_json::from_slice(&bytes)
            .unwrap_or(Value::String(String::from_utf8_lossy(&bytes).into_owned()));
        (code, body)
    }

    const BASE: &str = "/apis/custom.metrics.k8s.io/v1beta2/namespaces/shop/pods";

    #[tokio::test]
    async fn list_form_sorted_with_quantities() {
        let (r, fake) = app(Fake {
            samples: vec![sample("web-2", 4.0), sample("web-1", 1.5)],
            ..Fake::default()
        });
        let (code, body) = get(
            &r,
            &format!("{BASE}/*/active_requests?labelSelector=app%3Dweb"),
        )
        .await;
        assert_eq!(code, StatusCode::OK, "{body}");
        assert_eq!(body["kind"], "MetricValueList");
        let items = body["items"].as_array().unwrap();
        assert_eq!(items.len(), 2);
        assert_eq!(items[0]["describedObject"]["name"], "web-1");
        assert_eq!(items[0]["value"], "1500m");
        assert_eq!(items[1]["value"], "4");
        assert_eq!(items[0]["timestamp"], "2026-01-02T03:04:05Z");
        assert!(items[0].get("windowSeconds").is_none());
        assert_eq!(items[0]["metric"]["selector"], Value::Null);
        let calls = fake.calls.lock().unwrap();
        assert!(calls[0].starts_with("shop Matching(Some("), "{calls:?}");
    }

    #[tokio::test]
    async fn windowed_metric_and_v1beta1() {
        let (r, _) = app(Fake {
            samples: vec![sample("web-1", 7.0)],
            ..Fake::default()
        });
        let (code, body) = get(
            &r,
            "/apis/custom.metrics.k8s.io/v1beta1/namespaces/shop/pods/*/active_requests_max_30s",
        )
        .await;
        assert_eq!(code, StatusCode::OK, "{body}");
        assert_eq!(body["apiVersion"], "custom.metrics.k8s.io/v1beta1");
        let item = &body["items"][0];
        assert_eq!(item["metricName"], "active_requests_max_30s");
        assert_eq!(item["window"], 30);
        assert_eq!(item["selector"], Value::Null);
    }

    #[tokio::test]
    async fn single_pod_form() {
        let (r, fake) = app(Fake {
            samples: vec![sample("web-1", 2.0), sample("web-2", 3.0)],
            ..Fake::default()
        });
        let (code, body) = get(&r, &format!("{BASE}/web-2/active_requests")).await;
        assert_eq!(code, StatusCode::OK, "{body}");
        assert_eq!(body["items"].as_array().unwrap().len(), 1);
        assert_eq!(body["items"][0]["value"], "3");
        assert!(fake.calls.lock().unwrap()[0].contains("Named(\"web-2\")"));
        let (code, body) = get(&r, &format!("{BASE}/web-9/active_requests")).await;
        assert_eq!(code, StatusCode::NOT_FOUND);
        assert_eq!(
            body["message"],
            "the server could not find the metric active_requests for pods web-9"
        );
    }

    #[tokio::test]
    async fn metric_label_selector_on_metrics_without_labels() {
        let (r, fake) = app(Fake {
            samples: vec![sample("web-1", 2.0)],
            ..Fake::default()
        });
        // Passes every series: items, with the selector echoed.
        let (code, body) = get(
            &r,
            &format!("{BASE}/*/active_requests?metricLabelSelector=!verb"),
        )
        .await;
        assert_eq!(code, StatusCode::OK);
        assert_eq!(
            body["items"][0]["metric"]["selector"],
            serde_json::json!({"matchExpressions":[{"key":"verb","operator":"DoesNotExist"}]})
        );
        // Needs a label: no series, an empty list, the source not asked.
        let (code, body) = get(
            &r,
            &format!("{BASE}/*/active_requests?metricLabelSelector=verb%3DGET"),
        )
        .await;
        assert_eq!(code, StatusCode::OK);
        assert_eq!(body["items"], serde_json::json!([]));
        assert_eq!(fake.calls.lock().unwrap().len(), 1);
        let (code, body) = get(
            &r,
            &format!("{BASE}/web-1/active_requests?metricLabelSelector=verb%3DGET"),
        )
        .await;
        assert_eq!(code, StatusCode::NOT_FOUND);
        assert!(
            body["message"]
                .as_str()
                .unwrap()
                .contains("with selector verb=GET")
        );
    }

    #[tokio::test]
    async fn refused_requests_get_status_bodies() {
        let (r, fake) = app(Fake::default());
        let long = format!(
            "{BASE}/*/active_requests?labelSelector={}",
            "a".repeat(MAX_QUERY_BYTES)
        );
        for (uri, code, reason, needle) in [
            (format!("{BASE}/*/nope"), 404, "NotFound", "could not find the metric nope for pods"),
            (
                "/apis/custom.metrics.k8s.io/v1beta2/namespaces/shop/deployments.apps/*/active_requests".into(),
                404,
                "NotFound",
                "for deployments.apps",
            ),
            (
                "/apis/custom.metrics.k8s.io/v1beta2/nodes/n1/active_requests".into(),
                404,
                "NotFound",
                "for nodes",
            ),
            (
                "/apis/custom.metrics.k8s.io/v1beta2/namespaces/shop/metrics/active_requests".into(),
                404,
                "NotFound",
                "for namespaces",
            ),
            ("/apis/custom.metrics.k8s.io/v2/namespaces/shop/pods/*/active_requests".into(), 404, "NotFound", "requested resource"),
            ("/apis/custom.metrics.k8s.io/v1".into(), 404, "NotFound", "requested resource"),
            ("/apis/other.k8s.io".into(), 404, "NotFound", "requested resource"),
            ("/openapi/v2".into(), 404, "NotFound", "OpenAPI"),
            ("/openapi/v3".into(), 404, "NotFound", "OpenAPI"),
            (
                "/apis/custom.metrics.k8s.io/v1beta2/namespaces/Shop/pods/*/active_requests".into(),
                400,
                "BadRequest",
                "not a namespace name",
            ),
            (
                format!("/apis/custom.metrics.k8s.io/v1beta2/namespaces/{}/pods/*/active_requests", "a".repeat(64)),
                400,
                "BadRequest",
                "not a namespace name",
            ),
            (format!("{BASE}/Web_1/active_requests"), 400, "BadRequest", "not a pod name"),
            (format!("{BASE}/*/active_requests?labelSelector=app%3D%3D%3D"), 400, "BadRequest", "labelSelector"),
            (format!("{BASE}/*/active_requests?metricLabelSelector=a%20in%20(x"), 400, "BadRequest", "metricLabelSelector"),
            (format!("{BASE}/*/active_requests?labelSelector=a&labelSelector=b"), 400, "BadRequest", "query parameters"),
            (long, 400, "BadRequest", "longer than"),
        ] {
            let (got, body) = get(&r, &uri).await;
            assert_eq!(got.as_u16(), code, "{uri}: {body}");
            assert_eq!(body["kind"], "Status", "{uri}");
            assert_eq!(body["status"], "Failure");
            assert_eq!(body["reason"], reason, "{uri}");
            assert_eq!(body["code"], code);
            assert!(body["message"].as_str().unwrap().contains(needle), "{uri}: {body}");
        }
        assert!(
            fake.calls.lock().unwrap().is_empty(),
            "nothing refused reached the source"
        );
        let response = r
            .clone()
            .oneshot(
                Request::post(format!("{BASE}/*/active_requests"))
                    .body(Body::empty())
                    .unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::METHOD_NOT_ALLOWED);
    }

    #[tokio::test]
    async fn source_errors_are_statuses_never_values() {
        for (error, code, retry) in [
            (
                (|| SourceError::Unavailable("redis down".into())) as fn() -> SourceError,
                503,
                None,
            ),
            (
                || SourceError::WarmingUp(Duration::from_millis(2500)),
                503,
                Some(3),
            ),
            (|| SourceError::Invalid("bad term".into()), 400, None),
            (|| SourceError::Failed("boom".into()), 500, None),
        ] {
            let (r, _) = app(Fake {
                error: Some(error),
                ..Fake::default()
            });
            let (got, body) = get(&r, &format!("{BASE}/*/active_requests")).await;
            assert_eq!(got.as_u16(), code, "{body}");
            assert_eq!(body["kind"], "Status");
            assert!(body.get("items").is_none());
            assert_eq!(
                body["details"]["retryAfterSeconds"],
                retry.map_or(Value::Null, Value::from)
            );
        }
    }

    #[tokio::test]
    async fn warm_up_says_when_to_retry() {
        let (r, _) = app(Fake {
            error: Some(|| SourceError::WarmingUp(Duration::from_millis(2500))),
            ..Fake::default()
        });
        let response = r
            .oneshot(
                Request::get(format!("{BASE}/*/active_requests"))
                    .body(Body::empty())
                    .unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(response.headers()[header::RETRY_AFTER], "3");
    }

    #[test]
    fn targets() {
        assert_eq!(
            target("namespaces/shop/pods/*/active_requests").unwrap(),
            Target {
                namespace: "shop",
                name: "*",
                metric: "active_requests"
            }
        );
        for (rest, code) in [
            ("namespaces/shop/pods/*", 404),
            ("namespaces/shop/pods/*/m/extra", 404),
            ("", 404),
            ("namespaces//pods/*/m", 400),
            ("namespaces/shop/pods//m", 400),
        ] {
            assert_eq!(target(rest).unwrap_err().code, code, "{rest}");
        }
    }

    #[tokio::test]
    async fn samples_that_cannot_be_served_are_refused() {
        for samples in [
            vec![sample("a", f64::NAN)],
            vec![sample("a", -1.0)],
            vec![sample("a", f64::INFINITY)],
            vec![sample("a", 1.0), sample("a", 2.0)],
            vec![PodSample {
                last_report: UNIX_EPOCH - Duration::from_secs(1),
                ..sample("a", 1.0)
            }],
            vec![PodSample {
                last_report: UNIX_EPOCH + Duration::from_secs(300_000_000_000),
                ..sample("a", 1.0)
            }],
        ] {
            let (r, _) = app(Fake {
                samples,
                ..Fake::default()
            });
            let (got, body) = get(&r, &format!("{BASE}/*/active_requests")).await;
            assert_eq!(got, StatusCode::INTERNAL_SERVER_ERROR, "{body}");
            assert_eq!(body["reason"], "InternalError");
        }
        let (r, _) = app(Fake {
            samples: (0..=MAX_ITEMS)
                .map(|i| sample(&format!("p{i}"), 1.0))
                .collect(),
            ..Fake::default()
        });
        let (got, body) = get(&r, &format!("{BASE}/*/active_requests")).await;
        assert_eq!(got, StatusCode::INTERNAL_SERVER_ERROR);
        assert!(body["message"].as_str().unwrap().contains("more than"));
    }

    #[tokio::test]
    async fn no_pods_is_an_empty_list() {
        let (r, _) = app(Fake::default());
        let (code, body) = get(&r, &format!("{BASE}/*/active_requests")).await;
        assert_eq!(code, StatusCode::OK);
        assert_eq!(body["items"], serde_json::json!([]));
        assert_eq!(body["metadata"], serde_json::json!({}));
    }

    #[tokio::test]
    async fn discovery_lists_every_metric_in_both_versions() {
        let (r, _) = app(Fake::default());
        for v in ["v1beta1", "v1beta2"] {
            let (code, body) = get(&r, &format!("/apis/custom.metrics.k8s.io/{v}")).await;
            assert_eq!(code, StatusCode::OK);
            assert_eq!(body["groupVersion"], format!("custom.metrics.k8s.io/{v}"));
            let names: Vec<&str> = body["resources"]
                .as_array()
                .unwrap()
                .iter()
                .map(|r| r["name"].as_str().unwrap())
                .collect();
            assert_eq!(
                names,
                ["pods/active_requests", "pods/active_requests_max_30s"]
            );
        }
        let (_, body) = get(&r, "/apis/custom.metrics.k8s.io").await;
        assert_eq!(body["preferredVersion"]["version"], "v1beta2");
        let (_, body) = get(&r, "/apis").await;
        assert_eq!(body["groups"][0]["name"], "custom.metrics.k8s.io");
        for path in ["/healthz", "/livez", "/readyz"] {
            assert_eq!(get(&r, path).await.0, StatusCode::OK, "{path}");
        }
    }

    #[test]
    fn names() {
        for ok in ["default", "kube-system", "a", "a1-b2", &"a".repeat(63)] {
            assert!(check_dns_label(ok).is_ok(), "{ok}");
        }
        for bad in ["", "-a", "a-", "A", "a_b", "a.b", &"a".repeat(64)] {
            assert!(check_dns_label(bad).is_err(), "{bad}");
        }
        for ok in ["web-1", "web.v2-abc", "a"] {
            assert!(check_dns_subdomain(ok).is_ok(), "{ok}");
        }
        for bad in ["", ".a", "a..b", "a.", "Web", "a/b", &"a".repeat(254)] {
            assert!(check_dns_subdomain(bad).is_err(), "{bad}");
        }
    }
}

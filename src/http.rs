//! The operations port: `/healthz`, `/readyz`, `/metrics`, `/v1/pods` and
//! the live view (`/`, `/v1/triggers`, `/v1/status`).
//!
//! `/healthz` is 200 while the process runs. `/readyz` is 200 once the ports
//! are bound and the store answers, 503 otherwise (a replica that cannot reach
//! Redis should get no KEDA traffic). `/v1/pods` shows what the scaler sees,
//! for debugging with curl. The view's routes exist only when
//! `view_enabled` is on (see [`crate::view`]).

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use axum::{
    Json, Router,
    extract::{Query, State},
    http::{StatusCode, header},
    response::{Html, IntoResponse, Response},
    routing::get,
};
use serde::{Deserialize, Serialize};

use crate::{
    activator::RouteSet,
    config::StoreKind,
    selector::Selector,
    store::{PodSelector, PodView, SharedStore},
    telemetry::Metrics,
    view::{Recorder, RouteView, TriggerView},
};

/// What the HTTP handlers share.
#[derive(Clone)]
pub struct AppState {
    pub store: SharedStore,
    pub metrics: Arc<Metrics>,
    /// Set by the readiness probe task in `lib.rs`.
    pub ready: Arc<AtomicBool>,
    /// What KEDA asked and was answered; `None` turns the view off (`/`,
    /// `/v1/triggers` and `/v1/status` are then 404).
    pub view: Option<Recorder>,
    /// Which store backs this replica, for `/v1/status`.
    pub store_kind: StoreKind,
    /// This replica's name (`HOSTNAME`, `#n` for a second `run` in one
    /// process), for `/v1/status`.
    pub replica: String,
    /// The activator's routes when it is on; `/v1/status` shows them.
    pub activator: Option<RouteSet>,
}

/// Serves `router` on `listener` until `token` is cancelled, then lets each
/// connection finish its request in flight.
///
/// hyper directly rather than `axum::serve`: axum's server has no header
/// timeout, so a client that never finishes its request head would hold its
/// connection (and the drain) for ever. Each connection gets
/// `header_timeout` to send a whole head, for every request on it.
pub async fn serve(
    listener: tokio::net::TcpListener,
    router: Router,
    header_timeout: Duration,
    token: tokio_util::sync::CancellationToken,
) {
    let mut connections = tokio::task::JoinSet::new();
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = token.cancelled() => break,
        };
        match accepted {
            Ok((tcp, peer)) => {
                let _ = tcp.set_nodelay(true);
                let router = router.clone();
                let token = token.clone();
                connections.spawn(connection(tcp, peer, router, header_timeout, token));
            }
            Err(e) => {
                // Out of file descriptors and the like: do not spin.
                tracing::warn!(error = %e, "HTTP port: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        // Reap finished connections so the set stays as large as what is open.
        while connections.try_join_next().is_some() {}
    }
    drop(listener);
    while connections.join_next().await.is_some() {}
}

async fn connection(
    tcp: tokio::net::TcpStream,
    peer: std::net::SocketAddr,
    router: Router,
    header_timeout: Duration,
    token: tokio_util::sync::CancellationToken,
) {
    use hyper_util::{
        rt::{TokioExecutor, TokioIo, TokioTimer},
        server::conn::auto,
        service::TowerToHyperService,
    };
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout);
    // HTTP/2 (prior knowledge) has no request-head phase to time out; an idle
    // connection is closed by keepalive instead.
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(Some(Duration::from_secs(30)))
        .keep_alive_timeout(Duration::from_secs(10));
    let serving =
        builder.serve_connection_with_upgrades(TokioIo::new(tcp), TowerToHyperService::new(router));
    tokio::pin!(serving);
    let result = tokio::select! {
        r = serving.as_mut() => r,
        _ = token.cancelled() => {
            serving.as_mut().graceful_shutdown();
            // A connection still reading its head is closed by the header
            // timeout at the latest, which is within the drain.
            serving.await
        }
    };
    if let Err(e) = result {
        tracing::debug!(%peer, error = %e, "HTTP connection ended");
    }
}

pub fn router(state: AppState) -> Router {
    let mut r = Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/v1/pods", get(pods));
    if state.view.is_some() {
        r = r
            .route("/", get(page))
            .route("/v1/triggers", get(triggers))
            .route("/v1/status", get(status));
    }
    r.with_state(state)
}

async fn page() -> Response {
    (
        [
            (header::CACHE_CONTROL, "no-cache"),
            // The page runs only its own inline script and talks only to this origin.
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; \
                 connect-src 'self'; img-src 'self' data:; frame-ancestors 'none'",
            ),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        ],
        Html(crate::view::PAGE),
    )
        .into_response()
}

#[derive(Serialize)]
struct TriggersAnswer {
    count: usize,
    triggers: Vec<TriggerView>,
}

async fn triggers(State(s): State<AppState>) -> Response {
    let Some(view) = &s.view else {
        return StatusCode::NOT_FOUND.into_response();
    };
    let triggers = view.snapshot();
    Json(TriggersAnswer {
        count: triggers.len(),
        triggers,
    })
    .into_response()
}

#[derive(Serialize)]
struct StatusAnswer {
    replica: String,
    sink: SinkStatus,
    store: StoreStatus,
    scaler: ScalerStatus,
    /// `null` when the activator is off.
    activator: Option<Vec<RouteView>>,
}

#[derive(Serialize)]
struct SinkStatus {
    streams_open: i64,
    messages: u64,
    /// Over the last minute of `/v1/status` reads; `null` on the first.
    messages_per_second: Option<f64>,
    rejected: u64,
    identity_missing: u64,
    store_errors: u64,
}

#[derive(Serialize)]
struct StoreStatus {
    kind: StoreKind,
    ready: bool,
    /// Why the store is not ready.
    reason: Option<String>,
    pods_tracked: Option<u64>,
}

#[derive(Serialize)]
struct ScalerStatus {
    streams_open: i64,
    calls: u64,
    errors: u64,
    pushes: u64,
}

/// How long `/v1/status` waits for the store's answer.
const STATUS_STORE_TIMEOUT: Duration = Duration::from_secs(2);

async fn status(State(s): State<AppState>) -> Response {
    let Some(view) = &s.view else {
        return StatusCode::NOT_FOUND.into_response();
    };
    let m = &s.metrics;
    let messages = m.sink_messages.get();
    let reason = match tokio::time::timeout(STATUS_STORE_TIMEOUT, s.store.ready()).await {
        Ok(Ok(())) => None,
        Ok(Err(e)) => Some(crate::view::bounded(&e.to_string())),
        Err(_) => Some(format!(
            "the store did not answer within {STATUS_STORE_TIMEOUT:?}"
        )),
    };
    Json(StatusAnswer {
        replica: s.replica.clone(),
        sink: SinkStatus {
            streams_open: m.sink_streams.get(),
            messages,
            messages_per_second: view.message_rate(messages),
            rejected: m.family("rejected").get(),
            identity_missing: m.sink_identity_missing.get(),
            store_errors: m.sink_store_errors.get(),
        },
        store: StoreStatus {
            kind: s.store_kind,
            ready: reason.is_none(),
            reason,
            pods_tracked: s.store.tracked_pods(),
        },
        scaler: ScalerStatus {
            streams_open: m.scaler_streams.get(),
            calls: m.api_calls.get(),
            errors: m.api_errors.get(),
            pushes: m.scaler_pushes.get(),
        },
        activator: s
            .activator
            .as_ref()
            .map(|routes| routes.iter().map(RouteView::of).collect()),
    })
    .into_response()
}

async fn readyz(State(s): State<AppState>) -> Response {
    if s.ready.load(Ordering::Acquire) {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: store unreachable\n",
        )
            .into_response()
    }
}

async fn metrics(State(s): State<AppState>) -> Response {
    if let Some(n) = s.store.tracked_pods() {
        s.metrics.pods_tracked.set(n as i64);
    }
    s.metrics
        .store_ready
        .set(i64::from(s.ready.load(Ordering::Acquire)));
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        s.metrics.encode(),
    )
        .into_response()
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct PodsQuery {
    namespace: Option<String>,
    label_selector: Option<String>,
    workload: Option<String>,
}

#[derive(Serialize)]
struct PodsAnswer {
    namespace: String,
    count: usize,
    /// Sum of the pods' values: what `aggregation: sum` would answer.
    sum: f64,
    /// Each with `replica`: the replica holding its sidecar stream, as the
    /// store recorded it.
    pods: Vec<PodView>,
}

async fn pods(State(s): State<AppState>, Query(q): Query<PodsQuery>) -> Response {
    let Some(namespace) = q.namespace.filter(|n| !n.is_empty()) else {
        return bad_request("query parameter `namespace` is required");
    };
    let selector = match (q.label_selector.filter(|s| !s.is_empty()), q.workload) {
        (Some(_), Some(_)) => return bad_request("give `labelSelector` or `workload`, not both"),
        (Some(text), None) => match Selector::parse(&text) {
            Ok(sel) => Some(PodSelector::Labels(sel)),
            Err(e) => return bad_request(&format!("labelSelector {text:?}: {e}")),
        },
        (None, Some(w)) => Some(PodSelector::Workload(w)),
        (None, None) => None,
    };
    match s.store.pods(&namespace, selector.as_ref()).await {
        Ok(pods) => Json(PodsAnswer {
            namespace,
            count: pods.len(),
            sum: pods.iter().map(|p| p.value).sum(),
            pods,
        })
        .into_response(),
        Err(e) => (StatusCode::SERVICE_UNAVAILABLE, format!("{e}\n")).into_response(),
    }
}

fn bad_request(msg: &str) -> Response {
    (StatusCode::BAD_REQUEST, format!("{msg}\n")).into_response()
}

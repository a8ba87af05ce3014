//! The operations port: `/healthz`, `/readyz`, `/metrics` and `/v1/pods`.
//!
//! `/healthz` is 200 while the process runs. `/readyz` is 200 once the ports
//! are bound and the store answers, 503 otherwise (a replica that cannot reach
//! Redis should get no KEDA traffic). `/v1/pods` shows what the scaler sees,
//! for debugging with curl.

use std::sync::{
    Arc,
    atomic::{AtomicBool, Ordering},
};

use axum::{
    Json, Router,
    extract::{Query, State},
    http::{StatusCode, header},
    response::{IntoResponse, Response},
    routing::get,
};
use serde::{Deserialize, Serialize};

use crate::{
    selector::Selector,
    store::{PodSelector, PodView, SharedStore},
    telemetry::Metrics,
};

/// What the HTTP handlers share.
#[derive(Clone)]
pub struct AppState {
    pub store: SharedStore,
    pub metrics: Arc<Metrics>,
    /// Set by the readiness probe task in `lib.rs`.
    pub ready: Arc<AtomicBool>,
}

pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/v1/pods", get(pods))
        .with_state(state)
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

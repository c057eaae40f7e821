//! Admin endpoints: Prometheus metrics, liveness, and readiness that names what it still
//! waits for.

use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};

use super::ApiState;

/// What the process still waits for (shared by every Waymark process).
pub use waymark_shared::lifecycle::readiness::Readiness;

pub async fn metrics(State(state): State<Arc<ApiState>>) -> Response {
    if let Some(link) = &state.etcd {
        link.observe(&state.metrics.etcd);
    }
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.metrics.encode(),
    )
        .into_response()
}

pub async fn live() -> &'static str {
    "live\n"
}

/// Ready once nothing is pending and the store can write: a resolver whose data dir is full
/// answers DNS but cannot take registrations.
pub async fn ready(State(state): State<Arc<ApiState>>) -> Response {
    let pending = state.ready.pending();
    let mut problems = Vec::new();
    if !pending.is_empty() {
        problems.push(format!("waiting for {}", pending.join(", ")));
    }
    if let Err(e) = state.registry.store_status() {
        problems.push(format!("the store cannot write: {e}"));
    }
    // With etcd away DNS keeps answering the last state it had: ready, but degraded.
    let degraded = state
        .etcd
        .as_ref()
        .map(|l| l.degraded())
        .unwrap_or_default();
    if problems.is_empty() && !degraded.is_empty() {
        (
            StatusCode::OK,
            format!("ready (degraded: {})\n", degraded.join("; ")),
        )
            .into_response()
    } else if problems.is_empty() {
        (StatusCode::OK, "ready\n".to_string()).into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {}\n", problems.join("; ")),
        )
            .into_response()
    }
}

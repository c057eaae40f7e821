//! The mesh CA over HTTP: `POST /v1/mesh/sign` signs a forwarder's certificate signing
//! request when it carries the join token (`Authorization: Bearer <token>` or
//! `X-Waymark-Join-Token`); `GET /v1/mesh/bundle` is the trust bundle (public: it holds only
//! certificates). See [`crate::ca`].

use std::sync::Arc;
use std::time::UNIX_EPOCH;

use axum::body::Body;
use axum::extract::State;
use axum::http::{header, HeaderMap};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::json;

use super::{json_body, read_body, ApiError, ApiState};
use crate::ca::CaError;
use crate::metrics::ResultLabels;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SignRequest {
    #[serde(rename = "Host")]
    host: String,
    /// PKCS#10, PEM.
    #[serde(rename = "CSR")]
    csr: String,
}

pub async fn sign(State(state): State<Arc<ApiState>>, headers: HeaderMap, body: Body) -> Response {
    let count = |result| {
        state
            .metrics
            .ca_signed
            .get_or_create(&ResultLabels { result })
            .inc()
    };
    let presented = headers
        .get_all(header::AUTHORIZATION)
        .iter()
        .filter_map(|v| v.to_str().ok()?.strip_prefix("Bearer ").map(str::trim))
        .chain(
            headers
                .get_all("x-waymark-join-token")
                .iter()
                .filter_map(|v| v.to_str().ok().map(str::trim)),
        )
        .any(|t| state.ca.is_join_token(t));
    if !presented {
        count("token");
        tracing::warn!("a certificate signing request without the join token was refused");
        return ApiError::Forbidden.into_response();
    }
    let result = async {
        let bytes = read_body(&state, body).await?;
        let req: SignRequest = serde_json::from_slice(&bytes)
            .map_err(|e| ApiError::BadRequest(format!("invalid sign request: {e}")))?;
        let ca = state.ca.clone();
        let ttl = state.config.ca.cert_ttl;
        // Signing is CPU work: off the async workers.
        let host = req.host.clone();
        tokio::task::spawn_blocking(move || ca.sign(&req.csr, &req.host, ttl))
            .await
            .map_err(|e| ApiError::Internal(e.to_string()))?
            .map_err(|e| match e {
                CaError::HostName(_) | CaError::Csr(_) => ApiError::BadRequest(e.to_string()),
                other => ApiError::Internal(other.to_string()),
            })
            .map(|issued| (host, issued))
    }
    .await;
    match result {
        Ok((host, issued)) => {
            count("issued");
            let not_after = issued
                .not_after
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            tracing::info!(
                host,
                spiffe_id = issued.spiffe_id,
                not_after,
                "certificate issued"
            );
            json_body(&json!({
                "Certificate": issued.certificate,
                "TrustBundle": issued.trust_bundle,
                "SpiffeID": issued.spiffe_id,
                "NotAfter": not_after,
            }))
        }
        Err(e) => {
            count("invalid");
            e.into_response()
        }
    }
}

pub async fn bundle(State(state): State<Arc<ApiState>>) -> Response {
    (
        [(header::CONTENT_TYPE, "application/x-pem-file")],
        state.ca.trust_bundle().to_string(),
    )
        .into_response()
}

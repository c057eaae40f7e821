//! Eureka-compatible registration: the part of Eureka's REST API that Eureka clients
//! (Spring Cloud Netflix, `py-eureka-client`, `eureka-js-client`) call, served under both
//! `/eureka/...` and `/eureka/v2/...`, beside the Consul-compatible API and over the same
//! registry, so a Eureka client's instances are answered by DNS like any other.
//!
//! What it owns, and where:
//! - [`codec`]: Eureka's JSON and XML, read and written; the status rules, `apps__hashcode`,
//!   the app name → service name mapping (pure, table-tested).
//! - [`view`]: the registry as Eureka clients see it (applications of instances), kept in
//!   step with the registry's change index; the recent changes that `/apps/delta` answers.
//! - [`handlers`]: the endpoints.
//!
//! How a Eureka registration maps onto the registry: the application `MY_APP` is the service
//! `my-app` (one service with any Consul registration of that name); `instanceId` is the
//! instance ID, `ipAddr` its address, the enabled port its port, `metadata` its metadata. Its
//! lease is a TTL check (`eureka-lease:<id>`) whose TTL is the lease's `durationInSecs` and
//! which deregisters the instance as soon as it expires: the instance goes exactly when its
//! duration passes without a renewal. Every status but `UP` (`DOWN`, `STARTING`,
//! `OUT_OF_SERVICE`, `UNKNOWN`) is maintenance: not answered. The rest of the registration
//! is kept with the definition ([`crate::registry::def::EurekaDef`]) and persisted with it.

pub mod codec;
pub mod handlers;
pub mod view;

use std::sync::Arc;

use axum::routing::{get, put};
use axum::Router;

use super::{ApiError, ApiState};

/// What can be wrong with a Eureka request.
#[derive(Debug, thiserror::Error)]
pub enum EurekaError {
    #[error("the registration cannot be read: {0}")]
    Body(String),
    #[error("the registration has no {0}")]
    Missing(&'static str),
    #[error("{field}: {why}")]
    Field { field: &'static str, why: String },
    #[error("application name {app:?} has no DNS service name: {reason}")]
    AppName { app: String, reason: &'static str },
    #[error("{0}")]
    Query(String),
    #[error("{0}")]
    NotFound(String),
    #[error(
        "instance {0:?} was registered through the Consul API: Eureka may not replace or \
         change it"
    )]
    NotEureka(String),
}

impl From<EurekaError> for ApiError {
    fn from(e: EurekaError) -> Self {
        match e {
            EurekaError::NotFound(_) => ApiError::NotFound(e.to_string()),
            _ => ApiError::BadRequest(e.to_string()),
        }
    }
}

/// The Eureka routes, relative to `/eureka` or `/eureka/v2`.
fn routes() -> Router<Arc<ApiState>> {
    use handlers as h;
    Router::new()
        .route("/apps", get(h::apps))
        .route("/apps/", get(h::apps))
        .route("/apps/delta", get(h::delta))
        .route("/apps/{app}", get(h::application).post(h::register))
        .route(
            "/apps/{app}/{id}",
            get(h::instance).put(h::renew).delete(h::cancel),
        )
        .route(
            "/apps/{app}/{id}/status",
            put(h::status_override).delete(h::delete_override),
        )
        .route("/apps/{app}/{id}/metadata", put(h::metadata))
        .route("/instances/{id}", get(h::instance_by_id))
        .route("/vips/{vip}", get(h::vip))
        .route("/svips/{svip}", get(h::svip))
}

/// The Eureka API under `/eureka` and `/eureka/v2` (Spring's default service URL is
/// `http://host:8761/eureka/`, Netflix's and eureka-js-client's `/eureka/v2/`).
pub fn router() -> Router<Arc<ApiState>> {
    Router::new()
        .nest("/eureka", routes())
        .nest("/eureka/v2", routes())
}

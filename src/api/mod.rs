//! The HTTP API (axum): one router per resource, merged here, with the layers every
//! request goes through (request IDs, tracing, body cap). Handlers are thin: parse,
//! call the store or domain, map the result.
//!
//! Route groups are split by who may call them — `public` (health), `read` and `admin`
//! — so the authentication layer of the portal API issue wraps each group as a whole.

pub mod credentials;
pub mod definitions;
pub mod error;
pub mod extract;
pub mod forge;
pub mod tasks;

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{Request, StatusCode};
use axum::response::Response;
use axum::routing::get;
use serde_json::json;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::trace::TraceLayer;

use crate::definitions::{Applications, Clusters, UploadLimits};
use crate::store::Store;
use error::{ApiError, Reply};

/// What handlers share.
#[derive(Clone)]
pub struct AppState {
    /// The store.
    pub store: Arc<dyn Store>,
    /// Upload limits.
    pub limits: UploadLimits,
    /// Compiled definitions, cached per version.
    pub forge: Arc<crate::forge::Forge>,
    /// Submits and follows tasks.
    pub mediator: Arc<crate::mediator::Mediator>,
}

impl AppState {
    /// State over `store`: a fresh forge cache and a mediator (not started yet).
    pub fn new(
        store: Arc<dyn Store>,
        limits: UploadLimits,
        key: Arc<crate::secrets::ServerKey>,
        mediator: crate::mediator::MediatorConfig,
    ) -> Self {
        let forge = Arc::new(crate::forge::Forge::new());
        let mediator = crate::mediator::Mediator::new(store.clone(), forge.clone(), key, mediator);
        Self { store, limits, forge, mediator }
    }
}

/// How long `/readyz` waits for the store before calling it not ready.
const READY_TIMEOUT: Duration = Duration::from_secs(3);

/// The request-ID header, set on every request that lacks one and echoed back.
pub const REQUEST_ID: &str = "x-request-id";

/// The whole API.
pub fn router(state: AppState, max_body_bytes: usize) -> Router {
    let request_id = axum::http::HeaderName::from_static(REQUEST_ID);
    // Per resource, the read and admin groups are merged before nesting; an auth
    // layer goes on each group (`route_layer`) before that merge.
    let v1 = Router::new()
        .nest(
            "/applications",
            definitions::read_routes::<Applications>()
                .merge(definitions::admin_routes::<Applications>())
                .merge(forge::schema_routes()),
        )
        .nest("/clusters", definitions::read_routes::<Clusters>().merge(definitions::admin_routes::<Clusters>()))
        .nest("/forge", forge::routes())
        .nest("/tasks", tasks::routes())
        .nest("/credentials", credentials::routes());
    let public = Router::new().route("/healthz", get(healthz)).route("/readyz", get(readyz));
    Router::new()
        .nest("/api/v1", v1)
        .merge(public)
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(state)
        .layer(DefaultBodyLimit::max(max_body_bytes))
        .layer(PropagateRequestIdLayer::new(request_id.clone()))
        .layer(TraceLayer::new_for_http().make_span_with(|req: &Request<_>| {
            let id = req.headers().get(REQUEST_ID).and_then(|v| v.to_str().ok()).unwrap_or("-");
            tracing::info_span!("request", method = %req.method(), path = %req.uri().path(), request_id = %id)
        }))
        .layer(SetRequestIdLayer::new(request_id, MakeRequestUuid))
}

/// Liveness: the process answers.
async fn healthz() -> Reply<serde_json::Value> {
    Reply::ok(json!({ "status": "ok" }), "alive")
}

/// Readiness: the store answers within a few seconds.
async fn readyz(State(st): State<AppState>) -> Result<Reply<serde_json::Value>, Response> {
    let backend = st.store.backend();
    match tokio::time::timeout(READY_TIMEOUT, st.store.ping()).await {
        Ok(Ok(())) => Ok(Reply::ok(json!({ "status": "ready", "store": backend }), format!("ready; store: {backend}"))),
        Ok(Err(e)) => {
            tracing::warn!(error = format!("{e:#}"), "not ready");
            Err(error::message_only(
                StatusCode::SERVICE_UNAVAILABLE,
                &format!("not ready: the {backend} store is unavailable"),
            ))
        }
        Err(_) => Err(error::message_only(
            StatusCode::SERVICE_UNAVAILABLE,
            &format!("not ready: the {backend} store did not answer within {} s", READY_TIMEOUT.as_secs()),
        )),
    }
}

async fn not_found(uri: axum::http::Uri) -> ApiError {
    ApiError::NotFound(format!("no such endpoint: {}", uri.path()))
}

async fn method_not_allowed(method: axum::http::Method, uri: axum::http::Uri) -> ApiError {
    ApiError::MethodNotAllowed(format!("{method} is not allowed on {}", uri.path()))
}

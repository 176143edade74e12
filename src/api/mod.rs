//! The HTTP API (axum): one router per resource, merged here, with the layers every
//! request goes through (request IDs, tracing, body cap) and the ones that decide who
//! may call what. Handlers are thin: parse, call the store or domain, map the result.
//!
//! Routes are registered with `utoipa-axum`, which adds a route and its OpenAPI
//! operation in one call, so the document served at `/api/v1/openapi.json` is built
//! from the same list the router is. Three groups:
//!
//! - public: `/healthz`, `/readyz`, the OpenAPI document, Swagger UI at `/docs`, the
//!   web page at `/` and its assets;
//! - every other `/api/v1` route needs a bearer token ([`auth::require_token`]);
//! - admin routes (definition writes, credentials, users, replicas, `/metrics`) need an admin
//!   token on top ([`auth::require_admin`]).

pub mod auth;
pub mod conformance;
pub mod credentials;
pub mod definitions;
pub mod error;
pub mod extract;
pub mod files;
pub mod forge;
pub mod frames;
pub mod limits;
pub mod openapi;
pub mod replicas;
pub mod resources;
pub mod streams;
pub mod tasks;
pub mod users;
pub mod web;

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{Request, StatusCode};
use axum::response::{IntoResponse, Response};
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::trace::TraceLayer;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::auth::Authenticator;
use crate::definitions::UploadLimits;
use crate::metrics::Metrics;
use crate::store::Store;
use error::{ApiError, ErrorBody, Reply};

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
    /// Checks tokens.
    pub auth: Arc<Authenticator>,
    /// Counters for `/metrics`.
    pub metrics: Arc<Metrics>,
    /// Per-user request limits (429).
    pub rate: Arc<limits::RateLimits>,
    /// Flips to `true` when the server shuts down: event streams end then, so a
    /// graceful shutdown is not held up by browsers that keep them open.
    pub shutdown: tokio::sync::watch::Receiver<bool>,
}

impl AppState {
    /// State over `store`: a fresh forge cache and a mediator (not started yet).
    /// `shutdown` ends the event streams when it turns `true`.
    pub fn new(
        store: Arc<dyn Store>,
        limits: UploadLimits,
        key: Arc<crate::secrets::ServerKey>,
        mediator: crate::mediator::MediatorConfig,
        rate: limits::RateConfig,
        shutdown: tokio::sync::watch::Receiver<bool>,
    ) -> Self {
        let forge = Arc::new(crate::forge::Forge::new());
        let metrics = Arc::new(Metrics::default());
        let mediator = crate::mediator::Mediator::new(store.clone(), forge.clone(), key, mediator, metrics.clone());
        let auth = Arc::new(Authenticator::new(store.clone()));
        Self { store, limits, forge, mediator, auth, metrics, rate: Arc::new(limits::RateLimits::new(rate)), shutdown }
    }
}

/// How long `/readyz` waits for the store before calling it not ready.
const READY_TIMEOUT: Duration = Duration::from_secs(3);

/// The request-ID header, set on every request that lacks one and echoed back.
pub const REQUEST_ID: &str = "x-request-id";

/// The routes that need a token, and those that need an admin's, as OpenAPI routers
/// (without their layers). One function so the router and the document agree.
fn protected_routes() -> (OpenApiRouter<AppState>, OpenApiRouter<AppState>) {
    let users = OpenApiRouter::new()
        .merge(definitions::applications::read_routes())
        .merge(definitions::clusters::read_routes())
        .merge(forge::routes())
        .merge(tasks::routes())
        .merge(frames::routes())
        .merge(files::routes())
        .merge(streams::routes())
        .merge(resources::routes())
        .merge(users::self_routes());
    let admins = OpenApiRouter::new()
        .merge(definitions::applications::admin_routes())
        .merge(definitions::clusters::admin_routes())
        .merge(credentials::routes())
        .merge(users::admin_routes())
        .merge(replicas::routes())
        .merge(resources::admin_routes())
        .routes(routes!(metrics));
    (users, admins)
}

/// Routes anyone may call.
fn public_routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(healthz)).routes(routes!(readyz))
}

/// The OpenAPI document of the whole API.
pub fn openapi() -> utoipa::openapi::OpenApi {
    let (users, admins) = protected_routes();
    let (_, mut doc) = OpenApiRouter::with_openapi(openapi::base()).merge(users).merge(admins).split_for_parts();
    let (_, admin_doc) = protected_routes().1.split_for_parts();
    let (_, public_doc) = public_routes().split_for_parts();
    openapi::finish(&mut doc, &public_doc, &admin_doc);
    doc
}

/// The whole API.
pub fn router(state: AppState, max_body_bytes: usize) -> Router {
    let request_id = axum::http::HeaderName::from_static(REQUEST_ID);
    let (users, admins) = protected_routes();
    let admins = admins.route_layer(axum::middleware::from_fn(auth::require_admin));
    let (protected, _) = users
        .merge(admins)
        .route_layer(axum::middleware::from_fn_with_state(state.clone(), auth::require_token))
        .split_for_parts();
    let (public, _) = public_routes().split_for_parts();
    let doc = Arc::new(openapi());
    Router::new()
        .merge(protected)
        .merge(public)
        .merge(openapi::routes(doc))
        .merge(web::routes())
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

/// What the health endpoints answer.
#[derive(Debug, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct Health {
    /// `ok` (alive) or `ready`.
    pub status: String,
    /// For readiness: which store (`embedded`, `mongodb`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub store: Option<String>,
}

/// Liveness: the process answers.
#[utoipa::path(
    get,
    path = "/healthz",
    tag = "health",
    responses((status = 200, description = "The process answers.", body = error::Ok<Health>))
)]
async fn healthz() -> Reply<Health> {
    Reply::ok(Health { status: "ok".into(), store: None }, "alive")
}

/// Readiness: the store answers within a few seconds.
#[utoipa::path(
    get,
    path = "/readyz",
    tag = "health",
    responses(
        (status = 200, description = "The store answers.", body = error::Ok<Health>),
        (status = 503, description = "The store does not answer.", body = ErrorBody),
    )
)]
async fn readyz(State(st): State<AppState>) -> Result<Reply<Health>, Response> {
    let backend = st.store.backend();
    match tokio::time::timeout(READY_TIMEOUT, st.store.ping()).await {
        Ok(Ok(())) => Ok(Reply::ok(
            Health { status: "ready".into(), store: Some(backend.to_owned()) },
            format!("ready; store: {backend}"),
        )),
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

/// Prometheus metrics: tasks by state, submissions, submit latency, SSH connections,
/// scheduler errors. Admin token required.
#[utoipa::path(
    get,
    path = "/metrics",
    tag = "operations",
    responses((status = 200, description = "Prometheus text format 0.0.4.", body = String, content_type = "text/plain"))
)]
async fn metrics(State(st): State<AppState>) -> Result<Response, ApiError> {
    let tasks = st.store.count_tasks().await?;
    let replicas = crate::mediator::replicas::list(st.store.as_ref(), time::OffsetDateTime::now_utc()).await?;
    let replicas: Vec<(String, bool, usize)> = replicas.into_iter().map(|r| (r.id, r.alive, r.holds.len())).collect();
    let pools = st.store.pools().await?;
    let text = st.metrics.render(&tasks, st.mediator.open_connections())
        + &crate::metrics::render_replicas(&replicas)
        + &crate::metrics::render_pools(&pools);
    let mut resp = text.into_response();
    resp.headers_mut().insert(
        axum::http::header::CONTENT_TYPE,
        axum::http::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    Ok(resp)
}

async fn not_found(uri: axum::http::Uri) -> ApiError {
    ApiError::NotFound(format!("no such endpoint: {}", uri.path()))
}

async fn method_not_allowed(method: axum::http::Method, uri: axum::http::Uri) -> ApiError {
    ApiError::MethodNotAllowed(format!("{method} is not allowed on {}", uri.path()))
}

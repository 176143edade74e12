//! The OpenAPI 3.1 document (`/api/v1/openapi.json`) and Swagger UI (`/docs`).
//!
//! Operations come from the `#[utoipa::path]` of each handler, registered together
//! with its route. [`finish`] then adds what is true of whole groups rather than of
//! one handler: the bearer-token security scheme, the 401/403/429 every protected
//! operation can answer, the 500/503 any can, and the tags.

use std::sync::Arc;

use axum::Router;
use utoipa::openapi::path::{HttpMethod, Operation};
use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityRequirement, SecurityScheme};
use utoipa::openapi::tag::TagBuilder;
use utoipa::openapi::{ContentBuilder, InfoBuilder, OpenApi, OpenApiBuilder, Ref, ResponseBuilder};
use utoipa_swagger_ui::SwaggerUi;

use super::AppState;

/// Where the document is served.
pub const SPEC_PATH: &str = "/api/v1/openapi.json";

/// Where Swagger UI is served.
pub const DOCS_PATH: &str = "/docs";

/// The name of the security scheme.
const BEARER: &str = "bearer";

/// The document before routes are added: info and the security scheme.
pub fn base() -> OpenApi {
    let mut doc = OpenApiBuilder::new()
        .info(
            InfoBuilder::new()
                .title("hpcforge")
                .version(env!("CARGO_PKG_VERSION"))
                .description(Some(
                    "The submission engine behind an HPC portal. Every answer is the envelope \
                     `{\"data\", \"message\"}`; errors add `\"errors\": [{\"pointer\", \"message\"}]`. \
                     Send `Authorization: Bearer <token>`; a portal token names the user it acts for \
                     in `X-Hpcforge-On-Behalf-Of`.",
                ))
                .build(),
        )
        .build();
    let components = doc.components.get_or_insert_with(Default::default);
    components.add_security_scheme(
        BEARER,
        SecurityScheme::Http(
            Http::builder()
                .scheme(HttpAuthScheme::Bearer)
                .bearer_format("hpcf_ token")
                .description(Some("A token made by `hpcforge user add` or `hpcforge token create`."))
                .build(),
        ),
    );
    doc
}

/// Every (path, method, operation) of `doc`, mutable.
fn operations_mut(doc: &mut OpenApi) -> Vec<(String, HttpMethod, &mut Operation)> {
    let mut out = Vec::new();
    for (path, item) in doc.paths.paths.iter_mut() {
        for (method, op) in [
            (HttpMethod::Get, item.get.as_mut()),
            (HttpMethod::Put, item.put.as_mut()),
            (HttpMethod::Post, item.post.as_mut()),
            (HttpMethod::Delete, item.delete.as_mut()),
            (HttpMethod::Patch, item.patch.as_mut()),
        ] {
            if let Some(op) = op {
                out.push((path.clone(), method, op));
            }
        }
    }
    out
}

/// Whether `doc` has an operation `method` at `path`.
fn has(doc: &OpenApi, path: &str, method: &HttpMethod) -> bool {
    doc.paths.paths.get(path).is_some_and(|item| match method {
        HttpMethod::Get => item.get.is_some(),
        HttpMethod::Put => item.put.is_some(),
        HttpMethod::Post => item.post.is_some(),
        HttpMethod::Delete => item.delete.is_some(),
        HttpMethod::Patch => item.patch.is_some(),
        _ => false,
    })
}

fn error_response(description: &str) -> utoipa::openapi::Response {
    ResponseBuilder::new()
        .description(description)
        .content("application/json", ContentBuilder::new().schema(Some(Ref::from_schema_name("ErrorBody"))).build())
        .build()
}

/// Adds the group-wide parts to `doc` (see the module docs). `public` and `admin`
/// hold the operations of those groups; every other operation needs a token.
pub fn finish(doc: &mut OpenApi, public: &OpenApi, admin: &OpenApi) {
    // Public operations live in their own document; bring them in.
    for (path, item) in &public.paths.paths {
        doc.paths.paths.insert(path.clone(), item.clone());
    }
    if let Some(c) = &public.components {
        let mine = doc.components.get_or_insert_with(Default::default);
        for (name, schema) in &c.schemas {
            mine.schemas.entry(name.clone()).or_insert_with(|| schema.clone());
        }
    }
    {
        use utoipa::PartialSchema as _;
        let schemas = &mut doc.components.get_or_insert_with(Default::default).schemas;
        schemas.entry("ErrorBody".to_owned()).or_insert_with(super::error::ErrorBody::schema);
        schemas.entry("Problem".to_owned()).or_insert_with(crate::model::Problem::schema);
    }
    let mut renamed = Vec::new();
    for (path, method, op) in operations_mut(doc) {
        let is_public = has(public, &path, &method);
        let is_admin = has(admin, &path, &method);
        let responses = &mut op.responses.responses;
        let mut add = |status: &str, description: &str| {
            responses.entry(status.to_owned()).or_insert_with(|| error_response(description).into());
        };
        if is_public {
            op.security = Some(Vec::new());
        } else {
            op.security = Some(vec![SecurityRequirement::new(BEARER, Vec::<String>::new())]);
            add("401", "No token, or a token that is unknown, expired or revoked.");
            add("429", "Too many requests of this kind; retry after `Retry-After` seconds.");
            add(
                "403",
                if is_admin {
                    "The token is not an admin's."
                } else {
                    "`X-Hpcforge-On-Behalf-Of` was sent with a token that is not a portal's, or names a user the portal cannot act for."
                },
            );
        }
        add("500", "A bug or an unexpected failure; the server log has the details.");
        add("503", "The store (or a cluster) is unavailable; retry after `Retry-After` seconds.");
        if path.contains("{*") {
            renamed.push(path);
        }
    }
    // axum's catch-all `{*path}` is OpenAPI's `{path}` (which may contain `/`).
    for path in renamed {
        if let Some(item) = doc.paths.paths.shift_remove(&path) {
            doc.paths.paths.insert(path.replace("{*", "{"), item);
        }
    }
    doc.tags = Some(
        [
            ("tasks", "Submit tasks, follow their phase jobs, cancel and restart them."),
            ("applications", "Application definitions: input specs and per-phase scripts."),
            ("clusters", "Cluster definitions: host, scheduler, limits and forge templates."),
            ("forge", "Preview the scripts a task would get."),
            ("users", "Accounts and their tokens."),
            ("credentials", "Users' SSH keys per cluster (admin)."),
            ("replicas", "The servers sharing this store (admin)."),
            ("resources", "The site's pools: licences and users' shares of clusters, and the queue in front of them."),
            ("operations", "Metrics."),
            ("health", "Liveness and readiness."),
        ]
        .into_iter()
        .map(|(name, description)| TagBuilder::new().name(name).description(Some(description)).build())
        .collect(),
    );
}

/// The document as JSON, and Swagger UI reading it.
pub fn routes(doc: Arc<OpenApi>) -> Router<AppState> {
    let config = utoipa_swagger_ui::Config::new([SPEC_PATH]).persist_authorization(true).try_it_out_enabled(true);
    Router::from(SwaggerUi::new(DOCS_PATH).url(SPEC_PATH, (*doc).clone()).config(config))
}

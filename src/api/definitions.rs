//! Routes for application and cluster definitions: create, replace, list, get, delete,
//! version history, and the stored files of any version. The logic is written once,
//! generic over [`Kind`]; [`kind_routes!`] declares the documented handlers of each
//! kind (`/api/v1/applications`, `/api/v1/clusters`), since an OpenAPI operation
//! has one path.

use axum::extract::{Path, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use super::AppState;
use super::auth::Caller;
use super::error::{ApiError, Reply};
use super::extract::JsonBody;
use crate::definitions::{Kind, Upload};
use crate::model::{Problem, Problems, UserName};
use crate::store::{Precondition, Revision, StoredFile};

/// A definition upload as the API takes it (`PUT`/`POST`); the definition's fields
/// are described in docs/definitions.md.
#[derive(Debug, utoipa::ToSchema)]
#[allow(dead_code)] // describes the body for the OpenAPI document only
pub struct DefinitionUpload {
    /// `application.toml` or `cluster.toml`, as JSON.
    #[schema(value_type = Object)]
    definition: serde_json::Value,
    /// Script text by relative path (`app_execute`, `cluster/<name>`, `forge/script_common`).
    files: std::collections::BTreeMap<String, String>,
}

/// Declares the documented handlers and the two routers of one kind of definition.
macro_rules! kind_routes {
    ($module:ident, $kind:ty, $tag:literal, $root:literal, $one:literal, $versions:literal, $version:literal,
     $file:literal, $version_file:literal) => {
        /// Routes of one kind of definition.
        pub mod $module {
            use axum::extract::{Path, State};
            use axum::response::Response;
            use utoipa_axum::router::OpenApiRouter;
            use utoipa_axum::routes;

            use super::{DefinitionUpload, Pushed};
            use crate::api::AppState;
            use crate::api::auth::Caller;
            use crate::api::error::{ApiError, ErrorBody, Ok, Reply};
            use crate::api::extract::JsonBody;
            use crate::definitions::Upload;
            use crate::store::Revision;

            type K = $kind;

            /// Read routes: anyone with a token may see what can be run where.
            pub fn read_routes() -> OpenApiRouter<AppState> {
                OpenApiRouter::new()
                    .routes(routes!(list))
                    .routes(routes!(current))
                    .routes(routes!(history))
                    .routes(routes!(version))
                    .routes(routes!(current_file))
                    .routes(routes!(version_file))
            }

            /// Write routes: admin only.
            pub fn admin_routes() -> OpenApiRouter<AppState> {
                OpenApiRouter::new().routes(routes!(create)).routes(routes!(replace)).routes(routes!(delete))
            }

            /// The current definitions, by name.
            #[utoipa::path(get, path = $root, tag = $tag,
                responses((status = 200, description = "The current version of each definition.", body = Ok<Vec<Revision>>)))]
            async fn list(st: State<AppState>) -> Result<Reply<Vec<Revision>>, ApiError> {
                super::list::<K>(st).await
            }

            /// Creates a definition; 409 if a current one has the name.
            #[utoipa::path(post, path = $root, tag = $tag, request_body = DefinitionUpload,
                responses(
                    (status = 201, description = "Stored as a new version.", body = Ok<Pushed>),
                    (status = 400, description = "The body is not JSON, or not readable.", body = ErrorBody),
                    (status = 409, description = "A current definition has this name.", body = ErrorBody),
                    (status = 413, description = "The body is over the size cap.", body = ErrorBody),
                    (status = 415, description = "The body is not declared as JSON.", body = ErrorBody),
                    (status = 422, description = "The upload has problems; all are listed.", body = ErrorBody),
                ))]
            async fn create(
                st: State<AppState>,
                caller: Caller,
                body: JsonBody<Upload<<K as crate::definitions::Kind>::Spec>>,
            ) -> Result<Response, ApiError> {
                super::create::<K>(st, caller, body).await
            }

            /// Creates or replaces a definition (201 for version 1, 200 for a later one).
            #[utoipa::path(put, path = $one, tag = $tag, request_body = DefinitionUpload,
                params(("name" = String, Path, description = "The definition's name.")),
                responses(
                    (status = 200, description = "Stored as a new version.", body = Ok<Pushed>),
                    (status = 201, description = "Stored as version 1.", body = Ok<Pushed>),
                    (status = 400, description = "A bad name, or a body that is not readable JSON.", body = ErrorBody),
                    (status = 409, description = "A concurrent upload won; try again.", body = ErrorBody),
                    (status = 413, description = "The body is over the size cap.", body = ErrorBody),
                    (status = 415, description = "The body is not declared as JSON.", body = ErrorBody),
                    (status = 422, description = "The upload has problems; all are listed.", body = ErrorBody),
                ))]
            async fn replace(
                st: State<AppState>,
                name: Path<String>,
                caller: Caller,
                body: JsonBody<Upload<<K as crate::definitions::Kind>::Spec>>,
            ) -> Result<Reply<Pushed>, ApiError> {
                super::replace::<K>(st, name, caller, body).await
            }

            /// Deletes a definition: a tombstone version; old versions stay readable.
            #[utoipa::path(delete, path = $one, tag = $tag,
                params(("name" = String, Path, description = "The definition's name.")),
                responses(
                    (status = 200, description = "The tombstone revision.", body = Ok<Revision>),
                    (status = 400, description = "Not a valid name.", body = ErrorBody),
                    (status = 404, description = "No current definition of that name.", body = ErrorBody),
                ))]
            async fn delete(st: State<AppState>, name: Path<String>, caller: Caller) -> Result<Reply<Revision>, ApiError> {
                super::delete::<K>(st, name, caller).await
            }

            /// The current version of a definition.
            #[utoipa::path(get, path = $one, tag = $tag,
                params(("name" = String, Path, description = "The definition's name.")),
                responses(
                    (status = 200, description = "The current revision.", body = Ok<Revision>),
                    (status = 400, description = "Not a valid name.", body = ErrorBody),
                    (status = 404, description = "No such definition, or it was deleted (the message says when).", body = ErrorBody),
                ))]
            async fn current(st: State<AppState>, name: Path<String>) -> Result<Reply<Revision>, ApiError> {
                super::current::<K>(st, name).await
            }

            /// Every version of a definition, oldest first (tombstones included).
            #[utoipa::path(get, path = $versions, tag = $tag,
                params(("name" = String, Path, description = "The definition's name.")),
                responses(
                    (status = 200, description = "Every revision.", body = Ok<Vec<Revision>>),
                    (status = 400, description = "Not a valid name.", body = ErrorBody),
                    (status = 404, description = "No such definition.", body = ErrorBody),
                ))]
            async fn history(st: State<AppState>, name: Path<String>) -> Result<Reply<Vec<Revision>>, ApiError> {
                super::history::<K>(st, name).await
            }

            /// One version of a definition.
            #[utoipa::path(get, path = $version, tag = $tag,
                params(
                    ("name" = String, Path, description = "The definition's name."),
                    ("version" = u32, Path, description = "The version (1, 2, ...)."),
                ),
                responses(
                    (status = 200, description = "The revision.", body = Ok<Revision>),
                    (status = 400, description = "Not a valid name or version.", body = ErrorBody),
                    (status = 404, description = "No such version.", body = ErrorBody),
                ))]
            async fn version(st: State<AppState>, p: Path<(String, String)>) -> Result<Reply<Revision>, ApiError> {
                super::version::<K>(st, p).await
            }

            /// A file of the current version, as text; its sha256 is the ETag.
            #[utoipa::path(get, path = $file, tag = $tag,
                params(
                    ("name" = String, Path, description = "The definition's name."),
                    ("path" = String, Path, description = "The file's path in the definition (may contain `/`)."),
                ),
                responses(
                    (status = 200, description = "The file.", body = String, content_type = "text/plain"),
                    (status = 400, description = "Not a valid name.", body = ErrorBody),
                    (status = 404, description = "No such definition or file.", body = ErrorBody),
                ))]
            async fn current_file(st: State<AppState>, p: Path<(String, String)>) -> Result<Response, ApiError> {
                super::current_file::<K>(st, p).await
            }

            /// A file of one version, as text; its sha256 is the ETag.
            #[utoipa::path(get, path = $version_file, tag = $tag,
                params(
                    ("name" = String, Path, description = "The definition's name."),
                    ("version" = u32, Path, description = "The version."),
                    ("path" = String, Path, description = "The file's path in the definition (may contain `/`)."),
                ),
                responses(
                    (status = 200, description = "The file.", body = String, content_type = "text/plain"),
                    (status = 400, description = "Not a valid name or version.", body = ErrorBody),
                    (status = 404, description = "No such version or file.", body = ErrorBody),
                ))]
            async fn version_file(st: State<AppState>, p: Path<(String, String, String)>) -> Result<Response, ApiError> {
                super::version_file::<K>(st, p).await
            }
        }
    };
}

kind_routes!(
    applications,
    crate::definitions::Applications,
    "applications",
    "/api/v1/applications",
    "/api/v1/applications/{name}",
    "/api/v1/applications/{name}/versions",
    "/api/v1/applications/{name}/versions/{version}",
    "/api/v1/applications/{name}/files/{*path}",
    "/api/v1/applications/{name}/versions/{version}/files/{*path}"
);

kind_routes!(
    clusters,
    crate::definitions::Clusters,
    "clusters",
    "/api/v1/clusters",
    "/api/v1/clusters/{name}",
    "/api/v1/clusters/{name}/versions",
    "/api/v1/clusters/{name}/versions/{version}",
    "/api/v1/clusters/{name}/files/{*path}",
    "/api/v1/clusters/{name}/versions/{version}/files/{*path}"
);

/// What a successful push answers.
#[derive(Debug, Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct Pushed {
    /// The stored revision.
    #[serde(flatten)]
    pub revision: Revision,
    /// What normalisation changed (`app_execute: converted 3 CRLF line endings to LF`).
    pub notes: Vec<String>,
}

fn checked_name<K: Kind>(name: &str) -> Result<(), ApiError> {
    K::check_name(name).map_err(|e| ApiError::BadRequest {
        message: format!("`{}` is not a valid {} name", name.escape_debug(), K::KIND.singular()),
        problems: Problems::from(Problem::new("", e.to_string())),
    })
}

fn parse_version(text: &str) -> Result<u32, ApiError> {
    text.parse::<u32>().ok().filter(|v| *v > 0).ok_or_else(|| ApiError::BadRequest {
        message: format!("`{}` is not a version number (1, 2, 3...)", text.escape_debug()),
        problems: Problems::default(),
    })
}

fn not_found<K: Kind>(name: &str) -> ApiError {
    ApiError::NotFound(format!("there is no {} named `{name}`", K::KIND.singular()))
}

async fn list<K: Kind>(State(st): State<AppState>) -> Result<Reply<Vec<Revision>>, ApiError> {
    let all = st.store.list_current(K::KIND).await?;
    let n = all.len();
    Ok(Reply::ok(all, format!("{n} {}", if n == 1 { K::KIND.singular() } else { K::KIND.plural() })))
}

async fn push<K: Kind>(
    st: &AppState,
    upload: Upload<K::Spec>,
    precondition: Precondition,
    by: &UserName,
) -> Result<Reply<Pushed>, ApiError> {
    let what = format!("the {} upload", K::KIND.singular());
    let checked = K::check(upload, &st.limits).map_err(|p| ApiError::invalid(&what, p))?;
    let revision = st.store.put_revision(&checked, precondition, by, time::OffsetDateTime::now_utc()).await;
    st.forge.forget(K::KIND, &checked.name);
    let revision = revision?;
    tracing::info!(
        kind = K::KIND.singular(),
        name = revision.name,
        version = revision.version,
        files = revision.files.len(),
        by = %by,
        "definition stored"
    );
    let message = format!("{} `{}` stored as version {}", K::KIND.singular(), revision.name, revision.version);
    let pushed = Pushed { revision, notes: checked.notes };
    Ok(if pushed.revision.version == 1 { Reply::created(pushed, message) } else { Reply::ok(pushed, message) })
}

/// `POST /`: create; 409 if a current definition of that name exists.
async fn create<K: Kind>(
    State(st): State<AppState>,
    caller: Caller,
    JsonBody(upload): JsonBody<Upload<K::Spec>>,
) -> Result<Response, ApiError> {
    let mut reply = push::<K>(&st, upload, Precondition::Absent, &caller.principal.user).await?.into_response();
    // A create after a delete makes version N > 1; it is still a creation.
    *reply.status_mut() = StatusCode::CREATED;
    Ok(reply)
}

/// `PUT /{name}`: create or replace. 201 for version 1, 200 for a new version.
async fn replace<K: Kind>(
    State(st): State<AppState>,
    Path(name): Path<String>,
    caller: Caller,
    JsonBody(upload): JsonBody<Upload<K::Spec>>,
) -> Result<Reply<Pushed>, ApiError> {
    checked_name::<K>(&name)?;
    let in_body = K::spec_name(&upload.definition);
    if in_body != name {
        let mut p = Problems::default();
        p.push("/definition/name", format!("the definition is named `{in_body}` but the URL names `{name}`"));
        return Err(ApiError::invalid(&format!("the {} upload", K::KIND.singular()), p));
    }
    push::<K>(&st, upload, Precondition::Any, &caller.principal.user).await
}

/// `DELETE /{name}`: appends a tombstone; old versions stay readable.
async fn delete<K: Kind>(
    State(st): State<AppState>,
    Path(name): Path<String>,
    caller: Caller,
) -> Result<Reply<Revision>, ApiError> {
    checked_name::<K>(&name)?;
    let by = &caller.principal.user;
    let deleted = st.store.delete_definition(K::KIND, &name, by, time::OffsetDateTime::now_utc()).await;
    st.forge.forget(K::KIND, &name);
    let Some(tomb) = deleted? else {
        return Err(not_found::<K>(&name));
    };
    tracing::info!(kind = K::KIND.singular(), name, version = tomb.version, by = %by, "definition deleted");
    let message = format!(
        "{} `{name}` deleted (version {}); versions 1 to {} stay readable",
        K::KIND.singular(),
        tomb.version,
        tomb.version - 1
    );
    Ok(Reply::ok(tomb, message))
}

/// The current revision, or a 404 that says when it was deleted.
async fn current_revision<K: Kind>(st: &AppState, name: &str) -> Result<Revision, ApiError> {
    checked_name::<K>(name)?;
    match st.store.latest_revision(K::KIND, name).await? {
        None => Err(not_found::<K>(name)),
        Some(r) if r.deleted => Err(ApiError::NotFound(format!(
            "{} `{name}` was deleted by {} at {} (version {}); earlier versions stay readable under /versions",
            K::KIND.singular(),
            r.uploaded_by,
            r.uploaded_at,
            r.version
        ))),
        Some(r) => Ok(r),
    }
}

async fn current<K: Kind>(State(st): State<AppState>, Path(name): Path<String>) -> Result<Reply<Revision>, ApiError> {
    let r = current_revision::<K>(&st, &name).await?;
    let message = format!("{} `{name}` version {}", K::KIND.singular(), r.version);
    Ok(Reply::ok(r, message))
}

async fn history<K: Kind>(
    State(st): State<AppState>,
    Path(name): Path<String>,
) -> Result<Reply<Vec<Revision>>, ApiError> {
    checked_name::<K>(&name)?;
    let all = st.store.history(K::KIND, &name).await?;
    if all.is_empty() {
        return Err(not_found::<K>(&name));
    }
    let message =
        format!("{} version{} of {} `{name}`", all.len(), if all.len() == 1 { "" } else { "s" }, K::KIND.singular());
    Ok(Reply::ok(all, message))
}

async fn version<K: Kind>(
    State(st): State<AppState>,
    Path((name, version)): Path<(String, String)>,
) -> Result<Reply<Revision>, ApiError> {
    checked_name::<K>(&name)?;
    let v = parse_version(&version)?;
    let r = st
        .store
        .revision(K::KIND, &name, v)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("{} `{name}` has no version {v}", K::KIND.singular())))?;
    Ok(Reply::ok(r, format!("{} `{name}` version {v}", K::KIND.singular())))
}

/// A stored file as `text/plain`, with its sha256 as the ETag.
fn file_response(file: StoredFile) -> Response {
    let mut resp = file.text.into_response();
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    for (name, value) in [
        (header::ETAG.as_str(), format!("\"{}\"", file.meta.sha256)),
        ("x-hpcforge-sha256", file.meta.sha256.clone()),
        ("x-hpcforge-version", file.meta.version.to_string()),
        ("x-hpcforge-filename", file.meta.filename.clone()),
        ("x-hpcforge-uploaded-by", file.uploaded_by.to_string()),
    ] {
        if let Ok(v) = HeaderValue::from_str(&value) {
            h.insert(axum::http::HeaderName::from_bytes(name.as_bytes()).expect("static header names"), v);
        }
    }
    resp
}

async fn read_file<K: Kind>(st: &AppState, name: &str, version: u32, path: &str) -> Result<Response, ApiError> {
    let file = st.store.read_file(K::KIND, name, version, path).await?.ok_or_else(|| {
        ApiError::NotFound(format!(
            "{} `{name}` version {version} has no file `{}`",
            K::KIND.singular(),
            path.escape_debug()
        ))
    })?;
    Ok(file_response(file))
}

async fn current_file<K: Kind>(
    State(st): State<AppState>,
    Path((name, path)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let r = current_revision::<K>(&st, &name).await?;
    read_file::<K>(&st, &name, r.version, &path).await
}

async fn version_file<K: Kind>(
    State(st): State<AppState>,
    Path((name, version, path)): Path<(String, String, String)>,
) -> Result<Response, ApiError> {
    checked_name::<K>(&name)?;
    let v = parse_version(&version)?;
    read_file::<K>(&st, &name, v, &path).await
}

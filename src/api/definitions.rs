//! Routes for application and cluster definitions: create, replace, list, get, delete,
//! version history, and the stored files of any version. Written once, generic over
//! [`Kind`], mounted at `/api/v1/applications` and `/api/v1/clusters`.

use axum::Router;
use axum::extract::{Path, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde::Serialize;

use super::AppState;
use super::error::{ApiError, Reply};
use super::extract::{Actor, JsonBody};
use crate::definitions::{Kind, Upload};
use crate::model::{Problem, Problems};
use crate::store::{Precondition, Revision, StoredFile};

/// Read routes: anyone who may use the API may see what can be run where.
pub fn read_routes<K: Kind>() -> Router<AppState> {
    Router::new()
        .route("/", get(list::<K>))
        .route("/{name}", get(current::<K>))
        .route("/{name}/versions", get(history::<K>))
        .route("/{name}/versions/{version}", get(version::<K>))
        .route("/{name}/files/{*path}", get(current_file::<K>))
        .route("/{name}/versions/{version}/files/{*path}", get(version_file::<K>))
}

/// Write routes: admin only, once authentication exists. Kept in their own router so
/// an authorisation layer can wrap exactly these.
pub fn admin_routes<K: Kind>() -> Router<AppState> {
    Router::new()
        .route("/", axum::routing::post(create::<K>))
        .route("/{name}", axum::routing::put(replace::<K>).delete(delete::<K>))
}

/// What a successful push answers.
#[derive(Debug, Serialize, serde::Deserialize)]
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
    actor: &Actor,
) -> Result<Reply<Pushed>, ApiError> {
    let what = format!("the {} upload", K::KIND.singular());
    let checked = K::check(upload, &st.limits).map_err(|p| ApiError::invalid(&what, p))?;
    let revision = st.store.put_revision(&checked, precondition, &actor.0, time::OffsetDateTime::now_utc()).await?;
    tracing::info!(
        kind = K::KIND.singular(),
        name = revision.name,
        version = revision.version,
        files = revision.files.len(),
        by = %actor.0,
        "definition stored"
    );
    let message = format!("{} `{}` stored as version {}", K::KIND.singular(), revision.name, revision.version);
    let pushed = Pushed { revision, notes: checked.notes };
    Ok(if pushed.revision.version == 1 { Reply::created(pushed, message) } else { Reply::ok(pushed, message) })
}

/// `POST /`: create; 409 if a current definition of that name exists.
async fn create<K: Kind>(
    State(st): State<AppState>,
    actor: Actor,
    JsonBody(upload): JsonBody<Upload<K::Spec>>,
) -> Result<Response, ApiError> {
    let mut reply = push::<K>(&st, upload, Precondition::Absent, &actor).await?.into_response();
    // A create after a delete makes version N > 1; it is still a creation.
    *reply.status_mut() = StatusCode::CREATED;
    Ok(reply)
}

/// `PUT /{name}`: create or replace. 201 for version 1, 200 for a new version.
async fn replace<K: Kind>(
    State(st): State<AppState>,
    Path(name): Path<String>,
    actor: Actor,
    JsonBody(upload): JsonBody<Upload<K::Spec>>,
) -> Result<Reply<Pushed>, ApiError> {
    checked_name::<K>(&name)?;
    let in_body = K::spec_name(&upload.definition);
    if in_body != name {
        let mut p = Problems::default();
        p.push("/definition/name", format!("the definition is named `{in_body}` but the URL names `{name}`"));
        return Err(ApiError::invalid(&format!("the {} upload", K::KIND.singular()), p));
    }
    push::<K>(&st, upload, Precondition::Any, &actor).await
}

/// `DELETE /{name}`: appends a tombstone; old versions stay readable.
async fn delete<K: Kind>(
    State(st): State<AppState>,
    Path(name): Path<String>,
    actor: Actor,
) -> Result<Reply<Revision>, ApiError> {
    checked_name::<K>(&name)?;
    let Some(tomb) = st.store.delete_definition(K::KIND, &name, &actor.0, time::OffsetDateTime::now_utc()).await?
    else {
        return Err(not_found::<K>(&name));
    };
    tracing::info!(kind = K::KIND.singular(), name, version = tomb.version, by = %actor.0, "definition deleted");
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

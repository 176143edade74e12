//! A task's files: its run directory listed, one file downloaded (whole, or a byte
//! range with `Range`), and its outputs as one tarball, streamed from the cluster as
//! the task's owner without being held in the server's memory
//! ([`crate::mediator::files`]).

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::AppState;
use super::auth::Caller;
use super::error::{ApiError, ErrorBody, Ok, Reply};
use super::extract::QueryArgs;
use super::tasks::task_id;
use crate::mediator::files::{ByteRange, DownloadError, FileSource, RunFiles};

/// The header that says where a download's bytes come from: `cluster` (the run
/// directory) or `archive` (the outputs kept in the store when the task ended).
pub const SOURCE: header::HeaderName = header::HeaderName::from_static("hpcforge-source");

/// `/api/v1/tasks/{id}/files`, `.../files/{path}` and `.../outputs.tar.gz`.
pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(list)).routes(routes!(download)).routes(routes!(outputs))
}

/// The task's run directory, listed on the cluster as its owner: every entry (the
/// engine's `.hpcforge` folder included) with its kind, size and modification time,
/// at most 10,000 (`left_out` counts the rest). When the run directory is gone (a
/// scratch purge, an expired workspace) or the cluster cannot be reached, and the
/// application keeps its outputs in the store (`[archive]`), the kept outputs are
/// listed instead, with their sha256 (`source: "archive"`).
#[utoipa::path(get, path = "/api/v1/tasks/{id}/files", tag = "tasks",
    params(("id" = String, Path, description = "Task ID, or its URI (`hpcforge://<site>/tasks/<id>`, percent-encoded).")),
    responses(
        (status = 200, description = "The entries, in path order.", body = Ok<RunFiles>),
        (status = 400, description = "A portal named no user.", body = ErrorBody),
        (status = 404, description = "No such task, or its run directory does not exist.", body = ErrorBody),
        (status = 409, description = "The cluster cannot be read as this user (no key registered).", body = ErrorBody),
        (status = 503, description = "The cluster could not be asked.", body = ErrorBody),
    ))]
async fn list(State(st): State<AppState>, caller: Caller, Path(id): Path<String>) -> Result<Reply<RunFiles>, ApiError> {
    let task = st.mediator.task_state_for(&task_id(&st, &id)?, &caller.access()?).await?;
    let files = st.mediator.list_files(&task).await?;
    let n = files.files.len();
    let more = if files.left_out > 0 { format!(" ({} more not listed)", files.left_out) } else { String::new() };
    let message = match files.source {
        FileSource::Cluster => format!("{n} entr{} in {}{more}", if n == 1 { "y" } else { "ies" }, task.run_dir),
        FileSource::Archive => format!(
            "{n} output{} kept in the store (the run directory {} is gone or cannot be reached)",
            if n == 1 { "" } else { "s" },
            task.run_dir
        ),
    };
    Ok(Reply::ok(files, message))
}

/// One file of the task's run directory, read on the cluster as the task's owner and
/// streamed as it comes; a file kept in the store when the task ended is served
/// from there (`Hpcforge-Source: archive`), whatever became of the run directory. `Range: bytes=FIRST-LAST` (or `FIRST-`, `-COUNT`) asks for
/// part of it (206, `Content-Range`); a range past the end is 416. A path with `..`,
/// or that leads out of the run directory through a symbolic link, is refused (422).
/// The path may hold slashes as they are (`files/out/frame-1.ppm`) or percent-encoded.
#[utoipa::path(get, path = "/api/v1/tasks/{id}/files/{*path}", tag = "tasks",
    params(
        ("id" = String, Path, description = "Task ID, or its URI (`hpcforge://<site>/tasks/<id>`, percent-encoded)."),
        ("path" = String, Path, description = "The file, relative to the run directory."),
        ("Range" = Option<String>, Header, description = "One byte range: `bytes=0-499`, `bytes=500-`, `bytes=-500`."),
    ),
    responses(
        (status = 200, description = "The whole file.", body = Vec<u8>, content_type = "application/octet-stream"),
        (status = 206, description = "The range asked for (`Content-Range` says which).", body = Vec<u8>, content_type = "application/octet-stream"),
        (status = 400, description = "A `Range` that cannot be read, or a portal that named no user.", body = ErrorBody),
        (status = 404, description = "No such task, or no such file (or not a regular file).", body = ErrorBody),
        (status = 409, description = "The cluster cannot be read as this user (no key registered).", body = ErrorBody),
        (status = 416, description = "The range starts past the file's end (`Content-Range: bytes */SIZE`).", body = ErrorBody),
        (status = 422, description = "The path is absolute, holds `..`, or leads out of the run directory.", body = ErrorBody),
        (status = 503, description = "The cluster could not be asked.", body = ErrorBody),
    ))]
async fn download(
    State(st): State<AppState>,
    caller: Caller,
    Path((id, path)): Path<(String, String)>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    serve(st, caller, id, path, headers).await
}

async fn serve(
    st: AppState,
    caller: Caller,
    id: String,
    path: String,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let task = st.mediator.task_state_for(&task_id(&st, &id)?, &caller.access()?).await?;
    let range = match headers.get(header::RANGE) {
        None => None,
        Some(v) => {
            let text = v.to_str().map_err(|_| bad_request("the `Range` header is not text".into()))?;
            ByteRange::parse(text).map_err(bad_request)?
        }
    };
    let d = match st.mediator.download(&task, &path, range).await {
        Result::Ok(d) => d,
        Err(DownloadError::Refused(e)) => return Err(e.into()),
        Err(DownloadError::Unsatisfiable(size)) => {
            let mut resp =
                ApiError::NotFound(format!("the range asked for starts past the end of {path} ({size} bytes)"))
                    .into_response();
            *resp.status_mut() = StatusCode::RANGE_NOT_SATISFIABLE;
            if let Result::Ok(v) = HeaderValue::from_str(&format!("bytes */{size}")) {
                resp.headers_mut().insert(header::CONTENT_RANGE, v);
            }
            return Ok(resp);
        }
    };
    let length = d.span.map_or(0, |(a, b)| b - a + 1);
    tracing::info!(task = %task.id, owner = %task.owner, path = d.path, bytes = length, source = d.source.as_str(), "download");
    let mut resp = streamed(d.body).into_response();
    let h = resp.headers_mut();
    h.insert(SOURCE, HeaderValue::from_static(d.source.as_str()));
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/octet-stream"));
    h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(length));
    let name = d.path.rsplit('/').next().unwrap_or("file");
    let safe: String =
        name.chars().map(|c| if c.is_ascii_graphic() && c != '"' && c != '\\' { c } else { '_' }).collect();
    if let Result::Ok(v) = HeaderValue::from_str(&format!("attachment; filename=\"{safe}\"")) {
        h.insert(header::CONTENT_DISPOSITION, v);
    }
    let modified = d.modified.to_offset(time::UtcOffset::UTC);
    if let Result::Ok(text) = modified.format(&time::format_description::well_known::Rfc2822)
        && let Result::Ok(v) = HeaderValue::from_str(&text.replace("+0000", "GMT"))
    {
        h.insert(header::LAST_MODIFIED, v);
    }
    if d.partial
        && let Some((a, b)) = d.span
    {
        if let Result::Ok(v) = HeaderValue::from_str(&format!("bytes {a}-{b}/{}", d.size)) {
            h.insert(header::CONTENT_RANGE, v);
        }
        *resp.status_mut() = StatusCode::PARTIAL_CONTENT;
    }
    Ok(resp)
}

/// The task's outputs as one gzipped tarball, streamed from the cluster as the
/// task's owner as `tar` writes it (the server holds a few chunks of it at a time):
/// the application's `outputs` globs, or the files and folders named by `path`
/// (repeatable). Staged inputs are never in it; nor is what a symbolic link out of
/// the run directory points to. A failure while streaming breaks the transfer. The
/// declared outputs of a task that kept them all in the store come from the store;
/// if some were left out, from the cluster while it has them, else from the store
/// (`Hpcforge-Source` says which).
#[utoipa::path(get, path = "/api/v1/tasks/{id}/outputs.tar.gz", tag = "tasks",
    params(
        ("id" = String, Path, description = "Task ID, or its URI (`hpcforge://<site>/tasks/<id>`, percent-encoded)."),
        ("path" = Option<Vec<String>>, Query, description = "Instead of the declared outputs: these paths of the run directory (repeat `path=`)."),
    ),
    responses(
        (status = 200, description = "The tarball (gzip).", body = Vec<u8>, content_type = "application/gzip"),
        (status = 400, description = "A query other than `path`, or a portal that named no user.", body = ErrorBody),
        (status = 404, description = "No such task; no outputs declared and none named; or none of them exists.", body = ErrorBody),
        (status = 409, description = "The cluster cannot be read as this user (no key registered).", body = ErrorBody),
        (status = 422, description = "A path is absolute or holds `..`.", body = ErrorBody),
        (status = 503, description = "The cluster could not be asked.", body = ErrorBody),
    ))]
async fn outputs(
    State(st): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    QueryArgs(query): QueryArgs<Vec<(String, String)>>,
) -> Result<Response, ApiError> {
    let task = st.mediator.task_state_for(&task_id(&st, &id)?, &caller.access()?).await?;
    let mut chosen = Vec::new();
    for (k, v) in query {
        if k != "path" {
            return Err(bad_request(format!("`{}` is not understood here; name paths with `path=`", k.escape_debug())));
        }
        chosen.push(v);
    }
    let (entries, stream, source) = st.mediator.outputs_tarball(&task, &chosen).await?;
    tracing::info!(task = %task.id, owner = %task.owner, entries, source = source.as_str(), "outputs tarball");
    let mut resp = streamed(stream).into_response();
    let h = resp.headers_mut();
    h.insert(SOURCE, HeaderValue::from_static(source.as_str()));
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/gzip"));
    let name = format!("{}-{}.tar.gz", task.application.name, task.id);
    if let Result::Ok(v) = HeaderValue::from_str(&format!("attachment; filename=\"{name}\"")) {
        h.insert(header::CONTENT_DISPOSITION, v);
    }
    Ok(resp)
}

/// An HTTP body that passes the stream's chunks on as they come (an error ends it).
fn streamed(stream: crate::mediator::stream::RemoteStream) -> Body {
    Body::from_stream(futures::stream::unfold(stream.body, |mut rx| async move { rx.recv().await.map(|c| (c, rx)) }))
}

fn bad_request(message: String) -> ApiError {
    ApiError::BadRequest { message, problems: Default::default() }
}

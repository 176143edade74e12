//! Task routes: submit (optionally waiting for job IDs), list with filters and cursor
//! pages, show, cancel, restart, the forged scripts, the event history, the tail of a
//! phase's output, and live streams (Server-Sent Events) of one task's events or of
//! all the caller's tasks.
//!
//! A task is visible to its owner (and to admins); anyone else gets 404, so task IDs
//! cannot be probed. A portal sees the tasks of the user it acts for.

use std::collections::HashMap;
use std::convert::Infallible;
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use tokio::sync::mpsc;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::AppState;
use super::auth::Caller;
use super::error::{ApiError, ErrorBody, Ok, Reply};
use super::extract::{JsonBody, QueryArgs};
use crate::forge::TaskBody;
use crate::mediator::{MediatorError, OutputTail};
use crate::model::{
    AppName, ClusterName, DefinitionRef, Phase, PhaseRecord, Task, TaskEvent, TaskId, TaskState, UserName,
};
use crate::store::TaskFilter;

/// `/api/v1/tasks/...`
pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(submit))
        .routes(routes!(list))
        .routes(routes!(stream_all))
        .routes(routes!(show))
        .routes(routes!(cancel))
        .routes(routes!(restart))
        .routes(routes!(script))
        .routes(routes!(events))
        .routes(routes!(stream_one))
        .routes(routes!(output))
}

impl From<MediatorError> for ApiError {
    fn from(e: MediatorError) -> Self {
        match e {
            MediatorError::Invalid(p) => ApiError::invalid("the task", p),
            MediatorError::NotFound(m) => ApiError::NotFound(m),
            MediatorError::UnknownDefinition { kind, message } => ApiError::unknown_definition(kind, message),
            MediatorError::Conflict(m) => ApiError::Conflict(m),
            MediatorError::Unavailable(m) => ApiError::Unavailable { message: m.clone(), source: anyhow::anyhow!(m) },
            MediatorError::Store(s) => s.into(),
        }
    }
}

fn task_id(text: &str) -> Result<TaskId, ApiError> {
    TaskId::parse(text).map_err(|_| ApiError::NotFound(format!("there is no task {}", text.escape_debug())))
}

fn phase(text: &str) -> Result<Phase, ApiError> {
    Phase::parse(text).map_err(|e| ApiError::NotFound(e.to_string()))
}

/// A task without its inputs and event history: what lists and streams carry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct TaskSummary {
    /// Task ID.
    pub id: TaskId,
    /// Whose it is (the Unix user the jobs run as).
    pub owner: UserName,
    /// The application and version.
    pub application: DefinitionRef<AppName>,
    /// The cluster and version.
    pub cluster: DefinitionRef<ClusterName>,
    /// Where the task stands.
    pub state: TaskState,
    /// The phases, in order.
    pub phases: Vec<PhaseRecord>,
    /// The run directory on the cluster.
    pub run_dir: String,
    /// Whether a cancel was asked for.
    pub cancel_requested: bool,
    /// How many events the task has (the newest has this `seq`).
    pub event_count: u64,
    /// The newest event.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_event: Option<TaskEvent>,
    /// Bumped by every change.
    pub revision: u64,
    /// When it was created.
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    /// When anything about it last changed.
    #[serde(with = "time::serde::rfc3339")]
    pub updated_at: OffsetDateTime,
}

impl From<&Task> for TaskSummary {
    fn from(t: &Task) -> Self {
        Self {
            id: t.id,
            owner: t.owner.clone(),
            application: t.application.clone(),
            cluster: t.cluster.clone(),
            state: t.state,
            phases: t.phases.clone(),
            run_dir: t.run_dir.clone(),
            cancel_requested: t.cancel_requested,
            event_count: t.events.last().map_or(0, |e| e.seq),
            last_event: t.events.last().cloned(),
            revision: t.revision,
            created_at: t.created_at,
            updated_at: t.updated_at,
        }
    }
}

// ---------------------------------------------------------------------------------
// Submit, show, cancel, restart
// ---------------------------------------------------------------------------------

/// Query of `POST /api/v1/tasks`.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
struct SubmitQuery {
    /// `submitted`: answer once every phase has a job ID (or failed, or is blocked),
    /// for at most a minute.
    wait: Option<String>,
}

/// Longest `?wait=submitted` waits before answering with the task as it is.
const WAIT_LIMIT: Duration = Duration::from_secs(60);

/// Validates the inputs, forges the three scripts, records the task and hands it to
/// the mediator. A portal submits for the user it names.
#[utoipa::path(post, path = "/api/v1/tasks", tag = "tasks", request_body = TaskBody, params(SubmitQuery),
    responses(
        (status = 201, description = "The task, with job IDs if `wait=submitted`.", body = Ok<Task>),
        (status = 400, description = "Unreadable JSON, a bad `wait`, or a portal that named no user.", body = ErrorBody),
        (status = 404, description = "No such application or cluster.", body = ErrorBody),
        (status = 413, description = "The body is over the size cap.", body = ErrorBody),
        (status = 415, description = "The body is not declared as JSON.", body = ErrorBody),
        (status = 422, description = "The inputs have problems; each is listed with its JSON pointer.", body = ErrorBody),
    ))]
async fn submit(
    State(st): State<AppState>,
    caller: Caller,
    QueryArgs(q): QueryArgs<SubmitQuery>,
    JsonBody(body): JsonBody<TaskBody>,
) -> Result<Reply<Task>, ApiError> {
    let wait = match q.wait.as_deref() {
        None => false,
        Some("submitted") => true,
        Some(other) => {
            return Err(ApiError::BadRequest {
                message: format!("`wait={}` is not understood; use `wait=submitted`", other.escape_debug()),
                problems: Default::default(),
            });
        }
    };
    let access = caller.access()?;
    if let Err(e) = st.rate.submission(&access.user) {
        st.metrics.rate_limited();
        return Err(e);
    }
    let mut task = st.mediator.create_task(&body, &access).await?;
    if wait {
        task = st.mediator.wait_submitted(&task.id, WAIT_LIMIT).await?;
    }
    let jobs: Vec<String> =
        task.phases.iter().map(|p| format!("{} {}", p.phase, p.job_id.as_deref().unwrap_or("-"))).collect();
    let message = format!("task {} is {}; jobs: {}", task.id, task.state.as_str(), jobs.join(", "));
    Ok(Reply::created(task, message))
}

/// A task: its phases (job ID, state, exit code, times) and its event history.
#[utoipa::path(get, path = "/api/v1/tasks/{id}", tag = "tasks",
    params(("id" = String, Path, description = "Task ID.")),
    responses(
        (status = 200, description = "The task.", body = Ok<Task>),
        (status = 400, description = "A portal named no user.", body = ErrorBody),
        (status = 404, description = "No such task, or not the caller's.", body = ErrorBody),
    ))]
async fn show(State(st): State<AppState>, caller: Caller, Path(id): Path<String>) -> Result<Reply<Task>, ApiError> {
    let task = st.mediator.task_for(&task_id(&id)?, &caller.access()?).await?;
    let message = format!("task {} is {}", task.id, task.state.as_str());
    Ok(Reply::ok(task, message))
}

/// Cancels a task: phases not yet submitted at once, live jobs on the cluster.
#[utoipa::path(delete, path = "/api/v1/tasks/{id}", tag = "tasks",
    params(("id" = String, Path, description = "Task ID.")),
    responses(
        (status = 202, description = "Cancel under way; the task as it is now.", body = Ok<Task>),
        (status = 400, description = "A portal named no user.", body = ErrorBody),
        (status = 404, description = "No such task, or not the caller's.", body = ErrorBody),
        (status = 409, description = "The task has already ended.", body = ErrorBody),
    ))]
async fn cancel(State(st): State<AppState>, caller: Caller, Path(id): Path<String>) -> Result<Response, ApiError> {
    let access = caller.access()?;
    let task = st.mediator.cancel(&task_id(&id)?, &access).await?;
    tracing::info!(task = %task.id, owner = %task.owner, by = access.by, "cancel requested");
    let message = format!("cancel of task {} requested; live jobs are being stopped", task.id);
    let mut resp = Reply::ok(task, message).into_response();
    *resp.status_mut() = StatusCode::ACCEPTED;
    Ok(resp)
}

/// Body of `POST /api/v1/tasks/{id}/restart`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct RestartBody {
    /// The phase to start again from; it and the ones after it run again.
    from: Phase,
}

/// Runs a phase and the ones after it again, keeping the earlier runs in the history.
#[utoipa::path(post, path = "/api/v1/tasks/{id}/restart", tag = "tasks", request_body = RestartBody,
    params(("id" = String, Path, description = "Task ID.")),
    responses(
        (status = 202, description = "Restart under way.", body = Ok<Task>),
        (status = 400, description = "Unreadable JSON, or a portal that named no user.", body = ErrorBody),
        (status = 404, description = "No such task, or not the caller's.", body = ErrorBody),
        (status = 409, description = "The task is still running.", body = ErrorBody),
        (status = 413, description = "The body is over the size cap.", body = ErrorBody),
        (status = 415, description = "The body is not declared as JSON.", body = ErrorBody),
        (status = 422, description = "Not a phase.", body = ErrorBody),
    ))]
async fn restart(
    State(st): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    JsonBody(body): JsonBody<RestartBody>,
) -> Result<Response, ApiError> {
    let access = caller.access()?;
    let task = st.mediator.restart(&task_id(&id)?, body.from, &access).await?;
    tracing::info!(task = %task.id, owner = %task.owner, by = access.by, from = %body.from, "restart requested");
    let message = format!("task {} restarts from {}", task.id, body.from);
    let mut resp = Reply::ok(task, message).into_response();
    *resp.status_mut() = StatusCode::ACCEPTED;
    Ok(resp)
}

/// The script a phase was submitted with, exactly; its sha256 is the ETag.
#[utoipa::path(get, path = "/api/v1/tasks/{id}/scripts/{phase}", tag = "tasks",
    params(
        ("id" = String, Path, description = "Task ID."),
        ("phase" = Phase, Path, description = "prolog, execute or epilog."),
    ),
    responses(
        (status = 200, description = "The script.", body = String, content_type = "text/plain"),
        (status = 400, description = "A portal named no user.", body = ErrorBody),
        (status = 404, description = "No such task or phase.", body = ErrorBody),
    ))]
async fn script(
    State(st): State<AppState>,
    caller: Caller,
    Path((id, ph)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let task = st.mediator.task_for(&task_id(&id)?, &caller.access()?).await?;
    let phase = phase(&ph)?;
    let stored = st
        .store
        .read_task_script(&task.id, phase, Some(task.scripts_version))
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("task {} has no {phase} script", task.id)))?;
    let mut resp = stored.text.into_response();
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    if let Ok(v) = HeaderValue::from_str(&format!("\"{}\"", stored.sha256)) {
        h.insert(header::ETAG, v);
    }
    Ok(resp)
}

/// Query of `GET /api/v1/tasks/{id}/events`.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
struct EventsQuery {
    /// Only events after this `seq`.
    after: Option<u64>,
}

/// A task's events, oldest first.
#[utoipa::path(get, path = "/api/v1/tasks/{id}/events", tag = "tasks",
    params(("id" = String, Path, description = "Task ID."), EventsQuery),
    responses(
        (status = 200, description = "The events.", body = Ok<Vec<TaskEvent>>),
        (status = 400, description = "A bad query, or a portal that named no user.", body = ErrorBody),
        (status = 404, description = "No such task, or not the caller's.", body = ErrorBody),
    ))]
async fn events(
    State(st): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    QueryArgs(q): QueryArgs<EventsQuery>,
) -> Result<Reply<Vec<TaskEvent>>, ApiError> {
    let task = st.mediator.task_for(&task_id(&id)?, &caller.access()?).await?;
    let after = q.after.unwrap_or(0);
    let events: Vec<TaskEvent> = task.events.into_iter().filter(|e| e.seq > after).collect();
    let n = events.len();
    Ok(Reply::ok(events, format!("{n} event{} of task {}", if n == 1 { "" } else { "s" }, task.id)))
}

/// Query of `GET /api/v1/tasks/{id}/output/{phase}`.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
struct OutputQuery {
    /// `stdout` (default) or `stderr`.
    stream: Option<String>,
    /// How many lines from the end (default 100, at most 10000).
    lines: Option<usize>,
}

/// The end of a phase job's standard output or error, read on the cluster as the
/// task's owner (so the cluster's permissions apply).
#[utoipa::path(get, path = "/api/v1/tasks/{id}/output/{phase}", tag = "tasks",
    params(
        ("id" = String, Path, description = "Task ID."),
        ("phase" = Phase, Path, description = "prolog, execute or epilog."),
        OutputQuery,
    ),
    responses(
        (status = 200, description = "The last lines.", body = Ok<OutputTail>),
        (status = 400, description = "A bad query, or a portal that named no user.", body = ErrorBody),
        (status = 404, description = "No such task or phase, or no output yet.", body = ErrorBody),
        (status = 409, description = "The cluster cannot be read as this user (no key registered).", body = ErrorBody),
    ))]
async fn output(
    State(st): State<AppState>,
    caller: Caller,
    Path((id, ph)): Path<(String, String)>,
    QueryArgs(q): QueryArgs<OutputQuery>,
) -> Result<Reply<OutputTail>, ApiError> {
    let task = st.mediator.task_for(&task_id(&id)?, &caller.access()?).await?;
    let phase = phase(&ph)?;
    let stderr = match q.stream.as_deref() {
        None | Some("stdout") => false,
        Some("stderr") => true,
        Some(other) => {
            return Err(ApiError::BadRequest {
                message: format!("`stream={}` is not understood; use stdout or stderr", other.escape_debug()),
                problems: Default::default(),
            });
        }
    };
    let lines = q.lines.unwrap_or(100);
    if !(1..=10_000).contains(&lines) {
        return Err(ApiError::BadRequest {
            message: format!("`lines` is between 1 and 10000, not {lines}"),
            problems: Default::default(),
        });
    }
    let tail = st.mediator.output_tail(&task, phase, stderr, lines).await?;
    let message = format!(
        "{} of job {} ({phase}): {} bytes{}",
        tail.stream,
        tail.job_id,
        tail.size,
        if tail.truncated { ", last part shown" } else { "" }
    );
    Ok(Reply::ok(tail, message))
}

// ---------------------------------------------------------------------------------
// Listing, with filters and cursors
// ---------------------------------------------------------------------------------

/// Query of `GET /api/v1/tasks`.
#[derive(Debug, Default, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
struct ListQuery {
    /// Only tasks in these states (comma-separated: `running,pending`).
    state: Option<String>,
    /// Only of this application.
    application: Option<String>,
    /// Only on this cluster.
    cluster: Option<String>,
    /// Only this user's (admins; others may name only themselves).
    owner: Option<String>,
    /// Only tasks created at or after this time (RFC 3339).
    since: Option<String>,
    /// Page size, 1 to 200 (default 50).
    limit: Option<usize>,
    /// The `next_cursor` of the previous page; the other filters must stay the same.
    cursor: Option<String>,
}

/// One page of tasks.
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct TaskPage {
    /// The tasks, newest first.
    pub tasks: Vec<TaskSummary>,
    /// Pass as `cursor` for the next page; `null` on the last page.
    pub next_cursor: Option<String>,
}

/// What a cursor carries: where the page ended, and the query it belongs to.
#[derive(Debug, PartialEq, Eq, Serialize, Deserialize)]
struct CursorState {
    /// The last task of the page.
    before: TaskId,
    /// The filters, as a canonical string.
    query: String,
}

/// What a cursor is sealed for, so it cannot be taken for anything else sealed with
/// the server key.
const CURSOR_PURPOSE: &str = "task-list-cursor";

fn bad_cursor(why: &str) -> ApiError {
    ApiError::BadRequest {
        message: format!("the cursor is not valid: {why}; start again from the first page (without `cursor`)"),
        problems: crate::model::Problems::from(crate::model::Problem::new("", format!("cursor: {why}"))),
    }
}

/// The filter a list query asks for, checked against who asks.
fn list_filter(q: &ListQuery, caller: &Caller) -> Result<TaskFilter, ApiError> {
    let bad = |field: &str, message: String| ApiError::BadRequest {
        message: format!("`{field}` is not valid: {message}"),
        problems: crate::model::Problems::from(crate::model::Problem::new("", format!("{field}: {message}"))),
    };
    let mut filter = TaskFilter::default();
    if let Some(states) = &q.state {
        for s in states.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let st: TaskState = serde_json::from_value(serde_json::Value::String(s.to_owned())).map_err(|_| {
                bad(
                    "state",
                    format!(
                        "`{}` is not a task state (submitting, blocked, pending, running, completed, failed, cancelled, unknown)",
                        s.escape_debug()
                    ),
                )
            })?;
            filter.states.push(st);
        }
    }
    if let Some(a) = &q.application {
        filter.application = Some(AppName::parse(a).map_err(|e| bad("application", e.to_string()))?);
    }
    if let Some(c) = &q.cluster {
        filter.cluster = Some(ClusterName::parse(c).map_err(|e| bad("cluster", e.to_string()))?);
    }
    if let Some(since) = &q.since {
        filter.since = Some(
            OffsetDateTime::parse(since, &time::format_description::well_known::Rfc3339)
                .map_err(|e| bad("since", format!("not an RFC 3339 time ({e}), e.g. 2026-11-22T10:00:00Z")))?,
        );
    }
    let owner = q.owner.as_deref().map(UserName::parse).transpose().map_err(|e| bad("owner", e.to_string()))?;
    filter.owner = if caller.is_admin() {
        owner
    } else {
        let me = caller.subject()?;
        if owner.as_ref().is_some_and(|o| *o != me) {
            return Err(ApiError::Forbidden(format!(
                "only admins list other users' tasks; `{}` may list only `{me}`'s",
                caller.describe()
            )));
        }
        Some(me)
    };
    Ok(filter)
}

/// A canonical form of the filter (without the cursor), which a cursor is tied to.
fn filter_key(f: &TaskFilter) -> String {
    let states: Vec<&str> = f.states.iter().map(|s| s.as_str()).collect();
    serde_json::json!({
        "owner": f.owner, "states": states, "application": f.application, "cluster": f.cluster,
        "since": f.since.map(|t| t.unix_timestamp_nanos().to_string()),
    })
    .to_string()
}

/// The caller's tasks (an admin's: everyone's, or `owner`'s), newest first, filtered,
/// a page at a time.
#[utoipa::path(get, path = "/api/v1/tasks", tag = "tasks", params(ListQuery),
    responses(
        (status = 200, description = "A page of tasks.", body = Ok<TaskPage>),
        (status = 400, description = "A bad filter or a cursor that was changed or belongs to another query.", body = ErrorBody),
        (status = 403, description = "A non-admin asked for another user's tasks.", body = ErrorBody),
    ))]
async fn list(
    State(st): State<AppState>,
    caller: Caller,
    QueryArgs(q): QueryArgs<ListQuery>,
) -> Result<Reply<TaskPage>, ApiError> {
    let mut filter = list_filter(&q, &caller)?;
    let limit = q.limit.unwrap_or(50);
    if !(1..=200).contains(&limit) {
        return Err(ApiError::BadRequest {
            message: format!("`limit` is between 1 and 200, not {limit}"),
            problems: Default::default(),
        });
    }
    let key = filter_key(&filter);
    if let Some(cursor) = &q.cursor {
        let sealed = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(cursor.trim())
            .map_err(|_| bad_cursor("it is not one this server gave out"))?;
        let opened = st
            .mediator
            .key()
            .open(CURSOR_PURPOSE, &sealed)
            .map_err(|_| bad_cursor("it is not one this server gave out, or it was changed"))?;
        let state: CursorState =
            serde_json::from_slice(&opened).map_err(|_| bad_cursor("it is not one this server gave out"))?;
        if state.query != key {
            return Err(bad_cursor("it belongs to a query with other filters"));
        }
        filter.before = Some(state.before);
    }
    // One more than asked tells whether there is a next page.
    let mut tasks = st.store.list_tasks(&filter, limit + 1).await?;
    let next_cursor = if tasks.len() > limit {
        tasks.truncate(limit);
        let last = tasks.last().expect("limit >= 1").id;
        let state = serde_json::to_vec(&CursorState { before: last, query: key }).map_err(anyhow::Error::from)?;
        Some(base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(st.mediator.key().seal(CURSOR_PURPOSE, &state)))
    } else {
        None
    };
    let n = tasks.len();
    let message = format!(
        "{n} task{}{}",
        if n == 1 { "" } else { "s" },
        if next_cursor.is_some() { "; more follow" } else { "" }
    );
    Ok(Reply::ok(TaskPage { tasks: tasks.iter().map(TaskSummary::from).collect(), next_cursor }, message))
}

// ---------------------------------------------------------------------------------
// Live streams (Server-Sent Events)
// ---------------------------------------------------------------------------------

/// How often a stream looks at the store even without news from this server's
/// mediator (another server sharing the store may have changed the task).
const POLL_EVERY: Duration = Duration::from_secs(5);

/// An SSE response fed by `rx`.
fn sse(rx: mpsc::Receiver<Event>) -> Response {
    let stream =
        futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|e| (Ok::<_, Infallible>(e), rx)) });
    let mut resp = Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(15))).into_response();
    // Proxies (nginx) must pass events through as they come.
    resp.headers_mut().insert("x-accel-buffering", HeaderValue::from_static("no"));
    resp
}

fn json_event(kind: &str, value: &impl Serialize) -> Event {
    Event::default().event(kind).json_data(value).unwrap_or_else(|_| Event::default().event(kind).data("{}"))
}

/// Waits for news of `id` (or of any task, with `None`), the poll interval, or shutdown.
/// Returns false once the server is shutting down or the client is gone.
async fn wait_for_news(
    updates: &mut tokio::sync::broadcast::Receiver<TaskId>,
    shutdown: &mut tokio::sync::watch::Receiver<bool>,
    tx: &mpsc::Sender<Event>,
    id: Option<TaskId>,
    news: &mut Vec<TaskId>,
) -> bool {
    let deadline = tokio::time::sleep(POLL_EVERY);
    tokio::pin!(deadline);
    loop {
        tokio::select! {
            got = updates.recv() => match got {
                Ok(t) if id.is_none_or(|id| id == t) => { news.push(t); return true; }
                Ok(_) => continue,
                // Missed some: look at the store, as on a poll.
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => return true,
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return false,
            },
            () = &mut deadline => return true,
            _ = shutdown.changed() => return false,
            () = tx.closed() => return false,
        }
    }
}

/// Query of the stream endpoints.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
struct StreamQuery {
    /// Resume after this event `seq` (the `Last-Event-ID` header does the same and wins).
    after: Option<u64>,
}

/// A task's events as they happen (Server-Sent Events). Each `event` message carries
/// one event with its `seq` as the SSE id, so a reconnecting client (`Last-Event-ID`)
/// gets exactly what it missed; a `task` message after each batch carries the task's
/// summary; `end` says the task has ended and the stream closes.
#[utoipa::path(get, path = "/api/v1/tasks/{id}/events/stream", tag = "tasks",
    params(
        ("id" = String, Path, description = "Task ID."),
        ("Last-Event-ID" = Option<u64>, Header, description = "Resume after this event."),
        StreamQuery,
    ),
    responses(
        (status = 200, description = "An event stream: `event` (a TaskEvent), `task` (a TaskSummary), `end`.", body = String, content_type = "text/event-stream"),
        (status = 400, description = "A bad query, or a portal that named no user.", body = ErrorBody),
        (status = 404, description = "No such task, or not the caller's.", body = ErrorBody),
    ))]
async fn stream_one(
    State(st): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    headers: HeaderMap,
    QueryArgs(q): QueryArgs<StreamQuery>,
) -> Result<Response, ApiError> {
    let access = caller.access()?;
    let task = st.mediator.task_for(&task_id(&id)?, &access).await?;
    let resume = match headers.get("last-event-id") {
        Some(v) => {
            Some(v.to_str().ok().and_then(|s| s.trim().parse::<u64>().ok()).ok_or_else(|| ApiError::BadRequest {
                message: "Last-Event-ID is not an event number".into(),
                problems: Default::default(),
            })?)
        }
        None => q.after,
    };
    let slot = st.rate.stream(&access.user).inspect_err(|_| st.metrics.rate_limited())?;
    let (tx, rx) = mpsc::channel(64);
    let id = task.id;
    tokio::spawn(async move {
        let _slot = slot;
        let _counted = st.metrics.stream_opened();
        let mut updates = st.mediator.updates();
        let mut shutdown = st.shutdown.clone();
        let mut last = resume.unwrap_or(0);
        let mut sent_revision = None;
        let mut news = Vec::new();
        loop {
            let task = match st.store.get_task(&id).await {
                Ok(Some(t)) => t,
                Ok(None) => break,
                Err(e) => {
                    tracing::debug!(task = %id, error = format!("{e:#}"), "stream: store read failed; retrying");
                    if !wait_for_news(&mut updates, &mut shutdown, &tx, Some(id), &mut news).await {
                        break;
                    }
                    continue;
                }
            };
            let new: Vec<&TaskEvent> = task.events.iter().filter(|e| e.seq > last).collect();
            for e in new {
                let msg = json_event("event", e).id(e.seq.to_string());
                if tx.send(msg).await.is_err() {
                    return;
                }
                last = e.seq;
            }
            if sent_revision != Some(task.revision) {
                sent_revision = Some(task.revision);
                if tx.send(json_event("task", &TaskSummary::from(&task))).await.is_err() {
                    return;
                }
            }
            if !task.is_live() {
                let _ = tx.send(json_event("end", &serde_json::json!({ "state": task.state }))).await;
                break;
            }
            if !wait_for_news(&mut updates, &mut shutdown, &tx, Some(id), &mut news).await {
                break;
            }
        }
    });
    Ok(sse(rx))
}

/// Query of `GET /api/v1/tasks/stream`.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
struct StreamAllQuery {
    /// Admins: every user's tasks (default: the admin's own).
    all: Option<bool>,
}

/// The caller's tasks as they change (Server-Sent Events), one connection for a whole
/// status page: first a `task` message (a TaskSummary) for each of the 50 newest
/// tasks, then one whenever a task changes. Each message is the whole summary, so a
/// reconnecting client needs no resume point.
#[utoipa::path(get, path = "/api/v1/tasks/stream", tag = "tasks", params(StreamAllQuery),
    responses(
        (status = 200, description = "An event stream of `task` messages (TaskSummary).", body = String, content_type = "text/event-stream"),
        (status = 400, description = "A bad query, or a portal that named no user.", body = ErrorBody),
        (status = 403, description = "`all` asked for by a non-admin.", body = ErrorBody),
    ))]
async fn stream_all(
    State(st): State<AppState>,
    caller: Caller,
    QueryArgs(q): QueryArgs<StreamAllQuery>,
) -> Result<Response, ApiError> {
    let access = caller.access()?;
    let everyone = q.all.unwrap_or(false);
    if everyone && !access.admin {
        return Err(ApiError::Forbidden("only admins may follow every user's tasks (`all=true`)".into()));
    }
    let slot = st.rate.stream(&access.user).inspect_err(|_| st.metrics.rate_limited())?;
    let (tx, rx) = mpsc::channel(256);
    let owner = if everyone { None } else { Some(access.user.clone()) };
    tokio::spawn(async move {
        let _slot = slot;
        let _counted = st.metrics.stream_opened();
        let mut updates = st.mediator.updates();
        let mut shutdown = st.shutdown.clone();
        // What was sent of each task: its revision, and whether it was live then.
        let mut sent: HashMap<TaskId, (u64, bool)> = HashMap::new();
        let visible = |t: &Task| owner.as_ref().is_none_or(|o| &t.owner == o) && access.may_see(t);
        let first = TaskFilter { owner: owner.clone(), ..Default::default() };
        let mut batch = st.store.list_tasks(&first, 50).await.unwrap_or_default();
        batch.reverse(); // oldest first, so a page that appends shows the newest last
        let mut news = Vec::new();
        loop {
            for t in batch.drain(..).filter(|t| visible(t)) {
                if sent.get(&t.id).is_some_and(|(rev, _)| *rev == t.revision) {
                    continue;
                }
                sent.insert(t.id, (t.revision, t.is_live()));
                if tx.send(json_event("task", &TaskSummary::from(&t))).await.is_err() {
                    return;
                }
            }
            news.clear();
            if !wait_for_news(&mut updates, &mut shutdown, &tx, None, &mut news).await {
                return;
            }
            if news.is_empty() {
                // A poll, in case another server sharing the store changed something:
                // the live tasks, and those this stream last saw live (they may have
                // ended since).
                let live = TaskFilter {
                    owner: owner.clone(),
                    states: vec![TaskState::Submitting, TaskState::Blocked, TaskState::Pending, TaskState::Running],
                    ..Default::default()
                };
                let mut found = st.store.list_tasks(&live, 200).await.unwrap_or_default();
                let was_live: Vec<TaskId> = sent
                    .iter()
                    .filter(|(id, (_, live))| *live && !found.iter().any(|t| t.id == **id))
                    .map(|(id, _)| *id)
                    .collect();
                for id in was_live {
                    if let Ok(Some(t)) = st.store.get_task(&id).await {
                        found.push(t);
                    }
                }
                batch = found;
            } else {
                for id in news.drain(..) {
                    if let Ok(Some(t)) = st.store.get_task(&id).await {
                        batch.push(t);
                    }
                }
            }
        }
    });
    Ok(sse(rx))
}

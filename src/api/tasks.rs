//! Task routes: submit (optionally waiting for job IDs), list with filters and cursor
//! pages, show, cancel, restart, the forged scripts, the event history and the tail
//! of a phase's output, the data the jobs posted. (Their live streams are
//! [`super::streams`].)
//!
//! Why this file is long: one handler per route of the task resource, each with its
//! OpenAPI annotation, which takes as many lines as the handler.
//!
//! A task is visible to its owner (and to admins); anyone else gets 404, so task IDs
//! cannot be probed. A portal sees the tasks of the user it acts for.

use std::collections::BTreeMap;
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::AppState;
use super::auth::Caller;
use super::error::{ApiError, ErrorBody, Ok, Reply};
use super::extract::{JsonBody, QueryArgs};
use crate::forge::TaskBody;
use crate::mediator::{MediatorError, OutputTail};
use crate::model::posts::DataPoint;
use crate::model::{
    AppName, ClusterName, DefinitionRef, Phase, PhaseRecord, Task, TaskEvent, TaskId, TaskState, UserName,
};
use crate::store::TaskFilter;

/// `/api/v1/tasks/...`
pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(submit))
        .routes(routes!(list))
        .routes(routes!(show))
        .routes(routes!(cancel))
        .routes(routes!(restart))
        .routes(routes!(script))
        .routes(routes!(events))
        .routes(routes!(data))
        .routes(routes!(data_history))
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

/// The task a path names: its ID, or its URI at this site (`hpcforge://<site>/tasks/<id>`,
/// percent-encoded as one path segment).
pub(super) fn task_id(st: &AppState, text: &str) -> Result<TaskId, ApiError> {
    TaskId::parse_ref(text, st.mediator.site())
        .map_err(|e| ApiError::NotFound(format!("there is no task {}: {}", text.escape_debug(), e.reason)))
}

/// A task as the API shows it: the stored task and its global identity.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct TaskView {
    /// `hpcforge://<site>/tasks/<id>`: the task's identity across the installation;
    /// every path that takes a task ID takes it too.
    pub uri: String,
    /// The task.
    #[serde(flatten)]
    pub task: Task,
    /// Once it has ended, how it can be restarted: without `from` (what did not
    /// succeed), then from each phase, each with what it would rerun or why not.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub restart_choices: Vec<crate::mediator::transitions::RestartChoice>,
    /// While queued: its place in the queue (1: the next to go, once what it waits
    /// for is free).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue_position: Option<u32>,
}

impl TaskView {
    fn of(st: &AppState, task: Task) -> Self {
        let restart_choices = crate::mediator::transitions::restart_choices(&task);
        Self { uri: task.id.uri(st.mediator.site()), task, restart_choices, queue_position: None }
    }

    /// [`Self::of`], with the task's place in the queue when it is queued.
    async fn placed(st: &AppState, task: Task) -> Result<Self, ApiError> {
        let position = st.mediator.queue_position(&task).await?;
        Ok(Self { queue_position: position, ..Self::of(st, task) })
    }
}

/// The phase named in a path, if `task` has it: any other name is a 404.
pub(super) fn phase(task: &Task, text: &str) -> Result<Phase, ApiError> {
    let phase = Phase::parse(text).map_err(|e| ApiError::NotFound(e.to_string()))?;
    if !task.has_phase(phase) {
        return Err(ApiError::NotFound(task.no_such_phase(phase)));
    }
    Ok(phase)
}

/// A task without its inputs and event history: what lists and streams carry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct TaskSummary {
    /// Task ID.
    pub id: TaskId,
    /// `hpcforge://<site>/tasks/<id>`.
    pub uri: String,
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
    /// Its priority in the queue (0 unless set).
    #[serde(default)]
    pub priority: i32,
    /// While queued: since when, and what it waits for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue: Option<crate::model::queue::QueueEntry>,
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
    /// Once it has ended, how it can be restarted (as on [`TaskView`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub restart_choices: Vec<crate::mediator::transitions::RestartChoice>,
}

impl TaskSummary {
    /// The summary of `t`, a task of `site`.
    pub fn of(t: &Task, site: &crate::model::SiteId) -> Self {
        Self {
            id: t.id,
            uri: t.id.uri(site),
            owner: t.owner.clone(),
            application: t.application.clone(),
            cluster: t.cluster.clone(),
            state: t.state,
            phases: t.phases.clone(),
            run_dir: t.run_dir.clone(),
            cancel_requested: t.cancel_requested,
            priority: t.priority,
            queue: t.queue.clone(),
            event_count: t.events.last().map_or(0, |e| e.seq),
            last_event: t.events.last().cloned(),
            revision: t.revision,
            created_at: t.created_at,
            updated_at: t.updated_at,
            restart_choices: crate::mediator::transitions::restart_choices(t),
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

/// Validates the inputs, forges the scripts (one per phase), records the task and hands it to
/// the mediator. A portal submits for the user it names.
#[utoipa::path(post, path = "/api/v1/tasks", tag = "tasks", request_body = TaskBody, params(SubmitQuery),
    responses(
        (status = 201, description = "The task, with job IDs if `wait=submitted`.", body = Ok<TaskView>),
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
) -> Result<Reply<TaskView>, ApiError> {
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
    if let Err(e) = st.rate.submission(st.store.as_ref(), &access.user).await {
        st.metrics.rate_limited();
        return Err(e);
    }
    let task = if wait {
        st.mediator.create_task_and_wait(&body, &access, WAIT_LIMIT).await?
    } else {
        st.mediator.create_task(&body, &access).await?
    };
    let jobs: Vec<String> =
        task.phases.iter().map(|p| format!("{} {}", p.phase, p.job_id.as_deref().unwrap_or("-"))).collect();
    let message = match &task.queue {
        Some(q) => format!(
            "task {} is queued: {}",
            task.id,
            q.waiting_for.as_deref().unwrap_or("it waits for the site's pools")
        ),
        None => format!("task {} is {}; jobs: {}", task.id, task.state.as_str(), jobs.join(", ")),
    };
    Ok(Reply::created(TaskView::placed(&st, task).await?, message))
}

/// A task: its phases (job ID, state, exit code, times) and its event history.
#[utoipa::path(get, path = "/api/v1/tasks/{id}", tag = "tasks",
    params(("id" = String, Path, description = "Task ID, or its URI (`hpcforge://<site>/tasks/<id>`, percent-encoded).")),
    responses(
        (status = 200, description = "The task.", body = Ok<TaskView>),
        (status = 400, description = "A portal named no user.", body = ErrorBody),
        (status = 404, description = "No such task, or not the caller's.", body = ErrorBody),
    ))]
async fn show(State(st): State<AppState>, caller: Caller, Path(id): Path<String>) -> Result<Reply<TaskView>, ApiError> {
    let task = st.mediator.task_for(&task_id(&st, &id)?, &caller.access()?).await?;
    let message = match (&task.queue, task.state) {
        (Some(q), TaskState::Queued) => format!(
            "task {} is queued: {}",
            task.id,
            q.waiting_for.as_deref().unwrap_or("its needs are being looked at")
        ),
        _ => format!("task {} is {}", task.id, task.state.as_str()),
    };
    Ok(Reply::ok(TaskView::placed(&st, task).await?, message))
}

/// Cancels a task: phases not yet submitted at once, live jobs on the cluster.
#[utoipa::path(delete, path = "/api/v1/tasks/{id}", tag = "tasks",
    params(("id" = String, Path, description = "Task ID, or its URI (`hpcforge://<site>/tasks/<id>`, percent-encoded).")),
    responses(
        (status = 202, description = "Cancel under way; the task as it is now.", body = Ok<TaskView>),
        (status = 400, description = "A portal named no user.", body = ErrorBody),
        (status = 404, description = "No such task, or not the caller's.", body = ErrorBody),
        (status = 409, description = "The task has already ended.", body = ErrorBody),
    ))]
async fn cancel(State(st): State<AppState>, caller: Caller, Path(id): Path<String>) -> Result<Response, ApiError> {
    let access = caller.access()?;
    let task = st.mediator.cancel(&task_id(&st, &id)?, &access).await?;
    tracing::info!(task = %task.id, owner = %task.owner, by = access.by, "cancel requested");
    let message = format!("cancel of task {} requested; live jobs are being stopped", task.id);
    let mut resp = Reply::ok(TaskView::of(&st, task), message).into_response();
    *resp.status_mut() = StatusCode::ACCEPTED;
    Ok(resp)
}

/// Body of `POST /api/v1/tasks/{id}/restart`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct RestartBody {
    /// The phase to start again from: it and every phase that waits for it run again.
    /// Without it, every phase that did not succeed runs again, with what waits for it.
    #[serde(default)]
    from: Option<Phase>,
    /// With `from` a phase that runs per frame (or, without `from`, when the task has
    /// one such phase): rerun these of its frames (`3,17,40-45`), with any others that
    /// did not succeed, and the same frames of the phases that wait for it frame by
    /// frame. Without it, a phase rerun because it did not succeed reruns only its
    /// frames that did not.
    #[serde(default)]
    frames: Option<String>,
    /// `recorded` (the default): the phases run the scripts the task was forged with.
    /// `current`: the task is forged again from the current versions of its
    /// application and cluster, with its recorded inputs.
    #[serde(default)]
    definitions: crate::mediator::control::Definitions,
    /// Rerun phases whose declared outputs are all newer than their inputs too
    /// (without it, such a phase that succeeded is kept).
    #[serde(default)]
    force: bool,
}

/// Runs phases again, keeping the earlier runs in the history: from a phase (it and
/// what waits for it), or every phase that did not succeed (and what waits for it).
#[utoipa::path(post, path = "/api/v1/tasks/{id}/restart", tag = "tasks", request_body = RestartBody,
    params(("id" = String, Path, description = "Task ID, or its URI (`hpcforge://<site>/tasks/<id>`, percent-encoded).")),
    responses(
        (status = 202, description = "Restart under way.", body = Ok<TaskView>),
        (status = 400, description = "Unreadable JSON, or a portal that named no user.", body = ErrorBody),
        (status = 404, description = "No such task, or not the caller's.", body = ErrorBody),
        (status = 409, description = "The task is still running; or `from` waits for a phase that did not end as it needs; or, without `from`, every phase succeeded; or every phase to rerun is up to date (see `force`).", body = ErrorBody),
        (status = 413, description = "The body is over the size cap.", body = ErrorBody),
        (status = 415, description = "The body is not declared as JSON.", body = ErrorBody),
        (status = 422, description = "Not a phase of the task; `frames` not a frame range, or for a phase that does not run per frame; or, with `definitions: current`, the current definitions cannot run this task (other phases, another run directory, inputs they refuse).", body = ErrorBody),
    ))]
async fn restart(
    State(st): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    JsonBody(body): JsonBody<RestartBody>,
) -> Result<Response, ApiError> {
    let access = caller.access()?;
    let ask = crate::mediator::control::RestartRequest {
        from: body.from,
        frames: body.frames.clone(),
        definitions: body.definitions,
        force: body.force,
    };
    let task = st.mediator.restart(&task_id(&st, &id)?, &ask, &access).await?;
    let message = match body.from {
        Some(from) => format!("task {} restarts from {from}", task.id),
        None => format!("task {} reruns what did not succeed", task.id),
    };
    tracing::info!(task = %task.id, owner = %task.owner, by = access.by, from = ?body.from.map(|p| p.to_string()), "restart requested");
    let mut resp = Reply::ok(TaskView::of(&st, task), message).into_response();
    *resp.status_mut() = StatusCode::ACCEPTED;
    Ok(resp)
}

/// The script a phase was submitted with, exactly; its sha256 is the ETag.
#[utoipa::path(get, path = "/api/v1/tasks/{id}/scripts/{phase}", tag = "tasks",
    params(
        ("id" = String, Path, description = "Task ID, or its URI (`hpcforge://<site>/tasks/<id>`, percent-encoded)."),
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
    let task = st.mediator.task_state_for(&task_id(&st, &id)?, &caller.access()?).await?;
    let phase = phase(&task, &ph)?;
    let stored = st
        .store
        .read_task_script(&task.id, phase, Some(task.script_version_of(phase)))
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
    params(("id" = String, Path, description = "Task ID, or its URI (`hpcforge://<site>/tasks/<id>`, percent-encoded)."), EventsQuery),
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
    let id = task_id(&st, &id)?;
    let events = st.mediator.events_for(&id, &caller.access()?, q.after.unwrap_or(0)).await?;
    let n = events.len();
    Ok(Reply::ok(events, format!("{n} event{} of task {id}", if n == 1 { "" } else { "s" })))
}

/// The data the task's jobs posted (`hpcg_data KEY VALUE`, or a `{"key": ...,
/// "value": ...}` line): each key's newest value, with the phase, frame and job that
/// posted it and how many values the key had.
#[utoipa::path(get, path = "/api/v1/tasks/{id}/data", tag = "tasks",
    params(("id" = String, Path, description = "Task ID, or its URI (`hpcforge://<site>/tasks/<id>`, percent-encoded).")),
    responses(
        (status = 200, description = "Key → newest value.", body = Ok<BTreeMap<String, DataPoint>>),
        (status = 400, description = "A portal that named no user.", body = ErrorBody),
        (status = 404, description = "No such task, or not the caller's.", body = ErrorBody),
    ))]
async fn data(
    State(st): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Reply<BTreeMap<String, DataPoint>>, ApiError> {
    let id = task_id(&st, &id)?;
    let data = st.mediator.data_for(&id, &caller.access()?).await?;
    let n = data.len();
    Ok(Reply::ok(data, format!("{n} key{} of data of task {id}", if n == 1 { "" } else { "s" })))
}

/// Every value one key of the task's data had, oldest first.
#[utoipa::path(get, path = "/api/v1/tasks/{id}/data/{key}", tag = "tasks",
    params(
        ("id" = String, Path, description = "Task ID, or its URI (`hpcforge://<site>/tasks/<id>`, percent-encoded)."),
        ("key" = String, Path, description = "The key, as the job posted it."),
    ),
    responses(
        (status = 200, description = "The values, oldest first.", body = Ok<Vec<DataPoint>>),
        (status = 400, description = "A portal that named no user.", body = ErrorBody),
        (status = 404, description = "No such task, not the caller's, or no value of that key.", body = ErrorBody),
    ))]
async fn data_history(
    State(st): State<AppState>,
    caller: Caller,
    Path((id, key)): Path<(String, String)>,
) -> Result<Reply<Vec<DataPoint>>, ApiError> {
    let id = task_id(&st, &id)?;
    let points = st.mediator.data_history_for(&id, &caller.access()?, &key).await?;
    let n = points.len();
    Ok(Reply::ok(points, format!("{n} value{} of `{key}` in task {id}", if n == 1 { "" } else { "s" })))
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
    /// A phase that runs per frame: this frame's own output (its jobs' output
    /// holds each frame's once the frame has ended).
    frame: Option<u32>,
}

/// The end of a phase job's standard output or error (or of one frame's, `frame`),
/// read on the cluster as the task's owner (so the cluster's permissions apply).
#[utoipa::path(get, path = "/api/v1/tasks/{id}/output/{phase}", tag = "tasks",
    params(
        ("id" = String, Path, description = "Task ID, or its URI (`hpcforge://<site>/tasks/<id>`, percent-encoded)."),
        ("phase" = Phase, Path, description = "prolog, execute or epilog."),
        OutputQuery,
    ),
    responses(
        (status = 200, description = "The last lines.", body = Ok<OutputTail>),
        (status = 400, description = "A bad query, or a portal that named no user.", body = ErrorBody),
        (status = 404, description = "No such task or phase, or no output yet.", body = ErrorBody),
        (status = 409, description = "The cluster cannot be read as this user (no key registered).", body = ErrorBody),
        (status = 422, description = "`frame` for a phase that does not run per frame, or not one of its frames.", body = ErrorBody),
    ))]
async fn output(
    State(st): State<AppState>,
    caller: Caller,
    Path((id, ph)): Path<(String, String)>,
    QueryArgs(q): QueryArgs<OutputQuery>,
) -> Result<Reply<OutputTail>, ApiError> {
    let task = st.mediator.task_state_for(&task_id(&st, &id)?, &caller.access()?).await?;
    let phase = phase(&task, &ph)?;
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
    let tail = st.mediator.output_tail(&task, phase, stderr, lines, q.frame).await?;
    let message = format!(
        "{} of {}: {} bytes{}",
        tail.stream,
        match tail.frame {
            Some(f) => format!("frame {f} of {phase} (job {})", tail.job_id),
            None => format!("job {} ({phase})", tail.job_id),
        },
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
    Ok(Reply::ok(
        TaskPage { tasks: tasks.iter().map(|t| TaskSummary::of(t, st.mediator.site())).collect(), next_cursor },
        message,
    ))
}

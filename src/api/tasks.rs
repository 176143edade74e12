//! Task routes: submit (optionally waiting for job IDs), show, list, cancel, restart,
//! and the scripts a task was forged with. A task is visible to its owner only;
//! anyone else gets 404, so task IDs cannot be probed.

use std::time::Duration;

use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Deserialize;

use super::AppState;
use super::error::{ApiError, Reply};
use super::extract::{Actor, JsonBody};
use crate::forge::TaskBody;
use crate::mediator::MediatorError;
use crate::model::{Phase, Task, TaskId};

/// `/api/v1/tasks/...`
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/", post(submit).get(list))
        .route("/{id}", get(show).delete(cancel))
        .route("/{id}/restart", post(restart))
        .route("/{id}/scripts/{phase}", get(script))
}

impl From<MediatorError> for ApiError {
    fn from(e: MediatorError) -> Self {
        match e {
            MediatorError::Invalid(p) => ApiError::invalid("the task", p),
            MediatorError::NotFound(m) => ApiError::NotFound(m),
            MediatorError::Conflict(m) => ApiError::Conflict(m),
            MediatorError::Unavailable(m) => ApiError::Unavailable { message: m.clone(), source: anyhow::anyhow!(m) },
            MediatorError::Store(s) => s.into(),
        }
    }
}

fn task_id(text: &str) -> Result<TaskId, ApiError> {
    TaskId::parse(text).map_err(|_| ApiError::NotFound(format!("there is no task {}", text.escape_debug())))
}

/// Query of `POST /api/v1/tasks`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SubmitQuery {
    /// `submitted`: answer once every phase has a job ID (or failed or is blocked).
    wait: Option<String>,
}

/// Longest `?wait=submitted` waits before answering with the task as it is.
const WAIT_LIMIT: Duration = Duration::from_secs(60);

async fn submit(
    State(st): State<AppState>,
    actor: Actor,
    Query(q): Query<SubmitQuery>,
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
    let mut task = st.mediator.create_task(&body, &actor.0).await?;
    if wait {
        task = st.mediator.wait_submitted(&task.id, WAIT_LIMIT).await?;
    }
    let jobs: Vec<String> =
        task.phases.iter().map(|p| format!("{} {}", p.phase, p.job_id.as_deref().unwrap_or("-"))).collect();
    let message = format!("task {} is {}; jobs: {}", task.id, task.state.as_str(), jobs.join(", "));
    Ok(Reply::created(task, message))
}

async fn list(State(st): State<AppState>, actor: Actor) -> Result<Reply<Vec<Task>>, ApiError> {
    let tasks = st.store.list_tasks(Some(&actor.0), 50).await?;
    let n = tasks.len();
    Ok(Reply::ok(tasks, format!("{n} task{} of {}", if n == 1 { "" } else { "s" }, actor.0)))
}

async fn show(State(st): State<AppState>, actor: Actor, Path(id): Path<String>) -> Result<Reply<Task>, ApiError> {
    let task = st.mediator.task_for(&task_id(&id)?, &actor.0).await?;
    let message = format!("task {} is {}", task.id, task.state.as_str());
    Ok(Reply::ok(task, message))
}

async fn cancel(State(st): State<AppState>, actor: Actor, Path(id): Path<String>) -> Result<Response, ApiError> {
    let task = st.mediator.cancel(&task_id(&id)?, &actor.0).await?;
    let message = format!("cancel of task {} requested; live jobs are being stopped", task.id);
    let mut resp = Reply::ok(task, message).into_response();
    *resp.status_mut() = StatusCode::ACCEPTED;
    Ok(resp)
}

/// Body of `POST /api/v1/tasks/{id}/restart`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RestartBody {
    /// The phase to start again from; it and the ones after it run again.
    from: Phase,
}

async fn restart(
    State(st): State<AppState>,
    actor: Actor,
    Path(id): Path<String>,
    JsonBody(body): JsonBody<RestartBody>,
) -> Result<Response, ApiError> {
    let task = st.mediator.restart(&task_id(&id)?, body.from, &actor.0).await?;
    let message = format!("task {} restarts from {}", task.id, body.from);
    let mut resp = Reply::ok(task, message).into_response();
    *resp.status_mut() = StatusCode::ACCEPTED;
    Ok(resp)
}

async fn script(
    State(st): State<AppState>,
    actor: Actor,
    Path((id, phase)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let task = st.mediator.task_for(&task_id(&id)?, &actor.0).await?;
    let phase = Phase::parse(&phase).map_err(|e| ApiError::NotFound(e.to_string()))?;
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

//! Live streams of tasks (Server-Sent Events): one task's events as they happen
//! (resumable with `Last-Event-ID`), and every change to the caller's tasks for a
//! status page.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::AppState;
use super::auth::Caller;
use super::error::{ApiError, ErrorBody};
use super::extract::QueryArgs;
use super::tasks::{TaskSummary, task_id};
use crate::mediator::TaskNews;
use crate::model::{Task, TaskId, TaskState};
use crate::store::TaskFilter;

/// `/api/v1/tasks/stream` and `/api/v1/tasks/{id}/events/stream`.
pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(stream_all)).routes(routes!(stream_one))
}

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
    updates: &mut tokio::sync::broadcast::Receiver<TaskNews>,
    shutdown: &mut tokio::sync::watch::Receiver<bool>,
    tx: &mpsc::Sender<Event>,
    id: Option<TaskId>,
    news: &mut Vec<Arc<Task>>,
) -> bool {
    let deadline = tokio::time::sleep(POLL_EVERY);
    tokio::pin!(deadline);
    loop {
        tokio::select! {
            got = updates.recv() => match got {
                Ok(n) if id.is_none_or(|id| id == n.id) => { news.push(n.task); return true; }
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
        ("id" = String, Path, description = "Task ID, or its URI (`hpcforge://<site>/tasks/<id>`, percent-encoded)."),
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
    let task = st.mediator.task_for(&task_id(&st, &id)?, &access).await?;
    let resume = match headers.get("last-event-id") {
        Some(v) => {
            Some(v.to_str().ok().and_then(|s| s.trim().parse::<u64>().ok()).ok_or_else(|| ApiError::BadRequest {
                message: "Last-Event-ID is not an event number".into(),
                problems: Default::default(),
            })?)
        }
        None => q.after,
    };
    let slot = st
        .rate
        .stream(&st.store, st.mediator.lease_holder(), &access.user)
        .await
        .inspect_err(|_| st.metrics.rate_limited())?;
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
        // The first look: the task as `task_for` read it.
        let mut known: Option<Arc<Task>> = Some(Arc::new(task));
        loop {
            // News carries the task's state; without news (a poll), it is read.
            let state = match known.take() {
                Some(t) => Ok(Some(t)),
                None => st.store.task_state(&id).await.map(|t| t.map(Arc::new)),
            };
            let task = match state {
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
            // Only what is new is read: the events after the last one sent.
            if task.events.last().is_some_and(|e| e.seq > last) {
                let new = match st.store.task_events(&id, last).await {
                    Ok(new) => new,
                    Err(e) => {
                        tracing::debug!(task = %id, error = format!("{e:#}"), "stream: reading events failed; retrying");
                        Vec::new()
                    }
                };
                for e in &new {
                    let msg = json_event("event", e).id(e.seq.to_string());
                    if tx.send(msg).await.is_err() {
                        return;
                    }
                    last = e.seq;
                }
            }
            if sent_revision != Some(task.revision) {
                sent_revision = Some(task.revision);
                if tx.send(json_event("task", &TaskSummary::of(task.as_ref(), st.mediator.site()))).await.is_err() {
                    return;
                }
            }
            // Ended, and nothing its watchers wait for is still coming (what its jobs
            // used may be read later: the task shows it).
            if !task.news_coming() && task.events.last().is_none_or(|e| e.seq <= last) {
                let _ = tx.send(json_event("end", &serde_json::json!({ "state": task.state }))).await;
                break;
            }
            news.clear();
            if !wait_for_news(&mut updates, &mut shutdown, &tx, Some(id), &mut news).await {
                break;
            }
            known = news.pop();
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
    let slot = st
        .rate
        .stream(&st.store, st.mediator.lease_holder(), &access.user)
        .await
        .inspect_err(|_| st.metrics.rate_limited())?;
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
                if tx.send(json_event("task", &TaskSummary::of(&t, st.mediator.site()))).await.is_err() {
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
                    if let Ok(Some(t)) = st.store.task_state(&id).await {
                        found.push(t);
                    }
                }
                batch = found;
            } else {
                // News carries the task as stored: nothing to read.
                for t in news.drain(..) {
                    batch.push((*t).clone());
                }
            }
        }
    });
    Ok(sse(rx))
}

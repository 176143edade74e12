//! The frames of a phase that runs per frame, one page at a time: each frame's state,
//! exit status, times and job, read from the frames' records on the cluster as the
//! task's owner (the task itself carries only counts and the first failures).

use serde::Deserialize;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::AppState;
use super::auth::Caller;
use super::error::{ApiError, ErrorBody, Ok, Reply};
use super::extract::QueryArgs;
use super::tasks::{phase, task_id};
use crate::mediator::FramePage;
use crate::model::Phase;
use axum::extract::{Path, State};

/// `/api/v1/tasks/{id}/frames/{phase}`.
pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(frames))
}

/// Query of `GET /api/v1/tasks/{id}/frames/{phase}`.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
struct FramesQuery {
    /// Only frames in this state: `failed` or `completed`. Without it, the whole range
    /// in order, frames with no record shown `waiting` (or `not_run` once the phase
    /// ended).
    state: Option<String>,
    /// Where the page starts (default 0).
    offset: Option<u32>,
    /// Page size, 1 to 1000 (default 100).
    limit: Option<u32>,
}

/// One page of a frame phase's frames, each with its state, exit status, times and
/// job, read from the frames' records on the cluster as the task's owner. The task
/// itself carries only counts and the first failures.
#[utoipa::path(get, path = "/api/v1/tasks/{id}/frames/{phase}", tag = "tasks",
    params(
        ("id" = String, Path, description = "Task ID, or its URI (`hpcforge://<site>/tasks/<id>`, percent-encoded)."),
        ("phase" = Phase, Path, description = "A phase that runs per frame."),
        FramesQuery,
    ),
    responses(
        (status = 200, description = "One page of frames.", body = Ok<FramePage>),
        (status = 400, description = "A bad query, or a portal that named no user.", body = ErrorBody),
        (status = 404, description = "No such task or phase, or the phase does not run per frame.", body = ErrorBody),
        (status = 409, description = "The cluster cannot be read as this user (no key registered).", body = ErrorBody),
        (status = 422, description = "`state` is not failed or completed.", body = ErrorBody),
        (status = 503, description = "The cluster could not be asked.", body = ErrorBody),
    ))]
async fn frames(
    State(st): State<AppState>,
    caller: Caller,
    Path((id, ph)): Path<(String, String)>,
    QueryArgs(q): QueryArgs<FramesQuery>,
) -> Result<Reply<FramePage>, ApiError> {
    let task = st.mediator.task_state_for(&task_id(&st, &id)?, &caller.access()?).await?;
    let phase = phase(&task, &ph)?;
    let limit = q.limit.unwrap_or(100);
    if !(1..=1000).contains(&limit) {
        return Err(ApiError::BadRequest {
            message: format!("`limit` is between 1 and 1000, not {limit}"),
            problems: Default::default(),
        });
    }
    let page = st.mediator.frame_page(&task, phase, q.state.as_deref(), q.offset.unwrap_or(0), limit).await?;
    let message = format!(
        "frames {}-{} of {} {}of the {phase} phase",
        page.offset + u32::from(!page.frames.is_empty()),
        page.offset + page.frames.len() as u32,
        page.matched,
        page.state.as_deref().map(|s| format!("{s} ")).unwrap_or_default()
    );
    Ok(Reply::ok(page, message))
}

//! The servers sharing this store (`/api/v1/replicas`, admin): which are alive and
//! what each holds.

use axum::extract::State;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::AppState;
use super::error::{ApiError, Ok, Reply};
use crate::mediator::replicas::{self, ReplicaInfo};

/// Admin routes.
pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(list))
}

/// Every replica the store has seen, alive or not, by ID: its lease and the work it
/// holds now.
#[utoipa::path(get, path = "/api/v1/replicas", tag = "replicas",
    responses((status = 200, description = "The replicas.", body = Ok<Vec<ReplicaInfo>>)))]
async fn list(State(st): State<AppState>) -> Result<Reply<Vec<ReplicaInfo>>, ApiError> {
    let all = replicas::list(st.store.as_ref(), time::OffsetDateTime::now_utc()).await?;
    let alive = all.iter().filter(|r| r.alive).count();
    let me = st.mediator.replica_id().to_owned();
    Ok(Reply::ok(all, format!("{alive} replica{} alive; this is `{me}`", if alive == 1 { "" } else { "s" })))
}

//! Forge routes: preview a task's scripts without submitting anything, and the JSON
//! Schema a portal can check its form against.

use axum::extract::{Path, State};
use serde::{Deserialize, Serialize};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::AppState;
use super::auth::Caller;
use super::error::{ApiError, ErrorBody, Ok, Reply};
use super::extract::JsonBody;
use crate::forge::{ForgeError, TaskBody, assumed_home};
use crate::model::{AppName, ClusterName, DefinitionRef, ForgedScript, Problem, Problems, TaskId, UserName};

/// `POST /api/v1/forge/preview` and `GET /api/v1/applications/{name}/schema`.
pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(preview)).routes(routes!(schema))
}

impl From<ForgeError> for ApiError {
    fn from(e: ForgeError) -> Self {
        match e {
            ForgeError::Invalid(p) => ApiError::invalid("the task", p),
            ForgeError::NotFound { message, .. } => ApiError::NotFound(message),
            ForgeError::Store(s) => s.into(),
        }
    }
}

/// What a preview answers.
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Preview {
    /// The application version the scripts come from.
    pub application: DefinitionRef<AppName>,
    /// The cluster version.
    pub cluster: DefinitionRef<ClusterName>,
    /// A task ID made up for the preview (a real task gets its own).
    pub task_id: TaskId,
    /// Whom the scripts were forged for.
    pub user: UserName,
    /// The run directory the scripts use.
    pub run_dir: String,
    /// prolog, execute, epilog.
    pub scripts: Vec<ForgedScript>,
    /// What to keep in mind about this preview.
    pub notes: Vec<String>,
}

/// Forges the scripts a task would get (one per phase), for the caller (a portal: for the user
/// it acts for), or answers every validation problem. Nothing is submitted or stored.
#[utoipa::path(post, path = "/api/v1/forge/preview", tag = "forge", request_body = TaskBody,
    responses(
        (status = 200, description = "The scripts, one per phase.", body = Ok<Preview>),
        (status = 400, description = "The body is not JSON, or a portal named no user.", body = ErrorBody),
        (status = 404, description = "No such application or cluster.", body = ErrorBody),
        (status = 413, description = "The body is over the size cap.", body = ErrorBody),
        (status = 415, description = "The body is not declared as JSON.", body = ErrorBody),
        (status = 422, description = "The inputs have problems; each is listed with its JSON pointer.", body = ErrorBody),
    ))]
async fn preview(
    State(st): State<AppState>,
    caller: Caller,
    JsonBody(body): JsonBody<TaskBody>,
) -> Result<Reply<Preview>, ApiError> {
    let user = caller.subject()?;
    let task_id = TaskId::new();
    let home = assumed_home(&user);
    let (_, _, forged) =
        st.forge.forge_task(st.store.as_ref(), &body, task_id, &user, &home).await.map_err(|e| match e {
            // The body names it: point at the field.
            ForgeError::NotFound { kind, message } => ApiError::unknown_definition(kind, message),
            other => other.into(),
        })?;
    let message = format!(
        "3 scripts forged for `{}` on `{}` (preview; nothing submitted)",
        forged.application.name, forged.cluster.name
    );
    Ok(Reply::ok(
        Preview {
            application: forged.application,
            cluster: forged.cluster,
            task_id,
            user,
            run_dir: forged.run_dir,
            scripts: forged.scripts,
            notes: vec![
                format!(
                    "the run directory assumes the home directory {home}; a real submission uses the user's home on the cluster"
                ),
                "nothing was submitted or stored".to_owned(),
            ],
        },
        message,
    ))
}

/// The JSON Schema (2020-12) task inputs are checked against, as an object of input
/// name → value; portals can check a form against it before submitting.
#[utoipa::path(get, path = "/api/v1/applications/{name}/schema", tag = "applications",
    params(("name" = String, Path, description = "The application.")),
    responses(
        (status = 200, description = "The JSON Schema.", body = Ok<serde_json::Value>),
        (status = 400, description = "Not a valid application name.", body = ErrorBody),
        (status = 404, description = "No such application.", body = ErrorBody),
    ))]
async fn schema(State(st): State<AppState>, Path(name): Path<String>) -> Result<Reply<serde_json::Value>, ApiError> {
    let app = AppName::parse(&name).map_err(|e| ApiError::BadRequest {
        message: format!("`{}` is not a valid application name", name.escape_debug()),
        problems: Problems::from(Problem::new("", e.to_string())),
    })?;
    let compiled = st.forge.application(st.store.as_ref(), &app).await?;
    Ok(Reply::ok(
        compiled.validator.schema().clone(),
        format!("input schema of application `{app}` version {}", compiled.version),
    ))
}

//! Forge routes: preview a task's scripts without submitting anything, and the JSON
//! Schema a portal can check its form against.

use axum::Router;
use axum::extract::{Path, State};
use axum::routing::{get, post};
use serde::{Deserialize, Serialize};

use super::AppState;
use super::error::{ApiError, Reply};
use super::extract::{Actor, JsonBody};
use crate::forge::{ForgeError, TaskBody, assumed_home};
use crate::model::{AppName, ClusterName, DefinitionRef, ForgedScript, Problem, Problems, TaskId, UserName};

/// `/api/v1/forge/...`
pub fn routes() -> Router<AppState> {
    Router::new().route("/preview", post(preview))
}

/// `/api/v1/applications/{name}/schema`
pub fn schema_routes() -> Router<AppState> {
    Router::new().route("/{name}/schema", get(schema))
}

impl From<ForgeError> for ApiError {
    fn from(e: ForgeError) -> Self {
        match e {
            ForgeError::Invalid(p) => ApiError::invalid("the task", p),
            ForgeError::NotFound(m) => ApiError::NotFound(m),
            ForgeError::Store(s) => s.into(),
        }
    }
}

/// What a preview answers.
#[derive(Debug, Serialize, Deserialize)]
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

/// `POST /api/v1/forge/preview`: the same body as a task; answers the three scripts
/// or every validation problem. Nothing is submitted or stored.
async fn preview(
    State(st): State<AppState>,
    actor: Actor,
    JsonBody(body): JsonBody<TaskBody>,
) -> Result<Reply<Preview>, ApiError> {
    let task_id = TaskId::new();
    let home = assumed_home(&actor.0);
    let (_, _, forged) = st.forge.forge_task(st.store.as_ref(), &body, task_id, &actor.0, &home).await?;
    let message = format!(
        "3 scripts forged for `{}` on `{}` (preview; nothing submitted)",
        forged.application.name, forged.cluster.name
    );
    Ok(Reply::ok(
        Preview {
            application: forged.application,
            cluster: forged.cluster,
            task_id,
            user: actor.0,
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

/// `GET /api/v1/applications/{name}/schema`: the JSON Schema (2020-12) task inputs are
/// checked against, as an object of input name → value.
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

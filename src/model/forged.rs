//! Forged scripts: what the forge made for each phase of a task, and how a task's
//! scripts are stored (`tasks/<task-id>/script_<phase>`, with the definition versions
//! they came from).

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use super::names::{AppName, ClusterName, Phase, TaskId, UserName};
use super::task::DefinitionRef;

/// One forged script.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ForgedScript {
    /// The phase it runs.
    pub phase: Phase,
    /// The script.
    pub text: String,
    /// sha256 of `text`.
    pub sha256: String,
}

/// The scripts of a task (one per phase) and the definition versions they came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Forged {
    /// The application version.
    pub application: DefinitionRef<AppName>,
    /// The cluster version.
    pub cluster: DefinitionRef<ClusterName>,
    /// The task's run directory.
    pub run_dir: String,
    /// prolog, execute, epilog.
    pub scripts: Vec<ForgedScript>,
}

/// A forged script as stored (`tasks/<task-id>/script_<phase>`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredTaskScript {
    /// The task.
    pub task: TaskId,
    /// The phase.
    pub phase: Phase,
    /// Which forging of the task (1 for the first; a restart that forges again adds one).
    pub version: u32,
    /// The script.
    pub text: String,
    /// sha256 of `text`.
    pub sha256: String,
    /// The application version it was forged from.
    pub application: DefinitionRef<AppName>,
    /// The cluster version it was forged from.
    pub cluster: DefinitionRef<ClusterName>,
    /// The task's owner.
    pub owner: UserName,
    /// When it was stored.
    #[serde(with = "time::serde::rfc3339")]
    pub stored_at: OffsetDateTime,
}

/// The blob name of a task's forged script for `phase`.
pub fn task_script_name(task: &TaskId, phase: Phase) -> String {
    format!("tasks/{task}/script_{}", phase.as_str())
}

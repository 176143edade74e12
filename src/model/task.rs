//! Tasks: one submission by one user (application + cluster + inputs), and the state
//! of each of its phase jobs.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use time::OffsetDateTime;

use super::names::{AppName, ClusterName, Phase, TaskId, UserName};

/// A definition at the exact version a task was forged from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DefinitionRef<N> {
    /// Definition name.
    pub name: N,
    /// Definition version.
    pub version: u32,
}

/// Where one phase job stands. The scheduler states follow Slurm's vocabulary,
/// mapped the same way for every scheduler.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PhaseState {
    /// Not yet handed to the scheduler.
    Waiting,
    /// Submission under way (intent recorded, job ID not yet known).
    Submitting,
    /// Submission held back by a transient failure; it will be retried.
    Blocked,
    /// Queued by the scheduler.
    Pending,
    /// Running.
    Running,
    /// Ended with exit code 0.
    Completed,
    /// Ended with a non-zero exit code, or was refused by the scheduler.
    Failed,
    /// Cancelled by a user or admin.
    Cancelled,
    /// Killed at its wall-time limit.
    Timeout,
    /// Killed for exceeding its memory.
    OutOfMemory,
    /// Lost because its node failed.
    NodeFail,
    /// Left the queue and nothing can tell how it ended.
    Unknown,
}

impl PhaseState {
    /// Whether the state can no longer change (short of a restart).
    pub fn is_final(self) -> bool {
        matches!(
            self,
            PhaseState::Completed
                | PhaseState::Failed
                | PhaseState::Cancelled
                | PhaseState::Timeout
                | PhaseState::OutOfMemory
                | PhaseState::NodeFail
                | PhaseState::Unknown
        )
    }
}

/// One phase of a task and its batch job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PhaseRecord {
    /// Which phase.
    pub phase: Phase,
    /// Where its job stands.
    pub state: PhaseState,
    /// The scheduler's job ID, once known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job_id: Option<String>,
    /// The job's exit code, once it ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    /// sha256 of the forged script (stored as `tasks/<id>/script_<phase>`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub script_sha256: Option<String>,
    /// When the job was accepted by the scheduler.
    #[serde(default, skip_serializing_if = "Option::is_none", with = "time::serde::rfc3339::option")]
    pub submitted_at: Option<OffsetDateTime>,
    /// When the job started running.
    #[serde(default, skip_serializing_if = "Option::is_none", with = "time::serde::rfc3339::option")]
    pub started_at: Option<OffsetDateTime>,
    /// When the job ended.
    #[serde(default, skip_serializing_if = "Option::is_none", with = "time::serde::rfc3339::option")]
    pub ended_at: Option<OffsetDateTime>,
}

impl PhaseRecord {
    /// A phase that has not been submitted yet.
    pub fn waiting(phase: Phase) -> Self {
        Self {
            phase,
            state: PhaseState::Waiting,
            job_id: None,
            exit_code: None,
            script_sha256: None,
            submitted_at: None,
            started_at: None,
            ended_at: None,
        }
    }
}

/// One submission by one user.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Task {
    /// Task ID (UUID v7).
    pub id: TaskId,
    /// The Unix user the jobs run as, and who may see the task.
    pub owner: UserName,
    /// The application, at the version the task was forged from.
    pub application: DefinitionRef<AppName>,
    /// The cluster, at the version the task was forged from.
    pub cluster: DefinitionRef<ClusterName>,
    /// The validated inputs, in the portal's format.
    pub inputs: Value,
    /// The three phases, in order.
    pub phases: Vec<PhaseRecord>,
    /// When the task was created.
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    /// When anything about the task last changed.
    #[serde(with = "time::serde::rfc3339")]
    pub updated_at: OffsetDateTime,
}

impl Task {
    /// A new task with all phases waiting, created now.
    pub fn new(
        owner: UserName,
        application: DefinitionRef<AppName>,
        cluster: DefinitionRef<ClusterName>,
        inputs: Value,
        now: OffsetDateTime,
    ) -> Self {
        Self {
            id: TaskId::new(),
            owner,
            application,
            cluster,
            inputs,
            phases: Phase::ALL.into_iter().map(PhaseRecord::waiting).collect(),
            created_at: now,
            updated_at: now,
        }
    }
}

/// One forged script.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ForgedScript {
    /// The phase it runs.
    pub phase: Phase,
    /// The script.
    pub text: String,
    /// sha256 of `text`.
    pub sha256: String,
}

/// The three scripts of a task and the definition versions they came from.
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

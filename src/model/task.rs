//! Tasks: one submission by one user (application + cluster + inputs), and the state
//! of each of its phase jobs.
//!
//! Why this file is long: about 640 lines of code (the task, its phases' records, and
//! the one set of rules for its state: derived from its phases, held back while it is
//! queued, moved back only by a restart); the rest are the unit tests of those rules,
//! kept beside the rules they pin.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use time::OffsetDateTime;

use super::application::{FileAction, FileMode};
pub use super::forged::{Forged, ForgedScript, StoredTaskScript, task_script_name};
use super::names::{AppName, ClusterName, Phase, TaskId, UserName};
use super::posts::{PostsCursor, PostsTally};
use super::rules::{LogRule, OutputCursor, RuleRestarts};
use super::usage::Usage;
use super::workflow::{PhaseFiles, PhaseGraph, Wait};

/// A definition at the exact version a task was forged from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct DefinitionRef<N> {
    /// Definition name.
    pub name: N,
    /// Definition version.
    pub version: u32,
}

/// A file copied into the run directory, as the task's user, before the first phase
/// runs. Kept typed on the task from validation to submission.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct StagedFile {
    /// How it gets there.
    pub action: FileAction,
    /// Absolute path where it lives (on the task's cluster).
    pub source: String,
    /// Its name in the run directory (the source's last path segment).
    pub name: String,
    /// Permissions given to the copy; none keeps the source's (`cp -p`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<FileMode>,
}

/// Where one phase job stands. The scheduler states follow Slurm's vocabulary,
/// mapped the same way for every scheduler.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
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

impl PhaseState {
    /// Lowercase name, as in the API.
    pub fn as_str(self) -> &'static str {
        match self {
            PhaseState::Waiting => "waiting",
            PhaseState::Submitting => "submitting",
            PhaseState::Blocked => "blocked",
            PhaseState::Pending => "pending",
            PhaseState::Running => "running",
            PhaseState::Completed => "completed",
            PhaseState::Failed => "failed",
            PhaseState::Cancelled => "cancelled",
            PhaseState::Timeout => "timeout",
            PhaseState::OutOfMemory => "out_of_memory",
            PhaseState::NodeFail => "node_fail",
            PhaseState::Unknown => "unknown",
        }
    }

    /// Whether the job is in the scheduler's hands and not ended.
    pub fn is_live_job(self) -> bool {
        matches!(self, PhaseState::Pending | PhaseState::Running)
    }
}

/// A run of a phase that a restart replaced.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct PastRun {
    /// Which attempt it was (1 = the first submission).
    pub attempt: u32,
    /// Its job ID.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job_id: Option<String>,
    /// How it ended.
    pub state: PhaseState,
    /// Its exit code.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    /// When it ended.
    #[serde(default, skip_serializing_if = "Option::is_none", with = "time::serde::rfc3339::option")]
    pub ended_at: Option<OffsetDateTime>,
    /// What its job used (read before the restart, or after it: see `usage_due`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
    /// What its job used was still to be read when the phase was restarted: the
    /// monitor goes on looking for it (the scheduler's accounting knows the job by
    /// its ID).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub usage_due: bool,
}

/// A phase that runs per frame: which frames, and how they are run (a job array of
/// `elements()` elements, `per_job` frames each).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct FrameProgress {
    /// The frames, in canonical form (`1-9:2,20`).
    pub range: String,
    /// How many.
    pub total: u32,
    /// Frames per job (array element), run side by side.
    pub per_job: u32,
    /// At most this many elements at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_parallel: Option<u32>,
    /// The frames the current run runs, when a restart reruns only some (canonical
    /// form); absent: all of them. The others succeeded before and are kept.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selection: Option<String>,
    /// Frames that ended with exit status 0 (kept from earlier runs included).
    #[serde(default)]
    pub completed: u32,
    /// Frames that ended otherwise.
    #[serde(default)]
    pub failed: u32,
    /// The first [`MAX_LISTED_FAILURES`] failed frames, with their exit statuses.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub failures: Vec<FrameFailure>,
}

/// What a frame phase's records say: how many frames succeeded and failed, and the
/// failed ones with the lowest numbers, each with its exit status.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FrameTally {
    /// Frames that ended with exit status 0.
    pub completed: u32,
    /// Frames that ended otherwise.
    pub failed: u32,
    /// The first [`MAX_LISTED_FAILURES`] failed frames, in order.
    pub failures: Vec<(u32, i32)>,
}

/// A frame that failed, and how.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct FrameFailure {
    /// The frame.
    pub frame: u32,
    /// Its exit status.
    pub exit_code: i32,
}

/// How many failed frames a task lists (the rest are counted; the per-frame records
/// stay in the run directory).
pub const MAX_LISTED_FAILURES: usize = 100;

impl FrameProgress {
    /// Takes the counts of what the frames' records say.
    pub fn count(&mut self, tally: &FrameTally) {
        self.completed = tally.completed;
        self.failed = tally.failed;
        self.failures = tally
            .failures
            .iter()
            .take(MAX_LISTED_FAILURES)
            .map(|&(frame, exit_code)| FrameFailure { frame, exit_code })
            .collect();
    }

    /// The frames the current run runs: the selection, or the whole range.
    pub fn running(&self) -> &str {
        self.selection.as_deref().unwrap_or(&self.range)
    }

    /// How many frames the current run runs.
    pub fn running_count(&self) -> u32 {
        match &self.selection {
            Some(sel) => {
                super::frames::FrameRange::parse(sel, super::frames::MAX_FRAMES).map_or(0, |r| r.count() as u32)
            }
            None => self.total,
        }
    }

    /// How many job-array elements the current run makes.
    pub fn elements(&self) -> u32 {
        self.running_count().div_ceil(self.per_job.max(1))
    }

    /// Frames with no record: not run yet, running, or (once the phase has ended)
    /// never run or killed before they could record how they ended.
    pub fn unrecorded(&self) -> u32 {
        self.total.saturating_sub(self.completed + self.failed)
    }
}

/// The reason of a phase that did not run because what it waited for did not happen.
pub const NEVER_SATISFIED: &str = "DependencyNeverSatisfied";

/// One phase of a task and its batch job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct PhaseRecord {
    /// Which phase.
    pub phase: Phase,
    /// What it waits for: other phases of the task, each with a condition. Absent on
    /// tasks stored before applications could declare phases: theirs are the default
    /// shape's (see [`Task::graph`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub after: Option<Vec<Wait>>,
    /// The files it declares it needs and produces (a restart keeps a phase whose
    /// outputs are all newer than its inputs).
    #[serde(default, skip_serializing_if = "PhaseFiles::is_empty")]
    pub files: PhaseFiles,
    /// For a phase that runs per frame: its frames, and how they are run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub frames: Option<FrameProgress>,
    /// Where its job stands.
    pub state: PhaseState,
    /// The scheduler's job ID, once known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job_id: Option<String>,
    /// The job's exit code, once it ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    /// The signal that ended the job, if one did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signal: Option<i32>,
    /// The version of the task's scripts this phase runs, when it is not the task's
    /// newest (`scripts_version`): a restart that forged again from newer definitions
    /// leaves the phases it did not rerun on the scripts they ran.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub script_version: Option<u32>,
    /// sha256 of the forged script (stored as `tasks/<id>/script_<phase>`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub script_sha256: Option<String>,
    /// The scheduler's reason for the state (`Resources`, `DependencyNeverSatisfied`),
    /// or why the phase is blocked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// What went wrong, in plain words.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub explanation: Option<String>,
    /// The scheduler's own message (stderr), verbatim.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheduler_message: Option<String>,
    /// 1 for the first submission; a restart adds one.
    #[serde(default = "first_attempt")]
    pub attempt: u32,
    /// Runs a restart replaced, oldest first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub previous: Vec<PastRun>,
    /// When the job was accepted by the scheduler.
    #[serde(default, skip_serializing_if = "Option::is_none", with = "time::serde::rfc3339::option")]
    pub submitted_at: Option<OffsetDateTime>,
    /// When the job started running.
    #[serde(default, skip_serializing_if = "Option::is_none", with = "time::serde::rfc3339::option")]
    pub started_at: Option<OffsetDateTime>,
    /// When the job ended.
    #[serde(default, skip_serializing_if = "Option::is_none", with = "time::serde::rfc3339::option")]
    pub ended_at: Option<OffsetDateTime>,
    /// How far the engine has read what the phase's jobs posted.
    #[serde(default, skip_serializing_if = "PostsCursor::is_empty")]
    pub posts: PostsCursor,
    /// How far the task's log rules have read the job's output.
    #[serde(default, skip_serializing_if = "OutputCursor::is_empty")]
    pub output: OutputCursor,
    /// A log rule (its index) asked for this phase to run again once its job ends
    /// (the first rule that asked, when several did).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rerun_by_rule: Option<u32>,
    /// A phase that runs per frame: the frames log rules asked to run again
    /// (canonical form); the rerun runs those, and the others that did not succeed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rerun_frames: Option<String>,
    /// What the job used of what it asked for, once read after it ended
    /// (docs/definitions.md § "Resource use").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
    /// The job ended after it started, and what it used is still to be read.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub usage_due: bool,
}

fn first_attempt() -> u32 {
    1
}

impl PhaseRecord {
    /// A phase that has not been submitted yet.
    pub fn waiting(phase: Phase) -> Self {
        Self {
            phase,
            after: None,
            files: PhaseFiles::default(),
            frames: None,
            state: PhaseState::Waiting,
            job_id: None,
            exit_code: None,
            signal: None,
            script_version: None,
            script_sha256: None,
            reason: None,
            explanation: None,
            scheduler_message: None,
            attempt: 1,
            previous: Vec::new(),
            submitted_at: None,
            started_at: None,
            ended_at: None,
            posts: PostsCursor::default(),
            output: OutputCursor::default(),
            rerun_by_rule: None,
            rerun_frames: None,
            usage: None,
            usage_due: false,
        }
    }

    /// Which of its job's streams the task's log rules still have to read (stderr:
    /// `true`): none for a phase without a job or without a rule. For a phase that
    /// runs per frame, its frames' streams.
    pub fn output_pending(&self, rules: &[LogRule]) -> Vec<bool> {
        if self.job_id.is_none() {
            return Vec::new();
        }
        let done = |stderr: bool| match (self.frames.is_some(), stderr) {
            (true, s) => self.output.frames(s).drained,
            (false, false) => self.output.stdout_done,
            (false, true) => self.output.stderr_done,
        };
        [(false, done(false)), (true, done(true))]
            .into_iter()
            .filter(|(stderr, done)| !done && rules.iter().any(|r| r.applies_to(self.phase) && r.stream.reads(*stderr)))
            .map(|(stderr, _)| stderr)
            .collect()
    }

    /// Whether what its job posted may not all have been read yet: it has a job, and
    /// the job's posts were not read to the end after it ended.
    pub fn posts_pending(&self) -> bool {
        self.job_id.is_some() && !self.posts.drained
    }

    /// Whether the phase ended without running because what it waited for did not
    /// happen (Slurm's reason `DependencyNeverSatisfied`, which every scheduler's
    /// status is mapped to).
    pub fn never_satisfied(&self) -> bool {
        self.state == PhaseState::Cancelled && self.reason.as_deref() == Some(NEVER_SATISFIED)
    }

    /// Moves the current run to `previous` and makes the phase wait to be submitted
    /// again. For a phase that runs per frame, `rerun` names the frames that run again
    /// (`None`: all of them): how far their posts and output were read is forgotten
    /// (the submission removes their files); the other frames' stay read.
    pub fn reset_for_restart(&mut self, rerun: Option<&super::frames::FrameRange>) {
        self.previous.push(PastRun {
            attempt: self.attempt,
            job_id: self.job_id.take(),
            state: self.state,
            exit_code: self.exit_code.take(),
            ended_at: self.ended_at.take(),
            usage: self.usage.take(),
            usage_due: std::mem::take(&mut self.usage_due),
        });
        self.attempt += 1;
        // The rerun's posts are read as they come (a rerun appends to the phase's
        // file; the frames that run again start new ones); its output is a new
        // job's, read by the rules from its start.
        self.posts.drained = false;
        if self.frames.is_some() {
            self.posts.forget_frames(rerun);
        }
        self.output.reset_for_rerun(rerun);
        self.rerun_by_rule = None;
        self.rerun_frames = None;
        if let Some(f) = self.frames.as_mut() {
            f.count(&FrameTally::default());
            f.selection = None;
        }
        self.state = PhaseState::Waiting;
        self.signal = None;
        self.reason = None;
        self.explanation = None;
        self.scheduler_message = None;
        self.submitted_at = None;
        self.started_at = None;
    }
}

/// Where a task stands, derived from its phases.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum TaskState {
    /// Valid, waiting in the queue for a site resource (a licence, the user's share of
    /// a cluster); nothing submitted yet.
    Queued,
    /// Being handed to the scheduler.
    Submitting,
    /// Submission held back by a transient failure; it will be retried.
    Blocked,
    /// Submitted; no phase running yet.
    Pending,
    /// A phase is running.
    Running,
    /// Every phase completed.
    Completed,
    /// A phase failed (non-zero exit, time limit, memory, node, or refused).
    Failed,
    /// Cancelled on request.
    Cancelled,
    /// Ended, but how could not be told.
    Unknown,
}

impl TaskState {
    /// Whether the task has ended.
    pub fn is_final(self) -> bool {
        matches!(self, TaskState::Completed | TaskState::Failed | TaskState::Cancelled | TaskState::Unknown)
    }

    /// Lowercase name, as in the API.
    pub fn as_str(self) -> &'static str {
        match self {
            TaskState::Queued => "queued",
            TaskState::Submitting => "submitting",
            TaskState::Blocked => "blocked",
            TaskState::Pending => "pending",
            TaskState::Running => "running",
            TaskState::Completed => "completed",
            TaskState::Failed => "failed",
            TaskState::Cancelled => "cancelled",
            TaskState::Unknown => "unknown",
        }
    }
}

/// One thing that happened to a task.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct TaskEvent {
    /// 1, 2, 3... within the task (stream cursors use it).
    pub seq: u64,
    /// When.
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
    /// The phase concerned, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<Phase>,
    /// The phase state before (for state changes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<PhaseState>,
    /// The phase state after (for state changes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<PhaseState>,
    /// What happened, in words.
    pub message: String,
    /// For what a job posted (docs/definitions.md, "Jobs talk back"): the post.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub post: Option<JobPost>,
}

/// An event or a datum a job posted, as the task's history keeps it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct JobPost {
    /// The job that posted it.
    pub job: String,
    /// The frame, in a phase that runs per frame.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub frame: Option<u32>,
    /// An event's kind (`converged`); absent for a datum.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event: Option<String>,
    /// An event's data, if it had any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<Value>,
    /// A datum's key; absent for an event.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// A datum's value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<Value>,
    /// For an event a log rule raised from the job's output: the rule (its index in
    /// the task's `rules`); `data` then holds the pattern's named groups.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rule: Option<u32>,
    /// The job's own clock when it posted, if it said.
    #[serde(default, skip_serializing_if = "Option::is_none", with = "time::serde::rfc3339::option")]
    pub time: Option<OffsetDateTime>,
}

/// One submission by one user.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
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
    #[schema(value_type = Vec<Object>)]
    pub inputs: Value,
    /// The run directory on the cluster.
    #[serde(default)]
    pub run_dir: String,
    /// Files copied into the run directory before the first phase (from `file` inputs).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub staged: Vec<StagedFile>,
    /// Derived from the phases (see [`Task::refresh_state`]).
    #[serde(default = "submitting")]
    pub state: TaskState,
    /// Its phases, in the order the application declared them.
    pub phases: Vec<PhaseRecord>,
    /// Everything that happened, oldest first.
    #[serde(default)]
    pub events: Vec<TaskEvent>,
    /// What its jobs posted, counted against the caps.
    #[serde(default, skip_serializing_if = "PostsTally::is_empty")]
    pub posted: PostsTally,
    /// The application's log rules, as of the version the task was forged from.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rules: Vec<LogRule>,
    /// How many times each rule restarted each phase.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rule_restarts: Vec<RuleRestarts>,
    /// What the user takes home (the application's `outputs` globs, as of the version
    /// the task was forged from).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub outputs: Vec<String>,
    /// Its outputs kept in the store when it ends, if its application asks for it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub archive: Option<super::archive::Archive>,
    /// A cancel was asked for; the mediator stops what is still alive.
    #[serde(default)]
    pub cancel_requested: bool,
    /// Its place in the queue: higher runs first among queued tasks; 0 unless set.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub priority: i32,
    /// What it needs from the site's pools before its phases may be submitted
    /// (licences, its owner's share of the cluster), as of its creation.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub needs: Vec<super::queue::Need>,
    /// The workspace its run directory lives in, when its cluster uses workspaces.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workspace: Option<Workspace>,
    /// While queued: when it joined and what it waits for. Nothing is submitted
    /// while this is set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue: Option<super::queue::QueueEntry>,
    /// Which version of `tasks/<id>/script_<phase>` the phases run.
    #[serde(default = "first_attempt")]
    pub scripts_version: u32,
    /// For a blocked task: when the mediator tries again.
    #[serde(default, skip_serializing_if = "Option::is_none", with = "time::serde::rfc3339::option")]
    pub retry_at: Option<OffsetDateTime>,
    /// Submission tries so far (for backoff).
    #[serde(default)]
    pub submit_tries: u32,
    /// Which server may submit the task's jobs, and its fence (see [`SubmitClaim`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub claim: Option<SubmitClaim>,
    /// Bumped by every stored change; a write that expects an older value is refused,
    /// so the monitor and the API never lose each other's updates.
    #[serde(default)]
    pub revision: u64,
    /// When the task was created.
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    /// When anything about the task last changed.
    #[serde(with = "time::serde::rfc3339")]
    pub updated_at: OffsetDateTime,
}

/// A workspace of the site's workspace tool, as last seen (`ws_list`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Workspace {
    /// Its ID.
    pub id: String,
    /// Its filesystem, if the cluster names one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filesystem: Option<String>,
    /// Its directory on the cluster.
    pub path: String,
    /// When it expires (its data may be deleted after).
    #[serde(with = "time::serde::rfc3339")]
    pub expires_at: OffsetDateTime,
    /// Extensions left, as the tool said.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub extensions: Option<u32>,
    /// Whether the owner was warned that it expires soon (once per expiry date).
    #[serde(default, skip_serializing_if = "Option::is_none", with = "time::serde::rfc3339::option")]
    pub warned_for: Option<OffsetDateTime>,
}

/// The lease on a task's submission, kept in the task itself so that every write a
/// submission makes is checked against it by the same compare-and-swap: only the
/// holder's writes go through while it holds. `fence` rises with every claim and is
/// never reset; the scripts a submission runs on the cluster carry it, and the run
/// directory remembers the highest one seen, so an owner that lost its claim (paused,
/// partitioned) is refused by the cluster itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct SubmitClaim {
    /// The server process holding it (`<replica id>#<random>`).
    pub holder: String,
    /// Rises with every claim.
    pub fence: u64,
    /// Held until then unless renewed; a released claim has lapsed already.
    #[serde(with = "time::serde::rfc3339")]
    pub expires_at: OffsetDateTime,
}

impl SubmitClaim {
    /// Whether `holder` holds it at `at`.
    pub fn held_by(&self, holder: &str, at: OffsetDateTime) -> bool {
        self.holder == holder && self.expires_at > at
    }

    /// Whether anyone holds it at `at`.
    pub fn held(&self, at: OffsetDateTime) -> bool {
        self.expires_at > at
    }
}

fn is_zero(n: &i32) -> bool {
    *n == 0
}

fn submitting() -> TaskState {
    TaskState::Submitting
}

impl Task {
    /// A new task with the phases of `graph`, all waiting, created now.
    pub fn new(
        owner: UserName,
        application: DefinitionRef<AppName>,
        cluster: DefinitionRef<ClusterName>,
        inputs: Value,
        graph: &PhaseGraph,
        now: OffsetDateTime,
    ) -> Self {
        Self {
            id: TaskId::new(),
            owner,
            application,
            cluster,
            inputs,
            run_dir: String::new(),
            staged: Vec::new(),
            state: TaskState::Submitting,
            phases: graph
                .phases()
                .into_iter()
                .map(|p| PhaseRecord {
                    after: Some(graph.waits_of(p)),
                    files: graph.files_of(p),
                    ..PhaseRecord::waiting(p)
                })
                .collect(),
            events: Vec::new(),
            posted: PostsTally::default(),
            rules: Vec::new(),
            rule_restarts: Vec::new(),
            outputs: Vec::new(),
            archive: None,
            cancel_requested: false,
            priority: 0,
            needs: Vec::new(),
            workspace: None,
            queue: None,
            scripts_version: 1,
            retry_at: None,
            submit_tries: 0,
            claim: None,
            revision: 0,
            created_at: now,
            updated_at: now,
        }
    }

    /// The task's phases and what each waits for, as recorded when it was created.
    pub fn graph(&self) -> PhaseGraph {
        let default = PhaseGraph::default_shape();
        PhaseGraph::from_waits(
            self.phases.iter().map(|p| (p.phase, p.after.clone().unwrap_or_else(|| default.waits_of(p.phase)))),
        )
    }

    /// Whether a wait on a phase that has ended is met. Frame by frame, it is met as
    /// long as some of that phase's frames succeeded: the others' frames are each
    /// checked by the job itself.
    pub fn wait_met(&self, w: Wait) -> bool {
        let rec = self.phase(w.phase);
        if w.per_frame {
            rec.state == PhaseState::Completed || rec.frames.as_ref().is_some_and(|f| f.completed > 0)
        } else {
            w.when.met_by(rec.state)
        }
    }

    /// What `phase` waits for (see [`Task::graph`]).
    pub fn waits_of(&self, phase: Phase) -> Vec<Wait> {
        match &self.phase(phase).after {
            Some(w) => w.clone(),
            None => PhaseGraph::default_shape().waits_of(phase),
        }
    }

    /// The version of the task's scripts `phase` runs (see
    /// [`PhaseRecord::script_version`]).
    pub fn script_version_of(&self, phase: Phase) -> u32 {
        self.phase(phase).script_version.unwrap_or(self.scripts_version)
    }

    /// The task's phases, in the order they were declared.
    pub fn phase_names(&self) -> Vec<Phase> {
        self.phases.iter().map(|p| p.phase).collect()
    }

    /// Whether the task has `phase`.
    pub fn has_phase(&self, phase: Phase) -> bool {
        self.phases.iter().any(|p| p.phase == phase)
    }

    /// Why `phase` cannot be acted on when the task does not have it, naming the
    /// phases it has: ``task … has no phase `x` (its phases are `prolog`, …)``.
    pub fn no_such_phase(&self, phase: Phase) -> String {
        let names: Vec<String> = self.phases.iter().map(|p| format!("`{}`", p.phase)).collect();
        format!("task {} has no phase `{phase}` (its phases are {})", self.id, names.join(", "))
    }

    /// The record of `phase`.
    pub fn phase(&self, phase: Phase) -> &PhaseRecord {
        self.phases.iter().find(|p| p.phase == phase).expect("every task has all phases")
    }

    /// The record of `phase`, to change.
    pub fn phase_mut(&mut self, phase: Phase) -> &mut PhaseRecord {
        self.phases.iter_mut().find(|p| p.phase == phase).expect("every task has all phases")
    }

    /// Records an event.
    pub fn record(&mut self, at: OffsetDateTime, phase: Option<Phase>, message: impl Into<String>) {
        let seq = self.events.last().map_or(1, |e| e.seq + 1);
        self.events.push(TaskEvent { seq, at, phase, from: None, to: None, message: message.into(), post: None });
        self.updated_at = at;
    }

    /// Moves `phase` to `to`, recording the transition; does nothing if it is there.
    pub fn set_phase_state(&mut self, at: OffsetDateTime, phase: Phase, to: PhaseState, detail: Option<&str>) -> bool {
        let from = self.phase(phase).state;
        if from == to {
            return false;
        }
        self.phase_mut(phase).state = to;
        let seq = self.events.last().map_or(1, |e| e.seq + 1);
        let mut message = format!("{phase}: {} → {}", from.as_str(), to.as_str());
        if let Some(d) = detail.filter(|d| !d.is_empty()) {
            message.push_str(&format!(" ({d})"));
        }
        self.events.push(TaskEvent {
            seq,
            at,
            phase: Some(phase),
            from: Some(from),
            to: Some(to),
            message,
            post: None,
        });
        self.updated_at = at;
        self.refresh_state(at);
        true
    }

    /// Derives the task's state from its phases, recording a change. A task that has
    /// started never moves back (a job of it ran, so to its user it is running until it
    /// ends, whatever a later phase's job is doing); only a restart does that.
    pub fn refresh_state(&mut self, at: OffsetDateTime) {
        let new = settle(self.state, self.derived_state());
        self.set_state(new, at);
    }

    /// Derives the task's state afresh after a restart, which may move it back.
    pub fn restart_state(&mut self, at: OffsetDateTime) {
        let new = self.derived_state();
        self.set_state(new, at);
    }

    /// [`derive_state`], and queued while the task is in the queue with nothing
    /// submitted.
    fn derived_state(&self) -> TaskState {
        match derive_state(&self.phases, self.cancel_requested) {
            TaskState::Submitting if self.queue.is_some() && !self.cancel_requested => TaskState::Queued,
            s => s,
        }
    }

    /// The needs of the phases a submission would run now (those waiting), and the
    /// task's own: what the queue must grant before the task leaves it.
    pub fn due_needs(&self) -> Vec<super::queue::Need> {
        self.needs
            .iter()
            .filter(|n| n.phase.is_none_or(|p| self.has_phase(p) && self.phase(p).state == PhaseState::Waiting))
            .cloned()
            .collect()
    }

    /// Joins the queue at `at` if the phases due need anything from the site's pools;
    /// whether it did.
    pub fn join_queue(&mut self, at: OffsetDateTime) -> bool {
        if self.cancel_requested || self.due_needs().is_empty() {
            return false;
        }
        if self.queue.is_none() {
            self.queue = Some(super::queue::QueueEntry { since: at, waiting_for: None });
        }
        true
    }

    fn set_state(&mut self, new: TaskState, at: OffsetDateTime) {
        if new != self.state {
            let seq = self.events.last().map_or(1, |e| e.seq + 1);
            let message = format!("task: {} → {}", self.state.as_str(), new.as_str());
            self.events.push(TaskEvent { seq, at, phase: None, from: None, to: None, message, post: None });
            self.state = new;
            self.updated_at = at;
        }
    }

    /// Records what a job posted, as an event marked as the job's.
    pub fn record_post(&mut self, at: OffsetDateTime, phase: Phase, message: String, post: JobPost) {
        let seq = self.events.last().map_or(1, |e| e.seq + 1);
        self.events.push(TaskEvent { seq, at, phase: Some(phase), from: None, to: None, message, post: Some(post) });
        self.updated_at = at;
    }

    /// Whether the mediator still has work on this task (submit, watch, cancel, read
    /// what its jobs posted before they ended, or what they used, keep its outputs).
    pub fn is_live(&self) -> bool {
        self.news_coming()
            || self.phases.iter().any(|p| p.usage_due || p.previous.iter().any(|r| r.usage_due))
            || self.archive.as_ref().is_some_and(|a| a.state == super::archive::ArchiveState::Waiting)
    }

    /// Whether what a watcher of the task waits for may still come: a job is alive,
    /// what its jobs posted or printed is still being read, or a log rule's rerun is
    /// due. (What ended jobs used may still be read after that: [`Task::is_live`].)
    pub fn news_coming(&self) -> bool {
        self.jobs_live()
            || self
                .phases
                .iter()
                .any(|p| p.posts_pending() || !p.output_pending(&self.rules).is_empty() || p.rerun_by_rule.is_some())
    }

    /// Whether the task has not ended for its user: it is not final, or a job of it
    /// is still alive. (What its ended jobs posted may still be being read.)
    pub fn jobs_live(&self) -> bool {
        !self.state.is_final() || self.phases.iter().any(|p| p.state.is_live_job())
    }
}

/// How far along a live task is: a live task's state only moves forward
/// (submitting and blocked are the same step).
fn progress(s: TaskState) -> u8 {
    match s {
        TaskState::Queued | TaskState::Submitting | TaskState::Blocked => 0,
        TaskState::Pending => 1,
        TaskState::Running => 2,
        TaskState::Completed | TaskState::Failed | TaskState::Cancelled | TaskState::Unknown => 3,
    }
}

/// The state a task moves to from `current` when its phases say `derived`: never back
/// while it is live.
pub fn settle(current: TaskState, derived: TaskState) -> TaskState {
    if !current.is_final() && !derived.is_final() && progress(derived) < progress(current) { current } else { derived }
}

/// A task's state from its phases alone. Blocked or submitting while any phase is;
/// while jobs are alive, running if one runs or a phase of this round has already run,
/// else pending; once all ended, failed if any phase failed, else cancelled, else
/// unknown, else completed. ([`settle`] keeps a started task from moving back.)
pub fn derive_state(phases: &[PhaseRecord], cancel_requested: bool) -> TaskState {
    use PhaseState as P;
    if phases.iter().any(|p| p.state == P::Blocked) {
        return TaskState::Blocked;
    }
    if phases.iter().any(|p| p.state == P::Submitting) {
        // Even after a cancel: a job may be on its way, and it is stopped once known.
        return TaskState::Submitting;
    }
    if phases.iter().any(|p| p.state == P::Waiting) {
        // A cancelled task whose remaining phases will never be submitted.
        if cancel_requested && !phases.iter().any(|p| p.state.is_live_job()) {
            return TaskState::Cancelled;
        }
        return TaskState::Submitting;
    }
    if phases.iter().any(|p| p.state.is_live_job()) {
        // This round: the phases submitted by the latest start or restart.
        let round = phases.iter().map(|p| p.attempt).max().unwrap_or(1);
        let ran = phases
            .iter()
            .any(|p| p.attempt == round && (p.state == P::Running || (p.state.is_final() && p.started_at.is_some())));
        return if ran { TaskState::Running } else { TaskState::Pending };
    }
    let any = |f: &dyn Fn(P) -> bool| phases.iter().any(|p| f(p.state));
    // A phase not run because what it waited for did not happen says nothing by
    // itself: the phase that failed does (an error handler not needed is no failure).
    let cancelled = phases.iter().any(|p| p.state == P::Cancelled && !p.never_satisfied());
    if any(&|s| matches!(s, P::Failed | P::Timeout | P::OutOfMemory | P::NodeFail)) && !cancel_requested {
        TaskState::Failed
    } else if cancelled {
        // Cancelled by request; or a phase the scheduler cancelled because the one
        // before failed (counted as failed above).
        if cancel_requested { TaskState::Cancelled } else { TaskState::Failed }
    } else if any(&|s| s == P::Unknown) {
        TaskState::Unknown
    } else {
        TaskState::Completed
    }
}

/// A task of `alice`'s (application `sleep` v1 on cluster `c` v1), all phases waiting:
/// for unit tests of state changes.
#[cfg(test)]
pub(crate) fn sample_task(at: OffsetDateTime) -> Task {
    Task::new(
        UserName::parse("alice").unwrap(),
        DefinitionRef { name: AppName::parse("sleep").unwrap(), version: 1 },
        DefinitionRef { name: ClusterName::parse("c").unwrap(), version: 1 },
        Value::Null,
        &PhaseGraph::default_shape(),
        at,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn phases(states: [PhaseState; 3]) -> Vec<PhaseRecord> {
        Phase::DEFAULT
            .into_iter()
            .zip(states)
            .map(|(p, s)| PhaseRecord { state: s, ..PhaseRecord::waiting(p) })
            .collect()
    }

    #[test]
    fn the_task_state_follows_its_phases() {
        use PhaseState::*;
        let cases = [
            ([Waiting, Waiting, Waiting], false, TaskState::Submitting),
            ([Blocked, Waiting, Waiting], false, TaskState::Blocked),
            ([Pending, Pending, Pending], false, TaskState::Pending),
            ([Running, Pending, Pending], false, TaskState::Running),
            ([Completed, Running, Pending], false, TaskState::Running),
            ([Completed, Completed, Completed], false, TaskState::Completed),
            ([Completed, Failed, Completed], false, TaskState::Failed),
            ([Failed, Cancelled, Completed], false, TaskState::Failed),
            ([Completed, Timeout, Completed], false, TaskState::Failed),
            ([Completed, Cancelled, Completed], true, TaskState::Cancelled),
            ([Completed, Unknown, Completed], false, TaskState::Unknown),
            ([Cancelled, Waiting, Waiting], true, TaskState::Cancelled),
            // Cancelled from outside hpcforge: not what the user asked for.
            ([Completed, Cancelled, Completed], false, TaskState::Failed),
        ];
        for (states, cancel, want) in cases {
            assert_eq!(derive_state(&phases(states), cancel), want, "{states:?} cancel={cancel}");
        }
    }

    #[test]
    fn a_phase_not_run_because_its_condition_failed_is_not_a_failure_by_itself() {
        use PhaseState::*;
        let skipped = |p: Phase| PhaseRecord {
            state: Cancelled,
            reason: Some(NEVER_SATISFIED.into()),
            ..PhaseRecord::waiting(p)
        };
        let done = |p: Phase| PhaseRecord { state: Completed, ..PhaseRecord::waiting(p) };
        let handler = Phase::parse("on_failure").unwrap();
        // The work succeeded, so its error handler did not run: completed.
        let ok = [done(Phase::PROLOG), done(Phase::EXECUTE), skipped(handler)];
        assert_eq!(derive_state(&ok, false), TaskState::Completed);
        // The prolog failed, so execute did not run: the prolog's failure decides.
        let bad = [PhaseRecord { state: Failed, ..PhaseRecord::waiting(Phase::PROLOG) }, skipped(Phase::EXECUTE)];
        assert_eq!(derive_state(&bad, false), TaskState::Failed);
    }

    #[test]
    fn a_started_task_stays_running_between_phases() {
        // The regression (issue 9, hole 8): execute ended, the epilog queued, and the
        // task went `running → pending`.
        use PhaseState::*;
        let now = OffsetDateTime::UNIX_EPOCH;
        let mut t = sample_task(now);
        let mut seen = vec![t.state];
        for (phase, to) in [
            (Phase::PROLOG, Pending),
            (Phase::EXECUTE, Pending),
            (Phase::EPILOG, Pending),
            (Phase::PROLOG, Running),
            (Phase::PROLOG, Completed),
            (Phase::EXECUTE, Running),
            (Phase::EXECUTE, Completed),
            (Phase::EPILOG, Running),
            (Phase::EPILOG, Completed),
        ] {
            t.set_phase_state(now, phase, to, None);
            if seen.last() != Some(&t.state) {
                seen.push(t.state);
            }
        }
        use TaskState as T;
        assert_eq!(seen, [T::Submitting, T::Pending, T::Running, T::Completed]);
    }

    #[test]
    fn a_phase_that_ran_between_two_looks_counts_as_started() {
        use PhaseState::*;
        // The monitor never saw the prolog running: it went pending → completed.
        let mut p = phases([Completed, Pending, Pending]);
        p[0].started_at = Some(OffsetDateTime::UNIX_EPOCH);
        assert_eq!(derive_state(&p, false), TaskState::Running);
        // After a restart from execute, the prolog's old run is not this round's.
        p[1].attempt = 2;
        p[2].attempt = 2;
        assert_eq!(derive_state(&p, false), TaskState::Pending);
    }

    #[test]
    fn a_live_task_never_settles_backwards_but_ends_from_anywhere() {
        use TaskState::*;
        for (current, derived, want) in [
            (Running, Pending, Running),
            (Running, Blocked, Running),
            (Pending, Submitting, Pending),
            (Pending, Running, Running),
            (Blocked, Submitting, Submitting),
            (Submitting, Blocked, Blocked),
            (Running, Completed, Completed),
            (Pending, Cancelled, Cancelled),
            (Submitting, Failed, Failed),
        ] {
            assert_eq!(settle(current, derived), want, "{current:?} then {derived:?}");
        }
    }

    #[test]
    fn a_cancelled_task_with_a_submission_under_way_is_still_submitting() {
        use PhaseState::*;
        assert_eq!(derive_state(&phases([Submitting, Submitting, Submitting]), true), TaskState::Submitting);
        assert_eq!(derive_state(&phases([Cancelled, Cancelled, Cancelled]), true), TaskState::Cancelled);
    }

    #[test]
    fn transitions_are_recorded_as_numbered_events() {
        let now = OffsetDateTime::UNIX_EPOCH;
        let mut t = sample_task(now);
        for p in Phase::DEFAULT {
            t.set_phase_state(now, p, PhaseState::Pending, None);
        }
        assert_eq!(t.state, TaskState::Pending);
        assert!(!t.set_phase_state(now, Phase::PROLOG, PhaseState::Pending, None), "no change, no event");
        t.set_phase_state(now, Phase::PROLOG, PhaseState::Running, Some("job 12"));
        let msgs: Vec<&str> = t.events.iter().map(|e| e.message.as_str()).collect();
        assert_eq!(msgs.last(), Some(&"task: pending → running"));
        assert!(msgs.contains(&"prolog: pending → running (job 12)"));
        let seqs: Vec<u64> = t.events.iter().map(|e| e.seq).collect();
        assert_eq!(seqs, (1..=seqs.len() as u64).collect::<Vec<_>>());
    }

    #[test]
    fn a_restart_keeps_the_previous_run() {
        let mut p = PhaseRecord {
            state: PhaseState::Failed,
            job_id: Some("7".into()),
            exit_code: Some(3),
            ..PhaseRecord::waiting(Phase::EXECUTE)
        };
        p.reset_for_restart(None);
        assert_eq!((p.state, p.attempt, p.job_id.as_deref()), (PhaseState::Waiting, 2, None));
        assert_eq!(p.previous[0].job_id.as_deref(), Some("7"));
        assert_eq!(p.previous[0].exit_code, Some(3));
    }
}

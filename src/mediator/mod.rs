//! The mediator: turns tasks into batch jobs on clusters, as the task's user, and
//! follows them to the end.
//!
//! - [`remote`]: running a shell script over SSH or locally, results between markers.
//! - [`ssh`]: the SSH connection pool (host keys pinned, bounded, timed out).
//! - [`scheduler`]: the scheduler contract and shared shell plumbing;
//!   [`slurm`] and [`local`] implement it.
//! - [`failures`]: transient or permanent, and plain explanations.
//! - [`monitor`]: the loop that asks schedulers about live jobs.
//!
//! **At most once.** Before a phase is handed to the scheduler its intent is stored
//! (`submitting`). If a submission's outcome is unknown (timeout, dropped connection,
//! or this server dying between `sbatch` and the database write), the next attempt
//! first looks the jobs up by their tag (`--comment=hpcforge:<task>:<phase>`) and by
//! the marker each job writes when it starts, adopts what it finds, and submits only
//! what is missing.

pub mod failures;
pub mod local;
pub mod monitor;
pub mod remote;
pub mod scheduler;
pub mod slurm;
pub mod ssh;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;
use time::OffsetDateTime;
use tokio::sync::{Semaphore, broadcast, mpsc};

use crate::forge::inputs::StagedFile;
use crate::forge::{Forge, ForgeError, TaskBody};
use crate::model::{
    ClusterSpec, DefinitionRef, FileAction, Phase, PhaseState, Problems, SchedulerKind, Task, TaskId, UserName,
};
use crate::secrets::{ServerKey, credential_purpose};
use crate::store::{Store, StoreError};
use failures::{FailureKind, backoff, classify, explain};
use remote::{RemoteError, RemoteOutput};
use scheduler::{Dependency, JobQuery, PhaseSubmission, Scheduler, SubmitOutcome, SubmitPlan, SubmitReport};
use ssh::{SshLimits, SshPool, SshTarget};

/// How the mediator behaves.
#[derive(Debug, Clone)]
pub struct MediatorConfig {
    /// How often the monitor asks about live jobs.
    pub tick: Duration,
    /// Longest a submission round trip may take.
    pub submit_timeout: Duration,
    /// Longest a status, find or cancel round trip may take.
    pub query_timeout: Duration,
    /// Submissions in flight at once.
    pub submit_workers: usize,
    /// SSH pool limits.
    pub ssh: SshLimits,
    /// Consecutive transient failures after which a cluster is paused.
    pub pause_after: u32,
    /// Test hooks (set by `HPCFORGE_FAILPOINT`): `after-submit` aborts the process right
    /// after the scheduler accepted jobs and before they are recorded; `slow-submit`
    /// waits 3 s before each submission round trip.
    pub failpoint: Option<String>,
}

impl Default for MediatorConfig {
    fn default() -> Self {
        Self {
            tick: Duration::from_secs(5),
            submit_timeout: Duration::from_secs(120),
            query_timeout: Duration::from_secs(60),
            submit_workers: 16,
            ssh: SshLimits::default(),
            pause_after: 5,
            failpoint: std::env::var("HPCFORGE_FAILPOINT").ok().filter(|f| !f.is_empty()),
        }
    }
}

/// What the mediator answers the API with.
#[derive(Debug, thiserror::Error)]
pub enum MediatorError {
    /// The task (or its definitions) has problems.
    #[error("{0}")]
    Invalid(Problems),
    /// No such task (or not the caller's), or no such output.
    #[error("{0}")]
    NotFound(String),
    /// The task names an application or cluster (`kind`) that does not exist.
    #[error("{message}")]
    UnknownDefinition {
        /// Which of the two.
        kind: crate::definitions::DefinitionKind,
        /// What is missing, in words.
        message: String,
    },
    /// Not possible in the task's current state.
    #[error("{0}")]
    Conflict(String),
    /// The cluster cannot be reached right now.
    #[error("{0}")]
    Unavailable(String),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// A forge error for a task body: a missing application or cluster is one the body
/// names (the API points at its field).
fn named_in_body(e: ForgeError) -> MediatorError {
    match e {
        ForgeError::NotFound { kind, message } => MediatorError::UnknownDefinition { kind, message },
        other => other.into(),
    }
}

impl From<ForgeError> for MediatorError {
    fn from(e: ForgeError) -> Self {
        match e {
            ForgeError::Invalid(p) => MediatorError::Invalid(p),
            ForgeError::NotFound { message, .. } => MediatorError::NotFound(message),
            ForgeError::Store(s) => MediatorError::Store(s),
        }
    }
}

/// How to run scripts for one (cluster, user).
enum Exec {
    Ssh(SshTarget),
    Local,
}

/// A cluster that keeps failing is paused, not hammered.
#[derive(Debug, Default, Clone)]
struct Breaker {
    failures: u32,
    paused_until: Option<OffsetDateTime>,
}

/// The mediator.
pub struct Mediator {
    store: Arc<dyn Store>,
    forge: Arc<Forge>,
    key: Arc<ServerKey>,
    ssh: SshPool,
    cfg: MediatorConfig,
    queue: mpsc::UnboundedSender<TaskId>,
    queue_rx: Mutex<Option<mpsc::UnboundedReceiver<TaskId>>>,
    updates: broadcast::Sender<TaskId>,
    breakers: Mutex<HashMap<String, Breaker>>,
    homes: Mutex<HashMap<(String, String), String>>,
    in_flight: Mutex<HashSet<TaskId>>,
    /// Signalled whenever a submission attempt ends (for [`Mediator::drain`]).
    attempt_ended: tokio::sync::Notify,
    /// The Unix user this server runs as: the only user a `local` cluster runs jobs as.
    server_user: Option<UserName>,
    /// Counters for `/metrics`.
    metrics: Arc<crate::metrics::Metrics>,
}

impl std::fmt::Debug for Mediator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mediator").field("cfg", &self.cfg).finish_non_exhaustive()
    }
}

fn now() -> OffsetDateTime {
    crate::store::to_millis(OffsetDateTime::now_utc())
}

/// The server process's own Unix user name.
pub fn current_user() -> Option<UserName> {
    let out = std::process::Command::new("id").arg("-un").output().ok()?;
    UserName::parse(String::from_utf8_lossy(&out.stdout).trim()).ok()
}

/// The staged files a task's recorded inputs name (portal format).
pub fn staged_files(inputs: &Value) -> Vec<StagedFile> {
    let mut out = Vec::new();
    for input in inputs.as_array().into_iter().flatten() {
        for f in input.get("files").and_then(Value::as_array).into_iter().flatten() {
            let Some(path) = f.get("path").and_then(Value::as_str) else { continue };
            let name = path.rsplit('/').next().unwrap_or_default().to_owned();
            if name.is_empty() {
                continue;
            }
            out.push(StagedFile {
                action: FileAction::Copy,
                source: path.to_owned(),
                name,
                mods: f.get("mods").and_then(Value::as_str).map(str::to_owned),
            });
        }
    }
    out
}

/// Most bytes of job output one request returns.
pub const MAX_TAIL_BYTES: usize = 256 * 1024;

/// The end of a phase job's output.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct OutputTail {
    /// The phase.
    pub phase: Phase,
    /// `stdout` or `stderr`.
    pub stream: String,
    /// The job that wrote it.
    pub job_id: String,
    /// The file on the cluster.
    pub path: String,
    /// Its whole size in bytes.
    pub size: u64,
    /// Whether `text` is only the end of the file.
    pub truncated: bool,
    /// The last lines (invalid UTF-8 shown as U+FFFD).
    pub text: String,
}

/// Who asks the mediator to act on a task, and on whose behalf.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Access {
    /// The user whose tasks are concerned (a task's owner may act on it).
    pub user: UserName,
    /// Admins may act on every task.
    pub admin: bool,
    /// How to name the caller in events (`alice`, `alice via portal gateway`).
    pub by: String,
}

impl Access {
    /// A user acting for themselves.
    pub fn user(user: &UserName) -> Self {
        Self { user: user.clone(), admin: false, by: user.to_string() }
    }

    /// Whether this caller may see (and act on) `task`: its owner, or an admin.
    pub fn may_see(&self, task: &Task) -> bool {
        self.admin || task.owner == self.user
    }
}

/// A little entropy for backoff jitter.
fn jitter() -> u64 {
    u64::from(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos()))
}

fn scheduler_for(spec: &ClusterSpec) -> Result<Box<dyn Scheduler>, String> {
    match spec.scheduler {
        SchedulerKind::Slurm => Ok(Box::new(slurm::Slurm { accounting: spec.accounting })),
        SchedulerKind::Local => Ok(Box::new(local::Local)),
        other => Err(format!("submitting to {} clusters is not implemented yet (Slurm and local are)", other.as_str())),
    }
}

/// What a phase that needs submitting is waiting in.
fn needs_submission(state: PhaseState) -> bool {
    matches!(state, PhaseState::Waiting | PhaseState::Submitting | PhaseState::Blocked)
}

impl Mediator {
    /// A mediator over `store`, sealing and opening credentials with `key`.
    pub fn new(
        store: Arc<dyn Store>,
        forge: Arc<Forge>,
        key: Arc<ServerKey>,
        cfg: MediatorConfig,
        metrics: Arc<crate::metrics::Metrics>,
    ) -> Arc<Self> {
        let (tx, rx) = mpsc::unbounded_channel();
        let (updates, _) = broadcast::channel(1024);
        Arc::new(Self {
            store,
            forge,
            key,
            ssh: SshPool::new(cfg.ssh),
            cfg,
            queue: tx,
            queue_rx: Mutex::new(Some(rx)),
            updates,
            breakers: Mutex::default(),
            homes: Mutex::default(),
            in_flight: Mutex::default(),
            attempt_ended: tokio::sync::Notify::new(),
            server_user: current_user(),
            metrics,
        })
    }

    /// The server key (for sealing credentials).
    pub fn key(&self) -> &ServerKey {
        &self.key
    }

    /// SSH connections currently open.
    pub fn open_connections(&self) -> usize {
        self.ssh.open_connections()
    }

    /// Starts the submission workers and the monitor; they stop when `shutdown` fires.
    /// Tasks left unfinished by an earlier run are picked up again.
    pub fn start(self: &Arc<Self>, shutdown: tokio::sync::watch::Receiver<bool>) {
        let Some(mut rx) = self.queue_rx.lock().unwrap_or_else(|p| p.into_inner()).take() else { return };
        let this = self.clone();
        let mut stop = shutdown.clone();
        tokio::spawn(async move {
            let slots = Arc::new(Semaphore::new(this.cfg.submit_workers));
            loop {
                let id = tokio::select! {
                    id = rx.recv() => match id { Some(id) => id, None => break },
                    _ = stop.changed() => break,
                };
                if !this.in_flight.lock().unwrap_or_else(|p| p.into_inner()).insert(id) {
                    continue;
                }
                let permit = slots.clone().acquire_owned().await.expect("never closed");
                let worker = this.clone();
                tokio::spawn(async move {
                    if let Err(e) = worker.submit(id).await {
                        tracing::warn!(task = %id, error = format!("{e:#}"), "submission attempt failed; it will be retried");
                    }
                    worker.in_flight.lock().unwrap_or_else(|p| p.into_inner()).remove(&id);
                    worker.attempt_ended.notify_waiters();
                    drop(permit);
                });
            }
        });
        let this = self.clone();
        tokio::spawn(async move { monitor::run(this, shutdown).await });
    }

    /// Waits (at most `limit`) for the submission attempts under way to end, so a
    /// server that is shutting down records the job IDs it asked for. Returns how many
    /// were still running when it gave up (0: all done).
    pub async fn drain(&self, limit: Duration) -> usize {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let ended = self.attempt_ended.notified();
            let busy = self.in_flight.lock().unwrap_or_else(|p| p.into_inner()).len();
            if busy == 0 || tokio::time::Instant::now() >= deadline {
                return busy;
            }
            let _ =
                tokio::time::timeout_at(deadline.min(tokio::time::Instant::now() + Duration::from_millis(200)), ended)
                    .await;
        }
    }

    /// Submission attempts under way now.
    pub fn submissions_in_flight(&self) -> usize {
        self.in_flight.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// Wakes whoever waits for news of `id`.
    fn announce(&self, id: TaskId) {
        let _ = self.updates.send(id);
    }

    /// Queues `id` for (re)submission.
    pub fn enqueue(&self, id: TaskId) {
        let _ = self.queue.send(id);
    }

    // -----------------------------------------------------------------------------
    // Reaching clusters
    // -----------------------------------------------------------------------------

    async fn exec_for(&self, spec: &ClusterSpec, user: &UserName) -> Result<Exec, RemoteError> {
        if spec.scheduler == SchedulerKind::Local {
            return match &self.server_user {
                Some(me) if me == user => Ok(Exec::Local),
                Some(me) => Err(RemoteError::Refused(format!(
                    "cluster `{}` runs jobs as `{me}`, the server's own user, so it takes tasks of `{me}` only; \
                     `{user}`'s tasks need a cluster reached over SSH",
                    spec.name
                ))),
                None => Err(RemoteError::Refused("the server cannot tell which user it runs as".into())),
            };
        }
        let (Some(host), Some(host_key)) = (spec.host.clone(), spec.host_key.clone()) else {
            return Err(RemoteError::Refused(format!("cluster `{}` has no host or host key", spec.name)));
        };
        let cred = self
            .store
            .get_credential(user, &spec.name)
            .await
            .map_err(|e| RemoteError::Unreachable(format!("reading the credential: {e}")))?
            .ok_or_else(|| {
                RemoteError::Refused(format!(
                    "no SSH key is registered for `{user}` on cluster `{}`; an admin registers one with \
                     `hpcforge credential add --user {user} --cluster {} --key-file ...`",
                    spec.name, spec.name
                ))
            })?;
        let key = self.key.open(&credential_purpose(user.as_str(), spec.name.as_str()), &cred.sealed).map_err(|e| {
            RemoteError::Refused(format!("the SSH key of `{user}` on `{}` cannot be opened: {e}", spec.name))
        })?;
        let text = String::from_utf8(key.to_vec())
            .map_err(|_| RemoteError::Refused("the stored SSH key is not text".into()))?;
        Ok(Exec::Ssh(SshTarget {
            cluster: spec.name.to_string(),
            host,
            port: spec.port,
            host_key,
            user: user.clone(),
            private_key: Arc::new(zeroize::Zeroizing::new(text)),
        }))
    }

    async fn run(&self, exec: &Exec, script: &str, timeout: Duration) -> Result<RemoteOutput, RemoteError> {
        match exec {
            Exec::Local => remote::run_local(script, timeout).await,
            Exec::Ssh(t) => self.ssh.run(t, script, timeout).await,
        }
    }

    /// The user's home on the cluster (cached): what `~/` in a run-directory base means.
    async fn home(&self, spec: &ClusterSpec, user: &UserName) -> Result<String, MediatorError> {
        let key = (spec.name.to_string(), user.to_string());
        if let Some(h) = self.homes.lock().unwrap_or_else(|p| p.into_inner()).get(&key) {
            return Ok(h.clone());
        }
        let home = if spec.scheduler == SchedulerKind::Local {
            self.exec_for(spec, user).await.map_err(|e| MediatorError::Invalid(refusal(&e)))?;
            std::env::var("HOME").map_err(|_| MediatorError::Unavailable("the server has no HOME".into()))?
        } else {
            let exec = self.exec_for(spec, user).await.map_err(|e| match e {
                RemoteError::Refused(_) => MediatorError::Invalid(refusal(&e)),
                other => MediatorError::Unavailable(other.to_string()),
            })?;
            let out = self.run(&exec, "printf '%s' \"$HOME\"", self.cfg.query_timeout).await.map_err(|e| match e {
                RemoteError::Refused(_) => MediatorError::Invalid(refusal(&e)),
                other => MediatorError::Unavailable(format!("cluster `{}` cannot be reached: {other}", spec.name)),
            })?;
            out.body
        };
        let home = home.trim().to_owned();
        if !home.starts_with('/') {
            return Err(MediatorError::Unavailable(format!(
                "`{user}` has no usable home directory on `{}`",
                spec.name
            )));
        }
        self.homes.lock().unwrap_or_else(|p| p.into_inner()).insert(key, home.clone());
        Ok(home)
    }

    fn paused_until(&self, cluster: &str) -> Option<OffsetDateTime> {
        let b = self.breakers.lock().unwrap_or_else(|p| p.into_inner());
        b.get(cluster).and_then(|b| b.paused_until).filter(|t| *t > OffsetDateTime::now_utc())
    }

    fn cluster_failed(&self, cluster: &str) {
        let mut all = self.breakers.lock().unwrap_or_else(|p| p.into_inner());
        let b = all.entry(cluster.to_owned()).or_default();
        b.failures += 1;
        if b.failures >= self.cfg.pause_after {
            let secs = (30u64 << (b.failures - self.cfg.pause_after).min(5)).min(600);
            b.paused_until = Some(OffsetDateTime::now_utc() + time::Duration::seconds(secs as i64));
            tracing::warn!(
                cluster,
                failures = b.failures,
                pause_seconds = secs,
                "cluster paused after repeated failures"
            );
        }
    }

    fn cluster_ok(&self, cluster: &str) {
        self.breakers.lock().unwrap_or_else(|p| p.into_inner()).remove(cluster);
    }

    // -----------------------------------------------------------------------------
    // Tasks
    // -----------------------------------------------------------------------------

    /// Validates and forges `body` for `owner`, records the task and its scripts, and
    /// queues it for submission.
    pub async fn create_task(&self, body: &TaskBody, access: &Access) -> Result<Task, MediatorError> {
        let owner = &access.user;
        let cluster = self.forge.cluster(self.store.as_ref(), &body.cluster).await.map_err(named_in_body)?;
        scheduler_for(&cluster.spec).map_err(|m| MediatorError::Invalid(problem("/cluster", "scheduler", &m)))?;
        let home = if cluster.spec.run_dir_base.starts_with("~/") {
            self.home(&cluster.spec, owner).await?
        } else {
            String::new()
        };
        let task_id = TaskId::new();
        let (app, inputs, forged) =
            self.forge.forge_task(self.store.as_ref(), body, task_id, owner, &home).await.map_err(named_in_body)?;
        let at = now();
        let mut task = Task::new(
            owner.clone(),
            forged.application.clone(),
            DefinitionRef { name: forged.cluster.name.clone(), version: forged.cluster.version },
            inputs.to_portal(&app.spec),
            at,
        );
        task.id = task_id;
        task.run_dir = forged.run_dir.clone();
        for s in &forged.scripts {
            task.phase_mut(s.phase).script_sha256 = Some(s.sha256.clone());
        }
        task.scripts_version = self.store.put_task_scripts(&task_id, owner, &forged, at).await?;
        task.record(
            at,
            None,
            format!(
                "created by {}: application {} v{} on cluster {} v{}, run directory {}",
                access.by,
                forged.application.name,
                forged.application.version,
                forged.cluster.name,
                forged.cluster.version,
                task.run_dir
            ),
        );
        self.store.insert_task(&task).await?;
        tracing::info!(task = %task.id, owner = %owner, by = access.by, application = %task.application.name, cluster = %task.cluster.name, "task created");
        self.announce(task.id);
        self.enqueue(task.id);
        Ok(task)
    }

    /// The task `id` if `who` may see it (its owner, or an admin); others get
    /// `NotFound`, so task IDs cannot be probed.
    pub async fn task_for(&self, id: &TaskId, who: &Access) -> Result<Task, MediatorError> {
        match self.store.get_task(id).await? {
            Some(t) if who.may_see(&t) => Ok(t),
            _ => Err(MediatorError::NotFound(format!("there is no task {id}"))),
        }
    }

    /// Subscribes to news of tasks: the ID of every task that was just created or
    /// changed through this server.
    pub fn updates(&self) -> broadcast::Receiver<TaskId> {
        self.updates.subscribe()
    }

    /// Waits until every phase of `id` has a job ID, or the task is blocked or has
    /// ended, or `limit` passes; returns the task as it then is.
    pub async fn wait_submitted(&self, id: &TaskId, limit: Duration) -> Result<Task, MediatorError> {
        let mut rx = self.updates.subscribe();
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let t = self
                .store
                .get_task(id)
                .await?
                .ok_or_else(|| MediatorError::NotFound(format!("there is no task {id}")))?;
            let settled = t.phases.iter().all(|p| !matches!(p.state, PhaseState::Waiting | PhaseState::Submitting))
                || t.state.is_final();
            if settled || tokio::time::Instant::now() >= deadline {
                return Ok(t);
            }
            let _ = tokio::time::timeout_at(
                deadline.min(tokio::time::Instant::now() + Duration::from_millis(500)),
                async {
                    while let Ok(got) = rx.recv().await {
                        if got == *id {
                            break;
                        }
                    }
                },
            )
            .await;
        }
    }

    /// Writes `change` onto the stored task, re-reading and redoing it if someone else
    /// changed the task meanwhile. Returns the task as stored.
    async fn change_task(&self, id: &TaskId, mut change: impl FnMut(&mut Task)) -> Result<Task, StoreError> {
        for _ in 0..16 {
            let Some(mut t) = self.store.get_task(id).await? else {
                return Err(StoreError::Other(anyhow::anyhow!("task {id} vanished")));
            };
            change(&mut t);
            match self.store.update_task(&t).await {
                Ok(stored) => {
                    self.announce(*id);
                    return Ok(stored);
                }
                Err(StoreError::Conflict(_)) => continue,
                Err(e) => return Err(e),
            }
        }
        Err(StoreError::Conflict(format!("task {id} keeps changing; gave up updating it")))
    }

    /// Asks to cancel `id`: phases not yet submitted are cancelled at once, live jobs
    /// are cancelled on the cluster (the monitor confirms and retries).
    pub async fn cancel(&self, id: &TaskId, who: &Access) -> Result<Task, MediatorError> {
        let t = self.task_for(id, who).await?;
        if !t.is_live() {
            return Err(MediatorError::Conflict(format!("task {id} has already ended ({})", t.state.as_str())));
        }
        let who = who.by.clone();
        let t = self
            .change_task(id, |t| {
                if t.cancel_requested {
                    return;
                }
                t.cancel_requested = true;
                let at = now();
                t.record(at, None, format!("cancel requested by {who}"));
                for phase in Phase::ALL {
                    if needs_submission(t.phase(phase).state) {
                        t.phase_mut(phase).explanation = Some("cancelled before it was submitted".into());
                        t.set_phase_state(at, phase, PhaseState::Cancelled, None);
                    }
                }
                t.refresh_state(at);
            })
            .await?;
        self.cancel_jobs(&t).await;
        Ok(self.store.get_task(id).await?.unwrap_or(t))
    }

    /// Sends the scheduler's cancel for every live job of `t`.
    pub(crate) async fn cancel_jobs(&self, t: &Task) {
        let jobs: Vec<JobQuery> = t
            .phases
            .iter()
            .filter(|p| p.state.is_live_job())
            .filter_map(|p| {
                p.job_id.clone().map(|job_id| JobQuery { job_id, run_dir: t.run_dir.clone(), phase: p.phase })
            })
            .collect();
        if jobs.is_empty() {
            return;
        }
        let result = async {
            let cluster = self.forge.cluster(self.store.as_ref(), &t.cluster.name).await.map_err(|e| e.to_string())?;
            let sched = scheduler_for(&cluster.spec)?;
            let exec = self.exec_for(&cluster.spec, &t.owner).await.map_err(|e| e.to_string())?;
            self.run(&exec, &sched.cancel_script(&jobs), self.cfg.query_timeout).await.map_err(|e| e.to_string())
        }
        .await;
        if let Err(e) = result {
            tracing::warn!(task = %t.id, error = e, "cancel did not reach the cluster; the monitor retries");
        }
    }

    /// The last `lines` lines (at most [`MAX_TAIL_BYTES`]) of a phase job's standard
    /// output or error, read on the cluster as the task's owner.
    pub async fn output_tail(
        &self,
        task: &Task,
        phase: Phase,
        stderr: bool,
        lines: usize,
    ) -> Result<OutputTail, MediatorError> {
        let stream = if stderr { "stderr" } else { "stdout" };
        let rec = task.phase(phase);
        let Some(job_id) = rec.job_id.clone() else {
            return Err(MediatorError::NotFound(format!(
                "the {phase} phase of task {} has no job yet, so no {stream}",
                task.id
            )));
        };
        let cluster = self.forge.cluster(self.store.as_ref(), &task.cluster.name).await?;
        let sched = scheduler_for(&cluster.spec).map_err(MediatorError::Unavailable)?;
        let path = sched.output_file(&task.run_dir, phase, &job_id, stderr);
        let exec = self.exec_for(&cluster.spec, &task.owner).await.map_err(|e| match e {
            RemoteError::Refused(m) => MediatorError::Conflict(m),
            other => MediatorError::Unavailable(format!("cluster `{}` cannot be reached: {other}", cluster.name)),
        })?;
        let out = self
            .run(&exec, &scheduler::tail_script(&path, lines, MAX_TAIL_BYTES), self.cfg.query_timeout)
            .await
            .map_err(|e| MediatorError::Unavailable(format!("cluster `{}` did not answer: {e}", cluster.name)))?;
        let Some((size, bytes)) = scheduler::parse_tail(&out.body) else {
            return Err(MediatorError::NotFound(format!(
                "job {job_id} ({phase}) has no {stream} at {path} yet{}",
                if rec.state.is_final() { " (it may have been removed)" } else { "" }
            )));
        };
        let returned = bytes.len() as u64;
        Ok(OutputTail {
            phase,
            stream: stream.to_owned(),
            job_id,
            path,
            size,
            truncated: returned < size,
            text: String::from_utf8_lossy(&bytes).into_owned(),
        })
    }

    /// Resubmits `from` and the phases after it, keeping their history.
    pub async fn restart(&self, id: &TaskId, from: Phase, who: &Access) -> Result<Task, MediatorError> {
        let t = self.task_for(id, who).await?;
        if t.is_live() {
            return Err(MediatorError::Conflict(format!(
                "task {id} is still {}; wait for it to end or cancel it before restarting",
                t.state.as_str()
            )));
        }
        let who = who.by.clone();
        let t = self
            .change_task(id, |t| {
                let at = now();
                t.cancel_requested = false;
                t.submit_tries = 0;
                t.retry_at = None;
                for phase in Phase::ALL.into_iter().filter(|p| *p >= from) {
                    t.phase_mut(phase).reset_for_restart();
                }
                t.record(at, None, format!("restart from {from} requested by {who}"));
                t.refresh_state(at);
            })
            .await?;
        self.enqueue(*id);
        Ok(t)
    }

    // -----------------------------------------------------------------------------
    // Submission
    // -----------------------------------------------------------------------------

    /// One submission attempt for task `id`; see the module docs.
    pub(crate) async fn submit(&self, id: TaskId) -> Result<(), StoreError> {
        let Some(task) = self.store.get_task(&id).await? else { return Ok(()) };
        if task.cancel_requested || task.state.is_final() {
            return Ok(());
        }
        let todo: Vec<Phase> = Phase::ALL.into_iter().filter(|p| needs_submission(task.phase(*p).state)).collect();
        if todo.is_empty() {
            return Ok(());
        }
        if task.retry_at.is_some_and(|t| t > OffsetDateTime::now_utc()) {
            return Ok(()); // the monitor queues it again when the time comes
        }
        let cluster = match self.forge.cluster(self.store.as_ref(), &task.cluster.name).await {
            Ok(c) => c,
            Err(ForgeError::NotFound { message, .. }) => return self.fail(&id, &todo, &message, None).await,
            Err(e) => return self.block(&id, &todo, &format!("cluster definition unavailable: {e}")).await,
        };
        let sched = match scheduler_for(&cluster.spec) {
            Ok(s) => s,
            Err(m) => return self.fail(&id, &todo, &m, None).await,
        };
        if let Some(until) = self.paused_until(cluster.name.as_str()) {
            return self
                .block_until(
                    &id,
                    &todo,
                    &format!("cluster `{}` is paused after repeated failures", cluster.name),
                    until,
                )
                .await;
        }
        let exec = match self.exec_for(&cluster.spec, &task.owner).await {
            Ok(e) => e,
            Err(RemoteError::Refused(m)) => return self.fail(&id, &todo, &m, None).await,
            Err(e) => return self.block(&id, &todo, &e.to_string()).await,
        };

        // 1. Intent: stored before anything reaches the scheduler.
        let maybe_submitted = task.submit_tries > 0 || todo.iter().any(|p| task.phase(*p).state != PhaseState::Waiting);
        let task = self
            .change_task(&id, |t| {
                let at = now();
                t.submit_tries += 1;
                t.retry_at = None;
                for p in &todo {
                    t.phase_mut(*p).reason = None;
                    t.set_phase_state(at, *p, PhaseState::Submitting, None);
                }
            })
            .await?;

        // 2. An earlier attempt may have reached the scheduler: find its jobs first.
        let tags: BTreeMap<Phase, String> = todo.iter().map(|p| (*p, format!("hpcforge:{id}:{p}"))).collect();
        let mut found = BTreeMap::new();
        if maybe_submitted {
            let script = sched.find_script(&task.owner, &task.run_dir, &tags);
            match self.run(&exec, &script, self.cfg.query_timeout).await {
                Ok(out) => {
                    // Jobs of earlier runs (before a restart) carry the same tag and
                    // may have left start markers: only a job this run has not seen
                    // before counts.
                    for (phase, candidates) in sched.parse_find(&out.body, &tags) {
                        let earlier: Vec<&str> =
                            task.phase(phase).previous.iter().filter_map(|r| r.job_id.as_deref()).collect();
                        if let Some(job) = candidates.into_iter().find(|j| !earlier.contains(&j.as_str())) {
                            found.insert(phase, job);
                        }
                    }
                }
                Err(RemoteError::Refused(m)) => return self.fail(&id, &todo, &m, None).await,
                Err(e) => {
                    self.cluster_failed(cluster.name.as_str());
                    return self.block(&id, &todo, &format!("cannot check for earlier submissions: {e}")).await;
                }
            }
        }
        let remaining: Vec<Phase> = todo.iter().copied().filter(|p| !found.contains_key(p)).collect();

        // 3. Submit what is missing, in one round trip.
        let mut report = SubmitReport::default();
        if !remaining.is_empty() {
            let mut known: BTreeMap<Phase, String> =
                task.phases.iter().filter_map(|p| p.job_id.clone().map(|j| (p.phase, j))).collect();
            known.extend(found.clone());
            // A phase waits for the one before it if that one is submitted now, or ran
            // in the same round (same attempt); after a restart from a later phase, the
            // earlier phases belong to the previous round and are not waited for.
            let waits_for = |pred: Phase, this: Phase| {
                remaining.contains(&pred)
                    || (known.contains_key(&pred) && task.phase(pred).attempt == task.phase(this).attempt)
            };
            let mut phases = Vec::new();
            for p in &remaining {
                let Some(script) = self.store.read_task_script(&id, *p, Some(task.scripts_version)).await? else {
                    return self
                        .fail(
                            &id,
                            &todo,
                            &format!("the forged {p} script of task {id} is missing from the store"),
                            None,
                        )
                        .await;
                };
                let after = match p {
                    Phase::Execute if waits_for(Phase::Prolog, Phase::Execute) => Dependency::AfterOk(Phase::Prolog),
                    Phase::Epilog if waits_for(Phase::Execute, Phase::Epilog) => Dependency::AfterAny(Phase::Execute),
                    _ => Dependency::None,
                };
                phases.push(PhaseSubmission { phase: *p, script: script.text, tag: tags[p].clone(), after });
            }
            let plan = SubmitPlan {
                run_dir: task.run_dir.clone(),
                stage: if remaining.contains(&Phase::Prolog) { staged_files(&task.inputs) } else { Vec::new() },
                phases,
                known,
            };
            let script = match scheduler::prelude(&plan) {
                Ok(p) => p + &sched.submit_commands(&plan),
                Err(m) => return self.fail(&id, &todo, &m, None).await,
            };
            if self.cfg.failpoint.as_deref() == Some("slow-submit") {
                // For the shutdown test: a submission that is surely under way when
                // the server is told to stop.
                tokio::time::sleep(Duration::from_secs(3)).await;
            }
            let started = std::time::Instant::now();
            let ran = self.run(&exec, &script, self.cfg.submit_timeout).await;
            self.metrics.submit_latency(started.elapsed());
            match ran {
                Ok(out) => {
                    report.stage_failures = scheduler::parse_stage(&out.body);
                    sched.parse_submit(&out.body, &mut report);
                    if self.cfg.failpoint.as_deref() == Some("after-submit")
                        && report.outcomes.values().any(|o| matches!(o, SubmitOutcome::Submitted(_)))
                    {
                        eprintln!("hpcforge: failpoint after-submit: aborting before the job IDs are recorded");
                        std::process::abort();
                    }
                }
                Err(RemoteError::Refused(m)) => return self.fail(&id, &remaining, &m, None).await,
                Err(e @ RemoteError::Unreachable(_)) => {
                    self.metrics.scheduler_error("unreachable");
                    self.cluster_failed(cluster.name.as_str());
                    return self.block(&id, &remaining, &e.to_string()).await;
                }
                Err(e) => {
                    // The script may have run: the phases stay `submitting`, and the next
                    // attempt finds what it did by tag before submitting anything.
                    self.metrics.scheduler_error("ambiguous");
                    self.cluster_failed(cluster.name.as_str());
                    return self
                        .retry_later(&id, &format!("the submission's outcome is unknown ({e}); checking again"))
                        .await;
                }
            }
        }
        self.cluster_ok(cluster.name.as_str());
        self.record_submission(&id, &found, &remaining, report).await
    }

    /// Records what a submission did, on a fresh copy of the task.
    async fn record_submission(
        &self,
        id: &TaskId,
        found: &BTreeMap<Phase, String>,
        remaining: &[Phase],
        report: SubmitReport,
    ) -> Result<(), StoreError> {
        let stored = self
            .change_task(id, |t| {
                let at = now();
                for (p, job) in found {
                    let rec = t.phase_mut(*p);
                    rec.job_id = Some(job.clone());
                    rec.submitted_at.get_or_insert(at);
                    t.set_phase_state(at, *p, PhaseState::Pending, Some(&format!("job {job}, found again by its tag")));
                }
                let mut stop: Option<(FailureKind, String)> = None;
                if let Some((name, message)) = report.stage_failures.first() {
                    let rec = t.phase_mut(Phase::Prolog);
                    rec.explanation =
                        Some(format!("the input file `{name}` could not be copied into the run directory"));
                    rec.scheduler_message = Some(message.clone());
                    stop = Some((FailureKind::Permanent, format!("input `{name}` could not be staged")));
                }
                for p in remaining {
                    if let Some((kind, why)) = &stop {
                        match kind {
                            FailureKind::Permanent => {
                                let rec = t.phase_mut(*p);
                                rec.explanation.get_or_insert_with(|| format!("not submitted: {why}"));
                                let to = if *p == Phase::Prolog && !report.stage_failures.is_empty() {
                                    PhaseState::Failed
                                } else {
                                    PhaseState::Cancelled
                                };
                                t.set_phase_state(at, *p, to, None);
                            }
                            FailureKind::Transient => {
                                t.phase_mut(*p).reason = Some(why.clone());
                                t.set_phase_state(at, *p, PhaseState::Blocked, Some(why));
                            }
                        }
                        continue;
                    }
                    match report.outcomes.get(p).cloned().unwrap_or(SubmitOutcome::NotTried) {
                        SubmitOutcome::Submitted(job) => {
                            let rec = t.phase_mut(*p);
                            rec.job_id = Some(job.clone());
                            rec.submitted_at = Some(at);
                            t.set_phase_state(at, *p, PhaseState::Pending, Some(&format!("job {job}")));
                        }
                        SubmitOutcome::Refused { message, .. } => {
                            let kind = classify(&message);
                            let rec = t.phase_mut(*p);
                            rec.scheduler_message = Some(message.clone());
                            match kind {
                                FailureKind::Permanent => {
                                    rec.explanation = Some(explain(&message));
                                    t.set_phase_state(at, *p, PhaseState::Failed, Some("refused by the scheduler"));
                                    stop = Some((kind, format!("the {p} job was refused")));
                                }
                                FailureKind::Transient => {
                                    rec.reason = Some(format!(
                                        "the scheduler is busy or unreachable: {}",
                                        message.lines().last().unwrap_or("")
                                    ));
                                    t.set_phase_state(at, *p, PhaseState::Blocked, Some("transient scheduler failure"));
                                    stop = Some((kind, "waiting for the scheduler".into()));
                                }
                            }
                        }
                        SubmitOutcome::NotTried => {
                            // Nothing said about it: whether it was submitted is unknown,
                            // so it stays `submitting` and is looked up by tag next time.
                        }
                    }
                }
                if t.phases.iter().any(|p| matches!(p.state, PhaseState::Blocked | PhaseState::Submitting)) {
                    t.retry_at = Some(
                        at + time::Duration::try_from(backoff(t.submit_tries, jitter()))
                            .unwrap_or(time::Duration::minutes(5)),
                    );
                }
                t.refresh_state(at);
            })
            .await?;
        for p in remaining {
            match report.outcomes.get(p) {
                Some(SubmitOutcome::Submitted(_)) => self.metrics.submission(stored.cluster.name.as_str(), "submitted"),
                Some(SubmitOutcome::Refused { message, .. }) => {
                    let (outcome, kind) = match classify(message) {
                        FailureKind::Permanent => ("refused", "permanent"),
                        FailureKind::Transient => ("blocked", "transient"),
                    };
                    self.metrics.submission(stored.cluster.name.as_str(), outcome);
                    self.metrics.scheduler_error(kind);
                }
                _ => {}
            }
        }
        if stored.phases.iter().any(|p| p.state == PhaseState::Blocked) {
            self.cluster_failed(stored.cluster.name.as_str());
        }
        if stored.cancel_requested {
            // A cancel arrived while jobs were being submitted: stop them too.
            self.cancel_jobs(&stored).await;
        }
        Ok(())
    }

    /// Marks `phases` blocked with `why`; retried after a backoff.
    async fn block(&self, id: &TaskId, phases: &[Phase], why: &str) -> Result<(), StoreError> {
        let wait = self.change_task(id, |_| {}).await?.submit_tries;
        let until =
            now() + time::Duration::try_from(backoff(wait.max(1), jitter())).unwrap_or(time::Duration::minutes(5));
        self.block_until(id, phases, why, until).await
    }

    async fn block_until(
        &self,
        id: &TaskId,
        phases: &[Phase],
        why: &str,
        until: OffsetDateTime,
    ) -> Result<(), StoreError> {
        self.change_task(id, |t| {
            let at = now();
            for p in phases {
                if !needs_submission(t.phase(*p).state) {
                    continue;
                }
                t.phase_mut(*p).reason = Some(why.to_owned());
                t.set_phase_state(at, *p, PhaseState::Blocked, Some(why));
            }
            t.retry_at = Some(until);
        })
        .await
        .map(|_| ())
    }

    /// Leaves the phases as they are (`submitting`) and tries again after a backoff.
    async fn retry_later(&self, id: &TaskId, why: &str) -> Result<(), StoreError> {
        self.change_task(id, |t| {
            let at = now();
            t.record(at, None, why);
            t.retry_at = Some(
                at + time::Duration::try_from(backoff(t.submit_tries, jitter())).unwrap_or(time::Duration::minutes(5)),
            );
        })
        .await
        .map(|_| ())
    }

    /// Fails `phases` permanently with an explanation (and the scheduler's words).
    async fn fail(
        &self,
        id: &TaskId,
        phases: &[Phase],
        explanation: &str,
        message: Option<&str>,
    ) -> Result<(), StoreError> {
        self.change_task(id, |t| {
            let at = now();
            for (i, p) in phases.iter().enumerate() {
                if !needs_submission(t.phase(*p).state) {
                    continue;
                }
                let rec = t.phase_mut(*p);
                rec.explanation = Some(explanation.to_owned());
                rec.scheduler_message = message.map(str::to_owned);
                let to = if i == 0 { PhaseState::Failed } else { PhaseState::Cancelled };
                t.set_phase_state(at, *p, to, None);
            }
            t.retry_at = None;
            t.refresh_state(at);
        })
        .await
        .map(|_| ())
    }
}

fn problem(pointer: &str, rule: &str, message: &str) -> Problems {
    let mut p = Problems::default();
    p.push_rule(pointer, rule, None, message);
    p
}

fn refusal(e: &RemoteError) -> Problems {
    problem("/cluster", "access", &e.to_string())
}

#[cfg(test)]
mod tests {
    /// A recorded Slurm output from `tests/fixtures/slurm/` (for the parsers' unit tests).
    pub(crate) fn slurm_fixture(name: &str) -> String {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/slurm").join(name);
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    }

    use super::*;

    #[test]
    fn staged_files_come_from_the_recorded_inputs() {
        let inputs = serde_json::json!([
            { "name": "sleep", "type": "int", "value": 3 },
            { "name": "input_files", "type": "file", "files": [{ "action": "COPY", "path": "/etc/hostname", "mods": "0644" }] },
        ]);
        let files = staged_files(&inputs);
        assert_eq!(files.len(), 1);
        assert_eq!((files[0].name.as_str(), files[0].mods.as_deref()), ("hostname", Some("0644")));
    }
}

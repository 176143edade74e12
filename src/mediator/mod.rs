//! The mediator: turns tasks into batch jobs on clusters, as the task's user, and
//! follows them to the end.
//!
//! - [`clusters`]: reaching a (cluster, user) over SSH or locally; homes; pauses.
//! - [`remote`], [`ssh`]: running one shell script there (the SSH connection pool).
//! - [`control`]: what the API asks for: create, show, wait, cancel, restart, output.
//! - [`submission`]: one at-most-once submission attempt.
//! - [`claims`]: which server submits a task: a claim with a fence, in the task.
//! - [`transitions`]: the pure state changes submission, cancel and restart make.
//! - [`queue`]: tasks waiting for licences or their owner's share of a cluster,
//!   granted from the site's pools in priority and age order; what ended jobs held is
//!   released.
//! - [`workspaces`]: run directories in the site's workspaces: allocated, extended,
//!   warned about.
//! - [`monitor`]: the loop that asks schedulers about live jobs; on the same round
//!   trip, [`posts`] reads what jobs posted, [`rules`] their output, [`usage`] what
//!   ended jobs used.
//!
//! (The schedulers themselves are [`crate::scheduler`].)
//!
//! **At most once.** Before a phase is handed to the scheduler its intent is stored
//! (`submitting`). If a submission's outcome is unknown (timeout, dropped connection,
//! or this server dying between `sbatch` and the database write), the next attempt
//! first looks the jobs up by their tag (`--comment=hpcforge:<task>:<phase>`) and by
//! the marker each job writes when it starts, adopts what it finds, and submits only
//! what is missing.
//!
//! **Changes by compare-and-swap on the decision.** Every change to a stored task is
//! decided on a fresh copy by a function of [`transitions`] (or the monitor's
//! [`monitor::apply`]); when another writer got there first, it is decided again on
//! the newer copy, and a change whose starting state is gone is refused, not redone.

pub mod archive;
pub mod changes;
pub mod claims;
pub mod clusters;
pub mod control;
pub mod files;
pub mod monitor;
pub mod posts;
pub mod queue;
pub mod remote;
pub mod replicas;
pub mod rules;
pub mod ssh;
pub mod stream;
pub mod submission;
pub mod transitions;
pub mod usage;
pub mod workspaces;

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use time::OffsetDateTime;
use tokio::sync::{Semaphore, broadcast, mpsc};

use crate::forge::{Forge, ForgeError};
use crate::model::{Phase, Problems, Task, TaskId, UserName};
use crate::secrets::ServerKey;
use crate::store::{Store, StoreError};
use clusters::Clusters;
pub use clusters::current_user;
use ssh::SshLimits;
use transitions::Refused;

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
    /// How long a server that is stopping waits for submissions under way before it
    /// gives their claims up to the other replicas.
    pub drain: Duration,
    /// Test hooks (set by `HPCFORGE_FAILPOINT`): `after-submit` aborts the process right
    /// after the scheduler accepted jobs and before they are recorded; `slow-submit`
    /// waits 3 s before each submission round trip.
    pub failpoint: Option<String>,
    /// This server's replica ID among the servers sharing its store.
    pub replica: String,
    /// The installation's site ID: task URIs are `hpcforge://<site>/tasks/<id>`.
    pub site: crate::model::SiteId,
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
            drain: Duration::from_secs(30),
            failpoint: std::env::var("HPCFORGE_FAILPOINT").ok().filter(|f| !f.is_empty()),
            replica: replicas::default_id(),
            site: crate::model::SiteId::default(),
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

impl From<ForgeError> for MediatorError {
    fn from(e: ForgeError) -> Self {
        match e {
            ForgeError::Invalid(p) => MediatorError::Invalid(p),
            ForgeError::NotFound { message, .. } => MediatorError::NotFound(message),
            ForgeError::Store(s) => MediatorError::Store(s),
        }
    }
}

/// News of a task created or changed, through this server or (heard from the store,
/// see [`changes`]) through another.
#[derive(Debug, Clone)]
pub struct TaskNews {
    /// Which task.
    pub id: TaskId,
    /// The task as it was stored, as its state (no inputs, only its newest event).
    pub task: Arc<Task>,
    /// The events this change added, oldest first; `None` for a change heard from the
    /// store (read its events from the store).
    pub events: Option<Arc<Vec<crate::model::TaskEvent>>>,
}

/// A task whose submission is due.
struct Due {
    id: TaskId,
    /// For a task just created: everything its first attempt needs, so that it reads
    /// nothing from the store but the check that the task is still as it was made.
    created: Option<Box<submission::Created>>,
}

/// The mediator.
pub struct Mediator {
    store: Arc<dyn Store>,
    forge: Arc<Forge>,
    /// Reaching clusters as users.
    clusters: Clusters,
    cfg: MediatorConfig,
    /// Tasks whose submission is due, for the workers.
    queue: mpsc::UnboundedSender<Due>,
    queue_rx: Mutex<Option<mpsc::UnboundedReceiver<Due>>>,
    /// Every task that was just created or changed through this server.
    updates: broadcast::Sender<TaskNews>,
    /// Tasks with a submission attempt under way (one at a time per task).
    in_flight: Mutex<HashSet<TaskId>>,
    /// Signalled whenever a submission attempt ends (for [`Mediator::drain`]).
    attempt_ended: tokio::sync::Notify,
    /// Counters for `/metrics`.
    metrics: Arc<crate::metrics::Metrics>,
    /// This replica's lease, once joined ([`replicas`]).
    replica_lease: Mutex<Option<crate::store::leases::Lease>>,
    /// The newest revision of each task this server announced or heard of, so a
    /// change heard from the store that it made itself is not read again.
    heard: Mutex<std::collections::HashMap<TaskId, u64>>,
    /// Who holds this process's leases: `<replica id>#<random>`.
    instance: String,
    /// The replicas alive as last read from the store, with their leases' expiry
    /// (who watches which (cluster, user): [`replicas::watcher_of`]).
    peers: Mutex<Vec<(String, OffsetDateTime)>>,
    /// The log rules' patterns, compiled once.
    patterns: rules::Patterns,
    /// Wakes the look at the queue ([`queue`]).
    queue_kick: tokio::sync::Notify,
    /// The queue's lease, while this server looks at the queue ([`queue`]).
    queue_lease: Mutex<Option<crate::store::leases::Lease>>,
    /// When the workspaces were last looked after ([`workspaces`]).
    workspaces_looked: Mutex<Option<std::time::Instant>>,
    /// Tasks whose outputs this server is keeping in the store now ([`archive`]).
    archiving: Mutex<HashSet<TaskId>>,
}

impl std::fmt::Debug for Mediator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mediator").field("cfg", &self.cfg).finish_non_exhaustive()
    }
}

/// Now, to the millisecond both stores keep.
fn now() -> OffsetDateTime {
    crate::store::to_millis(OffsetDateTime::now_utc())
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
    /// The job that wrote it (for a frame, the phase's job array).
    pub job_id: String,
    /// The frame whose own output it is, when one was asked for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub frame: Option<u32>,
    /// The file on the cluster.
    pub path: String,
    /// Its whole size in bytes.
    pub size: u64,
    /// Whether `text` is only the end of the file.
    pub truncated: bool,
    /// The last lines (invalid UTF-8 shown as U+FFFD).
    pub text: String,
}

/// One page of a frame phase's frames, each as its record on the cluster says.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct FramePage {
    /// The phase.
    pub phase: Phase,
    /// Its frames (canonical range).
    pub range: String,
    /// How many frames it has.
    pub total: u32,
    /// Only frames in this state (`failed`, `completed`), if asked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<String>,
    /// How many frames match (the whole range without `state`).
    pub matched: u32,
    /// Where this page starts among them.
    pub offset: u32,
    /// The frames of this page, in order.
    pub frames: Vec<FrameDetail>,
    /// The `offset` of the next page, if there is one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_offset: Option<u32>,
}

/// One frame of a [`FramePage`].
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct FrameDetail {
    /// The frame number.
    pub frame: u32,
    /// `completed` (exit status 0), `failed`, `waiting` (no record yet, the phase is
    /// live: not run yet or running) or `not_run` (no record, the phase has ended:
    /// never ran, or was killed before it could record how it ended).
    pub state: String,
    /// Its exit status, once it ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    /// When it started (UTC).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<String>,
    /// When it ended (UTC).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ended_at: Option<String>,
    /// The batch job that ran it: the array's job ID and the element (`4711_3`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job: Option<String>,
    /// The node it ran on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// CPU seconds it used (everything the frame ran), as the frame measured itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_seconds: Option<f64>,
    /// CPU seconds over elapsed seconds: a frame runs on one of its job's CPUs, so
    /// near 1 for a frame that computed all along, near 0 for one that waited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_efficiency: Option<f64>,
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
        let instance = replicas::new_instance(&cfg.replica);
        let clusters = Clusters::new(store.clone(), key, cfg.ssh, cfg.query_timeout, cfg.pause_after, instance.clone());
        Arc::new(Self {
            store,
            forge,
            clusters,
            cfg,
            queue: tx,
            queue_rx: Mutex::new(Some(rx)),
            updates,
            in_flight: Mutex::default(),
            attempt_ended: tokio::sync::Notify::new(),
            metrics,
            replica_lease: Mutex::default(),
            instance,
            peers: Mutex::default(),
            heard: Mutex::default(),
            patterns: rules::Patterns::default(),
            queue_kick: tokio::sync::Notify::new(),
            workspaces_looked: Mutex::default(),
            queue_lease: Mutex::default(),
            archiving: Mutex::default(),
        })
    }

    /// The server key (for sealing credentials).
    pub fn key(&self) -> &ServerKey {
        self.clusters.key()
    }

    /// Drops what this server remembers of `user`'s key on `cluster` (it was just
    /// replaced or removed).
    pub fn forget_credential(&self, user: &UserName, cluster: &crate::model::ClusterName) {
        self.clusters.forget_credential(user, cluster);
    }

    /// SSH connections currently open.
    pub fn open_connections(&self) -> usize {
        self.clusters.open_connections()
    }

    /// Until when `cluster` is paused after repeated failures, if it is (this server's
    /// own count).
    pub fn paused_until(&self, cluster: &str) -> Option<OffsetDateTime> {
        self.clusters.paused_until(cluster)
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
                let due = tokio::select! {
                    due = rx.recv() => match due { Some(due) => due, None => break },
                    _ = stop.changed() => break,
                };
                let id = due.id;
                if !this.in_flight.lock().unwrap_or_else(|p| p.into_inner()).insert(id) {
                    continue;
                }
                let permit = slots.clone().acquire_owned().await.expect("never closed");
                let worker = this.clone();
                tokio::spawn(async move {
                    if let Err(e) = worker.submit(id, due.created).await {
                        tracing::warn!(task = %id, error = format!("{e:#}"), "submission attempt failed; it will be retried");
                    }
                    worker.in_flight.lock().unwrap_or_else(|p| p.into_inner()).remove(&id);
                    worker.attempt_ended.notify_waiters();
                    drop(permit);
                });
            }
        });
        let this = self.clone();
        let stop = shutdown.clone();
        tokio::spawn(async move { this.keep_lease(stop).await });
        let this = self.clone();
        let stop = shutdown.clone();
        tokio::spawn(async move { this.follow_changes(stop).await });
        let this = self.clone();
        let stop = shutdown.clone();
        tokio::spawn(async move { this.run_queue(stop).await });
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

    /// The end of a graceful stop (after `shutdown` fired): waits up to the configured
    /// drain time for the submissions under way, then releases the claims of those still
    /// running, so another replica takes their tasks over at once instead of after the
    /// claims lapse. Returns how many it handed over.
    pub async fn stop_work(&self) -> usize {
        let busy = self.submissions_in_flight();
        if busy > 0 {
            tracing::info!(submissions = busy, "waiting for submissions under way to finish");
        }
        if self.drain(self.cfg.drain).await == 0 {
            return 0;
        }
        let ids: Vec<TaskId> = self.in_flight.lock().unwrap_or_else(|p| p.into_inner()).iter().copied().collect();
        let mut handed = 0;
        for id in ids {
            match self.give_up_claim(&id).await {
                Ok(true) => handed += 1,
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(task = %id, error = %e, "could not release a submission claim; it lapses by itself")
                }
            }
        }
        tracing::warn!(
            submissions = handed,
            "stopped with submissions still under way; their claims are released, and the replica that takes each over finds its jobs by tag"
        );
        handed
    }

    /// Submission attempts under way now.
    pub fn submissions_in_flight(&self) -> usize {
        self.in_flight.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// Wakes whoever waits for news of `task` (as stored), which added `events`.
    fn announce(&self, task: &Task, events: &[crate::model::TaskEvent]) {
        if self.store.serves_many() {
            self.heard(task.id, task.revision);
        }
        if !task.needs.is_empty() {
            // Something it holds may be free now, or it joined the queue.
            self.kick_queue();
        }
        let _ = self.updates.send(TaskNews {
            id: task.id,
            task: Arc::new(crate::store::tasks::state_of(task)),
            events: Some(Arc::new(events.to_vec())),
        });
    }

    /// Queues `id` for (re)submission.
    pub fn enqueue(&self, id: TaskId) {
        let _ = self.queue.send(Due { id, created: None });
    }

    /// Subscribes to news of tasks: every task that was just created or changed
    /// through this server, as stored, and (on MongoDB with change streams) through
    /// the other replicas.
    pub fn updates(&self) -> broadcast::Receiver<TaskNews> {
        self.updates.subscribe()
    }

    /// Writes `change` onto the stored task by compare-and-swap: `change` decides on a
    /// fresh copy of the task's state and, if another writer changed the task
    /// meanwhile, decides again on the newer one. A refused change writes nothing, and
    /// a change that changes nothing is not written (nor announced); only the
    /// difference is. Returns the task's state as it now is, or the refusal with the
    /// state as it was.
    async fn change_task(
        &self,
        id: &TaskId,
        change: impl FnMut(&mut Task) -> Result<(), Refused>,
    ) -> Result<Result<Task, (Refused, Task)>, StoreError> {
        self.change_task_from(id, None, change).await
    }

    /// [`Self::change_task`], deciding first on `known` (a state just read, which
    /// saves reading it again) when there is one.
    async fn change_task_from(
        &self,
        id: &TaskId,
        mut known: Option<Task>,
        mut change: impl FnMut(&mut Task) -> Result<(), Refused>,
    ) -> Result<Result<Task, (Refused, Task)>, StoreError> {
        for _ in 0..16 {
            let before = match known.take() {
                Some(t) => t,
                None => self
                    .store
                    .task_state(id)
                    .await?
                    .ok_or_else(|| StoreError::Other(anyhow::anyhow!("task {id} vanished")))?,
            };
            let mut t = before.clone();
            if let Err(refused) = change(&mut t) {
                return Ok(Err((refused, before)));
            }
            if t == before {
                return Ok(Ok(t));
            }
            match self.store.update_task(&before, &t).await {
                Ok(stored) => {
                    if !claims::claim_only(&before, &stored) {
                        self.announce(&stored, crate::store::tasks::new_events(&before, &stored));
                    }
                    return Ok(Ok(stored));
                }
                Err(StoreError::Conflict(_)) => continue,
                Err(e) => return Err(e),
            }
        }
        Err(StoreError::Conflict(format!("task {id} keeps changing; gave up updating it")))
    }
}

fn problem(pointer: &str, rule: &str, message: &str) -> Problems {
    let mut p = Problems::default();
    p.push_rule(pointer, rule, None, message);
    p
}

/// A forge error for a task body: a missing application or cluster is one the body
/// names (the API points at its field).
fn named_in_body(e: ForgeError) -> MediatorError {
    match e {
        ForgeError::NotFound { kind, message } => MediatorError::UnknownDefinition { kind, message },
        other => other.into(),
    }
}

/// The tags of `phases` of task `id`: how their jobs are found again.
fn tags(id: &TaskId, phases: &[Phase]) -> std::collections::BTreeMap<Phase, String> {
    phases.iter().map(|p| (*p, format!("hpcforge:{id}:{p}"))).collect()
}

//! One submission attempt, at most once: the intent is stored before anything reaches
//! the scheduler; an attempt that may have reached it before looks its jobs up by tag
//! first; what happened is recorded on a fresh copy of the task. The decisions are
//! [`super::transitions`]; this file does the I/O around them.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use time::OffsetDateTime;

use super::clusters::Exec;
use super::remote::RemoteError;
use super::transitions::{self, Refused};
use super::{Mediator, now, tags};
use crate::forge::{CompiledCluster, ForgeError, ForgedScript};
use crate::model::{Phase, PhaseState, Task, TaskId};
use crate::scheduler::failures::{FailureKind, classify, retry_at};
use crate::scheduler::{self, Dependency, PhaseSubmission, Scheduler, SubmitOutcome, SubmitPlan, SubmitReport, common};
use crate::store::StoreError;

/// What the first attempt of a task just created needs, handed over from its creation:
/// the task as stored (with its intent), its forged scripts and its cluster.
pub(crate) struct Created {
    task: Task,
    scripts: Vec<ForgedScript>,
    cluster: Arc<CompiledCluster>,
}

impl Mediator {
    /// Queues the first submission attempt of `task`, just stored with its intent.
    pub(crate) fn hand_over(&self, task: &Task, scripts: Vec<ForgedScript>, cluster: Arc<CompiledCluster>) {
        let created = Created { task: crate::store::tasks::state_of(task), scripts, cluster };
        let _ = self.queue.send(super::Due { id: task.id, created: Some(Box::new(created)) });
    }

    /// One submission attempt for task `id`; see the module docs. A task just created
    /// comes with what it needs (`created`).
    pub(crate) async fn submit(&self, id: TaskId, created: Option<Box<Created>>) -> Result<(), StoreError> {
        if let Some(c) = created
            && self.first_attempt(*c).await?
        {
            return Ok(());
        }
        let Some(task) = self.store.task_state(&id).await? else { return Ok(()) };
        let todo = transitions::due_phases(&task);
        if todo.is_empty() || task.state.is_final() {
            return Ok(());
        }
        let phases: Vec<Phase> = todo.iter().map(|(p, _)| *p).collect();
        // After a cancel, only phases an unfinished attempt left `submitting` remain:
        // their jobs may exist, and are found (to be stopped) before anything is said.
        let cancelling = task.cancel_requested;
        if !cancelling && task.retry_at.is_some_and(|t| t > OffsetDateTime::now_utc()) {
            return Ok(()); // the monitor queues it again when the time comes
        }
        let cluster = match self.forge.cluster(self.store.as_ref(), &task.cluster.name).await {
            Ok(c) => c,
            Err(ForgeError::NotFound { message, .. }) => return self.fail(&id, &phases, &message).await,
            Err(e) => return self.block(&id, &phases, &format!("cluster definition unavailable: {e}")).await,
        };
        let sched = match scheduler::for_cluster(&cluster.spec) {
            Ok(s) => s,
            Err(m) => return self.fail(&id, &phases, &m).await,
        };
        let name = cluster.name.as_str();
        if let Some(until) = self.clusters.paused_until(name) {
            let why = format!("cluster `{name}` is paused after repeated failures");
            return self.block_until(&id, &phases, &why, until).await;
        }
        let exec = match self.clusters.exec_for(&cluster.spec, &task.owner).await {
            Ok(e) => e,
            Err(RemoteError::Refused(m)) => return self.fail(&id, &phases, &m).await,
            Err(e) => return self.block(&id, &phases, &e.to_string()).await,
        };
        if cancelling {
            return self.settle_cancelled(&task, &phases, sched.as_ref(), &exec, name).await;
        }

        // 1. Intent: stored before anything reaches the scheduler, and only if the
        //    phases are still where this attempt saw them.
        let maybe_submitted = task.submit_tries > 0 || todo.iter().any(|(_, state)| *state != PhaseState::Waiting);
        let task = match self.change_task(&id, |t| transitions::intent(t, &todo, now())).await? {
            Ok(t) => t,
            Err((Refused(why), _)) => {
                tracing::info!(task = %id, why, "submission not started");
                return Ok(());
            }
        };

        // 2. An earlier attempt may have reached the scheduler: find its jobs first.
        let mut found = BTreeMap::new();
        if maybe_submitted {
            match self.find_jobs(&task, &phases, sched.as_ref(), &exec).await {
                Ok(f) => found = f,
                Err(RemoteError::Refused(m)) => return self.fail(&id, &phases, &m).await,
                Err(e) => {
                    self.clusters.failed(name);
                    return self.block(&id, &phases, &format!("cannot check for earlier submissions: {e}")).await;
                }
            }
        }
        let remaining: Vec<Phase> = phases.iter().copied().filter(|p| !found.contains_key(p)).collect();

        // 3. Submit what is missing, in one round trip.
        let mut report = SubmitReport::default();
        if !remaining.is_empty() {
            let plan = match self.plan(&task, &remaining, &found).await? {
                Ok(plan) => plan,
                Err(why) => return self.fail(&id, &phases, &why).await,
            };
            let script = match common::prelude(&plan) {
                Ok(p) => p + &sched.submit_commands(&plan),
                Err(m) => return self.fail(&id, &phases, &m).await,
            };
            if self.cfg.failpoint.as_deref() == Some("slow-submit") {
                // For the shutdown and cancel tests: a submission that is surely under
                // way when the server is told to stop, or the user cancels.
                tokio::time::sleep(Duration::from_secs(3)).await;
            }
            // A cancel that landed since the intent stops the attempt here.
            let mut go = true;
            let checked = self
                .change_task(&id, |t| {
                    go = transitions::still_submitting(t, &remaining, now())?;
                    Ok(())
                })
                .await?;
            if let Err((Refused(why), _)) = checked {
                tracing::info!(task = %id, why, "submission stopped: the task changed meanwhile");
                return Ok(());
            }
            if !go {
                tracing::info!(task = %id, "submission stopped before the scheduler was asked: the task was cancelled");
                if !found.is_empty() {
                    self.record_submission(&id, &found, &[], &report, sched.as_ref()).await?;
                }
                return Ok(());
            }
            let started = std::time::Instant::now();
            let ran = self.clusters.run(&exec, &script, self.cfg.submit_timeout).await;
            self.metrics.submit_latency(started.elapsed());
            match ran {
                Ok(out) => {
                    report.stage_failures = common::parse_stage(&out.body);
                    sched.parse_submit(&out.body, &mut report);
                    if self.cfg.failpoint.as_deref() == Some("after-submit")
                        && report.outcomes.values().any(|o| matches!(o, SubmitOutcome::Submitted(_)))
                    {
                        eprintln!("hpcforge: failpoint after-submit: aborting before the job IDs are recorded");
                        std::process::abort();
                    }
                }
                Err(RemoteError::Refused(m)) => return self.fail(&id, &remaining, &m).await,
                Err(e @ RemoteError::Unreachable(_)) => {
                    self.metrics.scheduler_error("unreachable");
                    self.clusters.failed(name);
                    return self.block(&id, &remaining, &e.to_string()).await;
                }
                Err(e) => {
                    // The script may have run: the phases stay `submitting`, and the next
                    // attempt finds what it did by tag before submitting anything.
                    self.metrics.scheduler_error("ambiguous");
                    self.clusters.failed(name);
                    let why = format!("the submission's outcome is unknown ({e}); checking again");
                    return self.retry_later(&id, &why).await;
                }
            }
        }
        self.clusters.ok(name);
        self.record_submission(&id, &found, &remaining, &report, sched.as_ref()).await
    }

    /// The first attempt of a task just created, from what its creation handed over:
    /// one read (is the task still as it was stored? it may have been cancelled) before
    /// the scheduler is asked, one write after. `false` if the task changed since, so
    /// that the ordinary attempt decides on what it is now.
    async fn first_attempt(&self, c: Created) -> Result<bool, StoreError> {
        let Created { task, scripts, cluster } = c;
        let id = task.id;
        let sched = match scheduler::for_cluster(&cluster.spec) {
            Ok(s) => s,
            Err(_) => return Ok(false),
        };
        let name = cluster.name.as_str();
        if self.clusters.paused_until(name).is_some() {
            return Ok(false);
        }
        let exec = match self.clusters.exec_for(&cluster.spec, &task.owner).await {
            Ok(e) => e,
            Err(_) => return Ok(false), // the ordinary attempt says why
        };
        let phases: Vec<Phase> = transitions::due_phases(&task).into_iter().map(|(p, _)| p).collect();
        let tags = tags(&id, &phases);
        let plan = SubmitPlan {
            run_dir: task.run_dir.clone(),
            stage: task.staged.clone(),
            phases: phases
                .iter()
                .filter_map(|p| {
                    let script = scripts.iter().find(|s| s.phase == *p)?;
                    let after = match p {
                        Phase::Execute => Dependency::AfterOk(Phase::Prolog),
                        Phase::Epilog => Dependency::AfterAny(Phase::Execute),
                        Phase::Prolog => Dependency::None,
                    };
                    Some(PhaseSubmission { phase: *p, script: script.text.clone(), tag: tags[p].clone(), after })
                })
                .collect(),
            known: BTreeMap::new(),
        };
        if phases != Phase::ALL || plan.phases.len() != phases.len() {
            return Ok(false);
        }
        let script = match common::prelude(&plan) {
            Ok(p) => p + &sched.submit_commands(&plan),
            Err(_) => return Ok(false),
        };
        if self.cfg.failpoint.as_deref() == Some("slow-submit") {
            tokio::time::sleep(Duration::from_secs(3)).await;
        }
        // Still as it was stored? A cancel stops the attempt here.
        let mut go = true;
        let checked = self
            .change_task(&id, |t| {
                if t.revision != task.revision {
                    return Err(Refused(format!("task {id} changed since it was created")));
                }
                go = transitions::still_submitting(t, &phases, now())?;
                Ok(())
            })
            .await?;
        let fresh = match checked {
            Ok(fresh) => fresh,
            Err(_) => return Ok(false),
        };
        if !go {
            tracing::info!(task = %id, "submission stopped before the scheduler was asked: the task was cancelled");
            return Ok(true);
        }
        let mut report = SubmitReport::default();
        let started = std::time::Instant::now();
        let ran = self.clusters.run(&exec, &script, self.cfg.submit_timeout).await;
        self.metrics.submit_latency(started.elapsed());
        match ran {
            Ok(out) => {
                report.stage_failures = common::parse_stage(&out.body);
                sched.parse_submit(&out.body, &mut report);
                if self.cfg.failpoint.as_deref() == Some("after-submit")
                    && report.outcomes.values().any(|o| matches!(o, SubmitOutcome::Submitted(_)))
                {
                    eprintln!("hpcforge: failpoint after-submit: aborting before the job IDs are recorded");
                    std::process::abort();
                }
            }
            Err(RemoteError::Refused(m)) => {
                self.fail(&id, &phases, &m).await?;
                return Ok(true);
            }
            Err(e @ RemoteError::Unreachable(_)) => {
                self.metrics.scheduler_error("unreachable");
                self.clusters.failed(name);
                self.block(&id, &phases, &e.to_string()).await?;
                return Ok(true);
            }
            Err(e) => {
                self.metrics.scheduler_error("ambiguous");
                self.clusters.failed(name);
                self.retry_later(&id, &format!("the submission's outcome is unknown ({e}); checking again")).await?;
                return Ok(true);
            }
        }
        self.clusters.ok(name);
        self.record_from(Some(fresh), &id, &BTreeMap::new(), &phases, &report, sched.as_ref()).await?;
        Ok(true)
    }

    /// The jobs of `phases` that an earlier attempt submitted: by tag in the queue, or
    /// by the start marker each job writes. Jobs of earlier runs (before a restart)
    /// carry the same tag and may have left markers: only a job this run has not seen
    /// before counts.
    async fn find_jobs(
        &self,
        task: &Task,
        phases: &[Phase],
        sched: &dyn Scheduler,
        exec: &Exec,
    ) -> Result<BTreeMap<Phase, String>, RemoteError> {
        let tags = tags(&task.id, phases);
        let script = sched.find_script(&task.owner, &task.run_dir, &tags);
        let out = self.clusters.run(exec, &script, self.cfg.query_timeout).await?;
        let mut found = BTreeMap::new();
        for (phase, candidates) in sched.parse_find(&out.body, &tags) {
            let earlier: Vec<&str> = task.phase(phase).previous.iter().filter_map(|r| r.job_id.as_deref()).collect();
            if let Some(job) = candidates.into_iter().find(|j| !earlier.contains(&j.as_str())) {
                found.insert(phase, job);
            }
        }
        Ok(found)
    }

    /// What to submit for `remaining`: their forged scripts and dependencies. The
    /// inner error says why the task cannot be submitted at all.
    async fn plan(
        &self,
        task: &Task,
        remaining: &[Phase],
        found: &BTreeMap<Phase, String>,
    ) -> Result<Result<SubmitPlan, String>, StoreError> {
        let mut known: BTreeMap<Phase, String> =
            task.phases.iter().filter_map(|p| p.job_id.clone().map(|j| (p.phase, j))).collect();
        known.extend(found.clone());
        // A phase waits for the one before it if that one is submitted now, or ran in
        // the same round (same attempt); after a restart from a later phase, the
        // earlier phases belong to the previous round and are not waited for.
        let waits_for = |pred: Phase, this: Phase| {
            remaining.contains(&pred)
                || (known.contains_key(&pred) && task.phase(pred).attempt == task.phase(this).attempt)
        };
        let tags = tags(&task.id, remaining);
        let mut phases = Vec::new();
        for p in remaining {
            let Some(script) = self.store.read_task_script(&task.id, *p, Some(task.scripts_version)).await? else {
                return Ok(Err(format!("the forged {p} script of task {} is missing from the store", task.id)));
            };
            let after = match p {
                Phase::Execute if waits_for(Phase::Prolog, Phase::Execute) => Dependency::AfterOk(Phase::Prolog),
                Phase::Epilog if waits_for(Phase::Execute, Phase::Epilog) => Dependency::AfterAny(Phase::Execute),
                _ => Dependency::None,
            };
            phases.push(PhaseSubmission { phase: *p, script: script.text, tag: tags[p].clone(), after });
        }
        Ok(Ok(SubmitPlan {
            run_dir: task.run_dir.clone(),
            stage: if remaining.contains(&Phase::Prolog) { task.staged.clone() } else { Vec::new() },
            phases,
            known,
        }))
    }

    /// A cancelled task whose `phases` an unfinished attempt left `submitting`: the
    /// jobs found by tag are recorded (and stopped), the rest are cancelled.
    async fn settle_cancelled(
        &self,
        task: &Task,
        phases: &[Phase],
        sched: &dyn Scheduler,
        exec: &Exec,
        cluster: &str,
    ) -> Result<(), StoreError> {
        let submitting: Vec<Phase> =
            phases.iter().copied().filter(|p| task.phase(*p).state == PhaseState::Submitting).collect();
        if submitting.is_empty() {
            return Ok(());
        }
        let found = match self.find_jobs(task, &submitting, sched, exec).await {
            Ok(f) => f,
            Err(e) => {
                self.clusters.failed(cluster);
                let why = format!("cancelling: cannot check for jobs already submitted ({e}); checking again");
                return self.retry_later(&task.id, &why).await;
            }
        };
        self.clusters.ok(cluster);
        let stored = self.update_task(&task.id, |t| transitions::settle_cancelled(t, &found, now())).await?;
        self.cancel_jobs(&stored).await;
        Ok(())
    }

    /// Records what a submission did, on a fresh copy of the task.
    async fn record_submission(
        &self,
        id: &TaskId,
        found: &BTreeMap<Phase, String>,
        remaining: &[Phase],
        report: &SubmitReport,
        sched: &dyn Scheduler,
    ) -> Result<(), StoreError> {
        self.record_from(None, id, found, remaining, report, sched).await
    }

    /// [`Self::record_submission`], trying first on `known` (a state just read).
    async fn record_from(
        &self,
        known: Option<Task>,
        id: &TaskId,
        found: &BTreeMap<Phase, String>,
        remaining: &[Phase],
        report: &SubmitReport,
        sched: &dyn Scheduler,
    ) -> Result<(), StoreError> {
        let changed = self
            .change_task_from(id, known, |t| {
                let at = now();
                let retry = retry_at(at, t.submit_tries);
                transitions::apply_submission(t, found, remaining, report, sched, at, retry);
                Ok(())
            })
            .await?;
        let (Ok(stored) | Err((_, stored))) = changed;
        let cluster = stored.cluster.name.as_str();
        for p in remaining {
            match report.outcomes.get(p) {
                Some(SubmitOutcome::Submitted(_)) => self.metrics.submission(cluster, "submitted"),
                Some(SubmitOutcome::Refused { message, .. }) => {
                    let (outcome, kind) = match classify(sched, message) {
                        FailureKind::Permanent => ("refused", "permanent"),
                        FailureKind::Transient => ("blocked", "transient"),
                    };
                    self.metrics.submission(cluster, outcome);
                    self.metrics.scheduler_error(kind);
                }
                _ => {}
            }
        }
        if stored.phases.iter().any(|p| p.state == PhaseState::Blocked) {
            self.clusters.failed(cluster);
        }
        if stored.cancel_requested {
            // A cancel arrived while jobs were being submitted: stop them too.
            self.cancel_jobs(&stored).await;
        }
        Ok(())
    }

    /// Marks `phases` blocked with `why`; retried after a backoff.
    async fn block(&self, id: &TaskId, phases: &[Phase], why: &str) -> Result<(), StoreError> {
        self.update_task(id, |t| {
            let at = now();
            transitions::block(t, phases, why, retry_at(at, t.submit_tries.max(1)), at);
        })
        .await
        .map(|_| ())
    }

    /// Marks `phases` blocked with `why` until `until`.
    async fn block_until(
        &self,
        id: &TaskId,
        phases: &[Phase],
        why: &str,
        until: OffsetDateTime,
    ) -> Result<(), StoreError> {
        self.update_task(id, |t| transitions::block(t, phases, why, until, now())).await.map(|_| ())
    }

    /// Leaves the phases as they are (`submitting`) and tries again after a backoff.
    async fn retry_later(&self, id: &TaskId, why: &str) -> Result<(), StoreError> {
        self.update_task(id, |t| {
            let at = now();
            transitions::retry_later(t, why, retry_at(at, t.submit_tries), at);
        })
        .await
        .map(|_| ())
    }

    /// Fails `phases` for good with an explanation.
    async fn fail(&self, id: &TaskId, phases: &[Phase], explanation: &str) -> Result<(), StoreError> {
        self.update_task(id, |t| transitions::fail(t, phases, explanation, None, now())).await.map(|_| ())
    }
}

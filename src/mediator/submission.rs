//! One submission attempt, at most once: the intent is stored before anything reaches
//! the scheduler; an attempt that may have reached it before looks its jobs up by tag
//! first; what happened is recorded on a fresh copy of the task. The decisions are
//! [`super::transitions`]; this file does the I/O around them.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use time::OffsetDateTime;

use super::claims::{Held, Then};
use super::clusters::Exec;
use super::remote::RemoteError;
use super::transitions::{self, Refused};
use super::{Mediator, now, tags};
use crate::forge::{CompiledCluster, ForgeError, ForgedScript};
use crate::model::{Phase, PhaseState, Task, TaskId};
use crate::scheduler::failures::{FailureKind, classify, retry_at};
use crate::scheduler::{self, PhaseSubmission, Scheduler, SubmitOutcome, SubmitPlan, SubmitReport, common};
use crate::store::StoreError;

/// What the first attempt of a task just created needs, handed over from its creation:
/// the task as stored (with its intent), its forged scripts and its cluster.
pub(crate) struct Created {
    task: Task,
    scripts: Vec<ForgedScript>,
    cluster: Arc<CompiledCluster>,
}

/// What one submission round trip came back with: jobs found again by tag, the phases
/// submitted now, and the scheduler's report on them.
struct Round<'a> {
    found: &'a BTreeMap<Phase, String>,
    remaining: &'a [Phase],
    report: &'a SubmitReport,
}

impl Mediator {
    /// Queues the first submission attempt of `task`, just stored with its intent.
    pub(crate) fn hand_over(&self, task: &Task, scripts: Vec<ForgedScript>, cluster: Arc<CompiledCluster>) {
        let created = Created { task: crate::store::tasks::state_of(task), scripts, cluster };
        let _ = self.queue.send(super::Due { id: task.id, created: Some(Box::new(created)) });
    }

    /// One submission attempt for task `id`; see the module docs. A task just created
    /// comes with what it needs (`created`), and with its claim.
    pub(crate) async fn submit(&self, id: TaskId, created: Option<Box<Created>>) -> Result<(), StoreError> {
        if let Some(c) = created {
            let held = Held::new(c.task.claim.as_ref().map_or(0, |c| c.fence));
            match self.first_attempt(*c, &held).await {
                // Not done: the claim is kept, and the ordinary attempt renews it.
                Ok(false) => {}
                done => {
                    self.end_attempt(&id, &held).await;
                    return done.map(|_| ());
                }
            }
        }
        let Some(task) = self.store.task_state(&id).await? else { return Ok(()) };
        let todo = transitions::due_phases(&task);
        if todo.is_empty() || task.state.is_final() {
            return Ok(());
        }
        if !task.cancel_requested && task.retry_at.is_some_and(|t| t > OffsetDateTime::now_utc()) {
            return Ok(()); // the monitor queues it again when the time comes
        }
        // Nothing touches the cluster before this server holds the task's claim.
        let Some((task, held)) = self.claim_submission(task).await? else { return Ok(()) };
        let result = self.attempt(task, &held).await;
        self.end_attempt(&id, &held).await;
        result
    }

    /// The ordinary attempt, under the claim `held`.
    async fn attempt(&self, task: Task, held: &Held) -> Result<(), StoreError> {
        let id = task.id;
        let todo = transitions::due_phases(&task);
        if todo.is_empty() || task.state.is_final() {
            return Ok(());
        }
        let phases: Vec<Phase> = todo.iter().map(|(p, _)| *p).collect();
        // After a cancel, only phases an unfinished attempt left `submitting` remain:
        // their jobs may exist, and are found (to be stopped) before anything is said.
        let cancelling = task.cancel_requested;
        let cluster = match self.forge.cluster(self.store.as_ref(), &task.cluster.name).await {
            Ok(c) => c,
            Err(ForgeError::NotFound { message, .. }) => return self.fail(&id, held, &phases, &message).await,
            Err(e) => return self.block(&id, held, &phases, &format!("cluster definition unavailable: {e}")).await,
        };
        let sched = match scheduler::for_cluster(&cluster.spec) {
            Ok(s) => s,
            Err(m) => return self.fail(&id, held, &phases, &m).await,
        };
        let name = cluster.name.as_str();
        if let Some(until) = self.clusters.paused_until(name) {
            let why = format!("cluster `{name}` is paused after repeated failures");
            return self.block_until(&id, held, &phases, &why, until).await;
        }
        let exec = match self.clusters.exec_for(&cluster.spec, &task.owner).await {
            Ok(e) => e,
            Err(RemoteError::Refused(m)) => return self.fail(&id, held, &phases, &m).await,
            Err(e) => return self.block(&id, held, &phases, &e.to_string()).await,
        };
        if cancelling {
            return self.settle_cancelled(&task, held, &phases, sched.as_ref(), &exec, name).await;
        }

        // 1. Intent: stored before anything reaches the scheduler, and only if the
        //    phases are still where this attempt saw them.
        let maybe_submitted = task.submit_tries > 0 || todo.iter().any(|(_, state)| *state != PhaseState::Waiting);
        let task = match self
            .change_held(&id, Some(task), held, Then::Keep, |t| transitions::intent(t, &todo, now()))
            .await?
        {
            Ok(t) => t,
            Err((Refused(why), _)) => {
                tracing::info!(task = %id, why, "submission not started");
                return Ok(());
            }
        };

        // Phases whose waits the intent found already settled, and unmet, will not run.
        let phases: Vec<Phase> =
            phases.into_iter().filter(|p| task.phase(*p).state == PhaseState::Submitting).collect();
        if phases.is_empty() {
            return Ok(());
        }

        // 2. An earlier attempt may have reached the scheduler: find its jobs first.
        let mut found = BTreeMap::new();
        if maybe_submitted {
            match self.find_jobs(&task, held, &phases, sched.as_ref(), &exec).await {
                Ok(Ok(f)) => found = f,
                Ok(Err(seen)) => return self.fenced_out(&id, held, &phases, seen).await,
                Err(RemoteError::Refused(m)) => return self.fail(&id, held, &phases, &m).await,
                Err(e) => {
                    self.clusters.failed(name);
                    return self.block(&id, held, &phases, &format!("cannot check for earlier submissions: {e}")).await;
                }
            }
        }
        // In the order they are submitted: each after the phases it waits for.
        let remaining: Vec<Phase> =
            task.graph().run_order().into_iter().filter(|p| phases.contains(p) && !found.contains_key(p)).collect();

        // 3. Submit what is missing, in one round trip.
        let mut report = SubmitReport::default();
        if !remaining.is_empty() {
            let plan = match self.plan(&task, &remaining, &found).await? {
                Ok(plan) => plan,
                Err(why) => return self.fail(&id, held, &phases, &why).await,
            };
            let script = match common::prelude(&plan) {
                Ok(p) => common::fenced(&task.run_dir, &id, held.fence, &(p + &sched.submit_commands(&plan))),
                Err(m) => return self.fail(&id, held, &phases, &m).await,
            };
            self.failpoint_slow_submit().await;
            // A cancel that landed since the intent stops the attempt here; so does a
            // claim taken over meanwhile.
            let mut go = true;
            let checked = self
                .change_held(&id, None, held, Then::Keep, |t| {
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
                    self.record_submission(&id, held, &found, &[], &report, sched.as_ref()).await?;
                }
                return Ok(());
            }
            self.failpoint_stall().await;
            let started = std::time::Instant::now();
            self.metrics.cluster_script("submit");
            let ran = self.holding(&id, held, self.clusters.run(&exec, &script, self.cfg.submit_timeout)).await;
            self.metrics.submit_latency(started.elapsed());
            match ran {
                Ok(out) if let Some(seen) = common::parse_fenced(&out.body) => {
                    return self.fenced_out(&id, held, &remaining, seen).await;
                }
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
                Err(RemoteError::Refused(m)) => return self.fail(&id, held, &remaining, &m).await,
                Err(e @ RemoteError::Unreachable(_)) => {
                    self.metrics.scheduler_error("unreachable");
                    self.clusters.failed(name);
                    return self.block(&id, held, &remaining, &e.to_string()).await;
                }
                Err(e) => {
                    // The script may have run: the phases stay `submitting`, and the next
                    // attempt finds what it did by tag before submitting anything.
                    self.metrics.scheduler_error("ambiguous");
                    self.clusters.failed(name);
                    let why = format!("the submission's outcome is unknown ({e}); checking again");
                    return self.retry_later(&id, held, &why).await;
                }
            }
        }
        self.clusters.ok(name);
        self.record_submission(&id, held, &found, &remaining, &report, sched.as_ref()).await
    }

    /// Test hook `slow-submit`: for the shutdown and cancel tests, a submission that is
    /// surely under way when the server is told to stop, or the user cancels.
    async fn failpoint_slow_submit(&self) {
        if self.cfg.failpoint.as_deref() == Some("slow-submit") {
            tokio::time::sleep(Duration::from_secs(3)).await;
        }
    }

    /// Test hook `stall-before-submit`: 4 s between the last store check and the
    /// submission round trip, for the paused-owner test (a server stopped there past
    /// its claim must be refused by the cluster's fence when it resumes).
    async fn failpoint_stall(&self) {
        if self.cfg.failpoint.as_deref() == Some("stall-before-submit") {
            tracing::info!("failpoint stall-before-submit: 4 s before the submission round trip");
            tokio::time::sleep(Duration::from_secs(4)).await;
        }
    }

    /// A script was refused by the cluster's fence: the run directory saw fence `seen`,
    /// higher than this attempt's. Normally another replica took the task over, and
    /// this attempt just stops; if the store knows no such claim, the fence file was
    /// changed outside hpcforge and `phases` fail with a plain explanation.
    async fn fenced_out(&self, id: &TaskId, held: &Held, phases: &[Phase], seen: u64) -> Result<(), StoreError> {
        let task = self.store.task_state(id).await?;
        let newer =
            task.as_ref().and_then(|t| t.claim.as_ref()).is_some_and(|c| c.fence >= seen && c.fence > held.fence);
        if newer {
            tracing::info!(task = %id, fence = held.fence, seen, "fenced out: another replica took this submission over; nothing submitted");
            return Ok(());
        }
        let why = format!(
            "the run directory's fence file (.hpcforge/fence-{id}) says {seen}, ahead of this submission's claim \
             {}: it was changed outside hpcforge; nothing was submitted",
            held.fence
        );
        self.fail(id, held, phases, &why).await
    }

    /// The first attempt of a task just created, from what its creation handed over:
    /// one read (is the task still as it was stored? it may have been cancelled) before
    /// the scheduler is asked, one write after. `false` if the task changed since, so
    /// that the ordinary attempt decides on what it is now.
    async fn first_attempt(&self, c: Created, held: &Held) -> Result<bool, StoreError> {
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
            phases: transitions::submission_waits(&task, &phases)
                .into_iter()
                .filter_map(|(p, after)| {
                    let script = scripts.iter().find(|s| s.phase == p)?;
                    let array = array_of(&task, p);
                    Some(PhaseSubmission { phase: p, script: script.text.clone(), tag: tags[&p].clone(), after, array })
                })
                .collect(),
            known: BTreeMap::new(),
            frame_totals: frame_totals(&task),
        };
        // A new task submits every phase at once; anything else is the ordinary attempt's.
        if phases.len() != task.phases.len() || plan.phases.len() != phases.len() {
            return Ok(false);
        }
        let phases: Vec<Phase> = plan.phases.iter().map(|p| p.phase).collect();
        let script = match common::prelude(&plan) {
            Ok(p) => common::fenced(&task.run_dir, &id, held.fence, &(p + &sched.submit_commands(&plan))),
            Err(_) => return Ok(false),
        };
        self.failpoint_slow_submit().await;
        // Still as it was stored? A cancel stops the attempt here.
        let mut go = true;
        let checked = self
            .change_held(&id, None, held, Then::Keep, |t| {
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
        self.failpoint_stall().await;
        let started = std::time::Instant::now();
        self.metrics.cluster_script("submit");
        let ran = self.holding(&id, held, self.clusters.run(&exec, &script, self.cfg.submit_timeout)).await;
        self.metrics.submit_latency(started.elapsed());
        match ran {
            Ok(out) if let Some(seen) = common::parse_fenced(&out.body) => {
                self.fenced_out(&id, held, &phases, seen).await?;
                return Ok(true);
            }
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
                self.fail(&id, held, &phases, &m).await?;
                return Ok(true);
            }
            Err(e @ RemoteError::Unreachable(_)) => {
                self.metrics.scheduler_error("unreachable");
                self.clusters.failed(name);
                self.block(&id, held, &phases, &e.to_string()).await?;
                return Ok(true);
            }
            Err(e) => {
                self.metrics.scheduler_error("ambiguous");
                self.clusters.failed(name);
                self.retry_later(&id, held, &format!("the submission's outcome is unknown ({e}); checking again"))
                    .await?;
                return Ok(true);
            }
        }
        self.clusters.ok(name);
        let round = Round { found: &BTreeMap::new(), remaining: &phases, report: &report };
        self.record_from(Some(fresh), &id, held, round, sched.as_ref()).await?;
        Ok(true)
    }

    /// The jobs of `phases` that an earlier attempt submitted: by tag in the queue, or
    /// by the start marker each job writes. Jobs of earlier runs (before a restart)
    /// carry the same tag and may have left markers: only a job this run has not seen
    /// before counts.
    ///
    /// The look-up is fenced ([`common::fenced`]): it waits for a submission under way
    /// in the run directory, and shuts out owners older than `held`. The inner error is
    /// the newer fence it was refused for.
    async fn find_jobs(
        &self,
        task: &Task,
        held: &Held,
        phases: &[Phase],
        sched: &dyn Scheduler,
        exec: &Exec,
    ) -> Result<Result<BTreeMap<Phase, String>, u64>, RemoteError> {
        let tags = tags(&task.id, phases);
        let script =
            common::fenced(&task.run_dir, &task.id, held.fence, &sched.find_script(&task.owner, &task.run_dir, &tags));
        self.metrics.cluster_script("find");
        let out = self.holding(&task.id, held, self.clusters.run(exec, &script, self.cfg.query_timeout)).await?;
        if let Some(seen) = common::parse_fenced(&out.body) {
            return Ok(Err(seen));
        }
        let mut found = BTreeMap::new();
        for (phase, candidates) in sched.parse_find(&out.body, &tags) {
            let earlier: Vec<&str> = task.phase(phase).previous.iter().filter_map(|r| r.job_id.as_deref()).collect();
            if let Some(job) = candidates.into_iter().find(|j| !earlier.contains(&j.as_str())) {
                found.insert(phase, job);
            }
        }
        Ok(Ok(found))
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
        let tags = tags(&task.id, remaining);
        let mut phases = Vec::new();
        // Each after what it waits for; waits on phases that have ended are settled.
        for (p, after) in transitions::submission_waits(task, remaining) {
            let Some(script) = self.store.read_task_script(&task.id, p, Some(task.script_version_of(p))).await? else {
                return Ok(Err(format!("the forged {p} script of task {} is missing from the store", task.id)));
            };
            let array = array_of(task, p);
            phases.push(PhaseSubmission { phase: p, script: script.text, tag: tags[&p].clone(), after, array });
        }
        // Inputs are staged with the phases that wait for nothing (the first
        // submission, or a restart from the start).
        let stage_now = phases.iter().any(|p| task.waits_of(p.phase).is_empty());
        Ok(Ok(SubmitPlan {
            run_dir: task.run_dir.clone(),
            stage: if stage_now { task.staged.clone() } else { Vec::new() },
            phases,
            known,
            frame_totals: frame_totals(task),
        }))
    }

    /// A cancelled task whose `phases` an unfinished attempt left `submitting`: the
    /// jobs found by tag are recorded (and stopped), the rest are cancelled.
    async fn settle_cancelled(
        &self,
        task: &Task,
        held: &Held,
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
        let found = match self.find_jobs(task, held, &submitting, sched, exec).await {
            Ok(Ok(f)) => f,
            Ok(Err(seen)) => return self.fenced_out(&task.id, held, &submitting, seen).await,
            Err(e) => {
                self.clusters.failed(cluster);
                let why = format!("cancelling: cannot check for jobs already submitted ({e}); checking again");
                return self.retry_later(&task.id, held, &why).await;
            }
        };
        self.clusters.ok(cluster);
        let settled = self
            .change_held(&task.id, None, held, Then::Release, |t| {
                transitions::settle_cancelled(t, &found, now());
                Ok(())
            })
            .await?;
        if let Ok(stored) = settled {
            self.cancel_jobs(&stored).await;
        }
        Ok(())
    }

    /// Records what a submission did, on a fresh copy of the task.
    async fn record_submission(
        &self,
        id: &TaskId,
        held: &Held,
        found: &BTreeMap<Phase, String>,
        remaining: &[Phase],
        report: &SubmitReport,
        sched: &dyn Scheduler,
    ) -> Result<(), StoreError> {
        self.record_from(None, id, held, Round { found, remaining, report }, sched).await
    }

    /// [`Self::record_submission`], trying first on `known` (a state just read).
    async fn record_from(
        &self,
        known: Option<Task>,
        id: &TaskId,
        held: &Held,
        round: Round<'_>,
        sched: &dyn Scheduler,
    ) -> Result<(), StoreError> {
        let Round { found, remaining, report } = round;
        let changed = self
            .change_held(id, known, held, Then::Release, |t| {
                let at = now();
                let retry = retry_at(at, t.submit_tries);
                transitions::apply_submission(t, found, remaining, report, sched, at, retry);
                Ok(())
            })
            .await?;
        // Not this server's to record any more: the new owner finds the jobs by tag.
        let Ok(stored) = changed else { return Ok(()) };
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
    async fn block(&self, id: &TaskId, held: &Held, phases: &[Phase], why: &str) -> Result<(), StoreError> {
        self.finish_held(id, held, |t| {
            let at = now();
            transitions::block(t, phases, why, retry_at(at, t.submit_tries.max(1)), at);
        })
        .await
    }

    /// Marks `phases` blocked with `why` until `until`.
    async fn block_until(
        &self,
        id: &TaskId,
        held: &Held,
        phases: &[Phase],
        why: &str,
        until: OffsetDateTime,
    ) -> Result<(), StoreError> {
        self.finish_held(id, held, |t| transitions::block(t, phases, why, until, now())).await
    }

    /// Leaves the phases as they are (`submitting`) and tries again after a backoff.
    async fn retry_later(&self, id: &TaskId, held: &Held, why: &str) -> Result<(), StoreError> {
        self.finish_held(id, held, |t| {
            let at = now();
            transitions::retry_later(t, why, retry_at(at, t.submit_tries), at);
        })
        .await
    }

    /// Fails `phases` for good with an explanation.
    async fn fail(&self, id: &TaskId, held: &Held, phases: &[Phase], explanation: &str) -> Result<(), StoreError> {
        self.finish_held(id, held, |t| transitions::fail(t, phases, explanation, None, now())).await
    }
}

/// The job array a phase becomes, if it runs per frame.
fn array_of(task: &Task, phase: Phase) -> Option<scheduler::ArraySpec> {
    task.phase(phase).frames.as_ref().map(|f| scheduler::ArraySpec {
        elements: f.elements(),
        max_parallel: f.max_parallel,
        frames: f.running().to_owned(),
        whole: f.selection.is_none(),
    })
}

/// How many frames each phase of `task` that runs per frame has.
fn frame_totals(task: &Task) -> BTreeMap<Phase, u32> {
    task.phases.iter().filter_map(|p| p.frames.as_ref().map(|f| (p.phase, f.total))).collect()
}

//! Task control: what the API asks the mediator for — create a task (validate, forge,
//! record, queue), show it, wait for its job IDs, cancel it, restart it, and read a
//! phase job's output on the cluster, and the data its jobs posted.
//!
//! Why this file is long: one method per operation the API offers on a task, each
//! with its access check; splitting them would scatter one resource's operations.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use super::remote::RemoteError;
use super::transitions;
use super::{Access, MAX_TAIL_BYTES, Mediator, MediatorError, OutputTail, named_in_body, now, problem};
use crate::forge::TaskBody;
use crate::model::{DefinitionRef, Phase, PhaseState, Task, TaskId};
use crate::scheduler::{self, JobQuery, common};

impl Mediator {
    /// Validates and forges `body` for `owner`, records the task and its scripts, and
    /// queues it for submission.
    pub async fn create_task(&self, body: &TaskBody, access: &Access) -> Result<Task, MediatorError> {
        self.create(body, access).await
    }

    /// As [`Self::create_task`], then waits (at most `limit`) until every phase has a
    /// job ID, or the task is blocked or has ended; returns the task as it then is.
    pub async fn create_task_and_wait(
        &self,
        body: &TaskBody,
        access: &Access,
        limit: Duration,
    ) -> Result<Task, MediatorError> {
        // Subscribed before the task exists, so no news of it can be missed.
        let rx = self.updates.subscribe();
        let task = self.create(body, access).await?;
        self.wait_on(task, rx, limit).await
    }

    async fn create(&self, body: &TaskBody, access: &Access) -> Result<Task, MediatorError> {
        let owner = &access.user;
        let cluster = self.forge.cluster(self.store.as_ref(), &body.cluster).await.map_err(named_in_body)?;
        scheduler::for_cluster(&cluster.spec)
            .map_err(|m| MediatorError::Invalid(problem("/cluster", "scheduler", &m)))?;
        // On a cluster with workspaces the run directory is in the user's workspace
        // (found or allocated first); elsewhere under the base, which may need the
        // user's home.
        let workspace = match &cluster.spec.workspace {
            Some(_) => Some(self.look_at_workspace(&cluster.spec, owner).await?),
            None => None,
        };
        let home = self.home_for_run_dir(&cluster.spec, owner).await?;
        let task_id = TaskId::new();
        let req = crate::forge::ForgeRequest {
            task_id,
            user: owner,
            home: &home,
            workspace: workspace.as_ref().map(|w| w.path.as_str()),
        };
        let (app, inputs, forged) =
            self.forge.forge_task_on(self.store.as_ref(), body, &cluster, &req).await.map_err(named_in_body)?;
        let workspace = match workspace {
            // Long enough for the task's wall time: extended if it must be, else refused.
            Some(ws) => Some(
                self.ready_workspace(&cluster.spec, owner, ws, super::workspaces::wall_time_of(&app, &cluster.spec))
                    .await?,
            ),
            None => None,
        };
        let at = now();
        let mut task = Task::new(
            owner.clone(),
            forged.application.clone(),
            DefinitionRef { name: forged.cluster.name.clone(), version: forged.cluster.version },
            inputs.to_portal(&app.spec),
            &app.graph,
            at,
        );
        task.id = task_id;
        task.run_dir = forged.run_dir.clone();
        task.rules = app.spec.rules.clone();
        task.outputs = app.spec.outputs.clone();
        task.archive = app.spec.archive.as_ref().map(crate::model::archive::Archive::waiting);
        task.staged = inputs.staged();
        for s in &forged.scripts {
            task.phase_mut(s.phase).script_sha256 = Some(s.sha256.clone());
        }
        for d in &app.spec.phases {
            let Some((range, per_job)) = crate::forge::render::frames_of(&app, &inputs, d.name) else { continue };
            let total = crate::model::frames::FrameRange::parse(&range, crate::model::frames::MAX_FRAMES)
                .map(|r| r.count() as u32)
                .unwrap_or(0);
            task.phase_mut(d.name).frames = Some(crate::model::task::FrameProgress {
                range,
                total,
                per_job,
                max_parallel: d.max_parallel,
                selection: None,
                completed: 0,
                failed: 0,
                failures: Vec::new(),
            });
        }
        task.scripts_version = 1;
        task.priority = check_priority(body.priority, access)?;
        task.needs = self.needs_of(&app, &cluster, owner).await?;
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
        for note in &inputs.notes {
            task.record(at, None, note.clone());
        }
        if let Some(seen) = workspace {
            for note in &seen.notes {
                task.record(at, None, note.clone());
            }
            task.workspace = Some(seen.workspace);
        }
        // A task that needs licences or its owner's share of the cluster is stored
        // queued: nothing is claimed or submitted before the queue grants it.
        let queued = super::queue::queue_new_task(&mut task, at);
        if !queued {
            // The task is stored with its intent: its phases are `submitting` before
            // anything reaches the scheduler, so an attempt cut short by a crash is
            // found again by tag.
            // It is stored claimed by this server (the first claim, fence 1): no other
            // replica touches it while this one's first attempt is under way.
            task.claim = Some(crate::model::task::SubmitClaim {
                holder: self.instance.clone(),
                fence: 1,
                expires_at: super::claims::claim_until(at),
            });
            let todo = transitions::due_phases(&task);
            transitions::intent(&mut task, &todo, at).expect("a new task is neither cancelled nor ended");
        }
        self.store.create_task(&task, &forged).await?;
        tracing::info!(task = %task.id, owner = %owner, by = access.by, application = %task.application.name, cluster = %task.cluster.name, queued, "task created");
        self.announce(&task, &task.events);
        if !queued {
            self.hand_over(&task, forged.scripts, cluster);
        }
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

    /// As [`Self::task_for`], the task's state only (no inputs, only its newest event).
    pub async fn task_state_for(&self, id: &TaskId, who: &Access) -> Result<Task, MediatorError> {
        match self.store.task_state(id).await? {
            Some(t) if who.may_see(&t) => Ok(t),
            _ => Err(MediatorError::NotFound(format!("there is no task {id}"))),
        }
    }

    /// The events of `id` after `after`, if `who` may see the task.
    pub async fn events_for(
        &self,
        id: &TaskId,
        who: &Access,
        after: u64,
    ) -> Result<Vec<crate::model::TaskEvent>, MediatorError> {
        self.task_state_for(id, who).await?;
        Ok(self.store.task_events(id, after).await?)
    }

    /// The data the jobs of task `id` posted: key → newest value.
    pub async fn data_for(
        &self,
        id: &TaskId,
        who: &Access,
    ) -> Result<std::collections::BTreeMap<String, crate::model::posts::DataPoint>, MediatorError> {
        Ok(crate::model::posts::data_map(&self.events_for(id, who, 0).await?))
    }

    /// Every value of `key` the jobs of task `id` posted, oldest first; not found if
    /// they never posted it.
    pub async fn data_history_for(
        &self,
        id: &TaskId,
        who: &Access,
        key: &str,
    ) -> Result<Vec<crate::model::posts::DataPoint>, MediatorError> {
        let points = crate::model::posts::data_history(&self.events_for(id, who, 0).await?, key);
        if points.is_empty() {
            return Err(MediatorError::NotFound(format!("the jobs of task {id} posted no value of `{key}`")));
        }
        Ok(points)
    }

    /// Waits until every phase of `id` has a job ID, or the task is blocked or has
    /// ended, or `limit` passes; returns the task as it then is.
    pub async fn wait_submitted(&self, id: &TaskId, limit: Duration) -> Result<Task, MediatorError> {
        let rx = self.updates.subscribe();
        let t = self
            .store
            .task_state(id)
            .await?
            .ok_or_else(|| MediatorError::NotFound(format!("there is no task {id}")))?;
        self.wait_on(t, rx, limit).await
    }

    /// Follows `rx` from `t` until it settles. When `t` is the whole task (just
    /// created) and every change since came as news, the answer is assembled from them;
    /// otherwise the whole task is read once at the end.
    async fn wait_on(
        &self,
        mut t: Task,
        mut rx: tokio::sync::broadcast::Receiver<super::TaskNews>,
        limit: Duration,
    ) -> Result<Task, MediatorError> {
        let id = t.id;
        // Whether `t` is whole: its inputs and every event, assembled change by change.
        let mut whole = t.events.first().is_some_and(|e| e.seq == 1);
        let deadline = tokio::time::Instant::now() + limit;
        let settled = |t: &Task| {
            t.phases.iter().all(|p| !matches!(p.state, PhaseState::Waiting | PhaseState::Submitting))
                || t.state.is_final()
                || (t.state == crate::model::TaskState::Queued
                    && t.queue.as_ref().is_some_and(|q| q.waiting_for.is_some()))
        };
        while !settled(&t) && tokio::time::Instant::now() < deadline {
            // A missed change (a lagging receiver) or a quiet half second means a look
            // at the store (another server may act).
            let next = tokio::time::timeout_at(
                deadline.min(tokio::time::Instant::now() + Duration::from_millis(500)),
                async {
                    loop {
                        match rx.recv().await {
                            Ok(news) if news.id == id => return Some(news),
                            Ok(_) => continue,
                            Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => return None,
                            Err(tokio::sync::broadcast::error::RecvError::Closed) => std::future::pending().await,
                        }
                    }
                },
            )
            .await;
            match next {
                Ok(Some(news)) if news.task.revision <= t.revision => {}
                Ok(Some(news)) => {
                    // A revision skipped is a change whose events were not heard.
                    whole &= news.task.revision == t.revision + 1 && news.events.is_some();
                    let events = if whole && let Some(new) = &news.events {
                        let mut all = std::mem::take(&mut t.events);
                        all.extend(new.iter().cloned());
                        all
                    } else {
                        news.task.events.clone()
                    };
                    t = Task { inputs: std::mem::take(&mut t.inputs), events, ..(*news.task).clone() };
                }
                _ => {
                    whole = false;
                    if let Some(fresh) = self.store.task_state(&id).await? {
                        t = fresh;
                    }
                }
            }
        }
        if whole {
            return Ok(t);
        }
        Ok(self.store.get_task(&id).await?.unwrap_or(t))
    }

    /// Asks to cancel `id`: phases never handed to the scheduler are cancelled at
    /// once, live jobs are cancelled on the cluster (the monitor confirms and retries),
    /// and a submission under way stops before the scheduler is asked, or has its jobs
    /// stopped once they are known.
    pub async fn cancel(&self, id: &TaskId, who: &Access) -> Result<Task, MediatorError> {
        self.task_state_for(id, who).await?;
        let by = who.by.clone();
        let t = match self.change_task(id, |t| transitions::request_cancel(t, &by, now())).await? {
            Ok(t) => t,
            Err((refused, _)) => return Err(MediatorError::Conflict(refused.0)),
        };
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
                p.job_id.clone().map(|job_id| JobQuery {
                    job_id,
                    run_dir: t.run_dir.clone(),
                    phase: p.phase,
                    frames: p.frames.is_some(),
                })
            })
            .collect();
        if jobs.is_empty() {
            return;
        }
        let result = async {
            let cluster = self.forge.cluster(self.store.as_ref(), &t.cluster.name).await.map_err(|e| e.to_string())?;
            let sched = scheduler::for_cluster(&cluster.spec)?;
            let exec = self.clusters.exec_for(&cluster.spec, &t.owner).await.map_err(|e| e.to_string())?;
            self.clusters
                .run(&exec, &sched.cancel_script(&jobs), self.cfg.query_timeout)
                .await
                .map_err(|e| e.to_string())
        }
        .await;
        if let Err(e) = result {
            tracing::warn!(task = %t.id, error = e, "cancel did not reach the cluster; the monitor retries");
        }
    }

    /// The last `lines` lines (at most [`MAX_TAIL_BYTES`]) of a phase job's standard
    /// output or error, read on the cluster as the task's owner; with `frame` (a
    /// phase that runs per frame), that frame's own.
    pub async fn output_tail(
        &self,
        task: &Task,
        phase: Phase,
        stderr: bool,
        lines: usize,
        frame: Option<u32>,
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
        let sched = scheduler::for_cluster(&cluster.spec).map_err(MediatorError::Unavailable)?;
        let path = match frame {
            None => sched.output_file(&task.run_dir, phase, &job_id, stderr),
            Some(f) => {
                let range = rec.frames.as_ref().map(|p| p.range.as_str()).ok_or_else(|| {
                    invalid_frame(format!("`{phase}` does not run per frame, so it has no frame {f}"))
                })?;
                if !crate::model::frames::FrameRange::parse(range, u64::MAX).is_ok_and(|r| r.contains(f)) {
                    return Err(invalid_frame(format!("frame {f} is not one of the frames of `{phase}` ({range})")));
                }
                format!("{}/{}/{f}", task.run_dir, crate::model::rules::frame_output_dir(phase, stderr))
            }
        };
        let exec = self.owner_exec(task).await?;
        let out = self
            .clusters
            .run(&exec, &common::tail_script(&path, lines, MAX_TAIL_BYTES), self.cfg.query_timeout)
            .await
            .map_err(|e| MediatorError::Unavailable(format!("cluster `{}` did not answer: {e}", cluster.name)))?;
        let Some((size, bytes)) = common::parse_tail(&out.body) else {
            let whose = frame.map_or_else(|| format!("job {job_id} ({phase})"), |f| format!("frame {f} of {phase}"));
            return Err(MediatorError::NotFound(format!(
                "{whose} has no {stream} at {path} yet{}",
                if rec.state.is_final() { " (it may have been removed)" } else { "" }
            )));
        };
        let returned = bytes.len() as u64;
        Ok(OutputTail {
            phase,
            stream: stream.to_owned(),
            job_id,
            frame,
            path,
            size,
            truncated: returned < size,
            text: String::from_utf8_lossy(&bytes).into_owned(),
        })
    }

    /// One page of `phase`'s frames (of `task`), read from their records on the
    /// cluster as the task's owner: `limit` frames from `offset` of the whole range,
    /// or of the frames in `state` (`failed`, `completed`) only.
    pub async fn frame_page(
        &self,
        task: &Task,
        phase: Phase,
        state: Option<&str>,
        offset: u32,
        limit: u32,
    ) -> Result<crate::mediator::FramePage, MediatorError> {
        use crate::mediator::{FrameDetail, FramePage};
        let rec = task.phase(phase);
        let Some(f) = rec.frames.as_ref() else {
            return Err(MediatorError::NotFound(format!(
                "the {phase} phase of task {} does not run per frame",
                task.id
            )));
        };
        let range = crate::model::frames::FrameRange::parse(&f.range, crate::model::frames::MAX_FRAMES)
            .map_err(MediatorError::Unavailable)?;
        let which = match state {
            None => common::FrameRecords::Of(range.frames().skip(offset as usize).take(limit as usize).collect()),
            Some("failed") => common::FrameRecords::Failed,
            Some("completed") => common::FrameRecords::Succeeded,
            Some(other) => {
                return Err(MediatorError::Invalid(
                    crate::model::Problem::new(
                        "/state",
                        format!(
                            "`{}` is not a state frames are listed by; use failed or completed",
                            other.escape_debug()
                        ),
                    )
                    .into(),
                ));
            }
        };
        let records = if rec.job_id.is_none() && !rec.state.is_final() {
            Vec::new() // nothing has run yet
        } else {
            let cluster = self.forge.cluster(self.store.as_ref(), &task.cluster.name).await?;
            let exec = self.clusters.exec_for(&cluster.spec, &task.owner).await.map_err(|e| match e {
                RemoteError::Refused(m) => MediatorError::Conflict(m),
                other => MediatorError::Unavailable(format!("cluster `{}` cannot be reached: {other}", cluster.name)),
            })?;
            let script = common::frame_page_script(&task.run_dir, phase, &which);
            let out =
                self.clusters.run(&exec, &script, self.cfg.query_timeout).await.map_err(|e| {
                    MediatorError::Unavailable(format!("cluster `{}` did not answer: {e}", cluster.name))
                })?;
            common::parse_frame_page(&out.body).map_err(|why| {
                MediatorError::Unavailable(format!("the frames of task {} could not be read: {why}", task.id))
            })?
        };
        let detail = |r: &common::FrameRecord| FrameDetail {
            frame: r.frame,
            state: if r.exit_code == 0 { "completed" } else { "failed" }.to_owned(),
            exit_code: Some(r.exit_code),
            started_at: (!r.started.is_empty()).then(|| format!("{}Z", r.started)),
            ended_at: (!r.ended.is_empty()).then(|| format!("{}Z", r.ended)),
            job: (!r.job.is_empty()).then(|| format!("{}_{}", r.job, r.element)),
            node: r.node.clone(),
            cpu_seconds: r.cpu_seconds,
            cpu_efficiency: r.cpu_seconds.and_then(|cpu| {
                let elapsed =
                    (common::parse_slurm_time(&r.ended)? - common::parse_slurm_time(&r.started)?).as_seconds_f64();
                // Stamps are to the second: a frame shorter than two says little.
                (elapsed >= 2.0).then(|| crate::model::usage::round3(cpu / elapsed))
            }),
        };
        let (matched, frames) = match which {
            common::FrameRecords::Of(page) => {
                let by_frame: BTreeMap<u32, &common::FrameRecord> = records.iter().map(|r| (r.frame, r)).collect();
                let unrecorded = if rec.state.is_final() { "not_run" } else { "waiting" };
                let frames = page
                    .iter()
                    .map(|n| match by_frame.get(n) {
                        Some(r) => detail(r),
                        None => FrameDetail {
                            frame: *n,
                            state: unrecorded.to_owned(),
                            exit_code: None,
                            started_at: None,
                            ended_at: None,
                            job: None,
                            node: None,
                            cpu_seconds: None,
                            cpu_efficiency: None,
                        },
                    })
                    .collect();
                (f.total, frames)
            }
            _ => {
                let matched = records.len() as u32;
                (matched, records.iter().skip(offset as usize).take(limit as usize).map(detail).collect())
            }
        };
        let end = offset.saturating_add(limit);
        Ok(FramePage {
            phase,
            range: f.range.clone(),
            total: f.total,
            state: state.map(str::to_owned),
            matched,
            offset,
            frames,
            next_offset: (end < matched).then_some(end),
        })
    }

    /// Runs phases again, keeping their history: from `from` (that phase and all that
    /// wait for it), or without it every phase that did not succeed and what waits
    /// for them ([`transitions::restart`]).
    ///
    /// With [`Definitions::Recorded`] the phases run the scripts the task was forged
    /// with (forging again from the same versions would give the same bytes), so a
    /// definition changed since does not change what reruns. With
    /// [`Definitions::Current`] the task is forged again from the current versions of
    /// its application and cluster, with its recorded inputs, and the new scripts are
    /// stored as a new version; refused if the current application has other phases or
    /// waits, puts the run directory elsewhere, or no longer accepts the inputs.
    ///
    /// Unless `force`, a phase that succeeded and declares what it produces is kept
    /// when its outputs are all newer than its inputs, asked of the cluster as the
    /// owner ([`Self::up_to_date`]).
    pub async fn restart(&self, id: &TaskId, ask: &RestartRequest, who: &Access) -> Result<Task, MediatorError> {
        let current = self.task_for(id, who).await?;
        let invalid =
            |pointer: &str, why: String| MediatorError::Invalid(crate::model::Problem::new(pointer, why).into());
        // A phase the task does not have is a mistake in the request, not a conflict.
        if let Some(from) = ask.from
            && !current.has_phase(from)
        {
            return Err(invalid("/from", current.no_such_phase(from)));
        }
        let mut from = ask.from;
        let frames = match &ask.frames {
            None => None,
            Some(text) => {
                let framed: Vec<Phase> =
                    current.phases.iter().filter(|p| p.frames.is_some()).map(|p| p.phase).collect();
                let phase = match (from, framed.as_slice()) {
                    (Some(p), _) => p,
                    (None, [only]) => *only,
                    (None, _) => {
                        return Err(invalid(
                            "/frames",
                            "name the phase whose frames rerun (`from`): the task has more than one phase that runs \
                             per frame, or none"
                                .into(),
                        ));
                    }
                };
                if !framed.contains(&phase) {
                    return Err(invalid("/frames", format!("`{phase}` does not run per frame")));
                }
                let range = crate::model::frames::FrameRange::parse(text, crate::model::frames::MAX_FRAMES)
                    .map_err(|why| invalid("/frames", why))?;
                from = Some(phase);
                Some(range.frames().collect::<transitions::FrameSet>())
            }
        };
        // Whatever would refuse the restart refuses it before anything is forged.
        let probe = transitions::RestartAsk { from, frames: frames.clone(), ..Default::default() };
        let candidates = transitions::restart_with(&mut current.clone(), &probe, &who.by, now())
            .map_err(|refused| MediatorError::Conflict(refused.0))?;
        let fresh = if ask.force { BTreeSet::new() } else { self.up_to_date(&current, &candidates).await };
        let done = self.frames_done(&current, &candidates).await?;
        let reforged = match ask.definitions {
            Definitions::Recorded => None,
            Definitions::Current => Some(self.forge_again(&current).await?),
        };
        let by = who.by.clone();
        let full = transitions::RestartAsk { from, frames, done, fresh, reforged };
        let t = match self.change_task(id, |t| transitions::restart_with(t, &full, &by, now()).map(|_| ())).await? {
            Ok(t) => t,
            Err((refused, _)) => return Err(MediatorError::Conflict(refused.0)),
        };
        self.enqueue(*id);
        Ok(self.store.get_task(id).await?.unwrap_or(t))
    }

    /// For the phases of `candidates` that run per frame, the frames that succeeded,
    /// from their records on the cluster (one script as the owner): a restart reruns
    /// only the others. If the cluster cannot be asked the restart is refused, rather
    /// than rerunning every frame.
    pub(crate) async fn frames_done(
        &self,
        task: &Task,
        candidates: &[Phase],
    ) -> Result<BTreeMap<Phase, transitions::FrameSet>, MediatorError> {
        let framed: Vec<Phase> = candidates.iter().copied().filter(|p| task.phase(*p).frames.is_some()).collect();
        if framed.is_empty() {
            return Ok(BTreeMap::new());
        }
        let script = common::frames_done_script(&task.run_dir, &framed);
        match self.run_as_owner(task, &script).await {
            Ok(out) => common::parse_frames_done(&out.body, &framed).map_err(|why| {
                MediatorError::Unavailable(format!("could not read which frames of task {} succeeded: {why}", task.id))
            }),
            Err(e) => Err(MediatorError::Unavailable(format!(
                "could not read which frames of task {} succeeded on cluster {}: {e}; try again",
                task.id, task.cluster.name
            ))),
        }
    }
}

/// What a restart is asked for (the body of `POST /tasks/{id}/restart`).
#[derive(Debug, Clone, Default)]
pub struct RestartRequest {
    /// The phase to restart from.
    pub from: Option<Phase>,
    /// Frames of `from` to rerun, as a frame range.
    pub frames: Option<String>,
    /// Which definitions the rerun phases run.
    pub definitions: Definitions,
    /// Rerun up-to-date phases too.
    pub force: bool,
}

/// Which definitions a restart runs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Definitions {
    /// The scripts the task was forged with.
    #[default]
    Recorded,
    /// Forged again from the current versions of the application and cluster.
    Current,
}

impl Mediator {
    /// Forges `task` again from the current versions of its application and cluster,
    /// with its recorded inputs, and stores the scripts as a new version.
    async fn forge_again(&self, task: &Task) -> Result<transitions::Reforged, MediatorError> {
        let refused = |why: String| MediatorError::Invalid(crate::model::Problem::new("/definitions", why).into());
        let cluster = self.forge.cluster(self.store.as_ref(), &task.cluster.name).await.map_err(named_in_body)?;
        let app = self.forge.application(self.store.as_ref(), &task.application.name).await.map_err(named_in_body)?;
        let theirs: Vec<(Phase, Vec<crate::model::workflow::Wait>)> =
            app.graph.phases().into_iter().map(|p| (p, app.graph.waits_of(p))).collect();
        let ours: Vec<(Phase, Vec<crate::model::workflow::Wait>)> =
            task.phase_names().into_iter().map(|p| (p, task.waits_of(p))).collect();
        if theirs != ours {
            return Err(refused(format!(
                "application `{}` v{} has other phases or waits ({}) than task {} ({}); a task keeps its phases, so \
                 restart it with its recorded definitions, or submit a new task",
                app.name,
                app.version,
                app.graph,
                task.id,
                task.graph()
            )));
        }
        let home = match &task.workspace {
            Some(_) => String::new(),
            None => self.home_for_run_dir(&cluster.spec, &task.owner).await?,
        };
        let body = crate::forge::TaskBody {
            application: task.application.name.clone(),
            cluster: task.cluster.name.clone(),
            inputs: task.inputs.clone(),
            priority: None,
        };
        let req = crate::forge::ForgeRequest {
            task_id: task.id,
            user: &task.owner,
            home: &home,
            workspace: task.workspace.as_ref().map(|w| w.path.as_str()),
        };
        let (_, _, forged) =
            self.forge.forge_task_on(self.store.as_ref(), &body, &cluster, &req).await.map_err(named_in_body)?;
        if forged.run_dir != task.run_dir {
            return Err(refused(format!(
                "cluster `{}` v{} puts this task's run directory at {}, not at {} where it ran; restart it with its \
                 recorded definitions",
                cluster.name, cluster.version, forged.run_dir, task.run_dir
            )));
        }
        let version = self.store.put_task_scripts(&task.id, &task.owner, &forged, now()).await?;
        Ok(transitions::Reforged {
            based_on: task.scripts_version,
            version,
            application: forged.application.clone(),
            cluster: forged.cluster.clone(),
            sha256: forged.scripts.iter().map(|s| (s.phase, s.sha256.clone())).collect(),
        })
    }
}

impl Mediator {
    /// Runs `script` on `task`'s cluster as its owner (one round trip); the error in
    /// words.
    async fn run_as_owner(&self, task: &Task, script: &str) -> Result<super::remote::RemoteOutput, String> {
        let cluster = self.forge.cluster(self.store.as_ref(), &task.cluster.name).await.map_err(|e| e.to_string())?;
        let exec = self.clusters.exec_for(&cluster.spec, &task.owner).await.map_err(|e| e.to_string())?;
        self.clusters.run(&exec, script, self.cfg.query_timeout).await.map_err(|e| e.to_string())
    }

    /// Which of `candidates` (phases a restart would rerun) are up to date on the
    /// cluster: they succeeded, declare what they produce, and every output exists and
    /// is newer than each of their inputs. One script as the owner. If the cluster
    /// cannot be asked, none is (the restart reruns them, which is always safe), and
    /// the log says why.
    async fn up_to_date(&self, task: &Task, candidates: &[Phase]) -> BTreeSet<Phase> {
        let asked: Vec<(Phase, Vec<String>, Vec<String>)> = candidates
            .iter()
            .map(|p| task.phase(*p))
            .filter(|r| r.state == crate::model::PhaseState::Completed && !r.files.produces.is_empty())
            .map(|r| (r.phase, r.files.needs.clone(), r.files.produces.clone()))
            .collect();
        if asked.is_empty() {
            return BTreeSet::new();
        }
        let script = common::fresh_script(&task.run_dir, &asked);
        match self.run_as_owner(task, &script).await {
            Ok(out) => common::parse_fresh(&out.body),
            Err(e) => {
                tracing::warn!(task = %task.id, error = %e, "restart: could not check which outputs are up to date; rerunning those phases");
                BTreeSet::new()
            }
        }
    }
}

/// A frame asked for that the phase does not have.
fn invalid_frame(why: String) -> MediatorError {
    MediatorError::Invalid(crate::model::Problem::new("/frame", why).into())
}

impl Mediator {
    /// `user`'s home on `spec`, when the run-directory base needs it (`~/...`) and run
    /// directories are not in workspaces; else empty.
    async fn home_for_run_dir(
        &self,
        spec: &crate::model::ClusterSpec,
        user: &crate::model::UserName,
    ) -> Result<String, MediatorError> {
        if spec.workspace.is_none() && spec.run_dir_base.starts_with("~/") {
            self.clusters.home(spec, user).await
        } else {
            Ok(String::new())
        }
    }
}

/// The priority a task body asks for, if its caller may give it: anyone may lower
/// their task's priority, only admins raise it.
fn check_priority(asked: Option<i32>, access: &Access) -> Result<i32, MediatorError> {
    use crate::model::queue::{MAX_PRIORITY, USER_MAX_PRIORITY};
    let Some(p) = asked else { return Ok(0) };
    let why = if !(-MAX_PRIORITY..=MAX_PRIORITY).contains(&p) {
        format!("{p} is outside -{MAX_PRIORITY}..{MAX_PRIORITY}")
    } else if p > USER_MAX_PRIORITY && !access.admin {
        format!("only admins may raise a task's priority; ask for {USER_MAX_PRIORITY} or less")
    } else {
        return Ok(p);
    };
    Err(MediatorError::Invalid(problem("/priority", "priority", &why)))
}

//! The monitor: each tick, one status query per (cluster, user) for all their live
//! jobs, turned into phase states, exit codes, times and events. It also queues tasks
//! whose submission is due (retries, and tasks an earlier run of the server left
//! half-submitted) and repeats cancels until the jobs are gone.

use std::collections::BTreeMap;
use std::sync::Arc;

use futures::StreamExt as _;
use time::OffsetDateTime;

use super::{Mediator, now, posts, rules, transitions, usage};
use crate::model::{Phase, PhaseState, Task, UserName};
use crate::scheduler::posts::{PostsAnswer, PostsQuery, Source};
use crate::scheduler::usage::UsageAnswer;
use crate::scheduler::{self, JobQuery, JobStatus, UsageQuery};

/// Status queries in flight at once (one per (cluster, user)).
const QUERY_CONCURRENCY: usize = 8;

/// Runs until `shutdown` says so.
pub async fn run(m: Arc<Mediator>, mut shutdown: tokio::sync::watch::Receiver<bool>) {
    // Tasks left unfinished by an earlier run come back first.
    if let Err(e) = tick(&m).await {
        tracing::warn!(error = format!("{e:#}"), "monitor tick failed");
    }
    let mut interval = tokio::time::interval(m.cfg.tick);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = interval.tick() => {}
            _ = shutdown.changed() => break,
        }
        if let Err(e) = tick(&m).await {
            tracing::warn!(error = format!("{e:#}"), "monitor tick failed");
        }
    }
}

/// What one tick did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TickReport {
    /// Live tasks read.
    pub tasks: usize,
    /// (cluster, user) groups asked about.
    pub groups: usize,
    /// Live jobs asked about.
    pub jobs: usize,
    /// Phases whose posts were read.
    pub posts: usize,
    /// Ended jobs whose use of resources was asked about.
    pub usage: usize,
    /// Tasks whose stored state changed.
    pub changed: usize,
}

/// A live task as the tick read it, its live jobs, its phases whose posts are read,
/// and its ended jobs whose use is read.
type Watched = (Task, Vec<JobQuery>, Vec<PostsQuery>, Vec<UsageQuery>);

/// What one (cluster, user)'s round trip learnt: job ID → status, and what was read
/// of the posts (by the index of the query in the round trip's list).
#[derive(Debug, Default)]
pub struct Answers {
    /// Job ID → status.
    pub statuses: BTreeMap<String, JobStatus>,
    /// Query index → what was read.
    pub posts: BTreeMap<usize, PostsAnswer>,
    /// What ended jobs used.
    pub usage: UsageAnswer,
}

/// What one (cluster, user)'s round trip asks about.
#[derive(Debug, Clone, Copy)]
pub struct Queries<'a> {
    /// Live jobs: their status.
    pub jobs: &'a [JobQuery],
    /// What jobs posted, and their output the log rules read.
    pub posts: &'a [PostsQuery],
    /// Ended jobs: what they used.
    pub usage: &'a [UsageQuery],
}

/// The answer of one (cluster, user)'s round trip, or why nothing is known this time.
pub type Statuses = Result<Answers, String>;

/// One round: queue due submissions, repeat cancels, ask about live jobs.
pub async fn tick(m: &Arc<Mediator>) -> anyhow::Result<TickReport> {
    tick_with(m, |m, cluster, user, q| Box::pin(ask_cluster(m, cluster, user, q))).await
}

/// [`tick`], with the status queries answered by `ask` (the benchmark feeds captured
/// scheduler output through the real parser this way; the store is the real one).
pub async fn tick_with<F>(m: &Arc<Mediator>, ask: F) -> anyhow::Result<TickReport>
where
    F: for<'a> Fn(&'a Arc<Mediator>, &'a str, &'a UserName, Queries<'a>) -> futures::future::BoxFuture<'a, Statuses>
        + Sync,
{
    let tasks = m.store.live_tasks().await?;
    let now_utc = OffsetDateTime::now_utc();
    let mut report = TickReport { tasks: tasks.len(), ..Default::default() };
    // Per (cluster, user): the tasks with live jobs, as just read, and those jobs.
    let mut groups: BTreeMap<(String, UserName), Vec<Watched>> = BTreeMap::new();
    // Each (cluster, user) is watched by one replica (see `replicas`): it takes up due
    // submissions nobody holds, repeats cancels and asks about the jobs.
    let alive = m.alive_replicas();
    let mut watched: BTreeMap<(String, UserName), bool> = BTreeMap::new();
    for t in tasks {
        let key = (t.cluster.name.as_str().to_owned(), t.owner.clone());
        if !*watched.entry(key).or_insert_with(|| m.watches_among(&alive, t.cluster.name.as_str(), t.owner.as_str())) {
            continue;
        }
        // Due, and not claimed by another server that is on it already.
        let claimed_elsewhere = t.claim.as_ref().is_some_and(|c| c.held(now_utc) && c.holder != m.instance);
        if transitions::submission_due(&t, now_utc) && !claimed_elsewhere {
            m.enqueue(t.id);
        }
        if t.cancel_requested && t.phases.iter().any(|p| p.state.is_live_job()) {
            m.cancel_jobs(&t).await;
        }
        // Ended, with its outputs to keep in the store.
        if super::archive::due(&t, now_utc) {
            m.spawn_archive(t.id);
        }
        // A log rule asked for a phase to run again, and its job has ended.
        if rules::rerun_due(&t).is_some() {
            rules::rerun(m, &t).await;
            continue;
        }
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
        let mut reads = posts::queries(&t);
        reads.extend(rules::queries(&t));
        let used = usage::queries(&t);
        if !jobs.is_empty() || !reads.is_empty() || !used.is_empty() {
            report.jobs += jobs.len();
            report.posts += reads.len();
            report.usage += used.len();
            groups.entry((t.cluster.name.to_string(), t.owner.clone())).or_default().push((t, jobs, reads, used));
        }
    }
    report.groups = groups.len();
    let changed = std::sync::atomic::AtomicUsize::new(0);
    let (ask, changed_ref) = (&ask, &changed);
    futures::stream::iter(groups)
        .for_each_concurrent(QUERY_CONCURRENCY, |((cluster, user), tasks)| async move {
            let queries: Vec<JobQuery> = tasks.iter().flat_map(|(_, q, _, _)| q.iter().cloned()).collect();
            let reads: Vec<PostsQuery> = tasks.iter().flat_map(|(_, _, r, _)| r.iter().cloned()).collect();
            let used: Vec<UsageQuery> = tasks.iter().flat_map(|(_, _, _, u)| u.iter().cloned()).collect();
            match ask(m, &cluster, &user, Queries { jobs: &queries, posts: &reads, usage: &used }).await {
                Ok(answers) => {
                    let n = record(m, tasks, answers).await;
                    changed_ref.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
                }
                Err(e) => tracing::debug!(cluster, user = %user, error = e, "status query skipped this tick"),
            }
        })
        .await;
    report.changed = changed.into_inner();
    Ok(report)
}

/// Asks the cluster about one (cluster, user)'s live jobs and reads what their jobs
/// posted, in one round trip.
async fn ask_cluster(m: &Arc<Mediator>, cluster: &str, user: &UserName, q: Queries<'_>) -> Statuses {
    let Queries { jobs, posts, usage: used } = q;
    {
        if m.clusters.paused_until(cluster).is_some() {
            return Err("cluster paused".into());
        }
        let name = crate::model::ClusterName::parse(cluster).map_err(|e| e.to_string())?;
        let compiled = m.forge.cluster(m.store.as_ref(), &name).await.map_err(|e| e.to_string())?;
        let sched = scheduler::for_cluster(&compiled.spec)?;
        let exec = m.clusters.exec_for(&compiled.spec, user).await.map_err(|e| e.to_string())?;
        m.metrics.cluster_script("status");
        // The frames' own records and the jobs' posts ride on the same round trip,
        // after the status query (a job it finds ended had ended before its posts
        // were read). Only posts to read: no status query.
        let mut script = if jobs.is_empty() {
            String::from(scheduler::common::HELPERS)
        } else {
            sched.status_script(user, jobs) + &scheduler::common::frame_records_script(jobs)
        };
        // The log rules' reads name the files the scheduler writes the output to.
        let posts: Vec<PostsQuery> = posts
            .iter()
            .map(|q| match &q.source {
                // A frame phase's frames write their own files, named by the rules.
                Source::Output { stderr, job, .. } if !q.frames => {
                    let path = sched.output_file(&q.run_dir, q.phase, job, *stderr);
                    PostsQuery { source: Source::Output { stderr: *stderr, job: job.clone(), path }, ..q.clone() }
                }
                _ => q.clone(),
            })
            .collect();
        script.push_str(&scheduler::posts::posts_script(&posts));
        if !used.is_empty() {
            script.push_str(&sched.usage_script(used));
        }
        let out = match m.clusters.run(&exec, &script, m.cfg.query_timeout).await {
            Ok(o) => o,
            Err(e) => {
                if e.is_transient() {
                    m.clusters.failed(cluster);
                }
                return Err(e.to_string());
            }
        };
        // The scheduler could not be asked at all: nothing is known this time.
        let mut statuses = if jobs.is_empty() { BTreeMap::new() } else { sched.parse_status(&out.body)? };
        for (job, records) in scheduler::common::parse_frames(&out.body) {
            if let Some(st) = statuses.get_mut(&job) {
                st.frames = Some(records);
            }
        }
        m.clusters.ok(cluster);
        let usage = if used.is_empty() { UsageAnswer::default() } else { sched.parse_usage(&out.body) };
        Ok(Answers { statuses, posts: scheduler::posts::parse_posts(&out.body), usage })
    }
}

/// Applies the answers to each task, deciding on the state the tick read (no second
/// read) and writing only those that changed; returns how many did.
async fn record(m: &Arc<Mediator>, tasks: Vec<Watched>, mut answers: Answers) -> usize {
    let mut changed = 0;
    let mut index = 0;
    let at = now();
    for (task, qs, reads, used) in tasks {
        let statuses: Vec<(Phase, String, Option<JobStatus>)> =
            qs.into_iter().map(|q| (q.phase, q.job_id.clone(), answers.statuses.get(&q.job_id).cloned())).collect();
        let read: Vec<(PostsQuery, Option<PostsAnswer>)> = reads
            .into_iter()
            .map(|q| {
                index += 1;
                (q, answers.posts.remove(&(index - 1)))
            })
            .collect();
        let (id, revision) = (task.id, task.revision);
        let application = task.application.name.to_string();
        let recorded = std::sync::Mutex::new(Vec::new());
        let result = m
            .change_task_from(&id, Some(task), |t| {
                // What the jobs posted and printed first: it was written before the
                // ends the statuses report, and the history keeps that order.
                for (q, a) in &read {
                    match q.source {
                        Source::Posts => posts::apply(t, q, a.as_ref(), at),
                        Source::Output { .. } => rules::apply(t, q, a.as_ref(), &m.patterns, at),
                    }
                }
                apply(t, &statuses);
                *recorded.lock().unwrap_or_else(|p| p.into_inner()) = usage::apply(t, &used, &answers.usage, at);
                Ok(())
            })
            .await;
        match result {
            Ok(Ok(t)) => {
                changed += usize::from(t.revision != revision);
                for u in recorded.into_inner().unwrap_or_else(|p| p.into_inner()) {
                    m.metrics.usage(&application, &u);
                }
            }
            Ok(Err((_, t))) => changed += usize::from(t.revision != revision),
            Err(e) => tracing::warn!(task = %id, error = %e, "could not record job states"),
        }
    }
    changed
}

/// Applies scheduler answers to a task. A job the scheduler no longer knows and nothing
/// else can tell about becomes `unknown`, never `completed`.
pub fn apply(t: &mut Task, answers: &[(Phase, String, Option<JobStatus>)]) {
    let at = now();
    for (phase, job, status) in answers {
        let rec = t.phase(*phase);
        // The answer is about a job the phase no longer runs (restarted meanwhile).
        if rec.job_id.as_deref() != Some(job.as_str()) || !rec.state.is_live_job() {
            continue;
        }
        match status {
            Some(s) => {
                let rec = t.phase_mut(*phase);
                if let (Some(f), Some(tally)) = (rec.frames.as_mut(), &s.frames) {
                    f.count(tally);
                }
                if s.started_at.is_some() {
                    rec.started_at = s.started_at;
                }
                if s.state.is_final() {
                    rec.ended_at = s.ended_at.or(Some(at));
                    rec.exit_code = s.exit_code;
                    rec.signal = s.signal;
                    // A job that ran: what it used is read next (`usage`).
                    rec.usage_due = rec.started_at.is_some() || s.exit_code.is_some();
                }
                rec.reason = s.reason.clone();
                let detail = match (s.exit_code, s.signal) {
                    (_, Some(sig)) if s.state.is_final() => format!("job {job}, {}, signal {sig}", s.raw_state),
                    (Some(code), _) if s.state.is_final() => format!("job {job}, exit code {code}"),
                    _ => match &s.reason {
                        Some(r) => format!("job {job}, {r}"),
                        None => format!("job {job}"),
                    },
                };
                let explained = match s.state {
                    PhaseState::Cancelled if s.reason.as_deref() == Some("DependencyNeverSatisfied") => {
                        Some("not run: a phase it waits for did not end as it needs (succeeded, or not, as declared)")
                    }
                    PhaseState::Failed if s.reason.as_deref() == Some(scheduler::PARTLY_RUN) => {
                        Some("some frames did not run: the frames they wait for (frame by frame) did not succeed")
                    }
                    PhaseState::Timeout => Some("the job ran past its wall-time limit and the scheduler stopped it"),
                    PhaseState::OutOfMemory => Some("the job used more memory than it asked for and was killed"),
                    PhaseState::NodeFail => Some("the node the job ran on failed; the job did not finish"),
                    _ => None,
                };
                if let Some(why) = explained {
                    t.phase_mut(*phase).explanation = Some(why.into());
                }
                t.set_phase_state(at, *phase, s.state, Some(&detail));
            }
            None => {
                let rec = t.phase_mut(*phase);
                rec.ended_at = Some(at);
                rec.explanation =
                    Some("the scheduler no longer knows this job and nothing else can tell how it ended".into());
                t.set_phase_state(at, *phase, PhaseState::Unknown, Some(&format!("job {job}")));
            }
        }
    }
    t.refresh_state(at);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn task() -> Task {
        let mut t = crate::model::task::sample_task(OffsetDateTime::UNIX_EPOCH);
        for (p, id) in Phase::DEFAULT.into_iter().zip(["1", "2", "3"]) {
            t.phase_mut(p).job_id = Some(id.into());
            t.set_phase_state(OffsetDateTime::UNIX_EPOCH, p, PhaseState::Pending, None);
        }
        t
    }

    fn status(state: PhaseState, exit: Option<i32>) -> JobStatus {
        JobStatus {
            state,
            raw_state: format!("{state:?}"),
            exit_code: exit,
            signal: None,
            reason: None,
            started_at: None,
            ended_at: None,
            frames: None,
        }
    }

    #[test]
    fn answers_move_phases_and_the_task_along() {
        let mut t = task();
        apply(&mut t, &[(Phase::PROLOG, "1".into(), Some(status(PhaseState::Running, None)))]);
        assert_eq!(t.state, crate::model::TaskState::Running);
        apply(
            &mut t,
            &[
                (Phase::PROLOG, "1".into(), Some(status(PhaseState::Completed, Some(0)))),
                (Phase::EXECUTE, "2".into(), Some(status(PhaseState::Failed, Some(3)))),
                (Phase::EPILOG, "3".into(), Some(status(PhaseState::Completed, Some(0)))),
            ],
        );
        assert_eq!(t.state, crate::model::TaskState::Failed);
        assert_eq!(t.phase(Phase::EXECUTE).exit_code, Some(3));
        assert!(
            t.events.iter().any(|e| e.message == "execute: pending → failed (job 2, exit code 3)"),
            "{:#?}",
            t.events
        );
    }

    #[test]
    fn a_job_nobody_knows_about_is_unknown_not_completed() {
        let mut t = task();
        apply(&mut t, &[(Phase::PROLOG, "1".into(), None)]);
        assert_eq!(t.phase(Phase::PROLOG).state, PhaseState::Unknown);
    }

    #[test]
    fn answers_about_a_replaced_job_are_ignored() {
        let mut t = task();
        apply(&mut t, &[(Phase::PROLOG, "999".into(), Some(status(PhaseState::Completed, Some(0))))]);
        assert_eq!(t.phase(Phase::PROLOG).state, PhaseState::Pending);
    }
}

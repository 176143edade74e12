//! The queue in front of the clusters: tasks that need licences or their owner's share
//! of a cluster ([`crate::model::queue`]) wait here, `queued`, until the site's pools
//! (kept in the store, [`crate::store::pools`]) grant what they need, in priority and
//! age order; then they go on to submission like any other task.
//!
//! One server at a time looks at the queue (the lease `queue/dispatch`), on every tick
//! and whenever a task with needs changes. A pass:
//!
//! 1. **Sweeps** the pools: a holder whose phase has ended (however: completed, failed,
//!    cancelled outside hpcforge, killed with its node, gone from the scheduler), whose
//!    task has ended, or whose task no longer exists is released, and the task says
//!    so in an event. This is also what frees what a crashed server held.
//! 2. **Dispatches**: queued tasks in order; a task whose needs are granted (all of
//!    them, or none) leaves the queue and is submitted; one that is short says what it
//!    waits for, and the pool it is short of is closed to the tasks behind it in this
//!    pass (so a task asking for many is not overtaken for ever by tasks asking for
//!    few), while tasks needing other pools go on.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Duration;

use time::OffsetDateTime;

use super::transitions::Refused;
use super::{Mediator, MediatorError, now};
use crate::forge::{CompiledApp, CompiledCluster};
use crate::model::queue::{self as q, Holder, Need, amount_of};
use crate::model::{PhaseState, Problems, Task, TaskId, TaskState, UserName};
use crate::store::{StoreError, TaskFilter, pools};

/// The lease that makes one server at a time look at the queue.
const LEASE: &str = "queue/dispatch";

/// How long the lease holds unless renewed.
const LEASE_FOR: Duration = Duration::from_secs(30);

/// Most queued tasks one pass looks at.
const MAX_PASS: usize = 100_000;

impl Mediator {
    /// What a task of `owner` running `app` on `cluster` needs from the site's pools:
    /// each phase's licences (from the cluster's own pool of that name, else the
    /// site-wide one), one of the owner's job slots per phase and one live-task slot,
    /// where the cluster sets those limits. A licence neither the cluster nor the site
    /// has, or more than a pool has in all, is refused: the task could never start.
    pub(crate) async fn needs_of(
        &self,
        app: &CompiledApp,
        cluster: &CompiledCluster,
        owner: &UserName,
    ) -> Result<Vec<Need>, MediatorError> {
        let spec = &cluster.spec;
        let mut needs = Vec::new();
        let mut problems = Problems::default();
        let mut site_counts: BTreeMap<String, Option<u32>> = BTreeMap::new();
        for phase in app.graph.phases() {
            let r = crate::forge::render::resources_for(&app.spec, spec, phase, &mut Problems::default());
            for (name, n) in &r.licences {
                let own = spec.licences.get(name).and_then(|l| l.count);
                let pool = match own {
                    Some(_) => q::cluster_licence(&cluster.name, name),
                    None => q::site_licence(name),
                };
                let has = match own {
                    Some(c) => Some(c),
                    None => {
                        if !site_counts.contains_key(&pool) {
                            let c = self.store.pool(&pool).await?.map(|p| p.count);
                            site_counts.insert(pool.clone(), c);
                        }
                        site_counts[&pool]
                    }
                };
                if has.is_none_or(|c| c < *n) {
                    let why = match (has, own) {
                        (None, _) => format!(
                            "cluster `{}` has no `{name}` pool of its own and no site-wide one is set (an admin sets \
                             it with `hpcforge resources licence {name} COUNT`)",
                            cluster.name
                        ),
                        (Some(c), Some(_)) => format!("cluster `{}` has {c} in all", cluster.name),
                        (Some(c), None) => format!("the site has {c} in all"),
                    };
                    problems.push_rule(
                        "/cluster",
                        "licences",
                        None,
                        format!(
                            "application `{}` asks for {n} `{name}` licences in its {phase} phase; {why}, so the \
                                 task could never start",
                            app.name
                        ),
                    );
                }
                needs.push(Need { pool, amount: *n, phase: Some(phase), count: own });
            }
            if let Some(limit) = spec.limits.jobs_per_user {
                needs.push(Need {
                    pool: q::user_jobs(&cluster.name, owner),
                    amount: 1,
                    phase: Some(phase),
                    count: Some(limit),
                });
            }
        }
        if let Some(limit) = spec.limits.tasks_per_user {
            needs.push(Need { pool: q::user_tasks(&cluster.name, owner), amount: 1, phase: None, count: Some(limit) });
        }
        if let Some(limit) = spec.limits.jobs_per_user {
            let jobs = app.graph.phases().len() as u32;
            if jobs > limit {
                problems.push_rule(
                    "/cluster",
                    "limits",
                    None,
                    format!(
                        "application `{}` runs {jobs} jobs (one per phase); cluster `{}` lets a user have {limit} at \
                         once, so the task could never start",
                        app.name, cluster.name
                    ),
                );
            }
        }
        if !problems.is_empty() {
            return Err(MediatorError::Invalid(problems));
        }
        Ok(needs)
    }

    /// Asks for a look at the queue soon (a task joined it, something was freed, a
    /// pool changed size).
    pub fn kick_queue(&self) {
        self.queue_kick.notify_one();
    }

    /// Looks at the queue on every tick and when kicked, until `stop`.
    pub(crate) async fn run_queue(self: std::sync::Arc<Self>, mut stop: tokio::sync::watch::Receiver<bool>) {
        let mut every = tokio::time::interval(self.cfg.tick.min(Duration::from_secs(5)));
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = every.tick() => {}
                _ = self.queue_kick.notified() => {}
                _ = stop.changed() => break,
            }
            if *stop.borrow() {
                break;
            }
            if let Err(e) = self.queue_pass().await {
                tracing::warn!(error = format!("{e:#}"), "could not look at the queue; trying again on the next tick");
            }
        }
        // A graceful stop hands the queue to another server at once.
        let held = self.queue_lease.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(lease) = held
            && let Err(e) = self.store.release_lease(&lease, now()).await
        {
            tracing::warn!(error = %e, "could not release the queue's lease; it lapses by itself");
        }
    }

    /// One look at the queue, if this server holds the lease: sweep, then dispatch.
    /// Returns how many tasks left the queue.
    pub async fn queue_pass(&self) -> Result<usize, StoreError> {
        let at = now();
        let until = at + LEASE_FOR;
        let Some(lease) = self.store.claim_lease(LEASE, &self.instance, until, at).await? else {
            return Ok(0); // another server looks at it
        };
        *self.queue_lease.lock().unwrap_or_else(|p| p.into_inner()) = Some(lease);
        let pools = self.store.pools().await?;
        self.sweep(&pools).await?;
        if self.workspaces_due()
            && let Err(e) = self.keep_workspaces().await
        {
            tracing::warn!(error = %e, "could not look after workspaces; trying again on the next tick");
        }
        let filter = TaskFilter { states: vec![TaskState::Queued], ..Default::default() };
        let mut queued = self.store.list_tasks(&filter, MAX_PASS).await?;
        if queued.is_empty() {
            return Ok(0);
        }
        queued.retain(|t| t.queue.is_some());
        queued.sort_by(|a, b| {
            let key = |t: &Task| (t.priority, t.queue.as_ref().map_or(t.created_at, |e| e.since));
            let (ka, kb) = (key(a), key(b));
            q::queue_order((ka.0, ka.1, &a.id), (kb.0, kb.1, &b.id))
        });
        // Pools a task ahead was short of: closed to the tasks behind it in this pass.
        let mut closed: HashMap<String, q::Short> = HashMap::new();
        let mut left = 0;
        for t in queued {
            let needs = t.due_needs();
            // Behind a task that waits for the same pool: this task's own amount, in
            // the words the pool's state gives.
            let behind = needs
                .iter()
                .find_map(|n| closed.get(&n.pool).map(|s| q::Short { wanted: n.amount, ..s.clone() }.describe()));
            if let Some(why) = behind {
                self.waiting_for(&t, &format!("{why}; tasks ahead wait for it too")).await?;
                continue;
            }
            match pools::claim(self.store.as_ref(), &t.id, &t.owner, &needs, now()).await? {
                Ok(()) => {
                    if self.leave_queue(&t, &needs).await? {
                        left += 1;
                    }
                }
                Err(short) => {
                    self.waiting_for(&t, &short.describe()).await?;
                    closed.insert(short.pool.clone(), short);
                }
            }
        }
        Ok(left)
    }

    /// Records what a queued task waits for, when that changed.
    async fn waiting_for(&self, t: &Task, why: &str) -> Result<(), StoreError> {
        if t.queue.as_ref().and_then(|e| e.waiting_for.as_deref()) == Some(why) {
            return Ok(());
        }
        let changed = self
            .change_task_from(&t.id, Some(t.clone()), |t| {
                if t.state != TaskState::Queued || t.queue.is_none() {
                    return Err(Refused("no longer queued".into()));
                }
                let first = t.queue.as_ref().is_some_and(|e| e.waiting_for.is_none());
                if first {
                    t.record(now(), None, format!("queued: waits for {why}"));
                }
                if let Some(e) = &mut t.queue {
                    e.waiting_for = Some(why.to_owned());
                }
                Ok(())
            })
            .await?;
        if let Err((Refused(why), _)) = changed {
            tracing::debug!(task = %t.id, why, "queue note not written");
        }
        Ok(())
    }

    /// Takes a task whose needs were just granted out of the queue and on to
    /// submission; whether it went. A task that changed meanwhile (cancelled) gives
    /// back what it was granted.
    async fn leave_queue(&self, t: &Task, needs: &[Need]) -> Result<bool, StoreError> {
        let at = now();
        let granted: Vec<String> = needs
            .iter()
            .map(|n| {
                let of = n.phase.map_or_else(String::new, |p| format!(" ({p})"));
                format!("{}{of}", amount_of(&n.pool, n.amount))
            })
            .collect();
        let changed = self
            .change_task_from(&t.id, Some(t.clone()), |t| {
                let Some(entry) = t.queue.take() else { return Err(Refused("no longer queued".into())) };
                if t.cancel_requested || t.state.is_final() {
                    return Err(Refused("cancelled meanwhile".into()));
                }
                let waited = (at - entry.since).whole_seconds().max(0);
                t.record(at, None, format!("left the queue after {waited} s: granted {}", granted.join(", ")));
                t.refresh_state(at);
                Ok(())
            })
            .await?;
        match changed {
            Ok(_) => {
                self.enqueue(t.id);
                Ok(true)
            }
            Err((Refused(why), now_is)) => {
                tracing::info!(task = %t.id, why, "a granted task did not leave the queue; giving its grants back");
                if now_is.queue.is_none() {
                    for n in needs {
                        pools::release(self.store.as_ref(), &n.pool, &t.id, n.phase).await?;
                    }
                }
                Ok(false)
            }
        }
    }

    /// Releases what holders no longer need (see the module docs), saying so on their
    /// tasks.
    async fn sweep(&self, pools_now: &[q::Pool]) -> Result<(), StoreError> {
        let mut tasks: HashMap<TaskId, Option<Task>> = HashMap::new();
        if pools_now.iter().map(|p| p.holders.len()).sum::<usize>() > 8 {
            // Many holders: the live tasks in one read; the others (ended, gone) one by one.
            tasks.extend(self.store.live_tasks().await?.into_iter().map(|t| (t.id, Some(t))));
        }
        let mut freed = 0;
        for pool in pools_now {
            for h in &pool.holders {
                if let std::collections::hash_map::Entry::Vacant(e) = tasks.entry(h.task) {
                    e.insert(self.store.task_state(&h.task).await?);
                }
                let Some(why) = release_reason(tasks[&h.task].as_ref(), h) else { continue };
                if pools::release(self.store.as_ref(), &pool.key, &h.task, h.phase).await?.is_none() {
                    continue; // someone else did
                }
                freed += 1;
                let what = amount_of(&pool.key, h.amount);
                let of = h.phase.map_or_else(|| "the task".to_owned(), |p| p.to_string());
                tracing::info!(task = %h.task, pool = pool.key, amount = h.amount, why, "released");
                if tasks[&h.task].is_some() {
                    let message = format!("released {what} held by {of}: {why}");
                    let _ = self
                        .change_task(&h.task, |t| {
                            t.record(now(), h.phase, message.clone());
                            Ok(())
                        })
                        .await?;
                }
            }
        }
        self.metrics.pool_released(freed);
        Ok(())
    }

    /// Releases by hand what `task` holds of `pool` (for `phase`, or all of it),
    /// recorded on the pool and the task with who did it (an admin). The holders
    /// released; none is `NotFound`.
    pub async fn release_by_hand(
        &self,
        pool: &str,
        task: &TaskId,
        phase: Option<crate::model::Phase>,
        by: &str,
    ) -> Result<Vec<Holder>, MediatorError> {
        let gone = pools::release_by_hand(self.store.as_ref(), pool, task, phase.map(Some), by, now()).await?;
        if gone.is_empty() {
            return Err(MediatorError::NotFound(format!("task {task} holds nothing of pool `{pool}`")));
        }
        for h in &gone {
            let of = h.phase.map_or_else(|| "the task".to_owned(), |p| p.to_string());
            let message = format!("{by} released {} held by {of} by hand", amount_of(pool, h.amount));
            tracing::warn!(task = %task, pool, by, amount = h.amount, "released by hand");
            let _ = self
                .change_task(task, |t| {
                    t.record(now(), h.phase, message.clone());
                    Ok(())
                })
                .await;
        }
        self.kick_queue();
        Ok(gone)
    }

    /// Where queued task `id` stands in the queue (1: next), counting the queued
    /// tasks ahead of it as the next pass would order them.
    pub async fn queue_position(&self, t: &Task) -> Result<Option<u32>, StoreError> {
        let Some(entry) = &t.queue else { return Ok(None) };
        let filter = TaskFilter { states: vec![TaskState::Queued], ..Default::default() };
        let queued = self.store.list_tasks(&filter, MAX_PASS).await?;
        let mine = (t.priority, entry.since, &t.id);
        let ahead = queued
            .iter()
            .filter(|o| o.id != t.id)
            .filter_map(|o| o.queue.as_ref().map(|e| (o.priority, e.since, &o.id)))
            .filter(|o| q::queue_order(*o, mine) == std::cmp::Ordering::Less)
            .count();
        Ok(Some(ahead as u32 + 1))
    }
}

/// Why holder `h` no longer needs what it holds, given its task as stored (`None`:
/// gone); `None` while it still does.
fn release_reason(t: Option<&Task>, h: &Holder) -> Option<String> {
    let Some(t) = t else { return Some("its task no longer exists".into()) };
    if t.queue.is_some() && !t.cancel_requested {
        return None; // granted, on its way out of the queue (or granted again)
    }
    match h.phase {
        None => (!t.jobs_live()).then(|| format!("the task ended ({})", t.state.as_str())),
        Some(p) if !t.has_phase(p) => Some(format!("the task has no phase {p}")),
        Some(p) => {
            let r = t.phase(p);
            if !r.state.is_final() {
                return None;
            }
            let job = r.job_id.as_deref().map_or_else(|| "its job".to_owned(), |j| format!("job {j}"));
            Some(match r.state {
                PhaseState::Unknown => format!("{job} left the scheduler and nothing tells how it ended"),
                PhaseState::Cancelled if r.job_id.is_none() => "it was cancelled before it was submitted".into(),
                s => format!("{job} ended ({})", s.as_str()),
            })
        }
    }
}

/// Joins the queue entry of a task just made, before it is stored: `queued`, saying
/// why; whether it needs the queue at all.
pub(crate) fn queue_new_task(t: &mut Task, at: OffsetDateTime) -> bool {
    if !t.join_queue(at) {
        return false;
    }
    t.state = TaskState::Queued;
    let pools: HashSet<String> = t.due_needs().into_iter().map(|n| n.pool).collect();
    let mut pools: Vec<String> = pools.into_iter().collect();
    pools.sort();
    t.record(at, None, format!("queued for the site's pools: {}", pools.join(", ")));
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Phase;

    fn holder(t: &Task, phase: Option<Phase>) -> Holder {
        Holder { task: t.id, phase, owner: t.owner.clone(), amount: 1, since: OffsetDateTime::UNIX_EPOCH }
    }

    #[test]
    fn a_holder_is_released_once_its_phase_or_task_has_ended_however_it_ended() {
        let at = OffsetDateTime::UNIX_EPOCH;
        let mut t = crate::model::task::sample_task(at);
        let ex = Some(Phase::EXECUTE);
        assert_eq!(release_reason(None, &holder(&t, ex)).as_deref(), Some("its task no longer exists"));
        assert_eq!(release_reason(Some(&t), &holder(&t, ex)), None, "waiting to be submitted");
        t.set_phase_state(at, Phase::EXECUTE, PhaseState::Running, None);
        t.phase_mut(Phase::EXECUTE).job_id = Some("77".into());
        assert_eq!(release_reason(Some(&t), &holder(&t, ex)), None, "running");
        t.set_phase_state(at, Phase::EXECUTE, PhaseState::NodeFail, None);
        assert_eq!(release_reason(Some(&t), &holder(&t, ex)).as_deref(), Some("job 77 ended (node_fail)"));
        t.set_phase_state(at, Phase::EXECUTE, PhaseState::Unknown, None);
        assert!(release_reason(Some(&t), &holder(&t, ex)).unwrap().contains("left the scheduler"));
        // The task's own slot: until no job of it is alive.
        assert_eq!(release_reason(Some(&t), &holder(&t, None)), None, "prolog and epilog still to come");
        for p in [Phase::PROLOG, Phase::EPILOG] {
            t.set_phase_state(at, p, PhaseState::Completed, None);
        }
        assert!(release_reason(Some(&t), &holder(&t, None)).unwrap().starts_with("the task ended"));
        // Granted again after a restart, on its way out of the queue: kept.
        t.queue = Some(q::QueueEntry { since: at, waiting_for: None });
        assert_eq!(release_reason(Some(&t), &holder(&t, ex)), None);
    }
}

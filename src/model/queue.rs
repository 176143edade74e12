//! The queue in front of the clusters: what a task needs from the site before it may
//! be submitted (licences, its user's share of live tasks and jobs on a cluster), the
//! pools that count those, and why a task waits. Pure data and decisions; the store
//! keeps the pools ([`crate::store::pools`]), the mediator's queue hands them out.
//!
//! A **pool** is a count and its holders. Licence pools are site-wide
//! (`licence/<name>`, sized by an admin) or a cluster's own (`licence/<cluster>/<name>`,
//! sized by its definition); a user's limits are pools of their own, one per cluster
//! (`jobs/<cluster>/<user>`, `tasks/<cluster>/<user>`), sized by the cluster's
//! `limits`. A **holder** is a task, for one phase (held while that phase's job may
//! run: from the moment the task leaves the queue until the job ends) or for the whole
//! task (a live-task slot, held until the task ends).

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use super::names::{ClusterName, LicenceName, Phase, TaskId, UserName};

/// Most notes a pool keeps (releases by hand, count changes), newest last.
pub const MAX_POOL_NOTES: usize = 20;

/// What a task needs from one pool.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Need {
    /// The pool (`licence/maya`, `licence/<cluster>/fluent`, `jobs/<cluster>/<user>`,
    /// `tasks/<cluster>/<user>`).
    pub pool: String,
    /// How many.
    pub amount: u32,
    /// The phase that holds it while its job may run; none: the task holds it until it
    /// ends.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<Phase>,
    /// The pool's size as the task's cluster definition gives it; none for a site-wide
    /// licence pool, whose size an admin sets in the store.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub count: Option<u32>,
}

/// A queued task's place: when it joined, and what it waits for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct QueueEntry {
    /// When it joined the queue (at creation, or at a restart).
    #[serde(with = "time::serde::rfc3339")]
    pub since: OffsetDateTime,
    /// What it waits for, in words ("2 maya licences: 20 of 20 in use"), as the last
    /// look at the queue found; none before the first look.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waiting_for: Option<String>,
}

/// One holder of a pool.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Holder {
    /// The task holding it.
    pub task: TaskId,
    /// For which phase (none: the task as a whole).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<Phase>,
    /// The task's owner.
    pub owner: UserName,
    /// How many it holds.
    pub amount: u32,
    /// Since when.
    #[serde(with = "time::serde::rfc3339")]
    pub since: OffsetDateTime,
}

/// A change to a pool made by hand, kept with the pool.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct PoolNote {
    /// When.
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
    /// Who (an admin's name).
    pub by: String,
    /// What, in words.
    pub message: String,
}

/// A pool as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Pool {
    /// Its key (see the module docs).
    pub key: String,
    /// How many there are.
    pub count: u32,
    /// Who holds what, oldest first.
    #[serde(default)]
    pub holders: Vec<Holder>,
    /// Changes made by hand, newest last (at most [`MAX_POOL_NOTES`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub notes: Vec<PoolNote>,
    /// Bumped by every write; a write that expects another value is refused.
    #[serde(default)]
    pub version: u64,
}

/// Why a pool cannot grant a need now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Short {
    /// The pool.
    pub pool: String,
    /// How many were asked for.
    pub wanted: u32,
    /// How many are held.
    pub in_use: u32,
    /// How many there are.
    pub count: u32,
}

impl Short {
    /// What a task waits for, in words: "2 maya licences: 20 of 20 in use",
    /// "alice has 50 of 50 jobs on cluster hpc1".
    pub fn describe(&self) -> String {
        match PoolKind::of(&self.pool) {
            PoolKind::Licence { .. } => {
                format!("{}: {} of {} in use", amount_of(&self.pool, self.wanted), self.in_use, self.count)
            }
            PoolKind::Jobs { cluster, user } => format!(
                "{user} has {} of {} jobs on cluster {cluster} (this task needs {} more)",
                self.in_use, self.count, self.wanted
            ),
            PoolKind::Tasks { cluster, user } => {
                format!("{user} has {} of {} live tasks on cluster {cluster}", self.in_use, self.count)
            }
            PoolKind::Other => format!("{} of `{}`: {} of {} in use", self.wanted, self.pool, self.in_use, self.count),
        }
    }
}

/// What a pool counts, read from its key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PoolKind {
    /// Licences, site-wide (`cluster` none) or a cluster's own.
    Licence {
        /// The licence.
        name: String,
        /// The cluster whose pool it is.
        cluster: Option<String>,
    },
    /// A user's live jobs on a cluster.
    Jobs {
        /// The cluster.
        cluster: String,
        /// The user.
        user: String,
    },
    /// A user's live tasks on a cluster.
    Tasks {
        /// The cluster.
        cluster: String,
        /// The user.
        user: String,
    },
    /// Not a key hpcforge makes.
    Other,
}

impl PoolKind {
    /// Reads a pool key.
    pub fn of(key: &str) -> PoolKind {
        let parts: Vec<&str> = key.split('/').collect();
        match parts.as_slice() {
            ["licence", name] => PoolKind::Licence { name: (*name).to_owned(), cluster: None },
            ["licence", cluster, name] => {
                PoolKind::Licence { name: (*name).to_owned(), cluster: Some((*cluster).to_owned()) }
            }
            ["jobs", cluster, user] => PoolKind::Jobs { cluster: (*cluster).to_owned(), user: (*user).to_owned() },
            ["tasks", cluster, user] => PoolKind::Tasks { cluster: (*cluster).to_owned(), user: (*user).to_owned() },
            _ => PoolKind::Other,
        }
    }
}

/// The key of a site-wide licence pool.
pub fn site_licence(name: &LicenceName) -> String {
    format!("licence/{name}")
}

/// The key of a cluster's own licence pool.
pub fn cluster_licence(cluster: &ClusterName, name: &LicenceName) -> String {
    format!("licence/{cluster}/{name}")
}

/// The key of a user's live-jobs pool on a cluster.
pub fn user_jobs(cluster: &ClusterName, user: &UserName) -> String {
    format!("jobs/{cluster}/{user}")
}

/// The key of a user's live-tasks pool on a cluster.
pub fn user_tasks(cluster: &ClusterName, user: &UserName) -> String {
    format!("tasks/{cluster}/{user}")
}

impl Pool {
    /// An empty pool of `count`.
    pub fn new(key: &str, count: u32) -> Self {
        Self { key: key.to_owned(), count, holders: Vec::new(), notes: Vec::new(), version: 0 }
    }

    /// How many are held.
    pub fn in_use(&self) -> u32 {
        self.holders.iter().map(|h| h.amount).sum()
    }

    /// Whether `task` holds this pool for `phase`.
    pub fn held_by(&self, task: &TaskId, phase: Option<Phase>) -> bool {
        self.holders.iter().any(|h| h.task == *task && h.phase == phase)
    }

    /// Grants `holder` if it fits (`count` first replaces the pool's size, when the
    /// cluster definition gives one). `Ok(true)`: granted now; `Ok(false)`: held
    /// already (nothing changes); `Err`: it does not fit.
    pub fn grant(&mut self, holder: Holder, count: Option<u32>) -> Result<bool, Short> {
        if let Some(c) = count {
            self.count = c;
        }
        if self.held_by(&holder.task, holder.phase) {
            return Ok(false);
        }
        let in_use = self.in_use();
        if u64::from(in_use) + u64::from(holder.amount) > u64::from(self.count) {
            return Err(Short { pool: self.key.clone(), wanted: holder.amount, in_use, count: self.count });
        }
        self.holders.push(holder);
        Ok(true)
    }

    /// Takes back what `task` holds for `phase`; what it held, if it did.
    pub fn release(&mut self, task: &TaskId, phase: Option<Phase>) -> Option<Holder> {
        let i = self.holders.iter().position(|h| h.task == *task && h.phase == phase)?;
        Some(self.holders.remove(i))
    }

    /// Keeps a note of a change made by hand (the newest [`MAX_POOL_NOTES`]).
    pub fn note(&mut self, at: OffsetDateTime, by: &str, message: String) {
        self.notes.push(PoolNote { at, by: by.to_owned(), message });
        let extra = self.notes.len().saturating_sub(MAX_POOL_NOTES);
        self.notes.drain(..extra);
    }
}

/// `amount` of pool `key`, in words: "2 maya licences", "1 of alice's job slots on
/// cluster hpc1".
pub fn amount_of(key: &str, amount: u32) -> String {
    match PoolKind::of(key) {
        PoolKind::Licence { name, .. } => format!("{amount} {name} licence{}", if amount == 1 { "" } else { "s" }),
        PoolKind::Jobs { cluster, user } => format!("{amount} of {user}'s job slots on cluster {cluster}"),
        PoolKind::Tasks { cluster, user } => format!("one of {user}'s live-task slots on cluster {cluster}"),
        PoolKind::Other => format!("{amount} of `{key}`"),
    }
}

/// The order of the queue: higher priority first, then who joined first, then the
/// older task.
pub fn queue_order(a: (i32, OffsetDateTime, &TaskId), b: (i32, OffsetDateTime, &TaskId)) -> std::cmp::Ordering {
    b.0.cmp(&a.0).then(a.1.cmp(&b.1)).then(a.2.cmp(b.2))
}

/// The most a user may set as their own task's priority; admins may set any value in
/// `-MAX_PRIORITY..=MAX_PRIORITY`.
pub const USER_MAX_PRIORITY: i32 = 0;

/// The bound of priorities.
pub const MAX_PRIORITY: i32 = 1000;

#[cfg(test)]
mod tests {
    use super::*;

    fn holder(task: &TaskId, phase: Option<Phase>, amount: u32) -> Holder {
        Holder {
            task: *task,
            phase,
            owner: UserName::parse("alice").unwrap(),
            amount,
            since: OffsetDateTime::UNIX_EPOCH,
        }
    }

    #[test]
    fn a_pool_grants_what_fits_once_per_holder_and_takes_it_back() {
        let (a, b) = (TaskId::new(), TaskId::new());
        let mut p = Pool::new("licence/maya", 3);
        assert_eq!(p.grant(holder(&a, Some(Phase::EXECUTE), 2), None), Ok(true));
        assert_eq!(p.grant(holder(&a, Some(Phase::EXECUTE), 2), None), Ok(false), "held already");
        let short = p.grant(holder(&b, Some(Phase::EXECUTE), 2), None).unwrap_err();
        assert_eq!(short.describe(), "2 maya licences: 2 of 3 in use");
        assert_eq!(p.grant(holder(&b, Some(Phase::EPILOG), 1), None), Ok(true));
        assert_eq!(p.in_use(), 3);
        assert_eq!(p.release(&a, Some(Phase::EXECUTE)).map(|h| h.amount), Some(2));
        assert_eq!(p.release(&a, Some(Phase::EXECUTE)), None, "released once");
        assert_eq!(p.grant(holder(&b, Some(Phase::EXECUTE), 2), None), Ok(true));
    }

    #[test]
    fn a_smaller_pool_keeps_its_holders_and_grants_nothing_until_they_end() {
        let (a, b) = (TaskId::new(), TaskId::new());
        let mut p = Pool::new("jobs/hpc1/alice", 5);
        p.grant(holder(&a, Some(Phase::EXECUTE), 1), None).unwrap();
        p.grant(holder(&a, Some(Phase::EPILOG), 1), None).unwrap();
        let short = p.grant(holder(&b, Some(Phase::EXECUTE), 1), Some(1)).unwrap_err();
        assert_eq!(short.describe(), "alice has 2 of 1 jobs on cluster hpc1 (this task needs 1 more)");
        assert_eq!(p.holders.len(), 2);
    }

    #[test]
    fn what_a_task_waits_for_reads_plainly() {
        let s = |pool: &str, wanted, in_use, count| Short { pool: pool.into(), wanted, in_use, count }.describe();
        assert_eq!(s("licence/maya", 1, 20, 20), "1 maya licence: 20 of 20 in use");
        assert_eq!(s("licence/hpc1/fluent", 4, 98, 100), "4 fluent licences: 98 of 100 in use");
        assert_eq!(s("tasks/hpc1/bob", 1, 5, 5), "bob has 5 of 5 live tasks on cluster hpc1");
    }

    #[test]
    fn the_queue_runs_by_priority_then_age() {
        let t0 = OffsetDateTime::UNIX_EPOCH;
        let t1 = t0 + time::Duration::seconds(1);
        let (a, b, c) = (TaskId::new(), TaskId::new(), TaskId::new());
        let mut q = [(0, t1, &a), (5, t1, &b), (0, t0, &c)];
        q.sort_by(|x, y| queue_order(*x, *y));
        assert_eq!(q.iter().map(|x| *x.2).collect::<Vec<_>>(), vec![b, c, a]);
    }

    #[test]
    fn amounts_read_plainly() {
        assert_eq!(amount_of("licence/maya", 2), "2 maya licences");
        assert_eq!(amount_of("licence/hpc1/fluent", 1), "1 fluent licence");
        assert_eq!(amount_of("jobs/hpc1/alice", 1), "1 of alice's job slots on cluster hpc1");
        assert_eq!(amount_of("tasks/hpc1/alice", 1), "one of alice's live-task slots on cluster hpc1");
    }

    #[test]
    fn notes_keep_the_newest() {
        let mut p = Pool::new("licence/maya", 1);
        for i in 0..(MAX_POOL_NOTES + 5) {
            p.note(OffsetDateTime::UNIX_EPOCH, "root", format!("n{i}"));
        }
        assert_eq!(p.notes.len(), MAX_POOL_NOTES);
        assert_eq!(p.notes.last().unwrap().message, format!("n{}", MAX_POOL_NOTES + 4));
    }
}

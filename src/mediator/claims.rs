//! Who submits a task: a claim kept in the task itself ([`crate::model::task::SubmitClaim`]),
//! taken by compare-and-swap before anything touches the cluster, renewed while the
//! attempt works, released by the attempt's last write. Every write an attempt makes
//! checks first that it still holds the claim with its fence, so an owner that lost it
//! (paused, cut off) writes nothing; the scripts it runs on the cluster carry the fence
//! too ([`crate::scheduler::common::fenced`]), so it submits nothing either.
//!
//! A claim lasts [`CLAIM_LEASE`]; a server killed outright leaves its claims to lapse,
//! and the monitor of another replica takes the task over after at most that long.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use time::OffsetDateTime;

use super::replicas::RENEW_EVERY;
use super::transitions::{self, Refused};
use super::{Mediator, now};
use crate::model::{Task, TaskId};
use crate::store::StoreError;

/// How long a submission claim lasts unless renewed.
pub const CLAIM_LEASE: Duration = Duration::from_secs(15);

/// When a claim taken or renewed at `at` lapses.
pub fn claim_until(at: OffsetDateTime) -> OffsetDateTime {
    at + time::Duration::try_from(CLAIM_LEASE).expect("a short duration")
}

/// A claim this server holds for one attempt.
#[derive(Debug)]
pub(crate) struct Held {
    /// Its fence.
    pub fence: u64,
    /// Whether a write already released it.
    released: AtomicBool,
}

impl Held {
    pub(crate) fn new(fence: u64) -> Self {
        Self { fence, released: AtomicBool::new(false) }
    }
}

/// What a write under a claim does with the claim besides `change`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Then {
    /// Keeps it (renewed if a third of its lease has gone).
    Keep,
    /// Releases it: the attempt's last write.
    Release,
}

/// Whether `after` differs from `before` only in its claim (nothing to announce).
pub(crate) fn claim_only(before: &Task, after: &Task) -> bool {
    before.claim != after.claim
        && Task {
            claim: before.claim.clone(),
            updated_at: before.updated_at,
            revision: before.revision,
            ..after.clone()
        } == *before
}

impl Mediator {
    /// Claims the submission of the task `read` (a state just read) for this server.
    /// `None` if another server holds it, or the task is gone.
    pub(crate) async fn claim_submission(&self, read: Task) -> Result<Option<(Task, Held)>, StoreError> {
        let id = read.id;
        let mut fence = 0;
        let claimed = self
            .change_task_from(&id, Some(read), |t| {
                let at = now();
                fence = transitions::claim(t, &self.instance, claim_until(at), at)?;
                Ok(())
            })
            .await?;
        match claimed {
            Ok(t) => Ok(Some((t, Held::new(fence)))),
            Err((Refused(why), _)) => {
                tracing::debug!(task = %id, why, "submission not claimed");
                Ok(None)
            }
        }
    }

    /// [`Mediator::change_task_from`] for an attempt holding `held`: refused unless this
    /// server still holds the claim with that fence; `then` says what becomes of it.
    pub(crate) async fn change_held(
        &self,
        id: &TaskId,
        known: Option<Task>,
        held: &Held,
        then: Then,
        mut change: impl FnMut(&mut Task) -> Result<(), Refused>,
    ) -> Result<Result<Task, (Refused, Task)>, StoreError> {
        let changed = self
            .change_task_from(id, known, |t| {
                transitions::check_claim(t, &self.instance, held.fence)?;
                change(t)?;
                let at = now();
                match then {
                    Then::Release => transitions::release_claim(t, &self.instance, held.fence, at),
                    Then::Keep => {
                        let left = t.claim.as_ref().map_or(time::Duration::ZERO, |c| c.expires_at - at);
                        if left < time::Duration::try_from(CLAIM_LEASE - RENEW_EVERY).expect("short") {
                            transitions::renew_claim(t, &self.instance, held.fence, claim_until(at));
                        }
                    }
                }
                Ok(())
            })
            .await?;
        if then == Then::Release && changed.is_ok() {
            held.released.store(true, Ordering::Relaxed);
        }
        if let Err((Refused(why), _)) = &changed {
            tracing::info!(task = %id, why, "not written: this attempt's claim or starting state is gone");
        }
        Ok(changed)
    }

    /// [`Self::change_held`] for a change that never refuses, as the attempt's last write.
    pub(crate) async fn finish_held(
        &self,
        id: &TaskId,
        held: &Held,
        mut change: impl FnMut(&mut Task),
    ) -> Result<(), StoreError> {
        self.change_held(id, None, held, Then::Release, |t| {
            change(t);
            Ok(())
        })
        .await
        .map(|_| ())
    }

    /// Runs `work` (a round trip to the cluster) while keeping the claim renewed.
    pub(crate) async fn holding<T>(&self, id: &TaskId, held: &Held, work: impl Future<Output = T>) -> T {
        let mut work = std::pin::pin!(work);
        loop {
            tokio::select! {
                out = &mut work => return out,
                _ = tokio::time::sleep(RENEW_EVERY) => {
                    match self.change_held(id, None, held, Then::Keep, |_| Ok(())).await {
                        Ok(Ok(_)) => {}
                        Ok(Err(_)) => tracing::warn!(task = %id, "another replica took this submission over; the cluster's fence refuses what this one sends"),
                        Err(e) => tracing::warn!(task = %id, error = %e, "could not renew a submission claim"),
                    }
                }
            }
        }
    }

    /// Releases whatever claim this server holds on task `id`, whichever attempt took
    /// it (a server handing its work over as it stops); whether it held one. The attempt
    /// itself, if it goes on, is refused at its next write and by the cluster's fence.
    pub(crate) async fn give_up_claim(&self, id: &TaskId) -> Result<bool, StoreError> {
        let released = self
            .change_task_from(id, None, |t| {
                let at = now();
                match t.claim.as_ref() {
                    Some(c) if c.holder == self.instance && c.held(at) => {
                        let fence = c.fence;
                        transitions::release_claim(t, &self.instance, fence, at);
                        Ok(())
                    }
                    _ => Err(Refused("not held by this server".into())),
                }
            })
            .await?;
        Ok(released.is_ok())
    }

    /// Ends an attempt: releases its claim if no write did.
    pub(crate) async fn end_attempt(&self, id: &TaskId, held: &Held) {
        if held.released.load(Ordering::Relaxed) {
            return;
        }
        if let Err(e) = self.finish_held(id, held, |_| {}).await {
            tracing::warn!(task = %id, error = %e, "could not release a submission claim; it lapses by itself");
        }
    }
}

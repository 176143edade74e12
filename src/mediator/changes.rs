//! News of the other replicas' changes: where the store pushes changes to tasks
//! (MongoDB change streams), each replica follows them and announces those it did not
//! make itself to its own event streams, so a status page connected to any replica
//! sees a change made through another within moments. Where the store cannot push
//! (a MongoDB without change streams), the streams fall back to reading the store
//! every 5 s; the embedded store serves one server, which hears its own changes.
//! The change stream is open only while event streams are open on this replica.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt as _;

use super::{Mediator, TaskNews};
use crate::model::TaskId;

/// How long to wait before following the store's changes again after it failed.
const RETRY_EVERY: Duration = Duration::from_secs(5);

/// How often to look whether any event stream is open here.
const LISTENER_CHECK: Duration = Duration::from_millis(250);

/// How long the change stream stays open with no event stream open.
const IDLE_CLOSE: Duration = Duration::from_secs(30);

/// How many tasks' revisions [`Mediator::heard`] remembers before it starts over.
const HEARD_MAX: usize = 50_000;

impl Mediator {
    /// Remembers that revision `revision` of task `id` is known here.
    pub(super) fn heard(&self, id: TaskId, revision: u64) {
        let mut heard = self.heard.lock().unwrap_or_else(|p| p.into_inner());
        if heard.len() >= HEARD_MAX {
            heard.clear();
        }
        let known = heard.entry(id).or_insert(revision);
        *known = (*known).max(revision);
    }

    /// Whether revision `revision` of task `id` (or a newer one) is known here.
    fn knows(&self, id: &TaskId, revision: u64) -> bool {
        self.heard.lock().unwrap_or_else(|p| p.into_inner()).get(id).is_some_and(|r| *r >= revision)
    }

    /// Follows the store's changes to tasks until `shutdown`, while event streams are
    /// open here (a change stream costs the store work on every write, so it is closed
    /// once none has been open for [`IDLE_CLOSE`]), announcing those made elsewhere;
    /// reopens after a failure.
    pub(super) async fn follow_changes(self: Arc<Self>, mut shutdown: tokio::sync::watch::Receiver<bool>) {
        if !self.store.serves_many() {
            return; // one server: it hears its own changes
        }
        let mut said_failed = false;
        loop {
            // Wait for a listener.
            while self.metrics.streams_open() == 0 {
                tokio::select! {
                    () = tokio::time::sleep(LISTENER_CHECK) => {}
                    _ = shutdown.changed() => return,
                }
            }
            match self.store.task_changes().await {
                Ok(None) => return,
                Ok(Some(mut changes)) => {
                    tracing::debug!("following the store's changes to tasks (a change stream)");
                    said_failed = false;
                    let mut idle_since = None;
                    let mut check = tokio::time::interval(LISTENER_CHECK);
                    let idle = loop {
                        tokio::select! {
                            next = changes.next() => match next {
                                Some(Ok((id, revision))) => self.on_change(id, revision).await,
                                Some(Err(e)) => {
                                    tracing::warn!(error = %e, "the store's change stream broke; streams read the store every 5 s until it is back");
                                    break false;
                                }
                                None => break false,
                            },
                            _ = check.tick() => {
                                if self.metrics.streams_open() > 0 {
                                    idle_since = None;
                                } else if idle_since.get_or_insert_with(std::time::Instant::now).elapsed() >= IDLE_CLOSE {
                                    tracing::debug!("no event stream open: the change stream is closed");
                                    break true;
                                }
                            }
                            _ = shutdown.changed() => return,
                        }
                    };
                    if idle {
                        continue;
                    }
                }
                Err(e) if !said_failed => {
                    said_failed = true;
                    tracing::warn!(
                        error = %e,
                        "cannot follow the store's changes to tasks; event streams see other replicas' changes by reading the store every 5 s"
                    );
                }
                Err(e) => tracing::debug!(error = %e, "still cannot follow the store's changes"),
            }
            tokio::select! {
                () = tokio::time::sleep(RETRY_EVERY) => {}
                _ = shutdown.changed() => return,
            }
        }
    }

    /// A change to task `id` that wrote `revision`: announced, as stored, unless this
    /// server made it (or heard of it) already, or no event stream is open here (a
    /// `?wait=submitted` waits only for tasks this server submits itself).
    async fn on_change(&self, id: TaskId, revision: u64) {
        if self.metrics.streams_open() == 0 || self.knows(&id, revision) {
            return;
        }
        match self.store.task_state(&id).await {
            Ok(Some(task)) if task.revision >= revision => {
                self.heard(id, task.revision);
                let _ = self.updates.send(TaskNews { id, task: Arc::new(task), events: None });
            }
            Ok(_) => {}
            Err(e) => tracing::debug!(task = %id, error = %e, "could not read a task another replica changed"),
        }
    }
}

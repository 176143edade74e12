//! The site's pools (licences, users' shares of clusters) kept in the store, the same
//! for both stores: each pool is one record changed only by compare-and-swap on its
//! version ([`crate::store::Store::put_pool`]), so servers sharing a store never hand
//! out more than a pool has. A task needing several pools takes them one by one in key
//! order and gives back what it took if one is short; a server dying in between
//! leaves holders of a task that is still queued, which its next pass holds on to
//! (a grant is per task and phase, so taking it again changes nothing) and the sweep
//! of the mediator frees once the task has ended.

use time::OffsetDateTime;

use super::{Store, StoreError};
use crate::model::queue::{Holder, Need, Pool, Short};
use crate::model::{Phase, TaskId, UserName};

/// How often a write may lose a race before the caller is told to try later.
const TRIES: usize = 32;

/// Changes pool `key` by `change` (which decides on the pool as stored, or on
/// `fresh` when there is none), by compare-and-swap, deciding again after a lost race.
/// `change` returns what to answer, and whether to write.
async fn change<S: Store + ?Sized, T>(
    store: &S,
    key: &str,
    fresh: impl Fn() -> Option<Pool>,
    mut change: impl FnMut(&mut Pool) -> (T, bool),
) -> Result<Option<T>, StoreError> {
    for attempt in 0..TRIES {
        let found = store.pool(key).await?;
        let expected = found.as_ref().map(|p| p.version);
        let Some(mut pool) = found.or_else(&fresh) else { return Ok(None) };
        let (answer, write) = change(&mut pool);
        if !write {
            return Ok(Some(answer));
        }
        pool.version = expected.map_or(1, |v| v + 1);
        if store.put_pool(&pool, expected).await? {
            return Ok(Some(answer));
        }
        tokio::time::sleep(std::time::Duration::from_millis(2 * (attempt as u64 + 1))).await;
    }
    Err(StoreError::Conflict(format!("pool `{key}` keeps changing; try again")))
}

/// Grants every need of `task` (owned by `owner`), or none: `Ok(Err(short))` names
/// the first pool that is short, and what this call took is given back. Needs held
/// already stay held. A site-wide pool that does not exist is short of everything.
pub async fn claim<S: Store + ?Sized>(
    store: &S,
    task: &TaskId,
    owner: &UserName,
    needs: &[Need],
    at: OffsetDateTime,
) -> Result<Result<(), Short>, StoreError> {
    let mut needs: Vec<&Need> = needs.iter().collect();
    needs.sort_by(|a, b| (&a.pool, a.phase).cmp(&(&b.pool, b.phase)));
    let mut taken: Vec<&Need> = Vec::new();
    for need in needs {
        let holder = Holder { task: *task, phase: need.phase, owner: owner.clone(), amount: need.amount, since: at };
        let outcome = change(
            store,
            &need.pool,
            || need.count.map(|c| Pool::new(&need.pool, c)),
            |pool| match pool.grant(holder.clone(), need.count) {
                Ok(granted) => (Ok(granted), granted),
                Err(short) => (Err(short), false),
            },
        )
        .await;
        let short = match outcome {
            Ok(Some(Ok(true))) => {
                taken.push(need);
                continue;
            }
            Ok(Some(Ok(false))) => continue,
            Ok(Some(Err(short))) => short,
            Ok(None) => Short { pool: need.pool.clone(), wanted: need.amount, in_use: 0, count: 0 },
            Err(e) => {
                give_back(store, task, &taken).await;
                return Err(e);
            }
        };
        give_back(store, task, &taken).await;
        return Ok(Err(short));
    }
    Ok(Ok(()))
}

async fn give_back<S: Store + ?Sized>(store: &S, task: &TaskId, taken: &[&Need]) {
    for need in taken {
        if let Err(e) = release(store, &need.pool, task, need.phase).await {
            tracing::warn!(task = %task, pool = need.pool, error = %e, "could not give back a grant; the sweep frees it once the task has ended");
        }
    }
}

/// Takes back what `task` holds of `pool` for `phase`; what it held.
pub async fn release<S: Store + ?Sized>(
    store: &S,
    pool: &str,
    task: &TaskId,
    phase: Option<Phase>,
) -> Result<Option<Holder>, StoreError> {
    let out = change(
        store,
        pool,
        || None,
        |p| {
            let h = p.release(task, phase);
            let write = h.is_some();
            (h, write)
        },
    )
    .await?;
    Ok(out.flatten())
}

/// Takes back by hand what `task` holds of `pool` (for `phase`, or everything it
/// holds there), noting who did it on the pool; the holders taken back.
pub async fn release_by_hand<S: Store + ?Sized>(
    store: &S,
    pool: &str,
    task: &TaskId,
    phase: Option<Option<Phase>>,
    by: &str,
    at: OffsetDateTime,
) -> Result<Vec<Holder>, StoreError> {
    let out = change(
        store,
        pool,
        || None,
        |p| {
            let mut gone = Vec::new();
            p.holders.retain(|h| {
                let hit = h.task == *task && phase.is_none_or(|ph| h.phase == ph);
                if hit {
                    gone.push(h.clone());
                }
                !hit
            });
            for h in &gone {
                let of = h.phase.map_or_else(|| "the task".to_owned(), |p| format!("phase {p}"));
                p.note(at, by, format!("released {} held by task {} ({of}) by hand", h.amount, h.task));
            }
            let write = !gone.is_empty();
            (gone, write)
        },
    )
    .await?;
    Ok(out.unwrap_or_default())
}

/// Sets the size of pool `key` (creating it), noting who did it; the pool as it now is.
pub async fn set_count<S: Store + ?Sized>(
    store: &S,
    key: &str,
    count: u32,
    by: &str,
    at: OffsetDateTime,
) -> Result<Pool, StoreError> {
    let out = change(
        store,
        key,
        || Some(Pool::new(key, 0)),
        |p| {
            let write = p.count != count || p.version == 0;
            if p.count != count {
                p.note(at, by, format!("count {} → {count}", p.count));
            }
            p.count = count;
            // As it will be stored: a write bumps the version.
            let mut stored = p.clone();
            stored.version += u64::from(write);
            (stored, write)
        },
    )
    .await?;
    Ok(out.expect("a fresh pool is given"))
}

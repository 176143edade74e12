//! This server among the servers sharing its store (its replicas): each holds the
//! lease `replica/<id>` while it runs, renewed every [`RENEW_EVERY`] for
//! [`REPLICA_LEASE`] and released when it stops, so who is alive is read from the
//! store. The holder is the replica's *instance*, `<id>#<random>`, new with every
//! process: a server started under the ID of a live one cannot renew that lease, only
//! wait for it to lapse, so two live servers never share an ID.
//!
//! The replicas alive share out the watching of jobs: each (cluster, user) is watched
//! by one of them, chosen by rendezvous hashing ([`watcher_of`]) over the alive ones.
//! Each re-reads who is alive at every renewal, and drops a replica the moment its
//! lease lapses, so a dead replica's groups are watched by another within one lease
//! period and a renewal.

use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use time::OffsetDateTime;

use super::Mediator;
use crate::store::leases::Lease;
use crate::store::{Store, StoreError};

/// How long a replica's lease lasts unless renewed: a server killed outright is shown
/// gone after at most this long.
pub const REPLICA_LEASE: Duration = Duration::from_secs(15);

/// How often a replica renews its lease.
pub const RENEW_EVERY: Duration = Duration::from_secs(5);

/// The lease key of replica `id`.
pub fn key(id: &str) -> String {
    format!("replica/{id}")
}

/// Whether `id` can name a replica: 1 to 64 of `A-Z a-z 0-9 . _ -`.
pub fn check_id(id: &str) -> Result<(), String> {
    let ok = (1..=64).contains(&id.len())
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(format!("`{}` cannot be a replica ID: use 1 to 64 letters, digits, `.`, `_` or `-`", id.escape_debug()))
    }
}

/// A holder name for one process of replica `id`: `<id>#<random>`.
pub fn new_instance(id: &str) -> String {
    format!("{id}#{}", uuid::Uuid::new_v4().simple())
}

/// The replica ID in a holder name (`<id>#<random>`).
pub fn replica_of(holder: &str) -> &str {
    holder.split_once('#').map_or(holder, |(id, _)| id)
}

/// The default replica ID: this host's name and the server's process ID.
pub fn default_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let host: String =
        host.trim().chars().filter(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')).take(40).collect();
    let host = if host.is_empty() { "hpcforge".to_owned() } else { host };
    format!("{host}-{}", std::process::id())
}

/// Which of `alive` (replica IDs) watches `user`'s jobs on `cluster`: the one with the
/// highest hash of (replica, cluster, user). Every replica computes the same answer
/// from the same list, and a replica joining or leaving moves only its own share.
pub fn watcher_of<'a>(alive: &[&'a str], cluster: &str, user: &str) -> Option<&'a str> {
    alive.iter().copied().max_by_key(|r| (rendezvous(r, cluster, user), *r))
}

/// FNV-1a over the three names (with separators), finished with a 64-bit mixer: the
/// same on every replica and every build, unlike the standard library's hasher.
fn rendezvous(replica: &str, cluster: &str, user: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for part in [replica, cluster, user] {
        for b in part.bytes().chain(std::iter::once(0xff)) {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h
}

fn until(at: OffsetDateTime) -> OffsetDateTime {
    at + time::Duration::try_from(REPLICA_LEASE).expect("a short duration")
}

/// One replica, as `GET /api/v1/replicas` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct ReplicaInfo {
    /// Its replica ID.
    pub id: String,
    /// Whether its lease holds: it renewed within the last 15 s and has not stopped.
    pub alive: bool,
    /// When its lease lapses (or lapsed) unless renewed.
    #[serde(with = "time::serde::rfc3339")]
    pub lease_expires_at: OffsetDateTime,
    /// How many times the replica ID was claimed afresh (each start).
    pub starts: u64,
    /// The other leases it holds now, by key.
    pub holds: Vec<String>,
}

/// Every replica the store has seen, alive or not, by ID, with what each holds at `at`.
pub async fn list(store: &dyn Store, at: OffsetDateTime) -> Result<Vec<ReplicaInfo>, StoreError> {
    let all = store.leases("").await?;
    // What each replica holds, in one pass over the records (other than replica ones).
    let mut holds: std::collections::HashMap<&str, Vec<String>> = std::collections::HashMap::new();
    for l in all.iter().filter(|l| l.holds_at(at) && !l.key.starts_with("replica/")) {
        holds.entry(replica_of(&l.holder)).or_default().push(l.key.clone());
    }
    Ok(all
        .iter()
        .filter_map(|l| l.key.strip_prefix("replica/").map(|id| (id, l)))
        .map(|(id, l)| ReplicaInfo {
            id: id.to_owned(),
            alive: replica_of(&l.holder) == id && l.holds_at(at),
            lease_expires_at: l.expires_at,
            starts: l.fence,
            holds: holds.remove(id).unwrap_or_default(),
        })
        .collect())
}

impl Mediator {
    /// Claims this replica's lease. While another server holds that ID it waits up to
    /// one lease period (a server killed outright leaves its lease to lapse), and is
    /// refused if the lease is still being renewed after that. With the store down it
    /// returns at once; the lease is then claimed when the store answers.
    pub async fn join(&self) -> anyhow::Result<()> {
        let id = &self.cfg.replica;
        let deadline = tokio::time::Instant::now() + REPLICA_LEASE + Duration::from_secs(2);
        let lease = loop {
            match self.claim_own().await {
                Ok(Some(lease)) => break lease,
                // The server serves while its store is down (`/readyz` says so); it
                // joins when the store answers (`keep_lease`).
                Err(e @ StoreError::Unavailable { .. }) => {
                    tracing::warn!(replica = %id, error = %e, "the store is not reachable; this replica joins when it is");
                    return Ok(());
                }
                Err(e) => return Err(e.into()),
                Ok(None) if tokio::time::Instant::now() >= deadline => anyhow::bail!(
                    "another server is running as replica `{id}` on this store (its lease is held and renewed): give \
                     each server its own replica ID (--replica-id, HPCFORGE_REPLICA_ID or `replica_id` in the config \
                     file), or stop that one first"
                ),
                Ok(None) => {
                    tracing::info!(replica = %id, "replica ID in use: waiting for its lease to lapse");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        };
        tracing::info!(replica = %id, starts = lease.fence, "joined as a replica");
        *self.replica_lease.lock().unwrap_or_else(|p| p.into_inner()) = Some(lease);
        self.refresh_peers().await;
        Ok(())
    }

    /// Claims (or renews) this replica's lease for one more period, as of now.
    async fn claim_own(&self) -> Result<Option<Lease>, StoreError> {
        let at = OffsetDateTime::now_utc();
        self.store.claim_lease(&key(&self.cfg.replica), &self.instance, until(at), at).await
    }

    /// This replica's ID.
    pub fn replica_id(&self) -> &str {
        &self.cfg.replica
    }

    /// Who holds this server's leases (`<replica id>#<random>`).
    pub fn lease_holder(&self) -> &str {
        &self.instance
    }

    /// The installation's site ID (task URIs).
    pub fn site(&self) -> &crate::model::SiteId {
        &self.cfg.site
    }

    /// Reads from the store which replicas are alive (for [`Self::watches`]).
    async fn refresh_peers(&self) {
        let at = OffsetDateTime::now_utc();
        match self.store.leases("replica/").await {
            Ok(all) => {
                let alive = all
                    .into_iter()
                    .filter_map(|l| {
                        let id = l.key.strip_prefix("replica/")?;
                        (replica_of(&l.holder) == id && l.holds_at(at)).then(|| (id.to_owned(), l.expires_at))
                    })
                    .collect();
                *self.peers.lock().unwrap_or_else(|p| p.into_inner()) = alive;
            }
            Err(e) => tracing::debug!(error = %e, "could not read which replicas are alive"),
        }
        self.clusters.refresh_pauses().await;
    }

    /// Whether this replica watches `user`'s jobs on `cluster` now: it does if it is
    /// [`watcher_of`] them among the replicas alive (itself included, always).
    pub fn watches(&self, cluster: &str, user: &str) -> bool {
        self.watches_among(&self.alive_replicas(), cluster, user)
    }

    /// The replicas alive now, as last read, this one included (always).
    pub fn alive_replicas(&self) -> Vec<String> {
        let at = OffsetDateTime::now_utc();
        let peers = self.peers.lock().unwrap_or_else(|p| p.into_inner());
        let mut alive: Vec<String> = peers.iter().filter(|(_, until)| *until > at).map(|(id, _)| id.clone()).collect();
        if !alive.contains(&self.cfg.replica) {
            alive.push(self.cfg.replica.clone());
        }
        alive
    }

    /// [`Self::watches`] among `alive` (from [`Self::alive_replicas`], read once for
    /// a whole tick).
    pub fn watches_among(&self, alive: &[String], cluster: &str, user: &str) -> bool {
        let alive: Vec<&str> = alive.iter().map(String::as_str).collect();
        watcher_of(&alive, cluster, user) == Some(self.cfg.replica.as_str())
    }

    /// Renews the lease every [`RENEW_EVERY`] until `shutdown`, then releases it.
    pub(super) async fn keep_lease(self: Arc<Self>, mut shutdown: tokio::sync::watch::Receiver<bool>) {
        let id = self.cfg.replica.clone();
        loop {
            tokio::select! {
                _ = tokio::time::sleep(RENEW_EVERY) => {}
                _ = shutdown.changed() => break,
            }
            match self.claim_own().await {
                Ok(Some(lease)) => {
                    let mut held = self.replica_lease.lock().unwrap_or_else(|p| p.into_inner());
                    if held.as_ref().is_some_and(|h| h.fence != lease.fence) {
                        tracing::warn!(replica = %id, "this replica's lease lapsed and was taken again");
                    }
                    *held = Some(lease);
                }
                Ok(None) => tracing::error!(replica = %id, "another server now runs as this replica"),
                Err(e) => tracing::warn!(replica = %id, error = %e, "could not renew this replica's lease"),
            }
            self.refresh_peers().await;
        }
        let held: Option<Lease> = self.replica_lease.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(lease) = held
            && let Err(e) = self.store.release_lease(&lease, OffsetDateTime::now_utc()).await
        {
            tracing::warn!(replica = %id, error = %e, "could not release this replica's lease; it lapses by itself");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_group_has_one_watcher_and_a_leaving_replica_moves_only_its_own_groups() {
        let three = ["login-1", "login-2", "login-3"];
        let groups: Vec<(String, String)> =
            (0..300).map(|i| (format!("cluster-{}", i % 3), format!("user{i}"))).collect();
        let mut share = std::collections::BTreeMap::new();
        for (c, u) in &groups {
            let w = watcher_of(&three, c, u).unwrap();
            assert_eq!(Some(w), watcher_of(&["login-3", "login-1", "login-2"], c, u), "order does not matter");
            *share.entry(w).or_insert(0) += 1;
        }
        for r in three {
            assert!((60..=140).contains(&share[r]), "{r} watches {} of 300 groups: {share:?}", share[r]);
        }
        // login-2 leaves: its groups spread over the others, nobody else's move.
        for (c, u) in &groups {
            let before = watcher_of(&three, c, u).unwrap();
            let after = watcher_of(&["login-1", "login-3"], c, u).unwrap();
            if before != "login-2" {
                assert_eq!(before, after, "{c}/{u} moved though its watcher stayed");
            }
        }
        assert_eq!(watcher_of(&[], "c", "u"), None);
        assert_eq!(watcher_of(&["solo"], "c", "u"), Some("solo"));
    }
}

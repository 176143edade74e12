//! Cluster access: how the mediator reaches a (cluster, user) — over SSH with the
//! user's registered key, or as a local process of the server's own user — and what
//! it remembers about clusters: users' home directories, and the pause of a cluster
//! that keeps failing.
//!
//! Pauses are kept by this server process, in memory: another server sharing the
//! store keeps its own count, and a restart forgets them. Registered keys are read
//! from the store at most every [`CREDENTIAL_TTL`] per (cluster, user) (a key replaced
//! through this server is read again at once; through another, within the TTL).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use time::OffsetDateTime;

use super::MediatorError;
use super::remote::{self, RemoteError, RemoteOutput};
use super::ssh::{SshLimits, SshPool, SshTarget};
use crate::model::{ClusterSpec, Problems, SchedulerKind, UserName};
use crate::secrets::{ServerKey, credential_purpose};
use crate::store::Store;

/// How long a sealed key read from the store is used before it is read again.
pub const CREDENTIAL_TTL: Duration = Duration::from_secs(30);

/// How to run scripts for one (cluster, user).
pub(crate) enum Exec {
    /// Over SSH, as the user.
    Ssh(SshTarget),
    /// As a local process of the server's own user.
    Local,
}

/// Counts a cluster's consecutive transient failures and pauses it: after
/// `pause_after` of them, for 30 s, doubling with each further failure up to 10 min.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Breaker {
    /// Consecutive failures.
    pub failures: u32,
    /// Until when the cluster is left alone.
    pub paused_until: Option<OffsetDateTime>,
}

impl Breaker {
    /// Counts one failure at `at`; returns the pause it starts, if it starts one.
    pub fn fail(&mut self, pause_after: u32, at: OffsetDateTime) -> Option<Duration> {
        self.failures += 1;
        if self.failures < pause_after {
            return None;
        }
        let secs = (30u64 << (self.failures - pause_after).min(5)).min(600);
        self.paused_until = Some(at + time::Duration::seconds(secs as i64));
        Some(Duration::from_secs(secs))
    }

    /// Whether the cluster is paused at `at`, and until when.
    pub fn paused_at(&self, at: OffsetDateTime) -> Option<OffsetDateTime> {
        self.paused_until.filter(|t| *t > at)
    }
}

/// Cluster access, shared by the submitter, the monitor and the API's requests.
pub struct Clusters {
    store: Arc<dyn Store>,
    key: Arc<ServerKey>,
    ssh: SshPool,
    /// Longest a small round trip (home directory) may take.
    query_timeout: Duration,
    /// Consecutive transient failures after which a cluster is paused.
    pause_after: u32,
    breakers: Mutex<HashMap<String, Breaker>>,
    /// Who holds this server's leases (its pauses are leases `pause/<cluster>`).
    holder: String,
    /// Pauses of clusters as last read from the store, whoever started them.
    shared_pauses: Mutex<HashMap<String, OffsetDateTime>>,
    /// (cluster, user) → home directory on the cluster.
    homes: Mutex<HashMap<(String, String), String>>,
    /// (cluster, user) → the sealed key and when it was read.
    credentials: Mutex<HashMap<(String, String), (std::time::Instant, crate::store::StoredCredential)>>,
    /// The Unix user this server runs as: the only user a `local` cluster runs jobs as.
    server_user: Option<UserName>,
}

impl std::fmt::Debug for Clusters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Clusters").field("pause_after", &self.pause_after).finish_non_exhaustive()
    }
}

/// The server process's own Unix user name.
pub fn current_user() -> Option<UserName> {
    let out = std::process::Command::new("id").arg("-un").output().ok()?;
    UserName::parse(String::from_utf8_lossy(&out.stdout).trim()).ok()
}

impl Clusters {
    /// Access through `store` (for credentials), opening keys with `key`.
    pub fn new(
        store: Arc<dyn Store>,
        key: Arc<ServerKey>,
        ssh: SshLimits,
        query_timeout: Duration,
        pause_after: u32,
        holder: String,
    ) -> Self {
        Self {
            store,
            key,
            ssh: SshPool::new(ssh),
            query_timeout,
            pause_after,
            breakers: Mutex::default(),
            holder,
            shared_pauses: Mutex::default(),
            homes: Mutex::default(),
            credentials: Mutex::default(),
            server_user: current_user(),
        }
    }

    /// The server key (for sealing credentials).
    pub fn key(&self) -> &ServerKey {
        &self.key
    }

    /// SSH connections currently open.
    pub fn open_connections(&self) -> usize {
        self.ssh.open_connections()
    }

    /// How to reach `spec` as `user`: the user's SSH key for that cluster, opened, or
    /// the local process (for the server's own user only).
    pub(crate) async fn exec_for(&self, spec: &ClusterSpec, user: &UserName) -> Result<Exec, RemoteError> {
        if spec.scheduler == SchedulerKind::Local {
            return match &self.server_user {
                Some(me) if me == user => Ok(Exec::Local),
                Some(me) => Err(RemoteError::Refused(format!(
                    "cluster `{}` runs jobs as `{me}`, the server's own user, so it takes tasks of `{me}` only; \
                     `{user}`'s tasks need a cluster reached over SSH",
                    spec.name
                ))),
                None => Err(RemoteError::Refused("the server cannot tell which user it runs as".into())),
            };
        }
        let (Some(host), Some(host_key)) = (spec.host.clone(), spec.host_key.clone()) else {
            return Err(RemoteError::Refused(format!("cluster `{}` has no host or host key", spec.name)));
        };
        let cred = self
            .credential(user, &spec.name)
            .await
            .map_err(|e| RemoteError::Unreachable(format!("reading the credential: {e}")))?
            .ok_or_else(|| {
                RemoteError::Refused(format!(
                    "no SSH key is registered for `{user}` on cluster `{}`; an admin registers one with \
                     `hpcforge credential add --user {user} --cluster {} --key-file ...`",
                    spec.name, spec.name
                ))
            })?;
        let key = self.key.open(&credential_purpose(user.as_str(), spec.name.as_str()), &cred.sealed).map_err(|e| {
            RemoteError::Refused(format!("the SSH key of `{user}` on `{}` cannot be opened: {e}", spec.name))
        })?;
        let text = String::from_utf8(key.to_vec())
            .map_err(|_| RemoteError::Refused("the stored SSH key is not text".into()))?;
        Ok(Exec::Ssh(SshTarget {
            cluster: spec.name.to_string(),
            host,
            port: spec.port,
            host_key,
            user: user.clone(),
            private_key: Arc::new(zeroize::Zeroizing::new(text)),
        }))
    }

    /// The sealed key of `user` on `cluster`, from the store or read less than
    /// [`CREDENTIAL_TTL`] ago.
    async fn credential(
        &self,
        user: &UserName,
        cluster: &crate::model::ClusterName,
    ) -> Result<Option<crate::store::StoredCredential>, crate::store::StoreError> {
        let key = (cluster.to_string(), user.to_string());
        if let Some((at, c)) = self.credentials.lock().unwrap_or_else(|p| p.into_inner()).get(&key)
            && at.elapsed() < CREDENTIAL_TTL
        {
            return Ok(Some(c.clone()));
        }
        let found = self.store.get_credential(user, cluster).await?;
        if let Some(c) = &found {
            self.credentials
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(key, (std::time::Instant::now(), c.clone()));
        }
        Ok(found)
    }

    /// Forgets the key of `user` on `cluster` (replaced or removed).
    pub fn forget_credential(&self, user: &UserName, cluster: &crate::model::ClusterName) {
        self.credentials.lock().unwrap_or_else(|p| p.into_inner()).remove(&(cluster.to_string(), user.to_string()));
    }

    /// Runs `script` there, within `timeout`.
    pub(crate) async fn run(&self, exec: &Exec, script: &str, timeout: Duration) -> Result<RemoteOutput, RemoteError> {
        match exec {
            Exec::Local => remote::run_local(script, timeout).await,
            Exec::Ssh(t) => self.ssh.run(t, script, timeout).await,
        }
    }

    /// Runs `script` there, its answer streamed ([`super::stream`]); `idle` bounds
    /// each wait for data.
    pub(crate) async fn stream(
        &self,
        exec: &Exec,
        script: &str,
        idle: Duration,
    ) -> Result<super::stream::RemoteStream, RemoteError> {
        match exec {
            Exec::Local => super::stream::local_stream(script).await,
            Exec::Ssh(t) => super::stream::ssh_stream(t, self.ssh.limits(), script, idle).await,
        }
    }

    /// The user's home on the cluster (cached): what `~/` in a run-directory base means.
    pub(crate) async fn home(&self, spec: &ClusterSpec, user: &UserName) -> Result<String, MediatorError> {
        let key = (spec.name.to_string(), user.to_string());
        if let Some(h) = self.homes.lock().unwrap_or_else(|p| p.into_inner()).get(&key) {
            return Ok(h.clone());
        }
        let home = if spec.scheduler == SchedulerKind::Local {
            self.exec_for(spec, user).await.map_err(|e| MediatorError::Invalid(refusal(&e)))?;
            std::env::var("HOME").map_err(|_| MediatorError::Unavailable("the server has no HOME".into()))?
        } else {
            let exec = self.exec_for(spec, user).await.map_err(|e| match e {
                RemoteError::Refused(_) => MediatorError::Invalid(refusal(&e)),
                other => MediatorError::Unavailable(other.to_string()),
            })?;
            let out = self.run(&exec, "printf '%s' \"$HOME\"", self.query_timeout).await.map_err(|e| match e {
                RemoteError::Refused(_) => MediatorError::Invalid(refusal(&e)),
                other => MediatorError::Unavailable(format!("cluster `{}` cannot be reached: {other}", spec.name)),
            })?;
            out.body
        };
        let home = home.trim().to_owned();
        if !home.starts_with('/') {
            return Err(MediatorError::Unavailable(format!(
                "`{user}` has no usable home directory on `{}`",
                spec.name
            )));
        }
        self.homes.lock().unwrap_or_else(|p| p.into_inner()).insert(key, home.clone());
        Ok(home)
    }

    /// Until when `cluster` is paused, if it is: by this server's own failures, or by
    /// another replica's, as last read from the store ([`Self::refresh_pauses`]).
    pub fn paused_until(&self, cluster: &str) -> Option<OffsetDateTime> {
        let at = OffsetDateTime::now_utc();
        let own = self.breakers.lock().unwrap_or_else(|p| p.into_inner()).get(cluster).and_then(|b| b.paused_at(at));
        let shared = self.shared_pauses.lock().unwrap_or_else(|p| p.into_inner()).get(cluster).copied();
        own.into_iter().chain(shared.filter(|t| *t > at)).max()
    }

    /// Counts a transient failure of `cluster`. One that pauses the cluster is written
    /// to the store too (a lease `pause/<cluster>` until the pause ends), so every
    /// replica holds off.
    pub fn failed(&self, cluster: &str) {
        let mut all = self.breakers.lock().unwrap_or_else(|p| p.into_inner());
        let b = all.entry(cluster.to_owned()).or_default();
        let at = OffsetDateTime::now_utc();
        if let Some(pause) = b.fail(self.pause_after, at) {
            tracing::warn!(
                cluster,
                failures = b.failures,
                pause_seconds = pause.as_secs(),
                "cluster paused after repeated failures"
            );
            let until = b.paused_until.unwrap_or(at);
            let (store, holder, key) = (self.store.clone(), self.holder.clone(), format!("pause/{cluster}"));
            tokio::spawn(async move {
                match store.claim_lease(&key, &holder, until, at).await {
                    Ok(_) => {} // `None`: another replica's pause holds already
                    Err(e) => tracing::warn!(key, error = %e, "could not tell the other replicas of a pause"),
                }
            });
        }
    }

    /// Reads from the store which clusters are paused, by any replica.
    pub async fn refresh_pauses(&self) {
        let at = OffsetDateTime::now_utc();
        match self.store.leases("pause/").await {
            Ok(all) => {
                let held = all
                    .into_iter()
                    .filter(|l| l.holds_at(at))
                    .filter_map(|l| Some((l.key.strip_prefix("pause/")?.to_owned(), l.expires_at)))
                    .collect();
                *self.shared_pauses.lock().unwrap_or_else(|p| p.into_inner()) = held;
            }
            Err(e) => tracing::debug!(error = %e, "could not read which clusters are paused"),
        }
    }

    /// `cluster` answered: its failure count starts over.
    pub fn ok(&self, cluster: &str) {
        self.breakers.lock().unwrap_or_else(|p| p.into_inner()).remove(cluster);
    }
}

/// A refusal to reach a cluster, as a problem with the task's `/cluster`.
pub(crate) fn refusal(e: &RemoteError) -> Problems {
    let mut p = Problems::default();
    p.push_rule("/cluster", "access", None, e.to_string());
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cluster_is_paused_after_repeated_failures_for_longer_each_time() {
        let t0 = OffsetDateTime::UNIX_EPOCH;
        let mut b = Breaker::default();
        for _ in 0..4 {
            assert_eq!(b.fail(5, t0), None);
        }
        assert_eq!(b.paused_at(t0), None, "not paused before the fifth failure");
        assert_eq!(b.fail(5, t0), Some(Duration::from_secs(30)));
        assert_eq!(b.paused_at(t0 + time::Duration::seconds(29)), Some(t0 + time::Duration::seconds(30)));
        assert_eq!(b.paused_at(t0 + time::Duration::seconds(30)), None, "the pause ends");
        assert_eq!(b.fail(5, t0), Some(Duration::from_secs(60)));
        for _ in 0..10 {
            b.fail(5, t0);
        }
        assert_eq!(b.fail(5, t0), Some(Duration::from_secs(600)), "at most 10 minutes");
    }
}

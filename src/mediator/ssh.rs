//! SSH as the user: connections pooled per (cluster, user), host keys checked against
//! the cluster definition, bounded handshakes, timeouts and keepalive.
//!
//! `ssh2` is blocking and holds the session lock while a channel waits for data, so
//! one connection runs one command at a time; concurrency comes from several pooled
//! connections per (cluster, user) — never more than sshd's `MaxSessions`, and never
//! more simultaneous handshakes per host than its `MaxStartups` tolerates.

use std::collections::HashMap;
use std::io::{Read as _, Write as _};
use std::net::{TcpStream, ToSocketAddrs as _};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use zeroize::Zeroizing;

use super::remote::{RemoteError, RemoteOutput, framed, markers, unframe};
use crate::model::{HostKey, UserName};

/// Limits of the pool.
#[derive(Debug, Clone, Copy)]
pub struct SshLimits {
    /// Connections per (cluster, user); each runs one command at a time.
    pub connections_per_user: usize,
    /// Simultaneous handshakes per host (OpenSSH starts refusing at `MaxStartups` 10).
    pub handshakes_per_host: usize,
    /// TCP connect timeout.
    pub connect_timeout: Duration,
    /// Idle connections older than this are closed instead of reused.
    pub idle_timeout: Duration,
}

impl Default for SshLimits {
    fn default() -> Self {
        Self {
            connections_per_user: 4,
            handshakes_per_host: 4,
            connect_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(300),
        }
    }
}

/// Where and as whom to connect.
#[derive(Clone)]
pub struct SshTarget {
    /// Pool key part: the cluster's name.
    pub cluster: String,
    /// Host name or address.
    pub host: String,
    /// Port.
    pub port: u16,
    /// The key the server must present.
    pub host_key: HostKey,
    /// Unix user.
    pub user: UserName,
    /// The user's private key (OpenSSH text), opened from the store.
    pub private_key: Arc<Zeroizing<String>>,
}

impl std::fmt::Debug for SshTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SshTarget")
            .field("cluster", &self.cluster)
            .field("host", &self.host)
            .field("port", &self.port)
            .field("user", &self.user)
            .field("private_key", &"[redacted]")
            .finish()
    }
}

struct Idle {
    session: ssh2::Session,
    since: Instant,
}

type PoolKey = (String, String, u16, String);

/// The connection pool.
pub struct SshPool {
    limits: SshLimits,
    idle: Mutex<HashMap<PoolKey, Vec<Idle>>>,
    per_user: Mutex<HashMap<PoolKey, Arc<Semaphore>>>,
    per_host: Mutex<HashMap<(String, u16), Arc<Semaphore>>>,
    /// Connections currently open (for metrics and tests).
    open: Arc<std::sync::atomic::AtomicUsize>,
}

impl std::fmt::Debug for SshPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SshPool").field("limits", &self.limits).finish_non_exhaustive()
    }
}

fn semaphore<K: std::hash::Hash + Eq + Clone>(
    map: &Mutex<HashMap<K, Arc<Semaphore>>>,
    key: &K,
    n: usize,
) -> Arc<Semaphore> {
    map.lock()
        .unwrap_or_else(|p| p.into_inner())
        .entry(key.clone())
        .or_insert_with(|| Arc::new(Semaphore::new(n)))
        .clone()
}

/// A session in use: closed when dropped (keeping the open count true), unless it is
/// handed back to the pool first.
struct Counted {
    session: Option<ssh2::Session>,
    open: Arc<std::sync::atomic::AtomicUsize>,
}

impl Drop for Counted {
    fn drop(&mut self) {
        if let Some(s) = self.session.take() {
            let _ = s.disconnect(None, "bye", None);
            self.open.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        }
    }
}

impl SshPool {
    /// An empty pool.
    pub fn new(limits: SshLimits) -> Self {
        Self {
            limits,
            idle: Mutex::default(),
            per_user: Mutex::default(),
            per_host: Mutex::default(),
            open: Arc::default(),
        }
    }

    /// The pool's limits (a stream's connection uses its timeouts).
    pub fn limits(&self) -> SshLimits {
        self.limits
    }

    /// How many connections are open.
    pub fn open_connections(&self) -> usize {
        self.open.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Runs `script` with `sh -s` as `target.user`; waits at most `timeout` for it.
    pub async fn run(&self, target: &SshTarget, script: &str, timeout: Duration) -> Result<RemoteOutput, RemoteError> {
        let key: PoolKey = (target.cluster.clone(), target.host.clone(), target.port, target.user.to_string());
        // At most `connections_per_user` commands at once per (cluster, user).
        let permit: OwnedSemaphorePermit = semaphore(&self.per_user, &key, self.limits.connections_per_user)
            .acquire_owned()
            .await
            .expect("the semaphore is never closed");
        let reused = self.take_idle(&key);
        let session = match reused {
            Some(s) => Counted { session: Some(s), open: self.open.clone() },
            None => {
                let host_sem =
                    semaphore(&self.per_host, &(target.host.clone(), target.port), self.limits.handshakes_per_host);
                let _handshake = host_sem.acquire_owned().await.expect("never closed");
                let t = target.clone();
                let limits = self.limits;
                let s = tokio::task::spawn_blocking(move || connect(&t, &limits))
                    .await
                    .map_err(|e| RemoteError::Unreachable(format!("the connection task failed: {e}")))??;
                self.open.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                Counted { session: Some(s), open: self.open.clone() }
            }
        };
        let script = script.to_owned();
        let (result, session) = tokio::task::spawn_blocking(move || {
            let r = exec(session.session.as_ref().expect("in use"), &script, timeout);
            (r, session)
        })
        .await
        .map_err(|e| RemoteError::Ambiguous(format!("the SSH task failed: {e}")))?;
        // Only a connection that just worked goes back to the pool.
        if result.is_ok() {
            self.put_idle(key, session);
        }
        drop(permit);
        result
    }

    fn take_idle(&self, key: &PoolKey) -> Option<ssh2::Session> {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        let list = idle.get_mut(key)?;
        while let Some(i) = list.pop() {
            if i.since.elapsed() < self.limits.idle_timeout {
                return Some(i.session);
            }
            let _ = i.session.disconnect(None, "idle", None);
            self.open.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        }
        None
    }

    fn put_idle(&self, key: PoolKey, mut session: Counted) {
        // Taken out, so the guard's drop does not close it.
        let Some(s) = session.session.take() else { return };
        self.idle
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(key)
            .or_default()
            .push(Idle { session: s, since: Instant::now() });
    }
}

/// A hex SHA256 of a host key blob, as `ssh-keygen -l` shows it (base64).
fn fingerprint(blob: &[u8]) -> String {
    use base64::Engine as _;
    let digest = ring::digest::digest(&ring::digest::SHA256, blob);
    format!("SHA256:{}", base64::engine::general_purpose::STANDARD_NO_PAD.encode(digest.as_ref()))
}

/// Connects, checks the host key, logs in.
pub(super) fn connect(t: &SshTarget, limits: &SshLimits) -> Result<ssh2::Session, RemoteError> {
    let where_ = format!("{}:{}", t.host, t.port);
    let addr = (t.host.as_str(), t.port)
        .to_socket_addrs()
        .map_err(|e| RemoteError::Unreachable(format!("cannot resolve {where_}: {e}")))?
        .next()
        .ok_or_else(|| RemoteError::Unreachable(format!("{where_} resolves to no address")))?;
    let tcp = TcpStream::connect_timeout(&addr, limits.connect_timeout)
        .map_err(|e| RemoteError::Unreachable(format!("cannot connect to {where_}: {e}")))?;
    let _ = tcp.set_nodelay(true);
    let mut s = ssh2::Session::new().map_err(|e| RemoteError::Unreachable(format!("libssh2: {e}")))?;
    s.set_tcp_stream(tcp);
    s.set_timeout(limits.connect_timeout.as_millis() as u32);
    // Ask for the pinned key's type, so a server with several keys shows that one.
    let pref = match t.host_key.kind.as_str() {
        "ssh-rsa" => "rsa-sha2-512,rsa-sha2-256,ssh-rsa",
        other => other,
    };
    s.method_pref(ssh2::MethodType::HostKey, pref)
        .map_err(|e| RemoteError::Unreachable(format!("setting the host key type for {where_}: {e}")))?;
    s.handshake().map_err(|e| RemoteError::Unreachable(format!("SSH handshake with {where_} failed: {e}")))?;
    let (presented, _) = s.host_key().ok_or_else(|| RemoteError::Refused(format!("{where_} presented no host key")))?;
    let pinned = t.host_key.blob_bytes();
    if presented != pinned.as_slice() {
        return Err(RemoteError::Refused(format!(
            "the host key of {where_} ({}) is not the one pinned in cluster `{}` ({}); refusing to connect \
             (if the cluster's key really changed, an admin updates the cluster definition)",
            fingerprint(presented),
            t.cluster,
            fingerprint(&pinned)
        )));
    }
    s.userauth_pubkey_memory(t.user.as_str(), None, t.private_key.as_str(), None).map_err(|e| {
        RemoteError::Refused(format!(
            "`{}` cannot log in to {where_} with the registered key ({}); register the right key for this user and cluster",
            t.user,
            e.message()
        ))
    })?;
    if !s.authenticated() {
        return Err(RemoteError::Refused(format!("`{}` is not authenticated on {where_}", t.user)));
    }
    s.set_keepalive(true, 30);
    Ok(s)
}

/// Runs `sh -s` with `script` on stdin and reads what it prints between markers.
fn exec(s: &ssh2::Session, script: &str, timeout: Duration) -> Result<RemoteOutput, RemoteError> {
    s.set_timeout(timeout.as_millis().min(u128::from(u32::MAX)) as u32);
    let marks = markers();
    let mut ch = s.channel_session().map_err(|e| RemoteError::Unreachable(format!("opening an SSH channel: {e}")))?;
    ch.exec("sh -s").map_err(|e| RemoteError::Unreachable(format!("starting sh: {e}")))?;
    // From here on the script may run: failures are ambiguous.
    let input = framed(script, &marks);
    ch.write_all(input.as_bytes()).map_err(|e| RemoteError::Ambiguous(format!("sending the script: {e}")))?;
    ch.send_eof().map_err(|e| RemoteError::Ambiguous(format!("ending the script: {e}")))?;
    let mut stdout = Vec::new();
    ch.read_to_end(&mut stdout).map_err(|e| RemoteError::Ambiguous(format!("reading the result: {e}")))?;
    let mut stderr = Vec::new();
    let _ = ch.stderr().read_to_end(&mut stderr);
    let _ = ch.wait_close();
    let status = ch.exit_status().unwrap_or(-1);
    let stdout = String::from_utf8_lossy(&stdout);
    let stderr = String::from_utf8_lossy(&stderr).into_owned();
    let body = unframe(&stdout, &marks).ok_or_else(|| {
        RemoteError::Garbled(format!(
            "the remote script ended without its end marker (status {status}): {}",
            stderr.trim()
        ))
    })?;
    Ok(RemoteOutput { body, stderr, status })
}

//! Per-user request limits, answered with 429 and `Retry-After`: task submissions per
//! minute (bursts are fine, a runaway script is not) and event streams open at once
//! (each holds a connection and a store reader).
//!
//! On a store that several servers share (MongoDB) both limits hold for all of them
//! together: submissions are counted in the store, in windows of `burst / rate`
//! (20 s by default) with at most `burst` in any such sliding window (the previous
//! window's count weighted by how much of it still overlaps); each open stream holds
//! one of the user's `streams_per_user` slots, a lease `stream/<user>/<n>` renewed
//! every 5 s and released when the stream ends (15 s after a server dies). On the
//! embedded store (one server) both are counted in memory, submissions by a token
//! bucket with the same rate and burst.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use super::error::ApiError;
use crate::mediator::replicas::{RENEW_EVERY, REPLICA_LEASE};
use crate::model::UserName;
use crate::store::Store;

/// The limits, from the config file's `[api]` table.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RateConfig {
    /// Task submissions per user per minute, on average.
    pub submissions_per_minute: u32,
    /// How many submissions a user may make at once before the rate applies.
    pub submission_burst: u32,
    /// Event streams one user may have open at once.
    pub streams_per_user: u32,
}

impl Default for RateConfig {
    fn default() -> Self {
        Self { submissions_per_minute: 600, submission_burst: 200, streams_per_user: 32 }
    }
}

struct Bucket {
    tokens: f64,
    at: Instant,
}

/// The limits' state.
pub struct RateLimits {
    cfg: RateConfig,
    buckets: Mutex<HashMap<UserName, Bucket>>,
    streams: Mutex<HashMap<UserName, u32>>,
    /// Counts of closed windows read from the store: (key, window start ms) → uses.
    closed: Mutex<HashMap<(String, i128), u64>>,
}

impl std::fmt::Debug for RateLimits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RateLimits").field("cfg", &self.cfg).finish_non_exhaustive()
    }
}

/// Rate and burst as numbers: submissions per second, and at most how many at once.
fn rate_and_burst(cfg: &RateConfig) -> (f64, f64) {
    (f64::from(cfg.submissions_per_minute.max(1)) / 60.0, f64::from(cfg.submission_burst.max(1)))
}

fn too_many(user: &UserName, cfg: &RateConfig, wait: u64) -> ApiError {
    ApiError::TooManyRequests {
        message: format!(
            "`{user}` submitted more than {} tasks a minute; try again in {wait} s",
            cfg.submissions_per_minute
        ),
        retry_after: wait,
    }
}

/// What the sliding window says of `cur` uses in the window so far, `prev` in the one
/// before, `frac` (0..1) of the window gone, at most `burst` per window of `window_s`
/// seconds: `None` if the use fits, else the seconds to wait.
fn window_verdict(cur: u64, prev: u64, frac: f64, burst: f64, window_s: f64) -> Option<u64> {
    let (cur, prev) = (cur as f64, prev as f64);
    if cur + prev * (1.0 - frac) <= burst {
        return None;
    }
    // When the previous window has slid out far enough, or (a full window) this one.
    let wait = if cur <= burst && prev > 0.0 {
        window_s * (1.0 - frac - (burst - cur) / prev)
    } else {
        window_s * (1.0 - frac) + window_s * (1.0 - burst / cur).max(0.0)
    };
    Some(wait.ceil().max(1.0) as u64)
}

impl RateLimits {
    /// Limits as configured.
    pub fn new(cfg: RateConfig) -> Self {
        Self { cfg, buckets: Mutex::default(), streams: Mutex::default(), closed: Mutex::default() }
    }

    /// Counts one submission of `user`, or says when to come back: in `store` if
    /// several servers share it, else in memory.
    pub async fn submission(&self, store: &dyn Store, user: &UserName) -> Result<(), ApiError> {
        if !store.serves_many() {
            return self.local_submission(user);
        }
        let (rate, burst) = rate_and_burst(&self.cfg);
        let window_ms = ((burst / rate) * 1000.0).max(1000.0) as i128;
        let now = OffsetDateTime::now_utc();
        let now_ms = now.unix_timestamp_nanos() / 1_000_000;
        let start_ms = now_ms - now_ms.rem_euclid(window_ms);
        let at = |ms: i128| OffsetDateTime::from_unix_timestamp_nanos(ms * 1_000_000).unwrap_or(now);
        let keep = at(start_ms + 3 * window_ms);
        let key = format!("submit/{user}");
        let counted = |by: i64| store.count_use(&key, at(start_ms), by, keep);
        let cur = match counted(1).await {
            Ok(Some(n)) => n,
            Ok(None) => return self.local_submission(user),
            Err(e) => {
                // The submission itself needs the store: it will say what is wrong.
                tracing::debug!(error = %e, "could not count a submission");
                return Ok(());
            }
        };
        let prev = self.closed_window(store, &key, start_ms - window_ms, at(start_ms - window_ms), keep).await;
        let frac = (now_ms - start_ms) as f64 / window_ms as f64;
        let Some(wait) = window_verdict(cur, prev, frac, burst, window_ms as f64 / 1000.0) else { return Ok(()) };
        // A refused submission is not counted: a client that keeps trying gets in.
        if let Err(e) = counted(-1).await {
            tracing::debug!(error = %e, "could not take back a refused submission");
        }
        Err(too_many(user, &self.cfg, wait))
    }

    /// The uses of `key` in the closed window starting at `start_ms`, read once.
    async fn closed_window(
        &self,
        store: &dyn Store,
        key: &str,
        start_ms: i128,
        start: OffsetDateTime,
        keep: OffsetDateTime,
    ) -> u64 {
        let cached = self.closed.lock().unwrap_or_else(|p| p.into_inner()).get(&(key.to_owned(), start_ms)).copied();
        if let Some(n) = cached {
            return n;
        }
        let n = store.count_use(key, start, 0, keep).await.ok().flatten().unwrap_or(0);
        let mut closed = self.closed.lock().unwrap_or_else(|p| p.into_inner());
        if closed.len() >= 10_000 {
            closed.clear();
        }
        closed.insert((key.to_owned(), start_ms), n);
        n
    }

    /// Takes one submission from `user`'s bucket in memory, or says when to come back.
    fn local_submission(&self, user: &UserName) -> Result<(), ApiError> {
        let (rate, burst) = rate_and_burst(&self.cfg);
        let mut all = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        let b = all.entry(user.clone()).or_insert(Bucket { tokens: burst, at: now });
        b.tokens = (b.tokens + now.duration_since(b.at).as_secs_f64() * rate).min(burst);
        b.at = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            return Ok(());
        }
        let wait = ((1.0 - b.tokens) / rate).ceil().max(1.0) as u64;
        Err(too_many(user, &self.cfg, wait))
    }

    fn too_many_streams(&self, user: &UserName) -> ApiError {
        ApiError::TooManyRequests {
            message: format!(
                "`{user}` has {} event streams open, the most allowed; close one (or follow several tasks with GET /api/v1/tasks/stream)",
                self.cfg.streams_per_user
            ),
            retry_after: 5,
        }
    }

    /// Holds one of `user`'s event stream slots while the guard lives, or refuses one
    /// over the limit: a lease in `store`, held by `holder` (this server's lease
    /// holder), if several servers share it, else a count in memory.
    pub async fn stream(
        self: &Arc<Self>,
        store: &Arc<dyn Store>,
        holder: &str,
        user: &UserName,
    ) -> Result<StreamSlot, ApiError> {
        if !store.serves_many() {
            return self.local_stream(user);
        }
        let prefix = format!("stream/{user}/");
        let at = OffsetDateTime::now_utc();
        let lease_for = time::Duration::try_from(REPLICA_LEASE).expect("short");
        let held: std::collections::HashSet<String> = match store.leases(&prefix).await {
            Ok(all) => all.into_iter().filter(|l| l.holds_at(at)).map(|l| l.key).collect(),
            Err(e) => {
                tracing::debug!(error = %e, "could not read the stream slots; counting this one in memory");
                return self.local_stream(user);
            }
        };
        // Each stream its own holder, so two streams of one server never share a slot.
        let holder = format!("{holder}/{}", uuid::Uuid::new_v4().simple());
        for n in 0..self.cfg.streams_per_user {
            let key = format!("{prefix}{n}");
            if held.contains(&key) {
                continue;
            }
            match store.claim_lease(&key, &holder, at + lease_for, at).await {
                Ok(Some(lease)) => return Ok(StreamSlot::shared(store.clone(), lease)),
                Ok(None) => continue, // taken just now by another stream
                Err(e) => {
                    tracing::debug!(error = %e, "could not claim a stream slot; counting this one in memory");
                    return self.local_stream(user);
                }
            }
        }
        Err(self.too_many_streams(user))
    }

    fn local_stream(self: &Arc<Self>, user: &UserName) -> Result<StreamSlot, ApiError> {
        let mut all = self.streams.lock().unwrap_or_else(|p| p.into_inner());
        let n = all.entry(user.clone()).or_default();
        if *n >= self.cfg.streams_per_user {
            return Err(self.too_many_streams(user));
        }
        *n += 1;
        Ok(StreamSlot::Local { limits: self.clone(), user: user.clone() })
    }
}

/// One open event stream, counted until dropped.
pub enum StreamSlot {
    /// Counted in this server's memory.
    Local {
        /// Whose count.
        limits: Arc<RateLimits>,
        /// Whose stream.
        user: UserName,
    },
    /// A slot leased in the store, renewed by a task that releases it when told.
    Shared {
        /// Tells the renewing task to release the slot.
        stop: Option<tokio::sync::oneshot::Sender<()>>,
    },
}

impl StreamSlot {
    /// Keeps `lease` renewed until the slot is dropped, then releases it.
    fn shared(store: Arc<dyn Store>, mut lease: crate::store::leases::Lease) -> Self {
        let (tx, mut rx) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(async move {
            let lease_for = time::Duration::try_from(REPLICA_LEASE).expect("short");
            loop {
                tokio::select! {
                    () = tokio::time::sleep(RENEW_EVERY) => {
                        let at = OffsetDateTime::now_utc();
                        match store.claim_lease(&lease.key, &lease.holder, at + lease_for, at).await {
                            Ok(Some(l)) => lease = l,
                            Ok(None) => tracing::warn!(key = lease.key, "a stream slot was lost; the limit may be passed by one"),
                            Err(e) => tracing::debug!(key = lease.key, error = %e, "could not renew a stream slot"),
                        }
                    }
                    _ = &mut rx => break,
                }
            }
            if let Err(e) = store.release_lease(&lease, OffsetDateTime::now_utc()).await {
                tracing::debug!(key = lease.key, error = %e, "could not release a stream slot; it lapses by itself");
            }
        });
        Self::Shared { stop: Some(tx) }
    }
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        match self {
            Self::Local { limits, user } => {
                let mut all = limits.streams.lock().unwrap_or_else(|p| p.into_inner());
                if let Some(n) = all.get_mut(user) {
                    *n = n.saturating_sub(1);
                    if *n == 0 {
                        all.remove(user);
                    }
                }
            }
            Self::Shared { stop } => {
                if let Some(stop) = stop.take() {
                    let _ = stop.send(());
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_passes_then_the_rate_applies_with_a_retry_time() {
        let limits =
            RateLimits::new(RateConfig { submissions_per_minute: 60, submission_burst: 3, streams_per_user: 1 });
        let alice = UserName::parse("alice").unwrap();
        for _ in 0..3 {
            limits.local_submission(&alice).unwrap();
        }
        match limits.local_submission(&alice) {
            Err(ApiError::TooManyRequests { retry_after, .. }) => assert_eq!(retry_after, 1),
            other => panic!("{other:?}"),
        }
        // Somebody else has their own bucket.
        limits.local_submission(&UserName::parse("bob").unwrap()).unwrap();
    }

    #[test]
    fn streams_are_counted_until_their_slot_is_dropped() {
        let limits = std::sync::Arc::new(RateLimits::new(RateConfig { streams_per_user: 1, ..Default::default() }));
        let alice = UserName::parse("alice").unwrap();
        let slot = limits.local_stream(&alice).unwrap();
        assert!(limits.local_stream(&alice).is_err());
        drop(slot);
        assert!(limits.local_stream(&alice).is_ok());
    }

    #[test]
    fn the_sliding_window_lets_a_burst_through_then_holds_to_the_rate() {
        // 200 at once, then nothing until the window slides on.
        assert_eq!(window_verdict(200, 0, 0.1, 200.0, 20.0), None);
        assert_eq!(window_verdict(201, 0, 0.1, 200.0, 20.0), Some(19), "into the next window");
        // A full previous window weighs by how much of it still overlaps.
        assert_eq!(window_verdict(100, 200, 0.5, 200.0, 20.0), None);
        assert_eq!(window_verdict(150, 200, 0.5, 200.0, 20.0), Some(5), "until 150 + 200 x 0.25 fits");
        assert_eq!(window_verdict(151, 200, 0.75, 200.0, 20.0), Some(1));
        // Over a long run: about burst per window, that is the rate.
        let (mut prev, mut passed) = (0u64, 0u64);
        for _ in 0..10 {
            let mut cur = 0;
            for step in 0..1000 {
                if window_verdict(cur + 1, prev, f64::from(step) / 1000.0, 200.0, 20.0).is_none() {
                    cur += 1;
                }
            }
            passed += cur;
            prev = cur;
        }
        assert!((1900..=2200).contains(&passed), "{passed} in 10 windows of at most 200");
    }
}

//! Per-user request limits, answered with 429 and `Retry-After`: task submissions per
//! minute (a token bucket: bursts are fine, a runaway script is not) and event
//! streams open at once (each holds a connection and a store reader).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Instant;

use serde::{Deserialize, Serialize};

use super::error::ApiError;
use crate::model::UserName;

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
}

impl std::fmt::Debug for RateLimits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RateLimits").field("cfg", &self.cfg).finish_non_exhaustive()
    }
}

impl RateLimits {
    /// Limits as configured.
    pub fn new(cfg: RateConfig) -> Self {
        Self { cfg, buckets: Mutex::default(), streams: Mutex::default() }
    }

    /// Takes one submission from `user`'s bucket, or says when to come back.
    pub fn submission(&self, user: &UserName) -> Result<(), ApiError> {
        let rate = f64::from(self.cfg.submissions_per_minute.max(1)) / 60.0;
        let burst = f64::from(self.cfg.submission_burst.max(1));
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
        Err(ApiError::TooManyRequests {
            message: format!(
                "`{user}` submitted more than {} tasks a minute; try again in {wait} s",
                self.cfg.submissions_per_minute
            ),
            retry_after: wait,
        })
    }

    /// Counts an event stream of `user` while the guard lives, or refuses one over
    /// the limit.
    pub fn stream(self: &std::sync::Arc<Self>, user: &UserName) -> Result<StreamSlot, ApiError> {
        let mut all = self.streams.lock().unwrap_or_else(|p| p.into_inner());
        let n = all.entry(user.clone()).or_default();
        if *n >= self.cfg.streams_per_user {
            return Err(ApiError::TooManyRequests {
                message: format!(
                    "`{user}` has {} event streams open, the most allowed; close one (or follow several tasks with GET /api/v1/tasks/stream)",
                    self.cfg.streams_per_user
                ),
                retry_after: 5,
            });
        }
        *n += 1;
        Ok(StreamSlot { limits: self.clone(), user: user.clone() })
    }
}

/// One open event stream, counted until dropped.
pub struct StreamSlot {
    limits: std::sync::Arc<RateLimits>,
    user: UserName,
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        let mut all = self.limits.streams.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = all.get_mut(&self.user) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                all.remove(&self.user);
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
            limits.submission(&alice).unwrap();
        }
        match limits.submission(&alice) {
            Err(ApiError::TooManyRequests { retry_after, .. }) => assert_eq!(retry_after, 1),
            other => panic!("{other:?}"),
        }
        // Somebody else has their own bucket.
        limits.submission(&UserName::parse("bob").unwrap()).unwrap();
    }

    #[test]
    fn streams_are_counted_until_their_slot_is_dropped() {
        let limits = std::sync::Arc::new(RateLimits::new(RateConfig { streams_per_user: 1, ..Default::default() }));
        let alice = UserName::parse("alice").unwrap();
        let slot = limits.stream(&alice).unwrap();
        assert!(limits.stream(&alice).is_err());
        drop(slot);
        assert!(limits.stream(&alice).is_ok());
    }
}

//! Counters the server keeps for `/metrics` (Prometheus text format, version 0.0.4).
//!
//! Written by hand: a handful of counters, one histogram and a few gauges read at
//! scrape time do not justify a metrics framework, and the text format is small and
//! stable. Task counts by state come from the store at scrape time, so they are right
//! across restarts and across servers sharing a store.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::model::TaskState;

/// Upper bounds (seconds) of the submit-latency histogram buckets.
const SUBMIT_BUCKETS: [f64; 11] = [0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0];

/// Upper bounds of the efficiency histograms' buckets (a ratio, 1 = all of it used).
const EFFICIENCY_BUCKETS: [f64; 11] = [0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0];

/// A cumulative histogram over `bounds`.
#[derive(Debug)]
struct Histogram {
    bounds: &'static [f64],
    counts: Vec<u64>,
    count: u64,
    sum: f64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Self {
        Histogram { bounds, counts: vec![0; bounds.len()], count: 0, sum: 0.0 }
    }

    fn observe(&mut self, x: f64) {
        for (i, bound) in self.bounds.iter().enumerate() {
            if x <= *bound {
                self.counts[i] += 1;
            }
        }
        self.count += 1;
        self.sum += x;
    }

    /// Its lines, `labels` (`name="value",...`, or empty) on each.
    fn write(&self, w: &mut String, name: &str, labels: &str) {
        let sep = if labels.is_empty() { "" } else { "," };
        for (bound, n) in self.bounds.iter().zip(&self.counts) {
            let _ = writeln!(w, "{name}_bucket{{{labels}{sep}le=\"{bound}\"}} {n}");
        }
        let _ = writeln!(w, "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {}", self.count);
        let braces = if labels.is_empty() { String::new() } else { format!("{{{labels}}}") };
        let _ = writeln!(w, "{name}_sum{braces} {}", self.sum);
        let _ = writeln!(w, "{name}_count{braces} {}", self.count);
    }
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram::new(&SUBMIT_BUCKETS)
    }
}

/// The server's counters.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Phase submissions by (cluster, outcome): `submitted`, `refused`, `blocked`.
    submissions: Mutex<BTreeMap<(String, &'static str), u64>>,
    /// Seconds one submission round trip (all phases of a task at once) took.
    submit_latency: Mutex<Histogram>,
    /// Scheduler errors by kind: `transient`, `permanent`, `unreachable`, `ambiguous`.
    scheduler_errors: Mutex<BTreeMap<&'static str, u64>>,
    /// Requests refused for a missing or bad token.
    auth_failures: AtomicU64,
    /// Requests refused with 429.
    rate_limited: AtomicU64,
    /// Event streams open now.
    streams_open: AtomicU64,
    /// Scripts run on clusters by purpose: `submit`, `find` (jobs by tag), `status`.
    cluster_scripts: Mutex<BTreeMap<&'static str, u64>>,
    /// Efficiency of ended jobs by (application, `cpu` or `memory`).
    efficiency: Mutex<BTreeMap<(String, &'static str), Histogram>>,
    /// Pool holders released by the queue's sweep (their jobs or tasks had ended).
    pool_releases: AtomicU64,
    /// Tasks whose outputs were kept in the store, and the bytes kept.
    archives: AtomicU64,
    archived_bytes: AtomicU64,
}

impl Metrics {
    /// Counts a phase submission of `cluster` that ended as `outcome`.
    pub fn submission(&self, cluster: &str, outcome: &'static str) {
        *self
            .submissions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry((cluster.to_owned(), outcome))
            .or_default() += 1;
    }

    /// Records how long a submission round trip took.
    pub fn submit_latency(&self, took: Duration) {
        self.submit_latency.lock().unwrap_or_else(|p| p.into_inner()).observe(took.as_secs_f64());
    }

    /// Records what an ended job of `application` used of what it asked for.
    pub fn usage(&self, application: &str, usage: &crate::model::usage::Usage) {
        let mut e = self.efficiency.lock().unwrap_or_else(|p| p.into_inner());
        for (kind, x) in [("cpu", usage.cpu_efficiency), ("memory", usage.memory_efficiency)] {
            if let Some(x) = x {
                e.entry((application.to_owned(), kind))
                    .or_insert_with(|| Histogram::new(&EFFICIENCY_BUCKETS))
                    .observe(x);
            }
        }
    }

    /// Counts a scheduler error of `kind`.
    pub fn scheduler_error(&self, kind: &'static str) {
        *self.scheduler_errors.lock().unwrap_or_else(|p| p.into_inner()).entry(kind).or_default() += 1;
    }

    /// Counts a script run on a cluster for `purpose` (`submit`, `find`, `status`).
    pub fn cluster_script(&self, purpose: &'static str) {
        *self.cluster_scripts.lock().unwrap_or_else(|p| p.into_inner()).entry(purpose).or_default() += 1;
    }

    /// Scripts run on clusters for `purpose` so far.
    pub fn cluster_scripts(&self, purpose: &str) -> u64 {
        self.cluster_scripts.lock().unwrap_or_else(|p| p.into_inner()).get(purpose).copied().unwrap_or(0)
    }

    /// Counts holders the queue's sweep released.
    pub fn pool_released(&self, n: u64) {
        self.pool_releases.fetch_add(n, Ordering::Relaxed);
    }

    /// Counts a task's outputs kept in the store (`bytes` in all).
    pub fn archive_made(&self, bytes: u64) {
        self.archives.fetch_add(1, Ordering::Relaxed);
        self.archived_bytes.fetch_add(bytes, Ordering::Relaxed);
    }

    /// Counts a request refused for its token.
    pub fn auth_failure(&self) {
        self.auth_failures.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a request refused with 429.
    pub fn rate_limited(&self) {
        self.rate_limited.fetch_add(1, Ordering::Relaxed);
    }

    /// Event streams open now.
    pub fn streams_open(&self) -> u64 {
        self.streams_open.load(Ordering::Relaxed)
    }

    /// An event stream opened; it counts until the guard is dropped.
    pub fn stream_opened(self: &std::sync::Arc<Self>) -> StreamGuard {
        self.streams_open.fetch_add(1, Ordering::Relaxed);
        StreamGuard(self.clone())
    }

    /// The Prometheus text exposition, with the gauges read now.
    pub fn render(&self, tasks: &[(TaskState, u64)], ssh_connections: usize) -> String {
        let mut out = String::new();
        let w = &mut out;
        header(w, "hpcforge_tasks", "gauge", "Tasks by state.");
        let states = [
            TaskState::Queued,
            TaskState::Submitting,
            TaskState::Blocked,
            TaskState::Pending,
            TaskState::Running,
            TaskState::Completed,
            TaskState::Failed,
            TaskState::Cancelled,
            TaskState::Unknown,
        ];
        for st in states {
            let n = tasks.iter().find(|(s, _)| *s == st).map_or(0, |(_, n)| *n);
            let _ = writeln!(w, "hpcforge_tasks{{state=\"{}\"}} {n}", st.as_str());
        }

        header(w, "hpcforge_submissions_total", "counter", "Phase submissions by cluster and outcome.");
        for ((cluster, outcome), n) in self.submissions.lock().unwrap_or_else(|p| p.into_inner()).iter() {
            let _ =
                writeln!(w, "hpcforge_submissions_total{{cluster=\"{}\",outcome=\"{outcome}\"}} {n}", escape(cluster));
        }

        header(
            w,
            "hpcforge_submit_duration_seconds",
            "histogram",
            "Time of one submission round trip (every phase of a task at once).",
        );
        self.submit_latency.lock().unwrap_or_else(|p| p.into_inner()).write(w, "hpcforge_submit_duration_seconds", "");

        for (kind, what) in [("cpu", "CPU time / (CPUs x elapsed)"), ("memory", "peak memory / requested memory")] {
            let name = format!("hpcforge_job_{kind}_efficiency");
            header(w, &name, "histogram", &format!("Ended jobs' {what}, by application."));
            for ((app, k), h) in self.efficiency.lock().unwrap_or_else(|p| p.into_inner()).iter() {
                if *k == kind {
                    h.write(w, &name, &format!("application=\"{}\"", escape(app)));
                }
            }
        }

        header(w, "hpcforge_ssh_connections_open", "gauge", "SSH connections open to clusters.");
        let _ = writeln!(w, "hpcforge_ssh_connections_open {ssh_connections}");

        header(w, "hpcforge_scheduler_errors_total", "counter", "Scheduler errors by kind.");
        let errors = self.scheduler_errors.lock().unwrap_or_else(|p| p.into_inner());
        for kind in ["transient", "permanent", "unreachable", "ambiguous"] {
            let _ = writeln!(
                w,
                "hpcforge_scheduler_errors_total{{kind=\"{kind}\"}} {}",
                errors.get(kind).copied().unwrap_or(0)
            );
        }

        header(
            w,
            "hpcforge_cluster_scripts_total",
            "counter",
            "Scripts run on clusters (over SSH or locally) by purpose.",
        );
        for purpose in ["submit", "find", "status"] {
            let _ = writeln!(
                w,
                "hpcforge_cluster_scripts_total{{purpose=\"{purpose}\"}} {}",
                self.cluster_scripts(purpose)
            );
        }

        header(w, "hpcforge_auth_failures_total", "counter", "Requests refused for a missing or bad token.");
        let _ = writeln!(w, "hpcforge_auth_failures_total {}", self.auth_failures.load(Ordering::Relaxed));
        header(w, "hpcforge_rate_limited_total", "counter", "Requests refused with 429.");
        let _ = writeln!(w, "hpcforge_rate_limited_total {}", self.rate_limited.load(Ordering::Relaxed));
        header(
            w,
            "hpcforge_pool_releases_total",
            "counter",
            "Licences and slots the queue released because their jobs or tasks had ended.",
        );
        let _ = writeln!(w, "hpcforge_pool_releases_total {}", self.pool_releases.load(Ordering::Relaxed));
        header(w, "hpcforge_archives_total", "counter", "Tasks whose outputs this server kept in the store.");
        let _ = writeln!(w, "hpcforge_archives_total {}", self.archives.load(Ordering::Relaxed));
        header(w, "hpcforge_archived_bytes_total", "counter", "Bytes of outputs this server kept in the store.");
        let _ = writeln!(w, "hpcforge_archived_bytes_total {}", self.archived_bytes.load(Ordering::Relaxed));
        header(w, "hpcforge_event_streams_open", "gauge", "Server-Sent Event streams open.");
        let _ = writeln!(w, "hpcforge_event_streams_open {}", self.streams_open.load(Ordering::Relaxed));
        out
    }
}

/// Keeps an event stream counted while it lives.
#[derive(Debug)]
pub struct StreamGuard(std::sync::Arc<Metrics>);

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.0.streams_open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The replicas sharing the store, as `(replica ID, alive, leases held)`, in the text
/// format: `hpcforge_replica_up` and `hpcforge_replica_leases_held`. Read from the
/// store by whoever serves `/metrics`, so every replica reports the same picture.
pub fn render_replicas(replicas: &[(String, bool, usize)]) -> String {
    let mut out = String::new();
    let w = &mut out;
    header(w, "hpcforge_replica_up", "gauge", "Servers sharing this store: 1 while a replica's lease holds.");
    for (id, alive, _) in replicas {
        let _ = writeln!(w, "hpcforge_replica_up{{replica=\"{}\"}} {}", escape(id), u8::from(*alive));
    }
    header(w, "hpcforge_replica_leases_held", "gauge", "Leases each replica holds now, besides its own.");
    for (id, _, held) in replicas {
        let _ = writeln!(w, "hpcforge_replica_leases_held{{replica=\"{}\"}} {held}", escape(id));
    }
    out
}

/// The site's pools (licences, users' shares of clusters) in the text format:
/// `hpcforge_pool_size` and `hpcforge_pool_in_use`, by pool key. Read from the store.
pub fn render_pools(pools: &[crate::model::queue::Pool]) -> String {
    let mut out = String::new();
    let w = &mut out;
    header(w, "hpcforge_pool_size", "gauge", "How many a pool has (licences, or a user's job or task slots).");
    for p in pools {
        let _ = writeln!(w, "hpcforge_pool_size{{pool=\"{}\"}} {}", escape(&p.key), p.count);
    }
    header(w, "hpcforge_pool_in_use", "gauge", "How many of a pool are held by tasks.");
    for p in pools {
        let _ = writeln!(w, "hpcforge_pool_in_use{{pool=\"{}\"}} {}", escape(&p.key), p.in_use());
    }
    out
}

fn header(w: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(w, "# HELP {name} {help}");
    let _ = writeln!(w, "# TYPE {name} {kind}");
}

/// Escapes a label value (backslash, quote, newline) as the text format requires.
fn escape(value: &str) -> String {
    value.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_exposition_has_every_family_and_cumulative_buckets() {
        let m = std::sync::Arc::new(Metrics::default());
        m.submission("local-slurm", "submitted");
        m.submission("local-slurm", "submitted");
        m.submit_latency(Duration::from_millis(300));
        m.submit_latency(Duration::from_secs(3));
        m.scheduler_error("transient");
        let _guard = m.stream_opened();
        let text = m.render(&[(TaskState::Running, 4)], 2);
        for line in [
            "hpcforge_tasks{state=\"running\"} 4",
            "hpcforge_tasks{state=\"failed\"} 0",
            "hpcforge_submissions_total{cluster=\"local-slurm\",outcome=\"submitted\"} 2",
            "hpcforge_submit_duration_seconds_bucket{le=\"0.25\"} 0",
            "hpcforge_submit_duration_seconds_bucket{le=\"0.5\"} 1",
            "hpcforge_submit_duration_seconds_bucket{le=\"5\"} 2",
            "hpcforge_submit_duration_seconds_bucket{le=\"+Inf\"} 2",
            "hpcforge_submit_duration_seconds_count 2",
            "hpcforge_ssh_connections_open 2",
            "hpcforge_scheduler_errors_total{kind=\"transient\"} 1",
            "hpcforge_scheduler_errors_total{kind=\"permanent\"} 0",
            "hpcforge_event_streams_open 1",
        ] {
            assert!(text.lines().any(|l| l == line), "missing `{line}` in:\n{text}");
        }
        assert_eq!(escape("a\"b\\c"), "a\\\"b\\\\c");
    }
}

//! What a phase's job really used of what it asked for: elapsed time, CPU time, peak
//! memory, the nodes, and the efficiencies against the request. Read once the job has
//! ended, from the scheduler's accounting (`sacct`) where the cluster has it, and
//! otherwise from the record the forged payload writes when the application ends
//! (CPU time of everything it waited for, from `/proc`; the payload cannot see peak
//! memory, so that stays unknown). See docs/definitions.md § "Resource use".

use serde::{Deserialize, Serialize};

/// Where a usage figure came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum UsageSource {
    /// Slurm's accounting (`sacct`).
    Sacct,
    /// Grid Engine's accounting (`qacct`).
    Qacct,
    /// The job's own record, written by the forged payload when the application ended.
    Job,
}

/// What one phase's job (all the elements of a job array together) used.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Usage {
    /// Where the figures come from.
    pub source: UsageSource,
    /// Wall-clock seconds from the first start to the last end.
    pub elapsed_seconds: f64,
    /// CPU seconds (user + system) of everything the job ran.
    pub cpu_seconds: f64,
    /// CPUs allocated to the job (to each element of an array).
    pub cpus: u32,
    /// CPU seconds the allocation could have given: CPUs × elapsed, summed over an
    /// array's elements.
    pub cpu_capacity_seconds: f64,
    /// Peak resident memory of the job (the largest of an array's elements), bytes;
    /// unknown when only the job's own record was read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_rss_bytes: Option<u64>,
    /// Memory requested (per job, or per array element), bytes, where the job asked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requested_memory_bytes: Option<u64>,
    /// The nodes it ran on (at most [`MAX_NODES`] named).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nodes: Vec<String>,
    /// How many jobs (array elements) the figures add up.
    pub jobs: u32,
    /// CPU time / (CPUs × elapsed), 0 to 1 (a little over 1 where the scheduler
    /// rounds elapsed time down).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_efficiency: Option<f64>,
    /// Peak memory / requested memory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_efficiency: Option<f64>,
}

/// How many node names a usage keeps.
pub const MAX_NODES: usize = 8;

/// One job's (or array element's) figures, before they are added up.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct JobUse {
    /// Start and end, in seconds since the epoch.
    pub start: Option<i64>,
    /// See `start`.
    pub end: Option<i64>,
    /// Wall-clock seconds.
    pub elapsed: f64,
    /// CPU seconds.
    pub cpu: f64,
    /// CPUs allocated.
    pub cpus: u32,
    /// Peak resident memory, bytes.
    pub max_rss: Option<u64>,
    /// Requested memory, bytes.
    pub requested_memory: Option<u64>,
    /// The node (or nodes, as the scheduler writes them).
    pub node: Option<String>,
}

impl Usage {
    /// Adds up one job's elements (a plain job has one) and works out the
    /// efficiencies; `None` for no elements.
    pub fn sum(source: UsageSource, parts: &[JobUse]) -> Option<Usage> {
        if parts.is_empty() {
            return None;
        }
        let cpu: f64 = parts.iter().map(|p| p.cpu).sum();
        let capacity: f64 = parts.iter().map(|p| p.elapsed * f64::from(p.cpus.max(1))).sum();
        let elapsed = match (parts.iter().filter_map(|p| p.start).min(), parts.iter().filter_map(|p| p.end).max()) {
            (Some(s), Some(e)) if e >= s && parts.len() > 1 => (e - s) as f64,
            _ => parts.iter().map(|p| p.elapsed).fold(0.0, f64::max),
        };
        let max_rss = parts.iter().filter_map(|p| p.max_rss).max();
        let requested = parts.iter().filter_map(|p| p.requested_memory).max();
        let mut nodes: Vec<String> = Vec::new();
        for n in parts.iter().filter_map(|p| p.node.as_deref()) {
            if nodes.len() < MAX_NODES && !nodes.iter().any(|m| m == n) {
                nodes.push(n.to_owned());
            }
        }
        let ratio = |a: f64, b: f64| (b > 0.0).then(|| round3(a / b));
        Some(Usage {
            source,
            elapsed_seconds: round3(elapsed),
            cpu_seconds: round3(cpu),
            cpus: parts.iter().map(|p| p.cpus).max().unwrap_or(1).max(1),
            cpu_capacity_seconds: round3(capacity),
            max_rss_bytes: max_rss,
            requested_memory_bytes: requested,
            nodes,
            jobs: parts.len() as u32,
            cpu_efficiency: ratio(cpu, capacity),
            memory_efficiency: match (max_rss, requested) {
                (Some(m), Some(r)) => ratio(m as f64, r as f64),
                _ => None,
            },
        })
    }
}

/// `x` to three decimals: how usage figures are kept.
pub fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// A short line for people: `CPU 97% of 2 CPUs, peak 1.2 GiB of 2 GiB (84%), 1 min 3 s on node7 (sacct)`.
pub fn describe(u: &Usage) -> String {
    let mut s = match u.cpu_efficiency {
        Some(e) => format!("CPU {:.0}% of {} CPU{}", e * 100.0, u.cpus, if u.cpus == 1 { "" } else { "s" }),
        None => format!("CPU {:.1} s", u.cpu_seconds),
    };
    match (u.max_rss_bytes, u.requested_memory_bytes, u.memory_efficiency) {
        (Some(m), Some(r), Some(e)) => s.push_str(&format!(", peak {} of {} ({:.0}%)", bytes(m), bytes(r), e * 100.0)),
        (Some(m), _, _) => s.push_str(&format!(", peak {}", bytes(m))),
        _ => {}
    }
    s.push_str(&format!(", {}", seconds(u.elapsed_seconds)));
    if !u.nodes.is_empty() {
        s.push_str(&format!(" on {}", u.nodes.join(",")));
    }
    if u.jobs > 1 {
        s.push_str(&format!(" ({} jobs)", u.jobs));
    }
    s.push_str(match u.source {
        UsageSource::Sacct => " (sacct)",
        UsageSource::Qacct => " (qacct)",
        UsageSource::Job => " (the job's own record)",
    });
    s
}

fn bytes(b: u64) -> String {
    let b = b as f64;
    if b >= (1u64 << 30) as f64 {
        format!("{:.1} GiB", b / (1u64 << 30) as f64)
    } else {
        format!("{:.0} MiB", b / (1u64 << 20) as f64)
    }
}

fn seconds(s: f64) -> String {
    let s = s.round() as u64;
    match s {
        0..60 => format!("{s} s"),
        60..3600 => format!("{} min {} s", s / 60, s % 60),
        _ => format!("{} h {} min", s / 3600, s % 3600 / 60),
    }
}

/// The line the forged payload writes when the application ends (see
/// `forge::usage`): `<job ID> <CPU ticks> <ticks per second> <start> <end> <node>
/// <CPUs>`, times in seconds since the epoch; `None` for a line that is not one.
pub fn parse_job_record(line: &str) -> Option<(String, JobUse)> {
    let f: Vec<&str> = line.split_whitespace().collect();
    if f.len() < 7 {
        return None;
    }
    let ticks: u64 = f[1].parse().ok()?;
    let hz: u64 = f[2].parse().ok().filter(|h| *h > 0)?;
    let start: i64 = f[3].parse().ok()?;
    let end: i64 = f[4].parse().ok()?;
    let cpus: u32 = f[6].parse().ok().filter(|c| *c > 0)?;
    Some((
        f[0].to_owned(),
        JobUse {
            start: Some(start),
            end: Some(end),
            elapsed: end.saturating_sub(start).max(0) as f64,
            cpu: ticks as f64 / hz as f64,
            cpus,
            max_rss: None,
            requested_memory: None,
            node: Some(f[5].to_owned()).filter(|n| !n.is_empty() && n != "-"),
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn part(elapsed: f64, cpu: f64, cpus: u32) -> JobUse {
        JobUse { elapsed, cpu, cpus, node: Some("n1".into()), ..Default::default() }
    }

    #[test]
    fn efficiency_is_cpu_time_over_what_the_cpus_could_give() {
        let busy = Usage::sum(UsageSource::Sacct, &[part(10.0, 9.9, 1)]).unwrap();
        assert_eq!(busy.cpu_efficiency, Some(0.99));
        let idle = Usage::sum(UsageSource::Sacct, &[part(10.0, 0.01, 2)]).unwrap();
        assert_eq!(idle.cpu_efficiency, Some(0.001));
        assert_eq!(idle.cpu_capacity_seconds, 20.0);
        // Never ran a second: no efficiency rather than a division by zero.
        assert_eq!(Usage::sum(UsageSource::Job, &[part(0.0, 0.0, 1)]).unwrap().cpu_efficiency, None);
        assert_eq!(Usage::sum(UsageSource::Job, &[]), None);
    }

    #[test]
    fn array_elements_add_up_and_the_peak_is_the_largest() {
        let mut a = part(10.0, 10.0, 1);
        a.start = Some(100);
        a.end = Some(110);
        a.max_rss = Some(50 << 20);
        a.requested_memory = Some(100 << 20);
        let mut b = part(10.0, 0.0, 1);
        b.start = Some(105);
        b.end = Some(115);
        b.max_rss = Some(80 << 20);
        b.requested_memory = Some(100 << 20);
        b.node = Some("n2".into());
        let u = Usage::sum(UsageSource::Sacct, &[a, b]).unwrap();
        assert_eq!(u.elapsed_seconds, 15.0, "first start to last end");
        assert_eq!(u.cpu_efficiency, Some(0.5));
        assert_eq!(u.max_rss_bytes, Some(80 << 20));
        assert_eq!(u.memory_efficiency, Some(0.8));
        assert_eq!(u.nodes, ["n1", "n2"]);
        assert_eq!(u.jobs, 2);
    }

    #[test]
    fn the_payloads_record_reads_or_is_refused() {
        let (job, u) = parse_job_record("4242 1234 100 1000 1020 node7 2").unwrap();
        assert_eq!(job, "4242");
        assert_eq!((u.cpu, u.elapsed, u.cpus, u.node.as_deref()), (12.34, 20.0, 2, Some("node7")));
        for bad in
            ["", "4242 x 100 1000 1020 n 1", "4242 1 0 1000 1020 n 1", "4242 1 100 1000 1020 n", "4242 1 100 a 1 n 1"]
        {
            assert_eq!(parse_job_record(bad), None, "{bad}");
        }
    }

    #[test]
    fn the_line_for_people_says_what_was_used_of_what() {
        let mut u = Usage::sum(UsageSource::Sacct, &[part(10.0, 5.0, 1)]).unwrap();
        u.max_rss_bytes = Some(512 << 20);
        u.requested_memory_bytes = Some(1 << 30);
        u.memory_efficiency = Some(0.5);
        u.nodes = vec!["node7".into()];
        assert_eq!(describe(&u), "CPU 50% of 1 CPU, peak 512 MiB of 1.0 GiB (50%), 10 s on node7 (sacct)");
    }
}

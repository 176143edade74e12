//! Reading what ended jobs used, on the monitor's round trip: the jobs' own records
//! (written by the forged payload, [`crate::forge::usage`]) on every scheduler, and
//! Slurm's accounting, asked once for all the jobs of a (cluster, user) in one
//! `sacct` call, where the cluster has it.

use std::collections::BTreeMap;

use super::UsageQuery;
use super::common::{parse_slurm_time, unb64};
use crate::model::usage::{JobUse, Usage, UsageSource, parse_job_record};
use crate::shell::shell_quote;

/// What one round trip read of the jobs' usage.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct UsageAnswer {
    /// Whether the scheduler's accounting was asked (and answered).
    pub accounting_asked: bool,
    /// Job ID → what accounting says, for jobs it records as ended (all elements).
    pub accounting: BTreeMap<String, Usage>,
    /// Job ID → the job's own records (an array's elements added up).
    pub job: BTreeMap<String, Usage>,
}

/// The lines printing each job's own records: `USAGEREC <job> <base64 lines>`, the
/// lines of `<run>/.hpcforge/usage/<phase>` and `<phase>.*` (a job array's elements).
pub fn records_script(jobs: &[UsageQuery]) -> String {
    let mut s = String::new();
    for q in jobs {
        let dir = shell_quote(&format!("{}/.hpcforge/usage", q.run_dir)).into_owned();
        s.push_str(&format!(
            "printf 'USAGEREC %s %s\\n' {job} \"$(cat {dir}/{p} {dir}/{p}.* 2>/dev/null | hpcg_b64)\"\n",
            job = shell_quote(&q.job_id),
            p = q.phase,
        ));
    }
    s
}

/// Reads the `USAGEREC` lines: job ID → its records added up. Records of another job
/// (an earlier run's elements) are left out.
pub fn parse_records(body: &str) -> BTreeMap<String, Usage> {
    let mut out = BTreeMap::new();
    for line in body.lines() {
        let Some(rest) = line.strip_prefix("USAGEREC ") else { continue };
        let (job, text) = rest.split_once(' ').unwrap_or((rest, ""));
        let parts: Vec<JobUse> =
            unb64(text).lines().filter_map(parse_job_record).filter(|(j, _)| j == job).map(|(_, u)| u).collect();
        if let Some(u) = Usage::sum(UsageSource::Job, &parts) {
            out.insert(job.to_owned(), u);
        }
    }
    out
}

/// The fields Slurm's accounting is asked for, one line per job (or array element)
/// and per step.
pub const SACCT_USAGE_FORMAT: &str =
    "JobID,JobIDRaw,State,ExitCode,Start,End,Elapsed,TotalCPU,MaxRSS,NodeList,AllocCPUS,ReqMem,Timelimit";

/// The line asking Slurm's accounting about every job of `jobs` at once, printing
/// `SACCTUSAGE <status> <base64 answer>`.
pub fn sacct_script(jobs: &[UsageQuery]) -> String {
    let ids: Vec<&str> = jobs.iter().map(|q| q.job_id.as_str()).collect();
    format!(
        "hpcg_u=$(sacct -n -P -j {} -o {SACCT_USAGE_FORMAT} 2>&1); printf 'SACCTUSAGE %s %s\\n' \"$?\" \"$(printf '%s' \"$hpcg_u\" | hpcg_b64)\"\n",
        shell_quote(&ids.join(","))
    )
}

/// Reads the `SACCTUSAGE` line: `None` if accounting was not asked or failed.
pub fn parse_sacct_answer(body: &str) -> Option<BTreeMap<String, Usage>> {
    let rest = body.lines().find_map(|l| l.strip_prefix("SACCTUSAGE "))?;
    let (rc, text) = rest.split_once(' ').unwrap_or((rest, ""));
    (rc == "0").then(|| parse_sacct_usage(&unb64(text)))
}

/// Parses `sacct -n -P -o <SACCT_USAGE_FORMAT>` (without `-X`: the steps' lines carry
/// the peak memory): job ID → what it used, an array's elements added up under the
/// array's ID. A job some element of which accounting does not yet show as ended is
/// left out (asked again next time).
pub fn parse_sacct_usage(out: &str) -> BTreeMap<String, Usage> {
    // Job → element ("" for a plain job) → (its figures, ended, steps' CPU).
    type Elements = BTreeMap<String, (JobUse, bool, f64)>;
    let mut jobs: BTreeMap<String, Elements> = BTreeMap::new();
    for l in out.lines() {
        let f: Vec<&str> = l.split('|').collect();
        if f.len() < 12 {
            continue;
        }
        let (head, step) = match f[0].split_once('.') {
            Some((h, s)) => (h, Some(s)),
            None => (f[0], None),
        };
        let (job, element) = head.split_once('_').unwrap_or((head, ""));
        if job.is_empty() || !job.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        // `4711_[5-9]`: elements that never started; nothing used.
        if element.starts_with('[') {
            continue;
        }
        let entry = jobs
            .entry(job.to_owned())
            .or_default()
            .entry(element.to_owned())
            .or_insert_with(|| (JobUse::default(), false, 0.0));
        match step {
            Some(_) => {
                if let Some(rss) = size_bytes(f[8]) {
                    entry.0.max_rss = Some(entry.0.max_rss.map_or(rss, |m| m.max(rss)));
                }
                entry.2 += duration_seconds(f[7]).unwrap_or(0.0);
            }
            None => {
                let cpus: u32 = f[10].trim().parse().unwrap_or(1);
                entry.1 = ended(f[2]);
                entry.0.start = parse_slurm_time(f[4]).map(|t| t.unix_timestamp());
                entry.0.end = parse_slurm_time(f[5]).map(|t| t.unix_timestamp());
                entry.0.elapsed = duration_seconds(f[6]).unwrap_or(0.0);
                entry.0.cpu = duration_seconds(f[7]).unwrap_or(0.0);
                entry.0.cpus = cpus;
                entry.0.requested_memory = requested_memory(f[11], cpus);
                entry.0.node = Some(f[9].trim().to_owned()).filter(|n| !n.is_empty() && !n.starts_with("None"));
            }
        }
    }
    jobs.into_iter()
        .filter(|(_, els)| !els.is_empty() && els.values().all(|(_, ended, _)| *ended))
        .filter_map(|(job, els)| {
            let parts: Vec<JobUse> = els
                .into_values()
                // The job's line adds up its steps; where it says nothing, the steps do.
                .map(|(mut u, _, steps_cpu)| {
                    if u.cpu == 0.0 {
                        u.cpu = steps_cpu;
                    }
                    u
                })
                .collect();
            Usage::sum(UsageSource::Sacct, &parts).map(|u| (job, u))
        })
        .collect()
}

/// The line asking Grid Engine's accounting about one ended job, printing
/// `QACCTUSAGE <job> <base64 answer>` (qacct takes one job at a time; all of them
/// ride on the same round trip).
pub fn qacct_script(jobs: &[UsageQuery]) -> String {
    jobs.iter()
        .map(|q| {
            format!(
                "printf 'QACCTUSAGE %s %s\\n' {id} \"$(TZ=UTC qacct -j {id} 2>/dev/null | hpcg_b64)\"\n",
                id = shell_quote(&q.job_id)
            )
        })
        .collect()
}

/// Reads the `QACCTUSAGE` lines: job ID → what it used, an array's tasks added up
/// (the newest record of each task: job numbers come round again).
pub fn parse_qacct_answers(body: &str) -> BTreeMap<String, Usage> {
    let mut out = BTreeMap::new();
    for line in body.lines() {
        let Some(rest) = line.strip_prefix("QACCTUSAGE ") else { continue };
        let (job, text) = rest.split_once(' ').unwrap_or((rest, ""));
        if let Some(u) = parse_qacct_usage(&unb64(text), job) {
            out.insert(job.to_owned(), u);
        }
    }
    out
}

/// `qacct -j <job>` output: what job `job` used (`cpu`, `ru_wallclock`, `ru_maxrss`,
/// `slots`, `hostname`, `h_vmem` per slot from `category`).
pub fn parse_qacct_usage(text: &str, job: &str) -> Option<Usage> {
    let mut per_task: BTreeMap<String, JobUse> = BTreeMap::new();
    for fields in super::sge::qacct_blocks(text) {
        if fields.get("jobnumber").copied() != Some(job) {
            continue;
        }
        let secs = |k: &str| fields.get(k).and_then(|v| v.trim_end_matches('s').trim().parse::<f64>().ok());
        let slots: u32 = fields.get("slots").and_then(|s| s.parse().ok()).unwrap_or(1);
        let time = |k: &str| fields.get(k).and_then(|t| super::sge::acct_time(t)).map(|t| t.unix_timestamp());
        let per_slot = fields.get("category").and_then(|c| {
            c.split(|ch: char| ch.is_whitespace() || ch == ',').find_map(|kv| kv.strip_prefix("h_vmem="))
        });
        let task = fields.get("taskid").copied().unwrap_or("undefined").to_owned();
        per_task.insert(
            task,
            JobUse {
                start: time("start_time"),
                end: time("end_time"),
                elapsed: secs("ru_wallclock").unwrap_or(0.0),
                cpu: secs("cpu").unwrap_or(0.0),
                cpus: slots,
                // getrusage gives ru_maxrss in kilobytes, and qacct prints that number
                // as if it were bytes (`4.398KB` for a 4.4 MB shell): scaled back.
                max_rss: fields.get("ru_maxrss").and_then(|v| size_bytes(v)).map(|b| b.saturating_mul(1024)),
                requested_memory: per_slot.and_then(size_bytes).map(|b| b * u64::from(slots.max(1))),
                node: fields.get("hostname").map(|h| (*h).to_owned()),
            },
        );
    }
    let parts: Vec<JobUse> = per_task.into_values().collect();
    Usage::sum(UsageSource::Qacct, &parts)
}

/// Whether a job's accounting state is one it ended in.
fn ended(state: &str) -> bool {
    let word = state.split_whitespace().next().unwrap_or("");
    !matches!(
        word,
        "" | "PENDING" | "RUNNING" | "REQUEUED" | "RESIZING" | "SUSPENDED" | "COMPLETING" | "STAGE_OUT" | "SIGNALING"
    )
}

/// Slurm's durations: `[D-][HH:]MM:SS[.mmm]` (`00:06.011`, `1-02:03:04`); seconds.
pub fn duration_seconds(s: &str) -> Option<f64> {
    let s = s.trim();
    if s.is_empty() || s.contains("INVALID") || s.contains("UNLIMITED") {
        return None;
    }
    let (days, rest) = match s.split_once('-') {
        Some((d, r)) => (d.parse::<f64>().ok()?, r),
        None => (0.0, s),
    };
    let parts: Vec<&str> = rest.split(':').collect();
    let (h, m, sec) = match parts.as_slice() {
        [h, m, s] => (h.parse::<f64>().ok()?, m.parse::<f64>().ok()?, s.parse::<f64>().ok()?),
        [m, s] => (0.0, m.parse::<f64>().ok()?, s.parse::<f64>().ok()?),
        _ => return None,
    };
    Some(days * 86400.0 + h * 3600.0 + m * 60.0 + sec)
}

/// Sizes as accounting prints them: Slurm's `70808K`, `100M`, `2G`, a bare number of
/// bytes; Grid Engine's `4.398KB`, `3.434MB`, `0.000B`. Powers of 1024; bytes.
pub fn size_bytes(s: &str) -> Option<u64> {
    let s = s.trim();
    let split = s.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(s.len());
    let n: f64 = s[..split].parse().ok()?;
    let unit = s[split..].to_ascii_uppercase();
    let power = match unit.strip_suffix('B').unwrap_or(&unit) {
        "" => 0,
        "K" => 1,
        "M" => 2,
        "G" => 3,
        "T" => 4,
        _ => return None,
    };
    Some((n * 1024f64.powi(power)) as u64)
}

/// `ReqMem` (`100M`; older Slurm `100Mn` per node or `100Mc` per CPU), bytes per job.
fn requested_memory(s: &str, cpus: u32) -> Option<u64> {
    let s = s.trim();
    let (size, per_cpu) = match s.strip_suffix('c') {
        Some(x) => (x, true),
        None => (s.strip_suffix('n').unwrap_or(s), false),
    };
    let bytes = size_bytes(size).filter(|b| *b > 0)?;
    Some(if per_cpu { bytes * u64::from(cpus.max(1)) } else { bytes })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Real output of Slurm 22.05's sacct with slurmdbd (the test environment, captured
    /// 2026-12-05): plain jobs, a failed one, one cancelled before it started, and a
    /// job array.
    fn fixture() -> String {
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/slurm/sacct-P-usage.txt")).unwrap()
    }

    #[test]
    fn real_sacct_output_gives_each_jobs_use() {
        let u = parse_sacct_usage(&fixture());
        let busy = &u["7254"];
        assert_eq!(busy.source, UsageSource::Sacct);
        assert_eq!(busy.elapsed_seconds, 6.0);
        assert_eq!(busy.cpu_seconds, 6.011);
        assert_eq!(busy.max_rss_bytes, Some(70808 * 1024), "peak memory is on the step's line");
        assert_eq!(busy.requested_memory_bytes, Some(100 << 20));
        assert_eq!(busy.nodes, ["localhost"]);
        assert!(busy.cpu_efficiency.unwrap() > 0.99, "{busy:?}");
        let idle = &u["7258"];
        assert_eq!((idle.cpus, idle.cpu_capacity_seconds), (2, 12.0));
        assert!(idle.cpu_efficiency.unwrap() < 0.01, "{idle:?}");
        // Cancelled before it started: it used nothing, and no node.
        let never = &u["7257"];
        assert_eq!((never.cpu_seconds, never.cpu_efficiency), (0.0, None));
        assert!(never.nodes.is_empty());
        // The array's elements add up under the array's ID.
        let array = &u["7256"];
        assert!(array.jobs >= 2, "{array:?}");
        assert!(!u.contains_key("7259"), "elements are not jobs of their own");
    }

    #[test]
    fn a_job_accounting_still_shows_running_is_asked_again() {
        let text = "9001|9001|RUNNING|0:0|2026-12-05T03:22:28|Unknown|00:00:06|00:01.000||localhost|1|100M|UNLIMITED\n\
                    9002|9002|COMPLETED|0:0|2026-12-05T03:22:28|2026-12-05T03:22:34|00:00:06|00:01.000||localhost|1|100M|UNLIMITED\n\
                    9003_1|9004|COMPLETED|0:0|2026-12-05T03:22:28|2026-12-05T03:22:34|00:00:06|00:01.000||localhost|1|100M|UNLIMITED\n\
                    9003_2|9005|RUNNING|0:0|2026-12-05T03:22:28|Unknown|00:00:06|00:01.000||localhost|1|100M|UNLIMITED\n";
        let u = parse_sacct_usage(text);
        assert_eq!(u.keys().collect::<Vec<_>>(), ["9002"]);
    }

    #[test]
    fn durations_and_sizes_read_as_slurm_writes_them() {
        for (s, want) in [("00:06.011", 6.011), ("00:00:06", 6.0), ("1-02:03:04", 93784.0), ("12:00.5", 720.5)] {
            assert_eq!(duration_seconds(s), Some(want), "{s}");
        }
        for s in ["", "UNLIMITED", "x:y", "1:2:3:4"] {
            assert_eq!(duration_seconds(s), None, "{s}");
        }
        assert_eq!(size_bytes("70808K"), Some(70808 * 1024));
        assert_eq!(size_bytes("2G"), Some(2 << 30));
        assert_eq!(size_bytes("512"), Some(512));
        assert_eq!(size_bytes(""), None);
        assert_eq!(requested_memory("100Mc", 4), Some(400 << 20));
        assert_eq!(requested_memory("100Mn", 4), Some(100 << 20));
        assert_eq!(requested_memory("0", 1), None);
    }

    #[test]
    fn real_qacct_output_gives_the_jobs_use() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/sge/");
        let ok = std::fs::read_to_string(format!("{dir}qacct-completed.txt")).unwrap();
        let u = parse_qacct_usage(&ok, "1").unwrap();
        assert_eq!(u.source, UsageSource::Qacct);
        assert_eq!((u.elapsed_seconds, u.cpu_seconds, u.cpus), (8.0, 0.013, 1));
        assert_eq!(u.max_rss_bytes, Some((4.398 * 1024.0) as u64 * 1024), "ru_maxrss is in kilobytes");
        assert_eq!(u.nodes, ["vm"]);
        assert!(u.cpu_efficiency.unwrap() < 0.01);
        assert_eq!(parse_qacct_usage(&ok, "2"), None, "another job's record is not this one's");
        let array = std::fs::read_to_string(format!("{dir}qacct-array.txt")).unwrap();
        let id = array.lines().find_map(|l| l.strip_prefix("jobnumber")).unwrap().trim().to_owned();
        let u = parse_qacct_usage(&array, &id).unwrap();
        assert!(u.jobs > 1, "an array's tasks add up: {u:?}");
        assert_eq!(size_bytes("3.434MB"), Some((3.434 * 1048576.0) as u64));
        assert_eq!(size_bytes("0.000B"), Some(0));
        assert_eq!(size_bytes("x"), None);
    }

    #[test]
    fn the_jobs_own_records_are_read_and_another_runs_left_out() {
        use crate::scheduler::common::b64;
        let lines = "55 600 100 1000 1010 n1 1\n55 0 100 1000 1010 n2 1\n54 999 100 1 2 n1 1\nnot a record\n";
        let body = format!("USAGEREC 55 {}\nUSAGEREC 56 \n", b64(lines));
        let u = parse_records(&body);
        assert_eq!(u.len(), 1);
        let r = &u["55"];
        assert_eq!((r.source, r.jobs, r.cpu_seconds, r.cpu_efficiency), (UsageSource::Job, 2, 6.0, Some(0.3)));
    }

    #[test]
    fn the_records_script_reads_each_jobs_files() {
        let dir = tempfile::tempdir().unwrap();
        let run = dir.path().join("run dir");
        std::fs::create_dir_all(run.join(".hpcforge/usage")).unwrap();
        std::fs::write(run.join(".hpcforge/usage/work"), "7 100 100 1000 1002 n1 1\n").unwrap();
        std::fs::write(run.join(".hpcforge/usage/work.2"), "7 100 100 1000 1002 n1 1\n").unwrap();
        std::fs::write(run.join(".hpcforge/usage/workshop"), "7 100 100 1000 1002 n1 1\n").unwrap();
        let q = UsageQuery {
            job_id: "7".into(),
            run_dir: run.to_str().unwrap().into(),
            phase: crate::model::Phase::parse("work").unwrap(),
        };
        let script = format!("{}{}", crate::scheduler::common::HELPERS, records_script(&[q]));
        let out = std::process::Command::new("sh").arg("-c").arg(&script).output().unwrap();
        let u = parse_records(&String::from_utf8_lossy(&out.stdout));
        assert_eq!(u["7"].jobs, 2, "the phase's files, not another phase's that starts alike");
    }
}

//! Slurm: `sbatch --parsable` with `afterok`/`afterany` dependencies and a tag in
//! `--comment`; one `squeue -O` per (cluster, user) per tick, with `sacct` (clusters
//! with accounting) or `scontrol show job` for jobs that left the queue; `scancel`.

use std::collections::BTreeMap;

use super::common::{parse_slurm_time, unb64};
use super::{JobQuery, JobStatus, Scheduler, SubmitPlan, SubmitReport};
use crate::model::workflow::Condition;
use crate::model::{Phase, PhaseState, SchedulerKind, UserName};
use crate::shell::shell_quote;

/// The `squeue -O` fields read, `|`-separated.
pub const SQUEUE_FORMAT: &str =
    "JobID:|,ArrayJobID:|,ArrayTaskID:|,State:|,Reason:|,Comment:|,StartTime:|,EndTime:|,exit_code:";

/// The Slurm adapter.
#[derive(Debug, Clone, Copy)]
pub struct Slurm {
    /// Whether `sacct` can answer for jobs that left the queue.
    pub accounting: bool,
}

/// Reads a job ID as `sbatch --parsable` prints it: `N` or `N;cluster`, on the last
/// line (warnings may come before). Anything else is not a job ID.
pub fn parse_job_id(out: &str) -> Option<String> {
    let last = out.lines().rev().find(|l| !l.trim().is_empty())?.trim();
    let (id, cluster) = match last.split_once(';') {
        Some((id, c)) => (id, Some(c)),
        None => (last, None),
    };
    let id_ok = !id.is_empty() && id.len() <= 20 && id.bytes().all(|b| b.is_ascii_digit());
    let cluster_ok =
        cluster.is_none_or(|c| !c.is_empty() && c.bytes().all(|b| b.is_ascii_alphanumeric() || b"_-.".contains(&b)));
    (id_ok && cluster_ok).then(|| id.to_owned())
}

/// Maps a Slurm job state name to a phase state (`COMPLETED` with a non-zero exit
/// code is a failure).
pub fn map_state(raw: &str, exit_code: Option<i32>) -> PhaseState {
    // sacct writes "CANCELLED by 1001".
    match raw.split_whitespace().next().unwrap_or("").trim_end_matches('+') {
        "PENDING" | "REQUEUED" | "REQUEUE_HOLD" | "REQUEUE_FED" => PhaseState::Pending,
        "RUNNING" | "CONFIGURING" | "COMPLETING" | "RESIZING" | "SUSPENDED" | "STAGE_OUT" | "SIGNALING" | "STOPPED" => {
            PhaseState::Running
        }
        "COMPLETED" if exit_code.unwrap_or(0) == 0 => PhaseState::Completed,
        "COMPLETED" | "FAILED" | "BOOT_FAIL" | "DEADLINE" | "PREEMPTED" | "REVOKED" | "SPECIAL_EXIT" => {
            PhaseState::Failed
        }
        "CANCELLED" => PhaseState::Cancelled,
        "TIMEOUT" => PhaseState::Timeout,
        "OUT_OF_MEMORY" => PhaseState::OutOfMemory,
        "NODE_FAIL" => PhaseState::NodeFail,
        _ => PhaseState::Unknown,
    }
}

/// Splits a raw wait status (`squeue -O exit_code`) into exit code and signal.
fn wait_status(raw: i32) -> (Option<i32>, Option<i32>) {
    let signal = raw & 0x7f;
    if signal != 0 { (None, Some(signal)) } else { (Some((raw >> 8) & 0xff), None) }
}

/// Splits `a:b` (`ExitCode=3:0`) into exit code and signal.
fn colon_status(s: &str) -> (Option<i32>, Option<i32>) {
    let mut it = s.split(':');
    let code = it.next().and_then(|c| c.trim().parse().ok());
    let sig = it.next().and_then(|c| c.trim().parse::<i32>().ok()).filter(|s| *s != 0);
    if sig.is_some() { (None, sig) } else { (code, None) }
}

fn none_if_placeholder(s: &str) -> Option<String> {
    let s = s.trim();
    (!s.is_empty() && !matches!(s, "None" | "(null)" | "N/A")).then(|| s.to_owned())
}

fn status(raw: &str, exit: (Option<i32>, Option<i32>), reason: &str, start: &str, end: &str) -> JobStatus {
    let state = map_state(raw, exit.0);
    // A job Slurm ended (time limit, cancel, memory, node) shows the signal it sent
    // either as the signal (`0:15`, the shell died of it) or as 128 + it (`143:0`, the
    // shell exited after its child died of it), depending on timing: one answer.
    let ended_by_slurm =
        matches!(state, PhaseState::Timeout | PhaseState::Cancelled | PhaseState::OutOfMemory | PhaseState::NodeFail);
    let exit = match exit {
        (Some(code), None) if ended_by_slurm && (129..=192).contains(&code) => (None, Some(code - 128)),
        other => other,
    };
    JobStatus {
        state,
        raw_state: raw.split_whitespace().next().unwrap_or("").to_owned(),
        exit_code: if state.is_final() { exit.0 } else { None },
        signal: if state.is_final() { exit.1 } else { None },
        reason: none_if_placeholder(reason),
        started_at: parse_slurm_time(start),
        // For live jobs Slurm shows the projected end (the time limit): not an end.
        ended_at: if state.is_final() { parse_slurm_time(end) } else { None },
        frames: None,
    }
}

/// Parses `squeue --noheader -O <SQUEUE_FORMAT>` lines: job ID → status. A comment
/// holding `|` is read from both ends, so the other fields stay right. The elements
/// of a job array are one entry, under the array's ID ([`combine`]).
pub fn parse_squeue(out: &str) -> BTreeMap<String, (JobStatus, String)> {
    let mut jobs: BTreeMap<String, (Vec<JobStatus>, String)> = BTreeMap::new();
    for line in out.lines() {
        let f: Vec<&str> = line.split('|').collect();
        if f.len() < 9 {
            continue;
        }
        let n = f.len();
        let (id, array, task, raw, reason) = (f[0].trim(), f[1].trim(), f[2].trim(), f[3].trim(), f[4]);
        let comment = f[5..n - 3].join("|");
        let (start, end, exit) = (f[n - 3], f[n - 2], f[n - 1].trim());
        let key = if task != "N/A" && !task.is_empty() { array } else { id };
        if key.is_empty() || !key.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let exit = exit.parse::<i32>().map(wait_status).unwrap_or((None, None));
        let entry = jobs.entry(key.to_owned()).or_insert_with(|| (Vec::new(), comment.trim().to_owned()));
        entry.0.push(status(raw, exit, reason, start, end));
    }
    jobs.into_iter().map(|(id, (sts, comment))| (id, (super::combine(sts), comment))).collect()
}

/// Reads one `scontrol show job -o` record: (its job ID, or for an array element the
/// array's, status).
pub fn parse_scontrol_line(line: &str) -> Option<(String, JobStatus)> {
    let fields: BTreeMap<&str, &str> = line.split_whitespace().filter_map(|w| w.split_once('=')).collect();
    let id = fields.get("ArrayJobId").or_else(|| fields.get("JobId"))?.to_string();
    let raw = fields.get("JobState")?;
    let exit = fields.get("ExitCode").map(|e| colon_status(e)).unwrap_or((None, None));
    let reason = fields.get("Reason").copied().unwrap_or("None");
    Some((id, status(raw, exit, reason, fields.get("StartTime").unwrap_or(&""), fields.get("EndTime").unwrap_or(&""))))
}

/// The fields asked of `sacct` (`-X -n -P -o ...`).
pub const SACCT_FORMAT: &str = "JobID,JobIDRaw,State,ExitCode,Start,End";

/// Parses `sacct -X -n -P -o <SACCT_FORMAT>` lines: job ID → status. The elements of
/// a job array (`JobID` `4711_3`, or `4711_[5-9]` for those that never started) are
/// one entry under the array's ID ([`super::combine`]).
pub fn parse_sacct(out: &str) -> BTreeMap<String, JobStatus> {
    let mut jobs: BTreeMap<String, Vec<JobStatus>> = BTreeMap::new();
    for l in out.lines() {
        let f: Vec<&str> = l.split('|').collect();
        if f.len() < 6 {
            continue;
        }
        // `<job>.batch`, `<array>_<index>.0`: a step's line, not a job's.
        if f[0].contains('.') {
            continue;
        }
        let key = f[0].split('_').next().unwrap_or("");
        if key.is_empty() || !key.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        jobs.entry(key.to_owned()).or_default().push(status(f[2], colon_status(f[3]), "None", f[4], f[5]));
    }
    jobs.into_iter().map(|(id, sts)| (id, super::combine(sts))).collect()
}

fn squeue_cmd(user: &UserName, format: &str) -> String {
    format!("squeue --noheader --states=all -u {} -O {}", shell_quote(user.as_str()), shell_quote(format))
}

/// Slurm's own messages that pass: the controller busy or unreachable, the database.
const TRANSIENT: &[&str] = &[
    "socket timed out",
    "unable to contact slurm controller",
    "slurm_persist_conn",
    "problem talking to database",
    "communication connection failure",
    "slurmctld not responding",
    "zero bytes were transmitted",
];

/// Plain explanations of Slurm's refusals, by message fragment.
const EXPLAINED: &[(&str, &str)] = &[
    (
        "invalid partition",
        "the partition does not exist on this cluster; check the `partition` of the application or cluster definition",
    ),
    ("invalid account", "the account does not exist, or this user may not charge it"),
    ("invalid qos", "the quality of service (QOS) does not exist, or this user may not use it"),
    ("time limit", "the wall time asked for is longer than the partition allows"),
    ("requested node configuration is not available", "no node of the cluster has the CPUs or memory asked for"),
    ("memory specification can not be satisfied", "no node of the cluster has the memory asked for"),
    ("more processors requested than permitted", "more CPUs were asked for than the partition allows"),
    (
        "job violates accounting/qos policy",
        "the job breaks an accounting or QOS limit (for example the number of jobs a user may queue)",
    ),
];

impl Scheduler for Slurm {
    fn kind(&self) -> SchedulerKind {
        SchedulerKind::Slurm
    }

    fn directive_prefix(&self) -> Option<&'static str> {
        Some("#SBATCH")
    }

    fn job_id_variable(&self) -> &'static str {
        "SLURM_JOB_ID"
    }

    fn array_job_id_variable(&self) -> &'static str {
        "SLURM_ARRAY_JOB_ID"
    }

    fn transient_phrases(&self) -> &'static [&'static str] {
        TRANSIENT
    }

    fn explanations(&self) -> &'static [(&'static str, &'static str)] {
        EXPLAINED
    }

    fn submit_commands(&self, plan: &SubmitPlan) -> String {
        // Only `sbatch` forks on the way: the job ID's last line is cut with parameter
        // expansion, and the output is base64-encoded only when it is an error.
        let mut s = String::from(super::common::SUBMIT_REPORT);
        s.push_str(super::common::frames_helpers(plan));
        s.push_str(
            "hpcg_submit() { # phase script tag dependency array\n\
             \x20 hpcg_out=$(sbatch --parsable --comment=\"$3\" --kill-on-invalid-dep=yes ${4:+--dependency=\"$4\"} ${5:+--array=\"$5\"} \"$2\" 2>&1); hpcg_rc=$?\n\
             \x20 hpcg_report \"$1\"\n\
             }\n",
        );
        for (phase, id) in &plan.known {
            s.push_str(&format!("hpcg_id_{phase}={}\n", shell_quote(id)));
        }
        s.push_str("hpcg_go=$hpcg_stage_ok\n");
        for p in &plan.phases {
            // All of them must hold (`,`), each with Slurm's own condition.
            let dep: Vec<String> = p
                .after
                .iter()
                .map(|w| {
                    let kind = match w.when {
                        // Element i after element i succeeded.
                        _ if w.per_frame => "aftercorr",
                        Condition::Succeeded => "afterok",
                        Condition::Ended => "afterany",
                        Condition::Failed => "afternotok",
                    };
                    format!("{kind}:${{hpcg_id_{}}}", w.phase)
                })
                .collect();
            let dep = dep.join(",");
            if let Some(a) = &p.array {
                s.push_str("if [ \"$hpcg_go\" = 1 ]; then\n");
                s.push_str(&super::common::frames_prep(p.phase, a));
                s.push_str("fi\n");
            }
            s.push_str(&format!(
                "if [ \"$hpcg_go\" = 1 ] && hpcg_submit {phase} \"$hpcg_run/.hpcforge/script_{phase}\" {tag} \"{dep}\" \"{array}\"; then hpcg_id_{phase}=$hpcg_job; else hpcg_go=0; fi\n",
                phase = p.phase,
                array = p.array.as_ref().map(|a| match a.max_parallel {
                    Some(m) => format!("1-{}%{m}", a.elements),
                    None => format!("1-{}", a.elements),
                }).unwrap_or_default(),
                tag = shell_quote(&p.tag),
            ));
        }
        s
    }

    fn parse_submit(&self, body: &str, report: &mut SubmitReport) {
        parse_submit(body, report);
    }

    fn status_script(&self, user: &UserName, jobs: &[JobQuery]) -> String {
        let mut s = String::from(super::common::HELPERS);
        s.push_str(&format!("hpcg_q=$({} 2>&1); hpcg_rc=$?\n", squeue_cmd(user, SQUEUE_FORMAT)));
        s.push_str("printf 'SQUEUE %s %s\\n' \"$hpcg_rc\" \"$(printf '%s' \"$hpcg_q\" | hpcg_b64)\"\n");
        // Jobs that left the queue (found with one awk over squeue's answer, however
        // many jobs there are): ask accounting once for all of them, or the
        // controller's memory for each.
        let ids: Vec<&str> = jobs.iter().map(|j| j.job_id.as_str()).collect();
        s.push_str("if [ \"$hpcg_rc\" -eq 0 ]; then\n");
        s.push_str(&format!(
            "  hpcg_lost=$(printf '%s\\n' \"$hpcg_q\" | awk -F'|' -v want={} 'BEGIN {{ n = split(want, w, \" \"); for (i = 1; i <= n; i++) need[w[i]] = 1 }} {{ gsub(/ /, \"\", $1); gsub(/ /, \"\", $2); delete need[$1]; delete need[$2] }} END {{ for (k in need) print k }}')\n",
            shell_quote(&ids.join(" "))
        ));
        if self.accounting {
            s.push_str("  if [ -n \"$hpcg_lost\" ]; then\n");
            s.push_str(&format!("    printf 'SACCT %s\\n' \"$(sacct -X -n -P -j \"$(printf '%s' \"$hpcg_lost\" | tr '\\n' ',')\" -o {SACCT_FORMAT} 2>&1 | hpcg_b64)\"\n"));
            s.push_str("  fi\n");
        } else {
            s.push_str("  for hpcg_id in $hpcg_lost; do\n");
            s.push_str(
                "    printf 'LOST %s %s\\n' \"$hpcg_id\" \"$(scontrol show job -o \"$hpcg_id\" 2>&1 | hpcg_b64)\"\n",
            );
            s.push_str("  done\n");
        }
        s.push_str("fi\n");
        s
    }

    fn parse_status(&self, body: &str) -> Result<BTreeMap<String, JobStatus>, String> {
        let mut out = BTreeMap::new();
        let mut asked = false;
        for line in body.lines() {
            if let Some(rest) = line.strip_prefix("SQUEUE ") {
                let (rc, text) = rest.split_once(' ').unwrap_or((rest, ""));
                if rc != "0" {
                    return Err(format!("squeue failed: {}", unb64(text).trim()));
                }
                asked = true;
                out.extend(parse_squeue(&unb64(text)).into_iter().map(|(id, (st, _))| (id, st)));
            } else if let Some(text) = line.strip_prefix("SACCT ") {
                out.extend(parse_sacct(&unb64(text)));
            } else if let Some(rest) = line.strip_prefix("LOST ") {
                let (id, text) = rest.split_once(' ').unwrap_or((rest, ""));
                let text = unb64(text);
                let found = if self.accounting {
                    parse_sacct(&text).remove(id)
                } else {
                    let sts: Vec<JobStatus> =
                        text.lines().filter_map(parse_scontrol_line).filter(|(j, _)| j == id).map(|(_, s)| s).collect();
                    (!sts.is_empty()).then(|| super::combine(sts))
                };
                if let Some(st) = found {
                    out.insert(id.to_owned(), st);
                }
            }
        }
        if asked { Ok(out) } else { Err("the status query printed no squeue result".into()) }
    }

    fn usage_script(&self, jobs: &[super::UsageQuery]) -> String {
        let mut s = super::usage::records_script(jobs);
        if self.accounting && !jobs.is_empty() {
            s.push_str(&super::usage::sacct_script(jobs));
        }
        s
    }

    fn parse_usage(&self, body: &str) -> super::usage::UsageAnswer {
        let accounting = super::usage::parse_sacct_answer(body);
        super::usage::UsageAnswer {
            accounting_asked: accounting.is_some(),
            accounting: accounting.unwrap_or_default(),
            job: super::usage::parse_records(body),
        }
    }

    fn find_script(&self, user: &UserName, run_dir: &str, tags: &BTreeMap<Phase, String>) -> String {
        let mut s = String::from(super::common::HELPERS);
        s.push_str(&format!("hpcg_q=$({} 2>&1); hpcg_rc=$?\n", squeue_cmd(user, SQUEUE_FORMAT)));
        s.push_str("printf 'SQUEUE %s %s\\n' \"$hpcg_rc\" \"$(printf '%s' \"$hpcg_q\" | hpcg_b64)\"\n");
        s.push_str(&super::common::start_markers(run_dir, tags));
        s
    }

    fn parse_find(&self, body: &str, tags: &BTreeMap<Phase, String>) -> BTreeMap<Phase, Vec<String>> {
        let mut found: BTreeMap<Phase, Vec<String>> = BTreeMap::new();
        for line in body.lines() {
            if let Some(rest) = line.strip_prefix("SQUEUE ") {
                let (rc, text) = rest.split_once(' ').unwrap_or((rest, ""));
                if rc != "0" {
                    continue;
                }
                for (id, (_, comment)) in parse_squeue(&unb64(text)) {
                    if let Some((phase, _)) = tags.iter().find(|(_, t)| **t == comment) {
                        found.entry(*phase).or_default().push(id);
                    }
                }
            }
        }
        for (p, id) in super::common::parse_started(body, parse_job_id) {
            found.entry(p).or_default().push(id);
        }
        for ids in found.values_mut() {
            ids.sort_by_key(|id| id.parse::<u64>().unwrap_or(u64::MAX));
            ids.dedup();
        }
        found
    }

    fn output_file(&self, run_dir: &str, phase: Phase, job_id: &str, stderr: bool) -> String {
        // forge-templates/slurm: `--output=<run dir>/<phase>-%j.out` (and .err); %j is
        // the job number, without the `;cluster` that --parsable may add.
        let job = job_id.split(';').next().unwrap_or(job_id);
        format!("{run_dir}/{phase}-{job}.{}", if stderr { "err" } else { "out" })
    }

    fn cancel_script(&self, jobs: &[JobQuery]) -> String {
        let ids: Vec<String> = jobs.iter().map(|j| shell_quote(&j.job_id).into_owned()).collect();
        format!(
            "{}hpcg_out=$(scancel {} 2>&1); printf 'CANCEL %s %s\\n' \"$?\" \"$(printf '%s' \"$hpcg_out\" | hpcg_b64)\"\n",
            super::common::HELPERS,
            ids.join(" ")
        )
    }
}

/// Reads the `SUBMIT` lines of a submission report.
pub fn parse_submit(body: &str, report: &mut SubmitReport) {
    super::common::parse_submit(body, report, parse_job_id);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scheduler::SubmitOutcome;
    use crate::scheduler::common::b64;

    use crate::scheduler::tests::slurm_fixture as fixture;

    #[test]
    fn job_ids_are_read_strictly() {
        assert_eq!(parse_job_id(&fixture("sbatch-parsable.txt")).as_deref(), Some("49"));
        assert_eq!(parse_job_id("sbatch: warning: x\n1234;cluster-a\n").as_deref(), Some("1234"));
        for bad in ["", "Submitted batch job 12", "12a", "12;", ";c", &fixture("sbatch-invalid-partition.txt")] {
            assert_eq!(parse_job_id(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn a_signal_slurm_sent_reads_the_same_whether_the_shell_died_of_it_or_exited_after_it() {
        let died = status("TIMEOUT", colon_status("0:15"), "TimeLimit", "", "");
        let exited = status("TIMEOUT", colon_status("143:0"), "TimeLimit", "", "");
        assert_eq!((died.signal, died.exit_code), (Some(15), None));
        assert_eq!((exited.signal, exited.exit_code), (Some(15), None));
        // A script that exits 143 by itself still fails with its own exit code.
        let own = status("FAILED", colon_status("143:0"), "NonZeroExitCode", "", "");
        assert_eq!((own.signal, own.exit_code), (None, Some(143)));
    }

    #[test]
    fn squeue_output_maps_every_state_with_exit_codes_and_signals() {
        let jobs = parse_squeue(&fixture("squeue-O-all-states.txt"));
        let st = |id: &str| jobs.get(id).map(|(s, _)| s.clone()).unwrap_or_else(|| panic!("job {id}"));
        // Prolog exited 3: wait status 768.
        assert_eq!((st("38").state, st("38").exit_code), (PhaseState::Failed, Some(3)));
        // Cancelled because the prolog failed: a dependency that can never be met.
        assert_eq!(
            (st("39").state, st("39").reason.as_deref()),
            (PhaseState::Cancelled, Some("DependencyNeverSatisfied"))
        );
        assert_eq!((st("40").state, st("40").exit_code), (PhaseState::Completed, Some(0)));
        // scancel: signal 15.
        assert_eq!((st("41").state, st("41").signal, st("41").exit_code), (PhaseState::Cancelled, Some(15), None));
        assert_eq!((st("43").state, st("43").exit_code), (PhaseState::Failed, Some(7)));
        assert_eq!((st("44").state, st("44").signal), (PhaseState::Failed, Some(9)));
        assert_eq!(st("48").state, PhaseState::Pending);
        assert_eq!(st("48").reason.as_deref(), Some("JobHeldUser"));
        assert_eq!(jobs["40"].1, "hpcforge:t1:epilog");
        assert!(st("38").ended_at.is_some());
        // A live job's EndTime is its time limit, not an end.
        let running: Vec<_> = jobs.values().filter(|(s, _)| s.state == PhaseState::Running).collect();
        assert!(running.iter().all(|(s, _)| s.ended_at.is_none() && s.exit_code.is_none()), "{running:?}");
    }

    #[test]
    fn the_condition_codes_seen_on_a_real_slurm_map_to_their_states() {
        // Captured: a job over its --time (TIMEOUT, SIGTERM at the limit), and a job
        // whose node was set down (NODE_FAIL), from squeue and from scontrol.
        for (squeue, scontrol, id, state, reason) in [
            ("squeue-O-timeout.txt", "scontrol-show-job-o-timeout.txt", "298", PhaseState::Timeout, "TimeLimit"),
            ("squeue-O-node-fail.txt", "scontrol-show-job-o-node-fail.txt", "299", PhaseState::NodeFail, "NodeDown"),
        ] {
            let q = parse_squeue(&fixture(squeue));
            let (st, comment) = &q[id];
            assert_eq!((st.state, st.signal, st.reason.as_deref()), (state, Some(15), Some(reason)), "{squeue}");
            assert!(comment.starts_with("hpcforge:fixture:"), "{comment}");
            assert!(st.ended_at.is_some() && st.started_at.is_some());
            let (sid, s) = fixture(scontrol).lines().filter_map(parse_scontrol_line).next().unwrap();
            assert_eq!((sid.as_str(), s.state, s.signal), (id, state, Some(15)), "{scontrol}");
        }
        // Memory: without cgroups Slurm kills over-limit jobs but calls them FAILED.
        let q = parse_squeue(&fixture("squeue-O-memory-limit-kill.txt"));
        assert_eq!((q["300"].0.state, q["300"].0.signal), (PhaseState::Failed, Some(9)));
        assert!(fixture("memory-limit-kill-output.txt").contains("Exceeded job memory limit"));
        assert_eq!(map_state("OUT_OF_MEMORY", None), PhaseState::OutOfMemory);
    }

    #[test]
    fn scontrol_lines_give_state_exit_code_and_times() {
        let text = fixture("scontrol-show-job-o.txt");
        let jobs: BTreeMap<_, _> = text.lines().filter_map(parse_scontrol_line).collect();
        assert_eq!((jobs["38"].state, jobs["38"].exit_code), (PhaseState::Failed, Some(3)));
        assert_eq!((jobs["43"].state, jobs["43"].exit_code), (PhaseState::Failed, Some(7)));
        assert_eq!(jobs["38"].raw_state, "FAILED");
        assert!(fixture("scontrol-invalid-job.txt").lines().filter_map(parse_scontrol_line).next().is_none());
    }

    #[test]
    fn a_job_that_left_the_queue_is_never_assumed_completed() {
        let s = Slurm { accounting: false };
        let body = format!(
            "SQUEUE 0 {}\nLOST 999999 {}\n",
            b64(&fixture("squeue-O-all-states.txt")),
            b64(&fixture("scontrol-invalid-job.txt"))
        );
        let statuses = s.parse_status(&body).unwrap();
        assert!(!statuses.contains_key("999999"), "nothing could tell, so it is absent (the caller makes it unknown)");
        assert_eq!(statuses["40"].state, PhaseState::Completed);
        // When squeue itself fails, nothing is known — not "everything ended".
        let err = s
            .parse_status(&format!("SQUEUE 1 {}\n", b64("slurm_load_jobs error: Unable to contact slurm controller")))
            .unwrap_err();
        assert!(err.contains("Unable to contact"), "{err}");
    }

    #[test]
    fn sacct_lines_are_read_for_clusters_with_accounting() {
        // Captured from the test environment's slurmdbd (see the fixtures' README): a
        // job that succeeded, one that exited 3, one cancelled before it started, one
        // with 2 CPUs, an array 1-3 whose element 2 exited 5, and one cancelled while
        // it ran. Elements are
        // `<array>_<index>`, their own job IDs in JobIDRaw.
        let jobs = parse_sacct(&fixture("sacct-X-P.txt"));
        assert_eq!(jobs.len(), 6, "{jobs:?}");
        assert_eq!((jobs["7254"].state, jobs["7254"].exit_code), (PhaseState::Completed, Some(0)));
        assert_eq!((jobs["7255"].state, jobs["7255"].exit_code), (PhaseState::Failed, Some(3)));
        assert_eq!(jobs["7257"].state, PhaseState::Cancelled);
        // Cancelled while running: sacct -X gives the job `0:0` (the signal, 15, is
        // only on its batch step, which the monitor's query leaves out), and that is
        // what is reported: no signal is made up.
        assert_eq!(
            (jobs["7923"].state, jobs["7923"].exit_code, jobs["7923"].signal),
            (PhaseState::Cancelled, Some(0), None)
        );
        assert_eq!(jobs["7258"].state, PhaseState::Completed);
        // The array is one job, under its own ID, failed because element 2 did, from
        // the first start to the last end.
        assert_eq!((jobs["7256"].state, jobs["7256"].exit_code), (PhaseState::Failed, Some(5)));
        assert_eq!(jobs["7256"].started_at.unwrap().second(), 38);
        assert_eq!(jobs["7256"].ended_at.unwrap().second(), 43);
        // Lines sacct prints for a job's steps (without -X) never count as jobs.
        let with_steps = parse_sacct(&fixture("sacct-P-usage.txt"));
        assert_eq!(with_steps, jobs);
    }

    #[test]
    fn jobs_are_found_again_by_their_tag_or_their_start_marker() {
        let s = Slurm { accounting: false };
        let tags = BTreeMap::from([
            (Phase::PROLOG, "hpcforge:t1:prolog".to_owned()),
            (Phase::EXECUTE, "hpcforge:t1:execute".to_owned()),
            (Phase::EPILOG, "hpcforge:gone:epilog".to_owned()),
        ]);
        let body = format!("SQUEUE 0 {}\nSTARTED epilog 77\n", b64(&fixture("squeue-O-all-states.txt")));
        let found = s.parse_find(&body, &tags);
        assert_eq!(
            found,
            BTreeMap::from([
                (Phase::PROLOG, vec!["38".into()]),
                (Phase::EXECUTE, vec!["39".into()]),
                (Phase::EPILOG, vec!["77".into()])
            ])
        );
    }

    #[test]
    fn submission_reports_keep_the_schedulers_words() {
        let mut r = SubmitReport::default();
        let body = format!(
            "SUBMIT prolog 0 ={}\nSUBMIT execute 1 {}\nSUBMIT epilog 90 {}\n",
            fixture("sbatch-parsable.txt").trim(),
            b64(&fixture("sbatch-invalid-partition.txt")),
            b64("Submitted, sort of")
        );
        parse_submit(&body, &mut r);
        assert_eq!(r.outcomes[&Phase::PROLOG], SubmitOutcome::Submitted("49".into()));
        assert!(!r.outcomes.contains_key(&Phase::EPILOG), "an unreadable yes is left to the lookup by tag");
        let SubmitOutcome::Refused { status, message } = &r.outcomes[&Phase::EXECUTE] else { panic!() };
        assert_eq!((*status, message.as_str()), (1, fixture("sbatch-invalid-partition.txt").trim()));
    }

    #[test]
    fn the_elements_of_a_job_array_are_one_job_under_the_arrays_id() {
        // Five elements, two at a time; element 3 exits 1. While some wait: pending.
        let q = parse_squeue(&fixture("squeue-O-array-pending.txt"));
        assert_eq!(q["1999"].0.state, PhaseState::Pending);
        assert_eq!(q["1999"].1, "hpcforge:T:render");
        assert_eq!(q["2000"].0.state, PhaseState::Pending, "a plain job is itself");
        // All ended: the array failed, with the failing element's exit code.
        let text = fixture("scontrol-show-job-o-array.txt");
        let sts: Vec<JobStatus> = text
            .lines()
            .filter_map(parse_scontrol_line)
            .map(|(id, s)| {
                assert_eq!(id, "1999");
                s
            })
            .collect();
        assert_eq!(sts.len(), 5);
        let all = crate::scheduler::combine(sts.clone());
        assert_eq!((all.state, all.exit_code), (PhaseState::Failed, Some(1)), "{all:?}");
        assert!(all.ended_at.is_some());
        // Without the failing element: completed.
        let ok: Vec<JobStatus> = sts.into_iter().filter(|s| s.state == PhaseState::Completed).collect();
        assert_eq!(crate::scheduler::combine(ok).state, PhaseState::Completed);
    }
}

//! The scheduler contract (submit with dependencies, batched status, cancel, find by
//! tag) and the shell plumbing every scheduler shares: run directory, staging, script
//! files, and the line protocol results come back in.
//!
//! Scripts produced here run on the cluster as the user through [`super::remote`];
//! the parsers that read their output are pure functions, tested on output captured
//! from a real Slurm (`tests/fixtures/slurm/`).

use std::collections::BTreeMap;

use base64::Engine as _;
use time::OffsetDateTime;

use crate::forge::inputs::StagedFile;
use crate::forge::quote::shell_quote;
use crate::model::{Phase, PhaseState, UserName};

/// What an earlier phase must have done before a phase starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dependency {
    /// Start right away.
    None,
    /// Start once that phase succeeded (exit 0); never if it failed.
    AfterOk(Phase),
    /// Start once that phase ended, whatever its outcome.
    AfterAny(Phase),
}

/// One phase to hand to the scheduler.
#[derive(Debug, Clone)]
pub struct PhaseSubmission {
    /// Which phase.
    pub phase: Phase,
    /// The forged script.
    pub script: String,
    /// The tag that finds the job again (`hpcforge:<task>:<phase>`).
    pub tag: String,
    /// What it waits for.
    pub after: Dependency,
}

/// Everything one submission round trip does.
#[derive(Debug, Clone)]
pub struct SubmitPlan {
    /// The task's run directory.
    pub run_dir: String,
    /// Files to stage first (empty after the first submission).
    pub stage: Vec<StagedFile>,
    /// Phases to submit, in order.
    pub phases: Vec<PhaseSubmission>,
    /// Job IDs of phases already submitted (dependencies may name them).
    pub known: BTreeMap<Phase, String>,
}

/// What became of one phase in a submission.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SubmitOutcome {
    /// Accepted; the scheduler's job ID.
    Submitted(String),
    /// Refused by the scheduler, with its exit status and own words.
    Refused {
        /// Exit status of the submit command.
        status: i32,
        /// Its output, verbatim.
        message: String,
    },
    /// Not tried, because something before it failed.
    NotTried,
}

/// What a submission round trip reported.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SubmitReport {
    /// Inputs that could not be staged: (file name, the error, verbatim).
    pub stage_failures: Vec<(String, String)>,
    /// Per phase.
    pub outcomes: BTreeMap<Phase, SubmitOutcome>,
}

/// A job's state as the scheduler tells it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobStatus {
    /// The state, in hpcforge's words.
    pub state: PhaseState,
    /// The scheduler's own state name (`COMPLETED`, `FAILED`, ...).
    pub raw_state: String,
    /// Exit code, when the job ended normally.
    pub exit_code: Option<i32>,
    /// The signal that ended it, if one did.
    pub signal: Option<i32>,
    /// The scheduler's reason (`Resources`, `DependencyNeverSatisfied`).
    pub reason: Option<String>,
    /// When it started.
    pub started_at: Option<OffsetDateTime>,
    /// When it ended.
    pub ended_at: Option<OffsetDateTime>,
}

/// A job to ask about.
#[derive(Debug, Clone)]
pub struct JobQuery {
    /// Its ID.
    pub job_id: String,
    /// Its task's run directory (where job-start markers are).
    pub run_dir: String,
    /// Its phase.
    pub phase: Phase,
}

/// A batch scheduler, seen as scripts to run as the user and parsers of their output.
pub trait Scheduler: Send + Sync {
    /// The commands that submit `plan.phases` (after [`prelude`] has run); they print
    /// `SUBMIT <phase> <status> <b64 output>` per phase tried.
    fn submit_commands(&self, plan: &SubmitPlan) -> String;

    /// Reads the `SUBMIT` lines into `report`.
    fn parse_submit(&self, body: &str, report: &mut SubmitReport);

    /// One script asking about all of `user`'s `jobs` at once.
    fn status_script(&self, user: &UserName, jobs: &[JobQuery]) -> String;

    /// Reads what [`Scheduler::status_script`] printed. Jobs nothing can tell about are
    /// absent (the caller decides they are `unknown`; never `completed`). An error
    /// means the scheduler could not be asked at all: nothing is known this time.
    fn parse_status(&self, body: &str) -> Result<BTreeMap<String, JobStatus>, String>;

    /// One script looking for jobs carrying `tags` (phase → tag) for `user`, whose run
    /// directory is `run_dir`.
    fn find_script(&self, user: &UserName, run_dir: &str, tags: &BTreeMap<Phase, String>) -> String;

    /// Reads what [`Scheduler::find_script`] printed: phase → the job IDs that carry its
    /// tag or left its start marker, oldest first (the caller skips earlier runs' jobs).
    fn parse_find(&self, body: &str, tags: &BTreeMap<Phase, String>) -> BTreeMap<Phase, Vec<String>>;

    /// One script cancelling `jobs`.
    fn cancel_script(&self, jobs: &[JobQuery]) -> String;

    /// Where the job `job_id` of `phase` writes its standard output (or error, with
    /// `stderr`), by the convention of this scheduler's default templates.
    fn output_file(&self, run_dir: &str, phase: Phase, job_id: &str, stderr: bool) -> String;
}

/// The script that prints the tail of `path` (at most `lines` lines and `max_bytes`
/// bytes) as `SIZE <bytes>` and `TAIL <b64>`, or `MISSING` if it cannot be read.
pub fn tail_script(path: &str, lines: usize, max_bytes: usize) -> String {
    let f = shell_quote(path);
    format!(
        "{HELPERS}f={f}\nif [ -f \"$f\" ] && [ -r \"$f\" ]; then\n  printf 'SIZE %s\\n' \"$(wc -c < \"$f\" | tr -d ' ')\"\n  printf 'TAIL %s\\n' \"$(tail -n {lines} -- \"$f\" | tail -c {max_bytes} | hpcg_b64)\"\nelse\n  printf 'MISSING\\n'\nfi\n"
    )
}

/// What [`tail_script`] printed: `None` if the file is missing, else (size, tail bytes).
pub fn parse_tail(body: &str) -> Option<(u64, Vec<u8>)> {
    let mut size = None;
    let mut tail = Vec::new();
    for line in body.lines() {
        if let Some(n) = line.strip_prefix("SIZE ") {
            size = n.trim().parse().ok();
        } else if let Some(b) = line.strip_prefix("TAIL ") {
            tail = base64::engine::general_purpose::STANDARD.decode(b.trim()).unwrap_or_default();
        } else if line.trim() == "MISSING" {
            return None;
        }
    }
    size.map(|s| (s, tail))
}

/// Base64 of `s` on one line, for free text in the line protocol.
pub fn b64(s: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(s)
}

/// Reverse of [`b64`]; garbage reads as itself.
pub fn unb64(s: &str) -> String {
    base64::engine::general_purpose::STANDARD
        .decode(s.trim())
        .ok()
        .and_then(|b| String::from_utf8(b).ok())
        .unwrap_or_else(|| s.to_owned())
}

/// The shell helpers every script uses: `hpcg_b64` prints its stdin as one base64 line.
pub const HELPERS: &str = "hpcg_b64() { base64 | tr -d '\\n'; }\n";

/// Creates the run directory, stages the inputs (as the user: Unix permissions decide
/// what may be read) and writes the phase scripts to `<run>/.hpcforge/script_<phase>`.
/// Reports `STAGE <name> <status> <b64 error>` for each file.
pub fn prelude(plan: &SubmitPlan) -> Result<String, String> {
    let mut s = String::from(HELPERS);
    s.push_str("umask 077\n");
    s.push_str(&format!("hpcg_run={}\n", shell_quote(&plan.run_dir)));
    s.push_str("mkdir -p \"$hpcg_run/.hpcforge\" || printf 'STAGE %s 1 %s\\n' .hpcforge \"$(printf 'cannot create %s' \"$hpcg_run\" | hpcg_b64)\"\n");
    s.push_str("hpcg_stage_ok=1\n");
    for f in &plan.stage {
        let dst = format!("{}/{}", plan.run_dir, f.name);
        s.push_str(&format!(
            "if e=$(cp -p -- {src} {dst} 2>&1){chmod}; then printf 'STAGE %s 0 -\\n' {name}; else hpcg_stage_ok=0; printf 'STAGE %s 1 %s\\n' {name} \"$(printf '%s' \"$e\" | hpcg_b64)\"; fi\n",
            src = shell_quote(&f.source),
            dst = shell_quote(&dst),
            chmod = f.mods.as_ref().map(|m| format!(" && e=$(chmod {} {} 2>&1)", shell_quote(m), shell_quote(&dst))).unwrap_or_default(),
            name = shell_quote(&f.name),
        ));
    }
    for p in &plan.phases {
        let target = format!("\"$hpcg_run\"/.hpcforge/script_{}", p.phase);
        s.push_str(&crate::forge::render::heredoc_block(&target, "SCRIPT", &p.script)?);
    }
    Ok(s)
}

/// Reads the `STAGE` lines of a report.
pub fn parse_stage(body: &str) -> Vec<(String, String)> {
    body.lines()
        .filter_map(|l| l.strip_prefix("STAGE "))
        .filter_map(|rest| {
            let mut it = rest.splitn(3, ' ');
            let (name, status, msg) = (it.next()?, it.next()?, it.next().unwrap_or("-"));
            (status != "0").then(|| (name.to_owned(), unb64(msg)))
        })
        .collect()
}

/// Parses an ISO-8601 local time as Slurm prints it (`2026-11-22T04:15:12`); `N/A`,
/// `NONE`, `Unknown` → none. Slurm prints the cluster's local time; the test and most
/// clusters run in UTC, so UTC is assumed.
pub fn parse_slurm_time(s: &str) -> Option<OffsetDateTime> {
    let fmt = time::macros::format_description!("[year]-[month]-[day]T[hour]:[minute]:[second]");
    time::PrimitiveDateTime::parse(s.trim(), &fmt).ok().map(|t| t.assume_utc())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_round_trips_free_text() {
        assert_eq!(unb64(&b64("sbatch: error: x\nline 2")), "sbatch: error: x\nline 2");
        assert_eq!(unb64("not base64!"), "not base64!");
    }

    #[test]
    fn slurm_times_parse_and_placeholders_do_not() {
        assert_eq!(parse_slurm_time("2026-11-22T04:15:12").unwrap().unix_timestamp(), 1_795_320_912);
        for none in ["N/A", "NONE", "Unknown", ""] {
            assert!(parse_slurm_time(none).is_none());
        }
    }

    #[test]
    fn stage_failures_are_read_with_their_messages() {
        let body =
            format!("STAGE a.dat 0 -\nSTAGE b.dat 1 {}\nOTHER x\n", b64("cp: cannot open '/x': Permission denied"));
        assert_eq!(parse_stage(&body), [("b.dat".to_owned(), "cp: cannot open '/x': Permission denied".to_owned())]);
    }
}

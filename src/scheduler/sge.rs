//! Why this file is long: the parsers of Grid Engine's outputs, the scripts that
//! produce them and their fixture tests belong together; split, each half would be
//! read only with the other.
//!
//! Grid Engine (Son of Grid Engine 8.1.9, and the Univa/Altair descendants that keep
//! its output formats): the parsers of what its commands print, pure functions tested
//! on output captured from a real Grid Engine (`tests/fixtures/sge/`).
//!
//! The scheduler ([`GridEngine`]) submits with `qsub -terse -C ''`: Grid Engine reads
//! `#$` lines anywhere in a script, even inside a quoted value or an application
//! script written by a here-document, so the script is never scanned; the directives
//! of its leading comment block (checked by the forge) are passed on the command line
//! instead. Each job carries its tag as the context variable `hpcforge` (`-ac`), and
//! waits for the phases before it with `-hold_jid`. Because `-hold_jid` waits for
//! the end whatever the outcome, "only after a successful prolog" (or "only if it
//! failed") is kept by the phase scripts themselves ([`super::common::after_guard`]):
//! a phase whose predecessors did not end as it needs ends at once and leaves
//! `skipped_<phase>`, which the status script reads as *cancelled, dependency never
//! satisfied*, as on Slurm.
//!
//! What the output says, and what these functions make of it:
//!
//! - `qsub -terse` prints the job number alone (`42`), or for an array job
//!   `42.1-10:1`; anything else is not a job ID.
//! - `qstat -xml -u USER` lists the user's jobs still in the queue, running ones under
//!   `queue_info` and waiting ones under `job_info`, each with its state letters
//!   (`qw`, `hqw`, `r`, `t`, `Eqw`, `dr`, `s`, ...). A job that has left the queue is
//!   simply absent: only `qacct` can say how it ended, never the absence itself.
//! - `qacct -j ID` prints one block per finished job (or array task): `failed` is
//!   Grid Engine's own condition code with its words (`37 : qmaster enforced h_rt,
//!   h_cpu, or h_vmem limit`, `100 : assumedly after job`), `exit_status` the job's
//!   (signals as 128 + n), times in the local time of whoever runs `qacct` (the
//!   status script runs it with `TZ=UTC`).

use std::collections::BTreeMap;

use time::OffsetDateTime;
use time::macros::format_description;

use super::common::{HELPERS, unb64};
use super::{JobQuery, JobStatus, Scheduler, SubmitPlan, SubmitReport};
use crate::model::{Memory, Phase, PhaseState, SchedulerKind, UserName, WallTime};
use crate::shell::shell_quote;

/// The job ID `qsub -terse` printed: `42`, or `42` from an array job's `42.1-10:1`.
pub fn parse_terse_job_id(out: &str) -> Result<String, String> {
    let line = out.trim();
    let (id, tasks) = line.split_once('.').map_or((line, None), |(id, t)| (id, Some(t)));
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    let tasks_ok = tasks.is_none_or(|t| {
        let (range, step) = t.split_once(':').unwrap_or((t, "1"));
        let (a, b) = range.split_once('-').unwrap_or((range, range));
        digits(a) && digits(b) && digits(step)
    });
    if digits(id) && tasks_ok {
        Ok(id.to_owned())
    } else {
        Err(format!("qsub printed `{}` where a job ID was expected", line.escape_debug()))
    }
}

/// One job as `qstat -xml` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueuedJob {
    /// Job number.
    pub id: String,
    /// Its name (`-N`).
    pub name: String,
    /// Whose it is.
    pub owner: String,
    /// Grid Engine's state letters (`qw`, `hqw`, `r`, `Eqw`, `dr`, ...).
    pub state: String,
    /// The array task, for array jobs.
    pub task: Option<String>,
    /// When it started running (UTC, as the status script asks).
    pub started_at: Option<OffsetDateTime>,
}

/// `2026-12-03T13:16:26`, in the time zone `qstat` ran in (UTC for the status script).
fn xml_time(text: &str) -> Option<OffsetDateTime> {
    let fmt = format_description!("[year]-[month]-[day]T[hour]:[minute]:[second]");
    time::PrimitiveDateTime::parse(text.trim(), &fmt).ok().map(|t| t.assume_utc())
}

/// The jobs in `qstat -xml` output, running and waiting alike.
pub fn parse_qstat_xml(xml: &str) -> Result<Vec<QueuedJob>, String> {
    let doc = roxmltree::Document::parse(xml).map_err(|e| format!("qstat -xml printed no readable XML: {e}"))?;
    let root = doc.root_element();
    if root.tag_name().name() != "job_info" {
        return Err(format!("qstat -xml printed <{}>, not <job_info>", root.tag_name().name()));
    }
    let mut jobs = Vec::new();
    for job in root.descendants().filter(|n| n.has_tag_name("job_list")) {
        let field = |name: &str| {
            job.children().find(|c| c.has_tag_name(name)).and_then(|c| c.text()).map(|t| t.trim().to_owned())
        };
        let id = field("JB_job_number").filter(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()));
        let Some(id) = id else { return Err("a job in qstat -xml has no job number".into()) };
        jobs.push(QueuedJob {
            id,
            name: field("JB_name").unwrap_or_default(),
            owner: field("JB_owner").unwrap_or_default(),
            state: field("state").unwrap_or_default(),
            task: field("tasks").filter(|t| !t.is_empty()),
            started_at: field("JAT_start_time").as_deref().and_then(xml_time),
        });
    }
    Ok(jobs)
}

/// (job number, owner, the `hpcforge` context variable) of each job in `qstat -j
/// <list> -xml` output. Jobs that left the queue between the listing and this call
/// are simply missing (`<unknown_jobs>`).
pub fn parse_job_contexts(xml: &str) -> Result<Vec<(String, String, Option<String>)>, String> {
    let doc = roxmltree::Document::parse(xml).map_err(|e| format!("qstat -j -xml printed no readable XML: {e}"))?;
    let mut jobs = Vec::new();
    for job in doc.descendants().filter(|n| n.children().any(|c| c.has_tag_name("JB_job_number"))) {
        let text = |name: &str| {
            job.children().find(|c| c.has_tag_name(name)).and_then(|c| c.text()).map(|t| t.trim().to_owned())
        };
        let Some(id) = text("JB_job_number").filter(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit())) else {
            continue;
        };
        let context = job
            .children()
            .find(|c| c.has_tag_name("JB_context"))
            .into_iter()
            .flat_map(|c| c.descendants())
            .filter(|n| n.children().any(|v| v.has_tag_name("VA_variable")))
            .find_map(|pair| {
                let field = |name: &str| pair.children().find(|c| c.has_tag_name(name)).and_then(|c| c.text());
                (field("VA_variable") == Some(CONTEXT_VARIABLE)).then(|| field("VA_value").unwrap_or("").to_owned())
            });
        jobs.push((id, text("JB_owner").unwrap_or_default(), context));
    }
    Ok(jobs)
}

/// What Grid Engine's state letters mean for a job still in the queue, and a reason
/// when they say more than "waiting" or "running".
pub fn map_queue_state(letters: &str) -> (PhaseState, Option<&'static str>) {
    let has = |c: char| letters.contains(c);
    if has('E') {
        // It will never run by itself: say so rather than wait forever.
        (PhaseState::Failed, Some("Grid Engine put the job in its error state (E); `qstat -j` says why"))
    } else if has('d') {
        (PhaseState::Cancelled, Some("being deleted"))
    } else if has('s') || has('S') || has('T') {
        (PhaseState::Running, Some("suspended"))
    } else if has('r') || has('t') || has('R') {
        (PhaseState::Running, None)
    } else if has('h') {
        (PhaseState::Pending, Some("on hold"))
    } else {
        (PhaseState::Pending, None)
    }
}

/// One finished job (or array task) as `qacct -j` prints it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AcctRecord {
    /// Job number.
    pub id: String,
    /// Array task, if any.
    pub task: Option<String>,
    /// Its name.
    pub name: String,
    /// Grid Engine's condition code (0: the job ran and ended by itself).
    pub failed: i32,
    /// The condition code's words (`qmaster enforced h_rt, h_cpu, or h_vmem limit`).
    pub failed_text: String,
    /// The job's exit status (128 + n after signal n).
    pub exit_status: i32,
    /// When it started and ended.
    pub started_at: Option<OffsetDateTime>,
    /// When it ended.
    pub ended_at: Option<OffsetDateTime>,
    /// Wall-clock seconds.
    pub wallclock_s: Option<u64>,
    /// The resource requests (`-l h_rt=5`), as `category` shows them.
    pub category: String,
}

/// `Thu Dec  3 13:16:26 2026`, in the time zone `qacct` ran in (UTC for the status
/// script).
pub fn acct_time(text: &str) -> Option<OffsetDateTime> {
    let words: Vec<&str> = text.split_whitespace().collect();
    let fmt = format_description!(
        "[weekday repr:short] [month repr:short] [day padding:none] [hour]:[minute]:[second] [year]"
    );
    time::PrimitiveDateTime::parse(&words.join(" "), &fmt).ok().map(|t| t.assume_utc())
}

/// The blocks of `qacct -j` output (one per finished job or array task, oldest
/// first), each as field → value.
pub fn qacct_blocks(text: &str) -> impl Iterator<Item = BTreeMap<&str, &str>> {
    text.split("==============================================================").map(|block| {
        block
            .lines()
            .filter_map(|l| {
                let (k, v) = l.split_once(char::is_whitespace)?;
                Some((k.trim(), v.trim()))
            })
            .collect()
    })
}

/// The records in `qacct -j` output, oldest first.
pub fn parse_qacct(text: &str) -> Result<Vec<AcctRecord>, String> {
    let mut records = Vec::new();
    for fields in qacct_blocks(text) {
        let Some(id) = fields.get("jobnumber") else { continue };
        let number = |s: &str| s.split_whitespace().next().and_then(|n| n.parse::<i32>().ok());
        let failed_raw = fields.get("failed").copied().unwrap_or("");
        let failed = number(failed_raw).ok_or_else(|| format!("qacct shows job {id} without a `failed` code"))?;
        let exit_status = fields
            .get("exit_status")
            .and_then(|s| number(s))
            .ok_or_else(|| format!("qacct shows job {id} without an exit status"))?;
        records.push(AcctRecord {
            id: (*id).to_owned(),
            task: fields.get("taskid").filter(|t| **t != "undefined").map(|t| (*t).to_owned()),
            name: fields.get("jobname").copied().unwrap_or("").to_owned(),
            failed,
            failed_text: failed_raw.split_once(':').map_or("", |(_, t)| t).trim().to_owned(),
            exit_status,
            started_at: fields.get("start_time").and_then(|t| acct_time(t)),
            ended_at: fields.get("end_time").and_then(|t| acct_time(t)),
            wallclock_s: fields
                .get("ru_wallclock")
                .and_then(|w| w.trim_end_matches('s').parse::<f64>().ok())
                .map(|w| w as u64),
            category: fields.get("category").copied().unwrap_or("").to_owned(),
        });
    }
    Ok(records)
}

/// The value of resource `name` in a `category` (`-l h_rt=5,h_vmem=1G`).
fn requested<'a>(category: &'a str, name: &str) -> Option<&'a str> {
    category.split(|c: char| c.is_whitespace() || c == ',').find_map(|kv| kv.strip_prefix(name)?.strip_prefix('='))
}

/// How a finished job ended, in hpcforge's words, from its `qacct` record.
pub fn acct_status(r: &AcctRecord) -> JobStatus {
    let signal = (r.exit_status > 128).then(|| r.exit_status - 128);
    let (state, reason) = match r.failed {
        0 if r.exit_status == 0 => (PhaseState::Completed, None),
        0 => (PhaseState::Failed, None),
        // The master killed it at a limit: the wall-time one if it was asked for and
        // reached, else memory if that was asked for, else the CPU-time one.
        37 => {
            let hrt = requested(&r.category, "h_rt").and_then(|v| v.parse::<u64>().ok());
            let reached = hrt.is_some_and(|limit| r.wallclock_s.is_some_and(|w| w >= limit));
            if reached || requested(&r.category, "h_vmem").is_none() {
                (PhaseState::Timeout, Some(r.failed_text.clone()))
            } else {
                (PhaseState::OutOfMemory, Some(r.failed_text.clone()))
            }
        }
        // Killed while it ran (qdel, or a limit the execution daemon enforced).
        100 => (PhaseState::Failed, Some(format!("{} (killed by signal {})", r.failed_text, signal.unwrap_or(0)))),
        // 1..=99: it never ran as asked (a prolog, a directory, an output file, ...).
        _ => (PhaseState::Failed, Some(format!("Grid Engine condition {}: {}", r.failed, r.failed_text))),
    };
    JobStatus {
        state,
        raw_state: if r.failed == 0 { format!("exit {}", r.exit_status) } else { format!("failed {}", r.failed) },
        exit_code: (r.failed == 0 && signal.is_none()).then_some(r.exit_status),
        signal,
        reason,
        started_at: r.started_at,
        ended_at: r.ended_at,
        frames: None,
    }
}

/// The context variable that carries a job's tag (`-ac hpcforge=<tag>`).
pub const CONTEXT_VARIABLE: &str = "hpcforge";

/// How long a job may be gone from `qstat` without an accounting record before
/// nothing can tell how it ended. Grid Engine writes the accounting file every
/// `accounting_flush_time` (15 s by default); a site without accounting never does.
pub const ACCOUNTING_GRACE_S: u64 = 120;

/// The Grid Engine adapter.
#[derive(Debug, Clone, Copy, Default)]
pub struct GridEngine;

/// Grid Engine's own messages that pass: the master busy, restarting or unreachable.
const TRANSIENT: &[&str] = &[
    "commlib error",
    "unable to send message to qmaster",
    "unable to contact qmaster",
    "failed receiving gdi request",
    "can't find connection",
    "qmaster is not alive",
    "got select error",
];

/// Plain explanations of Grid Engine's refusals, by message fragment.
const EXPLAINED: &[(&str, &str)] = &[
    (
        "unknown queue",
        "the queue does not exist on this cluster; check the `partition` (queue) of the application or cluster definition",
    ),
    ("is not a time value", "a time limit is not written the way Grid Engine reads it"),
    ("is not a memory value", "a memory size is not written the way Grid Engine reads it"),
    ("unknown resource", "the job asks for a resource (`-l`) this cluster does not define"),
    ("parallel environment", "the parallel environment does not exist, or does not allow this many slots"),
    ("project", "the project does not exist, or this user may not use it"),
    ("no suitable queues", "no queue of the cluster can ever run the job as asked"),
    ("job rejected", "the cluster's submission rules (JSV) rejected the job"),
];

/// The job ID for the report parser: `qsub -terse`'s strictly.
fn terse_id(out: &str) -> Option<String> {
    parse_terse_job_id(out.lines().rev().find(|l| !l.trim().is_empty())?).ok()
}

/// Job numbers in `qstat -xml` output, without parsing it (the status script's
/// shell needs them to decide which jobs left the queue).
const LIVE_IDS: &str = "sed -n 's:.*<JB_job_number>\\([0-9][0-9]*\\)</JB_job_number>.*:\\1:p'";

fn qstat_cmd(user: &UserName) -> String {
    format!("TZ=UTC qstat -u {} -xml", shell_quote(user.as_str()))
}

/// What the markers a job left in its run directory say, with its accounting record.
#[derive(Debug, Default)]
struct Lost {
    acct: Option<AcctRecord>,
    /// For a job array, each task's record.
    array: Vec<AcctRecord>,
    rc: Option<i32>,
    /// When the script began and ended, as its exit trap recorded them.
    rc_times: (Option<OffsetDateTime>, Option<OffsetDateTime>),
    skipped: bool,
    cancel_asked: bool,
    started: bool,
    gone_for: Option<u64>,
}

fn pending_or_ending(started: bool) -> JobStatus {
    let (state, reason) = if started {
        (PhaseState::Running, "ended; waiting for Grid Engine's accounting record")
    } else {
        (PhaseState::Pending, "left the queue; waiting for Grid Engine's accounting record")
    };
    JobStatus {
        state,
        raw_state: "gone".into(),
        exit_code: None,
        signal: None,
        reason: Some(reason.into()),
        started_at: None,
        ended_at: None,
        frames: None,
    }
}

/// How a job that left the queue ended, from what is known about it; `None` when
/// nothing can tell (the caller makes it `unknown`).
fn lost_status(l: &Lost) -> Option<JobStatus> {
    let ended = |state: PhaseState, exit_code: Option<i32>, signal: Option<i32>, reason: Option<&str>| JobStatus {
        state,
        raw_state: match state {
            PhaseState::Cancelled => "cancelled".into(),
            _ => format!("exit {}", exit_code.unwrap_or(-1)),
        },
        exit_code,
        signal,
        reason: reason.map(str::to_owned),
        started_at: l.acct.as_ref().and_then(|a| a.started_at),
        ended_at: l.acct.as_ref().and_then(|a| a.ended_at),
        frames: None,
    };
    if l.skipped {
        return Some(ended(PhaseState::Cancelled, None, None, Some("DependencyNeverSatisfied")));
    }
    if !l.array.is_empty() {
        return Some(super::combine(l.array.iter().map(acct_status).collect()));
    }
    if let Some(a) = &l.acct {
        let mut st = acct_status(a);
        // Killed after a cancel was asked for: that was the cancel.
        if l.cancel_asked && st.exit_code.is_none_or(|c| c != 0) && matches!(a.failed, 0 | 100) {
            st.state = PhaseState::Cancelled;
            st.reason = Some("cancelled on request".into());
        }
        return Some(st);
    }
    // No accounting record yet, but the script recorded how it ended by itself.
    if let Some(rc) = l.rc {
        let state = if rc == 0 { PhaseState::Completed } else { PhaseState::Failed };
        let (started_at, ended_at) = l.rc_times;
        return Some(JobStatus { started_at, ended_at, ..ended(state, Some(rc), None, None) });
    }
    if l.cancel_asked {
        return Some(ended(PhaseState::Cancelled, None, None, Some("cancelled on request")));
    }
    match l.gone_for {
        Some(s) if s < ACCOUNTING_GRACE_S => Some(pending_or_ending(l.started)),
        _ => None,
    }
}

impl Scheduler for GridEngine {
    fn kind(&self) -> SchedulerKind {
        SchedulerKind::Sge
    }

    fn directive_prefix(&self) -> Option<&'static str> {
        Some("#$")
    }

    fn job_id_variable(&self) -> &'static str {
        "JOB_ID"
    }

    fn array_index_variable(&self) -> &'static str {
        "SGE_TASK_ID"
    }

    /// `h_rt` as hours:minutes:seconds (hours past 24 allowed).
    fn walltime(&self, w: WallTime) -> String {
        let s = w.as_secs();
        format!("{}:{:02}:{:02}", s / 3600, (s / 60) % 60, s % 60)
    }

    /// `100M`, `2G`: Grid Engine's capital suffixes are powers of 1024, as hpcforge's.
    fn memory(&self, m: Memory) -> String {
        m.to_string()
    }

    fn enforces_afterok(&self) -> bool {
        false
    }

    fn directive_variables(&self) -> &'static [&'static str] {
        &["$JOB_ID", "$JOB_NAME", "$TASK_ID", "$HOME", "$USER", "$HOSTNAME"]
    }

    fn transient_phrases(&self) -> &'static [&'static str] {
        TRANSIENT
    }

    fn explanations(&self) -> &'static [(&'static str, &'static str)] {
        EXPLAINED
    }

    fn submit_commands(&self, plan: &SubmitPlan) -> String {
        let mut s = String::from(super::common::SUBMIT_REPORT);
        s.push_str(super::common::frames_helpers(plan));
        for (phase, id) in &plan.known {
            s.push_str(&format!("hpcg_id_{phase}={}\n", shell_quote(id)));
        }
        s.push_str("hpcg_go=$hpcg_stage_ok\n");
        for p in &plan.phases {
            // The forge checked these words (strict patterns); each is quoted anyway.
            let directives: Vec<String> = super::common::directive_lines(&p.script, "#$")
                .flat_map(|(_, words)| words)
                .map(|w| shell_quote(w).into_owned())
                .collect();
            // `-hold_jid` waits for every job to end; the conditions are checked by
            // the phase script itself (`common::after_guard`), from `HPCG_AFTER`.
            // Frame by frame, `-hold_jid_ad`: task i after task i has ended (each
            // frame checks its predecessor's record itself).
            let mut dep = String::new();
            let ids = |per_frame: bool| -> Vec<String> {
                p.after.iter().filter(|w| w.per_frame == per_frame).map(|w| format!("$hpcg_id_{}", w.phase)).collect()
            };
            let (whole, per_frame) = (ids(false), ids(true));
            if !whole.is_empty() {
                dep = format!(" -hold_jid \"{}\"", whole.join(","));
            }
            if !per_frame.is_empty() {
                dep.push_str(&format!(" -hold_jid_ad \"{}\"", per_frame.join(",")));
            }
            let checks = p.after_checks(&plan.frame_totals);
            if !checks.is_empty() {
                dep.push_str(&format!(" -v {}=\"{checks}\"", super::AFTER_VARIABLE));
            }
            if let Some(a) = &p.array {
                s.push_str("if [ \"$hpcg_go\" = 1 ]; then\n");
                s.push_str(&super::common::frames_prep(p.phase, a));
                s.push_str("fi\n");
                dep.push_str(&format!(" -t 1-{}", a.elements));
                if let Some(m) = a.max_parallel {
                    dep.push_str(&format!(" -tc {m}"));
                }
            }
            s.push_str(&format!(
                "if [ \"$hpcg_go\" = 1 ]; then\n\
                 \x20 hpcg_out=$(qsub -terse -C '' -ac {ctx}={tag}{dep} {directives} \"$hpcg_run/.hpcforge/script_{phase}\" 2>&1); hpcg_rc=$?\n\
                 \x20 if hpcg_report {phase}; then hpcg_id_{phase}=$hpcg_job; else hpcg_go=0; fi\n\
                 fi\n",
                ctx = CONTEXT_VARIABLE,
                tag = shell_quote(&p.tag),
                directives = directives.join(" "),
                phase = p.phase,
            ));
        }
        s
    }

    fn parse_submit(&self, body: &str, report: &mut SubmitReport) {
        super::common::parse_submit(body, report, terse_id);
    }

    fn status_script(&self, user: &UserName, jobs: &[JobQuery]) -> String {
        let mut s = String::from(HELPERS);
        s.push_str(&format!("hpcg_q=$({} 2>&1); hpcg_rc=$?\n", qstat_cmd(user)));
        s.push_str("printf 'QSTAT %s %s\\n' \"$hpcg_rc\" \"$(printf '%s' \"$hpcg_q\" | hpcg_b64)\"\n");
        s.push_str("if [ \"$hpcg_rc\" -eq 0 ]; then\n");
        s.push_str(&format!("  hpcg_live=\" $(printf '%s\\n' \"$hpcg_q\" | {LIVE_IDS} | tr '\\n' ' ') \"\n"));
        // A job gone from the queue: its accounting record, the markers its script and
        // a cancel left, and since when this script has seen it gone.
        s.push_str(
            "  hpcg_now=$(date +%s)\n\
             \x20 hpcg_lost() { # job run-dir phase [array]\n\
             \x20   case $hpcg_live in *\" $1 \"*) return 0 ;; esac\n\
             \x20   printf 'QACCT %s %s\\n' \"$1\" \"$(TZ=UTC qacct -j \"$1\" 2>&1 | hpcg_b64)\"\n\
             \x20   hpcg_ks='rc skipped cancel started'; [ -n \"${4:-}\" ] && hpcg_ks='skipped cancel started'\n\
             \x20   for hpcg_k in $hpcg_ks; do\n\
             \x20     [ -f \"$2/.hpcforge/${hpcg_k}_$3\" ] && printf 'MARK %s %s %s\\n' \"$1\" \"$hpcg_k\" \"$(head -n 1 \"$2/.hpcforge/${hpcg_k}_$3\" | hpcg_b64)\"\n\
             \x20   done\n\
             \x20   hpcg_g=\"$2/.hpcforge/gone_$1\"\n\
             \x20   [ -f \"$hpcg_g\" ] || printf '%s\\n' \"$hpcg_now\" > \"$hpcg_g\" 2>/dev/null\n\
             \x20   hpcg_since=$(head -n 1 \"$hpcg_g\" 2>/dev/null)\n\
             \x20   case $hpcg_since in ''|*[!0-9]*) hpcg_since=$hpcg_now ;; esac\n\
             \x20   printf 'GONE %s %s\\n' \"$1\" \"$((hpcg_now - hpcg_since))\"\n\
             \x20 }\n",
        );
        for j in jobs {
            // An array's tasks each overwrite the exit record: only accounting tells.
            let array = if j.frames { " array" } else { "" };
            s.push_str(&format!(
                "  hpcg_lost {} {} {}{array}\n",
                shell_quote(&j.job_id),
                shell_quote(&j.run_dir),
                j.phase
            ));
        }
        s.push_str("fi\n");
        s
    }

    fn parse_status(&self, body: &str) -> Result<BTreeMap<String, JobStatus>, String> {
        let mut out = BTreeMap::new();
        let mut asked = false;
        let mut lost: BTreeMap<String, Lost> = BTreeMap::new();
        for line in body.lines() {
            let (key, rest) = line.split_once(' ').unwrap_or((line, ""));
            match key {
                "QSTAT" => {
                    let (rc, text) = rest.split_once(' ').unwrap_or((rest, ""));
                    let text = unb64(text);
                    if rc != "0" {
                        return Err(format!("qstat failed: {}", text.trim()));
                    }
                    // An array's tasks are one entry each (waiting ones as a range): one job.
                    let mut tasks: BTreeMap<String, Vec<JobStatus>> = BTreeMap::new();
                    for job in parse_qstat_xml(&text)? {
                        let (state, reason) = map_queue_state(&job.state);
                        tasks.entry(job.id).or_default().push(JobStatus {
                            state,
                            raw_state: job.state,
                            exit_code: None,
                            signal: None,
                            reason: reason.map(str::to_owned),
                            started_at: job.started_at,
                            ended_at: None,
                            frames: None,
                        });
                    }
                    out.extend(tasks.into_iter().map(|(id, sts)| (id, super::combine(sts))));
                    asked = true;
                }
                "QACCT" => {
                    let (id, text) = rest.split_once(' ').unwrap_or((rest, ""));
                    // Job numbers come round again: the newest record is this job's. An
                    // array's tasks each have one (the newest per task).
                    let records: Vec<AcctRecord> =
                        parse_qacct(&unb64(text)).unwrap_or_default().into_iter().filter(|r| r.id == id).collect();
                    let l = lost.entry(id.to_owned()).or_default();
                    if records.iter().any(|r| r.task.is_some()) {
                        let mut per_task: BTreeMap<String, AcctRecord> = BTreeMap::new();
                        for r in records.into_iter().filter(|r| r.task.is_some()) {
                            per_task.insert(r.task.clone().unwrap_or_default(), r);
                        }
                        l.array = per_task.into_values().collect();
                    } else {
                        l.acct = records.into_iter().last();
                    }
                }
                "MARK" => {
                    let mut it = rest.splitn(3, ' ');
                    let (Some(id), Some(kind), text) = (it.next(), it.next(), it.next().unwrap_or("")) else {
                        continue;
                    };
                    let text = unb64(text);
                    let mut words = text.split_whitespace();
                    // A marker counts only for the job it names (earlier runs leave theirs).
                    if words.next() != Some(id) {
                        continue;
                    }
                    let l = lost.entry(id.to_owned()).or_default();
                    match kind {
                        "rc" => {
                            l.rc = words.next().and_then(|c| c.parse().ok());
                            l.rc_times = (
                                words.next().and_then(super::common::parse_slurm_time),
                                words.next().and_then(super::common::parse_slurm_time),
                            );
                        }
                        "skipped" => l.skipped = true,
                        "cancel" => l.cancel_asked = true,
                        "started" => l.started = true,
                        _ => {}
                    }
                }
                "GONE" => {
                    let (id, secs) = rest.split_once(' ').unwrap_or((rest, ""));
                    lost.entry(id.to_owned()).or_default().gone_for = secs.trim().parse().ok();
                }
                _ => {}
            }
        }
        if !asked {
            return Err("the status query printed no qstat result".into());
        }
        for (id, l) in lost {
            if let Some(st) = lost_status(&l) {
                out.insert(id, st);
            }
        }
        Ok(out)
    }

    fn usage_script(&self, jobs: &[super::UsageQuery]) -> String {
        super::usage::records_script(jobs) + &super::usage::qacct_script(jobs)
    }

    fn parse_usage(&self, body: &str) -> super::usage::UsageAnswer {
        super::usage::UsageAnswer {
            accounting_asked: true,
            accounting: super::usage::parse_qacct_answers(body),
            job: super::usage::parse_records(body),
        }
    }

    fn find_script(&self, user: &UserName, run_dir: &str, tags: &BTreeMap<Phase, String>) -> String {
        let mut s = String::from(HELPERS);
        s.push_str(&format!("hpcg_q=$({} 2>&1); hpcg_rc=$?\n", qstat_cmd(user)));
        s.push_str("printf 'QSTAT %s %s\\n' \"$hpcg_rc\" \"$(printf '%s' \"$hpcg_q\" | hpcg_b64)\"\n");
        s.push_str(&format!(
            "hpcg_ids=$(printf '%s\\n' \"$hpcg_q\" | {LIVE_IDS} | tr '\\n' ',')\n\
             if [ \"$hpcg_rc\" -eq 0 ] && [ -n \"$hpcg_ids\" ]; then\n\
             \x20 printf 'QSTATJ %s\\n' \"$(qstat -j \"${{hpcg_ids%,}}\" -xml 2>&1 | hpcg_b64)\"\n\
             fi\n"
        ));
        s.push_str(&super::common::start_markers(run_dir, tags));
        s
    }

    fn parse_find(&self, body: &str, tags: &BTreeMap<Phase, String>) -> BTreeMap<Phase, Vec<String>> {
        let mut found: BTreeMap<Phase, Vec<String>> = BTreeMap::new();
        for text in body.lines().filter_map(|l| l.strip_prefix("QSTATJ ")) {
            for (id, _, context) in parse_job_contexts(&unb64(text)).unwrap_or_default() {
                if let Some((phase, _)) = tags.iter().find(|(_, t)| Some(t.as_str()) == context.as_deref()) {
                    found.entry(*phase).or_default().push(id);
                }
            }
        }
        for (p, id) in super::common::parse_started(body, |s| parse_terse_job_id(s).ok()) {
            found.entry(p).or_default().push(id);
        }
        for ids in found.values_mut() {
            ids.sort_by_key(|id| id.parse::<u64>().unwrap_or(u64::MAX));
            ids.dedup();
        }
        found
    }

    fn cancel_script(&self, jobs: &[JobQuery]) -> String {
        // Each job's cancel is noted in its run directory first: Grid Engine's
        // accounting cannot tell a `qdel` from other kills, and keeps no record of a
        // job deleted before it ran.
        let mut s = String::from(HELPERS);
        for j in jobs {
            s.push_str(&format!(
                "printf '%s\\n' {id} > {file} 2>/dev/null\n",
                id = shell_quote(&j.job_id),
                file = shell_quote(&format!("{}/.hpcforge/cancel_{}", j.run_dir, j.phase)),
            ));
        }
        let ids: Vec<String> = jobs.iter().map(|j| shell_quote(&j.job_id).into_owned()).collect();
        s.push_str(&format!(
            "hpcg_out=$(qdel {} 2>&1); printf 'CANCEL %s %s\\n' \"$?\" \"$(printf '%s' \"$hpcg_out\" | hpcg_b64)\"\n",
            ids.join(" ")
        ));
        s
    }

    fn output_file(&self, run_dir: &str, phase: Phase, job_id: &str, stderr: bool) -> String {
        // forge-templates/sge: `-o <run dir>/<phase>-$JOB_ID.out` (and -e .err).
        format!("{run_dir}/{phase}-{job_id}.{}", if stderr { "err" } else { "out" })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> String {
        std::fs::read_to_string(format!("{}/tests/fixtures/sge/{name}", env!("CARGO_MANIFEST_DIR"))).unwrap()
    }

    #[test]
    fn job_ids_from_qsub_terse_are_parsed_strictly() {
        assert_eq!(parse_terse_job_id("42\n").unwrap(), "42");
        assert_eq!(parse_terse_job_id("42.1-10:1\n").unwrap(), "42");
        for bad in ["", "Your job 42 (\"x\") has been submitted", "42.x", "4 2", "-1"] {
            assert!(parse_terse_job_id(bad).is_err(), "{bad:?}");
        }
        let refused = fixture("qsub-bad-queue.txt");
        assert!(parse_terse_job_id(&refused).is_err());
    }

    #[test]
    fn qstat_xml_lists_running_and_waiting_jobs_with_their_states() {
        let jobs = parse_qstat_xml(&fixture("qstat-running.xml")).unwrap();
        let ids: Vec<&str> = jobs.iter().map(|j| j.id.as_str()).collect();
        assert_eq!(ids, ["1", "2", "3", "5", "4"]);
        let held = jobs.iter().find(|j| j.id == "4").unwrap();
        assert_eq!((held.name.as_str(), held.state.as_str(), held.started_at), ("hpcg-dep", "hqw", None));
        assert_eq!(map_queue_state(&held.state), (PhaseState::Pending, Some("on hold")));
        let ok = &jobs[0];
        assert_eq!((ok.owner.as_str(), ok.state.as_str()), ("alice", "r"));
        assert_eq!(ok.started_at, Some(time::macros::datetime!(2026-12-03 13:16:26 UTC)));
        assert_eq!(map_queue_state("r").0, PhaseState::Running);
        assert_eq!(map_queue_state("Eqw").0, PhaseState::Failed, "an error state never runs by itself");
        assert_eq!(map_queue_state("dr").0, PhaseState::Cancelled);
        assert_eq!(map_queue_state("qw"), (PhaseState::Pending, None));
        assert!(parse_qstat_xml(&fixture("qstat-empty.xml")).unwrap().is_empty());
        for j in parse_qstat_xml(&fixture("qstat-after-qdel.xml")).unwrap() {
            assert!(!j.state.is_empty(), "{j:?}");
        }
        let down = fixture("qstat-master-down.txt");
        assert!(parse_qstat_xml(&down).is_err(), "a failed qstat is not an empty queue");
    }

    #[test]
    fn qacct_says_how_each_job_ended_in_grid_engines_words() {
        let status = |name: &str| {
            let records = parse_qacct(&fixture(name)).unwrap();
            assert_eq!(records.len(), 1, "{name}");
            acct_status(&records[0])
        };
        let ok = status("qacct-completed.txt");
        assert_eq!((ok.state, ok.exit_code, ok.signal), (PhaseState::Completed, Some(0), None));
        assert_eq!(ok.started_at, Some(time::macros::datetime!(2026-12-03 13:16:26 UTC)));
        assert!(ok.ended_at > ok.started_at);
        let bad = status("qacct-exit-3.txt");
        assert_eq!((bad.state, bad.exit_code), (PhaseState::Failed, Some(3)));
        let late = status("qacct-h_rt.txt");
        assert_eq!((late.state, late.signal, late.exit_code), (PhaseState::Timeout, Some(9), None));
        assert_eq!(late.reason.as_deref(), Some("qmaster enforced h_rt, h_cpu, or h_vmem limit"));
        // -hold_jid waits for the end, whatever the outcome: it ran after job 2 failed.
        let dep = status("qacct-hold-jid-after-failure.txt");
        assert_eq!(dep.state, PhaseState::Completed);
        let killed = status("qacct-qdel-running.txt");
        assert_eq!((killed.state, killed.signal), (PhaseState::Failed, Some(9)));
        assert!(killed.reason.unwrap().contains("assumedly after job"));
        assert!(parse_qacct(&fixture("qacct-unknown.txt")).unwrap().is_empty());
    }

    /// A status report as [`GridEngine::status_script`] prints it: the queue listing,
    /// then per job that left it whatever `qacct`, its markers and its gone-since tell.
    fn report(qstat: &str, lost: &[&str]) -> String {
        let mut s = format!("QSTAT 0 {}\n", super::super::common::b64(&fixture(qstat)));
        for l in lost {
            s.push_str(l);
            s.push('\n');
        }
        s
    }

    fn qacct(id: &str, file: &str) -> String {
        format!("QACCT {id} {}", super::super::common::b64(&fixture(file)))
    }

    fn mark(id: &str, kind: &str, text: &str) -> String {
        format!("MARK {id} {kind} {}", super::super::common::b64(text))
    }

    #[test]
    fn jobs_still_in_the_queue_are_read_from_qstat_alone() {
        let got = GridEngine.parse_status(&report("qstat-running.xml", &[])).unwrap();
        assert_eq!(got.keys().map(String::as_str).collect::<Vec<_>>(), ["1", "2", "3", "4", "5"]);
        assert_eq!((got["1"].state, got["1"].raw_state.as_str()), (PhaseState::Running, "r"));
        assert_eq!((got["4"].state, got["4"].reason.as_deref()), (PhaseState::Pending, Some("on hold")));
        assert!(got.values().all(|j| j.exit_code.is_none() && j.ended_at.is_none()));
    }

    #[test]
    fn a_job_that_left_the_queue_is_told_by_its_accounting_record() {
        let body = report("qstat-empty.xml", &[&qacct("1", "qacct-completed.txt"), &qacct("3", "qacct-h_rt.txt")]);
        let got = GridEngine.parse_status(&body).unwrap();
        assert_eq!((got["1"].state, got["1"].exit_code), (PhaseState::Completed, Some(0)));
        assert_eq!((got["3"].state, got["3"].signal), (PhaseState::Timeout, Some(9)));
        // A record of another job (the number came round again) says nothing of this one.
        let other = report("qstat-empty.xml", &[&qacct("7", "qacct-completed.txt"), "GONE 7 500"]);
        assert!(GridEngine.parse_status(&other).unwrap().is_empty(), "nothing can tell: unknown, never completed");
    }

    #[test]
    fn before_the_accounting_record_the_jobs_own_exit_record_answers() {
        let rc = mark("12", "rc", "12 3 2026-12-03T16:36:50 2026-12-03T16:36:54");
        let body = report("qstat-empty.xml", &[&qacct("12", "qacct-unknown.txt"), &rc, "GONE 12 2"]);
        let got = &GridEngine.parse_status(&body).unwrap()["12"];
        assert_eq!((got.state, got.exit_code), (PhaseState::Failed, Some(3)));
        assert_eq!(got.started_at, Some(time::macros::datetime!(2026-12-03 16:36:50 UTC)));
        assert_eq!(got.ended_at, Some(time::macros::datetime!(2026-12-03 16:36:54 UTC)));
        // A record left by an earlier run of the phase (another job) is not this job's.
        let stale = mark("12", "rc", "11 0 2026-12-03T16:30:00 2026-12-03T16:30:01");
        let body = report("qstat-empty.xml", &[&stale, "GONE 12 3"]);
        let got = &GridEngine.parse_status(&body).unwrap()["12"];
        assert_ne!(got.state, PhaseState::Completed, "{got:?}");
    }

    #[test]
    fn a_phase_whose_predecessor_failed_is_cancelled_not_failed() {
        // The guard ended the job at once (exit 1) and left its skipped marker.
        let body = report(
            "qstat-empty.xml",
            &[
                &qacct("4", "qacct-exit-3.txt"),
                &mark("4", "skipped", "4"),
                &mark("4", "rc", "4 1 2026-12-03T16:36:50 2026-12-03T16:36:50"),
            ],
        );
        let got = &GridEngine.parse_status(&body).unwrap()["4"];
        assert_eq!(
            (got.state, got.reason.as_deref(), got.exit_code),
            (PhaseState::Cancelled, Some("DependencyNeverSatisfied"), None)
        );
    }

    #[test]
    fn a_job_killed_after_a_cancel_was_asked_is_cancelled() {
        // qdel'd while it ran: Grid Engine says "assumedly after job", killed by 9.
        let body = report("qstat-empty.xml", &[&qacct("5", "qacct-qdel-running.txt"), &mark("5", "cancel", "5")]);
        let got = &GridEngine.parse_status(&body).unwrap()["5"];
        assert_eq!((got.state, got.reason.as_deref()), (PhaseState::Cancelled, Some("cancelled on request")));
        // The same kill without a cancel asked for is a failure, with Grid Engine's words.
        let body = report("qstat-empty.xml", &[&qacct("5", "qacct-qdel-running.txt")]);
        let got = &GridEngine.parse_status(&body).unwrap()["5"];
        assert_eq!(got.state, PhaseState::Failed);
        assert!(got.reason.as_deref().unwrap().contains("assumedly after job"), "{got:?}");
        // Deleted before it ran: no accounting record ever comes; the marker answers.
        let body =
            report("qstat-empty.xml", &[&qacct("6", "qacct-unknown.txt"), &mark("6", "cancel", "6"), "GONE 6 0"]);
        assert_eq!(GridEngine.parse_status(&body).unwrap()["6"].state, PhaseState::Cancelled);
        // A job that ended by itself (exit 0) before the cancel reached it stays completed.
        let body = report("qstat-empty.xml", &[&qacct("1", "qacct-completed.txt"), &mark("1", "cancel", "1")]);
        assert_eq!(GridEngine.parse_status(&body).unwrap()["1"].state, PhaseState::Completed);
    }

    #[test]
    fn a_job_gone_without_a_record_waits_for_one_then_is_unknown() {
        let gone = |secs: u64, started: bool| {
            let mut lines = vec![qacct("9", "qacct-unknown.txt"), format!("GONE 9 {secs}")];
            if started {
                lines.push(mark("9", "started", "9"));
            }
            let refs: Vec<&str> = lines.iter().map(String::as_str).collect();
            GridEngine.parse_status(&report("qstat-empty.xml", &refs)).unwrap().get("9").cloned()
        };
        let waiting = gone(10, false).unwrap();
        assert_eq!((waiting.state, waiting.raw_state.as_str()), (PhaseState::Pending, "gone"));
        assert_eq!(gone(10, true).unwrap().state, PhaseState::Running, "it started: it is ending, not waiting");
        assert!(gone(ACCOUNTING_GRACE_S, true).is_none(), "past the grace nothing can tell: the caller says unknown");
    }

    #[test]
    fn a_status_query_that_could_not_ask_grid_engine_knows_nothing() {
        let down = format!("QSTAT 1 {}\n", super::super::common::b64(&fixture("qstat-master-down.txt")));
        let err = GridEngine.parse_status(&down).unwrap_err();
        assert!(err.contains("commlib error"), "{err}");
        assert!(GridEngine.parse_status("").is_err(), "no qstat result at all is not an empty queue");
        let garbage = format!("QSTAT 0 {}\n", super::super::common::b64("<html>proxy error</html>"));
        assert!(GridEngine.parse_status(&garbage).is_err());
    }

    #[test]
    fn jobs_are_found_again_by_their_context_variable_or_start_marker() {
        let tags: BTreeMap<Phase, String> =
            [(Phase::PROLOG, "t9:prolog".to_owned()), (Phase::EXECUTE, "t1:execute".to_owned())].into();
        let body = format!(
            "QSTAT 0 {}\nQSTATJ {}\nSTARTED prolog 17\nSTARTED execute 1\nSTARTED execute junk\n",
            super::super::common::b64(&fixture("qstat-running.xml")),
            super::super::common::b64(&fixture("qstat-j-context.xml")),
        );
        let found = GridEngine.parse_find(&body, &tags);
        // Job 1 carries `hpcforge=t1:execute`; its marker names it too (counted once).
        assert_eq!(found[&Phase::EXECUTE], ["1"]);
        assert_eq!(found[&Phase::PROLOG], ["17"]);
        let empty = format!("QSTAT 0 {}\n", super::super::common::b64(&fixture("qstat-empty.xml")));
        assert!(GridEngine.parse_find(&empty, &tags).is_empty());
    }

    #[test]
    fn submissions_read_job_ids_strictly_and_keep_refusals_verbatim() {
        let refusal = fixture("qsub-bad-queue.txt");
        let text = refusal.lines().filter(|l| !l.starts_with("rc=")).collect::<Vec<_>>().join("\n");
        let body = format!("SUBMIT prolog 0 =41\nSUBMIT execute 1 {}\n", super::super::common::b64(&text));
        let mut report = SubmitReport::default();
        GridEngine.parse_submit(&body, &mut report);
        assert_eq!(report.outcomes[&Phase::PROLOG], super::super::SubmitOutcome::Submitted("41".into()));
        match &report.outcomes[&Phase::EXECUTE] {
            super::super::SubmitOutcome::Refused { status, message } => {
                assert_eq!(*status, 1);
                assert_eq!(message, text.trim());
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_limit_the_master_enforced_is_told_apart_by_what_was_asked_for() {
        let r = |category: &str, wallclock: u64| AcctRecord {
            id: "7".into(),
            task: None,
            name: "x".into(),
            failed: 37,
            failed_text: "qmaster enforced h_rt, h_cpu, or h_vmem limit".into(),
            exit_status: 137,
            started_at: None,
            ended_at: None,
            wallclock_s: Some(wallclock),
            category: category.into(),
        };
        assert_eq!(acct_status(&r("-l h_rt=60,h_vmem=1G", 61)).state, PhaseState::Timeout);
        assert_eq!(acct_status(&r("-l h_rt=60,h_vmem=1G", 12)).state, PhaseState::OutOfMemory);
        assert_eq!(acct_status(&r("-l h_cpu=60", 70)).state, PhaseState::Timeout);
    }

    #[test]
    fn the_tasks_of_an_array_job_are_one_job() {
        // Captured: `qsub -t 1-5 -tc 2`, task 3 exits 1; two tasks running, one waiting.
        let xml = fixture("qstat-xml-array.xml");
        let body = format!("QSTAT 0 {}\n", super::super::common::b64(&xml));
        let st = GridEngine.parse_status(&body).unwrap();
        assert_eq!(st.len(), 1);
        assert_eq!(st["4672"].state, PhaseState::Running, "{:?}", st["4672"]);
        // Gone from the queue: each task's accounting record; task 3 failed, so the job did.
        let acct = fixture("qacct-array.txt");
        let body = format!(
            "QSTAT 0 {}\nQACCT 4672 {}\n",
            super::super::common::b64(&fixture("qstat-empty.xml")),
            super::super::common::b64(&acct)
        );
        let st = GridEngine.parse_status(&body).unwrap();
        assert_eq!((st["4672"].state, st["4672"].exit_code), (PhaseState::Failed, Some(1)), "{:?}", st["4672"]);
    }
}

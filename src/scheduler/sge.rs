//! Grid Engine (Son of Grid Engine 8.1.9, and the Univa/Altair descendants that keep
//! its output formats): the parsers of what its commands print, pure functions tested
//! on output captured from a real Grid Engine (`tests/fixtures/sge/`).
//!
//! Not a [`super::Scheduler`] yet: `scheduler = "sge"` clusters are still refused
//! (issue 11 adds the scripts, templates and the contract suite on top of these).
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

use super::JobStatus;
use crate::model::PhaseState;

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
fn acct_time(text: &str) -> Option<OffsetDateTime> {
    let words: Vec<&str> = text.split_whitespace().collect();
    let fmt = format_description!(
        "[weekday repr:short] [month repr:short] [day padding:none] [hour]:[minute]:[second] [year]"
    );
    time::PrimitiveDateTime::parse(&words.join(" "), &fmt).ok().map(|t| t.assume_utc())
}

/// The records in `qacct -j` output, oldest first.
pub fn parse_qacct(text: &str) -> Result<Vec<AcctRecord>, String> {
    let mut records = Vec::new();
    for block in text.split("==============================================================") {
        let fields: BTreeMap<&str, &str> = block
            .lines()
            .filter_map(|l| {
                let (k, v) = l.split_once(char::is_whitespace)?;
                Some((k.trim(), v.trim()))
            })
            .collect();
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
}

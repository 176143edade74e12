//! The scheduler seam: what each batch system needs, one file each. The contract
//! ([`Scheduler`]): how its scripts are written (directive prefix, job-ID variable,
//! time and size formats), how it submits with dependencies, asks about all of a
//! user's jobs at once, finds jobs again by their tag and cancels, and which of its
//! messages mean "try again later". A new scheduler is one file plus its templates.
//!
//! - [`common`]: the shell plumbing every scheduler shares (run directory, staging,
//!   script files, output tails, the line protocol).
//! - [`frames`]: frame phases' plumbing: where frames record how they ended, the
//!   lines before a job array, the tallies, the frames that succeeded, pages of records.
//! - [`failures`]: transient or permanent, and plain explanations.
//! - [`posts`], [`usage`]: reading what jobs posted and what they used, on the
//!   monitor's round trip.
//! - [`slurm`], [`sge`], [`local`]: the implementations.
//!
//! Scripts produced here run on the cluster as the user (the mediator sends them over
//! SSH); the parsers that read their output are pure functions, tested on output
//! captured from a real Slurm (`tests/fixtures/slurm/`) and Grid Engine
//! (`tests/fixtures/sge/`).

pub mod common;
pub mod failures;
pub mod frames;
pub mod local;
pub mod posts;
pub mod sge;
pub mod slurm;
pub mod usage;

use std::collections::BTreeMap;

use time::OffsetDateTime;

use crate::model::workflow::{Condition, Wait};
use crate::model::{ClusterSpec, Memory, Phase, PhaseState, SchedulerKind, StagedFile, UserName, WallTime};

/// The environment variable a submission sets, on schedulers that do not enforce a
/// wait's condition themselves, to what the job's phase waits for with a condition:
/// `ok:<phase>:<job ID>` (must have succeeded) and `notok:<phase>:<job ID>` (must
/// not have), joined by `+`. Waits for a phase to end, whatever the outcome, need no
/// check: the scheduler's hold is enough.
pub const AFTER_VARIABLE: &str = "HPCG_AFTER";

/// One phase to hand to the scheduler.
#[derive(Debug, Clone)]
pub struct PhaseSubmission {
    /// Which phase.
    pub phase: Phase,
    /// The forged script.
    pub script: String,
    /// The tag that finds the job again (`hpcforge:<task>:<phase>`).
    pub tag: String,
    /// The jobs it waits for, each with its condition: phases submitted earlier in the
    /// same plan, or in [`SubmitPlan::known`]. Waits already settled (the phase ended
    /// before this submission) are not here: the mediator decided them.
    pub after: Vec<Wait>,
    /// For a phase that runs per frame: the job array it becomes.
    pub array: Option<ArraySpec>,
}

/// A job array: elements `1..=elements`, at most `max_parallel` running at once,
/// running `frames` (a canonical frame range), `per_job` frames per element.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArraySpec {
    /// How many elements.
    pub elements: u32,
    /// At most this many at once.
    pub max_parallel: Option<u32>,
    /// The frames this submission runs: all of the phase's, or those a restart reruns.
    pub frames: String,
    /// Whether `frames` are all of the phase's frames (a first run, or a rerun of all).
    pub whole: bool,
}

impl PhaseSubmission {
    /// The `HPCG_AFTER` value (see [`AFTER_VARIABLE`]), written with `$hpcg_id_<phase>`
    /// for the job IDs, and for a phase that runs per frame its number of frames
    /// (`ok:render:$hpcg_id_render:1000`); empty when no wait has a condition to check.
    pub fn after_checks(&self, frame_totals: &BTreeMap<Phase, u32>) -> String {
        self.after
            .iter()
            // A wait for any end needs no check: the hold is enough. Frame by frame,
            // each frame checks its own (the forged frame loop).
            .filter(|w| w.when != Condition::Ended && !w.per_frame)
            .map(|w| {
                let total = frame_totals.get(&w.phase).map(|n| format!(":{n}")).unwrap_or_default();
                format!("{}:{p}:$hpcg_id_{p}{total}", w.when.script_word(), p = w.phase)
            })
            .collect::<Vec<_>>()
            .join("+")
    }
}

/// Everything one submission round trip does.
#[derive(Debug, Clone)]
pub struct SubmitPlan {
    /// The task's run directory.
    pub run_dir: String,
    /// Files to stage first (empty after the first submission).
    pub stage: Vec<StagedFile>,
    /// Phases to submit, each after the phases of the plan it waits for.
    pub phases: Vec<PhaseSubmission>,
    /// Job IDs of phases already submitted (dependencies may name them).
    pub known: BTreeMap<Phase, String>,
    /// How many frames each phase of the task that runs per frame has: a wait for one
    /// of them to succeed, checked by a script ([`AFTER_VARIABLE`]), counts its frames'
    /// success records.
    pub frame_totals: BTreeMap<Phase, u32>,
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
    /// For a job array running frames: what the frames recorded in the run directory.
    pub frames: Option<FrameTally>,
}

pub use crate::model::task::FrameTally;

/// A job to ask about.
#[derive(Debug, Clone)]
pub struct JobQuery {
    /// Its ID.
    pub job_id: String,
    /// Its task's run directory (where job-start markers are).
    pub run_dir: String,
    /// Its phase.
    pub phase: Phase,
    /// Whether it is a job array running frames, whose records are read too.
    pub frames: bool,
}

/// An ended job whose use of resources is to be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageQuery {
    /// Its ID (a job array's own ID).
    pub job_id: String,
    /// Its task's run directory (where the job's own records are).
    pub run_dir: String,
    /// Its phase.
    pub phase: Phase,
}

/// A batch scheduler, seen as scripts to run as the user and parsers of their output.
///
/// The first group of methods is the scheduler's dialect, which the forge and the
/// failure classifier read; the defaults are Slurm's formats and no phrases of its own.
pub trait Scheduler: Send + Sync {
    /// Which kind this is.
    fn kind(&self) -> SchedulerKind;

    /// The prefix of directive lines in a job script (`#SBATCH`), if it reads any.
    fn directive_prefix(&self) -> Option<&'static str> {
        None
    }

    /// The environment variable that holds the job's ID inside a running job.
    fn job_id_variable(&self) -> &'static str;

    /// The environment variable that holds, inside a job-array element, the array's
    /// own job ID (the one submission answered with). Grid Engine and `local` give
    /// every element the array's ID; Slurm gives each its own, and the array's apart.
    fn array_job_id_variable(&self) -> &'static str {
        self.job_id_variable()
    }

    /// The environment variable that holds a job-array element's index (from 1).
    fn array_index_variable(&self) -> &'static str {
        "SLURM_ARRAY_TASK_ID"
    }

    /// A wall-time limit as this scheduler's directives write it.
    fn walltime(&self, w: WallTime) -> String {
        w.to_string()
    }

    /// A memory size as this scheduler's directives write it.
    fn memory(&self, m: Memory) -> String {
        m.to_string()
    }

    /// Whether the scheduler itself keeps a job that waits for another's success (or
    /// failure) from running when that did not happen (Slurm's `afterok`,
    /// `afternotok`). Where it does not (Grid Engine's `-hold_jid` waits for the end,
    /// whatever the outcome), the forge makes every phase script record how it ended
    /// and check its predecessors' records first ([`common::after_guard`]), and the
    /// submission names them in [`AFTER_VARIABLE`].
    fn enforces_afterok(&self) -> bool {
        true
    }

    /// Variables the scheduler itself expands in directive values (Grid Engine's
    /// `$JOB_ID` in output paths): the only `$` words a directive line may hold.
    fn directive_variables(&self) -> &'static [&'static str] {
        &[]
    }

    /// Lowercase fragments of this scheduler's messages that mean "busy or unreachable,
    /// try again later" (besides the connection failures every scheduler shares).
    fn transient_phrases(&self) -> &'static [&'static str] {
        &[]
    }

    /// Plain explanations of this scheduler's refusals, by lowercase message fragment
    /// (tried before the ones every scheduler shares).
    fn explanations(&self) -> &'static [(&'static str, &'static str)] {
        &[]
    }

    /// The commands that submit `plan.phases` (after [`common::prelude`] has run); they print
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

    /// The lines (run after [`common::HELPERS`]) reading what the ended `jobs` used:
    /// by default their own records ([`usage::records_script`]); a scheduler with
    /// accounting asks it too, once for all of them.
    fn usage_script(&self, jobs: &[UsageQuery]) -> String {
        usage::records_script(jobs)
    }

    /// Reads what [`Scheduler::usage_script`] printed.
    fn parse_usage(&self, body: &str) -> usage::UsageAnswer {
        usage::UsageAnswer { job: usage::parse_records(body), ..Default::default() }
    }

    /// One script cancelling `jobs`.
    fn cancel_script(&self, jobs: &[JobQuery]) -> String;

    /// Where the job `job_id` of `phase` writes its standard output (or error, with
    /// `stderr`), by the convention of this scheduler's default templates.
    fn output_file(&self, run_dir: &str, phase: Phase, job_id: &str, stderr: bool) -> String;
}

/// One status for the elements of a job array (or the one status of a plain job):
/// running while any element runs, pending while any waits (and none runs); once all
/// have ended, completed if every one did, else the first that did not (its state,
/// exit code and reason), from the earliest start to the latest end.
pub fn combine(mut sts: Vec<JobStatus>) -> JobStatus {
    if sts.len() == 1 {
        return sts.remove(0);
    }
    let started_at = sts.iter().filter_map(|s| s.started_at).min();
    let never_satisfied =
        |s: &JobStatus| s.state == PhaseState::Cancelled && s.reason.as_deref() == Some(NEVER_SATISFIED);
    let pick = sts
        .iter()
        .position(|s| s.state == PhaseState::Running)
        .or_else(|| sts.iter().position(|s| !s.state.is_final()))
        // An element that ran and failed says more than one held back because of it.
        .or_else(|| sts.iter().position(|s| s.state != PhaseState::Completed && !never_satisfied(s)))
        .or_else(|| sts.iter().position(|s| s.state != PhaseState::Completed))
        .unwrap_or(0);
    let ended = sts.iter().all(|s| s.state.is_final());
    let ended_at = if ended { sts.iter().filter_map(|s| s.ended_at).max() } else { None };
    // Some elements ran and others were held back for good (frame by frame, the
    // elements they wait for failed): the array did not do its work, and did not
    // merely not run.
    let partly = ended && sts.iter().any(|s| !never_satisfied(s)) && never_satisfied(&sts[pick]);
    let mut st = sts.swap_remove(pick);
    st.started_at = started_at;
    st.ended_at = ended_at;
    if partly {
        st.state = PhaseState::Failed;
        st.reason = Some(PARTLY_RUN.to_owned());
    }
    st
}

/// The reason of a job array some of whose elements ran while others never could.
pub const PARTLY_RUN: &str = "SomeElementsNeverSatisfied";

use crate::model::task::NEVER_SATISFIED;

/// The scheduler of `spec`, or why its tasks cannot run.
pub fn for_cluster(spec: &ClusterSpec) -> Result<Box<dyn Scheduler>, String> {
    match spec.scheduler {
        SchedulerKind::Slurm => Ok(Box::new(slurm::Slurm { accounting: spec.accounting })),
        SchedulerKind::Sge => Ok(Box::new(sge::GridEngine)),
        SchedulerKind::Local => Ok(Box::new(local::Local)),
        other => Err(format!(
            "submitting to {} clusters is not implemented yet ({} are)",
            other.as_str(),
            SchedulerKind::implemented_list()
        )),
    }
}

/// The dialect of `kind` for writing scripts (directives, job-ID variable, formats),
/// whether or not its tasks can be submitted yet; `None` for kinds with no
/// implementation at all.
pub fn dialect(kind: SchedulerKind) -> Option<Box<dyn Scheduler>> {
    match kind {
        SchedulerKind::Slurm => Some(Box::new(slurm::Slurm { accounting: false })),
        SchedulerKind::Sge => Some(Box::new(sge::GridEngine)),
        SchedulerKind::Local => Some(Box::new(local::Local)),
        SchedulerKind::Pbs => None,
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::model::workflow::{Condition, Wait};

    fn ph(name: &str) -> Phase {
        Phase::parse(name).unwrap()
    }

    /// prep; a after prep succeeded; b (an array) after prep ended; report after a
    /// succeeded and b failed; c (an array) frame by frame after b: every condition,
    /// a phase with two waits, and both kinds of waits on an array.
    fn plan(run_dir: &str) -> SubmitPlan {
        let w = |p: &str, when| Wait::on(ph(p), when);
        let phase = |name: &str, after: Vec<Wait>| PhaseSubmission {
            phase: ph(name),
            script: "#!/bin/sh\ntrue\n".into(),
            tag: format!("hpcforge:t:{name}"),
            after,
            array: (name == "b" || name == "c").then(|| ArraySpec {
                elements: 12,
                max_parallel: Some(3),
                frames: "1-12".into(),
                whole: true,
            }),
        };
        SubmitPlan {
            run_dir: run_dir.into(),
            stage: Vec::new(),
            phases: vec![
                phase("prep", vec![]),
                phase("a", vec![w("prep", Condition::Succeeded)]),
                phase("b", vec![w("prep", Condition::Ended)]),
                phase("report", vec![w("a", Condition::Succeeded), w("b", Condition::Failed)]),
                phase("c", vec![Wait { per_frame: true, ..w("b", Condition::Succeeded) }]),
            ],
            known: BTreeMap::new(),
            frame_totals: [(ph("b"), 12), (ph("c"), 12)].into_iter().collect(),
        }
    }

    /// Runs a plan's submission with `cmd` (`sbatch`, `qsub`) replaced by a stand-in that
    /// records its arguments, one line per call, and answers job IDs 101, 102, ...:
    /// the arguments each phase was submitted with.
    fn submitted_with(sched: &dyn Scheduler, cmd: &str, answer: &str) -> Vec<String> {
        let dir = tempfile::tempdir().unwrap();
        let bin = dir.path().join("bin");
        std::fs::create_dir(&bin).unwrap();
        let log = dir.path().join("calls");
        let fake = format!(
            "#!/bin/sh\nn=$(( $(wc -l < {log} 2>/dev/null || echo 0) + 101 ))\nprintf '%s|' \"$@\" >> {log}\necho >> {log}\nprintf '{answer}\\n' \"$n\"\n",
            log = log.display()
        );
        std::fs::write(bin.join(cmd), fake).unwrap();
        std::process::Command::new("chmod").arg("+x").arg(bin.join(cmd)).status().unwrap();
        let plan = plan(dir.path().join("run").to_str().unwrap());
        let script = common::prelude(&plan).unwrap() + &sched.submit_commands(&plan);
        let path = format!("{}:{}", bin.display(), std::env::var("PATH").unwrap());
        let out = std::process::Command::new("sh").arg("-c").arg(&script).env("PATH", path).output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        let mut report = SubmitReport::default();
        sched.parse_submit(&stdout, &mut report);
        assert_eq!(report.outcomes.len(), 5, "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
        std::fs::read_to_string(&log).unwrap().lines().map(str::to_owned).collect()
    }

    #[test]
    fn slurm_is_given_every_wait_with_its_own_condition() {
        let calls = submitted_with(&slurm::Slurm { accounting: false }, "sbatch", "%s");
        let dep = |i: usize| calls[i].split('|').find(|a| a.starts_with("--dependency=")).map(str::to_owned);
        assert_eq!(dep(0), None, "{calls:?}");
        assert_eq!(dep(1).as_deref(), Some("--dependency=afterok:101"));
        assert_eq!(dep(2).as_deref(), Some("--dependency=afterany:101"));
        assert_eq!(dep(3).as_deref(), Some("--dependency=afterok:102,afternotok:103"));
        // b is a job array: twelve elements, three at a time.
        let array = |i: usize| calls[i].split('|').find(|a| a.starts_with("--array=")).map(str::to_owned);
        assert_eq!(array(2).as_deref(), Some("--array=1-12%3"));
        assert_eq!(array(1), None);
        // c: element i after element i of b succeeded.
        assert_eq!(dep(4).as_deref(), Some("--dependency=aftercorr:103"));
    }

    #[test]
    fn grid_engine_holds_on_every_wait_and_hands_the_conditions_to_the_script() {
        let calls = submitted_with(&sge::GridEngine, "qsub", "%s");
        let after = |i: usize, opt: &str| {
            let args: Vec<&str> = calls[i].split('|').collect();
            args.iter().position(|a| *a == opt).map(|at| args[at + 1].to_owned())
        };
        assert_eq!(after(0, "-hold_jid"), None, "{calls:?}");
        assert_eq!(after(1, "-hold_jid").as_deref(), Some("101"));
        assert_eq!(after(1, "-v").as_deref(), Some("HPCG_AFTER=ok:prep:101"));
        // Waiting for the end whatever the outcome needs no check of the script's own.
        assert_eq!(after(2, "-hold_jid").as_deref(), Some("101"));
        assert_eq!(after(2, "-v"), None);
        assert_eq!(after(3, "-hold_jid").as_deref(), Some("102,103"));
        // b runs per frame: its success is its twelve frames' records.
        assert_eq!(after(3, "-v").as_deref(), Some("HPCG_AFTER=ok:a:102+notok:b:103:12"));
        // c: task i after task i of b; each frame checks b's frame itself.
        assert_eq!((after(4, "-hold_jid"), after(4, "-hold_jid_ad").as_deref()), (None, Some("103")));
        assert_eq!(after(4, "-v"), None);
        // b is a job array: twelve tasks, three at a time.
        assert_eq!((after(2, "-t").as_deref(), after(2, "-tc").as_deref()), (Some("1-12"), Some("3")));
        assert_eq!(after(1, "-t"), None);
    }

    /// Runs `common::after_guard` for phase `x` with `HPCG_AFTER=after`, in a directory
    /// holding `rc_<phase>` records: whether the phase ran, and what it said if not.
    fn guard(after: &str, records: &[(&str, &str)]) -> (bool, String) {
        let dir = tempfile::tempdir().unwrap();
        for (p, line) in records {
            std::fs::write(dir.path().join(format!("rc_{p}")), format!("{line}\n")).unwrap();
        }
        let d = crate::shell::shell_quote(dir.path().to_str().unwrap()).into_owned();
        let script = common::after_guard(ph("x"), "JOB", &d) + "echo RAN\n";
        let out = std::process::Command::new("sh")
            .arg("-c")
            .arg(&script)
            .env("HPCG_AFTER", after)
            .env("JOB", "77")
            .output()
            .unwrap();
        let ran = String::from_utf8_lossy(&out.stdout).contains("RAN");
        assert_eq!(ran, out.status.success());
        assert_eq!(!ran, dir.path().join("skipped_x").exists(), "a phase not run leaves skipped_x");
        (ran, String::from_utf8_lossy(&out.stderr).into_owned())
    }

    #[test]
    fn the_scripts_own_checks_keep_every_condition() {
        let ok = "5 0 2026-12-04T10:00:00 2026-12-04T10:00:01";
        let failed = "6 3 2026-12-04T10:00:00 2026-12-04T10:00:01";
        assert!(guard("", &[]).0, "no waits to check");
        assert!(guard("ok:a:5", &[("a", ok)]).0);
        let (ran, said) = guard("ok:a:5", &[("a", "4 0 x y")]);
        assert!(!ran, "a record of an earlier job of the phase does not count");
        assert!(said.contains("x not run: the a phase (job 5) did not succeed"), "{said}");
        assert!(!guard("ok:a:5", &[]).0, "a job killed by a limit records nothing");
        assert!(guard("notok:b:6", &[("b", failed)]).0);
        assert!(guard("notok:b:6", &[]).0, "not run, or killed: not a success");
        let (ran, said) = guard("notok:b:5", &[("b", ok)]);
        assert!(!ran && said.contains("succeeded, and x runs only if it did not"), "{said}");
        assert!(guard("ok:a:5+notok:b:6", &[("a", ok), ("b", failed)]).0);
        assert!(!guard("ok:a:5+notok:b:5", &[("a", ok), ("b", ok)]).0);
    }

    #[test]
    fn an_array_some_of_whose_elements_were_held_back_for_good_failed_and_one_held_back_whole_did_not_run() {
        let st = |state, reason: &str| JobStatus {
            state,
            raw_state: format!("{state:?}"),
            exit_code: None,
            signal: None,
            reason: Some(reason.into()),
            started_at: None,
            ended_at: None,
            frames: None,
        };
        let held = || st(PhaseState::Cancelled, NEVER_SATISFIED);
        let partly = combine(vec![st(PhaseState::Completed, "None"), held(), st(PhaseState::Completed, "None")]);
        assert_eq!((partly.state, partly.reason.as_deref()), (PhaseState::Failed, Some(PARTLY_RUN)));
        let whole = combine(vec![held(), held()]);
        assert_eq!((whole.state, whole.reason.as_deref()), (PhaseState::Cancelled, Some(NEVER_SATISFIED)));
        // An element that failed by itself is what the array says.
        let failed = combine(vec![held(), st(PhaseState::OutOfMemory, "OutOfMemory")]);
        assert_eq!(failed.state, PhaseState::OutOfMemory);
    }

    #[test]
    fn a_wait_on_a_phase_that_runs_per_frame_counts_its_frames_successes() {
        let dir = tempfile::tempdir().unwrap();
        let frames = dir.path().join("frames/render");
        std::fs::create_dir_all(&frames).unwrap();
        for (f, rc) in [(1, 0), (2, 0), (5, 0)] {
            std::fs::write(frames.join(f.to_string()), format!("{rc} 2026-12-04T10:00:00 2026-12-04T10:00:01 9 1\n"))
                .unwrap();
        }
        // A record being written is not a frame.
        std::fs::write(frames.join("7.tmp"), "0 x y 9 1\n").unwrap();
        let d = crate::shell::shell_quote(dir.path().to_str().unwrap()).into_owned();
        let run = |after: &str| {
            let script = common::after_guard(ph("x"), "JOB", &d) + "echo RAN\n";
            let out =
                std::process::Command::new("sh").arg("-c").arg(&script).env("HPCG_AFTER", after).output().unwrap();
            String::from_utf8_lossy(&out.stdout).contains("RAN")
        };
        assert!(run("ok:render:9:3"), "all three frames succeeded");
        assert!(!run("ok:render:9:4"), "one of four frames has no success record");
        assert!(run("notok:render:9:4"));
        std::fs::write(frames.join("2"), "1 x y 9 1\n").unwrap();
        assert!(!run("ok:render:9:3"), "frame 2 failed");
        assert!(run("notok:render:9:3"));
    }

    /// A recorded Slurm output from `tests/fixtures/slurm/` (for the parsers' unit tests).
    pub(crate) fn slurm_fixture(name: &str) -> String {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/slurm").join(name);
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    }
}

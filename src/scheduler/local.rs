//! The `local` scheduler: phase scripts run as local processes of the server's own
//! user, honouring the same waits as on a cluster (after a phase succeeded, ended, or
//! did not succeed), phases that do not wait for each other side by side.
//!
//! A detached supervisor (`setsid`, survives a server restart) runs the phases and
//! records each one's state in `<run>/.hpcforge/<phase>.state`
//! (`STATE REASON START END EXIT`); the monitor reads those files. Job IDs are
//! `<supervisor pid>.<phase>`.

use std::collections::BTreeMap;

use super::common::{parse_slurm_time, unb64};
use super::{JobQuery, JobStatus, Scheduler, SubmitOutcome, SubmitPlan, SubmitReport};
use crate::model::{Phase, PhaseState, SchedulerKind, UserName};
use crate::shell::shell_quote;

/// The supervisor, written into each run directory. Its arguments are the run
/// directory, then one `<phase>:<waits>` per phase, where `<waits>` is a
/// comma-separated list of `ok=<phase>` (must have succeeded), `any=<phase>` (must
/// have ended) and `notok=<phase>` (must not have succeeded), possibly empty.
pub const SUPERVISOR: &str = r#"#!/bin/sh
# hpcforge local supervisor: runs each phase once the phases it waits for have ended
# as it needs, phases that do not wait for each other side by side, and records each
# phase's state in .hpcforge/<phase>.state as "STATE REASON START END EXIT" and its
# exit status in .hpcforge/<phase>.rc ("-" for a phase that did not run).
run=$1; shift
cd "$run" || exit 1
now() { date -u +%Y-%m-%dT%H:%M:%S; }
put() { printf '%s\n' "$2" > ".hpcforge/$1.state.tmp" && mv -f ".hpcforge/$1.state.tmp" ".hpcforge/$1.state"; }
rc_put() { printf '%s\n' "$2" > ".hpcforge/$1.rc.tmp" && mv -f ".hpcforge/$1.rc.tmp" ".hpcforge/$1.rc"; }
phase_run() { # phase waits [elements max-parallel]
    phase=$1; waits=$(printf '%s' "$2" | tr ',' ' ')
    for w in $waits; do
        while [ ! -f ".hpcforge/${w#*=}.rc" ]; do sleep 0.2; done
    done
    for w in $waits; do
        rc=$(cat ".hpcforge/${w#*=}.rc" 2>/dev/null)
        case ${w%%=*}:$rc in
            ok:0 | any:* | notok:[!0]*) ;;
            *)
                put "$phase" "CANCELLED DependencyNeverSatisfied $(now) $(now) -"
                rc_put "$phase" -
                return ;;
        esac
    done
    start=$(now)
    put "$phase" "RUNNING None $start - -"
    interp=$(head -n 1 ".hpcforge/script_$phase" | sed 's/^#![[:space:]]*//')
    if [ "${3:-0}" -gt 0 ]; then
        # A job array: elements 1..$3, at most $4 at once; it fails if one does.
        rc=0; i=1; pids=; n=0
        : > "$phase.out"; : > "$phase.err"
        while [ "$i" -le "$3" ]; do
            HPCG_LOCAL_JOB="$$.$phase" HPCG_LOCAL_INDEX=$i $interp ".hpcforge/script_$phase" >> "$phase.out" 2>> "$phase.err" &
            pids="$pids $!"; n=$((n + 1)); i=$((i + 1))
            if [ "$n" -ge "${4:-$3}" ]; then
                for p in $pids; do wait "$p" || rc=1; done
                pids=; n=0
            fi
        done
        for p in $pids; do wait "$p" || rc=1; done
    else
        HPCG_LOCAL_JOB="$$.$phase" $interp ".hpcforge/script_$phase" > "$phase.out" 2> "$phase.err"
        rc=$?
    fi
    if [ "$rc" -eq 0 ]; then st=COMPLETED; else st=FAILED; fi
    put "$phase" "$st None $start $(now) $rc"
    rc_put "$phase" "$rc"
}
for spec in "$@"; do put "${spec%%:*}" "PENDING None - - -"; done
for spec in "$@"; do
    rest=${spec#*:}
    case $rest in
        *:*:*) array=${rest#*:}; phase_run "${spec%%:*}" "${rest%%:*}" "${array%%:*}" "${array#*:}" & ;;
        *) phase_run "${spec%%:*}" "$rest" & ;;
    esac
done
wait
"#;

/// The local scheduler.
#[derive(Debug, Clone, Copy, Default)]
pub struct Local;

/// Splits a local job ID into (supervisor pid, phase).
pub fn split_job_id(id: &str) -> Option<(u32, Phase)> {
    let (pid, phase) = id.split_once('.')?;
    Some((pid.parse().ok()?, Phase::parse(phase).ok()?))
}

/// Reads a state file line and whether the supervisor lives (and a cancel was asked).
pub fn parse_state(line: Option<&str>, alive: bool, cancelled: bool) -> Option<JobStatus> {
    let gone = |cancelled: bool| JobStatus {
        state: if cancelled { PhaseState::Cancelled } else { PhaseState::Unknown },
        raw_state: if cancelled { "CANCELLED".into() } else { "GONE".into() },
        exit_code: None,
        signal: None,
        reason: Some(if cancelled {
            "cancelled on request".into()
        } else {
            "the supervisor ended before the phase did".into()
        }),
        started_at: None,
        ended_at: None,
        frames: None,
    };
    let Some(line) = line else {
        // No state yet: the supervisor has not reached this phase.
        return Some(if alive { pending() } else { gone(cancelled) });
    };
    let f: Vec<&str> = line.split_whitespace().collect();
    let (raw, reason, start, end, exit) = (
        *f.first()?,
        f.get(1).copied().unwrap_or("None"),
        f.get(2).copied().unwrap_or("-"),
        f.get(3).copied().unwrap_or("-"),
        f.get(4).copied().unwrap_or("-"),
    );
    let exit_code = exit.parse::<i32>().ok();
    let state = match raw {
        "PENDING" | "RUNNING" if !alive => return Some(gone(cancelled)),
        "PENDING" => PhaseState::Pending,
        "RUNNING" => PhaseState::Running,
        "COMPLETED" => PhaseState::Completed,
        "FAILED" => PhaseState::Failed,
        "CANCELLED" => PhaseState::Cancelled,
        _ => PhaseState::Unknown,
    };
    Some(JobStatus {
        state,
        raw_state: raw.to_owned(),
        exit_code: if state.is_final() { exit_code } else { None },
        signal: None,
        reason: (reason != "None").then(|| reason.to_owned()),
        started_at: parse_slurm_time(start),
        ended_at: parse_slurm_time(end),
        frames: None,
    })
}

fn pending() -> JobStatus {
    JobStatus {
        state: PhaseState::Pending,
        raw_state: "PENDING".into(),
        exit_code: None,
        signal: None,
        reason: None,
        started_at: None,
        ended_at: None,
        frames: None,
    }
}

impl Scheduler for Local {
    fn kind(&self) -> SchedulerKind {
        SchedulerKind::Local
    }

    fn job_id_variable(&self) -> &'static str {
        "HPCG_LOCAL_JOB"
    }

    fn array_index_variable(&self) -> &'static str {
        "HPCG_LOCAL_INDEX"
    }

    fn submit_commands(&self, plan: &SubmitPlan) -> String {
        let mut s = crate::shell::heredoc_block("\"$hpcg_run\"/.hpcforge/supervisor.sh", "SUPERVISOR", SUPERVISOR)
            .expect("the supervisor does not contain its own delimiter");
        let specs: Vec<String> = plan
            .phases
            .iter()
            .map(|p| {
                // Frame by frame: after the whole array has ended; each frame checks
                // its predecessor's record itself (the forged frame loop).
                let waits: Vec<String> = p
                    .after
                    .iter()
                    .map(|w| {
                        let word = if w.per_frame { "any" } else { w.when.script_word() };
                        format!("{word}={}", w.phase)
                    })
                    .collect();
                match &p.array {
                    Some(a) => format!(
                        "{}:{}:{}:{}",
                        p.phase,
                        waits.join(","),
                        a.elements,
                        a.max_parallel.unwrap_or(a.elements)
                    ),
                    None => format!("{}:{}", p.phase, waits.join(",")),
                }
            })
            .collect();
        s.push_str(super::common::SUBMIT_REPORT);
        s.push_str(super::common::frames_helpers(plan));
        s.push_str("hpcg_go=$hpcg_stage_ok\n");
        for p in &plan.phases {
            if let Some(a) = &p.array {
                s.push_str("if [ \"$hpcg_go\" = 1 ]; then\n");
                s.push_str(&super::common::frames_prep(p.phase, a));
                s.push_str("fi\n");
            }
        }
        s.push_str("if [ \"$hpcg_go\" = 1 ]; then\n");
        s.push_str("  rm -f \"$hpcg_run\"/.hpcforge/cancelled\n");
        for p in &plan.phases {
            s.push_str(&format!("  rm -f \"$hpcg_run\"/.hpcforge/{0}.state \"$hpcg_run\"/.hpcforge/{0}.rc\n", p.phase));
        }
        s.push_str(&format!(
            "  nohup setsid sh \"$hpcg_run\"/.hpcforge/supervisor.sh \"$hpcg_run\" {} </dev/null >/dev/null 2>&1 9>&- &\n  hpcg_sup=$!\n",
            specs.join(" ")
        ));
        s.push_str("  printf '%s\\n' \"$hpcg_sup\" > \"$hpcg_run\"/.hpcforge/supervisor.pid\n");
        for p in &plan.phases {
            s.push_str(&format!(
                "  printf 'SUBMIT {0} 0 %s\\n' \"$(printf '%s.{0}' \"$hpcg_sup\" | hpcg_b64)\"\n",
                p.phase
            ));
        }
        s.push_str("fi\n");
        s
    }

    fn parse_submit(&self, body: &str, report: &mut SubmitReport) {
        for line in body.lines() {
            let Some(rest) = line.strip_prefix("SUBMIT ") else { continue };
            let mut it = rest.splitn(3, ' ');
            let (Some(phase), Some(rc), text) = (it.next(), it.next(), it.next().unwrap_or("")) else { continue };
            let Ok(phase) = Phase::parse(phase) else { continue };
            let id = unb64(text);
            let outcome = match (rc, split_job_id(&id)) {
                ("0", Some((_, p))) if p == phase => SubmitOutcome::Submitted(id),
                _ => SubmitOutcome::Refused { status: rc.parse().unwrap_or(-1), message: id },
            };
            report.outcomes.insert(phase, outcome);
        }
    }

    fn status_script(&self, _user: &UserName, jobs: &[JobQuery]) -> String {
        let mut s = String::from(super::common::HELPERS);
        for j in jobs {
            let Some((pid, phase)) = split_job_id(&j.job_id) else { continue };
            let dir = shell_quote(&format!("{}/.hpcforge", j.run_dir)).into_owned();
            s.push_str(&format!(
                "hpcg_s=$(cat {dir}/{phase}.state 2>/dev/null) || hpcg_s=-; hpcg_a=0; kill -0 {pid} 2>/dev/null && hpcg_a=1; \
                 hpcg_c=0; [ -f {dir}/cancelled ] && hpcg_c=1; printf 'LOCAL %s %s %s %s\\n' {id} \"$hpcg_a\" \"$hpcg_c\" \"$(printf '%s' \"$hpcg_s\" | hpcg_b64)\"\n",
                id = shell_quote(&j.job_id),
            ));
        }
        s
    }

    fn parse_status(&self, body: &str) -> Result<BTreeMap<String, JobStatus>, String> {
        let mut out = BTreeMap::new();
        for line in body.lines() {
            let Some(rest) = line.strip_prefix("LOCAL ") else { continue };
            let f: Vec<&str> = rest.splitn(4, ' ').collect();
            if f.len() < 4 {
                continue;
            }
            let text = unb64(f[3]);
            let state_line = (text.trim() != "-").then_some(text.trim());
            if let Some(st) = parse_state(state_line, f[1] == "1", f[2] == "1") {
                out.insert(f[0].to_owned(), st);
            }
        }
        Ok(out)
    }

    fn find_script(&self, _user: &UserName, run_dir: &str, _tags: &BTreeMap<Phase, String>) -> String {
        let pidfile = shell_quote(&format!("{run_dir}/.hpcforge/supervisor.pid")).into_owned();
        format!("[ -f {pidfile} ] && printf 'SUPERVISOR %s\\n' \"$(head -n 1 {pidfile})\"\n")
    }

    fn parse_find(&self, body: &str, tags: &BTreeMap<Phase, String>) -> BTreeMap<Phase, Vec<String>> {
        body.lines()
            .find_map(|l| l.strip_prefix("SUPERVISOR "))
            .and_then(|pid| pid.trim().parse::<u32>().ok())
            .map(|pid| tags.keys().map(|p| (*p, vec![format!("{pid}.{p}")])).collect())
            .unwrap_or_default()
    }

    fn output_file(&self, run_dir: &str, phase: Phase, _job_id: &str, stderr: bool) -> String {
        // forge-templates/local: the supervisor writes <run dir>/<phase>.out and .err.
        format!("{run_dir}/{phase}.{}", if stderr { "err" } else { "out" })
    }

    fn cancel_script(&self, jobs: &[JobQuery]) -> String {
        let mut s = String::from(super::common::HELPERS);
        let mut seen = std::collections::BTreeSet::new();
        for j in jobs {
            let Some((pid, _)) = split_job_id(&j.job_id) else { continue };
            if seen.insert(pid) {
                let dir = shell_quote(&format!("{}/.hpcforge", j.run_dir)).into_owned();
                s.push_str(&format!(
                    "touch {dir}/cancelled; kill -TERM -{pid} 2>/dev/null; printf 'CANCEL %s 0 -\\n' {pid}\n"
                ));
            }
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_files_read_as_phase_states() {
        let st = |line: Option<&str>, alive: bool, cancelled: bool| parse_state(line, alive, cancelled).unwrap();
        assert_eq!(st(None, true, false).state, PhaseState::Pending);
        assert_eq!(st(Some("RUNNING None 2026-11-22T05:00:00 - -"), true, false).state, PhaseState::Running);
        let done = st(Some("FAILED None 2026-11-22T05:00:00 2026-11-22T05:00:03 4"), false, false);
        assert_eq!((done.state, done.exit_code), (PhaseState::Failed, Some(4)));
        assert!(done.ended_at.is_some());
        assert_eq!(
            st(Some("CANCELLED DependencyNeverSatisfied - - -"), false, false).reason.as_deref(),
            Some("DependencyNeverSatisfied")
        );
        // A supervisor that died mid-phase: cancelled if asked, otherwise nobody can tell.
        assert_eq!(st(Some("RUNNING None x - -"), false, true).state, PhaseState::Cancelled);
        assert_eq!(st(Some("RUNNING None x - -"), false, false).state, PhaseState::Unknown);
        assert_eq!(st(None, false, false).state, PhaseState::Unknown);
    }

    #[test]
    fn job_ids_name_the_supervisor_and_phase() {
        assert_eq!(split_job_id("4242.execute"), Some((4242, Phase::EXECUTE)));
        assert_eq!(split_job_id("4242"), None);
        assert_eq!(split_job_id("x.execute"), None);
    }

    /// Runs the supervisor on phases `specs` (`<phase>:<waits>[:<elements>:<at once>]`) whose scripts are
    /// `(phase, shell body)`; each script records `<phase> start|end <ns>` in `log`.
    /// Returns the log lines, the state files, and how long the supervisor took.
    fn supervise(scripts: &[(&str, &str)], specs: &[&str]) -> (Vec<String>, BTreeMap<String, String>, f64) {
        let run = tempfile::tempdir().unwrap();
        let dir = run.path().join(".hpcforge");
        std::fs::create_dir(&dir).unwrap();
        std::fs::write(dir.join("supervisor.sh"), SUPERVISOR).unwrap();
        let log = run.path().join("log");
        for (phase, body) in scripts {
            let text = format!(
                "#!/bin/sh\necho \"{phase} start $(date +%s%N)\" >> {log}\n{body}\nrc=$?\necho \"{phase} end $(date +%s%N)\" >> {log}\nexit $rc\n",
                log = log.display()
            );
            std::fs::write(dir.join(format!("script_{phase}")), text).unwrap();
        }
        let started = std::time::Instant::now();
        let status = std::process::Command::new("sh")
            .arg(dir.join("supervisor.sh"))
            .arg(run.path())
            .args(specs)
            .status()
            .unwrap();
        let took = started.elapsed().as_secs_f64();
        assert!(status.success());
        let states = scripts
            .iter()
            .map(|(p, _)| {
                let st = std::fs::read_to_string(dir.join(format!("{p}.state"))).unwrap_or_default();
                ((*p).to_owned(), st.split_whitespace().next().unwrap_or("").to_owned())
            })
            .collect();
        let lines = std::fs::read_to_string(&log).unwrap_or_default().lines().map(str::to_owned).collect();
        (lines, states, took)
    }

    fn at(lines: &[String], what: &str) -> u128 {
        let l =
            lines.iter().find(|l| l.starts_with(&format!("{what} "))).unwrap_or_else(|| panic!("{what}: {lines:?}"));
        l.rsplit(' ').next().unwrap().parse().unwrap()
    }

    #[test]
    fn the_supervisor_runs_independent_phases_side_by_side_and_each_after_what_it_waits_for() {
        let (log, states, took) = supervise(
            &[("prep", "true"), ("a", "sleep 1"), ("b", "sleep 1"), ("join", "true")],
            &["prep:", "a:ok=prep", "b:ok=prep", "join:ok=a,ok=b"],
        );
        assert!(states.values().all(|s| s == "COMPLETED"), "{states:?}");
        assert!(at(&log, "prep end") <= at(&log, "a start") && at(&log, "prep end") <= at(&log, "b start"));
        assert!(at(&log, "a end") <= at(&log, "join start") && at(&log, "b end") <= at(&log, "join start"));
        // a and b overlap: side by side, the two 1 s sleeps take about 1 s, not 2.
        assert!(at(&log, "a start") < at(&log, "b end") && at(&log, "b start") < at(&log, "a end"), "{log:?}");
        assert!(took < 1.9, "took {took:.2} s");
    }

    #[test]
    fn the_supervisor_keeps_every_condition() {
        let (log, states, _) = supervise(
            &[("solve", "exit 3"), ("rescue", "true"), ("plot", "true"), ("report", "true"), ("after_plot", "true")],
            &["solve:", "rescue:notok=solve", "plot:ok=solve", "report:any=plot,any=rescue", "after_plot:notok=plot"],
        );
        let st = |p: &str| states[p].as_str();
        assert_eq!(st("solve"), "FAILED");
        assert_eq!(st("rescue"), "COMPLETED");
        assert_eq!(st("plot"), "CANCELLED", "{log:?}");
        assert_eq!(st("report"), "COMPLETED");
        // A phase that did not run did not succeed: `notok` on it is met, as on Slurm.
        assert_eq!(st("after_plot"), "COMPLETED");
        assert!(!log.iter().any(|l| l.starts_with("plot ")), "plot never started: {log:?}");
        let (_, states, _) = supervise(&[("solve", "true"), ("rescue", "true")], &["solve:", "rescue:notok=solve"]);
        assert_eq!(states["rescue"], "CANCELLED");
    }

    #[test]
    fn the_supervisor_runs_a_job_array_a_bounded_number_at_a_time() {
        let run = tempfile::tempdir().unwrap();
        let dir = run.path().join(".hpcforge");
        std::fs::create_dir(&dir).unwrap();
        std::fs::write(dir.join("supervisor.sh"), SUPERVISOR).unwrap();
        // Each element says its index; element 3 fails.
        std::fs::write(
            dir.join("script_arr"),
            "#!/bin/sh\necho \"element $HPCG_LOCAL_INDEX\"\nsleep 1\n[ \"$HPCG_LOCAL_INDEX\" != 3 ]\n",
        )
        .unwrap();
        std::fs::write(dir.join("script_after"), "#!/bin/sh\necho after\n").unwrap();
        let started = std::time::Instant::now();
        let status = std::process::Command::new("sh")
            .arg(dir.join("supervisor.sh"))
            .arg(run.path())
            .args(["arr::4:2", "after:any=arr"])
            .status()
            .unwrap();
        let took = started.elapsed().as_secs_f64();
        assert!(status.success());
        let out = std::fs::read_to_string(run.path().join("arr.out")).unwrap();
        for i in 1..=4 {
            assert!(out.contains(&format!("element {i}\n")), "{out}");
        }
        // Four 1 s elements, two at a time: about 2 s, not 1 and not 4.
        assert!((1.9..3.5).contains(&took), "took {took:.2} s");
        let state = |p: &str| std::fs::read_to_string(dir.join(format!("{p}.state"))).unwrap();
        assert!(state("arr").starts_with("FAILED"), "one element failed: {}", state("arr"));
        assert!(state("after").starts_with("COMPLETED"), "it waited for the whole array to end");
    }
}

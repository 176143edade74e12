//! Unit tests of the transitions: intent, cancel, claims, submission outcomes, restarts
//! over the default shape and declared graphs, and the settling of waits.

use super::*;
use crate::model::TaskState;
use crate::scheduler::slurm::Slurm;
use std::collections::BTreeSet;

const SLURM: Slurm = Slurm { accounting: false };

fn at() -> OffsetDateTime {
    OffsetDateTime::UNIX_EPOCH
}

fn task() -> Task {
    crate::model::task::sample_task(at())
}

fn states(t: &Task) -> Vec<PhaseState> {
    t.phases.iter().map(|p| p.state).collect()
}

#[test]
fn an_intent_moves_the_due_phases_to_submitting() {
    let mut t = task();
    let todo = due_phases(&t);
    intent(&mut t, &todo, at()).unwrap();
    assert_eq!(states(&t), [PhaseState::Submitting; 3]);
    assert_eq!(t.submit_tries, 1);
}

#[test]
fn a_cancel_landing_before_the_intent_is_not_undone_by_it() {
    // The regression (issue 9, hole 2): a submission decided on a copy that still
    // said `waiting` turned the cancelled phases back into `submitting`.
    let mut t = task();
    let decided_on = due_phases(&t);
    request_cancel(&mut t, "alice", at()).unwrap();
    let before = t.clone();
    let refused = intent(&mut t, &decided_on, at()).unwrap_err();
    assert!(refused.0.contains("cancelled"), "{refused}");
    assert_eq!(t, before, "a refused transition changes nothing");
    assert_eq!(states(&t), [PhaseState::Cancelled; 3]);
    assert_eq!(t.state, TaskState::Cancelled);
}

#[test]
fn an_intent_decided_on_a_state_that_moved_is_refused() {
    let mut t = task();
    let decided_on = due_phases(&t);
    t.set_phase_state(at(), Phase::PROLOG, PhaseState::Blocked, Some("busy"));
    assert!(intent(&mut t, &decided_on, at()).unwrap_err().0.contains("prolog phase moved from waiting to blocked"));
}

#[test]
fn a_cancel_after_the_intent_stops_the_attempt_before_the_scheduler_is_asked() {
    let mut t = task();
    let todo = due_phases(&t);
    intent(&mut t, &todo, at()).unwrap();
    request_cancel(&mut t, "alice", at()).unwrap();
    assert_eq!(states(&t), [PhaseState::Submitting; 3], "submitting phases are left to the attempt");
    assert!(!still_submitting(&mut t, &Phase::DEFAULT, at()).unwrap(), "the attempt stops");
    assert_eq!(states(&t), [PhaseState::Cancelled; 3]);
    assert_eq!(t.state, TaskState::Cancelled);
    assert!(!submission_due(&t, at()));
}

#[test]
fn an_unfinished_attempt_after_a_cancel_is_settled_by_what_the_tags_find() {
    let mut t = task();
    let todo = due_phases(&t);
    intent(&mut t, &todo, at()).unwrap();
    request_cancel(&mut t, "alice", at()).unwrap();
    assert!(submission_due(&t, at()), "the phases left submitting must be looked up");
    settle_cancelled(&mut t, &BTreeMap::from([(Phase::PROLOG, "7".to_owned())]), at());
    assert_eq!(states(&t), [PhaseState::Pending, PhaseState::Cancelled, PhaseState::Cancelled]);
    assert_eq!(t.phase(Phase::PROLOG).job_id.as_deref(), Some("7"));
    assert!(!submission_due(&t, at()) && t.is_live(), "the monitor stops job 7");
}

#[test]
fn a_job_accepted_while_a_cancel_landed_is_recorded_so_it_can_be_stopped() {
    let mut t = task();
    let todo = due_phases(&t);
    intent(&mut t, &todo, at()).unwrap();
    request_cancel(&mut t, "alice", at()).unwrap();
    let mut report = SubmitReport::default();
    report.outcomes.insert(Phase::PROLOG, SubmitOutcome::Submitted("41".into()));
    apply_submission(&mut t, &BTreeMap::new(), &[Phase::PROLOG], &report, &SLURM, at(), at());
    let p = t.phase(Phase::PROLOG);
    assert_eq!((p.state, p.job_id.as_deref()), (PhaseState::Pending, Some("41")));
    assert!(t.cancel_requested && t.is_live(), "the monitor keeps cancelling it until it is gone");
}

#[test]
fn a_refusal_fails_the_phase_with_the_schedulers_words_and_cancels_the_rest() {
    let mut t = task();
    let todo = due_phases(&t);
    intent(&mut t, &todo, at()).unwrap();
    let mut report = SubmitReport::default();
    let msg = "sbatch: error: Batch job submission failed: Invalid partition name specified";
    report.outcomes.insert(Phase::PROLOG, SubmitOutcome::Refused { status: 1, message: msg.into() });
    apply_submission(&mut t, &BTreeMap::new(), &Phase::DEFAULT, &report, &SLURM, at(), at());
    assert_eq!(states(&t), [PhaseState::Failed, PhaseState::Cancelled, PhaseState::Cancelled]);
    let p = t.phase(Phase::PROLOG);
    assert_eq!(p.scheduler_message.as_deref(), Some(msg));
    assert!(p.explanation.as_deref().unwrap().starts_with("the partition does not exist"));
    assert_eq!(t.state, TaskState::Failed);
}

#[test]
fn a_busy_scheduler_blocks_the_phases_and_sets_the_retry() {
    let mut t = task();
    let todo = due_phases(&t);
    intent(&mut t, &todo, at()).unwrap();
    let mut report = SubmitReport::default();
    let msg = "sbatch: error: Batch job submission failed: Socket timed out on send/recv operation";
    report.outcomes.insert(Phase::PROLOG, SubmitOutcome::Refused { status: 1, message: msg.into() });
    let retry = at() + time::Duration::seconds(4);
    apply_submission(&mut t, &BTreeMap::new(), &Phase::DEFAULT, &report, &SLURM, at(), retry);
    assert_eq!(states(&t), [PhaseState::Blocked; 3]);
    assert_eq!((t.state, t.retry_at), (TaskState::Blocked, Some(retry)));
}

#[test]
fn a_cancel_of_an_ended_task_is_refused_and_a_second_one_changes_nothing() {
    let mut t = task();
    request_cancel(&mut t, "alice", at()).unwrap();
    let before = t.clone();
    request_cancel(&mut t, "bob", at()).unwrap_err();
    assert_eq!(t, before);
}

#[test]
fn a_restart_is_refused_while_the_task_is_live() {
    let mut t = task();
    assert!(
        restart(&mut t, Some(Phase::EXECUTE), &BTreeSet::new(), None, "alice", at())
            .unwrap_err()
            .0
            .contains("still submitting")
    );
}

#[test]
fn a_restart_from_a_phase_the_task_does_not_have_is_refused_and_changes_nothing() {
    let mut t = task();
    for p in t.phases.iter_mut() {
        p.state = PhaseState::Completed;
    }
    t.refresh_state(at());
    let before = t.clone();
    let refused =
        restart(&mut t, Some(Phase::parse("nosuch").unwrap()), &BTreeSet::new(), None, "alice", at()).unwrap_err();
    assert!(refused.0.contains("has no phase `nosuch`"), "{refused}");
    assert_eq!(t, before);
    // From execute: execute and the epilog go back to waiting, the prolog keeps its run.
    restart(&mut t, Some(Phase::EXECUTE), &BTreeSet::new(), None, "alice", at()).unwrap();
    let states: Vec<PhaseState> = t.phases.iter().map(|p| p.state).collect();
    assert_eq!(states, [PhaseState::Completed, PhaseState::Waiting, PhaseState::Waiting]);
}

#[test]
fn a_claim_is_taken_once_renewed_by_its_holder_and_taken_over_only_after_it_lapses() {
    let mut t = task();
    let later = |s: i64| at() + time::Duration::seconds(s);
    assert_eq!(claim(&mut t, "a#1", later(15), at()), Ok(1), "a free claim is taken with the first fence");
    let refused = claim(&mut t, "b#2", later(20), later(5)).unwrap_err();
    assert!(refused.0.contains("replica a is submitting"), "{refused}");
    assert_eq!(claim(&mut t, "a#1", later(25), later(10)), Ok(1), "its holder renews it, same fence");
    assert!(check_claim(&t, "a#1", 1).is_ok());
    // A paused holder: its claim lapses, another takes it with a higher fence.
    assert_eq!(claim(&mut t, "b#2", later(45), later(30)), Ok(2));
    let lost = check_claim(&t, "a#1", 1).unwrap_err();
    assert!(lost.0.contains("replica b took over") && lost.0.contains("claim 2 after 1"), "{lost}");
    // The old holder's renewal and release change nothing.
    let before = t.clone();
    renew_claim(&mut t, "a#1", 1, later(99));
    release_claim(&mut t, "a#1", 1, later(31));
    assert_eq!(t, before);
    // Released, it lapses at once and keeps its fence: the next claim is 3.
    release_claim(&mut t, "b#2", 2, later(31));
    assert!(!t.claim.as_ref().unwrap().held(later(31)));
    assert_eq!(claim(&mut t, "a#1", later(50), later(32)), Ok(3));
    assert!(check_claim(&t, "b#2", 2).is_err());
}

/// A task of the graph in `toml` (its `[[phases]]`), every phase in `states`.
fn graph_task(toml_text: &str, states: &[(&str, PhaseState)]) -> Task {
    let spec: crate::model::ApplicationSpec = toml::from_str(&format!("name = 'w'\n{toml_text}")).unwrap();
    let mut t = crate::model::task::sample_task(at());
    t = Task::new(t.owner, t.application, t.cluster, t.inputs, &spec.graph().unwrap(), at());
    for (p, s) in states {
        let p = Phase::parse(p).unwrap();
        t.phase_mut(p).state = *s;
        if *s == PhaseState::Cancelled {
            t.phase_mut(p).reason = Some(NEVER_SATISFIED.into());
        }
    }
    t.refresh_state(at());
    t
}

const SOLVE: &str = r#"
    [[phases]]
    name = "prep"
    [[phases]]
    name = "solve"
    after = ["prep"]
    [[phases]]
    name = "rescue"
    after = [{ phase = "solve", when = "failed" }]
    [[phases]]
    name = "plot"
    after = ["solve"]
    [[phases]]
    name = "report"
    after = [{ phase = "plot", when = "ended" }, { phase = "rescue", when = "ended" }]
"#;

fn ph(name: &str) -> Phase {
    Phase::parse(name).unwrap()
}

fn state_of(t: &Task, p: &str) -> PhaseState {
    t.phase(ph(p)).state
}

#[test]
fn a_restart_without_from_reruns_what_did_not_succeed_and_what_waits_for_it() {
    use PhaseState::*;
    // solve failed: rescue ran, plot did not; report ran.
    let states =
        [("prep", Completed), ("solve", Failed), ("rescue", Completed), ("plot", Cancelled), ("report", Completed)];
    let mut t = graph_task(SOLVE, &states);
    assert_eq!(t.state, TaskState::Failed);
    let rerun = restart(&mut t, None, &BTreeSet::new(), None, "alice", at()).unwrap();
    assert_eq!(rerun, [ph("solve"), ph("rescue"), ph("plot"), ph("report")]);
    assert_eq!(state_of(&t, "prep"), Completed, "prep succeeded and keeps its run");
    assert_eq!(t.phase(ph("solve")).previous.len(), 1);
    assert!(t.events.last().unwrap().message.contains("task: failed → submitting"), "{:?}", t.events);
    assert!(
        t.events.iter().any(|e| e.message.contains("restart of what did not succeed (solve, rescue, plot, report)"))
    );
}

#[test]
fn a_handler_not_needed_is_not_rerun_and_a_task_that_succeeded_has_nothing_to_rerun() {
    use PhaseState::*;
    // solve succeeded, so rescue did not run; plot failed.
    let states =
        [("prep", Completed), ("solve", Completed), ("rescue", Cancelled), ("plot", Failed), ("report", Completed)];
    let mut t = graph_task(SOLVE, &states);
    assert_eq!(restart(&mut t, None, &BTreeSet::new(), None, "alice", at()).unwrap(), [ph("plot"), ph("report")]);
    let all_ok =
        [("prep", Completed), ("solve", Completed), ("rescue", Cancelled), ("plot", Completed), ("report", Completed)];
    let mut t = graph_task(SOLVE, &all_ok);
    assert_eq!(t.state, TaskState::Completed, "a handler not needed is no failure");
    let before = t.clone();
    let refused = restart(&mut t, None, &BTreeSet::new(), None, "alice", at()).unwrap_err();
    assert!(refused.0.contains("every phase of task") && refused.0.contains("name a phase"), "{refused}");
    assert_eq!(t, before);
}

#[test]
fn a_restart_from_a_phase_whose_predecessor_did_not_end_as_it_needs_is_refused_with_the_reason() {
    use PhaseState::*;
    let states =
        [("prep", Completed), ("solve", Failed), ("rescue", Completed), ("plot", Cancelled), ("report", Completed)];
    let mut t = graph_task(SOLVE, &states);
    let before = t.clone();
    let refused = restart(&mut t, Some(ph("plot")), &BTreeSet::new(), None, "alice", at()).unwrap_err();
    assert!(
        refused.0.contains("`plot` cannot be rerun alone: it waits for `solve` to have succeeded, and `solve` ended failed; restart from `solve`"),
        "{refused}"
    );
    assert_eq!(t, before);
    // From solve: solve and everything that waits for it, not prep.
    assert_eq!(
        restart(&mut t, Some(ph("solve")), &BTreeSet::new(), None, "alice", at()).unwrap(),
        [ph("solve"), ph("rescue"), ph("plot"), ph("report")]
    );
    // From report (it waits for ends only): report alone.
    let mut t = graph_task(SOLVE, &states);
    assert_eq!(restart(&mut t, Some(ph("report")), &BTreeSet::new(), None, "alice", at()).unwrap(), [ph("report")]);
}

#[test]
fn waits_on_phases_that_ended_are_settled_before_anything_is_submitted() {
    use PhaseState::*;
    // x runs if a succeeded and b did not. a failed, b succeeded: rerunning what did
    // not succeed reruns a and x, and x can no longer run whatever a does.
    let g = r#"
        [[phases]]
        name = "a"
        [[phases]]
        name = "b"
        [[phases]]
        name = "x"
        after = ["a", { phase = "b", when = "failed" }]
        [[phases]]
        name = "y"
        after = [{ phase = "x", when = "ended" }]
    "#;
    let mut t = graph_task(g, &[("a", Failed), ("b", Completed), ("x", Cancelled), ("y", Completed)]);
    assert_eq!(restart(&mut t, None, &BTreeSet::new(), None, "alice", at()).unwrap(), [ph("a"), ph("x"), ph("y")]);
    let todo = due_phases(&t);
    intent(&mut t, &todo, at()).unwrap();
    assert_eq!(state_of(&t, "a"), Submitting);
    assert_eq!(state_of(&t, "x"), Cancelled);
    assert!(t.phase(ph("x")).never_satisfied());
    assert_eq!(
        t.phase(ph("x")).explanation.as_deref(),
        Some("not run: it runs only if `b` does not succeed, and it succeeded")
    );
    // y waits for x to end, whatever the outcome: it runs, held on nothing.
    assert_eq!(state_of(&t, "y"), Submitting);
    assert_eq!(submission_waits(&t, &[ph("a"), ph("y")]), [(ph("a"), vec![]), (ph("y"), vec![])]);
    // On a fresh task, every wait is on a phase of the same plan, in run order.
    let mut t = graph_task(SOLVE, &[]);
    let all = t.phase_names();
    let waits = submission_waits(&t, &all);
    let order: Vec<&str> = waits.iter().map(|(p, _)| p.as_str()).collect();
    assert_eq!(order, ["prep", "solve", "rescue", "plot", "report"]);
    assert_eq!(waits[4].1, t.waits_of(ph("report")));
    let todo = due_phases(&t);
    intent(&mut t, &todo, at()).unwrap();
    assert!(t.phases.iter().all(|p| p.state == Submitting));
}

#[test]
fn a_failed_staging_fails_the_first_phase_whatever_it_is_called() {
    let mut t = graph_task(SOLVE, &[]);
    let todo = due_phases(&t);
    intent(&mut t, &todo, at()).unwrap();
    let report = SubmitReport { stage_failures: vec![("in.dat".into(), "cp: denied".into())], ..Default::default() };
    let all = t.phase_names();
    apply_submission(&mut t, &BTreeMap::new(), &all, &report, &SLURM, at(), at());
    assert_eq!(state_of(&t, "prep"), PhaseState::Failed);
    assert_eq!(t.phase(ph("prep")).scheduler_message.as_deref(), Some("cp: denied"));
    assert!(t.phases[1..].iter().all(|p| p.state == PhaseState::Cancelled));
    assert_eq!(t.state, TaskState::Failed);
}

const WORKFLOW: &str = r#"
    [[phases]]
    name = "preprocess"
    produces = ["data.csv"]
    [[phases]]
    name = "fit"
    needs = ["data.csv"]
    produces = ["fit.json"]
    [[phases]]
    name = "histogram"
    needs = ["data.csv"]
    produces = ["histogram.json"]
    [[phases]]
    name = "postprocess"
    needs = ["fit.json", "histogram.json"]
"#;

#[test]
fn a_phase_whose_outputs_are_up_to_date_is_kept_unless_what_it_reads_reruns() {
    use PhaseState::*;
    let all_done =
        [("preprocess", Completed), ("fit", Completed), ("histogram", Completed), ("postprocess", Completed)];
    let fresh = |names: &[&str]| names.iter().map(|n| ph(n)).collect::<BTreeSet<Phase>>();
    // data.csv was touched after the analyses: preprocess is up to date, the rest not.
    let mut t = graph_task(WORKFLOW, &all_done);
    let rerun = restart(&mut t, Some(ph("preprocess")), &fresh(&["preprocess"]), None, "alice", at()).unwrap();
    assert_eq!(rerun, [ph("fit"), ph("histogram"), ph("postprocess")]);
    assert_eq!((state_of(&t, "preprocess"), t.phase(ph("preprocess")).attempt), (Completed, 1));
    assert!(t.events.iter().any(|e| e.message == "preprocess: kept, its outputs are newer than its inputs (data.csv)"));
    // fit is up to date too, and what it reads is kept: kept as well.
    let mut t = graph_task(WORKFLOW, &all_done);
    let rerun = restart(&mut t, Some(ph("preprocess")), &fresh(&["preprocess", "fit"]), None, "alice", at()).unwrap();
    assert_eq!(rerun, [ph("histogram"), ph("postprocess")]);
    // A phase whose input reruns is rerun, however fresh its files look now.
    let mut t = graph_task(WORKFLOW, &all_done);
    let rerun = restart(&mut t, Some(ph("preprocess")), &fresh(&["fit"]), None, "alice", at()).unwrap();
    assert_eq!(rerun, [ph("preprocess"), ph("fit"), ph("histogram"), ph("postprocess")]);
    // Everything up to date, postprocess declares no outputs: postprocess alone.
    let mut t = graph_task(WORKFLOW, &all_done);
    let every = fresh(&["preprocess", "fit", "histogram", "postprocess"]);
    assert_eq!(restart(&mut t, Some(ph("preprocess")), &every, None, "alice", at()).unwrap(), [ph("postprocess")]);
    // Only phases with outputs, all up to date: nothing to rerun, said with the way out.
    let with_summary = format!("{WORKFLOW}produces = [\"summary.json\"]\n");
    let mut t = graph_task(&with_summary, &all_done);
    let before = t.clone();
    let refused = restart(&mut t, Some(ph("fit")), &every, None, "alice", at()).unwrap_err();
    assert!(refused.0.contains("nothing to rerun: the outputs of `fit`") && refused.0.contains("`force`"), "{refused}");
    assert_eq!(t, before);
    // A phase that failed is rerun even if its files are there (they may be half-written).
    let mut t = graph_task(
        WORKFLOW,
        &[("preprocess", Completed), ("fit", Failed), ("histogram", Completed), ("postprocess", Cancelled)],
    );
    assert_eq!(restart(&mut t, None, &every, None, "alice", at()).unwrap(), [ph("fit"), ph("postprocess")]);
}

const RENDER: &str = r#"
    [[phases]]
    name = "render"
    frames = "frames"
    [[phases]]
    name = "gather"
    frames = "frames"
    after = [{ phase = "render", per_frame = true }]
    [[phases]]
    name = "bundle"
    after = ["gather"]
"#;

/// The render shape over frames 1-10, render and gather each with the frames that
/// succeeded (`done`), bundle not run.
fn render_task(render_done: &[u32], gather_done: &[u32]) -> (Task, BTreeMap<Phase, FrameSet>) {
    use PhaseState::*;
    let mut t = graph_task(RENDER, &[("render", Failed), ("gather", Failed), ("bundle", Cancelled)]);
    for (p, done) in [("render", render_done), ("gather", gather_done)] {
        t.phase_mut(ph(p)).frames = Some(crate::model::task::FrameProgress {
            range: "1-10".into(),
            total: 10,
            per_job: 1,
            max_parallel: None,
            selection: None,
            completed: done.len() as u32,
            failed: 10 - done.len() as u32,
            failures: Vec::new(),
        });
    }
    let done =
        [(ph("render"), render_done.iter().copied().collect()), (ph("gather"), gather_done.iter().copied().collect())]
            .into_iter()
            .collect();
    (t, done)
}

fn selection(t: &Task, p: &str) -> Option<String> {
    t.phase(ph(p)).frames.as_ref().unwrap().selection.clone()
}

#[test]
fn a_restart_reruns_only_the_frames_that_failed_and_the_same_frames_of_what_waits_for_them_frame_by_frame() {
    // Frames 3 and 7 failed to render, so gather did not run them; bundle did not run.
    let ok: Vec<u32> = (1..=10).filter(|f| *f != 3 && *f != 7).collect();
    let (mut t, done) = render_task(&ok, &ok);
    let ask = RestartAsk { done: done.clone(), ..RestartAsk::default() };
    let rerun = restart_with(&mut t, &ask, "alice", at()).unwrap();
    assert_eq!(rerun, [ph("render"), ph("gather"), ph("bundle")]);
    assert_eq!((selection(&t, "render").as_deref(), selection(&t, "gather").as_deref()), (Some("3,7"), Some("3,7")));
    let f = t.phase(ph("render")).frames.clone().unwrap();
    assert_eq!((f.completed, f.failed, f.elements()), (8, 0, 2), "the eight kept frames count as done");
    assert!(t.events.iter().any(|e| e.message.contains("(render frames 3,7, gather frames 3,7, bundle)")));
    // The arrays run the same frames: element i still waits for element i.
    let waits = submission_waits(&t, &rerun);
    assert!(waits[1].1[0].per_frame, "{waits:?}");

    // gather also failed frame 9 by itself: it reruns 3, 7 and 9, so its elements no
    // longer match render's, and it waits for the whole of render instead.
    let gather_ok: Vec<u32> = ok.iter().copied().filter(|f| *f != 9).collect();
    let (mut t, done) = render_task(&ok, &gather_ok);
    let ask = RestartAsk { done, ..RestartAsk::default() };
    let rerun = restart_with(&mut t, &ask, "alice", at()).unwrap();
    assert_eq!(selection(&t, "gather").as_deref(), Some("3,7,9"));
    let waits = submission_waits(&t, &rerun);
    assert_eq!(waits[1].1, [Wait::on(ph("render"), Condition::Ended)], "{waits:?}");
}

#[test]
fn a_restart_of_chosen_frames_takes_the_failed_ones_along_and_refuses_frames_the_phase_does_not_have() {
    let ok: Vec<u32> = (1..=10).filter(|f| *f != 3).collect();
    let all: Vec<u32> = (1..=10).collect();
    let (t, done) = render_task(&ok, &ok);
    let mut t1 = t.clone();
    let ask = RestartAsk {
        from: Some(ph("render")),
        frames: Some([5, 6].into()),
        done: done.clone(),
        ..RestartAsk::default()
    };
    restart_with(&mut t1, &ask, "alice", at()).unwrap();
    assert_eq!(selection(&t1, "render").as_deref(), Some("3,5-6"));
    assert_eq!(selection(&t1, "gather").as_deref(), Some("3,5-6"), "gather follows render frame by frame");
    // From render without frames: all of them, and all of gather's.
    let mut t2 = t.clone();
    let ask = RestartAsk { from: Some(ph("render")), done: done.clone(), ..RestartAsk::default() };
    restart_with(&mut t2, &ask, "alice", at()).unwrap();
    assert_eq!((selection(&t2, "render"), selection(&t2, "gather")), (None, None));
    // A frame render does not have.
    let mut t3 = t.clone();
    let ask = RestartAsk { from: Some(ph("render")), frames: Some([11].into()), done, ..RestartAsk::default() };
    let refused = restart_with(&mut t3, &ask, "alice", at()).unwrap_err();
    assert!(refused.0.contains("frame 11 is not one of the frames of `render` (1-10)"), "{refused}");
    assert_eq!(t3, t, "a refused restart changes nothing");
    // Asking for every frame is a whole rerun.
    let (mut t4, done) = render_task(&all, &ok);
    let ask =
        RestartAsk { from: Some(ph("render")), frames: Some(all.into_iter().collect()), done, ..RestartAsk::default() };
    restart_with(&mut t4, &ask, "alice", at()).unwrap();
    assert_eq!(selection(&t4, "render"), None);
}

#[test]
fn a_frame_by_frame_wait_on_a_phase_that_partly_failed_still_lets_the_waiting_phase_run() {
    use PhaseState::*;
    let ok: Vec<u32> = (1..=10).filter(|f| *f != 3).collect();
    let (mut t, _) = render_task(&ok, &[]);
    t.phase_mut(ph("gather")).state = Waiting;
    t.phase_mut(ph("bundle")).state = Waiting;
    skip_unmet(&mut t, at());
    assert_eq!(state_of(&t, "gather"), Waiting, "nine frames of render succeeded: gather runs those");
    // Had no frame of render succeeded, gather could not run at all.
    t.phase_mut(ph("render")).frames.as_mut().unwrap().completed = 0;
    skip_unmet(&mut t, at());
    assert_eq!(state_of(&t, "gather"), Cancelled);
    assert_eq!(state_of(&t, "bundle"), Cancelled);
}

fn licence_need(phase: &str) -> crate::model::queue::Need {
    crate::model::queue::Need { pool: "licence/maya".into(), amount: 1, phase: Some(ph(phase)), count: None }
}

#[test]
fn a_queued_task_has_nothing_due_until_it_leaves_the_queue_and_a_cancel_takes_it_out() {
    let mut t = task();
    t.needs = vec![licence_need("execute")];
    assert!(t.join_queue(at()));
    t.refresh_state(at());
    assert_eq!(t.state, TaskState::Queued);
    assert!(due_phases(&t).is_empty(), "nothing is submitted while queued");
    assert!(!submission_due(&t, at()));
    t.queue = None;
    t.refresh_state(at());
    assert_eq!((t.state, due_phases(&t).len()), (TaskState::Submitting, 3));
    let mut q = task();
    q.needs = vec![licence_need("execute")];
    q.join_queue(at());
    q.refresh_state(at());
    request_cancel(&mut q, "alice", at()).unwrap();
    assert_eq!((q.state, q.queue.is_none()), (TaskState::Cancelled, true));
    assert!(q.events.iter().any(|e| e.message == "left the queue"));
}

#[test]
fn a_restart_of_phases_that_need_licences_queues_the_task_again_and_one_that_needs_none_does_not() {
    use PhaseState::*;
    let states =
        [("prep", Completed), ("solve", Failed), ("rescue", Completed), ("plot", Cancelled), ("report", Completed)];
    let mut t = graph_task(SOLVE, &states);
    t.needs = vec![licence_need("solve")];
    restart(&mut t, None, &BTreeSet::new(), None, "alice", at()).unwrap();
    assert_eq!(t.state, TaskState::Queued, "{:?}", t.events);
    assert_eq!(t.due_needs(), vec![licence_need("solve")]);
    // Only `plot` reruns, and it needs nothing: straight on to submission.
    let states =
        [("prep", Completed), ("solve", Completed), ("rescue", Cancelled), ("plot", Failed), ("report", Completed)];
    let mut t = graph_task(SOLVE, &states);
    t.needs = vec![licence_need("solve")];
    restart(&mut t, None, &BTreeSet::new(), None, "alice", at()).unwrap();
    assert_eq!((t.state, t.queue.is_none()), (TaskState::Submitting, true));
}

//! Pure state transitions of a task's submission: what an attempt's intent, its
//! outcome, a block, a failure, a cancel or a restart change. No I/O and no clock: the
//! caller passes `at` (and any retry time) and persists what the function changed.
//!
//! A transition decided on a copy of the task that no longer holds is refused, not
//! re-applied: each function checks the state it starts from on the copy it is given
//! (the mediator hands it a fresh copy again after a lost compare-and-swap), and says
//! [`Refused`] when that state is gone.

use std::collections::{BTreeMap, BTreeSet};

use time::OffsetDateTime;

use crate::model::frames::FrameRange;
use crate::model::task::NEVER_SATISFIED;
use crate::model::task::SubmitClaim;
use crate::model::workflow::{Condition, Wait};
use crate::model::{Phase, PhaseState, Task};
use crate::scheduler::failures::{FailureKind, classify, explain};
use crate::scheduler::{Scheduler, SubmitOutcome, SubmitReport};

/// A transition whose starting state is gone; says what changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused(pub String);

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// What a phase that needs submitting is waiting in.
pub fn needs_submission(state: PhaseState) -> bool {
    matches!(state, PhaseState::Waiting | PhaseState::Submitting | PhaseState::Blocked)
}

/// The phases of `t` that need submitting, with the state each was seen in: what an
/// attempt decides on, and what [`intent`] checks again.
pub fn due_phases(t: &Task) -> Vec<(Phase, PhaseState)> {
    t.phases.iter().filter(|p| needs_submission(p.state)).map(|p| (p.phase, p.state)).collect()
}

/// Claims the submission of `t` for `holder` until `until`, returning the claim's
/// fence: a claim held by another server is refused; one `holder` holds already is
/// renewed (same fence); a free or lapsed one is taken with the next fence.
pub fn claim(t: &mut Task, holder: &str, until: OffsetDateTime, at: OffsetDateTime) -> Result<u64, Refused> {
    match &mut t.claim {
        Some(c) if c.held(at) && c.holder != holder => Err(Refused(format!(
            "replica {} is submitting task {} (its claim holds until {})",
            super::replicas::replica_of(&c.holder),
            t.id,
            c.expires_at
        ))),
        Some(c) if c.holder == holder && c.held(at) => {
            c.expires_at = until;
            Ok(c.fence)
        }
        other => {
            let fence = other.as_ref().map_or(0, |c| c.fence) + 1;
            *other = Some(SubmitClaim { holder: holder.to_owned(), fence, expires_at: until });
            Ok(fence)
        }
    }
}

/// Whether `holder` still holds `t`'s claim with `fence` (nobody claimed it since);
/// every write a submission attempt makes checks this first.
pub fn check_claim(t: &Task, holder: &str, fence: u64) -> Result<(), Refused> {
    match &t.claim {
        Some(c) if c.holder == holder && c.fence == fence => Ok(()),
        Some(c) => Err(Refused(format!(
            "replica {} took over the submission of task {} (claim {} after {fence})",
            super::replicas::replica_of(&c.holder),
            t.id,
            c.fence
        ))),
        None => Err(Refused(format!("task {} has no submission claim", t.id))),
    }
}

/// Renews `holder`'s claim with `fence` until `until` (after [`check_claim`]).
pub fn renew_claim(t: &mut Task, holder: &str, fence: u64, until: OffsetDateTime) {
    if let Some(c) = t.claim.as_mut().filter(|c| c.holder == holder && c.fence == fence) {
        c.expires_at = until;
    }
}

/// Releases `holder`'s claim with `fence`: it lapses now, keeping its fence.
pub fn release_claim(t: &mut Task, holder: &str, fence: u64, at: OffsetDateTime) {
    if let Some(c) = t.claim.as_mut().filter(|c| c.holder == holder && c.fence == fence && c.expires_at > at) {
        c.expires_at = at;
    }
}

/// Records the intent of an attempt to submit `todo` (phases with the state the
/// decision saw): they go to `submitting` before anything reaches the scheduler.
/// Refused if a cancel was asked for, or any of them moved meanwhile.
pub fn intent(t: &mut Task, todo: &[(Phase, PhaseState)], at: OffsetDateTime) -> Result<(), Refused> {
    if t.cancel_requested {
        return Err(Refused(format!("task {} was cancelled before its jobs were submitted", t.id)));
    }
    if t.state.is_final() {
        return Err(Refused(format!("task {} has ended ({})", t.id, t.state.as_str())));
    }
    for (p, seen) in todo {
        let now = t.phase(*p).state;
        if now != *seen {
            return Err(Refused(format!("the {p} phase moved from {} to {} meanwhile", seen.as_str(), now.as_str())));
        }
    }
    t.submit_tries += 1;
    t.retry_at = None;
    skip_unmet(t, at);
    for (p, _) in todo {
        if !needs_submission(t.phase(*p).state) {
            continue; // it will not run: what it waits for ended otherwise
        }
        t.phase_mut(*p).reason = None;
        t.set_phase_state(at, *p, PhaseState::Submitting, None);
    }
    Ok(())
}

/// Phases waiting to be submitted that wait for a phase which has already ended, and
/// not as they need (after a restart, say, `report` waits for `solve` to have failed,
/// and `solve` had succeeded): they will never run, so they are not submitted but
/// end as the scheduler would have ended them (`cancelled`, dependency never
/// satisfied), and so on down the graph, the same way on every scheduler.
pub fn skip_unmet(t: &mut Task, at: OffsetDateTime) {
    for phase in t.graph().run_order() {
        if !matches!(t.phase(phase).state, PhaseState::Waiting | PhaseState::Blocked) {
            continue;
        }
        let unmet = t.waits_of(phase).into_iter().find(|w| t.phase(w.phase).state.is_final() && !t.wait_met(*w));
        if let Some(w) = unmet {
            let state = t.phase(w.phase).state;
            let rec = t.phase_mut(phase);
            rec.reason = Some(NEVER_SATISFIED.to_owned());
            rec.explanation = Some(not_run_because(w, state));
            let detail = format!("`{}` {}", w.phase, state.as_str());
            t.set_phase_state(at, phase, PhaseState::Cancelled, Some(&detail));
        }
    }
}

/// One way to restart an ended task, as the API lists them: what it would rerun, or
/// why it is refused. (A phase found up to date on the cluster may still be kept.)
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct RestartChoice {
    /// The phase to restart from; absent: what did not succeed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<Phase>,
    /// The phases it would rerun, in the task's order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub reruns: Vec<Phase>,
    /// Why it is refused, if it is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refused: Option<String>,
}

/// The restart choices of `t`: without `from`, then from each phase; none while the
/// task is live.
pub fn restart_choices(t: &Task) -> Vec<RestartChoice> {
    if t.is_live() {
        return Vec::new();
    }
    // Tried on copies without the event history, which a restart only appends to.
    let mut base = t.clone();
    base.events.clear();
    std::iter::once(None)
        .chain(t.phase_names().into_iter().map(Some))
        .map(|from| match restart(&mut base.clone(), from, &BTreeSet::new(), None, "", OffsetDateTime::UNIX_EPOCH) {
            Ok(reruns) => RestartChoice { from, reruns, refused: None },
            Err(Refused(why)) => RestartChoice { from, reruns: Vec::new(), refused: Some(why) },
        })
        .collect()
}

/// Scripts forged again for a restart, from the current definitions, and stored as a
/// new version of the task's scripts.
#[derive(Debug, Clone)]
pub struct Reforged {
    /// The task's scripts version they were forged on top of.
    pub based_on: u32,
    /// Their version.
    pub version: u32,
    /// The application they were forged from.
    pub application: crate::model::DefinitionRef<crate::model::AppName>,
    /// The cluster they were forged for.
    pub cluster: crate::model::DefinitionRef<crate::model::ClusterName>,
    /// Each phase's script's sha256.
    pub sha256: BTreeMap<Phase, String>,
}

/// Why a phase did not run, in words, from the wait that was not met.
pub fn not_run_because(w: Wait, state: PhaseState) -> String {
    match w.when {
        Condition::Succeeded => format!("not run: it waits for `{}` to succeed, which {}", w.phase, ended_as(state)),
        Condition::Failed => format!("not run: it runs only if `{}` does not succeed, and it succeeded", w.phase),
        Condition::Ended => format!("not run: `{}` {}", w.phase, ended_as(state)),
    }
}

fn ended_as(state: PhaseState) -> String {
    match state {
        PhaseState::Cancelled => "did not run".to_owned(),
        s => format!("ended {}", s.as_str()),
    }
}

/// The phases of `remaining` in an order where each comes after those it waits for,
/// each with the waits the scheduler must hold it on: phases of the same plan, and
/// jobs still alive. A wait on a phase that has ended is not passed on: met, there is
/// nothing to wait for; unmet, [`skip_unmet`] has already settled the phase.
///
/// A frame-by-frame wait stays one (element `i` after element `i`) when both arrays
/// run the same frames; after a restart that reruns other frames of one than of the
/// other, the elements no longer match, and the wait becomes one for the whole array
/// to end; each frame still checks its own predecessor (the forged frame loop).
pub fn submission_waits(t: &Task, remaining: &[Phase]) -> Vec<(Phase, Vec<Wait>)> {
    let running = |p: Phase| t.phase(p).frames.as_ref().map(|f| f.running().to_owned());
    t.graph()
        .run_order()
        .into_iter()
        .filter(|p| remaining.contains(p))
        .map(|p| {
            let waits = t
                .waits_of(p)
                .into_iter()
                .filter(|w| remaining.contains(&w.phase) || !t.phase(w.phase).state.is_final())
                .map(|w| {
                    if w.per_frame && running(w.phase) != running(p) {
                        Wait::on(w.phase, Condition::Ended)
                    } else {
                        w
                    }
                });
            (p, waits.collect())
        })
        .collect()
}

/// Checked again just before the scheduler is asked: are `phases` still
/// `submitting`, with no cancel? A cancel that arrived after the intent stops the
/// attempt here: nothing was handed to the scheduler, so those phases are cancelled,
/// and `Ok(false)` says not to go on. Refused if a phase moved otherwise.
pub fn still_submitting(t: &mut Task, phases: &[Phase], at: OffsetDateTime) -> Result<bool, Refused> {
    if let Some(p) = phases.iter().find(|p| t.phase(**p).state != PhaseState::Submitting) {
        return Err(Refused(format!("the {p} phase is {} now, not submitting", t.phase(*p).state.as_str())));
    }
    if !t.cancel_requested {
        return Ok(true);
    }
    for p in phases {
        t.phase_mut(*p).explanation = Some("cancelled before it was submitted".into());
        t.set_phase_state(at, *p, PhaseState::Cancelled, None);
    }
    t.retry_at = None;
    t.refresh_state(at);
    Ok(false)
}

/// A cancelled task whose phases an unfinished attempt left `submitting`, once their
/// jobs were looked up by tag: each job `found` is recorded (the monitor stops it),
/// every other such phase is cancelled.
pub fn settle_cancelled(t: &mut Task, found: &BTreeMap<Phase, String>, at: OffsetDateTime) {
    for phase in t.phase_names() {
        if t.phase(phase).state != PhaseState::Submitting {
            continue;
        }
        match found.get(&phase) {
            Some(job) => {
                let rec = t.phase_mut(phase);
                rec.job_id = Some(job.clone());
                rec.submitted_at.get_or_insert(at);
                t.set_phase_state(at, phase, PhaseState::Pending, Some(&format!("job {job}, found again by its tag")));
            }
            None => {
                t.phase_mut(phase).explanation = Some("cancelled before it was submitted".into());
                t.set_phase_state(at, phase, PhaseState::Cancelled, None);
            }
        }
    }
    t.retry_at = None;
    t.refresh_state(at);
}

/// Whether `t` needs a submission attempt at `at`: phases due and the retry time
/// reached, or, after a cancel, phases an unfinished attempt left `submitting` (their
/// jobs are looked up, to be stopped).
pub fn submission_due(t: &Task, at: OffsetDateTime) -> bool {
    if t.cancel_requested {
        return t.phases.iter().any(|p| p.state == PhaseState::Submitting);
    }
    t.retry_at.is_none_or(|r| r <= at) && t.phases.iter().any(|p| needs_submission(p.state))
}

/// Records what one submission round trip did: jobs `found` again by their tag, and
/// the `report` for the phases that were submitted now (`remaining`). Phases that
/// left `submitting` meanwhile (a cancel) keep their state; a job the scheduler
/// accepted for one is still recorded, so that it can be stopped. `retry` is when a
/// phase still `blocked` or `submitting` is tried again.
pub fn apply_submission(
    t: &mut Task,
    found: &BTreeMap<Phase, String>,
    remaining: &[Phase],
    report: &SubmitReport,
    sched: &dyn Scheduler,
    at: OffsetDateTime,
    retry: OffsetDateTime,
) {
    for (p, job) in found {
        let rec = t.phase_mut(*p);
        rec.job_id = Some(job.clone());
        rec.submitted_at.get_or_insert(at);
        t.set_phase_state(at, *p, PhaseState::Pending, Some(&format!("job {job}, found again by its tag")));
    }
    let mut stop: Option<(FailureKind, String)> = None;
    // Inputs are staged before the first phase submitted (which waits for nothing).
    let first = remaining.first().copied();
    if let Some((name, message)) = report.stage_failures.first()
        && let Some(first) = first
    {
        let rec = t.phase_mut(first);
        rec.explanation = Some(format!("the input file `{name}` could not be copied into the run directory"));
        rec.scheduler_message = Some(message.clone());
        stop = Some((FailureKind::Permanent, format!("input `{name}` could not be staged")));
    }
    for p in remaining {
        if let Some((kind, why)) = &stop {
            if !needs_submission(t.phase(*p).state) {
                continue;
            }
            match kind {
                FailureKind::Permanent => {
                    let rec = t.phase_mut(*p);
                    rec.explanation.get_or_insert_with(|| format!("not submitted: {why}"));
                    let to = if Some(*p) == first && !report.stage_failures.is_empty() {
                        PhaseState::Failed
                    } else {
                        PhaseState::Cancelled
                    };
                    t.set_phase_state(at, *p, to, None);
                }
                FailureKind::Transient => {
                    t.phase_mut(*p).reason = Some(why.clone());
                    t.set_phase_state(at, *p, PhaseState::Blocked, Some(why));
                }
            }
            continue;
        }
        match report.outcomes.get(p).cloned().unwrap_or(SubmitOutcome::NotTried) {
            SubmitOutcome::Submitted(job) => {
                let rec = t.phase_mut(*p);
                rec.job_id = Some(job.clone());
                rec.submitted_at = Some(at);
                // The job exists whatever happened to the phase meanwhile: it is
                // followed (and, after a cancel, stopped) like any other.
                t.set_phase_state(at, *p, PhaseState::Pending, Some(&format!("job {job}")));
            }
            SubmitOutcome::Refused { message, .. } => {
                let kind = classify(sched, &message);
                let rec = t.phase_mut(*p);
                rec.scheduler_message = Some(message.clone());
                match kind {
                    FailureKind::Permanent => {
                        rec.explanation = Some(explain(sched, &message));
                        t.set_phase_state(at, *p, PhaseState::Failed, Some("refused by the scheduler"));
                        stop = Some((kind, format!("the {p} job was refused")));
                    }
                    FailureKind::Transient => {
                        rec.reason = Some(format!(
                            "the scheduler is busy or unreachable: {}",
                            message.lines().last().unwrap_or("")
                        ));
                        t.set_phase_state(at, *p, PhaseState::Blocked, Some("transient scheduler failure"));
                        stop = Some((kind, "waiting for the scheduler".into()));
                    }
                }
            }
            SubmitOutcome::NotTried => {
                // Nothing said about it: whether it was submitted is unknown, so it
                // stays `submitting` and is looked up by tag next time.
            }
        }
    }
    if t.phases.iter().any(|p| matches!(p.state, PhaseState::Blocked | PhaseState::Submitting)) {
        t.retry_at = Some(retry);
    }
    t.refresh_state(at);
}

/// Marks those of `phases` that still wait for submission `blocked` with `why`, to be
/// tried again at `until`.
pub fn block(t: &mut Task, phases: &[Phase], why: &str, until: OffsetDateTime, at: OffsetDateTime) {
    for p in phases {
        if !needs_submission(t.phase(*p).state) {
            continue;
        }
        t.phase_mut(*p).reason = Some(why.to_owned());
        t.set_phase_state(at, *p, PhaseState::Blocked, Some(why));
    }
    t.retry_at = Some(until);
}

/// Leaves the phases as they are (`submitting`) and says why; tried again at `until`.
pub fn retry_later(t: &mut Task, why: &str, until: OffsetDateTime, at: OffsetDateTime) {
    t.record(at, None, why);
    t.retry_at = Some(until);
}

/// Fails those of `phases` that still wait for submission, for good: the first
/// `failed` with the explanation (and the scheduler's words), the rest `cancelled`.
pub fn fail(t: &mut Task, phases: &[Phase], explanation: &str, message: Option<&str>, at: OffsetDateTime) {
    for (i, p) in phases.iter().enumerate() {
        if !needs_submission(t.phase(*p).state) {
            continue;
        }
        let rec = t.phase_mut(*p);
        rec.explanation = Some(explanation.to_owned());
        rec.scheduler_message = message.map(str::to_owned);
        let to = if i == 0 { PhaseState::Failed } else { PhaseState::Cancelled };
        t.set_phase_state(at, *p, to, None);
    }
    t.retry_at = None;
    t.refresh_state(at);
}

/// A cancel asked for by `who`: phases that were never handed to the scheduler
/// (`waiting`, `blocked`) are cancelled at once. A `submitting` phase is left as it
/// is: its job may be on its way, and the attempt under way (or the next one, which
/// looks for it by tag first) records it so that it is stopped. Refused once the task
/// has ended; a second cancel changes nothing.
pub fn request_cancel(t: &mut Task, who: &str, at: OffsetDateTime) -> Result<(), Refused> {
    if !t.is_live() {
        return Err(Refused(format!("task {} has already ended ({})", t.id, t.state.as_str())));
    }
    if t.cancel_requested {
        return Ok(());
    }
    t.cancel_requested = true;
    t.record(at, None, format!("cancel requested by {who}"));
    for phase in t.phase_names() {
        if matches!(t.phase(phase).state, PhaseState::Waiting | PhaseState::Blocked) {
            t.phase_mut(phase).explanation = Some("cancelled before it was submitted".into());
            t.set_phase_state(at, phase, PhaseState::Cancelled, None);
        }
    }
    t.retry_at = None;
    t.refresh_state(at);
    Ok(())
}

/// A restart asked for by `who`. From a phase (`from`): that phase and every phase
/// that waits for it (directly or through others) keep their runs in `previous` and
/// wait to be submitted again; refused when a phase `from` waits for (and which does
/// not rerun) did not end as `from` needs. Without `from`: every phase that did not
/// succeed (a phase that did not run only because what it waited for did not happen
/// is not counted; it reruns if what it waits for does), and every phase that waits
/// for one of them; refused when every phase succeeded. Refused while the task is
/// live. Returns the phases that rerun, in the task's order.
///
/// With `reforged`, the phases that rerun run the scripts forged again as version
/// `reforged.version` (from newer definitions); the others keep the version they ran.
/// Refused if the task's scripts moved on meanwhile (another restart forged again).
///
/// A phase in `fresh` (its declared outputs all exist and are newer than its inputs,
/// as the cluster said) is kept, not rerun, if it succeeded and none of the phases it
/// waits for reruns; refused if that leaves nothing to rerun.
pub fn restart(
    t: &mut Task,
    from: Option<Phase>,
    fresh: &BTreeSet<Phase>,
    reforged: Option<&Reforged>,
    who: &str,
    at: OffsetDateTime,
) -> Result<Vec<Phase>, Refused> {
    let ask = RestartAsk { from, fresh: fresh.clone(), reforged: reforged.cloned(), ..RestartAsk::default() };
    restart_with(t, &ask, who, at)
}

/// The frames of a phase that runs per frame, by number.
pub type FrameSet = BTreeSet<u32>;

/// The most bytes the frames one phase reruns may take written as a range: scattered
/// frames make long ranges, and the range is kept on the task.
pub const MAX_SELECTION_TEXT: usize = 32 * 1024;

/// What a restart is asked to do, and what it knows.
#[derive(Debug, Clone, Default)]
pub struct RestartAsk {
    /// The phase to restart from (see [`restart`]).
    pub from: Option<Phase>,
    /// With `from` (a phase that runs per frame): rerun these of its frames (with
    /// any others that did not succeed), and the same frames of the phases that wait
    /// for it frame by frame.
    pub frames: Option<FrameSet>,
    /// For phases that run per frame, the frames that succeeded (their records on
    /// the cluster). A phase missing here reruns all its frames.
    pub done: BTreeMap<Phase, FrameSet>,
    /// Phases found up to date (see [`restart`]).
    pub fresh: BTreeSet<Phase>,
    /// Scripts forged again (see [`restart`]).
    pub reforged: Option<Reforged>,
}

/// [`restart`], with frames: a phase that runs per frame reruns only the frames that
/// must. Rerun because it did not succeed: its frames that did not. From it, with
/// `frames`: those, and its others that did not succeed (a phase succeeds only when
/// every frame did). Downstream, waiting for rerun phases frame by frame only: the
/// frames they rerun, and its own that did not succeed. Otherwise all of them.
pub fn restart_with(t: &mut Task, ask: &RestartAsk, who: &str, at: OffsetDateTime) -> Result<Vec<Phase>, Refused> {
    let (from, fresh, reforged) = (ask.from, &ask.fresh, ask.reforged.as_ref());
    if let Some(r) = reforged
        && t.scripts_version != r.based_on
    {
        return Err(Refused(format!(
            "task {} was forged again meanwhile (scripts version {}, not {}); try again",
            t.id, t.scripts_version, r.based_on
        )));
    }
    if t.is_live() {
        return Err(Refused(format!(
            "task {} is still {}; wait for it to end or cancel it before restarting",
            t.id,
            t.state.as_str()
        )));
    }
    let graph = t.graph();
    let seeds: Vec<Phase> = match from {
        Some(from) => {
            if !t.has_phase(from) {
                return Err(Refused(t.no_such_phase(from)));
            }
            if let Some(w) = t.waits_of(from).into_iter().find(|w| !t.wait_met(*w)) {
                let state = t.phase(w.phase).state;
                return Err(Refused(format!(
                    "`{from}` cannot be rerun alone: it waits for `{}` to have {}, and `{}` {}; restart from `{}` \
                     instead, or without `from` to rerun what did not succeed",
                    w.phase,
                    w.when.as_str(),
                    w.phase,
                    ended_as(state),
                    w.phase
                )));
            }
            vec![from]
        }
        None => {
            let failed: Vec<Phase> = t
                .phases
                .iter()
                .filter(|p| p.state != PhaseState::Completed && !p.never_satisfied())
                .map(|p| p.phase)
                .collect();
            if failed.is_empty() {
                return Err(Refused(format!(
                    "every phase of task {} succeeded, so nothing needs to run again; name a phase (`from`) to rerun it \
                     and what follows it",
                    t.id
                )));
            }
            failed
        }
    };
    let mut rerun: Vec<Phase> = seeds.clone();
    for s in &seeds {
        rerun.extend(graph.downstream(*s));
    }
    let rerun: Vec<Phase> = t.phase_names().into_iter().filter(|p| rerun.contains(p)).collect();
    // Up to date, and nothing it reads will be written again: kept.
    let mut kept: Vec<Phase> = Vec::new();
    for p in graph.run_order().into_iter().filter(|p| rerun.contains(p)) {
        let rec = t.phase(p);
        let inputs_stay = t.waits_of(p).iter().all(|w| !rerun.contains(&w.phase) || kept.contains(&w.phase));
        if fresh.contains(&p) && rec.state == PhaseState::Completed && !rec.files.produces.is_empty() && inputs_stay {
            kept.push(p);
        }
    }
    let rerun: Vec<Phase> = rerun.into_iter().filter(|p| !kept.contains(p)).collect();
    let selections = frame_selections(t, ask, &seeds, &rerun)?;
    if rerun.is_empty() {
        let listed: Vec<String> = kept.iter().map(|p| format!("`{p}`")).collect();
        return Err(Refused(format!(
            "nothing to rerun: the outputs of {} all exist and are newer than their inputs; restart with `force` \
             to rerun them anyway",
            listed.join(", ")
        )));
    }
    for p in &kept {
        t.record(
            at,
            Some(*p),
            format!("{p}: kept, its outputs are newer than its inputs ({})", t.phase(*p).files.produces.join(", ")),
        );
    }
    t.cancel_requested = false;
    t.submit_tries = 0;
    t.retry_at = None;
    for phase in &rerun {
        let rec = t.phase_mut(*phase);
        rec.reset_for_restart();
        if let (Some(f), Some(sel)) = (rec.frames.as_mut(), selections.get(phase)) {
            // The others succeeded before and are kept.
            f.completed = f.total.saturating_sub(sel.count() as u32);
            f.selection = Some(sel.to_string());
        }
    }
    if let Some(r) = reforged {
        let before = t.scripts_version;
        for phase in t.phase_names() {
            let rec = t.phase_mut(phase);
            if rerun.contains(&phase) {
                rec.script_version = None;
                rec.script_sha256 = r.sha256.get(&phase).cloned();
            } else {
                rec.script_version.get_or_insert(before);
            }
        }
        t.record(
            at,
            None,
            format!(
                "forged again for the restart: application {} v{} → v{}, cluster {} v{} → v{} (scripts version {})",
                t.application.name,
                t.application.version,
                r.application.version,
                t.cluster.name,
                t.cluster.version,
                r.cluster.version,
                r.version
            ),
        );
        t.application = r.application.clone();
        t.cluster = r.cluster.clone();
        t.scripts_version = r.version;
    }
    let listed: Vec<String> = rerun
        .iter()
        .map(|p| match selections.get(p) {
            Some(sel) => format!("{p} frames {sel}"),
            None => p.to_string(),
        })
        .collect();
    let what = match from {
        Some(from) => format!("restart from {from} ({})", listed.join(", ")),
        None => format!("restart of what did not succeed ({})", listed.join(", ")),
    };
    t.record(at, None, format!("{what} requested by {who}"));
    t.restart_state(at);
    Ok(rerun)
}

/// The frames each phase of `rerun` that runs per frame reruns, when not all (see
/// [`restart_with`]); `seeds` are the phases the restart starts from.
fn frame_selections(
    t: &Task,
    ask: &RestartAsk,
    seeds: &[Phase],
    rerun: &[Phase],
) -> Result<BTreeMap<Phase, FrameRange>, Refused> {
    // None: all frames.
    let mut chosen: BTreeMap<Phase, Option<FrameSet>> = BTreeMap::new();
    for p in t.graph().run_order().into_iter().filter(|p| rerun.contains(p)) {
        let Some(f) = t.phase(p).frames.as_ref() else { continue };
        let Ok(range) = FrameRange::parse(&f.range, crate::model::frames::MAX_FRAMES) else {
            chosen.insert(p, None);
            continue;
        };
        // Its own frames that did not succeed, if what succeeded is known.
        let unfinished = || ask.done.get(&p).map(|done| range.frames().filter(|n| !done.contains(n)).collect::<FrameSet>());
        let choice = if ask.from == Some(p) {
            match &ask.frames {
                Some(asked) => {
                    if let Some(n) = asked.iter().find(|n| !range.contains(**n)) {
                        return Err(Refused(format!("frame {n} is not one of the frames of `{p}` ({})", f.range)));
                    }
                    unfinished().map(|u| u.union(asked).copied().collect())
                }
                None => None,
            }
        } else {
            let upstream: Vec<Wait> = t.waits_of(p).into_iter().filter(|w| rerun.contains(&w.phase)).collect();
            let mut sel: Option<FrameSet> = if seeds.contains(&p) { unfinished() } else { Some(FrameSet::new()) };
            if upstream.iter().any(|w| !w.per_frame) {
                sel = None;
            }
            for w in upstream.iter().filter(|w| w.per_frame) {
                sel = match (sel, chosen.get(&w.phase)) {
                    (Some(mine), Some(Some(theirs))) => Some(mine.union(theirs).copied().collect()),
                    _ => None,
                };
            }
            // Not a seed and nothing upstream chose frames: all (it reruns because
            // a phase it waits for as a whole does).
            sel.filter(|s| !s.is_empty())
        };
        chosen.insert(p, choice);
    }
    let mut out = BTreeMap::new();
    for (p, sel) in chosen {
        let Some(sel) = sel else { continue };
        let total = t.phase(p).frames.as_ref().map_or(0, |f| f.total);
        if sel.is_empty() || sel.len() as u32 >= total {
            continue; // all of them
        }
        let frames: Vec<u32> = sel.into_iter().collect();
        let Some(range) = FrameRange::from_frames(&frames) else { continue };
        if range.to_string().len() > MAX_SELECTION_TEXT {
            return Err(Refused(format!(
                "the {} frames of `{p}` to rerun are too scattered to name in one restart ({} bytes written as a \
                 range; at most {MAX_SELECTION_TEXT}); restart from `{p}` to rerun all its frames",
                frames.len(),
                range.to_string().len()
            )));
        }
        out.insert(p, range);
    }
    Ok(out)
}

#[cfg(test)]
mod tests;

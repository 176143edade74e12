//! Pure state transitions of a task's submission: what an attempt's intent, its
//! outcome, a block, a failure, a cancel or a restart change. No I/O and no clock: the
//! caller passes `at` (and any retry time) and persists what the function changed.
//!
//! A transition decided on a copy of the task that no longer holds is refused, not
//! re-applied: each function checks the state it starts from on the copy it is given
//! (the mediator hands it a fresh copy again after a lost compare-and-swap), and says
//! [`Refused`] when that state is gone.

use std::collections::BTreeMap;

use time::OffsetDateTime;

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
    if t.queue.is_some() && !t.cancel_requested {
        return Vec::new(); // the queue hands it on when what it needs is free
    }
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
                    if w.per_frame && running(w.phase) != running(p) { Wait::on(w.phase, Condition::Ended) } else { w }
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
    t.queue.is_none() && t.retry_at.is_none_or(|r| r <= at) && t.phases.iter().any(|p| needs_submission(p.state))
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
    if !t.jobs_live() {
        return Err(Refused(format!("task {} has already ended ({})", t.id, t.state.as_str())));
    }
    if t.cancel_requested {
        return Ok(());
    }
    t.cancel_requested = true;
    t.record(at, None, format!("cancel requested by {who}"));
    if t.queue.take().is_some() {
        t.record(at, None, "left the queue");
    }
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

mod restart;
pub use restart::{FrameSet, MAX_SELECTION_TEXT, RestartAsk, RestartChoice, restart, restart_choices, restart_with};

#[cfg(test)]
mod tests;

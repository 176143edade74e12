//! Restarts: what an ended task reruns (from a phase, or what did not succeed), which
//! frames of its frame phases, what is kept because it is up to date, and the choices
//! the API lists. Pure, as the rest of [`super`].

use std::collections::{BTreeMap, BTreeSet};

use time::OffsetDateTime;

use super::{Reforged, Refused, ended_as};
use crate::model::frames::FrameRange;
use crate::model::workflow::Wait;
use crate::model::{Phase, PhaseState, Task};

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
    if t.jobs_live() {
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
    if t.jobs_live() {
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
        rec.reset_for_restart(selections.get(phase));
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
    // Phases that need licences or a share of the cluster wait for them again.
    t.join_queue(at);
    // Its outputs will change: they are kept again when it ends again.
    if let Some(a) = &t.archive {
        t.archive = Some(a.again());
    }
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
        let unfinished =
            || ask.done.get(&p).map(|done| range.frames().filter(|n| !done.contains(n)).collect::<FrameSet>());
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

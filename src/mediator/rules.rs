//! Log rules at work: the monitor reads what the jobs of a task with rules wrote to
//! their standard output and error since last time (the same plumbing as posts,
//! [`crate::scheduler::posts`]), and this matches the task's rules against the new
//! lines: each match becomes an event (the pattern's named groups as its data), and
//! the rule's action is taken the way a user would take it — `abort` asks for the
//! task's cancel, `restart` marks the phase to run again once its job has ended (at
//! most `max_restarts` times), which [`rerun`] then does through the user's restart.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use time::OffsetDateTime;

use super::{Mediator, now, transitions};
use crate::model::frames::FrameRange;
use crate::model::posts::{PostsCursor, READ_PER_FILE};
use crate::model::rules::{self, LogRule, RuleAction, RuleRestarts};
use crate::model::task::JobPost;
use crate::model::{Phase, Task};
use crate::scheduler::posts::{FileRead, PostsAnswer, PostsQuery, Source};
use transitions::FrameSet;

/// Compiled patterns, by pattern text: compiled once per server, not per tick.
#[derive(Default)]
pub struct Patterns(Mutex<HashMap<String, Option<regex::Regex>>>);

impl Patterns {
    /// The compiled pattern (`None`: it does not compile, which the upload checks
    /// prevent; such a rule never matches).
    fn get(&self, pattern: &str) -> Option<regex::Regex> {
        let mut m = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if m.len() > 10_000 {
            m.clear();
        }
        m.entry(pattern.to_owned()).or_insert_with(|| rules::compile(pattern).ok()).clone()
    }
}

/// The output files of `t` its rules read this tick, as queries; the paths of
/// single jobs' files are filled in by the monitor, which knows the cluster's
/// scheduler. A phase that runs per frame is read from its frames' own files.
pub fn queries(t: &Task) -> Vec<PostsQuery> {
    let mut out = Vec::new();
    for p in &t.phases {
        let Some(job) = &p.job_id else { continue };
        for stderr in p.output_pending(&t.rules) {
            let (path, cursor) = if p.frames.is_some() {
                (format!("{}/{}", t.run_dir, rules::frame_output_dir(p.phase, stderr)), p.output.frames(stderr).clone())
            } else {
                let offset = if stderr { p.output.stderr } else { p.output.stdout };
                (String::new(), PostsCursor { offset, ..Default::default() })
            };
            out.push(PostsQuery {
                source: Source::Output { stderr, job: job.clone(), path },
                run_dir: t.run_dir.clone(),
                phase: p.phase,
                frames: p.frames.is_some(),
                ended: p.state.is_final(),
                skip: false,
                cursor,
            });
        }
    }
    out
}

/// The task's rules, compiled (index, rule, pattern).
type Compiled<'a> = Vec<(usize, &'a LogRule, regex::Regex)>;

/// Matches the rules against what was read for `q`, and takes their actions.
pub fn apply(t: &mut Task, q: &PostsQuery, answer: Option<&PostsAnswer>, patterns: &Patterns, at: OffsetDateTime) {
    let Source::Output { stderr, .. } = q.source else { return };
    let phase = q.phase;
    let rec = t.phase(phase);
    let Some(job) = rec.job_id.clone() else { return };
    // Restarted meanwhile: this read is of another job's output.
    let current = match rec.frames.is_some() {
        true => rec.output.frames(stderr).clone(),
        false => {
            PostsCursor { offset: if stderr { rec.output.stderr } else { rec.output.stdout }, ..Default::default() }
        }
    };
    if current != q.cursor {
        return;
    }
    let ended_before = rec.state.is_final();
    let Some(answer) = answer else { return };
    // The task's rules, compiled once for all the reads (a copy: actions change the task).
    let task_rules = t.rules.clone();
    let compiled: Compiled =
        task_rules.iter().enumerate().filter_map(|(i, r)| patterns.get(&r.pattern).map(|re| (i, r, re))).collect();
    let here = Here { phase, stderr, job: &job, at };
    if q.frames {
        for read in &answer.reads {
            let Some(frame) = read.frame else { continue };
            let cursor = t.phase(phase).output.frames(stderr);
            let offset = cursor.open.iter().find(|c| c.frame == frame).map_or(0, |c| c.offset);
            let offset = scan_read(t, &compiled, &here, Some(frame), read, offset, ended_before);
            let finished = read.ended && offset >= read.size;
            t.phase_mut(phase).output.frames_mut(stderr).move_frame(frame, offset, false, finished);
        }
        let c = t.phase_mut(phase).output.frames_mut(stderr);
        // Read to the end: every frame's file read with its job known to have ended.
        c.drained = answer.complete && ended_before && (q.ended || c.open.is_empty());
        return;
    }
    let mut offset = q.cursor.offset;
    for read in &answer.reads {
        offset = scan_read(t, &compiled, &here, None, read, offset, ended_before);
    }
    let rec = t.phase_mut(phase);
    let done = answer.complete && ended_before;
    if stderr {
        (rec.output.stderr, rec.output.stderr_done) = (offset, done);
    } else {
        (rec.output.stdout, rec.output.stdout_done) = (offset, done);
    }
}

/// Whose output a read is: the phase, the stream, its job, and when it was read.
struct Here<'a> {
    phase: Phase,
    stderr: bool,
    job: &'a str,
    at: OffsetDateTime,
}

/// Matches the rules against the whole lines of one read (of the phase's job, or of
/// `frame`) read from `offset`, takes their actions, and returns how far the file
/// has now been read.
fn scan_read(
    t: &mut Task,
    compiled: &Compiled,
    here: &Here,
    frame: Option<u32>,
    read: &FileRead,
    mut offset: u64,
    ended_before: bool,
) -> u64 {
    let phase = here.phase;
    let stream = if here.stderr { "stderr" } else { "stdout" };
    let place = frame.map_or_else(|| phase.to_string(), |f| format!("{phase} (frame {f})"));
    if read.start < offset {
        offset = 0;
    }
    let mut bytes: &[u8] = &read.bytes;
    if read.start > offset {
        t.record(
            here.at,
            Some(phase),
            format!(
                "{place}: the log rules skipped {} bytes of its {stream}: it wrote more than {} KiB between two reads; the newest were read",
                read.start - offset,
                READ_PER_FILE >> 10
            ),
        );
        // Resume at a line's start.
        match bytes.iter().position(|&b| b == b'\n') {
            Some(i) => bytes = &bytes[i + 1..],
            None => bytes = &[],
        }
    }
    let skipped_head = read.bytes.len() - bytes.len();
    let ended = read.ended || ended_before;
    // Whole lines; the last one too once the job (frame) has ended, or when it alone
    // fills a read (it is matched on its start).
    let upto = match bytes.iter().rposition(|&b| b == b'\n') {
        _ if ended => bytes.len(),
        Some(i) => i + 1,
        None if bytes.len() as u64 >= READ_PER_FILE => bytes.len(),
        None => 0,
    };
    let text = String::from_utf8_lossy(&bytes[..upto]);
    let lines: Vec<&str> = text.lines().collect();
    for hit in rules::scan(compiled, phase, here.stderr, &lines) {
        let rule = compiled.iter().find(|(i, ..)| *i == hit.rule).map(|(_, r, _)| *r);
        if let Some(rule) = rule {
            act(t, rule, hit, here, frame);
        }
    }
    read.start + (skipped_head + upto) as u64
}

/// Raises a rule's event and takes its action.
fn act(t: &mut Task, rule: &LogRule, hit: rules::Hit, here: &Here, frame: Option<u32>) {
    let (phase, at) = (here.phase, here.at);
    let index = hit.rule as u32;
    let words = rule.message.clone().unwrap_or_else(|| rule.event.clone());
    let line: String = hit.line.chars().take(300).collect();
    let data = (!hit.groups.is_empty()).then(|| serde_json::to_value(&hit.groups).unwrap_or_default());
    let at_frame = frame.map(|f| format!("frame {f}: ")).unwrap_or_default();
    let place = frame.map_or_else(|| phase.to_string(), |f| format!("{phase} frame {f}"));
    if !t.posted.full() {
        t.posted.kept += 1;
        t.posted.bytes += line.len() as u64;
        let post = JobPost {
            job: here.job.to_owned(),
            frame,
            event: Some(rule.event.clone()),
            data,
            key: None,
            value: None,
            time: None,
            rule: Some(index),
        };
        t.record_post(at, phase, format!("{at_frame}{words}: {line}"), post);
    }
    match rule.action {
        RuleAction::None => {}
        RuleAction::Abort => {
            if t.jobs_live() && !t.cancel_requested {
                let _ = transitions::request_cancel(t, &format!("log rule `{}` ({place}: {line})", rule.event), at);
            }
        }
        RuleAction::Restart => {
            let rec = t.phase(phase);
            let marked = match frame {
                None => rec.rerun_by_rule.is_some(),
                Some(f) => rerun_frames(rec).contains(&f),
            };
            if marked || t.cancel_requested {
                return;
            }
            let allowed = rule.restarts_allowed();
            let done = restarts(t, index, phase, frame);
            if done < allowed {
                let rec = t.phase_mut(phase);
                rec.rerun_by_rule.get_or_insert(index);
                if let Some(f) = frame {
                    let mut frames = rerun_frames(rec);
                    frames.insert(f);
                    let frames: Vec<u32> = frames.into_iter().collect();
                    rec.rerun_frames = FrameRange::from_frames(&frames).map(|r| r.to_string());
                }
                t.record(
                    at,
                    Some(phase),
                    format!(
                        "{place} runs again once the task's jobs have ended (log rule `{}`, restart {} of {allowed})",
                        rule.event,
                        done + 1
                    ),
                );
            } else if let Some(r) = t
                .rule_restarts
                .iter_mut()
                .find(|r| r.rule == index && r.phase == phase && r.frame == frame && !r.gave_up)
            {
                r.gave_up = true;
                t.record(
                    at,
                    Some(phase),
                    format!(
                        "log rule `{}` matched again, but it has restarted {place} {allowed} time{} already: not again",
                        rule.event,
                        if allowed == 1 { "" } else { "s" }
                    ),
                );
            }
        }
    }
}

/// The frames of a phase log rules asked to run again.
fn rerun_frames(rec: &crate::model::task::PhaseRecord) -> FrameSet {
    rec.rerun_frames
        .as_deref()
        .and_then(|r| FrameRange::parse(r, u64::MAX).ok())
        .map(|r| r.frames().collect())
        .unwrap_or_default()
}

/// How many times rule `index` restarted `phase` (that frame of it).
fn restarts(t: &Task, index: u32, phase: Phase, frame: Option<u32>) -> u32 {
    t.rule_restarts.iter().find(|r| r.rule == index && r.phase == phase && r.frame == frame).map_or(0, |r| r.count)
}

/// What a rule asked to run again: the phase, the rule, and for a phase that runs
/// per frame its frames. Due once the task has ended for its user and its output has
/// been read to the end: `None` otherwise.
pub fn rerun_due(t: &Task) -> Option<(Phase, u32, Option<String>)> {
    if t.jobs_live() {
        return None;
    }
    let p = t.phases.iter().find(|p| p.rerun_by_rule.is_some())?;
    p.output_pending(&t.rules).is_empty().then(|| (p.phase, p.rerun_by_rule.unwrap_or(0), p.rerun_frames.clone()))
}

/// Reruns what a rule asked for, through the user's restart from that phase (the
/// recorded scripts; it and what waits for it; for frames, those frames, the others
/// that did not succeed, and what waits for them). A refusal is said and the mark
/// cleared. Where the frames that succeeded cannot be read from the cluster, nothing
/// is done: it is tried again on the next tick.
pub async fn rerun(m: &Arc<Mediator>, t: &Task) {
    let Some(due) = rerun_due(t) else { return };
    let (phase, rule, frames) = due.clone();
    let event = t.rules.get(rule as usize).map(|r| r.event.clone()).unwrap_or_default();
    let who = format!("log rule `{event}`");
    let mut ask = transitions::RestartAsk { from: Some(phase), ..Default::default() };
    if let Some(text) = &frames {
        ask.frames = FrameRange::parse(text, u64::MAX).ok().map(|r| r.frames().collect());
        // As a user's restart does: which frames succeeded, from their records.
        if let Ok(candidates) = transitions::restart_with(&mut t.clone(), &ask, &who, now()) {
            match m.frames_done(t, &candidates).await {
                Ok(done) => ask.done = done,
                Err(e) => {
                    tracing::warn!(task = %t.id, error = %e, "a log rule's rerun waits for the cluster");
                    return;
                }
            }
        }
    }
    let result = m
        .change_task(&t.id, |t| {
            if rerun_due(t).as_ref() != Some(&due) {
                return Ok(());
            }
            let at = now();
            match transitions::restart_with(t, &ask, &who, at) {
                Ok(_) => {
                    let counted: Vec<Option<u32>> = match &ask.frames {
                        Some(set) => set.iter().map(|f| Some(*f)).collect(),
                        None => vec![None],
                    };
                    for frame in counted {
                        match t
                            .rule_restarts
                            .iter_mut()
                            .find(|r| r.rule == rule && r.phase == phase && r.frame == frame)
                        {
                            Some(r) => r.count += 1,
                            None => t.rule_restarts.push(RuleRestarts { rule, phase, frame, count: 1, gave_up: false }),
                        }
                    }
                    Ok(())
                }
                Err(refused) => {
                    let rec = t.phase_mut(phase);
                    (rec.rerun_by_rule, rec.rerun_frames) = (None, None);
                    t.record(at, Some(phase), format!("log rule `{event}` could not rerun {phase}: {}", refused.0));
                    Ok(())
                }
            }
        })
        .await;
    match result {
        Ok(Ok(t)) => {
            if t.jobs_live() {
                m.enqueue(t.id);
            }
        }
        Ok(Err(_)) => {}
        Err(e) => tracing::warn!(task = %t.id, error = %e, "a log rule's rerun could not be recorded"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::PhaseState;
    use crate::scheduler::posts::FileRead;

    fn task(rules_toml: &str) -> Task {
        #[derive(serde::Deserialize)]
        struct R {
            rules: Vec<LogRule>,
        }
        let mut t = crate::model::task::sample_task(OffsetDateTime::UNIX_EPOCH);
        t.rules = toml::from_str::<R>(rules_toml).unwrap().rules;
        for (p, id) in Phase::DEFAULT.into_iter().zip(["1", "2", "3"]) {
            t.phase_mut(p).job_id = Some(id.into());
            t.set_phase_state(OffsetDateTime::UNIX_EPOCH, p, PhaseState::Running, None);
        }
        t
    }

    fn read(t: &Task, stderr: bool, text: &str) -> (PostsQuery, PostsAnswer) {
        let q = queries(t)
            .into_iter()
            .find(|q| {
                q.phase == Phase::EXECUTE && matches!(&q.source, Source::Output { stderr: s, .. } if *s == stderr)
            })
            .unwrap();
        let start = q.cursor.offset;
        let a = PostsAnswer {
            reads: vec![FileRead {
                frame: None,
                start,
                size: start + text.len() as u64,
                ended: false,
                bytes: text.as_bytes().to_vec(),
            }],
            complete: true,
        };
        (q, a)
    }

    #[test]
    fn a_match_raises_its_event_with_the_groups_and_abort_cancels_the_task() {
        let mut t = task(
            "[[rules]]\npattern = 'error: mesh (?P<part>\\w+) inverted'\nevent = 'mesh.inverted'\nstream = 'stderr'\naction = 'abort'\nphases = ['execute']",
        );
        // Only stderr of execute is read.
        let qs = queries(&t);
        assert_eq!(qs.len(), 1, "{qs:?}");
        let (q, a) = read(&t, true, "step 1\nerror: mesh wing inverted\nhalf a li");
        apply(&mut t, &q, Some(&a), &Patterns::default(), OffsetDateTime::UNIX_EPOCH);
        let e = t.events.iter().find(|e| e.post.is_some()).unwrap();
        let post = e.post.as_ref().unwrap();
        assert_eq!((post.event.as_deref(), post.rule), (Some("mesh.inverted"), Some(0)));
        assert_eq!(post.data, Some(serde_json::json!({"part": "wing"})));
        assert_eq!(e.message, "mesh.inverted: error: mesh wing inverted");
        assert!(t.cancel_requested, "abort cancels as a user would");
        assert_eq!(t.phase(Phase::EXECUTE).output.stderr, "step 1\nerror: mesh wing inverted\n".len() as u64);
    }

    #[test]
    fn restart_marks_the_phase_once_reruns_when_it_ended_and_gives_up_after_its_limit() {
        let mut t = task("[[rules]]\npattern = 'NaN'\nevent = 'diverged'\naction = 'restart'");
        let at = OffsetDateTime::UNIX_EPOCH;
        let (q, a) = read(&t, false, "residual NaN\nresidual NaN\n");
        apply(&mut t, &q, Some(&a), &Patterns::default(), at);
        assert_eq!(t.phase(Phase::EXECUTE).rerun_by_rule, Some(0));
        assert_eq!(
            t.events.iter().filter(|e| e.message.contains("runs again once the task's jobs have ended")).count(),
            1
        );
        assert_eq!(rerun_due(&t), None, "not while jobs run");
        for p in Phase::DEFAULT {
            t.set_phase_state(at, p, PhaseState::Completed, None);
        }
        // Its output must be read to the end first.
        assert_eq!(rerun_due(&t), None);
        for p in Phase::DEFAULT {
            t.phase_mut(p).output.stdout_done = true;
            t.phase_mut(p).output.stderr_done = true;
        }
        assert_eq!(rerun_due(&t), Some((Phase::EXECUTE, 0, None)));
        // As `rerun` does it.
        transitions::restart(&mut t, Some(Phase::EXECUTE), &Default::default(), None, "log rule", at).unwrap();
        t.rule_restarts.push(RuleRestarts { rule: 0, phase: Phase::EXECUTE, frame: None, count: 1, gave_up: false });
        assert_eq!(t.phase(Phase::EXECUTE).rerun_by_rule, None);
        t.phase_mut(Phase::EXECUTE).job_id = Some("9".into());
        t.set_phase_state(at, Phase::EXECUTE, PhaseState::Running, None);
        let (q, a) = read(&t, false, "NaN again\nNaN again\n");
        apply(&mut t, &q, Some(&a), &Patterns::default(), at);
        assert_eq!(t.phase(Phase::EXECUTE).rerun_by_rule, None, "once only (max_restarts 1)");
        assert_eq!(t.events.iter().filter(|e| e.message.contains("not again")).count(), 1, "said once");
    }

    #[test]
    fn frames_are_read_on_their_own_cursors_and_a_rule_restarts_each_frame_once() {
        let mut t = task("[[rules]]\npattern = 'NaN'\nevent = 'diverged'\naction = 'restart'\nphases = ['execute']");
        let at = OffsetDateTime::UNIX_EPOCH;
        t.phase_mut(Phase::EXECUTE).frames = Some(crate::model::task::FrameProgress {
            range: "1-4".into(),
            total: 4,
            per_job: 2,
            max_parallel: None,
            selection: None,
            completed: 0,
            failed: 0,
            failures: Vec::new(),
        });
        let qs: Vec<PostsQuery> = queries(&t).into_iter().filter(|q| q.phase == Phase::EXECUTE).collect();
        assert_eq!(qs.len(), 2, "both streams: {qs:?}");
        let q = qs.into_iter().find(|q| matches!(q.source, Source::Output { stderr: false, .. })).unwrap();
        assert!(q.frames);
        assert!(matches!(&q.source, Source::Output { path, .. } if path.ends_with(".hpcforge/output/execute/stdout")));
        let frame = |f: u32, start: u64, ended: bool, text: &str| FileRead {
            frame: Some(f),
            start,
            size: start + text.len() as u64,
            ended,
            bytes: text.as_bytes().to_vec(),
        };
        // Frame 1 ended, clean; frame 3 still runs and has printed half a line.
        let a = PostsAnswer {
            reads: vec![frame(1, 0, true, "fine\n"), frame(3, 0, false, "step\nresidual Na")],
            complete: true,
        };
        apply(&mut t, &q, Some(&a), &Patterns::default(), at);
        let c = t.phase(Phase::EXECUTE).output.frames_stdout.clone();
        assert_eq!(c.done.as_deref(), Some("1"));
        assert_eq!(
            c.open,
            [crate::model::posts::FrameCursor { frame: 3, offset: 5, skipping: false }],
            "the half line waits"
        );
        assert_eq!(t.phase(Phase::EXECUTE).rerun_frames, None);
        // The rest of frame 3's line, then it ends; the job ends.
        let q = queries(&t).into_iter().find(|q| matches!(q.source, Source::Output { stderr: false, .. })).unwrap();
        for p in Phase::DEFAULT {
            t.set_phase_state(at, p, PhaseState::Completed, None);
        }
        let a = PostsAnswer { reads: vec![frame(3, 5, true, "residual NaN\nresidual NaN\n")], complete: true };
        apply(&mut t, &q, Some(&a), &Patterns::default(), at);
        let rec = t.phase(Phase::EXECUTE);
        assert_eq!((rec.rerun_by_rule, rec.rerun_frames.as_deref()), (Some(0), Some("3")));
        let hit = t.events.iter().find(|e| e.post.is_some()).unwrap();
        assert_eq!(
            (hit.post.as_ref().unwrap().frame, hit.message.as_str()),
            (Some(3), "frame 3: diverged: residual NaN")
        );
        assert_eq!(
            t.events.iter().filter(|e| e.message.contains("execute frame 3 runs again")).count(),
            1,
            "one mark for the frame, however many lines matched"
        );
        assert!(t.phase(Phase::EXECUTE).output.frames_stdout.drained, "read to the end once the job ended");
        // Stderr read too, then the rerun is due, with its frames.
        let q = queries(&t).into_iter().find(|q| q.phase == Phase::EXECUTE).unwrap();
        apply(&mut t, &q, Some(&PostsAnswer { reads: Vec::new(), complete: true }), &Patterns::default(), at);
        for p in [Phase::PROLOG, Phase::EPILOG] {
            t.phase_mut(p).output.stdout_done = true;
            t.phase_mut(p).output.stderr_done = true;
        }
        assert_eq!(rerun_due(&t), Some((Phase::EXECUTE, 0, Some("3".into()))));
        // The rerun of frame 3 (as `rerun` does it): frame 1's output stays read, 3's is forgotten.
        let ask = transitions::RestartAsk {
            from: Some(Phase::EXECUTE),
            frames: Some([3].into()),
            done: [(Phase::EXECUTE, [1, 2, 4].into())].into(),
            ..Default::default()
        };
        transitions::restart_with(&mut t, &ask, "log rule", at).unwrap();
        t.rule_restarts.push(RuleRestarts { rule: 0, phase: Phase::EXECUTE, frame: Some(3), count: 1, gave_up: false });
        let rec = t.phase(Phase::EXECUTE);
        assert_eq!(rec.frames.as_ref().unwrap().selection.as_deref(), Some("3"));
        assert_eq!((rec.output.frames_stdout.done.as_deref(), rec.output.frames_stdout.drained), (Some("1"), false));
        assert_eq!((rec.rerun_by_rule, rec.rerun_frames.as_ref()), (None, None));
        // Frame 3 matches again: given up, said once; frame 2 matching is its own first time.
        t.phase_mut(Phase::EXECUTE).job_id = Some("9".into());
        t.set_phase_state(at, Phase::EXECUTE, PhaseState::Running, None);
        let q = queries(&t).into_iter().find(|q| matches!(q.source, Source::Output { stderr: false, .. })).unwrap();
        let a = PostsAnswer {
            reads: vec![frame(3, 0, true, "NaN again\nNaN again\n"), frame(2, 0, true, "NaN\n")],
            complete: true,
        };
        apply(&mut t, &q, Some(&a), &Patterns::default(), at);
        assert_eq!(
            t.events.iter().filter(|e| e.message.contains("restarted execute frame 3 1 time already")).count(),
            1
        );
        assert_eq!(t.phase(Phase::EXECUTE).rerun_frames.as_deref(), Some("2"));
    }
}

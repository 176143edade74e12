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
use crate::model::posts::READ_PER_FILE;
use crate::model::rules::{self, LogRule, RuleAction, RuleRestarts};
use crate::model::task::JobPost;
use crate::model::{Phase, Task};
use crate::scheduler::posts::{PostsAnswer, PostsQuery, Source};

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

/// The output files of `t` its rules read this tick, as queries; their paths are
/// filled in by the monitor, which knows the cluster's scheduler.
pub fn queries(t: &Task) -> Vec<PostsQuery> {
    let mut out = Vec::new();
    for p in &t.phases {
        let Some(job) = &p.job_id else { continue };
        for stderr in p.output_pending(&t.rules) {
            let offset = if stderr { p.output.stderr } else { p.output.stdout };
            out.push(PostsQuery {
                source: Source::Output { stderr, job: job.clone(), path: String::new() },
                run_dir: t.run_dir.clone(),
                phase: p.phase,
                frames: false,
                ended: p.state.is_final(),
                skip: false,
                cursor: crate::model::posts::PostsCursor { offset, ..Default::default() },
            });
        }
    }
    out
}

/// Matches the rules against what was read for `q`, and takes their actions.
pub fn apply(t: &mut Task, q: &PostsQuery, answer: Option<&PostsAnswer>, patterns: &Patterns, at: OffsetDateTime) {
    let Source::Output { stderr, .. } = q.source else { return };
    let phase = q.phase;
    let rec = t.phase(phase);
    let Some(job) = rec.job_id.clone() else { return };
    let offset = if stderr { rec.output.stderr } else { rec.output.stdout };
    // Restarted meanwhile: this read is of another job's output.
    if offset != q.cursor.offset {
        return;
    }
    let ended_before = rec.state.is_final();
    let Some(answer) = answer else { return };
    let stream = if stderr { "stderr" } else { "stdout" };
    // The task's rules, compiled once for all the reads (a copy: actions change the task).
    let task_rules = t.rules.clone();
    let compiled: Vec<(usize, &LogRule, regex::Regex)> =
        task_rules.iter().enumerate().filter_map(|(i, r)| patterns.get(&r.pattern).map(|re| (i, r, re))).collect();
    let mut offset = offset;
    for read in &answer.reads {
        if read.start < offset {
            offset = 0;
        }
        let mut bytes: &[u8] = &read.bytes;
        if read.start > offset {
            t.record(
                at,
                Some(phase),
                format!(
                    "{phase}: the log rules skipped {} bytes of its {stream}: it wrote more than {} KiB between two reads; the newest were read",
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
        // Whole lines; the last one too once the job has ended, or when it alone fills
        // a read (it is matched on its start).
        let upto = match bytes.iter().rposition(|&b| b == b'\n') {
            _ if ended => bytes.len(),
            Some(i) => i + 1,
            None if bytes.len() as u64 >= READ_PER_FILE => bytes.len(),
            None => 0,
        };
        let text = String::from_utf8_lossy(&bytes[..upto]);
        let lines: Vec<&str> = text.lines().collect();
        for hit in rules::scan(&compiled, phase, stderr, &lines) {
            act(t, &task_rules[hit.rule], hit, phase, &job, at);
        }
        offset = read.start + (skipped_head + upto) as u64;
    }
    let rec = t.phase_mut(phase);
    let done = answer.complete && ended_before;
    if stderr {
        (rec.output.stderr, rec.output.stderr_done) = (offset, done);
    } else {
        (rec.output.stdout, rec.output.stdout_done) = (offset, done);
    }
}

/// Raises a rule's event and takes its action.
fn act(t: &mut Task, rule: &LogRule, hit: rules::Hit, phase: Phase, job: &str, at: OffsetDateTime) {
    let index = hit.rule as u32;
    let words = rule.message.clone().unwrap_or_else(|| rule.event.clone());
    let line: String = hit.line.chars().take(300).collect();
    let data = (!hit.groups.is_empty()).then(|| serde_json::to_value(&hit.groups).unwrap_or_default());
    if !t.posted.full() {
        t.posted.kept += 1;
        t.posted.bytes += line.len() as u64;
        let post = JobPost {
            job: job.to_owned(),
            frame: None,
            event: Some(rule.event.clone()),
            data,
            key: None,
            value: None,
            time: None,
            rule: Some(index),
        };
        t.record_post(at, phase, format!("{words}: {line}"), post);
    }
    match rule.action {
        RuleAction::None => {}
        RuleAction::Abort => {
            if t.jobs_live() && !t.cancel_requested {
                let _ = transitions::request_cancel(t, &format!("log rule `{}` ({phase}: {line})", rule.event), at);
            }
        }
        RuleAction::Restart => {
            if t.phase(phase).rerun_by_rule.is_some() || t.cancel_requested {
                return;
            }
            let allowed = rule.restarts_allowed();
            let done = restarts(t, index, phase);
            if done < allowed {
                t.phase_mut(phase).rerun_by_rule = Some(index);
                t.record(
                    at,
                    Some(phase),
                    format!(
                        "{phase} runs again once its job has ended (log rule `{}`, restart {} of {allowed})",
                        rule.event,
                        done + 1
                    ),
                );
            } else if let Some(r) =
                t.rule_restarts.iter_mut().find(|r| r.rule == index && r.phase == phase && !r.gave_up)
            {
                r.gave_up = true;
                t.record(
                    at,
                    Some(phase),
                    format!(
                        "log rule `{}` matched again, but it has restarted {phase} {allowed} time{} already: not again",
                        rule.event,
                        if allowed == 1 { "" } else { "s" }
                    ),
                );
            }
        }
    }
}

/// How many times rule `index` restarted `phase`.
fn restarts(t: &Task, index: u32, phase: Phase) -> u32 {
    t.rule_restarts.iter().find(|r| r.rule == index && r.phase == phase).map_or(0, |r| r.count)
}

/// The phase a rule asked to run again, once the task has ended for its user and its
/// output has been read to the end: `None` otherwise.
pub fn rerun_due(t: &Task) -> Option<(Phase, u32)> {
    if t.jobs_live() {
        return None;
    }
    let p = t.phases.iter().find(|p| p.rerun_by_rule.is_some())?;
    p.output_pending(&t.rules).is_empty().then(|| (p.phase, p.rerun_by_rule.unwrap_or(0)))
}

/// Reruns what a rule asked for, through the user's restart from that phase (the
/// recorded scripts; it and what waits for it). A refusal is said and the mark cleared.
pub async fn rerun(m: &Arc<Mediator>, t: &Task) {
    let Some((phase, rule)) = rerun_due(t) else { return };
    let result = m
        .change_task(&t.id, |t| {
            if rerun_due(t) != Some((phase, rule)) {
                return Ok(());
            }
            let event = t.rules.get(rule as usize).map(|r| r.event.clone()).unwrap_or_default();
            let at = now();
            match transitions::restart(t, Some(phase), &Default::default(), None, &format!("log rule `{event}`"), at) {
                Ok(_) => {
                    match t.rule_restarts.iter_mut().find(|r| r.rule == rule && r.phase == phase) {
                        Some(r) => r.count += 1,
                        None => t.rule_restarts.push(RuleRestarts { rule, phase, count: 1, gave_up: false }),
                    }
                    Ok(())
                }
                Err(refused) => {
                    t.phase_mut(phase).rerun_by_rule = None;
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
        assert_eq!(t.events.iter().filter(|e| e.message.contains("runs again once its job has ended")).count(), 1);
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
        assert_eq!(rerun_due(&t), Some((Phase::EXECUTE, 0)));
        // As `rerun` does it.
        transitions::restart(&mut t, Some(Phase::EXECUTE), &Default::default(), None, "log rule", at).unwrap();
        t.rule_restarts.push(RuleRestarts { rule: 0, phase: Phase::EXECUTE, count: 1, gave_up: false });
        assert_eq!(t.phase(Phase::EXECUTE).rerun_by_rule, None);
        t.phase_mut(Phase::EXECUTE).job_id = Some("9".into());
        t.set_phase_state(at, Phase::EXECUTE, PhaseState::Running, None);
        let (q, a) = read(&t, false, "NaN again\nNaN again\n");
        apply(&mut t, &q, Some(&a), &Patterns::default(), at);
        assert_eq!(t.phase(Phase::EXECUTE).rerun_by_rule, None, "once only (max_restarts 1)");
        assert_eq!(t.events.iter().filter(|e| e.message.contains("not again")).count(), 1, "said once");
    }
}

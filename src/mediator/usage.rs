//! What ended jobs used, read on the monitor's round trip: the phases whose job ended
//! after it started have `usage_due` set (`monitor::apply`); each tick asks about them
//! with the status query, and records the scheduler's accounting where it has it, or
//! else the job's own record. Accounting is waited for a little (Slurm writes it to
//! slurmdbd shortly after the job ends), and given up on after [`GIVE_UP`], saying so.

use time::{Duration, OffsetDateTime};

use crate::model::Task;
use crate::model::usage::Usage;
use crate::scheduler::UsageQuery;
use crate::scheduler::usage::UsageAnswer;

/// How long after a job ended the scheduler's accounting is waited for before the
/// job's own record is taken instead.
pub const ACCOUNTING_LAG: Duration = Duration::minutes(2);

/// How long after a job ended its use is looked for at all where the scheduler has
/// accounting (without, [`ACCOUNTING_LAG`]: the job's own record is all there is).
pub const GIVE_UP: Duration = Duration::minutes(10);

/// The reads a task needs: one per ended job whose use is still to be read — of a
/// phase's current run, or of a run before its restart.
pub fn queries(t: &Task) -> Vec<UsageQuery> {
    let query = |job: &String, phase| UsageQuery { job_id: job.clone(), run_dir: t.run_dir.clone(), phase };
    let mut out = Vec::new();
    for p in &t.phases {
        if p.usage_due && !p.state.is_live_job() {
            out.extend(p.job_id.as_ref().map(|job| query(job, p.phase)));
        }
        out.extend(
            p.previous.iter().filter(|r| r.usage_due).filter_map(|r| r.job_id.as_ref()).map(|j| query(j, p.phase)),
        );
    }
    out
}

/// Where a job's use goes: the phase's current run or an earlier one, still due.
struct Slot<'a> {
    usage: &'a mut Option<Usage>,
    due: &'a mut bool,
    ended_at: Option<OffsetDateTime>,
}

fn slot<'a>(t: &'a mut Task, q: &UsageQuery) -> Option<Slot<'a>> {
    let rec = t.phase_mut(q.phase);
    if rec.usage_due && rec.job_id.as_deref() == Some(q.job_id.as_str()) {
        let ended_at = rec.ended_at;
        return Some(Slot { usage: &mut rec.usage, due: &mut rec.usage_due, ended_at });
    }
    let past = rec.previous.iter_mut().find(|r| r.usage_due && r.job_id.as_deref() == Some(q.job_id.as_str()))?;
    let ended_at = past.ended_at;
    Some(Slot { usage: &mut past.usage, due: &mut past.usage_due, ended_at })
}

/// Records what the round trip read for `t`'s due phases; returns the usages it
/// recorded (for the metrics).
pub fn apply(t: &mut Task, asked: &[UsageQuery], answer: &UsageAnswer, now: OffsetDateTime) -> Vec<Usage> {
    let mut recorded = Vec::new();
    for q in asked {
        let Some(slot) = slot(t, q) else { continue };
        let since = now - slot.ended_at.unwrap_or(now);
        let found = answer.accounting.get(&q.job_id).cloned().or_else(|| {
            // The job's own record, once accounting had its chance (or there is none).
            (!answer.accounting_asked || since >= ACCOUNTING_LAG).then(|| answer.job.get(&q.job_id).cloned()).flatten()
        });
        match found {
            Some(u) => {
                (*slot.usage, *slot.due) = (Some(u.clone()), false);
                t.updated_at = now;
                recorded.push(u);
            }
            // Nothing will come: no accounting to wait for, and the job's record (written
            // before the job ends) is not there a while after its end — a killed job.
            None if since >= GIVE_UP || (!answer.accounting_asked && since >= ACCOUNTING_LAG) => {
                *slot.due = false;
                let why = if answer.accounting_asked {
                    "the scheduler's accounting has no ended record of it, and the job left none of its own"
                } else {
                    "the job left no record of its own (it was stopped before its application ended, or the node has no /proc)"
                };
                t.record(now, Some(q.phase), format!("what job {} used is not known: {why}", q.job_id));
            }
            None => {}
        }
    }
    recorded
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::usage::{JobUse, UsageSource};
    use crate::model::{Phase, PhaseState};

    fn task_with_ended_job(ended_ago: Duration) -> (Task, UsageQuery, OffsetDateTime) {
        let mut t = crate::model::task::sample_task(OffsetDateTime::UNIX_EPOCH);
        t.run_dir = "/home/alice/hpcforge/t".into();
        let now = OffsetDateTime::now_utc();
        let phase = Phase::EXECUTE;
        let rec = t.phase_mut(phase);
        rec.job_id = Some("42".into());
        rec.state = PhaseState::Completed;
        rec.ended_at = Some(now - ended_ago);
        rec.usage_due = true;
        let q = UsageQuery { job_id: "42".into(), run_dir: t.run_dir.clone(), phase };
        (t, q, now)
    }

    fn usage(source: UsageSource) -> Usage {
        Usage::sum(source, &[JobUse { elapsed: 10.0, cpu: 5.0, cpus: 1, ..Default::default() }]).unwrap()
    }

    #[test]
    fn accounting_first_the_jobs_record_after_a_while_and_then_give_up_saying_so() {
        let phase = Phase::EXECUTE;
        let mut answer = UsageAnswer { accounting_asked: true, ..Default::default() };
        answer.job.insert("42".into(), usage(UsageSource::Job));
        // Just ended: accounting may still be writing; the job's record waits.
        let (mut t, q, now) = task_with_ended_job(Duration::seconds(5));
        assert!(apply(&mut t, std::slice::from_ref(&q), &answer, now).is_empty());
        assert!(t.phase(phase).usage_due && t.is_live());
        // Accounting answers: taken.
        answer.accounting.insert("42".into(), usage(UsageSource::Sacct));
        assert_eq!(apply(&mut t, std::slice::from_ref(&q), &answer, now).len(), 1);
        assert_eq!(t.phase(phase).usage.as_ref().unwrap().source, UsageSource::Sacct);
        assert!(!t.phase(phase).usage_due);
        // Accounting silent for longer than its lag: the job's record.
        answer.accounting.clear();
        let (mut t, q, now) = task_with_ended_job(ACCOUNTING_LAG + Duration::seconds(1));
        apply(&mut t, std::slice::from_ref(&q), &answer, now);
        assert_eq!(t.phase(phase).usage.as_ref().unwrap().source, UsageSource::Job);
        // Nothing at all, long after: given up, with an event saying why.
        answer.job.clear();
        let (mut t, q, now) = task_with_ended_job(GIVE_UP);
        apply(&mut t, std::slice::from_ref(&q), &answer, now);
        assert!(!t.phase(phase).usage_due && t.phase(phase).usage.is_none());
        assert!(t.events.last().unwrap().message.contains("is not known"), "{:?}", t.events.last());
    }

    #[test]
    fn a_run_restarted_before_its_use_was_read_still_gets_it() {
        let phase = Phase::EXECUTE;
        let (mut t, _, now) = task_with_ended_job(Duration::seconds(5));
        t.phase_mut(phase).reset_for_restart(None);
        t.phase_mut(phase).job_id = Some("43".into());
        t.phase_mut(phase).state = PhaseState::Running;
        assert!(t.is_live());
        // The rerun's job is alive: only the earlier run's use is asked for.
        let qs = queries(&t);
        assert_eq!(qs.iter().map(|q| q.job_id.as_str()).collect::<Vec<_>>(), ["42"]);
        let mut answer = UsageAnswer { accounting_asked: true, ..Default::default() };
        answer.accounting.insert("42".into(), usage(UsageSource::Sacct));
        assert_eq!(apply(&mut t, &qs, &answer, now).len(), 1);
        let past = &t.phase(phase).previous[0];
        assert_eq!((past.usage.as_ref().map(|u| u.source), past.usage_due), (Some(UsageSource::Sacct), false));
        assert!(t.phase(phase).usage.is_none(), "not the rerun's");
        assert!(queries(&t).is_empty());
    }

    #[test]
    fn without_accounting_the_jobs_record_is_taken_at_once_and_a_killed_job_is_not_waited_for_long() {
        let phase = Phase::EXECUTE;
        let mut answer = UsageAnswer::default();
        answer.job.insert("42".into(), usage(UsageSource::Job));
        let (mut t, q, now) = task_with_ended_job(Duration::seconds(1));
        apply(&mut t, &[q], &answer, now);
        assert!(t.phase(phase).usage.is_some());
        // Killed before its application ended: no record; given up after the lag.
        answer.job.clear();
        let (mut t, q, now) = task_with_ended_job(Duration::seconds(1));
        apply(&mut t, std::slice::from_ref(&q), &answer, now);
        assert!(t.phase(phase).usage_due);
        let (mut t, q, now) = task_with_ended_job(ACCOUNTING_LAG);
        apply(&mut t, &[q], &answer, now);
        assert!(!t.phase(phase).usage_due && t.events.last().unwrap().message.contains("left no record"));
    }
}

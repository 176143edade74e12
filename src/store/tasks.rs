//! How tasks are kept, the same for both stores: a task is its **state** (every field
//! but its inputs and its events, with the newest event beside them), its inputs
//! (written once), and its event history (appended to). An update writes the
//! difference between two copies: the state fields that changed and the events added;
//! a status tick that changes nothing writes nothing.

use serde_json::Value;

use super::StoreError;
use crate::model::{Task, TaskEvent};

/// `t` as its state: inputs `null`, only the newest event.
pub fn state_of(t: &Task) -> Task {
    Task { inputs: Value::Null, events: t.events.last().cloned().into_iter().collect(), ..clone_without_history(t) }
}

/// A copy of `t` without its inputs and events (cheap for a task with a long history).
fn clone_without_history(t: &Task) -> Task {
    Task {
        id: t.id,
        owner: t.owner.clone(),
        application: t.application.clone(),
        cluster: t.cluster.clone(),
        inputs: Value::Null,
        run_dir: t.run_dir.clone(),
        staged: t.staged.clone(),
        state: t.state,
        phases: t.phases.clone(),
        events: Vec::new(),
        posted: t.posted,
        rules: t.rules.clone(),
        rule_restarts: t.rule_restarts.clone(),
        outputs: t.outputs.clone(),
        archive: t.archive.clone(),
        cancel_requested: t.cancel_requested,
        priority: t.priority,
        needs: t.needs.clone(),
        workspace: t.workspace.clone(),
        queue: t.queue.clone(),
        scripts_version: t.scripts_version,
        retry_at: t.retry_at,
        submit_tries: t.submit_tries,
        claim: t.claim.clone(),
        revision: t.revision,
        created_at: t.created_at,
        updated_at: t.updated_at,
    }
}

/// The events of `after` that `before` did not have (newer than its newest).
pub fn new_events<'a>(before: &Task, after: &'a Task) -> &'a [TaskEvent] {
    let last = before.events.last().map_or(0, |e| e.seq);
    let from = after.events.iter().position(|e| e.seq > last).unwrap_or(after.events.len());
    &after.events[from..]
}

/// The state of `t` as a JSON object, with the newest event under `events`.
pub fn state_json(t: &Task) -> Result<serde_json::Map<String, Value>, StoreError> {
    match serde_json::to_value(state_of(t)).map_err(|e| StoreError::Other(e.into()))? {
        Value::Object(o) => Ok(o),
        _ => unreachable!("a task serialises to an object"),
    }
}

/// What changes between two state objects: the fields to set (with their new
/// values) and the fields that are gone. `events` and `inputs` are never part of it.
pub fn changed_fields(
    before: &serde_json::Map<String, Value>,
    after: &serde_json::Map<String, Value>,
) -> (Vec<(String, Value)>, Vec<String>) {
    let skip = |k: &str| k == "events" || k == "inputs";
    let set = after
        .iter()
        .filter(|(k, v)| !skip(k) && before.get(k.as_str()) != Some(v))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let unset = before.keys().filter(|k| !skip(k) && !after.contains_key(k.as_str())).cloned().collect();
    (set, unset)
}

/// Checks that `after` continues `before`'s events (same task, numbered on).
pub fn check_update(before: &Task, after: &Task) -> Result<(), StoreError> {
    if before.id != after.id {
        return Err(StoreError::Other(anyhow::anyhow!("an update of task {} names task {}", before.id, after.id)));
    }
    let mut last = before.events.last().map_or(0, |e| e.seq);
    for e in new_events(before, after) {
        if e.seq != last + 1 {
            return Err(StoreError::Other(anyhow::anyhow!(
                "task {}: event {} does not follow event {last}",
                after.id,
                e.seq
            )));
        }
        last = e.seq;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::task::sample_task;
    use crate::model::{Phase, PhaseState};

    #[test]
    fn an_update_is_the_changed_fields_and_the_new_events() {
        let at = time::OffsetDateTime::UNIX_EPOCH;
        let mut before = sample_task(at);
        before.record(at, None, "created");
        let mut after = state_of(&before);
        after.set_phase_state(at, Phase::PROLOG, PhaseState::Pending, Some("job 1"));
        after.phase_mut(Phase::PROLOG).job_id = Some("1".into());
        let new: Vec<u64> = new_events(&before, &after).iter().map(|e| e.seq).collect();
        assert_eq!(new, [2]);
        let (set, unset) = changed_fields(&state_json(&before).unwrap(), &state_json(&after).unwrap());
        let names: Vec<&str> = set.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(names, ["phases"], "updated_at moved too? {set:?}");
        assert!(unset.is_empty());
        check_update(&before, &after).unwrap();
        let mut gap = after.clone();
        gap.events[0].seq = 9;
        assert!(check_update(&before, &gap).is_err());
    }

    #[test]
    fn a_state_keeps_only_the_newest_event_and_no_inputs() {
        let at = time::OffsetDateTime::UNIX_EPOCH;
        let mut t = sample_task(at);
        t.inputs = serde_json::json!([{ "name": "x", "value": 1 }]);
        t.record(at, None, "one");
        t.record(at, None, "two");
        let s = state_of(&t);
        assert_eq!((s.inputs.clone(), s.events.len(), s.events[0].seq), (Value::Null, 1, 2));
        assert_eq!(Task { inputs: t.inputs.clone(), events: t.events.clone(), ..s }, t);
    }
}

//! Tasks in the embedded store: a row per task whose `doc` is the task's state (see
//! `store::tasks`), its inputs in their own column, and its events in `task_events`,
//! one row each. A change rewrites the small state document and appends the new
//! events, in one transaction; reading a task's state never reads its history.

use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};

use super::{EmbeddedStore, conflict_or_sql, sql_err};
use crate::model::{Forged, Task, TaskEvent, TaskId, TaskState};
use crate::store::tasks::{check_update, new_events, state_of};
use crate::store::{StoreError, TaskFilter};

fn corrupt(what: &str, e: impl std::fmt::Display) -> StoreError {
    StoreError::Other(anyhow::anyhow!("corrupt {what}: {e}"))
}

fn state_from(doc: &str) -> Result<Task, StoreError> {
    serde_json::from_str(doc).map_err(|e| corrupt("task", e))
}

fn event_from(doc: &str) -> Result<TaskEvent, StoreError> {
    serde_json::from_str(doc).map_err(|e| corrupt("task event", e))
}

/// Writes `events` of task `id`.
fn append_events(c: &Connection, id: &str, events: &[TaskEvent]) -> Result<(), StoreError> {
    let mut stmt = c.prepare_cached("INSERT INTO task_events (task, seq, doc) VALUES (?1, ?2, ?3)").map_err(sql_err)?;
    for e in events {
        let doc = serde_json::to_string(e).map_err(|e| StoreError::Other(e.into()))?;
        stmt.execute(params![id, e.seq as i64, doc]).map_err(conflict_or_sql)?;
    }
    Ok(())
}

/// Inserts the row and the events of `task`.
fn insert_row(c: &Connection, task: &Task) -> Result<(), StoreError> {
    let doc = serde_json::to_string(&state_of(task)).map_err(|e| StoreError::Other(e.into()))?;
    let inputs = serde_json::to_string(&task.inputs).map_err(|e| StoreError::Other(e.into()))?;
    let id = task.id.to_string();
    c.execute(
        "INSERT INTO tasks (id, owner, doc, inputs, live, rev, state, application, cluster) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
        params![
            id,
            task.owner.as_str(),
            doc,
            inputs,
            task.is_live(),
            task.revision as i64,
            task.state.as_str(),
            task.application.name.as_str(),
            task.cluster.name.as_str()
        ],
    )
    .map_err(|e| {
        if e.sqlite_error_code() == Some(rusqlite::ErrorCode::ConstraintViolation) {
            StoreError::Conflict(format!("task {id} already exists"))
        } else {
            sql_err(e)
        }
    })?;
    append_events(c, &id, &task.events)
}

pub(super) async fn insert_task(s: &EmbeddedStore, task: &Task) -> Result<(), StoreError> {
    let task = task.clone();
    s.with_conn(move |c| {
        let tx = c.transaction_with_behavior(TransactionBehavior::Immediate).map_err(sql_err)?;
        insert_row(&tx, &task)?;
        tx.commit().map_err(sql_err)
    })
    .await
}

pub(super) async fn create_task(s: &EmbeddedStore, task: &Task, forged: &Forged) -> Result<(), StoreError> {
    let (task, forged) = (task.clone(), forged.clone());
    s.with_conn(move |c| {
        let tx = c.transaction_with_behavior(TransactionBehavior::Immediate).map_err(sql_err)?;
        super::definitions::insert_task_scripts(&tx, &task.id, &task.owner, &forged, 1, task.created_at)?;
        insert_row(&tx, &task)?;
        tx.commit().map_err(sql_err)
    })
    .await
}

pub(super) async fn update_task(s: &EmbeddedStore, before: &Task, after: &Task) -> Result<Task, StoreError> {
    check_update(before, after)?;
    let events = new_events(before, after).to_vec();
    let mut next = state_of(after);
    next.revision = before.revision + 1;
    let doc = serde_json::to_string(&next).map_err(|e| StoreError::Other(e.into()))?;
    let (id, live, old, new, state) =
        (after.id.to_string(), next.is_live(), before.revision as i64, next.revision as i64, next.state.as_str());
    let stored = Task { inputs: after.inputs.clone(), events: after.events.clone(), ..next };
    s.with_conn(move |c| {
        let tx = c.transaction_with_behavior(TransactionBehavior::Immediate).map_err(sql_err)?;
        let n = tx
            .execute(
                "UPDATE tasks SET doc = ?1, live = ?2, rev = ?3, state = ?6 WHERE id = ?4 AND rev = ?5",
                params![doc, live, new, id, old, state],
            )
            .map_err(sql_err)?;
        if n != 1 {
            let exists =
                tx.prepare("SELECT 1 FROM tasks WHERE id = ?1").and_then(|mut s| s.exists([&id])).map_err(sql_err)?;
            return Err(if exists {
                StoreError::Conflict(format!("task {id} was changed meanwhile (expected revision {old})"))
            } else {
                StoreError::Other(anyhow::anyhow!("task {id} does not exist"))
            });
        }
        append_events(&tx, &id, &events)?;
        tx.commit().map_err(sql_err)?;
        Ok(stored)
    })
    .await
}

pub(super) async fn get_task(s: &EmbeddedStore, id: &TaskId) -> Result<Option<Task>, StoreError> {
    let id = id.to_string();
    s.with_conn(move |c| {
        let row: Option<(String, String)> = c
            .query_row("SELECT doc, inputs FROM tasks WHERE id = ?1", params![id], |r| Ok((r.get(0)?, r.get(1)?)))
            .optional()
            .map_err(sql_err)?;
        let Some((doc, inputs)) = row else { return Ok(None) };
        let mut t = state_from(&doc)?;
        t.inputs = serde_json::from_str(&inputs).map_err(|e| corrupt("task inputs", e))?;
        t.events = events_after(c, &id, 0)?;
        Ok(Some(t))
    })
    .await
}

fn events_after(c: &Connection, id: &str, after: u64) -> Result<Vec<TaskEvent>, StoreError> {
    let mut stmt =
        c.prepare_cached("SELECT doc FROM task_events WHERE task = ?1 AND seq > ?2 ORDER BY seq").map_err(sql_err)?;
    let rows = stmt.query_map(params![id, after as i64], |r| r.get::<_, String>(0)).map_err(sql_err)?;
    rows.map(|r| event_from(&r.map_err(sql_err)?)).collect()
}

pub(super) async fn task_state(s: &EmbeddedStore, id: &TaskId) -> Result<Option<Task>, StoreError> {
    let id = id.to_string();
    s.with_conn(move |c| {
        let doc: Option<String> = c
            .query_row("SELECT doc FROM tasks WHERE id = ?1", params![id], |r| r.get(0))
            .optional()
            .map_err(sql_err)?;
        doc.as_deref().map(state_from).transpose()
    })
    .await
}

pub(super) async fn task_events(s: &EmbeddedStore, id: &TaskId, after: u64) -> Result<Vec<TaskEvent>, StoreError> {
    let id = id.to_string();
    s.with_conn(move |c| events_after(c, &id, after)).await
}

pub(super) async fn live_tasks(s: &EmbeddedStore) -> Result<Vec<Task>, StoreError> {
    s.with_conn(|c| {
        let mut stmt = c.prepare_cached("SELECT doc FROM tasks WHERE live = 1 ORDER BY id").map_err(sql_err)?;
        let rows = stmt.query_map([], |r| r.get::<_, String>(0)).map_err(sql_err)?;
        rows.map(|r| state_from(&r.map_err(sql_err)?)).collect()
    })
    .await
}

pub(super) async fn list_tasks(s: &EmbeddedStore, filter: &TaskFilter, limit: usize) -> Result<Vec<Task>, StoreError> {
    let mut sql = String::from("SELECT doc FROM tasks WHERE 1 = 1");
    let mut args: Vec<String> = Vec::new();
    let mut arg = |sql: &mut String, clause: &str, value: String| {
        args.push(value);
        sql.push_str(&clause.replace('?', &format!("?{}", args.len())));
    };
    if let Some(o) = &filter.owner {
        arg(&mut sql, " AND owner = ?", o.to_string());
    }
    if let Some(a) = &filter.application {
        arg(&mut sql, " AND application = ?", a.to_string());
    }
    if let Some(cl) = &filter.cluster {
        arg(&mut sql, " AND cluster = ?", cl.to_string());
    }
    if let Some(since) = filter.since_id() {
        arg(&mut sql, " AND id >= ?", since);
    }
    if let Some(before) = &filter.before {
        arg(&mut sql, " AND id < ?", before.to_string());
    }
    if !filter.states.is_empty() {
        let mut parts = Vec::new();
        for st in &filter.states {
            args.push(st.as_str().to_owned());
            parts.push(format!("?{}", args.len()));
        }
        sql.push_str(&format!(" AND state IN ({})", parts.join(", ")));
    }
    sql.push_str(&format!(" ORDER BY id DESC LIMIT {}", limit.min(i64::MAX as usize)));
    s.with_conn(move |c| {
        let mut stmt = c.prepare(&sql).map_err(sql_err)?;
        let rows =
            stmt.query_map(rusqlite::params_from_iter(args.iter()), |r| r.get::<_, String>(0)).map_err(sql_err)?;
        rows.map(|r| state_from(&r.map_err(sql_err)?)).collect()
    })
    .await
}

pub(super) async fn count_tasks(s: &EmbeddedStore) -> Result<Vec<(TaskState, u64)>, StoreError> {
    s.with_conn(|c| {
        let mut stmt = c.prepare("SELECT state, count(*) FROM tasks GROUP BY state ORDER BY state").map_err(sql_err)?;
        let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?))).map_err(sql_err)?;
        let mut out = Vec::new();
        for r in rows {
            let (state, n) = r.map_err(sql_err)?;
            let state = serde_json::from_value(serde_json::Value::String(state.clone()))
                .map_err(|_| StoreError::Other(anyhow::anyhow!("corrupt task state `{state}`")))?;
            out.push((state, n as u64));
        }
        Ok(out)
    })
    .await
}

/// Moves tasks written before schema 5 (the whole task in `doc`) into the layout
/// above: the state in `doc`, the inputs beside it, the events in `task_events`.
pub(super) fn split_old_documents(c: &Connection) -> rusqlite::Result<()> {
    let rows: Vec<(String, String)> = {
        let mut stmt = c.prepare("SELECT id, doc FROM tasks")?;
        stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?.collect::<rusqlite::Result<_>>()?
    };
    for (id, doc) in rows {
        let Ok(task) = serde_json::from_str::<Task>(&doc) else { continue };
        let state = serde_json::to_string(&state_of(&task)).expect("tasks serialise");
        let inputs = serde_json::to_string(&task.inputs).expect("JSON serialises");
        c.execute("UPDATE tasks SET doc = ?2, inputs = ?3 WHERE id = ?1", params![id, state, inputs])?;
        for e in &task.events {
            let doc = serde_json::to_string(e).expect("events serialise");
            c.execute(
                "INSERT OR IGNORE INTO task_events (task, seq, doc) VALUES (?1, ?2, ?3)",
                params![id, e.seq as i64, doc],
            )?;
        }
    }
    Ok(())
}

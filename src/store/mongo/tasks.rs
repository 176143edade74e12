//! Tasks in MongoDB: one document per task in `tasks` (`_id` the task ID, `live` for
//! the mediator's index), its events in an array appended to with `$push`. A change
//! is one conditional update (`revision` must still match) that sets only the fields
//! that changed and pushes the new events; a task's state is read without its inputs
//! and with only its newest event (`$slice: -1`), so the monitor never ships histories.

use futures::TryStreamExt as _;
use mongodb::bson::{self, Bson, Document, doc};

use super::{MongoStore, classify, definitions, is_duplicate_key};
use crate::model::{Forged, Task, TaskEvent, TaskId, TaskState};
use crate::store::tasks::{changed_fields, check_update, new_events, state_json};
use crate::store::{StoreError, TaskFilter};

/// What a task's state read leaves out: the inputs, and all events but the newest.
fn state_projection() -> Document {
    doc! { "inputs": 0, "events": { "$slice": -1 } }
}

/// A task as a MongoDB document: `_id` is the task ID, `live` feeds the mediator's index.
fn task_doc(task: &Task) -> Result<Document, StoreError> {
    let mut doc = bson::to_document(task).map_err(|e| StoreError::Other(anyhow::anyhow!("a task as BSON: {e}")))?;
    doc.insert("_id", task.id.to_string());
    doc.insert("live", task.is_live());
    Ok(doc)
}

fn task_from_doc(mut doc: Document) -> Result<Task, StoreError> {
    doc.remove("_id");
    doc.remove("live");
    if !doc.contains_key("inputs") {
        doc.insert("inputs", Bson::Null);
    }
    bson::from_document(doc).map_err(|e| StoreError::Other(anyhow::anyhow!("corrupt task document: {e}")))
}

fn to_bson(v: &serde_json::Value) -> Result<Bson, StoreError> {
    bson::to_bson(v).map_err(|e| StoreError::Other(anyhow::anyhow!("a task field as BSON: {e}")))
}

pub(super) async fn insert_task(s: &MongoStore, task: &Task) -> Result<(), StoreError> {
    s.ensure_ready().await?;
    match s.tasks().insert_one(task_doc(task)?).await {
        Ok(_) => Ok(()),
        Err(e) if is_duplicate_key(&e) => Err(StoreError::Conflict(format!("task {} already exists", task.id))),
        Err(e) => Err(classify(e, "storing a task")),
    }
}

/// The scripts first, then the task document, which is what makes them visible: three
/// round trips, no transaction. A failed task write removes the scripts again.
pub(super) async fn create_task(s: &MongoStore, task: &Task, forged: &Forged) -> Result<(), StoreError> {
    s.ensure_ready().await?;
    let what = format!("storing the scripts of task {}", task.id);
    match definitions::insert_task_scripts(s, &task.id, &task.owner, forged, 1, task.created_at).await? {
        Ok(()) => {}
        Err(e) if is_duplicate_key(&e) => {
            return Err(StoreError::Conflict(format!("task {} already has forged scripts", task.id)));
        }
        Err(e) => return Err(classify(e, &what)),
    }
    if let Err(e) = insert_task(s, task).await {
        definitions::remove_task_scripts(s, &task.id, 1).await;
        return Err(e);
    }
    Ok(())
}

pub(super) async fn update_task(s: &MongoStore, before: &Task, after: &Task) -> Result<Task, StoreError> {
    check_update(before, after)?;
    s.ensure_ready().await?;
    let next_revision = before.revision + 1;
    let (set, unset) = changed_fields(&state_json(before)?, &state_json(after)?);
    let mut set_doc = Document::new();
    for (k, v) in set.iter().filter(|(k, _)| k != "revision") {
        set_doc.insert(k.clone(), to_bson(v)?);
    }
    set_doc.insert("revision", next_revision as i64);
    set_doc.insert("live", after.is_live());
    let mut update = doc! { "$set": set_doc };
    if !unset.is_empty() {
        let fields: Document = unset.iter().map(|k| (k.clone(), Bson::String(String::new()))).collect();
        update.insert("$unset", fields);
    }
    let events = new_events(before, after);
    if !events.is_empty() {
        let each: Vec<Bson> = events
            .iter()
            .map(|e| bson::to_bson(e).map_err(|e| StoreError::Other(anyhow::anyhow!("an event as BSON: {e}"))))
            .collect::<Result<_, _>>()?;
        update.insert("$push", doc! { "events": { "$each": each } });
    }
    let filter = doc! { "_id": after.id.to_string(), "revision": before.revision as i64 };
    let r = s.tasks().update_one(filter, update).await.map_err(|e| classify(e, "updating a task"))?;
    if r.matched_count == 1 {
        return Ok(Task { revision: next_revision, ..after.clone() });
    }
    let exists = s
        .tasks()
        .find_one(doc! { "_id": after.id.to_string() })
        .projection(doc! { "_id": 1 })
        .await
        .map_err(|e| classify(e, "reading a task"))?;
    Err(match exists {
        Some(_) => StoreError::Conflict(format!(
            "task {} was changed meanwhile (expected revision {})",
            after.id, before.revision
        )),
        None => StoreError::Other(anyhow::anyhow!("task {} does not exist", after.id)),
    })
}

pub(super) async fn get_task(s: &MongoStore, id: &TaskId) -> Result<Option<Task>, StoreError> {
    s.ensure_ready().await?;
    let doc = s.tasks().find_one(doc! { "_id": id.to_string() }).await.map_err(|e| classify(e, "reading a task"))?;
    doc.map(task_from_doc).transpose()
}

pub(super) async fn task_state(s: &MongoStore, id: &TaskId) -> Result<Option<Task>, StoreError> {
    s.ensure_ready().await?;
    let doc = s
        .tasks()
        .find_one(doc! { "_id": id.to_string() })
        .projection(state_projection())
        .await
        .map_err(|e| classify(e, "reading a task"))?;
    doc.map(task_from_doc).transpose()
}

/// A change stream on `tasks`: inserts, updates and replacements, each cut down to the
/// task's ID and the revision it wrote.
pub(super) async fn task_changes(s: &MongoStore) -> Result<crate::store::TaskChanges, StoreError> {
    use futures::StreamExt as _;
    s.ensure_ready().await?;
    let pipeline = [
        doc! { "$match": { "operationType": { "$in": ["insert", "update", "replace"] } } },
        doc! { "$project": {
            "operationType": 1, "documentKey": 1,
            "fullDocument.revision": 1, "updateDescription.updatedFields.revision": 1,
        } },
    ];
    let stream = s
        .tasks()
        .watch()
        .pipeline(pipeline)
        .await
        .map_err(|e| classify(e, "following changes to tasks (a change stream)"))?
        .with_type::<Document>();
    let changes = stream.filter_map(|item| async move {
        let change = match item {
            Ok(c) => c,
            Err(e) => return Some(Err(classify(e, "following changes to tasks (a change stream)"))),
        };
        let id = change.get_document("documentKey").ok()?.get_str("_id").ok()?;
        let id = TaskId::parse(id).ok()?;
        let revision = change
            .get_document("fullDocument")
            .ok()
            .or_else(|| change.get_document("updateDescription").ok()?.get_document("updatedFields").ok())?
            .get("revision")
            .and_then(|r| match r {
                Bson::Int64(n) => u64::try_from(*n).ok(),
                Bson::Int32(n) => u64::try_from(*n).ok(),
                _ => None,
            })?;
        Some(Ok((id, revision)))
    });
    Ok(changes.boxed())
}

pub(super) async fn task_events(s: &MongoStore, id: &TaskId, after: u64) -> Result<Vec<TaskEvent>, StoreError> {
    s.ensure_ready().await?;
    let doc = s
        .tasks()
        .find_one(doc! { "_id": id.to_string() })
        .projection(doc! { "events": 1 })
        .await
        .map_err(|e| classify(e, "reading a task's events"))?;
    let Some(Bson::Array(events)) = doc.and_then(|mut d| d.remove("events")) else { return Ok(Vec::new()) };
    events
        .into_iter()
        .map(|e| bson::from_bson::<TaskEvent>(e).map_err(|e| StoreError::Other(anyhow::anyhow!("corrupt event: {e}"))))
        .filter(|e| e.as_ref().map_or(true, |e| e.seq > after))
        .collect()
}

/// Runs `query` over `tasks` and reads each match as its state.
async fn find_states(
    s: &MongoStore,
    query: Document,
    sort: Document,
    limit: Option<i64>,
    doing: &str,
) -> Result<Vec<Task>, StoreError> {
    let tasks = s.tasks();
    let mut find = tasks.find(query).sort(sort).projection(state_projection());
    if let Some(n) = limit {
        find = find.limit(n);
    }
    let docs: Vec<Document> =
        find.await.map_err(|e| classify(e, doing))?.try_collect().await.map_err(|e| classify(e, doing))?;
    docs.into_iter().map(task_from_doc).collect()
}

pub(super) async fn live_tasks(s: &MongoStore) -> Result<Vec<Task>, StoreError> {
    s.ensure_ready().await?;
    find_states(s, doc! { "live": true }, doc! { "_id": 1 }, None, "listing live tasks").await
}

pub(super) async fn list_tasks(s: &MongoStore, filter: &TaskFilter, limit: usize) -> Result<Vec<Task>, StoreError> {
    s.ensure_ready().await?;
    let mut query = Document::new();
    if let Some(o) = &filter.owner {
        query.insert("owner", o.as_str());
    }
    if let Some(a) = &filter.application {
        query.insert("application.name", a.as_str());
    }
    if let Some(c) = &filter.cluster {
        query.insert("cluster.name", c.as_str());
    }
    if !filter.states.is_empty() {
        let states: Vec<&str> = filter.states.iter().map(|s| s.as_str()).collect();
        query.insert("state", doc! { "$in": states });
    }
    let mut id = Document::new();
    if let Some(since) = filter.since_id() {
        id.insert("$gte", since);
    }
    if let Some(before) = &filter.before {
        id.insert("$lt", before.to_string());
    }
    if !id.is_empty() {
        query.insert("_id", id);
    }
    let limit = limit.min(i64::MAX as usize) as i64;
    find_states(s, query, doc! { "_id": -1 }, Some(limit), "listing tasks").await
}

pub(super) async fn count_tasks(s: &MongoStore) -> Result<Vec<(TaskState, u64)>, StoreError> {
    s.ensure_ready().await?;
    let groups: Vec<Document> = s
        .tasks()
        .aggregate([doc! { "$group": { "_id": "$state", "n": { "$sum": 1 } } }, doc! { "$sort": { "_id": 1 } }])
        .await
        .map_err(|e| classify(e, "counting tasks"))?
        .try_collect()
        .await
        .map_err(|e| classify(e, "counting tasks"))?;
    groups
        .iter()
        .map(|g| {
            let state = g.get_str("_id").map_err(|_| StoreError::Other(anyhow::anyhow!("a task without a state")))?;
            let state: TaskState = bson::from_bson(Bson::String(state.to_owned()))
                .map_err(|_| StoreError::Other(anyhow::anyhow!("corrupt task state `{state}`")))?;
            let n = match g.get("n") {
                Some(Bson::Int32(n)) => *n as u64,
                Some(Bson::Int64(n)) => *n as u64,
                Some(Bson::Double(n)) => *n as u64,
                _ => 0,
            };
            Ok((state, n))
        })
        .collect()
}

//! Tasks' kept outputs in GridFS (bucket `fs`), laid out as the GridFS spec says, so
//! any GridFS client reads them: `tasks/<id>/outputs/<path>` with metadata `sha256`,
//! `version`, `uploaded_by`, `uploaded_at` (as DESIGN.md asks of every file), and
//! `task`, `path`, `modified`. A file being written is named
//! `tasks/<id>/outputs.partial/<path>` with length 0 until its chunks are all in; its
//! rename is the commit point, so no reader ever sees a short file, and what a crash
//! leaves half-written is found by name and removed with the task's other files.

use futures::{StreamExt as _, TryStreamExt as _};
use mongodb::bson::{Binary, Bson, Document, doc, oid::ObjectId, spec::BinarySubtype};
use time::OffsetDateTime;

use super::{MongoStore, classify, from_bson_time, to_bson_time};
use crate::model::archive::ArchivedFile;
use crate::model::{TaskId, UserName};
use crate::store::{ARCHIVE_CHUNK, ArchiveStream, StoreError, archived_name, chunk_span, in_order};

/// The name of a file still being written.
fn partial_name(task: &TaskId, path: &str) -> String {
    format!("tasks/{task}/outputs.partial/{path}")
}

fn bad_handle(handle: &str) -> StoreError {
    StoreError::Other(anyhow::anyhow!("`{handle}` is not a handle of an archived file being written"))
}

pub(super) async fn begin(s: &MongoStore, task: &TaskId, path: &str, at: OffsetDateTime) -> Result<String, StoreError> {
    let id = ObjectId::new();
    s.files()
        .insert_one(doc! {
            "_id": id,
            "length": 0_i64,
            "chunkSize": ARCHIVE_CHUNK as i32,
            "uploadDate": to_bson_time(at),
            "filename": partial_name(task, path),
            "metadata": { "task": task.to_string(), "path": path },
        })
        .await
        .map_err(|e| classify(e, "starting an archived file"))?;
    Ok(id.to_hex())
}

pub(super) async fn chunk(s: &MongoStore, handle: &str, n: u32, data: Vec<u8>) -> Result<(), StoreError> {
    let id = ObjectId::parse_str(handle).map_err(|_| bad_handle(handle))?;
    s.chunks()
        .insert_one(doc! {
            "_id": ObjectId::new(),
            "files_id": id,
            "n": n as i32,
            "data": Binary { subtype: BinarySubtype::Generic, bytes: data },
        })
        .await
        .map_err(|e| classify(e, "writing a chunk of an archived file"))?;
    Ok(())
}

pub(super) async fn finish(
    s: &MongoStore,
    handle: &str,
    task: &TaskId,
    file: &ArchivedFile,
    owner: &UserName,
    at: OffsetDateTime,
) -> Result<(), StoreError> {
    let id = ObjectId::parse_str(handle).map_err(|_| bad_handle(handle))?;
    let done = s
        .files()
        .update_one(
            doc! { "_id": id, "filename": partial_name(task, &file.path) },
            doc! { "$set": {
                "filename": archived_name(task, &file.path),
                "length": file.size as i64,
                "uploadDate": to_bson_time(at),
                "metadata": {
                    "sha256": &file.sha256,
                    "version": 1_i64,
                    "uploaded_by": owner.as_str(),
                    "uploaded_at": to_bson_time(at),
                    "task": task.to_string(),
                    "path": &file.path,
                    "modified": to_bson_time(file.modified),
                },
            } },
        )
        .await
        .map_err(|e| classify(e, "finishing an archived file"))?;
    if done.matched_count == 1 {
        Ok(())
    } else {
        Err(StoreError::Conflict(format!(
            "the archived file {} of task {task} was removed while it was written",
            file.path
        )))
    }
}

/// Every file of the task's archive, finished or not: `tasks/<id>/outputs/...` and
/// `tasks/<id>/outputs.partial/...` both sort between the two bounds.
fn all_of(task: &TaskId) -> Document {
    doc! { "filename": { "$gte": format!("tasks/{task}/outputs"), "$lt": format!("tasks/{task}/outputt") } }
}

pub(super) async fn drop_all(s: &MongoStore, task: &TaskId) -> Result<u64, StoreError> {
    let ids: Vec<Bson> = s
        .files()
        .find(all_of(task))
        .projection(doc! { "_id": 1 })
        .await
        .map_err(|e| classify(e, "finding a task's archived files"))?
        .try_collect::<Vec<Document>>()
        .await
        .map_err(|e| classify(e, "finding a task's archived files"))?
        .iter()
        .filter_map(|d| d.get_object_id("_id").ok().map(Bson::ObjectId))
        .collect();
    if ids.is_empty() {
        return Ok(0);
    }
    // Chunks first: a crash between leaves files without chunks, found again by name.
    s.chunks()
        .delete_many(doc! { "files_id": { "$in": &ids } })
        .await
        .map_err(|e| classify(e, "removing a task's archived chunks"))?;
    s.files()
        .delete_many(doc! { "_id": { "$in": &ids } })
        .await
        .map_err(|e| classify(e, "removing a task's archived files"))?;
    Ok(ids.len() as u64)
}

fn file_of(d: &Document) -> Option<ArchivedFile> {
    let meta = d.get_document("metadata").ok()?;
    Some(ArchivedFile {
        path: meta.get_str("path").ok()?.to_owned(),
        size: d.get_i64("length").ok().or_else(|| d.get_i32("length").ok().map(i64::from))? as u64,
        sha256: meta.get_str("sha256").ok()?.to_owned(),
        modified: from_bson_time(*meta.get_datetime("modified").ok()?),
    })
}

pub(super) async fn list(s: &MongoStore, task: &TaskId) -> Result<Vec<ArchivedFile>, StoreError> {
    let prefix = archived_name(task, "");
    // `/` + 1 is `0`: every name under the prefix sorts below prefix-without-slash + `0`.
    let upper = format!("{}0", prefix.trim_end_matches('/'));
    let docs: Vec<Document> = s
        .files()
        .find(doc! { "filename": { "$gte": &prefix, "$lt": upper } })
        .sort(doc! { "filename": 1 })
        .await
        .map_err(|e| classify(e, "listing a task's archived files"))?
        .try_collect()
        .await
        .map_err(|e| classify(e, "listing a task's archived files"))?;
    Ok(docs.iter().filter_map(file_of).collect())
}

pub(super) async fn file(s: &MongoStore, task: &TaskId, path: &str) -> Result<Option<ArchivedFile>, StoreError> {
    let found = s
        .files()
        .find_one(doc! { "filename": archived_name(task, path) })
        .await
        .map_err(|e| classify(e, "finding an archived file"))?;
    Ok(found.as_ref().and_then(file_of))
}

pub(super) async fn read(
    s: &MongoStore,
    task: &TaskId,
    path: &str,
    first: u64,
    last: u64,
) -> Result<Option<(ArchivedFile, ArchiveStream)>, StoreError> {
    let Some(d) = s
        .files()
        .find_one(doc! { "filename": archived_name(task, path) })
        .await
        .map_err(|e| classify(e, "finding an archived file"))?
    else {
        return Ok(None);
    };
    let Some(file) = file_of(&d) else { return Ok(None) };
    let id = d.get_object_id("_id").map_err(|e| StoreError::Other(e.into()))?;
    if file.size == 0 || first > last || last >= file.size {
        return Ok(Some((file, futures::stream::empty().boxed())));
    }
    let span = chunk_span(first, last);
    let cursor = s
        .chunks()
        .find(doc! { "files_id": id, "n": { "$gte": span.0 as i32, "$lte": span.1 as i32 } })
        .sort(doc! { "n": 1 })
        .await
        .map_err(|e| classify(e, "reading an archived file"))?;
    let chunks = cursor.map(|d| {
        let d = d.map_err(|e| classify(e, "reading an archived file"))?;
        let n = d.get_i32("n").map_err(|e| StoreError::Other(e.into()))? as u32;
        match d.get("data") {
            Some(Bson::Binary(b)) => Ok((n, b.bytes.clone())),
            _ => Err(StoreError::Other(anyhow::anyhow!("chunk {n} of an archived file has no data"))),
        }
    });
    let stream = in_order(chunks, span);
    Ok(Some((file, stream)))
}

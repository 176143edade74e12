//! Tasks' kept outputs in SQLite: one row per file in `archive_files` (`done` once
//! its chunks are all in: the commit point), its chunks in `archive_chunks`, cut as
//! GridFS cuts them. An unfinished file is in no listing and cannot be read; what a
//! crash leaves half-written goes with the task's other files.

use futures::StreamExt as _;
use rusqlite::{OptionalExtension as _, params};
use time::OffsetDateTime;

use super::{EmbeddedStore, parse_ts, sql_err, ts};
use crate::model::archive::ArchivedFile;
use crate::model::{TaskId, UserName};
use crate::store::{ArchiveStream, StoreError, chunk_span, in_order};

fn bad_handle(handle: &str) -> StoreError {
    StoreError::Other(anyhow::anyhow!("`{handle}` is not a handle of an archived file being written"))
}

pub(super) async fn begin(
    s: &EmbeddedStore,
    task: &TaskId,
    path: &str,
    at: OffsetDateTime,
) -> Result<String, StoreError> {
    let (task, path) = (task.to_string(), path.to_owned());
    s.with_conn(move |c| {
        c.execute(
            "INSERT INTO archive_files (task, path, done, size, sha256, modified, meta, at) \
             VALUES (?1, ?2, 0, 0, '', '', '{}', ?3)",
            params![task, path, ts(at)],
        )
        .map_err(sql_err)?;
        Ok(c.last_insert_rowid().to_string())
    })
    .await
}

pub(super) async fn chunk(s: &EmbeddedStore, handle: &str, n: u32, data: Vec<u8>) -> Result<(), StoreError> {
    let id: i64 = handle.parse().map_err(|_| bad_handle(handle))?;
    s.with_conn(move |c| {
        c.execute("INSERT OR REPLACE INTO archive_chunks (file, n, data) VALUES (?1, ?2, ?3)", params![id, n, data])
            .map_err(sql_err)?;
        Ok(())
    })
    .await
}

pub(super) async fn finish(
    s: &EmbeddedStore,
    handle: &str,
    task: &TaskId,
    file: &ArchivedFile,
    owner: &UserName,
    at: OffsetDateTime,
) -> Result<(), StoreError> {
    let id: i64 = handle.parse().map_err(|_| bad_handle(handle))?;
    let (task, file) = (task.to_string(), file.clone());
    let meta = serde_json::json!({ "version": 1, "uploaded_by": owner.as_str(), "uploaded_at": ts(at) }).to_string();
    s.with_conn(move |c| {
        let tx = c.transaction().map_err(sql_err)?;
        // A file kept earlier under the same name gives way to this one.
        tx.execute(
            "DELETE FROM archive_chunks WHERE file IN \
             (SELECT id FROM archive_files WHERE task = ?1 AND path = ?2 AND done = 1)",
            params![task, file.path],
        )
        .map_err(sql_err)?;
        tx.execute("DELETE FROM archive_files WHERE task = ?1 AND path = ?2 AND done = 1", params![task, file.path])
            .map_err(sql_err)?;
        let n = tx
            .execute(
                "UPDATE archive_files SET done = 1, size = ?3, sha256 = ?4, modified = ?5, meta = ?6, at = ?7 \
                 WHERE id = ?1 AND task = ?2 AND done = 0",
                params![id, task, file.size as i64, file.sha256, ts(file.modified), meta, ts(at)],
            )
            .map_err(sql_err)?;
        if n != 1 {
            return Err(StoreError::Conflict(format!(
                "the archived file {} of task {task} was removed while it was written",
                file.path
            )));
        }
        tx.commit().map_err(sql_err)
    })
    .await
}

pub(super) async fn drop_all(s: &EmbeddedStore, task: &TaskId) -> Result<u64, StoreError> {
    let task = task.to_string();
    s.with_conn(move |c| {
        let tx = c.transaction().map_err(sql_err)?;
        tx.execute("DELETE FROM archive_chunks WHERE file IN (SELECT id FROM archive_files WHERE task = ?1)", [&task])
            .map_err(sql_err)?;
        let n = tx.execute("DELETE FROM archive_files WHERE task = ?1", [&task]).map_err(sql_err)?;
        tx.commit().map_err(sql_err)?;
        Ok(n as u64)
    })
    .await
}

fn file_of(path: String, size: i64, sha256: String, modified: String) -> Result<ArchivedFile, StoreError> {
    Ok(ArchivedFile { path, size: size as u64, sha256, modified: parse_ts(&modified)? })
}

pub(super) async fn list(s: &EmbeddedStore, task: &TaskId) -> Result<Vec<ArchivedFile>, StoreError> {
    let task = task.to_string();
    s.with_conn(move |c| {
        let mut q = c
            .prepare(
                "SELECT path, size, sha256, modified FROM archive_files WHERE task = ?1 AND done = 1 ORDER BY path",
            )
            .map_err(sql_err)?;
        let rows = q
            .query_map([&task], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
            .map_err(sql_err)?
            .collect::<Result<Vec<(String, i64, String, String)>, _>>()
            .map_err(sql_err)?;
        rows.into_iter().map(|(p, n, h, m)| file_of(p, n, h, m)).collect()
    })
    .await
}

pub(super) async fn file(s: &EmbeddedStore, task: &TaskId, path: &str) -> Result<Option<ArchivedFile>, StoreError> {
    let (task, path) = (task.to_string(), path.to_owned());
    let found = s
        .with_conn(move |c| {
            c.query_row(
                "SELECT path, size, sha256, modified FROM archive_files WHERE task = ?1 AND path = ?2 AND done = 1",
                params![task, path],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
            )
            .optional()
            .map_err(sql_err)
        })
        .await?;
    found.map(|(p, n, h, m)| file_of(p, n, h, m)).transpose()
}

pub(super) async fn read(
    s: &EmbeddedStore,
    task: &TaskId,
    path: &str,
    first: u64,
    last: u64,
) -> Result<Option<(ArchivedFile, ArchiveStream)>, StoreError> {
    let (task, path) = (task.to_string(), path.to_owned());
    let found = s
        .with_conn(move |c| {
            c.query_row(
                "SELECT id, path, size, sha256, modified FROM archive_files WHERE task = ?1 AND path = ?2 AND done = 1",
                params![task, path],
                |r| Ok((r.get::<_, i64>(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?)),
            )
            .optional()
            .map_err(sql_err)
        })
        .await?;
    let Some((id, path, size, sha, modified)) = found else { return Ok(None) };
    let file = file_of(path, size, sha, modified)?;
    if file.size == 0 || first > last || last >= file.size {
        return Ok(Some((file, futures::stream::empty().boxed())));
    }
    let span = chunk_span(first, last);
    let store = s.clone();
    // One chunk per read: the store's connection is never held for a whole download.
    let chunks = futures::stream::unfold(span.0, move |n| {
        let store = store.clone();
        async move {
            if n > span.1 {
                return None;
            }
            let got = store
                .with_conn(move |c| {
                    c.query_row("SELECT data FROM archive_chunks WHERE file = ?1 AND n = ?2", params![id, n], |r| {
                        r.get::<_, Vec<u8>>(0)
                    })
                    .optional()
                    .map_err(sql_err)
                })
                .await;
            match got {
                Ok(Some(data)) => Some((Ok((n, data)), n + 1)),
                // Missing: `in_order` says so and ends the stream.
                Ok(None) => None,
                Err(e) => Some((Err(e), span.1 + 1)),
            }
        }
    });
    Ok(Some((file, in_order(chunks, span))))
}

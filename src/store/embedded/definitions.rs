//! Definitions in the embedded store: revision rows, their blobs, and tasks' forged
//! scripts (blobs named `tasks/<task-id>/script_<phase>`).

use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};
use time::OffsetDateTime;

use super::{EmbeddedStore, conflict_or_sql, kind_str, parse_ts, sql_err, ts, verify_sha};
use crate::definitions::{CheckedUpload, DefinitionKind};
use crate::model::task::task_script_name;
use crate::model::{Forged, Phase, StoredTaskScript, TaskId, UserName};
use crate::store::{FileMeta, Revision, StoreError, StoredFile, TaskScriptMeta};

/// Columns of `revisions` in the order [`row_to_revision`] reads them.
const REV_COLS: &str = "kind, name, version, deleted, definition, files, uploaded_by, uploaded_at";

fn row_to_revision(row: &rusqlite::Row<'_>) -> rusqlite::Result<RawRevision> {
    Ok(RawRevision {
        kind: row.get(0)?,
        name: row.get(1)?,
        version: row.get(2)?,
        deleted: row.get(3)?,
        definition: row.get(4)?,
        files: row.get(5)?,
        uploaded_by: row.get(6)?,
        uploaded_at: row.get(7)?,
    })
}

/// A revision row before its JSON columns are decoded.
struct RawRevision {
    kind: String,
    name: String,
    version: u32,
    deleted: bool,
    definition: Option<String>,
    files: String,
    uploaded_by: String,
    uploaded_at: String,
}

impl RawRevision {
    fn decode(self) -> Result<Revision, StoreError> {
        let corrupt = |what: &str, e: &dyn std::fmt::Display| {
            StoreError::Other(anyhow::anyhow!("corrupt {what} in revision {}@{}: {e}", self.name, self.version))
        };
        let kind = match self.kind.as_str() {
            "application" => DefinitionKind::Application,
            "cluster" => DefinitionKind::Cluster,
            other => return Err(corrupt("kind", &other)),
        };
        let definition = match &self.definition {
            Some(text) => Some(serde_json::from_str(text).map_err(|e| corrupt("definition", &e))?),
            None => None,
        };
        let files: Vec<FileMeta> = serde_json::from_str(&self.files).map_err(|e| corrupt("files", &e))?;
        let uploaded_by = UserName::parse(&self.uploaded_by).map_err(|e| corrupt("uploaded_by", &e))?;
        Ok(Revision {
            kind,
            name: self.name,
            version: self.version,
            deleted: self.deleted,
            definition,
            files,
            uploaded_by,
            uploaded_at: parse_ts(&self.uploaded_at)?,
        })
    }
}

pub(super) fn latest_in(conn: &Connection, kind: DefinitionKind, name: &str) -> Result<Option<Revision>, StoreError> {
    conn.query_row(
        &format!("SELECT {REV_COLS} FROM revisions WHERE kind = ?1 AND name = ?2 ORDER BY version DESC LIMIT 1"),
        params![kind_str(kind), name],
        row_to_revision,
    )
    .optional()
    .map_err(sql_err)?
    .map(RawRevision::decode)
    .transpose()
}

fn insert_revision_row(conn: &Connection, rev: &Revision) -> Result<(), StoreError> {
    let definition = rev.definition.as_ref().map(|d| d.to_string());
    let files = serde_json::to_string(&rev.files).map_err(|e| StoreError::Other(e.into()))?;
    conn.execute(
        &format!("INSERT INTO revisions ({REV_COLS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)"),
        params![
            kind_str(rev.kind),
            rev.name,
            rev.version,
            rev.deleted,
            definition,
            files,
            rev.uploaded_by.as_str(),
            ts(rev.uploaded_at)
        ],
    )
    .map_err(conflict_or_sql)?;
    Ok(())
}

/// [`crate::store::Store::insert_revision`]: the blobs and the revision row in one
/// transaction; a version taken (or a blob name twice) is a `Conflict`.
pub(super) async fn insert_revision(
    s: &EmbeddedStore,
    rev: &Revision,
    upload: Option<&CheckedUpload>,
) -> Result<(), StoreError> {
    let rev = rev.clone();
    let upload = upload.cloned();
    s.with_conn(move |conn| {
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(sql_err)?;
        if let Some(upload) = &upload {
            let mut stmt = tx
                .prepare(
                    "INSERT INTO blobs (filename, version, sha256, size, uploaded_by, uploaded_at, content) \
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                )
                .map_err(sql_err)?;
            for (meta, file) in rev.files.iter().zip(&upload.files) {
                stmt.execute(params![
                    meta.filename,
                    rev.version,
                    meta.sha256,
                    meta.size as i64,
                    rev.uploaded_by.as_str(),
                    ts(rev.uploaded_at),
                    file.text.as_bytes()
                ])
                .map_err(conflict_or_sql)?;
            }
        }
        insert_revision_row(&tx, &rev)?;
        tx.commit().map_err(sql_err)?;
        Ok(())
    })
    .await
}

pub(super) async fn latest_revision(
    s: &EmbeddedStore,
    kind: DefinitionKind,
    name: &str,
) -> Result<Option<Revision>, StoreError> {
    let name = name.to_owned();
    s.with_conn(move |c| latest_in(c, kind, &name)).await
}

pub(super) async fn revision(
    s: &EmbeddedStore,
    kind: DefinitionKind,
    name: &str,
    version: u32,
) -> Result<Option<Revision>, StoreError> {
    let name = name.to_owned();
    s.with_conn(move |c| {
        c.query_row(
            &format!("SELECT {REV_COLS} FROM revisions WHERE kind = ?1 AND name = ?2 AND version = ?3"),
            params![kind_str(kind), name, version],
            row_to_revision,
        )
        .optional()
        .map_err(sql_err)?
        .map(RawRevision::decode)
        .transpose()
    })
    .await
}

pub(super) async fn history(s: &EmbeddedStore, kind: DefinitionKind, name: &str) -> Result<Vec<Revision>, StoreError> {
    let name = name.to_owned();
    s.with_conn(move |c| {
        let mut stmt = c
            .prepare(&format!("SELECT {REV_COLS} FROM revisions WHERE kind = ?1 AND name = ?2 ORDER BY version"))
            .map_err(sql_err)?;
        let rows = stmt.query_map(params![kind_str(kind), name], row_to_revision).map_err(sql_err)?;
        rows.map(|r| r.map_err(sql_err).and_then(RawRevision::decode)).collect()
    })
    .await
}

pub(super) async fn list_current(s: &EmbeddedStore, kind: DefinitionKind) -> Result<Vec<Revision>, StoreError> {
    s.with_conn(move |c| {
        let mut stmt = c
            .prepare(&format!(
                "SELECT {REV_COLS} FROM revisions r WHERE kind = ?1 AND deleted = 0 AND version = \
                 (SELECT MAX(version) FROM revisions m WHERE m.kind = r.kind AND m.name = r.name) ORDER BY name"
            ))
            .map_err(sql_err)?;
        let rows = stmt.query_map(params![kind_str(kind)], row_to_revision).map_err(sql_err)?;
        rows.map(|r| r.map_err(sql_err).and_then(RawRevision::decode)).collect()
    })
    .await
}

pub(super) async fn read_file(
    s: &EmbeddedStore,
    kind: DefinitionKind,
    name: &str,
    version: u32,
    path: &str,
) -> Result<Option<StoredFile>, StoreError> {
    let filename = kind.blob_name(name, path);
    let path = path.to_owned();
    s.with_conn(move |c| {
        let row = c
            .query_row(
                "SELECT sha256, size, uploaded_by, uploaded_at, content FROM blobs WHERE filename = ?1 AND version = ?2",
                params![filename, version],
                |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        r.get::<_, i64>(1)?,
                        r.get::<_, String>(2)?,
                        r.get::<_, String>(3)?,
                        r.get::<_, Vec<u8>>(4)?,
                    ))
                },
            )
            .optional()
            .map_err(sql_err)?;
        let Some((sha256, size, by, at, content)) = row else { return Ok(None) };
        let text = String::from_utf8(content)
            .map_err(|_| StoreError::Other(anyhow::anyhow!("blob {filename} v{version} is not UTF-8")))?;
        verify_sha(&filename, version, &sha256, &text)?;
        Ok(Some(StoredFile {
            meta: FileMeta { path, filename, sha256, size: size as u64, version },
            uploaded_by: UserName::parse(&by).map_err(|e| StoreError::Other(e.into()))?,
            uploaded_at: parse_ts(&at)?,
            text,
        }))
    })
    .await
}

pub(super) async fn put_task_scripts(
    s: &EmbeddedStore,
    task: &TaskId,
    owner: &UserName,
    forged: &Forged,
    at: OffsetDateTime,
) -> Result<u32, StoreError> {
    let (task, owner, forged) = (*task, owner.clone(), forged.clone());
    s.with_conn(move |conn| {
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(sql_err)?;
        let mut version = 1;
        for script in &forged.scripts {
            let name = task_script_name(&task, script.phase);
            let v: Option<u32> = tx
                .query_row("SELECT MAX(version) FROM blobs WHERE filename = ?1", params![name], |r| r.get(0))
                .map_err(sql_err)?;
            version = version.max(v.map_or(1, |v| v + 1));
        }
        insert_task_scripts(&tx, &task, &owner, &forged, version, at)?;
        tx.commit().map_err(sql_err)?;
        Ok(version)
    })
    .await
}

/// Writes the forged scripts of `task` as `version` (inside the caller's transaction).
pub(super) fn insert_task_scripts(
    tx: &Connection,
    task: &TaskId,
    owner: &UserName,
    forged: &Forged,
    version: u32,
    at: OffsetDateTime,
) -> Result<(), StoreError> {
    for script in &forged.scripts {
        let name = task_script_name(task, script.phase);
        let meta = TaskScriptMeta {
            task: *task,
            phase: script.phase,
            application: forged.application.clone(),
            cluster: forged.cluster.clone(),
        };
        let meta = serde_json::to_string(&meta).map_err(|e| StoreError::Other(e.into()))?;
        tx.execute(
            "INSERT INTO blobs (filename, version, sha256, size, uploaded_by, uploaded_at, content, meta) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            params![
                name,
                version,
                script.sha256,
                script.text.len() as i64,
                owner.as_str(),
                ts(at),
                script.text.as_bytes(),
                meta
            ],
        )
        .map_err(conflict_or_sql)?;
    }
    Ok(())
}

pub(super) async fn read_task_script(
    s: &EmbeddedStore,
    task: &TaskId,
    phase: Phase,
    version: Option<u32>,
) -> Result<Option<StoredTaskScript>, StoreError> {
    let name = task_script_name(task, phase);
    s.with_conn(move |c| {
        let row = c
            .query_row(
                "SELECT version, sha256, uploaded_by, uploaded_at, content, meta FROM blobs \
                 WHERE filename = ?1 AND (?2 IS NULL OR version = ?2) ORDER BY version DESC LIMIT 1",
                params![name, version],
                |r| {
                    Ok((
                        r.get::<_, u32>(0)?,
                        r.get::<_, String>(1)?,
                        r.get::<_, String>(2)?,
                        r.get::<_, String>(3)?,
                        r.get::<_, Vec<u8>>(4)?,
                        r.get::<_, Option<String>>(5)?,
                    ))
                },
            )
            .optional()
            .map_err(sql_err)?;
        let Some((version, sha256, owner, at, content, meta)) = row else { return Ok(None) };
        let corrupt = |what: &str| StoreError::Other(anyhow::anyhow!("task script {name} v{version}: {what}"));
        let text = String::from_utf8(content).map_err(|_| corrupt("not UTF-8"))?;
        verify_sha(&name, version, &sha256, &text)?;
        let meta: TaskScriptMeta =
            serde_json::from_str(meta.as_deref().unwrap_or("null")).map_err(|_| corrupt("missing metadata"))?;
        Ok(Some(StoredTaskScript {
            task: meta.task,
            phase: meta.phase,
            version,
            text,
            sha256,
            application: meta.application,
            cluster: meta.cluster,
            owner: UserName::parse(&owner).map_err(|_| corrupt("bad owner"))?,
            stored_at: parse_ts(&at)?,
        }))
    })
    .await
}

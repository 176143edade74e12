//! Definitions in MongoDB: revision documents in `applications` and `clusters`, their
//! scripts and tasks' forged scripts in GridFS (bucket `fs`), written as the GridFS
//! spec lays them out but by this module, so that blobs and the revision that owns
//! them go in one transaction (the driver's upload stream takes no session). Without
//! transactions the revision document is the commit point: blobs first, removed again
//! if the revision cannot be written.

use anyhow::Context as _;
use futures::{AsyncReadExt as _, TryStreamExt as _};
use mongodb::ClientSession;
use mongodb::bson::{self, Binary, Bson, DateTime as BsonDateTime, Document, doc, oid::ObjectId, spec::BinarySubtype};
use mongodb::error::{Error as MongoError, TRANSIENT_TRANSACTION_ERROR, UNKNOWN_TRANSACTION_COMMIT_RESULT};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use super::{MongoStore, classify, from_bson_time, is_duplicate_key, to_bson_time};
use crate::definitions::{CheckedUpload, DefinitionKind};
use crate::model::task::task_script_name;
use crate::model::{AppName, ClusterName, DefinitionRef, Forged, Phase, StoredTaskScript, TaskId, UserName};
use crate::store::{FileMeta, Revision, StoreError, StoredFile, to_millis};

/// GridFS chunk size (the spec's default).
const CHUNK_SIZE: usize = 255 * 1024;

/// How many times a write hit by a transient transaction error, or a task-script
/// write that lost the race for its version, is tried.
const WRITE_ATTEMPTS: usize = 16;

/// Runs a driver action with the session when there is one.
macro_rules! with_session {
    ($action:expr, $session:expr) => {
        match $session.as_deref_mut() {
            Some(s) => $action.session(s).await,
            None => $action.await,
        }
    };
}

/// A revision as stored in MongoDB.
#[derive(Debug, Serialize, Deserialize)]
struct RevisionDoc {
    /// `<name>@<version>`: one document per revision, and a second guard against
    /// duplicate versions besides the unique index.
    #[serde(rename = "_id")]
    id: String,
    name: String,
    version: u32,
    deleted: bool,
    definition: Option<Document>,
    /// Stored as is: sizes and versions fit BSON's Int64.
    files: Vec<FileMeta>,
    uploaded_by: String,
    uploaded_at: BsonDateTime,
}

impl RevisionDoc {
    fn from_revision(rev: &Revision) -> Result<Self, StoreError> {
        let definition = rev
            .definition
            .as_ref()
            .map(|d| bson::to_document(d).context("converting the definition to BSON"))
            .transpose()?;
        Ok(Self {
            id: format!("{}@{}", rev.name, rev.version),
            name: rev.name.clone(),
            version: rev.version,
            deleted: rev.deleted,
            definition,
            files: rev.files.clone(),
            uploaded_by: rev.uploaded_by.to_string(),
            uploaded_at: to_bson_time(rev.uploaded_at),
        })
    }

    fn into_revision(self, kind: DefinitionKind) -> Result<Revision, StoreError> {
        let corrupt = |what: &str, e: &dyn std::fmt::Display| {
            StoreError::Other(anyhow::anyhow!("corrupt {what} in revision {}: {e}", self.id))
        };
        let definition = match &self.definition {
            Some(d) => {
                Some(bson::from_document::<serde_json::Value>(d.clone()).map_err(|e| corrupt("definition", &e))?)
            }
            None => None,
        };
        let uploaded_by = UserName::parse(&self.uploaded_by).map_err(|e| corrupt("uploaded_by", &e))?;
        Ok(Revision {
            kind,
            name: self.name,
            version: self.version,
            deleted: self.deleted,
            definition,
            files: self.files,
            uploaded_by,
            uploaded_at: from_bson_time(self.uploaded_at),
        })
    }
}

/// One GridFS file to write.
pub(super) struct NewBlob<'a> {
    filename: &'a str,
    text: &'a str,
    /// `metadata` of the `fs.files` document (sha256, version, uploaded_by, ...).
    metadata: Document,
}

fn revisions(s: &MongoStore, kind: DefinitionKind) -> mongodb::Collection<RevisionDoc> {
    s.db.collection(kind.plural())
}

async fn latest_doc(s: &MongoStore, kind: DefinitionKind, name: &str) -> Result<Option<RevisionDoc>, MongoError> {
    revisions(s, kind).find_one(doc! { "name": name }).sort(doc! { "version": -1 }).await
}

/// Writes GridFS files (chunks, then file documents), noting their IDs in `written`
/// so a failed write without a transaction can remove them.
async fn insert_blobs(
    s: &MongoStore,
    blobs: &[NewBlob<'_>],
    at: OffsetDateTime,
    session: &mut Option<&mut ClientSession>,
    written: &mut Vec<ObjectId>,
) -> Result<(), MongoError> {
    let upload_date = to_bson_time(at);
    let mut chunk_docs = Vec::new();
    let mut file_docs = Vec::new();
    for blob in blobs {
        let id = ObjectId::new();
        written.push(id);
        for (n, chunk) in blob.text.as_bytes().chunks(CHUNK_SIZE).enumerate() {
            chunk_docs.push(doc! {
                "_id": ObjectId::new(),
                "files_id": id,
                "n": n as i32,
                "data": Binary { subtype: BinarySubtype::Generic, bytes: chunk.to_vec() },
            });
        }
        file_docs.push(doc! {
            "_id": id,
            "length": blob.text.len() as i64,
            "chunkSize": CHUNK_SIZE as i32,
            "uploadDate": upload_date,
            "filename": blob.filename,
            "metadata": blob.metadata.clone(),
        });
    }
    // Chunks before files: without a transaction, a crash leaves at worst chunks no
    // file document points at, never a file that reads back short.
    let (chunks, files) = (s.chunks(), s.files());
    if !chunk_docs.is_empty() {
        with_session!(chunks.insert_many(chunk_docs), session)?;
    }
    if !file_docs.is_empty() {
        with_session!(files.insert_many(file_docs), session)?;
    }
    Ok(())
}

/// Removes blobs of a write that did not commit.
pub(super) async fn remove_blobs(s: &MongoStore, ids: &[ObjectId]) {
    if ids.is_empty() {
        return;
    }
    let ids: Vec<Bson> = ids.iter().map(|i| Bson::ObjectId(*i)).collect();
    let chunks = s.chunks().delete_many(doc! { "files_id": { "$in": &ids } }).await;
    let files = s.files().delete_many(doc! { "_id": { "$in": &ids } }).await;
    if let Err(e) = chunks.and(files) {
        tracing::error!(error = %e, count = ids.len(), "could not remove the blobs of a failed write; they are unreferenced and invisible through the API");
    }
}

/// Removes version `version` of a task's forged scripts (a task write that failed
/// after its scripts were stored).
pub(super) async fn remove_task_scripts(s: &MongoStore, task: &TaskId, version: u32) {
    let names: Vec<String> = Phase::DEFAULT.iter().map(|p| task_script_name(task, *p)).collect();
    let found = s
        .files()
        .find(doc! { "filename": { "$in": &names }, "metadata.version": version as i64 })
        .projection(doc! { "_id": 1 })
        .await;
    let ids: Vec<ObjectId> = match found {
        Ok(cursor) => cursor
            .try_collect::<Vec<Document>>()
            .await
            .unwrap_or_default()
            .iter()
            .filter_map(|d| d.get_object_id("_id").ok())
            .collect(),
        Err(_) => Vec::new(),
    };
    remove_blobs(s, &ids).await;
}

/// Commits, retrying while the outcome is unknown (as the driver spec advises).
async fn commit(session: &mut ClientSession) -> Result<(), MongoError> {
    loop {
        match session.commit_transaction().await {
            Err(e) if e.contains_label(UNKNOWN_TRANSACTION_COMMIT_RESULT) => continue,
            other => return other,
        }
    }
}

/// A write [`atomically`] runs.
enum Write<'a> {
    /// A revision and the blobs of its upload.
    Revision { rev: &'a Revision, upload: Option<&'a CheckedUpload> },
    /// A task's forged scripts as `version`.
    Scripts { task: &'a TaskId, owner: &'a UserName, forged: &'a Forged, version: u32, at: OffsetDateTime },
}

/// One attempt at `write`; see [`atomically`].
async fn write_once(
    s: &MongoStore,
    write: &Write<'_>,
    session: &mut Option<&mut ClientSession>,
    written: &mut Vec<ObjectId>,
) -> Result<(), MongoError> {
    match *write {
        Write::Revision { rev, upload } => {
            if let Some(upload) = upload {
                let blobs: Vec<NewBlob<'_>> = rev
                    .files
                    .iter()
                    .zip(&upload.files)
                    .map(|(meta, file)| NewBlob {
                        filename: &meta.filename,
                        text: &file.text,
                        metadata: doc! {
                            "sha256": &meta.sha256,
                            "version": rev.version as i64,
                            "uploaded_by": rev.uploaded_by.as_str(),
                            "uploaded_at": to_bson_time(rev.uploaded_at),
                        },
                    })
                    .collect();
                insert_blobs(s, &blobs, rev.uploaded_at, session, written).await?;
            }
            let doc = RevisionDoc::from_revision(rev).map_err(|e| MongoError::custom(e.to_string()))?;
            let coll = revisions(s, rev.kind);
            with_session!(coll.insert_one(doc), session)?;
            Ok(())
        }
        Write::Scripts { task, owner, forged, version, at } => {
            let names: Vec<String> = forged.scripts.iter().map(|x| task_script_name(task, x.phase)).collect();
            let blobs: Vec<NewBlob<'_>> = forged
                .scripts
                .iter()
                .zip(&names)
                .map(|(script, name)| NewBlob {
                    filename: name,
                    text: &script.text,
                    metadata: doc! {
                        "sha256": &script.sha256,
                        "version": version as i64,
                        "uploaded_by": owner.as_str(),
                        "uploaded_at": to_bson_time(at),
                        "task": task.to_string(),
                        "phase": script.phase.as_str(),
                        "application": forged.application.name.as_str(),
                        "application_version": forged.application.version as i64,
                        "cluster": forged.cluster.name.as_str(),
                        "cluster_version": forged.cluster.version as i64,
                    },
                })
                .collect();
            insert_blobs(s, &blobs, at, session, written).await
        }
    }
}

/// Runs `write` all or nothing: in a transaction when the server has them (and
/// `txn` allows), else removing the blobs it wrote if it fails. Transient
/// transaction errors are tried again; a duplicate key is returned to the caller, who
/// knows what it means.
async fn atomically(
    s: &MongoStore,
    what: &str,
    write: &Write<'_>,
    txn: bool,
) -> Result<Result<(), MongoError>, StoreError> {
    let use_txn = s.ensure_ready().await? && txn;
    let mut last = None;
    for attempt in 0..WRITE_ATTEMPTS {
        let mut written = Vec::new();
        let outcome = if use_txn {
            let mut session = s.client.start_session().await.map_err(|e| classify(e, "starting a session"))?;
            session.start_transaction().await.map_err(|e| classify(e, "starting a transaction"))?;
            match write_once(s, write, &mut Some(&mut session), &mut written).await {
                Ok(()) => commit(&mut session).await,
                Err(e) => {
                    let _ = session.abort_transaction().await;
                    Err(e)
                }
            }
        } else {
            let r = write_once(s, write, &mut None, &mut written).await;
            if r.is_err() {
                remove_blobs(s, &written).await;
            }
            r
        };
        match outcome {
            Err(e) if e.contains_label(TRANSIENT_TRANSACTION_ERROR) && !is_duplicate_key(&e) => {
                tracing::debug!(attempt, error = %e, what, "transient transaction error; retrying");
                last = Some(e);
                tokio::time::sleep(super::backoff(attempt)).await;
            }
            other => return Ok(other),
        }
    }
    Err(StoreError::Unavailable {
        backend: "mongodb",
        source: anyhow::anyhow!(
            "{what}: transactions keep failing ({})",
            last.map(|e| e.to_string()).unwrap_or_default()
        ),
    })
}

/// [`crate::store::Store::insert_revision`].
pub(super) async fn insert_revision(
    s: &MongoStore,
    rev: &Revision,
    upload: Option<&CheckedUpload>,
) -> Result<(), StoreError> {
    let what = format!("storing {} `{}` version {}", rev.kind.singular(), rev.name, rev.version);
    match atomically(s, &what, &Write::Revision { rev, upload }, true).await? {
        Ok(()) => Ok(()),
        Err(e) if is_duplicate_key(&e) => Err(StoreError::Conflict(format!("{what}: {e}"))),
        Err(e) => Err(classify(e, &what)),
    }
}

/// Stores a task's forged scripts as `version`. Without a transaction even where
/// the server has them: what makes them visible is the task that names their version,
/// written after them; on failure they are removed.
pub(super) async fn insert_task_scripts(
    s: &MongoStore,
    task: &TaskId,
    owner: &UserName,
    forged: &Forged,
    version: u32,
    at: OffsetDateTime,
) -> Result<Result<(), MongoError>, StoreError> {
    let what = format!("storing the scripts of task {task}");
    atomically(s, &what, &Write::Scripts { task, owner, forged, version, at: to_millis(at) }, false).await
}

pub(super) async fn put_task_scripts(
    s: &MongoStore,
    task: &TaskId,
    owner: &UserName,
    forged: &Forged,
    at: OffsetDateTime,
) -> Result<u32, StoreError> {
    s.ensure_ready().await?;
    let names: Vec<String> = forged.scripts.iter().map(|x| task_script_name(task, x.phase)).collect();
    for attempt in 0..WRITE_ATTEMPTS {
        // One query for the newest version of any of the task's scripts.
        let newest = s
            .files()
            .find_one(doc! { "filename": { "$in": &names } })
            .sort(doc! { "metadata.version": -1 })
            .await
            .map_err(|e| classify(e, "finding a task's scripts"))?;
        let version = newest
            .as_ref()
            .and_then(|d| d.get_document("metadata").ok())
            .and_then(|m| m.get_i64("version").ok())
            .map_or(1, |v| v as u32 + 1);
        match insert_task_scripts(s, task, owner, forged, version, at).await? {
            Ok(()) => return Ok(version),
            Err(e) if is_duplicate_key(&e) => {
                tracing::debug!(attempt, task = %task, "another forging took version {version}; trying the next");
                tokio::time::sleep(super::backoff(attempt)).await;
            }
            Err(e) => return Err(classify(e, &format!("storing the scripts of task {task}"))),
        }
    }
    Err(StoreError::Conflict(format!("the scripts of task {task} keep being stored by others; try again")))
}

pub(super) async fn latest_revision(
    s: &MongoStore,
    kind: DefinitionKind,
    name: &str,
) -> Result<Option<Revision>, StoreError> {
    s.ensure_ready().await?;
    latest_doc(s, kind, name)
        .await
        .map_err(|e| classify(e, "reading a revision"))?
        .map(|d| d.into_revision(kind))
        .transpose()
}

pub(super) async fn revision(
    s: &MongoStore,
    kind: DefinitionKind,
    name: &str,
    version: u32,
) -> Result<Option<Revision>, StoreError> {
    s.ensure_ready().await?;
    revisions(s, kind)
        .find_one(doc! { "name": name, "version": version as i64 })
        .await
        .map_err(|e| classify(e, "reading a revision"))?
        .map(|d| d.into_revision(kind))
        .transpose()
}

pub(super) async fn history(s: &MongoStore, kind: DefinitionKind, name: &str) -> Result<Vec<Revision>, StoreError> {
    s.ensure_ready().await?;
    let docs: Vec<RevisionDoc> = revisions(s, kind)
        .find(doc! { "name": name })
        .sort(doc! { "version": 1 })
        .await
        .map_err(|e| classify(e, "reading revisions"))?
        .try_collect()
        .await
        .map_err(|e| classify(e, "reading revisions"))?;
    docs.into_iter().map(|d| d.into_revision(kind)).collect()
}

pub(super) async fn list_current(s: &MongoStore, kind: DefinitionKind) -> Result<Vec<Revision>, StoreError> {
    s.ensure_ready().await?;
    let pipeline = vec![
        doc! { "$sort": { "name": 1, "version": -1 } },
        doc! { "$group": { "_id": "$name", "latest": { "$first": "$$ROOT" } } },
        doc! { "$replaceRoot": { "newRoot": "$latest" } },
        doc! { "$match": { "deleted": false } },
        doc! { "$sort": { "name": 1 } },
    ];
    let docs: Vec<Document> = revisions(s, kind)
        .aggregate(pipeline)
        .await
        .map_err(|e| classify(e, "listing definitions"))?
        .try_collect()
        .await
        .map_err(|e| classify(e, "listing definitions"))?;
    docs.into_iter()
        .map(|d| {
            let doc: RevisionDoc = bson::from_document(d).map_err(|e| StoreError::Other(e.into()))?;
            doc.into_revision(kind)
        })
        .collect()
}

pub(super) async fn read_file(
    s: &MongoStore,
    kind: DefinitionKind,
    name: &str,
    version: u32,
    path: &str,
) -> Result<Option<StoredFile>, StoreError> {
    // Only files a committed revision lists are visible: without transactions a
    // failed upload may briefly leave blobs behind, and they must not be readable.
    let Some(rev) = revision(s, kind, name, version).await? else { return Ok(None) };
    let Some(meta) = rev.files.into_iter().find(|f| f.path == path) else { return Ok(None) };
    let bucket = s.db.gridfs_bucket(None);
    let Some(file) = bucket
        .find_one(doc! { "filename": &meta.filename, "metadata.version": version as i64 })
        .await
        .map_err(|e| classify(e, "finding a GridFS file"))?
    else {
        return Err(StoreError::Other(anyhow::anyhow!(
            "revision {name}@{version} lists {} but GridFS has no such file",
            meta.filename
        )));
    };
    let metadata = file.metadata.clone().unwrap_or_default();
    let mut stream =
        bucket.open_download_stream(file.id.clone()).await.map_err(|e| classify(e, "opening a GridFS file"))?;
    let mut bytes = Vec::with_capacity(file.length as usize);
    stream.read_to_end(&mut bytes).await.map_err(|e| {
        StoreError::Other(anyhow::Error::new(e).context(format!("reading GridFS file {}", meta.filename)))
    })?;
    let text = String::from_utf8(bytes)
        .map_err(|_| StoreError::Other(anyhow::anyhow!("GridFS file {} is not UTF-8", meta.filename)))?;
    crate::store::verify_sha(&meta.filename, version, &meta.sha256, &text)?;
    let uploaded_by =
        metadata.get_str("uploaded_by").ok().and_then(|s| UserName::parse(s).ok()).ok_or_else(|| {
            StoreError::Other(anyhow::anyhow!("GridFS file {} has no valid uploaded_by", meta.filename))
        })?;
    Ok(Some(StoredFile { meta, uploaded_by, uploaded_at: from_bson_time(file.upload_date), text }))
}

pub(super) async fn read_task_script(
    s: &MongoStore,
    task: &TaskId,
    phase: Phase,
    version: Option<u32>,
) -> Result<Option<StoredTaskScript>, StoreError> {
    s.ensure_ready().await?;
    let name = task_script_name(task, phase);
    let bucket = s.db.gridfs_bucket(None);
    let mut filter = doc! { "filename": &name };
    if let Some(v) = version {
        filter.insert("metadata.version", v as i64);
    }
    let found = s
        .files()
        .find_one(filter)
        .sort(doc! { "metadata.version": -1 })
        .await
        .map_err(|e| classify(e, "finding a task script"))?;
    let Some(file) = found else { return Ok(None) };
    let id = file.get("_id").cloned().unwrap_or(Bson::Null);
    let meta = file.get_document("metadata").cloned().unwrap_or_default();
    let corrupt = |what: &str| StoreError::Other(anyhow::anyhow!("task script {name}: {what}"));
    let version = meta.get_i64("version").map_err(|_| corrupt("no version"))? as u32;
    let mut stream = bucket.open_download_stream(id).await.map_err(|e| classify(e, "opening a task script"))?;
    let mut bytes = Vec::new();
    stream
        .read_to_end(&mut bytes)
        .await
        .map_err(|e| StoreError::Other(anyhow::Error::new(e).context(format!("reading {name}"))))?;
    let text = String::from_utf8(bytes).map_err(|_| corrupt("not UTF-8"))?;
    let sha256 = meta.get_str("sha256").map_err(|_| corrupt("no sha256"))?.to_owned();
    crate::store::verify_sha(&name, version, &sha256, &text)?;
    let text_of = |k: &str| meta.get_str(k).map(str::to_owned).map_err(|_| corrupt(k));
    let num_of = |k: &str| meta.get_i64(k).map(|v| v as u32).map_err(|_| corrupt(k));
    let parse = |e: crate::model::NameError| corrupt(&e.to_string());
    Ok(Some(StoredTaskScript {
        task: *task,
        phase,
        version,
        text,
        sha256,
        application: DefinitionRef {
            name: AppName::parse(&text_of("application")?).map_err(parse)?,
            version: num_of("application_version")?,
        },
        cluster: DefinitionRef {
            name: ClusterName::parse(&text_of("cluster")?).map_err(parse)?,
            version: num_of("cluster_version")?,
        },
        owner: UserName::parse(&text_of("uploaded_by")?).map_err(parse)?,
        stored_at: from_bson_time(meta.get_datetime("uploaded_at").copied().map_err(|_| corrupt("no uploaded_at"))?),
    }))
}

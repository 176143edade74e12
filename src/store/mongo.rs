//! The MongoDB store: revisions in the `applications` and `clusters` collections,
//! scripts in GridFS (bucket `fs`) under the names in DESIGN.md, tasks in `tasks`.
//!
//! GridFS files are written as the GridFS spec lays them out (`fs.files` +
//! `fs.chunks`, 255 KiB chunks) but by this module rather than the driver's upload
//! stream, because the driver's GridFS API takes no session: writing the documents
//! ourselves puts blobs and the revision that owns them in **one transaction**. Reads go
//! through the driver's `GridFsBucket`, which proves the layout is standard.
//!
//! Transactions need a replica set (or a `mongos`). On a standalone server the store
//! writes blobs first and the revision record last (the commit point) and removes the
//! blobs again if the revision cannot be written.

use std::time::Duration;

use anyhow::Context as _;
use async_trait::async_trait;
use futures::{AsyncReadExt as _, TryStreamExt as _};
use mongodb::bson::{self, Binary, Bson, DateTime as BsonDateTime, Document, doc, oid::ObjectId, spec::BinarySubtype};
use mongodb::error::{
    Error as MongoError, ErrorKind, TRANSIENT_TRANSACTION_ERROR, UNKNOWN_TRANSACTION_COMMIT_RESULT, WriteFailure,
};
use mongodb::options::{ClientOptions, IndexOptions};
use mongodb::{Client, ClientSession, Collection, Database, IndexModel};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use tokio::sync::OnceCell;

use super::{
    CredentialInfo, FileMeta, Precondition, Revision, Store, StoreError, StoredCredential, StoredFile, TaskFilter,
    exists_message, file_metas, to_millis,
};
use crate::definitions::{CheckedUpload, DefinitionKind};
use crate::model::accounts::{Role, StoredToken, TokenId, TokenInfo, UserAccount};
use crate::model::task::task_script_name;
use crate::model::{
    AppName, ClusterName, DefinitionRef, Forged, Phase, StoredTaskScript, Task, TaskId, TaskState, UserName,
};

/// GridFS chunk size (the spec's default).
const CHUNK_SIZE: usize = 255 * 1024;

/// How many times a write that lost a race (same version taken concurrently) or hit a
/// transient transaction error is tried. Each round at least one contender wins, so
/// this bounds how many concurrent pushes of one name all succeed.
const WRITE_ATTEMPTS: usize = 16;

/// Backoff before retry `attempt`: grows linearly, with jitter so that writers who
/// collided do not collide again in lockstep.
fn backoff(attempt: usize) -> Duration {
    let jitter =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos()) % 10_000;
    Duration::from_millis(5 * (attempt as u64 + 1)) + Duration::from_micros(u64::from(jitter))
}

/// Whether to wrap writes in transactions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum TransactionMode {
    /// Use them when the deployment supports them (replica set or sharded).
    #[default]
    Auto,
    /// Never use them (commit-point writes with clean-up).
    Off,
}

/// The MongoDB store.
#[derive(Clone)]
pub struct MongoStore {
    client: Client,
    db: Database,
    mode: TransactionMode,
    /// Set once the server has been reached: indexes exist and we know whether it
    /// supports transactions. Lazily, so the server can start while MongoDB is down
    /// and report not-ready instead of refusing to start.
    ready: std::sync::Arc<OnceCell<bool>>,
}

impl std::fmt::Debug for MongoStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The URI may hold a password: never print it.
        f.debug_struct("MongoStore").field("database", &self.db.name()).field("mode", &self.mode).finish()
    }
}

/// A write [`MongoStore::atomically`] can run.
enum Write<'a> {
    Revision { upload: &'a CheckedUpload, precondition: Precondition, by: &'a UserName, at: OffsetDateTime },
    TaskScripts { task: &'a TaskId, owner: &'a UserName, forged: &'a Forged, at: OffsetDateTime },
}

/// What a write produced.
enum Written {
    Revision(Revision),
    Version(u32),
}

/// One GridFS file to write.
struct NewBlob<'a> {
    filename: &'a str,
    text: &'a str,
    /// `metadata` of the `fs.files` document (sha256, version, uploaded_by, ...).
    metadata: Document,
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

fn unavailable(e: MongoError) -> StoreError {
    StoreError::Unavailable { backend: "mongodb", source: e.into() }
}

/// Maps a driver error: can't reach the server → `Unavailable`; else `Other`.
fn classify(e: MongoError, doing: &str) -> StoreError {
    match *e.kind {
        ErrorKind::ServerSelection { .. }
        | ErrorKind::Io(_)
        | ErrorKind::ConnectionPoolCleared { .. }
        | ErrorKind::DnsResolve { .. }
        | ErrorKind::Shutdown => unavailable(e),
        _ => StoreError::Other(anyhow::Error::new(e).context(doing.to_owned())),
    }
}

fn is_duplicate_key(e: &MongoError) -> bool {
    const DUPLICATE_KEY: i32 = 11000;
    match &*e.kind {
        ErrorKind::Write(WriteFailure::WriteError(w)) => w.code == DUPLICATE_KEY,
        ErrorKind::InsertMany(m) => {
            m.write_errors.as_ref().is_some_and(|ws| ws.iter().any(|w| w.code == DUPLICATE_KEY))
        }
        ErrorKind::Command(c) => c.code == DUPLICATE_KEY,
        _ => false,
    }
}

/// Whether trying the whole write again may succeed.
fn is_retryable_write(e: &MongoError) -> bool {
    is_duplicate_key(e) || e.contains_label(TRANSIENT_TRANSACTION_ERROR)
}

/// Runs a driver action with the session when there is one.
macro_rules! with_session {
    ($action:expr, $session:expr) => {
        match $session.as_deref_mut() {
            Some(s) => $action.session(s).await,
            None => $action.await,
        }
    };
}

fn to_bson_time(t: OffsetDateTime) -> BsonDateTime {
    BsonDateTime::from_millis((t.unix_timestamp_nanos() / 1_000_000) as i64)
}

fn from_bson_time(t: BsonDateTime) -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp_nanos(t.timestamp_millis() as i128 * 1_000_000)
        .expect("stored times are in range")
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

impl MongoStore {
    /// Prepares a client for `uri`, using `database` unless the URI names one.
    /// Does not contact the server: that happens on first use, so a server that starts
    /// while MongoDB is down comes up and reports not-ready.
    pub async fn connect(uri: &str, database: &str, mode: TransactionMode) -> anyhow::Result<Self> {
        let mut opts = ClientOptions::parse(uri).await.context("parsing the MongoDB URI")?;
        // Fail fast when the server is down, so requests get a 503 in seconds rather than
        // after the driver's 30 s default. A URI setting wins.
        opts.server_selection_timeout.get_or_insert(Duration::from_secs(5));
        opts.connect_timeout.get_or_insert(Duration::from_secs(5));
        opts.app_name.get_or_insert_with(|| "hpcforge".to_owned());
        let db_name = opts.default_database.clone().unwrap_or_else(|| database.to_owned());
        let client = Client::with_options(opts).context("creating the MongoDB client")?;
        let db = client.database(&db_name);
        Ok(Self { client, db, mode, ready: Default::default() })
    }

    /// The database in use.
    pub fn database(&self) -> &Database {
        &self.db
    }

    fn revisions(&self, kind: DefinitionKind) -> Collection<RevisionDoc> {
        self.db.collection(kind.plural())
    }

    fn files(&self) -> Collection<Document> {
        self.db.collection("fs.files")
    }

    fn chunks(&self) -> Collection<Document> {
        self.db.collection("fs.chunks")
    }

    fn tasks(&self) -> Collection<Document> {
        self.db.collection("tasks")
    }

    fn credentials(&self) -> Collection<Document> {
        self.db.collection("credentials")
    }

    fn users(&self) -> Collection<Document> {
        self.db.collection("users")
    }

    fn tokens(&self) -> Collection<Document> {
        self.db.collection("tokens")
    }

    /// Creates the indexes on first contact and learns whether transactions work.
    /// Returns whether writes use transactions.
    async fn ensure_ready(&self) -> Result<bool, StoreError> {
        self.ready
            .get_or_try_init(|| async {
                let hello = self
                    .db
                    .run_command(doc! { "hello": 1 })
                    .await
                    .map_err(|e| classify(e, "asking the server who it is"))?;
                let replicated = hello.get_str("setName").is_ok() || hello.get_str("msg") == Ok("isdbgrid");
                let unique = || IndexOptions::builder().unique(true).build();
                for kind in [DefinitionKind::Application, DefinitionKind::Cluster] {
                    self.revisions(kind)
                        .create_index(
                            IndexModel::builder().keys(doc! { "name": 1, "version": 1 }).options(unique()).build(),
                        )
                        .await
                        .map_err(|e| classify(e, "creating revision indexes"))?;
                }
                // The GridFS spec's indexes, plus one version per file name.
                self.files()
                    .create_index(IndexModel::builder().keys(doc! { "filename": 1, "uploadDate": 1 }).build())
                    .await
                    .map_err(|e| classify(e, "creating GridFS indexes"))?;
                self.files()
                    .create_index(
                        IndexModel::builder()
                            .keys(doc! { "filename": 1, "metadata.version": 1 })
                            .options(unique())
                            .build(),
                    )
                    .await
                    .map_err(|e| classify(e, "creating GridFS indexes"))?;
                self.chunks()
                    .create_index(IndexModel::builder().keys(doc! { "files_id": 1, "n": 1 }).options(unique()).build())
                    .await
                    .map_err(|e| classify(e, "creating GridFS indexes"))?;
                for keys in
                    [doc! { "owner": 1, "_id": -1 }, doc! { "live": 1, "_id": 1 }, doc! { "state": 1, "_id": -1 }]
                {
                    self.tasks()
                        .create_index(IndexModel::builder().keys(keys).build())
                        .await
                        .map_err(|e| classify(e, "creating task indexes"))?;
                }
                self.credentials()
                    .create_index(
                        IndexModel::builder().keys(doc! { "user": 1, "cluster": 1 }).options(unique()).build(),
                    )
                    .await
                    .map_err(|e| classify(e, "creating credential indexes"))?;
                self.tokens()
                    .create_index(IndexModel::builder().keys(doc! { "hash": 1 }).options(unique()).build())
                    .await
                    .map_err(|e| classify(e, "creating token indexes"))?;
                self.tokens()
                    .create_index(IndexModel::builder().keys(doc! { "user": 1, "_id": 1 }).build())
                    .await
                    .map_err(|e| classify(e, "creating token indexes"))?;
                let use_txn = replicated && self.mode == TransactionMode::Auto;
                if !use_txn {
                    tracing::warn!(
                        database = self.db.name(),
                        "MongoDB writes run without transactions ({}); uploads use a commit point and clean-up instead",
                        if replicated { "transactions = off" } else { "the server is standalone, not a replica set" }
                    );
                }
                Ok(use_txn)
            })
            .await
            .copied()
    }

    async fn latest_doc(
        &self,
        kind: DefinitionKind,
        name: &str,
        session: &mut Option<&mut ClientSession>,
    ) -> Result<Option<RevisionDoc>, MongoError> {
        let coll = self.revisions(kind);
        let action = coll.find_one(doc! { "name": name }).sort(doc! { "version": -1 });
        with_session!(action, session)
    }

    /// One attempt at writing a revision: blobs, then the revision record.
    /// On failure the caller aborts the transaction, or (without one) removes `written`.
    async fn write_revision(
        &self,
        upload: &CheckedUpload,
        precondition: Precondition,
        by: &UserName,
        at: OffsetDateTime,
        session: &mut Option<&mut ClientSession>,
        written: &mut Vec<ObjectId>,
    ) -> Result<Result<Revision, StoreError>, MongoError> {
        let latest = self.latest_doc(upload.kind, &upload.name, session).await?;
        if let (Precondition::Absent, Some(cur)) = (precondition, &latest)
            && !cur.deleted
        {
            return Ok(Err(StoreError::Conflict(exists_message(upload.kind, &upload.name, cur.version))));
        }
        let version = latest.map_or(1, |r| r.version + 1);
        let metas = file_metas(upload, version);
        let blobs: Vec<NewBlob<'_>> = metas
            .iter()
            .zip(&upload.files)
            .map(|(meta, file)| NewBlob {
                filename: &meta.filename,
                text: &file.text,
                metadata: doc! {
                    "sha256": &meta.sha256,
                    "version": version as i64,
                    "uploaded_by": by.as_str(),
                    "uploaded_at": to_bson_time(at),
                },
            })
            .collect();
        self.insert_blobs(&blobs, at, session, written).await?;
        let rev = Revision {
            kind: upload.kind,
            name: upload.name.clone(),
            version,
            deleted: false,
            definition: Some(upload.definition.clone()),
            files: metas,
            uploaded_by: by.clone(),
            uploaded_at: at,
        };
        let doc = match RevisionDoc::from_revision(&rev) {
            Ok(d) => d,
            Err(e) => return Ok(Err(e)),
        };
        let revisions = self.revisions(upload.kind);
        with_session!(revisions.insert_one(doc), session)?;
        Ok(Ok(rev))
    }

    /// One attempt at `write`; see [`Self::atomically`].
    async fn write_once(
        &self,
        write: &Write<'_>,
        session: &mut Option<&mut ClientSession>,
        written: &mut Vec<ObjectId>,
    ) -> Result<Result<Written, StoreError>, MongoError> {
        match *write {
            Write::Revision { upload, precondition, by, at } => {
                Ok(self.write_revision(upload, precondition, by, at, session, written).await?.map(Written::Revision))
            }
            Write::TaskScripts { task, owner, forged, at } => self
                .write_task_scripts(task, owner, forged, at, session, written)
                .await
                .map(|v| Ok(Written::Version(v))),
        }
    }

    /// One attempt at storing a task's forged scripts as one new version.
    async fn write_task_scripts(
        &self,
        task: &TaskId,
        owner: &UserName,
        forged: &Forged,
        at: OffsetDateTime,
        session: &mut Option<&mut ClientSession>,
        written: &mut Vec<ObjectId>,
    ) -> Result<u32, MongoError> {
        let names: Vec<String> = forged.scripts.iter().map(|s| task_script_name(task, s.phase)).collect();
        let files = self.files();
        let mut version = 1u32;
        for name in &names {
            let newest = with_session!(
                files.find_one(doc! { "filename": name }).sort(doc! { "metadata.version": -1 }),
                session
            )?;
            if let Some(v) =
                newest.as_ref().and_then(|d| d.get_document("metadata").ok()).and_then(|m| m.get_i64("version").ok())
            {
                version = version.max(v as u32 + 1);
            }
        }
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
        self.insert_blobs(&blobs, at, session, written).await?;
        Ok(version)
    }

    /// Writes GridFS files (chunks, then file documents), noting their IDs in `written`
    /// so a failed write without a transaction can remove them.
    async fn insert_blobs(
        &self,
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
        // Chunks before files: without a transaction, a crash leaves at worst chunks
        // no file document points at, never a file that reads back short.
        let (chunks, files) = (self.chunks(), self.files());
        if !chunk_docs.is_empty() {
            with_session!(chunks.insert_many(chunk_docs), session)?;
        }
        if !file_docs.is_empty() {
            with_session!(files.insert_many(file_docs), session)?;
        }
        Ok(())
    }

    /// Runs `write` all or nothing: in a transaction when the server has them, else
    /// removing the blobs it wrote if it fails. Retries lost races (duplicate keys,
    /// transient transaction errors) with backoff.
    async fn atomically(&self, what: &str, write: &Write<'_>) -> Result<Written, StoreError> {
        let use_txn = self.ensure_ready().await?;
        let mut last_err = None;
        for attempt in 0..WRITE_ATTEMPTS {
            let mut written = Vec::new();
            let outcome = if use_txn {
                let mut session = self.client.start_session().await.map_err(|e| classify(e, "starting a session"))?;
                session.start_transaction().await.map_err(|e| classify(e, "starting a transaction"))?;
                let r = self.write_once(write, &mut Some(&mut session), &mut written).await;
                match r {
                    Ok(Ok(v)) => Self::commit(&mut session).await.map(|()| Ok(v)),
                    other => {
                        let _ = session.abort_transaction().await;
                        other
                    }
                }
            } else {
                let r = self.write_once(write, &mut None, &mut written).await;
                if !matches!(r, Ok(Ok(_))) {
                    self.remove_blobs(&written).await;
                }
                r
            };
            match outcome {
                Ok(result) => return result,
                Err(e) if is_retryable_write(&e) => {
                    tracing::debug!(attempt, error = %e, what, "write lost a race; retrying");
                    last_err = Some(e);
                    tokio::time::sleep(backoff(attempt)).await;
                }
                Err(e) => return Err(classify(e, what)),
            }
        }
        Err(StoreError::Conflict(format!(
            "{what}: other writes to the same names keep winning; try again ({})",
            last_err.map(|e| e.to_string()).unwrap_or_default()
        )))
    }

    /// Removes blobs of a write that did not commit (no-transaction mode).
    async fn remove_blobs(&self, ids: &[ObjectId]) {
        if ids.is_empty() {
            return;
        }
        let ids: Vec<Bson> = ids.iter().map(|i| Bson::ObjectId(*i)).collect();
        let chunks = self.chunks().delete_many(doc! { "files_id": { "$in": &ids } }).await;
        let files = self.files().delete_many(doc! { "_id": { "$in": &ids } }).await;
        if let Err(e) = chunks.and(files) {
            tracing::error!(error = %e, count = ids.len(), "could not remove the blobs of a failed upload; they are unreferenced and invisible through the API");
        }
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
}

#[async_trait]
impl Store for MongoStore {
    fn backend(&self) -> &'static str {
        "mongodb"
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.ensure_ready().await?;
        self.db.run_command(doc! { "ping": 1 }).await.map_err(|e| classify(e, "pinging"))?;
        Ok(())
    }

    async fn put_revision(
        &self,
        upload: &CheckedUpload,
        precondition: Precondition,
        by: &UserName,
        at: OffsetDateTime,
    ) -> Result<Revision, StoreError> {
        let what = format!("storing {} `{}`", upload.kind.singular(), upload.name);
        match self.atomically(&what, &Write::Revision { upload, precondition, by, at: to_millis(at) }).await? {
            Written::Revision(rev) => Ok(rev),
            Written::Version(_) => unreachable!("a revision write answers a revision"),
        }
    }

    async fn delete_definition(
        &self,
        kind: DefinitionKind,
        name: &str,
        by: &UserName,
        at: OffsetDateTime,
    ) -> Result<Option<Revision>, StoreError> {
        self.ensure_ready().await?;
        for attempt in 0..WRITE_ATTEMPTS {
            let Some(latest) =
                self.latest_doc(kind, name, &mut None).await.map_err(|e| classify(e, "reading a revision"))?
            else {
                return Ok(None);
            };
            if latest.deleted {
                return Ok(None);
            }
            // A tombstone is one document: the unique (name, version) index makes it
            // atomic against a concurrent push without a transaction.
            let rev = Revision {
                kind,
                name: name.to_owned(),
                version: latest.version + 1,
                deleted: true,
                definition: None,
                files: Vec::new(),
                uploaded_by: by.clone(),
                uploaded_at: to_millis(at),
            };
            match self.revisions(kind).insert_one(RevisionDoc::from_revision(&rev)?).await {
                Ok(_) => return Ok(Some(rev)),
                Err(e) if is_duplicate_key(&e) => {
                    tracing::debug!(attempt, name, "delete raced with an upload; retrying");
                    tokio::time::sleep(backoff(attempt)).await;
                }
                Err(e) => return Err(classify(e, "writing a tombstone")),
            }
        }
        Err(StoreError::Conflict(format!(
            "{} `{name}` is being changed by other uploads at the same time; try again",
            kind.singular()
        )))
    }

    async fn latest_revision(&self, kind: DefinitionKind, name: &str) -> Result<Option<Revision>, StoreError> {
        self.ensure_ready().await?;
        self.latest_doc(kind, name, &mut None)
            .await
            .map_err(|e| classify(e, "reading a revision"))?
            .map(|d| d.into_revision(kind))
            .transpose()
    }

    async fn revision(&self, kind: DefinitionKind, name: &str, version: u32) -> Result<Option<Revision>, StoreError> {
        self.ensure_ready().await?;
        self.revisions(kind)
            .find_one(doc! { "name": name, "version": version as i64 })
            .await
            .map_err(|e| classify(e, "reading a revision"))?
            .map(|d| d.into_revision(kind))
            .transpose()
    }

    async fn history(&self, kind: DefinitionKind, name: &str) -> Result<Vec<Revision>, StoreError> {
        self.ensure_ready().await?;
        let docs: Vec<RevisionDoc> = self
            .revisions(kind)
            .find(doc! { "name": name })
            .sort(doc! { "version": 1 })
            .await
            .map_err(|e| classify(e, "reading revisions"))?
            .try_collect()
            .await
            .map_err(|e| classify(e, "reading revisions"))?;
        docs.into_iter().map(|d| d.into_revision(kind)).collect()
    }

    async fn list_current(&self, kind: DefinitionKind) -> Result<Vec<Revision>, StoreError> {
        self.ensure_ready().await?;
        let pipeline = vec![
            doc! { "$sort": { "name": 1, "version": -1 } },
            doc! { "$group": { "_id": "$name", "latest": { "$first": "$$ROOT" } } },
            doc! { "$replaceRoot": { "newRoot": "$latest" } },
            doc! { "$match": { "deleted": false } },
            doc! { "$sort": { "name": 1 } },
        ];
        let docs: Vec<Document> = self
            .revisions(kind)
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

    async fn read_file(
        &self,
        kind: DefinitionKind,
        name: &str,
        version: u32,
        path: &str,
    ) -> Result<Option<StoredFile>, StoreError> {
        // Only files a committed revision lists are visible: without transactions a
        // failed upload may briefly leave blobs behind, and they must not be readable.
        let Some(rev) = self.revision(kind, name, version).await? else { return Ok(None) };
        let Some(meta) = rev.files.into_iter().find(|f| f.path == path) else { return Ok(None) };
        let bucket = self.db.gridfs_bucket(None);
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
        super::embedded::verify_sha(&meta.filename, version, &meta.sha256, &text)?;
        let uploaded_by =
            metadata.get_str("uploaded_by").ok().and_then(|s| UserName::parse(s).ok()).ok_or_else(|| {
                StoreError::Other(anyhow::anyhow!("GridFS file {} has no valid uploaded_by", meta.filename))
            })?;
        Ok(Some(StoredFile { meta, uploaded_by, uploaded_at: from_bson_time(file.upload_date), text }))
    }

    async fn put_task_scripts(
        &self,
        task: &TaskId,
        owner: &UserName,
        forged: &Forged,
        at: OffsetDateTime,
    ) -> Result<u32, StoreError> {
        let write = Write::TaskScripts { task, owner, forged, at: to_millis(at) };
        match self.atomically(&format!("storing the scripts of task {task}"), &write).await? {
            Written::Version(v) => Ok(v),
            Written::Revision(_) => unreachable!("a task-script write answers a version"),
        }
    }

    async fn read_task_script(
        &self,
        task: &TaskId,
        phase: Phase,
        version: Option<u32>,
    ) -> Result<Option<StoredTaskScript>, StoreError> {
        self.ensure_ready().await?;
        let name = task_script_name(task, phase);
        let bucket = self.db.gridfs_bucket(None);
        let mut filter = doc! { "filename": &name };
        if let Some(v) = version {
            filter.insert("metadata.version", v as i64);
        }
        let found = self
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
        super::embedded::verify_sha(&name, version, &sha256, &text)?;
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
            stored_at: from_bson_time(
                meta.get_datetime("uploaded_at").copied().map_err(|_| corrupt("no uploaded_at"))?,
            ),
        }))
    }

    async fn insert_task(&self, task: &Task) -> Result<(), StoreError> {
        self.ensure_ready().await?;
        match self.tasks().insert_one(task_doc(task)?).await {
            Ok(_) => Ok(()),
            Err(e) if is_duplicate_key(&e) => Err(StoreError::Conflict(format!("task {} already exists", task.id))),
            Err(e) => Err(classify(e, "storing a task")),
        }
    }

    async fn update_task(&self, task: &Task) -> Result<Task, StoreError> {
        self.ensure_ready().await?;
        let mut next = task.clone();
        next.revision += 1;
        let filter = doc! { "_id": task.id.to_string(), "revision": task.revision as i64 };
        let r = self.tasks().replace_one(filter, task_doc(&next)?).await.map_err(|e| classify(e, "updating a task"))?;
        if r.matched_count == 1 {
            return Ok(next);
        }
        let exists = self
            .tasks()
            .find_one(doc! { "_id": task.id.to_string() })
            .await
            .map_err(|e| classify(e, "reading a task"))?;
        Err(match exists {
            Some(_) => StoreError::Conflict(format!(
                "task {} was changed meanwhile (expected revision {})",
                task.id, task.revision
            )),
            None => StoreError::Other(anyhow::anyhow!("task {} does not exist", task.id)),
        })
    }

    async fn live_tasks(&self) -> Result<Vec<Task>, StoreError> {
        self.ensure_ready().await?;
        let docs: Vec<Document> = self
            .tasks()
            .find(doc! { "live": true })
            .sort(doc! { "_id": 1 })
            .await
            .map_err(|e| classify(e, "listing live tasks"))?
            .try_collect()
            .await
            .map_err(|e| classify(e, "listing live tasks"))?;
        docs.into_iter().map(task_from_doc).collect()
    }

    async fn put_credential(&self, credential: &StoredCredential) -> Result<(), StoreError> {
        self.ensure_ready().await?;
        let i = &credential.info;
        let doc = doc! {
            "user": i.user.as_str(),
            "cluster": i.cluster.as_str(),
            "key_type": &i.key_type,
            "fingerprint": &i.fingerprint,
            "sealed": Binary { subtype: BinarySubtype::Generic, bytes: credential.sealed.clone() },
            "created_by": i.created_by.as_str(),
            "created_at": to_bson_time(i.created_at),
        };
        self.credentials()
            .replace_one(doc! { "user": i.user.as_str(), "cluster": i.cluster.as_str() }, doc)
            .upsert(true)
            .await
            .map_err(|e| classify(e, "storing a credential"))?;
        Ok(())
    }

    async fn get_credential(
        &self,
        user: &UserName,
        cluster: &ClusterName,
    ) -> Result<Option<StoredCredential>, StoreError> {
        self.ensure_ready().await?;
        let found = self
            .credentials()
            .find_one(doc! { "user": user.as_str(), "cluster": cluster.as_str() })
            .await
            .map_err(|e| classify(e, "reading a credential"))?;
        found
            .map(|d| {
                let sealed = d.get_binary_generic("sealed").map_err(|_| corrupt_credential("no sealed key"))?.clone();
                Ok(StoredCredential { info: credential_info(&d)?, sealed })
            })
            .transpose()
    }

    async fn delete_credential(&self, user: &UserName, cluster: &ClusterName) -> Result<bool, StoreError> {
        self.ensure_ready().await?;
        let r = self
            .credentials()
            .delete_one(doc! { "user": user.as_str(), "cluster": cluster.as_str() })
            .await
            .map_err(|e| classify(e, "deleting a credential"))?;
        Ok(r.deleted_count > 0)
    }

    async fn list_credentials(&self, user: Option<&UserName>) -> Result<Vec<CredentialInfo>, StoreError> {
        self.ensure_ready().await?;
        let filter = match user {
            Some(u) => doc! { "user": u.as_str() },
            None => doc! {},
        };
        let docs: Vec<Document> = self
            .credentials()
            .find(filter)
            .projection(doc! { "sealed": 0 })
            .sort(doc! { "user": 1, "cluster": 1 })
            .await
            .map_err(|e| classify(e, "listing credentials"))?
            .try_collect()
            .await
            .map_err(|e| classify(e, "listing credentials"))?;
        docs.iter().map(credential_info).collect()
    }

    async fn get_task(&self, id: &TaskId) -> Result<Option<Task>, StoreError> {
        self.ensure_ready().await?;
        let doc =
            self.tasks().find_one(doc! { "_id": id.to_string() }).await.map_err(|e| classify(e, "reading a task"))?;
        doc.map(task_from_doc).transpose()
    }

    async fn list_tasks(&self, filter: &TaskFilter, limit: usize) -> Result<Vec<Task>, StoreError> {
        self.ensure_ready().await?;
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
        let docs: Vec<Document> = self
            .tasks()
            .find(query)
            .sort(doc! { "_id": -1 })
            .limit(limit.min(i64::MAX as usize) as i64)
            .await
            .map_err(|e| classify(e, "listing tasks"))?
            .try_collect()
            .await
            .map_err(|e| classify(e, "listing tasks"))?;
        docs.into_iter().map(task_from_doc).collect()
    }

    async fn count_tasks(&self) -> Result<Vec<(TaskState, u64)>, StoreError> {
        self.ensure_ready().await?;
        let groups: Vec<Document> = self
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
                let state =
                    g.get_str("_id").map_err(|_| StoreError::Other(anyhow::anyhow!("a task without a state")))?;
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

    async fn insert_account(&self, account: &UserAccount) -> Result<(), StoreError> {
        self.ensure_ready().await?;
        let d = doc! {
            "_id": account.name.as_str(),
            "role": account.role.as_str(),
            "created_by": account.created_by.as_str(),
            "created_at": to_bson_time(account.created_at),
            "disabled_at": account.disabled_at.map(to_bson_time),
        };
        match self.users().insert_one(d).await {
            Ok(_) => Ok(()),
            Err(e) if is_duplicate_key(&e) => {
                Err(StoreError::Conflict(format!("user `{}` exists already", account.name)))
            }
            Err(e) => Err(classify(e, "storing a user")),
        }
    }

    async fn get_account(&self, name: &UserName) -> Result<Option<UserAccount>, StoreError> {
        self.ensure_ready().await?;
        let d =
            self.users().find_one(doc! { "_id": name.as_str() }).await.map_err(|e| classify(e, "reading a user"))?;
        d.as_ref().map(account_from_doc).transpose()
    }

    async fn list_accounts(&self) -> Result<Vec<UserAccount>, StoreError> {
        self.ensure_ready().await?;
        let docs: Vec<Document> = self
            .users()
            .find(doc! {})
            .sort(doc! { "_id": 1 })
            .await
            .map_err(|e| classify(e, "listing users"))?
            .try_collect()
            .await
            .map_err(|e| classify(e, "listing users"))?;
        docs.iter().map(account_from_doc).collect()
    }

    async fn disable_account(&self, name: &UserName, at: OffsetDateTime) -> Result<Option<UserAccount>, StoreError> {
        self.ensure_ready().await?;
        let at = to_bson_time(at);
        // The account first: once it is disabled no token of it is accepted, whether
        // or not the tokens below are marked revoked yet.
        self.users()
            .update_one(
                doc! { "_id": name.as_str(), "disabled_at": Bson::Null },
                doc! { "$set": { "disabled_at": at } },
            )
            .await
            .map_err(|e| classify(e, "disabling a user"))?;
        self.tokens()
            .update_many(
                doc! { "user": name.as_str(), "revoked_at": Bson::Null },
                doc! { "$set": { "revoked_at": at } },
            )
            .await
            .map_err(|e| classify(e, "revoking a user's tokens"))?;
        self.get_account(name).await
    }

    async fn insert_token(&self, token: &StoredToken) -> Result<(), StoreError> {
        self.ensure_ready().await?;
        let i = &token.info;
        let d = doc! {
            "_id": i.id.to_string(),
            "user": i.user.as_str(),
            "hash": &token.hash,
            "label": &i.label,
            "hint": &i.hint,
            "created_by": i.created_by.as_str(),
            "created_at": to_bson_time(i.created_at),
            "expires_at": to_bson_time(i.expires_at),
            "revoked_at": i.revoked_at.map(to_bson_time),
            "last_used_at": i.last_used_at.map(to_bson_time),
        };
        match self.tokens().insert_one(d).await {
            Ok(_) => Ok(()),
            Err(e) if is_duplicate_key(&e) => {
                Err(StoreError::Conflict("a token with that ID or hash exists already".into()))
            }
            Err(e) => Err(classify(e, "storing a token")),
        }
    }

    async fn token_by_hash(&self, hash: &str) -> Result<Option<TokenInfo>, StoreError> {
        self.ensure_ready().await?;
        let d = self.tokens().find_one(doc! { "hash": hash }).await.map_err(|e| classify(e, "reading a token"))?;
        d.as_ref().map(token_from_doc).transpose()
    }

    async fn list_tokens(&self, user: &UserName) -> Result<Vec<TokenInfo>, StoreError> {
        self.ensure_ready().await?;
        let docs: Vec<Document> = self
            .tokens()
            .find(doc! { "user": user.as_str() })
            .sort(doc! { "_id": 1 })
            .await
            .map_err(|e| classify(e, "listing tokens"))?
            .try_collect()
            .await
            .map_err(|e| classify(e, "listing tokens"))?;
        docs.iter().map(token_from_doc).collect()
    }

    async fn revoke_token(
        &self,
        user: &UserName,
        id: &TokenId,
        at: OffsetDateTime,
    ) -> Result<Option<TokenInfo>, StoreError> {
        self.ensure_ready().await?;
        let key = doc! { "_id": id.to_string(), "user": user.as_str() };
        let mut unrevoked = key.clone();
        unrevoked.insert("revoked_at", Bson::Null);
        self.tokens()
            .update_one(unrevoked, doc! { "$set": { "revoked_at": to_bson_time(at) } })
            .await
            .map_err(|e| classify(e, "revoking a token"))?;
        let d = self.tokens().find_one(key).await.map_err(|e| classify(e, "reading a token"))?;
        d.as_ref().map(token_from_doc).transpose()
    }

    async fn touch_token(&self, id: &TokenId, at: OffsetDateTime) -> Result<(), StoreError> {
        self.ensure_ready().await?;
        self.tokens()
            .update_one(doc! { "_id": id.to_string() }, doc! { "$set": { "last_used_at": to_bson_time(at) } })
            .await
            .map_err(|e| classify(e, "recording a token's use"))?;
        Ok(())
    }
}

fn corrupt(what: &str, detail: impl std::fmt::Display) -> StoreError {
    StoreError::Other(anyhow::anyhow!("corrupt {what} document: {detail}"))
}

fn opt_time(d: &Document, key: &str) -> Option<OffsetDateTime> {
    d.get_datetime(key).ok().map(|t| from_bson_time(*t))
}

fn account_from_doc(d: &Document) -> Result<UserAccount, StoreError> {
    let text = |k: &str| d.get_str(k).map_err(|_| corrupt("user", k));
    Ok(UserAccount {
        name: UserName::parse(text("_id")?).map_err(|e| corrupt("user", e))?,
        role: Role::parse(text("role")?).map_err(|e| corrupt("user", e))?,
        created_by: UserName::parse(text("created_by")?).map_err(|e| corrupt("user", e))?,
        created_at: from_bson_time(*d.get_datetime("created_at").map_err(|_| corrupt("user", "created_at"))?),
        disabled_at: opt_time(d, "disabled_at"),
    })
}

fn token_from_doc(d: &Document) -> Result<TokenInfo, StoreError> {
    let text = |k: &str| d.get_str(k).map_err(|_| corrupt("token", k));
    let time = |k: &str| d.get_datetime(k).map(|t| from_bson_time(*t)).map_err(|_| corrupt("token", k));
    Ok(TokenInfo {
        id: TokenId::parse(text("_id")?).map_err(|e| corrupt("token", e))?,
        user: UserName::parse(text("user")?).map_err(|e| corrupt("token", e))?,
        label: text("label")?.to_owned(),
        hint: text("hint")?.to_owned(),
        created_by: UserName::parse(text("created_by")?).map_err(|e| corrupt("token", e))?,
        created_at: time("created_at")?,
        expires_at: time("expires_at")?,
        revoked_at: opt_time(d, "revoked_at"),
        last_used_at: opt_time(d, "last_used_at"),
    })
}

/// A task as a MongoDB document: `_id` is the task ID, `live` feeds the mediator's index.
fn task_doc(task: &Task) -> Result<Document, StoreError> {
    let mut doc = bson::to_document(task).context("converting a task to BSON")?;
    doc.insert("_id", task.id.to_string());
    doc.insert("live", task.is_live());
    Ok(doc)
}

fn corrupt_credential(what: &str) -> StoreError {
    StoreError::Other(anyhow::anyhow!("corrupt credential document: {what}"))
}

fn credential_info(d: &Document) -> Result<CredentialInfo, StoreError> {
    let text = |k: &str| d.get_str(k).map_err(|_| corrupt_credential(k));
    let name = |e: crate::model::NameError| corrupt_credential(&e.to_string());
    Ok(CredentialInfo {
        user: UserName::parse(text("user")?).map_err(name)?,
        cluster: ClusterName::parse(text("cluster")?).map_err(name)?,
        key_type: text("key_type")?.to_owned(),
        fingerprint: text("fingerprint")?.to_owned(),
        created_by: UserName::parse(text("created_by")?).map_err(name)?,
        created_at: from_bson_time(*d.get_datetime("created_at").map_err(|_| corrupt_credential("created_at"))?),
    })
}

fn task_from_doc(mut doc: Document) -> Result<Task, StoreError> {
    doc.remove("_id");
    doc.remove("live");
    bson::from_document(doc).map_err(|e| StoreError::Other(anyhow::anyhow!("corrupt task document: {e}")))
}

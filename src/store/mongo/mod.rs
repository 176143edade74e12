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

mod accounts;
mod archive;
mod definitions;
mod leases;
mod tasks;

use std::time::Duration;

use anyhow::Context as _;
use async_trait::async_trait;
use mongodb::bson::{DateTime as BsonDateTime, Document, doc};
use mongodb::error::{Error as MongoError, ErrorKind, WriteFailure};
use mongodb::options::{ClientOptions, IndexOptions};
use mongodb::{Client, Collection, Database, IndexModel};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use tokio::sync::OnceCell;

use super::{CredentialInfo, Revision, Store, StoreError, StoredCredential, StoredFile, TaskFilter};
use crate::definitions::{CheckedUpload, DefinitionKind};
use crate::model::accounts::{StoredToken, TokenId, TokenInfo, UserAccount};
use crate::model::archive::ArchivedFile;
use crate::model::{ClusterName, Forged, Phase, StoredTaskScript, Task, TaskEvent, TaskId, TaskState, UserName};

/// Backoff before retry `attempt`: grows linearly, with jitter so that writers who
/// collided do not collide again in lockstep.
pub(super) fn backoff(attempt: usize) -> Duration {
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
    /// Commands sent to the server so far: its round trips.
    commands: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl std::fmt::Debug for MongoStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The URI may hold a password: never print it.
        f.debug_struct("MongoStore").field("database", &self.db.name()).field("mode", &self.mode).finish()
    }
}

fn unavailable(e: MongoError) -> StoreError {
    StoreError::Unavailable { backend: "mongodb", source: e.into() }
}

/// Maps a driver error: can't reach the server → `Unavailable`; else `Other`.
pub(super) fn classify(e: MongoError, doing: &str) -> StoreError {
    match *e.kind {
        ErrorKind::ServerSelection { .. }
        | ErrorKind::Io(_)
        | ErrorKind::ConnectionPoolCleared { .. }
        | ErrorKind::DnsResolve { .. }
        | ErrorKind::Shutdown => unavailable(e),
        _ => StoreError::Other(anyhow::Error::new(e).context(doing.to_owned())),
    }
}

pub(super) fn is_duplicate_key(e: &MongoError) -> bool {
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

pub(super) fn to_bson_time(t: OffsetDateTime) -> BsonDateTime {
    BsonDateTime::from_millis((t.unix_timestamp_nanos() / 1_000_000) as i64)
}

pub(super) fn from_bson_time(t: BsonDateTime) -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp_nanos(t.timestamp_millis() as i128 * 1_000_000)
        .expect("stored times are in range")
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
        // Every command the driver sends, counted (for `/metrics` and the benchmarks).
        let commands = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let counter = commands.clone();
        opts.command_event_handler = Some(mongodb::event::EventHandler::callback(move |ev| {
            if matches!(ev, mongodb::event::command::CommandEvent::Started(_)) {
                counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
        }));
        let db_name = opts.default_database.clone().unwrap_or_else(|| database.to_owned());
        let client = Client::with_options(opts).context("creating the MongoDB client")?;
        let db = client.database(&db_name);
        Ok(Self { client, db, mode, ready: Default::default(), commands })
    }

    /// How many commands (round trips) this store has sent to MongoDB so far.
    pub fn commands_sent(&self) -> u64 {
        self.commands.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The database in use.
    pub fn database(&self) -> &Database {
        &self.db
    }

    pub(super) fn files(&self) -> Collection<Document> {
        self.db.collection("fs.files")
    }

    pub(super) fn chunks(&self) -> Collection<Document> {
        self.db.collection("fs.chunks")
    }

    pub(super) fn tasks(&self) -> Collection<Document> {
        self.db.collection("tasks")
    }

    pub(super) fn leases(&self) -> Collection<Document> {
        self.db.collection("leases")
    }

    pub(super) fn pools(&self) -> Collection<Document> {
        self.db.collection("pools")
    }

    pub(super) fn usage(&self) -> Collection<Document> {
        self.db.collection("usage")
    }

    pub(super) fn credentials(&self) -> Collection<Document> {
        self.db.collection("credentials")
    }

    pub(super) fn users(&self) -> Collection<Document> {
        self.db.collection("users")
    }

    pub(super) fn tokens(&self) -> Collection<Document> {
        self.db.collection("tokens")
    }

    /// Creates the indexes on first contact and learns whether transactions work.
    /// Returns whether writes use transactions.
    pub(super) async fn ensure_ready(&self) -> Result<bool, StoreError> {
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
                    self.db
                        .collection::<Document>(kind.plural())
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
}

#[async_trait]
impl Store for MongoStore {
    fn backend(&self) -> &'static str {
        "mongodb"
    }

    fn serves_many(&self) -> bool {
        true
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.ensure_ready().await?;
        self.db.run_command(doc! { "ping": 1 }).await.map_err(|e| classify(e, "pinging"))?;
        Ok(())
    }

    async fn insert_revision(&self, rev: &Revision, upload: Option<&CheckedUpload>) -> Result<(), StoreError> {
        definitions::insert_revision(self, rev, upload).await
    }

    async fn latest_revision(&self, kind: DefinitionKind, name: &str) -> Result<Option<Revision>, StoreError> {
        definitions::latest_revision(self, kind, name).await
    }

    async fn revision(&self, kind: DefinitionKind, name: &str, version: u32) -> Result<Option<Revision>, StoreError> {
        definitions::revision(self, kind, name, version).await
    }

    async fn history(&self, kind: DefinitionKind, name: &str) -> Result<Vec<Revision>, StoreError> {
        definitions::history(self, kind, name).await
    }

    async fn list_current(&self, kind: DefinitionKind) -> Result<Vec<Revision>, StoreError> {
        definitions::list_current(self, kind).await
    }

    async fn read_file(
        &self,
        kind: DefinitionKind,
        name: &str,
        version: u32,
        path: &str,
    ) -> Result<Option<StoredFile>, StoreError> {
        definitions::read_file(self, kind, name, version, path).await
    }

    async fn put_task_scripts(
        &self,
        task: &TaskId,
        owner: &UserName,
        forged: &Forged,
        at: OffsetDateTime,
    ) -> Result<u32, StoreError> {
        definitions::put_task_scripts(self, task, owner, forged, at).await
    }

    async fn read_task_script(
        &self,
        task: &TaskId,
        phase: Phase,
        version: Option<u32>,
    ) -> Result<Option<StoredTaskScript>, StoreError> {
        definitions::read_task_script(self, task, phase, version).await
    }

    async fn insert_task(&self, task: &Task) -> Result<(), StoreError> {
        tasks::insert_task(self, task).await
    }

    async fn create_task(&self, task: &Task, forged: &Forged) -> Result<(), StoreError> {
        tasks::create_task(self, task, forged).await
    }

    async fn update_task(&self, before: &Task, after: &Task) -> Result<Task, StoreError> {
        tasks::update_task(self, before, after).await
    }

    async fn claim_lease(
        &self,
        key: &str,
        holder: &str,
        until: OffsetDateTime,
        at: OffsetDateTime,
    ) -> Result<Option<crate::store::leases::Lease>, StoreError> {
        leases::claim(self, key, holder, until, at).await
    }

    async fn release_lease(&self, lease: &crate::store::leases::Lease, at: OffsetDateTime) -> Result<bool, StoreError> {
        leases::release(self, lease, at).await
    }

    async fn pool(&self, key: &str) -> Result<Option<crate::model::queue::Pool>, StoreError> {
        leases::pool(self, key).await
    }

    async fn pools(&self) -> Result<Vec<crate::model::queue::Pool>, StoreError> {
        leases::pools(self).await
    }

    async fn put_pool(&self, pool: &crate::model::queue::Pool, expected: Option<u64>) -> Result<bool, StoreError> {
        leases::put_pool(self, pool, expected).await
    }

    async fn leases(&self, prefix: &str) -> Result<Vec<crate::store::leases::Lease>, StoreError> {
        leases::list(self, prefix).await
    }

    async fn count_use(
        &self,
        key: &str,
        window: OffsetDateTime,
        by: i64,
        keep_until: OffsetDateTime,
    ) -> Result<Option<u64>, StoreError> {
        leases::count_use(self, key, window, by, keep_until).await.map(Some)
    }

    async fn task_state(&self, id: &TaskId) -> Result<Option<Task>, StoreError> {
        tasks::task_state(self, id).await
    }

    async fn task_events(&self, id: &TaskId, after: u64) -> Result<Vec<TaskEvent>, StoreError> {
        tasks::task_events(self, id, after).await
    }

    async fn live_tasks(&self) -> Result<Vec<Task>, StoreError> {
        tasks::live_tasks(self).await
    }

    async fn archive_begin(&self, task: &TaskId, path: &str, at: OffsetDateTime) -> Result<String, StoreError> {
        archive::begin(self, task, path, at).await
    }

    async fn archive_chunk(&self, handle: &str, n: u32, data: Vec<u8>) -> Result<(), StoreError> {
        archive::chunk(self, handle, n, data).await
    }

    async fn archive_finish(
        &self,
        handle: &str,
        task: &TaskId,
        file: &ArchivedFile,
        owner: &UserName,
        at: OffsetDateTime,
    ) -> Result<(), StoreError> {
        archive::finish(self, handle, task, file, owner, at).await
    }

    async fn archive_drop(&self, task: &TaskId) -> Result<u64, StoreError> {
        archive::drop_all(self, task).await
    }

    async fn archived_files(&self, task: &TaskId) -> Result<Vec<ArchivedFile>, StoreError> {
        archive::list(self, task).await
    }

    async fn archived_file(&self, task: &TaskId, path: &str) -> Result<Option<ArchivedFile>, StoreError> {
        archive::file(self, task, path).await
    }

    async fn archive_read(
        &self,
        task: &TaskId,
        path: &str,
        first: u64,
        last: u64,
    ) -> Result<Option<(ArchivedFile, crate::store::ArchiveStream)>, StoreError> {
        archive::read(self, task, path, first, last).await
    }

    async fn task_changes(&self) -> Result<Option<crate::store::TaskChanges>, StoreError> {
        tasks::task_changes(self).await.map(Some)
    }

    async fn put_credential(&self, credential: &StoredCredential) -> Result<(), StoreError> {
        accounts::put_credential(self, credential).await
    }

    async fn get_credential(
        &self,
        user: &UserName,
        cluster: &ClusterName,
    ) -> Result<Option<StoredCredential>, StoreError> {
        accounts::get_credential(self, user, cluster).await
    }

    async fn delete_credential(&self, user: &UserName, cluster: &ClusterName) -> Result<bool, StoreError> {
        accounts::delete_credential(self, user, cluster).await
    }

    async fn list_credentials(&self, user: Option<&UserName>) -> Result<Vec<CredentialInfo>, StoreError> {
        accounts::list_credentials(self, user).await
    }

    async fn get_task(&self, id: &TaskId) -> Result<Option<Task>, StoreError> {
        tasks::get_task(self, id).await
    }

    async fn list_tasks(&self, filter: &TaskFilter, limit: usize) -> Result<Vec<Task>, StoreError> {
        tasks::list_tasks(self, filter, limit).await
    }

    async fn count_tasks(&self) -> Result<Vec<(TaskState, u64)>, StoreError> {
        tasks::count_tasks(self).await
    }

    async fn insert_account(&self, account: &UserAccount) -> Result<(), StoreError> {
        accounts::insert_account(self, account).await
    }

    async fn get_account(&self, name: &UserName) -> Result<Option<UserAccount>, StoreError> {
        accounts::get_account(self, name).await
    }

    async fn list_accounts(&self) -> Result<Vec<UserAccount>, StoreError> {
        accounts::list_accounts(self).await
    }

    async fn disable_account(&self, name: &UserName, at: OffsetDateTime) -> Result<Option<UserAccount>, StoreError> {
        accounts::disable_account(self, name, at).await
    }

    async fn insert_token(&self, token: &StoredToken) -> Result<(), StoreError> {
        accounts::insert_token(self, token).await
    }

    async fn token_by_hash(&self, hash: &str) -> Result<Option<TokenInfo>, StoreError> {
        accounts::token_by_hash(self, hash).await
    }

    async fn list_tokens(&self, user: &UserName) -> Result<Vec<TokenInfo>, StoreError> {
        accounts::list_tokens(self, user).await
    }

    async fn revoke_token(
        &self,
        user: &UserName,
        id: &TokenId,
        at: OffsetDateTime,
    ) -> Result<Option<TokenInfo>, StoreError> {
        accounts::revoke_token(self, user, id, at).await
    }

    async fn touch_token(&self, id: &TokenId, at: OffsetDateTime) -> Result<(), StoreError> {
        accounts::touch_token(self, id, at).await
    }
}

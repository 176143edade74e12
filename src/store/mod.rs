//! The storage contract and its two implementations: MongoDB + GridFS ([`mongo`]) and
//! an embedded SQLite store ([`embedded`]). One contract test suite
//! (`tests/store_contract.rs`) runs against both.
//!
//! ## Model
//!
//! Definitions are **append-only revision histories**. Every push of an application or
//! cluster adds revision `N+1` holding the definition and the metadata of its files;
//! the files themselves are blobs named as in DESIGN.md (`applications/<name>/app_execute`)
//! with `version = N+1`. A delete appends a *tombstone* revision. "The current
//! definition" is the newest revision unless it is a tombstone. Old revisions and their
//! files stay readable by version, so a task can always show what it was forged from.
//!
//! Writing a revision is all or nothing: the blobs and the revision record are written
//! in one transaction where the store has them (SQLite always; MongoDB on a replica set),
//! and otherwise the revision record is written last as the commit point, with the blobs
//! removed again if it fails.

pub mod embedded;
pub mod leases;
pub mod mongo;
pub mod pools;
pub mod revisions;
pub mod tasks;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::definitions::{CheckedUpload, DefinitionKind};
pub use crate::model::accounts::{CredentialInfo, StoredCredential};
use crate::model::accounts::{StoredToken, TokenId, TokenInfo, UserAccount};
use crate::model::archive::ArchivedFile;
use crate::model::{
    AppName, ClusterName, Forged, Phase, StoredTaskScript, Task, TaskEvent, TaskId, TaskState, UserName,
};

/// Why a store operation failed, in the terms callers branch on.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The store cannot be reached or is not answering; retrying later may work.
    #[error("the {backend} store is unavailable: {source:#}")]
    Unavailable {
        /// Which store (`mongodb`, `embedded`).
        backend: &'static str,
        /// What the driver said.
        #[source]
        source: anyhow::Error,
    },
    /// The write conflicts with the current state (e.g. creating what exists, or losing
    /// a race with a concurrent upload of the same definition).
    #[error("{0}")]
    Conflict(String),
    /// Anything else: a bug, corrupt data, a full disk.
    #[error(transparent)]
    Other(#[from] anyhow::Error),
}

/// Metadata of one stored file (one GridFS file).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct FileMeta {
    /// Path relative to the definition (`app_execute`, `forge/script_common`).
    pub path: String,
    /// Full blob name (`applications/sleep/app_execute`).
    pub filename: String,
    /// sha256 of the content, lowercase hex.
    pub sha256: String,
    /// Size in bytes.
    pub size: u64,
    /// Version (the revision that stored it).
    pub version: u32,
}

/// One revision of a definition.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Revision {
    /// Application or cluster.
    pub kind: DefinitionKind,
    /// Definition name.
    pub name: String,
    /// 1, 2, 3... per name, never reused (tombstones count).
    pub version: u32,
    /// Whether this revision deletes the definition.
    pub deleted: bool,
    /// The definition (canonical JSON; see docs/definitions.md); `null` for a tombstone.
    #[schema(value_type = Option<Object>)]
    pub definition: Option<serde_json::Value>,
    /// Files stored with this revision, sorted by path.
    pub files: Vec<FileMeta>,
    /// Who uploaded (or deleted) it.
    pub uploaded_by: UserName,
    /// When, to the millisecond.
    #[serde(with = "time::serde::rfc3339")]
    pub uploaded_at: OffsetDateTime,
}

/// A stored file with its content.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredFile {
    /// Its metadata.
    pub meta: FileMeta,
    /// Who uploaded it.
    pub uploaded_by: UserName,
    /// When.
    pub uploaded_at: OffsetDateTime,
    /// The text.
    pub text: String,
}

/// What must hold for a new revision to be written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Precondition {
    /// Write whatever exists (create or replace).
    Any,
    /// Only if there is no current definition of that name (create).
    Absent,
}

/// The storage contract. Both implementations pass the same suite.
///
/// Tasks are read two ways: whole ([`Store::get_task`]: inputs and every event), or
/// as their **state** ([`Store::task_state`], [`Store::live_tasks`],
/// [`Store::list_tasks`]): everything but the inputs (`null`) and the event history,
/// of which only the newest event comes (so `events.last()` still numbers the next
/// one). Changes are written as the difference between two copies
/// ([`Store::update_task`]): the fields that changed and the events added.
/// What [`Store::task_changes`] gives: (task, revision written), as they happen.
pub type TaskChanges = futures::stream::BoxStream<'static, Result<(TaskId, u64), StoreError>>;

#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// `mongodb` or `embedded`.
    fn backend(&self) -> &'static str;

    /// Checks the store answers; used by `/readyz`.
    async fn ping(&self) -> Result<(), StoreError>;

    /// Claims the store for this server process where a store can serve only one
    /// server (the embedded store: one SQLite file, one mediator); a second server on
    /// it is refused, saying which process holds it. Several servers may share a
    /// MongoDB store, so there this does nothing. The claim ends with the process.
    fn claim_for_server(&self) -> Result<(), StoreError> {
        Ok(())
    }

    /// Whether several servers may share this store (MongoDB): limits that must hold
    /// for all of them together are kept in the store, not in memory.
    fn serves_many(&self) -> bool {
        false
    }

    /// Appends a revision holding `upload`, all or nothing, and returns it: the next
    /// version of its name, if `precondition` holds ([`revisions`] has the rules).
    async fn put_revision(
        &self,
        upload: &CheckedUpload,
        precondition: Precondition,
        by: &UserName,
        at: OffsetDateTime,
    ) -> Result<Revision, StoreError> {
        revisions::put(self, upload, precondition, by, at).await
    }

    /// Appends a tombstone for the current definition `name`. `None` when there is no
    /// current definition (never existed, or already deleted).
    async fn delete_definition(
        &self,
        kind: DefinitionKind,
        name: &str,
        by: &UserName,
        at: OffsetDateTime,
    ) -> Result<Option<Revision>, StoreError> {
        revisions::delete(self, kind, name, by, at).await
    }

    /// Persists one revision exactly as given, with the blobs of `upload` (none for a
    /// tombstone), all or nothing. `Conflict` if its version of its name exists
    /// already. The rules that choose the revision are [`revisions`]'s; callers use
    /// [`Store::put_revision`] and [`Store::delete_definition`].
    async fn insert_revision(&self, rev: &Revision, upload: Option<&CheckedUpload>) -> Result<(), StoreError>;

    /// The newest revision of `name`, tombstone or not.
    async fn latest_revision(&self, kind: DefinitionKind, name: &str) -> Result<Option<Revision>, StoreError>;

    /// Revision `version` of `name`.
    async fn revision(&self, kind: DefinitionKind, name: &str, version: u32) -> Result<Option<Revision>, StoreError>;

    /// Every revision of `name`, oldest first.
    async fn history(&self, kind: DefinitionKind, name: &str) -> Result<Vec<Revision>, StoreError>;

    /// The current revision of every definition of `kind` that is not deleted, by name.
    async fn list_current(&self, kind: DefinitionKind) -> Result<Vec<Revision>, StoreError>;

    /// The file `path` of `name` as stored by revision `version`.
    async fn read_file(
        &self,
        kind: DefinitionKind,
        name: &str,
        version: u32,
        path: &str,
    ) -> Result<Option<StoredFile>, StoreError>;

    /// Stores the forged scripts of a task as `tasks/<task-id>/script_<phase>`, all of
    /// them as one new version (1 the first time), all or nothing. Returns the version.
    async fn put_task_scripts(
        &self,
        task: &TaskId,
        owner: &UserName,
        forged: &Forged,
        at: OffsetDateTime,
    ) -> Result<u32, StoreError>;

    /// A task's forged script for `phase`: the newest version, or `version`.
    async fn read_task_script(
        &self,
        task: &TaskId,
        phase: Phase,
        version: Option<u32>,
    ) -> Result<Option<StoredTaskScript>, StoreError>;

    /// Stores a new task (with its events).
    async fn insert_task(&self, task: &Task) -> Result<(), StoreError>;

    /// Stores a new task and its forged scripts as version 1, all or nothing: what
    /// creating a task costs in one call. The task's `scripts_version` must be 1.
    async fn create_task(&self, task: &Task, forged: &Forged) -> Result<(), StoreError>;

    /// Writes the change from `before` (a copy as read, whole or as its state) to
    /// `after`, if nobody changed the task since: the stored revision must equal
    /// `before.revision`. Only the fields that differ are written, and the events of
    /// `after` newer than `before`'s newest are appended. Returns `after` as stored
    /// (revision + 1). A lost race is a `Conflict`; the caller reads the task again and
    /// redoes its change.
    async fn update_task(&self, before: &Task, after: &Task) -> Result<Task, StoreError>;

    /// A task by ID, whole: inputs and every event.
    async fn get_task(&self, id: &TaskId) -> Result<Option<Task>, StoreError>;

    /// A task by ID, as its state (no inputs, only the newest event): what the mediator
    /// reads to change it.
    async fn task_state(&self, id: &TaskId) -> Result<Option<Task>, StoreError>;

    /// The events of task `id` after `after` (a `seq`), oldest first.
    async fn task_events(&self, id: &TaskId, after: u64) -> Result<Vec<TaskEvent>, StoreError>;

    /// Takes `key` for `holder` until `until`, as of `at`, or renews it; `None` while
    /// another holder's lease holds ([`leases`] has the rules). Atomic: of servers
    /// claiming one key at once, one wins.
    async fn claim_lease(
        &self,
        key: &str,
        holder: &str,
        until: OffsetDateTime,
        at: OffsetDateTime,
    ) -> Result<Option<leases::Lease>, StoreError>;

    /// Ends `lease` now, if it is still that holder's with that fence; whether it was.
    async fn release_lease(&self, lease: &leases::Lease, at: OffsetDateTime) -> Result<bool, StoreError>;

    /// Every lease record whose key starts with `prefix`, held or lapsed, by key.
    async fn leases(&self, prefix: &str) -> Result<Vec<leases::Lease>, StoreError>;

    /// A counter shared by every server of the store: adds `by` to the uses of `key` in
    /// the window that starts at `window` (`by` 0 only reads) and returns the count
    /// after. Counters lapse after `keep_until`. `Ok(None)`: this store serves one
    /// server, which counts in memory.
    async fn count_use(
        &self,
        key: &str,
        window: OffsetDateTime,
        by: i64,
        keep_until: OffsetDateTime,
    ) -> Result<Option<u64>, StoreError> {
        let _ = (key, window, by, keep_until);
        Ok(None)
    }

    /// Pool `key` of the site's pools (licences, users' shares of clusters; see
    /// [`pools`]).
    async fn pool(&self, key: &str) -> Result<Option<crate::model::queue::Pool>, StoreError>;

    /// Every pool, by key.
    async fn pools(&self) -> Result<Vec<crate::model::queue::Pool>, StoreError>;

    /// Writes `pool` if the stored one still has version `expected` (`None`: if there
    /// is none); whether it did. Atomic: of servers writing one pool at once, one wins.
    /// [`pools`] has the operations built on it.
    async fn put_pool(&self, pool: &crate::model::queue::Pool, expected: Option<u64>) -> Result<bool, StoreError>;

    /// Starts keeping one output of task `task` (`path`, relative to its run
    /// directory): a file nobody sees until [`Store::archive_finish`]. Returns its
    /// handle for the chunks.
    async fn archive_begin(&self, task: &TaskId, path: &str, at: OffsetDateTime) -> Result<String, StoreError>;

    /// Adds chunk `n` (from 0; every chunk [`ARCHIVE_CHUNK`] bytes but the last) to
    /// an unfinished file.
    async fn archive_chunk(&self, handle: &str, n: u32, data: Vec<u8>) -> Result<(), StoreError>;

    /// Makes an unfinished file kept, with its size, checksum and time: the commit
    /// point (before it, the file is in no listing and cannot be read). `owner` is
    /// recorded as who it was uploaded for.
    async fn archive_finish(
        &self,
        handle: &str,
        task: &TaskId,
        file: &ArchivedFile,
        owner: &UserName,
        at: OffsetDateTime,
    ) -> Result<(), StoreError>;

    /// Removes every file kept for `task`, finished or not; how many there were.
    async fn archive_drop(&self, task: &TaskId) -> Result<u64, StoreError>;

    /// The files kept for `task`, by path.
    async fn archived_files(&self, task: &TaskId) -> Result<Vec<ArchivedFile>, StoreError>;

    /// The kept file `path` of `task`, if it is kept.
    async fn archived_file(&self, task: &TaskId, path: &str) -> Result<Option<ArchivedFile>, StoreError>;

    /// Bytes `first..=last` of the kept file `path` of `task`, streamed a chunk at a
    /// time, with the file; `None` when it is not kept.
    async fn archive_read(
        &self,
        task: &TaskId,
        path: &str,
        first: u64,
        last: u64,
    ) -> Result<Option<(ArchivedFile, ArchiveStream)>, StoreError>;

    /// Tasks the mediator still has work on (see `Task::is_live`), oldest first, as
    /// their state.
    async fn live_tasks(&self) -> Result<Vec<Task>, StoreError>;

    /// Every change to a task, by any server sharing the store, as the store pushes it
    /// (MongoDB change streams): the task's ID and the revision the change wrote.
    /// `Ok(None)`: this store pushes nothing (the embedded store, which serves one
    /// server; that server hears its own changes anyway). An error: it could not be
    /// followed now (a MongoDB without change streams, or a lost connection).
    async fn task_changes(&self) -> Result<Option<TaskChanges>, StoreError> {
        Ok(None)
    }

    /// Stores (or replaces) the SSH key of `user` on `cluster`, sealed.
    async fn put_credential(&self, credential: &StoredCredential) -> Result<(), StoreError>;

    /// The sealed key of `user` on `cluster`.
    async fn get_credential(
        &self,
        user: &UserName,
        cluster: &ClusterName,
    ) -> Result<Option<StoredCredential>, StoreError>;

    /// Removes a key; whether there was one.
    async fn delete_credential(&self, user: &UserName, cluster: &ClusterName) -> Result<bool, StoreError>;

    /// What keys exist (never the keys), for one user or all.
    async fn list_credentials(&self, user: Option<&UserName>) -> Result<Vec<CredentialInfo>, StoreError>;

    /// Tasks matching `filter`, newest first, at most `limit`, as their state.
    async fn list_tasks(&self, filter: &TaskFilter, limit: usize) -> Result<Vec<Task>, StoreError>;

    /// How many tasks are in each state (states with none are left out).
    async fn count_tasks(&self) -> Result<Vec<(TaskState, u64)>, StoreError>;

    /// Creates an account; `Conflict` if the name is taken (even by a disabled one).
    async fn insert_account(&self, account: &UserAccount) -> Result<(), StoreError>;

    /// An account by name.
    async fn get_account(&self, name: &UserName) -> Result<Option<UserAccount>, StoreError>;

    /// Every account, by name.
    async fn list_accounts(&self) -> Result<Vec<UserAccount>, StoreError>;

    /// Disables `name` at `at` and revokes all its tokens. Returns the account as it
    /// now is (`None` if there is no such account); disabling twice keeps the first time.
    async fn disable_account(&self, name: &UserName, at: OffsetDateTime) -> Result<Option<UserAccount>, StoreError>;

    /// Stores a new token (its hash).
    async fn insert_token(&self, token: &StoredToken) -> Result<(), StoreError>;

    /// The token whose hash is `hash`.
    async fn token_by_hash(&self, hash: &str) -> Result<Option<TokenInfo>, StoreError>;

    /// The tokens of `user`, oldest first.
    async fn list_tokens(&self, user: &UserName) -> Result<Vec<TokenInfo>, StoreError>;

    /// Revokes token `id` of `user` at `at` (a revoked token keeps its first time).
    /// `None` if `user` has no such token.
    async fn revoke_token(
        &self,
        user: &UserName,
        id: &TokenId,
        at: OffsetDateTime,
    ) -> Result<Option<TokenInfo>, StoreError>;

    /// Records that token `id` was used at `at`.
    async fn touch_token(&self, id: &TokenId, at: OffsetDateTime) -> Result<(), StoreError>;
}

/// Which tasks to list. Every set field must match.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TaskFilter {
    /// Only this user's.
    pub owner: Option<UserName>,
    /// Only tasks in one of these states (any state if empty).
    pub states: Vec<TaskState>,
    /// Only of this application.
    pub application: Option<AppName>,
    /// Only on this cluster.
    pub cluster: Option<ClusterName>,
    /// Only tasks created at or after this time (by the time in their ID).
    pub since: Option<OffsetDateTime>,
    /// Only tasks older than this one (the cursor of the previous page).
    pub before: Option<TaskId>,
}

impl TaskFilter {
    /// The smallest task ID that `since` admits: a UUID v7 with that millisecond and
    /// no random bits. IDs compare as text the way they compare as time.
    pub fn since_id(&self) -> Option<String> {
        self.since.map(|t| {
            let ms = (t.unix_timestamp_nanos() / 1_000_000).clamp(0, (1i128 << 48) - 1) as u64;
            let mut bytes = [0u8; 16];
            bytes[..6].copy_from_slice(&ms.to_be_bytes()[2..]);
            bytes[6] = 0x70;
            bytes[8] = 0x80;
            uuid::Uuid::from_bytes(bytes).hyphenated().to_string()
        })
    }
}

/// The size of an archived file's chunks (GridFS's default), in both stores.
pub const ARCHIVE_CHUNK: usize = 255 * 1024;

/// An archived file's bytes, a chunk at a time.
pub type ArchiveStream = futures::stream::BoxStream<'static, Result<Vec<u8>, StoreError>>;

/// The name of task `task`'s kept output `path` in GridFS (`tasks/<id>/outputs/<path>`).
pub fn archived_name(task: &TaskId, path: &str) -> String {
    format!("tasks/{task}/outputs/{path}")
}

/// The part of the chunks `first..=last` of a file cut into [`ARCHIVE_CHUNK`]s: the
/// chunk numbers to read, and how many bytes to drop from the first and keep of the
/// last (`first`..`last` inclusive; `last` below the size).
pub fn chunk_span(first: u64, last: u64) -> (u32, u32, usize, usize) {
    let c = ARCHIVE_CHUNK as u64;
    let (a, b) = ((first / c) as u32, (last / c) as u32);
    (a, b, (first % c) as usize, (last % c) as usize + 1)
}

/// The chunks `(n, data)` of a span (read in order of `n`) as the bytes asked for:
/// a chunk missing, out of order or short ends the stream with an error, so a
/// reader never takes a short file for a whole one.
pub fn in_order(
    chunks: impl futures::Stream<Item = Result<(u32, Vec<u8>), StoreError>> + Send + 'static,
    span: (u32, u32, usize, usize),
) -> ArchiveStream {
    use futures::StreamExt as _;
    let state = (Some(Box::pin(chunks)), span.0);
    futures::stream::unfold(state, move |(chunks, next)| async move {
        let mut chunks = chunks?;
        let fail = |why: String| Some((Err(StoreError::Other(anyhow::anyhow!(why))), (None, 0)));
        match chunks.next().await {
            None if next > span.1 => None,
            None => fail(format!("chunk {next} of an archived file is missing")),
            Some(Err(e)) => Some((Err(e), (None, 0))),
            Some(Ok((n, _))) if n != next => fail(format!("chunk {next} of an archived file is missing (found {n})")),
            Some(Ok((n, data))) if n < span.1 && data.len() != ARCHIVE_CHUNK => {
                fail(format!("chunk {n} of an archived file is short"))
            }
            Some(Ok((n, data))) => Some((Ok(cut_chunk(data, n, span)), (Some(chunks), next + 1))),
        }
    })
    .boxed()
}

/// Cuts chunk `n` of the span [`chunk_span`] gave down to the bytes asked for.
pub fn cut_chunk(mut data: Vec<u8>, n: u32, span: (u32, u32, usize, usize)) -> Vec<u8> {
    let (a, b, skip, keep) = span;
    if n == b {
        data.truncate(keep);
    }
    if n == a {
        data.drain(..skip.min(data.len()));
    }
    data
}

/// Truncates a timestamp to what both stores keep (milliseconds), so a value reads
/// back equal to what was written.
pub fn to_millis(t: OffsetDateTime) -> OffsetDateTime {
    let t = t.to_offset(time::UtcOffset::UTC);
    t.replace_nanosecond(t.millisecond() as u32 * 1_000_000).expect("millisecond precision is valid")
}

/// The file metadata a revision will record for `upload` at `version`.
fn file_metas(upload: &CheckedUpload, version: u32) -> Vec<FileMeta> {
    upload
        .files
        .iter()
        .map(|f| FileMeta {
            path: f.path.clone(),
            filename: upload.kind.blob_name(&upload.name, &f.path),
            sha256: f.sha256.clone(),
            size: f.text.len() as u64,
            version,
        })
        .collect()
}

/// What a task script blob records besides sha256, version and uploader, in both stores.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct TaskScriptMeta {
    task: TaskId,
    phase: Phase,
    application: crate::model::DefinitionRef<crate::model::AppName>,
    cluster: crate::model::DefinitionRef<crate::model::ClusterName>,
}

/// Refuses to hand out a blob whose content no longer matches its recorded sha256.
pub(crate) fn verify_sha(filename: &str, version: u32, expected: &str, text: &str) -> Result<(), StoreError> {
    let actual = crate::definitions::script::sha256_hex(text.as_bytes());
    if actual != expected {
        return Err(StoreError::Other(anyhow::anyhow!(
            "stored file {filename} version {version} is corrupt: sha256 {actual}, recorded {expected}"
        )));
    }
    Ok(())
}

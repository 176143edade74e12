//! The embedded store: one SQLite file under the data directory, zero setup.
//!
//! Why SQLite (through `rusqlite` with the bundled library): real multi-statement
//! transactions make every upload all or nothing without extra machinery, blobs live in
//! the same file and transaction as the records that point at them, SQL answers the
//! list/filter queries the API will need, and the file can be inspected and backed up
//! with the `sqlite3` tool every admin has. `synchronous=FULL` with WAL: a committed
//! write survives power loss, which the mediator relies on when it records an intent
//! before submitting a job.

mod accounts;
mod archive;
mod definitions;
mod leases;
mod tasks;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::Context as _;
use async_trait::async_trait;
use rusqlite::Connection;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use super::{
    CredentialInfo, Revision, Store, StoreError, StoredCredential, StoredFile, TaskFilter, to_millis, verify_sha,
};
use crate::definitions::{CheckedUpload, DefinitionKind};
use crate::model::accounts::{StoredToken, TokenId, TokenInfo, UserAccount};
use crate::model::archive::ArchivedFile;
use crate::model::{ClusterName, Forged, Phase, StoredTaskScript, Task, TaskEvent, TaskId, TaskState, UserName};

/// Schema version kept in `PRAGMA user_version`.
/// 1: revisions, blobs, tasks. 2: `blobs.meta` (what a task script was forged from).
/// 3: `tasks.live`, `tasks.rev` (the mediator's work list, compare-and-swap), credentials.
/// 4: `tasks.state`, `tasks.application`, `tasks.cluster` (list filters), users, tokens.
/// 5: a task's `doc` is its state; `tasks.inputs`, and `task_events` (one row per event).
/// 6: leases. 7: pools. 8: archived outputs (`archive_files`, `archive_chunks`).
const SCHEMA_VERSION: i64 = 8;

const SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS revisions (
    kind        TEXT    NOT NULL,
    name        TEXT    NOT NULL,
    version     INTEGER NOT NULL,
    deleted     INTEGER NOT NULL,
    definition  TEXT,
    files       TEXT    NOT NULL,
    uploaded_by TEXT    NOT NULL,
    uploaded_at TEXT    NOT NULL,
    PRIMARY KEY (kind, name, version)
) WITHOUT ROWID;

-- Blobs, named exactly like their GridFS counterparts.
CREATE TABLE IF NOT EXISTS blobs (
    filename    TEXT    NOT NULL,
    version     INTEGER NOT NULL,
    sha256      TEXT    NOT NULL,
    size        INTEGER NOT NULL,
    uploaded_by TEXT    NOT NULL,
    uploaded_at TEXT    NOT NULL,
    content     BLOB    NOT NULL,
    meta        TEXT,
    PRIMARY KEY (filename, version)
);

-- Task IDs are UUID v7, so ordering by id is ordering by creation.
-- `doc` is the task's state (JSON, without inputs and with only its newest event);
-- the other columns repeat what queries filter on.
CREATE TABLE IF NOT EXISTS tasks (
    id          TEXT PRIMARY KEY,
    owner       TEXT NOT NULL,
    doc         TEXT NOT NULL,
    inputs      TEXT NOT NULL DEFAULT 'null',
    live        INTEGER NOT NULL DEFAULT 0,
    rev         INTEGER NOT NULL DEFAULT 0,
    state       TEXT NOT NULL DEFAULT '',
    application TEXT NOT NULL DEFAULT '',
    cluster     TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS tasks_by_owner ON tasks (owner, id);

-- A task's events, appended as they happen.
CREATE TABLE IF NOT EXISTS task_events (
    task        TEXT NOT NULL,
    seq         INTEGER NOT NULL,
    doc         TEXT NOT NULL,
    PRIMARY KEY (task, seq)
) WITHOUT ROWID;

-- Leases: who holds which piece of work until when (version 6).
CREATE TABLE IF NOT EXISTS leases (
    key         TEXT PRIMARY KEY,
    holder      TEXT NOT NULL,
    fence       INTEGER NOT NULL,
    expires_ms  INTEGER NOT NULL
) WITHOUT ROWID;

-- The site's pools (licences, users' shares of clusters): one row per pool, the
-- pool as JSON, changed by compare-and-swap on `version` (version 7).
CREATE TABLE IF NOT EXISTS pools (
    key         TEXT PRIMARY KEY,
    version     INTEGER NOT NULL,
    doc         TEXT NOT NULL
) WITHOUT ROWID;

-- Tasks' kept outputs (version 8): a file is seen once `done`; its chunks are cut
-- as GridFS cuts them.
CREATE TABLE IF NOT EXISTS archive_files (
    id          INTEGER PRIMARY KEY,
    task        TEXT    NOT NULL,
    path        TEXT    NOT NULL,
    done        INTEGER NOT NULL,
    size        INTEGER NOT NULL,
    sha256      TEXT    NOT NULL,
    modified    TEXT    NOT NULL,
    meta        TEXT    NOT NULL,
    at          TEXT    NOT NULL
);
CREATE INDEX IF NOT EXISTS archive_by_task ON archive_files (task, path);
CREATE TABLE IF NOT EXISTS archive_chunks (
    file        INTEGER NOT NULL,
    n           INTEGER NOT NULL,
    data        BLOB    NOT NULL,
    PRIMARY KEY (file, n)
) WITHOUT ROWID;

CREATE TABLE IF NOT EXISTS users (
    name        TEXT PRIMARY KEY,
    role        TEXT NOT NULL,
    created_by  TEXT NOT NULL,
    created_at  TEXT NOT NULL,
    disabled_at TEXT
);

-- Tokens by the sha256 of the token; the token itself is never stored.
CREATE TABLE IF NOT EXISTS tokens (
    id           TEXT PRIMARY KEY,
    user         TEXT NOT NULL,
    hash         TEXT NOT NULL UNIQUE,
    label        TEXT NOT NULL,
    hint         TEXT NOT NULL,
    created_by   TEXT NOT NULL,
    created_at   TEXT NOT NULL,
    expires_at   TEXT NOT NULL,
    revoked_at   TEXT,
    last_used_at TEXT
);
CREATE INDEX IF NOT EXISTS tokens_by_user ON tokens (user, id);

-- SSH keys, sealed with the server key (crate::secrets).
CREATE TABLE IF NOT EXISTS credentials (
    user        TEXT NOT NULL,
    cluster     TEXT NOT NULL,
    key_type    TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    sealed      BLOB NOT NULL,
    created_by  TEXT NOT NULL,
    created_at  TEXT NOT NULL,
    PRIMARY KEY (user, cluster)
);
"#;

/// Created after migrations, since they need columns older files gain there.
const LATE_INDEXES: &str = "CREATE INDEX IF NOT EXISTS tasks_live ON tasks (live, id);
CREATE INDEX IF NOT EXISTS tasks_by_state ON tasks (state, id);";

/// Adds `column` (with its SQL type and default) to `table` unless it is there.
fn add_column(conn: &Connection, table: &str, column: &str, decl: &str) -> rusqlite::Result<()> {
    let has: bool =
        conn.prepare(&format!("SELECT 1 FROM pragma_table_info('{table}') WHERE name = ?1"))?.exists([column])?;
    if !has {
        conn.execute_batch(&format!("ALTER TABLE {table} ADD COLUMN {column} {decl}"))?;
    }
    Ok(())
}

/// Brings a schema at version `found` up to [`SCHEMA_VERSION`]. New files already
/// have every column (`SCHEMA`); this only adds what older files lack.
fn migrate(conn: &Connection, found: i64) -> rusqlite::Result<()> {
    if (1..2).contains(&found) {
        add_column(conn, "blobs", "meta", "TEXT")?;
    }
    if (1..4).contains(&found) {
        add_column(conn, "tasks", "live", "INTEGER NOT NULL DEFAULT 0")?;
        add_column(conn, "tasks", "rev", "INTEGER NOT NULL DEFAULT 0")?;
        add_column(conn, "tasks", "state", "TEXT NOT NULL DEFAULT ''")?;
        add_column(conn, "tasks", "application", "TEXT NOT NULL DEFAULT ''")?;
        add_column(conn, "tasks", "cluster", "TEXT NOT NULL DEFAULT ''")?;
        // The filter columns of tasks written before they existed, from the documents.
        conn.execute_batch(
            "UPDATE tasks SET state = coalesce(json_extract(doc, '$.state'), ''), \
             application = coalesce(json_extract(doc, '$.application.name'), ''), \
             cluster = coalesce(json_extract(doc, '$.cluster.name'), '') WHERE state = ''",
        )?;
    }
    if (1..5).contains(&found) {
        add_column(conn, "tasks", "inputs", "TEXT NOT NULL DEFAULT 'null'")?;
        tasks::split_old_documents(conn)?;
    }
    Ok(())
}

/// The SQLite file inside the data directory.
pub const DB_FILE: &str = "hpcforge.sqlite3";

/// The file a server holds an exclusive lock on (`flock`) while it serves the data
/// directory; it holds the server's process ID. The kernel drops the lock when the
/// process ends, however it ends, so a killed server leaves nothing to clean up.
pub const SERVER_LOCK: &str = "server.lock";

/// The embedded store.
#[derive(Clone)]
pub struct EmbeddedStore {
    conn: Arc<Mutex<Connection>>,
    path: PathBuf,
    /// The lock file held while a server runs on this store ([`SERVER_LOCK`]).
    server: Arc<Mutex<Option<std::fs::File>>>,
}

impl std::fmt::Debug for EmbeddedStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedStore").field("path", &self.path).finish()
    }
}

impl EmbeddedStore {
    /// Opens (creating if needed) the store in `data_dir`.
    pub fn open(data_dir: &Path) -> anyhow::Result<Self> {
        std::fs::create_dir_all(data_dir)
            .with_context(|| format!("creating the data directory {}", data_dir.display()))?;
        let path = data_dir.join(DB_FILE);
        let conn = Connection::open(&path).with_context(|| format!("opening {}", path.display()))?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        let found: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
        if found > SCHEMA_VERSION {
            anyhow::bail!(
                "{} has schema version {found}, newer than this hpcforge understands ({SCHEMA_VERSION}); upgrade hpcforge",
                path.display()
            );
        }
        conn.execute_batch(SCHEMA).with_context(|| format!("creating the schema in {}", path.display()))?;
        migrate(&conn, found).with_context(|| format!("upgrading the schema of {}", path.display()))?;
        conn.execute_batch(LATE_INDEXES)?;
        conn.pragma_update(None, "user_version", SCHEMA_VERSION)?;
        Ok(Self { conn: Arc::new(Mutex::new(conn)), path, server: Arc::default() })
    }

    /// The SQLite file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// See [`Store::claim_for_server`]: takes the lock on [`SERVER_LOCK`] beside the
    /// SQLite file, once per store (a clone shares it).
    fn claim(&self) -> anyhow::Result<()> {
        use std::io::{Read as _, Seek as _, Write as _};
        let mut held = self.server.lock().unwrap_or_else(|p| p.into_inner());
        if held.is_some() {
            return Ok(());
        }
        let dir = self.path.parent().unwrap_or(Path::new("."));
        let lock = dir.join(SERVER_LOCK);
        let mut f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&lock)
            .with_context(|| format!("opening {}", lock.display()))?;
        match f.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                let mut pid = String::new();
                let _ = f.read_to_string(&mut pid);
                let pid = pid.trim();
                anyhow::bail!(
                    "another hpcforge server{} is serving the embedded store in {}: the embedded store serves one server \
                     only (two would both submit the same tasks); stop that one, give this one its own --data-dir, or \
                     run several servers on one MongoDB (--mongodb-uri)",
                    if pid.is_empty() { String::new() } else { format!(" (process {pid})") },
                    dir.display()
                );
            }
            Err(std::fs::TryLockError::Error(e)) => {
                return Err(anyhow::Error::new(e).context(format!("locking {}", lock.display())));
            }
        }
        f.set_len(0)
            .and_then(|()| f.rewind())
            .and_then(|()| writeln!(f, "{}", std::process::id()))
            .with_context(|| format!("writing {}", lock.display()))?;
        *held = Some(f);
        Ok(())
    }

    /// Runs `f` with the connection on the blocking pool.
    async fn with_conn<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Connection) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let conn = self.conn.clone();
        tokio::task::spawn_blocking(move || {
            // A panic while holding the lock poisons it; the connection itself is
            // still consistent (SQLite rolled back the open transaction), so carry on.
            let mut guard = conn.lock().unwrap_or_else(|p| p.into_inner());
            f(&mut guard)
        })
        .await
        .map_err(|e| StoreError::Other(anyhow::anyhow!("store task failed: {e}")))?
    }
}

/// A constraint violation (a name, version or ID taken) as a `Conflict`.
fn conflict_or_sql(e: rusqlite::Error) -> StoreError {
    if e.sqlite_error_code() == Some(rusqlite::ErrorCode::ConstraintViolation) {
        StoreError::Conflict(e.to_string())
    } else {
        sql_err(e)
    }
}

fn sql_err(e: rusqlite::Error) -> StoreError {
    use rusqlite::ErrorCode::{DatabaseBusy, DatabaseLocked};
    match e.sqlite_error_code() {
        Some(DatabaseBusy | DatabaseLocked) => StoreError::Unavailable { backend: "embedded", source: e.into() },
        _ => StoreError::Other(e.into()),
    }
}

fn ts(t: OffsetDateTime) -> String {
    to_millis(t).format(&Rfc3339).expect("UTC timestamps format")
}

fn parse_ts(s: &str) -> Result<OffsetDateTime, StoreError> {
    OffsetDateTime::parse(s, &Rfc3339)
        .map_err(|e| StoreError::Other(anyhow::anyhow!("bad timestamp {s:?} in store: {e}")))
}

pub(super) fn kind_str(kind: DefinitionKind) -> &'static str {
    kind.singular()
}

#[async_trait]
impl Store for EmbeddedStore {
    fn backend(&self) -> &'static str {
        "embedded"
    }

    fn claim_for_server(&self) -> Result<(), StoreError> {
        self.claim().map_err(StoreError::Other)
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.with_conn(|c| c.query_row("SELECT count(*) FROM revisions", [], |_| Ok(())).map_err(sql_err)).await
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_version_1_file_is_upgraded_in_place_and_keeps_its_data() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(DB_FILE);
        {
            // The version 1 schema, as the first release wrote it.
            let c = Connection::open(&path).unwrap();
            c.execute_batch(
                "CREATE TABLE blobs (filename TEXT NOT NULL, version INTEGER NOT NULL, sha256 TEXT NOT NULL, size INTEGER NOT NULL,
                   uploaded_by TEXT NOT NULL, uploaded_at TEXT NOT NULL, content BLOB NOT NULL, PRIMARY KEY (filename, version));
                 INSERT INTO blobs VALUES ('applications/a/app_execute', 1, 'x', 1, 'admin', '2026-01-01T00:00:00Z', x'41');
                 PRAGMA user_version = 1;",
            )
            .unwrap();
        }
        let store = EmbeddedStore::open(dir.path()).unwrap();
        let c = store.conn.lock().unwrap();
        let v: i64 = c.pragma_query_value(None, "user_version", |r| r.get(0)).unwrap();
        assert_eq!(v, SCHEMA_VERSION);
        let (n, meta): (i64, Option<String>) =
            c.query_row("SELECT count(*), max(meta) FROM blobs", [], |r| Ok((r.get(0)?, r.get(1)?))).unwrap();
        assert_eq!((n, meta), (1, None));
    }

    #[tokio::test]
    async fn a_version_4_file_keeps_its_tasks_with_their_events_moved_to_their_own_table() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(DB_FILE);
        let mut old = crate::model::task::sample_task(OffsetDateTime::UNIX_EPOCH);
        old.inputs = serde_json::json!([{ "name": "sleep", "type": "int", "value": 5 }]);
        old.record(OffsetDateTime::UNIX_EPOCH, None, "created");
        old.record(OffsetDateTime::UNIX_EPOCH, None, "second");
        {
            // Schema 4: the whole task, events and inputs included, in `doc`.
            let c = Connection::open(&path).unwrap();
            c.execute_batch(
                "CREATE TABLE tasks (id TEXT PRIMARY KEY, owner TEXT NOT NULL, doc TEXT NOT NULL,
                   live INTEGER NOT NULL DEFAULT 0, rev INTEGER NOT NULL DEFAULT 0, state TEXT NOT NULL DEFAULT '',
                   application TEXT NOT NULL DEFAULT '', cluster TEXT NOT NULL DEFAULT '');
                 PRAGMA user_version = 4;",
            )
            .unwrap();
            c.execute(
                "INSERT INTO tasks (id, owner, doc, live, state, application, cluster) VALUES (?1, 'alice', ?2, 1, 'submitting', 'sleep', 'c')",
                rusqlite::params![old.id.to_string(), serde_json::to_string(&old).unwrap()],
            )
            .unwrap();
        }
        let store = EmbeddedStore::open(dir.path()).unwrap();
        assert_eq!(store.get_task(&old.id).await.unwrap().unwrap(), old, "nothing lost");
        let state = store.task_state(&old.id).await.unwrap().unwrap();
        assert_eq!((state.inputs, state.events.len()), (serde_json::Value::Null, 1));
        assert_eq!(store.task_events(&old.id, 1).await.unwrap().len(), 1);
    }

    #[test]
    fn a_newer_schema_is_refused_rather_than_misread() {
        let dir = tempfile::tempdir().unwrap();
        let c = Connection::open(dir.path().join(DB_FILE)).unwrap();
        c.pragma_update(None, "user_version", SCHEMA_VERSION + 1).unwrap();
        drop(c);
        let err = EmbeddedStore::open(dir.path()).unwrap_err().to_string();
        assert!(err.contains("newer than this hpcforge understands"), "{err}");
    }
}

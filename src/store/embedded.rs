//! The embedded store: one SQLite file under the data directory, zero setup.
//!
//! Why SQLite (through `rusqlite` with the bundled library): real multi-statement
//! transactions make every upload all or nothing without extra machinery, blobs live in
//! the same file and transaction as the records that point at them, SQL answers the
//! list/filter queries the API will need, and the file can be inspected and backed up
//! with the `sqlite3` tool every admin has. `synchronous=FULL` with WAL: a committed
//! write survives power loss, which the mediator relies on when it records an intent
//! before submitting a job.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::Context as _;
use async_trait::async_trait;
use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use super::{
    CredentialInfo, FileMeta, Precondition, Revision, Store, StoreError, StoredCredential, StoredFile, TaskFilter,
    TaskScriptMeta, exists_message, file_metas, to_millis,
};
use crate::definitions::{CheckedUpload, DefinitionKind};
use crate::model::accounts::{StoredToken, TokenId, TokenInfo, UserAccount};
use crate::model::task::task_script_name;
use crate::model::{ClusterName, Forged, Phase, StoredTaskScript, Task, TaskId, TaskState, UserName};

/// Schema version kept in `PRAGMA user_version`.
/// 1: revisions, blobs, tasks. 2: `blobs.meta` (what a task script was forged from).
/// 3: `tasks.live`, `tasks.rev` (the mediator's work list, compare-and-swap), credentials.
/// 4: `tasks.state`, `tasks.application`, `tasks.cluster` (list filters), users, tokens.
const SCHEMA_VERSION: i64 = 4;

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
-- `doc` is the whole task (JSON); the other columns repeat what queries filter on.
CREATE TABLE IF NOT EXISTS tasks (
    id          TEXT PRIMARY KEY,
    owner       TEXT NOT NULL,
    doc         TEXT NOT NULL,
    live        INTEGER NOT NULL DEFAULT 0,
    rev         INTEGER NOT NULL DEFAULT 0,
    state       TEXT NOT NULL DEFAULT '',
    application TEXT NOT NULL DEFAULT '',
    cluster     TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS tasks_by_owner ON tasks (owner, id);

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
    Ok(())
}

/// The SQLite file inside the data directory.
pub const DB_FILE: &str = "hpcforge.sqlite3";

/// The embedded store.
#[derive(Clone)]
pub struct EmbeddedStore {
    conn: Arc<Mutex<Connection>>,
    path: PathBuf,
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
        Ok(Self { conn: Arc::new(Mutex::new(conn)), path })
    }

    /// The SQLite file.
    pub fn path(&self) -> &Path {
        &self.path
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

fn kind_str(kind: DefinitionKind) -> &'static str {
    kind.singular()
}

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

fn latest_in(conn: &Connection, kind: DefinitionKind, name: &str) -> Result<Option<Revision>, StoreError> {
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

fn insert_revision(conn: &Connection, rev: &Revision) -> Result<(), StoreError> {
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
    .map_err(sql_err)?;
    Ok(())
}

#[async_trait]
impl Store for EmbeddedStore {
    fn backend(&self) -> &'static str {
        "embedded"
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.with_conn(|c| c.query_row("SELECT count(*) FROM revisions", [], |_| Ok(())).map_err(sql_err)).await
    }

    async fn put_revision(
        &self,
        upload: &CheckedUpload,
        precondition: Precondition,
        by: &UserName,
        at: OffsetDateTime,
    ) -> Result<Revision, StoreError> {
        let upload = upload.clone();
        let by = by.clone();
        self.with_conn(move |conn| {
            // IMMEDIATE takes the write lock up front, so reading the latest version and
            // writing the next one cannot interleave with another writer.
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(sql_err)?;
            let latest = latest_in(&tx, upload.kind, &upload.name)?;
            if let (Precondition::Absent, Some(cur)) = (precondition, &latest)
                && !cur.deleted
            {
                return Err(StoreError::Conflict(exists_message(upload.kind, &upload.name, cur.version)));
            }
            let version = latest.map_or(1, |r| r.version + 1);
            let at = to_millis(at);
            let files = file_metas(&upload, version);
            {
                let mut stmt = tx
                    .prepare(
                        "INSERT INTO blobs (filename, version, sha256, size, uploaded_by, uploaded_at, content) \
                         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                    )
                    .map_err(sql_err)?;
                for (meta, file) in files.iter().zip(&upload.files) {
                    stmt.execute(params![
                        meta.filename,
                        version,
                        meta.sha256,
                        meta.size as i64,
                        by.as_str(),
                        ts(at),
                        file.text.as_bytes()
                    ])
                    .map_err(sql_err)?;
                }
            }
            let rev = Revision {
                kind: upload.kind,
                name: upload.name.clone(),
                version,
                deleted: false,
                definition: Some(upload.definition.clone()),
                files,
                uploaded_by: by,
                uploaded_at: at,
            };
            insert_revision(&tx, &rev)?;
            tx.commit().map_err(sql_err)?;
            Ok(rev)
        })
        .await
    }

    async fn delete_definition(
        &self,
        kind: DefinitionKind,
        name: &str,
        by: &UserName,
        at: OffsetDateTime,
    ) -> Result<Option<Revision>, StoreError> {
        let name = name.to_owned();
        let by = by.clone();
        self.with_conn(move |conn| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(sql_err)?;
            let Some(latest) = latest_in(&tx, kind, &name)? else { return Ok(None) };
            if latest.deleted {
                return Ok(None);
            }
            let rev = Revision {
                kind,
                name,
                version: latest.version + 1,
                deleted: true,
                definition: None,
                files: Vec::new(),
                uploaded_by: by,
                uploaded_at: to_millis(at),
            };
            insert_revision(&tx, &rev)?;
            tx.commit().map_err(sql_err)?;
            Ok(Some(rev))
        })
        .await
    }

    async fn latest_revision(&self, kind: DefinitionKind, name: &str) -> Result<Option<Revision>, StoreError> {
        let name = name.to_owned();
        self.with_conn(move |c| latest_in(c, kind, &name)).await
    }

    async fn revision(&self, kind: DefinitionKind, name: &str, version: u32) -> Result<Option<Revision>, StoreError> {
        let name = name.to_owned();
        self.with_conn(move |c| {
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

    async fn history(&self, kind: DefinitionKind, name: &str) -> Result<Vec<Revision>, StoreError> {
        let name = name.to_owned();
        self.with_conn(move |c| {
            let mut stmt = c
                .prepare(&format!("SELECT {REV_COLS} FROM revisions WHERE kind = ?1 AND name = ?2 ORDER BY version"))
                .map_err(sql_err)?;
            let rows = stmt.query_map(params![kind_str(kind), name], row_to_revision).map_err(sql_err)?;
            rows.map(|r| r.map_err(sql_err).and_then(RawRevision::decode)).collect()
        })
        .await
    }

    async fn list_current(&self, kind: DefinitionKind) -> Result<Vec<Revision>, StoreError> {
        self.with_conn(move |c| {
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

    async fn read_file(
        &self,
        kind: DefinitionKind,
        name: &str,
        version: u32,
        path: &str,
    ) -> Result<Option<StoredFile>, StoreError> {
        let filename = kind.blob_name(name, path);
        let path = path.to_owned();
        self.with_conn(move |c| {
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

    async fn put_task_scripts(
        &self,
        task: &TaskId,
        owner: &UserName,
        forged: &Forged,
        at: OffsetDateTime,
    ) -> Result<u32, StoreError> {
        let (task, owner, forged) = (*task, owner.clone(), forged.clone());
        self.with_conn(move |conn| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(sql_err)?;
            let names: Vec<String> = forged.scripts.iter().map(|s| task_script_name(&task, s.phase)).collect();
            let mut version = 1;
            for name in &names {
                let v: Option<u32> = tx
                    .query_row("SELECT MAX(version) FROM blobs WHERE filename = ?1", params![name], |r| r.get(0))
                    .map_err(sql_err)?;
                version = version.max(v.map_or(1, |v| v + 1));
            }
            for (script, name) in forged.scripts.iter().zip(&names) {
                let meta = TaskScriptMeta {
                    task,
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
                .map_err(sql_err)?;
            }
            tx.commit().map_err(sql_err)?;
            Ok(version)
        })
        .await
    }

    async fn read_task_script(
        &self,
        task: &TaskId,
        phase: Phase,
        version: Option<u32>,
    ) -> Result<Option<StoredTaskScript>, StoreError> {
        let name = task_script_name(task, phase);
        self.with_conn(move |c| {
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

    async fn insert_task(&self, task: &Task) -> Result<(), StoreError> {
        let doc = serde_json::to_string(task).map_err(|e| StoreError::Other(e.into()))?;
        let (id, owner, live, rev) =
            (task.id.to_string(), task.owner.to_string(), task.is_live(), task.revision as i64);
        let (state, app, cluster) =
            (task.state.as_str(), task.application.name.to_string(), task.cluster.name.to_string());
        self.with_conn(move |c| {
            c.execute(
                "INSERT INTO tasks (id, owner, doc, live, rev, state, application, cluster) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                params![id, owner, doc, live, rev, state, app, cluster],
            )
            .map_err(|e| {
                if e.sqlite_error_code() == Some(rusqlite::ErrorCode::ConstraintViolation) {
                    StoreError::Conflict(format!("task {id} already exists"))
                } else {
                    sql_err(e)
                }
            })?;
            Ok(())
        })
        .await
    }

    async fn update_task(&self, task: &Task) -> Result<Task, StoreError> {
        let mut next = task.clone();
        next.revision += 1;
        let doc = serde_json::to_string(&next).map_err(|e| StoreError::Other(e.into()))?;
        let (id, live, old, new) = (task.id.to_string(), next.is_live(), task.revision as i64, next.revision as i64);
        let state = next.state.as_str();
        self.with_conn(move |c| {
            let n = c
                .execute(
                    "UPDATE tasks SET doc = ?1, live = ?2, rev = ?3, state = ?6 WHERE id = ?4 AND rev = ?5",
                    params![doc, live, new, id, old, state],
                )
                .map_err(sql_err)?;
            if n == 1 {
                return Ok(next);
            }
            let exists =
                c.prepare("SELECT 1 FROM tasks WHERE id = ?1").and_then(|mut s| s.exists([&id])).map_err(sql_err)?;
            Err(if exists {
                StoreError::Conflict(format!("task {id} was changed meanwhile (expected revision {old})"))
            } else {
                StoreError::Other(anyhow::anyhow!("task {id} does not exist"))
            })
        })
        .await
    }

    async fn live_tasks(&self) -> Result<Vec<Task>, StoreError> {
        self.with_conn(|c| {
            let mut stmt = c.prepare("SELECT doc FROM tasks WHERE live = 1 ORDER BY id").map_err(sql_err)?;
            let rows = stmt.query_map([], |r| r.get::<_, String>(0)).map_err(sql_err)?;
            rows.map(|r| {
                let d = r.map_err(sql_err)?;
                serde_json::from_str(&d).map_err(|e| StoreError::Other(anyhow::anyhow!("corrupt task: {e}")))
            })
            .collect()
        })
        .await
    }

    async fn put_credential(&self, credential: &StoredCredential) -> Result<(), StoreError> {
        let c = credential.clone();
        self.with_conn(move |conn| {
            conn.execute(
                "INSERT INTO credentials (user, cluster, key_type, fingerprint, sealed, created_by, created_at) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7) ON CONFLICT (user, cluster) DO UPDATE SET \
                 key_type = excluded.key_type, fingerprint = excluded.fingerprint, sealed = excluded.sealed, \
                 created_by = excluded.created_by, created_at = excluded.created_at",
                params![
                    c.info.user.as_str(),
                    c.info.cluster.as_str(),
                    c.info.key_type,
                    c.info.fingerprint,
                    c.sealed,
                    c.info.created_by.as_str(),
                    ts(c.info.created_at)
                ],
            )
            .map_err(sql_err)?;
            Ok(())
        })
        .await
    }

    async fn get_credential(
        &self,
        user: &UserName,
        cluster: &ClusterName,
    ) -> Result<Option<StoredCredential>, StoreError> {
        let (user, cluster) = (user.to_string(), cluster.to_string());
        self.with_conn(move |c| {
            c.query_row(
                &format!("SELECT {CRED_COLS}, sealed FROM credentials WHERE user = ?1 AND cluster = ?2"),
                params![user, cluster],
                |r| Ok((raw_credential(r)?, r.get::<_, Vec<u8>>(6)?)),
            )
            .optional()
            .map_err(sql_err)?
            .map(|(info, sealed)| Ok(StoredCredential { info: info?, sealed }))
            .transpose()
        })
        .await
    }

    async fn delete_credential(&self, user: &UserName, cluster: &ClusterName) -> Result<bool, StoreError> {
        let (user, cluster) = (user.to_string(), cluster.to_string());
        self.with_conn(move |c| {
            let n = c
                .execute("DELETE FROM credentials WHERE user = ?1 AND cluster = ?2", params![user, cluster])
                .map_err(sql_err)?;
            Ok(n > 0)
        })
        .await
    }

    async fn list_credentials(&self, user: Option<&UserName>) -> Result<Vec<CredentialInfo>, StoreError> {
        let user = user.map(|u| u.to_string());
        self.with_conn(move |c| {
            let mut stmt = c
                .prepare(&format!(
                    "SELECT {CRED_COLS} FROM credentials WHERE (?1 IS NULL OR user = ?1) ORDER BY user, cluster"
                ))
                .map_err(sql_err)?;
            let rows = stmt.query_map(params![user], raw_credential).map_err(sql_err)?;
            rows.map(|r| r.map_err(sql_err)?).collect()
        })
        .await
    }

    async fn get_task(&self, id: &TaskId) -> Result<Option<Task>, StoreError> {
        let id = id.to_string();
        self.with_conn(move |c| {
            let doc: Option<String> = c
                .query_row("SELECT doc FROM tasks WHERE id = ?1", params![id], |r| r.get(0))
                .optional()
                .map_err(sql_err)?;
            doc.map(|d| {
                serde_json::from_str(&d).map_err(|e| StoreError::Other(anyhow::anyhow!("corrupt task {id}: {e}")))
            })
            .transpose()
        })
        .await
    }

    async fn list_tasks(&self, filter: &TaskFilter, limit: usize) -> Result<Vec<Task>, StoreError> {
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
        self.with_conn(move |c| {
            let mut stmt = c.prepare(&sql).map_err(sql_err)?;
            let rows =
                stmt.query_map(rusqlite::params_from_iter(args.iter()), |r| r.get::<_, String>(0)).map_err(sql_err)?;
            rows.map(|r| {
                let d = r.map_err(sql_err)?;
                serde_json::from_str(&d).map_err(|e| StoreError::Other(anyhow::anyhow!("corrupt task: {e}")))
            })
            .collect()
        })
        .await
    }

    async fn count_tasks(&self) -> Result<Vec<(TaskState, u64)>, StoreError> {
        self.with_conn(|c| {
            let mut stmt =
                c.prepare("SELECT state, count(*) FROM tasks GROUP BY state ORDER BY state").map_err(sql_err)?;
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

    async fn insert_account(&self, account: &UserAccount) -> Result<(), StoreError> {
        let a = account.clone();
        self.with_conn(move |c| {
            c.execute(
                "INSERT INTO users (name, role, created_by, created_at, disabled_at) VALUES (?1, ?2, ?3, ?4, ?5)",
                params![
                    a.name.as_str(),
                    a.role.as_str(),
                    a.created_by.as_str(),
                    ts(a.created_at),
                    a.disabled_at.map(ts)
                ],
            )
            .map_err(|e| {
                if e.sqlite_error_code() == Some(rusqlite::ErrorCode::ConstraintViolation) {
                    StoreError::Conflict(format!("user `{}` exists already", a.name))
                } else {
                    sql_err(e)
                }
            })?;
            Ok(())
        })
        .await
    }

    async fn get_account(&self, name: &UserName) -> Result<Option<UserAccount>, StoreError> {
        let name = name.to_string();
        self.with_conn(move |c| {
            c.query_row(&format!("SELECT {USER_COLS} FROM users WHERE name = ?1"), [&name], raw_account)
                .optional()
                .map_err(sql_err)?
                .transpose()
        })
        .await
    }

    async fn list_accounts(&self) -> Result<Vec<UserAccount>, StoreError> {
        self.with_conn(|c| {
            let mut stmt = c.prepare(&format!("SELECT {USER_COLS} FROM users ORDER BY name")).map_err(sql_err)?;
            let rows = stmt.query_map([], raw_account).map_err(sql_err)?;
            rows.map(|r| r.map_err(sql_err)?).collect()
        })
        .await
    }

    async fn disable_account(&self, name: &UserName, at: OffsetDateTime) -> Result<Option<UserAccount>, StoreError> {
        let (name, at) = (name.to_string(), ts(to_millis(at)));
        self.with_conn(move |c| {
            let tx = c.transaction_with_behavior(TransactionBehavior::Immediate).map_err(sql_err)?;
            tx.execute("UPDATE users SET disabled_at = ?2 WHERE name = ?1 AND disabled_at IS NULL", params![name, at])
                .map_err(sql_err)?;
            tx.execute("UPDATE tokens SET revoked_at = ?2 WHERE user = ?1 AND revoked_at IS NULL", params![name, at])
                .map_err(sql_err)?;
            let account = tx
                .query_row(&format!("SELECT {USER_COLS} FROM users WHERE name = ?1"), [&name], raw_account)
                .optional()
                .map_err(sql_err)?
                .transpose()?;
            tx.commit().map_err(sql_err)?;
            Ok(account)
        })
        .await
    }

    async fn insert_token(&self, token: &StoredToken) -> Result<(), StoreError> {
        let t = token.clone();
        self.with_conn(move |c| {
            let i = &t.info;
            c.execute(
                "INSERT INTO tokens (id, user, hash, label, hint, created_by, created_at, expires_at, revoked_at, last_used_at) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
                params![
                    i.id.to_string(),
                    i.user.as_str(),
                    t.hash,
                    i.label,
                    i.hint,
                    i.created_by.as_str(),
                    ts(i.created_at),
                    ts(i.expires_at),
                    i.revoked_at.map(ts),
                    i.last_used_at.map(ts)
                ],
            )
            .map_err(|e| {
                if e.sqlite_error_code() == Some(rusqlite::ErrorCode::ConstraintViolation) {
                    StoreError::Conflict("a token with that ID or hash exists already".into())
                } else {
                    sql_err(e)
                }
            })?;
            Ok(())
        })
        .await
    }

    async fn token_by_hash(&self, hash: &str) -> Result<Option<TokenInfo>, StoreError> {
        let hash = hash.to_owned();
        self.with_conn(move |c| {
            c.query_row(&format!("SELECT {TOKEN_COLS} FROM tokens WHERE hash = ?1"), [&hash], raw_token)
                .optional()
                .map_err(sql_err)?
                .transpose()
        })
        .await
    }

    async fn list_tokens(&self, user: &UserName) -> Result<Vec<TokenInfo>, StoreError> {
        let user = user.to_string();
        self.with_conn(move |c| {
            let mut stmt =
                c.prepare(&format!("SELECT {TOKEN_COLS} FROM tokens WHERE user = ?1 ORDER BY id")).map_err(sql_err)?;
            let rows = stmt.query_map([&user], raw_token).map_err(sql_err)?;
            rows.map(|r| r.map_err(sql_err)?).collect()
        })
        .await
    }

    async fn revoke_token(
        &self,
        user: &UserName,
        id: &TokenId,
        at: OffsetDateTime,
    ) -> Result<Option<TokenInfo>, StoreError> {
        let (user, id, at) = (user.to_string(), id.to_string(), ts(to_millis(at)));
        self.with_conn(move |c| {
            c.execute(
                "UPDATE tokens SET revoked_at = ?3 WHERE user = ?1 AND id = ?2 AND revoked_at IS NULL",
                params![user, id, at],
            )
            .map_err(sql_err)?;
            c.query_row(
                &format!("SELECT {TOKEN_COLS} FROM tokens WHERE user = ?1 AND id = ?2"),
                params![user, id],
                raw_token,
            )
            .optional()
            .map_err(sql_err)?
            .transpose()
        })
        .await
    }

    async fn touch_token(&self, id: &TokenId, at: OffsetDateTime) -> Result<(), StoreError> {
        let (id, at) = (id.to_string(), ts(to_millis(at)));
        self.with_conn(move |c| {
            c.execute("UPDATE tokens SET last_used_at = ?2 WHERE id = ?1", params![id, at]).map_err(sql_err)?;
            Ok(())
        })
        .await
    }
}

/// Columns of `users` read by [`raw_account`], in order.
const USER_COLS: &str = "name, role, created_by, created_at, disabled_at";

fn raw_account(r: &rusqlite::Row<'_>) -> rusqlite::Result<Result<UserAccount, StoreError>> {
    let (name, role, by, at, disabled) = (
        r.get::<_, String>(0)?,
        r.get::<_, String>(1)?,
        r.get::<_, String>(2)?,
        r.get::<_, String>(3)?,
        r.get::<_, Option<String>>(4)?,
    );
    Ok((|| {
        let corrupt = |m: String| StoreError::Other(anyhow::anyhow!("corrupt user row `{name}`: {m}"));
        Ok(UserAccount {
            name: UserName::parse(&name).map_err(|e| corrupt(e.to_string()))?,
            role: crate::model::accounts::Role::parse(&role).map_err(corrupt)?,
            created_by: UserName::parse(&by).map_err(|e| corrupt(e.to_string()))?,
            created_at: parse_ts(&at)?,
            disabled_at: disabled.as_deref().map(parse_ts).transpose()?,
        })
    })())
}

/// Columns of `tokens` read by [`raw_token`], in order (never the hash).
const TOKEN_COLS: &str = "id, user, label, hint, created_by, created_at, expires_at, revoked_at, last_used_at";

fn raw_token(r: &rusqlite::Row<'_>) -> rusqlite::Result<Result<TokenInfo, StoreError>> {
    let text = |i| r.get::<_, String>(i);
    let opt = |i| r.get::<_, Option<String>>(i);
    let (id, user, label, hint, by, at, expires, revoked, used) =
        (text(0)?, text(1)?, text(2)?, text(3)?, text(4)?, text(5)?, text(6)?, opt(7)?, opt(8)?);
    Ok((|| {
        let corrupt = |m: String| StoreError::Other(anyhow::anyhow!("corrupt token row {id}: {m}"));
        Ok(TokenInfo {
            id: TokenId::parse(&id).map_err(|e| corrupt(e.to_string()))?,
            user: UserName::parse(&user).map_err(|e| corrupt(e.to_string()))?,
            label,
            hint,
            created_by: UserName::parse(&by).map_err(|e| corrupt(e.to_string()))?,
            created_at: parse_ts(&at)?,
            expires_at: parse_ts(&expires)?,
            revoked_at: revoked.as_deref().map(parse_ts).transpose()?,
            last_used_at: used.as_deref().map(parse_ts).transpose()?,
        })
    })())
}

/// Columns of `credentials` read by [`raw_credential`], in order.
const CRED_COLS: &str = "user, cluster, key_type, fingerprint, created_by, created_at";

fn raw_credential(r: &rusqlite::Row<'_>) -> rusqlite::Result<Result<CredentialInfo, StoreError>> {
    let text = |i| r.get::<_, String>(i);
    let (user, cluster, key_type, fingerprint, by, at) = (text(0)?, text(1)?, text(2)?, text(3)?, text(4)?, text(5)?);
    Ok((|| {
        let bad = |e: crate::model::NameError| StoreError::Other(anyhow::anyhow!("corrupt credential: {e}"));
        Ok(CredentialInfo {
            user: UserName::parse(&user).map_err(bad)?,
            cluster: ClusterName::parse(&cluster).map_err(bad)?,
            key_type,
            fingerprint,
            created_by: UserName::parse(&by).map_err(bad)?,
            created_at: parse_ts(&at)?,
        })
    })())
}

/// Refuses to hand out a blob whose content no longer matches its recorded sha256.
pub(super) fn verify_sha(filename: &str, version: u32, expected: &str, text: &str) -> Result<(), StoreError> {
    let actual = crate::definitions::script::sha256_hex(text.as_bytes());
    if actual != expected {
        return Err(StoreError::Other(anyhow::anyhow!(
            "stored file {filename} version {version} is corrupt: sha256 {actual}, recorded {expected}"
        )));
    }
    Ok(())
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

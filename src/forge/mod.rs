//! The forge: turns a task (application + cluster + the user's inputs) into one
//! standalone submission script per phase.
//!
//! - [`inputs`]: task inputs checked against a JSON Schema compiled from the specs.
//! - [`render`]: compiled definitions, the generated payload, rendering, normalisation.
//! - [`local`]: compiling the repository folders, for offline previews.
//! - [`posts`]: the helpers a job posts events and data with (`hpcg_event`, `hpcg_data`).
//!
//! The markup language and its upload checks belong to the definition format
//! ([`crate::definitions::markup`]); shell quoting is [`crate::shell`]; how each
//! scheduler's scripts are written is [`crate::scheduler`].
//!
//! [`render::forge`] is pure. [`Forge`] adds loading and caching: definitions are
//! compiled once per version and kept, so forging a task costs one validation and
//! six renders.

pub mod inputs;
pub mod local;
pub mod posts;
pub mod render;
pub mod usage;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, RwLock};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::definitions::DefinitionKind;
use crate::model::{AppName, ClusterName, Problems, TaskId, UserName};
use crate::store::{Revision, Store, StoreError};
pub use render::{CompiledApp, CompiledCluster, ForgeRequest, Forged, ForgedScript};

/// A task as a portal sends it (`POST /api/v1/tasks`, `POST /api/v1/forge/preview`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TaskBody {
    /// Which application.
    pub application: AppName,
    /// Which cluster.
    pub cluster: ClusterName,
    /// The inputs: the portal's list (`[{"name", "type", "value" | "files", ...}]`) or
    /// an object of name → value (files: name → list of file entries).
    #[serde(default)]
    #[schema(schema_with = inputs_schema)]
    pub inputs: Value,
    /// Its place in the queue, when it must wait for licences or its owner's share of
    /// the cluster: higher goes first (default 0; users may only lower it, admins
    /// set -1000..1000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<i32>,
}

/// The two shapes task inputs come in, for the OpenAPI document.
fn inputs_schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
    use utoipa::openapi::schema::{ArrayBuilder, ObjectBuilder, OneOfBuilder, Type};
    OneOfBuilder::new()
        .item(
            ArrayBuilder::new()
                .items(ObjectBuilder::new().schema_type(Type::Object))
                .description(Some("The portal's list: `[{\"name\", \"type\", \"value\" | \"files\", ...}]`.")),
        )
        .item(ObjectBuilder::new().schema_type(Type::Object).description(Some("An object of input name → value.")))
        .item(ObjectBuilder::new().schema_type(Type::Null).description(Some("No inputs: every default.")))
        .description(Some("The task's inputs; missing ones take the application's defaults."))
        .into()
}

/// Why forging failed.
#[derive(Debug, thiserror::Error)]
pub enum ForgeError {
    /// The task (or the definitions it combines) has problems; all are listed.
    #[error("{0}")]
    Invalid(Problems),
    /// The application or cluster (`kind`) does not exist (or was deleted).
    #[error("{message}")]
    NotFound {
        /// Which of the two.
        kind: DefinitionKind,
        /// What is missing, in words.
        message: String,
    },
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Most compiled definitions kept; past this the cache starts over (versions are
/// immutable, so a rebuild only costs time).
const CACHE_CAPACITY: usize = 512;

/// How long the newest revision of a name, once read, is taken as current. A push or
/// delete through this server forgets it at once ([`Forge::forget`]); one through
/// another server sharing the store is seen within this time.
pub const CURRENT_TTL: std::time::Duration = std::time::Duration::from_secs(2);

/// Loads, compiles and caches definitions; forges tasks.
#[derive(Default)]
pub struct Forge {
    apps: RwLock<HashMap<(String, u32), Arc<CompiledApp>>>,
    clusters: RwLock<HashMap<(String, u32), Arc<CompiledCluster>>>,
    /// (kind, name) → its current revision and when it was read.
    current: RwLock<HashMap<(DefinitionKind, String), (std::time::Instant, Revision)>>,
}

impl std::fmt::Debug for Forge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Forge").finish_non_exhaustive()
    }
}

fn cached<T>(map: &RwLock<HashMap<(String, u32), Arc<T>>>, key: &(String, u32)) -> Option<Arc<T>> {
    map.read().unwrap_or_else(|p| p.into_inner()).get(key).cloned()
}

fn remember<T>(map: &RwLock<HashMap<(String, u32), Arc<T>>>, key: (String, u32), value: Arc<T>) {
    let mut m = map.write().unwrap_or_else(|p| p.into_inner());
    if m.len() >= CACHE_CAPACITY {
        m.clear();
    }
    m.insert(key, value);
}

/// The current revision of a definition, or a `NotFound` that says why.
async fn current(store: &dyn Store, kind: DefinitionKind, name: &str) -> Result<Revision, ForgeError> {
    match store.latest_revision(kind, name).await? {
        Some(r) if !r.deleted => Ok(r),
        Some(r) => Err(ForgeError::NotFound {
            kind,
            message: format!(
                "{} `{name}` was deleted (version {}); nothing can be forged from it",
                kind.singular(),
                r.version
            ),
        }),
        None => Err(ForgeError::NotFound { kind, message: format!("there is no {} named `{name}`", kind.singular()) }),
    }
}

async fn files_of(store: &dyn Store, rev: &Revision) -> Result<BTreeMap<String, String>, ForgeError> {
    let mut files = BTreeMap::new();
    for f in &rev.files {
        let stored = store.read_file(rev.kind, &rev.name, rev.version, &f.path).await?.ok_or_else(|| {
            StoreError::Other(anyhow::anyhow!(
                "revision {}@{} lists {} but it cannot be read",
                rev.name,
                rev.version,
                f.path
            ))
        })?;
        files.insert(f.path.clone(), stored.text);
    }
    Ok(files)
}

fn definition_of<T: serde::de::DeserializeOwned>(rev: &Revision) -> Result<T, ForgeError> {
    let def = rev.definition.clone().unwrap_or(Value::Null);
    serde_json::from_value(def).map_err(|e| {
        let mut p = Problems::default();
        p.push_rule(
            "",
            "definition",
            None,
            format!("{} `{}` version {} cannot be read: {e}", rev.kind.singular(), rev.name, rev.version),
        );
        ForgeError::Invalid(p)
    })
}

impl Forge {
    /// An empty forge.
    pub fn new() -> Self {
        Self::default()
    }

    /// Forgets what was read of `name`'s current revision (it was just pushed or
    /// deleted).
    pub fn forget(&self, kind: DefinitionKind, name: &str) {
        self.current.write().unwrap_or_else(|p| p.into_inner()).remove(&(kind, name.to_owned()));
    }

    /// The current revision of `name`: read less than [`CURRENT_TTL`] ago, or now.
    async fn current(&self, store: &dyn Store, kind: DefinitionKind, name: &str) -> Result<Revision, ForgeError> {
        let key = (kind, name.to_owned());
        if let Some((at, rev)) = self.current.read().unwrap_or_else(|p| p.into_inner()).get(&key)
            && at.elapsed() < CURRENT_TTL
        {
            return Ok(rev.clone());
        }
        let rev = current(store, kind, name).await?;
        let mut m = self.current.write().unwrap_or_else(|p| p.into_inner());
        if m.len() >= CACHE_CAPACITY {
            m.clear();
        }
        m.insert(key, (std::time::Instant::now(), rev.clone()));
        Ok(rev)
    }

    /// The compiled current version of application `name`.
    pub async fn application(&self, store: &dyn Store, name: &AppName) -> Result<Arc<CompiledApp>, ForgeError> {
        let rev = self.current(store, DefinitionKind::Application, name.as_str()).await?;
        let key = (rev.name.clone(), rev.version);
        if let Some(c) = cached(&self.apps, &key) {
            return Ok(c);
        }
        let files = files_of(store, &rev).await?;
        let compiled =
            Arc::new(CompiledApp::compile(definition_of(&rev)?, rev.version, &files).map_err(ForgeError::Invalid)?);
        remember(&self.apps, key, compiled.clone());
        Ok(compiled)
    }

    /// The compiled current version of cluster `name`.
    pub async fn cluster(&self, store: &dyn Store, name: &ClusterName) -> Result<Arc<CompiledCluster>, ForgeError> {
        let rev = self.current(store, DefinitionKind::Cluster, name.as_str()).await?;
        let key = (rev.name.clone(), rev.version);
        if let Some(c) = cached(&self.clusters, &key) {
            return Ok(c);
        }
        let files = files_of(store, &rev).await?;
        let compiled =
            Arc::new(CompiledCluster::compile(definition_of(&rev)?, rev.version, &files).map_err(ForgeError::Invalid)?);
        remember(&self.clusters, key, compiled.clone());
        Ok(compiled)
    }

    /// Validates `body` and forges its scripts for `user`, whose home on the cluster is
    /// `home`. Submits and stores nothing.
    pub async fn forge_task(
        &self,
        store: &dyn Store,
        body: &TaskBody,
        task_id: TaskId,
        user: &UserName,
        home: &str,
    ) -> Result<(Arc<CompiledApp>, inputs::ValidatedInputs, Forged), ForgeError> {
        let (app, cluster) =
            tokio::join!(self.application(store, &body.application), self.cluster(store, &body.cluster));
        let (app, cluster) = (app?, cluster?);
        Self::forge_on(app, &cluster, body, &ForgeRequest { task_id, user, home, workspace: None })
    }

    /// As [`Self::forge_task`], on a cluster already compiled (the mediator looked it
    /// up first, to find the user's home there).
    pub async fn forge_task_on(
        &self,
        store: &dyn Store,
        body: &TaskBody,
        cluster: &CompiledCluster,
        req: &ForgeRequest<'_>,
    ) -> Result<(Arc<CompiledApp>, inputs::ValidatedInputs, Forged), ForgeError> {
        let app = self.application(store, &body.application).await?;
        Self::forge_on(app, cluster, body, req)
    }

    fn forge_on(
        app: Arc<CompiledApp>,
        cluster: &CompiledCluster,
        body: &TaskBody,
        req: &ForgeRequest<'_>,
    ) -> Result<(Arc<CompiledApp>, inputs::ValidatedInputs, Forged), ForgeError> {
        let inputs = app.validator.validate(&body.inputs, &cluster.spec).map_err(ForgeError::Invalid)?;
        let forged = render::forge(&app, cluster, &inputs, req).map_err(ForgeError::Invalid)?;
        Ok((app, inputs, forged))
    }
}

/// The home directory assumed when the real one is not known (previews): `/home/<user>`.
pub fn assumed_home(user: &UserName) -> String {
    format!("/home/{user}")
}

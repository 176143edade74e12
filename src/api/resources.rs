//! The site's pools (`/api/v1/resources`): licences, site-wide and per cluster, and
//! users' shares of clusters, with who holds what ([`crate::mediator::queue`]). Everyone
//! sees the licence pools and their own shares; admins see every holder, set the
//! size of site-wide licence pools, and release a stuck holder by hand.

use axum::extract::{Path, State};
use serde::{Deserialize, Serialize};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::AppState;
use super::auth::Caller;
use super::error::{ApiError, ErrorBody, Ok, Reply};
use super::extract::JsonBody;
use crate::definitions::DefinitionKind;
use crate::model::queue::{self as q, Holder, Pool, PoolKind, PoolNote};
use crate::model::{ClusterSpec, LicenceName, Phase, Problems, TaskId, TaskState};
use crate::store::pools;

/// `GET /api/v1/resources`, for every user.
pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(list))
}

/// Setting a site-wide pool's size and releasing by hand, for admins.
pub fn admin_routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(set_licence)).routes(routes!(release))
}

/// One pool as the API shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct PoolView {
    /// Its key: `licence/<name>` (site-wide), `licence/<cluster>/<name>`,
    /// `jobs/<cluster>/<user>`, `tasks/<cluster>/<user>`.
    pub key: String,
    /// `licence`, `jobs` (a user's live jobs on a cluster) or `tasks` (live tasks).
    pub kind: String,
    /// The licence's name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub licence: Option<String>,
    /// The cluster whose pool it is (none: site-wide).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<String>,
    /// The user whose share it is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// How many there are.
    pub count: u32,
    /// How many are held.
    pub in_use: u32,
    /// Who holds them (for users: only their own tasks).
    pub holders: Vec<Holder>,
    /// Changes made by hand (admins only).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub notes: Vec<PoolNote>,
}

/// The pools, and how many tasks wait in the queue.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Resources {
    /// Every pool the caller may see, by key. Cluster pools nobody has used yet show
    /// with the count their cluster's definition gives.
    pub pools: Vec<PoolView>,
    /// Tasks queued now (all users').
    pub queued: u64,
}

fn view(p: Pool, admin: bool, user: &str) -> Option<PoolView> {
    let (kind, licence, cluster, owner) = match PoolKind::of(&p.key) {
        PoolKind::Licence { name, cluster } => ("licence", Some(name), cluster, None),
        PoolKind::Jobs { cluster, user } => ("jobs", None, Some(cluster), Some(user)),
        PoolKind::Tasks { cluster, user } => ("tasks", None, Some(cluster), Some(user)),
        PoolKind::Other => ("other", None, None, None),
    };
    if !admin && owner.as_deref().is_some_and(|o| o != user) {
        return None;
    }
    let in_use = p.in_use();
    let holders = p.holders.into_iter().filter(|h| admin || h.owner.as_str() == user).collect();
    Some(PoolView {
        key: p.key,
        kind: kind.to_owned(),
        licence,
        cluster,
        user: owner,
        count: p.count,
        in_use,
        holders,
        notes: if admin { p.notes } else { Vec::new() },
    })
}

/// The site's pools: licences (site-wide, and each cluster's own) with how many are
/// in use and by which tasks, and each user's share of the clusters that limit it.
/// Users see the licence pools, their own shares and their own holdings; admins see
/// everything, with the changes made by hand.
#[utoipa::path(get, path = "/api/v1/resources", tag = "resources",
    responses(
        (status = 200, description = "The pools.", body = Ok<Resources>),
        (status = 400, description = "A portal named no user.", body = ErrorBody),
    ))]
async fn list(State(st): State<AppState>, caller: Caller) -> Result<Reply<Resources>, ApiError> {
    let access = caller.access()?;
    let mut stored = st.store.pools().await?;
    // Cluster pools declared but never used yet.
    for rev in st.store.list_current(DefinitionKind::Cluster).await? {
        let Some(spec) = rev.definition.and_then(|d| serde_json::from_value::<ClusterSpec>(d).ok()) else { continue };
        for (name, l) in &spec.licences {
            let Some(count) = l.count else { continue };
            let key = q::cluster_licence(&spec.name, name);
            if !stored.iter().any(|p| p.key == key) {
                stored.push(Pool::new(&key, count));
            }
        }
    }
    stored.sort_by(|a, b| a.key.cmp(&b.key));
    let pools: Vec<PoolView> = stored.into_iter().filter_map(|p| view(p, access.admin, access.user.as_str())).collect();
    let queued = st.store.count_tasks().await?.into_iter().find(|(s, _)| *s == TaskState::Queued).map_or(0, |(_, n)| n);
    let held: u32 = pools.iter().map(|p| p.in_use).sum();
    let message = format!(
        "{} pool{}, {held} held; {queued} task(s) queued",
        pools.len(),
        if pools.len() == 1 { "" } else { "s" }
    );
    Ok(Reply::ok(Resources { pools, queued }, message))
}

/// The size of a site-wide licence pool.
#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LicenceCount {
    /// How many licences the site has (0 stops new grants; holders keep theirs).
    pub count: u32,
}

/// Sets how many licences a site-wide pool has (creating it). Every cluster whose
/// definition does not give a pool of that name of its own draws from it. Lowering it
/// below what is held takes nothing back: holders keep theirs, and nothing more is
/// granted until use falls under the new size.
#[utoipa::path(put, path = "/api/v1/resources/licences/{name}", tag = "resources",
    params(("name" = String, Path, description = "The licence's name (`maya`).")),
    request_body = LicenceCount,
    responses(
        (status = 200, description = "The pool as it now is.", body = Ok<PoolView>),
        (status = 404, description = "Not a licence name.", body = ErrorBody),
        (status = 422, description = "A count over the bound.", body = ErrorBody),
    ))]
async fn set_licence(
    State(st): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
    JsonBody(body): JsonBody<LicenceCount>,
) -> Result<Reply<PoolView>, ApiError> {
    let name = LicenceName::parse(&name).map_err(|e| ApiError::NotFound(e.to_string()))?;
    if body.count > crate::model::resources::MAX_LICENCES {
        let mut p = Problems::default();
        p.push("/count", format!("at most {} licences in one pool", crate::model::resources::MAX_LICENCES));
        return Err(ApiError::invalid("licence pool", p));
    }
    let by = caller.describe();
    let pool = pools::set_count(
        st.store.as_ref(),
        &q::site_licence(&name),
        body.count,
        &by,
        crate::store::to_millis(time::OffsetDateTime::now_utc()),
    )
    .await?;
    tracing::info!(licence = %name, count = body.count, by, "site-wide licence pool set");
    st.mediator.kick_queue();
    let v = view(pool, true, "").expect("admins see every pool");
    Ok(Reply::ok(v, format!("licence `{name}`: {} in the site-wide pool", body.count)))
}

/// A holder to release by hand.
#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ReleaseBody {
    /// The pool's key (as `GET /api/v1/resources` shows it).
    pub pool: String,
    /// The task holding it.
    pub task: String,
    /// Only what it holds for this phase (default: everything it holds there).
    #[serde(default)]
    pub phase: Option<Phase>,
}

/// Releases what a task holds of a pool by hand (a claim stuck for a reason the
/// engine cannot see, such as a licence server that lost track), recorded on the
/// pool and as an event on the task with who did it. The engine releases by itself
/// what ended jobs held; use this only when that is not enough: a job still running
/// keeps using what is released here.
#[utoipa::path(post, path = "/api/v1/resources/release", tag = "resources",
    request_body = ReleaseBody,
    responses(
        (status = 200, description = "What was released.", body = Ok<Vec<Holder>>),
        (status = 404, description = "The task holds nothing of that pool.", body = ErrorBody),
    ))]
async fn release(
    State(st): State<AppState>,
    caller: Caller,
    JsonBody(body): JsonBody<ReleaseBody>,
) -> Result<Reply<Vec<Holder>>, ApiError> {
    let task = TaskId::parse_ref(&body.task, st.mediator.site())
        .map_err(|e| ApiError::NotFound(format!("there is no task {}: {}", body.task.escape_debug(), e.reason)))?;
    let by = caller.describe();
    let gone = st.mediator.release_by_hand(&body.pool, &task, body.phase, &by).await?;
    let n: u32 = gone.iter().map(|h| h.amount).sum();
    Ok(Reply::ok(gone, format!("released {n} of `{}` held by task {task}", body.pool)))
}

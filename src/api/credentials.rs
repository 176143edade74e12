//! Credential routes (admin): register, list and remove users' SSH keys per cluster.
//! Keys are checked, sealed with the server key and stored; no answer ever contains
//! one, and no log line either.

use axum::extract::{Path, State};
use serde::Deserialize;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::AppState;
use super::auth::Caller;
use super::error::{ApiError, ErrorBody, Ok, Reply};
use super::extract::{JsonBody, QueryArgs};
use crate::model::{ClusterName, Problem, Problems, UserName};
use crate::secrets::{credential_purpose, inspect_private_key};
use crate::store::{CredentialInfo, StoredCredential};

/// `/api/v1/credentials/...` (admin).
pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(list)).routes(routes!(register)).routes(routes!(remove))
}

/// Body of `PUT /api/v1/credentials/{user}/{cluster}`.
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct Register {
    /// The OpenSSH private key (not passphrase-protected).
    private_key: String,
}

impl std::fmt::Debug for Register {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Register { private_key: [redacted] }")
    }
}

fn names(user: &str, cluster: &str) -> Result<(UserName, ClusterName), ApiError> {
    let bad = |e: crate::model::NameError| ApiError::BadRequest {
        message: e.to_string(),
        problems: Problems::from(Problem::new("", e.to_string())),
    };
    Ok((UserName::parse(user).map_err(bad)?, ClusterName::parse(cluster).map_err(bad)?))
}

/// Registers (or replaces) the SSH private key `user` logs in to `cluster` with.
/// It is sealed with the server key; only its fingerprint ever comes back.
#[utoipa::path(put, path = "/api/v1/credentials/{user}/{cluster}", tag = "credentials", request_body = Register,
    params(
        ("user" = String, Path, description = "The Unix user on the cluster."),
        ("cluster" = String, Path, description = "The cluster."),
    ),
    responses(
        (status = 200, description = "Replaced.", body = Ok<CredentialInfo>),
        (status = 201, description = "Registered.", body = Ok<CredentialInfo>),
        (status = 400, description = "A bad user or cluster name, or unreadable JSON.", body = ErrorBody),
        (status = 404, description = "No such cluster.", body = ErrorBody),
        (status = 413, description = "The body is over the size cap.", body = ErrorBody),
        (status = 415, description = "The body is not declared as JSON.", body = ErrorBody),
        (status = 422, description = "Not an unencrypted OpenSSH private key.", body = ErrorBody),
    ))]
async fn register(
    State(st): State<AppState>,
    caller: Caller,
    Path((user, cluster)): Path<(String, String)>,
    JsonBody(body): JsonBody<Register>,
) -> Result<Reply<CredentialInfo>, ApiError> {
    let (user, cluster) = names(&user, &cluster)?;
    // A key for a cluster that does not exist is almost always a typo.
    if st
        .store
        .latest_revision(crate::definitions::DefinitionKind::Cluster, cluster.as_str())
        .await?
        .is_none_or(|r| r.deleted)
    {
        return Err(ApiError::NotFound(format!("there is no cluster named `{cluster}`")));
    }
    let facts = inspect_private_key(&body.private_key).map_err(|m| {
        let mut p = Problems::default();
        p.push_rule("/private_key", "key", Some("string"), m);
        ApiError::invalid("the credential", p)
    })?;
    let existed = st.store.get_credential(&user, &cluster).await?.is_some();
    let info = CredentialInfo {
        user: user.clone(),
        cluster: cluster.clone(),
        key_type: facts.key_type,
        fingerprint: facts.fingerprint,
        created_by: caller.principal.user.clone(),
        created_at: crate::store::to_millis(time::OffsetDateTime::now_utc()),
    };
    let sealed = st
        .mediator
        .key()
        .seal(&credential_purpose(user.as_str(), cluster.as_str()), body.private_key.trim().as_bytes());
    st.store.put_credential(&StoredCredential { info: info.clone(), sealed }).await?;
    st.mediator.forget_credential(&info.user, &info.cluster);
    tracing::info!(user = %user, cluster = %cluster, fingerprint = info.fingerprint, by = %caller.principal.user, "credential registered");
    let message = format!(
        "SSH key {} {} for `{user}` on `{cluster}`",
        info.fingerprint,
        if existed { "replaced" } else { "registered" }
    );
    Ok(if existed { Reply::ok(info, message) } else { Reply::created(info, message) })
}

/// Which key was removed.
#[derive(Debug, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct Removed {
    /// The user.
    pub user: UserName,
    /// The cluster.
    pub cluster: ClusterName,
}

/// Query of `GET /api/v1/credentials`.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
struct ListQuery {
    /// Only this user's keys.
    user: Option<String>,
}

/// Registered keys (fingerprints only), for one user or all.
#[utoipa::path(get, path = "/api/v1/credentials", tag = "credentials", params(ListQuery),
    responses(
        (status = 200, description = "The keys' descriptions.", body = Ok<Vec<CredentialInfo>>),
        (status = 400, description = "A bad user name.", body = ErrorBody),
    ))]
async fn list(
    State(st): State<AppState>,
    QueryArgs(q): QueryArgs<ListQuery>,
) -> Result<Reply<Vec<CredentialInfo>>, ApiError> {
    let user = q
        .user
        .as_deref()
        .map(UserName::parse)
        .transpose()
        .map_err(|e| ApiError::BadRequest { message: e.to_string(), problems: Problems::default() })?;
    let all = st.store.list_credentials(user.as_ref()).await?;
    let n = all.len();
    Ok(Reply::ok(all, format!("{n} credential{}", if n == 1 { "" } else { "s" })))
}

/// Removes the key of `user` on `cluster`.
#[utoipa::path(delete, path = "/api/v1/credentials/{user}/{cluster}", tag = "credentials",
    params(
        ("user" = String, Path, description = "The Unix user on the cluster."),
        ("cluster" = String, Path, description = "The cluster."),
    ),
    responses(
        (status = 200, description = "Removed.", body = Ok<Removed>),
        (status = 400, description = "A bad user or cluster name.", body = ErrorBody),
        (status = 404, description = "No key is registered for them.", body = ErrorBody),
    ))]
async fn remove(
    State(st): State<AppState>,
    caller: Caller,
    Path((user, cluster)): Path<(String, String)>,
) -> Result<Reply<Removed>, ApiError> {
    let (user, cluster) = names(&user, &cluster)?;
    let deleted = st.store.delete_credential(&user, &cluster).await?;
    st.mediator.forget_credential(&user, &cluster);
    if !deleted {
        return Err(ApiError::NotFound(format!("no SSH key is registered for `{user}` on `{cluster}`")));
    }
    tracing::info!(user = %user, cluster = %cluster, by = %caller.principal.user, "credential removed");
    let message = format!("SSH key of `{user}` on `{cluster}` removed");
    Ok(Reply::ok(Removed { user, cluster }, message))
}

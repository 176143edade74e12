//! Credential routes (admin): register, list and remove users' SSH keys per cluster.
//! Keys are checked, sealed with the server key and stored; no answer ever contains
//! one, and no log line either.

use axum::Router;
use axum::extract::{Path, Query, State};
use axum::routing::{get, put};
use serde::Deserialize;

use super::AppState;
use super::error::{ApiError, Reply};
use super::extract::{Actor, JsonBody};
use crate::model::{ClusterName, Problem, Problems, UserName};
use crate::secrets::{credential_purpose, inspect_private_key};
use crate::store::{CredentialInfo, StoredCredential};

/// `/api/v1/credentials/...`
pub fn routes() -> Router<AppState> {
    Router::new().route("/", get(list)).route("/{user}/{cluster}", put(register).delete(remove))
}

/// Body of `PUT /api/v1/credentials/{user}/{cluster}`.
#[derive(Deserialize)]
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

async fn register(
    State(st): State<AppState>,
    actor: Actor,
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
        created_by: actor.0.clone(),
        created_at: crate::store::to_millis(time::OffsetDateTime::now_utc()),
    };
    let sealed = st
        .mediator
        .key()
        .seal(&credential_purpose(user.as_str(), cluster.as_str()), body.private_key.trim().as_bytes());
    st.store.put_credential(&StoredCredential { info: info.clone(), sealed }).await?;
    tracing::info!(user = %user, cluster = %cluster, fingerprint = info.fingerprint, by = %actor.0, "credential registered");
    let message = format!(
        "SSH key {} {} for `{user}` on `{cluster}`",
        info.fingerprint,
        if existed { "replaced" } else { "registered" }
    );
    Ok(if existed { Reply::ok(info, message) } else { Reply::created(info, message) })
}

/// Query of `GET /api/v1/credentials`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ListQuery {
    /// Only this user's keys.
    user: Option<String>,
}

async fn list(State(st): State<AppState>, Query(q): Query<ListQuery>) -> Result<Reply<Vec<CredentialInfo>>, ApiError> {
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

async fn remove(
    State(st): State<AppState>,
    actor: Actor,
    Path((user, cluster)): Path<(String, String)>,
) -> Result<Reply<serde_json::Value>, ApiError> {
    let (user, cluster) = names(&user, &cluster)?;
    if !st.store.delete_credential(&user, &cluster).await? {
        return Err(ApiError::NotFound(format!("no SSH key is registered for `{user}` on `{cluster}`")));
    }
    tracing::info!(user = %user, cluster = %cluster, by = %actor.0, "credential removed");
    Ok(Reply::ok(
        serde_json::json!({ "user": user, "cluster": cluster }),
        format!("SSH key of `{user}` on `{cluster}` removed"),
    ))
}

//! Accounts and tokens: who am I (`/api/v1/me`), users (admin), and tokens, which a
//! user may make and revoke for themselves and an admin for anyone. A token is shown
//! once, in the answer that made it.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::AppState;
use super::auth::Caller;
use super::error::{ApiError, ErrorBody, Ok, Reply};
use super::extract::JsonBody;
use crate::auth::{IssueError, IssuedToken, Role, TokenId, TokenInfo, UserAccount};
use crate::model::{Problem, Problems, UserName};

/// Routes any token may call (each checks it is about the caller, or an admin).
pub fn self_routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(me))
        .routes(routes!(show))
        .routes(routes!(create_token))
        .routes(routes!(revoke_token))
}

/// Admin routes.
pub fn admin_routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(list)).routes(routes!(add)).routes(routes!(disable))
}

impl From<IssueError> for ApiError {
    fn from(e: IssueError) -> Self {
        match e {
            IssueError::Invalid(m) => ApiError::invalid("the request", Problems::from(Problem::new("", m))),
            IssueError::Conflict(m) => ApiError::Conflict(m),
            IssueError::Store(s) => s.into(),
        }
    }
}

fn user_name(text: &str) -> Result<UserName, ApiError> {
    UserName::parse(text).map_err(|e| ApiError::BadRequest {
        message: e.to_string(),
        problems: Problems::from(Problem::new("", e.to_string())),
    })
}

/// Lets `caller` act on `name`'s account only if it is theirs or they are an admin.
fn own_or_admin(caller: &Caller, name: &UserName) -> Result<(), ApiError> {
    if caller.is_admin() || &caller.principal.user == name {
        Ok(())
    } else {
        Err(ApiError::Forbidden(format!(
            "`{}` may manage only their own account; `{name}`'s needs an admin",
            caller.principal.user
        )))
    }
}

/// Who the token belongs to.
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Me {
    /// The account.
    pub user: UserName,
    /// Its role.
    pub role: Role,
    /// For a portal: the user named in `X-Hpcforge-On-Behalf-Of`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub acting_for: Option<UserName>,
    /// The token used for this request.
    pub token: TokenId,
    /// When it expires.
    #[serde(with = "time::serde::rfc3339")]
    pub token_expires_at: OffsetDateTime,
}

/// Who the token belongs to, its role, and when it expires.
#[utoipa::path(get, path = "/api/v1/me", tag = "users",
    responses((status = 200, description = "The caller.", body = Ok<Me>)))]
async fn me(caller: Caller) -> Reply<Me> {
    let p = &caller.principal;
    let message = match &caller.on_behalf_of {
        Some(u) => format!("you are portal `{}`, acting for `{u}`", p.user),
        None => format!("you are `{}` ({})", p.user, p.role),
    };
    Reply::ok(
        Me {
            user: p.user.clone(),
            role: p.role,
            acting_for: caller.on_behalf_of.clone(),
            token: p.token,
            token_expires_at: p.expires_at,
        },
        message,
    )
}

/// Every account, by name.
#[utoipa::path(get, path = "/api/v1/users", tag = "users",
    responses((status = 200, description = "The accounts.", body = Ok<Vec<UserAccount>>)))]
async fn list(State(st): State<AppState>) -> Result<Reply<Vec<UserAccount>>, ApiError> {
    let all = st.store.list_accounts().await?;
    let n = all.len();
    Ok(Reply::ok(all, format!("{n} user{}", if n == 1 { "" } else { "s" })))
}

/// Body of `POST /api/v1/users`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct NewUser {
    /// The name: for `user` and `admin`, the Unix user their tasks run as.
    name: UserName,
    /// What the account may do.
    role: Role,
    /// A label for the first token.
    #[serde(default)]
    label: String,
    /// How long the first token lives, in days (default 90).
    expires_in_days: Option<u32>,
}

/// An account just made, with its first token (shown once).
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct AddedUser {
    /// The account.
    pub user: UserAccount,
    /// Its first token.
    pub token: IssuedToken,
}

/// Adds an account and makes its first token.
#[utoipa::path(post, path = "/api/v1/users", tag = "users", request_body = NewUser,
    responses(
        (status = 201, description = "The account and its first token (shown once).", body = Ok<AddedUser>),
        (status = 400, description = "Unreadable JSON.", body = ErrorBody),
        (status = 409, description = "The name is taken.", body = ErrorBody),
        (status = 413, description = "The body is over the size cap.", body = ErrorBody),
        (status = 415, description = "The body is not declared as JSON.", body = ErrorBody),
        (status = 422, description = "A bad name, role, label or lifetime.", body = ErrorBody),
    ))]
async fn add(
    State(st): State<AppState>,
    caller: Caller,
    JsonBody(body): JsonBody<NewUser>,
) -> Result<Response, ApiError> {
    let (user, token) = crate::auth::add_user(
        st.store.as_ref(),
        &body.name,
        body.role,
        &body.label,
        body.expires_in_days,
        &caller.principal.user,
        OffsetDateTime::now_utc(),
    )
    .await?;
    let message = format!("user `{}` added ({}); the token is shown once, keep it", user.name, user.role);
    let mut resp = Reply::ok(AddedUser { user, token }, message).into_response();
    *resp.status_mut() = StatusCode::CREATED;
    Ok(resp)
}

/// An account and its tokens (never the tokens themselves).
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct UserDetail {
    /// The account.
    pub user: UserAccount,
    /// Its tokens, oldest first.
    pub tokens: Vec<TokenInfo>,
}

/// An account and its tokens; a user may see their own.
#[utoipa::path(get, path = "/api/v1/users/{name}", tag = "users",
    params(("name" = String, Path, description = "The account.")),
    responses(
        (status = 200, description = "The account.", body = Ok<UserDetail>),
        (status = 400, description = "Not a valid name.", body = ErrorBody),
        (status = 403, description = "Someone else's account, and not an admin.", body = ErrorBody),
        (status = 404, description = "No such account.", body = ErrorBody),
    ))]
async fn show(
    State(st): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
) -> Result<Reply<UserDetail>, ApiError> {
    let name = user_name(&name)?;
    own_or_admin(&caller, &name)?;
    let user =
        st.store.get_account(&name).await?.ok_or_else(|| ApiError::NotFound(format!("there is no user `{name}`")))?;
    let tokens = st.store.list_tokens(&name).await?;
    let message = format!("user `{name}` ({}), {} token(s)", user.role, tokens.len());
    Ok(Reply::ok(UserDetail { user, tokens }, message))
}

/// Disables an account and revokes its tokens. Its tasks stay.
#[utoipa::path(delete, path = "/api/v1/users/{name}", tag = "users",
    params(("name" = String, Path, description = "The account.")),
    responses(
        (status = 200, description = "The account, disabled.", body = Ok<UserAccount>),
        (status = 400, description = "Not a valid name.", body = ErrorBody),
        (status = 404, description = "No such account.", body = ErrorBody),
        (status = 409, description = "It is the last active admin.", body = ErrorBody),
    ))]
async fn disable(
    State(st): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
) -> Result<Reply<UserAccount>, ApiError> {
    let name = user_name(&name)?;
    let all = st.store.list_accounts().await?;
    let Some(target) = all.iter().find(|a| a.name == name) else {
        return Err(ApiError::NotFound(format!("there is no user `{name}`")));
    };
    if target.role == Role::Admin
        && target.is_active()
        && !all.iter().any(|a| a.name != name && a.role == Role::Admin && a.is_active())
    {
        return Err(ApiError::Conflict(format!(
            "`{name}` is the last active admin; add another admin before disabling this one"
        )));
    }
    let user = st
        .store
        .disable_account(&name, OffsetDateTime::now_utc())
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("there is no user `{name}`")))?;
    st.auth.forget_user(&name);
    tracing::info!(user = %name, by = %caller.principal.user, "user disabled; tokens revoked");
    Ok(Reply::ok(user, format!("user `{name}` disabled; their tokens no longer work")))
}

/// Body of `POST /api/v1/users/{name}/tokens`.
#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct NewToken {
    /// What the token is for (`laptop`, `prometheus`).
    #[serde(default)]
    label: String,
    /// How long it lives, in days (default 90, at most 3650).
    expires_in_days: Option<u32>,
}

/// Makes a token for an account (one's own, or anyone's for an admin).
#[utoipa::path(post, path = "/api/v1/users/{name}/tokens", tag = "users", request_body = NewToken,
    params(("name" = String, Path, description = "The account.")),
    responses(
        (status = 201, description = "The token (shown once).", body = Ok<IssuedToken>),
        (status = 400, description = "Not a valid name, or unreadable JSON.", body = ErrorBody),
        (status = 403, description = "Someone else's account, and not an admin.", body = ErrorBody),
        (status = 409, description = "No such account, or it is disabled.", body = ErrorBody),
        (status = 413, description = "The body is over the size cap.", body = ErrorBody),
        (status = 415, description = "The body is not declared as JSON.", body = ErrorBody),
        (status = 422, description = "A bad label or lifetime.", body = ErrorBody),
    ))]
async fn create_token(
    State(st): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
    JsonBody(body): JsonBody<NewToken>,
) -> Result<Response, ApiError> {
    let name = user_name(&name)?;
    own_or_admin(&caller, &name)?;
    let token = crate::auth::issue_token(
        st.store.as_ref(),
        &name,
        &body.label,
        body.expires_in_days,
        &caller.principal.user,
        OffsetDateTime::now_utc(),
    )
    .await?;
    let message = format!("token {} made for `{name}`; it is shown once, keep it", token.info.id);
    let mut resp = Reply::ok(token, message).into_response();
    *resp.status_mut() = StatusCode::CREATED;
    Ok(resp)
}

/// Revokes a token at once.
#[utoipa::path(delete, path = "/api/v1/users/{name}/tokens/{token_id}", tag = "users",
    params(
        ("name" = String, Path, description = "The account."),
        ("token_id" = String, Path, description = "The token's ID."),
    ),
    responses(
        (status = 200, description = "The token, revoked.", body = Ok<TokenInfo>),
        (status = 400, description = "Not a valid name.", body = ErrorBody),
        (status = 403, description = "Someone else's account, and not an admin.", body = ErrorBody),
        (status = 404, description = "The account has no such token.", body = ErrorBody),
    ))]
async fn revoke_token(
    State(st): State<AppState>,
    caller: Caller,
    Path((name, id)): Path<(String, String)>,
) -> Result<Reply<TokenInfo>, ApiError> {
    let name = user_name(&name)?;
    own_or_admin(&caller, &name)?;
    let not_found = || ApiError::NotFound(format!("`{name}` has no token {}", id.escape_debug()));
    let id = TokenId::parse(&id).map_err(|_| not_found())?;
    let token = st.store.revoke_token(&name, &id, OffsetDateTime::now_utc()).await?.ok_or_else(not_found)?;
    st.auth.forget_user(&name);
    tracing::info!(user = %name, token_id = %id, by = %caller.principal.user, "token revoked");
    Ok(Reply::ok(token, format!("token {id} of `{name}` revoked")))
}

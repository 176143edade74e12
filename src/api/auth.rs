//! Authentication and authorisation of API requests: the bearer-token layer every
//! `/api/v1` route sits behind (default deny: a route added there needs a token
//! without anyone remembering to ask for one), the admin-only layer, and the
//! [`Caller`] extractor handlers use to learn who is asking.
//!
//! A `portal` token acts for a user named in the `X-Hpcforge-On-Behalf-Of` header;
//! the user must exist and be active, and whatever the portal does is recorded with
//! both names.

use axum::extract::{FromRequestParts, Request, State};
use axum::http::HeaderMap;
use axum::http::request::Parts;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::AppState;
use super::error::ApiError;
use crate::auth::{AuthError, Principal, Role};
use crate::mediator::Access;
use crate::model::UserName;

/// The header a portal names the user it acts for in.
pub const ON_BEHALF_HEADER: &str = "x-hpcforge-on-behalf-of";

/// Who is asking, once the token checked out.
#[derive(Debug, Clone)]
pub struct Caller {
    /// The account the token belongs to.
    pub principal: Principal,
    /// For a portal: the user it acts for in this request.
    pub on_behalf_of: Option<UserName>,
}

impl Caller {
    /// Whether the token is an admin's.
    pub fn is_admin(&self) -> bool {
        self.principal.role == Role::Admin
    }

    /// The user whose tasks this request is about: the token's own user, or for a
    /// portal the user it acts for (which it must name).
    pub fn subject(&self) -> Result<UserName, ApiError> {
        match (self.principal.role, &self.on_behalf_of) {
            (Role::Portal, Some(user)) => Ok(user.clone()),
            (Role::Portal, None) => Err(ApiError::BadRequest {
                message: format!(
                    "`{}` is a portal token: name the user it acts for in the {ON_BEHALF_HEADER} header",
                    self.principal.user
                ),
                problems: Default::default(),
            }),
            _ => Ok(self.principal.user.clone()),
        }
    }

    /// How this caller is named in task events and logs: `alice`, or
    /// `alice via portal gateway`.
    pub fn describe(&self) -> String {
        match &self.on_behalf_of {
            Some(user) => format!("{user} via portal {}", self.principal.user),
            None => self.principal.user.to_string(),
        }
    }

    /// What the mediator needs to decide what this caller may do with tasks.
    pub fn access(&self) -> Result<Access, ApiError> {
        Ok(Access { user: self.subject()?, admin: self.is_admin(), by: self.describe() })
    }
}

impl<S: Send + Sync> FromRequestParts<S> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        parts.extensions.get::<Caller>().cloned().ok_or_else(|| {
            ApiError::Internal(anyhow::anyhow!("a handler asked for the caller on a route outside the token layer"))
        })
    }
}

impl From<AuthError> for ApiError {
    fn from(e: AuthError) -> Self {
        match e {
            AuthError::Unavailable => ApiError::Unavailable {
                message: "tokens cannot be checked right now: the store is unavailable; try again shortly".into(),
                source: anyhow::anyhow!("token check failed"),
            },
            other => ApiError::Unauthorized(other.to_string()),
        }
    }
}

/// The token in `Authorization: Bearer ...`.
fn bearer(headers: &HeaderMap) -> Result<&str, AuthError> {
    let Some(value) = headers.get(axum::http::header::AUTHORIZATION) else { return Err(AuthError::Missing) };
    let text = value.to_str().map_err(|_| AuthError::Malformed)?;
    let (scheme, token) = text.trim().split_once(' ').ok_or(AuthError::Malformed)?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err(AuthError::Malformed);
    }
    Ok(token.trim())
}

/// Middleware: checks the bearer token and records the [`Caller`] for the handler.
pub async fn require_token(State(st): State<AppState>, mut req: Request, next: Next) -> Response {
    match caller_of(&st, req.headers()).await {
        Ok(caller) => {
            req.extensions_mut().insert(caller);
            next.run(req).await
        }
        Err(e) => {
            st.metrics.auth_failure();
            e.into_response()
        }
    }
}

async fn caller_of(st: &AppState, headers: &HeaderMap) -> Result<Caller, ApiError> {
    let principal = st.auth.authenticate(bearer(headers)?).await?;
    let on_behalf_of = match headers.get(ON_BEHALF_HEADER) {
        None => None,
        Some(v) => {
            let text = v.to_str().map_err(|_| ApiError::BadRequest {
                message: format!("the {ON_BEHALF_HEADER} header is not text"),
                problems: Default::default(),
            })?;
            let user = UserName::parse(text.trim()).map_err(|e| ApiError::BadRequest {
                message: format!("the {ON_BEHALF_HEADER} header does not name a user: {e}"),
                problems: Default::default(),
            })?;
            if principal.role != Role::Portal {
                return Err(ApiError::Forbidden(format!(
                    "only portal tokens may act on behalf of another user; `{}` has role {}",
                    principal.user, principal.role
                )));
            }
            match st.auth.active_account(&user).await? {
                Some(a) if a.role != Role::Portal => Some(user),
                _ => {
                    return Err(ApiError::Forbidden(format!(
                        "portal `{}` can act only for existing, active users; `{user}` is not one (an admin adds users with `hpcforge user add`)",
                        principal.user
                    )));
                }
            }
        }
    };
    Ok(Caller { principal, on_behalf_of })
}

/// Middleware (inside [`require_token`]): lets only admin tokens through.
pub async fn require_admin(req: Request, next: Next) -> Response {
    match req.extensions().get::<Caller>() {
        Some(c) if c.is_admin() => next.run(req).await,
        Some(c) => ApiError::Forbidden(format!(
            "this needs an admin token; `{}` has role {}",
            c.principal.user, c.principal.role
        ))
        .into_response(),
        None => ApiError::Internal(anyhow::anyhow!("the admin layer runs outside the token layer")).into_response(),
    }
}

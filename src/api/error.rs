//! The one error type of the HTTP API. Each variant says its status; every answer
//! uses the portal's envelope `{"data", "message", "errors"}`. 5xx bodies are generic
//! and the cause chain goes to the log.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use serde_json::{Value, json};

use crate::model::{Problem, Problems};
use crate::store::StoreError;

/// The envelope every answer uses.
#[derive(Debug, Serialize)]
pub struct Envelope<T: Serialize> {
    /// The payload (`null` on errors).
    pub data: Option<T>,
    /// One sentence saying what happened.
    pub message: String,
    /// On errors: every problem, each with a JSON pointer into the request.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<Problem>,
}

/// A successful answer, as the OpenAPI document describes it.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Ok<T> {
    /// The payload.
    pub data: T,
    /// One sentence saying what happened.
    pub message: String,
}

/// The schema of a value that is always `null`.
fn null_schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
    utoipa::openapi::schema::ObjectBuilder::new().schema_type(utoipa::openapi::schema::Type::Null).into()
}

/// An error answer: no data, a message, and (for bad input) every problem found.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ErrorBody {
    /// Always `null`.
    #[schema(schema_with = null_schema)]
    pub data: Option<()>,
    /// What went wrong and what to do about it.
    pub message: String,
    /// For 400 and 422: each problem with a JSON pointer into the request.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<Problem>,
}

/// A successful answer: status, data and message.
pub struct Reply<T: Serialize> {
    status: StatusCode,
    data: T,
    message: String,
}

impl<T: Serialize> Reply<T> {
    /// 200 OK.
    pub fn ok(data: T, message: impl Into<String>) -> Self {
        Self { status: StatusCode::OK, data, message: message.into() }
    }

    /// 201 Created.
    pub fn created(data: T, message: impl Into<String>) -> Self {
        Self { status: StatusCode::CREATED, data, message: message.into() }
    }
}

impl<T: Serialize> IntoResponse for Reply<T> {
    fn into_response(self) -> Response {
        (self.status, Json(Envelope { data: Some(self.data), message: self.message, errors: Vec::new() }))
            .into_response()
    }
}

/// Everything a handler can fail with.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// 400: the request cannot be read (malformed JSON, bad path parameter).
    #[error("{message}")]
    BadRequest {
        /// Summary.
        message: String,
        /// Details with pointers.
        problems: Problems,
    },
    /// 401: no token, or one that is not (or no longer) good.
    #[error("{0}")]
    Unauthorized(String),
    /// 403: the token is good but its role may not do this.
    #[error("{0}")]
    Forbidden(String),
    /// 404: no such thing (or not yours to see).
    #[error("{0}")]
    NotFound(String),
    /// 404 for a thing a request body names (an application or cluster of a task),
    /// with a pointer to the field, so a form can show it there.
    #[error("{message}")]
    NotFoundIn {
        /// Summary.
        message: String,
        /// The field(s) naming what does not exist.
        problems: Problems,
    },
    /// 405.
    #[error("{0}")]
    MethodNotAllowed(String),
    /// 409: conflicts with the current state.
    #[error("{0}")]
    Conflict(String),
    /// 413: body over the cap.
    #[error("{0}")]
    PayloadTooLarge(String),
    /// 415: not JSON where JSON is expected.
    #[error("{0}")]
    UnsupportedMediaType(String),
    /// 429: too many requests of this kind from this caller; try again after a while.
    #[error("{message}")]
    TooManyRequests {
        /// What limit was hit.
        message: String,
        /// Seconds until a retry can succeed.
        retry_after: u64,
    },
    /// 422: well-formed but invalid; every problem listed.
    #[error("{message}")]
    Invalid {
        /// Summary.
        message: String,
        /// Every problem, with pointers.
        problems: Problems,
    },
    /// 503: a dependency (the store) is down; try again later.
    #[error("{message}")]
    Unavailable {
        /// What is unavailable (no internals).
        message: String,
        /// The cause, for the log.
        #[source]
        source: anyhow::Error,
    },
    /// 500: a bug or an unexpected failure; details only in the log.
    #[error(transparent)]
    Internal(#[from] anyhow::Error),
}

impl ApiError {
    /// 404 for the application or cluster a task body names: the pointer is its field.
    pub fn unknown_definition(kind: crate::definitions::DefinitionKind, message: String) -> Self {
        let pointer = format!("/{}", kind.singular());
        let problems = Problems::from(crate::model::Problem::new(&pointer, message.clone()));
        Self::NotFoundIn { message, problems }
    }

    /// 422 with `problems`.
    pub fn invalid(what: &str, problems: Problems) -> Self {
        let n = problems.len();
        let message = format!("{what} is invalid: {n} problem{} (see errors)", if n == 1 { "" } else { "s" });
        Self::Invalid { message, problems }
    }

    /// The HTTP status this error answers with.
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::BadRequest { .. } => StatusCode::BAD_REQUEST,
            ApiError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::NotFound(_) | ApiError::NotFoundIn { .. } => StatusCode::NOT_FOUND,
            ApiError::TooManyRequests { .. } => StatusCode::TOO_MANY_REQUESTS,
            ApiError::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::Invalid { .. } => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::Unavailable { .. } => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Unavailable { backend, source } => ApiError::Unavailable {
                message: format!("the {backend} store is unavailable; nothing was changed, try again shortly"),
                source,
            },
            StoreError::Conflict(m) => ApiError::Conflict(m),
            StoreError::Other(e) => ApiError::Internal(e),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        let retry_after = match &self {
            ApiError::TooManyRequests { retry_after, .. } => Some(*retry_after),
            ApiError::Unavailable { .. } => Some(5),
            _ => None,
        };
        let (message, errors) = match self {
            ApiError::BadRequest { message, problems }
            | ApiError::Invalid { message, problems }
            | ApiError::NotFoundIn { message, problems } => (message, problems.into_iter().collect()),
            ApiError::Unavailable { message, source } => {
                tracing::warn!(error = format!("{source:#}"), "answering 503");
                (message, Vec::new())
            }
            ApiError::Internal(e) => {
                tracing::error!(error = format!("{e:#}"), "internal error");
                ("internal error; the server log has the details".to_owned(), Vec::new())
            }
            other => (other.to_string(), Vec::new()),
        };
        let body: Envelope<Value> = Envelope { data: None, message, errors };
        let mut resp = (status, Json(body)).into_response();
        if let Some(secs) = retry_after {
            resp.headers_mut().insert(axum::http::header::RETRY_AFTER, axum::http::HeaderValue::from(secs));
        }
        if status == StatusCode::UNAUTHORIZED {
            resp.headers_mut().insert(
                axum::http::header::WWW_AUTHENTICATE,
                axum::http::HeaderValue::from_static("Bearer realm=\"hpcforge\""),
            );
        }
        resp
    }
}

/// The envelope for `null` data, e.g. health answers that carry only a message.
pub fn message_only(status: StatusCode, message: &str) -> Response {
    (status, Json(json!({ "data": null, "message": message }))).into_response()
}

//! Request extractors that fail with [`ApiError`]s in the API's envelope: JSON bodies
//! (415 / 413 / 400 / 422 with a JSON pointer) and the caller's identity.

use axum::body::Bytes;
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::header::CONTENT_TYPE;
use axum::http::request::Parts;
use serde::de::DeserializeOwned;

use super::error::ApiError;
use crate::model::{Problem, Problems, UserName};

/// A JSON body deserialised into `T`; errors are located by JSON pointer.
pub struct JsonBody<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let is_json = req
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(';').next())
            .is_some_and(|mime| {
                let mime = mime.trim().to_ascii_lowercase();
                mime == "application/json" || (mime.starts_with("application/") && mime.ends_with("+json"))
            });
        if !is_json {
            return Err(ApiError::UnsupportedMediaType(
                "send the body as JSON with `Content-Type: application/json`".into(),
            ));
        }
        let bytes = Bytes::from_request(req, state).await.map_err(|rejection| {
            if rejection.status() == axum::http::StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::PayloadTooLarge(format!("the request body is too large: {}", rejection.body_text()))
            } else {
                ApiError::BadRequest {
                    message: format!("could not read the request body: {}", rejection.body_text()),
                    problems: Problems::default(),
                }
            }
        })?;
        crate::definitions::from_json_located(&bytes).map(JsonBody).map_err(|problems| {
            let syntax = problems.iter().all(|p| p.pointer.is_empty() && p.message.starts_with("invalid JSON"));
            if syntax {
                ApiError::BadRequest { message: "the request body is not valid JSON".into(), problems }
            } else {
                ApiError::invalid("the request body", problems)
            }
        })
    }
}

/// Header naming who makes the request, until real authentication exists.
pub const USER_HEADER: &str = "x-hpcforge-user";

/// Who is asking. Before authentication lands (portal API issue) this is what the
/// caller says in `X-Hpcforge-User` (default `anonymous`); it is recorded as
/// `uploaded_by` and is **not** a security boundary — keep the server on loopback.
#[derive(Debug, Clone)]
pub struct Actor(pub UserName);

impl<S: Send + Sync> FromRequestParts<S> for Actor {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        let Some(value) = parts.headers.get(USER_HEADER) else {
            return Ok(Actor(UserName::parse("anonymous").expect("valid name")));
        };
        let text = value.to_str().map_err(|_| ApiError::BadRequest {
            message: format!("the {USER_HEADER} header is not text"),
            problems: Problems::default(),
        })?;
        UserName::parse(text).map(Actor).map_err(|e| ApiError::BadRequest {
            message: format!("the {USER_HEADER} header is invalid"),
            problems: Problems::from(Problem::new("", e.to_string())),
        })
    }
}

//! Request extractors that fail with [`ApiError`]s in the API's envelope: JSON bodies
//! (415 / 413 / 400 / 422 with a JSON pointer) and query strings (400). Who is asking
//! is [`super::auth::Caller`].

use axum::body::Bytes;
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::header::CONTENT_TYPE;
use axum::http::request::Parts;
use serde::de::DeserializeOwned;

use super::error::ApiError;
use crate::model::{Problem, Problems};

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

/// Query parameters deserialised into `T`; a bad or unknown parameter is a 400 in the
/// API's envelope (axum's own rejection is plain text).
pub struct QueryArgs<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequestParts<S> for QueryArgs<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        match axum::extract::Query::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Query(v)) => Ok(QueryArgs(v)),
            Err(rejection) => {
                let text = rejection.body_text();
                let detail = text.strip_prefix("Failed to deserialize query string: ").unwrap_or(&text).to_owned();
                Err(ApiError::BadRequest {
                    message: format!("the query string is not understood: {detail}"),
                    problems: Problems::from(Problem::new("", detail)),
                })
            }
        }
    }
}

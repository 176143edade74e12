//! The web page at `/`: a small hand-written page (HTML, CSS, JavaScript compiled
//! into the binary, no build step) for users and admins — sign in with a token, follow
//! tasks live, submit from a form built from the application's input specs, cancel
//! and restart. It talks to the same API as any portal.

use axum::Router;
use axum::extract::Path;
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;

use super::AppState;
use super::error::ApiError;

const INDEX: &str = include_str!("web/index.html");
const APP_JS: &str = include_str!("web/app.js");
const APP_CSS: &str = include_str!("web/app.css");

/// `/` and `/assets/{file}`.
pub fn routes() -> Router<AppState> {
    Router::new().route("/", get(index)).route("/assets/{file}", get(asset))
}

/// Headers every page answer carries: no framing by other sites, no sniffing, and a
/// content policy that allows only this server's own scripts and styles.
fn with_headers(body: &'static str, content_type: &'static str) -> Response {
    let mut resp = body.into_response();
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
        ),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    resp
}

async fn index() -> Response {
    with_headers(INDEX, "text/html; charset=utf-8")
}

async fn asset(Path(file): Path<String>) -> Result<Response, ApiError> {
    match file.as_str() {
        "app.js" => Ok(with_headers(APP_JS, "text/javascript; charset=utf-8")),
        "app.css" => Ok(with_headers(APP_CSS, "text/css; charset=utf-8")),
        _ => Err(ApiError::NotFound(format!("no such asset: {}", file.escape_debug()))),
    }
}

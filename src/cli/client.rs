//! A typed client for the API, used by the CLI (and by the integration tests, so they
//! drive the server the way admins do). It sends the bearer token, and for a portal
//! token the user it acts for.

use std::time::Duration;

use anyhow::Context as _;
use reqwest::{Method, StatusCode};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::model::Problem;

/// An error answer from the server, or a failure to reach it.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The server could not be reached at all.
    #[error(
        "cannot reach the hpcforge server at {url}: {reason} (is `hpcforge serve` running? set --server or HPCFORGE_SERVER)"
    )]
    Unreachable {
        /// The base URL used.
        url: String,
        /// Why.
        reason: String,
    },
    /// The server answered with an error status.
    #[error("the server answered {status}: {message}")]
    Server {
        /// HTTP status.
        status: StatusCode,
        /// The envelope's message.
        message: String,
        /// The envelope's problems.
        errors: Vec<Problem>,
    },
    /// Something else (an answer that is not the envelope, ...).
    #[error(transparent)]
    Other(#[from] anyhow::Error),
}

/// The API client.
#[derive(Debug, Clone)]
pub struct Client {
    http: reqwest::Client,
    base: String,
    token: Option<crate::config::Secret>,
    on_behalf_of: Option<String>,
}

/// How long an ordinary call may take (event streams are not bounded).
const CALL_TIMEOUT: Duration = Duration::from_secs(120);

/// A successful answer: the envelope's data and message.
#[derive(Debug)]
pub struct Answer<T> {
    /// HTTP status.
    pub status: StatusCode,
    /// The data.
    pub data: T,
    /// The message.
    pub message: String,
}

impl Client {
    /// A client for the server at `base` (`http://127.0.0.1:8080`) sending `token`.
    pub fn new(base: &str, token: Option<crate::config::Secret>) -> anyhow::Result<Self> {
        // TLS for https:// servers uses rustls with the ring provider (the one the
        // MongoDB driver already brings). Installing it twice is harmless.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            // Event streams send a keep-alive every 15 s; a silent minute means trouble.
            .read_timeout(Duration::from_secs(60))
            .user_agent(concat!("hpcforge-cli/", env!("CARGO_PKG_VERSION")))
            .build()
            .context("building the HTTP client")?;
        Ok(Self { http, base: base.trim_end_matches('/').to_owned(), token, on_behalf_of: None })
    }

    /// The same client acting for `user` (portal tokens only; the server refuses
    /// others).
    pub fn on_behalf_of(mut self, user: Option<String>) -> Self {
        self.on_behalf_of = user;
        self
    }

    fn request(&self, method: Method, path: &str) -> reqwest::RequestBuilder {
        let mut req = self.http.request(method, format!("{}{path}", self.base));
        if let Some(t) = &self.token {
            req = req.bearer_auth(t.expose());
        }
        if let Some(u) = &self.on_behalf_of {
            req = req.header(crate::api::auth::ON_BEHALF_HEADER, u);
        }
        req
    }

    /// Opens an event stream (`text/event-stream`), resuming after `last_event_id`.
    pub async fn stream(&self, path: &str, last_event_id: Option<u64>) -> Result<EventStream, ClientError> {
        let mut req = self.request(Method::GET, path).header(reqwest::header::ACCEPT, "text/event-stream");
        if let Some(id) = last_event_id {
            req = req.header("last-event-id", id.to_string());
        }
        let resp =
            req.send().await.map_err(|e| ClientError::Unreachable { url: self.base.clone(), reason: reason_of(&e) })?;
        let status = resp.status();
        if !status.is_success() {
            let text = resp.text().await.unwrap_or_default();
            let message = serde_json::from_str::<Value>(&text)
                .ok()
                .and_then(|v| v.get("message").and_then(Value::as_str).map(str::to_owned))
                .unwrap_or(text);
            return Err(ClientError::Server { status, message, errors: Vec::new() });
        }
        Ok(EventStream { resp, buf: Vec::new() })
    }

    /// The server's base URL.
    pub fn base(&self) -> &str {
        &self.base
    }

    async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<&(impl Serialize + ?Sized)>,
    ) -> Result<reqwest::Response, ClientError> {
        let mut req = self.request(method, path).timeout(CALL_TIMEOUT);
        if let Some(b) = body {
            req = req.json(b);
        }
        req.send().await.map_err(|e| ClientError::Unreachable { url: self.base.clone(), reason: reason_of(&e) })
    }

    /// Sends a request and decodes the envelope's data as `T`.
    pub async fn call<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&(impl Serialize + ?Sized)>,
    ) -> Result<Answer<T>, ClientError> {
        let resp = self.send(method, path, body).await?;
        let status = resp.status();
        let bytes = resp
            .bytes()
            .await
            .map_err(|e| ClientError::Unreachable { url: self.base.clone(), reason: reason_of(&e) })?;
        let envelope: Value = serde_json::from_slice(&bytes).with_context(|| {
            format!(
                "the server answered {status} with something that is not hpcforge's JSON: {}",
                String::from_utf8_lossy(&bytes[..bytes.len().min(200)])
            )
        })?;
        let message = envelope.get("message").and_then(Value::as_str).unwrap_or_default().to_owned();
        if !status.is_success() {
            let errors = envelope
                .get("errors")
                .cloned()
                .map(serde_json::from_value::<Vec<Problem>>)
                .transpose()
                .context("decoding the server's error list")?
                .unwrap_or_default();
            return Err(ClientError::Server { status, message, errors });
        }
        let data = serde_json::from_value(envelope.get("data").cloned().unwrap_or(Value::Null))
            .with_context(|| format!("decoding the server's answer to {path}"))?;
        Ok(Answer { status, data, message })
    }

    /// Fetches a raw text resource (a stored script).
    pub async fn text(&self, path: &str) -> Result<(String, reqwest::header::HeaderMap), ClientError> {
        let resp = self.send(Method::GET, path, None::<&()>).await?;
        let status = resp.status();
        let headers = resp.headers().clone();
        let text = resp
            .text()
            .await
            .map_err(|e| ClientError::Unreachable { url: self.base.clone(), reason: reason_of(&e) })?;
        if !status.is_success() {
            let message = serde_json::from_str::<Value>(&text)
                .ok()
                .and_then(|v| v.get("message").and_then(Value::as_str).map(str::to_owned))
                .unwrap_or(text);
            return Err(ClientError::Server { status, message, errors: Vec::new() });
        }
        Ok((text, headers))
    }
}

impl Client {
    /// Downloads a raw resource into `out` as it comes (no time limit on the whole:
    /// files may be large); returns the bytes written.
    pub async fn download(&self, path: &str, out: &mut (dyn std::io::Write + Send)) -> Result<u64, ClientError> {
        let unreachable =
            |e: reqwest::Error| ClientError::Unreachable { url: self.base.clone(), reason: reason_of(&e) };
        let mut resp = self.request(Method::GET, path).send().await.map_err(unreachable)?;
        let status = resp.status();
        if !status.is_success() {
            let text = resp.text().await.map_err(unreachable)?;
            let message = serde_json::from_str::<Value>(&text)
                .ok()
                .and_then(|v| v.get("message").and_then(Value::as_str).map(str::to_owned))
                .unwrap_or(text);
            return Err(ClientError::Server { status, message, errors: Vec::new() });
        }
        let mut written = 0u64;
        while let Some(chunk) = resp.chunk().await.map_err(unreachable)? {
            out.write_all(&chunk).context("writing the download")?;
            written += chunk.len() as u64;
        }
        out.flush().context("writing the download")?;
        Ok(written)
    }
}

/// One message of a Server-Sent Events stream.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SseMessage {
    /// Its `event:` name (`message` when it has none).
    pub event: String,
    /// Its `data:` lines, joined by newlines.
    pub data: String,
    /// Its `id:`, if it has one.
    pub id: Option<String>,
}

/// A `text/event-stream` answer, read message by message.
#[derive(Debug)]
pub struct EventStream {
    resp: reqwest::Response,
    buf: Vec<u8>,
}

impl EventStream {
    /// The next message; `None` when the stream ended or dropped (reconnect with the
    /// last `id` to resume).
    pub async fn next(&mut self) -> Option<SseMessage> {
        let mut msg = SseMessage::default();
        let mut any = false;
        loop {
            while let Some(pos) = self.buf.iter().position(|b| *b == b'\n') {
                let raw: Vec<u8> = self.buf.drain(..=pos).collect();
                let line = String::from_utf8_lossy(&raw);
                let line = line.trim_end_matches(['\n', '\r']);
                if line.is_empty() {
                    if any {
                        if msg.event.is_empty() {
                            msg.event = "message".into();
                        }
                        return Some(msg);
                    }
                    continue;
                }
                if line.starts_with(':') {
                    continue; // a comment (keep-alive)
                }
                let (field, value) = line.split_once(':').unwrap_or((line, ""));
                let value = value.strip_prefix(' ').unwrap_or(value);
                any = true;
                match field {
                    "event" => msg.event = value.to_owned(),
                    "data" => {
                        if !msg.data.is_empty() {
                            msg.data.push('\n');
                        }
                        msg.data.push_str(value);
                    }
                    "id" => msg.id = Some(value.to_owned()),
                    _ => {}
                }
            }
            match self.resp.chunk().await {
                Ok(Some(chunk)) => self.buf.extend_from_slice(&chunk),
                _ => return None,
            }
        }
    }
}

/// The innermost cause of a transport error, which is the useful part
/// ("Connection refused" rather than "error sending request").
fn reason_of(e: &reqwest::Error) -> String {
    let mut source: &dyn std::error::Error = e;
    while let Some(next) = source.source() {
        source = next;
    }
    source.to_string()
}

//! Checks that what the server does matches its OpenAPI document, request by request.
//!
//! The test suite wraps the router with [`Conformance::layer`]; every request the
//! tests make is then checked: the route that answered must be in the document, its
//! status must be one the operation lists, a JSON answer must validate against the
//! documented schema (objects may not carry properties the document does not name),
//! and an accepted JSON request body must validate against the documented request
//! schema. [`Conformance::violations`] lists what disagreed; the tests fail on any.
//! It buffers bodies, so it is for tests, not production.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex};

use axum::body::{Body, Bytes};
use axum::extract::{MatchedPath, Request, State};
use axum::http::header::CONTENT_TYPE;
use axum::middleware::Next;
use axum::response::Response;
use serde_json::{Value, json};

/// The document and what was seen of it.
pub struct Conformance {
    spec: Value,
    /// The document's component schemas, made strict (see [`strict`]).
    components: Value,
    validators: Mutex<HashMap<String, Arc<jsonschema::Validator>>>,
    violations: Mutex<Vec<String>>,
    seen: Mutex<BTreeSet<(String, String)>>,
}

impl std::fmt::Debug for Conformance {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Conformance").finish_non_exhaustive()
    }
}

/// Most bytes of a body this buffers; above the server's own caps, so the server (not
/// this checker) decides what is too large.
const MAX_BODY: usize = 256 * 1024 * 1024;

/// Routes that are not part of the API and so not in its document: the web page and
/// its assets, the document itself and Swagger UI.
const NOT_API: [&str; 6] = ["/", "/assets/{file}", "/api/v1/openapi.json", "/docs", "/docs/", "/docs/{rest}"];

impl Conformance {
    /// A checker for `doc`.
    pub fn new(doc: &utoipa::openapi::OpenApi) -> Arc<Self> {
        let spec = serde_json::to_value(doc).expect("the document serialises");
        let mut components = spec.pointer("/components/schemas").cloned().unwrap_or_else(|| json!({}));
        let in_all_of = all_of_members(&spec);
        if let Some(map) = components.as_object_mut() {
            for (name, schema) in map.iter_mut() {
                if !in_all_of.contains(name) {
                    strict(schema);
                } else {
                    strict_inside(schema);
                }
            }
        }
        Arc::new(Self {
            spec,
            components,
            validators: Mutex::default(),
            violations: Mutex::default(),
            seen: Mutex::default(),
        })
    }

    /// What disagreed so far.
    pub fn violations(&self) -> Vec<String> {
        self.violations.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The (method, path) operations requests reached so far.
    pub fn seen(&self) -> BTreeSet<(String, String)> {
        self.seen.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Every (method, path) operation of the document.
    pub fn operations(&self) -> BTreeSet<(String, String)> {
        let mut out = BTreeSet::new();
        for (path, item) in self.spec["paths"].as_object().into_iter().flatten() {
            for method in ["get", "put", "post", "delete", "patch"] {
                if item.get(method).is_some() {
                    out.insert((method.to_uppercase(), path.clone()));
                }
            }
        }
        out
    }

    fn violation(&self, text: String) {
        self.violations.lock().unwrap_or_else(|p| p.into_inner()).push(text);
    }

    /// A validator for the schema at `pointer` in the document (compiled once).
    fn validator(&self, pointer: &str) -> Result<Arc<jsonschema::Validator>, String> {
        if let Some(v) = self.validators.lock().unwrap_or_else(|p| p.into_inner()).get(pointer) {
            return Ok(v.clone());
        }
        let mut schema = self.spec.pointer(pointer).cloned().ok_or_else(|| format!("no schema at {pointer}"))?;
        strict(&mut schema);
        let mut root = match schema {
            Value::Object(o) => Value::Object(o),
            other => json!({ "allOf": [other] }),
        };
        root["components"] = json!({ "schemas": self.components.clone() });
        root["$schema"] = json!("https://json-schema.org/draft/2020-12/schema");
        let v = Arc::new(
            jsonschema::draft202012::options()
                .should_validate_formats(true)
                .build(&root)
                .map_err(|e| format!("the schema at {pointer} does not compile: {e}"))?,
        );
        self.validators.lock().unwrap_or_else(|p| p.into_inner()).insert(pointer.to_owned(), v.clone());
        Ok(v)
    }

    fn check_json(&self, what: &str, pointer: &str, body: &[u8]) {
        let value: Value = match serde_json::from_slice(body) {
            Ok(v) => v,
            Err(e) => return self.violation(format!("{what}: not JSON: {e}")),
        };
        match self.validator(pointer) {
            Ok(v) => {
                let errors: Vec<String> =
                    v.iter_errors(&value).take(5).map(|e| format!("{} at `{}`", e, e.instance_path())).collect();
                if !errors.is_empty() {
                    self.violation(format!("{what}: does not match the documented schema: {}", errors.join("; ")));
                }
            }
            Err(e) => self.violation(format!("{what}: {e}")),
        }
    }

    /// The middleware (`axum::middleware::from_fn_with_state(conformance, Conformance::layer)`).
    pub async fn layer(State(me): State<Arc<Conformance>>, req: Request, next: Next) -> Response {
        let Some(matched) = req.extensions().get::<MatchedPath>().map(|m| m.as_str().replace("{*", "{")) else {
            return next.run(req).await; // the fallback: nothing documented to compare with
        };
        if NOT_API.contains(&matched.as_str()) {
            return next.run(req).await;
        }
        let method = req.method().as_str().to_lowercase();
        let what = format!("{} {matched}", method.to_uppercase());
        let op_pointer = format!("/paths/{}/{method}", escape_pointer(&matched));
        if me.spec.pointer(&op_pointer).is_none() {
            let resp = next.run(req).await;
            // A path served for other methods answers 405 to this one: nothing is served.
            if resp.status() != axum::http::StatusCode::METHOD_NOT_ALLOWED {
                me.violation(format!("{what}: served, but not in the OpenAPI document"));
            }
            return resp;
        }
        me.seen.lock().unwrap_or_else(|p| p.into_inner()).insert((method.to_uppercase(), matched.clone()));

        // Keep the request body to check it once we know it was accepted.
        let is_json = |h: &axum::http::HeaderMap| {
            h.get(CONTENT_TYPE).and_then(|v| v.to_str().ok()).is_some_and(|v| v.starts_with("application/json"))
        };
        let request_json = is_json(req.headers());
        let (parts, body) = req.into_parts();
        let request_body = axum::body::to_bytes(body, MAX_BODY).await.unwrap_or_default();
        let req = Request::from_parts(parts, Body::from(request_body.clone()));

        let resp = next.run(req).await;
        let status = resp.status();
        let code = status.as_u16().to_string();
        let responses = format!("{op_pointer}/responses");
        let resp_pointer = if me.spec.pointer(&format!("{responses}/{code}")).is_some() {
            format!("{responses}/{code}")
        } else if me.spec.pointer(&format!("{responses}/default")).is_some() {
            format!("{responses}/default")
        } else {
            me.violation(format!("{what}: answered {code}, which the document does not list"));
            return resp;
        };
        if status.is_success() && request_json && !request_body.is_empty() {
            let schema = format!("{op_pointer}/requestBody/content/application~1json/schema");
            if me.spec.pointer(&schema).is_some() {
                me.check_json(&format!("{what} (accepted request body)"), &schema, &request_body);
            } else {
                me.violation(format!("{what}: accepted a JSON body the document does not describe"));
            }
        }
        let content_type = resp.headers().get(CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
        let mime = content_type.split(';').next().unwrap_or("").trim().to_owned();
        if mime.is_empty() {
            return resp;
        }
        let content = format!("{resp_pointer}/content/{}", escape_pointer(&mime));
        if me.spec.pointer(&content).is_none() {
            me.violation(format!("{what}: answered {code} as {mime}, which the document does not list"));
            return resp;
        }
        if mime != "application/json" {
            return resp; // text and event streams: the media type is the contract
        }
        let (parts, body) = resp.into_parts();
        let bytes: Bytes = match axum::body::to_bytes(body, MAX_BODY).await {
            Ok(b) => b,
            Err(e) => {
                me.violation(format!("{what}: the answer could not be read: {e}"));
                Bytes::new()
            }
        };
        if me.spec.pointer(&format!("{content}/schema")).is_some() {
            me.check_json(&format!("{what} → {code}"), &format!("{content}/schema"), &bytes);
        }
        Response::from_parts(parts, Body::from(bytes))
    }
}

/// Escapes a JSON-pointer segment (RFC 6901).
fn escape_pointer(s: &str) -> String {
    s.replace('~', "~0").replace('/', "~1")
}

/// Names of component schemas that appear as `allOf` members somewhere: they are
/// parts of a larger object, so they must accept the other parts' properties.
fn all_of_members(spec: &Value) -> HashSet<String> {
    let mut out = HashSet::new();
    fn walk(v: &Value, out: &mut HashSet<String>) {
        match v {
            Value::Object(o) => {
                if let Some(Value::Array(members)) = o.get("allOf") {
                    for m in members {
                        if let Some(r) = m.get("$ref").and_then(Value::as_str)
                            && let Some(name) = r.strip_prefix("#/components/schemas/")
                        {
                            out.insert(name.to_owned());
                        }
                    }
                }
                o.values().for_each(|x| walk(x, out));
            }
            Value::Array(a) => a.iter().for_each(|x| walk(x, out)),
            _ => {}
        }
    }
    walk(spec, &mut out);
    out
}

/// Makes object schemas refuse properties they do not name: `unevaluatedProperties:
/// false` on every object with `properties`, and on every `allOf` composition (whose
/// members are left open, since each sees only its own properties).
fn strict(schema: &mut Value) {
    let Value::Object(o) = schema else { return };
    let composed = o.contains_key("allOf");
    if (o.contains_key("properties") || composed)
        && !o.contains_key("additionalProperties")
        && !o.contains_key("unevaluatedProperties")
    {
        o.insert("unevaluatedProperties".into(), Value::Bool(false));
    }
    for (key, child) in o.iter_mut() {
        match key.as_str() {
            "allOf" => {
                if let Value::Array(members) = child {
                    members.iter_mut().for_each(strict_inside);
                }
            }
            "properties" | "$defs" | "patternProperties" => {
                if let Value::Object(props) = child {
                    props.values_mut().for_each(strict);
                }
            }
            "items" | "additionalProperties" | "not" => strict(child),
            "oneOf" | "anyOf" | "prefixItems" => {
                if let Value::Array(a) = child {
                    a.iter_mut().for_each(strict);
                }
            }
            _ => {}
        }
    }
}

/// For an `allOf` member: its own properties stay open (the composition closes
/// them), but what is nested inside its properties is made strict.
fn strict_inside(schema: &mut Value) {
    let Value::Object(o) = schema else { return };
    if let Some(Value::Object(props)) = o.get_mut("properties") {
        props.values_mut().for_each(strict);
    }
    if let Some(Value::Array(members)) = o.get_mut("allOf") {
        members.iter_mut().for_each(strict_inside);
    }
}

//! The portal API: tokens and roles, portals acting for users, the full tasks API
//! (filters, cursors, events, live streams, output tails), metrics, limits, the
//! OpenAPI document against the handlers, and a graceful shutdown. Tasks run on the
//! `local` cluster as the test's own user, so no SSH is involved.

use std::time::{Duration, Instant};

use hpcforge::auth::Role;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::helpers::{TestApp, TestStore, spawn_app};

/// The Unix user the tests (and so the `local` cluster's jobs) run as.
fn me() -> String {
    hpcforge::mediator::current_user().expect("the test knows who it runs as").to_string()
}

/// A server whose store has the examples (`local` cluster, `sleep`, `pi`).
async fn seeded(t: &TestStore) -> TestApp {
    hpcforge::examples::seed_if_empty(t.store.as_ref()).await.unwrap();
    spawn_app(t.store.clone()).await
}

/// Sends a request as `user` (by token) and returns status and the envelope.
async fn call(app: &TestApp, method: Method, path: &str, user: &str, body: Option<&Value>) -> (StatusCode, Value) {
    let mut req = app.req(method, path, user).await;
    if let Some(b) = body {
        req = req.json(b);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status();
    let text = resp.text().await.unwrap();
    (status, serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}")))
}

/// Sends with a raw Authorization header value (or none).
async fn with_auth(app: &TestApp, method: Method, path: &str, auth: Option<&str>) -> reqwest::Response {
    let mut req = app.http.request(method, format!("{}{path}", app.base));
    if let Some(a) = auth {
        req = req.header("authorization", a);
    }
    req.send().await.unwrap()
}

async fn submit_sleep(app: &TestApp, user: &str, seconds: i64) -> Value {
    let body = json!({ "application": "sleep", "cluster": "local", "inputs": { "sleep": seconds } });
    let (s, v) = call(app, Method::POST, "/api/v1/tasks", user, Some(&body)).await;
    assert_eq!(s, StatusCode::CREATED, "{v:#}");
    v["data"].clone()
}

async fn wait_final(app: &TestApp, user: &str, id: &str) -> Value {
    let start = Instant::now();
    loop {
        let (s, v) = call(app, Method::GET, &format!("/api/v1/tasks/{id}"), user, None).await;
        assert_eq!(s, StatusCode::OK, "{v}");
        if matches!(v["data"]["state"].as_str(), Some("completed" | "failed" | "cancelled" | "unknown")) {
            return v["data"].clone();
        }
        assert!(start.elapsed() < Duration::from_secs(60), "the task did not end: {v:#}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn remove_run_dir(task: &Value) {
    if let Some(dir) = task["run_dir"].as_str().filter(|d| d.contains("hpcforge-runs/")) {
        let _ = std::fs::remove_dir_all(dir);
    }
}

/// The top-level `state` of a task summary sent as JSON.
fn task_state(data: &str) -> String {
    serde_json::from_str::<Value>(data).ok().and_then(|v| v["state"].as_str().map(str::to_owned)).unwrap_or_default()
}

/// One Server-Sent Event.
#[derive(Debug, Clone)]
pub(crate) struct Sse {
    pub(crate) id: Option<String>,
    pub(crate) event: String,
    pub(crate) data: String,
}

/// Reads events from `resp` until `stop` says so, the stream ends, or `secs` pass.
pub(crate) async fn read_events(resp: &mut reqwest::Response, secs: u64, stop: impl Fn(&Sse) -> bool) -> Vec<Sse> {
    let deadline = Instant::now() + Duration::from_secs(secs);
    let mut out = Vec::new();
    let mut buf: Vec<u8> = Vec::new();
    let mut cur = Sse { id: None, event: "message".into(), data: String::new() };
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(!left.is_zero(), "no end after {secs} s; got {out:#?}");
        let chunk = match tokio::time::timeout(left, resp.chunk()).await {
            Ok(Ok(Some(c))) => c,
            Ok(_) => return out,
            Err(_) => panic!("no end after {secs} s; got {out:#?}"),
        };
        buf.extend_from_slice(&chunk);
        while let Some(pos) = buf.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = buf.drain(..=pos).collect();
            let line = String::from_utf8(line).unwrap();
            let line = line.trim_end_matches(['\n', '\r']);
            if line.is_empty() {
                if !cur.data.is_empty() || cur.id.is_some() {
                    let done = stop(&cur);
                    out.push(cur.clone());
                    if done {
                        return out;
                    }
                }
                cur = Sse { id: None, event: "message".into(), data: String::new() };
            } else if let Some(v) = line.strip_prefix("id:") {
                cur.id = Some(v.trim().to_owned());
            } else if let Some(v) = line.strip_prefix("event:") {
                cur.event = v.trim().to_owned();
            } else if let Some(v) = line.strip_prefix("data:") {
                cur.data.push_str(v.strip_prefix(' ').unwrap_or(v));
            }
        }
    }
}

// ---------------------------------------------------------------------------------
// Tokens and roles
// ---------------------------------------------------------------------------------

/// Whether any string in `v` is a whole token.
fn has_token(v: &Value) -> bool {
    match v {
        Value::String(s) => hpcforge::auth::looks_like_token(s),
        Value::Array(a) => a.iter().any(has_token),
        Value::Object(o) => o.values().any(has_token),
        _ => false,
    }
}

/// Fills path parameters with plausible values.
fn concrete(path: &str) -> String {
    path.replace("{name}", "sleep")
        .replace("{version}", "1")
        .replace("{path}", "app_execute")
        .replace("{id}", "0190b4e2-0000-7000-8000-000000000000")
        .replace("{phase}", "execute")
        .replace("{user}", "alice")
        .replace("{cluster}", "local")
        .replace("{token_id}", "0190b4e2-0000-7000-8000-000000000000")
}

async fn no_endpoint_but_health_docs_and_the_page_answers_without_a_token(t: TestStore) {
    let app = seeded(&t).await;
    let public = ["/healthz", "/readyz"];
    let mut checked = 0;
    for (method, path) in app.conformance.operations() {
        let url = concrete(&path);
        let m = Method::from_bytes(method.as_bytes()).unwrap();
        let resp = with_auth(&app, m, &url, None).await;
        if public.contains(&path.as_str()) {
            assert_eq!(resp.status(), StatusCode::OK, "{method} {path}");
            continue;
        }
        assert_eq!(resp.status(), StatusCode::UNAUTHORIZED, "{method} {path} answered without a token");
        assert_eq!(resp.headers()["www-authenticate"], "Bearer realm=\"hpcforge\"");
        let v: Value = resp.json().await.unwrap();
        assert!(v["message"].as_str().unwrap().contains("send `Authorization: Bearer <token>`"), "{v}");
        checked += 1;
    }
    assert!(checked > 30, "every protected operation was tried ({checked})");
    for path in ["/", "/assets/app.js", "/assets/app.css", "/api/v1/openapi.json", "/docs/"] {
        let resp = with_auth(&app, Method::GET, path, None).await;
        assert_eq!(resp.status(), StatusCode::OK, "{path} is public");
    }
}

async fn bad_expired_revoked_and_disabled_tokens_are_refused_saying_why(t: TestStore) {
    let app = seeded(&t).await;
    let cases = [
        ("Basic YWxpY2U6cGFzcw==", "does not hold an hpcforge token"),
        ("Bearer hpcf_short", "does not hold an hpcforge token"),
        ("Bearer ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAI", "does not hold an hpcforge token"),
    ];
    for (auth, says) in cases {
        let resp = with_auth(&app, Method::GET, "/api/v1/me", Some(auth)).await;
        assert_eq!(resp.status(), StatusCode::UNAUTHORIZED, "{auth}");
        let v: Value = resp.json().await.unwrap();
        assert!(v["message"].as_str().unwrap().contains(says), "{auth}: {v}");
    }
    let unknown = format!("Bearer hpcf_{}", "Z".repeat(43));
    let v: Value = with_auth(&app, Method::GET, "/api/v1/me", Some(&unknown)).await.json().await.unwrap();
    assert!(v["message"].as_str().unwrap().contains("is not known here"), "{v}");

    // Revoked: by the user themselves; it stops working at once.
    let alice = app.token("alice").await;
    let (s, me) = call(&app, Method::GET, "/api/v1/me", "alice", None).await;
    assert_eq!(
        (s, me["data"]["user"].as_str(), me["data"]["role"].as_str()),
        (StatusCode::OK, Some("alice"), Some("user"))
    );
    let id = me["data"]["token"].as_str().unwrap().to_owned();
    let (s, v) = call(&app, Method::DELETE, &format!("/api/v1/users/alice/tokens/{id}"), "alice", None).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let resp = with_auth(&app, Method::GET, "/api/v1/me", Some(&format!("Bearer {alice}"))).await;
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    let v: Value = resp.json().await.unwrap();
    assert!(v["message"].as_str().unwrap().contains("was revoked at"), "{v}");

    // Expired: a token whose time is up.
    let bob = hpcforge::model::UserName::parse("bob").unwrap();
    let admin = hpcforge::model::UserName::parse("admin").unwrap();
    let past = time::OffsetDateTime::now_utc() - time::Duration::days(1);
    hpcforge::auth::add_user(t.store.as_ref(), &bob, Role::User, "", Some(1), &admin, past - time::Duration::days(1))
        .await
        .unwrap();
    let old =
        hpcforge::auth::issue_token(t.store.as_ref(), &bob, "old", Some(1), &admin, past - time::Duration::days(1))
            .await
            .unwrap();
    let v: Value =
        with_auth(&app, Method::GET, "/api/v1/me", Some(&format!("Bearer {}", old.token))).await.json().await.unwrap();
    assert!(v["message"].as_str().unwrap().contains("expired at"), "{v}");

    // Disabled: every token of the account stops working.
    let carol = app.token("carol").await;
    let (s, v) = call(&app, Method::DELETE, "/api/v1/users/carol", "admin", None).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let v: Value =
        with_auth(&app, Method::GET, "/api/v1/me", Some(&format!("Bearer {carol}"))).await.json().await.unwrap();
    assert!(v["message"].as_str().unwrap().contains("user `carol` is disabled"), "names the cause: {v}");
    // The last admin cannot be disabled.
    let (s, v) = call(&app, Method::DELETE, "/api/v1/users/admin", "admin", None).await;
    assert_eq!(s, StatusCode::CONFLICT, "{v}");
}

async fn roles_decide_what_a_token_may_do(t: TestStore) {
    let app = seeded(&t).await;
    let body = serde_json::to_value(
        hpcforge::definitions::folder::load_application(
            &crate::helpers::repo().join("applications/sleep"),
            &Default::default(),
        )
        .unwrap()
        .upload,
    )
    .unwrap();
    for user in ["alice", "portal-gw"] {
        let (s, v) = call(&app, Method::GET, "/api/v1/applications", user, None).await;
        assert_eq!(s, StatusCode::OK, "{user} reads definitions: {v}");
        for (m, path, body) in [
            (Method::PUT, "/api/v1/applications/sleep", Some(&body)),
            (Method::DELETE, "/api/v1/clusters/local", None),
            (Method::GET, "/api/v1/users", None),
            (Method::GET, "/api/v1/credentials", None),
            (Method::GET, "/metrics", None),
        ] {
            let (s, v) = call(&app, m.clone(), path, user, body).await;
            assert_eq!(s, StatusCode::FORBIDDEN, "{user} {m} {path}: {v}");
            assert!(v["message"].as_str().unwrap().contains("needs an admin token"), "{v}");
        }
    }
    // A user manages their own tokens, not someone else's.
    let (s, v) =
        call(&app, Method::POST, "/api/v1/users/alice/tokens", "alice", Some(&json!({ "label": "laptop" }))).await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    assert!(hpcforge::auth::looks_like_token(v["data"]["token"].as_str().unwrap()));
    let (s, _) = call(&app, Method::POST, "/api/v1/users/bob/tokens", "alice", Some(&json!({}))).await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    let (s, v) = call(&app, Method::GET, "/api/v1/users/alice", "alice", None).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(v["data"]["tokens"].as_array().unwrap().len(), 2);
    assert!(!has_token(&v), "listing tokens never shows one: {v}");
    for token in v["data"]["tokens"].as_array().unwrap() {
        assert!(token.get("token").is_none() && token.get("hash").is_none(), "never the token or its hash: {token}");
    }
    // An admin makes users; the first token comes back once.
    let (s, v) =
        call(&app, Method::POST, "/api/v1/users", "admin", Some(&json!({ "name": "dave", "role": "user" }))).await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    assert!(hpcforge::auth::looks_like_token(v["data"]["token"]["token"].as_str().unwrap()));
    let (s, v) =
        call(&app, Method::POST, "/api/v1/users", "admin", Some(&json!({ "name": "dave", "role": "user" }))).await;
    assert_eq!(s, StatusCode::CONFLICT, "{v}");
    let (s, v) =
        call(&app, Method::POST, "/api/v1/users", "admin", Some(&json!({ "name": "Dave!", "role": "boss" }))).await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{v}");
    let pointers: Vec<&str> = v["errors"].as_array().unwrap().iter().map(|e| e["pointer"].as_str().unwrap()).collect();
    assert!(pointers.contains(&"/name") || pointers.contains(&"/role"), "{v}");
}

async fn a_portal_acts_for_a_named_user_and_both_are_recorded(t: TestStore) {
    let app = seeded(&t).await;
    let me = me();
    app.token(&me).await; // the account the portal acts for
    let portal = app.token("portal-gw").await;
    let body = json!({ "application": "sleep", "cluster": "local", "inputs": { "sleep": 0 } });
    let post = |who: Option<&str>| {
        let mut req = app.http.post(format!("{}/api/v1/tasks", app.base)).bearer_auth(&portal).json(&body);
        if let Some(w) = who {
            req = req.header("x-hpcforge-on-behalf-of", w);
        }
        req.send()
    };
    let resp = post(None).await.unwrap();
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    assert!(resp.text().await.unwrap().contains("name the user it acts for in the x-hpcforge-on-behalf-of header"));
    let resp = post(Some("nobody")).await.unwrap();
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);
    let resp = post(Some(&me)).await.unwrap();
    assert_eq!(resp.status(), StatusCode::CREATED);
    let task: Value = resp.json().await.unwrap();
    let task = &task["data"];
    assert_eq!(task["owner"], me.as_str(), "the task is the user's, not the portal's");
    let created = task["events"][0]["message"].as_str().unwrap();
    assert!(created.starts_with(&format!("created by {me} via portal portal-gw")), "{created}");
    let id = task["id"].as_str().unwrap();
    // The user sees it; the portal sees it only when acting for that user.
    let (s, _) = call(&app, Method::GET, &format!("/api/v1/tasks/{id}"), &me, None).await;
    assert_eq!(s, StatusCode::OK);
    let other = app.token("erin").await;
    let _ = other;
    let resp = app
        .http
        .get(format!("{}/api/v1/tasks/{id}", app.base))
        .bearer_auth(&portal)
        .header("x-hpcforge-on-behalf-of", "erin")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::NOT_FOUND, "another user's task is 404 through the portal too");
    // A user token may not act for anyone else.
    let resp = app
        .http
        .get(format!("{}/api/v1/tasks", app.base))
        .bearer_auth(app.token("erin").await)
        .header("x-hpcforge-on-behalf-of", me.as_str())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);
    let done = wait_final(&app, &me, id).await;
    assert_eq!(done["state"], "completed", "{done:#}");
    remove_run_dir(&done);
}

// ---------------------------------------------------------------------------------
// Listing
// ---------------------------------------------------------------------------------

/// A stored task of `owner` in `state` (the API lists what the store holds).
async fn stored_task(t: &TestStore, owner: &str, app: &str, state: hpcforge::model::TaskState) -> String {
    use hpcforge::model::{AppName, ClusterName, DefinitionRef, Task, UserName};
    let mut task = Task::new(
        UserName::parse(owner).unwrap(),
        DefinitionRef { name: AppName::parse(app).unwrap(), version: 1 },
        DefinitionRef { name: ClusterName::parse("local").unwrap(), version: 1 },
        json!([]),
        &hpcforge::model::workflow::PhaseGraph::default_shape(),
        hpcforge::store::to_millis(time::OffsetDateTime::now_utc()),
    );
    task.state = state;
    task.phases.iter_mut().for_each(|p| p.state = hpcforge::model::PhaseState::Completed);
    t.store.insert_task(&task).await.unwrap();
    tokio::time::sleep(Duration::from_millis(3)).await; // distinct milliseconds in the IDs
    task.id.to_string()
}

async fn task_lists_filter_page_and_refuse_tampered_cursors(t: TestStore) {
    use hpcforge::model::TaskState::*;
    let app = seeded(&t).await;
    let mut alice = Vec::new();
    for (i, state) in [Completed, Failed, Completed, Running, Completed].into_iter().enumerate() {
        alice.push(stored_task(&t, "alice", if i % 2 == 0 { "sleep" } else { "pi" }, state).await);
    }
    stored_task(&t, "bob", "sleep", Completed).await;
    alice.reverse(); // newest first
    let ids = |v: &Value| -> Vec<String> {
        v["data"]["tasks"].as_array().unwrap().iter().map(|t| t["id"].as_str().unwrap().to_owned()).collect()
    };
    // Pages of two, following the cursors.
    let mut seen = Vec::new();
    let mut path = "/api/v1/tasks?limit=2".to_owned();
    loop {
        let (s, v) = call(&app, Method::GET, &path, "alice", None).await;
        assert_eq!(s, StatusCode::OK, "{v}");
        seen.extend(ids(&v));
        match v["data"]["next_cursor"].as_str() {
            Some(c) => path = format!("/api/v1/tasks?limit=2&cursor={c}"),
            None => break,
        }
    }
    assert_eq!(seen, alice, "every task once, newest first, none of bob's");
    // Filters.
    let (_, v) = call(&app, Method::GET, "/api/v1/tasks?state=completed&application=sleep", "alice", None).await;
    assert_eq!(ids(&v), [alice[0].clone(), alice[2].clone(), alice[4].clone()]);
    let (_, v) = call(&app, Method::GET, "/api/v1/tasks?state=failed,running", "alice", None).await;
    assert_eq!(ids(&v), [alice[1].clone(), alice[3].clone()]);
    let (_, v) = call(&app, Method::GET, "/api/v1/tasks?cluster=elsewhere", "alice", None).await;
    assert!(ids(&v).is_empty());
    let far = "2100-01-01T00:00:00Z";
    let (_, v) = call(&app, Method::GET, &format!("/api/v1/tasks?since={far}"), "alice", None).await;
    assert!(ids(&v).is_empty());
    // Admins list anyone's; users only their own.
    let (s, v) = call(&app, Method::GET, "/api/v1/tasks?owner=bob", "admin", None).await;
    assert_eq!((s, ids(&v).len()), (StatusCode::OK, 1));
    let (s, _) = call(&app, Method::GET, "/api/v1/tasks?owner=bob", "alice", None).await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    // Bad filters and cursors.
    let (_, first) = call(&app, Method::GET, "/api/v1/tasks?limit=2", "alice", None).await;
    let cursor = first["data"]["next_cursor"].as_str().unwrap().to_owned();
    let mut tampered = cursor.clone().into_bytes();
    let i = tampered.len() / 2;
    tampered[i] = if tampered[i] == b'A' { b'B' } else { b'A' };
    let tampered = String::from_utf8(tampered).unwrap();
    for (path, says) in [
        (format!("/api/v1/tasks?cursor={tampered}"), "not one this server gave out"),
        ("/api/v1/tasks?cursor=%25%25".to_owned(), "not one this server gave out"),
        (format!("/api/v1/tasks?limit=2&state=failed&cursor={cursor}"), "belongs to a query with other filters"),
        ("/api/v1/tasks?state=done".to_owned(), "`done` is not a task state"),
        ("/api/v1/tasks?since=yesterday".to_owned(), "not an RFC 3339 time"),
        ("/api/v1/tasks?limit=0".to_owned(), "between 1 and 200"),
        ("/api/v1/tasks?colour=red".to_owned(), "unknown field `colour`"),
    ] {
        let (s, v) = call(&app, Method::GET, &path, "alice", None).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{path}: {v}");
        assert!(v["message"].as_str().unwrap().contains(says), "{path}: {v}");
    }
    // Bob's cursor does not open alice's pages either: it is tied to his own query.
    let (_, v) = call(&app, Method::GET, &format!("/api/v1/tasks?limit=2&cursor={cursor}"), "bob", None).await;
    assert!(v["message"].as_str().unwrap_or("").contains("other filters"), "{v}");
}

async fn bad_task_bodies_get_the_right_status_and_nothing_is_stored(t: TestStore) {
    let app = seeded(&t).await;
    let me = me();
    let raw = |body: &'static [u8], ct: &'static str| {
        let app = &app;
        let me = me.clone();
        async move {
            let resp = app
                .req(Method::POST, "/api/v1/tasks", &me)
                .await
                .header("content-type", ct)
                .body(body)
                .send()
                .await
                .unwrap();
            let s = resp.status();
            (s, resp.json::<Value>().await.unwrap())
        }
    };
    let (s, _) = raw(b"{\"application\": ", "application/json").await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    let (s, _) = raw(b"{}", "text/plain").await;
    assert_eq!(s, StatusCode::UNSUPPORTED_MEDIA_TYPE);
    for (body, status, pointer) in [
        (json!({ "application": "sleep", "cluster": "local", "inputs": { "sleep": "ten" } }), 422, "/inputs/sleep"),
        (json!({ "application": "sleep", "cluster": "local", "inputs": { "sleep": -1 } }), 422, "/inputs/sleep"),
        (json!({ "application": "sleep", "cluster": "local", "extra": true }), 422, "/extra"),
        (json!({ "application": 7, "cluster": "local" }), 422, "/application"),
    ] {
        let (s, v) = call(&app, Method::POST, "/api/v1/tasks", &me, Some(&body)).await;
        assert_eq!(s.as_u16(), status, "{body}: {v}");
        let pointers: Vec<&str> =
            v["errors"].as_array().unwrap().iter().map(|e| e["pointer"].as_str().unwrap()).collect();
        assert!(pointers.contains(&pointer), "{body}: {v}");
    }
    // An unknown application or cluster: 404, pointing at the field that names it.
    for (body, pointer, says) in [
        (json!({ "application": "nope", "cluster": "local" }), "/application", "there is no application named `nope`"),
        (json!({ "application": "sleep", "cluster": "nope" }), "/cluster", "there is no cluster named `nope`"),
    ] {
        for path in ["/api/v1/tasks", "/api/v1/forge/preview"] {
            let (s, v) = call(&app, Method::POST, path, &me, Some(&body)).await;
            assert_eq!(s, StatusCode::NOT_FOUND, "{path} {body}: {v}");
            assert_eq!(v["message"], says, "{v}");
            assert_eq!(v["errors"][0]["pointer"], pointer, "{v}");
        }
    }
    let big = vec![b'x'; hpcforge::config::DEFAULT_MAX_BODY_BYTES + 1];
    let resp = app
        .req(Method::POST, "/api/v1/tasks", &me)
        .await
        .header("content-type", "application/json")
        .body(big)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::PAYLOAD_TOO_LARGE);
    let (_, v) = call(&app, Method::GET, "/api/v1/tasks", "admin", None).await;
    assert_eq!(v["data"]["tasks"].as_array().unwrap().len(), 0, "nothing was stored");
}

// ---------------------------------------------------------------------------------
// Events, streams, output
// ---------------------------------------------------------------------------------

async fn the_event_stream_replays_and_resumes_after_last_event_id(t: TestStore) {
    let app = seeded(&t).await;
    let me = me();
    let task = submit_sleep(&app, &me, 1).await;
    let id = task["id"].as_str().unwrap().to_owned();
    let path = format!("/api/v1/tasks/{id}/events/stream");
    let mut resp = app.req(Method::GET, &path, &me).await.send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let got = read_events(&mut resp, 60, |e| e.event == "end").await;
    let events: Vec<&Sse> = got.iter().filter(|e| e.event == "event").collect();
    let seqs: Vec<u64> = events.iter().map(|e| e.id.as_deref().unwrap().parse().unwrap()).collect();
    assert_eq!(seqs, (1..=seqs.len() as u64).collect::<Vec<_>>(), "every event once, in order: {got:#?}");
    assert!(got.iter().any(|e| e.event == "task" && task_state(&e.data) == "completed"), "{got:#?}");
    assert!(events.iter().any(|e| e.data.contains("execute: running → completed")), "{got:#?}");
    // The history endpoint says the same.
    let (_, hist) = call(&app, Method::GET, &format!("/api/v1/tasks/{id}/events"), &me, None).await;
    assert_eq!(hist["data"].as_array().unwrap().len(), seqs.len());
    let (_, tail) = call(&app, Method::GET, &format!("/api/v1/tasks/{id}/events?after=3"), &me, None).await;
    assert_eq!(tail["data"][0]["seq"], 4);
    // Reconnecting with Last-Event-ID gets only what came after.
    let k = seqs.len() as u64 - 2;
    let mut resp = app.req(Method::GET, &path, &me).await.header("last-event-id", k.to_string()).send().await.unwrap();
    let again = read_events(&mut resp, 30, |e| e.event == "end").await;
    let resumed: Vec<u64> =
        again.iter().filter(|e| e.event == "event").map(|e| e.id.as_deref().unwrap().parse().unwrap()).collect();
    assert_eq!(resumed, [k + 1, k + 2], "{again:#?}");
    // Nobody else can open it.
    let resp = app.req(Method::GET, &path, "bob").await.send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);
    remove_run_dir(&wait_final(&app, &me, &id).await);
}

async fn one_stream_follows_all_my_tasks_for_a_status_page(t: TestStore) {
    let app = seeded(&t).await;
    let me = me();
    let mut resp = app.req(Method::GET, "/api/v1/tasks/stream", &me).await.send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let task = submit_sleep(&app, &me, 0).await;
    let id = task["id"].as_str().unwrap().to_owned();
    let got = read_events(&mut resp, 60, |e| e.data.contains(&id) && task_state(&e.data) == "completed").await;
    let mine: Vec<Value> =
        got.iter().filter(|e| e.event == "task").map(|e| serde_json::from_str(&e.data).unwrap()).collect();
    assert!(mine.iter().all(|t| t["owner"] == me.as_str()));
    let states: Vec<&str> =
        mine.iter().filter(|t| t["id"] == id.as_str()).map(|t| t["state"].as_str().unwrap()).collect();
    assert_eq!(states.last(), Some(&"completed"), "{states:?}");
    assert!(states.len() >= 2, "changes arrive as they happen: {states:?}");
    // `all` is for admins.
    let resp = app.req(Method::GET, "/api/v1/tasks/stream?all=true", &me).await.send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);
    remove_run_dir(&wait_final(&app, &me, &id).await);
}

async fn a_phases_output_is_read_on_the_cluster_as_the_owner(t: TestStore) {
    let app = seeded(&t).await;
    let me = me();
    let task = submit_sleep(&app, &me, 1).await;
    let id = task["id"].as_str().unwrap().to_owned();
    let done = wait_final(&app, &me, &id).await;
    let (s, v) = call(&app, Method::GET, &format!("/api/v1/tasks/{id}/output/execute"), &me, None).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert!(v["data"]["text"].as_str().unwrap().contains(&format!("execute: sleeping 1s as {me}")), "{v}");
    assert_eq!(v["data"]["stream"], "stdout");
    assert!(v["data"]["path"].as_str().unwrap().ends_with("/execute.out"), "{v}");
    let (s, v) =
        call(&app, Method::GET, &format!("/api/v1/tasks/{id}/output/execute?stream=stderr&lines=5"), &me, None).await;
    assert_eq!((s, v["data"]["stream"].as_str()), (StatusCode::OK, Some("stderr")), "{v}");
    let (s, v) = call(&app, Method::GET, &format!("/api/v1/tasks/{id}/output/execute?lines=1"), &me, None).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(v["data"]["text"].as_str().unwrap().lines().count(), 1, "{v}");
    assert!(v["data"]["truncated"].as_bool().unwrap());
    let (s, _) = call(&app, Method::GET, &format!("/api/v1/tasks/{id}/output/execute?stream=both"), &me, None).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    let (s, _) = call(&app, Method::GET, &format!("/api/v1/tasks/{id}/output/nothing"), &me, None).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    remove_run_dir(&done);
    let (s, v) = call(&app, Method::GET, &format!("/api/v1/tasks/{id}/output/execute"), &me, None).await;
    assert_eq!(s, StatusCode::NOT_FOUND, "once the run directory is gone: {v}");
}

// ---------------------------------------------------------------------------------
// Operability
// ---------------------------------------------------------------------------------

async fn metrics_count_tasks_submissions_latency_and_connections(t: TestStore) {
    let app = seeded(&t).await;
    let me = me();
    let task = submit_sleep(&app, &me, 0).await;
    let done = wait_final(&app, &me, task["id"].as_str().unwrap()).await;
    let resp = app.req(Method::GET, "/metrics", "admin").await.send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert!(resp.headers()["content-type"].to_str().unwrap().starts_with("text/plain; version=0.0.4"));
    let text = resp.text().await.unwrap();
    for line in [
        "hpcforge_tasks{state=\"completed\"} 1",
        "hpcforge_submissions_total{cluster=\"local\",outcome=\"submitted\"} 3",
        "hpcforge_submit_duration_seconds_count 1",
        "hpcforge_ssh_connections_open 0",
        "hpcforge_scheduler_errors_total{kind=\"transient\"} 0",
    ] {
        assert!(text.lines().any(|l| l == line), "missing `{line}` in:\n{text}");
    }
    remove_run_dir(&done);
}

/// A portal's script gone wild: past the burst, submissions get 429 with Retry-After
/// and nothing is stored for them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn too_many_submissions_get_429_with_retry_after() {
    let t = crate::helpers::store(crate::helpers::Backend::Embedded).await;
    hpcforge::examples::seed_if_empty(t.store.as_ref()).await.unwrap();
    let app = crate::helpers::spawn_configured(t.store.clone(), |c| {
        c.rate =
            hpcforge::api::limits::RateConfig { submissions_per_minute: 1, submission_burst: 2, streams_per_user: 1 };
    })
    .await;
    let me = me();
    let mut made = Vec::new();
    for _ in 0..2 {
        made.push(submit_sleep(&app, &me, 0).await);
    }
    let body = json!({ "application": "sleep", "cluster": "local", "inputs": { "sleep": 0 } });
    let resp = app.req(Method::POST, "/api/v1/tasks", &me).await.json(&body).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
    let wait: u64 = resp.headers()["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=60).contains(&wait), "{wait}");
    let v: Value = resp.json().await.unwrap();
    assert!(v["message"].as_str().unwrap().contains("more than 1 tasks a minute"), "{v}");
    let (_, list) = call(&app, Method::GET, "/api/v1/tasks", &me, None).await;
    assert_eq!(list["data"]["tasks"].as_array().unwrap().len(), 2, "the refused one was not stored");
    // Event streams: one at a time here.
    let first = app.req(Method::GET, "/api/v1/tasks/stream", &me).await.send().await.unwrap();
    assert_eq!(first.status(), StatusCode::OK);
    let second = app.req(Method::GET, "/api/v1/tasks/stream", &me).await.send().await.unwrap();
    assert_eq!(second.status(), StatusCode::TOO_MANY_REQUESTS);
    drop(first);
    for t in made {
        remove_run_dir(&wait_final(&app, &me, t["id"].as_str().unwrap()).await);
    }
}

/// The web page and its assets: served without a token, with a content policy that
/// allows only the server's own scripts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_is_served_with_a_strict_content_policy() {
    let t = crate::helpers::store(crate::helpers::Backend::Embedded).await;
    let app = spawn_app(t.store.clone()).await;
    let resp = with_auth(&app, Method::GET, "/", None).await;
    assert_eq!(resp.headers()["content-type"], "text/html; charset=utf-8");
    let csp = resp.headers()["content-security-policy"].to_str().unwrap().to_owned();
    assert!(csp.contains("script-src 'self'") && csp.contains("frame-ancestors 'none'"), "{csp}");
    let html = resp.text().await.unwrap();
    assert!(html.contains("/assets/app.js") && !html.contains("<script>"), "no inline scripts");
    let resp = with_auth(&app, Method::GET, "/assets/nothing.js", None).await;
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);
    let resp = with_auth(&app, Method::GET, "/docs/", None).await;
    assert!(resp.text().await.unwrap().contains("swagger"), "Swagger UI is served");
}

crate::for_each_store!(
    no_endpoint_but_health_docs_and_the_page_answers_without_a_token,
    bad_expired_revoked_and_disabled_tokens_are_refused_saying_why,
    roles_decide_what_a_token_may_do,
    a_portal_acts_for_a_named_user_and_both_are_recorded,
    task_lists_filter_page_and_refuse_tampered_cursors,
    bad_task_bodies_get_the_right_status_and_nothing_is_stored,
    the_event_stream_replays_and_resumes_after_last_event_id,
    one_stream_follows_all_my_tasks_for_a_status_page,
    a_phases_output_is_read_on_the_cluster_as_the_owner,
    metrics_count_tasks_submissions_latency_and_connections,
);

/// SIGTERM while a submission is under way: the server stops taking requests, lets the
/// submission finish, answers the waiting `POST ?wait=submitted` with the job IDs, and
/// exits 0. (`HPCFORGE_FAILPOINT=slow-submit` holds each submission 3 s before the
/// scheduler is called, so it is surely in flight when the signal comes.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_graceful_shutdown_finishes_submissions_under_way() {
    use crate::helpers::Server;
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &[], &[("HPCFORGE_FAILPOINT", "slow-submit")]);
    let me = me();
    let token = server.token(&me, "admin");
    let http = crate::helpers::http();
    let base = server.base.clone();
    let post = {
        let (http, base, token) = (http.clone(), base.clone(), token.clone());
        tokio::spawn(async move {
            let body = json!({ "application": "sleep", "cluster": "local", "inputs": { "sleep": 1 } });
            let resp = http
                .post(format!("{base}/api/v1/tasks?wait=submitted"))
                .bearer_auth(&token)
                .json(&body)
                .send()
                .await
                .unwrap();
            let status = resp.status();
            (status, resp.json::<Value>().await.unwrap())
        })
    };
    // Wait until the submission is under way (its phases are `submitting`).
    let start = Instant::now();
    loop {
        assert!(start.elapsed() < Duration::from_secs(20), "the task never reached `submitting`");
        let v: Value =
            http.get(format!("{base}/api/v1/tasks")).bearer_auth(&token).send().await.unwrap().json().await.unwrap();
        let under_way = v["data"]["tasks"]
            .as_array()
            .and_then(|t| t.first())
            .is_some_and(|t| t["phases"].as_array().unwrap().iter().all(|p| p["state"] == "submitting"));
        if under_way {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let stopped = tokio::task::spawn_blocking(move || server.stop()).await.unwrap();
    let (status, v) = post.await.unwrap();
    assert_eq!(status, StatusCode::CREATED, "{v:#}");
    for p in v["data"]["phases"].as_array().unwrap() {
        assert!(p["job_id"].as_str().is_some_and(|j| !j.is_empty()), "every phase has its job ID: {v:#}");
    }
    assert!(stopped.success(), "the server exits 0 after draining: {stopped:?}");
    // Nothing answers any more.
    assert!(http.get(format!("{base}/healthz")).send().await.is_err(), "the listener is closed");
    remove_run_dir(&v["data"]);
}

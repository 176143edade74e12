//! The OpenAPI document against the server. Every test's server checks each request
//! it answers (see `hpcforge::api::conformance`); here every documented operation is
//! called at least once, so none can drift unnoticed, and the source is checked for
//! routes registered without their documentation.

use std::time::{Duration, Instant};

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::helpers::{TestApp, repo, spawn_app, test_env};

async fn ok(app: &TestApp, method: Method, path: &str, user: &str, body: Option<&Value>) -> Value {
    let mut req = app.req(method.clone(), path, user).await;
    if let Some(b) = body {
        req = req.json(b);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status();
    let text = resp.text().await.unwrap();
    assert!(status.is_success(), "{method} {path}: {status} {text}");
    serde_json::from_str(&text).unwrap_or(Value::String(text))
}

async fn wait_state(app: &TestApp, user: &str, id: &str, want: impl Fn(&Value) -> bool) -> Value {
    let start = Instant::now();
    loop {
        let v = ok(app, Method::GET, &format!("/api/v1/tasks/{id}"), user, None).await;
        if want(&v["data"]) {
            return v["data"].clone();
        }
        assert!(start.elapsed() < Duration::from_secs(60), "{v:#}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn upload(kind: &str, name: &str, rename: &str) -> Value {
    let dir = repo().join(kind).join(name);
    let limits = Default::default();
    let mut v = if kind == "applications" {
        serde_json::to_value(hpcforge::definitions::folder::load_application(&dir, &limits).unwrap().upload).unwrap()
    } else {
        serde_json::to_value(hpcforge::definitions::folder::load_cluster(&dir, None, &limits).unwrap().upload).unwrap()
    };
    v["definition"]["name"] = json!(rename);
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_documented_operation_is_served_and_answers_as_documented() {
    let t = crate::helpers::store(crate::helpers::Backend::Embedded).await;
    hpcforge::examples::seed_if_empty(t.store.as_ref()).await.unwrap();
    let app = spawn_app(t.store.clone()).await;
    let me = hpcforge::mediator::current_user().unwrap().to_string();
    use Method as M;

    for path in ["/healthz", "/readyz"] {
        assert!(app.http.get(format!("{}{path}", app.base)).send().await.unwrap().status().is_success());
    }
    ok(&app, M::GET, "/api/v1/me", "admin", None).await;

    // Definitions, both kinds.
    for (kind, name, file) in [("applications", "sleep", "app_execute"), ("clusters", "local", "forge/script_common")] {
        let base = format!("/api/v1/{kind}");
        ok(&app, M::GET, &base, "alice", None).await;
        ok(&app, M::GET, &format!("{base}/{name}"), "alice", None).await;
        ok(&app, M::GET, &format!("{base}/{name}/versions"), "alice", None).await;
        ok(&app, M::GET, &format!("{base}/{name}/versions/1"), "alice", None).await;
        ok(&app, M::GET, &format!("{base}/{name}/files/{file}"), "alice", None).await;
        ok(&app, M::GET, &format!("{base}/{name}/versions/1/files/{file}"), "alice", None).await;
        let copy = format!("{name}2");
        ok(&app, M::POST, &base, "admin", Some(&upload(kind, name, &copy))).await;
        ok(&app, M::PUT, &format!("{base}/{copy}"), "admin", Some(&upload(kind, name, &copy))).await;
        ok(&app, M::DELETE, &format!("{base}/{copy}"), "admin", None).await;
    }
    ok(&app, M::GET, "/api/v1/applications/sleep/schema", "alice", None).await;
    let preview = json!({ "application": "sleep", "cluster": "local", "inputs": { "sleep": 3 } });
    ok(&app, M::POST, "/api/v1/forge/preview", &me, Some(&preview)).await;

    // Credentials, users, tokens.
    let key = std::fs::read_to_string(&test_env().keys["alice"]).unwrap();
    ok(&app, M::PUT, "/api/v1/credentials/alice/local", "admin", Some(&json!({ "private_key": key }))).await;
    ok(&app, M::GET, "/api/v1/credentials", "admin", None).await;
    ok(&app, M::DELETE, "/api/v1/credentials/alice/local", "admin", None).await;
    ok(&app, M::GET, "/api/v1/users", "admin", None).await;
    ok(&app, M::POST, "/api/v1/users", "admin", Some(&json!({ "name": "frank", "role": "user", "label": "first" })))
        .await;
    ok(&app, M::GET, "/api/v1/users/frank", "admin", None).await;
    let made = ok(&app, M::POST, "/api/v1/users/frank/tokens", "admin", Some(&json!({ "expires_in_days": 1 }))).await;
    let token_id = made["data"]["info"]["id"].as_str().unwrap();
    ok(&app, M::DELETE, &format!("/api/v1/users/frank/tokens/{token_id}"), "admin", None).await;
    ok(&app, M::DELETE, "/api/v1/users/frank", "admin", None).await;

    // Tasks: a long sleep on the local cluster, so it can be watched, cancelled and
    // restarted.
    let body = json!({ "application": "sleep", "cluster": "local", "inputs": { "sleep": 30 } });
    let task = ok(&app, M::POST, "/api/v1/tasks?wait=submitted", &me, Some(&body)).await;
    let id = task["data"]["id"].as_str().unwrap().to_owned();
    ok(&app, M::GET, "/api/v1/tasks?limit=5", &me, None).await;
    ok(&app, M::GET, &format!("/api/v1/tasks/{id}/scripts/execute"), &me, None).await;
    ok(&app, M::GET, &format!("/api/v1/tasks/{id}/events"), &me, None).await;
    ok(&app, M::GET, &format!("/api/v1/tasks/{id}/data"), &me, None).await;
    // No job of it posted `slept_seconds` yet: a documented 404.
    let resp = app.req(M::GET, &format!("/api/v1/tasks/{id}/data/slept_seconds"), &me).await.send().await.unwrap();
    assert_eq!(resp.status(), reqwest::StatusCode::NOT_FOUND);
    for path in [format!("/api/v1/tasks/{id}/events/stream"), "/api/v1/tasks/stream".to_owned()] {
        let mut resp = app.req(M::GET, &path, &me).await.send().await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK, "{path}");
        let first = tokio::time::timeout(Duration::from_secs(10), resp.chunk()).await.unwrap().unwrap().unwrap();
        assert!(String::from_utf8_lossy(&first).contains("data:"), "{path}");
    }
    wait_state(&app, &me, &id, |t| t["phases"][1]["state"] == "running").await;
    // The job has started; its output file exists (it may still be empty).
    let start = Instant::now();
    loop {
        let resp = app.req(M::GET, &format!("/api/v1/tasks/{id}/output/execute"), &me).await.send().await.unwrap();
        if resp.status() == StatusCode::OK {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(20), "{}", resp.text().await.unwrap());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    ok(&app, M::DELETE, &format!("/api/v1/tasks/{id}"), &me, None).await;
    wait_state(&app, &me, &id, |t| t["state"] == "cancelled").await;
    ok(&app, M::POST, &format!("/api/v1/tasks/{id}/restart"), &me, Some(&json!({ "from": "execute" }))).await;
    let restarted = wait_state(&app, &me, &id, |t| t["phases"][1]["state"] == "running").await;
    ok(&app, M::DELETE, &format!("/api/v1/tasks/{id}"), &me, None).await;
    wait_state(&app, &me, &id, |t| t["state"] == "cancelled" && t["phases"][2]["state"] != "pending").await;
    // A frame phase's frames, paged: the seeded render example, tiny.
    let inputs = json!({ "frames": "1-3", "width": 8, "height": 8, "iterations": 10 });
    let body = json!({ "application": "render", "cluster": "local", "inputs": inputs });
    let render = ok(&app, M::POST, "/api/v1/tasks?wait=submitted", &me, Some(&body)).await;
    let rid = render["data"]["id"].as_str().unwrap().to_owned();
    let ended = wait_state(&app, &me, &rid, |t| t["state"] == "completed").await;
    let page = ok(&app, M::GET, &format!("/api/v1/tasks/{rid}/frames/render?limit=2"), &me, None).await;
    assert_eq!(page["data"]["frames"][1]["state"], "completed", "{page:#}");
    // Its files: listed, and one downloaded (on `local`, streamed from a local process).
    let files = ok(&app, M::GET, &format!("/api/v1/tasks/{rid}/files"), &me, None).await;
    let listed = files["data"]["files"].as_array().unwrap();
    let file = listed.iter().find(|f| f["kind"] == "file" && f["size"].as_u64() > Some(0)).expect("a file");
    let path = file["path"].as_str().unwrap();
    let resp = app.req(M::GET, &format!("/api/v1/tasks/{rid}/files/{path}"), &me).await.send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK, "{path}");
    assert_eq!(Some(resp.bytes().await.unwrap().len() as u64), file["size"].as_u64(), "{path}");
    let resp = app.req(M::GET, &format!("/api/v1/tasks/{rid}/outputs.tar.gz"), &me).await.send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert!(resp.bytes().await.unwrap().starts_with(&[0x1f, 0x8b]), "gzip");
    if let Some(dir) = ended["run_dir"].as_str() {
        let _ = std::fs::remove_dir_all(dir);
    }
    ok(&app, M::GET, "/metrics", "admin", None).await;
    ok(&app, M::GET, "/api/v1/replicas", "admin", None).await;
    ok(&app, M::PUT, "/api/v1/resources/licences/maya", "admin", Some(&json!({ "count": 2 }))).await;
    let pools = ok(&app, M::GET, "/api/v1/resources", &me, None).await;
    assert_eq!(pools["data"]["pools"][0]["key"], "licence/maya", "{pools:#}");
    // Nothing is held: a documented 404.
    let body = json!({ "pool": "licence/maya", "task": id });
    let resp = app.req(M::POST, "/api/v1/resources/release", "admin").await.json(&body).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);
    if let Some(dir) = restarted["run_dir"].as_str() {
        let _ = std::fs::remove_dir_all(dir);
    }

    let missing: Vec<_> = app.conformance.operations().difference(&app.conformance.seen()).cloned().collect();
    assert!(missing.is_empty(), "documented operations this test did not reach: {missing:?}");
    // Dropping `app` fails the test if any answer disagreed with the document.
}

/// Routes are registered through `utoipa_axum::routes!`, which documents them in the
/// same call; a plain axum `.route(...)` would serve something the document does not
/// show. Only the page and its assets (not part of the API) may be added that way.
#[test]
fn no_api_route_is_registered_without_its_documentation() {
    let mut offenders = Vec::new();
    // Every file under src/api, at any depth.
    let mut files = Vec::new();
    let mut dirs = vec![repo().join("src/api")];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(dir).unwrap() {
            let p = entry.unwrap().path();
            if p.is_dir() {
                dirs.push(p);
            } else if p.extension().is_some_and(|e| e == "rs") {
                files.push(p);
            }
        }
    }
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap();
        let name = file.file_name().unwrap().to_string_lossy().into_owned();
        for (n, line) in text.lines().enumerate() {
            let code = line.split("//").next().unwrap_or("");
            for needle in [".route(", ".route_service(", ".nest(", ".nest_service("] {
                if code.contains(needle) && name != "web.rs" {
                    offenders.push(format!("src/api/{name}:{}: {}", n + 1, line.trim()));
                }
            }
        }
    }
    assert!(offenders.is_empty(), "routes added without documentation:\n{}", offenders.join("\n"));
    // And the document is OpenAPI 3.1 with every operation secured or explicitly public.
    let doc = serde_json::to_value(hpcforge::api::openapi()).unwrap();
    assert_eq!(doc["openapi"], "3.1.0");
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            assert!(op.get("security").is_some(), "{method} {path} says nothing about tokens");
        }
    }
}

//! The admin HTTP API over a real server on port 0, against every store.

use hpcforge::definitions::{UploadLimits, folder};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::helpers::{TestStore, repo, spawn_app, spawn_app_with};

/// The `applications/sleep` example as an upload body.
fn sleep_body() -> Value {
    let loaded = folder::load_application(&repo().join("applications/sleep"), &UploadLimits::default()).unwrap();
    serde_json::to_value(&loaded.upload).unwrap()
}

/// Sends `body` (raw bytes) with `content_type`; returns status and the parsed envelope.
async fn send(
    app: &crate::helpers::TestApp,
    method: Method,
    path: &str,
    content_type: &str,
    body: Vec<u8>,
) -> (StatusCode, Value) {
    let resp =
        app.req(method, path, "admin").await.header("content-type", content_type).body(body).send().await.unwrap();
    let status = resp.status();
    let text = resp.text().await.unwrap();
    let v: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"));
    (status, v)
}

async fn put_json(app: &crate::helpers::TestApp, path: &str, body: &Value) -> (StatusCode, Value) {
    send(app, Method::PUT, path, "application/json", serde_json::to_vec(body).unwrap()).await
}

async fn get(app: &crate::helpers::TestApp, path: &str) -> (StatusCode, Value) {
    let resp = app.req(Method::GET, path, "admin").await.send().await.unwrap();
    let status = resp.status();
    (status, resp.json().await.unwrap())
}

fn pointers(envelope: &Value) -> Vec<String> {
    envelope["errors"]
        .as_array()
        .map(|a| a.iter().map(|e| e["pointer"].as_str().unwrap().to_owned()).collect())
        .unwrap_or_default()
}

async fn pushing_the_sleep_example_answers_201_then_200_with_version_2(t: TestStore) {
    let app = spawn_app(t.store.clone()).await;
    let (s1, v1) = put_json(&app, "/api/v1/applications/sleep", &sleep_body()).await;
    assert_eq!(s1, StatusCode::CREATED, "{v1}");
    assert_eq!(v1["data"]["version"], 1);
    assert_eq!(v1["message"], "application `sleep` stored as version 1");
    let (s2, v2) = put_json(&app, "/api/v1/applications/sleep", &sleep_body()).await;
    assert_eq!(s2, StatusCode::OK, "{v2}");
    assert_eq!(v2["data"]["version"], 2);
    let files = v2["data"]["files"].as_array().unwrap();
    assert!(files.iter().all(|f| f["version"] == 2 && f["sha256"].as_str().unwrap().len() == 64), "{files:?}");
}

async fn what_was_pushed_can_be_listed_shown_and_read_back(t: TestStore) {
    let app = spawn_app(t.store.clone()).await;
    put_json(&app, "/api/v1/applications/sleep", &sleep_body()).await;
    let (s, list) = get(&app, "/api/v1/applications").await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(list["data"][0]["name"], "sleep");
    assert_eq!(list["data"][0]["definition"]["inputs"][0]["value"], 20);
    let (_, one) = get(&app, "/api/v1/applications/sleep").await;
    assert_eq!(one["data"]["definition"]["inputs"][1]["files"][0]["action"], "COPY");
    let (_, hist) = get(&app, "/api/v1/applications/sleep/versions").await;
    assert_eq!(hist["data"].as_array().unwrap().len(), 1);
    let resp =
        app.req(Method::GET, "/api/v1/applications/sleep/files/app_execute", "admin").await.send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()["content-type"], "text/plain; charset=utf-8");
    let etag = resp.headers()["etag"].to_str().unwrap().to_owned();
    assert_eq!(resp.headers()["x-hpcforge-filename"], "applications/sleep/app_execute");
    let text = resp.text().await.unwrap();
    assert_eq!(text, std::fs::read_to_string(repo().join("applications/sleep/app_execute")).unwrap());
    assert_eq!(etag, format!("\"{}\"", hpcforge::definitions::script::sha256_hex(text.as_bytes())));
    // Nested paths (cluster environments) work too.
    let resp = app
        .req(Method::GET, "/api/v1/applications/sleep/versions/1/files/cluster/local-slurm", "admin")
        .await
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
}

async fn malformed_json_is_400_and_stores_nothing(t: TestStore) {
    let app = spawn_app(t.store.clone()).await;
    let (s, v) =
        send(&app, Method::PUT, "/api/v1/applications/sleep", "application/json", b"{\"definition\": {".to_vec()).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    assert_eq!(v["message"], "the request body is not valid JSON");
    assert!(v["errors"][0]["message"].as_str().unwrap().starts_with("invalid JSON"), "{v}");
    assert_eq!(t.raw_blobs().await, []);
}

async fn invalid_utf8_in_the_body_is_400(t: TestStore) {
    let app = spawn_app(t.store.clone()).await;
    let mut body = serde_json::to_vec(&sleep_body()).unwrap();
    let at = body.windows(5).position(|w| w == b"sleep").unwrap();
    body[at] = 0xff;
    let (s, v) = send(&app, Method::PUT, "/api/v1/applications/sleep", "application/json", body).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    assert_eq!(t.raw_blobs().await, []);
}

async fn a_body_that_is_not_declared_json_is_415(t: TestStore) {
    let app = spawn_app(t.store.clone()).await;
    let body = serde_json::to_vec(&sleep_body()).unwrap();
    let (s, v) = send(&app, Method::PUT, "/api/v1/applications/sleep", "text/plain", body).await;
    assert_eq!(s, StatusCode::UNSUPPORTED_MEDIA_TYPE, "{v}");
    assert!(v["message"].as_str().unwrap().contains("application/json"), "{v}");
}

async fn an_oversized_body_is_413(t: TestStore) {
    let app = spawn_app_with(t.store.clone(), UploadLimits::default(), 4096).await;
    let mut body = sleep_body();
    body["files"]["app_execute"] = json!(format!("#!/bin/bash\n{}\n", "#".repeat(8000)));
    let (s, v) = put_json(&app, "/api/v1/applications/sleep", &body).await;
    assert_eq!(s, StatusCode::PAYLOAD_TOO_LARGE, "{v}");
    assert_eq!(t.raw_blobs().await, []);
}

async fn unknown_fields_and_wrong_types_are_422_with_pointers(t: TestStore) {
    let app = spawn_app(t.store.clone()).await;
    let mut body = sleep_body();
    body["definition"]["inputs"][0]["requird"] = json!(true);
    let (s, v) = put_json(&app, "/api/v1/applications/sleep", &body).await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{v}");
    assert_eq!(pointers(&v), ["/definition/inputs/0/requird"]);
    assert!(v["errors"][0]["message"].as_str().unwrap().contains("unknown field `requird`"), "{v}");

    let mut body = sleep_body();
    body["definition"]["inputs"][0]["type"] = json!("integer");
    let (_, v) = put_json(&app, "/api/v1/applications/sleep", &body).await;
    assert_eq!(pointers(&v), ["/definition/inputs/0/type"]);

    let mut body = sleep_body();
    body["definition"]["resources"]["execute"]["walltime"] = json!("30");
    let (_, v) = put_json(&app, "/api/v1/applications/sleep", &body).await;
    assert_eq!(pointers(&v), ["/definition/resources/execute/walltime"]);
    assert!(v["errors"][0]["message"].as_str().unwrap().contains("HH:MM:SS"), "{v}");
    assert_eq!(t.raw_blobs().await, []);
}

async fn every_problem_of_an_upload_is_reported_at_once_and_nothing_is_stored(t: TestStore) {
    let app = spawn_app(t.store.clone()).await;
    let mut body = sleep_body();
    body["files"].as_object_mut().unwrap().remove("app_prolog");
    body["files"]["app_execute"] = json!("echo no interpreter line\n");
    body["files"]["app_epilog"] = json!("#!/bin/bash\necho a\recho b\n");
    body["files"]["cluster/../../etc/passwd"] = json!("x");
    body["definition"]["inputs"][0]["value"] = json!(100000);
    let (s, v) = put_json(&app, "/api/v1/applications/sleep", &body).await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{v}");
    let mut got = pointers(&v);
    got.sort();
    assert_eq!(
        got,
        [
            "/definition/inputs/0/value",
            "/files/app_epilog",
            "/files/app_execute",
            "/files/app_prolog",
            "/files/cluster~1..~1..~1etc~1passwd"
        ],
        "{v:#}"
    );
    assert!(v["message"].as_str().unwrap().contains("5 problems"), "{v}");
    assert_eq!(t.raw_blobs().await, [], "a refused upload stores nothing");
    let (s, _) = get(&app, "/api/v1/applications/sleep").await;
    assert_eq!(s, StatusCode::NOT_FOUND);
}

async fn a_script_over_the_size_cap_is_422_naming_the_file(t: TestStore) {
    let limits = UploadLimits { max_script_bytes: 1000, ..UploadLimits::default() };
    let app = spawn_app_with(t.store.clone(), limits, 1 << 20).await;
    let mut body = sleep_body();
    body["files"]["app_execute"] = json!(format!("#!/bin/bash\n{}\n", "#".repeat(2000)));
    let (s, v) = put_json(&app, "/api/v1/applications/sleep", &body).await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{v}");
    assert_eq!(pointers(&v), ["/files/app_execute"]);
    assert!(v["errors"][0]["message"].as_str().unwrap().contains("the limit is 1000 bytes"), "{v}");
}

async fn the_url_and_the_definition_must_name_the_same_thing(t: TestStore) {
    let app = spawn_app(t.store.clone()).await;
    let (s, v) = put_json(&app, "/api/v1/applications/other", &sleep_body()).await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{v}");
    assert_eq!(pointers(&v), ["/definition/name"]);
}

async fn an_invalid_name_in_the_url_is_400(t: TestStore) {
    let app = spawn_app(t.store.clone()).await;
    let (s, v) = get(&app, "/api/v1/applications/..%2Fetc").await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    let (s, v) = get(&app, "/api/v1/clusters/a%20b/versions/1").await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    let (s, v) = get(&app, "/api/v1/clusters/ok/versions/x").await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
}

async fn creating_what_exists_is_409(t: TestStore) {
    let app = spawn_app(t.store.clone()).await;
    let body = serde_json::to_vec(&sleep_body()).unwrap();
    let (s, _) = send(&app, Method::POST, "/api/v1/applications", "application/json", body.clone()).await;
    assert_eq!(s, StatusCode::CREATED);
    let (s, v) = send(&app, Method::POST, "/api/v1/applications", "application/json", body).await;
    assert_eq!(s, StatusCode::CONFLICT, "{v}");
    assert!(v["message"].as_str().unwrap().contains("already exists (version 1); replace it with PUT"), "{v}");
}

async fn after_a_delete_get_says_when_and_old_versions_stay_readable(t: TestStore) {
    let app = spawn_app(t.store.clone()).await;
    put_json(&app, "/api/v1/applications/sleep", &sleep_body()).await;
    // Another admin deletes it; the 404 names her.
    let carol = crate::helpers::make_token(app.state.store.as_ref(), "carol", hpcforge::auth::Role::Admin).await;
    let resp =
        app.http.delete(format!("{}/api/v1/applications/sleep", app.base)).bearer_auth(carol).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let v: Value = resp.json().await.unwrap();
    assert_eq!((v["data"]["version"].as_u64(), v["data"]["deleted"].as_bool()), (Some(2), Some(true)));
    let (s, v) = get(&app, "/api/v1/applications/sleep").await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    assert!(v["message"].as_str().unwrap().contains("was deleted by carol"), "{v}");
    let (s, _) = get(&app, "/api/v1/applications/sleep/versions/1").await;
    assert_eq!(s, StatusCode::OK);
    let resp = app
        .req(Method::GET, "/api/v1/applications/sleep/versions/1/files/app_execute", "admin")
        .await
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let (s, list) = get(&app, "/api/v1/applications").await;
    assert_eq!((s, list["data"].as_array().unwrap().len()), (StatusCode::OK, 0));
    let resp = app.req(Method::DELETE, "/api/v1/applications/sleep", "admin").await.send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);
}

async fn crlf_scripts_are_stored_with_lf_and_the_answer_says_so(t: TestStore) {
    let app = spawn_app(t.store.clone()).await;
    let mut body = sleep_body();
    body["files"]["app_epilog"] = json!("#!/bin/bash\r\necho done\r\n");
    let (s, v) = put_json(&app, "/api/v1/applications/sleep", &body).await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    assert_eq!(v["data"]["notes"], json!(["app_epilog: converted 2 CRLF line endings to LF"]));
    let text = app.client.text("/api/v1/applications/sleep/files/app_epilog").await.unwrap().0;
    assert_eq!(text, "#!/bin/bash\necho done\n");
}

async fn health_and_readiness_answer_in_the_envelope(t: TestStore) {
    let app = spawn_app(t.store.clone()).await;
    let (s, v) = get(&app, "/healthz").await;
    assert_eq!((s, v["data"]["status"].as_str()), (StatusCode::OK, Some("ok")));
    let (s, v) = get(&app, "/readyz").await;
    assert_eq!((s, v["data"]["status"].as_str()), (StatusCode::OK, Some("ready")));
    assert_eq!(v["data"]["store"], t.store.backend());
}

async fn unknown_routes_and_methods_answer_in_the_envelope(t: TestStore) {
    let app = spawn_app(t.store.clone()).await;
    let (s, v) = get(&app, "/api/v1/nothing").await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    assert_eq!(v["message"], "no such endpoint: /api/v1/nothing");
    let resp = app.req(Method::PATCH, "/api/v1/applications/sleep", "admin").await.send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::METHOD_NOT_ALLOWED);
    let v: Value = resp.json().await.unwrap();
    assert!(v["message"].as_str().unwrap().contains("PATCH is not allowed"), "{v}");
}

async fn every_answer_carries_a_request_id(t: TestStore) {
    let app = spawn_app(t.store.clone()).await;
    let resp = app.http.get(format!("{}/healthz", app.base)).send().await.unwrap();
    assert_eq!(resp.headers()["x-request-id"].to_str().unwrap().len(), 36);
    let resp = app.http.get(format!("{}/healthz", app.base)).header("x-request-id", "portal-42").send().await.unwrap();
    assert_eq!(resp.headers()["x-request-id"], "portal-42");
}

async fn clusters_are_pushed_with_their_templates(t: TestStore) {
    let app = spawn_app(t.store.clone()).await;
    let loaded = folder::load_cluster(&repo().join("clusters/local-slurm"), None, &UploadLimits::default()).unwrap();
    let body = serde_json::to_value(&loaded.upload).unwrap();
    let (s, v) = put_json(&app, "/api/v1/clusters/local-slurm", &body).await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    assert_eq!(v["data"]["definition"]["host_key"], json!(crate::helpers::test_env().ssh_host_key));
    let names: Vec<&str> =
        v["data"]["files"].as_array().unwrap().iter().map(|f| f["filename"].as_str().unwrap()).collect();
    assert_eq!(
        names,
        [
            "clusters/local-slurm/forge/script_common",
            "clusters/local-slurm/forge/script_epilog",
            "clusters/local-slurm/forge/script_execute",
            "clusters/local-slurm/forge/script_prolog"
        ]
    );
    // A cluster without a host key is refused: hosts are never trusted on first use.
    let mut body = body;
    body["definition"].as_object_mut().unwrap().remove("host_key");
    let (s, v) = put_json(&app, "/api/v1/clusters/local-slurm", &body).await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{v}");
    assert_eq!(pointers(&v), ["/definition/host_key"]);
}

crate::for_each_store!(
    pushing_the_sleep_example_answers_201_then_200_with_version_2,
    what_was_pushed_can_be_listed_shown_and_read_back,
    malformed_json_is_400_and_stores_nothing,
    invalid_utf8_in_the_body_is_400,
    a_body_that_is_not_declared_json_is_415,
    an_oversized_body_is_413,
    unknown_fields_and_wrong_types_are_422_with_pointers,
    every_problem_of_an_upload_is_reported_at_once_and_nothing_is_stored,
    a_script_over_the_size_cap_is_422_naming_the_file,
    the_url_and_the_definition_must_name_the_same_thing,
    an_invalid_name_in_the_url_is_400,
    creating_what_exists_is_409,
    after_a_delete_get_says_when_and_old_versions_stay_readable,
    crlf_scripts_are_stored_with_lf_and_the_answer_says_so,
    health_and_readiness_answer_in_the_envelope,
    unknown_routes_and_methods_answer_in_the_envelope,
    every_answer_carries_a_request_id,
    clusters_are_pushed_with_their_templates,
);

/// A MongoDB that cannot be reached: requests get 503 with a plain message, not a
/// panic or a hang, and the server stays up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_that_is_down_gives_503_with_a_clear_message() {
    // Port 1 on loopback: nothing listens there. A short selection timeout keeps the test quick.
    let store = hpcforge::store::mongo::MongoStore::connect(
        "mongodb://127.0.0.1:1/?directConnection=true&serverSelectionTimeoutMS=300",
        "down",
        hpcforge::store::mongo::TransactionMode::Auto,
    )
    .await
    .unwrap();
    let app = spawn_app(std::sync::Arc::new(store)).await;
    let (s, v) = get(&app, "/readyz").await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE, "{v}");
    assert_eq!(v["message"], "not ready: the mongodb store is unavailable");
    // Even the token cannot be checked: 503 (not 401: the token may well be good).
    let resp = app
        .http
        .put(format!("{}/api/v1/applications/sleep", app.base))
        .bearer_auth(format!("hpcf_{}", "A".repeat(43)))
        .json(&sleep_body())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(resp.headers()["retry-after"], "5");
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["message"], "tokens cannot be checked right now: the store is unavailable; try again shortly");
    let (s, _) = get(&app, "/healthz").await;
    assert_eq!(s, StatusCode::OK, "the server itself is still alive");
}

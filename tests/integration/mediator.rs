//! The mediator's plumbing shared by the end-to-end suites (a server with the
//! examples, keys, submitting and waiting), and what it checks before any scheduler
//! is involved: pinned host keys, registered SSH keys, who `local` takes tasks of.
//! The scenarios every scheduler must pass are in `scheduler_contract`.

use std::time::{Duration, Instant};

use hpcforge::definitions::{UploadLimits, folder};
use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::helpers::{TestApp, TestStore, repo, run_remote, spawn_app, ssh_as, test_env};

pub(crate) fn app_body(name: &str) -> Value {
    serde_json::to_value(
        folder::load_application(&repo().join("applications").join(name), &UploadLimits::default()).unwrap().upload,
    )
    .unwrap()
}

pub(crate) fn cluster_body(name: &str) -> Value {
    serde_json::to_value(
        folder::load_cluster(&repo().join("clusters").join(name), None, &UploadLimits::default()).unwrap().upload,
    )
    .unwrap()
}

pub(crate) async fn put(app: &TestApp, path: &str, body: &Value) {
    let resp = app.req(reqwest::Method::PUT, path, "admin").await.json(body).send().await.unwrap();
    let status = resp.status();
    assert!(status.is_success(), "PUT {path}: {status} {}", resp.text().await.unwrap());
}

pub(crate) async fn register_key(app: &TestApp, user: &str, cluster: &str) {
    let key = std::fs::read_to_string(&test_env().keys[user]).unwrap();
    put(app, &format!("/api/v1/credentials/{user}/{cluster}"), &json!({ "private_key": key })).await;
}

/// A server with `sleep` and `local-slurm`, and keys for alice and bob.
pub(crate) async fn setup(t: &TestStore) -> TestApp {
    setup_with(t, |_| {}).await
}

/// [`setup`], with the server's configuration changed by `tweak`.
pub(crate) async fn setup_with(t: &TestStore, tweak: impl FnOnce(&mut hpcforge::config::ServeConfig)) -> TestApp {
    let app = crate::helpers::spawn_configured(t.store.clone(), tweak).await;
    put(&app, "/api/v1/applications/sleep", &app_body("sleep")).await;
    put(&app, "/api/v1/clusters/local-slurm", &cluster_body("local-slurm")).await;
    for user in ["alice", "bob"] {
        register_key(&app, user, "local-slurm").await;
    }
    app
}

/// `sleep` under another name, with some scripts replaced.
pub(crate) fn variant(name: &str, files: &[(&str, &str)]) -> Value {
    let mut body = app_body("sleep");
    body["definition"]["name"] = json!(name);
    for (path, text) in files {
        body["files"][*path] = json!(text);
    }
    body
}

pub(crate) async fn call(
    app: &TestApp,
    method: reqwest::Method,
    path: &str,
    user: &str,
    body: Option<&Value>,
) -> (StatusCode, Value) {
    let mut req = app.req(method, path, user).await;
    if let Some(b) = body {
        req = req.json(b);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status();
    (status, resp.json().await.unwrap())
}

pub(crate) async fn submit(app: &TestApp, user: &str, application: &str, cluster: &str, inputs: Value) -> Value {
    let body = json!({ "application": application, "cluster": cluster, "inputs": inputs });
    let (s, v) = call(app, reqwest::Method::POST, "/api/v1/tasks?wait=submitted", user, Some(&body)).await;
    assert_eq!(s, StatusCode::CREATED, "{v:#}");
    v["data"].clone()
}

pub(crate) async fn get_task(app: &TestApp, user: &str, id: &str) -> Value {
    let (s, v) = call(app, reqwest::Method::GET, &format!("/api/v1/tasks/{id}"), user, None).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    v["data"].clone()
}

/// Polls the task until `done` says so (or fails the test after `secs`).
pub(crate) async fn wait_for(
    app: &TestApp,
    user: &str,
    id: &str,
    secs: u64,
    what: &str,
    done: impl Fn(&Value) -> bool,
) -> Value {
    let start = Instant::now();
    loop {
        let t = get_task(app, user, id).await;
        if done(&t) {
            return t;
        }
        assert!(start.elapsed() < Duration::from_secs(secs), "waited {secs} s for {what}; the task is: {t:#}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// `again` is `first` restarted from execute, once, and completed: the prolog kept its
/// job, execute and epilog ran again, each with its first run as its only history.
pub(crate) fn assert_restarted_from_execute(first: &Value, again: &Value) {
    assert_eq!(again["state"], "completed", "{again:#}");
    assert_eq!(job(again, "prolog"), job(first, "prolog"), "the prolog is not run again");
    for p in ["execute", "epilog"] {
        assert_ne!(job(again, p), job(first, p), "{p} runs again");
        let previous = phase(again, p)["previous"].as_array().cloned().unwrap_or_default();
        assert_eq!(previous.len(), 1, "{p} ran twice, not more: {again:#}");
        assert_eq!(previous[0]["job_id"], json!(job(first, p)), "{p} keeps its history");
    }
}

pub(crate) fn is_final(t: &Value) -> bool {
    matches!(t["state"].as_str(), Some("completed" | "failed" | "cancelled" | "unknown"))
}

pub(crate) fn phase<'a>(t: &'a Value, name: &str) -> &'a Value {
    t["phases"].as_array().unwrap().iter().find(|p| p["phase"] == name).unwrap()
}

pub(crate) fn job(t: &Value, name: &str) -> String {
    phase(t, name)["job_id"].as_str().unwrap_or_else(|| panic!("{name} has no job: {t:#}")).to_owned()
}

pub(crate) fn time_of(p: &Value, field: &str) -> time::OffsetDateTime {
    time::OffsetDateTime::parse(
        p[field].as_str().unwrap_or_else(|| panic!("no {field}: {p}")),
        &time::format_description::well_known::Rfc3339,
    )
    .unwrap()
}

/// Runs `command` as `user` over SSH, off the async runtime.
pub(crate) async fn remote(user: &'static str, command: String) -> (i32, String) {
    tokio::task::spawn_blocking(move || {
        let (code, out, err) = run_remote(&ssh_as(user), &command, "");
        (code, out + &err)
    })
    .await
    .unwrap()
}

async fn a_host_whose_key_does_not_match_is_never_trusted(t: TestStore) {
    let app = setup(&t).await;
    let mut impostor = cluster_body("local-slurm");
    impostor["definition"]["name"] = json!("impostor");
    let wrong = std::fs::read_to_string(format!("{}.pub", test_env().keys["alice"].display())).unwrap();
    impostor["definition"]["host_key"] = json!(wrong.trim());
    put(&app, "/api/v1/clusters/impostor", &impostor).await;
    register_key(&app, "alice", "impostor").await;
    put(&app, "/api/v1/applications/sleepy", &variant("sleepy", &[("cluster/impostor", "true\n")])).await;
    let body = json!({ "application": "sleepy", "cluster": "impostor", "inputs": {} });
    let (s, v) = call(&app, reqwest::Method::POST, "/api/v1/tasks", "alice", Some(&body)).await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{v}");
    let msg = v["errors"][0]["message"].as_str().unwrap();
    assert!(
        msg.contains("is not the one pinned in cluster `impostor`") && msg.contains("refusing to connect"),
        "{msg}"
    );
}

async fn a_user_without_a_registered_key_is_told_so(t: TestStore) {
    let app = setup(&t).await;
    let (s, _) = call(&app, reqwest::Method::DELETE, "/api/v1/credentials/bob/local-slurm", "admin", None).await;
    assert_eq!(s, StatusCode::OK);
    let body = json!({ "application": "sleep", "cluster": "local-slurm", "inputs": {} });
    let (s, v) = call(&app, reqwest::Method::POST, "/api/v1/tasks", "bob", Some(&body)).await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{v}");
    assert!(
        v["errors"][0]["message"]
            .as_str()
            .unwrap()
            .contains("no SSH key is registered for `bob` on cluster `local-slurm`"),
        "{v}"
    );
    // Keys are listed by fingerprint; no answer carries one.
    let (_, v) = call(&app, reqwest::Method::GET, "/api/v1/credentials", "admin", None).await;
    let text = v.to_string();
    assert!(text.contains("SHA256:") && !text.contains("PRIVATE KEY"), "{text}");
}

/// `local` runs phases as the server's own user: it takes nobody else's tasks, and
/// needs no SSH. (Its tasks running is the scheduler contract's business.)
async fn the_local_cluster_takes_tasks_of_the_servers_user_only(t: TestStore) {
    let app = spawn_app(t.store.clone()).await;
    hpcforge::examples::seed_if_empty(t.store.as_ref()).await.unwrap();
    let body = json!({ "application": "sleep", "cluster": "local", "inputs": {} });
    let (s, v) = call(&app, reqwest::Method::POST, "/api/v1/tasks", "someone-else", Some(&body)).await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{v}");
    assert!(v["errors"][0]["message"].as_str().unwrap().contains("takes tasks of"), "{v}");
    let me = hpcforge::mediator::current_user().expect("the test knows who it runs as").to_string();
    let task = submit(&app, &me, "sleep", "local", json!({ "sleep": 0 })).await;
    let done = wait_for(&app, &me, task["id"].as_str().unwrap(), 60, "the local task to end", is_final).await;
    assert_eq!(done["state"], "completed", "{done:#}");
    std::fs::remove_dir_all(done["run_dir"].as_str().unwrap()).unwrap();
    assert_eq!(app.state.mediator.open_connections(), 0, "the local cluster needs no SSH");
}

/// A Slurm cluster defined without accounting (no slurmdbd) is followed through
/// `squeue` and `scontrol show job`, never `sacct`: the same task ends the same way.
/// (`local-slurm` has accounting on; the scheduler contract runs that path.)
async fn a_slurm_cluster_without_accounting_is_followed_through_the_controller(t: TestStore) {
    let app = setup(&t).await;
    let mut plain = cluster_body("local-slurm");
    plain["definition"]["accounting"] = json!(false);
    put(&app, "/api/v1/clusters/local-slurm", &plain).await;
    let failing = variant("failing", &[("app_execute", "#!/bin/sh\necho working\nexit 3\n")]);
    put(&app, "/api/v1/applications/failing", &failing).await;
    let task = submit(&app, "alice", "failing", "local-slurm", json!({})).await;
    let id = task["id"].as_str().unwrap();
    let done = wait_for(&app, "alice", id, 120, "the task to end", is_final).await;
    assert_eq!(done["state"], "failed", "{done:#}");
    assert_eq!(phase(&done, "prolog")["state"], "completed", "{done:#}");
    assert_eq!(
        (&phase(&done, "execute")["state"], &phase(&done, "execute")["exit_code"]),
        (&json!("failed"), &json!(3))
    );
    assert_eq!(phase(&done, "epilog")["state"], "completed", "{done:#}");
    assert_eq!(done["cluster"]["version"], 2, "the cluster without accounting ran it: {done:#}");
}

/// A job on real Slurm posts events and data with the helpers from bash, through the
/// file protocol from Python (no library), and with the helpers from Python: the lines
/// land in `HPCG_EVENTS` in the order they were posted, and the engine's reader takes
/// every one. (Collecting them into the task is the monitor's part: issue 13.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_posts_events_and_data_from_shell_and_python() {
    use hpcforge::model::posts::{Post, read_posts};
    let t = crate::helpers::store(crate::helpers::Backend::Embedded).await;
    let app = setup(&t).await;
    let execute = r#"#!/bin/bash
set -euo pipefail
hpcg_event started '' "execute began"
hpcg_data residual 0.5
python3 - <<'PY'
import datetime, json, os, subprocess
def post(**line):
    line.setdefault("time", datetime.datetime.now(datetime.timezone.utc).isoformat())
    with open(os.environ["HPCG_EVENTS"], "a") as f:
        f.write(json.dumps(line, separators=(",", ":")) + "\n")
post(event="converged", data={"step": 12, "residual": 1.5e-6}, message="ünïcode ok")
post(key="residual", value=1.5e-6)
subprocess.run(["hpcg_event", "from-python-helper", json.dumps({"pid": os.getpid()})], check=True)
PY
hpcg_event done
"#;
    put(&app, "/api/v1/applications/talker", &variant("talker", &[("app_execute", execute)])).await;
    let task = submit(&app, "alice", "talker", "local-slurm", json!({})).await;
    let done = wait_for(&app, "alice", task["id"].as_str().unwrap(), 120, "the task to end", is_final).await;
    assert_eq!(done["state"], "completed", "{done:#}");
    let run_dir = done["run_dir"].as_str().unwrap();
    let (code, text) = remote("alice", format!("cat {run_dir}/.hpcforge/posts/execute.jsonl")).await;
    assert_eq!(code, 0, "{text}");
    let r = read_posts(text.as_bytes(), false, true);
    assert!(r.dropped.is_empty(), "{:?}\n{text}", r.dropped);
    let seen: Vec<String> = r
        .posts
        .iter()
        .map(|p| match p {
            Post::Event { kind, .. } => format!("event {kind}"),
            Post::Datum { key, value, .. } => format!("data {key}={value}"),
        })
        .collect();
    assert_eq!(
        seen,
        [
            "event started",
            "data residual=0.5",
            "event converged",
            "data residual=1.5e-6",
            "event from-python-helper",
            "event done"
        ],
        "{text}"
    );
    let Post::Event { data, message, time, .. } = &r.posts[2] else { unreachable!() };
    assert_eq!((data["step"].as_i64(), message.as_deref()), (Some(12), Some("ünïcode ok")));
    assert!(time.is_some(), "the job's own time: {text}");
    // The helpers' lines say which phase posted them; the Python lines here do not.
    let lines: Vec<&str> = text.lines().collect();
    for i in [0, 1, 4, 5] {
        assert!(lines[i].contains("\"phase\":\"execute\""), "{}", lines[i]);
    }
}

crate::for_embedded_and_mongodb!(
    a_slurm_cluster_without_accounting_is_followed_through_the_controller,
    a_host_whose_key_does_not_match_is_never_trusted,
    a_user_without_a_registered_key_is_told_so,
    the_local_cluster_takes_tasks_of_the_servers_user_only,
);

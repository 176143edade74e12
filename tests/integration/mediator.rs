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
/// file protocol from Python (no library), and with the helpers from Python: they show
/// in the task while the job runs, then all of them, in the order posted, marked as
/// the job's, in the history, the live stream and the data map; a bad line is said.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_posts_events_and_data_from_shell_and_python() {
    let t = crate::helpers::store(crate::helpers::Backend::Embedded).await;
    let app = setup(&t).await;
    // Posts, waits until the test has seen them while the job still runs, posts more
    // from Python (by hand, and through the helper), one bad line, and a last event.
    let execute = r#"#!/bin/bash
set -euo pipefail
hpcg_event started '' "execute began"
hpcg_data residual 0.5
for i in $(seq 1 240); do [ -e go ] && break; sleep 0.5; done
[ -e go ] || { echo "the test never said go" >&2; exit 3; }
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
echo 'this is not JSON' >> "$HPCG_EVENTS"
printf '{"event":"done"}' >> "$HPCG_EVENTS"
"#;
    put(&app, "/api/v1/applications/talker", &variant("talker", &[("app_execute", execute)])).await;
    let task = submit(&app, "alice", "talker", "local-slurm", json!({})).await;
    let id = task["id"].as_str().unwrap().to_owned();
    let mut stream = app
        .req(reqwest::Method::GET, &format!("/api/v1/tasks/{id}/events/stream"), "alice")
        .await
        .send()
        .await
        .unwrap();
    assert_eq!(stream.status(), StatusCode::OK);
    // What the job posted shows while it runs.
    let posts_of = |events: &Value| -> Vec<String> {
        events["data"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|e| {
                let p = e.get("post")?;
                Some(match (p["event"].as_str(), p["key"].as_str()) {
                    (Some(kind), _) => format!("event {kind}"),
                    (_, Some(key)) => format!("data {key}={}", p["value"]),
                    _ => unreachable!("{e}"),
                })
            })
            .collect()
    };
    let started = Instant::now();
    loop {
        let (_, events) = call(&app, reqwest::Method::GET, &format!("/api/v1/tasks/{id}/events"), "alice", None).await;
        if posts_of(&events).len() >= 2 {
            assert_eq!(posts_of(&events), ["event started", "data residual=0.5"], "{events:#}");
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(90), "the first posts never showed: {events:#}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let running = get_task(&app, "alice", &id).await;
    assert_eq!(phase(&running, "execute")["state"], "running", "seen while the job runs: {running:#}");
    let run_dir = running["run_dir"].as_str().unwrap().to_owned();
    let (code, text) = remote("alice", format!("touch {run_dir}/go")).await;
    assert_eq!(code, 0, "{text}");
    let done = wait_for(&app, "alice", &id, 120, "the task to end", is_final).await;
    assert_eq!(done["state"], "completed", "{done:#}");
    // Every post, in the order the job wrote them, marked as the job's; the last
    // line (no newline: the job had ended) included; the bad line said.
    let want = [
        "event started",
        "data residual=0.5",
        "event converged",
        "data residual=1.5e-6",
        "event from-python-helper",
        "event done",
    ];
    let events =
        wait_for_value(&app, &format!("/api/v1/tasks/{id}/events"), 60, |v| posts_of(v).len() >= want.len()).await;
    assert_eq!(posts_of(&events), want, "{events:#}");
    let all = events["data"].as_array().unwrap();
    let converged = all.iter().find(|e| e["post"]["event"] == "converged").unwrap();
    assert_eq!(converged["post"]["data"]["step"], 12);
    assert_eq!(converged["message"], "converged: ünïcode ok");
    assert_eq!(converged["phase"], "execute");
    assert_eq!(converged["post"]["job"], json!(job(&done, "execute")));
    assert!(converged["post"]["time"].is_string(), "the job's own time: {converged:#}");
    assert!(
        all.iter().any(|e| e["post"].is_null()
            && e["message"].as_str().unwrap().contains("1 line of what the job posted was not taken: not JSON")),
        "{events:#}"
    );
    // The data: each key's newest value, and its history.
    let (s, data) = call(&app, reqwest::Method::GET, &format!("/api/v1/tasks/{id}/data"), "alice", None).await;
    assert_eq!(s, StatusCode::OK, "{data}");
    assert_eq!(data["data"]["residual"]["value"], json!(1.5e-6), "{data:#}");
    assert_eq!(
        (data["data"]["residual"]["values"].as_u64(), data["data"]["residual"]["phase"].as_str()),
        (Some(2), Some("execute"))
    );
    let (_, hist) = call(&app, reqwest::Method::GET, &format!("/api/v1/tasks/{id}/data/residual"), "alice", None).await;
    let values: Vec<&Value> = hist["data"].as_array().unwrap().iter().map(|p| &p["value"]).collect();
    assert_eq!(values, [&json!(0.5), &json!(1.5e-6)], "{hist:#}");
    let (s, _) = call(&app, reqwest::Method::GET, &format!("/api/v1/tasks/{id}/data/nothing"), "alice", None).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (s, _) = call(&app, reqwest::Method::GET, &format!("/api/v1/tasks/{id}/data"), "bob", None).await;
    assert_eq!(s, StatusCode::NOT_FOUND, "bob never sees alice's data");
    // The live stream carried the same posts, in the same order, and ended.
    let got = crate::portal::read_events(&mut stream, 60, |e| e.event == "end").await;
    let streamed: Vec<String> = got
        .iter()
        .filter(|e| e.event == "event")
        .filter_map(|e| serde_json::from_str::<Value>(&e.data).ok())
        .filter(|e| !e["post"].is_null())
        .map(|e| e["message"].as_str().unwrap().to_owned())
        .collect();
    let listed: Vec<String> =
        all.iter().filter(|e| !e["post"].is_null()).map(|e| e["message"].as_str().unwrap().to_owned()).collect();
    assert_eq!(streamed, listed, "{got:#?}");
    assert!(got.iter().any(|e| e.event == "end"), "the stream ends once all is read: {got:#?}");
}

/// A job that prints 100 MB of output and posts a million event lines: the server
/// answers all along, the job ends completed, the task keeps what its caps allow, and
/// says what it did not keep.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_output_and_posts_leaves_the_server_responsive_and_says_what_it_dropped() {
    use hpcforge::model::posts::{MAX_TASK_POST_BYTES, MAX_TASK_POSTS};
    let t = crate::helpers::store(crate::helpers::Backend::Embedded).await;
    let app = setup(&t).await;
    let execute = r#"#!/bin/bash
set -euo pipefail
hpcg_event flood.start
# The monitor reads the posts before the flood (a read finding more than 256 KiB new
# keeps the newest, and says what it skipped).
sleep 5
head -c 100000000 /dev/zero | tr '\0' 'x' | fold -w 99
awk 'BEGIN { for (i = 1; i <= 1000000; i++) printf "{\"event\":\"tick\",\"data\":{\"i\":%d}}\n", i }' >> "$HPCG_EVENTS"
echo 'not JSON at the end' >> "$HPCG_EVENTS"
hpcg_data last 1000000
"#;
    put(&app, "/api/v1/applications/flood", &variant("flood", &[("app_execute", execute)])).await;
    let task = submit(&app, "alice", "flood", "local-slurm", json!({})).await;
    let id = task["id"].as_str().unwrap().to_owned();
    // The server answers all along: reads of the task, and of the task list.
    let started = Instant::now();
    let mut slowest = Duration::ZERO;
    let done = loop {
        let asked = Instant::now();
        let t = get_task(&app, "alice", &id).await;
        let (s, _) = call(&app, reqwest::Method::GET, "/api/v1/tasks", "alice", None).await;
        assert_eq!(s, StatusCode::OK);
        slowest = slowest.max(asked.elapsed());
        let drained =
            t["phases"].as_array().unwrap().iter().all(|p| p["job_id"].is_null() || p["posts"]["drained"] == true);
        if is_final(&t) && drained {
            break t;
        }
        assert!(started.elapsed() < Duration::from_secs(300), "the flood never ended: {t:#}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    eprintln!("slowest answer during the flood: {slowest:?}");
    eprintln!("posted: {}", done["posted"]);
    assert!(slowest < Duration::from_secs(10), "the server stalled for {slowest:?}");
    assert_eq!(done["state"], "completed", "{done:#}");
    // What was kept stays within the caps; what was not is counted and said.
    let posted = &done["posted"];
    let kept = posted["kept"].as_u64().unwrap();
    assert!(
        kept <= u64::from(MAX_TASK_POSTS) && posted["bytes"].as_u64().unwrap() <= MAX_TASK_POST_BYTES + 65536,
        "{posted}"
    );
    let dropped = posted["dropped_lines"].as_u64().unwrap();
    let skipped = posted["skipped_bytes"].as_u64().unwrap();
    assert!(skipped > 0 || dropped > 0, "{posted}");
    let (_, events) = call(&app, reqwest::Method::GET, &format!("/api/v1/tasks/{id}/events"), "alice", None).await;
    let events = events["data"].as_array().unwrap();
    let said: Vec<&str> = events.iter().filter(|e| e["post"].is_null()).filter_map(|e| e["message"].as_str()).collect();
    assert!(
        said.iter()
            .any(|m| m.contains("later posts are counted, not kept") || m.contains("bytes of what the job posted")),
        "{said:#?}"
    );
    let first = events.iter().find(|e| !e["post"].is_null()).unwrap();
    assert_eq!(first["post"]["event"], "flood.start", "the first post is kept: {first:#}");
    assert_eq!(events.iter().filter(|e| !e["post"].is_null()).count() as u64, kept);
    // Every byte the job posted was taken or skipped, none twice: the cursor stands
    // at the end of the file. The output was written whole (the engine never read it).
    let run_dir = done["run_dir"].as_str().unwrap();
    let (code, sizes) = remote(
        "alice",
        format!(
            "wc -c < {run_dir}/.hpcforge/posts/execute.jsonl; cat {run_dir}/*execute*.out | wc -c; rm -rf {run_dir}"
        ),
    )
    .await;
    assert_eq!(code, 0, "{sizes}");
    let sizes: Vec<u64> = sizes.split_whitespace().map(|n| n.parse().unwrap()).collect();
    assert_eq!(json!(sizes[0]), phase(&done, "execute")["posts"]["offset"], "{done:#}");
    assert!(sizes[1] >= 100_000_000, "{sizes:?}");
}

/// Log rules on real Slurm: one rule aborts the task when execute prints a matching
/// error (its named group as the event's data); on another application a rule
/// restarts execute once, and gives up when it matches again. A rule that does not
/// compile is refused at upload, with where.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_rules_raise_events_abort_and_restart_once() {
    let t = crate::helpers::store(crate::helpers::Backend::Embedded).await;
    let app = setup(&t).await;
    let mut bad = variant("ruled", &[]);
    bad["definition"]["rules"] = json!([{ "pattern": "error: (", "event": "x" }]);
    let (s, v) = call(&app, reqwest::Method::PUT, "/api/v1/applications/ruled", "admin", Some(&bad)).await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{v}");
    assert_eq!(v["errors"][0]["pointer"], "/definition/rules/0/pattern", "{v}");

    let execute = "#!/bin/bash\necho 'step 1'\necho 'error: mesh wing inverted' >&2\nsleep 120\n";
    let mut aborting = variant("aborting", &[("app_execute", execute)]);
    aborting["definition"]["rules"] = json!([{
        "pattern": "error: mesh (?P<part>\\w+) inverted", "event": "mesh.inverted",
        "stream": "stderr", "action": "abort", "phases": ["execute"]
    }]);
    put(&app, "/api/v1/applications/aborting", &aborting).await;
    let task = submit(&app, "alice", "aborting", "local-slurm", json!({})).await;
    let id = task["id"].as_str().unwrap().to_owned();
    let done = wait_for(&app, "alice", &id, 90, "the rule to abort the task", is_final).await;
    assert_eq!(done["state"], "cancelled", "{done:#}");
    let events = done["events"].as_array().unwrap();
    let hit = events.iter().find(|e| e["post"]["event"] == "mesh.inverted").unwrap_or_else(|| panic!("{done:#}"));
    assert_eq!(hit["post"]["data"], json!({"part": "wing"}), "{hit:#}");
    assert!(
        events
            .iter()
            .any(|e| e["message"].as_str().unwrap().starts_with("cancel requested by log rule `mesh.inverted`")),
        "{done:#}"
    );

    let flaky = "#!/bin/bash\necho 'residual NaN'\nexit 1\n";
    let mut restarting = variant("restarting", &[("app_execute", flaky)]);
    restarting["definition"]["rules"] =
        json!([{ "pattern": "NaN", "event": "diverged", "action": "restart", "max_restarts": 1 }]);
    put(&app, "/api/v1/applications/restarting", &restarting).await;
    let task = submit(&app, "alice", "restarting", "local-slurm", json!({})).await;
    let id = task["id"].as_str().unwrap().to_owned();
    let done = wait_for(&app, "alice", &id, 180, "the rerun to end and the rule to give up", |t| {
        is_final(t)
            && t["events"].as_array().unwrap().iter().any(|e| e["message"].as_str().unwrap_or("").contains("not again"))
    })
    .await;
    assert_eq!(done["state"], "failed", "{done:#}");
    assert_eq!(phase(&done, "execute")["previous"].as_array().map(Vec::len), Some(1), "restarted once: {done:#}");
    assert_eq!(
        done["rule_restarts"],
        json!([{ "rule": 0, "phase": "execute", "count": 1, "gave_up": true }]),
        "{done:#}"
    );
}

/// A log rule on a phase that runs per frame, on real Slurm: each frame's output is
/// read from its own files; a frame that prints a matching line (though it exits 0)
/// is rerun once, alone, with the frame that checks it and what waits for the whole,
/// and when it matches again the rule gives up. The other frames ran once; the job's
/// own output still holds every frame's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_rule_restarts_a_frame_once_then_gives_up() {
    let t = crate::helpers::store(crate::helpers::Backend::Embedded).await;
    let app = setup(&t).await;
    let body = json!({
        "definition": {
            "name": "frame-rules",
            "inputs": [{ "name": "frames", "type": "range", "value": "1-6" }],
            "phases": [
                { "name": "render", "frames": "frames", "frames_per_job": 2 },
                { "name": "check", "frames": "frames", "frames_per_job": 2,
                  "after": [{ "phase": "render", "per_frame": true }] },
                { "name": "gather", "after": [{ "phase": "check", "when": "ended" }] }
            ],
            "resources": { "default": { "cpus": 2, "walltime": "00:05:00" } },
            "rules": [{ "pattern": "residual (?P<value>NaN|inf)", "event": "diverged", "stream": "stderr",
                        "action": "restart", "phases": ["render"] }]
        },
        "files": {
            "app_render": "#!/bin/bash\necho \"ran $HPCG_FRAME\" >> runs.log\necho \"frame $HPCG_FRAME rendered\"\n\
                           if [ \"$HPCG_FRAME\" = 5 ]; then echo 'step 1'; echo 'residual NaN' >&2; fi\n\
                           echo 'residual 0.01' >&2\n",
            "app_check": "#!/bin/bash\necho \"checked $HPCG_FRAME\" >> checks.log\n",
            "app_gather": "#!/bin/bash\necho gathered >> gathers.log\n",
            "cluster/local-slurm": "true\n",
        }
    });
    put(&app, "/api/v1/applications/frame-rules", &body).await;
    let task = submit(&app, "alice", "frame-rules", "local-slurm", json!({})).await;
    let id = task["id"].as_str().unwrap().to_owned();
    let done = wait_for(&app, "alice", &id, 240, "the frame's rerun to end and the rule to give up", |t| {
        is_final(t)
            && t["events"].as_array().unwrap().iter().any(|e| e["message"].as_str().unwrap_or("").contains("not again"))
    })
    .await;
    assert_eq!(done["state"], "completed", "{done:#}");
    let events = done["events"].as_array().unwrap();
    let hits: Vec<&Value> = events.iter().filter(|e| e["post"]["event"] == "diverged").collect();
    assert_eq!(hits.len(), 2, "frame 5 matched in each of its two runs, no other frame did: {done:#}");
    for h in &hits {
        assert_eq!((&h["post"]["frame"], &h["post"]["data"]), (&json!(5), &json!({ "value": "NaN" })), "{h:#}");
        assert_eq!(h["message"], "frame 5: diverged: residual NaN", "{h:#}");
    }
    let said: Vec<&str> = events.iter().filter_map(|e| e["message"].as_str()).collect();
    assert!(said.iter().any(|m| m.starts_with("render frame 5 runs again")), "{said:#?}");
    assert!(
        said.iter().any(|m| m.contains("restart from render (render frames 5, check frames 5, gather)")),
        "{said:#?}"
    );
    assert_eq!(
        done["rule_restarts"],
        json!([{ "rule": 0, "phase": "render", "frame": 5, "count": 1, "gave_up": true }]),
        "{done:#}"
    );
    let render = phase(&done, "render");
    assert_eq!(render["previous"].as_array().map(Vec::len), Some(1), "{render:#}");
    assert_eq!(render["frames"]["selection"], "5", "{render:#}");
    assert_eq!(render["output"]["frames_stderr"]["drained"], true, "{render:#}");
    // On the cluster: frame 5 and its check ran twice, the others once, gather twice;
    // each frame's output is in its own file and in its job's.
    let run_dir = done["run_dir"].as_str().unwrap();
    let (code, out) = remote(
        "alice",
        format!(
            "cd {run_dir} && sort -n -k2 runs.log | tr '\\n' ' '; echo; sort -n -k2 checks.log | tr '\\n' ' '; echo; \
             wc -l < gathers.log; cat .hpcforge/output/render/stdout/5 .hpcforge/output/render/stderr/5; \
             cat render-*.out | sort | tr '\\n' ' '"
        ),
    )
    .await;
    assert_eq!(code, 0, "{out}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], "ran 1 ran 2 ran 3 ran 4 ran 5 ran 5 ran 6 ", "{out}");
    assert_eq!(lines[1], "checked 1 checked 2 checked 3 checked 4 checked 5 checked 5 checked 6 ", "{out}");
    assert_eq!(lines[2], "2", "{out}");
    assert_eq!(lines[3..6], ["frame 5 rendered", "step 1", "residual NaN"], "the rerun's own output: {out}");
    for f in 1..=6 {
        assert!(lines[7].contains(&format!("frame {f} rendered")), "the jobs' output holds every frame's: {out}");
    }
    // One frame's own output, through the API; frames the phase does not have are refused.
    let ask = |q: &str| {
        let (app, url) = (&app, format!("/api/v1/tasks/{id}/output/{q}"));
        async move { call(app, reqwest::Method::GET, &url, "alice", None).await }
    };
    let (s, v) = ask("render?frame=5&stream=stderr").await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(
        (v["data"]["frame"].as_u64(), v["data"]["text"].as_str()),
        (Some(5), Some("residual NaN\nresidual 0.01\n"))
    );
    for bad in ["render?frame=7", "gather?frame=1"] {
        let (s, v) = ask(bad).await;
        assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{bad}: {v}");
        assert_eq!(v["errors"][0]["pointer"], "/frame", "{v}");
    }
}

/// What jobs used, on real Slurm with accounting (sacct), on Grid Engine (qacct) and
/// on Slurm without accounting (the job's own record): a prolog that computes for 5 s shows a CPU
/// efficiency near 1, an execute that sleeps on 2 CPUs one near 0; sacct also gives
/// the peak memory against the request. The efficiencies reach /metrics. (It runs
/// alone, `.config/nextest.toml`: on 2 cores, tests beside it would take the busy
/// prolog's CPU and make its efficiency a measure of them.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resource_use_shows_a_busy_phase_near_1_and_a_sleeping_one_near_0() {
    let t = crate::helpers::store(crate::helpers::Backend::Embedded).await;
    let app = setup(&t).await;
    let mut plain = cluster_body("local-slurm");
    plain["definition"]["name"] = json!("plain-slurm");
    plain["definition"]["accounting"] = json!(false);
    put(&app, "/api/v1/clusters/plain-slurm", &plain).await;
    put(&app, "/api/v1/clusters/local-sge", &cluster_body("local-sge")).await;
    for cluster in ["plain-slurm", "local-sge"] {
        register_key(&app, "alice", cluster).await;
    }
    let busy = "#!/usr/bin/env python3\nimport time\nt = time.time()\nwhile time.time() - t < 5:\n    pass\n";
    let mut used = variant("used", &[("app_prolog", busy), ("app_execute", "#!/bin/sh\nsleep 5\n")]);
    used["definition"]["resources"]["execute"]["cpus"] = json!(2);
    used["files"]["cluster/plain-slurm"] = used["files"]["cluster/local-slurm"].clone();
    put(&app, "/api/v1/applications/used", &used).await;
    // One cluster after the other: three busy prologs at once on 2 cores would share them.
    let mut measured = 0;
    for cluster in ["local-slurm", "plain-slurm", "local-sge"] {
        let task = submit(&app, "alice", "used", cluster, json!({})).await;
        let id = task["id"].as_str().unwrap().to_owned();
        let done = wait_for(&app, "alice", &id, 240, "the task to end and its use to be read", |t| {
            is_final(t) && t["phases"].as_array().unwrap().iter().all(|p| !p["usage"].is_null())
        })
        .await;
        assert_eq!(done["state"], "completed", "{cluster}: {done:#}");
        let usage = |p: &str| phase(&done, p)["usage"].clone();
        let (prolog, execute) = (usage("prolog"), usage("execute"));
        let eff = |u: &Value| u["cpu_efficiency"].as_f64().unwrap_or_else(|| panic!("{cluster}: {u:#}"));
        println!("{cluster}: prolog {prolog}, execute {execute}");
        assert!(eff(&prolog) > 0.5, "{cluster}: a busy prolog is near 1: {prolog:#}");
        assert!(eff(&execute) < 0.1, "{cluster}: a sleeping execute is near 0: {execute:#}");
        assert_eq!(execute["cpus"], 2, "{cluster}: {execute:#}");
        assert!(execute["elapsed_seconds"].as_f64().unwrap() >= 4.0, "{cluster}: {execute:#}");
        assert!(prolog["nodes"].as_array().is_some_and(|n| !n.is_empty()), "{cluster}: {prolog:#}");
        // The epilog lists a folder: too short for an efficiency (elapsed 0 s).
        measured += ["prolog", "execute", "epilog"].iter().filter(|p| !usage(p)["cpu_efficiency"].is_null()).count();
        if cluster == "local-slurm" {
            assert_eq!(prolog["source"], "sacct", "{prolog:#}");
            let peak = prolog["max_rss_bytes"].as_u64().unwrap_or_else(|| panic!("sacct gives the peak: {prolog:#}"));
            assert!(peak > 1 << 20, "{prolog:#}");
            assert_eq!(prolog["requested_memory_bytes"], 100 << 20, "{prolog:#}");
            assert!(prolog["memory_efficiency"].as_f64().is_some_and(|m| m > 0.0), "{prolog:#}");
        } else if cluster == "local-sge" {
            assert_eq!(prolog["source"], "qacct", "{prolog:#}");
            let peak = prolog["max_rss_bytes"].as_u64().unwrap_or_else(|| panic!("qacct gives the peak: {prolog:#}"));
            assert!(peak > 1 << 20, "a Python process's peak is megabytes: {prolog:#}");
        } else {
            assert_eq!(prolog["source"], "job", "{cluster}: without accounting, the job's own record: {prolog:#}");
            assert!(prolog["max_rss_bytes"].is_null(), "{cluster}: {prolog:#}");
        }
    }
    let metrics = app.req(reqwest::Method::GET, "/metrics", "admin").await.send().await.unwrap().text().await.unwrap();
    let count = metrics
        .lines()
        .find_map(|l| l.strip_prefix("hpcforge_job_cpu_efficiency_count{application=\"used\"} "))
        .unwrap_or_else(|| panic!("{metrics}"));
    assert_eq!(count, measured.to_string(), "each efficiency observed once: {metrics}");
    assert!(measured >= 6, "prolog and execute on three clusters");
}

/// Polls `path` as alice until `done` says so.
async fn wait_for_value(app: &TestApp, path: &str, secs: u64, done: impl Fn(&Value) -> bool) -> Value {
    let start = Instant::now();
    loop {
        let (_, v) = call(app, reqwest::Method::GET, path, "alice", None).await;
        if done(&v) {
            return v;
        }
        assert!(start.elapsed() < Duration::from_secs(secs), "waited {secs} s on {path}: {v:#}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

crate::for_embedded_and_mongodb!(
    a_slurm_cluster_without_accounting_is_followed_through_the_controller,
    a_host_whose_key_does_not_match_is_never_trusted,
    a_user_without_a_registered_key_is_told_so,
    the_local_cluster_takes_tasks_of_the_servers_user_only,
);

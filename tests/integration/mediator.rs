//! The mediator against the real thing: tasks submitted as alice to the test
//! environment's Slurm through sshd on 127.0.0.1:2222, and to the local scheduler;
//! on the embedded store and on MongoDB.

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

async fn a_task_runs_as_its_user_through_slurm_with_its_phases_in_order(t: TestStore) {
    let app = setup(&t).await;
    let task = submit(&app, "alice", "sleep", "local-slurm", json!({ "sleep": 1 })).await;
    let id = task["id"].as_str().unwrap().to_owned();
    // Every phase has a Slurm job ID once the answer comes back.
    for p in ["prolog", "execute", "epilog"] {
        let j = job(&task, p);
        assert!(j.bytes().all(|b| b.is_ascii_digit()), "{p}: {j}");
        let (code, out) = remote("alice", format!("scontrol show job -o {j}")).await;
        assert_eq!(code, 0, "{out}");
        assert!(out.contains("UserId=alice(") && out.contains(&format!("Comment=hpcforge:{id}:{p}")), "{out}");
    }
    let done = wait_for(&app, "alice", &id, 120, "the task to end", is_final).await;
    assert_eq!(done["state"], "completed", "{done:#}");
    let (pro, exe, epi) = (phase(&done, "prolog"), phase(&done, "execute"), phase(&done, "epilog"));
    assert!(time_of(pro, "ended_at") <= time_of(exe, "started_at"), "execute started before the prolog ended");
    assert!(time_of(exe, "ended_at") <= time_of(epi, "started_at"), "epilog started before execute ended");
    for p in [pro, exe, epi] {
        assert_eq!(p["exit_code"], 0, "{p}");
    }
    // The job's own output says who ran it.
    let run_dir = done["run_dir"].as_str().unwrap();
    let (_, out) = remote("alice", format!("cat {run_dir}/execute-{}.out", job(&done, "execute"))).await;
    assert!(out.contains("execute: sleeping 1s as alice"), "{out}");
    // And the task's record tells the story.
    let events: Vec<&str> = done["events"].as_array().unwrap().iter().map(|e| e["message"].as_str().unwrap()).collect();
    assert!(events.iter().any(|e| e.starts_with("execute: running → completed")), "{events:#?}");
    let last = events.last().unwrap();
    assert!(last.starts_with("task: ") && last.ends_with("→ completed"), "{last}");
}

async fn a_failing_execute_still_runs_the_epilog_and_the_task_fails_with_its_exit_code(t: TestStore) {
    let app = setup(&t).await;
    put(
        &app,
        "/api/v1/applications/failing",
        &variant("failing", &[("app_execute", "#!/bin/bash\necho going to fail\nexit 3\n")]),
    )
    .await;
    let task = submit(&app, "alice", "failing", "local-slurm", json!({})).await;
    let id = task["id"].as_str().unwrap();
    let done = wait_for(&app, "alice", id, 120, "the task to end", is_final).await;
    assert_eq!(done["state"], "failed", "{done:#}");
    assert_eq!(
        (phase(&done, "execute")["state"].as_str(), phase(&done, "execute")["exit_code"].as_i64()),
        (Some("failed"), Some(3))
    );
    assert_eq!(phase(&done, "epilog")["state"], "completed", "the epilog runs whatever execute did");
    assert!(time_of(phase(&done, "execute"), "ended_at") <= time_of(phase(&done, "epilog"), "started_at"));
}

async fn a_failed_prolog_stops_execute_but_the_epilog_runs(t: TestStore) {
    let app = setup(&t).await;
    put(&app, "/api/v1/applications/badprolog", &variant("badprolog", &[("app_prolog", "#!/bin/bash\nexit 1\n")]))
        .await;
    let task = submit(&app, "alice", "badprolog", "local-slurm", json!({})).await;
    let done = wait_for(&app, "alice", task["id"].as_str().unwrap(), 120, "the task to end", is_final).await;
    assert_eq!(done["state"], "failed", "{done:#}");
    let exe = phase(&done, "execute");
    assert_eq!((exe["state"].as_str(), exe["reason"].as_str()), (Some("cancelled"), Some("DependencyNeverSatisfied")));
    assert_eq!(exe["explanation"], "not run: the phase it depends on did not succeed");
    assert_eq!(phase(&done, "epilog")["state"], "completed");
}

async fn cancel_stops_running_jobs(t: TestStore) {
    let app = setup(&t).await;
    let task = submit(&app, "alice", "sleep", "local-slurm", json!({ "sleep": 300 })).await;
    let id = task["id"].as_str().unwrap();
    wait_for(&app, "alice", id, 120, "execute to run", |t| phase(t, "execute")["state"] == "running").await;
    let (s, v) = call(&app, reqwest::Method::DELETE, &format!("/api/v1/tasks/{id}"), "alice", None).await;
    assert_eq!(s, StatusCode::ACCEPTED, "{v}");
    let done = wait_for(&app, "alice", id, 60, "the task to end", is_final).await;
    assert_eq!(done["state"], "cancelled", "{done:#}");
    assert_eq!(phase(&done, "execute")["state"], "cancelled");
    assert_eq!(phase(&done, "epilog")["state"], "cancelled", "the pending epilog is cancelled too, not started");
    // Slurm agrees: nothing of the task is alive.
    let (_, out) =
        remote("alice", format!("squeue --noheader -u alice -O 'Comment:|,State:|' | grep 'hpcforge:{id}' || true"))
            .await;
    assert!(!out.contains("RUNNING") && !out.contains("PENDING"), "{out}");
    // Cancelling what ended is a conflict, said plainly.
    let (s, v) = call(&app, reqwest::Method::DELETE, &format!("/api/v1/tasks/{id}"), "alice", None).await;
    assert_eq!(s, StatusCode::CONFLICT, "{v}");
}

async fn restart_from_execute_reruns_only_execute_and_epilog(t: TestStore) {
    let app = setup(&t).await;
    let task = submit(&app, "alice", "sleep", "local-slurm", json!({ "sleep": 1 })).await;
    let id = task["id"].as_str().unwrap();
    let first = wait_for(&app, "alice", id, 120, "the task to end", is_final).await;
    let (s, v) = call(
        &app,
        reqwest::Method::POST,
        &format!("/api/v1/tasks/{id}/restart"),
        "alice",
        Some(&json!({ "from": "execute" })),
    )
    .await;
    assert_eq!(s, StatusCode::ACCEPTED, "{v}");
    let again = wait_for(&app, "alice", id, 120, "the restarted task to end", |t| {
        is_final(t) && phase(t, "execute")["attempt"] == 2
    })
    .await;
    assert_restarted_from_execute(&first, &again);
    assert!(
        again["events"].as_array().unwrap().iter().any(|e| e["message"] == "restart from execute requested by alice")
    );
}

async fn bob_cannot_see_or_act_on_alices_task(t: TestStore) {
    let app = setup(&t).await;
    let task = submit(&app, "alice", "sleep", "local-slurm", json!({ "sleep": 1 })).await;
    let id = task["id"].as_str().unwrap();
    use reqwest::Method as M;
    for (method, path, body) in [
        (M::GET, format!("/api/v1/tasks/{id}"), None),
        (M::DELETE, format!("/api/v1/tasks/{id}"), None),
        (M::POST, format!("/api/v1/tasks/{id}/restart"), Some(json!({ "from": "execute" }))),
        (M::GET, format!("/api/v1/tasks/{id}/scripts/execute"), None),
    ] {
        let (s, v) = call(&app, method.clone(), &path, "bob", body.as_ref()).await;
        assert_eq!(s, StatusCode::NOT_FOUND, "{method} {path}: {v}");
        assert_eq!(v["message"], format!("there is no task {id}"), "the same answer as for a task that does not exist");
    }
    let (s, v) = call(&app, M::GET, "/api/v1/tasks", "bob", None).await;
    assert_eq!((s, v["data"]["tasks"].as_array().unwrap().len()), (StatusCode::OK, 0));
    let resp = app.req(M::GET, &format!("/api/v1/tasks/{id}/scripts/execute"), "alice").await.send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert!(resp.text().await.unwrap().starts_with("#!/bin/bash\n#SBATCH"));
    wait_for(&app, "alice", id, 120, "the task to end", is_final).await;
}

async fn a_scheduler_refusal_fails_the_phase_with_the_schedulers_own_words(t: TestStore) {
    let app = setup(&t).await;
    // A cluster without partition limits, so the scheduler itself gets to say no.
    let mut open = cluster_body("local-slurm");
    open["definition"]["name"] = json!("slurm-open");
    open["definition"].as_object_mut().unwrap().remove("limits");
    open["definition"]["defaults"].as_object_mut().unwrap().remove("partition");
    put(&app, "/api/v1/clusters/slurm-open", &open).await;
    register_key(&app, "alice", "slurm-open").await;
    let mut body = variant("badpart", &[("cluster/slurm-open", "true\n")]);
    body["definition"]["resources"]["default"]["partition"] = json!("nope");
    put(&app, "/api/v1/applications/badpart", &body).await;
    let task = submit(&app, "alice", "badpart", "slurm-open", json!({})).await;
    assert_eq!(task["state"], "failed", "{task:#}");
    let pro = phase(&task, "prolog");
    assert_eq!(pro["state"], "failed");
    assert!(
        pro["scheduler_message"]
            .as_str()
            .unwrap()
            .contains("Batch job submission failed: Invalid partition name specified"),
        "{pro}"
    );
    assert!(pro["explanation"].as_str().unwrap().starts_with("the partition does not exist"), "{pro}");
    for p in ["execute", "epilog"] {
        assert_eq!(
            (phase(&task, p)["state"].as_str(), phase(&task, p)["explanation"].as_str()),
            (Some("cancelled"), Some("not submitted: the prolog job was refused"))
        );
    }
}

async fn an_unreachable_cluster_blocks_the_task_until_it_is_back(t: TestStore) {
    let app = setup(&t).await;
    let mut flaky = cluster_body("local-slurm");
    flaky["definition"]["name"] = json!("flaky");
    flaky["definition"]["port"] = json!(1);
    // An absolute base: nothing needs the cluster before submission.
    flaky["definition"]["run_dir_base"] = json!("/home/{user}/hpcforge");
    put(&app, "/api/v1/clusters/flaky", &flaky).await;
    register_key(&app, "alice", "flaky").await;
    put(&app, "/api/v1/applications/sleepy", &variant("sleepy", &[("cluster/flaky", "true\n")])).await;
    let task = submit(&app, "alice", "sleepy", "flaky", json!({ "sleep": 1 })).await;
    let id = task["id"].as_str().unwrap();
    assert_eq!(task["state"], "blocked", "{task:#}");
    assert!(phase(&task, "prolog")["reason"].as_str().unwrap().contains("Connection refused"), "{task:#}");
    // The cluster comes back (its definition is fixed): the task goes through.
    flaky["definition"]["port"] = json!(test_env().ssh_port);
    put(&app, "/api/v1/clusters/flaky", &flaky).await;
    let done = wait_for(&app, "alice", id, 120, "the task to recover and end", is_final).await;
    assert_eq!(done["state"], "completed", "{done:#}");
    assert!(done["events"].as_array().unwrap().iter().any(|e| e["message"].as_str().unwrap().contains("→ blocked")));
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

async fn tasks_on_the_local_cluster_run_as_the_servers_user(t: TestStore) {
    let app = spawn_app(t.store.clone()).await;
    hpcforge::examples::seed_if_empty(t.store.as_ref()).await.unwrap();
    let me = hpcforge::mediator::current_user().expect("the test knows who it runs as").to_string();
    let task = submit(&app, &me, "sleep", "local", json!({ "sleep": 1 })).await;
    let id = task["id"].as_str().unwrap();
    let done = wait_for(&app, &me, id, 60, "the local task to end", is_final).await;
    assert_eq!(done["state"], "completed", "{done:#}");
    let run_dir = std::path::PathBuf::from(done["run_dir"].as_str().unwrap());
    let out = std::fs::read_to_string(run_dir.join("execute.out")).unwrap();
    assert!(out.contains(&format!("execute: sleeping 1s as {me}")), "{out}");
    std::fs::remove_dir_all(&run_dir).unwrap();
    // Nobody else's tasks run there: it would run them as the server's user.
    let body = json!({ "application": "sleep", "cluster": "local", "inputs": {} });
    let (s, v) = call(&app, reqwest::Method::POST, "/api/v1/tasks", "someone-else", Some(&body)).await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{v}");
    assert!(v["errors"][0]["message"].as_str().unwrap().contains("takes tasks of"), "{v}");
    assert_eq!(app.state.mediator.open_connections(), 0, "the local cluster needs no SSH");
}

/// A server with `sleep` and `local-sge`, and alice's key for it.
async fn setup_sge(t: &TestStore) -> TestApp {
    let app = crate::helpers::spawn_configured(t.store.clone(), |_| {}).await;
    put(&app, "/api/v1/applications/sleep", &app_body("sleep")).await;
    put(&app, "/api/v1/clusters/local-sge", &cluster_body("local-sge")).await;
    register_key(&app, "alice", "local-sge").await;
    app
}

async fn a_task_runs_as_its_user_through_grid_engine_with_its_phases_in_order(t: TestStore) {
    let app = setup_sge(&t).await;
    let task = submit(&app, "alice", "sleep", "local-sge", json!({ "sleep": 1 })).await;
    let id = task["id"].as_str().unwrap().to_owned();
    for p in ["prolog", "execute", "epilog"] {
        let j = job(&task, p);
        assert!(j.bytes().all(|b| b.is_ascii_digit()), "{p}: {j}");
    }
    let done = wait_for(&app, "alice", &id, 120, "the task to end", is_final).await;
    assert_eq!(done["state"], "completed", "{done:#}");
    let (pro, exe, epi) = (phase(&done, "prolog"), phase(&done, "execute"), phase(&done, "epilog"));
    assert!(time_of(pro, "ended_at") <= time_of(exe, "started_at"), "execute started before the prolog ended");
    assert!(time_of(exe, "ended_at") <= time_of(epi, "started_at"), "epilog started before execute ended");
    for p in [pro, exe, epi] {
        assert_eq!(p["exit_code"], 0, "{p}");
    }
    // Through the API: the job's output, where the Grid Engine templates put it.
    let (s, v) = call(&app, reqwest::Method::GET, &format!("/api/v1/tasks/{id}/output/execute"), "alice", None).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert!(v["data"]["text"].as_str().unwrap().contains("execute: sleeping 1s as alice"), "{v}");
    // Grid Engine agrees on whose the jobs were (its accounting file is written
    // every 15 s: the state above came from the job's own exit record).
    let start = Instant::now();
    loop {
        let (_, out) =
            remote("alice", format!("qacct -j {} | grep -E '^(owner|jobname)'", job(&done, "execute"))).await;
        if out.contains("alice") && out.contains("hpcg-sleep-execute") {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(45), "{out}");
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

async fn on_grid_engine_a_failed_prolog_stops_execute_but_the_epilog_runs(t: TestStore) {
    let app = setup_sge(&t).await;
    let body = variant("badprolog", &[("app_prolog", "#!/bin/bash\nexit 1\n"), ("cluster/local-sge", "true\n")]);
    put(&app, "/api/v1/applications/badprolog", &body).await;
    let task = submit(&app, "alice", "badprolog", "local-sge", json!({})).await;
    let id = task["id"].as_str().unwrap();
    let done = wait_for(&app, "alice", id, 120, "the task to end", is_final).await;
    assert_eq!(done["state"], "failed", "{done:#}");
    assert_eq!(
        (phase(&done, "prolog")["state"].as_str(), phase(&done, "prolog")["exit_code"].as_i64()),
        (Some("failed"), Some(1))
    );
    let exe = phase(&done, "execute");
    assert_eq!((exe["state"].as_str(), exe["reason"].as_str()), (Some("cancelled"), Some("DependencyNeverSatisfied")));
    assert_eq!(exe["explanation"], "not run: the phase it depends on did not succeed");
    assert_eq!(phase(&done, "epilog")["state"], "completed");
    // The application's execute script never ran: its job stopped at the guard.
    let (s, v) =
        call(&app, reqwest::Method::GET, &format!("/api/v1/tasks/{id}/output/execute?stream=stderr"), "alice", None)
            .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert!(v["data"]["text"].as_str().unwrap().contains("execute not run: the prolog phase"), "{v}");
    let (_, v) = call(&app, reqwest::Method::GET, &format!("/api/v1/tasks/{id}/output/execute"), "alice", None).await;
    assert!(!v.to_string().contains("execute: sleeping"), "{v}");
}

async fn on_grid_engine_cancel_stops_running_jobs(t: TestStore) {
    let app = setup_sge(&t).await;
    let task = submit(&app, "alice", "sleep", "local-sge", json!({ "sleep": 300 })).await;
    let id = task["id"].as_str().unwrap();
    wait_for(&app, "alice", id, 120, "execute to run", |t| phase(t, "execute")["state"] == "running").await;
    let (s, v) = call(&app, reqwest::Method::DELETE, &format!("/api/v1/tasks/{id}"), "alice", None).await;
    assert_eq!(s, StatusCode::ACCEPTED, "{v}");
    let done = wait_for(&app, "alice", id, 60, "the task to end", is_final).await;
    assert_eq!(done["state"], "cancelled", "{done:#}");
    assert_eq!(phase(&done, "execute")["state"], "cancelled", "{done:#}");
    assert_eq!(phase(&done, "epilog")["state"], "cancelled", "{done:#}");
    // Grid Engine agrees, within a few seconds: none of the task's jobs is left.
    let ids = [job(&done, "execute"), job(&done, "epilog")];
    let start = Instant::now();
    loop {
        let (_, out) = remote("alice", "qstat -u alice".to_owned()).await;
        let left: Vec<&str> =
            out.lines().filter(|l| ids.iter().any(|j| l.split_whitespace().next() == Some(j))).collect();
        if left.is_empty() {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(30), "still queued: {left:?}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

crate::for_embedded_and_mongodb!(
    a_task_runs_as_its_user_through_slurm_with_its_phases_in_order,
    a_failing_execute_still_runs_the_epilog_and_the_task_fails_with_its_exit_code,
    a_failed_prolog_stops_execute_but_the_epilog_runs,
    cancel_stops_running_jobs,
    restart_from_execute_reruns_only_execute_and_epilog,
    bob_cannot_see_or_act_on_alices_task,
    a_scheduler_refusal_fails_the_phase_with_the_schedulers_own_words,
    an_unreachable_cluster_blocks_the_task_until_it_is_back,
    a_host_whose_key_does_not_match_is_never_trusted,
    a_user_without_a_registered_key_is_told_so,
    tasks_on_the_local_cluster_run_as_the_servers_user,
    a_task_runs_as_its_user_through_grid_engine_with_its_phases_in_order,
    on_grid_engine_a_failed_prolog_stops_execute_but_the_epilog_runs,
    on_grid_engine_cancel_stops_running_jobs,
);

/// The server dies between `sbatch` and the database write (a failpoint aborts it
/// there); after a restart there is exactly one Slurm job per phase, and the task
/// knows their IDs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_killed_right_after_sbatch_leaves_exactly_one_job_per_phase() {
    use crate::helpers::Server;
    let dir = tempfile::tempdir().unwrap();
    let mut first = Server::start(dir.path(), &["--no-examples"], &[("HPCFORGE_FAILPOINT", "after-submit")]);
    let admin = first.token("admin", "admin");
    let alice = first.token("alice", "user");
    let http = crate::helpers::http();
    let put_json = |base: String, path: &'static str, body: Value| {
        let http = http.clone();
        let admin = admin.clone();
        async move {
            let resp = http.put(format!("{base}{path}")).bearer_auth(admin).json(&body).send().await.unwrap();
            assert!(resp.status().is_success(), "{path}: {}", resp.text().await.unwrap());
        }
    };
    put_json(first.base.clone(), "/api/v1/applications/sleep", app_body("sleep")).await;
    put_json(first.base.clone(), "/api/v1/clusters/local-slurm", cluster_body("local-slurm")).await;
    let key = std::fs::read_to_string(&test_env().keys["alice"]).unwrap();
    put_json(first.base.clone(), "/api/v1/credentials/alice/local-slurm", json!({ "private_key": key })).await;
    let resp = http
        .post(format!("{}/api/v1/tasks", first.base))
        .bearer_auth(&alice)
        .json(&json!({ "application": "sleep", "cluster": "local-slurm", "inputs": { "sleep": 2 } }))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::CREATED);
    let id = resp.json::<Value>().await.unwrap()["data"]["id"].as_str().unwrap().to_owned();
    // The submission reaches Slurm, then the server aborts before recording it.
    let status = tokio::task::spawn_blocking(move || {
        let s = first.wait_exit(Duration::from_secs(60));
        drop(first);
        s
    })
    .await
    .unwrap()
    .expect("the failpoint aborts the server");
    assert!(!status.success(), "{status}");
    let count_jobs = |id: String| async move {
        let (_, out) = remote(
            "alice",
            format!("squeue --noheader --states=all -u alice -O 'JobID:|,Comment:|' | grep 'hpcforge:{id}:' | sort"),
        )
        .await;
        out.lines()
            .map(|l| (l.split('|').nth(1).unwrap_or("").to_owned(), l.split('|').next().unwrap().to_owned()))
            .collect::<Vec<_>>()
    };
    let before = count_jobs(id.clone()).await;
    assert_eq!(before.len(), 3, "the jobs reached Slurm before the abort: {before:?}");

    // The same data directory (store and server key), no failpoint.
    let second = Server::start(dir.path(), &["--no-examples"], &[]);
    let fetch = || async {
        let v: Value = http
            .get(format!("{}/api/v1/tasks/{id}", second.base))
            .bearer_auth(&alice)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        v
    };
    let start = Instant::now();
    let task = loop {
        let v = fetch().await;
        let t = v["data"].clone();
        if t["phases"].as_array().unwrap().iter().all(|p| p["job_id"].is_string()) {
            break t;
        }
        assert!(start.elapsed() < Duration::from_secs(60), "the restarted server did not recover the jobs: {t:#}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    let after = count_jobs(id.clone()).await;
    assert_eq!(after, before, "no job was submitted twice");
    for (comment, job_id) in &after {
        let p = comment.rsplit(':').next().unwrap();
        assert_eq!(job(&task, p), *job_id, "the task records the job Slurm has for {p}");
    }
    assert!(
        task["events"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["message"].as_str().unwrap().contains("found again by its tag")),
        "{task:#}"
    );
    let done = loop {
        let v = fetch().await;
        if is_final(&v["data"]) {
            break v["data"].clone();
        }
        assert!(start.elapsed() < Duration::from_secs(120), "{v:#}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    assert_eq!(done["state"], "completed", "{done:#}");
    drop(second);
}

//! The holes a review found in the engine (issue 9), each pinned end to end on the real
//! components by a test named after it: Slurm and sshd from `scripts/test-env`, the
//! `local` cluster, both stores.

use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::helpers::{TestStore, spawn_app};
use crate::mediator::{
    call, cluster_body, get_task, is_final, job, phase, put, register_key, remote, setup, setup_with, submit, variant,
    wait_for,
};

/// The Unix user the tests (and so the `local` cluster) run as.
fn me() -> String {
    hpcforge::mediator::current_user().expect("the test knows who it runs as").to_string()
}

fn events(t: &Value) -> Vec<String> {
    t["events"].as_array().unwrap().iter().map(|e| e["message"].as_str().unwrap().to_owned()).collect()
}

/// Alice's jobs in the queue (ended ones included) carrying the tags of task `id`.
async fn slurm_jobs_of(id: &str) -> String {
    let (_, out) = remote(
        "alice",
        format!("squeue --noheader --states=all -u alice -O 'JobID:|,Comment:' | grep 'hpcforge:{id}:' || true"),
    )
    .await;
    out.trim().to_owned()
}

// ---------------------------------------------------------------------------------
// Hole 1: `| safe` defeated quoting
// ---------------------------------------------------------------------------------

async fn hole_1_safe_on_an_input_is_refused_at_upload_with_its_file_and_line(t: TestStore) {
    let app = spawn_app(t.store.clone()).await;
    let body = variant("unsafe", &[("app_execute", "#!/bin/bash\necho start\necho @@ sleep | safe @@\n")]);
    let (s, v) = call(&app, Method::PUT, "/api/v1/applications/unsafe", "admin", Some(&body)).await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{v:#}");
    let e = &v["errors"][0];
    assert_eq!(e["pointer"], "/files/app_execute", "{v:#}");
    assert!(e["message"].as_str().unwrap().starts_with("line 3: `| safe` would place a value unquoted"), "{v:#}");
    let (s, _) = call(&app, Method::GET, "/api/v1/applications/unsafe", "admin", None).await;
    assert_eq!(s, StatusCode::NOT_FOUND, "nothing was stored");
    // A template may place a built-in raw; it may not touch the payload.
    let mut cluster = cluster_body("local-slurm");
    cluster["definition"]["name"] = json!("raw-paths");
    let common = cluster["files"]["forge/script_common"].as_str().unwrap().to_owned();
    cluster["files"]["forge/script_common"] =
        json!(common.replace("#SBATCH --chdir=@@ HPCG_RUN_DIR @@", "#SBATCH --chdir=@@ HPCG_RUN_DIR | safe @@"));
    put(&app, "/api/v1/clusters/raw-paths", &cluster).await;
    cluster["files"]["forge/script_common"] =
        json!(common.replace("@@ HPCG_PAYLOAD @@", "@@ HPCG_PAYLOAD | replace(from=\"'\", to=\"\") @@"));
    let (s, v) = call(&app, Method::PUT, "/api/v1/clusters/raw-paths", "admin", Some(&cluster)).await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{v:#}");
    assert!(v.to_string().contains("may only stand alone"), "{v:#}");
}

// ---------------------------------------------------------------------------------
// Hole 2: a cancel could be undone by a submission in flight
// ---------------------------------------------------------------------------------

async fn hole_2_a_cancel_landing_while_a_submission_is_in_flight_is_not_undone(t: TestStore) {
    // `slow-submit` holds each attempt 3 s between its intent and the scheduler: the
    // cancel surely lands in that window.
    let app = setup_with(&t, |c| c.mediator.failpoint = Some("slow-submit".into())).await;
    let body = json!({ "application": "sleep", "cluster": "local-slurm", "inputs": { "sleep": 30 } });
    let (s, v) = call(&app, Method::POST, "/api/v1/tasks", "alice", Some(&body)).await;
    assert_eq!(s, StatusCode::CREATED, "{v:#}");
    let id = v["data"]["id"].as_str().unwrap().to_owned();
    let (s, v) = call(&app, Method::DELETE, &format!("/api/v1/tasks/{id}"), "alice", None).await;
    assert_eq!(s, StatusCode::ACCEPTED, "{v:#}");
    let done = wait_for(&app, "alice", &id, 60, "the cancelled task to end", is_final).await;
    assert_eq!(done["state"], "cancelled", "{done:#}");
    for p in ["prolog", "execute", "epilog"] {
        assert_eq!(phase(&done, p)["state"], "cancelled", "{done:#}");
        assert!(phase(&done, p).get("job_id").is_none(), "no job after the cancel: {done:#}");
    }
    // Give a late submission the chance to happen, then ask Slurm itself.
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(slurm_jobs_of(&id).await, "", "Slurm got jobs after the user cancelled");
    let after = get_task(&app, "alice", &id).await;
    assert_eq!(after["state"], "cancelled");
    assert!(
        !events(&after).iter().any(|e| e.contains("cancelled → ")),
        "a cancelled phase moved again: {:#?}",
        events(&after)
    );
}

// ---------------------------------------------------------------------------------
// Hole 3: every live task was rewritten every tick
// ---------------------------------------------------------------------------------

async fn hole_3_the_monitor_writes_and_announces_nothing_for_jobs_that_did_not_change(t: TestStore) {
    hpcforge::examples::seed_if_empty(t.store.as_ref()).await.unwrap();
    let app = spawn_app(t.store.clone()).await;
    let me = me();
    let body = json!({ "application": "sleep", "cluster": "local", "inputs": { "sleep": 30 } });
    let (s, v) = call(&app, Method::POST, "/api/v1/tasks?wait=submitted", &me, Some(&body)).await;
    assert_eq!(s, StatusCode::CREATED, "{v:#}");
    let id = v["data"]["id"].as_str().unwrap().to_owned();
    // Execute runs, and what the prolog used has been read (the one write that follows
    // a job's end).
    wait_for(&app, &me, &id, 60, "execute to run", |t| {
        phase(t, "execute")["state"] == "running" && !phase(t, "prolog")["usage"].is_null()
    })
    .await;
    let task_id = hpcforge::model::TaskId::parse(&id).unwrap();
    let before = app.state.store.task_state(&task_id).await.unwrap().unwrap();
    let mut news = app.state.mediator.updates();
    // The test server ticks every 300 ms: about seven ticks of a running job.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = app.state.store.task_state(&task_id).await.unwrap().unwrap();
    assert_eq!(after.revision, before.revision, "the task was written although nothing changed");
    assert_eq!(after.events.last().map(|e| e.seq), before.events.last().map(|e| e.seq));
    let mut announced = 0;
    while let Ok(n) = news.try_recv() {
        announced += usize::from(n.id == task_id);
    }
    assert_eq!(announced, 0, "an unchanged task was announced");
    let (s, _) = call(&app, Method::DELETE, &format!("/api/v1/tasks/{id}"), &me, None).await;
    assert_eq!(s, StatusCode::ACCEPTED);
    let done = wait_for(&app, &me, &id, 60, "the task to end", is_final).await;
    if let Some(dir) = done["run_dir"].as_str().filter(|d| d.contains("hpcforge-runs/")) {
        let _ = std::fs::remove_dir_all(dir);
    }
}

// ---------------------------------------------------------------------------------
// Hole 4: condition codes nobody had seen
// ---------------------------------------------------------------------------------

// Pinned by the scheduler contract, on Slurm and Grid Engine alike:
// `scheduler_contract::{slurm,grid_engine}::embedded_only::a_job_over_its_wall_time_ends_as_timeout_and_the_epilog_still_runs`.

// ---------------------------------------------------------------------------------
// Hole 5: said but not true
// ---------------------------------------------------------------------------------

async fn hole_5_only_a_portal_acts_for_a_user_an_admin_does_not(t: TestStore) {
    let app = setup(&t).await;
    let body = json!({ "application": "sleep", "cluster": "local-slurm", "inputs": { "sleep": 1 } });
    let resp = app
        .req(Method::POST, "/api/v1/tasks", "admin")
        .await
        .header("x-hpcforge-on-behalf-of", "alice")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);
    let v: Value = resp.json().await.unwrap();
    assert!(v["message"].as_str().unwrap().contains("only portal tokens may act on behalf of another user"), "{v}");
    let (_, list) = call(&app, Method::GET, "/api/v1/tasks?owner=alice", "admin", None).await;
    assert_eq!(list["data"]["tasks"], json!([]), "nothing was submitted as alice");
}

async fn hole_5_a_restart_reruns_the_recorded_scripts_not_a_newer_definition(t: TestStore) {
    hpcforge::examples::seed_if_empty(t.store.as_ref()).await.unwrap();
    let app = spawn_app(t.store.clone()).await;
    let me = me();
    let say = |word: &str| format!("#!/bin/sh\necho \"ran the {word} script\"\n");
    let mut first = variant("versioned", &[("app_execute", &say("first"))]);
    first["files"]["cluster/local"] = json!("");
    put(&app, "/api/v1/applications/versioned", &first).await;
    let body = json!({ "application": "versioned", "cluster": "local", "inputs": {} });
    let (s, v) = call(&app, Method::POST, "/api/v1/tasks?wait=submitted", &me, Some(&body)).await;
    assert_eq!(s, StatusCode::CREATED, "{v:#}");
    let id = v["data"]["id"].as_str().unwrap().to_owned();
    let done = wait_for(&app, &me, &id, 60, "the task to end", is_final).await;
    assert_eq!(done["state"], "completed", "{done:#}");
    let mut second = variant("versioned", &[("app_execute", &say("second"))]);
    second["files"]["cluster/local"] = json!("");
    put(&app, "/api/v1/applications/versioned", &second).await;
    let (s, v) =
        call(&app, Method::POST, &format!("/api/v1/tasks/{id}/restart"), &me, Some(&json!({ "from": "execute" })))
            .await;
    assert_eq!(s, StatusCode::ACCEPTED, "{v:#}");
    let again =
        wait_for(&app, &me, &id, 60, "the restart to end", |t| is_final(t) && phase(t, "execute")["attempt"] == 2)
            .await;
    assert_eq!(again["state"], "completed", "{again:#}");
    assert_eq!(again["scripts_version"], 1, "a restart does not forge again");
    assert_eq!(phase(&again, "execute")["script_sha256"], phase(&done, "execute")["script_sha256"]);
    let (s, out) = call(&app, Method::GET, &format!("/api/v1/tasks/{id}/output/execute"), &me, None).await;
    assert_eq!(s, StatusCode::OK, "{out:#}");
    assert!(out["data"]["text"].as_str().unwrap().contains("ran the first script"), "{out:#}");
    if let Some(dir) = again["run_dir"].as_str().filter(|d| d.contains("hpcforge-runs/")) {
        let _ = std::fs::remove_dir_all(dir);
    }
}

async fn hole_5_a_cluster_that_keeps_failing_is_paused_and_its_tasks_say_so(t: TestStore) {
    let app = setup_with(&t, |c| c.mediator.pause_after = 2).await;
    // An sshd that is not there: every attempt is refused at once (transient).
    let mut dead = cluster_body("local-slurm");
    dead["definition"]["name"] = json!("nowhere");
    dead["definition"]["port"] = json!(1);
    dead["definition"]["run_dir_base"] = json!("/tmp/hpcforge-{user}");
    put(&app, "/api/v1/clusters/nowhere", &dead).await;
    let mut sleep = crate::mediator::app_body("sleep");
    sleep["files"]["cluster/nowhere"] = json!("");
    put(&app, "/api/v1/applications/sleep", &sleep).await;
    register_key(&app, "alice", "nowhere").await;
    let task = submit(&app, "alice", "sleep", "nowhere", json!({ "sleep": 1 })).await;
    let id = task["id"].as_str().unwrap();
    assert_eq!(task["state"], "blocked", "{task:#}");
    let paused = wait_for(&app, "alice", id, 60, "the cluster to be paused", |t| {
        phase(t, "prolog")["reason"].as_str().is_some_and(|r| r.contains("is paused after repeated failures"))
    })
    .await;
    assert_eq!(paused["state"], "blocked", "{paused:#}");
    assert!(app.state.mediator.paused_until("nowhere").is_some());
    let (s, _) = call(&app, Method::DELETE, &format!("/api/v1/tasks/{id}"), "alice", None).await;
    assert_eq!(s, StatusCode::ACCEPTED);
    let done = wait_for(&app, "alice", id, 30, "the task to end", is_final).await;
    assert_eq!(done["state"], "cancelled", "{done:#}");
}

// ---------------------------------------------------------------------------------
// Hole 6: staged files and output tails over SSH
// ---------------------------------------------------------------------------------

async fn hole_6_a_staged_file_arrives_in_the_run_directory_over_ssh_with_its_mode(t: TestStore) {
    let app = setup(&t).await;
    let name = format!("hpcforge-in-{}.dat", uuid::Uuid::new_v4().simple());
    let (code, out) = remote("alice", format!("printf 'hello from alice' > ~/{name} && chmod 600 ~/{name}")).await;
    assert_eq!(code, 0, "{out}");
    let inputs = json!({ "sleep": 1, "input_files": [{ "action": "COPY", "path": format!("/home/alice/{name}"), "mods": "-rw-r-----" }] });
    let task = submit(&app, "alice", "sleep", "local-slurm", inputs).await;
    let id = task["id"].as_str().unwrap();
    let done = wait_for(&app, "alice", id, 120, "the task to end", is_final).await;
    assert_eq!(done["state"], "completed", "{done:#}");
    let run_dir = done["run_dir"].as_str().unwrap();
    let (code, out) = remote("alice", format!("cat {run_dir}/{name}; echo; stat -c '%a %U' {run_dir}/{name}")).await;
    assert_eq!(code, 0, "{out}");
    assert_eq!(out.trim(), "hello from alice\n640 alice", "the copy, its mode and owner");
    // The output tail, read over SSH under Slurm's own file names.
    let (s, v) = call(&app, Method::GET, &format!("/api/v1/tasks/{id}/output/epilog"), "alice", None).await;
    assert_eq!(s, StatusCode::OK, "{v:#}");
    let epilog = &v["data"];
    assert_eq!(epilog["path"], json!(format!("{run_dir}/epilog-{}.out", job(&done, "epilog"))), "{v:#}");
    assert!(epilog["text"].as_str().unwrap().contains(&name), "the epilog lists the staged file: {v:#}");
    let (s, v) = call(&app, Method::GET, &format!("/api/v1/tasks/{id}/output/execute?lines=5"), "alice", None).await;
    assert_eq!(s, StatusCode::OK, "{v:#}");
    assert!(v["data"]["text"].as_str().unwrap().contains("execute: sleeping 1s as alice"), "{v:#}");
    let (s, v) =
        call(&app, Method::GET, &format!("/api/v1/tasks/{id}/output/execute?stream=stderr"), "alice", None).await;
    assert_eq!(s, StatusCode::OK, "{v:#}");
    assert_eq!(v["data"]["path"], json!(format!("{run_dir}/execute-{}.err", job(&done, "execute"))));
    // Hole 8 on the way: a started task never went back to pending.
    assert!(!events(&done).iter().any(|e| e == "task: running → pending"), "{:#?}", events(&done));
    remote("alice", format!("rm -rf ~/{name} {run_dir}")).await;
}

async fn hole_6_a_copy_the_user_may_not_read_fails_clearly_and_submits_nothing(t: TestStore) {
    let app = setup(&t).await;
    let secret = format!("/root/hpcforge-secret-{}", uuid::Uuid::new_v4().simple());
    std::fs::write(&secret, "root only\n").unwrap();
    let inputs = json!({ "sleep": 1, "input_files": [{ "action": "COPY", "path": secret }] });
    let task = submit(&app, "alice", "sleep", "local-slurm", inputs).await;
    let id = task["id"].as_str().unwrap();
    let done = wait_for(&app, "alice", id, 60, "the task to end", is_final).await;
    let _ = std::fs::remove_file(&secret);
    assert_eq!(done["state"], "failed", "{done:#}");
    let pro = phase(&done, "prolog");
    assert_eq!(pro["state"], "failed", "{done:#}");
    let name = secret.rsplit('/').next().unwrap();
    assert_eq!(
        pro["explanation"],
        json!(format!("the input file `{name}` could not be copied into the run directory")),
        "{done:#}"
    );
    assert!(pro["scheduler_message"].as_str().unwrap().contains("Permission denied"), "{done:#}");
    for p in ["execute", "epilog"] {
        assert_eq!(phase(&done, p)["state"], "cancelled", "{done:#}");
    }
    assert_eq!(slurm_jobs_of(id).await, "", "nothing was submitted");
}

// ---------------------------------------------------------------------------------
// Hole 7: PBS and SGE clusters were accepted and could never run (SGE runs since issue 11)
// ---------------------------------------------------------------------------------

async fn hole_7_a_pbs_cluster_is_refused_at_upload_saying_why_and_an_sge_one_is_taken(t: TestStore) {
    let app = spawn_app(t.store.clone()).await;
    let (s, v) = call(&app, Method::PUT, "/api/v1/clusters/local-sge", "admin", Some(&cluster_body("local-sge"))).await;
    assert!(s.is_success(), "{v:#}");
    for kind in ["pbs"] {
        let mut body = cluster_body("local-slurm");
        body["definition"]["name"] = json!(format!("a-{kind}"));
        body["definition"]["scheduler"] = json!(kind);
        let (s, v) = call(&app, Method::PUT, &format!("/api/v1/clusters/a-{kind}"), "admin", Some(&body)).await;
        assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{v:#}");
        let e = v["errors"].as_array().unwrap().iter().find(|e| e["pointer"] == "/definition/scheduler");
        let e = e.unwrap_or_else(|| panic!("no problem at /definition/scheduler: {v:#}"));
        assert!(e["message"].as_str().unwrap().contains(&format!("`{kind}` clusters cannot run yet")), "{v:#}");
        let (s, _) = call(&app, Method::GET, &format!("/api/v1/clusters/a-{kind}"), "admin", None).await;
        assert_eq!(s, StatusCode::NOT_FOUND);
    }
}

// ---------------------------------------------------------------------------------
// Hole 8: a task went `running → pending` between phases
// ---------------------------------------------------------------------------------

/// How far along a task state is: waiting (0), started (1), ended (2).
fn rank(state: &str) -> u8 {
    match state {
        "running" => 1,
        "completed" | "failed" | "cancelled" => 2,
        _ => 0,
    }
}

async fn hole_8_a_started_task_stays_running_while_its_epilog_waits_in_the_queue(t: TestStore) {
    let app = setup(&t).await;
    let task = submit(&app, "alice", "sleep", "local-slurm", json!({ "sleep": 2 })).await;
    let id = task["id"].as_str().unwrap().to_owned();
    // Watch it as a status page does, and keep every state seen on the way.
    let mut seen: Vec<String> = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    let done = loop {
        let now = get_task(&app, "alice", &id).await;
        let state = now["state"].as_str().unwrap().to_owned();
        if seen.last() != Some(&state) {
            seen.push(state);
        }
        if is_final(&now) {
            break now;
        }
        assert!(std::time::Instant::now() < deadline, "the task did not end: {now:#}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(done["state"], "completed", "{done:#}");
    assert!(seen.windows(2).all(|w| rank(&w[0]) <= rank(&w[1])), "the task moved backwards: {seen:?}");
    // The record says the same: every task-state change moves forward.
    let changes: Vec<(String, String)> = events(&done)
        .iter()
        .filter_map(|e| e.strip_prefix("task: "))
        .filter_map(|c| c.split_once(" → ").map(|(a, b)| (a.to_owned(), b.to_owned())))
        .collect();
    assert!(changes.iter().any(|(_, to)| to == "running"), "{:#?}", events(&done));
    assert!(changes.iter().all(|(from, to)| rank(from) <= rank(to)), "{changes:?}");
    // The phases keep their own states for the detail.
    for p in ["prolog", "execute", "epilog"] {
        assert_eq!(phase(&done, p)["state"], "completed", "{done:#}");
    }
}

// ---------------------------------------------------------------------------------
// Hole 9: the portal's own task JSON was refused
// ---------------------------------------------------------------------------------

async fn hole_9_the_portals_example_task_is_accepted_as_the_portal_sends_it(t: TestStore) {
    let app = setup(&t).await;
    let mut rnd01 = cluster_body("local-slurm");
    rnd01["definition"]["name"] = json!("rnd01");
    rnd01["definition"]["portal_ids"] = json!(["59b1302f6eea4a7e979b2c56"]);
    put(&app, "/api/v1/clusters/rnd01", &rnd01).await;
    let mut sleep = crate::mediator::app_body("sleep");
    sleep["files"]["cluster/rnd01"] = sleep["files"]["cluster/local-slurm"].clone();
    put(&app, "/api/v1/applications/sleep", &sleep).await;
    register_key(&app, "alice", "rnd01").await;
    // Exactly as the issue writes the reference gateway's example.
    let body = json!({
        "application": "sleep",
        "cluster": "rnd01",
        "inputs": [
            { "name": "sleep", "type": "int", "value": 20 },
            { "name": "input_files", "type": "file", "files": [{
                "action": "COPY",
                "mods": "----------",
                "path": "/home/hpcgadmin/test",
                "server": { "id": "59b1302f6eea4a7e979b2c56", "name": "rnd01" },
                "size": 42
            }] }
        ]
    });
    let (s, v) = call(&app, Method::POST, "/api/v1/tasks?wait=submitted", "alice", Some(&body)).await;
    assert_eq!(s, StatusCode::CREATED, "the portal's JSON works unchanged: {v:#}");
    let task = &v["data"];
    let said = events(task);
    assert!(
        said.iter().any(|e| e.contains("input file `test`") && e.contains("----------") && e.contains("-r--------")),
        "the raised mode is said, not applied silently: {said:#?}"
    );
    assert_eq!(task["staged"][0]["mode"], "0400", "{task:#}");
    // That file does not exist on this machine: the prolog says so, plainly.
    let id = task["id"].as_str().unwrap();
    let done = wait_for(&app, "alice", id, 60, "the task to end", is_final).await;
    let pro = phase(&done, "prolog");
    assert_eq!(pro["explanation"], "the input file `test` could not be copied into the run directory", "{done:#}");
    assert!(pro["scheduler_message"].as_str().unwrap().contains("No such file or directory"), "{done:#}");
}

crate::for_embedded_and_mongodb!(
    hole_1_safe_on_an_input_is_refused_at_upload_with_its_file_and_line,
    hole_2_a_cancel_landing_while_a_submission_is_in_flight_is_not_undone,
    hole_3_the_monitor_writes_and_announces_nothing_for_jobs_that_did_not_change,
    hole_5_only_a_portal_acts_for_a_user_an_admin_does_not,
    hole_5_a_restart_reruns_the_recorded_scripts_not_a_newer_definition,
    hole_5_a_cluster_that_keeps_failing_is_paused_and_its_tasks_say_so,
    hole_6_a_staged_file_arrives_in_the_run_directory_over_ssh_with_its_mode,
    hole_6_a_copy_the_user_may_not_read_fails_clearly_and_submits_nothing,
    hole_7_a_pbs_cluster_is_refused_at_upload_saying_why_and_an_sge_one_is_taken,
    hole_8_a_started_task_stays_running_while_its_epilog_waits_in_the_queue,
    hole_9_the_portals_example_task_is_accepted_as_the_portal_sends_it,
);

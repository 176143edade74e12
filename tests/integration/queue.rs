//! The queue in front of the clusters, on real Slurm over sshd: licences counted by
//! the engine (never more held than a pool has, checked from Slurm's own start and end
//! times), released when a job ends in any way (cancelled outside hpcforge, lost with
//! its node), a user over their job limit waiting and then running, the queue's order,
//! and a licence Slurm counts too (`--licenses`).
//!
//! The jobs run in the test environment's `shared` partition, whose cores take up to 8
//! jobs each: what limits how many run at once is the engine's count, not this
//! machine's two CPUs.

use std::time::{Duration, Instant};

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::helpers::{TestApp, TestStore};
use crate::mediator::{call, cluster_body, get_task, is_final, job, put, register_key, remote, wait_for};

/// `local-slurm` as `name`, in the shared partition, with `extra` merged into its
/// definition.
fn shared_cluster(name: &str, extra: Value) -> Value {
    let mut body = cluster_body("local-slurm");
    let d = &mut body["definition"];
    d["name"] = json!(name);
    d["defaults"]["partition"] = json!("shared");
    d["defaults"]["memory"] = json!("50M");
    d["limits"]["partitions"] = json!(["shared"]);
    if let (Some(d), Value::Object(extra)) = (d.as_object_mut(), extra) {
        for (k, v) in extra {
            match (d.get_mut(&k), v) {
                (Some(Value::Object(have)), Value::Object(more)) => have.extend(more),
                (_, v) => {
                    d.insert(k, v);
                }
            }
        }
    }
    body
}

/// A one-phase application `name` whose `work` phase runs `script` and holds
/// `licences` while it may run.
fn licensed_app(name: &str, cluster: &str, script: &str, licences: Value) -> Value {
    json!({
        "definition": {
            "name": name,
            "phases": [{ "name": "work" }],
            "resources": { "work": { "walltime": "00:05:00", "licences": licences } },
        },
        "files": { "app_work": script, format!("cluster/{cluster}"): "true\n" }
    })
}

/// A server on `t` with cluster `cluster` (see [`shared_cluster`]) and alice's and
/// bob's keys for it, its server key in `keys`.
async fn setup_keyed(t: &TestStore, cluster: &str, extra: Value, keys: &std::path::Path) -> TestApp {
    let key = keys.join("secret.key");
    let app = crate::helpers::spawn_configured(t.store.clone(), |c| c.secret_key_file = key).await;
    put(&app, &format!("/api/v1/clusters/{cluster}"), &shared_cluster(cluster, extra)).await;
    for user in ["alice", "bob"] {
        register_key(&app, user, cluster).await;
    }
    app
}

/// [`setup_keyed`], with a server key of its own.
async fn setup(t: &TestStore, cluster: &str, extra: Value) -> TestApp {
    let keys = tempfile::tempdir().unwrap();
    setup_keyed(t, cluster, extra, keys.path()).await
}

/// Submits without waiting; the task as created.
async fn post(app: &TestApp, user: &str, application: &str, cluster: &str, priority: Option<i32>) -> Value {
    let mut body = json!({ "application": application, "cluster": cluster, "inputs": {} });
    if let Some(p) = priority {
        body["priority"] = json!(p);
    }
    let (s, v) = call(app, Method::POST, "/api/v1/tasks", user, Some(&body)).await;
    assert_eq!(s, StatusCode::CREATED, "a task that must wait is queued, never refused: {v:#}");
    v["data"].clone()
}

/// Slurm's start and end of each job (seconds since the epoch), from `sacct`.
async fn job_times(jobs: &[String]) -> Vec<(i64, i64)> {
    let list = jobs.join(",");
    let start = Instant::now();
    loop {
        let (code, out) = remote("alice", format!("sacct -a -X -n -P --format=JobID,State,Start,End -j {list}")).await;
        assert_eq!(code, 0, "{out}");
        let parse = |s: &str| {
            time::PrimitiveDateTime::parse(s, &time::format_description::well_known::Iso8601::DEFAULT)
                .ok()
                .map(|t| t.assume_utc().unix_timestamp())
        };
        let rows: Vec<Option<(i64, i64)>> = out
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| {
                let f: Vec<&str> = l.split('|').collect();
                Some((parse(f.get(2)?)?, parse(f.get(3)?)?))
            })
            .collect();
        if rows.len() == jobs.len() && rows.iter().all(Option::is_some) {
            return rows.into_iter().flatten().collect();
        }
        assert!(start.elapsed() < Duration::from_secs(60), "sacct does not know every job yet: {out}");
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// The most intervals that overlap at any moment (an interval ending when another
/// starts does not overlap it).
fn most_at_once(times: &[(i64, i64)]) -> usize {
    let mut edges: Vec<(i64, i32)> = times.iter().flat_map(|(s, e)| [(*s, 1), (*e, -1)]).collect();
    edges.sort();
    let (mut now, mut most) = (0i32, 0i32);
    for (_, d) in edges {
        now += d;
        most = most.max(now);
    }
    most as usize
}

fn said(t: &Value) -> Vec<String> {
    t["events"].as_array().unwrap().iter().filter_map(|e| e["message"].as_str().map(str::to_owned)).collect()
}

async fn resources(app: &TestApp, user: &str) -> Value {
    let (s, v) = call(app, Method::GET, "/api/v1/resources", user, None).await;
    assert_eq!(s, StatusCode::OK, "{v:#}");
    v["data"].clone()
}

fn pool<'a>(r: &'a Value, key: &str) -> &'a Value {
    r["pools"].as_array().unwrap().iter().find(|p| p["key"] == key).unwrap_or_else(|| panic!("no pool {key}: {r:#}"))
}

/// Waits until `key`'s pool has nothing held (the sweep ran after the jobs ended).
async fn wait_released(app: &TestApp, key: &str) -> Value {
    let start = Instant::now();
    loop {
        let r = resources(app, "admin").await;
        if pool(&r, key)["in_use"] == 0 {
            return r;
        }
        assert!(start.elapsed() < Duration::from_secs(60), "{key} still held: {r:#}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// Brings the Slurm node back after a test set it down (it may have come back by
/// itself: the test environment's Slurm returns a node to service when its slurmd
/// registers again).
async fn node_back_up() {
    let start = Instant::now();
    loop {
        let _ = std::process::Command::new("scontrol").args(["update", "nodename=localhost", "state=resume"]).output();
        let out = std::process::Command::new("sinfo").args(["-h", "-n", "localhost", "-o", "%T"]).output().unwrap();
        let state = String::from_utf8_lossy(&out.stdout).to_lowercase();
        if !state.contains("down") && !state.contains("drain") && !state.trim().is_empty() {
            return;
        }
        assert!(start.elapsed() < Duration::from_secs(60), "the node stays {state}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// 30 tasks of two users, each needing one of 5 site-wide licences, submitted through
/// two servers sharing one MongoDB store: none refused, all complete, and Slurm's own
/// times show at most 5 jobs ran at once (and more than this machine's 2 CPUs would
/// allow, so the licences were the limit).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thirty_tasks_needing_one_of_five_licences_never_hold_more_than_five() {
    let t = crate::helpers::store(crate::helpers::Backend::Mongo).await;
    // Replicas of one store share its server key.
    let keys = tempfile::tempdir().unwrap();
    let app = setup_keyed(&t, "queue-slurm", json!({}), keys.path()).await;
    let key = keys.path().join("secret.key");
    let other = crate::helpers::spawn_configured(t.store.clone(), |c| c.secret_key_file = key).await;
    let (s, v) =
        call(&app, Method::PUT, "/api/v1/resources/licences/maya", "admin", Some(&json!({ "count": 5 }))).await;
    assert_eq!(s, StatusCode::OK, "{v:#}");
    let script = "#!/bin/bash\nsleep 4\n";
    put(&app, "/api/v1/applications/modeller", &licensed_app("modeller", "queue-slurm", script, json!({ "maya": 1 })))
        .await;
    let mut ids = Vec::new();
    for i in 0..30 {
        let user = if i % 2 == 0 { "alice" } else { "bob" };
        let through = if i % 3 == 0 { &other } else { &app };
        let task = post(through, user, "modeller", "queue-slurm", None).await;
        ids.push((user, task["id"].as_str().unwrap().to_owned()));
    }
    let mut jobs = Vec::new();
    let mut waited = 0;
    for (user, id) in &ids {
        let done = wait_for(&app, user, id, 300, "every task to complete", is_final).await;
        assert_eq!(done["state"], "completed", "{done:#}");
        let events = said(&done);
        assert!(events.iter().any(|m| m.starts_with("left the queue after")), "{events:#?}");
        if events.iter().any(|m| m.starts_with("queued: waits for 1 maya licence: 5 of 5 in use")) {
            waited += 1;
        }
        jobs.push(job(&done, "work"));
    }
    assert!(waited >= 20, "most tasks waited for a licence ({waited} did)");
    let times = job_times(&jobs).await;
    let most = most_at_once(&times);
    assert!(most <= 5, "{most} jobs held a maya licence at once: {times:?}");
    assert!(most > 2, "the licences, not the CPUs, were the limit: at most {most} at once, {times:?}");
    let r = wait_released(&app, "licence/maya").await;
    assert_eq!(pool(&r, "licence/maya")["count"], 5, "{r:#}");
    // Users see the pool, not who holds it beyond their own tasks.
    let seen = resources(&app, "alice").await;
    assert_eq!(pool(&seen, "licence/maya")["count"], 5);
}

/// A job cancelled with `scancel` outside hpcforge gives its licence back, and the
/// task that waited for it runs; so does a job lost when its node is set down. (Runs
/// alone: setting the node down would kill the other tests' jobs.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_cancelled_outside_or_lost_with_its_node_gives_its_licence_back() {
    let t = crate::helpers::store(crate::helpers::Backend::Embedded).await;
    let app = setup(&t, "reclaim-slurm", json!({})).await;
    call(&app, Method::PUT, "/api/v1/resources/licences/houdini", "admin", Some(&json!({ "count": 1 }))).await;
    let long = "#!/bin/bash\necho started\nsleep 300\n";
    put(&app, "/api/v1/applications/sim", &licensed_app("sim", "reclaim-slurm", long, json!({ "houdini": 1 }))).await;

    let first = post(&app, "alice", "sim", "reclaim-slurm", None).await;
    let first_id = first["id"].as_str().unwrap().to_owned();
    let running = wait_for(&app, "alice", &first_id, 60, "the first job to run", |t| t["state"] == "running").await;
    let second = post(&app, "bob", "sim", "reclaim-slurm", None).await;
    let second_id = second["id"].as_str().unwrap().to_owned();
    let queued = wait_for(&app, "bob", &second_id, 30, "the second task to say what it waits for", |t| {
        t["queue"]["waiting_for"].is_string()
    })
    .await;
    assert_eq!(queued["state"], "queued", "{queued:#}");
    assert_eq!(queued["queue"]["waiting_for"], "1 houdini licence: 1 of 1 in use", "{queued:#}");
    assert_eq!(queued["queue_position"], 1, "{queued:#}");
    let r = resources(&app, "admin").await;
    assert_eq!(pool(&r, "licence/houdini")["holders"][0]["task"], json!(first_id), "{r:#}");

    // Cancelled outside hpcforge.
    let (code, out) = remote("alice", format!("scancel {}", job(&running, "work"))).await;
    assert_eq!(code, 0, "{out}");
    let ended = wait_for(&app, "alice", &first_id, 60, "the cancel to be seen", is_final).await;
    let released = wait_for(&app, "alice", &first_id, 60, "the release event", |t| {
        said(t).iter().any(|m| m.starts_with("released 1 houdini licence held by work"))
    })
    .await;
    assert_eq!(ended["state"], "failed", "cancelled outside hpcforge: {ended:#}");
    let msg = said(&released).into_iter().find(|m| m.starts_with("released")).unwrap();
    assert!(msg.contains(&format!("job {} ended (cancelled)", job(&running, "work"))), "{msg}");

    // The waiting task got the licence and runs; now its node goes down.
    let second_running =
        wait_for(&app, "bob", &second_id, 60, "the second task to run", |t| t["state"] == "running").await;
    assert!(said(&second_running).iter().any(|m| m.starts_with("left the queue after")), "{second_running:#}");
    let third = post(&app, "alice", "sim", "reclaim-slurm", None).await;
    let third_id = third["id"].as_str().unwrap().to_owned();
    wait_for(&app, "alice", &third_id, 30, "the third task to wait", |t| t["queue"]["waiting_for"].is_string()).await;
    // The test environment's Slurm is administered by root, as the tests run.
    let down = std::process::Command::new("scontrol")
        .args(["update", "nodename=localhost", "state=down", "reason=hpcforge-queue-test"])
        .output()
        .expect("scontrol runs");
    assert!(down.status.success(), "setting the node down: {}", String::from_utf8_lossy(&down.stderr));
    let lost = wait_for(&app, "bob", &second_id, 90, "the job lost with its node to end", is_final).await;
    node_back_up().await;
    assert_eq!(crate::mediator::phase(&lost, "work")["state"], "node_fail", "{lost:#}");
    let released = wait_for(&app, "bob", &second_id, 60, "the release event", |t| {
        said(t).iter().any(|m| m.starts_with("released 1 houdini licence held by work"))
    })
    .await;
    assert!(said(&released).iter().any(|m| m.contains("ended (node_fail)")), "{released:#}");
    let third_done = wait_for(&app, "alice", &third_id, 90, "the third task to run", |t| t["state"] == "running").await;
    let (s, _) = call(&app, Method::DELETE, &format!("/api/v1/tasks/{third_id}"), "alice", None).await;
    assert_eq!(s, StatusCode::ACCEPTED);
    wait_for(&app, "alice", &third_id, 60, "the cancel", is_final).await;
    wait_released(&app, "licence/houdini").await;
    assert!(said(&third_done).iter().any(|m| m.starts_with("left the queue")));
}

/// A user over their job limit waits, then runs; another user's tasks are not held
/// behind them; a task its user lowered the priority of goes after those that were
/// queued later; an admin can release a holder by hand, and it is recorded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_over_their_job_limit_waits_then_runs_in_priority_order() {
    let t = crate::helpers::store(crate::helpers::Backend::Embedded).await;
    let app = setup(&t, "limit-slurm", json!({ "limits": { "jobs_per_user": 2 } })).await;
    put(&app, "/api/v1/applications/nap", &licensed_app("nap", "limit-slurm", "#!/bin/bash\nsleep 5\n", json!({})))
        .await;
    // Raising one's own priority is for admins.
    let body = json!({ "application": "nap", "cluster": "limit-slurm", "inputs": {}, "priority": 5 });
    let (s, v) = call(&app, Method::POST, "/api/v1/tasks", "alice", Some(&body)).await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{v:#}");
    assert_eq!(v["errors"][0]["pointer"], "/priority", "{v:#}");

    let mut alice = Vec::new();
    for i in 0..5 {
        // The third is lowered: the fourth and fifth go before it.
        let task = post(&app, "alice", "nap", "limit-slurm", (i == 2).then_some(-5)).await;
        alice.push(task["id"].as_str().unwrap().to_owned());
    }
    let bob = post(&app, "bob", "nap", "limit-slurm", None).await;
    let bob_id = bob["id"].as_str().unwrap().to_owned();
    let waiting = wait_for(&app, "alice", &alice[3], 30, "alice's fourth task to wait", |t| {
        t["queue"]["waiting_for"].is_string()
    })
    .await;
    assert_eq!(
        waiting["queue"]["waiting_for"], "alice has 2 of 2 jobs on cluster limit-slurm (this task needs 1 more)",
        "{waiting:#}"
    );
    // Bob is not behind alice.
    let bobs = wait_for(&app, "bob", &bob_id, 60, "bob's task to run", |t| {
        matches!(t["state"].as_str(), Some("pending" | "running" | "completed"))
    })
    .await;
    assert!(bobs["queue"].is_null(), "{bobs:#}");

    let mut jobs = Vec::new();
    for id in &alice {
        let done = wait_for(&app, "alice", id, 240, "alice's tasks to complete", is_final).await;
        assert_eq!(done["state"], "completed", "{done:#}");
        jobs.push(job(&done, "work"));
    }
    let times = job_times(&jobs).await;
    assert!(most_at_once(&times) <= 2, "alice never had more than 2 jobs: {times:?}");
    // Job IDs rise with submission: the lowered task was submitted after the two
    // queued behind it.
    let n: Vec<u64> = jobs.iter().map(|j| j.parse().unwrap()).collect();
    assert!(n[2] > n[3] && n[2] > n[4], "the lowered task went last: {jobs:?}");
    let r = wait_released(&app, "jobs/limit-slurm/alice").await;
    assert_eq!(pool(&r, "jobs/limit-slurm/alice")["count"], 2, "{r:#}");
    // Alice sees her own share, not bob's.
    let seen = resources(&app, "alice").await;
    assert!(seen["pools"].as_array().unwrap().iter().all(|p| p["user"] != "bob"), "{seen:#}");

    // A holder released by hand (here: a task still running).
    let task = post(&app, "alice", "nap", "limit-slurm", None).await;
    let id = task["id"].as_str().unwrap().to_owned();
    wait_for(&app, "alice", &id, 60, "it to be submitted", |t| t["state"] != "queued" && t["state"] != "submitting")
        .await;
    let body = json!({ "pool": "jobs/limit-slurm/alice", "task": id });
    let (s, v) = call(&app, Method::POST, "/api/v1/resources/release", "alice", Some(&body)).await;
    assert_eq!(s, StatusCode::FORBIDDEN, "admins only: {v:#}");
    let (s, v) = call(&app, Method::POST, "/api/v1/resources/release", "admin", Some(&body)).await;
    assert_eq!(s, StatusCode::OK, "{v:#}");
    let r = resources(&app, "admin").await;
    let notes = pool(&r, "jobs/limit-slurm/alice")["notes"].clone();
    assert!(notes.as_array().unwrap().iter().any(|n| n["by"] == "admin"), "{notes:#}");
    let t = get_task(&app, "alice", &id).await;
    assert!(said(&t).iter().any(|m| m.starts_with("admin released 1 of alice's job slots")), "{t:#}");
    let (s, _) = call(&app, Method::POST, "/api/v1/resources/release", "admin", Some(&body)).await;
    assert_eq!(s, StatusCode::NOT_FOUND, "released once");
}

/// A licence Slurm counts too: the job asks for it (`--licenses`), so both counts agree.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_licence_slurm_counts_too_is_asked_for_with_the_job() {
    let t = crate::helpers::store(crate::helpers::Backend::Embedded).await;
    let extra = json!({ "licences": { "fluent": { "count": 3, "scheduler": "fluent" } } });
    let app = setup(&t, "fluent-slurm", extra).await;
    put(
        &app,
        "/api/v1/applications/cfd",
        &licensed_app("cfd", "fluent-slurm", "#!/bin/bash\nsleep 2\n", json!({ "fluent": 2 })),
    )
    .await;
    let task = post(&app, "alice", "cfd", "fluent-slurm", None).await;
    let id = task["id"].as_str().unwrap().to_owned();
    let submitted =
        wait_for(&app, "alice", &id, 60, "its job", |t| crate::mediator::phase(t, "work")["job_id"].is_string()).await;
    let (code, out) = remote("alice", format!("scontrol show job {}", job(&submitted, "work"))).await;
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("Licenses=fluent:2"), "{out}");
    let done = wait_for(&app, "alice", &id, 90, "it to complete", is_final).await;
    assert_eq!(done["state"], "completed", "{done:#}");
    let r = wait_released(&app, "licence/fluent-slurm/fluent").await;
    assert_eq!(pool(&r, "licence/fluent-slurm/fluent")["count"], 3, "the cluster's own pool: {r:#}");
    // Asking for more than the cluster has in all can never start: refused at once;
    // so is a licence nobody offers.
    for (name, licences) in [("greedy", json!({ "fluent": 4 })), ("nowhere", json!({ "ansys": 1 }))] {
        let body = licensed_app(name, "fluent-slurm", "#!/bin/bash\ntrue\n", licences);
        put(&app, &format!("/api/v1/applications/{name}"), &body).await;
        let body = json!({ "application": name, "cluster": "fluent-slurm", "inputs": {} });
        let (s, v) = call(&app, Method::POST, "/api/v1/tasks", "alice", Some(&body)).await;
        assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{v:#}");
        assert_eq!(v["errors"][0]["pointer"], "/cluster", "{v:#}");
        let said = v["errors"][0]["message"].as_str().unwrap();
        assert!(said.contains("so the task could never start"), "{said}");
    }
}

/// A licence Grid Engine counts too (a consumable complex the test environment
/// defines, 3 on the global host): the job asks for it (`-l fluent=2`), and Grid
/// Engine holds it while the job runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_licence_grid_engine_counts_too_is_asked_for_with_the_job() {
    let t = crate::helpers::store(crate::helpers::Backend::Embedded).await;
    let keys = tempfile::tempdir().unwrap();
    let app = crate::helpers::spawn_configured(t.store.clone(), |c| c.secret_key_file = keys.path().join("k")).await;
    let mut cluster = cluster_body("local-sge");
    cluster["definition"]["name"] = json!("fluent-sge");
    cluster["definition"]["licences"] = json!({ "fluent": { "count": 3, "scheduler": "fluent" } });
    put(&app, "/api/v1/clusters/fluent-sge", &cluster).await;
    register_key(&app, "alice", "fluent-sge").await;
    put(
        &app,
        "/api/v1/applications/cfd-sge",
        &licensed_app("cfd-sge", "fluent-sge", "#!/bin/bash\nsleep 8\n", json!({ "fluent": 2 })),
    )
    .await;
    let task = post(&app, "alice", "cfd-sge", "fluent-sge", None).await;
    let id = task["id"].as_str().unwrap().to_owned();
    let submitted =
        wait_for(&app, "alice", &id, 60, "its job", |t| crate::mediator::phase(t, "work")["job_id"].is_string()).await;
    let (code, out) = remote("alice", format!("qstat -j {}", job(&submitted, "work"))).await;
    assert_eq!(code, 0, "{out}");
    let asked = out.lines().find(|l| l.contains("resource_list")).unwrap_or_default();
    assert!(asked.contains("fluent=2"), "the job asks Grid Engine for the licences: {out}");
    // While it runs, Grid Engine has 1 of its 3 left.
    let start = Instant::now();
    loop {
        let (_, free) = remote("alice", "qstat -F fluent -q all.q".into()).await;
        if free.contains("gc:fluent=1") {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(30), "Grid Engine never counted the job's licences: {free}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let done = wait_for(&app, "alice", &id, 120, "it to complete", is_final).await;
    assert_eq!(done["state"], "completed", "{done:#}");
    wait_released(&app, "licence/fluent-sge/fluent").await;
}

/// `sleep` with a cluster environment for `clusters` too.
fn sleep_on(clusters: &[&str]) -> Value {
    let mut body = crate::mediator::variant("sleep", &[]);
    body["definition"]["resources"] = json!({ "default": { "walltime": "00:10:00" } });
    for c in clusters {
        body["files"][format!("cluster/{c}")] = json!("true\n");
    }
    body
}

/// Workspaces of the site's tool (the test environment's stand-in for hpc-workspace):
/// a task's run directory is made in its user's workspace; one about to expire with
/// no extension left raises a warning on the task; a task whose wall time would
/// outlast it is refused; one with extensions left is extended when few days remain.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_directories_live_in_workspaces_that_are_extended_and_warned_about() {
    let t = crate::helpers::store(crate::helpers::Backend::Embedded).await;
    let app = crate::helpers::spawn_configured(t.store.clone(), |_| {}).await;
    // A workspace with a day left and no extensions: made by hand as alice.
    let (code, out) = remote(
        "alice",
        "ws_release near 2>/dev/null; ws_release roomy 2>/dev/null; \
         ws_allocate near 1 && ws_extend near 1 && ws_extend near 1 && ws_extend near 1 && ws_list"
            .into(),
    )
    .await;
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("available extensions : 0"), "{out}");
    let near = json!({ "workspace": { "id": "near", "days": 10, "extend_days": 2, "warn_days": 3 } });
    let roomy = json!({ "workspace": { "id": "roomy", "days": 10, "extend_days": 20, "warn_days": 3 } });
    for (name, extra) in [("ws-near", near), ("ws-roomy", roomy)] {
        let mut body = cluster_body("local-slurm");
        body["definition"]["name"] = json!(name);
        if let (Some(d), Value::Object(extra)) = (body["definition"].as_object_mut(), extra) {
            d.extend(extra);
        }
        put(&app, &format!("/api/v1/clusters/{name}"), &body).await;
        register_key(&app, "alice", name).await;
    }
    put(&app, "/api/v1/applications/sleep", &sleep_on(&["ws-near", "ws-roomy"])).await;

    let body = json!({ "application": "sleep", "cluster": "ws-near", "inputs": { "sleep": 1 } });
    let (s, v) = call(&app, Method::POST, "/api/v1/tasks", "alice", Some(&body)).await;
    assert_eq!(s, StatusCode::CREATED, "{v:#}");
    let task = &v["data"];
    let id = task["id"].as_str().unwrap().to_owned();
    let ws = &task["workspace"];
    let path = ws["path"].as_str().unwrap();
    assert!(path.ends_with("/alice-near"), "{ws:#}");
    assert_eq!(task["run_dir"], json!(format!("{path}/{id}")), "{task:#}");
    assert_eq!(ws["extensions"], 0, "{ws:#}");
    let said = said(task);
    let warning =
        said.iter().find(|m| m.starts_with("warning: workspace `near`")).unwrap_or_else(|| panic!("{said:#?}"));
    assert!(warning.contains("no extensions are left") && warning.contains("expires in 23 hours"), "{warning}");
    let done = wait_for(&app, "alice", &id, 120, "the task in the workspace to complete", is_final).await;
    assert_eq!(done["state"], "completed", "{done:#}");
    let (code, out) = remote("alice", format!("ls {path}/{id}")).await;
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("execute-"), "its run directory is in the workspace: {out}");

    // Two days of wall time would outlast it: refused, saying why.
    let mut long = sleep_on(&["ws-near"]);
    long["definition"]["name"] = json!("long-sleep");
    long["definition"]["resources"] = json!({ "default": { "walltime": "2-00:00:00" } });
    put(&app, "/api/v1/applications/long-sleep", &long).await;
    let body = json!({ "application": "long-sleep", "cluster": "ws-near", "inputs": {} });
    let (s, v) = call(&app, Method::POST, "/api/v1/tasks", "alice", Some(&body)).await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{v:#}");
    assert_eq!(v["errors"][0]["pointer"], "/cluster", "{v:#}");
    assert!(v.to_string().contains("before the task's"), "{v:#}");

    // With extensions left and fewer days than the cluster wants: extended.
    let body = json!({ "application": "sleep", "cluster": "ws-roomy", "inputs": { "sleep": 1 } });
    let (s, v) = call(&app, Method::POST, "/api/v1/tasks", "alice", Some(&body)).await;
    assert_eq!(s, StatusCode::CREATED, "{v:#}");
    let said = self::said(&v["data"]);
    assert!(said.iter().any(|m| m.starts_with("workspace `roomy` extended")), "{said:#?}");
    assert_eq!(v["data"]["workspace"]["extensions"], 2, "{v:#}");
    let rid = v["data"]["id"].as_str().unwrap().to_owned();
    let ended = wait_for(&app, "alice", &rid, 120, "the task to complete", is_final).await;
    assert!(!self::said(&ended).iter().any(|m| m.starts_with("warning:")), "nothing near yet: {ended:#}");

    // Its task has ended, its results are in the workspace, and the days go by: both
    // the stand-in's record of the expiry and the task's are moved closer, as time
    // would move them. First the user extended it by hand meanwhile (ws_list says 5
    // days): the new date is recorded, nobody is warned.
    let set_expiry = async |recorded: i64, actual: i64| {
        let (code, out) = remote(
            "alice",
            format!(
                "sed -i 's/^expiration=.*/expiration={actual}/' /var/tmp/hpcforge-ws/.db/scratch:alice-roomy && ws_list"
            ),
        )
        .await;
        assert_eq!(code, 0, "{out}");
        let task_id: hpcforge::model::TaskId = rid.parse().unwrap();
        let before = t.store.task_state(&task_id).await.unwrap().unwrap();
        let mut after = before.clone();
        after.workspace.as_mut().unwrap().expires_at = time::OffsetDateTime::from_unix_timestamp(recorded).unwrap();
        t.store.update_task(&before, &after).await.unwrap();
    };
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let (soon, later) = (now + 12 * 3600, now + 5 * 86400);
    set_expiry(soon, later).await;
    let expiry = |t: &Value| {
        time::OffsetDateTime::parse(
            t["workspace"]["expires_at"].as_str().unwrap(),
            &time::format_description::well_known::Rfc3339,
        )
        .unwrap()
        .unix_timestamp()
    };
    let seen = wait_for(&app, "alice", &rid, 120, "the extended date to be recorded", |t| expiry(t) == later).await;
    assert!(!self::said(&seen).iter().any(|m| m.starts_with("warning:")), "{seen:#}");
    // Then it really expires in 12 hours: its owner is warned, once.
    set_expiry(soon, soon).await;
    let warned = wait_for(&app, "alice", &rid, 120, "the owner of the ended task to be warned", |t| {
        self::said(t).iter().any(|m| m.starts_with("warning: workspace `roomy`"))
    })
    .await;
    let said = self::said(&warned);
    let warning = said.iter().find(|m| m.starts_with("warning: workspace `roomy`")).unwrap();
    assert!(warning.contains("expires in 11 hours") || warning.contains("expires in 12 hours"), "{warning}");
    assert!(warning.contains("the task has ended; its results are there"), "{warning}");
    assert_eq!(expiry(&warned), soon, "{warned:#}");
    // Once per date: a later look says nothing more.
    tokio::time::sleep(Duration::from_secs(8)).await;
    let again = get_task(&app, "alice", &rid).await;
    let n = self::said(&again).iter().filter(|m| m.starts_with("warning: workspace `roomy`")).count();
    assert_eq!(n, 1, "{again:#}");
}

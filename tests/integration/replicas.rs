//! Servers sharing one store, as replicas (issue 10): each holds a lease on its
//! replica ID while it runs; `/api/v1/replicas` shows who is alive; a second server
//! with a live replica's ID is refused; one killed outright gives its ID up when its
//! lease lapses.

use std::time::{Duration, Instant};

use reqwest::{Method, StatusCode};
use serde_json::Value;

use crate::helpers::{Server, TestStore, spawn_configured, test_env};
use crate::mediator::call;

fn replica<'a>(list: &'a Value, id: &str) -> &'a Value {
    list["data"].as_array().unwrap().iter().find(|r| r["id"] == id).unwrap_or_else(|| panic!("no {id}: {list:#}"))
}

/// Replicas of one site: one server key file for all, as `Running N replicas` in
/// docs/architecture.md asks.
struct Keys(tempfile::TempDir);

impl Keys {
    fn new() -> Keys {
        Keys(tempfile::tempdir().unwrap())
    }

    /// The configuration of replica `id`, changed further by `more`.
    fn replica<F: FnOnce(&mut hpcforge::config::ServeConfig)>(
        &self,
        id: &str,
        more: F,
    ) -> impl FnOnce(&mut hpcforge::config::ServeConfig) + use<F> {
        let (id, key) = (id.to_owned(), self.0.path().join("secret.key"));
        move |c: &mut hpcforge::config::ServeConfig| {
            c.mediator.replica = id;
            c.secret_key_file = key;
            more(c);
        }
    }
}

async fn replicas_on_one_store_see_each_other_and_a_stopped_one_is_gone_at_once(t: TestStore) {
    let one = spawn_configured(t.store.clone(), |c| c.mediator.replica = "replica-one".into()).await;
    let two = spawn_configured(t.store.clone(), |c| c.mediator.replica = "replica-two".into()).await;
    let (s, list) = call(&one, Method::GET, "/api/v1/replicas", "admin", None).await;
    assert_eq!(s, StatusCode::OK, "{list:#}");
    assert_eq!(list["message"], "2 replicas alive; this is `replica-one`", "{list:#}");
    for id in ["replica-one", "replica-two"] {
        let r = replica(&list, id);
        assert_eq!((r["alive"].as_bool(), r["starts"].as_u64()), (Some(true), Some(1)), "{list:#}");
    }
    let (s, _) = call(&two, Method::GET, "/api/v1/replicas", "alice", None).await;
    assert_eq!(s, StatusCode::FORBIDDEN, "admins only");
    // /metrics on either replica tells the same.
    let metrics = two.req(Method::GET, "/metrics", "admin").await.send().await.unwrap().text().await.unwrap();
    let mut held = 0;
    for id in ["replica-one", "replica-two"] {
        assert!(metrics.contains(&format!("hpcforge_replica_up{{replica=\"{id}\"}} 1\n")), "{metrics}");
        let line = format!("hpcforge_replica_leases_held{{replica=\"{id}\"}} ");
        let n: u32 = metrics.lines().find_map(|l| l.strip_prefix(line.as_str())).unwrap().parse().unwrap();
        held += n;
    }
    // With no task, the only work either holds is the look at the queue (one of them).
    assert!(held <= 1, "{metrics}");
    // A third server taking a live replica's ID waits out one lease, then is refused.
    let dir = tempfile::tempdir().unwrap();
    let mut config = crate::helpers::test_config(dir.path());
    config.mediator.replica = "replica-one".into();
    let started = Instant::now();
    let refused = hpcforge::server::Server::build_on(&config, t.store.clone()).await.unwrap_err();
    let said = format!("{refused:#}");
    assert!(said.contains("another server is running as replica `replica-one` on this store"), "{said}");
    assert!(started.elapsed() >= hpcforge::mediator::replicas::REPLICA_LEASE, "it waited out one lease first");
    // A graceful stop releases the lease: gone at once, not after it lapses.
    drop(two);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, list) = call(&one, Method::GET, "/api/v1/replicas", "admin", None).await;
        if replica(&list, "replica-two")["alive"] == false {
            assert_eq!(list["message"], "1 replica alive; this is `replica-one`", "{list:#}");
            break;
        }
        assert!(Instant::now() < deadline, "replica-two still shown alive after it stopped: {list:#}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Two replicas on one store, with alice's jobs watched by one and bob's by the other
/// (replica IDs chosen so): each asks its scheduler about its own group only, once a
/// tick; once the second stops, the first watches bob's task to its end.
async fn each_users_jobs_are_watched_by_one_replica_and_a_stopped_ones_by_another(t: TestStore) {
    use hpcforge::mediator::replicas::watcher_of;
    let keys = Keys::new();
    let names: Vec<String> = (0..40).map(|i| format!("watch-{i}")).collect();
    let (r1, r2) = names
        .iter()
        .flat_map(|a| names.iter().map(move |b| (a.as_str(), b.as_str())))
        .find(|&(a, b)| {
            a != b
                && watcher_of(&[a, b], "local-slurm", "alice") == Some(a)
                && watcher_of(&[a, b], "local-slurm", "bob") == Some(b)
        })
        .unwrap();
    let config = |id: &str| keys.replica(id, |c| c.mediator.tick = Duration::from_secs(1));
    let one = crate::mediator::setup_with(&t, config(r1)).await;
    let two = spawn_configured(t.store.clone(), config(r2)).await;
    let alice =
        crate::mediator::submit(&one, "alice", "sleep", "local-slurm", serde_json::json!({ "sleep": 300 })).await;
    let bob = crate::mediator::submit(&two, "bob", "sleep", "local-slurm", serde_json::json!({ "sleep": 20 })).await;
    let (alice, bob) = (alice["id"].as_str().unwrap().to_owned(), bob["id"].as_str().unwrap().to_owned());
    let running = |t: &Value| crate::mediator::phase(t, "execute")["state"] == "running";
    crate::mediator::wait_for(&one, "alice", &alice, 120, "alice's execute to run", running).await;
    crate::mediator::wait_for(&two, "bob", &bob, 120, "bob's execute to run", running).await;
    // Both know of each other after one renewal (they re-read who is alive every 5 s).
    tokio::time::sleep(Duration::from_secs(6)).await;
    let status = |app: &crate::helpers::TestApp| app.state.metrics.cluster_scripts("status");
    let (s1, s2) = (status(&one), status(&two));
    tokio::time::sleep(Duration::from_secs(6)).await;
    let (d1, d2) = (status(&one) - s1, status(&two) - s2);
    // One group a tick each (about 6); a replica asking about both groups makes 12.
    assert!((3..=9).contains(&d1) && (3..=9).contains(&d2), "status scripts in 6 s: {r1} {d1}, {r2} {d2}");
    drop(two);
    let done =
        crate::mediator::wait_for(&one, "bob", &bob, 90, "bob's task to end, watched by the replica left", |t| {
            crate::mediator::is_final(t)
        })
        .await;
    assert_eq!(done["state"], "completed", "{done:#}");
    let (s, v) = call(&one, Method::DELETE, &format!("/api/v1/tasks/{alice}"), "alice", None).await;
    assert_eq!(s, StatusCode::ACCEPTED, "{v}");
    crate::mediator::wait_for(&one, "alice", &alice, 60, "alice's task to end", crate::mediator::is_final).await;
}

/// A task's URI (`hpcforge://<site>/tasks/<id>`) is in its representation, in lists,
/// and is taken wherever an ID is, by every replica of the site: shown and cancelled
/// through another replica than the one that took it; a URI of another site is refused
/// naming both sites.
async fn a_task_is_known_by_its_uri_on_every_replica_of_its_site(t: TestStore) {
    let keys = Keys::new();
    let config =
        |id: &str| keys.replica(id, |c| c.mediator.site = hpcforge::model::SiteId::parse("hpc.example.org").unwrap());
    let one = crate::mediator::setup_with(&t, config("uri-one")).await;
    let two = spawn_configured(t.store.clone(), config("uri-two")).await;
    let task =
        crate::mediator::submit(&one, "alice", "sleep", "local-slurm", serde_json::json!({ "sleep": 300 })).await;
    let id = task["id"].as_str().unwrap().to_owned();
    let uri = format!("hpcforge://hpc.example.org/tasks/{id}");
    assert_eq!(task["uri"], uri, "{task:#}");
    let encoded = uri.replace(':', "%3A").replace('/', "%2F");
    let (s, v) = call(&two, Method::GET, &format!("/api/v1/tasks/{encoded}"), "alice", None).await;
    assert_eq!((s, &v["data"]["id"]), (StatusCode::OK, &Value::from(id.clone())), "{v:#}");
    let (s, v) = call(&two, Method::GET, "/api/v1/tasks?limit=5", "alice", None).await;
    assert_eq!(s, StatusCode::OK, "{v:#}");
    assert!(v["data"]["tasks"].as_array().unwrap().iter().any(|t| t["uri"] == uri), "{v:#}");
    let elsewhere = format!("hpcforge%3A%2F%2Fother-site%2Ftasks%2F{id}");
    let (s, v) = call(&two, Method::GET, &format!("/api/v1/tasks/{elsewhere}"), "alice", None).await;
    assert_eq!(s, StatusCode::NOT_FOUND, "{v:#}");
    assert!(v["message"].as_str().unwrap().contains("site `other-site`; this is site `hpc.example.org`"), "{v:#}");
    let (s, v) = call(&two, Method::GET, &format!("/api/v1/tasks/{encoded}"), "bob", None).await;
    assert_eq!(s, StatusCode::NOT_FOUND, "bob does not see alice's task by its URI either: {v:#}");
    let (s, v) = call(&two, Method::DELETE, &format!("/api/v1/tasks/{encoded}"), "alice", None).await;
    assert_eq!(s, StatusCode::ACCEPTED, "{v:#}");
    let done =
        crate::mediator::wait_for(&one, "alice", &id, 60, "the cancel to settle", crate::mediator::is_final).await;
    assert_eq!(done["state"], "cancelled", "{done:#}");
}

/// A cluster paused by one replica after repeated failures is paused for every
/// replica (the pause is a lease in the store, read at every renewal): a task sent to
/// another replica is blocked by the pause, without trying the cluster itself.
async fn a_cluster_paused_by_one_replica_is_paused_for_every_replica(t: TestStore) {
    use crate::mediator::{cluster_body, phase, put, register_key, variant};
    let keys = Keys::new();
    let one = crate::mediator::setup_with(&t, keys.replica("pause-one", |_| {})).await;
    let mut flaky = cluster_body("local-slurm");
    flaky["definition"]["name"] = serde_json::json!("flaky");
    flaky["definition"]["port"] = serde_json::json!(1);
    flaky["definition"]["run_dir_base"] = serde_json::json!("/home/{user}/hpcforge");
    put(&one, "/api/v1/clusters/flaky", &flaky).await;
    register_key(&one, "alice", "flaky").await;
    put(&one, "/api/v1/applications/sleepy", &variant("sleepy", &[("cluster/flaky", "true\n")])).await;
    let two = spawn_configured(t.store.clone(), keys.replica("pause-two", |_| {})).await;
    // Five refused connections through replica one pause the cluster there.
    for _ in 0..5 {
        let task = crate::mediator::submit(&one, "alice", "sleepy", "flaky", serde_json::json!({ "sleep": 1 })).await;
        assert_eq!(task["state"], "blocked", "{task:#}");
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, list) = call(&two, Method::GET, "/api/v1/replicas", "admin", None).await;
        if replica(&list, "pause-one")["holds"].as_array().unwrap().contains(&Value::from("pause/flaky")) {
            break;
        }
        assert!(Instant::now() < deadline, "replica one holds no pause of `flaky`: {list:#}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Replica two reads the pause at its next renewal (within 5 s).
    tokio::time::sleep(Duration::from_secs(6)).await;
    let task = crate::mediator::submit(&two, "alice", "sleepy", "flaky", serde_json::json!({ "sleep": 1 })).await;
    assert_eq!(task["state"], "blocked", "{task:#}");
    let reason = phase(&task, "prolog")["reason"].as_str().unwrap().to_owned();
    assert!(reason.contains("cluster `flaky` is paused after repeated failures"), "{reason}: {task:#}");
}

/// A status page connected to one replica sees, within moments, a task created and
/// then cancelled through another: the store's change stream brings the news (the
/// fallback, reading the store every 5 s, would take up to 5 s).
async fn a_status_page_on_one_replica_sees_changes_made_through_another_at_once(t: TestStore) {
    use crate::portal::read_events;
    let keys = Keys::new();
    let one = crate::mediator::setup_with(&t, keys.replica("events-one", |_| {})).await;
    let two = spawn_configured(t.store.clone(), keys.replica("events-two", |_| {})).await;
    let mut page = two.req(Method::GET, "/api/v1/tasks/stream", "alice").await.send().await.unwrap();
    assert_eq!(page.status(), StatusCode::OK);
    // Let the stream send what exists (nothing yet) and settle into waiting.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let body = serde_json::json!({ "application": "sleep", "cluster": "local-slurm", "inputs": { "sleep": 300 } });
    let asked = Instant::now();
    let (s, v) = call(&one, Method::POST, "/api/v1/tasks", "alice", Some(&body)).await;
    assert_eq!(s, StatusCode::CREATED, "{v:#}");
    let id = v["data"]["id"].as_str().unwrap().to_owned();
    let about = |e: &crate::portal::Sse, state: Option<&str>| {
        let v: Value = serde_json::from_str(&e.data).unwrap_or_default();
        e.event == "task" && v["id"] == id.as_str() && state.is_none_or(|s| v["state"] == s)
    };
    read_events(&mut page, 10, |e| about(e, None)).await;
    let created = asked.elapsed();
    crate::mediator::wait_for(&one, "alice", &id, 120, "execute to run", |t| {
        crate::mediator::phase(t, "execute")["state"] == "running"
    })
    .await;
    let (s, v) = call(&one, Method::DELETE, &format!("/api/v1/tasks/{id}"), "alice", None).await;
    assert_eq!(s, StatusCode::ACCEPTED, "{v:#}");
    let cancelled_at = Instant::now();
    crate::mediator::wait_for(&one, "alice", &id, 60, "the cancel to settle", crate::mediator::is_final).await;
    let settled = cancelled_at.elapsed();
    read_events(&mut page, 30, |e| about(e, Some("cancelled"))).await;
    let seen = cancelled_at.elapsed();
    println!("created through one, seen on two after {created:?}; cancelled after {settled:?}, seen after {seen:?}");
    assert!(created < Duration::from_secs(3), "the new task reached the other replica's page after {created:?}");
    assert!(
        seen < settled + Duration::from_secs(3),
        "the cancel reached the page {:?} after it settled",
        seen - settled
    );
}

/// A user's limits hold across replicas: three submissions allowed at once, spread
/// over two replicas, and the fourth is refused by either with Retry-After; one event
/// stream allowed, open on one replica, and a second on the other is refused until
/// the first closes.
async fn a_users_limits_hold_for_all_replicas_together(t: TestStore) {
    let limits =
        hpcforge::api::limits::RateConfig { submissions_per_minute: 6, submission_burst: 3, streams_per_user: 1 };
    let keys = Keys::new();
    let config = |id: &str| keys.replica(id, |c| c.rate = limits);
    let one = crate::mediator::setup_with(&t, config("limits-one")).await;
    let two = spawn_configured(t.store.clone(), config("limits-two")).await;
    let body = serde_json::json!({ "application": "sleep", "cluster": "local-slurm", "inputs": { "sleep": 1 } });
    for app in [&one, &two, &one] {
        let (s, v) = call(app, Method::POST, "/api/v1/tasks", "alice", Some(&body)).await;
        assert_eq!(s, StatusCode::CREATED, "{v:#}");
    }
    for app in [&two, &one] {
        let resp = app.req(Method::POST, "/api/v1/tasks", "alice").await.json(&body).send().await.unwrap();
        assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS, "the fourth, on either replica");
        let wait: u64 = resp.headers()["retry-after"].to_str().unwrap().parse().unwrap();
        assert!((1..=60).contains(&wait), "{wait}");
    }
    // Bob has his own count.
    let (s, v) = call(&two, Method::POST, "/api/v1/tasks", "bob", Some(&body)).await;
    assert_eq!(s, StatusCode::CREATED, "{v:#}");
    let first = one.req(Method::GET, "/api/v1/tasks/stream", "alice").await.send().await.unwrap();
    assert_eq!(first.status(), StatusCode::OK);
    let second = two.req(Method::GET, "/api/v1/tasks/stream", "alice").await.send().await.unwrap();
    assert_eq!(second.status(), StatusCode::TOO_MANY_REQUESTS, "the slot is held on the other replica");
    drop((first, second));
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let again = two.req(Method::GET, "/api/v1/tasks/stream", "alice").await.send().await.unwrap();
        if again.status() == StatusCode::OK {
            break;
        }
        assert_eq!(again.status(), StatusCode::TOO_MANY_REQUESTS);
        assert!(Instant::now() < deadline, "the closed stream's slot was not given back within 10 s");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A token revoked, or an account disabled, through one replica stops working on
/// another within the stated bound: the token check cache, `auth::CACHE_TTL` (10 s).
async fn a_revoked_token_and_a_disabled_account_stop_working_on_every_replica_within_the_bound(t: TestStore) {
    let one = spawn_configured(t.store.clone(), |c| c.mediator.replica = "tokens-one".into()).await;
    let two = spawn_configured(t.store.clone(), |c| c.mediator.replica = "tokens-two".into()).await;
    let bound = hpcforge::auth::CACHE_TTL + Duration::from_secs(1);
    let tokens = [("dora", two.token("dora").await), ("erin", two.token("erin").await)];
    let me = |token: String| {
        let (http, base) = (two.http.clone(), two.base.clone());
        async move { http.get(format!("{base}/api/v1/me")).bearer_auth(token).send().await.unwrap() }
    };
    // Both tokens are checked (and cached) on replica two first.
    for (_, token) in &tokens {
        assert_eq!(me(token.clone()).await.status(), StatusCode::OK);
    }
    let (s, v) = call(&two, Method::GET, "/api/v1/me", "dora", None).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let id = v["data"]["token"].as_str().unwrap().to_owned();
    // Through replica one: dora's token revoked, erin's account disabled.
    let admin = two.token("admin").await;
    let revoke = one.http.delete(format!("{}/api/v1/users/dora/tokens/{id}", one.base)).bearer_auth(&admin);
    assert_eq!(revoke.send().await.unwrap().status(), StatusCode::OK);
    let disable = one.http.delete(format!("{}/api/v1/users/erin", one.base)).bearer_auth(&admin);
    assert_eq!(disable.send().await.unwrap().status(), StatusCode::OK);
    let done = Instant::now();
    for ((user, token), says) in tokens.iter().zip(["was revoked at", "user `erin` is disabled"]) {
        loop {
            let resp = me(token.clone()).await;
            if resp.status() == StatusCode::UNAUTHORIZED {
                let v: Value = resp.json().await.unwrap();
                assert!(v["message"].as_str().unwrap().contains(says), "{v}");
                break;
            }
            assert_eq!(resp.status(), StatusCode::OK);
            assert!(done.elapsed() < bound, "{user}'s token still works on replica two after {:?}", done.elapsed());
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
}

/// A server given another key file than the one the stored SSH keys were sealed with
/// (a replica set up without copying it, or a lost key made anew) is refused at start,
/// saying so, instead of failing every task of those users.
async fn a_server_whose_key_opens_none_of_the_stored_ssh_keys_is_refused(t: TestStore) {
    let keys = Keys::new();
    let _one = crate::mediator::setup_with(&t, keys.replica("key-one", |_| {})).await;
    let dir = tempfile::tempdir().unwrap();
    let mut config = crate::helpers::test_config(dir.path());
    config.mediator.replica = "key-two".into();
    let refused = hpcforge::server::Server::build_on(&config, t.store.clone()).await.unwrap_err();
    let said = format!("{refused:#}");
    assert!(said.contains("opens none of the SSH keys stored in this store"), "{said}");
    assert!(said.contains("copy it from a running replica"), "{said}");
    // With the same key file it starts.
    let two = spawn_configured(t.store.clone(), keys.replica("key-two", |_| {})).await;
    let (s, _) = call(&two, Method::GET, "/api/v1/replicas", "admin", None).await;
    assert_eq!(s, StatusCode::OK);
}

/// A restart asked of another replica than the one that submitted the task reruns
/// what it should, once: the restarted phases get new jobs, the prolog keeps its own.
async fn a_restart_sent_to_another_replica_reruns_the_task_once(t: TestStore) {
    use crate::mediator::{is_final, phase, wait_for};
    let keys = Keys::new();
    let one = crate::mediator::setup_with(&t, keys.replica("restart-one", |_| {})).await;
    let two = spawn_configured(t.store.clone(), keys.replica("restart-two", |_| {})).await;
    let task = crate::mediator::submit(&one, "alice", "sleep", "local-slurm", serde_json::json!({ "sleep": 1 })).await;
    let id = task["id"].as_str().unwrap().to_owned();
    let first = wait_for(&one, "alice", &id, 120, "the task to end", is_final).await;
    let body = serde_json::json!({ "from": "execute" });
    let (s, v) = call(&two, Method::POST, &format!("/api/v1/tasks/{id}/restart"), "alice", Some(&body)).await;
    assert_eq!(s, StatusCode::ACCEPTED, "{v:#}");
    let again = wait_for(&one, "alice", &id, 120, "the restarted task to end", |t| {
        is_final(t) && phase(t, "execute")["attempt"] == 2
    })
    .await;
    crate::mediator::assert_restarted_from_execute(&first, &again);
}

crate::tests_on_store!(
    mongodb,
    Mongo,
    replicas_on_one_store_see_each_other_and_a_stopped_one_is_gone_at_once,
    each_users_jobs_are_watched_by_one_replica_and_a_stopped_ones_by_another,
    a_task_is_known_by_its_uri_on_every_replica_of_its_site,
    a_cluster_paused_by_one_replica_is_paused_for_every_replica,
    a_status_page_on_one_replica_sees_changes_made_through_another_at_once,
    a_users_limits_hold_for_all_replicas_together,
    a_revoked_token_and_a_disabled_account_stop_working_on_every_replica_within_the_bound,
    a_server_whose_key_opens_none_of_the_stored_ssh_keys_is_refused,
    a_restart_sent_to_another_replica_reruns_the_task_once
);

/// `hpcforge serve --replica-id` on MongoDB, killed with SIGKILL (its lease left to
/// lapse) and started again under the same ID: the new one waits for the lease, then
/// takes the ID over (a second start of that replica).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_killed_outright_can_start_again_under_its_id_once_its_lease_lapses() {
    let dir = tempfile::tempdir().unwrap();
    let db = format!("replicas_{}", uuid::Uuid::new_v4().simple());
    let uri = test_env().mongodb_uri.clone();
    let envs = [("HPCFORGE_MONGODB_URI", uri.as_str()), ("HPCFORGE_MONGODB_DATABASE", db.as_str())];
    // `hpcforge serve --replica-id login-1` in `dir`, on that database; it returns once
    // the server listens (which may be after waiting for the ID's lease).
    let start = || {
        let dir = dir.path().to_owned();
        let envs: Vec<(String, String)> = envs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect();
        tokio::task::spawn_blocking(move || {
            let envs: Vec<(&str, &str)> = envs.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
            Server::start(&dir, &["--no-examples", "--replica-id", "login-1"], &envs)
        })
    };
    let first = start().await.unwrap();
    let admin = first.token("admin", "admin");
    first.kill();
    let started = Instant::now();
    let again = start().await.unwrap();
    assert!(started.elapsed() < Duration::from_secs(25), "took the ID over within a lease period and a little");
    let list = crate::helpers::get_json(&format!("{}/api/v1/replicas", again.base), &admin).await;
    let r = replica(&list, "login-1");
    assert_eq!((r["alive"].as_bool(), r["starts"].as_u64()), (Some(true), Some(2)), "{list:#}");
    drop(again);
    if let Ok(client) = ::mongodb::Client::with_uri_str(&uri).await {
        let _ = client.database(&db).drop().await;
    }
}

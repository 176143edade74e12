//! Status-page reads over HTTP, on a store holding many tasks:
//!
//!     cargo bench --bench status -- --tasks 5000 --users 20
//!     cargo bench --bench status -- --store mongodb     # needs scripts/test-env (SecantusDB)
//!
//! The server runs in process (the real router: token check, envelope, JSON) on
//! loopback, on the embedded store or on MongoDB. The store is filled with `--tasks`
//! tasks spread over `--users` users, each with the events of a finished run, 2 % of
//! them still running. Then `--clients` concurrent clients make `--requests` requests
//! of each kind, as a status page would:
//!
//! - `mine`: a user's newest 50 tasks (`GET /api/v1/tasks?limit=50`);
//! - `running`: an admin's view of every running task (`?state=running&limit=50`);
//! - `page 3`: the third page of a user's list, through two cursors;
//! - `one`: one task with its events (`GET /api/v1/tasks/{id}`).
//!
//! It prints each kind's median and 99th-percentile latency and its requests per
//! second. No bar was set; the figures are recorded in docs/architecture.md.

use std::sync::Arc;
use std::time::{Duration, Instant};

use hpcforge::auth::Role;
use hpcforge::model::{AppName, ClusterName, DefinitionRef, Phase, PhaseState, Task, TaskState, UserName};
use hpcforge::store::Store;
use serde_json::Value;

mod common;
use common::{arg, num, should_run, test_env};

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// A task of `owner` that ran its three phases, or is running its execute phase.
fn task(owner: &UserName, running: bool, now: time::OffsetDateTime) -> Task {
    let mut t = Task::new(
        owner.clone(),
        DefinitionRef { name: AppName::parse("sleep").unwrap(), version: 1 },
        DefinitionRef { name: ClusterName::parse("local").unwrap(), version: 1 },
        serde_json::json!({ "sleep": 20 }),
        &hpcforge::model::workflow::PhaseGraph::default_shape(),
        now,
    );
    for (i, p) in Phase::DEFAULT.into_iter().enumerate() {
        t.phase_mut(p).job_id = Some((1000 + i).to_string());
        t.set_phase_state(now, p, PhaseState::Pending, Some(&format!("job {}", 1000 + i)));
    }
    t.set_phase_state(now, Phase::PROLOG, PhaseState::Running, None);
    t.set_phase_state(now, Phase::PROLOG, PhaseState::Completed, None);
    t.set_phase_state(now, Phase::EXECUTE, PhaseState::Running, None);
    if !running {
        t.set_phase_state(now, Phase::EXECUTE, PhaseState::Completed, None);
        t.set_phase_state(now, Phase::EPILOG, PhaseState::Running, None);
        t.set_phase_state(now, Phase::EPILOG, PhaseState::Completed, None);
    }
    t
}

/// The store to fill, and for MongoDB the (URI, database) to drop at the end.
async fn open_store(kind: &str, dir: &std::path::Path) -> (Arc<dyn Store>, Option<(String, String)>) {
    match kind {
        "embedded" => (Arc::new(hpcforge::store::embedded::EmbeddedStore::open(dir).unwrap()), None),
        "mongodb" => {
            let uri =
                test_env().remove("HPCFORGE_TEST_MONGODB_URI").expect("the test environment names its MongoDB URI");
            let db = format!("bench_status_{}", std::process::id());
            let store = hpcforge::store::mongo::MongoStore::connect(&uri, &db, Default::default()).await.unwrap();
            (Arc::new(store), Some((uri, db)))
        }
        other => panic!("--store is embedded or mongodb, not {other}"),
    }
}

#[tokio::main]
async fn main() {
    if !should_run("benches/status.rs is a benchmark: cargo bench --bench status -- --tasks 5000") {
        return;
    }
    let n_tasks = num("--tasks", 5000);
    let n_users = num("--users", 20);
    let requests = num("--requests", 2000);
    let clients = num("--clients", 16);
    let kind = arg("--store", "embedded");

    let dir = tempfile::tempdir().unwrap();
    let (store, scratch) = open_store(&kind, dir.path()).await;
    let now = time::OffsetDateTime::now_utc();
    let admin = UserName::parse("admin").unwrap();
    let users: Vec<UserName> = (0..n_users).map(|i| UserName::parse(&format!("user{i:03}")).unwrap()).collect();
    let (_, admin_token) =
        hpcforge::auth::add_user(store.as_ref(), &admin, Role::Admin, "bench", None, &admin, now).await.unwrap();
    let mut tokens = Vec::new();
    for u in &users {
        let (_, t) = hpcforge::auth::add_user(store.as_ref(), u, Role::User, "bench", None, &admin, now).await.unwrap();
        tokens.push(t.token);
    }
    let filled = Instant::now();
    let mut some_ids = Vec::new();
    let mut inserts = tokio::task::JoinSet::new();
    for i in 0..n_tasks {
        let t = task(&users[i % n_users], i % 50 == 0, now);
        if i % 97 == 0 {
            some_ids.push((i % n_users, t.id.to_string()));
        }
        let store = store.clone();
        inserts.spawn(async move { store.insert_task(&t).await.unwrap() });
        while inserts.len() >= 8 {
            inserts.join_next().await.unwrap().unwrap();
        }
    }
    while let Some(r) = inserts.join_next().await {
        r.unwrap();
    }
    eprintln!("{kind} store: {n_tasks} tasks of {n_users} users stored in {:.1} s", filled.elapsed().as_secs_f64());

    let (base, _state) = common::serve(store.clone(), dir.path(), |c| {
        c.rate = hpcforge::api::limits::RateConfig { streams_per_user: 1000, ..Default::default() };
        c.max_body_bytes = 1 << 20;
    })
    .await;
    // reqwest is built with rustls and no default crypto provider; install ring, as the CLI does.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let http = reqwest::Client::builder().pool_max_idle_per_host(clients).build().unwrap();

    let kinds = ["mine", "running", "page 3", "one"];
    println!("{:<8} {:>10} {:>10} {:>10}", "request", "median", "p99", "req/s");
    for what in kinds {
        let started = Instant::now();
        let mut set = tokio::task::JoinSet::new();
        for c in 0..clients {
            let (http, base, tokens, admin_token, ids) =
                (http.clone(), base.clone(), tokens.clone(), admin_token.token.clone(), some_ids.clone());
            let share = requests / clients + usize::from(c < requests % clients);
            set.spawn(async move {
                let mut lat = Vec::with_capacity(share);
                for r in 0..share {
                    let u = (c * 31 + r) % tokens.len();
                    let t0 = Instant::now();
                    let get = |path: String, token: &str| {
                        let req = http.get(format!("{base}{path}")).bearer_auth(token);
                        async move {
                            let resp = req.send().await.unwrap();
                            assert!(resp.status().is_success(), "{path}: {}", resp.status());
                            resp.json::<Value>().await.unwrap()
                        }
                    };
                    match what {
                        "mine" => {
                            let v = get("/api/v1/tasks?limit=50".into(), &tokens[u]).await;
                            assert_eq!(v["data"]["tasks"].as_array().unwrap().len(), 50.min(n_tasks / n_users));
                        }
                        "running" => {
                            get("/api/v1/tasks?state=running&limit=50".into(), &admin_token).await;
                        }
                        "page 3" => {
                            let mut path = "/api/v1/tasks?limit=20".to_owned();
                            for _ in 0..3 {
                                let v = get(path.clone(), &tokens[u]).await;
                                let Some(next) = v["data"]["next_cursor"].as_str() else { break };
                                path = format!("/api/v1/tasks?limit=20&cursor={next}");
                            }
                        }
                        _ => {
                            let (owner, id) = &ids[r % ids.len()];
                            let v = get(format!("/api/v1/tasks/{id}"), &tokens[*owner]).await;
                            assert_eq!(v["data"]["id"], id.as_str());
                        }
                    }
                    lat.push(t0.elapsed());
                }
                lat
            });
        }
        let mut all = Vec::new();
        while let Some(r) = set.join_next().await {
            all.extend(r.unwrap());
        }
        let wall = started.elapsed();
        all.sort();
        println!(
            "{:<8} {:>8.2}ms {:>8.2}ms {:>10.0}",
            what,
            percentile(&all, 0.5).as_secs_f64() * 1e3,
            percentile(&all, 0.99).as_secs_f64() * 1e3,
            all.len() as f64 / wall.as_secs_f64()
        );
    }
    let counts = store.count_tasks().await.unwrap();
    let running = counts.iter().find(|(s, _)| *s == TaskState::Running).map_or(0, |(_, n)| *n);
    eprintln!("({running} running tasks in the store; {clients} clients)");
    if let Some((uri, db)) = scratch {
        mongodb::Client::with_uri_str(&uri).await.unwrap().database(&db).drop().await.unwrap();
    }
}

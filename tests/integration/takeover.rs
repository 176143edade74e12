//! Replicas submitting through real Slurm over SSH (issue 10): `hpcforge serve`
//! processes on one SecantusDB database, killed, paused and resumed. What is checked
//! is what Slurm has, by tag: exactly one job per phase of every task, whoever
//! submitted it and however often a replica died on the way.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::helpers::{Server, http, test_env};
use crate::mediator::{app_body, cluster_body, is_final, job, phase, remote};

/// Replicas sharing one fresh database and one data directory (so one secret key).
struct Site {
    dir: tempfile::TempDir,
    db: String,
    admin: String,
    alice: String,
}

impl Site {
    /// A new database and the config every replica reads (a 1 s monitor tick).
    fn new() -> Site {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("hpcforge.toml"), "[mediator]\ntick_seconds = 1\n").unwrap();
        let db = format!("takeover_{}", uuid::Uuid::new_v4().simple());
        Site { dir, db, admin: String::new(), alice: String::new() }
    }

    /// Starts replica `id` with `failpoint`, off the async runtime (a replica started
    /// again under its ID waits for that ID's lease to lapse).
    async fn start(&self, id: &str, failpoint: Option<&str>) -> Server {
        let (dir, db) = (self.dir.path().to_owned(), self.db.clone());
        let (id, failpoint) = (id.to_owned(), failpoint.map(str::to_owned));
        tokio::task::spawn_blocking(move || start_in(&dir, &db, &id, failpoint.as_deref())).await.unwrap()
    }

    /// Accounts, the `sleep` application, the `local-slurm` cluster and alice's key,
    /// through `server`.
    async fn set_up(&mut self, server: &Server) {
        self.admin = server.token("admin", "admin");
        self.alice = server.token("alice", "user");
        let key = std::fs::read_to_string(&test_env().keys["alice"]).unwrap();
        for (path, body) in [
            ("/api/v1/applications/sleep", app_body("sleep")),
            ("/api/v1/applications/workflow", app_body("workflow")),
            ("/api/v1/applications/render", app_body("render")),
            ("/api/v1/clusters/local-slurm", cluster_body("local-slurm")),
            ("/api/v1/credentials/alice/local-slurm", json!({ "private_key": key })),
        ] {
            let resp =
                http().put(format!("{}{path}", server.base)).bearer_auth(&self.admin).json(&body).send().await.unwrap();
            assert!(resp.status().is_success(), "{path}: {}", resp.text().await.unwrap());
        }
    }

    /// Drops the database.
    async fn drop_db(&self) {
        if let Ok(client) = ::mongodb::Client::with_uri_str(&test_env().mongodb_uri).await {
            let _ = client.database(&self.db).drop().await;
        }
    }
}

/// [`Site::start`] given the site's directory and database.
fn start_in(dir: &Path, db: &str, id: &str, failpoint: Option<&str>) -> Server {
    let config = dir.join("hpcforge.toml");
    let uri = test_env().mongodb_uri.clone();
    let mut envs = vec![("HPCFORGE_MONGODB_URI", uri.as_str()), ("HPCFORGE_MONGODB_DATABASE", db)];
    if let Some(f) = failpoint {
        envs.push(("HPCFORGE_FAILPOINT", f));
    }
    Server::start(dir, &["--no-examples", "--replica-id", id, "--config", config.to_str().unwrap()], &envs)
}

/// POSTs a `sleep` task for alice to `base`: its ID once acknowledged (201), else why not.
async fn post_task(base: &str, alice: &str, secs: u64) -> Result<String, String> {
    post_body(base, alice, json!({ "application": "sleep", "cluster": "local-slurm", "inputs": { "sleep": secs } }))
        .await
}

/// A `workflow` task (four declared phases, two of them side by side), small.
async fn post_workflow(base: &str, alice: &str) -> Result<String, String> {
    post_body(base, alice, json!({ "application": "workflow", "cluster": "local-slurm", "inputs": { "points": 500 } }))
        .await
}

/// A `render` task (frames as job arrays, two elements each, one waiting for the
/// other frame by frame), tiny.
async fn post_render(base: &str, alice: &str) -> Result<String, String> {
    let inputs = json!({ "frames": "1-8", "width": 8, "height": 8, "iterations": 10 });
    post_body(base, alice, json!({ "application": "render", "cluster": "local-slurm", "inputs": inputs })).await
}

async fn post_body(base: &str, alice: &str, body: Value) -> Result<String, String> {
    let resp = http().post(format!("{base}/api/v1/tasks")).bearer_auth(alice).json(&body).send().await;
    let resp = resp.map_err(|e| e.to_string())?;
    let status = resp.status();
    let v: Value = resp.json().await.map_err(|e| e.to_string())?;
    if status != StatusCode::CREATED {
        return Err(format!("{status}: {v}"));
    }
    Ok(v["data"]["id"].as_str().unwrap().to_owned())
}

/// Task `id` as `base` shows it to alice.
async fn get_task(base: &str, alice: &str, id: &str) -> Value {
    let v: Value =
        http().get(format!("{base}/api/v1/tasks/{id}")).bearer_auth(alice).send().await.unwrap().json().await.unwrap();
    v["data"].clone()
}

/// Waits up to `secs` for task `id` (read through `base`) to satisfy `done`.
async fn wait_task(base: &str, alice: &str, id: &str, secs: u64, what: &str, done: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let t = get_task(base, alice, id).await;
        if done(&t) {
            return t;
        }
        assert!(Instant::now() < deadline, "waited {secs} s for {what}: {t:#}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Every job Slurm has for alice (any state; MinJobAge keeps ended ones for an hour)
/// by its tag `hpcforge:<task>:<phase>`: task → phase → job IDs, with each job's state.
async fn slurm_jobs() -> BTreeMap<String, BTreeMap<String, Vec<(String, String)>>> {
    // An array's elements are listed one by one (those not started as one line), all
    // under the array's ID: one job.
    let (_, out) =
        remote("alice", "squeue --noheader --states=all -u alice -O 'ArrayJobID:|,State:|,Comment:|'".into()).await;
    let mut jobs: BTreeMap<String, BTreeMap<String, Vec<(String, String)>>> = BTreeMap::new();
    for line in out.lines() {
        let f: Vec<&str> = line.split('|').map(str::trim).collect();
        if let [id, state, comment, ..] = f[..]
            && let Some(tag) = comment.strip_prefix("hpcforge:")
            && let Some((task, phase)) = tag.split_once(':')
        {
            let seen = jobs.entry(task.to_owned()).or_default().entry(phase.to_owned()).or_default();
            if !seen.iter().any(|(j, _)| j == id) {
                seen.push((id.into(), state.into()));
            }
        }
    }
    jobs
}

/// Waits up to `secs` for `server`'s log to contain `needle`.
async fn wait_log(server: &Server, needle: &str, secs: u64) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !server.log().contains(needle) {
        assert!(Instant::now() < deadline, "waited {secs} s for `{needle}` in the log:\n{}", server.log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn signal(server: &Server, sig: &str) {
    let ok = std::process::Command::new("kill").args([sig, &server.pid().to_string()]).status().unwrap();
    assert!(ok.success(), "kill {sig}");
}

/// Slurm has exactly one job for each phase of task `id`, and `done` (the task as
/// the API shows it) names those jobs.
async fn assert_one_slurm_job_per_phase(id: &str, done: &Value) {
    let jobs = slurm_jobs().await;
    let mine = jobs.get(id).unwrap_or_else(|| panic!("Slurm has no job of {id}: {jobs:#?}"));
    assert_eq!(mine.len(), 3, "{mine:#?}");
    for (p, js) in mine {
        assert_eq!(js.len(), 1, "exactly one Slurm job for {p}: {mine:#?}");
        assert_eq!(js[0].0, job(done, p), "the task shows the job Slurm has for {p}");
    }
}

/// A replica stopped (SIGSTOP) between its last store check and `sbatch`, past its
/// claim: another replica takes the task over and submits it; the first, resumed, goes
/// on to run its submission script, and the cluster's fence refuses it. Slurm has
/// exactly one job per phase, the ones the task shows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_owner_resumed_after_its_claim_was_taken_over_submits_nothing() {
    let mut site = Site::new();
    let a = site.start("replica-a", Some("stall-before-submit")).await;
    let b = site.start("replica-b", None).await;
    site.set_up(&a).await;
    let id = post_task(&a.base, &site.alice, 1).await.unwrap();
    // A holds the claim (fence 1) and is about to submit: stop it there.
    wait_log(&a, "failpoint stall-before-submit", 30).await;
    signal(&a, "-STOP");
    let stopped = Instant::now();
    let t = wait_task(&b.base, &site.alice, &id, 90, "replica B to take the task over and submit it", |t| {
        t["phases"].as_array().unwrap().iter().all(|p| p["job_id"].is_string())
    })
    .await;
    let waited = stopped.elapsed();
    assert!(waited >= Duration::from_secs(8), "B waited for A's claim to lapse ({waited:?}): {t:#}");
    assert_eq!(t["claim"]["fence"], 2, "B's claim is the second: {t:#}");
    assert!(t["claim"]["holder"].as_str().unwrap().starts_with("replica-b#"), "{t:#}");
    // A resumes where it stopped and runs its submission script: the fence stops it.
    signal(&a, "-CONT");
    wait_log(&a, "fenced out", 30).await;
    let done = wait_task(&b.base, &site.alice, &id, 120, "the task to end", is_final).await;
    assert_eq!(done["state"], "completed", "{done:#}");
    assert_one_slurm_job_per_phase(&id, &done).await;
    drop((a, b));
    site.drop_db().await;
}

/// A replica told to stop (SIGTERM) while a submission of its own is still under way
/// past its drain time hands the claim back as it exits: another replica takes the task
/// over at once, long before the claim would have lapsed, and Slurm has exactly one
/// job per phase (a rolling restart that waits for no lease).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_stopped_mid_submission_hands_its_claim_over_without_waiting_for_it_to_lapse() {
    let mut site = Site::new();
    std::fs::write(site.dir.path().join("hpcforge.toml"), "[mediator]\ntick_seconds = 1\ndrain_seconds = 1\n").unwrap();
    let mut a = site.start("replica-a", Some("stall-before-submit")).await;
    let b = site.start("replica-b", None).await;
    site.set_up(&a).await;
    let id = post_task(&a.base, &site.alice, 1).await.unwrap();
    wait_log(&a, "failpoint stall-before-submit", 30).await;
    let held = get_task(&b.base, &site.alice, &id).await;
    assert!(held["claim"]["holder"].as_str().unwrap().starts_with("replica-a#"), "{held:#}");
    let rfc = time::format_description::well_known::Rfc3339;
    let lapses = time::OffsetDateTime::parse(held["claim"]["expires_at"].as_str().unwrap(), &rfc).unwrap();
    signal(&a, "-TERM");
    let status = tokio::task::block_in_place(|| a.wait_exit(Duration::from_secs(20)));
    assert!(status.is_some_and(|s| s.success()), "A stops cleanly within 20 s of SIGTERM: {status:?}\n{}", a.log());
    assert!(a.log().contains("their claims are released"), "A says it handed its work over:\n{}", a.log());
    let t = wait_task(&b.base, &site.alice, &id, 60, "replica B to take the task over and submit it", |t| {
        t["phases"].as_array().unwrap().iter().all(|p| p["job_id"].is_string())
    })
    .await;
    let submitted = time::OffsetDateTime::now_utc();
    assert!(
        submitted < lapses,
        "B submitted at {submitted}, before A's claim would have lapsed ({lapses}), because A released it: {t:#}"
    );
    assert_eq!(t["claim"]["fence"], 2, "{t:#}");
    assert!(t["claim"]["holder"].as_str().unwrap().starts_with("replica-b#"), "{t:#}");
    let done = wait_task(&b.base, &site.alice, &id, 120, "the task to end", is_final).await;
    assert_eq!(done["state"], "completed", "{done:#}");
    assert_one_slurm_job_per_phase(&id, &done).await;
    drop((a, b));
    site.drop_db().await;
}

/// A cancel sent to replica B while replica A owns the task's submission: during A's
/// attempt it stops A before Slurm is asked; once the jobs run, B stops them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_sent_to_another_replica_than_the_owner_takes_effect() {
    let mut site = Site::new();
    let a = site.start("replica-a", Some("slow-submit")).await;
    let b = site.start("replica-b", None).await;
    site.set_up(&a).await;
    let cancel = |id: String| {
        let (base, alice) = (b.base.clone(), site.alice.clone());
        async move {
            let resp = http().delete(format!("{base}/api/v1/tasks/{id}")).bearer_auth(alice).send().await.unwrap();
            assert_eq!(resp.status(), StatusCode::ACCEPTED, "{}", resp.text().await.unwrap());
        }
    };
    // 1. While A's submission is under way (slow-submit: 3 s before its last check).
    let early = post_task(&a.base, &site.alice, 1).await.unwrap();
    cancel(early.clone()).await;
    let t = wait_task(&b.base, &site.alice, &early, 60, "the early cancel to settle", is_final).await;
    assert_eq!(t["state"], "cancelled", "{t:#}");
    // 2. Once A's jobs run.
    let late = post_task(&a.base, &site.alice, 300).await.unwrap();
    wait_task(&b.base, &site.alice, &late, 120, "execute to run", |t| phase(t, "execute")["state"] == "running").await;
    cancel(late.clone()).await;
    let t = wait_task(&a.base, &site.alice, &late, 60, "the late cancel to settle", is_final).await;
    assert_eq!(t["state"], "cancelled", "{t:#}");
    // Give an attempt that ignored the cancel time to show up in Slurm, then look.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let jobs = slurm_jobs().await;
    assert!(!jobs.contains_key(&early), "nothing of the task cancelled early reached Slurm: {:#?}", jobs.get(&early));
    let late_jobs = &jobs[&late];
    for (p, js) in late_jobs {
        assert_eq!(js.len(), 1, "{p}: {late_jobs:#?}");
        assert!(!matches!(js[0].1.as_str(), "RUNNING" | "PENDING"), "{p} still alive in Slurm: {late_jobs:#?}");
    }
    drop((a, b));
    site.drop_db().await;
}

/// A small xorshift generator: the kill test's moments, from a seed it prints.
struct Dice(u64);

impl Dice {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

/// Three replicas on SecantusDB and real Slurm. A portal spreads tasks (`sleep`, every
/// third one the `workflow` example, whose phases wait for each other in a graph, and
/// every third one the `render` example, whose frame phases are job arrays) over whichever replicas are up while replicas are killed with SIGKILL at random moments and started
/// again under their IDs. Afterwards every acknowledged task has ended completed, and
/// every task the store has has exactly one Slurm job (or job array) per phase, found
/// in Slurm by tag: the one the task shows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_killed_at_random_moments_leave_exactly_one_job_per_phase_of_every_task() {
    const TASKS: usize = 24;
    const KILLS: usize = 5;
    let seed = std::env::var("HPCFORGE_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| std::time::SystemTime::UNIX_EPOCH.elapsed().unwrap().as_nanos() as u64 | 1);
    eprintln!("kill test seed {seed} (HPCFORGE_TEST_SEED={seed} replays the same moments)");
    let mut dice = Dice(seed);
    let mut site = Site::new();
    let names = ["replica-1", "replica-2", "replica-3"];
    let mut up: Vec<Option<Server>> = Vec::new();
    for n in names {
        up.push(Some(site.start(n, Some("slow-submit")).await));
    }
    site.set_up(up[0].as_ref().unwrap()).await;
    let site = std::sync::Arc::new(site);
    // Where each replica listens now (a restarted one listens elsewhere); `None`: down.
    let bases = std::sync::Arc::new(std::sync::Mutex::new(
        up.iter().map(|s| s.as_ref().map(|s| s.base.clone())).collect::<Vec<_>>(),
    ));

    // The portal: one task every 0.2-1 s, to the next replica that takes it.
    let portal = {
        let (bases, alice) = (bases.clone(), site.alice.clone());
        let mut dice = Dice(seed.rotate_left(17) | 1);
        tokio::spawn(async move {
            let mut acknowledged = Vec::new();
            let mut refused = 0;
            for i in 0..TASKS {
                tokio::time::sleep(Duration::from_millis(200 + dice.below(1400))).await;
                let mut sent = false;
                for k in 0..6 {
                    let base = bases.lock().unwrap()[(i + k) % 3].clone();
                    let Some(base) = base else { continue };
                    // Every third task a workflow: its phases wait for each other in a
                    // graph, and the same must hold for them.
                    let posted = match i % 3 {
                        2 => post_workflow(&base, &alice).await,
                        1 => post_render(&base, &alice).await,
                        _ => post_task(&base, &alice, 1).await,
                    };
                    match posted {
                        Ok(id) => {
                            acknowledged.push(id);
                            sent = true;
                            break;
                        }
                        Err(e) => {
                            refused += 1;
                            eprintln!("portal: task {i} not taken by {base} ({e}); trying another replica");
                        }
                    }
                }
                assert!(sent, "no replica took task {i}");
            }
            (acknowledged, refused)
        })
    };

    // The killer: SIGKILL a random replica at a random moment (never the last one up),
    // and start it again under its ID (which waits for its lease to lapse).
    let mut restarts = Vec::new();
    // First, one kill that surely lands mid-submission: every replica takes 3 s
    // (slow-submit) between a task's intent and `sbatch`.
    let first = post_task(up[0].as_ref().unwrap().base.as_str(), &site.alice, 1).await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    bases.lock().unwrap()[0] = None;
    eprintln!("killing {} (SIGKILL) while it submits {first}", names[0]);
    up[0].take().unwrap().kill();
    {
        let site = site.clone();
        restarts.push(tokio::spawn(async move { (0, site.start(names[0], Some("slow-submit")).await) }));
    }
    for _ in 0..KILLS {
        tokio::time::sleep(Duration::from_millis(300 + dice.below(2500))).await;
        // With one replica up, wait for one to come back first.
        while up.iter().flatten().count() < 2 || restarts.iter().any(|h: &tokio::task::JoinHandle<_>| h.is_finished()) {
            let i = match restarts.iter().position(|h| h.is_finished()) {
                Some(i) => i,
                None => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let (i, s): (usize, Server) = restarts.swap_remove(i).await.unwrap();
            bases.lock().unwrap()[i] = Some(s.base.clone());
            up[i] = Some(s);
        }
        let alive: Vec<usize> = (0..3).filter(|&i| up[i].is_some()).collect();
        let victim = alive[dice.below(alive.len() as u64) as usize];
        bases.lock().unwrap()[victim] = None;
        eprintln!("killing {} (SIGKILL)", names[victim]);
        up[victim].take().unwrap().kill();
        let site = site.clone();
        restarts.push(tokio::spawn(async move { (victim, site.start(names[victim], Some("slow-submit")).await) }));
    }
    for r in restarts {
        let (i, s) = r.await.unwrap();
        bases.lock().unwrap()[i] = Some(s.base.clone());
        up[i] = Some(s);
    }
    let (mut acknowledged, refused) = portal.await.unwrap();
    acknowledged.push(first.clone());
    eprintln!("{} tasks acknowledged, {refused} posts refused by a dying replica", acknowledged.len());

    // Every task the store has: the acknowledged ones, and any a dying replica stored
    // without answering.
    let any = up[0].as_ref().unwrap().base.clone();
    let listed = crate::helpers::get_json(&format!("{any}/api/v1/tasks?limit=200"), &site.alice).await;
    let all: Vec<String> =
        listed["data"]["tasks"].as_array().unwrap().iter().map(|t| t["id"].as_str().unwrap().to_owned()).collect();
    for id in &acknowledged {
        assert!(all.contains(id), "acknowledged task {id} is in the store: {listed:#}");
    }
    let mut ended = BTreeMap::new();
    for id in &all {
        let t = wait_task(&any, &site.alice, id, 300, "every task to end", is_final).await;
        ended.insert(id.clone(), t);
    }
    let jobs = slurm_jobs().await;
    let mut problems = Vec::new();
    for (id, t) in &ended {
        if acknowledged.contains(id) && t["state"] != "completed" {
            problems.push(format!("{id} ended {}: {t:#}", t["state"]));
        }
        let phases: Vec<String> =
            t["phases"].as_array().unwrap().iter().map(|p| p["phase"].as_str().unwrap().to_owned()).collect();
        for p in phases.iter().map(String::as_str) {
            let theirs = jobs.get(id).and_then(|j| j.get(p)).cloned().unwrap_or_default();
            let shown = phase(t, p)["job_id"].as_str().map(str::to_owned);
            match (&theirs[..], shown) {
                ([(slurm, _)], Some(shown)) if *slurm == shown => {}
                ([], None) if t["state"] != "completed" => {}
                (theirs, shown) => problems.push(format!("{id} {p}: Slurm has {theirs:?}, the task shows {shown:?}")),
            }
        }
    }
    assert!(problems.is_empty(), "seed {seed}:\n{}", problems.join("\n"));
    // What the jobs posted was taken exactly once, whichever replica read it and
    // however often replicas died meanwhile: sleep's event and datum, and render's
    // one measurement per frame.
    let drained = |t: &Value| {
        t["phases"].as_array().unwrap().iter().all(|p| p["job_id"].is_null() || p["posts"]["drained"] == true)
    };
    for (id, _) in ended.iter().filter(|(_, t)| t["state"] == "completed") {
        let t = wait_task(&any, &site.alice, id, 120, "its jobs' posts to be read", drained).await;
        let posts: Vec<&Value> = t["events"].as_array().unwrap().iter().filter_map(|e| e.get("post")).collect();
        let said = |p: &&Value| p["event"].as_str().or(p["key"].as_str()).unwrap_or_default().to_owned();
        match t["application"]["name"].as_str() {
            Some("sleep") => {
                let kinds: Vec<String> = posts.iter().map(said).collect();
                if kinds != ["slept", "slept_seconds"] {
                    problems.push(format!("{id}: sleep posted {kinds:?}, not once each"));
                }
            }
            Some("render") => {
                let mut frames: Vec<u64> =
                    posts.iter().filter(|p| p["event"] == "measured").filter_map(|p| p["frame"].as_u64()).collect();
                frames.sort_unstable();
                let total = phase(&t, "gather")["frames"]["total"].as_u64().unwrap_or(0);
                if frames != (1..=total).collect::<Vec<u64>>() {
                    problems.push(format!(
                        "{id}: gather's measurements came for frames {frames:?}, not 1..={total} once each"
                    ));
                }
            }
            _ => {}
        }
    }
    assert!(problems.is_empty(), "seed {seed}:\n{}", problems.join("\n"));
    // The task whose submitter was killed mid-way was taken over by another claim.
    let taken_over = ended.values().filter(|t| t["claim"]["fence"].as_u64() > Some(1)).count();
    eprintln!("{taken_over} of {} tasks were submitted under a later claim than their first", ended.len());
    assert!(ended[&first]["claim"]["fence"].as_u64() > Some(1), "{:#}", ended[&first]);
    drop(up);
    site.drop_db().await;
}

/// A replica killed (SIGKILL) while it keeps a task's outputs in GridFS: what it had
/// written is never seen as kept; once its lease lapses another replica makes the
/// archive again from nothing, and afterwards every output is kept whole (sha256 as
/// on the cluster), nothing half-written is left, and no chunk is orphaned.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_killed_while_it_keeps_the_outputs_leaves_nothing_half_written_and_another_finishes() {
    use ::mongodb::bson::{Document, doc};
    use futures::TryStreamExt as _;
    let mut site = Site::new();
    let a = site.start("replica-a", None).await;
    site.set_up(&a).await;
    let execute = "#!/bin/bash\nset -e\nmkdir -p out\nfor i in 1 2 3 4; do head -c 100000000 /dev/urandom > out/part-$i.bin; done\n";
    let mut app = crate::mediator::variant("kept-big", &[("app_execute", execute)]);
    app["definition"]["outputs"] = json!(["out"]);
    app["definition"]["archive"] = json!({ "max_file_mb": 200 });
    let resp = http()
        .put(format!("{}/api/v1/applications/kept-big", a.base))
        .bearer_auth(&site.admin)
        .json(&app)
        .send()
        .await
        .unwrap();
    assert!(resp.status().is_success(), "{}", resp.text().await.unwrap());
    let body = json!({ "application": "kept-big", "cluster": "local-slurm", "inputs": {} });
    let id = post_body(&a.base, &site.alice, body).await.unwrap();

    let client = ::mongodb::Client::with_uri_str(&test_env().mongodb_uri).await.unwrap();
    let db = client.database(&site.db);
    let files = db.collection::<Document>("fs.files");
    let names = |kind: &str| doc! { "filename": { "$gte": format!("tasks/{id}/{kind}/"), "$lt": format!("tasks/{id}/{kind}0") } };
    // A is writing the second file (or later) and has finished fewer than all: kill it.
    let deadline = Instant::now() + Duration::from_secs(240);
    loop {
        let partial = files.count_documents(names("outputs.partial")).await.unwrap();
        let kept = files.count_documents(names("outputs")).await.unwrap();
        if partial > 0 && kept >= 1 {
            break;
        }
        assert!(kept < 4, "replica A kept every output before it could be killed; nothing was tested");
        assert!(Instant::now() < deadline, "replica A never began keeping the outputs");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    a.kill();
    let t = get_task_direct(&db, &id).await;
    assert_eq!(t["archive"]["state"], "waiting", "nothing recorded as kept: {t}");

    let b = site.start("replica-b", None).await;
    let done = wait_task(&b.base, &site.alice, &id, 240, "replica B to keep the outputs", |t| {
        t["archive"]["state"] != "waiting"
    })
    .await;
    assert_eq!(done["archive"]["state"], "done", "{done:#}");
    assert_eq!((done["archive"]["kept"].as_u64(), done["archive"]["bytes"].as_u64()), (Some(4), Some(400_000_000)));
    // Whole, as on the cluster.
    let run_dir = done["run_dir"].as_str().unwrap();
    let (code, sums) = remote("alice", format!("cd {run_dir} && sha256sum out/*.bin")).await;
    assert_eq!(code, 0, "{sums}");
    let kept: Vec<Document> =
        files.find(names("outputs")).sort(doc! { "filename": 1 }).await.unwrap().try_collect().await.unwrap();
    let ours: Vec<String> = kept
        .iter()
        .map(|d| {
            let meta = d.get_document("metadata").unwrap();
            format!("{}  {}", meta.get_str("sha256").unwrap(), meta.get_str("path").unwrap())
        })
        .collect();
    assert_eq!(ours.join("\n"), sums.trim(), "each kept file's sha256 is the cluster's");
    assert_eq!(files.count_documents(names("outputs.partial")).await.unwrap(), 0, "nothing half-written is left");
    // No chunk without its file, no file short of a chunk: across the whole database.
    let mut expected = 0u64;
    for f in files.find(doc! {}).await.unwrap().try_collect::<Vec<Document>>().await.unwrap() {
        let len = f.get_i64("length").or_else(|_| f.get_i32("length").map(i64::from)).unwrap() as u64;
        let size = f.get_i32("chunkSize").unwrap() as u64;
        expected += len.div_ceil(size);
    }
    let chunks = db.collection::<Document>("fs.chunks").count_documents(doc! {}).await.unwrap();
    assert_eq!(chunks, expected, "every chunk belongs to a file, and every file has all of its chunks");
    // A download of a kept file is served from the store, byte for byte.
    let resp = http()
        .get(format!("{}/api/v1/tasks/{id}/files/out/part-3.bin", b.base))
        .bearer_auth(&site.alice)
        .header("Range", "bytes=99999990-")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.headers()["hpcforge-source"], "archive");
    let tail = resp.bytes().await.unwrap();
    let (_, cluster_tail) =
        remote("alice", format!("tail -c 10 {run_dir}/out/part-3.bin | od -An -tx1 | tr -d ' \\n'")).await;
    assert_eq!(hex::encode(&tail), cluster_tail.trim());
    let _ = remote("alice", format!("rm -rf {run_dir}")).await;
    drop(b);
    site.drop_db().await;
}

/// Task `id` as stored (its state document), read straight from the database.
async fn get_task_direct(db: &::mongodb::Database, id: &str) -> Value {
    let d = db
        .collection::<::mongodb::bson::Document>("tasks")
        .find_one(::mongodb::bson::doc! { "_id": id })
        .await
        .unwrap();
    serde_json::to_value(d.expect("the task is stored")).unwrap()
}

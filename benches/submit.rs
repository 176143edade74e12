//! Submission throughput through the public API, against a local `sbatch` (or `qsub`)
//! loop in the same run:
//!
//!     cargo bench --bench submit -- --store mongodb --tasks 200 --rounds 3
//!     cargo bench --bench submit -- --scheduler sge --tasks 200 --rounds 3 --ssh-jobs 60
//!     cargo bench --bench submit -- --store mongodb --drain --scale 100,1000 --idle 30
//!     cargo bench --bench submit -- --store mongodb --replicas 1,2,3 --tasks 200
//!     cargo bench --bench submit -- --frames 1000 --rounds 3
//!
//! - hpcforge: N tasks × 3 phases (prolog; execute afterok; epilog afterany), POSTed
//!   to the real HTTP server by a portal acting for `alice`, `--clients` (16) at once,
//!   each with `?wait=submitted` — timed until every answer is back with three job
//!   IDs. The server submits over SSH to the test environment's Slurm, or with
//!   `--scheduler sge` to its Grid Engine (cluster `local-sge`).
//! - (b) a local loop of `sbatch` (`qsub -terse -b y`) as alice, no SSH: 3 N jobs,
//!   the scheduler's own limit. (a) `--ssh-jobs K`: one `ssh alice@127.0.0.1 sbatch`
//!   (or `qsub`) per job.
//!
//! On MongoDB it also counts the commands (round trips) the store was sent per task.
//! `--drain` drains the Slurm node (disables Grid Engine's queue) first, so every job
//! stays pending (as on a busy cluster) and the live tasks pile up; `--scale 100,1000` runs one round per size and
//! compares their rates; `--idle S` then watches the live tasks for S seconds with the
//! default 5 s tick, and reports the CPU the store server (SecantusDB's process, or
//! this process for the embedded store) used meanwhile.
//!
//! `--replicas 1,2,3` serves the same store from 1, 2 and 3 in-process servers (each
//! its own replica ID and MongoDB client, as separate machines would be; started and
//! stopped gracefully between measurements, in alternating order from round to round),
//! the portal spreading its tasks round robin over them, and reports per replica count
//! its rate next to the local loop measured just before it, and each replica's share of
//! the submission scripts, its status scripts and its store commands per second.
//!
//! `--frames N`: one task whose one phase runs per frame over `1-N`, POSTed with
//! `?wait=submitted` and timed until the answer carries the job ID of its job array
//! (every frame's job: Slurm names element i `<array>_<i>`), next to N separate
//! `sbatch` (`qsub`) calls in a local loop as alice in the same round. The scheduler
//! is held for it (the jobs stay pending, then are cancelled). Bar (issue 12): at
//! least 20 times faster than the separate calls.
//!
//! Needs `scripts/test-env` up (run as root). Every job is cancelled at the end and the
//! node resumed. Bars (issue 9): hpcforge ≥ 0.8 × (b) on MongoDB; the 1,000-task rate
//! ≥ 80 % of the 100-task rate. Issue 11, on Grid Engine: ≥ 0.8 × (b) and ≥ 5 × (a).

use std::collections::BTreeMap;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hpcforge::auth::Role;
use hpcforge::definitions::{self, Upload, UploadLimits, folder};
use hpcforge::model::UserName;
use hpcforge::store::{Precondition, Store};
use serde_json::{Value, json};

mod common;
use common::{arg, num, should_run, test_env};

fn as_alice(script: &str) -> std::process::Output {
    Command::new("runuser").args(["-u", "alice", "--", "sh", "-c", script]).output().expect("runuser")
}

/// The scheduler the tasks go to, and its own commands for the loops hpcforge is
/// compared with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Target {
    Slurm,
    GridEngine,
}

impl Target {
    fn parse(name: &str) -> Target {
        match name {
            "slurm" => Target::Slurm,
            "sge" => Target::GridEngine,
            other => panic!("--scheduler is slurm or sge, not {other}"),
        }
    }

    /// The test environment's cluster of this scheduler.
    fn cluster(self) -> &'static str {
        match self {
            Target::Slurm => "local-slurm",
            Target::GridEngine => "local-sge",
        }
    }

    /// One trivial job, submitted as alice from `/tmp`: the unit of both loops.
    fn submit_one(self) -> &'static str {
        match self {
            Target::Slurm => "sbatch --parsable --quiet --wrap true",
            Target::GridEngine => "qsub -terse -b y -o /dev/null -e /dev/null true",
        }
    }

    fn cancel_all(self) -> &'static str {
        match self {
            Target::Slurm => "scancel -u alice",
            Target::GridEngine => "qdel -u alice >/dev/null 2>&1; true",
        }
    }

    /// How many of alice's jobs are still queued, running or ending.
    fn count_live(self) -> &'static str {
        match self {
            Target::Slurm => "squeue -h -u alice | wc -l",
            Target::GridEngine => "qstat -u alice | tail -n +3 | wc -l",
        }
    }

    /// Keeps every job pending (`true`), or lets them run again (`false`), as root.
    fn hold_all(self, hold: bool) {
        let (cmd, args): (&str, Vec<&str>) = match (self, hold) {
            (Target::Slurm, true) => {
                ("scontrol", vec!["update", "nodename=localhost", "state=drain", "reason=hpcforge-bench"])
            }
            (Target::Slurm, false) => ("scontrol", vec!["update", "nodename=localhost", "state=resume"]),
            (Target::GridEngine, true) => ("qmod", vec!["-d", "all.q"]),
            (Target::GridEngine, false) => ("qmod", vec!["-e", "all.q"]),
        };
        let out = Command::new(cmd).args(&args).output().unwrap();
        assert!(!hold || out.status.success(), "{cmd} {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }

    /// Cancels alice's jobs and waits (at most a minute) until the scheduler has none
    /// pending, running or ending, so the next measurement starts on a quiet scheduler.
    fn settle(self) {
        as_alice(self.cancel_all());
        for _ in 0..120 {
            let out = as_alice(self.count_live());
            if String::from_utf8_lossy(&out.stdout).trim() == "0" {
                break;
            }
            std::thread::sleep(Duration::from_millis(500));
        }
        std::thread::sleep(Duration::from_secs(1));
    }

    /// (b) the scheduler's own limit: 3 `tasks` jobs submitted in a local loop as
    /// alice, no SSH; tasks/s.
    fn local_loop(self, tasks: usize) -> f64 {
        let jobs = tasks * 3;
        let start = Instant::now();
        let out = as_alice(&format!(
            "cd /tmp && i=0; while [ $i -lt {jobs} ]; do {} >/dev/null || exit 1; i=$((i+1)); done",
            self.submit_one()
        ));
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        tasks as f64 / start.elapsed().as_secs_f64()
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// CPU seconds a process has used (user + system), from /proc.
fn cpu_seconds(pid: &str) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat.rsplit(')').next().unwrap_or("").split_whitespace().collect();
    let ticks: f64 = fields.get(11..13).map_or(0.0, |f| f.iter().filter_map(|x| x.parse::<f64>().ok()).sum());
    ticks / 100.0
}

/// The PID of the process listening on 127.0.0.1:27017 (SecantusDB).
fn store_server_pid() -> Option<String> {
    let out = Command::new("ss").args(["-ltnpH", "sport = :27017"]).output().ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.split("pid=").nth(1).map(|r| r.chars().take_while(char::is_ascii_digit).collect())
}

struct Bench {
    /// The replicas the portal spreads its tasks over (round robin).
    bases: Vec<String>,
    cluster: &'static str,
    http: reqwest::Client,
    portal: String,
    clients: usize,
}

impl Bench {
    /// POSTs `n` tasks, `clients` at a time, each waiting for its job IDs; the time.
    async fn submit_all(&self, n: usize) -> Duration {
        use futures::StreamExt as _;
        let body = json!({ "application": "bench", "cluster": self.cluster, "inputs": {} });
        let started = Instant::now();
        let answers: Vec<Value> = futures::stream::iter(0..n)
            .map(|i| {
                let req = self
                    .http
                    .post(format!("{}/api/v1/tasks?wait=submitted", self.bases[i % self.bases.len()]))
                    .bearer_auth(&self.portal)
                    .header("x-hpcforge-on-behalf-of", "alice")
                    .json(&body);
                async move {
                    let resp = req.send().await.expect("the server answers");
                    assert_eq!(resp.status(), reqwest::StatusCode::CREATED);
                    resp.json::<Value>().await.unwrap()
                }
            })
            .buffer_unordered(self.clients)
            .collect()
            .await;
        let took = started.elapsed();
        for a in &answers {
            let phases = a["data"]["phases"].as_array().unwrap();
            assert!(phases.iter().all(|p| p["job_id"].is_string()), "not submitted: {a:#}");
        }
        took
    }
}

#[tokio::main]
async fn main() {
    if !should_run("benches/submit.rs is a benchmark: cargo bench --bench submit -- --store mongodb --tasks 200") {
        return;
    }
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(
            std::env::var("HPCFORGE_LOG").unwrap_or_else(|_| "warn".into()),
        ))
        .with_writer(std::io::stderr)
        .init();
    let tasks = num("--tasks", 200);
    let rounds = num("--rounds", 3);
    let ssh_jobs = num("--ssh-jobs", 0);
    let clients = num("--clients", 16);
    let idle = num("--idle", 0);
    let drain = std::env::args().any(|a| a == "--drain");
    let scale: Vec<usize> =
        arg("--scale", "").split(',').filter(|s| !s.is_empty()).map(|s| s.parse().expect("--scale N,M")).collect();
    let kind = arg("--store", "embedded");
    let target = Target::parse(&arg("--scheduler", "slurm"));
    let replicas: Vec<usize> = arg("--replicas", "")
        .split(',')
        .filter(|s| !s.is_empty())
        .map(|s| s.parse().expect("--replicas N,M: how many replicas, e.g. 1,2,3"))
        .collect();
    let e = test_env();

    // The server side, in process, over HTTP on loopback: definitions, alice's key, a
    // portal account.
    let dir = tempfile::tempdir().unwrap();
    let mut mongo = None;
    let store: Arc<dyn Store> = match kind.as_str() {
        "embedded" => Arc::new(hpcforge::store::embedded::EmbeddedStore::open(dir.path()).unwrap()),
        "mongodb" => {
            let db = format!("bench_submit_{}", std::process::id());
            let s =
                hpcforge::store::mongo::MongoStore::connect(&e["HPCFORGE_TEST_MONGODB_URI"], &db, Default::default())
                    .await
                    .unwrap();
            mongo = Some(s.clone());
            Arc::new(s)
        }
        other => panic!("--store is embedded or mongodb, not {other}"),
    };
    let admin = UserName::parse("admin").unwrap();
    let now = time::OffsetDateTime::now_utc();
    let repo = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let cluster =
        folder::load_cluster(&repo.join("clusters").join(target.cluster()), None, &UploadLimits::default()).unwrap();
    let checked = definitions::check_cluster(cluster.upload, &UploadLimits::default()).unwrap();
    store.put_revision(&checked, Precondition::Any, &admin, now).await.unwrap();
    let app = Upload {
        definition: toml::from_str("name = 'bench'\n[resources.default]\nwalltime = '00:01:00'\n").unwrap(),
        files: BTreeMap::from([
            ("app_prolog".to_owned(), "#!/bin/sh\ntrue\n".to_owned()),
            ("app_execute".to_owned(), "#!/bin/sh\ntrue\n".to_owned()),
            ("app_epilog".to_owned(), "#!/bin/sh\ntrue\n".to_owned()),
            (format!("cluster/{}", target.cluster()), "\n".to_owned()),
        ]),
    };
    let checked = definitions::check_application(app, &UploadLimits::default()).unwrap();
    store.put_revision(&checked, Precondition::Any, &admin, now).await.unwrap();
    let frames = num("--frames", 0);
    if frames > 0 {
        let app = Upload {
            definition: toml::from_str(&format!(
                "name = 'bench_frames'\n[[inputs]]\nname = 'frames'\ntype = 'range'\nvalue = '1-{frames}'\n\
                 [[phases]]\nname = 'render'\nframes = 'frames'\n[resources.default]\nwalltime = '00:01:00'\n"
            ))
            .unwrap(),
            files: BTreeMap::from([
                ("app_render".to_owned(), "#!/bin/sh\ntrue\n".to_owned()),
                (format!("cluster/{}", target.cluster()), "\n".to_owned()),
            ]),
        };
        let checked = definitions::check_application(app, &UploadLimits::default()).unwrap();
        store.put_revision(&checked, Precondition::Any, &admin, now).await.unwrap();
    }
    let alice = UserName::parse("alice").unwrap();
    hpcforge::auth::add_user(store.as_ref(), &alice, Role::User, "bench", None, &admin, now).await.unwrap();
    let (_, portal) = hpcforge::auth::add_user(
        store.as_ref(),
        &UserName::parse("portal-bench").unwrap(),
        Role::Portal,
        "bench",
        None,
        &admin,
        now,
    )
    .await
    .unwrap();
    let tick = num("--tick", 5);
    let (base, state) = common::serve(store.clone(), dir.path(), |c| {
        c.mediator.replica = "bench-1".into();
        c.mediator.tick = Duration::from_secs(tick as u64);
        c.rate.submissions_per_minute = 1_000_000;
        c.rate.submission_burst = 1_000_000;
    })
    .await;
    common::register_key(store.as_ref(), &state, "alice", target.cluster()).await;
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut bench = Bench {
        bases: vec![base],
        cluster: target.cluster(),
        http: reqwest::Client::builder().pool_max_idle_per_host(clients).build().unwrap(),
        portal: portal.token,
        clients,
    };
    if drain {
        target.hold_all(true);
    }
    // Warm up: SSH connections, the home directory, the compiled definitions.
    bench.submit_all(4).await;
    println!(
        "hpcforge submit benchmark: {:?} ({}), {kind} store, {clients} portal clients with ?wait=submitted, {} CPUs{}",
        target,
        target.cluster(),
        std::thread::available_parallelism().map_or(1, |n| n.get()),
        if drain { ", scheduler held (jobs stay pending)" } else { "" }
    );

    if frames > 0 {
        tokio::task::block_in_place(|| target.settle());
        target.hold_all(true);
        let (mut ours, mut theirs) = (Vec::new(), Vec::new());
        for round in 1..=rounds {
            let body = json!({ "application": "bench_frames", "cluster": bench.cluster, "inputs": {} });
            let started = Instant::now();
            let resp = bench
                .http
                .post(format!("{}/api/v1/tasks?wait=submitted", bench.bases[0]))
                .bearer_auth(&bench.portal)
                .header("x-hpcforge-on-behalf-of", "alice")
                .json(&body)
                .send()
                .await
                .expect("the server answers");
            assert_eq!(resp.status(), reqwest::StatusCode::CREATED);
            let v: Value = resp.json().await.unwrap();
            let took = started.elapsed().as_secs_f64();
            let render = &v["data"]["phases"][0];
            assert!(render["job_id"].is_string(), "not submitted: {v:#}");
            assert_eq!(render["frames"]["total"], frames, "{v:#}");
            // The scheduler holds every frame under that one ID.
            let pending = as_alice(target.count_live());
            let loop_start = Instant::now();
            let out = as_alice(&format!(
                "cd /tmp && i=0; while [ $i -lt {frames} ]; do {} >/dev/null || exit 1; i=$((i+1)); done",
                target.submit_one()
            ));
            assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
            let separate = loop_start.elapsed().as_secs_f64();
            println!(
                "round {round}: hpcforge {frames} frames in {:.3} s (job array {}; the scheduler lists {} entries) | \
                 {frames} separate calls {separate:.2} s | ratio {:.1}",
                took,
                render["job_id"].as_str().unwrap_or("?"),
                String::from_utf8_lossy(&pending.stdout).trim(),
                separate / took
            );
            ours.push(took);
            theirs.push(separate);
            tokio::task::block_in_place(|| target.settle());
        }
        let (o, t) = (median(ours), median(theirs));
        println!("median: hpcforge {o:.3} s, separate calls {t:.2} s: {:.1} times faster (bar >= 20)", t / o);
        target.hold_all(false);
    } else if !replicas.is_empty() {
        let Some(m) = &mongo else { panic!("--replicas needs --store mongodb (the embedded store serves one server)") };
        let db = m.database().name().to_owned();
        // bench-1 serves throughout; the others start and stop (gracefully) as each
        // measurement needs, and the order of the counts alternates from round to
        // round (1,2,3 then 3,2,1), so Slurm's growing job table slows none of them
        // more than another.
        let mut servers: Vec<(hpcforge::store::mongo::MongoStore, hpcforge::api::AppState)> =
            vec![(m.clone(), state.clone())];
        let mut stops: Vec<common::Stop> = Vec::new();
        type Load = (u64, u64, u64, u64);
        // Per replica count: rates, local loop rates, each replica's load, seconds.
        type Measured = (Vec<f64>, Vec<f64>, Vec<Load>, f64);
        let mut results: BTreeMap<usize, Measured> = BTreeMap::new();
        for round in 0..rounds {
            let mut order = replicas.clone();
            if round % 2 == 1 {
                order.reverse();
            }
            for &n in &order {
                while servers.len() > n {
                    servers.pop();
                    bench.bases.pop();
                    stops.pop().expect("a started replica").stop().await;
                }
                while servers.len() < n {
                    let s = hpcforge::store::mongo::MongoStore::connect(
                        &e["HPCFORGE_TEST_MONGODB_URI"],
                        &db,
                        Default::default(),
                    )
                    .await
                    .unwrap();
                    let (base, st, stop) = common::serve_until(Arc::new(s.clone()), dir.path(), |c| {
                        c.mediator.tick = Duration::from_secs(tick as u64);
                        c.mediator.replica = format!("bench-{}", servers.len() + 1);
                        c.rate.submissions_per_minute = 1_000_000;
                        c.rate.submission_burst = 1_000_000;
                    })
                    .await;
                    bench.bases.push(base);
                    servers.push((s, st));
                    stops.push(stop);
                }
                // Every replica sees the others (they re-read who is alive every 5 s),
                // and each new one has its SSH connections.
                tokio::time::sleep(Duration::from_secs(6)).await;
                bench.submit_all(4 * n).await;
                tokio::task::block_in_place(|| target.settle());
                let local = target.local_loop(tasks);
                tokio::task::block_in_place(|| target.settle());
                let count = |(store, st): &(hpcforge::store::mongo::MongoStore, hpcforge::api::AppState)| {
                    let mtr = &st.metrics;
                    (
                        mtr.cluster_scripts("submit"),
                        mtr.cluster_scripts("find"),
                        mtr.cluster_scripts("status"),
                        store.commands_sent(),
                    )
                };
                let before: Vec<Load> = servers.iter().map(count).collect();
                let took = bench.submit_all(tasks).await;
                let r = results.entry(n).or_insert_with(|| (Vec::new(), Vec::new(), vec![(0, 0, 0, 0); n], 0.0));
                r.3 += took.as_secs_f64();
                for (i, (b, a)) in before.iter().zip(servers.iter().map(count)).enumerate() {
                    r.2[i].0 += a.0 - b.0;
                    r.2[i].1 += a.1 - b.1;
                    r.2[i].2 += a.2 - b.2;
                    r.2[i].3 += a.3 - b.3;
                }
                r.0.push(tasks as f64 / took.as_secs_f64());
                r.1.push(local);
                println!(
                    "  round {}, {n} replica(s): {:.1} tasks/s, local loop {local:.1} tasks/s",
                    round + 1,
                    tasks as f64 / took.as_secs_f64()
                );
                tokio::task::block_in_place(|| target.settle());
            }
        }
        let one = results.get(&1).map(|r| median(r.0.clone()));
        for (n, (rates, locals, loads, seconds)) in results {
            let (f, l) = (median(rates), median(locals));
            let vs_one = one.map_or(String::new(), |o| format!(" | {:.2} x one replica", f / o));
            println!(
                "{n} replica(s): hpcforge {f:.1} tasks/s | (b) local loop {l:.1} tasks/s | ratio {:.2}{vs_one}",
                f / l
            );
            let all_submits: u64 = loads.iter().map(|l| l.0).sum();
            for (i, (sub, find, status, cmds)) in loads.iter().enumerate() {
                println!(
                    "  replica bench-{}: {:.0} % of the submissions ({sub} submit + {find} find scripts), {:.2} status scripts/s, {:.1} store commands/s",
                    i + 1,
                    100.0 * *sub as f64 / all_submits.max(1) as f64,
                    *status as f64 / seconds,
                    *cmds as f64 / seconds
                );
            }
        }
        for stop in stops {
            stop.stop().await;
        }
    } else if scale.is_empty() {
        let (mut forge_rates, mut local_rates, mut ssh_rates, mut trips) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for round in 1..=rounds {
            // (b) the scheduler's own limit: its submit command in a local loop, no SSH.
            let local = target.local_loop(tasks);
            let before = mongo.as_ref().map(|m| m.commands_sent());
            let pid = if mongo.is_some() { store_server_pid() } else { None };
            let (cpu0, me0) = (pid.as_deref().map(cpu_seconds), cpu_seconds(&std::process::id().to_string()));
            let took = bench.submit_all(tasks).await;
            let forge = tasks as f64 / took.as_secs_f64();
            let per_task = mongo.as_ref().zip(before).map(|(m, b)| (m.commands_sent() - b) as f64 / tasks as f64);
            let share = |used: f64| 100.0 * used / took.as_secs_f64();
            println!(
                "  during it: this process {:.0} % of a core{}",
                share(cpu_seconds(&std::process::id().to_string()) - me0),
                pid.as_deref()
                    .zip(cpu0)
                    .map(|(p, c)| format!(", SecantusDB {:.0} %", share(cpu_seconds(p) - c)))
                    .unwrap_or_default()
            );
            let mut ssh = f64::NAN;
            if ssh_jobs > 0 {
                let start = Instant::now();
                for _ in 0..ssh_jobs {
                    let out = Command::new("ssh")
                        .args(["-p", &e["HPCFORGE_TEST_SSH_PORT"], "-i", &e["HPCFORGE_TEST_KEY_alice"]])
                        .args(["-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes"])
                        .arg(format!("-oUserKnownHostsFile={}", e["HPCFORGE_TEST_KNOWN_HOSTS"]))
                        .args(["alice@127.0.0.1", &format!("cd /tmp && {}", target.submit_one())])
                        .output()
                        .unwrap();
                    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
                }
                ssh = ssh_jobs as f64 / 3.0 / start.elapsed().as_secs_f64();
                ssh_rates.push(ssh);
            }
            println!(
                "round {round}: hpcforge {forge:7.1} tasks/s | (b) local loop {local:7.1} tasks/s | ratio {:.2}{}{}",
                forge / local,
                per_task.map(|p| format!(" | store commands per task {p:.1}")).unwrap_or_default(),
                if ssh.is_nan() { String::new() } else { format!(" | (a) ssh per job {ssh:.2} tasks/s") }
            );
            forge_rates.push(forge);
            local_rates.push(local);
            if let Some(p) = per_task {
                trips.push(p);
            }
            tokio::task::block_in_place(|| target.settle());
        }
        let (f, l) = (median(forge_rates), median(local_rates));
        println!("median: hpcforge {f:.1} tasks/s, (b) local loop {l:.1} tasks/s: ratio {:.2} (bar >= 0.8)", f / l);
        if !trips.is_empty() {
            println!("store commands (round trips) per task, median: {:.1}", median(trips));
        }
        if !ssh_rates.is_empty() {
            println!(
                "(a) ssh per job: {:.2} tasks/s: hpcforge is {:.1}x (bar >= 5)",
                median(ssh_rates.clone()),
                f / median(ssh_rates)
            );
        }
    } else {
        let mut rates = Vec::new();
        for n in &scale {
            let before = mongo.as_ref().map(|m| m.commands_sent());
            let took = bench.submit_all(*n).await;
            let rate = *n as f64 / took.as_secs_f64();
            let per_task = mongo.as_ref().zip(before).map(|(m, b)| (m.commands_sent() - b) as f64 / *n as f64);
            println!(
                "{n} tasks: {rate:.1} tasks/s ({:.1} s){}",
                took.as_secs_f64(),
                per_task.map(|p| format!(", {p:.1} store commands per task")).unwrap_or_default()
            );
            rates.push(rate);
        }
        println!(
            "the {}-task rate is {:.0} % of the {}-task rate (bar >= 80 %)",
            scale.last().unwrap(),
            100.0 * rates.last().unwrap() / rates[0],
            scale[0]
        );
    }
    if idle > 0 {
        let live = state.store.live_tasks().await.unwrap().len();
        let pid = match &mongo {
            Some(_) => store_server_pid().expect("SecantusDB's process"),
            None => std::process::id().to_string(),
        };
        // The newest jobs get their first pending reason from Slurm a tick or two
        // after submission (a real change, written once): let that settle first, until
        // a whole tick passes with no more than the tick's own reads.
        if let Some(m) = &mongo {
            let settle = Instant::now();
            loop {
                let c0 = m.commands_sent();
                tokio::time::sleep(Duration::from_secs(tick as u64)).await;
                if m.commands_sent() - c0 <= 4 || settle.elapsed() > Duration::from_secs(120) {
                    break;
                }
            }
            println!("settled {:.0} s after the last submission", settle.elapsed().as_secs_f64());
        } else {
            tokio::time::sleep(Duration::from_secs(3 * tick as u64)).await;
        }
        let before = mongo.as_ref().map(|m| m.commands_sent());
        let cpu = cpu_seconds(&pid);
        tokio::time::sleep(Duration::from_secs(idle as u64)).await;
        let used = cpu_seconds(&pid) - cpu;
        let commands = mongo.as_ref().zip(before).map(|(m, b)| m.commands_sent() - b);
        println!(
            "idle: {live} live tasks watched for {idle} s ({tick} s ticks): the {} used {:.1} % of a core{}",
            if mongo.is_some() { "store server (SecantusDB)" } else { "server process (embedded store)" },
            100.0 * used / idle as f64,
            commands
                .map(|c| format!(", {c} store commands ({:.1} a tick)", c as f64 / (idle as f64 / tick as f64)))
                .unwrap_or_default()
        );
    }
    as_alice(target.cancel_all());
    if drain {
        target.hold_all(false);
    }
    if let Some(m) = &mongo {
        let _ = m.database().drop().await;
    }
}

//! Submission throughput through sshd, against two baselines measured in the same run:
//!
//!     cargo bench --bench submit -- --tasks 200
//!
//! - hpcforge: N tasks × 3 phases (prolog; execute afterok; epilog afterany) created
//!   through the mediator, as `alice`, to the test environment's Slurm over SSH on
//!   127.0.0.1:2222 — timed until every phase has its Slurm job ID;
//! - (a) a plain loop of `ssh alice@127.0.0.1 sbatch ...`, one SSH connection per job;
//! - (b) a local loop of `sbatch` as alice with no SSH: the scheduler's own limit.
//!
//! Needs `scripts/test-env` up (run as root). All jobs are cancelled at the end.
//! The bar (issue 4): hpcforge ≥ 0.8 × (b) and ≥ 5 × (a), in tasks per second.

use std::collections::BTreeMap;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hpcforge::api::AppState;
use hpcforge::definitions::{self, Upload, UploadLimits, folder};
use hpcforge::forge::TaskBody;
use hpcforge::mediator::MediatorConfig;
use hpcforge::model::{AppName, ClusterName, PhaseState, UserName};
use hpcforge::secrets::{ServerKey, credential_purpose};
use hpcforge::store::{CredentialInfo, Precondition, Store, StoredCredential};

mod common;
use common::{num, should_run, test_env};

fn as_alice(script: &str) -> std::process::Output {
    Command::new("runuser").args(["-u", "alice", "--", "sh", "-c", script]).output().expect("runuser")
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

#[tokio::main]
async fn main() {
    if !should_run("benches/submit.rs is a benchmark: cargo bench --bench submit -- --tasks 200") {
        return;
    }
    let tasks = num("--tasks", 200);
    let ssh_jobs = num("--ssh-jobs", 60);
    let rounds = num("--rounds", 3);
    let e = test_env();
    let key_path = e["HPCFORGE_TEST_KEY_alice"].clone();
    let port = e["HPCFORGE_TEST_SSH_PORT"].clone();
    let known_hosts = e["HPCFORGE_TEST_KNOWN_HOSTS"].clone();

    // The server side, in process: embedded store, mediator, definitions, alice's key.
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn Store> = Arc::new(hpcforge::store::embedded::EmbeddedStore::open(dir.path()).unwrap());
    let key = Arc::new(ServerKey::from_bytes(&[42u8; 32]).unwrap());
    let cfg = MediatorConfig { tick: Duration::from_millis(500), submit_workers: 32, ..Default::default() };
    let (_stop, stop_rx) = tokio::sync::watch::channel(false);
    let state =
        AppState::new(store.clone(), UploadLimits::default(), key.clone(), cfg, Default::default(), stop_rx.clone());
    let repo = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let admin = UserName::parse("admin").unwrap();
    let cluster = folder::load_cluster(&repo.join("clusters/local-slurm"), None, &UploadLimits::default()).unwrap();
    let checked = definitions::check_cluster(cluster.upload, &UploadLimits::default()).unwrap();
    store.put_revision(&checked, Precondition::Any, &admin, time::OffsetDateTime::now_utc()).await.unwrap();
    let app = Upload {
        definition: toml::from_str("name = 'bench'\n[resources.default]\nwalltime = '00:01:00'\n").unwrap(),
        files: BTreeMap::from([
            ("app_prolog".to_owned(), "#!/bin/sh\ntrue\n".to_owned()),
            ("app_execute".to_owned(), "#!/bin/sh\ntrue\n".to_owned()),
            ("app_epilog".to_owned(), "#!/bin/sh\ntrue\n".to_owned()),
            ("cluster/local-slurm".to_owned(), "\n".to_owned()),
        ]),
    };
    let checked = definitions::check_application(app, &UploadLimits::default()).unwrap();
    store.put_revision(&checked, Precondition::Any, &admin, time::OffsetDateTime::now_utc()).await.unwrap();
    let alice = UserName::parse("alice").unwrap();
    let private = std::fs::read_to_string(&key_path).unwrap();
    let facts = hpcforge::secrets::inspect_private_key(&private).unwrap();
    let cluster_name = ClusterName::parse("local-slurm").unwrap();
    store
        .put_credential(&StoredCredential {
            info: CredentialInfo {
                user: alice.clone(),
                cluster: cluster_name.clone(),
                key_type: facts.key_type,
                fingerprint: facts.fingerprint,
                created_by: admin.clone(),
                created_at: time::OffsetDateTime::now_utc(),
            },
            sealed: key.seal(&credential_purpose("alice", "local-slurm"), private.as_bytes()),
        })
        .await
        .unwrap();
    state.mediator.start(stop_rx);
    let body = TaskBody {
        application: AppName::parse("bench").unwrap(),
        cluster: cluster_name.clone(),
        inputs: serde_json::Value::Null,
    };

    let submit_all = |n: usize| {
        let state = state.clone();
        let body = body.clone();
        let alice = alice.clone();
        async move {
            use futures::StreamExt as _;
            let start = Instant::now();
            // As a portal would: many requests at once (16 in flight).
            let ids: Vec<_> = futures::stream::iter(0..n)
                .map(|_| {
                    let (state, body, alice) = (state.clone(), body.clone(), alice.clone());
                    let access = hpcforge::mediator::Access::user(&alice);
                    async move { state.mediator.create_task(&body, &access).await.expect("task created").id }
                })
                .buffer_unordered(16)
                .collect()
                .await;
            for id in &ids {
                let t = state.mediator.wait_submitted(id, Duration::from_secs(600)).await.unwrap();
                assert!(
                    t.phases.iter().all(|p| p.job_id.is_some() && p.state != PhaseState::Blocked),
                    "task {id} not submitted: {:?}",
                    t.phases
                );
            }
            start.elapsed()
        }
    };

    // Warm up: the SSH connections, the home directory lookup, the compiled definitions.
    submit_all(4).await;

    println!(
        "hpcforge submit benchmark: {tasks} tasks x 3 phases per round, {rounds} rounds, {} CPUs",
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );
    let (mut forge_rates, mut local_rates, mut ssh_rates) = (Vec::new(), Vec::new(), Vec::new());
    for round in 1..=rounds {
        // (b) the scheduler's own limit: sbatch in a local loop, no SSH.
        let jobs = tasks * 3;
        let start = Instant::now();
        let out = as_alice(&format!(
            "cd /tmp && i=0; while [ $i -lt {jobs} ]; do sbatch --parsable --quiet --wrap true >/dev/null || exit 1; i=$((i+1)); done"
        ));
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let local = tasks as f64 / start.elapsed().as_secs_f64();

        // hpcforge: N tasks, 3 phases each, over SSH.
        let took = submit_all(tasks).await;
        let forge = tasks as f64 / took.as_secs_f64();

        // (a) one SSH connection per job.
        let start = Instant::now();
        for _ in 0..ssh_jobs {
            let out = Command::new("ssh")
                .args(["-p", &port, "-i", &key_path, "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes"])
                .arg(format!("-oUserKnownHostsFile={known_hosts}"))
                .args(["alice@127.0.0.1", "cd /tmp && sbatch --parsable --quiet --wrap true"])
                .output()
                .unwrap();
            assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        }
        let ssh = ssh_jobs as f64 / 3.0 / start.elapsed().as_secs_f64();

        println!(
            "round {round}: hpcforge {forge:8.1} tasks/s | (b) local sbatch loop {local:8.1} tasks/s | (a) ssh per job {ssh:6.2} tasks/s"
        );
        forge_rates.push(forge);
        local_rates.push(local);
        ssh_rates.push(ssh);
        // Empty the queue between rounds so every round starts alike.
        as_alice("scancel -u alice");
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    let (f, l, s) = (median(forge_rates), median(local_rates), median(ssh_rates));
    println!("median: hpcforge {f:.1} tasks/s, (b) {l:.1} tasks/s, (a) {s:.2} tasks/s");
    println!("ratios: hpcforge/(b) = {:.2} (bar >= 0.8), hpcforge/(a) = {:.1} (bar >= 5)", f / l, f / s);
    println!("SSH connections open at the end: {}", state.mediator.open_connections());
    as_alice("scancel -u alice");
}

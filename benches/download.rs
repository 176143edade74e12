//! Outputs download throughput through the public API, against `ssh` + `tar` in the
//! same run (issue 14):
//!
//!     cargo bench --bench download -- --mb 1000 --rounds 3
//!
//! A task on the test environment's Slurm (`local-slurm`) writes `--mb` MB of random
//! bytes into `out/` (50 MB files); its application declares `out/*` as its outputs.
//! Then, each round:
//!
//! - hpcforge: `GET /api/v1/tasks/{id}/outputs.tar.gz` as alice, read to the end by
//!   an HTTP client in this process (the server is in this process too), timed;
//! - ssh: `ssh alice@127.0.0.1 'cd RUN && tar -czf - out/*' > sink`, the same files
//!   the same way, timed.
//!
//! It reports each round's MB/s and ratio, the medians, and how much this process's
//! peak resident memory (`VmHWM`, the server inside it) grew over all the API
//! downloads. Bars: ratio ≥ 0.8; peak memory growth during a 1 GB download under
//! 100 MB. Needs `scripts/test-env` up (run as root).

use std::collections::BTreeMap;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hpcforge::auth::Role;
use hpcforge::definitions::{self, Upload, UploadLimits, folder};
use hpcforge::model::UserName;
use hpcforge::store::{Precondition, Store};
use serde_json::{Value, json};

mod common;
use common::{num, should_run, test_env};

/// This process's peak resident memory so far, in bytes.
fn peak_rss() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let kb = status.lines().find_map(|l| l.strip_prefix("VmHWM:")).unwrap().trim().trim_end_matches(" kB").trim();
    kb.parse::<u64>().unwrap() * 1024
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

#[tokio::main]
async fn main() {
    if !should_run("benches/download.rs is a benchmark: cargo bench --bench download -- --mb 1000 --rounds 3") {
        return;
    }
    let mb = num("--mb", 1000).max(50);
    let rounds = num("--rounds", 3).max(1);
    let e = test_env();
    let _ = rustls::crypto::ring::default_provider().install_default();

    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn Store> = Arc::new(hpcforge::store::embedded::EmbeddedStore::open(dir.path()).unwrap());
    let admin = UserName::parse("admin").unwrap();
    let now = time::OffsetDateTime::now_utc();
    let repo = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let cluster = folder::load_cluster(&repo.join("clusters/local-slurm"), None, &UploadLimits::default()).unwrap();
    let checked = definitions::check_cluster(cluster.upload, &UploadLimits::default()).unwrap();
    store.put_revision(&checked, Precondition::Any, &admin, now).await.unwrap();
    let files = mb / 50;
    let app = Upload {
        definition: toml::from_str(
            "name = 'bench_download'\noutputs = ['out/*']\n[[phases]]\nname = 'execute'\n\
             [resources.default]\nwalltime = '00:10:00'\n",
        )
        .unwrap(),
        files: BTreeMap::from([
            (
                "app_execute".to_owned(),
                format!(
                    "#!/bin/sh\nset -e\nmkdir -p out\nfor i in $(seq 1 {files}); do head -c 50000000 /dev/urandom > out/part-$i.bin; done\n"
                ),
            ),
            ("cluster/local-slurm".to_owned(), "\n".to_owned()),
        ]),
    };
    let checked = definitions::check_application(app, &UploadLimits::default()).unwrap();
    store.put_revision(&checked, Precondition::Any, &admin, now).await.unwrap();
    let alice = UserName::parse("alice").unwrap();
    let (_, token) =
        hpcforge::auth::add_user(store.as_ref(), &alice, Role::User, "bench", None, &admin, now).await.unwrap();
    let (base, state) = common::serve(store.clone(), dir.path(), |c| {
        c.mediator.replica = "bench-1".into();
        c.mediator.tick = Duration::from_secs(1);
    })
    .await;
    common::register_key(store.as_ref(), &state, "alice", "local-slurm").await;
    let http = reqwest::Client::new();
    let bearer = token.token.clone();

    // The task that writes the outputs.
    let body = json!({ "application": "bench_download", "cluster": "local-slurm", "inputs": {} });
    let made: Value = http
        .post(format!("{base}/api/v1/tasks?wait=submitted"))
        .bearer_auth(&bearer)
        .json(&body)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let id = made["data"]["id"].as_str().unwrap_or_else(|| panic!("{made:#}")).to_owned();
    let started = Instant::now();
    let run_dir = loop {
        let t: Value = http
            .get(format!("{base}/api/v1/tasks/{id}"))
            .bearer_auth(&bearer)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        match t["data"]["state"].as_str() {
            Some("completed") => break t["data"]["run_dir"].as_str().unwrap().to_owned(),
            Some("failed" | "cancelled") => panic!("the task that writes the outputs did not complete: {t:#}"),
            _ => {}
        }
        assert!(started.elapsed() < Duration::from_secs(600), "the task did not end: {t:#}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    println!("hpcforge download benchmark: {mb} MB of random bytes in {files} files, {rounds} rounds");

    let before = peak_rss();
    let (mut api, mut ssh) = (Vec::new(), Vec::new());
    for round in 1..=rounds {
        let start = Instant::now();
        let mut resp =
            http.get(format!("{base}/api/v1/tasks/{id}/outputs.tar.gz")).bearer_auth(&bearer).send().await.unwrap();
        assert_eq!(resp.status(), reqwest::StatusCode::OK);
        let mut got = 0u64;
        while let Some(chunk) = resp.chunk().await.unwrap() {
            got += chunk.len() as u64;
        }
        let a = got as f64 / 1e6 / start.elapsed().as_secs_f64();

        let start = Instant::now();
        let mut child = Command::new("ssh")
            .args(["-p", &e["HPCFORGE_TEST_SSH_PORT"], "-i", &e["HPCFORGE_TEST_KEY_alice"]])
            .args(["-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes"])
            .arg(format!("-oUserKnownHostsFile={}", e["HPCFORGE_TEST_KNOWN_HOSTS"]))
            .args(["alice@127.0.0.1", &format!("cd {run_dir} && tar -czf - out/*")])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut pipe = child.stdout.take().unwrap();
        let through = std::io::copy(&mut pipe, &mut std::io::sink()).unwrap();
        assert!(child.wait().unwrap().success(), "ssh + tar failed");
        let b = through as f64 / 1e6 / start.elapsed().as_secs_f64();
        println!(
            "round {round}: hpcforge {a:7.1} MB/s ({got} bytes) | ssh + tar {b:7.1} MB/s ({through} bytes) | ratio {:.2}",
            a / b
        );
        api.push(a);
        ssh.push(b);
    }
    let peak = peak_rss();
    let grew = peak.saturating_sub(before);
    let (a, b) = (median(api), median(ssh));
    println!(
        "median: hpcforge {a:.1} MB/s, ssh + tar {b:.1} MB/s, ratio {:.2} (bar 0.8); peak memory of this process \
         (server and client inside) {:.1} MiB, grown by {:.1} MiB over the downloads (bar: under 100 MB)",
        a / b,
        peak as f64 / (1 << 20) as f64,
        grew as f64 / (1 << 20) as f64
    );
    let _ = Command::new("runuser").args(["-u", "alice", "--", "rm", "-rf", &run_dir]).status();
}

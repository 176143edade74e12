//! What the hand-run benchmarks (`harness = false`) share: their command line, the
//! test environment's coordinates, and a server started the way `hpcforge serve`
//! starts one.

#![allow(dead_code)] // each benchmark uses part of this

use std::collections::BTreeMap;
use std::sync::Arc;

/// Whether to run: `cargo test --benches` lists or runs bench targets without
/// `--bench`; they are benchmarks, not tests, so they then only say how to run them.
pub fn should_run(usage: &str) -> bool {
    let args: Vec<String> = std::env::args().collect();
    if args.iter().any(|a| a == "--list") {
        return false;
    }
    if !args.iter().any(|a| a == "--bench") {
        println!("{usage}");
        return false;
    }
    true
}

/// The value after `name` on the command line, or `default`.
pub fn arg(name: &str, default: &str) -> String {
    let args: Vec<String> = std::env::args().collect();
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).cloned().unwrap_or_else(|| default.to_owned())
}

/// The number after `name`, or `default`.
pub fn num(name: &str, default: usize) -> usize {
    arg(name, &default.to_string()).parse().unwrap_or_else(|_| panic!("{name} takes a number"))
}

/// The variables `scripts/test-env` wrote (`HPCFORGE_TEST_*`).
pub fn test_env() -> BTreeMap<String, String> {
    let text = std::fs::read_to_string("/var/lib/hpcforge-test-env/env")
        .expect("the test environment is up (scripts/test-env, as root)");
    text.lines()
        .filter_map(|l| l.trim().trim_start_matches("export ").split_once('='))
        .map(|(k, v)| (k.to_owned(), v.trim_matches('\'').to_owned()))
        .collect()
}

/// Starts a server over `store` on 127.0.0.1:0 (the same `hpcforge::server::Server`
/// as `hpcforge serve`), with a server key in `dir`, no examples, and the
/// configuration changed by `tweak`. Returns its base URL and state; it runs until the
/// process ends.
pub async fn serve(
    store: Arc<dyn hpcforge::store::Store>,
    dir: &std::path::Path,
    tweak: impl FnOnce(&mut hpcforge::config::ServeConfig),
) -> (String, hpcforge::api::AppState) {
    let (base, state, stop) = serve_until(store, dir, tweak).await;
    std::mem::forget(stop); // runs until the process ends
    (base, state)
}

/// Registers the test environment's key of `user` for `cluster`, sealed with the
/// server key of `state`, straight in `store` (what `PUT /api/v1/credentials` does).
pub async fn register_key(
    store: &dyn hpcforge::store::Store,
    state: &hpcforge::api::AppState,
    user: &str,
    cluster: &str,
) {
    use hpcforge::store::{CredentialInfo, StoredCredential};
    let e = test_env();
    let private = std::fs::read_to_string(&e[&format!("HPCFORGE_TEST_KEY_{user}")]).unwrap();
    let facts = hpcforge::secrets::inspect_private_key(&private).unwrap();
    let purpose = hpcforge::secrets::credential_purpose(user, cluster);
    store
        .put_credential(&StoredCredential {
            info: CredentialInfo {
                user: hpcforge::model::UserName::parse(user).unwrap(),
                cluster: hpcforge::model::ClusterName::parse(cluster).unwrap(),
                key_type: facts.key_type,
                fingerprint: facts.fingerprint,
                created_by: hpcforge::model::UserName::parse("admin").unwrap(),
                created_at: time::OffsetDateTime::now_utc(),
            },
            sealed: state.mediator.key().seal(&purpose, private.as_bytes()),
        })
        .await
        .unwrap();
}

/// [`serve`], stopped gracefully (as on SIGTERM) by [`Stop::stop`].
pub async fn serve_until(
    store: Arc<dyn hpcforge::store::Store>,
    dir: &std::path::Path,
    tweak: impl FnOnce(&mut hpcforge::config::ServeConfig),
) -> (String, hpcforge::api::AppState, Stop) {
    let over = hpcforge::config::Overrides {
        listen: Some("127.0.0.1:0".parse().unwrap()),
        secret_key_file: Some(dir.join("secret.key")),
        no_examples: true,
        ..Default::default()
    };
    let mut config = hpcforge::config::ServeConfig::resolve(Default::default(), over).unwrap();
    tweak(&mut config);
    let server = hpcforge::server::Server::build_on(&config, store).await.unwrap();
    let base = format!("http://{}", server.addr());
    let state = server.state().clone();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(server.run(async move {
        let _ = rx.await;
    }));
    (base, state, Stop { tx, running })
}

/// A server started by [`serve_until`].
pub struct Stop {
    tx: tokio::sync::oneshot::Sender<()>,
    running: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Stop {
    /// Stops the server as SIGTERM would, and waits until it has.
    pub async fn stop(self) {
        let _ = self.tx.send(());
        self.running.await.expect("the server task").expect("the server stops cleanly");
    }
}

//! The `hpcforge` binary as admins and new users run it.

use std::process::{Command, Output};

use futures::TryStreamExt as _;
use mongodb::bson::{Document, doc};

use crate::helpers::{Server, fresh_db_name, repo, test_env};

use crate::helpers::BIN;

/// Runs the CLI from the repository root against `server` with `token` (none if empty).
fn hpcforge(args: &[&str], server: &str, token: &str) -> Output {
    let mut cmd = Command::new(BIN);
    cmd.current_dir(repo()).args(args).env("HPCFORGE_SERVER", server).env_remove("HPCFORGE_TOKEN");
    if !token.is_empty() {
        cmd.env("HPCFORGE_TOKEN", token);
    }
    let out = cmd.output().expect("run hpcforge");
    eprintln!(
        "$ hpcforge {}\n{}{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readme_run_command_serves_the_embedded_store_with_no_setup() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &[], &[]);
    let resp = crate::helpers::http().get(format!("{}/readyz", server.base)).send().await.unwrap();
    let v: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(v["data"]["store"], "embedded", "{v}");
    assert!(
        dir.path().join("hpcforge-data/hpcforge.sqlite3").is_file(),
        "the default data directory is ./hpcforge-data"
    );
    let status = server.stop();
    assert!(status.success(), "SIGTERM stops the server cleanly: {status}");
}

/// The issue's "done means": with the server on MongoDB, pushing the examples leaves
/// GridFS files under exactly the DESIGN.md names with sha256 metadata; pushing again
/// makes version 2 and version 1 stays readable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pushes_to_a_mongodb_server_land_in_gridfs_under_the_design_names_and_versions_stay_readable() {
    let env = test_env();
    let db_name = fresh_db_name();
    let dir = tempfile::tempdir().unwrap();
    // Without the examples seeded, so that the pushes below are the first versions.
    let server = Server::start(
        dir.path(),
        &["--no-examples"],
        &[("HPCFORGE_MONGODB_URI", env.mongodb_uri.as_str()), ("HPCFORGE_MONGODB_DATABASE", db_name.as_str())],
    );
    let admin = server.token("admin", "admin");
    let out = hpcforge(&["app", "push", "applications/sleep"], &server.base, &admin);
    assert!(out.status.success());
    assert!(stdout(&out).contains("application `sleep` stored as version 1"));
    let out = hpcforge(&["cluster", "push", "clusters/local-slurm"], &server.base, &admin);
    assert!(out.status.success());
    assert!(stdout(&out).contains("clusters/local-slurm/forge/script_common"));

    // Look in GridFS directly, not through hpcforge.
    let client = mongodb::Client::with_uri_str(&env.mongodb_uri).await.unwrap();
    let db = client.database(&db_name);
    let files: Vec<Document> = db
        .collection::<Document>("fs.files")
        .find(doc! {})
        .sort(doc! { "filename": 1 })
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap();
    let names: Vec<&str> = files.iter().map(|f| f.get_str("filename").unwrap()).collect();
    assert_eq!(
        names,
        [
            "applications/sleep/app_epilog",
            "applications/sleep/app_execute",
            "applications/sleep/app_prolog",
            "applications/sleep/cluster/local",
            "applications/sleep/cluster/local-sge",
            "applications/sleep/cluster/local-slurm",
            "clusters/local-slurm/forge/script_common",
            "clusters/local-slurm/forge/script_epilog",
            "clusters/local-slurm/forge/script_execute",
            "clusters/local-slurm/forge/script_prolog",
        ]
    );
    for f in &files {
        let meta = f.get_document("metadata").unwrap();
        let name = f.get_str("filename").unwrap();
        let source = if let Some(rest) = name.strip_prefix("clusters/local-slurm/forge/") {
            repo().join("forge-templates/slurm").join(rest)
        } else {
            repo().join(name)
        };
        let expected = hpcforge::definitions::script::sha256_hex(&std::fs::read(&source).unwrap());
        assert_eq!(meta.get_str("sha256").unwrap(), expected, "{name}");
        assert_eq!(meta.get_str("uploaded_by").unwrap(), "admin");
        assert!(meta.get("version").is_some() && meta.get("uploaded_at").is_some(), "{meta}");
    }

    let out = hpcforge(&["app", "push", "applications/sleep"], &server.base, &admin);
    assert!(stdout(&out).contains("application `sleep` stored as version 2"), "{}", stdout(&out));
    let versions: Vec<i64> = db
        .collection::<Document>("fs.files")
        .find(doc! { "filename": "applications/sleep/app_execute" })
        .sort(doc! { "metadata.version": 1 })
        .await
        .unwrap()
        .try_collect::<Vec<_>>()
        .await
        .unwrap()
        .iter()
        .map(|f| f.get_document("metadata").unwrap().get_i64("version").unwrap())
        .collect();
    assert_eq!(versions, [1, 2]);
    let out = hpcforge(&["app", "cat", "sleep", "app_execute", "--version", "1"], &server.base, &admin);
    assert!(out.status.success());
    assert_eq!(stdout(&out), std::fs::read_to_string(repo().join("applications/sleep/app_execute")).unwrap());
    let out = hpcforge(&["app", "history", "sleep"], &server.base, &admin);
    assert_eq!(stdout(&out).lines().count(), 2, "{}", stdout(&out));
}

#[test]
fn a_broken_folder_is_reported_per_file_and_field_and_nothing_is_sent() {
    let dir = tempfile::tempdir().unwrap();
    let app = dir.path().join("sleepy");
    std::fs::create_dir_all(app.join("cluster")).unwrap();
    std::fs::write(
        app.join("application.toml"),
        "name = \"sleepy\"\n[[inputs]]\nname = \"sleep\"\ntype = \"int\"\nvalue = 20\nmax = 5\n",
    )
    .unwrap();
    std::fs::write(app.join("app_prolog"), "#!/bin/bash\ntrue\n").unwrap();
    std::fs::write(app.join("app_execute"), b"#!/bin/bash\necho \xe9t\xe9\n").unwrap();
    std::fs::write(app.join("cluster/bad name"), "export X=1\n").unwrap();
    // Port 1: if anything were sent, the error would be "cannot reach".
    let out = hpcforge(&["app", "push", app.to_str().unwrap()], "http://127.0.0.1:1", "");
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains("nothing was sent"), "{err}");
    assert!(!err.contains("cannot reach"), "{err}");
    let p = |f: &str| app.join(f).display().to_string();
    assert!(
        err.contains(&format!("{}: inputs[0].value: the default value is above max (5)", p("application.toml"))),
        "{err}"
    );
    assert!(
        err.contains(&format!("{}: not UTF-8 text: invalid byte 0xe9 at line 2, byte 6", p("app_execute"))),
        "{err}"
    );
    assert!(err.contains(&format!("{}: file not found", p("app_epilog"))), "{err}");
    assert!(err.contains(&format!("{}: cluster name `bad name` is not valid", p("cluster/bad name"))), "{err}");
}

#[test]
fn a_malformed_definition_file_is_reported_with_its_line() {
    let dir = tempfile::tempdir().unwrap();
    let c = dir.path().join("c");
    std::fs::create_dir_all(&c).unwrap();
    std::fs::write(c.join("cluster.toml"), "name = \"c\"\nscheduler = \"lsf\"\n").unwrap();
    let out = hpcforge(&["cluster", "push", c.to_str().unwrap(), "--check"], "http://127.0.0.1:1", "");
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains(&format!("{}:2:13: scheduler: unknown variant `lsf`", c.join("cluster.toml").display())),
        "{err}"
    );
}

#[test]
fn check_validates_the_examples_offline() {
    for (kind, dir) in [("app", "applications/sleep"), ("app", "applications/pi"), ("cluster", "clusters/local-slurm")]
    {
        let out = hpcforge(&[kind, "push", dir, "--check"], "http://127.0.0.1:1", "");
        assert!(out.status.success(), "{dir}: {}", stderr(&out));
        assert!(stdout(&out).contains("is valid"), "{}", stdout(&out));
    }
}

#[test]
fn an_unreachable_server_is_reported_plainly() {
    let out = hpcforge(&["app", "push", "applications/sleep"], "http://127.0.0.1:1", "");
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains("cannot reach the hpcforge server at http://127.0.0.1:1: Connection refused"), "{err}");
}

/// Problems only the server finds (here: its own, smaller script cap) come back
/// located in the folder's files, not as bare JSON pointers.
#[test]
fn server_side_refusals_are_shown_against_the_folders_files() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("hpcforge.toml");
    std::fs::write(&config, "[limits]\nmax_script_bytes = 200\n").unwrap();
    let server = Server::start(dir.path(), &["--config", config.to_str().unwrap()], &[]);
    let admin = server.token("admin", "admin");
    let out = hpcforge(&["app", "push", "applications/sleep"], &server.base, &admin);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains("the server refused it (422 Unprocessable Entity)"), "{err}");
    assert!(err.contains("applications/sleep/app_prolog: the script is 343 bytes; the limit is 200 bytes"), "{err}");
}

/// The embedded store serves one server: a second `hpcforge serve` on the same data
/// directory is refused at start, naming the process that holds it and what to do
/// instead; the CLI's own direct use of the store (`user add` with no token) still
/// works beside the running server; and a server killed with SIGKILL leaves no lock
/// behind, so the next one starts on that directory at once.
#[test]
fn a_second_server_on_one_embedded_store_is_refused_and_a_killed_ones_claim_goes_with_it() {
    let dir = tempfile::tempdir().unwrap();
    let first = Server::start(dir.path(), &["--no-examples"], &[]);
    let mut cmd = Command::new(BIN);
    cmd.current_dir(dir.path()).args(["serve", "--listen", "127.0.0.1:0", "--no-examples"]);
    for (k, _) in std::env::vars().filter(|(k, _)| k.starts_with("HPCFORGE_")) {
        cmd.env_remove(k);
    }
    let mut second = cmd.stdout(std::process::Stdio::null()).stderr(std::process::Stdio::piped()).spawn().unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let status = loop {
        if let Some(status) = second.try_wait().unwrap() {
            break status;
        }
        if std::time::Instant::now() > deadline {
            let _ = second.kill();
            panic!("a second server on the same embedded store kept running");
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(&mut second.stderr.take().unwrap(), &mut err).unwrap();
    assert!(!status.success(), "{err}");
    let said = format!("another hpcforge server (process {}) is serving the embedded store in", first.pid());
    assert!(err.contains(&said), "{err}");
    assert!(err.contains("--mongodb-uri"), "says how to run several servers: {err}");
    // The first server is untouched, and the CLI may still use the store directly.
    let admin = first.token("admin", "admin");
    let out = hpcforge(&["whoami"], &first.base, &admin);
    assert!(out.status.success(), "{}", stderr(&out));
    first.kill();
    let again = Server::start(dir.path(), &["--no-examples"], &[]);
    let out = hpcforge(&["whoami"], &again.base, &admin);
    assert!(stdout(&out).contains("admin"), "the store and its accounts survived: {}", stderr(&out));
}

/// The README's flow for a new user with no cluster: `hpcforge serve` (no arguments)
/// seeds the `local` cluster and the examples; `hpcforge user add $USER --role admin`
/// prints a token; `hpcforge task submit - --watch` runs `sleep` there and exits 0
/// once it completed; `hpcforge task output ID execute` prints what its job wrote;
/// `task files` lists its run directory and `task download` fetches a file of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_user_runs_the_sleep_example_on_the_local_cluster_from_the_cli() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &[], &[]);
    let me = hpcforge::mediator::current_user().expect("the test knows who it runs as").to_string();
    let token = server.token(&me, "admin");
    assert!(hpcforge::auth::looks_like_token(&token), "`user add` prints the token alone on stdout: {token}");
    let (base, submitter) = (server.base.clone(), token.clone());
    let out = tokio::task::spawn_blocking(move || {
        use std::io::Write as _;
        let mut child = Command::new(BIN)
            .args(["task", "submit", "-", "--watch", "--server", &base])
            .env("HPCFORGE_TOKEN", &submitter)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(br#"{"application": "sleep", "cluster": "local", "inputs": {"sleep": 1}}"#)
            .unwrap();
        child.wait_with_output().unwrap()
    })
    .await
    .unwrap();
    let text = stdout(&out);
    eprintln!("{text}{}", stderr(&out));
    assert!(out.status.success(), "task submit --watch exits 0 when the task completed");
    assert!(text.contains("execute: pending → completed") || text.contains("execute: running → completed"), "{text}");
    assert!(text.lines().any(|l| l.starts_with("task ") && l.contains("  completed  ")), "{text}");
    // Clean up the run directory the example made in the home directory.
    let id = text
        .lines()
        .find_map(|l| l.strip_prefix("task "))
        .and_then(|l| l.split_whitespace().next())
        .unwrap()
        .to_owned();
    // As the README reads it: the execute job's output, read on the cluster.
    let out = hpcforge(&["task", "output", &id, "execute"], &server.base, &token);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("execute: sleeping 1s"), "{}{}", stdout(&out), stderr(&out));
    // Its files, listed and one downloaded.
    let out = hpcforge(&["task", "files", &id], &server.base, &token);
    assert!(
        out.status.success() && stdout(&out).lines().any(|l| l.ends_with(" execute.out")),
        "{}{}",
        stdout(&out),
        stderr(&out)
    );
    let saved = dir.path().join("execute-copy.out");
    let out =
        hpcforge(&["task", "download", &id, "execute.out", "--output", saved.to_str().unwrap()], &server.base, &token);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(std::fs::read_to_string(&saved).unwrap().contains("execute: sleeping 1s"));
    let out =
        hpcforge(&["task", "download", &id, "no-such-file", "--output", saved.to_str().unwrap()], &server.base, &token);
    assert!(!out.status.success() && stderr(&out).contains("there is no"), "{}", stderr(&out));
    // Without a path, the outputs' tarball: `sleep` declares none, and says so.
    let out = hpcforge(&["task", "download", &id], &server.base, &token);
    assert!(!out.status.success() && stderr(&out).contains("declares no outputs"), "{}", stderr(&out));
    let home = std::env::var("HOME").unwrap();
    let _ = std::fs::remove_dir_all(std::path::Path::new(&home).join("hpcforge-runs").join(id));
    drop(server);
}

/// Accounts from the command line: the first admin straight into the store, then
/// through the server: `whoami`, `user add/list/show/disable`, `token create/list/revoke`
/// (a revoked token is refused, saying so), and `task list` with a filter.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accounts_and_tokens_are_managed_from_the_cli() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &[], &[]);
    let base = server.base.clone();
    let admin = server.token("root-admin", "admin");

    let out = hpcforge(&["whoami"], &base, &admin);
    assert!(out.status.success());
    assert!(stdout(&out).contains("root-admin"), "{}", stdout(&out));

    // A user added through the server gets a token that works, for itself only.
    let out = hpcforge(&["user", "add", "carol", "--role", "user", "--label", "laptop"], &base, &admin);
    assert!(out.status.success());
    let carol = stdout(&out).trim().to_owned();
    assert!(hpcforge::auth::looks_like_token(&carol), "the token alone on stdout: {carol}");
    let out = hpcforge(&["whoami"], &base, &carol);
    assert!(stdout(&out).contains("carol"), "{}", stdout(&out));
    let out = hpcforge(&["user", "list"], &base, &carol);
    assert!(!out.status.success(), "a user may not list accounts");
    assert!(stderr(&out).contains("admin"), "says an admin is needed: {}", stderr(&out));
    let out = hpcforge(&["user", "list"], &base, &admin);
    let listed = stdout(&out);
    assert!(listed.lines().any(|l| l.starts_with("carol ") && l.contains("user") && l.contains("active")), "{listed}");
    assert!(listed.lines().any(|l| l.starts_with("root-admin ") && l.contains("admin")), "{listed}");

    // A second token for carol, listed with its label, then revoked: refused after.
    let out = hpcforge(&["token", "create", "--label", "script"], &base, &carol);
    assert!(out.status.success());
    let second = stdout(&out).trim().to_owned();
    assert_ne!(second, carol);
    let out = hpcforge(&["token", "list"], &base, &carol);
    let tokens = stdout(&out);
    assert_eq!(tokens.lines().count(), 2, "{tokens}");
    assert!(!tokens.contains(&second) && !tokens.contains(&carol), "a list never shows a token: {tokens}");
    let id = tokens
        .lines()
        .find(|l| l.trim_end().ends_with("script"))
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .to_owned();
    let out = hpcforge(&["token", "revoke", &id], &base, &carol);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = hpcforge(&["whoami"], &base, &second);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("revoked"), "says the token was revoked: {}", stderr(&out));
    let out = hpcforge(&["token", "list"], &base, &carol);
    assert!(stdout(&out).lines().any(|l| l.contains(&id) && l.contains("revoked")), "{}", stdout(&out));

    // Tasks: carol's own, filtered.
    let out = hpcforge(&["task", "list"], &base, &carol);
    assert!(out.status.success());
    assert!(stderr(&out).contains("no tasks"), "{}", stderr(&out));
    let out = hpcforge(&["task", "list", "--state", "sideways"], &base, &carol);
    assert!(!out.status.success(), "an unknown state is refused");
    assert!(stderr(&out).contains("sideways"), "{}", stderr(&out));

    // Disabling carol ends her tokens.
    let out = hpcforge(&["user", "disable", "carol"], &base, &admin);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = hpcforge(&["whoami"], &base, &carol);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("disabled"), "{}", stderr(&out));
    drop(server);
}

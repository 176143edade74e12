//! Shared test plumbing: the test environment's coordinates, fresh stores of every
//! kind, a server on port 0, and raw looks at what a store physically holds.

use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead as _, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use futures::TryStreamExt as _;
use hpcforge::api::AppState;
use hpcforge::api::conformance::Conformance;
use hpcforge::auth::Role;
use hpcforge::cli::client::Client;
use hpcforge::config::{FileConfig, Overrides, ServeConfig};
use hpcforge::definitions::UploadLimits;

use hpcforge::store::Store;
use hpcforge::store::embedded::EmbeddedStore;
use hpcforge::store::mongo::{MongoStore, TransactionMode};
use mongodb::bson::{Document, doc};
use tokio::sync::oneshot;

/// The `hpcforge` binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_hpcforge");

/// `hpcforge serve` as a child process, stopped (SIGTERM) when dropped.
pub struct Server {
    child: Child,
    /// `http://127.0.0.1:PORT`.
    pub base: String,
    cwd: PathBuf,
    envs: Vec<(String, String)>,
    log: std::sync::Arc<std::sync::Mutex<String>>,
}

impl Server {
    /// Starts `hpcforge serve --listen 127.0.0.1:0 <args>` in `cwd` with only `envs`
    /// from the hpcforge environment, and waits for its "listening" line.
    pub fn start(cwd: &Path, args: &[&str], envs: &[(&str, &str)]) -> Server {
        let mut cmd = Command::new(BIN);
        cmd.current_dir(cwd).args(["serve", "--listen", "127.0.0.1:0"]).args(args);
        for (k, _) in std::env::vars().filter(|(k, _)| k.starts_with("HPCFORGE_")) {
            cmd.env_remove(k);
        }
        cmd.envs(envs.iter().copied()).stdout(Stdio::null()).stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("start hpcforge serve");
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let log = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let kept = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let mut all = kept.lock().unwrap();
                all.push_str(&line);
                all.push('\n');
                drop(all);
                if let Some(rest) = line.split("listening on ").nth(1) {
                    let _ = tx.send(rest.split_whitespace().next().unwrap_or_default().to_owned());
                }
                eprintln!("[server] {line}");
            }
        });
        let base = rx.recv_timeout(Duration::from_secs(30)).expect("the server said where it listens");
        Server {
            child,
            base,
            cwd: cwd.to_owned(),
            envs: envs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect(),
            log,
        }
    }

    /// Everything the server wrote to stderr so far (its log).
    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// Runs `hpcforge <args>` as an admin would on the server's host: same working
    /// directory and store settings, no token, so it opens the store directly.
    pub fn cli_direct(&self, args: &[&str]) -> std::process::Output {
        let mut cmd = Command::new(BIN);
        cmd.current_dir(&self.cwd).args(args);
        for (k, _) in std::env::vars().filter(|(k, _)| k.starts_with("HPCFORGE_")) {
            cmd.env_remove(k);
        }
        cmd.envs(self.envs.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        cmd.output().expect("run hpcforge")
    }

    /// Makes the account `user` with `role` (`hpcforge user add`, straight into the
    /// store) and returns its token.
    pub fn token(&self, user: &str, role: &str) -> String {
        let out = self.cli_direct(&["user", "add", user, "--role", role]);
        assert!(
            out.status.success(),
            "hpcforge user add {user}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap().trim().to_owned()
    }

    /// Sends SIGTERM and returns how the process ended.
    pub fn stop(mut self) -> std::process::ExitStatus {
        let status = terminate(&mut self.child);
        std::mem::forget(self);
        status
    }
}

fn terminate(child: &mut Child) -> std::process::ExitStatus {
    let _ = Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("the server did not stop within 15 s of SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

impl Server {
    /// The server's process ID.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Kills the server with SIGKILL (no clean-up of any kind) and waits for it.
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        std::mem::forget(self);
    }

    /// Waits up to `limit` for the process to end by itself.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        terminate(&mut self.child);
    }
}

/// Where the file written by `scripts/test-env` lives, unless overridden.
const ENV_FILE: &str = "/var/lib/hpcforge-test-env/env";

/// Coordinates of the real components `scripts/test-env` starts.
#[derive(Debug, Clone)]
pub struct TestEnv {
    /// SecantusDB (MongoDB wire protocol).
    pub mongodb_uri: String,
    /// sshd address.
    pub ssh_host: String,
    /// sshd port.
    pub ssh_port: u16,
    /// sshd's host key (`ssh-ed25519 AAAA...`).
    pub ssh_host_key: String,
    /// Slurm partition.
    pub partition: String,
    /// Private key per test user.
    pub keys: BTreeMap<String, PathBuf>,
    /// Every `HPCFORGE_TEST_*` variable.
    pub vars: BTreeMap<String, String>,
}

/// One `HPCFORGE_TEST_*` variable of the test environment (fails if it is missing).
pub fn test_env_var(name: &str) -> String {
    test_env()
        .vars
        .get(name)
        .cloned()
        .unwrap_or_else(|| panic!("the test environment does not define {name}; re-run scripts/test-env"))
}

/// The test environment. Fails the test — never skips it — when it is not up.
pub fn test_env() -> &'static TestEnv {
    static ENV: OnceLock<TestEnv> = OnceLock::new();
    ENV.get_or_init(|| {
        let mut vars: BTreeMap<String, String> =
            std::env::vars().filter(|(k, _)| k.starts_with("HPCFORGE_TEST_")).collect();
        if !vars.contains_key("HPCFORGE_TEST_MONGODB_URI") {
            let file = std::env::var("HPCFORGE_TEST_ENV_FILE").unwrap_or_else(|_| ENV_FILE.to_owned());
            let text = std::fs::read_to_string(&file).unwrap_or_else(|e| {
                panic!(
                    "the test environment is not up: HPCFORGE_TEST_* is not set and {file} cannot be read ({e}).\n\
                     Run `sudo scripts/test-env` (or the whole suite with `scripts/test`)."
                )
            });
            for line in text.lines() {
                let line = line.trim().trim_start_matches("export ");
                if let Some((k, v)) = line.split_once('=') {
                    vars.insert(k.to_owned(), v.trim_matches('\'').to_owned());
                }
            }
        }
        let get = |k: &str| {
            vars.get(k)
                .cloned()
                .unwrap_or_else(|| panic!("the test environment does not define {k}; re-run scripts/test-env"))
        };
        let users = get("HPCFORGE_TEST_USERS");
        let keys =
            users.split(',').map(|u| (u.to_owned(), PathBuf::from(get(&format!("HPCFORGE_TEST_KEY_{u}"))))).collect();
        TestEnv {
            mongodb_uri: get("HPCFORGE_TEST_MONGODB_URI"),
            ssh_host: get("HPCFORGE_TEST_SSH_HOST"),
            ssh_port: get("HPCFORGE_TEST_SSH_PORT").parse().expect("HPCFORGE_TEST_SSH_PORT is a port"),
            ssh_host_key: get("HPCFORGE_TEST_SSH_HOST_KEY"),
            partition: get("HPCFORGE_TEST_SLURM_PARTITION"),
            keys,
            vars: vars.clone(),
        }
    })
}

/// The repository root (for the example definitions).
pub fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// A database name no other test uses.
pub fn fresh_db_name() -> String {
    format!("hpcforge_test_{}", uuid::Uuid::now_v7().simple())
}

/// Which store a test runs against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// SQLite in a temporary directory.
    Embedded,
    /// SecantusDB with transactions (it advertises a single-node replica set).
    Mongo,
    /// SecantusDB with transactions turned off: the commit-point path that a
    /// standalone MongoDB server gets.
    MongoWithoutTransactions,
}

/// A fresh, empty store, with what is needed to look inside it.
pub struct TestStore {
    /// The store under test.
    pub store: Arc<dyn Store>,
    /// For MongoDB: the database, to inspect GridFS directly.
    pub mongo: Option<mongodb::Database>,
    /// For the embedded store: its SQLite file.
    pub sqlite: Option<PathBuf>,
    _dir: Option<tempfile::TempDir>,
}

/// A fresh store of the given kind.
pub async fn store(backend: Backend) -> TestStore {
    match backend {
        Backend::Embedded => {
            let dir = tempfile::tempdir().expect("temp dir");
            let s = EmbeddedStore::open(dir.path()).expect("open the embedded store");
            let sqlite = Some(s.path().to_owned());
            TestStore { store: Arc::new(s), mongo: None, sqlite, _dir: Some(dir) }
        }
        Backend::Mongo | Backend::MongoWithoutTransactions => {
            let mode = if backend == Backend::Mongo { TransactionMode::Auto } else { TransactionMode::Off };
            let s = MongoStore::connect(&test_env().mongodb_uri, &fresh_db_name(), mode).await.expect("MongoDB client");
            // Fail here, clearly, if SecantusDB is not answering.
            s.ping()
                .await
                .unwrap_or_else(|e| panic!("SecantusDB at {} is not answering: {e:#}", test_env().mongodb_uri));
            let db = s.database().clone();
            TestStore { store: Arc::new(s), mongo: Some(db), sqlite: None, _dir: None }
        }
    }
}

impl TestStore {
    /// Every blob physically stored, as (name, version), sorted — read straight from
    /// GridFS's `fs.files` or SQLite's `blobs`, bypassing the store's own API.
    pub async fn raw_blobs(&self) -> Vec<(String, u32)> {
        let mut out = Vec::new();
        if let Some(db) = &self.mongo {
            let files: Vec<Document> =
                db.collection::<Document>("fs.files").find(doc! {}).await.unwrap().try_collect().await.unwrap();
            for f in files {
                let meta = f.get_document("metadata").expect("metadata");
                let version =
                    meta.get_i64("version").or_else(|_| meta.get_i32("version").map(i64::from)).expect("version");
                out.push((f.get_str("filename").unwrap().to_owned(), version as u32));
            }
        }
        if let Some(path) = &self.sqlite {
            let conn = rusqlite::Connection::open(path).unwrap();
            let mut stmt = conn.prepare("SELECT filename, version FROM blobs").unwrap();
            let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, u32>(1)?))).unwrap();
            out.extend(rows.map(Result::unwrap));
        }
        out.sort();
        out
    }

    /// How many GridFS chunks exist (MongoDB only; 0 for the embedded store).
    pub async fn raw_chunk_count(&self) -> u64 {
        match &self.mongo {
            Some(db) => db.collection::<Document>("fs.chunks").count_documents(doc! {}).await.unwrap(),
            None => 0,
        }
    }
}

/// A running server on a free loopback port (with its mediator), stopped when dropped.
/// Built by `hpcforge::server::Server`, as `hpcforge serve` builds it. Every request it
/// answers is checked against its OpenAPI document; dropping it fails the test if
/// anything disagreed.
pub struct TestApp {
    /// `http://127.0.0.1:PORT`.
    pub base: String,
    /// The CLI's client, with an admin's token.
    pub client: Client,
    /// A plain HTTP client for requests the typed client would never send.
    pub http: reqwest::Client,
    /// The server's state (store, mediator), for tests that look inside.
    pub state: AppState,
    /// What the server did against what its document says.
    pub conformance: Arc<Conformance>,
    tokens: Mutex<HashMap<String, String>>,
    shutdown: Option<oneshot::Sender<()>>,
    /// Holds the server key file.
    _dir: tempfile::TempDir,
}

impl Drop for TestApp {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        let violations = self.conformance.violations();
        if !violations.is_empty() && !std::thread::panicking() {
            panic!("the server and its OpenAPI document disagree:\n  {}", violations.join("\n  "));
        }
    }
}

impl TestApp {
    /// A token for `user`, making the account on first use: `admin` is an admin,
    /// names starting with `portal` are portals, anyone else a user.
    pub async fn token(&self, user: &str) -> String {
        if let Some(t) = self.tokens.lock().unwrap().get(user) {
            return t.clone();
        }
        let role = match user {
            "admin" => Role::Admin,
            u if u.starts_with("portal") => Role::Portal,
            _ => Role::User,
        };
        let t = make_token(self.state.store.as_ref(), user, role).await;
        self.tokens.lock().unwrap().insert(user.to_owned(), t.clone());
        t
    }

    /// A request as `user` (with their token).
    pub async fn req(&self, method: reqwest::Method, path: &str, user: &str) -> reqwest::RequestBuilder {
        self.http.request(method, format!("{}{path}", self.base)).bearer_auth(self.token(user).await)
    }
}

/// Makes (or reuses) the account `user` with `role` in `store` and a fresh token.
pub async fn make_token(store: &dyn Store, user: &str, role: Role) -> String {
    try_make_token(store, user, role).await.unwrap_or_else(|e| panic!("making a token for {user}: {e}"))
}

async fn try_make_token(store: &dyn Store, user: &str, role: Role) -> Result<String, hpcforge::auth::IssueError> {
    let name = hpcforge::model::UserName::parse(user).unwrap();
    let by = hpcforge::model::UserName::parse("tests").unwrap();
    let now = time::OffsetDateTime::now_utc();
    match hpcforge::auth::add_user(store, &name, role, "tests", None, &by, now).await {
        Ok((_, t)) => Ok(t.token),
        Err(hpcforge::auth::IssueError::Conflict(_)) => {
            Ok(hpcforge::auth::issue_token(store, &name, "tests", None, &by, now).await?.token)
        }
        Err(e) => Err(e),
    }
}

/// A plain HTTP client. reqwest is built with rustls but no default crypto provider
/// (the binary installs ring, as the CLI does); tests install it the same way.
pub fn http() -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::new()
}

/// `GET url` with `token`: the answer's JSON (whatever its status).
pub async fn get_json(url: &str, token: &str) -> serde_json::Value {
    http().get(url).bearer_auth(token).send().await.unwrap().json().await.unwrap()
}

/// The configuration tests serve with: port 0 on loopback, a fresh server key in
/// `dir`, no examples seeded, and a mediator that ticks fast; the rest as
/// `hpcforge serve` resolves it with no file, variables or flags.
pub fn test_config(dir: &Path) -> ServeConfig {
    let over = Overrides {
        listen: Some("127.0.0.1:0".parse().unwrap()),
        secret_key_file: Some(dir.join("secret.key")),
        no_examples: true,
        ..Default::default()
    };
    let mut config = ServeConfig::resolve(FileConfig::default(), over).expect("the default configuration resolves");
    config.mediator.tick = Duration::from_millis(300);
    // Several servers of one test process may share a store: each its own replica.
    config.mediator.replica = format!("test-{}", uuid::Uuid::new_v4().simple());
    config
}

/// Serves the API over `store` on 127.0.0.1:0.
pub async fn spawn_app(store: Arc<dyn Store>) -> TestApp {
    spawn_configured(store, |_| {}).await
}

/// As [`spawn_app`], with chosen limits.
pub async fn spawn_app_with(store: Arc<dyn Store>, limits: UploadLimits, max_body: usize) -> TestApp {
    spawn_configured(store, |c| {
        c.limits = limits;
        c.max_body_bytes = max_body;
    })
    .await
}

/// Serves the API over `store` on 127.0.0.1:0, with [`test_config`] changed by `tweak`.
pub async fn spawn_configured(store: Arc<dyn Store>, tweak: impl FnOnce(&mut ServeConfig)) -> TestApp {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut config = test_config(dir.path());
    tweak(&mut config);
    let server = hpcforge::server::Server::build_on(&config, store).await.expect("the server builds");
    let base = format!("http://{}", server.addr());
    let state = server.state().clone();
    let (tx, rx) = oneshot::channel();
    let conformance = Conformance::new(&hpcforge::api::openapi());
    let layer = conformance.clone();
    tokio::spawn(async move {
        server
            .run_with(|router| router.layer(axum::middleware::from_fn_with_state(layer, Conformance::layer)), async {
                let _ = rx.await;
            })
            .await
            .expect("server runs");
    });
    // A store that is down gets a well-formed token nobody knows (the tests of a
    // store outage expect 503s, not a helper that panics).
    let admin =
        match tokio::time::timeout(Duration::from_secs(5), try_make_token(state.store.as_ref(), "admin", Role::Admin))
            .await
        {
            Ok(Ok(t)) => t,
            _ => format!("hpcf_{}", "A".repeat(43)),
        };
    let tokens = Mutex::new(HashMap::from([("admin".to_owned(), admin.clone())]));
    TestApp {
        client: Client::new(&base, Some(hpcforge::config::Secret::new(admin))).unwrap(),
        http: http(),
        base,
        state,
        conformance,
        tokens,
        shutdown: Some(tx),
        _dir: dir,
    }
}

/// One module `$module` running each listed async test function against `$backend`;
/// with `with: <arg>`, the test functions take that argument before the store.
#[macro_export]
macro_rules! tests_on_store {
    ($module:ident, $backend:ident, with: $arg:expr, $($test:ident),* $(,)?) => {
        mod $module {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $test() {
                    super::$test($arg, $crate::helpers::store($crate::helpers::Backend::$backend).await).await;
                }
            )*
        }
    };
    ($module:ident, $backend:ident, $($test:ident),* $(,)?) => {
        mod $module {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $test() {
                    super::$test($crate::helpers::store($crate::helpers::Backend::$backend).await).await;
                }
            )*
        }
    };
}

/// Runs each listed async test function against every store:
/// `embedded::<name>`, `mongodb::<name>`, `mongodb_without_transactions::<name>`.
#[macro_export]
macro_rules! for_each_store {
    ($($test:ident),* $(,)?) => {
        $crate::tests_on_store!(embedded, Embedded, $($test),*);
        $crate::tests_on_store!(mongodb, Mongo, $($test),*);
        $crate::tests_on_store!(mongodb_without_transactions, MongoWithoutTransactions, $($test),*);
    };
}

/// An SSH session to the test sshd as `user`, the host key checked against the pinned one.
pub fn ssh_as(user: &str) -> ssh2::Session {
    let env = test_env();
    let tcp = std::net::TcpStream::connect((env.ssh_host.as_str(), env.ssh_port)).expect("sshd on the test port");
    let mut s = ssh2::Session::new().unwrap();
    s.set_tcp_stream(tcp);
    s.handshake().unwrap();
    let pinned = hpcforge::model::HostKey::parse(&env.ssh_host_key).unwrap();
    assert_eq!(s.host_key().unwrap().0, pinned.blob_bytes().as_slice(), "sshd's host key changed");
    s.userauth_pubkey_file(user, None, &env.keys[user], None).unwrap();
    s
}

/// Runs `command` with `stdin` over `s`; returns (exit code, stdout, stderr).
pub fn run_remote(s: &ssh2::Session, command: &str, stdin: &str) -> (i32, String, String) {
    use std::io::{Read as _, Write as _};
    let mut ch = s.channel_session().unwrap();
    ch.exec(command).unwrap();
    ch.write_all(stdin.as_bytes()).unwrap();
    ch.send_eof().unwrap();
    let (mut out, mut err) = (String::new(), String::new());
    ch.read_to_string(&mut out).unwrap();
    ch.stderr().read_to_string(&mut err).unwrap();
    ch.wait_close().unwrap();
    (ch.exit_status().unwrap(), out, err)
}

/// Runs each listed async test function against the embedded store and MongoDB
/// (the suites that talk to Slurm, where a third run would only add minutes).
#[macro_export]
macro_rules! for_embedded_and_mongodb {
    ($($test:ident),* $(,)?) => {
        $crate::tests_on_store!(embedded, Embedded, $($test),*);
        $crate::tests_on_store!(mongodb, Mongo, $($test),*);
    };
}

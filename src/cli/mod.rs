//! The command line: `hpcforge serve`, and `hpcforge app|cluster|task|user|token ...`
//! which read definition folders and talk to a running server with a token.

pub mod accounts;
pub mod client;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use reqwest::Method;
use serde_json::Value;

use crate::config::{FileConfig, Overrides, Secret, ServeConfig};
use crate::definitions::folder::{self, LoadedFolder};
use crate::definitions::{Applications, Clusters, Kind, UploadLimits};
use crate::store::Revision;
use crate::store::mongo::TransactionMode;
use client::{Client, ClientError};

/// hpcforge: the submission engine behind an HPC portal.
#[derive(Debug, Parser)]
#[command(name = "hpcforge", version, about, max_term_width = 100)]
pub struct Cli {
    /// Log filter: `info`, `debug`, `hpcforge=debug,tower_http=info`, ...
    #[arg(long, env = "HPCFORGE_LOG", default_value = "info", global = true)]
    pub log: String,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Top-level commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the server (embedded store unless a MongoDB URI is given).
    Serve(ServeArgs),
    /// Upload and inspect application definitions.
    #[command(subcommand)]
    App(DefCommand<NoExtra>),
    /// Upload and inspect cluster definitions.
    #[command(subcommand)]
    Cluster(DefCommand<TemplatesDir>),
    /// Forge a task's scripts.
    #[command(subcommand)]
    Forge(ForgeCommand),
    /// Submit and follow tasks.
    #[command(subcommand)]
    Task(TaskCommand),
    /// Register users' SSH keys for clusters (admin).
    #[command(subcommand)]
    Credential(CredentialCommand),
    /// Manage accounts (admin); `user add` also makes the first admin.
    #[command(subcommand)]
    User(accounts::UserCommand),
    /// Make, list and revoke tokens.
    #[command(subcommand)]
    Token(accounts::TokenCommand),
    /// Show who the token belongs to.
    Whoami {
        #[command(flatten)]
        server: ServerArgs,
    },
    /// Print the OpenAPI document of the API (JSON).
    Openapi,
}

/// `hpcforge task ...`
#[derive(Debug, Subcommand)]
pub enum TaskCommand {
    /// Submit a task (a JSON file: `{"application", "cluster", "inputs"}`; `-` for stdin).
    Submit {
        /// The task file.
        file: PathBuf,
        /// Follow the task until it ends; the exit code says whether it completed.
        #[arg(long)]
        watch: bool,
        #[command(flatten)]
        server: ServerArgs,
    },
    /// Show a task: its phases, jobs and events.
    Show {
        /// Task ID.
        id: String,
        /// Print the task as JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        server: ServerArgs,
    },
    /// List your tasks (an admin: everyone's), newest first.
    List {
        /// Only in these states (comma-separated: running,pending).
        #[arg(long)]
        state: Option<String>,
        /// Only of this application.
        #[arg(long)]
        application: Option<String>,
        /// Only on this cluster.
        #[arg(long)]
        cluster: Option<String>,
        /// Only this user's (admins).
        #[arg(long)]
        owner: Option<String>,
        /// Only created at or after this time (RFC 3339).
        #[arg(long)]
        since: Option<String>,
        /// How many (all pages are followed until this many are shown).
        #[arg(long, default_value_t = 50)]
        limit: usize,
        #[command(flatten)]
        server: ServerArgs,
    },
    /// Follow a task's events live until it ends.
    Watch {
        /// Task ID.
        id: String,
        #[command(flatten)]
        server: ServerArgs,
    },
    /// Print the end of a phase job's output, read on the cluster as the task's owner.
    Output {
        /// Task ID.
        id: String,
        /// The phase.
        #[arg(long, default_value = "execute")]
        phase: crate::model::Phase,
        /// Standard error instead of standard output.
        #[arg(long)]
        stderr: bool,
        /// How many lines from the end.
        #[arg(long, default_value_t = 100)]
        lines: usize,
        #[command(flatten)]
        server: ServerArgs,
    },
    /// Cancel a task: phases not yet submitted, and live jobs.
    Cancel {
        /// Task ID.
        id: String,
        #[command(flatten)]
        server: ServerArgs,
    },
    /// Run a phase and the ones after it again (keeping the history).
    Restart {
        /// Task ID.
        id: String,
        /// The phase to start from.
        #[arg(long)]
        from: crate::model::Phase,
        #[command(flatten)]
        server: ServerArgs,
    },
}

/// `hpcforge credential ...`
#[derive(Debug, Subcommand)]
pub enum CredentialCommand {
    /// Register (or replace) a user's SSH private key for a cluster.
    Add {
        /// The Unix user on the cluster.
        #[arg(long)]
        user: String,
        /// The cluster.
        #[arg(long)]
        cluster: String,
        /// The OpenSSH private key file (not passphrase-protected).
        #[arg(long)]
        key_file: PathBuf,
        #[command(flatten)]
        server: ServerArgs,
    },
    /// List registered keys (fingerprints only).
    List {
        /// Only this user's.
        #[arg(long)]
        user: Option<String>,
        #[command(flatten)]
        server: ServerArgs,
    },
    /// Remove a user's key for a cluster.
    Delete {
        /// The user.
        #[arg(long)]
        user: String,
        /// The cluster.
        #[arg(long)]
        cluster: String,
        #[command(flatten)]
        server: ServerArgs,
    },
}

/// `hpcforge forge ...`
#[derive(Debug, Subcommand)]
pub enum ForgeCommand {
    /// Show the three scripts a task would get; nothing is submitted or stored.
    Preview(PreviewArgs),
}

/// `hpcforge forge preview` options.
#[derive(Debug, Args)]
pub struct PreviewArgs {
    /// The application (or the inputs file's `application`).
    #[arg(long)]
    pub app: Option<String>,
    /// The cluster (or the inputs file's `cluster`).
    #[arg(long)]
    pub cluster: Option<String>,
    /// The task's inputs, as JSON (`-` for standard input): the portal's list of inputs,
    /// an object of name: value, or a whole task body. Without it, the defaults.
    #[arg(long, value_name = "FILE")]
    pub inputs: Option<PathBuf>,
    /// Forge from the definition folders under DIR (default: here) instead of asking a
    /// server: `DIR/applications/<app>`, `DIR/clusters/<cluster>`.
    #[arg(long, value_name = "DIR", num_args = 0..=1, default_missing_value = ".")]
    pub from_dir: Option<PathBuf>,
    /// With --from-dir: where template sets live (default: the nearest forge-templates/).
    #[arg(long)]
    pub templates_dir: Option<PathBuf>,
    /// Print only this phase's script, as is (e.g. to pipe into `bash -n`).
    #[arg(long)]
    pub phase: Option<crate::model::Phase>,
    /// Write script_<phase> files into this folder instead of printing.
    #[arg(long)]
    pub output_dir: Option<PathBuf>,
    #[command(flatten)]
    pub server: ServerArgs,
}

/// `hpcforge serve` options. Each also reads `HPCFORGE_<NAME>`; flags win over the
/// environment, which wins over `--config`.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Address to listen on [default: 127.0.0.1:8080].
    #[arg(long, env = "HPCFORGE_LISTEN")]
    pub listen: Option<std::net::SocketAddr>,
    #[command(flatten)]
    pub store: StoreArgs,
    /// The key that seals users' SSH keys (created if missing) [default: <data dir>/secret.key].
    #[arg(long, env = "HPCFORGE_SECRET_KEY_FILE")]
    pub secret_key_file: Option<PathBuf>,
    /// Do not add the example definitions to an empty store.
    #[arg(long)]
    pub no_examples: bool,
}

/// Which store: the same options for `serve` and for the commands that open the
/// store directly (`user add` without a token).
#[derive(Debug, Clone, Args)]
pub struct StoreArgs {
    /// TOML config file (see docs/architecture.md, "Configuration").
    #[arg(long, env = "HPCFORGE_CONFIG")]
    pub config: Option<PathBuf>,
    /// Use MongoDB + GridFS at this URI instead of the embedded store.
    #[arg(long, env = "HPCFORGE_MONGODB_URI", hide_env_values = true)]
    pub mongodb_uri: Option<Secret>,
    /// MongoDB database, unless the URI names one [default: hpcforge].
    #[arg(long, env = "HPCFORGE_MONGODB_DATABASE")]
    pub mongodb_database: Option<String>,
    /// Whether MongoDB writes use transactions [default: auto].
    #[arg(long, env = "HPCFORGE_MONGODB_TRANSACTIONS", value_enum)]
    pub mongodb_transactions: Option<TransactionMode>,
    /// Data directory of the embedded store [default: ./hpcforge-data].
    #[arg(long, env = "HPCFORGE_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
}

impl StoreArgs {
    /// The config layers these options resolve to (with no other overrides).
    pub fn resolve(&self) -> anyhow::Result<ServeConfig> {
        let file = match &self.config {
            Some(path) => FileConfig::load(path)?,
            None => FileConfig::default(),
        };
        let over = Overrides {
            data_dir: self.data_dir.clone(),
            mongodb_uri: self.mongodb_uri.clone(),
            mongodb_database: self.mongodb_database.clone(),
            mongodb_transactions: self.mongodb_transactions,
            ..Default::default()
        };
        ServeConfig::resolve(file, over)
    }
}

/// Where the server is, and the token to show it.
#[derive(Debug, Clone, Args)]
pub struct ServerArgs {
    /// The hpcforge server.
    #[arg(long, env = "HPCFORGE_SERVER", default_value = "http://127.0.0.1:8080")]
    pub server: String,
    /// Your token (`hpcf_...`). Prefer the variable to the flag: flags show in `ps`.
    #[arg(long, env = "HPCFORGE_TOKEN", hide_env_values = true)]
    pub token: Option<Secret>,
    /// A file holding your token (read when HPCFORGE_TOKEN is not set).
    #[arg(long, env = "HPCFORGE_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,
    /// With a portal token: the user to act for.
    #[arg(long = "as", env = "HPCFORGE_ON_BEHALF_OF")]
    pub on_behalf_of: Option<String>,
}

impl ServerArgs {
    /// The token, from the flag, the variable or the file.
    pub fn token(&self) -> anyhow::Result<Option<Secret>> {
        if let Some(t) = &self.token {
            return Ok(Some(t.clone()));
        }
        match &self.token_file {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|e| anyhow::anyhow!("reading the token file {}: {e}", path.display()))?;
                Ok(Some(Secret::new(text.trim())))
            }
            None => Ok(None),
        }
    }
}

/// No extra push options (applications).
#[derive(Debug, Clone, Args)]
pub struct NoExtra {}

/// Extra push option of clusters.
#[derive(Debug, Clone, Args)]
pub struct TemplatesDir {
    /// Folder holding template sets (`<dir>/<set>/script_common`); by default the
    /// nearest `forge-templates/` above the cluster folder.
    #[arg(long)]
    pub templates_dir: Option<PathBuf>,
}

/// Commands on definitions.
#[derive(Debug, Subcommand)]
pub enum DefCommand<X: Args> {
    /// Read a definition folder, check it, and upload it as a new version.
    Push {
        /// The folder (`applications/<name>` or `clusters/<name>`).
        dir: PathBuf,
        /// Only check the folder; send nothing.
        #[arg(long)]
        check: bool,
        #[command(flatten)]
        extra: X,
        #[command(flatten)]
        server: ServerArgs,
    },
    /// List current definitions.
    List {
        #[command(flatten)]
        server: ServerArgs,
    },
    /// Show a definition (current version unless --version).
    Show {
        /// Name.
        name: String,
        /// Version to show.
        #[arg(long)]
        version: Option<u32>,
        #[command(flatten)]
        server: ServerArgs,
    },
    /// List every version of a definition.
    History {
        /// Name.
        name: String,
        #[command(flatten)]
        server: ServerArgs,
    },
    /// Print a stored file (`app_execute`, `forge/script_common`, ...).
    Cat {
        /// Name.
        name: String,
        /// File path within the definition.
        path: String,
        /// Version to read.
        #[arg(long)]
        version: Option<u32>,
        #[command(flatten)]
        server: ServerArgs,
    },
    /// Delete a definition (old versions stay readable).
    Delete {
        /// Name.
        name: String,
        #[command(flatten)]
        server: ServerArgs,
    },
}

/// Runs the parsed command line.
pub async fn run(cli: Cli) -> ExitCode {
    let result = match cli.command {
        Command::Serve(args) => serve(args).await,
        Command::App(cmd) => {
            definitions::<Applications, NoExtra>(cmd, |dir, _, limits| {
                folder::load_application(dir, limits).map(|l| l.map_spec())
            })
            .await
        }
        Command::Cluster(cmd) => {
            definitions::<Clusters, TemplatesDir>(cmd, |dir, extra, limits| {
                folder::load_cluster(dir, extra.templates_dir.as_deref(), limits).map(|l| l.map_spec())
            })
            .await
        }
        Command::Forge(ForgeCommand::Preview(args)) => preview(args).await,
        Command::Task(cmd) => task_command(cmd).await,
        Command::Credential(cmd) => credential_command(cmd).await,
        Command::User(cmd) => accounts::user_command(cmd).await,
        Command::Token(cmd) => accounts::token_command(cmd).await,
        Command::Whoami { server } => accounts::whoami(&server).await,
        Command::Openapi => {
            println!("{}", crate::api::openapi().to_pretty_json().unwrap_or_default());
            Ok(ExitCode::SUCCESS)
        }
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(args: ServeArgs) -> anyhow::Result<ExitCode> {
    let file = match &args.store.config {
        Some(path) => FileConfig::load(path)?,
        None => FileConfig::default(),
    };
    let over = Overrides {
        listen: args.listen,
        data_dir: args.store.data_dir,
        mongodb_uri: args.store.mongodb_uri,
        mongodb_database: args.store.mongodb_database,
        mongodb_transactions: args.store.mongodb_transactions,
        secret_key_file: args.secret_key_file,
        no_examples: args.no_examples,
    };
    crate::server::serve(ServeConfig::resolve(file, over)?).await?;
    Ok(ExitCode::SUCCESS)
}

/// Whom an offline preview forges for: `--as`, else `$USER`, `$LOGNAME`, else the
/// system's answer.
fn who_am_i(server: &ServerArgs) -> Option<String> {
    server
        .on_behalf_of
        .clone()
        .or_else(|| std::env::var("USER").ok().filter(|u| !u.is_empty()))
        .or_else(|| std::env::var("LOGNAME").ok().filter(|u| !u.is_empty()))
        .or_else(|| crate::mediator::current_user().map(|u| u.to_string()))
}

/// A client for the server and token `server` names.
pub fn client(server: &ServerArgs) -> anyhow::Result<Client> {
    Ok(Client::new(&server.server, server.token()?)?.on_behalf_of(server.on_behalf_of.clone()))
}

/// For commands whose answer is its message: prints it and succeeds, or reports why not.
fn say_done<T>(answer: Result<client::Answer<T>, ClientError>) -> ExitCode {
    match answer {
        Ok(a) => {
            println!("{}", a.message);
            ExitCode::SUCCESS
        }
        Err(e) => report::<()>(e, None),
    }
}

/// Prints a server error; with a loaded folder, problems are shown per file.
fn report<S>(e: ClientError, folder: Option<&LoadedFolder<S>>) -> ExitCode {
    match e {
        ClientError::Server { status, message, errors } => {
            eprintln!("error: the server refused it ({status}): {message}");
            if status == reqwest::StatusCode::UNAUTHORIZED {
                eprintln!(
                    "hint: set HPCFORGE_TOKEN to your token; an admin makes one with `hpcforge user add NAME` or `hpcforge token create --user NAME`"
                );
            }
            for p in &errors {
                match folder {
                    Some(f) => {
                        let (file, field) = f.locate(&p.pointer);
                        match field {
                            Some(field) => eprintln!("  {}: {field}: {}", file.display(), p.message),
                            None => eprintln!("  {}: {}", file.display(), p.message),
                        }
                    }
                    None => eprintln!("  {}: {}", if p.pointer.is_empty() { "/" } else { &p.pointer }, p.message),
                }
            }
        }
        other => eprintln!("error: {other:#}"),
    }
    ExitCode::FAILURE
}

impl<S: serde::Serialize + Clone> LoadedFolder<S> {
    /// Re-types the folder's definition as JSON, so one push routine serves both kinds.
    fn map_spec(self) -> LoadedFolder<Value> {
        LoadedFolder {
            upload: crate::definitions::Upload {
                definition: serde_json::to_value(&self.upload.definition).expect("definitions serialise"),
                files: self.upload.files,
            },
            definition_file: self.definition_file,
            sources: self.sources,
            ignored: self.ignored,
        }
    }
}

/// Reads `--inputs` into a task body, with `--app` / `--cluster` winning over the file.
fn task_body(args: &PreviewArgs) -> anyhow::Result<crate::forge::TaskBody> {
    use anyhow::Context as _;
    let given: Value = match &args.inputs {
        None => Value::Null,
        Some(p) if p.as_os_str() == "-" => {
            serde_json::from_reader(std::io::stdin()).context("reading the inputs (JSON) from standard input")?
        }
        Some(p) => {
            let text = std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
            serde_json::from_str(&text).with_context(|| format!("{} is not JSON", p.display()))?
        }
    };
    let is_body = given.as_object().is_some_and(|o| o.contains_key("inputs") || o.contains_key("application"));
    let (mut app, mut cluster, inputs) = if is_body {
        let o = given.as_object().expect("checked");
        let s = |k: &str| o.get(k).and_then(Value::as_str).map(str::to_owned);
        (s("application"), s("cluster"), o.get("inputs").cloned().unwrap_or(Value::Null))
    } else {
        (None, None, given)
    };
    if args.app.is_some() {
        app = args.app.clone();
    }
    if args.cluster.is_some() {
        cluster = args.cluster.clone();
    }
    let app = app.context("which application? give --app (or `application` in the inputs file)")?;
    let cluster = cluster.context("which cluster? give --cluster (or `cluster` in the inputs file)")?;
    Ok(crate::forge::TaskBody {
        application: crate::model::AppName::parse(&app)?,
        cluster: crate::model::ClusterName::parse(&cluster)?,
        inputs,
    })
}

async fn preview(args: PreviewArgs) -> anyhow::Result<ExitCode> {
    let body = task_body(&args)?;
    let user_text = who_am_i(&args.server).unwrap_or_else(|| "anonymous".to_owned());
    let user = crate::model::UserName::parse(&user_text)?;
    let (scripts, source) = match &args.from_dir {
        Some(root) => {
            use crate::forge::local::{self, LocalError};
            let compiled = local::application(root, &body.application)
                .and_then(|a| local::cluster(root, &body.cluster, args.templates_dir.as_deref()).map(|c| (a, c)));
            let (app, cluster) = match compiled {
                Ok(x) => x,
                Err(LocalError::Folder(p)) => {
                    eprintln!("error: the definition folders have problems:");
                    for x in &p.0 {
                        eprintln!("  {x}");
                    }
                    return Ok(ExitCode::FAILURE);
                }
                Err(LocalError::Compile(p)) => return Ok(print_problems("the definitions cannot be forged", &p)),
            };
            let inputs = match app.validator.validate(&body.inputs, &cluster.spec) {
                Ok(i) => i,
                Err(p) => return Ok(print_problems("the inputs are invalid", &p)),
            };
            let home = crate::forge::assumed_home(&user);
            let req = crate::forge::ForgeRequest { task_id: crate::model::TaskId::new(), user: &user, home: &home };
            match crate::forge::render::forge(&app, &cluster, &inputs, &req) {
                Ok(f) => {
                    (f.scripts, format!("from the folders under {} (run directory {})", root.display(), f.run_dir))
                }
                Err(p) => return Ok(print_problems("the task cannot be forged", &p)),
            }
        }
        None => {
            let c = client(&args.server)?;
            match c.call::<crate::api::forge::Preview>(Method::POST, "/api/v1/forge/preview", Some(&body)).await {
                Ok(a) => (
                    a.data.scripts,
                    format!(
                        "application {} v{}, cluster {} v{}, run directory {}",
                        a.data.application.name,
                        a.data.application.version,
                        a.data.cluster.name,
                        a.data.cluster.version,
                        a.data.run_dir
                    ),
                ),
                Err(e) => return Ok(report::<()>(e, None)),
            }
        }
    };
    if let Some(dir) = &args.output_dir {
        std::fs::create_dir_all(dir)?;
        for s in &scripts {
            let path = dir.join(format!("script_{}", s.phase));
            std::fs::write(&path, &s.text)?;
            println!("{}  sha256 {}  {} bytes", path.display(), s.sha256, s.text.len());
        }
        return Ok(ExitCode::SUCCESS);
    }
    for s in scripts.iter().filter(|s| args.phase.is_none_or(|p| p == s.phase)) {
        if args.phase.is_none() {
            println!("==> script_{} ({} bytes, sha256 {}; {source}) <==", s.phase, s.text.len(), s.sha256);
        }
        print!("{}", s.text);
    }
    Ok(ExitCode::SUCCESS)
}

/// One line per phase: state, job, exit code, and what went wrong.
fn print_task(t: &crate::model::Task) {
    println!(
        "task {}  {}  ({} v{} on {} v{}, owner {})",
        t.id,
        t.state.as_str(),
        t.application.name,
        t.application.version,
        t.cluster.name,
        t.cluster.version,
        t.owner
    );
    for p in &t.phases {
        let mut line = format!(
            "  {:<8} {:<12} job {:<14}",
            p.phase.as_str(),
            p.state.as_str(),
            p.job_id.as_deref().unwrap_or("-")
        );
        if let Some(c) = p.exit_code {
            line.push_str(&format!(" exit {c}"));
        }
        if let Some(s) = p.signal {
            line.push_str(&format!(" signal {s}"));
        }
        if let Some(r) = p.reason.as_deref().or(p.explanation.as_deref()) {
            line.push_str(&format!("  {r}"));
        }
        println!("{line}");
        if let Some(m) = &p.scheduler_message {
            for l in m.lines() {
                println!("             | {l}");
            }
        }
    }
}

async fn task_command(cmd: TaskCommand) -> anyhow::Result<ExitCode> {
    use crate::model::Task;
    match cmd {
        TaskCommand::Submit { file, watch, server } => {
            let body: Value = if file.as_os_str() == "-" {
                serde_json::from_reader(std::io::stdin())?
            } else {
                let text =
                    std::fs::read_to_string(&file).map_err(|e| anyhow::anyhow!("reading {}: {e}", file.display()))?;
                serde_json::from_str(&text).map_err(|e| anyhow::anyhow!("{} is not JSON: {e}", file.display()))?
            };
            let c = client(&server)?;
            let task = match c.call::<Task>(Method::POST, "/api/v1/tasks?wait=submitted", Some(&body)).await {
                Ok(a) => a.data,
                Err(e) => return Ok(report::<()>(e, None)),
            };
            print_task(&task);
            if !watch {
                return Ok(ExitCode::SUCCESS);
            }
            let seen = task.events.last().map_or(0, |e| e.seq);
            watch_to_end(&c, &task.id.to_string(), seen).await
        }
        TaskCommand::Watch { id, server } => {
            let c = client(&server)?;
            watch_to_end(&c, &id, 0).await
        }
        TaskCommand::Output { id, phase, stderr, lines, server } => {
            let c = client(&server)?;
            let path = format!(
                "/api/v1/tasks/{id}/output/{phase}?stream={}&lines={lines}",
                if stderr { "stderr" } else { "stdout" }
            );
            match c.call::<crate::mediator::OutputTail>(Method::GET, &path, None::<&()>).await {
                Ok(a) => {
                    eprintln!("==> {} <==", a.message);
                    print!("{}", a.data.text);
                    Ok(ExitCode::SUCCESS)
                }
                Err(e) => Ok(report::<()>(e, None)),
            }
        }
        TaskCommand::Show { id, json, server } => {
            let c = client(&server)?;
            match c.call::<Task>(Method::GET, &format!("/api/v1/tasks/{id}"), None::<&()>).await {
                Ok(a) if json => println!("{}", serde_json::to_string_pretty(&a.data)?),
                Ok(a) => {
                    print_task(&a.data);
                    for e in &a.data.events {
                        println!("  {:>3}  {}  {}", e.seq, when(e.at), e.message);
                    }
                }
                Err(e) => return Ok(report::<()>(e, None)),
            }
            Ok(ExitCode::SUCCESS)
        }
        TaskCommand::List { state, application, cluster, owner, since, limit, server } => {
            let c = client(&server)?;
            let mut query: Vec<(&str, String)> = Vec::new();
            for (k, v) in [
                ("state", state),
                ("application", application),
                ("cluster", cluster),
                ("owner", owner),
                ("since", since),
            ] {
                if let Some(v) = v {
                    query.push((k, v));
                }
            }
            let mut shown = 0;
            let mut cursor: Option<String> = None;
            while shown < limit {
                let mut q = query.clone();
                q.push(("limit", (limit - shown).min(200).to_string()));
                if let Some(cur) = &cursor {
                    q.push(("cursor", cur.clone()));
                }
                let qs: Vec<String> = q.iter().map(|(k, v)| format!("{k}={}", url_escape(v))).collect();
                let page = match c
                    .call::<crate::api::tasks::TaskPage>(
                        Method::GET,
                        &format!("/api/v1/tasks?{}", qs.join("&")),
                        None::<&()>,
                    )
                    .await
                {
                    Ok(a) => a.data,
                    Err(e) => return Ok(report::<()>(e, None)),
                };
                for t in &page.tasks {
                    let jobs: Vec<&str> = t.phases.iter().map(|p| p.job_id.as_deref().unwrap_or("-")).collect();
                    println!(
                        "{}  {:<10} {:<12} {:<14} {:<10} {}  jobs {}",
                        t.id,
                        t.state.as_str(),
                        t.application.name,
                        t.cluster.name,
                        t.owner,
                        when(t.created_at),
                        jobs.join(",")
                    );
                }
                shown += page.tasks.len();
                match page.next_cursor {
                    Some(next) if !page.tasks.is_empty() => cursor = Some(next),
                    _ => break,
                }
            }
            if shown == 0 {
                eprintln!("no tasks");
            }
            Ok(ExitCode::SUCCESS)
        }
        TaskCommand::Cancel { id, server } => {
            let c = client(&server)?;
            Ok(say_done(c.call::<Task>(Method::DELETE, &format!("/api/v1/tasks/{id}"), None::<&()>).await))
        }
        TaskCommand::Restart { id, from, server } => {
            let c = client(&server)?;
            let body = serde_json::json!({ "from": from });
            Ok(say_done(c.call::<Task>(Method::POST, &format!("/api/v1/tasks/{id}/restart"), Some(&body)).await))
        }
    }
}

async fn credential_command(cmd: CredentialCommand) -> anyhow::Result<ExitCode> {
    use crate::store::CredentialInfo;
    match cmd {
        CredentialCommand::Add { user, cluster, key_file, server } => {
            let key = zeroize::Zeroizing::new(
                std::fs::read_to_string(&key_file)
                    .map_err(|e| anyhow::anyhow!("reading {}: {e}", key_file.display()))?,
            );
            let body = zeroize::Zeroizing::new(serde_json::json!({ "private_key": key.as_str() }).to_string());
            let c = client(&server)?;
            let raw: Value = serde_json::from_str(&body)?;
            Ok(say_done(
                c.call::<CredentialInfo>(Method::PUT, &format!("/api/v1/credentials/{user}/{cluster}"), Some(&raw))
                    .await,
            ))
        }
        CredentialCommand::List { user, server } => {
            let c = client(&server)?;
            let path = match user {
                Some(u) => format!("/api/v1/credentials?user={u}"),
                None => "/api/v1/credentials".to_owned(),
            };
            match c.call::<Vec<CredentialInfo>>(Method::GET, &path, None::<&()>).await {
                Ok(a) => {
                    for i in a.data {
                        println!(
                            "{:<16} {:<20} {:<12} {}  {} by {}",
                            i.user,
                            i.cluster,
                            i.key_type,
                            i.fingerprint,
                            when(i.created_at),
                            i.created_by
                        );
                    }
                    Ok(ExitCode::SUCCESS)
                }
                Err(e) => Ok(report::<()>(e, None)),
            }
        }
        CredentialCommand::Delete { user, cluster, server } => {
            let c = client(&server)?;
            Ok(say_done(
                c.call::<Value>(Method::DELETE, &format!("/api/v1/credentials/{user}/{cluster}"), None::<&()>).await,
            ))
        }
    }
}

/// Percent-encodes a query value.
fn url_escape(v: &str) -> String {
    v.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' | b',' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Follows task `id` until it ends, printing each event as it happens (the event
/// stream, resumed after drops), then the phases. Exits 0 if it completed.
async fn watch_to_end(c: &Client, id: &str, seen: u64) -> anyhow::Result<ExitCode> {
    use crate::model::{Task, TaskEvent, TaskState};
    let mut last = seen;
    let mut drops = 0;
    loop {
        let mut resp = match c.stream(&format!("/api/v1/tasks/{id}/events/stream"), Some(last)).await {
            Ok(r) => r,
            Err(e @ ClientError::Server { .. }) => return Ok(report::<()>(e, None)),
            Err(e) => {
                drops += 1;
                if drops > 10 {
                    return Ok(report::<()>(e, None));
                }
                eprintln!("note: {e}; trying again");
                tokio::time::sleep(std::time::Duration::from_secs(2)).await;
                continue;
            }
        };
        let mut buf: Vec<u8> = Vec::new();
        let (mut kind, mut data) = (String::new(), String::new());
        let mut ended = false;
        while let Ok(Some(chunk)) = resp.chunk().await {
            buf.extend_from_slice(&chunk);
            while let Some(pos) = buf.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = buf.drain(..=pos).collect();
                let line = String::from_utf8_lossy(&line);
                let line = line.trim_end_matches(['\n', '\r']);
                if line.is_empty() {
                    match kind.as_str() {
                        "event" => {
                            if let Ok(e) = serde_json::from_str::<TaskEvent>(&data) {
                                println!("{}  {}", when(e.at), e.message);
                                last = last.max(e.seq);
                            }
                        }
                        "end" => ended = true,
                        _ => {}
                    }
                    kind.clear();
                    data.clear();
                } else if let Some(v) = line.strip_prefix("event:") {
                    kind = v.trim().to_owned();
                } else if let Some(v) = line.strip_prefix("data:") {
                    data.push_str(v.strip_prefix(' ').unwrap_or(v));
                }
            }
        }
        if ended {
            break;
        }
        drops += 1;
        if drops > 10 {
            anyhow::bail!("the event stream of task {id} keeps dropping");
        }
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
    let t = match c.call::<Task>(Method::GET, &format!("/api/v1/tasks/{id}"), None::<&()>).await {
        Ok(a) => a.data,
        Err(e) => return Ok(report::<()>(e, None)),
    };
    print_task(&t);
    Ok(if t.state == TaskState::Completed { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

fn print_problems(what: &str, p: &crate::model::Problems) -> ExitCode {
    eprintln!("error: {what}:");
    for x in p.iter() {
        eprintln!("  {}: {}", if x.pointer.is_empty() { "/" } else { &x.pointer }, x.message);
    }
    ExitCode::FAILURE
}

fn when(t: time::OffsetDateTime) -> String {
    t.format(&time::format_description::well_known::Rfc3339).unwrap_or_else(|_| t.to_string())
}

fn short(sha: &str) -> &str {
    &sha[..sha.len().min(12)]
}

async fn definitions<K: Kind, X: Args + Clone>(
    cmd: DefCommand<X>,
    load: impl FnOnce(&Path, &X, &UploadLimits) -> Result<LoadedFolder<Value>, folder::FolderProblems>,
) -> anyhow::Result<ExitCode> {
    let kind = K::KIND;
    let base = format!("/api/v1/{}", kind.plural());
    match cmd {
        DefCommand::Push { dir, check, extra, server } => {
            let loaded = match load(&dir, &extra, &UploadLimits::default()) {
                Ok(l) => l,
                Err(problems) => {
                    eprintln!("error: {} has problems; nothing was sent:", dir.display());
                    for p in &problems.0 {
                        eprintln!("  {p}");
                    }
                    return Ok(ExitCode::FAILURE);
                }
            };
            for ignored in &loaded.ignored {
                eprintln!("note: {} is not part of the {} format; not sent", ignored.display(), kind.singular());
            }
            let name = loaded.upload.definition.get("name").and_then(Value::as_str).unwrap_or_default().to_owned();
            if check {
                println!(
                    "{}: {} `{name}` is valid ({} files); nothing was sent",
                    dir.display(),
                    kind.singular(),
                    loaded.upload.files.len()
                );
                return Ok(ExitCode::SUCCESS);
            }
            let c = client(&server)?;
            let answer = c
                .call::<crate::api::definitions::Pushed>(Method::PUT, &format!("{base}/{name}"), Some(&loaded.upload))
                .await;
            match answer {
                Ok(a) => {
                    println!("{} (server {})", a.message, c.base());
                    for f in &a.data.revision.files {
                        println!("  {:<48} sha256 {}…  {} bytes", f.filename, short(&f.sha256), f.size);
                    }
                    for n in &a.data.notes {
                        println!("  note: {n}");
                    }
                    Ok(ExitCode::SUCCESS)
                }
                Err(e) => Ok(report(e, Some(&loaded))),
            }
        }
        DefCommand::List { server } => {
            let c = client(&server)?;
            match c.call::<Vec<Revision>>(Method::GET, &base, None::<&()>).await {
                Ok(a) => {
                    if a.data.is_empty() {
                        println!("no {} yet", kind.plural());
                    }
                    for r in a.data {
                        let label =
                            r.definition.as_ref().and_then(|d| d.get("label")).and_then(Value::as_str).unwrap_or("");
                        println!(
                            "{:<24} v{:<4} {:<12} {}  {label}",
                            r.name,
                            r.version,
                            r.uploaded_by,
                            when(r.uploaded_at)
                        );
                    }
                    Ok(ExitCode::SUCCESS)
                }
                Err(e) => Ok(report::<()>(e, None)),
            }
        }
        DefCommand::Show { name, version, server } => {
            let c = client(&server)?;
            let path = match version {
                Some(v) => format!("{base}/{name}/versions/{v}"),
                None => format!("{base}/{name}"),
            };
            match c.call::<Value>(Method::GET, &path, None::<&()>).await {
                Ok(a) => {
                    println!("{}", serde_json::to_string_pretty(&a.data)?);
                    Ok(ExitCode::SUCCESS)
                }
                Err(e) => Ok(report::<()>(e, None)),
            }
        }
        DefCommand::History { name, server } => {
            let c = client(&server)?;
            match c.call::<Vec<Revision>>(Method::GET, &format!("{base}/{name}/versions"), None::<&()>).await {
                Ok(a) => {
                    for r in a.data {
                        let what = if r.deleted { "deleted".to_owned() } else { format!("{} files", r.files.len()) };
                        println!("v{:<4} {:<12} {}  {what}", r.version, r.uploaded_by, when(r.uploaded_at));
                    }
                    Ok(ExitCode::SUCCESS)
                }
                Err(e) => Ok(report::<()>(e, None)),
            }
        }
        DefCommand::Cat { name, path, version, server } => {
            let c = client(&server)?;
            let url = match version {
                Some(v) => format!("{base}/{name}/versions/{v}/files/{path}"),
                None => format!("{base}/{name}/files/{path}"),
            };
            match c.text(&url).await {
                Ok((text, _)) => {
                    print!("{text}");
                    Ok(ExitCode::SUCCESS)
                }
                Err(e) => Ok(report::<()>(e, None)),
            }
        }
        DefCommand::Delete { name, server } => {
            let c = client(&server)?;
            Ok(say_done(c.call::<Revision>(Method::DELETE, &format!("{base}/{name}"), None::<&()>).await))
        }
    }
}

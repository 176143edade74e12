//! The command line: `hpcforge serve`, and `hpcforge app|cluster|task|user|token ...`
//! which read definition folders and talk to a running server with a token.

pub mod accounts;
pub mod client;
pub mod credentials;
pub mod definitions;
pub mod forge;
pub mod output;
pub mod resources;
pub mod tasks;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

use crate::config::{FileConfig, Overrides, Secret, ServeConfig};
use crate::definitions::folder;
use crate::definitions::{Applications, Clusters};
use crate::store::mongo::TransactionMode;
use client::Client;
use credentials::CredentialCommand;
use definitions::{DefCommand, NoExtra, TemplatesDir};
use forge::ForgeCommand;
use tasks::TaskCommand;

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
    /// The site's pools: licences and users' shares of clusters, who holds what.
    #[command(subcommand)]
    Resources(resources::ResourcesCommand),
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
    /// This server's replica ID among the servers sharing its store [default:
    /// <hostname>-<pid>].
    #[arg(long, env = "HPCFORGE_REPLICA_ID")]
    pub replica_id: Option<String>,
    /// This installation's site ID, the host part of its task URIs
    /// (`hpcforge://<site>/tasks/<id>`); the same on every replica [default: local].
    #[arg(long, env = "HPCFORGE_SITE_ID")]
    pub site_id: Option<String>,
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

/// Runs the parsed command line.
pub async fn run(cli: Cli) -> ExitCode {
    let result = match cli.command {
        Command::Serve(args) => serve(args).await,
        Command::App(cmd) => {
            definitions::definitions::<Applications, NoExtra>(cmd, |dir, _, limits| {
                folder::load_application(dir, limits).map(|l| l.map_spec())
            })
            .await
        }
        Command::Cluster(cmd) => {
            definitions::definitions::<Clusters, TemplatesDir>(cmd, |dir, extra, limits| {
                folder::load_cluster(dir, extra.templates_dir.as_deref(), limits).map(|l| l.map_spec())
            })
            .await
        }
        Command::Forge(ForgeCommand::Preview(args)) => forge::preview(args).await,
        Command::Task(cmd) => tasks::task_command(cmd).await,
        Command::Credential(cmd) => credentials::credential_command(cmd).await,
        Command::Resources(cmd) => resources::resources_command(cmd).await,
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
        Err(e) => output::failed(&e),
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
        replica_id: args.replica_id,
        site_id: args.site_id,
    };
    crate::server::serve(ServeConfig::resolve(file, over)?).await?;
    Ok(ExitCode::SUCCESS)
}

/// Whom an offline preview forges for: `--as`, else `$USER`, `$LOGNAME`, else the
/// system's answer.
pub fn who_am_i(server: &ServerArgs) -> Option<String> {
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

//! Server configuration in layers: built-in defaults, then a TOML file (`--config`),
//! then `HPCFORGE_*` environment variables, then command-line flags (clap reads the
//! last two; a flag wins over its variable). Secrets are wrapped so `Debug` never
//! prints them.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use serde::Deserialize;

use crate::definitions::{DEFAULT_MAX_SCRIPT_BYTES, UploadLimits};
use crate::store::mongo::TransactionMode;

/// A value that must never reach a log line or an API answer.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret.
    pub fn new(s: impl Into<String>) -> Self {
        Self(s.into())
    }

    /// The secret itself, for the one place that needs it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret([redacted])")
    }
}

impl std::str::FromStr for Secret {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Self(s.to_owned()))
    }
}

/// Default address: loopback only. The API takes bearer tokens over plain HTTP; beyond
/// this host, put it behind a proxy that terminates TLS.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8080";
/// Default data directory of the embedded store.
pub const DEFAULT_DATA_DIR: &str = "./hpcforge-data";
/// Default MongoDB database.
pub const DEFAULT_MONGODB_DATABASE: &str = "hpcforge";
/// Default cap on a request body. Uploads carry scripts as JSON strings, which may be
/// larger than the files (escapes), so this is well above the per-script cap.
pub const DEFAULT_MAX_BODY_BYTES: usize = 32 << 20;

/// The `--config` file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// Address to listen on.
    pub listen: Option<SocketAddr>,
    /// Data directory of the embedded store.
    pub data_dir: Option<PathBuf>,
    /// MongoDB settings; the store is MongoDB when `mongodb.uri` is set.
    #[serde(default)]
    pub mongodb: MongoFileConfig,
    /// Request and upload limits.
    #[serde(default)]
    pub limits: LimitsFileConfig,
    /// File holding the server key that seals stored SSH keys (created if missing).
    pub secret_key_file: Option<PathBuf>,
    /// Whether an empty store gets the example definitions (`local` cluster, `sleep`,
    /// `pi`).
    pub examples: Option<bool>,
    /// The mediator.
    #[serde(default)]
    pub mediator: MediatorFileConfig,
    /// Per-user request limits.
    #[serde(default)]
    pub api: crate::api::limits::RateConfig,
    /// This server's replica ID among the servers sharing its store.
    pub replica_id: Option<String>,
    /// This installation's site ID (task URIs), the same on every replica.
    pub site_id: Option<String>,
}

/// `[mediator]` in the config file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MediatorFileConfig {
    /// Seconds between two rounds of status queries.
    pub tick_seconds: Option<f64>,
    /// Submissions in flight at once.
    pub submit_workers: Option<usize>,
    /// SSH connections per (cluster, user).
    pub connections_per_user: Option<usize>,
    /// Seconds a stopping server waits for submissions under way.
    pub drain_seconds: Option<f64>,
}

/// `[mongodb]` in the config file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MongoFileConfig {
    /// Connection string (may hold a password).
    pub uri: Option<Secret>,
    /// Database, unless the URI names one.
    pub database: Option<String>,
    /// Whether to use transactions.
    pub transactions: Option<TransactionMode>,
}

/// `[limits]` in the config file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsFileConfig {
    /// Largest script in an upload, bytes.
    pub max_script_bytes: Option<usize>,
    /// Most files in an upload.
    pub max_files: Option<usize>,
    /// Largest request body, bytes.
    pub max_body_bytes: Option<usize>,
}

impl FileConfig {
    /// Reads and parses a config file, naming the file and position on error.
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading the config file {}", path.display()))?;
        toml::from_str(&text).with_context(|| format!("in the config file {}", path.display()))
    }
}

/// Settings from the environment and flags (already merged by clap); `None` = not given.
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    /// `--listen` / `HPCFORGE_LISTEN`.
    pub listen: Option<SocketAddr>,
    /// `--data-dir` / `HPCFORGE_DATA_DIR`.
    pub data_dir: Option<PathBuf>,
    /// `--mongodb-uri` / `HPCFORGE_MONGODB_URI`.
    pub mongodb_uri: Option<Secret>,
    /// `--mongodb-database` / `HPCFORGE_MONGODB_DATABASE`.
    pub mongodb_database: Option<String>,
    /// `--mongodb-transactions` / `HPCFORGE_MONGODB_TRANSACTIONS`.
    pub mongodb_transactions: Option<TransactionMode>,
    /// `--secret-key-file` / `HPCFORGE_SECRET_KEY_FILE`.
    pub secret_key_file: Option<PathBuf>,
    /// `--no-examples`.
    pub no_examples: bool,
    /// `--replica-id` / `HPCFORGE_REPLICA_ID`.
    pub replica_id: Option<String>,
    /// `--site-id` / `HPCFORGE_SITE_ID`.
    pub site_id: Option<String>,
}

/// Which store to use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StorageConfig {
    /// SQLite under a data directory.
    Embedded {
        /// The data directory.
        data_dir: PathBuf,
    },
    /// MongoDB + GridFS.
    Mongo {
        /// Connection string.
        uri: Secret,
        /// Database (unless the URI names one).
        database: String,
        /// Transactions.
        transactions: TransactionMode,
    },
}

/// Everything `hpcforge serve` needs, resolved.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// Address to listen on.
    pub listen: SocketAddr,
    /// The store.
    pub storage: StorageConfig,
    /// Upload limits.
    pub limits: UploadLimits,
    /// Largest request body.
    pub max_body_bytes: usize,
    /// The server key file.
    pub secret_key_file: PathBuf,
    /// Whether to seed an empty store with the examples.
    pub seed_examples: bool,
    /// The mediator.
    pub mediator: crate::mediator::MediatorConfig,
    /// Per-user request limits.
    pub rate: crate::api::limits::RateConfig,
}

impl ServeConfig {
    /// Resolves the layers: defaults < file < environment < flags.
    pub fn resolve(file: FileConfig, over: Overrides) -> anyhow::Result<Self> {
        let listen = over.listen.or(file.listen).unwrap_or_else(|| DEFAULT_LISTEN.parse().expect("valid default"));
        let data_dir =
            over.data_dir.clone().or(file.data_dir.clone()).unwrap_or_else(|| PathBuf::from(DEFAULT_DATA_DIR));
        let secret_key_file =
            over.secret_key_file.or(file.secret_key_file).unwrap_or_else(|| data_dir.join("secret.key"));
        let mut mediator = crate::mediator::MediatorConfig::default();
        if let Some(t) = file.mediator.tick_seconds {
            anyhow::ensure!(t > 0.0 && t <= 3600.0, "mediator.tick_seconds must be between 0 and 3600");
            mediator.tick = std::time::Duration::from_secs_f64(t);
        }
        if let Some(n) = file.mediator.submit_workers {
            anyhow::ensure!(n > 0, "mediator.submit_workers must be above 0");
            mediator.submit_workers = n;
        }
        if let Some(n) = file.mediator.connections_per_user {
            anyhow::ensure!(
                (1..=10).contains(&n),
                "mediator.connections_per_user must be 1 to 10 (sshd's MaxSessions)"
            );
            mediator.ssh.connections_per_user = n;
        }
        if let Some(t) = file.mediator.drain_seconds {
            anyhow::ensure!((0.0..=600.0).contains(&t), "mediator.drain_seconds must be between 0 and 600");
            mediator.drain = std::time::Duration::from_secs_f64(t);
        }
        if let Some(site) = over.site_id.or(file.site_id) {
            mediator.site = crate::model::SiteId::parse(&site).map_err(anyhow::Error::msg)?;
        }
        if let Some(id) = over.replica_id.or(file.replica_id) {
            crate::mediator::replicas::check_id(&id).map_err(anyhow::Error::msg)?;
            mediator.replica = id;
        }
        let seed_examples = !over.no_examples && file.examples.unwrap_or(true);
        let uri = over.mongodb_uri.or(file.mongodb.uri).filter(|u| !u.expose().trim().is_empty());
        let storage = match uri {
            Some(uri) => StorageConfig::Mongo {
                uri,
                database: over
                    .mongodb_database
                    .or(file.mongodb.database)
                    .unwrap_or_else(|| DEFAULT_MONGODB_DATABASE.to_owned()),
                transactions: over.mongodb_transactions.or(file.mongodb.transactions).unwrap_or_default(),
            },
            None => StorageConfig::Embedded { data_dir },
        };
        let limits = UploadLimits {
            max_script_bytes: file.limits.max_script_bytes.unwrap_or(DEFAULT_MAX_SCRIPT_BYTES),
            max_files: file.limits.max_files.unwrap_or(UploadLimits::default().max_files),
        };
        let max_body_bytes = file.limits.max_body_bytes.unwrap_or(DEFAULT_MAX_BODY_BYTES);
        anyhow::ensure!(limits.max_script_bytes > 0, "limits.max_script_bytes must be above 0");
        anyhow::ensure!(max_body_bytes >= 1024, "limits.max_body_bytes must be at least 1024");
        let rate = file.api;
        anyhow::ensure!(rate.submissions_per_minute > 0, "api.submissions_per_minute must be above 0");
        anyhow::ensure!(rate.submission_burst > 0, "api.submission_burst must be above 0");
        anyhow::ensure!(rate.streams_per_user > 0, "api.streams_per_user must be above 0");
        Ok(Self { listen, storage, limits, max_body_bytes, secret_key_file, seed_examples, mediator, rate })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_give_the_embedded_store_on_loopback() {
        let c = ServeConfig::resolve(FileConfig::default(), Overrides::default()).unwrap();
        assert_eq!(c.listen.to_string(), DEFAULT_LISTEN);
        assert_eq!(c.storage, StorageConfig::Embedded { data_dir: PathBuf::from(DEFAULT_DATA_DIR) });
    }

    #[test]
    fn flags_and_environment_win_over_the_file() {
        let file: FileConfig = toml::from_str(
            r#"
            listen = "127.0.0.1:9000"
            data_dir = "/var/lib/hpcforge"
            [mongodb]
            uri = "mongodb://file-host/"
            database = "fromfile"
            [limits]
            max_script_bytes = 2048
            "#,
        )
        .unwrap();
        let over = Overrides {
            listen: Some("127.0.0.1:9999".parse().unwrap()),
            mongodb_database: Some("fromflag".into()),
            ..Default::default()
        };
        let c = ServeConfig::resolve(file, over).unwrap();
        assert_eq!(c.listen.port(), 9999);
        assert_eq!(c.limits.max_script_bytes, 2048);
        match c.storage {
            StorageConfig::Mongo { uri, database, .. } => {
                assert_eq!(uri.expose(), "mongodb://file-host/");
                assert_eq!(database, "fromflag");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn an_empty_uri_means_the_embedded_store() {
        let over = Overrides { mongodb_uri: Some(Secret::new("")), ..Default::default() };
        let c = ServeConfig::resolve(FileConfig::default(), over).unwrap();
        assert!(matches!(c.storage, StorageConfig::Embedded { .. }));
    }

    #[test]
    fn secrets_never_print() {
        let s = Secret::new("mongodb://admin:hunter2@db/");
        assert!(!format!("{s:?}").contains("hunter2"));
        let over = Overrides { mongodb_uri: Some(s), ..Default::default() };
        let c = ServeConfig::resolve(FileConfig::default(), over).unwrap();
        assert!(!format!("{c:?}").contains("hunter2"));
    }

    #[test]
    fn unknown_config_keys_are_refused() {
        let err = toml::from_str::<FileConfig>("lisen = \"x\"").unwrap_err().to_string();
        assert!(err.contains("unknown field `lisen`"), "{err}");
    }
}

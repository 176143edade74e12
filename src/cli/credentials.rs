//! `hpcforge credential ...`: register, list and remove users' SSH keys (admin).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Subcommand;
use reqwest::Method;
use serde_json::Value;

use super::output::{done, when};
use super::{ServerArgs, client};
use crate::model::accounts::CredentialInfo;

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

pub async fn credential_command(cmd: CredentialCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        CredentialCommand::Add { user, cluster, key_file, server } => {
            let key = zeroize::Zeroizing::new(
                std::fs::read_to_string(&key_file)
                    .map_err(|e| anyhow::anyhow!("reading {}: {e}", key_file.display()))?,
            );
            let body = zeroize::Zeroizing::new(serde_json::json!({ "private_key": key.as_str() }).to_string());
            let c = client(&server)?;
            let raw: Value = serde_json::from_str(&body)?;
            Ok(done(
                c.call::<CredentialInfo>(Method::PUT, &format!("/api/v1/credentials/{user}/{cluster}"), Some(&raw))
                    .await?,
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
                Err(e) => Err(e.into()),
            }
        }
        CredentialCommand::Delete { user, cluster, server } => {
            let c = client(&server)?;
            Ok(done(
                c.call::<Value>(Method::DELETE, &format!("/api/v1/credentials/{user}/{cluster}"), None::<&()>).await?,
            ))
        }
    }
}

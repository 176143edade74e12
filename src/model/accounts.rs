//! Accounts and what stands for them: roles, user accounts, bearer tokens (their
//! descriptions and hashes, never the tokens) and users' SSH credentials (sealed).
//! Records only: issuing and checking tokens is `crate::auth`, persisting them
//! `crate::store`, sealing keys `crate::secrets`.

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use uuid::Uuid;

use super::names::{ClusterName, NameError, UserName};

/// What an account may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Definitions, users, credentials, every task, metrics.
    Admin,
    /// Their own tasks; reads definitions.
    User,
    /// A trusted portal frontend: submits and reads tasks on behalf of a named user.
    Portal,
}

impl Role {
    /// Lowercase name, as in the API.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::User => "user",
            Role::Portal => "portal",
        }
    }

    /// Parses `admin`, `user` or `portal`.
    pub fn parse(text: &str) -> Result<Self, String> {
        match text {
            "admin" => Ok(Role::Admin),
            "user" => Ok(Role::User),
            "portal" => Ok(Role::Portal),
            other => Err(format!("`{}` is not a role; use admin, user or portal", other.escape_debug())),
        }
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

/// An account. For `user` and `admin` roles the name is the Unix user their tasks run
/// as; a `portal` account is a frontend and never owns tasks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct UserAccount {
    /// The name (a Unix login name).
    pub name: UserName,
    /// What the account may do.
    pub role: Role,
    /// Who created it.
    pub created_by: UserName,
    /// When.
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    /// When it was disabled (its tokens were revoked then); `null` while active.
    #[serde(default, with = "time::serde::rfc3339::option")]
    pub disabled_at: Option<OffsetDateTime>,
}

impl UserAccount {
    /// Whether the account may sign in.
    pub fn is_active(&self) -> bool {
        self.disabled_at.is_none()
    }
}

/// Identifies a token (UUID v7); safe to show and to log, unlike the token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(transparent)]
pub struct TokenId(Uuid);

impl TokenId {
    /// A fresh ID.
    pub fn new() -> Self {
        Self(Uuid::now_v7())
    }

    /// Parses a token ID.
    pub fn parse(text: &str) -> Result<Self, NameError> {
        Uuid::try_parse(text).map(Self).map_err(|e| NameError {
            what: "token ID",
            shown: text.chars().take(80).collect::<String>().escape_debug().to_string(),
            reason: e.to_string(),
        })
    }
}

impl Default for TokenId {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Display for TokenId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

/// What is known about a token, never the token itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct TokenInfo {
    /// Its ID (to list and revoke it).
    pub id: TokenId,
    /// Whose it is.
    pub user: UserName,
    /// What it is for, in the creator's words (`laptop`, `prometheus`).
    pub label: String,
    /// The first characters, to tell tokens apart (`hpcf_AbCd…`).
    pub hint: String,
    /// Who made it.
    pub created_by: UserName,
    /// When.
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    /// When it stops working.
    #[serde(with = "time::serde::rfc3339")]
    pub expires_at: OffsetDateTime,
    /// When it was revoked; `null` if it was not.
    #[serde(default, with = "time::serde::rfc3339::option")]
    pub revoked_at: Option<OffsetDateTime>,
    /// Last time it was used (to the minute or so); `null` if never.
    #[serde(default, with = "time::serde::rfc3339::option")]
    pub last_used_at: Option<OffsetDateTime>,
}

/// A token as stored: its description and the sha256 of the token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredToken {
    /// The description.
    pub info: TokenInfo,
    /// sha256 of the token, lowercase hex.
    pub hash: String,
}

/// What is known about a stored credential, without the key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct CredentialInfo {
    /// Whose key.
    pub user: UserName,
    /// For which cluster.
    pub cluster: ClusterName,
    /// Key type (`ssh-ed25519`, ...).
    pub key_type: String,
    /// The public key's SHA256 fingerprint, as `ssh-keygen -l` shows it.
    pub fingerprint: String,
    /// Who registered it.
    pub created_by: UserName,
    /// When.
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
}

/// A credential as stored: its description and the sealed (encrypted) private key.
#[derive(Clone, PartialEq, Eq)]
pub struct StoredCredential {
    /// The description.
    pub info: CredentialInfo,
    /// Nonce + ciphertext + tag, from `crate::secrets`.
    pub sealed: Vec<u8>,
}

impl std::fmt::Debug for StoredCredential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoredCredential").field("info", &self.info).field("sealed", &"[sealed]").finish()
    }
}

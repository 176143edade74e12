//! Who may call the API: user accounts with a role, and the bearer tokens that stand
//! for them.
//!
//! A token is `hpcf_` followed by 43 base64url characters (32 random bytes). Only its
//! sha256 is stored: tokens are long random strings, not passwords, so a fast hash is
//! enough to make a stolen database useless for signing in, and it lets a request find
//! its token with one indexed lookup. The token itself is shown once, when it is made.
//! Every token expires; it can be revoked earlier, and disabling a user revokes all of
//! theirs.
//!
//! [`Authenticator`] turns a presented token into a [`Principal`], with a short cache
//! so a busy status page does not cost a store read per request. A revocation made
//! through this server takes effect at once; one made through another server sharing
//! the store, within [`CACHE_TTL`].

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use ring::rand::{SecureRandom, SystemRandom};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use time::OffsetDateTime;

use crate::model::UserName;
pub use crate::model::accounts::{Role, StoredToken, TokenId, TokenInfo, UserAccount};
use crate::store::{Store, StoreError, to_millis};

/// A token just made: the only moment the token itself exists outside the caller.
#[derive(Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct IssuedToken {
    /// The token. Shown once; keep it secret.
    pub token: String,
    /// Its description.
    pub info: TokenInfo,
}

impl std::fmt::Debug for IssuedToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IssuedToken").field("token", &"[redacted]").field("info", &self.info).finish()
    }
}

/// Every token starts with this, so leaked ones are easy to find (secret scanners) and
/// a pasted SSH key or password is told apart from a token at once.
pub const TOKEN_PREFIX: &str = "hpcf_";

/// Length of a token: the prefix and 43 base64url characters (32 bytes).
pub const TOKEN_LEN: usize = TOKEN_PREFIX.len() + 43;

/// How long a token lives unless asked otherwise.
pub const DEFAULT_TOKEN_DAYS: u32 = 90;

/// The longest lifetime a token may be given (ten years).
pub const MAX_TOKEN_DAYS: u32 = 3650;

/// Longest token label.
pub const MAX_LABEL_LEN: usize = 100;

/// sha256 of a token, lowercase hex: what the store keeps and looks up.
pub fn hash_token(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// Whether `text` has the shape of a token (prefix, length, alphabet).
pub fn looks_like_token(text: &str) -> bool {
    text.len() == TOKEN_LEN
        && text.starts_with(TOKEN_PREFIX)
        && text[TOKEN_PREFIX.len()..].bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// A fresh random token.
fn generate_token() -> String {
    let mut bytes = zeroize::Zeroizing::new([0u8; 32]);
    SystemRandom::new().fill(bytes.as_mut()).expect("the system random source works");
    format!("{TOKEN_PREFIX}{}", base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes.as_ref()))
}

/// Why a request for a new account or token was refused.
#[derive(Debug, thiserror::Error)]
pub enum IssueError {
    /// The request itself is wrong (a label too long, a lifetime out of range).
    #[error("{0}")]
    Invalid(String),
    /// The account exists already, or does not exist / is disabled.
    #[error("{0}")]
    Conflict(String),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Checks a label and a lifetime in days (`None`: the default).
pub fn check_token_request(label: &str, days: Option<u32>) -> Result<u32, IssueError> {
    if label.chars().count() > MAX_LABEL_LEN {
        return Err(IssueError::Invalid(format!("the label is longer than {MAX_LABEL_LEN} characters")));
    }
    if label.chars().any(char::is_control) {
        return Err(IssueError::Invalid("the label contains control characters".into()));
    }
    let days = days.unwrap_or(DEFAULT_TOKEN_DAYS);
    if !(1..=MAX_TOKEN_DAYS).contains(&days) {
        return Err(IssueError::Invalid(format!(
            "a token lives between 1 and {MAX_TOKEN_DAYS} days; {days} was asked for"
        )));
    }
    Ok(days)
}

/// Makes a token for the active account `user`, valid for `days` (default
/// [`DEFAULT_TOKEN_DAYS`]), and stores its hash.
pub async fn issue_token(
    store: &dyn Store,
    user: &UserName,
    label: &str,
    days: Option<u32>,
    by: &UserName,
    now: OffsetDateTime,
) -> Result<IssuedToken, IssueError> {
    let days = check_token_request(label, days)?;
    match store.get_account(user).await? {
        Some(a) if a.is_active() => {}
        Some(_) => {
            return Err(IssueError::Conflict(format!("user `{user}` is disabled; tokens cannot be made for them")));
        }
        None => return Err(IssueError::Conflict(format!("there is no user `{user}`"))),
    }
    let token = generate_token();
    let now = to_millis(now);
    let info = TokenInfo {
        id: TokenId::new(),
        user: user.clone(),
        label: label.to_owned(),
        hint: format!("{}…", &token[..TOKEN_PREFIX.len() + 4]),
        created_by: by.clone(),
        created_at: now,
        expires_at: now + time::Duration::days(i64::from(days)),
        revoked_at: None,
        last_used_at: None,
    };
    store.insert_token(&StoredToken { info: info.clone(), hash: hash_token(&token) }).await?;
    tracing::info!(user = %user, token_id = %info.id, by = %by, expires_at = %info.expires_at, "token issued");
    Ok(IssuedToken { token, info })
}

/// Creates the account `name` with `role` and its first token.
pub async fn add_user(
    store: &dyn Store,
    name: &UserName,
    role: Role,
    label: &str,
    days: Option<u32>,
    by: &UserName,
    now: OffsetDateTime,
) -> Result<(UserAccount, IssuedToken), IssueError> {
    check_token_request(label, days)?;
    let account =
        UserAccount { name: name.clone(), role, created_by: by.clone(), created_at: to_millis(now), disabled_at: None };
    match store.insert_account(&account).await {
        Ok(()) => {}
        Err(StoreError::Conflict(_)) => {
            let existing = store.get_account(name).await?;
            let why = match existing {
                Some(a) if !a.is_active() => format!("user `{name}` exists and is disabled"),
                Some(a) => {
                    format!("user `{name}` exists already (role {}); make another token for them instead", a.role)
                }
                None => format!("user `{name}` exists already"),
            };
            return Err(IssueError::Conflict(why));
        }
        Err(e) => return Err(e.into()),
    }
    tracing::info!(user = %name, role = %role, by = %by, "user added");
    let token = issue_token(store, name, label, days, by, now).await?;
    Ok((account, token))
}

/// Who a request comes from, once its token checked out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// The account.
    pub user: UserName,
    /// Its role.
    pub role: Role,
    /// The token used.
    pub token: TokenId,
    /// When that token expires.
    pub expires_at: OffsetDateTime,
}

/// Why a token was not accepted. Each message says what to do.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// No token was sent.
    #[error(
        "this endpoint needs a token: send `Authorization: Bearer <token>` (an admin makes one with `hpcforge user add` or `hpcforge token create`)"
    )]
    Missing,
    /// Something was sent, but not a token.
    #[error("the Authorization header does not hold an hpcforge token (`Bearer hpcf_...`)")]
    Malformed,
    /// A well-formed token this server does not know.
    #[error("the token is not known here: mistyped, or made by another hpcforge installation")]
    Unknown,
    /// Revoked.
    #[error("the token was revoked at {0}; ask for a new one")]
    Revoked(String),
    /// Expired.
    #[error("the token expired at {0}; ask for a new one")]
    Expired(String),
    /// The account was disabled.
    #[error("user `{0}` is disabled")]
    Disabled(String),
    /// The store could not be asked.
    #[error("tokens cannot be checked right now: the store is unavailable")]
    Unavailable,
}

/// How long a checked token is trusted without asking the store again.
pub const CACHE_TTL: Duration = Duration::from_secs(10);

/// How often a token's `last_used_at` is written at most.
const TOUCH_EVERY: Duration = Duration::from_secs(60);

/// At most this many cached tokens; past it the cache is cleared (cheap, and a
/// flood of distinct valid tokens is not a realistic load).
const CACHE_MAX: usize = 10_000;

struct Cached {
    principal: Principal,
    checked: Instant,
}

/// Checks tokens against the store, caching good answers for [`CACHE_TTL`].
pub struct Authenticator {
    store: Arc<dyn Store>,
    cache: Mutex<HashMap<String, Cached>>,
    /// Active accounts, as last read: the token's own, and those portals act for.
    accounts: Mutex<HashMap<UserName, (UserAccount, Instant)>>,
    touched: Mutex<HashMap<TokenId, Instant>>,
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authenticator").finish_non_exhaustive()
    }
}

impl Authenticator {
    /// An authenticator over `store`.
    pub fn new(store: Arc<dyn Store>) -> Self {
        Self { store, cache: Mutex::default(), accounts: Mutex::default(), touched: Mutex::default() }
    }

    /// The principal `token` stands for, now.
    pub async fn authenticate(&self, token: &str) -> Result<Principal, AuthError> {
        if !looks_like_token(token) {
            return Err(AuthError::Malformed);
        }
        let hash = hash_token(token);
        let now = OffsetDateTime::now_utc();
        {
            let cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(c) = cache.get(&hash).filter(|c| c.checked.elapsed() < CACHE_TTL)
                && c.principal.expires_at > now
            {
                return Ok(c.principal.clone());
            }
        }
        let info = self
            .store
            .token_by_hash(&hash)
            .await
            .map_err(|e| {
                tracing::warn!(error = format!("{e:#}"), "cannot check a token");
                AuthError::Unavailable
            })?
            .ok_or(AuthError::Unknown)?;
        // The account first: disabling it revoked its tokens, and that is the cause to name.
        let account = self
            .active_account(&info.user)
            .await
            .map_err(|_| AuthError::Unavailable)?
            .ok_or_else(|| AuthError::Disabled(info.user.to_string()))?;
        if let Some(at) = info.revoked_at {
            return Err(AuthError::Revoked(rfc3339(at)));
        }
        if info.expires_at <= now {
            return Err(AuthError::Expired(rfc3339(info.expires_at)));
        }
        let principal =
            Principal { user: account.name, role: account.role, token: info.id, expires_at: info.expires_at };
        {
            let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
            if cache.len() >= CACHE_MAX {
                cache.clear();
            }
            cache.insert(hash, Cached { principal: principal.clone(), checked: Instant::now() });
        }
        self.touch(info.id);
        Ok(principal)
    }

    /// Records that a token was used, at most once per [`TOUCH_EVERY`], off the
    /// request's path.
    fn touch(&self, id: TokenId) {
        {
            let mut touched = self.touched.lock().unwrap_or_else(|p| p.into_inner());
            if touched.get(&id).is_some_and(|t| t.elapsed() < TOUCH_EVERY) {
                return;
            }
            if touched.len() >= CACHE_MAX {
                touched.clear();
            }
            touched.insert(id, Instant::now());
        }
        let store = self.store.clone();
        tokio::spawn(async move {
            if let Err(e) = store.touch_token(&id, to_millis(OffsetDateTime::now_utc())).await {
                tracing::debug!(token_id = %id, error = format!("{e:#}"), "could not record a token's use");
            }
        });
    }

    /// Forgets cached answers for `user` (after a revocation or a disable), so they
    /// take effect on this server at once.
    pub fn forget_user(&self, user: &UserName) {
        self.cache.lock().unwrap_or_else(|p| p.into_inner()).retain(|_, c| &c.principal.user != user);
        self.accounts.lock().unwrap_or_else(|p| p.into_inner()).remove(user);
    }

    /// `user`'s account if it exists and is active, trusted for [`CACHE_TTL`] once
    /// read (a missing or disabled account is asked about again each time, so one
    /// added since is found at once).
    pub async fn active_account(&self, user: &UserName) -> Result<Option<UserAccount>, crate::store::StoreError> {
        if let Some((a, at)) = self.accounts.lock().unwrap_or_else(|p| p.into_inner()).get(user)
            && at.elapsed() < CACHE_TTL
        {
            return Ok(Some(a.clone()));
        }
        let Some(account) = self.store.get_account(user).await?.filter(UserAccount::is_active) else {
            return Ok(None);
        };
        let mut accounts = self.accounts.lock().unwrap_or_else(|p| p.into_inner());
        if accounts.len() >= CACHE_MAX {
            accounts.clear();
        }
        accounts.insert(user.clone(), (account.clone(), Instant::now()));
        Ok(Some(account))
    }
}

fn rfc3339(t: OffsetDateTime) -> String {
    t.format(&time::format_description::well_known::Rfc3339).unwrap_or_else(|_| t.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_have_the_documented_shape_and_differ() {
        let a = generate_token();
        let b = generate_token();
        assert_ne!(a, b);
        assert!(looks_like_token(&a), "{a}");
        assert_eq!(a.len(), TOKEN_LEN);
        assert!(!looks_like_token(&a[..TOKEN_LEN - 1]));
        assert!(!looks_like_token(&format!("hpcx_{}", &a[5..])));
        assert!(!looks_like_token(&format!("{}!", &a[..TOKEN_LEN - 1])));
    }

    #[test]
    fn only_the_hash_is_kept_and_it_is_sha256_hex() {
        assert_eq!(hash_token("abc"), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
    }

    #[test]
    fn labels_and_lifetimes_are_checked() {
        assert_eq!(check_token_request("laptop", None).unwrap(), DEFAULT_TOKEN_DAYS);
        assert!(check_token_request("x", Some(0)).is_err());
        assert!(check_token_request("x", Some(MAX_TOKEN_DAYS + 1)).is_err());
        assert!(check_token_request(&"x".repeat(MAX_LABEL_LEN + 1), None).is_err());
        assert!(check_token_request("a\nb", None).is_err());
    }

    #[test]
    fn an_issued_token_never_shows_in_debug_output() {
        let t = IssuedToken {
            token: "hpcf_secret".into(),
            info: TokenInfo {
                id: TokenId::new(),
                user: UserName::parse("alice").unwrap(),
                label: String::new(),
                hint: "hpcf_secr…".into(),
                created_by: UserName::parse("admin").unwrap(),
                created_at: OffsetDateTime::UNIX_EPOCH,
                expires_at: OffsetDateTime::UNIX_EPOCH,
                revoked_at: None,
                last_used_at: None,
            },
        };
        assert!(!format!("{t:?}").contains("hpcf_secret"));
    }
}

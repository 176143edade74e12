//! Accounts in the embedded store: users, tokens (their hashes, never the tokens) and
//! sealed SSH credentials.

use rusqlite::{OptionalExtension, TransactionBehavior, params};
use time::OffsetDateTime;

use super::{EmbeddedStore, parse_ts, sql_err, ts};
use crate::model::accounts::{StoredToken, TokenId, TokenInfo, UserAccount};
use crate::model::{ClusterName, UserName};
use crate::store::{CredentialInfo, StoreError, StoredCredential, to_millis};

pub(super) async fn put_credential(s: &EmbeddedStore, credential: &StoredCredential) -> Result<(), StoreError> {
    let c = credential.clone();
    s.with_conn(move |conn| {
        conn.execute(
            "INSERT INTO credentials (user, cluster, key_type, fingerprint, sealed, created_by, created_at) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7) ON CONFLICT (user, cluster) DO UPDATE SET \
             key_type = excluded.key_type, fingerprint = excluded.fingerprint, sealed = excluded.sealed, \
             created_by = excluded.created_by, created_at = excluded.created_at",
            params![
                c.info.user.as_str(),
                c.info.cluster.as_str(),
                c.info.key_type,
                c.info.fingerprint,
                c.sealed,
                c.info.created_by.as_str(),
                ts(c.info.created_at)
            ],
        )
        .map_err(sql_err)?;
        Ok(())
    })
    .await
}

pub(super) async fn get_credential(
    s: &EmbeddedStore,
    user: &UserName,
    cluster: &ClusterName,
) -> Result<Option<StoredCredential>, StoreError> {
    let (user, cluster) = (user.to_string(), cluster.to_string());
    s.with_conn(move |c| {
        c.query_row(
            &format!("SELECT {CRED_COLS}, sealed FROM credentials WHERE user = ?1 AND cluster = ?2"),
            params![user, cluster],
            |r| Ok((raw_credential(r)?, r.get::<_, Vec<u8>>(6)?)),
        )
        .optional()
        .map_err(sql_err)?
        .map(|(info, sealed)| Ok(StoredCredential { info: info?, sealed }))
        .transpose()
    })
    .await
}

pub(super) async fn delete_credential(
    s: &EmbeddedStore,
    user: &UserName,
    cluster: &ClusterName,
) -> Result<bool, StoreError> {
    let (user, cluster) = (user.to_string(), cluster.to_string());
    s.with_conn(move |c| {
        let n = c
            .execute("DELETE FROM credentials WHERE user = ?1 AND cluster = ?2", params![user, cluster])
            .map_err(sql_err)?;
        Ok(n > 0)
    })
    .await
}

pub(super) async fn list_credentials(
    s: &EmbeddedStore,
    user: Option<&UserName>,
) -> Result<Vec<CredentialInfo>, StoreError> {
    let user = user.map(|u| u.to_string());
    s.with_conn(move |c| {
        let mut stmt = c
            .prepare(&format!(
                "SELECT {CRED_COLS} FROM credentials WHERE (?1 IS NULL OR user = ?1) ORDER BY user, cluster"
            ))
            .map_err(sql_err)?;
        let rows = stmt.query_map(params![user], raw_credential).map_err(sql_err)?;
        rows.map(|r| r.map_err(sql_err)?).collect()
    })
    .await
}

pub(super) async fn insert_account(s: &EmbeddedStore, account: &UserAccount) -> Result<(), StoreError> {
    let a = account.clone();
    s.with_conn(move |c| {
        c.execute(
            "INSERT INTO users (name, role, created_by, created_at, disabled_at) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![a.name.as_str(), a.role.as_str(), a.created_by.as_str(), ts(a.created_at), a.disabled_at.map(ts)],
        )
        .map_err(|e| {
            if e.sqlite_error_code() == Some(rusqlite::ErrorCode::ConstraintViolation) {
                StoreError::Conflict(format!("user `{}` exists already", a.name))
            } else {
                sql_err(e)
            }
        })?;
        Ok(())
    })
    .await
}

pub(super) async fn get_account(s: &EmbeddedStore, name: &UserName) -> Result<Option<UserAccount>, StoreError> {
    let name = name.to_string();
    s.with_conn(move |c| {
        c.query_row(&format!("SELECT {USER_COLS} FROM users WHERE name = ?1"), [&name], raw_account)
            .optional()
            .map_err(sql_err)?
            .transpose()
    })
    .await
}

pub(super) async fn list_accounts(s: &EmbeddedStore) -> Result<Vec<UserAccount>, StoreError> {
    s.with_conn(|c| {
        let mut stmt = c.prepare(&format!("SELECT {USER_COLS} FROM users ORDER BY name")).map_err(sql_err)?;
        let rows = stmt.query_map([], raw_account).map_err(sql_err)?;
        rows.map(|r| r.map_err(sql_err)?).collect()
    })
    .await
}

pub(super) async fn disable_account(
    s: &EmbeddedStore,
    name: &UserName,
    at: OffsetDateTime,
) -> Result<Option<UserAccount>, StoreError> {
    let (name, at) = (name.to_string(), ts(to_millis(at)));
    s.with_conn(move |c| {
        let tx = c.transaction_with_behavior(TransactionBehavior::Immediate).map_err(sql_err)?;
        tx.execute("UPDATE users SET disabled_at = ?2 WHERE name = ?1 AND disabled_at IS NULL", params![name, at])
            .map_err(sql_err)?;
        tx.execute("UPDATE tokens SET revoked_at = ?2 WHERE user = ?1 AND revoked_at IS NULL", params![name, at])
            .map_err(sql_err)?;
        let account = tx
            .query_row(&format!("SELECT {USER_COLS} FROM users WHERE name = ?1"), [&name], raw_account)
            .optional()
            .map_err(sql_err)?
            .transpose()?;
        tx.commit().map_err(sql_err)?;
        Ok(account)
    })
    .await
}

pub(super) async fn insert_token(s: &EmbeddedStore, token: &StoredToken) -> Result<(), StoreError> {
    let t = token.clone();
    s.with_conn(move |c| {
        let i = &t.info;
        c.execute(
            "INSERT INTO tokens (id, user, hash, label, hint, created_by, created_at, expires_at, revoked_at, last_used_at) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
            params![
                i.id.to_string(),
                i.user.as_str(),
                t.hash,
                i.label,
                i.hint,
                i.created_by.as_str(),
                ts(i.created_at),
                ts(i.expires_at),
                i.revoked_at.map(ts),
                i.last_used_at.map(ts)
            ],
        )
        .map_err(|e| {
            if e.sqlite_error_code() == Some(rusqlite::ErrorCode::ConstraintViolation) {
                StoreError::Conflict("a token with that ID or hash exists already".into())
            } else {
                sql_err(e)
            }
        })?;
        Ok(())
    })
    .await
}

pub(super) async fn token_by_hash(s: &EmbeddedStore, hash: &str) -> Result<Option<TokenInfo>, StoreError> {
    let hash = hash.to_owned();
    s.with_conn(move |c| {
        c.query_row(&format!("SELECT {TOKEN_COLS} FROM tokens WHERE hash = ?1"), [&hash], raw_token)
            .optional()
            .map_err(sql_err)?
            .transpose()
    })
    .await
}

pub(super) async fn list_tokens(s: &EmbeddedStore, user: &UserName) -> Result<Vec<TokenInfo>, StoreError> {
    let user = user.to_string();
    s.with_conn(move |c| {
        let mut stmt =
            c.prepare(&format!("SELECT {TOKEN_COLS} FROM tokens WHERE user = ?1 ORDER BY id")).map_err(sql_err)?;
        let rows = stmt.query_map([&user], raw_token).map_err(sql_err)?;
        rows.map(|r| r.map_err(sql_err)?).collect()
    })
    .await
}

pub(super) async fn revoke_token(
    s: &EmbeddedStore,
    user: &UserName,
    id: &TokenId,
    at: OffsetDateTime,
) -> Result<Option<TokenInfo>, StoreError> {
    let (user, id, at) = (user.to_string(), id.to_string(), ts(to_millis(at)));
    s.with_conn(move |c| {
        c.execute(
            "UPDATE tokens SET revoked_at = ?3 WHERE user = ?1 AND id = ?2 AND revoked_at IS NULL",
            params![user, id, at],
        )
        .map_err(sql_err)?;
        c.query_row(
            &format!("SELECT {TOKEN_COLS} FROM tokens WHERE user = ?1 AND id = ?2"),
            params![user, id],
            raw_token,
        )
        .optional()
        .map_err(sql_err)?
        .transpose()
    })
    .await
}

pub(super) async fn touch_token(s: &EmbeddedStore, id: &TokenId, at: OffsetDateTime) -> Result<(), StoreError> {
    let (id, at) = (id.to_string(), ts(to_millis(at)));
    s.with_conn(move |c| {
        c.execute("UPDATE tokens SET last_used_at = ?2 WHERE id = ?1", params![id, at]).map_err(sql_err)?;
        Ok(())
    })
    .await
}

/// Columns of `users` read by [`raw_account`], in order.
const USER_COLS: &str = "name, role, created_by, created_at, disabled_at";

fn raw_account(r: &rusqlite::Row<'_>) -> rusqlite::Result<Result<UserAccount, StoreError>> {
    let (name, role, by, at, disabled) = (
        r.get::<_, String>(0)?,
        r.get::<_, String>(1)?,
        r.get::<_, String>(2)?,
        r.get::<_, String>(3)?,
        r.get::<_, Option<String>>(4)?,
    );
    Ok((|| {
        let corrupt = |m: String| StoreError::Other(anyhow::anyhow!("corrupt user row `{name}`: {m}"));
        Ok(UserAccount {
            name: UserName::parse(&name).map_err(|e| corrupt(e.to_string()))?,
            role: crate::model::accounts::Role::parse(&role).map_err(corrupt)?,
            created_by: UserName::parse(&by).map_err(|e| corrupt(e.to_string()))?,
            created_at: parse_ts(&at)?,
            disabled_at: disabled.as_deref().map(parse_ts).transpose()?,
        })
    })())
}

/// Columns of `tokens` read by [`raw_token`], in order (never the hash).
const TOKEN_COLS: &str = "id, user, label, hint, created_by, created_at, expires_at, revoked_at, last_used_at";

fn raw_token(r: &rusqlite::Row<'_>) -> rusqlite::Result<Result<TokenInfo, StoreError>> {
    let text = |i| r.get::<_, String>(i);
    let opt = |i| r.get::<_, Option<String>>(i);
    let (id, user, label, hint, by, at, expires, revoked, used) =
        (text(0)?, text(1)?, text(2)?, text(3)?, text(4)?, text(5)?, text(6)?, opt(7)?, opt(8)?);
    Ok((|| {
        let corrupt = |m: String| StoreError::Other(anyhow::anyhow!("corrupt token row {id}: {m}"));
        Ok(TokenInfo {
            id: TokenId::parse(&id).map_err(|e| corrupt(e.to_string()))?,
            user: UserName::parse(&user).map_err(|e| corrupt(e.to_string()))?,
            label,
            hint,
            created_by: UserName::parse(&by).map_err(|e| corrupt(e.to_string()))?,
            created_at: parse_ts(&at)?,
            expires_at: parse_ts(&expires)?,
            revoked_at: revoked.as_deref().map(parse_ts).transpose()?,
            last_used_at: used.as_deref().map(parse_ts).transpose()?,
        })
    })())
}

/// Columns of `credentials` read by [`raw_credential`], in order.
const CRED_COLS: &str = "user, cluster, key_type, fingerprint, created_by, created_at";

fn raw_credential(r: &rusqlite::Row<'_>) -> rusqlite::Result<Result<CredentialInfo, StoreError>> {
    let text = |i| r.get::<_, String>(i);
    let (user, cluster, key_type, fingerprint, by, at) = (text(0)?, text(1)?, text(2)?, text(3)?, text(4)?, text(5)?);
    Ok((|| {
        let bad = |e: crate::model::NameError| StoreError::Other(anyhow::anyhow!("corrupt credential: {e}"));
        Ok(CredentialInfo {
            user: UserName::parse(&user).map_err(bad)?,
            cluster: ClusterName::parse(&cluster).map_err(bad)?,
            key_type,
            fingerprint,
            created_by: UserName::parse(&by).map_err(bad)?,
            created_at: parse_ts(&at)?,
        })
    })())
}

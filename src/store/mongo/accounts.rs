//! Accounts in MongoDB: `users` (`_id` the name), `tokens` (the sha256 of each,
//! never the token) and `credentials` (sealed SSH keys per user and cluster).

use futures::TryStreamExt as _;
use mongodb::bson::{Binary, Bson, Document, doc, spec::BinarySubtype};
use time::OffsetDateTime;

use super::{MongoStore, classify, from_bson_time, is_duplicate_key, to_bson_time};
use crate::model::accounts::{Role, StoredToken, TokenId, TokenInfo, UserAccount};
use crate::model::{ClusterName, UserName};
use crate::store::{CredentialInfo, StoreError, StoredCredential};

pub(super) async fn put_credential(s: &MongoStore, credential: &StoredCredential) -> Result<(), StoreError> {
    s.ensure_ready().await?;
    let i = &credential.info;
    let doc = doc! {
        "user": i.user.as_str(),
        "cluster": i.cluster.as_str(),
        "key_type": &i.key_type,
        "fingerprint": &i.fingerprint,
        "sealed": Binary { subtype: BinarySubtype::Generic, bytes: credential.sealed.clone() },
        "created_by": i.created_by.as_str(),
        "created_at": to_bson_time(i.created_at),
    };
    s.credentials()
        .replace_one(doc! { "user": i.user.as_str(), "cluster": i.cluster.as_str() }, doc)
        .upsert(true)
        .await
        .map_err(|e| classify(e, "storing a credential"))?;
    Ok(())
}

pub(super) async fn get_credential(
    s: &MongoStore,
    user: &UserName,
    cluster: &ClusterName,
) -> Result<Option<StoredCredential>, StoreError> {
    s.ensure_ready().await?;
    let found = s
        .credentials()
        .find_one(doc! { "user": user.as_str(), "cluster": cluster.as_str() })
        .await
        .map_err(|e| classify(e, "reading a credential"))?;
    found
        .map(|d| {
            let sealed = d.get_binary_generic("sealed").map_err(|_| corrupt_credential("no sealed key"))?.clone();
            Ok(StoredCredential { info: credential_info(&d)?, sealed })
        })
        .transpose()
}

pub(super) async fn delete_credential(
    s: &MongoStore,
    user: &UserName,
    cluster: &ClusterName,
) -> Result<bool, StoreError> {
    s.ensure_ready().await?;
    let r = s
        .credentials()
        .delete_one(doc! { "user": user.as_str(), "cluster": cluster.as_str() })
        .await
        .map_err(|e| classify(e, "deleting a credential"))?;
    Ok(r.deleted_count > 0)
}

pub(super) async fn list_credentials(
    s: &MongoStore,
    user: Option<&UserName>,
) -> Result<Vec<CredentialInfo>, StoreError> {
    s.ensure_ready().await?;
    let filter = match user {
        Some(u) => doc! { "user": u.as_str() },
        None => doc! {},
    };
    let docs: Vec<Document> = s
        .credentials()
        .find(filter)
        .projection(doc! { "sealed": 0 })
        .sort(doc! { "user": 1, "cluster": 1 })
        .await
        .map_err(|e| classify(e, "listing credentials"))?
        .try_collect()
        .await
        .map_err(|e| classify(e, "listing credentials"))?;
    docs.iter().map(credential_info).collect()
}

pub(super) async fn insert_account(s: &MongoStore, account: &UserAccount) -> Result<(), StoreError> {
    s.ensure_ready().await?;
    let d = doc! {
        "_id": account.name.as_str(),
        "role": account.role.as_str(),
        "created_by": account.created_by.as_str(),
        "created_at": to_bson_time(account.created_at),
        "disabled_at": account.disabled_at.map(to_bson_time),
    };
    match s.users().insert_one(d).await {
        Ok(_) => Ok(()),
        Err(e) if is_duplicate_key(&e) => Err(StoreError::Conflict(format!("user `{}` exists already", account.name))),
        Err(e) => Err(classify(e, "storing a user")),
    }
}

pub(super) async fn get_account(s: &MongoStore, name: &UserName) -> Result<Option<UserAccount>, StoreError> {
    s.ensure_ready().await?;
    let d = s.users().find_one(doc! { "_id": name.as_str() }).await.map_err(|e| classify(e, "reading a user"))?;
    d.as_ref().map(account_from_doc).transpose()
}

pub(super) async fn list_accounts(s: &MongoStore) -> Result<Vec<UserAccount>, StoreError> {
    s.ensure_ready().await?;
    let docs: Vec<Document> = s
        .users()
        .find(doc! {})
        .sort(doc! { "_id": 1 })
        .await
        .map_err(|e| classify(e, "listing users"))?
        .try_collect()
        .await
        .map_err(|e| classify(e, "listing users"))?;
    docs.iter().map(account_from_doc).collect()
}

pub(super) async fn disable_account(
    s: &MongoStore,
    name: &UserName,
    at: OffsetDateTime,
) -> Result<Option<UserAccount>, StoreError> {
    s.ensure_ready().await?;
    let at = to_bson_time(at);
    // The account first: once it is disabled no token of it is accepted, whether
    // or not the tokens below are marked revoked yet.
    s.users()
        .update_one(doc! { "_id": name.as_str(), "disabled_at": Bson::Null }, doc! { "$set": { "disabled_at": at } })
        .await
        .map_err(|e| classify(e, "disabling a user"))?;
    s.tokens()
        .update_many(doc! { "user": name.as_str(), "revoked_at": Bson::Null }, doc! { "$set": { "revoked_at": at } })
        .await
        .map_err(|e| classify(e, "revoking a user's tokens"))?;
    get_account(s, name).await
}

pub(super) async fn insert_token(s: &MongoStore, token: &StoredToken) -> Result<(), StoreError> {
    s.ensure_ready().await?;
    let i = &token.info;
    let d = doc! {
        "_id": i.id.to_string(),
        "user": i.user.as_str(),
        "hash": &token.hash,
        "label": &i.label,
        "hint": &i.hint,
        "created_by": i.created_by.as_str(),
        "created_at": to_bson_time(i.created_at),
        "expires_at": to_bson_time(i.expires_at),
        "revoked_at": i.revoked_at.map(to_bson_time),
        "last_used_at": i.last_used_at.map(to_bson_time),
    };
    match s.tokens().insert_one(d).await {
        Ok(_) => Ok(()),
        Err(e) if is_duplicate_key(&e) => {
            Err(StoreError::Conflict("a token with that ID or hash exists already".into()))
        }
        Err(e) => Err(classify(e, "storing a token")),
    }
}

pub(super) async fn token_by_hash(s: &MongoStore, hash: &str) -> Result<Option<TokenInfo>, StoreError> {
    s.ensure_ready().await?;
    let d = s.tokens().find_one(doc! { "hash": hash }).await.map_err(|e| classify(e, "reading a token"))?;
    d.as_ref().map(token_from_doc).transpose()
}

pub(super) async fn list_tokens(s: &MongoStore, user: &UserName) -> Result<Vec<TokenInfo>, StoreError> {
    s.ensure_ready().await?;
    let docs: Vec<Document> = s
        .tokens()
        .find(doc! { "user": user.as_str() })
        .sort(doc! { "_id": 1 })
        .await
        .map_err(|e| classify(e, "listing tokens"))?
        .try_collect()
        .await
        .map_err(|e| classify(e, "listing tokens"))?;
    docs.iter().map(token_from_doc).collect()
}

pub(super) async fn revoke_token(
    s: &MongoStore,
    user: &UserName,
    id: &TokenId,
    at: OffsetDateTime,
) -> Result<Option<TokenInfo>, StoreError> {
    s.ensure_ready().await?;
    let key = doc! { "_id": id.to_string(), "user": user.as_str() };
    let mut unrevoked = key.clone();
    unrevoked.insert("revoked_at", Bson::Null);
    s.tokens()
        .update_one(unrevoked, doc! { "$set": { "revoked_at": to_bson_time(at) } })
        .await
        .map_err(|e| classify(e, "revoking a token"))?;
    let d = s.tokens().find_one(key).await.map_err(|e| classify(e, "reading a token"))?;
    d.as_ref().map(token_from_doc).transpose()
}

pub(super) async fn touch_token(s: &MongoStore, id: &TokenId, at: OffsetDateTime) -> Result<(), StoreError> {
    s.ensure_ready().await?;
    s.tokens()
        .update_one(doc! { "_id": id.to_string() }, doc! { "$set": { "last_used_at": to_bson_time(at) } })
        .await
        .map_err(|e| classify(e, "recording a token's use"))?;
    Ok(())
}

fn corrupt(what: &str, detail: impl std::fmt::Display) -> StoreError {
    StoreError::Other(anyhow::anyhow!("corrupt {what} document: {detail}"))
}

fn opt_time(d: &Document, key: &str) -> Option<OffsetDateTime> {
    d.get_datetime(key).ok().map(|t| from_bson_time(*t))
}

fn account_from_doc(d: &Document) -> Result<UserAccount, StoreError> {
    let text = |k: &str| d.get_str(k).map_err(|_| corrupt("user", k));
    Ok(UserAccount {
        name: UserName::parse(text("_id")?).map_err(|e| corrupt("user", e))?,
        role: Role::parse(text("role")?).map_err(|e| corrupt("user", e))?,
        created_by: UserName::parse(text("created_by")?).map_err(|e| corrupt("user", e))?,
        created_at: from_bson_time(*d.get_datetime("created_at").map_err(|_| corrupt("user", "created_at"))?),
        disabled_at: opt_time(d, "disabled_at"),
    })
}

fn token_from_doc(d: &Document) -> Result<TokenInfo, StoreError> {
    let text = |k: &str| d.get_str(k).map_err(|_| corrupt("token", k));
    let time = |k: &str| d.get_datetime(k).map(|t| from_bson_time(*t)).map_err(|_| corrupt("token", k));
    Ok(TokenInfo {
        id: TokenId::parse(text("_id")?).map_err(|e| corrupt("token", e))?,
        user: UserName::parse(text("user")?).map_err(|e| corrupt("token", e))?,
        label: text("label")?.to_owned(),
        hint: text("hint")?.to_owned(),
        created_by: UserName::parse(text("created_by")?).map_err(|e| corrupt("token", e))?,
        created_at: time("created_at")?,
        expires_at: time("expires_at")?,
        revoked_at: opt_time(d, "revoked_at"),
        last_used_at: opt_time(d, "last_used_at"),
    })
}

/// A task as a MongoDB document: `_id` is the task ID, `live` feeds the mediator's index.
fn corrupt_credential(what: &str) -> StoreError {
    StoreError::Other(anyhow::anyhow!("corrupt credential document: {what}"))
}

fn credential_info(d: &Document) -> Result<CredentialInfo, StoreError> {
    let text = |k: &str| d.get_str(k).map_err(|_| corrupt_credential(k));
    let name = |e: crate::model::NameError| corrupt_credential(&e.to_string());
    Ok(CredentialInfo {
        user: UserName::parse(text("user")?).map_err(name)?,
        cluster: ClusterName::parse(text("cluster")?).map_err(name)?,
        key_type: text("key_type")?.to_owned(),
        fingerprint: text("fingerprint")?.to_owned(),
        created_by: UserName::parse(text("created_by")?).map_err(name)?,
        created_at: from_bson_time(*d.get_datetime("created_at").map_err(|_| corrupt_credential("created_at"))?),
    })
}

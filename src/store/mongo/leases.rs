//! Leases in MongoDB: one document per key in `leases`, changed only by conditional
//! single-document writes, so of servers claiming one key at once one wins (see
//! [`crate::store::leases`] for the rules). Also the shared counters of `usage`: one
//! document per key and window, counted with `$inc`; and the site's pools (`pools`):
//! one document per pool, `{_id, version, pool}`, replaced only while `version` is
//! the one read.

use futures::TryStreamExt as _;
use mongodb::bson::{Document, doc};
use mongodb::options::ReturnDocument;
use time::OffsetDateTime;

use super::{MongoStore, classify, from_bson_time, is_duplicate_key, to_bson_time};
use crate::store::StoreError;
use crate::store::leases::Lease;

fn lease(d: &Document) -> Result<Lease, StoreError> {
    let bad = |what: &str| StoreError::Other(anyhow::anyhow!("a lease document without {what}: {d}"));
    Ok(Lease {
        key: d.get_str("_id").map_err(|_| bad("_id"))?.to_owned(),
        holder: d.get_str("holder").map_err(|_| bad("holder"))?.to_owned(),
        fence: d.get_i64("fence").map_err(|_| bad("fence"))? as u64,
        expires_at: from_bson_time(*d.get_datetime("expires_at").map_err(|_| bad("expires_at"))?),
    })
}

pub(super) async fn claim(
    s: &MongoStore,
    key: &str,
    holder: &str,
    until: OffsetDateTime,
    at: OffsetDateTime,
) -> Result<Option<Lease>, StoreError> {
    s.ensure_ready().await?;
    let (until, at) = (to_bson_time(until), to_bson_time(at));
    let c = s.leases();
    // A renewal: still ours.
    let renewed = c
        .find_one_and_update(
            doc! { "_id": key, "holder": holder, "expires_at": { "$gt": at } },
            doc! { "$set": { "expires_at": until } },
        )
        .return_document(ReturnDocument::After)
        .await
        .map_err(|e| classify(e, "renewing a lease"))?;
    if let Some(d) = renewed {
        return lease(&d).map(Some);
    }
    // A takeover: lapsed, whoever held it; the fence rises.
    let taken = c
        .find_one_and_update(
            doc! { "_id": key, "expires_at": { "$lte": at } },
            doc! { "$set": { "holder": holder, "expires_at": until }, "$inc": { "fence": 1_i64 } },
        )
        .return_document(ReturnDocument::After)
        .await
        .map_err(|e| classify(e, "taking over a lease"))?;
    if let Some(d) = taken {
        return lease(&d).map(Some);
    }
    // A first claim; a duplicate key means someone holds it (or just took it).
    let first = doc! { "_id": key, "holder": holder, "fence": 1_i64, "expires_at": until };
    match c.insert_one(&first).await {
        Ok(_) => lease(&first).map(Some),
        Err(e) if is_duplicate_key(&e) => Ok(None),
        Err(e) => Err(classify(e, "claiming a lease")),
    }
}

pub(super) async fn release(s: &MongoStore, l: &Lease, at: OffsetDateTime) -> Result<bool, StoreError> {
    s.ensure_ready().await?;
    let at = to_bson_time(at);
    let r = s
        .leases()
        .update_one(
            doc! { "_id": &l.key, "holder": &l.holder, "fence": l.fence as i64, "expires_at": { "$gt": at } },
            doc! { "$set": { "expires_at": at } },
        )
        .await
        .map_err(|e| classify(e, "releasing a lease"))?;
    Ok(r.modified_count == 1)
}

pub(super) async fn list(s: &MongoStore, prefix: &str) -> Result<Vec<Lease>, StoreError> {
    s.ensure_ready().await?;
    // Keys starting with `prefix` as an `_id` range, walked by the index (keys are
    // ASCII: `replica/<id>`, `submit/<task>`, so nothing sorts past U+10FFFF).
    let filter = match prefix {
        "" => doc! {},
        p => doc! { "_id": { "$gte": p, "$lt": format!("{p}\u{10FFFF}") } },
    };
    let docs: Vec<Document> = s
        .leases()
        .find(filter)
        .sort(doc! { "_id": 1 })
        .await
        .map_err(|e| classify(e, "listing leases"))?
        .try_collect()
        .await
        .map_err(|e| classify(e, "listing leases"))?;
    docs.iter().map(lease).collect()
}

pub(super) async fn count_use(
    s: &MongoStore,
    key: &str,
    window: OffsetDateTime,
    by: i64,
    keep_until: OffsetDateTime,
) -> Result<u64, StoreError> {
    s.ensure_ready().await?;
    let id = format!("{key}@{}", window.unix_timestamp_nanos() / 1_000_000);
    let c = s.usage();
    let count = |d: Option<Document>| d.and_then(|d| d.get_i64("n").ok()).map_or(0, |n| n.max(0) as u64);
    if by == 0 {
        let found = c.find_one(doc! { "_id": &id }).await.map_err(|e| classify(e, "reading a usage counter"))?;
        return Ok(count(found));
    }
    let after = c
        .find_one_and_update(
            doc! { "_id": &id },
            doc! { "$inc": { "n": by }, "$setOnInsert": { "expires_at": to_bson_time(keep_until) } },
        )
        .upsert(true)
        .return_document(ReturnDocument::After)
        .await
        .map_err(|e| classify(e, "counting a use"))?;
    let n = count(after);
    if by > 0 && n == by as u64 {
        // A new window: clear the counters of windows long gone.
        let now = to_bson_time(OffsetDateTime::now_utc());
        c.delete_many(doc! { "expires_at": { "$lt": now } })
            .await
            .map_err(|e| classify(e, "clearing old usage counters"))?;
    }
    Ok(n)
}

fn pool_of(d: &Document) -> Result<crate::model::queue::Pool, StoreError> {
    let p = d
        .get_document("pool")
        .map_err(|_| StoreError::Other(anyhow::anyhow!("a pool document without `pool`: {d}")))?;
    mongodb::bson::from_document(p.clone())
        .map_err(|e| StoreError::Other(anyhow::anyhow!("a pool document that does not read: {e}")))
}

pub(super) async fn pool(s: &MongoStore, key: &str) -> Result<Option<crate::model::queue::Pool>, StoreError> {
    s.ensure_ready().await?;
    let found = s.pools().find_one(doc! { "_id": key }).await.map_err(|e| classify(e, "reading a pool"))?;
    found.as_ref().map(pool_of).transpose()
}

pub(super) async fn pools(s: &MongoStore) -> Result<Vec<crate::model::queue::Pool>, StoreError> {
    s.ensure_ready().await?;
    let docs: Vec<Document> = s
        .pools()
        .find(doc! {})
        .sort(doc! { "_id": 1 })
        .await
        .map_err(|e| classify(e, "listing pools"))?
        .try_collect()
        .await
        .map_err(|e| classify(e, "listing pools"))?;
    docs.iter().map(pool_of).collect()
}

pub(super) async fn put_pool(
    s: &MongoStore,
    pool: &crate::model::queue::Pool,
    expected: Option<u64>,
) -> Result<bool, StoreError> {
    s.ensure_ready().await?;
    let body = mongodb::bson::to_document(pool).map_err(|e| StoreError::Other(e.into()))?;
    let version = pool.version as i64;
    match expected {
        None => {
            let d = doc! { "_id": &pool.key, "version": version, "pool": body };
            match s.pools().insert_one(&d).await {
                Ok(_) => Ok(true),
                Err(e) if is_duplicate_key(&e) => Ok(false),
                Err(e) => Err(classify(e, "creating a pool")),
            }
        }
        Some(v) => {
            let r = s
                .pools()
                .update_one(
                    doc! { "_id": &pool.key, "version": v as i64 },
                    doc! { "$set": { "version": version, "pool": body } },
                )
                .await
                .map_err(|e| classify(e, "writing a pool"))?;
            Ok(r.matched_count == 1)
        }
    }
}

//! Leases in MongoDB: one document per key in `leases`, changed only by conditional
//! single-document writes, so of servers claiming one key at once one wins (see
//! [`crate::store::leases`] for the rules).

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

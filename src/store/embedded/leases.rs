//! Leases in SQLite: one row per key, decided and written in one `IMMEDIATE`
//! transaction (see [`crate::store::leases`] for the rules).

use rusqlite::{OptionalExtension as _, params};
use time::OffsetDateTime;

use super::{EmbeddedStore, sql_err};
use crate::store::StoreError;
use crate::store::leases::{Lease, decide};

fn millis(t: OffsetDateTime) -> i64 {
    (t.unix_timestamp_nanos() / 1_000_000) as i64
}

fn from_millis(ms: i64) -> Result<OffsetDateTime, StoreError> {
    OffsetDateTime::from_unix_timestamp_nanos(ms as i128 * 1_000_000)
        .map_err(|e| StoreError::Other(anyhow::anyhow!("bad lease time {ms} in store: {e}")))
}

fn row(r: &rusqlite::Row<'_>) -> rusqlite::Result<(String, String, i64, i64)> {
    Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
}

fn lease((key, holder, fence, expires): (String, String, i64, i64)) -> Result<Lease, StoreError> {
    Ok(Lease { key, holder, fence: fence as u64, expires_at: from_millis(expires)? })
}

pub(super) async fn claim(
    s: &EmbeddedStore,
    key: &str,
    holder: &str,
    until: OffsetDateTime,
    at: OffsetDateTime,
) -> Result<Option<Lease>, StoreError> {
    let (key, holder) = (key.to_owned(), holder.to_owned());
    s.with_conn(move |c| {
        let tx = c.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate).map_err(sql_err)?;
        let found = tx
            .query_row("SELECT key, holder, fence, expires_ms FROM leases WHERE key = ?1", [&key], row)
            .optional()
            .map_err(sql_err)?
            .map(lease)
            .transpose()?;
        let Some(next) = decide(found.as_ref(), &key, &holder, until, at) else { return Ok(None) };
        tx.execute(
            "INSERT INTO leases (key, holder, fence, expires_ms) VALUES (?1, ?2, ?3, ?4) \
             ON CONFLICT (key) DO UPDATE SET holder = excluded.holder, fence = excluded.fence, \
             expires_ms = excluded.expires_ms",
            params![next.key, next.holder, next.fence as i64, millis(next.expires_at)],
        )
        .map_err(sql_err)?;
        tx.commit().map_err(sql_err)?;
        Ok(Some(next))
    })
    .await
}

pub(super) async fn release(s: &EmbeddedStore, l: &Lease, at: OffsetDateTime) -> Result<bool, StoreError> {
    let l = l.clone();
    s.with_conn(move |c| {
        let n = c
            .execute(
                "UPDATE leases SET expires_ms = ?4 WHERE key = ?1 AND holder = ?2 AND fence = ?3 AND expires_ms > ?4",
                params![l.key, l.holder, l.fence as i64, millis(at)],
            )
            .map_err(sql_err)?;
        Ok(n == 1)
    })
    .await
}

pub(super) async fn list(s: &EmbeddedStore, prefix: &str) -> Result<Vec<Lease>, StoreError> {
    let prefix = prefix.to_owned();
    s.with_conn(move |c| {
        let mut q = c
            .prepare("SELECT key, holder, fence, expires_ms FROM leases WHERE substr(key, 1, ?2) = ?1 ORDER BY key")
            .map_err(sql_err)?;
        let rows = q.query_map(params![prefix, prefix.chars().count() as i64], row).map_err(sql_err)?;
        rows.map(|r| r.map_err(sql_err).and_then(lease)).collect()
    })
    .await
}

fn pool_of(doc: &str) -> Result<crate::model::queue::Pool, StoreError> {
    serde_json::from_str(doc).map_err(|e| StoreError::Other(anyhow::anyhow!("a pool record that does not read: {e}")))
}

pub(super) async fn pool(s: &EmbeddedStore, key: &str) -> Result<Option<crate::model::queue::Pool>, StoreError> {
    let key = key.to_owned();
    s.with_conn(move |c| {
        let doc: Option<String> =
            c.query_row("SELECT doc FROM pools WHERE key = ?1", [&key], |r| r.get(0)).optional().map_err(sql_err)?;
        doc.as_deref().map(pool_of).transpose()
    })
    .await
}

pub(super) async fn pools(s: &EmbeddedStore) -> Result<Vec<crate::model::queue::Pool>, StoreError> {
    s.with_conn(move |c| {
        let mut q = c.prepare("SELECT doc FROM pools ORDER BY key").map_err(sql_err)?;
        let rows = q.query_map([], |r| r.get::<_, String>(0)).map_err(sql_err)?;
        rows.map(|r| r.map_err(sql_err).and_then(|d| pool_of(&d))).collect()
    })
    .await
}

pub(super) async fn put_pool(
    s: &EmbeddedStore,
    pool: &crate::model::queue::Pool,
    expected: Option<u64>,
) -> Result<bool, StoreError> {
    let doc = serde_json::to_string(pool).map_err(|e| StoreError::Other(e.into()))?;
    let (key, version) = (pool.key.clone(), pool.version as i64);
    s.with_conn(move |c| {
        let n = match expected {
            None => c
                .execute(
                    "INSERT INTO pools (key, version, doc) VALUES (?1, ?2, ?3) ON CONFLICT (key) DO NOTHING",
                    params![key, version, doc],
                )
                .map_err(sql_err)?,
            Some(v) => c
                .execute(
                    "UPDATE pools SET version = ?2, doc = ?3 WHERE key = ?1 AND version = ?4",
                    params![key, version, doc, v as i64],
                )
                .map_err(sql_err)?,
        };
        Ok(n == 1)
    })
    .await
}

//! Leases: a claim on one piece of work, held by one server until it expires, so that
//! servers sharing a store never do the same work twice. The rules, the same for both
//! backends:
//!
//! - [`Store::claim_lease`](super::Store::claim_lease) takes a key for a holder until a
//!   time, if nobody holds it, or its lease has expired, or the holder already holds it
//!   (a renewal). It answers `None` while someone else holds it.
//! - Every claim that is not a renewal raises the key's **fence**, which never goes
//!   down (a released or expired lease keeps its record, and its fence). A holder that
//!   sees its fence change, even to itself after its own lease expired, knows someone
//!   may have worked on the key meanwhile.
//! - [`Store::release_lease`](super::Store::release_lease) ends a lease at once, only
//!   for the holder with that fence.
//!
//! Times are the caller's clock, to the millisecond: servers sharing a store need
//! clocks that agree to well within a lease's length.

use time::OffsetDateTime;

/// A claim on `key`, held by `holder` until `expires_at`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    /// What is claimed (`submit/<task>`, `watch/<cluster>/<user>`, ...).
    pub key: String,
    /// Who holds it: a server's replica ID.
    pub holder: String,
    /// Rises with every claim that is not a renewal.
    pub fence: u64,
    /// When it lapses unless renewed.
    pub expires_at: OffsetDateTime,
}

impl Lease {
    /// Whether it still holds at `at`.
    pub fn holds_at(&self, at: OffsetDateTime) -> bool {
        at < self.expires_at
    }
}

/// What a claim does to the record found for its key (`None`: no record yet): the
/// record to write, or `None` when someone else holds it. The embedded store decides
/// with this inside one transaction; MongoDB writes the same three cases (renewal,
/// takeover, first claim) as conditional single-document writes. The contract suite
/// holds both to these rules.
pub fn decide(
    found: Option<&Lease>,
    key: &str,
    holder: &str,
    until: OffsetDateTime,
    at: OffsetDateTime,
) -> Option<Lease> {
    let until = super::to_millis(until);
    match found {
        None => Some(Lease { key: key.to_owned(), holder: holder.to_owned(), fence: 1, expires_at: until }),
        Some(l) if l.holder == holder && l.holds_at(at) => Some(Lease { expires_at: until, ..l.clone() }),
        Some(l) if !l.holds_at(at) => {
            Some(Lease { key: key.to_owned(), holder: holder.to_owned(), fence: l.fence + 1, expires_at: until })
        }
        Some(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: i64) -> OffsetDateTime {
        OffsetDateTime::from_unix_timestamp(1_800_000_000 + s).unwrap()
    }

    #[test]
    fn a_free_key_is_taken_renewed_kept_from_others_and_taken_over_after_expiry() {
        let first = decide(None, "k", "a", t(15), t(0)).unwrap();
        assert_eq!((first.holder.as_str(), first.fence), ("a", 1));
        let renewed = decide(Some(&first), "k", "a", t(25), t(10)).unwrap();
        assert_eq!((renewed.fence, renewed.expires_at), (1, t(25)), "a renewal keeps the fence");
        assert_eq!(decide(Some(&renewed), "k", "b", t(30), t(20)), None, "b waits while a holds it");
        let taken = decide(Some(&renewed), "k", "b", t(40), t(25)).unwrap();
        assert_eq!((taken.holder.as_str(), taken.fence), ("b", 2), "expired at exactly its time");
        let back = decide(Some(&taken), "k", "b", t(60), t(41)).unwrap();
        assert_eq!(back.fence, 3, "re-taking one's own expired lease is a new claim");
    }
}

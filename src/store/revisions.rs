//! The rules of revision histories, written once above both stores: a push is the
//! next version of its name, a create-only push finds no current definition, a delete
//! appends a tombstone after the newest revision, and two writers racing for one
//! version are told apart from a write that failed (the loser of a race tries the next
//! number). A backend only persists the revision it is given
//! ([`Store::insert_revision`]).

use std::time::Duration;

use time::OffsetDateTime;

use super::{Precondition, Revision, Store, StoreError, file_metas, to_millis};
use crate::definitions::{CheckedUpload, DefinitionKind};
use crate::model::UserName;

/// How many times a push that lost a race for its version is tried. Each round at
/// least one contender wins, so this bounds how many concurrent pushes of one name
/// all succeed.
const ATTEMPTS: usize = 16;

/// The revision a push of `upload` makes after `latest`, or why it may not.
pub fn next(
    latest: Option<&Revision>,
    upload: &CheckedUpload,
    precondition: Precondition,
    by: &UserName,
    at: OffsetDateTime,
) -> Result<Revision, StoreError> {
    if let (Precondition::Absent, Some(cur)) = (precondition, latest)
        && !cur.deleted
    {
        return Err(StoreError::Conflict(exists_message(upload.kind, &upload.name, cur.version)));
    }
    let version = latest.map_or(1, |r| r.version + 1);
    Ok(Revision {
        kind: upload.kind,
        name: upload.name.clone(),
        version,
        deleted: false,
        definition: Some(upload.definition.clone()),
        files: file_metas(upload, version),
        uploaded_by: by.clone(),
        uploaded_at: to_millis(at),
    })
}

/// The tombstone a delete of `name` appends after `latest`; none when there is no
/// current definition (never existed, or already deleted).
pub fn tombstone(
    latest: Option<&Revision>,
    kind: DefinitionKind,
    name: &str,
    by: &UserName,
    at: OffsetDateTime,
) -> Option<Revision> {
    let latest = latest.filter(|r| !r.deleted)?;
    Some(Revision {
        kind,
        name: name.to_owned(),
        version: latest.version + 1,
        deleted: true,
        definition: None,
        files: Vec::new(),
        uploaded_by: by.clone(),
        uploaded_at: to_millis(at),
    })
}

/// The message for a create that finds an existing definition.
pub fn exists_message(kind: DefinitionKind, name: &str, version: u32) -> String {
    format!("{} `{name}` already exists (version {version}); replace it with PUT", kind.singular())
}

/// Backoff before retry `attempt`: grows linearly, with jitter so that writers who
/// collided do not collide again in lockstep.
fn backoff(attempt: usize) -> Duration {
    let jitter =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos()) % 10_000;
    Duration::from_millis(5 * (attempt as u64 + 1)) + Duration::from_micros(u64::from(jitter))
}

/// Writes `make(latest)` until it sticks. A refused write whose version somebody else
/// took meanwhile lost a race and is tried again on the newer history; any other
/// refusal is the write's own failure and is returned.
async fn write<S: Store + ?Sized>(
    store: &S,
    kind: DefinitionKind,
    name: &str,
    upload: Option<&CheckedUpload>,
    make: impl Fn(Option<&Revision>) -> Result<Option<Revision>, StoreError>,
) -> Result<Option<Revision>, StoreError> {
    let mut last = String::new();
    for attempt in 0..ATTEMPTS {
        let latest = store.latest_revision(kind, name).await?;
        let Some(rev) = make(latest.as_ref())? else { return Ok(None) };
        match store.insert_revision(&rev, upload).await {
            Ok(()) => return Ok(Some(rev)),
            Err(StoreError::Conflict(why)) => {
                let now = store.latest_revision(kind, name).await?;
                if now.as_ref().is_none_or(|r| r.version < rev.version) {
                    // Nobody took the version: the write itself could not be stored.
                    return Err(StoreError::Other(anyhow::anyhow!(
                        "the {} `{name}` could not be stored: {why}",
                        kind.singular()
                    )));
                }
                tracing::debug!(attempt, name, "a push lost the race for its version; trying the next one");
                last = why;
                tokio::time::sleep(backoff(attempt)).await;
            }
            Err(e) => return Err(e),
        }
    }
    Err(StoreError::Conflict(format!(
        "{} `{name}`: other writes to the same name keep winning; try again ({last})",
        kind.singular()
    )))
}

/// [`Store::put_revision`].
pub(super) async fn put<S: Store + ?Sized>(
    store: &S,
    upload: &CheckedUpload,
    precondition: Precondition,
    by: &UserName,
    at: OffsetDateTime,
) -> Result<Revision, StoreError> {
    let rev = write(store, upload.kind, &upload.name, Some(upload), |latest| {
        next(latest, upload, precondition, by, at).map(Some)
    })
    .await?;
    Ok(rev.expect("a push always makes a revision"))
}

/// [`Store::delete_definition`].
pub(super) async fn delete<S: Store + ?Sized>(
    store: &S,
    kind: DefinitionKind,
    name: &str,
    by: &UserName,
    at: OffsetDateTime,
) -> Result<Option<Revision>, StoreError> {
    write(store, kind, name, None, |latest| Ok(tombstone(latest, kind, name, by, at))).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn upload(name: &str) -> CheckedUpload {
        CheckedUpload {
            kind: DefinitionKind::Application,
            name: name.into(),
            definition: serde_json::json!({ "name": name }),
            files: Vec::new(),
            notes: Vec::new(),
        }
    }

    fn by() -> UserName {
        UserName::parse("admin").unwrap()
    }

    #[test]
    fn a_push_is_the_next_version_and_a_create_needs_no_current_definition() {
        let at = OffsetDateTime::UNIX_EPOCH;
        let first = next(None, &upload("a"), Precondition::Absent, &by(), at).unwrap();
        assert_eq!((first.version, first.deleted), (1, false));
        let second = next(Some(&first), &upload("a"), Precondition::Any, &by(), at).unwrap();
        assert_eq!(second.version, 2);
        let refused = next(Some(&second), &upload("a"), Precondition::Absent, &by(), at).unwrap_err();
        assert!(refused.to_string().contains("already exists (version 2)"), "{refused}");
        let gone = tombstone(Some(&second), DefinitionKind::Application, "a", &by(), at).unwrap();
        assert_eq!((gone.version, gone.deleted, gone.definition.is_none()), (3, true, true));
        assert!(tombstone(Some(&gone), DefinitionKind::Application, "a", &by(), at).is_none(), "deleted already");
        assert!(tombstone(None, DefinitionKind::Application, "a", &by(), at).is_none(), "never existed");
        let again = next(Some(&gone), &upload("a"), Precondition::Absent, &by(), at).unwrap();
        assert_eq!(again.version, 4, "versions continue after a delete");
    }
}

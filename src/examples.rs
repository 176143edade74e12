//! The example definitions built into the binary, so `hpcforge serve` with no
//! arguments can run a task at once: the `local` cluster (this machine, no
//! scheduler) and the `sleep`, `pi`, `workflow` and `render` applications. They are the repository's own
//! folders (`clusters/local`, `applications/*`), compiled in.

use std::collections::BTreeMap;

use crate::definitions::{self, Upload, UploadLimits};
use crate::model::UserName;
use crate::store::{Precondition, Store, StoreError};

macro_rules! repo_file {
    ($path:literal) => {
        ($path, include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/", $path)))
    };
}

const LOCAL_CLUSTER: &str = include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/clusters/local/cluster.toml"));
const LOCAL_TEMPLATE: &str = include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/forge-templates/local/script_common"));

const APPLICATIONS: &[(&str, &[(&str, &str)])] = &[
    (
        "sleep",
        &[
            repo_file!("applications/sleep/application.toml"),
            repo_file!("applications/sleep/app_prolog"),
            repo_file!("applications/sleep/app_execute"),
            repo_file!("applications/sleep/app_epilog"),
            repo_file!("applications/sleep/cluster/local"),
            repo_file!("applications/sleep/cluster/local-slurm"),
            repo_file!("applications/sleep/cluster/local-sge"),
        ],
    ),
    (
        "pi",
        &[
            repo_file!("applications/pi/application.toml"),
            repo_file!("applications/pi/app_prolog"),
            repo_file!("applications/pi/app_execute"),
            repo_file!("applications/pi/app_epilog"),
            repo_file!("applications/pi/cluster/local"),
            repo_file!("applications/pi/cluster/local-slurm"),
            repo_file!("applications/pi/cluster/local-sge"),
        ],
    ),
    (
        "workflow",
        &[
            repo_file!("applications/workflow/application.toml"),
            repo_file!("applications/workflow/app_preprocess"),
            repo_file!("applications/workflow/app_fit"),
            repo_file!("applications/workflow/app_histogram"),
            repo_file!("applications/workflow/app_postprocess"),
            repo_file!("applications/workflow/cluster/local"),
            repo_file!("applications/workflow/cluster/local-slurm"),
            repo_file!("applications/workflow/cluster/local-sge"),
        ],
    ),
    (
        "render",
        &[
            repo_file!("applications/render/application.toml"),
            repo_file!("applications/render/app_render"),
            repo_file!("applications/render/app_gather"),
            repo_file!("applications/render/app_bundle"),
            repo_file!("applications/render/cluster/local"),
            repo_file!("applications/render/cluster/local-slurm"),
            repo_file!("applications/render/cluster/local-sge"),
        ],
    ),
];

/// Adds the examples to an empty store (no application and no cluster yet); a store
/// that has any definition is left alone. Returns what was added.
pub async fn seed_if_empty(store: &dyn Store) -> Result<Vec<String>, StoreError> {
    use crate::definitions::DefinitionKind::{Application, Cluster};
    if !store.list_current(Cluster).await?.is_empty() || !store.list_current(Application).await?.is_empty() {
        return Ok(Vec::new());
    }
    if store.history(Cluster, "local").await?.iter().any(|r| r.deleted) {
        return Ok(Vec::new()); // an admin deleted it on purpose
    }
    let by = UserName::parse("hpcforge").expect("valid name");
    let at = time::OffsetDateTime::now_utc();
    let limits = UploadLimits::default();
    let mut added = Vec::new();
    let cluster = Upload {
        definition: toml::from_str(LOCAL_CLUSTER)
            .map_err(|e| StoreError::Other(anyhow::anyhow!("built-in local cluster: {e}")))?,
        files: BTreeMap::from([("forge/script_common".to_owned(), LOCAL_TEMPLATE.to_owned())]),
    };
    let checked = definitions::check_cluster(cluster, &limits)
        .map_err(|p| StoreError::Other(anyhow::anyhow!("built-in local cluster: {p}")))?;
    put(store, &checked, &by, at, &mut added).await?;
    for (name, files) in APPLICATIONS {
        let prefix = format!("applications/{name}/");
        let mut definition = None;
        let mut scripts = BTreeMap::new();
        for (path, text) in *files {
            let rel = path.strip_prefix(&prefix).expect("files sit under their folder");
            if rel == "application.toml" {
                definition = Some(
                    toml::from_str(text)
                        .map_err(|e| StoreError::Other(anyhow::anyhow!("built-in application {name}: {e}")))?,
                );
            } else {
                scripts.insert(rel.to_owned(), (*text).to_owned());
            }
        }
        let upload = Upload { definition: definition.expect("every example has application.toml"), files: scripts };
        let checked = definitions::check_application(upload, &limits)
            .map_err(|p| StoreError::Other(anyhow::anyhow!("built-in application {name}: {p}")))?;
        put(store, &checked, &by, at, &mut added).await?;
    }
    Ok(added)
}

async fn put(
    store: &dyn Store,
    checked: &definitions::CheckedUpload,
    by: &UserName,
    at: time::OffsetDateTime,
    added: &mut Vec<String>,
) -> Result<(), StoreError> {
    match store.put_revision(checked, Precondition::Absent, by, at).await {
        Ok(_) => {
            added.push(format!("{} {}", checked.kind.singular(), checked.name));
            Ok(())
        }
        // Another server seeded it at the same moment.
        Err(StoreError::Conflict(_)) => Ok(()),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn an_empty_store_gets_the_examples_once() {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::store::embedded::EmbeddedStore::open(dir.path()).unwrap();
        let added = seed_if_empty(&store).await.unwrap();
        assert_eq!(
            added,
            ["cluster local", "application sleep", "application pi", "application workflow", "application render"]
        );
        assert!(seed_if_empty(&store).await.unwrap().is_empty(), "a store with definitions is left alone");
    }

    /// Regression: the `local-sge` environments were in the folders but not seeded, so
    /// `sleep` on `local-sge` failed on a server set up as the README says.
    #[test]
    fn the_seeded_applications_hold_every_file_of_their_folders() {
        fn walk(dir: &std::path::Path, base: &std::path::Path, out: &mut Vec<String>) {
            for e in std::fs::read_dir(dir).unwrap() {
                let p = e.unwrap().path();
                if p.is_dir() {
                    walk(&p, base, out);
                } else {
                    out.push(p.strip_prefix(base).unwrap().to_string_lossy().into_owned());
                }
            }
        }
        let repo = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
        for (name, files) in APPLICATIONS {
            let mut on_disk = Vec::new();
            walk(&repo.join("applications").join(name), repo, &mut on_disk);
            on_disk.sort();
            let mut seeded: Vec<String> = files.iter().map(|(p, _)| (*p).to_owned()).collect();
            seeded.sort();
            assert_eq!(seeded, on_disk, "src/examples.rs seeds {name} with other files than its folder holds");
        }
    }
}

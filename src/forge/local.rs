//! Forging straight from the repository's definition folders, with no server: what
//! `hpcforge forge preview --from-dir` does, for admins writing templates and scripts.

use std::collections::BTreeMap;
use std::path::Path;

use super::render::{CompiledApp, CompiledCluster};
use crate::definitions::folder::{self, FolderProblems};
use crate::definitions::{self, UploadLimits};
use crate::model::{AppName, ApplicationSpec, ClusterName, ClusterSpec, Problems};

/// Version number given to definitions read from folders (they have none yet).
pub const LOCAL_VERSION: u32 = 0;

/// Why a folder could not be compiled.
#[derive(Debug, thiserror::Error)]
pub enum LocalError {
    /// The folder has problems, located by file.
    #[error("{0}")]
    Folder(FolderProblems),
    /// The definitions do not compile.
    #[error("{0}")]
    Compile(Problems),
}

fn files_map(files: Vec<definitions::CheckedFile>) -> BTreeMap<String, String> {
    files.into_iter().map(|f| (f.path, f.text)).collect()
}

/// Compiles `<root>/applications/<name>`.
pub fn application(root: &Path, name: &AppName) -> Result<CompiledApp, LocalError> {
    let limits = UploadLimits::default();
    let loaded = folder::load_application(&root.join("applications").join(name.as_str()), &limits)
        .map_err(LocalError::Folder)?;
    let spec: ApplicationSpec = loaded.upload.definition.clone();
    let checked = definitions::check_application(loaded.upload, &limits).map_err(LocalError::Compile)?;
    CompiledApp::compile(spec, LOCAL_VERSION, &files_map(checked.files)).map_err(LocalError::Compile)
}

/// Compiles `<root>/clusters/<name>` (templates from `templates_dir` or the nearest
/// `forge-templates/`). Its host key may be missing: nothing connects anywhere.
pub fn cluster(root: &Path, name: &ClusterName, templates_dir: Option<&Path>) -> Result<CompiledCluster, LocalError> {
    let limits = UploadLimits::default();
    let dir = root.join("clusters").join(name.as_str());
    let loaded = folder::load_cluster_for_preview(&dir, templates_dir, &limits).map_err(LocalError::Folder)?;
    let spec: ClusterSpec = loaded.upload.definition.clone();
    // The same checks as an upload, except the host key.
    let files: Vec<definitions::CheckedFile> = loaded
        .upload
        .files
        .iter()
        .map(|(path, text)| {
            let n = definitions::script::normalise(
                text,
                definitions::script::ShebangRule::Optional,
                limits.max_script_bytes,
            )
            .unwrap_or_else(|_| definitions::script::NormalisedScript {
                text: text.to_string(),
                sha256: String::new(),
                notes: vec![],
            });
            definitions::CheckedFile { path: path.clone(), text: n.text, sha256: n.sha256 }
        })
        .collect();
    CompiledCluster::compile(spec, LOCAL_VERSION, &files_map(files)).map_err(LocalError::Compile)
}

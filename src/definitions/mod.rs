//! Application and cluster definitions as they are uploaded: the wire format, which
//! files each kind has, and the checks that turn an upload into something storable
//! (all problems at once, each with a JSON pointer). The folder format lives in
//! [`folder`]; script text rules in [`script`]; the markup language (`@@ NAME @@`) and
//! its upload checks in [`markup`], with [`shell_lint`] telling where markup stands in
//! a shell script and [`filters`] what markup may do with a value.

pub mod filters;
pub mod folder;
pub mod markup;
pub mod script;
pub mod shell_lint;

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::model::problems::pointer_token;
use crate::model::{ApplicationSpec, ClusterName, ClusterSpec, Phase, Problems};
use script::{NormalisedScript, ShebangRule};

/// The two kinds of definition an admin uploads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum DefinitionKind {
    /// An application (`applications/<name>`).
    Application,
    /// A cluster (`clusters/<name>`).
    Cluster,
}

impl DefinitionKind {
    /// Plural name: the MongoDB collection, the GridFS prefix, the URL segment and the
    /// repository folder.
    pub fn plural(self) -> &'static str {
        match self {
            DefinitionKind::Application => "applications",
            DefinitionKind::Cluster => "clusters",
        }
    }

    /// Singular name, for messages.
    pub fn singular(self) -> &'static str {
        match self {
            DefinitionKind::Application => "application",
            DefinitionKind::Cluster => "cluster",
        }
    }

    /// The definition file in a folder.
    pub fn definition_file(self) -> &'static str {
        match self {
            DefinitionKind::Application => "application.toml",
            DefinitionKind::Cluster => "cluster.toml",
        }
    }

    /// The GridFS name of a definition's file: `<plural>/<name>/<path>`.
    pub fn blob_name(self, name: &str, path: &str) -> String {
        format!("{}/{name}/{path}", self.plural())
    }
}

/// Limits on what one upload may carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct UploadLimits {
    /// Largest script, in bytes.
    pub max_script_bytes: usize,
    /// Most files in one upload.
    pub max_files: usize,
}

/// Default largest script: 1 MiB. Real job scripts are a few KiB; anything near this
/// is data that belongs in a file input.
pub const DEFAULT_MAX_SCRIPT_BYTES: usize = 1 << 20;

impl Default for UploadLimits {
    fn default() -> Self {
        Self { max_script_bytes: DEFAULT_MAX_SCRIPT_BYTES, max_files: 256 }
    }
}

/// An upload as it travels over HTTP: the definition and its files, keyed by their
/// path relative to the definition (`app_execute`, `cluster/local-slurm`,
/// `forge/script_common`) — the same relative paths as in the folder format and in
/// GridFS.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Upload<S> {
    /// `application.toml` / `cluster.toml`, as JSON.
    pub definition: S,
    /// Script text by relative path.
    #[serde(default)]
    pub files: BTreeMap<String, String>,
}

/// An application upload.
pub type ApplicationUpload = Upload<ApplicationSpec>;
/// A cluster upload.
pub type ClusterUpload = Upload<ClusterSpec>;

/// One script of a checked upload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckedFile {
    /// Path relative to the definition (`app_execute`).
    pub path: String,
    /// Normalised text.
    pub text: String,
    /// sha256 of `text`.
    pub sha256: String,
}

/// An upload that passed every check; what the store keeps.
#[derive(Debug, Clone, PartialEq)]
pub struct CheckedUpload {
    /// Application or cluster.
    pub kind: DefinitionKind,
    /// The definition's name.
    pub name: String,
    /// The definition, as canonical JSON.
    pub definition: Value,
    /// Its scripts, sorted by path.
    pub files: Vec<CheckedFile>,
    /// What normalisation changed, as `path: note`.
    pub notes: Vec<String>,
}

/// The application script of `phase` (`app_<phase>`).
pub fn app_script_path(phase: Phase) -> String {
    format!("app_{}", phase.as_str())
}

/// The forge template for `phase` in a cluster (`forge/script_<phase>`).
pub fn template_path(phase: Phase) -> String {
    format!("forge/script_{}", phase.as_str())
}

/// The template every cluster has; phase templates fall back to it.
pub const COMMON_TEMPLATE: &str = "forge/script_common";

/// The cluster environment of an application for `cluster`.
pub fn cluster_env_path(cluster: &ClusterName) -> String {
    format!("cluster/{cluster}")
}

/// What role a file plays, from its relative path; `None` if the definition has no
/// such file. `phases` are an application's phases (its `app_<phase>` scripts).
fn file_rule(kind: DefinitionKind, phases: &[Phase], path: &str) -> Option<ShebangRule> {
    match kind {
        DefinitionKind::Application => {
            if phases.iter().any(|p| app_script_path(*p) == path) {
                Some(ShebangRule::Required)
            } else if let Some(cluster) = path.strip_prefix("cluster/") {
                ClusterName::parse(cluster).ok().map(|_| ShebangRule::Optional)
            } else {
                None
            }
        }
        DefinitionKind::Cluster => {
            if path == COMMON_TEMPLATE {
                Some(ShebangRule::Required)
            } else if path.strip_prefix("forge/script_").is_some_and(|p| Phase::parse(p).is_ok()) {
                Some(ShebangRule::Template)
            } else {
                None
            }
        }
    }
}

fn unexpected_file_message(kind: DefinitionKind, phases: &[Phase], path: &str) -> String {
    match kind {
        DefinitionKind::Application => {
            if let Some(cluster) = path.strip_prefix("cluster/")
                && let Err(e) = ClusterName::parse(cluster)
            {
                return e.to_string();
            }
            let scripts: Vec<String> = phases.iter().map(|p| format!("`{}`", app_script_path(*p))).collect();
            if let Some(name) = path.strip_prefix("app_") {
                return format!(
                    "unexpected file `{}`: the application declares no phase `{}`; its scripts are {}",
                    path.escape_debug(),
                    name.escape_debug(),
                    scripts.join(", ")
                );
            }
            format!(
                "unexpected file `{}`: an application has its phase scripts ({}) and `cluster/<cluster>` files",
                path.escape_debug(),
                scripts.join(", ")
            )
        }
        DefinitionKind::Cluster => {
            if let Some(name) = path.strip_prefix("forge/script_")
                && let Err(e) = Phase::parse(name)
            {
                return format!("unexpected file `{}`: {e}", path.escape_debug());
            }
            format!(
                "unexpected file `{}`: a cluster has `forge/script_common` and optional `forge/script_<phase>` templates",
                path.escape_debug()
            )
        }
    }
}

/// Checks the files of an upload against what `kind` must and may have.
fn check_files(
    kind: DefinitionKind,
    files: &BTreeMap<String, String>,
    phases: &[Phase],
    required: &[String],
    limits: &UploadLimits,
    problems: &mut Problems,
) -> (Vec<CheckedFile>, Vec<String>) {
    let mut checked = Vec::new();
    let mut notes = Vec::new();
    for path in required {
        if !files.contains_key(path) {
            problems.push(format!("/files/{}", pointer_token(path)), format!("the required file `{path}` is missing"));
        }
    }
    if files.len() > limits.max_files {
        problems.push("/files", format!("{} files; the limit is {}", files.len(), limits.max_files));
        return (checked, notes);
    }
    for (path, text) in files {
        let pointer = format!("/files/{}", pointer_token(path));
        let Some(rule) = file_rule(kind, phases, path) else {
            problems.push(pointer, unexpected_file_message(kind, phases, path));
            continue;
        };
        match script::normalise(text, rule, limits.max_script_bytes) {
            Ok(NormalisedScript { text, sha256, notes: n }) => {
                notes.extend(n.into_iter().map(|note| format!("{path}: {note}")));
                checked.push(CheckedFile { path: path.clone(), text, sha256 });
            }
            Err(why) => problems.push(pointer, why),
        }
    }
    (checked, notes)
}

/// Reports integers outside the signed 64-bit range anywhere in a definition. JSON
/// allows them, but BSON (MongoDB) cannot hold them, and both stores must accept the
/// same definitions.
fn check_integer_range(value: &Value, pointer: &str, problems: &mut Problems) {
    match value {
        Value::Number(n) if n.is_u64() && n.as_i64().is_none() => {
            problems.push(pointer, "the integer is too large (the limit is 9223372036854775807)");
        }
        Value::Array(items) => {
            for (i, v) in items.iter().enumerate() {
                check_integer_range(v, &format!("{pointer}/{i}"), problems);
            }
        }
        Value::Object(map) => {
            for (k, v) in map {
                check_integer_range(v, &format!("{pointer}/{}", pointer_token(k)), problems);
            }
        }
        _ => {}
    }
}

/// Checks an application upload: the definition, a script per phase and any
/// cluster environments. Every problem is returned at once, pointers relative to the
/// upload (`/definition/inputs/0/type`, `/files/app_execute`).
pub fn check_application(upload: ApplicationUpload, limits: &UploadLimits) -> Result<CheckedUpload, Problems> {
    let mut problems = Problems::default();
    let mut def_problems = Problems::default();
    upload.definition.check(&mut def_problems);
    problems.extend_under("/definition", def_problems);
    let definition = serde_json::to_value(&upload.definition).expect("definitions serialise");
    check_integer_range(&definition, "/definition", &mut problems);
    // The declared phases when they resolve; the graph's own problems are reported
    // with the definition's, and the scripts are checked against the names declared.
    let phases: Vec<Phase> = match upload.definition.graph() {
        Ok(g) => g.phases(),
        Err(_) if upload.definition.phases.is_empty() => Phase::DEFAULT.to_vec(),
        Err(_) => upload.definition.phases.iter().map(|d| d.name).collect(),
    };
    let required: Vec<String> = phases.iter().copied().map(app_script_path).collect();
    let (files, notes) =
        check_files(DefinitionKind::Application, &upload.files, &phases, &required, limits, &mut problems);
    // Markup is checked once the files themselves are sound.
    if problems.is_empty() {
        problems = crate::definitions::markup::check_scripts(&upload.definition, &files);
    }
    problems.into_result()?;
    Ok(CheckedUpload {
        kind: DefinitionKind::Application,
        name: upload.definition.name.to_string(),
        definition,
        files,
        notes,
    })
}

/// Checks a cluster upload: the definition and its forge templates
/// (`forge/script_common` required, phase templates optional).
pub fn check_cluster(upload: ClusterUpload, limits: &UploadLimits) -> Result<CheckedUpload, Problems> {
    let mut problems = Problems::default();
    let mut def_problems = Problems::default();
    upload.definition.check(&mut def_problems);
    problems.extend_under("/definition", def_problems);
    let (files, notes) =
        check_files(DefinitionKind::Cluster, &upload.files, &[], &[COMMON_TEMPLATE.to_owned()], limits, &mut problems);
    if problems.is_empty() {
        problems = crate::definitions::markup::check_templates(&files);
    }
    problems.into_result()?;
    Ok(CheckedUpload {
        kind: DefinitionKind::Cluster,
        name: upload.definition.name.to_string(),
        definition: serde_json::to_value(&upload.definition).expect("definitions serialise"),
        files,
        notes,
    })
}

/// What differs between the two kinds of definition, so code that handles both
/// (HTTP routes, CLI commands) is written once.
pub trait Kind: Send + Sync + 'static {
    /// Which kind.
    const KIND: DefinitionKind;
    /// The definition type.
    type Spec: Serialize + serde::de::DeserializeOwned + Clone + Send + Sync + 'static;
    /// The definition's name.
    fn spec_name(spec: &Self::Spec) -> &str;
    /// Checks an upload of this kind.
    fn check(upload: Upload<Self::Spec>, limits: &UploadLimits) -> Result<CheckedUpload, Problems>;
    /// Checks a name given in a URL or on the command line.
    fn check_name(name: &str) -> Result<(), crate::model::NameError>;
}

/// Applications, as a [`Kind`].
pub struct Applications;
/// Clusters, as a [`Kind`].
pub struct Clusters;

impl Kind for Applications {
    const KIND: DefinitionKind = DefinitionKind::Application;
    type Spec = ApplicationSpec;
    fn spec_name(spec: &ApplicationSpec) -> &str {
        spec.name.as_str()
    }
    fn check(upload: Upload<ApplicationSpec>, limits: &UploadLimits) -> Result<CheckedUpload, Problems> {
        check_application(upload, limits)
    }
    fn check_name(name: &str) -> Result<(), crate::model::NameError> {
        crate::model::AppName::parse(name).map(|_| ())
    }
}

impl Kind for Clusters {
    const KIND: DefinitionKind = DefinitionKind::Cluster;
    type Spec = ClusterSpec;
    fn spec_name(spec: &ClusterSpec) -> &str {
        spec.name.as_str()
    }
    fn check(upload: Upload<ClusterSpec>, limits: &UploadLimits) -> Result<CheckedUpload, Problems> {
        check_cluster(upload, limits)
    }
    fn check_name(name: &str) -> Result<(), crate::model::NameError> {
        ClusterName::parse(name).map(|_| ())
    }
}

/// Deserialises JSON into `T`, turning a failure into one problem located by JSON
/// pointer (`/definition/inputs/0/type: unknown variant ...`).
pub fn from_json_located<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, Problems> {
    let mut de = serde_json::Deserializer::from_slice(bytes);
    match serde_path_to_error::deserialize(&mut de) {
        Ok(v) => {
            if let Err(e) = de.end() {
                return Err(Problems::from(crate::model::Problem::new("", format!("invalid JSON: {e}"))));
            }
            Ok(v)
        }
        Err(e) => {
            let pointer = crate::model::problems::pointer_from_serde_path(e.path());
            let inner = e.into_inner();
            let message = if inner.is_syntax() || inner.is_eof() {
                format!("invalid JSON: {inner}")
            } else {
                // serde_json appends " at line L column C"; the pointer already locates it.
                strip_position(&inner.to_string())
            };
            let pointer = if inner.is_syntax() || inner.is_eof() { String::new() } else { pointer };
            Err(Problems::from(crate::model::Problem::new(pointer, message)))
        }
    }
}

fn strip_position(msg: &str) -> String {
    match msg.rfind(" at line ") {
        Some(i) => msg[..i].to_owned(),
        None => msg.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn app_upload(extra_files: &[(&str, &str)]) -> ApplicationUpload {
        let mut files: BTreeMap<String, String> =
            Phase::DEFAULT.into_iter().map(|p| (app_script_path(p), format!("#!/bin/bash\necho {p}\n"))).collect();
        for (k, v) in extra_files {
            files.insert((*k).to_owned(), (*v).to_owned());
        }
        Upload { definition: toml::from_str("name = 'demo'").unwrap(), files }
    }

    #[test]
    fn a_complete_application_upload_passes_and_is_sorted_by_path() {
        let checked =
            check_application(app_upload(&[("cluster/local-slurm", "module load x\r\n")]), &UploadLimits::default())
                .unwrap();
        let paths: Vec<_> = checked.files.iter().map(|f| f.path.as_str()).collect();
        assert_eq!(paths, ["app_epilog", "app_execute", "app_prolog", "cluster/local-slurm"]);
        assert_eq!(checked.notes, ["cluster/local-slurm: converted 1 CRLF line ending to LF"]);
        assert_eq!(checked.files[3].text, "module load x\n");
    }

    #[test]
    fn missing_and_unexpected_files_are_all_reported() {
        let mut upload = app_upload(&[("cluster/../etc", "x"), ("notes.txt", "x"), ("app_execute", "no shebang")]);
        upload.files.remove("app_prolog");
        let problems = check_application(upload, &UploadLimits::default()).unwrap_err();
        let got: Vec<_> = problems.iter().map(|p| p.pointer.as_str()).collect();
        assert_eq!(got, ["/files/app_prolog", "/files/app_execute", "/files/cluster~1..~1etc", "/files/notes.txt"]);
        let msgs = problems.to_string();
        assert!(msgs.contains("the required file `app_prolog` is missing"), "{msgs}");
        assert!(msgs.contains("contains `/`") || msgs.contains("`..`"), "{msgs}");
    }

    #[test]
    fn oversized_scripts_are_refused_by_name() {
        let limits = UploadLimits { max_script_bytes: 64, ..Default::default() };
        let big = format!("#!/bin/sh\n{}\n", "#".repeat(100));
        let problems = check_application(app_upload(&[("app_execute", &big)]), &limits).unwrap_err();
        assert_eq!(problems.iter().next().unwrap().pointer, "/files/app_execute");
        assert!(problems.to_string().contains("limit is 64 bytes"));
    }

    #[test]
    fn integers_beyond_64_bits_are_refused_by_pointer() {
        let body = br#"{"definition": {"name": "a", "inputs": [{"name": "x", "type": "select", "value": 1,
            "choices": [1, 18446744073709551615]}]}, "files": {}}"#;
        let upload = from_json_located::<ApplicationUpload>(body).unwrap();
        let problems = check_application(upload, &UploadLimits::default()).unwrap_err();
        let p = problems.iter().find(|p| p.pointer == "/definition/inputs/0/choices/1").expect("located");
        assert!(p.message.contains("too large"), "{}", p.message);
    }

    #[test]
    fn cluster_uploads_need_the_common_template() {
        let def: ClusterSpec = toml::from_str("name='c'\nscheduler='local'").unwrap();
        let upload = Upload {
            definition: def,
            files: BTreeMap::from([("forge/script_execute".to_owned(), "#!/bin/bash\n".to_owned())]),
        };
        let problems = check_cluster(upload, &UploadLimits::default()).unwrap_err();
        assert_eq!(
            problems.to_string(),
            "/files/forge~1script_common: the required file `forge/script_common` is missing"
        );
    }

    #[test]
    fn json_errors_are_located_by_pointer() {
        let body = br#"{"definition": {"name": "a", "inputs": [{"name": "x", "type": "integer"}]}, "files": {}}"#;
        let problems = from_json_located::<ApplicationUpload>(body).unwrap_err();
        let p = problems.iter().next().unwrap();
        assert_eq!(p.pointer, "/definition/inputs/0/type");
        assert!(p.message.starts_with("unknown variant `integer`"), "{}", p.message);
        let problems = from_json_located::<ApplicationUpload>(br#"{"definition": {"name": "a/b"}}"#).unwrap_err();
        assert_eq!(problems.iter().next().unwrap().pointer, "/definition/name");
        let problems = from_json_located::<ApplicationUpload>(b"{\"definition\": ").unwrap_err();
        assert!(problems.iter().next().unwrap().message.starts_with("invalid JSON"));
    }

    #[test]
    fn declared_phases_need_their_scripts_and_nothing_else_with_every_problem_at_once() {
        let definition: ApplicationSpec = toml::from_str(
            r#"
            name = "wf"
            [[phases]]
            name = "prep"
            produces = ["mesh.dat"]
            [[phases]]
            name = "solve"
            needs = ["mesh.dat"]
            after = ["nope"]
            [[phases]]
            name = "default"
            [resources.solve]
            cpus = 4
            [resources.plot]
            cpus = 1
            "#,
        )
        .unwrap();
        let files = BTreeMap::from([
            ("app_prep".to_owned(), "#!/bin/sh\ntrue\n".to_owned()),
            ("app_execute".to_owned(), "#!/bin/sh\ntrue\n".to_owned()),
        ]);
        let problems = check_application(Upload { definition, files }, &UploadLimits::default()).unwrap_err();
        let got: Vec<(&str, &str)> = problems.iter().map(|p| (p.pointer.as_str(), p.message.as_str())).collect();
        let has = |ptr: &str, words: &str| {
            assert!(got.iter().any(|(p, m)| *p == ptr && m.contains(words)), "{ptr}: {words}\n{got:#?}")
        };
        has("/definition/phases/2/name", "`default` names the resources every phase shares");
        has("/definition/phases/1/after/0", "`nope`, which is not declared");
        has("/files/app_solve", "the required file `app_solve` is missing");
        has("/files/app_default", "the required file `app_default` is missing");
        has(
            "/files/app_execute",
            "the application declares no phase `execute`; its scripts are `app_prep`, `app_solve`",
        );
        // Resources are checked against the phases once the graph resolves.
        let definition: ApplicationSpec =
            toml::from_str("name = 'wf'\n[[phases]]\nname = 'prep'\n[resources.plot]\ncpus = 1\n").unwrap();
        let files = BTreeMap::from([("app_prep".to_owned(), "#!/bin/sh\ntrue\n".to_owned())]);
        let problems = check_application(Upload { definition, files }, &UploadLimits::default()).unwrap_err();
        assert_eq!(
            problems.to_string(),
            "/definition/resources/plot: there is no phase `plot` to give these resources to (the phases are `prep`)"
        );
    }

    #[test]
    fn a_declared_workflow_passes_and_keeps_its_graph() {
        let definition: ApplicationSpec = toml::from_str(
            "name = 'wf'\n[[phases]]\nname = 'a'\n[[phases]]\nname = 'b'\nafter = [{ phase = 'a', when = 'ended' }]\n",
        )
        .unwrap();
        let files: BTreeMap<String, String> =
            ["app_a", "app_b"].iter().map(|p| ((*p).to_owned(), "#!/bin/sh\ntrue\n".to_owned())).collect();
        let checked = check_application(Upload { definition, files }, &UploadLimits::default()).unwrap();
        let back: ApplicationSpec = serde_json::from_value(checked.definition).unwrap();
        assert_eq!(back.graph().unwrap().to_string(), "a; b after a ended");
    }

    #[test]
    fn clusters_may_have_a_template_for_any_phase_name() {
        let def: ClusterSpec = toml::from_str("name='c'\nscheduler='local'").unwrap();
        let t = "#!/bin/bash\n@@ HPCG_PAYLOAD @@\n".to_owned();
        let files = BTreeMap::from([
            ("forge/script_common".to_owned(), t.clone()),
            ("forge/script_render".to_owned(), t.clone()),
            ("forge/script_Bad-Name".to_owned(), t),
        ]);
        let problems = check_cluster(Upload { definition: def, files }, &UploadLimits::default()).unwrap_err();
        assert_eq!(problems.len(), 1, "{problems}");
        assert!(problems.to_string().starts_with("/files/forge~1script_Bad-Name: unexpected file"), "{problems}");
    }
}

//! The folder format of definitions, read by `hpcforge app push` / `cluster push`:
//!
//! ```text
//! applications/<name>/application.toml   clusters/<name>/cluster.toml
//!                    /app_prolog                        /forge/script_common
//!                    /app_execute                       /forge/script_<phase>   (optional)
//!                    /app_epilog
//!                    /cluster/<cluster>  (one per cluster it runs on)
//! ```
//!
//! A cluster may take its templates from `forge-templates/<set>/` by naming the set in
//! `templates = "<set>"`; files in its own `forge/` override single templates.
//!
//! Everything is read and checked locally first, so mistakes are reported against the
//! file (and line) that has them before anything is sent.
//!
//! Why this file is long: under 490 lines of code; the rest are its unit tests of the
//! mistakes an admin can make in a folder and how each is reported.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::{Path, PathBuf};

use crate::model::{ApplicationSpec, ClusterSpec, HostKey, Phase, Problems};

use super::{COMMON_TEMPLATE, DefinitionKind, Upload, UploadLimits, app_script_path, check_application, check_cluster};

/// A problem found in a definition folder, located by file (and line where known).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FolderProblem {
    /// The file (or folder) concerned.
    pub file: PathBuf,
    /// Line and column in that file, when known.
    pub line_col: Option<(usize, usize)>,
    /// The field within the file (`inputs[1].type`), when known.
    pub field: Option<String>,
    /// What is wrong.
    pub message: String,
}

impl fmt::Display for FolderProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some((l, c)) = self.line_col {
            write!(f, ":{l}:{c}")?;
        }
        if let Some(field) = &self.field {
            write!(f, ": {field}")?;
        }
        write!(f, ": {}", self.message)
    }
}

/// Everything wrong with a folder.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FolderProblems(pub Vec<FolderProblem>);

impl fmt::Display for FolderProblems {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{p}")?;
        }
        Ok(())
    }
}

impl std::error::Error for FolderProblems {}

impl FolderProblems {
    fn push(&mut self, file: impl Into<PathBuf>, message: impl Into<String>) {
        self.0.push(FolderProblem { file: file.into(), line_col: None, field: None, message: message.into() });
    }
}

/// A definition folder read into an upload, remembering where each part came from so
/// problems reported later (by the server, as JSON pointers) can be shown per file.
#[derive(Debug, Clone)]
pub struct LoadedFolder<S> {
    /// What will be sent.
    pub upload: Upload<S>,
    /// The definition file read.
    pub definition_file: PathBuf,
    /// For each upload file key, the file it was read from.
    pub sources: BTreeMap<String, PathBuf>,
    /// Files in the folder that are not part of the format (reported, not sent).
    pub ignored: Vec<PathBuf>,
}

impl<S> LoadedFolder<S> {
    /// Describes a JSON pointer into the upload in terms of the folder:
    /// `/definition/inputs/1/type` → `…/application.toml: inputs[1].type`,
    /// `/files/app_execute` → `…/app_execute`.
    pub fn locate(&self, pointer: &str) -> (PathBuf, Option<String>) {
        if let Some(rest) = pointer.strip_prefix("/definition") {
            let field = field_path(rest);
            return (self.definition_file.clone(), (!field.is_empty()).then_some(field));
        }
        if let Some(rest) = pointer.strip_prefix("/files/") {
            let key = rest.replace("~1", "/").replace("~0", "~");
            if let Some(src) = self.sources.get(&key) {
                return (src.clone(), None);
            }
            let folder = self.definition_file.parent().unwrap_or(Path::new("."));
            return (folder.join(key), None);
        }
        (self.definition_file.clone(), (!pointer.is_empty()).then(|| pointer.to_owned()))
    }

    /// Turns pointer-located problems into file-located ones.
    pub fn locate_all(&self, problems: &Problems) -> FolderProblems {
        FolderProblems(
            problems
                .iter()
                .map(|p| {
                    let (file, field) = self.locate(&p.pointer);
                    FolderProblem { file, line_col: None, field, message: p.message.clone() }
                })
                .collect(),
        )
    }
}

/// `/inputs/1/type` → `inputs[1].type`.
fn field_path(pointer: &str) -> String {
    let mut out = String::new();
    for token in pointer.split('/').skip(1) {
        let token = token.replace("~1", "/").replace("~0", "~");
        if token.bytes().all(|b| b.is_ascii_digit()) && !token.is_empty() {
            out.push_str(&format!("[{token}]"));
        } else {
            if !out.is_empty() {
                out.push('.');
            }
            out.push_str(&token);
        }
    }
    out
}

/// Reads a file as UTF-8 text with a size cap, or says why not.
fn read_text(path: &Path, max_bytes: usize) -> Result<String, String> {
    let meta = std::fs::metadata(path).map_err(|e| io_message(&e))?;
    if !meta.is_file() {
        return Err("not a regular file".into());
    }
    if meta.len() as usize > max_bytes {
        return Err(format!("the file is {} bytes; the limit is {max_bytes} bytes", meta.len()));
    }
    let bytes = std::fs::read(path).map_err(|e| io_message(&e))?;
    String::from_utf8(bytes).map_err(|e| {
        let at = e.utf8_error().valid_up_to();
        let bytes = e.as_bytes();
        let line = bytes[..at].iter().filter(|b| **b == b'\n').count() + 1;
        let col = at - bytes[..at].iter().rposition(|b| *b == b'\n').map_or(0, |p| p + 1) + 1;
        format!("not UTF-8 text: invalid byte 0x{:02x} at line {line}, byte {col}; save it as UTF-8", bytes[at])
    })
}

fn io_message(e: &std::io::Error) -> String {
    match e.kind() {
        std::io::ErrorKind::NotFound => "file not found".into(),
        std::io::ErrorKind::PermissionDenied => "permission denied".into(),
        _ => e.to_string(),
    }
}

/// Parses TOML text into `T`, locating a failure by line, column and field.
fn parse_toml<T: serde::de::DeserializeOwned>(file: &Path, text: &str) -> Result<T, FolderProblem> {
    let located = |span: Option<std::ops::Range<usize>>, field: Option<String>, message: String| {
        let line_col = span.map(|s| line_col(text, s.start));
        FolderProblem { file: file.to_owned(), line_col, field, message }
    };
    let de = toml::Deserializer::parse(text).map_err(|e| located(e.span(), None, e.message().trim().to_owned()))?;
    serde_path_to_error::deserialize(de).map_err(|e| {
        let field = field_path(&crate::model::problems::pointer_from_serde_path(e.path()));
        let inner = e.into_inner();
        located(inner.span(), (!field.is_empty()).then_some(field), inner.message().trim().to_owned())
    })
}

fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = &text.as_bytes()[..offset];
    let line = before.iter().filter(|b| **b == b'\n').count() + 1;
    let col = offset - before.iter().rposition(|b| *b == b'\n').map_or(0, |p| p + 1) + 1;
    (line, col)
}

fn is_hidden(name: &str) -> bool {
    name.starts_with('.') || name.ends_with('~')
}

/// Reads `applications/<name>/` into an upload and checks it as the server will.
pub fn load_application(dir: &Path, limits: &UploadLimits) -> Result<LoadedFolder<ApplicationSpec>, FolderProblems> {
    let mut problems = FolderProblems::default();
    if !dir.is_dir() {
        problems.push(dir, "not a folder (expected applications/<name>/ with application.toml)");
        return Err(problems);
    }
    let def_file = dir.join(DefinitionKind::Application.definition_file());
    let definition: Option<ApplicationSpec> = match read_text(&def_file, limits.max_script_bytes) {
        Ok(text) => match parse_toml(&def_file, &text) {
            Ok(d) => Some(d),
            Err(p) => {
                problems.0.push(p);
                None
            }
        },
        Err(why) => {
            problems.push(&def_file, why);
            None
        }
    };
    let mut files = BTreeMap::new();
    let mut sources = BTreeMap::new();
    let mut ignored = Vec::new();
    // The phases the definition declares (the default three when it declares none,
    // or cannot be read): each has its script, `app_<phase>`.
    let phases: Vec<Phase> = match &definition {
        Some(d) if !d.phases.is_empty() => d.phases.iter().map(|p| p.name).collect(),
        _ => Phase::DEFAULT.to_vec(),
    };
    let listed: Vec<String> = phases.iter().map(|p| app_script_path(*p)).collect();
    for phase in &phases {
        let key = app_script_path(*phase);
        let path = dir.join(&key);
        match read_text(&path, limits.max_script_bytes) {
            Ok(text) => {
                files.insert(key.clone(), text);
                sources.insert(key, path);
            }
            Err(why) if !path.exists() => problems.push(
                &path,
                format!(
                    "{why}: each phase of the application has its script ({}; a phase with nothing to do can be `#!/bin/sh` + `exit 0`)",
                    listed.join(", ")
                ),
            ),
            Err(why) => problems.push(&path, why),
        }
    }
    let env_dir = dir.join("cluster");
    if env_dir.is_dir() {
        match std::fs::read_dir(&env_dir) {
            Ok(entries) => {
                let mut names: Vec<_> = entries.filter_map(Result::ok).map(|e| e.file_name()).collect();
                names.sort();
                for name in names {
                    let path = env_dir.join(&name);
                    let Some(name) = name.to_str() else {
                        problems.push(&path, "the file name is not UTF-8");
                        continue;
                    };
                    if is_hidden(name) {
                        continue;
                    }
                    let key = format!("cluster/{name}");
                    match read_text(&path, limits.max_script_bytes) {
                        Ok(text) => {
                            files.insert(key.clone(), text);
                            sources.insert(key, path);
                        }
                        Err(why) => problems.push(&path, why),
                    }
                }
            }
            Err(e) => problems.push(&env_dir, io_message(&e)),
        }
    }
    if let Ok(entries) = std::fs::read_dir(dir) {
        let known: Vec<String> = listed.iter().cloned().chain(["application.toml".into(), "cluster".into()]).collect();
        let mut extra: Vec<PathBuf> = Vec::new();
        for e in entries.filter_map(Result::ok) {
            let Some(name) = e.file_name().to_str().map(str::to_owned) else {
                extra.push(e.path());
                continue;
            };
            if is_hidden(&name) || known.contains(&name) {
                continue;
            }
            // A script for a phase the definition does not declare is a mistake the
            // server would refuse, not a file to leave behind quietly.
            if name.starts_with("app_") && e.path().is_file() {
                if let Ok(text) = read_text(&e.path(), limits.max_script_bytes) {
                    sources.insert(name.clone(), e.path());
                    files.insert(name, text);
                }
                continue;
            }
            extra.push(e.path());
        }
        extra.sort();
        ignored = extra;
    }
    let Some(definition) = definition else {
        return Err(problems);
    };
    let loaded = LoadedFolder { upload: Upload { definition, files }, definition_file: def_file, sources, ignored };
    check_loaded(loaded, problems, |u| check_application(u, limits).map(|_| ()))
}

/// Runs the server's checks locally and merges their problems, located by file.
fn check_loaded<S: Clone>(
    loaded: LoadedFolder<S>,
    mut problems: FolderProblems,
    check: impl FnOnce(Upload<S>) -> Result<(), Problems>,
) -> Result<LoadedFolder<S>, FolderProblems> {
    if let Err(p) = check(loaded.upload.clone()) {
        // Files that could not be read are already reported; don't also call them missing.
        let unread: Vec<PathBuf> = problems.0.iter().map(|p| p.file.clone()).collect();
        for fp in loaded.locate_all(&p).0 {
            if !(fp.message.contains("is missing") && unread.contains(&fp.file)) {
                problems.0.push(fp);
            }
        }
    }
    if problems.0.is_empty() { Ok(loaded) } else { Err(problems) }
}

/// Where to look for `forge-templates/<set>`: the given folder, else the nearest
/// ancestor of the cluster folder that has a `forge-templates/` folder.
fn find_template_set(cluster_dir: &Path, set: &str, templates_dir: Option<&Path>) -> Result<PathBuf, String> {
    if let Some(base) = templates_dir {
        let p = base.join(set);
        return if p.is_dir() { Ok(p) } else { Err(format!("template set `{set}` not found in {}", base.display())) };
    }
    let abs = cluster_dir.canonicalize().unwrap_or_else(|_| cluster_dir.to_owned());
    let mut tried = Vec::new();
    for ancestor in abs.ancestors().skip(1) {
        let p = ancestor.join("forge-templates").join(set);
        if p.is_dir() {
            return Ok(p);
        }
        tried.push(p);
        if tried.len() >= 4 {
            break;
        }
    }
    Err(format!(
        "template set `{set}` not found (looked in {}); pass --templates-dir",
        tried.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
    ))
}

/// Picks the host key for `host:port` from a `.pub` file or a `known_hosts` file.
fn host_key_from_file(text: &str, host: Option<&str>, port: u16) -> Result<HostKey, String> {
    let lines: Vec<&str> = text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')).collect();
    if lines.is_empty() {
        return Err("the file holds no key".into());
    }
    if lines.len() == 1 {
        return HostKey::parse(lines[0]);
    }
    let Some(host) = host else {
        return Err("the file holds several keys and the cluster has no `host` to choose by".into());
    };
    let wanted = if port == 22 { host.to_owned() } else { format!("[{host}]:{port}") };
    let matching: Vec<&str> = lines
        .iter()
        .copied()
        .filter(|l| l.split_whitespace().next().is_some_and(|hosts| hosts.split(',').any(|h| h == wanted)))
        .collect();
    match matching.as_slice() {
        [one] => HostKey::parse(one),
        [] => Err(format!("no line for `{wanted}` in the file")),
        _ => Err(format!("several lines for `{wanted}`; keep one")),
    }
}

/// Reads `clusters/<name>/` into an upload and checks it as the server will.
/// Templates come from the cluster's own `forge/` folder, falling back per file to
/// `forge-templates/<templates>/` when the definition names a set.
pub fn load_cluster(
    dir: &Path,
    templates_dir: Option<&Path>,
    limits: &UploadLimits,
) -> Result<LoadedFolder<ClusterSpec>, FolderProblems> {
    load_cluster_with(dir, templates_dir, limits, true)
}

/// As [`load_cluster`], for offline previews: nothing will connect to the cluster, so
/// a host key that cannot be found is left out instead of being an error.
pub fn load_cluster_for_preview(
    dir: &Path,
    templates_dir: Option<&Path>,
    limits: &UploadLimits,
) -> Result<LoadedFolder<ClusterSpec>, FolderProblems> {
    load_cluster_with(dir, templates_dir, limits, false)
}

fn load_cluster_with(
    dir: &Path,
    templates_dir: Option<&Path>,
    limits: &UploadLimits,
    need_host_key: bool,
) -> Result<LoadedFolder<ClusterSpec>, FolderProblems> {
    let mut problems = FolderProblems::default();
    if !dir.is_dir() {
        problems.push(dir, "not a folder (expected clusters/<name>/ with cluster.toml)");
        return Err(problems);
    }
    let def_file = dir.join(DefinitionKind::Cluster.definition_file());
    let mut definition: ClusterSpec = match read_text(&def_file, limits.max_script_bytes) {
        Ok(text) => match parse_toml(&def_file, &text) {
            Ok(d) => d,
            Err(p) => {
                problems.0.push(p);
                return Err(problems);
            }
        },
        Err(why) => {
            problems.push(&def_file, why);
            return Err(problems);
        }
    };
    if let Some(key_file) = definition.host_key_file.take() {
        let path = if Path::new(&key_file).is_absolute() { PathBuf::from(&key_file) } else { dir.join(&key_file) };
        let field = Some("host_key_file".to_owned());
        if definition.host_key.is_some() {
            problems.0.push(FolderProblem {
                file: def_file.clone(),
                line_col: None,
                field,
                message: "give `host_key` or `host_key_file`, not both".into(),
            });
        } else {
            match read_text(&path, 1 << 20)
                .and_then(|t| host_key_from_file(&t, definition.host.as_deref(), definition.port))
            {
                Ok(k) => definition.host_key = Some(k),
                Err(_) if !need_host_key => {}
                Err(why) => problems.0.push(FolderProblem {
                    file: def_file.clone(),
                    line_col: None,
                    field,
                    message: format!("{}: {why}", path.display()),
                }),
            }
        }
    }
    let set_dir = match &definition.templates {
        Some(set) => match find_template_set(dir, set, templates_dir) {
            Ok(p) => Some(p),
            Err(why) => {
                problems.0.push(FolderProblem {
                    file: def_file.clone(),
                    line_col: None,
                    field: Some("templates".into()),
                    message: why,
                });
                None
            }
        },
        None => None,
    };
    let mut files = BTreeMap::new();
    let mut sources = BTreeMap::new();
    // `script_common` and every `script_<phase>`, the cluster's own first, then its set's.
    let mut keys: BTreeSet<String> = BTreeSet::from([COMMON_TEMPLATE.to_owned()]);
    for d in std::iter::once(dir.join("forge")).chain(set_dir.clone()) {
        let Ok(entries) = std::fs::read_dir(&d) else { continue };
        for e in entries.filter_map(Result::ok) {
            if let Some(name) = e.file_name().to_str()
                && name.strip_prefix("script_").is_some_and(|p| Phase::parse(p).is_ok())
            {
                keys.insert(format!("forge/{name}"));
            }
        }
    }
    for key in keys {
        let own = dir.join(&key);
        let fallback = set_dir.as_ref().map(|s| s.join(key.trim_start_matches("forge/")));
        let path = if own.exists() { Some(own) } else { fallback.filter(|p| p.exists()) };
        let Some(path) = path else { continue };
        match read_text(&path, limits.max_script_bytes) {
            Ok(text) => {
                files.insert(key.clone(), text);
                sources.insert(key, path);
            }
            Err(why) => problems.push(&path, why),
        }
    }
    if !files.contains_key(COMMON_TEMPLATE) && set_dir.is_none() && definition.templates.is_none() {
        problems.push(
            dir.join(COMMON_TEMPLATE),
            "file not found: a cluster needs forge/script_common, or `templates = \"<set>\"` in cluster.toml to use forge-templates/<set>/",
        );
    }
    let mut ignored = Vec::new();
    if let Ok(entries) = std::fs::read_dir(dir.join("forge")) {
        for e in entries.filter_map(Result::ok) {
            let name = e.file_name().to_string_lossy().into_owned();
            let key = format!("forge/{name}");
            if !is_hidden(&name) && !sources.contains_key(&key) {
                // Unknown template names are sent so the server refuses them by name.
                match read_text(&e.path(), limits.max_script_bytes) {
                    Ok(text) => {
                        files.insert(key.clone(), text);
                        sources.insert(key, e.path());
                    }
                    Err(_) => ignored.push(e.path()),
                }
            }
        }
    }
    let loaded = LoadedFolder { upload: Upload { definition, files }, definition_file: def_file, sources, ignored };
    check_loaded(loaded, problems, |u| {
        check_cluster(u, limits).map(|_| ()).or_else(|p| {
            // Without the need for a host key, its absence is not a problem.
            let kept: Problems =
                p.into_iter().filter(|p| need_host_key || p.pointer != "/definition/host_key").collect();
            kept.into_result()
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, rel: &str, content: &[u8]) {
        let p = dir.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, content).unwrap();
    }

    fn app_dir() -> tempfile::TempDir {
        let t = tempfile::tempdir().unwrap();
        write(t.path(), "application.toml", b"name = \"demo\"\n[[inputs]]\nname = \"n\"\ntype = \"int\"\nvalue = 3\n");
        for p in ["app_prolog", "app_execute", "app_epilog"] {
            write(t.path(), p, b"#!/bin/bash\ntrue\n");
        }
        write(t.path(), "cluster/local-slurm", b"export X=1\n");
        write(t.path(), "README.md", b"notes");
        t
    }

    #[test]
    fn an_application_folder_loads_with_its_cluster_environments() {
        let t = app_dir();
        let loaded = load_application(t.path(), &UploadLimits::default()).unwrap();
        let keys: Vec<_> = loaded.upload.files.keys().cloned().collect();
        assert_eq!(keys, ["app_epilog", "app_execute", "app_prolog", "cluster/local-slurm"]);
        assert_eq!(loaded.ignored, [t.path().join("README.md")]);
    }

    #[test]
    fn toml_mistakes_name_the_file_line_and_field() {
        let t = app_dir();
        write(t.path(), "application.toml", b"name = \"demo\"\n[[inputs]]\nname = \"n\"\ntype = \"integer\"\n");
        let err = load_application(t.path(), &UploadLimits::default()).unwrap_err();
        let p = &err.0[0];
        assert_eq!(p.file, t.path().join("application.toml"));
        assert_eq!(p.line_col.map(|l| l.0), Some(4));
        assert_eq!(p.field.as_deref(), Some("inputs[0].type"));
        assert!(p.message.contains("unknown variant `integer`"), "{}", p.message);
    }

    #[test]
    fn malformed_toml_is_reported_with_its_position() {
        let t = app_dir();
        write(t.path(), "application.toml", b"name = \"demo\"\n[[inputs]\n");
        let err = load_application(t.path(), &UploadLimits::default()).unwrap_err();
        assert_eq!(err.0[0].line_col.map(|l| l.0), Some(2), "{err}");
    }

    #[test]
    fn missing_and_non_utf8_scripts_are_reported_by_file() {
        let t = app_dir();
        std::fs::remove_file(t.path().join("app_epilog")).unwrap();
        write(t.path(), "app_execute", b"#!/bin/bash\necho \xff\n");
        let err = load_application(t.path(), &UploadLimits::default()).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("app_epilog: file not found: each phase of the application has its script"), "{text}");
        assert!(text.contains("app_execute: not UTF-8 text: invalid byte 0xff at line 2, byte 6"), "{text}");
        // Reported once each, not again as "missing" by the server-side check.
        assert_eq!(err.0.len(), 2, "{text}");
    }

    #[test]
    fn semantic_problems_come_back_located_in_the_definition_file() {
        let t = app_dir();
        write(
            t.path(),
            "application.toml",
            b"name = \"demo\"\n[[inputs]]\nname = \"n\"\ntype = \"int\"\nvalue = 3\nmin = 5\n",
        );
        let err = load_application(t.path(), &UploadLimits::default()).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "{}: inputs[0].value: the default value is below min (5)",
                t.path().join("application.toml").display()
            )
        );
    }

    #[test]
    fn clusters_take_templates_from_the_named_set_and_override_per_file() {
        let root = tempfile::tempdir().unwrap();
        write(root.path(), "forge-templates/slurm/script_common", b"#!/bin/bash\n# common\n@@ HPCG_PAYLOAD @@\n");
        write(
            root.path(),
            "forge-templates/slurm/script_execute",
            b"#!/bin/bash\n# default execute\n@@ HPCG_PAYLOAD @@\n",
        );
        let c = root.path().join("clusters/hpc");
        write(&c, "cluster.toml", b"name = \"hpc\"\nscheduler = \"slurm\"\nhost = \"login\"\ntemplates = \"slurm\"\nhost_key_file = \"key.pub\"\n");
        write(
            &c,
            "key.pub",
            b"ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl root@x\n",
        );
        write(&c, "forge/script_execute", b"#!/bin/bash\n# site execute\n@@ HPCG_PAYLOAD @@\n");
        let loaded = load_cluster(&c, None, &UploadLimits::default()).unwrap();
        assert_eq!(loaded.upload.files["forge/script_common"], "#!/bin/bash\n# common\n@@ HPCG_PAYLOAD @@\n");
        assert_eq!(loaded.upload.files["forge/script_execute"], "#!/bin/bash\n# site execute\n@@ HPCG_PAYLOAD @@\n");
        assert_eq!(loaded.upload.definition.host_key.as_ref().unwrap().kind, "ssh-ed25519");
        assert!(loaded.upload.definition.host_key_file.is_none());
    }

    #[test]
    fn known_hosts_files_are_searched_for_the_clusters_host_and_port() {
        let kh = "[127.0.0.1]:2222 ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl\n\
                  other ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl\n";
        assert!(host_key_from_file(kh, Some("127.0.0.1"), 2222).is_ok());
        assert!(host_key_from_file(kh, Some("127.0.0.1"), 22).unwrap_err().contains("no line for `127.0.0.1`"));
    }

    #[test]
    fn an_unknown_template_set_says_where_it_looked() {
        let root = tempfile::tempdir().unwrap();
        let c = root.path().join("clusters/x");
        write(&c, "cluster.toml", b"name = \"x\"\nscheduler = \"local\"\ntemplates = \"nope\"\n");
        let err = load_cluster(&c, None, &UploadLimits::default()).unwrap_err().to_string();
        assert!(err.contains("templates: template set `nope` not found"), "{err}");
    }
}

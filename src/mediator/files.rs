//! A task's files, back to its user: the run directory listed, and one file of it
//! downloaded (whole or a byte range), both read on the cluster as the task's owner,
//! so the cluster's own permissions apply. A path is relative to the run directory;
//! one with `..`, or that leads out of the run directory through a symbolic link, is
//! refused (the first here, the second on the cluster, where the links are).
//!
//! Why this file is long: each of its three scripts (list, send a file, send a
//! tarball) sits beside the reader of its answer and the tests that run it with `sh`
//! on a real folder; apart, a change to a script and to its reader could drift.

use std::fmt::Write as _;

use base64::Engine as _;
use time::OffsetDateTime;

use super::clusters::Exec;
use super::remote::RemoteError;
use super::stream::RemoteStream;
use super::{Mediator, MediatorError};
use crate::model::{Problem, Task};
use crate::scheduler::common::HELPERS;
use crate::shell::shell_quote;

/// The most entries a listing returns; the rest are counted as left out.
pub const MAX_LISTED: usize = 10_000;

/// How long a download may wait for the cluster's next bytes.
pub const STREAM_IDLE: std::time::Duration = std::time::Duration::from_secs(60);

/// What an entry of the run directory is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum FileKind {
    /// A regular file.
    File,
    /// A directory.
    Dir,
    /// A symbolic link (not followed).
    Link,
    /// Anything else (a socket, a pipe).
    Other,
}

/// One entry of a run directory.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct RunFile {
    /// Its path, relative to the run directory.
    pub path: String,
    /// What it is.
    pub kind: FileKind,
    /// Its size in bytes.
    pub size: u64,
    /// When it was last modified.
    #[serde(with = "time::serde::rfc3339")]
    pub modified: OffsetDateTime,
    /// The sha256 of its bytes, for a file kept in the store.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
}

/// Where a listing or a download comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum FileSource {
    /// The run directory on the cluster, read as the task's owner.
    #[default]
    Cluster,
    /// The outputs kept in the store when the task ended (`[archive]`).
    Archive,
}

impl FileSource {
    /// As written in the `Hpcforge-Source` header.
    pub fn as_str(self) -> &'static str {
        match self {
            FileSource::Cluster => "cluster",
            FileSource::Archive => "archive",
        }
    }
}

/// A run directory's entries, in path order.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct RunFiles {
    /// The run directory on the cluster.
    pub run_dir: String,
    /// Its entries (at most [`MAX_LISTED`]); the engine's own `.hpcforge` folder
    /// included.
    pub files: Vec<RunFile>,
    /// Entries left out beyond [`MAX_LISTED`].
    pub left_out: u64,
    /// Where the listing comes from: the cluster, or (when the run directory is gone
    /// or the cluster cannot be reached) the outputs kept in the store.
    #[serde(default)]
    pub source: FileSource,
}

/// Which bytes of a file a download asks for (an HTTP `Range: bytes=` of one range).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ByteRange {
    /// From this offset to the end (`bytes=500-`).
    From(u64),
    /// From the first offset to the second, both included (`bytes=0-499`).
    Between(u64, u64),
    /// The last this many bytes (`bytes=-500`).
    Last(u64),
}

impl ByteRange {
    /// Reads a `Range` header's value: `Ok(None)` for a form this does not serve
    /// (another unit, several ranges), which is then answered with the whole file,
    /// as HTTP allows; `Err` for one that cannot be read.
    pub fn parse(header: &str) -> Result<Option<ByteRange>, String> {
        let Some(spec) = header.trim().strip_prefix("bytes=") else { return Ok(None) };
        if spec.contains(',') {
            return Ok(None);
        }
        let bad = || {
            format!(
                "`Range: {}` is not a byte range (bytes=FIRST-LAST, bytes=FIRST-, bytes=-COUNT)",
                header.escape_debug()
            )
        };
        let (a, b) = spec.trim().split_once('-').ok_or_else(bad)?;
        let num = |s: &str| s.trim().parse::<u64>().map_err(|_| bad());
        match (a.trim().is_empty(), b.trim().is_empty()) {
            (true, true) => Err(bad()),
            (true, false) => Ok(Some(ByteRange::Last(num(b)?))),
            (false, true) => Ok(Some(ByteRange::From(num(a)?))),
            (false, false) => {
                let (a, b) = (num(a)?, num(b)?);
                if b < a { Err(bad()) } else { Ok(Some(ByteRange::Between(a, b))) }
            }
        }
    }
}

/// What a download sends.
#[derive(Debug)]
pub struct Download {
    /// The file's path, relative to the run directory.
    pub path: String,
    /// Its whole size.
    pub size: u64,
    /// When it was last modified.
    pub modified: OffsetDateTime,
    /// The bytes sent: `first..=last` of the file (`None`: the file is empty).
    pub span: Option<(u64, u64)>,
    /// Whether a range was asked for and is served (HTTP 206).
    pub partial: bool,
    /// The bytes, streamed.
    pub body: RemoteStream,
    /// Where they come from.
    pub source: FileSource,
}

/// Why a download cannot be served.
#[derive(Debug)]
pub enum DownloadError {
    /// Not served (no such file, a path leading out, the cluster unreachable).
    Refused(MediatorError),
    /// The range asked for starts beyond the file's end (HTTP 416); its size.
    Unsatisfiable(u64),
}

impl From<MediatorError> for DownloadError {
    fn from(e: MediatorError) -> Self {
        DownloadError::Refused(e)
    }
}

/// `path` (relative to the run directory) in a normal form: its `.` and empty parts
/// dropped; refused when absolute, when a part is `..`, or when it holds a control
/// character. The empty path is the run directory itself.
pub fn relative_path(path: &str) -> Result<String, String> {
    if path.starts_with('/') {
        return Err(format!("`{}` is absolute; paths are relative to the task's run directory", path.escape_debug()));
    }
    if path.chars().any(char::is_control) {
        return Err("a path without control characters".into());
    }
    if path.len() > 4096 {
        return Err("a path of at most 4096 bytes".into());
    }
    let mut parts = Vec::new();
    for part in path.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                return Err(format!("`{}` leads out of the task's run directory (`..`)", path.escape_debug()));
            }
            p => parts.push(p),
        }
    }
    Ok(parts.join("/"))
}

/// The script that lists the run directory: `NORUN`, or `LIST <b64>` of
/// `<kind>\t<size>\t<mtime>\t<path>\0` entries (at most [`MAX_LISTED`] + 1).
fn list_script(run_dir: &str) -> String {
    format!(
        "{HELPERS}cd -- {dir} 2>/dev/null || {{ printf 'NORUN\\n'; exit 0; }}\n\
         printf 'LIST %s\\n' \"$(find . -mindepth 1 -printf '%y\\t%s\\t%T@\\t%P\\0' 2>/dev/null | head -z -n {n} | hpcg_b64)\"\n\
         printf 'COUNT %s\\n' \"$(find . -mindepth 1 -printf x 2>/dev/null | wc -c)\"\n",
        dir = shell_quote(run_dir),
        n = MAX_LISTED + 1,
    )
}

/// Reads what [`list_script`] printed (`None`: no run directory yet).
fn parse_list(body: &str, run_dir: &str) -> Option<RunFiles> {
    let mut files = Vec::new();
    let mut count = 0u64;
    let mut seen = false;
    for line in body.lines() {
        if line.trim() == "NORUN" {
            return None;
        }
        if let Some(n) = line.strip_prefix("COUNT ") {
            count = n.trim().parse().unwrap_or(0);
        }
        let Some(b64) = line.strip_prefix("LIST ") else { continue };
        seen = true;
        let raw = base64::engine::general_purpose::STANDARD.decode(b64.trim()).unwrap_or_default();
        for entry in raw.split(|&b| b == 0).filter(|e| !e.is_empty()) {
            let text = String::from_utf8_lossy(entry);
            let f: Vec<&str> = text.splitn(4, '\t').collect();
            let [kind, size, mtime, path] = f[..] else { continue };
            let kind = match kind {
                "f" => FileKind::File,
                "d" => FileKind::Dir,
                "l" => FileKind::Link,
                _ => FileKind::Other,
            };
            let secs = mtime.split('.').next().and_then(|s| s.parse::<i64>().ok()).unwrap_or(0);
            let modified = OffsetDateTime::from_unix_timestamp(secs).unwrap_or(OffsetDateTime::UNIX_EPOCH);
            files.push(RunFile {
                path: path.to_owned(),
                kind,
                size: size.parse().unwrap_or(0),
                modified,
                sha256: None,
            });
        }
    }
    if !seen {
        return None;
    }
    files.sort_by(|a, b| a.path.cmp(&b.path));
    files.truncate(MAX_LISTED);
    let left_out = count.saturating_sub(files.len() as u64);
    Some(RunFiles { run_dir: run_dir.to_owned(), files, left_out, source: FileSource::Cluster })
}

/// The script that sends one file: its header line (after the begin marker) is
/// `OK <size> <mtime> <first> <last>` then the bytes, `EMPTY <mtime>`,
/// `RANGE <size>` (unsatisfiable), or `NO <b64 reason>`.
fn download_script(run_dir: &str, path: &str, range: Option<ByteRange>) -> String {
    let (kind, a, b) = match range {
        None => ("all", 0, 0),
        Some(ByteRange::From(a)) => ("from", a, 0),
        Some(ByteRange::Between(a, b)) => ("between", a, b),
        Some(ByteRange::Last(n)) => ("last", n, 0),
    };
    let mut s = String::from(HELPERS);
    let _ = write!(
        s,
        "{NO}\
         hpcg_root=$(cd -- {dir} 2>/dev/null && pwd -P) || hpcg_no \"the task's run directory does not exist (yet)\"\n\
         hpcg_f=$(realpath -e -- \"$hpcg_root\"/{rel} 2>/dev/null) || hpcg_no \"there is no {shown} in the run directory\"\n\
         case $hpcg_f in \"$hpcg_root\"/*) ;; *) hpcg_no \"{shown} leads out of the task's run directory (a symbolic link)\" ;; esac\n\
         [ -f \"$hpcg_f\" ] || hpcg_no \"{shown} is not a regular file\"\n\
         [ -r \"$hpcg_f\" ] || hpcg_no \"{shown} cannot be read by the task's owner\"\n\
         hpcg_size=$(stat -c %s -- \"$hpcg_f\") && hpcg_mtime=$(stat -c %Y -- \"$hpcg_f\") || hpcg_no \"{shown} cannot be read\"\n\
         hpcg_a={a}; hpcg_b={b}; hpcg_last=$((hpcg_size - 1))\n\
         case {kind} in\n\
         \x20 all) hpcg_s=0; hpcg_e=$hpcg_last ;;\n\
         \x20 from) hpcg_s=$hpcg_a; hpcg_e=$hpcg_last ;;\n\
         \x20 between) hpcg_s=$hpcg_a; hpcg_e=$hpcg_b; [ \"$hpcg_e\" -gt \"$hpcg_last\" ] && hpcg_e=$hpcg_last ;;\n\
         \x20 last) hpcg_s=$((hpcg_size - hpcg_a)); [ \"$hpcg_s\" -lt 0 ] && hpcg_s=0; hpcg_e=$hpcg_last ;;\n\
         esac\n\
         if [ \"$hpcg_size\" = 0 ] && [ {kind} = all ]; then printf '%s EMPTY %s\\n' \"$hpcg_begin\" \"$hpcg_mtime\"; exit 0; fi\n\
         if [ \"$hpcg_s\" -ge \"$hpcg_size\" ] || [ \"$hpcg_a\" -eq 0 -a {kind} = last ]; then printf '%s RANGE %s\\n' \"$hpcg_begin\" \"$hpcg_size\"; exit 0; fi\n\
         printf '%s OK %s %s %s %s\\n' \"$hpcg_begin\" \"$hpcg_size\" \"$hpcg_mtime\" \"$hpcg_s\" \"$hpcg_e\"\n\
         exec dd if=\"$hpcg_f\" bs=65536 skip=\"$hpcg_s\" count=$((hpcg_e - hpcg_s + 1)) iflag=skip_bytes,count_bytes status=none\n",
        dir = shell_quote(run_dir),
        rel = shell_quote(if path.is_empty() { "." } else { path }),
        // In double quotes on the cluster: only what is safe there is shown.
        shown = shown(path),
    );
    s
}

/// The script that sends the outputs as a gzipped tar stream: its header line is
/// `OK <entries>` then the bytes, or `NO <b64 reason>`. `globs` are expanded in the
/// run directory as patterns only (each quoted into a variable, expanded unquoted
/// with `IFS` a newline: no substitution of any kind happens), `chosen` paths
/// (normalised by [`relative_path`]) are taken as they are;
/// matches that lead out of the run directory are left out, and so are the staged
/// inputs (`staged`: their names) even inside a chosen folder.
pub(super) fn tarball_script(run_dir: &str, globs: &[String], chosen: &[String], staged: &[String]) -> String {
    let chosen: Vec<String> = chosen.iter().map(|c| shell_quote(c).into_owned()).collect();
    // As a chosen folder's members are named (`./input.dat`, or `input.dat`).
    let excludes: String = staged
        .iter()
        .map(|n| format!(" --exclude={} --exclude={}", shell_quote(n), shell_quote(&format!("./{n}"))))
        .collect();
    let mut s = String::from(HELPERS);
    let _ = write!(
        s,
        "{NO}\
         hpcg_root=$(cd -- {dir} 2>/dev/null && pwd -P) && cd -- \"$hpcg_root\" || hpcg_no \"the task's run directory does not exist (yet)\"\n\
         hpcg_list=$(mktemp) || hpcg_no \"no temporary file could be made on the cluster\"\n\
         {matching}\
         hpcg_add() {{ hpcg_output \"$1\" && printf '%s\\0' \"$1\" >> \"$hpcg_list\"; }}\n\
         hpcg_each_output hpcg_add\n\
         for hpcg_p in {chosen}; do hpcg_add \"$hpcg_p\"; done\n\
         if [ ! -s \"$hpcg_list\" ]; then rm -f \"$hpcg_list\"; hpcg_no \"nothing to bundle: none of the outputs exists in the run directory\"; fi\n\
         sort -zu -o \"$hpcg_list\" \"$hpcg_list\"\n\
         printf '%s OK %s\\n' \"$hpcg_begin\" \"$(tr -cd '\\000' < \"$hpcg_list\" | wc -c)\"\n\
         tar -czf - --anchored{excludes} --null -T \"$hpcg_list\"; hpcg_rc=$?\n\
         rm -f \"$hpcg_list\"; exit $hpcg_rc\n",
        dir = shell_quote(run_dir),
        matching = output_matching(globs, staged),
        chosen = chosen.join(" "),
    );
    s
}

/// Shell functions (for a script that has `cd`'d into `$hpcg_root`, the run
/// directory) that say which paths are outputs: `hpcg_output PATH` holds when the
/// path exists, leads to the run directory or inside it (`realpath`), and is not
/// under a staged input (`staged`: their names); `hpcg_each_output CMD` runs `CMD
/// PATH` for each match of `globs`, expanded as patterns only (each quoted into a
/// variable, expanded unquoted with `IFS` a newline: no substitution of any kind
/// happens). What the tarball and the archive take, alike.
pub(super) fn output_matching(globs: &[String], staged: &[String]) -> String {
    let globs: Vec<String> = globs
        .iter()
        .filter(|g| crate::model::application::check_output_glob(g).is_ok())
        .map(|g| shell_quote(g).into_owned())
        .collect();
    let skip: String = staged.iter().map(|n| format!(" {}", shell_quote(n))).collect();
    format!(
        "hpcg_output() {{\n\
         \x20 [ -e \"$1\" ] || return 1\n\
         \x20 hpcg_r=$(realpath -e -- \"$1\" 2>/dev/null) || return 1\n\
         \x20 case $hpcg_r in \"$hpcg_root\" | \"$hpcg_root\"/*) ;; *) return 1 ;; esac\n\
         \x20 hpcg_top=${{1#./}}; hpcg_top=${{hpcg_top%%/*}}\n\
         \x20 for hpcg_s in{skip}; do [ \"$hpcg_top\" = \"$hpcg_s\" ] && return 1; done\n\
         \x20 return 0\n\
         }}\n\
         hpcg_each_output() {{\n\
         \x20 set +f; IFS='\n'\n\
         \x20 for hpcg_g in {globs}; do for hpcg_p in $hpcg_g; do \"$1\" \"$hpcg_p\"; done; done\n\
         }}\n",
        globs = globs.join(" "),
    )
}

/// The shell function a streaming script refuses with: the header `NO <b64 reason>`,
/// read by [`refusal`].
const NO: &str = "hpcg_no() { printf '%s NO %s\\n' \"$hpcg_begin\" \"$(printf '%s' \"$1\" | hpcg_b64)\"; exit 0; }\n";

/// The reason a `NO` header gives.
fn refusal(b64: &str) -> String {
    base64::engine::general_purpose::STANDARD
        .decode(b64.trim())
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default()
}

/// A path as the cluster's messages name it: `` `path` `` with every character that
/// means something in double quotes left out.
fn shown(path: &str) -> String {
    let safe: String = path.chars().filter(|c| !matches!(c, '"' | '$' | '`' | '\\' | '!')).collect();
    format!("`{safe}`")
}

/// The cluster did not answer as it should.
fn unavailable(task: &Task, what: &str) -> MediatorError {
    MediatorError::Unavailable(format!("cluster `{}` (task {}): {what}", task.cluster.name, task.id))
}

impl Mediator {
    /// How to reach the task's cluster as its owner; no key registered: a conflict.
    pub(super) async fn owner_exec(&self, task: &Task) -> Result<Exec, MediatorError> {
        let cluster = self.forge.cluster(self.store.as_ref(), &task.cluster.name).await?;
        self.clusters.exec_for(&cluster.spec, &task.owner).await.map_err(|e| match e {
            RemoteError::Refused(m) => MediatorError::Conflict(m),
            other => unavailable(task, &format!("cannot be reached: {other}")),
        })
    }

    /// The task's run directory, listed on the cluster as its owner; when it is gone
    /// or the cluster cannot be reached, the outputs kept in the store, if any.
    pub async fn list_files(&self, task: &Task) -> Result<RunFiles, MediatorError> {
        match self.list_on_cluster(task).await {
            Err(e @ (MediatorError::NotFound(_) | MediatorError::Unavailable(_)))
                if task.archive.as_ref().is_some_and(|a| a.serves()) =>
            {
                tracing::info!(task = %task.id, why = %e, "listing the outputs kept in the store");
                self.list_archived(task).await
            }
            other => other,
        }
    }

    async fn list_on_cluster(&self, task: &Task) -> Result<RunFiles, MediatorError> {
        let exec = self.owner_exec(task).await?;
        let out = self
            .clusters
            .run(&exec, &list_script(&task.run_dir), self.cfg.query_timeout)
            .await
            .map_err(|e| unavailable(task, &format!("could not list the run directory: {e}")))?;
        parse_list(&out.body, &task.run_dir).ok_or_else(|| {
            MediatorError::NotFound(format!(
                "task {}'s run directory {} does not exist on cluster {} (yet, or any more)",
                task.id, task.run_dir, task.cluster.name
            ))
        })
    }

    /// One file of the task's run directory (`path`, relative to it), or a byte range
    /// of it, streamed from the cluster as the task's owner.
    pub async fn download(&self, task: &Task, path: &str, range: Option<ByteRange>) -> Result<Download, DownloadError> {
        let rel = relative_path(path).map_err(|why| MediatorError::Invalid(Problem::new("/path", why).into()))?;
        if rel.is_empty() {
            return Err(MediatorError::Invalid(
                Problem::new("/path", "name a file of the run directory (the listing is at .../files)").into(),
            )
            .into());
        }
        // A file kept in the store is served from there: it is what the task made,
        // whatever became of the run directory since.
        if task.archive.as_ref().is_some_and(|a| a.serves())
            && let Some(d) = self.download_archived(task, &rel, range).await?
        {
            return Ok(d);
        }
        let exec = self.owner_exec(task).await?;
        let body = self
            .clusters
            .stream(&exec, &download_script(&task.run_dir, &rel, range), STREAM_IDLE)
            .await
            .map_err(|e| unavailable(task, &format!("could not read {rel}: {e}")))?;
        let header = body.header.clone();
        let words: Vec<&str> = header.split(' ').collect();
        let num = |i: usize| words.get(i).and_then(|w| w.parse::<u64>().ok());
        let time = |secs: Option<u64>| {
            OffsetDateTime::from_unix_timestamp(secs.unwrap_or(0) as i64).unwrap_or(OffsetDateTime::UNIX_EPOCH)
        };
        match words.first().copied() {
            Some("OK") => {
                let (Some(size), Some(first), Some(last)) = (num(1), num(3), num(4)) else {
                    return Err(unavailable(task, &format!("the answer is not understood: {header}")).into());
                };
                Ok(Download {
                    path: rel,
                    size,
                    modified: time(num(2)),
                    span: Some((first, last)),
                    partial: range.is_some(),
                    body,
                    source: FileSource::Cluster,
                })
            }
            Some("EMPTY") => Ok(Download {
                path: rel,
                size: 0,
                modified: time(num(1)),
                span: None,
                partial: false,
                body,
                source: FileSource::Cluster,
            }),
            Some("RANGE") => Err(DownloadError::Unsatisfiable(num(1).unwrap_or(0))),
            Some("NO") => {
                let why = refusal(words.get(1).copied().unwrap_or_default());
                Err(if why.contains("leads out") {
                    MediatorError::Invalid(Problem::new("/path", why).into())
                } else {
                    MediatorError::NotFound(format!("task {}: {why}", task.id))
                }
                .into())
            }
            _ => Err(unavailable(task, &format!("the answer is not understood: {header}")).into()),
        }
    }
}

impl Mediator {
    /// The task's outputs as a gzipped tarball streamed from the cluster as its owner:
    /// the application's `outputs` globs, or `chosen` paths (files or folders) of the
    /// run directory; never the staged inputs. Returns how many entries it bundles and
    /// the stream.
    pub async fn outputs_tarball(
        &self,
        task: &Task,
        chosen: &[String],
    ) -> Result<(u64, RemoteStream, FileSource), MediatorError> {
        let mut paths = Vec::new();
        for (i, c) in chosen.iter().enumerate() {
            match relative_path(c) {
                Ok(p) if !p.is_empty() => paths.push(p),
                Ok(_) => paths.push(".".to_owned()),
                Err(why) => return Err(MediatorError::Invalid(Problem::new(format!("/path/{i}"), why).into())),
            }
        }
        if paths.is_empty() && task.outputs.is_empty() {
            return Err(MediatorError::NotFound(format!(
                "application {} declares no outputs (`outputs = [...]`); name the files to bundle (`?path=...`)",
                task.application.name
            )));
        }
        // The declared outputs, all kept in the store: bundled from there. Some left
        // out: from the cluster while it has them, else what the store kept.
        let archived = task.archive.as_ref().filter(|a| a.serves() && paths.is_empty());
        if archived.is_some_and(|a| a.left_out_count == 0) {
            return self.archived_tarball(task).await.map(|(n, s)| (n, s, FileSource::Archive));
        }
        match self.tarball_on_cluster(task, &paths).await {
            Ok((n, s)) => Ok((n, s, FileSource::Cluster)),
            Err(MediatorError::NotFound(_) | MediatorError::Unavailable(_)) if archived.is_some() => {
                self.archived_tarball(task).await.map(|(n, s)| (n, s, FileSource::Archive))
            }
            Err(e) => Err(e),
        }
    }

    async fn tarball_on_cluster(&self, task: &Task, paths: &[String]) -> Result<(u64, RemoteStream), MediatorError> {
        let globs = if paths.is_empty() { task.outputs.clone() } else { Vec::new() };
        let staged: Vec<String> = task.staged.iter().map(|s| s.name.clone()).collect();
        let exec = self.owner_exec(task).await?;
        let body = self
            .clusters
            .stream(&exec, &tarball_script(&task.run_dir, &globs, paths, &staged), STREAM_IDLE)
            .await
            .map_err(|e| unavailable(task, &format!("could not bundle the outputs: {e}")))?;
        let header = body.header.clone();
        match header.split_once(' ') {
            Some(("OK", n)) => Ok((n.trim().parse().unwrap_or(0), body)),
            Some(("NO", b64)) => {
                let why = refusal(b64);
                Err(MediatorError::NotFound(format!("task {}: {why}", task.id)))
            }
            _ => Err(unavailable(task, &format!("the answer is not understood: {header}"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_relative_and_never_climb_out() {
        assert_eq!(relative_path("out/./frame-1.ppm").unwrap(), "out/frame-1.ppm");
        assert_eq!(relative_path("a//b/").unwrap(), "a/b");
        assert_eq!(relative_path("").unwrap(), "");
        for bad in ["/etc/passwd", "../x", "a/../../b", "a/..", "x\ny"] {
            assert!(relative_path(bad).is_err(), "{bad}");
        }
        // A name that merely starts with dots is a name.
        assert_eq!(relative_path("..hidden/...").unwrap(), "..hidden/...");
    }

    #[test]
    fn ranges_are_read_as_http_writes_them() {
        assert_eq!(ByteRange::parse("bytes=0-499").unwrap(), Some(ByteRange::Between(0, 499)));
        assert_eq!(ByteRange::parse("bytes=500-").unwrap(), Some(ByteRange::From(500)));
        assert_eq!(ByteRange::parse("bytes=-500").unwrap(), Some(ByteRange::Last(500)));
        assert_eq!(ByteRange::parse("bytes=0-1,5-6").unwrap(), None, "several: the whole file");
        assert_eq!(ByteRange::parse("items=1-2").unwrap(), None);
        for bad in ["bytes=-", "bytes=5-1", "bytes=a-b", "bytes=12"] {
            assert!(ByteRange::parse(bad).is_err(), "{bad}");
        }
    }

    /// The scripts, run by `sh` on a real folder: a listing, a whole file, ranges,
    /// and the refusals (a symbolic link out, a missing file, a range past the end).
    #[tokio::test]
    async fn the_scripts_list_send_and_refuse_on_a_real_folder() {
        let tmp = tempfile::tempdir().unwrap();
        let run = tmp.path().join("run dir");
        std::fs::create_dir_all(run.join("out")).unwrap();
        std::fs::write(run.join("out/data.bin"), (0..=255u8).collect::<Vec<u8>>()).unwrap();
        std::fs::write(run.join("empty"), b"").unwrap();
        std::fs::write(tmp.path().join("secret"), b"not yours").unwrap();
        std::os::unix::fs::symlink(tmp.path().join("secret"), run.join("escape")).unwrap();
        let run_dir = run.to_string_lossy().into_owned();

        let out =
            super::super::remote::run_local(&list_script(&run_dir), std::time::Duration::from_secs(10)).await.unwrap();
        let list = parse_list(&out.body, &run_dir).unwrap();
        let paths: Vec<(&str, FileKind, u64)> = list.files.iter().map(|f| (f.path.as_str(), f.kind, f.size)).collect();
        assert_eq!(
            paths,
            [
                ("empty", FileKind::File, 0),
                ("escape", FileKind::Link, paths[1].2),
                ("out", FileKind::Dir, paths[2].2),
                ("out/data.bin", FileKind::File, 256)
            ]
        );
        assert_eq!(list.left_out, 0);

        let fetch = |path: &str, range: Option<ByteRange>| {
            let script = download_script(&run_dir, path, range);
            async move {
                let mut s = super::super::stream::local_stream(&script).await.unwrap();
                let mut bytes = Vec::new();
                while let Some(c) = s.body.recv().await {
                    bytes.extend(c.unwrap());
                }
                (s.header, bytes)
            }
        };
        let (h, b) = fetch("out/data.bin", None).await;
        assert!(h.starts_with("OK 256 ") && h.ends_with(" 0 255"), "{h}");
        assert_eq!(b, (0..=255u8).collect::<Vec<u8>>());
        let (h, b) = fetch("out/data.bin", Some(ByteRange::Between(10, 12))).await;
        assert!(h.ends_with(" 10 12"), "{h}");
        assert_eq!(b, [10, 11, 12]);
        let (_, b) = fetch("out/data.bin", Some(ByteRange::Last(2))).await;
        assert_eq!(b, [254, 255]);
        let (h, _) = fetch("out/data.bin", Some(ByteRange::From(256))).await;
        assert_eq!(h, "RANGE 256");
        let (h, b) = fetch("empty", None).await;
        assert!(h.starts_with("EMPTY ") && b.is_empty(), "{h}");
        // The outputs as a tarball: globs expanded, the link out and the staged input
        // left out, each entry once.
        std::fs::write(run.join("input.dat"), b"staged").unwrap();
        std::fs::write(run.join("out/input.dat"), b"made by the job").unwrap();
        std::fs::write(run.join("has space.txt"), b"spaced").unwrap();
        let canary = tmp.path().join("canary");
        let c = canary.display();
        let globs = [
            "out/*".to_owned(),
            "out/data.bin".to_owned(),
            "esc*".to_owned(),
            "input.dat".to_owned(),
            "none-*".to_owned(),
            "has sp*".to_owned(),
            format!("$(touch {c})*"),
            format!("`touch {c}`"),
            format!("x;touch {c}"),
        ];
        let script = tarball_script(&run_dir, &globs, &[], &["input.dat".to_owned()]);
        let mut s = super::super::stream::local_stream(&script).await.unwrap();
        assert_eq!(s.header, "OK 3", "out/data.bin, out/input.dat, has space.txt");
        assert!(!canary.exists(), "a glob is only ever a pattern");
        let mut tgz = Vec::new();
        while let Some(c) = s.body.recv().await {
            tgz.extend(c.unwrap());
        }
        let unpacked = tmp.path().join("unpacked");
        std::fs::create_dir_all(&unpacked).unwrap();
        std::fs::write(tmp.path().join("o.tgz"), &tgz).unwrap();
        let ok = std::process::Command::new("tar")
            .arg("-xzf")
            .arg(tmp.path().join("o.tgz"))
            .arg("-C")
            .arg(&unpacked)
            .status()
            .unwrap();
        assert!(ok.success());
        assert_eq!(std::fs::read(unpacked.join("out/data.bin")).unwrap(), (0..=255u8).collect::<Vec<u8>>());
        assert!(!unpacked.join("input.dat").exists() && !unpacked.join("escape").exists());
        assert_eq!(std::fs::read(unpacked.join("has space.txt")).unwrap(), b"spaced");
        // A chosen folder: everything in it but the staged input at the top.
        let script = tarball_script(&run_dir, &[], &[".".to_owned()], &["input.dat".to_owned()]);
        let mut s = super::super::stream::local_stream(&script).await.unwrap();
        assert_eq!(s.header, "OK 1", "the run directory itself");
        let mut tgz = Vec::new();
        while let Some(c) = s.body.recv().await {
            tgz.extend(c.unwrap());
        }
        let listing = std::process::Command::new("tar")
            .arg("-tz")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        use std::io::Write as _;
        let mut listing = listing;
        listing.stdin.take().unwrap().write_all(&tgz).unwrap();
        let names = String::from_utf8(listing.wait_with_output().unwrap().stdout).unwrap();
        assert!(names.contains("./out/input.dat") && !names.lines().any(|l| l == "./input.dat"), "{names}");
        // Nothing matching: said.
        let script = tarball_script(&run_dir, &["none-*".to_owned()], &[], &[]);
        let s = super::super::stream::local_stream(&script).await.unwrap();
        assert!(s.header.starts_with("NO "), "{}", s.header);

        for (path, why) in [("escape", "leads out"), ("nothing", "there is no"), ("out", "not a regular file")] {
            let (h, b) = fetch(path, None).await;
            assert!(refusal(h.strip_prefix("NO ").unwrap()).contains(why), "{path}: {h}");
            assert!(b.is_empty());
        }
    }
}

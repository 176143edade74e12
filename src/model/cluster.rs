//! Clusters: where tasks run. Connection details with a pinned host key, the
//! scheduler kind, the run-directory base, limits and default resources.

use std::collections::BTreeMap;
use std::fmt;

use base64::Engine as _;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::names::ClusterName;
use super::problems::Problems;
use super::resources::{Memory, Resources, SchedulerToken, WallTime};

/// Which batch scheduler runs the jobs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SchedulerKind {
    /// Slurm (`sbatch`, `squeue`, `sacct`, `scancel`).
    Slurm,
    /// PBS Pro / OpenPBS / Torque (`qsub`, `qstat`, `qdel`).
    Pbs,
    /// Grid Engine (`qsub`, `qstat`, `qdel`).
    Sge,
    /// No scheduler: phase scripts run as local processes of the server's host.
    Local,
}

impl SchedulerKind {
    /// Whether hpcforge can submit to clusters of this kind. A cluster whose scheduler
    /// cannot run is refused at upload rather than accepted and left to fail.
    pub fn is_implemented(self) -> bool {
        matches!(self, SchedulerKind::Slurm | SchedulerKind::Sge | SchedulerKind::Local)
    }

    /// The kinds that can run, for messages.
    pub fn implemented() -> Vec<&'static str> {
        [SchedulerKind::Slurm, SchedulerKind::Pbs, SchedulerKind::Sge, SchedulerKind::Local]
            .into_iter()
            .filter(|k| k.is_implemented())
            .map(SchedulerKind::as_str)
            .collect()
    }

    /// The kinds that can run, as a sentence's list: `slurm, sge and local`.
    pub fn implemented_list() -> String {
        let kinds = Self::implemented();
        match kinds.split_last() {
            Some((last, rest)) if !rest.is_empty() => format!("{} and {last}", rest.join(", ")),
            _ => kinds.join(""),
        }
    }

    /// Name as written in definitions and as a `forge-templates/<name>` folder.
    pub fn as_str(self) -> &'static str {
        match self {
            SchedulerKind::Slurm => "slurm",
            SchedulerKind::Pbs => "pbs",
            SchedulerKind::Sge => "sge",
            SchedulerKind::Local => "local",
        }
    }
}

/// Key types accepted for a cluster's pinned host key.
const HOST_KEY_TYPES: [&str; 6] =
    ["ssh-ed25519", "ecdsa-sha2-nistp256", "ecdsa-sha2-nistp384", "ecdsa-sha2-nistp521", "rsa-sha2-512", "ssh-rsa"];

/// A cluster's SSH host key, pinned in its definition. Connections whose host key
/// differs are refused; nothing is ever accepted on first use.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct HostKey {
    /// Key type (`ssh-ed25519`, ...).
    pub kind: String,
    /// The key blob, base64 as in `known_hosts`.
    pub blob: String,
}

impl HostKey {
    /// Parses a public key line (`ssh-ed25519 AAAA... comment`) or a `known_hosts` line
    /// (`[host]:port ssh-ed25519 AAAA...`). The blob must decode and name the same
    /// key type inside, so a truncated or mixed-up paste is caught at upload.
    pub fn parse(line: &str) -> Result<Self, String> {
        let words: Vec<&str> = line.split_whitespace().collect();
        let Some(pos) = words.iter().position(|w| HOST_KEY_TYPES.contains(w)) else {
            return Err(format!(
                "no key type found; expected a line like `ssh-ed25519 AAAA...` (one of {})",
                HOST_KEY_TYPES.join(", ")
            ));
        };
        let kind = words[pos];
        let Some(blob) = words.get(pos + 1) else {
            return Err(format!("the `{kind}` key has no key data after its type"));
        };
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(blob)
            .map_err(|e| format!("the key data is not valid base64: {e}"))?;
        // SSH wire format: uint32 length, then the key type name.
        let inner = bytes
            .get(..4)
            .map(|l| u32::from_be_bytes([l[0], l[1], l[2], l[3]]) as usize)
            .and_then(|n| bytes.get(4..4 + n))
            .and_then(|t| std::str::from_utf8(t).ok());
        // `rsa-sha2-*` are signature names; the key blob of those keys says `ssh-rsa`.
        let expected = if kind.starts_with("rsa-sha2") { "ssh-rsa" } else { kind };
        if inner != Some(expected) {
            return Err(format!("the key data does not hold a `{kind}` key (was the line cut or mixed up?)"));
        }
        Ok(Self { kind: expected.to_owned(), blob: (*blob).to_owned() })
    }

    /// The raw key blob, as a server presents it during the handshake.
    pub fn blob_bytes(&self) -> Vec<u8> {
        base64::engine::general_purpose::STANDARD.decode(&self.blob).expect("checked at parse")
    }
}

impl fmt::Display for HostKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.kind, self.blob)
    }
}

impl Serialize for HostKey {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for HostKey {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        HostKey::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// Hard limits a site puts on jobs sent to this cluster. Definitions and tasks that
/// ask for more are refused before anything is submitted.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// Most CPUs one job may ask for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_cpus: Option<u32>,
    /// Most frames one `range` input may hold on this cluster (the engine's own bound,
    /// [`super::frames::MAX_FRAMES`], applies either way).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_frames: Option<u32>,
    /// Most memory one job may ask for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_memory: Option<Memory>,
    /// Longest wall time one job may ask for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_walltime: Option<WallTime>,
    /// Partitions jobs may use; empty means any.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub partitions: Vec<SchedulerToken>,
    /// Most live tasks one user may have on this cluster; more wait in the queue.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tasks_per_user: Option<u32>,
    /// Most live jobs (a phase is one job, a job array too) one user may have on this
    /// cluster through hpcforge, queued or running; tasks that would pass it wait in the
    /// queue.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jobs_per_user: Option<u32>,
}

/// A licence as a cluster sees it (`[licences.<name>]` in `cluster.toml`).
///
/// With `count`, a pool of this cluster's own; without, the site-wide pool of that
/// name (set by an admin: `hpcforge resources licence NAME COUNT`). `scheduler`: the
/// name the cluster's scheduler counts it under (Slurm `--licenses=<scheduler>:<n>`),
/// when the scheduler is configured with it too.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterLicence {
    /// How many this cluster has, if the pool is its own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub count: Option<u32>,
    /// The scheduler's name for it (Slurm: `fluent`, or `fluent@licserver` for a
    /// remote licence).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheduler: Option<String>,
}

/// Checks a scheduler's licence name: letters, digits, `_`, `.`, `-`, one `@`, at most 64.
pub fn check_scheduler_licence(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name.bytes().next().is_some_and(|b| b.is_ascii_alphanumeric())
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-' | b'@'))
        && name.matches('@').count() <= 1;
    if ok {
        Ok(())
    } else {
        Err(format!(
            "`{}` is not a licence name a scheduler accepts: letters, digits, `_`, `.`, `-` and one `@`, \
             starting with a letter or digit, at most 64 characters",
            name.escape_debug()
        ))
    }
}

/// A cluster definition: `clusters/<name>/cluster.toml`, or the `definition` object
/// of an upload. Forge templates travel next to it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterSpec {
    /// Unique name; also the cluster's ID in storage paths.
    pub name: ClusterName,
    /// Human title.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
    /// Notes for users and admins.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// Other IDs portals know this cluster by (a portal names the server a file lives
    /// on by its own database ID, such as `59b1302f6eea4a7e979b2c56`); a file entry
    /// whose `server.id` or `server.name` is one of these, or the cluster's name, is on
    /// this cluster.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub portal_ids: Vec<String>,
    /// The batch scheduler.
    pub scheduler: SchedulerKind,
    /// SSH host name or address (not for `local`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// SSH port.
    #[serde(default = "default_port")]
    pub port: u16,
    /// The host key the SSH server must present (not for `local`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_key: Option<HostKey>,
    /// Folder-format convenience: a file holding the host key (a `.pub` file or a
    /// `known_hosts`). `hpcforge cluster push` reads it into `host_key`; the server
    /// never reads files named by a definition.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_key_file: Option<String>,
    /// Where run directories are created on the cluster: an absolute path or one
    /// starting with `~/` (the user's home); `{user}` stands for the task's user.
    /// Each task gets `<base>/<task-id>`.
    #[serde(default = "default_run_dir_base")]
    pub run_dir_base: String,
    /// Whether `sacct` can answer for jobs that have left the queue.
    #[serde(default)]
    pub accounting: bool,
    /// Grid Engine: the parallel environment jobs with more than one CPU ask for
    /// slots in (`-pe <name> <cpus>`); without one, jobs have one CPU.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parallel_environment: Option<SchedulerToken>,
    /// Grid Engine: the complex that limits a job's memory, per slot (`h_vmem` when
    /// unset; some sites use `mem_free` or their own).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_resource: Option<SchedulerToken>,
    /// Which default template set in `forge-templates/` this cluster's forge
    /// templates came from, if any (kept as provenance).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub templates: Option<String>,
    /// Resources for phases that set none themselves.
    #[serde(default)]
    pub defaults: Resources,
    /// Site limits.
    #[serde(default)]
    pub limits: Limits,
    /// Licences jobs on this cluster may ask for: pools of its own, and how its
    /// scheduler names site-wide ones.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub licences: BTreeMap<super::names::LicenceName, ClusterLicence>,
    /// Run directories live in a workspace of the site's workspace tool
    /// (hpc-workspace: `ws_allocate`, `ws_extend`, `ws_list`), one per user, instead
    /// of under `run_dir_base`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workspace: Option<WorkspaceSpec>,
}

/// How a cluster's run directories live in workspaces (`[workspace]` in
/// `cluster.toml`; docs/definitions.md, "Workspaces").
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkspaceSpec {
    /// The workspace's ID, the same for every task of a user (`ws_allocate ID DAYS`).
    #[serde(default = "default_ws_id")]
    pub id: String,
    /// The workspace filesystem (`ws_allocate -F FS`); the tool's default if unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filesystem: Option<String>,
    /// Days asked for when it is allocated or extended.
    #[serde(default = "default_ws_days")]
    pub days: u32,
    /// Extend it (while extensions remain) when fewer days than this remain and a
    /// task uses it.
    #[serde(default = "default_ws_extend_days")]
    pub extend_days: u32,
    /// Warn its owner this many days before it expires.
    #[serde(default = "default_ws_warn_days")]
    pub warn_days: u32,
}

fn default_ws_id() -> String {
    "hpcforge".to_owned()
}

fn default_ws_days() -> u32 {
    30
}

fn default_ws_extend_days() -> u32 {
    7
}

fn default_ws_warn_days() -> u32 {
    3
}

/// Checks a workspace ID or filesystem name: letters, digits, `.`, `_`, `-`, at most 64.
pub fn check_ws_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name.bytes().next().is_some_and(|b| b.is_ascii_alphanumeric())
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "`{}` is not a workspace name: letters, digits, `_`, `.`, `-`, starting with a letter or digit, at most 64",
            name.escape_debug()
        ))
    }
}

fn default_port() -> u16 {
    22
}

fn default_run_dir_base() -> String {
    "~/hpcforge".to_owned()
}

/// Checks a run-directory base: `~/...` or absolute, in a conservative character set
/// (it is part of every path the mediator creates and every `--chdir`).
pub fn check_run_dir_base(base: &str) -> Result<(), String> {
    // `{user}` stands for the task's user (e.g. `/scratch/{user}/hpcforge`).
    let plain = base.replace("{user}", "user");
    let rest = plain.strip_prefix("~/").or_else(|| plain.strip_prefix('/'));
    let Some(rest) = rest else {
        return Err(format!("`{}` must be absolute or start with `~/`", base.escape_debug()));
    };
    if base.len() > 1024 {
        return Err("longer than 1024 bytes".into());
    }
    if !rest.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'/' | b'.' | b'_' | b'-')) {
        return Err(format!("`{}` may only use letters, digits, `/`, `.`, `_` and `-`", base.escape_debug()));
    }
    if rest.split('/').any(|s| s == ".." || s == ".") {
        return Err(format!("`{}` contains a `.` or `..` segment", base.escape_debug()));
    }
    Ok(())
}

/// Checks a host name or address: letters, digits, `.`, `-`, `:` (IPv6), at most 253.
fn check_host(host: &str) -> Result<(), String> {
    let ok = !host.is_empty()
        && host.len() <= 253
        && !host.starts_with('-')
        && host.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b':' | b'_'));
    if ok { Ok(()) } else { Err(format!("`{}` is not a host name or address", host.escape_debug())) }
}

impl ClusterSpec {
    /// Whether `id` names this cluster: its name, or one of its `portal_ids`.
    pub fn is_known_as(&self, id: &str) -> bool {
        id == self.name.as_str() || self.portal_ids.iter().any(|p| p == id)
    }

    /// Checks the definition; problems under pointers relative to it.
    pub fn check(&self, problems: &mut Problems) {
        if !self.scheduler.is_implemented() {
            problems.push(
                "/scheduler",
                format!(
                    "`{}` clusters cannot run yet: hpcforge submits to {} clusters only, so this cluster would accept \
                     tasks that never start",
                    self.scheduler.as_str(),
                    SchedulerKind::implemented_list()
                ),
            );
        }
        for (i, id) in self.portal_ids.iter().enumerate() {
            if id.is_empty() || id.len() > 200 || id.chars().any(char::is_control) {
                problems.push(
                    format!("/portal_ids/{i}"),
                    "must be a non-empty ID of at most 200 characters without control characters",
                );
            }
        }
        let remote = self.scheduler != SchedulerKind::Local;
        match (&self.host, remote) {
            (None, true) => {
                problems.push("/host", format!("a `{}` cluster needs the SSH `host`", self.scheduler.as_str()))
            }
            (Some(h), _) => {
                if let Err(why) = check_host(h) {
                    problems.push("/host", why);
                }
            }
            (None, false) => {}
        }
        if remote && self.host_key.is_none() {
            problems.push(
                "/host_key",
                "the cluster's SSH host key is required (e.g. `ssh-keyscan -t ed25519 HOST`); hosts are never trusted on first use",
            );
        }
        if self.host_key_file.is_some() {
            problems.push(
                "/host_key_file",
                "only `hpcforge cluster push` reads host key files; send the key itself in `host_key`",
            );
        }
        if self.port == 0 {
            problems.push("/port", "port 0 is not a valid SSH port");
        }
        if let Err(why) = check_run_dir_base(&self.run_dir_base) {
            problems.push("/run_dir_base", why);
        }
        for (name, l) in &self.licences {
            if let Some(s) = &l.scheduler
                && let Err(why) = check_scheduler_licence(s)
            {
                problems.push(format!("/licences/{name}/scheduler"), why);
            }
            if l.count.is_some_and(|c| c > super::resources::MAX_LICENCES) {
                problems.push(
                    format!("/licences/{name}/count"),
                    format!("at most {} licences in one pool", super::resources::MAX_LICENCES),
                );
            }
        }
        for (field, v) in [("tasks_per_user", self.limits.tasks_per_user), ("jobs_per_user", self.limits.jobs_per_user)]
        {
            if v == Some(0) {
                problems.push(format!("/limits/{field}"), "0 would let nobody run anything; leave it out for no limit");
            }
        }
        let l = &self.limits;
        let d = &self.defaults;
        if let (Some(c), Some(max)) = (d.cpus, l.max_cpus)
            && c > max
        {
            problems.push("/defaults/cpus", format!("{c} is above limits.max_cpus ({max})"));
        }
        if let (Some(m), Some(max)) = (d.memory, l.max_memory)
            && m > max
        {
            problems.push("/defaults/memory", format!("{m} is above limits.max_memory ({max})"));
        }
        if let (Some(w), Some(max)) = (d.walltime, l.max_walltime)
            && w > max
        {
            problems.push("/defaults/walltime", format!("{w} is above limits.max_walltime ({max})"));
        }
        if let Some(p) = &d.partition
            && !l.partitions.is_empty()
            && !l.partitions.contains(p)
        {
            problems.push("/defaults/partition", format!("`{p}` is not in limits.partitions"));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ED25519: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl host";

    #[test]
    fn host_keys_parse_from_pub_and_known_hosts_lines() {
        let k = HostKey::parse(ED25519).unwrap();
        assert_eq!(k.kind, "ssh-ed25519");
        let kh = format!("[127.0.0.1]:2222 {}", ED25519.trim_end_matches(" host"));
        assert_eq!(HostKey::parse(&kh).unwrap(), k);
        assert_eq!(k.to_string(), "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl");
        assert_eq!(k.blob_bytes().len(), 51);
    }

    #[test]
    fn host_keys_refuse_truncated_or_mislabelled_data() {
        assert!(HostKey::parse("AAAAC3Nza").unwrap_err().contains("no key type"));
        assert!(HostKey::parse("ssh-ed25519").unwrap_err().contains("no key data"));
        assert!(HostKey::parse("ssh-ed25519 !!!").unwrap_err().contains("base64"));
        // An ed25519 blob labelled as ECDSA.
        let mislabelled = ED25519.replace("ssh-ed25519", "ecdsa-sha2-nistp256");
        assert!(HostKey::parse(&mislabelled).unwrap_err().contains("does not hold"));
        // Cut in the middle (still valid base64, wrong content).
        assert!(HostKey::parse("ssh-ed25519 AAAAC3NzaC1lZDI1").is_err());
    }

    #[test]
    fn pbs_clusters_that_cannot_run_are_refused_at_upload_and_sge_ones_are_not() {
        let spec = |kind: &str| -> ClusterSpec {
            toml::from_str(&format!(
                "name='x'\nscheduler='{kind}'\nhost='h'\nhost_key='ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl'"
            ))
            .unwrap()
        };
        let mut p = Problems::default();
        spec("sge").check(&mut p);
        assert!(p.is_empty(), "{p:?}");
        assert_eq!(SchedulerKind::implemented_list(), "slurm, sge and local");
        {
            let kind = "pbs";
            let mut p = Problems::default();
            spec(kind).check(&mut p);
            let got: Vec<_> = p.iter().map(|p| (p.pointer.as_str(), p.message.as_str())).collect();
            assert_eq!(got.len(), 1, "{got:?}");
            assert_eq!(got[0].0, "/scheduler");
            assert!(got[0].1.contains(&format!("`{kind}` clusters cannot run yet")), "{}", got[0].1);
            assert!(got[0].1.contains("slurm, sge and local"), "{}", got[0].1);
        }
    }

    #[test]
    fn a_cluster_is_known_by_its_name_and_its_portal_ids() {
        let spec: ClusterSpec =
            toml::from_str("name='rnd01'\nscheduler='local'\nportal_ids=['59b1302f6eea4a7e979b2c56']").unwrap();
        assert!(spec.is_known_as("rnd01") && spec.is_known_as("59b1302f6eea4a7e979b2c56"));
        assert!(!spec.is_known_as("rnd02") && !spec.is_known_as(""));
        let bad: ClusterSpec = toml::from_str("name='x'\nscheduler='local'\nportal_ids=['', 'ok']").unwrap();
        let mut p = Problems::default();
        bad.check(&mut p);
        assert_eq!(p.iter().map(|p| p.pointer.as_str()).collect::<Vec<_>>(), ["/portal_ids/0"]);
    }

    #[test]
    fn unknown_schedulers_are_refused_by_name() {
        let err = toml::from_str::<ClusterSpec>("name='x'\nscheduler='lsf'").unwrap_err().to_string();
        assert!(err.contains("unknown variant `lsf`") && err.contains("slurm"), "{err}");
    }

    #[test]
    fn remote_clusters_need_a_host_and_a_pinned_key() {
        let spec: ClusterSpec = toml::from_str("name='x'\nscheduler='slurm'").unwrap();
        let mut p = Problems::default();
        spec.check(&mut p);
        let pointers: Vec<_> = p.iter().map(|p| p.pointer.as_str()).collect();
        assert_eq!(pointers, ["/host", "/host_key"]);
        let local: ClusterSpec = toml::from_str("name='x'\nscheduler='local'").unwrap();
        let mut p = Problems::default();
        local.check(&mut p);
        assert!(p.is_empty(), "{p}");
    }

    #[test]
    fn run_dir_bases_are_home_relative_or_absolute_and_plain() {
        for ok in ["~/hpcforge", "/scratch/hpcforge", "~/a.b/c_d-e", "/scratch/{user}/hpcforge"] {
            check_run_dir_base(ok).unwrap();
        }
        for bad in ["hpcforge", "~alice/x", "/scratch/$USER", "/a/../b", "/a b", "~/x;rm", "/scratch/{uid}"] {
            assert!(check_run_dir_base(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn defaults_above_limits_are_reported() {
        let spec: ClusterSpec = toml::from_str(
            r#"
            name = "x"
            scheduler = "local"
            [defaults]
            cpus = 8
            partition = "long"
            [limits]
            max_cpus = 4
            partitions = ["debug"]
            "#,
        )
        .unwrap();
        let mut p = Problems::default();
        spec.check(&mut p);
        let pointers: Vec<_> = p.iter().map(|p| p.pointer.as_str()).collect();
        assert_eq!(pointers, ["/defaults/cpus", "/defaults/partition"]);
    }
}

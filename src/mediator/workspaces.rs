//! Workspaces: on a cluster whose run directories live in workspaces of the site's
//! workspace tool (hpc-workspace's `ws_allocate`, `ws_extend`, `ws_list`), each user's
//! tasks share one workspace, allocated (or found again: allocating it again changes
//! nothing) as the user over SSH before anything is staged. Its path, expiry and
//! extensions left are recorded on the task; a task whose workspace would expire before
//! its wall time could end is extended first, and refused when it cannot be; while
//! tasks use it, it is extended when few days remain, and its owner is warned (an event,
//! and the page) a set number of days before it expires.

use std::time::Duration;

use time::OffsetDateTime;

use super::clusters::refusal;
use super::remote::RemoteError;
use super::{Mediator, MediatorError, now};
use crate::forge::CompiledApp;
use crate::model::task::Workspace;
use crate::model::{ClusterSpec, Problems, UserName, cluster::WorkspaceSpec};
use crate::shell::shell_quote;

/// What one look at a user's workspace found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seen {
    /// The workspace.
    pub workspace: Workspace,
    /// What happened, for the task's events.
    pub notes: Vec<String>,
}

/// The script that allocates (or finds again) the workspace, `extend` days first when
/// asked, then lists it. Its answer: `path <dir>`, then the `ws_list` lines; or
/// `error <exit status>` and the tool's own words.
pub fn allocate_script(w: &WorkspaceSpec, extend: bool) -> String {
    let fs = w.filesystem.as_deref().map_or_else(String::new, |f| format!(" -F {}", shell_quote(f)));
    let id = shell_quote(&w.id);
    let days = w.days;
    let extend = if extend {
        format!(
            "ws_extend{fs} {id} {days} >/dev/null 2>\"$t\" || {{ echo \"error $? ws_extend\"; cat \"$t\"; rm -f \"$t\"; exit 0; }}\n"
        )
    } else {
        String::new()
    };
    format!(
        "export TZ=UTC LC_ALL=C\nt=$(mktemp) || exit 1\n\
         command -v ws_allocate >/dev/null 2>&1 || {{ echo 'error 127 ws_allocate'; echo 'ws_allocate is not installed here'; exit 0; }}\n\
         p=$(ws_allocate{fs} {id} {days} 2>\"$t\") || {{ echo \"error $? ws_allocate\"; cat \"$t\"; rm -f \"$t\"; exit 0; }}\n\
         {extend}\
         printf 'path %s\\n' \"$p\"\n\
         ws_list{fs} 2>\"$t\" || {{ echo \"error $? ws_list\"; cat \"$t\"; }}\n\
         rm -f \"$t\"\n"
    )
}

/// The script that only lists the user's workspaces (`ws_list`), for a workspace no
/// task uses any more: nothing is allocated or extended. Its answer reads as
/// [`allocate_script`]'s; a workspace that is gone is one `ws_list` does not list.
pub fn list_script(w: &WorkspaceSpec) -> String {
    let fs = w.filesystem.as_deref().map_or_else(String::new, |f| format!(" -F {}", shell_quote(f)));
    format!(
        "export TZ=UTC LC_ALL=C\nt=$(mktemp) || exit 1\n\
         command -v ws_list >/dev/null 2>&1 || {{ echo 'error 127 ws_list'; echo 'ws_list is not installed here'; exit 0; }}\n\
         ws_list{fs} >\"$t.out\" 2>\"$t\" || {{ echo \"error $? ws_list\"; cat \"$t\"; rm -f \"$t\" \"$t.out\"; exit 0; }}\n\
         printf 'path /\\n'; cat \"$t.out\"; rm -f \"$t\" \"$t.out\"\n"
    )
}

/// Reads the answer of [`allocate_script`] for workspace `w`: the workspace as
/// `ws_list` shows it (`expiration date` in UTC, as the script asks for), or the
/// tool's error in words.
pub fn parse(w: &WorkspaceSpec, body: &str) -> Result<Workspace, String> {
    let mut lines = body.lines();
    let first = lines.next().unwrap_or_default();
    if let Some(code) = first.strip_prefix("error ") {
        let said: Vec<&str> = lines.collect();
        return Err(format!("the workspace tool failed ({code}): {}", said.join(" ").trim()));
    }
    let Some(path) = first.strip_prefix("path ").map(str::trim) else {
        return Err(format!("the workspace tool answered `{}`", first.escape_debug()));
    };
    // The block of our ID: from `id: <id>` to the next `id:`.
    let mut inside = false;
    let (mut listed_path, mut expires, mut extensions) = (None, None, None);
    for line in lines {
        let line = line.trim();
        if let Some(id) = line.strip_prefix("id:") {
            inside = id.trim() == w.id;
            continue;
        }
        if !inside {
            continue;
        }
        let Some((key, value)) = line.split_once(':') else { continue };
        let value = value.trim();
        match key.trim() {
            "workspace directory" => listed_path = Some(value.to_owned()),
            "expiration date" => expires = Some(parse_date(value)?),
            "available extensions" => extensions = value.parse().ok(),
            _ => {}
        }
    }
    let Some(expires_at) = expires else {
        return Err(format!("`ws_list` does not list workspace `{}` with an expiration date", w.id));
    };
    let path = listed_path.unwrap_or_else(|| path.to_owned());
    if !path.starts_with('/') || path.bytes().any(|b| !(b.is_ascii_alphanumeric() || b"/._-".contains(&b))) {
        return Err(format!("the workspace's path `{}` is not a plain absolute path", path.escape_debug()));
    }
    Ok(Workspace { id: w.id.clone(), filesystem: w.filesystem.clone(), path, expires_at, extensions, warned_for: None })
}

/// `Sat Jan  4 10:30:04 2025` (C's `ctime`, in UTC) as a time.
fn parse_date(text: &str) -> Result<OffsetDateTime, String> {
    let words: Vec<&str> = text.split_whitespace().collect();
    let bad = || format!("`{}` is not a date `ws_list` writes", text.escape_debug());
    let [_, month, day, hms, year] = words.as_slice() else { return Err(bad()) };
    let month = match *month {
        "Jan" => time::Month::January,
        "Feb" => time::Month::February,
        "Mar" => time::Month::March,
        "Apr" => time::Month::April,
        "May" => time::Month::May,
        "Jun" => time::Month::June,
        "Jul" => time::Month::July,
        "Aug" => time::Month::August,
        "Sep" => time::Month::September,
        "Oct" => time::Month::October,
        "Nov" => time::Month::November,
        "Dec" => time::Month::December,
        _ => return Err(bad()),
    };
    let hms: Vec<u8> = hms.split(':').filter_map(|x| x.parse().ok()).collect();
    let [h, m, s] = hms.as_slice() else { return Err(bad()) };
    let date = time::Date::from_calendar_date(year.parse().map_err(|_| bad())?, month, day.parse().map_err(|_| bad())?)
        .map_err(|_| bad())?;
    let t = time::Time::from_hms(*h, *m, *s).map_err(|_| bad())?;
    Ok(time::PrimitiveDateTime::new(date, t).assume_utc())
}

/// A time as RFC 3339 (`2026-12-07T00:22:29Z`).
fn stamp(t: OffsetDateTime) -> String {
    t.format(&time::format_description::well_known::Rfc3339).unwrap_or_else(|_| t.to_string())
}

/// "in 2 days" / "in 5 hours" / "already".
fn until(t: OffsetDateTime, at: OffsetDateTime) -> String {
    let left = t - at;
    if left.is_negative() {
        "already".into()
    } else if left.whole_days() == 1 {
        "in 1 day".into()
    } else if left.whole_days() > 1 {
        format!("in {} days", left.whole_days())
    } else {
        format!("in {} hours", left.whole_hours())
    }
}

/// The longest the phases of `app` on `cluster` may run one after the other (the sum
/// of their wall times; a phase without one counts as the cluster's longest, if set).
pub fn wall_time_of(app: &CompiledApp, cluster: &ClusterSpec) -> Duration {
    let secs: u64 = app
        .graph
        .phases()
        .into_iter()
        .map(|p| {
            let r = crate::forge::render::resources_for(&app.spec, cluster, p, &mut Problems::default());
            r.walltime.or(cluster.limits.max_walltime).map_or(0, |w| w.as_secs())
        })
        .sum();
    Duration::from_secs(secs)
}

/// Whether `ws` should be extended now: fewer than `extend_days` left (or less than
/// `needed`), and extensions remain.
fn wants_extension(spec: &WorkspaceSpec, ws: &Workspace, needed: Duration, at: OffsetDateTime) -> bool {
    let soon = at + time::Duration::days(i64::from(spec.extend_days));
    let must = at + needed;
    (ws.expires_at < soon || ws.expires_at < must) && ws.extensions != Some(0)
}

/// The warning for `ws`, if it expires within `warn_days` of `at` and its owner was
/// not warned of that date yet.
fn warning(spec: &WorkspaceSpec, cluster: &str, ws: &Workspace, at: OffsetDateTime) -> Option<String> {
    let near = ws.expires_at < at + time::Duration::days(i64::from(spec.warn_days));
    if !near || ws.warned_for == Some(ws.expires_at) {
        return None;
    }
    let ext = match ws.extensions {
        Some(0) => "no extensions are left".to_owned(),
        Some(n) => format!("{n} extension(s) left"),
        None => "extensions unknown".to_owned(),
    };
    Some(format!(
        "warning: workspace `{}` on cluster {cluster} ({}) expires {} ({}); {ext}: copy what you need out of it before then",
        ws.id,
        ws.path,
        until(ws.expires_at, at),
        stamp(ws.expires_at)
    ))
}

impl Mediator {
    /// Whether to look after workspaces now: every 20 ticks (at least 5 s, at most a
    /// minute apart), so the queue's look does not read every live task each tick.
    pub(crate) fn workspaces_due(&self) -> bool {
        let every = (self.cfg.tick * 20).clamp(Duration::from_secs(5), Duration::from_secs(60));
        let mut last = self.workspaces_looked.lock().unwrap_or_else(|p| p.into_inner());
        let due = last.is_none_or(|t: std::time::Instant| t.elapsed() >= every);
        if due {
            *last = Some(std::time::Instant::now());
        }
        due
    }

    /// Runs the workspace script on `spec` as `user`; the workspace, or why not.
    async fn ws_round_trip(
        &self,
        spec: &ClusterSpec,
        w: &WorkspaceSpec,
        user: &UserName,
        extend: bool,
    ) -> Result<Workspace, MediatorError> {
        let exec = self.clusters.exec_for(spec, user).await.map_err(|e| match e {
            RemoteError::Refused(_) => MediatorError::Invalid(refusal(&e)),
            other => MediatorError::Unavailable(other.to_string()),
        })?;
        let out =
            self.clusters.run(&exec, &allocate_script(w, extend), self.cfg.query_timeout).await.map_err(
                |e| match e {
                    RemoteError::Refused(_) => MediatorError::Invalid(refusal(&e)),
                    other => MediatorError::Unavailable(format!("cluster `{}` cannot be reached: {other}", spec.name)),
                },
            )?;
        parse(w, &out.body).map_err(|why| {
            let mut p = Problems::default();
            p.push_rule(
                "/cluster",
                "workspace",
                None,
                format!("cluster `{}` keeps run directories in workspace `{}` of `{user}`, and {why}", spec.name, w.id),
            );
            MediatorError::Invalid(p)
        })
    }

    /// `user`'s workspace on `spec`, allocated or found again (one round trip): where
    /// a new task's run directory goes.
    pub(crate) async fn look_at_workspace(
        &self,
        spec: &ClusterSpec,
        user: &UserName,
    ) -> Result<Workspace, MediatorError> {
        let w = spec.workspace.as_ref().expect("a cluster with workspaces");
        self.ws_round_trip(spec, w, user, false).await
    }

    /// Makes `ws` (as [`Self::look_at_workspace`] found it) ready for a new task of
    /// `user`: extended when it would expire within its `extend_days` or before `needed`
    /// (the task's wall time) has passed; refused (422, `/cluster`) when it would still
    /// expire before then. The notes say what happened, and warn when it expires soon.
    pub(crate) async fn ready_workspace(
        &self,
        spec: &ClusterSpec,
        user: &UserName,
        mut ws: Workspace,
        needed: Duration,
    ) -> Result<Seen, MediatorError> {
        let w = spec.workspace.as_ref().expect("a cluster with workspaces");
        let at = now();
        let mut notes = vec![format!(
            "run directory in workspace `{}` ({}), which expires {}",
            ws.id,
            ws.path,
            stamp(ws.expires_at)
        )];
        if wants_extension(w, &ws, needed, at) {
            match self.ws_round_trip(spec, w, user, true).await {
                Ok(longer) => {
                    notes.push(format!(
                        "workspace `{}` extended: it now expires {}",
                        longer.id,
                        stamp(longer.expires_at)
                    ));
                    ws = longer;
                }
                Err(MediatorError::Invalid(p)) => {
                    notes.push(format!("workspace `{}` could not be extended: {p}", ws.id));
                }
                Err(e) => return Err(e),
            }
        }
        if ws.expires_at < at + needed {
            let mut p = Problems::default();
            p.push_rule(
                "/cluster",
                "workspace",
                None,
                format!(
                    "workspace `{}` of `{user}` on cluster `{}` expires {} ({}), before the task's {} s of wall time could \
                     end, and it cannot be extended further; extend or re-create it (ws_allocate), or ask for less time",
                    ws.id,
                    spec.name,
                    stamp(ws.expires_at),
                    until(ws.expires_at, at),
                    needed.as_secs()
                ),
            );
            return Err(MediatorError::Invalid(p));
        }
        if let Some(warn) = warning(w, spec.name.as_str(), &ws, at) {
            notes.push(warn);
            ws.warned_for = Some(ws.expires_at);
        }
        Ok(Seen { workspace: ws, notes })
    }

    /// Keeps the workspaces of live tasks: extends one that expires within its
    /// cluster's `extend_days` while extensions remain, and warns the owner once when it
    /// expires within `warn_days`. Only recorded dates are compared, so a cluster is
    /// asked only when something is due. Then warns of the workspaces that only ended
    /// tasks use (their results are still there): see [`Self::warn_after_the_end`].
    /// Called under the queue's lease.
    pub(crate) async fn keep_workspaces(&self) -> Result<(), crate::store::StoreError> {
        let at = now();
        let live = self.store.live_tasks().await?;
        let in_use: std::collections::HashSet<(String, String, String)> = live
            .iter()
            .filter_map(|t| {
                t.workspace.as_ref().map(|w| (t.cluster.name.to_string(), t.owner.to_string(), w.id.clone()))
            })
            .collect();
        let mut done: std::collections::HashSet<(String, String, String)> = Default::default();
        for t in live.iter().filter(|t| t.workspace.is_some()) {
            let ws = t.workspace.clone().expect("filtered");
            let key = (t.cluster.name.to_string(), t.owner.to_string(), ws.id.clone());
            let Ok(cluster) = self.forge.cluster(self.store.as_ref(), &t.cluster.name).await else { continue };
            let Some(w) = cluster.spec.workspace.clone() else { continue };
            let mut seen = ws.clone();
            let mut notes = Vec::new();
            if wants_extension(&w, &ws, Duration::ZERO, at) && !done.contains(&key) {
                match self.ws_round_trip(&cluster.spec, &w, &t.owner, true).await {
                    Ok(longer) => {
                        notes.push(format!(
                            "workspace `{}` extended: it now expires {}",
                            longer.id,
                            stamp(longer.expires_at)
                        ));
                        seen = Workspace { warned_for: ws.warned_for, ..longer };
                    }
                    Err(e) => {
                        tracing::warn!(task = %t.id, error = %e, "could not extend a workspace");
                        // Asked once per look; what the tool said is kept for the warning.
                        seen.extensions = seen.extensions.or(Some(0));
                    }
                }
                done.insert(key);
            }
            if let Some(warn) = warning(&w, cluster.name.as_str(), &seen, at) {
                notes.push(warn);
                seen.warned_for = Some(seen.expires_at);
            }
            if seen == ws {
                continue;
            }
            let _ = self
                .change_task(&t.id, |task| {
                    task.workspace = Some(seen.clone());
                    for n in &notes {
                        task.record(now(), None, n.clone());
                    }
                    Ok(())
                })
                .await?;
        }
        self.warn_after_the_end(&in_use, at).await
    }

    /// The newest ended tasks (at most [`ENDED_LOOKED_AT`]) whose workspace no live
    /// task uses: when one expires within `warn_days` by the recorded date, `ws_list`
    /// is asked (as the owner; nothing is allocated or extended) and, if it still
    /// expires that soon, the owner is warned once per date on their newest task in
    /// it. A workspace extended by hand meanwhile gets its new date recorded; one that
    /// is gone is not asked about again.
    async fn warn_after_the_end(
        &self,
        in_use: &std::collections::HashSet<(String, String, String)>,
        at: OffsetDateTime,
    ) -> Result<(), crate::store::StoreError> {
        use crate::model::TaskState;
        let filter = crate::store::TaskFilter {
            states: vec![TaskState::Completed, TaskState::Failed, TaskState::Cancelled, TaskState::Unknown],
            ..Default::default()
        };
        let ended = self.store.list_tasks(&filter, ENDED_LOOKED_AT).await?;
        let mut seen: std::collections::HashSet<(String, String, String)> = Default::default();
        for t in ended {
            let Some(ws) = t.workspace.clone() else { continue };
            let key = (t.cluster.name.to_string(), t.owner.to_string(), ws.id.clone());
            // Newest first: only the newest task of a workspace speaks for it.
            if in_use.contains(&key) || !seen.insert(key) || ws.expires_at <= at {
                continue;
            }
            let Ok(cluster) = self.forge.cluster(self.store.as_ref(), &t.cluster.name).await else { continue };
            let Some(w) = cluster.spec.workspace.clone() else { continue };
            if warning(&w, cluster.name.as_str(), &ws, at).is_none() {
                continue;
            }
            let listed = match self.ws_listing(&cluster.spec, &w, &t.owner).await {
                Ok(listed) => listed,
                Err(e) => {
                    tracing::debug!(task = %t.id, error = %e, "could not ask about an ended task's workspace");
                    continue;
                }
            };
            let mut now_ws = match listed {
                Some(l) => Workspace { warned_for: ws.warned_for, path: ws.path.clone(), ..l },
                // Gone (released, or expired early): nothing to warn of any more.
                None => Workspace { warned_for: Some(ws.expires_at), ..ws.clone() },
            };
            let warn = warning(&w, cluster.name.as_str(), &now_ws, at);
            if warn.is_some() {
                now_ws.warned_for = Some(now_ws.expires_at);
            }
            if now_ws == ws {
                continue;
            }
            let _ = self
                .change_task(&t.id, |task| {
                    task.workspace = Some(now_ws.clone());
                    if let Some(w) = &warn {
                        task.record(now(), None, format!("{w} (the task has ended; its results are there)"));
                    }
                    Ok(())
                })
                .await?;
        }
        Ok(())
    }

    /// `ws_list` as `user`: workspace `w` as listed, `None` when it is not listed.
    async fn ws_listing(
        &self,
        spec: &ClusterSpec,
        w: &WorkspaceSpec,
        user: &UserName,
    ) -> Result<Option<Workspace>, String> {
        let exec = self.clusters.exec_for(spec, user).await.map_err(|e| e.to_string())?;
        let out = self.clusters.run(&exec, &list_script(w), self.cfg.query_timeout).await.map_err(|e| e.to_string())?;
        if out.body.starts_with("error ") {
            return Err(out.body.lines().collect::<Vec<_>>().join(" "));
        }
        Ok(parse(w, &out.body).ok())
    }
}

/// How many of the newest ended tasks each look after workspaces reads.
const ENDED_LOOKED_AT: usize = 500;

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> WorkspaceSpec {
        WorkspaceSpec {
            id: "hpcforge".into(),
            filesystem: Some("scratch".into()),
            days: 30,
            extend_days: 7,
            warn_days: 3,
        }
    }

    const LISTED: &str = "path /ws/scratch/alice-hpcforge\n\
        id: other\n     workspace directory  : /ws/scratch/alice-other\n     expiration date      : Mon Jan  1 00:00:00 2024\n\
        id: hpcforge\n     workspace directory  : /ws/scratch/alice-hpcforge\n     remaining time       : 1 days 2 hours\n\
        \x20    creation time        : Thu Dec  3 10:00:00 2026\n     expiration date      : Sun Dec  6 12:30:04 2026\n\
        \x20    filesystem name      : scratch\n     available extensions : 0\n";

    #[test]
    fn ws_list_is_read_for_our_id_only() {
        let ws = parse(&spec(), LISTED).unwrap();
        assert_eq!(ws.path, "/ws/scratch/alice-hpcforge");
        assert_eq!(ws.extensions, Some(0));
        assert_eq!(ws.expires_at, time::macros::datetime!(2026-12-06 12:30:04 UTC));
        let err = parse(&spec(), "error 1 ws_allocate\nError: could not create workspace\n").unwrap_err();
        assert!(err.contains("(1 ws_allocate): Error: could not create workspace"), "{err}");
        assert!(parse(&spec(), "path /x\n").unwrap_err().contains("does not list"));
        let odd = LISTED.replace("/ws/scratch/alice-hpcforge\n     remaining", "/ws/a b\n     remaining");
        assert!(parse(&spec(), &odd).unwrap_err().contains("not a plain absolute path"));
    }

    #[test]
    fn a_workspace_is_extended_when_short_and_its_owner_warned_once_per_date() {
        let at = time::macros::datetime!(2026-12-05 12:00:00 UTC);
        let mut ws = parse(&spec(), LISTED).unwrap();
        ws.extensions = Some(2);
        assert!(wants_extension(&spec(), &ws, Duration::ZERO, at), "1 day left, 7 wanted");
        ws.extensions = Some(0);
        assert!(!wants_extension(&spec(), &ws, Duration::ZERO, at), "none left");
        let warn = warning(&spec(), "hpc1", &ws, at).unwrap();
        assert!(warn.contains("expires in 1 day (") && warn.contains("no extensions are left"), "{warn}");
        ws.warned_for = Some(ws.expires_at);
        assert_eq!(warning(&spec(), "hpc1", &ws, at), None, "once per date");
        ws.expires_at += time::Duration::days(30);
        assert_eq!(warning(&spec(), "hpc1", &ws, at), None, "far off");
    }

    #[test]
    fn the_script_quotes_what_the_cluster_names() {
        let mut w = spec();
        w.id = "a b".into();
        let s = allocate_script(&w, true);
        assert!(s.contains("ws_allocate -F scratch 'a b' 30") && s.contains("ws_extend -F scratch 'a b' 30"), "{s}");
    }
}
